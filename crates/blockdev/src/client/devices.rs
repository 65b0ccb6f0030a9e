//! The shared origin and store devices, read and written directly (pread/pwrite on a
//! blocking thread; FLUSH and FUA are fdatasync).
//!
//! With `direct`, both are opened O_DIRECT so that this node never reads a stale page cache
//! of a device other nodes write: every transfer then goes through a 4 KiB-aligned bounce
//! buffer, and offsets and lengths must be multiples of [`DIRECT_ALIGN`] (the exports
//! advertise that as their minimum block size).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::ClientError;

/// Alignment of O_DIRECT transfers (offsets, lengths and buffer addresses).
pub const DIRECT_ALIGN: usize = 4096;

#[derive(Debug)]
struct Device {
    path: PathBuf,
    file: File,
    len: u64,
    direct: bool,
    /// The first failed sync, for good: the kernel reports a lost write-back once and may
    /// then let a later sync succeed, which must not tell anyone their data is durable.
    sync_failed: std::sync::Mutex<Option<String>>,
    /// Tests: make the next sync fail as the device would.
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
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

fn check_aligned(dev: &Device, offset: u64, len: usize) -> io::Result<()> {
    if dev.direct
        && (!offset.is_multiple_of(DIRECT_ALIGN as u64) || !len.is_multiple_of(DIRECT_ALIGN))
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

/// The origin and the store, opened read-write.
#[derive(Debug, Clone)]
pub struct Devices {
    origin: Arc<Device>,
    store: Arc<Device>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Which {
    Origin,
    Store,
}

fn open(path: &Path, direct: bool) -> Result<Device, ClientError> {
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
    Ok(Device {
        path: path.to_owned(),
        file,
        len,
        direct,
        sync_failed: std::sync::Mutex::new(None),
        #[cfg(test)]
        fail_next_sync: std::sync::atomic::AtomicBool::new(false),
    })
}

impl Devices {
    /// Opens both devices read-write; `direct` opens them O_DIRECT.
    pub fn open(origin: &Path, store: &Path, direct: bool) -> Result<Devices, ClientError> {
        Ok(Devices {
            origin: Arc::new(open(origin, direct)?),
            store: Arc::new(open(store, direct)?),
        })
    }

    /// Whether transfers bypass the page cache (and must be aligned).
    pub fn direct(&self) -> bool {
        self.origin.direct
    }

    pub fn origin_len(&self) -> u64 {
        self.origin.len
    }

    pub fn store_len(&self) -> u64 {
        self.store.len
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
            device: dev.path.display().to_string(),
            offset,
            source,
        }
    }

    /// Reads exactly `len` bytes at `offset`.
    pub(crate) async fn read(
        &self,
        which: Which,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ClientError> {
        let dev = self.dev(which).clone();
        let result = tokio::task::spawn_blocking(move || {
            let failed = |e| Self::io_err(&dev, "reading", offset, e);
            if dev.direct {
                check_aligned(&dev, offset, len).map_err(failed)?;
                let mut buf = AlignedBuf::zeroed(len);
                dev.file
                    .read_exact_at(buf.as_mut_slice(), offset)
                    .map_err(failed)?;
                return Ok(Bytes::copy_from_slice(buf.as_slice()));
            }
            let mut buf = BytesMut::zeroed(len);
            dev.file
                .read_exact_at(&mut buf, offset)
                .map(|()| buf.freeze())
                .map_err(failed)
        })
        .await;
        result.unwrap_or_else(|e| Err(ClientError::Geometry(format!("read task failed: {e}"))))
    }

    /// Writes `data` at `offset`; with `sync`, fdatasync before returning.
    pub(crate) async fn write(
        &self,
        which: Which,
        offset: u64,
        data: Bytes,
        sync: bool,
    ) -> Result<(), ClientError> {
        let dev = self.dev(which).clone();
        let result = tokio::task::spawn_blocking(move || {
            let written = if dev.direct {
                check_aligned(&dev, offset, data.len()).and_then(|()| {
                    let mut buf = AlignedBuf::zeroed(data.len());
                    buf.as_mut_slice().copy_from_slice(&data);
                    dev.file.write_all_at(buf.as_slice(), offset)
                })
            } else {
                dev.file.write_all_at(&data, offset)
            };
            written.map_err(|e| Self::io_err(&dev, "writing", offset, e))?;
            if sync {
                dev.file
                    .sync_data()
                    .map_err(|e| Self::io_err(&dev, "syncing", offset, e))?;
            }
            Ok(())
        })
        .await;
        result.unwrap_or_else(|e| Err(ClientError::Geometry(format!("write task failed: {e}"))))
    }

    /// fdatasync of one device.
    /// Flushes a device. After one failure every later sync fails too (see
    /// `Device::sync_failed`): the data the failure lost is not coming back.
    pub(crate) async fn sync(&self, which: Which) -> Result<(), ClientError> {
        let dev = self.dev(which).clone();
        let result = tokio::task::spawn_blocking(move || {
            let sticky = |dev: &Device| {
                dev.sync_failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            };
            if let Some(first) = sticky(&dev) {
                return Err(Self::io_err(
                    &dev,
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
                None => dev.file.sync_data(),
            };
            outcome.map_err(|e| {
                *dev.sync_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                Self::io_err(&dev, "syncing", 0, e)
            })
        })
        .await;
        result.unwrap_or_else(|e| Err(ClientError::Geometry(format!("sync task failed: {e}"))))
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
