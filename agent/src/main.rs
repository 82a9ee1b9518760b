//! `tether-agent`: parses configuration (flags > `TETHER_AGENT_*` environment > TOML file >
//! defaults), loads credentials, and runs one [`tether_agent::Agent`] until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tether_agent::config::{
    FileConfig, ENV_ALLOW_SHELL, ENV_AUDIT_LOG, ENV_BACKOFF_INITIAL, ENV_BACKOFF_MAX, ENV_BROKERS,
    ENV_CONFIG, ENV_CONNECT_TIMEOUT, ENV_CUSTOMER_DIR, ENV_LOG_FORMAT, ENV_MAX_CONCURRENT_COMMANDS,
    ENV_MAX_FRAME_LEN, ENV_OUTPUT_CHUNK_BYTES, ENV_PROXY, ENV_REVOKED_BACKOFF, ENV_STATE_DIR,
};
use tether_agent::enroll::EnrollState;
use tether_agent::proxy::ProxyConfig;
use tether_agent::{client_endpoint, AgentConfig, BrokerAddr};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long, after the agent stopped, to let the endpoint send its CONNECTION_CLOSE.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The Tether appliance agent: holds one QUIC connection to a broker of the cluster and
/// runs the commands it sends.
#[derive(Debug, Parser)]
#[command(name = "tether-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Connect to the brokers and serve until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Enroll with control: generate the key here, send a CSR with a one-time proof, and
    /// store the certificate in the state directory.
    Enroll(EnrollArgs),
    /// The appliance's manifest key (signs its command manifests).
    #[command(subcommand)]
    ManifestKey(ManifestKeyCmd),
    /// The appliance audit log (signed operations).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The customer's pinned approval keys (signed operations).
    #[command(subcommand)]
    Approvers(ApproversCmd),
    /// The customer's policy (signed operations).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Break-glass tunnel sessions on this appliance: see them, end them.
    #[command(subcommand)]
    Session(SessionCmd),
    /// The customer's switch-off: disable every phase but observe (or all with --all) in
    /// CUSTOMER_DIR/policy.toml, keeping its comments, owner and mode. Run it as the
    /// customer's admin; a running agent enforces it within a second and kills commands
    /// of the closed phases.
    Lockdown {
        /// The customer directory.
        #[arg(long, env = ENV_CUSTOMER_DIR, value_name = "DIR")]
        customer_dir: PathBuf,
        /// Disable observe too.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Check CUSTOMER_DIR as the agent would read it (strict modes included): print the
    /// policy's digest and phases and the pinned keys, or what makes them unusable. Exits
    /// 0 when both are usable, 1 otherwise.
    Check {
        /// The customer directory.
        #[arg(long, env = ENV_CUSTOMER_DIR, value_name = "DIR")]
        customer_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ApproversCmd {
    /// Print CUSTOMER_DIR/approvers.toml as an OpenSSH allowed_signers file (namespace
    /// tether-approval-v1 and each key's validity window), so an auditor can reproduce
    /// the agent's decision with `ssh-keygen -Y verify -Overify-time=...`.
    ExportAllowedSigners {
        /// The customer directory.
        #[arg(long, env = ENV_CUSTOMER_DIR, value_name = "DIR")]
        customer_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Check an appliance audit log offline: the whole hash chain from entry 1. Exits 0
    /// intact, 1 when an entry was edited, removed, reordered or replaced (naming it), 2
    /// when the file cannot be read.
    Verify {
        /// The log (JSON lines).
        file: PathBuf,
        /// The appliance's manifest key (`tether-agent manifest-key show`, recorded at
        /// install): every checkpoint in the log must verify under it. Without it only
        /// the hash chain is checked.
        #[arg(long, value_name = "KEY")]
        appliance_key: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SessionCmd {
    /// The active break-glass sessions, from the appliance audit log: id, resource,
    /// privilege, target and expiry.
    List {
        /// The agent's state directory.
        #[arg(long, env = ENV_STATE_DIR, value_name = "DIR")]
        state_dir: PathBuf,
        /// The appliance audit log (default STATE_DIR/audit.jsonl).
        #[arg(long, env = "TETHER_AGENT_AUDIT_LOG", value_name = "FILE")]
        audit_log: Option<PathBuf>,
    },
    /// End session ID now: the running agent closes its connections with
    /// `customer_ended` within about a second. Run it as the customer's admin.
    End {
        /// The session id (`session list`).
        id: u64,
        /// The agent's state directory.
        #[arg(long, env = ENV_STATE_DIR, value_name = "DIR")]
        state_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ManifestKeyCmd {
    /// Print the public key as one line, `ssh-ed25519 <base64>`, for the customer to
    /// record at install time. Makes the key (0600 in the state directory) if there is
    /// none yet.
    Show {
        /// The agent's state directory.
        #[arg(long, env = ENV_STATE_DIR, value_name = "DIR")]
        state_dir: PathBuf,
    },
}

/// Proof kinds `enroll` can present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProofKind {
    /// A one-time enrollment token (`tether-control token create`).
    Token,
    /// AWS: a presigned sts:GetCallerIdentity signed with the instance's credentials
    /// (the standard AWS credential chain), carrying the nonce in a signed header.
    Aws,
    /// GCP: an instance identity token from the metadata server, audience = the nonce.
    Gcp,
    /// Kubernetes: the projected ServiceAccount token (--k8s-token-file).
    K8s,
}

/// `--proxy`: how `run` and `enroll` reach control (and brokers over TCP).
#[derive(Debug, Args)]
struct ProxyArgs {
    /// Egress HTTP proxy: http://[USER:PASSWORD@]HOST:PORT (HTTP CONNECT; only http://).
    /// Wins over HTTPS_PROXY / https_proxy; NO_PROXY / no_proxy (comma-separated *,
    /// domains, .domains, IPs, CIDRs, each with an optional :PORT) lists destinations
    /// reached directly [default: HTTPS_PROXY, else direct].
    #[arg(long, env = ENV_PROXY, hide_env_values = true, value_name = "URL",
          value_parser = |s: &str| Ok::<_, std::convert::Infallible>(RawProxyUrl(s.to_owned())))]
    proxy: Option<RawProxyUrl>,
}

/// The `--proxy` text as given: it may hold a password, so its `Debug` does not show it.
#[derive(Clone)]
struct RawProxyUrl(String);

impl std::fmt::Debug for RawProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawProxyUrl(..)")
    }
}

impl ProxyArgs {
    /// `--proxy`, else the environment (`HTTPS_PROXY`, `NO_PROXY`).
    fn resolve(&self) -> anyhow::Result<ProxyConfig> {
        Ok(ProxyConfig::from_env(
            self.proxy.as_ref().map(|p| p.0.as_str()),
        )?)
    }
}

#[derive(Debug, Args)]
struct EnrollArgs {
    /// Control's base URL, e.g. https://control.example:8443.
    #[arg(long, env = "TETHER_AGENT_CONTROL_URL")]
    control: String,
    /// The root CA this appliance was provisioned with (PEM); control must chain to it.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// The appliance id, as registered in control.
    #[arg(long)]
    id: String,
    /// The proof to present.
    #[arg(long, value_enum, default_value = "token")]
    proof: ProofKind,
    /// The one-time token (with --proof token). Prefer the environment variable.
    #[arg(long, env = "TETHER_AGENT_ENROLL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where to store the credential.
    #[arg(long, env = ENV_STATE_DIR, value_name = "DIR")]
    state_dir: PathBuf,
    /// STS endpoint the AWS proof is signed for (with --proof aws).
    #[arg(long, env = "TETHER_AGENT_AWS_STS_URL", default_value = tether_agent::proof::DEFAULT_AWS_STS_URL)]
    aws_sts_url: String,
    /// Signing region of the AWS proof.
    #[arg(long, env = "AWS_REGION", default_value = tether_agent::proof::DEFAULT_AWS_REGION)]
    aws_region: String,
    /// GCP metadata server (with --proof gcp).
    #[arg(long, env = "TETHER_AGENT_GCP_METADATA_URL", default_value = tether_agent::proof::DEFAULT_GCP_METADATA_URL)]
    gcp_metadata_url: String,
    /// Projected ServiceAccount token file (with --proof k8s).
    #[arg(long, env = "TETHER_AGENT_K8S_TOKEN_FILE", default_value = tether_agent::proof::DEFAULT_K8S_TOKEN_FILE)]
    k8s_token_file: PathBuf,
    #[command(flatten)]
    proxy: ProxyArgs,
}

async fn enroll(args: EnrollArgs) -> anyhow::Result<()> {
    let proxy = args.proxy.resolve()?;
    if let Some(p) = reqwest::Url::parse(&args.control).ok().and_then(|u| {
        proxy
            .proxy_for(u.host_str()?, u.port_or_known_default()?)
            .cloned()
    }) {
        eprintln!("reaching control through proxy {p}");
    }
    let ca_pem =
        std::fs::read(&args.ca).with_context(|| format!("reading {}", args.ca.display()))?;
    use tether_agent::proof::{aws::AwsSource, gcp::GcpSource, k8s::K8sSource, EnrollProof};
    let proof = match args.proof {
        ProofKind::Token => EnrollProof::Token(
            args.token
                .context("--proof token needs --token (or TETHER_AGENT_ENROLL_TOKEN)")?,
        ),
        ProofKind::Aws => EnrollProof::Aws(AwsSource {
            sts_url: args.aws_sts_url,
            region: args.aws_region,
        }),
        ProofKind::Gcp => EnrollProof::Gcp(GcpSource {
            metadata_url: args.gcp_metadata_url,
        }),
        ProofKind::K8s => EnrollProof::K8s(K8sSource {
            token_file: args.k8s_token_file,
        }),
    };
    let state = tether_agent::enroll::enroll(&tether_agent::enroll::EnrollOptions {
        control_url: args.control,
        ca_pem,
        appliance_id: args.id,
        proof,
        state_dir: args.state_dir.clone(),
        proxy,
    })
    .await?;
    println!(
        "enrolled {} (fingerprint {}), credential in {}",
        state.appliance_id,
        state.fingerprint,
        args.state_dir.display()
    );
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// TOML file with `state_dir`, `brokers`, `log_format` and any agent setting below
    /// (snake_case keys, durations as "500ms"/"30s"/"5m"). Flags and environment win.
    #[arg(long, env = ENV_CONFIG, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Directory holding client.key.pem, client.cert.pem (leaf then chain) and
    /// ca.cert.pem (the CA(s) broker certificates must chain to).
    #[arg(long, env = ENV_STATE_DIR, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// A broker to connect to; repeat for several (tried in order from a random start).
    /// The environment variable takes a comma-separated list.
    #[arg(long = "broker", env = ENV_BROKERS, value_name = "HOST:PORT", value_delimiter = ',')]
    brokers: Vec<String>,

    /// Log format; verbosity comes from RUST_LOG (default "info").
    #[arg(long, env = ENV_LOG_FORMAT, value_enum)]
    log_format: Option<LogFormat>,

    /// Local UDP address to send from [default: [::]:0, or 0.0.0.0:0 without IPv6].
    #[arg(long, value_name = "ADDR")]
    bind: Option<SocketAddr>,

    /// Commands run at once; more are answered "busy" [default: 4].
    #[arg(long, env = ENV_MAX_CONCURRENT_COMMANDS, value_name = "N")]
    max_concurrent_commands: Option<usize>,

    /// Accept shell commands (run through /bin/sh -c) [default: false].
    #[arg(long, env = ENV_ALLOW_SHELL, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL")]
    allow_shell: Option<bool>,

    /// Largest chunk of command output per frame, in bytes [default: 16384].
    #[arg(long, env = ENV_OUTPUT_CHUNK_BYTES, value_name = "BYTES")]
    output_chunk_bytes: Option<usize>,

    /// Largest frame sent or accepted, in bytes [default: 65536].
    #[arg(long, env = ENV_MAX_FRAME_LEN, value_name = "BYTES")]
    max_frame_len: Option<usize>,

    /// First reconnect backoff window; doubles per failure, full jitter [default: 500ms].
    #[arg(long, env = ENV_BACKOFF_INITIAL, value_parser = humantime::parse_duration,
          value_name = "DURATION")]
    backoff_initial: Option<Duration>,

    /// Largest reconnect backoff window [default: 30s].
    #[arg(long, env = ENV_BACKOFF_MAX, value_parser = humantime::parse_duration,
          value_name = "DURATION")]
    backoff_max: Option<Duration>,

    /// Wait after a broker refused the certificate (revoked/unauthorized) [default: 5m].
    #[arg(long, env = ENV_REVOKED_BACKOFF, value_parser = humantime::parse_duration,
          value_name = "DURATION")]
    revoked_backoff: Option<Duration>,

    /// Time allowed for the handshake and then for the broker's Welcome [default: 10s].
    #[arg(long, env = ENV_CONNECT_TIMEOUT, value_parser = humantime::parse_duration,
          value_name = "DURATION")]
    connect_timeout: Option<Duration>,

    /// How to reach brokers: auto (QUIC, else TLS over TCP after --quic-fallback-after,
    /// moving back to QUIC when it works again), quic or tcp [default: auto].
    #[arg(long, env = tether_agent::config::ENV_TRANSPORT, value_name = "auto|quic|tcp")]
    transport: Option<tether_agent::config::TransportMode>,

    /// auto: how long a QUIC handshake may take before TCP is tried [default: 3s].
    #[arg(long, env = "TETHER_AGENT_QUIC_FALLBACK_AFTER", value_parser = humantime::parse_duration,
          value_name = "DURATION")]
    quic_fallback_after: Option<Duration>,

    /// auto, on TCP: how often QUIC is tried again [default: 5m].
    #[arg(long, env = "TETHER_AGENT_QUIC_RETRY_EVERY", value_parser = humantime::parse_duration,
          value_name = "DURATION")]
    quic_retry_every: Option<Duration>,

    /// Signed operations: the customer-owned directory holding approvers.toml and
    /// policy.toml (the agent reads it, never writes it). Set, every command is decided by
    /// the customer's policy and signed approvals [default: unsigned mode].
    #[arg(long, env = ENV_CUSTOMER_DIR, value_name = "DIR")]
    customer_dir: Option<PathBuf>,

    /// Signed operations: the appliance audit log [default: STATE_DIR/audit.jsonl].
    #[arg(long, env = ENV_AUDIT_LOG, value_name = "FILE")]
    audit_log: Option<PathBuf>,

    /// Renew the certificate with control when less than this is left (enrolled
    /// appliances only: state.json names control).
    #[arg(long, env = "TETHER_AGENT_RENEW_BEFORE", value_parser = humantime::parse_duration,
          default_value = "1d", value_name = "DURATION")]
    renew_before: Duration,

    /// How often to look at the certificate's expiry (and retry a failed renewal).
    #[arg(long, env = "TETHER_AGENT_RENEW_CHECK_EVERY", value_parser = humantime::parse_duration,
          default_value = "1h", value_name = "DURATION")]
    renew_check_every: Duration,

    #[command(flatten)]
    proxy: ProxyArgs,
}

