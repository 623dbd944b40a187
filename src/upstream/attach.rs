//! The policy's upstreams for the life of `proxi serve` or `proxi mcp`: started
//! with the server, their tools bound into the gateway's policy (again whenever an
//! upstream lists new tools or restarts), and stopped on shutdown.
//!
//! A reload of the policy may add, remove and restart upstreams: the gateway asks
//! the [`UpstreamManager`] to start the next generation, then swaps it in together
//! with the policy (see `gateway/reload.rs`).
//!
//! An upstream that fails to start does not stop Proxi: its tools are unknown
//! until it lists them, and calls to a known tool of a down upstream fail with
//! `upstream_unavailable`. Only an upstream declared `"required": true` that fails
//! its first start stops the server.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::task::JoinHandle;

use super::client::{ToolListing, UpstreamError};
use super::config::{ConfigError, UpstreamDeclaration};
use super::set::{PreparedUpstreams, UpstreamRoutes, UpstreamSet};
use crate::catalog::Catalog;
use crate::gateway::Gateway;

/// Why the upstreams could not be started.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A declaration could not be resolved (e.g. a `${VAR}` is not set; named, never its value).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An upstream marked `"required": true` did not start.
    #[error("a required upstream did not start: {0}")]
    Required(#[from] UpstreamError),
}

/// Resolves a `${VAR}` to its value (Proxi passes the process environment; tests a map).
pub type VariableLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The running upstreams of one server and the task that keeps the gateway's
/// policy bound to their tools.
#[derive(Debug)]
pub struct AttachedUpstreams {
    manager: Arc<UpstreamManager>,
    rebinder: JoinHandle<()>,
}

/// What the gateway needs to start and stop upstreams on a reload: the set, the
/// listings the catalog is built from, and the `${VAR}` lookup used at start.
///
/// The catalog is built under one lock (`known`), by the task that follows the
/// upstreams' listings and by a reload alike, and the binding is swapped while it
/// is held: a listing of the replaced upstreams never lands in the new binding.
pub struct UpstreamManager {
    set: Arc<UpstreamSet>,
    known: Mutex<KnownListings>,
    lookup: VariableLookup,
    simulated_cloud: bool,
}

impl std::fmt::Debug for UpstreamManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamManager")
            .field("set", &self.set)
            .finish_non_exhaustive()
    }
}

/// Why a reload's upstreams could not be started; the message names the
/// upstream and what failed (a variable's name, never its value).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A declaration could not be resolved (a `${VAR}` that is not set, ...).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A new or changed upstream marked `"required": true` did not start.
    #[error("a required upstream did not start: {0}")]
    Required(#[from] UpstreamError),
}

impl PrepareError {
    /// The problem as a reload's answer and record state it: the upstream and what
    /// failed, but not an unavailable upstream's reason, which may hold a path or
    /// the command line (it is in the log, see [`UpstreamManager::prepare`]).
    pub fn safe_message(&self) -> String {
        match self {
            PrepareError::Required(UpstreamError::Unavailable { upstream, .. }) => format!(
                "a required upstream did not start: upstream {upstream:?} is unavailable (the reason is in Proxi's log)"
            ),
            other => other.to_string(),
        }
    }
}

impl UpstreamManager {
    /// The running set (status, listings).
    pub fn set(&self) -> &Arc<UpstreamSet> {
        &self.set
    }

    /// Resolves `declarations` with the lookup used at start and starts what they
    /// add or change (see [`UpstreamSet::prepare`]); nothing is in force yet. A
    /// required upstream that does not start is logged with its reason.
    pub async fn prepare(
        &self,
        declarations: &BTreeMap<String, UpstreamDeclaration>,
    ) -> Result<PreparedUpstreams, PrepareError> {
        let resolved = declarations
            .iter()
            .map(|(name, declaration)| declaration.resolve(name, &*self.lookup))
            .collect::<Result<Vec<_>, _>>()?;
        self.set.prepare(resolved).await.map_err(|error| {
            tracing::warn!(%error, "an upstream of the reloaded policy did not start");
            PrepareError::Required(error)
        })
    }

