//! Cluster mode's I/O shell end to end in one process: three nodes on cpg-glue's in-memory
//! cluster, each with the real per-volume shell (membership core, in-process server,
//! fencing) and the real client side (client library following the server), on one
//! shared origin and store. The same shell runs over real corosync in tests/ (namespaces).

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpg_glue::memory::MemoryCluster;
use cpg_glue::NodeId;
use csnap_agent::cluster::MembershipConfig;
use csnap_agent::config::Fencing;
use csnap_agent::daemon::client::{run_client_side, ClientSideConfig};
use csnap_agent::daemon::fencing::Fencer;
use csnap_agent::daemon::volume::{run_volume, ServerLocation, VolumeRequest, VolumeShellConfig};
use csnap_blockdev::client::Volume;
use csnap_proto::control::ClusterStatus;
use support::{Fixture, MIB};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const CHUNK: u64 = 64 * 1024;
const WAIT: Duration = Duration::from_secs(60);

/// Fencing in the in-memory cluster: the node leaves the ring at once.
struct MemoryFencer(MemoryCluster);

impl Fencer for MemoryFencer {
    fn fence<'a>(
        &'a self,
        node: NodeId,
        _method: &'a Fencing,
        _reason: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move { self.0.kill_node(node).map_err(|e| e.to_string()) })
    }
}

/// One node: its shell, its client side and their handles.
struct TestNode {
    id: NodeId,
    stop: CancellationToken,
    requests: mpsc::UnboundedSender<VolumeRequest>,
    client: watch::Receiver<Option<Arc<Volume>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl TestNode {
    async fn status(&self) -> Option<ClusterStatus> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(VolumeRequest::Status(tx)).ok()?;
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .ok()?
            .ok()
            .map(|(c, _)| c)
    }

    async fn volume(&self) -> Arc<Volume> {
        let mut rx = self.client.clone();
        let v = tokio::time::timeout(WAIT, rx.wait_for(Option::is_some))
            .await
            .expect("the node's client connected in time")
            .expect("client side running");
        v.clone().expect("some")
    }

    /// Power-off: the node's processes die at once (no clean shutdown).
    fn crash(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

fn start_node(fx: &Fixture, cluster: &MemoryCluster, id: NodeId, lease_ms: u64) -> TestNode {
    let sock = fx.path(&format!("server-{}.sock", id.0));
    let mut membership = MembershipConfig {
        priorities: BTreeMap::new(),
        fencing: Fencing::KillNode,
        server_address: format!("unix:{}", sock.display()),
        serving_lease_ms: lease_ms,
        lease_margin_ms: 500,
        origin_lease_ms: 10_000,
        fence_timeout_ms: 10_000,
        fence_retry_ms: 1_000,
    };
    membership.priorities.insert(id, 0);
    let shell = VolumeShellConfig {
        volume: "vol".into(),
        origin: fx.origin.clone(),
        store: fx.store.clone(),
        key_file: fx.key_file.clone(),
        node: id,
        server_listen: csnap_server::net::ListenAddr::Unix(sock),
        membership,
        // No configured addresses: every member learns the server's address from its
        // announce or its state (the shell's table is only a fallback for version-1 peers).
        peer_addresses: Default::default(),
        direct_io: false,
    };
    let stop = CancellationToken::new();
    let (req_tx, mut req_rx) = mpsc::unbounded_channel();
    let (loc_tx, loc_rx) = watch::channel::<Option<ServerLocation>>(None);
    let (vol_tx, vol_rx) = watch::channel(None);
    let group = cluster.join(id, "csnap:vol").expect("join");
    let quorum = cluster.quorum(id).expect("quorum");
    let fencer: Arc<dyn Fencer> = Arc::new(MemoryFencer(cluster.clone()));
    let membership = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let ended = run_volume(shell, group, quorum, fencer, &mut req_rx, &loc_tx, stop).await;
            if let Err(e) = ended {
                eprintln!("node {id}: membership ended: {e:#}");
            }
        })
    };
    let client = {
        let cfg = ClientSideConfig {
            volume: "vol".into(),
            origin: fx.origin.clone(),
            store: fx.store.clone(),
            key: std::fs::read(&fx.key_file).unwrap(),
            node: id.0,
            instance: 0x1000 + u64::from(id.0),
            direct_io: false,
            nbd_listen: None,
            snapshots_read_only: false,
        };
        let (stop, req_tx) = (stop.clone(), req_tx.clone());
        tokio::spawn(async move {
            let _ = run_client_side(cfg, loc_rx, req_tx, vol_tx, stop).await;
        })
    };
    TestNode {
        id,
        stop,
        requests: req_tx,
        client: vol_rx,
        tasks: vec![membership, client],
    }
}

