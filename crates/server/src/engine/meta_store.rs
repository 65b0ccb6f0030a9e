//! The store operations the request engine needs (`MetaStore`), and `MemStore`, an in-memory
//! reference implementation used by the engine's tests and as the model in property tests.
//!
//! The semantics of the store operations (the on-disk store implements the same; its format
//! is in docs/store-format.md); the points the engine relies on:
//!
//! * Exceptions. Each origin chunk has a list of exceptions `{first, last, store_chunk}`.
//!   A snapshot `s` is *covered* on chunk `c` if some exception of `c` has
//!   `first <= s <= last`. **Lookup rule:** `s` reads the *narrowest* covering exception
//!   (smallest `last - first`); ties go to the most recently recorded one. Under that rule an
//!   origin copy-out always records exactly one exception
//!   `{first: smallest uncovered live id, last: largest uncovered live id}`: any covered id
//!   strictly inside that run is covered by an exception lying strictly inside it (otherwise
//!   the run's ends would be covered too), which is therefore narrower and still wins.
//! * The *users* of an exception are the live snapshots for which it is the lookup result.
//!   An exception with no users is garbage, freed by `reclaim_step`.
//! * Reservation. `reserve_chunk` hands out a free store chunk for a copy in flight. A
//!   reservation is not made durable by `commit`: if the server crashes before
//!   `record_copy_out`/`record_snapshot_exception`, the chunk is free again after recovery.
//! * Deferred reuse. A chunk freed by `reclaim_step` must not be handed out by
//!   `reserve_chunk` before a `commit` has made the free durable: otherwise new data could
//!   overwrite a chunk that a crash would hand back to its old exception.
//! * Durability. Every `record_*`, `create_snapshot`, `delete_snapshot` and
//!   `invalidate_snapshot` is durable only after the next successful `commit`. The engine
//!   calls `commit` only once the data the new exceptions point at is on stable storage, and
//!   answers no request that depends on a change before that commit has returned.
//!
//! * Metadata space. A store with a bounded metadata area fails growing operations with
//!   `MetadataFull` before changing anything, and never fails the operations that free
//!   space (`delete_snapshot`, `invalidate_snapshot`, `reclaim_step`) for lack of it.
//!
//! Every method can fail with an I/O or corruption error: the engine treats any error other
//! than the documented ones (`Full`, `MetadataFull`, `NoSuchSnapshot`, ...) as fatal for the
//! server.

use csnap_proto::{
    validate_snapshot_name, ChunkRange, DiffEnd, DiffPage, SnapId, SnapshotInfo, SnapshotState,
    CREATE_TOKEN_BITS,
};
use std::collections::{BTreeMap, BTreeSet};

pub use super::rollback::RollbackRecord;

/// The part of a `CreateSnapshot` token a store keeps.
pub const CREATE_TOKEN_MASK: u64 = (1 << CREATE_TOKEN_BITS) - 1;

/// One exception: snapshots `first..=last` that have no narrower exception read this chunk
/// from `store_chunk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exception {
    /// The first snapshot it covers.
    pub first: SnapId,
    /// The last snapshot it covers.
    pub last: SnapId,
    /// Where the chunk's contents are (device chunk address).
    pub store_chunk: u64,
}

impl Exception {
    /// Whether it covers snapshot `id`.
    pub fn contains(&self, id: SnapId) -> bool {
        self.first <= id && id <= self.last
    }

    fn width(&self) -> u64 {
        self.last.0 - self.first.0
    }
}

/// Where a snapshot reads one chunk from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapChunk {
    /// No exception covers the snapshot: it still shares the origin's chunk.
    Origin,
    /// The snapshot's exception. `exclusive` is true if no other live snapshot uses it, so
    /// a snapshot write may go there in place.
    Store {
        /// Where (device chunk address).
        store_chunk: u64,
        /// No other live snapshot uses it.
        exclusive: bool,
    },
}

/// Progress of background space reclaim.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimProgress {
    /// Store chunks freed by this step.
    pub freed_chunks: u64,
    /// True when no reclaim work is left (until the next delete or invalidation).
    pub done: bool,
}

/// Where a background reclaim pass is, for `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReclaimPosition {
    /// The origin chunk the pass goes on from: the pass walks the exceptions in origin
    /// chunk order, so the chunks below it are done.
    pub position: u64,
    /// The snapshots (deleted or invalidated) whose space the pass gives back.
    pub snapshots: Vec<SnapId>,
}

/// Geometry and space figures for `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreStats {
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// The origin's size in chunks.
    pub origin_chunks: u64,
    /// Data chunks in the store (excluding metadata).
    pub store_chunks: u64,
    /// Of the data chunks, free.
    pub free_chunks: u64,
}

