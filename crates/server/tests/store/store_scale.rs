//! Scale: 10,000 snapshots on one store, a hot chunk copied out between every two of them
//! (10,000 exceptions on one origin chunk), lookups, deletes and reclaim; and the work per
//! origin write does not grow with the number of snapshots.

use crate::store_support;

use csnap_proto::SnapId;
use rand::Rng;
use store_support::*;

const SNAPSHOTS: u64 = 10_000;
const ORIGIN: u64 = 256;

#[test]
fn ten_thousand_snapshots_on_one_store() {
    let seed = seed("ten_thousand_snapshots_on_one_store");
    let mut rng = rng(seed);
    let mut sim = Sim::new(3 * SNAPSHOTS, ORIGIN);
    let mut accesses_at = Vec::new();
    for i in 0..SNAPSHOTS {
        sim.create().unwrap();
        // The hot chunk 0 changes after every snapshot: one exception per snapshot.
        let before = sim.store.meta_stats();
        let tag = sim.origin_write_prepare(0).unwrap();
        let after = sim.store.meta_stats();
        sim.reference.origin[0] = tag;
        if i == 100 || i == SNAPSHOTS - 1 {
            accesses_at.push(
                (after.cache_hits + after.cache_misses) - (before.cache_hits + before.cache_misses),
            );
        }
        let chunk = rng.gen_range(1..ORIGIN);
        let tag = sim.origin_write_prepare(chunk).unwrap();
        sim.reference.origin[chunk as usize] = tag;
        if i % 200 == 0 {
            sim.store.commit().unwrap();
        }
    }
    sim.store.commit().unwrap();
    // Metadata work per copy-out is independent of the snapshot count (same tree depth).
    assert!(
        accesses_at[1] <= accesses_at[0] + 8,
        "block accesses per copy-out grew from {} to {}",
        accesses_at[0],
        accesses_at[1]
    );
    assert_eq!(sim.store.snapshots().len() as u64, SNAPSHOTS);
    assert_eq!(sim.store.chunk_records(0).unwrap().len() as u64, SNAPSHOTS);
    let check = |sim: &mut Sim, context: &str, samples: usize, rng: &mut rand::rngs::StdRng| {
        let ids: Vec<SnapId> = sim.reference.snaps.keys().copied().collect();
        for _ in 0..samples {
            let id = ids[rng.gen_range(0..ids.len())];
            for chunk in [0, rng.gen_range(1..ORIGIN)] {
                let want = sim.reference.snaps[&id].view[chunk as usize];
                assert_eq!(
                    sim.read(id, chunk).unwrap(),
                    want,
                    "{context}: snapshot {id} chunk {chunk}"
                );
            }
        }
        let report = sim.store.check().unwrap();
        assert!(report.is_clean(), "{context}: {:?}", report.problems);
    };
    check(&mut sim, "after creation", 2000, &mut rng);
    sim.reopen();
    check(&mut sim, "after reopen", 500, &mut rng);
    // Delete every other snapshot; reclaim frees their hot-chunk copies.
    let free_before = sim.store.info().free_chunks;
    let ids: Vec<SnapId> = sim.reference.snaps.keys().copied().collect();
    for id in ids.iter().step_by(2) {
        sim.delete(*id).unwrap();
    }
    sim.drain_reclaim();
    sim.store.commit().unwrap();
    let freed = sim.store.info().free_chunks - free_before;
    assert!(freed >= SNAPSHOTS / 2, "freed {freed}");
    check(&mut sim, "after deleting half", 500, &mut rng);
    assert_eq!(sim.store.snapshots().len() as u64, SNAPSHOTS / 2);
}
