//! The pure membership model behind [`super::MemoryCluster`]: nodes, network sides, totem
//! rings, votequorum, CPG processes. Every operation is applied in one step and returns the
//! [`Output`]s it causes, in order; the shell in `mod.rs` routes them to per-process queues.
//! Because each operation is one atomic step, every member of a partition observes the
//! same total order.
//!
//! The rules are corosync 3's (exec/cpg.c, exec/totemsrp.c, exec/votequorum.c):
//! * **Rings.** A new ring's id is the lowest node id of the ring and the highest seq any of
//!   its members had, plus 4 (totemsrp's `memb_state_commit_token_create`). Both halves of
//!   a split therefore get the *same* seq; a node keeps its seq across a restart (corosync
//!   persists it in `ringid_<nodeid>` and adds 1 at start). Real corosync can also skip
//!   seqs (a failed ring attempt burns 4); nothing may rely on the exact step.
//! * **Transitions.** On a ring change each joined process first gets a confchg with the
//!   processes of vanished nodes (`NodeDown`), then one with the processes of merged nodes
//!   (`NodeUp`), then the totem confchg, last. A node whose corosync restarted before the
//!   others noticed (a *bounce*) comes back with a new ring id of its own, so it is in the
//!   downlist: its old processes go with `NodeDown` although the node is in the new ring
//!   (exec/cpg.c's joinlist zombie removal, a `ProcDown` in the transition, is practically
//!   unreachable and not modelled; the suite still accepts it). Every connected process gets
//!   that totem confchg, joined or not yet; one whose join is still on its way can get the
//!   same ring twice (the initial totem confchg and this one).
//! * **Joins are two steps.** A join request makes the process known on its node
//!   ([`Model::request_join`]); its join message is delivered later, in per-node FIFO
//!   order ([`Model::deliver_join`]). The first join or leave a node delivers in *any*
//!   group after a process asked to join sends that process the initial totem confchg
//!   (`CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF`): after its own join confchg if that is the
//!   first, before it if another one came first.
//! * **Messages** are frames ([`crate::fragment`]): each frame is delivered atomically, a
//!   message's frames can be separated by membership changes.
//! * **Quorum**: one vote per node; quorate iff the partition's votes reach
//!   `expected_votes / 2 + 1`. Expected votes start at the number of configured nodes and
//!   can be changed on a running partition ([`Model::set_expected_votes`], as
//!   `corosync-quorumtool -e` does), which can flip quorum without a ring change.
//! * **Leaving the cluster**: a killed node's processes vanish and the others see
//!   `NodeDown`. A graceful stop ([`Model::stop`]) disconnects the node's processes first;
//!   their `ProcDown` messages reach the others only if the token passed before corosync
//!   left, so the others see either `ProcDown` then a ring without the node, or `NodeDown`.

use std::collections::{BTreeMap, BTreeSet};

use crate::inbox::RawEvent;
use crate::{
    ConfChg, GroupError, Member, MemberChange, NodeId, QuorumEvent, Reason, RingId, TotemConfChg,
};

/// Longest group name corosync accepts (`CPG_MAX_NAME_LENGTH`).
pub const CPG_MAX_NAME_LENGTH: usize = 128;

/// Default payload limit, the same cap the corosync implementation enforces.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Default frame size (header included), of the order of corosync's atomic message size.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 1 << 20;

/// How much corosync raises the ring seq at each new ring (totemsrp's commit token).
pub const RING_SEQ_STEP: u64 = 4;

/// The first fake pid handed out; any value works, a non-tiny one reads like a pid.
const FIRST_PID: u32 = 1000;

/// Something an operation caused, for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// An event for one process's group stream.
    Group {
        /// The process.
        to: Member,
        /// The event.
        event: RawEvent,
    },
    /// The process vanished with its node: its stream ends with `Disconnected`.
    ProcessLost {
        /// The process.
        member: Member,
    },
    /// A quorum change for every quorum follower on `node`.
    Quorum {
        /// The node.
        node: NodeId,
        /// The new quorum state.
        event: QuorumEvent,
    },
    /// The node died: its quorum followers end with `Disconnected`.
    NodeLost {
        /// The node.
        node: NodeId,
    },
}

#[derive(Debug, Clone)]
struct NodeState {
    /// Whether corosync runs on the node.
    up: bool,
    /// Network side label: up nodes with equal labels reach each other.
    side: usize,
    /// The node's current totem ring; `Some` exactly when the node is up.
    ring: Option<TotemConfChg>,
    /// The highest ring seq this node has been in, kept across restarts.
    seq: u64,
    /// Votequorum's expected votes as this node knows them.
    expected_votes: usize,
    /// Whether the node's partition was quorate at its last quorum event.
    quorate: bool,
}

/// One CPG connection that asked to join a group.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Process {
    group: String,
    /// Its join was delivered (corosync's `CPD_STATE_JOIN_COMPLETED`).
    joined: bool,
    /// Order of the join request on its node, for per-node FIFO delivery.
    request: u64,
    /// The initial totem confchg was sent (`initial_totem_conf_sent`).
    initial_totem_sent: bool,
}

/// Processes by identity.
type Processes = BTreeMap<Member, Process>;

