//! Break-glass tunnels: `POST /v1/appliances/{id}/tunnels` (plan or open), `GET
//! /v1/tunnels`, `GET /v1/tunnels/{id}`, `POST /v1/tunnels/{id}/credential`, `DELETE
//! /v1/tunnels/{id}`, and the relayed connections of `GET /v1/tunnels/{id}/connect`
//! (upgrade `tether-tunnel/1`, see `tether_proto::relay`).

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/appliances/{id}/tunnels`: what the vendor asks for by the customer's
/// names, and for an open the customer's approval. The appliance re-derives everything
/// else (target, phase, credential commands) from its own policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TunnelRequest {
    /// The vendor's request id (1-64 bytes).
    pub request_id: String,
    /// Why (a ticket, an incident; at most 1,024 bytes).
    pub reason: String,
    /// The resource, by the customer's name for it.
    pub resource: String,
    /// The privilege, by the customer's name for it.
    pub privilege: String,
    /// Session length from activation, in seconds (1 s to 24 h; the appliance caps it).
    pub duration_s: u32,
    /// Most TCP connections open at once (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u16>,
    /// Idle limit of each connection in seconds (default: the whole duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u32>,
    /// The operator's one-time `age` public key the credential is sealed to (`""`: none).
    #[serde(default)]
    pub recipient: String,
    /// The customer's approval document, its exact bytes (absent for a plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    /// Its SSHSIG armor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_sig: Option<String>,
    /// Open nothing: answer the approval document the appliance expects.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plan: bool,
}

/// Answer of a plan: the approval document to sign.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TunnelPlan {
    /// The document's exact bytes (canonical JSON).
    pub document: String,
    /// The broker that asked the appliance.
    pub broker: String,
}

/// A tunnel session as control knows it (the answer of an open, and the items of `GET
/// /v1/tunnels`). Never holds a credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TunnelSession {
    /// Control's id of the session (what `tether tunnel credential|close` name).
    pub id: String,
    /// The appliance.
    pub appliance: String,
    /// The broker that opened it.
    pub broker: String,
    /// The operator who opened it (only they may connect or fetch the credential).
    pub operator: String,
    /// The vendor's request id.
    pub request_id: String,
    /// Why.
    pub reason: String,
    /// The resource.
    pub resource: String,
    /// The privilege.
    pub privilege: String,
    /// The agent's session id.
    pub session_id: u64,
    /// When it was opened (Unix seconds, control's clock).
    pub opened_at: i64,
    /// When the agent's own timer ends it (ms since the epoch, the appliance's clock).
    pub expires_at_ms: i64,
    /// `active` or `ended`.
    pub state: String,
    /// Why it ended (`expired`, `revoked`, `customer_ended`, `closed`, `disconnected`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// Whether the appliance minted a credential for it.
    pub credential: bool,
    /// Whether that credential was fetched (it can be fetched once).
    pub credential_fetched: bool,
    /// Connections relayed so far.
    pub connections: u64,
    /// Bytes relayed from the operator toward the target.
    pub bytes_up: u64,
    /// Bytes relayed from the target toward the operator.
    pub bytes_down: u64,
}

/// `GET /v1/tunnels`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TunnelList {
    /// Live sessions first, then the most recently ended.
    pub items: Vec<TunnelSession>,
}

/// `POST /v1/tunnels/{id}/credential`: the credential, still sealed to the operator's
/// one-time key. Answered once; control keeps no copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SealedCredential {
    /// The session.
    pub id: String,
    /// The one-time public key it is sealed to (from the approval).
    pub recipient: String,
    /// The `age` ciphertext, standard base64.
    pub sealed: String,
}
