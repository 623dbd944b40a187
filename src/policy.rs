//! The policy engine: loads and validates a policy file, binds it to a tool
//! catalog, then decides tool calls.
//!
//! Compiling happens in two steps, because upstream tools are only known after
//! Proxi has connected to their servers:
//!
//! 1. **Load** ([`PolicyEngine::from_json`], [`PolicyEngine::load`]): parse and
//!    validate the file offline. Built-in tool names are checked exactly, as
//!    always; upstream names (`<upstream>__<tool>`) and `*` globs are checked for
//!    shape and for a declared upstream. The loaded engine is bound to the catalog
//!    known offline: the six built-ins, unless the policy declares `upstreams`
//!    without `"simulated_cloud": true`.
//! 2. **Bind** ([`PolicyEngine::bind`]): resolve every rule against a
//!    [`Catalog`] into per-mode [`ToolBits`], and compile each upstream tool's
//!    `inputSchema` into a validator, once. A new catalog means a new engine;
//!    [`SharedPolicy`] swaps it in as one `Arc`, so a call is decided wholly
//!    under one binding.
//!
//! [`PolicyEngine::decide`] is then a pure function over bitsets and a few
//! integers: it cannot fail and allocates nothing.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use regex::Regex;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::catalog::{Catalog, ToolBits, ToolId, ToolOrigin};
use crate::rate_limit::{RateLimitDocument, RateLimitRule};
use crate::reason::Reason;
use crate::tools::{ArgumentKind, ArgumentValue, ToolCall, ToolName};
use crate::upstream::config::UpstreamDeclaration;
use crate::upstream::names::{MAX_EXPOSED_NAME_LEN, SEPARATOR};

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
/// Longest accepted `pattern` constraint, in bytes.
pub const MAX_PATTERN_LEN: usize = 1024;
/// Compiled-size cap of one `pattern` regex, so a policy cannot make Proxi build
/// a huge automaton.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;
/// Longest schema-validation message handed back to a caller, in characters.
const MAX_SCHEMA_MESSAGE_LEN: usize = 300;
/// How long an approval request stays valid when the mode sets no `approval_ttl_seconds`.
pub const DEFAULT_APPROVAL_TTL: Duration = Duration::from_secs(600);
/// Longest `approval_ttl_seconds` a mode may set: one day.
pub const MAX_APPROVAL_TTL_SECONDS: u64 = 24 * 3600;

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

/// Index of a mode inside one [`PolicyEngine`]; stable across re-binds, since
/// modes come from the file, not the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModeId(u8);

impl ModeId {
    /// Position of the mode in [`PolicyEngine::modes`].
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A tool name as a rule writes it: an exact name, or a glob in which `*` stands
/// for any run of characters (`fs__read_*`, `git__*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamePattern {
    text: String,
}

impl NamePattern {
    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern has a `*`.
    pub fn is_glob(&self) -> bool {
        self.text.contains('*')
    }

    /// A pattern from `text` as it is, unchecked (for unit tests elsewhere).
    #[cfg(test)]
    pub(crate) fn for_tests(text: &str) -> NamePattern {
        NamePattern {
            text: text.to_owned(),
        }
    }

    /// Whether `name` matches: equal for an exact name, the glob for a glob.
    pub fn matches(&self, name: &str) -> bool {
        if self.is_glob() {
            glob_matches(self.text.as_bytes(), name.as_bytes())
        } else {
            self.text == name
        }
    }
}

/// `*`-only glob matching, in linear time (the classic two-pointer algorithm that
/// backtracks to the last star only).
fn glob_matches(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut last_star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            last_star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((star, matched)) = last_star {
            p = star + 1;
            n = matched + 1;
            last_star = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|byte| *byte == b'*')
}

/// A set of catalog tools, as one mode or the global rules resolve to.
#[derive(Clone, Copy, Debug)]
pub struct ToolSet<'a> {
    bits: &'a ToolBits,
    catalog: &'a Catalog,
}

impl<'a> ToolSet<'a> {
    /// Whether `tool` is in the set.
    pub fn contains(self, tool: ToolId) -> bool {
        self.bits.contains(tool)
    }

    /// The tools in the set, in catalog order.
    pub fn iter(self) -> impl Iterator<Item = ToolId> + 'a {
        self.bits.iter()
    }

    /// The tools' exposed names, in catalog order.
    pub fn names(self) -> Vec<&'a str> {
        let catalog = self.catalog;
        self.bits
            .iter()
            .map(|tool| catalog.tool(tool).name())
            .collect()
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

/// A refused call: which tool, under which mode, and why. Its ids refer to the
/// binding that decided it; explain it with that same engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The refused tool.
    pub tool: ToolId,
    /// The mode the decision was made in.
    pub mode: ModeId,
    /// Why: [`Reason::AlwaysBlocked`], [`Reason::BlockedInMode`],
    /// [`Reason::NotAllowed`] or [`Reason::ConstraintViolated`], the only reasons
    /// the policy gives (a denial is built only here).
    pub reason: Reason,
    /// For [`Reason::ConstraintViolated`], the index of the broken constraint in the mode.
    constraint: Option<usize>,
}

/// The arguments of one call, as constraints read them: a built-in's typed call,
/// or an upstream call's JSON object (already checked against its schema).
#[derive(Clone, Copy, Debug)]
pub enum CallArguments<'a> {
    /// A built-in tool's parsed call.
    Builtin(&'a ToolCall),
    /// An upstream tool's top-level arguments.
    Json(&'a Map<String, Value>),
}

impl<'a> CallArguments<'a> {
    /// The top-level argument `name` as an integer or a string; `None` when it is
    /// absent or of another type (a constraint on it then fails, closed).
    pub fn get(self, name: &str) -> Option<ArgumentValue<'a>> {
        match self {
            CallArguments::Builtin(call) => call.argument(name),
            CallArguments::Json(arguments) => match arguments.get(name)? {
                Value::String(text) => Some(ArgumentValue::String(text)),
                Value::Number(number) => number.as_i64().map(ArgumentValue::Integer),
                _ => None,
            },
        }
    }
}

/// One checked rule on one argument of the tools a name or glob selects.
#[derive(Debug)]
struct ConstraintRule {
    tools: NamePattern,
    argument: String,
    rule: Rule,
}

#[derive(Debug)]
enum Rule {
    Range {
        min: Option<i64>,
        max: Option<i64>,
    },
    OneOfIntegers(Vec<i64>),
    OneOfStrings(Vec<String>),
    /// Anchored when compiled: the whole string must match `source`.
    Pattern {
        source: String,
        regex: Regex,
    },
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
            (Rule::Pattern { regex, .. }, ArgumentValue::String(value)) => regex.is_match(value),
            // A value of the wrong type never passes: fail closed.
            _ => false,
        }
    }

    /// The kind of value the rule applies to.
    fn kind(&self) -> ArgumentKind {
        match self {
            Rule::Range { .. } | Rule::OneOfIntegers(_) => ArgumentKind::Integer,
            Rule::OneOfStrings(_) | Rule::Pattern { .. } => ArgumentKind::String,
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
            Rule::Pattern { source, .. } => {
                write!(f, "a string that wholly matches the pattern {source}")
            }
        }
    }
}

/// One mode as the file writes it (names and globs, not yet bound).
#[derive(Debug)]
struct ModeRules {
    name: String,
    description: String,
    allowed: Vec<NamePattern>,
    blocked: Vec<NamePattern>,
    constraints: Vec<Arc<ConstraintRule>>,
    guards: crate::guards::ModeGuards,
    approvals: Vec<Arc<ApprovalRule>>,
    approval_ttl: Duration,
}

/// One `require_approval` entry: the tools a name or glob selects need a human's
/// approval when every condition holds (no conditions: always). A condition holds
/// when its rule admits the argument, or when the argument is absent or of another
/// type (fail closed: an approval too many, never one too few).
#[derive(Debug)]
struct ApprovalRule {
    tools: NamePattern,
    conditions: Vec<Arc<ConstraintRule>>,
}

impl ApprovalRule {
    fn holds(&self, arguments: CallArguments<'_>) -> bool {
        self.conditions.iter().all(|condition| {
            arguments
                .get(&condition.argument)
                .is_none_or(|value| condition.rule.admits(value))
        })
    }

    fn describe(&self) -> String {
        if self.conditions.is_empty() {
            return "always".to_owned();
        }
        let conditions: Vec<String> = self
            .conditions
            .iter()
            .map(|condition| format!("`{}` is {}", condition.argument, condition.rule))
            .collect();
        format!("when {}", conditions.join(" and "))
    }
}

/// An approval rule resolved to one tool the mode allows.
#[derive(Clone, Debug)]
struct BoundApproval {
    tool: ToolId,
    rule: Arc<ApprovalRule>,
}

/// The validated file: everything that does not depend on the catalog.
#[derive(Debug)]
struct PolicyRules {
    modes: Vec<ModeRules>,
    default_mode: ModeId,
    always_blocked: Vec<NamePattern>,
    max_elevated_ttl: Duration,
    rate_limits: Vec<RateLimitRule>,
    rate_limits_are_default: bool,
    upstreams: BTreeMap<String, UpstreamDeclaration>,
    simulated_cloud: bool,
    drain_timeout: Duration,
    elevation_requests: bool,
    /// [`crate::canonical::canonical_digest`] of the policy document.
    policy_hash: String,
}

/// A constraint resolved to one tool of the catalog.
#[derive(Clone, Debug)]
struct BoundConstraint {
    tool: ToolId,
    constraint: Arc<ConstraintRule>,
}

