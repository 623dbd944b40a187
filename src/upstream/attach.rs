//! The policy's upstreams for the life of `proxi serve` or `proxi mcp`: started
//! with the server, their tools bound into the gateway's policy (again whenever an
//! upstream lists new tools or restarts), and stopped on shutdown.
//!
//! An upstream that fails to start does not stop Proxi: its tools are unknown
//! until it lists them, and calls to a known tool of a down upstream fail with
//! `upstream_unavailable`. Only an upstream declared `"required": true` that fails
//! its first start stops the server.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::client::{ToolListing, UpstreamError};
use super::config::ConfigError;
use super::set::UpstreamSet;
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

/// The running upstreams of one server and the task that keeps the gateway's
/// policy bound to their tools.
#[derive(Debug)]
pub struct AttachedUpstreams {
    set: Arc<UpstreamSet>,
    rebinder: JoinHandle<()>,
}

impl AttachedUpstreams {
    /// Starts the upstreams `gateway`'s policy declares (none: returns `None`),
    /// with `${VAR}`s from `lookup`; routes the gateway's upstream calls to them
    /// and binds their tools into its policy now and whenever they change.
    pub async fn start(
        gateway: &Arc<Gateway>,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<AttachedUpstreams>, AttachError> {
        let policy = gateway.policy();
        if policy.upstreams().is_empty() {
            return Ok(None);
        }
        let resolved = policy
            .upstreams()
            .iter()
            .map(|(name, declaration)| declaration.resolve(name, lookup))
            .collect::<Result<Vec<_>, _>>()?;
        let set = Arc::new(UpstreamSet::start(resolved).await?);
        gateway.attach_upstreams(set.clone());
        let simulated_cloud = policy.simulated_cloud();
        let mut changes = set.tools_changed();
        changes.borrow_and_update();
        let mut known = KnownListings::default();
        gateway.rebind(Arc::new(known.catalog(simulated_cloud, &set)));
        report_health(gateway, &set);
        let rebinder = tokio::spawn({
            let gateway = Arc::downgrade(gateway);
            let set = Arc::downgrade(&set);
            async move {
                while changes.changed().await.is_ok() {
                    changes.borrow_and_update();
                    let (Some(gateway), Some(set)) = (gateway.upgrade(), set.upgrade()) else {
                        return;
                    };
                    gateway.rebind(Arc::new(known.catalog(simulated_cloud, &set)));
                    report_health(&gateway, &set);
                }
            }
        });
        Ok(Some(AttachedUpstreams { set, rebinder }))
    }

    /// The running set (status, listings).
    pub fn set(&self) -> &Arc<UpstreamSet> {
        &self.set
    }

    /// Stops every upstream and waits until their processes have exited.
    pub async fn shutdown(self) {
        self.rebinder.abort();
        self.set.shutdown().await;
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
    fn catalog(&mut self, simulated_cloud: bool, set: &UpstreamSet) -> Catalog {
        for (name, listing) in set.listings() {
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
