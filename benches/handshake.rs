//! In-process loopback mTLS handshakes against the real broker (`Running::bind` + `serve`,
//! the same code as `tether-broker`), with a full client certificate check, pin lookup and
//! session registration on every connection.
//!
//! - `handshake/sequential`: one connection at a time, connect → verified → closed.
//! - `handshake/concurrent64`: 64 handshakes in flight; criterion reports handshakes/s.
//! - `handshake_1m/quiet` and `handshake_1m/revocation_burst`: sequential handshakes with
//!   a 1,000,000-entry allowlist, alone and while another thread applies revocation deltas
//!   (one fingerprint out, one in) at about 1,000 per second, as control pushes them in a
//!   mass revocation. The two should not differ: a delta builds a new persistent map off
//!   the handshake path and swaps it in, and the verifier reads whichever is current.
//!
//! Client and server share the machine (and, here, the runtime), so this is a lower bound
//! of what a dedicated broker core does; `tether-loadtest` measures them apart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tether::pki::Pki;
use tether_broker::allowlist::{Allowlist, ApplianceId, Change, Entry, Fingerprint};
use tokio_util::sync::CancellationToken;

const TD: &str = "bench.test";

struct Fixture {
    _dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    client: quinn::ClientConfig,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
    allowlist: Arc<Allowlist>,
    leaf_fp: Fingerprint,
}

fn fixture(rt: &tokio::runtime::Runtime) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(TD).unwrap();
    let broker = pki.broker("bench").unwrap();
    let leaf = pki.appliance("app-1").unwrap();
    let p = |f: &str| dir.path().join(f);
    std::fs::write(p("ca.pem"), pki.ca_bundle_pem()).unwrap();
    std::fs::write(p("broker.pem"), broker.chain_pem()).unwrap();
    std::fs::write(p("broker.key"), broker.key_pem()).unwrap();
    std::fs::write(
        p("allow.txt"),
        format!("app-1 {}\n", leaf.fingerprint_hex()),
    )
    .unwrap();
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ntrust_domain = \"{TD}\"\n\
         [tls]\nca = \"ca.pem\"\ncert = \"broker.pem\"\nkey = \"broker.key\"\n\
         [allowlist]\nfile = \"allow.txt\"\n[limits]\nmax_concurrent_handshakes = 256\n"
    );
    let config =
        tether_broker::config::Config::from_toml(&toml, dir.path(), &p("broker.toml")).unwrap();
    let shutdown = CancellationToken::new();
    let (addr, endpoint, allowlist) = rt.block_on(async {
        let running = tether_broker::Running::bind(config).await.unwrap();
        let addr = running.broker.local_addr().unwrap();
        let allowlist = running.broker.allowlist().clone();
        tokio::spawn(running.serve(shutdown.clone()));
        // A client socket with a large receive buffer: the default 208 KiB drops packets
        // under 64 concurrent handshakes, and every drop costs a ~1 s probe timeout.
        let (socket, _) =
            tether_broker::tls::bind_udp("127.0.0.1:0".parse().unwrap(), 4 << 20).unwrap();
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .unwrap();
        (addr, endpoint, allowlist)
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(pki.rustls_roots().unwrap())
        .with_client_auth_cert(leaf.rustls_chain(), leaf.rustls_key())
        .unwrap();
    tls.alpn_protocols = vec![tether_proto::ALPN.to_vec()];
    let client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    Fixture {
        _dir: dir,
        addr,
        client,
        endpoint,
        shutdown,
        allowlist,
        leaf_fp: Fingerprint::of(&leaf.cert_der),
    }
}

/// A random entry.
fn random_entry(rng: &mut fastrand::Rng, i: usize) -> Entry {
    let mut fp = [0u8; 32];
    rng.fill(&mut fp);
    Entry {
        appliance: ApplianceId::new(&format!("app-m{i}")).unwrap(),
        fingerprint: Fingerprint(fp),
    }
}

/// Replace the allowlist with `n` random entries plus the fixture's leaf; returns the
/// random fingerprints.
fn fill(f: &Fixture, n: usize) -> Vec<Fingerprint> {
    let mut rng = fastrand::Rng::with_seed(11);
    let mut entries: Vec<Entry> = (0..n).map(|i| random_entry(&mut rng, i)).collect();
    let fps = entries.iter().map(|e| e.fingerprint).collect();
    entries.push(Entry {
        appliance: ApplianceId::new("app-1").unwrap(),
        fingerprint: f.leaf_fp,
    });
    f.allowlist
        .apply(Change::Replace {
            version: None,
            entries,
        })
        .unwrap();
    fps
}

/// Apply one delta (a random listed fingerprint out, a new one in) about every
/// millisecond until `stop`; returns how many and the time spent applying them.
fn revoke_until(
    allowlist: Arc<Allowlist>,
    mut listed: Vec<Fingerprint>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, Duration)> {
    std::thread::spawn(move || {
        let mut rng = fastrand::Rng::with_seed(13);
        let (mut applied, mut busy) = (0u64, Duration::ZERO);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let i = rng.usize(..listed.len());
            let added = random_entry(&mut rng, 2_000_000 + applied as usize);
            let removed = std::mem::replace(&mut listed[i], added.fingerprint);
            let t = Instant::now();
            allowlist
                .apply(Change::Delta {
                    version: None,
                    add: vec![added],
                    remove: vec![removed],
                })
                .unwrap();
            busy += t.elapsed();
            applied += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        (applied, busy)
    })
}

async fn one(f: &Fixture) {
    let conn = f
        .endpoint
        .connect_with(f.client.clone(), f.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    conn.close(0u32.into(), b"");
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let f = Arc::new(fixture(&rt));
    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sequential", |b| b.iter(|| rt.block_on(one(&f))));
    g.bench_function("concurrent64", |b| {
        b.iter_custom(|iters| {
            let f = f.clone();
            rt.block_on(async move {
                let start = Instant::now();
                let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let mut tasks = Vec::new();
                for _ in 0..64 {
                    let f = f.clone();
                    let next = next.clone();
                    tasks.push(tokio::spawn(async move {
                        while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < iters {
                            one(&f).await;
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    let listed = fill(&f, 1_000_000);
    let mut g = c.benchmark_group("handshake_1m");
    g.throughput(Throughput::Elements(1));
    g.bench_function("quiet", |b| b.iter(|| rt.block_on(one(&f))));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burst = revoke_until(f.allowlist.clone(), listed, stop.clone());
    let started = Instant::now();
    g.bench_function("revocation_burst", |b| b.iter(|| rt.block_on(one(&f))));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (applied, busy) = burst.join().unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "revocation_burst: {applied} deltas applied to the 1M-entry allowlist in {secs:.1} s \
         ({:.0}/s, {:.1} µs each) while handshaking",
        applied as f64 / secs,
        busy.as_secs_f64() * 1e6 / applied.max(1) as f64
    );
    g.finish();
    f.shutdown.cancel();
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
}

criterion_group! {
    name = handshake;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5));
    targets = benches
}
criterion_main!(handshake);
