//! The sessions flow: opening and closing sessions, uploaded locks, lost and silent clients,
//! orphaned locks and origin leases. A child of `machine.rs` (it combines the parts, as only
//! the machine may).

use super::super::io::{Action, ConnId, LogEvent, LogLevel, Requester, LEASE_MARGIN_SECS};
use super::super::locks::{OrphanedLocks, Released};
use super::super::meta_store::{MetaError, MetaStore};
use super::super::requests::{check_snapshot_kind, error, wrong_kind, Reject};
use super::super::sessions::count_one;
use super::super::work::WorkKind;
use super::{Engine, CLOCK_SLACK_SECS};
use csnap_proto::page_len;
use csnap_proto::{
    ClientId, ClientKind, ClientMsg, ErrorCode, HeldLock, RequestId, ServerMsg, SnapId, SnapRef,
    MAX_DIFF_RECORDS, PROTOCOL_VERSION,
};
use std::collections::{BTreeMap, BTreeSet};

impl<S: MetaStore> Engine<S> {
    pub(super) fn open_session(
        &mut self,
        conn: ConnId,
        id: RequestId,
        client: ClientId,
        node: u32,
        incarnation: u64,
        resuming: bool,
    ) -> Result<(), MetaError> {
        let live = self.sessions.others_of(conn, client);
        // Another client with this id (not a reconnect of the live connection): two
        // clients were given the same instance id. Taking over would close the other's
        // connection and could release the read locks its reads in flight rely on.
        if let Some((other, other_node, _)) = live.iter().find(|l| l.2 != incarnation) {
            let message = format!(
                "client id {client} is already in use by connection {other} from node {other_node}; refusing connection {conn} from node {node} (every client needs its own instance id)"
            );
            self.log(LogLevel::Warn, message.clone());
            self.reply(conn, id, error(ErrorCode::DuplicateClient, message));
            return self.close(conn);
        }
        // The same client reconnecting while its old connection lingers: the old one is dead.
        for (other, _, _) in live {
            self.log(
                LogLevel::Info,
                format!("client {client} reconnected; closing its old connection {other}"),
            );
            self.close(other)?;
        }
        self.sessions.open(conn, client, node, incarnation);
        self.reply(
            conn,
            id,
            ServerMsg::Welcome {
                protocol_version: u32::from(PROTOCOL_VERSION),
                chunk_size: self.geometry.chunk_size,
                origin_chunks: self.geometry.origin_chunks,
                origin_lease_secs: u32::try_from(self.cfg.origin_lease_secs).unwrap_or(u32::MAX),
                rollback: self.rollback.is_some(),
            },
        );
        if !resuming {
            // A fresh client holds nothing from before: nothing to wait for.
            self.client_settled(client)?;
        }
        Ok(())
    }

    /// The client has re-established everything it holds (or holds nothing): drop what it
    /// left behind and stop waiting for it at the activation gate.
    fn client_settled(&mut self, client: ClientId) -> Result<(), MetaError> {
        self.drop_orphans(|o| o.client == client, true)?;
        if self.gate.settle(client) {
            self.log(
                LogLevel::Info,
                format!("activation gate: client {client} is back"),
            );
            self.maybe_activate()?;
        }
        Ok(())
    }

    pub(super) fn on_client_gone(&mut self, client: ClientId) -> Result<(), MetaError> {
        self.drop_orphans(|o| o.client == client, false)?;
        if self.gate.settle(client) {
            self.log(
                LogLevel::Info,
                format!("activation gate: client {client} declared gone"),
            );
            self.maybe_activate()?;
        }
        Ok(())
    }

    fn maybe_activate(&mut self) -> Result<(), MetaError> {
        if self.gate.is_open() {
            self.log_event(
                LogLevel::Info,
                LogEvent::new("server_gate_open"),
                "server active: origin writes are served",
            );
            for w in self.waiters.take_activation() {
                self.evaluate(w)?;
            }
            self.wake_lease_waiters()?;
        }
        Ok(())
    }