/// One operational mode, bound to a catalog.
#[derive(Clone, Debug)]
pub struct Mode {
    name: String,
    description: String,
    allowed: ToolBits,
    blocked: ToolBits,
    constraints: Vec<BoundConstraint>,
    approvals: Vec<BoundApproval>,
    rules: Arc<PolicyRules>,
    index: usize,
    catalog: Arc<Catalog>,
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

    /// Catalog tools that `allowed_tools` selects.
    pub fn allowed(&self) -> ToolSet<'_> {
        ToolSet {
            bits: &self.allowed,
            catalog: &self.catalog,
        }
    }

    /// Catalog tools that `blocked_tools` selects.
    pub fn blocked(&self) -> ToolSet<'_> {
        ToolSet {
            bits: &self.blocked,
            catalog: &self.catalog,
        }
    }

    /// `allowed_tools` as written: exact names and globs.
    pub fn allowed_patterns(&self) -> Vec<&str> {
        self.written()
            .allowed
            .iter()
            .map(NamePattern::as_str)
            .collect()
    }

    /// `blocked_tools` as written: exact names and globs.
    pub fn blocked_patterns(&self) -> Vec<&str> {
        self.written()
            .blocked
            .iter()
            .map(NamePattern::as_str)
            .collect()
    }

    /// The argument constraints as written, with the tool name or glob each
    /// applies to: `(pattern, "argument must be ...")`, in file order.
    pub fn constraint_rules(&self) -> Vec<(&str, String)> {
        self.written()
            .constraints
            .iter()
            .map(|constraint| {
                (
                    constraint.tools.as_str(),
                    format!("`{}` must be {}", constraint.argument, constraint.rule),
                )
            })
            .collect()
    }

    /// The `require_approval` rules as written: `(tool or glob, "always" or
    /// "when `count` is at least 6")`, in file order.
    pub fn approval_rules(&self) -> Vec<(&str, String)> {
        self.written()
            .approvals
            .iter()
            .map(|rule| (rule.tools.as_str(), rule.describe()))
            .collect()
    }

    /// How long an approval request made in this mode stays valid
    /// (`approval_ttl_seconds`, default [`DEFAULT_APPROVAL_TTL`]).
    pub fn approval_ttl(&self) -> Duration {
        self.written().approval_ttl
    }

    fn written(&self) -> &ModeRules {
        // `index` is this mode's position among the rules it was bound from.
        &self.rules.modes[self.index]
    }

    /// The argument constraints the mode enforces, as written, one line each in
    /// file order, e.g. `scale_fleet.count must be between 1 and 10`.
    pub fn constraint_descriptions(&self) -> Vec<String> {
        self.written()
            .constraints
            .iter()
            .map(|constraint| {
                format!(
                    "{}.{} must be {}",
                    constraint.tools.as_str(),
                    constraint.argument,
                    constraint.rule
                )
            })
            .collect()
    }
}

/// How a call's arguments are checked against its tool's schema, compiled once
/// per binding.
#[derive(Debug)]
enum ArgumentCheck {
    /// A built-in: [`ToolCall::parse`] checks the arguments.
    Builtin,
    /// An upstream tool: its `inputSchema`, compiled.
    Schema(Box<jsonschema::Validator>),
    /// An upstream tool whose `inputSchema` does not compile: every call is refused.
    Unusable(String),
}

/// Something `bind` noticed about a policy over a given catalog. Errors make a
/// call fail or be refused for reasons of the policy; warnings are rules that
/// have no effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// A rule's exact name or glob matches no tool of the catalog.
    Unmatched {
        /// Where the rule is, e.g. `modes.NORMAL.allowed_tools`.
        at: String,
        /// The name or glob as written.
        pattern: String,
    },
    /// A constraint names an argument the tool's schema does not have, so no
    /// call can pass it.
    UnknownArgument {
        /// Where the constraint is.
        at: String,
        /// The tool's exposed name.
        tool: String,
        /// The argument the constraint names.
        argument: String,
        /// The schema's top-level properties.
        known: Vec<String>,
    },
    /// A constraint's kind (integer or string) does not fit the schema's type.
    WrongType {
        /// Where the constraint is.
        at: String,
        /// The tool's exposed name.
        tool: String,
        /// The argument the constraint names.
        argument: String,
        /// What the constraint compares: `integer` or `string`.
        expected: &'static str,
        /// The types the schema gives the argument.
        schema_types: Vec<String>,
    },
    /// The tool's `inputSchema` is not a usable JSON Schema; its calls are refused.
    UnusableSchema {
        /// The tool's exposed name.
        tool: String,
        /// The compile error.
        error: String,
    },
}

impl Finding {
    /// Whether the finding is an error (rather than a rule without effect).
    pub fn is_error(&self) -> bool {
        !matches!(self, Finding::Unmatched { .. })
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Unmatched { at, pattern } => {
                write!(f, "{at}: '{pattern}' matches no tool")
            }
            Finding::UnknownArgument {
                at,
                tool,
                argument,
                known,
            } => {
                if known.is_empty() {
                    write!(
                        f,
                        "{at}: '{tool}' takes no arguments, so no call can meet a constraint on '{argument}'"
                    )
                } else {
                    write!(
                        f,
                        "{at}: '{tool}' has no argument '{argument}' (its arguments: {})",
                        known.join(", ")
                    )
                }
            }
            Finding::WrongType {
                at,
                tool,
                argument,
                expected,
                schema_types,
            } => write!(
                f,
                "{at}: the constraint compares {expected}s, but '{tool}' declares '{argument}' as {}",
                schema_types.join(" or ")
            ),
            Finding::UnusableSchema { tool, error } => write!(
                f,
                "'{tool}': its inputSchema is not a usable JSON Schema ({error}); every call to it is refused"
            ),
        }
    }
}

/// A validated policy bound to a catalog, ready to decide calls. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PolicyEngine {
    rules: Arc<PolicyRules>,
    catalog: Arc<Catalog>,
    modes: Arc<[Mode]>,
    always_blocked: ToolBits,
    checks: Arc<[ArgumentCheck]>,
    findings: Arc<[Finding]>,
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
    upstreams: BTreeMap<String, UpstreamDeclaration>,
    #[serde(default)]
    simulated_cloud: Option<bool>,
    #[serde(default)]
    drain_timeout_seconds: Option<u64>,
    #[serde(default)]
    elevation_requests: bool,
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
    #[serde(default)]
    guards: crate::guards::GuardDocuments,
    #[serde(default)]
    require_approval: BTreeMap<String, BTreeMap<String, ConstraintDocument>>,
    #[serde(default)]
    approval_ttl_seconds: Option<u64>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConstraintDocument {
    #[serde(default)]
    min: Option<i64>,
    #[serde(default)]
    max: Option<i64>,
    #[serde(default)]
    one_of: Option<Vec<Value>>,
    #[serde(default)]
    pattern: Option<String>,
}

