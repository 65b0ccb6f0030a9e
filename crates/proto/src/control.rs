//! The local control socket between `csnapctl` and `csnap-agent`: one request, one
//! response per connection, in the same versioned frames as the client protocol.

use crate::msg::{ServerStatus, SnapRef};
use crate::types::{DiffEnd, DiffPage, SnapId, SnapshotInfo};
use serde::{Deserialize, Serialize};

/// Where `csnapctl` looks for the agent unless told otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/csnap/csnap.sock";

/// Most bytes one `ReadSnapshot` answer or `WriteOrigin` request carries: half the frame
/// limit ([`crate::MAX_FRAME`]), so the data and the message around it always fit a frame.
pub const MAX_CONTROL_DATA: u32 = 512 * 1024;

/// Most bytes one `ZeroOrigin` request zeroes (the agent zeroes whole chunks with one
/// grant per bounded piece, all at once; this bounds the work one request starts).
pub const MAX_CONTROL_ZERO: u64 = 256 << 20;

/// Most extents one `ReadSnapshotExtents` request names (their bytes together are at most
/// [`MAX_CONTROL_DATA`]): enough that a change scattered chunk by chunk fills a request.
pub const MAX_CONTROL_EXTENTS: usize = 64;

/// One extent of a `ReadSnapshotExtents` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadExtent {
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub len: u32,
}

/// csnapctl -> agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Create a snapshot of the volume's origin as it is now. Answered with `SnapshotCreated`.
    SnapshotCreate {
        /// The volume.
        volume: String,
        /// The new snapshot's name.
        name: String,
    },
    /// One page of the volume's snapshots (see `ClientMsg::ListSnapshots`): those with id
    /// above `after`, at most `limit`. csnapctl asks again until `more` is false.
    SnapshotList {
        /// The volume.
        volume: String,
        /// List snapshots with ids above this one.
        after: Option<SnapId>,
        /// At most this many.
        limit: u32,
    },
    /// Delete a snapshot by name. Answered with `SnapshotDeleted`.
    SnapshotDelete {
        /// The volume.
        volume: String,
        /// The snapshot's name.
        name: String,
    },
    /// One page of the diff between two ends of the volume (see `ClientMsg::Diff`): a
    /// snapshot by name or id, or the live origin (`None`). csnapctl names the ends on the
    /// first page and passes the ids the answer resolved on the next ones, so a snapshot
    /// deleted and re-created under the same name mid-diff is not silently compared.
    Diff {
        /// The volume.
        volume: String,
        /// The older end (`None`: the origin).
        from: Option<SnapRef>,
        /// The newer end (`None`: the origin).
        to: Option<SnapRef>,
        /// The first chunk of the page.
        start: u64,
        /// About how many exception records the page may walk.
        budget: u32,
    },
    /// Status of one volume, or of every volume the agent serves.
    Status {
        /// The volume (`None`: every volume).
        volume: Option<String>,
    },
    /// Rolls the origin back to snapshot `snapshot` (by name), online; the origin as it is
    /// now is kept as snapshot `pin_name`. Answered with `RollbackStarted` once the start is
    /// durable (see `ClientMsg::Rollback`).
    Rollback {
        /// The volume to roll back.
        volume: String,
        /// The snapshot whose contents the origin takes.
        snapshot: String,
        /// The name of the snapshot that keeps the origin as it is now (to undo).
        pin_name: String,
    },
    /// The volume's size and chunk size (`export-diff` and `import-diff` check them).
    Geometry {
        /// The volume.
        volume: String,
    },
    /// `len` bytes (at most [`MAX_CONTROL_DATA`]) of snapshot `snap` at `offset`, read
    /// through the agent's client of the volume (`export-diff`). Answered with `Data`.
    ReadSnapshot {
        /// The volume.
        volume: String,
        /// The snapshot.
        snap: SnapId,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Several extents of snapshot `snap` at once (at most [`MAX_CONTROL_EXTENTS`], their
    /// lengths adding up to at most [`MAX_CONTROL_DATA`]; any offsets, in any order), read
    /// under one metadata question and one release (`export-diff` of a scattered change).
    /// Answered with one `Data` whose bytes are the extents' concatenated in request order.
    /// An agent older than this request refuses it as malformed and closes the connection.
    ReadSnapshotExtents {
        /// The volume.
        volume: String,
        /// The snapshot.
        snap: SnapId,
        /// The extents, each non-empty and inside the volume.
        extents: Vec<ReadExtent>,
    },
    /// Writes `data` (at most [`MAX_CONTROL_DATA`] bytes) to the origin at `offset`,
    /// under the server's write grant like any origin write, so every existing snapshot
    /// keeps its contents (`import-diff`). Answered with `Done`.
    WriteOrigin {
        /// The volume.
        volume: String,
        /// Byte offset.
        offset: u64,
        /// The bytes to write.
        #[serde(with = "bin")]
        data: Vec<u8>,
    },
    /// Makes `len` bytes (at most [`MAX_CONTROL_ZERO`]) of the origin at `offset` read as
    /// zeroes, under the same grants (`import-diff`). Answered with `Done`.
    ZeroOrigin {
        /// The volume.
        volume: String,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Makes every completed origin write of this agent durable. Answered with `Done`.
    Flush {
        /// The volume.
        volume: String,
    },
}

/// `Vec<u8>` as a msgpack byte string (bin), not an array of integers (up to twice the
/// size on the wire).
mod bin {
    use serde::{de, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(data)
    }

    struct Visitor;

    impl<'de> de::Visitor<'de> for Visitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Visitor)
    }
}

