//! What a *stable view* is, as a pure tracker over one process's group events.
//!
//! Corosync's events for one process, in order, are a mix of:
//! * confchgs within a ring (reasons `Join`, `Leave`, `ProcDown`): ordinary agreed-order
//!   events, each one a complete view change by itself;
//! * a transition to a new ring: a confchg with the processes of vanished nodes
//!   (`NodeDown`; also those of a node whose corosync restarted and which is in the new
//!   ring), one with the processes of merged nodes (`NodeUp`), rarely `ProcDown` ones (the
//!   joinlist's zombie removal), then the totem confchg, always last;
//! * the *initial* totem confchg (`CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF`): the ring
//!   current at the time, sent once per connection on the first join or leave the node
//!   delivers in any group after this process asked to join. That can be another process's
//!   join, delivered before this process's own, so the initial totem confchg can come
//!   *before* the process's own join confchg, and then no other totem confchg follows until
//!   the next ring change.
//!
//! So a view is **stable** when the process has seen its own join confchg, has seen a totem
//! confchg (before or after the join), and is not inside a transition (no `NodeDown` or
//! `NodeUp` confchg since the last totem confchg). [`ViewTracker`] applies these rules; the
//! agent acts on a membership only when it is stable.

use std::collections::BTreeSet;

use crate::{ConfChg, GroupEvent, Member, NodeId, Reason, RingId, TotemConfChg};

/// A membership a process may act on: its group's members, the totem ring they are in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StableView {
    /// The totem ring.
    pub ring: RingId,
    /// Node ids of the totem ring, sorted.
    pub nodes: Vec<NodeId>,
    /// The group's members, sorted; the local process is one of them.
    pub members: Vec<Member>,
}

/// Follows one process's group events (see the module comment).
#[derive(Debug, Clone)]
pub struct ViewTracker {
    local: Member,
    joined: bool,
    members: BTreeSet<Member>,
    ring: Option<TotemConfChg>,
    in_transition: bool,
}

impl ViewTracker {
    /// A tracker for process `local`, before any event.
    pub fn new(local: Member) -> ViewTracker {
        ViewTracker {
            local,
            joined: false,
            members: BTreeSet::new(),
            ring: None,
            in_transition: false,
        }
    }

    /// Applies the next event of the process's stream (deliveries change nothing).
    pub fn apply(&mut self, event: &GroupEvent) {
        match event {
            GroupEvent::ConfChg(change) => self.apply_confchg(change),
            GroupEvent::TotemConfChg(totem) => {
                self.ring = Some(totem.clone());
                self.in_transition = false;
            }
            GroupEvent::Deliver(_) => {}
        }
    }

    fn apply_confchg(&mut self, change: &ConfChg) {
        self.members = change.members.iter().copied().collect();
        if change
            .joined
            .iter()
            .any(|j| j.member == self.local && j.reason == Reason::Join)
        {
            self.joined = true;
        }
        let transition = change
            .joined
            .iter()
            .chain(&change.left)
            .any(|c| matches!(c.reason, Reason::NodeDown | Reason::NodeUp));
        if transition {
            self.in_transition = true;
        }
    }

    /// Whether the process has seen its own join confchg.
    pub fn joined(&self) -> bool {
        self.joined
    }

    /// The last totem ring seen, stable or not.
    pub fn ring(&self) -> Option<&TotemConfChg> {
        self.ring.as_ref()
    }

    /// The group's members after the confchgs seen so far, stable or not.
    pub fn members(&self) -> &BTreeSet<Member> {
        &self.members
    }

    /// Whether a transition has begun (a `NodeDown`/`NodeUp` confchg) and its totem confchg
    /// has not come yet.
    pub fn in_transition(&self) -> bool {
        self.in_transition
    }

    /// The view, if it is stable.
    pub fn stable(&self) -> Option<StableView> {
        let ring = self.ring.as_ref()?;
        if !self.joined || self.in_transition || !self.members.contains(&self.local) {
            return None;
        }
        Some(StableView {
            ring: ring.ring,
            nodes: ring.members.clone(),
            members: self.members.iter().copied().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemberChange;

    fn m(node: u32, pid: u32) -> Member {
        Member {
            node: NodeId(node),
            pid,
        }
    }

    fn cc(
        members: &[Member],
        joined: &[(Member, Reason)],
        left: &[(Member, Reason)],
    ) -> GroupEvent {
        let change = |list: &[(Member, Reason)]| {
            list.iter()
                .map(|&(member, reason)| MemberChange { member, reason })
                .collect()
        };
        GroupEvent::ConfChg(ConfChg {
            members: members.to_vec(),
            joined: change(joined),
            left: change(left),
        })
    }

    fn totem(seq: u64, nodes: &[u32]) -> GroupEvent {
        GroupEvent::TotemConfChg(TotemConfChg {
            ring: RingId {
                node: NodeId(nodes[0]),
                seq,
            },
            members: nodes.iter().copied().map(NodeId).collect(),
        })
    }

    #[test]
    fn join_then_initial_totem_is_stable() {
        let me = m(1, 10);
        let mut t = ViewTracker::new(me);
        t.apply(&cc(&[me], &[(me, Reason::Join)], &[]));
        assert_eq!(t.stable(), None, "no ring yet");
        t.apply(&totem(4, &[1, 2]));
        let v = t.stable().unwrap();
        assert_eq!(v.members, vec![me]);
        assert_eq!(v.nodes, vec![NodeId(1), NodeId(2)]);
    }

    #[test]
    fn initial_totem_before_own_join_is_stable_once_the_join_arrives() {
        let me = m(1, 10);
        let other = m(2, 20);
        let mut t = ViewTracker::new(me);
        t.apply(&totem(8, &[1, 2]));
        assert_eq!(t.stable(), None, "not joined yet");
        t.apply(&cc(&[me, other], &[(me, Reason::Join)], &[]));
        assert_eq!(t.stable().unwrap().members, vec![me, other]);
    }

    #[test]
    fn a_transition_is_unstable_until_its_totem_confchg() {
        let (me, a, b) = (m(1, 10), m(2, 20), m(3, 30));
        let mut t = ViewTracker::new(me);
        t.apply(&cc(&[me, a, b], &[(me, Reason::Join)], &[]));
        t.apply(&totem(4, &[1, 2, 3]));
        t.apply(&cc(&[me, a], &[], &[(b, Reason::NodeDown)]));
        assert_eq!(t.stable(), None);
        assert!(t.in_transition());
        t.apply(&totem(8, &[1, 2]));
        assert_eq!(t.stable().unwrap().members, vec![me, a]);
        // Within a ring, a leave or a process death is a stable change by itself.
        t.apply(&cc(&[me], &[], &[(a, Reason::ProcDown)]));
        assert_eq!(t.stable().unwrap().members, vec![me]);
        // A merge with a zombie removal: NodeUp, then ProcDown, then totem.
        t.apply(&cc(&[me, b], &[(b, Reason::NodeUp)], &[]));
        t.apply(&cc(&[me], &[], &[(b, Reason::ProcDown)]));
        assert_eq!(t.stable(), None);
        t.apply(&totem(12, &[1, 3]));
        assert_eq!(t.stable().unwrap().ring.seq, 12);
    }
}
