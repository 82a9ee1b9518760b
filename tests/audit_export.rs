//! `tether-control audit export` and `tether audit verify` with the real binaries, on a
//! control that `serve`s: an intact log verifies; editing, deleting or swapping rows in
//! the database, cutting its tail before the last checkpoint, a forged checkpoint
//! signature and a checkpoint signed under another CA each make verify exit 1 naming the
//! entry or checkpoint at fault. Tampering goes through SQLite directly, the append-only
//! triggers dropped first, as someone with write access to the database would.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::bin;
use common::control::{control, Fleet};
use sqlx::Connection;
use tether_audit::export::ExportLine;

/// A fleet with a longer log: init, two registrations, three tokens, a checkpoint, two
/// more tokens, another checkpoint, one more token (after the last checkpoint).
fn fleet() -> Fleet {
    let f = Fleet::new();
    for _ in 0..3 {
        f.token("app-1");
    }
    checkpoint(&f);
    f.token("app-2");
    f.token("app-2");
    checkpoint(&f);
    f.token("app-1");
    f
}

fn data(f: &Fleet) -> &str {
    f.data.to_str().unwrap()
}

fn checkpoint(f: &Fleet) -> String {
    control(&["audit", "checkpoint", "--data-dir", data(f)])
}

/// The seqs of every entry, from `tether-control audit list`.
fn seqs(f: &Fleet) -> Vec<i64> {
    control(&["audit", "list", "--data-dir", data(f), "--limit", "1000"])
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect()
}

