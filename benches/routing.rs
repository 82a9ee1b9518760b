//! The command-routing hot path at fleet scale, in-process, up to the network on each side.
//!
//! - `route/control/<n>`: control's [`Cluster::exec`] with `n` appliances present across
//!   four broker links: the presence lookup, the link lookup, the in-flight record and the
//!   `ToBroker::Command` landing in that link's queue. Each link's queue is drained by a
//!   task on another thread (as `run_link`'s writer would, minus the JSON encode and the
//!   socket write), so a send also pays for waking it when it is idle. Inputs are built
//!   and commands cancelled (`Cluster::cancel`) outside the timed part, 256 at a time.
//! - `route/control_no_wake/<n>`: the same, but nothing waits on the queues: they are
//!   emptied between batches, untimed. The routing work alone, without the wake-up.
//! - `route/broker_lookup/<n>`: the broker's `SessionTable::get` by appliance id among `n`
//!   live sessions (id check, map lookup, handle clone), random appliances.
//! - `route/broker/<n>`: what the broker does for one command between the channel and QUIC:
//!   decode the `ToBroker::Command` frame from control, look the session up, build the
//!   `CommandRequest` and encode it with the proto codec into a fresh buffer (the steps of
//!   `channel.rs` and `Broker::run_command` before `open_bi`; the task spawn, the stream and
//!   the write are not in it).
//!
//! The broker's sessions are real `SessionInfo`s sharing one loopback QUIC connection
//! (a lookup never touches the connection; only the table's size and keys matter).
//!
//! Run: `cargo bench --bench routing` (add `-- --quick` for a fast look).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tether::pki::Pki;
use tether_broker::allowlist::{ApplianceId, Fingerprint};
use tether_broker::sessions::{SessionInfo, SessionTable, NOT_CLOSED};
use tether_control::cluster::Cluster;
use tether_proto::cluster::{SessionReport, ToBroker};
use tether_proto::{encode_frame, CommandKind, CommandRequest, Frame, DEFAULT_MAX_FRAME_LEN};
use tokio::sync::mpsc;

const FLEETS: [usize; 2] = [1_000, 100_000];
const LINKS: usize = 4;
/// Commands timed between two clean-ups; a quarter of a link's queue (1,024), so even if
/// every one went to the same link the sender never waits for the drain.
const BATCH: usize = 256;
/// Random appliances cycled through by the broker benches.
const PICKS: usize = 4096;

fn appliance(i: usize) -> String {
    format!("app-{i:06}")
}

fn argv() -> Vec<String> {
    [
        "/usr/bin/journalctl",
        "-u",
        "tether-agent",
        "--since",
        "-1h",
    ]
    .map(String::from)
    .to_vec()
}

fn env_allowlist() -> Vec<String> {
    vec!["LANG".into(), "TZ".into()]
}

/// A cluster with `n` appliances spread over [`LINKS`] links, and the links' queues.
fn cluster(n: usize) -> (Cluster, Vec<mpsc::Receiver<ToBroker>>) {
    let cluster = Cluster::new();
    let queues = (0..LINKS)
        .map(|b| {
            let sessions = (b..n)
                .step_by(LINKS)
                .map(|i| SessionReport {
                    appliance: appliance(i),
                    session_id: i as u64 + 1,
                    fingerprint: format!("{i:064x}"),
                    connected_at: 1_765_000_000,
                    connected_at_ms: 0,
                    cert_not_after: 1_767_225_600,
                    agent_version: "0.1.0".into(),
                    transport: "quic".into(),
                    capabilities: vec![],
                })
                .collect();
            cluster.attach_link(&format!("broker-{b}"), sessions)
        })
        .collect();
    assert!(cluster.presence(&appliance(n - 1)).is_some());
    (cluster, queues)
}

/// Time `iters` commands to random appliances of `cluster` (`n` present), [`BATCH`] at a
/// time; between batches, untimed, cancel them and call `between`.
async fn exec_batches(
    cluster: &Cluster,
    n: usize,
    rng: &mut fastrand::Rng,
    iters: u64,
    mut between: impl FnMut(),
) -> Duration {
    let mut timed = Duration::ZERO;
    let mut done = 0;
    let mut sent = Vec::with_capacity(BATCH);
    while done < iters {
        let k = (iters - done).min(BATCH as u64) as usize;
        let ids: Vec<String> = (0..k).map(|_| appliance(rng.usize(..n))).collect();
        let args: Vec<_> = (0..k)
            .map(|_| (argv(), CommandKind::Exec, env_allowlist()))
            .collect();
        let start = Instant::now();
        for (id, (argv, kind, env)) in ids.iter().zip(args) {
            let routed = cluster
                .exec(id, argv, kind, env, Duration::from_secs(30))
                .await
                .expect("present and linked");
            sent.push(routed);
        }
        timed += start.elapsed();
        for (_, id, events) in sent.drain(..) {
            cluster.cancel(id);
            drop(events);
        }
        between();
        done += k as u64;
    }
    timed
}

