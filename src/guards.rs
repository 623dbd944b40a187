//! Stateful SRE guards, per mode, under a mode's `"guards"` key (tool name or
//! glob → guards):
//!
//! - `cooldown_seconds` (+ optional `per`: an argument name): a second run of the
//!   tool (for the same value of `per`) inside the window is refused with
//!   `cooldown` and the time left (`retry_after_seconds`);
//! - `max_step`: `scale_fleet` may change the fleet by at most this many instances
//!   per call, relative to the simulated cloud's current size (`step_too_large`).
//!   Proxi knows no current value for any other tool, so `max_step` on one is a
//!   load-time error;
//! - `requires_prior {tool, same, within_seconds}`: the call is allowed only if the
//!   same principal ran `tool` (with the same value of the argument `same`) within
//!   the window (`requires_prior`).
//!
//! Guards apply after the policy allowed a call; a refusal is a policy violation
//! with a `how_to_proceed`. The state ([`GuardState`]) is what ran, when and for
//! whom: filled as calls run, and rebuilt from the audit trail at start. Each of its
//! tables holds at most [`MAX_GUARD_ENTRIES`] keys; a full table forgets its oldest
//! entry, which for `requires_prior` only makes a guard stricter.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use crate::policy::NamePattern;
use crate::reason::Reason;
use crate::tools::ToolName;

/// Keys each guard table holds at most.
pub const MAX_GUARD_ENTRIES: usize = 4096;
/// Longest window a guard may have: 7 days.
pub const MAX_GUARD_WINDOW_SECONDS: u64 = 7 * 24 * 3600;
/// Longest argument value a guard key keeps, in bytes.
const MAX_KEY_VALUE_BYTES: usize = 256;

/// One tool's guards as the policy file writes them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardDocument {
    #[serde(default)]
    cooldown_seconds: Option<u64>,
    #[serde(default)]
    per: Option<String>,
    #[serde(default)]
    max_step: Option<u64>,
    #[serde(default)]
    requires_prior: Option<RequiresPriorDocument>,
}

/// `requires_prior` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequiresPriorDocument {
    tool: String,
    #[serde(default)]
    same: Option<String>,
    within_seconds: u64,
}

/// A cooldown: at most one run per window (per value of `per`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cooldown {
    /// The window.
    pub window: Duration,
    /// The argument whose value has its own window; `None`: the tool as a whole.
    pub per: Option<String>,
}

/// A precondition: the same principal ran `tool` within `within`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequiresPrior {
    /// The tool that must have run first.
    pub tool: String,
    /// The argument whose value must be the same in both calls; `None`: any call of `tool`.
    pub same: Option<String>,
    /// How recent the prior call must be.
    pub within: Duration,
}

/// The guards on the tools one name or glob matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardRule {
    /// The tools guarded.
    pub tools: NamePattern,
    /// `cooldown_seconds` / `per`.
    pub cooldown: Option<Cooldown>,
    /// `max_step` (only `scale_fleet`).
    pub max_step: Option<u64>,
    /// `requires_prior`.
    pub requires_prior: Option<RequiresPrior>,
}

impl std::fmt::Display for GuardRule {
    /// One line, as `policy check` and `policy diff` show it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.tools.as_str())?;
        let mut parts = Vec::new();
        if let Some(cooldown) = &self.cooldown {
            parts.push(match &cooldown.per {
                Some(per) => format!("cooldown {} s per {per}", cooldown.window.as_secs()),
                None => format!("cooldown {} s", cooldown.window.as_secs()),
            });
        }
        if let Some(step) = self.max_step {
            parts.push(format!("max_step {step}"));
        }
        if let Some(prior) = &self.requires_prior {
            parts.push(match &prior.same {
                Some(same) => format!(
                    "requires_prior {} (same {same}) within {} s",
                    prior.tool,
                    prior.within.as_secs()
                ),
                None => format!(
                    "requires_prior {} within {} s",
                    prior.tool,
                    prior.within.as_secs()
                ),
            });
        }
        write!(f, " {}", parts.join(", "))
    }
}

/// Every guard of one mode, in the file's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModeGuards {
    rules: Vec<GuardRule>,
}