    /// Closes connections still unauthenticated `auth_timeout_secs` after they were
    /// accepted (strictly later: `now` is whole seconds, never early).
    pub(super) fn expire_unauthenticated(&mut self) -> Result<(), MetaError> {
        let limit = self.cfg.auth_timeout_secs;
        for conn in self.sessions.unauthenticated(self.now, limit) {
            self.log(
                LogLevel::Warn,
                format!("connection {conn}: no authentication within {limit} s; closing"),
            );
            self.close(conn)?;
        }
        Ok(())
    }

    pub(super) fn close(&mut self, conn: ConnId) -> Result<(), MetaError> {
        if self.sessions.contains(conn) {
            self.actions.push_back(Action::Close { conn });
            self.drop_conn(conn)?;
        }
        Ok(())
    }

    pub(super) fn drop_conn(&mut self, conn: ConnId) -> Result<(), MetaError> {
        let Some(c) = self.sessions.remove(conn) else {
            return Ok(());
        };
        self.works.forget_conn(conn);
        let was_open_origin = c.is_open_origin();
        let mut to_wake = Vec::new();
        let mut leases_released = false;
        match (c.client, c.kind) {
            (Some(client), Some(ClientKind::Snapshot { snap }))
                if !c.held.is_empty() || !c.leases.is_empty() || !c.store_reads.is_empty() =>
            {
                // Its reads and writes may still be in flight: keep the locks and leases
                // until it comes back.
                self.log(
                    LogLevel::Warn,
                    format!(
                        "snapshot client {client} disconnected holding {} read lock(s) and {} write lease(s); kept until it reconnects or is declared gone",
                        c.held.values().sum::<u32>(),
                        c.leases.values().sum::<u32>()
                    ),
                );
                self.locks.orphan(OrphanedLocks {
                    client,
                    snap,
                    held: c.held,
                    leases: c.leases,
                    store_reads: c.store_reads.values().sum(),
                    since: self.now,
                });
            }
            (Some(client), Some(ClientKind::Origin)) if !c.store_reads.is_empty() => {
                // Its origin reads of a rollback source's store chunks may still be
                // running: keep them counted, as a snapshot client's, for the grace time
                // (one orphan per source, so each releases its own snapshot's leases).
                let per_snap = c.store_reads_per_snapshot();
                self.log(
                    LogLevel::Warn,
                    format!(
                        "origin client {client} disconnected with {} store read(s) of rollback source(s) unreleased; kept for {}s (its reads may still run)",
                        per_snap.values().sum::<u32>(),
                        self.cfg.orphan_lock_grace_secs
                    ),
                );
                to_wake = self.locks.unlock_all(c.held);
                for (snap, store_reads) in per_snap {
                    self.locks.orphan(OrphanedLocks {
                        client,
                        snap,
                        held: BTreeMap::new(),
                        leases: BTreeMap::new(),
                        store_reads,
                        since: self.now,
                    });
                }
            }
            (_, kind) => {
                let mut per_snap = c.store_reads_per_snapshot();
                to_wake = self.locks.unlock_all(c.held);
                if let Some(ClientKind::Snapshot { snap }) = kind {
                    *per_snap.entry(snap).or_insert(0) += c.leases.values().sum::<u32>();
                }
                for (snap, n) in per_snap {
                    leases_released |= n > 0;
                    self.locks.release_leases(snap, n);
                }
            }
        }
        if was_open_origin {
            // It may not know yet and go on writing through its promises: count it
            // until its lease has certainly run out.
            let until =
                c.last_heard + self.cfg.origin_lease_secs + LEASE_MARGIN_SECS + CLOCK_SLACK_SECS;
            if until > self.now {
                self.sessions.lose_origin(c.client, until);
            }
        }
        if let Some(r) = self.rollback.as_mut() {
            r.acknowledged(conn);
        }
        if self.creations.acknowledged(conn, None) {
            self.try_create_announced()?;
        }
        for chunk in to_wake {
            self.wake_chunk(chunk)?;
        }
        if leases_released {
            self.wake_lease_waiters()?;
        }
        Ok(())
    }

