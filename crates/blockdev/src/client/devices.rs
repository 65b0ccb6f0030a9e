//! The shared origin and store devices, read and written directly (pread/pwrite on a
//! blocking thread; FLUSH and FUA are fdatasync).
//!
//! With `direct`, both are opened O_DIRECT so that this node never reads a stale page cache
//! of a device other nodes write: every transfer then goes through a 4 KiB-aligned buffer.
//! Transfers whose offset or length is not a multiple of [`DIRECT_ALIGN`] are served as
//! `qemu-nbd --cache=none` serves them: the covering aligned span is read, patched and
//! written back (read-modify-write). Callers hold the chunk's write permission meanwhile;
//! two unaligned writes of this process to one 4 KiB block are serialised here, but a
//! write of another node to the same 4 KiB block can be lost (docs/nbd.md).
//!
//! [`Devices::zero_blocking`] and [`Devices::discard_blocking`] make ranges read back as
//! zeroes or deallocate them with `fallocate` where the device can.
//!
//! [`DataDevice`] is the seam under the data path: [`Devices::open`] puts files or block
//! devices there; [`Devices::new`] takes any implementation (the power-cut model of the
//! crash tests, `crates/server/tests/engine/powercut.rs`). Everything above it (the sticky sync
//! failure, FUA, the volume's read and write paths) is the same code for both.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use nix::fcntl::{fallocate, FallocateFlags};

use super::aligned::{AlignedVec, DIRECT_ALIGN};
use super::uring::Ring;
use super::ClientError;
use crate::sparse::AllocRun;