impl ModeGuards {
    /// Compiles a mode's `guards`, each already checked to name a tool or a valid
    /// glob; problems go to `problems`, prefixed with `at`.
    pub fn compile<'a>(
        entries: impl IntoIterator<Item = (NamePattern, &'a GuardDocument)>,
        at: &str,
        problems: &mut Vec<String>,
    ) -> ModeGuards {
        let mut rules = Vec::new();
        for (tools, document) in entries {
            let here = format!("{at}.{}", tools.as_str());
            let window = |seconds: u64, key: &str, problems: &mut Vec<String>| {
                if seconds == 0 || seconds > MAX_GUARD_WINDOW_SECONDS {
                    problems.push(format!(
                        "{here}: {key} must be between 1 and {MAX_GUARD_WINDOW_SECONDS}, got {seconds}"
                    ));
                }
                Duration::from_secs(seconds)
            };
            let cooldown = match (document.cooldown_seconds, &document.per) {
                (Some(seconds), per) => Some(Cooldown {
                    window: window(seconds, "cooldown_seconds", problems),
                    per: per.clone(),
                }),
                (None, Some(_)) => {
                    problems.push(format!("{here}: `per` needs `cooldown_seconds`"));
                    None
                }
                (None, None) => None,
            };
            if let Some(step) = document.max_step {
                if step == 0 {
                    problems.push(format!("{here}: max_step must be at least 1"));
                }
                if tools.as_str() != ToolName::ScaleFleet.as_str() {
                    problems.push(format!(
                        "{here}: max_step needs the tool's current value, which Proxi knows only for scale_fleet (the fleet size)"
                    ));
                }
            }
            let requires_prior = document.requires_prior.as_ref().map(|prior| {
                if prior.tool.is_empty() || prior.tool.contains('*') {
                    problems.push(format!(
                        "{here}: requires_prior.tool must name one tool, got '{}'",
                        prior.tool
                    ));
                }
                RequiresPrior {
                    tool: prior.tool.clone(),
                    same: prior.same.clone(),
                    within: window(
                        prior.within_seconds,
                        "requires_prior.within_seconds",
                        problems,
                    ),
                }
            });
            if cooldown.is_none() && document.max_step.is_none() && requires_prior.is_none() {
                problems.push(format!(
                    "{here}: no guard given (cooldown_seconds, max_step or requires_prior)"
                ));
            }
            rules.push(GuardRule {
                tools,
                cooldown,
                max_step: document.max_step,
                requires_prior,
            });
        }
        ModeGuards { rules }
    }

    /// The rules, in the file's order.
    pub fn rules(&self) -> &[GuardRule] {
        &self.rules
    }

    /// The longest window any of these guards looks back over, if any.
    pub fn longest_window(&self) -> Option<Duration> {
        self.rules
            .iter()
            .flat_map(|rule| {
                [
                    rule.cooldown.as_ref().map(|cooldown| cooldown.window),
                    rule.requires_prior.as_ref().map(|prior| prior.within),
                ]
            })
            .flatten()
            .max()
    }

    /// Whether no guard is set.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// Why a guard refused a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardRefusal {
    /// The tool ran for this value within its cooldown.
    Cooldown {
        /// The tool.
        tool: String,
        /// The `per` argument and its value, if the cooldown has one.
        per: Option<(String, String)>,
        /// Until the cooldown ends.
        time_left: Duration,
    },
    /// The change is larger than `max_step`.
    StepTooLarge {
        /// The current value (fleet size).
        current: i64,
        /// The value asked for.
        requested: i64,
        /// The largest change allowed.
        max_step: u64,
    },
    /// The precondition's call was not made (recently enough) by this principal.
    RequiresPrior {
        /// The tool refused.
        tool: String,
        /// The tool that must run first.
        prior: String,
        /// The argument and value the prior call must have had.
        same: Option<(String, String)>,
        /// How recent it must be.
        within: Duration,
    },
}

impl GuardRefusal {
    /// The reason code callers and records see.
    pub fn reason(&self) -> Reason {
        match self {
            GuardRefusal::Cooldown { .. } => Reason::Cooldown,
            GuardRefusal::StepTooLarge { .. } => Reason::StepTooLarge,
            GuardRefusal::RequiresPrior { .. } => Reason::RequiresPrior,
        }
    }

