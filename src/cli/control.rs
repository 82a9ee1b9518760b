//! `tether control replicas`: the live control replicas sharing the fleet's database.

use clap::Subcommand;
use tether_api::control::ReplicaList;

use super::{print_json, Client, Common, Output};

/// `tether control ...`
#[derive(Debug, Subcommand)]
pub enum ControlCmd {
    /// List the live control replicas (heartbeat within 15 s): id, advertised address,
    /// version, last heartbeat; `*` marks the replica that answered (pick one with
    /// `--control URL`).
    Replicas {
        #[command(flatten)]
        common: Common,
    },
}

/// Run a `tether control` command.
pub async fn run(cmd: ControlCmd) -> anyhow::Result<()> {
    match cmd {
        ControlCmd::Replicas { common } => {
            let client = Client::load(&common.dir()?)?;
            let list: ReplicaList = client.get("/v1/control/replicas").await?;
            match common.output {
                Output::Json => print_json(&list)?,
                Output::Table => {
                    println!(
                        "  {:<36} {:<24} {:<24} {:<10} {:<21} HEARTBEAT",
                        "ID", "ADVERTISE", "API", "VERSION", "STARTED"
                    );
                    for r in &list.replicas {
                        println!(
                            "{} {:<36} {:<24} {:<24} {:<10} {:<21} {}",
                            if r.id == list.answered_by { "*" } else { " " },
                            r.id,
                            r.advertise,
                            r.api_addr,
                            r.version,
                            rfc3339(r.started_at),
                            rfc3339(r.heartbeat_at),
                        );
                    }
                    if list.replicas.is_empty() {
                        println!("(no replica registered: control runs on SQLite, single node)");
                    }
                }
            }
        }
    }
    Ok(())
}

/// Unix seconds as RFC 3339 (UTC), or the number when out of range.
fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}
