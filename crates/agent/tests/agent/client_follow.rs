//! The client library follows a moving server (cluster mode's failover): connections whose
//! target is a watch of the server's address reconnect to the new address when it changes,
//! resuming their sessions (read locks re-uploaded, unanswered requests resent), and
//! `Volume::reconnect` drops and re-establishes every connection on demand.

use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use csnap_blockdev::client::{
    client_id_for, ClientConfig, ConnConfig, MetaConnection, ServerTarget, Volume,
};
use csnap_proto::ListenAddr;
use csnap_proto::{ChunkRange, ClientKind, ClientMsg, ServerMsg};
use support::{pattern, start_server, Fixture, WAIT};
use tokio::sync::watch;

const CHUNK: u64 = 4096;

fn unix(path: &Path) -> Option<ListenAddr> {
    Some(ListenAddr::Unix(path.to_owned()))
}

async fn connect_following(
    fx: &Fixture,
    key: Vec<u8>,
    target: watch::Receiver<Option<ListenAddr>>,
    instance: u64,
) -> Arc<Volume> {
    let volume = Volume::connect(ClientConfig {
        server: ServerTarget::Follow(target),
        key,
        instance,
        node: 1,
        origin: fx.origin.clone(),
        store: fx.store.clone(),
        connect_timeout: WAIT,
        cache_chunks: 1 << 10,
        direct_io: false,
    });
    tokio::time::timeout(WAIT, volume)
        .await
        .expect("connected in time")
        .expect("client connects")
}

/// Polls `cond` every 20 ms until it holds (bounded by `WAIT`).
async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn chunk_data(version: u64, chunk: u64) -> Bytes {
    Bytes::from(pattern(version * 1000 + chunk, CHUNK as usize))
}

fn initial(chunk: u64) -> Vec<u8> {
    let all = pattern(1, (CHUNK * 16) as usize);
    all[(chunk * CHUNK) as usize..((chunk + 1) * CHUNK) as usize].to_vec()
}

