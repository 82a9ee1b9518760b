//! Attacks on the broker's handshake: every certificate that must not get a session is
//! presented to a real `tether-broker` process, and each refusal is checked three ways —
//! the TLS alert the client sees, the `reason` counted in
//! `tether_handshake_rejected_total`, and that no session appeared.

mod common;

use common::*;
use tether::pki::{KeyAlg, LeafSpec, Pki};
use time::{Duration as TDuration, OffsetDateTime};

/// Present `leaf`, expect the given alert, and the reason counted once.
async fn refused(
    setup: &Setup,
    broker: &BrokerProc,
    leaf: Option<&tether::pki::Leaf>,
    expect_alert: u8,
    reason: &str,
) {
    let sample = format!("tether_handshake_rejected_total{{reason=\"{reason}\"}}");
    let before = broker.metric(&sample).await;
    let end = try_session(&setup.pki, leaf, broker.quic).await;
    assert_eq!(end, Some(Ended::Alert(expect_alert)), "reason {reason}");
    let after = broker.wait_metric(&sample, before + 1.0).await;
    assert_eq!(after, before + 1.0, "reason {reason} counted once");
    assert!(broker.sessions().await.is_empty());
}

fn spec(id: &str) -> LeafSpec {
    LeafSpec::appliance(TRUST_DOMAIN, id)
}

