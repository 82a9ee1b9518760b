//! The domain: what control decides, with no HTTP in it.
//!
//! Every rule about identities lives here, once: the CA and what it will sign, the trust
//! states, enrollment and renewal, operators and their roles, appliances, brokers and the
//! audit log's checkpoints. The HTTP layer and the command line
//! (`main.rs`) both call these operations; neither repeats a check.
//!
//! # Design
//!
//! - An operation takes a [`Context`] (the store, the CA, the proof verifiers, the
//!   [`Settings`] and the [`Fleet`]) or, when it needs no CA, a [`Registry`] (the same
//!   without CA and proofs), its input, and `now` (Unix seconds) as an argument.
//! - It answers a value or an [`Error`]: a [`ErrorKind`] (whose fault, and whether
//!   retrying can help), a stable `code` and a short message. The HTTP layer maps the kind
//!   to a status; the codes and messages are what clients see.
//! - A refusal is recorded in the audit log here ([`refuse`]); success entries are written
//!   by the store in the same transaction as the change they record.
//! - What only the cluster knows (where an appliance is connected, the brokers' own
//!   addresses) or can do (tell brokers) comes through the [`Fleet`] trait, which
//!   the cluster layer's `Cluster` implements: the domain never imports the cluster.
//!
//! # Modules
//!
//! - [`ca`] — root and intermediate CA (local key files; AWS KMS), issuing appliance,
//!   broker, operator and control certificates from CSRs ([`ca::csr`]). Control never
//!   copies names from a CSR.
//! - [`token`] — one-time tokens and nonces (only hashes are stored).
//! - [`proof`] — AWS, GCP and Kubernetes platform proofs.
//! - [`identity`] — which identity a verified client certificate names.
//! - [`trust`] — trust states and the fleet summary.
//! - [`enroll`] — enrollment: challenge, proof, issuance, recording.
//! - [`renew`] — renewal with the current certificate, and the overlap expiry.
//! - [`operators`] — roles, invites (bundles), login, and [`operators::authorize`], the
//!   check every operator operation runs.
//! - [`console`] — the web console's sign-in: single-use login links, sessions.
//! - [`appliances`] — register, list, show, disable/enable/revoke, manual renewal, tokens.
//! - [`brokers`] — broker bundles, enrollment, renewal, revocation, and the addresses
//!   handed to appliances.
//! - [`replica`] — the replica's id, the check that the database is this CA's, the
//!   registry heartbeat.
//! - [`store_copy`] — `store copy`: a SQLite store into PostgreSQL, verified.
//! - [`exec`] — the checks before a command is routed to an appliance.
//! - [`audit`] — signing checkpoints of the audit log and exporting it; the format, chain
//!   and verifier are the `tether-audit` crate's.

use std::sync::Arc;

use tether_api::appliances::Presence;
use tether_audit::{AuditEvent, Outcome};
use tether_proto::cluster::ToBroker;
use tracing::{error, warn};

use crate::store::Store;

pub mod appliances;
pub mod audit;
pub mod brokers;
pub mod ca;
pub mod console;
pub mod enroll;
pub mod exec;
pub mod identity;
pub mod operators;
pub mod proof;
pub mod renew;
pub mod replica;
pub mod store_copy;
pub mod token;
pub mod trust;
pub mod tunnel;

/// What kind of failure an [`Error`] is: whose fault, and whether retrying can help. The
/// HTTP layer answers each with one status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller's input is malformed or out of range (400); retrying it cannot help.
    BadRequest,
    /// No credentials where they are needed (401).
    Unauthenticated,
    /// Credentials or a proof that do not allow this (403).
    Forbidden,
    /// No such appliance, operator or broker (404).
    NotFound,
    /// The request conflicts with the current state (409); it may succeed after a change.
    Conflict,
    /// The input is larger than control accepts (413).
    TooLarge,
    /// An upstream identity service (STS, JWKS) failed (502); retrying may help.
    Upstream,
    /// Control failed (500); details are in the log, retrying may help.
    Internal,
    /// This replica cannot serve the request now but another one, or this one a moment
    /// later, may (503 with `Retry-After`): `no_channel`, or the database cannot be
    /// reached or written (a restart, a failover, a partition).
    Unavailable,
}

impl ErrorKind {
    /// Whether the failure is control's (or its upstream's) rather than the caller's: it
    /// is audited as `failed`, not `refused`.
    pub fn is_server_fault(self) -> bool {
        matches!(
            self,
            ErrorKind::Internal | ErrorKind::Upstream | ErrorKind::Unavailable
        )
    }
}

/// A refused or failed operation: a kind, a stable code, a short message for the caller
/// (no secrets). Details stay in the log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    /// Whose fault, and whether retrying can help.
    pub kind: ErrorKind,
    /// Stable machine-readable code, e.g. `token_expired`.
    pub code: &'static str,
    /// Human-readable reason.
    pub message: String,
}

impl Error {
    /// A new error.
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Error {
        Error {
            kind,
            code,
            message: message.into(),
        }
    }

    /// How the audit log records this error.
    pub fn outcome(&self) -> Outcome {
        if self.kind.is_server_fault() {
            Outcome::Failed
        } else {
            Outcome::Refused
        }
    }
}

/// The code of [`ErrorKind::Unavailable`] answers.
pub const DATABASE_UNAVAILABLE: &str = "database_unavailable";

