//! `proxi policy diff OLD NEW`: what a policy change does, decision by decision.
//!
//! Both policies are bound to one catalog: the built-ins and every upstream tool
//! either policy names exactly (with an open schema, since upstream schemas are
//! unknown offline). Every (mode, tool) pair of the modes both define is decided
//! under each with [`crate::decision::decide_tool`], the same tool-level
//! decision the gateway takes; a pair whose outcome or constraints differ is a
//! change. Globs cannot be enumerated offline, so glob rules are compared as
//! written, as are the rate limits, the default mode and the set of modes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use rmcp::model::Tool;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::catalog::Catalog;
use crate::decision::{ToolVerdict, decide_tool};
use crate::policy::{ModeId, PolicyEngine};
use crate::upstream::client::{ExposedTool, ToolListing};
use crate::upstream::names::SEPARATOR;

/// Every difference between two policies that can change a decision.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyDiff {
    /// The old policy's version ([`PolicyEngine::policy_hash`]).
    pub old_hash: String,
    /// The new policy's version.
    pub new_hash: String,
    /// `Some((old, new))` when the default mode changes.
    pub default_mode: Option<(String, String)>,
    /// Modes only the new policy defines.
    pub modes_added: Vec<String>,
    /// Modes only the old policy defines: every call in them would now be
    /// decided in the default mode.
    pub modes_removed: Vec<String>,
    /// Per mode and tool, the decisions that change, mode by mode in name order.
    pub decisions: Vec<DecisionChange>,
    /// Glob rules (and glob constraints) added or removed, as written.
    pub rules: Vec<RuleChange>,
    /// Rate-limit rules added or removed, as `policy check` prints them.
    pub rate_limits: Vec<RuleChange>,
}

impl PolicyDiff {
    /// How many changes the diff lists.
    pub fn change_count(&self) -> usize {
        usize::from(self.default_mode.is_some())
            + self.modes_added.len()
            + self.modes_removed.len()
            + self.decisions.len()
            + self.rules.len()
            + self.rate_limits.len()
    }

    /// Whether the policies decide everything alike.
    pub fn is_empty(&self) -> bool {
        self.change_count() == 0
    }
}

/// How one tool's decision in one mode changes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DecisionChange {
    /// The mode.
    pub mode: String,
    /// The tool.
    pub tool: String,
    /// What kind of change.
    pub change: ChangeKind,
    /// The decision under the old policy.
    pub old: ToolDecision,
    /// The decision under the new policy.
    pub new: ToolDecision,
}

/// The kind of a [`DecisionChange`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Denied before, allowed now.
    NewlyAllowed,
    /// Allowed before, denied now.
    NewlyDenied,
    /// Allowed in both, under different argument constraints.
    ConstraintsChanged,
}

impl ChangeKind {
    /// The snake_case form used in text and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::NewlyAllowed => "newly allowed",
            ChangeKind::NewlyDenied => "newly denied",
            ChangeKind::ConstraintsChanged => "constraints changed",
        }
    }
}

/// One policy's tool-level decision on a tool in a mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ToolDecision {
    /// Whether the tool may run (for arguments meeting `constraints`).
    pub allowed: bool,
    /// For a denial, its reason code.
    pub reason: Option<&'static str>,
    /// For an allowed tool, the mode's constraints on its arguments.
    pub constraints: Vec<String>,
}

/// A rule present in only one of the two policies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleChange {
    /// Where the rule sits: `modes.NORMAL.allowed_tools`, `global_rules.always_blocked`,
    /// `modes.NORMAL.constraints`, `rate_limits`.
    pub at: String,
    /// Whether the new policy adds or drops it.
    pub added: bool,
    /// The rule as written.
    pub rule: String,
}

