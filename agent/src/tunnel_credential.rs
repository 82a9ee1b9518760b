//! The one-time credential of a break-glass session (customer-trust design §3.5).
//!
//! - **Mint.** At activation the agent runs the privilege's `mint` command from the
//!   customer's policy, as the phase's `run_as` user, with `{duration_s}` and
//!   `{session_id}` substituted. Its stdout is the credential: JSON with at least
//!   `credential_id` and `secret`. Its stderr is not kept (it could hold the secret).
//! - **Seal.** The whole stdout is encrypted at once with `age` to the operator's one-time
//!   X25519 key named in the signed approval (`recipient`), and the plaintext is zeroed.
//!   Only the operator's identity opens it: control and brokers relay ciphertext. It goes
//!   out once, in `TunnelReady`.
//! - **Revoke.** At teardown the agent runs `revoke` with `{credential_id}` and
//!   `{session_id}` substituted. Revoke commands must be idempotent: after a crash the
//!   agent runs them again at start for every session its log shows activated and not
//!   ended.
//!
//! Only `credential_id` and the ciphertext's length are ever logged.

use std::process::Stdio;
use std::time::Duration;

use tether_ops::tunnel::CredentialCommand;
use tokio::io::AsyncReadExt;
use zeroize::Zeroizing;

use crate::signed::RunUser;

/// The most stdout a mint command may print.
pub const MAX_CREDENTIAL_LEN: usize = 8 * 1024;

/// A minted and sealed credential.
#[derive(Debug)]
pub struct Sealed {
    /// The customer's id for it (from the mint command's output).
    pub credential_id: String,
    /// The `age` ciphertext for the operator.
    pub ciphertext: Vec<u8>,
}

/// The longest `credential_id` accepted from a mint command.
pub const MAX_CREDENTIAL_ID_LEN: usize = 128;

/// Whether `id` is a credential id the agent will log and hand to `revoke`: 1 to 128 of
/// `A-Za-z0-9._:@/-`, not starting with `-` (never an option to the revoke program).
pub fn valid_credential_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CREDENTIAL_ID_LEN
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@/-".contains(&b))
}

/// `cmd`'s argv with each `{name}` of `vars` replaced by its value, in one pass (a value
/// is never expanded again).
fn substitute(cmd: &CredentialCommand, vars: &[(&str, &str)]) -> Vec<String> {
    cmd.argv
        .iter()
        .map(|arg| {
            let mut out = String::with_capacity(arg.len());
            let mut rest = arg.as_str();
            'scan: while let Some(open) = rest.find('{') {
                out.push_str(&rest[..open]);
                let after = &rest[open..];
                for (k, v) in vars {
                    if let Some(tail) = after
                        .strip_prefix('{')
                        .and_then(|t| t.strip_prefix(*k))
                        .and_then(|t| t.strip_prefix('}'))
                    {
                        out.push_str(v);
                        rest = tail;
                        continue 'scan;
                    }
                }
                out.push('{');
                rest = &after[1..];
            }
            out.push_str(rest);
            out
        })
        .collect()
}

/// Run `argv` as `user` within `deadline_ms`; its stdout (at most
/// [`MAX_CREDENTIAL_LEN`]) when it exits 0.
async fn run(
    argv: &[String],
    user: &RunUser,
    deadline_ms: u64,
) -> Result<Zeroizing<Vec<u8>>, String> {
    let (program, args) = argv.split_first().ok_or("empty argv")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", crate::command::DEFAULT_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if user.switch {
        cmd.uid(user.uid).gid(user.gid);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let work = async {
        let mut out = Zeroizing::new(Vec::new());
        let mut limited = (&mut stdout).take(MAX_CREDENTIAL_LEN as u64 + 1);
        limited
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("reading {program}: {e}"))?;
        let status = child
            .wait()
            .await
            .map_err(|e| format!("waiting for {program}: {e}"))?;
        if out.len() > MAX_CREDENTIAL_LEN {
            return Err(format!(
                "{program} printed more than {MAX_CREDENTIAL_LEN} bytes"
            ));
        }
        if !status.success() {
            return Err(format!("{program} failed: {status}"));
        }
        Ok(out)
    };
    tokio::time::timeout(Duration::from_millis(deadline_ms), work)
        .await
        .map_err(|_| format!("{program} did not finish within {deadline_ms} ms"))?
}

/// Mint the credential with `mint` as `user` and seal it to `recipient` (an `age1…`
/// X25519 public key).
pub async fn mint_and_seal(
    mint: &CredentialCommand,
    user: &RunUser,
    recipient: &str,
    duration_s: u64,
    session_id: u64,
) -> Result<Sealed, String> {
    let recipient: age::x25519::Recipient = recipient
        .parse()
        .map_err(|e| format!("the approval's recipient is not an age X25519 key: {e}"))?;
    let argv = substitute(
        mint,
        &[
            ("duration_s", &duration_s.to_string()),
            ("session_id", &session_id.to_string()),
        ],
    );
    let out = run(&argv, user, mint.deadline_ms).await?;
    // Only the id is read out: the secret is skipped, never copied into a string that
    // would outlive the zeroized output.
    #[derive(serde::Deserialize)]
    struct Minted {
        credential_id: String,
        #[allow(dead_code)]
        secret: serde::de::IgnoredAny,
    }
    let credential_id = serde_json::from_slice::<Minted>(&out)
        .map(|m| m.credential_id)
        .map_err(|_| "the mint command's output is not JSON with credential_id and secret")?;
    if !valid_credential_id(&credential_id) {
        return Err(format!(
            "the mint command's credential_id is not 1 to {MAX_CREDENTIAL_ID_LEN} of A-Za-z0-9._:@/- (not starting with -)"
        ));
    }
    let ciphertext =
        age::encrypt(&recipient, &out).map_err(|e| format!("cannot seal the credential: {e}"))?;
    Ok(Sealed {
        credential_id,
        ciphertext,
    })
}

/// Run `revoke` for `credential_id` as `user`.
pub async fn revoke(
    revoke: &CredentialCommand,
    user: &RunUser,
    credential_id: &str,
    session_id: u64,
) -> Result<(), String> {
    let argv = substitute(
        revoke,
        &[
            ("credential_id", credential_id),
            ("session_id", &session_id.to_string()),
        ],
    );
    run(&argv, user, revoke.deadline_ms).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution_is_one_pass_and_ids_cannot_be_options() {
        let cmd = CredentialCommand {
            argv: vec![
                "revoke".into(),
                "--id={credential_id}".into(),
                "{session_id}{x}{".into(),
            ],
            deadline_ms: 1,
        };
        let argv = substitute(
            &cmd,
            &[("credential_id", "{session_id}"), ("session_id", "7")],
        );
        assert_eq!(argv, ["revoke", "--id={session_id}", "7{x}{"]);
        assert!(valid_credential_id("tether-bg-7"));
        assert!(valid_credential_id("ns/secret:v1@x.y"));
        for bad in ["", "-rf", "--all", "a b", "a\nb", "a;b", &"x".repeat(129)] {
            assert!(!valid_credential_id(bad), "{bad:?}");
        }
    }
}
