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

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::cluster::Cluster;
use common::customer::{chmod, customer_dir, echo_server, ssh_keygen, tunnel_policy};
use common::{bin, AgentProc, BrokerProc};
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
    let mut c = Cluster::new("");
    let broker = c.add_broker("edge-1");
    let state = c.enroll("app-1");
    let root = c.tmp().to_path_buf();
    chmod(&root, 0o755);
    let direct = echo_server().await;
    let customer = customer_dir(&root, &tunnel_policy(&direct.to_string()));
    let agent = AgentProc::start(
        &state,
        &[broker.quic],
        &["--customer-dir", customer.to_str().unwrap()],
    );
    c.wait_connected("app-1", Some("edge-1")).await;
    let doc = c
        .tether(&[
            "tunnel",
            "request",
            "app-1",
            "--resource",
            "echo",
            "--privilege",
            "rw",
            "--duration",
            "30m",
            "--reason",
            "bench",
            "--no-credential",
        ])
        .expect("the appliance answers a plan");
    std::fs::write(root.join("request.json"), doc).unwrap();
    ssh_keygen(
        &[
            "-Y",
            "sign",
            "-n",
            "tether-approval-v1",
            "-f",
            "alice",
            "request.json",
        ],
        &root,
    );
    let mut open = Command::new(bin("tether"))
        .args(["tunnel", "open", "--approval"])
        .arg(root.join("request.json"))
        .env("TETHER_CONFIG_DIR", &c.ops)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(open.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let tunnel = line
        .trim()
        .parse()
        .expect("tether tunnel open prints its address");
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
