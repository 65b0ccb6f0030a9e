//! First-touch origin writes over many small chunks (4 KiB chunks: a 64 KiB write is 16
//! of them): one copy-out per chunk into consecutive store chunks (so the shell can run
//! them as one read and one write), the grant only once every copy is recorded and
//! committed, chunks already unique left alone, and a crash between the copies and
//! their commit losing nothing the grant depended on.

use crate::engine_common;

use csnap_proto::*;
use csnap_server::engine::*;
use engine_common::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Chunks of one 64 KiB write with 4 KiB chunks.
const WRITE_CHUNKS: u32 = 16;

fn origin_with_snapshot(h: &mut Harness) -> (ConnId, SnapId) {
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let snap = h.create_snapshot(admin, "s0", &[origin]);
    for (c, data) in h.origin.iter_mut().enumerate() {
        *data = [c as u64 + 100, 7];
    }
    (origin, snap)
}

fn query_write(h: &mut Harness, origin: ConnId, first: u64, count: u32) -> RequestId {
    h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(first, count),
        },
    )
}

/// The snapshot reads each chunk in `chunks` from its own copy of the origin's old data.
fn assert_preserved(h: &mut Harness, snap: SnapId, chunks: std::ops::Range<u64>) {
    let mut store = h.engine.store().clone();
    for c in chunks {
        match store.snapshot_chunk(snap, c).unwrap() {
            SnapChunk::Store { store_chunk, .. } => assert_eq!(
                h.store_data[store_chunk as usize],
                [c + 100, 7],
                "chunk {c}'s copy in store chunk {store_chunk}"
            ),
            SnapChunk::Origin => panic!("chunk {c} not copied out"),
        }
    }
}

/// The write `(conn, id)` was granted.
fn assert_granted(h: &mut Harness, conn: ConnId, id: RequestId) {
    let reply = h.reply_to(conn, id);
    assert!(
        matches!(reply, Some(ServerMsg::OriginWriteOk { .. })),
        "write {id:?} not granted: {reply:?}"
    );
}

/// Every chunk copied out at most once, and the snapshot keeps `chunks` as they were.
fn assert_copied_once_and_preserved(h: &mut Harness, snap: SnapId, chunks: std::ops::Range<u64>) {
    assert!(h.copy_outs.values().all(|&n| n == 1), "{:?}", h.copy_outs);
    assert_preserved(h, snap, chunks);
}

#[test]
fn a_write_over_sixteen_unshared_chunks_copies_each_into_consecutive_store_chunks() {
    let seed =
        seed("a_write_over_sixteen_unshared_chunks_copies_each_into_consecutive_store_chunks");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut h = Harness::new(config(), 64, 64);
    let (origin, snap) = origin_with_snapshot(&mut h);
    let id = query_write(&mut h, origin, 16, WRITE_CHUNKS);
    let copies: Vec<_> = h.copies.iter().map(|&(_, from, to)| (from, to)).collect();
    assert_eq!(
        copies.len(),
        WRITE_CHUNKS as usize,
        "one copy-out per chunk"
    );
    for (i, (from, to)) in copies.iter().enumerate() {
        assert_eq!(
            *from,
            CopySource::Origin {
                chunk: 16 + i as u64
            }
        );
        assert_eq!(
            *to,
            copies[0].1 + i as u64,
            "consecutive store chunks: {copies:?}"
        );
    }
    // The copies finish in any order; the grant waits for the last and its commit.
    let mut order: Vec<usize> = (0..WRITE_CHUNKS as usize).collect();
    order.shuffle(&mut rng);
    for (done, _) in order.iter().enumerate() {
        let index = rng.gen_range(0..h.copies.len());
        assert!(h.run_copy_at(index));
        if done + 1 < order.len() {
            // Commits of the copies recorded so far may run; the grant may not.
            if rng.gen_bool(0.5) {
                h.run_commit();
            }
            assert_eq!(
                h.reply_to(origin, id),
                None,
                "granted with copies in flight"
            );
        }
    }
    assert!(h.copies.is_empty(), "no copy started twice");
    h.settle();
    assert_eq!(
        h.reply_to(origin, id),
        Some(ServerMsg::OriginWriteOk {
            ranges: range(16, WRITE_CHUNKS),
            unique: true
        })
    );
    let order: Vec<&str> = h.trace.iter().map(|s| s.as_str()).collect();
    let ok = order
        .iter()
        .position(|s| s.contains("OriginWriteOk"))
        .unwrap();
    let last_commit = order[..ok].iter().rposition(|s| *s == "commit done");
    assert!(
        last_commit.is_some(),
        "granted before any commit: {order:?}"
    );
    assert_copied_once_and_preserved(&mut h, snap, 16..32);
}

