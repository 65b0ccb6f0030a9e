//! The on-disk format: constants, geometry, superblock and the root state carried by the
//! superblock and by every journal commit record. docs/store-format.md documents every field;
//! keep the two in step. All integers are little endian.

// docs/store-format.md is the one place that says what each constant and field means
// (byte offsets included); a copy here would drift from it.
#![allow(missing_docs)]

use super::error::{Result, StoreError};

/// Metadata block size, independent of the chunk size.
pub const BLOCK: usize = 4096;
pub const BLOCK_U64: u64 = BLOCK as u64;
/// Superblock magic (bytes 0..8 of both superblock slots).
pub const SB_MAGIC: [u8; 8] = *b"CSNAPSTO";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
pub const MIN_CHUNK: u64 = 4096;
pub const MAX_CHUNK: u64 = 1 << 20;

/// Magic numbers of the metadata block kinds (bytes 0..4 of each block).
pub const MAGIC_EXCEPTION_NODE: u32 = 0x4e58_4543; // "CEXN"
pub const MAGIC_SNAPSHOT_NODE: u32 = 0x4e50_4e53; // "SNPN"
pub const MAGIC_BITMAP: u32 = 0x504d_5442; // "BTMP"
pub const JOURNAL_MAGIC: [u8; 8] = *b"CSNAPJTX";

/// Blocks reserved for two superblock slots at the start of the device.
pub const SUPERBLOCK_SLOTS: u64 = 2;
/// Bits of allocation state per bitmap block (the first 16 bytes are the block header).
pub const BITMAP_HEADER: usize = 16;
pub const BITS_PER_BITMAP_BLOCK: u64 = ((BLOCK - BITMAP_HEADER) * 8) as u64;
/// Smallest useful store: this many data chunks.
pub const MIN_DATA_CHUNKS: u64 = 16;
/// Blocks set aside in the node area for the snapshot table (about 13 snapshots per block,
/// so this holds 25,000+ snapshots) on stores big enough to afford it.
pub const SNAPSHOT_TABLE_RESERVE: u64 = 2048;
/// Smallest node area `Geometry::plan_with_metadata_blocks` accepts: the two tree roots plus
/// room for the reserve kept for freeing operations and a few node splits.
pub const MIN_META_BLOCKS: u64 = 32;

pub fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

pub fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// crc32c of `block` computed as if the 4 bytes at `crc_at` were zero.
pub fn block_crc(block: &[u8], crc_at: usize) -> u32 {
    let crc = crc32c::crc32c(&block[..crc_at]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &block[crc_at + 4..])
}

/// Where everything lives on the store device. Block numbers are in 4 KiB metadata blocks
/// from the start of the device; data chunk addresses are chunk indexes from the start of
/// the device (`data_start_chunk..data_start_chunk + data_chunks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub chunk_size: u64,
    pub origin_size: u64,
    pub store_size: u64,
    pub journal_start: u64,
    pub journal_blocks: u64,
    pub bitmap_start: u64,
    pub meta_bitmap_blocks: u64,
    pub data_bitmap_blocks: u64,
    pub meta_start: u64,
    pub meta_blocks: u64,
    pub data_start_chunk: u64,
    pub data_chunks: u64,
}

pub fn check_chunk_size(chunk_size: u64) -> Result<()> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
        return Err(StoreError::BadChunkSize(chunk_size));
    }
    Ok(())
}

impl Geometry {
    /// Lays out a store of `store_size` bytes for an origin of `origin_size` bytes.
    pub fn plan(chunk_size: u64, origin_size: u64, store_size: u64, device: &str) -> Result<Self> {
        check_chunk_size(chunk_size)?;
        if origin_size == 0 {
            return Err(StoreError::BadOriginSize {
                size: 0,
                why: "the origin is empty",
            });
        }
        match Self::layout(chunk_size, origin_size, store_size, None) {
            Some(g) => Ok(g),
            None => Err(StoreError::TooSmall {
                device: device.to_owned(),
                size: store_size,
                // The metadata area shrinks with the store, so report the size that works.
                needed: Self::smallest_store(chunk_size)?,
                why: "superblocks, journal, bitmaps, metadata area and 16 data chunks",
            }),
        }
    }