#[tokio::test]
async fn pinned_appliance_is_admitted() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    let broker = setup.broker("b1", "");
    let conn = connect(&setup.pki, Some(&leaf), broker.quic).await.unwrap();
    let (_send, _recv, welcome) = hello(&conn).await.unwrap();
    assert_eq!(welcome.protocol_version, tether_proto::PROTOCOL_VERSION);
    let row = broker.wait_session("app-1").await;
    assert_eq!(row["fingerprint"], leaf.fingerprint_hex());
    assert_eq!(row["session_id"], welcome.session_id);
    assert!(row["connected_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(broker.metric("tether_handshakes_accepted_total").await, 1.0);
}

#[tokio::test]
async fn ed25519_appliance_is_admitted() {
    let setup = Setup::new();
    let mut s = spec("app-ed");
    s.key_alg = KeyAlg::Ed25519;
    let leaf = setup.pki.intermediate.issue(&s).unwrap();
    setup.set_allowlist(&[("app-ed", &leaf)]);
    let broker = setup.broker("b1", "");
    assert_eq!(
        try_session(&setup.pki, Some(&leaf), broker.quic).await,
        None
    );
}

#[tokio::test]
async fn every_forged_or_unpinned_certificate_is_refused() {
    let setup = Setup::new();
    let good = setup.pki.appliance("app-a").unwrap();
    // Certificates that would be fine but for one property each.
    let unpinned = setup.pki.appliance("app-a").unwrap();
    let other_pki = Pki::new("other.test").unwrap();
    let foreign = other_pki.appliance("app-a").unwrap();
    let mut s = spec("app-a");
    s.not_before = OffsetDateTime::now_utc() - TDuration::days(40);
    s.not_after = OffsetDateTime::now_utc() - TDuration::days(10);
    let expired = setup.pki.intermediate.issue(&s).unwrap();
    let mut s = spec("app-a");
    s.not_before = OffsetDateTime::now_utc() + TDuration::days(1);
    s.not_after = OffsetDateTime::now_utc() + TDuration::days(30);
    let not_yet = setup.pki.intermediate.issue(&s).unwrap();
    // Appliance B's certificate whose fingerprint the attacker managed to have recorded
    // for A (or: A's fingerprint list names a certificate for B).
    let names_b = setup.pki.appliance("app-b").unwrap();
    let mut s = spec("app-a");
    s.uris
        .push(format!("spiffe://{TRUST_DOMAIN}/appliance/app-c"));
    let two_uris = setup.pki.intermediate.issue(&s).unwrap();
    let mut s = spec("app-a");
    s.uris = vec!["spiffe://other.test/appliance/app-a".into()];
    let wrong_td = setup.pki.intermediate.issue(&s).unwrap();
    let mut s = spec("app-a");
    s.client_auth = false;
    s.server_auth = true;
    let wrong_eku = setup.pki.intermediate.issue(&s).unwrap();
    let mut s = spec("app-a");
    s.uris = vec![format!("spiffe://{TRUST_DOMAIN}/broker/app-a")];
    let broker_uri = setup.pki.intermediate.issue(&s).unwrap();
    let mut s = spec("app-a");
    s.uris = vec![];
    s.dns_names = vec!["app-a.example".into()];
    let no_uri = setup.pki.intermediate.issue(&s).unwrap();

    // Pin every fingerprint that is not itself the point of the test, so that each
    // certificate fails exactly on the property it breaks.
    setup.set_allowlist(&[
        ("app-a", &good),
        ("app-a", &expired),
        ("app-a", &not_yet),
        ("app-a", &names_b),
        ("app-a", &two_uris),
        ("app-a", &wrong_td),
        ("app-a", &wrong_eku),
        ("app-a", &broker_uri),
        ("app-a", &no_uri),
        ("app-a", &foreign),
    ]);
    let broker = setup.broker("b1", "");

    // The control case passes.
    assert_eq!(
        try_session(&setup.pki, Some(&good), broker.quic).await,
        None
    );

    refused(
        &setup,
        &broker,
        Some(&unpinned),
        alert::CERTIFICATE_REVOKED,
        "unknown_fingerprint",
    )
    .await;
    refused(
        &setup,
        &broker,
        Some(&foreign),
        alert::UNKNOWN_CA,
        "unknown_issuer",
    )
    .await;
    refused(
        &setup,
        &broker,
        Some(&expired),
        alert::CERTIFICATE_EXPIRED,
        "expired",
    )
    .await;
    refused(
        &setup,
        &broker,
        Some(&not_yet),
        alert::CERTIFICATE_EXPIRED,
        "not_yet_valid",
    )
    .await;
    refused(
        &setup,
        &broker,
        None,
        alert::CERTIFICATE_REQUIRED,
        "no_client_certificate",
    )
    .await;
    refused(
        &setup,
        &broker,
        Some(&names_b),
        alert::ACCESS_DENIED,
        "fingerprint_for_other_appliance",
    )
    .await;
    refused(
        &setup,
        &broker,
        Some(&two_uris),
        alert::BAD_CERTIFICATE,
        "multiple_san_uris",
    )
    .await;
    refused(
        &setup,
        &broker,
        Some(&wrong_td),
        alert::BAD_CERTIFICATE,
        "wrong_trust_domain",
    )
    .await;
    refused(
        &setup,
        &broker,
        Some(&wrong_eku),
        alert::UNSUPPORTED_CERTIFICATE,
        "wrong_eku",
    )
    .await;
    refused(
        &setup,
        &broker,
        Some(&broker_uri),
        alert::BAD_CERTIFICATE,
        "not_appliance",
    )
    .await;
    refused(
        &setup,
        &broker,
        Some(&no_uri),
        alert::BAD_CERTIFICATE,
        "no_san_uri",
    )
    .await;

    // The refusals were logged with their reason.
    assert!(broker.log_contains("fingerprint_for_other_appliance"));
    // And the broker still serves the good appliance.
    assert_eq!(
        try_session(&setup.pki, Some(&good), broker.quic).await,
        None
    );
}

#[tokio::test]
async fn appliance_cannot_present_as_another() {
    // Fingerprint recorded only for A; the certificate names B. Even with B pinned to a
    // different certificate, A's pin never admits a certificate naming B.
    let setup = Setup::new();
    let a = setup.pki.appliance("app-a").unwrap();
    let b_real = setup.pki.appliance("app-b").unwrap();
    let mut s = spec("app-b");
    s.common_name = "app-a".into();
    let b_forged = setup.pki.intermediate.issue(&s).unwrap();
    setup.set_allowlist(&[("app-a", &a), ("app-a", &b_forged), ("app-b", &b_real)]);
    let broker = setup.broker("b1", "");
    refused(
        &setup,
        &broker,
        Some(&b_forged),
        alert::ACCESS_DENIED,
        "fingerprint_for_other_appliance",
    )
    .await;
    assert_eq!(
        try_session(&setup.pki, Some(&b_real), broker.quic).await,
        None
    );
}

#[tokio::test]
async fn dot_dot_is_no_appliance_even_when_listed() {
    // docs/PROTOCOL.md §1.1: an id of `.` or `..` is refused with `bad_certificate`. Its
    // fingerprint pinned under a valid id does not help: the identity check comes first.
    let setup = Setup::new();
    let good = setup.pki.appliance("app-a").unwrap();
    let dots = setup.pki.intermediate.issue(&spec("..")).unwrap();
    let dot = setup.pki.intermediate.issue(&spec(".")).unwrap();
    setup.set_allowlist(&[("app-a", &good), ("app-a", &dots), ("app-a", &dot)]);
    let broker = setup.broker("b1", "");
    for leaf in [&dots, &dot] {
        refused(
            &setup,
            &broker,
            Some(leaf),
            alert::BAD_CERTIFICATE,
            "not_appliance",
        )
        .await;
    }
    // Listed under `..` itself: the file is refused whole, naming the line and the rule,
    // and the broker keeps enforcing the last good list.
    setup.set_allowlist(&[("app-a", &good), ("..", &dots)]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !broker.log_contains("must not be `.` or `..`") {
        assert!(
            std::time::Instant::now() < deadline,
            "the reload was not refused"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    refused(
        &setup,
        &broker,
        Some(&dots),
        alert::BAD_CERTIFICATE,
        "not_appliance",
    )
    .await;
    assert_eq!(
        try_session(&setup.pki, Some(&good), broker.quic).await,
        None
    );
}

// ---- Verified intermediates (broker/src/verifier.rs, "Verified intermediates") ----
//
// A broker whose bundle holds only the root remembers the intermediate of the first chain
// that verified through it, and later checks one signature instead of two. These tests
// try to make that memory admit what the full path would refuse: a leaf the intermediate
// did not sign, a look-alike intermediate, an intermediate outside its validity window,
// a chain that never went through the intermediate. Each verdict is compared with a
// verifier that has learned nothing.

mod verified_intermediates {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, UnixTime};
    use tether::pki::{Leaf, LeafSpec, Pki};
    use tether_broker::allowlist::{Allowlist, ApplianceId, Change, Entry, Fingerprint};
    use tether_broker::metrics::Metrics;
    use tether_broker::verifier::{ApplianceVerifier, MAX_VERIFIED_INTERMEDIATES};
    use time::{Duration as TDuration, OffsetDateTime};

    use super::common::TRUST_DOMAIN;

    /// A verifier trusting only `pki`'s root, with every `(id, leaf)` pinned.
    fn root_only(pki: &Pki, pinned: &[(&str, &Leaf)]) -> ApplianceVerifier {
        let list = Allowlist::new();
        list.apply(Change::Replace {
            version: None,
            entries: pinned
                .iter()
                .map(|(id, leaf)| Entry {
                    appliance: ApplianceId::new(id).unwrap(),
                    fingerprint: Fingerprint::of(&leaf.cert_der),
                })
                .collect(),
        })
        .unwrap();
        ApplianceVerifier::new(
            &[pki.root.rustls_cert()],
            TRUST_DOMAIN,
            Arc::new(list),
            Arc::new(Metrics::new()),
            tether_broker::tls::provider(),
        )
        .unwrap()
    }

    fn at(t: OffsetDateTime) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            t.unix_timestamp().try_into().unwrap(),
        ))
    }

    /// The verdict on `leaf` presenting `chain`, as a label.
    fn verdict(
        v: &ApplianceVerifier,
        leaf: &Leaf,
        chain: &[CertificateDer<'static>],
        now: UnixTime,
    ) -> &'static str {
        match v.verify(&leaf.rustls_cert(), chain, now) {
            Ok(_) => "admitted",
            Err(r) => r.label(),
        }
    }

    fn spec(id: &str) -> LeafSpec {
        LeafSpec::appliance(TRUST_DOMAIN, id)
    }

    #[test]
    fn a_learned_intermediate_refuses_everything_the_full_path_refuses() {
        let pki = Pki::new(TRUST_DOMAIN).unwrap();
        let x = pki.intermediate.rustls_cert();
        let now = OffsetDateTime::now_utc();
        // A genuine leaf valid for five years: it outlives the intermediate (two years).
        let mut s = spec("app-a");
        s.not_before = now - TDuration::days(2);
        s.not_after = now + TDuration::days(5 * 365);
        let good = pki.intermediate.issue(&s).unwrap();
        // A look-alike: another root with an intermediate of the same name, signing a
        // leaf for the same appliance.
        let evil = Pki::new(TRUST_DOMAIN).unwrap();
        let evil_x = evil
            .root
            .new_intermediate(pki.intermediate.common_name())
            .unwrap();
        let forged = evil_x.issue(&spec("app-a")).unwrap();
        // The attacker's fingerprints are even pinned: only the chain may stop them.
        let pinned = [("app-a", &good), ("app-a", &forged)];
        let learned = root_only(&pki, &pinned);
        assert_eq!(learned.verified_intermediates(), 0);
        assert_eq!(
            verdict(&learned, &good, std::slice::from_ref(&x), at(now)),
            "admitted"
        );
        assert_eq!(
            learned.verified_intermediates(),
            1,
            "the intermediate is kept"
        );

        let attempts: Vec<(&str, &Leaf, Vec<CertificateDer<'static>>, OffsetDateTime)> = vec![
            // The forged leaf presenting our intermediate's exact bytes.
            (
                "forged leaf, genuine intermediate",
                &forged,
                vec![x.clone()],
                now,
            ),
            // The forged leaf with its look-alike intermediate.
            (
                "forged leaf, look-alike intermediate",
                &forged,
                vec![evil_x.rustls_cert()],
                now,
            ),
            // Our leaf after the intermediate expired (the leaf itself is still valid).
            (
                "intermediate expired",
                &good,
                vec![x.clone()],
                now + TDuration::days(3 * 365),
            ),
            // Our leaf before the intermediate's notBefore (the leaf is already valid).
            (
                "intermediate not yet valid",
                &good,
                vec![x.clone()],
                now - TDuration::days(1),
            ),
            // No intermediate at all.
            ("no intermediate", &good, vec![], now),
        ];
        for (what, leaf, chain, t) in &attempts {
            let fresh = root_only(&pki, &pinned);
            let expected = verdict(&fresh, leaf, chain, at(*t));
            assert_ne!(expected, "admitted", "{what}: the full path refuses it");
            assert_eq!(verdict(&learned, leaf, chain, at(*t)), expected, "{what}");
        }
        // The refusals taught it nothing new, and the genuine chain still works.
        assert_eq!(learned.verified_intermediates(), 1);
        assert_eq!(
            verdict(&learned, &good, std::slice::from_ref(&x), at(now)),
            "admitted"
        );
    }

    #[test]
    fn a_chain_that_did_not_go_through_the_intermediate_teaches_nothing() {
        let pki = Pki::new(TRUST_DOMAIN).unwrap();
        // Signed by the root itself, but presenting the intermediate anyway: webpki builds
        // leaf → root, so the intermediate's signature was never checked.
        let by_root = pki.root.issue(&spec("app-r")).unwrap();
        let v = root_only(&pki, &[("app-r", &by_root)]);
        let x = pki.intermediate.rustls_cert();
        let now = at(OffsetDateTime::now_utc());
        assert_eq!(
            verdict(&v, &by_root, std::slice::from_ref(&x), now),
            "admitted"
        );
        assert_eq!(v.verified_intermediates(), 0);
        // A bundle that already trusts the intermediate has nothing to learn either.
        let good = pki.appliance("app-a").unwrap();
        let list = Allowlist::new();
        list.apply(Change::Replace {
            version: None,
            entries: vec![Entry {
                appliance: ApplianceId::new("app-a").unwrap(),
                fingerprint: Fingerprint::of(&good.cert_der),
            }],
        })
        .unwrap();
        let both = ApplianceVerifier::new(
            &[pki.root.rustls_cert(), x.clone()],
            TRUST_DOMAIN,
            Arc::new(list),
            Arc::new(Metrics::new()),
            tether_broker::tls::provider(),
        )
        .unwrap();
        assert_eq!(
            verdict(&both, &good, std::slice::from_ref(&x), now),
            "admitted"
        );
        assert_eq!(both.verified_intermediates(), 0);
    }

    #[test]
    fn at_most_a_few_intermediates_are_kept_and_each_still_verifies() {
        let pki = Pki::new(TRUST_DOMAIN).unwrap();
        let xs: Vec<_> = (0..MAX_VERIFIED_INTERMEDIATES + 2)
            .map(|i| {
                pki.root
                    .new_intermediate(&format!("Tether Int {i}"))
                    .unwrap()
            })
            .collect();
        let leaves: Vec<_> = xs
            .iter()
            .enumerate()
            .map(|(i, x)| x.issue(&spec(&format!("app-{i}"))).unwrap())
            .collect();
        let ids: Vec<String> = (0..leaves.len()).map(|i| format!("app-{i}")).collect();
        let pinned: Vec<(&str, &Leaf)> = ids.iter().map(|s| s.as_str()).zip(&leaves).collect();
        let v = root_only(&pki, &pinned);
        let now = at(OffsetDateTime::now_utc());
        for _ in 0..2 {
            for (x, leaf) in xs.iter().zip(&leaves) {
                assert_eq!(verdict(&v, leaf, &[x.rustls_cert()], now), "admitted");
                assert!(v.verified_intermediates() <= MAX_VERIFIED_INTERMEDIATES);
            }
        }
        assert_eq!(v.verified_intermediates(), MAX_VERIFIED_INTERMEDIATES);
    }
}

