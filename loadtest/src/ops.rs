//! The scenarios that act on a connected fleet through control's HTTPS API with the
//! pool's operator credential: `commands` (R commands per second, round trip to the
//! final NDJSON line) and `revoke` (revocation to the agent seeing its session closed,
//! then one fresh connection per revoked appliance, which must be refused).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde::Serialize;
use tether_agent::{Agent, AgentConfig, AgentEvent, Credentials};
use tether_api::appliances::{ApplianceDetail, PlatformBinding, RegisterRequest, TokenResponse};
use tether_api::brokers::BrokerList;
use tether_api::exec::{ExecLine, ExecRequest};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Endpoints, Fleet, FleetEvent};
use crate::pool::{self, OperatorCredential, Pool};
use crate::progress::Progress;
use crate::report::{ms, round3};
use crate::scenario::Tally;

/// Largest round trip the histograms hold, µs (one hour).
const MAX_US: u64 = 3_600_000_000;
/// The command every `commands` request runs (argv, no shell).
const COMMAND: &str = "true";
/// Its deadline, ms.
const COMMAND_TIMEOUT_MS: u64 = 5000;
/// How long the commands still waiting at the end may take.
const DRAIN: Duration = Duration::from_secs(15);
/// How long `revoke` waits for the revoked sessions to close, after the last revocation.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// How long a fresh connection with a revoked certificate may take to be answered.
const RECONNECT_WAIT: Duration = Duration::from_secs(10);
/// Fresh connections with revoked certificates tried at once.
const RECONNECT_CONCURRENCY: usize = 64;
/// The close reason a revoked appliance's agent should see.
pub const REVOKED_KIND: &str = "closed_by_broker_revoked";

/// Control's API as the pool's operator.
#[derive(Clone, Debug)]
pub struct Api {
    http: reqwest::Client,
    url: String,
}

impl Api {
    /// A client presenting `operator`'s certificate, trusting `root_pem`.
    pub fn new(url: &str, root_pem: &str, operator: &OperatorCredential) -> anyhow::Result<Api> {
        let http = tether_agent::enroll::http_client_with(
            root_pem.as_bytes(),
            Some((operator.cert_pem.as_bytes(), operator.key_pem.as_bytes())),
        )
        .context("an HTTPS client with the operator certificate")?;
        Ok(Api {
            http,
            url: url.trim_end_matches('/').to_owned(),
        })
    }

