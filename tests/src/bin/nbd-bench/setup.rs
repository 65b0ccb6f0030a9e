//! The benchmark's ground: its temporary directory, the origin images, sizes, the date and
//! a description of the machine.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

/// A temporary directory, removed (with everything in it) on drop unless kept.
pub(crate) struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    pub(crate) fn create(base: &Path, keep: bool) -> anyhow::Result<WorkDir> {
        let template = base.join("csnap-nbd-bench.XXXXXX");
        let path = nix::unistd::mkdtemp(&template)
            .with_context(|| format!("cannot create a directory {}", template.display()))?;
        Ok(WorkDir { path, keep })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("could not remove {}: {e}", self.path.display());
        }
    }
}

/// Parses a byte size: a number with an optional K, M, G or T suffix (powers of 1024).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(format!(
                        "unknown size suffix {c:?} in {text:?} (K, M, G, T)"
                    ))
                }
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 4096, 64K, 2G)"))?;
    n.checked_mul(1 << shift)
        .filter(|&bytes| bytes > 0)
        .ok_or_else(|| format!("size {text:?} is zero or too large"))
}

/// Writes `size` bytes of incompressible, non-zero pseudo-random data to a new file, so
/// reads hit data and `qemu-img convert` keeps every cluster.
pub(crate) fn write_filled_file(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    const BLOCK: usize = 1 << 20;
    let mut file =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut block = vec![0u8; BLOCK];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&(state | 1).to_le_bytes());
        }
        let n = left.min(BLOCK as u64) as usize;
        file.write_all(&block[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}

/// A file of `size` zero bytes, every block written (allocated) and synced.
pub(crate) fn write_zeroed_file(path: &Path, size: u64) -> anyhow::Result<()> {
    const BLOCK: usize = 1 << 20;
    let mut file =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let block = vec![0u8; BLOCK];
    let mut left = size;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        file.write_all(&block[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))
}

/// A sparse file of `size` bytes.
pub(crate) fn create_sparse_file(path: &Path, size: u64) -> anyhow::Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.set_len(size)
        .with_context(|| format!("cannot size {} to {size} bytes", path.display()))
}

/// "YYYY-MM-DD HH:MM UTC" for seconds since the epoch.
pub(crate) fn utc_timestamp(epoch_secs: u64) -> String {
    // csnapctl's formatter, to the minute.
    let full = csnap_agent::ctl::utc_time(epoch_secs);
    format!("{} UTC", &full[..full.len().min(16)])
}

pub(crate) fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_timestamp(secs)
}

/// Cores, CPU model, memory and kernel, from /proc.
pub(crate) fn describe_machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("unknown CPU", |(_, name)| name.trim())
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or_else(
            || "?".to_string(),
            |kib| format!("{:.0}", kib as f64 / 1048576.0),
        );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({model}), {mem_gib} GiB RAM, Linux {}",
        kernel.trim()
    )
}

/// The 1-minute load average (other work on the machine skews the figures).
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".to_string())
}

/// Whether `dir` holds an executable `name`; the error says how to build it.
pub(crate) fn require_binary(dir: &Path, name: &str, build_hint: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{name} not found in {} (build it: {build_hint}, or pass --bin-dir)",
            dir.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes_and_reject_nonsense() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("2X").unwrap_err().contains("suffix"));
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_timestamp(1_795_310_103), "2026-11-22 01:15 UTC");
    }

    #[test]
    fn filled_files_have_the_size_and_no_zero_words() {
        let base = std::env::temp_dir();
        let dir = WorkDir::create(&base, false).unwrap();
        let path = dir.join("f");
        write_filled_file(&path, (1 << 20) + 24, 7).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), (1 << 20) + 24);
        assert!(data.chunks_exact(8).all(|w| w != [0u8; 8]));
        // Not one repeated block: the second MiB starts differently from the first.
        assert_ne!(&data[..24], &data[1 << 20..]);
        let removed = dir.path().to_path_buf();
        drop(dir);
        assert!(!removed.exists());
    }
}
