//! `tether exec`: run a command on one appliance, or on every appliance a selector picks,
//! through control and the broker that holds each appliance.
//!
//! With one appliance, the command's stdout goes to stdout and its stderr to stderr as it
//! arrives, and `tether exec` exits with the command's exit code, or with one of:
//!
//! | code | meaning |
//! |---|---|
//! | [`EXIT_OFFLINE`] (69) | the appliance is not connected to any broker |
//! | [`EXIT_LOST`] (75) | the appliance, its broker, the link to control or the control replica went away mid-command (`replica_lost`: control's answer ended without a result; never retried), or `no_channel` after 3 retries (no replica reached holds a channel to the appliance's broker) |
//! | [`EXIT_TIMED_OUT`] (124) | no result by the deadline (`--timeout`) |
//! | [`EXIT_ERROR`] (125) | `tether` itself failed: control refused the request or cannot be reached, bad arguments |
//!
//! With `--selector tenant=NAME`, every matching appliance runs the command (at most
//! `--parallel` at once); each output line is prefixed with `[id] `, a summary follows,
//! and the exit code is 0 only when every command exited 0.
//!
//! Signed operations (an appliance whose agent runs with a customer directory):
//! `--plan` runs nothing and writes the approval document the appliance expects, its
//! exact bytes, to stdout (`> approval.json`) for the customer to read and sign;
//! `--approval approval.json` sends it with `approval.json.sig` beside it. A refusal
//! (`approval_invalid`, `approval_replayed`, `phase_disabled`, ...) exits 125 naming the
//! reason; `--manifest-out FILE` keeps the appliance's signed manifest (FILE and FILE.sig)
//! for `tether ops verify`.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use tether_api::appliances::{ApplianceList, ApplianceStatus, ListQuery};
use tether_api::exec::{ExecLine, ExecRequest};
use tether_proto::{CommandFailure, OutputStream};

use super::{check_name, Client, Common};

// The exit codes, defined with the failure codes they stand for (one table for agent,
// broker, control and this CLI).
pub use tether_proto::failure::{EXIT_ERROR, EXIT_LOST, EXIT_OFFLINE, EXIT_TIMED_OUT};

/// `tether exec`
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The appliance (omit with --selector).
    #[arg(required_unless_present = "selector")]
    pub appliance: Option<String>,
    /// Run on every appliance matching `tenant=NAME`.
    #[arg(long, conflicts_with = "appliance")]
    pub selector: Option<String>,
    /// Deadline for the command on the appliance.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// With --selector: commands running at once.
    #[arg(long, default_value_t = 16)]
    pub parallel: usize,
    /// Signed operations: run nothing; write the approval document the appliance expects
    /// for exactly this command to stdout, for the customer to sign.
    #[arg(long, conflicts_with_all = ["selector", "approval"])]
    pub plan: bool,
    /// With --plan: how long the approval may be used (its window; the appliance's
    /// policy caps it).
    #[arg(long, requires = "plan", value_parser = humantime::parse_duration)]
    pub valid: Option<Duration>,
    /// Signed operations: the customer's approval (its signature beside it as FILE.sig).
    #[arg(long, value_name = "FILE", conflicts_with = "selector")]
    pub approval: Option<std::path::PathBuf>,
    /// Signed operations: why (a ticket, an incident), signed inside the approval.
    #[arg(long)]
    pub reason: Option<String>,
    /// Signed operations: the request id signed inside the approval [default: one is made
    /// for --plan].
    #[arg(long)]
    pub request_id: Option<String>,
    /// Signed operations: write the appliance's signed manifest to FILE (and FILE.sig).
    #[arg(long, value_name = "FILE", conflicts_with = "selector")]
    pub manifest_out: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub common: Common,
    /// The program and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

/// How one command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It exited with this code.
    Exited(i32),
    /// It did not run to an exit code: why, and the message.
    Failed(CommandFailure, String),
    /// `tether` itself failed for this appliance (control refused or was unreachable).
    Error(String),
}

impl Outcome {
    /// The process exit code `tether exec` uses for it: the command's own, else
    /// [`CommandFailure::exit_code`], else [`EXIT_ERROR`].
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Exited(c) => *c,
            Outcome::Failed(code, _) => code.exit_code(),
            Outcome::Error(_) => EXIT_ERROR,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Exited(c) => write!(f, "exit {c}"),
            Outcome::Failed(code, message) => write!(f, "{code}: {message}"),
            Outcome::Error(message) => write!(f, "error: {message}"),
        }
    }
}

