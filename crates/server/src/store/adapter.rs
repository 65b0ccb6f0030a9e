//! `MetaStore` (the request engine's view of a store) for the on-disk `Store`.

use super::{ChunkSource, SnapState, SnapshotRecord, Store, StoreError};
use crate::engine::{
    CommitIo, MetaError as EngineError, MetaStore, MetadataSpace, ReclaimPosition, ReclaimProgress,
    RollbackRecord, SnapChunk, StoreStats,
};
use csnap_proto::{DiffEnd, DiffPage, SnapId, SnapshotInfo, SnapshotState};

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            // Not corruption: the engine answers it (`MetadataFull`: its store-full policy
            // makes room).
            StoreError::Refused(refusal) => EngineError::Refused(refusal),
            // Kept whole: its message names the operation, device and offset.
            e @ StoreError::Io { .. } => EngineError::Io(Box::new(e)),
            other => EngineError::Corrupt(Box::new(other)),
        }
    }
}

fn info(rec: &SnapshotRecord, chunks_held: u64) -> SnapshotInfo {
    SnapshotInfo {
        id: rec.id,
        name: rec.name.clone(),
        ctime: rec.ctime,
        state: match &rec.state {
            SnapState::Live => SnapshotState::Live,
            SnapState::Invalid { reason } => SnapshotState::Invalid {
                reason: reason.clone(),
            },
            SnapState::Deleting => SnapshotState::Deleting,
        },
        chunks_held,
    }
}

impl MetaStore for Store {
    fn keeps_rollback(&self) -> bool {
        true
    }

    fn rollback(&mut self) -> Result<Option<RollbackRecord>, EngineError> {
        Ok(Store::rollback(self).map(|r| RollbackRecord {
            source: SnapId(r.source),
            pin: SnapId(r.pin),
            cursor: r.cursor,
        }))
    }

    fn set_rollback(&mut self, record: Option<RollbackRecord>) -> Result<(), EngineError> {
        Store::set_rollback(
            self,
            record.map(|r| super::RollbackRecord {
                source: r.source.0,
                pin: r.pin.0,
                cursor: r.cursor,
            }),
        )?;
        Ok(())
    }

    fn stats(&mut self) -> Result<StoreStats, EngineError> {
        let g = *self.geometry();
        Ok(StoreStats {
            chunk_size: g.chunk_size as u32,
            origin_chunks: g.origin_chunks(),
            store_chunks: g.data_chunks,
            free_chunks: self.free_chunks(),
        })
    }

    fn next_snapshot_id(&mut self) -> Result<SnapId, EngineError> {
        Ok(SnapId(self.meta.root.next_snap_id))
    }

    fn create_snapshot(&mut self, name: &str, ctime: u64) -> Result<SnapshotInfo, EngineError> {
        let rec = Store::create_snapshot(self, name, ctime)?;
        Ok(info(&rec, 0))
    }

    fn create_snapshot_with_token(
        &mut self,
        name: &str,
        ctime: u64,
        token: u64,
    ) -> Result<SnapshotInfo, EngineError> {
        let rec = Store::create_snapshot_with_token(self, name, ctime, token)?;
        Ok(info(&rec, 0))
    }

    fn created_with(&mut self, id: SnapId, token: u64) -> Result<bool, EngineError> {
        let token = token & crate::engine::CREATE_TOKEN_MASK;
        Ok(token != 0 && Store::snapshot(self, id).is_some_and(|r| r.create_token == token))
    }

    fn delete_snapshot(&mut self, id: SnapId) -> Result<(), EngineError> {
        Ok(Store::delete_snapshot(self, id)?)
    }

    fn invalidate_snapshot(&mut self, id: SnapId, reason: &str) -> Result<(), EngineError> {
        Ok(Store::invalidate_snapshot(self, id, reason)?)
    }

