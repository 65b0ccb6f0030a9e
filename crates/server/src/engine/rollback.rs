//! Part of the engine's state: the online rollback of the origin to a snapshot (the
//! *source*), see docs/architecture.md "Online rollback".
//!
//! When the rollback starts, the engine creates a snapshot of the origin as it is (the
//! *pin*, newest of all; no snapshot is created while the rollback runs). From then on an
//! origin chunk still to be copied back is one at or above the cursor that the source and
//! the pin read differently (`MetaStore::diff_page` between them finds these from the
//! exception records alone): an origin write made after the start copies the chunk out
//! for the source and the pin alike, so they read it the same way again and the copy-back
//! leaves it alone, while the copy-back's own copy-out (for the pin and every other
//! snapshot sharing the chunk) does not change the source's exception. So the store's
//! record (source, pin, cursor) is all a restarted server needs to resume.
//!
//! The copy-back walks the origin in chunk order with a small window of chunks in flight;
//! the cursor is the lowest chunk of the window not yet copied (or where the scan goes on
//! when the window is empty). Invariant: every chunk below `cursor` is copied back (its copy
//! is on stable storage), every chunk below `durable_cursor` is so as of a committed store
//! record, and `durable_cursor <= cursor`.

use super::io::{CopyId, Requester};
use csnap_proto::SnapId;
use std::collections::{BTreeMap, BTreeSet};

/// The rollback record the store keeps (`MetaStore::rollback`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RollbackRecord {
    /// The snapshot the origin becomes.
    pub source: SnapId,
    /// The snapshot of the origin taken when the rollback started.
    pub pin: SnapId,
    /// Origin chunks below it are rolled back.
    pub cursor: u64,
}

/// Where one chunk of the window is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    /// Waiting for its copy-out, read locks or a commit before the copy back may start.
    Prepare,
    /// The source's store chunk is being copied onto the origin.
    Copying(CopyId),
    /// Copied back and on stable storage.
    Copied,
}

pub(super) struct Rollback {
    pub(super) source: SnapId,
    pub(super) pin: SnapId,
    origin_chunks: u64,
    /// Chunks the copy-back works on at once (`EngineConfig::rollback_window`).
    window_len: usize,
    cursor: u64,
    durable_cursor: u64,
    /// Cursor values recorded in the store, with the generation each is durable at.
    recorded: Vec<(u64, u64)>,
    /// The next chunk the scan for chunks to copy back examines.
    scan: u64,
    scan_done: bool,
    window: BTreeMap<u64, Stage>,
    /// The start (pin and record) is durable; nothing is copied back before.
    started: bool,
    start_gen: u64,
    /// Origin connections that have not yet acknowledged `RollbackStarting`: they may
    /// still read the origin directly, so nothing is copied back until they did or went.
    awaiting: BTreeSet<u64>,
    /// The end ("no rollback") was recorded at this generation.
    ending: Option<u64>,
    /// Chunks copied back by this server.
    pub(super) chunks_copied: u64,
    /// Who asked for the rollback: answered once its start is durable and acknowledged.
    pub(super) reply_to: Option<Requester>,
    /// The last tenth of the origin logged as copied back (`rollback_progress`).
    pub(super) logged_tenths: u64,
    /// The copy-back is paused for lack of room and the log said so (once, not at every
    /// event); cleared when a copy-out starts again.
    pub(super) paused: bool,
}

impl Rollback {
    /// A rollback starting now (its record written at generation `gen`), or resumed from
    /// the store's record (`gen` 0: already durable).
    pub(super) fn new(
        record: RollbackRecord,
        origin_chunks: u64,
        window_len: usize,
        gen: u64,
        awaiting: BTreeSet<u64>,
    ) -> Rollback {
        Rollback {
            source: record.source,
            pin: record.pin,
            origin_chunks,
            window_len: window_len.max(1),
            cursor: record.cursor,
            durable_cursor: record.cursor,
            recorded: Vec::new(),
            scan: record.cursor,
            scan_done: record.cursor >= origin_chunks,
            window: BTreeMap::new(),
            started: gen == 0,
            start_gen: gen,
            awaiting,
            ending: None,
            chunks_copied: 0,
            reply_to: None,
            paused: false,
            logged_tenths: record.cursor.saturating_mul(10) / origin_chunks.max(1),
        }
    }

