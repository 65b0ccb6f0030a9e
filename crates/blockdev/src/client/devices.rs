//! The shared origin and store devices, read and written directly (pread/pwrite on a
//! blocking thread; FLUSH and FUA are fdatasync).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::ClientError;

#[derive(Debug)]
struct Device {
    path: PathBuf,
    file: File,
    len: u64,
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

fn open(path: &Path) -> Result<Device, ClientError> {
    let err = |source| ClientError::Open {
        path: path.display().to_string(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(err)?;
    // SEEK_END gives the size of regular files and block devices alike.
    let len = file.seek(SeekFrom::End(0)).map_err(err)?;
    Ok(Device {
        path: path.to_owned(),
        file,
        len,
    })
}

impl Devices {
    pub fn open(origin: &Path, store: &Path) -> Result<Devices, ClientError> {
        Ok(Devices {
            origin: Arc::new(open(origin)?),
            store: Arc::new(open(store)?),
        })
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
            let mut buf = BytesMut::zeroed(len);
            dev.file
                .read_exact_at(&mut buf, offset)
                .map(|()| buf.freeze())
                .map_err(|e| Self::io_err(&dev, "reading", offset, e))
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
            dev.file
                .write_all_at(&data, offset)
                .map_err(|e| Self::io_err(&dev, "writing", offset, e))?;
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
    pub(crate) async fn sync(&self, which: Which) -> Result<(), ClientError> {
        let dev = self.dev(which).clone();
        let result = tokio::task::spawn_blocking(move || {
            dev.file
                .sync_data()
                .map_err(|e| Self::io_err(&dev, "syncing", 0, e))
        })
        .await;
        result.unwrap_or_else(|e| Err(ClientError::Geometry(format!("sync task failed: {e}"))))
    }
}
