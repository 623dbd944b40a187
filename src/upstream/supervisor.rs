//! Keeps one upstream connected: starts it (a stdio child, or a Streamable HTTP
//! session), notices when it exits or its connection breaks, and restarts it with
//! bounded exponential backoff. While it is down, calls fail at once with
//! [`UpstreamError::Unavailable`] rather than waiting for it.
//!
//! Stopping the supervisor, or dropping it, stops the child: the session is shut
//! down gracefully, and the child is spawned with `kill_on_drop` so that even a
//! runtime torn down mid-shutdown kills it.

use std::time::{Duration, Instant};

use rmcp::model::{CallToolResult, JsonObject};
use rmcp::service::{Peer, RoleClient};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::call::CallContext;
use super::client::{
    self, SessionEnd, ToolListing, UpstreamClient, UpstreamError, UpstreamHandler,
};
use super::config::{StdioTarget, Transport};

/// Delay before the first restart.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between two restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An upstream that stayed up this long is healthy again: its next restart
/// starts over at [`INITIAL_BACKOFF`].
pub const STABLE_UPTIME: Duration = Duration::from_secs(30);

/// Exponential backoff: each delay doubles, up to a ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `initial` and never exceeds `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial.min(max),
        }
    }

    /// The delay to wait now; the following one is twice as long, up to the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// Starts over at the initial delay.
    pub fn reset(&mut self) {
        self.next = self.initial.min(self.max);
    }
}

/// The running session, as callers see it.
#[derive(Debug, Clone)]
struct Live {
    peer: Peer<RoleClient>,
    pid: Option<u32>,
    // Cancelled by a caller that found the connection broken (an HTTP upstream
    // that went away leaves rmcp's session open): the supervisor then reconnects.
    broken: CancellationToken,
}

/// What the supervisor task publishes after each attempt and each exit.
#[derive(Debug, Clone, Default)]
struct State {
    live: Option<Live>,
    /// Connection attempts finished so far, successful or not.
    attempts: u64,
    /// Successful starts so far.
    starts: u64,
    /// Why the last attempt failed or the last session ended, while down.
    last_error: Option<UpstreamError>,
}

/// A consistent view of a supervisor's state at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorSnapshot {
    /// Whether a session is up.
    pub up: bool,
    /// Successful starts so far.
    pub starts: u64,
    /// The child's process id while a stdio session is up.
    pub pid: Option<u32>,
    /// Why it is down, while it is.
    pub last_error: Option<UpstreamError>,
}

/// One upstream kept connected in a background task.
#[derive(Debug)]
pub struct Supervisor {
    upstream: String,
    call_timeout: Duration,
    state: watch::Receiver<State>,
    handler: UpstreamHandler,
    stop: CancellationToken,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    _stop_on_drop: DropGuard,
}

impl Supervisor {
    /// Starts supervising the stdio upstream `target` under the name `upstream`;
    /// returns at once. Use [`Supervisor::wait_until_up`] to wait for the first start.
    pub fn start(upstream: &str, target: StdioTarget, call_timeout: Duration) -> Supervisor {
        Supervisor::start_transport(upstream, Transport::Stdio(target), call_timeout)
    }