/// The whole cluster's membership state.
#[derive(Debug, Clone)]
pub struct Model {
    nodes: BTreeMap<NodeId, NodeState>,
    processes: Processes,
    next_pid: u32,
    next_request: u64,
    max_message_size: usize,
    max_frame_size: usize,
}

impl Model {
    /// A cluster of `nodes`, all up and connected in one ring.
    pub fn new(nodes: &[NodeId]) -> Result<Self, GroupError> {
        if nodes.is_empty() {
            return Err(GroupError::Invalid(
                "a cluster needs at least one node".into(),
            ));
        }
        let mut map = BTreeMap::new();
        for &node in nodes {
            let state = NodeState {
                up: true,
                side: 0,
                ring: None,
                // corosync loads the stored seq (0 when there is none) and adds 1.
                seq: 1,
                expected_votes: nodes.len(),
                quorate: false,
            };
            if map.insert(node, state).is_some() {
                return Err(GroupError::Invalid(format!("node {node} is listed twice")));
            }
        }
        let mut model = Model {
            nodes: map,
            processes: BTreeMap::new(),
            next_pid: FIRST_PID,
            next_request: 0,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
        };
        // Nobody follows anything yet, so the outputs of the first ring go nowhere.
        let none = model.processes.clone();
        model.reform_rings(&none, &BTreeSet::new());
        Ok(model)
    }

    /// Configured node ids, sorted.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// Whether `node` is up (in some ring).
    pub fn is_up(&self, node: NodeId) -> bool {
        self.nodes.get(&node).is_some_and(|n| n.up)
    }

    /// The node's current ring, `None` if the node is down or unknown.
    pub fn ring(&self, node: NodeId) -> Option<&TotemConfChg> {
        self.nodes.get(&node).and_then(|n| n.ring.as_ref())
    }

    /// The largest message a group carries.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// Sets the largest message a group carries (to test fragmenting senders).
    pub fn set_max_message_size(&mut self, max: usize) {
        self.max_message_size = max;
    }

    /// Largest frame (header included) a message is split into.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }

    /// Sets the frame size; small frames make tests see messages cut by membership changes.
    pub fn set_max_frame_size(&mut self, max: usize) -> Result<(), GroupError> {
        if max <= crate::fragment::FRAME_HEADER_LEN {
            return Err(GroupError::Invalid(format!(
                "frame size {max} leaves no room after the {}-byte header",
                crate::fragment::FRAME_HEADER_LEN
            )));
        }
        self.max_frame_size = max;
        Ok(())
    }

    /// Whether `member` is a live process whose join to `group` was delivered.
    pub fn is_member(&self, member: Member, group: &str) -> bool {
        self.processes
            .get(&member)
            .is_some_and(|p| p.joined && p.group == group)
    }

    /// Whether `member` asked to join and its join is not delivered yet.
    pub fn is_joining(&self, member: Member) -> bool {
        self.processes.get(&member).is_some_and(|p| !p.joined)
    }

    /// The membership of `group` as `node` sees it (joined processes on nodes of its ring).
    pub fn view(&self, node: NodeId, group: &str) -> Vec<Member> {
        match self.ring(node) {
            Some(ring) => view_in(&self.processes, group, &ring.members)
                .into_iter()
                .collect(),
            None => Vec::new(),
        }
    }

    /// Votequorum's state on `node`.
    pub fn quorum_state(&self, node: NodeId) -> Result<QuorumEvent, GroupError> {
        let ring = self.running_ring(node, "quorum")?.clone();
        Ok(self.quorum_event(node, &ring))
    }

    fn quorum_event(&self, node: NodeId, ring: &TotemConfChg) -> QuorumEvent {
        let expected = self
            .nodes
            .get(&node)
            .map_or(self.nodes.len(), |n| n.expected_votes);
        QuorumEvent {
            quorate: quorate(ring.members.len(), expected),
            ring: ring.ring,
            members: ring.members.clone(),
        }
    }

    /// The ring of a node that must be running; names the node and service otherwise.
    fn running_ring(
        &self,
        node: NodeId,
        service: &'static str,
    ) -> Result<&TotemConfChg, GroupError> {
        let state = self
            .nodes
            .get(&node)
            .ok_or_else(|| GroupError::Invalid(format!("node {node} is not in this cluster")))?;
        state.ring.as_ref().ok_or_else(|| GroupError::NotRunning {
            service,
            detail: format!("in-memory node {node} is down"),
        })
    }

    /// A new process on `node` asks to join `group`; nothing is delivered yet.
    pub fn request_join(&mut self, node: NodeId, group: &str) -> Result<Member, GroupError> {
        if group.is_empty() || group.len() > CPG_MAX_NAME_LENGTH {
            return Err(GroupError::Invalid(format!(
                "group name must be 1 to {CPG_MAX_NAME_LENGTH} bytes, got {} bytes",
                group.len()
            )));
        }
        self.running_ring(node, "cpg")?;
        let member = Member {
            node,
            pid: self.next_pid,
        };
        self.next_pid = self.next_pid.wrapping_add(1).max(FIRST_PID);
        self.processes.insert(
            member,
            Process {
                group: group.to_owned(),
                joined: false,
                request: self.next_request,
                initial_totem_sent: false,
            },
        );
        self.next_request += 1;
        Ok(member)
    }

