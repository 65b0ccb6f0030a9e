//! Deterministic tests of the engine's flows: handshake, origin write and copy-out, the
//! four-message snapshot read, snapshot write, create with acks, delete and reclaim,
//! store full, the activation gate, and bad input.

use crate::engine_common;

use csnap_proto::*;
use csnap_server::engine::*;
use engine_common::*;

fn origin_and_snapshots(h: &mut Harness, n: usize) -> (ConnId, ConnId, Vec<SnapId>) {
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let snaps = (0..n)
        .map(|i| h.create_snapshot(admin, &format!("s{i}"), &[origin]))
        .collect();
    (origin, admin, snaps)
}

#[test]
fn handshake_rejects_wrong_version_bad_proof_and_early_requests() {
    let mut h = Harness::new(config(), 16, 16);

    let conn = h.open_conn();
    let id = h.send(
        conn,
        ClientMsg::Hello {
            protocol_version: 99,
            client: ClientId::new(1, ClientKind::Origin),
            node: 1,
            incarnation: 1,
            client_nonce: [0; 32],
            resuming: false,
        },
    );
    assert_eq!(
        error_code(&h.reply_to(conn, id)),
        Some(ErrorCode::VersionMismatch)
    );
    assert!(h.closed.contains(&conn));

    let conn = h.open_conn();
    let id = h.send(
        conn,
        ClientMsg::QueryWrite {
            ranges: range(0, 1),
        },
    );
    assert_eq!(
        error_code(&h.reply_to(conn, id)),
        Some(ErrorCode::NotAuthenticated)
    );
    assert!(h.closed.contains(&conn));

    let conn = h.open_conn();
    let hello = h.send(
        conn,
        ClientMsg::Hello {
            protocol_version: u32::from(PROTOCOL_VERSION),
            client: ClientId::new(2, ClientKind::Origin),
            node: 1,
            incarnation: 2,
            client_nonce: [3; 32],
            resuming: false,
        },
    );
    assert!(matches!(
        h.reply_to(conn, hello),
        Some(ServerMsg::Challenge { .. })
    ));
    let id = h.send(conn, ClientMsg::AuthResponse { proof: [0; 32] });
    assert_eq!(
        error_code(&h.reply_to(conn, id)),
        Some(ErrorCode::AuthFailed)
    );
    assert!(h.closed.contains(&conn));

    let ok = h.connect(3, ClientKind::Origin, false);
    assert!(!h.closed.contains(&ok));
    let id = h.send(ok, ClientMsg::AuthResponse { proof: [0; 32] });
    assert_eq!(error_code(&h.reply_to(ok, id)), Some(ErrorCode::BadRequest));
    assert!(
        !h.closed.contains(&ok),
        "a bad request does not kill a session"
    );
}

#[test]
fn one_copy_out_serves_fifty_snapshots_and_the_answer_waits_for_the_commit() {
    let mut h = Harness::new(config(), 64, 64);
    let (origin, _admin, snaps) = origin_and_snapshots(&mut h, 50);
    h.origin[7] = [70, 71];
    h.trace.clear();
    let id = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(7, 1),
        },
    );
    assert_eq!(h.copies.len(), 1, "one copy-out for all 50 snapshots");
    assert!(
        h.reply_to(origin, id).is_none(),
        "no answer before the copy is done"
    );
    h.run_one_copy();
    assert!(
        h.reply_to(origin, id).is_none(),
        "no answer before the commit"
    );
    assert!(h.run_commit());
    assert_eq!(
        h.reply_to(origin, id),
        Some(ServerMsg::OriginWriteOk {
            ranges: range(7, 1),
            unique: true
        })
    );
    let order: Vec<&str> = h.trace.iter().map(|s| s.as_str()).collect();
    let copy = order.iter().position(|s| s.starts_with("copy")).unwrap();
    let done = order.iter().position(|s| *s == "commit done").unwrap();
    let ok = order
        .iter()
        .position(|s| s.contains("OriginWriteOk"))
        .unwrap();
    assert!(copy < done && done < ok, "{order:?}");
    assert_eq!(h.engine.store().exceptions(7).len(), 1);
    // Every snapshot reads the one copy.
    let mut store = h.engine.store().clone();
    for s in snaps {
        assert!(matches!(
            store.snapshot_chunk(s, 7).unwrap(),
            SnapChunk::Store {
                exclusive: false,
                ..
            }
        ));
    }
    // Writing again needs no copy.
    let id = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(7, 1),
        },
    );
    assert!(h.copies.is_empty());
    assert!(matches!(
        h.reply_to(origin, id),
        Some(ServerMsg::OriginWriteOk { .. })
    ));
}

#[test]
fn concurrent_queries_on_one_chunk_share_one_copy_out() {
    let mut h = Harness::new(config(), 16, 16);
    let (o1, _admin, _) = origin_and_snapshots(&mut h, 2);
    let o2 = h.connect(2, ClientKind::Origin, false);
    let a = h.send(
        o1,
        ClientMsg::QueryWrite {
            ranges: range(3, 2),
        },
    );
    let b = h.send(
        o2,
        ClientMsg::QueryWrite {
            ranges: range(4, 1),
        },
    );
    assert_eq!(h.copies.len(), 2, "chunks 3 and 4, once each");
    h.settle();
    assert!(matches!(
        h.reply_to(o1, a),
        Some(ServerMsg::OriginWriteOk { .. })
    ));
    assert!(matches!(
        h.reply_to(o2, b),
        Some(ServerMsg::OriginWriteOk { .. })
    ));
    assert_eq!(h.copy_log.len(), 2);
}

