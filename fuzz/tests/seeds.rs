//! The seed corpus of the targets added for issue 19 (`corpus/<target>/`), made from real,
//! valid inputs: tokens and a JWKS of the fixed key, CSRs, a signed audit export, cluster
//! frames, config files. Each seed is checked to pass the production parser it is for.
//!
//! `scripts/fuzz seeds` (which runs this test with the targets' build, setting
//! `TETHER_WRITE_FUZZ_SEEDS=1`) writes them and `fixtures/audit-root.pem` (a new root
//! each time: commit both together); without the variable it only checks that they can be
//! made. A plain `cargo test --test seeds` in `fuzz/` works too, with a build of its own.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tether_api::enroll::AwsProof;
use tether_audit::checkpoint::{pem_certs, CheckpointSigner, CheckpointVerifier};
use tether_audit::entry::{Actor, AuditEntry, AuditEvent};
use tether_audit::export::{verify_export, ExportHeader, ExportLine, ExportVerifier};
use tether_audit::hash::{canonical_json, entry_hash, GENESIS_HASH};
use tether_fuzz::jwt::{self, NOW, SIGNER};
use tether_proto::cluster::{self, ReplicaAddr, SessionReport, ToBroker, ToControl};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer as _;

// Built with the targets' flags, this test's code calls libFuzzer's coverage hooks, so
// libFuzzer's runtime is linked, and it wants a target to call.
#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|_data: &[u8]| {});

/// Collects seeds and writes them when asked to.
struct Seeds {
    write: bool,
    root: PathBuf,
}

impl Seeds {
    fn new() -> Seeds {
        Seeds {
            write: std::env::var_os("TETHER_WRITE_FUZZ_SEEDS").is_some_and(|v| v == "1"),
            root: Path::new(env!("CARGO_MANIFEST_DIR")).to_owned(),
        }
    }

    fn put(&self, target: &str, name: &str, bytes: impl AsRef<[u8]>) {
        if !self.write {
            return;
        }
        let dir = self.root.join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    fn fixture(&self, name: &str, text: &str) {
        if self.write {
            std::fs::write(self.root.join("fixtures").join(name), text).unwrap();
        }
    }
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn jwt_seeds(s: &Seeds) {
    let header = jwt::header();
    let gcp = SIGNER.sign(header.as_bytes(), jwt::gcp_claims().as_bytes());
    let k8s = SIGNER.sign(header.as_bytes(), jwt::k8s_claims().as_bytes());
    let rt = jwt::runtime();
    let file = std::env::temp_dir().join(format!("tether-seeds-{}-jwks.json", std::process::id()));
    std::fs::write(&file, SIGNER.jwks()).unwrap();
    let gcp_verifier = jwt::gcp_verifier(&file);
    let k8s_verifier = jwt::k8s_verifier(&file);
    let v = rt.block_on(gcp_verifier.verify(
        &gcp,
        jwt::NONCE,
        jwt::GCP_PROJECT,
        jwt::GCP_SERVICE_ACCOUNT,
        NOW,
    ));
    assert!(v.is_ok(), "{v:?}");
    let v = rt.block_on(k8s_verifier.verify(
        &k8s,
        jwt::K8S_ISSUER,
        jwt::K8S_NAMESPACE,
        jwt::K8S_SERVICE_ACCOUNT,
        NOW,
    ));
    assert!(v.is_ok(), "{v:?}");

    s.put("jwt", "raw-gcp", cat(&[b"\x00", gcp.as_bytes()]));
    s.put("jwt", "raw-k8s", cat(&[b"\x00", k8s.as_bytes()]));
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(jwt::gcp_claims())
    );
    s.put("jwt", "raw-alg-none", cat(&[b"\x00", none.as_bytes()]));
    s.put(
        "jwt",
        "signed-gcp",
        cat(&[
            b"\x01",
            header.as_bytes(),
            b"\x00",
            jwt::gcp_claims().as_bytes(),
        ]),
    );
    s.put(
        "jwt",
        "signed-k8s",
        cat(&[
            b"\x01",
            header.as_bytes(),
            b"\x00",
            jwt::k8s_claims().as_bytes(),
        ]),
    );

    // JWKS: the key alone; among others (a second RSA key, an EC key, an encryption key).
    let jwks = SIGNER.jwks();
    s.put("jwks", "one-key.json", &jwks);
    let mut doc: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let ours = doc["keys"][0].clone();
    let keys = doc["keys"].as_array_mut().unwrap();
    let mut enc = ours.clone();
    enc["kid"] = "enc-1".into();
    enc["use"] = "enc".into();
    keys.insert(0, enc);
    keys.insert(
        0,
        serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}),
    );
    s.put("jwks", "mixed.json", doc.to_string());
    for seed in [jwks, doc.to_string()] {
        std::fs::write(&file, seed).unwrap();
        let v = rt.block_on(jwt::gcp_verifier(&file).verify(
            &gcp,
            jwt::NONCE,
            jwt::GCP_PROJECT,
            jwt::GCP_SERVICE_ACCOUNT,
            NOW,
        ));
        assert!(v.is_ok(), "{v:?}");
    }
    std::fs::remove_file(&file).unwrap();
}

