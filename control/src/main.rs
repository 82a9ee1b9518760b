//! `tether-control`: the CA, the store and the enrollment API. `main` parses the command
//! line and wires the parts; the work is in the library.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tether_api::appliances::{ApplianceStatus, PlatformBinding};
use tether_audit::{self as audit, action, Actor, AuditEvent, Outcome};
use tether_control::audit_log;
use tether_control::config::{env, ControlConfig};
use tether_control::store::{Appliance, Store, StoreError};
use tokio_util::sync::CancellationToken;

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
    command: Cmd,
}

#[derive(Debug, Args)]
struct DataDir {
    /// Data directory (CA keys, control.toml, SQLite database).
    #[arg(long, env = env::DATA_DIR)]
    data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create the root and intermediate CA, the control server certificate, the config and
    /// the store.
    Init {
        #[command(flatten)]
        dir: DataDir,
        /// SPIFFE trust domain of the fleet (e.g. example.com).
        #[arg(long)]
        trust_domain: String,
        /// DNS name for the control server certificate (repeatable) [default: localhost].
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// IP address for the control server certificate (repeatable) [default: 127.0.0.1, ::1].
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// HTTPS listen address recorded in control.toml [default: 127.0.0.1:8443].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Broker address handed to enrolled appliances (repeatable).
        #[arg(long = "broker")]
        brokers: Vec<String>,
        /// Database URL (postgres://...) instead of the embedded SQLite file.
        #[arg(long, env = env::DATABASE_URL)]
        database_url: Option<String>,
        /// Keep the root and intermediate keys in AWS KMS (ECC_NIST_P256, SIGN_VERIFY);
        /// they never leave it. Credentials come from the standard AWS chain.
        #[arg(long)]
        kms: bool,
        /// KMS region [default: the AWS chain's, e.g. AWS_REGION].
        #[arg(long, requires = "kms", env = "AWS_REGION")]
        kms_region: Option<String>,
        /// KMS endpoint URL (a VPC endpoint or an emulator).
        #[arg(long, requires = "kms")]
        kms_endpoint_url: Option<String>,
        /// Existing root key (id, ARN or alias/...) [default: create one].
        #[arg(long, requires = "kms")]
        kms_root_key: Option<String>,
        /// Existing intermediate key (id, ARN or alias/...) [default: create one].
        #[arg(long, requires = "kms")]
        kms_intermediate_key: Option<String>,
        /// Where to write the first admin's one-time enrollment bundle (mode 0600; give it
        /// to `tether login --bundle`) [default: DATA_DIR/admin-bundle.json].
        #[arg(long)]
        admin_bundle: Option<PathBuf>,
    },
    /// Serve the enrollment API over HTTPS.
    Serve {
        #[command(flatten)]
        dir: DataDir,
        /// HTTPS listen address [default: from control.toml, 127.0.0.1:8443].
        #[arg(long, env = env::LISTEN)]
        listen: Option<SocketAddr>,
        /// Local metrics listen address [default: from control.toml, 127.0.0.1:8444].
        #[arg(long, env = env::METRICS_LISTEN)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Administer appliances.
    #[command(subcommand)]
    Appliance(ApplianceCmd),
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The fleet as a whole.
    #[command(subcommand)]
    Fleet(FleetCmd),
    /// The allowlist brokers enforce.
    #[command(subcommand)]
    Allowlist(AllowlistCmd),
    /// The audit log: every trust change and refusal, hash-chained.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Operators (bundles for `tether login`).
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// Brokers of the edge cluster (bundles for `tether-broker --bundle`).
    #[command(subcommand)]
    Broker(BrokerCmd),
}

#[derive(Debug, Subcommand)]
enum BrokerCmd {
    /// Create a one-time bundle for broker NAME (for `tether-broker --bundle FILE`).
    Add {
        #[command(flatten)]
        dir: DataDir,
        /// Broker name: 1-128 of [A-Za-z0-9._-].
        name: String,
        /// Lifetime of the bundle (at most 30 days).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Write the bundle to this file (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum OperatorCmd {
    /// Create a one-time enrollment bundle for operator NAME (for `tether login --bundle`).
    Invite {
        #[command(flatten)]
        dir: DataDir,
        /// Operator name: 1-128 of [A-Za-z0-9._-].
        name: String,
        /// Role: admin, operator or viewer.
        #[arg(long)]
        role: tether_api::operators::Role,
        /// Lifetime of the bundle (at most 30 days).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Write the bundle to this file (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Print entries as JSON lines, oldest first.
    List {
        #[command(flatten)]
        dir: DataDir,
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Check the whole hash chain from the first entry; fails (non-zero exit) at the first
    /// entry that was edited, removed or reordered. Entries cut from the end cannot be
    /// detected without a checkpoint.
    Verify {
        #[command(flatten)]
        dir: DataDir,
    },
    /// Sign a checkpoint of the log's head now (as `serve` does every `[audit]
    /// checkpoint_every`), after checking that the log extends the last checkpoint.
    /// Prints the checkpoint, or says that no entry is newer than the last one.
    Checkpoint {
        #[command(flatten)]
        dir: DataDir,
    },
    /// Write the whole log and its signed checkpoints to FILE as JSON lines (a header
    /// line, then entries in order, each checkpoint after the entry it vouches for), for
    /// `tether audit verify FILE`.
    Export {
        #[command(flatten)]
        dir: DataDir,
        /// The file to write (replaced atomically).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AllowlistCmd {
    /// Print the allowlist in the standalone broker's file format (`<appliance-id>
    /// <sha256-hex>` per line), for a broker that does not follow control yet.
    Export {
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Debug, Subcommand)]
enum FleetCmd {
    /// Counts by trust state and the active trust alerts.
    Trust {
        #[command(flatten)]
        dir: DataDir,
        /// Print JSON (the same document as GET /v1/fleet/trust).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ApplianceCmd {
    /// Register an appliance with its platform binding.
    Register {
        #[command(flatten)]
        dir: DataDir,
        /// Appliance id: 1-128 of [A-Za-z0-9._-].
        id: String,
        /// Tenant (customer) the appliance belongs to.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// AWS: the IAM role ARN the appliance runs as.
        #[arg(long, group = "binding")]
        aws_role: Option<String>,
        /// GCP: project id (with --gcp-service-account).
        #[arg(long, group = "binding", requires = "gcp_service_account")]
        gcp_project: Option<String>,
        /// GCP: service-account email.
        #[arg(long, requires = "gcp_project")]
        gcp_service_account: Option<String>,
        /// Kubernetes: the cluster's OIDC issuer URL (with --k8s-namespace and --k8s-service-account).
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
    },
    /// Show an appliance and its certificates.
    Show {
        #[command(flatten)]
        dir: DataDir,
        /// Appliance id.
        id: String,
    },
    /// Revoke: remove every fingerprint now; renewal refused until it re-enrolls with a fresh proof.
    Revoke {
        #[command(flatten)]
        dir: DataDir,
        /// Appliance id.
        id: String,
    },
    /// Disable (reversible): its fingerprints leave the allowlist until enabled.
    Disable {
        #[command(flatten)]
        dir: DataDir,
        /// Appliance id.
        id: String,
    },
    /// Enable a disabled appliance.
    Enable {
        #[command(flatten)]
        dir: DataDir,
        /// Appliance id.
        id: String,
    },
    /// Ask the appliance to renew now (bumps its manual-renewal generation, which reaches
    /// the agent with its next heartbeat answer).
    Renew {
        #[command(flatten)]
        dir: DataDir,
        /// Appliance id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a one-time enrollment token for an appliance; printed once, alone on the last line.
    Create {
        #[command(flatten)]
        dir: DataDir,
        /// Appliance id.
        id: String,
        /// Lifetime [default: from control.toml, 24h].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
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

async fn open(
    dir: &Path,
) -> anyhow::Result<(ControlConfig, Arc<dyn tether_control::store::Store>)> {
    let cfg = ControlConfig::load(dir)?;
    let store = tether_control::open_store(&cfg, dir).await?;
    Ok((cfg, store))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    let now = tether_control::now_unix();
    match cli.command {
        Cmd::Init {
            dir,
            trust_domain,
            dns_names,
            ips,
            listen,
            brokers,
            database_url,
            kms,
            kms_region,
            kms_endpoint_url,
            kms_root_key,
            kms_intermediate_key,
            admin_bundle,
        } => {
            let data_dir = dir.data_dir;
            let mut cfg = ControlConfig {
                trust_domain,
                brokers,
                database_url,
                ..ControlConfig::default()
            };
            if !dns_names.is_empty() {
                cfg.dns_names = dns_names;
            }
            if !ips.is_empty() {
                cfg.ips = ips;
            }
            if let Some(l) = listen {
                cfg.listen = l;
            }
            let kms = kms.then(|| tether_control::ca::KmsSettings {
                region: kms_region,
                endpoint_url: kms_endpoint_url,
                root_key: kms_root_key,
                intermediate_key: kms_intermediate_key,
                ..Default::default()
            });
            let (ca, store) = tether_control::run::init(&data_dir, &cfg, kms).await?;
            let root = data_dir.join("ca").join("root.pem");
            println!(
                "initialised {} for trust domain {}",
                data_dir.display(),
                cfg.trust_domain
            );
            println!(
                "root CA (give it to appliances and operators): {}",
                root.display()
            );
            let bundle_path = admin_bundle.unwrap_or_else(|| data_dir.join("admin-bundle.json"));
            let bundle = tether_control::operators::create_invite(
                store.as_ref(),
                tether_control::operators::control_url(&cfg),
                ca.root_pem(),
                tether_control::operators::FIRST_ADMIN,
                tether_api::operators::Role::Admin,
                tether_control::operators::ADMIN_BUNDLE_TTL,
                local_admin(),
                now,
            )
            .await?;
            write_secret(&bundle_path, &serde_json::to_vec_pretty(&bundle)?)?;
            println!(
                "first admin's one-time bundle (valid {}; `tether login --bundle FILE`): {}",
                humantime::format_duration(tether_control::operators::ADMIN_BUNDLE_TTL),
                bundle_path.display()
            );
        }
        Cmd::Serve {
            dir,
            listen,
            metrics_listen,
        } => {
            let started =
                tether_control::run::Started::bind(&dir.data_dir, listen, metrics_listen).await?;
            let shutdown = CancellationToken::new();
            let trigger = shutdown.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                trigger.cancel();
            });
            started.serve(shutdown).await?;
        }
        Cmd::Appliance(cmd) => appliance(cmd, now).await?,
        Cmd::Audit(cmd) => audit_cmd(cmd).await?,
        Cmd::Operator(cmd) => operator_cmd(cmd, now).await?,
        Cmd::Broker(cmd) => broker_cmd(cmd, now).await?,
        Cmd::Allowlist(AllowlistCmd::Export { dir }) => {
            let (_, store) = open(&dir.data_dir).await?;
            let (version, entries) = store.allowlist_snapshot().await?;
            println!("# tether allowlist, version {version}");
            for (id, fingerprint) in entries {
                println!("{id} {fingerprint}");
            }
        }
        Cmd::Fleet(FleetCmd::Trust { dir, json }) => {
            let (cfg, store) = open(&dir.data_dir).await?;
            let fleet = tether_control::trust::fleet_trust(store.as_ref(), &cfg.trust, now).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&fleet)?);
            } else {
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
            }
        }
        Cmd::Token(TokenCmd::Create { dir, id, ttl }) => {
            let (cfg, store) = open(&dir.data_dir).await?;
            let ttl = ttl.unwrap_or(cfg.enroll.token_ttl);
            let token = tether_control::token::Token::generate();
            let hash = token.hash();
            let expires = now + ttl.as_secs() as i64;
            let event = AuditEvent::success(local_admin(), action::TOKEN_CREATE, &id)
                .with("token_ref", audit::token_ref(&hash))
                .with("expires_at", expires);
            if let Err(e) = store.create_token(&id, &hash, expires, now, &event).await {
                let not_found = matches!(e, StoreError::NotFound(_));
                let e = refused(store.as_ref(), event, e, now).await;
                if not_found {
                    bail!("appliance {id} is not registered");
                }
                return Err(e);
            }
            eprintln!(
                "one-time enrollment token for {id}, valid for {} (shown once):",
                humantime::format_duration(ttl)
            );
            println!("{}", token.expose());
        }
    }
    Ok(())
}

async fn appliance(cmd: ApplianceCmd, now: i64) -> anyhow::Result<()> {
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
            if let Err(e) = tether_identity::ApplianceId::new(&id) {
                bail!("invalid appliance id {id:?}: {e}");
            }
            if let Some(arn) = aws_role.as_deref() {
                if !tether_control::proof::aws::is_role_arn(arn) {
                    bail!("--aws-role {arn:?} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)");
                }
            }
            let binding = match (aws_role, gcp_project, gcp_service_account, k8s_issuer, k8s_namespace, k8s_service_account, token_only) {
                (Some(role_arn), ..) => PlatformBinding::Aws { role_arn },
                (_, Some(project), Some(service_account), ..) => PlatformBinding::Gcp { project, service_account },
                (_, _, _, Some(issuer), Some(namespace), Some(service_account), _) => PlatformBinding::K8s { issuer, namespace, service_account },
                (.., true) => PlatformBinding::TokenOnly,
                _ => bail!("give one platform binding: --aws-role, --gcp-project/--gcp-service-account, --k8s-issuer/--k8s-namespace/--k8s-service-account, or --token-only"),
            };
            let (_, store) = open(&dir.data_dir).await?;
            let event = AuditEvent::success(local_admin(), action::APPLIANCE_REGISTER, &id)
                .with("tenant", tenant.as_str())
                .with("binding", serde_json::to_value(&binding)?);
            let appliance = Appliance {
                id: id.clone(),
                tenant,
                binding,
                status: ApplianceStatus::Active,
                manual_renewal_generation: 0,
                created_at: now,
            };
            if let Err(e) = store.register_appliance(&appliance, &event).await {
                return Err(refused(store.as_ref(), event, e, now).await);
            }
            println!("registered {id}");
        }
        ApplianceCmd::Show { dir, id } => {
            let (cfg, store) = open(&dir.data_dir).await?;
            let a = store
                .get_appliance(&id)
                .await?
                .with_context(|| format!("appliance {id} is not registered"))?;
            let current = store.current_certificate(&id).await?;
            let trust =
                tether_control::trust::evaluate(a.status, current.as_ref(), now, &cfg.trust);
            println!(
                "id:       {}\ntenant:   {}\nstatus:   {:?}\ntrust:    {}\nbinding:  {}\nrenewal generation: {}",
                a.id,
                a.tenant,
                a.status,
                trust.as_str(),
                serde_json::to_string(&a.binding)?,
                a.manual_renewal_generation
            );
            for c in store.certificates(&id).await? {
                println!(
                    "cert:     serial {} fingerprint {} not_after {} {:?}",
                    c.serial, c.fingerprint, c.not_after, c.state
                );
            }
        }
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
            let (_, store) = open(&dir.data_dir).await?;
            let event = AuditEvent::success(local_admin(), action::APPLIANCE_REQUEST_RENEWAL, &id);
            let generation = match store.bump_manual_renewal(&id, now, &event).await {
                Ok(g) => g,
                Err(e) => return Err(refused(store.as_ref(), event, e, now).await),
            };
            println!("{id}: manual renewal generation {generation}");
        }
    }
    Ok(())
}

async fn set_status(dir: &Path, id: &str, status: ApplianceStatus, now: i64) -> anyhow::Result<()> {
    let (_, store) = open(dir).await?;
    let what = match status {
        ApplianceStatus::Active => action::APPLIANCE_ENABLE,
        ApplianceStatus::Disabled => action::APPLIANCE_DISABLE,
        ApplianceStatus::Revoked => action::APPLIANCE_REVOKE,
    };
    let event = AuditEvent::success(local_admin(), what, id);
    let deltas = match store.set_status(id, status, now, &event).await {
        Ok(d) => d,
        Err(e) => return Err(refused(store.as_ref(), event, e, now).await),
    };
    println!(
        "{id}: {status:?}; {} allowlist change(s){}",
        deltas.len(),
        deltas
            .last()
            .map(|d| format!(", version {}", d.version))
            .unwrap_or_default()
    );
    Ok(())
}

/// This command line, as the audit log names it.
fn local_admin() -> Actor {
    Actor::system(audit::system::LOCAL_ADMIN)
}

/// Record that the store refused `event`'s action (`refused`, or `failed` for a database
/// error, with the error's code), and return the error to report. If the entry cannot be
/// written either, that is logged and the original error still returned.
async fn refused(store: &dyn Store, event: AuditEvent, e: StoreError, now: i64) -> anyhow::Error {
    let outcome = match e {
        StoreError::Database(_) => Outcome::Failed,
        _ => Outcome::Refused,
    };
    let event = event.with_outcome(outcome).with("code", e.code());
    if let Err(audit_error) = store.append_audit(&event, now).await {
        tracing::error!(
            error = %audit_error,
            action = %event.action,
            "cannot write the refusal to the audit log"
        );
    }
    e.into()
}

async fn audit_cmd(cmd: AuditCmd) -> anyhow::Result<()> {
    use std::io::Write;
    match cmd {
        AuditCmd::List { dir, after, limit } => {
            let (_, store) = open(&dir.data_dir).await?;
            let mut out = std::io::stdout().lock();
            for entry in store.audit_entries(after, limit).await? {
                serde_json::to_writer(&mut out, &entry)?;
                writeln!(out)?;
            }
        }
        AuditCmd::Verify { dir } => {
            let (_, store) = open(&dir.data_dir).await?;
            let mut chain = audit::ChainVerifier::from_genesis();
            let mut after = 0;
            loop {
                let page = store
                    .audit_entries(after, tether_control::store::sql::DEFAULT_AUDIT_LIMIT)
                    .await?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                for entry in &page {
                    chain.push(entry).context("the audit log does not verify")?;
                }
            }
            match chain.head() {
                Some((seq, hash)) => println!(
                    "audit log verified: {} entries, head {seq} {hash}",
                    chain.checked()
                ),
                None => println!("audit log verified: empty"),
            }
        }
        AuditCmd::Checkpoint { dir } => {
            let (cfg, store) = open(&dir.data_dir).await?;
            let ca = tether_control::ca::Ca::load(&dir.data_dir, &tether_control::ca_config(&cfg))?;
            let signer = audit_log::checkpoint_signer(&ca)?;
            let now = tether_control::now_unix();
            match audit_log::write_checkpoint(store.as_ref(), &signer, now).await? {
                Some(cp) => println!("checkpoint signed: entry {} {}", cp.seq, cp.head_hash),
                None => println!("no entry newer than the last checkpoint; nothing signed"),
            }
        }
        AuditCmd::Export { dir, out } => {
            let (cfg, store) = open(&dir.data_dir).await?;
            let root = dir.data_dir.join("ca").join("root.pem");
            let header = audit::export::ExportHeader {
                tether_audit_export: audit::export::EXPORT_VERSION,
                trust_domain: cfg.trust_domain.clone(),
                root_pem: std::fs::read_to_string(&root)
                    .with_context(|| format!("reading {}", root.display()))?,
            };
            let tmp = out.with_extension("partial");
            let file = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut w = std::io::BufWriter::new(file);
            let summary = audit_log::write_export(store.as_ref(), Some(&header), &mut w).await?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "exported {} entries and {} checkpoints to {}",
                summary.entries,
                summary.checkpoints,
                out.display()
            );
        }
    }
    Ok(())
}

