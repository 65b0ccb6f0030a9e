//! The on-disk snapshot store: superblock, journal, allocation bitmaps, the exception btree
//! and the snapshot table, behind a synchronous `Store` API. docs/store-format.md describes
//! the format byte by byte and the exception rules.
//!
//! Exceptions of one origin chunk are kept as *disjoint* runs of snapshot ids, one btree
//! record each, keyed by (origin chunk, first id):
//! * a snapshot reads the record whose run contains its id (at most one does), else the
//!   origin;
//! * an origin copy-out fills every gap (run of ids with no record) that holds a live
//!   snapshot, all with the one new store chunk; normally that is a single gap after the
//!   previous copy-out, so a single record. Records naming the same store chunk carry the
//!   SHARED flag;
//! * a record with the FILL flag promises that every live snapshot below its first id is
//!   covered, so the copy-out check only looks at records above the highest FILL record
//!   (those created by snapshot writes since the last copy-out): no O(snapshots) work.
//! * a snapshot write that is not exclusive splits the run around the writer's id.

pub mod device;
pub mod error;
pub mod format;
pub mod tool;

mod adapter;
mod btree;
mod check;
mod diff;
mod meta;
mod rollback;
mod usage;

pub use check::CheckReport;
pub use device::{
    BlockDevice, FileDevice, FlushTracked, GroupFlush, MemDevice, MemDeviceStats, SectorBuf,
};
pub use error::{Result, StoreError};
pub use format::{Geometry, RollbackRecord};
pub use meta::{CommitIo, MetaStats};

use crate::engine::{MetadataSpace, Refusal};
use btree::{Key, Tree};
use csnap_proto::SnapId;
use format::*;
use meta::{Meta, TX_SOFT_LIMIT};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Options for `Store::open`.
#[derive(Clone, Copy, Debug)]
pub struct OpenOptions {
    /// Metadata block cache bound, in 4 KiB blocks (at least `meta::MIN_CACHE_BLOCKS`).
    pub cache_blocks: usize,
    /// Cluster mode: the membership generation the server is activated for. The open
    /// refuses a store a later generation already served (see [`Store::open`]) and
    /// records this one.
    pub cluster_generation: Option<u64>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            cache_blocks: 8192,
            cluster_generation: None,
        }
    }
}

/// Parameters of `Store::format`.
#[derive(Clone, Copy, Debug)]
pub struct FormatOptions {
    /// Bytes per chunk (a power of two, 4 KiB to 1 MiB).
    pub chunk_size: u64,
    /// The origin's size in bytes.
    pub origin_size: u64,
    /// Creation time (unix seconds) recorded in the superblock.
    pub now: u64,
    /// Fixed uuid (tests); random when `None`.
    pub uuid: Option<[u8; 16]>,
}

/// State of a snapshot in the snapshot table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapState {
    /// Readable and writable.
    Live,
    /// Sacrificed by the store-full policy; its contents are gone.
    Invalid {
        /// Why.
        reason: String,
    },
    /// Deleted; its space is being reclaimed.
    Deleting,
}

/// One row of the snapshot table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// The snapshot's id (never reused).
    pub id: SnapId,
    /// Its name.
    pub name: String,
    /// Creation time, Unix seconds.
    pub ctime: u64,
    /// Live, invalid or being deleted.
    pub state: SnapState,
    /// For Deleting and Invalid snapshots: the reclaim pass whose completion frees what they
    /// alone held (0 = nothing pending).
    pub pending_pass: u64,
    /// The creator's request token (`CreateSnapshot.token`), its low 40 bits; 0 = none.
    /// Lets a create resent after a lost answer (even to a new server) find its snapshot.
    pub create_token: u64,
}

/// One exception record: snapshots `first..=last` of origin chunk `chunk` read
/// `store_chunk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExceptionRecord {
    /// The origin chunk.
    pub chunk: u64,
    /// The first snapshot it covers.
    pub first: SnapId,
    /// The last snapshot it covers.
    pub last: SnapId,
    /// Where the chunk's contents are (device chunk address).
    pub store_chunk: u64,
    /// Every live snapshot below `first` is covered by some record of this chunk.
    pub fill: bool,
    /// Other records of this chunk name the same store chunk.
    pub shared: bool,
}

/// Free node blocks that growing operations (new records, new snapshots) leave alone. The
/// operations that free space allocate no node at all, so they never need it; it is the
/// margin that keeps them (and a store opened by an older build) working on a full area.
pub const META_RESERVE: u64 = 8;

/// An inclusive run of snapshot ids.
type IdRun = (SnapId, SnapId);

const FLAG_FILL: u64 = 1 << 56;
const FLAG_SHARED: u64 = 1 << 57;
const ADDRESS_MASK: u64 = (1 << 56) - 1;

impl ExceptionRecord {
    fn key(&self) -> Key {
        Key::new(self.chunk, self.first.0)
    }

    fn encode(&self) -> [u8; btree::EXCEPTION_VALUE] {
        let mut v = [0u8; btree::EXCEPTION_VALUE];
        put_u64(&mut v, 0, self.last.0);
        let mut word = self.store_chunk & ADDRESS_MASK;
        if self.fill {
            word |= FLAG_FILL;
        }
        if self.shared {
            word |= FLAG_SHARED;
        }
        put_u64(&mut v, 8, word);
        v
    }

    fn decode(key: Key, v: &[u8]) -> ExceptionRecord {
        let word = get_u64(v, 8);
        ExceptionRecord {
            chunk: key.hi,
            first: SnapId(key.lo),
            last: SnapId(get_u64(v, 0)),
            store_chunk: word & ADDRESS_MASK,
            fill: word & FLAG_FILL != 0,
            shared: word & FLAG_SHARED != 0,
        }
    }
}

const STATE_LIVE: u8 = 1;
const STATE_INVALID: u8 = 2;
const STATE_DELETING: u8 = 3;
// The record keeps the name's length in one byte and the name in bytes 24..280.
const _: () = assert!(csnap_proto::MAX_SNAPSHOT_NAME <= 255);
const MAX_REASON: usize = 72;
/// The create token's bits kept in the record (bytes 11..16).
const CREATE_TOKEN_MASK: u64 = (1 << csnap_proto::CREATE_TOKEN_BITS) - 1;

