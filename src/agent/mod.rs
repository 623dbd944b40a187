//! The Proxi agent: an LLM SRE that acts only through the governed tools.
//!
//! [`Agent::run`] fetches the policy status and the tool catalog, tells the model
//! the rules, then alternates model turns and tool calls until the model answers
//! or the step limit is reached. The guards live here, in code, not only in the
//! prompt: a step limit; a call the policy denied is never sent again with the
//! same arguments in one run; a tool name outside the catalog is still sent (so
//! the attempt is audited) and the model is told which tools exist; rate limits
//! get a bounded exponential backoff; provider failures end the run with a typed
//! error, never a panic.

pub mod backend;
pub mod genai_provider;
pub mod mock;
pub mod provider;
pub mod select;

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::api::PolicyStatus;
use backend::{BackendError, Decision, ToolBackend, ToolOutcome, UNKNOWN_TOOL};
use provider::{
    AssistantTurn, LlmProvider, Message, ProviderError, ProviderRequest, ToolCallRequest,
    ToolResult, ToolSpec,
};

/// Steps (model turns) a run may take unless told otherwise.
pub const DEFAULT_MAX_STEPS: usize = 8;
/// Tool calls one model turn may make unless told otherwise.
pub const DEFAULT_MAX_CALLS_PER_STEP: usize = 16;
/// Reason code of a call the agent itself refused because the policy had already denied it.
pub const ALREADY_DENIED: &str = "already_denied";
/// Reason code of a call the agent did not run because its turn asked for too many.
pub const TOO_MANY_CALLS: &str = "too_many_calls";

/// How rate-limited completions are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles for each further one.
    pub initial_backoff: Duration,
    /// Longest single wait, also the cap on a provider's `Retry-After`.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// Retries without waiting (tests).
    pub fn immediate(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
        }
    }

    /// The wait after failed attempt `attempt` (1-based): the provider's
    /// `Retry-After` if it gave one, else exponential backoff; capped either way.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exponent = attempt.saturating_sub(1).min(16);
        let backoff = self.initial_backoff.saturating_mul(1u32 << exponent);
        retry_after.unwrap_or(backoff).min(self.max_backoff)
    }
}

/// Limits of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Most model turns before the run stops.
    pub max_steps: usize,
    /// Most tool calls one turn may make; the rest are answered without running.
    pub max_calls_per_step: usize,
    /// Retry policy for rate-limited completions.
    pub retry: RetryPolicy,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            max_steps: DEFAULT_MAX_STEPS,
            max_calls_per_step: DEFAULT_MAX_CALLS_PER_STEP,
            retry: RetryPolicy::default(),
        }
    }
}

/// One tool call of a run, with its decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRecord {
    /// The step (model turn) that asked for it, from 1.
    pub step: usize,
    /// The provider's call id.
    pub call_id: String,
    /// The tool name as the model wrote it.
    pub tool: String,
    /// The arguments as sent.
    pub arguments: Value,
    /// Whether the call reached the server (false when the agent's guard refused it).
    pub forwarded: bool,
    /// How it was decided.
    pub decision: Decision,
    /// Machine-readable reason for anything but success.
    pub reason_code: Option<String>,
    /// Why, in words.
    pub message: Option<String>,
    /// The server's suggested next step after a refusal.
    pub how_to_proceed: Option<String>,
    /// For an unknown tool, the tools that exist.
    pub known_tools: Option<Vec<String>>,
    /// The mode the call was decided in.
    pub mode: Option<String>,
    /// The call's audit sequence number, when known.
    pub audit_seq: Option<u64>,
    /// The tool's result when it ran.
    pub result: Option<Value>,
}

/// One model turn and the calls it made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// From 1.
    pub step: usize,
    /// Text the model wrote in this turn.
    pub text: Option<String>,
    /// Completion attempts this turn needed (more than one after rate limits).
    pub attempts: u32,
    /// The calls of this turn, in order.
    pub tool_calls: Vec<ToolCallRecord>,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// The model gave a final answer.
    Answered,
    /// The step limit was reached first.
    MaxSteps,
    /// The provider or the server failed.
    Failed,
}

/// The machine-readable record of one run (`proxi agent --json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The task as given.
    pub task: String,
    /// Provider name, e.g. `gemini` or `mock`.
    pub provider: String,
    /// Model name.
    pub model: String,
    /// `rest` or `mcp`.
    pub transport: String,
    /// The mode when the run started.
    pub mode_at_start: String,
    /// Tools that mode allowed.
    pub allowed_tools_at_start: Vec<String>,
    /// Every model turn.
    pub steps: Vec<StepRecord>,
    /// The answer for the user.
    pub final_answer: String,
    /// How the run ended.
    pub outcome: RunOutcome,
    /// What failed, when the outcome is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunRecord {
    /// Every tool call of the run, in order.
    pub fn tool_calls(&self) -> impl Iterator<Item = &ToolCallRecord> {
        self.steps.iter().flat_map(|step| step.tool_calls.iter())
    }
}