async fn broker_cmd(cmd: BrokerCmd, now: i64) -> anyhow::Result<()> {
    use tether_control::brokers;
    match cmd {
        BrokerCmd::Add {
            dir,
            name,
            ttl,
            out,
        } => {
            if let Err(e) = tether_identity::BrokerName::new(&name) {
                bail!("invalid broker name {name:?}: {e}");
            }
            if ttl.is_zero() || ttl > brokers::MAX_BUNDLE_TTL {
                bail!("--ttl must be between 1s and 30 days");
            }
            let (cfg, store) = open(&dir.data_dir).await?;
            let root = dir.data_dir.join("ca").join("root.pem");
            let root_pem = std::fs::read_to_string(&root)
                .with_context(|| format!("reading the root CA {}", root.display()))?;
            let bundle = brokers::add(
                store.as_ref(),
                tether_control::operators::control_url(&cfg),
                root_pem,
                &cfg.trust_domain,
                &name,
                ttl,
                local_admin(),
                now,
            )
            .await
            .map_err(|e| match e {
                tether_control::store::StoreError::Conflict(_) => {
                    anyhow::anyhow!("an active broker is already named {name}")
                }
                other => other.into(),
            })?;
            let json = serde_json::to_vec_pretty(&bundle)?;
            match out {
                Some(path) => {
                    write_secret(&path, &json)?;
                    println!(
                        "one-time bundle for broker {name}, valid {}: {}",
                        humantime::format_duration(ttl),
                        path.display()
                    );
                }
                None => println!("{}", String::from_utf8_lossy(&json)),
            }
        }
    }
    Ok(())
}

