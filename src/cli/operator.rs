//! `tether operator invite|list|revoke` and `tether fleet trust`: calls to control's
//! operator API with the stored credential (see [`crate::cli`]). Control checks the role
//! on every call.

use std::path::PathBuf;
use std::time::Duration;

use tether_api::operators::{Bundle, InviteRequest, OperatorList, RevokeResponse, Role};
use tether_api::trust::FleetTrust;

use super::{check_name, print_json, write_secret, Client, Common, Output};

/// `tether operator`.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum OperatorCmd {
    /// Create a one-time enrollment bundle for operator NAME (admin only).
    Invite {
        /// Operator name: 1-128 of [A-Za-z0-9._-].
        name: String,
        /// Role: admin, operator or viewer.
        #[arg(long)]
        role: Role,
        /// Lifetime of the bundle (at most 30 days).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Write the bundle to this file (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// List operators (admin only).
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Revoke operator NAME: its certificates are refused from the next call on, and its
    /// unredeemed bundles cancelled (admin only).
    Revoke {
        /// Operator name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

/// `tether fleet`.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum FleetCmd {
    /// Counts by trust state and the active trust alerts.
    Trust {
        #[command(flatten)]
        common: Common,
    },
}

/// Run a `tether operator` command.
pub async fn run(cmd: OperatorCmd) -> anyhow::Result<()> {
    match cmd {
        OperatorCmd::Invite {
            name,
            role,
            ttl,
            out,
            common,
        } => {
            check_name(&name)?;
            let client = Client::load(&common.dir()?)?;
            let mut bundle: Bundle = client
                .post(
                    "/v1/operators/invites",
                    &InviteRequest {
                        name: name.clone(),
                        role,
                        ttl_secs: Some(ttl.as_secs()),
                    },
                )
                .await?;
            // The new operator reaches control where this CLI does.
            bundle.control_url = client.profile.control_url.clone();
            let json = serde_json::to_vec_pretty(&bundle)?;
            match out {
                Some(path) => {
                    write_secret(&path, &json)?;
                    match common.output {
                        Output::Json => print_json(&serde_json::json!({
                            "name": bundle.name,
                            "role": bundle.role,
                            "expires_at": bundle.expires_at,
                            "file": path,
                        }))?,
                        Output::Table => println!(
                            "one-time bundle for {} ({}), valid until {}: {}",
                            bundle.name,
                            bundle.role.as_str(),
                            bundle.expires_at,
                            path.display()
                        ),
                    }
                }
                None => println!("{}", String::from_utf8_lossy(&json)),
            }
        }
        OperatorCmd::List { common } => {
            let client = Client::load(&common.dir()?)?;
            let list: OperatorList = client.get("/v1/operators").await?;
            match common.output {
                Output::Json => print_json(&list)?,
                Output::Table => {
                    println!(
                        "{:<32} {:<9} {:<8} {:>5}  CREATED",
                        "NAME", "ROLE", "STATUS", "CERTS"
                    );
                    for o in &list.operators {
                        println!(
                            "{:<32} {:<9} {:<8} {:>5}  {}",
                            o.name,
                            o.role.as_str(),
                            o.status.as_str(),
                            o.certificates,
                            tether_control::domain::rfc3339(o.created_at)
                        );
                    }
                }
            }
        }
        OperatorCmd::Revoke { name, common } => {
            check_name(&name)?;
            let client = Client::load(&common.dir()?)?;
            let r: RevokeResponse = client
                .post(
                    &format!("/v1/operators/{name}/revoke"),
                    &serde_json::json!({}),
                )
                .await?;
            match common.output {
                Output::Json => print_json(&r)?,
                Output::Table => println!(
                    "revoked {}: {} certificate(s) no longer honoured, {} pending bundle(s) cancelled",
                    r.name, r.revoked.certificates_removed, r.revoked.invites_cancelled
                ),
            }
        }
    }
    Ok(())
}

/// Run a `tether fleet` command.
pub async fn fleet(cmd: FleetCmd) -> anyhow::Result<()> {
    match cmd {
        FleetCmd::Trust { common } => {
            let client = Client::load(&common.dir()?)?;
            let fleet: FleetTrust = client.get("/v1/fleet/trust").await?;
            match common.output {
                Output::Json => print_json(&fleet)?,
                Output::Table => {
                    println!("{} appliance(s), {} disabled", fleet.total, fleet.disabled);
                    for (state, n) in &fleet.counts {
                        println!("  {state:<20} {n}");
                    }
                    if fleet.alerts.is_empty() {
                        println!("no trust alerts");
                    }
                    for a in &fleet.alerts {
                        println!(
                            "ALERT {} ({}) {} not_after {}: {}",
                            a.appliance_id,
                            a.tenant,
                            a.state.as_str(),
                            a.not_after,
                            a.message
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
