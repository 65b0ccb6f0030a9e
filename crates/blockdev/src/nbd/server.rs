//! The tokio shell around the sans-IO protocol core: listeners, one task per
//! connection, requests executed concurrently with replies written as they complete.

use std::fmt;
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::client::devices::AlignedVec;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::consts::{CMD_BLOCK_STATUS, REQUEST_HEADER_LEN};
use super::export::{Export, ExportInfo, Exports};
use super::handshake::{
    Handshake, HandshakeConfig, HandshakeError, HandshakeStep, Negotiated, SelectedContext,
};
use super::transmission::{
    block_status_descriptors, errno_of, validate, validate_block_status, Command, Reply,
    RequestError, RequestHeader,
};

/// Server tunables.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub handshake: HandshakeConfig,
    /// Requests executing or waiting to be written, per connection. The reader stops
    /// taking requests off the socket while this many are outstanding.
    pub max_in_flight: usize,
    /// A client must finish option haggling within this time.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake: HandshakeConfig::default(),
            max_in_flight: 64,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Why one connection ended abnormally. Never affects other connections.
#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("socket I/O failed while {context}: {source}")]
    Io {
        context: &'static str,
        source: io::Error,
    },
    #[error("client closed the connection during the handshake")]
    ClosedDuringHandshake,
    #[error("handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("listing exports failed: {0}")]
    ListExports(io::Error),
    #[error("export {name:?} has invalid block sizes: {reason}")]
    BadBlockSizes { name: String, reason: String },
    #[error("bad request: {0}")]
    Request(#[from] RequestError),
    #[error("client closed the connection in the middle of a request")]
    TruncatedRequest,
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> ConnectionError {
    move |source| ConnectionError::Io { context, source }
}

/// How a connection ended without error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// The client sent OPT_ABORT during the handshake.
    Aborted,
    /// The client sent NBD_CMD_DISC.
    Disconnected,
    /// The client closed the socket between requests.
    Closed,
    /// The server is shutting down: requests already read were answered, then the
    /// connection was closed.
    ServerShutdown,
}

/// An NBD server over a set of exports.
pub struct NbdServer {
    exports: Arc<dyn Exports>,
    config: ServerConfig,
    stopping: watch::Sender<bool>,
    connections: AtomicUsize,
    idle: Notify,
}

/// Counts a live connection; the last one out wakes `NbdServer::shutdown`.
struct ConnectionGuard<'a>(&'a NbdServer);