    /// `POST /v1/appliances/{id}/exec` of `true`; the time to the final line, or the error
    /// kind.
    async fn exec(&self, id: &str) -> Result<Duration, String> {
        let started = Instant::now();
        let mut resp = self
            .http
            .post(format!("{}/v1/appliances/{id}/exec", self.url))
            .json(&ExecRequest {
                argv: vec![COMMAND.to_owned()],
                timeout_ms: Some(COMMAND_TIMEOUT_MS),
                ..Default::default()
            })
            .send()
            .await
            .map_err(|_| "exec_transport".to_owned())?;
        if !resp.status().is_success() {
            return Err(format!("exec_http_{}", resp.status().as_u16()));
        }
        let mut buf = Vec::new();
        loop {
            let chunk = resp
                .chunk()
                .await
                .map_err(|_| "exec_transport".to_owned())?;
            let Some(chunk) = chunk else {
                return Err("exec_no_final_line".into());
            };
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                if let Some(end) = final_line(&line) {
                    let rtt = started.elapsed();
                    return end.map(|()| rtt);
                }
            }
        }
    }

    /// `POST /v1/appliances/{id}/exec` of `echo NONCE` (`chaos`): every line of the answer
    /// read, judged by [`EchoOutcome`].
    pub async fn exec_echo(&self, id: &str, nonce: &str, timeout_ms: u64) -> EchoOutcome {
        use base64::Engine as _;
        let resp = match self
            .http
            .post(format!("{}/v1/appliances/{id}/exec", self.url))
            .json(&ExecRequest {
                argv: vec!["echo".to_owned(), nonce.to_owned()],
                timeout_ms: Some(timeout_ms),
                ..Default::default()
            })
            .send()
            .await
        {
            Ok(r) => r,
            // Nothing sent back: control refused the connection or died first.
            Err(_) => return EchoOutcome::Failed("exec_transport".into()),
        };
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let code = resp
                .json::<tether_api::ErrorBody>()
                .await
                .map(|b| b.error)
                .unwrap_or_else(|_| "no_body".into());
            return EchoOutcome::Failed(format!("exec_http_{status}_{code}"));
        }
        let mut resp = resp;
        let mut buf = Vec::new();
        let mut stdout = Vec::new();
        let mut finals: Vec<ExecLine> = Vec::new();
        let broken = loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                Ok(None) => break None,
                Err(_) => break Some("exec_stream_broken"),
            }
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                match serde_json::from_slice::<ExecLine>(&line) {
                    Ok(ExecLine::Output { stream, data }) => {
                        if matches!(stream, tether_proto::OutputStream::Stdout) {
                            if let Ok(d) = base64::engine::general_purpose::STANDARD.decode(data) {
                                stdout.extend_from_slice(&d);
                            }
                        }
                    }
                    Ok(l @ (ExecLine::Exit { .. } | ExecLine::Failed { .. })) => finals.push(l),
                    Ok(_) => {}
                    Err(_) => {
                        return EchoOutcome::Violation(format!(
                            "an answer line that does not parse: {}",
                            String::from_utf8_lossy(&line).trim()
                        ))
                    }
                }
            }
        };
        match (finals.as_slice(), broken) {
            ([ExecLine::Exit { code: 0 }], None) => {
                if String::from_utf8_lossy(&stdout).trim() == nonce {
                    EchoOutcome::Ran
                } else {
                    EchoOutcome::Violation(format!(
                        "reported exit 0 without the command's output (stdout {:?})",
                        String::from_utf8_lossy(&stdout)
                    ))
                }
            }
            ([ExecLine::Exit { code }], None) => EchoOutcome::Failed(format!("exit_{code}")),
            ([ExecLine::Failed { code, .. }], None) => {
                EchoOutcome::Failed(format!("exec_{}", code.name()))
            }
            ([], None) => EchoOutcome::Broken("exec_no_final_line".into()),
            ([], Some(kind)) => EchoOutcome::Broken(kind.into()),
            (more, _) if more.len() > 1 => {
                EchoOutcome::Violation(format!("{} final lines: {more:?}", more.len()))
            }
            (_, Some(kind)) => {
                EchoOutcome::Violation(format!("the stream broke ({kind}) after its final line"))
            }
            _ => EchoOutcome::Violation("an answer with no sense".into()),
        }
    }

    /// `POST /v1/appliances/{id}/{action}` (`revoke`, `disable`, `enable`).
    pub async fn set_status(&self, id: &str, action: &str) -> Result<(), String> {
        let resp = self
            .http
            .post(format!("{}/v1/appliances/{id}/{action}", self.url))
            .send()
            .await
            .map_err(|_| "transport".to_owned())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("http_{}", resp.status().as_u16()))
        }
    }

    /// `POST /v1/appliances` of a token-only appliance in `tenant`. An appliance of that
    /// id already there is fine if it is in `tenant` (an earlier run made it); one in any
    /// other tenant is a real appliance, and the run stops rather than touch it.
    pub async fn register(&self, id: &str, tenant: &str) -> anyhow::Result<()> {
        let resp = self
            .http
            .post(format!("{}/v1/appliances", self.url))
            .json(&RegisterRequest {
                id: id.to_owned(),
                tenant: Some(tenant.to_owned()),
                binding: PlatformBinding::TokenOnly,
            })
            .send()
            .await
            .with_context(|| format!("registering {id} with control"))?;
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            409 => {
                let existing: ApplianceDetail = self
                    .http
                    .get(format!("{}/v1/appliances/{id}", self.url))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                if existing.appliance.tenant == tenant {
                    Ok(())
                } else {
                    anyhow::bail!(
                        "control already has an appliance {id} outside the tenant {tenant:?}                          (tenant {}): this run leaves real appliances alone; use a control                          whose appliance ids do not clash with the load test's",
                        existing.appliance.tenant
                    )
                }
            }
            _ => Self::success(resp, &format!("to register {id}"))
                .await
                .map(drop),
        }
    }

    /// `resp` if it is a success, else an error naming `what` control refused, with its
    /// status and body.
    async fn success(resp: reqwest::Response, what: &str) -> anyhow::Result<reqwest::Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        anyhow::bail!(
            "control refused {what}: HTTP {status}: {}",
            resp.text().await.unwrap_or_default()
        )
    }

    /// `POST /v1/appliances/{id}/tokens`: a one-time enrollment token.
    pub async fn token(&self, id: &str) -> anyhow::Result<String> {
        let resp = self
            .http
            .post(format!("{}/v1/appliances/{id}/tokens", self.url))
            .json(&serde_json::json!({}))
            .send()
            .await
            .with_context(|| format!("asking control for a token for {id}"))?;
        let t: TokenResponse = Self::success(resp, &format!("a token for {id}"))
            .await?
            .json()
            .await
            .context("control's token answer")?;
        Ok(t.token)
    }

    /// `GET /v1/appliances/{id}`.
    pub async fn appliance(&self, id: &str) -> anyhow::Result<ApplianceDetail> {
        let resp = self
            .http
            .get(format!("{}/v1/appliances/{id}", self.url))
            .send()
            .await
            .with_context(|| format!("asking control about {id}"))?;
        Ok(Self::success(resp, &format!("to show {id}"))
            .await?
            .json()
            .await?)
    }

    /// `GET /v1/brokers`.
    pub async fn brokers(&self) -> anyhow::Result<BrokerList> {
        let resp = self
            .http
            .get(format!("{}/v1/brokers", self.url))
            .send()
            .await
            .context("listing control's brokers")?;
        Ok(Self::success(resp, "to list its brokers")
            .await?
            .json()
            .await?)
    }

    /// `POST /v1/appliances/{id}/revoke`.
    async fn revoke(&self, id: &str) -> Result<(), String> {
        let resp = self
            .http
            .post(format!("{}/v1/appliances/{id}/revoke", self.url))
            .send()
            .await
            .map_err(|_| "revoke_transport".to_owned())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("revoke_http_{}", resp.status().as_u16()))
        }
    }
}

