//! The body of every error answer.

use serde::{Deserialize, Serialize};

/// The body of every error answer (the `Error` schema of `/openapi.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Error))]
pub struct ErrorBody {
    /// Stable machine-readable code (`bad_request`, `role_forbidden`, …).
    pub error: String,
    /// Short human-readable message (no secrets).
    pub message: String,
}
