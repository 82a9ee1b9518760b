//! Control itself: `GET /v1/control/replicas`, the live control replicas sharing the
//! fleet's database.

use serde::{Deserialize, Serialize};

/// One live control replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Replica {
    /// The replica's id, generated once and kept in its data directory; every answer of
    /// that replica carries it in the `tether-control-replica` header.
    pub id: String,
    /// Where brokers and clients reach it (`[replica] advertise`, default its listen
    /// address).
    pub advertise: String,
    /// The address its API listener is bound to.
    pub api_addr: String,
    /// Its `tether-control` version.
    pub version: String,
    /// When it started, Unix seconds (the database's clock).
    pub started_at: i64,
    /// Its last heartbeat, Unix seconds (the database's clock).
    pub heartbeat_at: i64,
}

/// The answer of `GET /v1/control/replicas`: live replicas, by id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReplicaList {
    /// The id of the replica that answered.
    pub answered_by: String,
    /// Live replicas (heartbeat within the last 15 s), by id.
    pub replicas: Vec<Replica>,
}
