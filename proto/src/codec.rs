//! The codec: primitive encodings, the [`Codec`] trait, and length-prefixed framing.
//!
//! A frame on a stream is `len: u32 (big-endian) | type: u8 | body`, where `len` counts the
//! type byte and the body. `len` is checked against the configured maximum *before* any
//! byte of the body is buffered, so a peer can never make us allocate more than the limit.
//!
//! Decoding is total: on any input the decoder returns a frame, "need more bytes"
//! (`Ok(None)`, cheap and not an error), or a [`DecodeError`] naming what was wrong. It
//! never panics and never indexes without a length check.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::frame::Frame;

/// Default hard maximum of one frame (type byte plus body), in bytes: 64 KiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;

/// The smallest frame limit an endpoint may configure: 1 KiB. Below it the largest
/// fixed-size frames and a useful command request would not fit.
pub const MIN_MAX_FRAME_LEN: usize = 1024;

/// Bytes of the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Why bytes could not be decoded. The peer that sent them broke the protocol; retrying the
/// same bytes cannot help.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix announces a frame larger than the configured maximum.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A frame with length zero (no type byte).
    #[error("empty frame")]
    EmptyFrame,
    /// The type byte names no known frame.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    /// The body ended before the field was complete.
    #[error("frame body truncated while reading {0}")]
    Truncated(&'static str),
    /// Bytes were left over after the last field of the frame.
    #[error("{0} unexpected trailing bytes after the frame body")]
    TrailingBytes(usize),
    /// A text field is not valid UTF-8.
    #[error("field {0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// An enumerated field holds a value this version does not define.
    #[error("field {field} has invalid value {value}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A field or list is longer than the protocol allows.
    #[error("field {field} has {len} items or bytes, more than the maximum of {max}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// The length found.
        len: usize,
        /// The maximum.
        max: usize,
    },
}

/// Why a frame could not be encoded. This is a local bug or a caller passing too much data
/// (for example a command output chunk larger than the frame limit).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A field is below the smallest value the protocol allows.
    #[error("field {field} is {len}, less than the minimum of {min}")]
    TooShort {
        /// The field.
        field: &'static str,
        /// The value found.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// The encoded frame would exceed the frame limit.
    #[error("encoded frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Encoded length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A field or list is longer than the protocol allows.
    #[error("field {field} has {len} items or bytes, more than the maximum of {max}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// The length found.
        len: usize,
        /// The maximum.
        max: usize,
    },
}

/// A value with a wire encoding. `decode` reads from a complete frame body: running out of
/// bytes there is an error ([`DecodeError::Truncated`]), not "need more".
pub trait Codec: Sized {
    /// Decode one value from the front of `buf`.
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError>;
    /// Append the encoding of `self` to `buf`. Callers validate lengths first with
    /// [`Codec::check`]; `encode` itself never fails.
    fn encode<B: BufMut>(&self, buf: &mut B);
    /// Check the protocol's length limits before encoding.
    fn check(&self) -> Result<(), EncodeError> {
        Ok(())
    }
}

macro_rules! int_codec {
    ($t:ty, $get:ident, $put:ident) => {
        impl Codec for $t {
            fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
                if buf.remaining() < std::mem::size_of::<$t>() {
                    return Err(DecodeError::Truncated(stringify!($t)));
                }
                Ok(buf.$get())
            }
            fn encode<B: BufMut>(&self, buf: &mut B) {
                buf.$put(*self);
            }
        }
    };
}

int_codec!(u8, get_u8, put_u8);
int_codec!(u16, get_u16, put_u16);
int_codec!(u32, get_u32, put_u32);
int_codec!(u64, get_u64, put_u64);
int_codec!(i32, get_i32, put_i32);
int_codec!(i64, get_i64, put_i64);

/// Read a fixed-size integer, naming the field on truncation.
pub(crate) fn get<T: Codec, B: Buf>(buf: &mut B, field: &'static str) -> Result<T, DecodeError> {
    T::decode(buf).map_err(|e| match e {
        DecodeError::Truncated(_) => DecodeError::Truncated(field),
        other => other,
    })
}

