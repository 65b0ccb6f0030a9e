//! Device reads and writes through io_uring, for the data path's hot requests.
//!
//! Why: on tokio's blocking pool every `pread`/`pwrite` costs two thread switches (the
//! request's task wakes a pool thread, which wakes the task back), and on a 2-core machine
//! those switches were the largest item of the NBD data path's CPU profile
//! (docs/benchmarks.md, "Where the time goes"). Here the task that needs the I/O submits
//! it to the kernel itself and is woken by the completion: no thread of ours in between.
//!
//! One ring per [`super::Devices`], shared by every task. Submitting takes a mutex for
//! the push and the `io_uring_enter`; completions are reaped by one task woken through
//! the ring's own file descriptor (epoll on an io_uring fd reports completions), which
//! wakes the waiting requests. A buffer lives in its operation's slot until the kernel
//! is done with it, also when the request that asked was dropped meanwhile, so the
//! kernel never reads or writes freed memory.
//!
//! Where io_uring is refused (old kernels, seccomp, `kernel.io_uring_disabled`, or
//! `CSNAP_IO_URING=0` in the environment) there is no ring and everything stays on the
//! blocking pool.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::aligned::AlignedVec;

/// Submission queue entries, and the most operations in the kernel at once. Beyond
/// that, requests go to the blocking pool instead of waiting. 1,024: nbdcopy's 4
/// connections of 64 requests, each a snapshot read of up to 16 scattered runs, stay
/// inside it (with 256 they spilled to the pool: 38 threads, twice the CPU).
const RING_ENTRIES: u32 = 1024;

/// What an operation's slot keeps alive for the kernel (held, never read, until the
/// completion: that is its whole job).
#[allow(dead_code)]
enum Buffer {
    /// A write's source.
    Write(Bytes),
    /// A read's destination.
    Read(AlignedVec),
}

enum Slot {
    Free,
    /// Submitted; the request waits.
    Waiting {
        buffer: Buffer,
        waker: Option<Waker>,
    },
    /// Completed with the kernel's result; the request has not looked yet.
    Done {
        buffer: Buffer,
        result: i32,
    },
    /// Submitted, but the request was dropped: freed on completion.
    Abandoned {
        #[allow(dead_code)]
        buffer: Buffer,
    },
}

struct RingState {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Operations the kernel has not completed.
    in_kernel: usize,
}

/// The ring's file descriptor, for epoll (the `IoUring` owns it).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub(crate) struct Ring {
    // Dropped first: deregistered from epoll before the ring closes its descriptor.
    readiness: AsyncFd<RingFd>,
    state: Mutex<RingState>,
    stop_reaper: Notify,
}

/// A completed operation: the kernel's result (bytes or -errno) and the buffer back.
struct Completion {
    result: i32,
    buffer: Buffer,
}

