//! The read pages: Fleet, Trust Alerts, Appliance (Overview / Trust / Certificates /
//! Audit), the revoke form, Brokers, Operators (admin), Audit log, Account. Each
//! authorizes as the API's matching read does (same action on refusal).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use tether_api::appliances::{ApplianceStatus, Presence};
use tether_api::operators::Role;
use tether_api::trust::{FleetTrust, TrustState};
use tether_audit::{action, AuditEntry};

use super::alerts::{self, Alert};
use super::assets::{assets, Assets};
use super::view::{html, when, when_rel, Me, Opt, PageError, Row, Tile};
use super::{Authed, ConsoleState};
use crate::domain::operators::{self, authorize, Caller, VerifiedOperator};
use crate::domain::trust::evaluate;
use crate::domain::{internal, Error, ErrorKind};
use crate::http::AppState;
use crate::store::{Appliance, ApplianceFilter, AuditSearch, CertRecord, CertState};

/// Rows per Fleet page.
pub const PAGE_ROWS: usize = 100;
/// A Fleet page scans at most this many appliances to fill itself (then offers the next
/// page from where it stopped), so a narrow filter over 100,000 appliances stays bounded.
pub const SCAN_LIMIT: usize = 5_000;
/// Appliances read from the store at a time while scanning.
const SCAN_BATCH: u32 = 500;
/// Audit entries per page.
pub const AUDIT_ROWS: u32 = 100;
/// The appliance's latest audit entries searched for its signed manifests.
const MANIFEST_SCAN: u32 = 500;

/// Authorize the page's operator for `needed` as `what` on `target`.
pub(crate) async fn allow(
    s: &ConsoleState,
    a: &Authed,
    needed: Role,
    what: &str,
    target: &str,
    now: i64,
) -> Result<(Me, Caller), PageError> {
    let me = Me::of(a);
    let op: VerifiedOperator = authorize(&s.app.domain, a.principal(), needed, what, target, now)
        .await
        .map_err(|e| PageError::new(&me, e))?;
    Ok((me, Caller::Operator(op)))
}

fn opt_str(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// The Fleet filters, as the URL carries them (empty: not set).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct FleetFilter {
    /// Id prefix.
    pub q: String,
    /// Tenant.
    pub tenant: String,
    /// Trust state.
    pub trust_state: String,
    /// Status.
    pub status: String,
    /// `yes` / `no`.
    pub connected: String,
    /// Broker name.
    pub broker: String,
    /// Keyset: start after this id.
    pub after: Option<String>,
    /// SSE only: `fleet`, `appliance` or `alerts`.
    pub view: String,
    /// SSE only: the appliance of `view=appliance`.
    pub id: String,
}

impl FleetFilter {
    /// The query string of these filters (no `after`), `&`-joined.
    pub fn query(&self) -> String {
        let pairs = [
            ("q", &self.q),
            ("tenant", &self.tenant),
            ("trust_state", &self.trust_state),
            ("status", &self.status),
            ("connected", &self.connected),
            ("broker", &self.broker),
        ];
        let kept: Vec<(&str, &str)> = pairs
            .iter()
            .filter(|(_, v)| !v.trim().is_empty())
            .map(|(k, v)| (*k, v.trim()))
            .collect();
        serde_urlencoded::to_string(kept).unwrap_or_default()
    }

    fn with(&self, extra: &str) -> String {
        match (self.query(), extra) {
            (q, "") if q.is_empty() => "/console/".to_owned(),
            (q, e) if q.is_empty() => format!("/console/?{e}"),
            (q, "") => format!("/console/?{q}"),
            (q, e) => format!("/console/?{q}&{e}"),
        }
    }

    fn trust(&self) -> Option<TrustState> {
        TrustState::ALL
            .into_iter()
            .find(|t| t.as_str() == self.trust_state.trim())
    }

    fn status(&self) -> Option<ApplianceStatus> {
        ApplianceStatus::parse(self.status.trim())
    }

    /// Whether `row` (with its presence) passes the filters the store did not apply.
    pub fn keeps(&self, row: &Row) -> bool {
        if let Some(t) = self.trust() {
            if row.trust_state != t.as_str() {
                return false;
            }
        }
        match self.connected.trim() {
            "yes" if row.broker.is_none() => return false,
            "no" if row.broker.is_some() => return false,
            _ => {}
        }
        if let Some(b) = opt_str(&self.broker) {
            if row.broker.as_deref() != Some(b.as_str()) {
                return false;
            }
        }
        if let Some(t) = opt_str(&self.tenant) {
            if row.tenant != t {
                return false;
            }
        }
        if let Some(st) = self.status() {
            if row.status != st.as_str() {
                return false;
            }
        }
        if let Some(q) = opt_str(&self.q) {
            if !row.id.starts_with(&q) {
                return false;
            }
        }
        true
    }