    /// Starts supervising an upstream over either transport; returns at once. An
    /// HTTP upstream is reconnected with the same backoff as a stdio one is restarted.
    pub fn start_transport(
        upstream: &str,
        transport: Transport,
        call_timeout: Duration,
    ) -> Supervisor {
        let (state_tx, state) = watch::channel(State::default());
        let stop = CancellationToken::new();
        let handler = UpstreamHandler::new(upstream);
        let task = tokio::spawn(supervise(
            upstream.to_owned(),
            transport,
            handler.clone(),
            state_tx,
            stop.clone(),
        ));
        Supervisor {
            upstream: upstream.to_owned(),
            call_timeout,
            state,
            handler,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }

    /// The upstream's name.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// The limit on one call to this upstream.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// The running child's process id, or `None` while it is down (always `None`
    /// for an HTTP upstream).
    pub fn pid(&self) -> Option<u32> {
        self.state.borrow().live.as_ref().and_then(|live| live.pid)
    }

    /// How many times the upstream has been started successfully (handshake done).
    /// It goes up on each restart, so the catalog knows to list tools again.
    /// It keeps its last value while the upstream is down.
    pub fn starts(&self) -> u64 {
        self.state.borrow().starts
    }

    /// Up, starts, pid and why it is down, read together (the separate accessors
    /// may straddle a restart).
    pub fn snapshot(&self) -> SupervisorSnapshot {
        let state = self.state.borrow();
        SupervisorSnapshot {
            up: state.live.is_some(),
            starts: state.starts,
            pid: state.live.as_ref().and_then(|live| live.pid),
            last_error: match state.live {
                Some(_) => None,
                None => state.last_error.clone(),
            },
        }
    }

    /// Whether a session is up right now.
    pub fn is_up(&self) -> bool {
        self.state.borrow().live.is_some()
    }

    /// Why the upstream is down (the last failed start or the last exit), or
    /// `None` while it is up or before its first attempt has finished.
    pub fn last_error(&self) -> Option<UpstreamError> {
        let state = self.state.borrow();
        if state.live.is_some() {
            None
        } else {
            state.last_error.clone()
        }
    }

    /// Counts `notifications/tools/list_changed` over every run of the upstream.
    pub fn list_changed(&self) -> watch::Receiver<u64> {
        self.handler.list_changed()
    }

    /// A receiver that sees every change of the supervisor's state (up, down, a
    /// restart, a failed attempt); the contents are private, only the change matters.
    pub fn state_changes(&self) -> watch::Receiver<impl Sized + use<>> {
        self.state.clone()
    }

    /// The handler shared by every run of this upstream (it routes the
    /// upstream's traffic during a call to that call's caller).
    pub fn handler(&self) -> &UpstreamHandler {
        &self.handler
    }

    /// Waits until a session is up, for at most `timeout`.
    pub async fn wait_until_up(&self, timeout: Duration) -> Result<(), UpstreamError> {
        let mut state = self.state.clone();
        match tokio::time::timeout(timeout, state.wait_for(|state| state.live.is_some())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(self.unavailable("the supervisor has stopped")),
            Err(_) => Err(self.unavailable("it did not start in time")),
        }
    }

    /// Waits for the outcome of the first connection attempt: `Ok` once a session
    /// is up, or the error that made the first attempt fail. (The supervisor keeps
    /// retrying in the background either way.)
    pub async fn first_start(&self) -> Result<(), UpstreamError> {
        let mut state = self.state.clone();
        let outcome = state
            .wait_for(|state| state.live.is_some() || state.attempts > 0)
            .await
            .map(|state| match (&state.live, &state.last_error) {
                (Some(_), _) => Ok(()),
                (None, Some(error)) => Err(error.clone()),
                (None, None) => Err(UpstreamError::Unavailable {
                    upstream: self.upstream.clone(),
                    reason: "it exited right after starting".to_owned(),
                }),
            });
        match outcome {
            Ok(result) => result,
            Err(_) => Err(self.unavailable("the supervisor has stopped")),
        }
    }

    fn unavailable(&self, reason: &str) -> UpstreamError {
        UpstreamError::Unavailable {
            upstream: self.upstream.clone(),
            reason: reason.to_owned(),
        }
    }

    fn live(&self) -> Result<Live, UpstreamError> {
        let state = self.state.borrow();
        match &state.live {
            Some(live) => Ok(live.clone()),
            None => Err(state
                .last_error
                .clone()
                .unwrap_or_else(|| self.unavailable("it is not running"))),
        }
    }

    /// Lists the current run's tools under their exposed names, giving up after
    /// the call timeout.
    pub async fn list_tools(&self) -> Result<ToolListing, UpstreamError> {
        let live = self.live()?;
        let listing = tokio::time::timeout(
            self.call_timeout,
            client::list_tools(&self.upstream, &live.peer),
        )
        .await
        .unwrap_or_else(|_| {
            Err(UpstreamError::Timeout {
                upstream: self.upstream.clone(),
                after: self.call_timeout,
            })
        });
        note_broken(&live, &listing);
        listing
    }

    /// Calls the upstream's own tool `tool` with the configured per-call timeout;
    /// fails at once with `Unavailable` while the upstream is down.
    pub async fn call_tool(
        &self,
        tool: &str,
        arguments: Option<JsonObject>,
    ) -> Result<CallToolResult, UpstreamError> {
        self.call_tool_with(tool, arguments, &CallContext::detached())
            .await
    }

    /// Calls `tool` for the caller described by `ctx`: the upstream's progress,
    /// logging and sampling/elicitation requests during the call go to that caller
    /// only, and cancelling `ctx.cancel` cancels this one upstream request.
    pub async fn call_tool_with(
        &self,
        tool: &str,
        arguments: Option<JsonObject>,
        ctx: &CallContext,
    ) -> Result<CallToolResult, UpstreamError> {
        let live = self.live()?;
        let result = client::call_tool_routed(
            &self.upstream,
            &live.peer,
            &self.handler,
            tool,
            arguments,
            self.call_timeout,
            ctx,
        )
        .await;
        note_broken(&live, &result);
        result
    }

    /// Stops the upstream and waits until its child has exited.
    pub async fn shutdown(self) {
        self.stop().await;
    }

    /// Stops the upstream and waits until its child has exited, through a shared
    /// reference (the supervisor may be shared with a listing task). Calls made
    /// afterwards fail with `Unavailable`; a second stop returns at once.
    pub async fn stop(&self) {
        self.stop.cancel();
        let task = self.task.lock().await.take();
        if let Some(task) = task
            && let Err(error) = task.await
        {
            tracing::warn!(upstream = %self.upstream, %error, "upstream supervisor task failed");
        }
    }
}

/// A transport failure (not a timeout, not the upstream's own refusal) means the
/// session is unusable: tell the supervisor to reconnect.
fn note_broken<T>(live: &Live, outcome: &Result<T, UpstreamError>) {
    if let Err(UpstreamError::Unavailable { .. }) = outcome {
        live.broken.cancel();
    }
}

async fn connect(
    upstream: &str,
    transport: &Transport,
    handler: UpstreamHandler,
) -> Result<UpstreamClient, UpstreamError> {
    match transport {
        Transport::Stdio(target) => UpstreamClient::connect_stdio(upstream, target, handler).await,
        Transport::Http(target) => UpstreamClient::connect_http(upstream, target, handler).await,
    }
}

async fn supervise(
    upstream: String,
    transport: Transport,
    handler: UpstreamHandler,
    state: watch::Sender<State>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF);
    let mut starts = 0;
    loop {
        let connecting = connect(&upstream, &transport, handler.clone());
        // Dropping a half-started connection kills its child (kill_on_drop).
        let connected = tokio::select! {
            connected = connecting => connected,
            () = stop.cancelled() => break,
        };
        match connected {
            Ok(session) => {
                starts += 1;
                let started_at = Instant::now();
                let broken = CancellationToken::new();
                state.send_modify(|state| {
                    state.attempts += 1;
                    state.starts = starts;
                    state.last_error = None;
                    state.live = Some(Live {
                        peer: session.peer().clone(),
                        pid: session.pid(),
                        broken: broken.clone(),
                    });
                });
                let end = session.serve_until(&stop, &broken).await;
                let reason = match end {
                    SessionEnd::Broken => "its connection broke",
                    _ => "it exited",
                };
                state.send_modify(|state| {
                    state.live = None;
                    state.last_error = Some(UpstreamError::Unavailable {
                        upstream: upstream.clone(),
                        reason: format!("{reason}; restarting"),
                    });
                });
                if end == SessionEnd::Stopped {
                    break;
                }
                if started_at.elapsed() >= STABLE_UPTIME {
                    backoff.reset();
                }
                tracing::warn!(upstream, "upstream exited");
            }
            Err(error) => {
                tracing::warn!(upstream, %error, "upstream failed to start");
                state.send_modify(|state| {
                    state.attempts += 1;
                    state.last_error = Some(error);
                });
            }
        }
        let delay = backoff.next_delay();
        tracing::info!(upstream, ?delay, "restarting upstream after backoff");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => break,
        }
    }
    state.send_modify(|state| {
        state.live = None;
        state.last_error = Some(UpstreamError::Unavailable {
            upstream: upstream.clone(),
            reason: "it has been stopped".to_owned(),
        });
    });
    tracing::info!(upstream, "upstream supervisor stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_ceiling_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let delays: Vec<_> = (0..12).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(
            delays,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000
            ]
        );
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    fn not_an_mcp_server() -> StdioTarget {
        StdioTarget {
            command: "true".into(),
            args: vec![],
            env: Default::default(),
            cwd: None,
        }
    }

    #[tokio::test]
    async fn calls_fail_fast_while_the_upstream_is_down() {
        let supervisor = Supervisor::start("down", not_an_mcp_server(), Duration::from_secs(60));
        let began = Instant::now();
        let error = supervisor.call_tool("anything", None).await.unwrap_err();
        assert!(
            matches!(&error, UpstreamError::Unavailable { upstream, .. } if upstream == "down"),
            "{error:?}"
        );
        assert!(supervisor.list_tools().await.is_err());
        // Fail fast: far below the 60 s call timeout.
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );
        assert!(!supervisor.is_up());
        assert_eq!(supervisor.starts(), 0);
        assert!(
            supervisor
                .wait_until_up(Duration::from_millis(300))
                .await
                .is_err()
        );
        supervisor.shutdown().await;
    }
}