impl SnapshotRecord {
    fn encode(&self) -> [u8; btree::SNAPSHOT_VALUE] {
        let mut v = [0u8; btree::SNAPSHOT_VALUE];
        put_u64(&mut v, 0, self.ctime);
        let reason = match &self.state {
            SnapState::Live => {
                v[8] = STATE_LIVE;
                ""
            }
            SnapState::Invalid { reason } => {
                v[8] = STATE_INVALID;
                reason.as_str()
            }
            SnapState::Deleting => {
                v[8] = STATE_DELETING;
                ""
            }
        };
        let reason = truncate_utf8(reason, MAX_REASON);
        v[9] = reason.len() as u8;
        v[10] = self.name.len() as u8;
        v[11..16].copy_from_slice(&(self.create_token & CREATE_TOKEN_MASK).to_le_bytes()[..5]);
        put_u64(&mut v, 16, self.pending_pass);
        v[24..24 + self.name.len()].copy_from_slice(self.name.as_bytes());
        v[280..280 + reason.len()].copy_from_slice(reason.as_bytes());
        v
    }

    fn decode(block_hint: u64, key: Key, v: &[u8]) -> Result<SnapshotRecord> {
        let corrupt = |what: String| StoreError::CorruptMetadata {
            block: block_hint,
            area: "snapshot table",
            what,
        };
        let name_len = v[10] as usize;
        let reason_len = (v[9] as usize).min(MAX_REASON);
        let name = std::str::from_utf8(&v[24..24 + name_len])
            .map_err(|_| corrupt(format!("snapshot {} name is not UTF-8", key.hi)))?
            .to_owned();
        let reason = String::from_utf8_lossy(&v[280..280 + reason_len]).into_owned();
        let state = match v[8] {
            STATE_LIVE => SnapState::Live,
            STATE_INVALID => SnapState::Invalid { reason },
            STATE_DELETING => SnapState::Deleting,
            other => {
                return Err(corrupt(format!(
                    "snapshot {} has state code {other}",
                    key.hi
                )))
            }
        };
        Ok(SnapshotRecord {
            id: SnapId(key.hi),
            name,
            ctime: get_u64(v, 0),
            state,
            pending_pass: get_u64(v, 16),
            create_token: {
                let mut t = [0u8; 8];
                t[..5].copy_from_slice(&v[11..16]);
                u64::from_le_bytes(t)
            },
        })
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Checks a snapshot name with the one rule every crate uses
/// ([`csnap_proto::validate_snapshot_name`]), as a store error.
pub fn check_snapshot_name(name: &str) -> Result<()> {
    csnap_proto::validate_snapshot_name(name).map_err(|why| {
        StoreError::Refused(Refusal::BadName {
            name: name.to_owned(),
            why,
        })
    })
}

/// Where a snapshot reads one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkSource {
    /// It still shares the origin's chunk.
    Origin,
    /// It reads the store.
    Store {
        /// Where (device chunk address).
        store_chunk: u64,
        /// No other live snapshot uses it.
        exclusive: bool,
    },
}

/// How far `Store::format_with_progress` got: metadata blocks written of those it writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FormatProgress {
    /// Blocks written so far.
    pub done_blocks: u64,
    /// Blocks to write in all.
    pub total_blocks: u64,
}

/// Progress of one `reclaim_step`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimProgress {
    /// Exception records looked at.
    pub records_examined: u64,
    /// Of those, removed.
    pub records_removed: u64,
    /// Data chunks freed.
    pub chunks_freed: u64,
    /// No reclaim work is left.
    pub done: bool,
}

/// Figures for status output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreInfo {
    /// The store's uuid.
    pub uuid: String,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// The origin's size in bytes.
    pub origin_size: u64,
    /// The origin's size in chunks.
    pub origin_chunks: u64,
    /// Chunks in the data area.
    pub data_chunks: u64,
    /// Of those, free.
    pub free_chunks: u64,
    /// Blocks in the metadata (node) area.
    pub meta_blocks: u64,
    /// Of those, free.
    pub free_meta_blocks: u64,
    /// Bumped by every server start.
    pub server_generation: u64,
    /// Snapshots in the table (deleting ones included).
    pub snapshots: usize,
}

/// An open snapshot store.
pub struct Store {
    meta: Meta,
    snaps: BTreeMap<SnapId, SnapshotRecord>,
    live: BTreeSet<SnapId>,
    names: HashMap<String, SnapId>,
    unclean: bool,
    replayed: u64,
    /// Deleted or invalidated snapshots whose space a reclaim pass still has to free.
    reclaim_pending: BTreeSet<SnapId>,
    /// Per-snapshot store usage, kept incrementally (see `usage.rs`).
    usage_counter: usage::UsageCounter,
}

/// Reads both superblock slots and returns the valid one with the highest sequence.
pub fn read_superblock(dev: &dyn BlockDevice) -> Result<Superblock> {
    if dev.len() < SUPERBLOCK_SLOTS * BLOCK_U64 {
        return Err(StoreError::TooSmall {
            device: dev.name(),
            size: dev.len(),
            needed: Geometry::smallest_store(MIN_CHUNK)?,
            why: "not even the superblocks fit",
        });
    }
    let mut best: Option<Superblock> = None;
    let mut errors = Vec::new();
    for slot in 0..SUPERBLOCK_SLOTS {
        let b = meta::read_block(dev, slot)?;
        match Superblock::decode(&b, slot as u8, dev.len()) {
            Ok(sb) if sb.slot() == slot => {
                if best.as_ref().is_none_or(|b| sb.sequence > b.sequence) {
                    best = Some(sb);
                }
            }
            Ok(sb) => errors.push(StoreError::CorruptSuperblock {
                slot: slot as u8,
                what: format!("sequence {} belongs in slot {}", sb.sequence, sb.slot()),
            }),
            Err(e) => errors.push(e),
        }
    }
    if let Some(sb) = best {
        if let Some(e) = errors.first() {
            tracing::warn!("using the other superblock copy: {e}");
        }
        return Ok(sb);
    }
    // Prefer an error that says more than "wrong magic" (the store is damaged, not absent).
    let pick = errors
        .iter()
        .position(|e| !matches!(e, StoreError::WrongMagic { .. }))
        .unwrap_or(0);
    Err(errors.swap_remove(pick))
}

