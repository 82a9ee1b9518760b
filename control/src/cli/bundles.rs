//! `tether-control operator invite` and `tether-control broker add`: one-time bundles
//! made by the same operations as `POST /v1/operators/invites` and `POST /v1/brokers`,
//! as the local admin.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_api::brokers::AddBroker;
use tether_api::operators::InviteRequest;
use tether_control::domain::operators::Caller;
use tether_control::domain::{brokers, operators};

use super::{registry, root_pem, write_secret, BrokerCmd, OperatorCmd};

/// `operator invite`.
pub async fn operator(cmd: OperatorCmd, now: i64) -> anyhow::Result<()> {
    let OperatorCmd::Invite {
        dir,
        name,
        role,
        ttl,
        out,
    } = cmd;
    let (_, r) = registry(&dir.data_dir).await?;
    let req = InviteRequest {
        name: name.clone(),
        role,
        ttl_secs: Some(ttl.as_secs()),
    };
    let ca_pem = root_pem(&dir.data_dir)?;
    let bundle = operators::invite(&r, &Caller::LocalAdmin, ca_pem, &req, now).await?;
    let what = format!("{name} ({})", role.as_str());
    write_bundle(&serde_json::to_vec_pretty(&bundle)?, out, &what, ttl)
}

/// `broker add`.
pub async fn broker(cmd: BrokerCmd, now: i64) -> anyhow::Result<()> {
    let BrokerCmd::Add {
        dir,
        name,
        ttl,
        out,
    } = cmd;
    let (cfg, r) = registry(&dir.data_dir).await?;
    let req = AddBroker {
        name: name.clone(),
        ttl_secs: Some(ttl.as_secs()),
    };
    let ca_pem = root_pem(&dir.data_dir)?;
    let td = cfg.trust_domain.as_str();
    let bundle = brokers::create(&r, &Caller::LocalAdmin, ca_pem, td, &req, now).await?;
    let what = format!("broker {name}");
    write_bundle(&serde_json::to_vec_pretty(&bundle)?, out, &what, ttl)
}

/// Write a bundle to `out` (mode 0600), or print it.
fn write_bundle(
    json: &[u8],
    out: Option<PathBuf>,
    what: &str,
    ttl: Duration,
) -> anyhow::Result<()> {
    match out.as_deref() {
        Some(path) => write_to(path, json, what, ttl),
        None => {
            println!("{}", String::from_utf8_lossy(json));
            Ok(())
        }
    }
}

fn write_to(path: &Path, json: &[u8], what: &str, ttl: Duration) -> anyhow::Result<()> {
    write_secret(path, json)?;
    println!(
        "one-time bundle for {what}, valid {}: {}",
        humantime::format_duration(ttl),
        path.display()
    );
    Ok(())
}
