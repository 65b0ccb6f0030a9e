//! What goes into the engine (events) and what comes out (actions), and its configuration.

use super::failure::{Failure, Fatal};
use csnap_proto::auth::{Nonce, SessionKeys};
use csnap_proto::{ClientFrame, ClientId, RequestId, ServerFrame};
use std::fmt;

/// A transport connection, numbered by the I/O shell (never reused while the engine runs).
pub type ConnId = u64;

/// Identifies one data copy the engine asked the shell to perform.
pub type CopyId = u64;

/// Inputs to [`Engine::handle`](super::Engine::handle).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A connection was accepted. `server_nonce` is fresh randomness for its authentication
    /// (passed in so the engine stays deterministic).
    ClientConnected {
        /// The shell's id for the connection (never reused).
        conn: ConnId,
        /// Fresh random bytes.
        server_nonce: Nonce,
    },
    /// A decoded frame arrived on a connection.
    ClientRequest {
        /// The connection.
        conn: ConnId,
        /// The request.
        frame: ClientFrame,
    },
    /// A frame on this connection could not be decoded (the shell's decode error, e.g.
    /// proto's `FrameError`); the engine answers with an error and closes the connection.
    ClientBadFrame {
        /// The connection.
        conn: ConnId,
        /// The decode error.
        error: Failure,
    },
    /// The connection closed.
    ClientDisconnected {
        /// The connection.
        conn: ConnId,
    },
    /// The agent knows this client is gone for good (its node left the group, or it did not
    /// come back): stop waiting for it and drop any read locks it left behind.
    ClientDeclaredGone {
        /// The client.
        client: ClientId,
    },
    /// A [`Action::Copy`] finished; `Ok` only once the destination is on stable storage.
    CopyDone {
        /// The copy's id from the action.
        copy: CopyId,
        /// How it went.
        result: Result<(), Failure>,
    },
    /// The shell ran `MetaStore::commit` after an [`Action::Commit`]; an error is the
    /// store's (`MetaError`), kept whole.
    CommitDone {
        /// How it went.
        result: Result<(), Failure>,
    },
    /// Time passes (unix seconds). Drives background reclaim and lock expiry.
    Tick {
        /// The shell's clock, whole seconds (monotonic from the Unix time at start).
        now: u64,
    },
}

/// Where a copy reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopySource {
    /// The origin device, at this origin chunk.
    Origin {
        /// The origin chunk.
        chunk: u64,
    },
    /// The store's data area, at this store chunk.
    Store {
        /// The store chunk (device chunk address).
        store_chunk: u64,
    },
}

/// Why a copy is made (for logs, metrics and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyPurpose {
    /// An origin chunk preserved for every snapshot that still shares it.
    CopyOut,
    /// A snapshot's chunk given its own exception before a snapshot write.
    Unshare {
        /// The snapshot the chunk is unshared for.
        snap: csnap_proto::SnapId,
    },
    /// An online rollback's copy back onto the origin ([`Action::CopyToOrigin`]).
    CopyBack,
}

/// How loud a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Normal operation.
    Info,
    /// Something an operator may want to look at.
    Warn,
    /// Something failed.
    Error,
}

/// A key event of the engine, with what it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEvent {
    /// Its stable name (`snapshot_created`, `snapshot_deleted`, `store_filling`,
    /// `store_full`, `server_gate_open`, `rollback_started`, `rollback_progress`,
    /// `rollback_done`).
    pub name: &'static str,
    /// The snapshot concerned (id, name).
    pub snapshot: Option<(csnap_proto::SnapId, String)>,
    /// The store area concerned (`data`, `metadata`).
    pub area: Option<String>,
    /// The area's usage in percent.
    pub used_percent: Option<u64>,
}

impl LogEvent {
    /// The event `name`, about nothing in particular yet.
    pub fn new(name: &'static str) -> LogEvent {
        LogEvent {
            name,
            snapshot: None,
            area: None,
            used_percent: None,
        }
    }
}

