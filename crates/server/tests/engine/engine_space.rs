//! The engine when the store runs out of space: which snapshot the store-full policy gives
//! up (the oldest of the volume first), a full metadata (node) area handled by the same
//! policy instead of stopping the server (also after a restart), and the usage warnings
//! before either area is full.

use crate::engine_common;

use csnap_proto::*;
use csnap_server::engine::*;
use engine_common::*;

use engine_common::disk::DiskStore;

/// An origin write of chunk `c` as a client does it: ask, and once granted, write the
/// origin (here: the simulated origin) with `value`.
fn origin_write<S: TestStore>(h: &mut Harness<S>, origin: ConnId, c: u64, value: u64) {
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(c, 1),
        },
    );
    h.settle();
    assert!(h.fatal.is_none(), "the server stopped: {:?}", h.fatal);
    match h.reply_to(origin, w) {
        Some(ServerMsg::OriginWriteOk { .. }) => h.origin[c as usize] = [value, value],
        other => panic!("origin write of chunk {c}: {other:?}"),
    }
}

/// What snapshot `snap` reads at chunk `c`, through the four-message protocol.
fn snapshot_read<S: TestStore>(h: &mut Harness<S>, reader: ConnId, snap: SnapId, c: u64) -> Data {
    let r = h.send(
        reader,
        ClientMsg::QuerySnapshotRead {
            snap,
            ranges: range(c, 1),
        },
    );
    h.settle();
    match h.reply_to(reader, r) {
        Some(ServerMsg::SnapshotReadOk {
            store,
            origin_locked,
        }) => {
            if let Some(a) = store.first() {
                return h.store_data[a.store_chunk as usize];
            }
            assert_eq!(origin_locked, range(c, 1));
            let data = h.origin[c as usize];
            let f = h.send(
                reader,
                ClientMsg::FinishSnapshotRead {
                    snap,
                    ranges: range(c, 1),
                },
            );
            assert_eq!(h.reply_to(reader, f), Some(ServerMsg::FinishSnapshotReadOk));
            data
        }
        other => panic!("read of snapshot {snap} chunk {c}: {other:?}"),
    }
}

fn list<S: TestStore>(h: &mut Harness<S>, admin: ConnId) -> Vec<SnapshotInfo> {
    let l = h.send(
        admin,
        ClientMsg::ListSnapshots {
            after: None,
            limit: u32::MAX,
        },
    );
    match h.reply_to(admin, l) {
        Some(ServerMsg::SnapshotList { snapshots, .. }) => snapshots,
        other => panic!("no list: {other:?}"),
    }
}

fn live(snapshots: &[SnapshotInfo]) -> Vec<SnapId> {
    snapshots
        .iter()
        .filter(|s| s.state == SnapshotState::Live)
        .map(|s| s.id)
        .collect()
}

fn invalid(snapshots: &[SnapshotInfo]) -> Vec<SnapId> {
    snapshots
        .iter()
        .filter(|s| matches!(s.state, SnapshotState::Invalid { .. }))
        .map(|s| s.id)
        .collect()
}

/// Finding: invalidate-oldest gave up the snapshot that shared the chunk being copied,
/// which for a chunk already copied for the older snapshots is the NEWEST one.
#[test]
fn store_full_gives_up_the_oldest_snapshot_of_the_volume_first() {
    let mut h = Harness::new(config(), 64, 8);
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let s1 = h.create_snapshot(admin, "s1", &[origin]);
    for c in 0..4 {
        origin_write(&mut h, origin, c, 10 + c);
    }
    let s2 = h.create_snapshot(admin, "s2", &[origin]);
    let s3 = h.create_snapshot(admin, "s3", &[origin]);
    for c in 0..4 {
        origin_write(&mut h, origin, c, 20 + c);
    }
    // All 8 chunks used: chunks 0..4 for s1 alone, and again for s2+s3. s4 shares chunk 0
    // with nobody else, so the store-full policy must not pick it for being "the oldest
    // sharing the chunk": s1, the oldest of the volume, goes.
    let s4 = h.create_snapshot(admin, "s4", &[origin]);
    origin_write(&mut h, origin, 0, 30);
    let snapshots = list(&mut h, admin);
    assert_eq!(invalid(&snapshots), vec![s1], "{snapshots:?}");
    assert_eq!(live(&snapshots), vec![s2, s3, s4]);
    let errors = h.errors(LogLevel::Error);
    assert!(
        errors
            .iter()
            .any(|m| m.contains("STORE FULL") && m.contains(&format!("snapshot {s1}"))),
        "{errors:?}"
    );
    // The survivors still read what they saw at creation.
    let reader = h.connect(20, ClientKind::Snapshot { snap: s4 }, false);
    assert_eq!(snapshot_read(&mut h, reader, s4, 0), [20, 20]);
    let reader = h.connect(21, ClientKind::Snapshot { snap: s2 }, false);
    assert_eq!(snapshot_read(&mut h, reader, s2, 0), [10, 10]);
    h.engine.store().check().unwrap();
}

