//! The broker's Prometheus metrics, registered under the `tether_` prefix.
//!
//! One [`Metrics`] is created at startup and shared (`Arc`) by every subsystem; label values
//! are `&'static str` so recording never allocates on the hot path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A `reason="..."` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// The reason.
    pub reason: &'static str,
}

/// A `code="..."` label (QUIC close codes by name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    /// The close code name.
    pub code: &'static str,
}

/// A `kind="..."` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// The kind.
    pub kind: &'static str,
}

/// An `endpoint="..."` label: which QUIC endpoint (`transport.endpoints`), from 0.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointIndex {
    /// The endpoint's index.
    pub endpoint: usize,
}

/// A `transport="..."` label: `quic` or `tcp`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// The transport's name.
    pub transport: &'static str,
}

/// A `result="..."` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// The outcome.
    pub result: &'static str,
}

/// Every metric the broker exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Handshakes refused by the client-certificate verifier or the post-handshake check.
    pub handshake_rejected: Family<Reason, Counter>,
    /// Handshakes that completed and produced a verified appliance.
    pub handshakes_accepted: Counter,
    /// Handshakes that completed, by transport (`quic`, `tcp`).
    pub handshakes_by_transport: Family<TransportLabel, Counter>,
    /// Established sessions, by transport.
    pub sessions_by_transport: Family<TransportLabel, Gauge>,
    /// Incoming TCP connections (before any admission or TLS work).
    pub incoming_tcp: Counter,
    /// Times the TCP accept loop stopped accepting because the handshake queue was full
    /// (connections wait in the kernel's listen backlog meanwhile, none is refused).
    pub tcp_accept_paused: Counter,
    /// Handshakes that failed for transport reasons (timeout, peer gave up, ...).
    pub handshake_failed: Family<Kind, Counter>,
    /// Seconds from accepting an `Incoming` to a verified connection.
    pub handshake_seconds: Histogram,
    /// Incoming connections turned away before any TLS work.
    pub incoming_refused: Family<Reason, Counter>,
    /// Incoming connections, by the QUIC endpoint (UDP socket) that received them: how
    /// evenly the kernel spreads clients over `transport.endpoints`.
    pub incoming: Family<EndpointIndex, Counter>,
    /// Incoming connections waiting for a handshake slot.
    pub incoming_pending: Gauge,
    /// Handshakes in progress.
    pub handshakes_in_flight: Gauge,
    /// Established sessions.
    pub sessions: Gauge,
    /// Sessions that ended, by close code.
    pub sessions_closed: Family<Code, Counter>,
    /// Protocol violations by peers.
    pub protocol_errors: Family<Kind, Counter>,
    /// Fingerprints in the allowlist snapshot in force.
    pub allowlist_entries: Gauge,
    /// Version of the allowlist snapshot in force.
    pub allowlist_version: Gauge,
    /// Allowlist reloads, by result (`ok`, `error`).
    pub allowlist_reloads: Family<Outcome, Counter>,
    /// Seconds to apply an allowlist change (swap plus closing revoked sessions).
    pub allowlist_apply_seconds: Histogram,
    /// Live sessions closed because their fingerprint left the allowlist.
    pub sessions_revoked: Counter,
    /// Commands run through this broker, by result.
    pub commands: Family<Outcome, Counter>,
    /// Bytes of UDP receive buffer the kernel granted.
    pub udp_recv_buffer_bytes: Gauge,
    /// Control mode: 1 while at least one cluster channel to control is up.
    pub control_connected: Gauge,
    /// Control mode: cluster channels up (one per control replica held).
    pub control_channels: Gauge,
    /// Control mode: allowlist versions received again on another channel and ignored.
    pub allowlist_duplicates: Counter,
    /// Control mode: 1 while the allowlist in force is not known to be control's latest
    /// (from start until the first `Synced`, and whenever the channel is down).
    pub allowlist_stale: Gauge,
    /// Control mode: Unix time the allowlist was last known to be in sync with control.
    pub allowlist_synced_timestamp_seconds: Gauge,
    /// Control mode: cluster channels that ended in error, by reason.
    pub control_channel_errors: Family<Reason, Counter>,
    /// Presence reports dropped because their queue was full, by kind (`heartbeat`,
    /// `session_event`).
    pub presence_dropped: Family<Kind, Counter>,
    /// Signed manifests re-sent by agents after a reconnect, by what became of them.
    pub manifest_backlog: Family<Kind, Counter>,
    /// Break-glass tunnel sessions, by event (`opened`, `refused`, `ended`).
    pub tunnels: Family<Kind, Counter>,
    /// Break-glass tunnel connections, by why they closed.
    pub tunnel_connections: Family<Kind, Counter>,
    /// Break-glass tunnel bytes relayed, by direction (`up` toward the target, `down`).
    pub tunnel_bytes: Family<Kind, Counter>,
    /// Control mode: `notAfter` of the broker's own certificate (Unix seconds).
    pub certificate_expiry_timestamp_seconds: Gauge,
    /// Control mode: renewals of the broker's own certificate, by result.
    pub certificate_renewals: Family<Outcome, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Count a completed handshake on `transport`.
    pub fn handshake_on(&self, transport: tether_transport::Transport) {
        self.handshakes_by_transport
            .get_or_create(&TransportLabel {
                transport: transport.as_str(),
            })
            .inc();
    }

    /// A session on `transport` began (`+1`) or ended (`-1`).
    pub fn session_on(&self, transport: tether_transport::Transport, delta: i64) {
        self.sessions_by_transport
            .get_or_create(&TransportLabel {
                transport: transport.as_str(),
            })
            .inc_by(delta);
    }

    /// Create and register every metric, by subsystem (the order of the exposition).
    pub fn new() -> Self {
        let m = Metrics {
            handshake_rejected: Family::default(),
            handshakes_accepted: Counter::default(),
            handshakes_by_transport: Family::default(),
            sessions_by_transport: Family::default(),
            incoming_tcp: Counter::default(),
            tcp_accept_paused: Counter::default(),
            handshake_failed: Family::default(),
            handshake_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            incoming_refused: Family::default(),
            incoming: Family::default(),
            incoming_pending: Gauge::default(),
            handshakes_in_flight: Gauge::default(),
            sessions: Gauge::default(),
            sessions_closed: Family::default(),
            protocol_errors: Family::default(),
            allowlist_entries: Gauge::default(),
            allowlist_version: Gauge::default(),
            allowlist_reloads: Family::default(),
            allowlist_apply_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            sessions_revoked: Counter::default(),
            commands: Family::default(),
            udp_recv_buffer_bytes: Gauge::default(),
            control_connected: Gauge::default(),
            control_channels: Gauge::default(),
            allowlist_duplicates: Counter::default(),
            allowlist_stale: Gauge::default(),
            allowlist_synced_timestamp_seconds: Gauge::default(),
            control_channel_errors: Family::default(),
            presence_dropped: Family::default(),
            manifest_backlog: Family::default(),
            tunnels: Family::default(),
            tunnel_connections: Family::default(),
            tunnel_bytes: Family::default(),
            certificate_expiry_timestamp_seconds: Gauge::default(),
            certificate_renewals: Family::default(),
            registry: Registry::default(),
        };
        let mut registry = Registry::with_prefix("tether");
        m.register_handshakes(&mut registry);
        m.register_sessions(&mut registry);
        m.register_allowlist(&mut registry);
        m.register_commands_and_socket(&mut registry);
        m.register_control_mode(&mut registry);
        Metrics { registry, ..m }
    }

    /// Register the handshakes, and the incoming connections before them.
    fn register_handshakes(&self, registry: &mut Registry) {
        registry.register(
            "handshake_rejected",
            "Client handshakes refused, by reason",
            self.handshake_rejected.clone(),
        );
        registry.register(
            "transport_handshakes",
            "Handshakes that completed, by transport (quic, tcp)",
            self.handshakes_by_transport.clone(),
        );
        registry.register(
            "incoming_tcp",
            "Incoming TCP connections, before admission and TLS",
            self.incoming_tcp.clone(),
        );
        registry.register(
            "tcp_accept_paused",
            "Times the TCP accept loop waited for room in the full handshake queue (connections wait in the listen backlog, none refused)",
            self.tcp_accept_paused.clone(),
        );
        registry.register(
            "handshakes_accepted",
            "Handshakes that produced a verified appliance",
            self.handshakes_accepted.clone(),
        );
        registry.register(
            "handshake_failed",
            "Handshakes that failed for transport reasons, by kind",
            self.handshake_failed.clone(),
        );
        registry.register(
            "handshake_seconds",
            "Seconds from incoming packet to verified connection",
            self.handshake_seconds.clone(),
        );
        registry.register(
            "incoming_refused",
            "Incoming connections refused before TLS, by reason",
            self.incoming_refused.clone(),
        );
        registry.register(
            "incoming",
            "Incoming connections, by the QUIC endpoint that received them",
            self.incoming.clone(),
        );
        registry.register(
            "incoming_pending",
            "Incoming connections waiting for a handshake slot",
            self.incoming_pending.clone(),
        );
        registry.register(
            "handshakes_in_flight",
            "Handshakes in progress",
            self.handshakes_in_flight.clone(),
        );
    }

    /// Register the sessions and the protocol violations.
    fn register_sessions(&self, registry: &mut Registry) {
        registry.register("sessions", "Established sessions", self.sessions.clone());
        registry.register(
            "transport_sessions",
            "Established sessions, by transport (quic, tcp)",
            self.sessions_by_transport.clone(),
        );
        registry.register(
            "sessions_closed",
            "Sessions closed, by close code",
            self.sessions_closed.clone(),
        );
        registry.register(
            "protocol_errors",
            "Protocol violations by peers, by kind",
            self.protocol_errors.clone(),
        );
    }

    /// Register the allowlist in force, its changes and the sessions they close.
    fn register_allowlist(&self, registry: &mut Registry) {
        registry.register(
            "allowlist_entries",
            "Fingerprints in the allowlist in force",
            self.allowlist_entries.clone(),
        );
        registry.register(
            "allowlist_version",
            "Version of the allowlist in force",
            self.allowlist_version.clone(),
        );
        registry.register(
            "allowlist_reloads",
            "Allowlist reloads, by result",
            self.allowlist_reloads.clone(),
        );
        registry.register(
            "allowlist_apply_seconds",
            "Seconds to apply an allowlist change, including closing revoked sessions",
            self.allowlist_apply_seconds.clone(),
        );
        registry.register(
            "sessions_revoked",
            "Live sessions closed because their fingerprint left the allowlist",
            self.sessions_revoked.clone(),
        );
    }

    /// Register the commands and the UDP socket.
    fn register_commands_and_socket(&self, registry: &mut Registry) {
        registry.register(
            "commands",
            "Commands run through this broker, by result",
            self.commands.clone(),
        );
        registry.register(
            "udp_recv_buffer_bytes",
            "UDP receive buffer granted by the kernel",
            self.udp_recv_buffer_bytes.clone(),
        );
    }

    /// Register control mode's: the cluster channel, presence reports and the broker's own
    /// certificate.
    fn register_control_mode(&self, registry: &mut Registry) {
        registry.register(
            "broker_control_connected",
            "1 while at least one cluster channel to control is up",
            self.control_connected.clone(),
        );
        registry.register(
            "broker_control_channels",
            "Cluster channels up, one per control replica held",
            self.control_channels.clone(),
        );
        registry.register(
            "broker_allowlist_duplicates",
            "Allowlist versions received again on another channel (same digest) and ignored",
            self.allowlist_duplicates.clone(),
        );
        registry.register(
            "broker_allowlist_stale",
            "1 while the allowlist in force is not known to be in sync with control",
            self.allowlist_stale.clone(),
        );
        registry.register(
            "broker_allowlist_synced_timestamp_seconds",
            "Unix time the allowlist was last in sync with control",
            self.allowlist_synced_timestamp_seconds.clone(),
        );
        registry.register(
            "broker_control_channel_errors",
            "Cluster channels to control that ended in error, by reason",
            self.control_channel_errors.clone(),
        );
        registry.register(
            "broker_presence_dropped",
            "Presence reports dropped because their queue was full, by kind",
            self.presence_dropped.clone(),
        );
        registry.register(
            "broker_tunnels",
            "Break-glass tunnel sessions, by event (opened, refused, ended)",
            self.tunnels.clone(),
        );
        registry.register(
            "broker_tunnel_connections",
            "Break-glass tunnel connections, by why they closed",
            self.tunnel_connections.clone(),
        );
        registry.register(
            "broker_tunnel_bytes",
            "Break-glass tunnel bytes relayed, by direction (up toward the target, down)",
            self.tunnel_bytes.clone(),
        );
        registry.register(
            "broker_manifest_backlog",
            "Signed manifests agents re-sent after a reconnect, by outcome (passed_on, queue_full, invalid)",
            self.manifest_backlog.clone(),
        );
        registry.register(
            "broker_certificate_expiry_timestamp_seconds",
            "notAfter of the broker's own certificate (Unix seconds)",
            self.certificate_expiry_timestamp_seconds.clone(),
        );
        registry.register(
            "broker_certificate_renewals",
            "Renewals of the broker's own certificate, by result",
            self.certificate_renewals.clone(),
        );
    }

    /// Count a refused handshake.
    pub fn reject(&self, reason: &'static str) {
        self.handshake_rejected
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// Count a protocol violation.
    pub fn protocol_error(&self, kind: &'static str) {
        self.protocol_errors.get_or_create(&Kind { kind }).inc();
    }

    /// Count a dropped presence report.
    pub fn presence_dropped(&self, kind: &'static str) {
        self.presence_dropped.get_or_create(&Kind { kind }).inc();
    }

    /// Count a tunnel session event.
    pub fn tunnel(&self, kind: &'static str) {
        self.tunnels.get_or_create(&Kind { kind }).inc();
    }

    /// Count a tunnel connection by why it closed (an agent's reason, `finished`, or
    /// `other`).
    pub fn tunnel_connection(&self, reason: &str) {
        let kind = tether_proto::TunnelCloseReason::ALL
            .iter()
            .map(|r| r.as_str())
            .chain(["finished", "ended"])
            .find(|k| *k == reason)
            .unwrap_or("other");
        self.tunnel_connections.get_or_create(&Kind { kind }).inc();
    }

    /// Count tunnel bytes relayed (`up`: toward the target; `down`: back).
    pub fn tunnel_bytes(&self, kind: &'static str, n: u64) {
        self.tunnel_bytes.get_or_create(&Kind { kind }).inc_by(n);
    }

    /// Count a backlog manifest by what became of it.
    pub fn manifest_backlog(&self, kind: &'static str) {
        self.manifest_backlog.get_or_create(&Kind { kind }).inc();
    }

    /// Count a cluster channel that ended in error.
    pub fn channel_error(&self, reason: &'static str) {
        self.control_channel_errors
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// Render the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
