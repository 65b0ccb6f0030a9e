//! [`CorosyncGroup`]: a CPG group on the local corosync, as a tokio stream of events.
//!
//! Dispatch: the CPG fd sits in an `AsyncFd`; when it is readable the stream calls
//! `cpg_dispatch(CS_DISPATCH_ONE_NONBLOCKING)` (never blocks) until nothing is pending or a
//! budget is used up. The callbacks append raw events to the handle's own sink (reached
//! through the handle's context pointer); the stream then turns them into [`GroupEvent`]s
//! in exactly corosync's order, reassembling fragmented messages.
//!
//! Every libcpg call on a handle is serialised by one mutex (libqb's client IPC is not
//! meant for concurrent use); the calls are short local IPC, so senders on other tasks wait
//! microseconds at most. No call sleeps while holding it: retries of `CS_ERR_TRY_AGAIN`
//! wait with tokio's timer between attempts, bounded.

use std::collections::VecDeque;
use std::os::raw::{c_int, c_void};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use rust_corosync::CsError;
use tokio::io::unix::AsyncFd;

use super::cpg_ffi as ffi;
use super::{call_error, connect_error, cs_error_from_raw, cs_error_name, register_fd, LibraryFd};
use crate::fragment::{split_into_frames_in_view, FRAME_HEADER_LEN};
use crate::inbox::{Inbox, RawEvent, Receipts};
use crate::{
    ConfChg, Group, GroupError, GroupEvent, GroupSender, Member, MemberChange, NodeId, Reason,
    Receipt, RingId, TotemConfChg,
};

/// Largest payload [`CorosyncSender::mcast`] accepts (it is fragmented over CPG).
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Largest CPG message csnap sends (a frame, header included), below corosync's atomic
/// size.
pub(crate) const MAX_FRAME_SIZE: usize = 64 << 10;

/// How long one frame may wait through `CS_ERR_TRY_AGAIN` / flow control before the send
/// gives up with [`GroupError::Busy`].
const SEND_RETRY_BOUND: Duration = Duration::from_secs(30);
/// How long `join` and `leave` retry `CS_ERR_TRY_AGAIN` (corosync answers so while it
/// syncs a membership change, typically for well under a second), and how long a leave
/// waits for the process's own join to be delivered.
const JOIN_RETRY_BOUND: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(1);
const BACKOFF_MAX: Duration = Duration::from_millis(100);
/// Codes of `cpg_model_initialize` that a new attempt may cure (see [`CorosyncGroup::join`]).
const INITIALIZE_TRANSIENT: [ffi::cs_error_t; 2] = [ffi::CS_ERR_TRY_AGAIN, ffi::CS_ERR_BAD_HANDLE];

/// Most callbacks handled in one poll of the stream before it yields to the runtime.
const DISPATCH_BUDGET: usize = 256;

/// How one round of dispatching ended.
enum DispatchOutcome {
    /// Nothing more pending.
    Drained,
    /// [`DISPATCH_BUDGET`] callbacks handled; more may be pending.
    BudgetUsed,
    /// `cpg_dispatch` failed with this code.
    Failed(ffi::cs_error_t),
    /// The handle was already finalized.
    Finalized(GroupError),
}

/// Where the callbacks of one handle put their events. The handle's context pointer
/// points here; it lives (boxed, so at a fixed address) until the handle is finalized.
#[derive(Default)]
struct CallbackSink {
    events: Mutex<VecDeque<RawEvent>>,
}

impl CallbackSink {
    fn push(&self, event: RawEvent) {
        lock_ignoring_poison(&self.events).push_back(event);
    }

    fn len(&self) -> usize {
        lock_ignoring_poison(&self.events).len()
    }

    fn drain(&self) -> VecDeque<RawEvent> {
        std::mem::take(&mut *lock_ignoring_poison(&self.events))
    }
}

