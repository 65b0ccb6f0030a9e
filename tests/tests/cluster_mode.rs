//! Cluster mode on real corosync: three nodes in network namespaces, one real `csnap-agent`
//! per node (no `--standalone`: each reads the `csnap` section of its node's corosync.conf
//! through cmap), one volume whose origin and store are files in the run directory shared
//! by every node. I/O goes through each node's own NBD export (a unix socket in the node's
//! directory) with qemu-io and fio run inside the node's namespace; `csnapctl` talks to each
//! agent through its own control socket (`--control-socket`).
//!
//! The agents are the workspace's built binaries: `$CSNAP_BIN_DIR` if set, else the
//! directory of this test's own target (`target/debug`). `cargo test --workspace` builds
//! them first; alone, run `cargo build -p csnap-agent --bins` before
//! `cargo test -p csnap-e2e --test cluster_mode` (a binary older than the agent's sources
//! fails the test rather than testing old code).
//!
//! The rig (cluster, agents, helpers) is `csnap_e2e::rig`, shared with the failover
//! benchmark (`failover-bench`).

use std::time::{Duration, Instant};

use cpg_glue::NodeId;
use csnap_e2e::rig::{read, test_bin_dir, write, Rig, RigConfig, MIB, SERVER_PORT, VOLUME};

// The `rollback --wait` check shared with the agent's tests (std only, included by path).
#[path = "../../crates/agent/tests/support/rollback_wait.rs"]
mod rollback_wait;
use rollback_wait::assert_rollback_wait_saw_the_end;

const ORIGIN_SIZE: u64 = 16 * MIB;
/// Bound for the first server of a fresh cluster (a fresh agent waits one serving lease,
/// 8 s + 2 s, before it may start a server, as it cannot know what ran before it).
const FIRST_SERVER: Duration = Duration::from_secs(45);
/// Bound for a failover: corosync's detection (token 1000 ms) plus the departed server's
/// serving lease (8 s + 2 s margin) plus the gather.
const FAILOVER: Duration = Duration::from_secs(45);

/// The 3-node rig of most tests: node 1 has the highest csnap_priority.
async fn rig3(test: &str, fencing: &str) -> Option<Rig> {
    Rig::start(test, RigConfig::new(3, fencing, test_bin_dir())).await
}

/// Every agent agrees on one server; a write through one node's export, a snapshot made
/// through another node's agent and reads through the third see the same volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_agree_on_one_server_and_share_the_volume() {
    let Some(rig) = rig3("cluster mode: one server", "kill_node").await else {
        return;
    };
    let nodes = rig.cluster.nodes();
    let (server, status) = rig.agreed_server(&nodes, FIRST_SERVER).await;
    let cluster = status.cluster.clone().expect("cluster status");
    assert_eq!(server, NodeId(1), "node 1 has the highest csnap_priority");
    assert_eq!(cluster.members.len(), 3, "{cluster:?}");
    assert_eq!(
        cluster.server_address.as_deref(),
        Some(format!("10.77.0.1:{SERVER_PORT}").as_str()),
        "the server listens on its ring0 address"
    );
    assert!(cluster.generation >= 1, "{cluster:?}");
    for n in &nodes {
        let s = rig.status(*n).await.expect("status");
        let c = s.cluster.expect("cluster status");
        assert_eq!(c.generation, cluster.generation, "node {n}: {c:?}");
        assert_eq!(c.node, n.0);
        assert_eq!(c.role, if *n == server { "Serving" } else { "Idle" });
    }

    let (writer, snapper, reader) = (NodeId(2), NodeId(3), NodeId(1));
    rig.qemu_io(
        writer,
        VOLUME,
        &[write(0x11, 0, 4 * MIB), write(0x22, 4 * MIB, 4 * MIB)],
    )
    .await;
    rig.snapshot(snapper, "before").await;
    rig.qemu_io(writer, VOLUME, &[write(0x33, 0, 2 * MIB)])
        .await;

    for node in [reader, snapper] {
        rig.qemu_io(
            node,
            VOLUME,
            &[
                read(0x33, 0, 2 * MIB),
                read(0x11, 2 * MIB, 2 * MIB),
                read(0x22, 4 * MIB, 4 * MIB),
                read(0, 8 * MIB, 8 * MIB),
            ],
        )
        .await;
        rig.qemu_io(
            node,
            &format!("{VOLUME}@before"),
            &[read(0x11, 0, 4 * MIB), read(0x22, 4 * MIB, 4 * MIB)],
        )
        .await;
    }
    let list = rig
        .ctl(reader, &["snapshot", "list", VOLUME])
        .await
        .expect("snapshot list");
    assert!(list.contains("before"), "{list}");

    // As systemd sees it: READY=1 once the groups were joined, then watchdog pings (every
    // second with WatchdogSec=2) carrying a STATUS line per volume.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen: Vec<String> = Vec::new();
    loop {
        seen.extend(rig.notifications(server));
        let ready = seen.iter().any(|m| m.lines().any(|l| l == "READY=1"));
        let pinged = seen
            .iter()
            .any(|m| m.contains("WATCHDOG=1") && m.contains("STATUS=vol0: Serving (served here"));
        if ready && pinged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {server}: no READY=1 and watchdog ping with a status: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The human status shows the cluster fields.
    let text = rig.ctl(snapper, &["status"]).await.expect("status");
    for want in ["server node 1", "generation", "members", "quorate", "gate"] {
        assert!(
            text.contains(want),
            "csnapctl status lacks {want:?}:\n{text}"
        );
    }

    deltas_from_nodes_that_do_not_serve(&rig, server).await;
}

