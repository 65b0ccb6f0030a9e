//! Every snapshot reads as the origin did at its creation, and no origin write is in
//! flight when the store creates one.

use super::Check;
use crate::client::OpState;
use crate::disk::SECT;
use crate::node::Node;
use crate::reference::{decode, Reference};

/// When a store creates a snapshot: no client anywhere holds an origin write grant it can
/// still carry out (alive, not past its lease and margin). A client of an old server with
/// a grant is what the new server's snapshot hold is for.
pub fn on_creation(nodes: &[Node], now: u64, margin_ms: u64, id: u64) -> Check {
    for n in nodes {
        for c in &n.clients {
            let live = now < c.lease_until.saturating_add(margin_ms);
            for op in &c.ops {
                if matches!(op.state, OpState::Granted(_)) && live {
                    return Err(format!(
                        "snapshot {id} created while client {} on {} holds an origin write grant it may still use (lease until {})",
                        c.id, n.id, c.lease_until
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A snapshot read returned `data` for `offset`.
pub fn on_read(reference: &Reference, snap: u64, offset: u64, data: &[u8]) -> Check {
    let Some(rec) = reference.snaps.get(&snap) else {
        return Err(format!(
            "read of snapshot {snap}, which the store never created"
        ));
    };
    for (i, piece) in data.chunks(SECT as usize).enumerate() {
        let s = offset / SECT + i as u64;
        let Some(allowed) = rec.allowed.get(s as usize) else {
            return Err(format!(
                "snapshot {snap} read beyond the origin (sector {s})"
            ));
        };
        match decode(piece, s) {
            Ok(t) if allowed.contains(&t) => {}
            got => {
                return Err(format!(
                    "snapshot {snap} ({}) sector {s} reads {got:?}, but the origin held {allowed:?} at its creation",
                    rec.name
                ))
            }
        }
    }
    Ok(())
}