/// What the agent knows about one of its volumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// The volume's name.
    pub volume: String,
    /// "standalone" (server and exports in this process) or "client" (exports only).
    pub mode: String,
    /// The origin device.
    pub origin: String,
    /// The snapshot store device.
    pub store: String,
    /// Where the NBD exports listen.
    pub nbd_listen: String,
    /// Where the metadata server listens.
    pub server: String,
    /// The server's own report.
    pub server_status: ServerStatus,
    /// Sessions the origin connection established (reconnects + 1).
    pub origin_sessions: u64,
    /// Origin writes answered from the unique-chunk cache.
    pub cache_hits: u64,
    /// Origin writes that asked the server.
    pub cache_misses: u64,
    /// Origin chunks the cache holds as unique.
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
    /// The ring of the agreed view.
    pub ring: Option<String>,
    /// The members of the agreed view (`node/pid`).
    pub members: Vec<String>,
    /// Whether the partition is quorate.
    pub quorate: bool,
    /// The node running the volume's server, and where clients reach it.
    pub server_node: Option<u32>,
    /// Where clients reach the server (`HOST:PORT` or `unix:PATH`).
    pub server_address: Option<String>,
    /// What the agent waits on before the volume is served (or `Serving`).
    pub gate: String,
    /// Nodes found stale after a merge (fenced or reset before they serve again).
    pub stale: Vec<u32>,
    /// Nodes whose server departed and is not known to be stopped yet.
    pub departed_servers: Vec<u32>,
    /// Fencing operations in progress.
    pub fencing: Vec<FenceJob>,
    /// How long this node's serving lease still runs (0 unless it serves).
    pub lease_left_ms: u64,
    /// The last server activation this node made (a failover, or the first start), with
    /// its timing split. Named `failover` rather than `last_failover` (which was a
    /// `(generation, ms)` tuple before): an older csnapctl ignores the unknown field and an
    /// older agent's tuple is ignored here, so both directions still decode.
    #[serde(default)]
    pub failover: Option<FailoverTiming>,
    /// The local server, when this node runs one.
    pub local_server: Option<String>,
    /// Snapshot clients attached on each node of the view, as the members' latest states
    /// report them (added later: absent from an older agent's status).
    #[serde(default)]
    pub clients: Vec<NodeClients>,
    /// The activation gate's list while this node starts or serves the volume.
    #[serde(default)]
    pub activation: Option<ActivationGate>,
    /// The generation of the view's lineage: what a node without a lineage of its own (a
    /// new agent, or one reset as stale) follows until the next activation, when
    /// `generation` is 0.
    #[serde(default)]
    pub view_generation: u64,
}

/// The snapshot clients one node reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeClients {
    /// The node's corosync node id.
    pub node: u32,
    /// Its snapshot clients.
    pub clients: Vec<String>,
}

/// The combined client list of a server activation (the failover gather's result).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ActivationGate {
    /// The generation of the activation.
    pub generation: u64,
    /// True while the gather still runs (the server is not activated yet).
    pub gathering: bool,
    /// Gather: the members (`node/pid`) whose answer is missing.
    pub waiting_for: Vec<String>,
    /// Every snapshot client of the list.
    pub clients: Vec<GatedClient>,
}

/// One client of the activation list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GatedClient {
    /// The client's id.
    pub client: String,
    /// The node it is attached on.
    pub node: u32,
    /// This agent declared it gone (its node left or stopped listing it). Otherwise it
    /// reconnected or is still awaited: the server's `pending_snapshots` counts the latter.
    pub declared_gone: bool,
}

