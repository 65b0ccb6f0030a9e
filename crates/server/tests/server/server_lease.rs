//! The serving lease of a server in cluster mode (docs/server.md, "Serving lease"), on the
//! real server over real sockets: a server whose lease is not renewed stops on its own at
//! the lease's end and answers nothing after it; renewals keep it serving; a server
//! without a lease is unaffected; the store it leaves opens cleanly for the next server.

use crate::server_support;

use csnap_proto::ListenAddr;
use csnap_proto::*;
use csnap_server::net::{self, ServerError, ServerFailure};
use server_support::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ADMIN: u64 = 0xAD;
const ORIGIN: u64 = 0x0A;

fn tcp() -> ListenAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// How late after its lease's end a server may notice it (the engine thread's timer).
const NOTICE: Duration = Duration::from_millis(500);

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

/// The store a stopped server left: opens (replaying the journal) and checks clean.
fn assert_store_recoverable(fx: &Fixture) {
    let dev = Arc::new(csnap_server::store::FileDevice::open(&fx.store, false).unwrap());
    let mut store = csnap_server::store::Store::open(dev, Default::default()).unwrap();
    assert!(
        store.was_unclean(),
        "a server whose lease ran out does not close the store"
    );
    assert!(store.check().unwrap().is_clean());
    // Dropped unclosed: the next server still finds it as the stopped server left it.
}

/// A lease that is not renewed: the server stops within a bounded time after its end, by
/// its own timer (it is idle then); requests sent after the end get no answer at all (the
/// connection closes), neither do new connections; requests answered before the end were
/// committed and a new server on the store (after journal replay) has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_lease_is_not_renewed_stops_at_its_end_and_answers_nothing_after_it() {
    let fx = Fixture::small();
    let mut cfg = fx.config(tcp());
    cfg.direct_io = false;
    let until = Instant::now() + Duration::from_millis(2500);
    cfg.serving_lease_until = Some(until);
    let server = net::start(cfg).await.unwrap();
    assert_eq!(server.serving_lease_until(), Some(until));
    let addr = server.local_addr();
    let origin_file = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.origin)
        .unwrap();
    let origin = Client::connect(&addr, &fx.key, ORIGIN, ClientKind::Origin).await;
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;
    let snap = create_snapshot(&admin, "before").await;
    // Granted (with a copy-out and its commit) before the end of the lease.
    let cs = fx.chunk_size as usize;
    origin
        .origin_write(&origin_file, 0, &pattern(cs, 0, 1))
        .await
        .expect("served while the lease runs");

    // Requests every 10 ms across the end of the lease: origin writes of fresh chunks
    // (each a copy-out and a commit) and status requests.
    let mut sent = Vec::new();
    let mut chunk = 1;
    while Instant::now() < until + Duration::from_millis(300) {
        let at = Instant::now();
        let (_, rx) = origin.send(ClientMsg::QueryWrite {
            ranges: vec![ChunkRange::new(chunk % fx.origin_chunks, 1)],
        });
        sent.push((at, "QueryWrite", rx));
        let (_, rx) = admin.send(ClientMsg::Status);
        sent.push((at, "Status", rx));
        chunk += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reason = tokio::time::timeout(WAIT, server.failed())
        .await
        .expect("the server stops on its own when its lease runs out");
    let noticed = Instant::now();
    assert_eq!(reason, ServerFailure::LeaseExpired, "{reason}");
    assert!(
        reason.to_string().contains("serving lease expired"),
        "{reason}"
    );
    assert!(
        noticed < until + Duration::from_millis(300) + NOTICE,
        "stopped {:?} after the end of its lease",
        noticed - until
    );
    let (mut before, mut after) = (0, 0);
    for (at, what, rx) in sent {
        let reply = tokio::time::timeout(WAIT, rx)
            .await
            .expect("every request is answered or its connection closed");
        if at >= until {
            after += 1;
            assert!(
                reply.is_err(),
                "{what} sent {:?} after the end of the lease was answered: {reply:?}",
                at - until
            );
        } else if reply.is_ok() {
            before += 1;
        }
    }
    assert!(
        before > 10,
        "requests were served before the end ({before})"
    );
    assert!(after > 10, "requests were sent after the end ({after})");
    assert!(
        admin.request(ClientMsg::Status).await.is_err(),
        "nothing is served after the lease ran out"
    );
    // New connections are refused, or never answered.
    if let Ok(io) = connect_raw(&addr).await {
        let hello = Hello {
            client: 0x99,
            kind: ClientKind::Admin,
            resuming: false,
        };
        let opened = tokio::time::timeout(
            Duration::from_secs(2),
            Client::handshake(io, &fx.key, hello),
        )
        .await;
        assert!(
            !matches!(opened, Ok(Ok(_))),
            "a server whose lease ran out opened a session"
        );
    }
    assert!(matches!(
        server.extend_serving_lease(Instant::now() + Duration::from_secs(60)),
        Err(ServerError::LeaseExpired)
    ));
    assert_eq!(server.serving_lease_until(), None);
    match server.shutdown().await {
        Err(ServerError::Failed(r)) => assert_eq!(r, reason),
        other => panic!("shutdown after the lease ran out: {other:?}"),
    }
    assert_store_recoverable(&fx);

    // The next server (no lease: standalone) recovers the store and serves it: the
    // snapshot and the copy-out granted before the end are there.
    let mut cfg = fx.config(tcp());
    cfg.direct_io = false;
    let next = net::start(cfg).await.expect("the next server starts");
    assert!(next.recovered_unclean());
    let addr = next.local_addr();
    let reader =
        Client::connect(&addr, &fx.key, 0x51, ClientKind::Snapshot { snap: snap.id }).await;
    let old = reader
        .read_snapshot(snap.id, ChunkRange::new(0, 1), &fx.origin, &fx.store)
        .await
        .unwrap();
    assert_eq!(
        old,
        pattern(cs, 0, 0),
        "the snapshot kept chunk 0 as it was"
    );
    let origin = Client::connect(&addr, &fx.key, ORIGIN, ClientKind::Origin).await;
    origin
        .origin_write(&origin_file, 2, &pattern(cs, 2, 9))
        .await
        .expect("the next server serves");
    next.shutdown().await.unwrap();
}

