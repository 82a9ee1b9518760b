//! Property tests of the codec: every frame round-trips, the stream decoder is total and
//! bounded on arbitrary input, a frame split anywhere decodes the same, truncated or padded
//! bodies are refused, and the frame limit holds on both sides.
//!
//! Strategies respect the `MAX_*` limits of `tether_proto::frame`; the exact boundaries
//! (limit accepted, limit + 1 refused) are checked by plain tests at the end.
//!
//! Setting `TETHER_WRITE_FUZZ_SEEDS=1` makes `write_fuzz_seeds` (re)write the seed corpus of
//! the `frame_decoder` fuzz target in `fuzz/corpus/frame_decoder/`.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use tether_proto::frame::{
    MAX_AGENT_VERSION_LEN, MAX_ARGV, MAX_ARG_LEN, MAX_CAPABILITIES, MAX_CAPABILITY_LEN, MAX_ENV,
    MAX_ENV_NAME_LEN, MAX_MESSAGE_LEN, MAX_STATUS_ENTRIES, MAX_STATUS_KEY_LEN,
    MAX_STATUS_VALUE_LEN,
};
use tether_proto::{
    decode_frame, encode_frame, Codec, CommandKind, CommandOutcome, CommandOutput, CommandRequest,
    CommandResult, DecodeError, EncodeError, FailureReason, Frame, FrameDecoder, GoAway,
    GoAwayReason, Heartbeat, HeartbeatAck, Hello, OutputStream, Status, TrustState, Welcome,
    DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN, MIN_MAX_FRAME_LEN,
};

/// Bytes of a `CommandOutput` frame besides its data: type (1), command id (8), stream (1)
/// and the data's length prefix (4).
const OUTPUT_OVERHEAD: usize = 1 + 8 + 1 + 4;
/// The most output data one frame can carry at the default limit.
const MAX_OUTPUT_DATA: usize = DEFAULT_MAX_FRAME_LEN - OUTPUT_OVERHEAD;
/// A limit far above every field limit, to test field limits independently of the frame's.
const HUGE_LIMIT: usize = 16 * 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// UTF-8 text of at most `max_bytes` bytes, mostly printable ASCII with some arbitrary
/// (multi-byte) characters.
fn text(max_bytes: usize) -> impl Strategy<Value = String> {
    let ch = prop_oneof![6 => proptest::char::range(' ', '~'), 1 => any::<char>()];
    vec(ch, 0..=max_bytes).prop_map(move |chars| {
        let mut s = String::with_capacity(max_bytes);
        for c in chars {
            if s.len() + c.len_utf8() > max_bytes {
                break;
            }
            s.push(c);
        }
        s
    })
}

/// A list of at most `max_count` strings of at most `max_len` bytes: either a few strings
/// of any length, or up to the maximum count of short ones (both extremes at once would
/// not fit in one frame for some fields, and would make every case slow).
fn text_list(max_count: usize, max_len: usize) -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        vec(text(max_len), 0..=max_count.min(4)),
        vec(text(max_len.min(8)), 0..=max_count),
    ]
}

/// Deterministic filler bytes (splitmix64), so large blobs cost nothing to generate.
fn filler(len: usize, seed: u64) -> Bytes {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// Output data of at most `max` bytes: usually small and arbitrary, sometimes large.
/// A [`blob`] of at least one byte.
fn nonempty_blob(max: usize) -> impl Strategy<Value = Bytes> {
    blob(max).prop_map(|b| {
        if b.is_empty() {
            Bytes::from_static(b"x")
        } else {
            b
        }
    })
}

fn blob(max: usize) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..=64.min(max)).prop_map(Bytes::from),
        1 => (0..=max, any::<u64>()).prop_map(|(len, seed)| filler(len, seed)),
    ]
}

fn one_of<T: Clone + std::fmt::Debug + 'static>(all: &'static [T]) -> impl Strategy<Value = T> {
    select(Cow::Borrowed(all))
}

prop_compose! {
    fn hello()(
        protocol_version in any::<u16>(),
        agent_version in text(MAX_AGENT_VERSION_LEN),
        capabilities in text_list(MAX_CAPABILITIES, MAX_CAPABILITY_LEN),
        cert_not_after_ms in any::<i64>(),
    ) -> Hello {
        Hello { protocol_version, agent_version, capabilities, cert_not_after_ms }
    }
}

prop_compose! {
    fn welcome()(
        protocol_version in any::<u16>(),
        session_id in any::<u64>(),
        heartbeat_interval_ms in any::<u32>(),
        server_time_ms in any::<i64>(),
        manual_renewal_generation in any::<u64>(),
        max_frame_len in proptest::option::of(MIN_MAX_FRAME_LEN as u32..=u32::MAX),
        capabilities in proptest::collection::vec("[a-z0-9/._-]{1,16}", 0..4),
    ) -> Welcome {
        // The broker's list can only follow `max_frame_len`.
        let capabilities = if max_frame_len.is_some() { capabilities } else { Vec::new() };
        Welcome {
            protocol_version,
            session_id,
            heartbeat_interval_ms,
            server_time_ms,
            manual_renewal_generation,
            max_frame_len,
            capabilities,
        }
    }
}

prop_compose! {
    fn heartbeat()(
        seq in any::<u64>(),
        trust_state in one_of(TrustState::ALL),
        cert_not_after_ms in any::<i64>(),
    ) -> Heartbeat {
        Heartbeat { seq, trust_state, cert_not_after_ms }
    }
}

prop_compose! {
    fn heartbeat_ack()(
        seq in any::<u64>(),
        server_time_ms in any::<i64>(),
        manual_renewal_generation in any::<u64>(),
    ) -> HeartbeatAck {
        HeartbeatAck { seq, server_time_ms, manual_renewal_generation }
    }
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        vec(
            (text(MAX_STATUS_KEY_LEN), text(MAX_STATUS_VALUE_LEN)),
            0..=4
        ),
        vec((text(8), text(16)), 0..=MAX_STATUS_ENTRIES),
    ]
    .prop_map(|entries| Status { entries })
}