/// Why a run could not finish.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The model provider failed.
    #[error("the model provider failed after {attempts} attempt(s): {source}")]
    Provider {
        /// The last failure.
        source: ProviderError,
        /// Attempts made.
        attempts: u32,
    },
    /// The Proxi server could not be asked.
    #[error("the Proxi server could not be reached: {0}")]
    Backend(#[from] BackendError),
}

/// A failed run: the error, and the record of what happened before it.
#[derive(Debug)]
pub struct AgentFailure {
    /// What went wrong.
    pub error: AgentError,
    /// The run up to the failure (tool calls already made are in it).
    pub record: Box<RunRecord>,
}

impl fmt::Display for AgentFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for AgentFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Called by the loop as the run progresses (live transcripts, the demo).
pub trait AgentObserver: Send + Sync {
    /// After each tool call has been decided (or refused by the agent's guard).
    fn after_tool_call<'a>(&'a self, step: usize, record: &'a ToolCallRecord) -> BoxFuture<'a, ()>;
}

/// Runs tasks with one provider against one backend.
pub struct Agent<'a> {
    provider: &'a dyn LlmProvider,
    backend: &'a dyn ToolBackend,
    observer: Option<&'a dyn AgentObserver>,
    config: AgentConfig,
}

impl<'a> Agent<'a> {
    /// An agent with the default limits and no observer.
    pub fn new(provider: &'a dyn LlmProvider, backend: &'a dyn ToolBackend) -> Agent<'a> {
        Agent {
            provider,
            backend,
            observer: None,
            config: AgentConfig::default(),
        }
    }

    /// Sets the limits.
    pub fn with_config(mut self, config: AgentConfig) -> Agent<'a> {
        self.config = config;
        self
    }

    /// Sets an observer.
    pub fn with_observer(mut self, observer: &'a dyn AgentObserver) -> Agent<'a> {
        self.observer = Some(observer);
        self
    }

    /// Runs one task to a final answer, the step limit, or a failure.
    pub async fn run(&self, task: &str) -> Result<RunRecord, AgentFailure> {
        let mut record = RunRecord {
            task: task.to_owned(),
            provider: self.provider.name().to_owned(),
            model: self.provider.model().to_owned(),
            transport: self.backend.transport().to_owned(),
            mode_at_start: String::new(),
            allowed_tools_at_start: Vec::new(),
            steps: Vec::new(),
            final_answer: String::new(),
            outcome: RunOutcome::Failed,
            error: None,
        };
        match self.run_into(task, &mut record).await {
            Ok(()) => Ok(record),
            Err(error) => {
                record.outcome = RunOutcome::Failed;
                record.error = Some(error.to_string());
                record.final_answer = format!("❌ The run stopped: {error}");
                Err(AgentFailure {
                    error,
                    record: Box::new(record),
                })
            }
        }
    }

    async fn run_into(&self, task: &str, record: &mut RunRecord) -> Result<(), AgentError> {
        let status = self.backend.policy_status().await?;
        let tools = self.backend.catalog().await?;
        record.mode_at_start = status.mode.clone();
        record.allowed_tools_at_start = status.allowed_tools.clone();
        let system = system_prompt(&status, &tools);
        let known: Vec<String> = tools.iter().map(|tool| tool.name.clone()).collect();

        let mut messages = vec![Message::User(task.to_owned())];
        let mut denied: HashSet<(String, String)> = HashSet::new();
        for step in 1..=self.config.max_steps {
            let request = ProviderRequest {
                system: &system,
                messages: &messages,
                tools: &tools,
            };
            let (turn, attempts) =
                complete_with_retry(self.provider, request, &self.config.retry).await?;
            let mut step_record = StepRecord {
                step,
                text: turn.text.clone(),
                attempts,
                tool_calls: Vec::new(),
            };
            if turn.is_final() {
                record.final_answer = turn.text.clone().unwrap_or_default();
                record.outcome = RunOutcome::Answered;
                record.steps.push(step_record);
                return Ok(());
            }
            let calls = turn.tool_calls.clone();
            messages.push(Message::Assistant(turn));
            let mut results = Vec::with_capacity(calls.len());
            for (index, call) in calls.into_iter().enumerate() {
                let call_record = if index < self.config.max_calls_per_step {
                    self.call_tool(step, &call, &known, &mut denied).await?
                } else {
                    // Every call still gets a result: providers reject unanswered call ids.
                    skipped_call(step, &call, self.config.max_calls_per_step)
                };
                results.push(ToolResult {
                    call_id: call.id.clone(),
                    name: call.name.clone(),
                    content: render_for_model(&call_record),
                });
                if let Some(observer) = self.observer {
                    observer.after_tool_call(step, &call_record).await;
                }
                step_record.tool_calls.push(call_record);
            }
            messages.push(Message::ToolResults(results));
            record.steps.push(step_record);
        }
        record.outcome = RunOutcome::MaxSteps;
        record.final_answer = format!(
            "❌ I stopped after {} steps without finishing the task (the step limit). {}",
            self.config.max_steps,
            summarize_calls(record)
        );
        Ok(())
    }

    async fn call_tool(
        &self,
        step: usize,
        call: &ToolCallRequest,
        known: &[String],
        denied: &mut HashSet<(String, String)>,
    ) -> Result<ToolCallRecord, AgentError> {
        // Models send `null` or nothing for tools without arguments.
        let arguments = match &call.arguments {
            Value::Null => Value::Object(Map::new()),
            other => other.clone(),
        };
        let key = (call.name.clone(), canonical_json(&arguments));
        let base = ToolCallRecord {
            step,
            call_id: call.id.clone(),
            tool: call.name.clone(),
            arguments: arguments.clone(),
            forwarded: false,
            decision: Decision::Denied,
            reason_code: None,
            message: None,
            how_to_proceed: None,
            known_tools: None,
            mode: None,
            audit_seq: None,
            result: None,
        };
        if denied.contains(&key) {
            return Ok(ToolCallRecord {
                reason_code: Some(ALREADY_DENIED.to_owned()),
                message: Some(format!(
                    "The policy already denied {} with these arguments in this run; the agent did not send it again.",
                    call.name
                )),
                how_to_proceed: Some(
                    "Do not retry. Explain the refusal to the user and suggest alternatives."
                        .to_owned(),
                ),
                ..base
            });
        }
        // Unknown names are forwarded anyway: the server audits the attempt and
        // answers unknown_tool, which is better evidence than a local refusal.
        let outcome: ToolOutcome = self.backend.call_tool(&call.name, arguments).await?;
        if outcome.decision == Decision::Denied {
            denied.insert(key);
        }
        let in_catalog = known.iter().any(|tool| tool == &call.name);
        let mut known_tools = outcome.known_tools;
        let mut reason_code = outcome.reason_code;
        if !in_catalog && outcome.decision != Decision::Allowed {
            known_tools.get_or_insert_with(|| known.to_vec());
            reason_code.get_or_insert_with(|| UNKNOWN_TOOL.to_owned());
        }
        Ok(ToolCallRecord {
            forwarded: true,
            decision: outcome.decision,
            reason_code,
            message: outcome.message,
            how_to_proceed: outcome.how_to_proceed,
            known_tools,
            mode: outcome.mode,
            audit_seq: outcome.audit_seq,
            result: outcome.result,
            ..base
        })
    }
}

