//! Framing: the one place where messages become bytes and back.
//!
//! A frame is
//!
//! ```text
//! u32 length (big endian) | u8 protocol version | MessagePack body (length - 1 bytes)
//! ```
//!
//! `length` counts the version byte and the body and is at most [`MAX_FRAME`]. The body is
//! rmp-serde with named struct fields, so fields can be added in later versions. Decoding
//! never panics: every malformed input is a [`FrameError`] naming what was wrong.

use bytes::{Buf, BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::marker::PhantomData;

/// The protocol version this build speaks, carried in every frame and in `Hello`.
pub const PROTOCOL_VERSION: u8 = 1;
/// Largest accepted `length` (version byte + body).
pub const MAX_FRAME: usize = 1 << 20;
/// Size of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

#[derive(Debug, thiserror::Error)]
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
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of decoding from a buffer that may hold a partial frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A whole frame: the message and how many bytes it used.
    Frame(T, usize),
    /// The buffer holds only the start of a frame; `need` bytes are needed in total.
    Incomplete { need: usize },
}

/// Appends one frame holding `msg` to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let body = rmp_serde::to_vec_named(msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    let length = body.len() + 1;
    if length > MAX_FRAME {
        return Err(FrameError::Oversize {
            length,
            max: MAX_FRAME,
        });
    }
    out.reserve(LENGTH_PREFIX + length);
    // length <= MAX_FRAME fits in u32.
    out.put_u32(length as u32);
    out.put_u8(PROTOCOL_VERSION);
    out.extend_from_slice(&body);
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
    let Some(frame) = buf.get(LENGTH_PREFIX..need) else {
        return Ok(Decoded::Incomplete { need });
    };
    let version = frame[0];
    if version != PROTOCOL_VERSION {
        return Err(FrameError::WrongVersion {
            got: version,
            ours: PROTOCOL_VERSION,
        });
    }
    let body = &frame[1..];
    let mut de = rmp_serde::Deserializer::new(body);
    let msg = T::deserialize(&mut de).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let trailing = de.get_ref().len();
    if trailing != 0 {
        return Err(FrameError::TrailingBytes(trailing));
    }
    Ok(Decoded::Frame(msg, need))
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

/// tokio-util codec over [`decode_frame`]/[`encode_frame`]: decodes `In`, encodes `Out`
/// (a server uses `FrameCodec<ClientFrame, ServerFrame>`, a client the reverse).
pub struct FrameCodec<In, Out> {
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new() -> Self {
        FrameCodec {
            _types: PhantomData,
        }
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In: DeserializeOwned, Out> tokio_util::codec::Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match decode_frame(src)? {
            Decoded::Frame(msg, used) => {
                src.advance(used);
                Ok(Some(msg))
            }
            Decoded::Incomplete { need } => {
                src.reserve(need.saturating_sub(src.len()));
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                have: src.len(),
                need: match decode_frame::<In>(src)? {
                    Decoded::Incomplete { need } => need,
                    Decoded::Frame(_, used) => used,
                },
            }),
        }
    }
}

impl<In, Out: Serialize> tokio_util::codec::Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let mut out = Vec::new();
        encode_frame(&item, &mut out)?;
        dst.extend_from_slice(&out);
        Ok(())
    }
}
