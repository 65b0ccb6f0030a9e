//! Framing: the one place where messages become bytes and back.
//!
//! A frame is
//!
//! ```text
//! u32 length (big endian) | u8 protocol version | MessagePack body | [16-byte tag]
//! ```
//!
//! `length` counts everything after itself and is at most [`MAX_FRAME`]. The body is
//! rmp-serde with named struct fields, so fields can be added in later versions. Decoding
//! never panics: every malformed input is a [`FrameError`] naming what was wrong.
//!
//! Frames after the handshake are sealed: they end with a tag, HMAC-SHA256 truncated to
//! [`TAG_LEN`] bytes, keyed with the connection's key for that direction
//! ([`crate::auth::session_keys`]) over the frame's sequence number in that direction
//! (u64 big endian, from 0, not sent) and the version byte and body. A changed, forged,
//! replayed, reordered or dropped frame fails the check of the frame it hits or the next
//! one, and the tag is checked before the body is parsed.

use crate::auth::{keyed, FrameKey, HmacSha256};
use hmac::Mac as _;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The protocol version this build speaks, carried in every frame and in `Hello`.
/// Version 2: paged `ListSnapshots`/`SnapshotList`, `usage_exact` in lists and status.
/// Version 3: `ReleaseStoreReads` (store reads hold their chunks until released);
/// snapshots announced before they are created; origin write leases (`KeepAlive`,
/// `Welcome::origin_lease_secs`).
/// Version 5: every frame after the handshake carries a tag (per-connection keys, sequence
/// numbers); the proofs cover every field of `Hello`.
/// Version 4: client ids name the connection's kind (`ClientId{instance, kind}`), `Hello`
/// carries an `incarnation` instead of `kind`, and `DuplicateClient` refuses a second
/// client with a live connection's id; `CreateSnapshot` carries a token (a resend is
/// answered with the snapshot it created), `DeleteSnapshot` takes an id only, and
/// `FindSnapshot` looks a name up.
/// Version 6: `Diff`/`DiffPage` (the chunks two ends read differently, paged).
pub const PROTOCOL_VERSION: u8 = 7;
/// Largest accepted `length` (version byte + body + tag).
pub const MAX_FRAME: usize = 1 << 20;
/// Size of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Why a frame cannot be decoded, opened or encoded.
#[derive(Debug, thiserror::Error)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
pub enum FrameError {
    #[error("frame length {length} exceeds the maximum of {max} bytes")]
    Oversize { length: usize, max: usize },
    #[error("frame length is zero (no version byte)")]
    Empty,
    #[error("frame truncated: {have} of {need} bytes present")]
    Truncated { have: usize, need: usize },
    #[error("unsupported protocol version {got} (this side speaks {ours})")]
    WrongVersion { got: u8, ours: u8 },
    #[error("malformed frame body: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the frame body")]
    TrailingBytes(usize),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("frame {seq} failed authentication (tampered, forged, replayed or out of order)")]
    BadTag { seq: u64 },
    #[error("frame too short for its authentication tag ({length} bytes)")]
    NoTag { length: usize },
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of decoding from a buffer that may hold a partial frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A whole frame: the message and how many bytes it used.
    Frame(T, usize),
    /// The buffer holds only the start of a frame; `need` bytes are needed in total.
    Incomplete {
        /// Bytes of the whole frame.
        need: usize,
    },
}

/// Length of the tag that ends a sealed frame.
pub const TAG_LEN: usize = 16;

/// Seals the frames of one direction of one connection (see the module docs).
#[derive(Clone)]
pub struct FrameSealer {
    mac: HmacSha256,
    next_seq: u64,
}

/// Checks the frames of one direction of one connection (see the module docs).
#[derive(Clone)]
pub struct FrameOpener {
    mac: HmacSha256,
    next_seq: u64,
}

impl std::fmt::Debug for FrameSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameSealer {{ next_seq: {} }}", self.next_seq)
    }
}

impl std::fmt::Debug for FrameOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameOpener {{ next_seq: {} }}", self.next_seq)
    }
}

