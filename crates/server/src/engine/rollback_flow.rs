//! The engine's side of an online rollback: how the rollback part (`rollback.rs`) meets the
//! store, the copies, the read locks and the clients. A child of `machine.rs` (it combines
//! the parts, as only the machine may); docs/architecture.md "Online rollback" has the
//! design.

use super::super::copies::CopyKind;
use super::super::failure::Fatal;
use super::super::io::{Action, CopySource, LogEvent, LogLevel, Requester};
use super::super::meta_store::{MetaError, MetaStore, SnapChunk};
use super::super::requests::Reject;
use super::super::rollback::{Rollback, RollbackRecord};
use super::super::sessions::count_one;
use super::{CopyStart, Engine};
use csnap_proto::{
    ChunkRange, DiffEnd, ErrorCode, ServerMsg, SnapId, SnapRef, SnapshotInfo, SnapshotState,
    StoreAddr,
};
use std::collections::BTreeSet;

/// Scan pages (of about `SCAN_BUDGET` exception records each) one event may read to fill
/// the copy-back window: bounded, so requests queued behind it barely notice.
const SCAN_PAGES_PER_EVENT: usize = 4;
const SCAN_BUDGET: u32 = 1024;

impl<S: MetaStore> Engine<S> {
    /// At start: a rollback recorded in the store (a crash or failover interrupted it)
    /// goes on where its last commit left it.
    pub(super) fn resume_rollback(&mut self) -> Result<(), MetaError> {
        let Some(record) = self.store.rollback()? else {
            return Ok(());
        };
        let origin_chunks = self.geometry.origin_chunks;
        self.rollback = Some(Rollback::new(
            record,
            origin_chunks,
            self.cfg.rollback_window,
            0,
            BTreeSet::new(),
        ));
        let name = self.snapshot_name(record.source)?;
        self.log_event(
            LogLevel::Info,
            LogEvent {
                snapshot: Some((record.source, name.clone())),
                ..LogEvent::new("rollback_started")
            },
            format!(
                "resuming the rollback of the origin to snapshot {} ({name:?}) at chunk {} of {origin_chunks}",
                record.source, record.cursor
            ),
        );
        Ok(())
    }

    pub(super) fn snapshot_name(&mut self, snap: SnapId) -> Result<String, MetaError> {
        Ok(self
            .store
            .snapshot(snap)?
            .map(|s| s.name)
            .unwrap_or_default())
    }

    /// Why a request conflicting with a rollback (running or about to start) is refused.
    pub(super) fn rollback_conflict(&self) -> Option<Reject> {
        if let Some(r) = &self.rollback {
            return Some(Reject(
                ErrorCode::RollbackInProgress,
                format!(
                    "a rollback of the origin to snapshot {} is in progress ({} of {} chunks done); try again when it is done",
                    r.source,
                    r.cursor(),
                    self.geometry.origin_chunks
                ),
            ));
        }
        self.creations.queued_rollback().map(|source| {
            Reject(
                ErrorCode::RollbackInProgress,
                format!("a rollback of the origin to snapshot {source} is starting"),
            )
        })
    }

    /// Refuses to delete the source or the pin of a rollback running or starting.
    pub(super) fn rollback_uses(&self, snap: SnapId) -> Option<Reject> {
        let running = self.rollback.as_ref().filter(|r| r.involves(snap));
        let starting = self.creations.queued_rollback().filter(|s| *s == snap);
        if running.is_none() && starting.is_none() {
            return None;
        }
        let source = running.map_or(snap, |r| r.source);
        Some(Reject(
            ErrorCode::RollbackInProgress,
            format!(
                "snapshot {snap} is used by the rollback of the origin to snapshot {source}: it is kept until the rollback is done"
            ),
        ))
    }

