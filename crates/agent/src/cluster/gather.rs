//! The failover gather (seed 001): the new server's agent announced itself; every member
//! answers with the snapshot clients attached on its node; a member that leaves (or turns
//! out stale) is no longer waited for; when every answer is in, the server is activated
//! with the combined list and grants no origin write until each listed client reconnected
//! or was declared gone.

use std::collections::{BTreeMap, BTreeSet};

use cpg_glue::{Member, NodeId};
use csnap_proto::msg::ClientId;

use super::state::Lineage;

/// One failover gather, from the announce until every answer is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gather {
    /// The lineage the announced server starts.
    pub lineage: Lineage,
    waiting: BTreeSet<Member>,
    /// Each answered member's latest list: a later state of the same member (sent after
    /// its answer, so newer) replaces it.
    answered: BTreeMap<Member, Vec<ClientId>>,
    /// Members of the announce's view left out because they were stale: not waited for,
    /// but a clean answer from one (it was reset during the gather, and its clients
    /// reconnect to this server) is taken.
    left_out: BTreeSet<Member>,
    clients: BTreeMap<ClientId, NodeId>,
}

impl Gather {
    /// Starts waiting for an answer from each of `members` (the view when the announce was
    /// delivered, stale members left out).
    pub fn new(lineage: Lineage, members: impl IntoIterator<Item = Member>) -> Gather {
        Gather {
            lineage,
            waiting: members.into_iter().collect(),
            answered: BTreeMap::new(),
            left_out: BTreeSet::new(),
            clients: BTreeMap::new(),
        }
    }

    /// Members of the announce's view that are stale: not waited for, yet their answer
    /// counts if they come back clean before the activation (a reset node keeps its
    /// snapshot clients, which reconnect to the new server holding their read locks).
    pub fn leave_out(&mut self, members: impl IntoIterator<Item = Member>) {
        for m in members {
            self.waiting.remove(&m);
            if !self.answered.contains_key(&m) {
                self.left_out.insert(m);
            }
        }
    }

    /// A member's answer; answers from members not waited for (joined later) are ignored:
    /// they cannot have been clients of the old server.
    ///
    /// A member that already answered may answer again (every state it sends after the
    /// announce is one): its newer list replaces the older, so a client that detached
    /// before the activation is not waited for (it holds nothing any more), and one that
    /// attached meanwhile is. Without this, a client that detached during the gather was
    /// waited for until its node happened to send a state after the activation: in a quiet
    /// cluster, never (whole-system simulation seed 0x51570000009b).
    pub fn answer(&mut self, from: Member, clients: &[ClientId]) {
        if self.waiting.remove(&from)
            || self.left_out.remove(&from)
            || self.answered.contains_key(&from)
        {
            self.answered.insert(from, clients.to_vec());
            self.rebuild();
        }
    }

    /// Members that left the view: the clients they answered with lived in their agent
    /// process (or on their node) and are gone with it, even if the node is back with a
    /// new agent (whole-system simulation seed 0x51570000009b waited for them for ever).
    pub fn forget_left(&mut self, present: impl Fn(&Member) -> bool) {
        self.left_out.retain(|m| present(m));
        let before = self.answered.len();
        self.answered.retain(|m, _| present(m));
        if self.answered.len() != before {
            self.rebuild();
        }
    }

    fn rebuild(&mut self) {
        self.clients = self
            .answered
            .iter()
            .flat_map(|(m, list)| list.iter().map(|c| (*c, m.node)))
            .collect();
    }

    /// Members no longer in the view (or now stale) are not waited for.
    pub fn retain(&mut self, keep: impl Fn(&Member) -> bool) -> Vec<Member> {
        let gone: Vec<Member> = self.waiting.iter().filter(|m| !keep(m)).copied().collect();
        for m in &gone {
            self.waiting.remove(m);
        }
        gone
    }

    /// Drops the already gathered clients of nodes that left before the activation: their
    /// node is gone, so they are gone; returns them.
    pub fn drop_nodes(&mut self, alive: impl Fn(NodeId) -> bool) -> Vec<ClientId> {
        let gone: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, n)| !alive(**n))
            .map(|(c, _)| *c)
            .collect();
        for c in &gone {
            self.clients.remove(c);
        }
        for list in self.answered.values_mut() {
            list.retain(|c| !gone.contains(c));
        }
        gone
    }

    /// Members whose answer is still missing.
    pub fn waiting(&self) -> Vec<Member> {
        self.waiting.iter().copied().collect()
    }

    /// Whether every answer is in.
    pub fn done(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The combined list, with the node each client is on.
    pub fn clients(&self) -> &BTreeMap<ClientId, NodeId> {
        &self.clients
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csnap_proto::msg::ClientKind;

    fn m(node: u32) -> Member {
        Member {
            node: NodeId(node),
            pid: 1,
        }
    }

    fn snap(instance: u64) -> ClientId {
        ClientId::new(
            instance,
            ClientKind::Snapshot {
                snap: csnap_proto::SnapId(1),
            },
        )
    }

    #[test]
    fn waits_for_every_member_and_not_for_leavers_or_latecomers() {
        let mut g = Gather::new(Lineage::default(), [m(1), m(2), m(3)]);
        g.answer(m(1), &[]);
        g.answer(m(4), &[snap(44)]);
        g.answer(m(2), &[snap(21), snap(22)]);
        assert!(!g.done());
        assert_eq!(g.waiting(), vec![m(3)]);
        assert_eq!(g.retain(|x| x.node != NodeId(3)), vec![m(3)]);
        assert!(g.done());
        assert_eq!(g.clients().len(), 2, "the latecomer's answer is not taken");
        assert_eq!(g.drop_nodes(|n| n != NodeId(2)), vec![snap(21), snap(22)]);
        assert!(g.clients().is_empty());
    }

    #[test]
    fn a_later_answer_from_the_same_member_replaces_its_first() {
        let mut g = Gather::new(Lineage::default(), [m(1), m(2)]);
        g.answer(m(1), &[snap(1)]);
        g.answer(m(1), &[snap(2)]);
        assert_eq!(
            g.clients().keys().copied().collect::<Vec<_>>(),
            vec![snap(2)],
            "a client that detached during the gather is not waited for"
        );
        assert_eq!(g.waiting(), vec![m(2)]);
    }

    #[test]
    fn the_clients_of_a_member_that_left_are_forgotten_even_if_its_node_is_back() {
        let mut g = Gather::new(Lineage::default(), [m(1), m(2)]);
        g.answer(m(1), &[snap(1)]);
        g.answer(m(2), &[snap(2)]);
        let again = Member {
            node: NodeId(1),
            pid: 2,
        };
        g.forget_left(|x| *x != m(1));
        g.answer(again, &[snap(3)]);
        assert_eq!(
            g.clients().keys().copied().collect::<Vec<_>>(),
            vec![snap(2)],
            "the old agent's clients died with it; the new agent was not asked"
        );
    }

    #[test]
    fn a_stale_member_is_not_waited_for_but_its_clean_answer_counts() {
        let mut g = Gather::new(Lineage::default(), [m(1), m(2)]);
        g.leave_out([m(3)]);
        g.answer(m(1), &[]);
        g.answer(m(2), &[]);
        assert!(g.done(), "the stale member is not waited for");
        // Reset during the gather: its clients reconnect to this server.
        g.answer(m(3), &[snap(31)]);
        assert_eq!(
            g.clients().keys().copied().collect::<Vec<_>>(),
            vec![snap(31)]
        );
        g.forget_left(|x| *x != m(3));
        assert!(g.clients().is_empty());
    }
}
