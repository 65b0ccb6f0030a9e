//! The messages of the client <-> server protocol. See docs/wire-protocol.md for the flows.

use crate::auth::{Mac, Nonce};
use crate::types::{ChunkRange, DiffEnd, DiffPage, SnapId, SnapshotInfo};
// Defined beside the other identifiers (auth.rs uses them, and msg.rs uses auth.rs).
pub use crate::types::{ClientId, ClientKind};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Chosen by the client, echoed in the reply; lets a client pipeline requests.
pub type RequestId = u64;

/// Where a snapshot's chunk lives in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreAddr {
    /// Origin chunk number.
    pub chunk: u64,
    /// Chunk index on the store device (byte offset = store_chunk * chunk_size; data
    /// chunks follow the store's metadata area).
    pub store_chunk: u64,
}

/// How many low bits of a `CreateSnapshot` token the server keeps with the snapshot.
pub const CREATE_TOKEN_BITS: u32 = 40;

/// A fresh random `CreateSnapshot` token: non-zero in its low [`CREATE_TOKEN_BITS`] bits.
pub fn create_token() -> u64 {
    let mask = (1u64 << CREATE_TOKEN_BITS) - 1;
    (rand::random::<u64>() & mask).max(1)
}

/// Names a snapshot in client library calls (the wire names snapshots by id, except
/// `FindSnapshot`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapRef {
    /// By id.
    Id(SnapId),
    /// By name.
    Name(String),
}

/// A read lock a reconnecting snapshot client still holds (an origin read in flight).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLock {
    /// The snapshot the lock or lease is for.
    pub snap: SnapId,
    /// The origin chunks it covers.
    pub range: ChunkRange,
}

