//! Client identities, resent requests and shared durability results (issue 8, findings
//! 6-8): who a connection is, what a request resent after a reconnect does, and that a
//! failed commit stays failed for everyone who waited for it.

use crate::engine_common;

use csnap_proto::*;
use csnap_server::engine::*;
use engine_common::*;

/// Several replies wait for one commit (two copy-outs and a delete). The commit fails: none
/// of them is answered (each would tell a client its change is durable), the engine stops,
/// and later requests get `Internal`.
#[test]
fn a_failed_commit_answers_none_of_its_waiters() {
    let mut h = Harness::new(config(), 16, 16);
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let s0 = h.create_snapshot(admin, "s0", &[origin]);
    let _s1 = h.create_snapshot(admin, "s1", &[origin]);
    let w0 = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(0, 1),
        },
    );
    let w1 = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(1, 1),
        },
    );
    while h.run_one_copy() {}
    let del = h.send(admin, ClientMsg::DeleteSnapshot { snap: s0 });
    assert!(
        h.commit_pending,
        "the copy-outs and the delete wait for a commit"
    );
    h.commit_pending = false;
    h.handle(Event::CommitDone {
        result: Err(MetaError::from(std::io::Error::other("EIO on the journal")).into()),
    });
    assert!(h.fatal.as_deref().is_some_and(|r| r.contains("EIO")));
    for (conn, id) in [(origin, w0), (origin, w1), (admin, del)] {
        assert_eq!(
            h.reply_to(conn, id),
            None,
            "request {id} answered after a failed commit"
        );
    }
    let later = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(2, 1),
        },
    );
    assert_eq!(
        error_code(&h.reply_to(origin, later)),
        Some(ErrorCode::Internal)
    );
    // Nor does a late CommitDone (or any event) revive it.
    h.handle(Event::CommitDone { result: Ok(()) });
    for (conn, id) in [(origin, w0), (origin, w1), (admin, del)] {
        assert_eq!(h.reply_to(conn, id), None);
    }
}

// ---- finding 6: client identities ----

/// Runs the handshake by hand for client instance `client`'s connection of `kind`, in
/// incarnation `incarnation`; returns the connection and the answer to the proof
/// (`Welcome`, or the error that refused the session).
fn hello(
    h: &mut Harness,
    client: u64,
    kind: ClientKind,
    incarnation: u64,
    resuming: bool,
) -> (ConnId, ServerMsg) {
    let conn = h.open_conn();
    let client_nonce = [7u8; 32];
    let id = ClientId::new(client, kind);
    let hello = h.send(
        conn,
        ClientMsg::Hello {
            protocol_version: u32::from(PROTOCOL_VERSION),
            client: id,
            node: 2,
            incarnation,
            client_nonce,
            resuming,
        },
    );
    let Some(ServerMsg::Challenge { server_nonce, .. }) = h.reply_to(conn, hello) else {
        panic!("no challenge");
    };
    let handshake = csnap_proto::auth::Handshake {
        protocol_version: u32::from(PROTOCOL_VERSION),
        client: id,
        node: 2,
        incarnation,
        resuming,
        client_nonce,
        server_nonce,
    };
    let proof = csnap_proto::auth::client_proof(KEY, &handshake);
    let auth = h.send(conn, ClientMsg::AuthResponse { proof });
    let answer = h.reply_to(conn, auth).expect("an answer to the proof");
    (conn, answer)
}

