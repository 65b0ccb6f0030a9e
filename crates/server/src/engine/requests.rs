//! Pure checks of a client's request, and the refusals they give (no engine state).

use csnap_proto::{ChunkRange, ClientKind, ErrorCode, ServerMsg, SnapId};
use std::collections::BTreeSet;

/// A request refused with an error code and a message for humans.
pub(super) struct Reject(pub(super) ErrorCode, pub(super) String);

pub(super) fn error(code: ErrorCode, message: impl Into<String>) -> ServerMsg {
    ServerMsg::Error {
        code,
        message: message.into(),
    }
}

pub(super) fn wrong_kind(what: &str, kind: ClientKind) -> Reject {
    Reject(
        ErrorCode::WrongClientKind,
        format!("{what} is not allowed on a {kind:?} connection"),
    )
}

/// A snapshot request (`what`) is allowed only on a connection of that snapshot.
pub(super) fn check_snapshot_kind(
    what: &str,
    kind: ClientKind,
    snap: SnapId,
) -> Result<(), Reject> {
    match kind {
        ClientKind::Snapshot { snap: mine } if mine == snap => Ok(()),
        ClientKind::Snapshot { snap: mine } => Err(Reject(
            ErrorCode::WrongClientKind,
            format!("{what} for snapshot {snap} on a connection for snapshot {mine}"),
        )),
        _ => Err(wrong_kind(what, kind)),
    }
}

/// Checks request ranges: non-empty, no wrap-around, inside the origin (`origin_chunks`),
/// not more than `max_chunks` in all. The chunks they name.
pub(super) fn request_chunks(
    ranges: &[ChunkRange],
    origin_chunks: u64,
    max_chunks: u64,
) -> Result<BTreeSet<u64>, Reject> {
    if ranges.is_empty() {
        return Err(Reject(
            ErrorCode::BadRequest,
            "no chunk ranges given".into(),
        ));
    }
    let mut total: u64 = 0;
    for r in ranges {
        if r.count == 0 {
            return Err(Reject(
                ErrorCode::BadRequest,
                format!("empty chunk range at {}", r.start),
            ));
        }
        let end = r.chunks().map(|c| c.end).ok_or_else(|| {
            Reject(
                ErrorCode::OutOfRange,
                format!("chunk range {}+{} wraps around", r.start, r.count),
            )
        })?;
        if end > origin_chunks {
            return Err(Reject(
                ErrorCode::OutOfRange,
                format!(
                    "chunk range {}+{} ends beyond the origin ({origin_chunks} chunks)",
                    r.start, r.count
                ),
            ));
        }
        total += u64::from(r.count);
        if total > max_chunks {
            return Err(Reject(
                ErrorCode::TooLarge,
                format!("request names more than {max_chunks} chunks"),
            ));
        }
    }
    Ok(ranges.iter().filter_map(|r| r.chunks()).flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<BTreeSet<u64>, Reject>) -> Option<ErrorCode> {
        r.err().map(|Reject(code, _)| code)
    }

    #[test]
    fn ranges_are_checked_before_any_chunk_is_named() {
        let range = |start, count| ChunkRange { start, count };
        assert_eq!(
            code(request_chunks(&[], 10, 8)),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(
            code(request_chunks(&[range(1, 0)], 10, 8)),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(
            code(request_chunks(&[range(u64::MAX, 2)], 10, 8)),
            Some(ErrorCode::OutOfRange)
        );
        assert_eq!(
            code(request_chunks(&[range(8, 3)], 10, 8)),
            Some(ErrorCode::OutOfRange)
        );
        assert_eq!(
            code(request_chunks(&[range(0, 5), range(5, 4)], 10, 8)),
            Some(ErrorCode::TooLarge)
        );
        let ok = request_chunks(&[range(3, 2), range(4, 2)], 10, 8).ok();
        assert_eq!(ok, Some(BTreeSet::from([3, 4, 5])));
        let snap = ClientKind::Snapshot { snap: SnapId(2) };
        assert!(check_snapshot_kind("X", snap, SnapId(2)).is_ok());
        assert!(check_snapshot_kind("X", snap, SnapId(3)).is_err());
        assert!(check_snapshot_kind("X", ClientKind::Origin, SnapId(2)).is_err());
    }
}