impl PolicyEngine {
    /// Reads and validates a policy file, bound to its offline catalog.
    pub fn load(path: &Path) -> Result<PolicyEngine, PolicyError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| PolicyError::Read {
            source_name: source_name.clone(),
            error,
        })?;
        PolicyEngine::from_json(&text, &source_name)
    }

    /// Validates policy JSON; `source_name` names it in error messages. The engine
    /// is bound to the catalog known offline: the built-ins, unless the policy
    /// declares `upstreams` without `"simulated_cloud": true` (then it is empty
    /// until [`PolicyEngine::bind`] gives it the upstreams' tools).
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
        let parse_error = |error| PolicyError::Parse {
            source_name: source_name.to_owned(),
            error,
        };
        // Typed straight from the text, so errors keep their line and column.
        let document: PolicyDocument = serde_json::from_str(text).map_err(parse_error)?;
        let value: Value = serde_json::from_str(text).map_err(parse_error)?;
        let policy_hash = crate::canonical::canonical_digest(&value);
        let invalid = |problems| PolicyError::Invalid {
            source_name: source_name.to_owned(),
            problems,
        };
        let mut rules = compile(document).map_err(invalid)?;
        rules.policy_hash = policy_hash;
        let rules = Arc::new(rules);
        let catalog = if rules.simulated_cloud {
            Catalog::builtin()
        } else {
            Catalog::default()
        };
        let engine = bind_rules(rules, Arc::new(catalog));
        // The built-ins are known offline, so a constraint that cannot fit one of
        // them is a load error, not something to learn at connect time.
        let problems: Vec<String> = engine
            .findings
            .iter()
            .filter(|finding| finding.is_error())
            .map(Finding::to_string)
            .collect();
        if problems.is_empty() {
            Ok(engine)
        } else {
            Err(invalid(problems))
        }
    }

    /// The same rules bound to `catalog`: every name and glob resolved to tool
    /// ids, every upstream tool's schema compiled. What did not fit is in
    /// [`PolicyEngine::findings`]; a rule that matches nothing denies nothing
    /// more and allows nothing (default deny).
    pub fn bind(&self, catalog: Arc<Catalog>) -> PolicyEngine {
        bind_rules(Arc::clone(&self.rules), catalog)
    }

    /// The policy's version: the SHA-256 (lowercase hex) of its document's
    /// canonical JSON, so key order and whitespace do not change it. The same
    /// for every binding of the same file.
    pub fn policy_hash(&self) -> &str {
        &self.rules.policy_hash
    }

    /// The stateful guards of `mode` (see [`crate::guards`]).
    pub fn guards(&self, mode: ModeId) -> &crate::guards::ModeGuards {
        &self.rules.modes[mode.index()].guards
    }

    /// Every mode's guards, in mode order.
    pub fn all_guards(&self) -> impl Iterator<Item = &crate::guards::ModeGuards> {
        self.rules.modes.iter().map(|mode| &mode.guards)
    }

    /// Whether any mode has a guard (else no call needs the guard state).
    pub fn has_guards(&self) -> bool {
        self.all_guards().any(|guards| !guards.is_empty())
    }

    /// Whether both engines hold the very same compiled rules (one load of one
    /// document, perhaps bound to different catalogs): then their `ModeId`s agree.
    pub fn same_rules(&self, other: &PolicyEngine) -> bool {
        Arc::ptr_eq(&self.rules, &other.rules)
    }

    /// Every exact (non-glob) tool name the rules write anywhere: always_blocked,
    /// each mode's allowed and blocked tools and constraints. Sorted.
    pub fn named_tools(&self) -> std::collections::BTreeSet<&str> {
        let rules = &self.rules;
        let mode_patterns = rules.modes.iter().flat_map(|mode| {
            mode.allowed
                .iter()
                .chain(&mode.blocked)
                .chain(mode.constraints.iter().map(|constraint| &constraint.tools))
                .chain(mode.approvals.iter().map(|rule| &rule.tools))
        });
        rules
            .always_blocked
            .iter()
            .chain(mode_patterns)
            .filter(|pattern| !pattern.is_glob())
            .map(NamePattern::as_str)
            .collect()
    }

    /// The catalog this engine is bound to.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// What binding noticed, in file order: rules matching no tool, constraints
    /// that do not fit a tool's schema, unusable schemas.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// The upstream MCP servers the policy declares, by name.
    pub fn upstreams(&self) -> &BTreeMap<String, UpstreamDeclaration> {
        &self.rules.upstreams
    }

    /// Whether the catalog includes the six built-in simulated-cloud tools: when
    /// the policy declares no upstreams, or sets `"simulated_cloud": true`.
    pub fn simulated_cloud(&self) -> bool {
        self.rules.simulated_cloud
    }

    /// Checks an upstream tool's arguments against its `inputSchema` (compiled at
    /// bind time). Built-ins are checked by [`ToolCall::parse`] instead and pass here.
    pub fn check_schema(&self, tool: ToolId, arguments: &Value) -> Result<(), String> {
        match self.checks.get(tool.index()) {
            Some(ArgumentCheck::Builtin) => Ok(()),
            Some(ArgumentCheck::Schema(validator)) => match validator.validate(arguments) {
                Ok(()) => Ok(()),
                Err(error) => {
                    let path = error.instance_path().to_string();
                    let message = bounded(&error.to_string(), MAX_SCHEMA_MESSAGE_LEN);
                    Err(if path.is_empty() {
                        message
                    } else {
                        format!("`{path}`: {message}")
                    })
                }
            },
            Some(ArgumentCheck::Unusable(error)) => Err(format!(
                "the tool's inputSchema is not a usable JSON Schema ({error}), so no call to it can be checked"
            )),
            None => Err("the tool is not in this policy's catalog".to_owned()),
        }
    }

    /// Decides whether `tool` may run in `mode` at all, whatever its arguments.
    ///
    /// The tool-level rules, in the seed's order: always_blocked, then the mode's
    /// blocked_tools, then allowed_tools (default deny). A block, exact or glob,
    /// always wins over an allow. The gateway asks this before it looks at the
    /// arguments, so a blocked tool is reported as blocked even when its arguments
    /// are wrong, and a caller who may not use a tool learns nothing about its schema.
    pub fn decide_tool(&self, mode: ModeId, tool: ToolId) -> Decision {
        let deny = |reason| {
            Decision::Deny(Denial {
                tool,
                mode,
                reason,
                constraint: None,
            })
        };
        if self.always_blocked.contains(tool) {
            return deny(Reason::AlwaysBlocked);
        }
        let compiled = self.mode(mode);
        if compiled.blocked.contains(tool) {
            return deny(Reason::BlockedInMode);
        }
        if !compiled.allowed.contains(tool) {
            return deny(Reason::NotAllowed);
        }
        Decision::Allow
    }

    /// Decides whether a call of `tool` with `arguments` (schema-valid) may run in `mode`.
    ///
    /// The tool-level rules first ([`PolicyEngine::decide_tool`]), then the mode's
    /// argument constraints on the top-level arguments.
    pub fn decide(&self, mode: ModeId, tool: ToolId, arguments: CallArguments<'_>) -> Decision {
        if let denied @ Decision::Deny(_) = self.decide_tool(mode, tool) {
            return denied;
        }
        for (index, bound) in self.mode(mode).constraints.iter().enumerate() {
            if bound.tool != tool {
                continue;
            }
            let admitted = arguments
                .get(&bound.constraint.argument)
                .is_some_and(|value| bound.constraint.rule.admits(value));
            if !admitted {
                return Decision::Deny(Denial {
                    tool,
                    mode,
                    reason: Reason::ConstraintViolated,
                    constraint: Some(index),
                });
            }
        }
        Decision::Allow
    }

    /// [`PolicyEngine::decide`] for a parsed built-in call; `None` when the
    /// catalog has no built-ins.
    pub fn decide_builtin(&self, mode: ModeId, call: &ToolCall) -> Option<Decision> {
        let tool = self.catalog.builtin_id(call.tool())?;
        Some(self.decide(mode, tool, CallArguments::Builtin(call)))
    }

    /// Whether an allowed call of `tool` with `arguments` needs a human's approval
    /// in `mode` before it runs: some `require_approval` rule of the mode selects
    /// the tool and all its conditions hold. Asked only after
    /// [`PolicyEngine::decide`] allowed the call.
    pub fn requires_approval(
        &self,
        mode: ModeId,
        tool: ToolId,
        arguments: CallArguments<'_>,
    ) -> bool {
        self.mode(mode)
            .approvals
            .iter()
            .any(|bound| bound.tool == tool && bound.rule.holds(arguments))
    }

    /// Whether any mode has `require_approval` rules, so the gateway can skip the
    /// approval step for every call when none does.
    pub fn has_approval_rules(&self) -> bool {
        self.modes.iter().any(|mode| !mode.approvals.is_empty())
    }

    /// Whether agents may ask for a mode change (`"elevation_requests": true`):
    /// `POST /policy/request-mode` and the MCP tool `request_mode_change`.
    pub fn elevation_requests(&self) -> bool {
        self.rules.elevation_requests
    }

    /// The mode's argument constraints on `tool`, each as a sentence such as
    /// "`count` must be between 1 and 10", in policy order.
    pub fn constraints_on(&self, mode: ModeId, tool: ToolId) -> Vec<String> {
        self.mode(mode)
            .constraints
            .iter()
            .filter(|bound| bound.tool == tool)
            .map(|bound| {
                format!(
                    "`{}` must be {}",
                    bound.constraint.argument, bound.constraint.rule
                )
            })
            .collect()
    }

    /// The mode with this id.
    pub fn mode(&self, mode: ModeId) -> &Mode {
        // ModeIds are only minted by this engine's rules, so the index is in range.
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
        self.rules.default_mode
    }

    /// Catalog tools blocked in every mode.
    pub fn always_blocked(&self) -> ToolSet<'_> {
        ToolSet {
            bits: &self.always_blocked,
            catalog: &self.catalog,
        }
    }

    /// `global_rules.always_blocked` as written: exact names and globs.
    pub fn always_blocked_patterns(&self) -> Vec<&str> {
        self.rules
            .always_blocked
            .iter()
            .map(NamePattern::as_str)
            .collect()
    }

    /// Longest time an operator may hold a non-default mode.
    pub fn max_elevated_ttl(&self) -> Duration {
        self.rules.max_elevated_ttl
    }

    /// How long a mode switch waits for in-flight upstream calls that the new mode
    /// denies before it cancels them (`drain_timeout_seconds`, default 10).
    pub fn drain_timeout(&self) -> Duration {
        self.rules.drain_timeout
    }

    /// The rate-limit rules in force: the policy's `rate_limits`, or the built-in
    /// default ([`crate::rate_limit::default_rules`]) when it has none.
    pub fn rate_limits(&self) -> &[RateLimitRule] {
        &self.rules.rate_limits
    }

    /// Whether [`PolicyEngine::rate_limits`] is the built-in default.
    pub fn rate_limits_are_default(&self) -> bool {
        self.rules.rate_limits_are_default
    }

    /// Whether `tool` passes the tool-level checks in `mode` (constraints aside).
    pub fn permits_tool(&self, mode: ModeId, tool: ToolId) -> bool {
        self.decide_tool(mode, tool) == Decision::Allow
    }

    /// Names of the modes in which `tool` may run at all.
    pub fn modes_permitting(&self, tool: ToolId) -> Vec<&str> {
        self.modes()
            .filter(|(id, _)| self.permits_tool(*id, tool))
            .map(|(_, mode)| mode.name())
            .collect()
    }

    /// Catalog tools that no mode permits: hidden from listings, still decided
    /// (and refused) when called.
    pub fn tools_no_mode_allows(&self) -> Vec<ToolId> {
        self.catalog
            .tools()
            .map(|(id, _)| id)
            .filter(|id| self.modes().all(|(mode, _)| !self.permits_tool(mode, *id)))
            .collect()
    }

    fn tool_name(&self, tool: ToolId) -> &str {
        self.catalog.tool(tool).name()
    }

    /// A sentence explaining a denial, for humans and models.
    pub fn explain(&self, denial: &Denial) -> String {
        let mode = self.mode(denial.mode).name();
        let tool = self.tool_name(denial.tool);
        match denial.reason {
            Reason::AlwaysBlocked => format!(
                "Tool '{tool}' is blocked in every mode by the global rules: destructive operations are never allowed"
            ),
            Reason::BlockedInMode => format!("Tool '{tool}' is blocked in {mode} mode"),
            Reason::NotAllowed => format!(
                "Tool '{tool}' is not among the tools allowed in {mode} mode (default deny)"
            ),
            Reason::ConstraintViolated => match self.violated_constraint(denial) {
                Some(constraint) => format!(
                    "Argument `{}` of '{tool}' must be {} in {mode} mode",
                    constraint.argument, constraint.rule
                ),
                None => format!("Tool '{tool}' violates a constraint of {mode} mode"),
            },
            // Only this module builds a `Denial`, with the four reasons above; a
            // sentence that still names the tool, mode and reason beats a panic.
            other => format!("Tool '{tool}' is refused in {mode} mode ({other})"),
        }
    }

    /// A concrete next step for the caller of a denied tool.
    pub fn how_to_proceed(&self, denial: &Denial) -> String {
        let tool = self.tool_name(denial.tool);
        match denial.reason {
            Reason::AlwaysBlocked => format!(
                "Do not retry: '{tool}' is never allowed through Proxi. If it is truly needed, a human must do it outside the agent, through change management."
            ),
            Reason::BlockedInMode | Reason::NotAllowed => {
                let modes = self.modes_permitting(denial.tool);
                if modes.is_empty() {
                    format!("Do not retry: no mode of this policy allows '{tool}'.")
                } else {
                    let ask = if self.rules.elevation_requests {
                        format!(
                            " You may also request it yourself: POST /policy/request-mode {{\"mode\": \"{}\", \"reason\": \"...\"}}; it takes effect only when an operator approves it.",
                            modes[0]
                        )
                    } else {
                        String::new()
                    };
                    format!(
                        "Do not retry now. Ask an operator to declare {} (the mode(s) that allow '{tool}'); in the meantime use read-only tools to diagnose.{ask}",
                        modes.join(" or ")
                    )
                }
            }
            Reason::ConstraintViolated => match self.violated_constraint(denial) {
                Some(constraint) => format!(
                    "Retry only with `{}` {}.",
                    constraint.argument, constraint.rule
                ),
                None => "Do not retry with the same arguments.".to_owned(),
            },
            // Unreachable, as in `explain`.
            _ => "Do not retry the same call.".to_owned(),
        }
    }

    fn violated_constraint(&self, denial: &Denial) -> Option<&ConstraintRule> {
        denial
            .constraint
            .and_then(|index| self.mode(denial.mode).constraints.get(index))
            .map(|bound| bound.constraint.as_ref())
    }
}