prop_compose! {
    fn go_away()(
        reason in one_of(GoAwayReason::ALL),
        reconnect_after_ms in any::<u32>(),
        message in text(MAX_MESSAGE_LEN),
    ) -> GoAway {
        GoAway { reason, reconnect_after_ms, message }
    }
}

prop_compose! {
    fn command_request()(
        command_id in any::<u64>(),
        kind in one_of(CommandKind::ALL),
        argv in text_list(MAX_ARGV, MAX_ARG_LEN),
        env_allowlist in text_list(MAX_ENV, MAX_ENV_NAME_LEN),
        deadline_ms in any::<u32>(),
        signed in proptest::option::of(signed_ops()),
    ) -> CommandRequest {
        CommandRequest { command_id, kind, argv, env_allowlist, deadline_ms, signed }
    }
}

prop_compose! {
    fn signed_ops()(
        request_id in text(tether_proto::frame::MAX_REQUEST_ID_LEN),
        reason in text(MAX_MESSAGE_LEN),
        approval in blob(2048),
        approval_sig in blob(512),
        plan_only in any::<bool>(),
    ) -> tether_proto::SignedOps {
        tether_proto::SignedOps { request_id, reason, approval, approval_sig, plan_only }
    }
}

prop_compose! {
    fn command_manifest()(command_id in any::<u64>(), manifest in blob(4096), sig in blob(512)) -> tether_proto::CommandManifest {
        tether_proto::CommandManifest { command_id, manifest, sig }
    }
}

prop_compose! {
    fn command_plan()(command_id in any::<u64>(), approval_required in any::<bool>(), document in blob(2048)) -> tether_proto::CommandPlan {
        tether_proto::CommandPlan { command_id, approval_required, document }
    }
}

prop_compose! {
    fn command_output()(
        command_id in any::<u64>(),
        stream in one_of(OutputStream::ALL),
        data in blob(MAX_OUTPUT_DATA),
    ) -> CommandOutput {
        CommandOutput { command_id, stream, data }
    }
}

fn command_outcome() -> impl Strategy<Value = CommandOutcome> {
    prop_oneof![
        any::<i32>().prop_map(CommandOutcome::Exited),
        (one_of(FailureReason::ALL), text(MAX_MESSAGE_LEN))
            .prop_map(|(reason, message)| CommandOutcome::Failed { reason, message }),
    ]
}

prop_compose! {
    fn command_result()(command_id in any::<u64>(), outcome in command_outcome()) -> CommandResult {
        CommandResult { command_id, outcome }
    }
}

/// Any frame, every variant equally likely.
fn any_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        hello().prop_map(Frame::Hello),
        welcome().prop_map(Frame::Welcome),
        heartbeat().prop_map(Frame::Heartbeat),
        heartbeat_ack().prop_map(Frame::HeartbeatAck),
        status().prop_map(Frame::Status),
        go_away().prop_map(Frame::GoAway),
        command_request().prop_map(Frame::CommandRequest),
        command_output().prop_map(Frame::CommandOutput),
        command_result().prop_map(Frame::CommandResult),
        command_manifest().prop_map(Frame::CommandManifest),
        command_plan().prop_map(Frame::CommandPlan),
        manifest_backlog().prop_map(Frame::ManifestBacklog),
        tunnel_open().prop_map(Frame::TunnelOpen),
        (any::<u64>(), any::<i64>(), blob(512)).prop_map(
            |(session_id, expires_at_ms, sealed_credential)| {
                Frame::TunnelReady(tether_proto::TunnelReady {
                    session_id,
                    expires_at_ms,
                    sealed_credential,
                })
            }
        ),
        blob(2048).prop_map(|document| Frame::TunnelPlan(tether_proto::TunnelPlan { document })),
        (
            proptest::sample::select(tether_proto::TunnelCloseReason::ALL.to_vec()),
            "[a-z_]{0,20}",
            ".{0,40}",
            proptest::option::of((nonempty_blob(512), nonempty_blob(128)))
        )
            .prop_map(|(reason, code, message, signed)| {
                let (manifest, manifest_sig) = signed.unwrap_or_default();
                Frame::TunnelEnded(tether_proto::TunnelEnded {
                    reason,
                    code,
                    message,
                    manifest,
                    manifest_sig,
                })
            }),
        any::<u64>().prop_map(
            |session_id| Frame::TunnelConnect(tether_proto::TunnelConnect { session_id })
        ),
        any::<u64>().prop_map(
            |session_id| Frame::TunnelConnected(tether_proto::TunnelConnected { session_id })
        ),
        any::<u64>()
            .prop_map(|session_id| Frame::TunnelClose(tether_proto::TunnelClose { session_id })),
        any::<u64>().prop_map(|seq| Frame::ManifestAck(tether_proto::ManifestAck { seq })),
    ]
}

prop_compose! {
    fn tunnel_open()(
        request_id in "[a-z0-9-]{0,20}",
        reason in ".{0,40}",
        resource in "[a-z0-9_-]{0,20}",
        privilege in "[a-z0-9_-]{0,20}",
        duration_s in any::<u32>(),
        max_connections in any::<u16>(),
        idle_timeout_s in any::<u32>(),
        recipient in "[a-z0-9]{0,40}",
        approval in blob(1024),
        approval_sig in blob(256),
        plan_only in any::<bool>(),
    ) -> tether_proto::TunnelOpen {
        tether_proto::TunnelOpen { request_id, reason, resource, privilege, duration_s, max_connections, idle_timeout_s, recipient, approval, approval_sig, plan_only }
    }
}

