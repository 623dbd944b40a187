//! The Proxi agent: an LLM SRE that acts only through the governed tools.
//!
//! [`Agent::run`] fetches the policy status and the tool catalog, tells the model
//! the rules, then alternates model turns and tool calls until the model answers
//! or the step limit is reached. The guards live here, in code, not only in the
//! prompt:
//! - a step limit, and a cap on calls per turn;
//! - a call whose answer cannot change (a policy denial in an unchanged mode,
//!   invalid arguments, an unknown service) is never sent twice with the same
//!   arguments; when the model asks for it again the run stops and the answer is
//!   built from the server's own refusal (reason, mode, `how_to_proceed`);
//! - a tool name outside the catalog, or arguments that are not JSON, still go to
//!   the server, so the attempt is audited and refused there;
//! - a tool call written as JSON text goes through the same path as a native
//!   one; a call merely described in text, or an empty reply, gets one re-prompt;
//! - a final answer that claims an action no allowed call performed is marked
//!   unverified in the run record;
//! - rate limits get a bounded exponential backoff; provider failures end the run
//!   with a typed error, never a panic.
//!
//! Boundary: this module talks to Proxi only through the wire types of
//! [`crate::api`] and the REST [`crate::client`] (and MCP, through rmcp's client);
//! it never reaches into the gateway, the policy, the tools or the server.

pub mod backend;
pub mod genai_provider;
pub mod mock;
pub mod openai_provider;
pub mod prompt;
pub mod provider;
pub mod run;
pub mod select;
pub mod text;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use backend::{BackendError, Decision, INVALID_ARGUMENTS, ToolBackend, ToolOutcome, UNKNOWN_TOOL};
pub use prompt::{render_for_model, system_prompt};
use provider::{
    AssistantTurn, LlmProvider, Message, ProviderError, ProviderRequest, ToolCallRequest,
    ToolResult,
};

/// Steps (model turns) a run may take unless told otherwise.
pub const DEFAULT_MAX_STEPS: usize = 8;
/// Tool calls one model turn may make unless told otherwise.
pub const DEFAULT_MAX_CALLS_PER_STEP: usize = 16;
/// Reason code of a call the agent itself refused because the policy had already denied it.
pub const ALREADY_DENIED: &str = "already_denied";
/// Reason code of a call the agent did not send again because it had already
/// failed or been rejected in a way that cannot change (e.g. `unknown_service`).
pub const ALREADY_FAILED: &str = "already_failed";
/// Reason code of an active call the agent did not send again because the same
/// call had already succeeded in this run (active tools converge on a target
/// state, so a repeat changes nothing).
pub const ALREADY_DONE: &str = "already_done";
/// Failure reason codes that the same call would get again.
pub const DETERMINISTIC_FAILURES: [&str; 3] = [
    crate::api::Reason::UnknownService.as_str(),
    crate::api::Reason::UnknownDatabase.as_str(),
    INVALID_ARGUMENTS,
];
/// What the model is told after an empty reply.
pub const EMPTY_REPLY_PROMPT: &str =
    "Your reply was empty. Call one of the tools, or answer the user in words.";
/// What the model is told after describing a tool call in text instead of making it.
pub const WRITTEN_CALL_PROMPT: &str = "You described a tool call in text; Proxi runs only calls made \
     through the tool-calling interface. To act, call the tool that way. To finish, answer the user \
     with what the tool results so far show.";
/// Reason code of a call the agent did not run because its turn asked for too many.
pub const TOO_MANY_CALLS: &str = "too_many_calls";
/// How long the agent waits for an operator to decide a call that needs a human's
/// approval, unless told otherwise (`proxi agent --approval-timeout`).
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest hold the agent asks the server for in one request while it waits for
/// an approval; the REST server holds at most about 25 s, then answers 202 again.
pub const APPROVAL_HOLD: Duration = Duration::from_secs(25);
/// Reason code of a call whose approval no operator decided within the agent's
/// approval timeout; the call did not run.
pub const APPROVAL_TIMEOUT: &str = "approval_timeout";

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
    /// How long to wait for an operator's decision on a call that needs a
    /// human's approval before reporting a timeout; `None` reports the pending
    /// approval at once without waiting.
    pub approval_timeout: Option<Duration>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            max_steps: DEFAULT_MAX_STEPS,
            max_calls_per_step: DEFAULT_MAX_CALLS_PER_STEP,
            retry: RetryPolicy::default(),
            approval_timeout: Some(DEFAULT_APPROVAL_TIMEOUT),
        }
    }
}

/// One tool call of a run, with its decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRecord {
    /// The step (model turn) that asked for it, from 1.
    pub step: usize,
    /// The provider's call id (generated by the loop when the provider sent none).
    pub call_id: String,
    /// The tool name as the model wrote it.
    pub tool: String,
    /// The arguments as sent (a JSON string when the model's arguments were not JSON).
    pub arguments: Value,
    /// Whether the call reached the server (false when the agent's guard refused it).
    pub forwarded: bool,
    /// Whether the model wrote this call as JSON text instead of a native tool call.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_text: bool,
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
    /// When the call needed a human's approval and the agent waited for it: the
    /// approval and what became of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalWait>,
}