/// Rounds of "snapshot, then overwrite chunks 0..per_round" on a store whose node area is
/// small: every round's records interleave with the others', so the node area fills long
/// before the data area.
fn fill_rounds(
    h: &mut Harness<DiskStore>,
    origin: ConnId,
    admin: ConnId,
    rounds: std::ops::Range<u64>,
    per_round: u64,
) -> Vec<SnapId> {
    let mut snaps = Vec::new();
    for round in rounds {
        snaps.push(h.create_snapshot(admin, &format!("r{round}"), &[origin]));
        for c in 0..per_round {
            origin_write(h, origin, c, round * 10_000 + c);
        }
    }
    snaps
}

/// Finding: a full metadata area was a fatal error (MetadataFull mapped to Corrupt), the
/// server stopped, replayed and died again on the next copy-out.
#[test]
fn full_metadata_area_invalidates_the_oldest_snapshot_and_the_server_keeps_serving() {
    let store = DiskStore::with_metadata_blocks(40, 6_000, 512);
    let mut h = Harness::with_store(config(), store);
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let snaps = fill_rounds(&mut h, origin, admin, 0..12, 400);
    assert!(h.fatal.is_none());
    let snapshots = list(&mut h, admin);
    let gone = invalid(&snapshots);
    assert!(
        !gone.is_empty(),
        "the node area never filled: {snapshots:?}"
    );
    // Oldest first: the invalidated ones are a prefix of the creation order.
    assert_eq!(gone, snaps[..gone.len()].to_vec(), "{snapshots:?}");
    assert!(
        snapshots.iter().all(|s| match &s.state {
            SnapshotState::Invalid { reason } => reason.contains("metadata"),
            _ => true,
        }),
        "{snapshots:?}"
    );
    let errors = h.errors(LogLevel::Error);
    assert!(
        errors.iter().any(|m| m.contains("STORE FULL")
            && m.contains("metadata")
            && m.contains(&format!("snapshot {}", snaps[0]))),
        "{errors:?}"
    );
    // The newest snapshot is intact.
    let newest = *snaps.last().unwrap();
    assert_eq!(live(&snapshots).last(), Some(&newest));
    let reader = h.connect(30, ClientKind::Snapshot { snap: newest }, false);
    for c in [0, 7, 399] {
        assert_eq!(
            snapshot_read(&mut h, reader, newest, c),
            [100_000 + c, 100_000 + c]
        );
    }
    // Deletes succeed (they free space, so they always must).
    for id in gone.iter().take(2) {
        let d = h.send(admin, ClientMsg::DeleteSnapshot { snap: *id });
        h.settle();
        assert_eq!(
            h.reply_to(admin, d),
            Some(ServerMsg::SnapshotDeleted { snap: *id })
        );
    }
    h.engine.store_mut().consistency().unwrap();

    // A crash and a restart (journal replay): the server serves on, the policy keeps
    // working on the full node area.
    h.failover(config());
    let origin = h.connect(1, ClientKind::Origin, true);
    let admin = h.admin();
    let more = fill_rounds(&mut h, origin, admin, 12..16, 400);
    assert!(h.fatal.is_none(), "{:?}", h.fatal);
    let snapshots = list(&mut h, admin);
    let newest = *more.last().unwrap();
    assert_eq!(live(&snapshots).last(), Some(&newest));
    let reader = h.connect(31, ClientKind::Snapshot { snap: newest }, false);
    assert_eq!(snapshot_read(&mut h, reader, newest, 5), [140_005, 140_005]);
    h.settle();
    h.engine.store_mut().consistency().unwrap();
}

fn status<S: TestStore>(h: &mut Harness<S>, admin: ConnId) -> ServerStatus {
    let s = h.send(admin, ClientMsg::Status);
    match h.reply_to(admin, s) {
        Some(ServerMsg::Status(st)) => st,
        other => panic!("no status: {other:?}"),
    }
}

