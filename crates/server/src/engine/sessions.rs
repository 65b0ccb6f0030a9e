//! Part of the engine's state: the connections, their authentication and sessions, what
//! each holds, and origin clients lost while their write lease may still run.
//!
//! Invariants: a connection serves requests only in [`Session::Open`] (after proving the
//! cluster key); an open connection has its client id, kind, node and incarnation set; at
//! most one open connection per client id (a reconnect replaces the old one); a connection's
//! `held`, `leases` and `store_reads` never keep a zero count and are also counted in the
//! engine's [`Locks`](super::locks::Locks) (a store read under the snapshot it names).

use super::io::ConnId;
use csnap_proto::auth::{Handshake, Nonce};
use csnap_proto::{ClientId, ClientKind, SnapId};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone)]
pub(super) enum Session {
    AwaitHello,
    AwaitAuth(Handshake),
    Open,
}

pub(super) struct Conn {
    pub(super) server_nonce: Nonce,
    pub(super) session: Session,
    pub(super) client: Option<ClientId>,
    pub(super) kind: Option<ClientKind>,
    /// The client's node and incarnation (from its Hello), once the session is open.
    pub(super) node: u32,
    pub(super) incarnation: u64,
    pub(super) resend_done: bool,
    /// Read locks this connection holds: origin chunk -> count.
    pub(super) held: BTreeMap<u64, u32>,
    /// Write leases this (snapshot) connection holds: origin chunk -> count.
    pub(super) leases: BTreeMap<u64, u32>,
    /// Store reads this connection has not released yet: (snapshot, origin chunk) -> count.
    /// Like write leases they keep a deleted or invalidated snapshot's chunks from reuse. A
    /// snapshot connection's are all of its snapshot; an origin connection's are of the
    /// rollback sources its `OriginReadOk`s named (two once one rollback ended and the next
    /// began), hence the snapshot in the key.
    pub(super) store_reads: BTreeMap<(SnapId, u64), u32>,
    /// When the server last heard from it (`Tick` seconds): an origin client's write
    /// lease runs from here.
    pub(super) last_heard: u64,
    /// When it was accepted (`Tick` seconds): the authentication deadline runs from here.
    pub(super) opened: u64,
}

impl Conn {
    pub(super) fn is_open(&self) -> bool {
        matches!(self.session, Session::Open)
    }

    /// An authenticated origin client.
    pub(super) fn is_open_origin(&self) -> bool {
        self.is_open() && self.kind == Some(ClientKind::Origin)
    }

    /// Releases one read lock on each of `chunks`, all or none: `Err(chunk)` names one it
    /// does not hold.
    pub(super) fn release_held(&mut self, chunks: &BTreeSet<u64>) -> Result<(), u64> {
        take_one_each(&mut self.held, chunks)
    }

    /// Releases one write lease on each of `chunks`, all or none: `Err(chunk)` names one it
    /// does not hold.
    pub(super) fn release_leases(&mut self, chunks: &BTreeSet<u64>) -> Result<(), u64> {
        take_one_each(&mut self.leases, chunks)
    }

    /// Releases one store read of `snap` on each of `chunks` it has: how many it had.
    pub(super) fn release_store_reads(&mut self, snap: SnapId, chunks: &BTreeSet<u64>) -> u32 {
        let mut released = 0;
        for ch in chunks {
            if decrement(&mut self.store_reads, (snap, *ch)) {
                released += 1;
            }
        }
        released
    }

    /// Whether it has unreleased store reads of `snap`.
    pub(super) fn reads_store_of(&self, snap: SnapId) -> bool {
        self.store_reads
            .range((snap, 0)..=(snap, u64::MAX))
            .next()
            .is_some()
    }

    /// Its unreleased store reads, counted per snapshot.
    pub(super) fn store_reads_per_snapshot(&self) -> BTreeMap<SnapId, u32> {
        let mut per_snap = BTreeMap::new();
        for (&(snap, _), &n) in &self.store_reads {
            *per_snap.entry(snap).or_insert(0) += n;
        }
        per_snap
    }
}

/// Counts one more in `map` for `key`.
pub(super) fn count_one<K: Ord>(map: &mut BTreeMap<K, u32>, key: K) {
    *map.entry(key).or_insert(0) += 1;
}

