//! The copy and space flow: copy-outs, the store-full policy and its victims, reclaim, and the
//! space watch. A child of `machine.rs` (it combines the parts, as only the machine may).

use super::super::copies::CopyKind;
use super::super::failure::{Failure, Fatal};
use super::super::io::{Action, CopyId, CopySource, LogEvent, LogLevel, StoreFullPolicy};
use super::super::meta_store::{MetaError, MetaStore, Refusal};
use super::super::space::{self, Crossing};
use super::{
    Area, CopyStart, Engine, Space, VictimRule, POLICY_HEADROOM_INSERTS, ROW_HEADROOM_INSERTS,
};
use csnap_proto::{SnapId, SnapshotInfo, SnapshotState, SpaceWarning, StoreArea};

impl<S: MetaStore> Engine<S> {
    /// Reclaim must wait while a client may still write into chunks it would free, or
    /// read them: before activation (leases not yet uploaded), while a deleted or
    /// invalidated snapshot has write leases or store reads, and after a failover until
    /// `hold_snapshots_until`: store reads the old server gave out (snapshot reads', and
    /// origin reads' during a rollback) are not uploaded again, and that is when every one
    /// of them has certainly finished (they were answered before the old server stopped;
    /// the hold adds the clients' lease and its margin, as for their writes).
    pub(super) fn reclaim_blocked(&mut self) -> Result<bool, MetaError> {
        if !self.gate.is_open() || self.now < self.cfg.hold_snapshots_until {
            return Ok(true);
        }
        for snap in self.locks.leased_snapshots() {
            match self.store.snapshot(snap)? {
                Some(SnapshotInfo {
                    state: SnapshotState::Live,
                    ..
                }) => {}
                _ => return Ok(true),
            }
        }
        Ok(false)
    }

    fn victim_rule(&self, kind: &CopyKind) -> VictimRule {
        match (kind, self.cfg.store_full_policy) {
            (CopyKind::OriginCopyOut { chunk }, _) => VictimRule::CopyOut(*chunk),
            (CopyKind::Unshare { snap, .. }, StoreFullPolicy::InvalidateOldest) => {
                VictimRule::OtherThan(*snap)
            }
            (CopyKind::Unshare { .. }, StoreFullPolicy::FailSnapshotWritesOnly) => {
                VictimRule::Nobody
            }
            (CopyKind::CopyBack { .. }, _) => VictimRule::Nobody,
        }
    }

    pub(super) fn start_copy(
        &mut self,
        kind: CopyKind,
        from: CopySource,
    ) -> Result<CopyStart, MetaError> {
        let rule = self.victim_rule(&kind);
        let out_of_victims = match rule {
            // Every live snapshot is gone: none needs the copy-out.
            VictimRule::CopyOut(_) => CopyStart::NotNeeded,
            _ => CopyStart::Full,
        };
        // Records the copy's recording inserts (`on_copy_done` handles a record that
        // fails after the copy).
        let records = kind.records() + ROW_HEADROOM_INSERTS;
        let to = loop {
            // Make room for the records first: a copy whose record does not fit is wasted.
            if self.metadata_short(records)? {
                let records = records + POLICY_HEADROOM_INSERTS;
                match self.make_space(rule, Area::Metadata { records })? {
                    Space::Retry => {}
                    Space::AfterCommit => return Ok(CopyStart::AfterCommit),
                    Space::AfterLeases => return Ok(CopyStart::AfterLeases),
                    Space::NoVictim => return Ok(out_of_victims),
                }
            }
            match self.store.reserve_chunk() {
                Ok(to) => break to,
                Err(MetaError::Refused(Refusal::Full)) => {
                    match self.make_space(rule, Area::Data)? {
                        Space::Retry => continue,
                        Space::AfterCommit => return Ok(CopyStart::AfterCommit),
                        Space::AfterLeases => return Ok(CopyStart::AfterLeases),
                        Space::NoVictim => return Ok(out_of_victims),
                    }
                }
                Err(e) => return Err(e),
            }
        };
        if let CopyKind::Unshare {
            chunk,
            locked: true,
            ..
        } = kind
        {
            self.locks.lock(chunk);
        }
        let (copy, purpose) = self.copies.start(kind, to);
        self.actions.push_back(Action::Copy {
            copy,
            from,
            to,
            purpose,
        });
        Ok(CopyStart::Started)
    }

