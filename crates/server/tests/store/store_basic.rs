//! Store behaviour one feature at a time: format/open/reopen, the exception rules, snapshot
//! table, reclaim, store-full policy, the block cache bound, and clear errors (never a
//! panic) for damaged or foreign devices.

use crate::store_support;
use csnap_proto::SnapId;

use csnap_server::engine::Refusal;
use csnap_server::store::{
    read_superblock, BlockDevice, ChunkSource, FileDevice, FormatOptions, Geometry, MemDevice,
    OpenOptions, SnapState, Store, StoreError,
};
use std::sync::Arc;
use store_support::*;

#[test]
fn fresh_store_opens_empty_and_reopens_clean() {
    let dev = device(100);
    format(&dev, 64);
    let mut store = open(&dev).unwrap();
    assert!(!store.was_unclean());
    let info = store.info();
    assert_eq!(info.origin_chunks, 64);
    assert_eq!(info.chunk_size, CHUNK);
    assert_eq!(info.free_chunks, info.data_chunks);
    assert_eq!(info.server_generation, 1);
    assert!(store.snapshots().is_empty());
    assert!(store.check().unwrap().is_clean());
    store.close().unwrap();
    let store = open(&dev).unwrap();
    assert!(!store.was_unclean());
    assert_eq!(
        store.info().server_generation,
        2,
        "each open is a new generation"
    );
    drop(store); // no close: the next open sees an unclean shutdown
    let store = open(&dev).unwrap();
    assert!(store.was_unclean());
}

#[test]
fn one_copy_out_serves_every_sharing_snapshot() {
    let mut sim = Sim::new(100, 16);
    let a = sim.create().unwrap();
    let b = sim.create().unwrap();
    let c = sim.create().unwrap();
    assert_eq!(sim.store.oldest_sharing_origin(5).unwrap(), Some(a));
    let free = sim.store.info().free_chunks;
    let tag = sim.origin_write_prepare(5).unwrap();
    sim.reference.origin[5] = tag;
    assert_eq!(
        sim.store.info().free_chunks,
        free - 1,
        "one chunk for all three"
    );
    assert_eq!(
        sim.store.oldest_sharing_origin(5).unwrap(),
        None,
        "unique now"
    );
    assert_eq!(sim.store.chunk_records(5).unwrap().len(), 1);
    for id in [a, b, c] {
        assert!(matches!(
            sim.store.snapshot_chunk(id, 5).unwrap(),
            ChunkSource::Store {
                exclusive: false,
                ..
            }
        ));
    }
    // A later snapshot shares the new origin contents; the next write copies once more.
    let d = sim.create().unwrap();
    assert_eq!(sim.store.oldest_sharing_origin(5).unwrap(), Some(d));
    assert_eq!(sim.store.snapshot_chunk(d, 5).unwrap(), ChunkSource::Origin);
    let tag = sim.origin_write_prepare(5).unwrap();
    sim.reference.origin[5] = tag;
    assert_eq!(sim.store.chunk_records(5).unwrap().len(), 2);
    sim.verify("after two copy-outs");
}

#[test]
fn snapshot_writes_unshare_then_write_in_place() {
    let mut sim = Sim::new(100, 8);
    let a = sim.create().unwrap();
    let b = sim.create().unwrap();
    let c = sim.create().unwrap();
    let tag = sim.origin_write_prepare(2).unwrap();
    sim.reference.origin[2] = tag;
    // b writes chunk 2: its run is split around it.
    let at = sim.snapshot_write_prepare(b, 2).unwrap().unwrap();
    let t = sim.tag();
    sim.snapshot_write_data(b, 2, at, t).unwrap();
    let records = sim.store.chunk_records(2).unwrap();
    assert_eq!(records.len(), 3, "{records:?}");
    assert!(records[0].shared && records[2].shared && !records[1].shared);
    assert_eq!(
        sim.store.snapshot_chunk(b, 2).unwrap(),
        ChunkSource::Store {
            store_chunk: at,
            exclusive: true
        }
    );
    // A second write to the same chunk goes in place.
    assert_eq!(sim.snapshot_write_prepare(b, 2).unwrap(), Some(at));
    // A snapshot that still reads the origin gets its own chunk; the others keep theirs.
    let d = sim.create().unwrap();
    let own = sim.snapshot_write_prepare(d, 2).unwrap().unwrap();
    let t = sim.tag();
    sim.snapshot_write_data(d, 2, own, t).unwrap();
    sim.verify("after unshares");
    // Deleting a and c leaves their shared chunk unused: reclaim frees it.
    sim.delete(a).unwrap();
    sim.delete(c).unwrap();
    let used = sim.store.info().data_chunks - sim.store.info().free_chunks;
    sim.drain_reclaim();
    let after = sim.store.info().data_chunks - sim.store.info().free_chunks;
    assert_eq!(after, used - 1);
    sim.verify("after reclaim");
}

