//! What a caller is told about a tool call that did not simply succeed: one
//! function, [`answer`], that REST (`/tools/execute`) and MCP (`tools/call`) both
//! render, so their `reason_code`, message, `how_to_proceed` and `known_tools`
//! never drift apart.

use crate::gateway::{Outcome, UpstreamFailure};
use crate::reason::Reason;

/// A refused or failed call as every front end reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Whether the policy refused the call (unknown tools included).
    pub policy_violation: bool,
    /// The stable reason code (`blocked_in_mode`, `invalid_arguments`, `upstream_timeout`, ...).
    pub reason_code: Reason,
    /// Why, in words.
    pub message: String,
    /// A concrete next step for the caller.
    pub how_to_proceed: String,
    /// For an unknown tool, the tools that exist.
    pub known_tools: Option<Vec<String>>,
    /// For a rate-limited call or a guard's cooldown, whole seconds to wait before calling again.
    pub retry_after_seconds: Option<u64>,
    /// For a call that waits for a human: the approval id and when it lapses (RFC 3339).
    pub approval: Option<(String, String)>,
}

/// The answer for `outcome`, or `None` when the call succeeded (a built-in ran, or
/// an upstream answered without `isError`). `known_tools` lists the tools that
/// exist; it is asked only for an unknown tool.
pub fn answer(outcome: &Outcome, known_tools: impl FnOnce() -> Vec<String>) -> Option<Answer> {
    // Only a success has no reason code.
    let reason_code = outcome.reason_code()?;
    let (message, how_to_proceed, known) = match outcome {
        Outcome::Executed(_) => return None,
        Outcome::Forwarded(result) if result.is_error != Some(true) => return None,
        Outcome::Forwarded(result) => (
            format!(
                "the upstream tool reported an error: {}",
                first_text(result)
            ),
            "The tool ran and failed; read its result, fix the cause, and call again if it still makes sense."
                .to_owned(),
            None,
        ),
        Outcome::Denied {
            message,
            how_to_proceed,
            ..
        } => (message.clone(), how_to_proceed.clone(), None),
        Outcome::Guarded(refusal) => (refusal.message(), refusal.how_to_proceed(), None),
        Outcome::UnknownTool { message } => (
            message.clone(),
            "Use one of the tools listed in known_tools (see tools/list or /tools/catalog)."
                .to_owned(),
            Some(known_tools()),
        ),
        Outcome::InvalidArguments(message) => (
            message.clone(),
            "Fix the arguments to match the tool's inputSchema (see tools/list) and call again."
                .to_owned(),
            None,
        ),
        Outcome::InvalidToolName(message) => (
            message.clone(),
            "Call one of the tools listed by tools/list, by its exact name.".to_owned(),
            None,
        ),
        Outcome::RateLimited { .. } => (
            rate_limited_message(outcome.retry_after_seconds()),
            "Slow down: wait retry_after_seconds, then call again.".to_owned(),
            None,
        ),
        Outcome::Failed { message, .. } => (
            message.clone(),
            "Nothing was changed. Check the arguments (list_services shows valid service names) and call again."
                .to_owned(),
            None,
        ),
        Outcome::ModeChanged { message } => (
            message.clone(),
            "Nothing ran. Read the mode in force (/policy/status) and call again if it allows the tool."
                .to_owned(),
            None,
        ),
        Outcome::UpstreamFailed { failure, message } => (
            message.clone(),
            upstream_how_to_proceed(*failure).to_owned(),
            None,
        ),
        Outcome::Approval(answer) => (answer.message.clone(), answer.how_to_proceed.clone(), None),
    };
    let approval = match outcome {
        Outcome::Approval(answer) => answer
            .approval_id
            .clone()
            .zip(answer.expires_at.map(crate::audit::format_time)),
        _ => None,
    };
    Some(Answer {
        policy_violation: outcome.is_policy_violation(),
        reason_code,
        message,
        how_to_proceed,
        known_tools: known,
        retry_after_seconds: outcome.retry_after_seconds(),
        approval,
    })
}

/// What a rate-limited caller is told.
pub fn rate_limited_message(retry_after_seconds: Option<u64>) -> String {
    format!(
        "Rate limit exceeded: too many tool calls from this principal. Retry after {} s.",
        retry_after_seconds.unwrap_or(1)
    )
}

/// What a caller can do after an upstream call that has no result.
fn upstream_how_to_proceed(failure: UpstreamFailure) -> &'static str {
    match failure {
        UpstreamFailure::Unavailable => {
            "The upstream server is down or restarting; try again later. Other tools still work."
        }
        UpstreamFailure::Timeout => {
            "The upstream server did not answer in time and the call was cancelled; it may or may not have taken effect. Check before calling again."
        }
        UpstreamFailure::Refused => {
            "The upstream server refused the request; check the arguments against the tool's inputSchema."
        }
        UpstreamFailure::Cancelled => {
            "The call was cancelled before it finished; check the policy status before calling again."
        }
    }
}

/// The first text block of an upstream result, cut to 1 KiB.
fn first_text(result: &rmcp::model::CallToolResult) -> String {
    let text = result
        .content
        .iter()
        .find_map(|block| block.as_text().map(|text| text.text.as_str()))
        .unwrap_or("(no text)");
    crate::gateway::truncate(text, 1024).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::{CallToolResult, ContentBlock};
    use serde_json::json;

    #[test]
    fn successes_have_no_answer_and_failures_have_their_reason_code() {
        let known = || vec!["list_services".to_owned()];
        assert_eq!(answer(&Outcome::Executed(json!({})), known), None);
        let ok = CallToolResult::success(vec![ContentBlock::text("fine")]);
        assert_eq!(answer(&Outcome::Forwarded(ok), known), None);
        let failed = CallToolResult::error(vec![ContentBlock::text("ENOENT")]);
        let upstream_error = answer(&Outcome::Forwarded(failed), known).expect("a failure");
        assert_eq!(upstream_error.reason_code, Reason::UpstreamError);
        assert!(upstream_error.message.contains("ENOENT"));
        let timeout = Outcome::UpstreamFailed {
            failure: UpstreamFailure::Timeout,
            message: "late".into(),
        };
        assert_eq!(
            answer(&timeout, known).unwrap().reason_code,
            Reason::UpstreamTimeout
        );
        let unknown = Outcome::UnknownTool {
            message: "no such tool".into(),
        };
        let unknown = answer(&unknown, known).unwrap();
        assert!(unknown.policy_violation);
        assert_eq!(unknown.known_tools, Some(vec!["list_services".to_owned()]));
    }
}