prop_compose! {
    fn manifest_backlog()(seq in any::<u64>(), command_id in any::<u64>(), manifest in blob(4096), sig in blob(512)) -> tether_proto::ManifestBacklog {
        tether_proto::ManifestBacklog { seq, manifest: tether_proto::CommandManifest { command_id, manifest, sig } }
    }
}

/// A few valid frames encoded back to back, then up to four bytes XOR-ed with noise: input
/// that gets past the length prefix and deep into the body decoders.
fn mutated_stream() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(any_frame(), 1..=4),
        vec((any::<Index>(), 1..=u8::MAX), 0..=4),
    )
        .prop_map(|(frames, flips)| {
            let mut bytes = encode_all(&frames).to_vec();
            for (at, noise) in flips {
                let at = at.index(bytes.len());
                bytes[at] ^= noise;
            }
            bytes
        })
}

/// Input for the decoder: the brief's arbitrary bytes, or a mutated valid stream.
fn decoder_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 0..4096), mutated_stream()]
}

/// Chunk sizes, cycled over the input: mostly tiny, sometimes large.
fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    vec(prop_oneof![3 => 1..=16usize, 1 => 1..=8192usize], 1..=32)
}

fn frame_limit() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(MIN_MAX_FRAME_LEN),
        Just(DEFAULT_MAX_FRAME_LEN),
        MIN_MAX_FRAME_LEN..=DEFAULT_MAX_FRAME_LEN,
    ]
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn encode(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf, HUGE_LIMIT).expect("strategy frames are within field limits");
    buf
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut buf = BytesMut::new();
    for f in frames {
        encode_frame(f, &mut buf, HUGE_LIMIT).expect("strategy frames are within field limits");
    }
    buf
}

/// `body` (type byte and fields) behind a length prefix that matches it.
fn reframe(body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(FRAME_HEADER_LEN + body.len());
    buf.put_u32(u32::try_from(body.len()).expect("test bodies are small"));
    buf.put_slice(body);
    buf
}

/// What a stream decodes to: its frames, then the error that ended it, if any.
type Decoded = (Vec<Frame>, Option<DecodeError>);

/// Decode `bytes` held in one buffer with [`decode_frame`].
fn decode_at_once(bytes: &[u8], max: usize) -> Decoded {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    loop {
        match decode_frame(&mut buf, max) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

/// Feed `bytes` to a [`FrameDecoder`] in chunks of the given sizes (cycled), polling after
/// each push until it needs more, and check the buffering bound at every step.
fn decode_in_chunks(bytes: &[u8], sizes: &[usize], max: usize) -> Result<Decoded, TestCaseError> {
    let mut dec = FrameDecoder::new(max);
    prop_assert_eq!(dec.max_frame_len(), max);
    let mut frames = Vec::new();
    let mut sizes = sizes.iter().copied().cycle();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(1).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        dec.push(chunk);
        prop_assert!(
            dec.buffered() <= max + FRAME_HEADER_LEN + chunk.len(),
            "buffered {} > limit {} + header + chunk {}",
            dec.buffered(),
            max,
            chunk.len()
        );
        loop {
            match dec.poll_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    // Failed for good: nothing kept, nothing more accepted or produced.
                    prop_assert_eq!(dec.buffered(), 0);
                    dec.push(rest);
                    prop_assert_eq!(dec.buffered(), 0);
                    prop_assert_eq!(dec.poll_frame(), Ok(None));
                    return Ok((frames, Some(e)));
                }
            }
        }
        // Needing more bytes means at most one partial frame is held.
        prop_assert!(dec.buffered() < max + FRAME_HEADER_LEN);
    }
    Ok((frames, None))
}

