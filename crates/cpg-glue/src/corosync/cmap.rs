//! [`Cmap`]: reading corosync's configuration map (rust-corosync's cmap binding), and
//! [`CmapWatch`], a stream of the keys under some prefixes after each change (e.g. a
//! `corosync-cfgtool -R` reload). What the keys mean is the caller's business.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use rust_corosync::cmap;
use rust_corosync::DispatchFlags;
use tokio::io::unix::AsyncFd;

use super::{call_error, connect_error, cs_error_name, register_fd, LibraryFd};
use crate::GroupError;

/// Keys and their values as text, as [`Cmap::get_prefix`] returns them.
pub type CmapKeys = BTreeMap<String, String>;

/// A connection to the local corosync's cmap (the live copy of corosync.conf).
pub struct Cmap {
    handle: cmap::Handle,
}

fn render(key: &str, data: &cmap::Data) -> Result<String, GroupError> {
    Ok(match data {
        cmap::Data::String(s) => s.clone(),
        cmap::Data::Int8(v) => v.to_string(),
        cmap::Data::UInt8(v) => v.to_string(),
        cmap::Data::Int16(v) => v.to_string(),
        cmap::Data::UInt16(v) => v.to_string(),
        cmap::Data::Int32(v) => v.to_string(),
        cmap::Data::UInt32(v) => v.to_string(),
        cmap::Data::Int64(v) => v.to_string(),
        cmap::Data::UInt64(v) => v.to_string(),
        cmap::Data::Float(v) => v.to_string(),
        cmap::Data::Double(v) => v.to_string(),
        cmap::Data::Binary(bytes) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        cmap::Data::Unknown => {
            return Err(GroupError::Corosync {
                call: "cmap_iter_next",
                detail: format!("key {key} has a value of unknown type"),
            })
        }
    })
}

impl Cmap {
    /// Connects to the local corosync's cmap.
    pub fn connect() -> Result<Self, GroupError> {
        let handle = cmap::initialize(cmap::Map::Icmap).map_err(|e| connect_error("cmap", e))?;
        Ok(Cmap { handle })
    }

    /// Every key starting with `prefix`, with its value as text (numbers in decimal,
    /// binary values in hex). (rust-corosync's iterator ends quietly if a key vanishes
    /// while it runs; a [`CmapWatch`] on that prefix reports the concurrent change anyway.)
    pub fn get_prefix(&self, prefix: &str) -> Result<CmapKeys, GroupError> {
        let iter = cmap::CmapIterStart::new(&self.handle, prefix)
            .map_err(|e| call_error("cmap_iter_init", e))?;
        let mut out = BTreeMap::new();
        for item in iter {
            let value = render(item.key_name(), item.data())?;
            out.insert(item.key_name().to_string(), value);
        }
        Ok(out)
    }

    /// Every key under any of `prefixes`, in one map.
    pub fn get_prefixes(&self, prefixes: &[&str]) -> Result<CmapKeys, GroupError> {
        let mut keys = BTreeMap::new();
        for prefix in prefixes {
            keys.append(&mut self.get_prefix(prefix)?);
        }
        Ok(keys)
    }

    /// Watches the keys under `prefixes`: returns them as they are now, and a stream that
    /// yields them again after every change (added, modified or deleted keys, e.g. by
    /// `corosync-cfgtool -R` or `corosync-cmapctl`).
    ///
    /// The returned keys are read *after* the change trackers are installed, so no change
    /// can fall between them and the stream: a change before the read is in them, a change
    /// after it is yielded. Use them as the starting point rather than reading separately
    /// before watching (a reload between that read and the watch would be missed).
    ///
    /// An item equal to the previous one (initially: the returned keys) is not repeated, so
    /// one reload that touches many keys yields one item, and a reload that changes
    /// nothing yields none. Must be called inside a tokio runtime context.
    pub fn watch(self, prefixes: &[&str]) -> Result<(CmapKeys, CmapWatch), GroupError> {
        if prefixes.is_empty() {
            return Err(GroupError::Invalid(
                "cmap watch: no key prefix to watch".to_string(),
            ));
        }
        let fd = cmap::fd_get(&self.handle).map_err(|e| call_error("cmap_fd_get", e))?;
        let readiness = register_fd(fd, "cmap")?;
        let sink = Box::new(ChangeFlag(AtomicBool::new(false)));
        let mut watch = CmapWatch {
            readiness: Some(readiness),
            tracks: Vec::new(),
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            last: None,
            sink,
            failed: None,
            ended: false,
            cmap: Some(self),
        };
        let callback = cmap::NotifyCallback {
            notify_fn: Some(on_cmap_change),
        };
        let track = cmap::TrackType::ADD
            | cmap::TrackType::DELETE
            | cmap::TrackType::MODIFY
            | cmap::TrackType::PREFIX;
        let context = &*watch.sink as *const ChangeFlag as usize as u64;
        let Some(c) = &watch.cmap else {
            return Err(GroupError::Invalid("cmap watch: no connection".to_string()));
        };
        for prefix in prefixes {
            // On failure, dropping `watch` deletes the trackers made so far.
            let t = cmap::track_add(
                &c.handle,
                prefix,
                cmap::TrackType::from_bits_retain(track.bits()),
                &callback,
                context,
            )
            .map_err(|e| call_error("cmap_track_add", e))?;
            watch.tracks.push(t);
        }
        // Only now, with every tracker in place, read the baseline.
        let initial = c.get_prefixes(prefixes)?;
        watch.last = Some(Ok(initial.clone()));
        Ok((initial, watch))
    }
}

