//! Every reason code Proxi reports, as one enum with a stable wire name.
//!
//! A refusal or failure carries one of these in `reason_code` (REST), in
//! `structuredContent.reason_code` (MCP) and in the audit record. Layers compare
//! [`Reason`] values, or wire text against [`Reason::as_str`], never string literals.

use std::fmt;

use crate::policy::ReasonCode;

/// Why a call was refused or did not produce a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The tool is blocked in every mode.
    AlwaysBlocked,
    /// The current mode blocks the tool.
    BlockedInMode,
    /// No rule of the current mode allows the tool (default deny).
    NotAllowed,
    /// No tool has the name.
    UnknownTool,
    /// An argument breaks one of the mode's constraints.
    ConstraintViolated,
    /// The arguments do not fit the tool's schema.
    InvalidArguments,
    /// The tool name holds control, bidi, zero-width or separator characters.
    InvalidToolName,
    /// The caller is over a rate limit.
    RateLimited,
    /// The request could not be read as a tool call.
    MalformedRequest,
    /// A built-in tool named a service the simulated cloud does not have.
    UnknownService,
    /// A built-in tool named a database the simulated cloud does not have.
    UnknownDatabase,
    /// The upstream's tool ran and reported an error (`isError`), or the upstream
    /// refused the request.
    UpstreamError,
    /// The upstream is down or its connection broke.
    UpstreamUnavailable,
    /// The upstream did not answer within its `call_timeout_seconds`.
    UpstreamTimeout,
    /// The call was cancelled by its caller or by a mode switch.
    Cancelled,
    /// The audit trail cannot record, so nothing runs.
    AuditUnavailable,
    /// The call needs a human's approval first; it did not run.
    ApprovalRequired,
    /// The approval found for the call was given under another policy, or the
    /// approval named belongs to another principal, tool or arguments.
    ApprovalMismatch,
    /// The approval for the call ran out of time before it was used.
    ApprovalExpired,
    /// An operator refused the approval for this exact call.
    ApprovalDenied,
}

impl Reason {
    /// Every reason, for parsing and tests.
    pub const ALL: [Reason; 20] = [
        Reason::AlwaysBlocked,
        Reason::BlockedInMode,
        Reason::NotAllowed,
        Reason::UnknownTool,
        Reason::ConstraintViolated,
        Reason::InvalidArguments,
        Reason::InvalidToolName,
        Reason::RateLimited,
        Reason::MalformedRequest,
        Reason::UnknownService,
        Reason::UnknownDatabase,
        Reason::UpstreamError,
        Reason::UpstreamUnavailable,
        Reason::UpstreamTimeout,
        Reason::Cancelled,
        Reason::AuditUnavailable,
        Reason::ApprovalRequired,
        Reason::ApprovalMismatch,
        Reason::ApprovalExpired,
        Reason::ApprovalDenied,
    ];

    /// The stable snake_case wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::AlwaysBlocked => "always_blocked",
            Reason::BlockedInMode => "blocked_in_mode",
            Reason::NotAllowed => "not_allowed",
            Reason::UnknownTool => "unknown_tool",
            Reason::ConstraintViolated => "constraint_violated",
            Reason::InvalidArguments => "invalid_arguments",
            Reason::InvalidToolName => "invalid_tool_name",
            Reason::RateLimited => "rate_limited",
            Reason::MalformedRequest => "malformed_request",
            Reason::UnknownService => "unknown_service",
            Reason::UnknownDatabase => "unknown_database",
            Reason::UpstreamError => "upstream_error",
            Reason::UpstreamUnavailable => "upstream_unavailable",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::Cancelled => "cancelled",
            Reason::AuditUnavailable => "audit_unavailable",
            Reason::ApprovalRequired => "approval_required",
            Reason::ApprovalMismatch => "approval_mismatch",
            Reason::ApprovalExpired => "approval_expired",
            Reason::ApprovalDenied => "approval_denied",
        }
    }

    /// The reason with this wire name, if any.
    pub fn parse(wire: &str) -> Option<Reason> {
        Reason::ALL
            .into_iter()
            .find(|reason| reason.as_str() == wire)
    }

    /// Whether `wire` (a `reason_code` as received) names this reason.
    pub fn is(self, wire: Option<&str>) -> bool {
        wire == Some(self.as_str())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<ReasonCode> for Reason {
    fn from(code: ReasonCode) -> Reason {
        match code {
            ReasonCode::AlwaysBlocked => Reason::AlwaysBlocked,
            ReasonCode::BlockedInMode => Reason::BlockedInMode,
            ReasonCode::NotAllowed => Reason::NotAllowed,
            ReasonCode::UnknownTool => Reason::UnknownTool,
            ReasonCode::ConstraintViolated => Reason::ConstraintViolated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_unique_and_round_trip() {
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
            assert_eq!(reason.to_string(), reason.as_str());
        }
        let mut names: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
        assert_eq!(Reason::parse("no_such_reason"), None);
    }

    #[test]
    fn policy_reason_codes_keep_their_wire_names() {
        for code in [
            ReasonCode::AlwaysBlocked,
            ReasonCode::BlockedInMode,
            ReasonCode::NotAllowed,
            ReasonCode::UnknownTool,
            ReasonCode::ConstraintViolated,
        ] {
            assert_eq!(Reason::from(code).as_str(), code.as_str());
        }
    }
}
