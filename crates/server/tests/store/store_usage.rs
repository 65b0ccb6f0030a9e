//! Per-snapshot usage (`chunks_held`) from the incremental usage counter: listing and
//! status touch no metadata block, and after the seeding walk the figures equal a full scan
//! of the exception tree, whatever happened during the walk. Seeded: CSNAP_SEED replays.

use crate::engine_common;
use crate::store_support;

use csnap_proto::{ClientMsg, ServerMsg, SnapId, SnapshotState};
use csnap_server::engine::{Event, MetaStore};
use csnap_server::store::Store;
use engine_common::{config, Harness, TestStore};
use rand::Rng;
use store_support::{open, rng, seed, Sim};

fn meta_accesses(sim: &Sim) -> u64 {
    let s = sim.store.meta_stats();
    s.cache_hits + s.cache_misses
}

fn assert_exact(sim: &mut Sim, context: &str) {
    let (figures, exact) = sim.store.usage_figures();
    assert!(exact, "{context}: figures not exact yet");
    let scanned = sim.store.usage().unwrap();
    assert_eq!(
        figures, scanned,
        "{context}: counter differs from a full scan"
    );
}

fn run(seed: u64, steps: usize) {
    let mut rng = rng(seed);
    let origin_chunks = 32;
    let mut sim = Sim::new(600, origin_chunks);
    for step in 0..steps {
        let context = format!("seed {seed} step {step}");
        match rng.gen_range(0..100) {
            0..=9 => {
                sim.create().unwrap();
            }
            10..=14 => sim.random_delete(&mut rng),
            15..=49 => sim.random_origin_write(&mut rng),
            50..=69 => sim.random_snapshot_write(&mut rng),
            70..=79 => {
                sim.store.reclaim_step(rng.gen_range(1..20)).unwrap();
            }
            80..=95 => {
                // Small steps, so the walk is usually partway while the tree changes.
                sim.store.usage_step(rng.gen_range(1..6)).unwrap();
            }
            96..=97 => sim.store.commit().unwrap(),
            _ => {
                sim.reopen();
                assert!(
                    !sim.store.usage_figures().1,
                    "{context}: reopened counter is unseeded"
                );
            }
        }
        if sim.store.usage_figures().1 {
            assert_exact(&mut sim, &context);
        }
    }
    let mut guard = 0;
    while !sim.store.usage_step(7).unwrap() {
        guard += 1;
        assert!(guard < 100_000, "seed {seed}: the walk never ends");
    }
    assert_exact(&mut sim, &format!("seed {seed} final"));
}

#[test]
fn usage_counter_converges_to_a_full_scan() {
    let seed = seed("usage_counter_converges_to_a_full_scan");
    let mut rng = rng(seed);
    for _ in 0..6 {
        run(rng.gen(), 400);
    }
}

/// Listing (with `chunks_held`) costs no metadata block access once seeded; a full scan
/// reads the whole tree. Asserts on work done, not time.
#[test]
fn listing_does_not_walk_the_exception_tree() {
    let origin_chunks = 4096;
    let mut sim = Sim::new(20_000, origin_chunks);
    for round in 0..4 {
        sim.create().unwrap();
        // Every chunk copied out once per round: 4 rounds x 4096 records, many leaves.
        for chunk in (round..origin_chunks).step_by(1) {
            sim.origin_write_prepare(chunk).unwrap();
        }
        sim.store.commit().unwrap();
    }
    sim.reopen();
    let mut steps = 0;
    while !sim.store.usage_step(1024).unwrap() {
        steps += 1;
    }
    assert!(steps >= 10, "the seeding walk took {steps} bounded steps");
    let records = sim.store.usage_records_walked();
    assert!(records > 10_000, "{records} records walked");

    let before = meta_accesses(&sim);
    let walked = sim.store.usage_records_walked();
    let listed = MetaStore::list_snapshots(&mut sim.store).unwrap();
    let stats = MetaStore::stats(&mut sim.store).unwrap();
    assert!(MetaStore::usage_exact(&sim.store));
    assert_eq!(
        meta_accesses(&sim),
        before,
        "listing touched metadata blocks"
    );
    assert_eq!(sim.store.usage_records_walked(), walked);
    assert!(stats.free_chunks < stats.store_chunks);
    // Snapshot k (1-based) was created before rounds k..=4 copied out chunks >= round.
    let scanned = sim.store.usage().unwrap();
    assert!(
        meta_accesses(&sim) > before + 10,
        "a full scan reads the tree"
    );
    for s in &listed {
        assert_eq!(Some(&s.chunks_held), scanned.get(&s.id));
    }
    assert!(listed.iter().all(|s| s.chunks_held > 0));
}

impl TestStore for Store {
    fn crash_and_recover(&mut self) {
        panic!("crash_and_recover is not used by the usage tests");
    }

    fn consistency(&mut self) -> Result<(), String> {
        let report = self.check().map_err(|e| e.to_string())?;
        if report.is_clean() {
            Ok(())
        } else {
            Err(report.problems.join("; "))
        }
    }

    fn snapshot_states(&mut self) -> Vec<(SnapId, SnapshotState)> {
        MetaStore::list_snapshots(self)
            .unwrap()
            .into_iter()
            .map(|i| (i.id, i.state))
            .collect()
    }

    fn placeholder() -> Self {
        Sim::new(0, 1).store
    }
}

/// Through the request engine, right after start on a 16k-record tree: `Status` costs at
/// most one bounded walk step (no full scan) and reports the figures as not exact yet;
/// ticks finish the walk; then `ListSnapshots` reports exact figures equal to a full scan.
#[test]
fn engine_status_is_bounded_and_list_converges() {
    let origin_chunks = 4096;
    let mut sim = Sim::new(20_000, origin_chunks);
    for round in 0..4 {
        sim.create().unwrap();
        for chunk in round..origin_chunks {
            sim.origin_write_prepare(chunk).unwrap();
        }
        sim.store.commit().unwrap();
    }
    let dev = sim.dev.clone();
    sim.reopen();
    drop(sim);
    let store = open(&dev).unwrap();
    let mut h = Harness::with_store(config(), store);
    let admin = h.admin();
    let walked = h.engine.store().usage_records_walked();
    let id = h.send(admin, ClientMsg::Status);
    let Some(ServerMsg::Status(status)) = h.reply_to(admin, id) else {
        panic!("no status reply");
    };
    let step = h.engine.store().usage_records_walked() - walked;
    assert!(step <= 1024, "Status walked {step} records");
    assert!(!status.usage_exact, "16k records cannot be counted yet");
    assert_eq!(status.snapshots, 4);

    let mut ticks = 0;
    while !h.engine.store().usage_figures().1 {
        ticks += 1;
        assert!(ticks <= 3, "16k records take at most 2 ticks of 16k");
        h.handle(Event::Tick { now: 1_000 + ticks });
    }
    let id = h.send(
        admin,
        ClientMsg::ListSnapshots {
            after: None,
            limit: 2,
        },
    );
    let Some(ServerMsg::SnapshotList {
        snapshots,
        more,
        usage_exact,
    }) = h.reply_to(admin, id)
    else {
        panic!("no list reply");
    };
    assert!(usage_exact && more && snapshots.len() == 2);
    let scanned = h.engine.store_mut().usage().unwrap();
    for s in &snapshots {
        assert_eq!(Some(&s.chunks_held), scanned.get(&s.id));
        assert!(s.chunks_held > 4000, "{s:?}");
    }
}
