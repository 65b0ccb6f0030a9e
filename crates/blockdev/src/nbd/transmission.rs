//! Transmission phase, sans IO: parsing and validating requests, encoding replies.

use std::io;

use bytes::{Buf, Bytes};
use thiserror::Error;

use super::consts::*;
use super::export::{ExportInfo, Extent, Payload};

/// A request header exactly as it came off the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`NBD_CMD_*`).
    pub kind: u16,
    /// Echoed in the reply, so the client can match it.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Bytes (or, for block status, the range asked about).
    pub length: u32,
}

/// A request header that cannot be framed: the connection cannot resynchronise.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// Fewer bytes than a header.
    #[error("request header is {0} bytes, expected 28")]
    Truncated(usize),
    /// Not the request magic.
    #[error("request magic {0:#010x}, expected 0x25609513")]
    BadMagic(u32),
}

impl RequestHeader {
    /// Parses the 28-byte header. Only a bad magic is fatal; every other oddity is
    /// answered by [`validate`] with an error reply.
    pub fn parse(bytes: &[u8]) -> Result<RequestHeader, RequestError> {
        if bytes.len() != REQUEST_HEADER_LEN {
            return Err(RequestError::Truncated(bytes.len()));
        }
        let mut b = bytes;
        let magic = b.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(RequestError::BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: b.get_u16(),
            kind: b.get_u16(),
            cookie: b.get_u64(),
            offset: b.get_u64(),
            length: b.get_u32(),
        })
    }

    /// Encodes the header (used by tests and client tools).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Bytes of payload that follow this header on the wire; they must be consumed
    /// even when the request is rejected, or the stream loses its framing.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// A validated request, ready for the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// NBD_CMD_READ.
    Read {
        /// Byte offset in the export.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// NBD_CMD_WRITE; the payload follows the header.
    Write {
        /// Byte offset in the export.
        offset: u64,
        /// Bytes.
        len: u32,
        /// NBD_CMD_FLAG_FUA: stable before the reply.
        fua: bool,
    },
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim {
        /// Byte offset in the export.
        offset: u64,
        /// Bytes.
        len: u32,
        /// NBD_CMD_FLAG_FUA: stable before the reply.
        fua: bool,
    },
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes {
        /// Byte offset in the export.
        offset: u64,
        /// Bytes.
        len: u32,
        /// NBD_CMD_FLAG_FUA: stable before the reply.
        fua: bool,
        /// Not NBD_CMD_FLAG_NO_HOLE: the range may be deallocated.
        may_trim: bool,
        /// NBD_CMD_FLAG_FAST_ZERO: fail at once rather than zero slowly.
        fast: bool,
    },
    /// NBD_CMD_BLOCK_STATUS: one chunk per selected metadata context; `req_one` asks for
    /// a single descriptor no longer than `len`.
    BlockStatus {
        /// Byte offset in the export.
        offset: u64,
        /// Bytes.
        len: u32,
        /// NBD_CMD_FLAG_REQ_ONE.
        req_one: bool,
    },
    /// NBD_CMD_DISC: the client is done.
    Disconnect,
}

/// A request refused before it reaches the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The NBD error number sent back (`NBD_E*`).
    pub errno: u32,
    /// Why, for the log.
    pub message: String,
}

fn reject(errno: u32, message: impl Into<String>) -> Rejection {
    Rejection {
        errno,
        message: message.into(),
    }
}

