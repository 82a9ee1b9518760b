//! `GET /v1/audit`: the query. The answer, a page of the log with its checkpoints, is
//! `tether_audit::page::AuditPage`: the audit crate owns the log's format, and the
//! export verifier reads the same type.

use serde::{Deserialize, Serialize};

/// Query of `GET /v1/audit`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::IntoParams),
    into_params(parameter_in = Query)
)]
#[serde(default, deny_unknown_fields)]
pub struct AuditQuery {
    /// Entries after this seq. Default 0 (from the first).
    pub after: i64,
    /// At most this many entries; 0 or more than the maximum: the maximum.
    pub limit: u32,
}
