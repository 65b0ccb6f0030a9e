//! The one listener and accept path of csnap's servers (the metadata server and the NBD
//! server), and the one way a client dials a [`ListenAddr`]. TCP and unix sockets alike;
//! a listener may also be a socket passed by systemd socket activation ([`StdListener`]).
//!
//! Binding a unix socket refuses a path another process listens on, naming that process
//! ([`SocketHolder`]), and replaces a stale socket nobody answers on (left by a process
//! that died): two agents given one socket path fail with an error that says who holds it.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::addr::ListenAddr;

/// A connection's byte stream, TCP or unix, boxed so one path serves both.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Dials `addr` (a host name is resolved now). TCP connections go without Nagle's delay:
/// csnap's requests and replies are small and latency bound.
pub async fn connect(addr: &ListenAddr) -> io::Result<Box<dyn Stream>> {
    Ok(match addr {
        ListenAddr::Tcp(host_port) => {
            let stream = TcpStream::connect(host_port.as_str()).await?;
            stream.set_nodelay(true)?;
            Box::new(stream)
        }
        ListenAddr::Unix(path) => Box::new(UnixStream::connect(path).await?),
    })
}

/// A socket that could not be bound. The message says why; `reason` is deliberately not
/// a `#[source]`, so a printer of the whole chain (`{:#}`) does not say it twice.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {reason}")]
pub struct ListenError {
    /// Where.
    pub addr: ListenAddr,
    /// Why.
    pub reason: io::Error,
}

/// A listening socket not yet registered with tokio (one passed by socket activation).
#[derive(Debug)]
pub enum StdListener {
    /// A TCP listener.
    Tcp(std::net::TcpListener),
    /// A unix socket listener.
    Unix(std::os::unix::net::UnixListener),
}

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A listening socket a server accepts connections on.
pub struct Listener {
    socket: Socket,
    /// The bound address (the real port for port 0); `None` for an unnamed unix socket
    /// passed by socket activation.
    local: Option<ListenAddr>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Listener({self})")
    }
}

/// The bound address, for logs: `HOST:PORT`, `unix:PATH` or `unix:(unnamed)`.
impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.local {
            Some(addr) => addr.fmt(f),
            None => f.write_str("unix:(unnamed)"),
        }
    }
}