/// One less for `key`, dropping a zero count: false if there was none.
fn decrement<K: Ord>(map: &mut BTreeMap<K, u32>, key: K) -> bool {
    match map.get_mut(&key) {
        Some(n) if *n > 1 => {
            *n -= 1;
            true
        }
        Some(_) => {
            map.remove(&key);
            true
        }
        None => false,
    }
}

fn take_one_each(map: &mut BTreeMap<u64, u32>, chunks: &BTreeSet<u64>) -> Result<(), u64> {
    if let Some(missing) = chunks.iter().find(|ch| !map.contains_key(ch)) {
        return Err(*missing);
    }
    for ch in chunks {
        decrement(map, *ch);
    }
    Ok(())
}

/// An origin client whose connection is gone but which may still be writing through its
/// promises: until its lease has certainly run out (`Tick` seconds).
struct LostOrigin {
    client: Option<ClientId>,
    until: u64,
}

/// The connections, and the origin clients lost with their lease still running.
#[derive(Default)]
pub(super) struct Sessions {
    conns: BTreeMap<ConnId, Conn>,
    lost_origins: Vec<LostOrigin>,
}

impl Sessions {
    /// A connection was accepted at `now`: it must say Hello and prove the key.
    pub(super) fn accept(&mut self, conn: ConnId, server_nonce: Nonce, now: u64) {
        self.conns.insert(
            conn,
            Conn {
                server_nonce,
                session: Session::AwaitHello,
                client: None,
                kind: None,
                node: 0,
                incarnation: 0,
                resend_done: false,
                held: BTreeMap::new(),
                leases: BTreeMap::new(),
                store_reads: BTreeMap::new(),
                last_heard: now,
                opened: now,
            },
        );
    }

    pub(super) fn get(&self, conn: ConnId) -> Option<&Conn> {
        self.conns.get(&conn)
    }

    pub(super) fn get_mut(&mut self, conn: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(&conn)
    }

    pub(super) fn contains(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    pub(super) fn remove(&mut self, conn: ConnId) -> Option<Conn> {
        self.conns.remove(&conn)
    }

    /// Connections, authenticated or not.
    pub(super) fn len(&self) -> usize {
        self.conns.len()
    }

    /// The client heard from at `now` (its origin write lease runs from here).
    pub(super) fn heard(&mut self, conn: ConnId, now: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.last_heard = now;
        }
    }

    /// The client and kind of an open session.
    pub(super) fn session_of(&self, conn: ConnId) -> Option<(ClientId, ClientKind)> {
        let c = self.conns.get(&conn)?;
        Some((c.client?, c.kind?))
    }

    /// Other connections of `client`: (connection, node, incarnation).
    pub(super) fn others_of(&self, conn: ConnId, client: ClientId) -> Vec<(ConnId, u32, u64)> {
        self.conns
            .iter()
            .filter(|(other, c)| **other != conn && c.client == Some(client))
            .map(|(other, c)| (*other, c.node, c.incarnation))
            .collect()
    }

