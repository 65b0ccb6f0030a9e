//! The tokio-util codec over the framing of [`crate::frame`], for async byte streams
//! (feature `codec`; the wire types and the framing itself need no async runtime).

use std::marker::PhantomData;

use bytes::{Buf, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::auth::FrameKey;
use crate::frame::{
    decode_frame_with, encode_frame_with, Decoded, FrameError, FrameOpener, FrameSealer,
};

/// tokio-util codec over [`decode_frame_with`]/[`encode_frame_with`]: decodes `In`, encodes
/// `Out` (a server uses `FrameCodec<ClientFrame, ServerFrame>`, a client the reverse).
/// Plain until [`FrameCodec::seal_from_now`] / [`FrameCodec::open_from_now`] switch a
/// direction to sealed frames.
pub struct FrameCodec<In, Out> {
    sealer: Option<FrameSealer>,
    opener: Option<FrameOpener>,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec with both directions plain.
    pub fn new() -> Self {
        FrameCodec {
            sealer: None,
            opener: None,
            _types: PhantomData,
        }
    }

    /// Every frame encoded from now on is sealed with `key`, from sequence number 0.
    pub fn seal_from_now(&mut self, key: &FrameKey) {
        self.sealer = Some(FrameSealer::new(key));
    }

    /// Every frame decoded from now on must be sealed with `key`, from sequence number 0.
    pub fn open_from_now(&mut self, key: &FrameKey) {
        self.opener = Some(FrameOpener::new(key));
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
        match decode_frame_with(src, self.opener.as_mut())? {
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
                need: match decode_frame_with::<In>(src, self.opener.as_mut())? {
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
        encode_frame_with(&item, self.sealer.as_mut(), &mut out)?;
        dst.extend_from_slice(&out);
        Ok(())
    }
}
