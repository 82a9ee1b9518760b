//! Tether control: the two-tier CA, the store, and the appliance identity lifecycle.
//!
//! # Layers
//!
//! ```text
//!   run, config, main.rs (cli/)      wiring: read control.toml, open the store and the CA,
//!        │                            start the cluster and the HTTPS server
//!        ▼
//!   http ──────────────► cluster      routes, authentication extractors, rate limit,
//!        │                  │          OpenAPI │ broker links, presence, command routing
//!        ▼                  ▼
//!   domain ◄────────────────┘         CA, trust states, tokens, proofs, enrollment and
//!        │                            renewal, operators and roles, appliances, brokers,
//!        ▼                            audit checkpoints — no HTTP types
//!   store                             SQLite / PostgreSQL, one transaction per change
//! ```
//!
//! Dependencies only point down: [`http`] calls [`domain`] operations and drives the
//! [`cluster`]; the cluster uses the domain and the store; the domain uses the store. The
//! domain never imports the HTTP layer or the cluster: what it needs from the cluster
//! comes through [`domain::Fleet`], which [`cluster::Cluster`] implements. [`metrics`]
//! is used by the HTTP layer and the cluster and imports neither. [`config`] composes
//! each layer's settings and is read only by the wiring.
//!
//! The `tether-control` command line (`main.rs` and its `cli/` modules) runs the same
//! domain operations the API runs, as the local admin, on the data directory.
//!
//! # Modules
//!
//! - [`domain`] — the rules: [`domain::ca`], [`domain::trust`], [`domain::token`],
//!   [`domain::proof`], [`domain::enroll`], [`domain::renew`], [`domain::operators`],
//!   [`domain::appliances`], [`domain::brokers`], [`domain::exec`], [`domain::audit`].
//! - [`store`] — the [`store::Store`] trait and its SQLite / PostgreSQL implementation:
//!   appliances, certificates, tokens, nonces, used proofs, operators, brokers, the
//!   versioned allowlist and the audit log.
//! - [`http`] — the HTTPS API: router, handlers, server, rate limit, OpenAPI.
//! - [`console`] — the operators' web console on its own listener: sign-in links and
//!   sessions, pages, actions through the same domain operations, live updates (SSE).
//! - [`cluster`] — one channel per broker, presence, command routing.
//! - [`jobs`] — periodic work (overlap sweep, audit checkpoints, pruning), claimed once
//!   per period across replicas through a lease row on the database's clock.
//! - [`metrics`] — Prometheus metrics on a local listener.
//! - [`config`] — `control.toml` in the data directory.
//! - [`run`] — wiring: init a data directory, bind, serve.
//! - [`fault`] — test-only crash hooks (cargo feature `fault-injection`).

#![forbid(unsafe_code)]

pub mod cluster;
pub mod config;
pub mod console;
pub mod domain;
pub mod fault;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod run;
pub mod store;

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