    /// The client proved the key: the session is open.
    pub(super) fn open(&mut self, conn: ConnId, client: ClientId, node: u32, incarnation: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.session = Session::Open;
            c.client = Some(client);
            c.kind = Some(client.kind);
            c.node = node;
            c.incarnation = incarnation;
        }
    }

    /// Connections still unauthenticated more than `limit` seconds after they were
    /// accepted (strictly later: `now` is whole seconds, never early).
    pub(super) fn unauthenticated(&self, now: u64, limit: u64) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| !c.is_open() && now.saturating_sub(c.opened) > limit)
            .map(|(id, _)| *id)
            .collect()
    }

    /// When [`Sessions::unauthenticated`] with `limit` first names a connection open now.
    pub(super) fn next_auth_expiry(&self, limit: u64) -> Option<u64> {
        self.conns
            .values()
            .filter(|c| !c.is_open())
            .map(|c| c.opened.saturating_add(limit).saturating_add(1))
            .min()
    }

    /// When [`Sessions::silent_origins`] with `deadline` first names a connection open
    /// now, if none is heard from meanwhile.
    pub(super) fn next_silence(&self, deadline: u64) -> Option<u64> {
        self.conns
            .values()
            .filter(|c| c.is_open_origin())
            .map(|c| c.last_heard.saturating_add(deadline))
            .min()
    }

    /// When [`Sessions::expire_lost_origins`] first lets a lost origin client go.
    pub(super) fn next_lost_origin_expiry(&self) -> Option<u64> {
        self.lost_origins.iter().map(|l| l.until).min()
    }

    /// Open origin connections silent for at least `deadline` seconds: (connection,
    /// client, seconds silent).
    pub(super) fn silent_origins(
        &self,
        now: u64,
        deadline: u64,
    ) -> Vec<(ConnId, Option<ClientId>, u64)> {
        self.conns
            .iter()
            .filter(|(_, c)| c.is_open_origin() && now.saturating_sub(c.last_heard) >= deadline)
            .map(|(id, c)| (*id, c.client, now.saturating_sub(c.last_heard)))
            .collect()
    }

    /// Every open origin connection.
    pub(super) fn open_origins(&self) -> BTreeSet<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.is_open_origin())
            .map(|(id, _)| *id)
            .collect()
    }

    /// An origin client lost its connection; it may write until `until`.
    pub(super) fn lose_origin(&mut self, client: Option<ClientId>, until: u64) {
        self.lost_origins.push(LostOrigin { client, until });
    }

    /// Lost origin clients whose lease has run out at `now`: they no longer count.
    pub(super) fn expire_lost_origins(&mut self, now: u64) -> Vec<Option<ClientId>> {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.lost_origins)
            .into_iter()
            .partition(|l| l.until <= now);
        self.lost_origins = kept;
        gone.into_iter().map(|l| l.client).collect()
    }

    /// Some lost origin client may still be writing.
    pub(super) fn origins_lost(&self) -> bool {
        !self.lost_origins.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: Nonce = [0; 32];

    #[test]
    fn the_auth_deadline_and_the_origin_lease() {
        let mut s = Sessions::default();
        s.accept(1, NONCE, 100);
        s.accept(2, NONCE, 100);
        let origin = ClientId::new(7, ClientKind::Origin);
        s.open(2, origin, 3, 0x11);
        assert_eq!(s.session_of(2), Some((origin, ClientKind::Origin)));
        assert_eq!(s.session_of(1), None);
        assert_eq!(s.next_auth_expiry(10), Some(111));
        assert_eq!(s.unauthenticated(110, 10), Vec::<ConnId>::new());
        assert_eq!(s.unauthenticated(111, 10), vec![1]);
        assert_eq!(s.open_origins(), BTreeSet::from([2]));
        s.heard(2, 105);
        assert_eq!(s.next_silence(14), Some(119));
        assert!(s.silent_origins(118, 14).is_empty());
        assert_eq!(s.silent_origins(119, 14), vec![(2, Some(origin), 14)]);
        assert_eq!(s.others_of(1, origin), vec![(2, 3, 0x11)]);
        s.lose_origin(Some(origin), 120);
        assert_eq!(s.next_lost_origin_expiry(), Some(120));
        assert!(s.expire_lost_origins(119).is_empty() && s.origins_lost());
        assert_eq!(s.expire_lost_origins(120), vec![Some(origin)]);
        assert!(!s.origins_lost());
    }

    #[test]
    fn releases_are_all_or_none() {
        let mut s = Sessions::default();
        s.accept(1, NONCE, 0);
        let c = s.get_mut(1).expect("accepted");
        count_one(&mut c.held, 4);
        count_one(&mut c.held, 4);
        count_one(&mut c.held, 5);
        assert_eq!(c.release_held(&BTreeSet::from([4, 6])), Err(6));
        assert_eq!(c.held, BTreeMap::from([(4, 2), (5, 1)]), "nothing released");
        assert_eq!(c.release_held(&BTreeSet::from([4, 5])), Ok(()));
        assert_eq!(c.held, BTreeMap::from([(4, 1)]), "no zero count kept");
        let (s1, s2) = (SnapId(1), SnapId(2));
        count_one(&mut c.store_reads, (s1, 9));
        count_one(&mut c.store_reads, (s2, 9));
        count_one(&mut c.store_reads, (s2, 9));
        assert_eq!(
            c.store_reads_per_snapshot(),
            BTreeMap::from([(s1, 1), (s2, 2)])
        );
        assert_eq!(c.release_store_reads(s1, &BTreeSet::from([8, 9])), 1);
        assert!(!c.reads_store_of(s1) && c.reads_store_of(s2));
        assert_eq!(
            c.release_store_reads(s1, &BTreeSet::from([9])),
            0,
            "none left of s1"
        );
        assert_eq!(c.release_store_reads(s2, &BTreeSet::from([9])), 1);
        assert_eq!(c.store_reads, BTreeMap::from([((s2, 9), 1)]));
    }
}
