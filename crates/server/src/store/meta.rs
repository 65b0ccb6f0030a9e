//! The metadata layer: a bounded block cache over the store device, the physical block
//! journal (transactions of whole 4 KiB blocks, checksummed, replayed in order on open), the
//! superblock writes that checkpoint it, and the two allocators (metadata blocks and data
//! chunks) kept in checksummed bitmap blocks.
//!
//! Rules that keep crashes harmless:
//! * A block changed in the running transaction ("tx-dirty") is never written to its home
//!   location before its transaction is committed to the journal; it is pinned in the cache.
//! * A committed block may be written home at any time (replay rewrites the same or newer
//!   contents); the superblock's journal tail only moves after every committed block is home
//!   and flushed (a checkpoint).
//! * A data chunk freed in the running transaction is quarantined until that transaction is
//!   committed, so its old contents stay intact for as long as a crash could bring back the
//!   exceptions that point at it.
//! * Reservations (chunks handed out for a copy in flight) are in memory only: after a crash
//!   they are simply free again.

use super::device::{BlockDevice, SectorBuf};
use super::error::{Result, StoreError};
use super::format::*;
use crate::engine::Refusal;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// Most blocks one journal transaction can carry (entries that fit in the commit record).
pub(super) const MAX_TX_BLOCKS: usize = (BLOCK - JOURNAL_HEADER) / JOURNAL_ENTRY;
/// Start a new transaction before a public operation once this many blocks are dirty; no
/// single operation dirties more than `MAX_TX_BLOCKS - TX_SOFT_LIMIT` blocks.
pub(super) const TX_SOFT_LIMIT: usize = 160;
const JOURNAL_HEADER: usize = 160;
const JOURNAL_ENTRY: usize = 16;
/// The smallest cache that always has room for a full transaction plus a btree path.
pub(super) const MIN_CACHE_BLOCKS: usize = 2 * MAX_TX_BLOCKS + 64;

/// Which bitmap: metadata node blocks or data chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Space {
    Meta,
    Data,
}

/// Counters for benchmarks and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaStats {
    /// Journal commits.
    pub commits: u64,
    /// Blocks written to the journal.
    pub journal_blocks_written: u64,
    /// Checkpoints (journal blocks written home, superblock updated).
    pub checkpoints: u64,
    /// Block cache hits.
    pub cache_hits: u64,
    /// Block cache misses (device reads).
    pub cache_misses: u64,
    /// Transactions replayed from the journal at open.
    pub transactions_replayed: u64,
}

struct CacheEntry {
    data: Box<[u8]>,
    tick: u64,
    /// The caller's structure check ([`Meta::read_checked`]) passed on this data: cleared
    /// whenever the block is loaded or handed out for writing.
    checked: bool,
}

/// Hashes a block number for the metadata cache by one multiplication (Fibonacci
/// hashing), its bytes folded onto themselves reversed (the map picks buckets by the low
/// bits, which a product alone takes from the number's low bits only): block numbers are
/// not chosen by a peer, and SipHash on every node read showed in look-up-heavy profiles.
#[derive(Default)]
struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0 ^ self.0.swap_bytes()
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub(super) struct Meta {
    pub dev: Arc<dyn BlockDevice>,
    pub geo: Geometry,
    /// The superblock as last written.
    pub sb: Superblock,
    /// The root state including uncommitted changes.
    pub root: RootState,
    committed_root: RootState,
    cache: HashMap<u64, CacheEntry, BuildHasherDefault<BlockHasher>>,
    lru: BTreeMap<u64, u64>,
    tick: u64,
    cache_capacity: usize,
    tx_dirty: BTreeSet<u64>,
    ckpt_dirty: HashSet<u64>,
    journal_head_pos: u64,
    journal_head_seq: u64,
    journal_used: u64,
    reserved: HashSet<u64>,
    quarantine: HashSet<u64>,
    /// The commit begun by [`Meta::begin_commit`] whose journal I/O may still be running.
    pending: Option<PendingCommit>,
    /// Blocks of the pending commit: pinned like tx-dirty ones until it is durable.
    committing: HashSet<u64>,
    poisoned: Option<String>,
    pub stats: MetaStats,
}