/// Positioned, blocking I/O on one shared device.
pub trait DataDevice: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The open file, for io_uring; `None` keeps this device's I/O on the blocking pool.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// Writes all of `data` at `offset`; durable only after `sync_data`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write completed before the call durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Size in bytes.
    fn len(&self) -> u64;
    /// True if the device has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// For error messages (the path).
    fn name(&self) -> String;
    /// Whether transfers bypass the page cache and must be [`DIRECT_ALIGN`]-aligned.
    fn direct(&self) -> bool {
        false
    }
    /// Reads exactly `len` bytes at `offset` into a new buffer (devices may return one
    /// they read into directly, saving a copy).
    fn read_bytes(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let mut buf = vec![0u8; len];
        self.read_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    }
    /// Makes `len` bytes at `offset` read back as zeroes without writing data: with
    /// `punch` by deallocating them, else keeping them allocated. With `fast`, only ways
    /// known not to fall back to writing zeroes are tried. An error of kind
    /// `Unsupported` means nothing was changed and the caller must write zeroes itself.
    fn zero_range(&self, offset: u64, len: u64, punch: bool, fast: bool) -> io::Result<()> {
        let _ = (offset, len, punch, fast);
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Whether [`DataDevice::zero_range`] with `fast` may succeed (false once the device
    /// is known not to support it): lets FAST_ZERO fail before anything is asked.
    fn zero_is_fast(&self, punch: bool) -> bool {
        let _ = punch;
        false
    }
    /// Deallocates `len` bytes at `offset` so they read back as zeroes; an error of kind
    /// `Unsupported` means the device cannot (nothing changed).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Whether [`DataDevice::punch_hole`] may succeed (false once known not to).
    fn can_punch(&self) -> bool {
        false
    }
    /// Which parts of `[offset, offset + len)` are holes (read as zeroes): at most
    /// `max_runs` runs from `offset` on. By default all data, which is always true enough.
    fn allocation(&self, offset: u64, len: u64, max_runs: usize) -> io::Result<Vec<AllocRun>> {
        let _ = (offset, max_runs);
        Ok(vec![AllocRun { len, hole: false }])
    }
}

/// A file or block device (pread/pwrite, fdatasync), optionally O_DIRECT.
#[derive(Debug)]
struct FileDevice {
    path: PathBuf,
    file: File,
    len: u64,
    direct: bool,
    /// A block device: `FALLOC_FL_ZERO_RANGE` may write zeroes there (not fast).
    block: bool,
    /// The file system answered EOPNOTSUPP to a zeroing fallocate mode: bit 0 punch,
    /// bit 1 zero range. Later requests skip it (and FAST_ZERO fails at once).
    no_fallocate: std::sync::atomic::AtomicU8,
    /// Serialises read-modify-writes of partial O_DIRECT blocks in this process, by
    /// block number modulo the stripe count.
    rmw_stripes: [std::sync::Mutex<()>; RMW_STRIPES],
}

const RMW_STRIPES: usize = 64;
const NO_PUNCH: u8 = 1;
const NO_ZERO_RANGE: u8 = 2;

/// `offset` rounded down and `offset + len` rounded up to [`DIRECT_ALIGN`].
fn covering_span(offset: u64, len: usize) -> (u64, u64) {
    let align = DIRECT_ALIGN as u64;
    let start = offset - offset % align;
    let end = (offset + len as u64).div_ceil(align) * align;
    (start, end)
}

fn is_aligned(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(DIRECT_ALIGN)
}

fn fallocate_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// One device as the data path uses it.
#[derive(Debug)]
struct Device {
    dev: Arc<dyn DataDevice>,
    /// The first failed sync, for good: the kernel reports a lost write-back once and may
    /// then let a later sync succeed, which must not tell anyone their data is durable.
    sync_failed: std::sync::Mutex<Option<String>>,
    /// Tests: make the next sync fail as the device would.
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
}

impl Device {
    fn new(dev: Arc<dyn DataDevice>) -> Device {
        Device {
            dev,
            sync_failed: std::sync::Mutex::new(None),
            #[cfg(test)]
            fail_next_sync: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// A zeroed buffer whose usable part starts at a `DIRECT_ALIGN` boundary.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let misalign = raw.as_ptr() as usize % DIRECT_ALIGN;
        let start = (DIRECT_ALIGN - misalign) % DIRECT_ALIGN;
        AlignedBuf { raw, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl FileDevice {
    fn check_in_bounds(&self, offset: u64, len: usize) -> io::Result<()> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "transfer of {len} bytes at {offset} is outside {} ({} bytes)",
                    self.path.display(),
                    self.len
                ),
            ));
        }
        Ok(())
    }

    /// An unaligned O_DIRECT write: read the partial 4 KiB blocks at the edges of the
    /// covering span, patch `data` in, write the span back, holding the edge blocks'
    /// stripe locks so two such writes of this process to one block do not lose bytes.
    fn write_unaligned(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.check_in_bounds(offset, data.len())?;
        let (start, end) = covering_span(offset, data.len());
        let align = DIRECT_ALIGN as u64;
        let first_block = start / align;
        let last_block = end / align - 1;
        let mut stripes = [
            (first_block % RMW_STRIPES as u64) as usize,
            (last_block % RMW_STRIPES as u64) as usize,
        ];
        stripes.sort_unstable();
        let _first = self.rmw_stripes[stripes[0]]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let _second = (stripes[1] != stripes[0]).then(|| {
            self.rmw_stripes[stripes[1]]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        });
        let mut span = AlignedBuf::zeroed((end - start) as usize);
        let buf = span.as_mut_slice();
        let data_end = offset + data.len() as u64;
        if offset != start {
            self.file.read_exact_at(&mut buf[..DIRECT_ALIGN], start)?;
        }
        if data_end != end && (last_block != first_block || offset == start) {
            let at = buf.len() - DIRECT_ALIGN;
            self.file.read_exact_at(&mut buf[at..], end - align)?;
        }
        let from = (offset - start) as usize;
        buf[from..from + data.len()].copy_from_slice(data);
        self.file.write_all_at(span.as_slice(), start)
    }

    /// An unaligned O_DIRECT read: the covering aligned span, cut down.
    fn read_unaligned(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.check_in_bounds(offset, len)?;
        let (start, end) = covering_span(offset, len);
        let span_len = (end - start) as usize;
        let mut buf = AlignedVec::with_capacity(span_len);
        self.file.read_exact_at(buf.zero_filled(span_len), start)?;
        let from = (offset - start) as usize;
        Ok(buf.into_bytes().slice(from..from + len))
    }

    fn fallocate(&self, mode: FallocateFlags, flag: u8, offset: u64, len: u64) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.no_fallocate.load(Ordering::Relaxed) & flag != 0 {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} does not fit fallocate"),
            ));
        };
        match fallocate(self.file.as_raw_fd(), mode, off, n) {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = io::Error::from(e);
                if fallocate_unsupported(&e) {
                    self.no_fallocate.fetch_or(flag, Ordering::Relaxed);
                    return Err(io::ErrorKind::Unsupported.into());
                }
                Err(e)
            }
        }
    }
}

