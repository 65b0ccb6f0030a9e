//! The engine thread: the only owner of the [`Engine`] (and through it the store). It takes
//! inputs from the connection tasks and control messages (copy completions, ticks, status,
//! shutdown), feeds them to the engine, and carries out the engine's actions.
//!
//! It is a dedicated OS thread rather than a tokio task because every engine step may do
//! blocking store I/O (btree reads on a cache miss). A commit's journal I/O runs on the
//! blocking pool while this thread goes on: what changes meanwhile is covered by the next
//! commit (group commit), and the engine never has more than one commit outstanding.

use super::copy_runs::{CopyRun, CopyRuns};
use super::lease::ServingLease;
use super::{CopyDurability, HeldCopies};
use crate::engine::{
    Action, ConnId, CopyId, CopyPurpose, CopySource, Engine, Event, Failure, Fatal, LogEvent,
    LogLevel, MetaStore as _,
};
use crate::store::{BlockDevice, FlushTracked, Geometry, GroupFlush, SectorBuf, Store, StoreError};
use csnap_proto::auth::{self, FrameKey};
use csnap_proto::{ClientFrame, ClientId, ServerFrame, ServerMsg, ServerStatus};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;

/// Why a server stopped serving on its own (`RunningServer::failed`,
/// `ServerError::Failed`). The message is what the log says; the cause is the source.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServerFailure {
    /// The serving lease ran out before the agent renewed it.
    #[error("serving lease expired (not renewed by the agent in time): stopped serving")]
    LeaseExpired,
    /// The engine stopped: the store, a commit or a copy failed.
    #[error(transparent)]
    Engine(#[from] Fatal),
    /// A bug panicked the engine thread (the panic's message).
    #[error("engine thread panicked: {0}")]
    Panicked(String),
    /// The engine failed while the server shut down.
    #[error("store failed during shutdown")]
    FailedDuringShutdown,
}

/// Why a chunk copy ([`DataPath::copy`]) failed; each I/O error is the source, after the
/// device, offset and chunk it hit.
#[derive(Debug, thiserror::Error)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
pub enum CopyError {
    #[error("destination store chunk {0} is outside the data area")]
    DestinationOutsideData(u64),
    #[error("source store chunk {0} is outside the data area")]
    SourceOutsideData(u64),
    #[error("origin chunk {0} is beyond the origin")]
    BeyondOrigin(u64),
    /// `op` is `reading origin`, `reading store`, `writing store` or `writing origin`.
    #[error("{op} {device} at byte {offset} (chunk {chunk}): {source}")]
    Io {
        op: &'static str,
        device: String,
        offset: u64,
        chunk: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("flushing {device}: {source}")]
    Flush {
        device: String,
        #[source]
        source: std::io::Error,
    },
    /// The serving lease ran out before the copy started: it must not write the store.
    #[error("serving lease expired (not renewed by the agent in time): stopped serving")]
    LeaseExpired,
    #[error("copy worker failed: {0}")]
    Worker(#[source] tokio::task::JoinError),
    #[error("copy workers are shut down")]
    WorkersShutDown,
}

/// From connection tasks (bounded: a flood of requests pushes back onto the sockets).
pub(crate) enum Input {
    Connected {
        conn: ConnId,
        peer: String,
        outgoing: mpsc::Sender<Outgoing>,
        /// Where the reader learns the key of the client's sealed frames.
        open_key: watch::Sender<Option<FrameKey>>,
        cancel: CancellationToken,
    },
    Frame {
        conn: ConnId,
        frame: ClientFrame,
    },
    BadFrame {
        conn: ConnId,
        error: Failure,
    },
    Disconnected {
        conn: ConnId,
    },
}

/// To a connection's writer task.
pub(crate) enum Outgoing {
    Frame(ServerFrame),
    /// Seal every later frame with this key.
    Seal(FrameKey),
    /// Send what is queued, then close.
    Close,
}

/// From the server handle and the copy workers (unbounded: each producer is bounded by
/// other means).
pub(crate) enum Control {
    /// One copy, or every copy of a run (one job): they share the result and durability.
    CopyDone {
        copies: Vec<CopyId>,
        result: Result<(), Failure>,
        /// Whether the copies are stable already, or when their store write returned.
        durability: CopyDurability,
    },
    /// The I/O of the commit in flight has run (its result waits in the store).
    CommitIoDone,
    DeclareGone(ClientId),
    Status(oneshot::Sender<ServerStatus>),
    Shutdown,
    /// The server handle was dropped without a shutdown: stop, leave the store unclean.
    Abandon,
}

/// The largest run of copies from the origin one job reads and writes (see `copy_runs`).
const MAX_COPY_RUN_BYTES: u64 = 1 << 20;

/// How the engine thread ended.
pub(crate) enum Exit {
    /// Clean shutdown; the result of closing the store (marking it clean).
    Shutdown(Result<(), StoreError>),
    /// The engine reported a fatal error; the store was left as it was (unclean).
    Fatal(ServerFailure),
    /// Abandoned (handle dropped); the store was left unclean, as after a crash.
    Abandoned,
}

/// Devices and geometry for the copies the engine asks for ([`Action::Copy`]): the server's
/// data path. Public so that tests can run the real copy (read, write) on model devices
/// (`crates/server/tests/engine/powercut.rs`).
pub struct DataPath {
    origin: Arc<dyn BlockDevice>,
    /// The copy-backs' origin flushes, shared: copy-backs finishing together flush once.
    origin_flush: GroupFlush,
    store: Arc<dyn BlockDevice>,
    geometry: Geometry,
}

impl DataPath {
    /// Copies store chunk `from` onto origin chunk `chunk` and makes it stable: an online
    /// rollback's copy back ([`crate::engine::Action::CopyToOrigin`]). Blocking. The
    /// origin flush is shared with the copy-backs that finish at the same time.
    pub fn copy_to_origin(&self, from: u64, chunk: u64) -> Result<(), CopyError> {
        let g = &self.geometry;
        let cs = g.chunk_size;
        if !g.is_data_chunk(from) {
            return Err(CopyError::SourceOutsideData(from));
        }
        let offset = chunk
            .checked_mul(cs)
            .filter(|o| *o < g.origin_size)
            .ok_or(CopyError::BeyondOrigin(chunk))?;
        let mut buf = SectorBuf::zeroed(cs as usize);
        self.read_store(&mut buf, from)?;
        // The last origin chunk may be partial: only its part is written.
        let len = cs.min(g.origin_size - offset) as usize;
        self.origin
            .write_at(&buf[..len], offset)
            .map_err(|source| io_error("writing origin", &*self.origin, offset, chunk, source))?;
        let written = self.origin_flush.stamp();
        self.origin_flush
            .flush_covering(written)
            .map_err(|source| CopyError::Flush {
                device: self.origin.name(),
                source,
            })
    }

