//! `tether`: the Tether command-line tool. For now it runs the local quickstart
//! (`tether up`); operator commands arrive with the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tether: connection broker for vendor-managed appliances.
#[derive(Debug, Parser)]
#[command(name = "tether", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a local Tether on 127.0.0.1: a broker and a simulated fleet of real agents,
    /// with a development PKI in the data directory. Ctrl-C stops everything.
    Up {
        /// Number of simulated appliances.
        #[arg(long, default_value_t = 100, env = "TETHER_UP_APPLIANCES")]
        appliances: usize,
        /// Data directory (PKI, broker config, allowlist, appliance state).
        #[arg(long, default_value = "tether-data", env = "TETHER_UP_DATA_DIR")]
        data_dir: PathBuf,
        /// Broker QUIC listen address.
        #[arg(long, default_value = "127.0.0.1:7443", env = "TETHER_UP_LISTEN")]
        listen: SocketAddr,
        /// Broker admin listen address.
        #[arg(long, default_value = "127.0.0.1:7444", env = "TETHER_UP_ADMIN_LISTEN")]
        admin_listen: SocketAddr,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,tether_broker=info,tether_broker::server=warn")
    });
    tracing_subscriber::fmt().with_env_filter(filter).init();
    match cli.command {
        Cmd::Up {
            appliances,
            data_dir,
            listen,
            admin_listen,
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
                    listen,
                    admin_listen,
                },
                shutdown,
            )
            .await
        }
    }
}
