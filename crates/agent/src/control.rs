//! The agent's local control socket (unix stream, mode 0600): one framed
//! [`ControlRequest`] in, one [`ControlResponse`] out, per connection.

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use csnap_proto::control::{ControlRequest, ControlResponse};
use csnap_proto::{decode_frame, encode_frame, Decoded, FrameError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Longest a peer may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a control request (csnapctl to the agent) or the control socket failed; `path` is
/// the control socket's.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // The fields are the socket's path and the cause, the same in every variant.
pub enum ControlError {
    /// No socket at `path`.
    #[error("agent not running at {path} (no socket there): is csnap-agent running? (`systemctl status csnap-agent`; or pass --socket PATH)")]
    NotRunning { path: PathBuf },
    /// A socket nobody listens on.
    #[error("agent not running at {path} (connection refused: a stale socket left by an agent that is gone; `systemctl status csnap-agent`)")]
    Refused { path: PathBuf },
    /// Connecting, sending or receiving failed.
    #[error("cannot talk to the agent at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The answer did not decode.
    #[error("bad answer from the agent at {path}: {source}")]
    Frame { path: PathBuf, source: FrameError },
    /// The agent closed the connection without an answer.
    #[error("the agent at {path} closed the connection without answering")]
    NoAnswer { path: PathBuf },
    /// No answer within [`REPLY_TIMEOUT`].
    #[error("the agent at {path} did not answer within {0:?}", REPLY_TIMEOUT)]
    Timeout { path: PathBuf },
    /// The agent could not listen on its control socket. `reason` is in the message and
    /// deliberately not a `#[source]`, so a printer of the whole chain (`{:#}`) does not
    /// say it twice.
    #[error("cannot listen on {path}: {reason}")]
    Bind { path: PathBuf, reason: io::Error },
}

/// How long csnapctl waits for an answer (snapshot creation waits for every origin client).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

async fn read_frame<T: serde::de::DeserializeOwned, R: AsyncRead + Unpin>(
    rd: &mut R,
) -> Result<Option<T>, io::Error> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match decode_frame::<T>(&buf) {
            Ok(Decoded::Frame(msg, _)) => return Ok(Some(msg)),
            Ok(Decoded::Incomplete { .. }) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        let n = rd.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends one request to the agent at `path` and returns its response.
pub async fn request(path: &Path, req: &ControlRequest) -> Result<ControlResponse, ControlError> {
    let io_err = |source: io::Error| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ControlError::NotRunning {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(ControlError::Refused {
                path: path.to_owned(),
            })
        }
        Err(e) => return Err(io_err(e)),
    };
    let mut out = Vec::new();
    encode_frame(req, &mut out).map_err(|source| ControlError::Frame {
        path: path.to_owned(),
        source,
    })?;
    stream.write_all(&out).await.map_err(io_err)?;
    match tokio::time::timeout(REPLY_TIMEOUT, read_frame::<ControlResponse, _>(&mut stream)).await {
        Err(_) => Err(ControlError::Timeout {
            path: path.to_owned(),
        }),
        Ok(Err(e)) => Err(io_err(e)),
        Ok(Ok(None)) => Err(ControlError::NoAnswer {
            path: path.to_owned(),
        }),
        Ok(Ok(Some(resp))) => Ok(resp),
    }
}

/// Listens on `path` (replacing a stale socket; the directory is created, the socket is
/// made mode 0600).
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let bind_err = |reason| ControlError::Bind {
        path: path.to_owned(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    csnap_proto::net::remove_stale_socket(path).map_err(bind_err)?;
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Who answers on a control socket: named in every error it sends, so that an admin
/// running csnapctl on many nodes sees which node and volume an error came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The corosync node id (cluster mode).
    pub node: Option<u32>,
    /// This host's name.
    pub host: Option<String>,
}

impl Identity {
    /// This host, with corosync node id `node` if it has one.
    pub fn this_host(node: Option<u32>) -> Identity {
        Identity {
            node,
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty()),
        }
    }

    /// Fills in who answered an `Error` (and the request's volume), keeping what the
    /// handler set.
    pub fn stamp(&self, req_volume: Option<&str>, resp: ControlResponse) -> ControlResponse {
        match resp {
            ControlResponse::Error {
                message,
                node,
                host,
                volume,
            } => ControlResponse::Error {
                message,
                node: node.or(self.node),
                host: host.or_else(|| self.host.clone()),
                volume: volume.or_else(|| req_volume.map(str::to_owned)),
            },
            other => other,
        }
    }
}

/// Serves requests with `handle` until the listener fails; each connection on its own
/// task. Errors are stamped with `identity` and the request's volume.
pub async fn serve<H, F>(listener: UnixListener, identity: Identity, handle: Arc<H>)
where
    H: Fn(ControlRequest) -> F + Send + Sync + 'static,
    F: Future<Output = ControlResponse> + Send + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(err = %e, "accepting a control connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let req = match tokio::time::timeout(
                REQUEST_TIMEOUT,
                read_frame::<ControlRequest, _>(&mut stream),
            )
            .await
            {
                Ok(Ok(Some(req))) => req,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    let resp = identity.stamp(
                        None,
                        ControlResponse::error(format!("malformed control request: {e}")),
                    );
                    let _ = write_response(&mut stream, &resp).await;
                    return;
                }
                Err(_) => return,
            };
            let volume = req.volume().map(str::to_owned);
            let resp = identity.stamp(volume.as_deref(), handle(req).await);
            if let Err(e) = write_response(&mut stream, &resp).await {
                tracing::debug!(err = %e, "control client went away before the answer");
            }
        });
    }
}

async fn write_response(stream: &mut UnixStream, resp: &ControlResponse) -> io::Result<()> {
    let mut out = Vec::new();
    encode_frame(resp, &mut out).map_err(io::Error::other)?;
    stream.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_stamped_with_node_host_and_volume() {
        let id = Identity {
            node: Some(2),
            host: Some("node-b".into()),
        };
        assert_eq!(
            id.stamp(Some("vol0"), ControlResponse::error("no")),
            ControlResponse::Error {
                message: "no".into(),
                node: Some(2),
                host: Some("node-b".into()),
                volume: Some("vol0".into()),
            }
        );
        // What the handler set stays; answers other than errors are untouched.
        let own = ControlResponse::Error {
            message: "x".into(),
            node: None,
            host: None,
            volume: Some("vol1".into()),
        };
        match id.stamp(Some("vol0"), own) {
            ControlResponse::Error { volume, node, .. } => {
                assert_eq!(volume.as_deref(), Some("vol1"));
                assert_eq!(node, Some(2));
            }
            other => panic!("{other:?}"),
        }
        let ok = ControlResponse::Status { volumes: vec![] };
        assert_eq!(id.stamp(None, ok.clone()), ok);
        assert!(Identity::this_host(None).host.is_some());
    }
}
