//! The audit log: an append-only, hash-chained record of every trust change and refusal.
//!
//! Each [`AuditEntry`] says who ([`Actor`]) did what (`action`, e.g. `appliance.enroll`) to
//! what (`target`, e.g. an appliance id), how it ended ([`Outcome`]) and a few `details`
//! (codes, fingerprints, serials, proof kinds, allowlist versions; never a token, a JWT,
//! a key, a CSR or a proof). The store writes an operation's entry in the same
//! transaction as the change it records (see [`crate::store::Store`]), so the change and
//! its entry commit or roll back together; a refusal, which changes nothing, is one
//! standalone entry ([`crate::store::Store::append_audit`]).
//!
//! Entries are numbered `seq` = 1, 2, 3, … with no gap, and each carries the SHA-256 of
//! the one before (`prev_hash`), so [`verify_chain`] finds an edited, removed or
//! reordered entry.
//!
//! # The hash of an entry (format `tether-audit-v1`)
//!
//! `hash` is the lowercase hex SHA-256 of these fields, concatenated with nothing in
//! between:
//!
//! | # | field | encoding |
//! |---|-------|----------|
//! | 1 | the text `tether-audit-v1` | `str` |
//! | 2 | `seq` | `int` |
//! | 3 | `at` (Unix seconds) | `int` |
//! | 4 | actor kind: `operator`, `appliance`, `broker` or `system` | `str` |
//! | 5 | actor name | `str` |
//! | 6 | `action` | `str` |
//! | 7 | `target` | `str` |
//! | 8 | outcome: `success`, `refused` or `failed` | `str` |
//! | 9 | `details` in canonical JSON (below) | `str` |
//! | 10 | `prev_hash`: the previous entry's `hash`, 64 lowercase hex characters; for `seq` 1, 64 `0`s ([`GENESIS_HASH`]) | `str` |
//!
//! - `int(n)`: the 8 bytes of `n` as a signed 64-bit integer, big-endian, two's
//!   complement.
//! - `str(s)`: the length of `s` in UTF-8 bytes as 4 bytes, big-endian unsigned, then those
//!   bytes.
//!
//! Every field has a fixed width or a length prefix, so two different entries never
//! encode to the same bytes.
//!
//! **Canonical JSON** is RFC 8785 (JCS) restricted to what `details` may hold: objects,
//! arrays, strings, `true`, `false`, `null` and integers within ±(2⁵³ − 1). No whitespace;
//! object members sorted by their names compared as UTF-16 code units; strings escape `"`
//! and `\` with a backslash, U+0008, U+0009, U+000A, U+000C, U+000D as `\b`, `\t`, `\n`,
//! `\f`, `\r`, the other characters below U+0020 as `\u00xx` (lowercase hex), and write
//! everything else as is (UTF-8); integers in decimal, with `-` when negative. Any JCS
//! implementation gives the same text for such a value (a number with a fraction or
//! outside that range has no canonical form here and is refused). The exported
//! `details` object may be written in any key order or spacing: verifiers re-canonicalize
//! it.
//!
//! # What the chain proves, and what it does not
//!
//! [`verify_chain`] (or a [`ChainVerifier`] fed page by page) reports the first entry
//! that does not fit: an edited entry (its hash no longer matches), an entry removed
//! from the middle or entries reordered (`seq` not consecutive), an entry replaced with
//! its hash recomputed (the next entry's `prev_hash` no longer matches), a first entry
//! `seq` 1 whose `prev_hash` is not all zeros.
//!
//! The chain alone cannot show that entries are **missing at the end**: a log cut after
//! entry `n` is a valid chain of `n` entries. Nor can it resist someone who can write the
//! table and recompute every hash from the first changed entry onwards. Both need an
//! anchor held outside the database, a checkpoint (`seq` and `hash` of a recent entry,
//! published or signed): [`ChainVerifier::after`] resumes from one, and a log whose head
//! is older than the last checkpoint was cut. Control signs such checkpoints with its own
//! certificate ([`checkpoint`]: the signed string, the signer rules, `serve` writing one
//! every `[audit] checkpoint_every`), exports the log with them ([`export`]: the JSON
//! lines format), and `tether audit verify` checks an export offline against a root the
//! operator holds; [`export`] says exactly what that detects and what it cannot (entries
//! after the last checkpoint). Inside the database, triggers refusing `UPDATE`, `DELETE`
//! and `TRUNCATE` on `audit_log` and `audit_checkpoints` are a first guard.
//!
//! `at` is the writing control replica's clock: entries are in commit order, and `at`
//! may step back by the clock skew between replicas.