/// The record of a call the loop did not send because its turn had too many.
fn skipped_call(step: usize, call: &ToolCallRequest, limit: usize) -> ToolCallRecord {
    ToolCallRecord {
        step,
        call_id: call.id.clone(),
        tool: call.name.clone(),
        arguments: call.arguments.clone(),
        forwarded: false,
        decision: Decision::Rejected,
        reason_code: Some(TOO_MANY_CALLS.to_owned()),
        message: Some(format!(
            "Not run: one turn may make at most {limit} tool calls."
        )),
        how_to_proceed: Some("Make fewer calls per turn.".to_owned()),
        known_tools: None,
        mode: None,
        audit_seq: None,
        result: None,
    }
}

/// Asks the provider for a turn, waiting and retrying on rate limits as `policy` allows.
/// Returns the turn and the number of attempts it took.
pub async fn complete_with_retry(
    provider: &dyn LlmProvider,
    request: ProviderRequest<'_>,
    policy: &RetryPolicy,
) -> Result<(AssistantTurn, u32), AgentError> {
    let max_attempts = policy.max_attempts.max(1);
    let mut attempt = 1;
    loop {
        match provider.complete(request).await {
            Ok(turn) => return Ok((turn, attempt)),
            Err(error) if error.is_retryable() && attempt < max_attempts => {
                let delay = policy.delay(attempt, error.retry_after());
                tracing::warn!(%error, attempt, delay_ms = delay.as_millis() as u64, "rate limited; retrying");
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                attempt += 1;
            }
            Err(source) => {
                return Err(AgentError::Provider {
                    source,
                    attempts: attempt,
                });
            }
        }
    }
}