impl DataDevice for FileDevice {
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return self.file.read_exact_at(buf, offset);
        }
        if !is_aligned(offset, buf.len()) {
            let data = self.read_unaligned(offset, buf.len())?;
            buf.copy_from_slice(&data);
            return Ok(());
        }
        let mut bounce = AlignedBuf::zeroed(buf.len());
        self.file.read_exact_at(bounce.as_mut_slice(), offset)?;
        buf.copy_from_slice(bounce.as_slice());
        Ok(())
    }

    fn read_bytes(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        if !self.direct {
            let mut buf = vec![0u8; len];
            self.file.read_exact_at(&mut buf, offset)?;
            return Ok(Bytes::from(buf));
        }
        if !is_aligned(offset, len) {
            return self.read_unaligned(offset, len);
        }
        let mut buf = AlignedVec::with_capacity(len);
        self.file.read_exact_at(buf.zero_filled(len), offset)?;
        Ok(buf.into_bytes())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return self.file.write_all_at(data, offset);
        }
        if !is_aligned(offset, data.len()) {
            return self.write_unaligned(data, offset);
        }
        if (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
            return self.file.write_all_at(data, offset);
        }
        let mut bounce = AlignedBuf::zeroed(data.len());
        bounce.as_mut_slice().copy_from_slice(data);
        self.file.write_all_at(bounce.as_slice(), offset)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        self.fallocate(mode, NO_PUNCH, offset, len)
    }

    fn can_punch(&self) -> bool {
        self.no_fallocate.load(std::sync::atomic::Ordering::Relaxed) & NO_PUNCH == 0
    }

    fn zero_is_fast(&self, punch: bool) -> bool {
        let missing = self.no_fallocate.load(std::sync::atomic::Ordering::Relaxed);
        let can_punch = missing & NO_PUNCH == 0;
        let can_zero = missing & NO_ZERO_RANGE == 0 && !self.block;
        (punch && can_punch) || can_zero
    }

    fn zero_range(&self, offset: u64, len: u64, punch: bool, fast: bool) -> io::Result<()> {
        let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if punch {
            // On a block device this is a discard that must read back zeroes, never a
            // slow fallback (the kernel's BLKDEV_ZERO_NOFALLBACK).
            match self.fallocate(
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | keep,
                NO_PUNCH,
                offset,
                len,
            ) {
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                other => return other,
            }
        }
        if self.block && fast {
            // A block device's ZERO_RANGE may write zeroes: not what FAST_ZERO allows.
            return Err(io::ErrorKind::Unsupported.into());
        }
        self.fallocate(
            FallocateFlags::FALLOC_FL_ZERO_RANGE | keep,
            NO_ZERO_RANGE,
            offset,
            len,
        )
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn direct(&self) -> bool {
        self.direct
    }

    fn allocation(&self, offset: u64, len: u64, max_runs: usize) -> io::Result<Vec<AllocRun>> {
        crate::sparse::allocation(&self.file, offset, len, max_runs)
    }
}

/// The origin and the store, opened read-write.
#[derive(Debug, Clone)]
pub struct Devices {
    origin: Arc<Device>,
    store: Arc<Device>,
    /// Hot reads and writes go through io_uring where the kernel allows it.
    ring: Option<Arc<RingOwner>>,
}

/// The devices' io_uring; the last clone of the devices to go stops its reaper task.
struct RingOwner(Arc<Ring>);

impl Drop for RingOwner {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl std::fmt::Debug for RingOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("io_uring")
    }
}

/// Which of the two devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The origin device.
    Origin,
    /// The snapshot store device.
    Store,
}

fn open(path: &Path, direct: bool) -> Result<FileDevice, ClientError> {
    let err = |source| ClientError::Open {
        path: path.display().to_string(),
        source,
    };
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let mut file = options.open(path).map_err(err)?;
    // SEEK_END gives the size of regular files and block devices alike.
    let len = file.seek(SeekFrom::End(0)).map_err(err)?;
    if direct && len % DIRECT_ALIGN as u64 != 0 {
        return Err(ClientError::Geometry(format!(
            "{} is {len} bytes, not a multiple of {DIRECT_ALIGN} as O_DIRECT needs",
            path.display()
        )));
    }
    let block = file.metadata().map_err(err)?.file_type().is_block_device();
    Ok(FileDevice {
        path: path.to_owned(),
        file,
        len,
        direct,
        block,
        no_fallocate: std::sync::atomic::AtomicU8::new(0),
        rmw_stripes: std::array::from_fn(|_| std::sync::Mutex::new(())),
    })
}

