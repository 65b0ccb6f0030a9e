//! Self-test of the namespace cluster harness, on the corosync command-line tools only:
//! membership forms, commands run inside the right node, partitions split the membership
//! as asked and heal merges it, stop/kill/restart work, and dropping the cluster leaves no
//! process, namespace, link or directory behind (a crashed run's leftovers are swept).

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use cpg_glue::NodeId;
use csnap_e2e::sweep::{self, Runs};
use csnap_e2e::{Cluster, ClusterConfig, CsnapSection, NodeView, Signal};

fn ids(list: &[u32]) -> Vec<NodeId> {
    list.iter().copied().map(NodeId).collect()
}

fn assert_view(views: &BTreeMap<NodeId, NodeView>, node: u32, members: &[u32], quorate: bool) {
    let view = views
        .get(&NodeId(node))
        .unwrap_or_else(|| panic!("no view of node {node} in {views:?}"));
    assert_eq!(view.members, ids(members), "members seen by node {node}");
    assert_eq!(view.quorate, quorate, "quorate on node {node}: {view:?}");
}

fn ring_seq(views: &BTreeMap<NodeId, NodeView>, node: u32) -> u64 {
    views[&NodeId(node)]
        .ring_seq()
        .unwrap_or_else(|| panic!("unparsable ring id in {views:?}"))
}