/// Outputs of the engine, for the I/O shell to carry out in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a frame on a connection.
    Send {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: ServerFrame,
    },
    /// Close a connection (after sending what was queued for it).
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// Frames on this connection are sealed from now on (the client proved the key): every
    /// frame sent after the ones already queued is sealed with `keys.server_to_client`, and
    /// every frame received after the client's first two (`Hello`, `AuthResponse`) must be
    /// sealed with `keys.client_to_server`.
    SealFrames {
        /// The connection.
        conn: ConnId,
        /// The connection's two frame keys.
        keys: SessionKeys,
    },
    /// Copy one chunk into store chunk `to`, then report [`Event::CopyDone`]. The copy need
    /// not be stable yet: every use of it waits for a commit, whose first step flushes the
    /// store device.
    Copy {
        /// Its id, for the `CopyDone`.
        copy: CopyId,
        /// What to copy.
        from: CopySource,
        /// The store chunk to copy to (device chunk address).
        to: u64,
        /// Why.
        purpose: CopyPurpose,
    },
    /// Copy store chunk `from` onto origin chunk `chunk` (an online rollback's copy back),
    /// make it stable (fdatasync of the origin), then report [`Event::CopyDone`].
    CopyToOrigin {
        /// Its id, for the `CopyDone`.
        copy: CopyId,
        /// The store chunk to copy from.
        from: u64,
        /// The origin chunk to copy to.
        chunk: u64,
    },
    /// Commit: [`Engine::begin_commit`](super::Engine::begin_commit), run the
    /// [`CommitIo`] it returns (blocking, on any thread), then
    /// [`Engine::finish_commit`](super::Engine::finish_commit), which reports
    /// [`Event::CommitDone`]; or [`Engine::run_commit`](super::Engine::run_commit) for all
    /// three inline. At most one is outstanding.
    Commit,
    /// Something for the log; `event` when it is a key event for operators (the shell logs
    /// it with `csnap_event` and its `MESSAGE_ID`, see `crate::logging::EVENTS`).
    Log {
        /// How loud.
        level: LogLevel,
        /// The line.
        message: String,
        /// The key event it reports, if any.
        event: Option<LogEvent>,
    },
    /// The store failed (I/O error, corruption), or a copy or commit did: the server must
    /// stop serving now so that another node can take over. The engine answers nothing
    /// more. The error keeps its cause (`source`) down to the OS error.
    Fatal {
        /// What failed, with its causes.
        error: Fatal,
    },
}

/// What to sacrifice when the store has no free chunk, or its metadata area no room for
/// the records a copy needs. Origin writes never fail because of the store under either
/// policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StoreFullPolicy {
    /// Any allocation that finds the store (data or metadata area) full invalidates the
    /// oldest live snapshot of the volume (for a snapshot write: the oldest other than the
    /// writer), whether or not it shares the chunk being copied, frees what it alone held,
    /// and retries; then the next oldest, until there is room (or, for an origin copy-out,
    /// no live snapshot needs the copy any more).
    #[default]
    InvalidateOldest,
    /// Snapshot writes that find the store full fail with `StoreFull` and sacrifice nothing;
    /// origin copy-outs invalidate the oldest live snapshots as above.
    FailSnapshotWritesOnly,
}

impl fmt::Display for StoreFullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreFullPolicy::InvalidateOldest => "invalidate-oldest",
            StoreFullPolicy::FailSnapshotWritesOnly => "fail-snapshot-writes-only",
        })
    }
}

impl std::str::FromStr for StoreFullPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "invalidate-oldest" => Ok(StoreFullPolicy::InvalidateOldest),
            "fail-snapshot-writes-only" => Ok(StoreFullPolicy::FailSnapshotWritesOnly),
            other => Err(format!(
                "unknown store-full policy {other:?} (expected invalidate-oldest or fail-snapshot-writes-only)"
            )),
        }
    }
}