    /// The data path over these devices, for a store of this geometry.
    pub fn new(
        origin: Arc<dyn BlockDevice>,
        store: Arc<dyn BlockDevice>,
        geometry: Geometry,
    ) -> DataPath {
        DataPath {
            origin_flush: GroupFlush::new(origin.clone()),
            origin,
            store,
            geometry,
        }
    }

    /// Copies `count` consecutive origin chunks from `chunk` on into the consecutive store
    /// chunks from `to` on, with one read and one write: a run of [`Action::Copy`]s (see
    /// `copy_runs`). Blocking; not flushed, as [`DataPath::copy`].
    pub fn copy_origin_run(&self, chunk: u64, to: u64, count: u64) -> Result<(), CopyError> {
        let g = &self.geometry;
        let cs = g.chunk_size;
        let last_to = count
            .checked_sub(1)
            .and_then(|n| to.checked_add(n))
            .ok_or(CopyError::DestinationOutsideData(to))?;
        if !g.is_data_chunk(to) || !g.is_data_chunk(last_to) {
            return Err(CopyError::DestinationOutsideData(last_to));
        }
        let offset = chunk
            .checked_mul(cs)
            .filter(|o| *o < g.origin_size)
            .ok_or(CopyError::BeyondOrigin(chunk))?;
        let bytes = count
            .checked_mul(cs)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or(CopyError::BeyondOrigin(chunk))?;
        let end = chunk
            .checked_add(count)
            .and_then(|c| c.checked_mul(cs))
            .ok_or(CopyError::BeyondOrigin(chunk))?;
        // Every chunk but the last must lie wholly in the origin; the last may be partial
        // (the rest of its copy stays zero), as for one chunk.
        if end - cs >= g.origin_size {
            return Err(CopyError::BeyondOrigin(chunk + count - 1));
        }
        let mut buf = SectorBuf::zeroed(bytes);
        let len = (end.min(g.origin_size) - offset) as usize;
        self.read_origin(&mut buf[..len], offset, chunk)?;
        self.write_store(&buf, to)
    }

    /// Copies one chunk into store chunk `to`: the work behind [`Action::Copy`], whose
    /// result is [`Event::CopyDone`](crate::engine::Event). Blocking. The copy is not
    /// flushed here: nothing uses it before a journal commit names it, and the commit's
    /// first step flushes the store device (one flush for every copy it covers).
    pub fn copy(&self, from: CopySource, to: u64) -> Result<(), CopyError> {
        let g = &self.geometry;
        let cs = g.chunk_size;
        if !g.is_data_chunk(to) {
            return Err(CopyError::DestinationOutsideData(to));
        }
        // Aligned, so an O_DIRECT device reads into it and writes from it as it is.
        let mut buf = SectorBuf::zeroed(cs as usize);
        match from {
            CopySource::Origin { chunk } => {
                let offset = chunk
                    .checked_mul(cs)
                    .filter(|o| *o < g.origin_size)
                    .ok_or(CopyError::BeyondOrigin(chunk))?;
                // The last chunk may be partial; the rest of the copy stays zero.
                let len = cs.min(g.origin_size - offset) as usize;
                self.read_origin(&mut buf[..len], offset, chunk)?;
            }
            CopySource::Store { store_chunk } => {
                if !g.is_data_chunk(store_chunk) {
                    return Err(CopyError::SourceOutsideData(store_chunk));
                }
                self.read_store(&mut buf, store_chunk)?;
            }
        }
        self.write_store(&buf, to)
    }