/// The tag of frame `seq` with this version byte and body. `mac` is keyed already (cloning
/// it skips re-hashing the key).
fn frame_tag(mac: &HmacSha256, seq: u64, version_and_body: &[u8]) -> HmacSha256 {
    let mut mac = mac.clone();
    mac.update(&seq.to_be_bytes());
    mac.update(version_and_body);
    mac
}

impl FrameSealer {
    /// A sealer for the direction `key` is for, from its first frame.
    pub fn new(key: &FrameKey) -> FrameSealer {
        FrameSealer {
            mac: keyed(&key.0),
            next_seq: 0,
        }
    }

    /// Frames sealed so far.
    pub fn sealed(&self) -> u64 {
        self.next_seq
    }
}

impl FrameOpener {
    /// An opener for the direction `key` is for, from its first frame.
    pub fn new(key: &FrameKey) -> FrameOpener {
        FrameOpener {
            mac: keyed(&key.0),
            next_seq: 0,
        }
    }

    /// Frames opened so far.
    pub fn opened(&self) -> u64 {
        self.next_seq
    }
}

/// Appends one frame holding `msg` to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    encode_frame_with(msg, None, out)
}

/// Appends one frame holding `msg` to `out`, sealed with the sender's next sequence number
/// when `sealer` is given. Nothing is appended, and no sequence number used, on error.
pub fn encode_frame_with<T: Serialize>(
    msg: &T,
    sealer: Option<&mut FrameSealer>,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    // The body is encoded straight into `out` after a placeholder prefix (no copy of a
    // data-carrying body through a buffer of its own); undone on error.
    let frame_start = out.len();
    out.extend_from_slice(&[0; LENGTH_PREFIX]);
    let start = out.len();
    out.push(PROTOCOL_VERSION);
    if let Err(e) = rmp_serde::encode::write_named(out, msg) {
        out.truncate(frame_start);
        return Err(FrameError::Encode(e.to_string()));
    }
    let tag_len = if sealer.is_some() { TAG_LEN } else { 0 };
    let length = out.len() - start + tag_len;
    if length > MAX_FRAME {
        out.truncate(frame_start);
        return Err(FrameError::Oversize {
            length,
            max: MAX_FRAME,
        });
    }
    // length <= MAX_FRAME fits in u32.
    out[frame_start..start].copy_from_slice(&(length as u32).to_be_bytes());
    if let Some(sealer) = sealer {
        let tag = frame_tag(&sealer.mac, sealer.next_seq, &out[start..])
            .finalize()
            .into_bytes();
        out.extend_from_slice(&tag[..TAG_LEN]);
        sealer.next_seq += 1;
    }
    Ok(())
}

/// Encodes one frame into a fresh buffer.
pub fn frame_bytes<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_frame(msg, &mut out)?;
    Ok(out)
}

/// Decodes the frame at the start of `buf`, which may hold less (`Incomplete`) or more (the
/// rest is left for the next call). Oversize lengths are rejected as soon as the prefix is
/// readable, before any body is buffered. This is the fuzzing entry point.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Decoded<T>, FrameError> {
    decode_frame_with(buf, None)
}

