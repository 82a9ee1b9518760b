//! `tether-agent manifest-key show`: one line, `ssh-ed25519 <base64>`, the same on every
//! call, a key stock `ssh-keygen` reads, and the private half 0600 in the state directory.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn show(dir: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tether-agent"))
        .args(["manifest-key", "show", "--state-dir"])
        .arg(dir)
        .output()
        .expect("tether-agent");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn show_prints_one_stable_line_that_ssh_keygen_reads() {
    let dir = tempfile::tempdir().unwrap();
    let first = show(dir.path());
    assert_eq!(first, show(dir.path()));
    let line = first.strip_suffix('\n').expect("one line");
    let (kind, b64) = line.split_once(' ').expect("two fields");
    assert_eq!(kind, "ssh-ed25519");
    assert!(
        !b64.is_empty()
            && b64
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)),
        "{line}"
    );
    let key = dir.path().join("manifest.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public = dir.path().join("manifest.pub");
    std::fs::write(&public, &first).unwrap();
    let out = Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(&public)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The private half, read by stock ssh-keygen, has the same public key.
    let out = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(line));
}