    fn read_origin(&self, buf: &mut [u8], offset: u64, chunk: u64) -> Result<(), CopyError> {
        self.origin
            .read_at(buf, offset)
            .map_err(|source| io_error("reading origin", &*self.origin, offset, chunk, source))
    }

    fn read_store(&self, buf: &mut [u8], store_chunk: u64) -> Result<(), CopyError> {
        let offset = self.geometry.chunk_offset(store_chunk);
        self.store
            .read_at(buf, offset)
            .map_err(|source| io_error("reading store", &*self.store, offset, store_chunk, source))
    }

    fn write_store(&self, buf: &[u8], store_chunk: u64) -> Result<(), CopyError> {
        let offset = self.geometry.chunk_offset(store_chunk);
        self.store
            .write_at(buf, offset)
            .map_err(|source| io_error("writing store", &*self.store, offset, store_chunk, source))
    }
}

/// A copy's device I/O failed: what, where, and on which device.
fn io_error(
    op: &'static str,
    device: &dyn BlockDevice,
    offset: u64,
    chunk: u64,
    source: std::io::Error,
) -> CopyError {
    CopyError::Io {
        op,
        device: device.name(),
        offset,
        chunk,
        source,
    }
}

struct ConnState {
    peer: String,
    outgoing: mpsc::Sender<Outgoing>,
    open_key: watch::Sender<Option<FrameKey>>,
    cancel: CancellationToken,
    /// The client, once the engine authenticated it (for log lines only).
    client: Option<ClientId>,
}

pub(crate) struct DriverParts {
    pub engine: Engine<Store>,
    pub rt: Handle,
    pub net_rx: mpsc::Receiver<Input>,
    pub ctl_rx: mpsc::UnboundedReceiver<Control>,
    pub ctl_tx: mpsc::UnboundedSender<Control>,
    pub data: Arc<DataPath>,
    /// The store device the data path and the store write through, counting its flushes.
    pub store_flushes: Arc<FlushTracked>,
    pub max_copies: usize,
    pub fatal_tx: Arc<watch::Sender<Option<ServerFailure>>>,
    /// Cancelled when the server stops: ends the acceptor and every connection task.
    pub stop: CancellationToken,
    pub volume: String,
    /// Checked before every input, action and commit, and on a timer at its end.
    pub lease: Arc<ServingLease>,
    /// The span every line of the engine thread is logged in (it carries the volume).
    pub span: tracing::Span,
    /// Set (Unix ms) when the first origin write is granted (0 until then).
    pub first_origin_grant: Arc<AtomicU64>,
}

pub(crate) struct Driver {
    engine: Engine<Store>,
    rt: Handle,
    net_rx: mpsc::Receiver<Input>,
    net_open: bool,
    ctl_rx: mpsc::UnboundedReceiver<Control>,
    ctl_tx: mpsc::UnboundedSender<Control>,
    data: Arc<DataPath>,
    store_flushes: Arc<FlushTracked>,
    /// Finished copies the engine has not heard of yet (see [`HeldCopies`]).
    held_copies: HeldCopies<(CopyId, Result<(), Failure>)>,
    copy_slots: Arc<Semaphore>,
    copies_in_flight: usize,
    /// Copies from the origin of the current pump, gathered into runs.
    copy_runs: CopyRuns,
    conns: HashMap<ConnId, ConnState>,
    fatal_tx: Arc<watch::Sender<Option<ServerFailure>>>,
    stop: CancellationToken,
    volume: String,
    /// Events the shell generated while carrying out actions (a connection it killed).
    pending: VecDeque<Event>,
    abandoned: bool,
    /// The engine asked for a commit that has not started yet.
    commit_due: bool,
    /// A commit's journal I/O runs on the blocking pool ([`Control::CommitIoDone`] ends it).
    commit_in_flight: bool,
    lease: Arc<ServingLease>,
    span: tracing::Span,
    first_origin_grant: Arc<AtomicU64>,
    /// The engine clock's second at the last [`Event::Tick`] (0: none yet).
    ticked_at: u64,
}

/// When the engine's clock reads (Unix seconds) and the monotonic instant it started from.
fn clock_start() -> &'static (u64, Instant) {
    static START: std::sync::OnceLock<(u64, Instant)> = std::sync::OnceLock::new();
    START.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        (wall, Instant::now())
    })
}

/// The instant [`unix_now`] first reads `secs` (at once if it already does).
fn instant_of(secs: u64) -> Instant {
    let (wall, mono) = clock_start();
    *mono + Duration::from_secs(secs.saturating_sub(*wall))
}

