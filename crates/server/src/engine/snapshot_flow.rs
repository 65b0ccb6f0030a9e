//! The snapshot flow: creation (requested, announced, created, committed), deletion and the
//! snapshot limits. A child of `machine.rs` (it combines the parts, as only the machine may).

use super::super::failure::Fatal;
use super::super::io::{LogEvent, LogLevel, Requester};
use super::super::meta_store::{MetaError, MetaStore, Refusal};
use super::super::requests::Reject;
use super::super::snapshots::RequestedSnapshot;
use super::super::work::WorkKind;
use super::Engine;
use csnap_proto::{ErrorCode, ServerMsg, SnapId, SnapRef, SnapshotInfo};

impl<S: MetaStore> Engine<S> {
    /// Refuses a new snapshot (`more` counts it and those queued before it) whose row
    /// would take the snapshot table past its share of the
    /// metadata area: the store-full policy frees records by invalidating snapshots, never
    /// rows, so rows must not crowd out the records.
    fn too_many_snapshots(&mut self, more: u64) -> Result<Option<Reject>, MetaError> {
        Ok(self
            .store
            .metadata_space()?
            .filter(|m| m.snapshot_room < more)
            .map(|m| {
                Reject(
                    ErrorCode::StoreFull,
                    format!(
                        "too many snapshots for the store's metadata area ({} node blocks): delete snapshots (invalidated ones too) to create more",
                        m.blocks
                    ),
                )
            }))
    }

    /// Answers `StoreFull` to the writes of `snap` waiting for an unshare of `chunk` that
    /// found no room and had nothing to give up.
    pub(super) fn refuse_snapshot_writes(&mut self, snap: SnapId, chunk: u64) {
        for w in self.waiters.waiting_on_chunk(chunk) {
            if self.works.kind(w) == Some(WorkKind::SnapshotWrite(snap)) {
                self.reject_work(
                    w,
                    Reject(
                        ErrorCode::StoreFull,
                        format!(
                            "snapshot store metadata area full: no room to write chunk {chunk} of snapshot {snap} (policy {})",
                            self.cfg.store_full_policy
                        ),
                    ),
                );
            }
        }
    }

    /// A snapshot creation request: checked, queued, announced when its turn comes.
    pub(super) fn create_snapshot(
        &mut self,
        who: Requester,
        name: &str,
        token: u64,
    ) -> Result<(), Reject> {
        // The rollback's pin must stay the newest snapshot (see rollback.rs).
        if let Some(r) = self.rollback_conflict() {
            return Err(r);
        }
        self.request_creation(who, name, token, None)
    }

