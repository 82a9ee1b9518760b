//! The `tether` binary's shell completions: a script for each supported shell that names
//! the operator commands, and a bash script bash itself accepts.

mod common;

use std::process::Command;

use common::bin;

#[test]
fn completion_scripts_cover_the_commands() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(bin("tether"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).unwrap();
        for cmd in [
            "login",
            "appliance",
            "operator",
            "token",
            "fleet",
            "audit",
            "up",
        ] {
            assert!(script.contains(cmd), "{shell} completion lacks {cmd}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tether.bash");
    let out = Command::new(bin("tether"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    std::fs::write(&path, out.stdout).unwrap();
    let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    // An unknown shell is a clear usage error.
    let out = Command::new(bin("tether"))
        .args(["completions", "cmd.exe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `tether ... | head`: a closed pipe ends the command quietly (SIGPIPE), never with a
/// panic message.
#[test]
fn a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(bin("tether"))
        .args(["completions", "zsh"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the script is written.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(13),
        "{:?} {stderr}",
        out.status
    );
}
