//! The logic behind `csnapctl format` (kept here, next to the format, so it is testable
//! without the CLI).

use super::device::{BlockDevice, FileDevice};
use super::error::{Result, StoreError};
use super::format::{uuid_string, Superblock};
use super::{read_superblock, FormatOptions, FormatProgress, Store};
use std::path::Path;

/// What `format_paths` is asked to do.
#[derive(Clone, Debug)]
pub struct FormatRequest<'a> {
    /// The origin device (its size is recorded).
    pub origin: &'a Path,
    /// The store device to format.
    pub store: &'a Path,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// Overwrite an existing store.
    pub force: bool,
    /// Creation time to record (unix seconds).
    pub now: u64,
}

fn open_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Open {
        path: path.display().to_string(),
        source,
    }
}

/// Formats the store device at `req.store` for the origin at `req.origin` (whose size it
/// reads). Refuses to overwrite a csnap store (even a damaged one) unless `force`.
pub fn format_paths(req: &FormatRequest<'_>) -> Result<Superblock> {
    format_paths_with_progress(req, &mut |_| {})
}

/// `format_paths`, reporting progress through `progress` (see
/// `Store::format_with_progress`); the caller decides whether and how to show it.
pub fn format_paths_with_progress(
    req: &FormatRequest<'_>,
    progress: &mut dyn FnMut(FormatProgress),
) -> Result<Superblock> {
    super::format::check_chunk_size(req.chunk_size)?;
    let origin = FileDevice::open_read_only(req.origin).map_err(open_error(req.origin))?;
    let origin_size = origin.len();
    if origin_size == 0 {
        return Err(StoreError::BadOriginSize {
            size: 0,
            why: "the origin is empty",
        });
    }
    let same = match (req.origin.canonicalize(), req.store.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(StoreError::SameDevice(req.store.display().to_string()));
    }
    let store = FileDevice::open(req.store, false).map_err(open_error(req.store))?;
    if !req.force {
        match read_superblock(&store) {
            Ok(sb) => {
                return Err(StoreError::AlreadyFormatted {
                    uuid: uuid_string(&sb.uuid),
                })
            }
            Err(StoreError::CorruptSuperblock { .. } | StoreError::UnsupportedVersion { .. }) => {
                return Err(StoreError::AlreadyFormatted {
                    uuid: "unreadable: damaged or newer csnap superblock".into(),
                })
            }
            Err(_) => {}
        }
    }
    Store::format_with_progress(
        &store,
        &FormatOptions {
            chunk_size: req.chunk_size,
            origin_size,
            now: req.now,
            uuid: None,
        },
        progress,
    )
}

/// Parses a size like `4096`, `4K`, `64KiB`, `1M`, `1MiB` (binary units).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 4K, 64K, 1M)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use K or M)"
            ))
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// What `check_paths` found.
#[derive(Debug)]
pub struct CheckOutcome {
    /// The store's figures.
    pub info: super::StoreInfo,
    /// What the consistency check found.
    pub report: super::CheckReport,
    /// The store was not shut down cleanly: its journal was replayed (in memory only).
    pub was_unclean: bool,
    /// Problems outside the store's own structure (e.g. the origin does not match it).
    pub extra_problems: Vec<String>,
}

impl CheckOutcome {
    /// Whether nothing was found wrong.
    pub fn is_clean(&self) -> bool {
        self.report.is_clean() && self.extra_problems.is_empty()
    }

    /// Everything found wrong.
    pub fn problems(&self) -> impl Iterator<Item = &String> {
        self.extra_problems.iter().chain(&self.report.problems)
    }
}