/// The cut points of a truncation test: all of them for bodies up to 4 KiB; for larger
/// ones (big `CommandOutput` data) both ends in full and a stride through the middle.
fn cuts(len: usize) -> Vec<usize> {
    const EXHAUSTIVE: usize = 4096;
    const EDGE: usize = 256;
    if len <= EXHAUSTIVE {
        return (0..len).collect();
    }
    let mut cuts: Vec<usize> = (0..EDGE).chain(len - EDGE..len).collect();
    cuts.extend((EDGE..len - EDGE).step_by(len / EDGE));
    cuts
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    /// `encode_frame` then `decode_frame` gives the same frame back and consumes every byte;
    /// the prefix counts the type byte and body.
    #[test]
    fn every_frame_round_trips(frame in any_frame()) {
        let mut buf = BytesMut::new();
        prop_assert_eq!(encode_frame(&frame, &mut buf, DEFAULT_MAX_FRAME_LEN), Ok(()));
        let prefix = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        prop_assert_eq!(prefix as usize, buf.len() - FRAME_HEADER_LEN);
        prop_assert_eq!(buf[FRAME_HEADER_LEN], frame.frame_type() as u8);
        prop_assert_eq!(decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN), Ok(Some(frame)));
        prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());
    }

    /// Encoding appends: frames written after other bytes leave those bytes alone, and a
    /// stream of frames read back in random chunks gives the same frames in order.
    #[test]
    fn frame_streams_round_trip_in_random_chunks(
        frames in vec(any_frame(), 1..=6),
        sizes in chunk_sizes(),
    ) {
        let bytes = encode_all(&frames);
        let (decoded, err) = decode_in_chunks(&bytes, &sizes, DEFAULT_MAX_FRAME_LEN)?;
        prop_assert_eq!(err, None);
        prop_assert_eq!(decoded, frames);
    }

    /// A frame split at any byte decodes exactly as if it had arrived whole, and nothing is
    /// produced (or consumed by `decode_frame`) before its last byte.
    #[test]
    fn frame_split_at_any_point_decodes_identically(frame in any_frame(), at in any::<Index>()) {
        let bytes = encode(&frame);
        let at = at.index(bytes.len() + 1);
        let (head, tail) = bytes.split_at(at);

        let mut partial = BytesMut::from(head);
        if at < bytes.len() {
            prop_assert_eq!(decode_frame(&mut partial, DEFAULT_MAX_FRAME_LEN), Ok(None));
            prop_assert_eq!(&partial[..], head);
        }

        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        dec.push(head);
        if at < bytes.len() {
            prop_assert_eq!(dec.poll_frame(), Ok(None));
            prop_assert!(!dec.is_idle() || at == 0);
        }
        dec.push(tail);
        prop_assert_eq!(dec.poll_frame(), Ok(Some(frame)));
        prop_assert_eq!(dec.poll_frame(), Ok(None));
        prop_assert!(dec.is_idle());
    }

    /// Arbitrary bytes in random chunks never panic the decoder nor make it buffer more than
    /// one frame plus the chunk, and chunking never changes what is decoded.
    #[test]
    fn arbitrary_bytes_in_chunks_are_total_and_bounded(
        bytes in decoder_input(),
        sizes in chunk_sizes(),
        max in frame_limit(),
    ) {
        let chunked = decode_in_chunks(&bytes, &sizes, max)?;
        prop_assert_eq!(chunked, decode_at_once(&bytes, max));
    }

    /// Every strict prefix of a valid body, behind a corrected length prefix, is refused:
    /// empty is `EmptyFrame`, anything else `Truncated`. Never a frame.
    #[test]
    fn every_truncation_is_refused(frame in any_frame()) {
        let bytes = encode(&frame);
        let body = &bytes[FRAME_HEADER_LEN..];
        for cut in cuts(body.len()) {
            let mut buf = reframe(&body[..cut]);
            let got = decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN);
            if cut == 0 {
                prop_assert_eq!(got, Err(DecodeError::EmptyFrame));
            } else if let (Frame::Welcome(w), 31) = (&frame, cut) {
                // The optional trailing `max_frame_len` cut off whole: a Welcome without it
                // (and so without the broker's list).
                let expected = Frame::Welcome(Welcome {
                    max_frame_len: None,
                    capabilities: Vec::new(),
                    ..w.clone()
                });
                prop_assert_eq!(got, Ok(Some(expected)));
            } else if let (Frame::Welcome(w), 35) = (&frame, cut) {
                // The broker's list cut off whole.
                let expected = Frame::Welcome(Welcome { capabilities: Vec::new(), ..w.clone() });
                prop_assert_eq!(got, Ok(Some(expected)));
            } else if let Frame::CommandRequest(r @ CommandRequest { signed: Some(_), .. }) = &frame {
                // The optional trailing signed-ops extension cut off whole: a request
                // without it; cut anywhere inside it: truncated.
                let base = Frame::CommandRequest(CommandRequest { signed: None, ..r.clone() });
                if cut == encode(&base).len() - FRAME_HEADER_LEN {
                    prop_assert_eq!(got, Ok(Some(base)));
                } else {
                    prop_assert!(matches!(got, Err(DecodeError::Truncated(_))), "cut at {} of {}: {:?}", cut, body.len(), got);
                }
            } else if let Frame::TunnelEnded(e) = &frame {
                // The optional trailing session manifest cut off whole: an end without
                // it; cut anywhere inside it: truncated.
                let base = Frame::TunnelEnded(tether_proto::TunnelEnded {
                    manifest: Bytes::new(),
                    manifest_sig: Bytes::new(),
                    ..e.clone()
                });
                if !e.manifest.is_empty() && cut == encode(&base).len() - FRAME_HEADER_LEN {
                    prop_assert_eq!(got, Ok(Some(base)));
                } else {
                    prop_assert!(matches!(got, Err(DecodeError::Truncated(_))), "cut at {} of {}: {:?}", cut, body.len(), got);
                }
            } else {
                prop_assert!(
                    matches!(got, Err(DecodeError::Truncated(_))),
                    "cut at {} of {}: {:?}", cut, body.len(), got
                );
            }
        }
    }

    /// Bytes after the last field, counted in the prefix, are refused with their count.
    #[test]
    fn trailing_bytes_are_refused(frame in any_frame(), extra in vec(any::<u8>(), 1..=16)) {
        if matches!(&frame, Frame::Welcome(w) if w.max_frame_len.is_none()) {
            // Its optional trailing field: `welcome_max_frame_len_is_an_optional_trailing_u32`.
            return Ok(());
        }
        if let Frame::Welcome(w) = &frame {
            if w.capabilities.is_empty() {
                // Stray bytes after `max_frame_len` read as the broker's list: refused
                // as a list, never a Welcome with them ignored.
                let mut body = encode(&frame)[FRAME_HEADER_LEN..].to_vec();
                body.extend_from_slice(&extra);
                let got = decode_frame(&mut reframe(&body), HUGE_LIMIT);
                prop_assert!(
                    !matches!(&got, Ok(Some(Frame::Welcome(g))) if g.capabilities.is_empty()),
                    "{:?}", got
                );
                return Ok(());
            }
        }
        if matches!(&frame, Frame::TunnelEnded(e) if e.manifest.is_empty()) {
            // Its optional trailing manifest: stray bytes are a broken manifest part,
            // never an end with them ignored.
            let mut body = encode(&frame)[FRAME_HEADER_LEN..].to_vec();
            body.extend_from_slice(&extra);
            let got = decode_frame(&mut reframe(&body), HUGE_LIMIT);
            prop_assert!(got.is_err(), "{:?}", got);
            return Ok(());
        }
        if matches!(&frame, Frame::CommandRequest(r) if r.signed.is_none()) {
            // Its optional trailing extension: a few stray bytes are a truncated
            // extension, never a request (`signed_ops_extension_is_all_or_nothing`).
            let mut body = encode(&frame)[FRAME_HEADER_LEN..].to_vec();
            body.extend_from_slice(&extra);
            let got = decode_frame(&mut reframe(&body), HUGE_LIMIT);
            prop_assert!(got.is_err(), "{:?}", got);
            return Ok(());
        }
        let bytes = encode(&frame);
        let mut body = bytes[FRAME_HEADER_LEN..].to_vec();
        body.extend_from_slice(&extra);
        let mut buf = reframe(&body);
        prop_assert_eq!(
            decode_frame(&mut buf, HUGE_LIMIT),
            Err(DecodeError::TrailingBytes(extra.len()))
        );
    }

    /// `CommandOutput` data one byte or more over what the limit leaves is refused by
    /// `encode_frame` with `FrameTooLarge`, and the buffer is left as it was; at exactly the
    /// limit it encodes.
    #[test]
    fn oversize_command_output_is_refused_by_encode(
        max in frame_limit(),
        excess in 1usize..=4096,
        command_id in any::<u64>(),
        stream in one_of(OutputStream::ALL),
        before in vec(any::<u8>(), 0..=16),
    ) {
        let output = |len: usize| Frame::CommandOutput(CommandOutput {
            command_id,
            stream,
            data: Bytes::from(vec![0xa5; len]),
        });
        let mut buf = BytesMut::from(&before[..]);
        prop_assert_eq!(
            encode_frame(&output(max - OUTPUT_OVERHEAD + excess), &mut buf, max),
            Err(EncodeError::FrameTooLarge { len: max + excess, max })
        );
        prop_assert_eq!(&buf[..], &before[..]);

        let fits = output(max - OUTPUT_OVERHEAD);
        prop_assert_eq!(encode_frame(&fits, &mut buf, max), Ok(()));
        prop_assert_eq!(buf.len(), before.len() + FRAME_HEADER_LEN + max);
        let _ = buf.split_to(before.len());
        prop_assert_eq!(decode_frame(&mut buf, max), Ok(Some(fits)));
    }

    /// A prefix announcing more than the limit is refused as soon as its four bytes arrive,
    /// before any of the body, and nothing stays buffered.
    #[test]
    fn oversize_prefix_is_refused_before_the_body(
        max in frame_limit(),
        excess in 1u32..=u32::MAX / 2,
    ) {
        let len = u32::try_from(max).expect("limits fit u32") + excess;
        let mut dec = FrameDecoder::new(max);
        dec.push(&len.to_be_bytes()[..3]);
        prop_assert_eq!(dec.poll_frame(), Ok(None));
        dec.push(&len.to_be_bytes()[3..]);
        prop_assert_eq!(
            dec.poll_frame(),
            Err(DecodeError::FrameTooLarge { len: len as usize, max })
        );
        prop_assert_eq!(dec.buffered(), 0);
    }
}

