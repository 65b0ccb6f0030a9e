//! The status flow: the server's figures for `csnapctl status`. A child of `machine.rs` (it
//! combines the parts, as only the machine may).

use super::super::failure::Fatal;
use super::super::meta_store::{MetaError, MetaStore};
use super::Engine;
use csnap_proto::{RollbackStatus, ServerStatus};

impl<S: MetaStore> Engine<S> {
    /// The server's figures as `csnapctl status` shows them. `None` if the store could not
    /// be read: the engine has failed then (an [`Action::Fatal`](super::super::io::Action::Fatal) is queued), as it would
    /// on a client's `Status` request.
    pub fn status(&mut self) -> Option<ServerStatus> {
        if self.failed {
            return None;
        }
        match self.status_figures() {
            Ok(status) => Some(status),
            Err(e) => {
                self.fail(Fatal::Store(e.into()));
                None
            }
        }
    }

    pub(super) fn status_figures(&mut self) -> Result<ServerStatus, MetaError> {
        let stats = self.store.stats()?;
        let metadata = self.store.metadata_space()?;
        let space_warnings = self.space_warnings()?;
        let snapshots = self.visible_snapshots()?.len() as u32;
        let rollback = match self
            .rollback
            .as_ref()
            .map(|r| (r.source, r.pin, r.cursor(), r.chunks_copied))
        {
            Some((source, pin, position, chunks_copied)) => Some(Box::new(RollbackStatus {
                source,
                pin,
                position,
                origin_chunks: stats.origin_chunks,
                chunks_copied,
                source_name: self.snapshot_name(source)?,
                pin_name: self.snapshot_name(pin)?,
            })),
            None => None,
        };
        Ok(ServerStatus {
            active: self.gate.is_open(),
            awaited_clients: self.gate.awaited(),
            connected_clients: self.sessions.len() as u32,
            chunk_size: stats.chunk_size,
            origin_chunks: stats.origin_chunks,
            store_chunks: stats.store_chunks,
            free_chunks: stats.free_chunks,
            snapshots,
            pending_snapshots: self.creations.in_progress() as u32,
            store_full_policy: self.cfg.store_full_policy.to_string(),
            reclaiming: self.reclaiming,
            reclaim: if self.reclaiming {
                self.store
                    .reclaim_position()?
                    .map(|p| csnap_proto::ReclaimStatus {
                        snapshots: p.snapshots,
                        position: p.position,
                        origin_chunks: stats.origin_chunks,
                    })
            } else {
                None
            },
            usage_exact: self.store.usage_exact(),
            rollback,
            metadata_blocks: metadata.map_or(0, |m| m.blocks),
            free_metadata_blocks: metadata.map_or(0, |m| m.free_blocks),
            space_warnings,
        })
    }
}
