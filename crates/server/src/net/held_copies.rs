//! Copies held back from the engine until a flush covers them.
//!
//! A finished copy is only written, not flushed. The engine may record it (and so let a
//! journal commit point at it) as soon as it hears of it, but then that commit must flush
//! the store before writing its record. Under load, commits run back to back, and the last
//! flush of one commit already covers every copy that finished before that flush started:
//! handing the engine only such copies lets the next commit skip its first flush, so a
//! commit costs one flush instead of two. Copies that finished too late wait for the next
//! commit; when no commit is coming, they are handed over at once and the commit that
//! records them flushes first. A rollback's copy back onto the origin makes itself stable
//! (it flushes the origin) and names no store chunk a commit must order: it is handed over
//! at once ([`CopyDurability::Flushed`]).

use crate::store::FlushTracked;
use std::collections::VecDeque;

/// Finished copies, each with the stamp its device gave it when its write returned
/// ([`FlushTracked::stamp`]), oldest first; and whether the engine was handed a copy no
/// flush covered, so that the next commit must flush first.
///
/// The server's driver keeps one; the power-cut test drives the same rules through it.
pub struct HeldCopies<T> {
    held: VecDeque<(u64, T)>,
    unflushed_released: bool,
}

impl<T> Default for HeldCopies<T> {
    fn default() -> Self {
        HeldCopies {
            held: VecDeque::new(),
            unflushed_released: false,
        }
    }
}

/// How a finished copy's data becomes stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyDurability {
    /// Written to the store, not flushed; `stamp` is what the store device's
    /// [`FlushTracked::stamp`] gave when the write returned.
    StoreWritten {
        /// The store device's flush stamp when the copy's write returned.
        stamp: u64,
    },
    /// Stable already: the copy flushed its destination itself (a rollback's copy back,
    /// `DataPath::copy_to_origin`).
    Flushed,
}

impl<T> HeldCopies<T> {
    /// A copy finished: returns it if the engine may hear of it now (it is stable by
    /// itself), else holds it until a flush covers it.
    pub fn finished(&mut self, durability: CopyDurability, copy: T) -> Option<T> {
        match durability {
            CopyDurability::Flushed => Some(copy),
            CopyDurability::StoreWritten { stamp } => {
                self.hold(stamp, copy);
                None
            }
        }
    }

    /// A finished copy whose write returned when `flushes` gave `stamp`.
    pub fn hold(&mut self, stamp: u64, copy: T) {
        self.held.push_back((stamp, copy));
    }

    /// No copy is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Takes every copy a successful flush has covered since its write returned.
    pub fn release_stable(&mut self, flushes: &FlushTracked) -> Vec<T> {
        let (stable, later): (VecDeque<_>, VecDeque<_>) = self
            .held
            .drain(..)
            .partition(|(stamp, _)| flushes.is_stable(*stamp));
        self.held = later;
        stable.into_iter().map(|(_, copy)| copy).collect()
    }

    /// Takes every copy, stable or not; if one was not, the next commit flushes first
    /// (see [`HeldCopies::commit_must_flush_first`]).
    pub fn release_all(&mut self, flushes: &FlushTracked) -> Vec<T> {
        let mut released = self.release_stable(flushes);
        if !self.held.is_empty() {
            self.unflushed_released = true;
            released.extend(self.held.drain(..).map(|(_, copy)| copy));
        }
        released
    }

    /// Whether the commit about to begin must flush the store before writing its record:
    /// true once a copy no flush covered was released, until a commit begins (asked once
    /// per commit; the answer is reset). A commit the store runs synchronously always
    /// flushes first, so an answer spent on a commit that did not begin costs nothing.
    pub fn commit_must_flush_first(&mut self) -> bool {
        std::mem::take(&mut self.unflushed_released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BlockDevice, FlushTracked, MemDevice};
    use std::sync::Arc;

    /// Copies are handed over once a flush that started after their write has succeeded,
    /// never earlier; the rest stay until a later flush or until taken all at once, which
    /// makes the next commit flush first.
    #[test]
    fn a_copy_is_stable_only_after_a_flush_that_started_after_its_write() {
        let dev = FlushTracked::new(Arc::new(MemDevice::new(1 << 20)));
        let mut held = HeldCopies::default();
        dev.write_at(&[1; 4096], 0).unwrap();
        held.hold(dev.stamp(), "a");
        assert!(held.release_stable(&dev).is_empty());
        dev.flush().unwrap();
        dev.write_at(&[2; 4096], 4096).unwrap();
        held.hold(dev.stamp(), "b");
        assert_eq!(held.release_stable(&dev), vec!["a"]);
        assert!(!held.is_empty(), "b finished after the flush started");
        dev.write_at(&[3; 4096], 8192).unwrap();
        held.hold(dev.stamp(), "c");
        assert!(
            !held.commit_must_flush_first(),
            "only stable copies were released"
        );
        assert_eq!(held.release_all(&dev), vec!["b", "c"]);
        assert!(held.is_empty());
        assert!(held.commit_must_flush_first(), "b and c were not covered");
        assert!(!held.commit_must_flush_first(), "asked once per commit");
        dev.write_at(&[4; 4096], 12288).unwrap();
        held.hold(dev.stamp(), "d");
        dev.flush().unwrap();
        assert_eq!(held.release_all(&dev), vec!["d"]);
        assert!(!held.commit_must_flush_first(), "d was covered");
    }

    /// A rollback's copy back flushed the origin itself: the engine hears of it at once,
    /// it waits for no store flush and makes no commit flush first; a copy to the store
    /// is held as before.
    #[test]
    fn a_copy_back_that_flushed_itself_is_handed_over_at_once() {
        let dev = FlushTracked::new(Arc::new(MemDevice::new(1 << 20)));
        let mut held = HeldCopies::default();
        dev.write_at(&[1; 4096], 0).unwrap();
        let stamp = dev.stamp();
        assert_eq!(
            held.finished(CopyDurability::StoreWritten { stamp }, "out"),
            None
        );
        assert_eq!(held.finished(CopyDurability::Flushed, "back"), Some("back"));
        assert!(!held.commit_must_flush_first());
        assert!(held.release_stable(&dev).is_empty(), "out is not covered");
        dev.flush().unwrap();
        assert_eq!(held.release_stable(&dev), vec!["out"]);
        assert_eq!(
            held.finished(CopyDurability::Flushed, "back 2"),
            Some("back 2")
        );
        assert!(held.is_empty());
        assert!(!held.commit_must_flush_first());
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