fn lock_ignoring_poison<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One libcpg handle, shared by the group stream and its senders.
struct Connection {
    /// `None` once finalized. Held across every libcpg call on the handle.
    handle: Mutex<Option<ffi::cpg_handle_t>>,
    sink: Box<CallbackSink>,
    group: String,
    cpg_name: ffi::cpg_name,
    /// Largest CPG message corosync sends atomically (`cpg_max_atomic_msgsize_get`).
    max_frame: usize,
    next_message_id: AtomicU64,
    /// Held by a sender for all frames of one message, so they go out back to back.
    send_order: tokio::sync::Mutex<()>,
    /// The fates of this connection's own messages, resolved by the stream.
    receipts: Arc<Receipts>,
    /// The view the stream is in (`fragment::view_tag`); frames are tagged with it.
    view: Arc<AtomicU64>,
}

impl Connection {
    fn disconnected(&self, detail: impl Into<String>) -> GroupError {
        GroupError::Disconnected {
            group: self.group.clone(),
            detail: detail.into(),
        }
    }

    /// Runs `f` with the live handle, or fails with `Disconnected` after finalize.
    fn with_handle<T>(&self, f: impl FnOnce(ffi::cpg_handle_t) -> T) -> Result<T, GroupError> {
        let guard = lock_ignoring_poison(&self.handle);
        match *guard {
            Some(handle) => Ok(f(handle)),
            None => Err(self.disconnected("the group was left or dropped")),
        }
    }

    fn finalize(&self) {
        let mut guard = lock_ignoring_poison(&self.handle);
        if let Some(handle) = guard.take() {
            // SAFETY: the handle is live (taken out of the Option under the lock); after
            // this no callback can run, so the sink may be freed afterwards.
            let rc = unsafe { ffi::cpg_finalize(handle) };
            if rc != ffi::CS_OK {
                tracing::debug!(
                    group = %self.group,
                    "cpg_finalize: {}",
                    cs_error_name(cs_error_from_raw(rc))
                );
            }
        }
    }

    /// Dispatches pending callbacks one at a time (`CS_DISPATCH_ONE_NONBLOCKING`), at most
    /// [`DISPATCH_BUDGET`] of them, so a busy group neither monopolises the runtime thread
    /// nor holds the handle lock against senders for long. Returns how it ended and how
    /// many raw events the callbacks recorded.
    fn dispatch_some(&self) -> (DispatchOutcome, usize) {
        let mut produced = 0;
        for _ in 0..DISPATCH_BUDGET {
            let before = self.sink.len();
            // SAFETY: live handle (checked by with_handle under the lock).
            let rc = match self
                .with_handle(|h| unsafe { ffi::cpg_dispatch(h, ffi::CS_DISPATCH_ONE_NONBLOCKING) })
            {
                Ok(rc) => rc,
                Err(e) => return (DispatchOutcome::Finalized(e), produced),
            };
            let new = self.sink.len().saturating_sub(before);
            produced += new;
            match rc {
                // CS_DISPATCH_ONE_NONBLOCKING says "nothing pending" only this way.
                ffi::CS_ERR_TRY_AGAIN => return (DispatchOutcome::Drained, produced),
                // CS_OK with no callback is normal: libcpg consumes each non-final piece of
                // a message it fragmented itself without a callback (and answers so for a
                // broken IPC, which the caller notices as a hang-up). Go on.
                ffi::CS_OK => {}
                other => return (DispatchOutcome::Failed(other), produced),
            }
        }
        (DispatchOutcome::BudgetUsed, produced)
    }

