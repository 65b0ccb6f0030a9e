//! The *agreed* view: what the membership core acts on.
//!
//! A view is agreed when
//! 1. it is stable in cpg-glue's sense ([`cpg_glue::view::ViewTracker`]: own join seen, a
//!    totem confchg seen, no transition open),
//! 2. the quorum service reported on the same ring (quorum and CPG are separate services
//!    whose events are not ordered with each other; dlm_controld waits for the quorum ring
//!    seq to equal the CPG ring seq the same way), and
//! 3. a state message from every member, sent for exactly this membership, was delivered.
//!
//! Every member of a partition delivers the same confchgs and messages in the same order,
//! but the quorum service's events are not ordered with them: a member that hears of the
//! ring's quorum late reaches "agreed" after more deliveries, holding later states (a
//! peer's state sent once it agreed says `was_quorate`, lists stale nodes). So the states
//! at the point where the view first had every member's state, a point of the delivery
//! order alone, are kept too ([`Agreed::first_states`]): a decision taken once per view
//! from them (the merge verdict) is the same everywhere.

use std::collections::BTreeMap;

use cpg_glue::view::{StableView, ViewTracker};
use cpg_glue::{GroupEvent, Member, QuorumEvent, RingId};

use super::state::MemberState;

/// An agreed view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// The totem ring of the view.
    pub ring: RingId,
    /// Its members, sorted.
    pub members: Vec<Member>,
    /// Whether the view's partition is quorate.
    pub quorate: bool,
    /// Every member's latest state for this view.
    pub states: BTreeMap<Member, MemberState>,
    /// Every member's state when the view (this ring and membership) first had all of
    /// them: the same at every member, whenever its quorum event came.
    pub first_states: BTreeMap<Member, MemberState>,
}

/// What an agreed view is still waiting for (for status and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// Own join confchg not seen yet.
    Join,
    /// Inside a transition, or no totem confchg yet.
    Totem,
    /// No quorum event for the view's ring yet.
    QuorumRing,
    /// State messages missing from these members.
    States(Vec<Member>),
}

/// Tracks group and quorum events and the states delivered in the current membership.
#[derive(Debug, Clone)]
pub struct ViewState {
    tracker: ViewTracker,
    quorum: Option<QuorumEvent>,
    states: BTreeMap<Member, MemberState>,
    /// `states` when the stable view first had every member's state (None: not yet).
    first_states: Option<BTreeMap<Member, MemberState>>,
}

impl ViewState {
    /// The view as a member that has seen nothing yet knows it.
    pub fn new(local: Member) -> ViewState {
        ViewState {
            tracker: ViewTracker::new(local),
            quorum: None,
            states: BTreeMap::new(),
            first_states: None,
        }
    }

    /// Applies a confchg or totem confchg (deliveries go through [`ViewState::record`]).
    /// A confchg starts a new membership: states of the old one no longer count.
    pub fn apply(&mut self, event: &GroupEvent) {
        let ring = self.tracker.ring().map(|t| t.ring);
        self.tracker.apply(event);
        match event {
            GroupEvent::ConfChg(_) => {
                self.states.clear();
                self.first_states = None;
            }
            GroupEvent::TotemConfChg(t) if Some(t.ring) != ring => self.first_states = None,
            _ => {}
        }
        self.note_complete();
    }

    /// Keeps the states at the first point the stable view has all of them.
    fn note_complete(&mut self) {
        if self.first_states.is_some() {
            return;
        }
        let Some(stable) = self.tracker.stable() else {
            return;
        };
        if stable.members.iter().all(|m| self.states.contains_key(m)) {
            self.first_states = Some(self.states.clone());
        }
    }

    /// The latest quorum event.
    pub fn apply_quorum(&mut self, event: QuorumEvent) {
        self.quorum = Some(event);
    }

    /// Records a member's state if it was sent for the current membership; returns
    /// whether it was taken.
    pub fn record(&mut self, from: Member, state: MemberState) -> bool {
        if !self.tracker.members().contains(&from) || !self.same_membership(&state.view) {
            return false;
        }
        self.states.insert(from, state);
        self.note_complete();
        true
    }

    fn same_membership(&self, view: &[Member]) -> bool {
        view.len() == self.tracker.members().len()
            && view.iter().zip(self.tracker.members()).all(|(a, b)| a == b)
    }

    /// Rewrites the recorded states (after an announce every member adopts, at the same
    /// point of the agreed order, so the recorded states must say so too).
    pub fn states_mut(&mut self) -> impl Iterator<Item = (&Member, &mut MemberState)> {
        self.states
            .iter_mut()
            .chain(self.first_states.iter_mut().flat_map(|s| s.iter_mut()))
    }

