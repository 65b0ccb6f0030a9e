//! Plain value types shared by the wire protocol, the request engine and the store.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A snapshot's identity: its creation sequence number (store-wide counter, never reused).
/// Snapshots created later have larger ids, which is what lets one exception name a
/// contiguous run of snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SnapId(pub u64);

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
    Invalid { reason: String },
    /// Deleted; no longer listed, its space is being reclaimed in the background.
    Deleting,
}

/// What `list`/`status` report about one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: SnapId,
    pub name: String,
    /// Creation time, unix seconds.
    pub ctime: u64,
    pub state: SnapshotState,
    /// Store chunks this snapshot reads from (its exceptions, shared or not).
    pub chunks_held: u64,
}

/// A run of origin chunks `[start, start + count)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRange {
    pub start: u64,
    pub count: u32,
}

impl ChunkRange {
    pub fn new(start: u64, count: u32) -> Self {
        ChunkRange { start, count }
    }

    /// The chunks of the range; `None` if the range wraps past `u64::MAX`.
    pub fn chunks(&self) -> Option<std::ops::Range<u64>> {
        let end = self.start.checked_add(u64::from(self.count))?;
        Some(self.start..end)
    }
}

/// Longest snapshot name, in bytes.
pub const MAX_SNAPSHOT_NAME: usize = 255;

/// Checks a snapshot name: UTF-8 (guaranteed by `&str`), 1..=255 bytes, no '@', '/' or NUL
/// (names appear in export names and paths).
pub fn validate_snapshot_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("name is empty");
    }
    if name.len() > MAX_SNAPSHOT_NAME {
        return Err("name is longer than 255 bytes");
    }
    if name.contains(['@', '/', '\0']) {
        return Err("name contains '@', '/' or NUL");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_are_checked() {
        assert!(validate_snapshot_name("daily-2026-11-22").is_ok());
        assert!(validate_snapshot_name("").is_err());
        assert!(validate_snapshot_name("a/b").is_err());
        assert!(validate_snapshot_name("a@b").is_err());
        assert!(validate_snapshot_name("a\0b").is_err());
        assert!(validate_snapshot_name(&"x".repeat(255)).is_ok());
        assert!(validate_snapshot_name(&"x".repeat(256)).is_err());
    }

    #[test]
    fn chunk_range_overflow_is_detected() {
        assert_eq!(ChunkRange::new(10, 3).chunks(), Some(10..13));
        assert_eq!(ChunkRange::new(u64::MAX, 2).chunks(), None);
    }
}