    /// True if `records` more record insertions might not fit in the metadata area.
    fn metadata_short(&mut self, records: u64) -> Result<bool, MetaError> {
        Ok(self
            .store
            .metadata_space()?
            .is_some_and(|m| m.insert_room < records))
    }

    /// `area` of the store is full: wait for freed chunks to be committed, finish pending
    /// reclaim, and if that is not enough, invalidate snapshots per the policy, oldest
    /// first, until there is room.
    fn make_space(&mut self, rule: VictimRule, area: Area) -> Result<Space, MetaError> {
        if area == Area::Data && self.commits.frees_uncommitted() {
            self.commits.want();
            return Ok(Space::AfterCommit);
        }
        if self.reclaim_blocked()? {
            return Ok(Space::AfterLeases);
        }
        if let Some(space) = self.reclaim_for(area)? {
            return Ok(space);
        }
        loop {
            let Some(victim) = self.victim(rule)? else {
                return Ok(Space::NoVictim);
            };
            self.sacrifice(victim, area, rule)?;
            if self.reclaim_blocked()? {
                return Ok(Space::AfterLeases);
            }
            if let Some(space) = self.reclaim_for(area)? {
                return Ok(space);
            }
            // The victims held nothing alone; they may have been all the snapshots that
            // needed this copy-out, which the next round finds out.
            if let VictimRule::CopyOut(chunk) = rule {
                if self.store.oldest_sharing_origin(chunk)?.is_none() {
                    return Ok(Space::NoVictim);
                }
            }
            if area == Area::Data && self.store.stats()?.free_chunks > 0 {
                return Ok(Space::Retry);
            }
        }
    }

    /// The next snapshot the policy gives up: the oldest live one (of the volume, not of
    /// the snapshots sharing the chunk being copied), never the writer of a snapshot write.
    fn victim(&mut self, rule: VictimRule) -> Result<Option<SnapId>, MetaError> {
        let except = match rule {
            VictimRule::CopyOut(_) => None,
            VictimRule::OtherThan(writer) => Some(writer),
            VictimRule::Nobody => return Ok(None),
        };
        let Some(r) = &self.rollback else {
            return self.store.oldest_live(except);
        };
        // A rollback's source and pin are kept: without them it cannot finish.
        let (source, pin) = (r.source, r.pin);
        Ok(self
            .store
            .list_snapshots()?
            .into_iter()
            .find(|s| {
                s.state == SnapshotState::Live
                    && Some(s.id) != except
                    && s.id != source
                    && s.id != pin
            })
            .map(|s| s.id))
    }

    /// Invalidates `victim` for lack of room in `area`, loudly.
    fn sacrifice(&mut self, victim: SnapId, area: Area, rule: VictimRule) -> Result<(), MetaError> {
        let name = self
            .store
            .snapshot(victim)?
            .map(|s| s.name)
            .unwrap_or_default();
        let policy = self.cfg.store_full_policy;
        // Kept short: it is stored with the snapshot; the log line has the details.
        let reason = match area {
            Area::Data => format!("store full ({policy})"),
            Area::Metadata { .. } => format!("store metadata full ({policy})"),
        };
        self.store.invalidate_snapshot(victim, &reason)?;
        self.commits.snapset_changed();
        self.reclaiming = true;
        let (which, why) = match rule {
            VictimRule::CopyOut(chunk) => (
                "the oldest live snapshot",
                format!("to copy out origin chunk {chunk} (origin writes never fail)"),
            ),
            VictimRule::OtherThan(writer) => (
                "the oldest live snapshot other than the writer",
                format!("to make room for a write to snapshot {writer}"),
            ),
            VictimRule::Nobody => ("a snapshot", String::new()),
        };
        let what = match area {
            Area::Data => "no free chunk in the data area",
            Area::Metadata { .. } => "the metadata area is full",
        };
        let event = LogEvent {
            area: Some(match area {
                Area::Data => StoreArea::Data.to_string(),
                Area::Metadata { .. } => StoreArea::Metadata.to_string(),
            }),
            snapshot: Some((victim, name.clone())),
            ..LogEvent::new("store_full")
        };
        self.log_event(
            LogLevel::Error,
            event,
            format!(
                "SNAPSHOT STORE FULL ({what}): snapshot {victim} ({name:?}), {which}, invalidated at {} by policy {policy} {why}",
                self.now
            ),
        );
        Ok(())
    }

