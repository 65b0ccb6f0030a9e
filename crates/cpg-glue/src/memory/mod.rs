//! An in-memory corosync-like cluster with the same virtual-synchrony rules as CPG, for
//! deterministic tests of everything above cpg-glue.
//!
//! [`MemoryCluster`] holds N nodes. Processes join groups on a node
//! ([`MemoryCluster::join`] gives a [`MemoryGroup`], which implements [`Group`]); the network
//! can be split and healed, nodes killed and restarted, and every process observes exactly
//! what corosync would deliver: per partition one total order of confchgs and messages, a
//! `NodeDown` confchg then a `NodeUp` confchg then the totem confchg at each ring change, ring
//! seqs that only grow, votequorum's majority rule.
//!
//! The rules live in the pure [`model::Model`]; this shell applies each operation under one
//! mutex and pushes the resulting events into per-process unbounded queues, so an operation
//! is atomic and every member sees it at the same point of its stream.

pub mod model;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures::Stream;

use crate::testkit::TestCluster;
use crate::{
    Group, GroupError, GroupEvent, GroupSender, Member, NodeId, Quorum, QuorumEvent, Reason,
    TotemConfChg,
};
use model::{Model, Output};

type GroupItem = Result<GroupEvent, GroupError>;
type QuorumItem = Result<QuorumEvent, GroupError>;

/// The queue of one live process.
struct ProcessQueue {
    group: String,
    events: UnboundedSender<GroupItem>,
}

struct State {
    model: Model,
    processes: HashMap<Member, ProcessQueue>,
    quorum_followers: BTreeMap<NodeId, Vec<UnboundedSender<QuorumItem>>>,
}

impl State {
    /// Deliver the outputs of one model operation. A closed queue means its handle was
    /// dropped mid-operation; the model learns of that through the handle's Drop, so the
    /// event is simply not needed any more.
    fn route(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Group { to, event } => {
                    if let Some(queue) = self.processes.get(&to) {
                        let _ = queue.events.unbounded_send(Ok(event));
                    }
                }
                Output::ProcessLost { member } => {
                    if let Some(queue) = self.processes.remove(&member) {
                        let _ = queue.events.unbounded_send(Err(GroupError::Disconnected {
                            group: queue.group,
                            detail: format!("corosync on node {} was killed", member.node),
                        }));
                    }
                }
                Output::Quorum { node, event } => {
                    if let Some(followers) = self.quorum_followers.get_mut(&node) {
                        followers.retain(|f| f.unbounded_send(Ok(event.clone())).is_ok());
                    }
                }
                Output::NodeLost { node } => {
                    for follower in self.quorum_followers.remove(&node).unwrap_or_default() {
                        let _ = follower.unbounded_send(Err(GroupError::Disconnected {
                            group: "quorum".into(),
                            detail: format!("corosync on node {node} was killed"),
                        }));
                    }
                }
            }
        }
    }
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    /// The state; a panic elsewhere while holding the lock leaves no half-applied model
    /// operation (each one mutates only after its checks), so a poisoned lock is usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An in-memory cluster of nodes. Cheap to clone; all clones drive the same cluster.
#[derive(Clone)]
pub struct MemoryCluster {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("MemoryCluster")
            .field("model", &state.model)
            .finish()
    }
}

impl MemoryCluster {
    /// A cluster of `nodes`, all up and in one ring.
    pub fn new(nodes: &[NodeId]) -> Result<Self, GroupError> {
        let state = State {
            model: Model::new(nodes)?,
            processes: HashMap::new(),
            quorum_followers: BTreeMap::new(),
        };
        Ok(MemoryCluster {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
            }),
        })
    }

    /// A cluster of nodes 1..=n.
    pub fn with_nodes(n: u32) -> Result<Self, GroupError> {
        let nodes: Vec<NodeId> = (1..=n).map(NodeId).collect();
        Self::new(&nodes)
    }

    /// Configured node ids, sorted.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.shared.lock().model.nodes()
    }

    /// Whether corosync runs on `node`.
    pub fn is_up(&self, node: NodeId) -> bool {
        self.shared.lock().model.is_up(node)
    }

    /// The current totem ring of `node`, `None` while it is down.
    pub fn ring(&self, node: NodeId) -> Option<TotemConfChg> {
        self.shared.lock().model.ring(node).cloned()
    }

    /// The membership of `group` as seen from `node`, sorted.
    pub fn view(&self, node: NodeId, group: &str) -> Vec<Member> {
        self.shared.lock().model.view(node, group)
    }

    /// Start a new process on `node` and join `group`. Fails with `NotRunning` if the node
    /// is down, `Invalid` for an unknown node or a bad group name.
    pub fn join(&self, node: NodeId, group: &str) -> Result<MemoryGroup, GroupError> {
        let mut state = self.shared.lock();
        let (member, outputs) = state.model.join(node, group)?;
        let (tx, rx) = unbounded();
        state.processes.insert(
            member,
            ProcessQueue {
                group: group.to_owned(),
                events: tx,
            },
        );
        state.route(outputs);
        Ok(MemoryGroup {
            shared: self.shared.clone(),
            local: member,
            name: group.to_owned(),
            events: rx,
            departed: false,
        })
    }

    /// Follow quorum on `node`; the first item is the current state.
    pub fn quorum(&self, node: NodeId) -> Result<MemoryQuorum, GroupError> {
        let mut state = self.shared.lock();
        let current = state.model.quorum_state(node)?;
        let (tx, rx) = unbounded();
        // The receiver is alive right here, so this send cannot fail.
        let _ = tx.unbounded_send(Ok(current));
        state.quorum_followers.entry(node).or_default().push(tx);
        Ok(MemoryQuorum { events: rx })
    }

    /// Split the network: each slice is one partition; nodes in no slice are isolated
    /// alone. Replaces any earlier partitioning.
    pub fn partition(&self, sides: &[Vec<NodeId>]) -> Result<(), GroupError> {
        let mut state = self.shared.lock();
        let outputs = state.model.partition(sides)?;
        state.route(outputs);
        Ok(())
    }

    /// Reconnect every node with every other.
    pub fn heal(&self) {
        let mut state = self.shared.lock();
        let outputs = state.model.heal();
        state.route(outputs);
    }

    /// Kill corosync on `node`: its processes vanish (their streams end with
    /// `Disconnected`), the other nodes see them go with `NodeDown`.
    pub fn kill_node(&self, node: NodeId) -> Result<(), GroupError> {
        let mut state = self.shared.lock();
        let outputs = state.model.kill(node)?;
        state.route(outputs);
        Ok(())
    }

    /// Start corosync on a killed `node` again (with no processes); it merges into the
    /// nodes of its network side.
    pub fn restart_node(&self, node: NodeId) -> Result<(), GroupError> {
        let mut state = self.shared.lock();
        let outputs = state.model.restart(node)?;
        state.route(outputs);
        Ok(())
    }

    /// Payloads longer than `max` bytes are refused with `MessageTooLarge`.
    pub fn set_max_message_size(&self, max: usize) {
        self.shared.lock().model.set_max_message_size(max);
    }

    pub fn max_message_size(&self) -> usize {
        self.shared.lock().model.max_message_size()
    }
}

