//! `tether`: the Tether command-line tool. For now it runs the local quickstart
//! (`tether up`); operator commands arrive with the control plane.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tether: connection broker for vendor-managed appliances.
#[derive(Debug, Parser)]
#[command(name = "tether", version)]
struct Cli {
    /// Control's URL for this command (a load balancer or one control replica), instead
    /// of the one stored at login; for `tether login`, instead of the bundle's (and stored).
    #[arg(long, global = true, value_name = "URL", env = tether::cli::CONTROL_URL_ENV,
        value_parser = tether::cli::parse_control_url)]
    control: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print a shell completion script, e.g. `tether completions bash >
    /// /etc/bash_completion.d/tether` or `tether completions zsh > "${fpath[1]}/_tether"`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Run a local Tether on 127.0.0.1: control (SQLite, local CA keys), two brokers and a
    /// simulated fleet of real agents enrolled with one-time tokens. Prints
    /// `ready: <N> appliances connected`, then what to try. Ctrl-C stops everything.
    Up {
        /// Number of simulated appliances.
        #[arg(long, default_value_t = 100, env = "TETHER_UP_APPLIANCES")]
        appliances: usize,
        /// Data directory (control, brokers, operator credential, appliance state).
        #[arg(long, default_value = "tether-data", env = "TETHER_UP_DATA_DIR")]
        data_dir: PathBuf,
        /// First port: edge-1 QUIC on it, its admin/metrics on +1; edge-2 on +10/+11;
        /// control's API on +1000 and its metrics on +1001. 0: free ports for everything.
        #[arg(long, default_value_t = 7443, env = "TETHER_UP_PORT_BASE")]
        port_base: u16,
    },
    /// The audit log: verify an export offline.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Log in as an operator with a one-time bundle: the key is generated here, the
    /// certificate stored in $TETHER_CONFIG_DIR (else the platform config directory).
    Login(tether::cli::login::LoginArgs),
    /// Operators: invite, list, revoke.
    #[command(subcommand)]
    Operator(tether::cli::operator::OperatorCmd),
    /// The fleet as a whole.
    #[command(subcommand)]
    Fleet(tether::cli::operator::FleetCmd),
    /// Appliances: register, list, show, disable, enable, revoke, renew.
    #[command(subcommand)]
    Appliance(tether::cli::appliance::ApplianceCmd),
    /// One-time enrollment tokens for appliances.
    #[command(subcommand)]
    Token(tether::cli::appliance::TokenCmd),
    /// Brokers of the edge cluster: add (one-time bundle), list, drain, revoke.
    #[command(subcommand)]
    Broker(tether::cli::broker::BrokerCmd),
    /// The web console: open (or, with --print-url, print) a single-use sign-in link for
    /// this operator, valid for about a minute.
    Console(tether::cli::console::ConsoleArgs),
    /// Control itself: its live replicas.
    #[command(subcommand)]
    Control(tether::cli::control::ControlCmd),
    /// Run a command on an appliance (or on every appliance of `--selector tenant=NAME`);
    /// output streams back live and `tether exec` exits with the command's exit code, or
    /// 69 offline, 75 lost mid-command, 124 timed out, 125 refused or unreachable.
    Exec(tether::cli::exec::ExecArgs),
    /// Break glass: a customer-approved, time-boxed tunnel to one resource in the
    /// customer's network (request, open, credential, close, list).
    #[command(subcommand)]
    Tunnel(tether::cli::tunnel::TunnelCmd),
    /// Customer-signed operations: check an approval, the appliance's manifest and the
    /// output offline.
    #[command(subcommand)]
    Ops(OpsCmd),
}

