//! The tokio shell around the sans-IO protocol core: listeners, one task per
//! connection, requests executed concurrently with replies written as they complete.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use csnap_proto::net::Listener;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use super::connection::{ConnectionEnd, ConnectionError};
use super::export::{Export, ExportInfo, Exports};
use super::handshake::{
    Handshake, HandshakeConfig, HandshakeError, HandshakeInput, HandshakeOutput, Negotiated,
};

/// Server tunables.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The negotiation's tunables.
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

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> ConnectionError {
    move |source| ConnectionError::Io { context, source }
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
    /// A server of `exports`; it serves once given a listener or a connection.
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
    pub async fn serve(self: Arc<Self>, listener: Listener) {
        let stopped = self.stopped();
        listener
            .accept_until(stopped, |stream, peer| {
                let server = self.clone();
                // In the listener's span (the agent's carries the volume and node), so the
                // connection's lines say which volume they are about.
                tokio::spawn(
                    async move {
                        match server.serve_connection(stream).await {
                            Ok(end) => tracing::debug!(%peer, ?end, "NBD connection ended"),
                            Err(err) => tracing::warn!(%peer, %err, "NBD connection failed"),
                        }
                    }
                    .in_current_span(),
                );
            })
            .await;
    }

    /// Serves one client connection to its end.
    pub async fn serve_connection<S>(&self, stream: S) -> Result<ConnectionEnd, ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let _guard = ConnectionGuard::new(self);
        let mut stream = Box::pin(stream);
        let timeout = self.config.handshake_timeout;
        let negotiate = tokio::time::timeout(timeout, self.negotiate(&mut stream));
        let negotiated = tokio::select! {
            biased;
            _ = self.stopped() => return Ok(ConnectionEnd::ServerShutdown),
            negotiated = negotiate => negotiated,
        };
        let negotiated = negotiated.map_err(|_| ConnectionError::HandshakeTimeout(timeout))??;
        let Some((negotiated, export, leftover)) = negotiated else {
            let _ = stream.shutdown().await;
            return Ok(ConnectionEnd::Aborted);
        };
        tracing::debug!(export = %negotiated.export.name, structured = negotiated.structured_replies, "NBD transmission phase");
        super::connection::transmit(
            &mut stream,
            leftover,
            &export,
            &negotiated,
            self.config.max_in_flight,
            self.stopped(),
        )
        .await
    }

    /// Runs the handshake; `None` when the client aborted.
    async fn negotiate<S>(
        &self,
        stream: &mut S,
    ) -> Result<Option<(Negotiated, Arc<dyn Export>, BytesMut)>, ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut handshake = Handshake::new(self.config.handshake.clone());
        let mut opened: Option<Arc<dyn Export>> = None;
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            match handshake.poll_output()? {
                HandshakeOutput::Write(bytes) => {
                    stream
                        .write_all(&bytes)
                        .await
                        .map_err(io_err("sending a handshake reply"))?;
                    stream
                        .flush()
                        .await
                        .map_err(io_err("sending a handshake reply"))?;
                }
                HandshakeOutput::ReadMore => {
                    buf.clear();
                    let n = stream
                        .read_buf(&mut buf)
                        .await
                        .map_err(io_err("reading the handshake"))?;
                    if n == 0 {
                        return Err(ConnectionError::ClosedDuringHandshake);
                    }
                    handshake.handle(HandshakeInput::Bytes(&buf))?;
                }
                HandshakeOutput::ListExports => {
                    let list = self
                        .exports
                        .list()
                        .await
                        .map_err(ConnectionError::ListExports)?;
                    handshake.handle(HandshakeInput::ExportsListed(&list))?;
                }
                HandshakeOutput::OpenExport { name } => {
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
                    handshake.handle(HandshakeInput::ExportOpened(info.as_ref()))?;
                }
                HandshakeOutput::Transmission(negotiated) => {
                    let export = opened.ok_or(HandshakeError::UnexpectedAnswer(
                        "transmission without an opened export",
                    ))?;
                    return Ok(Some((negotiated, export, handshake.into_leftover())));
                }
                HandshakeOutput::Aborted => return Ok(None),
                HandshakeOutput::MetaContexts { name } => {
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
                    handshake.handle(HandshakeInput::MetaContexts(offered.as_deref()))?;
                }
            }
        }
    }
}
