//! Where a csnap socket is: the one address type of the metadata server's listener, the
//! NBD server's listeners and the client's connections to its server. Plain data, no I/O:
//! names are resolved when a socket is bound or dialled (with feature `net`, in
//! [`crate::net`]), so a cluster node advertised by host name is looked up at each
//! connection, not once at start.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// `HOST:PORT` (TCP) or `unix:PATH` (a unix socket).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// `HOST:PORT`: an IP address (IPv6 in brackets) or a host name, and a port (0 picks
    /// a free one when listening).
    Tcp(String),
    /// `unix:PATH`: a unix socket at this path.
    Unix(PathBuf),
}

impl ListenAddr {
    /// The socket path of a unix address.
    pub fn unix_path(&self) -> Option<&std::path::Path> {
        match self {
            ListenAddr::Unix(path) => Some(path),
            ListenAddr::Tcp(_) => None,
        }
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(addr: SocketAddr) -> ListenAddr {
        ListenAddr::Tcp(addr.to_string())
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(host_port) => f.write_str(host_port),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Why a text is not a [`ListenAddr`]; the message quotes the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
pub enum AddrError {
    #[error("unix: needs a socket path")]
    EmptyUnixPath,
    #[error("{0:?} is neither HOST:PORT nor unix:PATH")]
    Malformed(String),
}

impl FromStr for ListenAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AddrError::EmptyUnixPath);
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(ListenAddr::Tcp(s.to_owned()))
            }
            _ => Err(AddrError::Malformed(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix_and_prints_them_back() {
        for text in [
            "127.0.0.1:7000",
            "[::1]:0",
            "node-a.example:9000",
            "unix:/run/x.sock",
        ] {
            let addr: ListenAddr = text.parse().unwrap();
            assert_eq!(addr.to_string(), text);
        }
        assert_eq!(
            "unix:/run/x.sock"
                .parse::<ListenAddr>()
                .unwrap()
                .unix_path(),
            Some(std::path::Path::new("/run/x.sock"))
        );
        let from_socket = ListenAddr::from("10.0.0.1:5".parse::<SocketAddr>().unwrap());
        assert_eq!(from_socket, ListenAddr::Tcp("10.0.0.1:5".into()));
    }

    #[test]
    fn refuses_what_is_neither_and_quotes_it() {
        assert_eq!("unix:".parse::<ListenAddr>(), Err(AddrError::EmptyUnixPath));
        for bad in [
            "",
            "host",
            ":80",
            "host:",
            "host:http",
            "host:65536",
            "/run/x.sock",
        ] {
            let err = bad.parse::<ListenAddr>().unwrap_err();
            assert_eq!(err, AddrError::Malformed(bad.to_owned()));
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}