/// A transaction captured by [`Meta::begin_commit`]: what [`Meta::finish_commit`] applies
/// once its journal I/O is durable.
struct PendingCommit {
    blocks: Vec<u64>,
    root: RootState,
    /// Data chunks freed in this transaction: reusable once it is durable.
    quarantined: Vec<u64>,
    /// Journal blocks it takes (commit record plus one per block).
    used: u64,
    outcome: Arc<CommitOutcome>,
}

/// The journal I/O of a pending commit, shared by its [`CommitIo`] and
/// [`Meta::finish_commit`]: whichever comes first runs it, the other waits for it or takes
/// its result (so a commit whose `CommitIo` was dropped or not run yet still completes).
struct CommitOutcome {
    state: std::sync::Mutex<CommitState>,
    ready: std::sync::Condvar,
}

enum CommitState {
    /// Contiguous journal runs: (first block on the device, images).
    Unstarted(Vec<(u64, SectorBuf)>),
    Running,
    Done(Result<()>),
    Taken,
}

impl CommitOutcome {
    fn lock(&self) -> std::sync::MutexGuard<'_, CommitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the I/O unless someone else started it. Blocking.
    fn run(&self, dev: &dyn BlockDevice, flush_data_first: bool) {
        let runs = {
            let mut state = self.lock();
            match std::mem::replace(&mut *state, CommitState::Running) {
                CommitState::Unstarted(runs) => runs,
                other => {
                    *state = other;
                    return;
                }
            }
        };
        let result = write_journal(dev, &runs, flush_data_first);
        *self.lock() = CommitState::Done(result);
        self.ready.notify_all();
    }

    /// The I/O's result, running it here if nobody started it; waits while it runs.
    fn result(&self, dev: &dyn BlockDevice) -> Result<()> {
        self.run(dev, true);
        let mut state = self.lock();
        loop {
            match std::mem::replace(&mut *state, CommitState::Taken) {
                CommitState::Done(result) => return result,
                CommitState::Running => {
                    *state = CommitState::Running;
                    state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                _ => {
                    return Err(StoreError::Poisoned(
                        "a journal commit's result was taken twice".into(),
                    ))
                }
            }
        }
    }
}

/// Flush the device (so the copied-out data the transaction points at is stable first),
/// write the commit record and the blocks, flush again.
fn write_journal(
    dev: &dyn BlockDevice,
    runs: &[(u64, SectorBuf)],
    flush_data_first: bool,
) -> Result<()> {
    if flush_data_first {
        flush(dev)?;
    }
    for (block, data) in runs {
        write_block(dev, *block, data)?;
    }
    flush(dev)
}

/// The journal I/O of a commit begun by [`Meta::begin_commit`]. It owns images of the
/// blocks, so the metadata can go on changing (the next transaction) while it runs on
/// another thread. Dropped unrun, [`Meta::finish_commit`] runs it.
pub struct CommitIo {
    dev: Arc<dyn BlockDevice>,
    outcome: Arc<CommitOutcome>,
}

impl CommitIo {
    /// Runs the I/O (blocking); its result reaches [`Meta::finish_commit`].
    pub fn run(self) {
        self.outcome.run(self.dev.as_ref(), true);
    }

