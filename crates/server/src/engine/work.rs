//! Part of the engine's state: the requests that could not be answered at once (work
//! items).
//!
//! A work item is re-evaluated from scratch against the engine's state whenever something
//! it waits for changes (see [`super::waiters`]); evaluation is idempotent. Invariant: a
//! work item exists from its request until its one answer ([`Works::finish`]) or its
//! connection's end ([`Works::forget_conn`]), and is answered at most once.

use super::io::{ConnId, Requester};
use csnap_proto::{ChunkRange, SnapId};
use std::collections::{BTreeMap, BTreeSet};

pub(super) type WorkId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WorkKind {
    OriginWrite,
    SnapshotRead(SnapId),
    SnapshotWrite(SnapId),
}

pub(super) struct Work {
    pub(super) who: Requester,
    pub(super) kind: WorkKind,
    pub(super) ranges: Vec<ChunkRange>,
    pub(super) chunks: BTreeSet<u64>,
}

/// The open work items.
pub(super) struct Works {
    next: WorkId,
    items: BTreeMap<WorkId, Work>,
}

impl Default for Works {
    fn default() -> Self {
        Works {
            next: 1,
            items: BTreeMap::new(),
        }
    }
}

impl Works {
    /// A new work item: its id.
    pub(super) fn add(&mut self, work: Work) -> WorkId {
        let w = self.next;
        self.next += 1;
        self.items.insert(w, work);
        w
    }

    pub(super) fn kind(&self, w: WorkId) -> Option<WorkKind> {
        self.items.get(&w).map(|x| x.kind)
    }

    /// The connection that asked (while the item is open).
    pub(super) fn conn(&self, w: WorkId) -> Option<ConnId> {
        self.items.get(&w).map(|x| x.who.conn)
    }

    /// The chunks the item names, in order.
    pub(super) fn chunks(&self, w: WorkId) -> Vec<u64> {
        self.items
            .get(&w)
            .map(|work| work.chunks.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The ranges as the client sent them.
    pub(super) fn ranges(&self, w: WorkId) -> Vec<ChunkRange> {
        self.items
            .get(&w)
            .map(|x| x.ranges.clone())
            .unwrap_or_default()
    }

    /// The item is answered: who to answer (`None` if it was already).
    pub(super) fn finish(&mut self, w: WorkId) -> Option<Requester> {
        self.items.remove(&w).map(|work| work.who)
    }

    /// The connection is gone: its items need no answer.
    pub(super) fn forget_conn(&mut self, conn: ConnId) {
        self.items.retain(|_, w| w.who.conn != conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(conn: ConnId, kind: WorkKind) -> Work {
        Work {
            who: Requester { conn, id: 1 },
            kind,
            ranges: vec![ChunkRange { start: 4, count: 2 }],
            chunks: BTreeSet::from([5, 4]),
        }
    }

    #[test]
    fn an_item_is_answered_once_and_dies_with_its_connection() {
        let mut ws = Works::default();
        let a = ws.add(work(1, WorkKind::OriginWrite));
        let b = ws.add(work(2, WorkKind::SnapshotRead(SnapId(1))));
        assert_eq!(ws.chunks(a), vec![4, 5]);
        assert_eq!(ws.kind(b), Some(WorkKind::SnapshotRead(SnapId(1))));
        assert_eq!(ws.finish(a).map(|r| r.conn), Some(1));
        assert_eq!(ws.finish(a), None);
        ws.forget_conn(2);
        assert_eq!(ws.conn(b), None);
        assert!(ws.chunks(b).is_empty() && ws.ranges(b).is_empty());
    }
}
