//! One MCP client session with one upstream server, over stdio or Streamable HTTP.
//!
//! Built on rmcp's client: a stdio upstream is a child process spawned through
//! [`TokioChildProcess`], whose stderr is forwarded line by line to the log with the
//! upstream's name. A call that outlives its timeout is dropped, and rmcp then sends
//! `notifications/cancelled` for it; an upstream's `isError` result is a result,
//! not an error.

// Sampling and logging are deprecated by SEP-2577 (rmcp 3.11), yet the protocol
// versions Proxi serves still carry them, and passing them on is part of being
// transparent to the calling client.
#![allow(deprecated)]

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig,
    ClientRequest, ClientResult, CreateMessageRequestParams, CreateMessageResult, ElicitRequest,
    ElicitRequestParams, ElicitResult, ErrorCode, ErrorData as McpError, Implementation,
    JsonObject, LoggingMessageNotificationParam, ProgressNotificationParam, ProgressToken,
    ServerRequest, ServerResult, Tool,
};
use rmcp::service::{
    InboundStreamOrigin, NotificationContext, Peer, PeerRequestOptions, RequestContext,
    RequestHandle, RoleClient, RunningService, ServiceError,
};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, ServiceExt};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::call::{CallContext, CallerPeer};
use super::config::{HttpTarget, StdioTarget};
use super::names::{SkippedTool, expose_all};
use super::routing::{
    AttributedOnArrival, AttributingTransport, Attribution, ProgressDelivery, Routes,
};

/// How long the `initialize` handshake may take before the upstream counts as down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The only variables a stdio upstream inherits from Proxi's environment (when
/// set); its declared `env` comes on top. Everything else, Proxi's bearer tokens
/// and LLM API keys included, stays out: an upstream is third-party code, and
/// some (server-everything's `get-env`) hand their environment to the caller.
pub const INHERITED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
];

/// Longest stderr line forwarded to the log; the rest of the line is dropped.
pub const MAX_STDERR_LINE: usize = 4096;

/// Why an upstream operation failed. Messages name the upstream, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream is not running, could not be started, or its connection broke.
    #[error("upstream {upstream:?} is unavailable: {reason}")]
    Unavailable {
        /// The upstream's name.
        upstream: String,
        /// What went wrong, for the operator's log.
        reason: String,
    },
    /// The call did not finish within its timeout (and was cancelled upstream).
    #[error("upstream {upstream:?} did not answer within {after:?}")]
    Timeout {
        /// The upstream's name.
        upstream: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The caller cancelled the call (or went away); the upstream request was cancelled.
    #[error("the call to upstream {upstream:?} was cancelled")]
    Cancelled {
        /// The upstream's name.
        upstream: String,
    },
    /// The upstream answered with a JSON-RPC error (e.g. an unknown tool).
    #[error("upstream {upstream:?} refused the request: {message} (code {code})")]
    Rejected {
        /// The upstream's name.
        upstream: String,
        /// The JSON-RPC error code.
        code: i32,
        /// The upstream's error message.
        message: String,
    },
}

/// A tool of an upstream under the name agents see, with everything the upstream
/// said about it (description, `inputSchema`, annotations) in `tool`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExposedTool {
    /// `<upstream>__<tool>`.
    pub exposed_name: String,
    /// The tool as the upstream listed it, under its own name.
    pub tool: Tool,
}

/// What [`list_tools`] found: the tools that can be exposed and those left out.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolListing {
    /// Tools under their exposed names, in the upstream's order.
    pub tools: Vec<ExposedTool>,
    /// Tools whose exposed name would break the providers' rule.
    pub skipped: Vec<SkippedTool>,
}

/// The client side of an upstream session: identifies Proxi, advertises what
/// Proxi can pass on (sampling, elicitation), counts `tools/list_changed`, and
/// routes the upstream's traffic during a call to that call's caller only (see
/// [`super::routing`]).
#[derive(Debug, Clone)]
pub struct UpstreamHandler {
    upstream: Arc<str>,
    // Shared by the clones a supervisor hands to each restart of the upstream.
    list_changed: Arc<watch::Sender<u64>>,
    routes: Routes,
}

