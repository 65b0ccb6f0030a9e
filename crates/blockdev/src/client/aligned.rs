//! Buffers that start at a [`DIRECT_ALIGN`] boundary, shared by the NBD connection
//! (write payloads are received into them), the device layer and io_uring (reads land
//! in them), so no O_DIRECT transfer needs a bounce buffer.
//!
//! Large buffers are recycled through a small process-wide pool: a fresh 1 MiB
//! allocation comes from `mmap` (or a heap that `free` trimmed), so every read into it
//! page-faults 256 zeroed pages in and every drop unmaps them again. A profile of 1 MiB
//! snapshot reads in page mode put that at about a sixth of the agent's CPU.

use std::sync::Mutex;

use bytes::Bytes;

/// Alignment of O_DIRECT transfers (offsets, lengths and buffer addresses).
pub const DIRECT_ALIGN: usize = 4096;

/// Bytes that start at a [`DIRECT_ALIGN`] boundary, handed out as [`Bytes`] without a
/// copy: O_DIRECT reads land in them and NBD write payloads are received into them, so
/// neither needs a bounce buffer.
#[derive(Debug)]
pub(crate) struct AlignedVec {
    raw: Vec<u8>,
    start: usize,
}

/// Smallest buffer worth recycling: smaller ones come cheaply from malloc's free lists.
const POOL_MIN_ROOM: usize = 64 << 10;
/// Most bytes the pool keeps while nobody uses them: a 16-deep queue of 1 MiB requests
/// reuses its buffers, and an idle agent keeps no more than this resident.
const POOL_MAX_BYTES: usize = 24 << 20;

/// Freed large allocations, ready for reuse (each `Vec` empty, its capacity kept).
struct BufferPool {
    free: Vec<Vec<u8>>,
    bytes: usize,
}

static POOL: Mutex<BufferPool> = Mutex::new(BufferPool {
    free: Vec::new(),
    bytes: 0,
});

fn pool() -> std::sync::MutexGuard<'static, BufferPool> {
    // The pool holds no invariant a panicking holder could break half-way.
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The room a buffer for `len` aligned bytes gets: pooled sizes are rounded up to a
/// power of two, so buffers of nearby sizes serve each other.
fn room_for(len: usize) -> usize {
    if len < POOL_MIN_ROOM {
        return len;
    }
    len.checked_next_power_of_two().unwrap_or(len)
}

impl BufferPool {
    /// A free allocation of capacity exactly `capacity`, if one is kept.
    fn take(&mut self, capacity: usize) -> Option<Vec<u8>> {
        let i = self.free.iter().position(|v| v.capacity() == capacity)?;
        let v = self.free.swap_remove(i);
        self.bytes -= v.capacity();
        Some(v)
    }

    /// Keeps `v` for reuse if it is large and there is room; else it is freed.
    fn give(&mut self, mut v: Vec<u8>) {
        let capacity = v.capacity();
        if capacity < POOL_MIN_ROOM + DIRECT_ALIGN
            || self.bytes.saturating_add(capacity) > POOL_MAX_BYTES
        {
            return;
        }
        v.clear();
        self.bytes += capacity;
        self.free.push(v);
    }
}

impl AlignedVec {
    /// Room for `len` aligned bytes; holds none yet. The allocation never moves (nothing
    /// may append more than `len`), so the start stays aligned. Large rooms come from
    /// the pool of recycled buffers when it has one of the size.
    pub(crate) fn with_capacity(len: usize) -> AlignedVec {
        let capacity = room_for(len).saturating_add(DIRECT_ALIGN);
        let recycled = match capacity >= POOL_MIN_ROOM {
            true => pool().take(capacity),
            false => None,
        };
        AlignedVec::in_allocation(recycled.unwrap_or_else(|| Vec::with_capacity(capacity)))
    }

