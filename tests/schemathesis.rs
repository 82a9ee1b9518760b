//! Property-based fuzzing of the real control API against its own `/openapi.json` with
//! schemathesis (`scripts/schemathesis`, which installs it from PyPI when missing): as the
//! first admin (every operator route reachable), no answer is a 5xx and every answer
//! matches the documented schema. Bounded: a few examples per operation. Fails, not
//! skips, when schemathesis cannot be installed or run.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::control::*;
use common::*;

#[test]
fn api_matches_its_openapi_document_under_fuzzing() {
    let fleet = Fleet::new();
    // Log the first admin in with its bundle, as an operator would.
    let config = fleet.data.parent().unwrap().join("config-admin");
    let out = Command::new(bin("tether"))
        .args(["login", "--bundle"])
        .arg(fleet.data.join("admin-bundle.json"))
        .args(["--control", &fleet.url()])
        .env("TETHER_CONFIG_DIR", &config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tether login: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/schemathesis");
    let started = Instant::now();
    let run = Command::new("bash")
        .arg(&script)
        .arg(fleet.url())
        .arg(&fleet.root)
        .arg(config.join("operator.cert.pem"))
        .arg(config.join("operator.key.pem"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    eprintln!(
        "{stdout}\n{stderr}\nschemathesis took {:?}",
        started.elapsed()
    );
    assert!(
        run.status.success(),
        "schemathesis failed (exit {:?}); if it is not installed and pip could not install \
         it, run `python3 -m pip install schemathesis`:\n{stdout}\n{stderr}",
        run.status.code()
    );
}