    /// Like `plan`, with a node area of exactly `meta_blocks` blocks instead of the size
    /// derived from the store size (at least `MIN_META_BLOCKS`). For tests that need a
    /// store whose metadata area fills before its data area, and for stores expecting far
    /// more exception records than data chunks (many snapshot writes).
    pub fn plan_with_metadata_blocks(
        chunk_size: u64,
        origin_size: u64,
        store_size: u64,
        meta_blocks: u64,
        device: &str,
    ) -> Result<Self> {
        if meta_blocks < MIN_META_BLOCKS {
            return Err(StoreError::TooSmall {
                device: device.to_owned(),
                size: store_size,
                needed: store_size,
                why: "the metadata area must have at least 32 blocks",
            });
        }
        check_chunk_size(chunk_size)?;
        if origin_size == 0 {
            return Err(StoreError::BadOriginSize {
                size: 0,
                why: "the origin is empty",
            });
        }
        match Self::layout(chunk_size, origin_size, store_size, Some(meta_blocks)) {
            Some(g) => Ok(g),
            None => Err(StoreError::TooSmall {
                device: device.to_owned(),
                size: store_size,
                needed: store_size.saturating_add(meta_blocks.saturating_mul(BLOCK_U64)),
                why:
                    "superblocks, journal, bitmaps, the requested metadata area and 16 data chunks",
            }),
        }
    }

    /// The layout for these sizes, or `None` if fewer than `MIN_DATA_CHUNKS` fit.
    fn layout(
        chunk_size: u64,
        origin_size: u64,
        store_size: u64,
        meta_override: Option<u64>,
    ) -> Option<Self> {
        let store_blocks = store_size / BLOCK_U64;
        let journal_blocks = (store_blocks / 256).clamp(512, 8192);
        let chunk_blocks = chunk_size / BLOCK_U64;
        let data_estimate = store_size / chunk_size;
        // Exception records take 32 bytes and leaves are at least half full in practice:
        // one node block per 64 data chunks, plus room for the snapshot table.
        let meta_blocks = meta_override.unwrap_or(
            (data_estimate / 64 + SNAPSHOT_TABLE_RESERVE.min(store_blocks / 16)).max(256),
        );
        let meta_bitmap_blocks = meta_blocks.div_ceil(BITS_PER_BITMAP_BLOCK);
        let data_bitmap_blocks = data_estimate.div_ceil(BITS_PER_BITMAP_BLOCK).max(1);
        let journal_start = SUPERBLOCK_SLOTS;
        let bitmap_start = journal_start + journal_blocks;
        let meta_start = bitmap_start + meta_bitmap_blocks + data_bitmap_blocks;
        let data_start_chunk = (meta_start + meta_blocks).div_ceil(chunk_blocks);
        let data_start_bytes = data_start_chunk.checked_mul(chunk_size)?;
        let data_chunks = store_size.checked_sub(data_start_bytes)? / chunk_size;
        if data_chunks < MIN_DATA_CHUNKS {
            return None;
        }
        Some(Geometry {
            chunk_size,
            origin_size,
            store_size,
            journal_start,
            journal_blocks,
            bitmap_start,
            meta_bitmap_blocks,
            data_bitmap_blocks,
            meta_start,
            meta_blocks,
            data_start_chunk,
            data_chunks,
        })
    }

    /// The smallest store size (a multiple of 4 KiB) `plan` accepts for this chunk size.
    pub fn smallest_store(chunk_size: u64) -> Result<u64> {
        check_chunk_size(chunk_size)?;
        let fits = |size: u64| Self::layout(chunk_size, 1, size, None).is_some();
        let mut size = 1 << 20;
        while !fits(size) {
            size += 1 << 20;
        }
        while size > BLOCK_U64 && fits(size - BLOCK_U64) {
            size -= BLOCK_U64;
        }
        Ok(size)
    }

    pub fn origin_chunks(&self) -> u64 {
        self.origin_size.div_ceil(self.chunk_size)
    }

    /// Byte offset of data chunk address `chunk`.
    pub fn chunk_offset(&self, chunk: u64) -> u64 {
        chunk * self.chunk_size
    }

    pub fn is_data_chunk(&self, chunk: u64) -> bool {
        chunk >= self.data_start_chunk && chunk - self.data_start_chunk < self.data_chunks
    }

    pub fn is_meta_block(&self, block: u64) -> bool {
        block >= self.meta_start && block - self.meta_start < self.meta_blocks
    }

