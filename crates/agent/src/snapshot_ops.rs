//! Snapshot requests from the control socket, carried out through a node's client of the
//! volume (which reaches the volume's server wherever it runs). Shared by standalone and
//! cluster mode.

use csnap_blockdev::client::{ClientError, Volume};
use csnap_proto::control::{ControlRequest, ControlResponse};
use csnap_proto::{validate_snapshot_name, ErrorCode, SnapRef};

/// What the server said, or what went wrong on the way.
pub fn describe(e: &ClientError) -> String {
    match e {
        ClientError::Server { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Answers a `SnapshotCreate`, `SnapshotList` or `SnapshotDelete` for volume `v`.
pub async fn handle(v: &str, volume: &Volume, req: ControlRequest) -> ControlResponse {
    let v = v.to_owned();
    let result = match req {
        ControlRequest::SnapshotCreate { name, .. } => {
            if let Err(why) = validate_snapshot_name(&name) {
                return ControlResponse::error(format!("invalid snapshot name {name:?}: {why}"));
            }
            volume
                .create_snapshot(&name)
                .await
                .map(|info| ControlResponse::SnapshotCreated {
                    volume: v.clone(),
                    info,
                })
                .map_err(|e| match &e {
                    ClientError::Server {
                        code: ErrorCode::NameTaken,
                        ..
                    } => format!(
                        "duplicate name: volume {v:?} already has a snapshot named {name:?}"
                    ),
                    _ => format!(
                        "cannot create snapshot {name:?} of volume {v:?}: {}",
                        describe(&e)
                    ),
                })
        }
        ControlRequest::SnapshotList { after, limit, .. } => volume
            .list_snapshots_page(after, limit)
            .await
            .map(|page| ControlResponse::SnapshotList {
                volume: v.clone(),
                snapshots: page.snapshots,
                more: page.more,
                usage_exact: page.usage_exact,
            })
            .map_err(|e| format!("cannot list snapshots of volume {v:?}: {}", describe(&e))),
        ControlRequest::SnapshotDelete { name, .. } => volume
            .delete_snapshot(SnapRef::Name(name.clone()))
            .await
            .map(|id| ControlResponse::SnapshotDeleted {
                volume: v.clone(),
                name: name.clone(),
                id,
            })
            .map_err(|e| match &e {
                ClientError::Server {
                    code: ErrorCode::NoSuchSnapshot,
                    ..
                } => format!("no such snapshot: volume {v:?} has no snapshot named {name:?}"),
                _ => format!(
                    "cannot delete snapshot {name:?} of volume {v:?}: {}",
                    describe(&e)
                ),
            }),
        ControlRequest::Status { .. } => Err("not a snapshot request".to_owned()),
    };
    result.unwrap_or_else(ControlResponse::error)
}
