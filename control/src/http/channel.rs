//! `GET /v1/brokers/channel`: a broker authenticates with its certificate and the
//! connection becomes its cluster channel ([`crate::cluster::link`]).

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use hyper_util::rt::TokioIo;
use tether_proto::cluster;
use tracing::warn;

use crate::cluster::link::run_link;
use crate::http::server::PeerCertificate;
use crate::http::{ApiError, AppState};
use crate::metrics::Reason;

/// `GET /v1/brokers/channel`: a broker's certificate, `Upgrade: tether-cluster/1`.
#[utoipa::path(get, path = "/v1/brokers/channel", tag = "brokers", responses(
        (status = 101, description = "switching to the cluster channel (length-prefixed JSON frames, see `tether_proto::cluster`)"),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "not the current certificate of an active broker", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 426, description = "`upgrade_required`: the request did not ask for `Upgrade: tether-cluster/1`", body = tether_api::ErrorBody),
    ),
    security(("broker_certificate" = []))
)]
pub async fn channel(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    mut req: Request,
) -> Response {
    let now = crate::now_unix();
    let name = match crate::domain::brokers::authenticate(&s.domain, peer.der(), now).await {
        Ok(n) => n,
        Err(e) => {
            s.metrics
                .channel_errors
                .get_or_create(&Reason { reason: e.code })
                .inc();
            warn!(code = e.code, "broker channel refused");
            return ApiError::from(e).into_response();
        }
    };
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(cluster::UPGRADE));
    if !wants {
        return ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!("send Upgrade: {}", cluster::UPGRADE),
        )
        .into_response();
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let io = TokioIo::new(upgraded);
                run_link(s.link_state(), name, io).await;
            }
            Err(e) => warn!(broker = %name, error = %e, "broker channel upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, cluster::UPGRADE)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
