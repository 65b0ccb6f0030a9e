//! Model-based tests of the store alone: random sequences of snapshot create/delete,
//! origin copy-outs, snapshot writes, reclaim steps, commits and reopens, compared after
//! every step with a reference of what each snapshot must see, plus the consistency checker.
//! Seeded: set CSNAP_SEED to replay a failure.

use crate::store_support;

use rand::Rng;
use store_support::*;

fn run_model(seed: u64, steps: usize, extra_chunks: u64, origin_chunks: u64) {
    let mut rng = rng(seed);
    let mut sim = Sim::new(extra_chunks, origin_chunks);
    for step in 0..steps {
        let context = format!("seed {seed} step {step}");
        let roll = rng.gen_range(0..100);
        match roll {
            0..=11 => {
                sim.create().unwrap();
            }
            12..=17 => sim.random_delete(&mut rng),
            18..=59 => sim.random_origin_write(&mut rng),
            60..=84 => sim.random_snapshot_write(&mut rng),
            85..=92 => {
                let budget = rng.gen_range(1..20);
                sim.store.reclaim_step(budget).unwrap();
            }
            93..=97 => sim.store.commit().unwrap(),
            _ => sim.reopen(),
        }
        sim.verify(&context);
    }
    let report = sim.store.check().unwrap();
    let invalid = sim.reference.snaps.values().filter(|s| !s.live).count();
    eprintln!(
        "seed {seed}: {} records, {} chunks used, {} listed snapshots ({invalid} invalid), {:?}",
        report.exception_records,
        report.data_chunks_used,
        sim.reference.snaps.len(),
        sim.store.meta_stats()
    );
    // Deleting everything and reclaiming returns every chunk.
    for id in sim.reference.snaps.keys().copied().collect::<Vec<_>>() {
        sim.delete(id).unwrap();
    }
    sim.drain_reclaim();
    sim.verify(&format!("seed {seed} final"));
    let info = sim.store.info();
    assert_eq!(
        info.free_chunks, info.data_chunks,
        "seed {seed}: all space reclaimed"
    );
    assert!(sim.store.snapshots().is_empty());
}

#[test]
fn random_operations_match_the_reference() {
    let seed = seed("random_operations_match_the_reference");
    let mut rng = rng(seed);
    for _ in 0..8 {
        run_model(rng.gen(), 300, 400, 24);
    }
}

#[test]
fn random_operations_on_a_nearly_full_store_match_the_reference() {
    // Few data chunks: the store-full policy (invalidate the oldest) runs often.
    let seed = seed("random_operations_on_a_nearly_full_store");
    let mut rng = rng(seed);
    for _ in 0..8 {
        run_model(rng.gen(), 300, 8, 24);
    }
}