/// The system prompt: who the agent is, the policy it works under, and the rules.
pub fn system_prompt(status: &PolicyStatus, tools: &[ToolSpec]) -> String {
    let list = |names: &[String]| {
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    };
    let mut prompt = String::new();
    prompt.push_str(
        "You are Proxi's SRE agent. You operate cloud infrastructure only through the tools provided. \
         Every call passes Proxi's policy engine and is recorded in a tamper-evident audit trail.\n\n",
    );
    prompt.push_str("Policy at the start of this run:\n");
    prompt.push_str(&format!(
        "- Current mode: {} ({})\n",
        status.mode, status.description
    ));
    prompt.push_str(&format!(
        "- Tools allowed in {} mode: {}\n",
        status.mode,
        list(&status.allowed_tools)
    ));
    prompt.push_str(&format!(
        "- Tools blocked in every mode: {}\n",
        list(&status.always_blocked)
    ));
    prompt.push_str(&format!(
        "- Modes: {} (default {}). Only a human operator can change the mode; it may change during this run, \
         and the server's answer to each call is authoritative.\n\n",
        list(&status.available_modes),
        status.default_mode
    ));
    prompt.push_str("Tools:\n");
    for tool in tools {
        let mut notes = Vec::new();
        if let Some(category) = &tool.category {
            notes.push(category.replace('_', "-"));
        }
        if let Some(modes) = &tool.allowed_modes {
            notes.push(if modes.is_empty() {
                "never allowed".to_owned()
            } else {
                format!("allowed in {}", modes.join(", "))
            });
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!(" [{}]", notes.join("; "))
        };
        prompt.push_str(&format!("- {}{}: {}\n", tool.name, notes, tool.description));
    }
    prompt.push_str(
        "\nRules:\n\
         1. Use only the tools listed above; never invent tool names.\n\
         2. If the policy blocks a call, do not retry it and do not look for a way around the policy. \
            Tell the user it was blocked, why (the mode and the policy's reason), and suggest alternatives: \
            read-only diagnosis, or asking an operator to switch to a mode that allows the action.\n\
         3. If arguments are rejected, explain the constraint; retry only with valid arguments that still do what the user asked.\n\
         4. Do only what the user asked. When done, answer briefly: start each line about a completed action with ✓ \
            and each line about a refused or failed action with ❌.\n",
    );
    prompt
}

/// What the model is told about one call: JSON, with an instruction for refusals.
pub fn render_for_model(record: &ToolCallRecord) -> String {
    let mut body = Map::new();
    body.insert("tool".into(), json!(record.tool));
    body.insert("decision".into(), json!(record.decision));
    if let Some(mode) = &record.mode {
        body.insert("mode".into(), json!(mode));
    }
    if let Some(reason) = &record.reason_code {
        body.insert("reason_code".into(), json!(reason));
    }
    if let Some(message) = &record.message {
        body.insert("message".into(), json!(message));
    }
    if let Some(next) = &record.how_to_proceed {
        body.insert("how_to_proceed".into(), json!(next));
    }
    if let Some(known) = &record.known_tools {
        body.insert("known_tools".into(), json!(known));
    }
    if let Some(result) = &record.result {
        body.insert("result".into(), result.clone());
    }
    let instruction = match record.decision {
        Decision::Allowed => None,
        _ if record.reason_code.as_deref() == Some(TOO_MANY_CALLS) => Some(
            "Not run: this turn asked for too many tool calls. Make fewer calls per turn.".to_owned(),
        ),
        Decision::Denied if record.reason_code.as_deref() == Some(UNKNOWN_TOOL) => Some(
            "This tool does not exist. Use only the tools in known_tools.".to_owned(),
        ),
        Decision::Denied => Some(
            "Blocked by policy. Do not retry this call. Explain to the user why it was blocked and suggest alternatives."
                .to_owned(),
        ),
        Decision::Rejected => Some(
            "The arguments were invalid and nothing ran. Explain the constraint to the user.".to_owned(),
        ),
        Decision::Failed => Some("The tool ran and failed; nothing changed.".to_owned()),
    };
    if let Some(instruction) = instruction {
        body.insert("instruction".into(), json!(instruction));
    }
    Value::Object(body).to_string()
}