pub mod checkpoint;
pub mod export;
pub mod http;

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// `prev_hash` of the first entry: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The first field of every hashed entry (the format version).
pub const HASH_FORMAT: &str = "tether-audit-v1";

/// Longest actor name, in bytes.
pub const MAX_ACTOR_LEN: usize = 256;
/// Longest action, in bytes.
pub const MAX_ACTION_LEN: usize = 64;
/// Longest target, in bytes.
pub const MAX_TARGET_LEN: usize = 256;
/// Longest `details`, in bytes of canonical JSON.
pub const MAX_DETAILS_LEN: usize = 4096;
/// Largest integer canonical JSON holds (2⁵³ − 1); its negation is the smallest.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

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
    /// A broker was added (a one-time bundle made).
    pub const BROKER_ADD: &str = "broker.add";
    /// A broker enrolled with its bundle (or was refused).
    pub const BROKER_ENROLL: &str = "broker.enroll";
    /// A broker renewed its certificate (or was refused).
    pub const BROKER_RENEW: &str = "broker.renew";
    /// A broker was revoked.
    pub const BROKER_REVOKE: &str = "broker.revoke";
    /// Brokers were listed over the API (recorded only when refused).
    pub const BROKER_LIST: &str = "broker.list";
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    #[schema(value_type = Object)]
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

/// The hash of an entry with these contents: lowercase hex SHA-256 of the encoding in the
/// module docs.
pub fn entry_hash(
    seq: i64,
    at: i64,
    event: &AuditEvent,
    prev_hash: &str,
) -> Result<String, EventError> {
    let details = canonical_json(&event.details)?;
    Ok(hash_parts(
        seq,
        at,
        &event.actor,
        &event.action,
        &event.target,
        event.outcome,
        &details,
        prev_hash,
    ))
}

/// The hash, given `details` already in canonical JSON (the store keeps that text).
#[allow(clippy::too_many_arguments)]
pub(crate) fn hash_parts(
    seq: i64,
    at: i64,
    actor: &Actor,
    action: &str,
    target: &str,
    outcome: Outcome,
    details_json: &str,
    prev_hash: &str,
) -> String {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    put_str(&mut h, HASH_FORMAT);
    h.update(&seq.to_be_bytes());
    h.update(&at.to_be_bytes());
    for field in [
        actor.kind.as_str(),
        &actor.name,
        action,
        target,
        outcome.as_str(),
        details_json,
        prev_hash,
    ] {
        put_str(&mut h, field);
    }
    hex(h.finish().as_ref())
}

/// `str(s)` of the module docs: a 4-byte big-endian length, then the UTF-8 bytes.
fn put_str(h: &mut ring::digest::Context, s: &str) {
    // Fields are far below 4 GiB (the store bounds them); saturate rather than wrap.
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    h.update(&len.to_be_bytes());
    h.update(s.as_bytes());
}

/// `str(s)` of the module docs, appended to `out`.
fn put_str_bytes(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Whether `s` has the form of an entry hash: 64 lowercase hex characters.
fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(H[usize::from(b >> 4)]));
        s.push(char::from(H[usize::from(b & 15)]));
    }
    s
}

/// `value` in canonical JSON (see the module docs).
pub fn canonical_json(value: &Value) -> Result<String, EventError> {
    let mut out = String::new();
    write_canonical(value, &mut out)?;
    Ok(out)
}