    /// Runs the I/O without the first flush: only when every data write the transaction
    /// points at is known to be stable already (a flush that started after it completed
    /// has succeeded, see [`super::FlushTracked`]).
    pub fn run_data_stable(self) {
        self.outcome.run(self.dev.as_ref(), false);
    }
}

fn io_err(
    op: &'static str,
    dev: &dyn BlockDevice,
    offset: u64,
) -> impl FnOnce(std::io::Error) -> StoreError {
    let device = dev.name();
    move |source| StoreError::Io {
        op,
        device,
        offset,
        source,
    }
}

pub(super) fn read_block(dev: &dyn BlockDevice, block: u64) -> Result<Box<[u8]>> {
    let mut buf = vec![0u8; BLOCK].into_boxed_slice();
    dev.read_at(&mut buf, block * BLOCK_U64)
        .map_err(io_err("reading", dev, block * BLOCK_U64))?;
    Ok(buf)
}

pub(super) fn write_block(dev: &dyn BlockDevice, block: u64, data: &[u8]) -> Result<()> {
    dev.write_at(data, block * BLOCK_U64)
        .map_err(io_err("writing", dev, block * BLOCK_U64))
}

pub(super) fn flush(dev: &dyn BlockDevice) -> Result<()> {
    dev.flush().map_err(io_err("flushing", dev, 0))
}

/// What replaying the journal found.
pub(super) struct Replay {
    pub root: RootState,
    pub tail_pos: u64,
    pub tail_seq: u64,
    pub transactions: u64,
}

/// The identity a journal record carries so records from an earlier format of the same
/// device never match.
fn journal_id(uuid: &[u8; 16]) -> u64 {
    get_u64(uuid, 0)
}

/// Replays committed transactions from the superblock's journal tail, in sequence order,
/// writing each block home; stops at the first record that is missing, out of sequence or
/// fails a checksum (a torn tail). Flushes before returning.
pub(super) fn replay_journal(dev: &dyn BlockDevice, sb: &Superblock) -> Result<Replay> {
    let g = &sb.geometry;
    let mut pos = sb.journal_tail_pos;
    let mut seq = sb.journal_tail_seq;
    let mut root = sb.root;
    let mut transactions = 0;
    let mut blocks_seen = 0u64;
    'records: while blocks_seen < g.journal_blocks {
        let header = read_block(dev, g.journal_start + pos)?;
        if header[0..8] != JOURNAL_MAGIC
            || get_u32(&header, 8) != block_crc(&header, 8)
            || get_u64(&header, 16) != seq
            || get_u64(&header, 24) != journal_id(&sb.uuid)
        {
            break;
        }
        let count = get_u32(&header, 12) as usize;
        if count > MAX_TX_BLOCKS || count as u64 + 1 > g.journal_blocks {
            break;
        }
        let mut blocks = Vec::with_capacity(count);
        for i in 0..count {
            let at = JOURNAL_HEADER + i * JOURNAL_ENTRY;
            let home = get_u64(&header, at);
            let crc = get_u32(&header, at + 8);
            let slot = (pos + 1 + i as u64) % g.journal_blocks;
            let data = read_block(dev, g.journal_start + slot)?;
            if crc32c::crc32c(&data) != crc {
                break 'records;
            }
            if home < g.bitmap_start || home >= g.meta_start + g.meta_blocks {
                return Err(StoreError::CorruptMetadata {
                    block: g.journal_start + pos,
                    area: "journal",
                    what: format!(
                        "commit record {seq} names home block {home}, outside the bitmap and node areas"
                    ),
                });
            }
            blocks.push((home, data));
        }
        for (home, data) in &blocks {
            write_block(dev, *home, data)?;
        }
        root = RootState::decode(&header[32..32 + ROOT_STATE_LEN]);
        pos = (pos + 1 + count as u64) % g.journal_blocks;
        seq += 1;
        transactions += 1;
        blocks_seen += 1 + count as u64;
    }
    flush(dev)?;
    Ok(Replay {
        root,
        tail_pos: pos,
        tail_seq: seq,
        transactions,
    })
}

impl Meta {
    /// The metadata layer of an opened store whose journal has been replayed and whose
    /// superblock (`sb`) reflects that.
    pub(super) fn new(dev: Arc<dyn BlockDevice>, sb: Superblock, cache_blocks: usize) -> Meta {
        Meta {
            dev,
            geo: sb.geometry,
            root: sb.root,
            committed_root: sb.root,
            journal_head_pos: sb.journal_tail_pos,
            journal_head_seq: sb.journal_tail_seq,
            journal_used: 0,
            sb,
            cache: HashMap::default(),
            lru: BTreeMap::new(),
            tick: 0,
            cache_capacity: cache_blocks.max(MIN_CACHE_BLOCKS),
            tx_dirty: BTreeSet::new(),
            ckpt_dirty: HashSet::new(),
            reserved: HashSet::new(),
            quarantine: HashSet::new(),
            pending: None,
            committing: HashSet::new(),
            poisoned: None,
            stats: MetaStats::default(),
        }
    }