#[test]
fn snapshot_read_lock_holds_the_origin_write_until_finish_is_confirmed() {
    let mut h = Harness::new(config(), 16, 16);
    let (origin, _admin, snaps) = origin_and_snapshots(&mut h, 1);
    let s = snaps[0];
    let reader = h.connect(10, ClientKind::Snapshot { snap: s }, false);
    let r = h.send(
        reader,
        ClientMsg::QuerySnapshotRead {
            snap: s,
            ranges: range(5, 1),
        },
    );
    assert_eq!(
        h.reply_to(reader, r),
        Some(ServerMsg::SnapshotReadOk {
            store: vec![],
            origin_locked: range(5, 1)
        })
    );
    assert_eq!(h.engine.read_locks(5), 1);

    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(5, 1),
        },
    );
    h.settle();
    assert!(h.reply_to(origin, w).is_none(), "read lock held: no grant");

    // A second reader now finds the copy in the store and takes no lock.
    let r2 = h.send(
        reader,
        ClientMsg::QuerySnapshotRead {
            snap: s,
            ranges: range(5, 1),
        },
    );
    assert!(matches!(
        h.reply_to(reader, r2),
        Some(ServerMsg::SnapshotReadOk { ref store, ref origin_locked }) if store.len() == 1 && origin_locked.is_empty()
    ));

    let f = h.send(
        reader,
        ClientMsg::FinishSnapshotRead {
            snap: s,
            ranges: range(5, 1),
        },
    );
    assert_eq!(h.reply_to(reader, f), Some(ServerMsg::FinishSnapshotReadOk));
    assert!(matches!(
        h.reply_to(origin, w),
        Some(ServerMsg::OriginWriteOk { .. })
    ));
    assert_eq!(h.engine.read_locks(5), 0);

    let f = h.send(
        reader,
        ClientMsg::FinishSnapshotRead {
            snap: s,
            ranges: range(5, 1),
        },
    );
    assert_eq!(
        error_code(&h.reply_to(reader, f)),
        Some(ErrorCode::NotLocked)
    );
}

#[test]
fn snapshot_becomes_live_only_after_every_origin_client_acked() {
    let cfg = EngineConfig {
        origin_lease_secs: 10,
        ..config()
    };
    let mut h = Harness::new(cfg, 16, 16);
    let o1 = h.connect(1, ClientKind::Origin, false);
    let o2 = h.connect(2, ClientKind::Origin, false);
    let admin = h.admin();
    let c = h.send(
        admin,
        ClientMsg::CreateSnapshot {
            name: "nightly".into(),
            token: 0,
        },
    );
    h.settle();
    let snap = match h.notices(o1).as_slice() {
        [ServerMsg::NewSnapshot { snap }] => *snap,
        other => panic!("expected NewSnapshot, got {other:?}"),
    };
    assert_eq!(h.notices(o2), vec![ServerMsg::NewSnapshot { snap }]);
    let l = h.send(
        admin,
        ClientMsg::ListSnapshots {
            after: None,
            limit: u32::MAX,
        },
    );
    assert_eq!(
        h.reply_to(admin, l),
        Some(ServerMsg::SnapshotList {
            snapshots: vec![],
            more: false,
            usage_exact: true
        }),
        "not listed before the acks"
    );
    h.send(o1, ClientMsg::NewSnapshotAck { snap });
    h.settle();
    assert!(h.reply_to(admin, c).is_none());
    // The second origin client disconnects instead of acking. It may not know yet and
    // go on writing through its promises until its lease runs out (10 s + 2 s margin
    // from when the server last heard it, at time 1,000, plus 2 s for the engine's
    // whole-second clock).
    h.handle(Event::ClientDisconnected { conn: o2 });
    h.settle();
    assert_eq!(
        h.engine.poll_timeout(),
        Some(1_014),
        "the tick the lease ends at"
    );
    h.handle(Event::Tick { now: 1_013 });
    h.settle();
    assert!(
        h.reply_to(admin, c).is_none(),
        "created within the lost client's lease"
    );
    h.handle(Event::Tick { now: 1_014 });
    h.settle();
    match h.reply_to(admin, c) {
        Some(ServerMsg::SnapshotCreated { info }) => {
            assert_eq!(info.id, snap);
            assert_eq!(info.name, "nightly");
            assert_eq!(info.ctime, 1_014, "the instant it was taken, not requested");
            assert_eq!(info.state, SnapshotState::Live);
        }
        other => panic!("expected SnapshotCreated, got {other:?}"),
    }
    let l = h.send(
        admin,
        ClientMsg::ListSnapshots {
            after: None,
            limit: u32::MAX,
        },
    );
    assert!(
        matches!(h.reply_to(admin, l), Some(ServerMsg::SnapshotList { snapshots, .. }) if snapshots.len() == 1)
    );
    let id = h.send(
        admin,
        ClientMsg::CreateSnapshot {
            name: "nightly".into(),
            token: 0,
        },
    );
    assert_eq!(
        error_code(&h.reply_to(admin, id)),
        Some(ErrorCode::NameTaken)
    );
    let id = h.send(
        admin,
        ClientMsg::CreateSnapshot {
            name: "a/b".into(),
            token: 0,
        },
    );
    assert_eq!(error_code(&h.reply_to(admin, id)), Some(ErrorCode::BadName));
}

