//! Progress the store reports for csnapctl: format's callback (blocks written of the total,
//! monotone, ending at the total) and where a reclaim pass is (origin chunk position,
//! the snapshots it reclaims, none when done).

use crate::store_support::record_copy_out;
use csnap_server::store::tool::{format_paths_with_progress, FormatRequest};
use csnap_server::store::{FileDevice, FormatOptions, FormatProgress, OpenOptions, Store};
use std::sync::Arc;

#[test]
fn format_reports_monotone_progress_ending_at_the_total() {
    let dir = tempfile::tempdir().unwrap();
    let origin = dir.path().join("origin");
    let store = dir.path().join("store");
    // Sparse; 4K chunks over 2 GiB: enough bitmap blocks for several batches.
    std::fs::File::create(&origin)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    std::fs::File::create(&store)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let mut seen: Vec<FormatProgress> = Vec::new();
    format_paths_with_progress(
        &FormatRequest {
            origin: &origin,
            store: &store,
            chunk_size: 4096,
            force: false,
            now: 1,
        },
        &mut |p| seen.push(p),
    )
    .unwrap();
    assert!(seen.len() >= 2, "{seen:?}");
    let total = seen[0].total_blocks;
    assert_eq!(seen[0].done_blocks, 0);
    assert!(seen.iter().all(|p| p.total_blocks == total));
    assert!(seen
        .windows(2)
        .all(|w| w[0].done_blocks <= w[1].done_blocks));
    assert_eq!(seen.last().map(|p| p.done_blocks), Some(total));
}

#[test]
fn reclaim_position_walks_the_origin_chunks_and_names_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let dev = Arc::new(FileDevice::open(&path, false).unwrap());
    Store::format(
        dev.as_ref(),
        &FormatOptions {
            chunk_size: 4096,
            origin_size: 1 << 20,
            now: 1,
            uuid: None,
        },
    )
    .unwrap();
    let mut store = Store::open(dev, OpenOptions::default()).unwrap();
    assert_eq!(store.reclaim_position(), None);
    let id = store.create_snapshot("a", 1).unwrap().id;
    for chunk in 0..256 {
        record_copy_out(&mut store, chunk).unwrap();
    }
    store.commit().unwrap();
    store.delete_snapshot(id).unwrap();
    assert_eq!(store.reclaim_position(), Some((0, vec![id])));
    let mut last = 0;
    let mut steps = 0;
    while !store.reclaim_step(16).unwrap().done {
        steps += 1;
        if let Some((position, ids)) = store.reclaim_position() {
            assert!(position >= last, "{position} after {last}");
            assert!(position <= 256);
            assert_eq!(ids, vec![id]);
            last = position;
        }
        assert!(steps < 1_000, "reclaim did not finish");
    }
    assert!(steps >= 8, "{steps} steps for 256 records at 16 a step");
    assert_eq!(store.reclaim_position(), None);
}