/// Everything `run` needs, after layering flags, environment, file and defaults.
struct Settings {
    state_dir: PathBuf,
    brokers: Vec<BrokerAddr>,
    log_format: LogFormat,
    bind: Option<SocketAddr>,
    agent: AgentConfig,
    renew_before: Duration,
    renew_check_every: Duration,
}

impl RunArgs {
    fn resolve(self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                FileConfig::from_toml(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let mut agent = file.agent;
        macro_rules! layer {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { agent.$f = v; } )* };
        }
        layer!(
            max_concurrent_commands,
            allow_shell,
            output_chunk_bytes,
            max_frame_len,
            backoff_initial,
            backoff_max,
            revoked_backoff,
            connect_timeout,
            transport,
            quic_fallback_after,
            quic_retry_every
        );
        if let Some(dir) = self.customer_dir {
            agent.customer_dir = Some(dir);
        }
        if let Some(file) = self.audit_log {
            agent.audit_log = Some(file);
        }
        agent.proxy = self.proxy.resolve()?;
        agent.validate()?;

        let Some(state_dir) = self.state_dir.or(file.state_dir) else {
            bail!("no state directory: pass --state-dir or set {ENV_STATE_DIR}");
        };
        let brokers = match (self.brokers.is_empty(), file.brokers.is_empty()) {
            (false, _) => self.brokers,
            (true, false) => file.brokers,
            // Enrolled appliances know their brokers from control.
            (true, true) => EnrollState::load(&state_dir)
                .ok()
                .flatten()
                .map(|s| s.brokers)
                .unwrap_or_default(),
        };
        let brokers = brokers
            .iter()
            .map(|b| b.trim())
            .filter(|b| !b.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<BrokerAddr>, _>>()?;
        if brokers.is_empty() {
            bail!("no broker: pass --broker HOST:PORT or set {ENV_BROKERS}");
        }
        let log_format = match (self.log_format, file.log_format.as_deref()) {
            (Some(f), _) => f,
            (None, None) => LogFormat::Text,
            (None, Some(s)) => LogFormat::from_str(s, true)
                .map_err(|_| anyhow::anyhow!("invalid log_format {s:?}: expected text or json"))?,
        };
        Ok(Settings {
            state_dir,
            brokers,
            log_format,
            bind: self.bind,
            agent,
            renew_before: self.renew_before,
            renew_check_every: self.renew_check_every,
        })
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn endpoint(bind: Option<SocketAddr>) -> anyhow::Result<quinn::Endpoint> {
    if let Some(addr) = bind {
        return client_endpoint(addr).with_context(|| format!("cannot bind {addr}"));
    }
    let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
    client_endpoint(v6)
        .or_else(|_| client_endpoint(v4))
        .context("cannot open a udp socket")
}

/// Cancel `token` on SIGINT or SIGTERM.
fn stop_on_signals(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stopping");
        token.cancel();
    });
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = args.resolve()?;
    init_logging(settings.log_format);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = ?settings.agent, "tether-agent starting");
    // Redacted: the proxy's password is never logged.
    tracing::info!(proxy = %settings.agent.proxy, "egress");
    tether_agent::fault::announce();

    let manifest_key = tether_agent::manifest_key::load_or_create(&settings.state_dir)?;
    tracing::info!(key = %tether_agent::manifest_key::public_line(&manifest_key), "manifest key");

    let shutdown = CancellationToken::new();
    stop_on_signals(shutdown.clone())?;
    let endpoint = endpoint(settings.bind)?;
    tracing::info!(local_addr = %endpoint.local_addr()?, "quic endpoint bound");

    let supervised = tether_agent::supervisor::Supervisor {
        state_dir: settings.state_dir.clone(),
        brokers: settings.brokers.clone(),
        agent: settings.agent.clone(),
        renew_before: settings.renew_before,
        renew_check_every: settings.renew_check_every,
    };
    supervised
        .run(endpoint.clone(), shutdown.clone(), |_| {})
        .await?;
    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, endpoint.wait_idle()).await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    match cli.command {
        Cmd::Run(args) => runtime.block_on(run(args)),
        Cmd::Enroll(args) => runtime.block_on(enroll(args)),
        Cmd::Approvers(ApproversCmd::ExportAllowedSigners { customer_dir }) => {
            let path = customer_dir.join(tether_agent::signed::customer::APPROVERS_FILE);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let approvers = tether_ops::approvers::Approvers::parse(&text)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            print!("{}", approvers.allowed_signers());
            Ok(())
        }
        Cmd::Policy(PolicyCmd::Check { customer_dir }) => {
            let files = tether_agent::signed::customer::CustomerFiles::new(
                customer_dir,
                nix::unistd::geteuid().as_raw(),
            );
            let (loaded, _) = files.current();
            let mut ok = true;
            match &loaded.policy {
                Ok(p) => {
                    println!("policy: sha256 {} phases {}", p.sha256, p.phases_summary());
                    // Break glass: what a vendor may ask a tunnel to, and what each
                    // privilege runs (the customer signs exactly these).
                    for r in p.resources() {
                        println!(
                            "  resource {} -> {} (phase {})",
                            r.name,
                            r.target.as_str(),
                            r.phase
                        );
                        for (name, privilege) in &r.privileges {
                            let argv = |c: &Option<tether_ops::tunnel::CredentialCommand>| {
                                c.as_ref()
                                    .map_or_else(|| "-".to_owned(), |c| c.argv.join(" "))
                            };
                            println!(
                                "    privilege {name}: mint {} | revoke {}",
                                argv(&privilege.mint),
                                argv(&privilege.revoke)
                            );
                        }
                    }
                }
                Err(e) => {
                    ok = false;
                    println!("policy: UNUSABLE, every command would be refused: {e}");
                }
            }
            match &loaded.approvers {
                Ok(a) => {
                    println!("approvers: {} key(s)", a.keys().len());
                    for k in a.keys() {
                        println!(
                            "  {} {} valid {} to {}",
                            k.id,
                            k.fingerprint(),
                            tether_ops::format_rfc3339_ms(k.not_before_ms),
                            tether_ops::format_rfc3339_ms(k.not_after_ms)
                        );
                    }
                }
                Err(e) => {
                    ok = false;
                    println!("approvers: UNUSABLE, every approval would be refused: {e}");
                }
            }
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Lockdown { customer_dir, all } => {
            match tether_agent::signed::lockdown::lockdown(&customer_dir, all) {
                Ok(phases) => {
                    println!("locked down: {phases}");
                    Ok(())
                }
                Err(e) => bail!("lockdown: {e}"),
            }
        }
        Cmd::Audit(AuditCmd::Verify {
            file,
            appliance_key,
        }) => {
            let usage = |e: String| -> ! {
                eprintln!("tether-agent audit verify: {e}");
                std::process::exit(2)
            };
            if let Err(e) = std::fs::metadata(&file) {
                usage(format!("{}: {e}", file.display()));
            }
            let key = appliance_key
                .as_deref()
                .map(tether_ops::ssh_key::PublicKey::from_openssh)
                .transpose()
                .unwrap_or_else(|e| usage(format!("--appliance-key: {e}")));
            match tether_agent::signed::applog::verify_file(&file, key.as_ref()) {
                Ok(v) if key.is_some() => {
                    println!(
                        "ok: {} entries, head {}; {} checkpoints verified: entries up to {} are vouched for by the appliance key",
                        v.entries, v.head, v.checkpoints, v.vouched_seq
                    );
                    Ok(())
                }
                Ok(v) => {
                    println!(
                        "ok: {} entries, head {} (hash chain only: give --appliance-key to check the checkpoints)",
                        v.entries, v.head
                    );
                    Ok(())
                }
                Err(e) => {
                    println!("invalid: {e}");
                    std::process::exit(1);
                }
            }
        }
        Cmd::Session(SessionCmd::List {
            state_dir,
            audit_log,
        }) => {
            let log =
                audit_log.unwrap_or_else(|| state_dir.join(tether_agent::signed::AUDIT_LOG_FILE));
            let sessions = tether_agent::tunnel::sessions_in_log(&log)?;
            if sessions.active.is_empty() {
                println!("no active break-glass session");
            }
            for s in sessions.active {
                println!(
                    "{}  {}/{}  -> {}  until {}",
                    s.id,
                    s.resource,
                    s.privilege,
                    s.target,
                    tether_ops::format_rfc3339_ms(s.expires_at_ms)
                );
            }
            // Never quietly: an ended session whose credential is not revoked yet.
            for s in sessions.unrevoked {
                println!(
                    "{}  {}/{}  -> {}  ended, teardown failed: credential {:?} not revoked yet (retried at the agent's next start)",
                    s.id, s.resource, s.privilege, s.target, s.credential_id
                );
            }
            Ok(())
        }
        Cmd::Session(SessionCmd::End { id, state_dir }) => {
            tether_agent::tunnel::request_end(&state_dir, id)?;
            println!("asked the agent to end session {id}");
            Ok(())
        }
        Cmd::ManifestKey(ManifestKeyCmd::Show { state_dir }) => {
            let key = tether_agent::manifest_key::load_or_create(&state_dir)?;
            println!("{}", tether_agent::manifest_key::public_line(&key));
            Ok(())
        }
    }
}