fn aws_seeds(s: &Seeds) {
    let verifier = tether_fuzz::aws::verifier();
    let sig = "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
    let proof = |url: &str, host: &str, region: &str, token: bool| {
        let mut signed = vec!["content-type", "host", "x-amz-date"];
        let mut headers = vec![
            (
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8".to_owned(),
            ),
            ("Host", host.to_owned()),
            ("X-Amz-Date", "20260921T120000Z".to_owned()),
            ("X-Tether-Nonce", tether_fuzz::aws::NONCE.to_owned()),
        ];
        if token {
            signed.push("x-amz-security-token");
            headers.push((
                "X-Amz-Security-Token",
                "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ".to_owned(),
            ));
        }
        signed.push("x-tether-nonce");
        headers.push((
            "Authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential=ASIAEXAMPLEKEY123456/20260921/{region}/sts/aws4_request, \
                 SignedHeaders={}, Signature={sig}",
                signed.join(";")
            ),
        ));
        AwsProof {
            method: "POST".into(),
            url: url.into(),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            body: "Action=GetCallerIdentity&Version=2011-06-15".into(),
        }
    };
    for (name, p) in [
        (
            "global.json",
            proof(
                "https://sts.amazonaws.com/",
                "sts.amazonaws.com",
                "us-east-1",
                true,
            ),
        ),
        (
            "regional.json",
            proof(
                "https://sts.eu-west-1.amazonaws.com/",
                "sts.eu-west-1.amazonaws.com",
                "eu-west-1",
                false,
            ),
        ),
        (
            "emulator.json",
            proof(
                "http://127.0.0.1:5000/",
                "127.0.0.1:5000",
                "us-east-1",
                true,
            ),
        ),
    ] {
        let v = verifier.check_offline(&p, tether_fuzz::aws::NONCE, NOW);
        assert!(v.is_ok(), "{name}: {v:?}");
        s.put("aws_proof", name, serde_json::to_string_pretty(&p).unwrap());
    }

    let answer = r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:sts::123456789012:assumed-role/tether-appliance/i-0abc123def4567890</Arn>
    <UserId>AROA3XFRBF535PLBIFPI4:i-0abc123def4567890</UserId>
    <Account>123456789012</Account>
  </GetCallerIdentityResult>
  <ResponseMetadata>
    <RequestId>01234567-89ab-cdef-0123-456789abcdef</RequestId>
  </ResponseMetadata>
</GetCallerIdentityResponse>
"#;
    let arn = tether_control::domain::proof::aws::caller_arn(answer).unwrap();
    assert!(tether_control::domain::proof::aws::normalise_assumed_role(&arn).is_some());
    s.put("sts_xml", "assumed-role.xml", answer);
    let user = answer
        .replace(
            "arn:aws:sts::123456789012:assumed-role/tether-appliance/i-0abc123def4567890",
            "arn:aws:iam::123456789012:user/alice",
        )
        .replace(
            "AROA3XFRBF535PLBIFPI4:i-0abc123def4567890",
            "AIDACKCEVSQ6C2EXAMPLE",
        );
    tether_control::domain::proof::aws::caller_arn(&user).unwrap();
    s.put("sts_xml", "iam-user.xml", user);
    let error = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error>
    <Type>Sender</Type>
    <Code>SignatureDoesNotMatch</Code>
    <Message>The request signature we calculated does not match the signature you provided.</Message>
  </Error>
  <RequestId>fedcba98-7654-3210-fedc-ba9876543210</RequestId>
