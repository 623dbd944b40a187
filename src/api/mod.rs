//! Wire types: the JSON shapes of the REST API, the console's API and the MCP
//! resources, shared by the server and its clients (`src/client.rs`, the agent).
//!
//! Domain types (the gateway's [`crate::gateway::PolicyStatus`], the catalog's
//! [`crate::catalog::CatalogEntry`], the trail's [`crate::audit::AuditRecord`])
//! are not serialized to clients themselves: each has a wire type here that
//! converts from it (`From`), so a change inside the gateway cannot change what
//! clients receive, and what clients receive never decides what is stored.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod audit;
mod catalog;
mod status;

pub use audit::{AuditPage, AuditRecord};
pub use catalog::{Catalog, CatalogEntry};
pub use status::PolicyStatus;

pub use crate::infra::{INITIAL_SERVICES, InfrastructureStatus};
pub use crate::mcp::{META_AUDIT_SEQ as MCP_META_AUDIT_SEQ, META_MODE as MCP_META_MODE};
pub use crate::reason::Reason;

/// Largest request body the server reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most audit records one `GET /audit` returns.
pub const MAX_AUDIT_LIMIT: u32 = 1000;
/// Records `GET /audit` returns when no limit is given.
pub const DEFAULT_AUDIT_LIMIT: u32 = 50;

/// `GET /`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Always `ok` when the server answers.
    pub status: String,
    /// The mode in force.
    pub mode: String,
    /// Proxi's version.
    pub version: String,
}

/// `POST /tools/execute` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    /// The tool to run.
    pub tool_name: String,
    /// Its arguments (an object; omitted means none).
    #[serde(default)]
    pub arguments: Value,
    /// Free-form caller context, accepted for seed compatibility and not interpreted.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub context: Map<String, Value>,
    /// For a call that needs a human's approval: how long to hold the request
    /// until an operator decides (at most [`MAX_APPROVAL_WAIT_SECONDS`]), then run
    /// or refuse it. Absent: answer 202 at once, and the client retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_approval_seconds: Option<u64>,
}

/// Longest `wait_for_approval_seconds` a request may ask for.
pub const MAX_APPROVAL_WAIT_SECONDS: u64 = 300;

/// `POST /tools/execute` answer (the seed's shape plus diagnostic fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolResponse {
    /// Whether the tool ran and succeeded.
    pub success: bool,
    /// The tool's result when it succeeded.
    pub result: Option<Value>,
    /// What went wrong otherwise.
    pub error: Option<String>,
    /// Whether the policy refused the call.
    pub policy_violation: bool,
    /// The policy's explanation of a refusal.
    pub blocked_reason: Option<String>,
    /// Machine-readable reason: a policy reason code, `invalid_arguments` or a tool error code.
    pub reason_code: Option<String>,
    /// The tool as requested.
    pub tool: String,
    /// The mode the call was decided in.
    pub mode: String,
    /// A concrete next step after a refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub how_to_proceed: Option<String>,
    /// For an unknown tool, the tools that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_tools: Option<Vec<String>>,
    /// The call's sequence number in the audit trail.
    pub audit_seq: u64,
    /// For a call refused by a rate limit (`reason_code: "rate_limited"`), the
    /// seconds to wait before retrying; also sent as the `Retry-After` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// Whether the call needs a human's approval (`reason_code` `approval_*`); it did not run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approval_required: bool,
    /// The pending approval the identical call waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// When that approval lapses (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// `POST /policy/set-mode` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetModeRequest {
    /// Target mode, e.g. `EMERGENCY`.
    pub mode: String,
    /// Why (required for elevated modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long an elevated mode lasts (default 900, capped by the policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// `POST /infrastructure/simulate-incident` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentRequest {
    /// The service to break.
    #[serde(default = "default_incident_service")]
    pub service: String,
    /// `degraded` or `critical`.
    #[serde(default = "default_incident_status")]
    pub status: String,
}

impl Default for IncidentRequest {
    fn default() -> Self {
        IncidentRequest {
            service: default_incident_service(),
            status: default_incident_status(),
        }
    }
}

fn default_incident_service() -> String {
    "web-server".to_owned()
}

fn default_incident_status() -> String {
    "critical".to_owned()
}

/// `POST /infrastructure/simulate-incident` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IncidentResponse {
    /// Always true on a 200.
    pub success: bool,
    /// What was done.
    pub message: String,
    /// The infrastructure afterwards.
    pub infrastructure: InfrastructureStatus,
}

/// The answer to `POST /policy/set-mode`: the policy state after the change and,
/// when the switch had to wait for upstream calls the new mode denies, what
/// became of them (absent when there were none, so the shape is the status's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetModeResponse {
    /// The policy state after the change.
    #[serde(flatten)]
    pub status: PolicyStatus,
    /// Calls that finished within `drain_timeout_seconds`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drained: Vec<crate::mode::DrainedCall>,
    /// Calls still running at the timeout, cancelled and recorded as `cancelled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cancelled: Vec<crate::mode::DrainedCall>,
}

/// Every 4xx/5xx body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, safe to show.
    pub error: String,
}

pub use crate::approval::{Approval, ApprovalStatus};

/// `GET /approvals` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApprovalList {
    /// Number of approvals returned.
    pub count: usize,
    /// The approvals, newest first.
    pub approvals: Vec<Approval>,
}

/// `POST /approvals/{id}/approve` and `/deny` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalDecisionRequest {
    /// Why the operator decides so (required, at most 500 characters); recorded.
    pub reason: String,
}

/// Helpers for the wire-shape tests of the submodules.
#[cfg(test)]
pub(crate) mod wire_tests {
    use std::fmt;

    use serde::Deserializer as _;
    use serde::de::{IgnoredAny, MapAccess, Visitor};

    /// The keys of the JSON object `text`, in the order they were written:
    /// `serde_json::Value` sorts its keys, and clients may depend on the order.
    pub(crate) fn keys_in_order(text: &str) -> Vec<String> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = Vec<String>;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(keys)
            }
        }
        serde_json::Deserializer::from_str(text)
            .deserialize_map(Keys)
            .unwrap()
    }
}