impl UpstreamHandler {
    /// A handler for the upstream called `upstream`.
    pub fn new(upstream: &str) -> UpstreamHandler {
        UpstreamHandler {
            upstream: upstream.into(),
            list_changed: Arc::new(watch::Sender::new(0)),
            routes: Routes::default(),
        }
    }

    /// Counts the upstream's `notifications/tools/list_changed`; the catalog
    /// refreshes when it changes.
    pub fn list_changed(&self) -> watch::Receiver<u64> {
        self.list_changed.subscribe()
    }

    /// The calls in flight through this handler's upstream and their callers.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The caller a server→client request belongs to, or the JSON-RPC error the
    /// upstream gets instead.
    fn requester(
        &self,
        context: &RequestContext<RoleClient>,
        what: &str,
        declared: impl Fn(&ClientCapabilities) -> bool,
    ) -> Result<CallerPeer, McpError> {
        let origin = match context.extensions.get::<InboundStreamOrigin>() {
            Some(InboundStreamOrigin::OutboundRequest(id)) => Some(id),
            _ => None,
        };
        let refuse = |why: &str| {
            tracing::info!(upstream = %self.upstream, request = what, why, "upstream request refused");
            Err(McpError::new(
                ErrorCode::METHOD_NOT_FOUND,
                format!("{what} is not available: {why}"),
                None,
            ))
        };
        match self.routes.attribute(origin) {
            Attribution::Caller(caller) => {
                let supported = caller
                    .peer
                    .peer_info()
                    .is_some_and(|info| declared(&info.capabilities));
                if supported {
                    Ok(caller)
                } else {
                    refuse("the calling client does not support it")
                }
            }
            Attribution::NoPeer => refuse("the call did not come from an MCP client"),
            Attribution::Idle => refuse("no call is in flight"),
            Attribution::Ambiguous => {
                refuse("several calls are in flight and the request names none of them")
            }
        }
    }
}

fn relayed_error(what: &str, error: ServiceError) -> McpError {
    match error {
        ServiceError::McpError(error) => error,
        other => McpError::internal_error(format!("{what} failed: {other}"), None),
    }
}

impl ClientHandler for UpstreamHandler {
    fn get_info(&self) -> ClientConfig {
        // Only what Proxi can pass on to a calling client; roots are not offered
        // (they would describe Proxi's host, not the caller's).
        let capabilities = ClientCapabilities::builder()
            .enable_sampling()
            .enable_elicitation()
            .build();
        ClientConfig::new(
            capabilities,
            Implementation::new("proxi", env!("CARGO_PKG_VERSION")),
        )
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        tracing::info!(upstream = %self.upstream, "upstream tool list changed");
        self.list_changed.send_modify(|count| *count += 1);
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        if let Some(delivery) = self.routes.progress(params) {
            forward_progress(&self.upstream, delivery).await;
        }
    }

    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        context: NotificationContext<RoleClient>,
    ) {
        let attribution = match context.extensions.get::<AttributedOnArrival>() {
            Some(AttributedOnArrival(attribution)) => attribution.clone(),
            None => self.routes.attribute(None),
        };
        match attribution {
            Attribution::Caller(caller) => {
                if let Err(error) = caller.peer.notify_logging_message(params).await {
                    tracing::debug!(upstream = %self.upstream, %error, "caller gone; log message dropped");
                }
            }
            _ => {
                // Cut like a stderr line: the upstream chooses the size.
                let data = cut_at_boundary(params.data.to_string(), MAX_STDERR_LINE);
                let logger = params
                    .logger
                    .map(|logger| cut_at_boundary(logger, MAX_STDERR_LINE));
                tracing::info!(upstream = %self.upstream, level = ?params.level, logger = ?logger, data = %data, "upstream log message");
            }
        }
    }

    async fn create_message(
        &self,
        params: CreateMessageRequestParams,
        context: RequestContext<RoleClient>,
    ) -> Result<CreateMessageResult, McpError> {
        let caller = self.requester(&context, "sampling", |capabilities| {
            capabilities.sampling.is_some()
        })?;
        caller
            .peer
            .create_message(params)
            .await
            .map_err(|error| relayed_error("sampling", error))
    }

    async fn create_elicitation(
        &self,
        params: ElicitRequestParams,
        context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        let caller = self.requester(&context, "elicitation", |capabilities| {
            capabilities.elicitation.is_some()
        })?;
        // Sent as a plain request: rmcp's typed helper needs its `elicitation`
        // feature, which would add nothing else Proxi uses.
        let request = ServerRequest::ElicitRequest(ElicitRequest::new(params));
        match caller.peer.send_request(request).await {
            Ok(ClientResult::ElicitResult(result)) => Ok(result),
            Ok(_) => Err(McpError::internal_error(
                "the client answered elicitation with another kind of result",
                None,
            )),
            Err(error) => Err(relayed_error("elicitation", error)),
        }
    }
}