/// The engine's clock: Unix seconds, but advancing monotonically from the first reading
/// (leases and grace times must not jump with the wall clock; snapshot ctimes may drift
/// from it by the clock's corrections since start, which is harmless).
pub fn unix_now() -> u64 {
    let (wall, mono) = clock_start();
    wall + mono.elapsed().as_secs()
}

enum Wake {
    Ctl(Control),
    Net(Option<Input>),
    /// The serving lease's end as last known has come (it may have been extended since).
    LeaseEnd,
    /// The time the engine asked to be ticked at has come.
    TickDue,
}

impl Driver {
    pub(crate) fn new(p: DriverParts) -> Driver {
        let copy_runs = CopyRuns::new(MAX_COPY_RUN_BYTES / p.data.geometry.chunk_size.max(1));
        Driver {
            engine: p.engine,
            rt: p.rt,
            net_rx: p.net_rx,
            net_open: true,
            ctl_rx: p.ctl_rx,
            ctl_tx: p.ctl_tx,
            data: p.data,
            store_flushes: p.store_flushes,
            held_copies: HeldCopies::default(),
            copy_slots: Arc::new(Semaphore::new(p.max_copies.max(1))),
            copies_in_flight: 0,
            copy_runs,
            conns: HashMap::new(),
            fatal_tx: p.fatal_tx,
            stop: p.stop,
            volume: p.volume,
            pending: VecDeque::new(),
            abandoned: false,
            commit_due: false,
            commit_in_flight: false,
            lease: p.lease,
            span: p.span,
            first_origin_grant: p.first_origin_grant,
            ticked_at: 0,
        }
    }

    /// Runs until shutdown or a fatal error.
    pub(crate) fn run(mut self) -> Exit {
        let _entered = self.span.clone().entered();
        if let Err(reason) = self.pump().and_then(|()| self.run_commits()) {
            return self.fatal(reason);
        }
        loop {
            let wake = {
                let (ctl, net, net_open) = (&mut self.ctl_rx, &mut self.net_rx, self.net_open);
                // An idle server must notice the end of its lease too, not only the next
                // input: wake at the end as it stands now (an extension meanwhile just
                // means this wake finds the lease still running).
                let lease_end = self.lease.until().map(tokio::time::Instant::from_std);
                // No ticks while the engine waits for nothing in time; at most one a second.
                let tick_at = self.engine.poll_timeout().map(|at| {
                    tokio::time::Instant::from_std(instant_of(at.max(self.ticked_at + 1)))
                });
                self.rt.block_on(async {
                    let lease_timer = async {
                        match lease_end {
                            Some(end) => tokio::time::sleep_until(end).await,
                            None => std::future::pending().await,
                        }
                    };
                    let tick_timer = async {
                        match tick_at {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        biased;
                        _ = lease_timer => Wake::LeaseEnd,
                        _ = tick_timer => Wake::TickDue,
                        c = ctl.recv() => match c {
                            Some(c) => Wake::Ctl(c),
                            // Every handle is gone: nobody can ask for a shutdown any more.
                            None => Wake::Ctl(Control::Shutdown),
                        },
                        n = net.recv(), if net_open => Wake::Net(n),
                    }
                })
            };
            let mut step = self.on_wake(wake);
            // Take what else is already queued before blocking again.
            for _ in 0..256 {
                if !matches!(step, Ok(true)) {
                    break;
                }
                let wake = match self.ctl_rx.try_recv() {
                    Ok(c) => Wake::Ctl(c),
                    Err(_) if self.net_open => match self.net_rx.try_recv() {
                        Ok(i) => Wake::Net(Some(i)),
                        Err(_) => break,
                    },
                    Err(_) => break,
                };
                step = self.on_wake(wake);
            }
            // Commit after the batch (group commit), and always before blocking again.
            let step = step.and_then(|go| self.run_commits().map(|()| go));
            match step {
                Ok(true) => {}
                Ok(false) if self.abandoned => {
                    tracing::warn!("server handle dropped without shutdown; store left unclean");
                    self.stop.cancel();
                    return Exit::Abandoned;
                }
                Ok(false) => return self.shutdown(),
                Err(reason) => return self.fatal(reason),
            }
        }
    }

    /// Err(LeaseExpired) once the serving lease has run out: from then on nothing is
    /// handled, answered, copied or committed.
    fn check_lease(&self) -> Result<(), ServerFailure> {
        if self.lease.expired() {
            return Err(ServerFailure::LeaseExpired);
        }
        Ok(())
    }

    /// Ok(false): shutdown requested; Err: fatal.
    fn on_wake(&mut self, wake: Wake) -> Result<bool, ServerFailure> {
        self.check_lease()?;
        self.tick_if_new_second();
        match wake {
            // Only woken to check the lease, or ticked above.
            Wake::LeaseEnd | Wake::TickDue => {}
            Wake::Ctl(Control::Shutdown) => return Ok(false),
            Wake::Ctl(Control::Abandon) => {
                self.abandoned = true;
                return Ok(false);
            }
            Wake::Ctl(c) => self.on_control(c),
            Wake::Net(None) => self.net_open = false,
            Wake::Net(Some(i)) => self.on_input(i),
        }
        self.pump()?;
        Ok(true)
    }

    /// Ticks the engine when its clock's second has changed since the last tick: before
    /// an input, so that what it stamps (a connection's start, when a client was last
    /// heard) is current, and when its [`Engine::poll_timeout`] has come.
    fn tick_if_new_second(&mut self) {
        let now = unix_now();
        if now > self.ticked_at {
            self.ticked_at = now;
            self.engine.handle(Event::Tick { now });
        }
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::CopyDone {
                copies,
                result,
                durability,
            } => self.copy_done(copies, result, durability),
            Control::CommitIoDone => self.finish_commit(),
            Control::DeclareGone(client) => {
                tracing::info!(%client, "client declared gone");
                self.engine.handle(Event::ClientDeclaredGone { client });
            }
            Control::Status(reply) => {
                // On a store failure the engine has queued its Fatal; the caller sees the
                // reply dropped.
                if let Some(status) = self.engine.status() {
                    let _ = reply.send(status);
                }
            }
            Control::Shutdown | Control::Abandon => {}
        }
    }

