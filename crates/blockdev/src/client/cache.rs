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
//! Origin reads are the hot path, so a read that does not ask takes no lock: it counts
//! itself in an atomic slot that belongs to the current epoch ([`ReadSlots`]), then checks
//! that the epoch and the rollback flag have not changed meanwhile. The lock is taken only
//! when an epoch changes, a rollback starts or ends, or no slot is free.
//!
//! Promises are also leases: they may be used only until the lease the server last
//! renewed runs out (`renew`, from answers to requests sent at a known instant). A client
//! cut off from its server (a partition, a frozen process) stops writing through the cache
//! by itself, so a server that stops hearing from it can count on it after the lease.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
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
    /// started in, counted here when no slot was free (see [`ReadSlots`]).
    reads_in_flight: BTreeMap<u64, usize>,
    /// The epoch each read slot counts for; `None`: the slot is free.
    slot_epochs: [Option<u64>; READ_SLOTS],
    /// Origin reads in flight that ask the server first (a rollback runs), per epoch.
    asking_reads_in_flight: BTreeMap<u64, usize>,
    /// A rollback runs: origin reads ask the server first.
    rollback: bool,
    hits: u64,
    misses: u64,
    /// Promises may be used until then; `None`: no lease yet.
    lease_until: Option<Instant>,
}

/// How many epochs may have direct origin reads in flight counted without the lock. A
/// read that outlives this many epoch changes (one per snapshot) makes later reads take
/// the lock until it lands.
const READ_SLOTS: usize = 4;
/// `ReadSlots::route` when no slot is free: direct reads count under the lock.
const NO_SLOT: u64 = 0xff;
const ROUTE_SLOT_BITS: u32 = 8;
const ROUTE_ROLLBACK: u64 = 1 << ROUTE_SLOT_BITS;
const ROUTE_EPOCH_SHIFT: u32 = ROUTE_SLOT_BITS + 1;

/// A counter on its own cache line, so reads counted in one slot do not slow another.
#[derive(Debug, Default)]
#[repr(align(64))]
struct PaddedCount(AtomicUsize);

/// The lock-free side of origin read accounting. `route` packs what a read needs to decide
/// alone: the epoch, whether a rollback runs, and the slot that counts direct reads of
/// this epoch. It changes only under the tracker's lock. A reader increments the slot and
/// then loads `route` again; the lock holder stores `route` and then loads the slot (all
/// `SeqCst`), so either the reader sees the change and backs off, or the lock holder sees
/// the read counted and waits for it.
#[derive(Debug, Default)]
struct ReadSlots {
    route: AtomicU64,
    counts: [PaddedCount; READ_SLOTS],
    /// Tasks waiting in `wait_until`: a read that empties its slot wakes them only then,
    /// so the common read end touches no lock either.
    waiters: AtomicUsize,
}

fn pack_route(epoch: u64, rollback: bool, slot: Option<usize>) -> u64 {
    let slot = slot.map_or(NO_SLOT, |s| s as u64);
    (epoch << ROUTE_EPOCH_SHIFT) | if rollback { ROUTE_ROLLBACK } else { 0 } | slot
}

/// The slot a packed route counts direct reads in, if it lets them go without the lock.
fn lock_free_slot(route: u64) -> Option<usize> {
    let slot = route & (ROUTE_ROLLBACK - 1);
    (route & ROUTE_ROLLBACK == 0 && slot != NO_SLOT).then_some(slot as usize)
}

/// Shared by an origin client's connection task (grants, notices) and its writers.
#[derive(Debug)]
pub struct OriginTracker {
    state: Mutex<State>,
    reads: ReadSlots,
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
    counted: ReadCount,
}

