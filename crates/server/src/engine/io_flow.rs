//! The I/O flow: origin and snapshot reads and writes as work items, their read locks and
//! diffs. A child of `machine.rs` (it combines the parts, as only the machine may).

use super::super::copies::CopyKind;
use super::super::failure::Fatal;
use super::super::io::{ConnId, CopySource, LogLevel, Requester};
use super::super::meta_store::{MetaError, MetaStore, SnapChunk};
use super::super::requests::{self, error, Reject};
use super::super::sessions::count_one;
use super::super::work::{WorkId, WorkKind};
use super::{CopyStart, Engine};
use csnap_proto::{
    ChunkRange, DiffEnd, ErrorCode, ServerMsg, SnapId, SnapRef, SnapshotInfo, SnapshotState,
    StoreAddr,
};
use std::collections::BTreeSet;

impl<S: MetaStore> Engine<S> {
    /// Checks a `Diff`'s ends (live, visible snapshots) and start chunk, so a refusal names
    /// what was wrong instead of failing the store call.
    pub(super) fn check_diff(
        &mut self,
        from: DiffEnd,
        to: DiffEnd,
        start: u64,
    ) -> Result<Result<(), Reject>, MetaError> {
        if from == DiffEnd::Origin || to == DiffEnd::Origin {
            if let Some(r) = self.rollback_conflict() {
                return Ok(Err(r));
            }
        }
        for end in [from, to] {
            let DiffEnd::Snapshot(snap) = end else {
                continue;
            };
            match self.resolve(&SnapRef::Id(snap))? {
                None => {
                    return Ok(Err(Reject(
                        ErrorCode::NoSuchSnapshot,
                        format!("no snapshot {snap}"),
                    )))
                }
                Some(info) if info.state != SnapshotState::Live => {
                    return Ok(Err(Reject(
                        ErrorCode::SnapshotInvalid,
                        format!(
                            "snapshot {snap} ({:?}) is not live: it has no contents to compare",
                            info.name
                        ),
                    )))
                }
                Some(_) => {}
            }
        }
        let origin_chunks = self.store.stats()?.origin_chunks;
        if start > origin_chunks {
            return Ok(Err(Reject(
                ErrorCode::OutOfRange,
                format!("diff start chunk {start} is past the origin's {origin_chunks} chunks"),
            )));
        }
        Ok(Ok(()))
    }

    /// Checks request ranges against the origin and the request size limit.
    pub(super) fn request_chunks(&self, ranges: &[ChunkRange]) -> Result<BTreeSet<u64>, Reject> {
        requests::request_chunks(
            ranges,
            self.geometry.origin_chunks,
            self.cfg.max_request_chunks,
        )
    }

    pub(super) fn finish_read(
        &mut self,
        who: Requester,
        ranges: &[ChunkRange],
    ) -> Result<(), Reject> {
        let chunks = self.request_chunks(ranges)?;
        let Some(c) = self.sessions.get_mut(who.conn) else {
            return Ok(());
        };
        if let Err(missing) = c.release_held(&chunks) {
            return Err(Reject(
                ErrorCode::NotLocked,
                format!("no read lock held on chunk {missing}"),
            ));
        }
        let freed: Vec<u64> = chunks
            .into_iter()
            .filter(|&ch| self.locks.unlock(ch, 1))
            .collect();
        self.reply(who.conn, who.id, ServerMsg::FinishSnapshotReadOk);
        for ch in freed {
            if let Err(e) = self.wake_chunk(ch) {
                self.fail(Fatal::Store(e.into()));
                break;
            }
        }
        Ok(())
    }

    /// The client finished reading the store addresses it was given for these chunks of
    /// `snap` (a snapshot read's, or an origin read's during a rollback to `snap`).
    pub(super) fn release_store_reads(
        &mut self,
        conn: ConnId,
        snap: SnapId,
        ranges: &[ChunkRange],
    ) -> Result<(), MetaError> {
        let chunks = match self.request_chunks(ranges) {
            Ok(chunks) => chunks,
            Err(Reject(_, why)) => {
                self.log(LogLevel::Warn, format!("ReleaseStoreReads refused: {why}"));
                return Ok(());
            }
        };
        let released = self
            .sessions
            .get_mut(conn)
            .map_or(0, |c| c.release_store_reads(snap, &chunks));
        if released > 0 {
            self.locks.release_leases(snap, released);
            self.wake_lease_waiters()?;
        }
        Ok(())
    }

    pub(super) fn finish_write(
        &mut self,
        who: Requester,
        snap: SnapId,
        ranges: &[ChunkRange],
    ) -> Result<(), Reject> {
        let chunks = self.request_chunks(ranges)?;
        let Some(c) = self.sessions.get_mut(who.conn) else {
            return Ok(());
        };
        if let Err(missing) = c.release_leases(&chunks) {
            return Err(Reject(
                ErrorCode::NotLocked,
                format!("no write lease held on chunk {missing}"),
            ));
        }
        self.locks.release_leases(snap, chunks.len() as u32);
        self.reply(who.conn, who.id, ServerMsg::FinishSnapshotWriteOk);
        if let Err(e) = self.wake_lease_waiters() {
            self.fail(Fatal::Store(e.into()));
        }
        Ok(())
    }