    /// Which area a metadata block belongs to (for error messages and verification).
    pub fn area_of(&self, block: u64) -> &'static str {
        if block < SUPERBLOCK_SLOTS {
            "superblock"
        } else if block < self.bitmap_start {
            "journal"
        } else if block < self.meta_start {
            "allocation bitmap"
        } else if block < self.meta_start + self.meta_blocks {
            "btree node"
        } else {
            "beyond the metadata area"
        }
    }

    /// Recomputes, in place, the checksum of the image `b` of metadata block `block`, at
    /// the offset its area uses: superblocks at 12, journal commit records at 8, bitmaps
    /// and nodes at 4 (journal blocks that are not commit records are left alone). For
    /// tools that craft damage a checksum cannot catch (damage tests, fuzzing); the store
    /// itself seals blocks as it writes them.
    pub fn reseal_block(&self, block: u64, b: &mut [u8]) {
        let crc_at = if block < SUPERBLOCK_SLOTS {
            12
        } else if block < self.bitmap_start {
            if b.len() < 8 || b[0..8] != JOURNAL_MAGIC {
                return;
            }
            8
        } else {
            4
        };
        if b.len() < crc_at + 4 {
            return;
        }
        let crc = block_crc(b, crc_at);
        put_u32(b, crc_at, crc);
    }
}

/// The mutable root of the store: what a transaction changes besides blocks. Encoded in
/// 128 bytes, identically in the superblock and in each journal commit record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RootState {
    pub exception_root: u64,
    pub exception_depth: u32,
    pub snapshot_depth: u32,
    pub snapshot_root: u64,
    pub next_snap_id: u64,
    pub data_free: u64,
    pub meta_free: u64,
    /// Number of the current (or next) reclaim pass.
    pub reclaim_pass: u64,
    /// Origin chunk the running reclaim pass examines next.
    pub reclaim_cursor: u64,
    /// 1 while a reclaim pass is running.
    pub reclaim_active: u32,
    pub data_alloc_cursor: u64,
    pub meta_alloc_cursor: u64,
    /// The online rollback in progress (`rollback_active` 1), see [`RollbackRecord`]. In
    /// bytes older builds left zero, so an older store reads as "no rollback".
    pub rollback_source: u64,
    pub rollback_pin: u64,
    pub rollback_cursor: u64,
    pub rollback_active: u32,
}

/// An online rollback of the origin to snapshot `source` (docs/architecture.md, "Online
/// rollback"): origin chunks below `cursor` hold the source's contents (or later writes);
/// at and above it, a chunk still to be copied back is one where `source` has an exception
/// that does not also cover `pin`, the snapshot of the origin taken when the rollback
/// started. Changed only inside transactions, so journal replay restores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RollbackRecord {
    pub source: u64,
    pub pin: u64,
    pub cursor: u64,
}

impl RootState {
    /// The rollback in progress, if any.
    pub fn rollback(&self) -> Option<RollbackRecord> {
        (self.rollback_active != 0).then_some(RollbackRecord {
            source: self.rollback_source,
            pin: self.rollback_pin,
            cursor: self.rollback_cursor,
        })
    }

    /// Sets (or with `None` ends) the rollback in progress.
    pub fn set_rollback(&mut self, record: Option<RollbackRecord>) {
        let r = record.unwrap_or(RollbackRecord {
            source: 0,
            pin: 0,
            cursor: 0,
        });
        self.rollback_source = r.source;
        self.rollback_pin = r.pin;
        self.rollback_cursor = r.cursor;
        self.rollback_active = u32::from(record.is_some());
    }
}

pub const ROOT_STATE_LEN: usize = 128;

/// Where the superblock keeps the cluster generation: after the root state, in bytes that
/// older builds left zero (so an older store reads as "never activated by a cluster").
const CLUSTER_GENERATION_AT: usize = 176 + ROOT_STATE_LEN;