#[derive(Debug, Subcommand)]
enum OpsCmd {
    /// Check offline that a customer approval verifies under a pinned key, that the
    /// appliance's manifest verifies under the key the approval names and binds exactly
    /// that approval and command, and that the output files match; with `--session`, that
    /// a break-glass session manifest binds its approval and stayed within it. Exits 0
    /// valid, 1 invalid (naming the first failing check), 2 usage.
    Verify(tether::ops_cli::VerifyArgs),
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Write the whole audit log and its signed checkpoints, from control, to FILE (JSON
    /// lines, one entry per line); needs an operator credential (role viewer or above).
    Export {
        /// The file to write (replaced atomically).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        common: tether::cli::Common,
    },
    /// Check an audit export (from `tether-control audit export`) offline: the whole hash
    /// chain from entry 1, every signed checkpoint (signer chains to the root and is
    /// control), each checkpoint's entry, and that the export reaches the last
    /// checkpoint. Exits 0 only for an intact log; else names the first bad entry or
    /// checkpoint and exits 1. After `tether-control audit archive`, give the archive
    /// segments oldest first, then the live export: `verify SEG1 SEG2 ... LIVE` checks
    /// them end to end (each file continues the one before, each segment ends at a
    /// signed checkpoint) and names the file where it breaks.
    Verify {
        /// The archive segments, oldest first, then the export (JSON lines); or one
        /// export of the whole log.
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// The root CA certificate to trust (PEM) [default: $TETHER_CONFIG_DIR/ca.pem, else
        /// tether/ca.pem in the platform config directory]. Never taken from the export.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The trust domain the signer must belong to [default: the one the root names].
        #[arg(long)]
        trust_domain: Option<String>,
    },
}

/// Rust ignores SIGPIPE, so `println!` to a closed pipe (`tether appliance list | head`)
/// panics. A command-line tool should end quietly instead, as Unix tools do: restore the
/// default action. (`tether up` keeps Rust's default: it serves, it does not pipe.)
fn restore_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: sigaction is process-wide and may be called from any thread; the default
    // disposition runs no handler code, so nothing can run in a signal context.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Cmd::Up { .. }) {
        restore_sigpipe();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    if let Some(url) = cli.control.clone() {
        tether::cli::set_control_url(url);
    }
    match cli.command {
        Cmd::Login(mut args) => {
            args.control = cli.control;
            tether::cli::login::run(args).await
        }
        Cmd::Control(cmd) => tether::cli::control::run(cmd).await,
        Cmd::Console(args) => tether::cli::console::run(args).await,
        Cmd::Ops(OpsCmd::Verify(args)) => std::process::exit(tether::ops_cli::run(&args)),
        Cmd::Operator(cmd) => tether::cli::operator::run(cmd).await,
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "tether", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Fleet(cmd) => tether::cli::operator::fleet(cmd).await,
        Cmd::Appliance(cmd) => tether::cli::appliance::run(cmd).await,
        Cmd::Token(cmd) => tether::cli::appliance::token(cmd).await,
        Cmd::Broker(cmd) => tether::cli::broker::run(cmd).await,
        Cmd::Tunnel(cmd) => {
            let code = tether::cli::tunnel::run(cmd).await?;
            std::process::exit(code);
        }
        Cmd::Exec(args) => {
            let code = tether::cli::exec::run(args).await;
            std::process::exit(code);
        }
        Cmd::Audit(AuditCmd::Export { out, common }) => {
            let (entries, checkpoints) = tether::cli::audit::export(&common, &out).await?;
            println!(
                "exported {entries} entries and {checkpoints} checkpoints to {}",
                out.display()
            );
            Ok(())
        }
        Cmd::Audit(AuditCmd::Verify {
            files,
            ca,
            trust_domain,
        }) => {
            let ca = ca
                .or_else(|| tether::audit_cli::default_ca_path(|k| std::env::var(k).ok()))
                .context("no root certificate: give --ca ROOT.pem or set TETHER_CONFIG_DIR")?;
            let summary = tether::audit_cli::verify_files(&files, &ca, trust_domain.as_deref())?;
            let (ok, note) = tether::audit_cli::report(&summary);
            println!("{ok}");
            if let Some(note) = note {
                eprintln!("{note}");
            }
            Ok(())
        }
        Cmd::Up {
            appliances,
            data_dir,
            port_base,
        } => {
            let shutdown = CancellationToken::new();
            let trigger = shutdown.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                trigger.cancel();
            });
            tether::up::run(
                tether::up::UpOptions {
                    data_dir,
                    appliances,
                    port_base,
                },
                shutdown,
            )
            .await
        }
    }
}