impl Devices {
    /// Opens both devices read-write; `direct` opens them O_DIRECT.
    /// Inside a tokio runtime, reads and writes go through io_uring where the kernel
    /// allows it (see `uring.rs`).
    pub fn open(origin: &Path, store: &Path, direct: bool) -> Result<Devices, ClientError> {
        let mut devices = Devices::new(
            Arc::new(open(origin, direct)?),
            Arc::new(open(store, direct)?),
        );
        devices.ring = Ring::start().map(|ring| Arc::new(RingOwner(ring)));
        Ok(devices)
    }

    /// The data path over any two devices (tests: a power-cut model).
    pub fn new(origin: Arc<dyn DataDevice>, store: Arc<dyn DataDevice>) -> Devices {
        Devices {
            origin: Arc::new(Device::new(origin)),
            store: Arc::new(Device::new(store)),
            ring: None,
        }
    }

    /// Whether hot reads and writes go through io_uring (else all on the blocking pool).
    pub fn uses_io_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Whether transfers bypass the page cache (and must be aligned).
    pub fn direct(&self) -> bool {
        self.origin.dev.direct()
    }

    /// The origin device's size in bytes.
    pub fn origin_len(&self) -> u64 {
        self.origin.dev.len()
    }

    /// The store device's size in bytes.
    pub fn store_len(&self) -> u64 {
        self.store.dev.len()
    }

    fn dev(&self, which: Which) -> &Arc<Device> {
        match which {
            Which::Origin => &self.origin,
            Which::Store => &self.store,
        }
    }

    fn io_err(dev: &Device, op: &'static str, offset: u64, source: io::Error) -> ClientError {
        ClientError::Io {
            op,
            device: dev.dev.name(),
            offset,
            source,
        }
    }