/// Renewals keep a leased server serving well past its first lease; once they stop, it
/// stops at the end of the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_the_lease_keeps_the_server_serving_until_renewals_stop() {
    let fx = Fixture::small();
    let lease = Duration::from_millis(600);
    let mut cfg = fx.config(tcp());
    cfg.direct_io = false;
    cfg.serving_lease_until = Some(Instant::now() + lease);
    let server = net::start(cfg).await.unwrap();
    let addr = server.local_addr();
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;
    let origin = Client::connect(&addr, &fx.key, ORIGIN, ClientKind::Origin).await;
    let origin_file = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.origin)
        .unwrap();
    create_snapshot(&admin, "s").await;
    let cs = fx.chunk_size as usize;
    // Five leases long, renewing every 150 ms (a quarter lease), serving all along.
    let started = Instant::now();
    let mut chunk = 0;
    while started.elapsed() < lease * 5 {
        server
            .extend_serving_lease(Instant::now() + lease)
            .expect("renewed in time");
        origin
            .origin_write(&origin_file, chunk, &pattern(cs, chunk, 1))
            .await
            .expect("served under a renewed lease");
        assert!(matches!(
            admin.request(ClientMsg::Status).await,
            Ok(ServerMsg::Status(_))
        ));
        chunk += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // A renewal never shortens the lease.
    let end = server.serving_lease_until().expect("a lease");
    server
        .extend_serving_lease(Instant::now())
        .expect("an earlier end is no error");
    assert_eq!(server.serving_lease_until(), Some(end));
    // Renewals stop: it stops at the end of the last lease.
    let reason = tokio::time::timeout(lease + NOTICE, server.failed())
        .await
        .expect("stopped at the end of the last lease");
    assert_eq!(reason, ServerFailure::LeaseExpired, "{reason}");
    assert!(
        reason.to_string().contains("serving lease expired"),
        "{reason}"
    );
    assert!(Instant::now() >= end);
    assert!(admin.request(ClientMsg::Status).await.is_err());
    drop(server);
    assert_store_recoverable(&fx);
}

/// A server without a lease (standalone mode) has nothing to renew and serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_lease_is_unaffected() {
    let fx = Fixture::small();
    let mut cfg = fx.config(tcp());
    cfg.direct_io = false;
    assert_eq!(cfg.serving_lease_until, None, "no lease by default");
    let server = net::start(cfg).await.unwrap();
    assert_eq!(server.serving_lease_until(), None);
    assert!(matches!(
        server.extend_serving_lease(Instant::now() + Duration::from_secs(1)),
        Err(ServerError::NoLease)
    ));
    let admin = Client::connect(&server.local_addr(), &fx.key, ADMIN, ClientKind::Admin).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(matches!(
        admin.request(ClientMsg::Status).await,
        Ok(ServerMsg::Status(_))
    ));
    let failed = tokio::time::timeout(Duration::from_millis(100), server.failed()).await;
    assert!(failed.is_err(), "no failure: {failed:?}");
    server.shutdown().await.expect("clean shutdown");
}

/// A lease that ended before the server could start: it refuses to start and does not
/// touch the store (no generation bump).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_lease_ended_before_start_does_not_touch_the_store() {
    let fx = Fixture::small();
    let before = std::fs::read(&fx.store).unwrap();
    let mut cfg = fx.config(fx.unix_addr("s.sock"));
    cfg.direct_io = false;
    cfg.serving_lease_until = Some(Instant::now());
    match net::start(cfg).await {
        Err(ServerError::LeaseExpired) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a server started after its lease ended"),
    }
    assert!(
        std::fs::read(&fx.store).unwrap() == before,
        "store untouched"
    );
    assert!(!fx.dir.path().join("s.sock").exists(), "no socket left");
}
