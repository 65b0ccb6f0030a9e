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