    fn store_filter(&self, after: Option<String>, limit: u32) -> ApplianceFilter {
        ApplianceFilter {
            status: self.status(),
            tenant: opt_str(&self.tenant),
            after,
            id_prefix: opt_str(&self.q),
            limit,
        }
    }

    fn needs_scan(&self) -> bool {
        self.trust().is_some()
            || !self.connected.trim().is_empty()
            || opt_str(&self.broker).is_some()
    }
}

/// The table row of appliance `a` (current certificate `cert`, presence `p`) at `now`.
pub fn row_of(
    app: &AppState,
    a: &Appliance,
    cert: Option<&CertRecord>,
    p: Option<&Presence>,
    now: i64,
) -> Row {
    let trust = evaluate(a.status, cert, now, &app.domain.settings.trust);
    Row {
        id: a.id.clone(),
        tenant: a.tenant.clone(),
        status: a.status.as_str(),
        trust_state: trust.as_str(),
        broker: p.map(|p| p.broker.clone()),
        connected_since: p.map(|p| when(p.connected_at as i64)),
        last_heartbeat: p.and_then(|p| p.last_heartbeat).map(|h| when(h as i64)),
        expires: cert.map(|c| when_rel(c.not_after, now)),
        agent_version: p.map(|p| p.agent_version.clone()).unwrap_or_default(),
    }
}

/// The row of appliance `id` now, if it exists.
pub async fn row_by_id(app: &AppState, id: &str, now: i64) -> Result<Option<Row>, Error> {
    let store = app.domain.store.as_ref();
    let Some(a) = store.get_appliance(id).await.map_err(internal)? else {
        return Ok(None);
    };
    let cert = store.current_certificate(id).await.map_err(internal)?;
    let p = app.cluster.presence(id);
    Ok(Some(row_of(app, &a, cert.as_ref(), p.as_ref(), now)))
}

/// The header tiles for `summary` (as `GET /v1/fleet/trust` counts), the connected
/// count and the number of findings; `f` marks the tile the table is filtered by.
pub fn tiles(summary: &FleetTrust, connected: u64, alert_count: u64, f: &FleetFilter) -> Vec<Tile> {
    let mut out: Vec<Tile> = TrustState::ALL
        .into_iter()
        .map(|t| Tile {
            label: t.as_str(),
            trust_state: Some(t.as_str()),
            tile: None,
            count: summary.counts.get(t.as_str()).copied().unwrap_or(0),
            href: format!("/console/?trust_state={}", t.as_str()),
            current: f.trust_state.trim() == t.as_str(),
        })
        .collect();
    let offline = summary.total.saturating_sub(connected);
    // The header names `disabled` beside the trust states (tools outside look
    // for `data-trust-state="disabled"`), though it is a status an appliance has on top
    // of its trust state; the rows say it in `data-status`.
    out.push(Tile {
        label: "disabled",
        trust_state: Some("disabled"),
        tile: Some("disabled"),
        count: summary.disabled,
        href: "/console/?status=disabled".into(),
        current: f.status.trim() == "disabled",
    });
    out.push(Tile {
        label: "connected",
        trust_state: None,
        tile: Some("connected"),
        count: connected,
        href: "/console/?connected=yes".into(),
        current: f.connected.trim() == "yes",
    });
    out.push(Tile {
        label: "offline",
        trust_state: None,
        tile: Some("offline"),
        count: offline,
        href: "/console/?connected=no".into(),
        current: f.connected.trim() == "no",
    });
    out.push(Tile {
        label: "active alerts",
        trust_state: None,
        tile: Some("alerts"),
        count: alert_count,
        href: "/console/alerts".into(),
        current: false,
    });
    out
}

/// The summary and findings kept for [`SUMMARY_FRESH`], or [`SUMMARY_COST_FACTOR`] times
/// as long as they took to compute when that is longer: on a fleet so large that one
/// computation takes 200 ms, they are kept 2 s, so however many pages are open the
/// summary costs this process at most a tenth of a core.
pub const SUMMARY_FRESH: Duration = Duration::from_secs(1);
/// See [`SUMMARY_FRESH`].
pub const SUMMARY_COST_FACTOR: u32 = 10;

