//! Live updates: `GET /console/events?view=fleet&<filters>`, `view=appliance&id=…` or
//! `view=alerts`, server-sent events.
//!
//! A per-process [`Hub`] broadcasts the ids of appliances that changed, fed by the
//! cluster's presence changes (a session up or down, another trust state in a
//! heartbeat), by the store's allowlist changes (revocations, disables, new
//! certificates, from any replica's API or console) and by this console's own actions.
//! Each stream renders, per change, the same row partial the Fleet table uses (event
//! `row`, a `<tr id="app-…">` the page swaps by id) or the appliance header (event
//! `appliance`), and at most once a second the header tiles (event `summary`). The Trust
//! Alerts page gets its whole table (event `alerts`) at most once a second after a
//! change, and every [`ALERTS_REFRESH`] besides (alerts also come and go with the clock:
//! a certificate entering its renewal window), only when it differs from the last. A stream
//! that fell behind gets `reload`; so does one reconnecting (`Last-Event-ID`), so a page
//! is fresh after control restarts. Keep-alive every [`KEEP_ALIVE`], `retry: 2000`.
//!
//! The session is checked at connect (by the guard) and every [`SESSION_CHECK`]; the
//! stream ends when it is gone (a logout on this process ends it at once:
//! [`Hub::session_ended`]). At most [`MAX_PER_SESSION`] streams per session and
//! [`MAX_STREAMS`] per process (429 beyond).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use askama::Template;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use tether_api::operators::Role;
use tether_api::trust::FleetTrust;
use tether_audit::action;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::alerts::Alert;
use super::pages::{
    allow, appliance_view, current_tiles, row_by_id, summary as fleet_summary, FleetFilter,
    HeadTemplate,
};
use super::view::{AlertsTemplate, RowTemplate, TilesTemplate};
use super::{Authed, ConsoleState};
use crate::domain::operators::ConsoleSession;
use crate::http::AppState;

/// Keep-alive comment interval.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often a stream re-checks its session (an operator revoked, or signed out on
/// another replica): one indexed read per open stream.
pub const SESSION_CHECK: Duration = Duration::from_secs(5);
/// How often the Trust Alerts page is re-checked without any change.
pub const ALERTS_REFRESH: Duration = Duration::from_secs(10);
/// What the browser waits before reconnecting.
pub const RETRY: Duration = Duration::from_millis(2000);
/// Streams per session.
pub const MAX_PER_SESSION: usize = 8;
/// Streams per process.
pub const MAX_STREAMS: usize = 500;
/// Changes a slow stream may fall behind by before it is told to reload.
pub const HUB_CAPACITY: usize = 4096;
/// Ended sessions a stream may fall behind by before it re-checks its own.
const ENDED_CAPACITY: usize = 256;
/// The summary is sent at most this often.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(1);

type Summary = (FleetTrust, Vec<Alert>);

/// The per-process broadcast of changed appliances, the summary cache and the stream
/// counts.
#[derive(Debug)]
pub struct Hub {
    tx: broadcast::Sender<Arc<str>>,
    /// Sessions (token hashes) that ended on this process.
    ended: broadcast::Sender<Arc<str>>,
    summary: Mutex<Option<(Instant, Summary)>>,
    streams: AtomicUsize,
    per_session: Mutex<HashMap<String, usize>>,
    /// Control is stopping: streams end cleanly (the browser reconnects to the next one).
    stop: CancellationToken,
}

