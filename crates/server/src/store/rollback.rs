//! The online rollback record (`RootState`'s rollback fields, docs/store-format.md): which
//! snapshot the origin is being rolled back to, the snapshot pinning the origin as it was
//! when the rollback started, and how far the copy-back got. Set and cleared only inside
//! transactions, so journal replay and a failover restore it with the rest of the root.

use super::format::RollbackRecord;
use super::{Result, Store, StoreError};
use crate::engine::Refusal;
use csnap_proto::SnapId;

impl Store {
    /// The rollback in progress, if any (as of the last change, committed or not).
    pub fn rollback(&self) -> Option<RollbackRecord> {
        self.meta.root.rollback()
    }

    /// Starts, advances or (`None`) ends the rollback in progress, in the current
    /// transaction. A new record must name two live snapshots and a cursor within the
    /// origin.
    pub fn set_rollback(&mut self, record: Option<RollbackRecord>) -> Result<()> {
        if let Some(r) = record {
            for id in [r.source, r.pin] {
                self.check_live(SnapId(id))?;
            }
            let origin_chunks = self.geometry().origin_chunks();
            if r.cursor > origin_chunks {
                return Err(StoreError::Refused(Refusal::ChunkOutOfRange {
                    chunk: r.cursor,
                    origin_chunks,
                }));
            }
        }
        self.mutate(|s| {
            s.meta.root.set_rollback(record);
            Ok(())
        })
    }
}

/// The checker's view: a rollback record must name live snapshots and a cursor within the
/// origin (a rollback whose source or pin is gone cannot be finished correctly).
pub(super) fn check(store: &Store, problems: &mut Vec<String>) {
    let Some(r) = store.meta.root.rollback() else {
        return;
    };
    for (what, id) in [("source", r.source), ("pin", r.pin)] {
        if store.check_live(SnapId(id)).is_err() {
            problems.push(format!(
                "rollback record names {what} snapshot {id}, which is not a live snapshot"
            ));
        }
    }
    let origin_chunks = store.geometry().origin_chunks();
    if r.cursor > origin_chunks {
        problems.push(format!(
            "rollback cursor {} is past the origin's {origin_chunks} chunks",
            r.cursor
        ));
    }
}
