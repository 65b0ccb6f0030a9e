//! The pure membership model behind [`super::MemoryCluster`]: nodes, network sides, totem
//! rings, CPG processes. Every operation is applied in one step and returns the [`Output`]s it
//! causes, in order; the shell in `mod.rs` routes them to per-process queues. Because each
//! operation is one atomic step, every member of a partition observes the same total order.
//!
//! The rules are corosync's (exec/cpg.c): on a ring change each process first gets a confchg
//! with the vanished processes (`NodeDown`), then one with the processes of merged nodes
//! (`NodeUp`), then the totem confchg, last. A joiner gets its join confchg and then the
//! current ring (`CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF`).

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    ConfChg, Delivery, GroupError, GroupEvent, Member, MemberChange, NodeId, QuorumEvent, Reason,
    RingId, TotemConfChg,
};

/// Longest group name corosync accepts (`CPG_MAX_NAME_LENGTH`).
pub const CPG_MAX_NAME_LENGTH: usize = 128;

/// Default payload limit, the same cap the corosync implementation enforces.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;

/// The first fake pid handed out; any value works, a non-tiny one reads like a pid.
const FIRST_PID: u32 = 1000;

/// Something an operation caused, for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// An event for one process's group stream.
    Group { to: Member, event: GroupEvent },
    /// The process vanished with its node: its stream ends with `Disconnected`.
    ProcessLost { member: Member },
    /// A quorum change for every quorum follower on `node`.
    Quorum { node: NodeId, event: QuorumEvent },
    /// The node died: its quorum followers end with `Disconnected`.
    NodeLost { node: NodeId },
}

#[derive(Debug, Clone)]
struct NodeState {
    /// Whether corosync runs on the node.
    up: bool,
    /// Network side label: up nodes with equal labels reach each other.
    side: usize,
    /// The node's current totem ring; `Some` exactly when the node is up.
    ring: Option<TotemConfChg>,
}

/// Processes by identity, with the group each one joined.
type Processes = BTreeMap<Member, String>;

