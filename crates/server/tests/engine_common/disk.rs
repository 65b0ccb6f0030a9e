//! The on-disk `Store` on a `MemDevice` with a volatile write cache, as a `TestStore`: a
//! crash keeps the durable contents plus a random subset of cached sectors, recovery
//! replays the journal. Shared by the engine tests that run on the real store.

use super::TestStore;
use csnap_proto::*;
use csnap_server::engine::*;
use csnap_server::store::{FormatOptions, Geometry, MemDevice, OpenOptions, Store};
use std::sync::Arc;

const CHUNK: u64 = 4096;

pub(crate) struct DiskStore {
    pub store: Store,
    dev: MemDevice,
    crashes: u64,
    /// Report no metadata figures, so the engine learns of a full metadata area only
    /// when a record fails (`MetadataFull` after the copy).
    pub hide_metadata_space: bool,
}

impl DiskStore {
    /// A store formatted as `csnapctl format` would (the `MakeStore` shape).
    pub(crate) fn new(origin_chunks: u64, store_chunks: u64) -> DiskStore {
        let size = Geometry::smallest_store(CHUNK).unwrap() + store_chunks * CHUNK;
        let dev = MemDevice::new(size);
        Store::format(&dev, &Self::options(origin_chunks)).unwrap();
        Self::opened(dev)
    }

    /// A store with a node area of `meta_blocks` blocks, to fill it in tests.
    pub(crate) fn with_metadata_blocks(
        meta_blocks: u64,
        data_chunks: u64,
        origin_chunks: u64,
    ) -> DiskStore {
        let size = Geometry::smallest_store(CHUNK).unwrap() + data_chunks * CHUNK;
        let dev = MemDevice::new(size);
        Store::format_with_metadata_blocks(&dev, &Self::options(origin_chunks), meta_blocks)
            .unwrap();
        Self::opened(dev)
    }

    fn options(origin_chunks: u64) -> FormatOptions {
        FormatOptions {
            chunk_size: CHUNK,
            origin_size: origin_chunks * CHUNK,
            now: 1_000,
            uuid: Some([9; 16]),
        }
    }

    fn opened(dev: MemDevice) -> DiskStore {
        let store = Store::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
        DiskStore {
            store,
            dev,
            crashes: 0,
            hide_metadata_space: false,
        }
    }
}

impl TestStore for DiskStore {
    fn crash_and_recover(&mut self) {
        self.crashes += 1;
        self.dev = self.dev.crash(self.crashes);
        self.store = Store::open(Arc::new(self.dev.clone()), OpenOptions::default())
            .unwrap_or_else(|e| panic!("store does not reopen after a crash: {e}"));
        assert!(self.store.was_unclean());
    }

    fn consistency(&mut self) -> Result<(), String> {
        let report = self.store.check().map_err(|e| e.to_string())?;
        if report.is_clean() {
            Ok(())
        } else {
            Err(report.problems.join("; "))
        }
    }

    fn snapshot_states(&mut self) -> Vec<(SnapId, SnapshotState)> {
        MetaStore::list_snapshots(&mut self.store)
            .unwrap()
            .into_iter()
            .map(|i| (i.id, i.state))
            .collect()
    }

    fn placeholder() -> Self {
        DiskStore::new(1, 1)
    }
}

/// Every method forwards to the store's own `MetaStore` implementation.
impl MetaStore for DiskStore {
    fn stats(&mut self) -> Result<StoreStats, MetaError> {
        self.store.stats()
    }
    fn create_snapshot(&mut self, name: &str, ctime: u64) -> Result<SnapshotInfo, MetaError> {
        MetaStore::create_snapshot(&mut self.store, name, ctime)
    }
    fn next_snapshot_id(&mut self) -> Result<SnapId, MetaError> {
        MetaStore::next_snapshot_id(&mut self.store)
    }
    fn delete_snapshot(&mut self, id: SnapId) -> Result<(), MetaError> {
        MetaStore::delete_snapshot(&mut self.store, id)
    }
    fn invalidate_snapshot(&mut self, id: SnapId, reason: &str) -> Result<(), MetaError> {
        MetaStore::invalidate_snapshot(&mut self.store, id, reason)
    }
    fn list_snapshots(&mut self) -> Result<Vec<SnapshotInfo>, MetaError> {
        MetaStore::list_snapshots(&mut self.store)
    }
    fn snapshot(&mut self, id: SnapId) -> Result<Option<SnapshotInfo>, MetaError> {
        MetaStore::snapshot(&mut self.store, id)
    }
    fn snapshot_by_name(&mut self, name: &str) -> Result<Option<SnapshotInfo>, MetaError> {
        MetaStore::snapshot_by_name(&mut self.store, name)
    }
    fn oldest_sharing_origin(&mut self, chunk: u64) -> Result<Option<SnapId>, MetaError> {
        MetaStore::oldest_sharing_origin(&mut self.store, chunk)
    }
    fn diff_page(
        &mut self,
        from: csnap_proto::DiffEnd,
        to: csnap_proto::DiffEnd,
        start: u64,
        budget: u32,
    ) -> Result<csnap_proto::DiffPage, MetaError> {
        MetaStore::diff_page(&mut self.store, from, to, start, budget)
    }
    fn oldest_live(&mut self, except: Option<SnapId>) -> Result<Option<SnapId>, MetaError> {
        MetaStore::oldest_live(&mut self.store, except)
    }
    fn metadata_space(&mut self) -> Result<Option<MetadataSpace>, MetaError> {
        if self.hide_metadata_space {
            return Ok(None);
        }
        MetaStore::metadata_space(&mut self.store)
    }
    fn reserve_chunk(&mut self) -> Result<u64, MetaError> {
        MetaStore::reserve_chunk(&mut self.store)
    }
    fn release_chunk(&mut self, store_chunk: u64) -> Result<(), MetaError> {
        MetaStore::release_chunk(&mut self.store, store_chunk)
    }
    fn record_copy_out(&mut self, chunk: u64, store_chunk: u64) -> Result<bool, MetaError> {
        MetaStore::record_copy_out(&mut self.store, chunk, store_chunk)
    }
    fn snapshot_chunk(&mut self, id: SnapId, chunk: u64) -> Result<SnapChunk, MetaError> {
        MetaStore::snapshot_chunk(&mut self.store, id, chunk)
    }
    fn record_snapshot_exception(
        &mut self,
        id: SnapId,
        chunk: u64,
        store_chunk: u64,
    ) -> Result<(), MetaError> {
        MetaStore::record_snapshot_exception(&mut self.store, id, chunk, store_chunk)
    }
    fn reclaim_step(&mut self, budget: usize) -> Result<ReclaimProgress, MetaError> {
        MetaStore::reclaim_step(&mut self.store, budget)
    }
    fn usage_step(&mut self, budget: usize) -> Result<bool, MetaError> {
        MetaStore::usage_step(&mut self.store, budget)
    }
    fn usage_exact(&self) -> bool {
        MetaStore::usage_exact(&self.store)
    }
    fn commit(&mut self) -> Result<(), MetaError> {
        MetaStore::commit(&mut self.store)
    }
    fn keeps_rollback(&self) -> bool {
        MetaStore::keeps_rollback(&self.store)
    }
    fn rollback(&mut self) -> Result<Option<RollbackRecord>, MetaError> {
        MetaStore::rollback(&mut self.store)
    }
    fn set_rollback(&mut self, record: Option<RollbackRecord>) -> Result<(), MetaError> {
        MetaStore::set_rollback(&mut self.store, record)
    }
}
