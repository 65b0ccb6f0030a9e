//! Every acknowledged write survives: an origin sector holds its last version promised
//! durable (a FUA write completed, or a flush of the writing client completed after it) or
//! a later one, also after node crashes lost unflushed writes; and every snapshot whose
//! creation was reported to the application stays listed.

use csnap_proto::SnapId;

use super::Check;
use crate::disk::{Dev, Rack, SECT};
use crate::reference::{decode, Reference};

/// Reads the whole origin from the shared device and compares.
pub fn origin(rack: &Rack, reference: &Reference) -> Check {
    let n = reference.origin.len() as u64;
    let mut image = vec![0u8; (n * SECT) as usize];
    rack.read(Dev::Origin, &mut image, 0)
        .map_err(|e| format!("origin read: {e}"))?;
    for s in 0..n {
        let piece = &image[(s * SECT) as usize..((s + 1) * SECT) as usize];
        let allowed = reference.origin[s as usize].allowed();
        match decode(piece, s) {
            Ok(t) if allowed.contains(&t) => {}
            got => {
                return Err(format!(
                    "origin sector {s} holds {got:?}; allowed {allowed:?} (history {:?})",
                    reference.origin[s as usize]
                ))
            }
        }
    }
    Ok(())
}

/// The store as a new engine opened it lists `listed` (id, name): every snapshot reported
/// created (and whose deletion was not asked) is among them. Records of unreported creations the store lost
/// are forgotten (records of deleted snapshots are kept: reads may still be in flight).
pub fn reported_listed(reference: &mut Reference, listed: &[(SnapId, String)]) -> Check {
    let mut gone = Vec::new();
    for (id, rec) in &reference.snaps {
        if listed.iter().any(|(i, n)| i == id && *n == rec.name) {
            continue;
        }
        if rec.delete_asked {
            continue;
        }
        if rec.reported {
            return Err(format!(
                "snapshot {} (id {id}) was reported created but the store no longer lists it: {listed:?}",
                rec.name
            ));
        }
        gone.push(*id);
    }
    for id in gone {
        reference.snaps.remove(&id);
    }
    Ok(())
}