    /// Whether `source` may be rolled back to (a visible, live snapshot).
    pub(super) fn rollback_source_usable(
        &mut self,
        source: SnapId,
    ) -> Result<Result<(), Reject>, MetaError> {
        Ok(match self.resolve(&SnapRef::Id(source))? {
            None => Err(Reject(
                ErrorCode::NoSuchSnapshot,
                format!("no snapshot {source} to roll back to"),
            )),
            Some(info) if info.state != SnapshotState::Live => Err(Reject(
                ErrorCode::SnapshotInvalid,
                format!(
                    "snapshot {source} ({:?}) is not live: it has no contents to roll back to",
                    info.name
                ),
            )),
            Some(_) => Ok(()),
        })
    }

    /// `ClientMsg::Rollback`: checked, then queued as the creation of its pin, announced
    /// to the origin clients with `RollbackStarting` (`start_rollback` follows).
    pub(super) fn request_rollback(
        &mut self,
        who: Requester,
        source: SnapId,
        pin_name: &str,
    ) -> Result<(), Reject> {
        if !self.store.keeps_rollback() {
            return Err(Reject(
                ErrorCode::BadRequest,
                "this server's store keeps no rollback record: online rollback is not supported"
                    .into(),
            ));
        }
        if let Some(r) = self.rollback_conflict() {
            return Err(r);
        }
        match self.rollback_source_usable(source) {
            Ok(Ok(())) => {}
            Ok(Err(r)) => return Err(r),
            Err(e) => {
                self.fail(Fatal::Store(e.into()));
                return Ok(());
            }
        }
        self.request_creation(who, pin_name, 0, Some(source))
    }

    /// The pin `pin` was just created in the store (every origin client acknowledged
    /// `RollbackStarting`): record the rollback in the same transaction and begin.
    pub(super) fn start_rollback(
        &mut self,
        source: SnapId,
        pin: &SnapshotInfo,
    ) -> Result<(), MetaError> {
        let record = RollbackRecord {
            source,
            pin: pin.id,
            cursor: 0,
        };
        self.store.set_rollback(Some(record))?;
        let gen = self.commits.touch();
        // Origin clients that connected after the announcement read the origin directly:
        // they are told now, and nothing is copied back until they acknowledged too.
        let awaiting = self.sessions.open_origins();
        for &conn in &awaiting {
            self.send(
                conn,
                None,
                ServerMsg::RollbackStarting {
                    source,
                    pin: pin.id,
                },
            );
        }
        let origin_chunks = self.geometry.origin_chunks;
        self.rollback = Some(Rollback::new(
            record,
            origin_chunks,
            self.cfg.rollback_window,
            gen,
            awaiting,
        ));
        let name = self.snapshot_name(source)?;
        self.log_event(
            LogLevel::Info,
            LogEvent {
                snapshot: Some((source, name.clone())),
                ..LogEvent::new("rollback_started")
            },
            format!(
                "rolling the origin back to snapshot {source} ({name:?}); the origin as it was is kept as snapshot {} ({:?})",
                pin.id, pin.name
            ),
        );
        Ok(())
    }

    /// Where the source reads `chunk` from, if it is still to be copied back: an origin
    /// read goes there instead. `None`: read the origin.
    fn rollback_read_from(&mut self, chunk: u64) -> Result<Option<u64>, MetaError> {
        let Some(r) = &self.rollback else {
            return Ok(None);
        };
        if r.copied_back(chunk) {
            return Ok(None);
        }
        let (source, pin) = (r.source, r.pin);
        let from_source = self.store.snapshot_chunk(source, chunk)?;
        let from_pin = self.store.snapshot_chunk(pin, chunk)?;
        Ok(match (from_source, from_pin) {
            (SnapChunk::Store { store_chunk: s, .. }, SnapChunk::Store { store_chunk: p, .. })
                if s == p =>
            {
                None
            }
            (SnapChunk::Store { store_chunk, .. }, _) => Some(store_chunk),
            (SnapChunk::Origin, _) => None,
        })
    }

    /// An origin write to `chunk` must wait for the rollback: the chunk is still to be
    /// copied back, or its copy back is not committed yet.
    pub(super) fn rollback_holds_write(&mut self, chunk: u64) -> Result<bool, MetaError> {
        let Some(r) = &self.rollback else {
            return Ok(false);
        };
        if r.durably_rolled(chunk) {
            return Ok(false);
        }
        if chunk < r.cursor() || r.in_window(chunk) {
            return Ok(true);
        }
        Ok(self.rollback_read_from(chunk)?.is_some())
    }

