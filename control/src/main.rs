//! `tether-control`: the CA, the store and the enrollment API. `main` parses the command
//! line and hands it to [`cli::run`]; the work is in the library.

use clap::Parser;
use tether_control::config::env;

mod cli;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tether control: the fleet's certificate authority and source of truth.
///
/// `init` creates the CA and the store in a data directory; `serve` runs the enrollment
/// API; the other commands administer appliances directly on the data directory (useful
/// before the operator API exists, and for recovery).
#[derive(Debug, Parser)]
#[command(name = "tether-control", version)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = env::LOG_FORMAT, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: cli::Cmd,
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    cli::run(cli.command).await
}
