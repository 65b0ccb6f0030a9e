//! Part of the engine's state: the data copies in flight (origin copy-outs and unshares).
//!
//! Invariant: every copy in `jobs` is indexed once, under its origin chunk in
//! `origin_copies` (a copy-out) or under (snapshot, chunk) in `unshares` (an unshare), and
//! nothing else is; so at most one copy-out per origin chunk and one unshare per snapshot
//! chunk runs at a time, and requests on such a chunk wait for it instead of racing it.

use super::io::{CopyId, CopyPurpose};
use csnap_proto::SnapId;
use std::collections::HashMap;

/// What a copy is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CopyKind {
    /// Origin chunk copied out for every snapshot that still shares it.
    OriginCopyOut { chunk: u64 },
    /// A snapshot's chunk copied to its own exception before a snapshot write. `locked`:
    /// the source is the origin, read-locked by the engine while the copy runs.
    Unshare {
        snap: SnapId,
        chunk: u64,
        locked: bool,
    },
    /// An online rollback's copy of the source's store chunk back onto origin `chunk`
    /// (the rollback part tracks it; no record is made).
    CopyBack { chunk: u64 },
}

impl CopyKind {
    /// Record insertions recording this copy takes: one for a copy-out (more only when
    /// snapshot writes left several gaps: then the record may fail after the copy, which
    /// the engine handles), up to three for an unshare's split.
    pub(super) fn records(self) -> u64 {
        match self {
            CopyKind::OriginCopyOut { .. } => 1,
            CopyKind::Unshare { .. } => 3,
            CopyKind::CopyBack { .. } => 0,
        }
    }

    fn purpose(self) -> CopyPurpose {
        match self {
            CopyKind::OriginCopyOut { .. } => CopyPurpose::CopyOut,
            CopyKind::Unshare { snap, .. } => CopyPurpose::Unshare { snap },
            CopyKind::CopyBack { .. } => CopyPurpose::CopyBack,
        }
    }
}

/// A copy in flight: what for, and the store chunk it fills.
#[derive(Clone, Copy, Debug)]
pub(super) struct CopyJob {
    pub(super) kind: CopyKind,
    pub(super) to: u64,
}

/// The copies in flight.
pub(super) struct Copies {
    next: CopyId,
    jobs: HashMap<CopyId, CopyJob>,
    origin_copies: HashMap<u64, CopyId>,
    unshares: HashMap<(SnapId, u64), CopyId>,
}

impl Default for Copies {
    fn default() -> Self {
        Copies {
            next: 1,
            jobs: HashMap::new(),
            origin_copies: HashMap::new(),
            unshares: HashMap::new(),
        }
    }
}

impl Copies {
    /// A copy-out of origin `chunk` is in flight.
    pub(super) fn copying_out(&self, chunk: u64) -> bool {
        self.origin_copies.contains_key(&chunk)
    }

    /// An unshare of `snap`'s `chunk` is in flight.
    pub(super) fn unsharing(&self, snap: SnapId, chunk: u64) -> bool {
        self.unshares.contains_key(&(snap, chunk))
    }

    /// Registers a new copy into store chunk `to`: its id and purpose.
    pub(super) fn start(&mut self, kind: CopyKind, to: u64) -> (CopyId, CopyPurpose) {
        let copy = self.next;
        self.next += 1;
        match kind {
            CopyKind::OriginCopyOut { chunk } => {
                self.origin_copies.insert(chunk, copy);
            }
            CopyKind::Unshare { snap, chunk, .. } => {
                self.unshares.insert((snap, chunk), copy);
            }
            CopyKind::CopyBack { .. } => {}
        }
        self.jobs.insert(copy, CopyJob { kind, to });
        (copy, kind.purpose())
    }

    /// The copy is done (or failed): it is no longer in flight. `None` for an unknown id.
    pub(super) fn finish(&mut self, copy: CopyId) -> Option<CopyJob> {
        let job = self.jobs.remove(&copy)?;
        match job.kind {
            CopyKind::OriginCopyOut { chunk } => {
                self.origin_copies.remove(&chunk);
            }
            CopyKind::Unshare { snap, chunk, .. } => {
                self.unshares.remove(&(snap, chunk));
            }
            CopyKind::CopyBack { .. } => {}
        }
        Some(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_indexed_while_in_flight_only() {
        let mut c = Copies::default();
        let (a, purpose) = c.start(CopyKind::OriginCopyOut { chunk: 3 }, 10);
        assert_eq!(purpose, CopyPurpose::CopyOut);
        let unshare = CopyKind::Unshare {
            snap: SnapId(2),
            chunk: 3,
            locked: true,
        };
        let (b, _) = c.start(unshare, 11);
        assert_ne!(a, b);
        assert!(c.copying_out(3) && c.unsharing(SnapId(2), 3));
        assert!(!c.unsharing(SnapId(1), 3));
        assert_eq!(c.finish(a).map(|j| j.to), Some(10));
        assert!(!c.copying_out(3) && c.unsharing(SnapId(2), 3));
        assert_eq!(c.finish(a).map(|j| j.to), None, "finished once");
        assert_eq!(c.finish(b).map(|j| j.kind), Some(unshare));
        assert!(!c.unsharing(SnapId(2), 3));
    }
}
