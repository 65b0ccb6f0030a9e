//! The origin client's unique-chunk cache and its write epochs.
//!
//! The server may promise that chunks are unique (`OriginWriteOk { unique: true }`): no
//! snapshot shares them, so they may be written again without asking. A new snapshot voids
//! every promise, and the server must not make the snapshot live while an origin write it
//! granted before the snapshot is still landing. So every origin data write runs under a
//! [`WriteGuard`] of the epoch it was granted in; `NewSnapshot` (or a lost connection)
//! clears the cache and starts a new epoch, and the acknowledgement is sent only when the
//! older epochs have drained.
//!
//! Online rollback (docs/wire-protocol.md "Online rollback") uses the same epochs: from
//! `RollbackStarting` (or a `Welcome` that says a rollback runs) until `RollbackDone`,
//! origin reads ask the server where each chunk is ([`OriginTracker::read_route`]); every
//! origin read runs under a [`ReadGuard`] of its epoch, so the acknowledgement of the start
//! waits until the reads that did not ask have finished too.
//!
//! Promises are also leases: they may be used only until the lease the server last
//! renewed runs out (`renew`, from answers to requests sent at a known instant). A client
//! cut off from its server (a partition, a frozen process) stops writing through the cache
//! by itself, so a server that stops hearing from it can count on it after the lease.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct State {
    epoch: u64,
    unique: HashSet<u64>,
    /// Origin writes in flight, per epoch they were granted in.
    in_flight: BTreeMap<u64, usize>,
    /// Origin reads in flight that read the origin without asking, per epoch they
    /// started in.
    reads_in_flight: BTreeMap<u64, usize>,
    /// Origin reads in flight that ask the server first (a rollback runs), per epoch.
    asking_reads_in_flight: BTreeMap<u64, usize>,
    /// A rollback runs: origin reads ask the server first.
    rollback: bool,
    hits: u64,
    misses: u64,
    /// Promises may be used until then; `None`: no lease yet.
    lease_until: Option<Instant>,
}

/// Shared by an origin client's connection task (grants, notices) and its writers.
#[derive(Debug)]
pub struct OriginTracker {
    state: Mutex<State>,
    drained: Notify,
    /// Most chunks remembered as unique; beyond that, writes ask the server again.
    capacity: usize,
}

/// Cache statistics, for status and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheStats {
    /// The write epoch: a new snapshot (or a lost connection) clears the cache and starts the next.
    pub epoch: u64,
    /// Origin chunks remembered as unique (written without asking).
    pub cached_chunks: usize,
    /// Writes answered from the cache.
    pub hits: u64,
    /// Writes that had to ask the server.
    pub misses: u64,
    /// Origin writes granted and not yet done.
    pub writes_in_flight: usize,
    /// Origin reads started and not yet done.
    pub reads_in_flight: usize,
    /// Origin reads ask the server first (an online rollback runs).
    pub rollback: bool,
}

/// How an origin read goes, decided when it starts ([`OriginTracker::read_route`]).
#[derive(Debug)]
pub struct ReadRoute {
    /// Held until the data read has finished.
    pub guard: ReadGuard,
    /// A rollback runs: ask `QueryOriginRead` first and read where it says.
    pub ask: bool,
}

/// An origin read in flight, held until its data read has finished.
#[derive(Debug)]
pub struct ReadGuard {
    tracker: Arc<OriginTracker>,
    epoch: u64,
    asked: bool,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut st = self.tracker.lock();
        let reads = if self.asked {
            &mut st.asking_reads_in_flight
        } else {
            &mut st.reads_in_flight
        };
        if let Some(n) = reads.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                reads.remove(&self.epoch);
            }
        }
        drop(st);
        self.tracker.drained.notify_waiters();
    }
}

/// Permission to write the origin, held until the data write has finished.
#[derive(Debug)]
pub struct WriteGuard {
    tracker: Arc<OriginTracker>,
    epoch: u64,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let mut st = self.tracker.lock();
        if let Some(n) = st.in_flight.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                st.in_flight.remove(&self.epoch);
            }
        }
        drop(st);
        self.tracker.drained.notify_waiters();
    }
}

