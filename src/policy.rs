//! The policy engine: loads and validates `ops_policy.json`, then decides tool calls.
//!
//! Loading does all the work that can fail (parsing, name resolution, constraint
//! typing), so that [`PolicyEngine::decide`] is a pure function over bitsets and a
//! few integers: it cannot fail and allocates nothing.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::rate_limit::{RateLimitDocument, RateLimitRule};
use crate::tools::{ArgumentKind, ArgumentValue, ToolCall, ToolName};

/// Mode used when a policy file names no `default_mode`: the fail-safe one.
pub const FALLBACK_DEFAULT_MODE: &str = "NORMAL";
/// How long a mode switch waits for in-flight upstream calls when the policy does
/// not set `drain_timeout_seconds`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `drain_timeout_seconds`: an operator's switch must not wait longer.
pub const MAX_DRAIN_TIMEOUT_SECONDS: u64 = 300;
/// Emergency TTL cap when the policy does not set `max_emergency_ttl_seconds`.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);
/// No policy may allow an elevated mode to last longer than this.
pub const HARD_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest accepted mode name.
pub const MAX_MODE_NAME_LEN: usize = 32;

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{source_name}: cannot read the policy file: {error}")]
    Read {
        /// The file.
        source_name: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not JSON of the expected shape.
    #[error("{source_name}: not a valid policy document: {error}")]
    Parse {
        /// The file.
        source_name: String,
        /// The parse error, with line and column.
        error: serde_json::Error,
    },
    /// A key appears twice in one object. serde_json would keep the last one
    /// silently, so a second `NORMAL` block could widen what the first one allows.
    #[error("{source_name}: {error}")]
    DuplicateKey {
        /// The file.
        source_name: String,
        /// Names the key, the object it is in, and its line and column.
        error: serde_json::Error,
    },
    /// The file parses but contradicts itself or names things that do not exist.
    #[error("{source_name}: invalid policy:\n  - {}", problems.join("\n  - "))]
    Invalid {
        /// The file.
        source_name: String,
        /// Every problem found, in file order.
        problems: Vec<String>,
    },
}

/// Machine-readable reason for a denial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// The tool is in `global_rules.always_blocked`.
    AlwaysBlocked,
    /// The tool is in the current mode's `blocked_tools`.
    BlockedInMode,
    /// The tool is not in the current mode's `allowed_tools` (default deny).
    NotAllowed,
    /// No tool has that name.
    UnknownTool,
    /// An argument breaks one of the mode's constraints.
    ConstraintViolated,
}

impl ReasonCode {
    /// The snake_case wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::AlwaysBlocked => "always_blocked",
            ReasonCode::BlockedInMode => "blocked_in_mode",
            ReasonCode::NotAllowed => "not_allowed",
            ReasonCode::UnknownTool => "unknown_tool",
            ReasonCode::ConstraintViolated => "constraint_violated",
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Index of a mode inside one [`PolicyEngine`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModeId(u8);

impl ModeId {
    /// Position of the mode in [`PolicyEngine::modes`].
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A set of tools, one bit each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ToolSet(u8);

impl ToolSet {
    /// Whether `tool` is in the set.
    pub fn contains(self, tool: ToolName) -> bool {
        self.0 & (1 << tool.index()) != 0
    }

    fn insert(&mut self, tool: ToolName) {
        self.0 |= 1 << tool.index();
    }

    /// The tools in the set, in catalog order.
    pub fn iter(self) -> impl Iterator<Item = ToolName> {
        ToolName::ALL
            .into_iter()
            .filter(move |tool| self.contains(*tool))
    }

    /// The tools' wire names, in catalog order.
    pub fn names(self) -> Vec<&'static str> {
        self.iter().map(ToolName::as_str).collect()
    }
}

/// The outcome of a policy decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The call may run.
    Allow,
    /// The call must not run.
    Deny(Denial),
}

/// A refused call: which tool, under which mode, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The refused tool.
    pub tool: ToolName,
    /// The mode the decision was made in.
    pub mode: ModeId,
    /// Why.
    pub reason: ReasonCode,
    /// For [`ReasonCode::ConstraintViolated`], the index of the broken constraint in the mode.
    constraint: Option<usize>,
}

/// One checked rule on one argument of one tool.
#[derive(Clone, Debug, PartialEq)]
struct ArgumentConstraint {
    tool: ToolName,
    argument: &'static str,
    rule: Rule,
}

#[derive(Clone, Debug, PartialEq)]
enum Rule {
    Range { min: Option<i64>, max: Option<i64> },
    OneOfIntegers(Vec<i64>),
    OneOfStrings(Vec<String>),
}

impl Rule {
    fn admits(&self, value: ArgumentValue<'_>) -> bool {
        match (self, value) {
            (Rule::Range { min, max }, ArgumentValue::Integer(value)) => {
                min.is_none_or(|min| value >= min) && max.is_none_or(|max| value <= max)
            }
            (Rule::OneOfIntegers(allowed), ArgumentValue::Integer(value)) => {
                allowed.contains(&value)
            }
            (Rule::OneOfStrings(allowed), ArgumentValue::String(value)) => {
                allowed.iter().any(|allowed| allowed == value)
            }
            // Loading rejects mistyped rules; if one slipped through, fail closed.
            _ => false,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Range {
                min: Some(min),
                max: Some(max),
            } => write!(f, "between {min} and {max}"),
            Rule::Range {
                min: Some(min),
                max: None,
            } => write!(f, "at least {min}"),
            Rule::Range {
                min: None,
                max: Some(max),
            } => write!(f, "at most {max}"),
            Rule::Range {
                min: None,
                max: None,
            } => f.write_str("any integer"),
            Rule::OneOfIntegers(values) => {
                let values: Vec<String> = values.iter().map(i64::to_string).collect();
                write!(f, "one of {}", values.join(", "))
            }
            Rule::OneOfStrings(values) => write!(f, "one of {}", values.join(", ")),
        }
    }
}

