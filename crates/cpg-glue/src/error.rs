//! Errors of the group layer. Every failure that comes from corosync is mapped to a
//! variant that names what was being done, so "corosync is not running" reads as such.

use thiserror::Error;

/// Why a group or quorum operation failed.
#[derive(Debug, Error)]
// Each variant says what it is; its `#[error]` message shows what its fields hold.
#[allow(missing_docs)]
pub enum GroupError {
    /// Could not connect to corosync's IPC at all: it is not running on this node (or this
    /// process is in another network namespace than the corosync it wants).
    #[error("cannot connect to corosync {service}: is corosync running on this node? ({detail})")]
    NotRunning {
        service: &'static str,
        detail: String,
    },

    /// A corosync call failed.
    #[error("corosync {call} failed: {detail}")]
    Corosync { call: &'static str, detail: String },

    /// Corosync kept answering "try again" (or flow control stayed on) past the bound.
    #[error("corosync {call} still busy after {waited_ms} ms (flow control / CS_ERR_TRY_AGAIN)")]
    Busy { call: &'static str, waited_ms: u64 },

    /// The payload exceeds what the group can carry.
    #[error("message of {size} bytes exceeds the maximum of {max} bytes")]
    MessageTooLarge { size: usize, max: usize },

    /// The connection to the group is gone (corosync exited, the node was killed, or the
    /// group was left); no more events will come.
    #[error("group {group}: connection lost: {detail}")]
    Disconnected { group: String, detail: String },

    /// A multicast message was cut by a membership change between its frames; no member
    /// delivered it (see [`crate::Receipt`]).
    #[error("group {group}: message not delivered: {detail}")]
    Interrupted { group: String, detail: String },

    /// A typed message could not be encoded or decoded.
    #[error("cannot {op} typed message: {detail}")]
    Codec { op: &'static str, detail: String },

    /// Bad argument (group name too long, unknown node, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
}
