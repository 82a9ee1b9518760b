//! Codec benches: encode and decode of single frames (a `Heartbeat`, a five-argument
//! `CommandRequest`, a 16 KiB `CommandOutput`), and `FrameDecoder` throughput over a stream
//! of 1,000 mixed frames pushed in QUIC-sized and in large chunks.
//!
//! Run: `cargo bench --bench codec` (add `-- --quick` for a fast look).

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tether_proto::{
    decode_frame, encode_frame, CommandKind, CommandOutcome, CommandOutput, CommandRequest,
    CommandResult, Frame, FrameDecoder, Heartbeat, HeartbeatAck, OutputStream, Status, TrustState,
    DEFAULT_MAX_FRAME_LEN,
};

const MAX: usize = DEFAULT_MAX_FRAME_LEN;

fn heartbeat(seq: u64) -> Frame {
    Frame::Heartbeat(Heartbeat {
        seq,
        trust_state: TrustState::Trusted,
        cert_not_after_ms: 1_767_225_600_000,
    })
}

fn command_request(command_id: u64) -> Frame {
    Frame::CommandRequest(CommandRequest {
        command_id,
        kind: CommandKind::Exec,
        argv: [
            "/usr/bin/journalctl",
            "-u",
            "tether-agent",
            "--since",
            "-1h",
        ]
        .map(String::from)
        .to_vec(),
        env_allowlist: vec!["LANG".into(), "TZ".into()],
        deadline_ms: 30_000,
        signed: None,
    })
}

/// Output data that is not all one byte (compressible data is no faster here, but honest).
fn output_data(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn command_output(command_id: u64, len: usize) -> Frame {
    Frame::CommandOutput(CommandOutput {
        command_id,
        stream: OutputStream::Stdout,
        data: output_data(len, command_id as u8),
    })
}

/// 1,000 frames as a busy connection would carry them: mostly heartbeats and their acks,
/// some status, and commands with output chunks of 64 B to 8 KiB.
fn mixed_stream() -> (usize, BytesMut) {
    let mut buf = BytesMut::new();
    let mut count = 0;
    for i in 0..1_000u64 {
        let frame = match i % 10 {
            0..=3 => heartbeat(i),
            4 => Frame::HeartbeatAck(HeartbeatAck {
                seq: i,
                server_time_ms: 1_765_000_000_000 + i as i64,
                manual_renewal_generation: 0,
            }),
            5 => Frame::Status(Status {
                entries: vec![
                    ("load".into(), format!("0.{i}")),
                    ("uptime_s".into(), (86_400 + i).to_string()),
                    ("disk_free".into(), "12 GiB".into()),
                ],
            }),
            6 => command_request(i),
            7 | 8 => command_output(i, 64 << (i % 8)),
            _ => Frame::CommandResult(CommandResult {
                command_id: i,
                outcome: CommandOutcome::Exited(0),
            }),
        };
        encode_frame(&frame, &mut buf, MAX).expect("bench frames fit");
        count += 1;
    }
    (count, buf)
}

fn encoded(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf, MAX).expect("bench frames fit");
    buf
}

fn single_frames(c: &mut Criterion) {
    let cases = [
        ("heartbeat", heartbeat(1)),
        ("command_request_5_args", command_request(7)),
        ("command_output_16k", command_output(7, 16 * 1024)),
    ];

    let mut group = c.benchmark_group("encode");
    for (name, frame) in &cases {
        let mut buf = BytesMut::with_capacity(encoded(frame).len());
        group.throughput(Throughput::Bytes(encoded(frame).len() as u64));
        group.bench_function(*name, |b| {
            b.iter(|| {
                buf.clear();
                encode_frame(black_box(frame), &mut buf, MAX).expect("fits");
                black_box(buf.len())
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode");
    for (name, frame) in &cases {
        let bytes = encoded(frame);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(*name, |b| {
            // Decoding consumes the buffer: copy it outside the measurement.
            b.iter_batched_ref(
                || bytes.clone(),
                |buf| decode_frame(black_box(buf), MAX).expect("valid"),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn frame_decoder_stream(c: &mut Criterion) {
    let (count, stream) = mixed_stream();
    let mut group = c.benchmark_group("frame_decoder_1000_mixed");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    // 1,200 bytes: about one QUIC packet per read; 64 KiB: a large stream read.
    for chunk in [1_200usize, 64 * 1024] {
        group.bench_function(format!("chunks_of_{chunk}"), |b| {
            b.iter(|| {
                let mut decoder = FrameDecoder::new(MAX);
                let mut frames = 0;
                for piece in stream.chunks(chunk) {
                    decoder.push(black_box(piece));
                    while let Some(frame) = decoder.poll_frame().expect("valid stream") {
                        black_box(&frame);
                        frames += 1;
                    }
                }
                assert_eq!(frames, count);
                frames
            })
        });
    }
    group.finish();
}

criterion_group!(benches, single_frames, frame_decoder_stream);
criterion_main!(benches);