    /// Reads exactly `len` bytes at `offset`. Blocking.
    pub fn read_blocking(
        &self,
        which: Which,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ClientError> {
        let dev = self.dev(which);
        dev.dev
            .read_bytes(offset, len)
            .map_err(|e| Self::io_err(dev, "reading", offset, e))
    }

    /// Writes `data` at `offset`; with `sync` (FUA), makes it durable before returning.
    /// Blocking.
    pub fn write_blocking(
        &self,
        which: Which,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<(), ClientError> {
        let dev = self.dev(which);
        dev.dev
            .write_at(data, offset)
            .map_err(|e| Self::io_err(dev, "writing", offset, e))?;
        if sync {
            self.sync_blocking(which)?;
        }
        Ok(())
    }

    /// Flushes a device (fdatasync). After one failure every later sync fails too (see
    /// `Device::sync_failed`): the data the failure lost is not coming back. Blocking.
    pub fn sync_blocking(&self, which: Which) -> Result<(), ClientError> {
        let dev = self.dev(which);
        let sticky = || {
            dev.sync_failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        };
        if let Some(first) = sticky() {
            return Err(Self::io_err(
                dev,
                "syncing",
                0,
                io::Error::other(format!(
                    "an earlier sync failed ({first}); writes since may be lost"
                )),
            ));
        }
        #[cfg(test)]
        let injected = dev
            .fail_next_sync
            .swap(false, std::sync::atomic::Ordering::AcqRel)
            .then(|| io::Error::from_raw_os_error(libc::EIO));
        #[cfg(not(test))]
        let injected: Option<io::Error> = None;
        let outcome = match injected {
            Some(e) => Err(e),
            None => dev.dev.sync_data(),
        };
        outcome.map_err(|e| {
            *dev.sync_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            Self::io_err(dev, "syncing", 0, e)
        })
    }

    /// Makes `len` bytes at `offset` read back as zeroes: deallocated (`punch`) or kept
    /// allocated by `fallocate` where the device can, else (unless `fast`) by writing
    /// zeroes. With `fast`, a device that would need written zeroes is left unchanged
    /// and the answer is `ClientError::Unsupported`. With `sync` (FUA), durable before
    /// returning. Blocking.
    pub fn zero_blocking(
        &self,
        which: Which,
        offset: u64,
        len: u64,
        punch: bool,
        fast: bool,
        sync: bool,
    ) -> Result<(), ClientError> {
        let dev = self.dev(which);
        match dev.dev.zero_range(offset, len, punch, fast) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Unsupported && fast => {
                return Err(ClientError::Unsupported(format!(
                    "fast zero: {} cannot zero {len} bytes at {offset} without writing them",
                    dev.dev.name()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                self.write_zero_buffers(which, offset, len)?
            }
            Err(e) => return Err(Self::io_err(dev, "zeroing", offset, e)),
        }
        if sync {
            self.sync_blocking(which)?;
        }
        Ok(())
    }

    /// Whether [`Devices::discard_blocking`] may deallocate anything on `which`.
    pub fn can_punch(&self, which: Which) -> bool {
        self.dev(which).dev.can_punch()
    }

    /// Whether [`Devices::zero_blocking`] with `fast` may succeed on `which`.
    pub fn zero_is_fast(&self, which: Which, punch: bool) -> bool {
        self.dev(which).dev.zero_is_fast(punch)
    }

    /// Writes zeroes with plain writes, in aligned pieces of at most 1 MiB.
    fn write_zero_buffers(&self, which: Which, offset: u64, len: u64) -> Result<(), ClientError> {
        const PIECE: u64 = 1 << 20;
        let zeroes = AlignedBuf::zeroed(PIECE.min(len) as usize);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE) as usize;
            self.write_blocking(which, offset + done, &zeroes.as_slice()[..n], false)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Deallocates `len` bytes at `offset` if the device can (their contents become
    /// zeroes); a device that cannot keeps them as they are (TRIM is advisory). Blocking.
    pub fn discard_blocking(
        &self,
        which: Which,
        offset: u64,
        len: u64,
        sync: bool,
    ) -> Result<(), ClientError> {
        let dev = self.dev(which);
        match dev.dev.punch_hole(offset, len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
            Err(e) => return Err(Self::io_err(dev, "discarding", offset, e)),
        }
        if sync {
            self.sync_blocking(which)?;
        }
        Ok(())
    }

    /// Runs `work` on a clone of these devices on tokio's blocking pool; a task that
    /// panicked or was cancelled is reported as an error naming `what`.
    async fn on_blocking_pool<T: Send + 'static>(
        &self,
        what: &'static str,
        work: impl FnOnce(&Devices) -> Result<T, ClientError> + Send + 'static,
    ) -> Result<T, ClientError> {
        let devs = self.clone();
        tokio::task::spawn_blocking(move || work(&devs))
            .await
            .unwrap_or_else(|e| Err(ClientError::Geometry(format!("{what} task failed: {e}"))))
    }

    /// [`Devices::zero_blocking`] on tokio's blocking pool.
    pub(crate) async fn zero(
        &self,
        which: Which,
        offset: u64,
        len: u64,
        punch: bool,
        fast: bool,
        sync: bool,
    ) -> Result<(), ClientError> {
        self.on_blocking_pool("zero", move |devs| {
            devs.zero_blocking(which, offset, len, punch, fast, sync)
        })
        .await
    }

    /// [`Devices::discard_blocking`] on tokio's blocking pool.
    pub(crate) async fn discard(
        &self,
        which: Which,
        offset: u64,
        len: u64,
        sync: bool,
    ) -> Result<(), ClientError> {
        self.on_blocking_pool("discard", move |devs| {
            devs.discard_blocking(which, offset, len, sync)
        })
        .await
    }

    /// The holes and data of `[offset, offset + len)` (see [`DataDevice::allocation`]), on
    /// tokio's blocking pool.
    pub(crate) async fn allocation(
        &self,
        which: Which,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<AllocRun>, ClientError> {
        self.on_blocking_pool("seek", move |devs| {
            let dev = devs.dev(which);
            dev.dev
                .allocation(offset, len, max_runs)
                .map_err(|e| Self::io_err(dev, "finding holes in", offset, e))
        })
        .await
    }

    /// The ring and file descriptor for a transfer of `len` bytes at `offset` from or
    /// to `buf` (`None`: a buffer of our own, aligned), if io_uring can do it as it is:
    /// a file device, inside it, and aligned under O_DIRECT. Everything else (unaligned
    /// read-modify-writes, errors to explain) stays on the blocking pool.
    fn uring_for(
        &self,
        which: Which,
        offset: u64,
        len: usize,
        buf: Option<&[u8]>,
    ) -> Option<(&Arc<Ring>, RawFd)> {
        let ring = &self.ring.as_ref()?.0;
        let dev = &self.dev(which).dev;
        let fd = dev.raw_fd()?;
        if offset.checked_add(len as u64)? > dev.len() {
            return None;
        }
        let aligned_buf = buf.is_none_or(|b| (b.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
        if dev.direct() && !(is_aligned(offset, len) && aligned_buf) {
            return None;
        }
        Some((ring, fd))
    }

    /// Reads exactly `len` bytes at `offset`: through io_uring where it can, else on
    /// tokio's blocking pool ([`Devices::read_blocking`]).
    pub(crate) async fn read(
        &self,
        which: Which,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ClientError> {
        if let Some((ring, fd)) = self.uring_for(which, offset, len, None) {
            match ring.read(fd, offset, len).await {
                Some(Ok(data)) if data.len() == len => return Ok(data),
                Some(Err(e)) => return Err(Self::io_err(self.dev(which), "reading", offset, e)),
                // Ring full, or a short read: the pool's read finishes it or says why.
                Some(Ok(_)) | None => {}
            }
        }
        self.on_blocking_pool("read", move |devs| devs.read_blocking(which, offset, len))
            .await
    }

    /// Writes `data` at `offset`; with `sync` (FUA), durable before returning. Through
    /// io_uring where it can, else on tokio's blocking pool ([`Devices::write_blocking`]).
    pub(crate) async fn write(
        &self,
        which: Which,
        offset: u64,
        data: Bytes,
        sync: bool,
    ) -> Result<(), ClientError> {
        if let Some((ring, fd)) = self.uring_for(which, offset, data.len(), Some(&data)) {
            match ring.write(fd, offset, data.clone()).await {
                Some(Ok(n)) if n == data.len() => {
                    return match sync {
                        true => self.sync(which).await,
                        false => Ok(()),
                    };
                }
                Some(Err(e)) => return Err(Self::io_err(self.dev(which), "writing", offset, e)),
                // Ring full, or a short write: the pool writes it all (again).
                Some(Ok(_)) | None => {}
            }
        }
        self.on_blocking_pool("write", move |devs| {
            devs.write_blocking(which, offset, &data, sync)
        })
        .await
    }

    /// [`Devices::sync_blocking`] on tokio's blocking pool.
    pub(crate) async fn sync(&self, which: Which) -> Result<(), ClientError> {
        self.on_blocking_pool("sync", move |devs| devs.sync_blocking(which))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::future::Future;

    /// Files for a [`Devices`] under test; `None` (and a note) where O_DIRECT is
    /// refused by the file system.
    fn open_devices(dir: &Path, len: u64, direct: bool) -> Option<Devices> {
        let (o, s) = (dir.join("o"), dir.join("s"));
        File::create(&o).unwrap().set_len(len).unwrap();
        File::create(&s).unwrap().set_len(len).unwrap();
        match Devices::open(&o, &s, direct) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("skipping: cannot open with direct={direct} here: {e}");
                None
            }
        }
    }

    /// Many tasks at once, each writing and reading back its own region at random
    /// offsets and sizes (aligned and not), on both devices: what reads back is what a
    /// model says, whichever path (io_uring or the pool) served each request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_transfers_through_the_ring_match_a_model() {
        let seed = csnap_proto::testing::seed(
            "concurrent_transfers_through_the_ring_match_a_model",
            "CSNAP_DEVICES_SEED",
        );
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            const REGION: u64 = 256 << 10;
            const TASKS: u64 = 16;
            let Some(devs) = open_devices(dir.path(), REGION * TASKS, direct) else {
                continue;
            };
            if !devs.uses_io_uring() {
                eprintln!("note: io_uring unavailable here; only the pool path is tested");
            }
            let mut tasks = Vec::new();
            for t in 0..TASKS {
                let devs = devs.clone();
                tasks.push(tokio::spawn(async move {
                    let mut rng =
                        rand::rngs::StdRng::seed_from_u64(seed ^ (t << 32) ^ direct as u64);
                    let which = if t % 2 == 0 {
                        Which::Origin
                    } else {
                        Which::Store
                    };
                    let base = t * REGION;
                    let mut model = vec![0u8; REGION as usize];
                    for _ in 0..200 {
                        let aligned = rng.gen_bool(0.8);
                        let (off, len) = if aligned {
                            let blocks = REGION / 4096;
                            let first = rng.gen_range(0..blocks);
                            let n = rng.gen_range(1..=(blocks - first).min(16));
                            (first * 4096, n * 4096)
                        } else {
                            let off = rng.gen_range(0..REGION - 1);
                            (off, rng.gen_range(1..=(REGION - off).min(10_000)))
                        };
                        if rng.gen_bool(0.5) {
                            let mut buf = AlignedVec::with_capacity(len as usize);
                            buf.vec_mut().extend((0..len).map(|_| rng.gen::<u8>()));
                            let data = buf.into_bytes();
                            model[off as usize..(off + len) as usize].copy_from_slice(&data);
                            devs.write(which, base + off, data, rng.gen_bool(0.1))
                                .await
                                .unwrap();
                        } else {
                            let got = devs.read(which, base + off, len as usize).await.unwrap();
                            assert_eq!(
                                &got[..],
                                &model[off as usize..(off + len) as usize],
                                "seed {seed}: task {t} read {len} at {off} (direct {direct})"
                            );
                        }
                    }
                    let all = devs.read(which, base, REGION as usize).await.unwrap();
                    assert!(
                        all[..] == model[..],
                        "seed {seed}: task {t} region differs at the end"
                    );
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
        }
    }

    /// A request dropped while the kernel works on it leaves its buffer with the ring
    /// until the completion comes; later requests are unaffected, and the ring (and its
    /// reaper) go away with the last clone of the devices.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_requests_and_dropped_devices_free_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let Some(devs) = open_devices(dir.path(), 8 << 20, true) else {
            return;
        };
        let Some(ring) = devs.ring.as_ref().map(|r| Arc::downgrade(&r.0)) else {
            eprintln!("skipping: io_uring unavailable here");
            return;
        };
        let pattern = {
            let mut buf = AlignedVec::with_capacity(1 << 20);
            buf.vec_mut()
                .extend((0..1u32 << 20).map(|i| (i % 251) as u8));
            buf.into_bytes()
        };
        for round in 0..50u64 {
            let offset = (round % 8) << 20;
            // Started and dropped at once: polled once, so submitted, then abandoned.
            let mut write = Box::pin(devs.write(Which::Origin, offset, pattern.clone(), false));
            let mut read = Box::pin(devs.read(Which::Origin, offset, 1 << 20));
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            let _ = write.as_mut().poll(&mut cx);
            let _ = read.as_mut().poll(&mut cx);
            drop((write, read));
        }
        devs.write(Which::Origin, 0, pattern.clone(), true)
            .await
            .unwrap();
        assert_eq!(devs.read(Which::Origin, 0, 1 << 20).await.unwrap(), pattern);
        drop(devs);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ring.upgrade().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the ring outlived its devices by 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [4096, 8192, 65536] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
            assert_eq!(b.as_mut_slice().len(), len);
        }
    }

    #[tokio::test]
    async fn direct_io_round_trips_and_serves_unaligned_transfers() {
        let dir = tempfile::tempdir().unwrap();
        let (o, s) = (dir.path().join("o"), dir.path().join("s"));
        File::create(&o).unwrap().set_len(1 << 20).unwrap();
        File::create(&s).unwrap().set_len(1 << 20).unwrap();
        let devs = match Devices::open(&o, &s, true) {
            Ok(d) => d,
            Err(e) => {
                // Some file systems (tmpfs) have no O_DIRECT.
                eprintln!("skipping: no O_DIRECT here: {e}");
                return;
            }
        };
        assert!(devs.direct());
        let data = Bytes::from((0..8192u32).map(|i| i as u8).collect::<Vec<u8>>());
        devs.write(Which::Origin, 4096, data.clone(), true)
            .await
            .unwrap();
        assert_eq!(devs.read(Which::Origin, 4096, 8192).await.unwrap(), data);
        // Unaligned: read-modify-write of the covering 4 KiB blocks.
        devs.write(Which::Store, 100, Bytes::from_static(b"short"), false)
            .await
            .unwrap();
        assert_eq!(
            &devs.read(Which::Store, 98, 9).await.unwrap()[..],
            b"\0\0short\0\0"
        );
        assert_eq!(
            &devs.read(Which::Origin, 4095, 3).await.unwrap()[..],
            &[0, 0, 1],
            "a read across a block boundary"
        );
        let err = devs.read(Which::Store, (1 << 20) - 2, 4).await.unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
    }

    /// Random unaligned reads and writes under O_DIRECT against a model, from several
    /// threads at once on disjoint byte ranges that share 4 KiB blocks: the stripe locks
    /// keep each thread's bytes (seed printed; CSNAP_SEED replays it).
    #[test]
    fn unaligned_direct_io_matches_a_model() {
        use rand::{Rng, SeedableRng};
        let seed = csnap_proto::testing::seed("unaligned_direct_io_matches_a_model", "CSNAP_SEED");
        let dir = tempfile::tempdir().unwrap();
        let (o, s) = (dir.path().join("o"), dir.path().join("s"));
        const LEN: usize = 256 << 10;
        File::create(&o).unwrap().set_len(LEN as u64).unwrap();
        File::create(&s).unwrap().set_len(LEN as u64).unwrap();
        let Ok(devs) = Devices::open(&o, &s, true) else {
            eprintln!("skipping: no O_DIRECT here");
            return;
        };
        // Thread t owns the bytes whose index / 512 is t modulo THREADS: every 4 KiB
        // block is shared by all of them.
        const THREADS: usize = 4;
        let models: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let devs = devs.clone();
                    scope.spawn(move || {
                        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ t as u64);
                        let mut model = vec![0u8; LEN];
                        for _ in 0..300 {
                            let sector = rng.gen_range(0..LEN / 512 / THREADS) * THREADS + t;
                            let start = sector * 512 + rng.gen_range(0..512);
                            let n = rng.gen_range(1..=(sector + 1) * 512 - start);
                            if rng.gen_bool(0.6) {
                                let data: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                                devs.write_blocking(Which::Origin, start as u64, &data, false)
                                    .unwrap();
                                model[start..start + n].copy_from_slice(&data);
                            } else {
                                let got =
                                    devs.read_blocking(Which::Origin, start as u64, n).unwrap();
                                assert_eq!(&got[..], &model[start..start + n], "seed {seed}");
                            }
                        }
                        model
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let all = devs.read_blocking(Which::Origin, 0, LEN).unwrap();
        for (i, byte) in all.iter().enumerate() {
            let owner = (i / 512) % THREADS;
            assert_eq!(*byte, models[owner][i], "byte {i} (seed {seed})");
        }
    }

    fn allocated_bytes(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[tokio::test]
    async fn zeroing_punches_or_keeps_allocation_and_discard_frees() {
        let dir = tempfile::tempdir().unwrap();
        let (o, s) = (dir.path().join("o"), dir.path().join("s"));
        for p in [&o, &s] {
            std::fs::write(p, vec![0xabu8; 1 << 20]).unwrap();
        }
        let devs = Devices::open(&o, &s, false).unwrap();
        assert!(devs.zero_is_fast(Which::Origin, true));
        let before = allocated_bytes(&o);
        devs.zero(Which::Origin, 64 << 10, 256 << 10, true, true, true)
            .await
            .unwrap();
        assert!(
            allocated_bytes(&o) <= before - (256 << 10),
            "punched: {} -> {}",
            before,
            allocated_bytes(&o)
        );
        let store_before = allocated_bytes(&s);
        devs.zero(Which::Store, 0, 128 << 10, false, true, false)
            .await
            .unwrap();
        assert_eq!(allocated_bytes(&s), store_before, "ZERO_RANGE keeps blocks");
        devs.discard(Which::Origin, 512 << 10, 128 << 10, false)
            .await
            .unwrap();
        let origin = std::fs::read(&o).unwrap();
        let store = std::fs::read(&s).unwrap();
        for (i, b) in origin.iter().enumerate() {
            let zero = (64 << 10..320 << 10).contains(&i) || (512 << 10..640 << 10).contains(&i);
            assert_eq!(*b, if zero { 0 } else { 0xab }, "origin byte {i}");
        }
        for (i, b) in store.iter().enumerate() {
            assert_eq!(*b, if i < 128 << 10 { 0 } else { 0xab }, "store byte {i}");
        }
    }

    /// Issue 8 (the client's side of finding 8): after a failed sync a later one must not
    /// report success for writes the failure may have lost.
    #[tokio::test]
    async fn a_failed_sync_stays_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (o, st) = (dir.path().join("o"), dir.path().join("s"));
        for p in [&o, &st] {
            std::fs::File::create(p).unwrap().set_len(1 << 20).unwrap();
        }
        let d = Devices::open(&o, &st, false).unwrap();
        d.sync(Which::Origin).await.unwrap();
        d.origin
            .fail_next_sync
            .store(true, std::sync::atomic::Ordering::Release);
        assert!(d.sync(Which::Origin).await.is_err(), "the injected failure");
        let again = d.sync(Which::Origin).await;
        assert!(
            matches!(&again, Err(e) if e.to_string().contains("an earlier sync failed")),
            "a later sync must fail too: {again:?}"
        );
        d.sync(Which::Store)
            .await
            .expect("the other device is unaffected");
    }
}