    /// `ClientMsg::QueryOriginRead`: which chunks still read as the source from the store.
    /// Each store address given out is a store read of the session under the source's
    /// leases, as a snapshot read's: the source may be deleted as soon as the rollback
    /// ends, and its chunks must not be reused until the client released the read
    /// (`ReleaseStoreReads { snap: source }`) or its session is gone.
    pub(super) fn query_origin_read(
        &mut self,
        who: Requester,
        ranges: &[ChunkRange],
    ) -> Result<(), Reject> {
        let chunks = self.request_chunks(ranges)?;
        let source = self.rollback.as_ref().map(|r| r.source);
        let mut store = Vec::new();
        for chunk in chunks {
            match self.rollback_read_from(chunk) {
                Ok(Some(store_chunk)) => store.push(StoreAddr { chunk, store_chunk }),
                Ok(None) => {}
                Err(e) => {
                    self.fail(Fatal::Store(e.into()));
                    return Ok(());
                }
            }
        }
        if let (Some(snap), false) = (source, store.is_empty()) {
            if let Some(c) = self.sessions.get_mut(who.conn) {
                for a in &store {
                    count_one(&mut c.store_reads, (snap, a.chunk));
                }
                self.locks.add_leases(snap, store.len() as u32);
            }
        }
        self.reply(who.conn, who.id, ServerMsg::OriginReadOk { store, source });
        Ok(())
    }

    /// After a commit: what of the rollback became durable; its end tells the clients.
    pub(super) fn rollback_committed(&mut self) -> Result<(), MetaError> {
        let commits = &self.commits;
        let Some(r) = self.rollback.as_mut() else {
            return Ok(());
        };
        if !r.committed(|gen| commits.is_committed(gen)) {
            return Ok(());
        }
        let (source, copied) = (r.source, r.chunks_copied);
        self.rollback = None;
        for conn in self.sessions.open_origins() {
            self.send(conn, None, ServerMsg::RollbackDone { source });
        }
        let name = self.snapshot_name(source)?;
        self.log_event(
            LogLevel::Info,
            LogEvent {
                snapshot: Some((source, name.clone())),
                ..LogEvent::new("rollback_done")
            },
            format!(
                "the origin is rolled back to snapshot {source} ({name:?}): copy-back done ({copied} chunks copied by this server)"
            ),
        );
        Ok(())
    }

    /// Moves the rollback on (after every event; idempotent): answers its requester once
    /// the start is durable and acknowledged, fills the window, starts what may start,
    /// records the cursor and, at the end, "no rollback".
    pub(super) fn drive_rollback(&mut self) -> Result<(), MetaError> {
        let Some(r) = self.rollback.as_mut() else {
            return Ok(());
        };
        if let Some(who) = r.take_reply() {
            let (source, pin) = (r.source, r.pin);
            match self.store.snapshot(pin)? {
                Some(pin) => {
                    self.reply(who.conn, who.id, ServerMsg::RollbackStarted { source, pin })
                }
                None => self.reply(
                    who.conn,
                    who.id,
                    super::error(ErrorCode::Internal, format!("rollback pin {pin} is gone")),
                ),
            }
        }
        if !self.gate.is_open() || !self.rollback.as_ref().is_some_and(Rollback::may_copy) {
            return Ok(());
        }
        self.fill_rollback_window()?;
        let preparing = self
            .rollback
            .as_ref()
            .map_or(Vec::new(), Rollback::preparing);
        for chunk in preparing {
            self.prepare_copy_back(chunk)?;
        }
        let Some(r) = self.rollback.as_mut() else {
            return Ok(());
        };
        if r.advance().is_some() {
            let record = r.record();
            let percent = r.progress_to_log();
            self.store.set_rollback(Some(record))?;
            let gen = self.commits.touch();
            if let Some(r) = self.rollback.as_mut() {
                r.recorded(gen, record.cursor);
            }
            if let Some(percent) = percent {
                let name = self.snapshot_name(record.source)?;
                self.log_event(
                    LogLevel::Info,
                    LogEvent::new("rollback_progress"),
                    format!(
                        "rollback to snapshot {} ({name:?}): {percent}% of the origin copied back (chunk {} of {})",
                        record.source, record.cursor, self.geometry.origin_chunks
                    ),
                );
            }
        }
        if self.rollback.as_ref().is_some_and(Rollback::finished) {
            self.store.set_rollback(None)?;
            let gen = self.commits.touch();
            if let Some(r) = self.rollback.as_mut() {
                r.ending(gen);
            }
        }
        Ok(())
    }

