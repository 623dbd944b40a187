//! Per-principal rate limits on tool calls: the policy's `rate_limits` rules and
//! the token buckets (governor's GCRA) that enforce them.
//!
//! A rule names a principal (`agent`, `operator` or `*`), the tools it covers
//! (`*` or one tool's name), a rate (`20/s`, `3/min`, `100/h`) and a burst. Every
//! rule is its own bucket per principal, and a call must pass every rule that
//! matches it. Buckets are keyed by the token holder ([`Identity`]: the registered
//! name and the token's role) and the role it acts in, so two named agents each
//! have their own budget under an `agent` rule. The key comes from the token the
//! caller authenticated with, never from a name the caller chose: an agent that
//! opens MCP sessions under a thousand client names still draws on one bucket.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use serde::Deserialize;

use crate::principal::{Identity, Principal, Role};
use crate::tools::ToolName;

/// Largest count a rate or burst may name: far above anything a gateway serves,
/// low enough that no period rounds to zero.
pub const MAX_RATE_COUNT: u32 = 1_000_000;

/// Most holders each rule keeps a bucket for. Far above the registry's 1,024 named
/// principals plus the built-ins; past it, buckets that have refilled are dropped,
/// and if that frees nothing, calls share their role's overflow bucket (never an
/// unlimited one) until room returns, so the table cannot grow without bound.
pub const MAX_RATE_LIMIT_KEYS: usize = 4096;

/// The bucket key: the role the caller acts in and the token holder; `None` for
/// the overflow bucket of that role.
type BucketKey = (Role, Option<Identity>);

/// The rule that applies when a policy has no `rate_limits` key.
///
/// 50 calls a second with a burst of 100, for each principal. An LLM agent makes a
/// few calls per model turn and a turn takes hundreds of milliseconds, so a
/// legitimate agent stays one or two orders of magnitude below this even when it
/// fans out; a flood is cut to 50 records a second instead of tens of thousands.
pub fn default_rules() -> Vec<RateLimitRule> {
    vec![RateLimitRule {
        principal: PrincipalSelector::Any,
        tools: ToolSelector::Any,
        rate: Rate {
            count: nonzero(50),
            per: RateUnit::Second,
        },
        burst: nonzero(100),
    }]
}

fn nonzero(value: u32) -> NonZeroU32 {
    NonZeroU32::new(value).unwrap_or(NonZeroU32::MIN)
}

/// Which callers a rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrincipalSelector {
    /// `*`: every principal, each with its own bucket.
    Any,
    /// `agent`: holders of the agent token, over REST or MCP.
    Agent,
    /// `operator`: holders of the operator token.
    Operator,
}

impl PrincipalSelector {
    fn matches(self, role: Role) -> bool {
        match self {
            PrincipalSelector::Any => true,
            PrincipalSelector::Agent => role == Role::Agent,
            PrincipalSelector::Operator => role == Role::Operator,
        }
    }
}

/// Which tool calls a rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolSelector {
    /// `*`: every call, unknown tool names included.
    Any,
    /// One tool.
    Tool(ToolName),
}

/// The period a rate is counted over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateUnit {
    /// `s`
    Second,
    /// `min`
    Minute,
    /// `h`
    Hour,
}

impl RateUnit {
    fn duration(self) -> Duration {
        match self {
            RateUnit::Second => Duration::from_secs(1),
            RateUnit::Minute => Duration::from_secs(60),
            RateUnit::Hour => Duration::from_secs(3600),
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            RateUnit::Second => "s",
            RateUnit::Minute => "min",
            RateUnit::Hour => "h",
        }
    }
}

/// A sustained rate: `count` calls per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Calls per period.
    pub count: NonZeroU32,
    /// The period.
    pub per: RateUnit,
}