// ---------------------------------------------------------------------------------------
// Boundaries and fixed examples
// ---------------------------------------------------------------------------------------

/// A string of exactly `len` bytes.
fn ascii(len: usize) -> String {
    "x".repeat(len)
}

fn names(count: usize, len: usize) -> Vec<String> {
    vec![ascii(len); count]
}

/// One frame per variant with every list and string at its maximum (`over = 0`), or one
/// per limit with that single field one over it (`over = 1`), with the field's name.
fn limit_frames(over: usize) -> Vec<(&'static str, Frame)> {
    let hello = |agent_version: String, capabilities: Vec<String>| {
        Frame::Hello(Hello {
            protocol_version: 1,
            agent_version,
            capabilities,
            cert_not_after_ms: i64::MAX,
        })
    };
    let status = |entries: Vec<(String, String)>| Frame::Status(Status { entries });
    let request = |argv: Vec<String>, env_allowlist: Vec<String>| {
        Frame::CommandRequest(CommandRequest {
            command_id: u64::MAX,
            kind: CommandKind::Shell,
            argv,
            env_allowlist,
            deadline_ms: u32::MAX,
            signed: None,
        })
    };
    let go_away = |message: String| {
        Frame::GoAway(GoAway {
            reason: GoAwayReason::Rebalance,
            reconnect_after_ms: u32::MAX,
            message,
        })
    };
    let failed = |message: String| {
        Frame::CommandResult(CommandResult {
            command_id: 0,
            outcome: CommandOutcome::Failed {
                reason: FailureReason::Internal,
                message,
            },
        })
    };
    let caps = names(MAX_CAPABILITIES, MAX_CAPABILITY_LEN);
    let entry = (ascii(MAX_STATUS_KEY_LEN), ascii(MAX_STATUS_VALUE_LEN));
    let entries = vec![entry.clone(); MAX_STATUS_ENTRIES];
    let argv = names(MAX_ARGV, MAX_ARG_LEN);
    let env = names(MAX_ENV, MAX_ENV_NAME_LEN);
    let max_version = ascii(MAX_AGENT_VERSION_LEN);
    let max_message = ascii(MAX_MESSAGE_LEN);
    if over == 0 {
        return vec![
            ("hello", hello(max_version, caps)),
            ("status", status(entries)),
            ("command request", request(argv, env)),
            ("goaway", go_away(max_message.clone())),
            ("command result", failed(max_message)),
        ];
    }
    let one_more = |mut v: Vec<String>, item: String| {
        v.push(item);
        v
    };
    vec![
        (
            "agent_version",
            hello(ascii(MAX_AGENT_VERSION_LEN + 1), vec![]),
        ),
        (
            "capabilities",
            hello(String::new(), one_more(caps, ascii(1))),
        ),
        (
            "capability",
            hello(String::new(), vec![ascii(MAX_CAPABILITY_LEN + 1)]),
        ),
        (
            "status entries",
            status(vec![entry; MAX_STATUS_ENTRIES + 1]),
        ),
        (
            "status key",
            status(vec![(ascii(MAX_STATUS_KEY_LEN + 1), String::new())]),
        ),
        (
            "status value",
            status(vec![(String::new(), ascii(MAX_STATUS_VALUE_LEN + 1))]),
        ),
        (
            "argv",
            request(one_more(names(MAX_ARGV, 1), ascii(1)), vec![]),
        ),
        ("argv", request(vec![ascii(MAX_ARG_LEN + 1)], vec![])),
        (
            "env_allowlist",
            request(vec![], one_more(names(MAX_ENV, 1), ascii(1))),
        ),
        (
            "env_allowlist",
            request(vec![], vec![ascii(MAX_ENV_NAME_LEN + 1)]),
        ),
        ("message", go_away(ascii(MAX_MESSAGE_LEN + 1))),
        ("message", failed(ascii(MAX_MESSAGE_LEN + 1))),
    ]
}

