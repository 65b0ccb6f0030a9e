//! The csnap NBD exports: `VOLUME` is the origin, `VOLUME@SNAPSHOT` each snapshot, as the
//! server lists them at the moment a client asks.
//!
//! Block status (docs/nbd.md, "Metadata contexts"): every export offers `base:allocation`
//! and, for each live snapshot FROM, `qemu:dirty-bitmap:FROM`, the chunks changed since
//! FROM. Both are answered from metadata: the origin file's holes (SEEK_DATA/SEEK_HOLE)
//! and the server's `Diff` pages, never by reading data.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use csnap_proto::{ChunkRange, DiffEnd, SnapId, SnapshotInfo, SnapshotState};

use crate::client::Volume;
use crate::nbd::consts::{
    CONTEXT_BASE_ALLOCATION, CONTEXT_DIRTY_BITMAP_PREFIX, STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};
use crate::nbd::{
    BlockSizes, BoxFuture, Export, ExportFeatures, ExportInfo, Exports, Extent, MetaContext,
    Payload,
};

/// Most hole/data runs of the origin one block status answer walks.
const MAX_ALLOCATION_RUNS: usize = 4096;
/// Exception records one diff page walks for a block status answer, and the most pages
/// one answer asks for: the answer covers less than asked rather than cost more.
const DIFF_PAGE_RECORDS: u32 = 4096;
const MAX_DIFF_PAGES: usize = 4;

/// The exports of one volume.
#[derive(Debug)]
pub struct CsnapExports {
    name: String,
    volume: Arc<Volume>,
    snapshots_read_only: bool,
}

impl CsnapExports {
    /// `name` is the volume name (the origin export's name). With `snapshots_read_only`,
    /// snapshot exports refuse writes (advertised read-only).
    pub fn new(name: &str, volume: Arc<Volume>, snapshots_read_only: bool) -> CsnapExports {
        CsnapExports {
            name: name.to_owned(),
            volume,
            snapshots_read_only,
        }
    }

    fn info(&self, name: String, description: String, read_only: bool) -> ExportInfo {
        ExportInfo {
            name,
            description: Some(description),
            size: self.volume.size(),
            read_only,
            features: features(),
            block_sizes: block_sizes(&self.volume),
        }
    }

    fn snapshot_of<'a>(&self, export: &'a str) -> Option<&'a str> {
        export
            .strip_prefix(self.name.as_str())
            .and_then(|rest| rest.strip_prefix('@'))
    }
}

fn features() -> ExportFeatures {
    ExportFeatures {
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        fast_zero: true,
        // Every connection writes through the same files; FLUSH syncs them all.
        multi_conn: true,
        rotational: false,
    }
}

/// The NBD maximum payload: the 2^25 bytes the protocol says a server should accept from
/// clients that never negotiate sizes. The client splits larger requests into bounded
/// metadata questions (`client::MAX_QUESTION_CHUNKS`), so this holds for every chunk size.
pub const MAX_PAYLOAD: u32 = 32 << 20;

fn block_sizes(volume: &Volume) -> BlockSizes {
    let chunk = u32::try_from(volume.chunk_size()).unwrap_or(MAX_PAYLOAD);
    BlockSizes {
        // Any alignment: under direct I/O unaligned requests are read-modify-written
        // (client::devices), as qemu-nbd --cache=none does.
        minimum: 1,
        preferred: chunk.clamp(4096, MAX_PAYLOAD),
        maximum_payload: MAX_PAYLOAD,
    }
}

fn is_listed(s: &SnapshotInfo) -> bool {
    s.state == SnapshotState::Live
}

impl Exports for CsnapExports {
    fn list(&self) -> BoxFuture<'_, io::Result<Vec<ExportInfo>>> {
        Box::pin(async move {
            let snapshots = self.volume.list_snapshots().await?;
            let mut list = vec![self.info(
                self.name.clone(),
                format!("csnap volume {} (origin)", self.name),
                false,
            )];
            for s in snapshots.iter().filter(|s| is_listed(s)) {
                list.push(self.info(
                    format!("{}@{}", self.name, s.name),
                    format!(
                        "snapshot {} (id {}) of {}, created {}",
                        s.name, s.id, self.name, s.ctime
                    ),
                    self.snapshots_read_only,
                ));
            }
            Ok(list)
        })
    }

    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Option<Arc<dyn Export>>>> {
        Box::pin(async move {
            if name.is_empty() || name == self.name {
                let export: Arc<dyn Export> = Arc::new(CsnapExport {
                    volume: self.volume.clone(),
                    snap: None,
                    read_only: false,
                    description: format!("csnap volume {} (origin)", self.name),
                });
                return Ok(Some(export));
            }
            let Some(wanted) = self.snapshot_of(name) else {
                return Ok(None);
            };
            let snapshots = self.volume.list_snapshots().await?;
            let Some(s) = snapshots.iter().find(|s| s.name == wanted && is_listed(s)) else {
                return Ok(None);
            };
            let export: Arc<dyn Export> = Arc::new(CsnapExport {
                volume: self.volume.clone(),
                snap: Some(s.id),
                read_only: self.snapshots_read_only,
                description: format!("snapshot {} (id {}) of {}", s.name, s.id, self.name),
            });
            Ok(Some(export))
        })
    }
}