impl Store {
    /// Formats `dev` as an empty store. Overwrites whatever is there: callers check
    /// `read_superblock` first to refuse overwriting a store.
    pub fn format(dev: &dyn BlockDevice, opts: &FormatOptions) -> Result<Superblock> {
        Self::format_with_progress(dev, opts, &mut |_| {})
    }

    /// Like `format`, calling `progress` as the metadata blocks are written (after each
    /// batch, and once at the end with `done == total`). The callback only observes.
    pub fn format_with_progress(
        dev: &dyn BlockDevice,
        opts: &FormatOptions,
        progress: &mut dyn FnMut(FormatProgress),
    ) -> Result<Superblock> {
        let g = Geometry::plan(opts.chunk_size, opts.origin_size, dev.len(), &dev.name())?;
        Self::format_geometry(dev, opts, g, progress)
    }

    /// Like `format`, with a node area of exactly `meta_blocks` blocks (see
    /// `Geometry::plan_with_metadata_blocks`).
    pub fn format_with_metadata_blocks(
        dev: &dyn BlockDevice,
        opts: &FormatOptions,
        meta_blocks: u64,
    ) -> Result<Superblock> {
        let g = Geometry::plan_with_metadata_blocks(
            opts.chunk_size,
            opts.origin_size,
            dev.len(),
            meta_blocks,
            &dev.name(),
        )?;
        Self::format_geometry(dev, opts, g, &mut |_| {})
    }

    fn format_geometry(
        dev: &dyn BlockDevice,
        opts: &FormatOptions,
        g: Geometry,
        progress: &mut dyn FnMut(FormatProgress),
    ) -> Result<Superblock> {
        let uuid = opts.uuid.unwrap_or_else(rand::random);
        // Bitmap blocks, written in batches.
        let total_bitmaps = g.meta_bitmap_blocks + g.data_bitmap_blocks;
        // Bitmaps, the two root leaves, the journal's first block, two superblocks.
        let total = total_bitmaps + 5;
        progress(FormatProgress {
            done_blocks: 0,
            total_blocks: total,
        });
        let batch = 256u64;
        let mut i = 0;
        while i < total_bitmaps {
            let n = batch.min(total_bitmaps - i);
            let mut buf = Vec::with_capacity((n as usize) * BLOCK);
            for j in i..i + n {
                let mut b = meta::empty_bitmap_block(j);
                if j == 0 {
                    // The two empty root leaves.
                    meta::set_bitmap_bit(&mut b, 0);
                    meta::set_bitmap_bit(&mut b, 1);
                }
                meta::seal(&mut b);
                buf.extend_from_slice(&b);
            }
            meta::write_block(dev, g.bitmap_start + i, &buf)?;
            i += n;
            progress(FormatProgress {
                done_blocks: i,
                total_blocks: total,
            });
        }
        for (offset, tree) in [(0, Tree::Exceptions), (1, Tree::Snapshots)] {
            let mut b = vec![0u8; BLOCK];
            btree::Node::empty_leaf().encode(tree, &mut b);
            meta::seal(&mut b);
            meta::write_block(dev, g.meta_start + offset, &b)?;
        }
        // A zero block at the journal start: no stale commit record can follow the tail.
        meta::write_block(dev, g.journal_start, &[0u8; BLOCK])?;
        let root = RootState {
            exception_root: g.meta_start,
            exception_depth: 0,
            snapshot_root: g.meta_start + 1,
            snapshot_depth: 0,
            next_snap_id: 1,
            data_free: g.data_chunks,
            meta_free: g.meta_blocks - 2,
            reclaim_pass: 1,
            ..RootState::default()
        };
        let mut sb = Superblock {
            sequence: 0,
            uuid,
            geometry: g,
            server_generation: 0,
            cluster_generation: 0,
            clean: true,
            journal_tail_seq: 1,
            journal_tail_pos: 0,
            created: opts.now,
            root,
        };
        meta::flush(dev)?;
        for seq in [0, 1] {
            sb.sequence = seq;
            meta::write_block(dev, sb.slot(), &sb.encode())?;
        }
        meta::flush(dev)?;
        progress(FormatProgress {
            done_blocks: total,
            total_blocks: total,
        });
        Ok(sb)
    }

    /// Opens a store: picks the newest valid superblock, replays committed journal
    /// transactions (after an unclean shutdown), bumps the server generation and marks the
    /// store in use (unclean until `close`).
    ///
    /// In cluster mode (`opts.cluster_generation`), before anything is written: a store
    /// whose recorded cluster generation is higher than the one being activated was
    /// served by a later lineage than the one this activation descends from, and opening
    /// it would serve stale state over it: refused ([`StoreError::ClusterGenerationAhead`]).
    /// Generation 1 is exempt: it descends from no history (every agent of the cluster
    /// started afresh, after waiting out any earlier server), and restarts the count.
    pub fn open(dev: Arc<dyn BlockDevice>, opts: OpenOptions) -> Result<Store> {
        let mut sb = read_superblock(dev.as_ref())?;
        if let Some(generation) = opts.cluster_generation {
            if generation > 1 && sb.cluster_generation > generation {
                return Err(StoreError::ClusterGenerationAhead {
                    store: sb.cluster_generation,
                    activating: generation,
                });
            }
            sb.cluster_generation = generation;
        }
        let unclean = !sb.clean;
        let replay = meta::replay_journal(dev.as_ref(), &sb)?;
        sb.root = replay.root;
        sb.journal_tail_pos = replay.tail_pos;
        sb.journal_tail_seq = replay.tail_seq;
        sb.server_generation += 1;
        let mut meta = Meta::new(dev, sb, opts.cache_blocks);
        meta.stats.transactions_replayed = replay.transactions;
        meta.write_superblock(false)?;
        let mut store = Store {
            meta,
            snaps: BTreeMap::new(),
            live: BTreeSet::new(),
            names: HashMap::new(),
            unclean,
            replayed: replay.transactions,
            reclaim_pending: BTreeSet::new(),
            usage_counter: usage::UsageCounter::unseeded(),
        };
        store.load_snapshots()?;
        Ok(store)
    }

