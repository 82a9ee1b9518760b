//! `FrameDecoder` on arbitrary bytes fed in chunks: it never panics, never buffers more
//! than one frame plus the chunk just pushed, and every frame it yields re-encodes to the
//! exact bytes it was decoded from and decodes back equal.
//!
//! Input layout: the first byte selects the chunk size, `1 + (byte & 0x7f)` (1..=128
//! bytes), and the frame limit (high bit set: `MIN_MAX_FRAME_LEN`, 1 KiB; clear:
//! `DEFAULT_MAX_FRAME_LEN`, 64 KiB). The rest is the stream. Seeds: `corpus/frame_decoder/`,
//! written by `TETHER_WRITE_FUZZ_SEEDS=1 cargo test -p tether-proto --test roundtrip`.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tether_proto::{
    decode_frame, encode_frame, FrameDecoder, DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN,
    MIN_MAX_FRAME_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let chunk_len = 1 + usize::from(selector & 0x7f);
    let max = if selector & 0x80 != 0 {
        MIN_MAX_FRAME_LEN
    } else {
        DEFAULT_MAX_FRAME_LEN
    };

    let mut decoder = FrameDecoder::new(max);
    // Start of the next undecoded frame in `stream`.
    let mut offset = 0;
    for chunk in stream.chunks(chunk_len) {
        decoder.push(chunk);
        assert!(decoder.buffered() <= max + FRAME_HEADER_LEN + chunk.len());
        loop {
            match decoder.poll_frame() {
                Ok(Some(frame)) => {
                    let mut encoded = BytesMut::new();
                    encode_frame(&frame, &mut encoded, max)
                        .expect("a decoded frame re-encodes within the limit");
                    assert_eq!(
                        stream.get(offset..offset + encoded.len()),
                        Some(&encoded[..]),
                        "re-encoding differs from the decoded bytes"
                    );
                    offset += encoded.len();
                    assert_eq!(decode_frame(&mut encoded, max), Ok(Some(frame)));
                    assert!(encoded.is_empty());
                }
                Ok(None) => break,
                Err(_) => {
                    // A failed decoder stays failed and holds nothing.
                    assert_eq!(decoder.buffered(), 0);
                    assert_eq!(decoder.poll_frame(), Ok(None));
                    return;
                }
            }
        }
        assert!(decoder.buffered() < max + FRAME_HEADER_LEN);
    }
});
