//! Every upstream of the policy, started together and kept connected: the one
//! handle the gateway uses to list upstream tools and call them.
//!
//! All upstreams start concurrently, each under its own [`Supervisor`] (a stdio
//! child restarted with backoff, or an HTTP session reconnected with the same
//! backoff). [`UpstreamSet::start`] waits only for those marked `required`; the
//! others come up in the background, and until they do their listing says why
//! they are unavailable and calls to them fail fast. A slow or broken upstream never
//! holds up another.
//!
//! Each upstream's tool listing is kept current by a small task that lists again
//! after every (re)start, exit and `notifications/tools/list_changed`;
//! [`UpstreamSet::tools_changed`] ticks after each such refresh, so a reader that
//! wakes on it sees the new listing.

use std::collections::BTreeMap;
use std::sync::Arc;

use rmcp::model::{CallToolResult, JsonObject};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::call::CallContext;
use super::client::{ToolListing, UpstreamError};
use super::config::{ResolvedUpstream, Transport};
use super::supervisor::Supervisor;

/// The current tool listing of one upstream.
#[derive(Debug, Clone)]
enum Listing {
    /// The first connection attempt has not finished yet.
    Starting,
    /// Listed since the current run started or last changed its tools.
    Listed(ToolListing),
    /// Down, or it would not list its tools.
    Unavailable(UpstreamError),
}

/// Which transport an upstream uses, for status displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// A child process over stdin/stdout.
    Stdio,
    /// Streamable HTTP.
    Http,
}

impl TransportKind {
    /// `"stdio"` or `"http"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Stdio => "stdio",
            TransportKind::Http => "http",
        }
    }
}

/// One upstream's state, for metrics and the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamStatus {
    /// The upstream's name.
    pub name: String,
    /// How Proxi reaches it.
    pub transport: TransportKind,
    /// Whether a session is up right now.
    pub up: bool,
    /// Successful starts so far (a restart after a crash counts one more).
    pub starts: u64,
    /// The child's process id, for a stdio upstream that is up.
    pub pid: Option<u32>,
    /// How many of its tools are exposed, once listed.
    pub tools: Option<usize>,
    /// Why it is down, while it is (safe for operators: no secret, no argument).
    pub last_error: Option<String>,
    /// Whether Proxi refused to start without it.
    pub required: bool,
}

#[derive(Debug)]
struct Member {
    supervisor: Arc<Supervisor>,
    listing: watch::Receiver<Listing>,
    transport: TransportKind,
    required: bool,
}

/// The running upstreams of one policy.
#[derive(Debug)]
pub struct UpstreamSet {
    members: BTreeMap<String, Member>,
    tools_changed: Arc<watch::Sender<u64>>,
    stop: CancellationToken,
    refreshers: Mutex<Vec<JoinHandle<()>>>,
}

impl UpstreamSet {
    /// Starts every upstream at once and returns when each `required` one is up
    /// with its tools listed. A required upstream whose first start fails makes
    /// this an error naming it (and every upstream is stopped again); any other
    /// upstream keeps trying in the background.
    pub async fn start(upstreams: Vec<ResolvedUpstream>) -> Result<UpstreamSet, UpstreamError> {
        let tools_changed = Arc::new(watch::Sender::new(0));
        let stop = CancellationToken::new();
        let mut members = BTreeMap::new();
        let mut refreshers = Vec::with_capacity(upstreams.len());
        for upstream in upstreams {
            let transport = match &upstream.transport {
                Transport::Stdio(_) => TransportKind::Stdio,
                Transport::Http(_) => TransportKind::Http,
            };
            let supervisor = Arc::new(Supervisor::start_transport(
                &upstream.name,
                upstream.transport,
                upstream.call_timeout,
            ));
            let (listing_tx, listing) = watch::channel(Listing::Starting);
            refreshers.push(tokio::spawn(refresh_listing(
                supervisor.clone(),
                listing_tx,
                tools_changed.clone(),
                stop.clone(),
            )));
            members.insert(
                upstream.name,
                Member {
                    supervisor,
                    listing,
                    transport,
                    required: upstream.required,
                },
            );
        }
        let set = UpstreamSet {
            members,
            tools_changed,
            stop,
            refreshers: Mutex::new(refreshers),
        };
        if let Err(error) = set.wait_for_required().await {
            set.shutdown().await;
            return Err(error);
        }
        Ok(set)
    }

