//! Every snapshot reads as the origin did at its creation plus its own acknowledged
//! writes, and no origin write is in flight when the store creates one.

use csnap_proto::SnapId;

use super::Check;
use crate::client::OpState;
use crate::disk::SECT;
use crate::node::Node;
use crate::reference::{decode, ReadWindow, Reference};

/// When a store creates a snapshot: no client anywhere holds an origin write grant it can
/// still carry out (alive, not past its lease and margin). A client of an old server with
/// a grant is what the new server's snapshot hold is for.
pub fn on_creation(nodes: &[Node], now: u64, margin_ms: u64, id: SnapId) -> Check {
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

/// A snapshot read returned `data` for `offset`: each sector holds what the snapshot
/// could read when the read was asked (`window`), or can read now, or one of its own
/// writes that landed since. `window: None`: a read of the settled store.
pub fn on_read(
    reference: &Reference,
    snap: SnapId,
    offset: u64,
    data: &[u8],
    window: Option<&ReadWindow>,
) -> Check {
    let Some(rec) = reference.snaps.get(&snap) else {
        return Err(format!(
            "read of snapshot {snap}, which the store never created"
        ));
    };
    for (i, piece) in data.chunks(SECT as usize).enumerate() {
        let s = offset / SECT + i as u64;
        if rec.base.get(s as usize).is_none() {
            return Err(format!(
                "snapshot {snap} read beyond the origin (sector {s})"
            ));
        }
        let allowed = rec.allowed(s);
        let got = decode(piece, s);
        if let Ok(t) = got {
            if allowed.contains(&t) {
                continue;
            }
            if let Some(w) = window {
                if w.then.get(i).is_some_and(|a| a.contains(&t))
                    || (t >= w.tag_floor && rec.wrote(s, t))
                {
                    continue;
                }
            }
        }
        let then = window.and_then(|w| w.then.get(i));
        return Err(format!(
            "snapshot {snap} ({}) sector {s} reads {got:?}, but it may read {allowed:?} (the origin at its creation {:?}, its own writes {:?}; when asked {then:?})",
            rec.name,
            rec.base[s as usize],
            rec.writes.get(&s)
        ));
    }
    Ok(())
}