/// Checks a request against the negotiated export: known command and flags, advertised
/// feature, read-only, bounds, alignment and payload limit. Error choices follow the
/// protocol's "Error values" section (ENOSPC for writes past the end, EINVAL otherwise).
pub fn validate(header: &RequestHeader, export: &ExportInfo) -> Result<Command, Rejection> {
    let RequestHeader {
        flags,
        kind,
        offset,
        length,
        ..
    } = *header;
    let allowed_flags = match kind {
        CMD_READ | CMD_FLUSH | CMD_DISC => CMD_FLAG_FUA,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES if export.features.fast_zero => {
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
        }
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => return Err(reject(EINVAL, format!("unknown command type {kind}"))),
    };
    if flags & !allowed_flags != 0 {
        return Err(reject(
            EINVAL,
            format!("command flags {flags:#x} not valid for command type {kind}"),
        ));
    }
    let fua = flags & CMD_FLAG_FUA != 0;
    let features = &export.features;
    match kind {
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH => {
            return if features.flush {
                Ok(Command::Flush)
            } else {
                Err(reject(EINVAL, "flush is not supported by this export"))
            };
        }
        _ => {}
    }
    let writes = matches!(kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.read_only {
        return Err(reject(EPERM, "export is read-only"));
    }
    if fua && writes && !features.fua {
        return Err(reject(EINVAL, "FUA is not supported by this export"));
    }
    if kind == CMD_TRIM && !features.trim {
        return Err(reject(EINVAL, "trim is not supported by this export"));
    }
    if kind == CMD_WRITE_ZEROES && !features.write_zeroes {
        return Err(reject(
            EINVAL,
            "write zeroes is not supported by this export",
        ));
    }
    let end = offset.checked_add(u64::from(length));
    if end.is_none_or(|end| end > export.size) {
        let errno = if matches!(kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return Err(reject(
            errno,
            format!(
                "range {offset}+{length} exceeds the export size {}",
                export.size
            ),
        ));
    }
    let sizes = &export.block_sizes;
    let minimum = u64::from(sizes.minimum.max(1));
    if offset % minimum != 0 || u64::from(length) % minimum != 0 {
        return Err(reject(
            EINVAL,
            format!("range {offset}+{length} is not aligned to the minimum block size {minimum}"),
        ));
    }
    if matches!(kind, CMD_READ | CMD_WRITE) && length > sizes.maximum_payload {
        return Err(reject(
            EINVAL,
            format!(
                "payload of {length} bytes exceeds the maximum {}",
                sizes.maximum_payload
            ),
        ));
    }
    Ok(match kind {
        CMD_READ => Command::Read {
            offset,
            len: length,
        },
        CMD_WRITE => Command::Write {
            offset,
            len: length,
            fua,
        },
        CMD_TRIM => Command::Trim {
            offset,
            len: length,
            fua,
        },
        _ => Command::WriteZeroes {
            offset,
            len: length,
            fua,
            may_trim: flags & CMD_FLAG_NO_HOLE == 0,
            fast: flags & CMD_FLAG_FAST_ZERO != 0,
        },
    })
}

/// Checks an NBD_CMD_BLOCK_STATUS request (which [`validate`] does not know): flags, a
/// metadata context selected for this export (`selected`, from the handshake, which only
/// selects after structured replies), a non-zero length, bounds and alignment. Every
/// refusal is EINVAL, as the protocol asks.
pub fn validate_block_status(
    header: &RequestHeader,
    export: &ExportInfo,
    selected: usize,
) -> Result<Command, Rejection> {
    let RequestHeader {
        flags,
        kind,
        offset,
        length,
        ..
    } = *header;
    if kind != CMD_BLOCK_STATUS {
        return Err(reject(
            EINVAL,
            format!("command type {kind} is not BLOCK_STATUS"),
        ));
    }
    if flags & !(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE) != 0 {
        return Err(reject(
            EINVAL,
            format!("command flags {flags:#x} not valid for BLOCK_STATUS"),
        ));
    }
    if selected == 0 {
        return Err(reject(
            EINVAL,
            "BLOCK_STATUS without a metadata context selected for this export (NBD_OPT_SET_META_CONTEXT)",
        ));
    }
    if length == 0 {
        return Err(reject(EINVAL, "BLOCK_STATUS of length 0"));
    }
    if offset
        .checked_add(u64::from(length))
        .is_none_or(|end| end > export.size)
    {
        return Err(reject(
            EINVAL,
            format!(
                "range {offset}+{length} exceeds the export size {}",
                export.size
            ),
        ));
    }
    let minimum = u64::from(export.block_sizes.minimum.max(1));
    if offset % minimum != 0 || u64::from(length) % minimum != 0 {
        return Err(reject(
            EINVAL,
            format!("range {offset}+{length} is not aligned to the minimum block size {minimum}"),
        ));
    }
    Ok(Command::BlockStatus {
        offset,
        len: length,
        req_one: flags & CMD_FLAG_REQ_ONE != 0,
    })
}

/// Most descriptors in one block status chunk (the protocol's limit is 2^20; a smaller
/// one keeps a reply under 512 KiB per context).
pub const MAX_BLOCK_STATUS_DESCRIPTORS: usize = 1 << 16;

/// Turns a backend's extents for a BLOCK_STATUS of `len` bytes at `offset` into the
/// chunk's descriptors (length, flags), following the protocol: consecutive from
/// `offset`, non-zero lengths, none past the export's end, equal neighbours merged, the
/// sum of all but the last below `len`, only the last allowed to reach past `len` (and
/// not with `req_one`, which keeps just one descriptor), each within 32 bits and ending
/// on a multiple of `minimum` unless at the end of the export. An error means the
/// backend broke its contract (empty extent, unaligned boundary, nothing at all).
pub fn block_status_descriptors(
    extents: &[Extent],
    offset: u64,
    len: u32,
    size: u64,
    minimum: u32,
    req_one: bool,
) -> Result<Vec<(u32, u32)>, String> {
    let minimum = u64::from(minimum.max(1));
    let wanted_end = offset.saturating_add(u64::from(len));
    let mut runs: Vec<(u64, u32)> = Vec::new();
    let mut at = offset;
    for e in extents {
        if e.len == 0 {
            return Err(format!("backend returned an empty extent at {at}"));
        }
        if at >= size || at >= wanted_end || runs.len() >= MAX_BLOCK_STATUS_DESCRIPTORS {
            break;
        }
        let end = at.saturating_add(e.len).min(size);
        if end != size && end % minimum != 0 {
            return Err(format!(
                "backend extent ends at {end}, not a multiple of the minimum block size {minimum}"
            ));
        }
        match runs.last_mut() {
            Some((n, flags)) if *flags == e.flags => *n += end - at,
            _ => runs.push((end - at, e.flags)),
        }
        at = end;
    }
    if runs.is_empty() {
        return Err(format!("backend returned no extent for offset {offset}"));
    }
    if req_one {
        runs.truncate(1);
    }
    // Only the last run can reach past `len` (the others end before `wanted_end`), so
    // only it may need clipping to 32 bits, or to `len` with `req_one`.
    let cap = if req_one {
        u64::from(len)
    } else {
        u64::from(u32::MAX) / minimum * minimum
    };
    let last = runs.len() - 1;
    runs[last].0 = runs[last].0.min(cap);
    Ok(runs
        .into_iter()
        .map(|(n, flags)| (n as u32, flags))
        .collect())
}

/// Maps a backend error to the closest error value the protocol allows.
pub fn errno_of(err: &io::Error) -> u32 {
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        Some(libc::ESHUTDOWN) => ESHUTDOWN,
        _ => match err.kind() {
            io::ErrorKind::PermissionDenied => EPERM,
            io::ErrorKind::InvalidInput => EINVAL,
            io::ErrorKind::OutOfMemory => ENOMEM,
            io::ErrorKind::Unsupported => ENOTSUP,
            _ => EIO,
        },
    }
}

/// The fixed-size part of a reply, kept inline so a reply costs no allocation beyond
/// its data buffer.
#[derive(Clone, Copy)]
pub struct ReplyHead {
    bytes: [u8; CHUNK_HEADER_LEN + 8],
    len: u8,
}

impl ReplyHead {
    /// The header's bytes, as sent.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for ReplyHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReplyHead({:02x?})", self.as_slice())
    }
}

