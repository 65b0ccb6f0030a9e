//! The agent's local control socket (unix stream, mode 0600): framed [`ControlRequest`]s
//! in, one framed [`ControlResponse`] out per request, in request order. Most csnapctl
//! commands send one request per connection; export-diff and import-diff keep one
//! connection open with many requests pipelined on it ([`Pipeline`]), which the agent
//! carries out concurrently (up to [`PIPELINE_DEPTH`] at once) and answers in order.

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use csnap_proto::control::{ControlRequest, ControlResponse};
use csnap_proto::{decode_frame, encode_frame, Decoded, FrameError};
use futures::StreamExt as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Longest a peer may take to send its (first) request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a connection may stay idle between two requests before the agent closes it.
/// Long: an export piped into a stalled consumer (ssh over a slow link) sends its next
/// request only when its output drains, and a peer that is gone closes the socket anyway.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Requests of one connection the agent carries out at once; further ones wait unread on
/// the socket until the oldest is answered.
pub const PIPELINE_DEPTH: usize = 64;
/// Bytes read from the socket at once (a frame is at most `MAX_FRAME`).
const READ_AT_ONCE: usize = 256 << 10;

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
    /// The agent closed a pipelined connection with requests unanswered.
    #[error("the agent at {path} closed the connection after {answered} answers, with {unanswered} requests unanswered (the agent stopped or restarted, or it is older than pipelined control connections)")]
    ClosedMidPipeline {
        path: PathBuf,
        answered: u64,
        unanswered: usize,
    },
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

/// Reads frames from a byte stream, keeping what follows a frame for the next one.
struct FrameReader<R> {
    rd: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(rd: R) -> Self {
        FrameReader {
            rd,
            buf: Vec::new(),
        }
    }

    /// The next frame, or `None` at a clean end of the stream (nothing buffered).
    async fn next<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, io::Error> {
        loop {
            let need = match decode_frame::<T>(&self.buf) {
                Ok(Decoded::Frame(msg, used)) => {
                    self.buf.drain(..used);
                    return Ok(Some(msg));
                }
                Ok(Decoded::Incomplete { need }) => need,
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            };
            // Room for the rest of the frame in one go where the length is known.
            let at = self.buf.len();
            let room = need.saturating_sub(at).clamp(4096, READ_AT_ONCE);
            self.buf.resize(at + room, 0);
            let n = self.rd.read(&mut self.buf[at..]).await;
            self.buf.truncate(at + *n.as_ref().unwrap_or(&0));
            match n? {
                0 if self.buf.is_empty() => return Ok(None),
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                _ => {}
            }
        }
    }
}

async fn read_frame<T: serde::de::DeserializeOwned, R: AsyncRead + Unpin>(
    rd: &mut R,
) -> Result<Option<T>, io::Error> {
    FrameReader::new(rd).next().await
}

fn connect_error(path: &Path, e: io::Error) -> ControlError {
    match e.kind() {
        io::ErrorKind::NotFound => ControlError::NotRunning {
            path: path.to_owned(),
        },
        io::ErrorKind::ConnectionRefused => ControlError::Refused {
            path: path.to_owned(),
        },
        _ => ControlError::Io {
            path: path.to_owned(),
            source: e,
        },
    }
}

/// Sends one request to the agent at `path` and returns its response.
pub async fn request(path: &Path, req: &ControlRequest) -> Result<ControlResponse, ControlError> {
    let io_err = |source: io::Error| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|e| connect_error(path, e))?;
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
        Ok(Err(e)) if e.kind() != io::ErrorKind::UnexpectedEof => Err(io_err(e)),
        Ok(Err(_)) | Ok(Ok(None)) => Err(ControlError::NoAnswer {
            path: path.to_owned(),
        }),
        Ok(Ok(Some(resp))) => Ok(resp),
    }
}