/// Issue 13 in cluster mode: `diff`, `export-diff`, `import-diff`, the
/// `qemu:dirty-bitmap:FROM` block-status context and `rollback --wait`, from nodes other
/// than the server's, through their agents to the one server. The volume holds 0x33 in
/// [0, 2 MiB), 0x11 in [2, 4), 0x22 in [4, 8) and zeroes after; `before` differs from it
/// in [0, 2 MiB) only.
async fn deltas_from_nodes_that_do_not_serve(rig: &Rig, server: NodeId) {
    use csnap_proto::diff_stream::{Extent, StreamHeader, StreamReader, StreamWriter};
    let (a, b) = match server {
        NodeId(1) => (NodeId(2), NodeId(3)),
        NodeId(2) => (NodeId(1), NodeId(3)),
        _ => (NodeId(1), NodeId(2)),
    };

    let json = rig
        .ctl(a, &["diff", VOLUME, "before", "--json"])
        .await
        .expect("diff before -> origin");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("diff --json is JSON");
    assert_eq!(doc["changed_bytes"], 2 * MIB, "{json}");
    let extents: Vec<(u64, u64)> = doc["extents"]
        .as_array()
        .expect("extents")
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(extents, vec![(0, 2 * MIB)], "{json}");

    // An incremental stream from node b holds exactly the changed bytes.
    rig.snapshot(b, "after").await;
    let dir = rig.cluster.node_dir(b);
    let stream_path = dir.join("before-after.csdiff");
    let stream_arg = stream_path.display().to_string();
    rig.ctl(
        b,
        &[
            "export-diff",
            VOLUME,
            "--from",
            "before",
            "after",
            &stream_arg,
        ],
    )
    .await
    .expect("export-diff before -> after");
    let stream = std::fs::read(&stream_path).expect("the stream file");
    let mut r = StreamReader::new(stream.as_slice()).expect("a diff stream");
    let header: StreamHeader = r.header().clone();
    assert_eq!(
        (header.from.as_deref(), header.to.as_str()),
        (Some("before"), "after")
    );
    let mut covered = 0;
    while let Some(e) = r.next_extent().expect("an intact stream") {
        match e {
            Extent::Data { offset, data } => {
                assert!(offset + data.len() as u64 <= 2 * MIB, "extent at {offset}");
                assert!(data.iter().all(|x| *x == 0x33), "extent at {offset}");
                covered += data.len() as u64;
            }
            Extent::Zero { offset, len } => {
                panic!("zero extent {offset}+{len}: nothing was zeroed")
            }
        }
    }
    assert_eq!(covered, 2 * MIB);

    // The same through NBD: `qemu:dirty-bitmap:before` on node a's `vol0@after` export.
    let uri = rig.nbd_uri(a, &format!("{VOLUME}@after"));
    let out = rig
        .run_in(
            a,
            "nbdinfo",
            &["--map=qemu:dirty-bitmap:before", "--json", &uri],
            Duration::from_secs(30),
        )
        .await
        .expect("nbdinfo --map");
    let map = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nbdinfo: {map} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_str(&map).expect("nbdinfo --json");
    let dirty: u64 = doc
        .as_array()
        .expect("a JSON array")
        .iter()
        .filter(|e| e["type"].as_u64() == Some(1))
        .map(|e| {
            let (offset, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            assert!(offset + len <= 2 * MIB, "dirty beyond the change: {map}");
            len
        })
        .sum();
    assert_eq!(dirty, 2 * MIB, "{map}");

    // A stream from `after` imported through node a changes the origin for every node and
    // makes its snapshot; `after` keeps its contents.
    let mut w = StreamWriter::new(
        Vec::new(),
        &StreamHeader {
            from: Some("after".into()),
            to: "imported".into(),
            ..header
        },
    )
    .expect("stream header");
    w.data(8 * MIB, &vec![0x44; MIB as usize]).expect("extent");
    let (_, bytes) = w.finish().expect("stream end");
    let import_path = rig.cluster.node_dir(a).join("imported.csdiff");
    std::fs::write(&import_path, bytes).expect("write the stream");
    rig.ctl(
        a,
        &["import-diff", VOLUME, &import_path.display().to_string()],
    )
    .await
    .expect("import-diff");
    for export in [VOLUME.to_string(), format!("{VOLUME}@imported")] {
        rig.qemu_io(
            server,
            &export,
            &[
                read(0x33, 0, 2 * MIB),
                read(0x44, 8 * MIB, MIB),
                read(0, 9 * MIB, MIB),
            ],
        )
        .await;
    }
    rig.qemu_io(b, &format!("{VOLUME}@after"), &[read(0, 8 * MIB, 2 * MIB)])
        .await;

    // Online rollback to `before`, asked on node b and followed to its end: every node reads
    // the origin as `before`, the pin keeps the origin as it was, `imported` is unchanged.
    let out = rig
        .ctl(
            b,
            &[
                "rollback",
                VOLUME,
                "before",
                "--pin",
                "pre-rollback",
                "--wait",
                "--timeout",
                "60",
            ],
        )
        .await
        .expect("rollback");
    assert!(out.contains("pre-rollback"), "{out}");
    let before = [
        read(0x11, 0, 4 * MIB),
        read(0x22, 4 * MIB, 4 * MIB),
        read(0, 8 * MIB, 8 * MIB),
    ];
    for node in [server, a, b] {
        rig.qemu_io(node, VOLUME, &before).await;
    }
    for snap in ["pre-rollback", "imported"] {
        rig.qemu_io(
            a,
            &format!("{VOLUME}@{snap}"),
            &[read(0x33, 0, 2 * MIB), read(0x44, 8 * MIB, MIB)],
        )
        .await;
    }
    let status = rig.status(server).await.expect("status");
    assert!(
        status.server_status.rollback.is_none(),
        "the rollback is over: {:?}",
        status.server_status.rollback
    );
}

/// The server's node loses power while fio writes with verify through another node: the
/// survivors elect a new server (higher generation), fio resumes and verifies everything,
/// and a snapshot taken before still reads its data. Powered back on, the node rejoins
/// without being fenced and agrees on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_off_of_the_server_node_fails_over_under_fio() {
    let Some(mut rig) = rig3("cluster mode: power-off", "kill_node").await else {
        return;
    };
    let nodes = rig.cluster.nodes();
    let (first, status) = rig.agreed_server(&nodes, FIRST_SERVER).await;
    let first_gen = status.cluster.expect("cluster status").generation;
    let io_node = NodeId(2);
    assert_ne!(first, io_node);

    rig.qemu_io(io_node, VOLUME, &[write(0x44, 0, ORIGIN_SIZE)])
        .await;
    rig.snapshot(NodeId(3), "pre").await;

    // fio: sequential writes over the whole origin, rate-limited to last across the
    // failover, then reads everything back with checksums.
    let uri = rig.nbd_uri(io_node, VOLUME);
    let fio = {
        let ns = rig.cluster.netns(io_node);
        // fio saves its verify state in the working directory when it stops early.
        let workdir = rig.cluster.dir().to_path_buf();
        tokio::spawn(async move {
            let out = tokio::process::Command::new("ip")
                .args(["netns", "exec", &ns, "fio"])
                .current_dir(workdir)
                .args([
                    "--name=failover",
                    "--ioengine=nbd",
                    &format!("--uri={uri}"),
                    "--rw=write",
                    "--bs=64k",
                    "--size=16M",
                    "--rate=2m",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                    "--verify_state_save=0",
                ])
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            tokio::time::timeout(Duration::from_secs(120), out).await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!fio.is_finished(), "fio ended before the power-off");
    let cut = Instant::now();
    rig.power_off(first).await;

    let survivors: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != first).collect();
    let (second, status) = rig.agreed_server(&survivors, FAILOVER).await;
    let took = cut.elapsed();
    let c = status.cluster.clone().expect("cluster status");
    assert_ne!(second, first);
    assert!(c.generation > first_gen, "{c:?}");
    assert!(c.failover.is_some(), "{c:?}");
    eprintln!("failover from node {first} to node {second} in {took:?}: {c:?}");

    let out = fio
        .await
        .expect("the fio task")
        .expect("fio ended within 120 s")
        .expect("fio ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("err= 0") && !stderr.contains("verify"),
        "fio through node {io_node} across the failover: {}\n{stdout}\n{stderr}",
        out.status
    );

    for node in &survivors {
        rig.qemu_io(
            *node,
            &format!("{VOLUME}@pre"),
            &[read(0x44, 0, ORIGIN_SIZE)],
        )
        .await;
    }
    rig.qemu_io(
        NodeId(3),
        VOLUME,
        &[write(0x45, 0, MIB), read(0x45, 0, MIB)],
    )
    .await;

    // kill_node could not reach the powered-off node (not in the membership); the fencing
    // job ended once its serving lease had certainly run out, as the failover itself
    // waited for.
    let fencer = survivors
        .iter()
        .copied()
        .find(|n| rig.agent_log(*n).contains("fence_unneeded"))
        .unwrap_or_else(|| panic!("no survivor let go of fencing node {first}"));
    rig.assert_logged(fencer, "fence_requested");

    // Power the node back on: corosync first, its agent a little later (as after a boot).
    // Nothing may fence it: its old server is certainly gone, and its new agent holds
    // nothing. It rejoins and agrees on the server, address included.
    rig.cluster
        .start_node(first)
        .await
        .expect("start the node's corosync again");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        rig.cluster.is_running(first),
        "node {first}'s corosync was killed after it was powered back on"
    );
    rig.start_agent(first).await;
    let (again, status) = rig.agreed_server(&nodes, FAILOVER).await;
    assert_eq!(
        again, second,
        "the server moved when node {first} came back"
    );
    let address = status.cluster.expect("cluster status").server_address;
    let back = rig.status(first).await.expect("the rebooted node's status");
    let c = back.cluster.expect("cluster status");
    assert_eq!(c.server_address, address, "{c:?}");
    assert!(c.stale.is_empty() && c.fencing.is_empty(), "{c:?}");
    assert!(
        rig.cluster.is_running(first),
        "node {first} was fenced after it came back"
    );
    for n in &nodes {
        let log = rig.agent_log(*n);
        assert!(
            !log.contains("stale_merge"),
            "node {n} took the rebooted node for stale"
        );
    }
}