/// One process's membership of a group in a [`MemoryCluster`]. Dropping it without
/// [`Group::leave`] is a process death: the others see [`Reason::ProcDown`].
pub struct MemoryGroup {
    shared: Arc<Shared>,
    local: Member,
    name: String,
    events: UnboundedReceiver<GroupItem>,
    departed: bool,
}

impl std::fmt::Debug for MemoryGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryGroup")
            .field("local", &self.local)
            .field("name", &self.name)
            .finish()
    }
}

impl MemoryGroup {
    fn depart(&mut self, reason: Reason) -> Result<(), GroupError> {
        self.departed = true;
        let mut state = self.shared.lock();
        state.processes.remove(&self.local);
        match state.model.depart(self.local, reason) {
            Some(outputs) => {
                state.route(outputs);
                Ok(())
            }
            None => Err(GroupError::Disconnected {
                group: self.name.clone(),
                detail: format!("process {} vanished with its node", self.local),
            }),
        }
    }
}

impl Drop for MemoryGroup {
    fn drop(&mut self) {
        if !self.departed {
            // A process that dies: gone already if its node was killed, which is fine.
            let _ = self.depart(Reason::ProcDown);
        }
    }
}

impl Stream for MemoryGroup {
    type Item = GroupItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.events).poll_next(cx)
    }
}

impl Group for MemoryGroup {
    type Sender = MemorySender;

    fn local(&self) -> Member {
        self.local
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn sender(&self) -> MemorySender {
        MemorySender {
            shared: self.shared.clone(),
            local: self.local,
            group: self.name.as_str().into(),
        }
    }

    async fn leave(mut self) -> Result<(), GroupError> {
        self.depart(Reason::Leave)
    }
}

/// Multicasts for a [`MemoryGroup`]; works until the process leaves, dies or its node is
/// killed, then fails with `Disconnected`.
#[derive(Clone)]
pub struct MemorySender {
    shared: Arc<Shared>,
    local: Member,
    group: Arc<str>,
}

impl std::fmt::Debug for MemorySender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySender")
            .field("local", &self.local)
            .field("group", &self.group)
            .finish()
    }
}

impl GroupSender for MemorySender {
    fn mcast(&self, payload: Vec<u8>) -> impl Future<Output = Result<(), GroupError>> + Send {
        let sender = self.clone();
        async move {
            let mut state = sender.shared.lock();
            let outputs = state.model.mcast(sender.local, &sender.group, payload)?;
            state.route(outputs);
            Ok(())
        }
    }
}

/// Quorum changes of one node of a [`MemoryCluster`]; ends with `Disconnected` when the
/// node is killed.
#[derive(Debug)]
pub struct MemoryQuorum {
    events: UnboundedReceiver<QuorumItem>,
}

impl Stream for MemoryQuorum {
    type Item = QuorumItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.events).poll_next(cx)
    }
}

impl Quorum for MemoryQuorum {}

impl TestCluster for MemoryCluster {
    type G = MemoryGroup;
    type Q = MemoryQuorum;

    fn nodes(&self) -> Vec<NodeId> {
        MemoryCluster::nodes(self)
    }

    fn join(
        &self,
        node: NodeId,
        group: &str,
    ) -> impl Future<Output = Result<MemoryGroup, GroupError>> + Send {
        std::future::ready(MemoryCluster::join(self, node, group))
    }

    fn quorum(
        &self,
        node: NodeId,
    ) -> impl Future<Output = Result<MemoryQuorum, GroupError>> + Send {
        std::future::ready(MemoryCluster::quorum(self, node))
    }

    fn partition(&self, sides: &[Vec<NodeId>]) -> impl Future<Output = Result<(), String>> + Send {
        std::future::ready(MemoryCluster::partition(self, sides).map_err(|e| e.to_string()))
    }

    fn heal(&self) -> impl Future<Output = Result<(), String>> + Send {
        MemoryCluster::heal(self);
        std::future::ready(Ok(()))
    }

    /// Changes are applied at once; the bound only keeps a broken test from hanging.
    fn settle(&self) -> Duration {
        Duration::from_secs(5)
    }

    fn max_message_size(&self) -> Option<usize> {
        Some(MemoryCluster::max_message_size(self))
    }
}