    /// Sends one frame, waiting (bounded) through flow control and `CS_ERR_TRY_AGAIN`.
    async fn send_frame(&self, frame: &[u8]) -> Result<(), GroupError> {
        let started = Instant::now();
        let mut backoff = BACKOFF_START;
        loop {
            // (libcpg's cpg_flow_control_state_get always answers "disabled" in corosync 3;
            // flow control shows as CS_ERR_TRY_AGAIN from the send itself.)
            let rc = self.with_handle(|handle| {
                let iov = ffi::iovec {
                    iov_base: frame.as_ptr() as *const c_void,
                    iov_len: frame.len(),
                };
                // SAFETY: live handle; the iovec points into `frame`, alive for the call;
                // libcpg copies the data before returning.
                unsafe { ffi::cpg_mcast_joined(handle, ffi::CPG_TYPE_AGREED, &iov, 1) }
            })?;
            match rc {
                ffi::CS_OK => return Ok(()),
                ffi::CS_ERR_TRY_AGAIN => {
                    let waited = started.elapsed();
                    if waited >= SEND_RETRY_BOUND {
                        return Err(GroupError::Busy {
                            call: "cpg_mcast_joined",
                            waited_ms: waited.as_millis() as u64,
                        });
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                other => {
                    let err = cs_error_from_raw(other);
                    return Err(match err {
                        CsError::CsErrLibrary | CsError::CsErrBadHandle => self.disconnected(
                            format!("cpg_mcast_joined returned {}", cs_error_name(err)),
                        ),
                        _ => call_error("cpg_mcast_joined", err),
                    });
                }
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.finalize();
    }
}

/// Recovers this handle's sink from its context pointer; `None` if unset.
///
/// # Safety
/// Only called from libcpg callbacks, which run inside our `cpg_dispatch` while the
/// connection (and with it the sink) is alive.
unsafe fn sink_of<'a>(handle: ffi::cpg_handle_t) -> Option<&'a CallbackSink> {
    let mut context: *mut c_void = std::ptr::null_mut();
    if ffi::cpg_context_get(handle, &mut context) != ffi::CS_OK || context.is_null() {
        return None;
    }
    Some(&*(context as *const CallbackSink))
}

/// Copies a C array, tolerating a null pointer with zero entries.
unsafe fn c_slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr, len)
    }
}

fn member_of(addr: &ffi::cpg_address) -> Member {
    Member {
        node: NodeId(addr.nodeid),
        pid: addr.pid,
    }
}

/// Converts a joined/left list; corosync always sets a reason there, an unknown one is
/// reported as the nearest safe meaning (a join, or a process gone).
fn changes_of(list: &[ffi::cpg_address], joined: bool) -> Vec<MemberChange> {
    let mut out: Vec<MemberChange> = list
        .iter()
        .map(|addr| {
            let reason = match addr.reason {
                ffi::CPG_REASON_JOIN => Reason::Join,
                ffi::CPG_REASON_LEAVE => Reason::Leave,
                ffi::CPG_REASON_NODEDOWN => Reason::NodeDown,
                ffi::CPG_REASON_NODEUP => Reason::NodeUp,
                ffi::CPG_REASON_PROCDOWN => Reason::ProcDown,
                _ if joined => Reason::Join,
                _ => Reason::ProcDown,
            };
            MemberChange {
                member: member_of(addr),
                reason,
            }
        })
        .collect();
    out.sort_by_key(|c| c.member);
    out
}

extern "C" fn on_deliver(
    handle: ffi::cpg_handle_t,
    _group: *const ffi::cpg_name,
    nodeid: u32,
    pid: u32,
    msg: *mut c_void,
    msg_len: usize,
) {
    // SAFETY: called by libcpg inside our cpg_dispatch; msg/msg_len describe its buffer.
    unsafe {
        let Some(sink) = sink_of(handle) else { return };
        let data = c_slice(msg as *const u8, msg_len).to_vec();
        sink.push(RawEvent::Frame {
            from: Member {
                node: NodeId(nodeid),
                pid,
            },
            data,
        });
    }
}

#[allow(clippy::too_many_arguments)]
extern "C" fn on_confchg(
    handle: ffi::cpg_handle_t,
    _group: *const ffi::cpg_name,
    member_list: *const ffi::cpg_address,
    member_list_entries: usize,
    left_list: *const ffi::cpg_address,
    left_list_entries: usize,
    joined_list: *const ffi::cpg_address,
    joined_list_entries: usize,
) {
    // SAFETY: called by libcpg inside our cpg_dispatch with valid lists of the given sizes.
    unsafe {
        let Some(sink) = sink_of(handle) else { return };
        let mut members: Vec<Member> = c_slice(member_list, member_list_entries)
            .iter()
            .map(member_of)
            .collect();
        members.sort();
        sink.push(RawEvent::ConfChg(ConfChg {
            members,
            left: changes_of(c_slice(left_list, left_list_entries), false),
            joined: changes_of(c_slice(joined_list, joined_list_entries), true),
        }));
    }
}

extern "C" fn on_totem_confchg(
    handle: ffi::cpg_handle_t,
    ring_id: ffi::cpg_ring_id,
    member_list_entries: u32,
    member_list: *const u32,
) {
    // SAFETY: called by libcpg inside our cpg_dispatch with a valid list.
    unsafe {
        let Some(sink) = sink_of(handle) else { return };
        let mut members: Vec<NodeId> = c_slice(member_list, member_list_entries as usize)
            .iter()
            .map(|n| NodeId(*n))
            .collect();
        members.sort();
        sink.push(RawEvent::Totem(TotemConfChg {
            ring: RingId {
                node: NodeId(ring_id.nodeid),
                seq: ring_id.seq,
            },
            members,
        }));
    }
}

/// Retries a short libcpg call while it answers one of the `transient` codes, sleeping on
/// tokio's timer between attempts (never while the caller holds a lock), for at most
/// [`JOIN_RETRY_BOUND`]. Returns the last code and how long it waited on failure.
async fn retry_transient(
    transient: &[ffi::cs_error_t],
    mut call: impl FnMut() -> Result<ffi::cs_error_t, GroupError>,
) -> Result<Result<(), (CsError, Duration)>, GroupError> {
    let started = Instant::now();
    let mut backoff = BACKOFF_START;
    loop {
        let rc = call()?;
        if rc == ffi::CS_OK {
            return Ok(Ok(()));
        }
        let waited = started.elapsed();
        if !transient.contains(&rc) || waited >= JOIN_RETRY_BOUND {
            return Ok(Err((cs_error_from_raw(rc), waited)));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn busy_or(call: &'static str, (err, waited): (CsError, Duration)) -> GroupError {
    if err == CsError::CsErrTryAgain {
        GroupError::Busy {
            call,
            waited_ms: waited.as_millis() as u64,
        }
    } else {
        call_error(call, err)
    }
}

/// State of the event stream.
enum StreamState {
    Open,
    /// The connection failed; the error is yielded once, then the stream ends.
    Failed(GroupError),
    Ended,
}

/// A joined CPG group on the local corosync. A [`Stream`] of [`GroupEvent`]s in corosync's
/// agreed order: this process's own join confchg and the initial totem confchg (model V1
/// with `CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF`; it can come before the join confchg, see
/// [`crate::view`]); then every confchg, totem confchg (last of each transition) and
/// delivery. Dropping it finalizes the connection (other members see
/// [`Reason::ProcDown`]); [`Group::leave`] leaves cleanly ([`Reason::Leave`]).
pub struct CorosyncGroup {
    conn: Arc<Connection>,
    /// Dropped before the connection is finalized (the library owns the fd).
    readiness: Option<AsyncFd<LibraryFd>>,
    local: Member,
    inbox: Inbox,
    state: StreamState,
}

impl CorosyncGroup {
    /// Connect to the local corosync and join `name`. Retries, for at most 10 s, while
    /// corosync answers `CS_ERR_TRY_AGAIN` during a membership sync, waiting on tokio's
    /// timer; must be called inside a tokio runtime context (AsyncFd registration).
    pub async fn join(name: &str) -> Result<CorosyncGroup, GroupError> {
        let cpg_name = ffi::make_cpg_name(name).map_err(GroupError::Invalid)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(GroupError::Invalid(
                "CorosyncGroup::join must be called inside a tokio runtime context".to_string(),
            ));
        }
        let sink = Box::<CallbackSink>::default();
        let context = &*sink as *const CallbackSink as usize;
        let started = Instant::now();
        let mut backoff = BACKOFF_START;
        // CS_ERR_BAD_HANDLE from initialize, or from the first call on a handle just made,
        // is made again within the join bound (seen in tests with six joins at once in one
        // process, right after corosync formed its ring). cpg_model_initialize makes a fresh
        // handle and reports a failed libqb connect through qb_to_cs_error, where EBADF
        // becomes CS_ERR_BAD_HANDLE: a socket closed under the connect, which a retry cures.
        let (handle, max_frame, rc) = loop {
            let mut handle: ffi::cpg_handle_t = 0;
            retry_transient(&INITIALIZE_TRANSIENT, || {
                let mut model = ffi::cpg_model_v1_data_t {
                    model: ffi::CPG_MODEL_V1,
                    cpg_deliver_fn: Some(on_deliver),
                    cpg_confchg_fn: Some(on_confchg),
                    cpg_totem_confchg_fn: Some(on_totem_confchg),
                    flags: ffi::CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF,
                };
                // SAFETY: valid out pointer and model struct (copied by libcpg); the
                // context points to the boxed sink, which the Connection keeps until after
                // cpg_finalize.
                Ok(unsafe {
                    ffi::cpg_model_initialize(
                        &mut handle,
                        ffi::CPG_MODEL_V1,
                        &mut model,
                        context as *mut c_void,
                    )
                })
            })
            .await?
            .map_err(|(err, _)| connect_error("cpg", err))?;
            let mut max_frame: u32 = 0;
            // SAFETY: live handle, valid out pointer.
            let rc = unsafe { ffi::cpg_max_atomic_msgsize_get(handle, &mut max_frame) };
            if rc == ffi::CS_ERR_BAD_HANDLE && started.elapsed() < JOIN_RETRY_BOUND {
                tracing::debug!(group = %name, "a new cpg handle was reported bad; making another");
                // SAFETY: finalizing a handle libcpg already forgot is answered BAD_HANDLE.
                let _ = unsafe { ffi::cpg_finalize(handle) };
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            break (handle, max_frame, rc);
        };
        let max_frame = max_frame.min(MAX_FRAME_SIZE as u32);
        let conn = Arc::new(Connection {
            handle: Mutex::new(Some(handle)),
            sink,
            group: name.to_string(),
            cpg_name,
            max_frame: max_frame as usize,
            next_message_id: AtomicU64::new(0),
            send_order: tokio::sync::Mutex::new(()),
            receipts: Receipts::new(name),
            view: Arc::new(AtomicU64::new(0)),
        });
        // From here on, dropping `conn` finalizes the handle.
        if rc != ffi::CS_OK {
            return Err(call_error(
                "cpg_max_atomic_msgsize_get",
                cs_error_from_raw(rc),
            ));
        }
        if conn.max_frame <= FRAME_HEADER_LEN {
            return Err(GroupError::Corosync {
                call: "cpg_max_atomic_msgsize_get",
                detail: format!("atomic message size {} is too small", conn.max_frame),
            });
        }

        let (node, fd) = conn.with_handle(|h| {
            let mut node: std::os::raw::c_uint = 0;
            let mut fd: c_int = -1;
            // SAFETY: live handle, valid out pointers.
            let rc = unsafe { ffi::cpg_local_get(h, &mut node) };
            if rc != ffi::CS_OK {
                return Err(call_error("cpg_local_get", cs_error_from_raw(rc)));
            }
            // SAFETY: as above.
            let rc = unsafe { ffi::cpg_fd_get(h, &mut fd) };
            if rc != ffi::CS_OK {
                return Err(call_error("cpg_fd_get", cs_error_from_raw(rc)));
            }
            Ok((node, fd))
        })??;
        // The handle lock is taken per attempt, never across the wait between attempts.
        retry_transient(&[ffi::CS_ERR_TRY_AGAIN], || {
            // SAFETY: live handle (checked under the lock); cpg_name is a valid struct.
            conn.with_handle(|h| unsafe { ffi::cpg_join(h, &conn.cpg_name) })
        })
        .await?
        .map_err(|e| busy_or("cpg_join", e))?;

        let readiness = register_fd(fd, "cpg")?;
        let local = Member {
            node: NodeId(node),
            pid: std::process::id(),
        };
        Ok(CorosyncGroup {
            local,
            readiness: Some(readiness),
            inbox: Inbox::new(
                local,
                name,
                MAX_MESSAGE_SIZE,
                Arc::clone(&conn.receipts),
                Arc::clone(&conn.view),
            ),
            state: StreamState::Open,
            conn,
        })
    }

    /// The largest payload [`CorosyncSender::mcast`] accepts ([`MAX_MESSAGE_SIZE`]).
    pub fn max_message_size(&self) -> usize {
        MAX_MESSAGE_SIZE
    }

    /// The largest payload that travels as a single CPG message (no fragmentation).
    pub fn atomic_message_size(&self) -> usize {
        self.conn.max_frame - FRAME_HEADER_LEN
    }

    /// Moves what the callbacks recorded into the inbox.
    fn absorb_callbacks(&mut self) {
        for event in self.conn.sink.drain() {
            self.inbox.push(event);
        }
    }

    fn fail(&mut self, detail: String) {
        self.state = StreamState::Failed(self.conn.disconnected(detail));
        self.shut_down("the connection to corosync was lost");
    }

    /// Stops polling the fd and finalizes the handle (senders then get `Disconnected`,
    /// outstanding receipts too).
    fn shut_down(&mut self, why: &str) {
        self.readiness = None;
        self.conn.finalize();
        self.inbox.close(why);
    }
}

impl Drop for CorosyncGroup {
    fn drop(&mut self) {
        self.shut_down("the group was dropped");
    }
}

impl Stream for CorosyncGroup {
    type Item = Result<GroupEvent, GroupError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.inbox.pop() {
                return Poll::Ready(Some(Ok(event)));
            }
            match std::mem::replace(&mut this.state, StreamState::Ended) {
                StreamState::Open => this.state = StreamState::Open,
                StreamState::Failed(err) => return Poll::Ready(Some(Err(err))),
                StreamState::Ended => return Poll::Ready(None),
            }
            let Some(readiness) = this.readiness.as_ref() else {
                this.state = StreamState::Ended;
                return Poll::Ready(None);
            };
            let mut guard = match readiness.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => {
                    this.fail(format!("polling the cpg fd failed: {e}"));
                    continue;
                }
            };
            let closed = guard.ready().is_read_closed();
            let (outcome, produced) = this.conn.dispatch_some();
            match outcome {
                // Keep the readiness while the peer has hung up, so the next poll
                // dispatches again and notices that nothing more comes.
                DispatchOutcome::Drained if !closed => guard.clear_ready(),
                // Budget used up: keep the readiness, the next poll goes on.
                _ => {}
            }
            drop(guard);
            this.absorb_callbacks();
            match outcome {
                DispatchOutcome::Drained if closed && produced == 0 => {
                    this.fail("corosync closed the connection (did corosync exit?)".into())
                }
                // Our frames never need libcpg's own fragmentation, so a whole budget of
                // CS_OK without a single callback is libcpg masking a broken connection
                // (it turns CS_ERR_BAD_HANDLE into CS_OK): fail rather than spin.
                DispatchOutcome::BudgetUsed if produced == 0 => this.fail(
                    "cpg_dispatch kept answering CS_OK without an event (broken connection?)"
                        .into(),
                ),
                DispatchOutcome::Drained => {}
                DispatchOutcome::BudgetUsed if this.inbox.is_empty() => {
                    // Only fragments so far: let other tasks run, then go on.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                DispatchOutcome::BudgetUsed => {}
                DispatchOutcome::Failed(code) => this.fail(format!(
                    "cpg_dispatch returned {} (did corosync exit?)",
                    cs_error_name(cs_error_from_raw(code))
                )),
                DispatchOutcome::Finalized(e) => {
                    this.state = StreamState::Failed(e);
                    this.shut_down("the group connection was finalized");
                }
            }
        }
    }
}

impl Group for CorosyncGroup {
    type Sender = CorosyncSender;

    fn local(&self) -> Member {
        self.local
    }

    fn name(&self) -> &str {
        &self.conn.group
    }

    fn sender(&self) -> CorosyncSender {
        CorosyncSender {
            conn: Arc::clone(&self.conn),
        }
    }

    /// Leaves the group. corosync answers `CS_ERR_BUSY` while this process's own join is
    /// still on its way through the ring, and libcpg's `cpg_leave` spins on that answer
    /// inside the call; so a leave first reads the stream (bounded, 10 s) until its own
    /// join confchg has come through, then leaves and finalizes the handle.
    async fn leave(mut self) -> Result<(), GroupError> {
        let started = Instant::now();
        while !self.inbox.own_join_seen() {
            let left = JOIN_RETRY_BOUND.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, futures::StreamExt::next(&mut self)).await {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Err(self.conn.disconnected("the stream ended")),
                Err(_) => {
                    return Err(GroupError::Busy {
                        call: "cpg_leave (waiting for the own join to be delivered)",
                        waited_ms: started.elapsed().as_millis() as u64,
                    })
                }
            }
        }
        let conn = Arc::clone(&self.conn);
        let result = retry_transient(&[ffi::CS_ERR_TRY_AGAIN], || {
            // SAFETY: live handle (checked under the lock), valid name.
            conn.with_handle(|h| unsafe { ffi::cpg_leave(h, &conn.cpg_name) })
        })
        .await;
        self.state = StreamState::Ended;
        self.shut_down("the group was left");
        result?.map_err(|e| busy_or("cpg_leave", e))
    }
}

/// Multicasts to a [`CorosyncGroup`] in agreed order; cheap to clone. After the group is
/// left or dropped, sends fail with [`GroupError::Disconnected`].
#[derive(Clone)]
pub struct CorosyncSender {
    conn: Arc<Connection>,
}

impl CorosyncSender {
    async fn send(&self, payload: Vec<u8>) -> Result<Receipt, GroupError> {
        if payload.len() > MAX_MESSAGE_SIZE {
            return Err(GroupError::MessageTooLarge {
                size: payload.len(),
                max: MAX_MESSAGE_SIZE,
            });
        }
        let _in_order = self.conn.send_order.lock().await;
        let id = self.conn.next_message_id.fetch_add(1, Ordering::Relaxed);
        let view = self.conn.view.load(Ordering::Acquire);
        let frames = split_into_frames_in_view(id, view, &payload, self.conn.max_frame)
            .map_err(|why| GroupError::Invalid(format!("cannot fragment message: {why}")))?;
        let receipt = self.conn.receipts.register(id)?;
        for frame in &frames {
            if let Err(e) = self.conn.send_frame(frame).await {
                self.conn.receipts.forget(id);
                return Err(e);
            }
        }
        Ok(receipt)
    }
}

impl GroupSender for CorosyncSender {
    fn mcast(
        &self,
        payload: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Receipt, GroupError>> + Send {
        self.send(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_convert_and_lists_sort() {
        let list = [
            ffi::cpg_address {
                nodeid: 3,
                pid: 1,
                reason: ffi::CPG_REASON_NODEUP,
            },
            ffi::cpg_address {
                nodeid: 1,
                pid: 9,
                reason: ffi::CPG_REASON_PROCDOWN,
            },
            ffi::cpg_address {
                nodeid: 2,
                pid: 5,
                reason: 0,
            },
        ];
        let joined = changes_of(&list, true);
        assert_eq!(
            joined
                .iter()
                .map(|c| (c.member.node.0, c.reason))
                .collect::<Vec<_>>(),
            vec![
                (1, Reason::ProcDown),
                (2, Reason::Join),
                (3, Reason::NodeUp)
            ]
        );
        let left = changes_of(&list, false);
        assert_eq!(left[1].reason, Reason::ProcDown);
    }

    #[tokio::test]
    async fn join_refuses_bad_names_before_touching_corosync() {
        let err = match CorosyncGroup::join(&"g".repeat(200)).await {
            Err(e) => e,
            Ok(_) => panic!("a 200-byte group name was accepted"),
        };
        assert!(
            matches!(err, GroupError::Invalid(ref s) if s.contains("200 bytes")),
            "{err}"
        );
    }
}
