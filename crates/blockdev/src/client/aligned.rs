//! Buffers that start at a [`DIRECT_ALIGN`] boundary, shared by the NBD connection
//! (write payloads are received into them), the device layer and io_uring (reads land
//! in them), so no O_DIRECT transfer needs a bounce buffer.

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

impl AsRef<[u8]> for AlignedVec {
    fn as_ref(&self) -> &[u8] {
        &self.raw[self.start..]
    }
}