/// Compares `old` and `new`; see the module documentation for what is compared.
pub fn diff(old: &PolicyEngine, new: &PolicyEngine) -> PolicyDiff {
    let catalog = Arc::new(diff_catalog(old, new));
    let old_bound = old.bind(Arc::clone(&catalog));
    let new_bound = new.bind(Arc::clone(&catalog));
    let mode_names = |engine: &PolicyEngine| -> BTreeSet<String> {
        engine
            .modes()
            .map(|(_, mode)| mode.name().to_owned())
            .collect()
    };
    let (old_modes, new_modes) = (mode_names(old), mode_names(new));
    let default_name = |engine: &PolicyEngine| engine.mode(engine.default_mode()).name().to_owned();
    let (old_default, new_default) = (default_name(old), default_name(new));

    let mut decisions = Vec::new();
    let mut rules = Vec::new();
    for name in old_modes.intersection(&new_modes) {
        let (Some(old_mode), Some(new_mode)) = (old_bound.mode_id(name), new_bound.mode_id(name))
        else {
            continue;
        };
        for (_, tool) in catalog.tools() {
            let before = tool_decision(&old_bound, old_mode, tool.name());
            let after = tool_decision(&new_bound, new_mode, tool.name());
            let change = match (before.allowed, after.allowed) {
                (false, true) => ChangeKind::NewlyAllowed,
                (true, false) => ChangeKind::NewlyDenied,
                (true, true) if before.constraints != after.constraints => {
                    ChangeKind::ConstraintsChanged
                }
                _ => continue,
            };
            decisions.push(DecisionChange {
                mode: name.clone(),
                tool: tool.name().to_owned(),
                change,
                old: before,
                new: after,
            });
        }
        let at = format!("modes.{name}");
        let (old_rules, new_rules) = (old.mode(old_mode), new.mode(new_mode));
        let globs = |patterns: Vec<&str>| -> Vec<String> {
            patterns
                .into_iter()
                .filter(|pattern| pattern.contains('*'))
                .map(str::to_owned)
                .collect()
        };
        rules.extend(set_changes(
            &format!("{at}.allowed_tools"),
            globs(old_rules.allowed_patterns()),
            globs(new_rules.allowed_patterns()),
        ));
        rules.extend(set_changes(
            &format!("{at}.blocked_tools"),
            globs(old_rules.blocked_patterns()),
            globs(new_rules.blocked_patterns()),
        ));
        let glob_constraints = |mode: &crate::policy::Mode| -> Vec<String> {
            mode.constraint_rules()
                .into_iter()
                .filter(|(pattern, _)| pattern.contains('*'))
                .map(|(pattern, rule)| format!("{pattern}: {rule}"))
                .collect()
        };
        rules.extend(set_changes(
            &format!("{at}.constraints"),
            glob_constraints(old_rules),
            glob_constraints(new_rules),
        ));
        // Approval rules are compared as written, exact names included: they
        // change whether a call waits for a human, not whether it is allowed.
        let approvals = |mode: &crate::policy::Mode| -> Vec<String> {
            let mut rules: Vec<String> = mode
                .approval_rules()
                .into_iter()
                .map(|(pattern, rule)| format!("{pattern}: {rule}"))
                .collect();
            rules.push(format!(
                "approval_ttl_seconds: {}",
                mode.approval_ttl().as_secs()
            ));
            rules
        };
        rules.extend(set_changes(
            &format!("{at}.require_approval"),
            approvals(old_rules),
            approvals(new_rules),
        ));
    }
    let always_blocked_globs = |engine: &PolicyEngine| -> Vec<String> {
        engine
            .always_blocked_patterns()
            .into_iter()
            .filter(|pattern| pattern.contains('*'))
            .map(str::to_owned)
            .collect()
    };
    rules.extend(set_changes(
        "global_rules.always_blocked",
        always_blocked_globs(old),
        always_blocked_globs(new),
    ));
    rules.extend(set_changes(
        "elevation_requests",
        vec![old.elevation_requests().to_string()],
        vec![new.elevation_requests().to_string()],
    ));
    let rate_limits = |engine: &PolicyEngine| -> Vec<String> {
        engine
            .rate_limits()
            .iter()
            .map(|rule| rule.to_string())
            .collect()
    };
    PolicyDiff {
        old_hash: old.policy_hash().to_owned(),
        new_hash: new.policy_hash().to_owned(),
        default_mode: (old_default != new_default).then_some((old_default, new_default)),
        modes_added: new_modes.difference(&old_modes).cloned().collect(),
        modes_removed: old_modes.difference(&new_modes).cloned().collect(),
        decisions,
        rules,
        rate_limits: set_changes("rate_limits", rate_limits(old), rate_limits(new)),
    }
}

fn tool_decision(engine: &PolicyEngine, mode: ModeId, tool: &str) -> ToolDecision {
    match decide_tool(engine, mode, tool) {
        ToolVerdict::Allowed { constraints } => ToolDecision {
            allowed: true,
            reason: None,
            constraints,
        },
        ToolVerdict::Denied(denial) => ToolDecision {
            allowed: false,
            reason: Some(denial.reason.as_str()),
            constraints: Vec::new(),
        },
        // Both engines are bound to the same catalog, built from the tools looked up.
        ToolVerdict::UnknownTool => ToolDecision {
            allowed: false,
            reason: Some("unknown_tool"),
            constraints: Vec::new(),
        },
    }
}

