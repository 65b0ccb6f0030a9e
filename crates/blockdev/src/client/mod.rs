//! The csnap client: moves data itself, straight to and from the shared origin and store
//! devices, and asks the metadata server only small questions.
//!
//! * [`Volume`]: one volume as seen from one node: origin reads/writes (with the
//!   unique-chunk cache), snapshot reads (the four-message protocol) and writes, FLUSH, and
//!   snapshot administration.
//! * [`MetaConnection`]: one metadata session that survives server loss (reconnect,
//!   re-assert locks, resend, `ResendDone`), over the sans-IO [`Session`]; it follows a
//!   [`ServerTarget`] (a fixed address, or a watch the cluster agent moves on failover).
//! * [`OriginTracker`]: the unique-chunk cache and the write epochs behind `NewSnapshotAck`.
//!
//! The client never depends on the server crate: it runs on nodes without one.

pub(crate) mod aligned;
mod cache;
mod conn;
pub(crate) mod devices;
pub mod session;
mod uring;
mod volume;

pub use aligned::DIRECT_ALIGN;
pub use cache::{CacheStats, OriginTracker, ReadGuard, ReadRoute, WriteGuard};
pub use conn::{ConnConfig, MetaConnection, Reply, ServerTarget, SessionInfo};
pub use devices::{DataDevice, Devices, Which};
pub use session::Session;
pub use volume::{
    client_id_for, snapshot_read_runs, ClientConfig, SnapshotPage, Volume, MAX_QUESTION_CHUNKS,
};

use std::io;
use std::time::Duration;

use csnap_proto::ErrorCode;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
pub enum ClientError {
    #[error("the server answered {code}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("the server refused this client: {0}")]
    Refused(String),
    #[error("no session with the csnap server within {waited:?} (is it running?)")]
    Unreachable { waited: Duration },
    #[error("the metadata connection was shut down")]
    Closed,
    #[error("unexpected answer from the server to {request}: {answer}")]
    Unexpected {
        request: &'static str,
        answer: String,
    },
    #[error("{op} {device} at byte {offset}: {source}")]
    Io {
        op: &'static str,
        device: String,
        offset: u64,
        source: io::Error,
    },
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{0}")]
    Geometry(String),
    /// The operation cannot be done the cheap way the caller asked for (FAST_ZERO);
    /// nothing was changed.
    #[error("{0}")]
    Unsupported(String),
}

impl ClientError {
    /// The errno an NBD user sees.
    fn errno(&self) -> i32 {
        match self {
            ClientError::Server { code, .. } => match code {
                ErrorCode::StoreFull => libc::ENOSPC,
                ErrorCode::OutOfRange | ErrorCode::BadRequest | ErrorCode::TooLarge => libc::EINVAL,
                ErrorCode::AuthFailed | ErrorCode::NotAuthenticated => libc::EACCES,
                _ => libc::EIO,
            },
            ClientError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ClientError::Closed => libc::ESHUTDOWN,
            ClientError::Unsupported(_) => libc::EOPNOTSUPP,
            _ => libc::EIO,
        }
    }
}

impl From<ClientError> for io::Error {
    fn from(e: ClientError) -> io::Error {
        let errno = e.errno();
        if let ClientError::Unsupported(_) = e {
            // An expected answer (clients probe FAST_ZERO), not a failure.
            tracing::debug!(err = %e, "csnap client: not supported");
        } else {
            tracing::warn!(err = %e, "csnap client I/O failed");
        }
        // The NBD server maps a raw errno; the message went to the log above.
        if errno == libc::EIO {
            io::Error::other(e)
        } else {
            io::Error::from_raw_os_error(errno)
        }
    }
}