    // Sequential awaits are enough: every upstream is already starting in its own task.
    async fn wait_for_required(&self) -> Result<(), UpstreamError> {
        for member in self.members.values().filter(|member| member.required) {
            member.supervisor.first_start().await?;
            let mut listing = member.listing.clone();
            let listed = listing
                .wait_for(|listing| !matches!(listing, Listing::Starting))
                .await
                .map(|listing| listing.clone());
            match listed {
                Ok(Listing::Unavailable(error)) => return Err(error),
                Ok(_) => {}
                Err(_) => {
                    return Err(UpstreamError::Unavailable {
                        upstream: member.supervisor.upstream().to_owned(),
                        reason: "its tools could not be listed".to_owned(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The names of the upstreams, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }

    /// Calls `tool` (the upstream's own name, not the exposed one) on `upstream`
    /// for the caller in `ctx`, within that upstream's `call_timeout`. Cancelling
    /// `ctx.cancel` cancels this one upstream request. Fails at once with
    /// `Unavailable` while the upstream is down or when no upstream has that name.
    pub async fn call(
        &self,
        upstream: &str,
        tool: &str,
        arguments: Option<JsonObject>,
        ctx: &CallContext,
    ) -> Result<CallToolResult, UpstreamError> {
        let Some(member) = self.members.get(upstream) else {
            return Err(UpstreamError::Unavailable {
                upstream: upstream.to_owned(),
                reason: "no upstream has this name".to_owned(),
            });
        };
        member.supervisor.call_tool_with(tool, arguments, ctx).await
    }

    /// Each upstream's current tool listing, or why it has none right now
    /// (starting, down, or it failed to list).
    pub fn listings(&self) -> BTreeMap<String, Result<ToolListing, UpstreamError>> {
        self.members
            .iter()
            .map(|(name, member)| {
                let listing = match &*member.listing.borrow() {
                    Listing::Listed(listing) => Ok(listing.clone()),
                    Listing::Unavailable(error) => Err(error.clone()),
                    Listing::Starting => Err(UpstreamError::Unavailable {
                        upstream: name.clone(),
                        reason: "it is starting".to_owned(),
                    }),
                };
                (name.clone(), listing)
            })
            .collect()
    }

    /// Up/down, starts and tool count of every upstream, in name order.
    pub fn status(&self) -> Vec<UpstreamStatus> {
        self.members
            .iter()
            .map(|(name, member)| {
                let snapshot = member.supervisor.snapshot();
                let tools = match &*member.listing.borrow() {
                    Listing::Listed(listing) => Some(listing.tools.len()),
                    _ => None,
                };
                UpstreamStatus {
                    name: name.clone(),
                    transport: member.transport,
                    up: snapshot.up,
                    starts: snapshot.starts,
                    pid: snapshot.pid,
                    tools,
                    last_error: snapshot.last_error.map(|error| error.to_string()),
                    required: member.required,
                }
            })
            .collect()
    }

    /// Ticks after any upstream's listing changed: a (re)start, an exit, or its
    /// `notifications/tools/list_changed`. The new listing is already in
    /// [`UpstreamSet::listings`] when the tick is seen.
    pub fn tools_changed(&self) -> watch::Receiver<u64> {
        self.tools_changed.subscribe()
    }

    /// Stops every upstream and waits until each child has exited. Takes `&self`
    /// so that a set shared by the gateway and its front ends can be stopped by
    /// whoever shuts Proxi down; calls made afterwards fail with `Unavailable`.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let refreshers = std::mem::take(&mut *self.refreshers.lock().await);
        for refresher in refreshers {
            if let Err(error) = refresher.await {
                tracing::warn!(%error, "upstream listing task failed");
            }
        }
        // Stop them all at once: each may take a few seconds of graceful shutdown.
        let mut stopping = tokio::task::JoinSet::new();
        for member in self.members.values() {
            let supervisor = member.supervisor.clone();
            stopping.spawn(async move { supervisor.stop().await });
        }
        while stopping.join_next().await.is_some() {}
    }
}

/// Keeps `listing` current for one upstream: lists its tools after every change of
/// the supervisor's state and every `list_changed`, then ticks `tools_changed`.
async fn refresh_listing(
    supervisor: Arc<Supervisor>,
    listing: watch::Sender<Listing>,
    tools_changed: Arc<watch::Sender<u64>>,
    stop: CancellationToken,
) {
    let mut state = supervisor.state_changes();
    let mut list_changed = supervisor.list_changed();
    let mut attempted = false;
    loop {
        state.borrow_and_update();
        list_changed.borrow_and_update();
        let next = if supervisor.is_up() {
            attempted = true;
            let listed = tokio::select! {
                listed = supervisor.list_tools() => listed,
                () = stop.cancelled() => break,
            };
            match listed {
                Ok(tools) => Some(Listing::Listed(tools)),
                Err(error) => {
                    tracing::warn!(%error, "upstream tools could not be listed");
                    Some(Listing::Unavailable(error))
                }
            }
        } else {
            supervisor.last_error().map(|error| {
                attempted = true;
                Listing::Unavailable(error)
            })
        };
        if let Some(next) = next {
            listing.send_replace(next);
            tools_changed.send_modify(|count| *count += 1);
        } else if attempted {
            // Down with no reason recorded yet (between an exit and its record).
            listing.send_replace(Listing::Unavailable(UpstreamError::Unavailable {
                upstream: supervisor.upstream().to_owned(),
                reason: "it is not running".to_owned(),
            }));
            tools_changed.send_modify(|count| *count += 1);
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() { break },
            changed = list_changed.changed() => if changed.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
}
