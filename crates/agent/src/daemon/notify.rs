//! systemd's notification protocol (sd_notify(3)): `KEY=VALUE` lines in one datagram to
//! the unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
//! Without the variable (not started by systemd with Type=notify) nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, String)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment: `$NOTIFY_SOCKET`, and `$WATCHDOG_USEC` when `$WATCHDOG_PID`
    /// is unset or this process.
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty())
            // Non-blocking: a receiver that does not read (its queue full) must never stall
            // the agent's loop; such a notification is dropped.
            .and_then(|target| {
                let socket = UnixDatagram::unbound().ok()?;
                socket.set_nonblocking(true).ok()?;
                Some((socket, target))
            });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// The watchdog interval systemd expects pings within, if it watches this process.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines).
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let Some((socket, target)) = &self.socket else {
            return Ok(());
        };
        match target.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                socket.send_to_addr(state.as_bytes(), &addr)?;
            }
            None => {
                socket.send_to(state.as_bytes(), target)?;
            }
        }
        Ok(())
    }

    /// [`Self::notify`], logging a failure instead of returning it (a full receiver queue
    /// only at debug level: the next notification says the same).
    pub fn send(&self, state: &str) {
        match self.notify(state) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tracing::debug!("systemd's notification socket is full; notification dropped")
            }
            Err(e) => tracing::warn!(error = %e, "cannot notify systemd"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver that never reads fills its queue; notifying must not block then.
    #[test]
    fn a_full_receiver_never_blocks_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let socket = UnixDatagram::unbound().unwrap();
        socket.set_nonblocking(true).unwrap();
        let n = Notifier {
            socket: Some((socket, path.display().to_string())),
            watchdog: None,
        };
        let started = std::time::Instant::now();
        for _ in 0..10_000 {
            n.send("WATCHDOG=1\nSTATUS=a status line of some length");
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut buf = [0u8; 256];
        let got = receiver.recv(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..got]).starts_with("WATCHDOG=1"));
    }
}