/// JSON with object keys sorted at every level, so equal arguments compare equal.
pub fn canonical_json(value: &Value) -> String {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(object) => {
                let mut keys: Vec<&String> = object.keys().collect();
                keys.sort();
                let mut out = Map::new();
                for key in keys {
                    out.insert(key.clone(), sorted(&object[key]));
                }
                Value::Object(out)
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}

/// One transcript line for a call: tool, arguments, decision, reason, mode.
pub fn describe_call(record: &ToolCallRecord) -> String {
    let mut line = format!(
        "step {}: {} {} -> {}",
        record.step,
        record.tool,
        canonical_json(&record.arguments),
        record.decision.as_str().to_uppercase()
    );
    if let Some(reason) = &record.reason_code {
        line.push_str(&format!(" [{reason}]"));
    }
    if let Some(mode) = &record.mode {
        line.push_str(&format!(" in {mode} mode"));
    }
    if let Some(seq) = record.audit_seq {
        line.push_str(&format!(" (audit #{seq})"));
    }
    if !record.forwarded {
        line.push_str(" (not sent to the server)");
    }
    line
}

fn summarize_calls(record: &RunRecord) -> String {
    let calls: Vec<String> = record
        .tool_calls()
        .map(|call| format!("{} ({})", call.tool, call.decision.as_str()))
        .collect();
    if calls.is_empty() {
        "No tools were called.".to_owned()
    } else {
        format!("Calls made: {}.", calls.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_honours_retry_after_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert_eq!(policy.delay(1, None), Duration::from_millis(100));
        assert_eq!(policy.delay(2, None), Duration::from_millis(200));
        assert_eq!(policy.delay(3, None), Duration::from_millis(400));
        assert_eq!(policy.delay(9, None), Duration::from_secs(1));
        assert_eq!(
            policy.delay(1, Some(Duration::from_millis(700))),
            Duration::from_millis(700)
        );
        assert_eq!(
            policy.delay(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(1)
        );
        assert_eq!(
            RetryPolicy::immediate(3).delay(2, Some(Duration::from_secs(9))),
            Duration::ZERO
        );
    }

    #[test]
    fn canonical_json_ignores_key_order() {
        let a: Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"q":1,"p":2}],"x":2}}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a":{"x":2,"y":[1,{"p":2,"q":1}]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_ne!(canonical_json(&a), canonical_json(&json!({"b": 2})));
    }

    #[test]
    fn the_system_prompt_carries_the_policy_and_the_rules() {
        let status = PolicyStatus {
            mode: "NORMAL".into(),
            description: "Read-only.".into(),
            allowed_tools: vec!["list_services".into()],
            blocked_tools: vec!["restart_service".into()],
            always_blocked: vec!["delete_database".into()],
            emergency_expires_at: None,
            default_mode: "NORMAL".into(),
            available_modes: vec!["NORMAL".into(), "EMERGENCY".into()],
            reason: None,
            changed_by: "system".into(),
            changed_at: "now".into(),
        };
        let tools = vec![ToolSpec {
            name: "restart_service".into(),
            description: "Restart a service.".into(),
            input_schema: json!({"type": "object"}),
            category: Some("active".into()),
            allowed_modes: Some(vec!["EMERGENCY".into()]),
        }];
        let prompt = system_prompt(&status, &tools);
        assert!(prompt.contains("Current mode: NORMAL (Read-only.)"));
        assert!(prompt.contains("Tools allowed in NORMAL mode: list_services"));
        assert!(prompt.contains("Tools blocked in every mode: delete_database"));
        assert!(
            prompt.contains("- restart_service [active; allowed in EMERGENCY]: Restart a service.")
        );
        assert!(prompt.contains("do not retry it"));
        assert!(prompt.contains("suggest alternatives"));
    }

    #[test]
    fn refusals_tell_the_model_not_to_retry() {
        let record = ToolCallRecord {
            step: 1,
            call_id: "c1".into(),
            tool: "restart_service".into(),
            arguments: json!({"service_name": "web-server"}),
            forwarded: true,
            decision: Decision::Denied,
            reason_code: Some("blocked_in_mode".into()),
            message: Some("Tool 'restart_service' is blocked in NORMAL mode".into()),
            how_to_proceed: Some("Ask an operator".into()),
            known_tools: None,
            mode: Some("NORMAL".into()),
            audit_seq: Some(3),
            result: None,
        };
        let rendered: Value = serde_json::from_str(&render_for_model(&record)).unwrap();
        assert_eq!(rendered["decision"], "denied");
        assert_eq!(rendered["mode"], "NORMAL");
        assert!(
            rendered["instruction"]
                .as_str()
                .unwrap()
                .contains("Do not retry")
        );
    }
}
