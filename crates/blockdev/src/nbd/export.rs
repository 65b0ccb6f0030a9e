//! What the NBD server serves: a set of named exports ([`Exports`]) and the block I/O on
//! one of them ([`Export`]). The server knows nothing else about its backends, so the
//! regular-file backend ([`super::FileExports`]) and the csnap origin/snapshot backends
//! plug in the same way.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use super::consts::*;

/// A boxed, sendable future: keeps [`Export`] and [`Exports`] object safe, so one server
/// can serve exports of different backend types side by side.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE` and enforced on requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable unit; offsets and lengths must be multiples (1 = byte access).
    pub minimum: u32,
    /// Size and alignment for efficient I/O.
    pub preferred: u32,
    /// Largest READ or WRITE payload accepted.
    pub maximum_payload: u32,
}

impl Default for BlockSizes {
    /// The protocol defaults: byte granularity, 4 KiB preferred, 32 MiB payloads.
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum_payload: 32 << 20,
        }
    }
}

impl BlockSizes {
    /// Checks the rules of the protocol's "Size constraints" section, so a backend cannot
    /// make the server advertise something clients must reject.
    pub fn validate(&self) -> Result<(), String> {
        let BlockSizes {
            minimum,
            preferred,
            maximum_payload,
        } = *self;
        if !minimum.is_power_of_two() || minimum > 65536 {
            return Err(format!(
                "minimum block size {minimum} is not a power of two <= 65536"
            ));
        }
        if !preferred.is_power_of_two() || preferred < minimum.max(512) {
            return Err(format!(
                "preferred block size {preferred} is not a power of two >= max(minimum, 512)"
            ));
        }
        if maximum_payload < preferred {
            return Err(format!(
                "maximum payload {maximum_payload} is below the preferred block size {preferred}"
            ));
        }
        Ok(())
    }
}

/// Optional operations an export supports beyond READ/WRITE. Each one maps to a
/// transmission flag; a flag is only advertised when the backend really provides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportFeatures {
    /// FLUSH makes every completed write durable.
    pub flush: bool,
    /// Writes with FUA are durable before their reply.
    pub fua: bool,
    /// TRIM is honoured (it may deallocate).
    pub trim: bool,
    /// WRITE_ZEROES is implemented efficiently.
    pub write_zeroes: bool,
    /// WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO fails with ENOTSUP at once when the
    /// zeroing would be no faster than writing zeroes (NBD_FLAG_SEND_FAST_ZERO). Only
    /// advertised together with `write_zeroes`.
    pub fast_zero: bool,
    /// FLUSH and FUA on one connection cover writes completed on every other connection
    /// to the same export (NBD_FLAG_CAN_MULTI_CONN).
    pub multi_conn: bool,
    /// The storage seeks (NBD_FLAG_ROTATIONAL), a hint for client schedulers.
    pub rotational: bool,
}

impl Default for ExportFeatures {
    fn default() -> Self {
        ExportFeatures {
            flush: true,
            fua: true,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            multi_conn: false,
            rotational: false,
        }
    }
}

/// An export as it is described during the handshake (OPT_LIST, OPT_INFO, OPT_GO).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// The name the client asked for (and is told).
    pub name: String,
    /// A line for `nbdinfo` and the like (NBD_INFO_DESCRIPTION).
    pub description: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Refuses writes (NBD_FLAG_READ_ONLY).
    pub read_only: bool,
    /// What it supports beyond reads and writes.
    pub features: ExportFeatures,
    /// Its minimum, preferred and maximum block sizes.
    pub block_sizes: BlockSizes,
}

impl ExportInfo {
    /// Describes an opened export under the name the client used.
    pub fn of(name: &str, export: &dyn Export) -> ExportInfo {
        ExportInfo {
            name: name.to_owned(),
            description: export.description(),
            size: export.size(),
            read_only: export.read_only(),
            features: export.features(),
            block_sizes: export.block_sizes(),
        }
    }

    /// The 16-bit transmission flags for this export. Write-only features are not
    /// advertised on a read-only export: clients would only get EPERM.
    pub fn transmission_flags(&self) -> u16 {
        let f = &self.features;
        let mut flags = TFLAG_HAS_FLAGS;
        if self.read_only {
            flags |= TFLAG_READ_ONLY;
        }
        if f.flush {
            flags |= TFLAG_SEND_FLUSH;
        }
        if f.rotational {
            flags |= TFLAG_ROTATIONAL;
        }
        if f.multi_conn {
            flags |= TFLAG_CAN_MULTI_CONN;
        }
        if !self.read_only {
            if f.fua {
                flags |= TFLAG_SEND_FUA;
            }
            if f.trim {
                flags |= TFLAG_SEND_TRIM;
            }
            if f.write_zeroes {
                flags |= TFLAG_SEND_WRITE_ZEROES;
                if f.fast_zero {
                    flags |= TFLAG_SEND_FAST_ZERO;
                }
            }
        }
        flags
    }
}