/// The origin (`snap: None`) or one snapshot.
#[derive(Debug)]
pub struct CsnapExport {
    volume: Arc<Volume>,
    snap: Option<SnapId>,
    read_only: bool,
    description: String,
}

impl Export for CsnapExport {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn features(&self) -> ExportFeatures {
        features()
    }

    fn block_sizes(&self) -> BlockSizes {
        block_sizes(&self.volume)
    }

    fn description(&self) -> Option<String> {
        Some(self.description.clone())
    }

    fn read_at(&self, offset: u64, len: u32) -> BoxFuture<'_, io::Result<Payload>> {
        Box::pin(async move {
            Ok(match self.snap {
                None => self.volume.read_origin(offset, len).await?.into(),
                Some(s) => {
                    Payload::from_parts(self.volume.read_snapshot_parts(s, offset, len).await?)
                }
            })
        })
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            match self.snap {
                None => self.volume.write_origin(offset, data, fua).await?,
                Some(s) => self.volume.write_snapshot(s, offset, data, fua).await?,
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move { Ok(self.volume.flush().await?) })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
        fast: bool,
    ) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            Ok(self
                .volume
                .write_zeroes(self.snap, offset, len, may_trim, fast, fua)
                .await?)
        })
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        // See `Volume::trim`: whole origin chunks are deallocated under a write grant;
        // on a snapshot TRIM is a no-op, which the protocol allows.
        Box::pin(async move { Ok(self.volume.trim(self.snap, offset, len, fua).await?) })
    }

    fn meta_contexts(&self) -> BoxFuture<'_, io::Result<Vec<MetaContext>>> {
        Box::pin(async move {
            let snapshots = self.volume.list_snapshots().await?;
            let mut offered = vec![MetaContext::new(CONTEXT_BASE_ALLOCATION, 0)];
            offered.extend(snapshots.iter().filter(|s| is_listed(s)).map(|s| {
                MetaContext::new(format!("{CONTEXT_DIRTY_BITMAP_PREFIX}{}", s.name), s.id.0)
            }));
            Ok(offered)
        })
    }

    fn block_status<'a>(
        &'a self,
        context: &'a MetaContext,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, io::Result<Vec<Extent>>> {
        Box::pin(async move {
            let end = offset.saturating_add(len).min(self.volume.size());
            if end <= offset {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("block status of {len} bytes at {offset} is outside the volume"),
                ));
            }
            if context.name == CONTEXT_BASE_ALLOCATION {
                self.allocation(offset, end).await
            } else if context.name.starts_with(CONTEXT_DIRTY_BITMAP_PREFIX) {
                self.changed_since(SnapId(context.tag), offset, end).await
            } else {
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("metadata context {:?} is not offered", context.name),
                ))
            }
        })
    }
}

impl CsnapExport {
    /// `base:allocation` for `[offset, end)`. The origin's holes read as zeroes. A
    /// snapshot reads its chunks that have an exception from the store (reported as
    /// data) and the others from the origin (reported as the origin's allocation).
    ///
    /// The origin's holes are asked first and the snapshot's exceptions second: a chunk
    /// still shared when the diff is read was shared (so unwritten on the origin since
    /// the snapshot, the origin overwriting only after the copy-out) when the holes were
    /// asked, so its origin allocation is the snapshot's.
    async fn allocation(&self, offset: u64, end: u64) -> io::Result<Vec<Extent>> {
        let runs = self
            .volume
            .origin_allocation(offset, end - offset, MAX_ALLOCATION_RUNS)
            .await?;
        let mut extents: Vec<Extent> = runs
            .iter()
            .map(|r| Extent {
                len: r.len,
                flags: if r.hole { STATE_HOLE | STATE_ZERO } else { 0 },
            })
            .collect();
        if let Some(snap) = self.snap {
            let covered = offset + extents.iter().map(|e| e.len).sum::<u64>();
            let (in_store, covered) = self
                .changed_chunks(DiffEnd::Snapshot(snap), DiffEnd::Origin, offset, covered)
                .await?;
            extents = overlay(&extents, offset, covered, &in_store, 0);
        }
        Ok(align_allocation(
            &extents,
            offset,
            u64::from(block_sizes(&self.volume).minimum),
            self.volume.size(),
        ))
    }