/// The moments of one server activation, as the activating node's agent saw them: wall
/// clock in Unix milliseconds (one host's clock, so a benchmark on the same host can set
/// them against its own timestamps), `None` where a moment was not seen (a first start
/// has no departed server; no origin write yet).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FailoverTiming {
    /// The generation the activation started.
    pub generation: u64,
    /// The node whose server departed (what made this a failover), if any.
    pub departed_server: Option<u32>,
    /// The group confchg at this node that started it: the last one before the choice
    /// that showed a member leaving (else the last one at all).
    pub confchg_at_ms: Option<u64>,
    /// The totem confchg (node-level ring change) of the same transition.
    pub totem_confchg_at_ms: Option<u64>,
    /// The departed server was certainly stopped, as this node saw it: its stop wait ran
    /// out (`old_server_settled`), or this node fenced it (`fence_done`). Not seen when
    /// another member fenced it.
    pub old_server_settled_at_ms: Option<u64>,
    /// This node chose itself and multicast its announce (`server_chosen`).
    pub chosen_at_ms: Option<u64>,
    /// Its own announce came back (agreed order): the server process was told to start.
    pub announce_delivered_at_ms: Option<u64>,
    /// The server process reported ready to the membership core.
    pub server_ready_at_ms: Option<u64>,
    /// Every member's client list was in (`gather_done`): the server was activated.
    pub activated_at_ms: Option<u64>,
    /// The server had opened the store (journal replayed) and listened.
    pub serving_at_ms: Option<u64>,
    /// The new server granted its first origin write.
    pub first_origin_write_at_ms: Option<u64>,
    /// Snapshot clients the gather collected (the activation gate's list).
    pub gathered_clients: Vec<String>,
    /// The membership core's own count: ms from the choice to the activation.
    pub chosen_to_activated_ms: u64,
}

impl FailoverTiming {
    /// The phases between consecutive known moments: (name, ms). A phase whose end or
    /// start is unknown is left out.
    pub fn phases(&self) -> Vec<(&'static str, u64)> {
        let start = self.confchg_at_ms.or(self.totem_confchg_at_ms);
        let steps: [(&'static str, Option<u64>); 8] = [
            ("confchg", start),
            ("old server settled", self.old_server_settled_at_ms),
            ("chosen", self.chosen_at_ms),
            ("announce delivered", self.announce_delivered_at_ms),
            ("server ready", self.server_ready_at_ms),
            ("gather done", self.activated_at_ms),
            ("serving", self.serving_at_ms),
            ("first origin write", self.first_origin_write_at_ms),
        ];
        let mut out = Vec::new();
        let mut last: Option<u64> = None;
        for (name, at) in steps {
            if let Some(at) = at {
                if let Some(prev) = last {
                    out.push((name, at.saturating_sub(prev)));
                }
                last = Some(at.max(last.unwrap_or(0)));
            }
        }
        out
    }

    /// From the confchg to the first origin write served (csnap's own part of an outage),
    /// when both are known.
    pub fn confchg_to_first_write_ms(&self) -> Option<u64> {
        let start = self.confchg_at_ms.or(self.totem_confchg_at_ms)?;
        Some(self.first_origin_write_at_ms?.saturating_sub(start))
    }
}

/// A fencing operation in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceJob {
    /// The node being fenced.
    pub node: u32,
    /// How (the configured fencing method).
    pub method: String,
}

