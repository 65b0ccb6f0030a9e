//! systemd-style socket activation (`sd_listen_fds(3)`): the parent passes listening
//! sockets as fds 3.. and describes them in LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES.
//! libnbd's `nbdinfo -- [ CMD ]` and systemd `.socket` units both start servers this way.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use csnap_proto::net::StdListener;
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage,
};
use thiserror::Error;

/// First fd passed by the activation protocol.
pub const LISTEN_FDS_START: RawFd = 3;

/// Why the socket-activation variables (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES) cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
pub enum ActivationError {
    #[error("LISTEN_PID={0:?} is not a process id")]
    BadPid(String),
    #[error("LISTEN_FDS={0:?} is not a small positive count")]
    BadCount(String),
    #[error("LISTEN_FDNAMES has {names} names for {fds} fds")]
    NameCountMismatch { names: usize, fds: usize },
    #[error("activation fd {fd} is not usable: {reason}")]
    BadSocket { fd: RawFd, reason: String },
}

/// One passed fd and its name from LISTEN_FDNAMES, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassedFd {
    /// The file descriptor.
    pub fd: RawFd,
    /// Its name from LISTEN_FDNAMES.
    pub name: Option<String>,
}

/// Interprets the activation variables for the process `my_pid`. `Ok(None)` when
/// they are absent or addressed to another process (then they must be ignored).
pub fn parse_listen_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    my_pid: u32,
) -> Result<Option<Vec<PassedFd>>, ActivationError> {
    let (Some(pid), Some(count)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.to_owned()))?;
    if pid != my_pid {
        return Ok(None);
    }
    let count: i32 = match count.trim().parse() {
        Ok(n) if (1..=1024).contains(&n) => n,
        _ => return Err(ActivationError::BadCount(count.to_owned())),
    };
    let names: Vec<Option<String>> = match listen_fdnames {
        Some(names) if !names.is_empty() => {
            let names: Vec<_> = names.split(':').map(|n| Some(n.to_owned())).collect();
            if names.len() != count as usize {
                return Err(ActivationError::NameCountMismatch {
                    names: names.len(),
                    fds: count as usize,
                });
            }
            names
        }
        _ => vec![None; count as usize],
    };
    Ok(Some(
        names
            .into_iter()
            .enumerate()
            .map(|(i, name)| PassedFd {
                fd: LISTEN_FDS_START + i as RawFd,
                name,
            })
            .collect(),
    ))
}

/// A passed listening socket with its LISTEN_FDNAMES name.
#[derive(Debug)]
pub struct ActivatedListener {
    /// The socket, listening.
    pub listener: StdListener,
    /// Its name from LISTEN_FDNAMES.
    pub name: Option<String>,
}

/// Takes the sockets passed to this process, if any, and clears the variables so child
/// processes do not see them. Call early, before other threads start (it edits the
/// environment) and before anything else opens fds 3.. .
pub fn take_activated_listeners() -> Result<Option<Vec<ActivatedListener>>, ActivationError> {
    let var = |name| std::env::var(name).ok();
    let passed = parse_listen_env(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?;
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    let Some(passed) = passed else {
        return Ok(None);
    };
    let mut listeners = Vec::with_capacity(passed.len());
    for PassedFd { fd, name } in passed {
        listeners.push(ActivatedListener {
            listener: adopt(fd)?,
            name,
        });
    }
    Ok(Some(listeners))
}

/// Checks that `fd` is a listening stream socket and takes ownership of it.
fn adopt(fd: RawFd) -> Result<StdListener, ActivationError> {
    let bad = |reason: String| ActivationError::BadSocket { fd, reason };
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
        .map_err(|e| bad(format!("not open ({e})")))?;
    // SAFETY: the activation protocol hands fds LISTEN_FDS_START.. to this process to
    // own; `take_activated_listeners` clears the variables, so each is adopted once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut fd_flags = nix::fcntl::FdFlag::from_bits_truncate(flags);
    fd_flags.insert(nix::fcntl::FdFlag::FD_CLOEXEC);
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(fd_flags))
        .map_err(|e| bad(format!("cannot set close-on-exec ({e})")))?;
    match getsockopt(&owned, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => return Err(bad("socket is not listening".into())),
        Err(e) => return Err(bad(format!("not a socket ({e})"))),
    }
    let addr: SockaddrStorage = getsockname(fd).map_err(|e| bad(format!("getsockname: {e}")))?;
    match addr.family() {
        Some(AddressFamily::Unix) => Ok(StdListener::Unix(owned.into())),
        Some(AddressFamily::Inet) | Some(AddressFamily::Inet6) => {
            Ok(StdListener::Tcp(owned.into()))
        }
        other => Err(bad(format!("unsupported address family {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_or_foreign_variables_mean_no_activation() {
        assert_eq!(parse_listen_env(None, None, None, 7), Ok(None));
        assert_eq!(parse_listen_env(Some("8"), Some("1"), None, 7), Ok(None));
        assert_eq!(parse_listen_env(Some("7"), None, None, 7), Ok(None));
    }

    #[test]
    fn fds_start_at_three_with_names() {
        let fds = parse_listen_env(Some("7"), Some("2"), Some("nbd:admin"), 7)
            .unwrap()
            .unwrap();
        assert_eq!(
            fds,
            vec![
                PassedFd {
                    fd: 3,
                    name: Some("nbd".into())
                },
                PassedFd {
                    fd: 4,
                    name: Some("admin".into())
                },
            ]
        );
        let fds = parse_listen_env(Some("7"), Some("1"), None, 7)
            .unwrap()
            .unwrap();
        assert_eq!(fds, vec![PassedFd { fd: 3, name: None }]);
    }

    #[test]
    fn malformed_variables_are_errors() {
        assert!(matches!(
            parse_listen_env(Some("x"), Some("1"), None, 7),
            Err(ActivationError::BadPid(_))
        ));
        assert!(matches!(
            parse_listen_env(Some("7"), Some("0"), None, 7),
            Err(ActivationError::BadCount(_))
        ));
        assert!(matches!(
            parse_listen_env(Some("7"), Some("-1"), None, 7),
            Err(ActivationError::BadCount(_))
        ));
        assert_eq!(
            parse_listen_env(Some("7"), Some("2"), Some("one"), 7),
            Err(ActivationError::NameCountMismatch { names: 1, fds: 2 })
        );
    }
}
