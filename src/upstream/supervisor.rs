//! Keeps one stdio upstream running: starts it, notices when it exits, and
//! restarts it with bounded exponential backoff. While it is down, calls fail at
//! once with [`UpstreamError::Unavailable`] rather than waiting for it.
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

use super::client::{
    self, SessionEnd, ToolListing, UpstreamClient, UpstreamError, UpstreamHandler,
};
use super::config::StdioTarget;

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
    start: u64,
}

/// A stdio upstream kept running in a background task.
#[derive(Debug)]
pub struct Supervisor {
    upstream: String,
    call_timeout: Duration,
    state: watch::Receiver<Option<Live>>,
    handler: UpstreamHandler,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    _stop_on_drop: DropGuard,
}

impl Supervisor {
    /// Starts supervising `target` under the name `upstream`; returns at once.
    /// Use [`Supervisor::wait_until_up`] to wait for the first start.
    pub fn start(upstream: &str, target: StdioTarget, call_timeout: Duration) -> Supervisor {
        let (state_tx, state) = watch::channel(None);
        let stop = CancellationToken::new();
        let handler = UpstreamHandler::new(upstream);
        let task = tokio::spawn(supervise(
            upstream.to_owned(),
            target,
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
            task: Some(task),
        }
    }

    /// The upstream's name.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// The running child's process id, or `None` while it is down.
    pub fn pid(&self) -> Option<u32> {
        self.state.borrow().as_ref().and_then(|live| live.pid)
    }

    /// How many times the upstream has been started successfully (handshake done).
    /// It goes up on each restart, so the catalog knows to list tools again.
    pub fn starts(&self) -> u64 {
        self.state.borrow().as_ref().map_or(0, |live| live.start)
    }

    /// Whether a session is up right now.
    pub fn is_up(&self) -> bool {
        self.state.borrow().is_some()
    }

    /// Counts `notifications/tools/list_changed` over every run of the upstream.
    pub fn list_changed(&self) -> watch::Receiver<u64> {
        self.handler.list_changed()
    }

    /// Waits until a session is up, for at most `timeout`.
    pub async fn wait_until_up(&self, timeout: Duration) -> Result<(), UpstreamError> {
        let mut state = self.state.clone();
        match tokio::time::timeout(timeout, state.wait_for(Option::is_some)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(self.unavailable("the supervisor has stopped")),
            Err(_) => Err(self.unavailable("it did not start in time")),
        }
    }

    fn unavailable(&self, reason: &str) -> UpstreamError {
        UpstreamError::Unavailable {
            upstream: self.upstream.clone(),
            reason: reason.to_owned(),
        }
    }

    fn live_peer(&self) -> Result<Peer<RoleClient>, UpstreamError> {
        match &*self.state.borrow() {
            Some(live) => Ok(live.peer.clone()),
            None => Err(self.unavailable("it is not running")),
        }
    }

    /// Lists the current run's tools under their exposed names.
    pub async fn list_tools(&self) -> Result<ToolListing, UpstreamError> {
        client::list_tools(&self.upstream, &self.live_peer()?).await
    }

    /// Calls the upstream's own tool `tool` with the configured per-call timeout;
    /// fails at once with `Unavailable` while the upstream is down.
    pub async fn call_tool(
        &self,
        tool: &str,
        arguments: Option<JsonObject>,
    ) -> Result<CallToolResult, UpstreamError> {
        let peer = self.live_peer()?;
        client::call_tool(&self.upstream, &peer, tool, arguments, self.call_timeout).await
    }

    /// Stops the upstream and waits until its child has exited.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            tracing::warn!(upstream = %self.upstream, %error, "upstream supervisor task failed");
        }
    }
}

async fn supervise(
    upstream: String,
    target: StdioTarget,
    handler: UpstreamHandler,
    state: watch::Sender<Option<Live>>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF);
    let mut starts = 0;
    loop {
        let connecting = UpstreamClient::connect_stdio(&upstream, &target, handler.clone());
        // Dropping a half-started connection kills its child (kill_on_drop).
        let connected = tokio::select! {
            connected = connecting => connected,
            () = stop.cancelled() => break,
        };
        match connected {
            Ok(session) => {
                starts += 1;
                let started_at = Instant::now();
                state.send_replace(Some(Live {
                    peer: session.peer().clone(),
                    pid: session.pid(),
                    start: starts,
                }));
                let end = session.serve_until(&stop).await;
                state.send_replace(None);
                if end == SessionEnd::Stopped {
                    break;
                }
                if started_at.elapsed() >= STABLE_UPTIME {
                    backoff.reset();
                }
                tracing::warn!(upstream, "upstream exited");
            }
            Err(error) => tracing::warn!(upstream, %error, "upstream failed to start"),
        }
        let delay = backoff.next_delay();
        tracing::info!(upstream, ?delay, "restarting upstream after backoff");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => break,
        }
    }
    state.send_replace(None);
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