/// The whole cluster's membership state.
#[derive(Debug, Clone)]
pub struct Model {
    nodes: BTreeMap<NodeId, NodeState>,
    processes: Processes,
    next_pid: u32,
    /// The highest ring seq ever formed: a new ring always exceeds it.
    last_seq: u64,
    max_message_size: usize,
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
            };
            if map.insert(node, state).is_some() {
                return Err(GroupError::Invalid(format!("node {node} is listed twice")));
            }
        }
        let mut model = Model {
            nodes: map,
            processes: BTreeMap::new(),
            next_pid: FIRST_PID,
            last_seq: 0,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        };
        // Nobody follows anything yet, so the outputs of the first ring go nowhere.
        let none = model.processes.clone();
        model.reform_rings(&none);
        Ok(model)
    }

    /// Configured node ids, sorted.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    pub fn is_up(&self, node: NodeId) -> bool {
        self.nodes.get(&node).is_some_and(|n| n.up)
    }

    /// The node's current ring, `None` if the node is down or unknown.
    pub fn ring(&self, node: NodeId) -> Option<&TotemConfChg> {
        self.nodes.get(&node).and_then(|n| n.ring.as_ref())
    }

    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    pub fn set_max_message_size(&mut self, max: usize) {
        self.max_message_size = max;
    }

    /// Whether `member` is a live process joined to `group`.
    pub fn is_member(&self, member: Member, group: &str) -> bool {
        self.processes.get(&member).is_some_and(|g| g == group)
    }

    /// The membership of `group` as `node` sees it (processes on nodes of its ring).
    pub fn view(&self, node: NodeId, group: &str) -> Vec<Member> {
        match self.ring(node) {
            Some(ring) => view_in(&self.processes, group, &ring.members)
                .into_iter()
                .collect(),
            None => Vec::new(),
        }
    }

    /// Votequorum with one vote per configured node: quorate iff more than half.
    pub fn quorum_state(&self, node: NodeId) -> Result<QuorumEvent, GroupError> {
        let ring = self.running_ring(node, "quorum")?;
        Ok(self.quorum_event(ring))
    }

    fn quorum_event(&self, ring: &TotemConfChg) -> QuorumEvent {
        QuorumEvent {
            quorate: ring.members.len() * 2 > self.nodes.len(),
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

    /// A new process on `node` joins `group`.
    pub fn join(&mut self, node: NodeId, group: &str) -> Result<(Member, Vec<Output>), GroupError> {
        if group.is_empty() || group.len() > CPG_MAX_NAME_LENGTH {
            return Err(GroupError::Invalid(format!(
                "group name must be 1 to {CPG_MAX_NAME_LENGTH} bytes, got {} bytes",
                group.len()
            )));
        }
        let ring = self.running_ring(node, "cpg")?.clone();
        let member = Member {
            node,
            pid: self.next_pid,
        };
        self.next_pid = self.next_pid.wrapping_add(1).max(FIRST_PID);
        self.processes.insert(member, group.to_owned());

        let view = view_in(&self.processes, group, &ring.members);
        let confchg = ConfChg {
            members: view.iter().copied().collect(),
            left: Vec::new(),
            joined: vec![MemberChange {
                member,
                reason: Reason::Join,
            }],
        };
        let mut out: Vec<Output> = view
            .iter()
            .map(|&to| Output::Group {
                to,
                event: GroupEvent::ConfChg(confchg.clone()),
            })
            .collect();
        out.push(Output::Group {
            to: member,
            event: GroupEvent::TotemConfChg(ring),
        });
        Ok((member, out))
    }

    /// `member` leaves its group (`Reason::Leave`) or dies (`Reason::ProcDown`). `None` if
    /// it is no longer a process (its node was killed, or it departed already).
    pub fn depart(&mut self, member: Member, reason: Reason) -> Option<Vec<Output>> {
        let group = self.processes.remove(&member)?;
        let ring = self.ring(member.node)?;
        let view = view_in(&self.processes, &group, &ring.members);
        let confchg = ConfChg {
            members: view.iter().copied().collect(),
            left: vec![MemberChange { member, reason }],
            joined: Vec::new(),
        };
        Some(
            view.into_iter()
                .map(|to| Output::Group {
                    to,
                    event: GroupEvent::ConfChg(confchg.clone()),
                })
                .collect(),
        )
    }

    /// Agreed multicast: delivered to every member of `group` in the sender's partition,
    /// the sender included.
    pub fn mcast(
        &self,
        from: Member,
        group: &str,
        payload: Vec<u8>,
    ) -> Result<Vec<Output>, GroupError> {
        if payload.len() > self.max_message_size {
            return Err(GroupError::MessageTooLarge {
                size: payload.len(),
                max: self.max_message_size,
            });
        }
        let ring = match self.ring(from.node) {
            Some(ring) if self.is_member(from, group) => ring,
            _ => {
                return Err(GroupError::Disconnected {
                    group: group.to_owned(),
                    detail: format!("process {from} is no longer a member"),
                })
            }
        };
        let receivers = view_in(&self.processes, group, &ring.members);
        let delivery = Delivery { from, payload };
        Ok(receivers
            .into_iter()
            .map(|to| Output::Group {
                to,
                event: GroupEvent::Deliver(delivery.clone()),
            })
            .collect())
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
        Ok(self.reform_rings(&old))
    }

    /// Reconnect every node with every other.
    pub fn heal(&mut self) -> Vec<Output> {
        for state in self.nodes.values_mut() {
            state.side = 0;
        }
        let old = self.processes.clone();
        self.reform_rings(&old)
    }

    /// Corosync on `node` dies: its processes and followers are gone.
    pub fn kill(&mut self, node: NodeId) -> Result<Vec<Output>, GroupError> {
        let state = self
            .nodes
            .get_mut(&node)
            .ok_or_else(|| GroupError::Invalid(format!("node {node} is not in this cluster")))?;
        if !state.up {
            return Err(GroupError::Invalid(format!("node {node} is already down")));
        }
        state.up = false;
        state.ring = None;
        let old = self.processes.clone();
        let mut out: Vec<Output> = Vec::new();
        self.processes.retain(|member, _| {
            if member.node == node {
                out.push(Output::ProcessLost { member: *member });
                false
            } else {
                true
            }
        });
        out.push(Output::NodeLost { node });
        out.extend(self.reform_rings(&old));
        Ok(out)
    }

    /// Corosync on `node` starts again, with no processes; it merges into its side.
    pub fn restart(&mut self, node: NodeId) -> Result<Vec<Output>, GroupError> {
        let state = self
            .nodes
            .get_mut(&node)
            .ok_or_else(|| GroupError::Invalid(format!("node {node} is not in this cluster")))?;
        if state.up {
            return Err(GroupError::Invalid(format!("node {node} is already up")));
        }
        state.up = true;
        let old = self.processes.clone();
        Ok(self.reform_rings(&old))
    }

    /// Form a new ring for every set of connected up nodes whose ring no longer matches,
    /// and emit each affected process's transition. `old` is the process table before the
    /// operation (it still holds the processes of a node killed by it).
    fn reform_rings(&mut self, old: &Processes) -> Vec<Output> {
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
                .all(|node| self.ring(*node).is_some_and(|ring| ring.members == members));
            let Some(&lowest) = members.first() else {
                continue;
            };
            if unchanged {
                continue;
            }
            self.last_seq += 1;
            let ring = TotemConfChg {
                ring: RingId {
                    node: lowest,
                    seq: self.last_seq,
                },
                members: members.clone(),
            };
            for &node in &members {
                let old_nodes = self
                    .ring(node)
                    .map(|r| r.members.clone())
                    .unwrap_or_default();
                self.transition(node, old, &old_nodes, &ring, &mut out);
                out.push(Output::Quorum {
                    node,
                    event: self.quorum_event(&ring),
                });
                if let Some(state) = self.nodes.get_mut(&node) {
                    state.ring = Some(ring.clone());
                }
            }
        }
        out
    }

    /// The events of one ring change for every process on `node`: NodeDown confchg, NodeUp
    /// confchg, totem confchg last.
    fn transition(
        &self,
        node: NodeId,
        old: &Processes,
        old_nodes: &[NodeId],
        ring: &TotemConfChg,
        out: &mut Vec<Output>,
    ) {
        let local: Vec<(Member, &String)> = self
            .processes
            .range(
                Member { node, pid: 0 }..=Member {
                    node,
                    pid: u32::MAX,
                },
            )
            .map(|(m, g)| (*m, g))
            .collect();
        let groups: BTreeSet<&String> = local.iter().map(|(_, g)| *g).collect();
        for group in groups {
            let before = view_in(old, group, old_nodes);
            let after = view_in(&self.processes, group, &ring.members);
            let left: Vec<MemberChange> = before
                .difference(&after)
                .map(|&member| MemberChange {
                    member,
                    reason: Reason::NodeDown,
                })
                .collect();
            let joined: Vec<MemberChange> = after
                .difference(&before)
                .map(|&member| MemberChange {
                    member,
                    reason: Reason::NodeUp,
                })
                .collect();
            let mut events = Vec::new();
            if !left.is_empty() {
                events.push(GroupEvent::ConfChg(ConfChg {
                    members: before.intersection(&after).copied().collect(),
                    left,
                    joined: Vec::new(),
                }));
            }
            if !joined.is_empty() {
                events.push(GroupEvent::ConfChg(ConfChg {
                    members: after.iter().copied().collect(),
                    left: Vec::new(),
                    joined,
                }));
            }
            events.push(GroupEvent::TotemConfChg(ring.clone()));
            for &(to, g) in &local {
                if g == group {
                    for event in &events {
                        out.push(Output::Group {
                            to,
                            event: event.clone(),
                        });
                    }
                }
            }
        }
    }
}