    /// The store record as it is now.
    pub(super) fn record(&self) -> RollbackRecord {
        RollbackRecord {
            source: self.source,
            pin: self.pin,
            cursor: self.cursor,
        }
    }

    /// `snap` is the source or the pin: it must stay live and unwritten meanwhile.
    pub(super) fn involves(&self, snap: SnapId) -> bool {
        snap == self.source || snap == self.pin
    }

    pub(super) fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Copying back may go on: the start is durable and every origin client switched to
    /// asking before it reads.
    pub(super) fn may_copy(&self) -> bool {
        self.started && self.awaiting.is_empty() && self.ending.is_none()
    }

    /// `conn` acknowledged `RollbackStarting`, or went.
    pub(super) fn acknowledged(&mut self, conn: u64) {
        self.awaiting.remove(&conn);
    }

    /// Where the scan goes on, if the window has room and the scan is not done.
    pub(super) fn scan_from(&self) -> Option<u64> {
        (!self.scan_done && self.window.len() < self.window_len).then_some(self.scan)
    }

    /// A scan page found these chunks to copy back (ascending, at or after the scan
    /// position) and goes on at `next` (`None`: the end). Takes what fits the window and
    /// moves the scan to just after the last chunk taken.
    pub(super) fn found(&mut self, chunks: impl IntoIterator<Item = u64>, next: Option<u64>) {
        for chunk in chunks {
            if chunk < self.scan {
                continue;
            }
            if self.window.len() >= self.window_len {
                self.scan = chunk;
                return;
            }
            self.window.insert(chunk, Stage::Prepare);
            self.scan = chunk + 1;
        }
        match next {
            Some(next) => self.scan = self.scan.max(next),
            None => {
                self.scan = self.origin_chunks;
                self.scan_done = true;
            }
        }
    }

    /// The window's chunks waiting to start their copy back.
    pub(super) fn preparing(&self) -> Vec<u64> {
        self.window
            .iter()
            .filter(|(_, s)| **s == Stage::Prepare)
            .map(|(c, _)| *c)
            .collect()
    }

    pub(super) fn copying(&mut self, chunk: u64, copy: CopyId) {
        self.window.insert(chunk, Stage::Copying(copy));
    }

    /// The copy back of `chunk` is on stable storage.
    pub(super) fn copied(&mut self, chunk: u64) {
        if let Some(stage) = self.window.get_mut(&chunk) {
            *stage = Stage::Copied;
            self.chunks_copied += 1;
        }
    }

    /// Moves the cursor over the copied chunks at the bottom of the window: the new
    /// cursor if it moved (the caller records it in the store).
    pub(super) fn advance(&mut self) -> Option<u64> {
        while let Some((&chunk, &stage)) = self.window.first_key_value() {
            if stage != Stage::Copied {
                break;
            }
            self.window.remove(&chunk);
        }
        let cursor = self
            .window
            .keys()
            .next()
            .copied()
            .unwrap_or(self.scan)
            .max(self.cursor);
        (cursor != self.cursor).then(|| {
            self.cursor = cursor;
            cursor
        })
    }

    /// The cursor `cursor` was recorded in the store at generation `gen`.
    pub(super) fn recorded(&mut self, gen: u64, cursor: u64) {
        self.recorded.push((gen, cursor));
    }

    /// Every chunk is copied back: the end may be recorded.
    pub(super) fn finished(&self) -> bool {
        self.scan_done && self.window.is_empty() && self.ending.is_none() && self.started
    }

    /// The end ("no rollback") was recorded at generation `gen`.
    pub(super) fn ending(&mut self, gen: u64) {
        self.ending = Some(gen);
    }

    /// A commit completed: what became durable. True if the whole rollback is done (the
    /// caller drops it and tells the origin clients).
    pub(super) fn committed(&mut self, is_committed: impl Fn(u64) -> bool) -> bool {
        if !self.started && is_committed(self.start_gen) {
            self.started = true;
        }
        let (done, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.recorded)
            .into_iter()
            .partition(|(gen, _)| is_committed(*gen));
        self.recorded = later;
        if let Some(max) = done.iter().map(|(_, c)| *c).max() {
            self.durable_cursor = self.durable_cursor.max(max);
        }
        self.ending.is_some_and(is_committed)
    }

