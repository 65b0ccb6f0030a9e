//! The corosync services other than CPG ordering, on a real 3-node namespace cluster:
//! cmap (the csnap section and its reload), cfg (local node id, kill_node), quorum, and
//! what a CPG client sees when its corosync is missing or dies.

use std::path::PathBuf;
use std::time::Duration;

use cpg_glue::corosync::{self, Cmap, CorosyncGroup, CorosyncQuorum};
use cpg_glue::{GroupError, GroupEvent, NodeId, QuorumEvent};
use csnap_agent::config::{
    self, ConfigError, ConfigWatch, CsnapConfig, Fencing, ParsedConfig, DEFAULT_KEY_FILE,
};
use csnap_e2e::{Cluster, ClusterConfig, CsnapSection};
use futures::{Stream, StreamExt};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(30);

fn volume_section(port: u16) -> CsnapSection {
    CsnapSection::new()
        .set("fencing", "kill_node")
        .unwrap()
        .set("vol0.origin", "/dev/disk/by-id/test-origin")
        .unwrap()
        .set("vol0.store", "/dev/disk/by-id/test-store")
        .unwrap()
        .set("vol0.server_port", port.to_string())
        .unwrap()
}

/// Next item of `stream`, bounded; panics naming `what` on timeout or end.
async fn next_item<S: Stream + Unpin>(stream: &mut S, what: &str) -> S::Item {
    match timeout(WAIT, stream.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("{what}: the stream ended"),
        Err(_) => panic!("{what}: nothing within {WAIT:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmap_reads_the_csnap_section_and_follows_a_reload() {
    let config = ClusterConfig::new(3)
        .priority(2, 20)
        .csnap(volume_section(7788));
    let Some(cluster) = Cluster::start_or_skip("cmap", config).await else {
        return;
    };
    let nodes = cluster.nodes();

    // Each node's cfg says who it is; each node's cmap holds the section it was started with.
    for &node in &nodes {
        let id = cluster
            .run_in_node(node, corosync::local_node_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            id, node,
            "corosync_cfg_local_get in node {node}'s namespace"
        );
    }
    let parsed = cluster
        .run_in_node(NodeId(1), || config::read(&Cmap::connect()?))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(parsed.warnings, []);
    let read: CsnapConfig = parsed.config;
    assert_eq!(read.fencing, Fencing::KillNode);
    let vol = &read.volumes["vol0"];
    assert_eq!(vol.origin, PathBuf::from("/dev/disk/by-id/test-origin"));
    assert_eq!(vol.store, PathBuf::from("/dev/disk/by-id/test-store"));
    assert_eq!(vol.server_port, 7788);
    assert_eq!(read.priority_of(NodeId(2)), 20);
    assert_eq!(read.priority_of(NodeId(1)), 0);
    assert_eq!(read.nodes.len(), 3, "{:?}", read.nodes);
    assert_eq!(
        read.nodes[&NodeId(3)].ring0_addr.as_deref(),
        Some("10.77.0.3")
    );
    let raw = cluster
        .run_in_node(NodeId(1), || Cmap::connect()?.get_prefix("csnap."))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(raw, volume_section(7788).as_cmap());

    // Watch on nodes 2 and 3 (the watch returns the configuration it started from),
    // rewrite every node's section, reload: both see the new port.
    let mut watches = Vec::new();
    for node in [NodeId(2), NodeId(3)] {
        let (initial, watch) = cluster
            .run_in_node(node, || ConfigWatch::start(Cmap::connect()?))
            .await
            .unwrap()
            .unwrap();
        let initial = initial.unwrap_or_else(|e| panic!("node {node}: {e}"));
        assert_eq!(initial.config.volumes["vol0"].server_port, 7788);
        watches.push((node, watch));
    }
    cluster
        .set_csnap(&nodes, volume_section(7799))
        .await
        .unwrap();
    assert_eq!(cluster.csnap_section(NodeId(1)), Some(volume_section(7799)));
    for (node, watch) in &mut watches {
        let reloaded = next_item(watch, &format!("node {node}'s config watch"))
            .await
            .unwrap_or_else(|e| panic!("node {node}: reloaded config did not parse: {e}"))
            .config;
        assert_eq!(reloaded.volumes["vol0"].server_port, 7799, "node {node}");
        assert_eq!(reloaded.priority_of(NodeId(2)), 20, "node {node}");
    }

    // A bad value reaches the watcher as an Invalid error naming the key, not a panic;
    // fixing the value in the file and reloading recovers.
    let bad = volume_section(7799).set("fencing", "maybe").unwrap();
    cluster.set_csnap(&nodes, bad).await.unwrap();
    for (node, watch) in &mut watches {
        match next_item(watch, &format!("node {node}'s config watch")).await {
            Err(ConfigError::Invalid { key, detail }) => {
                assert_eq!(key, "csnap.fencing", "{detail}");
                assert!(detail.contains("maybe"), "{detail}");
            }
            other => {
                panic!("node {node}: expected an Invalid error for csnap.fencing, got {other:?}")
            }
        }
    }
    let fixed = volume_section(7799).set("fencing", "reset").unwrap();
    cluster.set_csnap(&nodes, fixed).await.unwrap();
    for (node, watch) in &mut watches {
        let recovered = next_item(watch, &format!("node {node}'s config watch"))
            .await
            .unwrap_or_else(|e| panic!("node {node}: the fixed value did not parse: {e}"))
            .config;
        assert_eq!(recovered.fencing, Fencing::Reset, "node {node}");
        assert_eq!(recovered.volumes["vol0"].server_port, 7799, "node {node}");
    }
}

/// The `csnap { ... }` block of the agent's documented example, verbatim (comments too).
fn documented_csnap_section() -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in config::EXAMPLE_CONF.lines() {
        inside |= line == "csnap {";
        if inside {
            out.push_str(line);
            out.push('\n');
            if line == "}" {
                return out;
            }
        }
    }
    panic!("no top-level `csnap {{ ... }}` block in the documented example");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_example_section_loads_into_real_corosync() {
    let section = documented_csnap_section();
    assert!(
        section.lines().any(|l| l.trim_start().starts_with('#')),
        "the example should show its comments:\n{section}"
    );
    let config = ClusterConfig::new(1).priority(1, 10).extra_conf(&section);
    // Corosync refuses to start on a syntax error (e.g. text after `vol0 {`).
    let Some(cluster) = Cluster::start_or_skip("documented example", config).await else {
        return;
    };
    let (
        raw,
        ParsedConfig {
            config: parsed,
            warnings,
        },
    ) = cluster
        .run_in_node(NodeId(1), || {
            let cmap = Cmap::connect()?;
            Ok::<_, ConfigError>((cmap.get_prefix("csnap.")?, config::read(&cmap)?))
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the documented example does not parse: {e}\n{section}"));
    // Every value line of the example reached cmap, and no comment became part of a value.
    let value_lines = section
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains(':'))
        .count();
    assert_eq!(raw.len(), value_lines, "{raw:#?}");
    for (key, value) in &raw {
        assert!(!value.contains('#'), "{key} = {value:?}");
    }
    assert_eq!(
        raw.get("csnap.fencing").map(String::as_str),
        Some("kill_node")
    );
    assert!(!raw.contains_key("csnap.fence_command"), "commented out");
    assert_eq!(warnings, []);
    assert_eq!(parsed.fencing, Fencing::KillNode);
    let vol = &parsed.volumes["vol0"];
    assert_eq!(vol.server_port, 7788);
    assert_eq!(
        vol.origin.display().to_string(),
        raw["csnap.vol0.origin"],
        "{raw:#?}"
    );
    assert_eq!(parsed.priority_of(NodeId(1)), 10);
}

/// Next item of a config watch, which must parse; panics naming the node otherwise.
async fn next_parsed(watch: &mut ConfigWatch, node: NodeId) -> ParsedConfig {
    next_item(watch, &format!("node {node}'s config watch"))
        .await
        .unwrap_or_else(|e| panic!("node {node}: expected a configuration, got {e}"))
}

/// The `csnap.` keys in `node`'s cmap.
async fn csnap_keys(cluster: &Cluster, node: NodeId) -> cpg_glue::corosync::CmapKeys {
    cluster
        .run_in_node(node, || Cmap::connect()?.get_prefix("csnap."))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("node {node}: reading cmap: {e}"))
}

/// A key removed from the csnap section stays in cmap after `corosync-cfgtool -R`: the
/// agent warns about it instead of failing, and `corosync-cmapctl` (per node) clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_csnap_keys_warn_and_corosync_cmapctl_clears_them() {
    let config = ClusterConfig::new(2).csnap(volume_section(7788));
    let Some(cluster) = Cluster::start_or_skip("stale csnap keys", config).await else {
        return;
    };
    let nodes = cluster.nodes();
    let mut watches = Vec::new();
    for &node in &nodes {
        let (initial, watch) = cluster
            .run_in_node(node, || ConfigWatch::start(Cmap::connect()?))
            .await
            .unwrap()
            .unwrap();
        let initial = initial.unwrap_or_else(|e| panic!("node {node}: {e}"));
        assert_eq!(initial.warnings, [], "node {node}");
        watches.push((node, watch));
    }

    // A typo'd key: the configuration still parses, with a warning naming the key.
    let typo = volume_section(7788)
        .set("keyfile", "/etc/csnap/other.key")
        .unwrap();
    cluster.set_csnap(&nodes, typo).await.unwrap();
    for (node, watch) in &mut watches {
        let parsed = next_parsed(watch, *node).await;
        assert_eq!(parsed.config.key_file, PathBuf::from(DEFAULT_KEY_FILE));
        let keys: Vec<&str> = parsed.warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["csnap.keyfile"], "node {node}");
        let detail = &parsed.warnings[0].detail;
        assert!(
            detail.contains("`corosync-cmapctl -d csnap.keyfile`"),
            "node {node}: {detail}"
        );
    }

    // Fixed in the file and reloaded: the misspelt key is still in cmap (corosync does not
    // prune the csnap section), so the warning stays, but the configuration is the new one.
    let fixed = volume_section(7788)
        .set("key_file", "/etc/csnap/other.key")
        .unwrap();
    cluster.set_csnap(&nodes, fixed.clone()).await.unwrap();
    for (node, watch) in &mut watches {
        let parsed = next_parsed(watch, *node).await;
        assert_eq!(
            parsed.config.key_file,
            PathBuf::from("/etc/csnap/other.key"),
            "node {node}"
        );
        let keys: Vec<&str> = parsed.warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["csnap.keyfile"], "node {node}");
    }
    for &node in &nodes {
        let mut expected = fixed.as_cmap();
        expected.insert("csnap.keyfile".into(), "/etc/csnap/other.key".into());
        assert_eq!(
            csnap_keys(&cluster, node).await,
            expected,
            "node {node}: the removed key stays in cmap after the reload"
        );
    }

    // corosync-cmapctl -d on node 1 clears it there; cmap is per node, so node 2 keeps it
    // until the same is done there.
    cluster
        .exec_ok(NodeId(1), "corosync-cmapctl", &["-d", "csnap.keyfile"])
        .await
        .unwrap();
    let (node, watch) = &mut watches[0];
    let parsed = next_parsed(watch, *node).await;
    assert_eq!(parsed.warnings, [], "node {node} after corosync-cmapctl -d");
    assert_eq!(
        parsed.config.key_file,
        PathBuf::from("/etc/csnap/other.key")
    );
    assert_eq!(csnap_keys(&cluster, NodeId(1)).await, fixed.as_cmap());
    assert!(csnap_keys(&cluster, NodeId(2))
        .await
        .contains_key("csnap.keyfile"));
    cluster
        .exec_ok(NodeId(2), "corosync-cmapctl", &["-d", "csnap.keyfile"])
        .await
        .unwrap();
    let (node, watch) = &mut watches[1];
    assert_eq!(next_parsed(watch, *node).await.warnings, [], "node {node}");

    // A volume removed from the file stays configured; -D on its prefix removes it.
    let two = fixed
        .clone()
        .set("vol1.origin", "/dev/disk/by-id/test-origin1")
        .unwrap()
        .set("vol1.store", "/dev/disk/by-id/test-store1")
        .unwrap()
        .set("vol1.server_port", "7790")
        .unwrap();
    cluster.set_csnap(&nodes, two).await.unwrap();
    for (node, watch) in &mut watches {
        let parsed = next_parsed(watch, *node).await;
        let names: Vec<&String> = parsed.config.volumes.keys().collect();
        assert_eq!(names, ["vol0", "vol1"], "node {node}");
    }
    cluster.set_csnap(&nodes, fixed.clone()).await.unwrap();
    // Node 1 ran the reload, so it has applied it by now; nothing changed in cmap.
    let after = cluster
        .run_in_node(NodeId(1), || config::read(&Cmap::connect()?))
        .await
        .unwrap()
        .unwrap();
    assert!(
        after.config.volumes.contains_key("vol1"),
        "a volume removed from corosync.conf stays in cmap: {after:?}"
    );
    for &node in &nodes {
        cluster
            .exec_ok(node, "corosync-cmapctl", &["-D", "csnap.vol1."])
            .await
            .unwrap();
    }
    // cmapctl -D deletes the keys one by one, so a watch may see vol1 half gone first (an
    // error naming a missing vol1 key) before the end state.
    for (node, watch) in &mut watches {
        let parsed = loop {
            match next_item(watch, &format!("node {node}'s config watch")).await {
                Ok(parsed) if !parsed.config.volumes.contains_key("vol1") => break parsed,
                Ok(_) => {}
                Err(ConfigError::Invalid { key, .. }) if key.starts_with("csnap.vol1.") => {}
                Err(e) => panic!("node {node}: while vol1 was deleted: {e}"),
            }
        };
        let names: Vec<&String> = parsed.config.volumes.keys().collect();
        assert_eq!(names, ["vol0"], "node {node}");
        assert_eq!(parsed.warnings, [], "node {node}");
    }
    for &node in &nodes {
        assert_eq!(
            csnap_keys(&cluster, node).await,
            fixed.as_cmap(),
            "node {node}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpg_reports_a_missing_or_dying_corosync() {
    let Some(cluster) = Cluster::start_or_skip("cpg without corosync", ClusterConfig::new(3)).await
    else {
        return;
    };

    // Node 3 joins; when its corosync is killed, its stream ends with Disconnected.
    let mut group = cluster
        .run_async_in_node(NodeId(3), || CorosyncGroup::join("doomed"))
        .await
        .unwrap()
        .unwrap();
    loop {
        match next_item(&mut group, "node 3's group before the kill").await {
            Ok(GroupEvent::TotemConfChg(_)) => break,
            Ok(_) => {}
            Err(e) => panic!("node 3: error before the kill: {e}"),
        }
    }
    cluster.kill_node(NodeId(3)).await.unwrap();
    let error = loop {
        match next_item(&mut group, "node 3's group after the kill").await {
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(
        matches!(error, GroupError::Disconnected { ref group, .. } if group == "doomed"),
        "expected Disconnected for group doomed, got {error:?}"
    );
    match timeout(WAIT, group.next()).await {
        Ok(None) => {}
        other => panic!("node 3: stream should end after Disconnected, got {other:?}"),
    }

    // Node 2 without corosync: joining says so plainly.
    cluster.stop_node(NodeId(2)).await.unwrap();
    let refused = cluster
        .run_async_in_node(NodeId(2), || CorosyncGroup::join("nobody-home"))
        .await
        .unwrap();
    match refused {
        Err(e @ GroupError::NotRunning { .. }) => {
            let text = e.to_string();
            assert!(text.contains("corosync"), "{text}");
            assert!(text.contains("running"), "{text}");
        }
        Err(other) => panic!("expected NotRunning, got {other}"),
        Ok(_) => panic!("joining without a corosync on node 2 succeeded"),
    }
    let quorum = cluster
        .run_in_node(NodeId(2), CorosyncQuorum::connect)
        .await
        .unwrap();
    assert!(
        matches!(quorum, Err(GroupError::NotRunning { .. })),
        "quorum without corosync: {:?}",
        quorum.err()
    );

    // Node 1 stays usable alone (inquorate) and after node 2 comes back.
    cluster.start_node(NodeId(2)).await.unwrap();
    let views = cluster.wait_converged().await.unwrap();
    assert_eq!(views[&NodeId(1)].members, vec![NodeId(1), NodeId(2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cfg_kill_node_fences_a_node_and_the_rest_stay_quorate() {
    let Some(cluster) = Cluster::start_or_skip("cfg kill_node", ClusterConfig::new(3)).await else {
        return;
    };
    let mut quorum = cluster
        .run_in_node(NodeId(1), CorosyncQuorum::connect)
        .await
        .unwrap()
        .unwrap();
    let all = cluster.nodes();
    let first: QuorumEvent = next_item(&mut quorum, "node 1's quorum").await.unwrap();
    assert!(first.quorate && first.members == all, "{first:?}");

    cluster
        .run_in_node(NodeId(1), || {
            corosync::kill_node(NodeId(3), "csnap-e2e: fencing test")
        })
        .await
        .unwrap()
        .unwrap();
    cluster.wait_exited(NodeId(3), WAIT).await.unwrap();
    let log = std::fs::read_to_string(cluster.node_dir(NodeId(3)).join("corosync.log")).unwrap();
    assert!(
        log.contains("csnap-e2e: fencing test"),
        "node 3's log does not name the kill reason:\n{}",
        cluster.log_tail(NodeId(3), 20)
    );

    let survivors = vec![NodeId(1), NodeId(2)];
    loop {
        let event = next_item(&mut quorum, "node 1's quorum after the kill")
            .await
            .unwrap();
        if event.members == survivors {
            assert!(event.quorate, "1+2 of 3 must stay quorate: {event:?}");
            assert!(event.ring.seq > first.ring.seq, "{event:?} after {first:?}");
            break;
        }
    }
    let views = cluster.wait_converged().await.unwrap();
    for node in &survivors {
        assert_eq!(views[node].members, survivors);
        assert!(views[node].quorate);
    }

    // Killing a node that is not in the membership is a clear error, not a hang.
    let err = cluster
        .run_in_node(NodeId(1), || corosync::kill_node(NodeId(3), "again"))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("node 3"), "{err}");
}