#[test]
fn fields_at_their_limits_round_trip() {
    for (what, frame) in limit_frames(0) {
        let mut buf = encode(&frame);
        assert_eq!(
            decode_frame(&mut buf, HUGE_LIMIT),
            Ok(Some(frame)),
            "{what}"
        );
        assert!(buf.is_empty(), "{what}");
    }
}

#[test]
fn fields_over_their_limits_are_refused_both_ways() {
    for (field, frame) in limit_frames(1) {
        let mut buf = BytesMut::new();
        let refused = encode_frame(&frame, &mut buf, HUGE_LIMIT);
        let Err(EncodeError::TooLong { field: f, len, max }) = refused else {
            panic!("{field}: encode gave {refused:?}");
        };
        assert_eq!(f, field);
        assert!(buf.is_empty(), "{field}: refused frame left bytes behind");

        // Bypass the check with the raw encoder: the decoder refuses the same field.
        let mut body = BytesMut::new();
        frame.encode(&mut body);
        let mut framed = reframe(&body);
        assert_eq!(
            decode_frame(&mut framed, HUGE_LIMIT),
            Err(DecodeError::TooLong { field, len, max }),
            "{field}"
        );
    }
}

#[test]
fn command_output_fills_the_default_limit_exactly() {
    let frame = |len| {
        Frame::CommandOutput(CommandOutput {
            command_id: 1,
            stream: OutputStream::Stdout,
            data: filler(len, 7),
        })
    };
    let mut buf = BytesMut::new();
    encode_frame(&frame(MAX_OUTPUT_DATA), &mut buf, DEFAULT_MAX_FRAME_LEN).unwrap();
    assert_eq!(buf.len(), FRAME_HEADER_LEN + DEFAULT_MAX_FRAME_LEN);
    assert_eq!(
        decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN),
        Ok(Some(frame(MAX_OUTPUT_DATA)))
    );
    assert_eq!(
        encode_frame(&frame(MAX_OUTPUT_DATA + 1), &mut buf, DEFAULT_MAX_FRAME_LEN),
        Err(EncodeError::FrameTooLarge {
            len: DEFAULT_MAX_FRAME_LEN + 1,
            max: DEFAULT_MAX_FRAME_LEN
        })
    );
}