/// How one `chaos` command ended, as its answer showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EchoOutcome {
    /// One final line, exit 0, and the nonce on stdout.
    Ran,
    /// One final line saying it failed, or control refused it before any line (the name).
    Failed(String),
    /// The answer ended without a final line (the name): fine only if control died.
    Broken(String),
    /// What must never be: two final lines, success without the output, garbage.
    Violation(String),
}

/// One NDJSON line of an exec answer: `None` if not the last one, `Some(Ok)` for exit 0,
/// `Some(Err(kind))` for another exit code or a failure.
fn final_line(line: &[u8]) -> Option<Result<(), String>> {
    match serde_json::from_slice::<ExecLine>(line).ok()? {
        ExecLine::Exit { code: 0 } => Some(Ok(())),
        ExecLine::Exit { .. } => Some(Err("exec_exit_nonzero".into())),
        // `CommandFailure` names are already safe keys (lowercase, `_`).
        ExecLine::Failed { code, .. } => Some(Err(format!("exec_failed_{}", code.name()))),
        ExecLine::Started { .. }
        | ExecLine::Output { .. }
        | ExecLine::Manifest { .. }
        | ExecLine::Plan { .. } => None,
    }
}

/// What `commands` measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CommandsDetail {
    /// Commands per second asked for.
    pub rate: f64,
    /// Commands due during the run.
    pub due: u64,
    /// Requests sent.
    pub sent: u64,
    /// Requests whose last line was `exit` with code 0.
    pub ok: u64,
    /// Seconds commands were sent for.
    pub secs: f64,
    /// Successful commands per second.
    pub ok_per_sec: f64,
    /// Round trip percentiles of successful commands, ms.
    pub rtt_p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub rtt_p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub rtt_p99_ms: Option<f64>,
    /// Slowest, ms.
    pub rtt_max_ms: Option<f64>,
}

/// What `revoke` measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RevokeDetail {
    /// Appliances chosen for revocation.
    pub chosen: usize,
    /// Revocations control accepted.
    pub revoked: usize,
    /// Revoked sessions seen closed with the `revoked` code (the samples).
    pub closed: usize,
    /// Revocation to close percentiles, ms.
    pub close_p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub close_p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub close_p99_ms: Option<f64>,
    /// Slowest, ms.
    pub close_max_ms: Option<f64>,
    /// Fresh connections tried with revoked certificates.
    pub reconnects_tried: usize,
    /// Of those, refused.
    pub reconnects_refused: usize,
    /// Of those and of the fleet's own agents, accepted (must be 0).
    pub reconnects_accepted: u64,
}