async fn forward_progress(upstream: &str, delivery: ProgressDelivery) {
    if let Err(error) = delivery.caller.peer.notify_progress(delivery.params).await {
        tracing::debug!(upstream, %error, "caller gone; progress dropped");
    }
}

/// A live session with one upstream. Dropping it closes the session; for a stdio
/// upstream the child is then killed (rmcp's cleanup plus tokio's `kill_on_drop`).
pub struct UpstreamClient {
    upstream: String,
    service: RunningService<RoleClient, UpstreamHandler>,
    pid: Option<u32>,
    // Declared after `service`, so it is dropped after it: the session's own
    // shutdown of the child comes first, then the group is killed.
    _group: ProcessGroup,
}

/// The process group of a stdio upstream (its child leads it). Dropping this kills
/// the whole group with SIGKILL: the child is gone by then, or is being killed by
/// `kill_on_drop`, but a grandchild (the server an `npx` wrapper started) would
/// otherwise survive as an orphan.
///
/// The group is also killed as soon as the child itself exits: a grandchild that
/// inherited the pipes would otherwise keep the session open after its wrapper
/// died, so the crash would go unnoticed and the wrapper's restart never happen.
#[derive(Debug)]
struct ProcessGroup {
    group: Option<rustix::process::Pid>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl ProcessGroup {
    fn new(leader: Option<u32>) -> ProcessGroup {
        let group = leader
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(rustix::process::Pid::from_raw);
        let watcher = group.map(|group| tokio::spawn(kill_group_when_leader_exits(group)));
        ProcessGroup { group, watcher }
    }
}

/// Kills `group` with SIGKILL; an empty group (ESRCH) is the usual, good case.
fn kill_group(group: rustix::process::Pid) {
    match rustix::process::kill_process_group(group, rustix::process::Signal::KILL) {
        Ok(()) => tracing::debug!(
            group = group.as_raw_nonzero().get(),
            "killed what was left of an upstream's process group"
        ),
        Err(rustix::io::Errno::SRCH) => {}
        Err(error) => tracing::warn!(%error, "cannot kill an upstream's process group"),
    }
}

/// Waits for the group's leader (the child) to exit, through a pidfd (readable once
/// the process has exited, even before it is reaped), then kills the rest of the group.
async fn kill_group_when_leader_exits(group: rustix::process::Pid) {
    let pidfd = match rustix::process::pidfd_open(group, rustix::process::PidfdFlags::empty()) {
        Ok(pidfd) => pidfd,
        Err(error) => {
            tracing::warn!(%error, "cannot watch an upstream's exit; its group is killed only when its session ends");
            return;
        }
    };
    match tokio::io::unix::AsyncFd::new(pidfd) {
        Ok(exited) => {
            if exited.readable().await.is_ok() {
                kill_group(group);
            }
        }
        Err(error) => tracing::warn!(%error, "cannot watch an upstream's exit"),
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
        if let Some(group) = self.group {
            kill_group(group);
        }
    }
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("upstream", &self.upstream)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

fn unavailable(upstream: &str, reason: impl Into<String>) -> UpstreamError {
    UpstreamError::Unavailable {
        upstream: upstream.to_owned(),
        reason: reason.into(),
    }
}

/// The HTTP client of a Streamable HTTP upstream session: keep-alive connections
/// reused from a pool, and no redirects followed (a redirect is answered as the
/// error it is, so neither the session id nor the configured headers go elsewhere).
///
/// rmcp's default client turns pooling off (`pool_max_idle_per_host(0)`), so every
/// call opened and closed a TCP connection (perf: 7 % of the CPU of a forwarded
/// call went to connecting, besides the handshake's round trip). A response body left unread only keeps its connection out
/// of the pool; Nagle's delay does not apply, since reqwest sets TCP_NODELAY.
fn pooled_http_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true)
        .build()
}