#[test]
fn snapshot_write_unshares_once_then_writes_in_place() {
    let mut h = Harness::new(config(), 16, 16);
    let (_origin, _admin, snaps) = origin_and_snapshots(&mut h, 2);
    h.origin[2] = [20, 21];
    let writer = h.connect(10, ClientKind::Snapshot { snap: snaps[1] }, false);
    let w = h.send(
        writer,
        ClientMsg::SnapshotWrite {
            snap: snaps[1],
            ranges: range(2, 1),
        },
    );
    assert_eq!(h.engine.read_locks(2), 1, "origin locked while copied");
    h.settle();
    let addr = match h.reply_to(writer, w) {
        Some(ServerMsg::SnapshotWriteOk { addrs }) => addrs[0].store_chunk,
        other => panic!("expected SnapshotWriteOk, got {other:?}"),
    };
    assert_eq!(h.engine.read_locks(2), 0);
    assert_eq!(
        h.store_data[addr as usize],
        [20, 21],
        "previous contents copied"
    );
    let copies = h.copy_log.len();
    let w = h.send(
        writer,
        ClientMsg::SnapshotWrite {
            snap: snaps[1],
            ranges: range(2, 1),
        },
    );
    h.settle();
    assert_eq!(
        h.reply_to(writer, w),
        Some(ServerMsg::SnapshotWriteOk {
            addrs: vec![StoreAddr {
                chunk: 2,
                store_chunk: addr
            }]
        })
    );
    assert_eq!(h.copy_log.len(), copies, "in place: no copy");
    // The other snapshot still reads the origin.
    let mut store = h.engine.store().clone();
    assert_eq!(
        store.snapshot_chunk(snaps[0], 2).unwrap(),
        SnapChunk::Origin
    );
    // Writing to another snapshot on this connection is refused.
    let w = h.send(
        writer,
        ClientMsg::SnapshotWrite {
            snap: snaps[0],
            ranges: range(2, 1),
        },
    );
    assert_eq!(
        error_code(&h.reply_to(writer, w)),
        Some(ErrorCode::WrongClientKind)
    );
}

#[test]
fn delete_answers_after_commit_and_reclaims_in_the_background() {
    let mut h = Harness::new(config(), 16, 16);
    let (origin, admin, snaps) = origin_and_snapshots(&mut h, 1);
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(0, 8),
        },
    );
    h.settle();
    assert!(h.reply_to(origin, w).is_some());
    let free_before = h.engine.store_mut().stats().unwrap().free_chunks;
    assert_eq!(free_before, 8);
    let f = h.send(admin, ClientMsg::FindSnapshot { name: "s0".into() });
    let s0 = match h.reply_to(admin, f) {
        Some(ServerMsg::SnapshotFound { info }) => info.id,
        other => panic!("FindSnapshot s0: {other:?}"),
    };
    assert_eq!(s0, snaps[0]);
    let d = h.send(admin, ClientMsg::DeleteSnapshot { snap: s0 });
    assert!(
        h.reply_to(admin, d).is_none(),
        "answer waits for the commit"
    );
    h.settle();
    assert_eq!(
        h.reply_to(admin, d),
        Some(ServerMsg::SnapshotDeleted { snap: snaps[0] })
    );
    for t in 0..20 {
        h.handle(Event::Tick { now: 2_000 + t });
        h.settle();
    }
    assert_eq!(h.engine.store_mut().stats().unwrap().free_chunks, 16);
    let d = h.send(admin, ClientMsg::DeleteSnapshot { snap: snaps[0] });
    assert_eq!(
        error_code(&h.reply_to(admin, d)),
        Some(ErrorCode::NoSuchSnapshot)
    );
    h.engine.store().check().unwrap();
}

#[test]
fn store_full_invalidates_the_oldest_snapshot_and_origin_writes_never_fail() {
    let mut h = Harness::new(config(), 32, 4);
    let (origin, admin, snaps) = origin_and_snapshots(&mut h, 1);
    for c in 0..4 {
        h.granted_origin_write(origin, c);
    }
    let newer = h.create_snapshot(admin, "newer", &[origin]);
    // The store is full; this copy-out is needed by both snapshots.
    for c in 4..8 {
        let w = h.send(
            origin,
            ClientMsg::QueryWrite {
                ranges: range(c, 1),
            },
        );
        h.settle();
        assert!(
            matches!(h.reply_to(origin, w), Some(ServerMsg::OriginWriteOk { .. })),
            "origin write {c} must succeed"
        );
    }
    let errors = h.errors(LogLevel::Error);
    assert!(
        errors
            .iter()
            .any(|m| m.contains("STORE FULL") && m.contains(&format!("snapshot {}", snaps[0]))),
        "{errors:?}"
    );
    let l = h.send(
        admin,
        ClientMsg::ListSnapshots {
            after: None,
            limit: u32::MAX,
        },
    );
    let Some(ServerMsg::SnapshotList { snapshots, .. }) = h.reply_to(admin, l) else {
        panic!("no list");
    };
    assert!(
        matches!(snapshots[0].state, SnapshotState::Invalid { ref reason } if reason.contains("full"))
    );
    assert_eq!(snapshots[1].state, SnapshotState::Live);
    let reader = h.connect(10, ClientKind::Snapshot { snap: snaps[0] }, false);
    let r = h.send(
        reader,
        ClientMsg::QuerySnapshotRead {
            snap: snaps[0],
            ranges: range(0, 1),
        },
    );
    assert_eq!(
        error_code(&h.reply_to(reader, r)),
        Some(ErrorCode::SnapshotInvalid)
    );
    let _ = newer;
    h.engine.store().check().unwrap();
}