/// The summary and findings, computed at most once per [`SUMMARY_FRESH`] (or longer, see
/// there) per process.
pub async fn summary(s: &ConsoleState, now: i64) -> Result<(FleetTrust, Vec<Alert>), Error> {
    if let Some((fresh_until, v)) = s.hub.cached_summary() {
        if Instant::now() < fresh_until {
            return Ok(v);
        }
    }
    let started = Instant::now();
    let v = alerts::collect(&s.app, now).await.map_err(internal)?;
    let keep = SUMMARY_FRESH.max(started.elapsed() * SUMMARY_COST_FACTOR);
    s.hub.cache_summary(started + keep, v.clone());
    Ok(v)
}

/// The tiles now.
pub async fn current_tiles(
    s: &ConsoleState,
    f: &FleetFilter,
    now: i64,
) -> Result<Vec<Tile>, Error> {
    let (summary, alerts) = summary(s, now).await?;
    let connected = s.app.cluster.connected_count() as u64;
    Ok(tiles(&summary, connected, alerts.len() as u64, f))
}

#[derive(Template)]
#[template(path = "console/fleet.html")]
struct FleetPage {
    assets: &'static Assets,
    me: Me,
    active: &'static str,
    live: Option<String>,
    tiles: Vec<Tile>,
    f: FleetFilter,
    trust_options: Vec<Opt>,
    status_options: Vec<Opt>,
    rows: Vec<Row>,
    can_act: bool,
    back: String,
    first: String,
    next: Option<String>,
    shown: usize,
    scanned_out: bool,
    scan_limit: usize,
}

/// A page of the Fleet table: at most [`PAGE_ROWS`] rows after `f.after`, scanning at
/// most [`SCAN_LIMIT`] appliances; the `after` of the next page.
pub async fn fleet_rows(
    app: &AppState,
    f: &FleetFilter,
    now: i64,
) -> Result<(Vec<Row>, Option<String>, bool), Error> {
    let store = app.domain.store.as_ref();
    let batch = if f.needs_scan() {
        SCAN_BATCH
    } else {
        PAGE_ROWS as u32 + 1
    };
    let mut after = f.after.clone().and_then(|a| opt_str(&a));
    let mut rows = Vec::new();
    let mut scanned = 0;
    loop {
        let page = store
            .list_appliances(&f.store_filter(after.clone(), batch))
            .await
            .map_err(internal)?;
        let done = page.len() < batch as usize;
        // The page's certificates in one query, not one per appliance.
        let mut certs: HashMap<String, CertRecord> = match page.last() {
            Some(last) => store
                .current_certificates_between(after.as_deref(), &last.id)
                .await
                .map_err(internal)?
                .into_iter()
                .map(|c| (c.appliance_id.clone(), c))
                .collect(),
            None => HashMap::new(),
        };
        for a in page {
            if rows.len() == PAGE_ROWS {
                // Another matching appliance may follow: offer the next page.
                return Ok((rows, after, false));
            }
            scanned += 1;
            after = Some(a.id.clone());
            let p = app.cluster.presence(&a.id);
            let cert = certs.remove(&a.id);
            let row = row_of(app, &a, cert.as_ref(), p.as_ref(), now);
            if f.keeps(&row) {
                rows.push(row);
            }
            if scanned >= SCAN_LIMIT {
                return Ok((rows, after, true));
            }
        }
        if done {
            return Ok((rows, None, false));
        }
    }
}

/// `GET /console/` — Fleet.
pub async fn fleet(
    State(s): State<ConsoleState>,
    Extension(a): Extension<Authed>,
    Query(f): Query<FleetFilter>,
) -> Result<Response, PageError> {
    let now = crate::now_unix();
    let (me, _) = allow(&s, &a, Role::Viewer, action::APPLIANCE_LIST, "", now).await?;
    let err = |e| PageError::new(&me, e);
    let tiles = current_tiles(&s, &f, now).await.map_err(err)?;
    let (rows, next_after, scanned_out) = fleet_rows(&s.app, &f, now).await.map_err(err)?;
    let next = next_after
        .map(|n| f.with(&serde_urlencoded::to_string([("after", n.as_str())]).unwrap_or_default()));
    let trust_options = TrustState::ALL
        .into_iter()
        .map(|t| Opt {
            value: t.as_str(),
            selected: f.trust_state.trim() == t.as_str(),
        })
        .collect();
    let status_options = ApplianceStatus::ALL
        .into_iter()
        .map(|t| Opt {
            value: t.as_str(),
            selected: f.status.trim() == t.as_str(),
        })
        .collect();
    let live = Some(match f.query() {
        q if q.is_empty() => "/console/events?view=fleet".to_owned(),
        q => format!("/console/events?view=fleet&{q}"),
    });
    let back = match &f.after {
        Some(a) if !a.is_empty() => {
            f.with(&serde_urlencoded::to_string([("after", a.as_str())]).unwrap_or_default())
        }
        _ => f.with(""),
    };
    let page = FleetPage {
        assets: assets(),
        can_act: me.can_act,
        me,
        active: "fleet",
        live,
        tiles,
        first: f.with(""),
        shown: rows.len(),
        trust_options,
        status_options,
        rows,
        back,
        next,
        scanned_out,
        scan_limit: SCAN_LIMIT,
        f,
    };
    Ok(html(StatusCode::OK, &page))
}

