//! Reloading the policy in force from the file the server started with
//! (`POST /policy/reload`, `SIGHUP`, `serve --watch`).
//!
//! The new file is loaded and checked in full before anything changes; a file that
//! fails is refused and recorded, and the old policy stays in force. An accepted
//! policy is swapped in under the mode lock's write side, together with its mode
//! names and rate limiter, so a call (which decides under the read side) is decided
//! wholly under the old policy or wholly under the new one. The reload's record
//! names both hashes. A reload never raises the mode: the mode in force keeps its
//! name; if the new policy lacks it, Proxi returns to the new default mode and
//! records that as a `mode_expired` record (so a restart restores the same).
//!
//! A reload whose `upstreams` differ starts the next generation of upstreams
//! first (added ones, and changed ones again), with the same rules as at start:
//! `${VAR}`s expanded from the same lookup (a missing one refuses the reload and
//! is named, never its value) and the required ones up with their tools listed.
//! If one cannot start, the reload is refused and nothing changes. Otherwise the
//! policy is bound to the new generation's catalog and swapped in together with
//! the routes to its upstreams, under the mode lock's write side: a call is
//! decided and routed wholly under the old policy, catalog and upstreams or
//! wholly under the new. Once the reload is recorded, calls still in flight to a
//! removed or restarted upstream are drained (up to `drain_timeout_seconds`, then
//! cancelled, as a mode switch does) and its old process is stopped.

use super::*;
use crate::policy::PolicyError;
use crate::policy_source::PolicySource;
use crate::upstream::attach::UpstreamManager;
use crate::upstream::set::{PreparedUpstreams, UpstreamChanges, UpstreamRoutes};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The caller is neither an operator nor Proxi itself (a signal, the watcher).
    #[error("only an operator may reload the policy")]
    NotOperator,
    /// The policy in force did not come from a file.
    #[error(
        "the policy in force is the built-in default, which has no file to reload; start proxi with --policy FILE to reload it"
    )]
    NoPolicyFile,
    /// The new file failed its checks; the old policy stays in force (recorded).
    #[error("the new policy was refused; the old one stays in force:\n  - {}", problems.join("\n  - "))]
    Refused {
        /// Every problem found, without the file's path.
        problems: Vec<String>,
    },
    /// The audit trail cannot record, so nothing changed.
    #[error("the audit trail is unavailable; refusing to act without a record")]
    AuditUnavailable,
}

/// What started a reload, as its record names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadTrigger {
    /// `POST /policy/reload` (`proxi policy reload`).
    Request,
    /// `SIGHUP`.
    Signal,
    /// `serve --watch` saw the file change.
    Watch,
}

impl ReloadTrigger {
    /// The name records carry in `detail.trigger`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadTrigger::Request => "request",
            ReloadTrigger::Signal => "sighup",
            ReloadTrigger::Watch => "watch",
        }
    }
}

/// The mode a reload left because the new policy has no mode of that name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeFallback {
    /// The mode in force before the reload.
    pub from: String,
    /// The new policy's default mode, now in force.
    pub to: String,
}

/// What an accepted reload did (`POST /policy/reload`'s answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The version of the policy replaced.
    pub previous_policy_hash: String,
    /// The version now in force.
    pub policy_hash: String,
    /// Whether the version changed (false: the same document was loaded again).
    pub changed: bool,
    /// The mode in force after the reload.
    pub mode: String,
    /// Set when the new policy lacks the mode that was in force.
    pub mode_fallback: Option<ModeFallback>,
    /// What binding the new rules to the current catalog noticed (rules matching
    /// no tool, constraints that cannot fit a schema).
    pub warnings: Vec<String>,
    /// The upstreams the reload started, stopped and restarted (all empty when
    /// the `upstreams` section did not change).
    #[serde(default)]
    pub upstreams: UpstreamChanges,
    /// The seq of the reload's record.
    pub audit_seq: u64,
}

/// What a reload replaced, to put back if its record cannot be written.
struct Replaced {
    policy: Arc<PolicyEngine>,
    installed: Arc<PolicyEngine>,
    mode_names: Arc<[Arc<str>]>,
    rate_limiter: Option<RateLimiter>,
    state: ModeState,
    /// The gateway's upstream routes before, when the reload replaced them.
    routes: Option<Option<Arc<dyn UpstreamCalls>>>,
}

/// The next generation of upstreams of a reload, and who started it.
struct UpstreamReload {
    manager: Arc<UpstreamManager>,
    prepared: PreparedUpstreams,
}

