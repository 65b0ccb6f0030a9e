//! Errors of the test harness. Each names the command, node or wait that failed, so a red
//! test says what broke without digging through logs.

use std::time::Duration;

use cpg_glue::NodeId;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum HarnessError {
    /// Something the harness needs is missing (root, corosync, iproute2, ...).
    #[error("prerequisite missing: {0}")]
    Prerequisite(String),

    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    /// A command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    CommandTimeout { command: String, timeout: Duration },

    /// A local I/O operation (file, spawn, namespace fd) failed.
    #[error("cannot {action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },

    /// A bounded wait ran out.
    #[error("timed out after {waited:?} waiting for {what}; last seen: {last}")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },

    /// A node id that is not part of this cluster.
    #[error("node {0} is not part of this cluster")]
    UnknownNode(NodeId),

    /// A node is not in the state the operation needs (e.g. not running).
    #[error("node {node}: {detail}")]
    NodeState { node: NodeId, detail: String },

    /// A bad harness argument: cluster size, csnap section key/value, partition sides.
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

impl HarnessError {
    pub(crate) fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            action: action.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        HarnessError::Invalid {
            what,
            detail: detail.into(),
        }
    }
}