/// The rules only one side has: removed ones first, then added ones, each in
/// the order written.
fn set_changes(at: &str, old: Vec<String>, new: Vec<String>) -> Vec<RuleChange> {
    let removed = old.iter().filter(|rule| !new.contains(rule));
    let added = new.iter().filter(|rule| !old.contains(rule));
    removed
        .map(|rule| (false, rule))
        .chain(added.map(|rule| (true, rule)))
        .map(|(added, rule)| RuleChange {
            at: at.to_owned(),
            added,
            rule: rule.clone(),
        })
        .collect()
}

/// The built-ins, then every exactly named upstream tool of either policy.
fn diff_catalog(old: &PolicyEngine, new: &PolicyEngine) -> Catalog {
    offline_catalog(true, old.named_tools().into_iter().chain(new.named_tools()))
}

/// A catalog for deciding offline: the built-ins (if `builtins`), then every
/// `<upstream>__<tool>` among `names` (others are ignored), grouped by upstream
/// in name order, each with a schema that accepts any object, since upstream
/// schemas are only known from a running upstream.
pub fn offline_catalog<'a>(builtins: bool, names: impl IntoIterator<Item = &'a str>) -> Catalog {
    let mut by_upstream: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for name in names {
        if let Some((upstream, tool)) = name.split_once(SEPARATOR) {
            by_upstream.entry(upstream).or_default().insert(tool);
        }
    }
    let mut catalog = if builtins {
        Catalog::builtin()
    } else {
        Catalog::default()
    };
    for (upstream, tools) in by_upstream {
        let listing = ToolListing {
            tools: tools
                .into_iter()
                .map(|tool| ExposedTool {
                    exposed_name: format!("{upstream}{SEPARATOR}{tool}"),
                    tool: Tool::new(tool.to_owned(), String::new(), open_schema()),
                })
                .collect(),
            skipped: Vec::new(),
        };
        catalog.add_upstream(upstream, &listing);
    }
    catalog
}

fn open_schema() -> Map<String, Value> {
    let mut schema = Map::new();
    schema.insert("type".to_owned(), Value::String("object".to_owned()));
    schema
}

