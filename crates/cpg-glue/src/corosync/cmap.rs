//! [`Cmap`]: reading corosync's configuration map (rust-corosync's cmap binding), and
//! [`ConfigWatch`], a stream of csnap configurations after each change (e.g. a
//! `corosync-cfgtool -R` reload).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use rust_corosync::cmap;
use rust_corosync::DispatchFlags;
use tokio::io::unix::AsyncFd;

use super::{call_error, connect_error, cs_error_name, register_fd, LibraryFd};
use crate::config::CsnapConfig;
use crate::GroupError;

/// The key prefixes csnap's configuration lives under.
const CONFIG_PREFIXES: [&str; 2] = ["csnap.", "nodelist."];

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
    /// while it runs; a concurrent reload is reported by [`ConfigWatch`] anyway.)
    pub fn get_prefix(&self, prefix: &str) -> Result<BTreeMap<String, String>, GroupError> {
        let iter = cmap::CmapIterStart::new(&self.handle, prefix)
            .map_err(|e| call_error("cmap_iter_init", e))?;
        let mut out = BTreeMap::new();
        for item in iter {
            let value = render(item.key_name(), item.data())?;
            out.insert(item.key_name().to_string(), value);
        }
        Ok(out)
    }

    /// The csnap configuration as it is now (`csnap.*` and `nodelist.*`).
    pub fn csnap_config(&self) -> Result<CsnapConfig, GroupError> {
        let mut keys = BTreeMap::new();
        for prefix in CONFIG_PREFIXES {
            keys.append(&mut self.get_prefix(prefix)?);
        }
        CsnapConfig::from_cmap(&keys)
    }

    /// Stream of reload notices: yields the new CsnapConfig (or the error parsing it)
    /// whenever any key under `csnap.` or `nodelist.` changes (e.g. corosync-cfgtool -R).
    ///
    /// Read [`Cmap::csnap_config`] first, then watch. Items equal to the previous one
    /// (initially: the configuration when the watch started) are not repeated, so one
    /// reload that touches many keys yields one item. Must be called inside a tokio
    /// runtime context.
    pub fn watch(self) -> Result<ConfigWatch, GroupError> {
        let fd = cmap::fd_get(&self.handle).map_err(|e| call_error("cmap_fd_get", e))?;
        let readiness = register_fd(fd, "cmap")?;
        let sink = Box::new(ChangeFlag(AtomicBool::new(false)));
        let mut watch = ConfigWatch {
            readiness: Some(readiness),
            tracks: Vec::new(),
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
        if let Some(c) = &watch.cmap {
            for prefix in CONFIG_PREFIXES {
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
        }
        watch.last = Some(watch.read_config());
        Ok(watch)
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

/// The result of reading the configuration, comparable so repeats can be skipped.
type ReadResult = Result<CsnapConfig, ReadFailure>;

/// Why reading the configuration failed, in a form that can be compared and cloned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReadFailure {
    Config { key: String, detail: String },
    Other(String),
}

impl From<GroupError> for ReadFailure {
    fn from(e: GroupError) -> Self {
        match e {
            GroupError::Config { key, detail } => ReadFailure::Config { key, detail },
            other => ReadFailure::Other(other.to_string()),
        }
    }
}

impl From<ReadFailure> for GroupError {
    fn from(f: ReadFailure) -> Self {
        match f {
            ReadFailure::Config { key, detail } => GroupError::Config { key, detail },
            ReadFailure::Other(detail) => GroupError::Corosync {
                call: "reading the csnap configuration from cmap",
                detail,
            },
        }
    }
}

/// A stream of csnap configurations, one after each change of `csnap.*` or `nodelist.*`
/// keys (see [`Cmap::watch`]). Parse failures are yielded as [`GroupError::Config`] items
/// and the stream goes on; a lost connection is yielded as [`GroupError::Disconnected`],
/// after which the stream ends.
pub struct ConfigWatch {
    /// Dropped before the cmap handle (the library owns the fd).
    readiness: Option<AsyncFd<LibraryFd>>,
    tracks: Vec<cmap::TrackHandle>,
    last: Option<ReadResult>,
    /// Freed after the handle is finalized (field order and Drop below).
    sink: Box<ChangeFlag>,
    failed: Option<GroupError>,
    ended: bool,
    cmap: Option<Cmap>,
}

impl ConfigWatch {
    fn read_config(&self) -> ReadResult {
        match &self.cmap {
            Some(c) => c.csnap_config().map_err(ReadFailure::from),
            None => Err(ReadFailure::Other("cmap connection closed".to_string())),
        }
    }

    fn shut_down(&mut self) {
        self.readiness = None;
        if let Some(c) = self.cmap.take() {
            for t in self.tracks.drain(..) {
                let _ = cmap::track_delete(&c.handle, t);
            }
            // Dropping the handle finalizes it.
        }
    }

    fn fail(&mut self, detail: String) {
        self.failed = Some(GroupError::Disconnected {
            group: "cmap".to_string(),
            detail,
        });
        self.shut_down();
    }
}

impl Drop for ConfigWatch {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl Stream for ConfigWatch {
    type Item = Result<CsnapConfig, GroupError>;

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
                let now = this.read_config();
                if this.last.as_ref() != Some(&now) {
                    this.last = Some(now.clone());
                    return Poll::Ready(Some(now.map_err(GroupError::from)));
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