/// Read a `u16`-length-prefixed UTF-8 string of at most `max` bytes.
pub(crate) fn get_str<B: Buf>(
    buf: &mut B,
    field: &'static str,
    max: usize,
) -> Result<String, DecodeError> {
    let len = usize::from(get::<u16, _>(buf, field)?);
    if len > max {
        return Err(DecodeError::TooLong { field, len, max });
    }
    if buf.remaining() < len {
        return Err(DecodeError::Truncated(field));
    }
    let mut bytes = vec![0; len];
    buf.copy_to_slice(&mut bytes);
    String::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8(field))
}

/// Write a `u16`-length-prefixed string. Lengths were checked by [`check_str`].
pub(crate) fn put_str<B: BufMut>(buf: &mut B, s: &str) {
    // `check_str` bounds every string far below u16::MAX; saturate rather than wrap.
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    buf.put_u16(len);
    buf.put_slice(&s.as_bytes()[..usize::from(len)]);
}

pub(crate) fn check_str(s: &str, field: &'static str, max: usize) -> Result<(), EncodeError> {
    if s.len() > max {
        return Err(EncodeError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

/// Read a `u32`-length-prefixed byte string (zero-copy when `buf` is `Bytes`).
pub(crate) fn get_bytes<B: Buf>(buf: &mut B, field: &'static str) -> Result<Bytes, DecodeError> {
    let len = get::<u32, _>(buf, field)?;
    let len = usize::try_from(len).map_err(|_| DecodeError::Truncated(field))?;
    if buf.remaining() < len {
        return Err(DecodeError::Truncated(field));
    }
    Ok(buf.copy_to_bytes(len))
}

/// Read a `u16` item count of at most `max`. Each item takes at least one byte, so a count
/// larger than the remaining bytes is refused before any allocation.
pub(crate) fn get_count<B: Buf>(
    buf: &mut B,
    field: &'static str,
    max: usize,
) -> Result<usize, DecodeError> {
    let n = usize::from(get::<u16, _>(buf, field)?);
    if n > max {
        return Err(DecodeError::TooLong { field, len: n, max });
    }
    if n > buf.remaining() {
        return Err(DecodeError::Truncated(field));
    }
    Ok(n)
}

pub(crate) fn check_count(n: usize, field: &'static str, max: usize) -> Result<(), EncodeError> {
    if n > max {
        return Err(EncodeError::TooLong { field, len: n, max });
    }
    Ok(())
}

/// Encode `frame` with its length prefix onto `buf`, refusing frames over `max_frame_len`.
pub fn encode_frame(
    frame: &Frame,
    buf: &mut BytesMut,
    max_frame_len: usize,
) -> Result<(), EncodeError> {
    frame.check()?;
    let start = buf.len();
    buf.put_u32(0);
    frame.encode(buf);
    let len = buf.len() - start - FRAME_HEADER_LEN;
    if len > max_frame_len {
        buf.truncate(start);
        return Err(EncodeError::FrameTooLarge {
            len,
            max: max_frame_len,
        });
    }
    // `len <= max_frame_len`, which callers keep within u32; saturate defensively.
    let prefix = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    buf[start..start + FRAME_HEADER_LEN].copy_from_slice(&prefix);
    Ok(())
}

/// Decode one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (nothing is consumed), and
/// fails as soon as the length prefix exceeds `max_frame_len`, before the body arrives.
pub fn decode_frame(
    buf: &mut BytesMut,
    max_frame_len: usize,
) -> Result<Option<Frame>, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let mut prefix = [0u8; FRAME_HEADER_LEN];
    prefix.copy_from_slice(&buf[..FRAME_HEADER_LEN]);
    let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    if len > max_frame_len {
        return Err(DecodeError::FrameTooLarge {
            len,
            max: max_frame_len,
        });
    }
    if len == 0 {
        return Err(DecodeError::EmptyFrame);
    }
    if buf.len() - FRAME_HEADER_LEN < len {
        // Reserve what the rest of this frame needs (bounded by the limit) so a stream of
        // small chunks does not reallocate repeatedly.
        buf.reserve(FRAME_HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(FRAME_HEADER_LEN);
    let mut body = buf.split_to(len).freeze();
    let frame = Frame::decode(&mut body)?;
    if body.has_remaining() {
        return Err(DecodeError::TrailingBytes(body.remaining()));
    }
    Ok(Some(frame))
}

/// Reassembles frames from the chunks of one stream.
///
/// Feed it with [`FrameDecoder::push`] and drain it with [`FrameDecoder::poll_frame`]. The
/// buffer never holds more than one maximum-size frame plus the chunk being pushed, and a
/// frame announced over the limit is refused as soon as its length prefix is seen.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame_len: usize,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder enforcing `max_frame_len` (clamped to at least [`MIN_MAX_FRAME_LEN`]).
    pub fn new(max_frame_len: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_frame_len: max_frame_len.max(MIN_MAX_FRAME_LEN),
            failed: false,
        }
    }

    /// The limit this decoder enforces.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Append bytes received from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(data);
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error the
    /// decoder stays failed: the stream is broken and must be closed.
    #[must_use = "a decoded frame or error must be handled"]
    pub fn poll_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if self.failed {
            return Ok(None);
        }
        match decode_frame(&mut self.buf, self.max_frame_len) {
            Ok(frame) => Ok(frame),
            Err(e) => {
                self.failed = true;
                self.buf = BytesMut::new();
                Err(e)
            }
        }
    }

    /// Whether the stream ended cleanly: no partial frame is buffered.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty()
    }

    /// Free the buffer if it holds no partial frame, so that a long-lived stream that is
    /// mostly idle (a session between heartbeats) keeps no allocation between frames. A
    /// partial frame is kept.
    pub fn release_idle(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Heartbeat, TrustState};

    #[test]
    fn release_idle_frees_only_an_empty_buffer() {
        let mut wire = BytesMut::new();
        encode_frame(&hb(), &mut wire, DEFAULT_MAX_FRAME_LEN).unwrap();
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        d.push(&wire[..3]);
        d.release_idle();
        assert_eq!(d.buffered(), 3, "a partial frame is kept");
        d.push(&wire[3..]);
        assert_eq!(d.poll_frame().unwrap(), Some(hb()));
        // What a read of a larger chunk leaves: spare room after the last frame.
        d.buf.reserve(1024);
        d.release_idle();
        assert_eq!(d.buf.capacity(), 0, "nothing kept between frames");
    }

    fn hb() -> Frame {
        Frame::Heartbeat(Heartbeat {
            seq: 7,
            trust_state: TrustState::Trusted,
            cert_not_after_ms: 1_700_000_000_000,
        })
    }

    #[test]
    fn oversized_prefix_is_refused_before_body() {
        let mut buf = BytesMut::from(&[0x00, 0x01, 0x00, 0x01][..]);
        assert_eq!(
            decode_frame(&mut buf, 65536),
            Err(DecodeError::FrameTooLarge {
                len: 65537,
                max: 65536
            })
        );
        // Nothing beyond the prefix was reserved.
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn partial_frames_need_more() {
        let mut full = BytesMut::new();
        encode_frame(&hb(), &mut full, DEFAULT_MAX_FRAME_LEN).unwrap();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        for b in full.iter().take(full.len() - 1) {
            dec.push(&[*b]);
            assert_eq!(dec.poll_frame(), Ok(None));
        }
        dec.push(&full[full.len() - 1..]);
        assert_eq!(dec.poll_frame(), Ok(Some(hb())));
        assert!(dec.is_idle());
    }

    #[test]
    fn unknown_type_and_trailing_bytes() {
        let mut buf = BytesMut::from(&[0, 0, 0, 1, 0xee][..]);
        assert_eq!(
            decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN),
            Err(DecodeError::UnknownFrameType(0xee))
        );
        let mut full = BytesMut::new();
        encode_frame(&hb(), &mut full, DEFAULT_MAX_FRAME_LEN).unwrap();
        full[3] += 1;
        full.put_u8(0);
        assert_eq!(
            decode_frame(&mut full, DEFAULT_MAX_FRAME_LEN),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn empty_frame_is_an_error() {
        let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
        assert_eq!(
            decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN),
            Err(DecodeError::EmptyFrame)
        );
    }
}