/// The policy in force, swappable as a whole: a re-bind (an upstream's tools
/// changed) builds a new [`PolicyEngine`] and replaces one `Arc`. A caller takes
/// [`SharedPolicy::current`] once per call and decides wholly under it.
#[derive(Debug)]
pub struct SharedPolicy {
    current: RwLock<Arc<PolicyEngine>>,
    /// Serializes writers: a re-bind reads the rules in force and writes them back
    /// bound anew, so without it a re-bind racing a reload could put the old rules back.
    writers: Mutex<()>,
}

impl SharedPolicy {
    /// Starts with `engine`.
    pub fn new(engine: PolicyEngine) -> SharedPolicy {
        SharedPolicy {
            current: RwLock::new(Arc::new(engine)),
            writers: Mutex::new(()),
        }
    }

    /// Makes `engine`'s rules, bound to the catalog in force, the binding in force
    /// (a reload); returns the engine replaced and the one now in force.
    pub fn replace(&self, engine: &PolicyEngine) -> (Arc<PolicyEngine>, Arc<PolicyEngine>) {
        let _one_writer = self.writers.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = self.current();
        let engine = Arc::new(engine.bind(Arc::clone(previous.catalog())));
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&engine);
        (previous, engine)
    }

    /// Makes `engine`, already bound to its own catalog, the binding in force (a
    /// reload that changed the upstreams, hence the catalog); returns the engine
    /// replaced and the one now in force.
    pub fn install(&self, engine: PolicyEngine) -> (Arc<PolicyEngine>, Arc<PolicyEngine>) {
        let _one_writer = self.writers.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = self.current();
        let engine = Arc::new(engine);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&engine);
        (previous, engine)
    }

    /// Puts `engine` back in force if `expected` is still the binding in force
    /// (undoing a reload whose record failed, unless something replaced it since).
    pub fn restore(&self, expected: &Arc<PolicyEngine>, engine: Arc<PolicyEngine>) {
        let _one_writer = self.writers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if current.same_rules(expected) {
            *current = engine;
        }
    }

    /// The binding in force now.
    pub fn current(&self) -> Arc<PolicyEngine> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Binds the same rules to `catalog` and makes that the binding in force.
    /// The new engine is built before the swap, so callers never wait on a bind.
    pub fn rebind(&self, catalog: Arc<Catalog>) -> Arc<PolicyEngine> {
        let _one_writer = self.writers.lock().unwrap_or_else(PoisonError::into_inner);
        let engine = Arc::new(self.current().bind(catalog));
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&engine);
        engine
    }
}

fn bounded(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn bind_rules(rules: Arc<PolicyRules>, catalog: Arc<Catalog>) -> PolicyEngine {
    let mut findings = Vec::new();
    let resolve = |patterns: &[NamePattern], at: &str, findings: &mut Vec<Finding>| {
        let mut bits = ToolBits::empty(catalog.len());
        for pattern in patterns {
            let mut matched = false;
            for (id, tool) in catalog.tools() {
                if pattern.matches(tool.name()) {
                    bits.insert(id);
                    matched = true;
                }
            }
            if !matched {
                findings.push(Finding::Unmatched {
                    at: at.to_owned(),
                    pattern: pattern.as_str().to_owned(),
                });
            }
        }
        bits
    };
    let always_blocked = resolve(
        &rules.always_blocked,
        "global_rules.always_blocked",
        &mut findings,
    );
    let mut modes = Vec::with_capacity(rules.modes.len());
    for (index, mode) in rules.modes.iter().enumerate() {
        let at = format!("modes.{}", mode.name);
        let allowed = resolve(&mode.allowed, &format!("{at}.allowed_tools"), &mut findings);
        let blocked = resolve(&mode.blocked, &format!("{at}.blocked_tools"), &mut findings);
        let mut constraints = Vec::new();
        for constraint in &mode.constraints {
            let at = format!(
                "{at}.constraints.{}.{}",
                constraint.tools.as_str(),
                constraint.argument
            );
            let mut matched = false;
            for (id, tool) in catalog.tools() {
                if !constraint.tools.matches(tool.name()) {
                    continue;
                }
                matched = true;
                check_constraint_fits(tool, constraint, &at, &mut findings);
                constraints.push(BoundConstraint {
                    tool: id,
                    constraint: Arc::clone(constraint),
                });
            }
            if !matched {
                findings.push(Finding::Unmatched {
                    at,
                    pattern: constraint.tools.as_str().to_owned(),
                });
            }
        }
        let approvals = bind_approvals(
            mode,
            &catalog,
            |id| always_blocked.contains(id) || blocked.contains(id) || !allowed.contains(id),
            &at,
            &mut findings,
        );
        modes.push(Mode {
            name: mode.name.clone(),
            description: mode.description.clone(),
            allowed,
            blocked,
            constraints,
            approvals,
            rules: Arc::clone(&rules),
            index,
            catalog: Arc::clone(&catalog),
        });
    }
    let checks = catalog
        .tools()
        .map(|(_, tool)| match tool.origin() {
            ToolOrigin::Builtin(_) => ArgumentCheck::Builtin,
            ToolOrigin::Upstream { .. } => {
                let schema = Value::Object(tool.input_schema().as_ref().clone());
                // No retriever is configured (the crate is built without its
                // HTTP and file resolvers), so a remote `$ref` fails to compile
                // instead of reaching out.
                match jsonschema::options().build(&schema) {
                    Ok(validator) => ArgumentCheck::Schema(Box::new(validator)),
                    Err(error) => {
                        let error = bounded(&error.to_string(), MAX_SCHEMA_MESSAGE_LEN);
                        findings.push(Finding::UnusableSchema {
                            tool: tool.name().to_owned(),
                            error: error.clone(),
                        });
                        ArgumentCheck::Unusable(error)
                    }
                }
            }
        })
        .collect();
    PolicyEngine {
        always_blocked,
        modes: modes.into(),
        checks,
        findings: findings.into(),
        rules,
        catalog,
    }
}

/// Resolves a mode's `require_approval` rules to the tools the mode permits; a
/// rule selecting no permitted tool has no effect and is reported.
fn bind_approvals(
    mode: &ModeRules,
    catalog: &Catalog,
    denied: impl Fn(ToolId) -> bool,
    at: &str,
    findings: &mut Vec<Finding>,
) -> Vec<BoundApproval> {
    let mut approvals = Vec::new();
    for rule in &mode.approvals {
        let at = format!("{at}.require_approval.{}", rule.tools.as_str());
        let mut matched = false;
        for (id, tool) in catalog.tools() {
            if !rule.tools.matches(tool.name()) || denied(id) {
                continue;
            }
            matched = true;
            for condition in &rule.conditions {
                let at = format!("{at}.{}", condition.argument);
                check_constraint_fits(tool, condition, &at, findings);
            }
            approvals.push(BoundApproval {
                tool: id,
                rule: Arc::clone(rule),
            });
        }
        if !matched {
            findings.push(Finding::Unmatched {
                at,
                pattern: rule.tools.as_str().to_owned(),
            });
        }
    }
    approvals
}

/// Whether a constraint can apply to `tool`'s schema: the argument exists and
/// its declared type fits the rule's kind.
fn check_constraint_fits(
    tool: &crate::catalog::CatalogTool,
    constraint: &ConstraintRule,
    at: &str,
    findings: &mut Vec<Finding>,
) {
    let Some(types) = tool.argument_types(&constraint.argument) else {
        findings.push(Finding::UnknownArgument {
            at: at.to_owned(),
            tool: tool.name().to_owned(),
            argument: constraint.argument.clone(),
            known: tool
                .argument_names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        });
        return;
    };
    let (expected, fits): (&'static str, &[&str]) = match constraint.rule.kind() {
        ArgumentKind::Integer => ("integer", &["integer", "number"]),
        ArgumentKind::String => ("string", &["string"]),
    };
    // A property without `type` may hold anything; the rule then decides alone.
    if !types.is_empty() && !types.iter().any(|kind| fits.contains(kind)) {
        findings.push(Finding::WrongType {
            at: at.to_owned(),
            tool: tool.name().to_owned(),
            argument: constraint.argument.clone(),
            expected,
            schema_types: types.into_iter().map(str::to_owned).collect(),
        });
    }
}

/// What tools a policy file can name, known offline.
struct Sources<'a> {
    builtins: bool,
    upstreams: &'a BTreeMap<String, UpstreamDeclaration>,
}