/// Waits until every given node agrees on one serving node; returns it.
async fn agreed_server(nodes: &[&TestNode]) -> (NodeId, ClusterStatus) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut seen = Vec::new();
        for n in nodes {
            seen.push(n.status().await);
        }
        let servers: Vec<Option<u32>> = seen
            .iter()
            .map(|s| s.as_ref().and_then(|s| s.server_node))
            .collect();
        if let Some(Some(first)) = servers.first() {
            if servers.iter().all(|s| *s == Some(*first)) {
                let serving = nodes
                    .iter()
                    .zip(&seen)
                    .find(|(n, _)| n.id.0 == *first)
                    .and_then(|(_, s)| s.clone());
                if let Some(s) = serving.filter(|s| s.role == "Serving") {
                    return (NodeId(*first), s);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no agreed server within {WAIT:?}: {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The volume is served by exactly one node, every node's client does I/O through it,
/// and when the server's node dies another node takes over: the data written before is
/// there, a snapshot taken before still reads the old data, and I/O goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_serve_one_volume_and_fail_over_when_the_server_node_dies() {
    let fx = Fixture::new(CHUNK, 16 * MIB, 64 * MIB);
    let cluster = MemoryCluster::with_nodes(3).unwrap();
    let mut nodes: Vec<TestNode> = (1..=3)
        .map(|i| start_node(&fx, &cluster, NodeId(i), 2_000))
        .collect();
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let (first, status) = agreed_server(&refs).await;
    eprintln!("server on node {first}: {status:?}");

    // Every node's client writes its own chunk, then one snapshot, then overwrites.
    let block = |tag: u8| vec![tag; CHUNK as usize];
    for n in &nodes {
        let v = n.volume().await;
        v.write_origin(u64::from(n.id.0) * CHUNK, block(n.id.0 as u8).into(), false)
            .await
            .expect("origin write");
        v.flush().await.expect("flush");
    }
    let admin = nodes[2].volume().await;
    let snap = admin.create_snapshot("before").await.expect("snapshot");
    for n in &nodes {
        let v = n.volume().await;
        v.write_origin(
            u64::from(n.id.0) * CHUNK,
            block(0xA0 + n.id.0 as u8).into(),
            false,
        )
        .await
        .expect("origin overwrite");
        v.flush().await.expect("flush");
    }

    // Power off the server's node.
    let idx = nodes.iter().position(|n| n.id == first).unwrap();
    let dead = nodes.remove(idx);
    let crashed_at = Instant::now();
    cluster.kill_node(dead.id).unwrap();
    dead.crash();

    let refs: Vec<&TestNode> = nodes.iter().collect();
    let (second, status) = agreed_server(&refs).await;
    eprintln!(
        "failover to node {second} after {:?}: {status:?}",
        crashed_at.elapsed()
    );
    assert_ne!(second, first, "a dead node cannot serve");

    for n in &nodes {
        let v = n.volume().await;
        for i in 1..=3u32 {
            let got = v
                .read_origin(u64::from(i) * CHUNK, CHUNK as u32)
                .await
                .expect("origin read after failover");
            assert!(
                got.iter().all(|b| *b == 0xA0 + i as u8),
                "node {}: chunk {i} lost its last write",
                n.id
            );
            let old = v
                .read_snapshot(snap.id, u64::from(i) * CHUNK, CHUNK as u32)
                .await
                .expect("snapshot read after failover");
            assert!(
                old.iter().all(|b| *b == i as u8),
                "node {}: snapshot chunk {i} changed",
                n.id
            );
        }
        v.write_origin(8 * CHUNK, block(0x77).into(), true)
            .await
            .expect("I/O goes on after the failover");
    }
    for n in nodes {
        n.stop.cancel();
        for t in n.tasks {
            let _ = tokio::time::timeout(WAIT, t).await;
        }
    }
}