#[test]
fn origin_copy_out_fills_gaps_left_by_snapshot_writes() {
    let mut sim = Sim::new(100, 4);
    let ids: Vec<SnapId> = (0..5).map(|_| sim.create().unwrap()).collect();
    // Snapshot 3 writes chunk 1 while everyone reads the origin.
    let own = sim.snapshot_write_prepare(ids[2], 1).unwrap().unwrap();
    let t = sim.tag();
    sim.snapshot_write_data(ids[2], 1, own, t).unwrap();
    assert_eq!(sim.store.oldest_sharing_origin(1).unwrap(), Some(ids[0]));
    let free = sim.store.info().free_chunks;
    let tag = sim.origin_write_prepare(1).unwrap();
    sim.reference.origin[1] = tag;
    assert_eq!(sim.store.info().free_chunks, free - 1, "still one copy");
    let records = sim.store.chunk_records(1).unwrap();
    assert_eq!(
        records.len(),
        3,
        "two gap runs and the snapshot's own: {records:?}"
    );
    assert!(records.iter().all(|r| r.fill));
    assert_eq!(sim.store.oldest_sharing_origin(1).unwrap(), None);
    sim.verify("after gap fill");
}

#[test]
fn deleted_snapshots_leave_the_list_at_once_and_the_table_after_reclaim() {
    let mut sim = Sim::new(100, 8);
    let a = sim.create().unwrap();
    let b = sim.create().unwrap();
    for c in 0..8 {
        let tag = sim.origin_write_prepare(c).unwrap();
        sim.reference.origin[c as usize] = tag;
    }
    sim.delete(a).unwrap();
    assert!(sim.store.snapshot(a).is_none());
    assert!(matches!(
        sim.store.delete_snapshot(a),
        Err(StoreError::Refused(Refusal::NoSuchSnapshot(_)))
    ));
    // The name is free again at once.
    let name = sim.reference.snaps[&b].name.clone();
    assert!(matches!(
        sim.store.create_snapshot(&name, 0),
        Err(StoreError::Refused(Refusal::NameTaken(_)))
    ));
    sim.delete(b).unwrap();
    sim.store.commit().unwrap();
    // A crash mid-reclaim resumes: reopen without close, then finish.
    sim.store.reclaim_step(1).unwrap();
    sim.store.commit().unwrap();
    let store = std::mem::replace(&mut sim.store, open(&device_formatted()).unwrap());
    drop(store);
    sim.store = open(&sim.dev).unwrap();
    sim.drain_reclaim();
    let info = sim.store.info();
    assert_eq!(info.free_chunks, info.data_chunks);
    let report = sim.store.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.snapshots, 0, "deleted rows are gone from the table");
}

fn device_formatted() -> MemDevice {
    let dev = device(0);
    format(&dev, 1);
    dev
}