    /// Runs reclaim to make room in `area`: `Some(how to go on)` if it did.
    fn reclaim_for(&mut self, area: Area) -> Result<Option<Space>, MetaError> {
        match area {
            Area::Data => Ok(self.reclaim_for_space()?.then_some(Space::AfterCommit)),
            Area::Metadata { records } => {
                // Node blocks come back as records are removed, usable at once; a whole
                // pass is what gives back everything the invalidated snapshots held.
                self.reclaim_to_end()?;
                Ok((!self.metadata_short(records)?).then_some(Space::Retry))
            }
        }
    }

    /// Runs reclaim until it frees something or has no work left (store-full emergency
    /// path). True if chunks were freed (reusable after the next commit).
    fn reclaim_for_space(&mut self) -> Result<bool, MetaError> {
        while self.reclaiming {
            let p = self.store.reclaim_step(self.cfg.reclaim_budget)?;
            if p.done {
                self.reclaiming = false;
            }
            if p.freed_chunks > 0 {
                self.commits.chunks_freed();
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Runs reclaim until it has no work left (metadata-full emergency path).
    fn reclaim_to_end(&mut self) -> Result<(), MetaError> {
        while self.reclaiming {
            let p = self.store.reclaim_step(self.cfg.reclaim_budget.max(1024))?;
            if p.freed_chunks > 0 {
                self.commits.chunks_freed();
            }
            if p.done {
                self.reclaiming = false;
            }
        }
        Ok(())
    }

    /// A copy's record did not fit in the metadata area although the check before the copy
    /// passed (other copies in flight used the room, or the copy-out needs many records):
    /// give up one more snapshot per the policy, so that the retry makes progress. False if
    /// the policy has nobody to give up.
    fn metadata_full_after_copy(&mut self, rule: VictimRule) -> Result<bool, MetaError> {
        let Some(victim) = self.victim(rule)? else {
            return Ok(false);
        };
        self.sacrifice(victim, Area::Metadata { records: 1 }, rule)?;
        if !self.reclaim_blocked()? {
            self.reclaim_to_end()?;
        }
        Ok(true)
    }

    pub(super) fn background_reclaim(&mut self, budget: usize) -> Result<(), MetaError> {
        if self.reclaiming && !self.reclaim_blocked()? {
            let p = self.store.reclaim_step(budget)?;
            if p.freed_chunks > 0 {
                self.commits.chunks_freed();
            }
            if p.done {
                self.reclaiming = false;
            }
        }
        Ok(())
    }

    pub(super) fn on_copy_done(
        &mut self,
        copy: CopyId,
        result: Result<(), Failure>,
    ) -> Result<(), MetaError> {
        let Some(job) = self.copies.finish(copy) else {
            self.log(
                LogLevel::Warn,
                format!("CopyDone for unknown copy {copy}; ignored"),
            );
            return Ok(());
        };
        if let Err(source) = result {
            self.fail(Fatal::Copy { to: job.to, source });
            return Ok(());
        }
        let chunk = match job.kind {
            CopyKind::OriginCopyOut { chunk } => {
                match self.store.record_copy_out(chunk, job.to) {
                    Ok(true) => self.commits.exception_recorded(chunk),
                    Ok(false) => {}
                    // Nothing recorded: free the copy, make room, and let the writes waiting
                    // for this chunk start over (a new copy-out, or none if no snapshot
                    // needs it any more).
                    Err(MetaError::Refused(Refusal::MetadataFull { .. })) => {
                        self.store.release_chunk(job.to)?;
                        self.metadata_full_after_copy(VictimRule::CopyOut(chunk))?;
                    }
                    Err(e) => return Err(e),
                }
                chunk
            }
            CopyKind::CopyBack { chunk } => {
                if let Some(r) = self.rollback.as_mut() {
                    r.copied(chunk);
                }
                chunk
            }
            CopyKind::Unshare {
                snap,
                chunk,
                locked,
            } => {
                if locked {
                    self.locks.unlock(chunk, 1);
                }
                match self.store.record_snapshot_exception(snap, chunk, job.to) {
                    Ok(()) => self.commits.exception_recorded(chunk),
                    // Deleted or invalidated while the copy ran: the copy is not needed.
                    Err(MetaError::Refused(Refusal::NoSuchSnapshot(_) | Refusal::NotLive(_))) => {
                        self.store.release_chunk(job.to)?;
                    }
                    Err(MetaError::Refused(Refusal::MetadataFull { .. })) => {
                        self.store.release_chunk(job.to)?;
                        let rule = self.victim_rule(&job.kind);
                        if !self.metadata_full_after_copy(rule)? {
                            self.refuse_snapshot_writes(snap, chunk);
                        }
                    }
                    Err(e) => return Err(e),
                }
                chunk
            }
        };
        self.wake_chunk(chunk)
    }

    /// Logs each usage warning level an area crossed upwards since the last call, once
    /// (re-armed when usage fell `WARN_REARM_POINTS` below the level).
    pub(super) fn check_space(&mut self) -> Result<(), MetaError> {
        for (area, used, total) in self.usage()? {
            let levels = match area {
                StoreArea::Data => &self.cfg.data_warn_percents,
                StoreArea::Metadata => &self.cfg.metadata_warn_percents,
            };
            let crossings = self.space.crossings(area, used, total, levels);
            let unit = match area {
                StoreArea::Data => "chunks",
                StoreArea::Metadata => "node blocks",
            };
            let pct = space::percent(used, total);
            for crossing in crossings {
                match crossing {
                    Crossing::Reached { level } => self.log_event(
                        LogLevel::Warn,
                        LogEvent {
                            area: Some(area.to_string()),
                            used_percent: Some(u64::from(pct)),
                            ..LogEvent::new("store_filling")
                        },
                        format!(
                            "SNAPSHOT STORE FILLING: {} at {pct}% used, at or above the {level}% warning level ({used} of {total} {unit}); when it is full, policy {} invalidates snapshots, oldest first",
                            area,
                            self.cfg.store_full_policy
                        ),
                    ),
                    Crossing::Rearmed { level } => self.log(
                        LogLevel::Info,
                        format!(
                            "snapshot store {} back to {pct}% used, below the {level}% warning level",
                            area
                        ),
                    ),
                }
            }
        }
        Ok(())
    }

    /// (area, used, total) of the data area and, if the store reports it, the metadata area.
    fn usage(&mut self) -> Result<Vec<(StoreArea, u64, u64)>, MetaError> {
        let stats = self.store.stats()?;
        let mut out = vec![(
            StoreArea::Data,
            stats.store_chunks.saturating_sub(stats.free_chunks),
            stats.store_chunks,
        )];
        if let Some(m) = self.store.metadata_space()? {
            out.push((
                StoreArea::Metadata,
                m.blocks.saturating_sub(m.free_blocks),
                m.blocks,
            ));
        }
        Ok(out)
    }

    /// Areas at or above a warning level now: the highest level per area.
    pub(super) fn space_warnings(&mut self) -> Result<Vec<SpaceWarning>, MetaError> {
        let mut out = Vec::new();
        for (area, used, total) in self.usage()? {
            let levels = match area {
                StoreArea::Data => &self.cfg.data_warn_percents,
                StoreArea::Metadata => &self.cfg.metadata_warn_percents,
            };
            if let Some(level) = space::current_level(used, total, levels) {
                out.push(SpaceWarning {
                    area,
                    level_percent: level,
                    used_percent: space::percent(used, total),
                });
            }
        }
        Ok(out)
    }
}