    /// `qemu:dirty-bitmap:FROM` for `[offset, end)`: the chunks this export (a snapshot,
    /// or the live origin) reads differently from snapshot `from` are dirty.
    async fn changed_since(&self, from: SnapId, offset: u64, end: u64) -> io::Result<Vec<Extent>> {
        let to = match self.snap {
            Some(s) => DiffEnd::Snapshot(s),
            None => DiffEnd::Origin,
        };
        let (changed, covered) = self
            .changed_chunks(DiffEnd::Snapshot(from), to, offset, end)
            .await?;
        let clean = [Extent {
            len: covered - offset,
            flags: 0,
        }];
        Ok(overlay(&clean, offset, covered, &changed, STATE_DIRTY))
    }

    /// The byte ranges of the chunks in `[offset, end)` that `from` and `to` read
    /// differently, from a few diff pages, and how far they reach (`end`, or less when
    /// the pages ran out: always past `offset`).
    async fn changed_chunks(
        &self,
        from: DiffEnd,
        to: DiffEnd,
        offset: u64,
        end: u64,
    ) -> io::Result<(Vec<(u64, u64)>, u64)> {
        let chunk = self.volume.chunk_size();
        let first = offset / chunk;
        let stop = end.div_ceil(chunk);
        let mut start = first;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for page_no in 1.. {
            let page = self
                .volume
                .diff_page(from, to, start, DIFF_PAGE_RECORDS)
                .await?;
            for r in &page.ranges {
                let Some((a, b)) = clip(r, first, stop) else {
                    continue;
                };
                let (a, b) = ((a * chunk).max(offset), (b * chunk).min(end));
                match ranges.last_mut() {
                    Some(last) if last.1 == a => last.1 = b,
                    _ => ranges.push((a, b)),
                }
            }
            match page.next {
                Some(next) if next < stop && page_no < MAX_DIFF_PAGES => start = next,
                // `Volume::diff_page` checked that `next` moved past `start` >= `first`.
                Some(next) if next < stop => return Ok((ranges, (next * chunk).max(offset + 1))),
                _ => break,
            }
        }
        Ok((ranges, end))
    }
}

/// The chunks of `r` within `[first, stop)`, if any.
fn clip(r: &ChunkRange, first: u64, stop: u64) -> Option<(u64, u64)> {
    let chunks = r.chunks()?;
    let (a, b) = (chunks.start.max(first), chunks.end.min(stop));
    (a < b).then_some((a, b))
}

fn push_extent(out: &mut Vec<Extent>, len: u64, flags: u32) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.flags == flags => last.len += len,
        _ => out.push(Extent { len, flags }),
    }
}

/// `base` (consecutive from `offset`) cut to `[offset, end)`, with `flags` instead
/// wherever `ranges` (absolute, ascending, disjoint) lie.
fn overlay(
    base: &[Extent],
    offset: u64,
    end: u64,
    ranges: &[(u64, u64)],
    flags: u32,
) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut at = offset;
    let mut ri = 0;
    for e in base {
        let e_end = at.saturating_add(e.len).min(end);
        while at < e_end {
            while ranges.get(ri).is_some_and(|r| r.1 <= at) {
                ri += 1;
            }
            let (piece_end, f) = match ranges.get(ri) {
                Some(&(s, t)) if s <= at => (t.min(e_end), flags),
                Some(&(s, _)) => (s.min(e_end), e.flags),
                None => (e_end, e.flags),
            };
            push_extent(&mut out, piece_end - at, f);
            at = piece_end;
        }
        if at >= end {
            break;
        }
    }
    out
}

