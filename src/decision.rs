//! The decision on one tool call, as a pure function that every caller shares:
//! [`crate::gateway::Gateway::execute`] runs what it allows, and
//! `proxi policy explain` prints it, so the two can never disagree.
//!
//! Order: the tool's name, then the tool-level rules (always_blocked, the mode's
//! blocked_tools, its allowed_tools), then the tool's argument schema, then the
//! mode's argument constraints. Tool-level rules come before the schema so that a
//! tool the mode forbids is refused as forbidden whatever arguments it was sent.

use serde_json::Value;

use crate::audit::AuditDecision;
use crate::policy::{Decision, Denial, ModeId, PolicyEngine, ReasonCode};
use crate::tools::{ArgumentError, ToolCall, ToolName};

/// Reason code of arguments that do not match the tool's JSON Schema.
pub const INVALID_ARGUMENTS: &str = "invalid_arguments";

/// A tool call with its arguments already checked against the schema.
///
/// Checking needs no mode, so [`crate::gateway::Gateway::execute`] does it before
/// taking the mode lock and decides with [`ParsedCall::decide`] under the lock.
#[derive(Clone, Debug, PartialEq)]
pub enum ParsedCall {
    /// No tool has the requested name.
    UnknownTool,
    /// A known tool, and whether its arguments fit its schema.
    Known {
        /// The tool asked for.
        tool: ToolName,
        /// The typed call, or why the arguments were refused.
        call: Result<ToolCall, ArgumentError>,
    },
}

impl ParsedCall {
    /// Looks the tool up and checks `arguments` against its schema.
    pub fn parse(tool_name: &str, arguments: &Value) -> ParsedCall {
        match ToolName::parse(tool_name) {
            None => ParsedCall::UnknownTool,
            Some(tool) => ParsedCall::Known {
                tool,
                call: ToolCall::parse(tool, arguments),
            },
        }
    }

    /// Decides the call in `mode`; see the module documentation for the order.
    pub fn decide(self, policy: &PolicyEngine, mode: ModeId) -> Verdict {
        let (tool, call) = match self {
            ParsedCall::UnknownTool => return Verdict::UnknownTool,
            ParsedCall::Known { tool, call } => (tool, call),
        };
        if let Decision::Deny(denial) = policy.decide_tool(mode, tool) {
            return Verdict::Deny(denial);
        }
        match call {
            Err(error) => Verdict::InvalidArguments(error),
            Ok(call) => match policy.decide(mode, &call) {
                Decision::Allow => Verdict::Allow(call),
                Decision::Deny(denial) => Verdict::Deny(denial),
            },
        }
    }
}

/// How one tool call is decided, before anything runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The policy allows the call; this is the typed call to run.
    Allow(ToolCall),
    /// The policy refuses the call.
    Deny(Denial),
    /// No tool has the requested name; refused before any policy rule applies.
    UnknownTool,
    /// The tool is permitted in the mode but the arguments do not fit its schema.
    InvalidArguments(ArgumentError),
}

impl Verdict {
    /// How the audit trail classifies the decision: `allowed`, `denied` or `rejected`.
    pub fn audit_decision(&self) -> AuditDecision {
        match self {
            Verdict::Allow(_) => AuditDecision::Allowed,
            Verdict::Deny(_) => AuditDecision::Denied,
            Verdict::UnknownTool | Verdict::InvalidArguments(_) => AuditDecision::Rejected,
        }
    }

    /// The reason code callers see, or `None` for an allowed call.
    pub fn reason_code(&self) -> Option<&'static str> {
        match self {
            Verdict::Allow(_) => None,
            Verdict::Deny(denial) => Some(denial.reason.as_str()),
            Verdict::UnknownTool => Some(ReasonCode::UnknownTool.as_str()),
            Verdict::InvalidArguments(_) => Some(INVALID_ARGUMENTS),
        }
    }
}

/// Decides `tool_name(arguments)` in `mode`: [`ParsedCall::parse`] then
/// [`ParsedCall::decide`], the same two steps the gateway takes.
pub fn decide_call(
    policy: &PolicyEngine,
    mode: ModeId,
    tool_name: &str,
    arguments: &Value,
) -> Verdict {
    ParsedCall::parse(tool_name, arguments).decide(policy, mode)
}

/// How the policy treats a tool in a mode, whatever its arguments.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolVerdict {
    /// The tool may run in the mode, for arguments that fit its schema and meet
    /// these constraints (sentences, possibly none).
    Allowed {
        /// The mode's argument constraints on the tool.
        constraints: Vec<String>,
    },
    /// The tool may not run in the mode, whatever its arguments.
    Denied(Denial),
    /// No tool has that name.
    UnknownTool,
}