    /// Releases what the matching orphans hold. `keep_store_reads`: a client that came
    /// back keeps its old store reads counted until the grace time ends (they may still
    /// be running), the rest is released.
    fn drop_orphans(
        &mut self,
        which: impl Fn(&OrphanedLocks) -> bool,
        keep_store_reads: bool,
    ) -> Result<(), MetaError> {
        let Released { unlocked, leases } = self.locks.release_orphans(which, keep_store_reads);
        for chunk in unlocked {
            self.wake_chunk(chunk)?;
        }
        if leases {
            self.wake_lease_waiters()?;
        }
        Ok(())
    }

    pub(super) fn expire_orphans(&mut self) -> Result<(), MetaError> {
        let (now, grace) = (self.now, self.cfg.orphan_lock_grace_secs);
        // An origin client leaves one orphan per rollback source it read: name it once.
        let expired: BTreeSet<ClientId> =
            self.locks.expired_orphans(now, grace).into_iter().collect();
        for client in expired {
            self.log(
                LogLevel::Warn,
                format!("client {client} did not come back within {grace}s; releasing its read locks, write leases and store reads"),
            );
        }
        self.drop_orphans(|o| now.saturating_sub(o.since) >= grace, false)
    }

    /// Origin leases: a silent origin client is closed once its lease has certainly run
    /// out (a dead node must not hold up a snapshot for long); a lost one stops counting
    /// then. A pending announcement may go ahead afterwards.
    pub(super) fn expire_origin_leases(&mut self) -> Result<(), MetaError> {
        let deadline = self.cfg.origin_lease_secs + LEASE_MARGIN_SECS + CLOCK_SLACK_SECS;
        let now = self.now;
        for (conn, client, quiet) in self.sessions.silent_origins(now, deadline) {
            self.log(
                LogLevel::Warn,
                format!(
                    "origin client {} silent for {quiet}s: its write lease ({}s + {LEASE_MARGIN_SECS}s margin) has run out; closing its connection",
                    client.map_or("?".to_owned(), |c| c.to_string()),
                    self.cfg.origin_lease_secs
                ),
            );
            self.close(conn)?;
        }
        let expired = self.sessions.expire_lost_origins(now);
        for client in &expired {
            self.log(
                LogLevel::Info,
                format!(
                    "lost origin client {}: its write lease has run out",
                    client.map_or("?".to_owned(), |c| c.to_string())
                ),
            );
        }
        if !expired.is_empty() || self.creations.announced() {
            self.try_create_announced()?;
        }
        Ok(())
    }

    pub(super) fn wake_lease_waiters(&mut self) -> Result<(), MetaError> {
        if !self.reclaim_blocked()? {
            for w in self.waiters.take_leases() {
                self.evaluate(w)?;
            }
        }
        Ok(())
    }

