//! The I/O shell around one [`Session`]: a task that owns the socket, connects and
//! reconnects (with backoff) for as long as the handle lives, and routes answers back to the
//! callers. Many requests are in flight at once; each is answered through its own channel.
//!
//! Where it connects is a [`ServerTarget`]: a fixed address, or a watch the cluster agent
//! moves on failover. Each (re)connect attempt uses the current address; when it changes
//! the connection (or the attempt, or the backoff) in progress is dropped and the new
//! address tried at once, resuming the session as after any lost connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use csnap_proto::{
    decode_frame_with, encode_frame_with, ChunkRange, ClientId, ClientKind, ClientMsg, Decoded,
    ErrorCode, FrameOpener, FrameSealer, RequestId, ServerFrame, ServerMsg,
};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::cache::{OriginTracker, WriteGuard};
use super::session::{Output, Session, SessionInput};
use super::ClientError;
use csnap_proto::net::connect;
use csnap_proto::ListenAddr;

/// Where the metadata server is.
///
/// In cluster mode the server moves on failover: the agent publishes its address through
/// a [`watch`] (`None` while no server is known) and every connection follows it. A fixed
/// address is the simple case (standalone mode, `--connect-server`).
#[derive(Clone, Debug)]
pub enum ServerTarget {
    /// Always this address.
    Fixed(ListenAddr),
    /// Follow the address in the watch: each (re)connect attempt uses the current value;
    /// a change to another address drops the connection, attempt or backoff in progress
    /// and connects there at once. `None`: no server known: keep the connection while it
    /// lasts, then wait (no attempts) until an address is published.
    Follow(watch::Receiver<Option<ListenAddr>>),
}

impl From<ListenAddr> for ServerTarget {
    fn from(addr: ListenAddr) -> ServerTarget {
        ServerTarget::Fixed(addr)
    }
}

impl ServerTarget {
    /// The address a connection attempt would use now.
    pub fn current(&self) -> Option<ListenAddr> {
        match self {
            ServerTarget::Fixed(a) => Some(a.clone()),
            ServerTarget::Follow(rx) => rx.borrow().clone(),
        }
    }

    /// Both cases as a watch (a fixed address is a watch that never changes).
    fn watch(&self) -> watch::Receiver<Option<ListenAddr>> {
        match self {
            ServerTarget::Fixed(a) => watch::channel(Some(a.clone())).1,
            ServerTarget::Follow(rx) => rx.clone(),
        }
    }
}

/// Resolves when the target's value was replaced; never, once nobody can replace it.
async fn target_changed(target: &mut watch::Receiver<Option<ListenAddr>>) {
    if target.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How to reach and prove ourselves to the server.
#[derive(Clone, Debug)]
pub struct ConnConfig {
    /// Where the server is.
    pub server: ServerTarget,
    /// The cluster key the session proves itself with.
    pub key: Vec<u8>,
    /// This connection's identity (its kind says what it is for).
    pub client: ClientId,
    /// This node's id (in the Hello).
    pub node: u32,
    /// Random per client process, the same on every reconnect (see `ClientMsg::Hello`).
    pub incarnation: u64,
    /// First reconnect delay; doubles up to `retry_max`.
    pub retry_min: Duration,
    /// Longest reconnect delay.
    pub retry_max: Duration,
    /// A connection attempt (TCP connect) gives up after this long.
    pub connect_timeout: Duration,
}

/// What the server told us when the session opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// Bytes per chunk of the volume.
    pub chunk_size: u32,
    /// The origin's size in chunks.
    pub origin_chunks: u64,
    /// How many times a session was established (1 = first connection).
    pub sessions: u64,
}

/// The answer to a request. `grant` is set for `OriginWriteOk` on an origin connection:
/// hold it until the origin data write is done.
#[derive(Debug)]
pub struct Reply {
    /// The server's answer.
    pub msg: ServerMsg,
    /// For `OriginWriteOk` on an origin connection: the write may go ahead while this is held.
    pub grant: Option<WriteGuard>,
}

type Answer = oneshot::Sender<Result<Reply, ClientError>>;

enum Cmd {
    Request(ClientMsg, Answer),
    /// A message the server does not answer; dropped while disconnected.
    Notify(ClientMsg),
    /// Drop the connection (if any) and connect again at once, resuming.
    Reconnect,
    Shutdown,
}

/// A metadata connection to the server that survives server loss.
#[derive(Debug)]
pub struct MetaConnection {
    cmds: mpsc::UnboundedSender<Cmd>,
    info: watch::Receiver<Option<SessionInfo>>,
    refused: watch::Receiver<Option<String>>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
    kind: ClientKind,
}