async fn operator_cmd(cmd: OperatorCmd, now: i64) -> anyhow::Result<()> {
    use tether_control::operators;
    match cmd {
        OperatorCmd::Invite {
            dir,
            name,
            role,
            ttl,
            out,
        } => {
            if let Err(e) = tether_identity::OperatorName::new(&name) {
                bail!("invalid operator name {name:?}: {e}");
            }
            if ttl.is_zero() || ttl > tether_api::operators::MAX_INVITE_TTL {
                bail!("--ttl must be between 1s and 30 days");
            }
            let (cfg, store) = open(&dir.data_dir).await?;
            let root = dir.data_dir.join("ca").join("root.pem");
            let root_pem = std::fs::read_to_string(&root)
                .with_context(|| format!("reading the root CA {}", root.display()))?;
            let bundle = operators::create_invite(
                store.as_ref(),
                operators::control_url(&cfg),
                root_pem,
                &name,
                role,
                ttl,
                local_admin(),
                now,
            )
            .await?;
            let json = serde_json::to_vec_pretty(&bundle)?;
            match out {
                Some(path) => {
                    write_secret(&path, &json)?;
                    println!(
                        "one-time bundle for {name} ({}), valid {}: {}",
                        role.as_str(),
                        humantime::format_duration(ttl),
                        path.display()
                    );
                }
                None => println!("{}", String::from_utf8_lossy(&json)),
            }
        }
    }
    Ok(())
}

/// Write a secret file with mode 0600 (replacing any file there).
fn write_secret(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}