/// What became of a call the agent waited on for a human's approval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalResult {
    /// An operator approved it and the identical call ran once (see the decision).
    Approved,
    /// An operator denied it; the call did not run.
    Denied,
    /// The approval lapsed before an operator decided; the call did not run.
    Expired,
    /// No operator decided within the agent's approval timeout; the call did
    /// not run and the approval is still pending.
    TimedOut,
    /// The server answered something else (e.g. the mode changed and the call is
    /// now blocked); see the decision and reason.
    Other,
}

impl ApprovalResult {
    /// Lowercase name for transcripts.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalResult::Approved => "approved",
            ApprovalResult::Denied => "denied",
            ApprovalResult::Expired => "expired",
            ApprovalResult::TimedOut => "timed_out",
            ApprovalResult::Other => "other",
        }
    }
}

/// The approval one call waited for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalWait {
    /// The approval the server asked for (`apr_...`).
    pub approval_id: String,
    /// How the wait ended.
    pub result: ApprovalResult,
    /// The audit seq of the first answer (the `approval_required` record).
    pub requested_seq: Option<u64>,
}

/// What an observer is told before the agent waits for an approval.
#[derive(Clone, Debug, PartialEq)]
pub struct ApprovalNotice {
    /// The step that made the call.
    pub step: usize,
    /// The tool as called.
    pub tool: String,
    /// The arguments as sent; the identical call is what the approval covers.
    pub arguments: Value,
    /// The pending approval an operator must decide.
    pub approval_id: String,
    /// How long the agent waits at most.
    pub timeout: Duration,
}

impl ApprovalNotice {
    /// The command an operator runs to approve the call.
    pub fn operator_command(&self) -> String {
        format!(
            "proxi approvals approve {} --reason \"...\"",
            self.approval_id
        )
    }
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
    /// What the loop did about an unusable turn (an empty reply, a call described in text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// The model gave a final answer.
    Answered,
    /// The model asked again for a call that had been refused; the run stopped and
    /// the answer was built from the server's refusal.
    Refused,
    /// The step limit was reached first.
    MaxSteps,
    /// The provider or the server failed.
    Failed,
}

