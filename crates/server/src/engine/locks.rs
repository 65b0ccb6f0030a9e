//! Part of the engine's state: read locks on origin chunks, write leases on snapshots, and
//! what disconnected snapshot clients left behind.
//!
//! Invariant: `counts[chunk]` is the sum of the read locks every holder (connection, orphan,
//! or an unshare copying from the origin) has on `chunk`, and `leases[snap]` the sum of the
//! write leases and unreleased store reads of every connection and orphan of `snap`, plus
//! the unreleased store reads of `snap` that origin connections and orphans hold (origin
//! reads sent to a rollback source's store chunks); a zero count is never stored. A chunk
//! with a read lock is not written by the origin; a snapshot with leases keeps its chunks
//! from reclaim.

use csnap_proto::{ClientId, SnapId};
use std::collections::{BTreeMap, HashMap};

/// Read locks a snapshot client left behind when its connection dropped; kept until it
/// reconnects and finishes resending, is declared gone, or the grace time passes. An origin
/// client leaves only store reads of rollback sources: one orphan per source (`snap`), with
/// no read locks or write leases.
pub(super) struct OrphanedLocks {
    pub(super) client: ClientId,
    pub(super) snap: SnapId,
    pub(super) held: BTreeMap<u64, u32>,
    pub(super) leases: BTreeMap<u64, u32>,
    /// Unreleased store reads: they may still be running on the client, which does not
    /// re-upload them, so they stay until the grace time ends even if it comes back.
    pub(super) store_reads: u32,
    pub(super) since: u64,
}

/// What [`Locks::release_orphans`] gave back.
#[derive(Default)]
pub(super) struct Released {
    /// Chunks that have no read lock any more (their waiters may go on).
    pub(super) unlocked: Vec<u64>,
    /// True if any write lease or store read was released (reclaim may go on).
    pub(super) leases: bool,
}

/// Read locks, snapshot write leases and orphaned locks.
#[derive(Default)]
pub(super) struct Locks {
    /// All read locks (client, orphaned and internal): origin chunk -> count. Ordered,
    /// not hashed: a snapshot read locks a run of neighbouring chunks (256 per 1 MiB read
    /// with 4 KiB chunks), and SipHash per chunk showed in its profile.
    counts: BTreeMap<u64, u32>,
    /// Write leases and unreleased store reads per snapshot (connections and orphans).
    leases: HashMap<SnapId, u32>,
    orphans: Vec<OrphanedLocks>,
}

impl Locks {
    /// Read locks currently held on `chunk`.
    pub(super) fn read_locks(&self, chunk: u64) -> u32 {
        self.counts.get(&chunk).copied().unwrap_or(0)
    }

    pub(super) fn lock(&mut self, chunk: u64) {
        *self.counts.entry(chunk).or_insert(0) += 1;
    }

    /// Releases `n` locks on `chunk`; true if it is now unlocked.
    pub(super) fn unlock(&mut self, chunk: u64, n: u32) -> bool {
        match self.counts.get_mut(&chunk) {
            Some(count) if *count > n => {
                *count -= n;
                false
            }
            Some(_) => {
                self.counts.remove(&chunk);
                true
            }
            None => true,
        }
    }

    /// Releases every lock in `held` (chunk -> count): the chunks now unlocked.
    pub(super) fn unlock_all(&mut self, held: BTreeMap<u64, u32>) -> Vec<u64> {
        held.into_iter()
            .filter(|&(chunk, n)| self.unlock(chunk, n))
            .map(|(chunk, _)| chunk)
            .collect()
    }

    /// `n` more write leases (or store reads) on `snap`.
    pub(super) fn add_leases(&mut self, snap: SnapId, n: u32) {
        if n > 0 {
            *self.leases.entry(snap).or_insert(0) += n;
        }
    }

    pub(super) fn release_leases(&mut self, snap: SnapId, n: u32) {
        if let Some(count) = self.leases.get_mut(&snap) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                self.leases.remove(&snap);
            }
        }
    }

    /// Snapshots some client may still write into (or read the store chunks of).
    pub(super) fn leased_snapshots(&self) -> Vec<SnapId> {
        self.leases.keys().copied().collect()
    }

    /// Keeps what a disconnected snapshot client holds until it comes back.
    pub(super) fn orphan(&mut self, o: OrphanedLocks) {
        self.orphans.push(o);
    }

    /// Orphans at least `grace` seconds old at `now`.
    pub(super) fn expired_orphans(&self, now: u64, grace: u64) -> Vec<ClientId> {
        self.orphans
            .iter()
            .filter(|o| now.saturating_sub(o.since) >= grace)
            .map(|o| o.client)
            .collect()
    }

    /// When [`Locks::expired_orphans`] with `grace` first names an orphan kept now.
    pub(super) fn next_orphan_expiry(&self, grace: u64) -> Option<u64> {
        self.orphans
            .iter()
            .map(|o| o.since.saturating_add(grace))
            .min()
    }

    /// Releases what the matching orphans hold. `keep_store_reads`: a client that came
    /// back keeps its old store reads counted until the grace time ends (they may still
    /// be running), the rest is released.
    pub(super) fn release_orphans(
        &mut self,
        which: impl Fn(&OrphanedLocks) -> bool,
        keep_store_reads: bool,
    ) -> Released {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.orphans)
            .into_iter()
            .partition(|o| which(o));
        self.orphans = kept;
        let mut released = Released::default();
        for mut o in gone {
            let unlocked = self.unlock_all(std::mem::take(&mut o.held));
            released.unlocked.extend(unlocked);
            let mut n: u32 = std::mem::take(&mut o.leases).values().sum();
            let snap = o.snap;
            if keep_store_reads && o.store_reads > 0 {
                // Only the store reads linger, until the grace time ends.
                self.orphans.push(o);
            } else {
                n += o.store_reads;
            }
            self.release_leases(snap, n);
            released.leases |= n > 0;
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csnap_proto::ClientKind;

    fn client(instance: u64, snap: SnapId) -> ClientId {
        ClientId {
            instance,
            kind: ClientKind::Snapshot { snap },
        }
    }

    #[test]
    fn unlock_reports_the_last_release_only() {
        let mut l = Locks::default();
        l.lock(7);
        l.lock(7);
        assert_eq!(l.read_locks(7), 2);
        assert!(!l.unlock(7, 1));
        assert!(l.unlock(7, 1));
        assert_eq!(l.read_locks(7), 0);
        assert!(l.counts.is_empty(), "no zero count is kept");
    }

    #[test]
    fn a_returning_orphan_keeps_only_its_store_reads() {
        let mut l = Locks::default();
        let snap = SnapId(3);
        l.lock(5);
        l.add_leases(snap, 2 + 4);
        l.orphan(OrphanedLocks {
            client: client(1, snap),
            snap,
            held: BTreeMap::from([(5, 1)]),
            leases: BTreeMap::from([(9, 2)]),
            store_reads: 4,
            since: 100,
        });
        let r = l.release_orphans(|o| o.client == client(1, snap), true);
        assert_eq!(r.unlocked, vec![5]);
        assert!(r.leases);
        assert_eq!(l.leased_snapshots(), vec![snap], "store reads still count");
        assert_eq!(l.next_orphan_expiry(60), Some(160));
        assert_eq!(l.expired_orphans(159, 60), Vec::<ClientId>::new());
        assert_eq!(l.expired_orphans(160, 60), vec![client(1, snap)]);
        let r = l.release_orphans(|_| true, false);
        assert!(r.leases && r.unlocked.is_empty());
        assert!(l.leased_snapshots().is_empty());
    }
}