/// Run `argv` on `appliance`, handing each output chunk to `out(stream, bytes)`.
pub async fn exec_one(
    client: &Client,
    appliance: &str,
    argv: &[String],
    timeout: Duration,
    out: impl FnMut(OutputStream, &[u8]),
) -> anyhow::Result<Outcome> {
    let body = ExecRequest {
        argv: argv.to_vec(),
        timeout_ms: Some(timeout.as_millis() as u64),
        ..Default::default()
    };
    exec_with(client, appliance, &body, out, |_| {}).await
}

/// A signed-operations line of control's answer.
#[derive(Debug)]
pub enum SignedLine {
    /// The appliance's signed manifest: bytes and armor.
    Manifest(String, String),
    /// The approval document to sign, and whether one is needed.
    Plan(String, bool),
}

/// Send `body` to `appliance`, handing output to `out` and signed-ops lines to `signed`.
pub async fn exec_with(
    client: &Client,
    appliance: &str,
    body: &ExecRequest,
    mut out: impl FnMut(OutputStream, &[u8]),
    mut signed: impl FnMut(SignedLine),
) -> anyhow::Result<Outcome> {
    let mut attempt = 0;
    let mut resp = loop {
        let refused = match client
            .post_stream(&format!("/v1/appliances/{appliance}/exec"), body)
            .await
        {
            Ok(r) => break r,
            Err(e) => match e.downcast_ref::<super::Refused>() {
                Some(r) => match CommandFailure::from_name(&r.code) {
                    Some(
                        code @ (CommandFailure::Offline
                        | CommandFailure::BrokerLost
                        | CommandFailure::NoChannel),
                    ) => (code, r.message.clone()),
                    _ => return Err(e),
                },
                None => return Err(e),
            },
        };
        // Nothing was sent: the replica that answered has no channel to the broker.
        // Another one (through the load balancer), or this one a moment later, may.
        if refused.0 == CommandFailure::NoChannel && attempt < NO_CHANNEL_RETRIES {
            attempt += 1;
            tokio::time::sleep(NO_CHANNEL_RETRY_AFTER).await;
            continue;
        }
        return Ok(Outcome::Failed(refused.0, refused.1));
    };
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return Ok(replica_lost(&format!("it broke off: {e}"))),
        };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line: ExecLine = serde_json::from_slice(&line[..line.len() - 1])
                .context("control sent a line that is not an exec event")?;
            match line {
                ExecLine::Started { .. } => {}
                ExecLine::Output { stream, data } => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data.as_bytes())
                        .context("control sent output that is not base64")?;
                    out(stream, &bytes);
                }
                ExecLine::Manifest { manifest, sig } => signed(SignedLine::Manifest(manifest, sig)),
                ExecLine::Plan {
                    approval_required,
                    document,
                } => signed(SignedLine::Plan(document, approval_required)),
                ExecLine::Exit { code } => return Ok(Outcome::Exited(code)),
                ExecLine::Failed { code, message } => return Ok(Outcome::Failed(code, message)),
            }
        }
    }
    Ok(replica_lost("it ended without a result"))
}

/// How many times a `no_channel` refusal (503, nothing sent) is retried.
pub const NO_CHANNEL_RETRIES: u32 = 3;
/// The wait before each retry: control's `Retry-After` for `no_channel`.
pub const NO_CHANNEL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The connection to control ended mid-command (`how`): the replica relaying it went
/// away. The command may have run, or part of it; it is never retried (control writes its
/// outcome, `replica_lost`, in the audit log, and the broker stops it).
fn replica_lost(how: &str) -> Outcome {
    Outcome::Failed(
        CommandFailure::ReplicaLost,
        format!(
            "the connection to control was lost mid-command ({how}): the command may have \
             run in part and was not retried; control records its outcome as replica_lost"
        ),
    )
}

/// Run `tether exec`; returns the process exit code.
pub async fn run(args: ExecArgs) -> i32 {
    match run_inner(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tether exec: {e:#}");
            EXIT_ERROR
        }
    }
}

async fn run_inner(args: ExecArgs) -> anyhow::Result<i32> {
    let client = Arc::new(Client::load(&args.common.dir()?)?);
    if let Some(selector) = &args.selector {
        return fan_out(client, selector, &args).await;
    }
    let appliance = args
        .appliance
        .clone()
        .context("give an APPLIANCE or --selector")?;
    check_name(&appliance)?;
    let body = signed_body(&args)?;
    let mut lines = Vec::new();
    let outcome = exec_with(
        &client,
        &appliance,
        &body,
        |stream, data| {
            if stream == OutputStream::Stderr {
                let mut e = std::io::stderr().lock();
                let _ = e.write_all(data);
                let _ = e.flush();
            } else {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(data);
                let _ = o.flush();
            }
        },
        |line| lines.push(line),
    )
    .await?;
    if !matches!(outcome, Outcome::Exited(_)) {
        eprintln!("tether exec: {appliance}: {outcome}");
    }
    for line in lines {
        match line {
            SignedLine::Plan(document, required) => {
                let document = narrow_plan(&document, args.valid)?;
                let mut o = std::io::stdout().lock();
                o.write_all(document.as_bytes())?;
                o.flush()?;
                if !required {
                    eprintln!(
                        "tether exec: {appliance}: this command's phase runs without an approval"
                    );
                }
            }
            SignedLine::Manifest(manifest, sig) => {
                if let Some(path) = &args.manifest_out {
                    std::fs::write(path, manifest.as_bytes())
                        .with_context(|| format!("writing {}", path.display()))?;
                    let sig_path = tether_ops::sig::sig_path(path);
                    std::fs::write(&sig_path, sig.as_bytes())
                        .with_context(|| format!("writing {}", sig_path.display()))?;
                }
            }
        }
    }
    Ok(outcome.exit_code())
}

