//! Block devices the store runs on: a file or block device (`FileDevice`), and an in-memory
//! device with a volatile write cache for crash tests (`MemDevice`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Sector size the store aligns all I/O to, and the unit a crash may tear writes into.
pub const SECTOR: usize = 4096;

/// Positioned I/O on a fixed-size device. Methods take `&self` so one device can be shared
/// between the metadata store and the data-path shell (pread/pwrite are thread safe).
pub trait BlockDevice: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`. Not durable until `flush` returns.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync / cache flush).
    fn flush(&self) -> io::Result<()>;
    /// Size in bytes.
    fn len(&self) -> u64;
    /// True if the device has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A name for error messages (the path, or "memory").
    fn name(&self) -> String;
}

/// A device that numbers its flushes, so a caller can tell whether a write it made has
/// been covered by one: a flush covers every write that completed before the flush
/// started. The server stamps each copy-out with [`FlushTracked::stamp`] when its write
/// returns; once [`FlushTracked::is_stable`] says so, a journal commit may point at it
/// without flushing the data first (the previous commit's last flush did).
pub struct FlushTracked {
    inner: Arc<dyn BlockDevice>,
    /// Flushes started so far (the number of the latest).
    started: AtomicU64,
    /// The highest number of a flush that succeeded.
    succeeded: AtomicU64,
}

impl FlushTracked {
    /// Counts the flushes of `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>) -> FlushTracked {
        FlushTracked {
            inner,
            started: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
        }
    }

    /// Taken after a write returned: the write is durable once a flush numbered above the
    /// stamp has succeeded.
    pub fn stamp(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// True if a flush that started after the stamped write completed has succeeded.
    pub fn is_stable(&self, stamp: u64) -> bool {
        self.succeeded.load(Ordering::SeqCst) > stamp
    }
}

impl BlockDevice for FlushTracked {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        let number = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner.flush()?;
        // A failed flush proves nothing, and neither does any later one for the writes it
        // covered (Linux may have dropped them): the store is poisoned by the failure, so
        // nothing it covered is ever committed.
        self.succeeded.fetch_max(number, Ordering::SeqCst);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn name(&self) -> String {
        self.inner.name()
    }
}

/// Flushes of one device shared by concurrent writers, one at a time: a writer that needs
/// its write durable waits for a flush that started after the write returned, and starts
/// one only if none is running. Sixteen rollback copy-backs that finish together then cost
/// one or two `fdatasync`s instead of sixteen back-to-back ones (a file's flushes run one
/// after another in the kernel anyway).
///
/// A failed flush poisons it: Linux may have dropped the writes it covered, so no later
/// flush can prove them durable, and every later call fails too.
pub struct GroupFlush {
    inner: Arc<dyn BlockDevice>,
    state: Mutex<GroupFlushState>,
    finished: Condvar,
}

#[derive(Default)]
struct GroupFlushState {
    /// Flushes started so far (the number of the latest).
    started: u64,
    /// The highest number of a flush that succeeded.
    succeeded: u64,
    running: bool,
    /// The first failure, repeated to every later caller.
    failed: Option<(io::ErrorKind, String)>,
}