/// One operational mode, compiled.
#[derive(Clone, Debug)]
pub struct Mode {
    name: String,
    description: String,
    allowed: ToolSet,
    blocked: ToolSet,
    constraints: Vec<ArgumentConstraint>,
}

impl Mode {
    /// The mode's name, e.g. `EMERGENCY`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The operator-facing description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Tools listed in `allowed_tools`.
    pub fn allowed(&self) -> ToolSet {
        self.allowed
    }

    /// Tools listed in `blocked_tools`.
    pub fn blocked(&self) -> ToolSet {
        self.blocked
    }

    /// The argument constraints the mode enforces, one line each in file order,
    /// e.g. `scale_fleet.count must be between 1 and 10`.
    pub fn constraint_descriptions(&self) -> Vec<String> {
        self.constraints
            .iter()
            .map(|constraint| {
                format!(
                    "{}.{} must be {}",
                    constraint.tool, constraint.argument, constraint.rule
                )
            })
            .collect()
    }
}

/// A validated policy, ready to decide calls.
#[derive(Clone, Debug)]
pub struct PolicyEngine {
    modes: Vec<Mode>,
    default_mode: ModeId,
    always_blocked: ToolSet,
    max_elevated_ttl: Duration,
    rate_limits: Vec<RateLimitRule>,
    rate_limits_are_default: bool,
    drain_timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDocument {
    #[serde(default)]
    #[allow(dead_code)] // Accepted so documented policies load; nothing reads it.
    description: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    version: Option<Value>,
    #[serde(default)]
    default_mode: Option<String>,
    #[serde(default)]
    max_emergency_ttl_seconds: Option<u64>,
    #[serde(default)]
    global_rules: GlobalRulesDocument,
    modes: BTreeMap<String, ModeDocument>,
    #[serde(default)]
    rate_limits: Option<Vec<RateLimitDocument>>,
    #[serde(default)]
    drain_timeout_seconds: Option<u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GlobalRulesDocument {
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    always_blocked: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeDocument {
    #[serde(default)]
    description: String,
    #[serde(default)]
    allowed_tools: Vec<String>,
    #[serde(default)]
    blocked_tools: Vec<String>,
    #[serde(default)]
    constraints: BTreeMap<String, BTreeMap<String, ConstraintDocument>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConstraintDocument {
    #[serde(default)]
    min: Option<i64>,
    #[serde(default)]
    max: Option<i64>,
    #[serde(default)]
    one_of: Option<Vec<Value>>,
}

impl PolicyEngine {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<PolicyEngine, PolicyError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| PolicyError::Read {
            source_name: source_name.clone(),
            error,
        })?;
        PolicyEngine::from_json(&text, &source_name)
    }

    /// Validates policy JSON; `source_name` names it in error messages.
    pub fn from_json(text: &str, source_name: &str) -> Result<PolicyEngine, PolicyError> {
        // First pass: refuse duplicate keys before serde's maps can merge them.
        if let Err(error) = reject_duplicate_keys(text) {
            return Err(if error.is_data() {
                PolicyError::DuplicateKey {
                    source_name: source_name.to_owned(),
                    error,
                }
            } else {
                PolicyError::Parse {
                    source_name: source_name.to_owned(),
                    error,
                }
            });
        }
        let document: PolicyDocument =
            serde_json::from_str(text).map_err(|error| PolicyError::Parse {
                source_name: source_name.to_owned(),
                error,
            })?;
        compile(document).map_err(|problems| PolicyError::Invalid {
            source_name: source_name.to_owned(),
            problems,
        })
    }

    /// Decides whether `tool` may run in `mode` at all, whatever its arguments.
    ///
    /// The tool-level rules, in the seed's order: always_blocked, then the mode's
    /// blocked_tools, then allowed_tools (default deny). The gateway asks this before
    /// it looks at the arguments, so a blocked tool is reported as blocked even when
    /// its arguments are wrong, and a caller who may not use a tool learns nothing
    /// about its schema.
    pub fn decide_tool(&self, mode: ModeId, tool: ToolName) -> Decision {
        let deny = |reason| {
            Decision::Deny(Denial {
                tool,
                mode,
                reason,
                constraint: None,
            })
        };
        if self.always_blocked.contains(tool) {
            return deny(ReasonCode::AlwaysBlocked);
        }
        let compiled = self.mode(mode);
        if compiled.blocked.contains(tool) {
            return deny(ReasonCode::BlockedInMode);
        }
        if !compiled.allowed.contains(tool) {
            return deny(ReasonCode::NotAllowed);
        }
        Decision::Allow
    }

    /// Decides whether `call` may run in `mode`.
    ///
    /// The tool-level rules first ([`PolicyEngine::decide_tool`]), then the mode's
    /// argument constraints on the parsed (schema-valid) arguments.
    pub fn decide(&self, mode: ModeId, call: &ToolCall) -> Decision {
        let tool = call.tool();
        if let denied @ Decision::Deny(_) = self.decide_tool(mode, tool) {
            return denied;
        }
        let compiled = self.mode(mode);
        let deny = |reason, constraint| {
            Decision::Deny(Denial {
                tool,
                mode,
                reason,
                constraint,
            })
        };
        for (index, constraint) in compiled.constraints.iter().enumerate() {
            if constraint.tool != tool {
                continue;
            }
            let admitted = call
                .argument(constraint.argument)
                .is_some_and(|value| constraint.rule.admits(value));
            if !admitted {
                return deny(ReasonCode::ConstraintViolated, Some(index));
            }
        }
        Decision::Allow
    }

    /// The mode's argument constraints on `tool`, each as a sentence such as
    /// "`count` must be between 1 and 10", in policy order.
    pub fn constraints_on(&self, mode: ModeId, tool: ToolName) -> Vec<String> {
        self.mode(mode)
            .constraints
            .iter()
            .filter(|constraint| constraint.tool == tool)
            .map(|constraint| format!("`{}` must be {}", constraint.argument, constraint.rule))
            .collect()
    }

    /// The mode with this id.
    pub fn mode(&self, mode: ModeId) -> &Mode {
        // ModeIds are only minted by this engine, so the index is in range.
        &self.modes[usize::from(mode.0)]
    }

    /// Every mode, in name order.
    pub fn modes(&self) -> impl Iterator<Item = (ModeId, &Mode)> {
        self.modes
            .iter()
            .enumerate()
            .map(|(index, mode)| (ModeId(index as u8), mode))
    }

    /// Finds a mode by name, ignoring ASCII case.
    pub fn mode_id(&self, name: &str) -> Option<ModeId> {
        self.modes()
            .find(|(_, mode)| mode.name.eq_ignore_ascii_case(name))
            .map(|(id, _)| id)
    }

    /// The mode the system starts in and returns to when an elevated mode lapses.
    pub fn default_mode(&self) -> ModeId {
        self.default_mode
    }

    /// Tools blocked in every mode.
    pub fn always_blocked(&self) -> ToolSet {
        self.always_blocked
    }

    /// Longest time an operator may hold a non-default mode.
    pub fn max_elevated_ttl(&self) -> Duration {
        self.max_elevated_ttl
    }

    /// How long a mode switch waits for in-flight upstream calls that the new mode
    /// denies before it cancels them (`drain_timeout_seconds`, default 10).
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    /// The rate-limit rules in force: the policy's `rate_limits`, or the built-in
    /// default ([`crate::rate_limit::default_rules`]) when it has none.
    pub fn rate_limits(&self) -> &[RateLimitRule] {
        &self.rate_limits
    }

    /// Whether [`PolicyEngine::rate_limits`] is the built-in default.
    pub fn rate_limits_are_default(&self) -> bool {
        self.rate_limits_are_default
    }

    /// Whether `tool` passes the tool-level checks in `mode` (constraints aside).
    pub fn permits_tool(&self, mode: ModeId, tool: ToolName) -> bool {
        let compiled = self.mode(mode);
        !self.always_blocked.contains(tool)
            && !compiled.blocked.contains(tool)
            && compiled.allowed.contains(tool)
    }

    /// Names of the modes in which `tool` may run at all.
    pub fn modes_permitting(&self, tool: ToolName) -> Vec<&str> {
        self.modes()
            .filter(|(id, _)| self.permits_tool(*id, tool))
            .map(|(_, mode)| mode.name())
            .collect()
    }

    /// A sentence explaining a denial, for humans and models.
    pub fn explain(&self, denial: &Denial) -> String {
        let mode = self.mode(denial.mode).name();
        let tool = denial.tool;
        match denial.reason {
            ReasonCode::AlwaysBlocked => format!(
                "Tool '{tool}' is blocked in every mode by the global rules: destructive operations are never allowed"
            ),
            ReasonCode::BlockedInMode => format!("Tool '{tool}' is blocked in {mode} mode"),
            ReasonCode::NotAllowed => format!(
                "Tool '{tool}' is not among the tools allowed in {mode} mode (default deny)"
            ),
            ReasonCode::UnknownTool => format!("Tool '{tool}' is unknown"),
            ReasonCode::ConstraintViolated => match self.violated_constraint(denial) {
                Some(constraint) => format!(
                    "Argument `{}` of '{tool}' must be {} in {mode} mode",
                    constraint.argument, constraint.rule
                ),
                None => format!("Tool '{tool}' violates a constraint of {mode} mode"),
            },
        }
    }

    /// A concrete next step for the caller of a denied tool.
    pub fn how_to_proceed(&self, denial: &Denial) -> String {
        let tool = denial.tool;
        match denial.reason {
            ReasonCode::AlwaysBlocked => format!(
                "Do not retry: '{tool}' is never allowed through Proxi. If it is truly needed, a human must do it outside the agent, through change management."
            ),
            ReasonCode::BlockedInMode | ReasonCode::NotAllowed => {
                let modes = self.modes_permitting(tool);
                if modes.is_empty() {
                    format!("Do not retry: no mode of this policy allows '{tool}'.")
                } else {
                    format!(
                        "Do not retry now. Ask an operator to declare {} (the mode(s) that allow '{tool}'); in the meantime use read-only tools to diagnose.",
                        modes.join(" or ")
                    )
                }
            }
            ReasonCode::UnknownTool => {
                "Use one of the tools listed by the catalog (tools/list).".to_owned()
            }
            ReasonCode::ConstraintViolated => match self.violated_constraint(denial) {
                Some(constraint) => format!(
                    "Retry only with `{}` {}.",
                    constraint.argument, constraint.rule
                ),
                None => "Do not retry with the same arguments.".to_owned(),
            },
        }
    }

    fn violated_constraint(&self, denial: &Denial) -> Option<&ArgumentConstraint> {
        denial
            .constraint
            .and_then(|index| self.mode(denial.mode).constraints.get(index))
    }
}

fn compile(document: PolicyDocument) -> Result<PolicyEngine, Vec<String>> {
    let mut problems = Vec::new();
    if document.modes.is_empty() {
        problems.push("`modes` must define at least one mode".to_owned());
    }
    if document.modes.len() > usize::from(u8::MAX) {
        problems.push("a policy may define at most 255 modes".to_owned());
    }

    let always_blocked = tool_set(
        &document.global_rules.always_blocked,
        "global_rules.always_blocked",
        &mut problems,
    );

    let mut modes = Vec::with_capacity(document.modes.len());
    for (name, mode) in &document.modes {
        let at = format!("modes.{name}");
        if !valid_mode_name(name) {
            problems.push(format!(
                "{at}: mode names must be 1 to {MAX_MODE_NAME_LEN} characters of A-Z, 0-9 and '_', starting with a letter"
            ));
        }
        let allowed = tool_set(
            &mode.allowed_tools,
            &format!("{at}.allowed_tools"),
            &mut problems,
        );
        let blocked = tool_set(
            &mode.blocked_tools,
            &format!("{at}.blocked_tools"),
            &mut problems,
        );
        for tool in allowed.iter() {
            if blocked.contains(tool) {
                problems.push(format!(
                    "{at}: '{tool}' is in both allowed_tools and blocked_tools"
                ));
            }
            if always_blocked.contains(tool) {
                problems.push(format!(
                    "{at}.allowed_tools: '{tool}' is in global_rules.always_blocked, so allowing it here has no effect"
                ));
            }
        }
        let constraints = compile_constraints(&mode.constraints, &at, &mut problems);
        modes.push(Mode {
            name: name.clone(),
            description: mode.description.clone(),
            allowed,
            blocked,
            constraints,
        });
    }

    let default_name = document
        .default_mode
        .as_deref()
        .unwrap_or(FALLBACK_DEFAULT_MODE);
    let default_mode = modes.iter().position(|mode| mode.name == default_name);
    if default_mode.is_none() {
        let defined: Vec<&str> = modes.iter().map(|mode| mode.name.as_str()).collect();
        problems.push(match document.default_mode {
            Some(_) => format!(
                "default_mode '{default_name}' is not a defined mode (defined: {})",
                defined.join(", ")
            ),
            None => format!(
                "default_mode is missing, so the fail-safe '{FALLBACK_DEFAULT_MODE}' is used, but no such mode is defined (defined: {})",
                defined.join(", ")
            ),
        });
    }

    let max_elevated_ttl = match document.max_emergency_ttl_seconds {
        None => DEFAULT_MAX_TTL,
        Some(0) => {
            problems.push("max_emergency_ttl_seconds must be at least 1".to_owned());
            DEFAULT_MAX_TTL
        }
        Some(seconds) if Duration::from_secs(seconds) > HARD_MAX_TTL => {
            problems.push(format!(
                "max_emergency_ttl_seconds must be at most {} (7 days), got {seconds}",
                HARD_MAX_TTL.as_secs()
            ));
            DEFAULT_MAX_TTL
        }
        Some(seconds) => Duration::from_secs(seconds),
    };

    let drain_timeout = match document.drain_timeout_seconds {
        None => DEFAULT_DRAIN_TIMEOUT,
        Some(seconds) if seconds > MAX_DRAIN_TIMEOUT_SECONDS => {
            problems.push(format!(
                "drain_timeout_seconds must be at most {MAX_DRAIN_TIMEOUT_SECONDS}, got {seconds}"
            ));
            DEFAULT_DRAIN_TIMEOUT
        }
        Some(seconds) => Duration::from_secs(seconds),
    };

    let rate_limits_are_default = document.rate_limits.is_none();
    let rate_limits = match &document.rate_limits {
        None => crate::rate_limit::default_rules(),
        Some(documents) => documents
            .iter()
            .enumerate()
            .filter_map(|(index, rule)| {
                rule.compile(&format!("rate_limits[{index}]"))
                    .map_err(|found| problems.extend(found))
                    .ok()
            })
            .collect(),
    };

    match default_mode {
        Some(index) if problems.is_empty() => Ok(PolicyEngine {
            modes,
            // At most 255 modes were checked above, so the index fits.
            default_mode: ModeId(index as u8),
            always_blocked,
            max_elevated_ttl,
            rate_limits,
            rate_limits_are_default,
            drain_timeout,
        }),
        _ => Err(problems),
    }
}

/// Parses `text` as JSON and fails on the first object that repeats a key.
///
/// serde_json keeps the last of two equal keys, and the typed parse that follows
/// reads objects into maps, so without this pass a second `NORMAL` block (or a
/// second `scale_fleet` constraint without `max`) would quietly replace the first.
/// The error is raised right after the repeated key is read, so serde_json's line
/// and column point at it.
fn reject_duplicate_keys(text: &str) -> Result<(), serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    UniqueKeys { path: "" }.deserialize(&mut deserializer)?;
    deserializer.end()
}

/// A JSON value whose objects, at any depth, have distinct keys; `path` names it.
struct UniqueKeys<'a> {
    path: &'a str,
}

