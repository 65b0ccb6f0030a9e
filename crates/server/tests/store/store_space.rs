//! A full metadata (node) area: growing operations fail with a clear `MetadataFull` before
//! changing anything, and the operations that free space (delete, invalidate, reclaim)
//! always succeed, so a store driven full can always be brought back.

use crate::store_support;
use csnap_proto::SnapId;

use csnap_server::engine::Refusal;
use csnap_server::store::{FormatOptions, Geometry, MemDevice, SnapState, Store, StoreError};
use store_support::*;

/// A store whose node area has only `meta_blocks` blocks, with `data_chunks` spare data
/// chunks, for an origin of `origin_chunks` chunks.
fn small_metadata_store(meta_blocks: u64, data_chunks: u64, origin_chunks: u64) -> MemDevice {
    let dev = MemDevice::new(Geometry::smallest_store(CHUNK).unwrap() + data_chunks * CHUNK);
    Store::format_with_metadata_blocks(
        &dev,
        &FormatOptions {
            chunk_size: CHUNK,
            origin_size: origin_chunks * CHUNK,
            now: 1_700_000_000,
            uuid: None,
        },
        meta_blocks,
    )
    .unwrap();
    dev
}

/// Copies out `chunk` for every live snapshot that needs it.
fn copy_out(store: &mut Store, chunk: u64) -> Result<(), StoreError> {
    if store.oldest_sharing_origin(chunk)?.is_none() {
        return Ok(());
    }
    let to = store.reserve_chunk()?;
    match store.record_copy_out(chunk, to) {
        Ok(_) => Ok(()),
        Err(e) => {
            store.release_chunk(to)?;
            Err(e)
        }
    }
}

/// Rounds of "new snapshot, then overwrite chunks 0..per_round" until a record no longer
/// fits. Each round's records interleave with the previous rounds' in key order, so leaves
/// end up partly filled by every snapshot. Returns the snapshot ids.
fn fill_metadata(store: &mut Store, per_round: u64) -> Vec<SnapId> {
    let mut snaps = Vec::new();
    for round in 0.. {
        match store.create_snapshot(&format!("s{round}"), round) {
            Ok(rec) => snaps.push(rec.id),
            Err(StoreError::Refused(Refusal::MetadataFull { .. })) => return snaps,
            Err(e) => panic!("create: {e}"),
        }
        for c in 0..per_round {
            match copy_out(store, c) {
                Ok(()) => {}
                Err(StoreError::Refused(Refusal::MetadataFull { .. })) => return snaps,
                Err(e) => panic!("round {round} chunk {c}: {e}"),
            }
        }
        store.commit().unwrap();
        assert!(round < 1000, "the metadata area never filled");
    }
    unreachable!()
}

fn reclaim_all(store: &mut Store) {
    for _ in 0..100_000 {
        if store.reclaim_step(256).unwrap().done {
            return;
        }
    }
    panic!("reclaim never finished");
}

#[test]
fn freeing_operations_succeed_when_the_metadata_area_is_full() {
    let dev = small_metadata_store(40, 4000, 512);
    let mut store = open(&dev).unwrap();
    let snaps = fill_metadata(&mut store, 400);
    assert!(snaps.len() >= 3, "{snaps:?}");
    let full_at = store.info().free_meta_blocks;
    // The store refuses to grow, cleanly: a clear error, nothing changed, still usable.
    assert!(
        matches!(
            store.create_snapshot("one-more", 0),
            Err(StoreError::Refused(Refusal::MetadataFull { .. }))
        ),
        "the metadata area should be full"
    );
    assert!(store.check().unwrap().is_clean());
    // Freeing operations go through.
    store
        .invalidate_snapshot(snaps[0], "test: metadata full")
        .unwrap_or_else(|e| panic!("invalidate on a full metadata area: {e}"));
    store
        .delete_snapshot(snaps[1])
        .unwrap_or_else(|e| panic!("delete on a full metadata area: {e}"));
    reclaim_all(&mut store);
    store.commit().unwrap();
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    // Reclaiming two snapshots' records gives node blocks back (leaves left sparse are
    // merged), and the store grows again.
    let freed = store.info().free_meta_blocks;
    assert!(
        freed >= full_at + 4,
        "reclaim freed too few node blocks: {full_at} -> {freed}"
    );
    store.create_snapshot("after", 0).unwrap();
    copy_out(&mut store, 0).unwrap();
    store.commit().unwrap();
    drop(store); // crash: replay must bring back the same state
    let mut store = open(&dev).unwrap();
    assert!(store.was_unclean());
    assert!(matches!(
        store.snapshot(snaps[0]).map(|r| &r.state),
        Some(SnapState::Invalid { .. })
    ));
    assert!(store.snapshot(snaps[1]).is_none());
    assert!(store.check().unwrap().is_clean());
}

/// Merging sparse nodes on removal keeps a multi-level exception tree correct: random
/// copy-outs, snapshot writes, deletes and partial reclaim over thousands of records, with
/// every snapshot's every chunk and the checker verified along the way.
#[test]
fn trees_stay_correct_while_reclaim_merges_nodes() {
    use rand::Rng;
    let seed = seed("trees_stay_correct_while_reclaim_merges_nodes");
    let mut rng = rng(seed);
    let origin_chunks = 2500;
    let mut sim = Sim::new(40_000, origin_chunks);
    let start_free = sim.store.info().free_meta_blocks;
    for round in 0..14 {
        sim.create().unwrap();
        for _ in 0..rng.gen_range(500..2500) {
            let chunk = rng.gen_range(0..origin_chunks);
            let tag = sim.origin_write_prepare(chunk).unwrap();
            sim.reference.origin[chunk as usize] = tag;
        }
        for _ in 0..rng.gen_range(0..200) {
            let Some(id) = sim.random_live(&mut rng) else {
                break;
            };
            let chunk = rng.gen_range(0..origin_chunks);
            if let Some(at) = sim.snapshot_write_prepare(id, chunk).unwrap() {
                let tag = sim.tag();
                sim.snapshot_write_data(id, chunk, at, tag).unwrap();
            }
        }
        if round % 2 == 1 {
            for _ in 0..rng.gen_range(1..3) {
                if let Some(id) = sim.random_listed(&mut rng) {
                    sim.delete(id).unwrap();
                }
            }
        }
        for _ in 0..rng.gen_range(0..40) {
            sim.store.reclaim_step(rng.gen_range(1..400)).unwrap();
        }
        sim.store.commit().unwrap();
        if round % 5 == 4 {
            sim.reopen();
            sim.verify(&format!("seed {seed} round {round}"));
        }
    }
    sim.drain_reclaim();
    sim.verify(&format!("seed {seed} after reclaim"));
    for id in sim.reference.snaps.keys().copied().collect::<Vec<_>>() {
        sim.delete(id).unwrap();
    }
    sim.drain_reclaim();
    sim.store.commit().unwrap();
    sim.verify(&format!("seed {seed} all deleted"));
    assert_eq!(
        sim.store.info().free_meta_blocks,
        start_free,
        "seed {seed}: every node block comes back"
    );
}