fn write_canonical(value: &Value, out: &mut String) -> Result<(), EventError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            let int = if let Some(i) = n.as_i64() {
                Some(i)
            } else if n.is_u64() {
                None
            } else {
                // An integral float (`3.0`) is the integer JCS writes for it.
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() <= MAX_SAFE_INTEGER as f64)
                    .map(|f| f as i64)
            };
            match int {
                Some(i) if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i) => {
                    out.push_str(&i.to_string())
                }
                _ => return Err(EventError::Number(n.to_string())),
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            // RFC 8785: by UTF-16 code units (not the map's own order, which a
            // `preserve_order` build of serde_json would make insertion order).
            members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(v, out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if c < '\u{20}' => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
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

/// Why a chain does not verify. [`ChainError::first_bad_seq`] is the first position that
/// does not hold what it should.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The entry's hash is not the hash of its contents: it was edited.
    #[error("audit entry {seq}: the hash does not match the contents (edited)")]
    HashMismatch {
        /// The entry.
        seq: i64,
    },
    /// The entry's `prev_hash` is not the previous entry's hash (or, for entry 1, not
    /// all zeros): an entry before it was replaced or re-hashed.
    #[error("audit entry {seq}: prev_hash does not match the previous entry")]
    BrokenLink {
        /// The entry.
        seq: i64,
    },
    /// Entry `expected` should come next, but `found` does: entries were removed or
    /// reordered (or the log does not start at 1).
    #[error("audit entry {expected} expected, found entry {found} (removed or reordered)")]
    OutOfSequence {
        /// The seq that should be there.
        expected: i64,
        /// The seq that is.
        found: i64,
    },
    /// The entry's details have no canonical form, so it cannot have been written by
    /// control as it is.
    #[error("audit entry {seq}: {reason}")]
    Unhashable {
        /// The entry.
        seq: i64,
        /// Why.
        reason: EventError,
    },
}

impl ChainError {
    /// The first seq whose entry is wrong or missing.
    pub fn first_bad_seq(&self) -> i64 {
        match self {
            ChainError::HashMismatch { seq }
            | ChainError::BrokenLink { seq }
            | ChainError::Unhashable { seq, .. } => *seq,
            ChainError::OutOfSequence { expected, .. } => *expected,
        }
    }
}

/// Checks entries one at a time, in order: for a log read page by page.
#[derive(Clone, Debug)]
pub struct ChainVerifier {
    /// The seq and hash the next entry must follow; `None`: take the first entry's
    /// `seq` and `prev_hash` as given.
    head: Option<(i64, String)>,
    checked: u64,
}

impl ChainVerifier {
    /// Expect the whole log: the first entry is seq 1 with `prev_hash` [`GENESIS_HASH`].
    pub fn from_genesis() -> Self {
        Self::after(0, GENESIS_HASH.to_owned())
    }

    /// Expect the entry after a known one (a checkpoint): seq `seq + 1` with `prev_hash`
    /// `hash`.
    pub fn after(seq: i64, hash: String) -> Self {
        ChainVerifier {
            head: Some((seq, hash)),
            checked: 0,
        }
    }

    /// Accept whatever the first entry says it follows (a page of the log, unanchored).
    pub fn unanchored() -> Self {
        ChainVerifier {
            head: None,
            checked: 0,
        }
    }

    /// Check the next entry.
    pub fn push(&mut self, entry: &AuditEntry) -> Result<(), ChainError> {
        if let Some((seq, hash)) = &self.head {
            let expected = seq.saturating_add(1);
            if entry.seq != expected {
                return Err(ChainError::OutOfSequence {
                    expected,
                    found: entry.seq,
                });
            }
            if entry.prev_hash != *hash {
                return Err(ChainError::BrokenLink { seq: entry.seq });
            }
        }
        let computed = entry
            .computed_hash()
            .map_err(|reason| ChainError::Unhashable {
                seq: entry.seq,
                reason,
            })?;
        if computed != entry.hash {
            return Err(ChainError::HashMismatch { seq: entry.seq });
        }
        self.head = Some((entry.seq, entry.hash.clone()));
        self.checked += 1;
        Ok(())
    }

