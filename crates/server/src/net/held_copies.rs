//! Copies held back from the engine until a flush covers them.
//!
//! A finished copy is only written, not flushed. The engine may record it (and so let a
//! journal commit point at it) as soon as it hears of it, but then that commit must flush
//! the store before writing its record. Under load, commits run back to back, and the last
//! flush of one commit already covers every copy that finished before that flush started:
//! handing the engine only such copies lets the next commit skip its first flush, so a
//! commit costs one flush instead of two. Copies that finished too late wait for the next
//! commit; when no commit is coming, they are handed over at once and the commit that
//! records them flushes first.

use std::collections::VecDeque;

/// Finished copies, each with the stamp its device gave it when its write returned
/// ([`crate::store::FlushTracked::stamp`]), oldest first.
pub(crate) struct HeldCopies<T> {
    held: VecDeque<(u64, T)>,
}

impl<T> Default for HeldCopies<T> {
    fn default() -> Self {
        HeldCopies {
            held: VecDeque::new(),
        }
    }
}

impl<T> HeldCopies<T> {
    /// A finished copy whose write returned at `stamp`.
    pub(crate) fn hold(&mut self, stamp: u64, copy: T) {
        self.held.push_back((stamp, copy));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Takes every copy whose stamp `is_stable` accepts (a flush covered it).
    pub(crate) fn take_stable(&mut self, is_stable: impl Fn(u64) -> bool) -> Vec<T> {
        let (stable, later): (VecDeque<_>, VecDeque<_>) = self
            .held
            .drain(..)
            .partition(|(stamp, _)| is_stable(*stamp));
        self.held = later;
        stable.into_iter().map(|(_, copy)| copy).collect()
    }

    /// Takes every copy, stable or not.
    pub(crate) fn take_all(&mut self) -> Vec<T> {
        self.held.drain(..).map(|(_, copy)| copy).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BlockDevice, FlushTracked, MemDevice};
    use std::sync::Arc;

    /// Copies are handed over once a flush that started after their write has succeeded,
    /// never earlier; the rest stay until a later flush or until taken all at once.
    #[test]
    fn a_copy_is_stable_only_after_a_flush_that_started_after_its_write() {
        let dev = FlushTracked::new(Arc::new(MemDevice::new(1 << 20)));
        let mut held = HeldCopies::default();
        dev.write_at(&[1; 4096], 0).unwrap();
        held.hold(dev.stamp(), "a");
        assert!(held.take_stable(|s| dev.is_stable(s)).is_empty());
        dev.flush().unwrap();
        dev.write_at(&[2; 4096], 4096).unwrap();
        held.hold(dev.stamp(), "b");
        assert_eq!(held.take_stable(|s| dev.is_stable(s)), vec!["a"]);
        assert!(!held.is_empty(), "b finished after the flush started");
        dev.write_at(&[3; 4096], 8192).unwrap();
        held.hold(dev.stamp(), "c");
        assert_eq!(held.take_all(), vec!["b", "c"]);
        assert!(held.is_empty());
    }

    /// A failed flush covers nothing.
    #[test]
    fn a_failed_flush_makes_nothing_stable() {
        let mem = MemDevice::new(1 << 20);
        let dev = FlushTracked::new(Arc::new(mem.clone()));
        dev.write_at(&[1; 4096], 0).unwrap();
        let stamp = dev.stamp();
        mem.power_cut_after(0);
        assert!(dev.flush().is_err());
        assert!(!dev.is_stable(stamp));
    }
}