impl Sources<'_> {
    fn upstream_list(&self) -> String {
        if self.upstreams.is_empty() {
            "none".to_owned()
        } else {
            self.upstreams
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        }
    }

    /// Checks a name or glob offline: built-in names exactly, upstream names and
    /// globs for shape and a declared upstream.
    fn check(&self, name: &str) -> Result<NamePattern, String> {
        let pattern = NamePattern {
            text: name.to_owned(),
        };
        let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if name.is_empty() || !name.chars().all(|c| valid_char(c) || c == '*') {
            return Err(format!(
                "'{}' is not a tool name or glob: use A-Z, a-z, 0-9, '_', '-' and '*'",
                name.escape_debug()
            ));
        }
        if name.len() > MAX_EXPOSED_NAME_LEN {
            return Err(format!(
                "'{name}' is longer than {MAX_EXPOSED_NAME_LEN} characters, so no tool can have it"
            ));
        }
        if let Some((upstream, tool)) = name.split_once(SEPARATOR) {
            let declared = self.upstreams.contains_key(upstream);
            if !upstream.contains('*') && !declared {
                if self.upstreams.is_empty() && !pattern.is_glob() {
                    return Err(self.unknown_builtin(name));
                }
                return Err(format!(
                    "'{name}' names upstream '{upstream}', which is not declared in `upstreams` (declared: {})",
                    self.upstream_list()
                ));
            }
            if declared && tool.is_empty() {
                return Err(format!(
                    "'{name}' has no tool name after '{upstream}{SEPARATOR}'"
                ));
            }
            return Ok(pattern);
        }
        if pattern.is_glob() {
            return Ok(pattern);
        }
        if !self.builtins {
            return Err(format!(
                "'{name}' is not an upstream tool name (<upstream>{SEPARATOR}<tool>), and this policy has no built-in tools (set \"simulated_cloud\": true to include them)"
            ));
        }
        match ToolName::parse(name) {
            Some(_) => Ok(pattern),
            None => Err(self.unknown_builtin(name)),
        }
    }

    fn unknown_builtin(&self, name: &str) -> String {
        format!("no tool is named '{name}' (known tools: {})", known_tools())
    }
}