</ErrorResponse>
"#;
    assert!(tether_control::domain::proof::aws::sts_error(error).is_some());
    s.put("sts_xml", "error.xml", error);
}

fn csr_seeds(s: &Seeds) {
    use tether_control::domain::ca::csr::{verify_csr, verify_csr_der};
    let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let req = CertificateParams::new(vec!["edge-01".to_owned()])
        .unwrap()
        .serialize_request(&p256)
        .unwrap();
    let pem = req.pem().unwrap();
    verify_csr(&pem).unwrap();
    s.put("csr", "p256.pem", cat(&[b"\x00", pem.as_bytes()]));
    verify_csr_der(req.der()).unwrap();
    s.put("csr", "p256.der", cat(&[b"\x01", req.der()]));

    let ed = KeyPair::try_from(&tether_fuzz::csr::pkcs8()[..]).unwrap();
    let req = CertificateParams::new(vec!["edge-02".to_owned()])
        .unwrap()
        .serialize_request(&ed)
        .unwrap();
    let der: &[u8] = req.der();
    verify_csr_der(der).unwrap();
    s.put("csr", "ed25519.der", cat(&[b"\x01", der]));
    let (_, parsed) = X509CertificationRequest::from_der(der).unwrap();
    let info = parsed.certification_request_info.raw;
    let resigned = tether_fuzz::csr::sign_request(&tether_fuzz::csr::key(), info);
    assert_eq!(
        resigned, der,
        "the target wraps a request body as rcgen does"
    );
    s.put("csr", "ed25519-info.der", cat(&[b"\x02", info]));
}

fn audit_seeds(s: &Seeds) {
    use tether_fuzz::audit::TRUST_DOMAIN;
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.distinguished_name
        .push(DnType::CommonName, "Tether fuzz root");
    root.distinguished_name
        .push(DnType::OrganizationalUnitName, TRUST_DOMAIN);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root.not_before = rcgen::date_time_ymd(2020, 1, 1);
    root.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let root_pem = root.self_signed(&root_key).unwrap().pem();
    let issuer = Issuer::new(root, &root_key);

    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "control");
    leaf.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{TRUST_DOMAIN}/control")
            .try_into()
            .unwrap(),
    )];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.not_before = rcgen::date_time_ymd(2021, 1, 1);
    leaf.not_after = rcgen::date_time_ymd(2098, 1, 1);
    let leaf_pem = leaf.signed_by(&leaf_key, &issuer).unwrap().pem();
    let signer = CheckpointSigner::new(&leaf_key.serialize_pem(), &leaf_pem).unwrap();

    let events = [
        AuditEvent::success(Actor::operator("alice"), "appliance.register", "edge-01").with(
            "aws_role",
            "arn:aws:iam::123456789012:role/tether-appliance",
        ),
        AuditEvent::success(Actor::appliance("edge-01"), "appliance.enroll", "edge-01")
            .with("proof", "aws")
            .with("key_sha256", "9f".repeat(32)),
        AuditEvent::refused(
            Actor::operator("mallory"),
            "operator.login",
            "mallory",
            "token_expired",
        ),
        AuditEvent::success(Actor::system("trust"), "appliance.renew", "edge-01")
            .with("not_after", 1_797_776_000)
            .with(
                "nested",
                serde_json::json!({"b": [1, -2, null, true], "a": "tab\there"}),
            ),
        AuditEvent::success(Actor::broker("broker-a"), "session.close", "edge-01")
            .with("reason", "revoked")
            .with("\u{e9}t\u{e9}", "\u{1f512}"),
    ];
    let mut lines = vec![ExportLine::Header(ExportHeader {
        tether_audit_export: 1,
        trust_domain: TRUST_DOMAIN.into(),
        root_pem: root_pem.clone(),
    })];
    let mut prev = GENESIS_HASH.to_owned();
    for (i, event) in events.iter().enumerate() {
        let seq = i as i64 + 1;
        let at = NOW + 60 * seq;
        let hash = entry_hash(seq, at, event, &prev).unwrap();
        lines.push(ExportLine::Entry(AuditEntry {
            seq,
            at,
            actor: event.actor.clone(),
            action: event.action.clone(),
            target: event.target.clone(),
            outcome: event.outcome,
            details: event.details.clone(),
            prev_hash: prev.clone(),
            hash: hash.clone(),
        }));
        if seq == 2 || seq == 5 {
            lines.push(ExportLine::Checkpoint(
                signer.sign(seq, &hash, at + 1).unwrap(),
            ));
        }
        s.put(
            "canonical_json",
            &format!("details-{seq}.json"),
            serde_json::to_string_pretty(&event.details).unwrap(),
        );
        prev = hash;
    }
    let text =
        |lines: &[ExportLine]| -> String { lines.iter().map(|l| l.to_json() + "\n").collect() };
    let roots = pem_certs(&root_pem).unwrap();
    let verify = |export: &str| {
        let v = ExportVerifier::new(CheckpointVerifier::new(&roots, TRUST_DOMAIN).unwrap());
        verify_export(export.as_bytes(), v)
    };
    let full = text(&lines);
    let summary = verify(&full).unwrap();
    assert_eq!((summary.entries, summary.checkpoints), (5, 2));
    s.put("audit_export", "full.jsonl", &full);
    // No header, cut after the first checkpoint.
    let short = text(&lines[1..4]);
    assert_eq!(verify(&short).unwrap().checkpoints, 1);
    s.put("audit_export", "short.jsonl", short);
    s.fixture("audit-root.pem", &root_pem);

    for (name, json) in [
        (
            "escapes.json",
            r#"{"s":"quote \" backslash \\ ctl \u0001\b\f\n\r\t del \u007f","k":[]}"#,
        ),
        (
            "order.json",
            r#"{"b":1,"a":{"z":[3,{"y":null,"x":false}],"\ud83d\ude00":0,"\ufb01":1,"":-9007199254740991}}"#,
        ),
        (
            "numbers.json",
            r#"[0,-0,1e2,2.0,9007199254740991,-9007199254740991]"#,
        ),
    ] {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        canonical_json(&v).unwrap();
        s.put("canonical_json", name, json);
    }
}

