//! `tether-approve`: the customer's side of signed operations.
//!
//! The vendor hands the customer a complete approval document (`tether exec --plan`
//! writes one for a command, `tether tunnel request` one for a break-glass tunnel); the
//! customer reads it (`show`), signs it with a key only they hold (`sign`), and hands
//! back `approval.json` and `approval.json.sig`. Stock `ssh-keygen
//! -Y sign -n tether-approval-v1 -f KEY approval.json` does the same; this tool adds the
//! strict check that the bytes are exactly the canonical document that will be shown to
//! the appliance, and narrowing (a shorter window, an approver label; for a tunnel a
//! shorter session and fewer connections) before signing.
//!
//! There is no network code in this binary (CI checks its dependency tree): it runs on an
//! air-gapped workstation and cannot phone home.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use tether_ops::approval::Approval;
use tether_ops::approvers::{Approvers, Scope};
use tether_ops::sig::sig_path;
use tether_ops::ssh_key::{rand_core::OsRng, Algorithm, HashAlg, LineEnding, PrivateKey};
use tether_ops::tunnel::{CredentialCommand, TunnelApproval};
use tether_ops::{format_rfc3339_ms, sig, APPROVAL_NAMESPACE};

/// The customer's signer for Tether approvals. No network: files in, files out.
#[derive(Debug, Parser)]
#[command(name = "tether-approve", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Make an Ed25519 approval key: FILE (private, 0600) and FILE.pub (the line to pin in
    /// the appliance's approvers.toml). For a hardware key use `ssh-keygen -t
    /// ed25519-sk`.
    Keygen {
        /// The private key file to write (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
        /// The key's comment (who holds it).
        #[arg(long, default_value = "")]
        comment: String,
        /// Encrypt the key with the passphrase in this environment variable.
        #[arg(long)]
        passphrase_env: Option<String>,
    },
    /// Print an approval document (a command's or a break-glass tunnel's) for a human to
    /// read, after checking it is canonical.
    Show {
        /// The document.
        file: PathBuf,
    },
    /// Sign an approval document (after the strict check), optionally narrowing it
    /// first: the approver label, a shorter window. Writes OUT and OUT.sig.
    Sign {
        /// The private key (OpenSSH format).
        #[arg(long)]
        key: PathBuf,
        /// The document to sign.
        file: PathBuf,
        /// Set the approver label.
        #[arg(long)]
        approver: Option<String>,
        /// Narrow the window to at most this long from now (or from its start, if that is
        /// later). A window is never widened.
        #[arg(long, value_parser = humantime::parse_duration)]
        valid: Option<Duration>,
        /// Break glass: narrow the session to at most this long (whole seconds; the idle
        /// timeout shrinks with it). Never lengthened.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Break glass: allow at most this many connections. Never raised.
        #[arg(long)]
        max_connections: Option<u32>,
        /// Where to write the signed document [default: FILE itself].
        #[arg(long)]
        out: Option<PathBuf>,
        /// The key's passphrase is in this environment variable.
        #[arg(long)]
        passphrase_env: Option<String>,
    },
    /// Check an approval's signature against approvers.toml (the key must be pinned and
    /// valid at the approval's start). Exits 0 valid, 1 invalid, 2 usage.
    Verify {
        /// The document.
        file: PathBuf,
        /// The signature [default: FILE.sig].
        #[arg(long)]
        sig: Option<PathBuf>,
        /// The pinned keys.
        #[arg(long)]
        customer_keys: PathBuf,
    },
}

/// A failure and the exit code it ends with.
struct Fail(u8, String);

fn usage(msg: impl Into<String>) -> Fail {
    Fail(2, msg.into())
}

fn read(p: &Path) -> Result<Vec<u8>, Fail> {
    std::fs::read(p).map_err(|e| usage(format!("cannot read {}: {e}", p.display())))
}

/// `p` with `suffix` appended (`alice` → `alice.pub`).
fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn passphrase(var: &Option<String>) -> Result<Option<String>, Fail> {
    var.as_ref()
        .map(|v| {
            std::env::var(v).map_err(|_| usage(format!("the environment variable {v} is not set")))
        })
        .transpose()
}

/// Write `bytes` to `path` as a new file with `mode` (never over an existing one).
fn create(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Fail> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| usage(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(bytes)
        .map_err(|e| usage(format!("writing {}: {e}", path.display())))
}

/// Replace `path` with `bytes` (temp file + rename).
fn replace(path: &Path, bytes: &[u8]) -> Result<(), Fail> {
    let tmp = path.with_extension("tmp-approve");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| usage(format!("writing {}: {e}", path.display())))
}

