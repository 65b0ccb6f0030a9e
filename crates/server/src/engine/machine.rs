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
use super::meta_store::{MetaError, MetaStore, Refusal, StoreStats};
use super::requests::{error, Reject};
use super::rollback::Rollback;
use super::sessions::{Session, Sessions};
use super::snapshots::{Creations, RequestedSnapshot};
use super::space::SpaceWatch;
use super::waiters::Waiters;
use super::work::{Work, WorkId, WorkKind, Works};
use csnap_proto::auth::{self, Handshake};
use csnap_proto::{
    ChunkRange, ClientFrame, ClientId, ClientMsg, ErrorCode, RequestId, RollbackStatus,
    ServerFrame, ServerMsg, ServerStatus, SnapId, SnapRef, SnapshotInfo, PROTOCOL_VERSION,
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
    /// a snapshot announcement held until `hold_snapshots_until`, and the next second while
    /// background work (reclaim, the usage count) is left. Any event may move it: ask again
    /// after each. A time at or before the last tick means "tick now".
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.failed {
            return None;
        }
        let silence = self.cfg.origin_lease_secs + LEASE_MARGIN_SECS + CLOCK_SLACK_SECS;
        let background = self.reclaiming || !self.store.usage_exact();
        let held_announcement =
            self.creations.announced() && self.now < self.cfg.hold_snapshots_until;
        [
            self.sessions.next_auth_expiry(self.cfg.auth_timeout_secs),
            self.sessions.next_silence(silence),
            self.sessions.next_lost_origin_expiry(),
            self.locks
                .next_orphan_expiry(self.cfg.orphan_lock_grace_secs),
            held_announcement.then_some(self.cfg.hold_snapshots_until),
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
                self.now = self.now.max(now);
                self.expire_unauthenticated()?;
                self.expire_orphans()?;
                self.expire_origin_leases()
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

    // ---- copies and store-full handling ----

    /// Refuses a new snapshot (`more` counts it and those queued before it) whose row
    /// would take the snapshot table past its share of the
    /// metadata area: the store-full policy frees records by invalidating snapshots, never
    /// rows, so rows must not crowd out the records.
    fn too_many_snapshots(&mut self, more: u64) -> Result<Option<Reject>, MetaError> {
        Ok(self
            .store
            .metadata_space()?
            .filter(|m| m.snapshot_room < more)
            .map(|m| {
                Reject(
                    ErrorCode::StoreFull,
                    format!(
                        "too many snapshots for the store's metadata area ({} node blocks): delete snapshots (invalidated ones too) to create more",
                        m.blocks
                    ),
                )
            }))
    }

    /// Answers `StoreFull` to the writes of `snap` waiting for an unshare of `chunk` that
    /// found no room and had nothing to give up.
    fn refuse_snapshot_writes(&mut self, snap: SnapId, chunk: u64) {
        for w in self.waiters.waiting_on_chunk(chunk) {
            if self.works.kind(w) == Some(WorkKind::SnapshotWrite(snap)) {
                self.reject_work(
                    w,
                    Reject(
                        ErrorCode::StoreFull,
                        format!(
                            "snapshot store metadata area full: no room to write chunk {chunk} of snapshot {snap} (policy {})",
                            self.cfg.store_full_policy
                        ),
                    ),
                );
            }
        }
    }

    // ---- snapshots ----

    /// A snapshot creation request: checked, queued, announced when its turn comes.
    fn create_snapshot(&mut self, who: Requester, name: &str, token: u64) -> Result<(), Reject> {
        // The rollback's pin must stay the newest snapshot (see rollback.rs).
        if let Some(r) = self.rollback_conflict() {
            return Err(r);
        }
        self.request_creation(who, name, token, None)
    }

    /// A creation (of a snapshot, or of a rollback's pin) checked and queued.
    fn request_creation(
        &mut self,
        who: Requester,
        name: &str,
        token: u64,
        rollback_of: Option<SnapId>,
    ) -> Result<(), Reject> {
        if let Err(why) = csnap_proto::validate_snapshot_name(name) {
            return Err(Reject(
                ErrorCode::BadName,
                format!("invalid snapshot name {name:?}: {why}"),
            ));
        }
        match self.resent_create(who, name, token) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                self.fail(Fatal::Store(e.into()));
                return Ok(());
            }
        }
        let queued = self.creations.is_queued(name);
        let exists = match self.store.snapshot_by_name(name) {
            Ok(found) => found.is_some(),
            Err(e) => {
                self.fail(Fatal::Store(e.into()));
                return Ok(());
            }
        };
        if queued || exists {
            return Err(Reject(
                ErrorCode::NameTaken,
                format!("a snapshot named {name:?} already exists"),
            ));
        }
        let unborn = self.creations.unborn();
        match self.too_many_snapshots(unborn as u64 + 1) {
            Ok(None) => {}
            Ok(Some(r)) => return Err(r),
            Err(e) => {
                self.fail(Fatal::Store(e.into()));
                return Ok(());
            }
        }
        self.creations.request(RequestedSnapshot {
            who,
            name: name.to_owned(),
            token,
            rollback_of,
        });
        if let Err(e) = self.announce_next_snapshot() {
            self.fail(Fatal::Store(e.into()));
        }
        Ok(())
    }

    /// A `CreateSnapshot` whose token (non-zero) matches a creation already requested,
    /// under way or done: the same request resent after the client lost its connection
    /// (perhaps to another server). It is not a second creation: the resend takes over the
    /// answer of one still in progress, or is answered with the snapshot at once. True if
    /// it was such a resend.
    fn resent_create(&mut self, who: Requester, name: &str, token: u64) -> Result<bool, MetaError> {
        if token & super::meta_store::CREATE_TOKEN_MASK == 0 {
            return Ok(false);
        }
        if self.creations.resent_before_creation(name, token, who) {
            return Ok(true);
        }
        let Some(info) = self.store.snapshot_by_name(name)? else {
            return Ok(false);
        };
        if !self.store.created_with(info.id, token)? {
            return Ok(false);
        }
        self.log(
            LogLevel::Info,
            format!(
                "snapshot {} ({name:?}): creation request resent; answering it",
                info.id
            ),
        );
        // A pending one is answered once its creation is committed.
        if !self.creations.resent_pending(info.id, who) {
            self.reply(who.conn, who.id, ServerMsg::SnapshotCreated { info });
        }
        Ok(true)
    }

    /// Phase one (see [`Announcement`]): when no announcement is out, announce the next
    /// requested snapshot to every origin client and hold origin grants.
    fn announce_next_snapshot(&mut self) -> Result<(), MetaError> {
        let Some(request) = self.creations.next_to_announce() else {
            return Ok(());
        };
        let id = self.store.next_snapshot_id()?;
        let awaiting = self.sessions.open_origins();
        for &conn in &awaiting {
            let notice = match request.rollback_of {
                Some(source) => ServerMsg::RollbackStarting { source, pin: id },
                None => ServerMsg::NewSnapshot { snap: id },
            };
            self.send(conn, None, notice);
        }
        self.log(
            LogLevel::Info,
            format!(
                "announcing snapshot {id} ({:?}); origin writes wait for {} origin client(s) to acknowledge",
                request.name,
                awaiting.len()
            ),
        );
        self.creations.announce(request, id, awaiting);
        self.try_create_announced()
    }

    /// Phase two: once every origin client acknowledged (or went), nothing writes the
    /// origin; create the snapshot in the store now, release the held writes (they copy
    /// out for it), and make it visible once the creation is committed.
    fn try_create_announced(&mut self) -> Result<(), MetaError> {
        if self.sessions.origins_lost() || self.now < self.cfg.hold_snapshots_until {
            return Ok(());
        }
        let Some((request, id)) = self.creations.take_acknowledged() else {
            return Ok(());
        };
        if let Some(source) = request.rollback_of {
            if let Err(r) = self.rollback_source_usable(source)? {
                self.reject(request.who, r);
                for w in self.waiters.take_announcement() {
                    self.evaluate(w)?;
                }
                return self.announce_next_snapshot();
            }
        }
        match self
            .store
            .create_snapshot_with_token(&request.name, self.now, request.token)
        {
            Ok(info) => {
                if info.id != id {
                    // The acknowledgements were for the announcement, whatever its number.
                    self.log(
                        LogLevel::Warn,
                        format!("snapshot announced as {id} was created as {}", info.id),
                    );
                }
                let gen = self.commits.touch();
                if let Some(source) = request.rollback_of {
                    self.start_rollback(source, &info)?;
                }
                self.creations.created(info.id, request.who, gen);
                self.finish_creations()?;
            }
            Err(MetaError::Refused(Refusal::BadName { name, why })) => self.reject(
                request.who,
                Reject(
                    ErrorCode::BadName,
                    format!("invalid snapshot name {name:?}: {why}"),
                ),
            ),
            Err(MetaError::Refused(Refusal::NameTaken(name))) => self.reject(
                request.who,
                Reject(
                    ErrorCode::NameTaken,
                    format!("a snapshot named {name:?} already exists"),
                ),
            ),
            // Refused: nothing is sacrificed for a new snapshot (copies keep room for one
            // row, so this means the policy had nothing left to give up).
            Err(MetaError::Refused(Refusal::MetadataFull { .. })) => self.reject(
                request.who,
                Reject(
                    ErrorCode::StoreFull,
                    "snapshot store metadata area is full: delete snapshots to make room".into(),
                ),
            ),
            Err(e) => return Err(e),
        }
        for w in self.waiters.take_announcement() {
            self.evaluate(w)?;
        }
        self.announce_next_snapshot()
    }

    /// Makes the snapshots whose creation is committed visible, answering their requests.
    fn finish_creations(&mut self) -> Result<(), MetaError> {
        let commits = &self.commits;
        let ready = self
            .creations
            .take_committed(|gen| commits.is_committed(gen));
        for (snap, who) in ready {
            self.finish_creation(snap, who)?;
        }
        Ok(())
    }

    fn finish_creation(&mut self, snap: SnapId, who: Requester) -> Result<(), MetaError> {
        if let Some(r) = self.rollback.as_mut().filter(|r| r.pin == snap) {
            // Answered once every origin client asks before reading (`drive_rollback`).
            r.reply_to = Some(who);
            return Ok(());
        }
        match self.store.snapshot(snap)? {
            Some(info) => {
                self.log_event(
                    LogLevel::Info,
                    LogEvent {
                        snapshot: Some((info.id, info.name.clone())),
                        ..LogEvent::new("snapshot_created")
                    },
                    format!("snapshot {} ({:?}) is live", info.id, info.name),
                );
                self.reply(who.conn, who.id, ServerMsg::SnapshotCreated { info });
            }
            None => self.reject(
                who,
                Reject(
                    ErrorCode::NoSuchSnapshot,
                    format!("snapshot {snap} disappeared during creation"),
                ),
            ),
        }
        Ok(())
    }

    fn resolve(&mut self, snap: &SnapRef) -> Result<Option<SnapshotInfo>, MetaError> {
        let info = match snap {
            SnapRef::Id(id) => self.store.snapshot(*id)?,
            SnapRef::Name(name) => self.store.snapshot_by_name(name)?,
        };
        Ok(info.filter(|i| !self.creations.is_pending(i.id)))
    }

    fn delete_snapshot(&mut self, who: Requester, snap: SnapId) -> Result<(), Reject> {
        let result = (|| -> Result<Result<(), Reject>, MetaError> {
            if let Some(r) = self.rollback_uses(snap) {
                return Ok(Err(r));
            }
            let Some(info) = self.resolve(&SnapRef::Id(snap))? else {
                return Ok(Err(Reject(
                    ErrorCode::NoSuchSnapshot,
                    format!("no snapshot {snap}"),
                )));
            };
            self.store.delete_snapshot(info.id)?;
            let gen = self.commits.snapset_changed();
            self.reclaiming = true;
            self.log_event(
                LogLevel::Info,
                LogEvent {
                    snapshot: Some((info.id, info.name.clone())),
                    ..LogEvent::new("snapshot_deleted")
                },
                format!(
                    "snapshot {} ({:?}) deleted; reclaiming its space in the background",
                    info.id, info.name
                ),
            );
            self.commits
                .defer(gen, who, ServerMsg::SnapshotDeleted { snap: info.id });
            Ok(Ok(()))
        })();
        match result {
            Ok(r) => r,
            Err(e) => {
                self.fail(Fatal::Store(e.into()));
                Ok(())
            }
        }
    }

    fn visible_snapshots(&mut self) -> Result<Vec<SnapshotInfo>, MetaError> {
        let mut list = self.store.list_snapshots()?;
        list.retain(|s| !self.creations.is_pending(s.id));
        Ok(list)
    }

    /// The server's figures as `csnapctl status` shows them. `None` if the store could not
    /// be read: the engine has failed then (an [`Action::Fatal`] is queued), as it would
    /// on a client's `Status` request.
    pub fn status(&mut self) -> Option<ServerStatus> {
        if self.failed {
            return None;
        }
        match self.status_figures() {
            Ok(status) => Some(status),
            Err(e) => {
                self.fail(Fatal::Store(e.into()));
                None
            }
        }
    }

    fn status_figures(&mut self) -> Result<ServerStatus, MetaError> {
        let stats = self.store.stats()?;
        let metadata = self.store.metadata_space()?;
        let space_warnings = self.space_warnings()?;
        let snapshots = self.visible_snapshots()?.len() as u32;
        Ok(ServerStatus {
            active: self.gate.is_open(),
            awaited_clients: self.gate.awaited(),
            connected_clients: self.sessions.len() as u32,
            chunk_size: stats.chunk_size,
            origin_chunks: stats.origin_chunks,
            store_chunks: stats.store_chunks,
            free_chunks: stats.free_chunks,
            snapshots,
            pending_snapshots: self.creations.in_progress() as u32,
            store_full_policy: self.cfg.store_full_policy.to_string(),
            reclaiming: self.reclaiming,
            reclaim: if self.reclaiming {
                self.store
                    .reclaim_position()?
                    .map(|p| csnap_proto::ReclaimStatus {
                        snapshots: p.snapshots,
                        position: p.position,
                        origin_chunks: stats.origin_chunks,
                    })
            } else {
                None
            },
            usage_exact: self.store.usage_exact(),
            rollback: self.rollback.as_ref().map(|r| {
                Box::new(RollbackStatus {
                    source: r.source,
                    pin: r.pin,
                    position: r.cursor(),
                    origin_chunks: stats.origin_chunks,
                    chunks_copied: r.chunks_copied,
                })
            }),
            metadata_blocks: metadata.map_or(0, |m| m.blocks),
            free_metadata_blocks: metadata.map_or(0, |m| m.free_blocks),
            space_warnings,
        })
    }
}