/// One complete reply: a header and an optional payload written after it (vectored).
#[derive(Debug)]
pub struct Reply {
    /// The simple or structured reply header.
    pub head: ReplyHead,
    /// What follows it (read data, block status descriptors, an error message).
    pub payload: Payload,
}

impl Reply {
    fn simple(cookie: u64, errno: u32, payload: impl Into<Payload>) -> Reply {
        let mut bytes = [0u8; CHUNK_HEADER_LEN + 8];
        bytes[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        bytes[4..8].copy_from_slice(&errno.to_be_bytes());
        bytes[8..16].copy_from_slice(&cookie.to_be_bytes());
        Reply {
            head: ReplyHead {
                bytes,
                len: SIMPLE_REPLY_LEN as u8,
            },
            payload: payload.into(),
        }
    }

    fn chunk(
        cookie: u64,
        kind: u16,
        length: u32,
        offset: Option<u64>,
        payload: impl Into<Payload>,
    ) -> Reply {
        let mut bytes = [0u8; CHUNK_HEADER_LEN + 8];
        bytes[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        bytes[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        bytes[6..8].copy_from_slice(&kind.to_be_bytes());
        bytes[8..16].copy_from_slice(&cookie.to_be_bytes());
        bytes[16..20].copy_from_slice(&length.to_be_bytes());
        let mut len = CHUNK_HEADER_LEN;
        if let Some(offset) = offset {
            bytes[20..28].copy_from_slice(&offset.to_be_bytes());
            len += 8;
        }
        Reply {
            head: ReplyHead {
                bytes,
                len: len as u8,
            },
            payload: payload.into(),
        }
    }

    /// Success without data (every command except a non-empty READ). A simple reply is
    /// allowed for these even after structured replies were negotiated.
    pub fn done(cookie: u64, structured: bool, was_read: bool) -> Reply {
        if structured && was_read {
            // READ must never get a simple reply once structured replies are on.
            Reply::chunk(cookie, REPLY_TYPE_NONE, 0, None, Bytes::new())
        } else {
            Reply::simple(cookie, 0, Bytes::new())
        }
    }

    /// Successful READ of `data` from `offset`.
    pub fn read_data(cookie: u64, offset: u64, data: Payload, structured: bool) -> Reply {
        if data.is_empty() {
            return Reply::done(cookie, structured, true);
        }
        if structured {
            // Payloads are at most 32 MiB (validated), so the length fits in 32 bits.
            let length = (data.len() as u64 + 8).min(u64::from(u32::MAX)) as u32;
            Reply::chunk(cookie, REPLY_TYPE_OFFSET_DATA, length, Some(offset), data)
        } else {
            Reply::simple(cookie, 0, data)
        }
    }

    /// A failed request. With structured replies the message travels with the error.
    pub fn error(cookie: u64, errno: u32, message: &str, structured: bool) -> Reply {
        let errno = if errno == 0 { EIO } else { errno };
        if !structured {
            return Reply::simple(cookie, errno, Bytes::new());
        }
        let mut message = message.as_bytes();
        if message.len() > MAX_STRING_LEN {
            message = &message[..MAX_STRING_LEN];
        }
        let mut payload = Vec::with_capacity(6 + message.len());
        payload.extend_from_slice(&errno.to_be_bytes());
        payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
        payload.extend_from_slice(message);
        let length = payload.len() as u32;
        Reply::chunk(cookie, REPLY_TYPE_ERROR, length, None, Bytes::from(payload))
    }

    /// A successful BLOCK_STATUS: one NBD_REPLY_TYPE_BLOCK_STATUS chunk per context
    /// (context id, descriptors), DONE on the last. The first chunk's header is the head;
    /// the rest of the reply is one payload.
    pub fn block_status(cookie: u64, chunks: &[(u32, Vec<(u32, u32)>)]) -> Reply {
        if chunks.is_empty() {
            return Reply::simple(cookie, 0, Bytes::new());
        }
        let mut payload = Vec::new();
        let mut first = None;
        for (i, (id, descriptors)) in chunks.iter().enumerate() {
            let length = (4 + 8 * descriptors.len()) as u32;
            let mut body = Vec::with_capacity(length as usize);
            body.extend_from_slice(&id.to_be_bytes());
            for (n, flags) in descriptors {
                body.extend_from_slice(&n.to_be_bytes());
                body.extend_from_slice(&flags.to_be_bytes());
            }
            let mut head =
                Reply::chunk(cookie, REPLY_TYPE_BLOCK_STATUS, length, None, Bytes::new());
            if i + 1 < chunks.len() {
                // Not the last chunk: clear DONE.
                head.head.bytes[4..6].copy_from_slice(&0u16.to_be_bytes());
            }
            match first {
                None => first = Some(head.head),
                Some(_) => payload.extend_from_slice(head.head.as_slice()),
            }
            payload.extend_from_slice(&body);
        }
        Reply {
            head: first.unwrap_or(Reply::simple(cookie, 0, Bytes::new()).head),
            payload: Bytes::from(payload).into(),
        }
    }

    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        self.head.as_slice().len() + self.payload.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::export::{BlockSizes, ExportFeatures};
    use proptest::prelude::*;

    /// A reply's payload in one vector.
    fn payload_bytes(r: &Reply) -> Vec<u8> {
        r.payload.parts().flat_map(|p| p.iter().copied()).collect()
    }

    fn export(read_only: bool, minimum: u32) -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            description: None,
            size: 1 << 20,
            read_only,
            features: ExportFeatures {
                trim: true,
                write_zeroes: true,
                ..Default::default()
            },
            block_sizes: BlockSizes {
                minimum,
                ..Default::default()
            },
        }
    }

    fn header(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 42,
            offset,
            length,
        }
    }