fn cluster_seeds(s: &Seeds) {
    use tether_broker::allowlist::Allowlist;
    use tether_broker::channel::{DigestLog, SyncState, SyncStep};
    let fp = |b: u8| format!("{b:02x}").repeat(32);
    let snapshot: Vec<(String, String)> =
        vec![("edge-01".into(), fp(0x11)), ("edge-02".into(), fp(0x22))];
    let snap_digest = "ab".repeat(32);
    let add = vec![("edge-03".to_owned(), fp(0x33))];
    let remove = vec![fp(0x22)];
    let delta_digest = cluster::allowlist_digest_hex(&snap_digest, 8, &add, &remove).unwrap();
    let to_broker = vec![
        ToBroker::Replicas {
            self_id: "control-a".into(),
            replicas: vec![ReplicaAddr {
                id: "control-b".into(),
                advertise: "control-b.example.net:8443".into(),
            }],
        },
        ToBroker::SnapshotBegin {
            version: 7,
            entries: 2,
        },
        ToBroker::SnapshotChunk { entries: snapshot },
        ToBroker::SnapshotEnd {
            version: 7,
            digest: snap_digest,
        },
        ToBroker::Synced {
            version: 7,
            accepts: vec![cluster::ACCEPTS_DRAINING.into()],
        },
        ToBroker::Delta {
            version: 8,
            add,
            remove,
            digest: delta_digest,
        },
        ToBroker::Renewals {
            generations: vec![("edge-01".into(), 2)],
        },
        ToBroker::Ping,
        ToBroker::GoingAway,
    ];
    // The broker's state machine takes the stream to version 8.
    let list = Allowlist::new();
    let mut log = DigestLog::default();
    let mut sync = SyncState::default();
    for msg in &to_broker {
        let current = list.snapshot().version();
        if let SyncStep::Apply(change) = sync.handle(msg.clone(), current, &log).unwrap() {
            list.apply(change).unwrap();
            sync.applied(&mut log);
        }
    }
    assert_eq!(list.snapshot().version(), 8);
    let frames = |msgs: &[ToBroker]| -> Vec<u8> {
        msgs.iter()
            .flat_map(|m| cluster::encode(m).unwrap())
            .collect()
    };
    s.put("cluster_frame", "to-broker-sync", frames(&to_broker));
    let report = SessionReport {
        appliance: "edge-01".into(),
        session_id: 41,
        fingerprint: fp(0x11),
        connected_at: 1_790_000_000,
        connected_at_ms: 1_790_000_000_250,
        cert_not_after: 1_797_776_000,
        agent_version: "0.1.0".into(),
        capabilities: vec!["exec".into()],
        transport: "quic".into(),
    };
    let to_control = vec![
        ToControl::Hello {
            name: "broker-a".into(),
            version: "0.1.0".into(),
            quic_addr: "203.0.113.7:7443".into(),
            allowlist_version: 7,
            allowlist_digest: "ab".repeat(32),
            sessions: vec![report.clone()],
            features: vec![cluster::FEATURE_TUNNEL.into()],
        },
        ToControl::Applied {
            version: 8,
            sessions_closed: 1,
        },
        ToControl::SessionUp(report),
        ToControl::SessionDown {
            appliance: "edge-01".into(),
            session_id: 41,
            reason: "revoked".into(),
        },
        ToControl::Draining,
        ToControl::Ping,
    ];
    let bytes: Vec<u8> = to_control
        .iter()
        .flat_map(|m| cluster::encode(m).unwrap())
        .collect();
    s.put("cluster_frame", "to-control", bytes);
}