impl GroupFlush {
    /// Coalesces the flushes of `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>) -> GroupFlush {
        GroupFlush {
            inner,
            state: Mutex::new(GroupFlushState::default()),
            finished: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GroupFlushState> {
        // A flush that panicked leaves plain numbers behind: still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Taken after a write returned: [`GroupFlush::flush_covering`] with it makes the
    /// write durable.
    pub fn stamp(&self) -> u64 {
        self.lock().started
    }

    /// Returns once a flush that started after `stamp` was taken has succeeded: waits
    /// for the running one, then starts one if that did not cover `stamp`.
    pub fn flush_covering(&self, stamp: u64) -> io::Result<()> {
        let mut state = self.lock();
        loop {
            if let Some((kind, message)) = &state.failed {
                return Err(io::Error::new(*kind, message.clone()));
            }
            if state.succeeded > stamp {
                return Ok(());
            }
            if !state.running {
                break;
            }
            state = self.finished.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.running = true;
        state.started += 1;
        let number = state.started;
        drop(state);
        let result = self.inner.flush();
        let mut state = self.lock();
        state.running = false;
        match &result {
            Ok(()) => state.succeeded = state.succeeded.max(number),
            Err(e) => {
                if state.failed.is_none() {
                    state.failed = Some((e.kind(), format!("flushing {}: {e}", self.inner.name())));
                }
            }
        }
        drop(state);
        self.finished.notify_all();
        result
    }
}

/// A regular file or a block device, with pread/pwrite and fdatasync. With `direct`, the
/// file is opened O_DIRECT (bypassing the page cache) and I/O goes through an aligned
/// bounce buffer.
pub struct FileDevice {
    file: File,
    path: String,
    len: u64,
    direct: bool,
}

impl FileDevice {
    /// Opens `path` read-write.
    pub fn open(path: &Path, direct: bool) -> io::Result<FileDevice> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let mut file = options.open(path)?;
        // Seeking to the end gives the size of block devices too (metadata().len() is 0).
        let len = file.seek(SeekFrom::End(0))?;
        Ok(FileDevice {
            file,
            path: path.display().to_string(),
            len,
            direct,
        })
    }

    /// Opens `path` read-only (for probing a device without changing it).
    pub fn open_read_only(path: &Path) -> io::Result<FileDevice> {
        let mut file = File::open(path)?;
        let len = file.seek(SeekFrom::End(0))?;
        Ok(FileDevice {
            file,
            path: path.display().to_string(),
            len,
            direct: false,
        })
    }

    fn check_aligned(&self, len: usize, offset: u64) -> io::Result<()> {
        if self.direct && (!len.is_multiple_of(SECTOR) || !offset.is_multiple_of(SECTOR as u64)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("O_DIRECT I/O of {len} bytes at {offset} is not 4 KiB aligned"),
            ));
        }
        Ok(())
    }
}

/// Whether `buf` starts at a `SECTOR` boundary, so O_DIRECT can use it as it is.
fn is_sector_aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(SECTOR)
}

/// A zeroed heap buffer of whole sectors starting at a `SECTOR` boundary: what the hot
/// paths read into and write from, so an O_DIRECT [`FileDevice`] needs no bounce buffer.
pub struct SectorBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl SectorBuf {
    /// `len` zero bytes, aligned.
    pub fn zeroed(len: usize) -> SectorBuf {
        let raw = vec![0u8; len + SECTOR];
        let start = (SECTOR - raw.as_ptr() as usize % SECTOR) % SECTOR;
        SectorBuf { raw, start, len }
    }
}

impl std::ops::Deref for SectorBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for SectorBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// A heap buffer aligned to `SECTOR`, as O_DIRECT requires.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(SECTOR), SECTOR)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "aligned buffer"));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_mut_slice(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() >= len bytes and uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

impl BlockDevice for FileDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return self.file.read_exact_at(buf, offset);
        }
        self.check_aligned(buf.len(), offset)?;
        if is_sector_aligned(buf) {
            // Callers on the hot paths (copy-outs) pass aligned buffers: no bounce.
            return self.file.read_exact_at(buf, offset);
        }
        let mut bounce = AlignedBuf::new(buf.len())?;
        self.file
            .read_exact_at(bounce.as_mut_slice(buf.len()), offset)?;
        buf.copy_from_slice(bounce.as_mut_slice(buf.len()));
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return self.file.write_all_at(buf, offset);
        }
        self.check_aligned(buf.len(), offset)?;
        if is_sector_aligned(buf) {
            return self.file.write_all_at(buf, offset);
        }
        let mut bounce = AlignedBuf::new(buf.len())?;
        bounce.as_mut_slice(buf.len()).copy_from_slice(buf);
        self.file
            .write_all_at(bounce.as_mut_slice(buf.len()), offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn name(&self) -> String {
        self.path.clone()
    }
}