    fn load_snapshots(&mut self) -> Result<()> {
        let mut rows = Vec::new();
        btree::visit_forward(&mut self.meta, Tree::Snapshots, Key::MIN, &mut |k, v| {
            rows.push((k, v.to_vec()));
            true
        })?;
        for (k, v) in rows {
            let rec = SnapshotRecord::decode(self.meta.root.snapshot_root, k, &v)?;
            if rec.id.0 >= self.meta.root.next_snap_id {
                return Err(StoreError::CorruptMetadata {
                    block: self.meta.root.snapshot_root,
                    area: "snapshot table",
                    what: format!(
                        "snapshot id {} is not below the id counter {}",
                        rec.id, self.meta.root.next_snap_id
                    ),
                });
            }
            self.index(&rec);
            self.snaps.insert(rec.id, rec);
        }
        Ok(())
    }

    fn index(&mut self, rec: &SnapshotRecord) {
        if rec.pending_pass != 0 && rec.state != SnapState::Live {
            self.reclaim_pending.insert(rec.id);
        } else {
            self.reclaim_pending.remove(&rec.id);
        }
        match rec.state {
            SnapState::Live => {
                self.live.insert(rec.id);
                self.names.insert(rec.name.clone(), rec.id);
            }
            SnapState::Invalid { .. } => {
                self.live.remove(&rec.id);
                self.names.insert(rec.name.clone(), rec.id);
            }
            SnapState::Deleting => {
                self.live.remove(&rec.id);
                if self.names.get(&rec.name) == Some(&rec.id) {
                    self.names.remove(&rec.name);
                }
            }
        }
    }

    /// True if the store was not closed cleanly before this open.
    pub fn was_unclean(&self) -> bool {
        self.unclean
    }

    /// Journal transactions replayed by this open.
    pub fn transactions_replayed(&self) -> u64 {
        self.replayed
    }

    /// Where everything lives on the device.
    pub fn geometry(&self) -> &Geometry {
        &self.meta.geo
    }

    /// The superblock as last written.
    pub fn superblock(&self) -> &Superblock {
        &self.meta.sb
    }

    /// Commit, journal and cache counters.
    pub fn meta_stats(&self) -> MetaStats {
        self.meta.stats
    }

    /// Blocks currently held by the metadata cache.
    pub fn cache_blocks(&self) -> usize {
        self.meta.cache_len()
    }

    /// Byte offset of store chunk `store_chunk` on the store device (for the data path).
    pub fn chunk_offset(&self, store_chunk: u64) -> u64 {
        self.meta.geo.chunk_offset(store_chunk)
    }