#[test]
fn fail_snapshot_writes_only_policy_refuses_snapshot_writes_when_full() {
    let cfg = EngineConfig {
        store_full_policy: StoreFullPolicy::FailSnapshotWritesOnly,
        ..config()
    };
    let mut h = Harness::new(cfg, 32, 2);
    let (origin, _admin, snaps) = origin_and_snapshots(&mut h, 2);
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(0, 2),
        },
    );
    h.settle();
    assert!(h.reply_to(origin, w).is_some());
    let writer = h.connect(10, ClientKind::Snapshot { snap: snaps[1] }, false);
    let w = h.send(
        writer,
        ClientMsg::SnapshotWrite {
            snap: snaps[1],
            ranges: range(9, 1),
        },
    );
    h.settle();
    assert_eq!(
        error_code(&h.reply_to(writer, w)),
        Some(ErrorCode::StoreFull)
    );
    let l = h.admin();
    let s = h.send(l, ClientMsg::Status);
    let Some(ServerMsg::Status(st)) = h.reply_to(l, s) else {
        panic!("no status")
    };
    assert_eq!(st.store_full_policy, "fail-snapshot-writes-only");
    assert_eq!(st.snapshots, 2, "nothing invalidated");
    assert_eq!(st.free_chunks, 0);
}

#[test]
fn activation_gate_waits_for_every_listed_snapshot_client() {
    let mut store = MemStore::new(4096, 16, 16);
    let snap = store.create_snapshot("s", 1).unwrap().id;
    store.commit().unwrap();
    let reader = |n| ClientId::new(n, ClientKind::Snapshot { snap });
    let cfg = EngineConfig {
        expected_snapshot_clients: vec![reader(10), reader(11)],
        ..config()
    };
    let mut h = Harness::with_store(cfg, store);
    assert!(!h.engine.is_active());
    let origin = h.connect(1, ClientKind::Origin, true);
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(3, 1),
        },
    );
    h.settle();
    assert!(h.reply_to(origin, w).is_none(), "gate closed");

    // Client 10 comes back holding a read lock on chunk 3 and finishes its resend.
    let a = h.connect(10, ClientKind::Snapshot { snap }, true);
    let u = h.send(
        a,
        ClientMsg::UploadLocks {
            locks: vec![HeldLock {
                snap,
                range: ChunkRange::new(3, 1),
            }],
            leases: vec![],
        },
    );
    assert_eq!(h.reply_to(a, u), Some(ServerMsg::UploadLocksOk));
    let d = h.send(a, ClientMsg::ResendDone);
    assert_eq!(h.reply_to(a, d), Some(ServerMsg::ResendDoneOk));
    h.settle();
    assert!(
        h.reply_to(origin, w).is_none(),
        "still waiting for client 11"
    );
    assert_eq!(h.engine.awaited_clients(), vec![reader(11)]);

    h.handle(Event::ClientDeclaredGone { client: reader(11) });
    h.settle();
    assert!(h.engine.is_active());
    assert!(
        h.reply_to(origin, w).is_none(),
        "the uploaded lock still holds chunk 3"
    );
    let f = h.send(
        a,
        ClientMsg::FinishSnapshotRead {
            snap,
            ranges: range(3, 1),
        },
    );
    assert_eq!(h.reply_to(a, f), Some(ServerMsg::FinishSnapshotReadOk));
    h.settle();
    assert!(matches!(
        h.reply_to(origin, w),
        Some(ServerMsg::OriginWriteOk { .. })
    ));
    let u = h.send(
        a,
        ClientMsg::UploadLocks {
            locks: vec![],
            leases: vec![],
        },
    );
    assert_eq!(error_code(&h.reply_to(a, u)), Some(ErrorCode::BadRequest));
}