impl fmt::Display for PolicyDiff {
    /// The text report: one line per change, then a count.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((old, new)) = &self.default_mode {
            writeln!(f, "default mode: {old} -> {new}")?;
        }
        for mode in &self.modes_added {
            writeln!(f, "mode added: {mode}")?;
        }
        for mode in &self.modes_removed {
            writeln!(
                f,
                "mode removed: {mode} (a call in it is decided in the default mode)"
            )?;
        }
        for change in &self.decisions {
            write!(
                f,
                "{} {}: {}",
                change.mode,
                change.tool,
                change.change.as_str()
            )?;
            match change.change {
                ChangeKind::NewlyAllowed => {
                    writeln!(f, " (was {})", change.old.reason.unwrap_or("denied"))?;
                    for constraint in &change.new.constraints {
                        writeln!(f, "    if {constraint}")?;
                    }
                }
                ChangeKind::NewlyDenied => {
                    writeln!(f, " ({})", change.new.reason.unwrap_or("denied"))?;
                }
                ChangeKind::ConstraintsChanged => {
                    writeln!(f)?;
                    for constraint in &change.old.constraints {
                        if !change.new.constraints.contains(constraint) {
                            writeln!(f, "    - {constraint}")?;
                        }
                    }
                    for constraint in &change.new.constraints {
                        if !change.old.constraints.contains(constraint) {
                            writeln!(f, "    + {constraint}")?;
                        }
                    }
                }
            }
        }
        for change in self.rules.iter().chain(&self.rate_limits) {
            let sign = if change.added { '+' } else { '-' };
            writeln!(f, "{}: {sign} {}", change.at, change.rule)?;
        }
        match self.change_count() {
            0 => writeln!(f, "no changes"),
            1 => writeln!(f, "1 change"),
            count => writeln!(f, "{count} changes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../policies/ops_policy.json");

    fn engine(text: &str) -> PolicyEngine {
        PolicyEngine::from_json(text, "test").expect("a valid policy")
    }

    #[test]
    fn a_policy_against_itself_reformatted_has_no_changes() {
        let reformatted: Value = serde_json::from_str(SHIPPED).expect("valid JSON");
        let compact = serde_json::to_string(&reformatted).expect("serializable");
        let diff = diff(&engine(SHIPPED), &engine(&compact));
        assert!(diff.is_empty(), "{diff}");
        assert_eq!(diff.old_hash, diff.new_hash);
        assert_eq!(diff.to_string(), "no changes\n");
    }

    #[test]
    fn allowing_restart_in_normal_and_tightening_scale_are_listed() {
        let changed = SHIPPED
            .replace(
                r#""allowed_tools": ["list_services", "get_service_status", "read_logs"],
      "blocked_tools": ["restart_service", "scale_fleet", "delete_database"]"#,
                r#""allowed_tools": ["list_services", "get_service_status", "restart_service"],
      "blocked_tools": ["scale_fleet", "delete_database", "read_logs"]"#,
            )
            .replace(r#"{"min": 1, "max": 10}"#, r#"{"min": 1, "max": 5}"#);
        assert_ne!(changed, SHIPPED, "the replacements apply");
        let diff = diff(&engine(SHIPPED), &engine(&changed));
        assert_eq!(
            diff.to_string(),
            "EMERGENCY scale_fleet: constraints changed\n\
             \x20   - `count` must be between 1 and 10\n\
             \x20   + `count` must be between 1 and 5\n\
             NORMAL read_logs: newly denied (blocked_in_mode)\n\
             NORMAL restart_service: newly allowed (was blocked_in_mode)\n\
             3 changes\n"
        );
        assert_ne!(diff.old_hash, diff.new_hash);
    }

    #[test]
    fn approval_rules_their_ttl_and_elevation_requests_are_listed() {
        let changed = SHIPPED
            .replace(
                r#""constraints": {"#,
                r#""require_approval": {"scale_fleet": {"count": {"min": 6}}, "restart_service": {}},
      "approval_ttl_seconds": 300,
      "constraints": {"#,
            )
            .replace(
                r#""default_mode": "NORMAL","#,
                r#""default_mode": "NORMAL", "elevation_requests": true,"#,
            );
        assert_ne!(changed, SHIPPED, "the replacements apply");
        let diff = diff(&engine(SHIPPED), &engine(&changed));
        assert_eq!(
            diff.to_string(),
            "modes.EMERGENCY.require_approval: - approval_ttl_seconds: 600\n\
             modes.EMERGENCY.require_approval: + restart_service: always\n\
             modes.EMERGENCY.require_approval: + scale_fleet: when `count` is at least 6\n\
             modes.EMERGENCY.require_approval: + approval_ttl_seconds: 300\n\
             elevation_requests: - false\n\
             elevation_requests: + true\n\
             6 changes\n"
        );
    }

    #[test]
    fn modes_globs_upstream_tools_and_rate_limits_are_compared() {
        let old = r#"{
          "upstreams": {"git": {"command": "git-mcp"}},
          "simulated_cloud": true,
          "rate_limits": [{"principal": "*", "tools": "*", "rate": "50/s", "burst": 100}],
          "modes": {
            "NORMAL": {"allowed_tools": ["git__status", "list_services"]},
            "OLD": {"allowed_tools": ["read_logs"]}
          }
        }"#;
        let new = r#"{
          "upstreams": {"git": {"command": "git-mcp"}},
          "simulated_cloud": true,
          "default_mode": "NEW",
          "rate_limits": [{"principal": "agent", "tools": "*", "rate": "5/s", "burst": 5}],
          "modes": {
            "NORMAL": {"allowed_tools": ["git__*", "list_services"], "blocked_tools": ["git__push"]},
            "NEW": {"allowed_tools": ["read_logs"]}
          }
        }"#;
        let diff = diff(&engine(old), &engine(new));
        assert_eq!(
            diff.to_string(),
            "default mode: NORMAL -> NEW\n\
             mode added: NEW\n\
             mode removed: OLD (a call in it is decided in the default mode)\n\
             modes.NORMAL.allowed_tools: + git__*\n\
             rate_limits: - each principal, all tools: 50/s, burst 100\n\
             rate_limits: + agent, all tools: 5/s, burst 5\n\
             6 changes\n"
        );
        let json = serde_json::to_value(&diff).expect("serializable");
        assert_eq!(json["modes_added"], serde_json::json!(["NEW"]));
        assert_eq!(json["default_mode"], serde_json::json!(["NORMAL", "NEW"]));
    }
}