    fn on_input(&mut self, i: Input) {
        match i {
            Input::Connected {
                conn,
                peer,
                outgoing,
                open_key,
                cancel,
            } => {
                tracing::info!(conn, %peer, "connection accepted");
                self.conns.insert(
                    conn,
                    ConnState {
                        peer,
                        outgoing,
                        open_key,
                        cancel,
                        client: None,
                    },
                );
                self.engine.handle(Event::ClientConnected {
                    conn,
                    server_nonce: auth::random_nonce(),
                });
            }
            Input::Frame { conn, frame } => {
                if self.conns.contains_key(&conn) {
                    self.engine.handle(Event::ClientRequest { conn, frame });
                }
            }
            Input::BadFrame { conn, error } => {
                if let Some(c) = self.conns.get(&conn) {
                    tracing::warn!(conn, peer = %c.peer, client = ?c.client, %error, "bad frame");
                    self.engine.handle(Event::ClientBadFrame { conn, error });
                }
            }
            Input::Disconnected { conn } => {
                if let Some(c) = self.conns.remove(&conn) {
                    tracing::info!(conn, peer = %c.peer, client = ?c.client, "connection closed by the client");
                    c.cancel.cancel();
                    self.engine.handle(Event::ClientDisconnected { conn });
                }
            }
        }
    }

