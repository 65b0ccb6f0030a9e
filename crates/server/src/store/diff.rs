//! Which origin chunks two ends (two snapshots, or a snapshot and the live origin) read
//! differently, from the exception records alone: no data is read.
//!
//! A snapshot reads a chunk from the store chunk of the record whose run holds its id, else
//! from the origin; the live origin always reads the origin. Two ends read a chunk alike
//! exactly when both read the origin or both read the same store chunk, so only chunks that
//! have records can differ, and one forward walk of the exception tree (keyed by chunk,
//! then first id) finds them all in chunk order. The origin is overwritten in place only
//! after every snapshot that read the old data has its copy, so "both read the origin"
//! means both see the same bytes. Different sources may still hold equal bytes (a write of
//! the same data); a diff names the chunks that were written, as a backup wants.
//!
//! The walk is paged: `Store::diff_page` walks about `budget` records from a start chunk and
//! says where the next page starts, so a caller streams the diff of a large volume without
//! ever holding it, and a server can answer other requests between pages.

use super::btree::{self, Key, Tree};
use super::{ExceptionRecord, Result, Store, StoreError};
use crate::engine::Refusal;
use csnap_proto::{ChunkRange, DiffEnd, DiffPage};

/// Which store chunk `end` reads `r`'s chunk from, if `r` is the record that says so.
fn reads_from(end: DiffEnd, r: &ExceptionRecord) -> Option<u64> {
    match end {
        DiffEnd::Snapshot(id) if r.first <= id && id <= r.last => Some(r.store_chunk),
        _ => None,
    }
}

/// The chunk being walked: which store chunk each end reads it from (`None`: the origin).
struct Current {
    chunk: u64,
    from: Option<u64>,
    to: Option<u64>,
}

impl Current {
    /// Adds the chunk to `ranges` if the two ends read it differently.
    fn finish(self, ranges: &mut Vec<ChunkRange>) {
        if self.from != self.to {
            ChunkRange::push_chunk(ranges, self.chunk);
        }
    }
}

impl Store {
    /// The chunks at or after `start` that `from` and `to` read differently, walking about
    /// `budget` exception records (at least one chunk's worth: a chunk is never split across
    /// pages). Errors if a snapshot end is not live or `start` is past the volume.
    pub fn diff_page(
        &mut self,
        from: DiffEnd,
        to: DiffEnd,
        start: u64,
        budget: usize,
    ) -> Result<DiffPage> {
        for end in [from, to] {
            if let DiffEnd::Snapshot(id) = end {
                self.check_live(id)?;
            }
        }
        let origin_chunks = self.meta.geo.origin_chunks();
        if start > origin_chunks {
            return Err(StoreError::Refused(Refusal::ChunkOutOfRange {
                chunk: start,
                origin_chunks,
            }));
        }
        self.meta.check_usable()?;
        let mut page = DiffPage::default();
        if from == to {
            return Ok(page);
        }
        let budget = budget.max(1) as u64;
        let mut current: Option<Current> = None;
        btree::visit_forward(
            &mut self.meta,
            Tree::Exceptions,
            Key::new(start, 0),
            &mut |k, v| {
                let r = ExceptionRecord::decode(k, v);
                if current.as_ref().is_some_and(|c| c.chunk != r.chunk) {
                    if let Some(done) = current.take() {
                        done.finish(&mut page.ranges);
                    }
                    if page.records_walked >= budget {
                        page.next = Some(r.chunk);
                        return false;
                    }
                }
                let c = current.get_or_insert(Current {
                    chunk: r.chunk,
                    from: None,
                    to: None,
                });
                c.from = c.from.or(reads_from(from, &r));
                c.to = c.to.or(reads_from(to, &r));
                page.records_walked += 1;
                true
            },
        )?;
        if let Some(done) = current {
            done.finish(&mut page.ranges);
        }
        Ok(page)
    }
}