/// Client -> server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First message on a connection. `client` says who the connection is and what it is
    /// for (its kind). `incarnation`: random, drawn once by the client and sent on every
    /// reconnect, so the server tells a reconnect of a live connection (same incarnation:
    /// the old connection is dead and replaced) from a second client using the same id
    /// (refused with `DuplicateClient`). `resuming`: the client had a session with a
    /// previous server (failover) and will upload its locks and resend unanswered requests.
    Hello {
        /// The protocol version the client speaks ([`PROTOCOL_VERSION`]).
        protocol_version: u32,
        /// Who the connection is, and what it is for.
        client: ClientId,
        /// The client's node.
        node: u32,
        /// Random per client process, the same on every reconnect.
        incarnation: u64,
        /// Random per connection: the server's proof covers it.
        client_nonce: Nonce,
        /// The client had a session with a previous server.
        resuming: bool,
    },
    /// Answer to `Challenge`: HMAC proof of the cluster key.
    AuthResponse {
        /// HMAC of the handshake with the cluster key.
        proof: Mac,
    },
    /// Origin client: may I write these chunks?
    QueryWrite {
        /// The origin chunks to write.
        ranges: Vec<ChunkRange>,
    },
    /// Snapshot client: where do I read these chunks of `snap`?
    QuerySnapshotRead {
        /// The client's snapshot.
        snap: SnapId,
        /// The chunks to read.
        ranges: Vec<ChunkRange>,
    },
    /// Snapshot client: my origin reads of these chunks are done; release the read locks.
    FinishSnapshotRead {
        /// The client's snapshot.
        snap: SnapId,
        /// The chunks whose origin reads are done.
        ranges: Vec<ChunkRange>,
    },
    /// Snapshot client: where do I write these chunks of `snap`?
    SnapshotWrite {
        /// The client's snapshot.
        snap: SnapId,
        /// The chunks to write.
        ranges: Vec<ChunkRange>,
    },
    /// Snapshot client: my data writes to the addresses `SnapshotWrite` gave for these
    /// chunks are done; the server may reuse those store chunks once the snapshot is gone.
    FinishSnapshotWrite {
        /// The client's snapshot.
        snap: SnapId,
        /// The chunks whose writes are done.
        ranges: Vec<ChunkRange>,
    },
    /// Origin client: I dropped my unique-chunk cache for new snapshot `snap`, and no origin
    /// write granted before it is still in flight.
    NewSnapshotAck {
        /// The snapshot of the `NewSnapshot` notice (or the rollback's pin).
        snap: SnapId,
    },
    /// Any client: I am alive. An origin client renews its write lease with it (see
    /// `Welcome::origin_lease_secs`).
    KeepAlive,
    /// Snapshot client: my reads of the store addresses a `SnapshotReadOk` gave for these
    /// chunks are done. Origin client: the same for the store addresses an `OriginReadOk`
    /// naming `source: Some(snap)` gave. No answer. Until then the server does not reuse
    /// those store chunks (should the snapshot be deleted or invalidated meanwhile). Not
    /// resent after a reconnect: a lost connection's store reads are released by the
    /// server itself. A release naming a snapshot the session reads nothing of is ignored
    /// (and logged).
    ReleaseStoreReads {
        /// The client's snapshot, or the rollback source an `OriginReadOk` named.
        snap: SnapId,
        /// The chunks whose store reads are done.
        ranges: Vec<ChunkRange>,
    },
    /// Reconnecting snapshot client: the read locks (origin reads in flight) and write
    /// leases (snapshot writes in flight) it held on the old server.
    UploadLocks {
        /// Read locks: origin reads in flight.
        locks: Vec<HeldLock>,
        /// Write leases: snapshot writes in flight.
        leases: Vec<HeldLock>,
    },
    /// Reconnecting client: locks uploaded and every unanswered request resent.
    ResendDone,
    /// Admin: create a snapshot of the origin as it is now. `token`: chosen by the client
    /// ([`create_token`]) and kept with the snapshot, so that the same request resent
    /// after a lost connection (even to a new server) is answered with the snapshot it
    /// created instead of `NameTaken`. 0: no token. The server keeps the low
    /// [`CREATE_TOKEN_BITS`] bits.
    CreateSnapshot {
        /// The new snapshot's name ([`crate::validate_snapshot_name`] says which are valid).
        name: String,
        /// The resend token, 0 for none.
        token: u64,
    },
    /// Admin: delete a snapshot (space is reclaimed in the background). By id only: a
    /// name may be given to a newer snapshot by the time a resend arrives (look the name
    /// up first with `FindSnapshot`).
    DeleteSnapshot {
        /// The snapshot to delete.
        snap: SnapId,
    },
    /// Admin: the live or invalid snapshot with this name (`SnapshotFound`), or
    /// `NoSuchSnapshot`.
    FindSnapshot {
        /// The snapshot's name.
        name: String,
    },
    /// Admin: one page of the live and invalid snapshots, in id order: those with id above
    /// `after` (from the start if `None`), at most `limit` of them (the server may return
    /// fewer, never more than [`MAX_LIST_PAGE`], and keeps every reply under the frame limit).
    /// Since protocol version 2 (version 1 sent the whole list in one reply, which did not
    /// fit a frame with thousands of snapshots).
    ListSnapshots {
        /// List snapshots with ids above this one.
        after: Option<SnapId>,
        /// At most this many.
        limit: u32,
    },
    /// Admin: one page of the diff between two ends (`DiffPage`): the chunks at or after
    /// `start` that `from` and `to` read differently, from the exception records alone,
    /// walking about `budget` records (capped at [`MAX_DIFF_RECORDS`]; a chunk is never split
    /// across pages). Ask again with `start` = the page's `next` until it is `None`. Both
    /// ends must stay live meanwhile; a diff between two snapshots does not change while
    /// the origin is written. Since protocol version 6.
    Diff {
        /// The older end.
        from: DiffEnd,
        /// The newer end.
        to: DiffEnd,
        /// The first origin chunk of the page.
        start: u64,
        /// About how many exception records the page may walk.
        budget: u32,
    },
    /// Admin: server and store status.
    Status,
    /// Admin: roll the origin back to snapshot `snap`, online (`RollbackStarted`). The
    /// origin as it is before the rollback is kept as a new snapshot named `pin_name`
    /// (the rollback's progress marker, see docs/architecture.md "Online rollback"; it may
    /// be deleted once the rollback is done). Refused with `RollbackInProgress` while
    /// another runs. Since protocol version 7.
    Rollback {
        /// The snapshot to roll back to (the source).
        snap: SnapId,
        /// The name of the snapshot kept of the origin as it was.
        pin_name: String,
    },
    /// Origin client, while a rollback runs (`Welcome::rollback`, `RollbackStarting`):
    /// where do I read these chunks? Answered with `OriginReadOk`. Since protocol version 7.
    QueryOriginRead {
        /// The origin chunks to read.
        ranges: Vec<ChunkRange>,
    },
}

