//! The local control socket between `csnapctl` and `csnap-agent`: one request, one
//! response per connection, in the same versioned frames as the client protocol.

use crate::msg::ServerStatus;
use crate::types::{SnapId, SnapshotInfo};
use serde::{Deserialize, Serialize};

/// Where `csnapctl` looks for the agent unless told otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/csnap/csnap.sock";

/// csnapctl -> agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    SnapshotCreate {
        volume: String,
        name: String,
    },
    /// One page of the volume's snapshots (see `ClientMsg::ListSnapshots`): those with id
    /// above `after`, at most `limit`. csnapctl asks again until `more` is false.
    SnapshotList {
        volume: String,
        after: Option<SnapId>,
        limit: u32,
    },
    SnapshotDelete {
        volume: String,
        name: String,
    },
    /// Status of one volume, or of every volume the agent serves.
    Status {
        volume: Option<String>,
    },
}

/// What the agent knows about one of its volumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub volume: String,
    /// "standalone" (server and exports in this process) or "client" (exports only).
    pub mode: String,
    pub origin: String,
    pub store: String,
    /// Where the NBD exports listen.
    pub nbd_listen: String,
    /// Where the metadata server listens.
    pub server: String,
    /// The server's own report.
    pub server_status: ServerStatus,
    /// Sessions the origin connection established (reconnects + 1).
    pub origin_sessions: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cached_chunks: u64,
}

/// agent -> csnapctl.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    SnapshotCreated {
        volume: String,
        info: SnapshotInfo,
    },
    SnapshotList {
        volume: String,
        snapshots: Vec<SnapshotInfo>,
        more: bool,
        /// False while the server still counts usage after start (`chunks_held` partial).
        usage_exact: bool,
    },
    SnapshotDeleted {
        volume: String,
        name: String,
        id: SnapId,
    },
    Status {
        volumes: Vec<VolumeStatus>,
    },
    /// The request failed; the message says what was wrong.
    Error {
        message: String,
    },
}