/// The request body of a single-appliance `tether exec`, with its signed-ops fields.
fn signed_body(args: &ExecArgs) -> anyhow::Result<ExecRequest> {
    let mut body = ExecRequest {
        argv: args.argv.clone(),
        timeout_ms: Some(args.timeout.as_millis() as u64),
        reason: args.reason.clone(),
        request_id: args.request_id.clone(),
        plan: args.plan,
        ..Default::default()
    };
    if args.plan && body.request_id.is_none() {
        body.request_id = Some(format!("req-{}", tether_ops::approval::new_approval_id()));
    }
    if let Some(path) = &args.approval {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        body.approval = Some(read(path)?);
        body.approval_sig = Some(read(&tether_ops::sig::sig_path(path))?);
    }
    Ok(body)
}

/// The plan's document with its window set to `valid` from its start (the appliance's
/// policy caps it; the customer may still narrow it when signing).
fn narrow_plan(document: &str, valid: Option<Duration>) -> anyhow::Result<String> {
    let Some(valid) = valid else {
        return Ok(document.to_owned());
    };
    let mut doc = tether_ops::approval::Approval::parse(document.as_bytes()).map_err(|e| {
        anyhow::anyhow!("the appliance's plan is not a valid approval document: {e}")
    })?;
    doc.not_after_ms = doc
        .not_before_ms
        .saturating_add(i64::try_from(valid.as_millis()).unwrap_or(i64::MAX));
    Ok(String::from_utf8(doc.to_bytes())?)
}

async fn fan_out(client: Arc<Client>, selector: &str, args: &ExecArgs) -> anyhow::Result<i32> {
    let Some(("tenant", tenant)) = selector.split_once('=') else {
        bail!("unsupported selector {selector:?}: use tenant=NAME");
    };
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = ListQuery {
            tenant: Some(tenant.to_owned()),
            status: Some(ApplianceStatus::Active),
            limit: Some(500),
            after: after.take(),
            trust_state: None,
        };
        let page: ApplianceList = client.get_query("/v1/appliances", &query).await?;
        ids.extend(page.appliances.into_iter().map(|a| a.id));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    if ids.is_empty() {
        bail!("no active appliance matches {selector}");
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(args.parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids {
        let (client, limit) = (client.clone(), limit.clone());
        let (argv, timeout) = (args.argv.clone(), args.timeout);
        tasks.spawn(async move {
            let _slot = limit.acquire_owned().await;
            let prefix = format!("[{id}] ");
            let mut partial: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
            let result = exec_one(&client, &id, &argv, timeout, |stream, data| {
                let i = usize::from(stream == OutputStream::Stderr);
                partial[i].extend_from_slice(data);
                while let Some(pos) = partial[i].iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial[i].drain(..=pos).collect();
                    emit(i, &prefix, &line);
                }
            })
            .await;
            for (i, rest) in partial.iter().enumerate() {
                if !rest.is_empty() {
                    let mut line = rest.clone();
                    line.push(b'\n');
                    emit(i, &prefix, &line);
                }
            }
            let outcome = result.unwrap_or_else(|e| Outcome::Error(format!("{e:#}")));
            (id, outcome)
        });
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r.context("an exec task failed")?);
    }
    results.sort_by(|a, b| a.0.cmp(&b.0));
    let ok = results
        .iter()
        .filter(|(_, o)| *o == Outcome::Exited(0))
        .count();
    eprintln!("\n{:<32} RESULT", "APPLIANCE");
    for (id, o) in &results {
        eprintln!("{id:<32} {o}");
    }
    eprintln!(
        "{ok} of {} succeeded, {} failed",
        results.len(),
        results.len() - ok
    );
    Ok(if ok == results.len() { 0 } else { 1 })
}

fn emit(stream: usize, prefix: &str, line: &[u8]) {
    if stream == 1 {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(prefix.as_bytes());
        let _ = e.write_all(line);
    } else {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(prefix.as_bytes());
        let _ = o.write_all(line);
    }
}
