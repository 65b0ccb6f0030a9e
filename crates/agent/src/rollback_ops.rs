//! The agent's side of `csnapctl rollback`: the snapshot named on the request is looked up
//! and the rollback asked of the volume's server through this node's client of the volume
//! (standalone and cluster mode alike), with refusals turned into messages that say what
//! was wrong.

use csnap_blockdev::client::{ClientError, Volume};
use csnap_proto::control::ControlResponse;
use csnap_proto::{validate_snapshot_name, ErrorCode};

use crate::snapshot_ops::describe;

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