    /// A new process on `node` joins `group` at once (request and delivery in one step).
    pub fn join(&mut self, node: NodeId, group: &str) -> Result<(Member, Vec<Output>), GroupError> {
        let member = self.request_join(node, group)?;
        let out = self.deliver_join(member)?;
        Ok((member, out))
    }

    /// Delivers the join of `member`, after every older join request of its node (totem
    /// keeps each node's messages in order). Delivering an already delivered join does
    /// nothing.
    pub fn deliver_join(&mut self, member: Member) -> Result<Vec<Output>, GroupError> {
        let Some(target) = self.processes.get(&member) else {
            return Err(GroupError::Invalid(format!(
                "process {member} is not connected"
            )));
        };
        let upto = target.request;
        let due: Vec<Member> = self
            .local_processes(member.node)
            .filter(|(_, p)| !p.joined && p.request <= upto)
            .map(|(m, p)| (p.request, m))
            .collect::<BTreeMap<u64, Member>>()
            .into_values()
            .collect();
        let mut out = Vec::new();
        for m in due {
            self.deliver_one_join(m, &mut out);
        }
        Ok(out)
    }

    /// Members whose join is requested and not yet delivered, oldest first per node.
    pub fn pending_joins(&self) -> Vec<Member> {
        let mut pending: Vec<(u64, Member)> = self
            .processes
            .iter()
            .filter(|(_, p)| !p.joined)
            .map(|(m, p)| (p.request, *m))
            .collect();
        pending.sort();
        pending.into_iter().map(|(_, m)| m).collect()
    }

    fn deliver_one_join(&mut self, member: Member, out: &mut Vec<Output>) {
        let Some(ring) = self.ring(member.node).cloned() else {
            return;
        };
        let Some(process) = self.processes.get_mut(&member) else {
            return;
        };
        process.joined = true;
        let group = process.group.clone();
        let view = view_in(&self.processes, &group, &ring.members);
        let confchg = ConfChg {
            members: view.iter().copied().collect(),
            left: Vec::new(),
            joined: vec![MemberChange {
                member,
                reason: Reason::Join,
            }],
        };
        for &to in &view {
            out.push(Output::Group {
                to,
                event: RawEvent::ConfChg(confchg.clone()),
            });
        }
        self.send_initial_totems(&ring, out);
    }

    /// After a join or leave is delivered in any group: every process on the ring's nodes
    /// that has not had its initial totem confchg gets it now (exec/cpg.c,
    /// `notify_lib_joinlist`).
    fn send_initial_totems(&mut self, ring: &TotemConfChg, out: &mut Vec<Output>) {
        for (member, process) in self.processes.iter_mut() {
            if !process.initial_totem_sent && ring.members.contains(&member.node) {
                process.initial_totem_sent = true;
                out.push(Output::Group {
                    to: *member,
                    event: RawEvent::Totem(ring.clone()),
                });
            }
        }
    }

    fn local_processes(&self, node: NodeId) -> impl Iterator<Item = (Member, &Process)> {
        self.processes
            .range(
                Member { node, pid: 0 }..=Member {
                    node,
                    pid: u32::MAX,
                },
            )
            .map(|(m, p)| (*m, p))
    }

    /// `member` leaves its group (`Reason::Leave`) or dies (`Reason::ProcDown`). A
    /// process whose join is still on its way has it delivered first (corosync answers a
    /// leave then with `CS_ERR_BUSY` until the join is through; a dying process's join is
    /// already in the ring). `None` if it is no longer a process (its node was killed, or
    /// it departed already).
    pub fn depart(&mut self, member: Member, reason: Reason) -> Option<Vec<Output>> {
        let mut out = Vec::new();
        if self.is_joining(member) {
            out = self.deliver_join(member).ok()?;
        }
        let process = self.processes.remove(&member)?;
        let ring = self.ring(member.node)?.clone();
        let view = view_in(&self.processes, &process.group, &ring.members);
        let confchg = ConfChg {
            members: view.iter().copied().collect(),
            left: vec![MemberChange { member, reason }],
            joined: Vec::new(),
        };
        for to in view {
            out.push(Output::Group {
                to,
                event: RawEvent::ConfChg(confchg.clone()),
            });
        }
        self.send_initial_totems(&ring, &mut out);
        Some(out)
    }

    /// Agreed multicast of one frame: delivered to every joined member of `group` in the
    /// sender's partition, the sender included. A sender whose join is still on its way
    /// has its node's older joins delivered first (they precede the frame on the ring).
    pub fn mcast_frame(
        &mut self,
        from: Member,
        group: &str,
        frame: Vec<u8>,
    ) -> Result<Vec<Output>, GroupError> {
        let disconnected = || GroupError::Disconnected {
            group: group.to_owned(),
            detail: format!("process {from} is no longer a member"),
        };
        let process = self.processes.get(&from).ok_or_else(disconnected)?;
        if process.group != group {
            return Err(disconnected());
        }
        let mut out = Vec::new();
        if !process.joined {
            out = self.deliver_join(from)?;
        }
        let ring = self.ring(from.node).ok_or_else(disconnected)?;
        for to in view_in(&self.processes, group, &ring.members) {
            out.push(Output::Group {
                to,
                event: RawEvent::Frame {
                    from,
                    data: frame.clone(),
                },
            });
        }
        Ok(out)
    }