#[derive(Template)]
#[template(path = "console/alerts.html")]
struct AlertsPage {
    assets: &'static Assets,
    me: Me,
    active: &'static str,
    live: Option<String>,
    alerts: Vec<Alert>,
    can_act: bool,
    csrf: String,
}

/// `GET /console/alerts` — Trust Alerts.
pub async fn alerts(
    State(s): State<ConsoleState>,
    Extension(a): Extension<Authed>,
) -> Result<Response, PageError> {
    let now = crate::now_unix();
    let what = operators::action::FLEET_TRUST;
    let (me, _) = allow(&s, &a, Role::Viewer, what, "", now).await?;
    let (_, alerts) = summary(&s, now).await.map_err(|e| PageError::new(&me, e))?;
    Ok(html(
        StatusCode::OK,
        &AlertsPage {
            assets: assets(),
            can_act: me.can_act,
            csrf: me.csrf.clone(),
            me,
            active: "alerts",
            live: Some("/console/events?view=alerts".to_owned()),
            alerts,
        },
    ))
}

/// The appliance's header and overview as the page shows them.
#[derive(Clone, Debug)]
pub struct ApplianceView {
    /// Id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Status.
    pub status: &'static str,
    /// Trust state.
    pub trust_state: &'static str,
    /// Broker.
    pub broker: Option<String>,
    /// Since when.
    pub connected_since: Option<String>,
    /// Transport.
    pub transport: String,
    /// Session id.
    pub session_id: u64,
    /// Agent version.
    pub agent_version: String,
    /// Last heartbeat.
    pub last_heartbeat: Option<String>,
    /// What the agent reports.
    pub agent_trust: Option<String>,
    /// The agent's status report.
    pub agent_status: std::collections::BTreeMap<String, String>,
    /// The capabilities its agent announced (`signed-ops/1`: the appliance decides).
    pub capabilities: Vec<String>,
    /// Binding (JSON).
    pub binding: String,
    /// Registered.
    pub created_at: String,
    /// Requested manual renewal generation.
    pub requested_generation: i64,
    /// Whether (and when) the latest request was applied.
    pub renewal_applied: String,
}

/// The appliance header alone (the live `appliance` event).
#[derive(Template)]
#[template(path = "console/appliance_head.html")]
pub struct HeadTemplate<'a> {
    /// The appliance.
    pub a: &'a ApplianceView,
}

/// A certificate as the Trust tab shows it.
#[derive(Clone, Debug)]
pub struct CertView {
    serial: String,
    fingerprint: String,
    not_before: String,
    not_after: String,
    state: &'static str,
    previous_until: Option<String>,
}

/// The previous certificate and when its overlap ends.
#[derive(Clone, Debug)]
pub struct PreviousView {
    serial: String,
    overlap_end: String,
}

/// An audit entry as the tables show it.
#[derive(Clone, Debug)]
pub struct EntryView {
    seq: i64,
    at: String,
    actor: String,
    action: String,
    target: String,
    outcome: &'static str,
    details: String,
}

fn entry_view(e: &AuditEntry) -> EntryView {
    EntryView {
        seq: e.seq,
        at: when(e.at),
        actor: format!("{}:{}", e.actor.kind.as_str(), e.actor.name),
        action: e.action.clone(),
        target: e.target.clone(),
        outcome: e.outcome.as_str(),
        details: serde_json::to_string(&e.details).unwrap_or_default(),
    }
}

/// The Signed operations tab: what the appliance's agent last reported of its customer's
/// policy and approvers, and its recent signed manifests from the audit log.
#[derive(Clone, Debug, Default)]
pub struct SignedView {
    /// The agent announced `signed-ops/1`.
    enabled: bool,
    /// The policy's SHA-256 as the agent loaded it.
    policy: Option<String>,
    /// Why the agent could not use its policy.
    policy_error: Option<String>,
    /// Each permission phase and its setting (`on/required`, `off`, …).
    phases: Vec<(String, String)>,
    /// Approver key ids and fingerprints.
    approvers: Vec<(String, String)>,
    /// Why the agent could not use its approvers file.
    approvers_error: Option<String>,
    /// Privilege separation in force.
    privsep: Option<String>,
    /// The head of the appliance's own audit log.
    audit_head: Option<String>,
    /// Why the appliance's own audit log is unusable.
    audit_error: Option<String>,
    /// The appliance's manifest-signing key.
    appliance_key: Option<String>,
    /// Recent signed manifests, newest first.
    manifests: Vec<ManifestView>,
}