    pub(super) fn check_usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(StoreError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Marks the store unusable after a failure that may have left memory and disk apart.
    pub(super) fn poison(&mut self, err: &StoreError) {
        if self.poisoned.is_none() {
            self.poisoned = Some(err.to_string());
        }
    }

    pub(super) fn tx_len(&self) -> usize {
        self.tx_dirty.len()
    }

    pub(super) fn has_uncommitted(&self) -> bool {
        !self.tx_dirty.is_empty() || self.root != self.committed_root
    }

    // ---- block cache ----

    /// Marks `block` used now. A block used within the last quarter of the cache's size in
    /// accesses keeps its place: the root and upper nodes, read by every look-up, would
    /// otherwise move in the LRU order on each one, and the order stays close enough.
    fn touch(&mut self, block: u64) {
        self.tick += 1;
        let tick = self.tick;
        let recent = (self.cache_capacity / 4) as u64;
        if let Some(entry) = self.cache.get_mut(&block) {
            if tick - entry.tick <= recent {
                return;
            }
            self.lru.remove(&entry.tick);
            entry.tick = tick;
            self.lru.insert(tick, block);
        }
    }

    fn make_room(&mut self) -> Result<()> {
        while self.cache.len() >= self.cache_capacity {
            let victim = self
                .lru
                .values()
                .copied()
                .find(|b| !self.tx_dirty.contains(b) && !self.committing.contains(b));
            let Some(victim) = victim else {
                return Ok(()); // everything pinned: grow past the bound until commit
            };
            if self.ckpt_dirty.remove(&victim) {
                let data = &self.cache[&victim].data;
                write_block(self.dev.as_ref(), victim, data)?;
            }
            if let Some(entry) = self.cache.remove(&victim) {
                self.lru.remove(&entry.tick);
            }
        }
        Ok(())
    }

    fn insert(&mut self, block: u64, data: Box<[u8]>) -> Result<()> {
        self.make_room()?;
        self.tick += 1;
        self.lru.insert(self.tick, block);
        self.cache.insert(
            block,
            CacheEntry {
                data,
                tick: self.tick,
                checked: false,
            },
        );
        Ok(())
    }

    /// Checks a block read from its home location.
    fn verify(&self, block: u64, data: &[u8]) -> Result<()> {
        let area = self.geo.area_of(block);
        let corrupt = |what: String| StoreError::CorruptMetadata { block, area, what };
        let magic = get_u32(data, 0);
        let expected: &[u32] = if block < self.geo.meta_start {
            &[MAGIC_BITMAP]
        } else {
            &[MAGIC_EXCEPTION_NODE, MAGIC_SNAPSHOT_NODE]
        };
        if !expected.contains(&magic) {
            return Err(corrupt(format!("bad magic {magic:#010x}")));
        }
        let stored = get_u32(data, 4);
        let crc = block_crc(data, 4);
        if stored != crc {
            return Err(corrupt(format!(
                "checksum mismatch (stored crc32c {stored:#010x}, computed {crc:#010x})"
            )));
        }
        Ok(())
    }

    fn load(&mut self, block: u64) -> Result<()> {
        if self.cache.contains_key(&block) {
            self.stats.cache_hits += 1;
            self.touch(block);
            return Ok(());
        }
        if block < self.geo.bitmap_start || block >= self.geo.meta_start + self.geo.meta_blocks {
            return Err(StoreError::CorruptMetadata {
                block,
                area: self.geo.area_of(block),
                what: "a metadata pointer leads outside the bitmap and node areas".into(),
            });
        }
        self.stats.cache_misses += 1;
        let data = read_block(self.dev.as_ref(), block)?;
        self.verify(block, &data)?;
        self.insert(block, data)
    }

    /// A metadata block, read through the cache.
    pub(super) fn read(&mut self, block: u64) -> Result<&[u8]> {
        self.load(block)?;
        Ok(self.cache.get(&block).map(|e| &e.data[..]).unwrap_or(&[]))
    }

    /// [`Meta::read`], with `check` run on the block's first read since it was loaded or
    /// last changed (a B-tree node's key order, say, which costs more than the read): later
    /// reads of the same contents skip it.
    pub(super) fn read_checked(
        &mut self,
        block: u64,
        check: impl FnOnce(&[u8]) -> Result<()>,
    ) -> Result<&[u8]> {
        self.load(block)?;
        let Some(entry) = self.cache.get_mut(&block) else {
            return Ok(&[]);
        };
        if !entry.checked {
            check(&entry.data)?;
            entry.checked = true;
        }
        Ok(&entry.data)
    }

    /// A metadata block to change in the running transaction.
    pub(super) fn write(&mut self, block: u64) -> Result<&mut [u8]> {
        self.load(block)?;
        self.tx_dirty.insert(block);
        Ok(self
            .cache
            .get_mut(&block)
            .map(|e| {
                e.checked = false;
                &mut e.data[..]
            })
            .unwrap_or(&mut []))
    }

    /// A freshly allocated block, zero-filled, part of the running transaction.
    pub(super) fn fresh(&mut self, block: u64) -> Result<&mut [u8]> {
        if let Some(entry) = self.cache.get_mut(&block) {
            entry.data.fill(0);
            entry.checked = false;
            self.touch(block);
        } else {
            self.insert(block, vec![0u8; BLOCK].into_boxed_slice())?;
        }
        self.tx_dirty.insert(block);
        Ok(self
            .cache
            .get_mut(&block)
            .map(|e| &mut e.data[..])
            .unwrap_or(&mut []))
    }

    // ---- bitmaps and allocation ----

    fn bitmap_location(&self, space: Space, index: u64) -> (u64, usize) {
        let first = match space {
            Space::Meta => self.geo.bitmap_start,
            Space::Data => self.geo.bitmap_start + self.geo.meta_bitmap_blocks,
        };
        let block = first + index / BITS_PER_BITMAP_BLOCK;
        let bit = (index % BITS_PER_BITMAP_BLOCK) as usize;
        (block, bit)
    }

    fn set_bit(&mut self, space: Space, index: u64, value: bool) -> Result<()> {
        let (block, bit) = self.bitmap_location(space, index);
        let data = self.write(block)?;
        let byte = &mut data[BITMAP_HEADER + bit / 8];
        if value {
            *byte |= 1 << (bit % 8);
        } else {
            *byte &= !(1 << (bit % 8));
        }
        Ok(())
    }

    /// The first clear bit at or after `from` (wrapping once) that `skip` does not exclude.
    fn find_clear(
        &mut self,
        space: Space,
        from: u64,
        skip: &dyn Fn(u64) -> bool,
    ) -> Result<Option<u64>> {
        let total = match space {
            Space::Meta => self.geo.meta_blocks,
            Space::Data => self.geo.data_chunks,
        };
        let from = if from >= total { 0 } else { from };
        let mut index = from;
        let mut scanned = 0u64;
        while scanned < total {
            let (block, bit) = self.bitmap_location(space, index);
            let in_block = (BITS_PER_BITMAP_BLOCK - bit as u64).min(total - index);
            let data = self.read(block)?;
            let bits = &data[BITMAP_HEADER..];
            let mut i = 0u64;
            while i < in_block {
                let b = bit + i as usize;
                if b.is_multiple_of(64) && i + 64 <= in_block {
                    let word = get_u64(bits, b / 8);
                    if word == u64::MAX {
                        i += 64;
                        continue;
                    }
                }
                if bits[b / 8] & (1 << (b % 8)) == 0 && !skip(index + i) {
                    return Ok(Some(index + i));
                }
                i += 1;
            }
            scanned += in_block;
            index += in_block;
            if index >= total {
                index = 0;
            }
        }
        Ok(None)
    }

    /// Allocates a metadata node block (part of the running transaction).
    pub(super) fn alloc_meta(&mut self) -> Result<u64> {
        if self.root.meta_free == 0 {
            return Err(StoreError::Refused(Refusal::MetadataFull {
                blocks: self.geo.meta_blocks,
            }));
        }
        let found = self.find_clear(Space::Meta, self.root.meta_alloc_cursor, &|_| false)?;
        let Some(index) = found else {
            return Err(StoreError::CorruptMetadata {
                block: self.geo.bitmap_start,
                area: "allocation bitmap",
                what: format!(
                    "free metadata count is {} but the bitmap has no clear bit",
                    self.root.meta_free
                ),
            });
        };
        self.set_bit(Space::Meta, index, true)?;
        self.root.meta_free -= 1;
        self.root.meta_alloc_cursor = index + 1;
        Ok(self.geo.meta_start + index)
    }

    pub(super) fn free_meta(&mut self, block: u64) -> Result<()> {
        let index = block - self.geo.meta_start;
        self.set_bit(Space::Meta, index, false)?;
        self.root.meta_free += 1;
        if let Some(entry) = self.cache.remove(&block) {
            self.lru.remove(&entry.tick);
        }
        self.tx_dirty.remove(&block);
        self.ckpt_dirty.remove(&block);
        Ok(())
    }

    /// Data chunks that can be reserved right now.
    pub(super) fn data_available(&self) -> u64 {
        self.root
            .data_free
            .saturating_sub(self.reserved.len() as u64 + self.quarantine.len() as u64)
    }

    pub(super) fn quarantined(&self) -> usize {
        self.quarantine.len()
    }

    pub(super) fn reserved(&self) -> &HashSet<u64> {
        &self.reserved
    }

    /// Reserves a free data chunk (in memory only) and returns its address.
    pub(super) fn reserve_data(&mut self) -> Result<u64> {
        if self.data_available() == 0 {
            return Err(StoreError::Refused(Refusal::Full));
        }
        let reserved = std::mem::take(&mut self.reserved);
        let quarantine = std::mem::take(&mut self.quarantine);
        let start = self.geo.data_start_chunk;
        let found = self.find_clear(Space::Data, self.root.data_alloc_cursor, &|i| {
            reserved.contains(&(start + i)) || quarantine.contains(&(start + i))
        });
        self.reserved = reserved;
        self.quarantine = quarantine;
        let Some(index) = found? else {
            return Err(StoreError::CorruptMetadata {
                block: self.geo.bitmap_start + self.geo.meta_bitmap_blocks,
                area: "allocation bitmap",
                what: format!(
                    "free data count is {} but the bitmap has no usable clear bit",
                    self.root.data_free
                ),
            });
        };
        self.root.data_alloc_cursor = index + 1;
        let chunk = self.geo.data_start_chunk + index;
        self.reserved.insert(chunk);
        Ok(chunk)
    }

    /// Turns a reservation into an allocated chunk (in the running transaction).
    pub(super) fn claim_reserved(&mut self, chunk: u64) -> Result<()> {
        if !self.reserved.contains(&chunk) {
            return Err(StoreError::Refused(Refusal::NotReserved(chunk)));
        }
        self.set_bit(Space::Data, chunk - self.geo.data_start_chunk, true)?;
        self.reserved.remove(&chunk);
        self.root.data_free -= 1;
        Ok(())
    }

    pub(super) fn release_reserved(&mut self, chunk: u64) -> Result<()> {
        if self.reserved.remove(&chunk) {
            Ok(())
        } else {
            Err(StoreError::Refused(Refusal::NotReserved(chunk)))
        }
    }

    /// Frees an allocated data chunk; it becomes reusable once this transaction commits.
    pub(super) fn free_data(&mut self, chunk: u64) -> Result<()> {
        if !self.geo.is_data_chunk(chunk) {
            return Err(StoreError::CorruptMetadata {
                block: self.geo.meta_start,
                area: "exception tree",
                what: format!("an exception names store chunk {chunk}, outside the data area"),
            });
        }
        self.set_bit(Space::Data, chunk - self.geo.data_start_chunk, false)?;
        self.root.data_free += 1;
        self.quarantine.insert(chunk);
        Ok(())
    }

    // ---- journal ----

    /// Captures the running transaction for a commit whose journal I/O runs elsewhere: the
    /// caller runs the returned [`CommitIo`] on any thread, then calls
    /// [`Meta::finish_commit`]. Meanwhile the next transaction can build up (its blocks are
    /// copied into the I/O now, and stay pinned until it is durable). `None`: nothing to
    /// commit, or the commit was done here because the journal needs a checkpoint after it.
    pub(super) fn begin_commit(&mut self) -> Result<Option<CommitIo>> {
        self.check_usable()?;
        self.finish_commit()?;
        if !self.has_uncommitted() {
            self.quarantine.clear();
            return Ok(None);
        }
        let used = 1 + self.tx_dirty.len() as u64;
        let j = self.geo.journal_blocks;
        if self.tx_dirty.len() > MAX_TX_BLOCKS
            || j.saturating_sub(self.journal_used + used) < MAX_TX_BLOCKS as u64 + 1
        {
            // Too big (the synchronous path reports it) or the journal must be checkpointed
            // after this one, which needs no transaction running: commit here.
            self.commit()?;
            return Ok(None);
        }
        let result = self.capture();
        if let Err(e) = &result {
            self.poison(e);
        }
        result.map(Some)
    }

    fn capture(&mut self) -> Result<CommitIo> {
        let blocks: Vec<u64> = self.tx_dirty.iter().copied().collect();
        let j = self.geo.journal_blocks;
        let header = self.seal_transaction(&blocks)?;
        // The commit record at the head, the blocks after it, split where the ring wraps.
        let mut runs: Vec<(u64, SectorBuf)> = Vec::new();
        let mut images = std::iter::once(&header[..]).chain(
            blocks
                .iter()
                .map(|home| self.cache.get(home).map(|e| &e.data[..]).unwrap_or(&[])),
        );
        let first = self.journal_head_pos;
        let total = blocks.len() as u64 + 1;
        let mut at = 0u64;
        while at < total {
            let slot = (first + at) % j;
            let n = (total - at).min(j - slot);
            let mut buf = SectorBuf::zeroed(n as usize * BLOCK);
            for chunk in buf.chunks_mut(BLOCK) {
                if let Some(image) = images.next() {
                    chunk.copy_from_slice(image);
                }
            }
            runs.push((self.geo.journal_start + slot, buf));
            at += n;
        }
        let outcome = Arc::new(CommitOutcome {
            state: std::sync::Mutex::new(CommitState::Unstarted(runs)),
            ready: std::sync::Condvar::new(),
        });
        for b in &blocks {
            self.committing.insert(*b);
        }
        self.tx_dirty.clear();
        self.pending = Some(PendingCommit {
            blocks,
            root: self.root,
            quarantined: self.quarantine.iter().copied().collect(),
            used: total,
            outcome: outcome.clone(),
        });
        Ok(CommitIo {
            dev: self.dev.clone(),
            outcome,
        })
    }

    /// Completes the commit begun by [`Meta::begin_commit`], waiting for its I/O if it has
    /// not run yet: its blocks become committed (free to go home), its freed chunks
    /// reusable. A failed I/O poisons the store. Nothing to do without a pending commit.
    pub(super) fn finish_commit(&mut self) -> Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        if let Err(e) = p.outcome.result(self.dev.as_ref()) {
            self.poison(&e);
            return Err(e);
        }
        let j = self.geo.journal_blocks;
        self.journal_head_pos = (self.journal_head_pos + p.used) % j;
        self.journal_head_seq += 1;
        self.journal_used += p.used;
        self.stats.commits += 1;
        self.stats.journal_blocks_written += p.used;
        for b in p.blocks {
            self.committing.remove(&b);
            self.ckpt_dirty.insert(b);
        }
        self.committed_root = p.root;
        for c in p.quarantined {
            self.quarantine.remove(&c);
        }
        Ok(())
    }