/// One control connection with many requests in flight: requests are queued with
/// [`Pipeline::send`] (written by a task of their own, so a full socket never stops the
/// answers being read) and answered, in order, by [`Pipeline::recv`]. The caller bounds
/// how many are unanswered, and sends a request that depends on others (a flush after
/// writes) only after their answers came: the agent carries pipelined requests out
/// concurrently.
pub struct Pipeline {
    path: PathBuf,
    queue: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    writer: tokio::task::JoinHandle<()>,
    answers: FrameReader<tokio::net::unix::OwnedReadHalf>,
    unanswered: usize,
    answered: u64,
}

impl Pipeline {
    /// Connects to the agent at `path`.
    pub async fn open(path: &Path) -> Result<Pipeline, ControlError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| connect_error(path, e))?;
        let (rd, mut wr) = stream.into_split();
        let (queue, mut frames) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let writer = tokio::spawn(async move {
            while let Some(frame) = frames.recv().await {
                // A failed write shows as the connection closing under `recv`.
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
            }
        });
        Ok(Pipeline {
            path: path.to_owned(),
            queue,
            writer,
            answers: FrameReader::new(rd),
            unanswered: 0,
            answered: 0,
        })
    }

    /// Requests sent and not answered yet.
    pub fn unanswered(&self) -> usize {
        self.unanswered
    }

    /// Queues `req`; its answer comes from `recv` after those of the requests before it.
    pub fn send(&mut self, req: &ControlRequest) -> Result<(), ControlError> {
        let mut frame = Vec::new();
        encode_frame(req, &mut frame).map_err(|source| ControlError::Frame {
            path: self.path.clone(),
            source,
        })?;
        self.queue.send(frame).map_err(|_| self.closed())?;
        self.unanswered += 1;
        Ok(())
    }

    /// The answer to the oldest unanswered request.
    pub async fn recv(&mut self) -> Result<ControlResponse, ControlError> {
        let answer = tokio::time::timeout(REPLY_TIMEOUT, self.answers.next::<ControlResponse>());
        match answer.await {
            Err(_) => Err(ControlError::Timeout {
                path: self.path.clone(),
            }),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(self.closed()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => Err(ControlError::Io {
                path: self.path.clone(),
                source: e,
            }),
            Ok(Err(_)) | Ok(Ok(None)) => Err(self.closed()),
            Ok(Ok(Some(resp))) => {
                self.unanswered = self.unanswered.saturating_sub(1);
                self.answered += 1;
                Ok(resp)
            }
        }
    }

    fn closed(&self) -> ControlError {
        ControlError::ClosedMidPipeline {
            path: self.path.clone(),
            answered: self.answered,
            unanswered: self.unanswered.max(1),
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.writer.abort();
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
/// task, its requests carried out concurrently (up to [`PIPELINE_DEPTH`]) and answered in
/// order. Errors are stamped with `identity` and the request's volume.
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
        tokio::spawn(serve_connection(stream, identity.clone(), handle.clone()));
    }
}

/// What the agent does with one request read from a connection.
enum Incoming {
    /// Carried out on a task of its own; answered once it completes.
    Run(tokio::task::JoinHandle<ControlResponse>),
    /// Answered with this, then the connection is closed (it was malformed).
    Refuse(ControlResponse),
}

async fn serve_connection<H, F>(stream: UnixStream, identity: Identity, handle: Arc<H>)
where
    H: Fn(ControlRequest) -> F + Send + Sync + 'static,
    F: Future<Output = ControlResponse> + Send + 'static,
{
    let (rd, mut wr) = stream.into_split();
    let requests = futures::stream::unfold(
        (
            FrameReader::new(rd),
            REQUEST_TIMEOUT,
            false,
            handle,
            identity,
        ),
        |(mut reader, wait, stop, handle, identity)| async move {
            if stop {
                return None;
            }
            let incoming = match tokio::time::timeout(wait, reader.next::<ControlRequest>()).await {
                Ok(Ok(Some(req))) => {
                    let volume = req.volume().map(str::to_owned);
                    let task = handle(req);
                    let stamp = identity.clone();
                    Incoming::Run(tokio::spawn(async move {
                        stamp.stamp(volume.as_deref(), task.await)
                    }))
                }
                // The peer is done (or idle for too long, or gone).
                Ok(Ok(None)) | Err(_) => return None,
                Ok(Err(e)) if e.kind() != io::ErrorKind::InvalidData => return None,
                Ok(Err(e)) => Incoming::Refuse(identity.stamp(
                    None,
                    ControlResponse::error(format!("malformed control request: {e}")),
                )),
            };
            let stop = matches!(incoming, Incoming::Refuse(_));
            Some((incoming, (reader, IDLE_TIMEOUT, stop, handle, identity)))
        },
    );
    let answers = requests
        .map(|incoming| async move {
            match incoming {
                Incoming::Run(task) => task.await.unwrap_or_else(|e| {
                    ControlResponse::error(format!(
                        "the agent failed to carry out the request: {e}"
                    ))
                }),
                Incoming::Refuse(resp) => resp,
            }
        })
        .buffered(PIPELINE_DEPTH);
    futures::pin_mut!(answers);
    while let Some(resp) = answers.next().await {
        if let Err(e) = write_response(&mut wr, &resp).await {
            tracing::debug!(err = %e, "control client went away before the answer");
            return;
        }
    }
}

async fn write_response(
    stream: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &ControlResponse,
) -> io::Result<()> {
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

    fn flush(volume: &str) -> ControlRequest {
        ControlRequest::Flush {
            volume: volume.to_owned(),
        }
    }

    #[tokio::test]
    async fn pipelined_requests_run_at_once_and_are_answered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let listener = bind(&path).unwrap();
        // Request i takes (20 - i) * 10 ms: the later ones finish first.
        let handler = Arc::new(|req: ControlRequest| async move {
            let v = req.volume().unwrap_or_default().to_owned();
            let i: u64 = v.parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis((20 - i) * 10)).await;
            ControlResponse::Done { volume: v }
        });
        let server = tokio::spawn(serve(listener, Identity::default(), handler));

        let started = std::time::Instant::now();
        let mut pipe = Pipeline::open(&path).await.unwrap();
        for i in 0..20 {
            pipe.send(&flush(&i.to_string())).unwrap();
        }
        assert_eq!(pipe.unanswered(), 20);
        for i in 0..20 {
            match pipe.recv().await.unwrap() {
                ControlResponse::Done { volume } => assert_eq!(volume, i.to_string()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(pipe.unanswered(), 0);
        // One after another they would take 2.1 s.
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        // A one-request connection still gets its one answer.
        assert_eq!(
            request(&path, &flush("19")).await.unwrap(),
            ControlResponse::Done {
                volume: "19".into()
            }
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_connection_closed_mid_pipeline_says_how_far_it_got() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let listener = bind(&path).unwrap();
        // An agent that answers one request per connection and closes it (as before
        // pipelining), or one that stops.
        let old_agent = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let _ = read_frame::<ControlRequest, _>(&mut stream).await;
            let (_, mut wr) = stream.into_split();
            write_response(&mut wr, &ControlResponse::Done { volume: "v".into() })
                .await
                .unwrap();
        });
        let mut pipe = Pipeline::open(&path).await.unwrap();
        for _ in 0..3 {
            pipe.send(&flush("v")).unwrap();
        }
        assert!(matches!(
            pipe.recv().await,
            Ok(ControlResponse::Done { .. })
        ));
        let err = pipe.recv().await.unwrap_err();
        assert!(
            matches!(
                err,
                ControlError::ClosedMidPipeline {
                    answered: 1,
                    unanswered: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("closed the connection after 1 answers"),
            "{err}"
        );
        old_agent.await.unwrap();
    }
}