/// Exit code of a run whose answer claims an action no allowed call performed.
pub const EXIT_UNVERIFIED: u8 = 3;
/// Exit code of a run that hit the step limit.
pub const EXIT_MAX_STEPS: u8 = 2;

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
    /// Lines of the final answer that claim an action no allowed call performed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unverified_claims: Vec<String>,
    /// What failed, when the outcome is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunRecord {
    /// An empty record for a run about to start.
    pub fn new(task: &str, provider: &dyn LlmProvider, transport: &str) -> RunRecord {
        RunRecord {
            task: task.to_owned(),
            provider: provider.name().to_owned(),
            model: provider.model().to_owned(),
            transport: transport.to_owned(),
            mode_at_start: String::new(),
            allowed_tools_at_start: Vec::new(),
            steps: Vec::new(),
            final_answer: String::new(),
            outcome: RunOutcome::Failed,
            unverified_claims: Vec::new(),
            error: None,
        }
    }

    /// Every tool call of the run, in order.
    pub fn tool_calls(&self) -> impl Iterator<Item = &ToolCallRecord> {
        self.steps.iter().flat_map(|step| step.tool_calls.iter())
    }

    /// Whether the final answer claims nothing that no allowed call performed.
    pub fn is_verified(&self) -> bool {
        self.unverified_claims.is_empty()
    }

    /// The process exit code for this run: 0 for an answer (or an explained
    /// refusal), [`EXIT_UNVERIFIED`] for an answer with unverified claims,
    /// [`EXIT_MAX_STEPS`] for the step limit, 1 for a failure.
    pub fn exit_code(&self) -> u8 {
        match self.outcome {
            RunOutcome::Answered | RunOutcome::Refused if !self.is_verified() => EXIT_UNVERIFIED,
            RunOutcome::Answered | RunOutcome::Refused => 0,
            RunOutcome::MaxSteps => EXIT_MAX_STEPS,
            RunOutcome::Failed => 1,
        }
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
    /// The model said nothing, twice in a row.
    #[error("the model returned an empty reply at step {step}, also after being asked again")]
    EmptyReply {
        /// The step of the second empty reply.
        step: usize,
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

impl AgentFailure {
    /// Wraps `error` with `record`, marking the record as failed.
    pub fn new(error: AgentError, mut record: RunRecord) -> AgentFailure {
        record.outcome = RunOutcome::Failed;
        record.error = Some(error.to_string());
        record.final_answer = format!("❌ The run stopped: {error}");
        AgentFailure {
            error,
            record: Box::new(record),
        }
    }
}

/// Called by the loop as the run progresses (live transcripts, the demo).
pub trait AgentObserver: Send + Sync {
    /// After each tool call has been decided (or refused by the agent's guard).
    fn after_tool_call<'a>(&'a self, step: usize, record: &'a ToolCallRecord) -> BoxFuture<'a, ()>;

    /// Before the agent waits for an operator to decide a call's approval (it
    /// then reports the call once, through [`Self::after_tool_call`]). The
    /// default does nothing.
    fn waiting_for_approval<'a>(&'a self, notice: &'a ApprovalNotice) -> BoxFuture<'a, ()> {
        let _ = notice;
        Box::pin(async {})
    }
}

/// Calls whose answer cannot change, by (tool, canonical arguments), with that
/// answer and how often the model has asked for them again.
#[derive(Default)]
struct RepeatGuard {
    settled: HashMap<(String, String), (ToolCallRecord, usize)>,
}

/// Repeats of a failed or rejected call the model is told about before the run
/// stops; a repeated policy denial stops the run at once.
const FAILURE_REPEATS_BEFORE_STOP: usize = 2;

impl RepeatGuard {
    /// Whether the same call would get the same answer again.
    fn is_settled(record: &ToolCallRecord) -> bool {
        match record.decision {
            Decision::Allowed => false,
            Decision::Denied | Decision::Rejected => true,
            // A denied or unanswered approval is not waited for twice in a run.
            Decision::Failed => record.reason_code.as_deref().is_some_and(|reason| {
                DETERMINISTIC_FAILURES.contains(&reason)
                    || reason == APPROVAL_TIMEOUT
                    || crate::api::Reason::ApprovalDenied.is(Some(reason))
            }),
        }
    }
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

    /// Runs one task to a final answer, a stop on a repeated refusal, the step
    /// limit, or a failure.
    pub async fn run(&self, task: &str) -> Result<RunRecord, AgentFailure> {
        let mut record = RunRecord::new(task, self.provider, self.backend.transport());
        match self.run_into(task, &mut record).await {
            Ok(()) => Ok(record),
            Err(error) => Err(AgentFailure::new(error, record)),
        }
    }

    async fn run_into(&self, task: &str, record: &mut RunRecord) -> Result<(), AgentError> {
        let status = self.backend.policy_status().await?;
        let tools = self.backend.catalog().await?;
        record.mode_at_start = status.mode.clone();
        record.allowed_tools_at_start = status.allowed_tools.clone();
        let system = system_prompt(&status, &tools);
        let known: Vec<String> = tools.iter().map(|tool| tool.name.clone()).collect();
        // Active tools (restart, scale) converge on a target state: repeating an
        // identical successful call changes nothing. Small models repeat them
        // until the step limit (eight restarts of a healthy web-server).
        let converging: HashSet<String> = tools
            .iter()
            .filter(|tool| tool.category.as_deref() == Some("active"))
            .map(|tool| tool.name.clone())
            .collect();

        let mut messages = vec![Message::User(task.to_owned())];
        let mut guard = RepeatGuard::default();
        let (mut asked_after_empty, mut asked_after_written_call) = (false, false);
        for step in 1..=self.config.max_steps {
            let request = ProviderRequest {
                system: &system,
                messages: &messages,
                tools: &tools,
            };
            let (mut turn, attempts) =
                complete_with_retry(self.provider, request, &self.config.retry).await?;
            let mut step_record = StepRecord {
                step,
                text: turn.text.clone(),
                attempts,
                tool_calls: Vec::new(),
                note: None,
            };
            if turn.is_empty() {
                if asked_after_empty {
                    record.steps.push(step_record);
                    return Err(AgentError::EmptyReply { step });
                }
                asked_after_empty = true;
                step_record.note = Some("empty reply; asked the model again".to_owned());
                record.steps.push(step_record);
                messages.push(Message::User(EMPTY_REPLY_PROMPT.to_owned()));
                continue;
            }
            let mut from_text = false;
            if turn.is_final() {
                let answer = turn.text.clone().unwrap_or_default();
                let written = text::calls_in_text(&answer, &known, step);
                if !written.is_empty() {
                    // Executed like native calls; replayed to the provider as native calls.
                    from_text = true;
                    step_record.note = Some(format!(
                        "{} tool call(s) written as JSON text, run as calls",
                        written.len()
                    ));
                    turn = AssistantTurn::calls(written);
                } else if !asked_after_written_call
                    && text::looks_like_a_written_call(
                        &answer,
                        &known,
                        &record.tool_calls().collect::<Vec<_>>(),
                    )
                {
                    asked_after_written_call = true;
                    step_record.note = Some(
                        "a tool call described in text; asked the model to make it".to_owned(),
                    );
                    record.steps.push(step_record);
                    messages.push(Message::Assistant(turn));
                    messages.push(Message::User(WRITTEN_CALL_PROMPT.to_owned()));
                    continue;
                } else {
                    record.steps.push(step_record);
                    record.final_answer = answer;
                    record.outcome = RunOutcome::Answered;
                    mark_unverified_claims(record);
                    return Ok(());
                }
            }
            assign_missing_ids(&mut turn, step);
            let calls = turn.tool_calls.clone();
            messages.push(Message::Assistant(turn));
            let mut results = Vec::with_capacity(calls.len());
            let mut repeated: Vec<ToolCallRecord> = Vec::new();
            for (index, call) in calls.into_iter().enumerate() {
                let (mut call_record, earlier) = if index < self.config.max_calls_per_step {
                    self.call_tool(step, &call, (&known, &converging), &mut guard)
                        .await?
                } else {
                    // Every call still gets a result: providers reject unanswered call ids.
                    (
                        skipped_call(step, &call, self.config.max_calls_per_step),
                        None,
                    )
                };
                call_record.from_text = from_text;
                results.push(ToolResult {
                    call_id: call.id.clone(),
                    name: call.name.clone(),
                    content: render_for_model(&call_record),
                });
                if let Some(observer) = self.observer {
                    observer.after_tool_call(step, &call_record).await;
                }
                if let Some(earlier) = earlier
                    && !repeated.contains(&earlier)
                {
                    repeated.push(earlier);
                }
                step_record.tool_calls.push(call_record);
            }
            record.steps.push(step_record);
            if !repeated.is_empty() {
                // Asking the model again would only repeat the refusal (about 100 s
                // of model time per run on a small local model); the server's own
                // answer explains it better than the model did.
                let all_done = repeated
                    .iter()
                    .all(|call| call.decision == Decision::Allowed);
                record.outcome = if all_done {
                    RunOutcome::Answered
                } else {
                    RunOutcome::Refused
                };
                record.final_answer = answer_from_settled(&repeated, record);
                mark_unverified_claims(record);
                return Ok(());
            }
            messages.push(Message::ToolResults(results));
        }
        record.outcome = RunOutcome::MaxSteps;
        record.final_answer = format!(
            "❌ I stopped after {} steps without finishing the task (the step limit). {}",
            self.config.max_steps,
            summarize_calls(record)
        );
        Ok(())
    }

    /// Sends one call, unless the guard already knows its answer. Returns the
    /// record and, when the repeat should end the run, the earlier record it repeats.
    async fn call_tool(
        &self,
        step: usize,
        call: &ToolCallRequest,
        (known, converging): (&[String], &HashSet<String>),
        guard: &mut RepeatGuard,
    ) -> Result<(ToolCallRecord, Option<ToolCallRecord>), AgentError> {
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
            from_text: false,
            decision: Decision::Denied,
            reason_code: None,
            message: None,
            how_to_proceed: None,
            known_tools: None,
            mode: None,
            audit_seq: None,
            result: None,
            approval: None,
        };
        if let Some((earlier, repeats)) = guard.settled.get(&key).cloned()
            && !self.mode_changed_since(&earlier).await
        {
            let denied = earlier.decision == Decision::Denied;
            let done = earlier.decision == Decision::Allowed;
            let repeats = repeats + 1;
            if let Some(entry) = guard.settled.get_mut(&key) {
                entry.1 = repeats;
            }
            // A denial is explained best by the server's own words, now. A failure,
            // rejection or completed action is explained to the model once (it may
            // move on), and ends the run if the model asks for it yet again.
            let stop = denied || repeats >= FAILURE_REPEATS_BEFORE_STOP;
            let answer = match (&earlier.reason_code, &earlier.message) {
                (Some(reason), Some(message)) => format!(" ({reason}: {message})"),
                (Some(reason), None) => format!(" ({reason})"),
                _ => String::new(),
            };
            if done {
                let record = ToolCallRecord {
                    decision: Decision::Allowed,
                    reason_code: Some(ALREADY_DONE.to_owned()),
                    message: Some(format!(
                        "{} with these arguments already ran successfully in this run{}; the agent did not send it again, because repeating it changes nothing.",
                        call.name,
                        earlier
                            .mode
                            .as_deref()
                            .map(|mode| format!(" (in {mode} mode)"))
                            .unwrap_or_default()
                    )),
                    how_to_proceed: Some(
                        "It is done. Check the state with a read-only tool if needed, then answer the user."
                            .to_owned(),
                    ),
                    mode: earlier.mode.clone(),
                    result: earlier.result.clone(),
                    ..base
                };
                return Ok((record, stop.then_some(earlier)));
            }
            let record = ToolCallRecord {
                decision: earlier.decision,
                reason_code: Some(
                    if denied {
                        ALREADY_DENIED
                    } else {
                        ALREADY_FAILED
                    }
                    .to_owned(),
                ),
                message: Some(format!(
                    "{} with these arguments was already {} in this run{answer}; the agent did not send it again, because the same call gets the same answer.",
                    call.name,
                    earlier.decision.as_str()
                )),
                how_to_proceed: Some(earlier.how_to_proceed.clone().unwrap_or_else(|| {
                    "Do not retry. Explain the earlier answer to the user.".to_owned()
                })),
                mode: earlier.mode.clone(),
                ..base
            };
            return Ok((record, stop.then_some(earlier)));
        }
        // Unknown names and unparsable arguments are forwarded anyway: the server
        // audits the attempt and refuses it, which is better evidence than a local refusal.
        let mut outcome: ToolOutcome = self
            .backend
            .call_tool(&call.name, arguments.clone())
            .await?;
        let mut approval = None;
        if let (Some(approval_id), Some(timeout)) =
            (awaited_approval(&outcome), self.config.approval_timeout)
        {
            let notice = ApprovalNotice {
                step,
                tool: call.name.clone(),
                arguments: arguments.clone(),
                approval_id,
                timeout,
            };
            if let Some(observer) = self.observer {
                observer.waiting_for_approval(&notice).await;
            }
            let (answer, wait) = self.wait_for_approval(&notice, outcome).await?;
            outcome = answer;
            approval = Some(wait);
        }
        let in_catalog = known.iter().any(|tool| tool == &call.name);
        let mut known_tools = outcome.known_tools;
        let mut reason_code = outcome.reason_code;
        if !in_catalog && outcome.decision != Decision::Allowed {
            known_tools.get_or_insert_with(|| known.to_vec());
            reason_code.get_or_insert_with(|| UNKNOWN_TOOL.to_owned());
        }
        let mut message = outcome.message;
        if let Some(text) = &call.unparsed_arguments
            && outcome.decision == Decision::Rejected
        {
            message = Some(format!(
                "not JSON: the arguments {:?} do not parse as a JSON object, so nothing ran. Send the arguments as a JSON object matching the tool's schema.",
                truncate_chars(text, 200)
            ));
        }
        let record = ToolCallRecord {
            forwarded: true,
            decision: outcome.decision,
            reason_code,
            message,
            how_to_proceed: outcome.how_to_proceed,
            known_tools,
            mode: outcome.mode,
            audit_seq: outcome.audit_seq,
            result: outcome.result,
            approval,
            ..base
        };
        let converged = record.decision == Decision::Allowed && converging.contains(&record.tool);
        if RepeatGuard::is_settled(&record) || converged {
            guard.settled.insert(key, (record.clone(), 0));
        } else {
            guard.settled.remove(&key);
        }
        Ok((record, None))
    }

    /// Waits for an operator to decide `notice.approval_id`, for at most
    /// `notice.timeout`: the identical call is sent again with a server-side hold
    /// (at most [`APPROVAL_HOLD`] each) until the answer is no longer that pending
    /// approval. An approval the operator grants is used by the one held call the
    /// server runs then, so the approved call runs once. Returns the answer to
    /// report (a denial, an expiry and a timeout in plain words) and the wait.
    async fn wait_for_approval(
        &self,
        notice: &ApprovalNotice,
        first: ToolOutcome,
    ) -> Result<(ToolOutcome, ApprovalWait), AgentError> {
        let id = notice.approval_id.as_str();
        let wait = |result| ApprovalWait {
            approval_id: id.to_owned(),
            result,
            requested_seq: first.audit_seq,
        };
        let deadline = tokio::time::Instant::now() + notice.timeout;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                break;
            }
            let held = self.backend.call_tool_held(
                &notice.tool,
                notice.arguments.clone(),
                remaining.min(APPROVAL_HOLD),
            );
            let Ok(answer) = tokio::time::timeout(remaining, held).await else {
                break;
            };
            let mut answer = answer?;
            let reason = answer.reason_code.as_deref();
            let result = if answer.decision == Decision::Allowed {
                ApprovalResult::Approved
            } else if crate::api::Reason::ApprovalRequired.is(reason)
                && answer.approval_id.as_deref() == Some(id)
            {
                continue;
            } else if crate::api::Reason::ApprovalDenied.is(reason) {
                ApprovalResult::Denied
            } else if crate::api::Reason::ApprovalExpired.is(reason) {
                let new = answer.approval_id.as_deref().unwrap_or("none");
                answer.message = Some(format!(
                    "Approval {id} expired before an operator decided; the call did not run. (The server requested a new approval, {new}, which the agent did not wait for.)"
                ));
                answer.how_to_proceed = Some(
                    "Tell the user no operator approved the call in time; do not retry it now."
                        .to_owned(),
                );
                ApprovalResult::Expired
            } else {
                ApprovalResult::Other
            };
            return Ok((answer, wait(result)));
        }
        let waited = humantime::format_duration(notice.timeout);
        let outcome = ToolOutcome {
            reason_code: Some(APPROVAL_TIMEOUT.to_owned()),
            message: Some(format!(
                "No operator decided approval {id} within {waited} (the agent's approval timeout); the call did not run. The approval stays pending until it expires: after `{}`, the identical call runs once.",
                notice.operator_command()
            )),
            how_to_proceed: Some(
                "Tell the user the call waits for an operator's approval; do not retry it now."
                    .to_owned(),
            ),
            ..first.clone()
        };
        Ok((outcome, wait(ApprovalResult::TimedOut)))
    }

    /// Whether the mode is no longer the one an earlier denial was decided in: an
    /// operator may have declared a mode that allows the call since. Failures and
    /// rejections do not depend on the mode; an unreadable status counts as unchanged.
    async fn mode_changed_since(&self, earlier: &ToolCallRecord) -> bool {
        if earlier.decision != Decision::Denied {
            return false;
        }
        let Some(mode) = &earlier.mode else {
            return false;
        };
        match self.backend.policy_status().await {
            Ok(status) => &status.mode != mode,
            Err(_) => false,
        }
    }
}