    /// Seals every block of a transaction (crc32c in the cache entry) and builds its commit
    /// record: sequence number, root state, home address and crc32c of every block.
    fn seal_transaction(&mut self, blocks: &[u64]) -> Result<Vec<u8>> {
        let mut header = vec![0u8; BLOCK];
        header[0..8].copy_from_slice(&JOURNAL_MAGIC);
        put_u32(&mut header, 12, blocks.len() as u32);
        put_u64(&mut header, 16, self.journal_head_seq);
        put_u64(&mut header, 24, journal_id(&self.sb.uuid));
        self.root.encode(&mut header[32..32 + ROOT_STATE_LEN]);
        for (i, &home) in blocks.iter().enumerate() {
            let entry = self
                .cache
                .get_mut(&home)
                .ok_or_else(|| StoreError::CorruptMetadata {
                    block: home,
                    area: "journal",
                    what: "a dirty block left the cache before commit".into(),
                })?;
            let crc = block_crc(&entry.data, 4);
            put_u32(&mut entry.data, 4, crc);
            let at = JOURNAL_HEADER + i * JOURNAL_ENTRY;
            put_u64(&mut header, at, home);
            put_u32(&mut header, at + 8, crc32c::crc32c(&entry.data));
        }
        let crc = block_crc(&header, 8);
        put_u32(&mut header, 8, crc);
        Ok(header)
    }