#[test]
fn a_partly_unique_write_copies_only_the_shared_chunks() {
    let mut h = Harness::new(config(), 64, 64);
    let (origin, snap) = origin_with_snapshot(&mut h);
    // Chunks 20..24 are unique already.
    let first = query_write(&mut h, origin, 20, 4);
    h.settle();
    assert_granted(&mut h, origin, first);
    h.copy_log.clear();
    let id = query_write(&mut h, origin, 16, WRITE_CHUNKS);
    let copied: Vec<u64> = h
        .copies
        .iter()
        .map(|&(_, from, _)| match from {
            CopySource::Origin { chunk } => chunk,
            other => panic!("copy from {other:?}"),
        })
        .collect();
    assert_eq!(copied, (16..20).chain(24..32).collect::<Vec<_>>());
    h.settle();
    assert_granted(&mut h, origin, id);
    assert_copied_once_and_preserved(&mut h, snap, 16..32);
}

#[test]
fn a_write_sharing_a_chunk_with_one_in_flight_waits_for_its_copy() {
    let mut h = Harness::new(config(), 64, 64);
    let (origin, snap) = origin_with_snapshot(&mut h);
    let o2 = h.connect(2, ClientKind::Origin, false);
    let a = query_write(&mut h, origin, 16, WRITE_CHUNKS);
    // Overlaps a's last chunk, whose copy-out is in flight.
    let b = query_write(&mut h, o2, 31, 2);
    h.settle();
    for (conn, id) in [(origin, a), (o2, b)] {
        assert_granted(&mut h, conn, id);
    }
    assert_copied_once_and_preserved(&mut h, snap, 16..33);
}

#[test]
fn a_crash_between_the_copies_and_their_commit_loses_no_granted_write() {
    let mut h = Harness::new(config(), 64, 64);
    let (origin, snap) = origin_with_snapshot(&mut h);
    let id = query_write(&mut h, origin, 16, WRITE_CHUNKS);
    // Half the copies are recorded and committed; the rest are written but not committed.
    for _ in 0..WRITE_CHUNKS / 2 {
        assert!(h.run_one_copy());
    }
    while h.run_commit() {}
    while h.run_one_copy() {}
    assert_eq!(
        h.reply_to(origin, id),
        None,
        "granted before the last commit"
    );
    h.failover(config());
    // The committed half survived; the other half reads the origin, which nobody wrote.
    let mut store = h.engine.store().clone();
    for c in 16..32u64 {
        let copied = matches!(
            store.snapshot_chunk(snap, c).unwrap(),
            SnapChunk::Store { .. }
        );
        assert_eq!(copied, c < 24, "chunk {c} after the crash");
    }
    // The client resends its write: only the chunks not yet committed are copied again.
    let origin = h.connect(1, ClientKind::Origin, true);
    h.copy_outs.clear();
    let id = query_write(&mut h, origin, 16, WRITE_CHUNKS);
    let mut again: Vec<u64> = h.copy_outs.keys().copied().collect();
    again.sort_unstable();
    assert_eq!(again, (24..32).collect::<Vec<_>>());
    h.settle();
    assert_granted(&mut h, origin, id);
    assert_preserved(&mut h, snap, 16..32);
}
