//! Over MCP, a call that waits for a human's approval is held when the client
//! sent a progress token: a progress notification when the wait starts, on every
//! approval change and at least every [`HEARTBEAT`], then, once an operator has
//! decided, the identical call is made once more. Without a token the client is
//! told to wait and retry (the `isError` answer says so).

use std::sync::Arc;
use std::time::Duration;

use rmcp::RoleServer;
use rmcp::model::{ProgressNotificationParam, ProgressToken};
use rmcp::service::Peer;
use serde_json::Value;

use crate::approval::ApprovalStatus;
use crate::gateway::{Execution, Gateway, GatewayError, Outcome};
use crate::principal::Principal;
use crate::upstream::call::CallContext;

/// Longest a held call waits between two progress notifications.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// What to hold and how to reach the client while holding it.
pub(super) struct Hold<'a> {
    pub(super) gateway: &'a Arc<Gateway>,
    pub(super) principal: &'a Principal,
    pub(super) tool: &'a str,
    pub(super) arguments: Value,
    pub(super) call_context: &'a CallContext,
    pub(super) peer: &'a Peer<RoleServer>,
    pub(super) token: ProgressToken,
}

/// Holds `execution` if it waits for an approval, for at most
/// [`crate::api::MAX_APPROVAL_WAIT_SECONDS`]; returns the answer to give.
pub(super) async fn hold(hold: Hold<'_>, execution: Execution) -> Result<Execution, GatewayError> {
    let id = match &execution.outcome {
        Outcome::Approval(answer) if answer.awaits_decision() => answer.approval_id.clone(),
        _ => None,
    };
    let Some(id) = id else {
        return Ok(execution);
    };
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(crate::api::MAX_APPROVAL_WAIT_SECONDS);
    let mut step = 0u32;
    loop {
        let message = format!("waiting for an operator to decide approval {id}");
        let progress = ProgressNotificationParam::new(hold.token.clone(), f64::from(step))
            .with_message(message);
        // A client that stopped listening only misses the notice.
        let _ = hold.peer.notify_progress(progress).await;
        step = step.saturating_add(1);
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() || hold.call_context.cancel.is_cancelled() {
            return Ok(execution);
        }
        let decided = tokio::select! {
            decided = hold.gateway.wait_for_decision(&id, remaining.min(HEARTBEAT)) => decided?,
            () = hold.call_context.cancel.cancelled() => return Ok(execution),
        };
        match decided {
            None => return Ok(execution),
            Some(approval)
                if approval.status == ApprovalStatus::Pending
                    && !approval.is_expired_at(chrono::Utc::now()) => {}
            Some(_) => break,
        }
    }
    hold.gateway
        .execute_call(
            hold.principal,
            hold.tool,
            hold.arguments,
            None,
            hold.call_context,
        )
        .await
}