/// What the partition phase leaves: the old server (alone in the minority), the
/// majority and its server.
struct Split {
    first: NodeId,
    majority: Vec<NodeId>,
    second: NodeId,
}

/// Cuts the server's node off from the other two: the minority stops serving at once and
/// a write through it gets no grant; the majority elects a new server (higher generation)
/// and reads the old data, writes new data through it.
async fn partition_the_server_away(rig: &Rig) -> Split {
    let nodes = rig.cluster.nodes();
    let (first, status) = rig.agreed_server(&nodes, FIRST_SERVER).await;
    let first_gen = status.cluster.expect("cluster status").generation;
    rig.qemu_io(NodeId(2), VOLUME, &[write(0x55, 0, MIB)]).await;

    let majority: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != first).collect();
    rig.cluster
        .partition(&[vec![first], majority.clone()])
        .await
        .expect("partition");

    // The minority stops serving as soon as it sees it lost quorum.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = rig.status(first).await.expect("minority status");
        let c = s.cluster.expect("cluster status");
        if !c.quorate && c.role != "Serving" && c.local_server.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the minority server did not stop within 20 s: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its clients get no grants: a write through its export does not complete.
    let attempt = rig
        .qemu_io_raw(
            first,
            VOLUME,
            &[write(0x99, 12 * MIB, 64 * 1024)],
            Duration::from_secs(4),
        )
        .await;
    match &attempt {
        // qemu-io says `wrote N/N bytes` for a completed write.
        Ok(out) => assert!(
            !String::from_utf8_lossy(&out.stdout).contains("wrote "),
            "a write through the minority completed: {}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(e) => eprintln!("the minority's write did not complete: {e}"),
    }

    let (second, status) = rig.agreed_server(&majority, FAILOVER).await;
    let c = status.cluster.expect("cluster status");
    assert!(c.generation > first_gen, "{c:?}");
    rig.qemu_io(
        majority[0],
        VOLUME,
        &[read(0x55, 0, MIB), write(0x66, MIB, MIB)],
    )
    .await;
    rig.qemu_io(majority[1], VOLUME, &[read(0x66, MIB, MIB)])
        .await;

    Split {
        first,
        majority,
        second,
    }
}