/// Processes of `group` on any of `nodes`.
fn view_in(processes: &Processes, group: &str, nodes: &[NodeId]) -> BTreeSet<Member> {
    processes
        .iter()
        .filter(|(m, g)| g.as_str() == group && nodes.contains(&m.node))
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
    fn for_member(out: &[Output], to: Member) -> Vec<GroupEvent> {
        out.iter()
            .filter_map(|o| match o {
                Output::Group { to: t, event } if *t == to => Some(event.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn first_ring_holds_every_node_led_by_the_lowest() {
        let m = Model::new(&ids(&[3, 1, 2])).unwrap();
        let ring = m.ring(NodeId(2)).unwrap();
        assert_eq!(ring.members, ids(&[1, 2, 3]));
        assert_eq!(
            ring.ring,
            RingId {
                node: NodeId(1),
                seq: 1
            }
        );
        assert!(m.quorum_state(NodeId(3)).unwrap().quorate);
    }

    #[test]
    fn join_tells_every_member_and_gives_the_joiner_the_ring_after_its_confchg() {
        let mut m = Model::new(&ids(&[1, 2])).unwrap();
        let (a, _) = m.join(NodeId(1), "g").unwrap();
        let (b, out) = m.join(NodeId(2), "g").unwrap();
        let join = GroupEvent::ConfChg(ConfChg {
            members: vec![a, b],
            left: vec![],
            joined: vec![MemberChange {
                member: b,
                reason: Reason::Join,
            }],
        });
        assert_eq!(for_member(&out, a), vec![join.clone()]);
        let ring = m.ring(NodeId(2)).unwrap().clone();
        assert_eq!(
            for_member(&out, b),
            vec![join, GroupEvent::TotemConfChg(ring)]
        );
        // Another group is not told.
        let (c, out) = m.join(NodeId(1), "other").unwrap();
        assert!(for_member(&out, a).is_empty());
        assert_eq!(for_member(&out, c).len(), 2);
    }

    #[test]
    fn kill_reports_lost_processes_then_the_survivors_transition_and_quorum() {
        let mut m = Model::new(&ids(&[1, 2, 3])).unwrap();
        let (a, _) = m.join(NodeId(1), "g").unwrap();
        let (c, _) = m.join(NodeId(3), "g").unwrap();
        let out = m.kill(NodeId(3)).unwrap();
        assert_eq!(out[0], Output::ProcessLost { member: c });
        assert_eq!(out[1], Output::NodeLost { node: NodeId(3) });
        let ring = m.ring(NodeId(1)).unwrap().clone();
        assert_eq!(
            ring.ring,
            RingId {
                node: NodeId(1),
                seq: 2
            }
        );
        let events = for_member(&out, a);
        assert!(matches!(&events[0], GroupEvent::ConfChg(cc)
            if cc.members == vec![a] && cc.left == vec![MemberChange { member: c, reason: Reason::NodeDown }]));
        assert_eq!(events[1], GroupEvent::TotemConfChg(ring.clone()));
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
    fn an_unchanged_side_gets_no_new_ring() {
        let mut m = Model::new(&ids(&[1, 2, 3])).unwrap();
        m.partition(&[ids(&[1, 2])]).unwrap();
        let seq = m.ring(NodeId(1)).unwrap().ring.seq;
        // Same split again, named differently: nothing changes.
        assert!(m.partition(&[ids(&[3]), ids(&[2, 1])]).unwrap().is_empty());
        assert_eq!(m.ring(NodeId(1)).unwrap().ring.seq, seq);
        // Healing forms one ring above both sides' seqs.
        m.heal();
        let merged = m.ring(NodeId(3)).unwrap().ring.seq;
        assert!(merged > seq && merged > 2);
    }

    #[test]
    fn mcast_checks_size_and_membership() {
        let mut m = Model::new(&ids(&[1])).unwrap();
        m.set_max_message_size(4);
        let (a, _) = m.join(NodeId(1), "g").unwrap();
        assert!(matches!(
            m.mcast(a, "g", vec![0; 5]),
            Err(GroupError::MessageTooLarge { size: 5, max: 4 })
        ));
        assert!(matches!(
            m.mcast(a, "other", vec![1]),
            Err(GroupError::Disconnected { .. })
        ));
        assert_eq!(m.mcast(a, "g", vec![1]).unwrap().len(), 1);
        m.depart(a, Reason::Leave).unwrap();
        assert!(matches!(
            m.mcast(a, "g", vec![1]),
            Err(GroupError::Disconnected { .. })
        ));
    }
}