/// Counters of a `MemDevice`, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemDeviceStats {
    /// Reads.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
}

struct MemInner {
    /// What survives a crash.
    durable: Vec<u8>,
    /// Sectors written since the last flush (latest contents): the volatile write cache.
    cached: BTreeMap<u64, Box<[u8]>>,
    /// Writes and flushes left before a simulated power cut; `None` = no cut planned.
    ops_until_power_cut: Option<u64>,
    powered_off: bool,
    stats: MemDeviceStats,
}

/// An in-memory device modelling a volatile write cache. Writes land in the cache; `flush`
/// makes them durable. `crash(seed)` returns the device as it would come back after a power
/// loss: the durable image plus a random subset of the cached 4 KiB sectors (so a multi-sector
/// write may be torn). `power_cut_after(n)` makes every operation after the next `n` writes
/// or flushes fail, as if power was lost mid-run. Clones share the same device.
#[derive(Clone)]
pub struct MemDevice {
    inner: Arc<Mutex<MemInner>>,
    len: u64,
}

fn power_lost() -> io::Error {
    io::Error::other("simulated power loss")
}

impl MemDevice {
    /// A zero-filled device of `len` bytes (rounded up to whole sectors).
    pub fn new(len: u64) -> MemDevice {
        let len = len.div_ceil(SECTOR as u64) * SECTOR as u64;
        MemDevice {
            inner: Arc::new(Mutex::new(MemInner {
                durable: vec![0; len as usize],
                cached: BTreeMap::new(),
                ops_until_power_cut: None,
                powered_off: false,
                stats: MemDeviceStats::default(),
            })),
            len,
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemInner> {
        // A panic while holding the lock only happens in a failing test; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After `ops` more writes or flushes, the device loses power: that operation and every
    /// later one fail.
    pub fn power_cut_after(&self, ops: u64) {
        self.lock().ops_until_power_cut = Some(ops);
    }

    /// True once a planned power cut has happened.
    pub fn powered_off(&self) -> bool {
        self.lock().powered_off
    }

    /// The device after a crash: durable contents plus a seeded random subset of the
    /// sectors still in the write cache. The result is a new, powered device.
    pub fn crash(&self, seed: u64) -> MemDevice {
        let inner = self.lock();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut image = inner.durable.clone();
        for (sector, data) in &inner.cached {
            if rng.gen_bool(0.5) {
                let start = (*sector as usize) * SECTOR;
                image[start..start + SECTOR].copy_from_slice(data);
            }
        }
        MemDevice {
            inner: Arc::new(Mutex::new(MemInner {
                durable: image,
                cached: BTreeMap::new(),
                ops_until_power_cut: None,
                powered_off: false,
                stats: MemDeviceStats::default(),
            })),
            len: self.len,
        }
    }

    /// Operation counters.
    pub fn stats(&self) -> MemDeviceStats {
        self.lock().stats
    }

    /// Overwrites bytes directly in the durable image (tests: inject corruption).
    pub fn corrupt(&self, offset: u64, bytes: &[u8]) {
        let mut inner = self.lock();
        let start = offset as usize;
        inner.durable[start..start + bytes.len()].copy_from_slice(bytes);
        let first = offset / SECTOR as u64;
        let last = (offset + bytes.len() as u64).div_ceil(SECTOR as u64);
        for s in first..last {
            inner.cached.remove(&s);
        }
    }

    fn check_range(&self, len: usize, offset: u64) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes at {offset} are beyond the device end ({})",
                    self.len
                ),
            )),
        }
    }
}

