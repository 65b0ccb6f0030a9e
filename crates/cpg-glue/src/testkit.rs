//! The shared behavioural suite: the same tests run against the in-memory cluster
//! ([`crate::memory`]) and against a real corosync cluster in network namespaces (the
//! `csnap-e2e` harness). Both implement [`TestCluster`]; the [`suite`] functions are generic
//! over it.

use std::{future::Future, time::Duration};

use crate::{Group, GroupError, NodeId, Quorum};

/// A cluster the behavioural suite can drive.
pub trait TestCluster: Send + Sync {
    type G: Group;
    type Q: Quorum;
    /// Node ids of the cluster, sorted.
    fn nodes(&self) -> Vec<NodeId>;
    /// Join `group` as a new process on `node`.
    fn join(
        &self,
        node: NodeId,
        group: &str,
    ) -> impl Future<Output = Result<Self::G, GroupError>> + Send;
    /// Follow quorum on `node`; the first item is the current state.
    fn quorum(&self, node: NodeId) -> impl Future<Output = Result<Self::Q, GroupError>> + Send;
    /// Split the network: each slice is one partition; nodes named in no slice are isolated
    /// alone. Replaces any earlier partitioning.
    fn partition(&self, sides: &[Vec<NodeId>]) -> impl Future<Output = Result<(), String>> + Send;
    /// Reconnect every node with every other.
    fn heal(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Upper bound for one membership change to be seen by every member (the in-memory
    /// cluster: short; real corosync: token + consensus + margin, e.g. 30 s).
    fn settle(&self) -> Duration;
}

/// The behavioural suite. Each function panics with a message naming the node, what was
/// expected and what was seen.
pub mod suite {}