/// Warnings before the store is full: logged once when usage crosses 80% and 90% of the
/// data area (the defaults), not again while it stays above, shown in the status while
/// above, and logged again after usage fell and rose again.
#[test]
fn data_usage_warnings_are_logged_once_per_crossing() {
    let mut h = Harness::new(config(), 64, 20);
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let s1 = h.create_snapshot(admin, "s1", &[origin]);
    let warnings = |h: &Harness, pct: &str| {
        h.errors(LogLevel::Warn)
            .iter()
            .filter(|m| m.contains("FILLING: data area") && m.contains(pct))
            .count()
    };
    for c in 0..15 {
        origin_write(&mut h, origin, c, 1);
    }
    assert_eq!(warnings(&h, "80%"), 0, "75% used: no warning yet");
    assert!(status(&mut h, admin).space_warnings.is_empty());
    origin_write(&mut h, origin, 15, 1);
    assert_eq!(warnings(&h, "80%"), 1, "{:?}", h.logs);
    assert_eq!(
        status(&mut h, admin).space_warnings,
        vec![SpaceWarning {
            area: StoreArea::Data,
            level_percent: 80,
            used_percent: 80
        }]
    );
    origin_write(&mut h, origin, 16, 1);
    assert_eq!(warnings(&h, "80%"), 1, "once per crossing");
    origin_write(&mut h, origin, 17, 1);
    assert_eq!(warnings(&h, "90%"), 1, "{:?}", h.logs);
    assert_eq!(warnings(&h, "80%"), 1);
    let st = status(&mut h, admin);
    assert_eq!(
        st.space_warnings,
        vec![SpaceWarning {
            area: StoreArea::Data,
            level_percent: 90,
            used_percent: 90
        }]
    );
    assert_eq!(
        (st.metadata_blocks, st.free_metadata_blocks),
        (0, 0),
        "MemStore has no metadata area"
    );
    // Usage drops (the snapshot is deleted and reclaimed): the warnings re-arm.
    let d = h.send(admin, ClientMsg::DeleteSnapshot { snap: s1 });
    for t in 0..50 {
        h.handle(Event::Tick { now: 2_000 + t });
        h.settle();
    }
    assert!(h.reply_to(admin, d).is_some());
    assert!(status(&mut h, admin).space_warnings.is_empty());
    assert!(h
        .logs
        .iter()
        .any(|(l, m)| *l == LogLevel::Info && m.contains("below the 80% warning level")));
    h.create_snapshot(admin, "s2", &[origin]);
    for c in 0..16 {
        origin_write(&mut h, origin, c, 2);
    }
    assert_eq!(warnings(&h, "80%"), 2, "logged again after re-arming");
}

/// The levels are configurable, per area; the metadata area is watched too and its
/// figures are in the status.
#[test]
fn metadata_usage_warnings_at_configured_levels() {
    let cfg = EngineConfig {
        data_warn_percents: vec![],
        metadata_warn_percents: vec![10, 20],
        ..config()
    };
    let mut h = Harness::with_store(cfg, DiskStore::with_metadata_blocks(200, 2_000, 512));
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let st = status(&mut h, admin);
    assert_eq!(st.metadata_blocks, 200);
    assert!(st.free_metadata_blocks >= 190, "{st:?}");
    assert!(st.space_warnings.is_empty());
    // Interleaved records of four snapshots: 2,000 records in more than 20 node blocks.
    fill_rounds(&mut h, origin, admin, 0..4, 500);
    let st = status(&mut h, admin);
    let used = st.metadata_blocks - st.free_metadata_blocks;
    assert!(used >= 20, "{st:?}");
    let meta_warnings: Vec<String> = h
        .errors(LogLevel::Warn)
        .into_iter()
        .filter(|m| m.contains("FILLING: metadata area"))
        .collect();
    assert_eq!(meta_warnings.len(), 1, "{meta_warnings:?}");
    assert!(
        meta_warnings[0].contains("10% warning level"),
        "{meta_warnings:?}"
    );
    assert_eq!(
        st.space_warnings,
        vec![SpaceWarning {
            area: StoreArea::Metadata,
            level_percent: 10,
            used_percent: (used * 100 / 200) as u8
        }]
    );
    assert!(
        !h.errors(LogLevel::Warn)
            .iter()
            .any(|m| m.contains("FILLING: data area")),
        "no data levels configured: {:?}",
        h.errors(LogLevel::Warn)
    );
}

/// The same when the engine learns of the full metadata area only from a failed record
/// (the check before the copy passed: other copies used the room): the copy is dropped,
/// the oldest snapshot given up, and the write starts over.
#[test]
fn metadata_full_at_record_time_is_handled_by_the_policy_too() {
    let mut store = DiskStore::with_metadata_blocks(40, 6_000, 512);
    store.hide_metadata_space = true;
    let mut h = Harness::with_store(config(), store);
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let snaps = fill_rounds(&mut h, origin, admin, 0..10, 400);
    let snapshots = list(&mut h, admin);
    let gone = invalid(&snapshots);
    assert!(
        !gone.is_empty(),
        "the node area never filled: {snapshots:?}"
    );
    assert_eq!(gone, snaps[..gone.len()].to_vec(), "{snapshots:?}");
    let newest = *snaps.last().unwrap();
    let reader = h.connect(30, ClientKind::Snapshot { snap: newest }, false);
    // Created before round 9 wrote: it sees round 8.
    assert_eq!(snapshot_read(&mut h, reader, newest, 3), [80_003, 80_003]);
    h.engine.store_mut().consistency().unwrap();
}