    /// For a cooldown, how long until a call may succeed.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GuardRefusal::Cooldown { time_left, .. } => Some(*time_left),
            _ => None,
        }
    }

    /// Why, in words.
    pub fn message(&self) -> String {
        match self {
            GuardRefusal::Cooldown {
                tool,
                per,
                time_left,
            } => format!(
                "'{tool}'{} ran recently; its cooldown has {} s left",
                per.as_ref()
                    .map(|(name, value)| format!(" for {name} '{value}'"))
                    .unwrap_or_default(),
                whole_seconds(*time_left)
            ),
            GuardRefusal::StepTooLarge {
                current,
                requested,
                max_step,
            } => format!(
                "scaling the fleet from {current} to {requested} changes it by {}; at most {max_step} per call",
                requested.abs_diff(*current)
            ),
            GuardRefusal::RequiresPrior {
                tool,
                prior,
                same,
                within,
            } => format!(
                "'{tool}' needs a prior '{prior}'{} by the same caller within the last {} s",
                same.as_ref()
                    .map(|(name, value)| format!(" with {name} '{value}'"))
                    .unwrap_or_default(),
                within.as_secs()
            ),
        }
    }

    /// A concrete next step.
    pub fn how_to_proceed(&self) -> String {
        match self {
            GuardRefusal::Cooldown { time_left, .. } => format!(
                "Wait {} s (retry_after_seconds) before running it again; meanwhile check whether the last run helped (get_service_status, read_logs).",
                whole_seconds(*time_left)
            ),
            GuardRefusal::StepTooLarge {
                current, max_step, ..
            } => format!(
                "Change the fleet in steps of at most {max_step}: from {current}, ask for a count between {} and {}.",
                current.saturating_sub_unsigned(*max_step).max(0),
                current.saturating_add_unsigned(*max_step)
            ),
            GuardRefusal::RequiresPrior { prior, same, .. } => format!(
                "Call '{prior}'{} first, look at the result, then call again.",
                same.as_ref()
                    .map(|(name, value)| format!(" with {name} '{value}'"))
                    .unwrap_or_default()
            ),
        }
    }
}

fn whole_seconds(duration: Duration) -> u64 {
    duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0))
        .max(1)
}

