//! Part of the engine's state: which work items wait for what.
//!
//! Waking is always safe (a woken item is re-evaluated from scratch and re-registers for
//! what still blocks it), so the sets hold work ids only, and each wake takes the whole
//! set. Invariant: an item blocked on a condition is registered for it before the
//! evaluation returns, so no change it waits for goes unnoticed.

use super::work::WorkId;
use std::collections::{BTreeSet, HashMap};

#[derive(Default)]
pub(super) struct Waiters {
    /// A copy in flight or a read lock on the origin chunk.
    chunk: HashMap<u64, BTreeSet<WorkId>>,
    /// The next commit.
    commit: BTreeSet<WorkId>,
    /// The activation gate opening.
    activation: BTreeSet<WorkId>,
    /// Write leases on deleted or invalidated snapshots being released (reclaim).
    lease: BTreeSet<WorkId>,
    /// The snapshot announcement out now turning into a creation.
    announcement: BTreeSet<WorkId>,
}

impl Waiters {
    pub(super) fn on_chunk(&mut self, chunk: u64, w: WorkId) {
        self.chunk.entry(chunk).or_default().insert(w);
    }

    pub(super) fn on_commit(&mut self, w: WorkId) {
        self.commit.insert(w);
    }

    pub(super) fn on_activation(&mut self, w: WorkId) {
        self.activation.insert(w);
    }

    pub(super) fn on_leases(&mut self, w: WorkId) {
        self.lease.insert(w);
    }

    pub(super) fn on_announcement(&mut self, w: WorkId) {
        self.announcement.insert(w);
    }

    /// The items waiting on `chunk`, left registered.
    pub(super) fn waiting_on_chunk(&self, chunk: u64) -> Vec<WorkId> {
        self.chunk
            .get(&chunk)
            .map(|ws| ws.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Takes the items waiting on `chunk` (to wake them).
    pub(super) fn take_chunk(&mut self, chunk: u64) -> BTreeSet<WorkId> {
        self.chunk.remove(&chunk).unwrap_or_default()
    }

    pub(super) fn take_commit(&mut self) -> BTreeSet<WorkId> {
        std::mem::take(&mut self.commit)
    }

    pub(super) fn take_activation(&mut self) -> BTreeSet<WorkId> {
        std::mem::take(&mut self.activation)
    }

    pub(super) fn take_leases(&mut self) -> BTreeSet<WorkId> {
        std::mem::take(&mut self.lease)
    }

    pub(super) fn take_announcement(&mut self) -> BTreeSet<WorkId> {
        std::mem::take(&mut self.announcement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_takes_the_whole_set_once() {
        let mut ws = Waiters::default();
        ws.on_chunk(3, 1);
        ws.on_chunk(3, 2);
        ws.on_chunk(3, 1);
        ws.on_commit(2);
        assert_eq!(ws.waiting_on_chunk(3), vec![1, 2]);
        assert_eq!(ws.take_chunk(3), BTreeSet::from([1, 2]));
        assert!(ws.take_chunk(3).is_empty());
        assert_eq!(ws.take_commit(), BTreeSet::from([2]));
        assert!(ws.take_commit().is_empty());
    }
}