/// Figures of a store's metadata (node) area, for the store-full policy and warnings
/// (the on-disk store's `Store::metadata_space` gives them as they are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataSpace {
    /// Node blocks in the area.
    pub blocks: u64,
    /// Free node blocks (including those kept for freeing operations).
    pub free_blocks: u64,
    /// Record insertions that surely fit now: `record_copy_out` inserts one per run of
    /// snapshots it covers (normally one), `record_snapshot_exception` up to three,
    /// `create_snapshot` one. Beyond this they may fail with `MetadataFull`.
    pub insert_room: u64,
    /// Snapshots that may still be created before snapshot rows (deleted snapshots count
    /// until reclaim drops them) would take more than half the area: rows are not freed
    /// by invalidating snapshots, only by deleting them, so the engine keeps them from
    /// crowding out the records the store-full policy can free.
    pub snapshot_room: u64,
}

/// An operation a store refused, before it changed anything: the request, or the space
/// left, does not allow it. One definition for every store: the on-disk store's
/// `StoreError::Refused` and the engine's [`MetaError::Refused`] carry it as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
pub enum Refusal {
    /// No free store chunk: the engine applies its store-full policy.
    #[error("snapshot store is full: no free data chunk")]
    Full,
    /// No room for more metadata (exception records, snapshots). Operations that free
    /// space (delete, invalidate, reclaim) never return it. The engine applies its
    /// store-full policy, as for `Full`.
    #[error(
        "snapshot store metadata area is full (all of its {blocks} node blocks are in use or \
         kept for freeing operations)"
    )]
    MetadataFull { blocks: u64 },
    #[error("no snapshot with id {0}")]
    NoSuchSnapshot(SnapId),
    #[error("snapshot {0} is not live (invalidated)")]
    NotLive(SnapId),
    #[error("a snapshot named {0:?} already exists")]
    NameTaken(String),
    #[error("invalid snapshot name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("origin chunk {chunk} is beyond the end of the origin ({origin_chunks} chunks)")]
    ChunkOutOfRange { chunk: u64, origin_chunks: u64 },
    #[error("store chunk {0} is not reserved")]
    NotReserved(u64),
}

