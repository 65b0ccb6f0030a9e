//! The shared behavioural suite (cpg_glue::testkit::suite) on a real 3-node corosync
//! cluster in network namespaces: the same checks the in-memory cluster passes. Each test
//! builds its own cluster; the harness runs one cluster at a time on the machine.

use cpg_glue::testkit::suite;
use cpg_glue::NodeId;
use csnap_e2e::{Cluster, ClusterConfig};

async fn cluster(test: &str) -> Option<Cluster> {
    Cluster::start_or_skip(test, ClusterConfig::new(3)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_see_each_other() {
    let Some(c) = cluster("members_see_each_other").await else {
        return;
    };
    suite::members_see_each_other(&c, "see").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agreed_order_1000_per_member() {
    let Some(c) = cluster("agreed_order_1000_per_member").await else {
        return;
    };
    suite::agreed_order(&c, "order", 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_merge_node3() {
    let Some(c) = cluster("partition_and_merge_node3").await else {
        return;
    };
    suite::partition_and_merge(&c, "split", NodeId(3)).await;
    // The harness's own view agrees with what the suite saw.
    let views = c.wait_converged().await.unwrap();
    assert!(views.values().all(|v| v.members.len() == 3 && v.quorate));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_and_procdown() {
    let Some(c) = cluster("leave_and_procdown").await else {
        return;
    };
    suite::leave_and_procdown(&c, "bye").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large() {
    let Some(c) = cluster("too_large").await else {
        return;
    };
    suite::too_large(&c, "big").await;
}

/// Multi-frame (3 MiB) messages sent without pause across a join, a leave, a partition and
/// a merge: intact payloads, every sender learns each message's fate, members that went
/// through the same view change delivered the same messages (virtual synchrony).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_across_changes() {
    let Some(c) = cluster("large_messages_across_changes").await else {
        return;
    };
    let stats = suite::large_messages_across_changes(&c, "bigmsg").await;
    println!("large_messages_across_changes on corosync: {stats:?}");
    assert!(stats.delivered > 0, "{stats:?}");
}

/// Every node joins two groups at the same moment; every process reaches a stable view.
/// Then a process that leaves right after its join leaves cleanly (corosync answers such
/// a leave with CS_ERR_BUSY until the join is through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_joins_and_a_quick_leave() {
    let Some(c) = cluster("racing_joins_and_a_quick_leave").await else {
        return;
    };
    let totem_first = suite::racing_joins(&c, ["race-a", "race-b"]).await;
    println!("racing_joins: {totem_first} processes saw their initial totem confchg before their own join");
    suite::leave_right_after_join(&c, "quick").await;
}

/// Quorum flips on the same ring: the cut-off node becomes quorate when its expected
/// votes drop to 1 (`corosync-quorumtool -e 1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_flips_on_the_same_ring() {
    let Some(c) = cluster("quorum_flips_on_the_same_ring").await else {
        return;
    };
    suite::quorum_flips_on_the_same_ring(&c, NodeId(3)).await;
}