#[test]
fn locks_of_a_vanished_snapshot_client_hold_until_it_returns_or_grace_expires() {
    let mut h = Harness::new(config(), 16, 16);
    let (origin, _admin, snaps) = origin_and_snapshots(&mut h, 1);
    let s = snaps[0];
    let reader = h.connect(10, ClientKind::Snapshot { snap: s }, false);
    let r = h.send(
        reader,
        ClientMsg::QuerySnapshotRead {
            snap: s,
            ranges: range(1, 1),
        },
    );
    assert!(h.reply_to(reader, r).is_some());
    h.handle(Event::ClientDisconnected { conn: reader });
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(1, 1),
        },
    );
    h.settle();
    assert!(h.reply_to(origin, w).is_none(), "orphaned lock holds");
    assert_eq!(
        h.engine.poll_timeout(),
        Some(1_060),
        "the tick the grace time ends at"
    );
    h.handle(Event::Tick { now: 1_059 });
    h.settle();
    assert!(h.reply_to(origin, w).is_none(), "within grace");
    h.handle(Event::Tick { now: 1_060 });
    h.settle();
    assert!(matches!(
        h.reply_to(origin, w),
        Some(ServerMsg::OriginWriteOk { .. })
    ));
    assert!(h
        .errors(LogLevel::Warn)
        .iter()
        .any(|m| m.contains("did not come back")));
}

#[test]
fn malformed_and_misdirected_requests_get_error_replies() {
    let mut h = Harness::new(config(), 16, 16);
    let (origin, admin, snaps) = origin_and_snapshots(&mut h, 1);
    let cases: Vec<(ConnId, ClientMsg, ErrorCode)> = vec![
        (
            origin,
            ClientMsg::QueryWrite { ranges: vec![] },
            ErrorCode::BadRequest,
        ),
        (
            origin,
            ClientMsg::QueryWrite {
                ranges: range(3, 0),
            },
            ErrorCode::BadRequest,
        ),
        (
            origin,
            ClientMsg::QueryWrite {
                ranges: range(15, 2),
            },
            ErrorCode::OutOfRange,
        ),
        (
            origin,
            ClientMsg::QueryWrite {
                ranges: range(u64::MAX, 2),
            },
            ErrorCode::OutOfRange,
        ),
        (
            origin,
            ClientMsg::QuerySnapshotRead {
                snap: snaps[0],
                ranges: range(0, 1),
            },
            ErrorCode::WrongClientKind,
        ),
        (
            origin,
            ClientMsg::ListSnapshots {
                after: None,
                limit: u32::MAX,
            },
            ErrorCode::WrongClientKind,
        ),
        (
            admin,
            ClientMsg::QueryWrite {
                ranges: range(0, 1),
            },
            ErrorCode::WrongClientKind,
        ),
        (
            admin,
            ClientMsg::DeleteSnapshot { snap: SnapId(99) },
            ErrorCode::NoSuchSnapshot,
        ),
        (
            admin,
            ClientMsg::FindSnapshot {
                name: "nope".into(),
            },
            ErrorCode::NoSuchSnapshot,
        ),
        (
            origin,
            ClientMsg::FindSnapshot { name: "s0".into() },
            ErrorCode::WrongClientKind,
        ),
    ];
    for (conn, msg, code) in cases {
        let id = h.send(conn, msg.clone());
        assert_eq!(error_code(&h.reply_to(conn, id)), Some(code), "{msg:?}");
    }
    let big = EngineConfig {
        max_request_chunks: 4,
        ..config()
    };
    let mut h2 = Harness::new(big, 16, 16);
    let o = h2.connect(1, ClientKind::Origin, false);
    let id = h2.send(
        o,
        ClientMsg::QueryWrite {
            ranges: range(0, 5),
        },
    );
    assert_eq!(error_code(&h2.reply_to(o, id)), Some(ErrorCode::TooLarge));

    // A snapshot client of a snapshot that does not exist.
    let ghost = h.connect(20, ClientKind::Snapshot { snap: SnapId(99) }, false);
    let id = h.send(
        ghost,
        ClientMsg::QuerySnapshotRead {
            snap: SnapId(99),
            ranges: range(0, 1),
        },
    );
    assert_eq!(
        error_code(&h.reply_to(ghost, id)),
        Some(ErrorCode::NoSuchSnapshot)
    );

    // An undecodable frame: error, then close.
    h.handle(Event::ClientBadFrame {
        conn: ghost,
        error: Failure::new(FrameError::Malformed("not msgpack".into())),
    });
    assert!(h.closed.contains(&ghost));
    assert!(h.fatal.is_none());
}

#[test]
fn a_failed_copy_stops_the_server() {
    let mut h = Harness::new(config(), 16, 16);
    let (origin, _admin, _) = origin_and_snapshots(&mut h, 1);
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(0, 1),
        },
    );
    let (copy, _, _) = h.copies.pop_front().unwrap();
    h.handle(Event::CopyDone {
        copy,
        result: Err(std::io::Error::other("EIO on store").into()),
    });
    assert!(h.fatal.as_deref().unwrap().contains("EIO on store"));
    assert!(h.engine.has_failed());
    assert!(h.reply_to(origin, w).is_none(), "never granted");
    let id = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(1, 1),
        },
    );
    assert_eq!(
        error_code(&h.reply_to(origin, id)),
        Some(ErrorCode::Internal)
    );
}