/// The export file's lines, parsed.
fn export(f: &Fleet) -> (PathBuf, Vec<ExportLine>) {
    let out = f.data.parent().unwrap().join("audit.jsonl");
    let said = control(&[
        "audit",
        "export",
        "--data-dir",
        data(f),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(said.starts_with("exported "), "{said}");
    let lines = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| ExportLine::parse(l.as_bytes()).unwrap())
        .collect();
    (out, lines)
}

fn write_lines(path: &Path, lines: &[ExportLine]) {
    let text: String = lines.iter().map(|l| l.to_json() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

/// The seqs of the checkpoints in an export.
fn checkpoint_seqs(lines: &[ExportLine]) -> Vec<i64> {
    lines
        .iter()
        .filter_map(|l| match l {
            ExportLine::Checkpoint(c) => Some(c.seq),
            _ => None,
        })
        .collect()
}

fn tether(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(bin("tether"));
    cmd.args(args).env_remove("RUST_BACKTRACE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// `tether audit verify FILE --ca ROOT`: `Ok(stdout)` on exit 0, `Err(stderr)` on exit 1.
fn verify(file: &Path, root: &Path) -> Result<String, String> {
    let out = tether(
        &[
            "audit",
            "verify",
            file.to_str().unwrap(),
            "--ca",
            root.to_str().unwrap(),
        ],
        &[],
    );
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match out.status.code() {
        Some(0) => Ok(text(&out.stdout)),
        Some(1) => Err(text(&out.stderr)),
        other => panic!(
            "tether audit verify exited {other:?}: {}",
            text(&out.stderr)
        ),
    }
}

/// Run `sql` on control's database, its audit triggers dropped first.
async fn tamper(f: &Fleet, sql: &[&str]) {
    let url = format!("sqlite://{}", f.data.join("control.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    for q in [
        "DROP TRIGGER IF EXISTS audit_log_no_update",
        "DROP TRIGGER IF EXISTS audit_log_no_delete",
    ]
    .iter()
    .chain(sql)
    {
        sqlx::query(q).execute(&mut conn).await.unwrap();
    }
    conn.close().await.unwrap();
}

/// Export, then verify with the fleet's root; the error text.
fn export_fails(f: &Fleet) -> String {
    let (file, _) = export(f);
    verify(&file, &f.root).expect_err("the tampered export must not verify")
}

#[tokio::test]
async fn an_intact_export_verifies_and_serve_writes_checkpoints() {
    let f = Fleet::with_config("[audit]\ncheckpoint_every = \"1h\"\n");
    // serve signs one checkpoint as it starts (the log is not empty).
    let mut signed = false;
    for _ in 0..250 {
        signed = f
            .control
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("audit checkpoint signed"));
        if signed {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(signed, "serve signs a checkpoint at start");
    f.token("app-1");
    assert!(checkpoint(&f).starts_with("checkpoint signed: entry "));
    assert!(checkpoint(&f).starts_with("no entry newer than the last checkpoint"));

    let all = seqs(&f);
    let (file, lines) = export(&f);
    assert!(matches!(&lines[0], ExportLine::Header(h) if h.trust_domain == common::TRUST_DOMAIN));
    let cps = checkpoint_seqs(&lines);
    assert_eq!(cps.len(), 2);
    assert_eq!(cps.last(), all.last());
    let ok = verify(&file, &f.root).unwrap();
    assert!(
        ok.starts_with(&format!("ok: {} entries, 2 checkpoints, head ", all.len())),
        "{ok}"
    );

    // The root by default: $TETHER_CONFIG_DIR/ca.pem.
    let config = f.data.parent().unwrap().join("cli");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::copy(&f.root, config.join("ca.pem")).unwrap();
    let out = tether(
        &["audit", "verify", file.to_str().unwrap()],
        &[("TETHER_CONFIG_DIR", &config)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No root at all: a clear refusal, not a root taken from the file.
    let empty = f.data.parent().unwrap().join("no-cli");
    let out = tether(
        &["audit", "verify", file.to_str().unwrap()],
        &[("TETHER_CONFIG_DIR", &empty)],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the root certificate") && err.contains("--ca"),
        "{err}"
    );
}

#[tokio::test]
async fn an_edited_row_fails_verify_at_that_entry() {
    let f = fleet();
    tamper(
        &f,
        &["UPDATE audit_log SET outcome = 'refused', details = '{\"code\":\"x\"}' WHERE seq = 4"],
    )
    .await;
    let err = export_fails(&f);
    assert!(
        err.contains("audit entry 4: the hash does not match"),
        "{err}"
    );
    assert!(err.contains("first bad entry: 4"), "{err}");
}

#[tokio::test]
async fn a_deleted_row_fails_verify_at_that_entry() {
    let f = fleet();
    tamper(&f, &["DELETE FROM audit_log WHERE seq = 5"]).await;
    let err = export_fails(&f);
    assert!(
        err.contains("audit entry 5 expected, found entry 6"),
        "{err}"
    );
    assert!(err.contains("first bad entry: 5"), "{err}");
}

#[tokio::test]
async fn swapped_rows_fail_verify_at_the_first() {
    let f = fleet();
    tamper(
        &f,
        &[
            "UPDATE audit_log SET seq = -4 WHERE seq = 4",
            "UPDATE audit_log SET seq = 4 WHERE seq = 5",
            "UPDATE audit_log SET seq = 5 WHERE seq = -4",
        ],
    )
    .await;
    let err = export_fails(&f);
    assert!(err.contains("first bad entry: 4"), "{err}");
}

#[tokio::test]
async fn a_tail_cut_before_the_last_checkpoint_fails_verify() {
    let f = fleet();
    let (_, lines) = export(&f);
    let last = *checkpoint_seqs(&lines).last().unwrap();
    let cut = format!("DELETE FROM audit_log WHERE seq >= {}", last - 1);
    tamper(&f, &[&cut]).await;
    let err = export_fails(&f);
    assert!(
        err.contains(&format!(
            "ends at entry {} but a checkpoint vouches for entry {last}",
            last - 2
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("first bad entry: {}", last - 1)),
        "{err}"
    );
}

#[tokio::test]
async fn a_forged_checkpoint_signature_fails_verify() {
    let f = fleet();
    let (file, mut lines) = export(&f);
    let first = checkpoint_seqs(&lines)[0];
    for l in &mut lines {
        if let ExportLine::Checkpoint(c) = l {
            if c.seq == first {
                // Vouch for another hash with the genuine signature.
                c.head_hash = "ab".repeat(32);
            }
        }
    }
    write_lines(&file, &lines);
    let err = verify(&file, &f.root).unwrap_err();
    assert!(
        err.contains(&format!(
            "checkpoint at entry {first}: the signature does not verify"
        )),
        "{err}"
    );
}

#[tokio::test]
async fn a_checkpoint_signed_under_another_ca_fails_verify() {
    let f = fleet();
    // Another control, same trust domain, its own CA.
    let other = f.data.parent().unwrap().join("other");
    control(&[
        "init",
        "--data-dir",
        other.to_str().unwrap(),
        "--trust-domain",
        common::TRUST_DOMAIN,
    ]);
    let other_ca = tether_control::domain::ca::Ca::load(
        &other,
        &tether_control::domain::ca::CaConfig {
            trust_domain: common::TRUST_DOMAIN.into(),
            ..Default::default()
        },
    )
    .unwrap();
    let signer = tether_control::domain::audit::checkpoint_signer(&other_ca).unwrap();
    let (file, mut lines) = export(&f);
    let last = *checkpoint_seqs(&lines).last().unwrap();
    for l in &mut lines {
        if let ExportLine::Checkpoint(c) = l {
            if c.seq == last {
                *c = signer.sign(c.seq, &c.head_hash, c.at).unwrap();
            }
        }
    }
    write_lines(&file, &lines);
    let err = verify(&file, &f.root).unwrap_err();
    assert!(
        err.contains(&format!(
            "checkpoint at entry {last}: the signer does not chain to the trusted root"
        )),
        "{err}"
    );
    // Checked against the other CA's root instead, the genuine checkpoints fail: only
    // the root given on the command line is trusted, never the one in the header.
    let err = verify(&file, &other.join("ca").join("root.pem")).unwrap_err();
    assert!(err.contains("does not chain to the trusted root"), "{err}");
}

/// `tether audit export --out FILE` as a logged-in operator fetches the same log over the
/// API (`GET /v1/audit`, role viewer), and `tether audit verify` accepts it with the root
/// `tether login` stored; a cut tail in the database shows in an API export too.
#[tokio::test]
async fn an_operator_exports_over_the_api_and_verifies_offline() {
    let f = fleet();
    let config = f.data.parent().unwrap().join("config-admin");
    let bundle = f.data.join("admin-bundle.json");
    let out = tether(
        &[
            "login",
            "--bundle",
            bundle.to_str().unwrap(),
            "--control",
            &f.url(),
        ],
        &[("TETHER_CONFIG_DIR", &config)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    checkpoint(&f);
    let file = f.data.parent().unwrap().join("api-export.jsonl");
    let exported = tether(
        &["audit", "export", "--out", file.to_str().unwrap()],
        &[("TETHER_CONFIG_DIR", &config)],
    );
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    // The root comes from the operator's config directory (written by `tether login`).
    let verified = tether(
        &["audit", "verify", file.to_str().unwrap()],
        &[("TETHER_CONFIG_DIR", &config)],
    );
    let said = String::from_utf8_lossy(&verified.stdout);
    assert_eq!(
        verified.status.code(),
        Some(0),
        "{said}{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(said.starts_with("ok: "), "{said}");
    // The same entries as the local export (which the API export may exceed by the
    // audit.list entries its own calls add).
    let (_, local) = export(&f);
    let api: Vec<ExportLine> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| ExportLine::parse(l.as_bytes()).unwrap())
        .collect();
    let entries = |lines: &[ExportLine]| {
        lines
            .iter()
            .filter(|l| matches!(l, ExportLine::Entry(_)))
            .count()
    };
    assert!(
        entries(&api) >= entries(&local) - 1,
        "api {} local {}",
        entries(&api),
        entries(&local)
    );
    assert!(!checkpoint_seqs(&api).is_empty());

    // Cut the tail under the last checkpoint: the API export no longer verifies.
    let last = *checkpoint_seqs(&api).last().unwrap();
    tamper(&f, &[&format!("DELETE FROM audit_log WHERE seq >= {last}")]).await;
    let exported = tether(
        &["audit", "export", "--out", file.to_str().unwrap()],
        &[("TETHER_CONFIG_DIR", &config)],
    );
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let verified = tether(
        &["audit", "verify", file.to_str().unwrap()],
        &[("TETHER_CONFIG_DIR", &config)],
    );
    assert_eq!(
        verified.status.code(),
        Some(1),
        "a cut tail verified: {}",
        String::from_utf8_lossy(&verified.stdout)
    );
}