/// [`decode_frame`] for a frame that must be sealed with `opener`'s key and next sequence
/// number (when given). The tag is checked before anything else of the frame is read; the
/// sequence number advances only when a whole frame decoded.
pub fn decode_frame_with<T: DeserializeOwned>(
    buf: &[u8],
    opener: Option<&mut FrameOpener>,
) -> Result<Decoded<T>, FrameError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX) else {
        return Ok(Decoded::Incomplete {
            need: LENGTH_PREFIX,
        });
    };
    let length = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if length > MAX_FRAME {
        return Err(FrameError::Oversize {
            length,
            max: MAX_FRAME,
        });
    }
    if length == 0 {
        return Err(FrameError::Empty);
    }
    let need = LENGTH_PREFIX + length;
    let Some(mut frame) = buf.get(LENGTH_PREFIX..need) else {
        return Ok(Decoded::Incomplete { need });
    };
    let mut opened = None;
    if let Some(opener) = opener {
        if frame.len() < 1 + TAG_LEN {
            return Err(FrameError::NoTag { length });
        }
        let (content, tag) = frame.split_at(frame.len() - TAG_LEN);
        if frame_tag(&opener.mac, opener.next_seq, content)
            .verify_truncated_left(tag)
            .is_err()
        {
            return Err(FrameError::BadTag {
                seq: opener.next_seq,
            });
        }
        frame = content;
        opened = Some(opener);
    }
    let version = frame[0];
    if version != PROTOCOL_VERSION {
        return Err(FrameError::WrongVersion {
            got: version,
            ours: PROTOCOL_VERSION,
        });
    }
    let body = &frame[1..];
    check_structure(body)?;
    let mut de = rmp_serde::Deserializer::new(body);
    let msg = T::deserialize(&mut de).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let trailing = de.get_ref().len();
    if trailing != 0 {
        return Err(FrameError::TrailingBytes(trailing));
    }
    if let Some(opener) = opened {
        opener.next_seq += 1;
    }
    Ok(Decoded::Frame(msg, need))
}

/// Deepest MessagePack nesting accepted; csnap messages need about 6 levels.
pub const MAX_NESTING: usize = 32;

/// Walks a MessagePack body without recursion and checks that it is one well-formed value
/// whose containers nest at most [`MAX_NESTING`] deep and whose lengths fit the body. The
/// deserializer then never sees input that could exhaust the stack (unknown fields are
/// skipped recursively by serde) or make it loop over absurd element counts.
fn check_structure(body: &[u8]) -> Result<(), FrameError> {
    let truncated = || FrameError::Malformed("body ends inside a value".into());
    let mut pos = 0usize;
    // Values still expected at each open nesting level; the root expects one.
    let mut open: Vec<u64> = vec![1];
    while let Some(remaining) = open.last_mut() {
        if *remaining == 0 {
            open.pop();
            continue;
        }
        *remaining -= 1;
        let marker = *body.get(pos).ok_or_else(truncated)?;
        pos += 1;
        let read_len = |pos: &mut usize, width: usize| -> Result<u64, FrameError> {
            let bytes = body.get(*pos..*pos + width).ok_or_else(truncated)?;
            *pos += width;
            Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
        };
        // (payload bytes to skip, elements of a container)
        let (skip, elements): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xc1 => return Err(FrameError::Malformed("reserved byte 0xc1".into())),
            0xc4 | 0xd9 => (read_len(&mut pos, 1)?, 0),
            0xc5 | 0xda => (read_len(&mut pos, 2)?, 0),
            0xc6 | 0xdb => (read_len(&mut pos, 4)?, 0),
            0xc7 => (read_len(&mut pos, 1)? + 1, 0),
            0xc8 => (read_len(&mut pos, 2)? + 1, 0),
            0xc9 => (read_len(&mut pos, 4)? + 1, 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, read_len(&mut pos, 2)?),
            0xdd => (0, read_len(&mut pos, 4)?),
            0xde => (0, 2 * read_len(&mut pos, 2)?),
            0xdf => (0, 2 * read_len(&mut pos, 4)?),
        };
        let left = (body.len() - pos) as u64;
        if skip > left || elements > left {
            // Every element takes at least one byte.
            return Err(truncated());
        }
        pos += skip as usize;
        if elements > 0 {
            if open.len() > MAX_NESTING {
                return Err(FrameError::Malformed(format!(
                    "values nested deeper than {MAX_NESTING} levels"
                )));
            }
            open.push(elements);
        }
    }
    if pos != body.len() {
        return Err(FrameError::TrailingBytes(body.len() - pos));
    }
    Ok(())
}

/// Decodes a buffer that must hold exactly one whole frame.
pub fn decode_complete_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<T, FrameError> {
    match decode_frame(buf)? {
        Decoded::Frame(msg, used) if used == buf.len() => Ok(msg),
        Decoded::Frame(_, used) => Err(FrameError::TrailingBytes(buf.len() - used)),
        Decoded::Incomplete { need } => Err(FrameError::Truncated {
            have: buf.len(),
            need,
        }),
    }
}