    pub(super) fn evaluate(&mut self, w: WorkId) -> Result<(), MetaError> {
        let Some(kind) = self.works.kind(w) else {
            return Ok(());
        };
        match kind {
            WorkKind::OriginWrite => self.eval_origin_write(w),
            WorkKind::SnapshotRead(snap) => self.eval_snapshot_read(w, snap),
            WorkKind::SnapshotWrite(snap) => self.eval_snapshot_write(w, snap),
        }
    }

    fn finish_work(&mut self, w: WorkId, msg: ServerMsg) {
        if let Some(who) = self.works.finish(w) {
            self.reply(who.conn, who.id, msg);
        }
    }

    fn eval_origin_write(&mut self, w: WorkId) -> Result<(), MetaError> {
        if !self.gate.is_open() {
            self.waiters.on_activation(w);
            return Ok(());
        }
        if self.creations.announced() {
            self.waiters.on_announcement(w);
            return Ok(());
        }
        let chunks = self.works.chunks(w);
        // While a copy-out of one of its chunks is in flight the write cannot be granted:
        // wait for that copy alone, without looking its other chunks up again. A write
        // that first-touches many chunks is woken once per copy-out; this keeps each of
        // those wakes but the last from costing a tree lookup per chunk. (On the first
        // evaluation a chunk only has a copy in flight if another request started it.)
        if let Some(&c) = chunks.iter().find(|&&c| self.copies.copying_out(c)) {
            self.waiters.on_chunk(c, w);
            return Ok(());
        }
        let mut blocked = false;
        for c in chunks {
            // A chunk the rollback has still to copy back is written once it is, as of a
            // commit (a crash before would copy it back again, over the write).
            if self.rollback_holds_write(c)? {
                self.wait_commit(w);
                blocked = true;
                continue;
            }
            if self.copies.copying_out(c) {
                self.waiters.on_chunk(c, w);
                blocked = true;
                continue;
            }
            if self.store.oldest_sharing_origin(c)?.is_some() {
                match self.start_copy(
                    CopyKind::OriginCopyOut { chunk: c },
                    CopySource::Origin { chunk: c },
                )? {
                    CopyStart::Started => {
                        self.waiters.on_chunk(c, w);
                        blocked = true;
                        continue;
                    }
                    CopyStart::AfterCommit => {
                        self.wait_commit(w);
                        blocked = true;
                        continue;
                    }
                    CopyStart::AfterLeases => {
                        self.waiters.on_leases(w);
                        blocked = true;
                        continue;
                    }
                    // The rollback's source and pin are never given up: wait for room.
                    CopyStart::NotNeeded | CopyStart::Full
                        if self.rollback.is_some()
                            && self.store.oldest_sharing_origin(c)?.is_some() =>
                    {
                        self.wait_commit(w);
                        blocked = true;
                        continue;
                    }
                    // Every snapshot needing it was invalidated: unique once committed.
                    CopyStart::NotNeeded | CopyStart::Full => {}
                }
            }
            if self.read_locks(c) > 0 {
                self.waiters.on_chunk(c, w);
                blocked = true;
            }
            if !self.commits.chunk_committed(c) {
                self.wait_commit(w);
                blocked = true;
            }
        }
        if !blocked {
            let ranges = self.works.ranges(w);
            let unique = self.cfg.promise_unique;
            self.finish_work(w, ServerMsg::OriginWriteOk { ranges, unique });
        }
        Ok(())
    }

    /// Whether `snap` can be read/written now: `Some(reject)` refuses the request.
    fn snapshot_usable(&mut self, snap: SnapId) -> Result<Option<Reject>, MetaError> {
        if self.creations.is_pending(snap) {
            return Ok(Some(Reject(
                ErrorCode::NoSuchSnapshot,
                format!("snapshot {snap} is still being created"),
            )));
        }
        Ok(match self.store.snapshot(snap)? {
            None => Some(Reject(
                ErrorCode::NoSuchSnapshot,
                format!("no snapshot with id {snap}"),
            )),
            Some(SnapshotInfo {
                state: SnapshotState::Invalid { reason },
                ..
            }) => Some(Reject(
                ErrorCode::SnapshotInvalid,
                format!("snapshot {snap} was invalidated: {reason}"),
            )),
            Some(_) => None,
        })
    }

    pub(super) fn reject_work(&mut self, w: WorkId, r: Reject) {
        self.finish_work(w, error(r.0, r.1));
    }