/// Server A at address 1 stops; server B starts on the same store at address 2, its
/// activation gate waiting for the snapshot reader that held a read lock on A. The watch
/// first says "no server known" (requests queue, nothing spins), then address 2: the volume
/// and the reader move there, the reader re-uploads its lock (B's gate opens for it), the
/// origin write over the locked chunk waits for the lock's release, no request is lost,
/// and every write and snapshot read verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_follows_its_server_to_a_new_address_and_resumes_there() {
    let fx = Fixture::new(CHUNK, CHUNK * 16, 16 << 20);
    let key = std::fs::read(&fx.key_file).unwrap();
    let (sock_a, sock_b) = (fx.path("a.sock"), fx.path("b.sock"));
    let server_a = start_server(&fx, &sock_a, Vec::new()).await;
    let (target, rx) = watch::channel(unix(&sock_a));
    let volume = connect_following(&fx, key.clone(), rx.clone(), 0x100).await;

    for c in 0..8 {
        volume
            .write_origin(c * CHUNK, chunk_data(1, c), false)
            .await
            .expect("write on A");
    }
    let snap = volume.create_snapshot("s").await.expect("snapshot on A").id;
    volume
        .write_origin(0, chunk_data(2, 0), false)
        .await
        .expect("copy-out on A");

    // A snapshot reader (another client) holds a read lock on origin chunk 5.
    let reader_id = client_id_for(0x200, ClientKind::Snapshot { snap });
    let reader = MetaConnection::start(
        ConnConfig {
            server: ServerTarget::Follow(rx.clone()),
            key: key.clone(),
            client: reader_id,
            node: 2,
            incarnation: 0x200,
            retry_min: Duration::from_millis(20),
            retry_max: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(5),
        },
        None,
    );
    let held = ChunkRange::new(5, 1);
    match reader
        .request(ClientMsg::QuerySnapshotRead {
            snap,
            ranges: vec![held],
        })
        .await
        .expect("snapshot read on A")
        .msg
    {
        ServerMsg::SnapshotReadOk { origin_locked, .. } => assert_eq!(origin_locked, vec![held]),
        other => panic!("QuerySnapshotRead: {other:?}"),
    }

    // Failover: A stops; for a while no server is known.
    server_a.shutdown().await.expect("A shuts down");
    target.send_replace(None);
    let write6 = {
        let v = volume.clone();
        tokio::spawn(async move { v.write_origin(6 * CHUNK, chunk_data(2, 6), false).await })
    };
    let write5 = {
        let v = volume.clone();
        tokio::spawn(async move { v.write_origin(5 * CHUNK, chunk_data(2, 5), false).await })
    };
    let listed = {
        let v = volume.clone();
        tokio::spawn(async move { v.list_snapshots().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !write6.is_finished() && !listed.is_finished(),
        "no server yet"
    );
    let sessions_before = volume.origin_sessions();
    assert_eq!(sessions_before, 1);

    // B on the same store at another address, gated on the reader.
    let server_b = start_server(&fx, &sock_b, vec![reader_id]).await;
    let status = server_b.status().await.unwrap();
    assert!(!status.active);
    assert_eq!(status.awaited_clients, vec![reader_id]);
    target.send_replace(unix(&sock_b));

    // The reader resumes on B (its lock re-uploaded, ResendDone): the gate opens.
    wait_until("B's gate to open", || async {
        server_b.status().await.is_ok_and(|s| s.active)
    })
    .await;
    assert!(server_b.status().await.unwrap().awaited_clients.is_empty());
    tokio::time::timeout(WAIT, write6)
        .await
        .expect("the write of chunk 6 finished")
        .unwrap()
        .expect("the write of chunk 6 succeeded on B");
    let listed = tokio::time::timeout(WAIT, listed)
        .await
        .expect("the listing finished")
        .unwrap()
        .expect("the listing queued during the failover is answered by B");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, snap);
    assert_eq!(volume.origin_sessions(), 2, "exactly one reconnect");
    // The re-uploaded lock holds the write of chunk 5 until the reader is done.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !write5.is_finished(),
        "an origin write went through a read lock the reader re-asserted on B"
    );
    assert_eq!(
        support::read_file(&fx.origin)[(5 * CHUNK) as usize..(6 * CHUNK) as usize],
        chunk_data(1, 5)[..],
        "the reader still sees the snapshot's data on the origin"
    );
    match reader
        .request(ClientMsg::FinishSnapshotRead {
            snap,
            ranges: vec![held],
        })
        .await
        .expect("release on B")
        .msg
    {
        ServerMsg::FinishSnapshotReadOk => {}
        other => panic!("FinishSnapshotRead: {other:?}"),
    }
    tokio::time::timeout(WAIT, write5)
        .await
        .expect("the write of chunk 5 finished after the release")
        .unwrap()
        .expect("the write of chunk 5 succeeded");

    // Everything reads back: the origin has the new data, the snapshot the old.
    for c in 0..8 {
        let now = volume.read_origin(c * CHUNK, CHUNK as u32).await.unwrap();
        let expect = if [0, 5, 6].contains(&c) {
            chunk_data(2, c)
        } else {
            chunk_data(1, c)
        };
        assert_eq!(now, expect, "origin chunk {c}");
        let then = volume
            .read_snapshot(snap, c * CHUNK, CHUNK as u32)
            .await
            .unwrap();
        assert_eq!(then, chunk_data(1, c), "snapshot chunk {c}");
    }
    // Writes go on on B, through new copy-outs.
    volume
        .write_origin(7 * CHUNK, chunk_data(3, 7), true)
        .await
        .unwrap();
    assert_eq!(
        volume
            .read_snapshot(snap, 7 * CHUNK, CHUNK as u32)
            .await
            .unwrap(),
        chunk_data(1, 7)
    );
    assert_eq!(
        initial(9),
        support::read_file(&fx.origin)[9 * 4096..10 * 4096]
    );

    reader.shutdown().await;
    volume.shutdown().await;
    server_b.shutdown().await.expect("B shuts down cleanly");
}