    /// A creation (of a snapshot, or of a rollback's pin) checked and queued.
    pub(super) fn request_creation(
        &mut self,
        who: Requester,
        name: &str,
        token: u64,
        rollback_of: Option<SnapId>,
    ) -> Result<(), Reject> {
        if let Err(why) = csnap_proto::validate_snapshot_name(name) {
            return Err(Reject(
                ErrorCode::BadName,
                format!("invalid snapshot name {name:?}: {why}"),
            ));
        }
        match self.resent_create(who, name, token) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                self.fail(Fatal::Store(e.into()));
                return Ok(());
            }
        }
        let queued = self.creations.is_queued(name);
        let exists = match self.store.snapshot_by_name(name) {
            Ok(found) => found.is_some(),
            Err(e) => {
                self.fail(Fatal::Store(e.into()));
                return Ok(());
            }
        };
        if queued || exists {
            return Err(Reject(
                ErrorCode::NameTaken,
                format!("a snapshot named {name:?} already exists"),
            ));
        }
        let unborn = self.creations.unborn();
        match self.too_many_snapshots(unborn as u64 + 1) {
            Ok(None) => {}
            Ok(Some(r)) => return Err(r),
            Err(e) => {
                self.fail(Fatal::Store(e.into()));
                return Ok(());
            }
        }
        self.creations.request(RequestedSnapshot {
            who,
            name: name.to_owned(),
            token,
            rollback_of,
        });
        if let Err(e) = self.announce_next_snapshot() {
            self.fail(Fatal::Store(e.into()));
        }
        Ok(())
    }

    /// A `CreateSnapshot` whose token (non-zero) matches a creation already requested,
    /// under way or done: the same request resent after the client lost its connection
    /// (perhaps to another server). It is not a second creation: the resend takes over the
    /// answer of one still in progress, or is answered with the snapshot at once. True if
    /// it was such a resend.
    fn resent_create(&mut self, who: Requester, name: &str, token: u64) -> Result<bool, MetaError> {
        if token & super::super::meta_store::CREATE_TOKEN_MASK == 0 {
            return Ok(false);
        }
        if self.creations.resent_before_creation(name, token, who) {
            return Ok(true);
        }
        let Some(info) = self.store.snapshot_by_name(name)? else {
            return Ok(false);
        };
        if !self.store.created_with(info.id, token)? {
            return Ok(false);
        }
        self.log(
            LogLevel::Info,
            format!(
                "snapshot {} ({name:?}): creation request resent; answering it",
                info.id
            ),
        );
        // A pending one is answered once its creation is committed.
        if !self.creations.resent_pending(info.id, who) {
            self.reply(who.conn, who.id, ServerMsg::SnapshotCreated { info });
        }
        Ok(true)
    }

    /// Phase one (see [`Announcement`]): when no announcement is out, announce the next
    /// requested snapshot to every origin client and hold origin grants.
    fn announce_next_snapshot(&mut self) -> Result<(), MetaError> {
        let Some(request) = self.creations.next_to_announce() else {
            return Ok(());
        };
        let id = self.store.next_snapshot_id()?;
        let awaiting = self.sessions.open_origins();
        for &conn in &awaiting {
            let notice = match request.rollback_of {
                Some(source) => ServerMsg::RollbackStarting { source, pin: id },
                None => ServerMsg::NewSnapshot { snap: id },
            };
            self.send(conn, None, notice);
        }
        self.log(
            LogLevel::Info,
            format!(
                "announcing snapshot {id} ({:?}); origin writes wait for {} origin client(s) to acknowledge",
                request.name,
                awaiting.len()
            ),
        );
        self.creations.announce(request, id, awaiting);
        self.try_create_announced()
    }

    /// Phase two: once every origin client acknowledged (or went), nothing writes the
    /// origin; create the snapshot in the store now, release the held writes (they copy
    /// out for it), and make it visible once the creation is committed.
    pub(super) fn try_create_announced(&mut self) -> Result<(), MetaError> {
        if self.sessions.origins_lost() || self.now < self.cfg.hold_snapshots_until {
            return Ok(());
        }
        let Some((request, id)) = self.creations.take_acknowledged() else {
            return Ok(());
        };
        if let Some(source) = request.rollback_of {
            if let Err(r) = self.rollback_source_usable(source)? {
                self.reject(request.who, r);
                for w in self.waiters.take_announcement() {
                    self.evaluate(w)?;
                }
                return self.announce_next_snapshot();
            }
        }
        match self
            .store
            .create_snapshot_with_token(&request.name, self.now, request.token)
        {
            Ok(info) => {
                if info.id != id {
                    // The acknowledgements were for the announcement, whatever its number.
                    self.log(
                        LogLevel::Warn,
                        format!("snapshot announced as {id} was created as {}", info.id),
                    );
                }
                let gen = self.commits.touch();
                if let Some(source) = request.rollback_of {
                    self.start_rollback(source, &info)?;
                }
                self.creations.created(info.id, request.who, gen);
                self.finish_creations()?;
            }
            Err(MetaError::Refused(Refusal::BadName { name, why })) => self.reject(
                request.who,
                Reject(
                    ErrorCode::BadName,
                    format!("invalid snapshot name {name:?}: {why}"),
                ),
            ),
            Err(MetaError::Refused(Refusal::NameTaken(name))) => self.reject(
                request.who,
                Reject(
                    ErrorCode::NameTaken,
                    format!("a snapshot named {name:?} already exists"),
                ),
            ),
            // Refused: nothing is sacrificed for a new snapshot (copies keep room for one
            // row, so this means the policy had nothing left to give up).
            Err(MetaError::Refused(Refusal::MetadataFull { .. })) => self.reject(
                request.who,
                Reject(
                    ErrorCode::StoreFull,
                    "snapshot store metadata area is full: delete snapshots to make room".into(),
                ),
            ),
            Err(e) => return Err(e),
        }
        for w in self.waiters.take_announcement() {
            self.evaluate(w)?;
        }
        self.announce_next_snapshot()
    }

    /// Makes the snapshots whose creation is committed visible, answering their requests.
    pub(super) fn finish_creations(&mut self) -> Result<(), MetaError> {
        let commits = &self.commits;
        let ready = self
            .creations
            .take_committed(|gen| commits.is_committed(gen));
        for (snap, who) in ready {
            self.finish_creation(snap, who)?;
        }
        Ok(())
    }

    fn finish_creation(&mut self, snap: SnapId, who: Requester) -> Result<(), MetaError> {
        if let Some(r) = self.rollback.as_mut().filter(|r| r.pin == snap) {
            // Answered once every origin client asks before reading (`drive_rollback`).
            r.reply_to = Some(who);
            return Ok(());
        }
        match self.store.snapshot(snap)? {
            Some(info) => {
                self.log_event(
                    LogLevel::Info,
                    LogEvent {
                        snapshot: Some((info.id, info.name.clone())),
                        ..LogEvent::new("snapshot_created")
                    },
                    format!("snapshot {} ({:?}) is live", info.id, info.name),
                );
                self.reply(who.conn, who.id, ServerMsg::SnapshotCreated { info });
            }
            None => self.reject(
                who,
                Reject(
                    ErrorCode::NoSuchSnapshot,
                    format!("snapshot {snap} disappeared during creation"),
                ),
            ),
        }
        Ok(())
    }

    pub(super) fn resolve(&mut self, snap: &SnapRef) -> Result<Option<SnapshotInfo>, MetaError> {
        let info = match snap {
            SnapRef::Id(id) => self.store.snapshot(*id)?,
            SnapRef::Name(name) => self.store.snapshot_by_name(name)?,
        };
        Ok(info.filter(|i| !self.creations.is_pending(i.id)))
    }

    pub(super) fn delete_snapshot(&mut self, who: Requester, snap: SnapId) -> Result<(), Reject> {
        let result = (|| -> Result<Result<(), Reject>, MetaError> {
            if let Some(r) = self.rollback_uses(snap) {
                return Ok(Err(r));
            }
            let Some(info) = self.resolve(&SnapRef::Id(snap))? else {
                return Ok(Err(Reject(
                    ErrorCode::NoSuchSnapshot,
                    format!("no snapshot {snap}"),
                )));
            };
            self.store.delete_snapshot(info.id)?;
            let gen = self.commits.snapset_changed();
            self.reclaiming = true;
            self.log_event(
                LogLevel::Info,
                LogEvent {
                    snapshot: Some((info.id, info.name.clone())),
                    ..LogEvent::new("snapshot_deleted")
                },
                format!(
                    "snapshot {} ({:?}) deleted; reclaiming its space in the background",
                    info.id, info.name
                ),
            );
            self.commits
                .defer(gen, who, ServerMsg::SnapshotDeleted { snap: info.id });
            Ok(Ok(()))
        })();
        match result {
            Ok(r) => r,
            Err(e) => {
                self.fail(Fatal::Store(e.into()));
                Ok(())
            }
        }
    }

    pub(super) fn visible_snapshots(&mut self) -> Result<Vec<SnapshotInfo>, MetaError> {
        let mut list = self.store.list_snapshots()?;
        list.retain(|s| !self.creations.is_pending(s.id));
        Ok(list)
    }
}