    #[test]
    fn header_round_trip_and_bad_magic() {
        let h = header(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        assert_eq!(RequestHeader::parse(&h.encode()), Ok(h));
        assert_eq!(h.payload_len(), 512);
        assert_eq!(header(CMD_READ, 0, 0, 512).payload_len(), 0);
        let mut bytes = h.encode();
        bytes[0] = 0;
        assert!(matches!(
            RequestHeader::parse(&bytes),
            Err(RequestError::BadMagic(_))
        ));
        assert_eq!(
            RequestHeader::parse(&bytes[..27]),
            Err(RequestError::Truncated(27))
        );
    }

    #[test]
    fn validation_errors_follow_the_protocol() {
        let rw = export(false, 1);
        let errno = |h: RequestHeader, e: &ExportInfo| validate(&h, e).map_err(|r| r.errno);
        assert_eq!(
            errno(header(CMD_READ, 0, (1 << 20) - 1, 2), &rw),
            Err(EINVAL)
        );
        assert_eq!(errno(header(CMD_WRITE, 0, 1 << 20, 1), &rw), Err(ENOSPC));
        assert_eq!(
            errno(header(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &rw),
            Err(ENOSPC)
        );
        assert_eq!(errno(header(CMD_TRIM, 0, u64::MAX, 1), &rw), Err(EINVAL));
        assert_eq!(errno(header(99, 0, 0, 0), &rw), Err(EINVAL));
        assert_eq!(
            errno(header(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1), &rw),
            Err(EINVAL)
        );
        assert_eq!(
            errno(header(CMD_WRITE, 1 << 4, 0, 1), &rw),
            Err(EINVAL),
            "FAST_ZERO not offered"
        );
        assert_eq!(
            errno(header(CMD_READ, 0, 0, 1 << 20), &rw),
            Ok(Command::Read {
                offset: 0,
                len: 1 << 20
            })
        );
        assert_eq!(
            errno(header(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1), &rw),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 1,
                fua: false,
                may_trim: false,
                fast: false
            })
        );
        assert_eq!(
            errno(header(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1), &rw),
            Err(EINVAL),
            "FAST_ZERO on an export that does not advertise it"
        );
        let mut fast = export(false, 1);
        fast.features.fast_zero = true;
        assert_eq!(
            errno(header(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1), &fast),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 1,
                fua: false,
                may_trim: true,
                fast: true
            })
        );
        assert_eq!(
            errno(header(CMD_WRITE, CMD_FLAG_FAST_ZERO, 0, 1), &fast),
            Err(EINVAL),
            "FAST_ZERO is only valid on WRITE_ZEROES"
        );
        assert_eq!(
            errno(header(CMD_DISC, 0, 0, 0), &rw),
            Ok(Command::Disconnect)
        );

        let ro = export(true, 1);
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(errno(header(kind, 0, 0, 1), &ro), Err(EPERM));
        }
        assert_eq!(errno(header(CMD_FLUSH, 0, 0, 0), &ro), Ok(Command::Flush));

        let aligned = export(false, 512);
        assert_eq!(errno(header(CMD_READ, 0, 1, 512), &aligned), Err(EINVAL));
        assert_eq!(errno(header(CMD_READ, 0, 512, 100), &aligned), Err(EINVAL));
        assert!(errno(header(CMD_READ, 0, 512, 1024), &aligned).is_ok());

        let mut plain = export(false, 1);
        plain.features.trim = false;
        assert_eq!(
            errno(header(CMD_TRIM, 0, 0, 1), &plain),
            Err(EINVAL),
            "trim not advertised"
        );
    }

    #[test]
    fn replies_are_encoded_per_protocol() {
        let r = Reply::error(7, EINVAL, "bad", false);
        assert_eq!(
            r.head.as_slice(),
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        assert!(r.payload.is_empty());
        let r = Reply::error(7, EINVAL, "bad", true);
        assert_eq!(
            &r.head.as_slice()[0..8],
            &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1]
        );
        assert_eq!(&r.head.as_slice()[16..20], &9u32.to_be_bytes());
        assert_eq!(payload_bytes(&r), &[0, 0, 0, 22, 0, 3, b'b', b'a', b'd']);
        let r = Reply::read_data(1, 4096, Bytes::from_static(b"data").into(), true);
        assert_eq!(r.head.as_slice().len(), 28);
        assert_eq!(&r.head.as_slice()[16..20], &12u32.to_be_bytes());
        assert_eq!(&r.head.as_slice()[20..28], &4096u64.to_be_bytes());
        assert_eq!(r.wire_len(), 32);
        let r = Reply::read_data(1, 0, Bytes::from_static(b"data").into(), false);
        assert_eq!(r.head.as_slice().len(), 16);
        assert_eq!(r.wire_len(), 20);
    }

    #[test]
    fn block_status_requests_are_validated() {
        let e = export(false, 512);
        let check = |flags, offset, length, selected| {
            validate_block_status(
                &header(CMD_BLOCK_STATUS, flags, offset, length),
                &e,
                selected,
            )
            .map_err(|r| r.errno)
        };
        assert_eq!(
            check(CMD_FLAG_REQ_ONE, 512, 1024, 1),
            Ok(Command::BlockStatus {
                offset: 512,
                len: 1024,
                req_one: true
            })
        );
        assert_eq!(check(0, 0, 512, 0), Err(EINVAL), "no context selected");
        assert_eq!(check(0, 0, 0, 1), Err(EINVAL), "length 0");
        assert_eq!(
            check(0, (1 << 20) - 512, 1024, 1),
            Err(EINVAL),
            "past the end"
        );
        assert_eq!(check(0, u64::MAX - 511, 512, 1), Err(EINVAL), "overflow");
        assert_eq!(check(0, 100, 512, 1), Err(EINVAL), "unaligned");
        assert_eq!(check(CMD_FLAG_NO_HOLE, 0, 512, 1), Err(EINVAL), "bad flag");
        assert!(check(CMD_FLAG_FUA, 0, 1 << 20, 1).is_ok());
        // `validate` still knows nothing of it.
        assert_eq!(
            validate(&header(CMD_BLOCK_STATUS, 0, 0, 512), &e).map_err(|r| r.errno),
            Err(EINVAL)
        );
    }

    fn x(len: u64, flags: u32) -> Extent {
        Extent { len, flags }
    }

    #[test]
    fn block_status_descriptors_follow_the_reply_rules() {
        let d = block_status_descriptors;
        // Merged neighbours; the last may reach past the request.
        assert_eq!(
            d(
                &[x(512, 3), x(512, 3), x(4096, 0)],
                0,
                2048,
                1 << 20,
                512,
                false
            ),
            Ok(vec![(1024, 3), (4096, 0)])
        );
        // Extents beyond the one that reaches the request's end are dropped.
        assert_eq!(
            d(&[x(4096, 3), x(512, 0)], 0, 1024, 1 << 20, 512, false),
            Ok(vec![(4096, 3)])
        );
        // REQ_ONE: one descriptor, at most the request's length.
        assert_eq!(
            d(&[x(4096, 3), x(512, 0)], 0, 1024, 1 << 20, 512, true),
            Ok(vec![(1024, 3)])
        );
        // Never past the export's end; that end may be unaligned.
        assert_eq!(
            d(&[x(1 << 30, 0)], 1000, 24, 1100, 1, false),
            Ok(vec![(100, 0)])
        );
        // A huge last extent is cut to 32 bits, on a block boundary.
        assert_eq!(
            d(&[x(1 << 40, 1)], 0, 4096, 1 << 41, 4096, false),
            Ok(vec![(u32::MAX / 4096 * 4096, 1)])
        );
        // Contract breaches are errors, not bad replies.
        assert!(d(&[], 0, 512, 1 << 20, 512, false).is_err());
        assert!(d(&[x(0, 1)], 0, 512, 1 << 20, 512, false).is_err());
        assert!(d(&[x(100, 1), x(412, 0)], 0, 512, 1 << 20, 512, false).is_err());
    }

    #[test]
    fn block_status_replies_are_one_chunk_per_context() {
        let r = Reply::block_status(9, &[(1, vec![(4096, 3)]), (7, vec![(512, 0), (512, 1)])]);
        let mut wire = r.head.as_slice().to_vec();
        wire.extend_from_slice(&payload_bytes(&r));
        let mut rest = &wire[..];
        let mut chunks = Vec::new();
        while !rest.is_empty() {
            assert_eq!(rest.get_u32(), STRUCTURED_REPLY_MAGIC);
            let flags = rest.get_u16();
            assert_eq!(rest.get_u16(), REPLY_TYPE_BLOCK_STATUS);
            assert_eq!(rest.get_u64(), 9);
            let len = rest.get_u32() as usize;
            let mut body = &rest[..len];
            rest.advance(len);
            let id = body.get_u32();
            let mut descriptors = Vec::new();
            while !body.is_empty() {
                descriptors.push((body.get_u32(), body.get_u32()));
            }
            chunks.push((flags, id, descriptors));
        }
        assert_eq!(
            chunks,
            vec![
                (0, 1, vec![(4096, 3)]),
                (REPLY_FLAG_DONE, 7, vec![(512, 0), (512, 1)])
            ]
        );
    }

    #[test]
    fn os_errors_map_to_protocol_errors() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(errno_of(&os(libc::EDQUOT)), ENOSPC);
        assert_eq!(errno_of(&os(libc::EROFS)), EPERM);
        assert_eq!(errno_of(&os(libc::EBADF)), EIO);
        assert_eq!(errno_of(&io::Error::other("x")), EIO);
    }

    proptest! {
        /// Whatever 28 bytes arrive, parsing and validation never panic, and an accepted
        /// data command always lies inside the export and respects its limits.
        #[test]
        fn accepted_commands_are_in_bounds(bytes in proptest::array::uniform28(any::<u8>()), magic in any::<bool>(), minimum in prop::sample::select(vec![1u32, 512, 4096])) {
            let mut bytes = bytes;
            if magic {
                bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            let Ok(h) = RequestHeader::parse(&bytes) else { return Ok(()); };
            let e = export(false, minimum);
            if let Ok(cmd) = validate(&h, &e) {
                let range = match cmd {
                    Command::Read { offset, len } | Command::Write { offset, len, .. } => {
                        prop_assert!(len <= e.block_sizes.maximum_payload);
                        Some((offset, len))
                    }
                    Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. } => Some((offset, len)),
                    Command::BlockStatus { .. } | Command::Flush | Command::Disconnect => None,
                };
                if let Some((offset, len)) = range {
                    prop_assert!(offset + u64::from(len) <= e.size);
                    prop_assert_eq!(offset % u64::from(minimum), 0);
                    prop_assert_eq!(len % minimum, 0);
                }
            }
        }
    }
}
