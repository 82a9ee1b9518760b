//! `TunnelEnded`'s optional trailing session manifest: absent, the frame is byte for
//! byte what it was before the part existed; present, it round-trips; an empty part is
//! refused (one encoding per frame).

use bytes::{BufMut, Bytes, BytesMut};
use tether_proto::{decode_frame, encode_frame, Frame, TunnelCloseReason, TunnelEnded};

const LIMIT: usize = tether_proto::DEFAULT_MAX_FRAME_LEN;

fn encode(e: TunnelEnded) -> BytesMut {
    let mut b = BytesMut::new();
    encode_frame(&Frame::TunnelEnded(e), &mut b, LIMIT).unwrap();
    b
}

#[test]
fn without_a_manifest_the_frame_is_what_it_always_was() {
    let wire = encode(TunnelEnded {
        reason: TunnelCloseReason::Expired,
        message: "bye".into(),
        ..Default::default()
    });
    // len, type 0x23, reason, code "", message "bye".
    let mut expected = BytesMut::new();
    let body = [
        &[0x23u8, 1][..],
        &0u16.to_be_bytes(),
        &3u16.to_be_bytes(),
        b"bye",
    ]
    .concat();
    expected.put_u32(body.len() as u32);
    expected.put_slice(&body);
    assert_eq!(wire, expected);
}

#[test]
fn a_manifest_round_trips_and_an_empty_part_is_refused() {
    let ended = TunnelEnded {
        reason: TunnelCloseReason::Closed,
        manifest: Bytes::from_static(b"{\"type\":\"tether.session-manifest.v1\"}"),
        manifest_sig: Bytes::from_static(b"-----BEGIN SSH SIGNATURE-----"),
        ..Default::default()
    };
    let mut wire = encode(ended.clone());
    assert_eq!(
        decode_frame(&mut wire, LIMIT).unwrap(),
        Some(Frame::TunnelEnded(ended))
    );
    // A trailing part with an empty manifest: not a second encoding of "none".
    let mut body = BytesMut::from(&[0x23u8, 9, 0, 0, 0, 0][..]);
    body.put_u32(0);
    body.put_u32(0);
    let mut wire = BytesMut::new();
    wire.put_u32(body.len() as u32);
    wire.put_slice(&body);
    assert!(decode_frame(&mut wire, LIMIT).is_err());
    // A manifest without its signature, or a signature alone, is not encoded.
    for (manifest, sig) in [(&b"{}"[..], &b""[..]), (b"", b"sig")] {
        let mut b = BytesMut::new();
        let e = TunnelEnded {
            manifest: Bytes::copy_from_slice(manifest),
            manifest_sig: Bytes::copy_from_slice(sig),
            ..Default::default()
        };
        assert!(encode_frame(&Frame::TunnelEnded(e), &mut b, LIMIT).is_err());
    }
}
