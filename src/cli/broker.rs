//! `tether broker add|list|drain|revoke`: the brokers of the edge cluster.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use tether_api::brokers::BrokerBundle;
use tether_api::brokers::{AddBroker, BrokerList};

use super::{check_name, print_json, write_secret, Client, Common, Output};

/// `tether broker ...`
#[derive(Debug, Subcommand)]
pub enum BrokerCmd {
    /// Create a one-time bundle for a new broker NAME; start the broker with
    /// `tether-broker --bundle FILE --data-dir DIR` (the bundle works once, within --ttl).
    Add {
        /// Broker name: 1-128 of [A-Za-z0-9._-].
        name: String,
        /// Write the bundle here (mode 0600) [default: NAME.broker.json].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Lifetime of the bundle.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        #[command(flatten)]
        common: Common,
    },
    /// List brokers: status, address, whether their channel to control is up.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Drain broker NAME (admin), exactly as SIGTERM does: every appliance gets GoAway and
    /// reconnects to another broker after a random delay (up to the broker's
    /// reconnect_jitter), then the broker stops (`tether up` starts its own again, as a
    /// rolling upgrade would). `tether broker list` shows it draining meanwhile.
    Drain {
        /// Broker name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Revoke broker NAME (admin): its certificate is refused and its channel closed.
    Revoke {
        /// Broker name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

/// Run a `tether broker` command.
pub async fn run(cmd: BrokerCmd) -> anyhow::Result<()> {
    match cmd {
        BrokerCmd::Add {
            name,
            out,
            ttl,
            common,
        } => {
            check_name(&name)?;
            let client = Client::load(&common.dir()?)?;
            let bundle: BrokerBundle = client
                .post(
                    "/v1/brokers",
                    &AddBroker {
                        name: name.clone(),
                        ttl_secs: Some(ttl.as_secs()),
                    },
                )
                .await?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.broker.json")));
            write_secret(&out, &serde_json::to_vec_pretty(&bundle)?)?;
            println!(
                "one-time bundle for broker {name}, valid {}: {}\nstart it with: tether-broker --bundle {} --data-dir {name}-data",
                humantime::format_duration(ttl),
                out.display(),
                out.display()
            );
        }
        BrokerCmd::List { common } => {
            let client = Client::load(&common.dir()?)?;
            let list: BrokerList = client.get("/v1/brokers").await?;
            match common.output {
                Output::Json => print_json(&list)?,
                Output::Table => {
                    println!(
                        "{:<20} {:<8} {:<10} {:<9} {:>8} {:<22} {:>8} {:>9} {:<18}  LAST SEEN",
                        "NAME",
                        "STATUS",
                        "CHANNEL",
                        "STATE",
                        "REPLICAS",
                        "QUIC",
                        "VERSION",
                        "SESSIONS",
                        "TRANSPORTS"
                    );
                    for b in &list.brokers {
                        let transports = b
                            .sessions_by_transport
                            .as_ref()
                            .filter(|t| !t.is_empty())
                            .map(|t| {
                                t.iter()
                                    .map(|(k, v)| format!("{k}={v}"))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_else(|| "-".into());
                        println!(
                            "{:<20} {:<8} {:<10} {:<9} {:>8} {:<22} {:>8} {:>9} {:<18}  {}",
                            b.name,
                            b.status.as_str(),
                            if b.connected { "up" } else { "down" },
                            match (b.connected, b.draining) {
                                (true, true) => "draining",
                                (true, false) => "serving",
                                (false, _) => "-",
                            },
                            b.replicas_connected
                                .map(|v| v.to_string())
                                .unwrap_or_else(|| "-".into()),
                            b.quic_addr.as_deref().unwrap_or("-"),
                            b.allowlist_version
                                .map(|v| v.to_string())
                                .unwrap_or_else(|| "-".into()),
                            b.sessions
                                .map(|v| v.to_string())
                                .unwrap_or_else(|| "-".into()),
                            transports,
                            b.last_seen.as_deref().unwrap_or("never"),
                        );
                    }
                }
            }
        }
        BrokerCmd::Drain { name, common } => {
            check_name(&name)?;
            let client = Client::load(&common.dir()?)?;
            client
                .post_stream(&format!("/v1/brokers/{name}/drain"), &serde_json::json!({}))
                .await
                .context("draining the broker")?;
            match common.output {
                Output::Json => print_json(&serde_json::json!({"broker": name, "draining": true}))?,
                Output::Table => println!(
                    "broker {name} is draining: its appliances reconnect to other brokers, then it stops"
                ),
            }
        }
        BrokerCmd::Revoke { name, common } => {
            check_name(&name)?;
            let client = Client::load(&common.dir()?)?;
            client
                .post_stream(
                    &format!("/v1/brokers/{name}/revoke"),
                    &serde_json::json!({}),
                )
                .await
                .context("revoking the broker")?;
            println!("broker {name} revoked");
        }
    }
    Ok(())
}
