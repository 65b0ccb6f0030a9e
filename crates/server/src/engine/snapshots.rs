//! Part of the engine's state: snapshot creations on their way, from request to
//! visibility.
//!
//! A creation is requested (queued in request order), announced to every origin client
//! (one announcement at a time; no origin write is granted while it is out), created in
//! the store once every origin client acknowledged or went, and made visible once that
//! creation is committed. Invariant: a snapshot id in `pending` exists in the store but is
//! shown to nobody; a name is requested at most once at a time.

use super::io::{ConnId, Requester};
use csnap_proto::SnapId;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A requested snapshot, before it exists in the store.
pub(super) struct RequestedSnapshot {
    pub(super) who: Requester,
    pub(super) name: String,
    /// The client's `CreateSnapshot.token` (0 = none), kept with the snapshot.
    pub(super) token: u64,
    /// The pin of an online rollback to this snapshot (`ClientMsg::Rollback`): announced
    /// with `RollbackStarting`, and the rollback starts with its creation.
    pub(super) rollback_of: Option<SnapId>,
}

/// Phase one of a snapshot creation: the snapshot, under the id it will get, has been
/// announced to every origin client; no origin write is granted until each one has
/// acknowledged (it has dropped its unique promises and finished every write granted
/// before) or gone. Then nothing writes the origin, and the store creates the snapshot
/// at that instant (phase two).
struct Announcement {
    request: RequestedSnapshot,
    /// The id the store will give it (`MetaStore::next_snapshot_id`).
    id: SnapId,
    /// Origin connections that still have to acknowledge `NewSnapshot`.
    awaiting: BTreeSet<ConnId>,
}

/// A snapshot created in the store, not yet visible: waiting for its commit.
struct PendingSnapshot {
    who: Requester,
    /// Store generation the creation is durable at.
    gen: u64,
}

#[derive(Default)]
pub(super) struct Creations {
    /// Creations waiting for their announcement, in request order (one at a time).
    requested: VecDeque<RequestedSnapshot>,
    announcement: Option<Announcement>,
    pending: BTreeMap<SnapId, PendingSnapshot>,
}

impl Creations {
    /// `snap` exists in the store but its creation is not committed: nobody sees it yet.
    pub(super) fn is_pending(&self, snap: SnapId) -> bool {
        self.pending.contains_key(&snap)
    }

    /// A creation of `name` is requested or announced.
    pub(super) fn is_queued(&self, name: &str) -> bool {
        self.requested
            .iter()
            .chain(self.announcement.as_ref().map(|a| &a.request))
            .any(|r| r.name == name)
    }

    /// The source of a rollback whose pin is requested or announced.
    pub(super) fn queued_rollback(&self) -> Option<SnapId> {
        self.requested
            .iter()
            .chain(self.announcement.as_ref().map(|a| &a.request))
            .find_map(|r| r.rollback_of)
    }

    /// Creations not yet in the store (requested or announced).
    pub(super) fn unborn(&self) -> usize {
        self.requested.len() + usize::from(self.announcement.is_some())
    }

    /// Every creation on its way (for the status).
    pub(super) fn in_progress(&self) -> usize {
        self.pending.len() + self.unborn()
    }

    pub(super) fn request(&mut self, r: RequestedSnapshot) {
        self.requested.push_back(r);
    }

    /// The same creation (name and token) requested again, before it is in the store: the
    /// resend takes over the answer. True if there was one.
    pub(super) fn resent_before_creation(
        &mut self,
        name: &str,
        token: u64,
        who: Requester,
    ) -> bool {
        let same = |r: &RequestedSnapshot| r.name == name && r.token == token;
        if let Some(r) = self.requested.iter_mut().find(|r| same(r)) {
            r.who = who;
            return true;
        }
        if let Some(a) = self.announcement.as_mut().filter(|a| same(&a.request)) {
            a.request.who = who;
            return true;
        }
        false
    }

    /// The creation of `snap` resent while waiting for its commit: the resend is answered
    /// instead. True if it was pending.
    pub(super) fn resent_pending(&mut self, snap: SnapId, who: Requester) -> bool {
        match self.pending.get_mut(&snap) {
            Some(p) => {
                p.who = who;
                true
            }
            None => false,
        }
    }

