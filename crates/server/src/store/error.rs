//! Errors of the on-disk store. Every variant names what was wrong and where, so an
//! operator (or `csnapctl`) can act on the message alone.

use crate::engine::Refusal;
use std::io;

/// Anything that can go wrong opening, formatting or using a store.
#[derive(Debug, thiserror::Error)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
pub enum StoreError {
    #[error("I/O error {op} {device} at byte {offset}: {source}")]
    Io {
        op: &'static str,
        device: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{device} is too small for a store: {size} bytes, it must be at least {needed} bytes ({why})")]
    TooSmall {
        device: String,
        size: u64,
        needed: u64,
        why: &'static str,
    },
    #[error("bad chunk size {0}: it must be a power of two from 4 KiB (4096) to 1 MiB (1048576)")]
    BadChunkSize(u64),
    #[error("bad origin size {size}: {why}")]
    BadOriginSize { size: u64, why: &'static str },
    #[error("not a csnap store: wrong magic {found:02x?} in superblock slot {slot}")]
    WrongMagic { slot: u8, found: [u8; 8] },
    #[error("unsupported store format version {found} in superblock slot {slot} (this build reads version {supported})")]
    UnsupportedVersion {
        slot: u8,
        found: u32,
        supported: u32,
    },
    #[error("corrupt superblock slot {slot}: {what}")]
    CorruptSuperblock { slot: u8, what: String },
    #[error("corrupt metadata block {block} ({area}): {what}")]
    CorruptMetadata {
        block: u64,
        area: &'static str,
        what: String,
    },
    #[error("the origin and the store are the same device ({0})")]
    SameDevice(String),
    #[error("store already formatted (uuid {uuid}); use --force to overwrite it")]
    AlreadyFormatted { uuid: String },
    #[error("the store was served at cluster generation {store}, later than generation {activating} being activated: another lineage served it after this node's view; refusing to serve stale state")]
    ClusterGenerationAhead { store: u64, activating: u64 },
    /// The operation was refused before it changed anything (the engine answers these).
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("the store is unusable after an earlier failure ({0}); reopen it to recover from the journal")]
    Poisoned(String),
}

/// The store's results.
/// The store's results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
