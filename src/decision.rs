//! The decision on one tool call, as a pure function that every caller shares:
//! [`crate::gateway::Gateway::execute`] runs what it allows, and
//! `proxi policy explain` prints it, so the two can never disagree.
//!
//! Order: the tool's name, then the tool-level rules (always_blocked, the mode's
//! blocked_tools, its allowed_tools), then the tool's argument schema, then the
//! mode's argument constraints. Tool-level rules come before the schema so that a
//! tool the mode forbids is refused as forbidden whatever arguments it was sent.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::audit::AuditDecision;
use crate::catalog::{ToolId, ToolOrigin};
use crate::policy::{CallArguments, Decision, Denial, ModeId, PolicyEngine};
use crate::reason::Reason;
use crate::tools::{ArgumentError, ToolCall, json_type_name};

/// Arguments refused before any constraint: they do not fit the tool's schema.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid arguments for {tool}: {message}")]
pub struct InvalidArguments {
    /// The tool's exposed name.
    pub tool: Arc<str>,
    /// What is wrong, for the caller.
    pub message: String,
}

impl From<ArgumentError> for InvalidArguments {
    fn from(error: ArgumentError) -> InvalidArguments {
        InvalidArguments {
            tool: Arc::from(error.tool.as_str()),
            message: error.message,
        }
    }
}

/// A call's arguments once they fit the tool's schema.
#[derive(Clone, Debug, PartialEq)]
pub enum ParsedArguments {
    /// A built-in's typed call.
    Builtin(ToolCall),
    /// An upstream tool's arguments, valid against its `inputSchema`.
    Upstream(Map<String, Value>),
}

/// A tool call with its arguments already checked against the schema.
///
/// Checking needs no mode, so [`crate::gateway::Gateway::execute`] does it before
/// taking the mode lock and decides with [`ParsedCall::decide`] under the lock.
/// Both steps must use the same [`PolicyEngine`] (one catalog binding): the
/// tool id is only meaningful in it.
#[derive(Clone, Debug, PartialEq)]
pub enum ParsedCall {
    /// No tool has the requested name.
    UnknownTool,
    /// A known tool, and whether its arguments fit its schema.
    Known {
        /// The tool asked for.
        tool: ToolId,
        /// The checked arguments, or why they were refused.
        call: Result<ParsedArguments, InvalidArguments>,
    },
}

impl ParsedCall {
    /// Looks the tool up in `policy`'s catalog and checks `arguments` against its
    /// schema: a built-in's typed parser, or an upstream tool's compiled `inputSchema`.
    pub fn parse(policy: &PolicyEngine, tool_name: &str, arguments: &Value) -> ParsedCall {
        let Some(tool) = policy.catalog().lookup(tool_name) else {
            return ParsedCall::UnknownTool;
        };
        let entry = policy.catalog().tool(tool);
        let call = match entry.origin() {
            ToolOrigin::Builtin(builtin) => ToolCall::parse(*builtin, arguments)
                .map(ParsedArguments::Builtin)
                .map_err(InvalidArguments::from),
            ToolOrigin::Upstream { .. } => {
                parse_upstream(policy, tool, arguments).map_err(|message| InvalidArguments {
                    tool: Arc::clone(entry.shared_name()),
                    message,
                })
            }
        };
        ParsedCall::Known { tool, call }
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
        let arguments = match call {
            Err(error) => return Verdict::InvalidArguments(error),
            Ok(arguments) => arguments,
        };
        let view = match &arguments {
            ParsedArguments::Builtin(call) => CallArguments::Builtin(call),
            ParsedArguments::Upstream(arguments) => CallArguments::Json(arguments),
        };
        if let Decision::Deny(denial) = policy.decide(mode, tool, view) {
            return Verdict::Deny(denial);
        }
        Verdict::Allow(match (arguments, policy.catalog().tool(tool).origin()) {
            (ParsedArguments::Builtin(call), _) => AllowedCall::Builtin(call),
            (ParsedArguments::Upstream(arguments), ToolOrigin::Upstream { upstream, tool }) => {
                AllowedCall::Upstream {
                    upstream: Arc::clone(upstream),
                    tool: Arc::clone(tool),
                    arguments,
                }
            }
            // parse() builds upstream arguments only for upstream tools.
            (ParsedArguments::Upstream(_), ToolOrigin::Builtin(_)) => {
                return Verdict::UnknownTool;
            }
        })
    }
}

/// `null` is read as "no arguments", as for built-ins; anything but an object
/// is refused before the schema sees it.
fn parse_upstream(
    policy: &PolicyEngine,
    tool: ToolId,
    arguments: &Value,
) -> Result<ParsedArguments, String> {
    let object = match arguments {
        Value::Null => Map::new(),
        Value::Object(object) => object.clone(),
        other => {
            return Err(format!(
                "arguments must be a JSON object, not {}",
                json_type_name(other)
            ));
        }
    };
    let value = Value::Object(object);
    policy.check_schema(tool, &value)?;
    match value {
        Value::Object(object) => Ok(ParsedArguments::Upstream(object)),
        // Built from an object just above.
        _ => Err("arguments must be a JSON object".to_owned()),
    }
}