    /// The members after the confchgs seen so far, sorted.
    pub fn members(&self) -> Vec<Member> {
        self.tracker.members().iter().copied().collect()
    }

    /// The last totem ring seen, stable or not.
    pub fn ring(&self) -> Option<RingId> {
        self.tracker.ring().map(|t| t.ring)
    }

    /// Whether the local member is in the group's membership (it saw its own join).
    pub fn joined(&self) -> bool {
        self.tracker.joined()
    }

    /// The latest view corosync says is stable, if any.
    pub fn stable(&self) -> Option<StableView> {
        self.tracker.stable()
    }

    /// The latest quorum flag, whatever ring it came with (a loss of quorum acts at once).
    pub fn quorate_now(&self) -> bool {
        self.quorum.as_ref().is_some_and(|q| q.quorate)
    }

    /// The latest quorum event, if one came.
    pub fn quorum(&self) -> Option<&QuorumEvent> {
        self.quorum.as_ref()
    }

    /// The agreed view, or what it waits for.
    pub fn agreed(&self) -> Result<Agreed, Pending> {
        if !self.tracker.joined() {
            return Err(Pending::Join);
        }
        let stable = self.tracker.stable().ok_or(Pending::Totem)?;
        let quorum = self
            .quorum
            .as_ref()
            .filter(|q| q.ring == stable.ring)
            .ok_or(Pending::QuorumRing)?;
        let missing: Vec<Member> = stable
            .members
            .iter()
            .filter(|m| !self.states.contains_key(m))
            .copied()
            .collect();
        if !missing.is_empty() {
            return Err(Pending::States(missing));
        }
        Ok(Agreed {
            ring: stable.ring,
            members: stable.members,
            quorate: quorum.quorate,
            first_states: self
                .first_states
                .clone()
                .unwrap_or_else(|| self.states.clone()),
            states: self.states.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::{Lineage, Role};
    use cpg_glue::{ConfChg, MemberChange, NodeId, Reason, TotemConfChg};

    fn m(node: u32) -> Member {
        Member {
            node: NodeId(node),
            pid: 10 + node,
        }
    }

    fn state(view: &[Member]) -> MemberState {
        MemberState {
            lineage: Lineage::default(),
            has_state: false,
            role: Role::Idle,
            clients: vec![],
            lease_left_ms: 0,
            view: view.to_vec(),
            was_quorate: false,
            age: 0,
            certain: None,
            unsettled: vec![],
            stale: vec![],
            fencing: vec![],
            fenced: vec![],
            server_address: String::new(),
        }
    }

    fn ring(seq: u64) -> RingId {
        RingId {
            node: NodeId(1),
            seq,
        }
    }

    #[test]
    fn agreed_needs_join_totem_quorum_ring_and_every_state() {
        let (a, b) = (m(1), m(2));
        let mut v = ViewState::new(a);
        assert_eq!(v.agreed(), Err(Pending::Join));
        v.apply(&GroupEvent::ConfChg(ConfChg {
            members: vec![a, b],
            left: vec![],
            joined: vec![MemberChange {
                member: a,
                reason: Reason::Join,
            }],
        }));
        assert_eq!(v.agreed(), Err(Pending::Totem));
        v.apply(&GroupEvent::TotemConfChg(TotemConfChg {
            ring: ring(8),
            members: vec![NodeId(1), NodeId(2)],
        }));
        v.apply_quorum(QuorumEvent {
            quorate: true,
            ring: ring(4),
            members: vec![NodeId(1), NodeId(2)],
        });
        assert_eq!(
            v.agreed(),
            Err(Pending::QuorumRing),
            "quorum of an old ring"
        );
        v.apply_quorum(QuorumEvent {
            quorate: true,
            ring: ring(8),
            members: vec![NodeId(1), NodeId(2)],
        });
        assert_eq!(v.agreed(), Err(Pending::States(vec![a, b])));
        assert!(!v.record(b, state(&[b])), "sent for another membership");
        assert!(v.record(b, state(&[a, b])));
        assert!(v.record(a, state(&[a, b])));
        let agreed = v.agreed().unwrap();
        assert!(agreed.quorate);
        assert_eq!(agreed.states.len(), 2);
        // A confchg voids the states: everyone sends again.
        v.apply(&GroupEvent::ConfChg(ConfChg {
            members: vec![a],
            left: vec![MemberChange {
                member: b,
                reason: Reason::Leave,
            }],
            joined: vec![],
        }));
        assert_eq!(v.agreed(), Err(Pending::States(vec![a])));
    }
}
