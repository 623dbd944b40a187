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
use std::sync::{Arc, PoisonError};

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
    /// What it was started from: a reload restarts it when this changes.
    resolved: ResolvedUpstream,
    supervisor: Arc<Supervisor>,
    listing: watch::Receiver<Listing>,
    transport: TransportKind,
    /// Stops this member's listing task (a child of the set's token).
    stop: CancellationToken,
    refresher: Mutex<Option<JoinHandle<()>>>,
}

impl Member {
    /// Starts supervising `upstream` and listing its tools; returns at once.
    fn start(
        upstream: ResolvedUpstream,
        tools_changed: &Arc<watch::Sender<u64>>,
        parent: &CancellationToken,
    ) -> Arc<Member> {
        let transport = match &upstream.transport {
            Transport::Stdio(_) => TransportKind::Stdio,
            Transport::Http(_) => TransportKind::Http,
        };
        let supervisor = Arc::new(Supervisor::start_transport(
            &upstream.name,
            upstream.transport.clone(),
            upstream.call_timeout,
        ));
        let (listing_tx, listing) = watch::channel(Listing::Starting);
        let stop = parent.child_token();
        let refresher = tokio::spawn(refresh_listing(
            supervisor.clone(),
            listing_tx,
            tools_changed.clone(),
            stop.clone(),
        ));
        Arc::new(Member {
            resolved: upstream,
            supervisor,
            listing,
            transport,
            stop,
            refresher: Mutex::new(Some(refresher)),
        })
    }

    fn required(&self) -> bool {
        self.resolved.required
    }

    /// Returns when a required member is up with its tools listed, or why it is not.
    async fn wait_until_listed(&self) -> Result<(), UpstreamError> {
        self.supervisor.first_start().await?;
        let mut listing = self.listing.clone();
        let listed = listing
            .wait_for(|listing| !matches!(listing, Listing::Starting))
            .await
            .map(|listing| listing.clone());
        match listed {
            Ok(Listing::Unavailable(error)) => Err(error),
            Ok(_) => Ok(()),
            Err(_) => Err(UpstreamError::Unavailable {
                upstream: self.supervisor.upstream().to_owned(),
                reason: "its tools could not be listed".to_owned(),
            }),
        }
    }

    /// Its current listing, or why it has none right now.
    fn listing(&self, name: &str) -> Result<ToolListing, UpstreamError> {
        match &*self.listing.borrow() {
            Listing::Listed(listing) => Ok(listing.clone()),
            Listing::Unavailable(error) => Err(error.clone()),
            Listing::Starting => Err(UpstreamError::Unavailable {
                upstream: name.to_owned(),
                reason: "it is starting".to_owned(),
            }),
        }
    }

    /// Stops its listing task and its session (the child exits).
    async fn stop(&self) {
        self.stop.cancel();
        let refresher = self.refresher.lock().await.take();
        if let Some(refresher) = refresher
            && let Err(error) = refresher.await
        {
            tracing::warn!(%error, "upstream listing task failed");
        }
        self.supervisor.stop().await;
    }
}

/// One generation of running upstreams by name: what a reload swaps as a whole.
type Members = BTreeMap<String, Arc<Member>>;

/// Sequential awaits are enough: every upstream is already starting in its own task.
async fn wait_for_required<'a>(
    members: impl IntoIterator<Item = &'a Arc<Member>>,
) -> Result<(), UpstreamError> {
    for member in members.into_iter().filter(|member| member.required()) {
        member.wait_until_listed().await?;
    }
    Ok(())
}

/// Stops `members` all at once (each may take a few seconds of graceful shutdown).
async fn stop_all(members: impl IntoIterator<Item = Arc<Member>>) {
    let mut stopping = tokio::task::JoinSet::new();
    for member in members {
        stopping.spawn(async move { member.stop().await });
    }
    while stopping.join_next().await.is_some() {}
}

/// Calls `tool` on `upstream` among `members` (see [`UpstreamSet::call`]).
async fn call_member(
    members: &Members,
    upstream: &str,
    tool: &str,
    arguments: Option<JsonObject>,
    ctx: &CallContext,
) -> Result<CallToolResult, UpstreamError> {
    let Some(member) = members.get(upstream) else {
        return Err(UpstreamError::Unavailable {
            upstream: upstream.to_owned(),
            reason: "no upstream has this name".to_owned(),
        });
    };
    member.supervisor.call_tool_with(tool, arguments, ctx).await
}

