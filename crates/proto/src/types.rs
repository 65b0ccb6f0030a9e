//! Plain value types shared by the wire protocol, the request engine and the store.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A snapshot's identity: its creation sequence number (store-wide counter, never reused).
/// Snapshots created later have larger ids, which is what lets one exception name a
/// contiguous run of snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SnapId(pub u64);

impl SnapId {
    /// The first id a store gives (0 is never a snapshot).
    pub const FIRST: SnapId = SnapId(1);

    /// The id after this one, saturating at the largest: the end of a run of ids, plus one.
    pub fn next(self) -> SnapId {
        SnapId(self.0.saturating_add(1))
    }

    /// The id before this one, saturating at 0.
    pub fn prev(self) -> SnapId {
        SnapId(self.0.saturating_sub(1))
    }
}

impl fmt::Display for SnapId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Delegate so width and alignment (`{:>6}`) apply, as tables need.
        fmt::Display::fmt(&self.0, f)
    }
}

/// Lifecycle state of a snapshot as recorded in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotState {
    /// Readable and writable; origin copy-outs preserve its view.
    Live,
    /// Sacrificed by the store-full policy (or another fault); its contents are gone.
    /// Still listed so the administrator sees what happened and why.
    Invalid {
        /// Why it was invalidated.
        reason: String,
    },
    /// Deleted; no longer listed, its space is being reclaimed in the background.
    Deleting,
}

/// What `list`/`status` report about one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The snapshot's id (never reused).
    pub id: SnapId,
    /// Its name.
    pub name: String,
    /// Creation time, unix seconds.
    pub ctime: u64,
    /// Live, invalid or being deleted.
    pub state: SnapshotState,
    /// Store chunks this snapshot reads from (its exceptions, shared or not).
    pub chunks_held: u64,
}

/// One end of a diff: the live origin or a snapshot. Diffs come from the exception
/// records alone (no data is read), so they name the chunks written between the two ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DiffEnd {
    /// The live origin as it is now.
    Origin,
    /// A live snapshot.
    Snapshot(SnapId),
}

impl std::fmt::Display for DiffEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiffEnd::Origin => f.write_str("the origin"),
            DiffEnd::Snapshot(id) => write!(f, "snapshot {}", id.0),
        }
    }
}

/// One page of a diff between two ends: the chunks they read differently, from a start
/// chunk on. A caller pages with `next` until it is `None`, so a diff of a large volume is
/// never held whole.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffPage {
    /// The chunks the two ends read differently: ascending, disjoint, coalesced within the
    /// page (a run that crosses a page boundary comes as two ranges).
    pub ranges: Vec<ChunkRange>,
    /// The chunk the next page starts at; `None` when this page reached the end.
    pub next: Option<u64>,
    /// Exception records read for this page (the metadata work it cost).
    pub records_walked: u64,
}

/// A run of origin chunks `[start, start + count)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRange {
    /// The first chunk.
    pub start: u64,
    /// How many chunks.
    pub count: u32,
}

impl ChunkRange {
    /// The `count` chunks from `start`.
    pub fn new(start: u64, count: u32) -> Self {
        ChunkRange { start, count }
    }

    /// The chunks of the range; `None` if the range wraps past `u64::MAX`.
    pub fn chunks(&self) -> Option<std::ops::Range<u64>> {
        let end = self.start.checked_add(u64::from(self.count))?;
        Some(self.start..end)
    }

    /// Runs of consecutive chunks as ranges, taking the chunks in the order given: a chunk
    /// extends the last range if it is that range's next chunk (and the range holds fewer
    /// than `u32::MAX` chunks), else it starts a new range.
    ///
    /// Ascending distinct chunks give sorted, disjoint, maximal ranges covering exactly
    /// those chunks. A repeated chunk starts a new range, so the ranges still name every
    /// chunk as often as the input did (lock and lease counts rely on that). The one
    /// coalescer of the workspace: the engine's grants, the client's releases and the
    /// store's diff pages use it (the last one chunk at a time, through
    /// [`ChunkRange::push_chunk`]).
    pub fn coalesce(chunks: impl IntoIterator<Item = u64>) -> Vec<ChunkRange> {
        let mut out: Vec<ChunkRange> = Vec::new();
        for c in chunks {
            ChunkRange::push_chunk(&mut out, c);
        }
        out
    }

    /// One step of [`ChunkRange::coalesce`]: extends the last range of `ranges` with chunk
    /// `c` if `c` is that range's next chunk (and it holds fewer than `u32::MAX`), else
    /// appends a range of `c` alone. For callers that find their chunks one by one.
    pub fn push_chunk(ranges: &mut Vec<ChunkRange>, c: u64) {
        match ranges.last_mut() {
            Some(r) if r.count < u32::MAX && r.start.checked_add(u64::from(r.count)) == Some(c) => {
                r.count += 1
            }
            _ => ranges.push(ChunkRange::new(c, 1)),
        }
    }
}

/// Longest snapshot name, in bytes.
pub const MAX_SNAPSHOT_NAME: usize = 255;