/// Engine configuration.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The cluster key clients prove with HMAC.
    pub cluster_key: Vec<u8>,
    /// Whom to sacrifice when the store is full.
    pub store_full_policy: StoreFullPolicy,
    /// Activation gate: the snapshot clients of the previous server (from the agent's
    /// gather). No origin write is granted until each has reconnected and sent `ResendDone`
    /// or is declared gone.
    pub expected_snapshot_clients: Vec<ClientId>,
    /// Promise uniqueness to origin clients (`OriginWriteOk.unique`), enabling their cache.
    pub promise_unique: bool,
    /// Most chunks one request may name.
    pub max_request_chunks: u64,
    /// Exceptions examined per background reclaim step.
    pub reclaim_budget: usize,
    /// A connection that has not authenticated this many seconds (of `Tick` time) after
    /// it was accepted is closed: it holds a slot and proves nothing.
    pub auth_timeout_secs: u64,
    /// How long read locks of a disconnected snapshot client are kept for it to reconnect
    /// (seconds of `Tick` time) unless the agent declares it gone sooner.
    pub orphan_lock_grace_secs: u64,
    /// Unix time at start (for snapshot ctimes until the first `Tick`).
    pub start_time: u64,
    /// An origin client may write through its unique promises and grants only while it
    /// has heard from the server within this many seconds (it renews with `KeepAlive`).
    /// The server counts an origin client it has not heard from for this long, plus
    /// [`LEASE_MARGIN_SECS`], as certainly stopped writing: it closes the connection, and
    /// a snapshot announcement stops waiting for it only then.
    pub origin_lease_secs: u64,
    /// No snapshot is announced before this time (`Tick` seconds): a new server after a
    /// failover sets it to when the old server's clients' leases have certainly expired.
    pub hold_snapshots_until: u64,
    /// Warning levels (percent used) of the store's data area: crossing one upwards is
    /// logged once (WARN), shown in `Status` while usage is at or above it, and logged again
    /// only after usage fell `WARN_REARM_POINTS` below it. Default 80 and 90; a level of 0
    /// is ignored.
    pub data_warn_percents: Vec<u8>,
    /// The same for the metadata (node) area. Default 80 and 90.
    pub metadata_warn_percents: Vec<u8>,
    /// Origin chunks an online rollback's copy-back works on at once (copy-outs and
    /// copies back in flight; at least 1). Default 16.
    pub rollback_window: usize,
}

/// Added to a lease before the server counts on its expiry: clock rate differences and a
/// data write already submitted when the lease ran out.
pub const LEASE_MARGIN_SECS: u64 = 2;

/// A usage warning is re-armed (logged again at the next crossing) once usage fell this many
/// percentage points below its level (half the level for levels under 10%), so usage
/// hovering at a level does not flood the log.
pub const WARN_REARM_POINTS: u8 = 5;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            cluster_key: Vec::new(),
            store_full_policy: StoreFullPolicy::default(),
            expected_snapshot_clients: Vec::new(),
            promise_unique: true,
            max_request_chunks: 4096,
            reclaim_budget: 64,
            auth_timeout_secs: 10,
            orphan_lock_grace_secs: 60,
            start_time: 0,
            origin_lease_secs: 10,
            hold_snapshots_until: 0,
            data_warn_percents: vec![80, 90],
            metadata_warn_percents: vec![80, 90],
            rollback_window: 16,
        }
    }
}

/// A request that is answered later: who asked, under which id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Requester {
    pub conn: ConnId,
    pub id: RequestId,
}

/// The I/O of a commit begun by [`Engine::begin_commit`](super::Engine::begin_commit): it
/// owns what it writes, so it runs (blocking) on any thread while the engine goes on
/// handling events; the engine is told with
/// [`Engine::finish_commit`](super::Engine::finish_commit), which runs it itself if it was
/// dropped unrun.
pub struct CommitIo(Box<dyn FnOnce(bool) + Send>);

impl CommitIo {
    /// The I/O `run` does; its argument says whether to flush the data device first.
    pub fn new(run: impl FnOnce(bool) + Send + 'static) -> CommitIo {
        CommitIo(Box::new(run))
    }

    /// Runs the I/O (blocking): flushes the device first, so the copies the commit's
    /// records point at are stable before the records are.
    pub fn run(self) {
        (self.0)(true)
    }

    /// Runs the I/O without that first flush: only when every copy the commit's records
    /// point at is known to be stable already.
    pub fn run_data_stable(self) {
        (self.0)(false)
    }
}

impl fmt::Debug for CommitIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CommitIo")
    }
}
