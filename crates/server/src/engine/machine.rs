//! The request engine: a deterministic state machine over a [`MetaStore`].
//!
//! Requests that cannot be answered at once become *work items*. A work item is always
//! re-evaluated from scratch against the current state (store contents, read locks, copies
//! in flight, commit progress) when something it waits for changes; evaluation is
//! idempotent, so waking a work item too often is harmless and waking it too rarely is the
//! only thing to avoid. That keeps the subtle cases (a snapshot created while a write waits
//! for a read lock, an invalidation while a copy is in flight) correct by construction.

use super::commits::Commits;
use super::copies::Copies;
use super::failure::{chain as error_chain, Failure, Fatal};
use super::gate::Gate;
use super::io::{
    Action, CommitIo, ConnId, EngineConfig, Event, LogEvent, LogLevel, Requester, LEASE_MARGIN_SECS,
};
use super::locks::Locks;
use super::meta_store::{MetaError, MetaStore, StoreStats};
use super::requests::{error, Reject};
use super::rollback::Rollback;
use super::sessions::{Session, Sessions};
use super::snapshots::Creations;
use super::space::SpaceWatch;
use super::waiters::Waiters;
use super::work::{Work, WorkId, WorkKind, Works};
use csnap_proto::auth::{self, Handshake};
use csnap_proto::{
    ChunkRange, ClientFrame, ClientId, ClientMsg, ErrorCode, RequestId, ServerFrame, ServerMsg,
    SnapId, PROTOCOL_VERSION,
};
use std::collections::VecDeque;

#[path = "copy_flow.rs"]
mod copy_flow;
#[path = "io_flow.rs"]
mod io_flow;
#[path = "rollback_flow.rs"]
mod rollback_flow;
#[path = "session_flow.rs"]
mod session_flow;
#[path = "snapshot_flow.rs"]
mod snapshot_flow;
#[path = "status.rs"]
mod status;

/// Insertions a copy leaves room for in the metadata area: a new snapshot's row. Copies
/// apply the store-full policy when their records would leave less, so that creating a
/// snapshot (which sacrifices nothing) is refused only when the policy has nothing left
/// to give up.
const ROW_HEADROOM_INSERTS: u64 = 1;
/// When the store-full policy runs for the metadata area, it frees room for this many more
/// insertions than it needs, so that it does not run again at the very next copy-out.
const POLICY_HEADROOM_INSERTS: u64 = 4;

/// Exception records the usage counter's seeding walk visits per request or tick after
/// start: about a millisecond of work, so requests queued behind it barely notice.
const USAGE_WALK_BUDGET: usize = 1024;
/// The same per tick (once a second, nobody waiting): a 1M-record tree is counted within
/// about a minute of start even when no requests come.
const USAGE_WALK_BUDGET_PER_TICK: usize = 16 * 1024;
/// Exception records a background reclaim visits per tick (once a second, nobody waiting
/// behind it), in steps of at least 1,024 as the store-full path takes them: an idle
/// server gives back a deleted snapshot's space at about 8,000 records a second rather
/// than one request budget (64) a second.
const RECLAIM_STEPS_PER_TICK: usize = 8;

/// The engine's clock is the whole second of the last `Tick` (the shell ticks about once a
/// second), so `last_heard` may be up to this much earlier than the moment the client sent
/// the request its lease counts from. Counted on top of the lease and its margin before an
/// origin client is taken as stopped: without it the server let go of a silent origin
/// client (and created a snapshot) up to two seconds before the client's lease plus margin
/// ran out (whole-system simulation seed 0x515700001606).
const CLOCK_SLACK_SECS: u64 = 2;

enum CopyStart {
    Started,
    /// No space until the next commit makes freed chunks reusable.
    AfterCommit,
    /// No space until write leases on deleted or invalidated snapshots are released (their
    /// chunks cannot be reclaimed while a client may still write there).
    AfterLeases,
    /// The store is full and the policy sacrifices nothing for this allocation.
    Full,
    /// After invalidations, no live snapshot needs the origin copy-out any more.
    NotNeeded,
}

