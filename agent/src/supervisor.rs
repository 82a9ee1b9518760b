//! [`Supervisor`]: one appliance for as long as it runs — the stored credential (restored
//! or re-enrolled when a crash or an offline expiry left it unusable), an [`Agent`] on it,
//! renewal when due (expiry threshold or an operator's request relayed by the broker),
//! then a fresh [`Agent`] on the new credential. `tether-agent run`, `tether up` and the
//! fleet simulator all run appliances through it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::enroll::EnrollState;
use crate::{Agent, AgentConfig, AgentEvent, BrokerAddr, Credentials};

/// How to run one appliance.
#[derive(Clone, Debug)]
pub struct Supervisor {
    /// The appliance's state directory (credential, `state.json`).
    pub state_dir: PathBuf,
    /// Brokers, tried in order.
    pub brokers: Vec<BrokerAddr>,
    /// Agent settings.
    pub agent: AgentConfig,
    /// Renew when less than this is left (or at half-life when the whole lifetime is
    /// shorter).
    pub renew_before: Duration,
    /// How often to check whether renewal is due.
    pub renew_check_every: Duration,
}

impl Supervisor {
    /// Run until `shutdown`. `on_agent` gets the event stream of each agent started (one
    /// per credential: after a renewal, the session closes normally and a new agent
    /// connects at once with the new certificate).
    pub async fn run(
        &self,
        endpoint: quinn::Endpoint,
        shutdown: CancellationToken,
        mut on_agent: impl FnMut(tokio::sync::broadcast::Receiver<AgentEvent>),
    ) -> anyhow::Result<()> {
        let mut signed: Option<std::sync::Arc<crate::signed::SignedOps>> = None;
        loop {
            let (creds, renew_now) = load_credentials(&self.state_dir, &self.agent.proxy).await?;
            tracing::info!(
                appliance_id = creds.appliance_id(),
                trust_domain = creds.trust_domain(),
                fingerprint = creds.fingerprint(),
                not_after_ms = creds.not_after_ms(),
                "credentials loaded"
            );
            let mut agent = Agent::new(
                self.agent.clone(),
                creds.clone(),
                endpoint.clone(),
                self.brokers.clone(),
            )?;
            if let Some(dir) = &self.agent.customer_dir {
                // One per run: the ledger and the manifest chain outlive renewals.
                let ops = match &signed {
                    Some(ops) => ops.clone(),
                    None => {
                        let ops = std::sync::Arc::new(self.signed_ops(dir, &creds)?);
                        signed = Some(ops.clone());
                        ops
                    }
                };
                agent = agent.with_signed_ops(ops);
            }
            on_agent(agent.events());
            let requests = agent.renewal_requests();
            let stop_agent = shutdown.child_token();
            let running = tokio::spawn(agent.run(stop_agent.clone()));
            let renewed = keep_renewed(self, &creds, renew_now, requests, &shutdown).await;
            stop_agent.cancel();
            running.await??;
            if !renewed || shutdown.is_cancelled() {
                return Ok(());
            }
            tracing::info!("certificate renewed; reconnecting with it");
        }
    }
}

