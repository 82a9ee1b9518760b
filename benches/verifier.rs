//! The broker's per-handshake trust work and the cost of one revocation.
//!
//! - `pin/<n>`: SHA-256 of a leaf DER plus the allowlist lookup, at 1k / 100k / 1M entries
//!   (the O(1) part of every handshake; docs/ARCHITECTURE.md, "Identity model").
//! - `identify/<n>`: steps 2 and 3 of the verifier on a real leaf (X.509 parse, SAN and
//!   EKU checks, fingerprint, lookup).
//! - `verify_full`: all three steps, including webpki's chain and signature check.
//! - `connection`: what one connection costs the verifier: `verify` inside the handshake,
//!   then `identify` on the verified leaf once it is done (which takes step 2's answer
//!   from the handshake instead of parsing the leaf again).
//! - `identify_after_handshake`: that second `identify` alone (`identify/<n>` is what it
//!   cost before the handshake left its answer).
//! - `revoke_one/1000000`: one fingerprint removed from a 1M-entry allowlist and swapped in.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use rustls::pki_types::{CertificateDer, UnixTime};
use tether::pki::Pki;
use tether_broker::allowlist::{Allowlist, ApplianceId, Change, Entry, Fingerprint};
use tether_broker::metrics::Metrics;
use tether_broker::verifier::ApplianceVerifier;

const TD: &str = "bench.test";

/// An allowlist of `n` random fingerprints plus the real leaf's.
fn allowlist(n: usize, leaf_fp: Fingerprint) -> Arc<Allowlist> {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut entries: Vec<Entry> = (0..n)
        .map(|i| {
            let mut fp = [0u8; 32];
            rng.fill(&mut fp);
            Entry {
                appliance: ApplianceId::new(&format!("app-{i}")).unwrap(),
                fingerprint: Fingerprint(fp),
            }
        })
        .collect();
    entries.push(Entry {
        appliance: ApplianceId::new("app-real").unwrap(),
        fingerprint: leaf_fp,
    });
    let list = Allowlist::new();
    list.apply(Change::Replace {
        version: None,
        entries,
    })
    .unwrap();
    Arc::new(list)
}

fn benches(c: &mut Criterion) {
    let pki = Pki::new(TD).unwrap();
    let leaf = pki.appliance("app-real").unwrap();
    let leaf_der = CertificateDer::from(leaf.cert_der.clone());
    let inter = CertificateDer::from(pki.intermediate.cert_der().to_vec());
    let fp = Fingerprint::of(&leaf.cert_der);
    let ca = vec![
        CertificateDer::from(pki.root.cert_der().to_vec()),
        CertificateDer::from(pki.intermediate.cert_der().to_vec()),
    ];
    let provider = tether_broker::tls::provider();

    let mut pin = c.benchmark_group("pin");
    let mut identify = Vec::new();
    for n in [1_000usize, 100_000, 1_000_000] {
        let list = allowlist(n, fp);
        let real = ApplianceId::new("app-real").unwrap();
        pin.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let f = Fingerprint::of(black_box(&leaf.cert_der));
                black_box(list.snapshot().lookup(&f) == Some(&real))
            })
        });
        identify.push((n, list));
    }
    pin.finish();

    let mut group = c.benchmark_group("identify");
    for (n, list) in &identify {
        let verifier = ApplianceVerifier::new(
            &ca,
            TD,
            list.clone(),
            Arc::new(Metrics::new()),
            provider.clone(),
        )
        .unwrap();
        group.bench_with_input(BenchmarkId::from_parameter(n), n, |b, _| {
            b.iter(|| black_box(verifier.identify(black_box(&leaf_der)).unwrap()))
        });
        if *n == 1_000_000 {
            group.bench_function("verify_full/1000000", |b| {
                b.iter(|| {
                    black_box(
                        verifier
                            .verify(
                                black_box(&leaf_der),
                                std::slice::from_ref(&inter),
                                UnixTime::now(),
                            )
                            .unwrap(),
                    )
                })
            });
            group.bench_function("connection/1000000", |b| {
                b.iter(|| {
                    verifier
                        .verify(
                            black_box(&leaf_der),
                            std::slice::from_ref(&inter),
                            UnixTime::now(),
                        )
                        .unwrap();
                    black_box(verifier.identify(black_box(&leaf_der)).unwrap())
                })
            });
            // One handshake per identify: each leaves one answer, under the same key.
            group.bench_function("identify_after_handshake/1000000", |b| {
                b.iter_batched(
                    || {
                        verifier
                            .verify(&leaf_der, std::slice::from_ref(&inter), UnixTime::now())
                            .unwrap()
                    },
                    |_| black_box(verifier.identify(black_box(&leaf_der)).unwrap()),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();

    let (_, big) = identify.pop().unwrap();
    let snapshot = (**big.snapshot()).clone();
    let victims: Vec<Fingerprint> = snapshot.entries().take(4096).map(|(f, _)| *f).collect();
    let mut i = 0;
    c.bench_function("revoke_one/1000000", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % victims.len();
                (Allowlist::from_snapshot(snapshot.clone()), victims[i])
            },
            |(list, victim)| {
                let applied = list
                    .apply(Change::Delta {
                        version: None,
                        add: vec![],
                        remove: vec![victim],
                    })
                    .unwrap();
                assert_eq!(applied.removed.len(), 1);
                // Drop the list (and the old snapshot) outside the measurement.
                list
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group! {
    name = verifier;
    config = Criterion::default().sample_size(30);
    targets = benches
}
criterion_main!(verifier);