/// The combination the old `base + 2 + snap` derivation made collide: client 100's
/// connection for snapshot 1 and client 103's origin connection both presented 103. Here
/// the two connections share the number but not the kind: they are different clients. The
/// origin client's arrival must neither close the snapshot reader nor release the read
/// lock it holds while its origin read is in flight, so the origin write waits.
#[test]
fn an_origin_client_never_takes_over_a_snapshot_client_with_the_same_number() {
    let mut h = Harness::new(config(), 16, 16);
    let first_origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let s = h.create_snapshot(admin, "s", &[first_origin]);
    let reader = h.connect(103, ClientKind::Snapshot { snap: s }, false);
    let q = h.send(
        reader,
        ClientMsg::QuerySnapshotRead {
            snap: s,
            ranges: range(4, 1),
        },
    );
    match h.reply_to(reader, q) {
        Some(ServerMsg::SnapshotReadOk { origin_locked, .. }) => {
            assert_eq!(origin_locked, range(4, 1))
        }
        other => panic!("expected a read lock, got {other:?}"),
    }
    // Another node's origin client, number 103.
    let (writer, answer) = hello(&mut h, 103, ClientKind::Origin, 1, false);
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");
    assert!(
        !h.closed.contains(&reader),
        "the snapshot reader was disconnected"
    );
    assert_eq!(h.engine.read_locks(4), 1, "the reader's lock was released");
    let w = h.send(
        writer,
        ClientMsg::QueryWrite {
            ranges: range(4, 1),
        },
    );
    h.settle();
    assert_eq!(h.reply_to(writer, w), None, "granted under a read lock");
    // The reader's connection drops mid-read (its lock is kept for it), and the origin
    // client connects again: still no grant.
    h.handle(Event::ClientDisconnected { conn: reader });
    let (writer2, answer) = hello(&mut h, 103, ClientKind::Origin, 1, false);
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");
    let w2 = h.send(
        writer2,
        ClientMsg::QueryWrite {
            ranges: range(4, 1),
        },
    );
    h.settle();
    assert_eq!(h.engine.read_locks(4), 1, "the orphaned lock was released");
    assert_eq!(
        h.reply_to(writer2, w2),
        None,
        "granted under an orphaned read lock"
    );
    // The reader comes back, releases: the write goes ahead.
    let back = h.connect(103, ClientKind::Snapshot { snap: s }, true);
    let up = h.send(
        back,
        ClientMsg::UploadLocks {
            locks: vec![HeldLock {
                snap: s,
                range: ChunkRange::new(4, 1),
            }],
            leases: vec![],
        },
    );
    assert_eq!(h.reply_to(back, up), Some(ServerMsg::UploadLocksOk));
    h.send(back, ClientMsg::ResendDone);
    let fin = h.send(
        back,
        ClientMsg::FinishSnapshotRead {
            snap: s,
            ranges: range(4, 1),
        },
    );
    assert_eq!(h.reply_to(back, fin), Some(ServerMsg::FinishSnapshotReadOk));
    h.settle();
    assert!(matches!(
        h.reply_to(writer2, w2),
        Some(ServerMsg::OriginWriteOk { .. })
    ));
}

/// A second client presenting an id that a live connection already uses (a configuration
/// mistake, not a reconnect of that connection) is refused with an error naming the id;
/// the first connection keeps working.
#[test]
fn a_duplicate_hello_is_refused_and_the_first_connection_keeps_working() {
    let mut h = Harness::new(config(), 16, 16);
    let (first, answer) = hello(&mut h, 0x77, ClientKind::Origin, 1, false);
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");
    // Another process given the same id: a different incarnation, resuming or not.
    let (resumer, answer) = hello(&mut h, 0x77, ClientKind::Origin, 2, true);
    assert!(
        matches!(
            &answer,
            ServerMsg::Error {
                code: ErrorCode::DuplicateClient,
                ..
            }
        ),
        "{answer:?}"
    );
    assert!(h.closed.contains(&resumer));
    let (second, answer) = hello(&mut h, 0x77, ClientKind::Origin, 3, false);
    match answer {
        ServerMsg::Error { code, message } => {
            assert_eq!(code, ErrorCode::DuplicateClient);
            assert!(
                message.contains("0x77/origin"),
                "the error names the id: {message}"
            );
        }
        other => panic!("a duplicate client was let in: {other:?}"),
    }
    assert!(h.closed.contains(&second), "the duplicate is disconnected");
    assert!(
        !h.closed.contains(&first),
        "the first connection was closed"
    );
    h.granted_origin_write(first, 0);
    let st = h.send(first, ClientMsg::Status);
    match h.reply_to(first, st) {
        Some(ServerMsg::Status(s)) => assert_eq!(s.connected_clients, 1),
        other => panic!("{other:?}"),
    }
}

