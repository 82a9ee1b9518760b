//! Tether's control API as data: the JSON request and response bodies of every REST route
//! control serves, and the enums and constants they are made of. Control deserializes
//! requests and serializes answers with these types; the `tether` CLI, `tether up` and the
//! fleet simulator (`tether-loadtest`) build requests and read answers with the same ones.
//!
//! # The rule
//!
//! **Every REST body is declared here once.** A route's handler in control, and every
//! client of that route, name the type in this crate; nobody keeps a private
//! `#[derive(Deserialize)]` copy or builds the body with `serde_json::json!` — the agent's
//! enrollment and renewal and the broker's included. One shape lives elsewhere on
//! purpose: the audit page (`tether_audit::page::AuditPage`, owned with the log's format
//! by the audit crate).
//!
//! This crate holds serde types and nothing else: no HTTP client or server, no store, no
//! runtime, and no domain logic beyond `as_str`/`parse`/`Display`/`FromStr` helpers. What
//! a value *means* (which role a route needs, how a trust state is computed, what a name
//! may contain) is decided in control.
//!
//! # Modules, by resource
//!
//! - [`error`]: [`ErrorBody`], the body of every error answer (`Error` in OpenAPI).
//! - [`health`]: `GET /healthz`.
//! - [`enroll`]: appliance enrollment (challenge, proofs, the answer) and renewal.
//! - [`appliances`]: the fleet's appliances, their statuses, bindings, certificates and
//!   connections; one-time enrollment tokens.
//! - [`exec`]: a command on an appliance and the NDJSON lines of its answer.
//! - [`trust`]: trust states and the fleet summary.
//! - [`operators`]: roles, bundles, login, invites, the operator list and revocation.
//! - [`brokers`]: the broker list and `POST /v1/brokers`.
//! - [`audit`]: the query of `GET /v1/audit`.
//! - [`console`]: the web console's single-use sign-in link.
//! - [`control`]: the live control replicas (`GET /v1/control/replicas`).
//! - [`tunnels`]: break-glass tunnel sessions (plan, open, credential, close, list).
//!
//! # Features
//!
//! - `openapi`: derive `utoipa::ToSchema` (and `utoipa::IntoParams` on the query types)
//!   for control's OpenAPI document. Only control enables it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod appliances;
pub mod audit;
pub mod brokers;
pub mod console;
pub mod control;
pub mod enroll;
pub mod error;
pub mod exec;
pub mod health;
pub mod operators;
pub mod trust;
pub mod tunnels;

pub use error::ErrorBody;

/// Seconds since the Unix epoch, as some answers carry times.
pub type UnixSeconds = i64;