/// The server's node is cut off from the other two: it stops serving (no quorum) and its
/// clients get nothing; the majority elects a new server and I/O goes on there. After the
/// heal the old server's node is stale, fenced with kill_node (its corosync exits), and
/// exactly one server remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_server_stops_and_is_fenced_after_the_heal() {
    let Some(rig) = rig3("cluster mode: partition", "kill_node").await else {
        return;
    };
    let Split {
        first,
        majority,
        second,
    } = partition_the_server_away(&rig).await;

    rig.cluster.heal().await.expect("heal");
    // The stale node is fenced: cfg kill_node makes its corosync exit.
    rig.cluster
        .wait_exited(first, Duration::from_secs(40))
        .await
        .unwrap_or_else(|e| panic!("the stale node {first} was not fenced: {e}"));
    let (after, _) = rig.agreed_server(&majority, FAILOVER).await;
    assert_eq!(after, second, "the majority's server stays");
    let old = rig
        .status(first)
        .await
        .expect("the fenced node's agent answers");
    let oc = old.cluster.expect("cluster status");
    assert_ne!(oc.role, "Serving", "{oc:?}");
    assert!(oc.local_server.is_none(), "{oc:?}");

    let fencer = majority
        .iter()
        .copied()
        .find(|n| rig.agent_log(*n).contains("fence_done"))
        .unwrap_or_else(|| panic!("no majority agent logged fence_done"));
    rig.assert_logged(fencer, "stale_merge");
    rig.assert_logged(fencer, "fence_requested");
    rig.assert_logged(fencer, "fence_done");
    rig.qemu_io(
        majority[1],
        VOLUME,
        &[read(0x55, 0, MIB), read(0x66, MIB, MIB)],
    )
    .await;
}

