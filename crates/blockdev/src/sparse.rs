//! Where a file has data and where it has holes: `lseek(SEEK_DATA/SEEK_HOLE)`, the
//! source of `base:allocation` for file-backed exports and the csnap origin.
//!
//! A hole reads as zeroes, so it may be reported as HOLE|ZERO. A block device, or a file
//! system without SEEK_DATA, reports everything as data, which is always correct.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use nix::unistd::{lseek, Whence};

/// One run of a file: `len` bytes that are all data or all hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocRun {
    /// Bytes in the run.
    pub len: u64,
    /// A hole (reads as zeroes, no space used) rather than data.
    pub hole: bool,
}

/// The runs of `[offset, offset + len)` in `file`, consecutive from `offset`, at most
/// `max_runs` of them (then they cover less than `len`; always at least one when
/// `len > 0`). Holes past the file's end count as holes. Only positions are asked of the
/// kernel (lseek on a shared descriptor is safe next to pread/pwrite, which ignore the
/// file offset); nothing is read.
pub fn allocation(
    file: &File,
    offset: u64,
    len: u64,
    max_runs: usize,
) -> io::Result<Vec<AllocRun>> {
    let mut runs: Vec<AllocRun> = Vec::new();
    let end = offset.saturating_add(len);
    let mut at = offset;
    let fd = file.as_raw_fd();
    let push = |runs: &mut Vec<AllocRun>, len: u64, hole: bool| match runs.last_mut() {
        Some(r) if r.hole == hole => r.len += len,
        _ => runs.push(AllocRun { len, hole }),
    };
    while at < end && runs.len() < max_runs.max(1) {
        let pos = i64::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let data = match lseek(fd, pos, Whence::SeekData) {
            Ok(d) => u64::try_from(d).unwrap_or(at),
            // No data at or after `at`: the rest is a hole.
            Err(nix::Error::ENXIO) => end,
            // No SEEK_DATA here (or not for this kind of file): all data.
            Err(nix::Error::EINVAL | nix::Error::EOPNOTSUPP | nix::Error::ENOSYS) => {
                push(&mut runs, end - at, false);
                break;
            }
            Err(e) => return Err(e.into()),
        };
        if data > at {
            let hole_end = data.min(end);
            push(&mut runs, hole_end - at, true);
            at = hole_end;
            continue;
        }
        let hole = match lseek(fd, pos, Whence::SeekHole) {
            Ok(h) => u64::try_from(h).unwrap_or(end),
            // The data just found vanished (a concurrent punch): ask again from here.
            Err(nix::Error::ENXIO) => continue,
            Err(nix::Error::EINVAL | nix::Error::EOPNOTSUPP | nix::Error::ENOSYS) => end,
            Err(e) => return Err(e.into()),
        };
        // A hole at `at` right after SEEK_DATA said data (a concurrent punch) would not
        // move us on: call that block data rather than loop.
        let data_end = if hole > at { hole.min(end) } else { end };
        push(&mut runs, data_end - at, false);
        at = data_end;
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::unix::fs::FileExt;

    fn punch(file: &File, offset: u64, len: u64) -> bool {
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        fallocate(file.as_raw_fd(), mode, offset as i64, len as i64).is_ok()
    }

    #[test]
    fn holes_and_data_are_found_and_cover_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        const M: u64 = 1 << 20;
        file.set_len(8 * M).unwrap();
        file.write_all_at(&vec![1u8; M as usize], M).unwrap();
        file.write_all_at(&vec![2u8; M as usize], 4 * M).unwrap();
        let runs = allocation(&file, 0, 8 * M, 100).unwrap();
        assert_eq!(runs.iter().map(|r| r.len).sum::<u64>(), 8 * M);
        if runs.len() == 1 {
            eprintln!("skipping hole checks: this file system reports no holes");
            return;
        }
        // File systems may allocate a little more than written, never less.
        let hole_at = |pos: u64| {
            let mut at = 0;
            for r in &runs {
                if pos < at + r.len {
                    return r.hole;
                }
                at += r.len;
            }
            panic!("{pos} not covered");
        };
        assert!(!hole_at(M) && !hole_at(2 * M - 1) && !hole_at(4 * M));
        assert!(hole_at(3 * M) && hole_at(7 * M));
        // A sub-range starting in a hole, and the run limit.
        let runs = allocation(&file, 2 * M + 4096, 4 * M, 1).unwrap();
        assert_eq!(runs.len(), 1);
        assert!(runs[0].hole && runs[0].len <= 2 * M);
        // Punching data makes a hole.
        if punch(&file, M, M) {
            let runs = allocation(&file, 0, 4 * M, 100).unwrap();
            assert_eq!(
                runs,
                vec![AllocRun {
                    len: 4 * M,
                    hole: true
                }]
            );
        }
    }
}