impl Hub {
    /// A hub fed by `app`'s cluster and store until `stop`.
    pub fn start(app: &AppState, stop: CancellationToken) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            tx: broadcast::channel(HUB_CAPACITY).0,
            ended: broadcast::channel(ENDED_CAPACITY).0,
            summary: Mutex::new(None),
            streams: AtomicUsize::new(0),
            per_session: Mutex::new(HashMap::new()),
            stop: stop.clone(),
        });
        // Presence changes.
        let mut changes = app.cluster.subscribe_changes();
        let h = hub.clone();
        let s = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    r = changes.recv() => match r {
                        Ok(id) => h.appliance_changed(&id),
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        });
        // Store changes: the allowlist (any replica's revoke, disable, enable, issue).
        let store = app.domain.store.clone();
        let mut watch = store.allowlist_watch();
        let h = hub.clone();
        tokio::spawn(async move {
            let mut seen = *watch.borrow_and_update();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = watch.changed() => if r.is_err() { return },
                }
                if h.tx.receiver_count() == 0 {
                    seen = *watch.borrow_and_update();
                    continue;
                }
                // Page through every change since the last one seen.
                loop {
                    match store.allowlist_changes_since(seen, 1000).await {
                        Ok(deltas) if deltas.is_empty() => break,
                        Ok(deltas) => {
                            for d in &deltas {
                                h.appliance_changed(&d.appliance_id);
                                seen = seen.max(d.version);
                            }
                        }
                        Err(e) => {
                            debug!(error = %e, "console cannot read allowlist changes");
                            break;
                        }
                    }
                }
            }
        });
        hub
    }

    /// Tell the open pages appliance `id` changed.
    pub fn appliance_changed(&self, id: &str) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::from(id));
        }
        // The next summary is computed afresh.
        *self.summary.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The session whose token hashes to `token_sha256` ended (logout): its streams end now.
    pub fn session_ended(&self, token_sha256: &str) {
        if self.ended.receiver_count() > 0 {
            let _ = self.ended.send(Arc::from(token_sha256));
        }
    }

    /// The summary kept, if any, and until when it is fresh.
    pub fn cached_summary(&self) -> Option<(Instant, Summary)> {
        self.summary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keep `v`, fresh until `fresh_until`.
    pub fn cache_summary(&self, fresh_until: Instant, v: Summary) {
        *self.summary.lock().unwrap_or_else(|p| p.into_inner()) = Some((fresh_until, v));
    }

    /// Open streams in this process.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    fn admit(self: &Arc<Self>, session: &str) -> Option<Slot> {
        let mut per = self.per_session.lock().unwrap_or_else(|p| p.into_inner());
        let mine = per.entry(session.to_owned()).or_default();
        if *mine >= MAX_PER_SESSION || self.streams.load(Ordering::Relaxed) >= MAX_STREAMS {
            return None;
        }
        *mine += 1;
        self.streams.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            hub: self.clone(),
            session: session.to_owned(),
        })
    }
}

/// A stream's place in the limits; given back when the stream ends.
struct Slot {
    hub: Arc<Hub>,
    session: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.hub.streams.fetch_sub(1, Ordering::Relaxed);
        let mut per = self
            .hub
            .per_session
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.session) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.session);
            }
        }
    }
}

struct Live {
    s: ConsoleState,
    session: ConsoleSession,
    f: FleetFilter,
    can_act: bool,
    /// The session's synchronizer token (the alerts table's forms).
    csrf: String,
    rx: broadcast::Receiver<Arc<str>>,
    ended: broadcast::Receiver<Arc<str>>,
    /// The alerts table last sent (`view=alerts`).
    last_alerts: Option<String>,
    queue: VecDeque<Event>,
    summary_due: Option<tokio::time::Instant>,
    next_check: tokio::time::Instant,
    done: bool,
    _slot: Slot,
}

impl Live {
    async fn on_change(&mut self, id: &str) {
        let now = crate::now_unix();
        if self.f.view == "alerts" {
            let soon = tokio::time::Instant::now() + SUMMARY_EVERY;
            self.summary_due = Some(self.summary_due.map_or(soon, |d| d.min(soon)));
            return;
        }
        if self.f.view == "appliance" {
            if id != self.f.id {
                return;
            }
            if let Ok((view, _)) = appliance_view(&self.s, id, now).await {
                if let Ok(html) = (HeadTemplate { a: &view }).render() {
                    self.queue
                        .push_back(Event::default().event("appliance").data(html));
                }
            }
            return;
        }
        if let Ok(Some(row)) = row_by_id(&self.s.app, id, now).await {
            let t = RowTemplate {
                row: &row,
                can_act: self.can_act,
            };
            if let Ok(html) = t.render() {
                self.queue
                    .push_back(Event::default().event("row").data(html));
            }
        }
        if self.summary_due.is_none() {
            self.summary_due = Some(tokio::time::Instant::now() + SUMMARY_EVERY);
        }
    }

    async fn summary(&mut self) {
        self.summary_due = None;
        let now = crate::now_unix();
        if self.f.view == "alerts" {
            self.summary_due = Some(tokio::time::Instant::now() + ALERTS_REFRESH);
            let Ok((_, alerts)) = fleet_summary(&self.s, now).await else {
                return;
            };
            let t = AlertsTemplate {
                alerts: &alerts,
                can_act: self.can_act,
                csrf: &self.csrf,
            };
            if let Ok(html) = t.render() {
                if self.last_alerts.as_deref() != Some(html.as_str()) {
                    self.last_alerts = Some(html.clone());
                    self.queue
                        .push_back(Event::default().event("alerts").data(html));
                }
            }
            return;
        }
        if let Ok(tiles) = current_tiles(&self.s, &self.f, now).await {
            if let Ok(html) = (TilesTemplate { tiles }).render() {
                self.queue
                    .push_back(Event::default().event("summary").data(html));
            }
        }
    }

