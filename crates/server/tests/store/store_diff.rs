//! `Store::diff_page` against the reference model: after random snapshot creates, deletes,
//! origin copy-outs, snapshot writes, reclaim steps and reopens, the diff between any two
//! ends (live snapshots and the live origin), walked in pages of random size, names exactly
//! the chunks whose contents differ between the two ends' reference views. Seeded: set
//! CSNAP_SEED to replay a failure.

use crate::store_support;

use csnap_proto::ChunkRange;
use csnap_proto::{DiffEnd, SnapId};
use csnap_server::engine::Refusal;
use csnap_server::store::StoreError;
use rand::rngs::StdRng;
use rand::Rng;
use store_support::*;

/// Every chunk of a whole diff, walked page by page from chunk 0.
fn diff_chunks(sim: &mut Sim, from: DiffEnd, to: DiffEnd, rng: &mut StdRng) -> Vec<u64> {
    let mut chunks = Vec::new();
    let mut start = Some(0);
    let mut pages = 0;
    while let Some(at) = start {
        let page = sim
            .store
            .diff_page(from, to, at, rng.gen_range(1..8))
            .unwrap();
        pages += 1;
        assert!(pages <= sim.origin_chunks + 1, "the walk must end");
        for r in &page.ranges {
            assert!(r.count > 0 && r.start >= at, "{r:?} in a page from {at}");
            for c in r.chunks().unwrap() {
                assert!(chunks.last().is_none_or(|l| *l < c), "ascending, disjoint");
                chunks.push(c);
            }
        }
        if let Some(next) = page.next {
            assert!(next > at, "a page moves on");
        }
        start = page.next;
    }
    chunks
}

fn view(sim: &Sim, end: DiffEnd) -> Vec<u64> {
    match end {
        DiffEnd::Origin => sim.reference.origin.clone(),
        DiffEnd::Snapshot(id) => sim.reference.snaps[&id].view.clone(),
    }
}

fn check_every_pair(sim: &mut Sim, rng: &mut StdRng, context: &str) {
    let mut ends = vec![DiffEnd::Origin];
    ends.extend(
        sim.reference
            .snaps
            .iter()
            .filter(|(_, s)| s.live)
            .map(|(id, _)| DiffEnd::Snapshot(*id)),
    );
    for &from in &ends {
        for &to in &ends {
            let (a, b) = (view(sim, from), view(sim, to));
            let expected: Vec<u64> = (0..sim.origin_chunks)
                .filter(|c| a[*c as usize] != b[*c as usize])
                .collect();
            let got = diff_chunks(sim, from, to, rng);
            assert_eq!(got, expected, "{context}: diff {from:?} -> {to:?}");
        }
    }
}

fn run_model(seed: u64, steps: usize, origin_chunks: u64) {
    let mut rng = rng(seed);
    let mut sim = Sim::new(400, origin_chunks);
    for step in 0..steps {
        let context = format!("seed {seed} step {step}");
        match rng.gen_range(0..100) {
            0..=9 => {
                sim.create().unwrap();
            }
            10..=14 => sim.random_delete(&mut rng),
            15..=59 => sim.random_origin_write(&mut rng),
            60..=84 => sim.random_snapshot_write(&mut rng),
            85..=92 => {
                sim.store.reclaim_step(rng.gen_range(1..20)).unwrap();
            }
            93..=97 => sim.store.commit().unwrap(),
            _ => sim.reopen(),
        }
        if step % 10 == 9 {
            check_every_pair(&mut sim, &mut rng, &context);
        }
    }
}

#[test]
fn every_diff_names_exactly_the_chunks_that_differ() {
    let seed = seed("every_diff_names_exactly_the_chunks_that_differ");
    let mut rng = rng(seed);
    for _ in 0..6 {
        run_model(rng.gen(), 200, 40);
    }
}

#[test]
fn diff_refuses_ends_that_are_not_live_and_starts_past_the_volume() {
    let mut sim = Sim::new(100, 16);
    let a = sim.create().unwrap();
    let b = sim.create().unwrap();
    sim.delete(b).unwrap();
    let e = sim
        .store
        .diff_page(DiffEnd::Snapshot(a), DiffEnd::Snapshot(b), 0, 10)
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Refused(Refusal::NoSuchSnapshot(id)) if id == b),
        "{e}"
    );
    let e = sim
        .store
        .diff_page(DiffEnd::Snapshot(SnapId(99)), DiffEnd::Origin, 0, 10)
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Refused(Refusal::NoSuchSnapshot(SnapId(99)))),
        "{e}"
    );
    let e = sim
        .store
        .diff_page(DiffEnd::Snapshot(a), DiffEnd::Origin, 17, 10)
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::Refused(Refusal::ChunkOutOfRange { chunk: 17, .. })
        ),
        "{e}"
    );
    // The end of the volume is a valid (empty) start.
    let page = sim
        .store
        .diff_page(DiffEnd::Snapshot(a), DiffEnd::Origin, 16, 10)
        .unwrap();
    assert_eq!(page.ranges, Vec::<ChunkRange>::new());
    assert_eq!(page.next, None);
}

#[test]
fn neighbouring_changed_chunks_coalesce_and_unchanged_chunks_cost_nothing() {
    let mut sim = Sim::new(100, 64);
    let a = sim.create().unwrap();
    for chunk in [3, 4, 5, 9, 40] {
        let tag = sim.origin_write_prepare(chunk).unwrap();
        sim.reference.origin[chunk as usize] = tag;
    }
    let page = sim
        .store
        .diff_page(DiffEnd::Snapshot(a), DiffEnd::Origin, 0, 1000)
        .unwrap();
    assert_eq!(
        page.ranges,
        vec![
            ChunkRange::new(3, 3),
            ChunkRange::new(9, 1),
            ChunkRange::new(40, 1)
        ]
    );
    assert_eq!(page.next, None);
    assert_eq!(
        page.records_walked, 5,
        "one record per changed chunk, nothing else"
    );
    // The same diff the other way round, and a snapshot against itself.
    let back = sim
        .store
        .diff_page(DiffEnd::Origin, DiffEnd::Snapshot(a), 0, 1000)
        .unwrap();
    assert_eq!(back.ranges, page.ranges);
    let same = sim
        .store
        .diff_page(DiffEnd::Snapshot(a), DiffEnd::Snapshot(a), 0, 1000)
        .unwrap();
    assert!(same.ranges.is_empty() && same.next.is_none());
    // Pages of one record split at chunk boundaries and resume where they stopped.
    let first = sim
        .store
        .diff_page(DiffEnd::Snapshot(a), DiffEnd::Origin, 0, 1)
        .unwrap();
    assert_eq!(first.ranges, vec![ChunkRange::new(3, 1)]);
    assert_eq!(first.next, Some(4));
}