impl Gateway {
    /// Remembers the file the policy was loaded from, so that it can be reloaded.
    /// Returns false (and changes nothing) if a source was set already.
    pub fn set_policy_source(&self, source: PolicySource) -> bool {
        self.policy_source.set(source).is_ok()
    }

    /// Reads the policy file again and, if it passes every check, puts it in force
    /// (see the module documentation). `principal` must be an operator, or Proxi
    /// itself acting on a signal or a file change.
    pub async fn reload_policy(
        &self,
        principal: &Principal,
        trigger: ReloadTrigger,
    ) -> Result<ReloadReport, ReloadError> {
        if !matches!(principal.role(), Role::Operator | Role::System) {
            return Err(ReloadError::NotOperator);
        }
        let Some(PolicySource::File(path)) = self.policy_source.get() else {
            return Err(ReloadError::NoPolicyFile);
        };
        // Mode changes and reloads one at a time: a change validated against one
        // policy is never applied under another.
        let _one_change_at_a_time = self.mode_changes.lock().await;
        if self.audit.admit(Priority::Essential).is_err() {
            return Err(ReloadError::AuditUnavailable);
        }
        let current = self.policy();
        let candidate = match PolicyEngine::load(path) {
            Ok(candidate) => match restart_needed(&current, &candidate) {
                None => candidate,
                Some(problem) => {
                    return self
                        .refuse_reload(principal, trigger, &current, vec![problem])
                        .await;
                }
            },
            Err(error) => {
                return self
                    .refuse_reload(principal, trigger, &current, problems_of(error))
                    .await;
            }
        };
        let upstreams = if current.upstreams() == candidate.upstreams() {
            None
        } else {
            let Some(manager) = self.upstream_manager.get() else {
                let problem = "the upstreams changed, but this process does not run upstreams, so it cannot start or stop them".to_owned();
                return self
                    .refuse_reload(principal, trigger, &current, vec![problem])
                    .await;
            };
            match manager.prepare(candidate.upstreams()).await {
                Ok(prepared) => Some(UpstreamReload {
                    manager: manager.clone(),
                    prepared,
                }),
                Err(error) => {
                    return self
                        .refuse_reload(principal, trigger, &current, vec![error.safe_message()])
                        .await;
                }
            }
        };
        self.install(principal, trigger, &candidate, upstreams)
            .await
    }