/// Moving the target while connected moves every connection at once, to a server on
/// another store (only connectivity is checked: two servers never share a store), and
/// `Volume::reconnect` drops and re-establishes every connection on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_the_target_while_connected_and_reconnect_move_every_connection() {
    let fx_a = Fixture::new(CHUNK, CHUNK * 16, 16 << 20);
    let fx_b = Fixture::new(CHUNK, CHUNK * 16, 16 << 20);
    // One cluster key for both.
    std::fs::copy(&fx_a.key_file, &fx_b.key_file).unwrap();
    let key = std::fs::read(&fx_a.key_file).unwrap();
    let (sock_a, sock_b) = (fx_a.path("a.sock"), fx_b.path("b.sock"));
    let server_a = start_server(&fx_a, &sock_a, Vec::new()).await;
    let server_b = start_server(&fx_b, &sock_b, Vec::new()).await;
    let (target, rx) = watch::channel(unix(&sock_a));
    let volume = connect_following(&fx_a, key, rx, 0x300).await;
    let on_a = volume.create_snapshot("on-a").await.unwrap().id;
    // A snapshot connection too (the read opens it).
    volume
        .read_snapshot(on_a, 0, CHUNK as u32)
        .await
        .expect("snapshot read on A");
    assert_eq!(volume.snapshot_sessions(on_a), 1);
    assert_eq!(server_a.status().await.unwrap().connected_clients, 3);

    target.send_replace(unix(&sock_b));
    wait_until("every connection to move to B", || async {
        server_b
            .status()
            .await
            .is_ok_and(|s| s.connected_clients == 3)
    })
    .await;
    wait_until("A to lose them", || async {
        server_a
            .status()
            .await
            .is_ok_and(|s| s.connected_clients == 0)
    })
    .await;
    assert!(
        volume.list_snapshots().await.unwrap().is_empty(),
        "the admin connection talks to B (whose store has no snapshot)"
    );
    assert_eq!(volume.origin_sessions(), 2);
    assert_eq!(volume.snapshot_sessions(on_a), 2);

    // The same address again is no move.
    target.send_replace(unix(&sock_b));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(volume.origin_sessions(), 2);

    // An explicit reconnect (the agent's DropClients) re-establishes every connection.
    volume.reconnect();
    wait_until("every connection to come back", || async {
        volume.origin_sessions() == 3 && volume.snapshot_sessions(on_a) == 3
    })
    .await;
    wait_until("B to see them all again", || async {
        server_b
            .status()
            .await
            .is_ok_and(|s| s.connected_clients == 3)
    })
    .await;
    assert!(volume.status().await.is_ok());

    volume.shutdown().await;
    server_a.shutdown().await.unwrap();
    server_b.shutdown().await.unwrap();
}

/// A connection backing off after failed attempts (here with a 30 s delay) tries a new
/// address as soon as it is published, not after the backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_address_ends_the_backoff_at_once() {
    let fx = Fixture::new(CHUNK, CHUNK * 16, 16 << 20);
    let key = std::fs::read(&fx.key_file).unwrap();
    let (target, rx) = watch::channel(unix(&fx.path("nobody.sock")));
    let conn = MetaConnection::start(
        ConnConfig {
            server: ServerTarget::Follow(rx),
            key,
            client: client_id_for(0x400, ClientKind::Admin),
            node: 1,
            incarnation: 0x400,
            retry_min: Duration::from_secs(30),
            retry_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        },
        None,
    );
    // The first attempt fails at once; it is now in its 30 s backoff.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sock = fx.path("server.sock");
    let server = start_server(&fx, &sock, Vec::new()).await;
    let moved = Instant::now();
    target.send_replace(unix(&sock));
    let info = conn
        .wait_established(Duration::from_secs(5))
        .await
        .expect("connected to the new address without waiting out the backoff");
    assert_eq!(info.sessions, 1);
    assert!(moved.elapsed() < Duration::from_secs(5));
    conn.shutdown().await;
    server.shutdown().await.unwrap();
}