/// Server -> client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Answer to `Hello`: the server's nonce, and its proof of the cluster key.
    Challenge {
        /// Random per connection: the client's proof covers it.
        server_nonce: Nonce,
        /// HMAC of the handshake with the cluster key.
        proof: Mac,
    },
    /// Authentication succeeded; the session is open.
    Welcome {
        /// The protocol version the server speaks.
        protocol_version: u32,
        /// Bytes per chunk of the volume.
        chunk_size: u32,
        /// The origin's size in chunks.
        origin_chunks: u64,
        /// An origin client may write through promises and grants only until this many
        /// seconds after it sent the last request the server answered; it renews with
        /// `KeepAlive` (every third of it). The server counts it as stopped after this
        /// plus a margin without hearing from it.
        origin_lease_secs: u32,
        /// A rollback runs: an origin client asks (`QueryOriginRead`) before each origin
        /// read until `RollbackDone`. Since protocol version 7.
        #[serde(default)]
        rollback: bool,
    },
    /// Answer to `KeepAlive`.
    KeepAliveOk,
    /// The chunks may be written. `unique`: the server promises they stay unique (no copy-out
    /// needed) until it announces a new snapshot; the client may write them again without
    /// asking.
    OriginWriteOk {
        /// The chunks granted (all those asked for).
        ranges: Vec<ChunkRange>,
        /// The chunks stay unique until the next snapshot announcement.
        unique: bool,
    },
    /// Snapshot read answer: chunks in the store at `store`; chunks still shared with the
    /// origin in `origin_locked`, read-locked for this client until `FinishSnapshotRead`.
    SnapshotReadOk {
        /// Chunks to read from the store, and where.
        store: Vec<StoreAddr>,
        /// Chunks to read from the origin, read-locked.
        origin_locked: Vec<ChunkRange>,
    },
    /// The read locks named by `FinishSnapshotRead` are released.
    FinishSnapshotReadOk,
    /// Where to write each chunk of a snapshot write (previous contents already there).
    /// The client holds a write lease on them until `FinishSnapshotWrite`.
    SnapshotWriteOk {
        /// Where each chunk goes in the store.
        addrs: Vec<StoreAddr>,
    },
    /// The write leases named by `FinishSnapshotWrite` are released.
    FinishSnapshotWriteOk,
    /// Notice to origin clients: snapshot `snap` is being created. Drop every unique
    /// promise, wait for granted origin writes in flight, then send `NewSnapshotAck`.
    NewSnapshot {
        /// The snapshot being created.
        snap: SnapId,
    },
    /// Reconnect: the uploaded locks are held again.
    UploadLocksOk,
    /// Reconnect: the session is fully re-established.
    ResendDoneOk,
    /// Answer to `CreateSnapshot`: the snapshot is created and durable.
    SnapshotCreated {
        /// The new snapshot.
        info: SnapshotInfo,
    },
    /// Answer to `DeleteSnapshot`: it is deleted (its space is reclaimed in the background).
    SnapshotDeleted {
        /// The snapshot deleted.
        snap: SnapId,
    },
    /// Answer to `FindSnapshot`.
    SnapshotFound {
        /// The snapshot.
        info: SnapshotInfo,
    },
    /// One page of snapshots. `more`: later snapshots exist; ask again with `after` = the
    /// last id of this page. `usage_exact`: false while the server is still counting its
    /// exception tree after start; until then `chunks_held` counts only part of it.
    SnapshotList {
        /// The page's snapshots, by id.
        snapshots: Vec<SnapshotInfo>,
        /// Later snapshots exist.
        more: bool,
        /// The usage figures are complete.
        usage_exact: bool,
    },
    /// Answer to `Status`.
    Status(ServerStatus),
    /// Answer to `Diff`.
    DiffPage(DiffPage),
    /// Answer to `Rollback`: the rollback is under way (durably: a crash or failover resumes
    /// it); every origin client asks before reading, so the origin reads as `source` from
    /// now on while the copy-back runs in the background. `pin` is the snapshot of the
    /// origin as it was before.
    RollbackStarted {
        /// The snapshot the origin now reads as.
        source: SnapId,
        /// The snapshot of the origin as it was before.
        pin: SnapshotInfo,
    },
    /// Notice to origin clients: a rollback to `source` is starting. As for `NewSnapshot
    /// { snap: pin }` (drop every unique promise, wait for granted writes in flight), and
    /// also wait for origin reads in flight, then ask (`QueryOriginRead`) before every
    /// origin read until `RollbackDone`; then acknowledge with `NewSnapshotAck { snap: pin }`.
    RollbackStarting {
        /// The snapshot the origin is rolled back to.
        source: SnapId,
        /// The snapshot of the origin as it was before; acknowledge with its id.
        pin: SnapId,
    },
    /// Notice to origin clients: the rollback to `source` is finished; read the origin
    /// directly again.
    RollbackDone {
        /// The snapshot the origin was rolled back to.
        source: SnapId,
    },
    /// Answer to `QueryOriginRead`: the chunks in `store` still read as the rollback's
    /// source from these store chunks (unchanged while the rollback runs); every other
    /// chunk asked for is read from the origin. Each store address is held for the client
    /// (its store chunk is not reused, even if the source is deleted once the rollback
    /// ends) until it sends `ReleaseStoreReads { snap: source }` for the chunk on this
    /// session, or the session is gone.
    OriginReadOk {
        /// Chunks to read from the store, and where.
        store: Vec<StoreAddr>,
        /// The rollback's source, whose store chunks `store` names: the snapshot to name in
        /// the `ReleaseStoreReads` that follows the reads. `None` when no rollback runs (then
        /// `store` is empty), and from servers before this field, which hold nothing for
        /// origin reads: nothing to release then.
        #[serde(default)]
        source: Option<SnapId>,
    },
    /// The request failed; `message` says why, for humans.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// Why, for humans.
        message: String,
    },
}