    /// The chunk is copied back as of a committed record: an origin write may go there.
    pub(super) fn durably_rolled(&self, chunk: u64) -> bool {
        chunk < self.durable_cursor
    }

    /// The chunk's copy back is on stable storage (origin reads may go to the origin),
    /// not necessarily recorded.
    pub(super) fn copied_back(&self, chunk: u64) -> bool {
        chunk < self.cursor || self.window.get(&chunk) == Some(&Stage::Copied)
    }

    /// The chunk is in the window (to be copied back soon, or being copied).
    pub(super) fn in_window(&self, chunk: u64) -> bool {
        self.window.contains_key(&chunk)
    }

    /// The start is durable and acknowledged: the requester may be answered now (taken).
    pub(super) fn take_reply(&mut self) -> Option<Requester> {
        if self.started && self.awaiting.is_empty() {
            self.reply_to.take()
        } else {
            None
        }
    }

    /// A new tenth of the origin copied back since the last call: the percentage to log.
    pub(super) fn progress_to_log(&mut self) -> Option<u64> {
        let tenths = self.cursor.saturating_mul(10) / self.origin_chunks.max(1);
        (tenths > self.logged_tenths && tenths < 10).then(|| {
            self.logged_tenths = tenths;
            tenths * 10
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: usize = 16;

    fn rollback(cursor: u64, gen: u64) -> Rollback {
        let record = RollbackRecord {
            source: SnapId(1),
            pin: SnapId(2),
            cursor,
        };
        Rollback::new(record, 100, WINDOW, gen, BTreeSet::from([7]))
    }

    #[test]
    fn nothing_is_copied_before_the_start_is_durable_and_acknowledged() {
        let mut r = rollback(0, 3);
        assert!(!r.may_copy());
        r.committed(|g| g <= 3);
        assert!(!r.may_copy(), "connection 7 has not acknowledged");
        r.acknowledged(7);
        assert!(r.may_copy());
    }

    #[test]
    fn the_cursor_passes_only_copied_chunks_and_is_durable_once_committed() {
        let mut r = rollback(0, 0);
        assert_eq!(r.scan_from(), Some(0));
        r.found([5, 9, 40], Some(60));
        assert_eq!(r.preparing(), vec![5, 9, 40]);
        assert_eq!(r.advance(), Some(5), "nothing below 5 to copy back");
        r.recorded(1, 5);
        r.copying(9, 1);
        r.copied(9);
        assert_eq!(r.advance(), None, "5 is not copied yet");
        assert!(r.copied_back(9) && !r.copied_back(5) && r.copied_back(4));
        r.copying(5, 2);
        r.copied(5);
        assert_eq!(r.advance(), Some(40));
        r.recorded(2, 40);
        assert!(!r.committed(|g| g <= 1));
        assert!(r.durably_rolled(4) && !r.durably_rolled(9));
        r.committed(|g| g <= 2);
        assert!(r.durably_rolled(39) && !r.durably_rolled(40));
        r.copied(40);
        assert_eq!(r.advance(), Some(60), "on to where the scan goes on");
        assert!(!r.finished());
        r.found([], None);
        assert_eq!(r.advance(), Some(100));
        assert!(r.finished());
        r.ending(3);
        assert!(!r.finished());
        assert!(r.committed(|g| g <= 3), "the end is durable");
    }

    #[test]
    fn a_full_window_stops_the_scan_where_it_was() {
        let mut r = rollback(10, 0);
        let many: Vec<u64> = (10..10 + WINDOW as u64 + 5).collect();
        r.found(many, Some(500));
        assert_eq!(r.preparing().len(), WINDOW);
        assert_eq!(r.scan_from(), None, "no room");
        for c in 10..14 {
            r.copied(c);
        }
        assert_eq!(r.advance(), Some(14));
        assert_eq!(r.scan_from(), Some(10 + WINDOW as u64));
    }
}