/// The same client (same incarnation) reconnecting while the server still holds its old
/// connection: the old one is dead and replaced, whether the new Hello resumes or not (a
/// connection lost before Welcome reached the client reconnects without resuming).
#[test]
fn a_reconnect_of_the_same_client_replaces_its_lingering_connection() {
    let mut h = Harness::new(config(), 16, 16);
    let (old, answer) = hello(&mut h, 0x77, ClientKind::Origin, 5, false);
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");
    let (new, answer) = hello(&mut h, 0x77, ClientKind::Origin, 5, false);
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");
    assert!(
        h.closed.contains(&old),
        "the lingering connection is closed"
    );
    let (newer, answer) = hello(&mut h, 0x77, ClientKind::Origin, 5, true);
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");
    assert!(h.closed.contains(&new));
    h.granted_origin_write(newer, 0);
    // Once the first client's connection is gone, another incarnation may use the id (a
    // restarted client process).
    h.handle(Event::ClientDisconnected { conn: newer });
    let (restarted, answer) = hello(&mut h, 0x77, ClientKind::Origin, 6, false);
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");
    assert!(!h.closed.contains(&restarted));
}

// ---- finding 7: resent creates and deletes ----

fn create(h: &mut Harness, admin: ConnId, name: &str, token: u64) -> RequestId {
    h.send(
        admin,
        ClientMsg::CreateSnapshot {
            name: name.into(),
            token,
        },
    )
}

fn listed(h: &mut Harness) -> Vec<SnapshotInfo> {
    h.engine.store_mut().list_snapshots().unwrap()
}

/// The admin's connection drops before the answer, at each stage of a creation (queued
/// behind another, announced and waiting for an origin client's ack, created and waiting
/// for its commit, done): the same request resent on a new connection is answered with
/// the snapshot the first send started, and only one snapshot exists.
#[test]
fn a_resent_create_is_answered_with_the_snapshot_its_first_send_created() {
    let mut h = Harness::new(config(), 16, 16);
    let origin = h.connect(1, ClientKind::Origin, false);
    // Done: created, committed, answer lost.
    let admin = h.admin();
    create(&mut h, admin, "done", 0x1001);
    for n in h.notices(origin) {
        if let ServerMsg::NewSnapshot { snap } = n {
            h.send(origin, ClientMsg::NewSnapshotAck { snap });
        }
    }
    h.settle();
    h.handle(Event::ClientDisconnected { conn: admin });
    let done = listed(&mut h)[0].clone();
    // Announced, waiting for the origin client's ack; and one queued behind it.
    let admin = h.admin();
    create(&mut h, admin, "announced", 0x2002);
    create(&mut h, admin, "queued", 0x3003);
    h.settle();
    h.handle(Event::ClientDisconnected { conn: admin });

    let admin = h.admin();
    let again_done = create(&mut h, admin, "done", 0x1001);
    match h.reply_to(admin, again_done) {
        Some(ServerMsg::SnapshotCreated { info }) => assert_eq!(info, done),
        other => panic!("resent create of a finished snapshot: {other:?}"),
    }
    let again_announced = create(&mut h, admin, "announced", 0x2002);
    let again_queued = create(&mut h, admin, "queued", 0x3003);
    // Someone else's request for a name in use: still NameTaken.
    let foreign = create(&mut h, admin, "announced", 0x9999);
    assert_eq!(
        error_code(&h.reply_to(admin, foreign)),
        Some(ErrorCode::NameTaken)
    );
    assert!(
        h.reply_to(admin, again_announced).is_none(),
        "waits for the ack"
    );
    for _ in 0..2 {
        for n in h.notices(origin) {
            if let ServerMsg::NewSnapshot { snap } = n {
                h.send(origin, ClientMsg::NewSnapshotAck { snap });
            }
        }
        h.settle();
    }
    let mut ids = Vec::new();
    for (id, name) in [(again_announced, "announced"), (again_queued, "queued")] {
        match h.reply_to(admin, id) {
            Some(ServerMsg::SnapshotCreated { info }) => {
                assert_eq!(info.name, name);
                ids.push(info.id);
            }
            other => panic!("resent create of {name}: {other:?}"),
        }
    }
    let names: Vec<String> = listed(&mut h).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["done", "announced", "queued"], "one snapshot each");
}