#[test]
fn chunks_under_a_write_lease_are_not_reclaimed_until_the_write_is_finished() {
    let mut h = Harness::new(config(), 16, 16);
    let (_origin, admin, snaps) = origin_and_snapshots(&mut h, 1);
    let s = snaps[0];
    let writer = h.connect(10, ClientKind::Snapshot { snap: s }, false);
    let w = h.send(
        writer,
        ClientMsg::SnapshotWrite {
            snap: s,
            ranges: range(4, 1),
        },
    );
    h.settle();
    assert!(matches!(
        h.reply_to(writer, w),
        Some(ServerMsg::SnapshotWriteOk { .. })
    ));
    let d = h.send(admin, ClientMsg::DeleteSnapshot { snap: s });
    h.settle();
    assert_eq!(
        h.reply_to(admin, d),
        Some(ServerMsg::SnapshotDeleted { snap: s })
    );
    for t in 0..10 {
        h.handle(Event::Tick { now: 2_000 + t });
        h.settle();
    }
    assert_eq!(
        h.engine.store_mut().stats().unwrap().free_chunks,
        15,
        "the leased chunk is not reclaimed while the client may still write it"
    );
    let f = h.send(
        writer,
        ClientMsg::FinishSnapshotWrite {
            snap: s,
            ranges: range(4, 1),
        },
    );
    assert_eq!(
        h.reply_to(writer, f),
        Some(ServerMsg::FinishSnapshotWriteOk)
    );
    for t in 10..20 {
        h.handle(Event::Tick { now: 2_000 + t });
        h.settle();
    }
    assert_eq!(h.engine.store_mut().stats().unwrap().free_chunks, 16);
    let f = h.send(
        writer,
        ClientMsg::FinishSnapshotWrite {
            snap: s,
            ranges: range(4, 1),
        },
    );
    assert_eq!(
        error_code(&h.reply_to(writer, f)),
        Some(ErrorCode::NotLocked)
    );
}

#[test]
fn chunks_freed_by_an_uncommitted_delete_are_not_reused_before_a_crash() {
    let mut h = Harness::new(config(), 16, 16);
    let (origin, admin, snaps) = origin_and_snapshots(&mut h, 1);
    h.origin[0] = [1, 2];
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(0, 1),
        },
    );
    h.settle();
    assert!(h.reply_to(origin, w).is_some());
    h.origin[0] = [3, 4];
    let b = h.create_snapshot(admin, "b", &[origin]);
    // Delete the first snapshot, but crash before that is committed.
    let d = h.send(admin, ClientMsg::DeleteSnapshot { snap: snaps[0] });
    assert!(h.commit_pending);
    h.handle(Event::Tick { now: 2_000 });
    h.handle(Event::Tick { now: 2_001 });
    // A copy-out for the second snapshot must not land on the chunk the delete freed.
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(1, 1),
        },
    );
    while h.run_one_copy() {}
    assert!(h.reply_to(admin, d).is_none());
    assert!(h.reply_to(origin, w).is_none());
    h.failover(config());
    let mut store = h.engine.store().clone();
    match store.snapshot_chunk(snaps[0], 0).unwrap() {
        SnapChunk::Store { store_chunk, .. } => {
            assert_eq!(
                h.store_data[store_chunk as usize],
                [1, 2],
                "revived snapshot intact"
            )
        }
        other => panic!("expected the copy-out, got {other:?}"),
    }
    assert_eq!(store.snapshot_chunk(b, 0).unwrap(), SnapChunk::Origin);
}

/// Issue 8, finding 1: an origin client that has not yet acknowledged a new snapshot may
/// still write through its cached unique promises. If another client's write were granted
/// (and copied out for the snapshot) in that window, the application could see W(b)
/// complete, then issue W(a) through the cache: the snapshot would hold W(a) without
/// W(b), a state no crash could produce. Creation is therefore two-phase: announce, hold
/// every origin grant until every origin client acknowledged, then create.
#[test]
fn no_origin_write_is_granted_between_the_announcement_and_the_last_ack() {
    let mut h = Harness::new(config(), 16, 16);
    let a = h.connect(1, ClientKind::Origin, false);
    let b = h.connect(2, ClientKind::Origin, false);
    let admin = h.admin();
    for (conn, chunk) in [(a, 1), (b, 2)] {
        let id = h.send(
            conn,
            ClientMsg::QueryWrite {
                ranges: range(chunk, 1),
            },
        );
        h.settle();
        assert!(matches!(
            h.reply_to(conn, id),
            Some(ServerMsg::OriginWriteOk { unique: true, .. })
        ));
        h.origin[chunk as usize] = [chunk, chunk];
    }
    let create = h.send(
        admin,
        ClientMsg::CreateSnapshot {
            name: "s".into(),
            token: 0,
        },
    );
    h.settle();
    let announced = match h.notices(b).as_slice() {
        [ServerMsg::NewSnapshot { snap }] => *snap,
        other => panic!("expected NewSnapshot, got {other:?}"),
    };
    assert_eq!(
        h.notices(a),
        vec![ServerMsg::NewSnapshot { snap: announced }]
    );
    h.send(b, ClientMsg::NewSnapshotAck { snap: announced });
    h.settle();
    // B, acked, writes chunk 2 again: held while A may still write through its promise.
    let wb = h.send(
        b,
        ClientMsg::QueryWrite {
            ranges: range(2, 1),
        },
    );
    h.settle();
    assert_eq!(
        h.reply_to(b, wb),
        None,
        "an origin write was granted while origin client A had not acknowledged the snapshot"
    );
    assert!(
        h.copy_log.is_empty(),
        "no copy-out before the snapshot exists: {:?}",
        h.copy_log
    );
    // A writes chunk 1 through its promise, then acknowledges.
    h.origin[1] = [11, 11];
    h.send(a, ClientMsg::NewSnapshotAck { snap: announced });
    h.settle();
    let snap = match h.reply_to(admin, create) {
        Some(ServerMsg::SnapshotCreated { info }) => info.id,
        other => panic!("expected SnapshotCreated, got {other:?}"),
    };
    assert_eq!(snap, announced, "the announced id is the snapshot's id");
    // Now B's write is granted, after chunk 2 was copied out for the snapshot.
    assert!(matches!(
        h.reply_to(b, wb),
        Some(ServerMsg::OriginWriteOk { .. })
    ));
    assert_eq!(h.copy_outs.get(&2), Some(&1));
    assert_eq!(
        h.copy_outs.get(&1),
        None,
        "A's cached write came before the snapshot"
    );
}

