//! The entry format: who ([`Actor`]) did what (`action`, e.g. `appliance.enroll`) to what
//! (`target`, e.g. an appliance id), how it ended ([`Outcome`]) and a few `details`
//! (codes, fingerprints, serials, proof kinds, allowlist versions; never a token, a JWT,
//! a key, a CSR or a proof).
//!
//! An [`AuditEvent`] is what to record; the log keeper gives it its place and it becomes
//! an [`AuditEntry`]: `seq` = 1, 2, 3, … with no gap, `at`, the previous entry's hash
//! (`prev_hash`) and its own `hash` ([`crate::hash`]). [`AuditEvent::validate`] checks the
//! limits every keeper enforces ([`MAX_ACTOR_LEN`], [`MAX_ACTION_LEN`],
//! [`MAX_TARGET_LEN`], [`MAX_DETAILS_LEN`]) and gives `details` in canonical JSON, the
//! text a keeper stores and hashes.
//!
//! Control's store writes an operation's entry in the same transaction as the change it
//! records, so the change and its entry commit or roll back together; a refusal, which
//! changes nothing, is one standalone entry. `at` is the writing control replica's
//! clock: entries are in commit order, and `at` may step back by the clock skew between
//! replicas.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

#[cfg(doc)]
use crate::hash::GENESIS_HASH;
use crate::hash::{canonical_json, hash_parts};

/// Longest actor name, in bytes.
pub const MAX_ACTOR_LEN: usize = 256;
/// Longest action, in bytes.
pub const MAX_ACTION_LEN: usize = 64;
/// Longest target, in bytes.
pub const MAX_TARGET_LEN: usize = 256;
/// Longest `details`, in bytes of canonical JSON.
pub const MAX_DETAILS_LEN: usize = 4096;

/// The actions control records. An action is `<object>.<verb>`.
pub mod action {
    /// A control data directory was initialised.
    pub const CONTROL_INIT: &str = "control.init";
    /// An appliance was registered.
    pub const APPLIANCE_REGISTER: &str = "appliance.register";
    /// An appliance enrolled (or was refused).
    pub const APPLIANCE_ENROLL: &str = "appliance.enroll";
    /// An appliance renewed its certificate (or was refused).
    pub const APPLIANCE_RENEW: &str = "appliance.renew";
    /// An appliance was disabled.
    pub const APPLIANCE_DISABLE: &str = "appliance.disable";
    /// An appliance was enabled.
    pub const APPLIANCE_ENABLE: &str = "appliance.enable";
    /// An appliance was revoked.
    pub const APPLIANCE_REVOKE: &str = "appliance.revoke";
    /// An appliance was asked to renew now (manual renewal generation bumped).
    pub const APPLIANCE_REQUEST_RENEWAL: &str = "appliance.request_renewal";
    /// An enrollment token was created.
    pub const TOKEN_CREATE: &str = "token.create";
    /// An enrollment token was redeemed.
    pub const TOKEN_REDEEM: &str = "token.redeem";
    /// Previous certificates whose renewal overlap ended left the allowlist.
    pub const ALLOWLIST_EXPIRE_OVERLAPS: &str = "allowlist.expire_overlaps";
    /// The audit log was read over the API (recorded only when refused).
    pub const AUDIT_LIST: &str = "audit.list";
    /// Appliances were listed over the API (recorded only when refused).
    pub const APPLIANCE_LIST: &str = "appliance.list";
    /// One appliance was shown over the API (recorded only when refused).
    pub const APPLIANCE_SHOW: &str = "appliance.show";
    /// A command was sent to an appliance (and, a second entry, how it ended).
    pub const APPLIANCE_EXEC: &str = "appliance.exec";
    /// An appliance's signed manifest of a command, re-sent after a reconnect.
    pub const APPLIANCE_EXEC_MANIFEST: &str = "appliance.exec.manifest";
    /// A break-glass tunnel was planned, opened or refused (`details.plan`, the approval's
    /// hash, the appliance's answer).
    pub const APPLIANCE_TUNNEL_OPEN: &str = "appliance.tunnel.open";
    /// A tunnel session's sealed credential was handed to its operator (once).
    pub const APPLIANCE_TUNNEL_CREDENTIAL: &str = "appliance.tunnel.credential";
    /// Tunnel sessions were listed or shown (recorded only when refused).
    pub const APPLIANCE_TUNNEL_LIST: &str = "appliance.tunnel.list";
    /// A connection through a tunnel session was asked for (recorded only when refused:
    /// connections are counted, and the session's end entry sums them).
    pub const APPLIANCE_TUNNEL_CONNECT: &str = "appliance.tunnel.connect";
    /// A tunnel session's broker lost its session-control stream: the appliance keeps it
    /// through its disconnection grace (connections still route through any broker).
    pub const APPLIANCE_TUNNEL_DETACHED: &str = "appliance.tunnel.detached";
    /// The vendor closed a tunnel session.
    pub const APPLIANCE_TUNNEL_CLOSE: &str = "appliance.tunnel.close";
    /// A tunnel session ended (its reason, connections and bytes; the appliance's session
    /// manifest when it sent one).
    pub const APPLIANCE_TUNNEL_ENDED: &str = "appliance.tunnel.ended";
    /// A broker was added (a one-time bundle made).
    pub const BROKER_ADD: &str = "broker.add";
    /// A broker enrolled with its bundle (or was refused).
    pub const BROKER_ENROLL: &str = "broker.enroll";
    /// A broker renewed its certificate (or was refused).
    pub const BROKER_RENEW: &str = "broker.renew";
    /// A broker was revoked.
    pub const BROKER_REVOKE: &str = "broker.revoke";
    /// A broker was asked to drain (`tether broker drain NAME`), or the request was refused.
    pub const BROKER_DRAIN: &str = "broker.drain";
    /// Brokers were listed over the API (recorded only when refused).
    pub const BROKER_LIST: &str = "broker.list";
    /// Control replicas were listed over the API (recorded only when refused).
    pub const CONTROL_REPLICAS: &str = "control.replicas";
    /// Entries of the audit log were archived to a segment file and left the live log
    /// (`details`: `first`, `last`, `hash` of the last; `target`: the file's name).
    pub const AUDIT_ARCHIVE: &str = "audit.archive";
}

