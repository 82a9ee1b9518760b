//! `POST /v1/appliances/{id}/exec`: the request, and the NDJSON lines of the streamed
//! answer.

use serde::{Deserialize, Serialize};
use tether_proto::{CommandFailure, OutputStream};

/// Body of `POST /v1/appliances/{id}/exec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments (no shell unless `kind` is `shell`).
    pub argv: Vec<String>,
    /// Deadline in milliseconds (default 60000, at most 3600000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// `exec` (default) or `shell`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Environment variable names the command may inherit from the agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_allowlist: Vec<String>,
    /// Signed operations: the customer's approval document, its exact bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    /// Signed operations: the approval's SSHSIG armor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_sig: Option<String>,
    /// Signed operations: the vendor's request id (at most 64 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Signed operations: why (a ticket, an incident; at most 1,024 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Signed operations: run nothing; the appliance answers the approval document to
    /// sign (a `plan` line).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plan: bool,
}

/// One NDJSON line of the answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecLine {
    /// The command was sent to this broker.
    Started {
        /// Broker name.
        broker: String,
    },
    /// Output.
    Output {
        /// `stdout` or `stderr`.
        #[cfg_attr(feature = "openapi", schema(value_type = String))]
        stream: OutputStream,
        /// Base64.
        data: String,
    },
    /// Signed operations: the appliance's signed manifest (before the last line).
    Manifest {
        /// The manifest's exact bytes (canonical JSON).
        manifest: String,
        /// Its SSHSIG armor (namespace `tether-manifest-v1`).
        sig: String,
    },
    /// Signed operations: the approval document the appliance expects (a plan request).
    Plan {
        /// Whether the command's phase needs an approval.
        approval_required: bool,
        /// The document (canonical JSON) for the customer to sign.
        document: String,
    },
    /// Exit code.
    Exit {
        /// The command's exit code.
        code: i32,
    },
    /// Ended without an exit code.
    Failed {
        /// Why: a [`CommandFailure`] name (`offline`, `timed_out`, `connection_lost`,
        /// `broker_lost`, `cancelled`, ...); `tether exec` maps it to its exit code with
        /// [`CommandFailure::exit_code`].
        #[cfg_attr(feature = "openapi", schema(value_type = String))]
        code: CommandFailure,
        /// Detail.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_request_names_only_what_is_set() {
        let r = ExecRequest {
            argv: vec!["true".into()],
            timeout_ms: Some(5000),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"argv":["true"],"timeout_ms":5000}"#
        );
    }

    #[test]
    fn lines_are_tagged_by_type() {
        let l = ExecLine::Failed {
            code: CommandFailure::TimedOut,
            message: "m".into(),
        };
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            r#"{"type":"failed","code":"timed_out","message":"m"}"#
        );
    }
}
