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

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("agent not running at {path} (no socket there)")]
    NotRunning { path: PathBuf },
    #[error("agent not running at {path} (connection refused; stale socket?)")]
    Refused { path: PathBuf },
    #[error("cannot talk to the agent at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("bad answer from the agent at {path}: {source}")]
    Frame { path: PathBuf, source: FrameError },
    #[error("the agent at {path} closed the connection without answering")]
    NoAnswer { path: PathBuf },
    #[error("the agent at {path} did not answer within {0:?}", REPLY_TIMEOUT)]
    Timeout { path: PathBuf },
    /// `reason` is in the message and deliberately not a `#[source]`, so a printer of the
    /// whole chain (`{:#}`) does not say it twice.
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
    if let Some(holder) = csnap_server::net::holder::unix_socket_holder(path) {
        return Err(bind_err(io::Error::new(
            io::ErrorKind::AddrInUse,
            csnap_server::net::holder::in_use_message(&holder),
        )));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Serves requests with `handle` until the listener fails; each connection on its own task.
pub async fn serve<H, F>(listener: UnixListener, handle: Arc<H>)
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
                    let resp = ControlResponse::Error {
                        message: format!("malformed control request: {e}"),
                    };
                    let _ = write_response(&mut stream, &resp).await;
                    return;
                }
                Err(_) => return,
            };
            let resp = handle(req).await;
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