/// A signed manifest as its audit entry holds it.
#[derive(Clone, Debug)]
pub struct ManifestView {
    seq: i64,
    at: String,
    action: String,
    outcome: &'static str,
    command: String,
    sha256: String,
    /// The manifest itself (canonical JSON) when the entry holds it whole.
    manifest: Option<String>,
}

/// Manifests the Signed operations tab lists.
const MANIFESTS_SHOWN: usize = 20;

impl SignedView {
    /// From `a`'s status report and its recent audit `entries`.
    fn of(a: &ApplianceView, entries: &[AuditEntry]) -> SignedView {
        let st = |k: &str| a.agent_status.get(k).cloned();
        // The agent joins list values with `,` (see the agent's `Status` entries); this
        // only splits them for display.
        let list = |k: &str| -> Vec<(String, String)> {
            a.agent_status
                .get(k)
                .map(|v| {
                    v.split(',')
                        .filter(|x| !x.is_empty())
                        .map(|x| match x.split_once(['=', ':']) {
                            Some((l, r)) => (l.to_owned(), r.to_owned()),
                            None => (x.to_owned(), String::new()),
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let manifests = entries
            .iter()
            .filter_map(|e| {
                let d = e.details.as_object()?;
                let sha256 = d.get("manifest_sha256")?.as_str()?.to_owned();
                let command = match d.get("command_id") {
                    Some(v) => v.to_string(),
                    None => d
                        .get("tunnel")
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_owned(),
                };
                Some(ManifestView {
                    seq: e.seq,
                    at: when(e.at),
                    action: e.action.clone(),
                    outcome: e.outcome.as_str(),
                    command,
                    sha256,
                    manifest: d
                        .get("manifest")
                        .and_then(|v| v.as_str())
                        .map(str::to_owned),
                })
            })
            .take(MANIFESTS_SHOWN)
            .collect();
        SignedView {
            enabled: a
                .capabilities
                .iter()
                .any(|c| c == tether_proto::capability::SIGNED_OPS),
            policy: st("policy.sha256"),
            policy_error: st("policy.error"),
            // A phase's setting is `on/required`: shown "on, required". (Only there: an
            // approver's base64 fingerprint holds `/` too.)
            phases: list("policy.phases")
                .into_iter()
                .map(|(phase, setting)| (phase, setting.replace('/', ", ")))
                .collect(),
            approvers: list("approvers"),
            approvers_error: st("approvers.error"),
            privsep: st("privsep"),
            audit_head: st("audit.head"),
            audit_error: st("audit.error"),
            appliance_key: st("appliance.key"),
            manifests,
        }
    }
}

#[derive(Template)]
#[template(path = "console/appliance.html")]
struct AppliancePage {
    assets: &'static Assets,
    me: Me,
    active: &'static str,
    live: Option<String>,
    a: ApplianceView,
    can_act: bool,
    tab: &'static str,
    current: Option<CertView>,
    previous: Option<PreviousView>,
    certs: Vec<CertView>,
    alerts: Vec<Alert>,
    entries: Vec<EntryView>,
    signed: SignedView,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct TabQuery {
    tab: String,
}

/// The appliance view of `id` now.
pub async fn appliance_view(
    s: &ConsoleState,
    id: &str,
    now: i64,
) -> Result<(ApplianceView, Vec<CertRecord>), Error> {
    let store = s.app.domain.store.as_ref();
    let a = store
        .get_appliance(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                "not_found",
                format!("no appliance {id}"),
            )
        })?;
    let certs = store.certificates(id).await.map_err(internal)?;
    let current = certs.iter().find(|c| c.state == CertState::Current);
    let p = s.app.cluster.presence(id);
    let trust = evaluate(a.status, current, now, &s.app.domain.settings.trust);
    let requested = alerts::last_renewal_request(&s.app, id)
        .await
        .map_err(internal)?;
    let renewal_applied = match requested {
        None => "no renewal requested".to_owned(),
        Some(t) if alerts::renewal_done(t, current) => {
            format!(
                "applied (a certificate was issued after the request of {})",
                when(t)
            )
        }
        Some(t) => format!("not applied yet (requested {})", when_rel(t, now)),
    };
    let view = ApplianceView {
        id: a.id.clone(),
        tenant: a.tenant.clone(),
        status: a.status.as_str(),
        trust_state: trust.as_str(),
        broker: p.as_ref().map(|p| p.broker.clone()),
        connected_since: p.as_ref().map(|p| when(p.connected_at as i64)),
        transport: p.as_ref().map(|p| p.transport.clone()).unwrap_or_default(),
        session_id: p.as_ref().map_or(0, |p| p.session_id),
        agent_version: p
            .as_ref()
            .map(|p| p.agent_version.clone())
            .unwrap_or_default(),
        last_heartbeat: p
            .as_ref()
            .and_then(|p| p.last_heartbeat)
            .map(|h| when(h as i64)),
        agent_trust: p.as_ref().and_then(|p| p.trust_state.clone()),
        capabilities: p
            .as_ref()
            .map(|p| p.capabilities.clone())
            .unwrap_or_default(),
        agent_status: p.map(|p| p.agent_status).unwrap_or_default(),
        binding: serde_json::to_string(&a.binding).unwrap_or_default(),
        created_at: when(a.created_at),
        requested_generation: a.manual_renewal_generation,
        renewal_applied,
    };
    Ok((view, certs))
}

fn cert_view(c: &CertRecord) -> CertView {
    let (state, previous_until) = match c.state {
        CertState::Current => ("current", None),
        CertState::PreviousUntil(t) => ("previous", Some(when(t))),
        CertState::Revoked => ("revoked", None),
    };
    CertView {
        serial: c.serial.clone(),
        fingerprint: c.fingerprint.clone(),
        not_before: when(c.not_before),
        not_after: when(c.not_after),
        state,
        previous_until,
    }
}

/// `GET /console/appliances/{id}?tab=…`.
pub async fn appliance(
    State(s): State<ConsoleState>,
    Extension(auth): Extension<Authed>,
    Path(id): Path<String>,
    Query(q): Query<TabQuery>,
) -> Result<Response, PageError> {
    let now = crate::now_unix();
    let target = tether_audit::clip(&id, tether_audit::MAX_TARGET_LEN);
    let (me, _) = allow(&s, &auth, Role::Viewer, action::APPLIANCE_SHOW, target, now).await?;
    let err = |e| PageError::new(&me, e);
    let (view, certs) = appliance_view(&s, &id, now).await.map_err(err)?;
    let tab = match q.tab.as_str() {
        "trust" => "trust",
        "certificates" => "certificates",
        "audit" => "audit",
        "signed" => "signed",
        _ => "overview",
    };
    let current = certs
        .iter()
        .find(|c| c.state == CertState::Current)
        .map(cert_view);
    let previous = certs.iter().find_map(|c| match c.state {
        CertState::PreviousUntil(t) => Some(PreviousView {
            serial: c.serial.clone(),
            overlap_end: when_rel(t, now),
        }),
        _ => None,
    });
    let alerts = if tab == "trust" {
        summary(&s, now)
            .await
            .map_err(err)?
            .1
            .into_iter()
            .filter(|al| al.appliance.as_deref() == Some(id.as_str()))
            .collect()
    } else {
        Vec::new()
    };
    let audit = if tab == "audit" || tab == "signed" {
        s.app
            .domain
            .store
            .audit_search(&AuditSearch {
                target: Some(id.clone()),
                limit: if tab == "signed" {
                    MANIFEST_SCAN
                } else {
                    AUDIT_ROWS
                },
                ..AuditSearch::default()
            })
            .await
            .map_err(|e| err(internal(e)))?
    } else {
        Vec::new()
    };
    let (entries, signed) = if tab == "signed" {
        (Vec::new(), SignedView::of(&view, &audit))
    } else {
        (
            audit.iter().map(entry_view).collect(),
            SignedView::default(),
        )
    };
    let live = Some(appliance_live(&id));
    Ok(html(
        StatusCode::OK,
        &AppliancePage {
            assets: assets(),
            can_act: me.can_act,
            me,
            active: "fleet",
            live,
            a: view,
            tab,
            current,
            previous,
            certs: certs.iter().map(cert_view).collect(),
            alerts,
            entries,
            signed,
        },
    ))
}

/// The live stream of appliance `id`'s pages.
fn appliance_live(id: &str) -> String {
    format!(
        "/console/events?{}",
        serde_urlencoded::to_string([("view", "appliance"), ("id", id)]).unwrap_or_default()
    )
}

#[derive(Template)]
#[template(path = "console/revoke.html")]
struct RevokePage {
    assets: &'static Assets,
    me: Me,
    active: &'static str,
    live: Option<String>,
    id: String,
    a: ApplianceView,
}

/// `GET /console/appliances/{id}/revoke` — the revoke form (operator+). Live: its
/// header follows the appliance (revoked or disabled from elsewhere while the form is
/// open) without losing what was typed.
pub async fn revoke_form(
    State(s): State<ConsoleState>,
    Extension(auth): Extension<Authed>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let now = crate::now_unix();
    let target = tether_audit::clip(&id, tether_audit::MAX_TARGET_LEN);
    let (me, _) = allow(
        &s,
        &auth,
        Role::Operator,
        action::APPLIANCE_REVOKE,
        target,
        now,
    )
    .await?;
    // Only for an appliance that exists (an odd or unknown id gets the 404 the appliance
    // page gives, never a form posting to a path built from it).
    let (view, _) = appliance_view(&s, &id, now)
        .await
        .map_err(|e| PageError::new(&me, e))?;
    Ok(html(
        StatusCode::OK,
        &RevokePage {
            assets: assets(),
            me,
            active: "fleet",
            live: Some(appliance_live(&id)),
            id,
            a: view,
        },
    ))
}

/// A broker as its page shows it.
#[derive(Clone, Debug)]
pub struct BrokerView {
    name: String,
    status: &'static str,
    connected: bool,
    draining: bool,
    quic_addr: String,
    sessions: usize,
    allowlist: String,
    not_after: String,
    last_seen: String,
}

#[derive(Template)]
#[template(path = "console/brokers.html")]
struct BrokersPage {
    assets: &'static Assets,
    me: Me,
    active: &'static str,
    live: Option<String>,
    brokers: Vec<BrokerView>,
    allowlist_version: u64,
}

/// `GET /console/brokers`.
pub async fn brokers(
    State(s): State<ConsoleState>,
    Extension(auth): Extension<Authed>,
) -> Result<Response, PageError> {
    let now = crate::now_unix();
    let (me, _) = allow(&s, &auth, Role::Viewer, action::BROKER_LIST, "", now).await?;
    let list = crate::domain::brokers::list(&s.app.domain.registry(), now)
        .await
        .map_err(|e| PageError::new(&me, e))?;
    let brokers = list
        .brokers
        .into_iter()
        .map(|b| BrokerView {
            status: b.status.as_str(),
            connected: b.connected,
            draining: b.draining,
            quic_addr: b.quic_addr.unwrap_or_default(),
            sessions: b.sessions.unwrap_or(0),
            allowlist: match b.allowlist_version {
                Some(v) if v < list.allowlist_version => format!("{v} (behind)"),
                Some(v) => v.to_string(),
                None => "—".into(),
            },
            not_after: b
                .cert_not_after
                .map(|t| t.replacen('T', " ", 1))
                .unwrap_or_default(),
            last_seen: b
                .last_seen
                .map(|t| t.replacen('T', " ", 1))
                .unwrap_or_default(),
            name: b.name,
        })
        .collect();
    Ok(html(
        StatusCode::OK,
        &BrokersPage {
            assets: assets(),
            me,
            active: "brokers",
            live: None,
            brokers,
            allowlist_version: list.allowlist_version,
        },
    ))
}

/// An operator as the Operators page shows it.
#[derive(Clone, Debug)]
pub struct OperatorView {
    name: String,
    role: &'static str,
    status: &'static str,
    certificates: i64,
    created_at: String,
}

#[derive(Template)]
#[template(path = "console/operators.html")]
struct OperatorsPage {
    assets: &'static Assets,
    me: Me,
    active: &'static str,
    live: Option<String>,
    operators: Vec<OperatorView>,
}

/// `GET /console/operators` (admin).
pub async fn operators(
    State(s): State<ConsoleState>,
    Extension(auth): Extension<Authed>,
) -> Result<Response, PageError> {
    let now = crate::now_unix();
    let (me, _) = allow(&s, &auth, Role::Admin, operators::action::LIST, "", now).await?;
    let list = operators::list(&s.app.domain.registry())
        .await
        .map_err(|e| PageError::new(&me, e))?;
    let operators = list
        .operators
        .into_iter()
        .map(|o| OperatorView {
            role: o.role.as_str(),
            status: o.status.as_str(),
            certificates: o.certificates,
            created_at: when(o.created_at),
            name: o.name,
        })
        .collect();
    Ok(html(
        StatusCode::OK,
        &OperatorsPage {
            assets: assets(),
            me,
            active: "operators",
            live: None,
            operators,
        },
    ))
}

/// The Audit page's filters.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuditFilter {
    action: String,
    actor: String,
    target: String,
    before: Option<i64>,
}

/// The last checkpoint as the Audit page shows it.
#[derive(Clone, Debug)]
pub struct CheckpointView {
    seq: i64,
    at: String,
}

#[derive(Template)]
#[template(path = "console/audit.html")]
struct AuditPageT {
    assets: &'static Assets,
    me: Me,
    active: &'static str,
    live: Option<String>,
    f: AuditFilter,
    entries: Vec<EntryView>,
    checkpoint: Option<CheckpointView>,
    next: Option<String>,
}

/// `GET /console/audit`.
pub async fn audit(
    State(s): State<ConsoleState>,
    Extension(auth): Extension<Authed>,
    Query(f): Query<AuditFilter>,
) -> Result<Response, PageError> {
    let now = crate::now_unix();
    let (me, _) = allow(&s, &auth, Role::Viewer, action::AUDIT_LIST, "", now).await?;
    let err = |e| PageError::new(&me, internal(e));
    let store = s.app.domain.store.as_ref();
    let entries = store
        .audit_search(&AuditSearch {
            target: opt_str(&f.target),
            actor: opt_str(&f.actor),
            action_prefix: opt_str(&f.action),
            before: f.before,
            success_only: false,
            limit: AUDIT_ROWS,
        })
        .await
        .map_err(err)?;
    let next = (entries.len() == AUDIT_ROWS as usize)
        .then(|| entries.last().map(|e| e.seq))
        .flatten()
        .map(|seq| {
            let pairs = [
                ("action", f.action.trim()),
                ("actor", f.actor.trim()),
                ("target", f.target.trim()),
            ];
            let mut q: Vec<(&str, String)> = pairs
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (*k, v.to_string()))
                .collect();
            q.push(("before", seq.to_string()));
            format!(
                "/console/audit?{}",
                serde_urlencoded::to_string(q).unwrap_or_default()
            )
        });
    let checkpoint = store
        .last_audit_checkpoint()
        .await
        .map_err(err)?
        .map(|c| CheckpointView {
            seq: c.seq,
            at: when(c.at),
        });
    Ok(html(
        StatusCode::OK,
        &AuditPageT {
            assets: assets(),
            me,
            active: "audit",
            live: None,
            entries: entries.iter().map(entry_view).collect(),
            f,
            checkpoint,
            next,
        },
    ))
}

/// `GET /console/audit/export` — the whole log and its checkpoints, in the export
/// format `tether audit verify` checks.
pub async fn audit_export(
    State(s): State<ConsoleState>,
    Extension(auth): Extension<Authed>,
) -> Result<Response, PageError> {
    let now = crate::now_unix();
    let (me, _) = allow(&s, &auth, Role::Viewer, action::AUDIT_LIST, "", now).await?;
    let header = tether_audit::export::ExportHeader {
        tether_audit_export: tether_audit::export::EXPORT_VERSION,
        trust_domain: s.app.domain.ca.trust_domain().to_owned(),
        root_pem: s.app.domain.ca.root_pem(),
    };
    let mut out = Vec::new();
    crate::domain::audit::write_export(s.app.domain.store.as_ref(), Some(&header), &mut out)
        .await
        .map_err(|e| PageError::new(&me, internal(e)))?;
    let mut resp = out.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/jsonl"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"tether-audit.jsonl\""),
    );
    Ok(resp)
}