fn control(c: &mut Criterion) {
    // The writers run on the runtime's one worker; the timed loop on the bench thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut live = c.benchmark_group("route/control");
    for n in FLEETS {
        let (cluster, queues) = cluster(n);
        for mut rx in queues {
            rt.spawn(async move {
                while let Some(msg) = rx.recv().await {
                    black_box(msg);
                }
            });
        }
        let mut rng = fastrand::Rng::with_seed(7);
        live.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| rt.block_on(exec_batches(&cluster, n, &mut rng, iters, || {})))
        });
    }
    live.finish();

    let mut quiet = c.benchmark_group("route/control_no_wake");
    for n in FLEETS {
        let (cluster, mut queues) = cluster(n);
        let mut rng = fastrand::Rng::with_seed(7);
        quiet.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                rt.block_on(exec_batches(&cluster, n, &mut rng, iters, || {
                    for rx in &mut queues {
                        while rx.try_recv().is_ok() {}
                    }
                }))
            })
        });
    }
    quiet.finish();
}

/// A loopback QUIC connection (server side), to stand in every session's handle.
fn connection(rt: &tokio::runtime::Runtime) -> (quinn::Endpoint, quinn::Connection) {
    let pki = Pki::new("bench.test").unwrap();
    let leaf = pki.broker("bench").unwrap();
    rt.block_on(async {
        let server_config =
            quinn::ServerConfig::with_single_cert(leaf.rustls_chain(), leaf.rustls_key()).unwrap();
        let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap())
            .expect("bind loopback");
        let addr = server.local_addr().unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(
            quinn::ClientConfig::with_root_certificates(Arc::new(pki.rustls_roots().unwrap()))
                .unwrap(),
        );
        let connecting = client.connect(addr, "localhost").unwrap();
        let accepted = async { server.accept().await.unwrap().await.unwrap() };
        let (client_conn, server_conn) = tokio::join!(connecting, accepted);
        // The client side must outlive the benches, or the connection closes.
        std::mem::forget(client_conn.unwrap());
        (server, server_conn)
    })
}

fn table(n: usize, conn: &quinn::Connection) -> SessionTable {
    let table = SessionTable::new();
    let remote: SocketAddr = "192.0.2.1:40000".parse().unwrap();
    for i in 0..n {
        let mut fp = [0u8; 32];
        fp[..8].copy_from_slice(&(i as u64).to_be_bytes());
        table.insert(Arc::new(SessionInfo {
            session_id: table.next_session_id(),
            appliance: ApplianceId::new(&appliance(i)).unwrap(),
            fingerprint: Fingerprint(fp),
            connected_at: SystemTime::now(),
            remote,
            agent_version: "0.1.0".into(),
            capabilities: vec![],
            connection: conn.clone().into(),
            cert_not_after_ms: 1_767_225_600_000.into(),
            last_heartbeat_ms: 0.into(),
            trust_state: 0.into(),
            renewal_generation: 0.into(),
            renewal_changed: tokio::sync::Notify::new(),
            close_code: NOT_CLOSED.into(),
            status: Default::default(),
        }));
    }
    assert_eq!(table.len(), n);
    table
}

/// The broker's non-I/O work for one command frame from control; returns the encoded
/// `CommandRequest`'s length.
fn broker_route(body: &[u8], sessions: &SessionTable, command_id: u64) -> usize {
    let msg: ToBroker = tether_proto::cluster::decode(body).expect("valid frame");
    let ToBroker::Command {
        appliance,
        argv,
        kind,
        env_allowlist,
        timeout_ms,
        ..
    } = msg
    else {
        unreachable!("only commands here")
    };
    let session = sessions.get(&appliance).expect("connected");
    let request = Frame::CommandRequest(CommandRequest {
        command_id,
        kind,
        argv,
        env_allowlist,
        deadline_ms: u32::try_from(timeout_ms).unwrap_or(u32::MAX),
        signed: None,
    });
    let mut buf = BytesMut::new();
    encode_frame(&request, &mut buf, DEFAULT_MAX_FRAME_LEN).expect("fits");
    black_box(&session);
    buf.len()
}

fn broker(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (_endpoint, conn) = connection(&rt);
    let mut lookup = c.benchmark_group("route/broker_lookup");
    let mut tables = Vec::new();
    for n in FLEETS {
        let table = table(n, &conn);
        let mut rng = fastrand::Rng::with_seed(11);
        let picks: Vec<String> = (0..PICKS).map(|_| appliance(rng.usize(..n))).collect();
        let mut i = 0;
        lookup.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % PICKS;
                black_box(table.get(black_box(&picks[i])))
            })
        });
        tables.push((n, table, picks));
    }
    lookup.finish();

    let mut group = c.benchmark_group("route/broker");
    for (n, table, picks) in &tables {
        // Frame bodies as the channel's codec hands them over (length prefix stripped).
        let frames: Vec<Vec<u8>> = picks
            .iter()
            .enumerate()
            .map(|(id, appliance)| {
                let frame = tether_proto::cluster::encode(&ToBroker::Command {
                    id: id as u64,
                    appliance: appliance.clone(),
                    argv: argv(),
                    kind: CommandKind::Exec,
                    env_allowlist: env_allowlist(),
                    timeout_ms: 30_000,
                    signed: None,
                })
                .unwrap();
                frame[4..].to_vec()
            })
            .collect();
        let mut i = 0;
        group.bench_with_input(BenchmarkId::from_parameter(n), n, |b, _| {
            b.iter(|| {
                i = (i + 1) % PICKS;
                broker_route(black_box(&frames[i]), table, i as u64)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, control, broker);
criterion_main!(benches);
