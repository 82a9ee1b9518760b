//! `tether appliance register|list|show|disable|enable|revoke|renew` and `tether token
//! create`: calls to control's appliance routes with the stored operator credential (see
//! [`crate::cli`]). Control checks the role on every call: reads need `viewer`, changes
//! `operator`.

use std::time::Duration;

use anyhow::bail;
use tether_api::appliances::{
    ApplianceDetail, ApplianceList, ApplianceSummary, PlatformBinding, RegisterRequest,
    RenewResponse, StatusResponse, TokenRequest, TokenResponse,
};

use super::{print_json, Client, Common, Output};

/// Statuses `--status` accepts.
const STATUSES: [&str; 3] = ["active", "disabled", "revoked"];
/// Trust states `--trust-state` accepts.
const TRUST_STATES: [&str; 6] = [
    "trusted",
    "renewal_recommended",
    "renewal_due",
    "expired",
    "not_enrolled",
    "trust_revoked",
];

/// `tether appliance`.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum ApplianceCmd {
    /// Register appliance ID with its platform binding (operator role).
    #[command(group = clap::ArgGroup::new("binding").required(true))]
    Register {
        /// Appliance id: 1-128 of [A-Za-z0-9._-].
        id: String,
        /// Tenant (customer) the appliance belongs to [default: control's, "default"].
        #[arg(long)]
        tenant: Option<String>,
        /// AWS: the IAM role ARN the appliance runs as.
        #[arg(long, group = "binding")]
        aws_role: Option<String>,
        /// GCP: project id (with --gcp-service-account).
        #[arg(long, group = "binding", requires = "gcp_service_account")]
        gcp_project: Option<String>,
        /// GCP: service-account email.
        #[arg(long, requires = "gcp_project")]
        gcp_service_account: Option<String>,
        /// Kubernetes: the cluster's OIDC issuer URL (with --k8s-namespace and
        /// --k8s-service-account).
        #[arg(long, group = "binding", requires_all = ["k8s_namespace", "k8s_service_account"])]
        k8s_issuer: Option<String>,
        /// Kubernetes: namespace.
        #[arg(long, requires = "k8s_issuer")]
        k8s_namespace: Option<String>,
        /// Kubernetes: service account.
        #[arg(long, requires = "k8s_issuer")]
        k8s_service_account: Option<String>,
        /// No platform identity: enroll with one-time tokens only.
        #[arg(long, group = "binding")]
        token_only: bool,
        #[command(flatten)]
        common: Common,
    },
    /// List appliances by id, with their trust state (viewer role).
    List {
        /// Only this status.
        #[arg(long, value_parser = STATUSES)]
        status: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this trust state.
        #[arg(long, value_parser = TRUST_STATES)]
        trust_state: Option<String>,
        /// Start after this id (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// At most this many (1-1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Show appliance ID and all its certificates (viewer role).
    Show {
        /// Appliance id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Disable ID (reversible): its fingerprints leave the allowlist until enabled.
    Disable {
        /// Appliance id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Enable a disabled appliance ID.
    Enable {
        /// Appliance id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Revoke ID: every fingerprint leaves the allowlist now, renewal is refused until it
    /// enrolls again with a fresh proof.
    Revoke {
        /// Appliance id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Ask ID to renew now (bumps its manual-renewal generation).
    Renew {
        /// Appliance id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

/// `tether token`.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum TokenCmd {
    /// Create a one-time enrollment token for appliance ID (operator role); printed once,
    /// alone on the last line.
    Create {
        /// Appliance id.
        id: String,
        /// Lifetime, e.g. 24h (at most 30 days) [default: control's, 24h].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[command(flatten)]
        common: Common,
    },
}

/// Refuse an invalid appliance id before it reaches a URL.
fn check_id(id: &str) -> anyhow::Result<()> {
    if let Err(e) = tether_identity::ApplianceId::new(id) {
        bail!("invalid appliance id {id:?}: {e}");
    }
    Ok(())
}

/// Percent-encode a query value (everything but RFC 3986 unreserved characters).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn binding_text(b: &PlatformBinding) -> String {
    match b {
        PlatformBinding::Aws { role_arn } => format!("aws {role_arn}"),
        PlatformBinding::Gcp {
            project,
            service_account,
        } => format!("gcp {project} {service_account}"),
        PlatformBinding::K8s {
            issuer,
            namespace,
            service_account,
        } => format!("k8s {issuer} {namespace}/{service_account}"),
        PlatformBinding::TokenOnly => "token_only".to_owned(),
    }
}

fn print_summary_table(list: &[ApplianceSummary]) {
    println!(
        "{:<32} {:<16} {:<8} {:<19} {:<20}  BINDING",
        "ID", "TENANT", "STATUS", "TRUST", "CERT NOT AFTER"
    );
    for a in list {
        println!(
            "{:<32} {:<16} {:<8} {:<19} {:<20}  {}",
            a.id,
            a.tenant,
            a.status.as_str(),
            a.trust_state.as_str(),
            a.certificate
                .as_ref()
                .map(|c| c.not_after.as_str())
                .unwrap_or("-"),
            binding_text(&a.binding)
        );
    }
}

/// Run a `tether appliance` command.
pub async fn run(cmd: ApplianceCmd) -> anyhow::Result<()> {
    match cmd {
        ApplianceCmd::Register {
            id,
            tenant,
            aws_role,
            gcp_project,
            gcp_service_account,
            k8s_issuer,
            k8s_namespace,
            k8s_service_account,
            token_only,
            common,
        } => {
            check_id(&id)?;
            let binding = match (
                aws_role,
                gcp_project.zip(gcp_service_account),
                k8s_issuer.zip(k8s_namespace).zip(k8s_service_account),
                token_only,
            ) {
                (Some(role_arn), ..) => PlatformBinding::Aws { role_arn },
                (_, Some((project, service_account)), ..) => PlatformBinding::Gcp {
                    project,
                    service_account,
                },
                (_, _, Some(((issuer, namespace), service_account)), _) => PlatformBinding::K8s {
                    issuer,
                    namespace,
                    service_account,
                },
                (.., true) => PlatformBinding::TokenOnly,
                _ => bail!(
                    "give one platform binding: --aws-role, --gcp-project/--gcp-service-account, \
                     --k8s-issuer/--k8s-namespace/--k8s-service-account, or --token-only"
                ),
            };
            register(
                RegisterRequest {
                    id,
                    tenant,
                    binding,
                },
                &common,
            )
            .await
        }
        ApplianceCmd::List {
            status,
            tenant,
            trust_state,
            after,
            limit,
            common,
        } => {
            let mut query = format!("limit={limit}");
            for (k, v) in [
                ("status", status),
                ("tenant", tenant),
                ("trust_state", trust_state),
                ("after", after),
            ] {
                if let Some(v) = v {
                    query.push_str(&format!("&{k}={}", encode(&v)));
                }
            }
            list(&query, &common).await
        }
        ApplianceCmd::Show { id, common } => show(&id, &common).await,
        ApplianceCmd::Disable { id, common } => status(&id, "disable", &common).await,
        ApplianceCmd::Enable { id, common } => status(&id, "enable", &common).await,
        ApplianceCmd::Revoke { id, common } => status(&id, "revoke", &common).await,
        ApplianceCmd::Renew { id, common } => renew(&id, &common).await,
    }
}

/// `tether appliance register`.
async fn register(body: RegisterRequest, common: &Common) -> anyhow::Result<()> {
    let client = Client::load(&common.dir()?)?;
    let a: ApplianceSummary = client.post("/v1/appliances", &body).await?;
    match common.output {
        Output::Json => print_json(&a)?,
        Output::Table => println!(
            "registered {} (tenant {}, {})",
            a.id,
            a.tenant,
            binding_text(&a.binding)
        ),
    }
    Ok(())
}

/// `tether appliance list` with `query` (already encoded).
async fn list(query: &str, common: &Common) -> anyhow::Result<()> {
    let client = Client::load(&common.dir()?)?;
    let list: ApplianceList = client.get(&format!("/v1/appliances?{query}")).await?;
    match common.output {
        Output::Json => print_json(&list)?,
        Output::Table => {
            print_summary_table(&list.appliances);
            if let Some(next) = &list.next {
                eprintln!("more: tether appliance list --after {next}");
            }
        }
    }
    Ok(())
}

/// `tether appliance show`.
async fn show(id: &str, common: &Common) -> anyhow::Result<()> {
    check_id(id)?;
    let client = Client::load(&common.dir()?)?;
    let d: ApplianceDetail = client.get(&format!("/v1/appliances/{id}")).await?;
    match common.output {
        Output::Json => print_json(&d)?,
        Output::Table => print_detail(&d),
    }
    Ok(())
}

/// An appliance's detail as `tether appliance show` prints it.
fn print_detail(d: &ApplianceDetail) {
    let a = &d.appliance;
    println!("id:                 {}", a.id);
    println!("tenant:             {}", a.tenant);
    println!("status:             {}", a.status.as_str());
    println!("trust:              {}", a.trust_state.as_str());
    println!("binding:            {}", binding_text(&a.binding));
    println!("renewal generation: {}", a.manual_renewal_generation);
    println!("registered:         {}", a.created_at);
    match &d.connection {
        Some(c) => {
            println!(
                "connected:          broker {} over {} since {} (session {})",
                c.broker,
                c.transport,
                tether_control::domain::rfc3339(c.connected_at as i64),
                c.session_id
            );
            println!(
                "last heartbeat:     {}",
                c.last_heartbeat
                    .map(|t| tether_control::domain::rfc3339(t as i64))
                    .unwrap_or_else(|| "none yet".into())
            );
            if let Some(t) = &c.trust_state {
                println!("agent trust state:  {t}");
            }
            if c.capabilities.iter().any(|c| c == "signed-ops/1") {
                // Read only: what the appliance says its customer's rules are.
                println!(
                    "signed operations:  on (the appliance decides under its customer's policy)"
                );
                for (k, v) in &c.agent_status {
                    println!("  {k:<18}{v}");
                }
            } else {
                println!("signed operations:  off (the appliance runs what the vendor sends)");
            }
        }
        None => println!("connected:          no (offline)"),
    }
    if d.certificates.is_empty() {
        println!("certificates:       none");
        return;
    }
    println!(
        "\n{:<40} {:<9} {:<20} {:<20}  FINGERPRINT",
        "SERIAL", "STATE", "NOT BEFORE", "NOT AFTER"
    );
    for c in &d.certificates {
        println!(
            "{:<40} {:<9} {:<20} {:<20}  {}",
            c.serial, c.state, c.not_before, c.not_after, c.fingerprint
        );
    }
}

/// `tether appliance renew`.
async fn renew(id: &str, common: &Common) -> anyhow::Result<()> {
    check_id(id)?;
    let client = Client::load(&common.dir()?)?;
    let r: RenewResponse = client
        .post(
            &format!("/v1/appliances/{id}/renew"),
            &serde_json::json!({}),
        )
        .await?;
    match common.output {
        Output::Json => print_json(&r)?,
        Output::Table => println!(
            "{}: manual renewal generation {} (the agent renews when it sees it)",
            r.id, r.manual_renewal_generation
        ),
    }
    Ok(())
}

async fn status(id: &str, verb: &str, common: &Common) -> anyhow::Result<()> {
    check_id(id)?;
    let client = Client::load(&common.dir()?)?;
    let r: StatusResponse = client
        .post(
            &format!("/v1/appliances/{id}/{verb}"),
            &serde_json::json!({}),
        )
        .await?;
    match common.output {
        Output::Json => print_json(&r)?,
        Output::Table => println!(
            "{}: {} (allowlist version {})",
            r.id,
            r.status.as_str(),
            r.allowlist_version
        ),
    }
    Ok(())
}

/// Run a `tether token` command.
pub async fn token(cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create { id, ttl, common } => {
            check_id(&id)?;
            let mut body = TokenRequest::default();
            if let Some(ttl) = ttl {
                if ttl.as_secs() == 0 {
                    bail!("--ttl must be at least 1s");
                }
                body.ttl_secs = Some(ttl.as_secs());
            }
            let client = Client::load(&common.dir()?)?;
            let t: TokenResponse = client
                .post(&format!("/v1/appliances/{id}/tokens"), &body)
                .await?;
            match common.output {
                Output::Json => print_json(&serde_json::json!({
                    "id": id,
                    "token": t.token,
                    "expires_at": t.expires_at,
                }))?,
                Output::Table => {
                    eprintln!(
                        "one-time enrollment token for {id}, valid until {} (shown once):",
                        t.expires_at
                    );
                    println!("{}", t.token);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("acme"), "acme");
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn the_filters_name_every_state() {
        for s in tether_api::trust::TrustState::ALL {
            assert!(TRUST_STATES.contains(&s.as_str()), "{}", s.as_str());
        }
    }
}
