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
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().in_flight.range(..=epoch).next().is_none() {
                return;
            }
            notified.await;
        }
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