    pub(super) fn on_session_request(
        &mut self,
        conn: ConnId,
        id: RequestId,
        msg: ClientMsg,
    ) -> Result<(), MetaError> {
        let who = Requester { conn, id };
        let Some((client, kind)) = self.sessions.session_of(conn) else {
            return Ok(());
        };
        let outcome = match msg {
            ClientMsg::QueryWrite { ranges } => match kind {
                ClientKind::Origin => self.new_work(who, WorkKind::OriginWrite, ranges),
                _ => Err(wrong_kind("QueryWrite", kind)),
            },
            ClientMsg::QuerySnapshotRead { snap, ranges } => {
                check_snapshot_kind("QuerySnapshotRead", kind, snap)
                    .and_then(|()| self.new_work(who, WorkKind::SnapshotRead(snap), ranges))
            }
            ClientMsg::SnapshotWrite { snap, ranges } => {
                check_snapshot_kind("SnapshotWrite", kind, snap)
                    .and_then(|()| self.new_work(who, WorkKind::SnapshotWrite(snap), ranges))
            }
            ClientMsg::FinishSnapshotRead { snap, ranges } => {
                match check_snapshot_kind("FinishSnapshotRead", kind, snap) {
                    Ok(()) => self.finish_read(who, &ranges),
                    Err(r) => Err(r),
                }
            }
            ClientMsg::FinishSnapshotWrite { snap, ranges } => {
                match check_snapshot_kind("FinishSnapshotWrite", kind, snap) {
                    Ok(()) => self.finish_write(who, snap, &ranges),
                    Err(r) => Err(r),
                }
            }
            ClientMsg::NewSnapshotAck { snap } => {
                if let Some(r) = self.rollback.as_mut().filter(|r| r.pin == snap) {
                    r.acknowledged(conn);
                }
                if self.creations.acknowledged(conn, Some(snap)) {
                    self.try_create_announced()?;
                }
                Ok(())
            }
            ClientMsg::KeepAlive => {
                self.reply(conn, id, ServerMsg::KeepAliveOk);
                Ok(())
            }
            ClientMsg::ReleaseStoreReads { snap, ranges } => {
                let checked = match kind {
                    // An origin session releases what its `OriginReadOk`s gave out.
                    ClientKind::Origin => self.check_origin_store_reads(conn, snap),
                    _ => check_snapshot_kind("ReleaseStoreReads", kind, snap),
                };
                match checked {
                    Ok(()) => {
                        self.release_store_reads(conn, snap, &ranges)?;
                        Ok(())
                    }
                    // No answer is expected: say it in the log instead.
                    Err(Reject(_, why)) => {
                        self.log(LogLevel::Warn, format!("ReleaseStoreReads refused: {why}"));
                        Ok(())
                    }
                }
            }
            ClientMsg::UploadLocks { locks, leases } => {
                self.upload_locks(who, kind, &locks, &leases)
            }
            ClientMsg::ResendDone => {
                if let Some(c) = self.sessions.get_mut(conn) {
                    c.resend_done = true;
                }
                self.reply(conn, id, ServerMsg::ResendDoneOk);
                self.client_settled(client)?;
                Ok(())
            }
            ClientMsg::CreateSnapshot { name, token } => match kind {
                ClientKind::Admin => self.create_snapshot(who, &name, token),
                _ => Err(wrong_kind("CreateSnapshot", kind)),
            },
            ClientMsg::DeleteSnapshot { snap } => match kind {
                ClientKind::Admin => self.delete_snapshot(who, snap),
                _ => Err(wrong_kind("DeleteSnapshot", kind)),
            },
            ClientMsg::FindSnapshot { name } => match kind {
                ClientKind::Admin => match self.resolve(&SnapRef::Name(name.clone()))? {
                    Some(info) => {
                        self.reply(conn, id, ServerMsg::SnapshotFound { info });
                        Ok(())
                    }
                    None => Err(Reject(
                        ErrorCode::NoSuchSnapshot,
                        format!("no snapshot named {name:?}"),
                    )),
                },
                _ => Err(wrong_kind("FindSnapshot", kind)),
            },
            ClientMsg::ListSnapshots { after, limit } => match kind {
                ClientKind::Admin => {
                    let mut snapshots = self.visible_snapshots()?;
                    if let Some(after) = after {
                        snapshots.retain(|s| s.id > after);
                    }
                    // Every reply fits a frame, however many snapshots and long names.
                    let n = page_len(&snapshots, limit);
                    let more = snapshots.len() > n;
                    snapshots.truncate(n);
                    let usage_exact = self.store.usage_exact();
                    self.reply(
                        conn,
                        id,
                        ServerMsg::SnapshotList {
                            snapshots,
                            more,
                            usage_exact,
                        },
                    );
                    Ok(())
                }
                _ => Err(wrong_kind("ListSnapshots", kind)),
            },
            ClientMsg::Diff {
                from,
                to,
                start,
                budget,
            } => match kind {
                ClientKind::Admin => match self.check_diff(from, to, start)? {
                    Ok(()) => {
                        let budget = budget.clamp(1, MAX_DIFF_RECORDS);
                        let page = self.store.diff_page(from, to, start, budget)?;
                        self.reply(conn, id, ServerMsg::DiffPage(page));
                        Ok(())
                    }
                    Err(r) => Err(r),
                },
                _ => Err(wrong_kind("Diff", kind)),
            },
            ClientMsg::Status => {
                let status = self.status_figures()?;
                self.reply(conn, id, ServerMsg::Status(status));
                Ok(())
            }
            ClientMsg::Rollback { snap, pin_name } => match kind {
                ClientKind::Admin => self.request_rollback(who, snap, &pin_name),
                _ => Err(wrong_kind("Rollback", kind)),
            },
            ClientMsg::QueryOriginRead { ranges } => match kind {
                ClientKind::Origin => self.query_origin_read(who, &ranges),
                _ => Err(wrong_kind("QueryOriginRead", kind)),
            },
            ClientMsg::Hello { .. } | ClientMsg::AuthResponse { .. } => Err(Reject(
                ErrorCode::BadRequest,
                "session already authenticated".into(),
            )),
        };
        match outcome {
            Ok(()) => Ok(()),
            Err(r) => {
                self.reject(who, r);
                Ok(())
            }
        }
    }