/// As above with `fencing: reset`: after the heal the stale node drops its state by
/// itself (no one kills its corosync), its client reconnects to the majority's server,
/// and I/O through its export sees the majority's writes. Exactly one server remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_server_resets_itself_after_the_heal() {
    let Some(rig) = rig3("cluster mode: partition, reset", "reset").await else {
        return;
    };
    let nodes = rig.cluster.nodes();
    let Split {
        first,
        majority,
        second,
    } = partition_the_server_away(&rig).await;

    rig.cluster.heal().await.expect("heal");
    // All three agree on the majority's server again, the old one included.
    let (after, _) = rig.agreed_server(&nodes, FAILOVER).await;
    assert_eq!(after, second, "the majority's server stays");
    assert!(
        rig.cluster.is_running(first),
        "reset does not kill corosync"
    );
    let old = rig.status(first).await.expect("the reset node's status");
    let oc = old.cluster.expect("cluster status");
    assert_eq!(oc.role, "Idle", "{oc:?}");
    assert!(oc.stale.is_empty() && oc.local_server.is_none(), "{oc:?}");
    for n in &majority {
        let c = rig
            .status(*n)
            .await
            .expect("status")
            .cluster
            .expect("cluster");
        assert!(c.stale.is_empty(), "node {n}: {c:?}");
    }
    rig.assert_logged(first, "stale_merge");
    rig.assert_logged(first, "node_reset");
    let actor = majority
        .iter()
        .copied()
        .find(|n| rig.agent_log(*n).contains("event=\"fence_requested\""))
        .unwrap_or_else(|| panic!("no majority agent ordered the reset"));
    rig.assert_logged(actor, "stale_merge");

    // The reset node's client now uses the real server: it sees the majority's writes,
    // and its own writes are seen by the others.
    rig.qemu_io(first, VOLUME, &[read(0x55, 0, MIB), read(0x66, MIB, MIB)])
        .await;
    rig.qemu_io(first, VOLUME, &[write(0x77, 2 * MIB, MIB)])
        .await;
    rig.qemu_io(majority[0], VOLUME, &[read(0x77, 2 * MIB, MIB)])
        .await;
}

