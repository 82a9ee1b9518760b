//! The control plane's store: one trait, two real implementations — SQLite (embedded
//! default, a file in the data directory) and PostgreSQL (several control replicas).
//!
//! Every operation that changes trust is one transaction. One that changes at least one
//! fingerprint bumps the allowlist version by exactly one, and records each fingerprint it
//! adds or removes as a delta carrying that version (revoking an appliance with three
//! allowed fingerprints: one new version, three deltas); one that changes none leaves the
//! version alone. Brokers follow with "changes since version v" and apply each version as
//! a whole.
//!
//! Every operation that changes trust, or hands out or uses an enrollment secret, also
//! writes its [`AuditEvent`] to the audit log ([`tether_audit`]) in that same transaction:
//! the change and its entry commit together or not at all, so a failed operation leaves
//! no success entry (its caller then records the refusal with [`Store::append_audit`]).
//! Audit entries are numbered without gaps and chained by hash; appends serialize on the
//! log's head, so concurrent writers (several control replicas included) extend one
//! chain.

//!
//! The store is the bottom layer: it imports nothing else of control. The records it
//! keeps are declared here (appliances, certificates, operators, invites, brokers) or in
//! the crates below it (`tether-api`, `tether-audit`); the rules over them are
//! `crate::domain`'s.
//!
//! # Modules
//!
//! - this file — the [`Store`] trait, its records and [`StoreError`].
//! - [`sql`] — [`sql::SqlStore`], the SQLite / PostgreSQL implementation (sqlx `Any`),
//!   with its migrations; inside it, the audit log, the row decoding and the allowlist
//!   versioning each have a file.

use async_trait::async_trait;
// The store's records speak the API's enums (a record's status is what the API shows).
use tether_api::appliances::{ApplianceStatus, PlatformBinding};
use tether_api::brokers::BrokerStatus;
use tether_api::operators::{Operator, OperatorStatus, Revoked, Role};
use tether_audit::checkpoint::Checkpoint;
use tether_audit::{AuditEntry, AuditEvent};
use thiserror::Error;

/// Seconds since the Unix epoch. The store never reads the clock: callers pass `now`.
pub type UnixSeconds = i64;

/// An appliance record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appliance {
    /// Appliance id (`[A-Za-z0-9._-]{1,128}`).
    pub id: String,
    /// Tenant / customer.
    pub tenant: String,
    /// Platform binding.
    pub binding: PlatformBinding,
    /// Status.
    pub status: ApplianceStatus,
    /// Bumped by an operator to ask the agent to renew now.
    pub manual_renewal_generation: i64,
    /// Creation time.
    pub created_at: UnixSeconds,
}

/// State of an issued certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertState {
    /// The appliance's current certificate.
    Current,
    /// Replaced by a renewal; allowed until the given time (the overlap window).
    PreviousUntil(UnixSeconds),
    /// Revoked (or expired out of the overlap): not in the allowlist.
    Revoked,
}

/// An issued certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertRecord {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The appliance.
    pub appliance_id: String,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// Validity start.
    pub not_before: UnixSeconds,
    /// Validity end.
    pub not_after: UnixSeconds,
    /// State.
    pub state: CertState,
}

/// One allowlist change, as brokers consume it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowlistDelta {
    /// The version this change belongs to; all deltas of one operation share it. Versions
    /// are strictly increasing from one operation to the next, with no gaps within a
    /// store; a fingerprint appears at most once per version, so the deltas of a version
    /// are a set, applied together.
    pub version: i64,
    /// The appliance.
    pub appliance_id: String,
    /// The fingerprint, lowercase hex.
    pub fingerprint: String,
    /// `true` when added, `false` when removed.
    pub added: bool,
}

/// What a database belongs to (`control_meta`): `serve` refuses a database whose
/// record differs from its own CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlMeta {
    /// The fleet's SPIFFE trust domain.
    pub trust_domain: String,
    /// SHA-256 of the root CA certificate's DER, lowercase hex.
    pub root_fingerprint: String,
}

/// A control replica as it registers itself (`control_replicas`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaInfo {
    /// Its id (kept in its data directory).
    pub id: String,
    /// Where brokers and clients reach it.
    pub advertise: String,
    /// The address its API listener is bound to.
    pub api_addr: String,
    /// Its `tether-control` version.
    pub version: String,
}

/// A registered replica with its times (Unix seconds, the database's clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaRecord {
    /// What it registered.
    pub info: ReplicaInfo,
    /// When it (last) started.
    pub started_at: UnixSeconds,
    /// Its last heartbeat.
    pub heartbeat_at: UnixSeconds,
}

/// A broker of the edge cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerRecord {
    /// Name (appliance id rules).
    pub name: String,
    /// Status.
    pub status: BrokerStatus,
    /// When it was added.
    pub created_at: UnixSeconds,
    /// Fingerprint of its current certificate.
    pub fingerprint: Option<String>,
    /// Its current certificate's `notAfter`.
    pub not_after: Option<UnixSeconds>,
    /// Where agents reach it, as it last said.
    pub quic_addr: Option<String>,
    /// When its channel last said something.
    pub last_seen: Option<UnixSeconds>,
}