/// Issue 8, finding 9: a snapshot read answered from the store hands the client a store
/// address to read on its own. If the snapshot is deleted (or invalidated when the store
/// is full) meanwhile, its chunks are reclaimed and a copy-out may reuse that address
/// while the client is still reading it: the client would return another chunk's data.
/// The store read holds a lease until the client releases it (`ReleaseStoreReads`), and
/// reclaim waits for it as it waits for write leases.
#[test]
fn a_store_chunk_being_read_is_not_reused_before_the_reader_releases_it() {
    let mut h = Harness::new(config(), 8, 1);
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let s = h.create_snapshot(admin, "s", &[origin]);
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(0, 1),
        },
    );
    h.settle();
    assert!(h.reply_to(origin, w).is_some());
    let reader = h.connect(2, ClientKind::Snapshot { snap: s }, false);
    let r = h.send(
        reader,
        ClientMsg::QuerySnapshotRead {
            snap: s,
            ranges: range(0, 1),
        },
    );
    h.settle();
    let x = match h.reply_to(reader, r) {
        Some(ServerMsg::SnapshotReadOk { store, .. }) if store.len() == 1 => store[0].store_chunk,
        other => panic!("expected a store address, got {other:?}"),
    };
    // A newer snapshot, then the read one is deleted and reclaimed.
    let _t = h.create_snapshot(admin, "t", &[origin]);
    let d = h.send(admin, ClientMsg::DeleteSnapshot { snap: s });
    h.settle();
    assert!(h.reply_to(admin, d).is_some());
    for t in 0..10 {
        h.handle(Event::Tick { now: 2_000 + t });
        h.settle();
    }
    // An origin write that needs a copy-out for t: the only store chunk is x.
    h.copy_log.clear();
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(1, 1),
        },
    );
    h.settle();
    assert!(
        h.copy_log.iter().all(|(_, to)| *to != x),
        "store chunk {x} was reused by a copy-out while the reader may still read it: {:?}",
        h.copy_log
    );
    assert_eq!(h.reply_to(origin, w), None, "the write waits for the space");
    // The reader is done: the chunk is reclaimed and reused, the write goes through.
    h.send(
        reader,
        ClientMsg::ReleaseStoreReads {
            snap: s,
            ranges: range(0, 1),
        },
    );
    for t in 0..10 {
        h.handle(Event::Tick { now: 3_000 + t });
        h.settle();
    }
    assert!(matches!(
        h.reply_to(origin, w),
        Some(ServerMsg::OriginWriteOk { .. })
    ));
    assert!(
        h.copy_log.iter().any(|(_, to)| *to == x),
        "{:?}",
        h.copy_log
    );
}

/// Issue 8, finding 2: promises and grants are leases. An origin client the server stops
/// hearing from (a dead node, a half-open connection, a frozen process) is closed once its
/// lease has certainly run out, so a snapshot creation waits for it that long, bounded,
/// not for ever; an origin client that keeps renewing (`KeepAlive`) is never closed.
#[test]
fn a_silent_origin_client_holds_a_creation_for_its_lease_only() {
    let cfg = EngineConfig {
        origin_lease_secs: 10,
        ..config()
    };
    let mut h = Harness::new(cfg, 16, 16);
    let silent = h.connect(1, ClientKind::Origin, false);
    let alive = h.connect(2, ClientKind::Origin, false);
    let admin = h.admin();
    let c = h.send(
        admin,
        ClientMsg::CreateSnapshot {
            name: "s".into(),
            token: 0,
        },
    );
    h.settle();
    let snap = match h.notices(alive).as_slice() {
        [ServerMsg::NewSnapshot { snap }] => *snap,
        other => panic!("expected NewSnapshot, got {other:?}"),
    };
    h.send(alive, ClientMsg::NewSnapshotAck { snap });
    assert_eq!(
        h.engine.poll_timeout(),
        Some(1_014),
        "the tick the silent client is closed at"
    );
    // Lease 10 s + margin 2 s + 2 s for the engine's whole-second clock (the request it
    // last heard may have been sent up to two seconds after the tick it counts from).
    for now in 1_001..1_014 {
        h.handle(Event::Tick { now });
        let k = h.send(alive, ClientMsg::KeepAlive);
        assert_eq!(h.reply_to(alive, k), Some(ServerMsg::KeepAliveOk));
        h.settle();
        assert!(
            h.reply_to(admin, c).is_none(),
            "created at {now}, within the silent client's lease"
        );
    }
    assert!(!h.closed.contains(&silent));
    h.handle(Event::Tick { now: 1_014 });
    h.settle();
    assert!(
        h.closed.contains(&silent),
        "the silent client's connection is closed at lease + margin + clock slack"
    );
    assert!(!h.closed.contains(&alive), "a client that renews is kept");
    assert!(
        matches!(
            h.reply_to(admin, c),
            Some(ServerMsg::SnapshotCreated { .. })
        ),
        "the creation goes ahead once the silent client's lease has run out"
    );
    assert!(h
        .errors(LogLevel::Warn)
        .iter()
        .any(|l| l.contains("silent for 14s") && l.contains("write lease")));
}