/// Corosync restarts under a running agent (a node's corosync upgraded or crashed and
/// restarted): the agent keeps running, rejoins the volume's group, sets its configuration
/// watch up again (so later reloads are followed) and agrees on the server again; the
/// volume never stops being served by the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_survives_a_restart_of_its_corosync() {
    let Some(rig) = rig3("cluster mode: corosync restart", "kill_node").await else {
        return;
    };
    let nodes = rig.cluster.nodes();
    let (server, _) = rig.agreed_server(&nodes, FIRST_SERVER).await;
    let bounced = *nodes
        .iter()
        .find(|n| **n != server)
        .expect("a non-server node");
    rig.cluster
        .restart_node(bounced)
        .await
        .expect("restart the node's corosync");
    let (again, _) = rig.agreed_server(&nodes, FAILOVER).await;
    assert_eq!(
        again, server,
        "a bystander's corosync restart moves no server"
    );
    let deadline = Instant::now() + FAILOVER;
    while !rig.agent_log(bounced).contains("cmap watch set up again") {
        assert!(
            Instant::now() < deadline,
            "{}: node {bounced}'s agent did not set its cmap watch up again",
            rig.test
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    rig.qemu_io(bounced, VOLUME, &[write(0x5a, 0, MIB), read(0x5a, 0, MIB)])
        .await;
}

/// A snapshot reader on node 3 holds a read lock on a chunk (its agent's test hook keeps
/// snapshot read locks 12 s) while the server's node loses power; node 2 then writes that
/// chunk of the origin. The new server's gather lists node 3's snapshot client, so the
/// write is granted only after that client reconnected with its lock and released it:
/// it completes after the hold, the reader gets the old data, and the snapshot still reads
/// the old data afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_read_lock_held_across_a_failover_holds_back_the_origin_write() {
    const HOLD: Duration = Duration::from_secs(12);
    let mut rc = RigConfig::new(3, "kill_node", test_bin_dir());
    rc.confirm_fencing = true;
    rc.agent_env = vec![(
        3,
        format!("CSNAP_TEST_HOLD_SNAPSHOT_READ_MS={}", HOLD.as_millis()),
    )];
    let Some(mut rig) = Rig::start("cluster mode: read lock across failover", rc).await else {
        return;
    };
    let nodes = rig.cluster.nodes();
    let (first, _) = rig.agreed_server(&nodes, FIRST_SERVER).await;
    assert_eq!(first, NodeId(1), "node 1 has the highest csnap_priority");
    let (reader, writer) = (NodeId(3), NodeId(2));
    let chunk = 3 * MIB;
    rig.qemu_io(writer, VOLUME, &[write(0x21, chunk, 64 * 1024)])
        .await;
    let snap = rig.snapshot(writer, "held").await;

    // The slow read: its lock is granted by node 1's server, then held for HOLD.
    let read_started = Instant::now();
    let slow_read = {
        let uri = rig.nbd_uri(reader, &format!("{VOLUME}@held"));
        let ns = rig.cluster.netns(reader);
        tokio::spawn(async move {
            let out = tokio::process::Command::new("ip")
                .args(["netns", "exec", &ns, "qemu-io", "-f", "raw", "-c"])
                .arg(format!("read -P 0x21 {chunk} 65536"))
                .arg(uri)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(Duration::from_secs(60), out).await;
            (out, Instant::now())
        })
    };
    // Let the lock be granted by the old server, then cut its node.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!slow_read.is_finished(), "the slow read ended early");
    rig.power_off(first).await;

    // The conflicting origin write, through another node.
    let write_out = rig
        .qemu_io_raw(
            writer,
            VOLUME,
            &[write(0x22, chunk, 64 * 1024)],
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("the origin write: {e}"));
    let write_done = read_started.elapsed();
    assert!(
        write_out.status.success() && String::from_utf8_lossy(&write_out.stdout).contains("wrote "),
        "the origin write failed: {}\n{}",
        String::from_utf8_lossy(&write_out.stdout),
        String::from_utf8_lossy(&write_out.stderr)
    );
    let (read_out, read_done_at) = slow_read.await.expect("the slow read's task");
    let read_out = read_out
        .expect("the slow read ended within 60 s")
        .expect("qemu-io ran");
    let stdout = String::from_utf8_lossy(&read_out.stdout);
    assert!(
        read_out.status.success() && stdout.contains("read ") && !stdout.contains("fail"),
        "the slow snapshot read did not read the old data: {stdout}\n{}",
        String::from_utf8_lossy(&read_out.stderr)
    );
    let read_done = read_done_at.duration_since(read_started);
    eprintln!("slow read done at {read_done:?}, origin write done at {write_done:?}");
    assert!(
        write_done >= HOLD,
        "the origin write completed {write_done:?} after the read began, within the {HOLD:?} \
         its read lock was held: it went through the lock"
    );

    // The new server gathered node 3's snapshot client and waited for it.
    let survivors = [NodeId(2), NodeId(3)];
    let (second, status) = rig.agreed_server(&survivors, FAILOVER).await;
    let f = status
        .cluster
        .and_then(|c| c.failover)
        .expect("the new server's failover timing");
    assert_eq!(f.departed_server, Some(first.0), "{f:?}");
    assert!(
        f.gathered_clients
            .iter()
            .any(|c| c.ends_with(&format!("/snap{snap}"))),
        "the gather of node {second} did not list node 3's snapshot client: {f:?}"
    );
    // The snapshot kept the old data; the origin has the new.
    for n in survivors {
        rig.qemu_io(
            n,
            &format!("{VOLUME}@held"),
            &[read(0x21, chunk, 64 * 1024)],
        )
        .await;
        rig.qemu_io(n, VOLUME, &[read(0x22, chunk, 64 * 1024)])
            .await;
    }
}

