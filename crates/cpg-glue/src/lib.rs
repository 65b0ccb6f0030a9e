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
pub mod fragment;
mod inbox;
pub use error::GroupError;
pub use inbox::Receipt;

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
    /// The corosync node id.
    pub node: NodeId,
    /// The process id on that node.
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
    /// The process.
    pub member: Member,
    /// Why it joined or left.
    pub reason: Reason,
}

/// A totem ring id: the representative node (the lowest node id of the ring) and the ring
/// sequence number.
///
/// Ring ids are *not* ordered across partitions: corosync gives a new ring the highest seq
/// its members knew plus 4, so both halves of a split form rings with the same seq (`1.11`
/// on the majority and `3.11` on the cut-off node at the same moment), and after a merge
/// either lineage may have had the higher seq. Along one node's own history the seq only
/// grows (corosync persists it across restarts), so comparing `seq` is meaningful only
/// between rings seen by the same node. Nothing may decide "newer lineage" from ring ids;
/// that is why this type has equality but no ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RingId {
    /// The representative node.
    pub node: NodeId,
    /// The ring sequence number.
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
    /// The members after the change, sorted.
    pub members: Vec<Member>,
    /// Who left, and why.
    pub left: Vec<MemberChange>,
    /// Who joined, and why.
    pub joined: Vec<MemberChange>,
}

/// A change of the totem (node-level) membership. Corosync delivers it after the group
/// confchgs of the same transition, so it marks the end of a transition. A process also
/// gets one *initial* totem confchg with the ring current when it joined, and that one can
/// arrive before the process's own join confchg (see [`view::ViewTracker`] for what a
/// stable view is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TotemConfChg {
    /// The new ring.
    pub ring: RingId,
    /// Node ids in the new totem membership, sorted.
    pub members: Vec<NodeId>,
}

/// An agreed-order message delivered to every member of the partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The sender.
    pub from: Member,
    /// The message.
    pub payload: Vec<u8>,
}

/// What a group member observes, in the group's agreed total order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupEvent {
    /// The group's membership changed.
    ConfChg(ConfChg),
    /// The totem membership changed (the end of a transition).
    TotemConfChg(TotemConfChg),
    /// A message.
    Deliver(Delivery),
}

/// Quorum state of the local node's partition. Quorum can change without a ring change
/// (expected votes changed with `corosync-quorumtool -e`, last_man_standing, a quorum
/// device): a quorate flip on the same ring is normal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumEvent {
    /// Whether the partition is quorate.
    pub quorate: bool,
    /// The ring the event came with.
    pub ring: RingId,
    /// Node ids in the partition, sorted.
    pub members: Vec<NodeId>,
}

/// Sends agreed-order multicasts to a group. Cheap to clone; usable from any task.
pub trait GroupSender: Clone + Send + Sync + 'static {
    /// Multicast `payload` to every member of the group (the sender included) in agreed
    /// order. Waits (bounded) through corosync flow control and `CS_ERR_TRY_AGAIN`.
    /// Payloads over the implementation's maximum are refused with
    /// [`GroupError::MessageTooLarge`].
    ///
    /// `Ok` means corosync accepted every frame of the message. A message larger than one
    /// frame can still be cut by a membership change that corosync orders between its
    /// frames: then no member delivers it. The returned [`Receipt`] tells the sender which
    /// way it went; a message is never delivered to only some members of a view.
    fn mcast(&self, payload: Vec<u8>) -> impl Future<Output = Result<Receipt, GroupError>> + Send;
}

/// A joined closed process group. The stream yields the group's events in agreed order;
/// it ends (yields `None`) after the group was left, and yields an error if the
/// connection to the group was lost (e.g. corosync died).
pub trait Group: Stream<Item = Result<GroupEvent, GroupError>> + Unpin + Send + 'static {
    /// Sends to the group; may be cloned and used from other tasks.
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
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod typed;
pub mod view;
