//! Copies from the origin grouped into runs, so that a write that first-touches many small
//! chunks costs one origin read and one store write instead of one of each per chunk.
//!
//! The engine asks for one copy per chunk ([`crate::engine::Action::Copy`]) and, since the
//! store allocates reservations in order, the copy-outs of one write usually name
//! consecutive origin chunks going to consecutive store chunks. The driver feeds the copies
//! of one pump through [`CopyRuns`] and runs each run as one job; every copy of a run is
//! reported to the engine as its own `CopyDone`, after the run's store write returned, so
//! the engine's rules (a copy is recorded only once it is written, and made stable by the
//! commit that records it) hold for each copy exactly as before.

use crate::engine::CopyId;

/// Consecutive origin chunks copied to consecutive store chunks, as one read and one write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CopyRun {
    /// The first origin chunk.
    pub(crate) chunk: u64,
    /// The first store chunk (device chunk address).
    pub(crate) to: u64,
    /// The engine's copies, one per chunk, in chunk order.
    pub(crate) copies: Vec<CopyId>,
}

impl CopyRun {
    /// Chunks in the run.
    pub(crate) fn len(&self) -> u64 {
        self.copies.len() as u64
    }

    fn extends_to(&self, chunk: u64, to: u64) -> bool {
        self.chunk.checked_add(self.len()) == Some(chunk)
            && self.to.checked_add(self.len()) == Some(to)
    }
}

/// The run being gathered: copies join it while they continue it, up to `max_chunks`.
pub(crate) struct CopyRuns {
    open: Option<CopyRun>,
    max_chunks: u64,
}

impl CopyRuns {
    /// Runs of at most `max_chunks` chunks (at least one).
    pub(crate) fn new(max_chunks: u64) -> CopyRuns {
        CopyRuns {
            open: None,
            max_chunks: max_chunks.max(1),
        }
    }

    /// Adds a copy of origin `chunk` to store chunk `to`: returns the run it closed (the
    /// open one, which this copy does not continue or which is full), to be started now.
    pub(crate) fn push(&mut self, copy: CopyId, chunk: u64, to: u64) -> Option<CopyRun> {
        if let Some(run) = self.open.as_mut() {
            if run.len() < self.max_chunks && run.extends_to(chunk, to) {
                run.copies.push(copy);
                return None;
            }
        }
        self.open.replace(CopyRun {
            chunk,
            to,
            copies: vec![copy],
        })
    }

    /// Takes the open run (the pump has no more copies for now).
    pub(crate) fn take(&mut self) -> Option<CopyRun> {
        self.open.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_copies_make_one_run() {
        let mut runs = CopyRuns::new(64);
        for (i, copy) in (10..26).enumerate() {
            assert_eq!(runs.push(copy, 100 + i as u64, 7 + i as u64), None);
        }
        let run = runs.take().unwrap();
        assert_eq!((run.chunk, run.to, run.len()), (100, 7, 16));
        assert_eq!(run.copies, (10..26).collect::<Vec<_>>());
        assert_eq!(runs.take(), None, "taken once");
    }

    #[test]
    fn a_gap_on_either_side_starts_a_new_run() {
        let mut runs = CopyRuns::new(64);
        assert_eq!(runs.push(1, 5, 50), None);
        assert_eq!(runs.push(2, 6, 51), None);
        // Next origin chunk, but not the next store chunk.
        let closed = runs.push(3, 7, 60).unwrap();
        assert_eq!(closed.copies, vec![1, 2]);
        // Next store chunk, but not the next origin chunk.
        let closed = runs.push(4, 9, 61).unwrap();
        assert_eq!(closed.copies, vec![3]);
        // Backwards.
        let closed = runs.push(5, 8, 60).unwrap();
        assert_eq!(closed.copies, vec![4]);
        assert_eq!(runs.take().unwrap().copies, vec![5]);
    }

    #[test]
    fn a_full_run_is_closed() {
        let mut runs = CopyRuns::new(3);
        let closed: Vec<_> = (0..7u64).filter_map(|i| runs.push(i, i, 100 + i)).collect();
        assert_eq!(closed.len(), 2);
        assert!(closed.iter().all(|r| r.len() == 3));
        assert_eq!(closed[1].chunk, 3);
        assert_eq!(runs.take().unwrap().copies, vec![6]);
    }

    #[test]
    fn no_run_wraps_around_the_chunk_numbers() {
        let mut runs = CopyRuns::new(8);
        assert_eq!(runs.push(1, u64::MAX, 3), None);
        assert!(runs.push(2, 0, 4).is_some());
    }
}