/// Eight nodes: the agreed server is the node with the highest csnap_priority (node 5),
/// then after its power-off the next one (node 3); snapshot clients on four other nodes
/// are all in the new server's gather; I/O goes on. Fencing confirms at once (`command`),
/// so there is no lease wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_choose_by_priority_and_gather_every_nodes_clients() {
    let mut rc = RigConfig::new(8, "kill_node", test_bin_dir());
    rc.priorities = vec![(5, 20), (3, 10)];
    rc.confirm_fencing = true;
    let Some(mut rig) = Rig::start("cluster mode: 8 nodes", rc).await else {
        return;
    };
    let nodes = rig.cluster.nodes();
    let started = Instant::now();
    let (first, status) = rig.agreed_server(&nodes, FIRST_SERVER).await;
    assert_eq!(first, NodeId(5), "the highest csnap_priority serves");
    let first_gen = status.cluster.expect("cluster status").generation;
    rig.qemu_io(NodeId(1), VOLUME, &[write(0x31, 0, MIB)]).await;
    let snap = rig.snapshot(NodeId(2), "s").await;
    // Snapshot clients on nodes 1, 2, 4 and 7 (the NBD export's first snapshot read
    // opens the node's snapshot connection, which stays).
    let readers = [NodeId(1), NodeId(2), NodeId(4), NodeId(7)];
    for n in readers {
        rig.qemu_io(n, &format!("{VOLUME}@s"), &[read(0x31, 0, MIB)])
            .await;
    }
    rig.power_off(first).await;
    let survivors: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != first).collect();
    let (second, status) = rig.agreed_server(&survivors, FAILOVER).await;
    assert_eq!(second, NodeId(3), "the next csnap_priority serves");
    let c = status.cluster.expect("cluster status");
    assert!(c.generation > first_gen, "{c:?}");
    let f = c.failover.expect("the new server's failover timing");
    let snaps: Vec<&String> = f
        .gathered_clients
        .iter()
        .filter(|c| c.ends_with(&format!("/snap{snap}")))
        .collect();
    assert_eq!(
        snaps.len(),
        readers.len(),
        "the gather did not collect one snapshot client per reading node: {f:?}"
    );
    rig.qemu_io(NodeId(6), VOLUME, &[write(0x32, MIB, MIB)])
        .await;
    rig.qemu_io(
        NodeId(8),
        VOLUME,
        &[read(0x31, 0, MIB), read(0x32, MIB, MIB)],
    )
    .await;
    rig.qemu_io(NodeId(4), &format!("{VOLUME}@s"), &[read(0x31, 0, MIB)])
        .await;
    eprintln!(
        "8 nodes: done in {:?} after the cluster formed",
        started.elapsed()
    );
}