impl Listener {
    /// Binds `addr`. A unix path that exists is refused unless it is a stale socket (then
    /// it is replaced); the error names the process that listens there, if one does.
    pub async fn bind(addr: &ListenAddr) -> Result<Listener, ListenError> {
        let err = |reason| ListenError {
            addr: addr.clone(),
            reason,
        };
        let socket = match addr {
            ListenAddr::Tcp(host_port) => {
                Socket::Tcp(TcpListener::bind(host_port.as_str()).await.map_err(err)?)
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).map_err(err)?;
                Socket::Unix(UnixListener::bind(path).map_err(err)?)
            }
        };
        let local = match &socket {
            Socket::Tcp(l) => ListenAddr::from(l.local_addr().map_err(err)?),
            Socket::Unix(_) => addr.clone(),
        };
        Ok(Listener {
            socket,
            local: Some(local),
        })
    }

    /// Wraps an already listening socket (from socket activation). Must be called inside
    /// a tokio runtime.
    pub fn from_std(listener: StdListener) -> io::Result<Listener> {
        match listener {
            StdListener::Tcp(l) => {
                l.set_nonblocking(true)?;
                let local = ListenAddr::from(l.local_addr()?);
                Ok(Listener {
                    socket: Socket::Tcp(TcpListener::from_std(l)?),
                    local: Some(local),
                })
            }
            StdListener::Unix(l) => {
                l.set_nonblocking(true)?;
                let local = l
                    .local_addr()?
                    .as_pathname()
                    .map(|p| ListenAddr::Unix(p.to_owned()));
                Ok(Listener {
                    socket: Socket::Unix(UnixListener::from_std(l)?),
                    local,
                })
            }
        }
    }

    /// The bound address (with the real port when bound to port 0); `None` for an
    /// unnamed unix socket.
    pub fn local_addr(&self) -> Option<&ListenAddr> {
        self.local.as_ref()
    }

    /// The next connection and a description of its peer for logs (`IP:PORT`, or the
    /// listener's `unix:PATH`). TCP connections go without Nagle's delay.
    pub async fn accept(&self) -> io::Result<(Box<dyn Stream>, String)> {
        match &self.socket {
            Socket::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                // Best effort: a connection without it still works, only slower.
                let _ = stream.set_nodelay(true);
                Ok((Box::new(stream), peer.to_string()))
            }
            Socket::Unix(l) => {
                let (stream, _) = l.accept().await?;
                Ok((Box::new(stream), self.to_string()))
            }
        }
    }

    /// Accepts until `stop` resolves, handing each connection and its peer to `serve`.
    /// A failed accept (typically EMFILE) is logged and retried after a pause rather than
    /// spinning, and never ends the loop.
    pub async fn accept_until(
        &self,
        stop: impl Future<Output = ()>,
        mut serve: impl FnMut(Box<dyn Stream>, String),
    ) {
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = &mut stop => return,
                accepted = self.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => serve(stream, peer),
                Err(error) => {
                    tracing::warn!(listener = %self, %error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Makes way for a new unix socket at `path`: nothing there is fine, a stale socket is
/// removed, anything else (a live socket, a file) is an `AddrInUse` error saying what is
/// there and, for a live socket, who listens on it.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let holder = unix_socket_holder(path);
    if !meta.file_type().is_socket() || holder.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            match holder {
                Some(h) => in_use_message(&h),
                None => "the path exists and is not a socket".to_owned(),
            },
        ));
    }
    std::fs::remove_file(path)
}

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
    let stream = StdUnixStream::connect(path).ok()?;
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
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn round_trip(listener: &Listener) {
        let addr = listener.local_addr().expect("bound by address").clone();
        let dial = async {
            let mut client = connect(&addr).await.unwrap();
            client.write_all(b"ping").await.unwrap();
            let mut reply = [0; 4];
            client.read_exact(&mut reply).await.unwrap();
            reply
        };
        let answer = async {
            let (mut served, peer) = listener.accept().await.unwrap();
            let mut got = [0; 4];
            served.read_exact(&mut got).await.unwrap();
            served.write_all(b"pong").await.unwrap();
            (got, peer)
        };
        let timed = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(dial, answer)
        });
        let (reply, (got, peer)) = timed.await.expect("a local round trip within 10 s");
        assert_eq!((&reply, &got), (b"pong", b"ping"));
        assert!(!peer.is_empty());
    }

    #[tokio::test]
    async fn tcp_port_zero_reports_the_real_port_and_serves() {
        let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let Some(ListenAddr::Tcp(bound)) = listener.local_addr() else {
            panic!("a TCP listener has a TCP address: {listener}");
        };
        assert_ne!(bound.parse::<std::net::SocketAddr>().unwrap().port(), 0);
        round_trip(&listener).await;
    }

    #[tokio::test]
    async fn unix_bind_replaces_a_stale_socket_and_refuses_a_live_one_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let addr = ListenAddr::Unix(path.clone());
        let listener = Listener::bind(&addr)
            .await
            .expect("a stale socket is replaced");
        assert_eq!(listener.to_string(), format!("unix:{}", path.display()));
        round_trip(&listener).await;

        let err = Listener::bind(&addr).await.unwrap_err();
        assert_eq!(err.reason.kind(), io::ErrorKind::AddrInUse);
        let holder = format!(
            "another process is listening there: pid {} (",
            std::process::id()
        );
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("cannot listen on {addr}: ")),
            "{message}"
        );
        assert_eq!(message.matches(&holder).count(), 1, "{message}");
        drop(listener);

        let file = dir.path().join("file");
        std::fs::write(&file, b"keep me").unwrap();
        let err = Listener::bind(&ListenAddr::Unix(file.clone()))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .ends_with("the path exists and is not a socket"),
            "{err}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[tokio::test]
    async fn adopted_sockets_keep_their_address() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let listener = Listener::from_std(StdListener::Tcp(tcp)).unwrap();
        assert_eq!(listener.to_string(), format!("127.0.0.1:{port}"));
        round_trip(&listener).await;

        use std::os::linux::net::SocketAddrExt as _;
        let unnamed = std::os::unix::net::UnixListener::bind_addr(
            &std::os::unix::net::SocketAddr::from_abstract_name(b"csnap-proto-test").unwrap(),
        );
        // An abstract socket has no path: described, not addressed.
        if let Ok(unnamed) = unnamed {
            let listener = Listener::from_std(StdListener::Unix(unnamed)).unwrap();
            assert_eq!(listener.local_addr(), None);
            assert_eq!(listener.to_string(), "unix:(unnamed)");
        }
    }

    #[tokio::test]
    async fn accept_until_stops_when_told() {
        let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap().clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut served = Vec::new();
        let serving = listener.accept_until(
            async {
                let _ = stop_rx.await;
            },
            |_, peer| served.push(peer),
        );
        let clients = async {
            let first = connect(&addr).await.unwrap();
            let second = connect(&addr).await.unwrap();
            // Both are in the backlog or accepted; give the loop a moment, then stop it.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = stop_tx.send(());
            (first, second)
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(serving, clients)
        })
        .await
        .expect("accept_until ends once stopped");
        assert_eq!(served.len(), 2, "{served:?}");
    }

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