/// The value of `argument` in `arguments` as a guard key: a string as it is,
/// anything else as its JSON text; bounded. Missing: the empty string.
fn key_value(arguments: &Value, argument: Option<&str>) -> String {
    let Some(argument) = argument else {
        return String::new();
    };
    let text = match arguments.get(argument) {
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    crate::gateway::truncate(&text, MAX_KEY_VALUE_BYTES).to_owned()
}

/// A bounded map from keys to the time they last happened.
#[derive(Debug, Default)]
struct Table<K> {
    last: HashMap<K, DateTime<Utc>>,
}

impl<K: std::hash::Hash + Eq + Clone> Table<K> {
    fn get(&self, key: &K) -> Option<DateTime<Utc>> {
        self.last.get(key).copied()
    }

    fn note(&mut self, key: K, at: DateTime<Utc>) {
        if !self.last.contains_key(&key)
            && self.last.len() >= MAX_GUARD_ENTRIES
            && let Some(oldest) = self
                .last
                .iter()
                .min_by_key(|(_, time)| **time)
                .map(|(key, _)| key.clone())
        {
            self.last.remove(&oldest);
        }
        let entry = self.last.entry(key).or_insert(at);
        *entry = (*entry).max(at);
    }

    fn len(&self) -> usize {
        self.last.len()
    }
}

/// What ran, when and for whom, as the guards need it.
#[derive(Debug, Default)]
pub struct GuardState {
    /// (tool, value of `per`) → last run, for cooldowns.
    runs: Table<(String, String)>,
    /// (principal, tool, value of `same`) → last run, for `requires_prior`.
    observed: Table<(Arc<str>, String, String)>,
}

impl GuardState {
    /// Checks `tool(arguments)` by `principal` at `now` against `guards`;
    /// `fleet_size` is the simulated cloud's current fleet (for `max_step`).
    pub fn check(
        &self,
        guards: &ModeGuards,
        principal: &Arc<str>,
        tool: &str,
        arguments: &Value,
        now: DateTime<Utc>,
        fleet_size: impl Fn() -> i64,
    ) -> Result<(), GuardRefusal> {
        for rule in guards.rules.iter().filter(|rule| rule.tools.matches(tool)) {
            if let Some(cooldown) = &rule.cooldown {
                let value = key_value(arguments, cooldown.per.as_deref());
                if let Some(last) = self.runs.get(&(tool.to_owned(), value.clone())) {
                    let until =
                        last + chrono::Duration::from_std(cooldown.window).unwrap_or_default();
                    if now < until {
                        return Err(GuardRefusal::Cooldown {
                            tool: tool.to_owned(),
                            per: cooldown.per.clone().map(|name| (name, value)),
                            time_left: (until - now).to_std().unwrap_or_default(),
                        });
                    }
                }
            }
            if let Some(max_step) = rule.max_step {
                let current = fleet_size();
                // No count is a schema error caught before; refuse rather than guess.
                let requested = arguments
                    .get("count")
                    .and_then(Value::as_i64)
                    .unwrap_or(i64::MAX);
                if requested.abs_diff(current) > max_step {
                    return Err(GuardRefusal::StepTooLarge {
                        current,
                        requested,
                        max_step,
                    });
                }
            }
            if let Some(prior) = &rule.requires_prior {
                let value = key_value(arguments, prior.same.as_deref());
                let key = (principal.clone(), prior.tool.clone(), value.clone());
                let recent = self.observed.get(&key).is_some_and(|last| {
                    now - last <= chrono::Duration::from_std(prior.within).unwrap_or_default()
                });
                if !recent {
                    return Err(GuardRefusal::RequiresPrior {
                        tool: tool.to_owned(),
                        prior: prior.tool.clone(),
                        same: prior.same.clone().map(|name| (name, value)),
                        within: prior.within,
                    });
                }
            }
        }
        Ok(())
    }

    /// Notes that `tool(arguments)` ran for `principal` at `at`, for every guard
    /// in `all_guards` (every mode's) that will ask about it.
    pub fn note_run<'a>(
        &mut self,
        all_guards: impl IntoIterator<Item = &'a ModeGuards>,
        principal: &Arc<str>,
        tool: &str,
        arguments: &Value,
        at: DateTime<Utc>,
    ) {
        for rule in all_guards
            .into_iter()
            .flat_map(|guards| guards.rules.iter())
        {
            if let Some(cooldown) = &rule.cooldown
                && rule.tools.matches(tool)
            {
                let value = key_value(arguments, cooldown.per.as_deref());
                self.runs.note((tool.to_owned(), value), at);
            }
            if let Some(prior) = &rule.requires_prior
                && prior.tool == tool
            {
                let value = key_value(arguments, prior.same.as_deref());
                self.observed
                    .note((principal.clone(), tool.to_owned(), value), at);
            }
        }
    }

    /// How many keys the tables hold (runs, observed).
    pub fn sizes(&self) -> (usize, usize) {
        (self.runs.len(), self.observed.len())
    }
}

