//! Damaged metadata never makes the store panic: random bytes and random header fields are
//! written into superblocks, journal records, bitmap blocks and tree nodes, and the
//! checksum is then recomputed so the damage gets past the crc and reaches the decoders.
//! Opening and using the store must give errors (or a checker report), never a panic.
//! Seeded: set CSNAP_SEED to replay.

use crate::store_support;
use csnap_proto::SnapId;

use csnap_server::store::{read_superblock, BlockDevice, ChunkSource, MemDevice, Store};
use rand::rngs::StdRng;
use rand::Rng;
use std::panic::{catch_unwind, AssertUnwindSafe};
use store_support::*;

const ORIGIN: u64 = 300;

/// A store with a few hundred exceptions over several leaves (closed, or with its last
/// work only in the journal), and its device image.
fn base_image(rng: &mut StdRng, close: bool) -> Vec<u8> {
    let dev = device(2000);
    format(&dev, ORIGIN);
    let mut store = open(&dev).unwrap();
    let mut ids = Vec::new();
    for i in 0..20u64 {
        ids.push(store.create_snapshot(&format!("s{i}"), i).unwrap().id);
        for _ in 0..30 {
            let c = rng.gen_range(0..ORIGIN);
            record_copy_out(&mut store, c).unwrap();
        }
        store.commit().unwrap();
    }
    store.delete_snapshot(ids[3]).unwrap();
    store.reclaim_step(50).unwrap();
    store.commit().unwrap();
    if close {
        store.close().unwrap();
    }
    let mut image = vec![0u8; dev.len() as usize];
    dev.read_at(&mut image, 0).unwrap();
    image
}

fn exercise(dev: &MemDevice) -> Result<(), String> {
    let mut store = open(dev).map_err(|e| e.to_string())?;
    let live: Vec<SnapId> = store.live_snapshots().collect();
    for c in 0..ORIGIN {
        store.oldest_sharing_origin(c).map_err(|e| e.to_string())?;
        for id in live.iter().take(4) {
            if let ChunkSource::Store { .. } =
                store.snapshot_chunk(*id, c).map_err(|e| e.to_string())?
            {}
        }
    }
    store.create_snapshot("new", 1).map_err(|e| e.to_string())?;
    for c in 0..20 {
        record_copy_out(&mut store, c).map_err(|e| e.to_string())?;
    }
    if let Some(id) = live.first() {
        store.delete_snapshot(*id).map_err(|e| e.to_string())?;
    }
    for _ in 0..200 {
        if store.reclaim_step(64).map_err(|e| e.to_string())?.done {
            break;
        }
    }
    store.commit().map_err(|e| e.to_string())?;
    let report = store.check().map_err(|e| e.to_string())?;
    store.close().map_err(|e| e.to_string())?;
    if report.is_clean() {
        Ok(())
    } else {
        Err(report.problems.join("; "))
    }
}

#[test]
fn damaged_metadata_gives_errors_never_panics() {
    let seed = seed("damaged_metadata_gives_errors_never_panics");
    let mut rng = rng(seed);
    let errors = damage_runs(seed, &mut rng, true);
    assert!(errors > 20, "damage must be noticed: {errors}");
    // Unclean store: damage lands in journal records (re-sealed) that replay must judge.
    damage_runs(seed, &mut rng, false);
}

/// 200 runs of damage-and-exercise; returns how many reported errors.
fn damage_runs(seed: u64, rng: &mut StdRng, closed: bool) -> u64 {
    let image = base_image(rng, closed);
    let probe = MemDevice::new(image.len() as u64);
    probe.corrupt(0, &image);
    let g = read_superblock(&probe).unwrap().geometry;
    // Node blocks in use, from the metadata bitmap (bits after a 16-byte header) of a
    // copy whose journal has been replayed home.
    let replayed = MemDevice::new(image.len() as u64);
    replayed.corrupt(0, &image);
    open(&replayed).unwrap().close().unwrap();
    let mut bitmap = vec![0u8; 4096];
    replayed
        .read_at(&mut bitmap, g.bitmap_start * 4096)
        .unwrap();
    let nodes: Vec<u64> = (0..g.meta_blocks.min(32_640))
        .filter(|i| bitmap[16 + (*i as usize) / 8] & (1 << (i % 8)) != 0)
        .map(|i| g.meta_start + i)
        .collect();
    assert!(nodes.len() > 5, "{} nodes", nodes.len());
    let (mut errors, mut clean) = (0u64, 0u64);
    for iteration in 0..200 {
        let dev = MemDevice::new(image.len() as u64);
        dev.corrupt(0, &image);
        // Pick a block in use: superblocks, the journal start, bitmaps, or a tree node.
        let block = match if closed { rng.gen_range(0..10) } else { 1 } {
            0 => rng.gen_range(0..2),
            1 => g.journal_start + rng.gen_range(0..40),
            2 => g.bitmap_start + rng.gen_range(0..g.meta_start - g.bitmap_start),
            _ => nodes[rng.gen_range(0..nodes.len())],
        };
        let mut b = vec![0u8; 4096];
        dev.read_at(&mut b, block * 4096).unwrap();
        for _ in 0..rng.gen_range(1..6) {
            // Mostly header fields (counts, levels, pointers), sometimes anywhere.
            let at = if rng.gen_bool(0.7) {
                rng.gen_range(8..200)
            } else {
                rng.gen_range(0..4096)
            };
            let len = rng.gen_range(1..9).min(4096 - at);
            for byte in &mut b[at..at + len] {
                *byte = if rng.gen_bool(0.3) { 0xff } else { rng.gen() };
            }
        }
        // Re-seal so the damage passes the checksum.
        g.reseal_block(block, &mut b);
        dev.corrupt(block * 4096, &b);
        let outcome = catch_unwind(AssertUnwindSafe(|| exercise(&dev)));
        match outcome {
            Ok(Ok(())) => clean += 1,
            Ok(Err(_)) => errors += 1,
            Err(_) => panic!(
                "seed {seed} iteration {iteration}: panic with damaged block {block} ({})",
                g.area_of(block)
            ),
        }
    }
    eprintln!(
        "200 damaged stores (closed: {closed}): {errors} reported errors, {clean} unaffected"
    );
    errors
}

#[test]
fn store_never_panics_on_random_devices() {
    let seed = seed("store_never_panics_on_random_devices");
    let mut rng = rng(seed);
    for _ in 0..50 {
        let dev = MemDevice::new(8 << 20);
        let mut junk = vec![0u8; 64 * 4096];
        rng.fill(&mut junk[..]);
        dev.corrupt(0, &junk);
        assert!(Store::open(std::sync::Arc::new(dev), Default::default()).is_err());
    }
}
