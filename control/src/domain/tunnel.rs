//! Break-glass tunnels: what control checks before it relays a request (sizes and
//! ranges; the appliance decides everything else), and how it names the appliance's
//! refusals.

use tether_api::tunnels::TunnelRequest;
use tether_proto::frame::{
    MAX_APPROVAL_LEN, MAX_APPROVAL_SIG_LEN, MAX_MESSAGE_LEN, MAX_REQUEST_ID_LEN,
};
use tether_proto::tunnel::{MAX_NAME_LEN, MAX_RECIPIENT_LEN};
use tether_proto::{cluster, CommandFailure, TunnelCloseReason};

use super::{Error, ErrorKind};

/// Longest session control relays: 24 h (the appliance's policy caps it further).
pub const MAX_DURATION_S: u32 = 24 * 3600;
/// Connections at once when the request does not say.
pub const DEFAULT_MAX_CONNECTIONS: u16 = 4;

/// Check a tunnel request and make the message the broker relays; else 400
/// `invalid_tunnel` naming the field.
pub fn check_request(req: TunnelRequest) -> Result<cluster::TunnelRequest, Error> {
    let bad = |m: String| Error::new(ErrorKind::BadRequest, "invalid_tunnel", m);
    let text = |field: &str, v: &str, max: usize| {
        if v.is_empty() || v.len() > max {
            Err(bad(format!("{field} must be 1 to {max} bytes")))
        } else {
            Ok(())
        }
    };
    text("request_id", &req.request_id, MAX_REQUEST_ID_LEN)?;
    text("reason", &req.reason, MAX_MESSAGE_LEN)?;
    text("resource", &req.resource, MAX_NAME_LEN)?;
    text("privilege", &req.privilege, MAX_NAME_LEN)?;
    if req.duration_s == 0 || req.duration_s > MAX_DURATION_S {
        return Err(bad(format!("duration_s must be 1 to {MAX_DURATION_S}")));
    }
    let max_connections = req.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        return Err(bad("max_connections must be at least 1".into()));
    }
    let idle_timeout_s = req.idle_timeout_s.unwrap_or(req.duration_s);
    if idle_timeout_s == 0 || idle_timeout_s > req.duration_s {
        return Err(bad("idle_timeout_s must be 1 to duration_s".into()));
    }
    if req.recipient.len() > MAX_RECIPIENT_LEN {
        return Err(bad(format!(
            "recipient must be at most {MAX_RECIPIENT_LEN} bytes"
        )));
    }
    let approval = req.approval.unwrap_or_default();
    let approval_sig = req.approval_sig.unwrap_or_default();
    if approval.len() > MAX_APPROVAL_LEN || approval_sig.len() > MAX_APPROVAL_SIG_LEN {
        return Err(bad(format!(
            "approval must be at most {MAX_APPROVAL_LEN} bytes and approval_sig at most {MAX_APPROVAL_SIG_LEN}"
        )));
    }
    if !req.plan && (approval.is_empty() || approval_sig.is_empty()) {
        return Err(bad(
            "an open needs the customer's approval and its signature (ask for a plan first)".into(),
        ));
    }
    Ok(cluster::TunnelRequest {
        request_id: req.request_id,
        reason: req.reason,
        resource: req.resource,
        privilege: req.privilege,
        duration_s: req.duration_s,
        max_connections,
        idle_timeout_s,
        recipient: req.recipient,
        approval,
        approval_sig,
        plan: req.plan,
    })
}

/// The error for an appliance that refused or ended a session at once: 403 with the
/// signed-ops reason (`approval_invalid`, `approval_replayed`, `denied_by_policy`, ...)
/// when it refused, else 409 with the close reason (`limit`, `not_active`, ...).
pub fn refusal(reason: &str, code: &str, message: &str) -> Error {
    if reason == TunnelCloseReason::Refused.as_str() {
        if CommandFailure::from_name(code) == Some(CommandFailure::Invalid) {
            // A malformed request (e.g. a recipient for a privilege that mints nothing):
            // the caller's to fix, and `tether tunnel request` asks again without one.
            return Error::new(
                ErrorKind::BadRequest,
                CommandFailure::Invalid.name(),
                message.to_owned(),
            );
        }
        let code = CommandFailure::from_name(code)
            .filter(|c| CommandFailure::SIGNED_OPS_REFUSALS.contains(c))
            .map_or("refused", CommandFailure::name);
        return Error::new(ErrorKind::Forbidden, code, message.to_owned());
    }
    let code = TunnelCloseReason::ALL
        .iter()
        .find(|r| r.as_str() == reason)
        .map_or("refused", |r| r.as_str());
    Error::new(ErrorKind::Conflict, code, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> TunnelRequest {
        TunnelRequest {
            request_id: "r1".into(),
            reason: "INC-1".into(),
            resource: "db".into(),
            privilege: "read".into(),
            duration_s: 600,
            plan: true,
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_bounded() {
        let ok = check_request(req()).unwrap();
        assert_eq!((ok.max_connections, ok.idle_timeout_s), (4, 600));
        for bad in [
            TunnelRequest {
                duration_s: 0,
                ..req()
            },
            TunnelRequest {
                duration_s: MAX_DURATION_S + 1,
                ..req()
            },
            TunnelRequest {
                resource: String::new(),
                ..req()
            },
            TunnelRequest {
                privilege: "p".repeat(65),
                ..req()
            },
            TunnelRequest {
                idle_timeout_s: Some(601),
                ..req()
            },
            TunnelRequest {
                max_connections: Some(0),
                ..req()
            },
            TunnelRequest {
                plan: false,
                ..req()
            },
        ] {
            assert_eq!(check_request(bad).unwrap_err().code, "invalid_tunnel");
        }
    }

    #[test]
    fn refusals_keep_the_appliances_reason_from_a_bounded_set() {
        let e = refusal("refused", "approval_replayed", "used");
        assert_eq!(
            (e.kind, e.code),
            (ErrorKind::Forbidden, "approval_replayed")
        );
        let e = refusal("refused", "invalid", "a recipient but nothing to seal");
        assert_eq!((e.kind, e.code), (ErrorKind::BadRequest, "invalid"));
        let e = refusal("refused", "made_up", "x");
        assert_eq!(e.code, "refused");
        let e = refusal("limit", "", "too many");
        assert_eq!((e.kind, e.code), (ErrorKind::Conflict, "limit"));
    }
}