/// Why a broker could not authenticate or enroll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerRefusal {
    /// No such broker, or not this token.
    Unknown,
    /// The bundle expired.
    Expired,
    /// The bundle was used (the broker is enrolled).
    AlreadyUsed,
}

/// Why a token could not be redeemed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No token with that hash.
    Unknown,
    /// The token was issued for another appliance.
    WrongAppliance,
    /// Expired.
    Expired,
    /// Already used.
    AlreadyUsed,
}

/// A store failure.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record already exists.
    #[error("{0} already exists")]
    Conflict(String),
    /// No such record.
    #[error("{0} not found")]
    NotFound(String),
    /// A single-use value (nonce, proof id) was already used.
    #[error("{0} was already used")]
    Replay(String),
    /// A token could not be redeemed.
    #[error("enrollment token refused: {0:?}")]
    Token(TokenRefusal),
    /// A nonce is unknown or expired.
    #[error("nonce unknown or expired")]
    NonceInvalid,
    /// The caller passed something the store does not record (an audit event over its
    /// limits, or with details that have no canonical form): a bug in the caller, not a
    /// peer's doing; retrying cannot help.
    #[error("refused to store: {0}")]
    Invalid(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(String),
    /// The database cannot be reached or cannot take writes right now: unreachable,
    /// restarting, shutting down, out of connections, or a read-only standby (SQLSTATE
    /// 25006, a server in recovery). Not the caller's fault; retrying later can help
    /// (after a restart or a failover).
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// A stable code for the error (for audit details and logs): `conflict`,
    /// `not_found`, `replay`, `token_<refusal>`, `nonce_invalid`, `invalid`, `database`,
    /// `unavailable`.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Conflict(_) => "conflict",
            StoreError::NotFound(_) => "not_found",
            StoreError::Replay(_) => "replay",
            StoreError::Token(TokenRefusal::Unknown) => "token_unknown",
            StoreError::Token(TokenRefusal::WrongAppliance) => "token_wrong_appliance",
            StoreError::Token(TokenRefusal::Expired) => "token_expired",
            StoreError::Token(TokenRefusal::AlreadyUsed) => "token_used",
            StoreError::NonceInvalid => "nonce_invalid",
            StoreError::Invalid(_) => "invalid",
            StoreError::Database(_) => "database",
            StoreError::Unavailable(_) => "unavailable",
        }
    }
}

/// Filter for listing appliances.
#[derive(Clone, Debug, Default)]
pub struct ApplianceFilter {
    /// Only this status.
    pub status: Option<ApplianceStatus>,
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Start after this id (pagination).
    pub after: Option<String>,
    /// Only ids starting with this.
    pub id_prefix: Option<String>,
    /// At most this many (0 = default 100).
    pub limit: u32,
}

/// The storage trait. Implementations: [`sql::SqlStore`] over SQLite and PostgreSQL.
///
/// Methods taking an `audit` event write it to the audit log in their own transaction,
/// stamped with their `now` (for [`Store::register_appliance`], the appliance's
/// `created_at`), and only when they succeed; an event that breaks the audit limits
/// ([`AuditEvent::validate`]) fails the operation with `Invalid` and changes nothing.
/// Trust-changing methods add `allowlist_version` (the version after the operation) and
/// `allowlist_changes` (how many fingerprints it moved) to the event's details.
/// How long an enrollment token or operator invite is kept after it expired, seconds
/// (1 day: long enough for its holder to learn why it fails; short enough that a week of
/// enrollments at the default 24 h token validity holds two days of tokens, not all). A token is redeemable only before its `expires_at`, so "already used" and
/// "expired" are the answers for exactly the tokens kept; one pruned after this answers
/// "unknown token" (`TokenRefusal::Unknown`), which is as final: a pruned token could
/// never be redeemed again either. A used token is kept at least this long after its
/// validity window ended, so within that window a second redemption answers "already
/// used".
pub const TOKEN_RETENTION_SECS: i64 = 86_400;