    /// Split the network: each slice is one side; nodes in no slice are alone.
    pub fn partition(&mut self, sides: &[Vec<NodeId>]) -> Result<Vec<Output>, GroupError> {
        let mut labels: BTreeMap<NodeId, usize> = BTreeMap::new();
        for (label, side) in sides.iter().enumerate() {
            for &node in side {
                if !self.nodes.contains_key(&node) {
                    return Err(GroupError::Invalid(format!(
                        "partition names node {node}, which is not in this cluster"
                    )));
                }
                if labels.insert(node, label).is_some() {
                    return Err(GroupError::Invalid(format!(
                        "partition names node {node} more than once"
                    )));
                }
            }
        }
        let mut next_alone = sides.len();
        for (node, state) in &mut self.nodes {
            state.side = match labels.get(node) {
                Some(&label) => label,
                None => {
                    next_alone += 1;
                    next_alone
                }
            };
        }
        let old = self.processes.clone();
        Ok(self.reform_rings(&old, &BTreeSet::new()))
    }

    /// Reconnect every node with every other.
    pub fn heal(&mut self) -> Vec<Output> {
        for state in self.nodes.values_mut() {
            state.side = 0;
        }
        let old = self.processes.clone();
        self.reform_rings(&old, &BTreeSet::new())
    }

    /// Corosync on `node` dies: its processes and followers are gone, the others see
    /// `NodeDown`.
    pub fn kill(&mut self, node: NodeId) -> Result<Vec<Output>, GroupError> {
        self.running_ring(node, "corosync")
            .map_err(|_| GroupError::Invalid(format!("node {node} is not up")))?;
        let old = self.processes.clone();
        let mut out = self.take_down(node);
        out.extend(self.reform_rings(&old, &BTreeSet::new()));
        Ok(out)
    }

    /// Corosync on `node` stops gracefully (`systemctl stop corosync`). It disconnects its
    /// processes first and multicasts their departures; if `departures_sent` (the token
    /// passed in time) the others see each one go with `ProcDown`, then a ring without the
    /// node; otherwise the departures are lost and the others see `NodeDown`, as after a
    /// kill. exec/service.c unloads services before totem leaves; both outcomes occur.
    pub fn stop(&mut self, node: NodeId, departures_sent: bool) -> Result<Vec<Output>, GroupError> {
        self.running_ring(node, "corosync")
            .map_err(|_| GroupError::Invalid(format!("node {node} is not up")))?;
        let mut out = Vec::new();
        let local: Vec<Member> = self.local_processes(node).map(|(m, _)| m).collect();
        for member in local.into_iter().filter(|_| departures_sent) {
            if let Some(departure) = self.depart(member, Reason::ProcDown) {
                out.extend(departure);
            }
            out.push(Output::ProcessLost { member });
        }
        let old = self.processes.clone();
        out.extend(self.take_down(node));
        out.extend(self.reform_rings(&old, &BTreeSet::new()));
        Ok(out)
    }

    /// Corosync on `node` dies and starts again before the others noticed (within the
    /// token timeout): its processes vanish. The restarted corosync forms a ring id of its
    /// own (totemsrp), so it is not in the transitional membership and lands in the
    /// downlist: the others see its old processes go with `NodeDown` in the transition
    /// whose totem confchg still lists the node. `with_heal` also reconnects every side in
    /// the same transition (a merge's `NodeUp` confchg then follows).
    pub fn bounce(&mut self, node: NodeId, with_heal: bool) -> Result<Vec<Output>, GroupError> {
        self.running_ring(node, "corosync")
            .map_err(|_| GroupError::Invalid(format!("node {node} is not up")))?;
        if with_heal {
            for state in self.nodes.values_mut() {
                state.side = 0;
            }
        }
        let old = self.processes.clone();
        let mut out = Vec::new();
        let local: Vec<Member> = self.local_processes(node).map(|(m, _)| m).collect();
        for member in local {
            self.processes.remove(&member);
            out.push(Output::ProcessLost { member });
        }
        // Its quorum followers lose their connection, as with any corosync exit.
        out.push(Output::NodeLost { node });
        let bounced = BTreeSet::from([node]);
        out.extend(self.reform_rings(&old, &bounced));
        Ok(out)
    }

    /// Marks `node` down; its processes vanish. Returns what that causes on the node.
    fn take_down(&mut self, node: NodeId) -> Vec<Output> {
        let mut out: Vec<Output> = Vec::new();
        self.processes.retain(|member, _| {
            if member.node == node {
                out.push(Output::ProcessLost { member: *member });
                false
            } else {
                true
            }
        });
        if let Some(state) = self.nodes.get_mut(&node) {
            state.up = false;
            state.ring = None;
        }
        out.push(Output::NodeLost { node });
        out
    }