fn config_seeds(s: &Seeds) {
    use std::path::Path;
    use tether_broker::config::Config;
    use tether_control::config::ControlConfig;
    let readme = std::fs::read_to_string(s.root.join("../README.md")).unwrap();
    let start = readme.find("## Running a standalone broker").unwrap();
    let block = &readme[start..];
    let block = &block[block.find("```toml\n").unwrap() + 8..];
    let block = &block[..block.find("```").unwrap()];
    let minimal = r#"listen = "127.0.0.1:7443"
admin_listen = "127.0.0.1:7444"
trust_domain = "example.test"

[tls]
ca = "ca.pem"
cert = "broker-a.pem"
key = "broker-a.key"

[allowlist]
file = "allowlist.txt"

[transport]
udp_recv_buffer = 4194304
"#;
    let control_mode = r#"listen = "0.0.0.0:7443"

[control]
data_dir = "/var/lib/tether-broker"
bundle = "/etc/tether/broker-a.bundle"
advertise = "broker-a.example.net:7443"

[limits]
max_concurrent_handshakes = 64
"#;
    for (name, text) in [
        ("readme.toml", block),
        ("minimal.toml", minimal),
        ("control-mode.toml", control_mode),
    ] {
        let cfg = Config::from_toml(text, Path::new("/etc/tether"), Path::new(name)).unwrap();
        cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        s.put("broker_config", name, text);
    }

    let init = ControlConfig {
        trust_domain: "example.test".into(),
        brokers: vec!["broker-a.example.net:7443".into()],
        ..ControlConfig::default()
    };
    let init_text = format!(
        "# Tether control configuration.\n{}",
        toml::to_string_pretty(&init).unwrap()
    );
    let proofs = r#"trust_domain = "example.test"
listen = "0.0.0.0:8443"
brokers = ["broker-a.example.net:7443", "[2001:db8::7]:7443"]
dns_names = ["control.example.net"]
ips = ["192.0.2.10"]
database_url = "postgres://tether@db.example.net/tether"

[proofs.aws]
sts_endpoints = ["https://sts.amazonaws.com", "https://sts.eu-west-1.amazonaws.com:443"]
timeout = "5s"

[proofs.gcp]
jwks_file = "/etc/tether/google-certs.json"
leeway = "1m"

[[proofs.k8s.clusters]]
issuer = "https://kubernetes.default.svc.cluster.local"
audience = "tether"
jwks_file = "/etc/tether/cluster-jwks.json"
"#;
    for (name, text) in [("init.toml", init_text.as_str()), ("proofs.toml", proofs)] {
        ControlConfig::parse(text, Path::new(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        s.put("control_config", name, text);
    }
}

#[test]
fn seeds() {
    let s = Seeds::new();
    jwt_seeds(&s);
    aws_seeds(&s);
    csr_seeds(&s);
    audit_seeds(&s);
    cluster_seeds(&s);
    config_seeds(&s);
}