/// What a read returns, and a reply carries: one buffer, or consecutive parts written one
/// after the other (a read gathered from several places is sent without joining them).
/// Not `PartialEq`: equal bytes may be split differently; compare the parts' bytes.
#[derive(Clone, Debug, Default)]
pub struct Payload {
    first: Bytes,
    rest: Vec<Bytes>,
}

impl Payload {
    /// The parts in order; their concatenation is the payload.
    pub fn from_parts(parts: Vec<Bytes>) -> Payload {
        let mut parts = parts.into_iter().filter(|p| !p.is_empty());
        Payload {
            first: parts.next().unwrap_or_default(),
            rest: parts.collect(),
        }
    }

    /// Bytes in all parts.
    pub fn len(&self) -> usize {
        self.first.len() + self.rest.iter().map(Bytes::len).sum::<usize>()
    }

    /// No bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The parts, in order.
    pub fn parts(&self) -> impl Iterator<Item = &Bytes> {
        std::iter::once(&self.first).chain(&self.rest)
    }
}

impl From<Bytes> for Payload {
    fn from(first: Bytes) -> Payload {
        Payload {
            first,
            rest: Vec::new(),
        }
    }
}

/// One opened export. Requests reaching these methods are already validated by the
/// server: inside `0..size()`, aligned to `block_sizes().minimum`, payload within
/// `maximum_payload`, and never a write to a read-only export. Errors are `io::Error`s;
/// their errno is mapped to the nearest NBD error (unknown ones become EIO).
pub trait Export: Send + Sync + 'static {
    /// Size in bytes, fixed for the lifetime of this handle.
    fn size(&self) -> u64;
    /// Refuses writes.
    fn read_only(&self) -> bool;
    /// What it supports beyond reads and writes (default: nothing).
    fn features(&self) -> ExportFeatures {
        ExportFeatures::default()
    }
    /// Its block sizes (default: the protocol's defaults).
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }
    /// A line for `nbdinfo` and the like (default: none).
    fn description(&self) -> Option<String> {
        None
    }
    /// Reads exactly `len` bytes at `offset`.
    fn read_at(&self, offset: u64, len: u32) -> BoxFuture<'_, io::Result<Payload>>;
    /// Writes `data` at `offset`; with `fua` the data is durable before this resolves.
    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, io::Result<()>>;
    /// Makes every write completed so far durable.
    fn flush(&self) -> BoxFuture<'_, io::Result<()>>;
    /// Makes `len` bytes at `offset` read back as zeroes. `may_trim` allows deallocating
    /// the range (the client did not send NBD_CMD_FLAG_NO_HOLE). With `fast` (the client
    /// sent NBD_CMD_FLAG_FAST_ZERO, only when `features().fast_zero`), fail with an
    /// `EOPNOTSUPP` error, changing nothing, when the zeroing would have to write data.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
        fast: bool,
    ) -> BoxFuture<'_, io::Result<()>>;
    /// Hints that the range is no longer needed; its contents become unspecified.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, io::Result<()>>;
    /// The metadata contexts this export offers (NBD_OPT_LIST_META_CONTEXT and
    /// NBD_OPT_SET_META_CONTEXT match queries against them). None by default.
    fn meta_contexts(&self) -> BoxFuture<'_, io::Result<Vec<MetaContext>>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// NBD_CMD_BLOCK_STATUS for one selected context: consecutive extents starting at
    /// `offset` (already checked: `len > 0`, inside the export, aligned to the minimum
    /// block size). They may cover less than `len` (at least one extent) or more; the
    /// server clips them to the reply's rules. Extent boundaries must be multiples of
    /// `block_sizes().minimum`, except at the end of the export.
    fn block_status<'a>(
        &'a self,
        context: &'a MetaContext,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, io::Result<Vec<Extent>>> {
        let _ = (offset, len);
        Box::pin(async move {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("metadata context {:?} is not offered", context.name),
            ))
        })
    }
}

/// A metadata context an export offers, such as `base:allocation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContext {
    /// The full name, `namespace:leaf`.
    pub name: String,
    /// Backend-private (csnap: the snapshot id a dirty bitmap compares with), handed back
    /// to [`Export::block_status`] unchanged, so a name resolved when the client selected
    /// it keeps meaning the same thing.
    pub tag: u64,
}

impl MetaContext {
    /// The context `name` with the backend's `tag`.
    pub fn new(name: impl Into<String>, tag: u64) -> MetaContext {
        MetaContext {
            name: name.into(),
            tag,
        }
    }
}

/// One run of block status: `len` bytes (non-zero) with context-defined `flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes, non-zero.
    pub len: u64,
    /// The context's flags for them (e.g. NBD_STATE_HOLE).
    pub flags: u32,
}

/// The set of exports a server offers.
pub trait Exports: Send + Sync + 'static {
    /// The exports as they are now (for OPT_LIST).
    fn list(&self) -> BoxFuture<'_, io::Result<Vec<ExportInfo>>>;
    /// Opens an export by the name the client sent; the empty name selects the default
    /// export, if there is one. `Ok(None)` means no such export.
    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Option<Arc<dyn Export>>>>;
}
