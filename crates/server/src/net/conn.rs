//! Per-connection tasks: a reader that decodes client frames and feeds them to the engine
//! thread, and a writer that drains the connection's bounded send queue.

use super::driver::{Input, Outgoing};
use super::lease::ServingLease;
use crate::engine::ConnId;
use csnap_proto::auth::FrameKey;
use csnap_proto::{ClientFrame, FrameCodec, FrameError, ServerFrame};
use futures::{SinkExt as _, StreamExt as _};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

type Codec = FrameCodec<ClientFrame, ServerFrame>;

/// What every connection of one server shares.
#[derive(Clone)]
pub(crate) struct ConnShared {
    /// To the engine thread.
    pub net_tx: mpsc::Sender<Input>,
    /// Bound of each connection's send queue, in frames.
    pub queue_frames: usize,
    /// Cancelled when the whole server stops.
    pub server_stop: CancellationToken,
    /// No frame is sent once it has run out.
    pub lease: Arc<ServingLease>,
}

/// Registers a new connection with the engine thread, then starts its reader and writer.
/// `permit` (the connection-count slot) is released when both tasks have ended.
pub(crate) async fn serve_connection<S>(
    stream: S,
    conn: ConnId,
    peer: String,
    shared: ConnShared,
    permit: OwnedSemaphorePermit,
) where
    S: csnap_proto::net::Stream,
{
    let ConnShared {
        net_tx,
        queue_frames,
        server_stop,
        lease,
    } = shared;
    let (rd, wr) = tokio::io::split(stream);
    let (out_tx, out_rx) = mpsc::channel(queue_frames.max(1));
    let (open_key_tx, open_key) = watch::channel(None);
    // Cancelled to drop the connection at once, and when the whole server stops.
    let cancel = server_stop.child_token();
    let registered = net_tx
        .send(Input::Connected {
            conn,
            peer: peer.clone(),
            outgoing: out_tx,
            open_key: open_key_tx,
            cancel: cancel.clone(),
        })
        .await;
    if registered.is_err() {
        // The engine thread is gone (shutting down): drop the socket.
        return;
    }
    let permit = Arc::new(permit);
    tokio::spawn(
        write_loop(
            wr,
            conn,
            out_rx,
            net_tx.clone(),
            cancel.clone(),
            permit.clone(),
            lease,
        )
        .in_current_span(),
    );
    tokio::spawn(read_loop(rd, conn, open_key, net_tx, cancel, permit).in_current_span());
}

/// Frames a client sends before its frames are sealed: `Hello` and `AuthResponse`.
const PLAIN_CLIENT_FRAMES: u32 = 2;

async fn read_loop<R: AsyncRead + Send + Unpin>(
    rd: R,
    conn: ConnId,
    mut open_key: watch::Receiver<Option<FrameKey>>,
    net_tx: mpsc::Sender<Input>,
    cancel: CancellationToken,
    _permit: Arc<OwnedSemaphorePermit>,
) {
    let mut frames = FramedRead::new(rd, Codec::new());
    let mut plain_frames = 0u32;
    loop {
        if plain_frames == PLAIN_CLIENT_FRAMES {
            // The engine decided the key when it answered Hello with the challenge, and the
            // client can only answer a challenge it saw: the key is there or the engine is
            // closing this connection (a client that did not wait for the challenge).
            let key = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                key = open_key.wait_for(Option::is_some) => match key {
                    Ok(key) => key.clone(),
                    Err(_) => return,
                },
            };
            if let Some(key) = key {
                frames.decoder_mut().open_from_now(&key);
            }
            plain_frames += 1;
        }
        let item = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            item = frames.next() => item,
        };
        let input = match item {
            Some(Ok(frame)) => {
                if plain_frames < PLAIN_CLIENT_FRAMES {
                    plain_frames += 1;
                }
                Input::Frame { conn, frame }
            }
            Some(Err(FrameError::Io(e))) => {
                tracing::debug!(conn, error = %e, "connection read failed");
                Input::Disconnected { conn }
            }
            Some(Err(e)) => {
                // A framing error cannot be resynchronised: the engine answers and closes,
                // and nothing more is read from this stream.
                let _ = net_tx
                    .send(Input::BadFrame {
                        conn,
                        error: crate::engine::Failure::new(e),
                    })
                    .await;
                return;
            }
            None => Input::Disconnected { conn },
        };
        let last = matches!(input, Input::Disconnected { .. });
        // A full engine queue makes this wait: backpressure onto the client's socket.
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            sent = net_tx.send(input) => {
                if sent.is_err() || last {
                    return;
                }
            }
        }
    }
}

async fn write_loop<W: AsyncWrite + Send + Unpin>(
    wr: W,
    conn: ConnId,
    mut out_rx: mpsc::Receiver<Outgoing>,
    net_tx: mpsc::Sender<Input>,
    cancel: CancellationToken,
    _permit: Arc<OwnedSemaphorePermit>,
    lease: Arc<ServingLease>,
) {
    let mut sink = FramedWrite::new(wr, Codec::new());
    let result: Result<(), FrameError> = async {
        loop {
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                next = out_rx.recv() => next,
            };
            match next {
                Some(Outgoing::Frame(frame)) => {
                    // Batch whatever else is queued into one flush.
                    let mut batch = vec![frame];
                    let mut close = false;
                    let mut seal = None;
                    while batch.len() < 64 {
                        match out_rx.try_recv() {
                            Ok(Outgoing::Frame(f)) => batch.push(f),
                            Ok(Outgoing::Close) => {
                                close = true;
                                break;
                            }
                            Ok(Outgoing::Seal(key)) => {
                                // Frames after this one are sealed: write the batch first.
                                seal = Some(key);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if lease.expired() {
                        // Replies queued before the lease ran out are not sent after it:
                        // the engine thread is stopping the server and closing everything.
                        cancel.cancel();
                        return Ok(());
                    }
                    let write = async {
                        for f in batch {
                            sink.feed(f).await?;
                        }
                        sink.flush().await
                    };
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return Ok(()),
                        r = write => r?,
                    }
                    if let Some(key) = seal {
                        sink.encoder_mut().seal_from_now(&key);
                    }
                    if close {
                        return finish(&mut sink, &cancel).await;
                    }
                }
                Some(Outgoing::Seal(key)) => sink.encoder_mut().seal_from_now(&key),
                Some(Outgoing::Close) => return finish(&mut sink, &cancel).await,
                // The engine thread dropped the connection.
                None => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(conn, error = %e, "connection write failed");
        // Harmless if the engine already dropped the connection.
        let _ = net_tx.send(Input::Disconnected { conn }).await;
    }
    cancel.cancel();
}

/// Closes after everything queued was sent: shut down the write side so the client sees
/// EOF after the last frame.
async fn finish<W: AsyncWrite + Unpin>(
    sink: &mut FramedWrite<W, Codec>,
    cancel: &CancellationToken,
) -> Result<(), FrameError> {
    let shutdown = async {
        sink.flush().await?;
        sink.get_mut().shutdown().await?;
        Ok::<(), FrameError>(())
    };
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Ok(()),
        r = tokio::time::timeout(std::time::Duration::from_secs(5), shutdown) => {
            r.unwrap_or(Ok(()))
        }
    }
}