/// Why `check_paths` could not check.
#[derive(Debug, thiserror::Error)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
pub enum CheckError {
    #[error("{0} is in use: a csnap server on this node holds its lock (stop it first; a check of a store in use would see it change underneath)")]
    InUse(String),
    /// The store could not be opened or read: it is damaged (or not a store).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks the store at `store` without changing it: takes a shared lock (refused while a
/// server on this node holds its exclusive one), opens the device read-only behind an
/// in-memory overlay (so journal replay and the open's superblock update never reach the
/// disk), and runs the consistency checker. With `origin`, also checks that the origin's
/// size is the one the store was formatted for.
pub fn check_paths(
    store: &Path,
    origin: Option<&Path>,
) -> std::result::Result<CheckOutcome, CheckError> {
    let file = std::fs::File::open(store).map_err(open_error(store))?;
    let _lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(lock) => lock,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            return Err(CheckError::InUse(store.display().to_string()))
        }
        Err((_, errno)) => {
            return Err(StoreError::Open {
                path: store.display().to_string(),
                source: std::io::Error::from(errno),
            }
            .into())
        }
    };
    let base = FileDevice::open_read_only(store).map_err(open_error(store))?;
    let dev: std::sync::Arc<dyn BlockDevice> = std::sync::Arc::new(Overlay::new(base));
    let mut opened = Store::open(dev, super::OpenOptions::default())?;
    let report = opened.check()?;
    let info = opened.info();
    let mut extra_problems = Vec::new();
    if let Some(origin) = origin {
        let o = FileDevice::open_read_only(origin).map_err(open_error(origin))?;
        if o.len() != info.origin_size {
            extra_problems.push(format!(
                "origin {} is {} bytes, but the store was formatted for a {}-byte origin",
                origin.display(),
                o.len(),
                info.origin_size
            ));
        }
    }
    Ok(CheckOutcome {
        info,
        report,
        was_unclean: opened.was_unclean(),
        extra_problems,
    })
}

/// A read-only device whose writes are kept in memory, block by block: lets code that
/// writes (opening a store replays its journal and marks it in use) run on a device it must
/// not change.
struct Overlay {
    base: FileDevice,
    blocks: std::sync::Mutex<std::collections::HashMap<u64, Box<[u8]>>>,
}

const OVERLAY_BLOCK: u64 = 4096;

impl Overlay {
    fn new(base: FileDevice) -> Overlay {
        Overlay {
            base,
            blocks: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn check_range(&self, len: usize, offset: u64) -> std::io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.base.len() => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes at {offset} are beyond the end ({})",
                    self.base.len()
                ),
            )),
        }
    }

    /// The current contents of block `b` (overlay or base).
    fn block(
        &self,
        blocks: &std::collections::HashMap<u64, Box<[u8]>>,
        b: u64,
    ) -> std::io::Result<Box<[u8]>> {
        if let Some(data) = blocks.get(&b) {
            return Ok(data.clone());
        }
        let start = b * OVERLAY_BLOCK;
        let len = OVERLAY_BLOCK.min(self.base.len() - start) as usize;
        let mut data = vec![0u8; len].into_boxed_slice();
        self.base.read_at(&mut data, start)?;
        Ok(data)
    }
}

impl BlockDevice for Overlay {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.check_range(buf.len(), offset)?;
        let blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if blocks.is_empty() {
            return self.base.read_at(buf, offset);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (b, within) = (at / OVERLAY_BLOCK, (at % OVERLAY_BLOCK) as usize);
            let n = (OVERLAY_BLOCK as usize - within).min(buf.len() - done);
            match blocks.get(&b) {
                Some(data) => buf[done..done + n].copy_from_slice(&data[within..within + n]),
                None => self.base.read_at(&mut buf[done..done + n], at)?,
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.check_range(buf.len(), offset)?;
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (b, within) = (at / OVERLAY_BLOCK, (at % OVERLAY_BLOCK) as usize);
            let n = (OVERLAY_BLOCK as usize - within).min(buf.len() - done);
            let mut data = self.block(&blocks, b)?;
            data[within..within + n].copy_from_slice(&buf[done..done + n]);
            blocks.insert(b, data);
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn len(&self) -> u64 {
        self.base.len()
    }

    fn name(&self) -> String {
        format!("{} (read-only check)", self.base.name())
    }
}
