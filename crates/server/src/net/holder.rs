//! Who listens on a unix socket: the answer to "another process is listening there" that
//! lets an operator find the process (two agents given the same socket path, a server that
//! is still running).

use std::fmt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::socket::{getsockopt, sockopt};

/// The process listening on a unix socket, as the kernel reports it (`SO_PEERCRED` of a
/// connection to it: the process that called `listen`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketHolder {
    /// 0 when the listener lives in a pid namespace this process cannot see.
    pub pid: i32,
    /// Its command name (`/proc/PID/comm`), if readable.
    pub command: Option<String>,
}

impl fmt::Display for SocketHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pid, &self.command) {
            (0, _) => f.write_str("a process in another pid namespace"),
            (pid, Some(cmd)) => write!(f, "pid {pid} ({cmd})"),
            (pid, None) => write!(f, "pid {pid}"),
        }
    }
}

/// The process listening on the unix socket at `path`, or `None` if nobody answers there
/// (no such file, a stale socket, not a socket). Connecting is the test of "listening";
/// the connection is closed at once.
pub fn unix_socket_holder(path: &Path) -> Option<SocketHolder> {
    let stream = UnixStream::connect(path).ok()?;
    let pid = getsockopt(&stream, sockopt::PeerCredentials)
        .map(|cred| cred.pid())
        .unwrap_or(0);
    let command = (pid > 0)
        .then(|| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok())
        .flatten()
        .map(|c| c.trim_end().to_owned())
        .filter(|c| !c.is_empty());
    Some(SocketHolder { pid, command })
}

/// The error text for a path someone listens on: `another process is listening there:
/// pid 1234 (csnap-agent)`.
pub fn in_use_message(holder: &SocketHolder) -> String {
    format!("another process is listening there: {holder}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_this_process_as_the_holder_of_its_own_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        assert_eq!(unix_socket_holder(&path), None, "no file");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let holder = unix_socket_holder(&path).expect("a listener answers");
        assert_eq!(holder.pid, std::process::id() as i32);
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(holder.command.as_deref(), Some(comm.trim_end()));
        assert!(holder
            .to_string()
            .starts_with(&format!("pid {} (", holder.pid)));
        drop(listener);
        assert_eq!(unix_socket_holder(&path), None, "a stale socket");
    }

    #[test]
    fn describes_holders() {
        let h = |pid, command: Option<&str>| SocketHolder {
            pid,
            command: command.map(str::to_owned),
        };
        assert_eq!(h(7, Some("csnap-agent")).to_string(), "pid 7 (csnap-agent)");
        assert_eq!(h(7, None).to_string(), "pid 7");
        assert_eq!(h(0, None).to_string(), "a process in another pid namespace");
    }
}
