//! [`CorosyncQuorum`]: the local node's quorum state as a tokio stream (rust-corosync's
//! quorum binding, model V1, tracking changes).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use futures::Stream;
use rust_corosync::quorum;
use rust_corosync::{DispatchFlags, TrackFlags};
use tokio::io::unix::AsyncFd;

use super::{call_error, connect_error, cs_error_name, register_fd, LibraryFd};
use crate::{GroupError, NodeId, Quorum, QuorumEvent, RingId};

/// Where the quorum callback of one handle puts its events; the handle's context value is
/// this sink's address. Boxed, alive until the handle is finalized.
#[derive(Default)]
struct QuorumSink {
    events: Mutex<VecDeque<QuorumEvent>>,
}

/// rust-corosync calls this (a plain `fn`) from inside our `quorum::dispatch`.
fn on_quorum_notification(
    handle: &quorum::Handle,
    quorate: bool,
    ring: quorum::RingId,
    members: Vec<rust_corosync::NodeId>,
) {
    let Ok(context) = quorum::context_get(handle) else {
        return;
    };
    if context == 0 {
        return;
    }
    // SAFETY: the context was set to the address of the connection's boxed sink, which
    // outlives the handle; callbacks only run inside our dispatch.
    let sink = unsafe { &*(context as usize as *const QuorumSink) };
    let mut members: Vec<NodeId> = members.into_iter().map(|n| NodeId(u32::from(n))).collect();
    members.sort();
    let event = QuorumEvent {
        quorate,
        ring: RingId {
            node: NodeId(u32::from(ring.nodeid)),
            seq: ring.seq,
        },
        members,
    };
    sink.events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push_back(event);
}

/// Follows quorum on the local node. The first item is the current state (corosync sends
/// it when tracking starts), then one item per change. A lost connection to corosync is
/// yielded as [`GroupError::Disconnected`], after which the stream ends.
pub struct CorosyncQuorum {
    /// Dropped before the handle (the library owns the fd).
    readiness: Option<AsyncFd<LibraryFd>>,
    /// `None` once finalized; dropping the rust-corosync handle finalizes it.
    handle: Option<quorum::Handle>,
    sink: Box<QuorumSink>,
    failed: Option<GroupError>,
    ended: bool,
}

impl CorosyncQuorum {
    /// Connects to the local corosync's quorum service and starts tracking. Must be called
    /// inside a tokio runtime context.
    pub fn connect() -> Result<Self, GroupError> {
        let model = quorum::ModelData::ModelV1(quorum::Model1Data {
            flags: quorum::Model1Flags::None,
            quorum_notification_fn: Some(on_quorum_notification),
            nodelist_notification_fn: None,
        });
        let (handle, _quorum_type) =
            quorum::initialize(&model, 0).map_err(|e| connect_error("quorum", e))?;
        let sink = Box::<QuorumSink>::default();
        // The handle is finalized by its Drop if anything below fails.
        quorum::context_set(&handle, &*sink as *const QuorumSink as usize as u64)
            .map_err(|e| call_error("quorum_context_set", e))?;
        let fd = quorum::fd_get(&handle).map_err(|e| call_error("quorum_fd_get", e))?;
        quorum::trackstart(&handle, TrackFlags::Changes)
            .map_err(|e| call_error("quorum_trackstart", e))?;
        let readiness = register_fd(fd, "quorum")?;
        Ok(CorosyncQuorum {
            readiness: Some(readiness),
            handle: Some(handle),
            sink,
            failed: None,
            ended: false,
        })
    }

    fn shut_down(&mut self) {
        self.readiness = None;
        self.handle = None;
    }

    fn fail(&mut self, detail: String) {
        self.failed = Some(GroupError::Disconnected {
            group: "quorum".to_string(),
            detail,
        });
        self.shut_down();
    }

    fn pop(&mut self) -> Option<QuorumEvent> {
        self.sink
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
}

impl Drop for CorosyncQuorum {
    fn drop(&mut self) {
        // Finalize before the sink is freed.
        self.shut_down();
    }
}

impl Stream for CorosyncQuorum {
    type Item = Result<QuorumEvent, GroupError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.pop() {
                return Poll::Ready(Some(Ok(event)));
            }
            if let Some(err) = this.failed.take() {
                this.ended = true;
                return Poll::Ready(Some(Err(err)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let (Some(readiness), Some(handle)) = (this.readiness.as_ref(), this.handle.as_ref())
            else {
                this.ended = true;
                return Poll::Ready(None);
            };
            let mut guard = match readiness.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => {
                    this.fail(format!("polling the quorum fd failed: {e}"));
                    continue;
                }
            };
            let closed = guard.ready().is_read_closed();
            let before = this.sink.events.lock().map(|q| q.len()).unwrap_or(0);
            let result = quorum::dispatch(handle, DispatchFlags::All);
            if !closed {
                guard.clear_ready();
            }
            drop(guard);
            let after = this.sink.events.lock().map(|q| q.len()).unwrap_or(0);
            match result {
                Ok(()) if closed && after == before => {
                    this.fail("corosync closed the connection (did corosync exit?)".into())
                }
                Ok(()) => {}
                Err(e) => this.fail(format!(
                    "quorum_dispatch returned {} (did corosync exit?)",
                    cs_error_name(e)
                )),
            }
        }
    }
}

impl Quorum for CorosyncQuorum {}