    /// An origin session may release only store reads of a rollback source it was given
    /// (by `OriginReadOk`) and has not released yet.
    fn check_origin_store_reads(&self, conn: ConnId, snap: SnapId) -> Result<(), Reject> {
        if self
            .sessions
            .get(conn)
            .is_some_and(|c| c.reads_store_of(snap))
        {
            return Ok(());
        }
        Err(Reject(
            ErrorCode::NotLocked,
            format!(
                "this origin session holds no store reads of snapshot {snap} (only those an OriginReadOk named as its source, until released)"
            ),
        ))
    }

    fn upload_locks(
        &mut self,
        who: Requester,
        kind: ClientKind,
        locks: &[HeldLock],
        leases: &[HeldLock],
    ) -> Result<(), Reject> {
        let ClientKind::Snapshot { snap: mine } = kind else {
            return Err(wrong_kind("UploadLocks", kind));
        };
        if self.sessions.get(who.conn).is_some_and(|c| c.resend_done) {
            return Err(Reject(
                ErrorCode::BadRequest,
                "UploadLocks after ResendDone".into(),
            ));
        }
        let mut lock_chunks = Vec::new();
        let mut lease_chunks = Vec::new();
        for (list, out) in [(locks, &mut lock_chunks), (leases, &mut lease_chunks)] {
            for l in list {
                if l.snap != mine {
                    return Err(Reject(
                        ErrorCode::WrongClientKind,
                        format!(
                            "lock or lease for snapshot {} on a connection for snapshot {mine}",
                            l.snap
                        ),
                    ));
                }
                out.extend(self.request_chunks(std::slice::from_ref(&l.range))?);
            }
        }
        for &ch in &lock_chunks {
            self.locks.lock(ch);
        }
        self.locks.add_leases(mine, lease_chunks.len() as u32);
        if let Some(c) = self.sessions.get_mut(who.conn) {
            for ch in lock_chunks {
                count_one(&mut c.held, ch);
            }
            for ch in lease_chunks {
                count_one(&mut c.leases, ch);
            }
        }
        self.reply(who.conn, who.id, ServerMsg::UploadLocksOk);
        Ok(())
    }
}