/// What `commands` or `revoke` adds to a phase.
#[derive(Debug, Default)]
pub struct OpsOutcome {
    /// `commands`.
    pub commands: Option<CommandsDetail>,
    /// `revoke`.
    pub revoke: Option<RevokeDetail>,
    /// `churn`.
    pub churn: Option<crate::motion::ChurnDetail>,
    /// `drain`.
    pub drain: Option<crate::motion::DrainDetail>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
}

/// Everything `commands` and `revoke` need besides the fleet.
pub struct Ctx<'a> {
    /// Control's API.
    pub api: &'a Api,
    /// The pool (revoked appliances are marked in it).
    pub pool: &'a Pool,
    /// The fleet's credentials, by index (for the fresh connections of `revoke`).
    pub creds: &'a [Credentials],
    /// The fleet's endpoints.
    pub endpoints: &'a Endpoints,
    /// The brokers' QUIC addresses (TCP listens on the same port numbers).
    pub brokers: &'a [SocketAddr],
    /// The fleet's agent settings (its transport), for the fresh connections too.
    pub agent: &'a AgentConfig,
}

/// A sampling hook: called once per tick with the tally.
pub type Sampler<'a> = dyn FnMut(&Tally) -> anyhow::Result<()> + 'a;

pub(crate) fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid bounds")
}

/// `12.3` or `-`.
pub(crate) fn show(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

pub(crate) fn q(h: &Histogram<u64>, quantile: f64) -> Option<f64> {
    (!h.is_empty()).then(|| ms(h.value_at_quantile(quantile)))
}

pub(crate) fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_US)
}

/// A random connected appliance, if one is found in a few draws.
fn pick_connected(tally: &Tally) -> Option<usize> {
    let n = tally.up.len();
    if n == 0 || tally.current == 0 {
        return None;
    }
    (0..64)
        .map(|_| fastrand::usize(..n))
        .find(|&i| tally.up[i])
        .or_else(|| tally.up.iter().position(|u| *u))
}

