//! Client identities against the real server (issue 8, finding 6): the connections of
//! several clients whose ids are close together must all stay up; none may take over
//! another's session (which closed it and could release the read locks it held).

use crate::support;

use std::time::Duration;

use csnap_blockdev::client::{ClientConfig, Volume};
use csnap_proto::SnapId;
use support::{connect_volume, start_server, Fixture, WAIT};

const CHUNK: u64 = 4096;

/// Clients 100, 101 and 103, each with an origin, an admin and a snapshot-1 connection:
/// with ids derived as base, base + 1 and base + 2 + snapshot, client 100's admin
/// connection was client 101's origin connection and its snapshot connection client 103's
/// origin connection, so they kept closing each other's sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_neighbouring_ids_keep_all_their_connections() {
    let fx = Fixture::new(CHUNK, CHUNK * 16, 16 << 20);
    let sock = fx.path("server.sock");
    let server = start_server(&fx, &sock, Vec::new()).await;
    let mut volumes = Vec::new();
    for (node, base) in [(1, 100), (2, 101), (3, 103)] {
        volumes.push(connect_volume(&fx, &sock, base, node, 1 << 10).await);
    }
    let snap = tokio::time::timeout(WAIT, volumes[0].create_snapshot("s1"))
        .await
        .expect("created in time")
        .expect("snapshot created")
        .id;
    assert_eq!(snap, SnapId(1));
    for v in &volumes {
        tokio::time::timeout(WAIT, v.read_snapshot(snap, 0, CHUNK as u32))
            .await
            .expect("read in time")
            .expect("snapshot read");
    }
    // Give any takeover time to show (reconnects back off from 50 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (i, v) in volumes.iter().enumerate() {
        assert_eq!(
            v.origin_sessions(),
            1,
            "client {i}'s origin connection was taken over and had to reconnect"
        );
    }
    let status = tokio::time::timeout(WAIT, volumes[2].status())
        .await
        .expect("status in time")
        .expect("status");
    assert_eq!(
        status.connected_clients, 9,
        "three clients, each with an origin, an admin and a snapshot connection"
    );
    for v in &volumes {
        v.shutdown().await;
    }
    server.shutdown().await.expect("clean shutdown");
}

/// A second client process given the same instance id as a connected one is refused with
/// an error naming the id, and the first client keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_with_the_same_id_is_refused_and_the_first_keeps_working() {
    let fx = Fixture::new(CHUNK, CHUNK * 16, 16 << 20);
    let sock = fx.path("server.sock");
    let server = start_server(&fx, &sock, Vec::new()).await;
    let first = connect_volume(&fx, &sock, 0x77, 1, 1 << 10).await;
    let second = Volume::connect(ClientConfig {
        server: csnap_proto::ListenAddr::Unix(sock.clone()).into(),
        key: std::fs::read(&fx.key_file).unwrap(),
        instance: 0x77,
        node: 2,
        origin: fx.origin.clone(),
        store: fx.store.clone(),
        connect_timeout: WAIT,
        cache_chunks: 1 << 10,
        direct_io: false,
    });
    let err = tokio::time::timeout(WAIT, second)
        .await
        .expect("refused in time")
        .expect_err("a second client with the same id connected");
    let text = err.to_string();
    assert!(
        text.contains("DuplicateClient") && text.contains("0x77/origin"),
        "the error names the duplicate id: {text}"
    );
    let data = bytes::Bytes::from(vec![0x5a; CHUNK as usize]);
    tokio::time::timeout(WAIT, first.write_origin(0, data.clone(), false))
        .await
        .expect("write in time")
        .expect("the first client still writes");
    let status = first.status().await.expect("status");
    assert_eq!(
        status.connected_clients, 2,
        "the first client's origin and admin"
    );
    assert_eq!(
        first.origin_sessions(),
        1,
        "the first client was never disconnected"
    );
    first.shutdown().await;
    server.shutdown().await.expect("clean shutdown");
}