impl UpstreamClient {
    /// Spawns `target` and performs the MCP handshake over its stdio. Its stderr
    /// goes to the log, one `info` event per line, tagged with `upstream`.
    pub async fn connect_stdio(
        upstream: &str,
        target: &StdioTarget,
        handler: UpstreamHandler,
    ) -> Result<UpstreamClient, UpstreamError> {
        let mut command = tokio::process::Command::new(&target.command);
        command
            .env_clear()
            .envs(
                INHERITED_ENV
                    .iter()
                    .filter_map(|key| Some((*key, std::env::var_os(key)?))),
            )
            .args(target.args.iter().map(|arg| arg.expose()))
            .envs(target.env.iter().map(|(key, value)| (key, value.expose())))
            // Whatever path drops the child (a cancelled start, a panic, runtime
            // shutdown) kills it, so no upstream outlives its client.
            .kill_on_drop(true)
            // Its own process group, so that what it spawns (an `npx` wrapper's
            // node server) can be killed with it: see `ProcessGroup`.
            .process_group(0);
        if let Some(cwd) = &target.cwd {
            command.current_dir(cwd);
        }
        let (transport, stderr) = TokioChildProcess::builder(command)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| {
                unavailable(
                    upstream,
                    format!("cannot start {:?}: {error}", target.command),
                )
            })?;
        let pid = transport.id();
        let group = ProcessGroup::new(pid);
        if let Some(stderr) = stderr {
            tokio::spawn(forward_stderr(upstream.to_owned(), stderr));
        }
        // A failed handshake drops `group`, which kills whatever the child started.
        let transport = AttributingTransport::new(transport, handler.routes().clone());
        let service = handshake(upstream, handler.serve(transport)).await?;
        tracing::info!(upstream, pid, "stdio upstream connected");
        Ok(UpstreamClient {
            upstream: upstream.to_owned(),
            service,
            pid,
            _group: group,
        })
    }

    /// Opens a Streamable HTTP session with `target`, sending its headers.
    pub async fn connect_http(
        upstream: &str,
        target: &HttpTarget,
        handler: UpstreamHandler,
    ) -> Result<UpstreamClient, UpstreamError> {
        // rmcp's transport builds a reqwest client, which needs the TLS provider.
        crate::tls::install_crypto_provider();
        let mut headers = HashMap::with_capacity(target.headers.len());
        for (name, value) in &target.headers {
            let header_name =
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    unavailable(upstream, format!("{name:?} is not a valid header name"))
                })?;
            let mut header_value =
                reqwest::header::HeaderValue::from_str(value.expose()).map_err(|_| {
                    unavailable(upstream, format!("header {name:?} has an invalid value"))
                })?;
            header_value.set_sensitive(true);
            headers.insert(header_name, header_value);
        }
        let config = StreamableHttpClientTransportConfig::with_uri(target.url.expose())
            .custom_headers(headers);
        let transport = StreamableHttpClientTransport::with_client(
            pooled_http_client().map_err(|error| unavailable(upstream, error.to_string()))?,
            config,
        );
        let transport = AttributingTransport::new(transport, handler.routes().clone());
        let service = handshake(upstream, handler.serve(transport)).await?;
        tracing::info!(upstream, "http upstream connected");
        Ok(UpstreamClient {
            upstream: upstream.to_owned(),
            service,
            pid: None,
            _group: ProcessGroup {
                group: None,
                watcher: None,
            },
        })
    }

    /// The upstream's name.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// The child's process id, for a stdio upstream.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// A handle for requests; cheap to clone, and it fails with `Unavailable`
    /// once the session has ended.
    pub fn peer(&self) -> &Peer<RoleClient> {
        self.service.peer()
    }

    /// Lists every tool (all pages), mapped to exposed names.
    pub async fn list_tools(&self) -> Result<ToolListing, UpstreamError> {
        list_tools(&self.upstream, self.peer()).await
    }

    /// Calls the upstream's own tool `tool` (not its exposed name), giving up after `timeout`.
    pub async fn call_tool(
        &self,
        tool: &str,
        arguments: Option<JsonObject>,
        timeout: Duration,
    ) -> Result<CallToolResult, UpstreamError> {
        call_tool(&self.upstream, self.peer(), tool, arguments, timeout).await
    }

    /// Whether the session has ended (the child exited or the connection broke).
    pub fn is_closed(&self) -> bool {
        self.service.is_closed() || self.peer().is_transport_closed()
    }

    /// Ends the session and waits until it has: for stdio, rmcp closes the child's
    /// stdin, waits, sends SIGTERM, waits, then kills it.
    pub async fn shutdown(self) {
        let upstream = self.upstream.clone();
        if let Err(error) = self.service.cancel().await {
            tracing::warn!(upstream, %error, "upstream session task failed while shutting down");
        }
    }

    /// Runs the session until it ends by itself (the child exits, the connection
    /// drops), `broken` is cancelled (a caller found the connection unusable), or
    /// `stop` is cancelled; in the last two cases it is shut down as
    /// [`UpstreamClient::shutdown`] does. The supervisor uses this to notice a crash.
    pub async fn serve_until(
        self,
        stop: &CancellationToken,
        broken: &CancellationToken,
    ) -> SessionEnd {
        let cancel = self.service.cancellation_token();
        let waiting = self.service.waiting();
        tokio::pin!(waiting);
        let end = tokio::select! {
            _ = &mut waiting => SessionEnd::Exited,
            () = broken.cancelled() => {
                cancel.cancel();
                let _ = waiting.await;
                SessionEnd::Broken
            }
            () = stop.cancelled() => {
                cancel.cancel();
                let _ = waiting.await;
                SessionEnd::Stopped
            }
        };
        end
    }
}

