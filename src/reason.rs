//! Every reason code Proxi reports, as one enum with a stable wire name.
//!
//! A refusal or failure carries one of these in `reason_code` (REST), in
//! `structuredContent.reason_code` (MCP) and in the audit record. Layers compare
//! [`Reason`] values, or wire text against [`Reason::as_str`], never string literals.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    /// A request came without a bearer token (refused at the edge).
    MissingToken,
    /// The bearer token, or the token given to the console, is not valid.
    InvalidToken,
    /// A valid token asked for what its role may not do (an agent token at an
    /// operator endpoint or at the console login).
    Forbidden,
    /// An MCP request named a session that another token opened.
    ForeignSession,
    /// MCP sessions are being opened too fast for this token.
    SessionRateLimited,
    /// This token already holds the most MCP sessions one token may.
    SessionLimitPrincipal,
    /// The server holds the most MCP sessions it allows, all tokens together.
    SessionLimitTotal,
    /// The token names a principal, but the registry of named principals cannot
    /// be trusted (its signature does not check out), so no named token is accepted.
    RegistryUntrusted,
    /// A policy reload was refused: the new file failed its checks, and the old
    /// policy stays in force.
    PolicyRefused,
    /// A guard's cooldown: the tool ran for this value too recently.
    Cooldown,
    /// A guard's `max_step`: the change is larger than one call may make.
    StepTooLarge,
    /// A guard's `requires_prior`: the caller did not run the prior tool first.
    RequiresPrior,
    /// The call needs a human's approval first; it did not run.
    ApprovalRequired,
    /// The approval found for the call was given under another policy, or the
    /// approval named belongs to another principal, tool or arguments.
    ApprovalMismatch,
    /// The approval for the call ran out of time before it was used.
    ApprovalExpired,
    /// An operator refused the approval for this exact call.
    ApprovalDenied,
    /// The shared mode (several instances on one store) changed between the
    /// call's decision and its record: the call was refused, not run.
    ModeChanged,
}

impl Reason {
    /// Every reason, for parsing and tests.
    pub const ALL: [Reason; 33] = [
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
        Reason::MissingToken,
        Reason::InvalidToken,
        Reason::Forbidden,
        Reason::ForeignSession,
        Reason::SessionRateLimited,
        Reason::SessionLimitPrincipal,
        Reason::SessionLimitTotal,
        Reason::RegistryUntrusted,
        Reason::PolicyRefused,
        Reason::Cooldown,
        Reason::StepTooLarge,
        Reason::RequiresPrior,
        Reason::ApprovalRequired,
        Reason::ApprovalMismatch,
        Reason::ApprovalExpired,
        Reason::ApprovalDenied,
        Reason::ModeChanged,
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
            Reason::MissingToken => "missing_token",
            Reason::InvalidToken => "invalid_token",
            Reason::Forbidden => "forbidden",
            Reason::ForeignSession => "foreign_session",
            Reason::SessionRateLimited => "session_rate_limited",
            Reason::SessionLimitPrincipal => "session_limit_principal",
            Reason::SessionLimitTotal => "session_limit_total",
            Reason::RegistryUntrusted => "registry_untrusted",
            Reason::PolicyRefused => "policy_refused",
            Reason::Cooldown => "cooldown",
            Reason::StepTooLarge => "step_too_large",
            Reason::RequiresPrior => "requires_prior",
            Reason::ApprovalRequired => "approval_required",
            Reason::ApprovalMismatch => "approval_mismatch",
            Reason::ApprovalExpired => "approval_expired",
            Reason::ApprovalDenied => "approval_denied",
            Reason::ModeChanged => "mode_changed",
        }
    }

    /// The reason with this wire name, if any.
    pub fn parse(wire: &str) -> Option<Reason> {
        Reason::ALL
            .into_iter()
            .find(|reason| reason.as_str() == wire)
    }

    /// Whether the reason is about a human's approval (`approval_*`).
    pub fn is_approval(self) -> bool {
        matches!(
            self,
            Reason::ApprovalRequired
                | Reason::ApprovalMismatch
                | Reason::ApprovalExpired
                | Reason::ApprovalDenied
        )
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

// By hand rather than derived, so the wire name stays written once, in
// `as_str`: a `rename_all` could drift from the table the rest of Proxi uses.
impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Reason, D::Error> {
        let wire = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Reason::parse(&wire)
            .ok_or_else(|| serde::de::Error::custom(format_args!("unknown reason code `{}`", wire)))
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
    fn edge_refusals_keep_the_names_already_in_trails() {
        // These were written as literals before they became reasons; old
        // records and `audit tail --reason-code` filters use these names.
        for (reason, name) in [
            (Reason::MissingToken, "missing_token"),
            (Reason::InvalidToken, "invalid_token"),
            (Reason::Forbidden, "forbidden"),
            (Reason::ForeignSession, "foreign_session"),
            (Reason::SessionRateLimited, "session_rate_limited"),
            (Reason::SessionLimitPrincipal, "session_limit_principal"),
            (Reason::SessionLimitTotal, "session_limit_total"),
            (Reason::RegistryUntrusted, "registry_untrusted"),
        ] {
            assert_eq!(reason.as_str(), name);
        }
    }

    #[test]
    fn every_wire_name_round_trips_through_serde() {
        for reason in Reason::ALL {
            let json = serde_json::to_value(reason).unwrap();
            assert_eq!(json, serde_json::Value::String(reason.as_str().to_owned()));
            assert_eq!(serde_json::from_value::<Reason>(json).unwrap(), reason);
        }
        assert!(serde_json::from_str::<Reason>("\"no_such_reason\"").is_err());
        assert!(serde_json::from_str::<Reason>("3").is_err());
    }

    #[test]
    fn policy_denials_keep_the_names_already_in_trails() {
        // The policy's own reasons, once a second enum with a table of its own:
        // stored records and `--reason-code` filters use these names.
        for (reason, name) in [
            (Reason::AlwaysBlocked, "always_blocked"),
            (Reason::BlockedInMode, "blocked_in_mode"),
            (Reason::NotAllowed, "not_allowed"),
            (Reason::UnknownTool, "unknown_tool"),
            (Reason::ConstraintViolated, "constraint_violated"),
        ] {
            assert_eq!(reason.as_str(), name);
        }
    }
}
