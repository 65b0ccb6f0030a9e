//! Per-snapshot store usage ("chunks held") without walking the exception tree on the
//! request path.
//!
//! A snapshot holds one store chunk per exception record whose run `first..=last` contains
//! its id, so usage is the prefix sum of a difference array over snapshot ids: +1 at each
//! record's `first`, -1 at `last + 1`. The array has at most two entries per record
//! boundary id (a few per snapshot), lives in memory, and is kept exact by every record
//! insert and removal in O(log snapshots).
//!
//! It is seeded after `open` by a walk of the exception tree in bounded steps that the engine
//! runs between requests, like reclaim. Records at keys the walk has passed are counted by
//! the walk; changes to them are applied to the array at once. Records at keys not yet
//! walked are ignored until the walk reaches them, then counted as they are at that moment.
//! So when the walk ends the figures are exact, and stay exact.

use super::btree::Key;
use csnap_proto::SnapId;
use std::collections::BTreeMap;

#[derive(Debug)]
pub(super) struct UsageCounter {
    /// Difference array over snapshot ids (no zero entries).
    delta: BTreeMap<SnapId, i64>,
    /// Next exception-tree key the seeding walk visits; `None` once it is done.
    cursor: Option<Key>,
    /// Records the seeding walk has visited (for progress reports and tests).
    walked: u64,
}

impl UsageCounter {
    /// A counter for a store whose exception tree has not been walked yet.
    pub(super) fn unseeded() -> UsageCounter {
        UsageCounter {
            delta: BTreeMap::new(),
            cursor: Some(Key::MIN),
            walked: 0,
        }
    }

    pub(super) fn cursor(&self) -> Option<Key> {
        self.cursor
    }

    pub(super) fn is_exact(&self) -> bool {
        self.cursor.is_none()
    }

    pub(super) fn walked(&self) -> u64 {
        self.walked
    }

    fn bump(&mut self, id: SnapId, by: i64) {
        let slot = self.delta.entry(id).or_default();
        *slot += by;
        if *slot == 0 {
            self.delta.remove(&id);
        }
    }

    fn apply(&mut self, first: SnapId, last: SnapId, sign: i64) {
        self.bump(first, sign);
        if let Some(end) = last.0.checked_add(1) {
            self.bump(SnapId(end), -sign);
        }
    }

    /// Is a record at `key` already part of the figures?
    fn counts(&self, key: Key) -> bool {
        self.cursor.is_none_or(|c| key < c)
    }

    /// A record with run `first..=last` was stored at `key`.
    pub(super) fn inserted(&mut self, key: Key, first: SnapId, last: SnapId) {
        if self.counts(key) {
            self.apply(first, last, 1);
        }
    }

    /// The record with run `first..=last` at `key` was removed.
    pub(super) fn removed(&mut self, key: Key, first: SnapId, last: SnapId) {
        if self.counts(key) {
            self.apply(first, last, -1);
        }
    }

    /// The seeding walk visited these records (keys from the cursor on, in order) and will
    /// go on at `next` (`None`: the tree is done).
    pub(super) fn walked_over(&mut self, runs: &[(SnapId, SnapId)], next: Option<Key>) {
        for &(first, last) in runs {
            self.apply(first, last, 1);
        }
        self.walked += runs.len() as u64;
        self.cursor = next;
    }

    /// Usage of each of `ids` (ascending), one pass over the array.
    pub(super) fn figures(&self, ids: impl Iterator<Item = SnapId>) -> BTreeMap<SnapId, u64> {
        let mut out = BTreeMap::new();
        let mut running = 0i64;
        let mut points = self.delta.iter().peekable();
        for id in ids {
            while let Some((&at, &d)) = points.peek() {
                if at > id {
                    break;
                }
                running += d;
                points.next();
            }
            out.insert(id, running.max(0) as u64);
        }
        out
    }

    /// Usage of one snapshot: O(array entries up to `id`).
    pub(super) fn of(&self, id: SnapId) -> u64 {
        let sum: i64 = self.delta.range(..=id).map(|(_, d)| d).sum();
        sum.max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> SnapId {
        SnapId(n)
    }

    #[test]
    fn counts_runs_and_ignores_unwalked_keys() {
        let mut u = UsageCounter::unseeded();
        // Before the walk passes key (5, _), changes there are left to the walk.
        u.inserted(Key::new(5, 1), id(1), id(3));
        assert_eq!(u.of(id(2)), 0);
        u.walked_over(&[(id(1), id(3)), (id(2), id(2))], Some(Key::new(6, 0)));
        assert!(!u.is_exact());
        assert_eq!(
            u.figures([1, 2, 3, 4].into_iter().map(id))
                .into_values()
                .collect::<Vec<_>>(),
            vec![1, 2, 1, 0]
        );
        // A walked key: applied at once. An unwalked one: not.
        u.removed(Key::new(5, 2), id(2), id(2));
        u.inserted(Key::new(7, 4), id(4), id(4));
        assert_eq!(u.of(id(2)), 1);
        assert_eq!(u.of(id(4)), 0);
        u.walked_over(&[(id(4), id(4))], None);
        assert!(u.is_exact());
        assert_eq!(u.of(id(4)), 1);
        u.inserted(Key::new(9, 3), id(3), id(u64::MAX));
        assert_eq!(u.of(id(u64::MAX)), 1);
        assert_eq!(u.walked(), 3);
    }
}