/// How [`UpstreamClient::serve_until`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The session ended by itself: the upstream exited or hung up.
    Exited,
    /// Proxi asked it to stop and it has.
    Stopped,
    /// A caller found the connection unusable; the session was closed to reconnect.
    Broken,
}

async fn handshake<F, E>(
    upstream: &str,
    serving: F,
) -> Result<RunningService<RoleClient, UpstreamHandler>, UpstreamError>
where
    F: Future<Output = Result<RunningService<RoleClient, UpstreamHandler>, E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(CONNECT_TIMEOUT, serving).await {
        Ok(Ok(service)) => Ok(service),
        Ok(Err(error)) => Err(unavailable(upstream, format!("handshake failed: {error}"))),
        Err(_) => Err(unavailable(
            upstream,
            format!("no answer to initialize within {CONNECT_TIMEOUT:?}"),
        )),
    }
}

/// Lists every tool of the upstream behind `peer`, mapped to exposed names.
pub async fn list_tools(
    upstream: &str,
    peer: &Peer<RoleClient>,
) -> Result<ToolListing, UpstreamError> {
    let tools = peer
        .list_all_tools()
        .await
        .map_err(|error| service_error(upstream, error))?;
    let (kept, skipped) = expose_all(upstream, tools, |tool| &tool.name);
    Ok(ToolListing {
        tools: kept
            .into_iter()
            .map(|(exposed_name, tool)| ExposedTool { exposed_name, tool })
            .collect(),
        skipped,
    })
}

