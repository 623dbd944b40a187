//! What a front end hands down with one upstream tool call, so that the
//! upstream's traffic during that call reaches the caller who made it, and no one
//! else.
//!
//! REST callers have no MCP peer: their calls carry only a cancellation token (it
//! fires when the HTTP request is dropped). MCP callers add their peer and the
//! progress token of their `tools/call`, so the upstream client can map the
//! upstream's progress back to the caller's token, forward sampling and
//! elicitation requests to the calling client (when it declared them), and pass
//! logging messages on.

use rmcp::RoleServer;
use rmcp::model::ProgressToken;
use rmcp::service::Peer;
use tokio_util::sync::CancellationToken;

/// The calling MCP client of one `tools/call`.
#[derive(Clone, Debug)]
pub struct CallerPeer {
    /// The downstream session's peer: notifications and server→client requests
    /// for this call go here.
    pub peer: Peer<RoleServer>,
    /// The caller's `_meta.progressToken`, if it asked for progress.
    pub progress_token: Option<ProgressToken>,
}

/// The context of one tool call as it travels from a front end through
/// `Gateway::execute` to an upstream.
#[derive(Clone, Debug, Default)]
pub struct CallContext {
    /// Fires when the caller cancels (MCP `notifications/cancelled`) or goes away;
    /// the upstream request is then cancelled, and only that one.
    pub cancel: CancellationToken,
    /// The MCP caller, when there is one.
    pub caller: Option<CallerPeer>,
}

impl CallContext {
    /// A context with no caller peer and a token nobody cancels (REST, the CLI).
    pub fn detached() -> CallContext {
        CallContext::default()
    }
}

/// Where [`crate::gateway::Gateway::execute_call`] sends an upstream call the policy
/// allowed: the upstream set in `proxi serve` and `proxi mcp`, a fake in tests.
///
/// The future ends with the upstream's result (an `isError` result included),
/// or the reason there is none. The gateway drops it when the caller or a mode
/// switch cancels the call, and also fires `context.cancel`; either way the
/// upstream request must be cancelled (rmcp sends `notifications/cancelled` when
/// a request future is dropped).
pub trait UpstreamCalls: Send + Sync {
    /// Calls the upstream's own tool `tool` on upstream `upstream`.
    fn call<'a>(
        &'a self,
        upstream: &'a str,
        tool: &'a str,
        arguments: Option<rmcp::model::JsonObject>,
        context: &'a CallContext,
    ) -> futures::future::BoxFuture<
        'a,
        Result<rmcp::model::CallToolResult, super::client::UpstreamError>,
    >;

    /// Each upstream's state (up or down, tools listed, why it is down) for the
    /// operator console; a fake that keeps none reports none.
    fn health(&self) -> Vec<super::set::UpstreamStatus> {
        Vec::new()
    }
}

/// The running upstreams of `proxi serve` and `proxi mcp`.
impl UpstreamCalls for super::set::UpstreamSet {
    fn call<'a>(
        &'a self,
        upstream: &'a str,
        tool: &'a str,
        arguments: Option<rmcp::model::JsonObject>,
        context: &'a CallContext,
    ) -> futures::future::BoxFuture<
        'a,
        Result<rmcp::model::CallToolResult, super::client::UpstreamError>,
    > {
        Box::pin(super::set::UpstreamSet::call(
            self, upstream, tool, arguments, context,
        ))
    }

    fn health(&self) -> Vec<super::set::UpstreamStatus> {
        self.status()
    }
}

/// One generation of the running upstreams, as the gateway routes to it.
impl UpstreamCalls for super::set::UpstreamRoutes {
    fn call<'a>(
        &'a self,
        upstream: &'a str,
        tool: &'a str,
        arguments: Option<rmcp::model::JsonObject>,
        context: &'a CallContext,
    ) -> futures::future::BoxFuture<
        'a,
        Result<rmcp::model::CallToolResult, super::client::UpstreamError>,
    > {
        Box::pin(super::set::UpstreamRoutes::call(
            self, upstream, tool, arguments, context,
        ))
    }

    fn health(&self) -> Vec<super::set::UpstreamStatus> {
        self.status()
    }
}