impl<'a> ConnectionGuard<'a> {
    fn new(server: &'a NbdServer) -> Self {
        server.connections.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard(server)
    }
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    pub fn new(exports: Arc<dyn Exports>, config: ServerConfig) -> NbdServer {
        NbdServer {
            exports,
            config,
            stopping: watch::channel(false).0,
            connections: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    /// Connections currently open (in handshake or transmission).
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting, lets every connection finish the requests it already read
    /// (the protocol asks servers to serve in-flight requests before disconnecting),
    /// then closes them. Returns whether all connections were gone within `grace`.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.stopping.send_replace(true);
        let all_closed = async {
            loop {
                let idle = self.idle.notified();
                if self.connection_count() == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(grace, all_closed).await.is_ok()
    }

    /// Resolves once `shutdown` was called.
    async fn stopped(&self) {
        let mut stopping = self.stopping.subscribe();
        // The sender lives in `self`, so this cannot fail while we are borrowed.
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }

    /// Accepts connections, each served on its own task, until `shutdown` is called.
    /// Errors of one connection are logged and never stop the listener.
    pub async fn serve(self: Arc<Self>, listener: Listener) -> io::Result<()> {
        loop {
            let accept = async {
                match &listener {
                    Listener::Tcp(l) => l.accept().await.map(|(stream, peer)| {
                        // Replies are small and latency bound; don't let Nagle hold them.
                        let _ = stream.set_nodelay(true);
                        (Box::new(stream) as Box<dyn Stream>, peer.to_string())
                    }),
                    Listener::Unix(l) => l.accept().await.map(|(stream, _)| {
                        (Box::new(stream) as Box<dyn Stream>, "unix".to_owned())
                    }),
                }
            };
            let accepted = tokio::select! {
                biased;
                _ = self.stopped() => return Ok(()),
                accepted = accept => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let server = self.clone();
                    // In the listener's span (the agent's carries the volume and node),
                    // so the connection's lines say which volume they are about.
                    tokio::spawn(
                        async move {
                            match server.serve_connection(stream).await {
                                Ok(end) => tracing::debug!(%peer, ?end, "NBD connection ended"),
                                Err(err) => tracing::warn!(%peer, %err, "NBD connection failed"),
                            }
                        }
                        .in_current_span(),
                    );
                }
                Err(err) => {
                    // Typically EMFILE: back off instead of spinning, keep serving.
                    tracing::warn!(%err, "accepting an NBD connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Serves one client connection to its end.
    pub async fn serve_connection<S>(&self, stream: S) -> Result<ConnectionEnd, ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let _guard = ConnectionGuard::new(self);
        let (mut reader, mut writer) = tokio::io::split(stream);
        let timeout = self.config.handshake_timeout;
        let negotiate = tokio::time::timeout(timeout, self.negotiate(&mut reader, &mut writer));
        let negotiated = tokio::select! {
            biased;
            _ = self.stopped() => return Ok(ConnectionEnd::ServerShutdown),
            negotiated = negotiate => negotiated,
        };
        let negotiated = negotiated.map_err(|_| ConnectionError::HandshakeTimeout(timeout))??;
        let Some((negotiated, export, leftover)) = negotiated else {
            let _ = writer.shutdown().await;
            return Ok(ConnectionEnd::Aborted);
        };
        tracing::debug!(export = %negotiated.export.name, structured = negotiated.structured_replies, "NBD transmission phase");
        let reader = std::io::Cursor::new(leftover.freeze()).chain(reader);
        transmit(
            reader,
            writer,
            export,
            negotiated,
            self.config.max_in_flight.max(1),
            self.stopped(),
        )
        .await
    }

    /// Runs the handshake; `None` when the client aborted.
    async fn negotiate<R, W>(
        &self,
        reader: &mut R,
        writer: &mut W,
    ) -> Result<Option<(Negotiated, Arc<dyn Export>, BytesMut)>, ConnectionError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut handshake = Handshake::new(self.config.handshake.clone());
        let mut opened: Option<Arc<dyn Export>> = None;
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            match handshake.step()? {
                HandshakeStep::Write(bytes) => {
                    writer
                        .write_all(&bytes)
                        .await
                        .map_err(io_err("sending a handshake reply"))?;
                    writer
                        .flush()
                        .await
                        .map_err(io_err("sending a handshake reply"))?;
                }
                HandshakeStep::ReadMore => {
                    buf.clear();
                    let n = reader
                        .read_buf(&mut buf)
                        .await
                        .map_err(io_err("reading the handshake"))?;
                    if n == 0 {
                        return Err(ConnectionError::ClosedDuringHandshake);
                    }
                    handshake.feed(&buf);
                }
                HandshakeStep::ListExports => {
                    let list = self
                        .exports
                        .list()
                        .await
                        .map_err(ConnectionError::ListExports)?;
                    handshake.exports_listed(&list)?;
                }
                HandshakeStep::OpenExport { name } => {
                    opened = match self.exports.open(&name).await {
                        Ok(found) => found,
                        Err(err) => {
                            tracing::warn!(export = %name, %err, "opening an NBD export failed");
                            None
                        }
                    };
                    let info = opened
                        .as_deref()
                        .map(|export| ExportInfo::of(&name, export));
                    if let Some(info) = &info {
                        info.block_sizes.validate().map_err(|reason| {
                            ConnectionError::BadBlockSizes {
                                name: name.clone(),
                                reason,
                            }
                        })?;
                    }
                    handshake.export_opened(info.as_ref())?;
                }
                HandshakeStep::Transmission(negotiated) => {
                    let export = opened.ok_or(HandshakeError::UnexpectedAnswer(
                        "transmission without an opened export",
                    ))?;
                    return Ok(Some((negotiated, export, handshake.into_leftover())));
                }
                HandshakeStep::Aborted => return Ok(None),
                HandshakeStep::MetaContexts { name } => {
                    // The export is opened only to ask it; OPT_GO opens it again.
                    let offered = match self.exports.open(&name).await {
                        Ok(Some(export)) => match export.meta_contexts().await {
                            Ok(offered) => Some(offered),
                            Err(err) => {
                                tracing::warn!(export = %name, %err, "listing the metadata contexts of an NBD export failed");
                                None
                            }
                        },
                        Ok(None) => None,
                        Err(err) => {
                            tracing::warn!(export = %name, %err, "opening an NBD export failed");
                            None
                        }
                    };
                    handshake.meta_contexts_found(offered.as_deref())?;
                }
            }
        }
    }
}

/// Object-safe stream for the accept loop (TCP and unix sockets alike).
trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A reply on its way to the writer, holding its in-flight slot until written.
struct Outgoing {
    reply: Reply,
    _slot: Option<OwnedSemaphorePermit>,
}

/// The transmission phase: reads requests, runs each on its own task, and lets a writer
/// task send replies in completion order.
async fn transmit<R, W>(
    reader: R,
    writer: W,
    export: Arc<dyn Export>,
    negotiated: Negotiated,
    max_in_flight: usize,
    stopped: impl std::future::Future<Output = ()>,
) -> Result<ConnectionEnd, ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel::<Outgoing>(max_in_flight + 16);
    let writer = tokio::spawn(write_replies(writer, rx));
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    // On shutdown the reader stops between (or inside) requests; what was already
    // dispatched still completes and is written below.
    let result = tokio::select! {
        biased;
        _ = stopped => Ok(ConnectionEnd::ServerShutdown),
        result = read_requests(&mut reader, &tx, &slots, &export, &negotiated) => result,
    };
    // In-flight tasks keep their own senders; the writer drains them, then ends.
    drop(tx);
    let written = writer.await;
    let end = result?;
    match written {
        Ok(Ok(())) => Ok(end),
        Ok(Err(source)) => Err(ConnectionError::Io {
            context: "sending replies",
            source,
        }),
        Err(join) => Err(ConnectionError::Io {
            context: "sending replies",
            source: io::Error::other(join.to_string()),
        }),
    }
}

async fn read_requests<R: AsyncRead + Unpin>(
    reader: &mut R,
    tx: &mpsc::Sender<Outgoing>,
    slots: &Arc<Semaphore>,
    export: &Arc<dyn Export>,
    negotiated: &Negotiated,
) -> Result<ConnectionEnd, ConnectionError> {
    let structured = negotiated.structured_replies;
    let mut header = [0u8; REQUEST_HEADER_LEN];
    loop {
        match read_full(reader, &mut header).await? {
            Fill::Eof => return Ok(ConnectionEnd::Closed),
            Fill::Partial => return Err(ConnectionError::TruncatedRequest),
            Fill::Full => {}
        }
        let request = RequestHeader::parse(&header)?;
        let validated = if request.kind == CMD_BLOCK_STATUS {
            validate_block_status(&request, &negotiated.export, negotiated.meta_contexts.len())
        } else {
            validate(&request, &negotiated.export)
        };
        let command = match validated {
            Ok(Command::Disconnect) => return Ok(ConnectionEnd::Disconnected),
            Ok(command) => command,
            Err(rejection) => {
                tracing::debug!(cookie = request.cookie, errno = rejection.errno, message = %rejection.message, "NBD request rejected");
                discard(reader, request.payload_len()).await?;
                let reply = Reply::error(
                    request.cookie,
                    rejection.errno,
                    &rejection.message,
                    structured,
                );
                if tx.send(Outgoing { reply, _slot: None }).await.is_err() {
                    return Ok(ConnectionEnd::Closed);
                }
                continue;
            }
        };
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io_err("waiting for a request slot")(io::Error::other("closed")))?;
        let payload = match command {
            Command::Write { len, .. } => read_payload(reader, len).await?,
            _ => Bytes::new(),
        };
        let export = export.clone();
        let tx = tx.clone();
        let cookie = request.cookie;
        let status = match command {
            Command::BlockStatus { .. } => Some((
                negotiated.meta_contexts.clone(),
                negotiated.export.size,
                negotiated.export.block_sizes.minimum,
            )),
            _ => None,
        };
        tokio::spawn(async move {
            let reply = match (command, status) {
                (
                    Command::BlockStatus {
                        offset,
                        len,
                        req_one,
                    },
                    Some((contexts, size, minimum)),
                ) => {
                    let request = StatusRequest {
                        offset,
                        len,
                        req_one,
                        size,
                        minimum,
                    };
                    block_status(&*export, cookie, &contexts, request).await
                }
                _ => execute(&*export, cookie, command, payload, structured).await,
            };
            // A send error means the writer is gone (client vanished): nothing to do.
            let _ = tx
                .send(Outgoing {
                    reply,
                    _slot: Some(slot),
                })
                .await;
        });
    }
}

async fn execute(
    export: &dyn Export,
    cookie: u64,
    command: Command,
    payload: Bytes,
    structured: bool,
) -> Reply {
    let done = |result: io::Result<()>, was_read: bool| match result {
        Ok(()) => Reply::done(cookie, structured, was_read),
        Err(err) => Reply::error(cookie, errno_of(&err), &err.to_string(), structured),
    };
    match command {
        Command::Read { offset, len: 0 } => {
            Reply::read_data(cookie, offset, Bytes::new(), structured)
        }
        Command::Read { offset, len } => match export.read_at(offset, len).await {
            Ok(data) if data.len() == len as usize => {
                Reply::read_data(cookie, offset, data, structured)
            }
            Ok(data) => Reply::error(
                cookie,
                super::consts::EIO,
                &format!(
                    "backend returned {} bytes for a {len}-byte read",
                    data.len()
                ),
                structured,
            ),
            Err(err) => Reply::error(cookie, errno_of(&err), &err.to_string(), structured),
        },
        Command::Write { len: 0, .. } => done(Ok(()), false),
        Command::Write { offset, fua, .. } => {
            done(export.write_at(offset, payload, fua).await, false)
        }
        Command::Flush => done(export.flush().await, false),
        Command::Trim { len: 0, .. } | Command::WriteZeroes { len: 0, .. } => done(Ok(()), false),
        Command::Trim { offset, len, fua } => {
            done(export.trim(offset, u64::from(len), fua).await, false)
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            may_trim,
            fast,
        } => done(
            export
                .write_zeroes(offset, u64::from(len), may_trim, fua, fast)
                .await,
            false,
        ),
        // Answered by `block_status` (it needs the selected contexts).
        Command::BlockStatus { .. } => Reply::error(
            cookie,
            super::consts::EINVAL,
            "BLOCK_STATUS without metadata contexts",
            structured,
        ),
        Command::Disconnect => done(Ok(()), false),
    }
}

/// One validated BLOCK_STATUS and the export facts its reply must respect.
#[derive(Clone, Copy)]
struct StatusRequest {
    offset: u64,
    len: u32,
    req_one: bool,
    size: u64,
    minimum: u32,
}

/// Asks the export about every selected context at once; one chunk per context, or one
/// error for the request if any context fails (the protocol allows no partial success).
async fn block_status(
    export: &dyn Export,
    cookie: u64,
    contexts: &[SelectedContext],
    r: StatusRequest,
) -> Reply {
    let asked = contexts.iter().map(|c| async move {
        let extents = export
            .block_status(&c.context, r.offset, u64::from(r.len))
            .await
            .map_err(|err| (errno_of(&err), format!("{}: {err}", c.context.name)))?;
        block_status_descriptors(&extents, r.offset, r.len, r.size, r.minimum, r.req_one)
            .map(|descriptors| (c.id, descriptors))
            .map_err(|message| {
                tracing::warn!(context = %c.context.name, %message, "NBD export broke the block status contract");
                (super::consts::EIO, format!("{}: {message}", c.context.name))
            })
    });
    match futures::future::try_join_all(asked).await {
        Ok(chunks) => Reply::block_status(cookie, &chunks),
        Err((errno, message)) => Reply::error(cookie, errno, &message, true),
    }
}

enum Fill {
    Full,
    Eof,
    Partial,
}

/// Fills `buf`, telling a clean end of stream (nothing read) from a truncated message.
async fn read_full<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<Fill, ConnectionError> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = match reader.read(&mut buf[filled..]).await {
            Ok(n) => n,
            // A reset between requests is how many clients hang up.
            Err(e) if filled == 0 && e.kind() == io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(io_err("reading a request")(e)),
        };
        if n == 0 {
            return Ok(if filled == 0 {
                Fill::Eof
            } else {
                Fill::Partial
            });
        }
        filled += n;
    }
    Ok(Fill::Full)
}