impl MetaConnection {
    /// Starts the connection task. `tracker` is given for origin connections: grants and
    /// `NewSnapshot` notices go through it.
    pub fn start(cfg: ConnConfig, tracker: Option<Arc<OriginTracker>>) -> MetaConnection {
        let (cmds, rx) = mpsc::unbounded_channel();
        let (info_tx, info) = watch::channel(None);
        let (refused_tx, refused) = watch::channel(None);
        let kind = cfg.client.kind;
        let shell = Shell {
            session: Session::new(cfg.client, cfg.node, cfg.incarnation, cfg.key.clone()),
            tracker,
            waiting: HashMap::new(),
            sent_at: HashMap::new(),
            lease: None,
            info_tx,
            refused_tx,
            sessions: 0,
            sealer: None,
            opener: None,
            target: cfg.server.watch(),
            addr: None,
            cfg,
        };
        let task = tokio::spawn(shell.run(rx));
        MetaConnection {
            cmds,
            info,
            refused,
            task: std::sync::Mutex::new(Some(task)),
            kind,
        }
    }

    /// What this connection is for (origin, a snapshot, admin).
    pub fn kind(&self) -> ClientKind {
        self.kind
    }

    /// Waits until a session is open (or the server refused us), at most `timeout`.
    pub async fn wait_established(&self, timeout: Duration) -> Result<SessionInfo, ClientError> {
        let mut info = self.info.clone();
        let mut refused = self.refused.clone();
        let wait = async {
            loop {
                if let Some(i) = *info.borrow_and_update() {
                    return Ok(i);
                }
                if let Some(why) = refused.borrow_and_update().clone() {
                    return Err(ClientError::Refused(why));
                }
                tokio::select! {
                    r = info.changed() => if r.is_err() { return Err(ClientError::Closed) },
                    r = refused.changed() => if r.is_err() { return Err(ClientError::Closed) },
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Unreachable { waited: timeout })?
    }

    /// The session as last established, if ever.
    pub fn session_info(&self) -> Option<SessionInfo> {
        *self.info.borrow()
    }

    /// Sends a request and waits for its answer (across reconnects). A server error
    /// answer becomes [`ClientError::Server`].
    pub async fn request(&self, msg: ClientMsg) -> Result<Reply, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Request(msg, tx))
            .map_err(|_| ClientError::Closed)?;
        let reply = rx.await.map_err(|_| ClientError::Closed)??;
        match reply.msg {
            ServerMsg::Error { code, message } => Err(ClientError::Server { code, message }),
            _ => Ok(reply),
        }
    }

    /// Sends a message the server does not answer (`ReleaseStoreReads`). Dropped while
    /// disconnected: a server that lost this connection releases on its own.
    pub fn notify(&self, msg: ClientMsg) {
        let _ = self.cmds.send(Cmd::Notify(msg));
    }

    /// Drops the current connection, if any, and connects again at once (to the target's
    /// current address), resuming the session as after any lost connection: locks and
    /// write leases re-uploaded, unanswered requests resent, `ResendDone`. For the cluster
    /// agent's reset of a stale node (`DropClients`), when the address may not have
    /// changed. Waiting requests are not failed.
    pub fn reconnect(&self) {
        let _ = self.cmds.send(Cmd::Reconnect);
    }

    /// Stops the task; unanswered requests fail with [`ClientError::Closed`].
    pub async fn shutdown(&self) {
        let _ = self.cmds.send(Cmd::Shutdown);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for MetaConnection {
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Shutdown);
    }
}

/// Why a connection ended.
enum End {
    Lost(String),
    /// The target moved, or a reconnect was asked for: connect again without backoff.
    Again(String),
    Shutdown,
}

struct Shell {
    cfg: ConnConfig,
    session: Session,
    tracker: Option<Arc<OriginTracker>>,
    waiting: HashMap<RequestId, Answer>,
    /// When each unanswered request was handed to the session (a lease renewed by its
    /// answer runs from there, which is no later than the server heard it).
    sent_at: HashMap<RequestId, Instant>,
    /// The server's origin write lease, once a session told it.
    lease: Option<Duration>,
    info_tx: watch::Sender<Option<SessionInfo>>,
    refused_tx: watch::Sender<Option<String>>,
    sessions: u64,
    /// The current connection's frame sealing, once its handshake got that far.
    sealer: Option<FrameSealer>,
    opener: Option<FrameOpener>,
    /// Where the server is (`cfg.server` as a watch).
    target: watch::Receiver<Option<ListenAddr>>,
    /// The address of the connection (or attempt) in progress, for logs and moves.
    addr: Option<ListenAddr>,
}