    fn list_snapshots(&mut self) -> Result<Vec<SnapshotInfo>, EngineError> {
        // From the usage counter: O(snapshots), no tree walk.
        let (usage, _) = self.usage_figures();
        Ok(self
            .snapshots()
            .iter()
            .map(|r| info(r, usage.get(&r.id).copied().unwrap_or(0)))
            .collect())
    }

    fn snapshot(&mut self, id: SnapId) -> Result<Option<SnapshotInfo>, EngineError> {
        Ok(Store::snapshot(self, id).map(|r| info(r, self.usage_of(r.id))))
    }

    fn snapshot_by_name(&mut self, name: &str) -> Result<Option<SnapshotInfo>, EngineError> {
        Ok(Store::snapshot_by_name(self, name).map(|r| info(r, self.usage_of(r.id))))
    }

    fn oldest_sharing_origin(&mut self, chunk: u64) -> Result<Option<SnapId>, EngineError> {
        Ok(Store::oldest_sharing_origin(self, chunk)?)
    }

    fn diff_page(
        &mut self,
        from: DiffEnd,
        to: DiffEnd,
        start: u64,
        budget: u32,
    ) -> Result<DiffPage, EngineError> {
        Ok(Store::diff_page(self, from, to, start, budget as usize)?)
    }

    fn oldest_live(&mut self, except: Option<SnapId>) -> Result<Option<SnapId>, EngineError> {
        Ok(self.live_snapshots().find(|id| Some(*id) != except))
    }

    fn metadata_space(&mut self) -> Result<Option<MetadataSpace>, EngineError> {
        Ok(Some(Store::metadata_space(self)))
    }

    fn reserve_chunk(&mut self) -> Result<u64, EngineError> {
        Ok(Store::reserve_chunk(self)?)
    }

    fn release_chunk(&mut self, store_chunk: u64) -> Result<(), EngineError> {
        Ok(Store::release_chunk(self, store_chunk)?)
    }

    fn record_copy_out(&mut self, chunk: u64, store_chunk: u64) -> Result<bool, EngineError> {
        Ok(Store::record_copy_out(self, chunk, store_chunk)?)
    }

    fn snapshot_chunk(&mut self, id: SnapId, chunk: u64) -> Result<SnapChunk, EngineError> {
        Ok(match Store::snapshot_chunk(self, id, chunk)? {
            ChunkSource::Origin => SnapChunk::Origin,
            ChunkSource::Store {
                store_chunk,
                exclusive,
            } => SnapChunk::Store {
                store_chunk,
                exclusive,
            },
        })
    }

    fn record_snapshot_exception(
        &mut self,
        id: SnapId,
        chunk: u64,
        store_chunk: u64,
    ) -> Result<(), EngineError> {
        Ok(Store::record_snapshot_exception(
            self,
            id,
            chunk,
            store_chunk,
        )?)
    }

    fn reclaim_step(&mut self, budget: usize) -> Result<ReclaimProgress, EngineError> {
        let p = Store::reclaim_step(self, budget)?;
        Ok(ReclaimProgress {
            freed_chunks: p.chunks_freed,
            done: p.done,
        })
    }

    fn reclaim_position(&self) -> Result<Option<ReclaimPosition>, EngineError> {
        Ok(
            Store::reclaim_position(self).map(|(position, ids)| ReclaimPosition {
                position,
                snapshots: ids,
            }),
        )
    }

    fn usage_step(&mut self, budget: usize) -> Result<bool, EngineError> {
        Ok(Store::usage_step(self, budget)?)
    }

    fn usage_exact(&self) -> bool {
        self.usage_figures_exact()
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        Ok(Store::commit(self)?)
    }

    fn begin_commit(&mut self) -> Result<Option<CommitIo>, EngineError> {
        Ok(Store::begin_commit(self)?.map(|io| {
            CommitIo::new(move |flush_data_first| {
                if flush_data_first {
                    io.run()
                } else {
                    io.run_data_stable()
                }
            })
        }))
    }

    fn finish_commit(&mut self) -> Result<(), EngineError> {
        Ok(Store::finish_commit(self)?)
    }
}