/// Calls `tool` on the upstream behind `peer`. After `timeout` the request is
/// dropped, which makes rmcp send `notifications/cancelled` for it.
pub async fn call_tool(
    upstream: &str,
    peer: &Peer<RoleClient>,
    tool: &str,
    arguments: Option<JsonObject>,
    timeout: Duration,
) -> Result<CallToolResult, UpstreamError> {
    if peer.is_transport_closed() {
        return Err(unavailable(upstream, "the connection is closed"));
    }
    let mut params = CallToolRequestParams::new(tool.to_owned());
    params.arguments = arguments;
    match tokio::time::timeout(timeout, peer.call_tool(params)).await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(error)) => Err(service_error(upstream, error)),
        Err(_) => Err(UpstreamError::Timeout {
            upstream: upstream.to_owned(),
            after: timeout,
        }),
    }
}

/// Calls `tool` for the caller in `ctx`. The request gets its own progress token
/// (rmcp's), mapped back to the caller's in `handler`'s routes for the duration of
/// the call. When `ctx.cancel` fires or `timeout` expires, this request alone is
/// cancelled upstream (`notifications/cancelled` with its id).
pub async fn call_tool_routed(
    upstream: &str,
    peer: &Peer<RoleClient>,
    handler: &UpstreamHandler,
    tool: &str,
    arguments: Option<JsonObject>,
    timeout: Duration,
    ctx: &CallContext,
) -> Result<CallToolResult, UpstreamError> {
    if peer.is_transport_closed() {
        return Err(unavailable(upstream, "the connection is closed"));
    }
    if ctx.cancel.is_cancelled() {
        return Err(UpstreamError::Cancelled {
            upstream: upstream.to_owned(),
        });
    }
    let mut params = CallToolRequestParams::new(tool.to_owned());
    params.arguments = arguments;
    let request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
    let handle = peer
        .send_request_with_option(request, PeerRequestOptions::no_options())
        .await
        .map_err(|error| service_error(upstream, error))?;
    let token = handle.progress_token.clone();
    let routes = handler.routes();
    let early = routes.register(token.clone(), handle.id.clone(), ctx.caller.clone());
    // From here on, however this future ends (even dropped mid-call), the route is
    // finished and an unanswered request is cancelled upstream.
    let mut in_flight = InFlight {
        handle: Some(handle),
        routes: routes.clone(),
        token,
    };
    for delivery in early {
        forward_progress(upstream, delivery).await;
    }
    let response = &mut in_flight
        .handle
        .as_mut()
        .expect("the handle stays until the call ends")
        .rx;
    let outcome = tokio::select! {
        response = response => Some(match response {
            Ok(Ok(ServerResult::CallToolResult(result))) => Ok(result),
            Ok(Ok(_)) => Err(unavailable(upstream, "the upstream answered tools/call with another kind of result")),
            Ok(Err(error)) => Err(service_error(upstream, error)),
            Err(_) => Err(unavailable(upstream, "the connection closed during the call")),
        }),
        () = tokio::time::sleep(timeout) => None,
        () = ctx.cancel.cancelled() => None,
    };
    match outcome {
        Some(result) => {
            in_flight.answered();
            result
        }
        None => {
            let timed_out = !ctx.cancel.is_cancelled();
            let reason = if timed_out {
                "timeout"
            } else {
                "cancelled by the caller"
            };
            in_flight.cancel(upstream, reason).await;
            if timed_out {
                Err(UpstreamError::Timeout {
                    upstream: upstream.to_owned(),
                    after: timeout,
                })
            } else {
                Err(UpstreamError::Cancelled {
                    upstream: upstream.to_owned(),
                })
            }
        }
    }
}