/// A new server after a failover creates no snapshot before the old server's clients'
/// leases have certainly run out (`hold_snapshots_until`, set by whoever starts it).
#[test]
fn no_snapshot_is_created_before_hold_snapshots_until() {
    let cfg = EngineConfig {
        hold_snapshots_until: 1_020,
        ..config()
    };
    let mut h = Harness::new(cfg, 16, 16);
    let admin = h.admin();
    let c = h.send(
        admin,
        ClientMsg::CreateSnapshot {
            name: "s".into(),
            token: 0,
        },
    );
    h.settle();
    assert_eq!(
        h.engine.poll_timeout(),
        Some(1_020),
        "the tick the hold ends at"
    );
    h.handle(Event::Tick { now: 1_019 });
    h.settle();
    assert!(h.reply_to(admin, c).is_none());
    h.handle(Event::Tick { now: 1_020 });
    h.settle();
    assert!(matches!(
        h.reply_to(admin, c),
        Some(ServerMsg::SnapshotCreated { .. })
    ));
}

/// `Diff` through the engine: the chunks written between two snapshots and since the last
/// one, paged with a small budget, unchanged by origin writes after both snapshots; and the
/// refusals (origin connection, unknown snapshot, start past the volume).
#[test]
fn diff_pages_name_the_chunks_written_between_two_ends() {
    let mut h = Harness::new(config(), 16, 64);
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let write = |h: &mut Harness, ranges: Vec<ChunkRange>| {
        let w = h.send(origin, ClientMsg::QueryWrite { ranges });
        h.settle();
        assert!(h.reply_to(origin, w).is_some());
    };
    let diff = |h: &mut Harness, from: DiffEnd, to: DiffEnd, budget: u32| {
        let mut chunks = Vec::new();
        let mut start = 0;
        loop {
            let d = h.send(
                admin,
                ClientMsg::Diff {
                    from,
                    to,
                    start,
                    budget,
                },
            );
            match h.reply_to(admin, d) {
                Some(ServerMsg::DiffPage(page)) => {
                    chunks.extend(page.ranges.iter().flat_map(|r| r.chunks().unwrap()));
                    match page.next {
                        Some(n) => {
                            assert!(n > start);
                            start = n
                        }
                        None => return chunks,
                    }
                }
                other => panic!("Diff {from} -> {to}: {other:?}"),
            }
        }
    };
    let a = h.create_snapshot(admin, "a", &[origin]);
    write(&mut h, vec![ChunkRange::new(1, 2), ChunkRange::new(7, 1)]);
    let b = h.create_snapshot(admin, "b", &[origin]);
    write(&mut h, vec![ChunkRange::new(2, 1), ChunkRange::new(9, 3)]);
    for budget in [1, 2, 1000] {
        let (sa, sb) = (DiffEnd::Snapshot(a), DiffEnd::Snapshot(b));
        assert_eq!(
            diff(&mut h, sa, sb, budget),
            vec![1, 2, 7],
            "budget {budget}"
        );
        assert_eq!(diff(&mut h, sb, sa, budget), vec![1, 2, 7]);
        assert_eq!(
            diff(&mut h, sb, DiffEnd::Origin, budget),
            vec![2, 9, 10, 11]
        );
        assert_eq!(
            diff(&mut h, sa, DiffEnd::Origin, budget),
            vec![1, 2, 7, 9, 10, 11]
        );
        assert_eq!(diff(&mut h, sa, sa, budget), Vec::<u64>::new());
    }
    // The origin moves on; the diff between the two snapshots does not.
    write(&mut h, vec![ChunkRange::new(0, 16)]);
    assert_eq!(
        diff(&mut h, DiffEnd::Snapshot(a), DiffEnd::Snapshot(b), 2),
        vec![1, 2, 7]
    );

    let refused = |h: &mut Harness, conn, from, start| {
        let d = h.send(
            conn,
            ClientMsg::Diff {
                from,
                to: DiffEnd::Origin,
                start,
                budget: 10,
            },
        );
        error_code(&h.reply_to(conn, d))
    };
    assert_eq!(
        refused(&mut h, origin, DiffEnd::Snapshot(a), 0),
        Some(ErrorCode::WrongClientKind)
    );
    assert_eq!(
        refused(&mut h, admin, DiffEnd::Snapshot(SnapId(99)), 0),
        Some(ErrorCode::NoSuchSnapshot)
    );
    assert_eq!(
        refused(&mut h, admin, DiffEnd::Snapshot(a), 17),
        Some(ErrorCode::OutOfRange)
    );
    h.engine.store().check().unwrap();
}
