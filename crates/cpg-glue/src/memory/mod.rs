//! An in-memory corosync-like cluster with the same virtual-synchrony rules as CPG, for
//! deterministic tests of everything above cpg-glue.
//!
//! [`MemoryCluster`] holds N nodes. Processes join groups on a node
//! ([`MemoryCluster::join`] gives a [`MemoryGroup`], which implements [`Group`]; with
//! [`MemoryCluster::request_join`] the join is delivered later, so other events can come
//! first); the network can be split and healed, nodes killed, stopped, bounced and
//! restarted, expected votes changed, and every process observes what corosync would
//! deliver: per partition one total order of confchgs and frames, the transition order of
//! exec/cpg.c, ring seqs as totemsrp makes them (the same on both sides of a split),
//! votequorum's rules. See [`model`] for the rules and where they come from.
//!
//! The rules live in the pure [`model::Model`]; this shell applies each operation under one
//! mutex and pushes the resulting raw events into per-process unbounded queues, so an
//! operation is atomic and every member sees it at the same point of its stream. Messages
//! travel as frames ([`crate::fragment`]), one model operation per frame, and each stream
//! reassembles them exactly as the corosync stream does, so a membership change can cut a
//! message here too (set a small frame size with [`MemoryCluster::set_max_frame_size`]).

pub mod model;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use std::sync::atomic::{AtomicU64, Ordering};

use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures::Stream;

use crate::fragment::split_into_frames_in_view;
use crate::inbox::{Inbox, RawEvent, Receipts};
#[cfg(feature = "testkit")]
use crate::testkit::TestCluster;
use crate::{
    Group, GroupError, GroupEvent, GroupSender, Member, NodeId, Quorum, QuorumEvent, Reason,
    Receipt, TotemConfChg,
};
use model::{Model, Output};

type GroupItem = Result<GroupEvent, GroupError>;
type RawItem = Result<RawEvent, GroupError>;
type QuorumItem = Result<QuorumEvent, GroupError>;

/// The queue of one live process.
struct ProcessQueue {
    group: String,
    events: UnboundedSender<RawItem>,
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

    /// Start a new process on `node` and join `group`; the join is delivered at once.
    /// Fails with `NotRunning` if the node is down, `Invalid` for an unknown node or a bad
    /// group name.
    pub fn join(&self, node: NodeId, group: &str) -> Result<MemoryGroup, GroupError> {
        let handle = self.request_join(node, group)?;
        self.deliver_join(handle.local)?;
        Ok(handle)
    }

    /// Start a new process on `node` that asks to join `group`; its join confchg comes
    /// with [`MemoryCluster::deliver_join`] (or its first send, or its leave), so other
    /// events, such as its initial totem confchg, can reach it first.
    pub fn request_join(&self, node: NodeId, group: &str) -> Result<MemoryGroup, GroupError> {
        let mut state = self.shared.lock();
        let member = state.model.request_join(node, group)?;
        let (tx, rx) = unbounded();
        state.processes.insert(
            member,
            ProcessQueue {
                group: group.to_owned(),
                events: tx,
            },
        );
        let receipts = Receipts::new(group);
        let view = Arc::new(AtomicU64::new(0));
        let max_message = state.model.max_message_size();
        Ok(MemoryGroup {
            shared: self.shared.clone(),
            local: member,
            name: group.to_owned(),
            events: rx,
            inbox: Inbox::new(member, group, max_message, receipts.clone(), view.clone()),
            sending: Arc::new(SendState {
                next_message_id: AtomicU64::new(0),
                order: futures::lock::Mutex::new(()),
                receipts,
                view,
            }),
            departed: false,
            ended: false,
        })
    }

    /// Delivers the join of `member` (and any older join request of its node).
    pub fn deliver_join(&self, member: Member) -> Result<(), GroupError> {
        let mut state = self.shared.lock();
        let outputs = state.model.deliver_join(member)?;
        state.route(outputs);
        Ok(())
    }

    /// Processes whose join was requested and not yet delivered, oldest first.
    pub fn pending_joins(&self) -> Vec<Member> {
        self.shared.lock().model.pending_joins()
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
        self.apply(|model| model.kill(node))
    }

    /// Stop corosync on `node` gracefully; `departures_sent` says whether its processes'
    /// `ProcDown` reached the others before it left (see [`Model::stop`]).
    pub fn stop_node(&self, node: NodeId, departures_sent: bool) -> Result<(), GroupError> {
        self.apply(|model| model.stop(node, departures_sent))
    }

    /// Corosync on `node` restarts before the others noticed; `with_heal` also reconnects
    /// every side in the same transition (see [`Model::bounce`]).
    pub fn bounce_node(&self, node: NodeId, with_heal: bool) -> Result<(), GroupError> {
        self.apply(|model| model.bounce(node, with_heal))
    }

    /// Start corosync on a killed `node` again (with no processes); it merges into the
    /// nodes of its network side.
    pub fn restart_node(&self, node: NodeId) -> Result<(), GroupError> {
        self.apply(|model| model.restart(node))
    }

    /// `corosync-quorumtool -e votes` on `node` (see [`Model::set_expected_votes`]).
    pub fn set_expected_votes(&self, node: NodeId, votes: usize) -> Result<(), GroupError> {
        self.apply(|model| model.set_expected_votes(node, votes))
    }

    fn apply(
        &self,
        op: impl FnOnce(&mut Model) -> Result<Vec<Output>, GroupError>,
    ) -> Result<(), GroupError> {
        let mut state = self.shared.lock();
        let outputs = op(&mut state.model)?;
        state.route(outputs);
        Ok(())
    }

    /// Payloads longer than `max` bytes are refused with `MessageTooLarge`.
    pub fn set_max_message_size(&self, max: usize) {
        self.shared.lock().model.set_max_message_size(max);
    }

