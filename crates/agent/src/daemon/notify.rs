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
            .and_then(|target| UnixDatagram::unbound().ok().map(|s| (s, target)));
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

    /// [`Self::notify`], logging a failure instead of returning it.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
}
