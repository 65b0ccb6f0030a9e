//! The on-disk `Store`, driven through the engine's `MetaStore` trait, against `MemStore`
//! (the engine's reference model): the same random calls must give the same answers (ids,
//! states, uniqueness, oldest sharer, where each snapshot reads, exclusivity, and the data
//! every live snapshot sees), including across a crash that loses uncommitted work.
//! Seeded: set CSNAP_SEED to replay.

use crate::store_support;

use csnap_proto::{SnapId, SnapshotState};
use csnap_server::engine::{MemStore, MetaStore, SnapChunk};
use csnap_server::store::{OpenOptions, Store};
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::HashMap;
use std::sync::Arc;
use store_support::*;

const ORIGIN: u64 = 10;

/// The store seen only through the engine's trait (its inherent methods use plain ids).
fn m(s: &mut Store) -> &mut dyn MetaStore {
    s
}

/// One implementation plus its simulated store data.
struct Side<S: MetaStore> {
    store: S,
    data: HashMap<u64, u64>,
}

impl<S: MetaStore> Side<S> {
    fn read(&mut self, origin: &[u64], id: SnapId, chunk: u64) -> u64 {
        match self.store.snapshot_chunk(id, chunk).unwrap() {
            SnapChunk::Origin => origin[chunk as usize],
            SnapChunk::Store { store_chunk, .. } => self.data[&store_chunk],
        }
    }

    fn origin_write(&mut self, origin: &[u64], chunk: u64) -> Option<SnapId> {
        let oldest = self.store.oldest_sharing_origin(chunk).unwrap();
        if oldest.is_some() {
            let x = self.store.reserve_chunk().unwrap();
            self.data.insert(x, origin[chunk as usize]);
            assert!(self.store.record_copy_out(chunk, x).unwrap());
        }
        oldest
    }

    /// Returns (what the snapshot read before, exclusive?) and performs the write.
    fn snapshot_write(&mut self, origin: &[u64], id: SnapId, chunk: u64, tag: u64) -> (bool, bool) {
        match self.store.snapshot_chunk(id, chunk).unwrap() {
            SnapChunk::Store {
                store_chunk,
                exclusive: true,
            } => {
                self.data.insert(store_chunk, tag);
                (true, true)
            }
            source => {
                let old = match source {
                    SnapChunk::Origin => origin[chunk as usize],
                    SnapChunk::Store { store_chunk, .. } => self.data[&store_chunk],
                };
                let x = self.store.reserve_chunk().unwrap();
                self.data.insert(x, old);
                self.store.record_snapshot_exception(id, chunk, x).unwrap();
                self.data.insert(x, tag);
                (matches!(source, SnapChunk::Store { .. }), false)
            }
        }
    }
}

fn listing<S: MetaStore>(s: &mut S) -> Vec<(SnapId, String, SnapshotState)> {
    s.list_snapshots()
        .unwrap()
        .into_iter()
        .map(|i| (i.id, i.name, i.state))
        .collect()
}

fn compare(mem: &mut Side<MemStore>, disk: &mut Side<Store>, origin: &[u64], context: &str) {
    let listed = listing(&mut mem.store);
    assert_eq!(
        listed,
        listing(&mut disk.store),
        "{context}: snapshot lists"
    );
    for c in 0..ORIGIN {
        assert_eq!(
            mem.store.oldest_sharing_origin(c).unwrap(),
            m(&mut disk.store).oldest_sharing_origin(c).unwrap(),
            "{context}: oldest sharer of chunk {c}"
        );
    }
    for (id, _, state) in &listed {
        if *state != SnapshotState::Live {
            continue;
        }
        for c in 0..ORIGIN {
            assert_eq!(
                mem.read(origin, *id, c),
                disk.read(origin, *id, c),
                "{context}: snapshot {id} chunk {c}"
            );
        }
    }
    let report = disk.store.check().unwrap();
    assert!(report.is_clean(), "{context}: {:?}", report.problems);
    mem.store.check().unwrap();
}