    /// Swaps `candidate` in, records it, and undoes the swap if the record fails.
    async fn install(
        &self,
        principal: &Principal,
        trigger: ReloadTrigger,
        candidate: &PolicyEngine,
        upstreams: Option<UpstreamReload>,
    ) -> Result<ReloadReport, ReloadError> {
        let now = Utc::now();
        let changes = upstreams
            .as_ref()
            .map(|reload| reload.prepared.changes().clone())
            .unwrap_or_default();
        let swap = |catalog: Option<(Arc<crate::catalog::Catalog>, Arc<UpstreamRoutes>)>| {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            let (previous, installed, routes) = match catalog {
                Some((catalog, routes)) => {
                    if let Some(shadow) = self.shadow.get() {
                        shadow.rebind(Arc::clone(&catalog));
                    }
                    let (previous, installed) = self.policy.install(candidate.bind(catalog));
                    let before = self
                        .upstreams
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .replace(routes);
                    (previous, installed, Some(before))
                }
                None => {
                    let (previous, installed) = self.policy.replace(candidate);
                    (previous, installed, None)
                }
            };
            // Every call decided before this instant is registered by now; those
            // bound for an upstream that goes away are drained once it is recorded.
            let retired: Vec<String> = changes
                .retired()
                .map(|name| format!("{name}{}", crate::upstream::names::SEPARATOR))
                .collect();
            let to_drain = if retired.is_empty() {
                Vec::new()
            } else {
                self.in_flight.to_drain(u64::MAX, |tool, _| {
                    !retired
                        .iter()
                        .any(|prefix| tool.starts_with(prefix.as_str()))
                })
            };
            let names = mode_names_of(&installed);
            let old_names = std::mem::replace(
                &mut *self
                    .mode_names
                    .write()
                    .unwrap_or_else(PoisonError::into_inner),
                names.clone(),
            );
            let rate_limiter = (previous.rate_limits() != installed.rate_limits()).then(|| {
                std::mem::replace(
                    &mut *self
                        .rate_limiter
                        .write()
                        .unwrap_or_else(PoisonError::into_inner),
                    RateLimiter::new(installed.rate_limits()),
                )
            });
            let effective = state.effective_mode(Instant::now(), previous.default_mode());
            let from = old_names
                .get(effective.index())
                .cloned()
                .unwrap_or_else(|| Arc::from(""));
            let before = state.clone();
            let default = installed.default_mode();
            let fallback = match installed.mode_id(&from) {
                // The same mode by name; a lapsed one is the default anyway.
                Some(mode) if effective == state.mode => {
                    state.mode = mode;
                    if mode == default {
                        state.expires = None;
                    }
                    None
                }
                Some(mode) => {
                    state.mode = mode;
                    state.expires = None;
                    None
                }
                None => {
                    state.switch(ModeState {
                        mode: default,
                        expires: None,
                        reason: Some(format!(
                            "the reloaded policy has no mode {from}; back to the default mode"
                        )),
                        changed_by: principal.name().clone(),
                        changed_at: now,
                        epoch: 0,
                    });
                    Some(ModeFallback {
                        from: from.to_string(),
                        to: names[default.index()].to_string(),
                    })
                }
            };
            let mode = names[state.mode.index()].clone();
            let previous_hash = previous.policy_hash().to_owned();
            let new_hash = installed.policy_hash().to_owned();
            let hash: Arc<str> = Arc::from(new_hash.as_str());
            let pending = self.audit.submit_with(
                AuditEntry {
                    time: now,
                    principal: principal.clone(),
                    kind: EntryKind::PolicyReload,
                    tool: None,
                    arguments: None,
                    mode: mode.clone(),
                    decision: AuditDecision::Allowed,
                    reason_code: None,
                    outcome: "reloaded",
                    detail: json!({
                        "trigger": trigger.as_str(),
                        "previous_policy_hash": previous_hash,
                        "policy_hash": new_hash,
                        "mode_fallback": fallback,
                        "rate_limits_changed": rate_limiter.is_some(),
                        "upstreams": changes,
                    }),
                    expires_at: None,
                    context: None,
                    policy_hash: Some(hash.clone()),
                },
                Priority::Essential,
            );
            // A mode record too, so that a restart starts from the same mode.
            let fallback_pending = fallback.as_ref().map(|fallback| {
                self.audit.submit_with(
                    AuditEntry {
                        time: now,
                        principal: principal.clone(),
                        kind: EntryKind::ModeExpired,
                        tool: None,
                        arguments: None,
                        mode: mode.clone(),
                        decision: AuditDecision::Allowed,
                        reason_code: None,
                        outcome: "policy_reloaded",
                        detail: json!({
                            "from": fallback.from,
                            "reason": "the reloaded policy has no such mode",
                        }),
                        expires_at: None,
                        context: None,
                        policy_hash: Some(hash),
                    },
                    Priority::Essential,
                )
            });
            let report = ReloadReport {
                changed: previous_hash != new_hash,
                previous_policy_hash: previous_hash,
                policy_hash: new_hash,
                mode: mode.to_string(),
                mode_fallback: fallback,
                warnings: installed.findings().iter().map(|f| f.to_string()).collect(),
                upstreams: changes.clone(),
                audit_seq: 0,
            };
            let replaced = Replaced {
                policy: previous,
                installed,
                mode_names: old_names,
                rate_limiter,
                state: before,
                routes,
            };
            (pending, fallback_pending, replaced, report, to_drain)
        };
        let (set_routes, (pending, fallback_pending, replaced, report, to_drain)) = match &upstreams
        {
            Some(reload) => {
                let routes = reload.prepared.routes();
                let (previous, swapped) = reload
                    .manager
                    .install(&reload.prepared, |catalog| swap(Some((catalog, routes))));
                (Some(previous), swapped)
            }
            None => (None, swap(None)),
        };
        let recorded = match fallback_pending {
            Some(fallback) => match pending.durable().await {
                Ok(seq) => fallback.durable().await.map(|_| seq),
                Err(error) => Err(error),
            },
            None => pending.durable().await,
        };
        let Ok(audit_seq) = recorded else {
            match (upstreams, set_routes) {
                (Some(reload), Some(previous)) => {
                    reload.manager.reinstate(&reload.prepared, &previous, || {
                        self.undo_unrecorded_reload(replaced)
                    });
                    reload.prepared.abandon().await;
                }
                _ => self.undo_unrecorded_reload(replaced),
            }
            return Err(ReloadError::AuditUnavailable);
        };
        tracing::info!(
            from = %report.previous_policy_hash,
            to = %report.policy_hash,
            trigger = trigger.as_str(),
            "policy reloaded"
        );
        self.mode_events.send_replace(self.status());
        self.tools_changed
            .send_modify(|count| *count = count.wrapping_add(1));
        if report.mode_fallback.is_some() {
            self.metrics.mode_changed();
        }
        if let Some(reload) = upstreams {
            self.retire_upstreams(reload, to_drain).await;
        }
        Ok(ReloadReport {
            audit_seq,
            ..report
        })
    }

