//! csnap wire types and framing: one versioned place for the client <-> server protocol.

pub mod types;

pub use types::{
    validate_snapshot_name, ChunkRange, SnapId, SnapshotInfo, SnapshotState, MAX_SNAPSHOT_NAME,
};