#[test]
fn decoder_limit_is_clamped_to_the_minimum() {
    assert_eq!(FrameDecoder::new(0).max_frame_len(), MIN_MAX_FRAME_LEN);
    assert_eq!(
        FrameDecoder::new(MIN_MAX_FRAME_LEN - 1).max_frame_len(),
        MIN_MAX_FRAME_LEN
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn heartbeat_example() -> Frame {
    Frame::Heartbeat(Heartbeat {
        seq: 1,
        trust_state: TrustState::Trusted,
        cert_not_after_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
    })
}

/// The example in `docs/PROTOCOL.md` ("Example: one Heartbeat frame"). Change both together.
#[test]
fn heartbeat_wire_example_matches_the_protocol_doc() {
    let bytes = encode(&heartbeat_example());
    assert_eq!(
        hex(&bytes),
        "00 00 00 12 03 00 00 00 00 00 00 00 01 00 00 00 01 9b 76 da a8 00"
    );
}

/// The body sizes in the frame table of `docs/PROTOCOL.md` (body = `len` − 1).
#[test]
fn body_sizes_match_the_protocol_doc() {
    let body = |f: &Frame| encode(f).len() - FRAME_HEADER_LEN - 1;
    let min_hello = Frame::Hello(Hello {
        protocol_version: 1,
        agent_version: String::new(),
        capabilities: vec![],
        cert_not_after_ms: 0,
    });
    let limits = limit_frames(0);
    let at_limit = |name: &str| {
        let (_, f) = limits.iter().find(|(n, _)| *n == name).expect("listed");
        body(f)
    };
    assert_eq!((body(&min_hello), at_limit("hello")), (14, 2_190));
    let (_, welcome) = &sample_frames()[1];
    assert_eq!(body(welcome), 30);
    let Frame::Welcome(w) = welcome.clone() else {
        unreachable!()
    };
    let with_limit = Frame::Welcome(Welcome {
        max_frame_len: Some(4096),
        ..w
    });
    assert_eq!(body(&with_limit), 34);
    assert_eq!(body(&heartbeat_example()), 17);
    let (_, ack) = &sample_frames()[3];
    assert_eq!(body(ack), 24);
    assert_eq!(body(&Frame::Status(Status::default())), 2);
    assert_eq!(at_limit("status") + 1, 73_987);
    let go_away = |message: &str| {
        Frame::GoAway(GoAway {
            reason: GoAwayReason::Draining,
            reconnect_after_ms: 0,
            message: message.into(),
        })
    };
    assert_eq!((body(&go_away("")), at_limit("goaway")), (7, 1_031));
    let request = Frame::CommandRequest(CommandRequest {
        command_id: 0,
        kind: CommandKind::Exec,
        argv: vec![],
        env_allowlist: vec![],
        deadline_ms: 0,
        signed: None,
    });
    assert_eq!(body(&request), 17);
    let output = Frame::CommandOutput(CommandOutput {
        command_id: 0,
        stream: OutputStream::Stdout,
        data: Bytes::new(),
    });
    assert_eq!(body(&output) + 1, OUTPUT_OVERHEAD);
    assert_eq!(body(&output), 13);
    let failed = Frame::CommandResult(CommandResult {
        command_id: 0,
        outcome: CommandOutcome::Failed {
            reason: FailureReason::Busy,
            message: String::new(),
        },
    });
    let (_, exited) = &sample_frames()[8];
    assert_eq!(
        (body(&failed), body(exited), at_limit("command result")),
        (12, 13, 1_036)
    );
}

/// One deterministic frame of every variant (two `CommandResult` outcomes), for the fuzz corpus.
fn sample_frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "hello",
            Frame::Hello(Hello {
                protocol_version: 1,
                agent_version: "tether-agent/0.1.0".into(),
                capabilities: vec!["shell".into(), "status".into()],
                cert_not_after_ms: 1_767_225_600_000,
            }),
        ),
        (
            "welcome",
            Frame::Welcome(Welcome {
                protocol_version: 1,
                session_id: 42,
                heartbeat_interval_ms: 15_000,
                server_time_ms: 1_765_000_000_000,
                manual_renewal_generation: 0,
                max_frame_len: None,
                capabilities: Vec::new(),
            }),
        ),
        (
            "heartbeat",
            Frame::Heartbeat(Heartbeat {
                seq: 1,
                trust_state: TrustState::RenewalRecommended,
                cert_not_after_ms: 1_767_225_600_000,
            }),
        ),
        (
            "heartbeat_ack",
            Frame::HeartbeatAck(HeartbeatAck {
                seq: 1,
                server_time_ms: 1_765_000_015_000,
                manual_renewal_generation: 2,
            }),
        ),
        (
            "status",
            Frame::Status(Status {
                entries: vec![
                    ("load".into(), "0.42".into()),
                    ("disk_free".into(), "12 GiB".into()),
                ],
            }),
        ),
        (
            "goaway",
            Frame::GoAway(GoAway {
                reason: GoAwayReason::Draining,
                reconnect_after_ms: 2_500,
                message: "broker b1 restarting".into(),
            }),
        ),
        (
            "command_request",
            Frame::CommandRequest(CommandRequest {
                command_id: 7,
                kind: CommandKind::Exec,
                argv: vec!["/bin/ls".into(), "-l".into(), "/var/log".into()],
                env_allowlist: vec!["LANG".into()],
                deadline_ms: 30_000,
                signed: None,
            }),
        ),
        (
            "command_output",
            Frame::CommandOutput(CommandOutput {
                command_id: 7,
                stream: OutputStream::Stderr,
                data: Bytes::from_static(b"ls: cannot open directory\n\xff\x00"),
            }),
        ),
        (
            "command_result_exited",
            Frame::CommandResult(CommandResult {
                command_id: 7,
                outcome: CommandOutcome::Exited(2),
            }),
        ),
        (
            "command_result_failed",
            Frame::CommandResult(CommandResult {
                command_id: 8,
                outcome: CommandOutcome::Failed {
                    reason: FailureReason::TimedOut,
                    message: "deadline of 30s passed".into(),
                },
            }),
        ),
    ]
}

/// The seed corpus of `fuzz/fuzz_targets/frame_decoder.rs`: each file is a selector byte
/// (chunk size and limit, see the target) followed by a frame stream. Written only when
/// `TETHER_WRITE_FUZZ_SEEDS` is set; otherwise this checks that the seeds still decode.
#[test]
fn write_fuzz_seeds() {
    let frames = sample_frames();
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, (name, frame)) in frames.iter().enumerate() {
        // Vary the selector: 128-byte chunks, 1-byte chunks, 4-byte chunks at the 1 KiB limit.
        let selector = [0x7f, 0x00, 0x83][i % 3];
        let mut seed = vec![selector];
        seed.extend_from_slice(&encode(frame));
        seeds.push((format!("{name}.bin"), seed));
    }
    let session: Vec<Frame> = frames[..6].iter().map(|(_, f)| f.clone()).collect();
    let command: Vec<Frame> = frames[6..].iter().map(|(_, f)| f.clone()).collect();
    for (name, stream) in [("session_stream", session), ("command_stream", command)] {
        let mut seed = vec![0x05];
        seed.extend_from_slice(&encode_all(&stream));
        seeds.push((format!("{name}.bin"), seed));
    }
    // A stream ending in a frame whose prefix is over the limit.
    let mut seed = vec![0x10];
    seed.extend_from_slice(&encode(&frames[2].1));
    seed.extend_from_slice(&0x0001_0001u32.to_be_bytes());
    seeds.push(("oversize_prefix.bin".into(), seed));

    for (name, seed) in &seeds {
        let (decoded, _) = decode_at_once(&seed[1..], DEFAULT_MAX_FRAME_LEN);
        assert!(!decoded.is_empty(), "{name}");
    }

    if std::env::var_os("TETHER_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decoder");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, seed) in seeds {
        std::fs::write(dir.join(name), seed).unwrap();
    }
}

