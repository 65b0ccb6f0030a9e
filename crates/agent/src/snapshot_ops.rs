//! Snapshot requests from the control socket, carried out through a node's client of the
//! volume (which reaches the volume's server wherever it runs). Shared by standalone and
//! cluster mode.

use bytes::Bytes;
use csnap_blockdev::client::{ClientError, Volume};
use csnap_proto::control::{
    ControlRequest, ControlResponse, ReadExtent, MAX_CONTROL_DATA, MAX_CONTROL_EXTENTS,
    MAX_CONTROL_ZERO,
};
use csnap_proto::{validate_snapshot_name, DiffEnd, ErrorCode, SnapId, SnapRef};

/// What the server said, or what went wrong on the way.
pub fn describe(e: &ClientError) -> String {
    match e {
        ClientError::Server { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Answers a `SnapshotCreate`, `SnapshotList`, `SnapshotDelete`, `Diff`, `Rollback` or one
/// of the data requests of `export-diff` / `import-diff` for volume `v`.
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
        ControlRequest::Diff {
            from,
            to,
            start,
            budget,
            ..
        } => diff_page(&v, volume, from, to, start, budget).await,
        ControlRequest::Rollback {
            snapshot, pin_name, ..
        } => rollback(&v, volume, &snapshot, &pin_name).await,
        ControlRequest::Geometry { .. } => Ok(ControlResponse::Geometry {
            volume: v.clone(),
            size: volume.size(),
            chunk_size: volume.chunk_size(),
        }),
        ControlRequest::ReadSnapshot {
            snap, offset, len, ..
        } => read_snapshot(&v, volume, snap, offset, len).await,
        ControlRequest::ReadSnapshotExtents { snap, extents, .. } => {
            read_snapshot_extents(&v, volume, snap, &extents).await
        }
        ControlRequest::WriteOrigin { offset, data, .. } => {
            write_origin(&v, volume, offset, data).await
        }
        ControlRequest::ZeroOrigin { offset, len, .. } => {
            zero_origin(&v, volume, offset, len).await
        }
        ControlRequest::Flush { .. } => volume
            .flush()
            .await
            .map(|()| ControlResponse::Done { volume: v.clone() })
            .map_err(|e| format!("cannot flush volume {v:?}: {}", describe(&e))),
        ControlRequest::Status { .. } => Err("not a snapshot request".to_owned()),
    };
    result.unwrap_or_else(ControlResponse::error)
}

/// One page of a diff, with the ends named on the request resolved to snapshot ids.
async fn diff_page(
    v: &str,
    volume: &Volume,
    from: Option<SnapRef>,
    to: Option<SnapRef>,
    start: u64,
    budget: u32,
) -> Result<ControlResponse, String> {
    let from_end = resolve_end(v, volume, from).await?;
    let to_end = resolve_end(v, volume, to).await?;
    let page = volume
        .diff_page(from_end, to_end, start, budget)
        .await
        .map_err(|e| {
            format!(
                "cannot diff {from_end} and {to_end} of volume {v:?}: {}",
                describe(&e)
            )
        })?;
    Ok(ControlResponse::Diff {
        volume: v.to_owned(),
        from: from_end,
        to: to_end,
        chunk_size: volume.chunk_size(),
        size: volume.size(),
        page,
    })
}

async fn resolve_end(v: &str, volume: &Volume, end: Option<SnapRef>) -> Result<DiffEnd, String> {
    match end {
        None => Ok(DiffEnd::Origin),
        Some(SnapRef::Id(id)) => Ok(DiffEnd::Snapshot(id)),
        Some(SnapRef::Name(name)) => match volume.find_snapshot(&name).await {
            Ok(info) => Ok(DiffEnd::Snapshot(info.id)),
            Err(ClientError::Server {
                code: ErrorCode::NoSuchSnapshot,
                ..
            }) => Err(format!(
                "no such snapshot: volume {v:?} has no snapshot named {name:?}"
            )),
            Err(e) => Err(format!(
                "cannot look up snapshot {name:?} of volume {v:?}: {}",
                describe(&e)
            )),
        },
    }
}

/// `[offset, offset + len)` lies inside the volume and is not empty.
fn check_range(v: &str, volume: &Volume, what: &str, offset: u64, len: u64) -> Result<(), String> {
    if len == 0
        || offset
            .checked_add(len)
            .is_none_or(|end| end > volume.size())
    {
        return Err(format!(
            "{what} of {len} bytes at offset {offset} is empty or outside volume {v:?} ({} bytes)",
            volume.size()
        ));
    }
    Ok(())
}

async fn read_snapshot(
    v: &str,
    volume: &Volume,
    snap: SnapId,
    offset: u64,
    len: u32,
) -> Result<ControlResponse, String> {
    if len > MAX_CONTROL_DATA {
        return Err(format!(
            "a snapshot read of {len} bytes is too large (at most {MAX_CONTROL_DATA} per request)"
        ));
    }
    check_range(v, volume, "a snapshot read", offset, u64::from(len))?;
    let data = volume.read_snapshot(snap, offset, len).await.map_err(|e| {
        format!(
            "cannot read snapshot {snap} of volume {v:?} at offset {offset}: {}",
            describe(&e)
        )
    })?;
    if data.len() != len as usize {
        return Err(format!(
            "reading snapshot {snap} of volume {v:?} at offset {offset} returned {} bytes, not {len}",
            data.len()
        ));
    }
    Ok(ControlResponse::Data {
        volume: v.to_owned(),
        // Takes the buffer over where the read's is not shared (no copy).
        data: Vec::from(data),
    })
}

/// Checks a `ReadSnapshotExtents` request against the limits and the volume's size: the
/// total bytes it asks for, or what was wrong.
fn check_extents(v: &str, volume: &Volume, extents: &[ReadExtent]) -> Result<u64, String> {
    if extents.is_empty() || extents.len() > MAX_CONTROL_EXTENTS {
        return Err(format!(
            "a snapshot read of {} extents: it must name 1 to {MAX_CONTROL_EXTENTS} extents",
            extents.len()
        ));
    }
    let total: u64 = extents.iter().map(|e| u64::from(e.len)).sum();
    if total > u64::from(MAX_CONTROL_DATA) {
        return Err(format!(
            "a snapshot read of {} extents and {total} bytes is too large (at most \
             {MAX_CONTROL_DATA} bytes per request)",
            extents.len()
        ));
    }
    for e in extents {
        check_range(
            v,
            volume,
            "a snapshot read extent",
            e.offset,
            u64::from(e.len),
        )?;
    }
    Ok(total)
}

async fn read_snapshot_extents(
    v: &str,
    volume: &Volume,
    snap: SnapId,
    extents: &[ReadExtent],
) -> Result<ControlResponse, String> {
    let total = check_extents(v, volume, extents)?;
    let asked: Vec<(u64, u32)> = extents.iter().map(|e| (e.offset, e.len)).collect();
    let parts = volume
        .read_snapshot_extents(snap, &asked)
        .await
        .map_err(|e| {
            format!(
                "cannot read snapshot {snap} of volume {v:?} ({} extents, the first at \
                 offset {}): {}",
                extents.len(),
                extents.first().map_or(0, |e| e.offset),
                describe(&e)
            )
        })?;
    let mut data = Vec::with_capacity(total as usize);
    for (part, e) in parts.iter().zip(extents) {
        if part.len() != e.len as usize {
            return Err(format!(
                "reading snapshot {snap} of volume {v:?} at offset {} returned {} bytes, not {}",
                e.offset,
                part.len(),
                e.len
            ));
        }
        data.extend_from_slice(part);
    }
    if data.len() as u64 != total {
        return Err(format!(
            "reading {} extents of snapshot {snap} of volume {v:?} returned {} bytes, not {total}",
            extents.len(),
            data.len()
        ));
    }
    Ok(ControlResponse::Data {
        volume: v.to_owned(),
        data,
    })
}

async fn write_origin(
    v: &str,
    volume: &Volume,
    offset: u64,
    data: Vec<u8>,
) -> Result<ControlResponse, String> {
    if data.len() > MAX_CONTROL_DATA as usize {
        return Err(format!(
            "an origin write of {} bytes is too large (at most {MAX_CONTROL_DATA} per request)",
            data.len()
        ));
    }
    check_range(v, volume, "an origin write", offset, data.len() as u64)?;
    let len = data.len();
    volume
        .write_origin(offset, Bytes::from(data), false)
        .await
        .map(|()| ControlResponse::Done {
            volume: v.to_owned(),
        })
        .map_err(|e| {
            format!(
                "cannot write {len} bytes to the origin of volume {v:?} at offset {offset}: {}",
                describe(&e)
            )
        })
}

async fn zero_origin(
    v: &str,
    volume: &Volume,
    offset: u64,
    len: u64,
) -> Result<ControlResponse, String> {
    if len > MAX_CONTROL_ZERO {
        return Err(format!(
            "an origin zeroing of {len} bytes is too large (at most {MAX_CONTROL_ZERO} per request)"
        ));
    }
    check_range(v, volume, "an origin zeroing", offset, len)?;
    volume
        .write_zeroes(None, offset, len, true, false, false)
        .await
        .map(|()| ControlResponse::Done {
            volume: v.to_owned(),
        })
        .map_err(|e| {
            format!(
                "cannot zero {len} bytes of the origin of volume {v:?} at offset {offset}: {}",
                describe(&e)
            )
        })
}

// ---- online rollback (`csnapctl rollback`) ----
//
// The snapshot named on the request is looked up and the rollback asked of the volume's
// server through this node's client of the volume (standalone and cluster mode alike),
// with refusals turned into messages that say what was wrong.

/// Answers a control `Rollback` of volume `v` to snapshot `snapshot`, keeping the origin
/// as it was as snapshot `pin_name`.
pub async fn rollback(
    v: &str,
    volume: &Volume,
    snapshot: &str,
    pin_name: &str,
) -> Result<ControlResponse, String> {
    if let Err(why) = validate_snapshot_name(pin_name) {
        return Err(format!(
            "invalid name {pin_name:?} for the snapshot that keeps the origin as it was: {why}"
        ));
    }
    let source = volume.find_snapshot(snapshot).await.map_err(|e| match e {
        ClientError::Server {
            code: ErrorCode::NoSuchSnapshot,
            ..
        } => format!("no such snapshot: volume {v:?} has no snapshot named {snapshot:?}"),
        e => format!(
            "cannot roll volume {v:?} back to snapshot {snapshot:?}: {}",
            describe(&e)
        ),
    })?;
    let pin = volume
        .rollback(source.id, pin_name)
        .await
        .map_err(|e| refusal(v, snapshot, pin_name, &e))?;
    Ok(ControlResponse::RollbackStarted {
        volume: v.to_owned(),
        source,
        pin,
    })
}

/// What a refused rollback tells the user.
fn refusal(v: &str, snapshot: &str, pin_name: &str, e: &ClientError) -> String {
    let ClientError::Server { code, message } = e else {
        return format!(
            "cannot roll volume {v:?} back to snapshot {snapshot:?}: {}",
            describe(e)
        );
    };
    match code {
        ErrorCode::RollbackInProgress => format!(
            "volume {v:?} already has a rollback running ({message}); wait until it is done \
             (csnapctl status {v}) and try again"
        ),
        ErrorCode::NoSuchSnapshot => {
            format!("no such snapshot: volume {v:?} has no snapshot named {snapshot:?}")
        }
        ErrorCode::SnapshotInvalid => format!(
            "snapshot {snapshot:?} of volume {v:?} is invalid (the store-full policy gave up \
             its contents): cannot roll back to it"
        ),
        ErrorCode::NameTaken => format!(
            "volume {v:?} already has a snapshot named {pin_name:?}: choose another name for \
             the snapshot that keeps the origin as it was (--pin)"
        ),
        ErrorCode::BadName => format!(
            "invalid name {pin_name:?} for the snapshot that keeps the origin as it was: {message}"
        ),
        ErrorCode::StoreFull => format!(
            "cannot roll volume {v:?} back to snapshot {snapshot:?}: the store has no room for \
             the snapshot that keeps the origin as it was ({message}); delete snapshots first"
        ),
        _ => format!("cannot roll volume {v:?} back to snapshot {snapshot:?}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_what_was_wrong() {
        let server = |code| ClientError::Server {
            code,
            message: "a rollback to snapshot 3 is running".into(),
        };
        let running = refusal(
            "vol0",
            "good",
            "pin1",
            &server(ErrorCode::RollbackInProgress),
        );
        assert!(
            running.contains("already has a rollback running"),
            "{running}"
        );
        assert!(running.contains("snapshot 3"), "{running}");
        let taken = refusal("vol0", "good", "pin1", &server(ErrorCode::NameTaken));
        assert!(
            taken.contains("\"pin1\"") && taken.contains("--pin"),
            "{taken}"
        );
        let invalid = refusal("vol0", "good", "pin1", &server(ErrorCode::SnapshotInvalid));
        assert!(
            invalid.contains("\"good\"") && invalid.contains("invalid"),
            "{invalid}"
        );
        let gone = refusal("vol0", "good", "pin1", &server(ErrorCode::NoSuchSnapshot));
        assert!(gone.contains("no snapshot named \"good\""), "{gone}");
    }
}