/// Set by the cmap tracker callback; the handle's user data is its address.
struct ChangeFlag(AtomicBool);

/// rust-corosync calls this (a plain `fn`) from inside our `cmap::dispatch`.
fn on_cmap_change(
    _handle: &cmap::Handle,
    _track: &cmap::TrackHandle,
    _event: cmap::TrackType,
    _key: &str,
    _new: &cmap::Data,
    _old: &cmap::Data,
    user_data: u64,
) {
    if user_data == 0 {
        return;
    }
    // SAFETY: user_data is the address of the watch's boxed flag, which outlives the
    // trackers and the handle; callbacks only run inside our dispatch.
    let flag = unsafe { &*(user_data as usize as *const ChangeFlag) };
    flag.0.store(true, Ordering::Release);
}

/// The result of one read, comparable so repeats can be skipped (a failure as its text).
type ReadResult = Result<CmapKeys, String>;

/// The keys under the watched prefixes, yielded after each change (see [`Cmap::watch`]).
/// A failed read is yielded as [`GroupError::Corosync`] and the stream goes on; a lost
/// connection is yielded as [`GroupError::Disconnected`], after which the stream ends.
pub struct CmapWatch {
    /// Dropped before the cmap handle (the library owns the fd).
    readiness: Option<AsyncFd<LibraryFd>>,
    tracks: Vec<cmap::TrackHandle>,
    prefixes: Vec<String>,
    last: Option<ReadResult>,
    /// Freed after the handle is finalized (field order and Drop below).
    sink: Box<ChangeFlag>,
    failed: Option<GroupError>,
    ended: bool,
    cmap: Option<Cmap>,
}

impl CmapWatch {
    fn read_keys(&self) -> ReadResult {
        let prefixes: Vec<&str> = self.prefixes.iter().map(String::as_str).collect();
        match &self.cmap {
            Some(c) => c.get_prefixes(&prefixes).map_err(|e| e.to_string()),
            None => Err("cmap connection closed".to_string()),
        }
    }

    /// Closes the connection. `alive`: corosync still answers, so the tracks are deleted
    /// first; on a dead connection that request would wait for an answer that never comes
    /// (libqb's request/reply has no timeout), blocking the task that polls the watch.
    fn shut_down(&mut self, alive: bool) {
        self.readiness = None;
        if let Some(c) = self.cmap.take() {
            if alive {
                for t in self.tracks.drain(..) {
                    let _ = cmap::track_delete(&c.handle, t);
                }
            }
            self.tracks.clear();
            // Dropping the handle finalizes it.
        }
    }

    fn fail(&mut self, detail: String) {
        self.failed = Some(GroupError::Disconnected {
            group: "cmap".to_string(),
            detail,
        });
        self.shut_down(false);
    }
}

impl Drop for CmapWatch {
    fn drop(&mut self) {
        let alive = self.failed.is_none() && !self.ended;
        self.shut_down(alive);
    }
}

impl Stream for CmapWatch {
    type Item = Result<CmapKeys, GroupError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(err) = this.failed.take() {
                this.ended = true;
                return Poll::Ready(Some(Err(err)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            if this.sink.0.swap(false, Ordering::AcqRel) {
                // Corosync applies a whole reload before it answers our reads, so this
                // sees the complete new state.
                let now = this.read_keys();
                if this.last.as_ref() != Some(&now) {
                    this.last = Some(now.clone());
                    return Poll::Ready(Some(now.map_err(|detail| GroupError::Corosync {
                        call: "reading the watched cmap keys",
                        detail,
                    })));
                }
                continue;
            }
            let (Some(readiness), Some(cmap)) = (this.readiness.as_ref(), this.cmap.as_ref())
            else {
                this.ended = true;
                return Poll::Ready(None);
            };
            let mut guard = match readiness.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => {
                    this.fail(format!("polling the cmap fd failed: {e}"));
                    continue;
                }
            };
            let closed = guard.ready().is_read_closed();
            let result = cmap::dispatch(&cmap.handle, DispatchFlags::All);
            if !closed {
                guard.clear_ready();
            }
            drop(guard);
            let changed = this.sink.0.load(Ordering::Acquire);
            match result {
                Ok(()) if closed && !changed => {
                    this.fail("corosync closed the connection (did corosync exit?)".into())
                }
                Ok(()) => {}
                Err(e) => this.fail(format!(
                    "cmap_dispatch returned {} (did corosync exit?)",
                    cs_error_name(e)
                )),
            }
        }
    }
}
