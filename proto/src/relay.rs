//! The tunnel relay (docs/PROTOCOL.md §12.5): how one break-glass tunnel connection
//! travels between the operator's `tether tunnel open`, control and the broker that holds
//! the appliance, over HTTPS connections upgraded to [`UPGRADE`].
//!
//! ```text
//! operator CLI ──TLS──▶ control ◀──TLS── broker ──QUIC stream──▶ agent ──TCP──▶ target
//!   GET /v1/tunnels/{id}/connect      GET /v1/brokers/tunnels/{conn}
//! ```
//!
//! The operator's CLI upgrades `GET /v1/tunnels/{id}/connect`; control tells the broker
//! over the cluster channel (`tunnel_connect` with a fresh `conn` token) to dial it back
//! at `GET /v1/brokers/tunnels/{conn}` with its broker certificate, and then copies bytes
//! between the two upgraded connections without reading them. The broker opens the
//! connection stream to the agent ([`crate::TunnelConnect`]) and translates between that
//! QUIC stream and the chunks below, so the operator learns why every connection ended,
//! which raw TCP could not say.
//!
//! Each chunk is a type byte, a `u32` big-endian length and that many bytes:
//!
//! | type | chunk | body | direction |
//! |---|---|---|---|
//! | 1 | [`Chunk::Connected`] | empty | broker → operator, first |
//! | 2 | [`Chunk::Data`] | 1..=[`MAX_DATA`] bytes | both |
//! | 3 | [`Chunk::Fin`] | empty: the sender will send no more data (half-close) | both |
//! | 4 | [`Chunk::Ended`] | reason (`u8`, a [`TunnelCloseReason`]), then a UTF-8 message | broker → operator, last |
//!
//! An operator that closes its connection without [`Chunk::Fin`] aborts the connection
//! (the broker resets the stream with `closed`).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec::DecodeError;
use crate::frame::MAX_MESSAGE_LEN;
use crate::tunnel::TunnelCloseReason;

/// The `Upgrade` token of a relayed tunnel connection.
pub const UPGRADE: &str = "tether-tunnel/1";
/// Largest data chunk.
pub const MAX_DATA: usize = 16 * 1024;
/// Bytes before a chunk's body: type and length.
pub const HEADER_LEN: usize = 5;

/// One chunk of a relayed tunnel connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// The agent connected to the target: data may flow.
    Connected,
    /// Bytes of the connection.
    Data(Bytes),
    /// No more data from this side.
    Fin,
    /// The connection ended: why, as the agent (or the broker) said it.
    Ended {
        /// The reason.
        reason: TunnelCloseReason,
        /// Detail for the operator.
        message: String,
    },
}

impl Chunk {
    /// Append the chunk's encoding to `buf`. Data longer than [`MAX_DATA`] and messages
    /// longer than the protocol's limit are cut (callers send at most `MAX_DATA` at once).
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            Chunk::Connected => {
                buf.put_u8(1);
                buf.put_u32(0);
            }
            Chunk::Data(d) => {
                let d = &d[..d.len().min(MAX_DATA)];
                buf.put_u8(2);
                buf.put_u32(d.len() as u32);
                buf.put_slice(d);
            }
            Chunk::Fin => {
                buf.put_u8(3);
                buf.put_u32(0);
            }
            Chunk::Ended { reason, message } => {
                let mut m = message.as_str();
                while m.len() > MAX_MESSAGE_LEN {
                    let mut cut = MAX_MESSAGE_LEN;
                    while !m.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    m = &m[..cut];
                }
                buf.put_u8(4);
                buf.put_u32(1 + m.len() as u32);
                buf.put_u8(*reason as u8);
                buf.put_slice(m.as_bytes());
            }
        }
    }

    /// Take one whole chunk off the front of `buf`; `Ok(None)` when more bytes are needed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Chunk>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        let max = match kind {
            1 | 3 => 0,
            2 => MAX_DATA,
            4 => 1 + MAX_MESSAGE_LEN,
            other => return Err(DecodeError::UnknownFrameType(other)),
        };
        if len > max {
            return Err(DecodeError::FrameTooLarge { len, max });
        }
        if buf.len() < HEADER_LEN + len {
            buf.reserve(HEADER_LEN + len - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let mut body = buf.split_to(len).freeze();
        Ok(Some(match kind {
            1 => Chunk::Connected,
            3 => Chunk::Fin,
            2 if len == 0 => {
                return Err(DecodeError::InvalidValue {
                    field: "data",
                    value: 0,
                })
            }
            2 => Chunk::Data(body),
            _ => {
                if body.is_empty() {
                    return Err(DecodeError::Truncated("reason"));
                }
                let code = body.get_u8();
                let reason = TunnelCloseReason::from_code(u64::from(code)).ok_or(
                    DecodeError::InvalidValue {
                        field: "reason",
                        value: u64::from(code),
                    },
                )?;
                let message = std::str::from_utf8(&body)
                    .map_err(|_| DecodeError::InvalidUtf8("message"))?
                    .to_owned();
                Chunk::Ended { reason, message }
            }
        }))
    }
}

/// [`Chunk`]s as a tokio codec (feature `codec`): `FramedRead`/`FramedWrite` over the
/// upgraded connection.
#[cfg(feature = "codec")]
#[derive(Clone, Copy, Debug, Default)]
pub struct ChunkCodec;

#[cfg(feature = "codec")]
impl tokio_util::codec::Decoder for ChunkCodec {
    type Item = Chunk;
    type Error = std::io::Error;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Chunk>, std::io::Error> {
        Chunk::decode(src).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

#[cfg(feature = "codec")]
impl tokio_util::codec::Encoder<Chunk> for ChunkCodec {
    type Error = std::io::Error;
    fn encode(&mut self, chunk: Chunk, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        chunk.encode(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(c: Chunk) {
        let mut buf = BytesMut::new();
        c.encode(&mut buf);
        // Byte by byte: never a chunk before its last byte.
        let all = buf.clone();
        let mut partial = BytesMut::new();
        for (i, b) in all.iter().enumerate() {
            partial.put_u8(*b);
            let got = Chunk::decode(&mut partial).unwrap();
            if i + 1 < all.len() {
                assert_eq!(got, None);
            } else {
                assert_eq!(got, Some(c.clone()));
            }
        }
        assert!(partial.is_empty());
    }

    #[test]
    fn every_chunk_round_trips() {
        round_trip(Chunk::Connected);
        round_trip(Chunk::Fin);
        round_trip(Chunk::Data(Bytes::from_static(b"hello")));
        round_trip(Chunk::Ended {
            reason: TunnelCloseReason::Expired,
            message: "the session reached its end".into(),
        });
    }

    #[test]
    fn bad_chunks_are_refused() {
        for bad in [
            &[9u8, 0, 0, 0, 0][..],
            &[2, 0, 0, 0, 0],
            &[1, 0, 0, 0, 1, 0],
            &[2, 0, 1, 0, 1],
            &[4, 0, 0, 0, 1, 99],
            &[4, 0, 0, 0, 0],
            &[4, 0, 0, 0, 3, 1, 0xff, 0xfe],
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(Chunk::decode(&mut buf).is_err(), "{bad:?}");
        }
    }
}
