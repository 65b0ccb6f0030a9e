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
    /// Cluster mode: what this node's agent knows of the volume's group.
    #[serde(default)]
    pub cluster: Option<ClusterStatus>,
}

/// One volume's membership as one node's agent sees it (`csnapctl status`), like
/// `dlm_tool status` shows a lockspace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node's corosync node id.
    pub node: u32,
    /// This agent's group member (`node/pid`).
    pub member: String,
    /// This node's role for the volume: Idle, Starting, Serving, Stopping.
    pub role: String,
    /// The volume generation this node knows (one more per server activation).
    pub generation: u64,
    pub ring: Option<String>,
    pub members: Vec<String>,
    pub quorate: bool,
    /// The node running the volume's server, and where clients reach it.
    pub server_node: Option<u32>,
    pub server_address: Option<String>,
    /// What the agent waits on before the volume is served (or `Serving`).
    pub gate: String,
    /// Nodes found stale after a merge (fenced or reset before they serve again).
    pub stale: Vec<u32>,
    /// Nodes whose server departed and is not known to be stopped yet.
    pub departed_servers: Vec<u32>,
    pub fencing: Vec<FenceJob>,
    /// How long this node's serving lease still runs (0 unless it serves).
    pub lease_left_ms: u64,
    /// The last failover this node activated: (generation, ms from chosen to activated).
    pub last_failover: Option<(u64, u64)>,
    /// The local server, when this node runs one.
    pub local_server: Option<String>,
}

/// A fencing operation in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceJob {
    pub node: u32,
    pub method: String,
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
