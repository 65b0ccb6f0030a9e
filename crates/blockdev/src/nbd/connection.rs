//! The transmission phase of one NBD connection, driven by one task: it reads requests,
//! runs them concurrently and writes their replies in completion order, all from the
//! same `poll`.
//!
//! Why one task: a request used to cross four tasks (reader, a task spawned per request,
//! the device I/O, a reply writer), and on a 2-core machine those wake-ups and thread
//! switches cost more CPU than the I/O itself (docs/benchmarks.md, "Where the time
//! goes"). Here a request is read, executed and answered by the connection's own task;
//! only the device I/O leaves it. Requests still run concurrently: each is a future in a
//! [`FuturesUnordered`], polled only when its own I/O wakes it.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::consts::{CMD_BLOCK_STATUS, EINVAL, EIO, REQUEST_HEADER_LEN};
use super::export::{BoxFuture, Export, Payload};
use super::handshake::HandshakeError;
use super::handshake::{Negotiated, SelectedContext};
use super::transmission::{
    block_status_descriptors, errno_of, validate, validate_block_status, Command, Reply,
    RequestError, RequestHeader,
};
use crate::client::aligned::AlignedVec;

/// Why one connection ended abnormally. Never affects other connections.
#[derive(Debug, Error)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
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

/// Bytes asked of the socket per read while looking for request headers: many small
/// requests arrive in one read.
const READ_AHEAD: usize = 4096;
/// Replies gathered into one vectored write, and their most bytes.
const MAX_BATCH: usize = 32;
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Most buffers in one vectored write: a reply's header and payload, or a read's several
/// parts (a snapshot read gathered from the origin and the store).
const MAX_SLICES: usize = 128;
/// Requests taken off the socket in one poll before the task yields, so one busy
/// connection cannot hold a worker thread.
const MAX_REQUESTS_PER_POLL: usize = 64;

/// Serves requests on `stream` until the client disconnects or closes, the socket
/// fails, or `stopped` resolves. Every request already read is executed and answered
/// (when the socket still takes replies) before this returns, whatever the reason:
/// a write must never be abandoned half-way under its grant.
pub(super) async fn transmit<S>(
    stream: &mut S,
    leftover: BytesMut,
    export: &Arc<dyn Export>,
    negotiated: &Negotiated,
    max_in_flight: usize,
    stopped: impl Future<Output = ()>,
) -> Result<ConnectionEnd, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut stopped = pin!(stopped);
    let mut conn = Transmission {
        stream,
        export,
        negotiated,
        max_in_flight: max_in_flight.max(1),
        inbuf: leftover,
        incoming: Incoming::Header,
        in_flight: FuturesUnordered::new(),
        outgoing: VecDeque::new(),
        front_written: 0,
        read_end: None,
        write_error: None,
    };
    std::future::poll_fn(|cx| {
        if conn.read_end.is_none() && stopped.as_mut().poll(cx).is_ready() {
            conn.read_end = Some(Ok(ConnectionEnd::ServerShutdown));
        }
        conn.poll_run(cx)
    })
    .await?;
    // Replies are all written (or the socket failed); closing is best effort.
    std::future::poll_fn(|cx| conn.poll_close(cx)).await;
    conn.finish()
}

/// Where the reader is in the request stream.
enum Incoming {
    /// Waiting for (the rest of) a request header.
    Header,
    /// Receiving a WRITE's payload into a buffer aligned for O_DIRECT.
    Payload {
        command: Command,
        cookie: u64,
        buf: AlignedVec,
        len: usize,
    },
    /// Skipping a rejected request's payload; `reply` is queued once it is skipped.
    Discard { left: usize, reply: Reply },
}

