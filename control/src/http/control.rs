//! Control itself: `GET /v1/control/replicas` (viewer+), the live replicas sharing this
//! database.

use axum::extract::State;
use axum::{Extension, Json};
use tether_api::control::{Replica, ReplicaList};
use tether_api::operators::Role;
use tether_audit::action;

use crate::domain::replica::LIVE_WITHIN_SECS;
use crate::http::appliances::operator;
use crate::http::server::PeerCertificate;
use crate::http::{internal, ApiError, AppState};

/// `GET /v1/control/replicas` (viewer+).
#[utoipa::path(get, path = "/v1/control/replicas", tag = "control", responses(
        (status = 200, description = "live control replicas (heartbeat within 15 s, the database's clock)", body = ReplicaList),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = []))
)]
pub async fn replicas(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
) -> Result<Json<ReplicaList>, ApiError> {
    let now = crate::now_unix();
    operator(
        &s,
        &peer,
        Role::Viewer,
        action::CONTROL_REPLICAS,
        "replicas",
        now,
    )
    .await?;
    let replicas = s
        .domain
        .store
        .live_replicas(LIVE_WITHIN_SECS)
        .await
        .map_err(internal)?;
    Ok(Json(ReplicaList {
        answered_by: s.replica_id.to_string(),
        replicas: replicas.into_iter().map(replica_view).collect(),
    }))
}

/// A store record as the API shows it.
pub fn replica_view(r: crate::store::ReplicaRecord) -> Replica {
    Replica {
        id: r.info.id,
        advertise: r.info.advertise,
        api_addr: r.info.api_addr,
        version: r.info.version,
        started_at: r.started_at,
        heartbeat_at: r.heartbeat_at,
    }
}
