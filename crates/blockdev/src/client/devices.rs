//! The shared origin and store devices, read and written directly (pread/pwrite on a
//! blocking thread; FLUSH and FUA are fdatasync).
//!
//! With `direct`, both are opened O_DIRECT so that this node never reads a stale page cache
//! of a device other nodes write: every transfer then goes through a 4 KiB-aligned bounce
//! buffer, and offsets and lengths must be multiples of [`DIRECT_ALIGN`] (the exports
//! advertise that as their minimum block size).
//!
//! [`DataDevice`] is the seam under the data path: [`Devices::open`] puts files or block
//! devices there; [`Devices::new`] takes any implementation (the power-cut model of the
//! crash tests, `crates/server/tests/engine/powercut.rs`). Everything above it (the sticky sync
//! failure, FUA, the volume's read and write paths) is the same code for both.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::ClientError;
use crate::sparse::AllocRun;

/// Alignment of O_DIRECT transfers (offsets, lengths and buffer addresses).
pub const DIRECT_ALIGN: usize = 4096;

/// Positioned, blocking I/O on one shared device.
pub trait DataDevice: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
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
    /// Which parts of `[offset, offset + len)` are holes (read as zeroes): at most
    /// `max_runs` runs from `offset` on. By default all data, which is always true enough.
    fn allocation(&self, offset: u64, len: u64, max_runs: usize) -> io::Result<Vec<AllocRun>> {
        let _ = (offset, max_runs);
        Ok(vec![AllocRun { len, hole: false }])
    }
}

/// Bytes that start at a [`DIRECT_ALIGN`] boundary, handed out as [`Bytes`] without a
/// copy: O_DIRECT reads land in them and NBD write payloads are received into them, so
/// neither needs a bounce buffer.
#[derive(Debug)]
pub(crate) struct AlignedVec {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedVec {
    /// Room for `len` aligned bytes; holds none yet. The allocation never moves (nothing
    /// may append more than `len`), so the start stays aligned.
    pub(crate) fn with_capacity(len: usize) -> AlignedVec {
        let mut raw = Vec::with_capacity(len + DIRECT_ALIGN);
        let start = (DIRECT_ALIGN - raw.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
        raw.resize(start, 0);
        AlignedVec { raw, start }
    }

    /// The aligned bytes held so far.
    pub(crate) fn len(&self) -> usize {
        self.raw.len() - self.start
    }

    /// The vector to append to (at most the `len` given at creation, in total).
    pub(crate) fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.raw
    }

    pub(crate) fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedVec {
    fn as_ref(&self) -> &[u8] {
        &self.raw[self.start..]
    }
}

/// A file or block device (pread/pwrite, fdatasync), optionally O_DIRECT.
#[derive(Debug)]
struct FileDevice {
    path: PathBuf,
    file: File,
    len: u64,
    direct: bool,
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

fn check_aligned(direct: bool, offset: u64, len: usize) -> io::Result<()> {
    if direct && (!offset.is_multiple_of(DIRECT_ALIGN as u64) || !len.is_multiple_of(DIRECT_ALIGN))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "O_DIRECT transfer of {len} bytes at {offset} is not {DIRECT_ALIGN}-byte aligned"
            ),
        ));
    }
    Ok(())
}

impl DataDevice for FileDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return self.file.read_exact_at(buf, offset);
        }
        check_aligned(true, offset, buf.len())?;
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
        check_aligned(true, offset, len)?;
        let mut buf = AlignedVec::with_capacity(len);
        let start = buf.start;
        buf.raw.resize(start + len, 0);
        self.file.read_exact_at(&mut buf.raw[start..], offset)?;
        Ok(buf.into_bytes())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if !self.direct || (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
            check_aligned(self.direct, offset, data.len())?;
            return self.file.write_all_at(data, offset);
        }
        check_aligned(true, offset, data.len())?;
        let mut bounce = AlignedBuf::zeroed(data.len());
        bounce.as_mut_slice().copy_from_slice(data);
        self.file.write_all_at(bounce.as_slice(), offset)
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
}

/// Which of the two devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Origin,
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
    Ok(FileDevice {
        path: path.to_owned(),
        file,
        len,
        direct,
    })
}

impl Devices {
    /// Opens both devices read-write; `direct` opens them O_DIRECT.
    pub fn open(origin: &Path, store: &Path, direct: bool) -> Result<Devices, ClientError> {
        Ok(Devices::new(
            Arc::new(open(origin, direct)?),
            Arc::new(open(store, direct)?),
        ))
    }

    /// The data path over any two devices (tests: a power-cut model).
    pub fn new(origin: Arc<dyn DataDevice>, store: Arc<dyn DataDevice>) -> Devices {
        Devices {
            origin: Arc::new(Device::new(origin)),
            store: Arc::new(Device::new(store)),
        }
    }

    /// Whether transfers bypass the page cache (and must be aligned).
    pub fn direct(&self) -> bool {
        self.origin.dev.direct()
    }

    pub fn origin_len(&self) -> u64 {
        self.origin.dev.len()
    }

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

    /// The holes and data of `[offset, offset + len)` (see [`DataDevice::allocation`]), on
    /// tokio's blocking pool.
    pub(crate) async fn allocation(
        &self,
        which: Which,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<AllocRun>, ClientError> {
        let devs = self.clone();
        tokio::task::spawn_blocking(move || {
            let dev = devs.dev(which);
            dev.dev
                .allocation(offset, len, max_runs)
                .map_err(|e| Self::io_err(dev, "finding holes in", offset, e))
        })
        .await
        .unwrap_or_else(|e| Err(ClientError::Geometry(format!("seek task failed: {e}"))))
    }

    /// [`Devices::read_blocking`] on tokio's blocking pool.
    pub(crate) async fn read(
        &self,
        which: Which,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ClientError> {
        let devs = self.clone();
        tokio::task::spawn_blocking(move || devs.read_blocking(which, offset, len))
            .await
            .unwrap_or_else(|e| Err(ClientError::Geometry(format!("read task failed: {e}"))))
    }

    /// [`Devices::write_blocking`] on tokio's blocking pool.
    pub(crate) async fn write(
        &self,
        which: Which,
        offset: u64,
        data: Bytes,
        sync: bool,
    ) -> Result<(), ClientError> {
        let devs = self.clone();
        tokio::task::spawn_blocking(move || devs.write_blocking(which, offset, &data, sync))
            .await
            .unwrap_or_else(|e| Err(ClientError::Geometry(format!("write task failed: {e}"))))
    }

    /// [`Devices::sync_blocking`] on tokio's blocking pool.
    pub(crate) async fn sync(&self, which: Which) -> Result<(), ClientError> {
        let devs = self.clone();
        tokio::task::spawn_blocking(move || devs.sync_blocking(which))
            .await
            .unwrap_or_else(|e| Err(ClientError::Geometry(format!("sync task failed: {e}"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [4096, 8192, 65536] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
            assert_eq!(b.as_mut_slice().len(), len);
        }
    }

    #[tokio::test]
    async fn direct_io_round_trips_and_refuses_unaligned_transfers() {
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
        let err = devs.read(Which::Store, 100, 4096).await.unwrap_err();
        assert!(err.to_string().contains("aligned"), "{err}");
        let err = devs
            .write(Which::Store, 0, Bytes::from_static(b"short"), false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("aligned"), "{err}");
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