/// What `Status` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    /// False while the activation gate still waits for snapshot clients.
    pub active: bool,
    /// Snapshot clients the gate still waits for.
    pub awaited_clients: Vec<ClientId>,
    /// Connections, authenticated or not.
    pub connected_clients: u32,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// The origin's size in chunks.
    pub origin_chunks: u64,
    /// Chunks in the store's data area.
    pub store_chunks: u64,
    /// Of those, free.
    pub free_chunks: u64,
    /// Live and invalid snapshots.
    pub snapshots: u32,
    /// Snapshots created but not yet acknowledged by every origin client.
    pub pending_snapshots: u32,
    /// Whom the store-full policy sacrifices (`--store-full-policy`).
    pub store_full_policy: String,
    /// Background reclaim still has work.
    pub reclaiming: bool,
    /// False while the server is still counting per-snapshot usage after start
    /// (`chunks_held` in snapshot lists is partial until then).
    pub usage_exact: bool,
    /// Node blocks of the store's metadata area (0 if the store does not say).
    #[serde(default)]
    pub metadata_blocks: u64,
    /// Free node blocks (some are kept back for deletes and reclaim).
    #[serde(default)]
    pub free_metadata_blocks: u64,
    /// Store areas used beyond a warning level: at most one per area, the highest level
    /// crossed. Empty when both are below every level.
    #[serde(default)]
    pub space_warnings: Vec<SpaceWarning>,
    /// How far background reclaim got (None when `reclaiming` is false or the store does
    /// not say). Absent from older servers.
    #[serde(default)]
    pub reclaim: Option<ReclaimStatus>,
    /// The online rollback in progress, if any. Absent from older servers. Boxed: it is
    /// rare, and the status is already the largest server message.
    #[serde(default)]
    pub rollback: Option<Box<RollbackStatus>>,
}

/// How far an online rollback's copy-back got: it walks the origin in chunk order, so
/// `position` of `origin_chunks` is the share done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackStatus {
    /// The snapshot the origin is rolled back to.
    pub source: SnapId,
    /// The snapshot of the origin as it was before the rollback.
    pub pin: SnapId,
    /// Origin chunks below it are rolled back.
    pub position: u64,
    /// The origin's size in chunks.
    pub origin_chunks: u64,
    /// Chunks copied back so far by this server (not counted across a restart).
    pub chunks_copied: u64,
    /// The name of `source`, for people reading the status (empty from older servers).
    #[serde(default)]
    pub source_name: String,
    /// The name of `pin` (empty from older servers).
    #[serde(default)]
    pub pin_name: String,
}

impl RollbackStatus {
    /// Share done, in percent (rounded down, at most 100).
    pub fn percent(&self) -> u8 {
        if self.origin_chunks == 0 {
            return 100;
        }
        (u128::from(self.position.min(self.origin_chunks)) * 100 / u128::from(self.origin_chunks))
            as u8
    }
}

/// How far the background reclaim pass over the exception tree got: it walks the tree in
/// origin-chunk order, so `position` of `origin_chunks` is the share visited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReclaimStatus {
    /// Deleted or invalidated snapshots whose space the pass gives back.
    pub snapshots: Vec<SnapId>,
    /// The origin chunk the pass goes on from (chunks below it are done).
    pub position: u64,
    /// Origin chunks in all (the end of the pass).
    pub origin_chunks: u64,
}