/// Where a read in flight is counted.
#[derive(Debug)]
enum ReadCount {
    /// A direct read in a lock-free slot.
    Slot(usize),
    /// Under the lock: a read that asks, or a direct read when no slot was free.
    Locked { epoch: u64, asked: bool },
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        match self.counted {
            ReadCount::Slot(slot) => self.tracker.release_slot(slot),
            ReadCount::Locked { epoch, asked } => {
                let mut st = self.tracker.lock();
                let reads = if asked {
                    &mut st.asking_reads_in_flight
                } else {
                    &mut st.reads_in_flight
                };
                if let Some(n) = reads.get_mut(&epoch) {
                    *n -= 1;
                    if *n == 0 {
                        reads.remove(&epoch);
                    }
                }
                drop(st);
                self.tracker.drained.notify_waiters();
            }
        }
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
        let tracker = OriginTracker {
            state: Mutex::new(State::default()),
            reads: ReadSlots::default(),
            drained: Notify::new(),
            capacity,
        };
        tracker.publish_route(&mut tracker.lock());
        Arc::new(tracker)
    }

    /// Publishes the epoch and rollback flag of `st` to lock-free readers, with a slot for
    /// the epoch's direct reads: the one it has, else a free one (a slot is free once it
    /// counts nothing: its epoch's reads have landed), else none (reads take the lock).
    /// Called under the lock after every change of `st.epoch` or `st.rollback`.
    fn publish_route(&self, st: &mut State) {
        let epoch = st.epoch;
        let mut slot = st.slot_epochs.iter().position(|e| *e == Some(epoch));
        if slot.is_none() {
            // Readers stop counting in the old epoch's slot first (they wait for the lock
            // we hold); then a slot that counts nothing never will for its old epoch: a
            // late reader of an old route sees the route changed and backs off.
            self.reads
                .route
                .store(pack_route(epoch, st.rollback, None), SeqCst);
            for (i, e) in st.slot_epochs.iter_mut().enumerate() {
                if e.is_some_and(|e| e != epoch) && self.reads.counts[i].0.load(SeqCst) == 0 {
                    *e = None;
                }
            }
            slot = st.slot_epochs.iter().position(Option::is_none);
            if let Some(i) = slot {
                st.slot_epochs[i] = Some(epoch);
            }
        }
        self.reads
            .route
            .store(pack_route(epoch, st.rollback, slot), SeqCst);
    }

    /// A direct read counted in `slot` has landed (or backed off).
    fn release_slot(&self, slot: usize) {
        if self.reads.counts[slot].0.fetch_sub(1, SeqCst) == 1
            && self.reads.waiters.load(SeqCst) > 0
        {
            self.drained.notify_waiters();
        }
    }

    /// Whether direct reads counted in slots, of `epoch` or before, are still in flight.
    fn slot_reads_in_flight(&self, st: &State, epoch: u64) -> bool {
        st.slot_epochs
            .iter()
            .enumerate()
            .any(|(i, e)| e.is_some_and(|e| e <= epoch) && self.reads.counts[i].0.load(SeqCst) > 0)
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
        self.publish_route(&mut st);
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
                && !self.slot_reads_in_flight(st, epoch)
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
                && !self.slot_reads_in_flight(st, epoch)
        })
        .await
    }

    async fn wait_until(&self, done: impl Fn(&State) -> bool) {
        // Counted before the check, so a read that empties its slot after the check sees
        // a waiter and wakes it (see `release_slot`).
        self.reads.waiters.fetch_add(1, SeqCst);
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, SeqCst);
            }
        }
        let _waiting = Waiting(&self.reads.waiters);
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
    /// guard. A read either asks or is waited for before a rollback's start is
    /// acknowledged: without a rollback it counts itself in the epoch's slot and then
    /// checks that the route still holds (see [`ReadSlots`]); otherwise it decides under
    /// the same lock as [`OriginTracker::ask_before_reads`].
    pub fn read_route(self: &Arc<Self>) -> ReadRoute {
        loop {
            let route = self.reads.route.load(SeqCst);
            let Some(slot) = lock_free_slot(route) else {
                break;
            };
            self.reads.counts[slot].0.fetch_add(1, SeqCst);
            if self.reads.route.load(SeqCst) == route {
                return ReadRoute {
                    ask: false,
                    guard: ReadGuard {
                        tracker: self.clone(),
                        counted: ReadCount::Slot(slot),
                    },
                };
            }
            // The epoch or the rollback flag changed meanwhile: this count may already
            // have been looked at, so undo it and decide again.
            self.release_slot(slot);
        }
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
                counted: ReadCount::Locked { epoch, asked: ask },
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
        self.publish_route(&mut st);
        old
    }

    /// Whether origin reads ask the server first (a rollback runs, or no session says).
    pub fn asks_before_reads(&self) -> bool {
        self.reads.route.load(SeqCst) & ROUTE_ROLLBACK != 0
    }

    /// Whether a rollback runs, as the server last said (`Welcome`, `RollbackDone`).
    pub fn set_rollback(&self, running: bool) {
        let mut st = self.lock();
        st.rollback = running;
        self.publish_route(&mut st);
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
                + st.asking_reads_in_flight.values().sum::<usize>()
                + (self.reads.counts.iter())
                    .map(|c| c.0.load(SeqCst))
                    .sum::<usize>(),
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

    #[tokio::test]
    async fn a_direct_read_that_outlives_every_slot_is_still_waited_for() {
        let t = OriginTracker::new(1000);
        let old_read = t.read_route();
        assert!(!old_read.ask);
        let first = t.invalidate();
        // More snapshots than slots while the old read lands: reads go on, taking the
        // lock once no slot is free, and are all counted.
        let mut later = Vec::new();
        for _ in 0..READ_SLOTS * 2 {
            later.push(t.read_route());
            t.invalidate();
        }
        assert_eq!(t.stats().reads_in_flight, 1 + READ_SLOTS * 2);
        drop(later);
        let epoch = t.ask_before_reads();
        assert!(t.read_route().ask);
        let wait = t.settled(epoch);
        tokio::pin!(wait);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), wait.as_mut())
                .await
                .is_err(),
            "the read of epoch {first} is still in flight"
        );
        drop(old_read);
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("settled once the oldest read landed");
        assert_eq!(t.stats().reads_in_flight, 0);
        // Slots are free again: reads go without the lock.
        t.set_rollback(false);
        let r = t.read_route();
        assert!(matches!(r.guard.counted, ReadCount::Slot(_)));
    }

    /// Reader threads hammer `read_route` while the test starts and ends rollbacks (and
    /// takes snapshots): once a rollback's start has settled, no read that went to the
    /// origin directly is still in flight, and none starts until the rollback ends.
    #[tokio::test]
    async fn concurrent_direct_reads_have_landed_when_a_rollback_start_settles() {
        use std::sync::atomic::AtomicBool;
        let t = OriginTracker::new(1000);
        let direct_in_flight = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (t, direct, stop) = (t.clone(), direct_in_flight.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut direct_reads = 0u64;
                    while !stop.load(SeqCst) {
                        let route = t.read_route();
                        if !route.ask {
                            direct.fetch_add(1, SeqCst);
                            for _ in 0..50 {
                                std::hint::spin_loop();
                            }
                            direct.fetch_sub(1, SeqCst);
                            direct_reads += 1;
                        }
                        drop(route.guard);
                    }
                    direct_reads
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        for round in 0..200 {
            assert!(Instant::now() < deadline, "round {round} took too long");
            if round % 3 == 0 {
                t.invalidate();
            }
            let epoch = t.ask_before_reads();
            tokio::time::timeout(Duration::from_secs(5), t.settled(epoch))
                .await
                .unwrap_or_else(|_| panic!("round {round}: the start never settled"));
            assert_eq!(
                direct_in_flight.load(SeqCst),
                0,
                "round {round}: a direct read is in flight after the start settled"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
            assert_eq!(
                direct_in_flight.load(SeqCst),
                0,
                "round {round}: a direct read started during the rollback"
            );
            t.set_rollback(false);
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        stop.store(true, SeqCst);
        let direct_reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert!(direct_reads > 0, "the readers never went direct");
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