/// `commands`: `rate` commands per second to random connected appliances for `duration`.
#[allow(clippy::too_many_arguments)]
pub async fn commands(
    ctx: &Ctx<'_>,
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
    fleet: &mut Fleet,
    tally: &mut Tally,
    tick: &mut tokio::time::Interval,
    sample: &mut Sampler<'_>,
    progress: &Progress,
) -> anyhow::Result<OpsOutcome> {
    let mut out = OpsOutcome::default();
    let mut rtt = hist();
    let mut detail = CommandsDetail {
        rate,
        ..Default::default()
    };
    let bar = progress.bar(duration.as_secs().max(1), "sending commands");
    let started = Instant::now();
    let stop_sending = tokio::time::sleep(duration);
    tokio::pin!(stop_sending);
    let mut fire = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut inflight: JoinSet<Result<Duration, String>> = JoinSet::new();
    let mut sending = true;
    let mut drain_until = None;
    loop {
        let drain_deadline = async {
            match drain_until {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = fleet.events.recv() => match ev {
                Some(ev) => tally.record(ev),
                None => break,
            },
            _ = tick.tick() => {
                sample(tally)?;
                bar.set_position(started.elapsed().as_secs());
                bar.set_prefix(format!("{} ok, {} in flight", detail.ok, inflight.len()));
            }
            _ = fire.tick(), if sending => {
                detail.due += 1;
                if inflight.len() >= max_in_flight {
                    *out.errors.entry("exec_in_flight_limit".into()).or_default() += 1;
                    continue;
                }
                let Some(i) = pick_connected(tally) else {
                    *out.errors.entry("exec_no_connected_appliance".into()).or_default() += 1;
                    continue;
                };
                let api = ctx.api.clone();
                let id = pool::appliance_id(i + 1);
                detail.sent += 1;
                inflight.spawn(async move { api.exec(&id).await });
            }
            r = inflight.join_next(), if !inflight.is_empty() => match r {
                Some(Ok(Ok(d))) => {
                    detail.ok += 1;
                    let _ = rtt.record(us(d));
                }
                Some(Ok(Err(kind))) => *out.errors.entry(kind).or_default() += 1,
                Some(Err(_)) => *out.errors.entry("exec_task_failed".into()).or_default() += 1,
                None => {}
            },
            _ = &mut stop_sending, if sending => {
                sending = false;
                detail.secs = round3(started.elapsed().as_secs_f64());
                drain_until = Some(tokio::time::Instant::now() + DRAIN);
            }
            _ = drain_deadline => break,
        }
        if !sending && inflight.is_empty() {
            break;
        }
    }
    bar.finish_and_clear();
    if !inflight.is_empty() {
        *out.errors.entry("exec_no_answer".into()).or_default() += inflight.len() as u64;
        inflight.abort_all();
    }
    detail.ok_per_sec = round3(detail.ok as f64 / detail.secs.max(1e-9));
    detail.rtt_p50_ms = q(&rtt, 0.5);
    detail.rtt_p90_ms = q(&rtt, 0.9);
    detail.rtt_p99_ms = q(&rtt, 0.99);
    detail.rtt_max_ms = (!rtt.is_empty()).then(|| ms(rtt.max()));
    println!(
        "commands: {} of {} due sent, {} ok ({:.1}/s), round trip p50 {} ms, p99 {} ms",
        detail.sent,
        detail.due,
        detail.ok,
        detail.ok_per_sec,
        show(detail.rtt_p50_ms),
        show(detail.rtt_p99_ms)
    );
    out.commands = Some(detail);
    Ok(out)
}

/// `revoke`: revoke `k` random connected appliances, `concurrency` at a time; time each
/// to its agent seeing the session closed; then try one fresh connection per revoked
/// appliance.
#[allow(clippy::too_many_arguments)]
pub async fn revoke(
    ctx: &Ctx<'_>,
    k: usize,
    concurrency: usize,
    fleet: &mut Fleet,
    tally: &mut Tally,
    tick: &mut tokio::time::Interval,
    sample: &mut Sampler<'_>,
    progress: &Progress,
) -> anyhow::Result<OpsOutcome> {
    let mut r = Revoking::choose(tally, k);
    let bar = progress.bar(r.detail.chosen as u64, "revoking appliances");
    let mut wait_until: Option<tokio::time::Instant> = None;
    loop {
        r.send(ctx, concurrency)?;
        if r.queue.is_empty() && r.inflight.is_empty() {
            if r.pending.is_empty() {
                break;
            }
            wait_until.get_or_insert_with(|| tokio::time::Instant::now() + CLOSE_WAIT);
        }
        let deadline = async {
            match wait_until {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = fleet.events.recv() => match ev {
                Some(ev) => r.on_event(ev, tally, &bar),
                None => break,
            },
            answer = r.inflight.join_next(), if !r.inflight.is_empty() => r.on_answer(answer),
            _ = tick.tick() => {
                sample(tally)?;
                bar.set_prefix(format!("{} closed", r.detail.closed));
            }
            _ = deadline => {
                r.out.errors.insert("revoke_not_closed".into(), r.pending.len() as u64);
                break;
            }
        }
    }
    bar.finish_and_clear();
    r.report_closes();
    let Revoking {
        targets,
        accepted,
        mut detail,
        mut out,
        ..
    } = r;

    // The revoked certificates must not get a session again.
    reconnect_revoked(ctx, &accepted, progress, &mut detail, &mut out).await;
    // What the fleet's own agents did meanwhile.
    while let Ok(ev) = fleet.events.try_recv() {
        match ev {
            FleetEvent::Connected { index, .. } if targets.contains(&index) => {
                detail.reconnects_accepted += 1;
                tally.record(ev);
            }
            FleetEvent::Disconnected { index, .. } if targets.contains(&index) => {
                tally.expected_close(index);
            }
            ev => tally.record(ev),
        }
    }
    println!(
        "revoke: {} fresh connections with revoked certificates, {} refused, {} accepted",
        detail.reconnects_tried, detail.reconnects_refused, detail.reconnects_accepted
    );
    out.revoke = Some(detail);
    Ok(out)
}

/// A revoked appliance's index and control's answer (or the error kind).
type Answer = (usize, Result<(), String>);

/// `revoke` while it revokes: who is next, whose session should close, what was measured.
struct Revoking {
    /// The appliances chosen for revocation.
    targets: HashSet<usize>,
    /// Chosen, not sent yet.
    queue: VecDeque<usize>,
    /// Sent, session not seen closed yet.
    pending: HashMap<usize, Instant>,
    /// Revocations control accepted.
    accepted: Vec<usize>,
    /// Revocations waiting for control's answer.
    inflight: JoinSet<Answer>,
    /// Revocation to close, µs.
    close: Histogram<u64>,
    detail: RevokeDetail,
    out: OpsOutcome,
}

impl Revoking {
    /// Choose `k` random connected appliances (too few connected is counted as an error).
    fn choose(tally: &Tally, k: usize) -> Revoking {
        let mut out = OpsOutcome::default();
        let mut chosen: Vec<usize> = (0..tally.up.len()).filter(|&i| tally.up[i]).collect();
        fastrand::shuffle(&mut chosen);
        chosen.truncate(k);
        if chosen.len() < k {
            out.errors.insert(
                "revoke_not_enough_connected".into(),
                (k - chosen.len()) as u64,
            );
        }
        Revoking {
            targets: chosen.iter().copied().collect(),
            queue: chosen.iter().copied().collect(),
            pending: HashMap::new(),
            accepted: Vec::new(),
            inflight: JoinSet::new(),
            close: hist(),
            detail: RevokeDetail {
                chosen: chosen.len(),
                ..Default::default()
            },
            out,
        }
    }

    /// Send the next revocations, up to `concurrency` in flight.
    fn send(&mut self, ctx: &Ctx<'_>, concurrency: usize) -> anyhow::Result<()> {
        while self.inflight.len() < concurrency {
            let Some(i) = self.queue.pop_front() else {
                break;
            };
            let id = pool::appliance_id(i + 1);
            // Marked first: if the run dies now, the next one still enrolls it again.
            ctx.pool.mark_revoked(&id)?;
            let api = ctx.api.clone();
            self.pending.insert(i, Instant::now());
            self.inflight
                .spawn(async move { (i, api.revoke(&id).await) });
        }
        Ok(())
    }

    /// Count a fleet event: a target's session closing (timed from its revocation), a
    /// target's own agent getting a session again, or anything else.
    fn on_event(&mut self, ev: FleetEvent, tally: &mut Tally, bar: &ProgressBar) {
        match ev {
            FleetEvent::Disconnected {
                index, kind, at, ..
            } if self.targets.contains(&index) => {
                tally.expected_close(index);
                if let Some(sent) = self.pending.remove(&index) {
                    if kind == REVOKED_KIND {
                        let _ = self.close.record(us(at.saturating_duration_since(sent)));
                        self.detail.closed += 1;
                        bar.inc(1);
                    } else {
                        *self
                            .out
                            .errors
                            .entry(format!("revoke_closed_{kind}"))
                            .or_default() += 1;
                    }
                }
            }
            ev @ FleetEvent::Connected { index, .. } if self.targets.contains(&index) => {
                if !self.pending.contains_key(&index) {
                    // A revoked appliance's own agent got a session again.
                    self.detail.reconnects_accepted += 1;
                }
                tally.record(ev);
            }
            ev => tally.record(ev),
        }
    }

    /// Count control's answer to one revocation.
    fn on_answer(&mut self, answer: Option<Result<Answer, tokio::task::JoinError>>) {
        match answer {
            Some(Ok((i, Ok(())))) => {
                self.detail.revoked += 1;
                self.accepted.push(i);
            }
            Some(Ok((i, Err(kind)))) => {
                self.pending.remove(&i);
                *self.out.errors.entry(kind).or_default() += 1;
            }
            Some(Err(_)) => {
                *self
                    .out
                    .errors
                    .entry("revoke_task_failed".into())
                    .or_default() += 1
            }
            None => {}
        }
    }

    /// Fill in the revocation-to-close percentiles and print them.
    fn report_closes(&mut self) {
        let (detail, close) = (&mut self.detail, &self.close);
        detail.close_p50_ms = q(close, 0.5);
        detail.close_p90_ms = q(close, 0.9);
        detail.close_p99_ms = q(close, 0.99);
        detail.close_max_ms = (!close.is_empty()).then(|| ms(close.max()));
        println!(
            "revoke: {} of {} revoked, {} sessions closed, revoke to close p50 {} ms, p99 {} ms",
            detail.revoked,
            detail.chosen,
            detail.closed,
            show(detail.close_p50_ms),
            show(detail.close_p99_ms)
        );
    }
}

/// One fresh connection with each `revoked` appliance's certificate,
/// [`RECONNECT_CONCURRENCY`] at a time, counted as refused or accepted in `detail`.
pub(crate) async fn reconnect_revoked(
    ctx: &Ctx<'_>,
    revoked: &[usize],
    progress: &Progress,
    detail: &mut RevokeDetail,
    out: &mut OpsOutcome,
) {
    let bar = progress.bar(
        revoked.len() as u64,
        "reconnecting with revoked certificates",
    );
    let limit = Arc::new(Semaphore::new(RECONNECT_CONCURRENCY));
    let mut tries = JoinSet::new();
    for &i in revoked {
        let creds = ctx.creds[i].clone();
        let endpoint = ctx.endpoints.endpoints[i % ctx.endpoints.endpoints.len()].clone();
        let brokers = ctx.brokers.to_vec();
        let agent = ctx.agent.clone();
        let limit = limit.clone();
        tries.spawn(async move {
            let _slot = limit.acquire_owned().await;
            try_once(agent, creds, endpoint, brokers).await
        });
    }
    let mut no_answer = 0;
    while let Some(r) = tries.join_next().await {
        bar.inc(1);
        detail.reconnects_tried += 1;
        match r {
            Ok(Some(true)) => detail.reconnects_accepted += 1,
            Ok(Some(false)) => detail.reconnects_refused += 1,
            Ok(None) | Err(_) => no_answer += 1,
        }
    }
    bar.finish_and_clear();
    if no_answer > 0 {
        out.errors
            .insert("revoked_reconnect_no_answer".into(), no_answer);
    }
}

/// One agent (settings `agent`) with `creds`, until its first session (`Some(true)`),
/// its first refusal or lost attempt (`Some(false)`), or [`RECONNECT_WAIT`] (`None`).
async fn try_once(
    agent: AgentConfig,
    creds: Credentials,
    endpoint: quinn::Endpoint,
    brokers: Vec<SocketAddr>,
) -> Option<bool> {
    let agent = Agent::new(agent, creds, endpoint, brokers).ok()?;
    let mut events = agent.events();
    let stop = CancellationToken::new();
    let run = tokio::spawn(agent.run(stop.clone()));
    let verdict = tokio::time::timeout(RECONNECT_WAIT, async {
        loop {
            match events.recv().await {
                Ok(AgentEvent::Connected { .. }) => return Some(true),
                Ok(AgentEvent::Disconnected { .. }) => return Some(false),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten();
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_exec_line_decides() {
        assert_eq!(final_line(br#"{"type":"started","broker":"e"}"#), None);
        assert_eq!(
            final_line(br#"{"type":"output","stream":"stdout","data":"eA=="}"#),
            None
        );
        assert_eq!(final_line(b"not json\n"), None);
        assert_eq!(
            final_line(b"{\"type\":\"exit\",\"code\":0}\n"),
            Some(Ok(()))
        );
        assert_eq!(
            final_line(br#"{"type":"exit","code":1}"#),
            Some(Err("exec_exit_nonzero".into()))
        );
        assert_eq!(
            final_line(br#"{"type":"failed","code":"timed_out","message":"x"}"#),
            Some(Err("exec_failed_timed_out".into()))
        );
        // A code this version does not know counts as `unknown`, not as a label of its
        // own: a peer cannot grow the report's error keys without bound.
        assert_eq!(
            final_line(br#"{"type":"failed","code":"Bad Code!","message":""}"#),
            Some(Err("exec_failed_unknown".into()))
        );
    }

    #[test]
    fn only_connected_appliances_are_picked() {
        let mut t = Tally::new(1000);
        assert_eq!(pick_connected(&t), None);
        t.record(FleetEvent::Connected {
            index: 737,
            first_connect: Some(Duration::from_millis(1)),
            since_start: Duration::from_millis(1),
            broker: crate::scenario::tests::BROKER,
            at: Instant::now(),
        });
        for _ in 0..20 {
            assert_eq!(pick_connected(&t), Some(737));
        }
    }
}
