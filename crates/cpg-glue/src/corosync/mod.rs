//! Real corosync: CPG ([`CorosyncGroup`]), quorum ([`CorosyncQuorum`]), cmap ([`Cmap`]: raw
//! keys of the live corosync.conf and a watch for their reloads) and cfg ([`local_node_id`],
//! [`kill_node`]).
//!
//! Every connection talks to the corosync of the calling thread's network namespace (libqb
//! IPC uses abstract unix sockets, which are per network namespace); once made, its fd works
//! from any thread. Event streams wrap the connection's fd in tokio's `AsyncFd`, so they must
//! be created inside a tokio runtime context.
//!
//! CPG goes through our own small libcpg binding ([`cpg_ffi`], which explains why);
//! quorum, cmap and cfg use the rust-corosync crate.

use std::os::fd::{AsRawFd, RawFd};

use rust_corosync::CsError;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::{GroupError, NodeId};

mod cmap;
mod cpg;
pub mod cpg_ffi;
mod quorum;
#[cfg(test)]
mod real_tests;

pub use cmap::{Cmap, CmapKeys, CmapWatch};
pub use cpg::{CorosyncGroup, CorosyncSender, MAX_MESSAGE_SIZE};
pub use quorum::CorosyncQuorum;

/// The local node's corosync node id (cfg `corosync_cfg_local_get`).
pub fn local_node_id() -> Result<NodeId, GroupError> {
    let handle = cfg_connect()?;
    let id = rust_corosync::cfg::local_get(&handle)
        .map_err(|e| call_error("corosync_cfg_local_get", e))?;
    Ok(NodeId(u32::from(id)))
}

/// Asks corosync to make `node` leave the cluster at once (cfg `corosync_cfg_kill_node`,
/// the in-cluster fencing method: that node's corosync exits, logging `reason`).
pub fn kill_node(node: NodeId, reason: &str) -> Result<(), GroupError> {
    if reason.contains('\0') {
        return Err(GroupError::Invalid(format!(
            "kill_node reason {reason:?} contains a NUL byte"
        )));
    }
    let handle = cfg_connect()?;
    rust_corosync::cfg::kill_node(&handle, rust_corosync::NodeId::from(node.0), reason).map_err(
        |e| match e {
            CsError::CsErrNotExist => GroupError::Corosync {
                call: "corosync_cfg_kill_node",
                detail: format!(
                    "{}: node {node} is not in the current membership",
                    cs_error_name(e)
                ),
            },
            other => call_error("corosync_cfg_kill_node", other),
        },
    )
}

fn cfg_connect() -> Result<rust_corosync::cfg::Handle, GroupError> {
    let callbacks = rust_corosync::cfg::Callbacks {
        corosync_cfg_shutdown_callback_fn: None,
    };
    rust_corosync::cfg::initialize(&callbacks).map_err(|e| connect_error("cfg", e))
}

/// The C name and number of a corosync error, e.g. `CS_ERR_TRY_AGAIN (6)`.
pub(crate) fn cs_error_name(err: CsError) -> String {
    let name = match err {
        CsError::CsOk => "CS_OK",
        CsError::CsErrLibrary => "CS_ERR_LIBRARY",
        CsError::CsErrVersion => "CS_ERR_VERSION",
        CsError::CsErrInit => "CS_ERR_INIT",
        CsError::CsErrTimeout => "CS_ERR_TIMEOUT",
        CsError::CsErrTryAgain => "CS_ERR_TRY_AGAIN",
        CsError::CsErrInvalidParam => "CS_ERR_INVALID_PARAM",
        CsError::CsErrNoMemory => "CS_ERR_NO_MEMORY",
        CsError::CsErrBadHandle => "CS_ERR_BAD_HANDLE",
        CsError::CsErrBusy => "CS_ERR_BUSY",
        CsError::CsErrAccess => "CS_ERR_ACCESS",
        CsError::CsErrNotExist => "CS_ERR_NOT_EXIST",
        CsError::CsErrNameTooLong => "CS_ERR_NAME_TOO_LONG",
        CsError::CsErrExist => "CS_ERR_EXIST",
        CsError::CsErrNoSpace => "CS_ERR_NO_SPACE",
        CsError::CsErrInterrupt => "CS_ERR_INTERRUPT",
        CsError::CsErrNameNotFound => "CS_ERR_NAME_NOT_FOUND",
        CsError::CsErrNoResources => "CS_ERR_NO_RESOURCES",
        CsError::CsErrNotSupported => "CS_ERR_NOT_SUPPORTED",
        CsError::CsErrBadOperation => "CS_ERR_BAD_OPERATION",
        CsError::CsErrFailedOperation => "CS_ERR_FAILED_OPERATION",
        CsError::CsErrMessageError => "CS_ERR_MESSAGE_ERROR",
        CsError::CsErrQueueFull => "CS_ERR_QUEUE_FULL",
        CsError::CsErrQueueNotAvailable => "CS_ERR_QUEUE_NOT_AVAILABLE",
        CsError::CsErrBadFlags => "CS_ERR_BAD_FLAGS",
        CsError::CsErrTooBig => "CS_ERR_TOO_BIG",
        CsError::CsErrNoSection => "CS_ERR_NO_SECTIONS",
        CsError::CsErrContextNotFound => "CS_ERR_CONTEXT_NOT_FOUND",
        CsError::CsErrTooManyGroups => "CS_ERR_TOO_MANY_GROUPS",
        CsError::CsErrSecurity => "CS_ERR_SECURITY",
        CsError::CsErrRustCompat => "unknown corosync error",
        CsError::CsErrRustString => "string conversion error",
    };
    format!("{name} ({})", err as u32)
}