    async fn still_signed_in(&self) -> bool {
        let now = crate::now_unix();
        match self
            .s
            .app
            .domain
            .store
            .console_session(&self.session.token_sha256)
            .await
        {
            Ok(Some(r)) => {
                now < r.idle_expires_at
                    && now < r.abs_expires_at
                    && r.status == tether_api::operators::OperatorStatus::Active
            }
            Ok(None) => false,
            // The database is away (a restart, a failover): keep the stream; the next
            // check decides.
            Err(_) => true,
        }
    }

    async fn next_event(mut self) -> Option<(Result<Event, Infallible>, Live)> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some((Ok(ev), self));
            }
            if self.done {
                return None;
            }
            let due = self.summary_due;
            let stop = self.s.hub.stop.clone();
            tokio::select! {
                _ = stop.cancelled() => return None,
                r = self.rx.recv() => match r {
                    Ok(id) => self.on_change(&id).await,
                    Err(RecvError::Lagged(_)) => {
                        self.queue.push_back(Event::default().event("reload").data("lagged"));
                        self.done = true;
                    }
                    Err(RecvError::Closed) => return None,
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    self.summary().await;
                }
                r = self.ended.recv() => match r {
                    Ok(h) if *h == *self.session.token_sha256 => {
                        self.queue.push_back(Event::default().event("reload").data("signed out"));
                        self.done = true;
                    }
                    Ok(_) => {}
                    // Fell behind: the periodic check decides, now.
                    Err(RecvError::Lagged(_)) => self.next_check = tokio::time::Instant::now(),
                    Err(RecvError::Closed) => return None,
                },
                _ = tokio::time::sleep_until(self.next_check) => {
                    self.next_check = tokio::time::Instant::now() + SESSION_CHECK;
                    if !self.still_signed_in().await {
                        self.queue.push_back(Event::default().event("reload").data("signed out"));
                        self.done = true;
                    }
                }
            }
        }
    }
}

/// `GET /console/events` (viewer+).
pub async fn stream(
    State(s): State<ConsoleState>,
    Extension(a): Extension<Authed>,
    Query(f): Query<FleetFilter>,
    headers: HeaderMap,
) -> Result<Response, super::view::PageError> {
    let now = crate::now_unix();
    let what = match f.view.as_str() {
        "appliance" => action::APPLIANCE_SHOW,
        "alerts" => crate::domain::operators::action::FLEET_TRUST,
        _ => action::APPLIANCE_LIST,
    };
    let target = tether_audit::clip(&f.id, tether_audit::MAX_TARGET_LEN).to_owned();
    let (me, _) = allow(&s, &a, Role::Viewer, what, &target, now).await?;
    let Some(slot) = s.hub.admit(a.session.session_ref()) else {
        return Ok((StatusCode::TOO_MANY_REQUESTS, "too many live streams").into_response());
    };
    let mut queue = VecDeque::new();
    queue.push_back(Event::default().retry(RETRY).event("hello").data("live"));
    // A reconnect (the browser sends Last-Event-ID) may have missed changes, or control
    // restarted: the page re-reads everything.
    if headers.contains_key("last-event-id") {
        queue.push_back(Event::default().event("reload").data("reconnected"));
    }
    // The alerts page was rendered just now; the first check is a refresh away.
    let summary_due = (f.view == "alerts").then(|| tokio::time::Instant::now() + ALERTS_REFRESH);
    let live = Live {
        rx: s.hub.tx.subscribe(),
        ended: s.hub.ended.subscribe(),
        session: a.session.clone(),
        can_act: me.can_act,
        csrf: me.csrf.clone(),
        last_alerts: None,
        f,
        queue,
        summary_due,
        next_check: tokio::time::Instant::now() + SESSION_CHECK,
        done: false,
        _slot: slot,
        s,
    };
    // Every event carries an id, so a reconnecting browser says it is reconnecting.
    let stream = futures_util::stream::unfold(live, |l| l.next_event());
    let stream = futures_util::StreamExt::map(stream, |ev| ev.map(|e| e.id("1")));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}