/// Created and committed, then the server crashes before the answer reaches the client;
/// the new server (failover) answers the resend with that snapshot.
#[test]
fn a_create_resent_to_a_new_server_is_answered_with_its_snapshot() {
    let mut h = Harness::new(config(), 16, 16);
    let admin = h.admin();
    create(&mut h, admin, "nightly", 0xabc);
    h.settle();
    let first = listed(&mut h);
    assert_eq!(first.len(), 1);
    h.failover(config());
    let admin = h.admin();
    let again = create(&mut h, admin, "nightly", 0xabc);
    match h.reply_to(admin, again) {
        Some(ServerMsg::SnapshotCreated { info }) => assert_eq!(info.id, first[0].id),
        other => panic!("resent create after failover: {other:?}"),
    }
    let other_token = create(&mut h, admin, "nightly", 0xdef);
    assert_eq!(
        error_code(&h.reply_to(admin, other_token)),
        Some(ErrorCode::NameTaken)
    );
    let no_token = create(&mut h, admin, "nightly", 0);
    assert_eq!(
        error_code(&h.reply_to(admin, no_token)),
        Some(ErrorCode::NameTaken)
    );
    assert_eq!(listed(&mut h).len(), 1);
}

/// Deletes name snapshots by id: a delete resent after the snapshot it meant is gone and a
/// newer one took its name answers `NoSuchSnapshot` and leaves the newer one alone.
#[test]
fn a_resent_delete_by_id_never_touches_a_newer_snapshot_with_the_same_name() {
    let mut h = Harness::new(config(), 16, 16);
    let admin = h.admin();
    let old = h.create_snapshot(admin, "x", &[]);
    let d = h.send(admin, ClientMsg::DeleteSnapshot { snap: old });
    h.settle();
    assert_eq!(
        h.reply_to(admin, d),
        Some(ServerMsg::SnapshotDeleted { snap: old })
    );
    let new = h.create_snapshot(admin, "x", &[]);
    let again = h.send(admin, ClientMsg::DeleteSnapshot { snap: old });
    h.settle();
    assert_eq!(
        error_code(&h.reply_to(admin, again)),
        Some(ErrorCode::NoSuchSnapshot)
    );
    let f = h.send(admin, ClientMsg::FindSnapshot { name: "x".into() });
    match h.reply_to(admin, f) {
        Some(ServerMsg::SnapshotFound { info }) => assert_eq!(info.id, new),
        other => panic!("{other:?}"),
    }
}

/// The on-disk store keeps the token with the snapshot, across a clean reopen and a crash.
#[test]
fn the_store_keeps_the_create_token_across_reopen_and_crash() {
    use csnap_server::store::{FormatOptions, Geometry, MemDevice, OpenOptions, Store};
    use std::sync::Arc;
    let chunk = 4096;
    let dev = MemDevice::new(Geometry::smallest_store(chunk).unwrap() + 64 * chunk);
    Store::format(
        &dev,
        &FormatOptions {
            chunk_size: chunk,
            origin_size: 16 * chunk,
            now: 1_700_000_000,
            uuid: None,
        },
    )
    .unwrap();
    let open = |dev: &MemDevice| Store::open(Arc::new(dev.clone()), OpenOptions::default());
    let token = create_token() | (0xff << 40); // bits above the kept 40 are ignored
    let mut store = open(&dev).unwrap();
    let a = MetaStore::create_snapshot_with_token(&mut store, "a", 1, token).unwrap();
    let b = MetaStore::create_snapshot(&mut store, "b", 1).unwrap();
    MetaStore::commit(&mut store).unwrap();
    assert!(store.check().unwrap().is_clean());
    store.close().unwrap();
    let mut store = open(&dev).unwrap();
    assert!(MetaStore::created_with(&mut store, a.id, token).unwrap());
    assert!(MetaStore::created_with(&mut store, a.id, token & ((1 << 40) - 1)).unwrap());
    assert!(!MetaStore::created_with(&mut store, a.id, token ^ 1).unwrap());
    assert!(!MetaStore::created_with(&mut store, b.id, 0).unwrap());
    assert!(store.check().unwrap().is_clean());
    drop(store); // crash
    let crashed = dev.crash(7);
    let mut store = open(&crashed).unwrap();
    assert!(store.was_unclean());
    assert!(MetaStore::created_with(&mut store, a.id, token).unwrap());
}