#[test]
fn full_store_invalidates_the_oldest_sharing_snapshot() {
    let mut sim = Sim::new(0, 64); // 16 data chunks
    let old = sim.create().unwrap();
    for c in 0..16 {
        let tag = sim.origin_write_prepare(c).unwrap();
        sim.reference.origin[c as usize] = tag;
    }
    assert_eq!(sim.store.info().free_chunks, 0);
    let young = sim.create().unwrap();
    // Chunk 20 needs a copy for both; the store is full: the oldest goes, its 16 chunks
    // are reclaimed, and the copy-out proceeds for the young one.
    let (store_chunk, invalidated) = reserve_copy_out(&mut sim.store, 20).unwrap();
    assert_eq!(invalidated, vec![old]);
    assert!(store_chunk.is_some());
    let rec = sim.store.snapshot(old).unwrap();
    assert!(matches!(&rec.state, SnapState::Invalid { reason } if reason.contains("store full")));
    assert!(matches!(
        sim.store.snapshot_chunk(old, 0),
        Err(StoreError::Refused(Refusal::NotLive(_)))
    ));
    assert_eq!(sim.store.oldest_sharing_origin(20).unwrap(), Some(young));
    sim.store.release_chunk(store_chunk.unwrap()).unwrap();
    // Snapshot writes on a full store fail instead of sacrificing anyone.
    let mut sim = Sim::new(0, 64);
    let a = sim.create().unwrap();
    for c in 0..16 {
        let at = sim.snapshot_write_prepare(a, c).unwrap();
        assert!(at.is_some());
    }
    assert_eq!(sim.snapshot_write_prepare(a, 17).unwrap(), None);
    assert!(matches!(
        sim.store.reserve_chunk(),
        Err(StoreError::Refused(Refusal::Full))
    ));
}

#[test]
fn bad_names_and_out_of_range_chunks_are_refused() {
    let mut sim = Sim::new(10, 8);
    for bad in ["", "a/b", "a@b", "a\0b", &"x".repeat(256)] {
        assert!(matches!(
            sim.store.create_snapshot(bad, 0),
            Err(StoreError::Refused(Refusal::BadName { .. }))
        ));
    }
    assert!(sim.store.create_snapshot(&"é".repeat(127), 0).is_ok());
    let err = sim.store.oldest_sharing_origin(8).unwrap_err();
    assert_eq!(
        err.to_string(),
        "origin chunk 8 is beyond the end of the origin (8 chunks)"
    );
    assert!(matches!(
        sim.store.record_copy_out(0, 12345),
        Err(StoreError::Refused(Refusal::NotReserved(12345)))
    ));
    assert!(matches!(
        sim.store.snapshot_chunk(SnapId(99), 0),
        Err(StoreError::Refused(Refusal::NoSuchSnapshot(SnapId(99))))
    ));
}

#[test]
fn metadata_cache_stays_within_its_bound() {
    let dev = device(20_000);
    format(&dev, 100_000);
    let opts = OpenOptions {
        cache_blocks: 600,
        ..OpenOptions::default()
    };
    let mut store = Store::open(Arc::new(dev.clone()), opts).unwrap();
    store.create_snapshot("a", 0).unwrap();
    // 15,000 copy-outs of scattered chunks: a tree of well over 600 blocks.
    for i in 0..15_000u64 {
        let chunk = (i * 7919) % 100_000;
        record_copy_out(&mut store, chunk).unwrap();
        if i % 500 == 0 {
            store.commit().unwrap();
        }
        assert!(store.cache_blocks() <= 600 + 2 * 246 + 64);
    }
    store.commit().unwrap();
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.exception_records, 15_000);
    assert!(report.meta_blocks_used > 120);
    let stats = store.meta_stats();
    assert!(stats.checkpoints > 0 && stats.cache_misses > 0, "{stats:?}");
    store.close().unwrap();
    let mut store = open(&dev).unwrap();
    assert_eq!(store.check().unwrap().exception_records, 15_000);
}

// ---- damaged and foreign devices ----

#[test]
fn foreign_device_is_not_a_store() {
    let dev = MemDevice::new(8 << 20);
    dev.write_at(&[0x55; 8192], 0).unwrap();
    match open(&dev) {
        Err(StoreError::WrongMagic { slot: 0, found }) => assert_eq!(found, [0x55; 8]),
        other => panic!("{:?}", other.err()),
    }
    let tiny = MemDevice::new(4096);
    assert!(matches!(open(&tiny), Err(StoreError::TooSmall { .. })));
}