/// The pending approval an answer says the identical call waits for, if any.
fn awaited_approval(outcome: &ToolOutcome) -> Option<String> {
    let waits = [
        crate::api::Reason::ApprovalRequired,
        crate::api::Reason::ApprovalExpired,
        crate::api::Reason::ApprovalMismatch,
    ];
    let reason = outcome.reason_code.as_deref();
    (outcome.decision != Decision::Allowed && waits.iter().any(|code| code.is(reason)))
        .then(|| outcome.approval_id.clone())
        .flatten()
}

/// Gives every call of a turn a non-empty id unique within the turn; some
/// OpenAI-compatible servers omit it, and results are paired with calls by id.
fn assign_missing_ids(turn: &mut AssistantTurn, step: usize) {
    let mut seen = HashSet::new();
    let mut changed = false;
    for (index, call) in turn.tool_calls.iter_mut().enumerate() {
        if call.id.trim().is_empty() || !seen.insert(call.id.clone()) {
            call.id = format!("proxi-{step}-{}", index + 1);
            seen.insert(call.id.clone());
            changed = true;
        }
    }
    if changed {
        // The provider's own message carries the old ids; rebuild it from the calls.
        turn.native = None;
    }
}

fn mark_unverified_claims(record: &mut RunRecord) {
    let calls: Vec<&ToolCallRecord> = record.tool_calls().collect();
    let claims = text::unverified_claims(&record.final_answer, &calls);
    if !claims.is_empty() {
        record.final_answer.push_str(&format!(
            "\n⚠ Unverified: no allowed tool call in this run did what {} claim{}.",
            if claims.len() == 1 {
                "this line"
            } else {
                "these lines"
            },
            if claims.len() == 1 { "s" } else { "" }
        ));
        record.unverified_claims = claims;
    }
}

