//! `tether-control audit archive` and `tether audit verify SEG... LIVE` with the real
//! binaries: archiving moves the oldest entries to segment files ending at signed
//! checkpoints and keeps the live log verifiable after them; the segments and the live
//! export verify end to end after more entries are written; overlapping archives are
//! refused; a changed or removed entry, segments given out of order and a missing middle
//! segment each make verify exit 1 naming the file and entry; `serve` with `[audit]
//! archive_dir` archives on its own.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::bin;
use common::control::{control, Fleet};
use tether_audit::export::ExportLine;

fn data(f: &Fleet) -> &str {
    f.data.to_str().unwrap()
}

fn dir(f: &Fleet) -> &Path {
    f.data.parent().unwrap()
}

/// `tether-control ARGS`: the output and whether it succeeded.
fn control_try(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("tether-control"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn archive(f: &Fleet, before: i64, name: &str) -> (bool, String) {
    let out = dir(f).join(name);
    control_try(&[
        "audit",
        "archive",
        "--data-dir",
        data(f),
        "--before",
        &before.to_string(),
        "--out",
        out.to_str().unwrap(),
    ])
}

fn export(f: &Fleet, name: &str) -> PathBuf {
    let out = dir(f).join(name);
    let said = control(&[
        "audit",
        "export",
        "--data-dir",
        data(f),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(said.starts_with("exported "), "{said}");
    out
}

fn read(path: &Path) -> Vec<ExportLine> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| ExportLine::parse(l.as_bytes()).unwrap())
        .collect()
}

fn write(path: &Path, lines: &[ExportLine]) {
    let text: String = lines.iter().map(|l| l.to_json() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

/// `tether audit verify FILES... --ca ROOT`: `Ok(stdout)` on exit 0, `Err(stderr)` on 1.
fn verify(f: &Fleet, files: &[&Path]) -> Result<String, String> {
    let mut args: Vec<String> = vec!["audit".into(), "verify".into()];
    args.extend(files.iter().map(|p| p.to_str().unwrap().to_owned()));
    args.extend(["--ca".into(), f.root.to_str().unwrap().to_owned()]);
    let out: Output = Command::new(bin("tether"))
        .args(&args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
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

/// A fleet with two archived segments (entries 1..=4, 5..=8) and a live log after them.
/// (init, two registrations, then tokens: 11 entries before archiving.)
fn archived_fleet() -> (Fleet, PathBuf, PathBuf) {
    let f = Fleet::new();
    for _ in 0..8 {
        f.token("app-1");
    }
    let (ok, said) = archive(&f, 5, "seg1.jsonl");
    assert!(ok, "{said}");
    assert!(said.contains("archived entries 1..=4"), "{said}");
    let (ok, said) = archive(&f, 9, "seg2.jsonl");
    assert!(ok, "{said}");
    assert!(said.contains("archived entries 5..=8"), "{said}");
    let (seg1, seg2) = (dir(&f).join("seg1.jsonl"), dir(&f).join("seg2.jsonl"));
    (f, seg1, seg2)
}

#[test]
fn archive_then_verify_segments_and_live_end_to_end() {
    let (f, seg1, seg2) = archived_fleet();
    // The live table starts after entry 8, gap-free, and ends with the two
    // `audit.archive` entries.
    let live_seqs = seqs(&f);
    let head = *live_seqs.last().unwrap();
    assert_eq!(live_seqs, (9..=head).collect::<Vec<_>>());
    let said = control(&["audit", "verify", "--data-dir", data(&f)]);
    assert!(said.contains("entries up to 8 are archived"), "{said}");
    assert!(
        said.contains(&format!(
            "audit log verified: {} entries, head {head}",
            head - 8
        )),
        "{said}"
    );
    // Each segment ends at a signed checkpoint; the second starts with the first's.
    let l2 = read(&seg2);
    assert!(
        matches!(&l2[1], ExportLine::Checkpoint(c) if c.seq == 4),
        "{:?}",
        l2[1]
    );
    assert!(matches!(l2.last(), Some(ExportLine::Checkpoint(c)) if c.seq == 8));
    // More entries after archiving, then the live export: all verify end to end.
    f.token("app-2");
    f.token("app-2");
    let live = export(&f, "live.jsonl");
    let ok = verify(&f, &[&seg1, &seg2, &live]).expect("archive + live verify");
    assert!(ok.contains("head"), "{ok}");
    assert!(ok.contains(&format!("(entry {})", head + 2)), "{ok}");
    // The first segment alone is a whole log from entry 1.
    verify(&f, &[&seg1]).expect("the first segment verifies alone");
    // The live export alone cannot vouch for what was archived: it says so.
    let err = verify(&f, &[&live]).unwrap_err();
    assert!(err.contains("starts at entry 9"), "{err}");
    assert!(err.contains("archive"), "{err}");
}

#[test]
fn overlapping_or_empty_archives_are_refused_and_nothing_is_deleted() {
    let (f, _, _) = archived_fleet();
    let before = seqs(&f);
    let (ok, said) = archive(&f, 6, "again.jsonl");
    assert!(!ok);
    assert!(
        said.contains("entries up to 8 are already archived"),
        "{said}"
    );
    let (ok, said) = archive(&f, 1000, "beyond.jsonl");
    assert!(!ok);
    assert!(said.contains("entry 999 is not in the audit log"), "{said}");
    // An existing file is never overwritten.
    let (ok, said) = archive(&f, 10, "seg1.jsonl");
    assert!(!ok);
    assert!(said.contains("never overwritten"), "{said}");
    assert_eq!(seqs(&f), before);
    assert!(!dir(&f).join("again.jsonl").exists());
}

#[test]
fn a_changed_entry_in_a_segment_fails_verify_naming_file_and_entry() {
    let (f, seg1, seg2) = archived_fleet();
    let live = export(&f, "live.jsonl");
    let mut lines = read(&seg2);
    for l in &mut lines {
        if let ExportLine::Entry(e) = l {
            if e.seq == 6 {
                e.target = "someone-else".into();
            }
        }
    }
    write(&seg2, &lines);
    let err = verify(&f, &[&seg1, &seg2, &live]).unwrap_err();
    assert!(err.contains("seg2.jsonl"), "{err}");
    assert!(
        err.contains("audit entry 6: the hash does not match"),
        "{err}"
    );
    assert!(err.contains("first bad entry: 6"), "{err}");
}

#[test]
fn a_removed_entry_in_a_segment_fails_verify() {
    let (f, seg1, seg2) = archived_fleet();
    let live = export(&f, "live.jsonl");
    let lines: Vec<ExportLine> = read(&seg1)
        .into_iter()
        .filter(|l| !matches!(l, ExportLine::Entry(e) if e.seq == 2))
        .collect();
    write(&seg1, &lines);
    let err = verify(&f, &[&seg1, &seg2, &live]).unwrap_err();
    assert!(err.contains("seg1.jsonl"), "{err}");
    assert!(
        err.contains("audit entry 2 expected, found entry 3"),
        "{err}"
    );
}

#[test]
fn segments_out_of_order_or_missing_fail_verify() {
    let (f, seg1, seg2) = archived_fleet();
    let live = export(&f, "live.jsonl");
    // Reordered: the first file given does not start at entry 1.
    let err = verify(&f, &[&seg2, &seg1, &live]).unwrap_err();
    assert!(err.contains("seg2.jsonl"), "{err}");
    assert!(err.contains("starts at entry 5"), "{err}");
    // The middle segment missing: the live export does not continue the first.
    let err = verify(&f, &[&seg1, &live]).unwrap_err();
    assert!(err.contains("live.jsonl"), "{err}");
    assert!(
        err.contains("continues after entry 8 but the file before it ends at entry 4"),
        "{err}"
    );
    // A segment cut from its end no longer ends at its checkpoint.
    let mut lines = read(&seg1);
    lines.truncate(lines.len() - 2);
    write(&seg1, &lines);
    let err = verify(&f, &[&seg1, &seg2, &live]).unwrap_err();
    assert!(err.contains("seg1.jsonl"), "{err}");
    assert!(err.contains("not at a signed checkpoint"), "{err}");
}

#[test]
fn serve_archives_on_its_own_with_an_archive_dir() {
    let f = Fleet::with_config(
        "[audit]\ncheckpoint_every = \"1s\"\narchive_dir = \"archive\"\narchive_keep = 3\narchive_every = \"1s\"\n",
    );
    for _ in 0..6 {
        f.token("app-1");
    }
    let archive_dir = f.data.join("archive");
    // Polled: the jobs run on serve's own schedule (1 s here).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let segments = loop {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&archive_dir)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "jsonl"));
        files.sort();
        if !files.is_empty() {
            break files;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no archive segment written"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let name = segments[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(name.starts_with("audit-000000000001-"), "{name}");
    let live = export(&f, "live.jsonl");
    let mut files: Vec<&Path> = segments.iter().map(PathBuf::as_path).collect();
    files.push(&live);
    verify(&f, &files).expect("the automatic segments and the live log verify");
}

#[test]
fn an_api_export_after_archiving_verifies_after_the_segments() {
    let (f, seg1, seg2) = archived_fleet();
    let config = dir(&f).join("config-admin");
    let bundle = f.data.join("admin-bundle.json");
    let tether = |args: &[&str]| {
        Command::new(bin("tether"))
            .args(args)
            .env("TETHER_CONFIG_DIR", &config)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap()
    };
    let out = tether(&[
        "login",
        "--bundle",
        bundle.to_str().unwrap(),
        "--control",
        &f.url(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dir(&f).join("api-live.jsonl");
    let out = tether(&["audit", "export", "--out", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // GET /v1/audit serves the anchor's checkpoint first, and the export keeps it first.
    let lines = read(&file);
    assert!(
        matches!(lines.first(), Some(ExportLine::Checkpoint(c)) if c.seq == 8),
        "{:?}",
        lines.first()
    );
    verify(&f, &[&seg1, &seg2, &file]).expect("segments + the API's live export verify");
}
