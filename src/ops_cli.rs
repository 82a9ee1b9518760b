//! `tether ops verify`: the offline check of a customer-signed operation that the vendor
//! and the customer can each run on their own copies (customer-trust design §1.9).
//!
//! Checks, in order (the first failure is named): `approval_canonical`,
//! `approval_signature`, `approval_key` (pinned and valid at the approval's start),
//! `manifest_canonical`, `manifest_signature` (by the appliance key the approval names),
//! `approval_hash` (the manifest binds these approval bytes), `same_command`,
//! `started_in_window`, then `stdout` / `stderr` when the files are given. Exit codes:
//! 0 valid, 1 invalid, 2 usage (a file that cannot be read or parsed as the right kind).
//!
//! With `--session`, the manifest is a break-glass session manifest and the approval the
//! break-glass approval that opened it (`tether_ops::verify::verify_session`):
//! `approval_canonical`, `approval_signature`, `approval_key`, `manifest_canonical`,
//! `manifest_signature`, `approval_hash`, `same_tunnel`, `activated_in_window`,
//! `ended_in_time`, `connections_in_session`; same exit codes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_ops::approvers::Approvers;
use tether_ops::verify::{verify, verify_session, Evidence};

/// Exit code: everything verified.
pub const EXIT_VALID: i32 = 0;
/// Exit code: a check failed.
pub const EXIT_INVALID: i32 = 1;
/// Exit code: the check could not run.
pub const EXIT_USAGE: i32 = 2;

/// `tether ops verify` arguments.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The approval document (its exact bytes, as signed).
    #[arg(long)]
    pub approval: PathBuf,
    /// Its SSHSIG signature [default: APPROVAL.sig].
    #[arg(long)]
    pub approval_sig: Option<PathBuf>,
    /// The manifest the appliance signed.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Its SSHSIG signature [default: MANIFEST.sig].
    #[arg(long)]
    pub manifest_sig: Option<PathBuf>,
    /// The customer's pinned keys (`approvers.toml`).
    #[arg(long)]
    pub customer_keys: PathBuf,
    /// The command's standard output, to check against the manifest's count and hash.
    #[arg(long)]
    pub stdout: Option<PathBuf>,
    /// The command's standard error.
    #[arg(long)]
    pub stderr: Option<PathBuf>,
    /// How far the start may lie outside the approval's window (the policy's
    /// `clock_skew`).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub skew: Duration,
    /// The manifest is a break-glass session's, the approval the one that opened it.
    #[arg(long, conflicts_with_all = ["stdout", "stderr"])]
    pub session: bool,
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

/// Run the check, print the verdict, and return the exit code.
pub fn run(args: &VerifyArgs) -> i32 {
    let inputs = (|| -> Result<_, String> {
        let approval = read(&args.approval)?;
        let approval_sig = read(
            &args
                .approval_sig
                .clone()
                .unwrap_or_else(|| tether_ops::sig::sig_path(&args.approval)),
        )?;
        let manifest = read(&args.manifest)?;
        let manifest_sig = read(
            &args
                .manifest_sig
                .clone()
                .unwrap_or_else(|| tether_ops::sig::sig_path(&args.manifest)),
        )?;
        let keys = String::from_utf8(read(&args.customer_keys)?)
            .map_err(|_| format!("{} is not UTF-8", args.customer_keys.display()))?;
        let approvers = Approvers::parse(&keys)?;
        let stdout = args.stdout.as_deref().map(read).transpose()?;
        let stderr = args.stderr.as_deref().map(read).transpose()?;
        Ok((
            approval,
            approval_sig,
            manifest,
            manifest_sig,
            approvers,
            stdout,
            stderr,
        ))
    })();
    let (approval, approval_sig, manifest, manifest_sig, approvers, stdout, stderr) = match inputs {
        Ok(i) => i,
        Err(e) => {
            eprintln!("tether ops verify: {e}");
            return EXIT_USAGE;
        }
    };
    let skew_ms = i64::try_from(args.skew.as_millis()).unwrap_or(i64::MAX);
    if args.session {
        return report_session(verify_session(
            &approval,
            &approval_sig,
            &manifest,
            &manifest_sig,
            &approvers,
            skew_ms,
        ));
    }
    let evidence = Evidence {
        approval: &approval,
        approval_sig: &approval_sig,
        manifest: &manifest,
        manifest_sig: &manifest_sig,
        approvers: &approvers,
        skew_ms,
        stdout: stdout.as_deref(),
        stderr: stderr.as_deref(),
    };
    match verify(&evidence) {
        Ok(r) => {
            println!(
                "valid: approval {} by {} (key {}) for {} in {}; manifest {} of appliance {} ({}); checks: {}",
                r.approval.approval_id,
                r.approval.approver,
                r.key_id,
                r.approval.exec.argv.join(" "),
                r.approval.phase,
                r.manifest.seq,
                r.manifest.appliance.id,
                match &r.manifest.outcome {
                    tether_ops::manifest::Outcome::Exited(c) => format!("exited {c}"),
                    tether_ops::manifest::Outcome::Failed(f) => format!("failed {f}"),
                    tether_ops::manifest::Outcome::Refused(f) => format!("refused {f}"),
                },
                r.passed.join(", ")
            );
            EXIT_VALID
        }
        Err(f) => {
            println!("invalid: {f}");
            EXIT_INVALID
        }
    }
}

/// Print the verdict on a session; its exit code.
fn report_session(
    verdict: Result<tether_ops::verify::SessionReport, tether_ops::verify::Failed>,
) -> i32 {
    match verdict {
        Ok(r) => {
            let m = &r.manifest;
            println!(
                "valid: approval {} by {} (key {}) for {}/{} to {} in {}; session {} of appliance {} active {} to {} ({}), {} connections, {} bytes to and {} from the target, teardown {}; checks: {}",
                r.approval.approval_id,
                r.approval.approver,
                r.key_id,
                m.resource,
                m.privilege,
                m.target,
                m.phase,
                m.session_id,
                m.appliance.id,
                tether_ops::format_rfc3339_ms(m.activated_ms),
                tether_ops::format_rfc3339_ms(m.ended_ms),
                m.end_reason,
                m.connections_total,
                m.to_target_bytes,
                m.from_target_bytes,
                match &m.teardown {
                    tether_ops::session::Teardown::None => "none".to_owned(),
                    tether_ops::session::Teardown::Ok => "ok".to_owned(),
                    tether_ops::session::Teardown::Failed(e) => format!("failed ({e})"),
                },
                r.passed.join(", ")
            );
            EXIT_VALID
        }
        Err(f) => {
            println!("invalid: {f}");
            EXIT_INVALID
        }
    }
}