/// Reads a WRITE payload into one buffer of exactly its size, starting at a 4 KiB
/// boundary so an O_DIRECT export writes it as it is (no bounce buffer, no copy).
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: u32,
) -> Result<Bytes, ConnectionError> {
    let len = len as usize;
    let mut buf = AlignedVec::with_capacity(len);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        let n = (&mut *reader)
            .take(want)
            .read_buf(buf.vec_mut())
            .await
            .map_err(io_err("reading a write payload"))?;
        if n == 0 {
            return Err(ConnectionError::TruncatedRequest);
        }
    }
    Ok(buf.into_bytes())
}

/// Skips the payload of a rejected request so the next header is found.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len: u32) -> Result<(), ConnectionError> {
    if len == 0 {
        return Ok(());
    }
    let copied = tokio::io::copy(
        &mut (&mut *reader).take(u64::from(len)),
        &mut tokio::io::sink(),
    )
    .await
    .map_err(io_err("skipping a rejected payload"))?;
    if copied < u64::from(len) {
        return Err(ConnectionError::TruncatedRequest);
    }
    Ok(())
}

/// Writes replies as they arrive, batching those already queued into one vectored write.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
) -> io::Result<()> {
    const MAX_BATCH: usize = 32;
    const MAX_BATCH_BYTES: usize = 4 << 20;
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        let mut bytes = first.reply.wire_len();
        batch.push(first);
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(next) => {
                    bytes += next.reply.wire_len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        write_all_vectored(&mut writer, &batch).await?;
        batch.clear();
    }
    writer.flush().await?;
    // The peer may already be gone; closing is best effort.
    let _ = writer.shutdown().await;
    Ok(())
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &[Outgoing],
) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    for out in batch {
        slices.push(IoSlice::new(out.reply.head.as_slice()));
        if !out.reply.payload.is_empty() {
            slices.push(IoSlice::new(&out.reply.payload));
        }
    }
    let mut remaining: &mut [IoSlice<'_>] = &mut slices;
    while !remaining.is_empty() {
        let n = writer.write_vectored(remaining).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "socket accepted no bytes",
            ));
        }
        IoSlice::advance_slices(&mut remaining, n);
    }
    Ok(())
}