/// The final answer after the model repeated a settled call: for a completed
/// action, what ran; for a refusal, the server's own words (reason, mode, how to
/// proceed); then what was sent.
fn answer_from_settled(settled: &[ToolCallRecord], record: &RunRecord) -> String {
    let mut lines = Vec::new();
    for refusal in settled {
        if refusal.decision == Decision::Allowed {
            let mut line = format!(
                "✓ {} {} ran",
                refusal.tool,
                canonical_json(&refusal.arguments)
            );
            if let Some(mode) = &refusal.mode {
                line.push_str(&format!(" in {mode} mode"));
            }
            if let Some(seq) = refusal.audit_seq {
                line.push_str(&format!(" (audit #{seq})"));
            }
            if let Some(result) = &refusal.result {
                line.push_str(&format!(": {}", truncate_chars(&result.to_string(), 300)));
            }
            lines.push(line);
            continue;
        }
        let mut line = format!(
            "❌ {} {} was {}",
            refusal.tool,
            canonical_json(&refusal.arguments),
            refusal.decision.as_str()
        );
        if let Some(mode) = &refusal.mode {
            line.push_str(&format!(" in {mode} mode"));
        }
        if let Some(reason) = &refusal.reason_code {
            line.push_str(&format!(" ({reason})"));
        }
        if let Some(message) = &refusal.message {
            line.push_str(&format!(": {message}"));
        }
        lines.push(line);
        if let Some(next) = &refusal.how_to_proceed {
            lines.push(format!("How to proceed: {next}"));
        }
    }
    lines.push(format!(
        "The model asked for the same call again; Proxi does not send a call whose answer cannot change (or that is already done), so the run stopped here. {}",
        summarize_calls(record)
    ));
    lines.join("\n")
}

