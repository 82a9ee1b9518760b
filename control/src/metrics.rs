//! Control's Prometheus metrics (`tether_control_*`), served on a separate local listener
//! (`metrics_listen`, default 127.0.0.1:8444) so the public API never exposes them.
//!
//! Every API answer is counted by route, status and error code: a refused enrollment shows
//! as `tether_control_requests_total{route="/v1/enroll",status="403",code="token_used"}`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of one API answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template (`/v1/enroll`), or `unmatched`.
    pub route: String,
    /// HTTP status.
    pub status: u16,
    /// The error code, or `ok`.
    pub code: &'static str,
}

/// A `route="..."` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// The route template.
    pub route: String,
}

/// A `reason="..."` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why.
    pub reason: &'static str,
}

/// An `event="..."` label from a bounded set (see [`Metrics::tunnel_event`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// What happened.
    pub event: String,
}

/// A `direction="up|down"` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `up`: operator toward the target; `down`: back.
    pub direction: &'static str,
}

/// Every metric control exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// API answers by route, status and code.
    pub requests: Family<RequestLabels, Counter>,
    /// API latency by route.
    pub request_seconds: Family<RouteLabel, Histogram>,
    /// TLS connections that failed before HTTP (bad client certificate, timeout, ...).
    pub tls_failures: Family<Reason, Counter>,
    /// Audit entries that could not be written (the operation itself was answered).
    pub audit_failures: Counter,
    /// Brokers whose channel is up.
    pub brokers_connected: prometheus_client::metrics::gauge::Gauge,
    /// Broker channels refused or ended with an error, by reason.
    pub channel_errors: Family<Reason, Counter>,
    /// Brokers whose allowlist history differed from the store's (same version, another
    /// digest; or a digest unknown here): each was sent a snapshot.
    pub allowlist_diverged: Counter,
    /// Commands routed to appliances, by how they ended (`exit`, `offline`, `timed_out`,
    /// `lost`, ...).
    pub commands: Family<Reason, Counter>,
    /// Appliance sessions the brokers report.
    pub sessions: prometheus_client::metrics::gauge::Gauge,
    /// Break-glass tunnel sessions by event (`planned`, `opened`, `refused`, `failed`,
    /// `closed`, `ended_<reason>`).
    pub tunnels: Family<EventLabel, Counter>,
    /// Tunnel sessions control relays now.
    pub tunnels_active: prometheus_client::metrics::gauge::Gauge,
    /// Tunnel connections by outcome (`relayed`, or why none: `offline`, `timed_out`, ...).
    pub tunnel_connections: Family<EventLabel, Counter>,
    /// Tunnel bytes relayed, by direction.
    pub tunnel_bytes: Family<DirectionLabel, Counter>,
    /// PostgreSQL: 1 while the NOTIFY listener is connected and its self-probe arrived
    /// (0: changes from other replicas arrive by the one-second poll only).
    pub notify_ok: prometheus_client::metrics::gauge::Gauge,
    /// PostgreSQL: 0 while the database does not answer the reachability probe (requests
    /// needing it are refused at once), else 1.
    pub database_reachable: prometheus_client::metrics::gauge::Gauge,
    /// PostgreSQL: times the NOTIFY listener lost its connection (it catches up after).
    pub notify_reconnects: Counter,
    /// PostgreSQL: change notifications received.
    pub notifications: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tether_control");
        let m = Metrics {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
            }),
            tls_failures: Family::default(),
            audit_failures: Counter::default(),
            brokers_connected: Default::default(),
            channel_errors: Family::default(),
            allowlist_diverged: Counter::default(),
            commands: Family::default(),
            sessions: Default::default(),
            tunnels: Family::default(),
            tunnels_active: Default::default(),
            tunnel_connections: Family::default(),
            tunnel_bytes: Family::default(),
            notify_ok: Default::default(),
            database_reachable: Default::default(),
            notify_reconnects: Counter::default(),
            notifications: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "notify_ok",
            "1 while change notifications from other replicas are delivered (PostgreSQL)",
            m.notify_ok.clone(),
        );
        registry.register(
            "database_reachable",
            "0 while the database does not answer (requests needing it get 503 at once), else 1 (PostgreSQL)",
            m.database_reachable.clone(),
        );
        registry.register(
            "notify_reconnects",
            "Times the change-notification listener lost its database connection",
            m.notify_reconnects.clone(),
        );
        registry.register(
            "notifications",
            "Change notifications received from the database",
            m.notifications.clone(),
        );
        registry.register(
            "requests",
            "API answers by route, HTTP status and error code",
            m.requests.clone(),
        );
        registry.register(
            "request_seconds",
            "API latency by route",
            m.request_seconds.clone(),
        );
        registry.register(
            "tls_failures",
            "TLS connections that failed before any request, by reason",
            m.tls_failures.clone(),
        );
        registry.register(
            "audit_failures",
            "Audit entries that could not be written",
            m.audit_failures.clone(),
        );
        registry.register(
            "brokers_connected",
            "Brokers whose cluster channel is up",
            m.brokers_connected.clone(),
        );
        registry.register(
            "channel_errors",
            "Broker channels refused or ended with an error, by reason",
            m.channel_errors.clone(),
        );
        registry.register(
            "allowlist_diverged",
            "Brokers whose allowlist history diverged from the store's (sent a snapshot)",
            m.allowlist_diverged.clone(),
        );
        registry.register(
            "commands",
            "Commands routed to appliances, by outcome",
            m.commands.clone(),
        );
        registry.register(
            "sessions",
            "Appliance sessions the brokers report",
            m.sessions.clone(),
        );
        registry.register(
            "tunnels",
            "Break-glass tunnel sessions by event",
            m.tunnels.clone(),
        );
        registry.register(
            "tunnels_active",
            "Break-glass tunnel sessions relayed now",
            m.tunnels_active.clone(),
        );
        registry.register(
            "tunnel_connections",
            "Break-glass tunnel connections by outcome",
            m.tunnel_connections.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Break-glass tunnel bytes relayed, by direction",
            m.tunnel_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Count a tunnel event. Names outside the known set (an appliance's own reason
    /// names) count as `other`, so the label set stays bounded.
    pub fn tunnel_event(&self, event: &str) {
        let known = matches!(
            event,
            "planned" | "opened" | "refused" | "failed" | "closed"
        ) || event.strip_prefix("ended_").is_some_and(|r| {
            tether_proto::TunnelCloseReason::ALL
                .iter()
                .any(|k| k.as_str() == r)
        });
        let event = if known { event } else { "other" };
        self.tunnels
            .get_or_create(&EventLabel {
                event: event.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The local metrics listener: `GET /metrics`, `GET /healthz`, plain HTTP.
pub fn router(metrics: std::sync::Arc<Metrics>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
}