    /// The last entry checked (seq and hash), if any: a checkpoint to resume from.
    pub fn head(&self) -> Option<(i64, &str)> {
        match &self.head {
            Some((seq, hash)) if self.checked > 0 => Some((*seq, hash.as_str())),
            _ => None,
        }
    }

    /// How many entries were checked.
    pub fn checked(&self) -> u64 {
        self.checked
    }
}

/// Check that `entries` are one unbroken stretch of the chain; `Err` names the first bad
/// entry. When the first entry is seq 1 its `prev_hash` must be [`GENESIS_HASH`];
/// otherwise the stretch is taken to start where its first entry says (a page). To check
/// a whole log, also require that it starts at 1 (or use
/// [`ChainVerifier::from_genesis`]); see the module docs for what no chain can show.
pub fn verify_chain(entries: &[AuditEntry]) -> Result<(), ChainError> {
    let mut v = match entries.first() {
        None => return Ok(()),
        Some(first) if first.seq == 1 => ChainVerifier::from_genesis(),
        Some(_) => ChainVerifier::unanchored(),
    };
    entries.iter().try_for_each(|e| v.push(e))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn canonical_json_is_jcs_for_the_allowed_values() {
        let v = json!({
            "b": [1, -2, true, null, "x"],
            "a": {"z": 0, "y": "line\nbreak \"q\" \\ \u{1} \u{7f} é"},
            "\u{e000}": 1,
            "\u{1f600}": 2,
            "n": 3.0,
        });
        assert_eq!(
            canonical_json(&v).unwrap(),
            "{\"a\":{\"y\":\"line\\nbreak \\\"q\\\" \\\\ \\u0001 \u{7f} é\",\"z\":0},\
             \"b\":[1,-2,true,null,\"x\"],\"n\":3,\"\u{1f600}\":2,\"\u{e000}\":1}"
        );
        assert_eq!(
            canonical_json(&json!(1.5)),
            Err(EventError::Number("1.5".into()))
        );
        assert!(canonical_json(&json!(MAX_SAFE_INTEGER)).is_ok());
        assert!(canonical_json(&json!(-MAX_SAFE_INTEGER)).is_ok());
        assert!(canonical_json(&json!(MAX_SAFE_INTEGER + 1)).is_err());
        assert!(canonical_json(&json!(u64::MAX)).is_err());
    }

    /// The encoding in the module docs, written out by hand for one entry.
    #[test]
    fn hash_follows_the_documented_encoding() {
        let event = AuditEvent::refused(
            Actor::appliance("app-1"),
            action::APPLIANCE_ENROLL,
            "app-1",
            "nonce_replayed",
        )
        .with("proof_kind", "token");
        let mut m = Vec::new();
        let s = |m: &mut Vec<u8>, s: &str| {
            m.extend_from_slice(&(s.len() as u32).to_be_bytes());
            m.extend_from_slice(s.as_bytes());
        };
        s(&mut m, "tether-audit-v1");
        m.extend_from_slice(&7i64.to_be_bytes());
        m.extend_from_slice(&1_700_000_000i64.to_be_bytes());
        for f in [
            "appliance",
            "app-1",
            "appliance.enroll",
            "app-1",
            "refused",
            r#"{"code":"nonce_replayed","proof_kind":"token"}"#,
            GENESIS_HASH,
        ] {
            s(&mut m, f);
        }
        let expected = hex(ring::digest::digest(&ring::digest::SHA256, &m).as_ref());
        assert_eq!(
            entry_hash(7, 1_700_000_000, &event, GENESIS_HASH).unwrap(),
            expected
        );
    }

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
