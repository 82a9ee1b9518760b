//! `tether exec`: run a command on one appliance, or on every appliance a selector picks,
//! through control and the broker that holds each appliance.
//!
//! With one appliance, the command's stdout goes to stdout and its stderr to stderr as it
//! arrives, and `tether exec` exits with the command's exit code, or with one of:
//!
//! | code | meaning |
//! |---|---|
//! | [`EXIT_OFFLINE`] (69) | the appliance is not connected to any broker |
//! | [`EXIT_LOST`] (75) | the appliance, its broker or the link to control went away mid-command |
//! | [`EXIT_TIMED_OUT`] (124) | no result by the deadline (`--timeout`) |
//! | [`EXIT_ERROR`] (125) | `tether` itself failed: control refused the request or cannot be reached, bad arguments |
//!
//! With `--selector tenant=NAME`, every matching appliance runs the command (at most
//! `--parallel` at once); each output line is prefixed with `[id] `, a summary follows,
//! and the exit code is 0 only when every command exited 0.

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
    mut out: impl FnMut(OutputStream, &[u8]),
) -> anyhow::Result<Outcome> {
    let body = ExecRequest {
        argv: argv.to_vec(),
        timeout_ms: Some(timeout.as_millis() as u64),
        kind: None,
        env_allowlist: Vec::new(),
    };
    let mut resp = match client
        .post_stream(&format!("/v1/appliances/{appliance}/exec"), &body)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            if let Some(r) = e.downcast_ref::<super::Refused>() {
                if let Some(code @ (CommandFailure::Offline | CommandFailure::BrokerLost)) =
                    CommandFailure::from_name(&r.code)
                {
                    return Ok(Outcome::Failed(code, r.message.clone()));
                }
            }
            return Err(e);
        }
    };
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                return Ok(Outcome::Failed(
                    CommandFailure::BrokerLost,
                    format!("the answer from control broke off: {e}"),
                ))
            }
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
                ExecLine::Exit { code } => return Ok(Outcome::Exited(code)),
                ExecLine::Failed { code, message } => return Ok(Outcome::Failed(code, message)),
            }
        }
    }
    Ok(Outcome::Failed(
        CommandFailure::BrokerLost,
        "control's answer ended without a result".into(),
    ))
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
    let outcome = exec_one(
        &client,
        &appliance,
        &args.argv,
        args.timeout,
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
    )
    .await?;
    if !matches!(outcome, Outcome::Exited(_)) {
        eprintln!("tether exec: {appliance}: {outcome}");
    }
    Ok(outcome.exit_code())
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