/// Where to listen: `HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(ListenAddr::Tcp(s.to_owned()))
            }
            _ => Err(format!("{s:?} is neither HOST:PORT nor unix:PATH")),
        }
    }
}

/// A listening socket the server accepts on.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(hostport) => {
                Ok(Listener::Tcp(TcpListener::bind(hostport.as_str()).await?))
            }
            ListenAddr::Unix(path) => Ok(Listener::Unix(UnixListener::bind(path)?)),
        }
    }

    /// Wraps an already listening socket (e.g. from socket activation). Must be called
    /// inside a tokio runtime.
    pub fn from_std(listener: super::activation::StdListener) -> io::Result<Listener> {
        use super::activation::StdListener;
        match listener {
            StdListener::Tcp(l) => {
                l.set_nonblocking(true)?;
                Ok(Listener::Tcp(TcpListener::from_std(l)?))
            }
            StdListener::Unix(l) => {
                l.set_nonblocking(true)?;
                Ok(Listener::Unix(UnixListener::from_std(l)?))
            }
        }
    }

    /// The bound address, for logs and for callers that bound port 0.
    pub fn local_description(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("tcp (address unknown: {e})")),
            Listener::Unix(l) => match l.local_addr() {
                Ok(addr) => match addr.as_pathname() {
                    Some(path) => format!("unix:{}", path.display()),
                    None => "unix:(unnamed)".to_owned(),
                },
                Err(e) => format!("unix (address unknown: {e})"),
            },
        }
    }
}