/// A session as the Account page shows it.
#[derive(Clone, Debug)]
pub struct SessionView {
    reference: String,
    current: bool,
    created_at: String,
    last_seen_at: String,
    idle_expires_at: String,
    abs_expires_at: String,
    user_agent: String,
    ip: String,
}

#[derive(Template)]
#[template(path = "console/account.html")]
struct AccountPage {
    assets: &'static Assets,
    me: Me,
    active: &'static str,
    live: Option<String>,
    sessions: Vec<SessionView>,
}

/// `GET /console/account` — the operator's sessions.
pub async fn account(
    State(s): State<ConsoleState>,
    Extension(auth): Extension<Authed>,
) -> Result<Response, PageError> {
    let me = Me::of(&auth);
    let sessions = s
        .app
        .domain
        .store
        .console_sessions(auth.session.operator())
        .await
        .map_err(|e| PageError::new(&me, internal(e)))?
        .into_iter()
        .map(|r| {
            let reference = r.token_sha256[..crate::domain::console::SESSION_REF_LEN].to_owned();
            SessionView {
                current: reference == auth.session.session_ref(),
                reference,
                created_at: when(r.created_at),
                last_seen_at: when(r.last_seen_at),
                idle_expires_at: when(r.idle_expires_at),
                abs_expires_at: when(r.abs_expires_at),
                user_agent: r.user_agent,
                ip: r.ip,
            }
        })
        .collect();
    Ok(html(
        StatusCode::OK,
        &AccountPage {
            assets: assets(),
            me,
            active: "account",
            live: None,
            sessions,
        },
    ))
}