/// Actor names for [`ActorKind::System`].
pub mod system {
    /// The `tether-control` command line run on the data directory.
    pub const LOCAL_ADMIN: &str = "local-admin";
    /// Control itself (periodic work).
    pub const CONTROL: &str = "control";
    /// A caller that could not be identified.
    pub const UNKNOWN: &str = "unknown";
}

/// What kind of party acted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// A human operator (name from the operator certificate).
    Operator,
    /// An appliance (its id).
    Appliance,
    /// A broker (its name).
    Broker,
    /// Control itself or its local command line (see [`system`]).
    System,
}

impl ActorKind {
    /// The name used in the store and the hash.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Operator => "operator",
            ActorKind::Appliance => "appliance",
            ActorKind::Broker => "broker",
            ActorKind::System => "system",
        }
    }

    /// The kind named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "operator" => ActorKind::Operator,
            "appliance" => ActorKind::Appliance,
            "broker" => ActorKind::Broker,
            "system" => ActorKind::System,
            _ => return None,
        })
    }
}

/// Who acted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Actor {
    /// Kind.
    pub kind: ActorKind,
    /// Name: operator name, appliance id, broker name, or one of [`system`].
    pub name: String,
}

impl Actor {
    /// An actor.
    pub fn new(kind: ActorKind, name: impl Into<String>) -> Self {
        Actor {
            kind,
            name: name.into(),
        }
    }

    /// An operator.
    pub fn operator(name: impl Into<String>) -> Self {
        Self::new(ActorKind::Operator, name)
    }

    /// An appliance.
    pub fn appliance(id: impl Into<String>) -> Self {
        Self::new(ActorKind::Appliance, id)
    }

    /// A broker.
    pub fn broker(name: impl Into<String>) -> Self {
        Self::new(ActorKind::Broker, name)
    }

    /// Control itself, or its command line (see [`system`]).
    pub fn system(name: impl Into<String>) -> Self {
        Self::new(ActorKind::System, name)
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.as_str(), self.name)
    }
}

/// How an action ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done.
    Success,
    /// Refused: the caller was not entitled or its input was bad (`details.code` says why).
    Refused,
    /// Not done because control failed (a database or upstream error).
    Failed,
}

impl Outcome {
    /// The name used in the store and the hash.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }

    /// The outcome named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "success" => Outcome::Success,
            "refused" => Outcome::Refused,
            "failed" => Outcome::Failed,
            _ => return None,
        })
    }
}

/// What to record: an entry without its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    /// Who.
    pub actor: Actor,
    /// What, e.g. [`action::APPLIANCE_ENROLL`].
    pub action: String,
    /// To what (an appliance id; empty when nothing in particular).
    pub target: String,
    /// How it ended.
    pub outcome: Outcome,
    /// A JSON object of small facts. Never secrets: no tokens, JWTs, keys, CSRs, proofs.
    pub details: Value,
}

impl AuditEvent {
    /// An event with empty details.
    pub fn new(
        actor: Actor,
        action: &str,
        target: impl Into<String>,
        outcome: Outcome,
    ) -> AuditEvent {
        AuditEvent {
            actor,
            action: action.to_owned(),
            target: target.into(),
            outcome,
            details: Value::Object(Default::default()),
        }
    }

    /// A successful action.
    pub fn success(actor: Actor, action: &str, target: impl Into<String>) -> AuditEvent {
        Self::new(actor, action, target, Outcome::Success)
    }

    /// A refusal with its stable `code` in `details.code`.
    pub fn refused(
        actor: Actor,
        action: &str,
        target: impl Into<String>,
        code: &str,
    ) -> AuditEvent {
        Self::new(actor, action, target, Outcome::Refused).with("code", code)
    }