    /// The next creation to announce, if no announcement is out.
    pub(super) fn next_to_announce(&mut self) -> Option<RequestedSnapshot> {
        if self.announcement.is_some() {
            return None;
        }
        self.requested.pop_front()
    }

    /// `request` is announced as `id` to the origin connections `awaiting`.
    pub(super) fn announce(
        &mut self,
        request: RequestedSnapshot,
        id: SnapId,
        awaiting: BTreeSet<ConnId>,
    ) {
        self.announcement = Some(Announcement {
            request,
            id,
            awaiting,
        });
    }

    /// An announcement is out.
    pub(super) fn announced(&self) -> bool {
        self.announcement.is_some()
    }

    /// `conn` acknowledged the announcement of `snap` (or went, `snap` = `None`). True if an
    /// announcement is out (it may be ready now).
    pub(super) fn acknowledged(&mut self, conn: ConnId, snap: Option<SnapId>) -> bool {
        match self
            .announcement
            .as_mut()
            .filter(|a| snap.is_none_or(|s| s == a.id))
        {
            Some(a) => {
                a.awaiting.remove(&conn);
                true
            }
            None => false,
        }
    }

    /// Takes the announcement if every origin connection acknowledged it: the request and
    /// the id it was announced as.
    pub(super) fn take_acknowledged(&mut self) -> Option<(RequestedSnapshot, SnapId)> {
        if !self
            .announcement
            .as_ref()
            .is_some_and(|a| a.awaiting.is_empty())
        {
            return None;
        }
        self.announcement.take().map(|a| (a.request, a.id))
    }

    /// `snap` is in the store, durable at `gen`; `who` is answered then.
    pub(super) fn created(&mut self, snap: SnapId, who: Requester, gen: u64) {
        self.pending.insert(snap, PendingSnapshot { who, gen });
    }

    /// Pending snapshots whose creation is durable once `is_committed(gen)`: taken, with
    /// whom to answer.
    pub(super) fn take_committed(
        &mut self,
        is_committed: impl Fn(u64) -> bool,
    ) -> Vec<(SnapId, Requester)> {
        let ready: Vec<SnapId> = self
            .pending
            .iter()
            .filter(|(_, p)| is_committed(p.gen))
            .map(|(id, _)| *id)
            .collect();
        ready
            .into_iter()
            .filter_map(|id| self.pending.remove(&id).map(|p| (id, p.who)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, id: u64) -> RequestedSnapshot {
        RequestedSnapshot {
            who: Requester { conn: 1, id },
            name: name.to_owned(),
            token: 5,
            rollback_of: None,
        }
    }

    #[test]
    fn one_announcement_at_a_time_until_every_origin_acknowledged() {
        let mut c = Creations::default();
        c.request(req("a", 1));
        c.request(req("b", 2));
        assert!(c.is_queued("b") && !c.is_queued("c"));
        let first = c.next_to_announce().expect("a is first");
        assert_eq!(first.name, "a");
        c.announce(first, SnapId(4), BTreeSet::from([7, 8]));
        assert!(c.next_to_announce().is_none(), "one announcement at a time");
        assert!(c.resent_before_creation("a", 5, Requester { conn: 2, id: 9 }));
        assert!(!c.resent_before_creation("a", 6, Requester { conn: 2, id: 9 }));
        assert!(
            !c.acknowledged(7, Some(SnapId(3))),
            "another snapshot's ack"
        );
        assert!(c.acknowledged(7, Some(SnapId(4))));
        assert!(c.take_acknowledged().is_none(), "8 has not acknowledged");
        assert!(c.acknowledged(8, None));
        let (r, id) = c.take_acknowledged().expect("all acknowledged");
        assert_eq!((r.who.conn, r.who.id, id), (2, 9, SnapId(4)));
        c.created(id, r.who, 3);
        assert!(c.is_pending(id));
        assert_eq!(c.in_progress(), 2);
        assert!(c.take_committed(|g| g < 3).is_empty());
        assert_eq!(c.take_committed(|g| g <= 3), vec![(id, r.who)]);
        assert!(!c.is_pending(id));
    }
}