    /// The largest message a group carries.
    pub fn max_message_size(&self) -> usize {
        self.shared.lock().model.max_message_size()
    }

    /// Messages are split into frames of at most `max` bytes (header included); each
    /// frame is one step of the cluster, so membership changes can fall between them.
    pub fn set_max_frame_size(&self, max: usize) -> Result<(), GroupError> {
        self.shared.lock().model.set_max_frame_size(max)
    }
}

/// What the senders of one process share: message ids, per-message frame order, receipts.
struct SendState {
    next_message_id: AtomicU64,
    /// Held for all frames of one message, so a sender's messages never interleave.
    order: futures::lock::Mutex<()>,
    receipts: Arc<Receipts>,
    /// The view the process's stream is in; frames are tagged with it.
    view: Arc<AtomicU64>,
}

/// One process's membership of a group in a [`MemoryCluster`]. Dropping it without
/// [`Group::leave`] is a process death: the others see [`Reason::ProcDown`].
pub struct MemoryGroup {
    shared: Arc<Shared>,
    local: Member,
    name: String,
    events: UnboundedReceiver<RawItem>,
    inbox: Inbox,
    sending: Arc<SendState>,
    departed: bool,
    ended: bool,
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
        self.inbox.close("the process left the group");
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
        let this = &mut *self;
        {
            // Joins requested with `request_join` (or through `TestCluster::join`) are
            // delivered, in request order, when any process next reads its stream: joins
            // requested together race as on corosync, and some processes see the ring
            // before their own join confchg.
            let mut state = this.shared.lock();
            for member in state.model.pending_joins() {
                if let Ok(outputs) = state.model.deliver_join(member) {
                    state.route(outputs);
                }
            }
        }
        loop {
            if let Some(event) = this.inbox.pop() {
                return Poll::Ready(Some(Ok(event)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.events).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(raw))) => this.inbox.push(raw),
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    this.inbox.close("the node's corosync was killed");
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    this.inbox.close("the group stream ended");
                }
            }
        }
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
            sending: self.sending.clone(),
        }
    }

    async fn leave(mut self) -> Result<(), GroupError> {
        self.depart(Reason::Leave)
    }
}

/// Multicasts for a [`MemoryGroup`]; works until the process leaves, dies or its node is
/// killed, then fails with `Disconnected`. A message goes out one frame per poll (the
/// future yields between frames), so other operations can fall between its frames.
#[derive(Clone)]
pub struct MemorySender {
    shared: Arc<Shared>,
    local: Member,
    group: Arc<str>,
    sending: Arc<SendState>,
}

impl std::fmt::Debug for MemorySender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySender")
            .field("local", &self.local)
            .field("group", &self.group)
            .finish()
    }
}

impl MemorySender {
    async fn send(self, payload: Vec<u8>) -> Result<Receipt, GroupError> {
        let (max_message, max_frame) = {
            let state = self.shared.lock();
            (state.model.max_message_size(), state.model.max_frame_size())
        };
        if payload.len() > max_message {
            return Err(GroupError::MessageTooLarge {
                size: payload.len(),
                max: max_message,
            });
        }
        let _in_order = self.sending.order.lock().await;
        let id = self.sending.next_message_id.fetch_add(1, Ordering::Relaxed);
        let view = self.sending.view.load(Ordering::Acquire);
        let frames = split_into_frames_in_view(id, view, &payload, max_frame)
            .map_err(|why| GroupError::Invalid(format!("cannot fragment message: {why}")))?;
        let receipt = self.sending.receipts.register(id)?;
        let last = frames.len() - 1;
        for (index, frame) in frames.into_iter().enumerate() {
            let sent = {
                let mut state = self.shared.lock();
                state
                    .model
                    .mcast_frame(self.local, &self.group, frame)
                    .map(|outputs| state.route(outputs))
            };
            if let Err(e) = sent {
                self.sending.receipts.forget(id);
                return Err(e);
            }
            if index < last {
                YieldOnce(false).await;
            }
        }
        Ok(receipt)
    }
}

/// Returns `Pending` once (waking itself at once), so other work runs in between.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl GroupSender for MemorySender {
    fn mcast(&self, payload: Vec<u8>) -> impl Future<Output = Result<Receipt, GroupError>> + Send {
        self.clone().send(payload)
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

#[cfg(feature = "testkit")]
impl TestCluster for MemoryCluster {
    type G = MemoryGroup;
    type Q = MemoryQuorum;

    fn nodes(&self) -> Vec<NodeId> {
        MemoryCluster::nodes(self)
    }

    /// Like `cpg_join`: the join is requested; it is delivered when a process next reads
    /// its stream (or this one sends or leaves), so joins made together race as on
    /// corosync.
    fn join(
        &self,
        node: NodeId,
        group: &str,
    ) -> impl Future<Output = Result<MemoryGroup, GroupError>> + Send {
        std::future::ready(MemoryCluster::request_join(self, node, group))
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
    fn settle(&self) -> std::time::Duration {
        std::time::Duration::from_secs(5)
    }

    fn set_expected_votes(
        &self,
        node: NodeId,
        votes: u32,
    ) -> impl Future<Output = Result<(), String>> + Send {
        std::future::ready(
            MemoryCluster::set_expected_votes(self, node, votes as usize)
                .map_err(|e| e.to_string()),
        )
    }

    fn max_message_size(&self) -> Option<usize> {
        Some(MemoryCluster::max_message_size(self))
    }

    fn multi_frame_payload(&self) -> usize {
        let frame = self.shared.lock().model.max_frame_size();
        4 * (frame - crate::fragment::FRAME_HEADER_LEN)
    }
}