fn chunks_of(ranges: &[ChunkRange]) -> impl Iterator<Item = u64> + '_ {
    ranges.iter().filter_map(|r| r.chunks()).flatten()
}

impl Shell {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let (ack_tx, mut acks) = mpsc::unbounded_channel::<ClientMsg>();
        let mut delay = self.cfg.retry_min;
        loop {
            if self.session.is_refused() {
                // Nothing will ever work again; answer requests with the refusal.
                match cmds.recv().await {
                    Some(Cmd::Request(msg, answer)) => {
                        let _refused = self.submit(msg, answer);
                        continue;
                    }
                    Some(Cmd::Notify(_) | Cmd::Reconnect) => continue,
                    Some(Cmd::Shutdown) | None => break,
                }
            }
            // Where to: the target's current address; none known: wait for one.
            let server = loop {
                if let Some(addr) = self.target.borrow_and_update().clone() {
                    break addr;
                }
                tokio::select! {
                    _ = target_changed(&mut self.target) => {}
                    cmd = cmds.recv() => if self.idle_cmd(cmd) {
                        return self.close_all();
                    },
                }
            };
            self.addr = Some(server.clone());
            let to = server.clone();
            let attempt =
                tokio::time::timeout(self.cfg.connect_timeout, async move { connect(&to).await });
            tokio::pin!(attempt);
            let stream = loop {
                tokio::select! {
                    r = &mut attempt => break match r {
                        Ok(Ok(s)) => Ok(s),
                        Ok(Err(e)) => {
                            tracing::debug!(server = ?server, err = %e, "cannot connect to the csnap server");
                            Err(End::Lost("connect failed".into()))
                        }
                        Err(_) => Err(End::Lost("connect timed out".into())),
                    },
                    _ = target_changed(&mut self.target) => {
                        if self.target.borrow().as_ref().is_some_and(|a| *a != server) {
                            // Moved while connecting: give up this attempt, try there.
                            break Err(End::Again("the server moved".into()));
                        }
                    }
                    cmd = cmds.recv() => match cmd {
                        Some(Cmd::Reconnect) => break Err(End::Again("reconnect asked".into())),
                        other => if self.idle_cmd(other) {
                            return self.close_all();
                        },
                    },
                }
            };
            let end = match stream {
                Ok(stream) => {
                    delay = self.cfg.retry_min;
                    self.serve(stream, &mut cmds, &ack_tx, &mut acks).await
                }
                Err(end) => end,
            };
            let again = match end {
                End::Shutdown => break,
                End::Lost(reason) => {
                    if self.session.is_open() {
                        tracing::warn!(server = ?self.addr, client = %self.cfg.client, %reason, "lost the csnap server; reconnecting");
                    }
                    false
                }
                End::Again(reason) => {
                    if self.session.is_open() {
                        tracing::info!(server = ?self.addr, to = ?*self.target.borrow(), client = %self.cfg.client, %reason, "leaving the csnap server; reconnecting");
                    }
                    true
                }
            };
            self.session.handle(SessionInput::Disconnected);
            if let Some(t) = &self.tracker {
                // Promises die with the session; and a write granted (or an origin read
                // started without asking) on the old connection must land before we talk
                // to a server that may create a snapshot or start a rollback meanwhile.
                // Until the next Welcome says whether a rollback runs, reads ask (they
                // wait for that session).
                let epoch = t.ask_before_reads();
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), t.direct_io_drained(epoch)).await;
            }
            if again {
                delay = self.cfg.retry_min;
                continue;
            }
            // Back off, still accepting requests (they are queued in the session); a new
            // address or a reconnect request ends the wait at once.
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            let moved = loop {
                tokio::select! {
                    _ = &mut sleep => break false,
                    _ = target_changed(&mut self.target) => {
                        if self.target.borrow().as_ref().is_some_and(|a| Some(a) != self.addr.as_ref()) {
                            break true;
                        }
                    }
                    cmd = cmds.recv() => match cmd {
                        Some(Cmd::Reconnect) => break true,
                        other => if self.idle_cmd(other) {
                            return self.close_all();
                        },
                    },
                }
            };
            delay = if moved {
                self.cfg.retry_min
            } else {
                (delay * 2).min(self.cfg.retry_max)
            };
        }
        self.close_all();
    }

    /// A command while not connected; true when the task must end.
    fn idle_cmd(&mut self, cmd: Option<Cmd>) -> bool {
        match cmd {
            Some(Cmd::Request(msg, answer)) => {
                // Not connected: queued in the session.
                let _queued = self.submit(msg, answer);
                false
            }
            // Not connected: the server releases on its own; and no connection to drop.
            Some(Cmd::Notify(_) | Cmd::Reconnect) => false,
            Some(Cmd::Shutdown) | None => true,
        }
    }

    fn close_all(&mut self) {
        for (_, answer) in self.waiting.drain() {
            let _ = answer.send(Err(ClientError::Closed));
        }
    }

    /// Registers a request; returns the frames to send now.
    fn submit(&mut self, msg: ClientMsg, answer: Answer) -> Vec<Output> {
        let id = self.session.next_request_id();
        self.session.handle(SessionInput::Submit(msg));
        let out = self.session.drain_outputs();
        self.waiting.insert(id, answer);
        self.sent_at.insert(id, Instant::now());
        let mut rest = Vec::new();
        for o in out {
            match o {
                Output::Reply { .. } => self.route(o),
                other => rest.push(other),
            }
        }
        rest
    }

    /// Delivers one non-Send output.
    fn route(&mut self, out: Output) {
        match out {
            Output::Reply { id, msg } => {
                let sent = self.sent_at.remove(&id);
                if let (Some(t), Some(lease), Some(sent)) = (&self.tracker, self.lease, sent) {
                    if matches!(
                        msg,
                        ServerMsg::OriginWriteOk { .. } | ServerMsg::KeepAliveOk
                    ) {
                        t.renew(sent + lease);
                    }
                }
                let grant = match (&msg, &self.tracker) {
                    (ServerMsg::OriginWriteOk { ranges, unique }, Some(t)) => {
                        Some(t.granted(chunks_of(ranges), *unique))
                    }
                    _ => None,
                };
                if let Some(answer) = self.waiting.remove(&id) {
                    let _ = answer.send(Ok(Reply { msg, grant }));
                }
            }
            Output::Established {
                chunk_size,
                origin_chunks,
                origin_lease_secs,
                rollback,
            } => {
                if let Some(t) = &self.tracker {
                    t.set_rollback(rollback);
                }
                self.sessions += 1;
                self.lease = Some(Duration::from_secs(u64::from(origin_lease_secs)));
                tracing::info!(server = ?self.addr, client = %self.cfg.client, sessions = self.sessions, "csnap session established");
                self.info_tx.send_replace(Some(SessionInfo {
                    chunk_size,
                    origin_chunks,
                    sessions: self.sessions,
                }));
            }
            Output::Refused { code, message } => {
                tracing::error!(server = ?self.addr, client = %self.cfg.client, %code, %message, "the csnap server refused this client");
                self.refused_tx
                    .send_replace(Some(format!("{code}: {message}")));
            }
            Output::Send(_) | Output::SealFrames(_) | Output::Notice(_) | Output::Drop { .. } => {}
        }
    }

    async fn serve(
        &mut self,
        stream: Box<dyn csnap_proto::net::Stream>,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        ack_tx: &mpsc::UnboundedSender<ClientMsg>,
        acks: &mut mpsc::UnboundedReceiver<ClientMsg>,
    ) -> End {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        (self.sealer, self.opener) = (None, None);
        self.session.handle(SessionInput::Connected {
            client_nonce: csnap_proto::auth::random_nonce(),
        });
        let first = self.session.drain_outputs();
        if let Err(e) = self.carry_out(first, &mut wr, ack_tx).await {
            return e;
        }
        // An origin client renews its write lease three times per lease.
        let mut keepalive = tokio::time::interval(Duration::from_secs(1));
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_keepalive = Instant::now();
        loop {
            tokio::select! {
                _ = keepalive.tick(), if self.tracker.is_some() => {
                    let due = self.lease.is_some_and(|l| last_keepalive.elapsed() >= l / 3);
                    if due && self.session.is_open() {
                        last_keepalive = Instant::now();
                        // Nobody waits for the answer; it renews the lease on its way.
                        let (answer, _) = oneshot::channel();
                        let out = self.submit(ClientMsg::KeepAlive, answer);
                        if let Err(e) = self.carry_out(out, &mut wr, ack_tx).await {
                            return e;
                        }
                    }
                }
                n = rd.read(&mut chunk) => {
                    let n = match n {
                        Ok(0) => return End::Lost("server closed the connection".into()),
                        Ok(n) => n,
                        Err(e) => return End::Lost(format!("read failed: {e}")),
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    loop {
                        match decode_frame_with::<ServerFrame>(&buf, self.opener.as_mut()) {
                            Ok(Decoded::Frame(frame, used)) => {
                                buf.drain(..used);
                                self.session.handle(SessionInput::Received(frame));
                                let out = self.session.drain_outputs();
                                if let Err(e) = self.carry_out(out, &mut wr, ack_tx).await {
                                    return e;
                                }
                            }
                            Ok(Decoded::Incomplete { .. }) => break,
                            Err(e) => return End::Lost(format!("bad frame from the server: {e}")),
                        }
                    }
                }
                _ = target_changed(&mut self.target) => {
                    let moved = self.target.borrow().as_ref().is_some_and(|a| Some(a) != self.addr.as_ref());
                    if moved {
                        // Failover elsewhere: this server is (or is about to be) stopped.
                        return End::Again("the server moved".into());
                    }
                }
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Reconnect) => return End::Again("reconnect asked".into()),
                    Some(Cmd::Request(msg, answer)) => {
                        let out = self.submit(msg, answer);
                        if let Err(e) = self.carry_out(out, &mut wr, ack_tx).await {
                            return e;
                        }
                    }
                    Some(Cmd::Notify(msg)) => {
                        self.session.handle(SessionInput::Notify(msg));
                        let out = self.session.drain_outputs();
                        if let Err(e) = self.carry_out(out, &mut wr, ack_tx).await {
                            return e;
                        }
                    }
                    Some(Cmd::Shutdown) | None => return End::Shutdown,
                },
                Some(ack) = acks.recv() => {
                    self.session.handle(SessionInput::Notify(ack));
                    let out = self.session.drain_outputs();
                    if let Err(e) = self.carry_out(out, &mut wr, ack_tx).await {
                        return e;
                    }
                }
            }
        }
    }

    async fn carry_out<W: AsyncWrite + Unpin>(
        &mut self,
        outputs: Vec<Output>,
        wr: &mut W,
        ack_tx: &mpsc::UnboundedSender<ClientMsg>,
    ) -> Result<(), End> {
        let mut bytes = Vec::new();
        for out in outputs {
            match out {
                Output::Send(frame) => {
                    if let Err(e) = encode_frame_with(&frame, self.sealer.as_mut(), &mut bytes) {
                        // Only an oversize request can fail to encode: fail that request.
                        self.session.handle(SessionInput::Abandon(frame.id));
                        if let Some(answer) = self.waiting.remove(&frame.id) {
                            let _ = answer.send(Ok(Reply {
                                msg: ServerMsg::Error {
                                    code: ErrorCode::TooLarge,
                                    message: e.to_string(),
                                },
                                grant: None,
                            }));
                        }
                    }
                }
                Output::Notice(ServerMsg::NewSnapshot { snap }) => {
                    let ack = ClientMsg::NewSnapshotAck { snap };
                    match &self.tracker {
                        Some(t) => {
                            let epoch = t.invalidate();
                            let (t, ack_tx) = (t.clone(), ack_tx.clone());
                            tokio::spawn(async move {
                                t.drained(epoch).await;
                                let _ = ack_tx.send(ack);
                            });
                        }
                        None => {
                            let _ = ack_tx.send(ack);
                        }
                    }
                }
                Output::SealFrames(keys) => {
                    self.sealer = Some(FrameSealer::new(&keys.client_to_server));
                    self.opener = Some(FrameOpener::new(&keys.server_to_client));
                }
                Output::Notice(ServerMsg::RollbackStarting { source, pin }) => {
                    // Reads ask from now on; the start is acknowledged once the writes
                    // granted and the reads started without asking before have landed.
                    let ack = ClientMsg::NewSnapshotAck { snap: pin };
                    if let Some(t) = &self.tracker {
                        tracing::info!(client = %self.cfg.client, %source, %pin, "online rollback starting: origin reads ask the server until it is done");
                        let epoch = t.ask_before_reads();
                        let (t, ack_tx) = (t.clone(), ack_tx.clone());
                        tokio::spawn(async move {
                            t.settled(epoch).await;
                            let _ = ack_tx.send(ack);
                        });
                    } else {
                        // No data path behind this connection: nothing to wait for.
                        let _ = ack_tx.send(ack);
                    }
                }
                Output::Notice(ServerMsg::RollbackDone { source }) => {
                    if let Some(t) = &self.tracker {
                        tracing::info!(client = %self.cfg.client, %source, "online rollback done: origin reads go to the origin again");
                        t.set_rollback(false);
                    }
                }
                Output::Notice(_) => {}
                Output::Drop { reason } => {
                    if !bytes.is_empty() {
                        let _ = wr.write_all(&bytes).await;
                    }
                    return Err(End::Lost(reason));
                }
                other => self.route(other),
            }
        }
        if !bytes.is_empty() {
            if let Err(e) = wr.write_all(&bytes).await {
                return Err(End::Lost(format!("write failed: {e}")));
            }
        }
        Ok(())
    }
}