/// Log `e` and answer the caller only that control failed — or, when `e` is a
/// [`StoreError::Unavailable`](crate::store::StoreError::Unavailable) (wherever an
/// operation meets it), that the database is unavailable for now (503
/// [`DATABASE_UNAVAILABLE`]): a restart or a failover is not a bug, and the caller
/// should retry.
pub(crate) fn internal<E: std::fmt::Display + 'static>(e: E) -> Error {
    let any: &dyn std::any::Any = &e;
    if let Some(crate::store::StoreError::Unavailable(_)) =
        any.downcast_ref::<crate::store::StoreError>()
    {
        warn!(error = %e, "database unavailable");
        return Error::new(
            ErrorKind::Unavailable,
            DATABASE_UNAVAILABLE,
            "the database is unavailable; retry shortly",
        );
    }
    warn!(error = %e, "internal error");
    Error::new(ErrorKind::Internal, "internal", "internal error")
}

/// A setting that cannot be used: the field (as `control.toml` names it) and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct InvalidSetting {
    /// The field.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

/// The settings the domain's operations read (composed from `control.toml` by
/// the configuration).
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Enrollment, tokens and renewal overlap.
    pub enroll: enroll::EnrollSettings,
    /// Trust-state thresholds.
    pub trust: trust::TrustSettings,
    /// Broker addresses handed to enrolled appliances when set (`host:port`); otherwise
    /// the brokers' own addresses.
    pub brokers: Vec<String>,
    /// Control's URL as bundles carry it.
    pub control_url: String,
}

/// What the domain asks of the brokers' cluster. The cluster layer's `Cluster` implements
/// it; an operation run without a cluster (the command line) uses [`NoFleet`].
pub trait Fleet: Send + Sync + std::fmt::Debug {
    /// Where appliance `id` is connected, if anywhere.
    fn presence(&self, id: &str) -> Option<Presence>;
    /// The QUIC addresses of the brokers whose channel is up.
    fn quic_addrs(&self) -> Vec<String>;
    /// The brokers whose channel is up.
    fn links(&self) -> Vec<brokers::LinkInfo>;
    /// Send `msg` to every connected broker.
    fn broadcast(&self, msg: ToBroker);
    /// Close broker `name`'s channel, if it has one.
    fn disconnect(&self, name: &str);
    /// Ask broker `name` to drain as on SIGTERM, on its channel to this replica.
    fn drain(&self, _name: &str) -> Result<(), brokers::DrainRefusal> {
        Err(brokers::DrainRefusal::NotConnected)
    }
    /// The live control replicas were read from the registry (`self_id` is this one);
    /// brokers that hold a channel to each are told when the set changed.
    fn replicas_live(&self, _self_id: &str, _replicas: Vec<tether_proto::cluster::ReplicaAddr>) {}
    /// Appliance `id` changed in a way its sessions do not show (its status, a renewal
    /// requested): open console pages on this process follow it.
    fn appliance_changed(&self, _id: &str) {}
}

/// No cluster: nothing is connected, nothing is told.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFleet;

impl Fleet for NoFleet {
    fn presence(&self, _: &str) -> Option<Presence> {
        None
    }
    fn quic_addrs(&self) -> Vec<String> {
        Vec::new()
    }
    fn links(&self) -> Vec<brokers::LinkInfo> {
        Vec::new()
    }
    fn broadcast(&self, _: ToBroker) {}
    fn disconnect(&self, _: &str) {}
}

/// What the operations on records need (appliances, tokens, invites, brokers): no CA, so
/// the command line runs them without loading the CA's key.
#[derive(Clone, Debug)]
pub struct Registry {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The settings.
    pub settings: Arc<Settings>,
    /// The brokers' cluster.
    pub fleet: Arc<dyn Fleet>,
}

/// What every operation needs: a [`Registry`] plus the CA and the proof verifiers.
#[derive(Clone, Debug)]
pub struct Context {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The CA.
    pub ca: Arc<ca::Ca>,
    /// Platform proof verifiers.
    pub proofs: Arc<proof::Verifiers>,
    /// The settings.
    pub settings: Arc<Settings>,
    /// The brokers' cluster.
    pub fleet: Arc<dyn Fleet>,
}

impl Context {
    /// The records part of this context.
    pub fn registry(&self) -> Registry {
        Registry {
            store: self.store.clone(),
            settings: self.settings.clone(),
            fleet: self.fleet.clone(),
        }
    }
}

/// Unix seconds as RFC 3339 (UTC).
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Append a refusal's entry; if that fails, say so at error and carry on (the caller
/// still answers the refusal).
pub async fn record_refusal(store: &dyn Store, event: &AuditEvent, now: i64) {
    if let Err(e) = store.append_audit(event, now).await {
        error!(
            error = %e,
            action = %event.action,
            target = %event.target,
            code = ?event.details.get("code"),
            "cannot write the refusal to the audit log"
        );
    }
}

/// Record `event` as refused with `e`'s code (failed for a server fault) and return `e`.
pub async fn refuse(store: &dyn Store, event: AuditEvent, e: Error, now: i64) -> Error {
    let event = event.with_outcome(e.outcome()).with("code", e.code);
    record_refusal(store, &event, now).await;
    e
}