/// The running upstreams of one policy. A reload may replace them
/// ([`UpstreamSet::prepare`], [`UpstreamSet::install`]): each generation is one
/// immutable map, so a caller holding [`UpstreamSet::routes`] reaches the
/// upstreams of the generation it took, never a mix.
#[derive(Debug)]
pub struct UpstreamSet {
    members: std::sync::RwLock<Arc<Members>>,
    tools_changed: Arc<watch::Sender<u64>>,
    stop: CancellationToken,
}

/// The upstreams of one generation of an [`UpstreamSet`], as the gateway routes
/// its allowed calls: a call decided under one policy binding goes to the
/// upstreams that binding's catalog was listed from (a reload that restarts an
/// upstream does not send an older decision to the new process).
#[derive(Debug, Clone)]
pub struct UpstreamRoutes {
    members: Arc<Members>,
}

impl UpstreamRoutes {
    /// Calls `tool` (the upstream's own name) on `upstream` of this generation;
    /// `Unavailable` when it has no such upstream or it is down or stopped.
    pub async fn call(
        &self,
        upstream: &str,
        tool: &str,
        arguments: Option<JsonObject>,
        ctx: &CallContext,
    ) -> Result<CallToolResult, UpstreamError> {
        call_member(&self.members, upstream, tool, arguments, ctx).await
    }

    /// Each upstream of this generation: up or down, tools listed, why it is down.
    pub fn status(&self) -> Vec<UpstreamStatus> {
        members_status(&self.members)
    }
}

/// The state of each member, in name order.
fn members_status(members: &Members) -> Vec<UpstreamStatus> {
    members
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
                required: member.required(),
            }
        })
        .collect()
}

/// What a reload changes among the upstreams, by name (each list sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamChanges {
    /// Declared now and not before: started.
    pub added: Vec<String>,
    /// Declared before and not now: stopped, their tools gone from the catalog.
    pub removed: Vec<String>,
    /// Declared in both with a different declaration (command, args, env, cwd,
    /// url, headers, required, call timeout, or a `${VAR}` that expands
    /// differently): stopped and started again.
    pub restarted: Vec<String>,
}

impl UpstreamChanges {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.restarted.is_empty()
    }

    /// The upstreams whose running process goes away (removed or restarted): calls
    /// in flight to them are drained, and their old listings forgotten.
    pub fn retired(&self) -> impl Iterator<Item = &str> {
        self.removed
            .iter()
            .chain(&self.restarted)
            .map(String::as_str)
    }
}

/// The next generation of upstreams for a reload: the new and restarted ones
/// already started (the required ones up and listed), not yet in force. Either
/// [`UpstreamSet::install`] it and then [`PreparedUpstreams::retire`] the old
/// ones, or [`PreparedUpstreams::abandon`] it.
#[derive(Debug)]
pub struct PreparedUpstreams {
    next: Arc<Members>,
    started: Vec<Arc<Member>>,
    retiring: Vec<Arc<Member>>,
    changes: UpstreamChanges,
}

impl PreparedUpstreams {
    /// What this generation changes.
    pub fn changes(&self) -> &UpstreamChanges {
        &self.changes
    }

    /// Each upstream's listing in this generation (as [`UpstreamSet::listings`]).
    pub fn listings(&self) -> BTreeMap<String, Result<ToolListing, UpstreamError>> {
        listings_of(&self.next)
    }

    /// The routes of this generation, for the gateway.
    pub fn routes(&self) -> Arc<UpstreamRoutes> {
        Arc::new(UpstreamRoutes {
            members: self.next.clone(),
        })
    }

    /// Stops the upstreams this generation replaced (after it was installed).
    pub async fn retire(self) {
        stop_all(self.retiring).await;
    }

    /// Stops the upstreams started for this generation (it was not installed, or
    /// the install was undone).
    pub async fn abandon(self) {
        stop_all(self.started).await;
    }
}

fn listings_of(members: &Members) -> BTreeMap<String, Result<ToolListing, UpstreamError>> {
    members
        .iter()
        .map(|(name, member)| (name.clone(), member.listing(name)))
        .collect()
}