    /// After a recorded reload: waits for the calls in flight to the upstreams it
    /// removed or restarted (up to the new policy's `drain_timeout_seconds`, then
    /// cancels the rest, whose `cancelled` outcome is recorded), then stops those
    /// upstreams' old sessions and processes.
    async fn retire_upstreams(
        &self,
        reload: UpstreamReload,
        to_drain: Vec<crate::mode::DrainTarget>,
    ) {
        if !to_drain.is_empty() {
            let report = drain(to_drain, self.policy().drain_timeout()).await;
            tracing::info!(
                drained = report.drained.len(),
                cancelled = report.cancelled.len(),
                "calls to reloaded upstreams finished"
            );
        }
        for name in &reload.prepared.changes().removed {
            self.metrics.forget_upstream(name);
        }
        reload.prepared.retire().await;
    }

    /// A reload whose record failed never happened: put the old policy, names,
    /// limiter, mode and upstream routes back, unless something replaced the new
    /// policy since.
    fn undo_unrecorded_reload(&self, replaced: Replaced) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if !self.policy().same_rules(&replaced.installed) {
            return;
        }
        if let Some(routes) = replaced.routes {
            if let Some(shadow) = self.shadow.get() {
                shadow.rebind(Arc::clone(replaced.policy.catalog()));
            }
            *self
                .upstreams
                .write()
                .unwrap_or_else(PoisonError::into_inner) = routes;
        }
        self.policy.restore(&replaced.installed, replaced.policy);
        *self
            .mode_names
            .write()
            .unwrap_or_else(PoisonError::into_inner) = replaced.mode_names;
        if let Some(limiter) = replaced.rate_limiter {
            *self
                .rate_limiter
                .write()
                .unwrap_or_else(PoisonError::into_inner) = limiter;
        }
        *state = replaced.state;
    }

    /// Records a refused reload (the problems, the hash still in force) and answers it.
    async fn refuse_reload(
        &self,
        principal: &Principal,
        trigger: ReloadTrigger,
        current: &PolicyEngine,
        problems: Vec<String>,
    ) -> Result<ReloadReport, ReloadError> {
        tracing::warn!(problems = ?problems, "policy reload refused; the old policy stays in force");
        let recorded: Vec<&str> = problems
            .iter()
            .take(MAX_RECORDED_PROBLEMS)
            .map(|problem| truncate(problem, MAX_RECORDED_MESSAGE_BYTES))
            .collect();
        let entry = AuditEntry {
            time: Utc::now(),
            principal: principal.clone(),
            kind: EntryKind::PolicyReload,
            tool: None,
            arguments: None,
            mode: self.current_mode_name(),
            decision: AuditDecision::Denied,
            reason_code: Some(Reason::PolicyRefused),
            outcome: "refused",
            detail: json!({
                "trigger": trigger.as_str(),
                "policy_hash": current.policy_hash(),
                "problems": recorded,
                "problem_count": problems.len(),
            }),
            expires_at: None,
            context: None,
            policy_hash: Some(Arc::from(current.policy_hash())),
        };
        match self.audit.append_with(entry, Priority::Essential).await {
            Ok(_) => Err(ReloadError::Refused { problems }),
            Err(_) => Err(ReloadError::AuditUnavailable),
        }
    }
}

/// How many of a refused reload's problems its record keeps.
const MAX_RECORDED_PROBLEMS: usize = 20;

/// Why `candidate` cannot replace `current` without a restart, if it cannot:
/// the catalog's built-in tools follow from `simulated_cloud`.
fn restart_needed(current: &PolicyEngine, candidate: &PolicyEngine) -> Option<String> {
    if current.simulated_cloud() != candidate.simulated_cloud() {
        return Some(
            "simulated_cloud changed: the catalog's built-in tools follow from it; restart proxi to apply it".to_owned(),
        );
    }
    None
}

/// A load error as a list of problems, without the file's path (answers never
/// carry paths).
fn problems_of(error: PolicyError) -> Vec<String> {
    match error {
        PolicyError::Read { error, .. } => {
            vec![format!("cannot read the policy file: {}", error.kind())]
        }
        PolicyError::Parse { error, .. } => vec![format!("not a valid policy document: {error}")],
        PolicyError::DuplicateKey { error, .. } => vec![error.to_string()],
        PolicyError::Invalid { problems, .. } => problems,
    }
}