/// Creates snapshots until the store refuses one; returns the ids and the refusal.
fn create_until_refused<S: TestStore>(
    h: &mut Harness<S>,
    origin: ConnId,
    admin: ConnId,
) -> (Vec<SnapId>, (ErrorCode, String)) {
    let mut created = Vec::new();
    let refusal = loop {
        let id = h.send(
            admin,
            ClientMsg::CreateSnapshot {
                name: format!("s{}", created.len()),
                token: 0,
            },
        );
        for n in h.notices(origin) {
            if let ServerMsg::NewSnapshot { snap } = n {
                h.send(origin, ClientMsg::NewSnapshotAck { snap });
            }
        }
        h.settle();
        assert!(h.fatal.is_none(), "{:?}", h.fatal);
        match h.reply_to(admin, id) {
            Some(ServerMsg::SnapshotCreated { info }) => created.push(info.id),
            Some(ServerMsg::Error { code, message }) => break (code, message),
            other => panic!("create: {other:?}"),
        }
        assert!(created.len() < 10_000, "the metadata area never filled");
    };
    (created, refusal)
}

/// Snapshot creation on a (nearly) full metadata area is refused with `StoreFull`, not a
/// fatal error, and nothing older is given up for it; after deletes it works again.
#[test]
fn snapshot_creation_is_refused_when_the_metadata_area_is_full() {
    let mut h = Harness::with_store(config(), DiskStore::with_metadata_blocks(40, 100, 64));
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let (created, refusal) = create_until_refused(&mut h, origin, admin);
    assert_eq!(refusal.0, ErrorCode::StoreFull, "{refusal:?}");
    assert!(refusal.1.contains("metadata"), "{refusal:?}");
    assert!(created.len() > 50, "{}", created.len());
    let snapshots = list(&mut h, admin);
    assert_eq!(
        live(&snapshots),
        created,
        "nothing given up for a new snapshot"
    );
    // An origin write still works: the headroom kept by refusing the snapshot leaves
    // room for its copy-out's record, so nothing is given up for it either.
    origin_write(&mut h, origin, 0, 5);
    let snapshots = list(&mut h, admin);
    assert_eq!(live(&snapshots), created, "{:?}", h.errors(LogLevel::Error));
    for id in &created[..created.len() / 2] {
        let d = h.send(admin, ClientMsg::DeleteSnapshot { snap: *id });
        h.settle();
        assert_eq!(
            h.reply_to(admin, d),
            Some(ServerMsg::SnapshotDeleted { snap: *id })
        );
    }
    for t in 0..20 {
        h.handle(Event::Tick { now: 2_000 + t });
        h.settle();
    }
    let again = h.create_snapshot(admin, "again", &[origin]);
    assert!(again > *created.last().unwrap());
    h.engine.store_mut().consistency().unwrap();
}

/// With `fail-snapshot-writes-only`, a snapshot write whose records do not fit in the
/// metadata area is refused with `StoreFull`; nothing is invalidated, nothing is fatal.
#[test]
fn fail_snapshot_writes_only_refuses_snapshot_writes_on_a_full_metadata_area() {
    let cfg = EngineConfig {
        store_full_policy: StoreFullPolicy::FailSnapshotWritesOnly,
        ..config()
    };
    let mut h = Harness::with_store(cfg, DiskStore::with_metadata_blocks(40, 100, 64));
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let (created, _) = create_until_refused(&mut h, origin, admin);
    let newest = *created.last().unwrap();
    let writer = h.connect(40, ClientKind::Snapshot { snap: newest }, false);
    let w = h.send(
        writer,
        ClientMsg::SnapshotWrite {
            snap: newest,
            ranges: range(5, 1),
        },
    );
    h.settle();
    assert!(h.fatal.is_none(), "{:?}", h.fatal);
    match h.reply_to(writer, w) {
        Some(ServerMsg::Error { code, message }) => {
            assert_eq!(code, ErrorCode::StoreFull);
            assert!(message.contains("snapshot"), "{message}");
        }
        other => panic!("snapshot write on a full metadata area: {other:?}"),
    }
    assert_eq!(live(&list(&mut h, admin)), created, "nothing invalidated");
    h.engine.store_mut().consistency().unwrap();
}