/// Checks a snapshot (or volume) name. Names become NBD export names (`VOLUME@SNAPSHOT`),
/// appear in NBD URIs (`nbd+unix:///VOLUME@SNAPSHOT?socket=...`, percent-encoded), in paths
/// and in one-line-per-snapshot listings, so a name must be:
///
/// * 1..=255 bytes of UTF-8 (`&str` guarantees UTF-8);
/// * free of `@` and `/` (they separate volume and snapshot, and path components);
/// * free of control characters: C0 (below U+0020, which includes NUL, the one character an
///   NBD URI's export name cannot carry), DEL (U+007F) and C1 (U+0080..=U+009F);
/// * free of Unicode line and paragraph separators (U+2028, U+2029) and text-direction
///   controls (U+200E, U+200F, U+202A..=U+202E, U+2066..=U+2069), which break or disguise a
///   listing's row as a newline would.
///
/// Any other Unicode character is accepted: an NBD URI carries it percent-encoded as UTF-8
/// (docs/nbd.md, "Export names").
pub fn validate_snapshot_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("name is empty");
    }
    if name.len() > MAX_SNAPSHOT_NAME {
        return Err("name is longer than 255 bytes");
    }
    if name.contains(['@', '/']) {
        return Err("name contains '@' or '/'");
    }
    if name.chars().any(char::is_control) {
        return Err("name contains a control character (such as NUL, tab, newline or DEL)");
    }
    if name.chars().any(is_layout_control) {
        return Err("name contains a Unicode line separator or text-direction control");
    }
    Ok(())
}

/// Unicode characters outside the control category that still break or reorder a line of
/// text: line/paragraph separators and bidirectional formatting controls.
fn is_layout_control(c: char) -> bool {
    matches!(
        c,
        '\u{2028}'
            | '\u{2029}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
    )
}

/// The identity of one client connection, stable across reconnects (the agent's gather
/// reports it): the client's 64-bit `instance` (random per client process unless
/// configured; one per node and volume) and what the connection is for. A client's
/// connections differ in `kind`, clients differ in `instance`, so two connections share an
/// identity only if two clients share an instance id, which the server refuses (see
/// [`ErrorCode::DuplicateClient`]). Written `0x64/origin`, `0x64/admin`, `0x64/snap7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientId {
    /// The client process (random per process, drawn once).
    pub instance: u64,
    /// What this connection is for.
    pub kind: ClientKind,
}

impl ClientId {
    /// The connection of client `instance` for `kind`.
    pub const fn new(instance: u64, kind: ClientKind) -> ClientId {
        ClientId { instance, kind }
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}/", self.instance)?;
        match self.kind {
            ClientKind::Origin => f.write_str("origin"),
            ClientKind::Admin => f.write_str("admin"),
            ClientKind::Snapshot { snap } => write!(f, "snap{snap}"),
        }
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

impl std::str::FromStr for ClientId {
    type Err = String;

