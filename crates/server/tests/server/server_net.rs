//! The real server (in-process through `net::start`, and the csnap-server binary) over real
//! sockets: authentication, copy-out on the store device, the activation gate, pipelining,
//! bad frames and slow clients.

use crate::server_support;

use csnap_proto::ListenAddr;
use csnap_proto::*;
use csnap_server::net::{self, ServerError};
use server_support::*;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::Duration;

const ADMIN: u64 = 0xAD;
const ORIGIN: u64 = 0x0A;

fn tcp() -> ListenAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn create_snapshot(admin: &Client, name: &str) -> SnapshotInfo {
    match admin
        .request(ClientMsg::CreateSnapshot {
            name: name.into(),
            token: 0,
        })
        .await
        .unwrap()
    {
        ServerMsg::SnapshotCreated { info } => info,
        other => panic!("create {name}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_key_is_accepted_wrong_key_is_rejected_and_others_are_unaffected() {
    let fx = Fixture::small();
    let server = net::start(fx.config(tcp())).await.unwrap();
    let addr = server.local_addr();
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;

    let refused = Client::handshake(
        connect_raw(&addr).await.unwrap(),
        b"not the cluster key at all",
        Hello {
            client: 0xBAD,
            kind: ClientKind::Origin,
            resuming: false,
        },
    )
    .await
    .err()
    .expect("a wrong key must not open a session");
    assert!(
        !refused.server_proof_ok,
        "the client can tell the server does not share its key"
    );
    match refused.reply {
        Some(ServerMsg::Error {
            code: ErrorCode::AuthFailed,
            ..
        }) => {}
        other => panic!("expected AuthFailed, got {other:?}"),
    }

    // The good session still works, and the refused one is gone.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match admin.request(ClientMsg::Status).await.unwrap() {
            ServerMsg::Status(s) if s.connected_clients == 1 => break,
            ServerMsg::Status(_) => {}
            other => panic!("status: {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "refused connection lingers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = server.status().await.unwrap();
    assert_eq!(
        s.connected_clients, 1,
        "the shell's own session is not counted"
    );
    assert!(s.active);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_readable_by_others_is_refused_with_a_clear_error() {
    let fx = Fixture::small();
    std::fs::set_permissions(&fx.key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = match net::start(fx.config(tcp())).await {
        Err(e) => e,
        Ok(_) => panic!("a 0644 key file must be refused"),
    };
    assert!(matches!(err, ServerError::KeyFile(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&fx.key_file.display().to_string()) && msg.contains("0644"),
        "the error names the file and its mode: {msg}"
    );
    // Nothing was touched: the store is still clean and openable.
    assert!(fx.check_store().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_write_copies_the_old_data_to_the_store_before_the_grant() {
    let fx = Fixture::small();
    let server = net::start(fx.config(fx.unix_addr("s.sock"))).await.unwrap();
    let addr = server.local_addr();
    let origin_file = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.origin)
        .unwrap();
    let origin = Client::connect(&addr, &fx.key, ORIGIN, ClientKind::Origin).await;
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;
    assert_eq!(u64::from(origin.chunk_size), fx.chunk_size);
    assert_eq!(origin.origin_chunks, fx.origin_chunks);

    let snap = create_snapshot(&admin, "before").await;
    match origin.next_notice(WAIT).await {
        Some(ServerMsg::NewSnapshot { snap: s }) => assert_eq!(s, snap.id),
        other => panic!("origin client was not told about the snapshot: {other:?}"),
    }
    let free_before = server.status().await.unwrap().free_chunks;

    // Grant, but do not write yet: the copy-out must already be on the store device.
    match origin
        .request(ClientMsg::QueryWrite {
            ranges: vec![ChunkRange::new(5, 1)],
        })
        .await
        .unwrap()
    {
        ServerMsg::OriginWriteOk { ranges, unique } => {
            assert_eq!(ranges, vec![ChunkRange::new(5, 1)]);
            assert!(unique);
        }
        other => panic!("QueryWrite: {other:?}"),
    }
    let reader = Client::connect(&addr, &fx.key, 0x5, ClientKind::Snapshot { snap: snap.id }).await;
    let reply = reader
        .request(ClientMsg::QuerySnapshotRead {
            snap: snap.id,
            ranges: vec![ChunkRange::new(5, 1)],
        })
        .await
        .unwrap();
    let ServerMsg::SnapshotReadOk {
        store,
        origin_locked,
    } = reply
    else {
        panic!("snapshot read: {reply:?}");
    };
    assert!(origin_locked.is_empty(), "chunk 5 was copied out");
    assert_eq!(store.len(), 1);
    assert_eq!(store[0].chunk, 5);
    let cs = fx.chunk_size as usize;
    assert_eq!(
        fx.read_store_chunk(store[0].store_chunk),
        pattern(cs, 5, 0),
        "the store holds the origin's old contents at the reported address"
    );
    assert_eq!(
        server.status().await.unwrap().free_chunks,
        free_before - 1,
        "one store chunk used by the copy-out"
    );

    // The client now writes the origin; the snapshot keeps its view, the origin changes.
    origin
        .origin_write(&origin_file, 5, &pattern(cs, 5, 1))
        .await
        .unwrap();
    // A second write of the same chunk uses the unique promise: no query, no copy.
    origin
        .origin_write(&origin_file, 5, &pattern(cs, 5, 2))
        .await
        .unwrap();
    assert_eq!(fx.read_origin(5), pattern(cs, 5, 2));
    let view = reader
        .read_snapshot(snap.id, ChunkRange::new(4, 3), &fx.origin, &fx.store)
        .await
        .unwrap();
    let expected: Vec<u8> = (4..7).flat_map(|c| pattern(cs, c, 0)).collect();
    assert_eq!(view, expected, "snapshot reads its creation-time contents");
    assert_eq!(server.status().await.unwrap().free_chunks, free_before - 1);

    server.shutdown().await.unwrap();
    let report = fx.check_store();
    assert!(report.is_clean(), "{:?}", report.problems);

    // Restart: the exception is durable and the store was closed cleanly.
    let server = net::start(fx.config(fx.unix_addr("s.sock"))).await.unwrap();
    assert!(!server.recovered_unclean());
    let addr = server.local_addr();
    let reader = Client::connect(&addr, &fx.key, 0x5, ClientKind::Snapshot { snap: snap.id }).await;
    let view = reader
        .read_snapshot(snap.id, ChunkRange::new(4, 3), &fx.origin, &fx.store)
        .await
        .unwrap();
    assert_eq!(view, expected);
    server.shutdown().await.unwrap();
}

async fn assert_no_reply(rx: &mut tokio::sync::oneshot::Receiver<ServerMsg>, what: &str) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(400), &mut *rx).await {
        panic!("{what}: answered while the gate is closed: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_gate_holds_origin_writes_until_the_expected_client_resumes() {
    let fx = Fixture::small();
    let expected = ClientId::new(0x77, ClientKind::Snapshot { snap: SnapId(1) });
    let mut cfg = fx.config(tcp());
    cfg.engine.expected_snapshot_clients = vec![expected];
    let server = net::start(cfg).await.unwrap();
    let addr = server.local_addr();
    let status = server.status().await.unwrap();
    assert!(!status.active);
    assert_eq!(status.awaited_clients, vec![expected]);

    let origin = Client::connect(&addr, &fx.key, ORIGIN, ClientKind::Origin).await;
    let (_, mut granted) = origin.send(ClientMsg::QueryWrite {
        ranges: vec![ChunkRange::new(1, 2)],
    });
    assert_no_reply(&mut granted, "origin write").await;

    // The expected snapshot client comes back: resumes, re-asserts (no) locks, done.
    let snap_client = Client::handshake(
        connect_raw(&addr).await.unwrap(),
        &fx.key,
        Hello {
            client: expected.instance,
            kind: expected.kind,
            resuming: true,
        },
    )
    .await
    .unwrap();
    // It was reading origin chunk 2 (under a read lock) when the old server died.
    let held = ChunkRange::new(2, 1);
    assert_eq!(
        snap_client
            .request(ClientMsg::UploadLocks {
                locks: vec![HeldLock {
                    snap: SnapId(1),
                    range: held
                }],
                leases: vec![]
            })
            .await
            .unwrap(),
        ServerMsg::UploadLocksOk
    );
    assert_no_reply(&mut granted, "origin write before ResendDone").await;
    assert_eq!(
        snap_client.request(ClientMsg::ResendDone).await.unwrap(),
        ServerMsg::ResendDoneOk
    );
    // Gate open, but chunk 2 is read-locked: the write of chunks 1-2 waits for the release.
    assert!(server.status().await.unwrap().active);
    assert_no_reply(&mut granted, "origin write over a re-asserted read lock").await;
    assert_eq!(
        snap_client
            .request(ClientMsg::FinishSnapshotRead {
                snap: SnapId(1),
                ranges: vec![held]
            })
            .await
            .unwrap(),
        ServerMsg::FinishSnapshotReadOk
    );
    match tokio::time::timeout(WAIT, granted).await {
        Ok(Ok(ServerMsg::OriginWriteOk { ranges, .. })) => {
            assert_eq!(ranges, vec![ChunkRange::new(1, 2)])
        }
        other => panic!("origin write after the gate opened: {other:?}"),
    }
    assert!(server.status().await.unwrap().active);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_gate_opens_when_the_expected_client_is_declared_gone() {
    let fx = Fixture::small();
    let reader = |n| ClientId::new(n, ClientKind::Snapshot { snap: SnapId(1) });
    let (gone, back) = (reader(0x1), reader(0x2));
    let mut cfg = fx.config(tcp());
    cfg.engine.expected_snapshot_clients = vec![gone, back];
    let server = net::start(cfg).await.unwrap();
    let addr = server.local_addr();
    let origin = Client::connect(&addr, &fx.key, ORIGIN, ClientKind::Origin).await;
    let (_, mut granted) = origin.send(ClientMsg::QueryWrite {
        ranges: vec![ChunkRange::new(0, 1)],
    });
    assert_no_reply(&mut granted, "origin write").await;
    server.declare_gone(gone);
    assert_no_reply(&mut granted, "origin write with one client still awaited").await;
    assert_eq!(server.status().await.unwrap().awaited_clients, vec![back]);
    server.declare_gone(back);
    match tokio::time::timeout(WAIT, granted).await {
        Ok(Ok(ServerMsg::OriginWriteOk { .. })) => {}
        other => panic!("origin write after both were declared gone: {other:?}"),
    }
    let s = server.status().await.unwrap();
    assert!(s.active && s.awaited_clients.is_empty());
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_from_many_clients_each_get_their_own_reply() {
    use rand::{Rng, SeedableRng};
    let seed = seed("pipelined_requests_from_many_clients_each_get_their_own_reply");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let fx = Fixture::small();
    let server = net::start(fx.config(tcp())).await.unwrap();
    let addr = server.local_addr();
    let admin = Arc::new(Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await);
    let mut origins = Vec::new();
    for i in 0..4 {
        origins.push(Arc::new(
            Client::connect(&addr, &fx.key, 0x100 + i, ClientKind::Origin).await,
        ));
    }
    let first = create_snapshot(&admin, "base").await;
    let mut readers = Vec::new();
    for i in 0..2 {
        readers.push(Arc::new(
            Client::connect(
                &addr,
                &fx.key,
                0x200 + i,
                ClientKind::Snapshot { snap: first.id },
            )
            .await,
        ));
    }

    let mut tasks = tokio::task::JoinSet::new();
    let n = fx.origin_chunks;
    for c in &origins {
        for _ in 0..300 {
            let start = rng.gen_range(0..n - 4);
            let ranges = vec![
                ChunkRange::new(start, rng.gen_range(1..4)),
                ChunkRange::new(rng.gen_range(0..n), 1),
            ];
            let (id, rx) = c.send(ClientMsg::QueryWrite {
                ranges: ranges.clone(),
            });
            tasks.spawn(async move {
                match tokio::time::timeout(WAIT, rx).await {
                    Ok(Ok(ServerMsg::OriginWriteOk { ranges: got, .. })) => {
                        assert_eq!(got, ranges, "reply {id} is for its own request")
                    }
                    other => panic!("QueryWrite {id}: {other:?}"),
                }
            });
        }
    }
    for c in &readers {
        for _ in 0..200 {
            let range = ChunkRange::new(rng.gen_range(0..n - 8), rng.gen_range(1..8));
            let (id, rx) = c.send(ClientMsg::QuerySnapshotRead {
                snap: first.id,
                ranges: vec![range],
            });
            let c = c.clone();
            tasks.spawn(async move {
                let reply = tokio::time::timeout(WAIT, rx).await;
                let Ok(Ok(ServerMsg::SnapshotReadOk {
                    store,
                    origin_locked,
                })) = reply
                else {
                    panic!("QuerySnapshotRead {id}: {reply:?}");
                };
                let mut located: Vec<u64> = store.iter().map(|a| a.chunk).collect();
                located.extend(origin_locked.iter().flat_map(|r| r.chunks().unwrap()));
                located.sort_unstable();
                assert_eq!(
                    located,
                    range.chunks().unwrap().collect::<Vec<_>>(),
                    "reply {id} locates exactly the chunks it asked for"
                );
                if !origin_locked.is_empty() {
                    let done = c
                        .request(ClientMsg::FinishSnapshotRead {
                            snap: first.id,
                            ranges: origin_locked,
                        })
                        .await
                        .unwrap();
                    assert_eq!(done, ServerMsg::FinishSnapshotReadOk);
                }
            });
        }
    }
    for i in 0..3 {
        let admin = admin.clone();
        tasks.spawn(async move {
            let name = format!("during-{i}");
            let info = create_snapshot(&admin, &name).await;
            assert_eq!(info.name, name);
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    })
    .await;
    assert!(all.is_ok(), "pipelined requests not all answered in time");
    for c in origins.iter().chain(&readers).chain([&admin]) {
        let mut seen = c.replies_seen.lock().unwrap().clone();
        let total = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), total, "a request was answered twice");
    }
    let s = server.status().await.unwrap();
    assert_eq!(s.snapshots, 4);
    assert_eq!(s.pending_snapshots, 0);
    server.shutdown().await.unwrap();
    let report = fx.check_store();
    assert!(report.is_clean(), "{:?}", report.problems);
}

fn frame_with_version(msg: &ClientFrame, version: u8) -> Vec<u8> {
    let mut bytes = frame_bytes(msg).unwrap();
    bytes[4] = version;
    bytes
}

fn assert_error_then_close(what: &str, (frames, closed): (Vec<ServerFrame>, bool), needle: &str) {
    assert!(closed, "{what}: the server closes the connection");
    match frames.as_slice() {
        [ServerFrame {
            msg: ServerMsg::Error { message, .. },
            ..
        }] => assert!(
            message.contains(needle),
            "{what}: the error says why ({needle:?}): {message}"
        ),
        other => panic!("{what}: expected one error reply, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_a_clear_error_and_the_server_keeps_serving_others() {
    let fx = Fixture::small();
    let server = net::start(fx.config(tcp())).await.unwrap();
    let addr = server.local_addr();
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;
    let hello = ClientFrame {
        id: 1,
        msg: ClientMsg::Status,
    };

    // A well-framed body that is not MessagePack for any message.
    let garbage = [0, 0, 0, 6, PROTOCOL_VERSION, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1];
    assert_error_then_close(
        "garbage body",
        raw_exchange(&addr, &garbage).await,
        "malformed",
    );
    assert!(matches!(
        admin.request(ClientMsg::Status).await.unwrap(),
        ServerMsg::Status(_)
    ));

    // A length prefix beyond the limit: refused before anything is buffered.
    let mut oversize = vec![0xff, 0xff, 0xff, 0xff];
    oversize.extend_from_slice(&[0u8; 64]);
    assert_error_then_close("oversize", raw_exchange(&addr, &oversize).await, "exceeds");

    // A frame of another protocol version.
    assert_error_then_close(
        "wrong version",
        raw_exchange(&addr, &frame_with_version(&hello, PROTOCOL_VERSION + 1)).await,
        "version",
    );

    // A valid frame before authenticating.
    let (frames, closed) = raw_exchange(&addr, &frame_bytes(&hello).unwrap()).await;
    assert!(closed);
    assert!(
        matches!(
            frames.as_slice(),
            [ServerFrame {
                msg: ServerMsg::Error {
                    code: ErrorCode::NotAuthenticated,
                    ..
                },
                reply_to: Some(1)
            }]
        ),
        "{frames:?}"
    );

    // Hello with an unsupported protocol version in the message itself.
    let old_hello = ClientFrame {
        id: 9,
        msg: ClientMsg::Hello {
            protocol_version: 99,
            client: ClientId::new(3, ClientKind::Origin),
            node: 1,
            incarnation: 3,
            client_nonce: [0; 32],
            resuming: false,
        },
    };
    let (frames, closed) = raw_exchange(&addr, &frame_bytes(&old_hello).unwrap()).await;
    assert!(closed);
    assert!(
        matches!(
            frames.as_slice(),
            [ServerFrame {
                msg: ServerMsg::Error {
                    code: ErrorCode::VersionMismatch,
                    ..
                },
                ..
            }]
        ),
        "{frames:?}"
    );

    // Half a frame, then the client hangs up.
    {
        use tokio::io::AsyncWriteExt as _;
        let bytes = frame_bytes(&hello).unwrap();
        let mut io = connect_raw(&addr).await.unwrap();
        io.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
        io.shutdown().await.unwrap();
    }

    // The good session was never disturbed, and the server is healthy.
    for _ in 0..3 {
        assert!(matches!(
            admin.request(ClientMsg::Status).await.unwrap(),
            ServerMsg::Status(_)
        ));
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.status().await.unwrap().connected_clients != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bad connections linger"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_is_disconnected() {
    use futures::SinkExt as _;
    let fx = Fixture::small();
    let mut cfg = fx.config(fx.unix_addr("slow.sock"));
    cfg.send_queue_frames = 16;
    let server = net::start(cfg).await.unwrap();
    let addr = server.local_addr();
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;

    // Authenticate by hand, then flood requests without ever reading.
    let RawSession { rd, mut wr, .. } = RawSession::open(
        connect_raw(&addr).await.unwrap(),
        &fx.key,
        &Hello {
            client: 0x51,
            kind: ClientKind::Admin,
            resuming: false,
        },
    )
    .await
    .unwrap();
    let flood = tokio::time::timeout(Duration::from_secs(60), async {
        for id in 3u64.. {
            let sent = wr
                .send(ClientFrame {
                    id,
                    msg: ClientMsg::ListSnapshots {
                        after: None,
                        limit: u32::MAX,
                    },
                })
                .await;
            if sent.is_err() {
                return id;
            }
        }
        unreachable!()
    })
    .await;
    let sent = flood.expect("the server never dropped the client that does not read");
    eprintln!("slow client dropped after {sent} requests");
    // Everyone else is still served.
    assert!(matches!(
        admin.request(ClientMsg::Status).await.unwrap(),
        ServerMsg::Status(_)
    ));
    drop(rd);
    server.shutdown().await.unwrap();
}

/// Issue 8 finding 5: every frame after the handshake is authenticated. A frame changed on
/// the way, replayed, forged with another key or sent in the clear on an authenticated
/// connection is refused: the server answers that it failed authentication, closes that
/// connection, logs it, and acts on nothing in it (the snapshot each forged
/// `DeleteSnapshot` names survives). Other sessions are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_replayed_forged_and_unsealed_frames_are_refused_and_logged() {
    use futures::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;
    let fx = Fixture::small();
    let addr = fx.unix_addr("frames.sock");
    let mut proc = ServerProcess::spawn(&fx, &addr, &[], "server.log");
    proc.wait_listening().await;
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;
    let keep = create_snapshot(&admin, "keep").await.id;
    let delete = |id| ClientFrame {
        id,
        msg: ClientMsg::DeleteSnapshot { snap: keep },
    };
    let cases = [
        "tampered",
        "replayed",
        "other direction's key",
        "in the clear",
    ];
    for (n, case) in cases.into_iter().enumerate() {
        let mut s = RawSession::open(
            connect_raw(&addr).await.unwrap(),
            &fx.key,
            &Hello {
                client: 0x700 + n as u64,
                kind: ClientKind::Admin,
                resuming: false,
            },
        )
        .await
        .unwrap();
        let mut sealer = FrameSealer::new(&s.keys.client_to_server);
        let mut bytes = Vec::new();
        let bad_seq = match case {
            "tampered" => {
                // A status request turned into a delete would need the key; flipping a bit
                // of the body is caught.
                encode_frame_with(&delete(3), Some(&mut sealer), &mut bytes).unwrap();
                let body_end = bytes.len() - TAG_LEN;
                bytes[body_end - 1] ^= 0x01;
                0
            }
            "replayed" => {
                let mut first = Vec::new();
                let status = ClientFrame {
                    id: 3,
                    msg: ClientMsg::Status,
                };
                encode_frame_with(&status, Some(&mut sealer), &mut first).unwrap();
                s.wr.get_mut().write_all(&first).await.unwrap();
                let reply = tokio::time::timeout(WAIT, s.rd.next()).await.unwrap();
                assert!(
                    matches!(
                        reply,
                        Some(Ok(ServerFrame {
                            msg: ServerMsg::Status(_),
                            ..
                        }))
                    ),
                    "a well-sealed frame is served: {reply:?}"
                );
                bytes = first;
                1
            }
            "other direction's key" => {
                let mut forger = FrameSealer::new(&s.keys.server_to_client);
                encode_frame_with(&delete(3), Some(&mut forger), &mut bytes).unwrap();
                0
            }
            _ => {
                encode_frame(&delete(3), &mut bytes).unwrap();
                0
            }
        };
        s.wr.get_mut().write_all(&bytes).await.unwrap();
        let mut replies = Vec::new();
        let ended = tokio::time::timeout(WAIT, async {
            while let Some(Ok(frame)) = s.rd.next().await {
                replies.push(frame.msg);
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "{case}: connection not closed within {WAIT:?}"
        );
        let expected = format!("frame {bad_seq} failed authentication");
        assert!(
            matches!(
                replies.as_slice(),
                [ServerMsg::Error { code: ErrorCode::BadRequest, message }] if message.contains(&expected)
            ),
            "{case}: expected one sealed error naming {expected:?}, got {replies:?}"
        );
    }
    let listed = match admin
        .request(ClientMsg::ListSnapshots {
            after: None,
            limit: 100,
        })
        .await
        .unwrap()
    {
        ServerMsg::SnapshotList { snapshots, .. } => snapshots,
        other => panic!("list: {other:?}"),
    };
    assert!(
        listed.iter().any(|i| i.id == keep),
        "a refused frame was acted on: {listed:?}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while proc.stderr().matches("failed authentication").count() < cases.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every refused frame was logged:\n{}",
            proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(proc.terminate().code(), Some(0), "{}", proc.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_auth_failures_shuts_down_cleanly_and_refuses_an_open_key() {
    let fx = Fixture::small();
    let addr = fx.unix_addr("bin.sock");
    let mut proc = ServerProcess::spawn(&fx, &addr, &[], "server.log");
    proc.wait_listening().await;
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;
    let refused = Client::handshake(
        connect_raw(&addr).await.unwrap(),
        &[9u8; 32],
        Hello {
            client: 0xE71,
            kind: ClientKind::Origin,
            resuming: false,
        },
    )
    .await;
    assert!(refused.is_err());
    assert!(matches!(
        admin.request(ClientMsg::Status).await.unwrap(),
        ServerMsg::Status(_)
    ));
    let deadline = tokio::time::Instant::now() + WAIT;
    while !proc.stderr().contains("failed authentication") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "auth failure not logged:\n{}",
            proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proc.stderr().contains("0xe71"), "the log names the client");
    let status = proc.terminate();
    assert!(
        status.success(),
        "SIGTERM is a clean exit: {status}\n{}",
        proc.stderr()
    );
    assert!(proc.stderr().contains("store closed cleanly"));
    let report = fx.check_store();
    assert!(report.is_clean(), "{:?}", report.problems);

    std::fs::set_permissions(&fx.key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut proc = ServerProcess::spawn(&fx, &addr, &[], "refused.log");
    let status = proc.wait_exit(WAIT);
    assert_eq!(status.code(), Some(2), "{}", proc.stderr());
    let log = proc.stderr();
    assert!(
        log.contains(&fx.key_file.display().to_string()) && log.contains("0644"),
        "{log}"
    );
}

/// Shrinks the origin under the running server so the next copy-out cannot read it: a
/// data-path failure the engine must treat as fatal.
fn break_origin(fx: &Fixture) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.origin)
        .unwrap()
        .set_len(0)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_copy_stops_the_server_at_once_and_leaves_the_store_for_recovery() {
    let fx = Fixture::small();
    let server = net::start(fx.config(tcp())).await.unwrap();
    let addr = server.local_addr();
    let origin = Client::connect(&addr, &fx.key, ORIGIN, ClientKind::Origin).await;
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;
    create_snapshot(&admin, "s").await;
    break_origin(&fx);
    let reply = origin
        .request(ClientMsg::QueryWrite {
            ranges: vec![ChunkRange::new(3, 1)],
        })
        .await;
    assert!(
        !matches!(reply, Ok(ServerMsg::OriginWriteOk { .. })),
        "no grant without the copy-out: {reply:?}"
    );
    let reason = tokio::time::timeout(WAIT, server.failed())
        .await
        .expect("the server reports its failure");
    let text = csnap_server::engine::error_chain(&reason);
    assert!(
        text.contains("origin"),
        "the reason names the failure: {text}"
    );
    // The cause is kept as a source, down to the device's I/O error.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&reason);
    let mut io_error = None;
    while let Some(c) = cause {
        io_error = io_error.or(c.downcast_ref::<std::io::Error>().map(|e| e.to_string()));
        cause = c.source();
    }
    assert!(
        io_error.is_some(),
        "the failure keeps the I/O error as its cause: {reason:?}"
    );
    assert!(
        admin.request(ClientMsg::Status).await.is_err(),
        "nothing is served after a fatal error"
    );
    // New connections are refused, or (while the listener closes) never answered.
    if let Ok(mut io) = connect_raw(&addr).await {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let hello = ClientFrame {
            id: 1,
            msg: ClientMsg::Status,
        };
        let _ = io.write_all(&frame_bytes(&hello).unwrap()).await;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(2), io.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_)) | Err(_)),
            "a failed server answered a new connection: {read:?}"
        );
    }
    match server.shutdown().await {
        Err(ServerError::Failed(r)) => assert_eq!(r, reason),
        other => panic!("shutdown after a fatal error: {other:?}"),
    }
    // The store was not marked clean: the next server replays its journal.
    let dev = Arc::new(csnap_server::store::FileDevice::open(&fx.store, false).unwrap());
    let mut store = csnap_server::store::Store::open(dev, Default::default()).unwrap();
    assert!(store.was_unclean());
    assert!(store.check().unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exits_nonzero_on_a_fatal_store_failure() {
    let fx = Fixture::small();
    let addr = fx.unix_addr("fatal.sock");
    let mut proc = ServerProcess::spawn(&fx, &addr, &[], "fatal.log");
    proc.wait_listening().await;
    let origin = Client::connect(&addr, &fx.key, ORIGIN, ClientKind::Origin).await;
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;
    create_snapshot(&admin, "s").await;
    break_origin(&fx);
    let _ = origin
        .request(ClientMsg::QueryWrite {
            ranges: vec![ChunkRange::new(3, 1)],
        })
        .await;
    let status = proc.wait_exit(WAIT);
    assert_eq!(status.code(), Some(1), "{}", proc.stderr());
    assert!(proc.stderr().contains("FATAL"), "{}", proc.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_authenticates_is_closed() {
    use tokio::io::AsyncReadExt as _;
    let fx = Fixture::small();
    let mut cfg = fx.config(tcp());
    cfg.engine.auth_timeout_secs = 1;
    let server = net::start(cfg).await.unwrap();
    let mut idle = connect_raw(&server.local_addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("closed within the auth timeout plus a tick")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a reply");
    assert_eq!(server.status().await.unwrap().connected_clients, 0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_store_or_socket_is_refused() {
    let fx = Fixture::small();
    let addr = fx.unix_addr("one.sock");
    let server = net::start(fx.config(addr.clone())).await.unwrap();
    let generation = server.generation();

    let same_store = net::start(fx.config(tcp())).await;
    match same_store {
        Err(ServerError::StoreInUse { path }) => assert_eq!(path, fx.store),
        Err(e) => panic!("expected StoreInUse, got {e}"),
        Ok(_) => panic!("two servers on one store"),
    }
    let other = Fixture::small();
    match net::start(other.config(addr.clone())).await {
        Err(e @ ServerError::Listen { .. }) => {
            // Says who holds the socket (the first server runs in this process), once.
            let holder = format!(
                "another process is listening there: pid {} (",
                std::process::id()
            );
            assert_eq!(e.to_string().matches(&holder).count(), 1, "{e}");
        }
        Err(e) => panic!("expected a listen error, got {e}"),
        Ok(_) => panic!("two servers on one socket"),
    }
    // The refused attempts changed nothing: the first server still serves.
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;
    assert!(matches!(
        admin.request(ClientMsg::Status).await.unwrap(),
        ServerMsg::Status(_)
    ));
    drop(admin);
    server.shutdown().await.unwrap();
    assert!(
        !fx.dir.path().join("one.sock").exists(),
        "the socket file is removed at shutdown"
    );
    // Once shut down, the store is free again, with the next generation.
    let again = net::start(fx.config(addr)).await.unwrap();
    assert_eq!(again.generation(), generation + 1);
    again.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unaligned_origin_is_refused_with_direct_io_and_its_tail_copied_out_buffered() {
    let fx = Fixture::small();
    // A store formatted for an origin of 8 chunks and 1000 bytes, on a device of 9 whole
    // chunks (O_DIRECT-capable, but the last chunk's 1000 bytes are not 4 KiB aligned).
    let origin_size = 8 * fx.chunk_size + 1000;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.origin)
        .unwrap()
        .set_len(9 * fx.chunk_size)
        .unwrap();
    let dev = csnap_server::store::FileDevice::open(&fx.store, false).unwrap();
    csnap_server::store::Store::format(
        &dev,
        &csnap_server::store::FormatOptions {
            chunk_size: fx.chunk_size,
            origin_size,
            now: 1_700_000_000,
            uuid: None,
        },
    )
    .unwrap();
    drop(dev);
    // With O_DIRECT (the default: clients on other hosts) the partial last chunk cannot be
    // read coherently: refused, naming the origin and the size, not served buffered.
    match net::start(fx.config(tcp())).await {
        Err(e @ net::ServerError::NoDirectIo { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&fx.origin.display().to_string()), "{text}");
            assert!(text.contains(&origin_size.to_string()), "{text}");
        }
        Err(other) => panic!("expected NoDirectIo, got {other}"),
        Ok(_) => panic!("a server with O_DIRECT started on an unaligned origin"),
    }
    // Where every client shares this host's page cache, buffered I/O serves it.
    let mut config = fx.config(tcp());
    config.direct_io = false;
    let server = net::start(config).await.unwrap();
    let addr = server.local_addr();
    let origin = Client::connect(&addr, &fx.key, ORIGIN, ClientKind::Origin).await;
    assert_eq!(origin.origin_chunks, 9);
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;
    let snap = create_snapshot(&admin, "tail").await;
    match origin
        .request(ClientMsg::QueryWrite {
            ranges: vec![ChunkRange::new(8, 1)],
        })
        .await
        .unwrap()
    {
        ServerMsg::OriginWriteOk { .. } => {}
        other => panic!("QueryWrite of the last chunk: {other:?}"),
    }
    let reader = Client::connect(&addr, &fx.key, 0x5, ClientKind::Snapshot { snap: snap.id }).await;
    let ServerMsg::SnapshotReadOk { store, .. } = reader
        .request(ClientMsg::QuerySnapshotRead {
            snap: snap.id,
            ranges: vec![ChunkRange::new(8, 1)],
        })
        .await
        .unwrap()
    else {
        panic!("snapshot read");
    };
    let copied = fx.read_store_chunk(store[0].store_chunk);
    let cs = fx.chunk_size as usize;
    assert_eq!(
        &copied[..1000],
        &pattern(cs, 8, 0)[..1000],
        "the tail was copied"
    );
    assert!(
        copied[1000..].iter().all(|b| *b == 0),
        "and zero-filled beyond the origin's end"
    );
    server.shutdown().await.unwrap();
}