#[test]
fn corrupt_superblock_copy_falls_back_then_both_corrupt_is_a_clear_error() {
    let dev = device(10);
    format(&dev, 8);
    let mut store = open(&dev).unwrap();
    store.create_snapshot("keep", 1).unwrap();
    store.close().unwrap();
    let newest = read_superblock(&dev).unwrap();
    // Damage the newest copy: the older one (same store, older tail) is used instead and
    // the journal brings it up to date.
    dev.corrupt(newest.slot() * 4096 + 200, &[0xff; 4]);
    let store = open(&dev).unwrap();
    assert_eq!(store.snapshots().len(), 1);
    drop(store);
    for slot in 0..2u64 {
        dev.corrupt(slot * 4096 + 300, &[0xee; 8]);
    }
    let err = open(&dev).err().unwrap();
    let text = err.to_string();
    assert!(
        text.contains("corrupt superblock slot") && text.contains("checksum mismatch"),
        "{text}"
    );
}

#[test]
fn unsupported_version_is_named() {
    let dev = device(10);
    format(&dev, 8);
    for slot in 0..2u64 {
        let mut b = vec![0u8; 4096];
        dev.read_at(&mut b, slot * 4096).unwrap();
        b[8..12].copy_from_slice(&7u32.to_le_bytes());
        let crc = {
            let mut z = b.clone();
            z[12..16].fill(0);
            crc32c::crc32c(&z)
        };
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        dev.corrupt(slot * 4096, &b);
    }
    let err = open(&dev).err().unwrap();
    assert!(matches!(
        err,
        StoreError::UnsupportedVersion {
            found: 7,
            supported: 1,
            ..
        }
    ));
    assert!(err.to_string().contains("version 7"), "{err}");
}

#[test]
fn torn_journal_tail_is_ignored_and_committed_work_kept() {
    let dev = device(50);
    format(&dev, 8);
    let mut store = open(&dev).unwrap();
    store.create_snapshot("one", 1).unwrap();
    store.commit().unwrap();
    store.create_snapshot("two", 2).unwrap();
    store.commit().unwrap();
    drop(store); // crash: both commits only in the journal
                 // Tear the second (newest) transaction: flip bytes in its last block.
    let g = read_superblock(&dev).unwrap().geometry;
    let mut records = Vec::new();
    for pos in 0..g.journal_blocks {
        let mut b = vec![0u8; 4096];
        dev.read_at(&mut b, (g.journal_start + pos) * 4096).unwrap();
        if &b[0..8] == b"CSNAPJTX" {
            let seq = u64::from_le_bytes(b[16..24].try_into().unwrap());
            let count = u32::from_le_bytes(b[12..16].try_into().unwrap()) as u64;
            records.push((seq, pos, count));
        }
    }
    records.sort();
    assert_eq!(records.len(), 2, "{records:?}");
    let (_, pos, count) = records[1];
    dev.corrupt((g.journal_start + pos + count) * 4096 + 100, &[0xab; 16]);
    let torn = true;
    assert!(torn, "found the second commit record");
    let mut store = open(&dev).unwrap();
    assert!(store.was_unclean());
    let names: Vec<String> = store.snapshots().into_iter().map(|r| r.name).collect();
    assert_eq!(
        names,
        vec!["one"],
        "the torn transaction is dropped, the first kept"
    );
    assert!(store.check().unwrap().is_clean());
}

#[test]
fn garbage_metadata_blocks_give_errors_not_panics() {
    let dev = device(50);
    format(&dev, 64);
    let mut store = open(&dev).unwrap();
    let id = store.create_snapshot("a", 1).unwrap().id;
    for c in 0..64 {
        assert!(record_copy_out(&mut store, c).unwrap());
    }
    store.close().unwrap();
    let sb = read_superblock(&dev).unwrap();
    let g = sb.geometry;
    // Garbage over each node and bitmap block in turn: open or use must fail cleanly.
    let mut seen_errors = 0;
    for block in g.bitmap_start..g.meta_start + 8 {
        let fresh = MemDevice::new(dev.len());
        let mut image = vec![0u8; dev.len() as usize];
        dev.read_at(&mut image, 0).unwrap();
        fresh.write_at(&image, 0).unwrap();
        fresh.flush().unwrap();
        fresh.corrupt(block * 4096 + 40, &[0x5a; 64]);
        let result = open(&fresh).and_then(|mut s| {
            for c in 0..64 {
                s.snapshot_chunk(id, c)?;
            }
            s.check()
        });
        match result {
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains(&format!("block {block}")), "{text}");
                seen_errors += 1;
            }
            Ok(report) => assert!(
                !report.is_clean() || block >= g.meta_start + 2,
                "block {block}: damage went unnoticed"
            ),
        }
    }
    assert!(seen_errors >= 3, "{seen_errors}");
}

