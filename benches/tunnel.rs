//! Break glass on the wire: what a tunnel costs against a direct TCP connection to the
//! same target, on loopback, through a real `tether-control`, an enrolled
//! `tether-broker`, a real `tether-agent` with a customer directory, and `tether tunnel
//! open` (the operator's CLI) — every hop of the product: CLI → TLS → control → TLS
//! dial-back → broker → QUIC stream → agent → TCP → target.
//!
//! - `tunnel/rtt/{direct,through_control}`: 64 bytes written and their echo read back on
//!   an open connection (the added latency per round trip).
//! - `tunnel/bulk_1mib/{direct,through_control}`: 1 MiB written while its echo is read
//!   back (throughput in each direction at once).
//!
//! The target is an in-process TCP echo server standing in for the customer's resource.
//! The processes are the release binaries next to the bench executable: build them first.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench --bench tunnel`.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::net::SocketAddr;
use std::process::Child;

use common::cluster::Cluster;
use common::customer::{echo_server, request_signed, through_control, tunnel_open, tunnel_policy};
use common::{AgentProc, BrokerProc};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything a tunnel needs, kept alive for the benches.
struct Rig {
    _cluster: Cluster,
    _broker: BrokerProc,
    _agent: AgentProc,
    open: Child,
    direct: SocketAddr,
    tunnel: SocketAddr,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.open.kill();
        let _ = self.open.wait();
    }
}

async fn rig() -> Rig {
    let direct = echo_server().await;
    let (c, broker, agent, root) = through_control(|_| tunnel_policy(&direct.to_string())).await;
    request_signed(
        &c,
        &root,
        "request.json",
        &[
            "--resource",
            "echo",
            "--privilege",
            "rw",
            "--duration",
            "30m",
            "--reason",
            "bench",
            "--no-credential",
        ],
    );
    let (open, tunnel) = tunnel_open(&c, &root, "request.json").await;
    Rig {
        _cluster: c,
        _broker: broker,
        _agent: agent,
        open,
        direct,
        tunnel,
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn tunnel(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rig = rt.block_on(rig());
    let paths = [("direct", rig.direct), ("through_control", rig.tunnel)];

    let mut g = c.benchmark_group("tunnel/rtt");
    for (name, addr) in paths {
        let mut conn = rt.block_on(connect(addr));
        let msg = [7u8; 64];
        let mut back = [0u8; 64];
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    conn.write_all(&msg).await.unwrap();
                    conn.read_exact(&mut back).await.unwrap();
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("tunnel/bulk_1mib");
    g.throughput(Throughput::Bytes(1 << 20));
    g.sample_size(10);
    for (name, addr) in paths {
        let mut conn = rt.block_on(connect(addr));
        let data = vec![9u8; 1 << 20];
        let mut back = vec![0u8; 1 << 20];
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let (mut r, mut w) = conn.split();
                    let (wrote, read) = tokio::join!(w.write_all(&data), r.read_exact(&mut back));
                    wrote.unwrap();
                    read.unwrap();
                })
            })
        });
    }
    g.finish();
    drop(rig);
}

criterion_group!(benches, tunnel);
criterion_main!(benches);
