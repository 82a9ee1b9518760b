//! The `tether-control` commands: each parses its flags and calls the same operations
//! the HTTP API runs ([`tether_control::domain`]), as the local admin, on the data
//! directory.
//!
//! - [`serve`] — `init` and `serve`.
//! - [`appliance`] — `appliance …`, `token create`, `fleet trust`, `allowlist export`.
//! - [`bundles`] — `operator invite`, `broker add`.
//! - [`audit`] — `audit list|verify|checkpoint|export`.
//! - [`store`] — `store copy`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use tether_control::config::{env, ControlConfig};
use tether_control::domain::{NoFleet, Registry};
use tether_control::store::Store;

mod appliance;
mod audit;
mod bundles;
mod serve;
mod store;

#[derive(Debug, Args)]
pub struct DataDir {
    /// Data directory (CA keys, control.toml, SQLite database).
    #[arg(long, env = env::DATA_DIR)]
    pub data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
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
        /// Database URL (postgres://...) [default: from control.toml, the SQLite file].
        #[arg(long, env = env::DATABASE_URL)]
        database_url: Option<String>,
        /// The web console's listen address; turns it on [default: from control.toml,
        /// `[console] listen`, else off].
        #[arg(long, env = env::CONSOLE_LISTEN)]
        console_listen: Option<SocketAddr>,
        /// The origin browsers use for the console (`https://host[:port]`) [default:
        /// `[console] origin`, else `https://<console listen>`].
        #[arg(long, env = env::CONSOLE_ORIGIN)]
        console_origin: Option<String>,
    },
    /// Control replicas sharing one database.
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// The store as a whole (moving it to another database).
    #[command(subcommand)]
    Store(StoreCmd),
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
    /// The CA's files (what another control replica needs).
    #[command(subcommand)]
    Ca(CaCmd),
}

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Write the data directory a new control replica starts from: control.toml (without
    /// `[replica] advertise`, which is each replica's own), ca/root.pem,
    /// ca/intermediate.pem and the intermediate's key (ca/intermediate.key) or, in KMS
    /// mode, ca/kms.json. Never ca/root.key, never this replica's control.pem/control.key
    /// (the new replica issues its own at first start) nor its replica.id. Refuses a
    /// control on SQLite (replicas share a PostgreSQL database) and a non-empty DIR.
    Export {
        #[command(flatten)]
        dir: DataDir,
        /// Where to write the new replica's data directory (created, mode 0700).
        #[arg(long)]
        out: PathBuf,
        /// Confirm that the root key stays behind (it is never exported; keep it offline).
        #[arg(long)]
        no_root_key: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReplicaCmd {
    /// List live replicas (heartbeat within 15 s, the database's clock): id, advertised
    /// address, API address, version, seconds since the last heartbeat.
    List {
        /// The database the replicas share.
        #[arg(long, env = env::DATABASE_URL)]
        database_url: String,
        /// Print JSON (the same document as GET /v1/control/replicas, without
        /// `answered_by`).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Copy a SQLite store into a new, empty PostgreSQL database, for control replicas:
    /// every table in one transaction, the audit log byte for byte; then verify the copy
    /// (the audit chain and checkpoints as `tether audit verify` checks them, the
    /// allowlist, the digest chain). Stop tether-control on the source first: a change
    /// during the copy refuses it. Nothing is written unless the copy verifies.
    Copy {
        /// The source: `sqlite:DIR`, DIR being the data directory (control.toml, ca/,
        /// control.db).
        #[arg(long, value_name = "sqlite:DIR")]
        from: String,
        /// The target PostgreSQL database (it must exist and be empty; the schema is
        /// created).
        #[arg(long, value_name = "postgres://…")]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BrokerCmd {
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
pub enum OperatorCmd {
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
pub enum AuditCmd {
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
    /// Check the whole hash chain from the first entry (after archiving: from the entry
    /// after the last archived one, chained to its hash); fails (non-zero exit) at the
    /// first entry that was edited, removed or reordered. Entries cut from the end cannot
    /// be detected without a checkpoint.
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
    /// Move the entries before SEQ (those not archived yet) to the segment FILE, in the
    /// export format, ending at a signed checkpoint of entry SEQ - 1 (signed now if none
    /// is stored), then delete them from the live log. FILE is written and synced before
    /// anything is deleted, and never overwritten. Verify with `tether audit verify SEG1
    /// SEG2 ... LIVE_EXPORT`.
    Archive {
        #[command(flatten)]
        dir: DataDir,
        /// Archive the entries with seq below this one.
        #[arg(long, value_name = "SEQ")]
        before: i64,
        /// The segment file to write (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AllowlistCmd {
    /// Print the allowlist in the standalone broker's file format (`<appliance-id>
    /// <sha256-hex>` per line), for a broker that does not follow control yet.
    Export {
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Debug, Subcommand)]
pub enum FleetCmd {
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
pub enum ApplianceCmd {
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
pub enum TokenCmd {
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

/// Run `cmd`.
pub async fn run(cmd: Cmd) -> anyhow::Result<()> {
    let now = tether_control::now_unix();
    match cmd {
        Cmd::Init { .. } => serve::init(cmd, now).await,
        Cmd::Serve {
            dir,
            listen,
            metrics_listen,
            database_url,
            console_listen,
            console_origin,
        } => {
            let overrides = tether_control::run::Overrides {
                listen,
                metrics_listen,
                database_url,
                console_listen,
                console_origin,
            };
            serve::serve(&dir.data_dir, overrides).await
        }
        Cmd::Replica(ReplicaCmd::List { database_url, json }) => {
            serve::replica_list(&database_url, json).await
        }
        Cmd::Store(StoreCmd::Copy { from, to }) => store::copy(&from, &to).await,
        Cmd::Appliance(cmd) => appliance::appliance(cmd, now).await,
        Cmd::Token(TokenCmd::Create { dir, id, ttl }) => {
            appliance::token_create(&dir.data_dir, &id, ttl, now).await
        }
        Cmd::Fleet(FleetCmd::Trust { dir, json }) => {
            appliance::fleet_trust(&dir.data_dir, json, now).await
        }
        Cmd::Allowlist(AllowlistCmd::Export { dir }) => {
            appliance::allowlist_export(&dir.data_dir).await
        }
        Cmd::Audit(cmd) => audit::audit(cmd).await,
        Cmd::Operator(cmd) => bundles::operator(cmd, now).await,
        Cmd::Broker(cmd) => bundles::broker(cmd, now).await,
        Cmd::Ca(CaCmd::Export {
            dir,
            out,
            no_root_key,
        }) => serve::ca_export(&dir.data_dir, &out, no_root_key),
    }
}

/// The config and the store of data directory `dir`.
async fn open(dir: &Path) -> anyhow::Result<(ControlConfig, Arc<dyn Store>)> {
    let cfg = ControlConfig::load(dir)?;
    let store = tether_control::run::open_store(&cfg, dir).await?;
    Ok((cfg, store))
}

/// The records of data directory `dir`, with no cluster (nothing is connected to a
/// command line).
async fn registry(dir: &Path) -> anyhow::Result<(ControlConfig, Registry)> {
    let (cfg, store) = open(dir).await?;
    let registry = Registry {
        store,
        settings: Arc::new(cfg.domain_settings()),
        fleet: Arc::new(NoFleet),
    };
    Ok((cfg, registry))
}

/// The root CA of data directory `dir` (PEM), as `init` wrote it.
fn root_pem(dir: &Path) -> anyhow::Result<String> {
    let root = dir.join("ca").join("root.pem");
    std::fs::read_to_string(&root)
        .with_context(|| format!("reading the root CA {}", root.display()))
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