/// The resend arrives while the creation waits for its commit: it gets the answer once
/// the creation is durable, not before.
#[test]
fn a_create_resent_while_its_commit_runs_is_answered_after_the_commit() {
    let mut h = Harness::new(config(), 16, 16);
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    create(&mut h, admin, "p", 0x77);
    let notices = h.notices(origin);
    let [ServerMsg::NewSnapshot { snap }] = notices.as_slice() else {
        panic!("{notices:?}");
    };
    h.send(origin, ClientMsg::NewSnapshotAck { snap: *snap });
    assert!(h.commit_pending, "created in the store, commit outstanding");
    h.handle(Event::ClientDisconnected { conn: admin });
    let admin = h.admin();
    let again = create(&mut h, admin, "p", 0x77);
    assert_eq!(h.reply_to(admin, again), None, "not durable yet");
    h.settle();
    match h.reply_to(admin, again) {
        Some(ServerMsg::SnapshotCreated { info }) => assert_eq!(info.id, *snap),
        other => panic!("{other:?}"),
    }
    assert_eq!(listed(&mut h).len(), 1);
}

/// The authentication deadline is the engine's, driven by ticks: a connection that never
/// authenticates is closed strictly after `auth_timeout_secs`, one that did is kept, and
/// the status figures (now the engine's own call) count only the clients left.
#[test]
fn an_unauthenticated_connection_is_closed_after_the_deadline_and_status_counts_clients() {
    let mut cfg = config();
    cfg.auth_timeout_secs = 5;
    let mut h = Harness::new(cfg, 64, 64);
    let idle = h.open_conn();
    let admin = h.admin();
    assert_eq!(
        h.engine.poll_timeout(),
        Some(1_006),
        "the engine asks for the tick that closes the idle connection"
    );
    assert_eq!(
        h.engine.status().map(|s| s.connected_clients),
        Some(2),
        "both connections count while the idle one may still authenticate"
    );
    // Exactly at the deadline (whole seconds): not yet.
    h.handle(Event::Tick { now: 1_005 });
    assert!(
        !h.closed.contains(&idle),
        "closed at the deadline, not after it"
    );
    h.handle(Event::Tick { now: 1_006 });
    assert!(
        h.closed.contains(&idle),
        "the idle connection is closed after it"
    );
    assert!(!h.closed.contains(&admin), "the authenticated one stays");
    assert!(
        h.logs
            .iter()
            .any(|(_, m)| m.contains("no authentication within 5 s")),
        "{:?}",
        h.logs
    );
    let status = h.engine.status().expect("status of a healthy engine");
    assert_eq!(status.connected_clients, 1);
    assert!(status.active);
    assert_eq!(h.engine.poll_timeout(), None, "nothing left to time out");
}

/// `poll_timeout` asks for a tick only while time alone changes something, and names the
/// second the tick then acts in: here background reclaim after start, an origin client's
/// silence deadline, and the lease end of a lost origin client.
#[test]
fn poll_timeout_asks_for_ticks_only_while_time_can_change_something() {
    let cfg = EngineConfig {
        origin_lease_secs: 10,
        ..config()
    };
    let mut h = Harness::new(cfg, 16, 16);
    assert_eq!(
        h.engine.poll_timeout(),
        Some(1_001),
        "a fresh engine resumes reclaim in the background, a step per second"
    );
    h.handle(Event::Tick { now: 1_001 });
    assert_eq!(
        h.engine.poll_timeout(),
        None,
        "an idle engine waits for nothing"
    );
    h.admin();
    assert_eq!(
        h.engine.poll_timeout(),
        None,
        "an admin client has no deadline"
    );
    let origin = h.connect(1, ClientKind::Origin, false);
    // Lease 10 s + margin 2 s + clock slack 2 s from when it was last heard.
    assert_eq!(
        h.engine.poll_timeout(),
        Some(1_015),
        "the origin's silence deadline"
    );
    h.handle(Event::Tick { now: 1_005 });
    h.handle(Event::ClientDisconnected { conn: origin });
    assert_eq!(
        h.engine.poll_timeout(),
        Some(1_015),
        "the lost origin client may write until its lease has run out"
    );
    let lease_ended = |h: &Harness| {
        h.logs
            .iter()
            .any(|(_, m)| m.contains("lost origin client") && m.contains("run out"))
    };
    h.handle(Event::Tick { now: 1_014 });
    assert!(!lease_ended(&h), "still counted a second before");
    h.handle(Event::Tick { now: 1_015 });
    assert!(lease_ended(&h), "let go at the second poll_timeout named");
    assert_eq!(h.engine.poll_timeout(), None);
}