/// Compiles the `guards` of every mode of a policy document; used by the policy.
pub type GuardDocuments = BTreeMap<String, GuardDocument>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn guards(document: Value) -> Result<ModeGuards, Vec<String>> {
        let documents: GuardDocuments = serde_json::from_value(document).expect("shape");
        let mut problems = Vec::new();
        let guards = ModeGuards::compile(
            documents
                .iter()
                .map(|(name, document)| (NamePattern::for_tests(name), document)),
            "modes.X.guards",
            &mut problems,
        );
        if problems.is_empty() {
            Ok(guards)
        } else {
            Err(problems)
        }
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).expect("time")
    }

    #[test]
    fn a_cooldown_is_per_value_and_reports_the_time_left() {
        let guards =
            guards(json!({"restart_service": {"cooldown_seconds": 120, "per": "service_name"}}))
                .expect("valid");
        let mut state = GuardState::default();
        let agent: Arc<str> = Arc::from("agent");
        let web = json!({"service_name": "web-server"});
        let db = json!({"service_name": "database"});
        assert!(
            state
                .check(&guards, &agent, "restart_service", &web, at(0), || 3)
                .is_ok()
        );
        state.note_run([&guards], &agent, "restart_service", &web, at(0));
        let refusal = state
            .check(&guards, &agent, "restart_service", &web, at(30), || 3)
            .expect_err("inside the window");
        assert_eq!(refusal.reason(), Reason::Cooldown);
        assert_eq!(refusal.retry_after(), Some(Duration::from_secs(90)));
        assert!(
            refusal.message().contains("90 s left"),
            "{}",
            refusal.message()
        );
        // Another service has its own window; the same one is free after it.
        assert!(
            state
                .check(&guards, &agent, "restart_service", &db, at(30), || 3)
                .is_ok()
        );
        assert!(
            state
                .check(&guards, &agent, "restart_service", &web, at(120), || 3)
                .is_ok()
        );
    }

    #[test]
    fn max_step_is_relative_to_the_fleet_size() {
        let guards = guards(json!({"scale_fleet": {"max_step": 2}})).expect("valid");
        let state = GuardState::default();
        let agent: Arc<str> = Arc::from("agent");
        assert!(
            state
                .check(
                    &guards,
                    &agent,
                    "scale_fleet",
                    &json!({"count": 5}),
                    at(0),
                    || 3
                )
                .is_ok()
        );
        let refusal = state
            .check(
                &guards,
                &agent,
                "scale_fleet",
                &json!({"count": 6}),
                at(0),
                || 3,
            )
            .expect_err("a step of 3");
        assert_eq!(refusal.reason(), Reason::StepTooLarge);
        assert!(
            refusal.how_to_proceed().contains("between 1 and 5"),
            "{}",
            refusal.how_to_proceed()
        );
    }

    #[test]
    fn requires_prior_needs_the_same_principal_and_value_recently() {
        let guards = guards(json!({"restart_service": {"requires_prior": {
            "tool": "get_service_status", "same": "service_name", "within_seconds": 300}}}))
        .expect("valid");
        let mut state = GuardState::default();
        let (agent, other): (Arc<str>, Arc<str>) = (Arc::from("agent"), Arc::from("operator"));
        let web = json!({"service_name": "web-server"});
        let refusal = state
            .check(&guards, &agent, "restart_service", &web, at(0), || 3)
            .expect_err("nothing looked at");
        assert_eq!(refusal.reason(), Reason::RequiresPrior);
        state.note_run([&guards], &other, "get_service_status", &web, at(0));
        assert!(
            state
                .check(&guards, &agent, "restart_service", &web, at(1), || 3)
                .is_err()
        );
        state.note_run(
            [&guards],
            &agent,
            "get_service_status",
            &json!({"service_name": "database"}),
            at(0),
        );
        assert!(
            state
                .check(&guards, &agent, "restart_service", &web, at(1), || 3)
                .is_err()
        );
        state.note_run([&guards], &agent, "get_service_status", &web, at(0));
        assert!(
            state
                .check(&guards, &agent, "restart_service", &web, at(300), || 3)
                .is_ok()
        );
        assert!(
            state
                .check(&guards, &agent, "restart_service", &web, at(301), || 3)
                .is_err()
        );
    }

    #[test]
    fn bad_guards_are_load_errors() {
        let problems = guards(json!({
            "restart_service": {"max_step": 2},
            "read_logs": {"per": "service_name"},
            "list_services": {},
            "get_service_status": {"cooldown_seconds": 0},
        }))
        .expect_err("invalid");
        let text = problems.join("\n");
        for expected in [
            "only for scale_fleet",
            "`per` needs",
            "no guard given",
            "between 1 and",
        ] {
            assert!(text.contains(expected), "{expected}: {text}");
        }
    }

    #[test]
    fn the_tables_are_bounded() {
        let guards =
            guards(json!({"restart_service": {"cooldown_seconds": 60, "per": "service_name"}}))
                .expect("valid");
        let mut state = GuardState::default();
        let agent: Arc<str> = Arc::from("agent");
        for index in 0..(MAX_GUARD_ENTRIES + 10) {
            let arguments = json!({"service_name": format!("s{index}")});
            state.note_run(
                [&guards],
                &agent,
                "restart_service",
                &arguments,
                at(index as i64),
            );
        }
        assert_eq!(state.sizes().0, MAX_GUARD_ENTRIES);
        // The newest are kept.
        let newest = json!({"service_name": format!("s{}", MAX_GUARD_ENTRIES + 9)});
        assert!(
            state
                .check(&guards, &agent, "restart_service", &newest, at(0), || 3)
                .is_err()
        );
    }
}
