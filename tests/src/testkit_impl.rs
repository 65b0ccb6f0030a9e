//! [`Cluster`] as a [`TestCluster`]: the shared behavioural suite drives real corosync.
//! Joins and quorum followers are created inside the node's network namespace
//! ([`Cluster::run_in_node`]), so each talks to its node's corosync.

use std::time::Duration;

use cpg_glue::corosync::{CorosyncGroup, CorosyncQuorum, MAX_MESSAGE_SIZE};
use cpg_glue::testkit::TestCluster;
use cpg_glue::{GroupError, NodeId};

use crate::cluster::Cluster;
use crate::error::HarnessError;

/// A harness failure (no such node, thread or namespace trouble) in the suite's error type.
fn harness_failure(node: NodeId, what: &str, e: HarnessError) -> GroupError {
    GroupError::Invalid(format!("test harness: {what} on node {node}: {e}"))
}

impl TestCluster for Cluster {
    type G = CorosyncGroup;
    type Q = CorosyncQuorum;

    fn nodes(&self) -> Vec<NodeId> {
        Cluster::nodes(self)
    }

    async fn join(&self, node: NodeId, group: &str) -> Result<CorosyncGroup, GroupError> {
        let group = group.to_string();
        self.run_async_in_node(
            node,
            move || async move { CorosyncGroup::join(&group).await },
        )
        .await
        .map_err(|e| harness_failure(node, "joining a group", e))?
    }

    async fn quorum(&self, node: NodeId) -> Result<CorosyncQuorum, GroupError> {
        self.run_in_node(node, CorosyncQuorum::connect)
            .await
            .map_err(|e| harness_failure(node, "following quorum", e))?
    }

    async fn partition(&self, sides: &[Vec<NodeId>]) -> Result<(), String> {
        Cluster::partition(self, sides)
            .await
            .map_err(|e| e.to_string())
    }

    async fn heal(&self) -> Result<(), String> {
        Cluster::heal(self).await.map_err(|e| e.to_string())
    }

    /// Token 1 s plus consensus 1.2 s per membership round, a few rounds for a merge, and a
    /// wide margin for a loaded 2-core machine: a bound that only stops a broken run.
    fn settle(&self) -> Duration {
        self.config().settle_timeout
    }

    /// `corosync-quorumtool -e VOTES` in the node's namespace.
    async fn set_expected_votes(&self, node: NodeId, votes: u32) -> Result<(), String> {
        self.exec_ok(node, "corosync-quorumtool", &["-e", &votes.to_string()])
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn max_message_size(&self) -> Option<usize> {
        Some(MAX_MESSAGE_SIZE)
    }

    /// corosync's atomic CPG message is about 1 MiB (libcpg's IPC request size), so this
    /// takes several frames.
    fn multi_frame_payload(&self) -> usize {
        3 << 20
    }
}
