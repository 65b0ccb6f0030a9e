//! A deleted snapshot is gone: once an engine acknowledged its deletion
//! (`SnapshotDeleted`, sent when the deletion is committed), no engine grants a read or a
//! write of it, no later store lists it as live (it may still be listed while its space is
//! reclaimed), and once the world settled its space came back: the store's used data
//! chunks are exactly those its remaining snapshots map.

use std::collections::BTreeSet;

use csnap_proto::SnapId;

use super::Check;
use crate::reference::Reference;

/// An engine sends `what` (`SnapshotReadOk` or `SnapshotWriteOk`) for `snap`.
pub fn on_grant(reference: &Reference, node: u32, snap: SnapId, what: &str) -> Check {
    match reference.snaps.get(&snap) {
        Some(rec) if rec.deleted => Err(format!(
            "node {node}'s engine answered {what} for snapshot {snap} ({}) after its deletion was acknowledged",
            rec.name
        )),
        _ => Ok(()),
    }
}

/// A store opened by a new engine lists `rows` (id, still listed as live or invalid: not
/// being deleted).
pub fn listed(reference: &Reference, rows: &[(SnapId, bool)]) -> Check {
    for (id, alive) in rows {
        if let Some(rec) = reference.snaps.get(id) {
            if rec.deleted && *alive {
                return Err(format!(
                    "snapshot {id} ({}) was deleted (acknowledged) but the store lists it again",
                    rec.name
                ));
            }
        }
    }
    Ok(())
}

/// After settling (reclaim had time to finish): nothing is still being deleted, and the
/// store's used data chunks (its checker's count) are exactly the store chunks its snapshots
/// map.
pub fn space_back(deleting: &[SnapId], used: u64, mapped: &BTreeSet<u64>) -> Check {
    if !deleting.is_empty() {
        return Err(format!(
            "deleted snapshots {deleting:?} are still being reclaimed after settling"
        ));
    }
    if used != mapped.len() as u64 {
        return Err(format!(
            "the store uses {used} data chunks but its snapshots map {} ({mapped:?}): space of deleted snapshots did not come back",
            mapped.len()
        ));
    }
    Ok(())
}