impl UpstreamSet {
    /// Starts every upstream at once and returns when each `required` one is up
    /// with its tools listed. A required upstream whose first start fails makes
    /// this an error naming it (and every upstream is stopped again); any other
    /// upstream keeps trying in the background.
    pub async fn start(upstreams: Vec<ResolvedUpstream>) -> Result<UpstreamSet, UpstreamError> {
        let tools_changed = Arc::new(watch::Sender::new(0));
        let stop = CancellationToken::new();
        let members: Members = upstreams
            .into_iter()
            .map(|upstream| {
                let name = upstream.name.clone();
                (name, Member::start(upstream, &tools_changed, &stop))
            })
            .collect();
        let set = UpstreamSet {
            members: std::sync::RwLock::new(Arc::new(members)),
            tools_changed,
            stop,
        };
        if let Err(error) = wait_for_required(set.current().values()).await {
            set.shutdown().await;
            return Err(error);
        }
        Ok(set)
    }

    /// The generation in force.
    fn current(&self) -> Arc<Members> {
        Arc::clone(&self.members.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The routes of the generation in force, for the gateway.
    pub fn routes(&self) -> Arc<UpstreamRoutes> {
        Arc::new(UpstreamRoutes {
            members: self.current(),
        })
    }

    /// Starts what `next` adds or changes relative to the generation in force and
    /// waits for the required ones among them (as [`UpstreamSet::start`] does);
    /// changes nothing in force. If a required one fails to start, the ones
    /// started are stopped again and the error names it.
    pub async fn prepare(
        &self,
        next: Vec<ResolvedUpstream>,
    ) -> Result<PreparedUpstreams, UpstreamError> {
        let current = self.current();
        let mut changes = UpstreamChanges::default();
        let mut members = Members::new();
        let mut started = Vec::new();
        let mut retiring = Vec::new();
        for upstream in next {
            let name = upstream.name.clone();
            match current.get(&name) {
                Some(member) if member.resolved == upstream => {
                    members.insert(name, member.clone());
                    continue;
                }
                Some(member) => {
                    retiring.push(member.clone());
                    changes.restarted.push(name.clone());
                }
                None => changes.added.push(name.clone()),
            }
            let member = Member::start(upstream, &self.tools_changed, &self.stop);
            started.push(member.clone());
            members.insert(name, member);
        }
        for (name, member) in current.iter() {
            if !members.contains_key(name) {
                retiring.push(member.clone());
                changes.removed.push(name.clone());
            }
        }
        if let Err(error) = wait_for_required(&started).await {
            stop_all(started).await;
            return Err(error);
        }
        Ok(PreparedUpstreams {
            next: Arc::new(members),
            started,
            retiring,
            changes,
        })
    }

    /// Puts `prepared` in force (status, listings and calls through the set see it
    /// from now on) and returns the routes of the generation it replaced, which
    /// [`UpstreamSet::reinstate`] can put back.
    pub fn install(&self, prepared: &PreparedUpstreams) -> Arc<UpstreamRoutes> {
        let previous = std::mem::replace(
            &mut *self.members.write().unwrap_or_else(PoisonError::into_inner),
            prepared.next.clone(),
        );
        Arc::new(UpstreamRoutes { members: previous })
    }

    /// Puts an earlier generation back (undoing an install whose reload could not
    /// be recorded).
    pub fn reinstate(&self, previous: &UpstreamRoutes) {
        *self.members.write().unwrap_or_else(PoisonError::into_inner) = previous.members.clone();
    }

    /// The names of the upstreams, in order.
    pub fn names(&self) -> Vec<String> {
        self.current().keys().cloned().collect()
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
        let members = self.current();
        call_member(&members, upstream, tool, arguments, ctx).await
    }

    /// Each upstream's current tool listing, or why it has none right now
    /// (starting, down, or it failed to list).
    pub fn listings(&self) -> BTreeMap<String, Result<ToolListing, UpstreamError>> {
        listings_of(&self.current())
    }

    /// Up/down, starts and tool count of every upstream, in name order.
    pub fn status(&self) -> Vec<UpstreamStatus> {
        members_status(&self.current())
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
        stop_all(self.current().values().cloned()).await;
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