    /// Reads scan pages (the chunks the source and the pin read differently) into the
    /// window while it has room.
    fn fill_rollback_window(&mut self) -> Result<(), MetaError> {
        for _ in 0..SCAN_PAGES_PER_EVENT {
            let Some(r) = self.rollback.as_ref() else {
                return Ok(());
            };
            let Some(from) = r.scan_from() else {
                return Ok(());
            };
            let (source, pin) = (r.source, r.pin);
            let page = self.store.diff_page(
                DiffEnd::Snapshot(source),
                DiffEnd::Snapshot(pin),
                from,
                SCAN_BUDGET,
            )?;
            let chunks: Vec<u64> = page
                .ranges
                .iter()
                .filter_map(ChunkRange::chunks)
                .flatten()
                .collect();
            if let Some(r) = self.rollback.as_mut() {
                r.found(chunks, page.next);
            }
        }
        Ok(())
    }

    /// One chunk of the window: its copy-out for every snapshot sharing the origin
    /// (durable first), no snapshot reader on the origin chunk, then the copy back.
    fn prepare_copy_back(&mut self, chunk: u64) -> Result<(), MetaError> {
        if self.copies.copying_out(chunk) {
            return Ok(());
        }
        if self.store.oldest_sharing_origin(chunk)?.is_some() {
            match self.start_copy(
                CopyKind::OriginCopyOut { chunk },
                CopySource::Origin { chunk },
            )? {
                CopyStart::Started => {
                    if let Some(r) = self.rollback.as_mut() {
                        r.paused = false;
                    }
                }
                CopyStart::AfterCommit | CopyStart::AfterLeases => {}
                CopyStart::Full | CopyStart::NotNeeded => {
                    // Nothing may be given up (the source and the pin are kept): the
                    // copy-back waits for room, loudly (once).
                    let first_time = self
                        .rollback
                        .as_mut()
                        .is_some_and(|r| !std::mem::replace(&mut r.paused, true));
                    if first_time && self.store.oldest_sharing_origin(chunk)?.is_some() {
                        self.log(
                            LogLevel::Error,
                            format!("rollback paused at origin chunk {chunk}: the snapshot store is full and only the rollback's source and pin are left; delete snapshots to let it go on"),
                        );
                    }
                }
            }
            return Ok(());
        }
        if self.read_locks(chunk) > 0 {
            return Ok(());
        }
        if !self.commits.chunk_committed(chunk) {
            self.commits.want();
            return Ok(());
        }
        let Some(r) = self.rollback.as_ref() else {
            return Ok(());
        };
        match self.store.snapshot_chunk(r.source, chunk)? {
            SnapChunk::Store { store_chunk, .. } => {
                let (copy, _) = self.copies.start(CopyKind::CopyBack { chunk }, store_chunk);
                self.actions.push_back(Action::CopyToOrigin {
                    copy,
                    from: store_chunk,
                    chunk,
                });
                if let Some(r) = self.rollback.as_mut() {
                    r.copying(chunk, copy);
                }
            }
            // The origin already is the source's (never expected in the window).
            SnapChunk::Origin => {
                if let Some(r) = self.rollback.as_mut() {
                    r.copied(chunk);
                }
            }
        }
        Ok(())
    }
}
