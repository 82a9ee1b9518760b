//! The OpenAPI 3.1 document of the control API, served without authentication at
//! `GET /openapi.json` (it describes routes and shapes, and holds no secret).
//!
//! It is generated from the code: every handler in [`crate::http::router`] carries a
//! `#[utoipa::path]` (method, path, parameters, request body, the success answer and every
//! error status it can give, each with the [`tether_api::ErrorBody`] schema, named
//! `Error`), and every body type derives `utoipa::ToSchema`. Operator and appliance routes
//! name a `mutualTLS` security scheme: the client certificate is checked in the TLS
//! handshake, not by a header. `tests/openapi.rs` checks that the document lists exactly
//! the router's routes; `tests/schemathesis.rs` fuzzes the server against it.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::SecurityScheme;
use utoipa::{Modify, OpenApi};

/// Name of the security scheme of operator routes.
pub const OPERATOR_SCHEME: &str = "operator_certificate";
/// Name of the security scheme of broker routes.
pub const BROKER_SCHEME: &str = "broker_certificate";
/// Name of the security scheme of appliance routes.
pub const APPLIANCE_SCHEME: &str = "appliance_certificate";

/// The document (see the module docs).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tether control API",
        description = "The Tether control plane: appliance enrollment and renewal, the \
            fleet, operators and the audit log. Errors are JSON `{\"error\": \"<stable_code>\", \
            \"message\": \"...\"}` (the `Error` schema). Operator routes need an operator \
            client certificate in the TLS handshake (401 without one, 403 when its operator \
            is unknown, revoked or its role is too low); `/v1/renew` needs the appliance's \
            current certificate."
    ),
    paths(
        crate::http::healthz,
        serve,
        crate::http::enroll::challenge,
        crate::http::enroll::enroll,
        crate::http::enroll::renew,
        crate::http::appliances::fleet_trust,
        crate::http::audit::list,
        crate::http::appliances::register,
        crate::http::appliances::list,
        crate::http::appliances::show,
        crate::http::appliances::disable,
        crate::http::appliances::enable,
        crate::http::appliances::revoke,
        crate::http::appliances::renew,
        crate::http::appliances::create_token,
        crate::http::operators::login,
        crate::http::operators::invite,
        crate::http::operators::list,
        crate::http::operators::revoke,
        crate::http::exec::exec,
        crate::http::brokers::create,
        crate::http::brokers::list,
        crate::http::brokers::enroll,
        crate::http::brokers::renew,
        crate::http::brokers::revoke,
        crate::http::brokers::drain,
        crate::http::control::replicas,
        crate::http::console::login_link,
        crate::http::channel::channel,
        crate::http::tunnels::open,
        crate::http::tunnels::list,
        crate::http::tunnels::show,
        crate::http::tunnels::credential,
        crate::http::tunnels::close,
        crate::http::tunnels::connect,
        crate::http::tunnels::dial_back,
    ),
    components(schemas(tether_api::ErrorBody)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "health", description = "Liveness and this document"),
        (name = "enrollment", description = "Appliance enrollment and renewal"),
        (name = "fleet", description = "Fleet trust summary"),
        (name = "appliances", description = "Appliance lifecycle (operator certificate)"),
        (name = "operators", description = "Operators and their bundles"),
        (name = "audit", description = "The tamper-evident audit log"),
        (name = "brokers", description = "Brokers of the edge cluster: bundles, enrollment, the cluster channel"),
        (name = "console", description = "The web console: single-use sign-in links"),
        (name = "control", description = "Control itself: the live replicas sharing the database"),
        (name = "tunnels", description = "Break-glass tunnels the customer approved: plan, open, the one-time credential, relayed connections, close"),
    )
)]
pub struct ApiDoc;

/// Adds the two `mutualTLS` security schemes.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            OPERATOR_SCHEME,
            SecurityScheme::MutualTls {
                description: Some(
                    "An operator certificate (`spiffe://<trust domain>/operator/<name>`) from \
                     `tether login`, presented in the TLS handshake."
                        .to_owned(),
                ),
                deprecated: None,
                extensions: None,
            },
        );
        components.add_security_scheme(
            APPLIANCE_SCHEME,
            SecurityScheme::MutualTls {
                description: Some(
                    "The appliance's current certificate, presented in the TLS handshake."
                        .to_owned(),
                ),
                deprecated: None,
                extensions: None,
            },
        );
        components.add_security_scheme(
            BROKER_SCHEME,
            SecurityScheme::MutualTls {
                description: Some(
                    "The broker's current certificate (`spiffe://<trust domain>/broker/<name>`), \
                     presented in the TLS handshake."
                        .to_owned(),
                ),
                deprecated: None,
                extensions: None,
            },
        );
    }
}

/// The document as JSON, built once.
pub fn json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the OpenAPI document serializes")
    })
}

/// `GET /openapi.json` (no authentication).
#[utoipa::path(get, path = "/openapi.json", tag = "health", responses(
        (status = 200, description = "this document", content_type = "application/json",
         body = Object),
))]
pub async fn serve() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], json()).into_response()
}