impl Rate {
    /// Parses `N/s`, `N/min` or `N/h` (N from 1 to [`MAX_RATE_COUNT`]).
    pub fn parse(text: &str) -> Result<Rate, String> {
        let shape = || format!("rate {text:?} must look like \"20/s\", \"3/min\" or \"100/h\"");
        let (count, unit) = text.split_once('/').ok_or_else(shape)?;
        let per = match unit {
            "s" => RateUnit::Second,
            "min" => RateUnit::Minute,
            "h" => RateUnit::Hour,
            _ => return Err(shape()),
        };
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(shape());
        }
        let count = count
            .parse::<u32>()
            .ok()
            .filter(|count| (1..=MAX_RATE_COUNT).contains(count))
            .and_then(NonZeroU32::new)
            .ok_or_else(|| {
                format!("rate {text:?}: the count must be between 1 and {MAX_RATE_COUNT}")
            })?;
        Ok(Rate { count, per })
    }

    /// Time for one call's worth of the bucket to refill.
    fn period(self) -> Duration {
        self.per.duration() / self.count.get()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.per.symbol())
    }
}

/// One validated `rate_limits` rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitRule {
    /// Who it covers.
    pub principal: PrincipalSelector,
    /// Which calls it covers.
    pub tools: ToolSelector,
    /// The sustained rate.
    pub rate: Rate,
    /// Calls allowed at once after a quiet spell.
    pub burst: NonZeroU32,
}

impl RateLimitRule {
    fn matches(&self, role: Role, tool: Option<ToolName>) -> bool {
        self.principal.matches(role)
            && match self.tools {
                ToolSelector::Any => true,
                ToolSelector::Tool(only) => tool == Some(only),
            }
    }

    fn quota(&self) -> Quota {
        // A period of zero is impossible (count <= MAX_RATE_COUNT), so this always
        // succeeds; the fallback only keeps the type total.
        Quota::with_period(self.rate.period())
            .unwrap_or_else(|| Quota::per_second(self.rate.count))
            .allow_burst(self.burst)
    }
}

impl fmt::Display for RateLimitRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let principal = match self.principal {
            PrincipalSelector::Any => "each principal",
            PrincipalSelector::Agent => "agent",
            PrincipalSelector::Operator => "operator",
        };
        match self.tools {
            ToolSelector::Any => write!(f, "{principal}, all tools")?,
            ToolSelector::Tool(tool) => write!(f, "{principal}, {tool}")?,
        }
        write!(f, ": {}, burst {}", self.rate, self.burst)
    }
}

/// One `rate_limits` entry as written in the policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateLimitDocument {
    principal: String,
    tools: String,
    rate: String,
    #[serde(default)]
    burst: Option<u64>,
}

impl RateLimitDocument {
    /// Validates the entry; problems name `at` (e.g. `rate_limits[0]`).
    pub(crate) fn compile(&self, at: &str) -> Result<RateLimitRule, Vec<String>> {
        let mut problems = Vec::new();
        let principal = match self.principal.as_str() {
            "*" => Some(PrincipalSelector::Any),
            "agent" => Some(PrincipalSelector::Agent),
            "operator" => Some(PrincipalSelector::Operator),
            other => {
                problems.push(format!(
                    "{at}.principal: {other:?} must be \"agent\", \"operator\" or \"*\""
                ));
                None
            }
        };
        let tools = match self.tools.as_str() {
            "*" => Some(ToolSelector::Any),
            name => match ToolName::parse(name) {
                Some(tool) => Some(ToolSelector::Tool(tool)),
                None => {
                    problems.push(format!(
                        "{at}.tools: no tool is named {name:?} (use \"*\" or one of: {})",
                        ToolName::ALL.map(ToolName::as_str).join(", ")
                    ));
                    None
                }
            },
        };
        let rate = Rate::parse(&self.rate)
            .map_err(|problem| problems.push(format!("{at}.rate: {problem}")))
            .ok();
        let burst = match self.burst {
            None => rate.map(|rate| rate.count),
            Some(burst) => {
                let valid = u32::try_from(burst)
                    .ok()
                    .filter(|burst| *burst <= MAX_RATE_COUNT)
                    .and_then(NonZeroU32::new);
                if valid.is_none() {
                    problems.push(format!(
                        "{at}.burst: must be between 1 and {MAX_RATE_COUNT}, got {burst}"
                    ));
                }
                valid
            }
        };
        match (principal, tools, rate, burst) {
            (Some(principal), Some(tools), Some(rate), Some(burst)) if problems.is_empty() => {
                Ok(RateLimitRule {
                    principal,
                    tools,
                    rate,
                    burst,
                })
            }
            _ => Err(problems),
        }
    }
}