    /// An empty aligned buffer in `raw`'s allocation (whose capacity must leave
    /// [`DIRECT_ALIGN`] bytes of slack for the alignment).
    fn in_allocation(mut raw: Vec<u8>) -> AlignedVec {
        raw.clear();
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

    /// Fills the room with `len` zero bytes (at most the `len` given at creation) and
    /// hands them out to be overwritten, e.g. by a blocking read.
    pub(crate) fn zero_filled(&mut self, len: usize) -> &mut [u8] {
        self.raw.resize(self.start + len, 0);
        &mut self.raw[self.start..]
    }

    /// Where the next appended byte goes: for the kernel to read into (io_uring).
    pub(crate) fn spare_ptr(&mut self) -> *mut u8 {
        self.raw.spare_capacity_mut().as_mut_ptr().cast()
    }

    /// Counts `n` more bytes as held.
    ///
    /// # Safety
    /// The `n` bytes from [`AlignedVec::spare_ptr`] on must have been written, and be
    /// within the room given at creation.
    pub(crate) unsafe fn assume_filled(&mut self, n: usize) {
        debug_assert!(n <= self.raw.capacity() - self.raw.len());
        // SAFETY: per this function's contract.
        unsafe { self.raw.set_len(self.raw.len() + n) }
    }
}

impl Drop for AlignedVec {
    fn drop(&mut self) {
        if self.raw.capacity() >= POOL_MIN_ROOM + DIRECT_ALIGN {
            pool().give(std::mem::take(&mut self.raw));
        }
    }
}

impl AsRef<[u8]> for AlignedVec {
    fn as_ref(&self) -> &[u8] {
        &self.raw[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_buffer_is_aligned_empty_and_whole() {
        let len = 1 << 20;
        let capacity = room_for(len) + DIRECT_ALIGN;
        let mut pool = BufferPool {
            free: Vec::new(),
            bytes: 0,
        };
        let mut used = AlignedVec::in_allocation(Vec::with_capacity(capacity));
        used.vec_mut().extend_from_slice(&[7u8; 100]);
        let ptr = used.as_ref().as_ptr();
        pool.give(std::mem::take(&mut used.raw));
        let mut again = AlignedVec::in_allocation(pool.take(capacity).expect("kept"));
        assert_eq!(
            again.as_ref().as_ptr(),
            ptr,
            "the same allocation, same start"
        );
        assert_eq!(again.len(), 0, "a recycled buffer holds nothing");
        assert_eq!(again.zero_filled(len).len(), len, "the whole room is there");
        assert!(again.as_ref().iter().all(|&b| b == 0), "no old bytes show");
    }

    #[test]
    fn dropped_large_buffers_go_back_to_the_process_pool() {
        let len = (1 << 20) + 1;
        let bytes = {
            let mut buf = AlignedVec::with_capacity(len);
            buf.zero_filled(len);
            buf.into_bytes()
        };
        // The drop gives the allocation to the pool (unless other tests filled it).
        drop(bytes);
        let mut buf = AlignedVec::with_capacity(len);
        assert_eq!(buf.len(), 0);
        assert!((buf.as_ref().as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
        assert_eq!(buf.zero_filled(len).len(), len);
    }

    #[test]
    fn buffers_of_any_size_start_aligned_and_hold_their_length() {
        for len in [0, 1, 4095, 4096, 65_536, 65_537, 1 << 20, (1 << 20) + 1] {
            for _ in 0..2 {
                let mut buf = AlignedVec::with_capacity(len);
                assert!((buf.as_ref().as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
                assert_eq!(buf.zero_filled(len).len(), len, "len {len}");
            }
        }
    }

    #[test]
    fn the_pool_keeps_only_large_buffers_and_at_most_its_bound() {
        let mut pool = BufferPool {
            free: Vec::new(),
            bytes: 0,
        };
        pool.give(Vec::with_capacity(4096));
        assert!(pool.free.is_empty(), "small buffers go back to malloc");
        let class = (1 << 20) + DIRECT_ALIGN;
        let fits = POOL_MAX_BYTES / class;
        for _ in 0..fits + 3 {
            pool.give(Vec::with_capacity(class));
        }
        assert_eq!(pool.free.len(), fits);
        assert!(pool.bytes <= POOL_MAX_BYTES);
        assert!(
            pool.take(class + 1).is_none(),
            "only the exact size is reused"
        );
        let v = pool.take(class).expect("a kept buffer");
        assert_eq!(v.capacity(), class);
        assert_eq!(pool.bytes, (fits - 1) * class);
    }
}