fn keygen(out: &Path, comment: &str, pass: Option<String>) -> Result<String, Fail> {
    let mut key =
        PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(|e| Fail(1, e.to_string()))?;
    key.set_comment(comment);
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| Fail(1, e.to_string()))?;
    let key = match pass {
        Some(p) => key
            .encrypt(&mut OsRng, p)
            .map_err(|e| Fail(1, e.to_string()))?,
        None => key,
    };
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| Fail(1, e.to_string()))?;
    create(out, pem.as_bytes(), 0o600)?;
    create(
        &with_suffix(out, ".pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )?;
    Ok(format!(
        "wrote {} and its .pub; fingerprint {}\npin it in approvers.toml:\n[[key]]\nid = \"...\"\npublic_key = \"{public}\"\nnot_before = \"{}\"\nnot_after = \"...\"",
        out.display(),
        key.public_key().fingerprint(HashAlg::Sha256),
        format_rfc3339_ms(now_ms())
    ))
}

/// An approval document of either kind; neither parses as the other.
enum Doc {
    /// A command's.
    Exec(Approval),
    /// A break-glass tunnel's.
    Tunnel(TunnelApproval),
}

impl Doc {
    /// Parse `bytes` strictly as whichever kind they are.
    fn parse(bytes: &[u8]) -> Result<Doc, String> {
        match Approval::parse(bytes) {
            Ok(a) => Ok(Doc::Exec(a)),
            Err(exec_err) => match TunnelApproval::parse(bytes) {
                Ok(t) => Ok(Doc::Tunnel(t)),
                // Explain in the terms of the kind the bytes look like.
                Err(tunnel_err) if contains(bytes, b"\"break_glass\"") => Err(tunnel_err),
                Err(_) => Err(exec_err),
            },
        }
    }

    fn check_fields(&self) -> Result<(), String> {
        match self {
            Doc::Exec(a) => a.check_fields(),
            Doc::Tunnel(t) => t.check_fields(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        match self {
            Doc::Exec(a) => a.to_bytes(),
            Doc::Tunnel(t) => t.to_bytes(),
        }
    }

    /// The pinned-key scope it needs.
    fn scope(&self) -> Scope {
        match self {
            Doc::Exec(_) => Scope::Exec,
            Doc::Tunnel(_) => Scope::BreakGlass,
        }
    }

    /// `approver`, `not_before_ms`, `not_after_ms`, for narrowing.
    fn signer_fields(&mut self) -> (&mut String, &mut i64, &mut i64) {
        match self {
            Doc::Exec(a) => (&mut a.approver, &mut a.not_before_ms, &mut a.not_after_ms),
            Doc::Tunnel(t) => (&mut t.approver, &mut t.not_before_ms, &mut t.not_after_ms),
        }
    }

    fn render(&self) -> String {
        match self {
            Doc::Exec(a) => render(a),
            Doc::Tunnel(t) => render_tunnel(t),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The document as a human reads it.
fn render(a: &Approval) -> String {
    let e = &a.exec;
    format!(
        "approval {id}\n  appliance:   {app} (trust domain {td})\n  appliance key: {key}\n  phase:       {phase}\n  command:     {kind} {argv:?}\n  environment: {env:?}\n  deadline:    {deadline} ms\n  stdin:       {stdin}\n  valid:       {from} to {until}\n  request:     {req}\n  reason:      {reason}\n  approver:    {approver}",
        id = a.approval_id,
        app = a.appliance.id,
        td = a.appliance.trust_domain,
        key = a.appliance.key,
        phase = a.phase,
        kind = e.kind,
        argv = e.argv,
        env = e.env_allowlist,
        deadline = e.deadline_ms,
        stdin = if e.stdin_sha256.is_empty() { "none".to_owned() } else { format!("sha256 {}", e.stdin_sha256) },
        from = format_rfc3339_ms(a.not_before_ms),
        until = format_rfc3339_ms(a.not_after_ms),
        req = a.request_id,
        reason = a.reason,
        approver = a.approver,
    )
}

/// A break-glass document as a human reads it: where the tunnel goes, for how long, and
/// exactly which commands make and remove the credential.
fn render_tunnel(t: &TunnelApproval) -> String {
    let b = &t.break_glass;
    let command = |c: &Option<CredentialCommand>| match c {
        Some(c) => format!("{:?} (deadline {} ms)", c.argv, c.deadline_ms),
        None => "none".to_owned(),
    };
    let credential = match &b.credential {
        None => "none (nothing is minted or revoked)".to_owned(),
        Some(c) => format!(
            "made for this session by the customer's commands\n    mint:      {}\n    revoke:    {}\n    sealed to: {}",
            command(&c.mint),
            command(&c.revoke),
            if b.recipient.is_empty() { "nobody (nothing minted)" } else { &b.recipient }
        ),
    };
    format!(
        "break-glass approval {id}\n  appliance:   {app} (trust domain {td})\n  appliance key: {key}\n  phase:       {phase}\n  resource:    {resource}\n  privilege:   {privilege}\n  target:      {target} (via {network})\n  duration:    {duration} from activation (the appliance's policy may cap it)\n  connections: at most {conns}, each closed after {idle} idle\n  credential:  {credential}\n  activate:    {from} to {until}\n  request:     {req}\n  reason:      {reason}\n  approver:    {approver}",
        id = t.approval_id,
        app = t.appliance.id,
        td = t.appliance.trust_domain,
        key = t.appliance.key,
        phase = t.phase,
        resource = b.resource,
        privilege = b.privilege,
        target = b.target,
        network = b.network,
        duration = humantime::format_duration(Duration::from_secs(b.duration_s)),
        conns = b.max_connections,
        idle = humantime::format_duration(Duration::from_secs(b.idle_timeout_s)),
        from = format_rfc3339_ms(t.not_before_ms),
        until = format_rfc3339_ms(t.not_after_ms),
        req = t.request_id,
        reason = t.reason,
        approver = t.approver,
    )
}

fn parse(file: &Path) -> Result<Doc, Fail> {
    Doc::parse(&read(file)?).map_err(|e| Fail(1, format!("{}: {e}", file.display())))
}

struct SignArgs<'a> {
    key: &'a Path,
    file: &'a Path,
    approver: Option<String>,
    valid: Option<Duration>,
    duration: Option<Duration>,
    max_connections: Option<u32>,
    out: Option<&'a Path>,
    pass: Option<String>,
}

fn sign(a: SignArgs<'_>) -> Result<String, Fail> {
    let mut doc = parse(a.file)?;
    let (approver, not_before_ms, not_after_ms) = doc.signer_fields();
    if let Some(label) = a.approver {
        *approver = label;
    }
    if let Some(valid) = a.valid {
        let start = (*not_before_ms).max(now_ms());
        let end = start.saturating_add(i64::try_from(valid.as_millis()).unwrap_or(i64::MAX));
        *not_before_ms = start;
        *not_after_ms = (*not_after_ms).min(end);
        if *not_after_ms <= *not_before_ms {
            return Err(Fail(1, "the document's window has already ended".into()));
        }
    }
    if a.duration.is_some() || a.max_connections.is_some() {
        let Doc::Tunnel(t) = &mut doc else {
            return Err(usage(
                "--duration and --max-connections narrow break-glass documents only",
            ));
        };
        let b = &mut t.break_glass;
        if let Some(d) = a.duration {
            b.duration_s = b.duration_s.min(d.as_secs());
            b.idle_timeout_s = b.idle_timeout_s.min(b.duration_s);
        }
        if let Some(n) = a.max_connections {
            b.max_connections = b.max_connections.min(n);
        }
    }
    doc.check_fields().map_err(|e| Fail(1, e))?;
    let pem = read(a.key)?;
    let mut key =
        PrivateKey::from_openssh(&pem).map_err(|e| usage(format!("{}: {e}", a.key.display())))?;
    if key.is_encrypted() {
        let pass = a
            .pass
            .ok_or_else(|| usage("the key is encrypted: give --passphrase-env VAR"))?;
        key = key
            .decrypt(pass)
            .map_err(|_| Fail(1, "wrong passphrase".into()))?;
    }
    let bytes = doc.to_bytes();
    let armor = sig::sign(&key, APPROVAL_NAMESPACE, &bytes).map_err(|e| Fail(1, e.to_string()))?;
    let out = a.out.unwrap_or(a.file);
    replace(out, &bytes)?;
    replace(&sig_path(out), armor.as_bytes())?;
    Ok(format!(
        "{}\nsigned: {} and {}",
        doc.render(),
        out.display(),
        sig_path(out).display()
    ))
}

fn verify(file: &Path, sig_file: Option<&Path>, keys: &Path) -> Result<String, Fail> {
    let bytes = read(file)?;
    let armor = read(&sig_file.map_or_else(|| sig_path(file), Path::to_path_buf))?;
    let text = String::from_utf8(read(keys)?)
        .map_err(|_| usage(format!("{} is not UTF-8", keys.display())))?;
    let approvers = Approvers::parse(&text).map_err(usage)?;
    let doc = Doc::parse(&bytes).map_err(|e| Fail(1, format!("invalid: {e}")))?;
    let signer = sig::verify(&armor, APPROVAL_NAMESPACE, &bytes)
        .map_err(|e| Fail(1, format!("invalid: {e}")))?;
    let not_before_ms = match &doc {
        Doc::Exec(a) => a.not_before_ms,
        Doc::Tunnel(t) => t.not_before_ms,
    };
    let key = approvers
        .authorize(&signer, not_before_ms, doc.scope())
        .map_err(|e| Fail(1, format!("invalid: {e}")))?;
    Ok(format!(
        "valid: signed by {} ({})\n{}",
        key.id,
        signer.fingerprint(),
        doc.render()
    ))
}

fn run(cli: Cli) -> Result<String, Fail> {
    match cli.command {
        Cmd::Keygen {
            out,
            comment,
            passphrase_env,
        } => keygen(&out, &comment, passphrase(&passphrase_env)?),
        Cmd::Show { file } => parse(&file).map(|d| d.render()),
        Cmd::Sign {
            key,
            file,
            approver,
            valid,
            duration,
            max_connections,
            out,
            passphrase_env,
        } => sign(SignArgs {
            key: &key,
            file: &file,
            approver,
            valid,
            duration,
            max_connections,
            out: out.as_deref(),
            pass: passphrase(&passphrase_env)?,
        }),
        Cmd::Verify {
            file,
            sig,
            customer_keys,
        } => verify(&file, sig.as_deref(), &customer_keys),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(Fail(code, msg)) => {
            eprintln!("tether-approve: {msg}");
            ExitCode::from(code)
        }
    }
}
