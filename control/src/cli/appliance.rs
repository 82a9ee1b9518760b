//! `tether-control appliance …`, `token create`, `fleet trust` and `allowlist export`:
//! the operations of [`tether_control::domain::appliances`] and
//! [`tether_control::domain::trust`], as the local admin.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use tether_api::appliances::{ApplianceStatus, PlatformBinding, RegisterRequest};
use tether_audit::action;
use tether_control::domain::appliances;
use tether_control::domain::operators::Caller;

use super::{open, registry, ApplianceCmd};

/// `appliance …`.
pub async fn appliance(cmd: ApplianceCmd, now: i64) -> anyhow::Result<()> {
    match cmd {
        ApplianceCmd::Register {
            dir,
            id,
            tenant,
            aws_role,
            gcp_project,
            gcp_service_account,
            k8s_issuer,
            k8s_namespace,
            k8s_service_account,
            token_only,
        } => {
            let binding = match (aws_role, gcp_project, gcp_service_account, k8s_issuer, k8s_namespace, k8s_service_account, token_only) {
                (Some(role_arn), ..) => PlatformBinding::Aws { role_arn },
                (_, Some(project), Some(service_account), ..) => PlatformBinding::Gcp { project, service_account },
                (_, _, _, Some(issuer), Some(namespace), Some(service_account), _) => PlatformBinding::K8s { issuer, namespace, service_account },
                (.., true) => PlatformBinding::TokenOnly,
                _ => bail!("give one platform binding: --aws-role, --gcp-project/--gcp-service-account, --k8s-issuer/--k8s-namespace/--k8s-service-account, or --token-only"),
            };
            let (_, r) = registry(&dir.data_dir).await?;
            let req = RegisterRequest {
                id: id.clone(),
                tenant: Some(tenant),
                binding,
            };
            appliances::register(&r, &Caller::LocalAdmin, req, now).await?;
            println!("registered {id}");
        }
        ApplianceCmd::Show { dir, id } => show(&dir.data_dir, &id, now).await?,
        ApplianceCmd::Revoke { dir, id } => {
            set_status(&dir.data_dir, &id, ApplianceStatus::Revoked, now).await?
        }
        ApplianceCmd::Disable { dir, id } => {
            set_status(&dir.data_dir, &id, ApplianceStatus::Disabled, now).await?
        }
        ApplianceCmd::Enable { dir, id } => {
            set_status(&dir.data_dir, &id, ApplianceStatus::Active, now).await?
        }
        ApplianceCmd::Renew { dir, id } => {
            let (_, r) = registry(&dir.data_dir).await?;
            let by = Caller::LocalAdmin;
            let what = action::APPLIANCE_REQUEST_RENEWAL;
            let event = appliances::begin_change(&r, &by, &id, what, now).await?;
            let renewed = appliances::request_renewal(&r, &by, event, &id, now).await?;
            println!(
                "{id}: manual renewal generation {}",
                renewed.manual_renewal_generation
            );
        }
    }
    Ok(())
}

async fn show(dir: &Path, id: &str, now: i64) -> anyhow::Result<()> {
    let (_, r) = registry(dir).await?;
    let detail = appliances::show(&r, id, now).await?;
    let a = &detail.appliance;
    println!(
        "id:       {}\ntenant:   {}\nstatus:   {:?}\ntrust:    {}\nbinding:  {}\nrenewal generation: {}",
        a.id,
        a.tenant,
        a.status,
        a.trust_state.as_str(),
        serde_json::to_string(&a.binding)?,
        a.manual_renewal_generation
    );
    for c in &detail.certificates {
        println!(
            "cert:     serial {} fingerprint {} not_after {} {}",
            c.serial, c.fingerprint, c.not_after, c.state
        );
    }
    Ok(())
}

async fn set_status(dir: &Path, id: &str, status: ApplianceStatus, now: i64) -> anyhow::Result<()> {
    let (_, r) = registry(dir).await?;
    let by = Caller::LocalAdmin;
    let what = appliances::status_action(status);
    let event = appliances::begin_change(&r, &by, id, what, now).await?;
    let changed = appliances::change_status(&r, &by, event, id, status, now).await?;
    println!(
        "{id}: {status:?}; allowlist version {}",
        changed.allowlist_version
    );
    Ok(())
}

/// `token create`.
pub async fn token_create(
    dir: &Path,
    id: &str,
    ttl: Option<Duration>,
    now: i64,
) -> anyhow::Result<()> {
    let (cfg, r) = registry(dir).await?;
    let by = Caller::LocalAdmin;
    let event = appliances::begin_change(&r, &by, id, action::TOKEN_CREATE, now).await?;
    let token = appliances::create_token(&r, &by, event, id, ttl, now).await?;
    eprintln!(
        "one-time enrollment token for {id}, valid for {} (shown once):",
        humantime::format_duration(ttl.unwrap_or(cfg.enroll.token_ttl))
    );
    println!("{}", token.token);
    Ok(())
}

/// `fleet trust`.
pub async fn fleet_trust(dir: &Path, json: bool, now: i64) -> anyhow::Result<()> {
    let (cfg, store) = open(dir).await?;
    let fleet = tether_control::domain::trust::fleet_trust(store.as_ref(), &cfg.trust, now).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&fleet)?);
        return Ok(());
    }
    println!("{} appliance(s), {} disabled", fleet.total, fleet.disabled);
    for state in tether_api::trust::TrustState::ALL {
        println!("  {:<20} {}", state.as_str(), fleet.counts[state.as_str()]);
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
    Ok(())
}

/// `allowlist export`.
pub async fn allowlist_export(dir: &Path) -> anyhow::Result<()> {
    let (_, store) = open(dir).await?;
    let (version, entries) = store.allowlist_snapshot().await?;
    println!("# tether allowlist, version {version}");
    for (id, fingerprint) in entries {
        println!("{id} {fingerprint}");
    }
    Ok(())
}
