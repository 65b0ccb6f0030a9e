//! 10,000 snapshots with 227-byte names on one volume: far more than one 1 MiB frame holds.
//! The client library and `csnapctl snapshot list` (through the standalone agent) page
//! through them and return all of them, in id order.

use crate::support;

use std::sync::Arc;

use csnap_blockdev::client::{ClientConfig, Volume};
use csnap_proto::ListenAddr;
use csnap_proto::SnapshotState;
use csnap_server::net::{self, ServerConfig};
use csnap_server::store::{FileDevice, OpenOptions, Store};
use support::{csnapctl, Agent, Fixture, WAIT};

const SNAPSHOTS: u64 = 10_000;

fn name(i: u64) -> String {
    format!("{i:06}-{}", "n".repeat(220))
}

/// Creates the snapshots directly in the store (one commit), so the test spends its time
/// listing, not creating.
fn populate(fx: &Fixture) {
    let dev = Arc::new(FileDevice::open(&fx.store, false).unwrap());
    let mut store = Store::open(dev, OpenOptions::default()).unwrap();
    for i in 0..SNAPSHOTS {
        store.create_snapshot(&name(i), 1_700_000_000 + i).unwrap();
    }
    store.close().unwrap();
}

fn check_all(names: &[String], ids: &[u64], context: &str) {
    assert_eq!(names.len() as u64, SNAPSHOTS, "{context}: count");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{context}: id order");
    for (i, n) in names.iter().enumerate() {
        assert_eq!(*n, name(i as u64), "{context}: snapshot {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_snapshots_list_completely() {
    let fx = Fixture::new(4096, 1 << 20, 64 << 20);
    populate(&fx);

    // The client library against the real server.
    let sock = fx.path("server.sock");
    let mut cfg = ServerConfig::new(
        &fx.origin,
        &fx.store,
        ListenAddr::Unix(sock.clone()),
        &fx.key_file,
    );
    cfg.direct_io = false;
    let server = tokio::time::timeout(WAIT, net::start(cfg))
        .await
        .expect("server started in time")
        .expect("server starts");
    let key = std::fs::read(&fx.key_file).unwrap();
    let volume = Volume::connect(ClientConfig {
        server: csnap_proto::ListenAddr::Unix(sock.clone()).into(),
        key,
        instance: 1 << 40,
        node: 1,
        origin: fx.origin.clone(),
        store: fx.store.clone(),
        connect_timeout: WAIT,
        cache_chunks: 1024,
        direct_io: false,
    })
    .await
    .expect("client connects");
    let listed = tokio::time::timeout(WAIT, volume.list_snapshots())
        .await
        .expect("listed in time")
        .expect("list");
    let names: Vec<String> = listed.iter().map(|s| s.name.clone()).collect();
    let ids: Vec<u64> = listed.iter().map(|s| s.id.0).collect();
    check_all(&names, &ids, "client library");
    assert!(listed.iter().all(|s| s.state == SnapshotState::Live));
    // A page is bounded by the frame budget, not only by the count asked for.
    let page = volume.list_snapshots_page(None, u32::MAX).await.unwrap();
    assert!(page.more && !page.snapshots.is_empty());
    assert!(page.snapshots.len() <= csnap_proto::MAX_LIST_PAGE as usize);
    let status = volume.status().await.unwrap();
    assert_eq!(u64::from(status.snapshots), SNAPSHOTS);
    volume.shutdown().await;
    server.shutdown().await.expect("clean shutdown");

    // csnapctl through the standalone agent.
    let nbd = format!("unix:{}", fx.path("nbd.sock").display());
    let agent = Agent::start(&fx, "agent", &["--nbd-listen", &nbd]).await;
    let out = csnapctl(&agent.control, &["snapshot", "list", "vol", "--json"]).await;
    assert!(out.ok, "csnapctl failed: {}\n{}", out.stderr, agent.log());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let snaps = v["snapshots"].as_array().unwrap();
    let names: Vec<String> = snaps
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    let ids: Vec<u64> = snaps.iter().map(|s| s["id"].as_u64().unwrap()).collect();
    check_all(&names, &ids, "csnapctl");
    let table = csnapctl(&agent.control, &["snapshot", "list", "vol"]).await;
    assert!(table.ok, "{}", table.stderr);
    assert_eq!(
        table.stdout.lines().filter(|l| l.contains("-nnnn")).count() as u64,
        SNAPSHOTS
    );
}
