//! The logic behind `csnapctl format` (kept here, next to the format, so it is testable
//! without the CLI).

use super::device::{BlockDevice, FileDevice};
use super::error::{Result, StoreError};
use super::format::{uuid_string, Superblock};
use super::{read_superblock, FormatOptions, Store};
use std::path::Path;

/// What `format_paths` is asked to do.
#[derive(Clone, Debug)]
pub struct FormatRequest<'a> {
    pub origin: &'a Path,
    pub store: &'a Path,
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
    Store::format(
        &store,
        &FormatOptions {
            chunk_size: req.chunk_size,
            origin_size,
            now: req.now,
            uuid: None,
        },
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