/// agent -> csnapctl.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    /// Answer to `SnapshotCreate`.
    SnapshotCreated {
        /// The volume.
        volume: String,
        /// The new snapshot.
        info: SnapshotInfo,
    },
    /// One page of snapshots (answer to `SnapshotList`).
    SnapshotList {
        /// The volume.
        volume: String,
        /// The page's snapshots, by id.
        snapshots: Vec<SnapshotInfo>,
        /// Later snapshots exist: ask again after the last id of this page.
        more: bool,
        /// False while the server still counts usage after start (`chunks_held` partial).
        usage_exact: bool,
    },
    /// Answer to `SnapshotDelete`.
    SnapshotDeleted {
        /// The volume.
        volume: String,
        /// The snapshot's name.
        name: String,
        /// Its id.
        id: SnapId,
    },
    /// One page of a diff. `from`/`to`: the ends as resolved (snapshot ids); the ranges
    /// are in chunks of `chunk_size` bytes, of a volume of `size` bytes (the last chunk may
    /// be partial).
    Diff {
        /// The volume.
        volume: String,
        /// The older end.
        from: DiffEnd,
        /// The newer end.
        to: DiffEnd,
        /// Bytes per chunk.
        chunk_size: u64,
        /// The volume's size in bytes.
        size: u64,
        /// The chunks the ends read differently, and where to go on.
        page: DiffPage,
    },
    /// Answer to `Status`.
    Status {
        /// One per volume asked about.
        volumes: Vec<VolumeStatus>,
    },
    /// The answer to `Rollback`: the origin reads as `source` from now on; `pin` is the
    /// origin as it was. The copy-back runs on (its progress: `VolumeStatus::server_status
    /// .rollback`).
    RollbackStarted {
        /// The volume rolled back.
        volume: String,
        /// The snapshot the origin reads as from now on.
        source: SnapshotInfo,
        /// The snapshot that keeps the origin as it was.
        pin: SnapshotInfo,
    },
    /// The answer to `Geometry`.
    Geometry {
        /// The volume.
        volume: String,
        /// The volume's size in bytes.
        size: u64,
        /// Bytes per chunk.
        chunk_size: u64,
    },
    /// The bytes a `ReadSnapshot` or `ReadSnapshotExtents` asked for.
    Data {
        /// The volume.
        volume: String,
        /// The bytes.
        #[serde(with = "bin")]
        data: Vec<u8>,
    },
    /// A `WriteOrigin`, `ZeroOrigin` or `Flush` completed.
    Done {
        /// The volume.
        volume: String,
    },
    /// The request failed; the message says what was wrong. The control server fills in
    /// which node answered and the volume the request named (absent from older agents).
    Error {
        /// What was wrong.
        message: String,
        /// The answering node's corosync node id (cluster mode).
        #[serde(default)]
        node: Option<u32>,
        /// The answering agent's host name.
        #[serde(default)]
        host: Option<String>,
        /// The volume the request was about.
        #[serde(default)]
        volume: Option<String>,
    },
}

impl ControlResponse {
    /// An `Error` with `message`; the control server adds the node and volume.
    pub fn error(message: impl Into<String>) -> ControlResponse {
        ControlResponse::Error {
            message: message.into(),
            node: None,
            host: None,
            volume: None,
        }
    }
}

impl ControlRequest {
    /// The volume the request names, if any.
    pub fn volume(&self) -> Option<&str> {
        match self {
            ControlRequest::SnapshotCreate { volume, .. }
            | ControlRequest::SnapshotList { volume, .. }
            | ControlRequest::SnapshotDelete { volume, .. }
            | ControlRequest::Diff { volume, .. }
            | ControlRequest::Rollback { volume, .. }
            | ControlRequest::Geometry { volume }
            | ControlRequest::ReadSnapshot { volume, .. }
            | ControlRequest::ReadSnapshotExtents { volume, .. }
            | ControlRequest::WriteOrigin { volume, .. }
            | ControlRequest::ZeroOrigin { volume, .. }
            | ControlRequest::Flush { volume } => Some(volume),
            ControlRequest::Status { volume } => volume.as_deref(),
        }
    }
}

