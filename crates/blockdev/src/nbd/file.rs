//! [`Exports`] over regular files: a simple standalone backend and the test backend.
//!
//! Data goes through `pread`/`pwrite` on a blocking thread; FLUSH and FUA are
//! `fdatasync`, so they are honoured down to the file. TRIM and WRITE_ZEROES use
//! `fallocate` (PUNCH_HOLE / ZERO_RANGE) where the file system supports it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nix::fcntl::{fallocate, FallocateFlags};

use super::consts::{CONTEXT_BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};
use super::export::{
    BoxFuture, Export, ExportFeatures, ExportInfo, Exports, Extent, MetaContext, Payload,
};

/// Most extents one `base:allocation` answer walks (two lseeks each).
const MAX_ALLOCATION_RUNS: usize = 4096;

#[derive(Debug)]
struct FileEntry {
    path: PathBuf,
    file: Arc<File>,
    read_only: bool,
}

/// A fixed set of named file exports. All connections to one export share one open
/// file, so FLUSH on any connection covers writes completed on all of them
/// (CAN_MULTI_CONN is advertised).
#[derive(Debug, Default)]
pub struct FileExports {
    exports: BTreeMap<String, FileEntry>,
    default: Option<String>,
}

impl FileExports {
    /// No exports yet.
    pub fn new() -> FileExports {
        FileExports::default()
    }

    /// Adds an export backed by `path`, which must be an existing regular file. The
    /// first export added becomes the default one (selected by the empty name).
    pub fn add(&mut self, name: &str, path: &Path, read_only: bool) -> io::Result<()> {
        let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        if name.len() > super::consts::MAX_STRING_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("export name of {} bytes is longer than 4096", name.len()),
            ));
        }
        if self.exports.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("export {name:?} is defined twice"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(context)?;
        if !file.metadata().map_err(context)?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        if self.default.is_none() {
            self.default = Some(name.to_owned());
        }
        self.exports.insert(
            name.to_owned(),
            FileEntry {
                path: path.to_owned(),
                file: Arc::new(file),
                read_only,
            },
        );
        Ok(())
    }

    fn entry(&self, name: &str) -> Option<&FileEntry> {
        match self.exports.get(name) {
            Some(entry) => Some(entry),
            None if name.is_empty() => self.default.as_ref().and_then(|d| self.exports.get(d)),
            None => None,
        }
    }
}

fn features() -> ExportFeatures {
    ExportFeatures {
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        fast_zero: true,
        multi_conn: true,
        rotational: false,
    }
}

impl Exports for FileExports {
    fn list(&self) -> BoxFuture<'_, io::Result<Vec<ExportInfo>>> {
        Box::pin(async move {
            let mut list = Vec::with_capacity(self.exports.len());
            for (name, entry) in &self.exports {
                let size = entry.file.metadata()?.len();
                list.push(ExportInfo {
                    name: name.clone(),
                    description: Some(entry.path.display().to_string()),
                    size,
                    read_only: entry.read_only,
                    features: features(),
                    block_sizes: Default::default(),
                });
            }
            Ok(list)
        })
    }

    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Option<Arc<dyn Export>>>> {
        Box::pin(async move {
            let Some(entry) = self.entry(name) else {
                return Ok(None);
            };
            let size = entry.file.metadata()?.len();
            let export: Arc<dyn Export> = Arc::new(FileExport {
                file: entry.file.clone(),
                description: entry.path.display().to_string(),
                size,
                read_only: entry.read_only,
            });
            Ok(Some(export))
        })
    }
}

/// One opened file export; its size is the file's size when it was opened.
#[derive(Debug)]
pub struct FileExport {
    file: Arc<File>,
    description: String,
    size: u64,
    read_only: bool,
}

impl FileExport {
    /// Runs blocking file work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&File) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || work(&file))
            .await
            .map_err(|e| io::Error::other(format!("file I/O task failed: {e}")))?
    }
}

fn sync_if(file: &File, fua: bool) -> io::Result<()> {
    if fua {
        file.sync_data()?;
    }
    Ok(())
}

/// Writes zeroes with plain writes, for file systems without fallocate modes.
fn write_zero_buffers(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn is_unsupported(err: &nix::Error) -> bool {
    matches!(err, nix::Error::EOPNOTSUPP | nix::Error::ENOSYS)
}

fn allocate(file: &File, mode: FallocateFlags, offset: u64, len: u64) -> nix::Result<()> {
    let offset = i64::try_from(offset).map_err(|_| nix::Error::EFBIG)?;
    let len = i64::try_from(len).map_err(|_| nix::Error::EFBIG)?;
    fallocate(file.as_raw_fd(), mode, offset, len)
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn features(&self) -> ExportFeatures {
        features()
    }

    fn description(&self) -> Option<String> {
        Some(self.description.clone())
    }

    fn read_at(&self, offset: u64, len: u32) -> BoxFuture<'_, io::Result<Payload>> {
        Box::pin(self.blocking(move |file| {
            let mut buf = BytesMut::zeroed(len as usize);
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf.freeze().into())
        }))
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(self.blocking(move |file| {
            file.write_all_at(&data, offset)?;
            sync_if(file, fua)
        }))
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(self.blocking(|file| file.sync_data()))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
        fast: bool,
    ) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(self.blocking(move |file| {
            let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            let zero = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            let mut result = if may_trim {
                allocate(file, punch, offset, len)
            } else {
                Err(nix::Error::EOPNOTSUPP)
            };
            if matches!(&result, Err(e) if is_unsupported(e)) {
                result = allocate(file, zero, offset, len);
            }
            match result {
                Ok(()) => {}
                // FAST_ZERO: writing zeroes is what the client wants to avoid.
                Err(e) if is_unsupported(&e) && fast => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "fast zero: this file system cannot zero without writing",
                    ))
                }
                Err(e) if is_unsupported(&e) => write_zero_buffers(file, offset, len)?,
                Err(e) => return Err(e.into()),
            }
            sync_if(file, fua)
        }))
    }

    fn meta_contexts(&self) -> BoxFuture<'_, io::Result<Vec<MetaContext>>> {
        Box::pin(async { Ok(vec![MetaContext::new(CONTEXT_BASE_ALLOCATION, 0)]) })
    }

    /// `base:allocation` from SEEK_DATA/SEEK_HOLE: holes read as zeroes (HOLE|ZERO).
    fn block_status<'a>(
        &'a self,
        context: &'a MetaContext,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, io::Result<Vec<Extent>>> {
        Box::pin(async move {
            if context.name != CONTEXT_BASE_ALLOCATION {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("metadata context {:?} is not offered", context.name),
                ));
            }
            let runs = self
                .blocking(move |file| {
                    crate::sparse::allocation(file, offset, len, MAX_ALLOCATION_RUNS)
                })
                .await?;
            Ok(runs
                .into_iter()
                .map(|r| Extent {
                    len: r.len,
                    flags: if r.hole { STATE_HOLE | STATE_ZERO } else { 0 },
                })
                .collect())
        })
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(self.blocking(move |file| {
            let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match allocate(file, punch, offset, len) {
                // TRIM is advisory: a file system that cannot punch holes just keeps data.
                Ok(()) => {}
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(e.into()),
            }
            sync_if(file, fua)
        }))
    }
}