    /// Drops a connection at once (no flush) and tells the engine it is gone.
    fn kill(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            c.cancel.cancel();
            self.pending.push_back(Event::ClientDisconnected { conn });
        }
    }

    /// A copy finished: a failure goes to the engine at once (it stops the server), and
    /// so does a copy back that flushed the origin itself; a copy to the store waits until
    /// a flush covers it or no commit is coming (see [`HeldCopies`]).
    fn copy_done(
        &mut self,
        copies: Vec<CopyId>,
        result: Result<(), Failure>,
        durability: CopyDurability,
    ) {
        self.copies_in_flight = self.copies_in_flight.saturating_sub(copies.len());
        match result {
            Err(e) => {
                tracing::error!(?copies, error = %crate::engine::error_chain(&e), "chunk copy failed");
                for copy in copies {
                    self.engine.handle(Event::CopyDone {
                        copy,
                        result: Err(e.clone()),
                    });
                }
            }
            Ok(()) => {
                tracing::trace!(?copies, ?durability, "copy written");
                for copy in copies {
                    if let Some((copy, result)) =
                        self.held_copies.finished(durability, (copy, Ok(())))
                    {
                        self.engine.handle(Event::CopyDone { copy, result });
                    }
                }
            }
        }
    }

    /// Hands the engine the held copies a flush has covered, or all of them with `all`.
    fn release_copies(&mut self, all: bool) {
        let released = if all {
            self.held_copies.release_all(&self.store_flushes)
        } else {
            self.held_copies.release_stable(&self.store_flushes)
        };
        if !released.is_empty() {
            tracing::trace!(copies = released.len(), all, "copies handed to the engine");
        }
        for (copy, result) in released {
            self.engine.handle(Event::CopyDone { copy, result });
        }
    }

    /// Starts the commit the engine asked for: its journal I/O runs on the blocking pool
    /// while this thread goes on handling requests and starting copies (whatever they
    /// change joins the next commit, so groups grow with load). The engine has at most one
    /// commit outstanding. A commit whose copies an earlier flush covered skips its own
    /// first flush.
    fn run_commits(&mut self) -> Result<(), ServerFailure> {
        while !self.commit_in_flight {
            self.release_copies(false);
            self.pump()?;
            if !self.commit_due {
                if self.held_copies.is_empty() {
                    break;
                }
                // No commit is coming to cover them: record them now, and flush first.
                self.release_copies(true);
                self.pump()?;
                if !self.commit_due {
                    break;
                }
            }
            self.check_lease()?;
            self.commit_due = false;
            let flush_data_first = self.held_copies.commit_must_flush_first();
            if let Some(io) = self.engine.begin_commit() {
                tracing::trace!(flush_data_first, "commit begun");
                self.commit_in_flight = true;
                let (done, lease) = (self.ctl_tx.clone(), self.lease.clone());
                self.rt.spawn_blocking(move || {
                    // After the lease ran out nothing may be committed (the next server
                    // may own the store): the I/O is dropped unrun, and the engine thread,
                    // which checks the lease before handling anything, stops without
                    // finishing it.
                    if !lease.expired() {
                        let started = Instant::now();
                        if flush_data_first {
                            io.run();
                        } else {
                            io.run_data_stable();
                        }
                        tracing::debug!(
                            elapsed_us = started.elapsed().as_micros() as u64,
                            flush_data_first,
                            "store commit"
                        );
                    }
                    let _ = done.send(Control::CommitIoDone);
                });
            }
            self.pump()?;
        }
        Ok(())
    }

    /// The commit's I/O has run: the engine releases what waited for it.
    fn finish_commit(&mut self) {
        if self.commit_in_flight {
            self.commit_in_flight = false;
            tracing::trace!("commit finished");
            self.engine.finish_commit();
        }
    }

    /// Carries out the engine's actions (and the events they cause) until none is left,
    /// except a commit, which `run_commits` runs after the batch of inputs.
    /// The copies from the origin asked for meanwhile start as runs when nothing is left.
    fn pump(&mut self) -> Result<(), ServerFailure> {
        loop {
            if let Some(action) = self.engine.poll_output() {
                self.execute(action)?;
            } else if let Some(event) = self.pending.pop_front() {
                self.engine.handle(event);
            } else {
                if let Some(run) = self.copy_runs.take() {
                    self.spawn_run(run);
                }
                return Ok(());
            }
        }
    }

    fn execute(&mut self, action: Action) -> Result<(), ServerFailure> {
        self.check_lease()?;
        match action {
            Action::Send { conn, frame } => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return Ok(());
                };
                match &frame.msg {
                    ServerMsg::Welcome { .. } => {
                        // Named in the shell's log lines from now on.
                        c.client = self.engine.client_of(conn);
                        tracing::info!(conn, peer = %c.peer, client = ?c.client, "client authenticated");
                    }
                    ServerMsg::Error { code, message } => {
                        tracing::debug!(conn, client = ?c.client, %code, %message, "error reply");
                    }
                    ServerMsg::OriginWriteOk { .. }
                        if self.first_origin_grant.load(Ordering::Relaxed) == 0 =>
                    {
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                            .unwrap_or(1)
                            .max(1);
                        self.first_origin_grant.store(now, Ordering::Relaxed);
                    }
                    _ => {}
                }
                match c.outgoing.try_send(Outgoing::Frame(frame)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(conn, peer = %c.peer, client = ?c.client, "client does not read its replies (send queue full); closing the connection");
                        self.kill(conn);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => self.kill(conn),
                }
                Ok(())
            }
            Action::SealFrames { conn, keys } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.open_key.send_replace(Some(keys.client_to_server));
                    if c.outgoing
                        .try_send(Outgoing::Seal(keys.server_to_client))
                        .is_err()
                    {
                        self.kill(conn);
                    }
                }
                Ok(())
            }
            Action::Close { conn } => {
                if let Some(c) = self.conns.remove(&conn) {
                    tracing::info!(conn, peer = %c.peer, client = ?c.client, "closing connection");
                    if c.outgoing.try_send(Outgoing::Close).is_err() {
                        c.cancel.cancel();
                    }
                }
                Ok(())
            }
            Action::Copy {
                copy,
                from,
                to,
                purpose,
            } => {
                match from {
                    // Gathered into a run with the copies next to it (see `copy_runs`).
                    CopySource::Origin { chunk } => {
                        if let Some(run) = self.copy_runs.push(copy, chunk, to) {
                            self.spawn_run(run);
                        }
                    }
                    CopySource::Store { .. } => self.spawn_copy(copy, from, to, purpose),
                }
                Ok(())
            }
            Action::CopyToOrigin { copy, from, chunk } => {
                tracing::debug!(
                    copy,
                    from_store_chunk = from,
                    chunk,
                    "copy back onto origin"
                );
                // Stable once it returns (it flushes the origin): never held for a
                // store flush.
                self.spawn_copy_work(vec![copy], true, move |data| {
                    data.copy_to_origin(from, chunk)
                });
                Ok(())
            }
            Action::Commit => {
                // Run once the inputs already queued are handled: one commit covers them all.
                self.commit_due = true;
                Ok(())
            }
            Action::Log {
                level,
                message,
                event: None,
            } => {
                match level {
                    LogLevel::Info => tracing::info!(target: "csnap_server::engine", "{message}"),
                    LogLevel::Warn => tracing::warn!(target: "csnap_server::engine", "{message}"),
                    LogLevel::Error => {
                        tracing::error!(target: "csnap_server::engine", "{message}")
                    }
                }
                Ok(())
            }
            Action::Log {
                level,
                message,
                event: Some(event),
            } => {
                log_key_event(level, &event, &message);
                Ok(())
            }
            Action::Fatal { error } => Err(error.into()),
        }
    }

    fn spawn_copy(&mut self, copy: CopyId, from: CopySource, to: u64, purpose: CopyPurpose) {
        match (from, purpose) {
            (CopySource::Origin { chunk }, _) => {
                tracing::trace!(copy, chunk, store_chunk = to, ?purpose, "copy from origin")
            }
            (CopySource::Store { store_chunk }, _) => {
                tracing::debug!(
                    copy,
                    from_store_chunk = store_chunk,
                    store_chunk = to,
                    ?purpose,
                    "copy within store"
                )
            }
        }
        self.spawn_copy_work(vec![copy], false, move |data| data.copy(from, to));
    }

    /// Runs copies from consecutive origin chunks to consecutive store chunks as one job.
    fn spawn_run(&mut self, run: CopyRun) {
        let CopyRun { chunk, to, copies } = run;
        let count = copies.len() as u64;
        tracing::trace!(
            ?copies,
            chunk,
            store_chunk = to,
            count,
            "copy run from origin"
        );
        self.spawn_copy_work(copies, false, move |data| {
            data.copy_origin_run(chunk, to, count)
        });
    }

    /// Runs the work of one copy or run of copies on the blocking pool (at most
    /// `max_copies` jobs at once) and reports it: `flushes_itself` when the work makes its
    /// writes stable, else with the store's flush stamp after its write returned.
    fn spawn_copy_work(
        &mut self,
        copies: Vec<CopyId>,
        flushes_itself: bool,
        work: impl FnOnce(&DataPath) -> Result<(), CopyError> + Send + 'static,
    ) {
        self.copies_in_flight += copies.len();
        let (data, slots, done, lease, flushes) = (
            self.data.clone(),
            self.copy_slots.clone(),
            self.ctl_tx.clone(),
            self.lease.clone(),
            self.store_flushes.clone(),
        );
        self.rt.spawn(async move {
            let result = match slots.acquire_owned().await {
                Ok(permit) => {
                    let work = tokio::task::spawn_blocking(move || {
                        let _slot = permit;
                        // A copy waiting for a slot must not write the store after the
                        // lease ran out (the next server may own those chunks by then).
                        if lease.expired() {
                            return Err(CopyError::LeaseExpired);
                        }
                        work(&data)
                    });
                    work.await.unwrap_or_else(|e| Err(CopyError::Worker(e)))
                }
                Err(_) => Err(CopyError::WorkersShutDown),
            };
            // Taken after the write returned: a flush numbered above it covers the copy.
            let durability = if flushes_itself {
                CopyDurability::Flushed
            } else {
                CopyDurability::StoreWritten {
                    stamp: flushes.stamp(),
                }
            };
            let result = result.map_err(Failure::new);
            let _ = done.send(Control::CopyDone {
                copies,
                result,
                durability,
            });
        });
    }

    fn fatal(mut self, reason: ServerFailure) -> Exit {
        if reason == ServerFailure::LeaseExpired {
            tracing::error!(
                volume = %self.volume,
                connections = self.conns.len(),
                copies_in_flight = self.copies_in_flight,
                "SERVING LEASE EXPIRED: the agent did not renew it in time; the server stops \
                 serving now (no grant, no reply from here on), closes every connection and \
                 leaves the store for recovery by the next server"
            );
        } else {
            tracing::error!(reason = %crate::engine::error_chain(&reason), "FATAL: the server stops serving now; the store is left for recovery by the next server");
        }
        let _ = self.fatal_tx.send(Some(reason.clone()));
        self.stop.cancel();
        self.conns.clear();
        Exit::Fatal(reason)
    }

    /// Clean shutdown: close every connection after its queued replies, let copies in
    /// flight land, then close the store (commit, checkpoint, mark clean).
    fn shutdown(mut self) -> Exit {
        tracing::info!(
            connections = self.conns.len(),
            copies_in_flight = self.copies_in_flight,
            "shutting down"
        );
        for (_, c) in self.conns.drain() {
            if c.outgoing.try_send(Outgoing::Close).is_err() {
                c.cancel.cancel();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.copies_in_flight > 0 || self.commit_in_flight || !self.held_copies.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let ctl = &mut self.ctl_rx;
            let next = self
                .rt
                .block_on(async { tokio::time::timeout(left, ctl.recv()).await });
            match next {
                Ok(Some(Control::CopyDone {
                    copies,
                    result,
                    durability,
                })) => {
                    self.copy_done(copies, result, durability);
                    if let Err(reason) = self.pump().and_then(|()| self.run_commits()) {
                        return self.fatal(reason);
                    }
                }
                Ok(Some(Control::CommitIoDone)) => {
                    self.finish_commit();
                    if let Err(reason) = self.pump().and_then(|()| self.run_commits()) {
                        return self.fatal(reason);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    tracing::warn!(
                        copies = self.copies_in_flight,
                        "copies still in flight at shutdown; their chunks stay free"
                    );
                    break;
                }
            }
        }
        if self.engine.has_failed() {
            return self.fatal(ServerFailure::FailedDuringShutdown);
        }
        if let Err(reason) = self.check_lease() {
            // Closing writes the store (commit, checkpoint, clean mark): too late for that.
            return self.fatal(reason);
        }
        let Driver { engine, stop, .. } = self;
        let mut store = engine.into_store();
        let free = store.stats().map(|s| s.free_chunks).unwrap_or(0);
        let result = store.close();
        match &result {
            Ok(()) => tracing::info!(free_chunks = free, "store closed cleanly"),
            Err(e) => {
                tracing::error!(error = %e, "closing the store failed; it will be recovered from its journal")
            }
        }
        stop.cancel();
        Exit::Shutdown(result)
    }
}

/// An engine key event, with its fields (journal `CSNAP_EVENT`, `MESSAGE_ID`,
/// `CSNAP_SNAPSHOT`, `CSNAP_SNAPSHOT_ID`, `CSNAP_AREA`, `CSNAP_USED_PERCENT`).
fn log_key_event(level: LogLevel, event: &LogEvent, message: &str) {
    let snapshot = event.snapshot.as_ref().map(|(_, name)| name.as_str());
    let snapshot_id = event.snapshot.as_ref().map(|(id, _)| id.0);
    let area = event.area.as_deref();
    macro_rules! emit {
        ($level:ident) => {
            crate::key_event!(
                $level,
                event.name,
                [
                    csnap_snapshot = snapshot,
                    csnap_snapshot_id = snapshot_id,
                    csnap_area = area,
                    csnap_used_percent = event.used_percent
                ],
                "{message}"
            )
        };
    }
    match level {
        LogLevel::Info => emit!(INFO),
        LogLevel::Warn => emit!(WARN),
        LogLevel::Error => emit!(ERROR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemDevice;

    const CS: u64 = 4096;

    /// A data path over memory devices: an origin of 10.5 chunks (the last one partial),
    /// filled with a byte pattern per chunk, and a 4 MiB store.
    fn data_path() -> (DataPath, MemDevice) {
        let origin_size = 10 * CS + CS / 2;
        let origin = MemDevice::new(origin_size);
        for c in 0..=origin_size / CS {
            let len = CS.min(origin_size - c * CS) as usize;
            origin.write_at(&vec![c as u8 + 1; len], c * CS).unwrap();
        }
        let store = MemDevice::new(4 << 20);
        let geometry = Geometry::plan(CS, origin_size, 4 << 20, "store").unwrap();
        let path = DataPath::new(Arc::new(origin), Arc::new(store.clone()), geometry);
        (path, store)
    }

    fn store_chunk(store: &MemDevice, chunk: u64) -> Vec<u8> {
        let mut buf = vec![0; CS as usize];
        store.read_at(&mut buf, chunk * CS).unwrap();
        buf
    }

    #[test]
    fn a_run_copies_what_its_chunks_copied_one_by_one_would() {
        let (path, store) = data_path();
        let to = path.geometry.data_start_chunk;
        // Chunks 6..11: the last is the origin's partial chunk.
        path.copy_origin_run(6, to, 5).unwrap();
        for i in 0..5 {
            path.copy(CopySource::Origin { chunk: 6 + i }, to + 10 + i)
                .unwrap();
            let run = store_chunk(&store, to + i);
            assert_eq!(run, store_chunk(&store, to + 10 + i), "chunk {}", 6 + i);
            assert_eq!(run[0], 7 + i as u8);
        }
        let last = store_chunk(&store, to + 4);
        assert!(last[..CS as usize / 2].iter().all(|&b| b == 11));
        assert!(
            last[CS as usize / 2..].iter().all(|&b| b == 0),
            "past the origin: zero"
        );
    }

    #[test]
    fn a_run_outside_the_origin_or_the_data_area_is_refused() {
        let (path, _) = data_path();
        let g = path.geometry;
        let to = g.data_start_chunk;
        assert!(matches!(
            path.copy_origin_run(9, to, 3),
            Err(CopyError::BeyondOrigin(11))
        ));
        assert!(matches!(
            path.copy_origin_run(11, to, 1),
            Err(CopyError::BeyondOrigin(11))
        ));
        assert!(matches!(
            path.copy_origin_run(0, to - 1, 2),
            Err(CopyError::DestinationOutsideData(_))
        ));
        let last = g.data_start_chunk + g.data_chunks - 1;
        assert!(matches!(
            path.copy_origin_run(0, last, 2),
            Err(CopyError::DestinationOutsideData(_))
        ));
        assert!(matches!(
            path.copy_origin_run(0, to, 0),
            Err(CopyError::DestinationOutsideData(_))
        ));
        assert!(matches!(
            path.copy_origin_run(u64::MAX, to, 2),
            Err(CopyError::BeyondOrigin(_))
        ));
    }
}