enum Space {
    Retry,
    AfterCommit,
    AfterLeases,
    NoVictim,
}

/// Whom the store-full policy may sacrifice, oldest first.
#[derive(Clone, Copy)]
enum VictimRule {
    /// For an origin copy-out of this chunk: the oldest live snapshot of the volume
    /// (whether or not it shares the chunk), then the next, until there is room or no live
    /// snapshot needs the copy any more.
    CopyOut(u64),
    /// For a snapshot write: the oldest live snapshot other than the writer.
    OtherThan(SnapId),
    Nobody,
}

/// What the store-full policy makes room for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Area {
    /// A data chunk.
    Data,
    /// This many record insertions in the metadata area.
    Metadata { records: u64 },
}

/// The sans-IO request engine. Feed it [`Event`]s with [`Engine::handle`], carry out the
/// [`Action`]s it queues ([`Engine::poll_output`]), and tick it ([`Event::Tick`]) when
/// [`Engine::poll_timeout`] says (and before any other event once the second has changed,
/// so that what it stamps with its clock is current).
pub struct Engine<S: MetaStore> {
    cfg: EngineConfig,
    store: S,
    geometry: StoreStats,
    now: u64,
    actions: VecDeque<Action>,
    failed: bool,
    /// Reclaim has work left (a deletion or invalidation since it last finished).
    reclaiming: bool,

    sessions: Sessions,
    gate: Gate,
    locks: Locks,
    works: Works,
    waiters: Waiters,
    copies: Copies,
    commits: Commits,
    creations: Creations,
    space: SpaceWatch,
    /// The online rollback in progress (see `rollback.rs`).
    rollback: Option<Rollback>,
}

impl<S: MetaStore> Engine<S> {
    /// An engine over `store`. It serves no origin write until every client in
    /// `cfg.expected_snapshot_clients` has reconnected or been declared gone.
    pub fn new(mut store: S, cfg: EngineConfig) -> Result<Self, MetaError> {
        let geometry = store.stats()?;
        let mut engine = Engine {
            now: cfg.start_time,
            gate: Gate::new(&cfg.expected_snapshot_clients),
            cfg,
            store,
            geometry,
            actions: VecDeque::new(),
            failed: false,
            // A reclaim interrupted by a crash resumes from the start.
            reclaiming: true,
            sessions: Sessions::default(),
            locks: Locks::default(),
            works: Works::default(),
            waiters: Waiters::default(),
            copies: Copies::default(),
            commits: Commits::default(),
            creations: Creations::default(),
            space: SpaceWatch::default(),
            rollback: None,
        };
        engine.resume_rollback()?;
        // A resumed rollback goes on at once (not only at the first event).
        engine.drive_rollback()?;
        engine.maybe_commit();
        if engine.gate.is_open() {
            engine.log_event(
                LogLevel::Info,
                LogEvent::new("server_gate_open"),
                "server active: no snapshot clients to wait for",
            );
        } else {
            let list: Vec<String> = engine
                .gate
                .awaited()
                .iter()
                .map(|c| c.to_string())
                .collect();
            engine.log(
                LogLevel::Info,
                format!(
                    "activation gate: no origin writes until snapshot clients {} reconnect or are declared gone",
                    list.join(", ")
                ),
            );
        }
        Ok(engine)
    }