/// Converts a raw `cs_error_t` from our own FFI into rust-corosync's enum.
pub(crate) fn cs_error_from_raw(code: u32) -> CsError {
    // num_enum's default variant makes this infallible (unknown codes -> CsErrRustCompat).
    CsError::try_from(code).unwrap_or(CsError::CsErrRustCompat)
}

/// Maps the failure of a service's `*_initialize`: no IPC endpoint means corosync is not
/// running here (or this thread is in another network namespace than the corosync meant).
pub(crate) fn connect_error(service: &'static str, err: CsError) -> GroupError {
    match err {
        CsError::CsErrLibrary | CsError::CsErrNotExist => GroupError::NotRunning {
            service,
            detail: format!(
                "{service} initialize returned {} (no corosync IPC endpoint in this network namespace)",
                cs_error_name(err)
            ),
        },
        CsError::CsErrAccess | CsError::CsErrSecurity => GroupError::Corosync {
            call: "initialize",
            detail: format!(
                "{service}: {}: permission denied (run as root or allow the user in corosync's uidgid)",
                cs_error_name(err)
            ),
        },
        other => GroupError::Corosync {
            call: "initialize",
            detail: format!("{service}: {}", cs_error_name(other)),
        },
    }
}

/// Maps the failure of a call on an established connection.
pub(crate) fn call_error(call: &'static str, err: CsError) -> GroupError {
    GroupError::Corosync {
        call,
        detail: cs_error_name(err),
    }
}

/// Registers a corosync library handle's fd with the current tokio runtime.
pub(crate) fn register_fd(
    fd: RawFd,
    service: &'static str,
) -> Result<AsyncFd<LibraryFd>, GroupError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(GroupError::Invalid(format!(
            "corosync {service}: must be called inside a tokio runtime context (its fd is registered with tokio)"
        )));
    }
    // SAFETY: `fd` is the open IPC socket of a live library handle. Every owner of the
    // returned AsyncFd drops it before finalizing that handle, which is what closes the fd.
    unsafe { AsyncFd::register_with_interest(LibraryFd(fd), Interest::READABLE) }.map_err(|e| {
        GroupError::Corosync {
            call: "registering the IPC fd with tokio",
            detail: format!("{service}: {e}"),
        }
    })
}

/// A file descriptor owned by a corosync library handle, registered with tokio without
/// taking ownership: the library closes it when the handle is finalized, so the `AsyncFd`
/// around it must be dropped first.
#[derive(Debug)]
pub(crate) struct LibraryFd(pub RawFd);

impl AsRawFd for LibraryFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_name_the_service_and_say_not_running() {
        let e = connect_error("cpg", CsError::CsErrLibrary);
        assert!(matches!(e, GroupError::NotRunning { service: "cpg", .. }));
        let text = e.to_string();
        assert!(text.contains("corosync cpg"), "{text}");
        assert!(text.contains("is corosync running"), "{text}");
        assert!(text.contains("CS_ERR_LIBRARY (2)"), "{text}");

        let e = connect_error("quorum", CsError::CsErrAccess);
        assert!(e.to_string().contains("permission denied"), "{e}");
        assert!(e.to_string().contains("quorum"), "{e}");
        let e = connect_error("cmap", CsError::CsErrTryAgain);
        assert!(matches!(e, GroupError::Corosync { .. }));
        assert!(e.to_string().contains("CS_ERR_TRY_AGAIN (6)"), "{e}");
    }

    #[test]
    fn raw_codes_convert() {
        assert_eq!(cs_error_from_raw(1), CsError::CsOk);
        assert_eq!(cs_error_from_raw(6), CsError::CsErrTryAgain);
        assert_eq!(cs_error_from_raw(100), CsError::CsErrSecurity);
        assert_eq!(cs_error_from_raw(4242), CsError::CsErrRustCompat);
        assert_eq!(cs_error_name(CsError::CsErrTooBig), "CS_ERR_TOO_BIG (26)");
        let e = call_error("cpg_join", CsError::CsErrExist);
        assert_eq!(e.to_string(), "corosync cpg_join failed: CS_ERR_EXIST (14)");
    }
}
