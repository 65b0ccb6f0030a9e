//! Store benchmark (prints figures, asserts nothing about speed). Run it in release mode:
//!
//! ```text
//! cargo test --release -p csnap-server --test store store_bench:: -- --ignored --nocapture
//! ```
//!
//! Set CSNAP_BENCH_DIR to put the store file on a real disk (default: the system temp dir);
//! fdatasync costs dominate there, which is what batching commits is for.

use crate::store_support::record_copy_out;
use csnap_proto::SnapId;
use csnap_server::store::{FileDevice, FormatOptions, Geometry, OpenOptions, Store};
use std::sync::Arc;
use std::time::Instant;

const CHUNK: u64 = 16384;

fn bench(snapshots: u64, copy_outs: u64, batch: u64) {
    let dir = match std::env::var_os("CSNAP_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let path = dir.path().join("store");
    let size = Geometry::smallest_store(CHUNK).unwrap() + (copy_outs * 2 + 1000) * CHUNK;
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    let dev = FileDevice::open(&path, false).unwrap();
    Store::format(
        &dev,
        &FormatOptions {
            chunk_size: CHUNK,
            origin_size: 1 << 40,
            now: 0,
            uuid: None,
        },
    )
    .unwrap();
    let mut store = Store::open(Arc::new(dev), OpenOptions::default()).unwrap();
    let t = Instant::now();
    for i in 0..snapshots {
        store.create_snapshot(&format!("s{i}"), i).unwrap();
    }
    store.commit().unwrap();
    let create = t.elapsed();
    let t = Instant::now();
    let mut done = 0;
    for i in 0..copy_outs {
        // Scattered chunks: every copy-out is a new btree record.
        let chunk = (i * 2_654_435_761) % ((1 << 40) / CHUNK);
        if record_copy_out(&mut store, chunk).unwrap() {
            done += 1;
        }
        if (i + 1) % batch == 0 {
            store.commit().unwrap();
        }
    }
    store.commit().unwrap();
    let copy = t.elapsed();
    let t = Instant::now();
    let ids: Vec<SnapId> = store.live_snapshots().collect();
    let lookups = 100_000u64;
    for i in 0..lookups {
        let id = ids[(i as usize * 7) % ids.len()];
        let chunk = ((i % copy_outs) * 2_654_435_761) % ((1 << 40) / CHUNK);
        store.snapshot_chunk(id, chunk).unwrap();
    }
    let lookup = t.elapsed();
    let stats = store.meta_stats();
    println!(
        "{snapshots:>6} snapshots: create {:>8.1} µs each | {done} copy-outs, commit every {batch:>4}: {:>7.2} µs each ({:.0}/s), {} commits, {:.1} journal blocks per commit | lookup {:>5.2} µs",
        create.as_secs_f64() * 1e6 / snapshots as f64,
        copy.as_secs_f64() * 1e6 / copy_outs as f64,
        copy_outs as f64 / copy.as_secs_f64(),
        stats.commits,
        stats.journal_blocks_written as f64 / stats.commits.max(1) as f64,
        lookup.as_secs_f64() * 1e6 / lookups as f64,
    );
    store.close().unwrap();
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture, preferably --release"]
fn store_benchmark() {
    for (snapshots, batch) in [(1, 1), (1, 64), (100, 64), (10_000, 64), (10_000, 1024)] {
        bench(snapshots, 20_000, batch);
    }
}