    /// The next action to carry out, in order.
    pub fn poll_output(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the engine next needs an [`Event::Tick`] (`Tick` seconds), if time alone will
    /// change anything: the authentication deadline of a connection, the silence deadline
    /// of an origin client, the lease end of a lost one, the grace time of orphaned locks,
    /// a snapshot announcement and reclaim held until `hold_snapshots_until`, and the next second while
    /// background work (reclaim, the usage count) is left. Any event may move it: ask again
    /// after each. A time at or before the last tick means "tick now".
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.failed {
            return None;
        }
        let silence = self.cfg.origin_lease_secs + LEASE_MARGIN_SECS + CLOCK_SLACK_SECS;
        // A snapshot announcement and reclaim (and what waits for it) are held until then.
        let held = self.now < self.cfg.hold_snapshots_until;
        let background = (self.reclaiming && !held) || !self.store.usage_exact();
        [
            self.sessions.next_auth_expiry(self.cfg.auth_timeout_secs),
            self.sessions.next_silence(silence),
            self.sessions.next_lost_origin_expiry(),
            self.locks
                .next_orphan_expiry(self.cfg.orphan_lock_grace_secs),
            held.then_some(self.cfg.hold_snapshots_until),
            background.then_some(self.now + 1),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The store, to read (tests, status).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Gives the store back (server shutdown, or a test simulating a crash).
    pub fn into_store(self) -> S {
        self.store
    }

    /// For the shell to run `commit` after [`Action::Commit`].
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Starts the commit asked for by [`Action::Commit`]. `Some(io)`: run it (blocking, on
    /// any thread; events may be handled meanwhile), then call [`Engine::finish_commit`].
    /// `None`: the store committed at once, and [`Event::CommitDone`] is handled already.
    pub fn begin_commit(&mut self) -> Option<CommitIo> {
        match self.store.begin_commit() {
            Ok(Some(io)) => Some(io),
            Ok(None) => {
                self.handle(Event::CommitDone { result: Ok(()) });
                None
            }
            Err(e) => {
                self.handle(Event::CommitDone {
                    result: Err(Failure::from(e)),
                });
                None
            }
        }
    }

    /// Completes the commit whose [`CommitIo`] ran (or waits for it) and feeds
    /// [`Event::CommitDone`].
    pub fn finish_commit(&mut self) {
        let result = self.store.finish_commit().map_err(Failure::from);
        self.handle(Event::CommitDone { result });
    }

    /// Convenience for shells that commit inline: begin, run and finish in one call.
    pub fn run_commit(&mut self) {
        if let Some(io) = self.begin_commit() {
            io.run();
            self.finish_commit();
        }
    }

    /// True once the activation gate is open.
    pub fn is_active(&self) -> bool {
        self.gate.is_open()
    }

    /// Snapshot clients the activation gate still waits for.
    pub fn awaited_clients(&self) -> Vec<ClientId> {
        self.gate.awaited()
    }

    /// The client authenticated on `conn` (`None` before it proved the key, or once the
    /// connection is gone): for the shell's log lines.
    pub fn client_of(&self, conn: ConnId) -> Option<ClientId> {
        self.sessions.session_of(conn).map(|(client, _)| client)
    }

    /// True after a fatal store error; the engine answers nothing more.
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// Read locks currently held on an origin chunk (by clients, orphans, or internal copies).
    pub fn read_locks(&self, chunk: u64) -> u32 {
        self.locks.read_locks(chunk)
    }

    /// Processes one event.
    pub fn handle(&mut self, event: Event) {
        if self.failed {
            if let Event::ClientRequest { conn, frame } = event {
                self.reply(
                    conn,
                    frame.id,
                    error(ErrorCode::Internal, "server stopped after a store failure"),
                );
            }
            return;
        }
        let is_request = matches!(event, Event::ClientRequest { .. } | Event::Tick { .. });
        // A tick has nobody waiting behind it: it may walk further.
        let is_tick = matches!(event, Event::Tick { .. });
        let usage_budget = if is_tick {
            USAGE_WALK_BUDGET_PER_TICK
        } else {
            USAGE_WALK_BUDGET
        };
        let (reclaim_steps, reclaim_budget) = if is_tick {
            (RECLAIM_STEPS_PER_TICK, self.cfg.reclaim_budget.max(1024))
        } else {
            (1, self.cfg.reclaim_budget)
        };
        let result = self.dispatch(event);
        if self.failed {
            return;
        }
        let result = result.and_then(|()| {
            if is_request {
                for _ in 0..reclaim_steps {
                    self.background_reclaim(reclaim_budget)?;
                }
                // Seeds the usage figures after start in bounded steps (a no-op once done).
                self.store.usage_step(usage_budget)?;
            }
            self.drive_rollback()?;
            self.check_space()
        });
        if let Err(e) = result {
            self.fail(Fatal::Store(e.into()));
            return;
        }
        self.maybe_commit();
    }

    fn dispatch(&mut self, event: Event) -> Result<(), MetaError> {
        match event {
            Event::ClientConnected { conn, server_nonce } => {
                self.sessions.accept(conn, server_nonce, self.now);
                Ok(())
            }
            Event::ClientRequest { conn, frame } => self.on_request(conn, frame),
            Event::ClientBadFrame { conn, error: why } => {
                if let Some(c) = self.sessions.get(conn) {
                    let who = match c.client {
                        Some(client) => format!("client {client} on node {}", c.node),
                        None => "unauthenticated".to_owned(),
                    };
                    self.log(
                        LogLevel::Warn,
                        format!("connection {conn} ({who}): bad frame: {why}"),
                    );
                    self.send(
                        conn,
                        None,
                        error(ErrorCode::BadRequest, format!("undecodable frame: {why}")),
                    );
                    self.close(conn)?;
                }
                Ok(())
            }
            Event::ClientDisconnected { conn } => self.drop_conn(conn),
            Event::ClientDeclaredGone { client } => self.on_client_gone(client),
            Event::CopyDone { copy, result } => self.on_copy_done(copy, result),
            Event::CommitDone { result } => self.on_commit_done(result),
            Event::Tick { now } => {
                let held = self.now < self.cfg.hold_snapshots_until;
                self.now = self.now.max(now);
                self.expire_unauthenticated()?;
                self.expire_orphans()?;
                self.expire_origin_leases()?;
                if held && self.now >= self.cfg.hold_snapshots_until {
                    // Reclaim may go on: what waited for it, too.
                    self.wake_lease_waiters()?;
                }
                Ok(())
            }
        }
    }

    // ---- output helpers ----

    fn log(&mut self, level: LogLevel, message: impl Into<String>) {
        self.actions.push_back(Action::Log {
            level,
            message: message.into(),
            event: None,
        });
    }

    /// A key event (see [`LogEvent`]).
    fn log_event(&mut self, level: LogLevel, event: LogEvent, message: impl Into<String>) {
        self.actions.push_back(Action::Log {
            level,
            message: message.into(),
            event: Some(event),
        });
    }

    fn send(&mut self, conn: ConnId, reply_to: Option<RequestId>, msg: ServerMsg) {
        self.actions.push_back(Action::Send {
            conn,
            frame: ServerFrame { reply_to, msg },
        });
    }

    fn reply(&mut self, conn: ConnId, id: RequestId, msg: ServerMsg) {
        if self.sessions.contains(conn) {
            self.send(conn, Some(id), msg);
        }
    }

    fn reject(&mut self, who: Requester, r: Reject) {
        self.reply(who.conn, who.id, error(r.0, r.1));
    }

    fn fail(&mut self, error: Fatal) {
        if self.failed {
            return;
        }
        self.failed = true;
        self.log(LogLevel::Error, error_chain(&error));
        self.actions.push_back(Action::Fatal { error });
    }

    // ---- commits ----

    fn maybe_commit(&mut self) {
        if self.commits.start() {
            self.actions.push_back(Action::Commit);
        }
    }

    fn on_commit_done(&mut self, result: Result<(), Failure>) -> Result<(), MetaError> {
        if !self.commits.in_flight() {
            self.log(
                LogLevel::Warn,
                "CommitDone without a commit in flight; ignored",
            );
            return Ok(());
        }
        if let Err(e) = result {
            self.fail(Fatal::Commit(e));
            return Ok(());
        }
        for (who, msg) in self.commits.done().unwrap_or_default() {
            self.reply(who.conn, who.id, msg);
        }
        self.finish_creations()?;
        self.rollback_committed()?;
        for w in self.waiters.take_commit() {
            self.evaluate(w)?;
        }
        Ok(())
    }

    fn wait_commit(&mut self, w: WorkId) {
        self.waiters.on_commit(w);
        self.commits.want();
    }

    fn wake_chunk(&mut self, chunk: u64) -> Result<(), MetaError> {
        for w in self.waiters.take_chunk(chunk) {
            self.evaluate(w)?;
        }
        Ok(())
    }

    // ---- connections and sessions ----

    fn on_request(&mut self, conn: ConnId, frame: ClientFrame) -> Result<(), MetaError> {
        let ClientFrame { id, msg } = frame;
        self.sessions.heard(conn, self.now);
        let Some(c) = self.sessions.get(conn) else {
            self.log(
                LogLevel::Warn,
                format!("request on unknown connection {conn}"),
            );
            return Ok(());
        };
        let (session, server_nonce) = (c.session.clone(), c.server_nonce);
        match (session, msg) {
            (
                Session::AwaitHello,
                ClientMsg::Hello {
                    protocol_version,
                    client,
                    node,
                    incarnation,
                    client_nonce,
                    resuming,
                },
            ) => {
                if protocol_version != u32::from(PROTOCOL_VERSION) {
                    self.reply(
                        conn,
                        id,
                        error(
                            ErrorCode::VersionMismatch,
                            format!(
                                "protocol version {protocol_version} not supported (server speaks {PROTOCOL_VERSION})"
                            ),
                        ),
                    );
                    return self.close(conn);
                }
                let handshake = Handshake {
                    protocol_version,
                    client,
                    node,
                    incarnation,
                    resuming,
                    client_nonce,
                    server_nonce,
                };
                let proof = auth::server_proof(&self.cfg.cluster_key, &handshake);
                if let Some(c) = self.sessions.get_mut(conn) {
                    c.session = Session::AwaitAuth(handshake);
                }
                self.log(
                    LogLevel::Info,
                    format!("connection {conn}: hello from client {client} on node {node} (incarnation {incarnation:#x}, resuming: {resuming})"),
                );
                self.reply(
                    conn,
                    id,
                    ServerMsg::Challenge {
                        server_nonce,
                        proof,
                    },
                );
                Ok(())
            }
            (Session::AwaitAuth(handshake), ClientMsg::AuthResponse { proof }) => {
                let Handshake {
                    client,
                    node,
                    incarnation,
                    resuming,
                    ..
                } = handshake;
                if !auth::verify_client_proof(&self.cfg.cluster_key, &handshake, &proof) {
                    self.log(
                        LogLevel::Warn,
                        format!("connection {conn}: client {client} failed authentication"),
                    );
                    self.reply(
                        conn,
                        id,
                        error(ErrorCode::AuthFailed, "cluster key proof did not verify"),
                    );
                    return self.close(conn);
                }
                // The client proved the key: every later frame is sealed, both ways (a refused
                // client gets its verdict in the clear, above).
                let keys = auth::session_keys(&self.cfg.cluster_key, &handshake);
                self.actions.push_back(Action::SealFrames { conn, keys });
                self.open_session(conn, id, client, node, incarnation, resuming)
            }
            (Session::Open, ClientMsg::Hello { .. } | ClientMsg::AuthResponse { .. }) => {
                self.reply(
                    conn,
                    id,
                    error(ErrorCode::BadRequest, "session already authenticated"),
                );
                Ok(())
            }
            (Session::Open, msg) => self.on_session_request(conn, id, msg),
            (_, _) => {
                self.reply(
                    conn,
                    id,
                    error(
                        ErrorCode::NotAuthenticated,
                        "send Hello and authenticate first",
                    ),
                );
                self.close(conn)
            }
        }
    }

    // ---- requests ----

    fn new_work(
        &mut self,
        who: Requester,
        kind: WorkKind,
        ranges: Vec<ChunkRange>,
    ) -> Result<(), Reject> {
        let chunks = self.request_chunks(&ranges)?;
        let w = self.works.add(Work {
            who,
            kind,
            ranges,
            chunks,
        });
        // A store failure inside is recorded as fatal; the request gets no answer then.
        if let Err(e) = self.evaluate(w) {
            self.fail(Fatal::Store(e.into()));
        }
        Ok(())
    }
}
