//! Cluster mode's I/O shell end to end in one process: three nodes on cpg-glue's in-memory
//! cluster, each with the real per-volume shell (membership core, in-process server,
//! fencing) and the real client side (client library following the server), on one
//! shared origin and store. The same shell runs over real corosync in tests/ (namespaces).

use crate::support;

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
use csnap_proto::control::{ClusterStatus, ControlRequest, ControlResponse};
use csnap_proto::{DiffEnd, SnapRef};
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
    start_node_with(fx, cluster, id, lease_ms, Fencing::KillNode)
}

fn start_node_with(
    fx: &Fixture,
    cluster: &MemoryCluster,
    id: NodeId,
    lease_ms: u64,
    fencing: Fencing,
) -> TestNode {
    let sock = fx.path(&format!("server-{}.sock", id.0));
    let mut membership = MembershipConfig {
        priorities: BTreeMap::new(),
        fencing,
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
        server_listen: csnap_proto::ListenAddr::Unix(sock),
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

    // The diff since the snapshot, asked on a node that does not serve, through the code
    // the agent's control socket runs, from the new server's records: the three
    // overwritten chunks.
    let asker = nodes
        .iter()
        .find(|n| n.id != second)
        .expect("a non-serving node");
    // The first page names the snapshot, the next ones pass the id it resolved to (as
    // csnapctl does).
    let (mut from, mut start) = (SnapRef::Name("before".into()), 0);
    let mut chunks = Vec::new();
    loop {
        let req = ControlRequest::Diff {
            volume: "vol".into(),
            from: Some(from.clone()),
            to: None,
            start,
            budget: 2,
        };
        match csnap_agent::snapshot_ops::handle("vol", &*asker.volume().await, req).await {
            ControlResponse::Diff {
                from: f, to, page, ..
            } => {
                assert_eq!((f, to), (DiffEnd::Snapshot(snap.id), DiffEnd::Origin));
                chunks.extend(page.ranges.iter().flat_map(|r| r.chunks().unwrap()));
                let Some(next) = page.next else { break };
                (from, start) = (SnapRef::Id(snap.id), next);
            }
            other => panic!("diff on node {}: {other:?}", asker.id),
        }
    }
    assert_eq!(
        chunks,
        vec![1, 2, 3],
        "diff since 'before' after the failover"
    );

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

    // An online rollback to 'before', asked on a node that does not serve (the code the
    // control socket runs): once it is answered, every node's origin reads as the snapshot
    // (their clients ask the new server while it copies back), and after it too.
    let req = ControlRequest::Rollback {
        volume: "vol".into(),
        snapshot: "before".into(),
        pin_name: "undo".into(),
    };
    match csnap_agent::snapshot_ops::handle("vol", &*asker.volume().await, req).await {
        ControlResponse::RollbackStarted { source, pin, .. } => {
            assert_eq!((source.id, pin.name.as_str()), (snap.id, "undo"));
        }
        other => panic!("rollback on node {}: {other:?}", asker.id),
    }
    let origin_is_before = |when: &'static str| {
        let nodes = &nodes;
        async move {
            for n in nodes {
                let v = n.volume().await;
                for i in 1..=3u32 {
                    let got = v
                        .read_origin(u64::from(i) * CHUNK, CHUNK as u32)
                        .await
                        .expect("origin read during the rollback");
                    assert!(
                        got.iter().all(|b| *b == i as u8),
                        "node {}: origin chunk {i} is not the snapshot's {when}",
                        n.id
                    );
                }
            }
        }
    };
    origin_is_before("once the rollback was answered").await;
    let deadline = Instant::now() + WAIT;
    while asker
        .volume()
        .await
        .status()
        .await
        .expect("status")
        .rollback
        .is_some()
    {
        assert!(Instant::now() < deadline, "the rollback did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    origin_is_before("after the copy-back").await;
    for n in nodes {
        n.stop.cancel();
        for t in n.tasks {
            let _ = tokio::time::timeout(WAIT, t).await;
        }
    }
}

/// Polls every node's status until `done` holds for one of them (bounded by `WAIT`).
async fn wait_status(
    nodes: &[&TestNode],
    what: &str,
    done: impl Fn(&TestNode, &ClusterStatus) -> bool,
) -> ClusterStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut seen = Vec::new();
        for n in nodes {
            if let Some(s) = n.status().await {
                if done(n, &s) {
                    return s;
                }
                seen.push(s);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}: {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With `fencing: reset`, the server's node holding a snapshot reader is partitioned away,
/// reset when the partition heals (its reader reconnects to the real server), and at the
/// next failover its reader is in the gathered list: status shows it per node and in the
/// new server's activation gate. (Before the reset kept a node's snapshot clients, the
/// reset emptied the list the membership core reported, and the gather missed the reader.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_node_keeps_its_snapshot_reader_in_the_next_gather() {
    let fx = Fixture::new(CHUNK, 16 * MIB, 64 * MIB);
    let cluster = MemoryCluster::with_nodes(3).unwrap();
    let mut nodes: Vec<TestNode> = (1..=3)
        .map(|i| start_node_with(&fx, &cluster, NodeId(i), 2_000, Fencing::Reset))
        .collect();
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let (first, _) = agreed_server(&refs).await;
    let s = nodes.iter().position(|n| n.id == first).unwrap();

    // A snapshot reader on the server's node.
    let v = nodes[s].volume().await;
    v.write_origin(0, vec![1u8; CHUNK as usize].into(), true)
        .await
        .expect("origin write");
    let snap = v.create_snapshot("held").await.expect("snapshot");
    let old = v
        .read_snapshot(snap.id, 0, CHUNK as u32)
        .await
        .expect("snapshot read");
    assert!(old.iter().all(|b| *b == 1));
    let reader = v.snapshot_clients();
    assert_eq!(reader.len(), 1, "one snapshot reader attached");
    let reader = reader[0].to_string();
    let has_reader = |c: &ClusterStatus| {
        c.clients
            .iter()
            .any(|n| n.node == first.0 && n.clients.contains(&reader))
    };
    wait_status(&refs, "every node lists the reader", |_, c| has_reader(c)).await;

    // Partition the server's node away: the majority takes over at a new generation.
    let others: Vec<NodeId> = nodes.iter().map(|n| n.id).filter(|n| *n != first).collect();
    cluster.partition(&[vec![first], others.clone()]).unwrap();
    let majority: Vec<&TestNode> = nodes.iter().filter(|n| n.id != first).collect();
    let (second, serving) = agreed_server(&majority).await;
    assert_ne!(second, first);
    let g2 = serving.generation;

    // Heal: the old server's node is stale and resets; its reader reconnects to the real
    // server and is listed again (the reset node holds no generation, but shows the view's).
    cluster.heal();
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let reset = wait_status(
        &refs,
        "the old server's node is reset and rejoined",
        |n, c| {
            n.id == first
                && c.role == "Idle"
                && c.view_generation == g2
                && c.server_node == Some(second.0)
        },
    )
    .await;
    assert!(reset.generation == 0 || reset.generation == g2, "{reset:?}");
    let reread = v
        .read_snapshot(snap.id, 0, CHUNK as u32)
        .await
        .expect("snapshot read through the real server after the reset");
    assert!(reread.iter().all(|b| *b == 1));
    wait_status(
        &refs,
        "the serving node lists the reset node's reader",
        |n, c| n.id == second && c.role == "Serving" && has_reader(c),
    )
    .await;

    // The next failover: the new server's activation list carries the reader.
    let idx = nodes.iter().position(|n| n.id == second).unwrap();
    let dead = nodes.remove(idx);
    cluster.kill_node(dead.id).unwrap();
    dead.crash();
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let (third, status) = agreed_server(&refs).await;
    assert_ne!(third, second);
    assert!(status.generation > g2, "{status:?}");
    let gate = status
        .activation
        .clone()
        .expect("the serving node shows its activation gate");
    assert_eq!(gate.generation, status.generation);
    assert!(!gate.gathering);
    assert!(
        gate.clients
            .iter()
            .any(|c| c.client == reader && c.node == first.0),
        "the reset node's reader is missing from the gathered list: {status:#?}"
    );
    let timing = status.failover.clone().expect("failover timing");
    assert!(timing.gathered_clients.contains(&reader), "{timing:?}");
    drop(v);
    for n in nodes {
        n.stop.cancel();
        for t in n.tasks {
            let _ = tokio::time::timeout(WAIT, t).await;
        }
    }
}

/// Log lines of the whole test binary (the shells run on the runtime's worker threads, so
/// only a global subscriber sees them).
fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Capture(sink.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
    .clone()
}

struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut v = match self.0.lock() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        v.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The durable generation check through the real shell: the server's node powers off, and
/// before the failover the store says a later cluster generation served it (as if another
/// lineage had): the new server refuses to serve, the agent logs `store_generation_ahead`,
/// and nobody serves the stale state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_onto_a_store_a_later_generation_served_is_refused() {
    use csnap_server::store::{read_superblock, BlockDevice, FileDevice};
    let logs = captured_logs();
    let fx = Fixture::new(CHUNK, 16 * MIB, 64 * MIB);
    let cluster = MemoryCluster::with_nodes(3).unwrap();
    let mut nodes: Vec<TestNode> = (1..=3)
        .map(|i| start_node(&fx, &cluster, NodeId(i), 2_000))
        .collect();
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let (first, status) = agreed_server(&refs).await;
    let g1 = status.generation;

    let idx = nodes.iter().position(|n| n.id == first).unwrap();
    let dead = nodes.remove(idx);
    cluster.kill_node(dead.id).unwrap();
    dead.crash();
    // The crashed server abandons the store as a crash would (no superblock write); then
    // the newest superblock is made to say a far later generation served the store.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dev = FileDevice::open(&fx.store, false).unwrap();
    let mut sb = read_superblock(&dev).unwrap();
    assert_eq!(
        sb.cluster_generation, g1,
        "the activation recorded its generation"
    );
    sb.cluster_generation = g1 + 5;
    dev.write_at(&sb.encode(), sb.slot() * 4096).unwrap();
    dev.flush().unwrap();

    let serves = |s: &ClusterStatus| {
        s.local_server
            .as_deref()
            .is_some_and(|l| l.starts_with("serving"))
    };
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        if text.contains("store_generation_ahead") {
            assert!(
                text.contains(&format!("cluster generation {}", g1 + 5)),
                "the event names the store's generation"
            );
            break;
        }
        for n in &refs {
            if let Some(s) = n.status().await {
                assert_ne!(
                    s.role, "Serving",
                    "a server served a store a later generation served: {s:#?}"
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "no store_generation_ahead within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still nobody serves a while later, though the core tries again at later generations
    // (the refusal is sticky in the shell, else those would count up past the store's).
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        for n in &refs {
            if let Some(s) = n.status().await {
                assert!(!serves(&s), "{s:#?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        read_superblock(&dev).unwrap().cluster_generation,
        g1 + 5,
        "the refused server wrote nothing"
    );
    for n in nodes {
        n.stop.cancel();
        for t in n.tasks {
            let _ = tokio::time::timeout(WAIT, t).await;
        }
    }
}