fn compile(document: PolicyDocument) -> Result<PolicyRules, Vec<String>> {
    let mut problems = Vec::new();
    if document.modes.is_empty() {
        problems.push("`modes` must define at least one mode".to_owned());
    }
    if document.modes.len() > usize::from(u8::MAX) {
        problems.push("a policy may define at most 255 modes".to_owned());
    }
    for (name, declaration) in &document.upstreams {
        // Offline, every `${VAR}` stands for a placeholder: the shape is checked
        // now, the variables when Proxi starts (or `policy check --connect`).
        if let Err(error) = declaration.resolve(name, &|_| Some("placeholder".to_owned())) {
            problems.push(format!("upstreams.{name}: {error}"));
        }
    }
    let simulated_cloud = match document.simulated_cloud {
        Some(on) => on,
        None => document.upstreams.is_empty(),
    };
    if !simulated_cloud && document.upstreams.is_empty() {
        problems.push(
            "\"simulated_cloud\": false and no `upstreams`: the policy would have no tools"
                .to_owned(),
        );
    }
    let sources = Sources {
        builtins: simulated_cloud,
        upstreams: &document.upstreams,
    };

    let always_blocked = name_list(
        &sources,
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
        let allowed = name_list(
            &sources,
            &mode.allowed_tools,
            &format!("{at}.allowed_tools"),
            &mut problems,
        );
        let blocked = name_list(
            &sources,
            &mode.blocked_tools,
            &format!("{at}.blocked_tools"),
            &mut problems,
        );
        for tool in &allowed {
            if blocked.contains(tool) {
                problems.push(format!(
                    "{at}: '{}' is in both allowed_tools and blocked_tools",
                    tool.as_str()
                ));
            }
            if always_blocked.contains(tool) {
                problems.push(format!(
                    "{at}.allowed_tools: '{}' is in global_rules.always_blocked, so allowing it here has no effect",
                    tool.as_str()
                ));
            }
        }
        let constraints = compile_constraints(
            &sources,
            &mode.constraints,
            &format!("{at}.constraints"),
            &mut problems,
        );
        let approvals = compile_approvals(
            &sources,
            mode,
            (&allowed, &blocked, &always_blocked),
            &at,
            &mut problems,
        );
        let approval_ttl = match mode.approval_ttl_seconds {
            None => DEFAULT_APPROVAL_TTL,
            Some(seconds) if seconds == 0 || seconds > MAX_APPROVAL_TTL_SECONDS => {
                problems.push(format!(
                    "{at}.approval_ttl_seconds must be between 1 and {MAX_APPROVAL_TTL_SECONDS}, got {seconds}"
                ));
                DEFAULT_APPROVAL_TTL
            }
            Some(seconds) => Duration::from_secs(seconds),
        };
        let guards_at = format!("{at}.guards");
        let mut guarded = Vec::with_capacity(mode.guards.len());
        for (tool, guard) in &mode.guards {
            match sources.check(tool) {
                Ok(pattern) => guarded.push((pattern, guard)),
                Err(problem) => problems.push(format!("{guards_at}: {problem}")),
            }
        }
        let guards = crate::guards::ModeGuards::compile(guarded, &guards_at, &mut problems);
        modes.push(ModeRules {
            name: name.clone(),
            description: mode.description.clone(),
            allowed,
            blocked,
            constraints,
            guards,
            approvals,
            approval_ttl,
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
        Some(index) if problems.is_empty() => Ok(PolicyRules {
            modes,
            // At most 255 modes were checked above, so the index fits.
            default_mode: ModeId(index as u8),
            always_blocked,
            max_elevated_ttl,
            rate_limits,
            rate_limits_are_default,
            upstreams: document.upstreams,
            simulated_cloud,
            drain_timeout,
            elevation_requests: document.elevation_requests,
            // Set by the caller, which holds the document's text.
            policy_hash: String::new(),
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

fn name_list(
    sources: &Sources<'_>,
    names: &[String],
    at: &str,
    problems: &mut Vec<String>,
) -> Vec<NamePattern> {
    let mut list: Vec<NamePattern> = Vec::with_capacity(names.len());
    for name in names {
        match sources.check(name) {
            Ok(pattern) if list.contains(&pattern) => {
                problems.push(format!("{at}: '{name}' is listed twice"));
            }
            Ok(pattern) => list.push(pattern),
            Err(problem) => problems.push(format!("{at}: {problem}")),
        }
    }
    list
}

fn compile_constraints(
    sources: &Sources<'_>,
    constraints: &BTreeMap<String, BTreeMap<String, ConstraintDocument>>,
    at: &str,
    problems: &mut Vec<String>,
) -> Vec<Arc<ConstraintRule>> {
    let mut compiled = Vec::new();
    for (tool_name, arguments) in constraints {
        let tools = match sources.check(tool_name) {
            Ok(tools) => tools,
            Err(problem) => {
                problems.push(format!("{at}: {problem}"));
                continue;
            }
        };
        // An exact built-in name is checked against its arguments now, as always;
        // globs and upstream tools are checked against schemas at bind time.
        let builtin = (!tools.is_glob())
            .then(|| ToolName::parse(tool_name))
            .flatten();
        for (argument_name, document) in arguments {
            let at = format!("{at}.{tool_name}.{argument_name}");
            let known_kind = match builtin {
                None => None,
                Some(tool) => match tool.argument_kind(argument_name) {
                    Some(kind) => Some(kind),
                    None => {
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
                    }
                },
            };
            for rule in compile_rules(document, known_kind, &at, problems) {
                compiled.push(Arc::new(ConstraintRule {
                    tools: tools.clone(),
                    argument: argument_name.clone(),
                    rule,
                }));
            }
        }
    }
    compiled
}

/// Compiles a mode's `require_approval`: each entry's conditions in the
/// constraints grammar. A tool must be allowed before it can need approval, so an
/// exact name the mode does not allow (or blocks) is a load error; a glob is
/// resolved at bind time against the tools the mode permits.
fn compile_approvals(
    sources: &Sources<'_>,
    mode: &ModeDocument,
    (allowed, blocked, always_blocked): (&[NamePattern], &[NamePattern], &[NamePattern]),
    at: &str,
    problems: &mut Vec<String>,
) -> Vec<Arc<ApprovalRule>> {
    let at = format!("{at}.require_approval");
    let mut rules = Vec::new();
    for (tool_name, arguments) in &mode.require_approval {
        let tools = match sources.check(tool_name) {
            Ok(tools) => tools,
            Err(problem) => {
                problems.push(format!("{at}: {problem}"));
                continue;
            }
        };
        if !tools.is_glob() {
            let selects = |patterns: &[NamePattern]| patterns.iter().any(|p| p.matches(tool_name));
            if !selects(allowed) || selects(blocked) || selects(always_blocked) {
                problems.push(format!(
                    "{at}: '{tool_name}' is not allowed in this mode, so it can never need approval here (allow it in allowed_tools first)"
                ));
                continue;
            }
        }
        let single = BTreeMap::from([(tool_name.clone(), arguments.clone())]);
        let before = problems.len();
        let conditions = compile_constraints(sources, &single, &at, problems);
        if problems.len() == before {
            rules.push(Arc::new(ApprovalRule { tools, conditions }));
        }
    }
    rules
}

/// The rules of one constraint object. `known_kind` is the argument's kind when
/// the tool is a built-in; otherwise the kind follows from the rules written.
fn compile_rules(
    document: &ConstraintDocument,
    known_kind: Option<ArgumentKind>,
    at: &str,
    problems: &mut Vec<String>,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    let has_range = document.min.is_some() || document.max.is_some();
    if !has_range && document.one_of.is_none() && document.pattern.is_none() {
        problems.push(format!(
            "{at}: give at least one of min, max, one_of or pattern"
        ));
        return rules;
    }
    if has_range && document.pattern.is_some() {
        problems.push(format!(
            "{at}: min and max apply to integers and pattern to strings; one argument cannot have both"
        ));
        return rules;
    }
    let kind = known_kind.or(if has_range {
        Some(ArgumentKind::Integer)
    } else if document.pattern.is_some() {
        Some(ArgumentKind::String)
    } else {
        None
    });
    if has_range {
        if kind != Some(ArgumentKind::Integer) {
            problems.push(format!("{at}: min and max apply to integer arguments only"));
        } else if let (Some(min), Some(max)) = (document.min, document.max)
            && min > max
        {
            problems.push(format!("{at}: min ({min}) is greater than max ({max})"));
        } else {
            rules.push(Rule::Range {
                min: document.min,
                max: document.max,
            });
        }
    }
    if let Some(source) = &document.pattern {
        if kind != Some(ArgumentKind::String) {
            problems.push(format!("{at}: pattern applies to string arguments only"));
        } else {
            match compile_pattern(source) {
                Ok(rule) => rules.push(rule),
                Err(problem) => problems.push(format!("{at}.pattern: {problem}")),
            }
        }
    }
    if let Some(values) = &document.one_of {
        match one_of_rule(values, kind) {
            Ok(rule) => rules.push(rule),
            Err(problem) => problems.push(format!("{at}.one_of: {problem}")),
        }
    }
    rules
}

/// Compiles `source` so that it must match the whole value: `^(?:source)$`, so
/// an alternation such as `a|b` cannot match a prefix or suffix only.
fn compile_pattern(source: &str) -> Result<Rule, String> {
    if source.len() > MAX_PATTERN_LEN {
        return Err(format!("must be at most {MAX_PATTERN_LEN} bytes"));
    }
    regex::RegexBuilder::new(&format!("^(?:{source})$"))
        .size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map(|regex| Rule::Pattern {
            source: source.to_owned(),
            regex,
        })
        .map_err(|error| {
            format!(
                "not a valid regular expression: {}",
                error.to_string().replace('\n', " ")
            )
        })
}

fn one_of_rule(values: &[Value], kind: Option<ArgumentKind>) -> Result<Rule, String> {
    if values.is_empty() {
        return Err("must list at least one value".to_owned());
    }
    let kind = kind.unwrap_or(if values.iter().all(Value::is_i64) {
        ArgumentKind::Integer
    } else if values.iter().all(Value::is_string) {
        ArgumentKind::String
    } else {
        return Err("values must be all integers or all strings".to_owned());
    });
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

    fn decide(engine: &PolicyEngine, mode: ModeId, call: &ToolCall) -> Decision {
        engine
            .decide_builtin(mode, call)
            .expect("the catalog has the built-ins")
    }

    fn id(engine: &PolicyEngine, tool: ToolName) -> ToolId {
        engine.catalog().builtin_id(tool).expect("a built-in")
    }

    fn reason(engine: &PolicyEngine, mode: &str, call: &ToolCall) -> Option<Reason> {
        match decide(engine, engine.mode_id(mode).unwrap(), call) {
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
            Some(Reason::BlockedInMode)
        );
        assert_eq!(reason(&engine, "EMERGENCY", &restart), None);
        assert_eq!(
            reason(&engine, "EMERGENCY", &delete),
            Some(Reason::AlwaysBlocked)
        );
        assert_eq!(
            reason(&engine, "NORMAL", &delete),
            Some(Reason::AlwaysBlocked)
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
            Some(Reason::ConstraintViolated)
        );
        assert_eq!(reason(&engine, "EMERGENCY", &ok), None);
        let Decision::Deny(denial) = decide(&engine, engine.mode_id("EMERGENCY").unwrap(), &big)
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
            Some(Reason::ConstraintViolated)
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
            Some(Reason::NotAllowed)
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

    /// An upstream `fs` with read, write and delete tools, behind `policy`.
    fn fs_engine(policy: Value) -> PolicyEngine {
        let engine = PolicyEngine::from_json(&policy.to_string(), "fs.json").unwrap();
        let path = json!({"type": "object", "properties": {"path": {"type": "string"},
            "depth": {"type": "integer"}}, "required": ["path"]});
        let listing = crate::catalog::tests::listing(
            "fs",
            &[
                ("read_file", path.clone()),
                ("read_dir", path.clone()),
                ("write_file", path.clone()),
                ("delete_file", path),
            ],
        );
        engine.bind(Arc::new(Catalog::from_sources(
            engine.simulated_cloud(),
            [("fs", &listing)],
        )))
    }

    fn fs_policy(modes: Value) -> Value {
        json!({"upstreams": {"fs": {"command": "fs-server"}},
               "global_rules": {"always_blocked": ["fs__delete_*"]},
               "modes": modes})
    }

    fn tool_reason(engine: &PolicyEngine, mode: &str, tool: &str) -> Option<Reason> {
        let id = engine.catalog().lookup(tool).expect("in the catalog");
        match engine.decide_tool(engine.mode_id(mode).unwrap(), id) {
            Decision::Allow => None,
            Decision::Deny(denial) => Some(denial.reason),
        }
    }

    #[test]
    fn globs_resolve_against_the_catalog_and_any_block_beats_an_allow() {
        let engine = fs_engine(fs_policy(json!({
            "NORMAL": {"allowed_tools": ["fs__read_*"], "blocked_tools": ["fs__read_dir"]},
            "EMERGENCY": {"allowed_tools": ["fs__*"]}
        })));
        assert_eq!(tool_reason(&engine, "NORMAL", "fs__read_file"), None);
        // An exact block wins over a glob allow.
        assert_eq!(
            tool_reason(&engine, "NORMAL", "fs__read_dir"),
            Some(Reason::BlockedInMode)
        );
        // Default deny: nothing allows writes in NORMAL.
        assert_eq!(
            tool_reason(&engine, "NORMAL", "fs__write_file"),
            Some(Reason::NotAllowed)
        );
        assert_eq!(tool_reason(&engine, "EMERGENCY", "fs__write_file"), None);
        // A global glob block wins over `fs__*`.
        assert_eq!(
            tool_reason(&engine, "EMERGENCY", "fs__delete_file"),
            Some(Reason::AlwaysBlocked)
        );
        let normal = engine.mode(engine.mode_id("NORMAL").unwrap());
        assert_eq!(normal.allowed().names(), ["fs__read_file", "fs__read_dir"]);
        assert_eq!(normal.allowed_patterns(), ["fs__read_*"]);
        assert_eq!(engine.always_blocked().names(), ["fs__delete_file"]);
        let hidden: Vec<&str> = engine
            .tools_no_mode_allows()
            .into_iter()
            .map(|id| engine.catalog().tool(id).name())
            .collect();
        assert_eq!(hidden, ["fs__delete_file"]);
    }

    #[test]
    fn a_policy_with_upstreams_has_no_builtins_unless_it_asks_for_them() {
        let engine = fs_engine(fs_policy(
            json!({"NORMAL": {"allowed_tools": ["fs__read_*"]}}),
        ));
        assert!(!engine.simulated_cloud());
        assert_eq!(engine.catalog().lookup("list_services"), None);
        let message = problems(fs_policy(
            json!({"NORMAL": {"allowed_tools": ["list_services"]}}),
        ));
        assert!(
            message.contains("set \"simulated_cloud\": true"),
            "{message}"
        );

        let mut both =
            fs_policy(json!({"NORMAL": {"allowed_tools": ["list_services", "fs__read_file"]}}));
        both["simulated_cloud"] = json!(true);
        let engine = fs_engine(both);
        assert!(engine.simulated_cloud());
        assert_eq!(tool_reason(&engine, "NORMAL", "list_services"), None);
        assert_eq!(tool_reason(&engine, "NORMAL", "fs__read_file"), None);
        assert_eq!(
            tool_reason(&engine, "NORMAL", "read_logs"),
            Some(Reason::NotAllowed)
        );
        // Without upstreams nothing changes: the six built-ins.
        assert_eq!(shipped().catalog().len(), 6);
    }

    #[test]
    fn upstream_names_and_globs_are_checked_for_shape_offline() {
        let message = problems(fs_policy(json!({"NORMAL": {
            "allowed_tools": ["git__log", "fs__", "fs__read file", "fs__read_*", "fs__read_*"],
            "constraints": {"ops__*": {"x": {"min": 1}}}
        }})));
        for expected in [
            "'git__log' names upstream 'git', which is not declared in `upstreams` (declared: fs)",
            "'fs__' has no tool name after 'fs__'",
            "'fs__read file' is not a tool name or glob",
            "'fs__read_*' is listed twice",
            "'ops__*' names upstream 'ops'",
        ] {
            assert!(
                message.contains(expected),
                "missing {expected:?} in {message}"
            );
        }
        // A built-in-only policy keeps today's message for upstream-looking names.
        let message = problems(json!({"modes": {"NORMAL": {"allowed_tools": ["fs__read"]}}}));
        assert!(message.contains("no tool is named 'fs__read'"), "{message}");
        let message =
            problems(json!({"upstreams": {"Bad": {"command": "x"}}, "modes": {"NORMAL": {}}}));
        assert!(
            message.contains("upstreams.Bad: upstream name \"Bad\" is invalid"),
            "{message}"
        );
        let message = problems(
            json!({"upstreams": {"fs": {"command": "x", "url": "http://h"}}, "modes": {"NORMAL": {}}}),
        );
        assert!(message.contains("sets both"), "{message}");
    }

    #[test]
    fn pattern_constraints_must_match_the_whole_string() {
        let engine = fs_engine(fs_policy(json!({"NORMAL": {
            "allowed_tools": ["fs__write_file", "fs__read_file"],
            "constraints": {
                "fs__write_file": {"path": {"pattern": "/srv/incidents/[^/]+|/tmp/x"}},
                "fs__read_*": {"depth": {"min": 1, "max": 3}}
            }
        }})));
        let normal = engine.mode_id("NORMAL").unwrap();
        let write = engine.catalog().lookup("fs__write_file").unwrap();
        let read = engine.catalog().lookup("fs__read_file").unwrap();
        let decide_path = |tool, arguments: Value| {
            let arguments = arguments.as_object().cloned().unwrap();
            match engine.decide(normal, tool, CallArguments::Json(&arguments)) {
                Decision::Allow => None,
                Decision::Deny(denial) => Some(denial.reason),
            }
        };
        assert_eq!(
            decide_path(write, json!({"path": "/srv/incidents/a.md"})),
            None
        );
        assert_eq!(decide_path(write, json!({"path": "/tmp/x"})), None);
        for outside in [
            "/srv/incidents/a/../../etc/passwd",
            "/srv/incidents/",
            "x/srv/incidents/a",
            "/tmp/x/y",
            "/tmp/xy",
        ] {
            assert_eq!(
                decide_path(write, json!({"path": outside})),
                Some(Reason::ConstraintViolated),
                "{outside}"
            );
        }
        // Absent or mistyped arguments fail closed.
        assert_eq!(
            decide_path(write, json!({})),
            Some(Reason::ConstraintViolated)
        );
        assert_eq!(
            decide_path(write, json!({"path": 7})),
            Some(Reason::ConstraintViolated)
        );
        assert_eq!(decide_path(read, json!({"path": "a", "depth": 2})), None);
        let Decision::Deny(denial) = engine.decide(
            normal,
            read,
            CallArguments::Json(json!({"path": "a", "depth": 9}).as_object().unwrap()),
        ) else {
            panic!("depth 9 is over the max");
        };
        assert_eq!(
            engine.explain(&denial),
            "Argument `depth` of 'fs__read_file' must be between 1 and 3 in NORMAL mode"
        );
        assert_eq!(
            engine.constraints_on(normal, write),
            ["`path` must be a string that wholly matches the pattern /srv/incidents/[^/]+|/tmp/x"]
        );
        // Built-in string arguments take patterns too.
        let engine = PolicyEngine::from_json(
            &json!({"modes": {"NORMAL": {"allowed_tools": ["restart_service"],
                "constraints": {"restart_service": {"service_name": {"pattern": "web-.*"}}}}}})
            .to_string(),
            "t",
        )
        .unwrap();
        let web = call(ToolName::RestartService, json!({"service_name": "web-1"}));
        let db = call(
            ToolName::RestartService,
            json!({"service_name": "db-web-1"}),
        );
        assert_eq!(reason(&engine, "NORMAL", &web), None);
        assert_eq!(
            reason(&engine, "NORMAL", &db),
            Some(Reason::ConstraintViolated)
        );
    }

    fn approvals_engine(require: Value) -> PolicyEngine {
        PolicyEngine::from_json(
            &json!({"elevation_requests": true, "modes": {
                "NORMAL": {"allowed_tools": ["list_services"]},
                "EMERGENCY": {"allowed_tools": ["list_services", "scale_fleet", "restart_service"],
                    "require_approval": require, "approval_ttl_seconds": 120}}})
            .to_string(),
            "t",
        )
        .unwrap()
    }

    fn needs_approval(engine: &PolicyEngine, mode: &str, call: &ToolCall) -> bool {
        let tool = id(engine, call.tool());
        let mode = engine.mode_id(mode).unwrap();
        engine.requires_approval(mode, tool, CallArguments::Builtin(call))
    }

    #[test]
    fn approval_rules_use_the_constraints_grammar_and_empty_means_always() {
        let engine = approvals_engine(json!({
            "scale_fleet": {"count": {"min": 6}},
            "restart_service": {"service_name": {"one_of": ["database"]}},
            "list_services": {}
        }));
        let scale = |count| call(ToolName::ScaleFleet, json!({ "count": count }));
        assert!(!needs_approval(&engine, "EMERGENCY", &scale(5)));
        assert!(needs_approval(&engine, "EMERGENCY", &scale(6)));
        let restart = |name| call(ToolName::RestartService, json!({ "service_name": name }));
        assert!(needs_approval(&engine, "EMERGENCY", &restart("database")));
        assert!(!needs_approval(
            &engine,
            "EMERGENCY",
            &restart("web-server")
        ));
        let list = call(ToolName::ListServices, json!({}));
        assert!(needs_approval(&engine, "EMERGENCY", &list));
        // Rules are per mode: NORMAL has none.
        assert!(!needs_approval(&engine, "NORMAL", &list));
        assert!(engine.has_approval_rules());
        assert!(engine.elevation_requests());
        let emergency = engine.mode(engine.mode_id("EMERGENCY").unwrap());
        assert_eq!(emergency.approval_ttl(), Duration::from_secs(120));
        assert_eq!(
            engine
                .mode(engine.mode_id("NORMAL").unwrap())
                .approval_ttl(),
            DEFAULT_APPROVAL_TTL
        );
        assert_eq!(
            emergency.approval_rules(),
            [
                ("list_services", "always".to_owned()),
                (
                    "restart_service",
                    "when `service_name` is one of database".to_owned()
                ),
                ("scale_fleet", "when `count` is at least 6".to_owned()),
            ]
        );
        assert!(!shipped().has_approval_rules());
        assert!(!shipped().elevation_requests());
    }

    #[test]
    fn approval_rules_on_tools_the_mode_does_not_allow_are_load_errors() {
        let message = problems(json!({"modes": {"NORMAL": {
            "allowed_tools": ["list_services"], "blocked_tools": ["scale_fleet"],
            "require_approval": {"scale_fleet": {}, "read_logs": {}, "list_services": {"nope": {"min": 1}}},
            "approval_ttl_seconds": 0}}}));
        assert!(
            message.contains(
                "modes.NORMAL.require_approval: 'scale_fleet' is not allowed in this mode"
            ),
            "{message}"
        );
        assert!(
            message.contains("modes.NORMAL.require_approval: 'read_logs' is not allowed"),
            "{message}"
        );
        assert!(
            message.contains("modes.NORMAL.require_approval.list_services.nope"),
            "{message}"
        );
        assert!(
            message.contains("approval_ttl_seconds must be between 1 and 86400"),
            "{message}"
        );
        let message = problems(json!({"modes": {"NORMAL": {"approval_ttl_seconds": 86401}}}));
        assert!(message.contains("got 86401"), "{message}");
        // A glob binds only to the tools the mode permits; none → a finding.
        let engine = fs_engine(fs_policy(json!({"NORMAL": {
            "allowed_tools": ["fs__read_*"],
            "require_approval": {"fs__*": {}, "fs__write_*": {}}}})));
        let normal = engine.mode_id("NORMAL").unwrap();
        let tool = |name| engine.catalog().lookup(name).unwrap();
        let empty = Map::new();
        assert!(engine.requires_approval(
            normal,
            tool("fs__read_file"),
            CallArguments::Json(&empty)
        ));
        assert!(!engine.requires_approval(
            normal,
            tool("fs__write_file"),
            CallArguments::Json(&empty)
        ));
        assert!(engine.findings().iter().any(|finding| finding.to_string()
            == "modes.NORMAL.require_approval.fs__write_*: 'fs__write_*' matches no tool"));
    }

    #[test]
    fn an_approval_condition_on_an_absent_argument_holds() {
        let engine = fs_engine(fs_policy(json!({"NORMAL": {
            "allowed_tools": ["fs__read_file"],
            "require_approval": {"fs__read_file": {"depth": {"min": 3}}}}})));
        let normal = engine.mode_id("NORMAL").unwrap();
        let read = engine.catalog().lookup("fs__read_file").unwrap();
        let args = |value: Value| value.as_object().cloned().unwrap();
        let shallow = args(json!({"path": "/a", "depth": 1}));
        let deep = args(json!({"path": "/a", "depth": 3}));
        let absent = args(json!({"path": "/a"}));
        assert!(!engine.requires_approval(normal, read, CallArguments::Json(&shallow)));
        assert!(engine.requires_approval(normal, read, CallArguments::Json(&deep)));
        assert!(engine.requires_approval(normal, read, CallArguments::Json(&absent)));
    }

    #[test]
    fn mistyped_or_malformed_patterns_are_load_errors() {
        let message = problems(json!({"modes": {"NORMAL": {"constraints": {
            "scale_fleet": {"count": {"pattern": "1"}},
            "restart_service": {"service_name": {"pattern": "(unclosed"}}
        }}}}));
        assert!(
            message.contains("pattern applies to string arguments only"),
            "{message}"
        );
        assert!(
            message.contains("not a valid regular expression"),
            "{message}"
        );
        let message = problems(fs_policy(json!({"NORMAL": {"constraints": {
            "fs__write_file": {"path": {"pattern": "a", "min": 1}, "depth": {"one_of": [1, "two"]}}
        }}})));
        assert!(
            message.contains("one argument cannot have both"),
            "{message}"
        );
        assert!(message.contains("all integers or all strings"), "{message}");
    }

    #[test]
    fn binding_reports_rules_without_effect_and_constraints_that_cannot_fit() {
        let engine = fs_engine(fs_policy(json!({"NORMAL": {
            "allowed_tools": ["fs__read_*", "fs__list_*", "fs__gone"],
            "constraints": {
                "fs__read_file": {"mode": {"one_of": ["r"]}},
                "fs__write_file": {"path": {"min": 1}}
            }
        }})));
        let findings: Vec<String> = engine.findings().iter().map(ToString::to_string).collect();
        for expected in [
            "modes.NORMAL.allowed_tools: 'fs__list_*' matches no tool",
            "modes.NORMAL.allowed_tools: 'fs__gone' matches no tool",
            "'fs__read_file' has no argument 'mode' (its arguments: path, depth)",
            "the constraint compares integers, but 'fs__write_file' declares 'path' as string",
        ] {
            assert!(
                findings.iter().any(|finding| finding.contains(expected)),
                "missing {expected:?} in {findings:?}"
            );
        }
        let errors = engine.findings().iter().filter(|f| f.is_error()).count();
        assert_eq!(errors, 2, "{findings:?}");
        // Offline, a glob over the built-ins that cannot fit is a load error.
        let message = problems(json!({"modes": {"NORMAL": {"constraints": {
            "*_service": {"count": {"max": 3}}
        }}}}));
        assert!(
            message.contains("'restart_service' has no argument 'count'"),
            "{message}"
        );
    }

    #[test]
    fn rebinding_swaps_the_whole_binding_at_once() {
        let engine = fs_engine(fs_policy(json!({"NORMAL": {"allowed_tools": ["fs__*"]}})));
        let shared = SharedPolicy::new(engine);
        let before = shared.current();
        assert_eq!(before.catalog().len(), 4);
        let smaller =
            crate::catalog::tests::listing("fs", &[("read_file", json!({"type": "object"}))]);
        let after = shared.rebind(Arc::new(Catalog::from_sources(false, [("fs", &smaller)])));
        assert_eq!(after.catalog().len(), 1);
        assert_eq!(shared.current().catalog().len(), 1);
        // A call already holding the old binding keeps deciding under it.
        assert_eq!(before.catalog().len(), 4);
        assert_eq!(tool_reason(&after, "NORMAL", "fs__read_file"), None);
    }

    /// A glob over a-c letters, or an exact name: the shapes the glob tests draw from.
    fn any_pattern() -> impl Strategy<Value = String> {
        prop_oneof![
            "up__[abc]{1,3}",
            "up__[abc*]{0,3}\\*",
            "\\*[abc]{0,2}",
            "up__\\*"
        ]
    }

    proptest! {
        #[test]
        fn globs_match_like_the_equivalent_regex(pattern in "[ab*]{0,6}", name in "[ab]{0,6}") {
            let reference = regex::Regex::new(&format!("^{}$", pattern.replace('*', ".*"))).unwrap();
            let glob = NamePattern { text: pattern.clone() };
            prop_assert_eq!(glob.matches(&name), reference.is_match(&name));
        }

        /// A `pattern` matches whole values only: a literal pattern admits exactly
        /// itself, never a value that merely contains it, and an alternation
        /// cannot match a prefix or suffix of one branch.
        #[test]
        fn patterns_are_anchored(literal in "[a-z/]{1,6}", other in "[a-z/]{1,8}", extra in "[a-z/]{1,3}") {
            let Ok(Rule::Pattern { regex, .. }) = compile_pattern(&format!("{}|zz", regex::escape(&literal))) else {
                panic!("a literal compiles");
            };
            let rule = Rule::Pattern { source: literal.clone(), regex };
            prop_assert!(rule.admits(ArgumentValue::String(&literal)));
            prop_assert_eq!(rule.admits(ArgumentValue::String(&other)), other == literal || other == "zz");
            let longer = format!("{literal}{extra}");
            let prefixed = format!("{extra}{literal}");
            prop_assert!(!rule.admits(ArgumentValue::String(&longer)));
            prop_assert!(!rule.admits(ArgumentValue::String(&prefixed)));
            prop_assert!(!rule.admits(ArgumentValue::Integer(1)));
        }

        /// Precedence over globs, against a reference model: any block (exact or
        /// glob) beats any allow, and a tool no rule allows is denied.
        #[test]
        fn glob_rules_follow_the_precedence_model(
            always in proptest::collection::vec(any_pattern(), 0..3),
            allowed in proptest::collection::vec(any_pattern(), 0..4),
            blocked in proptest::collection::vec(any_pattern(), 0..3),
            tools in proptest::collection::btree_set("[abc]{1,3}", 1..8),
        ) {
            let unique = |list: Vec<String>| {
                let mut seen = Vec::new();
                for item in list { if !seen.contains(&item) { seen.push(item); } }
                seen
            };
            let (always, mut allowed, blocked) = (unique(always), unique(allowed), unique(blocked));
            // Exact overlaps are load errors (tested elsewhere); keep the policy valid.
            allowed.retain(|tool| !always.contains(tool) && !blocked.contains(tool));
            let document = json!({
                "upstreams": {"up": {"command": "x"}},
                "global_rules": {"always_blocked": always},
                "modes": {"NORMAL": {"allowed_tools": allowed, "blocked_tools": blocked}}
            });
            let engine = PolicyEngine::from_json(&document.to_string(), "generated").unwrap();
            let names: Vec<&str> = tools.iter().map(String::as_str).collect();
            let tool_list: Vec<(&str, Value)> = names.iter().map(|n| (*n, json!({"type": "object"}))).collect();
            let listing = crate::catalog::tests::listing("up", &tool_list);
            let engine = engine.bind(Arc::new(Catalog::from_sources(false, [("up", &listing)])));
            let normal = engine.mode_id("NORMAL").unwrap();
            let matches = |list: &[String], name: &str| {
                list.iter().any(|p| NamePattern { text: p.clone() }.matches(name))
            };
            for (id, tool) in engine.catalog().tools() {
                let expected = if matches(&always, tool.name()) {
                    Some(Reason::AlwaysBlocked)
                } else if matches(&blocked, tool.name()) {
                    Some(Reason::BlockedInMode)
                } else if !matches(&allowed, tool.name()) {
                    Some(Reason::NotAllowed)
                } else {
                    None
                };
                let actual = match engine.decide_tool(normal, id) {
                    Decision::Allow => None,
                    Decision::Deny(denial) => Some(denial.reason),
                };
                prop_assert_eq!(actual, expected, "{}", tool.name());
            }
        }
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
                Some(Reason::AlwaysBlocked)
            } else if blocked[index].contains(&tool) {
                Some(Reason::BlockedInMode)
            } else if !allowed[index].contains(&tool) {
                Some(Reason::NotAllowed)
            } else if let (true, ToolCall::ScaleFleet { count }) = (emergency, &call) {
                (!(min..=max).contains(count)).then_some(Reason::ConstraintViolated)
            } else {
                None
            };
            let actual = match decide(&engine, mode, &call) {
                Decision::Allow => None,
                Decision::Deny(denial) => {
                    prop_assert_eq!(denial.tool, id(&engine, tool));
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
            let tool = id(&engine, call.tool());
            let tool_level = engine.decide_tool(mode, tool);
            match decide(&engine, mode, &call) {
                Decision::Deny(denial) if denial.reason == Reason::ConstraintViolated => {
                    prop_assert_eq!(tool_level, Decision::Allow);
                }
                decision => prop_assert_eq!(tool_level, decision),
            }
            prop_assert_eq!(tool_level == Decision::Allow, engine.permits_tool(mode, tool));
        }

        #[test]
        fn always_blocked_tools_never_run_in_any_mode(
            Generated { document, always, .. } in any_policy(),
            call in any_call(),
        ) {
            let engine = PolicyEngine::from_json(&document.to_string(), "generated").unwrap();
            if always.contains(&call.tool()) {
                for (mode, _) in engine.modes() {
                    prop_assert!(matches!(decide(&engine, mode, &call), Decision::Deny(_)));
                }
            }
        }

        #[test]
        fn only_allowed_calls_can_need_approval(
            Generated { document, .. } in any_policy(),
            call in any_call(),
        ) {
            // Every tool of every mode needs approval, always; yet only the calls the
            // mode allows report it.
            let mut document = document;
            for mode in document["modes"].as_object_mut().unwrap().values_mut() {
                let allowed: Vec<Value> = mode["allowed_tools"].as_array().cloned().unwrap_or_default();
                let rules: Map<String, Value> = allowed
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|name| !name.contains('*'))
                    .map(|name| (name.to_owned(), json!({})))
                    .collect();
                mode["require_approval"] = Value::Object(rules);
            }
            // Generated allows are never blocked, so every rule is on an allowed tool.
            let engine = PolicyEngine::from_json(&document.to_string(), "generated").unwrap();
            let tool = id(&engine, call.tool());
            for (mode, _) in engine.modes() {
                prop_assert_eq!(
                    engine.requires_approval(mode, tool, CallArguments::Builtin(&call)),
                    engine.decide_tool(mode, tool) == Decision::Allow
                );
            }
        }

        #[test]
        fn arbitrary_documents_never_panic_the_loader(text in ".{0,200}") {
            let _ = PolicyEngine::from_json(&text, "fuzz");
        }
    }
}