impl RootState {
    pub fn encode(&self, b: &mut [u8]) {
        b[..ROOT_STATE_LEN].fill(0);
        put_u64(b, 0, self.exception_root);
        put_u32(b, 8, self.exception_depth);
        put_u32(b, 12, self.snapshot_depth);
        put_u64(b, 16, self.snapshot_root);
        put_u64(b, 24, self.next_snap_id);
        put_u64(b, 32, self.data_free);
        put_u64(b, 40, self.meta_free);
        put_u64(b, 48, self.reclaim_pass);
        put_u64(b, 56, self.reclaim_cursor);
        put_u32(b, 64, self.reclaim_active);
        put_u64(b, 72, self.data_alloc_cursor);
        put_u64(b, 80, self.meta_alloc_cursor);
        put_u64(b, 88, self.rollback_source);
        put_u64(b, 96, self.rollback_pin);
        put_u64(b, 104, self.rollback_cursor);
        put_u32(b, 112, self.rollback_active);
    }

    pub fn decode(b: &[u8]) -> RootState {
        RootState {
            exception_root: get_u64(b, 0),
            exception_depth: get_u32(b, 8),
            snapshot_depth: get_u32(b, 12),
            snapshot_root: get_u64(b, 16),
            next_snap_id: get_u64(b, 24),
            data_free: get_u64(b, 32),
            meta_free: get_u64(b, 40),
            reclaim_pass: get_u64(b, 48),
            reclaim_cursor: get_u64(b, 56),
            reclaim_active: get_u32(b, 64),
            data_alloc_cursor: get_u64(b, 72),
            meta_alloc_cursor: get_u64(b, 80),
            rollback_source: get_u64(b, 88),
            rollback_pin: get_u64(b, 96),
            rollback_cursor: get_u64(b, 104),
            rollback_active: get_u32(b, 112),
        }
    }
}

/// The superblock. Two slots (blocks 0 and 1); each write goes to slot `sequence % 2`, so a
/// torn superblock write always leaves the previous one intact. Open picks the valid slot
/// with the highest sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub sequence: u64,
    pub uuid: [u8; 16],
    pub geometry: Geometry,
    pub server_generation: u64,
    /// The cluster (membership) generation of the last server activated on this store by a
    /// cluster-mode agent; 0 when none was (standalone, or a store older than the field,
    /// whose bytes were zero).
    pub cluster_generation: u64,
    pub clean: bool,
    pub journal_tail_seq: u64,
    pub journal_tail_pos: u64,
    pub created: u64,
    pub root: RootState,
}