/// Why a [`MetaStore`] operation failed, as the engine sees it: a refusal, which the
/// engine answers, or a failure of the store itself, which is fatal for the server.
/// `store/adapter.rs` maps the on-disk store's `StoreError` into this.
#[derive(Debug, thiserror::Error)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
pub enum MetaError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Device I/O failed; the cause (for the on-disk store its `StoreError::Io`, which names
    /// the operation, device and offset) is kept as the source. Fatal for the server.
    #[error("store I/O failed: {0}")]
    Io(#[source] Cause),
    /// The store's metadata is damaged, or the store is unusable after an earlier failure;
    /// the store's own error is kept as the source. Fatal for the server.
    #[error("store metadata is corrupt: {0}")]
    Corrupt(#[source] Cause),
}

/// The store's own error behind a [`MetaError::Io`] or [`MetaError::Corrupt`], kept whole
/// (its message and its sources), whatever the store's error type is.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

impl From<std::io::Error> for MetaError {
    fn from(e: std::io::Error) -> Self {
        MetaError::Io(Box::new(e))
    }
}

/// The snapshot store's metadata operations, as the request engine uses them. Synchronous:
/// an implementation may do disk I/O in any method.
pub trait MetaStore {
    /// Geometry and free space.
    fn stats(&mut self) -> Result<StoreStats, MetaError>;

    /// Creates a live snapshot with the next id. Fails with `BadName` or `NameTaken`.
    /// From now on origin copy-outs preserve its view (even before the engine makes it
    /// visible to clients).
    fn create_snapshot(&mut self, name: &str, ctime: u64) -> Result<SnapshotInfo, MetaError>;

    /// `create_snapshot`, keeping the creator's request token (`CreateSnapshot.token`, the
    /// low `CREATE_TOKEN_BITS` bits; 0 = none) with the snapshot, durably with it, for
    /// [`MetaStore::created_with`]. A store that keeps no tokens ignores it (resent creates
    /// then get `NameTaken`).
    fn create_snapshot_with_token(
        &mut self,
        name: &str,
        ctime: u64,
        token: u64,
    ) -> Result<SnapshotInfo, MetaError> {
        let _ = token;
        self.create_snapshot(name, ctime)
    }

    /// Was snapshot `id` (any state but unknown) created with this non-zero token (compared
    /// in its low `CREATE_TOKEN_BITS` bits)?
    fn created_with(&mut self, id: SnapId, token: u64) -> Result<bool, MetaError> {
        let _ = (id, token);
        Ok(false)
    }

    /// The id the next `create_snapshot` will give (ids are never reused). The engine
    /// announces a snapshot under this id before it creates it.
    fn next_snapshot_id(&mut self) -> Result<SnapId, MetaError>;

    /// Marks a snapshot (live or invalid) Deleting: it leaves the list at once, its space is
    /// reclaimed by later `reclaim_step`s. `NoSuchSnapshot` if unknown or already deleting.
    fn delete_snapshot(&mut self, id: SnapId) -> Result<(), MetaError>;

    /// Marks a live snapshot Invalid with a reason (store-full policy). Its exceptions stop
    /// counting; what it alone used is reclaimed by later `reclaim_step`s.
    fn invalidate_snapshot(&mut self, id: SnapId, reason: &str) -> Result<(), MetaError>;

    /// Listed snapshots (Live and Invalid, not Deleting), in id order.
    fn list_snapshots(&mut self) -> Result<Vec<SnapshotInfo>, MetaError>;

    /// One snapshot by id; `None` if unknown or deleting.
    fn snapshot(&mut self, id: SnapId) -> Result<Option<SnapshotInfo>, MetaError>;

    /// One snapshot by name; `None` if unknown or deleting.
    fn snapshot_by_name(&mut self, name: &str) -> Result<Option<SnapshotInfo>, MetaError>;

    /// The oldest live snapshot that still reads origin chunk `chunk` from the origin, i.e.
    /// `None` iff the chunk is unique and an origin write needs no copy-out.
    fn oldest_sharing_origin(&mut self, chunk: u64) -> Result<Option<SnapId>, MetaError>;

    /// One page of the diff between two ends (`ClientMsg::Diff`): the chunks at or after
    /// `start` they read differently, from the exception records alone, walking about
    /// `budget` records (never splitting a chunk across pages). `NoSuchSnapshot` or
    /// `NotLive` if a snapshot end is not live; `ChunkOutOfRange` if `start` is past the
    /// volume.
    fn diff_page(
        &mut self,
        from: DiffEnd,
        to: DiffEnd,
        start: u64,
        budget: u32,
    ) -> Result<DiffPage, MetaError>;

    /// The oldest live snapshot other than `except`, if any (the store-full policy's
    /// victim).
    fn oldest_live(&mut self, except: Option<SnapId>) -> Result<Option<SnapId>, MetaError> {
        Ok(self
            .list_snapshots()?
            .into_iter()
            .find(|s| s.state == SnapshotState::Live && Some(s.id) != except)
            .map(|s| s.id))
    }

    /// The metadata area's figures, for stores whose metadata area is bounded (the default:
    /// `None`, metadata never runs out).
    fn metadata_space(&mut self) -> Result<Option<MetadataSpace>, MetaError> {
        Ok(None)
    }

    /// Reserves a free store chunk for a copy in flight (`Full` if none). Store chunk
    /// addresses are chunk indexes on the store device (data chunks follow the metadata).
    fn reserve_chunk(&mut self) -> Result<u64, MetaError>;

    /// Returns an unused reservation to the free pool.
    fn release_chunk(&mut self, store_chunk: u64) -> Result<(), MetaError>;

    /// Records that origin chunk `chunk` has been copied to the reserved `store_chunk`: one
    /// exception covering every live snapshot that still read it from the origin (computed
    /// now). Returns false, and releases the reservation, if no live snapshot needed it any
    /// more (e.g. they were deleted meanwhile).
    fn record_copy_out(&mut self, chunk: u64, store_chunk: u64) -> Result<bool, MetaError>;

    /// Where live snapshot `id` reads origin chunk `chunk` from. `NotLive` for an invalid
    /// snapshot, `NoSuchSnapshot` for an unknown or deleting one.
    fn snapshot_chunk(&mut self, id: SnapId, chunk: u64) -> Result<SnapChunk, MetaError>;

    /// Records an exception for exactly snapshot `id` on `chunk`, at the reserved
    /// `store_chunk` (which already holds the chunk's previous contents as `id` saw them):
    /// the unshare step of a snapshot write.
    fn record_snapshot_exception(
        &mut self,
        id: SnapId,
        chunk: u64,
        store_chunk: u64,
    ) -> Result<(), MetaError>;

    /// Does a bounded amount of background reclaim (about `budget` exceptions examined):
    /// frees exceptions no live snapshot uses. Never blocks for long. The freed chunks become
    /// reservable after the next `commit`.
    fn reclaim_step(&mut self, budget: usize) -> Result<ReclaimProgress, MetaError>;

    /// Where background reclaim is: `None` when it has no work (or the store does not
    /// say, the default).
    fn reclaim_position(&self) -> Result<Option<ReclaimPosition>, MetaError> {
        Ok(None)
    }

    /// Advances the background count of per-snapshot usage (`chunks_held`) by about
    /// `budget` exception records; true once the figures are exact. Stores that keep exact
    /// figures all along (the default) have nothing to do.
    fn usage_step(&mut self, budget: usize) -> Result<bool, MetaError> {
        let _ = budget;
        Ok(true)
    }

    /// Are the `chunks_held` figures exact yet (see `usage_step`)?
    fn usage_exact(&self) -> bool {
        true
    }

    /// Makes every recorded change durable (journal commit on stable storage).
    fn commit(&mut self) -> Result<(), MetaError>;

    /// Starts a commit of every change recorded so far whose I/O the caller runs, on any
    /// thread, before [`MetaStore::finish_commit`]; changes recorded meanwhile belong to
    /// the next commit. `None`: committed here already (the default: stores whose commit
    /// is cheap simply commit).
    fn begin_commit(&mut self) -> Result<Option<super::CommitIo>, MetaError> {
        self.commit().map(|()| None)
    }

    /// Completes the commit [`MetaStore::begin_commit`] started (waiting for its I/O if it
    /// has not run yet): its changes are durable when this returns `Ok`.
    fn finish_commit(&mut self) -> Result<(), MetaError> {
        Ok(())
    }

    /// Whether the store keeps a rollback record (an online rollback needs one). The
    /// default: no, and `rollback` is always `None`.
    fn keeps_rollback(&self) -> bool {
        false
    }

    /// The online rollback in progress, as of the last change (committed or not).
    fn rollback(&mut self) -> Result<Option<RollbackRecord>, MetaError> {
        Ok(None)
    }

    /// Starts, advances or (`None`) ends the online rollback; durable with the next
    /// `commit`, like every other change. Only called when `keeps_rollback`.
    fn set_rollback(&mut self, record: Option<RollbackRecord>) -> Result<(), MetaError> {
        let _ = record;
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct SnapRecord {
    name: String,
    ctime: u64,
    state: SnapshotState,
    /// The creator's token (low `CREATE_TOKEN_BITS` bits), 0 = none.
    token: u64,
}

#[derive(Clone, Debug, Default)]
struct MemState {
    next_id: u64,
    snapshots: BTreeMap<SnapId, SnapRecord>,
    /// Per origin chunk, exceptions in record order (later = wins ties).
    exceptions: BTreeMap<u64, Vec<Exception>>,
    free: BTreeSet<u64>,
    reserved: BTreeSet<u64>,
    /// Freed by reclaim since the last commit: reusable only after it.
    freed_uncommitted: BTreeSet<u64>,
    /// Next origin chunk a running reclaim pass examines.
    reclaim_cursor: Option<u64>,
    /// A delete/invalidate happened that the running pass (if any) may have missed.
    reclaim_requested: bool,
    rollback: Option<RollbackRecord>,
}

/// In-memory `MetaStore`: the reference implementation. Simple rather than fast (lookups
/// scan a chunk's exceptions and the snapshot table). `commit` keeps a copy of the state so
/// `crash` can model a server crash: everything since the last commit is lost and
/// reservations are freed.
#[derive(Clone, Debug)]
pub struct MemStore {
    chunk_size: u32,
    origin_chunks: u64,
    store_chunks: u64,
    state: MemState,
    committed: MemState,
    commits: u64,
}

impl MemStore {
    /// A fresh store for an origin of `origin_chunks` chunks with `store_chunks` data chunks.
    pub fn new(chunk_size: u32, origin_chunks: u64, store_chunks: u64) -> Self {
        let state = MemState {
            next_id: 1,
            free: (0..store_chunks).collect(),
            ..MemState::default()
        };
        MemStore {
            chunk_size,
            origin_chunks,
            store_chunks,
            committed: state.clone(),
            state,
            commits: 0,
        }
    }

    /// Number of successful commits so far.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Simulates a crash and recovery: back to the last committed state, reservations freed.
    pub fn crash(&mut self) {
        self.state = self.committed.clone();
        let reserved = std::mem::take(&mut self.state.reserved);
        self.state.free.extend(reserved);
    }

    /// Every snapshot's state, deleting ones included (for tests).
    pub fn states(&self) -> Vec<(SnapId, SnapshotState)> {
        self.state
            .snapshots
            .iter()
            .map(|(id, r)| (*id, r.state.clone()))
            .collect()
    }

    /// All exceptions of a chunk, in record order (for tests and checks).
    pub fn exceptions(&self, chunk: u64) -> Vec<Exception> {
        self.state
            .exceptions
            .get(&chunk)
            .cloned()
            .unwrap_or_default()
    }

    /// Checks internal consistency: every store chunk is exactly one of free, reserved or
    /// named by one exception; no exception is empty. Returns a description of the first
    /// problem found.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        for (chunk, list) in &self.state.exceptions {
            for e in list {
                if e.first > e.last {
                    return Err(format!("chunk {chunk}: empty exception {e:?}"));
                }
                if e.store_chunk >= self.store_chunks {
                    return Err(format!("chunk {chunk}: {e:?} beyond the store"));
                }
                if !seen.insert(e.store_chunk) {
                    return Err(format!("store chunk {} named twice", e.store_chunk));
                }
            }
        }
        for c in self
            .state
            .free
            .iter()
            .chain(&self.state.reserved)
            .chain(&self.state.freed_uncommitted)
        {
            if !seen.insert(*c) {
                return Err(format!("store chunk {c} both used and free/reserved"));
            }
        }
        if seen.len() as u64 != self.store_chunks {
            return Err(format!(
                "{} of {} store chunks accounted for",
                seen.len(),
                self.store_chunks
            ));
        }
        Ok(())
    }

    fn check_chunk(&self, chunk: u64) -> Result<(), MetaError> {
        if chunk >= self.origin_chunks {
            return Err(MetaError::Refused(Refusal::ChunkOutOfRange {
                chunk,
                origin_chunks: self.origin_chunks,
            }));
        }
        Ok(())
    }

    fn is_live(&self, id: SnapId) -> bool {
        matches!(
            self.state.snapshots.get(&id).map(|r| &r.state),
            Some(SnapshotState::Live)
        )
    }

    /// Index (in `list`) of the exception snapshot `id` reads, per the lookup rule.
    fn lookup(list: &[Exception], id: SnapId) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, e) in list.iter().enumerate() {
            if e.contains(id) && best.is_none_or(|b| e.width() <= list[b].width()) {
                best = Some(i);
            }
        }
        best
    }

    /// Live snapshots using exception `index` of `list`.
    fn users(&self, list: &[Exception], index: usize) -> Vec<SnapId> {
        let e = list[index];
        self.state
            .snapshots
            .range(e.first..=e.last)
            .filter(|(id, r)| {
                r.state == SnapshotState::Live && Self::lookup(list, **id) == Some(index)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    fn uncovered_live(&self, chunk: u64) -> Vec<SnapId> {
        let list = self
            .state
            .exceptions
            .get(&chunk)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        self.state
            .snapshots
            .iter()
            .filter(|(id, r)| {
                r.state == SnapshotState::Live && !list.iter().any(|e| e.contains(**id))
            })
            .map(|(id, _)| *id)
            .collect()
    }

    fn chunks_held(&self, id: SnapId) -> u64 {
        self.state
            .exceptions
            .values()
            .filter(|list| Self::lookup(list, id).is_some())
            .count() as u64
    }

    fn info(&self, id: SnapId, r: &SnapRecord) -> SnapshotInfo {
        SnapshotInfo {
            id,
            name: r.name.clone(),
            ctime: r.ctime,
            state: r.state.clone(),
            chunks_held: self.chunks_held(id),
        }
    }

    fn take_reservation(&mut self, store_chunk: u64) -> Result<(), MetaError> {
        if self.state.reserved.remove(&store_chunk) {
            Ok(())
        } else {
            Err(MetaError::Refused(Refusal::NotReserved(store_chunk)))
        }
    }
}

impl MetaStore for MemStore {
    fn stats(&mut self) -> Result<StoreStats, MetaError> {
        Ok(StoreStats {
            chunk_size: self.chunk_size,
            origin_chunks: self.origin_chunks,
            store_chunks: self.store_chunks,
            free_chunks: self.state.free.len() as u64,
        })
    }

    fn next_snapshot_id(&mut self) -> Result<SnapId, MetaError> {
        Ok(SnapId(self.state.next_id))
    }

    fn create_snapshot(&mut self, name: &str, ctime: u64) -> Result<SnapshotInfo, MetaError> {
        self.create_snapshot_with_token(name, ctime, 0)
    }

    fn create_snapshot_with_token(
        &mut self,
        name: &str,
        ctime: u64,
        token: u64,
    ) -> Result<SnapshotInfo, MetaError> {
        validate_snapshot_name(name).map_err(|why| {
            MetaError::Refused(Refusal::BadName {
                name: name.to_owned(),
                why,
            })
        })?;
        if self.snapshot_by_name(name)?.is_some() {
            return Err(MetaError::Refused(Refusal::NameTaken(name.to_owned())));
        }
        let id = SnapId(self.state.next_id);
        self.state.next_id += 1;
        let record = SnapRecord {
            name: name.to_owned(),
            ctime,
            state: SnapshotState::Live,
            token: token & CREATE_TOKEN_MASK,
        };
        let info = self.info(id, &record);
        self.state.snapshots.insert(id, record);
        Ok(info)
    }

    fn created_with(&mut self, id: SnapId, token: u64) -> Result<bool, MetaError> {
        let token = token & CREATE_TOKEN_MASK;
        Ok(token != 0
            && self
                .state
                .snapshots
                .get(&id)
                .is_some_and(|r| r.token == token))
    }

    fn delete_snapshot(&mut self, id: SnapId) -> Result<(), MetaError> {
        match self.state.snapshots.get_mut(&id) {
            Some(r) if r.state != SnapshotState::Deleting => {
                r.state = SnapshotState::Deleting;
                self.state.reclaim_requested = true;
                Ok(())
            }
            _ => Err(MetaError::Refused(Refusal::NoSuchSnapshot(id))),
        }
    }

    fn invalidate_snapshot(&mut self, id: SnapId, reason: &str) -> Result<(), MetaError> {
        match self.state.snapshots.get_mut(&id) {
            Some(r) if r.state == SnapshotState::Live => {
                r.state = SnapshotState::Invalid {
                    reason: reason.to_owned(),
                };
                self.state.reclaim_requested = true;
                Ok(())
            }
            Some(r) if r.state != SnapshotState::Deleting => {
                Err(MetaError::Refused(Refusal::NotLive(id)))
            }
            _ => Err(MetaError::Refused(Refusal::NoSuchSnapshot(id))),
        }
    }

    fn list_snapshots(&mut self) -> Result<Vec<SnapshotInfo>, MetaError> {
        Ok(self
            .state
            .snapshots
            .iter()
            .filter(|(_, r)| r.state != SnapshotState::Deleting)
            .map(|(id, r)| self.info(*id, r))
            .collect())
    }

    fn snapshot(&mut self, id: SnapId) -> Result<Option<SnapshotInfo>, MetaError> {
        Ok(self
            .state
            .snapshots
            .get(&id)
            .filter(|r| r.state != SnapshotState::Deleting)
            .map(|r| self.info(id, r)))
    }

    fn snapshot_by_name(&mut self, name: &str) -> Result<Option<SnapshotInfo>, MetaError> {
        Ok(self
            .state
            .snapshots
            .iter()
            .find(|(_, r)| r.state != SnapshotState::Deleting && r.name == name)
            .map(|(id, r)| self.info(*id, r)))
    }

    fn diff_page(
        &mut self,
        from: DiffEnd,
        to: DiffEnd,
        start: u64,
        budget: u32,
    ) -> Result<DiffPage, MetaError> {
        for end in [from, to] {
            if let DiffEnd::Snapshot(id) = end {
                match self.state.snapshots.get(&id).map(|r| &r.state) {
                    None | Some(SnapshotState::Deleting) => {
                        return Err(MetaError::Refused(Refusal::NoSuchSnapshot(id)))
                    }
                    Some(SnapshotState::Invalid { .. }) => {
                        return Err(MetaError::Refused(Refusal::NotLive(id)))
                    }
                    Some(SnapshotState::Live) => {}
                }
            }
        }
        if start > self.origin_chunks {
            return Err(MetaError::Refused(Refusal::ChunkOutOfRange {
                chunk: start,
                origin_chunks: self.origin_chunks,
            }));
        }
        let mut page = DiffPage::default();
        if from == to {
            return Ok(page);
        }
        let source = |list: &[Exception], end: DiffEnd| match end {
            DiffEnd::Origin => None,
            DiffEnd::Snapshot(id) => Self::lookup(list, id).map(|i| list[i].store_chunk),
        };
        let mut differing = Vec::new();
        for (&chunk, list) in self.state.exceptions.range(start..) {
            if page.records_walked >= u64::from(budget.max(1)) {
                page.next = Some(chunk);
                break;
            }
            page.records_walked += list.len() as u64;
            if source(list, from) != source(list, to) {
                differing.push(chunk);
            }
        }
        page.ranges = ChunkRange::coalesce(differing);
        Ok(page)
    }

    fn oldest_sharing_origin(&mut self, chunk: u64) -> Result<Option<SnapId>, MetaError> {
        self.check_chunk(chunk)?;
        Ok(self.uncovered_live(chunk).first().copied())
    }

    fn reserve_chunk(&mut self) -> Result<u64, MetaError> {
        let chunk = self
            .state
            .free
            .pop_first()
            .ok_or(MetaError::Refused(Refusal::Full))?;
        self.state.reserved.insert(chunk);
        Ok(chunk)
    }

    fn release_chunk(&mut self, store_chunk: u64) -> Result<(), MetaError> {
        self.take_reservation(store_chunk)?;
        self.state.free.insert(store_chunk);
        Ok(())
    }

    fn record_copy_out(&mut self, chunk: u64, store_chunk: u64) -> Result<bool, MetaError> {
        self.check_chunk(chunk)?;
        self.take_reservation(store_chunk)?;
        let uncovered = self.uncovered_live(chunk);
        let (Some(first), Some(last)) = (uncovered.first(), uncovered.last()) else {
            self.state.free.insert(store_chunk);
            return Ok(false);
        };
        self.state
            .exceptions
            .entry(chunk)
            .or_default()
            .push(Exception {
                first: *first,
                last: *last,
                store_chunk,
            });
        Ok(true)
    }

    fn snapshot_chunk(&mut self, id: SnapId, chunk: u64) -> Result<SnapChunk, MetaError> {
        self.check_chunk(chunk)?;
        match self.state.snapshots.get(&id).map(|r| &r.state) {
            Some(SnapshotState::Live) => {}
            Some(SnapshotState::Invalid { .. }) => {
                return Err(MetaError::Refused(Refusal::NotLive(id)))
            }
            _ => return Err(MetaError::Refused(Refusal::NoSuchSnapshot(id))),
        }
        let list = self
            .state
            .exceptions
            .get(&chunk)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        Ok(match Self::lookup(list, id) {
            None => SnapChunk::Origin,
            Some(i) => SnapChunk::Store {
                store_chunk: list[i].store_chunk,
                exclusive: self.users(list, i) == [id],
            },
        })
    }

    fn record_snapshot_exception(
        &mut self,
        id: SnapId,
        chunk: u64,
        store_chunk: u64,
    ) -> Result<(), MetaError> {
        self.check_chunk(chunk)?;
        if !self.is_live(id) {
            return match self.state.snapshots.get(&id) {
                Some(r) if r.state != SnapshotState::Deleting => {
                    Err(MetaError::Refused(Refusal::NotLive(id)))
                }
                _ => Err(MetaError::Refused(Refusal::NoSuchSnapshot(id))),
            };
        }
        self.take_reservation(store_chunk)?;
        self.state
            .exceptions
            .entry(chunk)
            .or_default()
            .push(Exception {
                first: id,
                last: id,
                store_chunk,
            });
        // The exception `id` used before may now be unused; let reclaim find it.
        self.state.reclaim_requested = true;
        Ok(())
    }

    fn reclaim_step(&mut self, budget: usize) -> Result<ReclaimProgress, MetaError> {
        let mut progress = ReclaimProgress::default();
        if self.state.reclaim_cursor.is_none() {
            if !self.state.reclaim_requested {
                progress.done = true;
                return Ok(progress);
            }
            self.state.reclaim_requested = false;
            self.state.reclaim_cursor = Some(0);
        }
        let start = self.state.reclaim_cursor.unwrap_or(0);
        let chunks: Vec<u64> = self
            .state
            .exceptions
            .range(start..)
            .map(|(c, _)| *c)
            .take(budget.max(1) + 1)
            .collect();
        let examine = chunks.len().min(budget.max(1));
        for &chunk in &chunks[..examine] {
            let list = self
                .state
                .exceptions
                .get(&chunk)
                .cloned()
                .unwrap_or_default();
            let keep: Vec<Exception> = (0..list.len())
                .filter(|&i| !self.users(&list, i).is_empty())
                .map(|i| list[i])
                .collect();
            for e in list.iter().filter(|e| !keep.contains(e)) {
                self.state.freed_uncommitted.insert(e.store_chunk);
                progress.freed_chunks += 1;
            }
            if keep.is_empty() {
                self.state.exceptions.remove(&chunk);
            } else {
                self.state.exceptions.insert(chunk, keep);
            }
        }
        self.state.reclaim_cursor = chunks.get(examine).copied();
        progress.done = self.state.reclaim_cursor.is_none() && !self.state.reclaim_requested;
        Ok(progress)
    }

    fn reclaim_position(&self) -> Result<Option<ReclaimPosition>, MetaError> {
        if self.state.reclaim_cursor.is_none() && !self.state.reclaim_requested {
            return Ok(None);
        }
        Ok(Some(ReclaimPosition {
            position: self.state.reclaim_cursor.unwrap_or(0),
            snapshots: self
                .state
                .snapshots
                .iter()
                .filter(|(_, r)| r.state == SnapshotState::Deleting)
                .map(|(id, _)| *id)
                .collect(),
        }))
    }

    fn keeps_rollback(&self) -> bool {
        true
    }

    fn rollback(&mut self) -> Result<Option<RollbackRecord>, MetaError> {
        Ok(self.state.rollback)
    }

    fn set_rollback(&mut self, record: Option<RollbackRecord>) -> Result<(), MetaError> {
        self.state.rollback = record;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), MetaError> {
        let freed = std::mem::take(&mut self.state.freed_uncommitted);
        self.state.free.extend(freed);
        self.committed = self.state.clone();
        self.commits += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> MemStore {
        MemStore::new(4096, 100, 50)
    }

    fn copy_out(s: &mut MemStore, chunk: u64) -> Option<u64> {
        s.oldest_sharing_origin(chunk).unwrap()?;
        let x = s.reserve_chunk().unwrap();
        assert!(s.record_copy_out(chunk, x).unwrap());
        Some(x)
    }

    #[test]
    fn one_copy_out_covers_every_sharing_snapshot() {
        let mut s = store();
        let a = s.create_snapshot("a", 1).unwrap().id;
        let b = s.create_snapshot("b", 2).unwrap().id;
        assert_eq!(s.oldest_sharing_origin(7).unwrap(), Some(a));
        let x = copy_out(&mut s, 7).unwrap();
        assert_eq!(s.oldest_sharing_origin(7).unwrap(), None);
        assert_eq!(s.exceptions(7).len(), 1);
        for id in [a, b] {
            assert_eq!(
                s.snapshot_chunk(id, 7).unwrap(),
                SnapChunk::Store {
                    store_chunk: x,
                    exclusive: false
                }
            );
        }
        let c = s.create_snapshot("c", 3).unwrap().id;
        assert_eq!(s.oldest_sharing_origin(7).unwrap(), Some(c));
        assert_eq!(s.snapshot_chunk(c, 7).unwrap(), SnapChunk::Origin);
        s.check().unwrap();
    }

    #[test]
    fn narrowest_exception_wins_after_unshare_and_copy_out_spans_it() {
        let mut s = store();
        let ids: Vec<SnapId> = (0..5)
            .map(|i| s.create_snapshot(&format!("s{i}"), i).unwrap().id)
            .collect();
        // Snapshot 3 writes chunk 9 while all still share the origin.
        let own = s.reserve_chunk().unwrap();
        s.record_snapshot_exception(ids[2], 9, own).unwrap();
        assert_eq!(s.oldest_sharing_origin(9).unwrap(), Some(ids[0]));
        let shared = copy_out(&mut s, 9).unwrap();
        assert_eq!(
            s.exceptions(9).len(),
            2,
            "one copy-out exception spans the run"
        );
        assert_eq!(
            s.snapshot_chunk(ids[2], 9).unwrap(),
            SnapChunk::Store {
                store_chunk: own,
                exclusive: true
            }
        );
        for i in [0, 1, 3, 4] {
            assert_eq!(
                s.snapshot_chunk(ids[i], 9).unwrap(),
                SnapChunk::Store {
                    store_chunk: shared,
                    exclusive: false
                }
            );
        }
        s.check().unwrap();
    }

    /// The reclaim position walks forward in origin-chunk order from 0 and is gone when
    /// the pass is done; it names the deleted snapshot.
    #[test]
    fn reclaim_position_advances_with_the_pass() {
        let mut s = store();
        assert_eq!(s.reclaim_position().unwrap(), None);
        let a = s.create_snapshot("a", 1).unwrap().id;
        for chunk in [3, 10, 40, 70] {
            copy_out(&mut s, chunk);
        }
        s.delete_snapshot(a).unwrap();
        let start = s.reclaim_position().unwrap().expect("work to do");
        assert_eq!(start.position, 0);
        assert_eq!(start.snapshots, vec![a]);
        let mut seen = vec![];
        loop {
            let p = s.reclaim_step(1).unwrap();
            if p.done {
                break;
            }
            seen.push(
                s.reclaim_position()
                    .unwrap()
                    .expect("still working")
                    .position,
            );
        }
        assert_eq!(seen, vec![10, 40, 70]);
        assert_eq!(s.reclaim_position().unwrap(), None);
    }

    #[test]
    fn delete_then_reclaim_frees_only_unused_exceptions() {
        let mut s = store();
        let a = s.create_snapshot("a", 1).unwrap().id;
        copy_out(&mut s, 1);
        let b = s.create_snapshot("b", 2).unwrap().id;
        copy_out(&mut s, 1);
        copy_out(&mut s, 2);
        assert_eq!(s.stats().unwrap().free_chunks, 47);
        s.delete_snapshot(b).unwrap();
        assert!(s.snapshot(b).unwrap().is_none());
        assert_eq!(s.list_snapshots().unwrap().len(), 1);
        let mut freed = 0;
        loop {
            let p = s.reclaim_step(1).unwrap();
            freed += p.freed_chunks;
            if p.done {
                break;
            }
        }
        // Chunk 1's second copy-out served only b; chunk 2's serves a and b, a keeps it.
        assert_eq!(freed, 1);
        assert_eq!(
            s.stats().unwrap().free_chunks,
            47,
            "not reusable before commit"
        );
        s.commit().unwrap();
        assert_eq!(s.stats().unwrap().free_chunks, 48);
        assert_eq!(s.snapshot(a).unwrap().unwrap().chunks_held, 2);
        s.check().unwrap();
        assert_eq!(
            s.delete_snapshot(b).unwrap_err().to_string(),
            "no snapshot with id 2"
        );
    }

    #[test]
    fn crash_loses_uncommitted_changes_and_reservations() {
        let mut s = store();
        s.create_snapshot("a", 1).unwrap();
        s.commit().unwrap();
        copy_out(&mut s, 3);
        let _leaked = s.reserve_chunk().unwrap();
        s.crash();
        assert!(s.exceptions(3).is_empty());
        assert_eq!(s.stats().unwrap().free_chunks, 50);
        assert_eq!(s.list_snapshots().unwrap().len(), 1);
        s.check().unwrap();
    }

    #[test]
    fn full_store_and_bad_input_are_errors() {
        let mut s = MemStore::new(4096, 4, 1);
        s.reserve_chunk().unwrap();
        assert!(matches!(
            s.reserve_chunk(),
            Err(MetaError::Refused(Refusal::Full))
        ));
        assert!(matches!(
            s.oldest_sharing_origin(4),
            Err(MetaError::Refused(Refusal::ChunkOutOfRange { .. }))
        ));
        assert!(matches!(
            s.create_snapshot("a/b", 0),
            Err(MetaError::Refused(Refusal::BadName { .. }))
        ));
        s.create_snapshot("a", 0).unwrap();
        assert!(matches!(
            s.create_snapshot("a", 0),
            Err(MetaError::Refused(Refusal::NameTaken(_)))
        ));
        assert!(matches!(
            s.release_chunk(3),
            Err(MetaError::Refused(Refusal::NotReserved(3)))
        ));
    }

    #[test]
    fn invalidated_snapshot_no_longer_needs_copy_outs() {
        let mut s = store();
        let a = s.create_snapshot("a", 1).unwrap().id;
        assert_eq!(s.oldest_sharing_origin(0).unwrap(), Some(a));
        s.invalidate_snapshot(a, "store full").unwrap();
        assert_eq!(s.oldest_sharing_origin(0).unwrap(), None);
        assert!(matches!(
            s.snapshot_chunk(a, 0),
            Err(MetaError::Refused(Refusal::NotLive(_)))
        ));
        let listed = s.list_snapshots().unwrap();
        assert_eq!(
            listed[0].state,
            SnapshotState::Invalid {
                reason: "store full".into()
            }
        );
    }
}