    fn eval_snapshot_read(&mut self, w: WorkId, snap: SnapId) -> Result<(), MetaError> {
        if let Some(r) = self.snapshot_usable(snap)? {
            self.reject_work(w, r);
            return Ok(());
        }
        let mut blocked = false;
        let mut store = Vec::new();
        let mut origin = Vec::new();
        for c in self.works.chunks(w) {
            match self.store.snapshot_chunk(snap, c)? {
                // Never expose an exception a crash could still undo: its copy may predate
                // an origin write that raced the snapshot's creation, and after a crash the
                // snapshot would read that write from the origin instead.
                SnapChunk::Store { .. } if !self.commits.exceptions_committed(c) => {
                    self.wait_commit(w);
                    blocked = true;
                }
                SnapChunk::Store { store_chunk, .. } => store.push(StoreAddr {
                    chunk: c,
                    store_chunk,
                }),
                // A copy-out in flight will give the snapshot its own copy: wait for it
                // rather than lock the origin (which would hold up the writer).
                SnapChunk::Origin if self.copies.copying_out(c) => {
                    self.waiters.on_chunk(c, w);
                    blocked = true;
                }
                SnapChunk::Origin => origin.push(c),
            }
        }
        if blocked {
            return Ok(());
        }
        let Some(conn) = self.works.conn(w) else {
            return Ok(());
        };
        for &c in &origin {
            self.locks.lock(c);
        }
        if let Some(cn) = self.sessions.get_mut(conn) {
            for &c in &origin {
                count_one(&mut cn.held, c);
            }
            for a in &store {
                count_one(&mut cn.store_reads, (snap, a.chunk));
            }
            self.locks.add_leases(snap, store.len() as u32);
        }
        self.finish_work(
            w,
            ServerMsg::SnapshotReadOk {
                store,
                origin_locked: ChunkRange::coalesce(origin),
            },
        );
        Ok(())
    }

    fn eval_snapshot_write(&mut self, w: WorkId, snap: SnapId) -> Result<(), MetaError> {
        if let Some(r) = self.snapshot_usable(snap)? {
            self.reject_work(w, r);
            return Ok(());
        }
        if let Some(r) = self.rollback.as_ref().filter(|r| r.involves(snap)) {
            let why = format!(
                "snapshot {snap} is the source or pin of the rollback to snapshot {} in progress: it cannot be written until the rollback is done",
                r.source
            );
            self.reject_work(w, Reject(ErrorCode::RollbackInProgress, why));
            return Ok(());
        }
        let mut blocked = false;
        let mut addrs = Vec::new();
        for c in self.works.chunks(w) {
            if self.copies.unsharing(snap, c) {
                self.waiters.on_chunk(c, w);
                blocked = true;
                continue;
            }
            let (kind, from) = match self.store.snapshot_chunk(snap, c)? {
                SnapChunk::Store {
                    store_chunk,
                    exclusive: true,
                } => {
                    if self.commits.chunk_committed(c) {
                        addrs.push(StoreAddr {
                            chunk: c,
                            store_chunk,
                        });
                    } else {
                        self.wait_commit(w);
                        blocked = true;
                    }
                    continue;
                }
                SnapChunk::Store {
                    store_chunk,
                    exclusive: false,
                } => (
                    CopyKind::Unshare {
                        snap,
                        chunk: c,
                        locked: false,
                    },
                    CopySource::Store { store_chunk },
                ),
                SnapChunk::Origin if self.copies.copying_out(c) => {
                    // Copy from the shared copy-out once it lands instead of racing it.
                    self.waiters.on_chunk(c, w);
                    blocked = true;
                    continue;
                }
                SnapChunk::Origin => (
                    CopyKind::Unshare {
                        snap,
                        chunk: c,
                        locked: true,
                    },
                    CopySource::Origin { chunk: c },
                ),
            };
            blocked = true;
            match self.start_copy(kind, from)? {
                CopyStart::Started => self.waiters.on_chunk(c, w),
                CopyStart::AfterCommit => self.wait_commit(w),
                CopyStart::AfterLeases => {
                    self.waiters.on_leases(w);
                }
                CopyStart::Full | CopyStart::NotNeeded => {
                    self.reject_work(
                        w,
                        Reject(
                            ErrorCode::StoreFull,
                            format!(
                                "snapshot store full: no space to write chunk {c} of snapshot {snap} (policy {})",
                                self.cfg.store_full_policy
                            ),
                        ),
                    );
                    return Ok(());
                }
            }
        }
        if !blocked {
            if let Some(conn) = self.works.conn(w) {
                if let Some(c) = self.sessions.get_mut(conn) {
                    for a in &addrs {
                        count_one(&mut c.leases, a.chunk);
                    }
                }
                self.locks.add_leases(snap, addrs.len() as u32);
            }
            self.finish_work(w, ServerMsg::SnapshotWriteOk { addrs });
        }
        Ok(())
    }
}