/// The live buckets for a policy's rules.
pub struct RateLimiter {
    rules: Vec<(RateLimitRule, DefaultKeyedRateLimiter<BucketKey>)>,
    clock: DefaultClock,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// Fresh, full buckets for `rules`.
    pub fn new(rules: &[RateLimitRule]) -> RateLimiter {
        RateLimiter {
            rules: rules
                .iter()
                .map(|rule| (*rule, DefaultKeyedRateLimiter::keyed(rule.quota())))
                .collect(),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one call from the holder's bucket of every rule that covers
    /// (`principal`'s role, `tool`).
    ///
    /// `tool` is `None` for a name no tool has; only `*` rules cover those. On
    /// refusal, returns how long until every refusing bucket has room again. Each
    /// rule keeps at most [`MAX_RATE_LIMIT_KEYS`] buckets (plus one overflow bucket
    /// per role).
    pub fn check(&self, principal: &Principal, tool: Option<ToolName>) -> Result<(), Duration> {
        let role = principal.role();
        let mut wait: Option<Duration> = None;
        for (rule, limiter) in &self.rules {
            if !rule.matches(role, tool) {
                continue;
            }
            if limiter.len() >= MAX_RATE_LIMIT_KEYS {
                // A full bucket behaves as a fresh one: dropping it forgets nothing.
                limiter.retain_recent();
            }
            let key = if limiter.len() < MAX_RATE_LIMIT_KEYS {
                (role, Some(principal.identity().clone()))
            } else {
                (role, None)
            };
            if let Err(not_until) = limiter.check_key(&key) {
                let this = not_until.wait_time_from(self.clock.now());
                wait = Some(wait.map_or(this, |wait| wait.max(this)));
            }
        }
        wait.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(principal: &str, tools: &str, rate: &str, burst: Option<u64>) -> RateLimitDocument {
        RateLimitDocument {
            principal: principal.to_owned(),
            tools: tools.to_owned(),
            rate: rate.to_owned(),
            burst,
        }
    }

    #[test]
    fn rates_parse_in_three_units() {
        assert_eq!(Rate::parse("20/s").unwrap().to_string(), "20/s");
        assert_eq!(
            Rate::parse("3/min").unwrap().period(),
            Duration::from_secs(20)
        );
        assert_eq!(
            Rate::parse("100/h").unwrap().period(),
            Duration::from_secs(36)
        );
        for bad in [
            "",
            "20",
            "20/",
            "/s",
            "0/s",
            "-1/s",
            "1.5/s",
            "20/sec",
            "20 /s",
            "2000000/s",
            "+3/s",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn rules_are_validated_field_by_field() {
        let problems = rule("root", "rm_rf", "fast", Some(0))
            .compile("rate_limits[2]")
            .unwrap_err();
        let text = problems.join("\n");
        for expected in [
            "rate_limits[2].principal: \"root\"",
            "rate_limits[2].tools: no tool is named \"rm_rf\"",
            "rate_limits[2].rate: rate \"fast\" must look like",
            "rate_limits[2].burst: must be between 1",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in {text}");
        }
        let ok = rule("agent", "restart_service", "3/min", None)
            .compile("r")
            .unwrap();
        assert_eq!(ok.burst.get(), 3, "burst defaults to the rate's count");
        assert_eq!(ok.to_string(), "agent, restart_service: 3/min, burst 3");
    }

    #[test]
    fn each_principal_has_its_own_bucket_and_refusals_say_when_to_retry() {
        let rules = [rule("*", "*", "1/h", Some(2)).compile("r").unwrap()];
        let limiter = RateLimiter::new(&rules);
        assert!(limiter.check(&Principal::agent(), None).is_ok());
        assert!(
            limiter
                .check(&Principal::agent(), Some(ToolName::ListServices))
                .is_ok()
        );
        let wait = limiter
            .check(&Principal::agent(), Some(ToolName::ListServices))
            .unwrap_err();
        assert!(
            wait > Duration::from_secs(3500) && wait <= Duration::from_secs(3600),
            "{wait:?}"
        );
        assert!(
            limiter
                .check(&Principal::operator(), Some(ToolName::ListServices))
                .is_ok()
        );
    }

    #[test]
    fn two_named_agents_under_an_agent_rule_each_have_their_own_budget() {
        let rules = [rule("agent", "*", "1/h", Some(2)).compile("r").unwrap()];
        let limiter = RateLimiter::new(&rules);
        let bot = Principal::named("deploy-bot", Role::Agent);
        let other = Principal::named("report-bot", Role::Agent);
        let tool = Some(ToolName::ListServices);
        assert!(limiter.check(&bot, tool).is_ok());
        assert!(limiter.check(&bot, tool).is_ok());
        assert!(limiter.check(&bot, tool).is_err(), "deploy-bot spent its 2");
        // Its MCP sessions, whatever the client calls itself, draw on its bucket.
        assert!(limiter.check(&bot.via_mcp("fresh-client"), tool).is_err());
        assert!(
            limiter.check(&other, tool).is_ok(),
            "report-bot has its own"
        );
        assert!(limiter.check(&other, tool).is_ok());
        assert!(limiter.check(&other, tool).is_err());
        assert!(limiter.check(&Principal::agent(), tool).is_ok());
    }

    #[test]
    fn the_bucket_table_is_bounded_and_overflow_shares_one_bucket() {
        let rules = [rule("agent", "*", "1/h", Some(1)).compile("r").unwrap()];
        let limiter = RateLimiter::new(&rules);
        for index in 0..MAX_RATE_LIMIT_KEYS {
            let holder = Principal::named(&format!("bot-{index}"), Role::Agent);
            assert!(limiter.check(&holder, None).is_ok());
        }
        // No bucket has refilled, so newcomers share the overflow bucket: one call.
        let late = Principal::named("late-bot", Role::Agent);
        let later = Principal::named("later-bot", Role::Agent);
        assert!(limiter.check(&late, None).is_ok());
        assert!(limiter.check(&later, None).is_err());
        assert_eq!(limiter.rules[0].1.len(), MAX_RATE_LIMIT_KEYS + 1);
    }

    #[test]
    fn tool_rules_cover_only_their_tool_and_principal() {
        let rules = [rule("agent", "restart_service", "1/h", Some(1))
            .compile("r")
            .unwrap()];
        let limiter = RateLimiter::new(&rules);
        assert!(
            limiter
                .check(&Principal::agent(), Some(ToolName::RestartService))
                .is_ok()
        );
        assert!(
            limiter
                .check(&Principal::agent(), Some(ToolName::RestartService))
                .is_err()
        );
        assert!(
            limiter
                .check(&Principal::agent(), Some(ToolName::ListServices))
                .is_ok()
        );
        assert!(limiter.check(&Principal::agent(), None).is_ok());
        assert!(
            limiter
                .check(&Principal::operator(), Some(ToolName::RestartService))
                .is_ok()
        );
    }

    #[test]
    fn the_default_lets_a_burst_of_100_through_then_refuses() {
        let limiter = RateLimiter::new(&default_rules());
        for _ in 0..100 {
            assert!(
                limiter
                    .check(&Principal::agent(), Some(ToolName::ListServices))
                    .is_ok()
            );
        }
        // The next ten come within microseconds; only a stall of 200 ms (ten
        // refills at 50/s) could let them all through.
        let refused = (0..10)
            .filter(|_| {
                limiter
                    .check(&Principal::agent(), Some(ToolName::ListServices))
                    .is_err()
            })
            .count();
        assert!(refused >= 1, "none of 10 refused after the burst");
    }
}
