//! Stale-merge detection from the state exchange (seed 003; dlm_controld's "stateful
//! merge"), never from ring ids.
//!
//! In an agreed view, the *reference side* is the members whose previous agreed view was
//! quorate (the quorate side that predates the merge); if no member reports that, every
//! member with state. Members that some state of the view already lists as stale (an
//! earlier verdict) are left out of it, unless that leaves nobody: stale nodes that stayed
//! quorate together must not make the lineage they were stale against the stale one. The reference lineage is the newest lineage of the reference side.
//! A member is **stale** if it holds state (`has_state`) of any other lineage: a diverged,
//! higher or lower generation, a server of another history, clients attached to an old
//! server. The **actor** that fences or resets stale members is the lowest node id of the
//! reference side that is not stale itself (else the lowest non-stale member).
//!
//! It is a pure function of the view's states, so every member computes the same verdict.

use std::collections::{BTreeMap, BTreeSet};

use cpg_glue::{Member, NodeId};

use super::state::{Lineage, MemberState};

/// What every member of an agreed view concludes from its states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The newest lineage of the reference side.
    pub reference: Lineage,
    /// Nodes holding state of another lineage.
    pub stale: BTreeSet<NodeId>,
    /// The member that fences or resets the stale ones, if any is left to.
    pub actor: Option<NodeId>,
    /// The reference side's nodes, sorted: if the actor turns out stale later (a peer
    /// knew more), the next one of these acts.
    pub side: Vec<NodeId>,
}

/// The verdict for one agreed view's states (the same at every member).
pub fn analyze(states: &BTreeMap<Member, MemberState>) -> Verdict {
    // Members some state of the view already holds stale (an earlier verdict) never form
    // the reference side, even if they were quorate since: stale nodes that stayed
    // together must not turn the lineage they were stale against into the stale one.
    let listed: BTreeSet<NodeId> = states
        .values()
        .flat_map(|s| s.stale.iter().copied())
        .collect();
    let pick = |skip_listed: bool| {
        let ok = |m: &Member| !skip_listed || !listed.contains(&m.node);
        let quorate: Vec<(&Member, &MemberState)> = states
            .iter()
            .filter(|(m, s)| s.was_quorate && ok(m))
            .collect();
        if quorate.is_empty() {
            states
                .iter()
                .filter(|(m, s)| s.has_state && ok(m))
                .collect()
        } else {
            quorate
        }
    };
    let mut side: Vec<(&Member, &MemberState)> = pick(true);
    if side.is_empty() {
        side = pick(false);
    }
    let reference = side
        .iter()
        .map(|(_, s)| s.lineage)
        .max()
        .unwrap_or_default();
    let stale: BTreeSet<NodeId> = states
        .iter()
        .filter(|(_, s)| s.has_state && s.lineage != reference)
        .map(|(m, _)| m.node)
        .collect();
    let actor = side
        .iter()
        .map(|(m, _)| m.node)
        .filter(|n| !stale.contains(n))
        .min()
        .or_else(|| {
            states
                .keys()
                .map(|m| m.node)
                .filter(|n| !stale.contains(n))
                .min()
        });
    let mut side: Vec<NodeId> = side.iter().map(|(m, _)| m.node).collect();
    side.sort();
    Verdict {
        reference,
        stale,
        actor,
        side,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::Role;

    fn m(node: u32) -> Member {
        Member {
            node: NodeId(node),
            pid: 7,
        }
    }

    fn lin(generation: u64, server: u32) -> Lineage {
        Lineage {
            generation,
            server: Some(NodeId(server)),
        }
    }

    fn st(lineage: Lineage, was_quorate: bool) -> MemberState {
        MemberState {
            has_state: lineage != Lineage::default(),
            lineage,
            role: Role::Idle,
            clients: vec![],
            lease_left_ms: 0,
            view: vec![],
            was_quorate,
            age: 1,
            certain: None,
            unsettled: vec![],
            stale: vec![],
            fencing: vec![],
            fenced: vec![],
            server_address: String::new(),
        }
    }

    #[test]
    fn one_lineage_has_no_stale_member() {
        let s = BTreeMap::from([(m(1), st(lin(2, 1), true)), (m(2), st(lin(2, 1), true))]);
        let v = analyze(&s);
        assert!(v.stale.is_empty());
        assert_eq!(v.actor, Some(NodeId(1)));
    }

    #[test]
    fn the_old_server_returning_from_a_minority_is_stale() {
        // {1} was cut off with generation 2; {2,3} stayed quorate and activated 3 on 2.
        let s = BTreeMap::from([
            (m(1), st(lin(2, 1), false)),
            (m(2), st(lin(3, 2), true)),
            (m(3), st(lin(3, 2), true)),
        ]);
        let v = analyze(&s);
        assert_eq!(v.stale, BTreeSet::from([NodeId(1)]));
        assert_eq!(
            v.actor,
            Some(NodeId(2)),
            "lowest of the quorate side, not node 1"
        );
        assert_eq!(v.reference, lin(3, 2));
    }

    #[test]
    fn a_higher_generation_from_outside_the_quorate_side_is_stale_too() {
        let s = BTreeMap::from([
            (m(1), st(Lineage::default(), true)),
            (m(2), st(lin(9, 4), false)),
        ]);
        assert_eq!(analyze(&s).stale, BTreeSet::from([NodeId(2)]));
    }

    #[test]
    fn members_without_state_are_never_stale() {
        let s = BTreeMap::from([
            (m(1), st(lin(4, 1), true)),
            (m(5), st(Lineage::default(), false)),
        ]);
        assert!(analyze(&s).stale.is_empty());
    }

    #[test]
    fn without_a_quorate_side_the_newest_lineage_is_the_reference() {
        let s = BTreeMap::from([
            (m(1), st(lin(2, 1), false)),
            (m(2), st(lin(3, 2), false)),
            (m(3), st(Lineage::default(), false)),
        ]);
        let v = analyze(&s);
        assert_eq!(v.stale, BTreeSet::from([NodeId(1)]));
        assert_eq!(v.actor, Some(NodeId(2)));
    }
}