struct Transmission<'a, S> {
    stream: &'a mut S,
    export: &'a Arc<dyn Export>,
    negotiated: &'a Negotiated,
    max_in_flight: usize,
    /// Bytes read from the socket and not parsed yet.
    inbuf: BytesMut,
    incoming: Incoming,
    /// Requests executing.
    in_flight: FuturesUnordered<BoxFuture<'a, Reply>>,
    /// Replies waiting for the socket, oldest first.
    outgoing: VecDeque<Reply>,
    /// Bytes of `outgoing.front()` already written.
    front_written: usize,
    /// Why no more requests are read; `None` while reading.
    read_end: Option<Result<ConnectionEnd, ConnectionError>>,
    /// The socket refused a reply: later replies are dropped.
    write_error: Option<io::Error>,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Transmission<'a, S> {
    /// Moves requests in, replies out and running requests on, until nothing can
    /// progress (`Pending`) or the connection is done (`Ready`).
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectionError>> {
        let mut requests_taken = 0;
        loop {
            let mut progressed = false;
            while let Poll::Ready(Some(reply)) = self.in_flight.poll_next_unpin(cx) {
                self.queue(reply);
                progressed = true;
            }
            progressed |= self.poll_write(cx);
            if self.read_end.is_none() && self.room() {
                if requests_taken >= MAX_REQUESTS_PER_POLL {
                    // Let other tasks run; come back at once.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                match self.poll_read_request(cx) {
                    Poll::Ready(()) => {
                        requests_taken += 1;
                        progressed = true;
                    }
                    Poll::Pending => {}
                }
            }
            if self.read_end.is_some() && self.in_flight.is_empty() && self.outgoing.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }

    /// Whether another request may be taken: requests executing and replies not yet
    /// written together stay under the connection's limit.
    fn room(&self) -> bool {
        self.in_flight.len() + self.outgoing.len() < self.max_in_flight
    }

    fn queue(&mut self, reply: Reply) {
        if self.write_error.is_none() {
            self.outgoing.push_back(reply);
        }
    }

    /// Reads and dispatches at most one request; `Ready` when something happened
    /// (a request started, a reply queued, or reading ended).
    fn poll_read_request(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.incoming {
                Incoming::Header => {
                    if self.inbuf.len() >= REQUEST_HEADER_LEN {
                        let header = self.inbuf.split_to(REQUEST_HEADER_LEN);
                        self.start_request(&header);
                        return Poll::Ready(());
                    }
                }
                Incoming::Payload { buf, len, .. } => {
                    let want = *len - buf.len();
                    let have = self.inbuf.len().min(want);
                    if have > 0 {
                        buf.vec_mut().extend_from_slice(&self.inbuf[..have]);
                        self.inbuf.advance(have);
                    }
                    if buf.len() == *len {
                        let Incoming::Payload {
                            command,
                            cookie,
                            buf,
                            ..
                        } = std::mem::replace(&mut self.incoming, Incoming::Header)
                        else {
                            unreachable!("matched Payload above")
                        };
                        self.dispatch(command, cookie, buf.into_bytes());
                        return Poll::Ready(());
                    }
                    // The rest straight from the socket into the aligned buffer: no copy.
                    let want = (*len - buf.len()) as u64;
                    match poll_read_some(&mut *self.stream, want, buf.vec_mut(), cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0)) => {
                            return self.end_reading(Err(ConnectionError::TruncatedRequest))
                        }
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Ready(Err(e)) => {
                            return self.end_reading(Err(ConnectionError::Io {
                                context: "reading a write payload",
                                source: e,
                            }))
                        }
                    }
                }
                Incoming::Discard { left, .. } => {
                    let skip = self.inbuf.len().min(*left);
                    self.inbuf.advance(skip);
                    *left -= skip;
                    if *left == 0 {
                        let Incoming::Discard { reply, .. } =
                            std::mem::replace(&mut self.incoming, Incoming::Header)
                        else {
                            unreachable!("matched Discard above")
                        };
                        self.queue(reply);
                        return Poll::Ready(());
                    }
                }
            }
            // Need more bytes in `inbuf`.
            if self.inbuf.capacity() - self.inbuf.len() < REQUEST_HEADER_LEN {
                self.inbuf.reserve(READ_AHEAD);
            }
            let at_boundary = matches!(self.incoming, Incoming::Header) && self.inbuf.is_empty();
            match poll_read_some(&mut *self.stream, READ_AHEAD as u64, &mut self.inbuf, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if at_boundary => {
                    return self.end_reading(Ok(ConnectionEnd::Closed))
                }
                Poll::Ready(Ok(0)) => {
                    return self.end_reading(Err(ConnectionError::TruncatedRequest))
                }
                Poll::Ready(Ok(_)) => {}
                // A reset between requests is how many clients hang up.
                Poll::Ready(Err(e))
                    if at_boundary && e.kind() == io::ErrorKind::ConnectionReset =>
                {
                    return self.end_reading(Ok(ConnectionEnd::Closed))
                }
                Poll::Ready(Err(e)) => {
                    return self.end_reading(Err(ConnectionError::Io {
                        context: "reading a request",
                        source: e,
                    }))
                }
            }
        }
    }

    fn end_reading(&mut self, end: Result<ConnectionEnd, ConnectionError>) -> Poll<()> {
        self.read_end = Some(end);
        Poll::Ready(())
    }

    /// Validates one request header and starts it, or queues its rejection.
    fn start_request(&mut self, header: &[u8]) {
        let negotiated = self.negotiated;
        let structured = negotiated.structured_replies;
        let request = match RequestHeader::parse(header) {
            Ok(request) => request,
            Err(err) => {
                self.read_end = Some(Err(err.into()));
                return;
            }
        };
        let validated = if request.kind == CMD_BLOCK_STATUS {
            validate_block_status(&request, &negotiated.export, negotiated.meta_contexts.len())
        } else {
            validate(&request, &negotiated.export)
        };
        match validated {
            Ok(Command::Disconnect) => self.read_end = Some(Ok(ConnectionEnd::Disconnected)),
            Ok(command @ Command::Write { len, .. }) if len > 0 => {
                self.incoming = Incoming::Payload {
                    command,
                    cookie: request.cookie,
                    buf: AlignedVec::with_capacity(len as usize),
                    len: len as usize,
                };
            }
            Ok(command) => self.dispatch(command, request.cookie, Bytes::new()),
            Err(rejection) => {
                tracing::debug!(cookie = request.cookie, errno = rejection.errno, message = %rejection.message, "NBD request rejected");
                let reply = Reply::error(
                    request.cookie,
                    rejection.errno,
                    &rejection.message,
                    structured,
                );
                self.incoming = Incoming::Discard {
                    left: request.payload_len() as usize,
                    reply,
                };
            }
        }
    }

    /// Starts executing a validated request; its reply is queued when it completes.
    fn dispatch(&mut self, command: Command, cookie: u64, payload: Bytes) {
        let export: &'a dyn Export = &**self.export;
        let negotiated: &'a Negotiated = self.negotiated;
        let structured = negotiated.structured_replies;
        let future: BoxFuture<'a, Reply> = match command {
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => Box::pin(block_status(
                export,
                cookie,
                &negotiated.meta_contexts,
                StatusRequest {
                    offset,
                    len,
                    req_one,
                    size: negotiated.export.size,
                    minimum: negotiated.export.block_sizes.minimum,
                },
            )),
            command => Box::pin(execute(export, cookie, command, payload, structured)),
        };
        self.in_flight.push(future);
    }

    /// Writes queued replies, several per vectored write; `true` if any byte went out.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progressed = false;
        while !self.outgoing.is_empty() && self.write_error.is_none() {
            let mut slices: [IoSlice<'_>; MAX_SLICES] = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            let mut bytes = 0;
            let mut skip = self.front_written;
            'replies: for reply in self.outgoing.iter().take(MAX_BATCH) {
                let parts = std::iter::once(reply.head.as_slice())
                    .chain(reply.payload.parts().map(|p| &p[..]));
                for part in parts {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    if count == MAX_SLICES {
                        // The rest goes in the next write.
                        break 'replies;
                    }
                    slices[count] = IoSlice::new(&part[skip..]);
                    bytes += part.len() - skip;
                    skip = 0;
                    count += 1;
                }
                if bytes >= MAX_BATCH_BYTES {
                    break;
                }
            }
            let written =
                match Pin::new(&mut *self.stream).poll_write_vectored(cx, &slices[..count]) {
                    Poll::Pending => return progressed,
                    Poll::Ready(Ok(0)) => Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "socket accepted no bytes",
                    )),
                    Poll::Ready(result) => result,
                };
            match written {
                Ok(n) => {
                    progressed = true;
                    self.advance_written(n);
                }
                Err(e) => {
                    // The client is gone: stop reading, drop replies, but let what runs finish.
                    self.write_error = Some(e);
                    self.outgoing.clear();
                    self.front_written = 0;
                    if self.read_end.is_none() {
                        self.read_end = Some(Ok(ConnectionEnd::Closed));
                    }
                    return true;
                }
            }
        }
        progressed
    }

    /// Counts `n` more bytes written, dropping the replies written in full.
    fn advance_written(&mut self, mut n: usize) {
        while let Some(front) = self.outgoing.front() {
            let left = front.wire_len() - self.front_written;
            if n < left {
                self.front_written += n;
                return;
            }
            n -= left;
            self.front_written = 0;
            self.outgoing.pop_front();
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.write_error.is_some() {
            return Poll::Ready(());
        }
        let mut stream = Pin::new(&mut *self.stream);
        if let Poll::Ready(Err(e)) = stream.as_mut().poll_flush(cx) {
            self.write_error = Some(e);
            return Poll::Ready(());
        }
        // The peer may already be gone; closing is best effort.
        stream.poll_shutdown(cx).map(|_| ())
    }

    fn finish(self) -> Result<ConnectionEnd, ConnectionError> {
        let end = self.read_end.unwrap_or(Ok(ConnectionEnd::ServerShutdown))?;
        match self.write_error {
            Some(source) => Err(ConnectionError::Io {
                context: "sending replies",
                source,
            }),
            None => Ok(end),
        }
    }
}

/// One read of at most `limit` bytes from `stream`, appended to `buf`. (`read_buf` is
/// cancel-safe: a `Pending` read took nothing, so a fresh future per poll is fine.)
fn poll_read_some<R: AsyncRead + Unpin>(
    stream: &mut R,
    limit: u64,
    buf: &mut impl BufMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut limited = AsyncReadExt::take(stream, limit);
    let read = pin!(limited.read_buf(buf));
    read.poll(cx)
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
            Reply::read_data(cookie, offset, Payload::default(), structured)
        }
        Command::Read { offset, len } => match export.read_at(offset, len).await {
            Ok(data) if data.len() == len as usize => {
                Reply::read_data(cookie, offset, data, structured)
            }
            Ok(data) => Reply::error(
                cookie,
                EIO,
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
            EINVAL,
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
                (EIO, format!("{}: {message}", c.context.name))
            })
    });
    match futures::future::try_join_all(asked).await {
        Ok(chunks) => Reply::block_status(cookie, &chunks),
        Err((errno, message)) => Reply::error(cookie, errno, &message, true),
    }
}