    /// Puts `prepared` in force: the catalog is rebuilt from its listings (the
    /// retired upstreams' tools forgotten) and handed to `install`, which swaps
    /// the binding and the gateway's routes; all under the catalog lock (taken
    /// before the mode lock, as the listing task takes it before the gateway's).
    /// Returns the set's routes replaced, for [`UpstreamManager::reinstate`], and
    /// what `install` returned.
    pub fn install<T>(
        &self,
        prepared: &PreparedUpstreams,
        install: impl FnOnce(Arc<Catalog>) -> T,
    ) -> (Arc<UpstreamRoutes>, T) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        for name in prepared.changes().retired() {
            known.newest.remove(name);
        }
        let catalog = known.catalog(self.simulated_cloud, prepared.listings());
        let previous = self.set.install(prepared);
        (previous, install(Arc::new(catalog)))
    }

    /// Puts the replaced routes back (a reload whose record failed), forgetting
    /// the listings of the upstreams `prepared` started; `restore` puts the old
    /// binding back under the same lock.
    pub fn reinstate(
        &self,
        prepared: &PreparedUpstreams,
        previous: &UpstreamRoutes,
        restore: impl FnOnce(),
    ) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        for name in prepared
            .changes()
            .added
            .iter()
            .chain(&prepared.changes().restarted)
        {
            known.newest.remove(name);
        }
        self.set.reinstate(previous);
        restore();
    }

    /// The catalog of the generation in force, bound into `gateway`'s policy.
    fn rebind(&self, gateway: &Gateway) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        let catalog = known.catalog(self.simulated_cloud, self.set.listings());
        gateway.rebind(Arc::new(catalog));
    }
}

impl AttachedUpstreams {
    /// Starts the upstreams `gateway`'s policy declares, with `${VAR}`s from
    /// `lookup`; routes the gateway's upstream calls to them, binds their tools
    /// into its policy now and whenever they change, and lets a reload start and
    /// stop upstreams (so it is attached even when the policy declares none).
    pub async fn start(
        gateway: &Arc<Gateway>,
        lookup: VariableLookup,
    ) -> Result<AttachedUpstreams, AttachError> {
        let policy = gateway.policy();
        let resolved = policy
            .upstreams()
            .iter()
            .map(|(name, declaration)| declaration.resolve(name, &*lookup))
            .collect::<Result<Vec<_>, _>>()?;
        let any = !resolved.is_empty();
        let set = Arc::new(UpstreamSet::start(resolved).await?);
        gateway.attach_upstreams(set.routes());
        let manager = Arc::new(UpstreamManager {
            set: set.clone(),
            known: Mutex::new(KnownListings::default()),
            lookup,
            simulated_cloud: policy.simulated_cloud(),
        });
        gateway.manage_upstreams(manager.clone());
        let mut changes = set.tools_changed();
        changes.borrow_and_update();
        if any {
            manager.rebind(gateway);
            report_health(gateway, &set);
        }
        let rebinder = tokio::spawn({
            let gateway = Arc::downgrade(gateway);
            let manager = Arc::downgrade(&manager);
            async move {
                while changes.changed().await.is_ok() {
                    changes.borrow_and_update();
                    let (Some(gateway), Some(manager)) = (gateway.upgrade(), manager.upgrade())
                    else {
                        return;
                    };
                    manager.rebind(&gateway);
                    report_health(&gateway, &manager.set);
                }
            }
        });
        Ok(AttachedUpstreams { manager, rebinder })
    }

    /// The running set (status, listings).
    pub fn set(&self) -> &Arc<UpstreamSet> {
        &self.manager.set
    }

    /// Stops every upstream and waits until their processes have exited.
    pub async fn shutdown(self) {
        self.rebinder.abort();
        self.manager.set.shutdown().await;
    }
}

/// Each upstream's up/down state into the gateway's metrics; called on every
/// change the set announces (a start, a restart, a crash, a new listing).
fn report_health(gateway: &Gateway, set: &UpstreamSet) {
    for status in set.status() {
        gateway.set_upstream_up(&status.name, status.up);
    }
}

/// The newest listing each upstream has given. An upstream that goes down (it
/// crashed and is restarting, or its connection broke) keeps its tools in the
/// catalog under that listing: calls to them are still decided by the policy and,
/// when allowed, fail fast as `upstream_unavailable` from the set, instead of
/// turning into `unknown_tool` while it restarts. A new listing replaces the old
/// one when the upstream is back (tools it dropped disappear then).
#[derive(Debug, Default)]
struct KnownListings {
    newest: BTreeMap<String, ToolListing>,
}

impl KnownListings {
    /// The catalog of the built-ins (when `simulated_cloud`) and of every upstream
    /// that has ever listed its tools, each under its newest listing.
    fn catalog(
        &mut self,
        simulated_cloud: bool,
        listings: BTreeMap<String, Result<ToolListing, UpstreamError>>,
    ) -> Catalog {
        for (name, listing) in listings {
            if let Ok(listing) = listing {
                self.newest.insert(name, listing);
            }
        }
        Catalog::from_sources(
            simulated_cloud,
            self.newest
                .iter()
                .map(|(name, listing)| (name.as_str(), listing)),
        )
    }
}