/// An allowed call, ready to run: in process, or forwarded to its upstream.
#[derive(Clone, Debug, PartialEq)]
pub enum AllowedCall {
    /// A built-in simulated-cloud call.
    Builtin(ToolCall),
    /// A call to forward to an upstream MCP server.
    Upstream {
        /// The upstream's name, as declared in the policy.
        upstream: Arc<str>,
        /// The tool's own name at the upstream (not the exposed `<upstream>__<tool>`).
        tool: Arc<str>,
        /// The arguments, valid against the tool's `inputSchema` and the mode's constraints.
        arguments: Map<String, Value>,
    },
}

impl AllowedCall {
    /// The call's arguments as constraints and approval rules read them.
    pub fn arguments(&self) -> CallArguments<'_> {
        match self {
            AllowedCall::Builtin(call) => CallArguments::Builtin(call),
            AllowedCall::Upstream { arguments, .. } => CallArguments::Json(arguments),
        }
    }
}

/// How one tool call is decided, before anything runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The policy allows the call; this is what to run.
    Allow(AllowedCall),
    /// The policy refuses the call.
    Deny(Denial),
    /// No tool has the requested name; refused before any policy rule applies.
    UnknownTool,
    /// The tool is permitted in the mode but the arguments do not fit its schema.
    InvalidArguments(InvalidArguments),
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
    pub fn reason_code(&self) -> Option<Reason> {
        match self {
            Verdict::Allow(_) => None,
            Verdict::Deny(denial) => Some(denial.reason),
            Verdict::UnknownTool => Some(Reason::UnknownTool),
            Verdict::InvalidArguments(_) => Some(Reason::InvalidArguments),
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
    ParsedCall::parse(policy, tool_name, arguments).decide(policy, mode)
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
    let Some(tool) = policy.catalog().lookup(tool_name) else {
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
    use crate::reason::Reason;
    use crate::tools::ToolName;
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

    fn reason(verdict: &Verdict) -> Option<Reason> {
        verdict.reason_code()
    }

    #[test]
    fn tool_level_rules_come_before_the_argument_schema() {
        let engine = shipped();
        let normal = mode(&engine, "NORMAL");
        let emergency = mode(&engine, "EMERGENCY");
        // A forbidden tool is refused as forbidden, however wrong its arguments.
        let blocked = decide_call(&engine, normal, "restart_service", &json!({}));
        assert_eq!(reason(&blocked), Some(Reason::BlockedInMode));
        assert_eq!(blocked.audit_decision(), AuditDecision::Denied);
        let always = decide_call(&engine, emergency, "delete_database", &json!({"x": 1}));
        assert_eq!(reason(&always), Some(Reason::AlwaysBlocked));
        // A permitted tool with bad arguments is rejected before its constraints.
        let invalid = decide_call(&engine, emergency, "scale_fleet", &json!({"count": -1}));
        assert_eq!(reason(&invalid), Some(Reason::InvalidArguments));
        assert_eq!(invalid.audit_decision(), AuditDecision::Rejected);
        let over = decide_call(&engine, emergency, "scale_fleet", &json!({"count": 50}));
        assert_eq!(reason(&over), Some(Reason::ConstraintViolated));
        let ok = decide_call(&engine, emergency, "scale_fleet", &json!({"count": 5}));
        assert_eq!(
            ok,
            Verdict::Allow(AllowedCall::Builtin(ToolCall::ScaleFleet { count: 5 }))
        );
        assert_eq!(ok.audit_decision(), AuditDecision::Allowed);
    }

    #[test]
    fn unknown_tools_are_rejected_in_every_mode() {
        let engine = shipped();
        for (id, _) in engine.modes() {
            let verdict = decide_call(&engine, id, "summon_root", &json!({}));
            assert_eq!(verdict, Verdict::UnknownTool);
            assert_eq!(verdict.audit_decision(), AuditDecision::Rejected);
            assert_eq!(reason(&verdict), Some(Reason::UnknownTool));
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
        assert_eq!(denial.reason, Reason::BlockedInMode);
        let ToolVerdict::Denied(denial) = decide_tool(&engine, emergency, "delete_database") else {
            panic!("delete_database is always blocked");
        };
        assert_eq!(denial.reason, Reason::AlwaysBlocked);
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
                            !matches!(full, Verdict::Deny(d) if d.reason != Reason::ConstraintViolated),
                            "{tool} {arguments}: {full:?}"
                        ),
                        (alone, full) => panic!("{tool} {arguments}: {alone:?} vs {full:?}"),
                    }
                }
            }
        }
    }

    fn upstream_engine() -> PolicyEngine {
        let engine = PolicyEngine::from_json(
            &json!({
                "upstreams": {"db": {"command": "db-server"}},
                "modes": {"NORMAL": {
                    "allowed_tools": ["db__query", "db__d*"],
                    "blocked_tools": ["db__drop"],
                    "constraints": {"db__query": {"sql": {"pattern": "(?i)select\\b[^;]*"}}}
                }}
            })
            .to_string(),
            "db.json",
        )
        .expect("valid");
        let schema = json!({"type": "object", "properties": {
            "sql": {"type": "string", "maxLength": 100}, "limit": {"type": "integer"}},
            "required": ["sql"], "additionalProperties": false});
        let listing = crate::catalog::tests::listing(
            "db",
            &[
                ("query", schema.clone()),
                ("drop", schema),
                ("hidden", json!({"type": "object"})),
            ],
        );
        engine.bind(std::sync::Arc::new(crate::catalog::Catalog::from_sources(
            false,
            [("db", &listing)],
        )))
    }

    #[test]
    fn an_allowed_upstream_call_names_the_upstream_and_its_own_tool() {
        let engine = upstream_engine();
        let normal = engine.default_mode();
        let verdict = decide_call(&engine, normal, "db__query", &json!({"sql": "SELECT 1"}));
        let Verdict::Allow(AllowedCall::Upstream {
            upstream,
            tool,
            arguments,
        }) = verdict
        else {
            panic!("allowed: {verdict:?}");
        };
        assert_eq!((&*upstream, &*tool), ("db", "query"));
        assert_eq!(Value::Object(arguments), json!({"sql": "SELECT 1"}));
    }

    #[test]
    fn upstream_arguments_are_checked_against_the_schema_then_the_constraints() {
        let engine = upstream_engine();
        let normal = engine.default_mode();
        for invalid in [
            json!({}),
            json!({"sql": 1}),
            json!({"sql": "SELECT 1", "extra": true}),
            json!({"sql": "x".repeat(101)}),
            json!([1]),
            json!("SELECT 1"),
        ] {
            let verdict = decide_call(&engine, normal, "db__query", &invalid);
            assert_eq!(
                reason(&verdict),
                Some(Reason::InvalidArguments),
                "{invalid}"
            );
            let Verdict::InvalidArguments(error) = verdict else {
                unreachable!()
            };
            assert!(
                error
                    .to_string()
                    .starts_with("invalid arguments for db__query: ")
            );
        }
        let drop = decide_call(
            &engine,
            normal,
            "db__query",
            &json!({"sql": "DROP TABLE t"}),
        );
        assert_eq!(reason(&drop), Some(Reason::ConstraintViolated));
        let chained = decide_call(
            &engine,
            normal,
            "db__query",
            &json!({"sql": "select 1; drop table t"}),
        );
        assert_eq!(reason(&chained), Some(Reason::ConstraintViolated));
        // Tool-level rules come first, whatever the arguments.
        let blocked = decide_call(&engine, normal, "db__drop", &json!({"nonsense": 1}));
        assert_eq!(reason(&blocked), Some(Reason::BlockedInMode));
        let hidden = decide_call(&engine, normal, "db__hidden", &json!({}));
        assert_eq!(reason(&hidden), Some(Reason::NotAllowed));
        assert_eq!(
            decide_call(&engine, normal, "list_services", &json!({})),
            Verdict::UnknownTool
        );
    }

    /// Any JSON: a generated value of bounded depth.
    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[ -~]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("sql|limit|[a-z]{1,4}", inner, 0..4)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// The decision never panics, and the tool alone agrees with every call:
        /// a tool-level denial is the call's denial, and an allowed tool is only
        /// ever refused for its arguments.
        #[test]
        fn decide_never_panics_and_agrees_with_decide_tool(
            tool in "db__(query|drop|hidden|nothing)|list_services",
            arguments in any_json(),
        ) {
            let engine = upstream_engine();
            let normal = engine.default_mode();
            let full = decide_call(&engine, normal, &tool, &arguments);
            match (decide_tool(&engine, normal, &tool), &full) {
                (ToolVerdict::UnknownTool, Verdict::UnknownTool) => {}
                (ToolVerdict::Denied(a), Verdict::Deny(b)) => proptest::prop_assert_eq!(&a, b),
                (ToolVerdict::Allowed { .. }, Verdict::Allow(_) | Verdict::InvalidArguments(_)) => {}
                (ToolVerdict::Allowed { .. }, Verdict::Deny(d)) => {
                    proptest::prop_assert_eq!(d.reason, Reason::ConstraintViolated);
                }
                (alone, full) => proptest::prop_assert!(false, "{alone:?} vs {full:?}"),
            }
        }
    }
}
