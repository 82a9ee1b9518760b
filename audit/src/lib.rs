//! Tether's audit log format: hash-chained entries, signed checkpoints, the export format
//! and its offline verifier. Pure types and functions: no HTTP, no database, no async
//! runtime. Whoever keeps a log stores entries where it likes and calls this crate to
//! encode, hash, chain, sign and verify them; control's store is such a keeper today.
//!
//! # Layout
//!
//! - [`entry`]: what an entry is: [`Actor`], [`Outcome`], the [`action`] and [`system`]
//!   names, the event to record ([`AuditEvent`]) and the recorded entry ([`AuditEntry`]),
//!   and the limits on each field.
//! - [`hash`]: the canonical bytes of an entry (format [`HASH_FORMAT`]), the canonical JSON
//!   of its `details`, and its SHA-256 ([`entry_hash`]).
//! - [`chain`]: checking that entries chain ([`verify_chain`], [`ChainVerifier`] page by
//!   page), and what a chain alone cannot show.
//! - [`checkpoint`]: signed checkpoints (the signed string, [`checkpoint::CheckpointSigner`],
//!   [`checkpoint::CheckpointVerifier`] and its signer rules).
//! - [`export`]: the JSON lines export format ([`export::ExportLine`]) and the offline
//!   verifier ([`export::ExportVerifier`], [`export::verify_export`]).
//! - [`page`]: the shape of a page of the log as control's API serves it
//!   ([`page::AuditPage`]).
//!
//! # Entries
//!
//! An entry says who ([`Actor`]) did what (`action`, e.g. `appliance.enroll`) to what
//! (`target`), how it ended ([`Outcome`]) and a few small facts (`details`, a JSON object
//! that never holds a secret). A writer builds an [`AuditEvent`]; the keeper validates it
//! ([`AuditEvent::validate`], which also gives `details` in canonical JSON) and gives it
//! its place: `seq` = 1, 2, 3, … with no gap, `at` in Unix seconds, `prev_hash` = the
//! previous entry's `hash` ([`GENESIS_HASH`] for entry 1), and `hash` = the lowercase hex
//! SHA-256 of the entry's fields, each fixed-width or length-prefixed ([`hash`] gives the
//! table, byte for byte, so another implementation can recompute it).
//!
//! # The chain and checkpoints
//!
//! Because each entry carries its predecessor's hash, [`verify_chain`] names the first
//! entry that was edited, removed, reordered or replaced. A chain cannot show that its
//! newest entries were cut, nor resist someone who rewrites the log and recomputes every
//! hash after the change: that needs an anchor held outside the log. A [`checkpoint`] is
//! that anchor: the `seq` and `hash` of an entry, signed (ECDSA P-256) by control's own
//! certificate, `spiffe://<trust domain>/control`, and carrying the signer's chain. The
//! verifier accepts it only if that chain leads to a root it was given (never one taken
//! from the log), the leaf is control's, and the signature verifies.
//!
//! # Verifying an export offline
//!
//! An export is UTF-8 JSON lines: an optional header (information only), then every
//! entry from `seq` 1, each checkpoint right after the entry it vouches for. The
//! [`export::ExportVerifier`] is sans-IO (fed line by line; [`export::verify_export`]
//! reads a file): it checks the chain from entry 1, every checkpoint's signer and
//! signature against the operator's root, that each checkpoint's hash is the hash of the
//! entry at its `seq`, and that the export reaches the last checkpoint. So a rewritten log
//! fails at the first checkpoint after the change and a cut log at its first missing
//! entry; entries after the last checkpoint are the one stretch it cannot vouch for
//! ([`export`] lists exactly what it detects and what it cannot). `tether audit verify` is
//! this verifier on a file.
//!
//! # One format for both sides
//!
//! The appliance side will keep a customer-side log in this same format: the same
//! entries, hash encoding, chain, checkpoints and export lines, so the customer can check
//! it with the same verifier, offline, without trusting either party's database. Nothing
//! here depends on how or where a log is stored. What is control-specific today is named
//! as such: the [`action`] and [`system`] names control records, and the checkpoint
//! signer identity the verifier requires (`spiffe://<trust domain>/control`).
//!
//! # Features
//!
//! - `openapi`: derive `utoipa::ToSchema` on the types control's API serves ([`AuditEntry`],
//!   [`Actor`], [`ActorKind`], [`Outcome`], [`checkpoint::Checkpoint`],
//!   [`page::AuditPage`]), for its OpenAPI document.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chain;
pub mod checkpoint;
pub mod entry;
pub mod export;
pub mod hash;
pub mod page;

pub use chain::{verify_chain, ChainError, ChainVerifier};
pub use entry::{
    action, clip, system, token_ref, Actor, ActorKind, AuditEntry, AuditEvent, EventError, Outcome,
    MAX_ACTION_LEN, MAX_ACTOR_LEN, MAX_DETAILS_LEN, MAX_TARGET_LEN,
};
pub use hash::{
    canonical_json, entry_hash, hash_parts, GENESIS_HASH, HASH_FORMAT, MAX_SAFE_INTEGER,
};