/// One `tools/call` sent upstream and not yet settled. Settling it (answered or
/// cancelled) finishes its route; dropping it unsettled (the caller's future was
/// dropped) finishes the route too and cancels the request upstream from a task,
/// so that neither the routing table nor the upstream is left with a call nobody
/// waits for.
struct InFlight {
    handle: Option<RequestHandle<RoleClient>>,
    routes: Routes,
    token: ProgressToken,
}

impl InFlight {
    fn answered(mut self) {
        self.handle = None;
        self.routes.finish(&self.token);
    }

    async fn cancel(mut self, upstream: &str, reason: &str) {
        self.routes.finish(&self.token);
        if let Some(handle) = self.handle.take()
            && let Err(error) = handle.cancel(Some(reason.to_owned())).await
        {
            tracing::debug!(upstream, %error, "could not send notifications/cancelled");
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.routes.finish(&self.token);
        if let Some(handle) = self.handle.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = handle.cancel(Some("the caller went away".to_owned())).await;
            });
        }
    }
}

fn service_error(upstream: &str, error: ServiceError) -> UpstreamError {
    match error {
        ServiceError::McpError(error) => UpstreamError::Rejected {
            upstream: upstream.to_owned(),
            code: error.code.0,
            message: error.message.into_owned(),
        },
        ServiceError::Timeout { timeout } => UpstreamError::Timeout {
            upstream: upstream.to_owned(),
            after: timeout,
        },
        other => unavailable(upstream, other.to_string()),
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut_at_boundary(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Copies the child's stderr to the log, line by line, each cut at
/// [`MAX_STDERR_LINE`] bytes so a runaway line cannot grow without bound.
async fn forward_stderr(upstream: String, stderr: impl AsyncRead + Unpin) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        let (consumed, at_end_of_line) = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(buffer) => match buffer.iter().position(|&byte| byte == b'\n') {
                Some(newline) => {
                    let room = MAX_STDERR_LINE.saturating_sub(line.len());
                    line.extend_from_slice(&buffer[..newline.min(room)]);
                    (newline + 1, true)
                }
                None => {
                    let room = MAX_STDERR_LINE.saturating_sub(line.len());
                    line.extend_from_slice(&buffer[..buffer.len().min(room)]);
                    (buffer.len(), false)
                }
            },
        };
        reader.consume(consumed);
        if at_end_of_line {
            tracing::info!(upstream, "stderr: {}", String::from_utf8_lossy(&line));
            line.clear();
        }
    }
    if !line.is_empty() {
        tracing::info!(upstream, "stderr: {}", String::from_utf8_lossy(&line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_program_is_unavailable() {
        let target = StdioTarget {
            command: "/nonexistent/proxi-upstream".into(),
            args: vec![],
            env: Default::default(),
            cwd: None,
        };
        let error = UpstreamClient::connect_stdio("gone", &target, UpstreamHandler::new("gone"))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, UpstreamError::Unavailable { upstream, .. } if upstream == "gone"),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_program_that_exits_at_once_is_unavailable() {
        let target = StdioTarget {
            command: "true".into(),
            args: vec![],
            env: Default::default(),
            cwd: None,
        };
        let error = UpstreamClient::connect_stdio("quits", &target, UpstreamHandler::new("quits"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, UpstreamError::Unavailable { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        assert_eq!(cut_at_boundary("short".into(), 10), "short");
        assert_eq!(cut_at_boundary("ééé".into(), 3), "é");
        assert_eq!(
            cut_at_boundary("x".repeat(5000), MAX_STDERR_LINE).len(),
            MAX_STDERR_LINE
        );
    }

    #[tokio::test]
    async fn stderr_lines_are_cut_and_the_reader_ends() {
        // Only checks that forwarding terminates on long and partial lines; the
        // log output itself is not captured here.
        let input = format!("{}\nshort\nno newline", "x".repeat(3 * MAX_STDERR_LINE));
        forward_stderr("t".into(), input.as_bytes()).await;
    }
}