/// Issue 13's online rollback across a failover: node 1 serves and copies back one chunk
/// at a time (the test hook `CSNAP_TEST_ROLLBACK_WINDOW=1`, so its copy-back of a volume
/// whose every chunk changed is surely still running); `csnapctl rollback --wait` is asked
/// on node 2, and once it said the rollback started and the copy-back moved, node 1's agent
/// (and with it its server) is SIGKILLed by pid and node 3 writes to the origin. A survivor
/// becomes the server and resumes the copy-back where the store's rollback record says
/// (its log says so, past the start and short of the end); the `--wait` started before the kill waits the
/// failover out (saying so on stderr) and sees the end. Then both survivors read the
/// origin as the source snapshot plus node 3's write, and the pin and another snapshot as
/// they were taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_cut_by_the_servers_death_is_resumed_by_the_new_server() {
    const SIZE: u64 = 32 * MIB;
    // `reset`: the survivors wait the departed server's lease out (about 10 s) rather than
    // fence its node, so the --wait below surely sees a while without a server.
    let mut rc = RigConfig::new(3, "reset", test_bin_dir());
    rc.origin_size = SIZE;
    rc.store_size = 192 * MIB;
    rc.agent_env = vec![(1, "CSNAP_TEST_ROLLBACK_WINDOW=1".into())];
    let Some(mut rig) = Rig::start("cluster mode: rollback across a failover", rc).await else {
        return;
    };
    let started = Instant::now();
    let nodes = rig.cluster.nodes();
    let (first, _) = rig.agreed_server(&nodes, FIRST_SERVER).await;
    assert_eq!(first, NodeId(1), "node 1 has the highest csnap_priority");
    let (waiter, writer) = (NodeId(2), NodeId(3));

    // `before` is 0x11 everywhere; every chunk changes after it, so the copy-back has the
    // whole origin to do. `other` is 0x22 everywhere; the origin then 0x33 in [0, 4 MiB).
    rig.qemu_io(waiter, VOLUME, &[write(0x11, 0, SIZE)]).await;
    rig.snapshot(writer, "before").await;
    rig.qemu_io(waiter, VOLUME, &[write(0x22, 0, SIZE)]).await;
    rig.snapshot(writer, "other").await;
    rig.qemu_io(waiter, VOLUME, &[write(0x33, 0, 4 * MIB)])
        .await;

    // The rollback, followed with --wait from node 2 across what comes.
    let mut wait = {
        let socket = rig.control_socket(waiter).display().to_string();
        tokio::process::Command::new("ip")
            .args(["netns", "exec", &rig.cluster.netns(waiter)])
            .arg(&rig.ctl)
            .args(["--socket", &socket])
            .args(["rollback", VOLUME, "before", "--pin", "pre-rollback"])
            .args(["--wait", "--timeout", "120", "--progress"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start csnapctl rollback --wait")
    };
    let stdout = wait.stdout.take().expect("its stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut said = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no rollback start within 30 s: {said:?}"))
            .expect("read csnapctl's stdout")
            .unwrap_or_else(|| panic!("csnapctl rollback ended early: {said:?}"));
        let started = line.contains("reads as snapshot before");
        said.push(line);
        if started {
            break;
        }
    }

    // The rollback started: once its copy-back has made some way (so the new server must
    // resume it, not start it over), the server's agent dies, its copy-back cut short.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = rig.status(writer).await.expect("status");
        let r = s.server_status.rollback.expect("the rollback runs");
        if r.position >= 32 {
            assert!(
                r.position < r.origin_chunks,
                "the copy-back ended early: {r:?}"
            );
            // The status names the two snapshots beside their ids.
            assert_eq!(
                (r.source_name.as_str(), r.pin_name.as_str()),
                ("before", "pre-rollback"),
                "{r:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the copy-back did not move: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = rig.agents.remove(&first).expect("node 1's agent runs");
    rig.cluster
        .stop_spawned(pid, csnap_e2e::Signal::SIGKILL, Duration::from_secs(5))
        .await
        .expect("SIGKILL node 1's agent");
    let cut = Instant::now();
    // A write made after the rollback returned, through another node: it waits the
    // failover out and lands on top of the rolled-back origin.
    let late_write = {
        let uri = rig.nbd_uri(writer, VOLUME);
        let ns = rig.cluster.netns(writer);
        tokio::spawn(async move {
            let out = tokio::process::Command::new("ip")
                .args(["netns", "exec", &ns, "qemu-io", "-f", "raw", "-c"])
                .arg(write(0x44, 8 * MIB, MIB))
                .arg(uri)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            tokio::time::timeout(Duration::from_secs(90), out).await
        })
    };

    let survivors = [waiter, writer];
    let (second, status) = rig.agreed_server(&survivors, FAILOVER).await;
    eprintln!(
        "failover to node {second} {:?} after the kill: {:?}",
        cut.elapsed(),
        status.server_status.rollback
    );

    // The --wait begun before the kill sees the end.
    let rest = tokio::spawn(async move {
        let mut more = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            more.push(line);
        }
        more
    });
    let out = tokio::time::timeout(Duration::from_secs(150), wait.wait_with_output())
        .await
        .expect("csnapctl rollback --wait ended within 150 s")
        .expect("csnapctl ran");
    said.extend(rest.await.expect("the stdout reader"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_rollback_wait_saw_the_end(
        out.status,
        &said.join("\n"),
        &stderr,
        "before",
        "pre-rollback",
        &["waiting for volume vol0's server", "waiting for the agent"],
    );

    // The new server resumed the copy-back short of its end, and finished it.
    let log = rig.agent_log(second);
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming the rollback"))
        .unwrap_or_else(|| panic!("node {second}'s log does not show the resume:\n{log}"));
    let at: Vec<u64> = resumed
        .split("at chunk ")
        .nth(1)
        .map(|t| {
            // "X of N", perhaps followed by the line's fields.
            let words: Vec<&str> = t.split_whitespace().take(3).collect();
            [words.first(), words.get(2)]
                .into_iter()
                .flatten()
                .filter_map(|w| w.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        at.len() == 2 && 0 < at[0] && at[0] < at[1],
        "the resume is not where the first server stopped: {resumed}"
    );
    assert!(
        log.contains("rollback to snapshot 1 (\"before\"): "),
        "node {second}'s progress lines do not name the snapshot:\n{log}"
    );
    assert!(
        log.contains("copy-back done"),
        "node {second} did not finish the copy-back:\n{log}"
    );
    for n in survivors {
        let s = rig.status(n).await.expect("status");
        assert!(
            s.server_status.rollback.is_none(),
            "node {n} still sees a rollback: {:?}",
            s.server_status.rollback
        );
    }
    let written = late_write
        .await
        .expect("the late write's task")
        .expect("the late write ended within 90 s")
        .expect("qemu-io ran");
    assert!(
        written.status.success() && String::from_utf8_lossy(&written.stdout).contains("wrote "),
        "the write after the rollback returned: {}\n{}",
        String::from_utf8_lossy(&written.stdout),
        String::from_utf8_lossy(&written.stderr)
    );

    // Byte for byte (qemu-io -P checks every byte): the origin is `before` plus the late
    // write; the pin is the origin as it was; `other` is unchanged.
    for n in survivors {
        rig.qemu_io(
            n,
            VOLUME,
            &[
                read(0x11, 0, 8 * MIB),
                read(0x44, 8 * MIB, MIB),
                read(0x11, 9 * MIB, SIZE - 9 * MIB),
            ],
        )
        .await;
        rig.qemu_io(n, &format!("{VOLUME}@before"), &[read(0x11, 0, SIZE)])
            .await;
        rig.qemu_io(n, &format!("{VOLUME}@other"), &[read(0x22, 0, SIZE)])
            .await;
        rig.qemu_io(
            n,
            &format!("{VOLUME}@pre-rollback"),
            &[read(0x33, 0, 4 * MIB), read(0x22, 4 * MIB, SIZE - 4 * MIB)],
        )
        .await;
    }
    eprintln!(
        "rollback across a failover: {:?} after the cluster formed ({resumed})",
        started.elapsed()
    );
}