/// Fakes what a test process killed mid-run leaves: a namespace, a bridge and a directory
/// with our name shape but a run id no live cluster uses.
fn plant_leftovers() -> (String, String, std::path::PathBuf) {
    let ns = "csezzzz0n1".to_string();
    let bridge = "csezzzz0b0".to_string();
    let dir = std::path::Path::new(csnap_e2e::cluster::BASE_DIR).join("csezzzz0");
    let _ = Command::new("ip").args(["netns", "add", &ns]).status();
    let _ = Command::new("ip")
        .args(["link", "add", &bridge, "type", "bridge"])
        .status();
    std::fs::create_dir_all(dir.join("n1")).unwrap();
    (ns, bridge, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_forms_partitions_heals_restarts_and_cleans_up() {
    if !csnap_e2e::prerequisites_or_skip("harness self-test") {
        return;
    }
    let (stale_ns, stale_bridge, stale_dir) = plant_leftovers();
    let config = ClusterConfig::new(3)
        .priority(1, 10)
        .csnap(CsnapSection::new().set("fence", "cfg").unwrap());
    let cluster = Cluster::start_or_skip("harness self-test", config)
        .await
        .unwrap();

    // The stale sweep removed the fake leftovers and nothing of ours.
    assert!(
        !sweep::list_netns(Runs::All).contains(&stale_ns),
        "stale netns survived"
    );
    assert!(
        !sweep::list_links(Runs::All).contains(&stale_bridge),
        "stale bridge survived"
    );
    assert!(!stale_dir.exists(), "stale run directory survived");

    // Formed: everyone sees everyone, quorate, on one ring.
    let views = cluster.wait_converged().await.unwrap();
    for node in 1..=3 {
        assert_view(&views, node, &[1, 2, 3], true);
    }
    let first_ring = ring_seq(&views, 1);

    // Commands run inside the right node, and the config reached cmap.
    for node in cluster.nodes() {
        let addr = cluster
            .exec_ok(node, "ip", &["-o", "-4", "addr", "show", "dev", "eth0"])
            .await
            .unwrap();
        assert!(
            addr.contains(&format!("10.77.0.{node}/24")),
            "node {node} has {addr}"
        );
    }
    let cmap = cluster
        .exec_ok(NodeId(2), "corosync-cmapctl", &["-b", "csnap."])
        .await
        .unwrap();
    assert!(cmap.contains("csnap.fence (str) = cfg"), "{cmap}");
    let nodelist = cluster
        .exec_ok(NodeId(3), "corosync-cmapctl", &["nodelist.node.0."])
        .await
        .unwrap();
    assert!(
        nodelist.contains("nodelist.node.0.csnap_priority (str) = 10"),
        "{nodelist}"
    );

    // Long-running processes start inside the node's network namespace and are stopped on
    // request or at drop.
    let netns_inode = |path: String| {
        std::fs::metadata(path).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        })
    };
    let sleeper = cluster
        .spawn_in_node(NodeId(1), "sleep", &["600"], "sleeper")
        .await
        .unwrap();
    let lingering = cluster
        .spawn_in_node(NodeId(2), "sleep", &["600"], "sleeper")
        .await
        .unwrap();
    // The pid is `ip netns exec`'s until it has entered the namespace and exec'd sleep.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{sleeper}/comm")).unwrap_or_default() != "sleep\n"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "spawned sleep never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        netns_inode(format!("/proc/{sleeper}/ns/net")).unwrap(),
        netns_inode(format!("/run/netns/{}", cluster.netns(NodeId(1)))).unwrap(),
        "spawned process is not in node 1's network namespace"
    );
    let status = cluster
        .stop_spawned(sleeper, Signal::SIGTERM, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(status.signal(), Some(Signal::SIGTERM as i32), "{status:?}");
    assert!(cluster
        .stop_spawned(sleeper, Signal::SIGTERM, Duration::from_secs(5))
        .await
        .is_err());

    // Node 3 isolated: 1+2 quorate on a newer ring, 3 alone and inquorate.
    cluster.partition(&[ids(&[1, 2])]).await.unwrap();
    let views = cluster.wait_converged().await.unwrap();
    assert_view(&views, 1, &[1, 2], true);
    assert_view(&views, 2, &[1, 2], true);
    assert_view(&views, 3, &[3], false);
    let split_ring = ring_seq(&views, 1);
    assert!(split_ring > first_ring, "ring did not advance on the split");

    // A three-way split: nobody has a majority.
    cluster.partition(&[]).await.unwrap();
    let views = cluster.wait_converged().await.unwrap();
    for node in 1..=3 {
        assert_view(&views, node, &[node], false);
    }

    // Heal merges all three on one newer ring.
    cluster.heal().await.unwrap();
    let views = cluster.wait_converged().await.unwrap();
    for node in 1..=3 {
        assert_view(&views, node, &[1, 2, 3], true);
    }
    assert!(
        ring_seq(&views, 2) > split_ring,
        "ring did not advance on the merge"
    );

    // A clean stop, a crash, restarts.
    let pid2 = cluster.pid(NodeId(2)).unwrap();
    cluster.stop_node(NodeId(2)).await.unwrap();
    assert!(!cluster.is_running(NodeId(2)));
    let views = cluster.wait_converged().await.unwrap();
    assert_view(&views, 1, &[1, 3], true);
    assert!(!views.contains_key(&NodeId(2)));
    let crashed = cluster.pid(NodeId(3)).unwrap();
    cluster.kill_node(NodeId(3)).await.unwrap();
    let views = cluster.wait_converged().await.unwrap();
    assert_view(&views, 1, &[1], false);
    // A SIGKILLed corosync leaves its libqb files in /dev/shm (16 MiB rings each).
    assert!(
        !shm_entries_of(crashed).is_empty(),
        "the crashed corosync {crashed} left no /dev/shm files: the cleanup check below proves nothing"
    );
    cluster.start_node(NodeId(2)).await.unwrap();
    cluster.restart_node(NodeId(3)).await.unwrap();
    assert_ne!(
        cluster.pid(NodeId(2)),
        Some(pid2),
        "node 2 got a new corosync"
    );
    let views = cluster.wait_converged().await.unwrap();
    for node in 1..=3 {
        assert_view(&views, node, &[1, 2, 3], true);
    }

    // Drop removes everything this run made.
    let run = cluster.names().run_id().to_string();
    let dir = cluster.dir().to_path_buf();
    let mut pids: Vec<u32> = cluster
        .nodes()
        .iter()
        .filter_map(|&n| cluster.pid(n))
        .collect();
    assert_eq!(pids.len(), 3);
    pids.push(crashed);
    pids.push(lingering);
    drop(cluster);
    for &pid in &pids {
        assert_eq!(
            shm_entries_of(pid),
            Vec::<String>::new(),
            "libqb files of pid {pid} left in /dev/shm"
        );
    }
    assert_eq!(sweep::list_netns(Runs::One(&run)), Vec::<String>::new());
    assert_eq!(sweep::list_links(Runs::One(&run)), Vec::<String>::new());
    assert_eq!(sweep::corosyncs_under(&dir), Vec::<u32>::new());
    for pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            !cmdline.contains(&run) && !cmdline.starts_with("sleep\x00600"),
            "pid {pid} of the run still alive: {cmdline}"
        );
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_form_and_split_into_arbitrary_sides() {
    let Some(cluster) = Cluster::start_or_skip("eight nodes", ClusterConfig::new(8)).await else {
        return;
    };
    let views = cluster.wait_converged().await.unwrap();
    let all: Vec<u32> = (1..=8).collect();
    for node in 1..=8 {
        assert_view(&views, node, &all, true);
    }

    // 5 | 2 | 1 (node 8 named nowhere, so alone): only the 5-node side has a majority.
    cluster
        .partition(&[ids(&[1, 3, 5, 6, 7]), ids(&[2, 4])])
        .await
        .unwrap();
    let views = cluster.wait_converged().await.unwrap();
    for node in [1, 3, 5, 6, 7] {
        assert_view(&views, node, &[1, 3, 5, 6, 7], true);
    }
    for node in [2, 4] {
        assert_view(&views, node, &[2, 4], false);
    }
    assert_view(&views, 8, &[8], false);

    // 4 | 4: a tie, nobody is quorate.
    cluster
        .partition(&[ids(&[1, 2, 3, 4]), ids(&[5, 6, 7, 8])])
        .await
        .unwrap();
    let views = cluster.wait_converged().await.unwrap();
    for node in 1..=4 {
        assert_view(&views, node, &[1, 2, 3, 4], false);
    }
    for node in 5..=8 {
        assert_view(&views, node, &[5, 6, 7, 8], false);
    }

    cluster.heal().await.unwrap();
    let views = cluster.wait_converged().await.unwrap();
    for node in 1..=8 {
        assert_view(&views, node, &all, true);
    }
}

/// `/dev/shm` entries of libqb that name `pid` as an end of a connection or a blackbox owner.
fn shm_entries_of(pid: u32) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            name.starts_with(&format!("qb-{pid}-"))
                || name.split('-').nth(2) == Some(pid.to_string().as_str())
                || name.contains(&format!("-{pid}-blackbox"))
        })
        .collect()
}