impl OriginTracker {
    /// A tracker remembering at most `capacity` unique chunks.
    pub fn new(capacity: usize) -> Arc<OriginTracker> {
        Arc::new(OriginTracker {
            state: Mutex::new(State::default()),
            drained: Notify::new(),
            capacity,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-updated in a way
        // that matters more than losing the process; keep going with what is there.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn guard(self: &Arc<Self>, st: &mut State) -> WriteGuard {
        *st.in_flight.entry(st.epoch).or_insert(0) += 1;
        WriteGuard {
            tracker: self.clone(),
            epoch: st.epoch,
        }
    }

    /// Extends the write lease to `until` (the send time of a request the server has
    /// answered, plus the server's lease).
    pub fn renew(&self, until: Instant) {
        let mut st = self.lock();
        st.lease_until = Some(st.lease_until.map_or(until, |u| u.max(until)));
    }

    /// A guard for writing `chunks` without asking, if every one is promised unique and
    /// the lease still runs. An expired lease drops every promise.
    pub fn try_cached(self: &Arc<Self>, chunks: Range<u64>) -> Option<WriteGuard> {
        let mut st = self.lock();
        if st.lease_until.is_none_or(|u| Instant::now() >= u) {
            st.unique.clear();
            st.misses += 1;
            return None;
        }
        if chunks.clone().all(|c| st.unique.contains(&c)) {
            st.hits += 1;
            Some(self.guard(&mut st))
        } else {
            st.misses += 1;
            None
        }
    }

    /// The server granted a write of `chunks` (called by the connection task in the order
    /// the frames arrived, before it looks at the next frame).
    pub fn granted(
        self: &Arc<Self>,
        chunks: impl Iterator<Item = u64>,
        unique: bool,
    ) -> WriteGuard {
        let mut st = self.lock();
        if unique {
            for c in chunks {
                if st.unique.len() >= self.capacity {
                    break;
                }
                st.unique.insert(c);
            }
        }
        self.guard(&mut st)
    }

    /// Drops every promise and starts a new epoch; returns the epoch that must drain.
    pub fn invalidate(&self) -> u64 {
        let mut st = self.lock();
        st.unique.clear();
        let old = st.epoch;
        st.epoch += 1;
        old
    }

    /// Resolves once no write granted in `epoch` or before is in flight.
    pub async fn drained(&self, epoch: u64) {
        self.wait_until(|st| st.in_flight.range(..=epoch).next().is_none())
            .await
    }

    /// Resolves once no write granted and no read started in `epoch` or before is in
    /// flight (before a rollback's start is acknowledged).
    pub async fn settled(&self, epoch: u64) {
        self.wait_until(|st| {
            st.in_flight.range(..=epoch).next().is_none()
                && st.reads_in_flight.range(..=epoch).next().is_none()
                && st.asking_reads_in_flight.range(..=epoch).next().is_none()
        })
        .await
    }

    /// Resolves once no write granted and no read that did not ask, started in `epoch` or
    /// before, is in flight (before a new session: the server there may run a rollback
    /// that started while we were away). Reads that ask are left out: their answers may
    /// need the new session.
    pub async fn direct_io_drained(&self, epoch: u64) {
        self.wait_until(|st| {
            st.in_flight.range(..=epoch).next().is_none()
                && st.reads_in_flight.range(..=epoch).next().is_none()
        })
        .await
    }

    async fn wait_until(&self, done: impl Fn(&State) -> bool) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&self.lock()) {
                return;
            }
            notified.await;
        }
    }

    /// An origin read starts: whether it must ask the server (a rollback runs), and its
    /// guard. Decided under the same lock as [`OriginTracker::ask_before_reads`], so a
    /// read either asks or is waited for before the start is acknowledged.
    pub fn read_route(self: &Arc<Self>) -> ReadRoute {
        let mut st = self.lock();
        let (epoch, ask) = (st.epoch, st.rollback);
        let reads = if ask {
            &mut st.asking_reads_in_flight
        } else {
            &mut st.reads_in_flight
        };
        *reads.entry(epoch).or_insert(0) += 1;
        ReadRoute {
            ask,
            guard: ReadGuard {
                tracker: self.clone(),
                epoch,
                asked: ask,
            },
        }
    }

    /// Reads ask from now on (`RollbackStarting`, or a lost session: the next server may
    /// run a rollback that started without us); every promise is dropped and a new epoch
    /// starts. Returns the epoch that must settle ([`OriginTracker::settled`]) before a
    /// rollback's start is acknowledged.
    pub fn ask_before_reads(&self) -> u64 {
        let mut st = self.lock();
        st.rollback = true;
        st.unique.clear();
        let old = st.epoch;
        st.epoch += 1;
        old
    }

    /// Whether origin reads ask the server first (a rollback runs, or no session says).
    pub fn asks_before_reads(&self) -> bool {
        self.lock().rollback
    }

    /// Whether a rollback runs, as the server last said (`Welcome`, `RollbackDone`).
    pub fn set_rollback(&self, running: bool) {
        self.lock().rollback = running;
    }

    /// The cache's figures now.
    pub fn stats(&self) -> CacheStats {
        let st = self.lock();
        CacheStats {
            epoch: st.epoch,
            cached_chunks: st.unique.len(),
            hits: st.hits,
            misses: st.misses,
            writes_in_flight: st.in_flight.values().sum(),
            reads_in_flight: st.reads_in_flight.values().sum::<usize>()
                + st.asking_reads_in_flight.values().sum::<usize>(),
            rollback: st.rollback,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn new_snapshot_waits_for_writes_granted_before_it_only() {
        let t = OriginTracker::new(1000);
        t.renew(Instant::now() + Duration::from_secs(3600));
        assert!(t.try_cached(0..2).is_none(), "nothing promised yet");
        let old = t.granted(0..2, true);
        let cached = t.try_cached(0..2).expect("promised unique");
        assert!(t.try_cached(0..3).is_none(), "chunk 2 was never promised");
        let epoch = t.invalidate();
        assert!(
            t.try_cached(0..1).is_none(),
            "promises are void after a snapshot"
        );
        let new = t.granted(5..6, false);
        let wait = t.drained(epoch);
        tokio::pin!(wait);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), wait.as_mut())
                .await
                .is_err()
        );
        drop(old);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), wait.as_mut())
                .await
                .is_err()
        );
        drop(cached);
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("old epoch drained although a newer write is in flight");
        assert_eq!(t.stats().writes_in_flight, 1);
        drop(new);
        assert_eq!(t.stats().writes_in_flight, 0);
    }

    #[tokio::test]
    async fn a_rollback_start_waits_for_reads_that_did_not_ask_and_later_reads_ask() {
        let t = OriginTracker::new(1000);
        t.renew(Instant::now() + Duration::from_secs(3600));
        drop(t.granted(0..2, true));
        let direct = t.read_route();
        assert!(!direct.ask, "no rollback: read the origin directly");
        let epoch = t.ask_before_reads();
        assert!(t.try_cached(0..1).is_none(), "promises are void");
        let asking = t.read_route();
        assert!(asking.ask, "reads started after the notice ask");
        let wait = t.settled(epoch);
        tokio::pin!(wait);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), wait.as_mut())
                .await
                .is_err(),
            "a direct read is still in flight"
        );
        drop(direct.guard);
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("settled once the direct read finished, whatever asking reads do");
        assert_eq!(t.stats().reads_in_flight, 1);
        assert!(t.stats().rollback);
        t.set_rollback(false);
        assert!(
            !t.read_route().ask,
            "after RollbackDone reads go direct again"
        );
        // A lost session waits for direct reads, not for reads that ask (their answers
        // may need the next session).
        let epoch = t.ask_before_reads();
        tokio::time::timeout(Duration::from_secs(5), t.direct_io_drained(epoch))
            .await
            .expect("a read that asks does not hold up a reconnect");
        assert!(
            t.read_route().ask,
            "reads ask until a server says otherwise"
        );
        drop(asking);
        assert_eq!(t.stats().reads_in_flight, 0);
    }

    #[test]
    fn the_cache_is_bounded() {
        let t = OriginTracker::new(3);
        drop(t.granted(0..10, true));
        assert_eq!(t.stats().cached_chunks, 3);
    }

    #[test]
    fn promises_are_not_used_once_the_lease_has_run_out() {
        let t = OriginTracker::new(1000);
        let _g = t.granted(0..4, true);
        assert!(t.try_cached(0..1).is_none(), "no lease yet: ask the server");
        t.renew(Instant::now() + Duration::from_secs(3600));
        let _g = t.granted(0..4, true);
        assert!(t.try_cached(0..4).is_some(), "within the lease");
        // A renewal never shortens the lease.
        t.renew(Instant::now());
        assert!(t.try_cached(0..4).is_some());
        let t = OriginTracker::new(1000);
        t.renew(Instant::now() + Duration::from_millis(30));
        let _g = t.granted(0..4, true);
        assert!(t.try_cached(0..4).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(t.try_cached(0..4).is_none(), "the lease ran out");
        assert_eq!(t.stats().cached_chunks, 0, "and every promise is dropped");
    }
}