pub fn uuid_string(uuid: &[u8; 16]) -> String {
    let h: Vec<String> = uuid.iter().map(|b| format!("{b:02x}")).collect();
    let h = h.concat();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Superblock {
    /// The slot this superblock is written to.
    pub fn slot(&self) -> u64 {
        self.sequence % 2
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        let g = &self.geometry;
        b[0..8].copy_from_slice(&SB_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u64(&mut b, 16, self.sequence);
        b[24..40].copy_from_slice(&self.uuid);
        put_u32(&mut b, 40, BLOCK as u32);
        put_u32(&mut b, 44, g.chunk_size.trailing_zeros());
        put_u64(&mut b, 48, g.origin_size);
        put_u64(&mut b, 56, g.store_size);
        put_u64(&mut b, 64, g.journal_start);
        put_u64(&mut b, 72, g.journal_blocks);
        put_u64(&mut b, 80, g.bitmap_start);
        put_u64(&mut b, 88, g.meta_bitmap_blocks);
        put_u64(&mut b, 96, g.data_bitmap_blocks);
        put_u64(&mut b, 104, g.meta_start);
        put_u64(&mut b, 112, g.meta_blocks);
        put_u64(&mut b, 120, g.data_start_chunk);
        put_u64(&mut b, 128, g.data_chunks);
        put_u64(&mut b, 136, self.server_generation);
        put_u32(&mut b, 144, u32::from(self.clean));
        put_u64(&mut b, 152, self.journal_tail_seq);
        put_u64(&mut b, 160, self.journal_tail_pos);
        put_u64(&mut b, 168, self.created);
        self.root.encode(&mut b[176..176 + ROOT_STATE_LEN]);
        put_u64(&mut b, CLUSTER_GENERATION_AT, self.cluster_generation);
        let crc = block_crc(&b, 12);
        put_u32(&mut b, 12, crc);
        b
    }

    /// Decodes and validates slot `slot`; the error names the field or check that failed.
    pub fn decode(b: &[u8], slot: u8, device_len: u64) -> Result<Superblock> {
        let corrupt = |what: String| StoreError::CorruptSuperblock { slot, what };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[0..8]);
        if magic != SB_MAGIC {
            return Err(StoreError::WrongMagic { slot, found: magic });
        }
        let stored_crc = get_u32(b, 12);
        let crc = block_crc(b, 12);
        if stored_crc != crc {
            return Err(corrupt(format!(
                "checksum mismatch (stored crc32c {stored_crc:#010x}, computed {crc:#010x})"
            )));
        }
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(StoreError::UnsupportedVersion {
                slot,
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let block_size = get_u32(b, 40);
        if block_size as usize != BLOCK {
            return Err(corrupt(format!(
                "metadata block size field is {block_size}, expected {BLOCK}"
            )));
        }
        let chunk_bits = get_u32(b, 44);
        if !(12..=20).contains(&chunk_bits) {
            return Err(corrupt(format!(
                "chunk size field is 2^{chunk_bits}, outside 4 KiB..1 MiB"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[24..40]);
        let geometry = Geometry {
            chunk_size: 1 << chunk_bits,
            origin_size: get_u64(b, 48),
            store_size: get_u64(b, 56),
            journal_start: get_u64(b, 64),
            journal_blocks: get_u64(b, 72),
            bitmap_start: get_u64(b, 80),
            meta_bitmap_blocks: get_u64(b, 88),
            data_bitmap_blocks: get_u64(b, 96),
            meta_start: get_u64(b, 104),
            meta_blocks: get_u64(b, 112),
            data_start_chunk: get_u64(b, 120),
            data_chunks: get_u64(b, 128),
        };
        Self::check_geometry(&geometry, device_len).map_err(corrupt)?;
        let sb = Superblock {
            sequence: get_u64(b, 16),
            uuid,
            geometry,
            server_generation: get_u64(b, 136),
            cluster_generation: get_u64(b, CLUSTER_GENERATION_AT),
            clean: get_u32(b, 144) == 1,
            journal_tail_seq: get_u64(b, 152),
            journal_tail_pos: get_u64(b, 160),
            created: get_u64(b, 168),
            root: RootState::decode(&b[176..176 + ROOT_STATE_LEN]),
        };
        if sb.journal_tail_pos >= geometry.journal_blocks {
            return Err(corrupt(format!(
                "journal tail position {} is outside the journal ({} blocks)",
                sb.journal_tail_pos, geometry.journal_blocks
            )));
        }
        Ok(sb)
    }

    /// Cross-checks the layout fields against each other and the device size.
    fn check_geometry(g: &Geometry, device_len: u64) -> std::result::Result<(), String> {
        if g.store_size > device_len {
            return Err(format!(
                "store size field {} exceeds the device size {device_len}",
                g.store_size
            ));
        }
        if g.origin_size == 0 {
            return Err("origin size field is 0".into());
        }
        // Every area must end inside the store: this bounds all the sums below, so none of
        // them can overflow on a crafted superblock.
        let store_blocks = g.store_size / BLOCK_U64;
        let fits = |v: u64| v <= store_blocks;
        if g.journal_start != SUPERBLOCK_SLOTS
            || g.journal_blocks < 2 * 256
            || !fits(g.journal_blocks)
        {
            return Err(format!(
                "journal location {}+{} is invalid",
                g.journal_start, g.journal_blocks
            ));
        }
        if g.bitmap_start != g.journal_start + g.journal_blocks {
            return Err(format!("bitmap start {} is invalid", g.bitmap_start));
        }
        if !fits(g.meta_blocks)
            || !fits(g.data_bitmap_blocks)
            || g.meta_bitmap_blocks != g.meta_blocks.div_ceil(BITS_PER_BITMAP_BLOCK)
            || g.data_bitmap_blocks < g.data_chunks.div_ceil(BITS_PER_BITMAP_BLOCK)
        {
            return Err("bitmap sizes do not match the areas they describe".into());
        }
        if g.meta_start != g.bitmap_start + g.meta_bitmap_blocks + g.data_bitmap_blocks
            || !fits(g.meta_start + g.meta_blocks)
        {
            return Err(format!("metadata area start {} is invalid", g.meta_start));
        }
        let chunk_blocks = g.chunk_size / BLOCK_U64;
        let data_start_block = g.data_start_chunk.checked_mul(chunk_blocks);
        if data_start_block.is_none_or(|b| b < g.meta_start + g.meta_blocks) {
            return Err("data area overlaps the metadata area".into());
        }
        let end = g
            .data_start_chunk
            .checked_add(g.data_chunks)
            .and_then(|c| c.checked_mul(g.chunk_size));
        match end {
            Some(end) if end <= g.store_size => Ok(()),
            _ => Err(format!(
                "data area ({} chunks from chunk {}) exceeds the store size {}",
                g.data_chunks, g.data_start_chunk, g.store_size
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let g = Geometry::plan(65536, 1 << 30, 256 << 20, "t").unwrap();
        let sb = Superblock {
            sequence: 7,
            uuid: [3; 16],
            geometry: g,
            server_generation: 2,
            cluster_generation: 9,
            clean: true,
            journal_tail_seq: 9,
            journal_tail_pos: 4,
            created: 1234,
            root: RootState {
                next_snap_id: 5,
                ..RootState::default()
            },
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b, 1, 256 << 20).unwrap(), sb);
        b[100] ^= 1;
        let err = Superblock::decode(&b, 1, 256 << 20).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        b[0] = b'X';
        assert!(matches!(
            Superblock::decode(&b, 0, 256 << 20),
            Err(StoreError::WrongMagic { slot: 0, .. })
        ));
    }

    #[test]
    fn rollback_record_round_trips_and_zero_bytes_mean_none() {
        let mut root = RootState::default();
        let mut b = [0u8; ROOT_STATE_LEN];
        root.encode(&mut b);
        assert_eq!(
            RootState::decode(&b).rollback(),
            None,
            "an older store's zeros"
        );
        let record = RollbackRecord {
            source: 3,
            pin: 9,
            cursor: 1 << 40,
        };
        root.set_rollback(Some(record));
        root.encode(&mut b);
        let back = RootState::decode(&b);
        assert_eq!(back, root);
        assert_eq!(back.rollback(), Some(record));
        root.set_rollback(None);
        assert_eq!(root, RootState::default(), "ending it clears every field");
    }

    #[test]
    fn crafted_layout_fields_are_rejected_without_overflow() {
        let g = Geometry::plan(4096, 1 << 30, 64 << 20, "t").unwrap();
        let base = Superblock {
            sequence: 1,
            uuid: [1; 16],
            geometry: g,
            server_generation: 0,
            cluster_generation: 0,
            clean: true,
            journal_tail_seq: 1,
            journal_tail_pos: 0,
            created: 0,
            root: RootState::default(),
        };
        let cases: [fn(&mut Geometry); 5] = [
            |g| g.data_start_chunk = u64::MAX / 2,
            |g| g.meta_blocks = u64::MAX,
            |g| g.journal_blocks = u64::MAX - 1,
            |g| g.data_chunks = u64::MAX,
            |g| g.store_size = u64::MAX,
        ];
        for (i, damage) in cases.iter().enumerate() {
            let mut sb = base.clone();
            damage(&mut sb.geometry);
            let err = Superblock::decode(&sb.encode(), 0, 64 << 20).unwrap_err();
            assert!(
                matches!(err, StoreError::CorruptSuperblock { .. }),
                "case {i}: {err}"
            );
        }
    }

    #[test]
    fn geometry_rejects_small_stores_and_bad_chunks() {
        assert!(matches!(
            Geometry::plan(3000, 1 << 20, 1 << 30, "t"),
            Err(StoreError::BadChunkSize(3000))
        ));
        assert!(matches!(
            Geometry::plan(2 << 20, 1 << 20, 1 << 30, "t"),
            Err(StoreError::BadChunkSize(_))
        ));
        let needed = Geometry::smallest_store(4096).unwrap();
        assert!(Geometry::plan(4096, 1 << 20, needed, "t").is_ok());
        match Geometry::plan(4096, 1 << 20, needed - BLOCK_U64, "t") {
            Err(StoreError::TooSmall { needed: n, .. }) => assert_eq!(n, needed),
            other => panic!("{other:?}"),
        }
        for chunk in [4096u64, 65536, 1 << 20] {
            let g = Geometry::plan(chunk, 1 << 30, 1 << 30, "t").unwrap();
            assert!(g.data_start_chunk * chunk >= (g.meta_start + g.meta_blocks) * BLOCK_U64);
            assert!((g.data_start_chunk + g.data_chunks) * chunk <= 1 << 30);
        }
    }
}