#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Register an appliance and record `audit`. `Conflict` (and no entry) if the id
    /// exists.
    async fn register_appliance(
        &self,
        appliance: &Appliance,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// One appliance.
    async fn get_appliance(&self, id: &str) -> Result<Option<Appliance>, StoreError>;
    /// Appliances, ordered by id.
    async fn list_appliances(&self, filter: &ApplianceFilter)
        -> Result<Vec<Appliance>, StoreError>;
    /// Change the status. Disabling removes the appliance's allowed fingerprints from the
    /// allowlist (recorded as deltas); enabling puts back those still valid at `now`;
    /// revoking removes them and marks every certificate revoked. Returns the deltas, all
    /// of one new version (none, and no new version, when nothing changed). Records
    /// `audit` (also when the status was already `status`: the request is recorded, with
    /// `allowlist_changes` 0); `NotFound` and no entry if there is no such appliance.
    async fn set_status(
        &self,
        id: &str,
        status: ApplianceStatus,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<Vec<AllowlistDelta>, StoreError>;
    /// Bump the manual-renewal generation and record `audit` (with
    /// `manual_renewal_generation` added to its details); returns the new value.
    async fn bump_manual_renewal(
        &self,
        id: &str,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<i64, StoreError>;

    /// Store a token hash for `appliance_id` and record `audit`. `NotFound` if there is
    /// no such appliance, `Conflict` if the hash is already stored.
    async fn create_token(
        &self,
        appliance_id: &str,
        token_hash: &str,
        expires_at: UnixSeconds,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Redeem a token once, atomically, and record `audit` (the redemption). Refused:
    /// `Token(why)`, and no entry.
    async fn redeem_token(
        &self,
        appliance_id: &str,
        token_hash: &str,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// Store a fresh enrollment nonce.
    async fn create_nonce(&self, nonce: &str, expires_at: UnixSeconds) -> Result<(), StoreError>;
    /// Consume a nonce once, atomically; `NonceInvalid` if unknown or expired, `Replay` if
    /// used.
    async fn consume_nonce(&self, nonce: &str, now: UnixSeconds) -> Result<(), StoreError>;
    /// Record a platform proof id (`kind` e.g. "k8s", id e.g. its jti) as used until
    /// `expires_at`; `Replay` if already recorded.
    async fn record_proof(
        &self,
        kind: &str,
        proof_id: &str,
        expires_at: UnixSeconds,
    ) -> Result<(), StoreError>;

    /// Record a newly issued certificate as the appliance's current one and allow its
    /// fingerprint. A previous current certificate becomes `PreviousUntil(now + overlap)`
    /// (`overlap = 0`: removed at once, e.g. re-enrollment after revocation). Sets the
    /// appliance `Active`. Returns the deltas, all of one new version: the new fingerprint
    /// first, then any removed at once. Records `audit` (the enrollment or renewal).
    /// `Conflict` (and no change at all, no entry) if the serial or fingerprint is already
    /// recorded.
    async fn record_certificate(
        &self,
        cert: &CertRecord,
        now: UnixSeconds,
        overlap_secs: i64,
        audit: &AuditEvent,
    ) -> Result<Vec<AllowlistDelta>, StoreError>;
    /// Certificates of an appliance, newest first. `NotFound` if there is no such appliance.
    async fn certificates(&self, appliance_id: &str) -> Result<Vec<CertRecord>, StoreError>;
    /// Every appliance's current certificate (state [`CertState::Current`]), ordered by
    /// appliance id (bytewise), at most one per appliance. Appliances without one (never
    /// enrolled, revoked) are absent. A disabled appliance's current certificate is listed
    /// although it is out of the allowlist while disabled, and so is one past its
    /// `not_after`: check the appliance's status and the times.
    async fn current_certificates(&self) -> Result<Vec<CertRecord>, StoreError>;
    /// The current certificates, as [`Store::current_certificates`], of the appliances
    /// whose ids come after `after` (from the first when `None`) up to and including
    /// `through`, in the order [`Store::list_appliances`] uses: one page of appliances'
    /// certificates in one query.
    async fn current_certificates_between(
        &self,
        after: Option<&str>,
        through: &str,
    ) -> Result<Vec<CertRecord>, StoreError>;
    /// The appliance's current certificate, `None` if it has none. `NotFound` if there is
    /// no such appliance.
    async fn current_certificate(
        &self,
        appliance_id: &str,
    ) -> Result<Option<CertRecord>, StoreError>;
    /// The certificate with this fingerprint (SHA-256 of the DER, lowercase hex), and
    /// whether its fingerprint is in the allowlist now; `None` if no such certificate was
    /// ever recorded. "Allowed" is what brokers accept at this moment, nothing more: the
    /// caller checks the validity times itself.
    async fn find_certificate(
        &self,
        fingerprint: &str,
    ) -> Result<Option<(CertRecord, bool)>, StoreError>;
    /// Remove previous certificates whose overlap ended at `now`. Returns the deltas, all
    /// of one new version however many appliances they belong to (none, and no new
    /// version, when nothing changed). When it changes something it records an
    /// [`tether_audit::action::ALLOWLIST_EXPIRE_OVERLAPS`] entry by `system/control`.
    async fn expire_overlaps(&self, now: UnixSeconds) -> Result<Vec<AllowlistDelta>, StoreError>;

    /// The current allowlist version (0 when never changed): the number of operations that
    /// changed the allowlist.
    async fn allowlist_version(&self) -> Result<i64, StoreError>;
    /// The allowed `(appliance, fingerprint)` pairs and the version they reflect.
    async fn allowlist_snapshot(&self) -> Result<(i64, Vec<(String, String)>), StoreError>;
    /// Deltas of the versions after `since`, ordered by version and, within one, as the
    /// operation returned them. A page holds whole versions only, never part of one: it
    /// ends at the first version boundary at or after `limit` deltas, so it holds more
    /// than `limit` deltas when the limit falls inside a version (always at least one
    /// whole version when any is newer than `since`). The next page starts after the last
    /// delta's version; an empty page means nothing is newer than `since`.
    async fn allowlist_changes_since(
        &self,
        since: i64,
        limit: u32,
    ) -> Result<Vec<AllowlistDelta>, StoreError>;

    /// Append one entry on its own (a refusal, or an action with no other change), at
    /// `now`; returns it. `Invalid` if the event breaks the audit limits.
    async fn append_audit(
        &self,
        event: &AuditEvent,
        now: UnixSeconds,
    ) -> Result<AuditEntry, StoreError>;
    /// Audit entries with `seq > after_seq`, oldest first, at most `limit` (0: a default).
    async fn audit_entries(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError>;
    /// Store a signed checkpoint of the audit log ([`tether_audit::checkpoint`]). Returns
    /// `false` (and changes nothing) when one is already stored for its `seq`. The store
    /// does not check the signature; `domain::audit::write_checkpoint` only
    /// signs a head that extends the last checkpoint.
    async fn add_audit_checkpoint(&self, checkpoint: &Checkpoint) -> Result<bool, StoreError>;
    /// Checkpoints with `seq > after_seq`, by seq, at most `limit` (0: a default).
    async fn audit_checkpoints(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<Checkpoint>, StoreError>;
    /// The checkpoint with the highest seq, if any.
    async fn last_audit_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError>;
    /// The last archive of the audit log ([`AuditArchive`]: the live log's anchor), if
    /// any.
    async fn audit_archive(&self) -> Result<Option<AuditArchive>, StoreError>;
    /// Record `archive` and delete the entries it covers (`seq <= archive.seq`) and the
    /// checkpoints before its last entry from the live log, appending `audit` (at
    /// `archive.archived_at`), in one transaction; returns how many entries left.
    /// `Conflict` (nothing changed) unless `archive.first_seq` is the entry right after
    /// the last archive (1 if none): archives never overlap and never skip; `Invalid`
    /// unless entry `archive.seq` is in the log with hash `archive.hash` and a checkpoint
    /// of that hash is stored: entries not covered by a checkpoint are never deleted.
    /// The caller wrote and synced the segment file first (`domain::audit::archive`).
    async fn archive_audit(
        &self,
        archive: &AuditArchive,
        audit: &AuditEvent,
    ) -> Result<u64, StoreError>;

    // Operators (see `domain::operators`). Names follow the appliance id rules.

    /// Store a one-time operator invite (only `token_hash`) for `name` with `role`, valid
    /// while `now < expires_at`, and record `audit`. `Conflict` if the hash is stored.
    async fn create_invite(
        &self,
        token_hash: &str,
        name: &str,
        role: Role,
        expires_at: UnixSeconds,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// The invite with this token hash, whatever its state; `None` if unknown.
    async fn find_invite(&self, token_hash: &str) -> Result<Option<Invite>, StoreError>;
    /// Redeem an invite once, atomically, and in the same transaction create (or
    /// re-activate, with the invite's role) the operator `cert.operator` and record its
    /// certificate `cert`, then `audit` (with `role` added to its details). Refused (and
    /// nothing changed, no entry): `Ok(Err(why))` when the invite is unknown, used,
    /// cancelled or expired at `now`, or names another operator than `cert.operator`
    /// (`Unknown`); `Conflict` if the certificate's serial or fingerprint is recorded.
    async fn redeem_invite(
        &self,
        token_hash: &str,
        cert: &OperatorCertificate,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<Result<Invite, InviteRefusal>, StoreError>;
    /// The operator a recorded operator certificate belongs to, with its role, status
    /// and the certificate's `not_after`; `None` if the fingerprint is not recorded (never
    /// issued, or its operator was revoked).
    async fn operator_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<OperatorCredential>, StoreError>;
    /// Every operator (active and revoked), ordered by name, with its number of
    /// recorded certificates.
    async fn list_operators(&self) -> Result<Vec<Operator>, StoreError>;
    /// Revoke operator `name`: status `revoked`, every recorded certificate of it dropped
    /// (its next call is refused), every console session of it deleted (its next page is
    /// the login page), every unredeemed invite for the name cancelled; record
    /// `audit` (with `certificates_removed` and `invites_cancelled` added). `NotFound` (no
    /// entry) when there is neither such an operator nor a pending invite for the name.
    async fn revoke_operator(
        &self,
        name: &str,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<Revoked, StoreError>;

    // The web console's sign-in (see `domain::console`).

    /// Record a console login link and `audit` in one transaction.
    async fn create_console_link(
        &self,
        link: &NewConsoleLink,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Login link `id`, with its operator's role and status now; `None` if unknown.
    async fn find_console_link(&self, id: &str) -> Result<Option<ConsoleLink>, StoreError>;
    /// Spend link `id` (unused, `now < expires_at`, its operator active) and create
    /// `session`, recording `audit`, in one transaction. `false` (nothing changed) when
    /// the link could not be spent: another request spent it first, or it expired.
    async fn redeem_console_link(
        &self,
        id: &str,
        session: &NewConsoleSession,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError>;
    /// The session whose token hashes to `token_sha256`, with its operator's role and
    /// status now; `None` if there is none (logged out, pruned, operator revoked).
    async fn console_session(
        &self,
        token_sha256: &str,
    ) -> Result<Option<ConsoleSessionRecord>, StoreError>;
    /// The session was used at `now`: its idle expiry moves to `idle_expires_at`.
    async fn touch_console_session(
        &self,
        token_sha256: &str,
        now: UnixSeconds,
        idle_expires_at: UnixSeconds,
    ) -> Result<(), StoreError>;
    /// Delete a session and record `audit` (logout); `false` if it was already gone.
    async fn end_console_session(
        &self,
        token_sha256: &str,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError>;
    /// Delete a session without an audit entry (found expired).
    async fn drop_console_session(&self, token_sha256: &str) -> Result<(), StoreError>;
    /// Operator `operator`'s sessions, newest first.
    async fn console_sessions(
        &self,
        operator: &str,
    ) -> Result<Vec<ConsoleSessionRecord>, StoreError>;
    /// Audit entries matching `q`, newest first.
    async fn audit_search(&self, q: &AuditSearch) -> Result<Vec<AuditEntry>, StoreError>;

    // Brokers (see `domain::brokers`).

    /// Add broker `name` (pending) with a one-time bundle token (only its hash), valid
    /// while `now < expires_at`, and record `audit`. A pending or revoked broker of that
    /// name gets the new token (the old bundle stops working); `Conflict` when an active
    /// broker has the name.
    async fn add_broker(
        &self,
        name: &str,
        token_hash: &str,
        expires_at: UnixSeconds,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Redeem broker `name`'s bundle token once and record its first certificate, then
    /// `audit`. `Ok(Err(why))` (nothing changed, no entry) when refused.
    #[allow(clippy::too_many_arguments)]
    async fn enroll_broker(
        &self,
        name: &str,
        token_hash: &str,
        fingerprint: &str,
        not_after: UnixSeconds,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<Result<(), BrokerRefusal>, StoreError>;
    /// Replace active broker `name`'s certificate `presented` (its current one) with a new
    /// one; the old one stays accepted until `overlap_until`. `NotFound` when `presented`
    /// is not the broker's current certificate or the broker is not active.
    #[allow(clippy::too_many_arguments)]
    async fn renew_broker(
        &self,
        name: &str,
        presented: &str,
        fingerprint: &str,
        not_after: UnixSeconds,
        overlap_until: UnixSeconds,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// The active broker a certificate fingerprint belongs to (its current certificate,
    /// or its previous one until the overlap ends at `now`).
    async fn broker_by_fingerprint(
        &self,
        fingerprint: &str,
        now: UnixSeconds,
    ) -> Result<Option<BrokerRecord>, StoreError>;
    /// Every broker, by name.
    async fn list_brokers(&self) -> Result<Vec<BrokerRecord>, StoreError>;
    /// Note that broker `name` is reachable at `quic_addr` and was heard from at `now`.
    async fn broker_seen(
        &self,
        name: &str,
        quic_addr: &str,
        now: UnixSeconds,
    ) -> Result<(), StoreError>;
    /// Revoke broker `name`: status revoked, certificates forgotten (its channel and
    /// renewal are refused), then `audit`. `NotFound` if there is no such broker.
    async fn revoke_broker(
        &self,
        name: &str,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Appliances whose manual-renewal generation is above 0, with it.
    async fn renewal_generations(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// Fires (with the version) each time this store commits a new allowlist version. In
    /// a cluster of control replicas other replicas' commits are not seen here: callers
    /// also poll [`Store::allowlist_version`].
    fn allowlist_watch(&self) -> tokio::sync::watch::Receiver<i64>;
    /// Whether [`Store::allowlist_watch`] also moves for other replicas' commits (a
    /// PostgreSQL replica's doorbell runs, and reads the version every second itself), so
    /// that its readers need not poll the store.
    fn allowlist_watch_follows_replicas(&self) -> bool {
        false
    }
    /// What this database belongs to, if recorded.
    async fn control_meta(&self) -> Result<Option<ControlMeta>, StoreError>;
    /// Record `meta` unless a record exists; returns the record in force (the existing
    /// one, which may differ: the caller compares).
    async fn record_control_meta(
        &self,
        meta: &ControlMeta,
        now: UnixSeconds,
    ) -> Result<ControlMeta, StoreError>;
    /// Register replica `info` or refresh its heartbeat, on the database's clock;
    /// `starting` also resets its start time.
    async fn replica_heartbeat(&self, info: &ReplicaInfo, starting: bool)
        -> Result<(), StoreError>;
    /// Replicas whose heartbeat is at most `within` seconds old (the database's clock), by
    /// id.
    async fn live_replicas(&self, within: i64) -> Result<Vec<ReplicaRecord>, StoreError>;
    /// The digests of allowlist versions `after + 1 ..= upto` (lowercase hex, see
    /// `tether_proto::cluster::allowlist_digest`), in order. Every version has one: each
    /// is written in the transaction that commits the version, and kept until
    /// [`Store::prune_allowlist_history`] removes it.
    async fn allowlist_digests(
        &self,
        after: i64,
        upto: i64,
    ) -> Result<Vec<(i64, String)>, StoreError>;
    /// Whether this store can write now: on PostgreSQL, that its connection reaches a
    /// primary (`NOT pg_is_in_recovery()`); on SQLite, that the database answers.
    async fn writable(&self) -> Result<bool, StoreError>;

    // Idempotent enrollment and renewal (see `domain::enroll`).

    /// Whether token `token_hash` could be redeemed by `appliance_id` at `now`, without
    /// redeeming it: `Ok` or `Token(why)`.
    async fn check_token(
        &self,
        appliance_id: &str,
        token_hash: &str,
        now: UnixSeconds,
    ) -> Result<(), StoreError>;
    /// In one transaction: redeem `issue.token` if any (recording its entry; refused:
    /// `Token(why)`, nothing changed), record `issue.cert` as
    /// [`Store::record_certificate`] does with `issue.audit`, and keep `issue.receipt` if
    /// any (`Replay`, nothing changed, when a live receipt for the same request and key
    /// exists: a concurrent retry won). Returns the deltas.
    async fn record_issued(
        &self,
        issue: &Issue<'_>,
        now: UnixSeconds,
    ) -> Result<Vec<AllowlistDelta>, StoreError>;
    /// The receipt for (`kind`, `subject`, `csr_key_sha256`) still live at `now`, with
    /// its certificate, if that certificate is still current and allowed.
    async fn find_receipt(
        &self,
        kind: ReceiptKind,
        subject: &str,
        csr_key_sha256: &str,
        now: UnixSeconds,
    ) -> Result<Option<(Receipt, CertRecord)>, StoreError>;

    // Periodic jobs (see `crate::jobs`).

    /// Claim periodic job `name` for `by` (a replica id) if it is due on the database's
    /// clock, scheduling its next run `every_ms` later, in one statement: of all the
    /// replicas asking, one gets [`JobClaim::Claimed`] per period. A job never seen
    /// before is due at once; one scheduled further out than `every_ms` (the period was
    /// shortened) is due too.
    async fn claim_job(&self, name: &str, every_ms: i64, by: &str) -> Result<JobClaim, StoreError>;
    /// Every periodic job's lease row, by name.
    async fn jobs(&self) -> Result<Vec<JobRecord>, StoreError>;
    /// Forget replicas whose heartbeat is more than `silent_secs` old (the database's
    /// clock); returns how many.
    async fn prune_replicas(&self, silent_secs: i64) -> Result<u64, StoreError>;
    /// Delete nonces, used proof ids, issue receipts and console links and sessions that
    /// expired before `now`, and enrollment tokens and operator invites that expired more
    /// than [`TOKEN_RETENTION_SECS`] before `now`; returns how many. Nothing it deletes
    /// can be replayed any more: a nonce, a proof id or a receipt is refused or useless
    /// once expired, whether its row is there or not.
    async fn prune_single_use(&self, now: UnixSeconds) -> Result<u64, StoreError>;
    /// Keep the allowlist history (each version's changes and digest) of the last `keep`
    /// versions only; returns the rows deleted. The version `keep` before the current one
    /// keeps its digest (no changes), so a broker there still resumes by deltas; a broker
    /// further behind gets a snapshot (`cluster::link`), as one too far behind always did.
    /// [`Store::allowlist_digests`] and [`Store::allowlist_changes_since`] then answer
    /// nothing for the versions removed.
    async fn prune_allowlist_history(&self, keep: u64) -> Result<u64, StoreError>;

    /// A command was sent: record it in flight and append its request entry `request` at
    /// `at`, in one transaction (`commands_in_flight`).
    async fn command_started(
        &self,
        command: &CommandInFlight,
        request: &AuditEvent,
        at: UnixSeconds,
    ) -> Result<(), StoreError>;
    /// Command `id` ended: delete its row and append its outcome entry `outcome` at
    /// `at`, in one transaction — only if the row was still there. `Ok(false)` (nothing
    /// appended): the command already has its outcome (it was abandoned as
    /// `replica_lost`, or ended before), so each command gets exactly one, whoever races.
    async fn command_ended(
        &self,
        id: &str,
        outcome: &AuditEvent,
        at: UnixSeconds,
    ) -> Result<bool, StoreError>;
    /// The commands in flight whose replica's heartbeat is more than `silent_secs` old
    /// on the database's clock, or that is not registered; `None`: every command in
    /// flight. Oldest first.
    async fn lost_commands(
        &self,
        silent_secs: Option<i64>,
    ) -> Result<Vec<CommandInFlight>, StoreError>;
}

/// A command between its request entry and its outcome entry (`commands_in_flight`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandInFlight {
    /// Unique across replicas and restarts.
    pub id: String,
    /// The replica relaying it (`control_replicas.id`).
    pub replica: String,
    /// The appliance it runs on.
    pub appliance: String,
    /// When it was sent (Unix seconds).
    pub started_at: UnixSeconds,
    /// Who asked (the request entry's actor).
    pub actor: tether_audit::Actor,
    /// The broker it was sent through.
    pub broker: String,
    /// The relaying replica's own number for it (in that replica's log lines and
    /// entries).
    pub command_id: i64,
}

/// What an idempotent retry is keyed by, with the retry's public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiptKind {
    /// An enrollment with a token: the subject is the token's hash.
    Enroll,
    /// A renewal: the subject is the fingerprint of the certificate presented.
    Renew,
}

/// An issued certificate kept so that a retry of the same request with the same key
/// gets it again (`issue_receipts`).
#[derive(Clone, PartialEq, Eq)]
pub struct Receipt {
    /// What the request was.
    pub kind: ReceiptKind,
    /// The token's hash, or the presented certificate's fingerprint.
    pub subject: String,
    /// SHA-256 of the CSR's public key, lowercase hex.
    pub csr_key_sha256: String,
    /// The chain as answered.
    pub chain_pem: String,
    /// Kept while `now < expires_at`.
    pub expires_at: UnixSeconds,
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The subject may be a token's hash: not for logs.
        let Self {
            kind,
            subject: _,
            csr_key_sha256,
            chain_pem: _,
            expires_at,
        } = self;
        f.debug_struct("Receipt")
            .field("kind", kind)
            .field("csr_key_sha256", csr_key_sha256)
            .field("expires_at", expires_at)
            .finish_non_exhaustive()
    }
}

/// What [`Store::record_issued`] records in one transaction.
#[derive(Clone, Copy, Debug)]
pub struct Issue<'a> {
    /// The new certificate.
    pub cert: &'a CertRecord,
    /// The previous certificate's overlap (see [`Store::record_certificate`]).
    pub overlap_secs: i64,
    /// The enrollment's or renewal's entry.
    pub audit: &'a AuditEvent,
    /// A token to redeem first (its hash) and the redemption's entry.
    pub token: Option<(&'a str, &'a AuditEvent)>,
    /// The receipt to keep.
    pub receipt: Option<&'a Receipt>,
}

/// The answer to [`Store::claim_job`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobClaim {
    /// This caller runs the job for this period; `epoch` counts the claims so far.
    Claimed {
        /// The claim's number (a fencing token).
        epoch: i64,
    },
    /// Another claim holds this period; the job is next due in this many milliseconds.
    NotDue {
        /// Milliseconds until the job is due (0 or more).
        due_in_ms: i64,
    },
}

/// An archived stretch of the audit log (`audit_archives`): entries `first_seq..=seq`
/// went to the segment file `file` at `archived_at`. The last one anchors the live log:
/// its first entry is `seq + 1`, whose `prev_hash` is `hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditArchive {
    /// The last entry archived (a signed checkpoint vouches for it).
    pub seq: i64,
    /// Its hash.
    pub hash: String,
    /// The first entry archived.
    pub first_seq: i64,
    /// When, Unix seconds.
    pub archived_at: UnixSeconds,
    /// The segment file's name, as the archiver gave it (information only).
    pub file: String,
}

/// A periodic job's lease row (`control_jobs`); times in Unix milliseconds, the
/// database's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRecord {
    /// The job.
    pub name: String,
    /// When it is next due.
    pub next_run_at_ms: i64,
    /// How many claims it had.
    pub epoch: i64,
    /// The replica that made the last claim.
    pub last_run_by: Option<String>,
    /// When.
    pub last_run_at_ms: Option<i64>,
}

pub mod sql;

// The operator records the store keeps (the rules over them are `domain::operators`).

/// The operator a recorded certificate belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorCredential {
    /// Operator name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its status.
    pub status: OperatorStatus,
    /// The certificate's `notAfter`, Unix seconds.
    pub not_after: UnixSeconds,
}

/// An operator certificate to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorCertificate {
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// Serial, lowercase hex.
    pub serial: String,
    /// Operator name.
    pub operator: String,
    /// `notAfter`, Unix seconds.
    pub not_after: UnixSeconds,
}

/// A stored invite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invite {
    /// The operator name it is for.
    pub name: String,
    /// The role it grants.
    pub role: Role,
    /// Valid while `now < expires_at`.
    pub expires_at: UnixSeconds,
    /// When it was redeemed.
    pub used_at: Option<UnixSeconds>,
    /// Cancelled by revoking its operator.
    pub cancelled: bool,
}

impl Invite {
    /// Why it cannot be redeemed at `now`, if it cannot.
    pub fn refusal(&self, now: UnixSeconds) -> Option<InviteRefusal> {
        if self.used_at.is_some() {
            Some(InviteRefusal::Used)
        } else if self.cancelled {
            Some(InviteRefusal::Cancelled)
        } else if now >= self.expires_at {
            Some(InviteRefusal::Expired)
        } else {
            None
        }
    }
}

/// Why an invite could not be redeemed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InviteRefusal {
    /// No invite with that token.
    Unknown,
    /// Already redeemed.
    Used,
    /// Expired.
    Expired,
    /// Cancelled (its operator was revoked).
    Cancelled,
}

impl InviteRefusal {
    /// The stable error code.
    pub fn code(self) -> &'static str {
        match self {
            InviteRefusal::Unknown => "invite_unknown",
            InviteRefusal::Used => "invite_used",
            InviteRefusal::Expired => "invite_expired",
            InviteRefusal::Cancelled => "invite_cancelled",
        }
    }

    /// The message for the caller.
    pub fn message(self) -> &'static str {
        match self {
            InviteRefusal::Unknown => "no such invite",
            InviteRefusal::Used => "this bundle was already used; ask an admin for a new one",
            InviteRefusal::Expired => "this bundle expired; ask an admin for a new one",
            InviteRefusal::Cancelled => {
                "this bundle was cancelled (its operator was revoked); ask an admin for a new one"
            }
        }
    }
}

// The console's sign-in records (the rules over them are `domain::console`).

/// A login link to record.
#[derive(Clone, PartialEq, Eq)]
pub struct NewConsoleLink {
    /// Its public id (in the URL's path).
    pub id: String,
    /// SHA-256 of its secret (the URL's fragment), lowercase hex.
    pub secret_sha256: String,
    /// The operator it signs in.
    pub operator: String,
    /// Good while `now < expires_at`.
    pub expires_at: UnixSeconds,
}

impl std::fmt::Debug for NewConsoleLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let NewConsoleLink {
            id,
            secret_sha256: _,
            operator,
            expires_at,
        } = self;
        f.debug_struct("NewConsoleLink")
            .field("id", id)
            .field("operator", operator)
            .field("expires_at", expires_at)
            .finish_non_exhaustive()
    }
}

/// A stored login link, with its operator as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleLink {
    /// SHA-256 of its secret, lowercase hex.
    pub secret_sha256: String,
    /// The operator it signs in.
    pub operator: String,
    /// The operator's role now.
    pub role: Role,
    /// The operator's status now.
    pub status: OperatorStatus,
    /// Good while `now < expires_at`.
    pub expires_at: UnixSeconds,
    /// Already spent.
    pub used: bool,
}

/// A console session to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewConsoleSession {
    /// SHA-256 of the cookie's secret, lowercase hex.
    pub token_sha256: String,
    /// The operator.
    pub operator: String,
    /// Ends at this time if unused.
    pub idle_expires_at: UnixSeconds,
    /// Ends at this time whatever happens.
    pub abs_expires_at: UnixSeconds,
    /// The browser's `User-Agent` (clipped).
    pub user_agent: String,
    /// The client's address.
    pub ip: String,
}

