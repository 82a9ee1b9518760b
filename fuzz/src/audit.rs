//! The audit export seeds' trust: control's trust domain and the root certificate its
//! checkpoint signer chains to (`fixtures/audit-root.pem`, written with the seeds by
//! `tests/seeds.rs`; its private key was dropped).

/// The trust domain of the exports.
pub const TRUST_DOMAIN: &str = "fuzz.tether.test";

/// The root the `audit_export` target trusts, PEM.
pub const ROOT_PEM: &str = include_str!("../fixtures/audit-root.pem");
