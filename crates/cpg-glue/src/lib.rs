//! cpg-glue: the only csnap code that talks to corosync.
//!
//! It offers one abstraction, [`Group`], a closed process group with virtual-synchrony
//! semantics, and two implementations of it:
//!
//! * [`corosync`]: real corosync CPG (model V1, with the totem-confchg callback and the
//!   initial totem configuration), dispatched through tokio's `AsyncFd`;
//! * [`memory`]: an in-memory cluster that keeps the same rules (every member of a
//!   partition sees the same membership changes and messages in the same total order; on a
//!   merge joiners come with [`Reason::NodeUp`] and the totem confchg comes last), with
//!   partitions, merges and node deaths injectable for deterministic tests.
//!
//! Alongside CPG it wraps quorum ([`QuorumEvent`]), cmap (raw keys of the live
//! corosync.conf and reload notices; what csnap's keys mean is the agent's business) and
//! cfg (`kill_node`).
//!
//! Everything above this crate (the agent) is written against the traits here, so the
//! same code runs on the real cluster and in the in-memory model.

use std::fmt;
use std::future::Future;

use futures::Stream;
use serde::{Deserialize, Serialize};

pub mod error;
pub use error::GroupError;

/// A corosync node id (`nodeid` in corosync.conf's nodelist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One process in a group: a node and a pid on it. CPG membership is per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Member {
    pub node: NodeId,
    pub pid: u32,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node, self.pid)
    }
}

/// Why a process appears in a confchg's joined or left list (corosync's `CPG_REASON_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// The process called join.
    Join,
    /// The process called leave.
    Leave,
    /// Its node left the totem membership (crash, partition).
    NodeDown,
    /// Its node came (back) into the totem membership: a merge.
    NodeUp,
    /// The process died or closed its connection to corosync.
    ProcDown,
}

/// A process named in a confchg's joined or left list, with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberChange {
    pub member: Member,
    pub reason: Reason,
}

/// A totem ring id: the representative node and the ring sequence number.
/// Ring ids are totally ordered by `seq` within one cluster's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RingId {
    pub node: NodeId,
    pub seq: u64,
}

impl fmt::Display for RingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:x}", self.node, self.seq)
    }
}

/// A change of the group's membership, as CPG's confchg callback reports it.
/// `members` is the membership after the change, sorted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfChg {
    pub members: Vec<Member>,
    pub left: Vec<MemberChange>,
    pub joined: Vec<MemberChange>,
}

/// A change of the totem (node-level) membership. Corosync delivers it after the group
/// confchgs of the same transition, so it marks the point where membership is stable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TotemConfChg {
    pub ring: RingId,
    /// Node ids in the new totem membership, sorted.
    pub members: Vec<NodeId>,
}

/// An agreed-order message delivered to every member of the partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub from: Member,
    pub payload: Vec<u8>,
}

/// What a group member observes, in the group's agreed total order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupEvent {
    ConfChg(ConfChg),
    TotemConfChg(TotemConfChg),
    Deliver(Delivery),
}

/// Quorum state of the local node's partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumEvent {
    pub quorate: bool,
    pub ring: RingId,
    /// Node ids in the partition, sorted.
    pub members: Vec<NodeId>,
}

/// Sends agreed-order multicasts to a group. Cheap to clone; usable from any task.
pub trait GroupSender: Clone + Send + Sync + 'static {
    /// Multicast `payload` to every member of the group (the sender included) in agreed
    /// order. Waits (bounded) through corosync flow control and `CS_ERR_TRY_AGAIN`; never
    /// drops a message silently. Payloads over the implementation's maximum are refused
    /// with [`GroupError::MessageTooLarge`].
    fn mcast(&self, payload: Vec<u8>) -> impl Future<Output = Result<(), GroupError>> + Send;
}

/// A joined closed process group. The stream yields the group's events in agreed order;
/// it ends (yields `None`) after the group was left, and yields an error if the
/// connection to the group was lost (e.g. corosync died).
pub trait Group: Stream<Item = Result<GroupEvent, GroupError>> + Unpin + Send + 'static {
    type Sender: GroupSender;

    /// This process's identity in the group.
    fn local(&self) -> Member;

    /// The group's name.
    fn name(&self) -> &str;

    /// A handle for multicasting to the group.
    fn sender(&self) -> Self::Sender;

    /// Leave the group. Other members see a confchg with reason [`Reason::Leave`].
    fn leave(self) -> impl Future<Output = Result<(), GroupError>> + Send;
}

/// A stream of quorum changes for the local node. The first item is the current state.
pub trait Quorum: Stream<Item = Result<QuorumEvent, GroupError>> + Unpin + Send + 'static {}

pub mod corosync;
pub mod memory;
pub mod testkit;
pub mod typed;