/// `base:allocation` extents from `offset` with every boundary on a multiple of
/// `minimum` (or at the export's end, `size`), as the protocol asks for descriptors. A
/// block that straddles a boundary gets only the flags all its parts have (a block is
/// ZERO only if all of it reads as zeroes); a tail shorter than a block whose rest is
/// unknown is dropped, or reported as plain data if nothing else is left.
fn align_allocation(extents: &[Extent], offset: u64, minimum: u64, size: u64) -> Vec<Extent> {
    let mut spans: Vec<(u64, u64, u32)> = Vec::with_capacity(extents.len());
    let mut at = offset;
    for e in extents.iter().filter(|e| e.len > 0) {
        spans.push((at, at + e.len, e.flags));
        at += e.len;
    }
    let total = at;
    let minimum = minimum.max(1);
    let end = if total == size || total.is_multiple_of(minimum) {
        total
    } else {
        total / minimum * minimum
    };
    if end <= offset {
        return vec![Extent {
            len: minimum.min(size.saturating_sub(offset)).max(1),
            flags: 0,
        }];
    }
    let mut out = Vec::new();
    let mut cur = offset;
    let mut i = 0;
    while cur < end {
        while spans[i].1 <= cur {
            i += 1;
        }
        let (_, e, f) = spans[i];
        let aligned = if e >= end { end } else { e / minimum * minimum };
        if aligned > cur {
            push_extent(&mut out, aligned - cur, f);
            cur = aligned;
            continue;
        }
        let block_end = (cur + minimum).min(end);
        let mut flags = f;
        let mut j = i;
        while spans[j].1 < block_end {
            j += 1;
            flags &= spans[j].2;
        }
        push_extent(&mut out, block_end - cur, flags);
        cur = block_end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(len: u64, flags: u32) -> Extent {
        Extent { len, flags }
    }

    const HZ: u32 = STATE_HOLE | STATE_ZERO;

    #[test]
    fn overlay_replaces_flags_inside_the_ranges_only() {
        let base = [e(100, HZ), e(100, 0), e(100, HZ)];
        assert_eq!(
            overlay(&base, 1000, 1300, &[(1050, 1060), (1250, 1400)], 0),
            vec![
                e(50, HZ),
                e(10, 0),
                e(40, HZ),
                e(100, 0),
                e(50, HZ),
                e(50, 0)
            ]
        );
        assert_eq!(
            overlay(&base, 1000, 1150, &[], 7),
            vec![e(100, HZ), e(50, 0)],
            "cut at the end"
        );
        assert_eq!(
            overlay(&[e(4096 * 4, 0)], 0, 4096 * 4, &[(4096, 8192)], STATE_DIRTY),
            vec![e(4096, 0), e(4096, STATE_DIRTY), e(8192, 0)]
        );
    }

    #[test]
    fn alignment_never_claims_zero_for_a_block_with_data() {
        // Hole 0..5000, data 5000..6000, hole 6000..16384, in 4 KiB blocks.
        let ext = [e(5000, HZ), e(1000, 0), e(10384, HZ)];
        assert_eq!(
            align_allocation(&ext, 0, 4096, 1 << 20),
            vec![e(4096, HZ), e(4096, 0), e(8192, HZ)]
        );
        // Byte granularity keeps everything.
        assert_eq!(align_allocation(&ext, 0, 1, 1 << 20), ext.to_vec());
        // An unaligned tail is dropped; at the export's end it stays.
        assert_eq!(
            align_allocation(&[e(4096, HZ), e(100, 0)], 0, 4096, 1 << 20),
            vec![e(4096, HZ)]
        );
        assert_eq!(
            align_allocation(&[e(4096, HZ), e(100, HZ)], 0, 4096, 4196),
            vec![e(4196, HZ)]
        );
        // Less than a block known: one plain-data block.
        assert_eq!(
            align_allocation(&[e(100, HZ)], 8192, 4096, 1 << 20),
            vec![e(4096, 0)]
        );
    }

    #[test]
    fn aligned_extents_cover_from_the_offset_with_aligned_boundaries() {
        let seed = csnap_proto::testing::seed(
            "aligned_extents_cover_from_the_offset_with_aligned_boundaries",
            "CSNAP_TEST_SEED",
        );
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        for _ in 0..500 {
            let minimum = [1u64, 512, 4096][rand::Rng::gen_range(&mut rng, 0..3)];
            let offset = rand::Rng::gen_range(&mut rng, 0..64u64) * minimum;
            let n = rand::Rng::gen_range(&mut rng, 1..12);
            let ext: Vec<Extent> = (0..n)
                .map(|_| {
                    e(
                        rand::Rng::gen_range(&mut rng, 1..20_000),
                        [0, HZ, STATE_HOLE][rand::Rng::gen_range(&mut rng, 0..3)],
                    )
                })
                .collect();
            let total: u64 = ext.iter().map(|x| x.len).sum();
            let size = offset + total + rand::Rng::gen_range(&mut rng, 0..2u64) * 10_000;
            let out = align_allocation(&ext, offset, minimum, size);
            assert!(!out.is_empty(), "seed {seed}");
            let mut at = offset;
            for x in &out {
                assert!(x.len > 0, "seed {seed}");
                // ZERO only where every input byte is ZERO.
                if x.flags & STATE_ZERO != 0 {
                    let mut a = offset;
                    for y in &ext {
                        let (s, t) = (a, a + y.len);
                        if s < at + x.len && at < t {
                            assert!(y.flags & STATE_ZERO != 0, "seed {seed}: {ext:?} -> {out:?}");
                        }
                        a = t;
                    }
                }
                at += x.len;
                assert!(
                    at == size || at.is_multiple_of(minimum),
                    "seed {seed}: {out:?}"
                );
            }
        }
    }
}