/// Who answered an error, and about which volume: `node 2 (host a), volume vol0`.
pub fn error_origin(node: Option<u32>, host: Option<&str>, volume: Option<&str>) -> String {
    let who = match (node, host) {
        (Some(n), Some(h)) => format!("node {n} ({h})"),
        (Some(n), None) => format!("node {n}"),
        (None, Some(h)) => format!("node {h}"),
        (None, None) => String::new(),
    };
    match (who.is_empty(), volume) {
        (true, Some(v)) => format!("volume {v}"),
        (false, Some(v)) => format!("{who}, volume {v}"),
        (_, None) => who,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest data request and answer fit a frame, and carry their bytes as a
    /// byte string (not one integer per byte).
    #[test]
    fn the_largest_data_messages_fit_a_frame() {
        let data = vec![0xffu8; MAX_CONTROL_DATA as usize];
        let req = ControlRequest::WriteOrigin {
            volume: "v".repeat(255),
            offset: u64::MAX,
            data: data.clone(),
        };
        let mut out = Vec::new();
        crate::encode_frame(&req, &mut out).expect("fits a frame");
        assert!(
            out.len() < MAX_CONTROL_DATA as usize + 1024,
            "{}",
            out.len()
        );
        match crate::decode_frame::<ControlRequest>(&out).expect("decodes") {
            crate::Decoded::Frame(back, _) => assert_eq!(back, req),
            _ => panic!("incomplete"),
        }
        let resp = ControlResponse::Data {
            volume: "v".repeat(255),
            data,
        };
        let mut out = Vec::new();
        crate::encode_frame(&resp, &mut out).expect("fits a frame");
        match crate::decode_frame::<ControlResponse>(&out).expect("decodes") {
            crate::Decoded::Frame(back, _) => assert_eq!(back, resp),
            _ => panic!("incomplete"),
        }
    }

    /// The largest extents request fits a frame small enough to leave the answer's data
    /// the rest.
    #[test]
    fn the_largest_extents_request_fits_a_frame() {
        let req = ControlRequest::ReadSnapshotExtents {
            volume: "v".repeat(255),
            snap: SnapId(u64::MAX),
            extents: vec![
                ReadExtent {
                    offset: u64::MAX,
                    len: u32::MAX
                };
                MAX_CONTROL_EXTENTS
            ],
        };
        let mut out = Vec::new();
        crate::encode_frame(&req, &mut out).expect("fits a frame");
        assert!(out.len() < 4096, "{}", out.len());
        match crate::decode_frame::<ControlRequest>(&out).expect("decodes") {
            crate::Decoded::Frame(back, _) => assert_eq!(back, req),
            _ => panic!("incomplete"),
        }
    }

    #[test]
    fn errors_name_the_node_and_volume() {
        assert_eq!(
            error_origin(Some(2), Some("a"), Some("vol0")),
            "node 2 (a), volume vol0"
        );
        assert_eq!(error_origin(None, Some("a"), Some("v")), "node a, volume v");
        assert_eq!(error_origin(Some(3), None, None), "node 3");
        assert_eq!(error_origin(None, None, Some("v")), "volume v");
        assert_eq!(error_origin(None, None, None), "");
    }

    /// An error from an agent without the node and volume fields still decodes.
    #[test]
    fn an_older_agents_error_still_decodes() {
        #[derive(Serialize)]
        enum Old {
            Error { message: String },
        }
        let bytes = rmp_serde::to_vec_named(&Old::Error {
            message: "no".into(),
        })
        .expect("encode");
        let new: ControlResponse = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(new, ControlResponse::error("no"));
    }

    #[test]
    fn phases_run_between_the_known_moments() {
        let t = FailoverTiming {
            generation: 3,
            confchg_at_ms: Some(1_000),
            totem_confchg_at_ms: Some(1_001),
            chosen_at_ms: Some(1_010),
            announce_delivered_at_ms: Some(1_012),
            server_ready_at_ms: Some(1_012),
            activated_at_ms: Some(1_015),
            serving_at_ms: Some(1_020),
            first_origin_write_at_ms: Some(1_024),
            ..FailoverTiming::default()
        };
        assert_eq!(
            t.phases(),
            vec![
                ("chosen", 10),
                ("announce delivered", 2),
                ("server ready", 0),
                ("gather done", 3),
                ("serving", 5),
                ("first origin write", 4),
            ]
        );
        assert_eq!(t.confchg_to_first_write_ms(), Some(24));
        let first_start = FailoverTiming::default();
        assert!(first_start.phases().is_empty());
        assert_eq!(first_start.confchg_to_first_write_ms(), None);
    }

    /// The status of an agent from before the timing split (`last_failover` as a pair)
    /// still decodes, and the new field is simply absent for it.
    #[test]
    fn an_older_agents_status_still_decodes() {
        #[derive(Serialize)]
        struct Old {
            node: u32,
            member: String,
            role: String,
            generation: u64,
            ring: Option<String>,
            members: Vec<String>,
            quorate: bool,
            server_node: Option<u32>,
            server_address: Option<String>,
            gate: String,
            stale: Vec<u32>,
            departed_servers: Vec<u32>,
            fencing: Vec<FenceJob>,
            lease_left_ms: u64,
            last_failover: Option<(u64, u64)>,
            local_server: Option<String>,
        }
        let old = Old {
            node: 2,
            member: "2/77".into(),
            role: "Serving".into(),
            generation: 4,
            ring: None,
            members: vec![],
            quorate: true,
            server_node: Some(2),
            server_address: None,
            gate: "Serving".into(),
            stale: vec![],
            departed_servers: vec![],
            fencing: vec![],
            lease_left_ms: 0,
            last_failover: Some((4, 12)),
            local_server: None,
        };
        let bytes = rmp_serde::to_vec_named(&old).expect("encode");
        let new: ClusterStatus = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(new.generation, 4);
        assert_eq!(new.failover, None);
    }
}
