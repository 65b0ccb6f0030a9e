//! Server choice: a pure function of an agreed view's member states.
//!
//! 1. A member already running a server for the view's lineage (`Starting`, `Serving` or
//!    `Stopping`) keeps it: a healthy server is never moved because a better node joined
//!    (that would be a needless failover), and while one is stopping nothing else starts.
//! 2. Otherwise, among members that are not stale: the highest `csnap_priority`, then the
//!    member longest in the group (most agreed views since its join, as its state reports),
//!    then the lowest node id, then the lowest pid.
//!
//! Ring ids and their seqs play no part: both halves of a split get rings with the same seq.
//! Whether the choice is *acted on* (quorate view, old server certainly stopped) is the
//! machine's business.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use cpg_glue::{Member, NodeId};

use super::state::MemberState;

/// The member that should run the server in this view, if any member may.
pub fn choose(
    states: &BTreeMap<Member, MemberState>,
    stale: &BTreeSet<NodeId>,
    priority: impl Fn(NodeId) -> i32,
) -> Option<Member> {
    let eligible = || {
        states
            .iter()
            .filter(|(m, _)| !stale.contains(&m.node))
            .map(|(m, s)| (*m, s))
    };
    if let Some((incumbent, _)) = eligible().find(|(_, s)| s.role.has_server()) {
        return Some(incumbent);
    }
    eligible()
        .max_by_key(|(m, s)| (priority(m.node), s.age, Reverse(m.node), Reverse(m.pid)))
        .map(|(m, _)| m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::{Lineage, Role};

    fn m(node: u32) -> Member {
        Member {
            node: NodeId(node),
            pid: 100,
        }
    }

    fn st(age: u64, role: Role) -> MemberState {
        MemberState {
            lineage: Lineage::default(),
            has_state: false,
            role,
            clients: vec![],
            lease_left_ms: 0,
            view: vec![],
            was_quorate: true,
            age,
            certain: None,
            unsettled: vec![],
            stale: vec![],
            fencing: vec![],
            fenced: vec![],
            server_address: String::new(),
        }
    }

    fn prio(list: &'static [(u32, i32)]) -> impl Fn(NodeId) -> i32 {
        move |n| {
            list.iter()
                .find(|(id, _)| *id == n.0)
                .map_or(0, |(_, p)| *p)
        }
    }

    #[test]
    fn priority_then_age_then_lowest_id() {
        let none = BTreeSet::new();
        let states = BTreeMap::from([
            (m(1), st(5, Role::Idle)),
            (m(2), st(1, Role::Idle)),
            (m(3), st(9, Role::Idle)),
        ]);
        assert_eq!(choose(&states, &none, prio(&[(2, 10)])), Some(m(2)));
        assert_eq!(choose(&states, &none, prio(&[])), Some(m(3)), "oldest");
        let tie = BTreeMap::from([(m(4), st(2, Role::Idle)), (m(3), st(2, Role::Idle))]);
        assert_eq!(choose(&tie, &none, prio(&[])), Some(m(3)), "lowest id");
    }

    #[test]
    fn the_incumbent_stays_and_stale_members_are_skipped() {
        let states = BTreeMap::from([
            (m(1), st(5, Role::Idle)),
            (m(2), st(1, Role::Serving)),
            (m(3), st(9, Role::Idle)),
        ]);
        let none = BTreeSet::new();
        assert_eq!(choose(&states, &none, prio(&[(3, 99)])), Some(m(2)));
        let stale = BTreeSet::from([NodeId(2), NodeId(3)]);
        assert_eq!(choose(&states, &stale, prio(&[(3, 99)])), Some(m(1)));
        let all = BTreeSet::from([NodeId(1), NodeId(2), NodeId(3)]);
        assert_eq!(choose(&states, &all, prio(&[])), None);
    }

    #[test]
    fn the_same_states_give_the_same_choice_in_any_order() {
        // BTreeMap iteration is by member, so insertion order cannot matter; check that a
        // permuted build agrees (the property every member relies on).
        let a = [(m(3), st(2, Role::Idle)), (m(1), st(2, Role::Idle))];
        let x: BTreeMap<_, _> = a.iter().cloned().collect();
        let y: BTreeMap<_, _> = a.iter().rev().cloned().collect();
        let none = BTreeSet::new();
        assert_eq!(choose(&x, &none, prio(&[])), choose(&y, &none, prio(&[])));
    }
}