fn pick(rng: &mut StdRng, list: &[(SnapId, String, SnapshotState)], live: bool) -> Option<SnapId> {
    let ids: Vec<SnapId> = list
        .iter()
        .filter(|(_, _, s)| !live || *s == SnapshotState::Live)
        .map(|(id, _, _)| *id)
        .collect();
    (!ids.is_empty()).then(|| ids[rng.gen_range(0..ids.len())])
}

fn run(seed: u64, steps: usize) {
    let mut rng = rng(seed);
    let dev = device(4000);
    format(&dev, ORIGIN);
    let disk_store = open(&dev).unwrap();
    let mut disk = Side {
        store: disk_store,
        data: HashMap::new(),
    };
    let mut mem = Side {
        store: MemStore::new(4096, ORIGIN, 5_000),
        data: HashMap::new(),
    };
    let mut origin: Vec<u64> = (0..ORIGIN).map(|c| 1000 + c).collect();
    let mut tag = 10_000u64;
    for step in 0..steps {
        let context = format!("seed {seed} step {step}");
        let list = listing(&mut mem.store);
        match rng.gen_range(0..100) {
            0..=14 => {
                let name = format!("n{step}");
                let a = mem.store.create_snapshot(&name, step as u64).unwrap();
                let b = m(&mut disk.store)
                    .create_snapshot(&name, step as u64)
                    .unwrap();
                assert_eq!(a, b, "{context}: created");
            }
            15..=21 => {
                if let Some(id) = pick(&mut rng, &list, false) {
                    mem.store.delete_snapshot(id).unwrap();
                    m(&mut disk.store).delete_snapshot(id).unwrap();
                }
            }
            22..=24 => {
                if let Some(id) = pick(&mut rng, &list, true) {
                    mem.store.invalidate_snapshot(id, "test").unwrap();
                    m(&mut disk.store).invalidate_snapshot(id, "test").unwrap();
                }
            }
            25..=59 => {
                let c = rng.gen_range(0..ORIGIN);
                let a = mem.origin_write(&origin, c);
                let b = disk.origin_write(&origin, c);
                assert_eq!(a, b, "{context}: copy-out of {c}");
                tag += 1;
                origin[c as usize] = tag;
            }
            60..=84 => {
                if let Some(id) = pick(&mut rng, &list, true) {
                    let c = rng.gen_range(0..ORIGIN);
                    tag += 1;
                    let a = mem.snapshot_write(&origin, id, c, tag);
                    let b = disk.snapshot_write(&origin, id, c, tag);
                    assert_eq!(
                        a, b,
                        "{context}: snapshot {id} write to {c} (from store, exclusive)"
                    );
                }
            }
            85..=92 => {
                let budget = rng.gen_range(1..10);
                mem.store.reclaim_step(budget).unwrap();
                m(&mut disk.store).reclaim_step(budget).unwrap();
            }
            93..=97 => {
                MetaStore::commit(&mut mem.store).unwrap();
                MetaStore::commit(&mut disk.store).unwrap();
            }
            _ => {
                // Server crash: uncommitted work is lost on both sides.
                mem.store.crash();
                let recovered = Store::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
                disk.store = recovered;
            }
        }
        compare(&mut mem, &mut disk, &origin, &context);
    }
    // Delete everything: both reclaim every chunk.
    for (id, _, _) in listing(&mut mem.store) {
        mem.store.delete_snapshot(id).unwrap();
        m(&mut disk.store).delete_snapshot(id).unwrap();
    }
    for _ in 0..10_000 {
        let a = mem.store.reclaim_step(16).unwrap();
        let b = m(&mut disk.store).reclaim_step(16).unwrap();
        if a.done && b.done {
            break;
        }
    }
    let stats = m(&mut disk.store).stats().unwrap();
    assert_eq!(
        stats.free_chunks, stats.store_chunks,
        "seed {seed}: all reclaimed"
    );
    assert!(listing(&mut disk.store).is_empty());
}

#[test]
fn disk_store_agrees_with_the_reference_model() {
    let seed = seed("disk_store_agrees_with_the_reference_model");
    let mut rng = rng(seed);
    for _ in 0..5 {
        run(rng.gen(), 200);
    }
}