impl<'de> DeserializeSeed<'de> for UniqueKeys<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            let path = format!("{}[{index}]", self.path);
            if items
                .next_element_seed(UniqueKeys { path: &path })?
                .is_none()
            {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = entries.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            if seen.contains(&key) {
                let within = if self.path.is_empty() {
                    "at the top level".to_owned()
                } else {
                    format!("in `{}`", self.path)
                };
                return Err(de::Error::custom(format!(
                    "duplicate key `{key}` {within} (each key may appear once; the policy would otherwise use only the last)"
                )));
            }
            entries.next_value_seed(UniqueKeys { path: &path })?;
            seen.insert(key);
        }
        Ok(())
    }
}

fn valid_mode_name(name: &str) -> bool {
    name.len() <= MAX_MODE_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn known_tools() -> String {
    ToolName::ALL.map(ToolName::as_str).join(", ")
}

fn tool_set(names: &[String], at: &str, problems: &mut Vec<String>) -> ToolSet {
    let mut set = ToolSet::default();
    for name in names {
        match ToolName::parse(name) {
            Some(tool) if set.contains(tool) => {
                problems.push(format!("{at}: '{tool}' is listed twice"));
            }
            Some(tool) => set.insert(tool),
            None => problems.push(format!(
                "{at}: no tool is named '{name}' (known tools: {})",
                known_tools()
            )),
        }
    }
    set
}

fn compile_constraints(
    constraints: &BTreeMap<String, BTreeMap<String, ConstraintDocument>>,
    at: &str,
    problems: &mut Vec<String>,
) -> Vec<ArgumentConstraint> {
    let mut compiled = Vec::new();
    for (tool_name, arguments) in constraints {
        let Some(tool) = ToolName::parse(tool_name) else {
            problems.push(format!(
                "{at}.constraints: no tool is named '{tool_name}' (known tools: {})",
                known_tools()
            ));
            continue;
        };
        for (argument_name, document) in arguments {
            let at = format!("{at}.constraints.{tool_name}.{argument_name}");
            let Some(kind) = tool.argument_kind(argument_name) else {
                let known = tool.argument_names();
                problems.push(if known.is_empty() {
                    format!("{at}: '{tool}' takes no arguments")
                } else {
                    format!(
                        "{at}: '{tool}' has no argument '{argument_name}' (its arguments: {})",
                        known.join(", ")
                    )
                });
                continue;
            };
            // argument_kind only answers for names in argument_names, which are 'static.
            let Some(argument) = tool
                .argument_names()
                .iter()
                .copied()
                .find(|name| name == argument_name)
            else {
                continue;
            };
            let mut add = |rule| {
                compiled.push(ArgumentConstraint {
                    tool,
                    argument,
                    rule,
                })
            };
            if document.min.is_none() && document.max.is_none() && document.one_of.is_none() {
                problems.push(format!("{at}: give at least one of min, max or one_of"));
            }
            if document.min.is_some() || document.max.is_some() {
                if kind != ArgumentKind::Integer {
                    problems.push(format!("{at}: min and max apply to integer arguments only"));
                } else if let (Some(min), Some(max)) = (document.min, document.max)
                    && min > max
                {
                    problems.push(format!("{at}: min ({min}) is greater than max ({max})"));
                } else {
                    add(Rule::Range {
                        min: document.min,
                        max: document.max,
                    });
                }
            }
            if let Some(values) = &document.one_of {
                match one_of_rule(values, kind) {
                    Ok(rule) => add(rule),
                    Err(problem) => problems.push(format!("{at}.one_of: {problem}")),
                }
            }
        }
    }
    compiled
}

fn one_of_rule(values: &[Value], kind: ArgumentKind) -> Result<Rule, String> {
    if values.is_empty() {
        return Err("must list at least one value".to_owned());
    }
    match kind {
        ArgumentKind::Integer => values
            .iter()
            .map(|value| {
                value
                    .as_i64()
                    .ok_or_else(|| format!("{value} is not an integer"))
            })
            .collect::<Result<_, _>>()
            .map(Rule::OneOfIntegers),
        ArgumentKind::String => values
            .iter()
            .map(|value| {
                value
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{value} is not a string"))
            })
            .collect::<Result<_, _>>()
            .map(Rule::OneOfStrings),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const SHIPPED: &str = include_str!("../policies/ops_policy.json");

    fn shipped() -> PolicyEngine {
        PolicyEngine::from_json(SHIPPED, "ops_policy.json").unwrap()
    }

    fn call(tool: ToolName, args: Value) -> ToolCall {
        ToolCall::parse(tool, &args).unwrap()
    }

    fn reason(engine: &PolicyEngine, mode: &str, call: &ToolCall) -> Option<ReasonCode> {
        match engine.decide(engine.mode_id(mode).unwrap(), call) {
            Decision::Allow => None,
            Decision::Deny(denial) => Some(denial.reason),
        }
    }

    fn problems(policy: Value) -> String {
        PolicyEngine::from_json(&policy.to_string(), "test.json")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn shipped_policy_matches_the_seed() {
        let engine = shipped();
        let normal = engine.mode_id("NORMAL").unwrap();
        let emergency = engine.mode_id("EMERGENCY").unwrap();
        assert_eq!(engine.default_mode(), normal);
        assert_eq!(
            engine.mode(normal).allowed().names(),
            ["list_services", "get_service_status", "read_logs"]
        );
        assert_eq!(
            engine.mode(emergency).allowed().names(),
            [
                "list_services",
                "get_service_status",
                "read_logs",
                "restart_service",
                "scale_fleet"
            ]
        );
        assert_eq!(engine.always_blocked().names(), ["delete_database"]);
    }

    #[test]
    fn decisions_follow_the_seed_order() {
        let engine = shipped();
        let restart = call(
            ToolName::RestartService,
            json!({"service_name": "web-server"}),
        );
        let delete = call(ToolName::DeleteDatabase, json!({"db_name": "database"}));
        let status = call(ToolName::GetServiceStatus, json!({"service_name": "cache"}));
        assert_eq!(
            reason(&engine, "NORMAL", &restart),
            Some(ReasonCode::BlockedInMode)
        );
        assert_eq!(reason(&engine, "EMERGENCY", &restart), None);
        assert_eq!(
            reason(&engine, "EMERGENCY", &delete),
            Some(ReasonCode::AlwaysBlocked)
        );
        assert_eq!(
            reason(&engine, "NORMAL", &delete),
            Some(ReasonCode::AlwaysBlocked)
        );
        assert_eq!(reason(&engine, "NORMAL", &status), None);
    }

    #[test]
    fn constraints_are_part_of_the_decision() {
        let engine = shipped();
        let big = call(ToolName::ScaleFleet, json!({"count": 50}));
        let ok = call(ToolName::ScaleFleet, json!({"count": 5}));
        assert_eq!(
            reason(&engine, "EMERGENCY", &big),
            Some(ReasonCode::ConstraintViolated)
        );
        assert_eq!(reason(&engine, "EMERGENCY", &ok), None);
        let Decision::Deny(denial) = engine.decide(engine.mode_id("EMERGENCY").unwrap(), &big)
        else {
            unreachable!()
        };
        assert_eq!(
            engine.explain(&denial),
            "Argument `count` of 'scale_fleet' must be between 1 and 10 in EMERGENCY mode"
        );
        assert_eq!(
            engine.how_to_proceed(&denial),
            "Retry only with `count` between 1 and 10."
        );
    }

    #[test]
    fn one_of_constraints_check_strings() {
        let engine = PolicyEngine::from_json(
            &json!({"modes": {"NORMAL": {"allowed_tools": ["restart_service"],
                "constraints": {"restart_service": {"service_name": {"one_of": ["cache"]}}}}}})
            .to_string(),
            "t",
        )
        .unwrap();
        let cache = call(ToolName::RestartService, json!({"service_name": "cache"}));
        let web = call(
            ToolName::RestartService,
            json!({"service_name": "web-server"}),
        );
        assert_eq!(reason(&engine, "NORMAL", &cache), None);
        assert_eq!(
            reason(&engine, "NORMAL", &web),
            Some(ReasonCode::ConstraintViolated)
        );
    }

    #[test]
    fn a_policy_without_default_mode_starts_in_normal() {
        let engine = PolicyEngine::from_json(
            &json!({"modes": {"EMERGENCY": {}, "NORMAL": {"allowed_tools": ["read_logs"]}}})
                .to_string(),
            "t",
        )
        .unwrap();
        assert_eq!(engine.mode(engine.default_mode()).name(), "NORMAL");
    }

    #[test]
    fn unlisted_tools_are_denied() {
        let engine =
            PolicyEngine::from_json(&json!({"modes": {"NORMAL": {}}}).to_string(), "t").unwrap();
        assert_eq!(
            reason(&engine, "NORMAL", &ToolCall::ListServices),
            Some(ReasonCode::NotAllowed)
        );
    }

    #[test]
    fn validation_names_the_file_and_each_problem() {
        let message = problems(json!({
            "default_mode": "CALM",
            "modes": {
                "NORMAL": {"allowed_tools": ["read_logs", "restart_servce"], "blocked_tools": ["read_logs"]},
                "EMERGENCY": {"constraints": {"scale_fleet": {"replicas": {"max": 3}},
                                              "list_services": {"x": {"min": 1}},
                                              "restart_service": {"service_name": {"min": 1}}}}
            }
        }));
        assert!(
            message.starts_with("test.json: invalid policy"),
            "{message}"
        );
        for expected in [
            "no tool is named 'restart_servce'",
            "'read_logs' is in both allowed_tools and blocked_tools",
            "'scale_fleet' has no argument 'replicas' (its arguments: count)",
            "'list_services' takes no arguments",
            "min and max apply to integer arguments only",
            "default_mode 'CALM' is not a defined mode",
        ] {
            assert!(
                message.contains(expected),
                "missing {expected:?} in {message}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let message = problems(json!({"modes": {"NORMAL": {"alowed_tools": []}}}));
        assert!(
            message.contains("unknown field `alowed_tools`"),
            "{message}"
        );
        let message = problems(json!({"modes": {}, "strict": true}));
        assert!(message.contains("unknown field `strict`"), "{message}");
    }

    #[test]
    fn missing_default_with_no_normal_mode_is_an_error() {
        let message = problems(json!({"modes": {"EMERGENCY": {}}}));
        assert!(message.contains("fail-safe 'NORMAL'"), "{message}");
    }

    #[test]
    fn contradictions_and_bad_numbers_are_rejected() {
        let message = problems(json!({
            "max_emergency_ttl_seconds": 0,
            "global_rules": {"always_blocked": ["delete_database"]},
            "modes": {"NORMAL": {"allowed_tools": ["delete_database"],
                "constraints": {"scale_fleet": {"count": {"min": 5, "max": 1}},
                                "read_logs": {"lines": {"one_of": ["ten"]}}}}}
        }));
        for expected in [
            "max_emergency_ttl_seconds must be at least 1",
            "'delete_database' is in global_rules.always_blocked",
            "min (5) is greater than max (1)",
            "\"ten\" is not an integer",
        ] {
            assert!(
                message.contains(expected),
                "missing {expected:?} in {message}"
            );
        }
    }

    #[test]
    fn mode_lookup_ignores_case() {
        let engine = shipped();
        assert_eq!(engine.mode_id("emergency"), engine.mode_id("EMERGENCY"));
        assert_eq!(engine.mode_id("PANIC"), None);
    }

    #[test]
    fn duplicate_keys_are_load_errors_naming_key_and_line() {
        let second_normal = "{\n  \"modes\": {\n    \"NORMAL\": {\"allowed_tools\": [\"read_logs\"]},\n    \"NORMAL\": {\"allowed_tools\": [\"restart_service\"]}\n  }\n}";
        let message = PolicyEngine::from_json(second_normal, "dup.json")
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("dup.json: duplicate key `NORMAL` in `modes`"),
            "{message}"
        );
        assert!(message.contains("line 4"), "{message}");

        let second_constraint = r#"{"modes": {"NORMAL": {"allowed_tools": ["scale_fleet"],
            "constraints": {"scale_fleet": {"count": {"min": 1, "max": 10}},
                            "scale_fleet": {"count": {"min": 1}}}}}}"#;
        let message = PolicyEngine::from_json(second_constraint, "dup.json")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("duplicate key `scale_fleet` in `modes.NORMAL.constraints`")
                && message.contains("line 3"),
            "{message}"
        );
        for (text, key) in [
            (
                r#"{"modes": {"NORMAL": {}}, "default_mode": "NORMAL", "default_mode": "X"}"#,
                "`default_mode` at the top level",
            ),
            (
                r#"{"modes": {"NORMAL": {"description": "a", "description": "b"}}}"#,
                "`description` in `modes.NORMAL`",
            ),
            (
                r#"{"modes": {"NORMAL": {}}, "rate_limits": [{"principal": "*", "principal": "agent", "tools": "*", "rate": "1/s"}]}"#,
                "`principal` in `rate_limits[0]`",
            ),
        ] {
            let message = PolicyEngine::from_json(text, "t").unwrap_err().to_string();
            assert!(
                message.contains(&format!("duplicate key {key}")),
                "{message}"
            );
        }
        // Equal keys in different objects are fine.
        assert!(PolicyEngine::from_json(SHIPPED, "ops_policy.json").is_ok());
    }

    #[test]
    fn rate_limits_default_when_absent_and_are_validated_when_present() {
        let engine = shipped();
        assert!(!engine.rate_limits().is_empty());
        let engine =
            PolicyEngine::from_json(&json!({"modes": {"NORMAL": {}}}).to_string(), "t").unwrap();
        assert!(engine.rate_limits_are_default());
        assert_eq!(
            engine.rate_limits(),
            crate::rate_limit::default_rules().as_slice()
        );
        let engine = PolicyEngine::from_json(
            &json!({"modes": {"NORMAL": {}}, "rate_limits": []}).to_string(),
            "t",
        )
        .unwrap();
        assert!(!engine.rate_limits_are_default());
        assert!(engine.rate_limits().is_empty());
        let message = problems(json!({"modes": {"NORMAL": {}}, "rate_limits": [
            {"principal": "agent", "tools": "*", "rate": "20/s", "burst": 40},
            {"principal": "agent", "tools": "*", "rate": "lots"},
            {"principal": "robot", "tools": "*", "rate": "1/s"}
        ]}));
        assert!(
            message.starts_with("test.json: invalid policy"),
            "{message}"
        );
        assert!(
            message.contains("rate_limits[1].rate: rate \"lots\""),
            "{message}"
        );
        assert!(message.contains("rate_limits[2].principal"), "{message}");
        let message = problems(
            json!({"modes": {"NORMAL": {}}, "rate_limits": [{"principal": "*", "tools": "*", "rate": "1/s", "per": "x"}]}),
        );
        assert!(message.contains("unknown field `per`"), "{message}");
    }

    #[test]
    fn constraints_are_described_for_policy_check() {
        let engine = shipped();
        let emergency = engine.mode(engine.mode_id("EMERGENCY").unwrap());
        assert_eq!(
            emergency.constraint_descriptions(),
            ["scale_fleet.count must be between 1 and 10"]
        );
    }

    fn tool_subset() -> impl Strategy<Value = Vec<ToolName>> {
        proptest::sample::subsequence(ToolName::ALL.to_vec(), 0..=ToolName::ALL.len())
    }

    fn any_call() -> impl Strategy<Value = ToolCall> {
        let service = "[a-z][a-z-]{0,12}";
        prop_oneof![
            Just(ToolCall::ListServices),
            service.prop_map(|service_name| ToolCall::GetServiceStatus { service_name }),
            (1i64..=200).prop_map(|lines| ToolCall::ReadLogs { lines }),
            service.prop_map(|service_name| ToolCall::RestartService { service_name }),
            (1i64..=100).prop_map(|count| ToolCall::ScaleFleet { count }),
            service.prop_map(|db_name| ToolCall::DeleteDatabase { db_name }),
        ]
    }

    /// A generated policy document and the lists it was built from.
    #[derive(Debug, Clone)]
    struct Generated {
        document: Value,
        always: Vec<ToolName>,
        allowed: [Vec<ToolName>; 2],
        blocked: [Vec<ToolName>; 2],
        range: (i64, i64),
    }

    /// A valid policy: NORMAL and EMERGENCY with random lists, a range on scale_fleet.
    fn any_policy() -> impl Strategy<Value = Generated> {
        (
            tool_subset(),
            [tool_subset(), tool_subset()],
            [tool_subset(), tool_subset()],
            (1i64..=100, 0i64..=100),
        )
            .prop_map(|(always, allowed, blocked, (min, span))| {
                let allowed = allowed.map(|tools| {
                    tools
                        .into_iter()
                        .filter(|tool| !always.contains(tool))
                        .collect::<Vec<_>>()
                });
                let blocked = [0, 1].map(|i| {
                    blocked[i]
                        .iter()
                        .copied()
                        .filter(|tool| !allowed[i].contains(tool))
                        .collect::<Vec<_>>()
                });
                let names = |tools: &[ToolName]| tools.iter().map(|t| t.as_str()).collect::<Vec<_>>();
                let max = min + span;
                let document = json!({
                    "default_mode": "NORMAL",
                    "global_rules": {"always_blocked": names(&always)},
                    "modes": {
                        "NORMAL": {"allowed_tools": names(&allowed[0]), "blocked_tools": names(&blocked[0])},
                        "EMERGENCY": {"allowed_tools": names(&allowed[1]), "blocked_tools": names(&blocked[1]),
                            "constraints": {"scale_fleet": {"count": {"min": min, "max": max}}}}
                    }
                });
                Generated {
                    document,
                    always,
                    allowed,
                    blocked,
                    range: (min, max),
                }
            })
    }

    proptest! {
        #[test]
        fn decide_matches_the_reference_model(
            Generated { document, always, allowed, blocked, range: (min, max) } in any_policy(),
            call in any_call(),
            emergency in any::<bool>(),
        ) {
            let engine = PolicyEngine::from_json(&document.to_string(), "generated").unwrap();
            let index = usize::from(emergency);
            let mode = engine.mode_id(if emergency { "EMERGENCY" } else { "NORMAL" }).unwrap();
            let tool = call.tool();
            let expected = if always.contains(&tool) {
                Some(ReasonCode::AlwaysBlocked)
            } else if blocked[index].contains(&tool) {
                Some(ReasonCode::BlockedInMode)
            } else if !allowed[index].contains(&tool) {
                Some(ReasonCode::NotAllowed)
            } else if let (true, ToolCall::ScaleFleet { count }) = (emergency, &call) {
                (!(min..=max).contains(count)).then_some(ReasonCode::ConstraintViolated)
            } else {
                None
            };
            let actual = match engine.decide(mode, &call) {
                Decision::Allow => None,
                Decision::Deny(denial) => {
                    prop_assert_eq!(denial.tool, tool);
                    prop_assert_eq!(denial.mode, mode);
                    Some(denial.reason)
                }
            };
            prop_assert_eq!(actual, expected);
        }

        /// The tool-level decision is `decide` minus the argument constraints, so the
        /// gateway may give it before (and instead of) the schema's verdict.
        #[test]
        fn decide_tool_is_decide_without_constraints(
            Generated { document, .. } in any_policy(),
            call in any_call(),
            emergency in any::<bool>(),
        ) {
            let engine = PolicyEngine::from_json(&document.to_string(), "generated").unwrap();
            let mode = engine.mode_id(if emergency { "EMERGENCY" } else { "NORMAL" }).unwrap();
            let tool_level = engine.decide_tool(mode, call.tool());
            match engine.decide(mode, &call) {
                Decision::Deny(denial) if denial.reason == ReasonCode::ConstraintViolated => {
                    prop_assert_eq!(tool_level, Decision::Allow);
                }
                decision => prop_assert_eq!(tool_level, decision),
            }
            prop_assert_eq!(tool_level == Decision::Allow, engine.permits_tool(mode, call.tool()));
        }

        #[test]
        fn always_blocked_tools_never_run_in_any_mode(
            Generated { document, always, .. } in any_policy(),
            call in any_call(),
        ) {
            let engine = PolicyEngine::from_json(&document.to_string(), "generated").unwrap();
            if always.contains(&call.tool()) {
                for (mode, _) in engine.modes() {
                    prop_assert!(matches!(engine.decide(mode, &call), Decision::Deny(_)));
                }
            }
        }

        #[test]
        fn arbitrary_documents_never_panic_the_loader(text in ".{0,200}") {
            let _ = PolicyEngine::from_json(&text, "fuzz");
        }
    }
}
