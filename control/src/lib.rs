//! Tether control: the two-tier CA, the store, and the appliance identity lifecycle.
//!
//! # Layout
//!
//! - [`ca`] — root and intermediate CA (local key files; AWS KMS), issuing appliance,
//!   broker, operator and control certificates from CSRs. Control never copies names from
//!   a CSR.
//! - [`store`] — the [`store::Store`] trait and its SQLite / PostgreSQL implementation:
//!   appliances, certificates, tokens, nonces, used proofs, and the versioned allowlist.
//! - [`enroll`] — enrollment: challenge, proof, issuance, recording.
//! - [`proof`] — AWS, GCP and Kubernetes platform proofs.
//! - [`renew`] — renewal over mTLS, and the overlap expiry.
//! - [`appliances`] — the operator API's appliance and token routes.
//! - [`operators`] — operators, roles, invites (bundles), login, and the check every
//!   operator route runs.
//! - [`identity`] — which identity a verified client certificate names.
//! - [`trust`] — trust states and the fleet summary.
//! - [`token`] — one-time tokens and nonces (only hashes are stored).
//! - [`api`] / [`server`] — the HTTPS API; [`rate_limit`] — the per-client-IP limit of
//!   its routes open without credentials.
//! - [`audit_log`] — signing checkpoints of the audit log and exporting it; the format,
//!   chain and verifier are the `tether-audit` crate's, and the store writes each entry
//!   with the change it records. [`audit_http`] — `GET /v1/audit`.
//! - [`metrics`] — Prometheus metrics on a local listener.
//! - [`config`] — `control.toml` in the data directory.

#![forbid(unsafe_code)]

pub mod api;
pub mod appliances;
pub mod audit_http;
pub mod audit_log;
pub mod brokers;
pub mod ca;
pub mod cluster;
pub mod config;
pub mod enroll;
pub mod exec;
pub mod identity;
pub mod metrics;
pub mod openapi;
pub mod operators;
pub mod proof;
pub mod rate_limit;
pub mod renew;
pub mod run;
pub mod server;
pub mod store;
pub mod token;
pub mod trust;

use std::path::Path;
use std::sync::Arc;

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The CA settings for a control config.
pub fn ca_config(cfg: &config::ControlConfig) -> ca::CaConfig {
    ca::CaConfig {
        trust_domain: cfg.trust_domain.clone(),
        control_dns_names: cfg.dns_names.clone(),
        control_ips: cfg.ips.clone(),
        appliance_validity: cfg.certificates.appliance,
        broker_validity: cfg.certificates.broker,
        operator_validity: cfg.certificates.operator,
        ..ca::CaConfig::default()
    }
}

/// Open (and migrate) the store the config names.
pub async fn open_store(
    cfg: &config::ControlConfig,
    data_dir: &Path,
) -> Result<Arc<dyn store::Store>, store::StoreError> {
    let url = cfg.database_url(data_dir);
    Ok(Arc::new(store::sql::SqlStore::connect(&url).await?))
}