/// The optional trailing `max_frame_len` of `Welcome` (`docs/PROTOCOL.md` §4.2): absent
/// decodes as `None`, four bytes as the limit, anything else is refused.
#[test]
fn welcome_max_frame_len_is_an_optional_trailing_u32() {
    let base = Welcome {
        protocol_version: 1,
        session_id: 42,
        heartbeat_interval_ms: 15_000,
        server_time_ms: 1_765_000_000_000,
        manual_renewal_generation: 0,
        max_frame_len: None,
        capabilities: Vec::new(),
    };
    let old = encode(&Frame::Welcome(base.clone()));
    let new = encode(&Frame::Welcome(Welcome {
        max_frame_len: Some(4096),
        ..base.clone()
    }));
    // The same bytes plus `00 00 10 00`, and `len` four larger.
    assert_eq!(&new[FRAME_HEADER_LEN..old.len()], &old[FRAME_HEADER_LEN..]);
    assert_eq!(&new[old.len()..], &[0x00, 0x00, 0x10, 0x00]);
    assert_eq!(hex(&new[..4]), "00 00 00 23");
    assert_eq!(hex(&old[..4]), "00 00 00 1f");
    let decoded = decode_at_once(&new, DEFAULT_MAX_FRAME_LEN).0;
    assert_eq!(decoded[0].max_frame_len_of(), Some(4096));
    let decoded = decode_at_once(&old, DEFAULT_MAX_FRAME_LEN).0;
    assert_eq!(decoded[0].max_frame_len_of(), None);
    let Frame::Welcome(w) = &decoded[0] else {
        unreachable!()
    };
    assert_eq!(w.peer_max_frame_len(), DEFAULT_MAX_FRAME_LEN);

    // With `extra` bytes after the 30-byte body.
    let with_tail = |extra: &[u8]| {
        let mut buf = BytesMut::new();
        buf.put_u32((1 + 30 + extra.len()) as u32);
        buf.extend_from_slice(&old[FRAME_HEADER_LEN..]);
        buf.extend_from_slice(extra);
        decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN)
    };
    for n in 1..4 {
        assert_eq!(
            with_tail(&[0; 4][..n]),
            Err(DecodeError::Truncated("max_frame_len"))
        );
    }
    assert_eq!(
        with_tail(&[0x00, 0x00, 0x03, 0xff]),
        Err(DecodeError::InvalidValue {
            field: "max_frame_len",
            value: 1023
        })
    );
    assert!(matches!(with_tail(&[0x00, 0x00, 0x04, 0x00]), Ok(Some(_))));
    // After `max_frame_len` only the broker's list may follow, whole.
    assert!(with_tail(&[0x00, 0x00, 0x04, 0x00, 0x00]).is_err());
    assert_eq!(
        with_tail(&[0x00, 0x00, 0x04, 0x00, 0x00, 0x01, 0x00, 0x01, b'x']),
        Ok(Some(Frame::Welcome(Welcome {
            max_frame_len: Some(1024),
            capabilities: vec!["x".into()],
            ..base.clone()
        })))
    );
    assert_eq!(
        with_tail(&[0x00, 0x00, 0x04, 0x00, 0x00, 0x00]),
        Err(DecodeError::InvalidValue {
            field: "broker capabilities",
            value: 0
        }),
        "an empty list is encoded as no list"
    );
    // A limit below the protocol's minimum is not encoded either.
    let mut buf = BytesMut::new();
    assert!(encode_frame(
        &Frame::Welcome(Welcome {
            max_frame_len: Some(1023),
            ..base
        }),
        &mut buf,
        DEFAULT_MAX_FRAME_LEN
    )
    .is_err());
}

trait MaxFrameLenOf {
    fn max_frame_len_of(&self) -> Option<u32>;
}

impl MaxFrameLenOf for Frame {
    fn max_frame_len_of(&self) -> Option<u32> {
        match self {
            Frame::Welcome(w) => w.max_frame_len,
            _ => panic!("not a Welcome: {self:?}"),
        }
    }
}

/// `CommandOutput::max_data_len` and `CommandResult::max_message_len` are exactly what fits.
#[test]
fn chunk_and_message_limits_fit_the_frame_limit_exactly() {
    for max in [MIN_MAX_FRAME_LEN, 4096, DEFAULT_MAX_FRAME_LEN] {
        let n = CommandOutput::max_data_len(max);
        let output = |len: usize| {
            Frame::CommandOutput(CommandOutput {
                command_id: u64::MAX,
                stream: OutputStream::Stderr,
                data: vec![0xab; len].into(),
            })
        };
        assert_eq!(
            encode_limited(&output(n), max).len(),
            FRAME_HEADER_LEN + max
        );
        assert!(encode_frame(&output(n + 1), &mut BytesMut::new(), max).is_err());

        let m = CommandResult::max_message_len(max);
        let result = |len: usize| {
            Frame::CommandResult(CommandResult {
                command_id: u64::MAX,
                outcome: CommandOutcome::Failed {
                    reason: FailureReason::Internal,
                    message: "x".repeat(len),
                },
            })
        };
        assert!(encode_frame(&result(m), &mut BytesMut::new(), max).is_ok());
        if m < MAX_MESSAGE_LEN {
            assert!(encode_frame(&result(m + 1), &mut BytesMut::new(), max).is_err());
        }
    }
    assert_eq!(CommandResult::max_message_len(MIN_MAX_FRAME_LEN), 1011);
}

fn encode_limited(frame: &Frame, max: usize) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf, max).unwrap();
    buf
}

/// Found by the `frame_decoder` fuzz target (`fuzz/corpus/frame_decoder/regress-plan-bool`):
/// `CommandPlan` read any non-zero `approval_required` as true, so one frame had 255
/// encodings and re-encoded to other bytes. Only 0 and 1 are read, as for `plan_only`.
#[test]
fn command_plan_approval_required_is_zero_or_one() {
    let plan = |approval_required: u8| {
        let mut buf = BytesMut::new();
        buf.put_u32(1 + 8 + 1 + 4 + 2);
        buf.put_u8(0x14);
        buf.put_u64(7);
        buf.put_u8(approval_required);
        buf.put_u32(2);
        buf.put_slice(b"{}");
        decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN)
    };
    for (byte, required) in [(0, false), (1, true)] {
        assert_eq!(
            plan(byte),
            Ok(Some(Frame::CommandPlan(tether_proto::CommandPlan {
                command_id: 7,
                approval_required: required,
                document: Bytes::from_static(b"{}"),
            })))
        );
    }
    for byte in [2, 0x6e, 0xff] {
        assert_eq!(
            plan(byte),
            Err(DecodeError::InvalidValue {
                field: "approval_required",
                value: u64::from(byte),
            })
        );
    }
}