/// The record of a call the loop did not send because its turn had too many.
fn skipped_call(step: usize, call: &ToolCallRequest, limit: usize) -> ToolCallRecord {
    ToolCallRecord {
        step,
        call_id: call.id.clone(),
        tool: call.name.clone(),
        arguments: call.arguments.clone(),
        forwarded: false,
        from_text: false,
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
        approval: None,
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

fn truncate_chars(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(limit).collect::<String>())
    }
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
    if let Some(wait) = &record.approval {
        line.push_str(&format!(
            " (after approval {}: {})",
            wait.approval_id,
            wait.result.as_str()
        ));
    }
    if record.from_text {
        line.push_str(" (written as text)");
    }
    if !record.forwarded {
        line.push_str(" (not sent to the server)");
    }
    line
}

/// What reached the server, in order; calls the guard kept back are counted apart.
fn summarize_calls(record: &RunRecord) -> String {
    let sent: Vec<String> = record
        .tool_calls()
        .filter(|call| call.forwarded)
        .map(|call| format!("{} ({})", call.tool, call.decision.as_str()))
        .collect();
    let kept = record.tool_calls().filter(|call| !call.forwarded).count();
    let mut summary = if sent.is_empty() {
        "No call reached the server.".to_owned()
    } else {
        format!("Calls sent to the server: {}.", sent.join(", "))
    };
    if kept > 0 {
        summary.push_str(&format!(
            " {kept} repeated or excess call(s) were not sent."
        ));
    }
    summary
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::api::Reason;

    use super::*;

    /// ARCHITECTURE.md's invariant "the agent is a client": every `crate::` path
    /// in src/agent/ goes to the wire types, the client, the TLS set-up or the
    /// agent itself, never into the gateway, policy or servers.
    #[test]
    fn the_agent_reaches_only_the_api_the_client_and_tls() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/agent");
        let allowed = ["crate::api", "crate::client", "crate::tls", "crate::agent"];
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).expect("src/agent is readable") {
            let path = entry.expect("a directory entry").path();
            let text = std::fs::read_to_string(&path).expect("a source file");
            files += 1;
            for (at, _) in text.match_indices("crate::") {
                let rest = &text[at..];
                let names_a_module = rest["crate::".len()..]
                    .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
                assert!(
                    !names_a_module || allowed.iter().any(|prefix| rest.starts_with(prefix)),
                    "{} reaches {}",
                    path.display(),
                    rest.lines().next().unwrap_or_default()
                );
            }
        }
        assert!(files > 5, "read only {files} files of src/agent");
    }

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

    /// A backend whose first answer to `scale_fleet` waits for approval `apr_1`
    /// and whose held calls answer from `held`, in order; an empty script holds
    /// forever (nobody decides).
    struct ApprovalBackend {
        held: std::sync::Mutex<std::collections::VecDeque<ToolOutcome>>,
        plain_calls: std::sync::atomic::AtomicUsize,
        held_calls: std::sync::atomic::AtomicUsize,
    }

    fn outcome(decision: Decision, reason: Option<&str>, approval: Option<&str>) -> ToolOutcome {
        ToolOutcome {
            decision,
            reason_code: reason.map(str::to_owned),
            message: reason.map(|reason| format!("server says {reason}")),
            result: (decision == Decision::Allowed)
                .then(|| json!({"message": "Fleet scaled to 8"})),
            how_to_proceed: None,
            known_tools: None,
            mode: Some("EMERGENCY".to_owned()),
            audit_seq: Some(7),
            approval_id: approval.map(str::to_owned),
        }
    }

    fn waiting(id: &str) -> ToolOutcome {
        outcome(
            Decision::Failed,
            Some(Reason::ApprovalRequired.as_str()),
            Some(id),
        )
    }

    impl ApprovalBackend {
        fn new(held: Vec<ToolOutcome>) -> ApprovalBackend {
            ApprovalBackend {
                held: std::sync::Mutex::new(held.into()),
                plain_calls: 0.into(),
                held_calls: 0.into(),
            }
        }
    }

    impl ToolBackend for ApprovalBackend {
        fn transport(&self) -> &'static str {
            "rest"
        }

        fn catalog(&self) -> BoxFuture<'_, Result<Vec<provider::ToolSpec>, BackendError>> {
            Box::pin(async {
                Ok(vec![provider::ToolSpec {
                    name: "scale_fleet".to_owned(),
                    description: "Scale the fleet".to_owned(),
                    input_schema: json!({"type": "object"}),
                    category: Some("active".to_owned()),
                    allowed_modes: Some(vec!["EMERGENCY".to_owned()]),
                }])
            })
        }

        fn policy_status(&self) -> BoxFuture<'_, Result<crate::api::PolicyStatus, BackendError>> {
            Box::pin(async {
                Ok(serde_json::from_value(json!({
                    "mode": "EMERGENCY", "description": "", "allowed_tools": ["scale_fleet"],
                    "blocked_tools": [], "always_blocked": [], "emergency_expires_at": null,
                    "default_mode": "NORMAL", "available_modes": ["NORMAL", "EMERGENCY"],
                    "reason": null, "changed_by": "operator", "changed_at": ""
                }))
                .expect("a valid status"))
            })
        }

        fn call_tool<'a>(
            &'a self,
            _name: &'a str,
            _arguments: Value,
        ) -> BoxFuture<'a, Result<ToolOutcome, BackendError>> {
            self.plain_calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok(waiting("apr_1")) })
        }

        fn call_tool_held<'a>(
            &'a self,
            _name: &'a str,
            _arguments: Value,
            hold: Duration,
        ) -> BoxFuture<'a, Result<ToolOutcome, BackendError>> {
            assert!(hold <= APPROVAL_HOLD, "asks for at most the server's hold");
            self.held_calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let next = self.held.lock().expect("not poisoned").pop_front();
            Box::pin(async move {
                match next {
                    Some(answer) => Ok(answer),
                    None => std::future::pending().await,
                }
            })
        }
    }

    /// Records the notices the agent gives before waiting.
    #[derive(Default)]
    struct Notices(std::sync::Mutex<Vec<ApprovalNotice>>);

    impl AgentObserver for Notices {
        fn after_tool_call<'a>(&'a self, _: usize, _: &'a ToolCallRecord) -> BoxFuture<'a, ()> {
            Box::pin(async {})
        }

        fn waiting_for_approval<'a>(&'a self, notice: &'a ApprovalNotice) -> BoxFuture<'a, ()> {
            self.0.lock().expect("not poisoned").push(notice.clone());
            Box::pin(async {})
        }
    }

    async fn run_with(
        backend: &ApprovalBackend,
        timeout: Option<Duration>,
    ) -> (RunRecord, Vec<ApprovalNotice>) {
        let planner = mock::MockPlanner::new();
        let notices = Notices::default();
        let config = AgentConfig {
            approval_timeout: timeout,
            ..AgentConfig::default()
        };
        let record = Agent::new(&planner, backend)
            .with_config(config)
            .with_observer(&notices)
            .run("Scale the fleet to 8")
            .await
            .expect("the run finishes");
        let notices = notices.0.lock().expect("not poisoned").clone();
        (record, notices)
    }

    fn scale_call(record: &RunRecord) -> ToolCallRecord {
        record
            .tool_calls()
            .find(|call| call.tool == "scale_fleet")
            .expect("the agent scaled")
            .clone()
    }

    #[tokio::test]
    async fn an_approved_call_runs_once_after_the_operator_decides() {
        // Two holds end undecided (the server answers 202 again), the third is approved.
        let backend = ApprovalBackend::new(vec![
            waiting("apr_1"),
            waiting("apr_1"),
            outcome(Decision::Allowed, None, None),
        ]);
        let (record, notices) = run_with(&backend, Some(Duration::from_secs(60))).await;
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].approval_id, "apr_1");
        assert_eq!(
            notices[0].operator_command(),
            "proxi approvals approve apr_1 --reason \"...\""
        );
        let call = scale_call(&record);
        assert_eq!(call.decision, Decision::Allowed, "{call:?}");
        let wait = call.approval.expect("the wait is recorded");
        assert_eq!(wait.result, ApprovalResult::Approved);
        assert_eq!(wait.requested_seq, Some(7));
        use std::sync::atomic::Ordering::SeqCst;
        assert_eq!(backend.plain_calls.load(SeqCst), 1, "one first call");
        assert_eq!(
            backend.held_calls.load(SeqCst),
            3,
            "held until decided, then no more"
        );
        assert!(record.final_answer.contains('✓'), "{}", record.final_answer);
    }

    #[tokio::test]
    async fn a_denial_and_an_expiry_are_reported_plainly() {
        let denied = ApprovalBackend::new(vec![outcome(
            Decision::Failed,
            Some(Reason::ApprovalDenied.as_str()),
            None,
        )]);
        let (record, _) = run_with(&denied, Some(Duration::from_secs(60))).await;
        let call = scale_call(&record);
        assert_eq!(
            call.approval.map(|wait| wait.result),
            Some(ApprovalResult::Denied)
        );
        assert_eq!(
            call.reason_code.as_deref(),
            Some(Reason::ApprovalDenied.as_str())
        );

        let expired = ApprovalBackend::new(vec![outcome(
            Decision::Failed,
            Some(Reason::ApprovalExpired.as_str()),
            Some("apr_2"),
        )]);
        let (record, _) = run_with(&expired, Some(Duration::from_secs(60))).await;
        let call = scale_call(&record);
        assert_eq!(
            call.approval.map(|wait| wait.result),
            Some(ApprovalResult::Expired)
        );
        let message = call.message.unwrap_or_default();
        assert!(
            message.contains("apr_1 expired") && message.contains("did not run"),
            "{message}"
        );
        // Not waited for again: the new approval apr_2 is only named.
        assert_eq!(
            expired.held_calls.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    }

    #[tokio::test]
    async fn nobody_deciding_ends_in_a_timeout_and_no_wait_means_none() {
        let backend = ApprovalBackend::new(Vec::new());
        let (record, _) = run_with(&backend, Some(Duration::from_millis(20))).await;
        let call = scale_call(&record);
        assert_eq!(
            call.approval.map(|wait| wait.result),
            Some(ApprovalResult::TimedOut)
        );
        assert_eq!(call.reason_code.as_deref(), Some(APPROVAL_TIMEOUT));
        let message = call.message.unwrap_or_default();
        assert!(
            message.contains("apr_1") && message.contains("did not run"),
            "{message}"
        );

        let backend = ApprovalBackend::new(Vec::new());
        let (record, notices) = run_with(&backend, None).await;
        assert!(notices.is_empty());
        let call = scale_call(&record);
        assert_eq!(call.approval, None);
        assert_eq!(
            call.reason_code.as_deref(),
            Some(Reason::ApprovalRequired.as_str())
        );
        assert_eq!(
            backend.held_calls.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
    }

    #[test]
    fn missing_and_duplicate_ids_are_replaced() {
        let mut turn = AssistantTurn::calls(vec![
            ToolCallRequest::new("", "list_services", json!({})),
            ToolCallRequest::new("a", "list_services", json!({})),
            ToolCallRequest::new("a", "read_logs", json!({})),
        ]);
        assign_missing_ids(&mut turn, 4);
        let ids: Vec<&str> = turn
            .tool_calls
            .iter()
            .map(|call| call.id.as_str())
            .collect();
        assert_eq!(ids, ["proxi-4-1", "a", "proxi-4-3"]);
    }
}
