//! The serving lease of a server in cluster mode: the server may serve only until the
//! instant its agent last granted, and stops for good once that instant has passed.
//!
//! One [`ServingLease`] is shared by everything that acts for the server: the engine
//! thread (before every input, action and commit, and on a timer), the connection writers
//! (before every batch of frames) and the copy workers (before each copy). Whoever first
//! sees the deadline passed makes the expiry sticky: no later extension revives it, so
//! every part agrees that nothing may be granted, answered or written from then on.

use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug)]
struct State {
    until: Instant,
    expired: bool,
}

/// A serving lease, or none (standalone mode: serve until told to stop).
#[derive(Debug)]
pub(crate) struct ServingLease {
    state: Option<Mutex<State>>,
}

/// What an extension did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Extended {
    /// The lease now runs until the later of its old end and the one asked for.
    Yes,
    /// The lease had already run out: the server has stopped, nothing is extended.
    Expired,
    /// This server runs without a lease.
    NoLease,
}

impl ServingLease {
    pub(crate) fn new(until: Option<Instant>) -> ServingLease {
        ServingLease {
            state: until.map(|until| {
                Mutex::new(State {
                    until,
                    expired: false,
                })
            }),
        }
    }

    fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
        // Two plain fields, consistent even if a holder panicked.
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the lease has run out at `now` (always false without a lease). Sticky.
    pub(crate) fn expired_at(&self, now: Instant) -> bool {
        let Some(m) = &self.state else {
            return false;
        };
        let mut st = Self::lock(m);
        if !st.expired && now >= st.until {
            st.expired = true;
        }
        st.expired
    }

    pub(crate) fn expired(&self) -> bool {
        self.expired_at(Instant::now())
    }

    /// The current end of the lease, if there is one and it has not run out.
    pub(crate) fn until(&self) -> Option<Instant> {
        let m = self.state.as_ref()?;
        let st = Self::lock(m);
        (!st.expired).then_some(st.until)
    }

    /// Moves the end of the lease to `until` if that is later; never shortens it (renewals
    /// may arrive out of order) and never revives an expired lease.
    pub(crate) fn extend_at(&self, until: Instant, now: Instant) -> Extended {
        let Some(m) = &self.state else {
            return Extended::NoLease;
        };
        let mut st = Self::lock(m);
        if st.expired || now >= st.until {
            st.expired = true;
            return Extended::Expired;
        }
        st.until = st.until.max(until);
        Extended::Yes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn no_lease_never_expires_and_ignores_extensions() {
        let lease = ServingLease::new(None);
        let far = Instant::now() + Duration::from_secs(1 << 30);
        assert!(!lease.expired_at(far));
        assert_eq!(lease.extend_at(far, Instant::now()), Extended::NoLease);
        assert_eq!(lease.until(), None);
    }

    #[test]
    fn a_lease_runs_out_at_its_end_and_stays_expired() {
        let t0 = Instant::now();
        let lease = ServingLease::new(Some(t0 + Duration::from_secs(5)));
        assert!(!lease.expired_at(t0));
        assert!(!lease.expired_at(t0 + Duration::from_millis(4999)));
        assert!(lease.expired_at(t0 + Duration::from_secs(5)));
        // Sticky: an earlier reading (another thread's clock) does not revive it...
        assert!(lease.expired_at(t0));
        // ...nor does an extension.
        assert_eq!(
            lease.extend_at(t0 + Duration::from_secs(60), t0 + Duration::from_secs(1)),
            Extended::Expired
        );
        assert!(lease.expired_at(t0));
        assert_eq!(lease.until(), None);
    }

    #[test]
    fn extensions_only_lengthen_and_an_extension_too_late_is_refused() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let lease = ServingLease::new(Some(t0 + s(5)));
        assert_eq!(lease.extend_at(t0 + s(10), t0 + s(1)), Extended::Yes);
        assert_eq!(lease.until(), Some(t0 + s(10)));
        // A stale renewal arriving late does not shorten it.
        assert_eq!(lease.extend_at(t0 + s(7), t0 + s(2)), Extended::Yes);
        assert_eq!(lease.until(), Some(t0 + s(10)));
        assert!(!lease.expired_at(t0 + s(9)));
        // Renewing after the end is too late: the server has stopped.
        assert_eq!(lease.extend_at(t0 + s(20), t0 + s(10)), Extended::Expired);
        assert!(lease.expired_at(t0 + s(9)));
    }
}