    /// Corosync starts again on a killed or stopped `node` (with no processes, its ring
    /// seq kept); it merges into the nodes of its network side.
    pub fn restart(&mut self, node: NodeId) -> Result<Vec<Output>, GroupError> {
        let configured = self.nodes.len();
        let state = self
            .nodes
            .get_mut(&node)
            .ok_or_else(|| GroupError::Invalid(format!("node {node} is not in this cluster")))?;
        if state.up {
            return Err(GroupError::Invalid(format!("node {node} is already up")));
        }
        state.up = true;
        state.expected_votes = configured;
        let old = self.processes.clone();
        Ok(self.reform_rings(&old, &BTreeSet::new()))
    }

    /// `corosync-quorumtool -e votes` run on `node`: every node of its partition takes the
    /// new expected votes, and quorum is recomputed on the same ring. Votequorum
    /// (`message_handler_req_lib_votequorum_setexpected`) refuses expected votes below the
    /// partition's own votes, and on a quorate partition any value whose quorum would
    /// exceed its votes (so this can make a partition quorate, never unquorate).
    pub fn set_expected_votes(
        &mut self,
        node: NodeId,
        votes: usize,
    ) -> Result<Vec<Output>, GroupError> {
        let ring = self.running_ring(node, "quorum")?.clone();
        let total = ring.members.len();
        if votes == 0 || votes < total {
            return Err(GroupError::Invalid(format!(
                "expected votes {votes} is below the {total} votes of node {node}'s partition"
            )));
        }
        if self.quorum_event(node, &ring).quorate && !quorate(total, votes) {
            return Err(GroupError::Invalid(format!(
                "expected votes {votes} would take quorum from node {node}'s quorate partition of {total} votes"
            )));
        }
        let mut out = Vec::new();
        for &member in &ring.members {
            if let Some(state) = self.nodes.get_mut(&member) {
                state.expected_votes = votes;
            }
            let event = self.quorum_event(member, &ring);
            if let Some(state) = self.nodes.get_mut(&member) {
                if state.quorate != event.quorate {
                    state.quorate = event.quorate;
                    out.push(Output::Quorum {
                        node: member,
                        event,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Form a new ring for every set of connected up nodes whose ring no longer matches
    /// (or that holds a node in `bounced`), and emit each affected process's transition.
    /// `old` is the process table before the operation (it still holds the processes of
    /// a node killed or bounced by it).
    fn reform_rings(&mut self, old: &Processes, bounced: &BTreeSet<NodeId>) -> Vec<Output> {
        let mut components: BTreeMap<usize, Vec<NodeId>> = BTreeMap::new();
        for (&node, state) in &self.nodes {
            if state.up {
                components.entry(state.side).or_default().push(node);
            }
        }
        let mut out = Vec::new();
        for members in components.into_values() {
            let unchanged = members
                .iter()
                .all(|node| self.ring(*node).is_some_and(|ring| ring.members == members))
                && !members.iter().any(|n| bounced.contains(n));
            let Some(&lowest) = members.first() else {
                continue;
            };
            if unchanged {
                continue;
            }
            let seq = members
                .iter()
                .filter_map(|n| self.nodes.get(n))
                .map(|n| n.seq)
                .max()
                .unwrap_or(0)
                + RING_SEQ_STEP;
            let expected = members
                .iter()
                .filter_map(|n| self.nodes.get(n))
                .map(|n| n.expected_votes)
                .max()
                .unwrap_or(self.nodes.len());
            let ring = TotemConfChg {
                ring: RingId { node: lowest, seq },
                members: members.clone(),
            };
            for &node in &members {
                let old_nodes = self
                    .ring(node)
                    .map(|r| r.members.clone())
                    .unwrap_or_default();
                self.transition(node, old, &old_nodes, &ring, &mut out);
                let Some(state) = self.nodes.get_mut(&node) else {
                    continue;
                };
                state.ring = Some(ring.clone());
                state.seq = seq;
                state.expected_votes = expected;
                let event = self.quorum_event(node, &ring);
                if let Some(state) = self.nodes.get_mut(&node) {
                    state.quorate = event.quorate;
                }
                out.push(Output::Quorum { node, event });
            }
        }
        out
    }

    /// The events of one ring change for every process on `node`: per group the NodeDown
    /// confchg (processes of nodes that left or bounced), the NodeUp confchg; then, if any group of
    /// the cluster changed, the initial totem confchg for processes still waiting for it
    /// (exec/cpg.c calls `notify_lib_joinlist` for every changed group); then the totem
    /// confchg, which every connected process of the node gets.
    fn transition(
        &mut self,
        node: NodeId,
        old: &Processes,
        old_nodes: &[NodeId],
        ring: &TotemConfChg,
        out: &mut Vec<Output>,
    ) {
        let local: Vec<(Member, String, bool)> = self
            .local_processes(node)
            .map(|(m, p)| (m, p.group.clone(), p.joined))
            .collect();
        let groups: BTreeSet<String> = old
            .values()
            .chain(self.processes.values())
            .filter(|p| p.joined)
            .map(|p| p.group.clone())
            .collect();
        let mut any_group_changed = false;
        for group in &groups {
            let before = view_in(old, group, old_nodes);
            let after = view_in(&self.processes, group, &ring.members);
            // Processes of nodes that left the ring, or that restarted (bounced) and so
            // were in the downlist although they are in the new ring.
            let down: BTreeSet<Member> = before
                .iter()
                .copied()
                .filter(|m| !ring.members.contains(&m.node) || !after.contains(m))
                .collect();
            let joined: Vec<MemberChange> = after
                .difference(&before)
                .map(|&member| MemberChange {
                    member,
                    reason: Reason::NodeUp,
                })
                .collect();
            let mut view: BTreeSet<Member> = before.clone();
            let mut events = Vec::new();
            if !down.is_empty() {
                view.retain(|m| !down.contains(m));
                events.push(RawEvent::ConfChg(ConfChg {
                    members: view.iter().copied().collect(),
                    left: changes(&down, Reason::NodeDown),
                    joined: Vec::new(),
                }));
            }
            if !joined.is_empty() {
                view.extend(joined.iter().map(|c| c.member));
                events.push(RawEvent::ConfChg(ConfChg {
                    members: view.iter().copied().collect(),
                    left: Vec::new(),
                    joined,
                }));
            }
            // A node whose own processes are gone (bounced) sees an empty view; what it
            // reports is the others' business.
            debug_assert!(
                view == after || before.iter().all(|m| m.node == node),
                "transition of group {group} on node {node}"
            );
            any_group_changed |= !events.is_empty();
            for (to, g, is_joined) in &local {
                if *is_joined && g == group {
                    for event in &events {
                        out.push(Output::Group {
                            to: *to,
                            event: event.clone(),
                        });
                    }
                }
            }
        }
        if any_group_changed {
            for (member, process) in self.processes.iter_mut() {
                if member.node == node && !process.initial_totem_sent {
                    process.initial_totem_sent = true;
                    out.push(Output::Group {
                        to: *member,
                        event: RawEvent::Totem(ring.clone()),
                    });
                }
            }
        }
        for (to, _, _) in &local {
            out.push(Output::Group {
                to: *to,
                event: RawEvent::Totem(ring.clone()),
            });
        }
    }
}

/// Votequorum: quorate iff the votes reach `expected / 2 + 1`.
fn quorate(votes: usize, expected: usize) -> bool {
    votes > expected / 2
}

fn changes(members: &BTreeSet<Member>, reason: Reason) -> Vec<MemberChange> {
    members
        .iter()
        .map(|&member| MemberChange { member, reason })
        .collect()
}

/// Joined processes of `group` on any of `nodes`.
fn view_in(processes: &Processes, group: &str, nodes: &[NodeId]) -> BTreeSet<Member> {
    processes
        .iter()
        .filter(|(m, p)| p.joined && p.group == group && nodes.contains(&m.node))
        .map(|(m, _)| *m)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(ids: &[u32]) -> Vec<NodeId> {
        ids.iter().copied().map(NodeId).collect()
    }

    /// The events for `to`, in order.
    fn for_member(out: &[Output], to: Member) -> Vec<RawEvent> {
        out.iter()
            .filter_map(|o| match o {
                Output::Group { to: t, event } if *t == to => Some(event.clone()),
                _ => None,
            })
            .collect()
    }

    fn ring_of(m: &Model, node: u32) -> TotemConfChg {
        m.ring(NodeId(node)).unwrap().clone()
    }

    #[test]
    fn first_ring_holds_every_node_led_by_the_lowest() {
        let m = Model::new(&ids(&[3, 1, 2])).unwrap();
        let ring = ring_of(&m, 2);
        assert_eq!(ring.members, ids(&[1, 2, 3]));
        assert_eq!(
            ring.ring,
            RingId {
                node: NodeId(1),
                seq: 1 + RING_SEQ_STEP
            }
        );
        assert!(m.quorum_state(NodeId(3)).unwrap().quorate);
    }

    #[test]
    fn join_tells_every_member_and_gives_the_joiner_the_ring_after_its_confchg() {
        let mut m = Model::new(&ids(&[1, 2])).unwrap();
        let (a, _) = m.join(NodeId(1), "g").unwrap();
        let (b, out) = m.join(NodeId(2), "g").unwrap();
        let join = RawEvent::ConfChg(ConfChg {
            members: vec![a, b],
            left: vec![],
            joined: vec![MemberChange {
                member: b,
                reason: Reason::Join,
            }],
        });
        assert_eq!(for_member(&out, a), vec![join.clone()]);
        assert_eq!(
            for_member(&out, b),
            vec![join, RawEvent::Totem(ring_of(&m, 2))]
        );
        // Another group is not told.
        let (c, out) = m.join(NodeId(1), "other").unwrap();
        assert!(for_member(&out, a).is_empty());
        assert_eq!(for_member(&out, c).len(), 2);
    }

    /// exec/cpg.c sends the initial totem confchg on the first join/leave delivered in any
    /// group after the join request: another process's join can be that one.
    #[test]
    fn initial_totem_can_come_before_the_own_join_confchg() {
        let mut m = Model::new(&ids(&[1, 2])).unwrap();
        let p = m.request_join(NodeId(1), "alpha").unwrap();
        let q = m.request_join(NodeId(2), "beta").unwrap();
        assert_eq!(m.pending_joins(), vec![p, q]);
        // q's join is delivered first: p, still joining, gets the ring now.
        let out = m.deliver_join(q).unwrap();
        assert_eq!(for_member(&out, p), vec![RawEvent::Totem(ring_of(&m, 1))]);
        assert_eq!(
            for_member(&out, q).len(),
            2,
            "q: own confchg, then the ring"
        );
        // p's own join then comes with no totem confchg after it.
        let out = m.deliver_join(p).unwrap();
        let events = for_member(&out, p);
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(matches!(&events[0], RawEvent::ConfChg(c) if c.joined[0].member == p));
        assert!(m.pending_joins().is_empty());
    }

    #[test]
    fn joins_of_one_node_are_delivered_in_request_order() {
        let mut m = Model::new(&ids(&[1])).unwrap();
        let a = m.request_join(NodeId(1), "g").unwrap();
        let b = m.request_join(NodeId(1), "g").unwrap();
        let out = m.deliver_join(b).unwrap();
        assert!(m.is_member(a, "g") && m.is_member(b, "g"));
        let first = for_member(&out, a);
        assert!(
            matches!(&first[0], RawEvent::ConfChg(c) if c.joined[0].member == a && c.members == vec![a]),
            "{first:?}"
        );
    }

    #[test]
    fn both_halves_of_a_split_get_the_same_seq_and_a_merge_goes_above_both() {
        let mut m = Model::new(&ids(&[1, 2, 3])).unwrap();
        let start = ring_of(&m, 1).ring.seq;
        m.partition(&[ids(&[1, 2]), ids(&[3])]).unwrap();
        let (major, minor) = (ring_of(&m, 1).ring, ring_of(&m, 3).ring);
        assert_eq!(major.seq, start + RING_SEQ_STEP);
        assert_eq!(
            minor.seq, major.seq,
            "corosync: highest seq known + 4 on both sides"
        );
        assert_eq!((major.node, minor.node), (NodeId(1), NodeId(3)));
        assert_ne!(major, minor);
        // The minority churns alone: its seq runs ahead of the majority's.
        m.partition(&[ids(&[1, 2])]).unwrap(); // same split, nothing changes
        assert_eq!(ring_of(&m, 3).ring.seq, minor.seq);
        m.bounce(NodeId(3), false).unwrap();
        assert_eq!(ring_of(&m, 3).ring.seq, minor.seq + RING_SEQ_STEP);
        m.heal();
        assert_eq!(ring_of(&m, 2).ring.seq, minor.seq + 2 * RING_SEQ_STEP);
    }

    #[test]
    fn a_restarted_node_keeps_its_seq() {
        let mut m = Model::new(&ids(&[1, 2, 3])).unwrap();
        m.partition(&[ids(&[1, 2]), ids(&[3])]).unwrap();
        m.bounce(NodeId(3), false).unwrap();
        m.bounce(NodeId(3), false).unwrap();
        let seq3 = ring_of(&m, 3).ring.seq;
        m.kill(NodeId(3)).unwrap();
        m.heal();
        m.restart(NodeId(3)).unwrap();
        assert_eq!(ring_of(&m, 1).ring.seq, seq3 + RING_SEQ_STEP);
    }

    #[test]
    fn kill_reports_lost_processes_then_the_survivors_transition_and_quorum() {
        let mut m = Model::new(&ids(&[1, 2, 3])).unwrap();
        let (a, _) = m.join(NodeId(1), "g").unwrap();
        let (c, _) = m.join(NodeId(3), "g").unwrap();
        let out = m.kill(NodeId(3)).unwrap();
        assert_eq!(out[0], Output::ProcessLost { member: c });
        assert_eq!(out[1], Output::NodeLost { node: NodeId(3) });
        let ring = ring_of(&m, 1);
        assert_eq!(ring.ring.seq, 1 + 2 * RING_SEQ_STEP);
        let events = for_member(&out, a);
        assert!(matches!(&events[0], RawEvent::ConfChg(cc)
            if cc.members == vec![a] && cc.left == vec![MemberChange { member: c, reason: Reason::NodeDown }]));
        assert_eq!(events[1], RawEvent::Totem(ring.clone()));
        assert!(out.contains(&Output::Quorum {
            node: NodeId(2),
            event: QuorumEvent {
                quorate: true,
                ring: ring.ring,
                members: ids(&[1, 2])
            },
        }));
        assert!(
            m.depart(c, Reason::ProcDown).is_none(),
            "a killed process is gone already"
        );
    }

    #[test]
    fn a_graceful_stop_shows_procdown_then_a_ring_without_the_node() {
        let mut m = Model::new(&ids(&[1, 2, 3])).unwrap();
        let (a, _) = m.join(NodeId(1), "g").unwrap();
        let (c, _) = m.join(NodeId(3), "g").unwrap();
        let out = m.stop(NodeId(3), true).unwrap();
        let events = for_member(&out, a);
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(&events[0], RawEvent::ConfChg(cc)
            if cc.left == vec![MemberChange { member: c, reason: Reason::ProcDown }]));
        assert!(matches!(&events[1], RawEvent::Totem(t) if t.members == ids(&[1, 2])));
        assert!(out.contains(&Output::ProcessLost { member: c }));

        // When the departures do not make it out, it looks like a kill.
        let (d, _) = m.join(NodeId(2), "g").unwrap();
        let out = m.stop(NodeId(2), false).unwrap();
        let events = for_member(&out, a);
        assert!(matches!(&events[0], RawEvent::ConfChg(cc)
            if cc.left == vec![MemberChange { member: d, reason: Reason::NodeDown }]));
    }

    #[test]
    fn a_joiner_waiting_across_a_ring_change_gets_the_ring_and_may_get_it_twice() {
        let mut m = Model::new(&ids(&[1, 2, 3])).unwrap();
        let (_a, _) = m.join(NodeId(1), "g").unwrap();
        let (_c, _) = m.join(NodeId(3), "g").unwrap();
        let p = m.request_join(NodeId(1), "h").unwrap();
        let out = m.partition(&[ids(&[1, 2]), ids(&[3])]).unwrap();
        let ring = ring_of(&m, 1);
        // Group g changed (NodeDown), so p gets its initial totem confchg and the
        // broadcast one: the same ring twice, and no confchg of its own yet.
        assert_eq!(
            for_member(&out, p),
            vec![RawEvent::Totem(ring.clone()), RawEvent::Totem(ring)]
        );
        let out = m.deliver_join(p).unwrap();
        assert_eq!(for_member(&out, p).len(), 1, "only its join confchg now");
    }

    /// A node whose corosync restarted within the token timeout forms a ring id of its
    /// own, so the others see its old processes go with NodeDown in a transition whose
    /// totem confchg still lists it (here merged with a heal: NodeDown, NodeUp, totem).
    #[test]
    fn a_bounce_shows_nodedown_for_a_node_still_in_the_ring() {
        let mut m = Model::new(&ids(&[1, 2, 3])).unwrap();
        let (a, _) = m.join(NodeId(1), "g").unwrap();
        let (b, _) = m.join(NodeId(2), "g").unwrap();
        m.partition(&[ids(&[1, 2]), ids(&[3])]).unwrap();
        let (c, _) = m.join(NodeId(3), "g").unwrap();
        let out = m.bounce(NodeId(2), true).unwrap();
        let events = for_member(&out, a);
        assert!(matches!(&events[0], RawEvent::ConfChg(cc)
            if cc.members == vec![a] && cc.left == vec![MemberChange { member: b, reason: Reason::NodeDown }]));
        assert!(matches!(&events[1], RawEvent::ConfChg(cc)
            if cc.members == vec![a, c] && cc.joined == vec![MemberChange { member: c, reason: Reason::NodeUp }]));
        assert!(matches!(events.last(), Some(RawEvent::Totem(t)) if t.members == ids(&[1, 2, 3])));
        assert_eq!(events.len(), 3);
        assert!(out.contains(&Output::ProcessLost { member: b }));
    }

    #[test]
    fn expected_votes_flip_quorum_on_the_same_ring() {
        let mut m = Model::new(&ids(&[1, 2, 3])).unwrap();
        m.partition(&[ids(&[1, 2]), ids(&[3])]).unwrap();
        let ring3 = ring_of(&m, 3).ring;
        assert!(!m.quorum_state(NodeId(3)).unwrap().quorate);
        assert!(m.set_expected_votes(NodeId(3), 0).is_err());
        let out = m.set_expected_votes(NodeId(3), 1).unwrap();
        assert_eq!(
            out,
            vec![Output::Quorum {
                node: NodeId(3),
                event: QuorumEvent {
                    quorate: true,
                    ring: ring3,
                    members: ids(&[3])
                }
            }]
        );
        // The majority was quorate and stays so: no event.
        assert!(m.set_expected_votes(NodeId(1), 3).unwrap().is_empty());
        // Votequorum never lets -e take quorum away from a quorate partition.
        assert!(m.set_expected_votes(NodeId(1), 5).is_err());
        assert!(m.quorum_state(NodeId(2)).unwrap().quorate);
    }

    #[test]
    fn an_unchanged_side_gets_no_new_ring() {
        let mut m = Model::new(&ids(&[1, 2, 3])).unwrap();
        m.partition(&[ids(&[1, 2])]).unwrap();
        let seq = ring_of(&m, 1).ring.seq;
        // Same split again, named differently: nothing changes.
        assert!(m.partition(&[ids(&[3]), ids(&[2, 1])]).unwrap().is_empty());
        assert_eq!(ring_of(&m, 1).ring.seq, seq);
    }

    #[test]
    fn frames_check_membership_and_deliver_a_pending_senders_join_first() {
        let mut m = Model::new(&ids(&[1])).unwrap();
        let a = m.request_join(NodeId(1), "g").unwrap();
        let out = m.mcast_frame(a, "g", vec![1]).unwrap();
        let events = for_member(&out, a);
        assert!(matches!(&events[0], RawEvent::ConfChg(_)), "{events:?}");
        assert!(matches!(&events[2], RawEvent::Frame { from, .. } if *from == a));
        assert!(matches!(
            m.mcast_frame(a, "other", vec![1]),
            Err(GroupError::Disconnected { .. })
        ));
        m.depart(a, Reason::Leave).unwrap();
        assert!(matches!(
            m.mcast_frame(a, "g", vec![1]),
            Err(GroupError::Disconnected { .. })
        ));
        assert!(m
            .set_max_frame_size(crate::fragment::FRAME_HEADER_LEN)
            .is_err());
    }
}