/// Decides a tool in `mode` without arguments: the question "may this tool run
/// now, and under which constraints", answered by the same tool-level rules that
/// [`ParsedCall::decide`] applies first.
pub fn decide_tool(policy: &PolicyEngine, mode: ModeId, tool_name: &str) -> ToolVerdict {
    let Some(tool) = ToolName::parse(tool_name) else {
        return ToolVerdict::UnknownTool;
    };
    match policy.decide_tool(mode, tool) {
        Decision::Deny(denial) => ToolVerdict::Denied(denial),
        Decision::Allow => ToolVerdict::Allowed {
            constraints: policy.constraints_on(mode, tool),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shipped() -> PolicyEngine {
        PolicyEngine::from_json(
            include_str!("../policies/ops_policy.json"),
            "ops_policy.json",
        )
        .expect("the shipped policy is valid")
    }

    fn mode(engine: &PolicyEngine, name: &str) -> ModeId {
        engine.mode_id(name).expect("the mode exists")
    }

    fn reason(verdict: &Verdict) -> Option<&'static str> {
        verdict.reason_code()
    }

    #[test]
    fn tool_level_rules_come_before_the_argument_schema() {
        let engine = shipped();
        let normal = mode(&engine, "NORMAL");
        let emergency = mode(&engine, "EMERGENCY");
        // A forbidden tool is refused as forbidden, however wrong its arguments.
        let blocked = decide_call(&engine, normal, "restart_service", &json!({}));
        assert_eq!(reason(&blocked), Some("blocked_in_mode"));
        assert_eq!(blocked.audit_decision(), AuditDecision::Denied);
        let always = decide_call(&engine, emergency, "delete_database", &json!({"x": 1}));
        assert_eq!(reason(&always), Some("always_blocked"));
        // A permitted tool with bad arguments is rejected before its constraints.
        let invalid = decide_call(&engine, emergency, "scale_fleet", &json!({"count": -1}));
        assert_eq!(reason(&invalid), Some(INVALID_ARGUMENTS));
        assert_eq!(invalid.audit_decision(), AuditDecision::Rejected);
        let over = decide_call(&engine, emergency, "scale_fleet", &json!({"count": 50}));
        assert_eq!(reason(&over), Some("constraint_violated"));
        let ok = decide_call(&engine, emergency, "scale_fleet", &json!({"count": 5}));
        assert_eq!(ok, Verdict::Allow(ToolCall::ScaleFleet { count: 5 }));
        assert_eq!(ok.audit_decision(), AuditDecision::Allowed);
    }

    #[test]
    fn unknown_tools_are_rejected_in_every_mode() {
        let engine = shipped();
        for (id, _) in engine.modes() {
            let verdict = decide_call(&engine, id, "summon_root", &json!({}));
            assert_eq!(verdict, Verdict::UnknownTool);
            assert_eq!(verdict.audit_decision(), AuditDecision::Rejected);
            assert_eq!(reason(&verdict), Some("unknown_tool"));
            assert_eq!(
                decide_tool(&engine, id, "summon_root"),
                ToolVerdict::UnknownTool
            );
        }
    }

    #[test]
    fn a_tool_alone_is_decided_by_the_tool_level_rules_with_its_constraints() {
        let engine = shipped();
        let normal = mode(&engine, "NORMAL");
        let emergency = mode(&engine, "EMERGENCY");
        assert_eq!(
            decide_tool(&engine, emergency, "scale_fleet"),
            ToolVerdict::Allowed {
                constraints: vec!["`count` must be between 1 and 10".to_owned()]
            }
        );
        assert_eq!(
            decide_tool(&engine, normal, "list_services"),
            ToolVerdict::Allowed {
                constraints: Vec::new()
            }
        );
        let ToolVerdict::Denied(denial) = decide_tool(&engine, normal, "restart_service") else {
            panic!("restart_service is blocked in NORMAL");
        };
        assert_eq!(denial.reason, ReasonCode::BlockedInMode);
        let ToolVerdict::Denied(denial) = decide_tool(&engine, emergency, "delete_database") else {
            panic!("delete_database is always blocked");
        };
        assert_eq!(denial.reason, ReasonCode::AlwaysBlocked);
    }

    #[test]
    fn the_tool_alone_agrees_with_every_full_call_on_the_tool_level_rules() {
        let engine = shipped();
        for (id, _) in engine.modes() {
            for tool in ToolName::ALL {
                let alone = decide_tool(&engine, id, tool.as_str());
                for arguments in [
                    json!({}),
                    json!({"count": 2}),
                    json!({"service_name": "db"}),
                ] {
                    let full = decide_call(&engine, id, tool.as_str(), &arguments);
                    match (&alone, &full) {
                        (ToolVerdict::Denied(a), Verdict::Deny(b)) => assert_eq!(a, b),
                        (ToolVerdict::Allowed { .. }, full) => assert!(
                            !matches!(full, Verdict::Deny(d) if d.reason != ReasonCode::ConstraintViolated),
                            "{tool} {arguments}: {full:?}"
                        ),
                        (alone, full) => panic!("{tool} {arguments}: {alone:?} vs {full:?}"),
                    }
                }
            }
        }
    }
}