    /// `INSTANCE/origin`, `INSTANCE/admin` or `INSTANCE/snapN`; INSTANCE in decimal or
    /// `0x` hex, N in decimal.
    fn from_str(s: &str) -> Result<ClientId, String> {
        let bad = || {
            format!(
                "client id {s:?} is not INSTANCE/origin, INSTANCE/admin or INSTANCE/snapN (e.g. 0x1a2b/snap3)"
            )
        };
        let (instance, kind) = s.split_once('/').ok_or_else(bad)?;
        let instance = parse_u64(instance).ok_or_else(bad)?;
        let kind = match kind {
            "origin" => ClientKind::Origin,
            "admin" => ClientKind::Admin,
            other => {
                let snap = other
                    .strip_prefix("snap")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(bad)?;
                ClientKind::Snapshot { snap: SnapId(snap) }
            }
        };
        Ok(ClientId { instance, kind })
    }
}

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ClientKind {
    /// Writes (and reads) the origin; asks before writing shared chunks.
    Origin,
    /// Reads and writes snapshot `snap`.
    Snapshot {
        /// The snapshot.
        snap: SnapId,
    },
    /// Administration (agent / csnapctl): create, delete, list, status.
    Admin,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snap_id_neighbours_saturate_at_the_ends() {
        assert_eq!(SnapId(7).next(), SnapId(8));
        assert_eq!(SnapId(7).prev(), SnapId(6));
        assert_eq!(SnapId(u64::MAX).next(), SnapId(u64::MAX));
        assert_eq!(SnapId(0).prev(), SnapId(0));
        assert_eq!(SnapId::FIRST.prev(), SnapId(0));
    }

    #[test]
    fn plain_and_unicode_names_are_accepted() {
        for ok in [
            "daily-2026-11-22",
            "a b",
            "100%",
            "x?y#z",
            "before upgrade (v2)",
            "Grüße",
            "снимок",
            "快照",
            "emoji-\u{1F4F8}",
            "~tilde_and.dots",
        ] {
            assert_eq!(validate_snapshot_name(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(validate_snapshot_name(&"x".repeat(255)), Ok(()));
        // 255 bytes of two-byte letters (127 of them) plus one byte: still in the limit.
        assert_eq!(
            validate_snapshot_name(&format!("{}x", "é".repeat(127))),
            Ok(())
        );
    }

    #[test]
    fn empty_and_long_names_are_refused() {
        assert_eq!(validate_snapshot_name(""), Err("name is empty"));
        let long = Err("name is longer than 255 bytes");
        assert_eq!(validate_snapshot_name(&"x".repeat(256)), long);
        // The limit counts bytes, not characters.
        assert_eq!(validate_snapshot_name(&"é".repeat(128)), long);
    }

    #[test]
    fn separators_are_refused() {
        for bad in ["a/b", "a@b", "@", "/", "/abs", "vol@snap"] {
            assert_eq!(
                validate_snapshot_name(bad),
                Err("name contains '@' or '/'"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn control_characters_are_refused() {
        let refused = Err("name contains a control character (such as NUL, tab, newline or DEL)");
        // Every C0 control, DEL and every C1 control, at the start, middle and end.
        let controls = (0u32..0x20).chain([0x7f]).chain(0x80..=0x9f);
        for c in controls.filter_map(char::from_u32) {
            for name in [format!("{c}a"), format!("a{c}b"), format!("a{c}")] {
                assert_eq!(validate_snapshot_name(&name), refused, "{name:?}");
            }
        }
        assert_eq!(validate_snapshot_name("a\nb"), refused);
        assert_eq!(validate_snapshot_name("a\0b"), refused);
    }

    #[test]
    fn line_separators_and_direction_controls_are_refused() {
        let refused = Err("name contains a Unicode line separator or text-direction control");
        for c in [
            '\u{2028}', '\u{2029}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{202E}', '\u{2066}',
            '\u{2069}',
        ] {
            assert_eq!(validate_snapshot_name(&format!("a{c}b")), refused, "{c:?}");
        }
        // Their neighbours are ordinary characters.
        assert_eq!(validate_snapshot_name("a\u{2027}b"), Ok(()));
        assert_eq!(validate_snapshot_name("a\u{2030}b"), Ok(()));
    }

    #[test]
    fn chunks_coalesce_into_ranges() {
        assert_eq!(
            ChunkRange::coalesce([1, 2, 3, 7, 9, 10]),
            vec![
                ChunkRange::new(1, 3),
                ChunkRange::new(7, 1),
                ChunkRange::new(9, 2)
            ]
        );
        assert!(ChunkRange::coalesce([]).is_empty());
        // The last chunk of the address space ends a range without overflowing.
        assert_eq!(
            ChunkRange::coalesce([u64::MAX - 1, u64::MAX, 0]),
            vec![ChunkRange::new(u64::MAX - 1, 2), ChunkRange::new(0, 1)]
        );
        // A repeated chunk is named again; a descending step starts a new range.
        assert_eq!(
            ChunkRange::coalesce([4, 4, 5, 3]),
            vec![
                ChunkRange::new(4, 1),
                ChunkRange::new(4, 2),
                ChunkRange::new(3, 1)
            ]
        );
    }

    /// Random chunk lists (seeded: `CSNAP_SEED` replays, the seed is printed). For any
    /// input the ranges, expanded, give back the input exactly; for ascending distinct
    /// input they are sorted, disjoint and maximal.
    #[test]
    fn coalesce_covers_exactly_the_input_chunks() {
        use rand::{Rng, SeedableRng};
        let seed = crate::testing::seed("coalesce_covers_exactly_the_input_chunks", "CSNAP_SEED");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for case in 0..2000 {
            let len = rng.gen_range(0..64);
            // Small bases make runs and repeats likely; some cases sit at the top of u64.
            let base = if rng.gen_bool(0.1) {
                u64::MAX - 80
            } else {
                rng.gen_range(0..1000)
            };
            let mut chunks: Vec<u64> = (0..len).map(|_| base + rng.gen_range(0..80)).collect();
            let sorted = rng.gen_bool(0.7);
            if sorted {
                chunks.sort_unstable();
                chunks.dedup();
            }
            let ranges = ChunkRange::coalesce(chunks.iter().copied());
            let why = format!("seed={seed:#x} case {case}: {chunks:?} -> {ranges:?}");
            let expanded: Vec<u64> = ranges
                .iter()
                .flat_map(|r| r.chunks().expect("a coalesced range never wraps"))
                .collect();
            assert_eq!(expanded, chunks, "{why}");
            assert!(ranges.iter().all(|r| r.count >= 1), "{why}");
            if sorted {
                for w in ranges.windows(2) {
                    let end = w[0].start + u64::from(w[0].count);
                    // Sorted and disjoint, and maximal: a gap separates neighbours.
                    assert!(end < w[1].start, "{why}");
                }
            }
        }
    }

    #[test]
    fn chunk_range_overflow_is_detected() {
        assert_eq!(ChunkRange::new(10, 3).chunks(), Some(10..13));
        assert_eq!(ChunkRange::new(u64::MAX, 2).chunks(), None);
    }
}
