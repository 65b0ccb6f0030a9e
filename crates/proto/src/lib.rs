//! csnap wire types and framing: one versioned place for the client <-> server protocol.
//!
//! * [`frame`]: length-prefixed, versioned MessagePack frames; [`decode_frame`] never panics.
//!   With feature `codec`, `codec::FrameCodec` wraps it for tokio-util's framed streams.
//! * [`msg`]: the messages ([`ClientFrame`], [`ServerFrame`]).
//! * [`addr`]: [`ListenAddr`], where a server listens and a client dials (`HOST:PORT` or
//!   `unix:PATH`). With feature `net`, `net` binds, accepts and dials it, one path for
//!   every csnap server and client.
//! * [`auth`]: mutual HMAC-SHA256 challenge/response with the cluster key, and the
//!   per-connection keys that authenticate every later frame.
//! * [`control`]: the local control socket between `csnapctl` and the agent.
//! * [`diff_stream`]: the versioned, checksummed stream of changed extents that
//!   `csnapctl export-diff` writes and `import-diff` reads.
//! * [`types`]: snapshot ids, infos, chunk ranges, shared with the server's store.
//! * `testing` (feature `testing`): the one seed parser and printer of randomised tests.
//!
//! docs/wire-protocol.md describes the protocol and its flows.

pub mod addr;
pub mod auth;
#[cfg(feature = "codec")]
pub mod codec;
pub mod control;
pub mod diff_stream;
pub mod frame;
pub mod msg;
#[cfg(feature = "net")]
pub mod net;
#[cfg(feature = "testing")]
pub mod testing;
pub mod types;

pub use addr::{AddrError, ListenAddr};
#[cfg(feature = "codec")]
pub use codec::FrameCodec;
pub use frame::{
    decode_complete_frame, decode_frame, decode_frame_with, encode_frame, encode_frame_with,
    frame_bytes, Decoded, FrameError, FrameOpener, FrameSealer, MAX_FRAME, PROTOCOL_VERSION,
    TAG_LEN,
};
pub use msg::{
    create_token, encoded_size_bound, page_len, ClientFrame, ClientId, ClientKind, ClientMsg,
    ErrorCode, HeldLock, ReclaimStatus, RequestId, RollbackStatus, ServerFrame, ServerMsg,
    ServerStatus, SnapRef, SpaceWarning, StoreAddr, StoreArea, CREATE_TOKEN_BITS, LIST_PAGE_BYTES,
    MAX_DIFF_RECORDS, MAX_LIST_PAGE,
};
pub use types::{
    validate_snapshot_name, ChunkRange, DiffEnd, DiffPage, SnapId, SnapshotInfo, SnapshotState,
    MAX_SNAPSHOT_NAME,
};
