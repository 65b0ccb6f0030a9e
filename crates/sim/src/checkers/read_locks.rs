//! No origin write is granted on a chunk while a snapshot client holds an origin read lock
//! on it that the granting engine knows of: one it granted itself (`SnapshotReadOk` with
//! the chunk in `origin_locked`) or one the client uploaded to it after a reconnection
//! (`UploadLocks`), while the client is connected to it. A lock is held from the answer
//! until the client read the origin and released it.

use super::Check;
use crate::client::OpState;
use crate::node::Node;

/// Engine run `serial` on `node` sends `OriginWriteOk` for `chunks`.
pub fn on_grant(nodes: &[Node], node: u32, serial: u64, chunks: &[u64]) -> Check {
    for n in nodes {
        for c in &n.clients {
            if c.locks_known_by != Some(serial) || c.conn_serial != Some(serial) {
                continue;
            }
            for op in &c.ops {
                let OpState::Located { origin_locked, .. } = &op.state else {
                    continue;
                };
                let held = origin_locked
                    .iter()
                    .filter_map(|r| r.chunks())
                    .flatten()
                    .find(|x| chunks.contains(x));
                if let Some(x) = held {
                    return Err(format!(
                        "node {node}'s engine granted an origin write on chunk {x} while snapshot client {} on {} holds a read lock on it that the engine knows of",
                        c.id, n.id
                    ));
                }
            }
        }
    }
    Ok(())
}