impl Ring {
    /// A ring with its reaper task, or `None` (logged once per call) where io_uring is
    /// unavailable or switched off. Must be called inside a tokio runtime.
    pub(crate) fn start() -> Option<Arc<Ring>> {
        if std::env::var("CSNAP_IO_URING").is_ok_and(|v| v == "0") {
            tracing::info!(
                "io_uring switched off by CSNAP_IO_URING=0: device I/O on the blocking pool"
            );
            return None;
        }
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let ring = match IoUring::new(RING_ENTRIES) {
            Ok(ring) => ring,
            Err(e) => {
                tracing::info!(error = %e, "io_uring unavailable: device I/O on the blocking pool");
                return None;
            }
        };
        let fd = ring.as_raw_fd();
        let readiness = {
            let _enter = handle.enter();
            // SAFETY: the descriptor is the ring's, which `Ring` owns beside the `AsyncFd`
            // and closes only after it (`readiness` is dropped first).
            match unsafe {
                AsyncFd::register_with_interest(RingFd(fd), tokio::io::Interest::READABLE)
            } {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(error = %e, "io_uring completions cannot be polled: device I/O on the blocking pool");
                    return None;
                }
            }
        };
        let ring = Arc::new(Ring {
            readiness,
            state: Mutex::new(RingState {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
                in_kernel: 0,
            }),
            stop_reaper: Notify::new(),
        });
        handle.spawn(reap(ring.clone()));
        Some(ring)
    }

    /// Ends the reaper task, which holds the ring; called when the devices are dropped.
    pub(crate) fn stop(&self) {
        self.stop_reaper.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `len` bytes at `offset` of `fd` into a fresh aligned buffer. `None` when the
    /// ring is full (the caller uses the blocking pool); a short read is returned short.
    pub(crate) async fn read(
        self: &Arc<Self>,
        fd: RawFd,
        offset: u64,
        len: usize,
    ) -> Option<io::Result<Bytes>> {
        let len32 = u32::try_from(len).ok()?;
        let mut buf = AlignedVec::with_capacity(len);
        let entry = opcode::Read::new(types::Fd(fd), buf.spare_ptr(), len32)
            .offset(offset)
            .build();
        let done = self.run(entry, Buffer::Read(buf))?.await;
        let Buffer::Read(mut buf) = done.buffer else {
            return Some(Err(io::Error::other(
                "io_uring returned a write buffer for a read",
            )));
        };
        if done.result < 0 {
            return Some(Err(io::Error::from_raw_os_error(-done.result)));
        }
        let n = (done.result as usize).min(len);
        // SAFETY: the kernel reported `n` bytes read into the buffer's first `n` spare
        // bytes, which `spare_ptr` pointed it at (and `len` bytes of room were reserved).
        unsafe { buf.assume_filled(n) };
        Some(Ok(buf.into_bytes()))
    }

    /// Writes `data` at `offset` of `fd`; the bytes written. `None` when the ring is
    /// full (the caller uses the blocking pool).
    pub(crate) async fn write(
        self: &Arc<Self>,
        fd: RawFd,
        offset: u64,
        data: Bytes,
    ) -> Option<io::Result<usize>> {
        let len = u32::try_from(data.len()).ok()?;
        let entry = opcode::Write::new(types::Fd(fd), data.as_ptr(), len)
            .offset(offset)
            .build();
        let done = self.run(entry, Buffer::Write(data))?.await;
        if done.result < 0 {
            return Some(Err(io::Error::from_raw_os_error(-done.result)));
        }
        Some(Ok(done.result as usize))
    }

    /// Submits `entry`, whose memory is `buffer`'s; `None` if the ring is full or the
    /// submission failed (nothing was started then).
    fn run(
        self: &Arc<Self>,
        entry: squeue::Entry,
        buffer: Buffer,
    ) -> Option<impl std::future::Future<Output = Completion>> {
        let mut st = self.lock();
        if st.in_kernel >= RING_ENTRIES as usize {
            return None;
        }
        let id = match st.free.pop() {
            Some(id) => id,
            None => {
                st.slots.push(Slot::Free);
                st.slots.len() - 1
            }
        };
        st.slots[id] = Slot::Waiting {
            buffer,
            waker: None,
        };
        let entry = entry.user_data(id as u64);
        // SAFETY: the entry points into `buffer`, now owned by slot `id` until the
        // kernel's completion for `id` is reaped (see `Slot::Abandoned` and `Drop`), so
        // the memory stays valid while the kernel may use it.
        let pushed = unsafe { st.ring.submission().push(&entry) }.is_ok();
        let submitted = pushed && st.ring.submit().is_ok();
        if !submitted {
            if pushed {
                // In the queue but not entered: the next submit takes it. Let it run and
                // be reaped as abandoned; this request goes to the pool.
                let Slot::Waiting { buffer, .. } = std::mem::replace(&mut st.slots[id], Slot::Free)
                else {
                    return None;
                };
                st.slots[id] = Slot::Abandoned { buffer };
                st.in_kernel += 1;
            } else {
                st.slots[id] = Slot::Free;
                st.free.push(id);
            }
            return None;
        }
        st.in_kernel += 1;
        // Completions that are already there: reap them now rather than waiting for
        // the reaper's turn.
        let wake = reap_locked(&mut st);
        drop(st);
        wake.into_iter().for_each(Waker::wake);
        Some(
            Op {
                ring: self.clone(),
                id,
                finished: false,
            }
            .wait(),
        )
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Buffers of operations the kernel still holds must outlive them.
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        while st.in_kernel > 0 {
            if st.ring.submit_and_wait(1).is_err() {
                // Nothing can be waited for: leak the buffers rather than free them
                // under the kernel.
                std::mem::forget(std::mem::take(&mut st.slots));
                return;
            }
            drop(reap_locked(st));
        }
    }
}

/// Moves every completion into its slot; the wakers of the requests to wake.
fn reap_locked(st: &mut RingState) -> Vec<Waker> {
    let mut wake = Vec::new();
    let done: Vec<(u64, i32)> = st
        .ring
        .completion()
        .map(|cqe| (cqe.user_data(), cqe.result()))
        .collect();
    for (id, result) in done {
        let Some(slot) = st.slots.get_mut(id as usize) else {
            continue;
        };
        st.in_kernel = st.in_kernel.saturating_sub(1);
        match std::mem::replace(slot, Slot::Free) {
            Slot::Waiting { buffer, waker } => {
                *slot = Slot::Done { buffer, result };
                wake.extend(waker);
            }
            Slot::Abandoned { .. } => st.free.push(id as usize),
            other => *slot = other,
        }
    }
    wake
}

/// The reaper: waits for the ring's fd to say completions are there, reaps them.
async fn reap(ring: Arc<Ring>) {
    loop {
        let ready = tokio::select! {
            ready = ring.readiness.readable() => ready,
            _ = ring.stop_reaper.notified() => return,
        };
        let mut guard = match ready {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!(error = %e, "polling io_uring completions failed; the ring stops");
                return;
            }
        };
        let wake = reap_locked(&mut ring.lock());
        wake.into_iter().for_each(Waker::wake);
        // Only clears if no new completion was signalled since `readable` returned.
        guard.clear_ready();
    }
}

/// A submitted operation, as its request sees it.
struct Op {
    ring: Arc<Ring>,
    id: usize,
    finished: bool,
}

impl Op {
    async fn wait(mut self) -> Completion {
        std::future::poll_fn(|cx| {
            let mut st = self.ring.lock();
            match std::mem::replace(&mut st.slots[self.id], Slot::Free) {
                Slot::Done { buffer, result } => {
                    st.free.push(self.id);
                    self.finished = true;
                    Poll::Ready(Completion { result, buffer })
                }
                Slot::Waiting { buffer, .. } => {
                    st.slots[self.id] = Slot::Waiting {
                        buffer,
                        waker: Some(cx.waker().clone()),
                    };
                    Poll::Pending
                }
                other => {
                    st.slots[self.id] = other;
                    Poll::Pending
                }
            }
        })
        .await
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut st = self.ring.lock();
        match std::mem::replace(&mut st.slots[self.id], Slot::Free) {
            Slot::Waiting { buffer, .. } => st.slots[self.id] = Slot::Abandoned { buffer },
            Slot::Done { .. } => st.free.push(self.id),
            other => st.slots[self.id] = other,
        }
    }
}