    /// The same event with `details[key] = value` (details made an object if it is not).
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> AuditEvent {
        self.set(key, value);
        self
    }

    /// Set `details[key] = value` (details made an object if it is not).
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        if !self.details.is_object() {
            self.details = Value::Object(Default::default());
        }
        if let Value::Object(map) = &mut self.details {
            map.insert(key.to_owned(), value.into());
        }
    }

    /// The same event with another outcome.
    #[must_use]
    pub fn with_outcome(mut self, outcome: Outcome) -> AuditEvent {
        self.outcome = outcome;
        self
    }

    /// Check the limits the store enforces and return `details` in canonical JSON.
    pub fn validate(&self) -> Result<String, EventError> {
        let too_long = |field: &'static str, len: usize, max: usize| {
            if len > max {
                Err(EventError::TooLong { field, len, max })
            } else {
                Ok(())
            }
        };
        too_long("actor", self.actor.name.len(), MAX_ACTOR_LEN)?;
        too_long("action", self.action.len(), MAX_ACTION_LEN)?;
        too_long("target", self.target.len(), MAX_TARGET_LEN)?;
        if !self.details.is_object() {
            return Err(EventError::DetailsNotObject);
        }
        let details = canonical_json(&self.details)?;
        too_long("details", details.len(), MAX_DETAILS_LEN)?;
        Ok(details)
    }
}

/// One recorded entry of the audit log. Serialized (e.g. by `tether-control audit list`)
/// as `{"seq", "at", "actor": {"kind", "name"}, "action", "target", "outcome", "details",
/// "prev_hash", "hash"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// Position in the log: 1, 2, 3, … with no gap.
    pub seq: i64,
    /// When it was written, Unix seconds.
    pub at: i64,
    /// Who.
    pub actor: Actor,
    /// What.
    pub action: String,
    /// To what.
    pub target: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Small facts (a JSON object).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub details: Value,
    /// The previous entry's `hash` ([`GENESIS_HASH`] for `seq` 1).
    pub prev_hash: String,
    /// SHA-256 of this entry (see the module docs), lowercase hex.
    pub hash: String,
}

impl AuditEntry {
    /// The event this entry records.
    pub fn event(&self) -> AuditEvent {
        AuditEvent {
            actor: self.actor.clone(),
            action: self.action.clone(),
            target: self.target.clone(),
            outcome: self.outcome,
            details: self.details.clone(),
        }
    }

    /// The hash this entry's contents give (compare with [`AuditEntry::hash`]).
    pub fn computed_hash(&self) -> Result<String, EventError> {
        let details = canonical_json(&self.details)?;
        Ok(hash_parts(
            self.seq,
            self.at,
            &self.actor,
            &self.action,
            &self.target,
            self.outcome,
            &details,
            &self.prev_hash,
        ))
    }
}

/// Why an event cannot be recorded (or an entry cannot be hashed).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EventError {
    /// A field is longer than its limit.
    #[error("audit {field} is {len} bytes; at most {max} are recorded")]
    TooLong {
        /// `actor`, `action`, `target` or `details`.
        field: &'static str,
        /// Its length, bytes.
        len: usize,
        /// The limit, bytes.
        max: usize,
    },
    /// `details` is not a JSON object.
    #[error("audit details must be a JSON object")]
    DetailsNotObject,
    /// `details` holds a number with no canonical form here.
    #[error("audit details hold the number {0}; only integers within ±(2^53 - 1) are recorded")]
    Number(String),
}

/// At most the first `max` bytes of `s`, cut at a character boundary: for strings a peer
/// chose (an invalid appliance id) that go into an entry.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// How an enrollment token appears in the log: the first 16 hex digits of its SHA-256
/// (the hash the store keeps). Enough to match a redemption to its creation; useless to
/// enroll with, and not the key the store looks tokens up by.
pub fn token_ref(token_hash: &str) -> &str {
    clip(token_hash, 16)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn limits_and_clipping() {
        let long = "x".repeat(MAX_TARGET_LEN + 1);
        let e = AuditEvent::success(Actor::system(system::LOCAL_ADMIN), "a.b", long);
        assert_eq!(
            e.validate(),
            Err(EventError::TooLong {
                field: "target",
                len: MAX_TARGET_LEN + 1,
                max: MAX_TARGET_LEN
            })
        );
        let mut e = AuditEvent::success(Actor::system(system::LOCAL_ADMIN), "a.b", "t");
        e.details = json!([1]);
        assert_eq!(e.validate(), Err(EventError::DetailsNotObject));
        let e = AuditEvent::success(Actor::system(system::LOCAL_ADMIN), "a.b", "t")
            .with("blob", "y".repeat(MAX_DETAILS_LEN));
        assert!(matches!(
            e.validate(),
            Err(EventError::TooLong {
                field: "details",
                ..
            })
        ));
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("héllo", 3), "hé");
        assert_eq!(clip("ab", 5), "ab");
        assert_eq!(token_ref(&"ab".repeat(32)), "abababababababab");
    }
}