    /// The store device (shared with the data path).
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.meta.dev
    }

    /// Data chunks free and not reserved for a copy in flight (chunks freed by the running
    /// transaction count: `reserve_chunk` commits to make them usable).
    pub fn free_chunks(&self) -> u64 {
        self.meta
            .root
            .data_free
            .saturating_sub(self.meta.reserved().len() as u64)
    }

    /// The figures `csnap-server check` and status print.
    pub fn info(&self) -> StoreInfo {
        let g = &self.meta.geo;
        StoreInfo {
            uuid: uuid_string(&self.meta.sb.uuid),
            chunk_size: g.chunk_size,
            origin_size: g.origin_size,
            origin_chunks: g.origin_chunks(),
            data_chunks: g.data_chunks,
            free_chunks: self.free_chunks(),
            meta_blocks: g.meta_blocks,
            free_meta_blocks: self.meta.root.meta_free,
            server_generation: self.meta.sb.server_generation,
            snapshots: self
                .snaps
                .values()
                .filter(|s| s.state != SnapState::Deleting)
                .count(),
        }
    }

    // ---- guards ----

    /// Runs a mutating operation; failures that may have left memory and disk apart poison
    /// the store (a reopen recovers from the journal).
    fn mutate<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.meta.check_usable()?;
        if self.meta.tx_len() > TX_SOFT_LIMIT {
            self.meta.commit()?;
        }
        let result = f(self);
        if let Err(e) = &result {
            if matches!(
                e,
                StoreError::Io { .. }
                    | StoreError::CorruptMetadata { .. }
                    | StoreError::Refused(Refusal::MetadataFull { .. })
            ) {
                self.meta.poison(e);
            }
        }
        result
    }

    /// Most node blocks `inserts` btree insertions of new keys can allocate: each may split
    /// every level of the deeper tree and add a root (depth + 2), and the tree may grow a
    /// level on the way (+1 each, conservatively).
    fn meta_blocks_for(&self, inserts: u64) -> u64 {
        let depth = self
            .meta
            .root
            .exception_depth
            .max(self.meta.root.snapshot_depth) as u64;
        inserts.saturating_mul(depth + 3)
    }

    /// Fails early, before changing anything, if an operation that inserts up to `inserts`
    /// new keys might run out of node blocks midway or eat into the reserve kept for the
    /// operations that free space. Only growing operations call this: delete, invalidate
    /// and reclaim only rewrite keys in place or remove them, which never allocates a node,
    /// so they succeed however full the node area is.
    fn ensure_meta_room(&self, inserts: u64) -> Result<()> {
        if self.meta.root.meta_free < META_RESERVE + self.meta_blocks_for(inserts) {
            return Err(StoreError::Refused(Refusal::MetadataFull {
                blocks: self.meta.geo.meta_blocks,
            }));
        }
        Ok(())
    }

    /// Node-area figures: blocks in all, free, and how many key insertions surely fit (the
    /// request engine frees space by its store-full policy before starting a copy whose
    /// records might not fit).
    pub fn metadata_space(&self) -> MetadataSpace {
        let free = self.meta.root.meta_free;
        MetadataSpace {
            blocks: self.meta.geo.meta_blocks,
            free_blocks: free,
            insert_room: free.saturating_sub(META_RESERVE) / self.meta_blocks_for(1),
            snapshot_room: (self.meta.geo.meta_blocks / 2)
                .saturating_mul(Tree::Snapshots.leaf_capacity() as u64)
                .saturating_sub(self.snaps.len() as u64),
        }
    }

    fn check_chunk(&self, chunk: u64) -> Result<()> {
        let origin_chunks = self.meta.geo.origin_chunks();
        if chunk >= origin_chunks {
            return Err(StoreError::Refused(Refusal::ChunkOutOfRange {
                chunk,
                origin_chunks,
            }));
        }
        Ok(())
    }

    fn check_live(&self, id: SnapId) -> Result<()> {
        match self.snaps.get(&id).map(|r| &r.state) {
            Some(SnapState::Live) => Ok(()),
            Some(SnapState::Invalid { .. }) => Err(StoreError::Refused(Refusal::NotLive(id))),
            _ => Err(StoreError::Refused(Refusal::NoSuchSnapshot(id))),
        }
    }

    fn any_live(&self, first: SnapId, last: SnapId) -> bool {
        first <= last && self.live.range(first..=last).next().is_some()
    }

    fn any_live_except(&self, first: SnapId, last: SnapId, except: SnapId) -> bool {
        first <= last && self.live.range(first..=last).any(|&id| id != except)
    }

    // ---- snapshots ----

    /// Listed snapshots (live and invalid, not deleting), in id order.
    pub fn snapshots(&self) -> Vec<SnapshotRecord> {
        self.snaps
            .values()
            .filter(|r| r.state != SnapState::Deleting)
            .cloned()
            .collect()
    }

    /// A listed snapshot by id.
    pub fn snapshot(&self, id: SnapId) -> Option<&SnapshotRecord> {
        self.snaps
            .get(&id)
            .filter(|r| r.state != SnapState::Deleting)
    }

    /// A listed snapshot by name.
    pub fn snapshot_by_name(&self, name: &str) -> Option<&SnapshotRecord> {
        self.names.get(name).and_then(|id| self.snapshot(*id))
    }

    /// Ids of live snapshots, ascending.
    pub fn live_snapshots(&self) -> impl Iterator<Item = SnapId> + '_ {
        self.live.iter().copied()
    }

    fn put_snapshot(&mut self, rec: SnapshotRecord) -> Result<()> {
        btree::insert(
            &mut self.meta,
            Tree::Snapshots,
            Key::new(rec.id.0, 0),
            &rec.encode(),
        )?;
        self.index(&rec);
        self.snaps.insert(rec.id, rec);
        Ok(())
    }

    /// Creates a live snapshot with the next id and returns it.
    pub fn create_snapshot(&mut self, name: &str, ctime: u64) -> Result<SnapshotRecord> {
        self.create_snapshot_with_token(name, ctime, 0)
    }

    /// `create_snapshot`, recording the creator's request token (its low 40 bits).
    pub fn create_snapshot_with_token(
        &mut self,
        name: &str,
        ctime: u64,
        token: u64,
    ) -> Result<SnapshotRecord> {
        check_snapshot_name(name)?;
        if self.names.contains_key(name) {
            return Err(StoreError::Refused(Refusal::NameTaken(name.to_owned())));
        }
        self.ensure_meta_room(1)?;
        self.mutate(|s| {
            let id = s.meta.root.next_snap_id;
            s.meta.root.next_snap_id += 1;
            let rec = SnapshotRecord {
                id: SnapId(id),
                name: name.to_owned(),
                ctime,
                state: SnapState::Live,
                pending_pass: 0,
                create_token: token & CREATE_TOKEN_MASK,
            };
            s.put_snapshot(rec.clone())?;
            Ok(rec)
        })
    }

    /// The reclaim pass that will free what a snapshot deleted or invalidated now held.
    fn pass_for_new_garbage(&self) -> u64 {
        let r = &self.meta.root;
        if r.reclaim_active != 0 {
            r.reclaim_pass + 1
        } else {
            r.reclaim_pass
        }
    }

    /// Deletes a snapshot (live or invalid): it leaves the list now; `reclaim_step` frees
    /// its space later.
    pub fn delete_snapshot(&mut self, id: SnapId) -> Result<()> {
        let Some(rec) = self.snapshot(id).cloned() else {
            return Err(StoreError::Refused(Refusal::NoSuchSnapshot(id)));
        };
        // No room check: rewriting an existing row allocates nothing (see ensure_meta_room).
        self.mutate(|s| {
            let pending_pass = s.pass_for_new_garbage();
            s.put_snapshot(SnapshotRecord {
                state: SnapState::Deleting,
                pending_pass,
                ..rec
            })
        })
    }

    /// Marks a live snapshot invalid (store-full policy); it stays listed with the reason.
    pub fn invalidate_snapshot(&mut self, id: SnapId, reason: &str) -> Result<()> {
        self.check_live(id)?;
        let Some(rec) = self.snaps.get(&id).cloned() else {
            return Err(StoreError::Refused(Refusal::NoSuchSnapshot(id)));
        };
        // No room check: rewriting an existing row allocates nothing (see ensure_meta_room).
        tracing::error!(snapshot = id.0, name = %rec.name, reason, "snapshot invalidated");
        self.mutate(|s| {
            let pending_pass = s.pass_for_new_garbage();
            s.put_snapshot(SnapshotRecord {
                state: SnapState::Invalid {
                    reason: reason.to_owned(),
                },
                pending_pass,
                ..rec
            })
        })
    }

    // ---- exception records ----

    /// Stores a record at a key that holds none.
    fn put_record(&mut self, r: &ExceptionRecord) -> Result<()> {
        btree::insert(&mut self.meta, Tree::Exceptions, r.key(), &r.encode())?;
        self.usage_counter.inserted(r.key(), r.first, r.last);
        Ok(())
    }

    /// Rewrites a stored record's flags (`fill`, `shared`); its run is unchanged, and so is
    /// usage.
    fn rewrite_record(&mut self, r: &ExceptionRecord) -> Result<()> {
        btree::insert(&mut self.meta, Tree::Exceptions, r.key(), &r.encode())
    }

    fn remove_record(&mut self, r: &ExceptionRecord) -> Result<()> {
        if btree::remove(&mut self.meta, Tree::Exceptions, r.key())? {
            self.usage_counter.removed(r.key(), r.first, r.last);
        }
        Ok(())
    }

    /// The record of `chunk` whose run contains `id`.
    fn lookup(&mut self, chunk: u64, id: SnapId) -> Result<Option<ExceptionRecord>> {
        let found = btree::get_le(&mut self.meta, Tree::Exceptions, Key::new(chunk, id.0))?;
        let record = found
            .map(|(k, v)| ExceptionRecord::decode(k, &v))
            .filter(|r| r.chunk == chunk && r.last >= id);
        if let Some(r) = &record {
            if !self.meta.geo.is_data_chunk(r.store_chunk) {
                return Err(StoreError::CorruptMetadata {
                    block: self.meta.root.exception_root,
                    area: "exception tree",
                    what: format!(
                        "chunk {chunk} run {}..={} names store chunk {}, outside the data area",
                        r.first, r.last, r.store_chunk
                    ),
                });
            }
        }
        Ok(record)
    }

    /// All records of one origin chunk, ascending by first id.
    pub fn chunk_records(&mut self, chunk: u64) -> Result<Vec<ExceptionRecord>> {
        let mut out = Vec::new();
        btree::visit_forward(
            &mut self.meta,
            Tree::Exceptions,
            Key::new(chunk, 0),
            &mut |k, v| {
                if k.hi != chunk {
                    return false;
                }
                out.push(ExceptionRecord::decode(k, v));
                true
            },
        )?;
        Ok(out)
    }

    /// The highest FILL record of `chunk` (if any) and the records above it, ascending.
    fn records_above_fill(
        &mut self,
        chunk: u64,
    ) -> Result<(Option<ExceptionRecord>, Vec<ExceptionRecord>)> {
        let mut fill = None;
        let mut above = Vec::new();
        btree::visit_backward(
            &mut self.meta,
            Tree::Exceptions,
            Key::new(chunk, u64::MAX),
            &mut |k, v| {
                if k.hi != chunk {
                    return false;
                }
                let r = ExceptionRecord::decode(k, v);
                if r.fill {
                    fill = Some(r);
                    return false;
                }
                above.push(r);
                true
            },
        )?;
        above.reverse();
        Ok((fill, above))
    }

    /// Runs of ids of `chunk` that no record covers and that hold a live snapshot, plus the
    /// records scanned above the highest FILL record.
    fn uncovered_runs(&mut self, chunk: u64) -> Result<(Vec<IdRun>, Vec<ExceptionRecord>)> {
        let Some(&max_live) = self.live.last() else {
            return Ok((Vec::new(), Vec::new()));
        };
        let (fill, above) = self.records_above_fill(chunk)?;
        let mut runs = Vec::new();
        let mut low = fill.map_or(SnapId::FIRST, |f| f.last.next());
        for r in &above {
            if low < r.first && self.any_live(low, r.first.prev()) {
                runs.push((low, r.first.prev()));
            }
            low = r.last.next();
        }
        if self.any_live(low, max_live) {
            runs.push((low, max_live));
        }
        Ok((runs, above))
    }

    /// The oldest live snapshot that still reads origin chunk `chunk` from the origin;
    /// `None` iff the chunk is unique (an origin write needs no copy-out).
    pub fn oldest_sharing_origin(&mut self, chunk: u64) -> Result<Option<SnapId>> {
        self.check_chunk(chunk)?;
        let (runs, _) = self.uncovered_runs(chunk)?;
        Ok(runs
            .first()
            .and_then(|(a, b)| self.live.range(*a..=*b).next().copied()))
    }

    /// Reserves a free store chunk for a copy in flight (memory only until recorded).
    pub fn reserve_chunk(&mut self) -> Result<u64> {
        self.meta.check_usable()?;
        if self.meta.data_available() == 0 && self.meta.quarantined() > 0 {
            // Chunks freed by the running transaction become usable once it commits.
            self.mutate(|s| s.meta.commit())?;
        }
        self.meta.reserve_data()
    }

    /// Returns an unused reservation.
    pub fn release_chunk(&mut self, store_chunk: u64) -> Result<()> {
        self.meta.release_reserved(store_chunk)
    }

    /// Records that origin chunk `chunk` was copied to the reserved `store_chunk`: one
    /// copy-out serving every live snapshot that read the chunk from the origin. Returns
    /// false (and releases the reservation) if none needs it any more.
    pub fn record_copy_out(&mut self, chunk: u64, store_chunk: u64) -> Result<bool> {
        self.check_chunk(chunk)?;
        if !self.meta.reserved().contains(&store_chunk) {
            return Err(StoreError::Refused(Refusal::NotReserved(store_chunk)));
        }
        self.meta.check_usable()?;
        // One new record per run (the rest are flag rewrites in place).
        let (runs, _) = self.uncovered_runs(chunk)?;
        if !runs.is_empty() {
            self.ensure_meta_room(runs.len() as u64)?;
        }
        self.mutate(|s| {
            let (runs, above) = s.uncovered_runs(chunk)?;
            if runs.is_empty() {
                s.meta.release_reserved(store_chunk)?;
                return Ok(false);
            }
            s.meta.claim_reserved(store_chunk)?;
            let shared = runs.len() > 1;
            for (first, last) in &runs {
                s.put_record(&ExceptionRecord {
                    chunk,
                    first: *first,
                    last: *last,
                    store_chunk,
                    fill: true,
                    shared,
                })?;
            }
            // Every live snapshot is covered now: the records above the old FILL point
            // can say so, which keeps the next copy-out check short.
            for r in above {
                s.rewrite_record(&ExceptionRecord { fill: true, ..r })?;
            }
            Ok(true)
        })
    }

    /// Is `r` used by live snapshot `id` alone?
    fn exclusive(&mut self, r: &ExceptionRecord, id: SnapId) -> Result<bool> {
        if self.any_live_except(r.first, r.last, id) {
            return Ok(false);
        }
        if !r.shared {
            return Ok(true);
        }
        let siblings = self.chunk_records(r.chunk)?;
        Ok(!siblings.iter().any(|o| {
            o.store_chunk == r.store_chunk
                && o.first != r.first
                && self.any_live_except(o.first, o.last, id)
        }))
    }

    /// Where live snapshot `id` reads origin chunk `chunk`.
    pub fn snapshot_chunk(&mut self, id: SnapId, chunk: u64) -> Result<ChunkSource> {
        self.check_chunk(chunk)?;
        self.check_live(id)?;
        self.meta.check_usable()?;
        match self.lookup(chunk, id)? {
            None => Ok(ChunkSource::Origin),
            Some(r) => {
                let exclusive = self.exclusive(&r, id)?;
                Ok(ChunkSource::Store {
                    store_chunk: r.store_chunk,
                    exclusive,
                })
            }
        }
    }

    /// Records an exception for exactly snapshot `id` on `chunk` at the reserved
    /// `store_chunk` (already holding the chunk as `id` saw it): the unshare step of a
    /// snapshot write. The run `id` was in is split around it; parts no live snapshot uses
    /// are dropped and a store chunk left unused is freed.
    pub fn record_snapshot_exception(
        &mut self,
        id: SnapId,
        chunk: u64,
        store_chunk: u64,
    ) -> Result<()> {
        self.check_chunk(chunk)?;
        self.check_live(id)?;
        if !self.meta.reserved().contains(&store_chunk) {
            return Err(StoreError::Refused(Refusal::NotReserved(store_chunk)));
        }
        // The split puts back up to three records for the one it removes.
        self.ensure_meta_room(3)?;
        self.mutate(|s| {
            let old = s.lookup(chunk, id)?;
            s.meta.claim_reserved(store_chunk)?;
            let Some(old) = old else {
                return s.put_record(&ExceptionRecord {
                    chunk,
                    first: id,
                    last: id,
                    store_chunk,
                    fill: false,
                    shared: false,
                });
            };
            let left = (old.first < id && s.any_live(old.first, id.prev()))
                .then_some((old.first, id.prev()));
            let right =
                (id < old.last && s.any_live(id.next(), old.last)).then_some((id.next(), old.last));
            let pieces = usize::from(left.is_some()) + usize::from(right.is_some());
            let shared = old.shared || pieces == 2;
            s.remove_record(&old)?;
            for (first, last) in left.into_iter().chain(right) {
                s.put_record(&ExceptionRecord {
                    first,
                    last,
                    shared,
                    ..old
                })?;
            }
            s.put_record(&ExceptionRecord {
                chunk,
                first: id,
                last: id,
                store_chunk,
                fill: old.fill,
                shared: false,
            })?;
            if pieces == 0 {
                let still_used = old.shared
                    && s.chunk_records(chunk)?
                        .iter()
                        .any(|o| o.store_chunk == old.store_chunk);
                if !still_used {
                    s.meta.free_data(old.store_chunk)?;
                }
            }
            Ok(())
        })
    }

    // ---- reclaim ----

    fn reclaim_wanted(&self) -> bool {
        !self.reclaim_pending.is_empty()
    }

    /// Where background reclaim is: the origin chunk its pass goes on from (0 before a
    /// pass started) and the snapshots it gives space back for; `None` with no work.
    pub fn reclaim_position(&self) -> Option<(u64, Vec<SnapId>)> {
        let root = &self.meta.root;
        if root.reclaim_active == 0 && !self.reclaim_wanted() {
            return None;
        }
        let position = if root.reclaim_active != 0 {
            root.reclaim_cursor
        } else {
            0
        };
        Some((position, self.reclaim_pending.iter().copied().collect()))
    }

    /// Background delete: examines about `budget` exception records from where the last
    /// step stopped, drops the ones no live snapshot uses and frees store chunks left
    /// unused. When a pass over the whole tree completes, deleted snapshots it covered leave
    /// the snapshot table. The cursor is part of the committed root, so after a crash the
    /// pass resumes (or restarts) from the last commit.
    pub fn reclaim_step(&mut self, budget: usize) -> Result<ReclaimProgress> {
        let mut progress = ReclaimProgress::default();
        self.mutate(|s| {
            if s.meta.root.reclaim_active == 0 {
                if !s.reclaim_wanted() {
                    progress.done = true;
                    return Ok(());
                }
                s.meta.root.reclaim_active = 1;
                s.meta.root.reclaim_cursor = 0;
            }
            while progress.records_examined < budget.max(1) as u64 {
                let cursor = s.meta.root.reclaim_cursor;
                let mut next = None;
                btree::visit_forward(
                    &mut s.meta,
                    Tree::Exceptions,
                    Key::new(cursor, 0),
                    &mut |k, _| {
                        next = Some(k.hi);
                        false
                    },
                )?;
                let Some(chunk) = next else {
                    s.finish_reclaim_pass()?;
                    progress.done = !s.reclaim_wanted();
                    return Ok(());
                };
                s.reclaim_chunk(chunk, &mut progress)?;
                s.meta.root.reclaim_cursor = chunk + 1;
            }
            Ok(())
        })?;
        Ok(progress)
    }

    fn reclaim_chunk(&mut self, chunk: u64, progress: &mut ReclaimProgress) -> Result<()> {
        let records = self.chunk_records(chunk)?;
        progress.records_examined += records.len() as u64;
        let dead: Vec<bool> = records
            .iter()
            .map(|r| !self.any_live(r.first, r.last))
            .collect();
        if !dead.iter().any(|d| *d) {
            return Ok(());
        }
        // References per store chunk among the records that stay.
        let mut remaining: HashMap<u64, usize> = HashMap::new();
        for r in &records {
            *remaining.entry(r.store_chunk).or_default() += 1;
        }
        for (r, is_dead) in records.iter().zip(&dead) {
            if !is_dead {
                continue;
            }
            if self.meta.tx_len() > TX_SOFT_LIMIT {
                self.meta.commit()?;
            }
            // Removing a record never allocates a node: reclaim works on a full node area.
            self.remove_record(r)?;
            progress.records_removed += 1;
            let left = remaining.entry(r.store_chunk).or_default();
            *left -= 1;
            if *left == 0 {
                self.meta.free_data(r.store_chunk)?;
                progress.chunks_freed += 1;
            }
        }
        // A store chunk now named by a single record is no longer shared.
        for (r, is_dead) in records.iter().zip(&dead) {
            if !is_dead && r.shared && remaining.get(&r.store_chunk) == Some(&1) {
                self.rewrite_record(&ExceptionRecord {
                    shared: false,
                    ..*r
                })?;
            }
        }
        Ok(())
    }

    fn finish_reclaim_pass(&mut self) -> Result<()> {
        let completed = self.meta.root.reclaim_pass;
        let finished: Vec<SnapshotRecord> = self
            .reclaim_pending
            .iter()
            .filter_map(|id| self.snaps.get(id))
            .filter(|r| {
                r.state != SnapState::Live && r.pending_pass != 0 && r.pending_pass <= completed
            })
            .cloned()
            .collect();
        for rec in finished {
            if self.meta.tx_len() > TX_SOFT_LIMIT {
                self.meta.commit()?;
            }
            if rec.state == SnapState::Deleting {
                btree::remove(&mut self.meta, Tree::Snapshots, Key::new(rec.id.0, 0))?;
                self.snaps.remove(&rec.id);
                self.reclaim_pending.remove(&rec.id);
            } else {
                self.put_snapshot(SnapshotRecord {
                    pending_pass: 0,
                    ..rec
                })?;
            }
        }
        self.meta.root.reclaim_pass += 1;
        self.meta.root.reclaim_active = 0;
        self.meta.root.reclaim_cursor = 0;
        Ok(())
    }

    /// Snapshots' store usage: for each listed snapshot, how many chunks it reads from the
    /// store. A full scan of the exception tree (an admin operation).
    pub fn usage(&mut self) -> Result<BTreeMap<SnapId, u64>> {
        // Each snapshot is in at most one record per chunk, so counting the records whose
        // run holds it is a difference-array sweep over record boundaries.
        let mut delta: BTreeMap<SnapId, i64> = BTreeMap::new();
        btree::visit_forward(&mut self.meta, Tree::Exceptions, Key::MIN, &mut |k, v| {
            let r = ExceptionRecord::decode(k, v);
            *delta.entry(r.first).or_default() += 1;
            *delta.entry(r.last.next()).or_default() -= 1;
            true
        })?;
        let mut out = BTreeMap::new();
        let mut running = 0i64;
        let mut points = delta.into_iter().peekable();
        for id in self.snaps.keys().copied() {
            while let Some((at, d)) = points.peek() {
                if *at > id {
                    break;
                }
                running += d;
                points.next();
            }
            out.insert(id, running.max(0) as u64);
        }
        Ok(out)
    }

    /// Advances the seeding walk of the usage counter (see `usage.rs`) by at most `budget`
    /// exception records (at least one). Read-only on the store. Returns true once the
    /// usage figures are exact (then it costs nothing).
    pub fn usage_step(&mut self, budget: usize) -> Result<bool> {
        let Some(from) = self.usage_counter.cursor() else {
            return Ok(true);
        };
        let budget = budget.max(1);
        let mut runs = Vec::with_capacity(budget.min(4096));
        let mut next = None;
        btree::visit_forward(&mut self.meta, Tree::Exceptions, from, &mut |k, v| {
            if runs.len() == budget {
                next = Some(k);
                return false;
            }
            let r = ExceptionRecord::decode(k, v);
            runs.push((r.first, r.last));
            true
        })?;
        self.usage_counter.walked_over(&runs, next);
        Ok(next.is_none())
    }

    /// Per-snapshot usage of the listed snapshots from the usage counter (no tree walk),
    /// and whether it is exact yet (the seeding walk is done).
    pub fn usage_figures(&self) -> (BTreeMap<SnapId, u64>, bool) {
        (
            self.usage_counter.figures(self.snaps.keys().copied()),
            self.usage_counter.is_exact(),
        )
    }

    /// Is the usage counter's seeding walk done (figures exact)?
    pub fn usage_figures_exact(&self) -> bool {
        self.usage_counter.is_exact()
    }

    /// Usage of one snapshot from the usage counter.
    pub fn usage_of(&self, id: SnapId) -> u64 {
        self.usage_counter.of(id)
    }

    /// Exception records the usage counter's seeding walk has visited so far.
    pub fn usage_records_walked(&self) -> u64 {
        self.usage_counter.walked()
    }

    // ---- durability ----

    /// Makes every change so far durable: flush (copied-out data first), then a journal
    /// commit record, then flush.
    pub fn commit(&mut self) -> Result<()> {
        self.meta.commit()
    }

    /// Starts a commit whose journal I/O the caller runs on any thread (see
    /// [`CommitIo`]); then [`Store::finish_commit`]. `None`: nothing to commit, or
    /// committed here (when the journal needs a checkpoint after it).
    pub fn begin_commit(&mut self) -> Result<Option<CommitIo>> {
        self.meta.begin_commit()
    }

    /// Completes the commit [`Store::begin_commit`] started, waiting for its I/O if needed.
    pub fn finish_commit(&mut self) -> Result<()> {
        self.meta.finish_commit()
    }

    /// Commits, checkpoints the journal and marks the store clean.
    pub fn close(mut self) -> Result<()> {
        self.meta.close()
    }

    /// Runs the consistency checker over the whole store.
    pub fn check(&mut self) -> Result<CheckReport> {
        check::run(self)
    }
}
