//! A page of the log as control's API serves it (`GET /v1/audit?after=SEQ&limit=N`) and
//! `tether audit export` reads it: `{"entries": [...], "checkpoints": [...]}`.
//!
//! The entries are those with `seq > after`, oldest first, at most `limit`; the
//! checkpoints those with `after < seq <=` the page's last entry. A page with no entry
//! (the end of the log) carries every checkpoint with `seq > after`: there should be
//! none, and any there is vouches for an entry the log no longer has (its tail was cut),
//! which a client writing the export format ([`crate::export`]) puts at the end for the
//! verifier to find. The handler lives in `tether-control`; this is only the shape.

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::entry::AuditEntry;

/// Answer of `GET /v1/audit`.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditPage {
    /// Entries, oldest first.
    pub entries: Vec<AuditEntry>,
    /// Checkpoints among them (see the module docs), by seq.
    pub checkpoints: Vec<Checkpoint>,
}