impl MemInner {
    /// Counts one write or flush against a planned power cut.
    fn spend_op(&mut self) -> io::Result<()> {
        if self.powered_off {
            return Err(power_lost());
        }
        if let Some(left) = self.ops_until_power_cut.as_mut() {
            if *left == 0 {
                self.powered_off = true;
                return Err(power_lost());
            }
            *left -= 1;
        }
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(buf.len(), offset)?;
        let mut inner = self.lock();
        if inner.powered_off {
            return Err(power_lost());
        }
        inner.stats.reads += 1;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let sector = pos / SECTOR as u64;
            let within = (pos % SECTOR as u64) as usize;
            let n = (SECTOR - within).min(buf.len() - done);
            match inner.cached.get(&sector) {
                Some(data) => buf[done..done + n].copy_from_slice(&data[within..within + n]),
                None => buf[done..done + n].copy_from_slice(&inner.durable[pos as usize..][..n]),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(buf.len(), offset)?;
        let mut inner = self.lock();
        inner.spend_op()?;
        inner.stats.writes += 1;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let sector = pos / SECTOR as u64;
            let within = (pos % SECTOR as u64) as usize;
            let n = (SECTOR - within).min(buf.len() - done);
            let base = (sector as usize) * SECTOR;
            let durable_copy: Box<[u8]> = inner.durable[base..base + SECTOR].into();
            let data = inner.cached.entry(sector).or_insert(durable_copy);
            data[within..within + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut inner = self.lock();
        inner.spend_op()?;
        inner.stats.flushes += 1;
        let cached = std::mem::take(&mut inner.cached);
        for (sector, data) in cached {
            let start = (sector as usize) * SECTOR;
            inner.durable[start..start + SECTOR].copy_from_slice(&data);
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn name(&self) -> String {
        "memory device".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device whose flush is slow and remembers how many writes had returned when each
    /// successful flush started (what it made durable); two flushes at once fail the test.
    #[derive(Default)]
    struct SlowFlushDevice {
        writes: AtomicU64,
        durable: AtomicU64,
        flushes: AtomicU64,
        flushing: std::sync::atomic::AtomicBool,
        fail_first: bool,
    }

    impl BlockDevice for SlowFlushDevice {
        fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
            Ok(())
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            assert!(
                !self.flushing.swap(true, Ordering::SeqCst),
                "two flushes ran at once"
            );
            let covers = self.writes.load(Ordering::SeqCst);
            let number = self.flushes.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            self.flushing.store(false, Ordering::SeqCst);
            if self.fail_first && number == 0 {
                return Err(io::Error::other("injected flush failure"));
            }
            self.durable.fetch_max(covers, Ordering::SeqCst);
            Ok(())
        }
        fn len(&self) -> u64 {
            1 << 20
        }
        fn name(&self) -> String {
            "slow".into()
        }
    }

    /// Writers that flush together share flushes, and each returns only once a flush
    /// that started after its own write made it durable.
    #[test]
    fn group_flush_covers_every_write_with_fewer_flushes() {
        let dev = Arc::new(SlowFlushDevice::default());
        let group = Arc::new(GroupFlush::new(dev.clone()));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (dev, group) = (dev.clone(), group.clone());
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        dev.write_at(&[0; 8], 0).unwrap();
                        let mine = dev.writes.load(Ordering::SeqCst);
                        group.flush_covering(group.stamp()).unwrap();
                        assert!(
                            dev.durable.load(Ordering::SeqCst) >= mine,
                            "flush_covering returned before a flush covered write {mine}"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (writes, flushes) = (
            dev.writes.load(Ordering::SeqCst),
            dev.flushes.load(Ordering::SeqCst),
        );
        assert_eq!(writes, 160);
        assert!(
            flushes < writes,
            "{flushes} flushes for {writes} writes: none was shared"
        );
    }

    /// After a failed flush nothing it covered can be proven durable: every later call
    /// fails with the first error, without flushing again.
    #[test]
    fn a_failed_group_flush_fails_every_later_one() {
        let dev = Arc::new(SlowFlushDevice {
            fail_first: true,
            ..SlowFlushDevice::default()
        });
        let group = GroupFlush::new(dev.clone());
        dev.write_at(&[0; 8], 0).unwrap();
        let first = group.flush_covering(group.stamp()).unwrap_err();
        assert!(first.to_string().contains("injected"), "{first}");
        dev.write_at(&[0; 8], 0).unwrap();
        let later = group.flush_covering(group.stamp()).unwrap_err();
        assert!(
            later.to_string().contains("flushing slow") && later.to_string().contains("injected"),
            "{later}"
        );
        assert_eq!(dev.flushes.load(Ordering::SeqCst), 1);
    }

    /// Under O_DIRECT, aligned buffers go to the file as they are and unaligned ones
    /// through a bounce buffer; both read back what was written, anywhere in a buffer.
    #[test]
    fn direct_io_round_trips_with_and_without_a_bounce() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let dev = match FileDevice::open(&path, true) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipping: no O_DIRECT here: {e}");
                return;
            }
        };
        let mut aligned = SectorBuf::zeroed(3 * SECTOR);
        assert!(is_sector_aligned(&aligned));
        for (i, b) in aligned.iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        dev.write_at(&aligned, SECTOR as u64).unwrap();
        // Unaligned: one byte into a larger vector.
        let mut unaligned_src = vec![0u8; 2 * SECTOR + 1];
        unaligned_src[1..].fill(7);
        assert!(!is_sector_aligned(&unaligned_src[1..]));
        dev.write_at(&unaligned_src[1..], 8 * SECTOR as u64)
            .unwrap();

        let mut back = SectorBuf::zeroed(3 * SECTOR);
        dev.read_at(&mut back, SECTOR as u64).unwrap();
        assert!(back[..] == aligned[..]);
        let mut unaligned_dst = vec![0u8; 2 * SECTOR + 1];
        dev.read_at(&mut unaligned_dst[1..], 8 * SECTOR as u64)
            .unwrap();
        assert!(unaligned_dst[1..].iter().all(|&b| b == 7));
        assert!(
            dev.read_at(&mut back[..100], 0).is_err(),
            "unaligned length must be refused"
        );
    }

    #[test]
    fn unflushed_writes_may_be_lost_flushed_ones_survive() {
        let dev = MemDevice::new(4 * SECTOR as u64);
        dev.write_at(&[1; SECTOR], 0).unwrap();
        dev.flush().unwrap();
        dev.write_at(&[2; 3 * SECTOR], SECTOR as u64).unwrap();
        let mut buf = vec![0; SECTOR];
        dev.read_at(&mut buf, SECTOR as u64).unwrap();
        assert_eq!(buf, vec![2; SECTOR], "reads see the write cache");
        let mut kept = [0usize; 2];
        for seed in 0..64 {
            let after = dev.crash(seed);
            after.read_at(&mut buf, 0).unwrap();
            assert_eq!(buf, vec![1; SECTOR]);
            for s in 1..4u64 {
                after.read_at(&mut buf, s * SECTOR as u64).unwrap();
                assert!(buf == vec![2; SECTOR] || buf == vec![0; SECTOR]);
                kept[usize::from(buf[0] == 2)] += 1;
            }
        }
        assert!(kept[0] > 0 && kept[1] > 0, "both outcomes happen: {kept:?}");
    }

    #[test]
    fn power_cut_fails_later_operations() {
        let dev = MemDevice::new(SECTOR as u64);
        dev.power_cut_after(1);
        dev.write_at(&[1; 10], 5).unwrap();
        assert!(dev.flush().is_err());
        assert!(dev.powered_off());
        assert!(dev.read_at(&mut [0; 4], 0).is_err());
        assert!(dev.write_at(&[0; 4], 4096).is_err(), "out of range");
    }
}