    /// Commits the running transaction: flushes the device (so copied-out data is stable
    /// before the metadata that points at it), writes the changed blocks and a commit record
    /// (sequence number, root state, home address and crc32c of every block) to the journal,
    /// and flushes again. Checkpoints when the journal is getting full.
    pub(super) fn commit(&mut self) -> Result<()> {
        self.check_usable()?;
        self.finish_commit()?;
        if !self.has_uncommitted() {
            self.quarantine.clear();
            return Ok(());
        }
        let result = self.commit_inner();
        if let Err(e) = &result {
            self.poison(e);
        }
        result
    }

    fn commit_inner(&mut self) -> Result<()> {
        if self.tx_dirty.len() > MAX_TX_BLOCKS {
            return Err(StoreError::CorruptMetadata {
                block: 0,
                area: "journal",
                what: format!(
                    "transaction of {} blocks exceeds the commit record's {MAX_TX_BLOCKS}",
                    self.tx_dirty.len()
                ),
            });
        }
        self.capture()?.run();
        self.finish_commit()?;
        if self.geo.journal_blocks - self.journal_used < MAX_TX_BLOCKS as u64 + 1 {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Writes every committed block home, flushes, then moves the journal tail in a new
    /// superblock. Only called with no transaction running.
    pub(super) fn checkpoint(&mut self) -> Result<()> {
        self.finish_commit()?;
        let dev = self.dev.clone();
        let mut blocks: Vec<u64> = self.ckpt_dirty.iter().copied().collect();
        blocks.sort_unstable();
        for b in &blocks {
            if let Some(entry) = self.cache.get(b) {
                write_block(dev.as_ref(), *b, &entry.data)?;
            }
        }
        flush(dev.as_ref())?;
        self.ckpt_dirty.clear();
        self.journal_used = 0;
        self.stats.checkpoints += 1;
        let clean = self.sb.clean;
        self.write_superblock(clean)
    }

    /// Writes a new superblock (next slot) with the committed root and the journal tail at
    /// the head, and flushes it.
    pub(super) fn write_superblock(&mut self, clean: bool) -> Result<()> {
        let mut sb = self.sb.clone();
        sb.sequence += 1;
        sb.clean = clean;
        sb.journal_tail_pos = self.journal_head_pos;
        sb.journal_tail_seq = self.journal_head_seq;
        sb.root = self.committed_root;
        let dev = self.dev.clone();
        write_block(dev.as_ref(), sb.slot(), &sb.encode())?;
        flush(dev.as_ref())?;
        self.sb = sb;
        Ok(())
    }

    /// Commits, checkpoints and marks the store clean.
    pub(super) fn close(&mut self) -> Result<()> {
        self.commit()?;
        self.checkpoint()?;
        self.write_superblock(true)
    }

    /// Every bitmap bit of a space, for the checker (one cache access per bitmap block).
    pub(super) fn all_bits(&mut self, space: Space) -> Result<Vec<bool>> {
        let total = match space {
            Space::Meta => self.geo.meta_blocks,
            Space::Data => self.geo.data_chunks,
        };
        let mut out = Vec::with_capacity(total as usize);
        let mut index = 0u64;
        while index < total {
            let (block, first) = self.bitmap_location(space, index);
            let n = (BITS_PER_BITMAP_BLOCK - first as u64).min(total - index);
            let data = self.read(block)?;
            for b in first..first + n as usize {
                out.push(data[BITMAP_HEADER + b / 8] & (1 << (b % 8)) != 0);
            }
            index += n;
        }
        Ok(out)
    }

    pub(super) fn cache_len(&self) -> usize {
        self.cache.len()
    }
}

/// A bitmap block as written by `format`: header plus all bits clear.
pub(super) fn empty_bitmap_block(index: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    put_u32(&mut b, 0, MAGIC_BITMAP);
    put_u64(&mut b, 8, index);
    b
}

/// Sets bit `bit` of a bitmap block image.
pub(super) fn set_bitmap_bit(b: &mut [u8], bit: u64) {
    let bit = bit as usize;
    b[BITMAP_HEADER + bit / 8] |= 1 << (bit % 8);
}

/// Seals a node or bitmap block image: writes its crc32c at bytes 4..8.
pub(super) fn seal(b: &mut [u8]) {
    let crc = block_crc(b, 4);
    put_u32(b, 4, crc);
}

#[cfg(test)]
mod tests {
    use super::BlockHasher;
    use std::collections::HashSet;
    use std::hash::Hasher;

    /// Block numbers a power of two apart still spread over the low bits the map's buckets
    /// come from.
    #[test]
    fn strided_block_numbers_spread_over_buckets() {
        for stride in [1u64, 64, 1024, 1 << 20] {
            let buckets: HashSet<u64> = (0..1024u64)
                .map(|i| {
                    let mut h = BlockHasher::default();
                    h.write_u64(i * stride);
                    h.finish() & 1023
                })
                .collect();
            assert!(
                buckets.len() > 500,
                "stride {stride}: {} of 1024 buckets",
                buckets.len()
            );
        }
    }
}