#[test]
fn file_device_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let size = Geometry::smallest_store(65536).unwrap() + 64 * 65536;
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    for direct in [false, true] {
        let dev = match FileDevice::open(&path, direct) {
            Ok(d) => d,
            Err(e) if direct => {
                eprintln!("O_DIRECT not supported here ({e}); skipping that half");
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        Store::format(
            &dev,
            &FormatOptions {
                chunk_size: 65536,
                origin_size: 1 << 30,
                now: 5,
                uuid: Some([9; 16]),
            },
        )
        .unwrap();
        let mut store = Store::open(Arc::new(dev), OpenOptions::default()).unwrap();
        store.create_snapshot("f", 1).unwrap();
        assert!(record_copy_out(&mut store, 1000).unwrap());
        store.close().unwrap();
        let dev = FileDevice::open(&path, direct).unwrap();
        let mut store = Store::open(Arc::new(dev), OpenOptions::default()).unwrap();
        assert_eq!(store.info().uuid, "09090909-0909-0909-0909-090909090909");
        assert_eq!(store.chunk_records(1000).unwrap().len(), 1);
        assert!(store.check().unwrap().is_clean());
    }
}

#[test]
fn reservations_are_not_counted_free_and_vanish_on_crash() {
    let dev = device(0); // 16 data chunks
    format(&dev, 64);
    let mut store = open(&dev).unwrap();
    store.create_snapshot("a", 1).unwrap();
    store.commit().unwrap();
    let total = store.info().free_chunks;
    let reserved: Vec<u64> = (0..total).map(|_| store.reserve_chunk().unwrap()).collect();
    assert_eq!(store.free_chunks(), 0);
    assert!(matches!(
        store.reserve_chunk(),
        Err(StoreError::Refused(Refusal::Full))
    ));
    store.release_chunk(reserved[0]).unwrap();
    assert_eq!(store.free_chunks(), 1);
    assert!(matches!(
        store.release_chunk(reserved[0]),
        Err(StoreError::Refused(Refusal::NotReserved(_)))
    ));
    // Crash with reservations outstanding: all free again, nothing leaked.
    drop(store);
    let mut store = open(&dev).unwrap();
    assert_eq!(store.free_chunks(), total);
    assert!(store.check().unwrap().is_clean());
}

/// The rollback record lives in the journaled root: a committed one survives a crash, an
/// uncommitted change does not, ending it clears it, and the checker accepts it.
#[test]
fn rollback_record_is_journaled_with_the_root() {
    use csnap_server::store::RollbackRecord;
    let dev = device(16);
    format(&dev, 64);
    let mut store = open(&dev).unwrap();
    assert_eq!(store.rollback(), None, "a fresh store has none");
    let source = store.create_snapshot("source", 1).unwrap().id;
    let pin = store.create_snapshot("pin", 2).unwrap().id;
    let record = RollbackRecord {
        source: source.0,
        pin: pin.0,
        cursor: 7,
    };
    store.set_rollback(Some(record)).unwrap();
    store.commit().unwrap();
    store
        .set_rollback(Some(RollbackRecord {
            cursor: 9,
            ..record
        }))
        .unwrap();
    drop(store); // crash: the cursor's advance to 9 was not committed
    let mut store = open(&dev).unwrap();
    assert_eq!(store.rollback(), Some(record));
    assert!(store.check().unwrap().is_clean());
    for bad in [
        RollbackRecord { pin: 77, ..record },
        RollbackRecord {
            cursor: 65,
            ..record
        },
    ] {
        assert!(store.set_rollback(Some(bad)).is_err(), "{bad:?}");
    }
    store.set_rollback(None).unwrap();
    store.commit().unwrap();
    drop(store);
    let mut store = open(&dev).unwrap();
    assert_eq!(store.rollback(), None);
    assert!(store.check().unwrap().is_clean());
}