/// A stored console session, with its operator as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleSessionRecord {
    /// SHA-256 of the cookie's secret, lowercase hex.
    pub token_sha256: String,
    /// The operator.
    pub operator: String,
    /// The operator's role now.
    pub role: Role,
    /// The operator's status now.
    pub status: OperatorStatus,
    /// Created (signed in).
    pub created_at: UnixSeconds,
    /// Last recorded use (written at most once a minute).
    pub last_seen_at: UnixSeconds,
    /// Ends at this time if unused.
    pub idle_expires_at: UnixSeconds,
    /// Ends at this time whatever happens.
    pub abs_expires_at: UnixSeconds,
    /// The browser's `User-Agent`.
    pub user_agent: String,
    /// The client's address at sign-in.
    pub ip: String,
}

/// A search of the audit log (the console's Audit page and tabs): every given field must
/// match; newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditSearch {
    /// Exactly this target.
    pub target: Option<String>,
    /// Exactly this actor name.
    pub actor: Option<String>,
    /// Actions starting with this (`appliance.` or `appliance.revoke`).
    pub action_prefix: Option<String>,
    /// Entries with a `seq` below this (the next page).
    pub before: Option<i64>,
    /// Only successes (a refused request anyone can make must not hide or stand in for
    /// a real one).
    pub success_only: bool,
    /// At most this many (1..=1000).
    pub limit: u32,
}
