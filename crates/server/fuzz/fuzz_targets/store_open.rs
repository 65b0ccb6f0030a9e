//! Fuzzes the store's on-disk decoders (superblocks, journal records, bitmaps, btree
//! nodes, snapshot and exception records) and everything recovery and normal use do with
//! what they decode.
//!
//! Random bytes would almost never get past the crc32c of a metadata block, so the input
//! instead patches one block of a real store image (closed, or with its last transactions
//! only in the journal) and the block's checksum is recomputed, as damage that a checksum
//! cannot catch (a buggy writer, a crafted image). Then the store is opened (replaying the
//! journal), read, written, reclaimed, committed and checked. Any outcome but a panic is
//! acceptable: errors are the expected answer to damage.
#![no_main]

use std::sync::{Arc, OnceLock};

use csnap_server::store::{
    read_superblock, BlockDevice, FormatOptions, Geometry, MemDevice, OpenOptions, Store,
};
use libfuzzer_sys::fuzz_target;

const CHUNK: u64 = 4096;
const ORIGIN_CHUNKS: u64 = 300;
const BLOCK: usize = 4096;

struct Base {
    image: Vec<u8>,
    geometry: Geometry,
}

/// Two base images: a cleanly closed store and one whose last work is only in the journal.
fn bases() -> &'static [Base; 2] {
    static BASES: OnceLock<[Base; 2]> = OnceLock::new();
    BASES.get_or_init(|| [build(true), build(false)])
}

fn build(close: bool) -> Base {
    let size = Geometry::smallest_store(CHUNK).expect("geometry") + 2000 * CHUNK;
    let dev = MemDevice::new(size);
    Store::format(
        &dev,
        &FormatOptions {
            chunk_size: CHUNK,
            origin_size: ORIGIN_CHUNKS * CHUNK,
            now: 1_700_000_000,
            uuid: None,
        },
    )
    .expect("format");
    let mut store = Store::open(Arc::new(dev.clone()), OpenOptions::default()).expect("open");
    // A deterministic spread of copy-outs over 20 snapshots (a small LCG, no rand).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut ids = Vec::new();
    for i in 0..20u64 {
        ids.push(
            store
                .create_snapshot(&format!("s{i}"), i)
                .expect("create")
                .id,
        );
        for _ in 0..30 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let c = (x >> 33) % ORIGIN_CHUNKS;
            if store.oldest_sharing_origin(c).expect("sharing").is_some() {
                let to = store.reserve_chunk().expect("reserve");
                store.record_copy_out(c, to).expect("record");
            }
        }
        store.commit().expect("commit");
    }
    store.delete_snapshot(ids[3]).expect("delete");
    store.reclaim_step(50).expect("reclaim");
    store.commit().expect("commit");
    if close {
        store.close().expect("close");
    }
    let mut image = vec![0u8; dev.len() as usize];
    dev.read_at(&mut image, 0).expect("read image");
    let geometry = read_superblock(&dev).expect("superblock").geometry;
    Base { image, geometry }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let base = &bases()[usize::from(data[0] & 1)];
    let g = &base.geometry;
    let blocks = (base.image.len() / BLOCK) as u64;
    // Which block: superblocks, journal, bitmaps or the node area, chosen by the input.
    let pick = u64::from(u16::from_le_bytes([data[1], data[2]]));
    let block = match data[0] >> 1 & 3 {
        0 => pick % 2,
        1 => g.journal_start + pick % (g.bitmap_start - g.journal_start).max(1),
        2 => g.bitmap_start + pick % (g.meta_start - g.bitmap_start).max(1),
        _ => g.meta_start + pick % g.meta_blocks.max(1),
    }
    .min(blocks - 1);
    // The rest of the input: patches of (offset u16, length u8, bytes).
    let at = block as usize * BLOCK;
    let mut b = base.image[at..at + BLOCK].to_vec();
    let mut rest = &data[3..];
    while rest.len() >= 3 {
        let off = usize::from(u16::from_le_bytes([rest[0], rest[1]])) % BLOCK;
        let len = usize::from(rest[2]).min(BLOCK - off).min(rest.len() - 3);
        b[off..off + len].copy_from_slice(&rest[3..3 + len]);
        rest = &rest[3 + len..];
    }
    // Re-seal so the damage reaches the decoders.
    g.reseal_block(block, &mut b);
    let dev = MemDevice::new(base.image.len() as u64);
    dev.corrupt(0, &base.image);
    dev.corrupt(block * BLOCK as u64, &b);
    let _ = exercise(&dev);
});

fn exercise(dev: &MemDevice) -> Result<(), String> {
    let e = |e: csnap_server::store::StoreError| e.to_string();
    let mut store = Store::open(Arc::new(dev.clone()), OpenOptions::default()).map_err(e)?;
    let live: Vec<_> = store.live_snapshots().collect();
    // Every third chunk: the same decoders, at a third of the cost per run.
    for c in (0..ORIGIN_CHUNKS).step_by(3) {
        store.oldest_sharing_origin(c).map_err(e)?;
        for id in live.iter().take(3) {
            store.snapshot_chunk(*id, c).map_err(e)?;
        }
    }
    store.create_snapshot("new", 1).map_err(e)?;
    for c in 0..20 {
        if store.oldest_sharing_origin(c).map_err(e)?.is_some() {
            let to = store.reserve_chunk().map_err(e)?;
            store.record_copy_out(c, to).map_err(e)?;
        }
    }
    if let Some(id) = live.first() {
        store.delete_snapshot(*id).map_err(e)?;
    }
    for _ in 0..100 {
        if store.reclaim_step(64).map_err(e)?.done {
            break;
        }
    }
    store.commit().map_err(e)?;
    store.check().map_err(e)?;
    store.close().map_err(e)
}