impl Supervisor {
    /// Signed operations for this appliance: the manifest key (made on first use), the
    /// customer directory and the audit log (default `<state_dir>/audit.jsonl`).
    fn signed_ops(
        &self,
        customer_dir: &std::path::Path,
        creds: &Credentials,
    ) -> anyhow::Result<crate::signed::SignedOps> {
        let key = crate::manifest_key::load_or_create(&self.state_dir)?;
        let cfg = crate::signed::SignedOpsConfig {
            customer_dir: customer_dir.to_path_buf(),
            audit_log: self
                .agent
                .audit_log
                .clone()
                .unwrap_or_else(|| self.state_dir.join(crate::signed::AUDIT_LOG_FILE)),
            spool_dir: self.state_dir.join(crate::signed::spool::SPOOL_DIR),
            tunnel_end_dir: self.state_dir.join(crate::tunnel::END_DIR),
        };
        Ok(crate::signed::SignedOps::new(
            &cfg,
            creds.appliance_id(),
            creds.trust_domain(),
            key,
        ))
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The stored credential, or — when it expired or is unusable (e.g. a crash between the
/// key and certificate writes) and the appliance enrolled with a platform proof — a new
/// one from a fresh enrollment (control reached as `proxy` says).
pub async fn load_credentials(
    dir: &std::path::Path,
    proxy: &crate::proxy::ProxyConfig,
) -> anyhow::Result<(Credentials, bool)> {
    let problem = match Credentials::load(dir) {
        Ok(c) if c.not_after_ms() / 1000 > unix_now() => return Ok((c, false)),
        Ok(c) => format!("the certificate expired at {} ms", c.not_after_ms()),
        Err(e) => e.to_string(),
    };
    if EnrollState::load(dir)?.is_none() {
        bail!("cannot use the credentials in {}: {problem}", dir.display());
    }
    // A renewal torn by a crash: the previous credential is still allowed; put it back
    // and renew at once.
    if crate::renew::restore_previous(dir, unix_now())? {
        tracing::warn!(problem = %problem, "stored credential unusable; restored the previous one, renewing now");
        let creds = Credentials::load(dir)
            .with_context(|| format!("loading the restored credential in {}", dir.display()))?;
        return Ok((creds, true));
    }
    tracing::warn!(problem = %problem, "stored credential unusable; enrolling again with a fresh platform proof");
    let state = crate::renew::recover(dir, proxy)
        .await
        .with_context(|| format!("cannot recover from: {problem}"))?;
    tracing::info!(fingerprint = %state.fingerprint, "enrolled again");
    let creds = Credentials::load(dir)
        .with_context(|| format!("loading the new credential in {}", dir.display()))?;
    Ok((creds, false))
}

/// Renew when due (expiry threshold, or an operator's request relayed by the broker).
/// Returns `true` once renewed, `false` on shutdown or when the agent ended.
async fn keep_renewed(
    settings: &Supervisor,
    creds: &Credentials,
    renew_now: bool,
    mut requests: tokio::sync::watch::Receiver<u64>,
    shutdown: &CancellationToken,
) -> bool {
    let dir = &settings.state_dir;
    let mut requested: u64 = 0;
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(wait) => {}
            changed = requests.changed() => {
                if changed.is_err() {
                    // The agent ended (an error: shutdown is handled above); the caller
                    // reports its result.
                    return false;
                }
                requested = requested.max(*requests.borrow_and_update());
            }
        }
        wait = settings.renew_check_every;
        let state = match EnrollState::load(dir) {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::debug!("no state.json: this credential is renewed by hand");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read state.json; not renewing");
                continue;
            }
        };
        let manual = requested > state.manual_renewal_generation;
        let due = crate::renew::renewal_due(
            creds.not_before_ms() / 1000,
            creds.not_after_ms() / 1000,
            unix_now(),
            settings.renew_before,
        );
        if !manual && !due && !renew_now {
            continue;
        }
        tracing::info!(manual, due, "renewing the certificate");
        match crate::renew::renew(dir, &settings.agent.proxy).await {
            Ok(mut new) => {
                if manual {
                    new.manual_renewal_generation = requested;
                    if let Err(e) = new.save(dir) {
                        tracing::warn!(error = %e, "cannot record the renewal generation");
                    }
                }
                tracing::info!(fingerprint = %new.fingerprint, not_after = new.not_after, "certificate renewed");
                return true;
            }
            Err(e) => {
                // Retry sooner than the next check, with jitter, unless control said no
                // for good (revoked, disabled, not allowed): then the log says why.
                if let crate::enroll::EnrollError::Refused { status: 403, .. } = e {
                    tracing::error!(error = %e, "control refused the renewal");
                } else {
                    tracing::warn!(error = %e, "renewal failed; will retry");
                    let retry = settings.renew_check_every.min(Duration::from_secs(300));
                    wait = retry.mul_f64(0.5 + fastrand::f64() / 2.0);
                }
            }
        }
    }
}