impl ReclaimStatus {
    /// Share of the pass done, in percent (rounded down, at most 100).
    pub fn percent(&self) -> u8 {
        if self.origin_chunks == 0 {
            return 100;
        }
        (u128::from(self.position.min(self.origin_chunks)) * 100 / u128::from(self.origin_chunks))
            as u8
    }
}

/// A store area of `ServerStatus::space_warnings`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StoreArea {
    /// The data area: copied-out and snapshot-written chunks.
    Data,
    /// The metadata (node) area: exception records and the snapshot table.
    Metadata,
}

impl std::fmt::Display for StoreArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreArea::Data => "data area",
            StoreArea::Metadata => "metadata area",
        })
    }
}

/// One area above a configured usage warning level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceWarning {
    /// The store area.
    pub area: StoreArea,
    /// The highest warning level (percent used) the area is at or above.
    pub level_percent: u8,
    /// How full the area is now (percent, rounded down).
    pub used_percent: u8,
}

/// Most exception records one `Diff` request walks. A page holds at most one range per
/// chunk walked (plus the chunk the budget ran out in), so it stays well under the frame
/// limit (a test checks the fullest page).
pub const MAX_DIFF_RECORDS: u32 = 16_000;

/// Most snapshots one `SnapshotList` page holds.
pub const MAX_LIST_PAGE: u32 = 1024;

/// Budget for the encoded snapshots of one page: half a frame, leaving room for the rest.
pub const LIST_PAGE_BYTES: usize = crate::frame::MAX_FRAME / 2;

/// An upper bound of the encoded size of one `SnapshotInfo` (MessagePack with field names:
/// the strings plus a fixed overhead for names, integers and tags).
pub fn encoded_size_bound(info: &SnapshotInfo) -> usize {
    const FIXED: usize = 128;
    let reason = match &info.state {
        crate::types::SnapshotState::Invalid { reason } => reason.len(),
        _ => 0,
    };
    FIXED + info.name.len() + reason
}

/// How many of `infos` (from the start) form one page: at most `limit` (capped at
/// [`MAX_LIST_PAGE`], at least 1) and within [`LIST_PAGE_BYTES`]. Always at least one
/// snapshot when any is given, so paging progresses.
pub fn page_len(infos: &[SnapshotInfo], limit: u32) -> usize {
    let max = limit.clamp(1, MAX_LIST_PAGE) as usize;
    let mut bytes = 0;
    let mut n = 0;
    for info in infos.iter().take(max) {
        bytes += encoded_size_bound(info);
        if n > 0 && bytes > LIST_PAGE_BYTES {
            break;
        }
        n += 1;
    }
    n
}

/// Machine-readable error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Malformed or unexpected request (wrong state, empty or wrapping ranges, ...).
    BadRequest,
    /// The client's protocol version is not supported.
    VersionMismatch,
    /// A request before authentication completed.
    NotAuthenticated,
    /// The HMAC proof did not verify.
    AuthFailed,
    /// The request does not fit the connection's kind (e.g. QueryWrite on a snapshot client).
    WrongClientKind,
    /// A chunk beyond the end of the origin.
    OutOfRange,
    /// No snapshot with that id or name (or it is deleted).
    NoSuchSnapshot,
    /// The snapshot was invalidated (store full); its contents are gone.
    SnapshotInvalid,
    /// Another snapshot has that name.
    NameTaken,
    /// The snapshot name is not valid (see [`crate::validate_snapshot_name`]).
    BadName,
    /// No space for a snapshot write (the store-full policy does not sacrifice snapshots
    /// for snapshot writes).
    StoreFull,
    /// Releasing a read lock or write lease the client does not hold.
    NotLocked,
    /// The request is too large (too many chunks).
    TooLarge,
    /// The server failed (store I/O error); it is stopping.
    Internal,
    /// Another live connection already uses this client id (and is not an earlier
    /// connection of the same client): two clients were given the same instance id.
    DuplicateClient,
    /// An online rollback is running and the request conflicts with it (a second rollback,
    /// deleting or writing its source or pin, creating a snapshot, a diff of the origin).
    RollbackInProgress,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One client -> server frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// The request's id: its reply carries it (unique per session).
    pub id: RequestId,
    /// The request.
    pub msg: ClientMsg,
}

/// One server -> client frame: a reply (`reply_to` = the request's id) or a notice
/// (`reply_to` = None, e.g. `NewSnapshot`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFrame {
    /// The request answered, `None` for a notice.
    pub reply_to: Option<RequestId>,
    /// The answer or notice.
    pub msg: ServerMsg,
}