/// The handshake leaves step 2's answer for the check after it (broker/src/verifier.rs,
/// "The identity handed from the handshake to the session"): that must never admit what
/// a fresh check would refuse.
mod handed_off_identity {
    use std::sync::Arc;

    use rustls::pki_types::UnixTime;
    use tether::pki::Pki;
    use tether_broker::allowlist::{Allowlist, ApplianceId, Change, Entry, Fingerprint};
    use tether_broker::metrics::Metrics;
    use tether_broker::verifier::ApplianceVerifier;

    use super::common::TRUST_DOMAIN;

    #[test]
    fn a_revocation_between_handshake_and_session_still_refuses() {
        let pki = Pki::new(TRUST_DOMAIN).unwrap();
        let leaf = pki.appliance("app-1").unwrap();
        let fp = Fingerprint::of(&leaf.cert_der);
        let list = Arc::new(Allowlist::new());
        list.apply(Change::Replace {
            version: None,
            entries: vec![Entry {
                appliance: ApplianceId::new("app-1").unwrap(),
                fingerprint: fp,
            }],
        })
        .unwrap();
        let v = ApplianceVerifier::new(
            &[pki.root.rustls_cert()],
            TRUST_DOMAIN,
            list.clone(),
            Arc::new(Metrics::new()),
            tether_broker::tls::provider(),
        )
        .unwrap();
        let chain = [pki.intermediate.rustls_cert()];
        // Admitted in the handshake, then revoked before the session starts.
        v.verify(&leaf.rustls_cert(), &chain, UnixTime::now())
            .expect("admitted in the handshake");
        list.apply(Change::Delta {
            version: None,
            add: vec![],
            remove: vec![fp],
        })
        .unwrap();
        let after = v.identify(&leaf.rustls_cert()).unwrap_err();
        assert_eq!(after.label(), "unknown_fingerprint");

        // Pinned again to another appliance (a re-issue gone wrong, or an attacker's
        // allowlist edit): the handed-off identity (app-1) does not match the pin.
        v.verify(&leaf.rustls_cert(), &chain, UnixTime::now())
            .unwrap_err();
        list.apply(Change::Replace {
            version: None,
            entries: vec![Entry {
                appliance: ApplianceId::new("app-1").unwrap(),
                fingerprint: fp,
            }],
        })
        .unwrap();
        v.verify(&leaf.rustls_cert(), &chain, UnixTime::now())
            .expect("admitted in the handshake");
        list.apply(Change::Replace {
            version: None,
            entries: vec![Entry {
                appliance: ApplianceId::new("app-2").unwrap(),
                fingerprint: fp,
            }],
        })
        .unwrap();
        let after = v.identify(&leaf.rustls_cert()).unwrap_err();
        assert_eq!(after.label(), "fingerprint_for_other_appliance");
    }

    #[test]
    fn an_answer_left_for_one_certificate_never_serves_another() {
        let pki = Pki::new(TRUST_DOMAIN).unwrap();
        let a = pki.appliance("app-a").unwrap();
        // Same id, another key: a certificate nobody pinned.
        let b = pki.appliance("app-a").unwrap();
        let list = Arc::new(Allowlist::new());
        list.apply(Change::Replace {
            version: None,
            entries: vec![Entry {
                appliance: ApplianceId::new("app-a").unwrap(),
                fingerprint: Fingerprint::of(&a.cert_der),
            }],
        })
        .unwrap();
        let v = ApplianceVerifier::new(
            &[pki.root.rustls_cert()],
            TRUST_DOMAIN,
            list,
            Arc::new(Metrics::new()),
            tether_broker::tls::provider(),
        )
        .unwrap();
        v.verify(
            &a.rustls_cert(),
            &[pki.intermediate.rustls_cert()],
            UnixTime::now(),
        )
        .unwrap();
        assert_eq!(
            v.identify(&b.rustls_cert()).unwrap_err().label(),
            "unknown_fingerprint"
        );
        assert!(v.identify(&a.rustls_cert()).is_ok());
    }
}
