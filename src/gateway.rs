//! The one execution path every front end uses:
//! rate limit → decide (tool rules → arguments → constraints, [`crate::decision`]) → execute → audit.
//!
//! The mode lives behind a read-write lock. A tool call holds the read side from
//! its decision until its audit entry is queued, and a mode change holds the write
//! side while it switches and queues its own entry. So a call is decided and run
//! under one mode, no active tool runs once a switch to NORMAL has returned, and
//! the audit trail's order is the order in which decisions took effect. No lock is
//! held across I/O: the lock is released before waiting for the audit commit.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::anchor::Anchoring;
use crate::audit::{
    AuditDecision, AuditEntry, AuditError, AuditLog, AuditRecord, DATA_FILE_MODE, Durability,
    EntryKind, Priority, Recovered, STORED_PREFIX_BYTES, create_private_dir, format_time,
    json_digest,
};
use crate::decision::{AllowedCall, ParsedCall, Verdict};
use crate::infra::{CloudInfrastructure, InfraError, InfrastructureStatus, ServiceHealth};
use crate::policy::{Denial, ModeId, PolicyEngine, ReasonCode};
use crate::principal::{Principal, Role};
use crate::rate_limit::RateLimiter;
use crate::text;
use crate::tools::{MAX_TOOL_NAME_LEN, ToolCategory, ToolName};

/// Emergency TTL when the operator does not give one.
pub const DEFAULT_ELEVATED_TTL: Duration = Duration::from_secs(900);
/// Longest accepted mode-change reason, in characters.
pub const MAX_REASON_LEN: usize = 500;
/// Name of the lock file that keeps two processes off one data dir.
pub const LOCK_FILE: &str = "proxi.lock";
/// Failure code of an allowed upstream call that cannot reach its upstream.
pub const UPSTREAM_UNAVAILABLE: &str = "upstream_unavailable";
/// Longest refusal message a tool-call record keeps, in bytes (messages may quote the caller's input).
const MAX_RECORDED_MESSAGE_BYTES: usize = 1024;

/// Failures of the gateway as a whole (not of one tool call).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The audit trail cannot record, so nothing may run.
    #[error("the audit trail is unavailable; refusing to act without a record")]
    AuditUnavailable,
    /// Free disk space is below the reserve kept for operators, so agent calls are refused.
    #[error(
        "free disk space for the audit trail is below the operators' reserve; agent calls are refused until space is freed"
    )]
    AuditLowSpace,
    /// Opening the audit trail failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Another process holds the data dir.
    #[error(
        "data dir {0} is in use by another proxi process (two writers would fork the audit chain)"
    )]
    DataDirBusy(PathBuf),
    /// The data dir or its lock file could not be opened.
    #[error("cannot use data dir {path}: {error}")]
    DataDir {
        /// The data dir.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
}

/// Why an operator's mode change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModeChangeError {
    /// Only operators may change the mode.
    #[error("only an operator may change the mode")]
    NotOperator,
    /// The policy has no such mode.
    #[error("unknown mode '{requested}'; available modes: {available}")]
    UnknownMode {
        /// What was asked for.
        requested: String,
        /// The policy's modes.
        available: String,
    },
    /// Elevated modes need a reason for the audit trail.
    #[error("a reason is required to enter {0} mode")]
    ReasonRequired(String),
    /// The reason is too long.
    #[error("the reason must be at most {MAX_REASON_LEN} characters")]
    ReasonTooLong,
    /// The reason has no visible character: only spaces, zero-width, bidi or control characters.
    #[error(
        "the reason must contain visible characters (spaces, zero-width and control characters alone do not count)"
    )]
    ReasonInvisible,
    /// The TTL is zero or above the policy's cap.
    #[error(
        "ttl_seconds must be between 1 and {max} (the policy's max_emergency_ttl_seconds), got {requested}"
    )]
    TtlOutOfRange {
        /// What was asked for.
        requested: u64,
        /// The policy's cap.
        max: u64,
    },
    /// The default mode does not lapse.
    #[error(
        "ttl_seconds applies only to elevated modes; {0} is the default mode and does not expire"
    )]
    TtlOnDefaultMode(String),
    /// The change could not be recorded.
    #[error("the audit trail is unavailable; the mode change was not recorded")]
    AuditUnavailable,
}

/// What happened to one tool call.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The tool ran and returned this result.
    Executed(Value),
    /// The policy refused the call.
    Denied {
        /// The decision.
        denial: Denial,
        /// Why, in words.
        message: String,
        /// What the caller could do instead.
        how_to_proceed: String,
    },
    /// No tool has the requested name.
    UnknownTool {
        /// Why, in words, listing the real tools.
        message: String,
    },
    /// The arguments do not match the tool's schema.
    InvalidArguments(String),
    /// The tool name contains control, bidi, zero-width or separator characters;
    /// nothing was looked up. The message shows the name escaped.
    InvalidToolName(String),
    /// The caller is over one of the policy's `rate_limits`; nothing was looked at.
    RateLimited {
        /// How long until the refusing bucket has room again.
        retry_after: Duration,
    },
    /// The tool ran and failed (e.g. an unknown service); nothing changed.
    Failed {
        /// Machine-readable error code.
        code: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl Outcome {
    /// The reason code the API reports, if any.
    pub fn reason_code(&self) -> Option<&'static str> {
        match self {
            Outcome::Executed(_) => None,
            Outcome::Denied { denial, .. } => Some(denial.reason.as_str()),
            Outcome::UnknownTool { .. } => Some(ReasonCode::UnknownTool.as_str()),
            Outcome::InvalidArguments(_) => Some("invalid_arguments"),
            Outcome::InvalidToolName(_) => Some("invalid_tool_name"),
            Outcome::RateLimited { .. } => Some("rate_limited"),
            Outcome::Failed { code, .. } => Some(code),
        }
    }

    /// For a rate-limited call, the whole seconds to wait before retrying (at least 1),
    /// as `Retry-After` and `retry_after_seconds` report it.
    pub fn retry_after_seconds(&self) -> Option<u64> {
        match self {
            Outcome::RateLimited { retry_after } => Some(
                retry_after
                    .as_secs()
                    .saturating_add(u64::from(retry_after.subsec_nanos() > 0))
                    .max(1),
            ),
            _ => None,
        }
    }

    /// Whether the policy refused the call (unknown tools included, as in the API).
    pub fn is_policy_violation(&self) -> bool {
        matches!(self, Outcome::Denied { .. } | Outcome::UnknownTool { .. })
    }
}

/// The full answer to one tool call.
#[derive(Clone, Debug, PartialEq)]
pub struct Execution {
    /// The tool name as requested.
    pub tool: String,
    /// The mode the call was decided in.
    pub mode: Arc<str>,
    /// What happened.
    pub outcome: Outcome,
    /// The call's position in the audit trail.
    pub audit_seq: u64,
}

/// The policy state a client sees (`GET /policy/status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// The mode in force.
    pub mode: String,
    /// The mode's description.
    pub description: String,
    /// Tools the mode allows.
    pub allowed_tools: Vec<String>,
    /// Tools the mode explicitly blocks.
    pub blocked_tools: Vec<String>,
    /// Tools blocked in every mode.
    pub always_blocked: Vec<String>,
    /// When an elevated mode lapses (RFC 3339), or null.
    pub emergency_expires_at: Option<String>,
    /// The mode Proxi returns to.
    pub default_mode: String,
    /// Every mode the policy defines.
    pub available_modes: Vec<String>,
    /// Why the current mode was entered.
    pub reason: Option<String>,
    /// Who entered it.
    pub changed_by: String,
    /// When.
    pub changed_at: String,
}

/// One tool as `GET /tools/catalog` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Wire name.
    pub name: String,
    /// What it does.
    pub description: String,
    /// `read_only`, `active` or `destructive`.
    pub category: ToolCategory,
    /// JSON Schema of its arguments.
    pub input_schema: Value,
    /// Whether the current mode allows it.
    pub allowed: bool,
    /// Every mode that allows it.
    pub allowed_modes: Vec<String>,
    /// An upstream tool's MCP annotations as its server listed them (absent for
    /// built-ins, whose annotations follow from `category`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Value>,
}

/// A request to change the mode.
#[derive(Clone, Debug, Default)]
pub struct ModeChange {
    /// The target mode's name (any case).
    pub mode: String,
    /// Why; required for elevated modes.
    pub reason: Option<String>,
    /// How long an elevated mode lasts; defaults to 15 minutes (capped by policy).
    pub ttl: Option<Duration>,
}

#[derive(Clone, Debug)]
struct ModeState {
    mode: ModeId,
    /// Monotonic deadline for decisions, wall-clock time for display and restarts.
    expires: Option<(Instant, DateTime<Utc>)>,
    reason: Option<String>,
    changed_by: Arc<str>,
    changed_at: DateTime<Utc>,
}

impl ModeState {
    /// The mode decisions use: an elevated mode past its deadline counts as lapsed
    /// even before the expiry task has recorded it.
    fn effective_mode(&self, now: Instant, default: ModeId) -> ModeId {
        match self.expires {
            Some((deadline, _)) if now >= deadline => default,
            _ => self.mode,
        }
    }
}

/// Where the gateway keeps its state and how it records it.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Directory for the audit database, tokens and lock file.
    pub data_dir: PathBuf,
    /// How hard audit commits push to disk.
    pub durability: Durability,
    /// Free space (bytes) on the data dir's filesystem kept for operators; below it
    /// agent calls are refused. `None`: the audit log's scaled default.
    pub audit_reserve_bytes: Option<u64>,
}

/// The policy enforcement point shared by REST, MCP, the agent and the demo.
pub struct Gateway {
    policy: PolicyEngine,
    mode_names: Vec<Arc<str>>,
    state: RwLock<ModeState>,
    infra: Mutex<CloudInfrastructure>,
    audit: AuditLog,
    mode_events: watch::Sender<PolicyStatus>,
    rate_limiter: RateLimiter,
    data_dir: PathBuf,
    _data_dir_lock: File,
    /// Held by `set_mode` until its record is durable, so that a change whose
    /// record failed can be undone without undoing a later one.
    mode_changes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

fn lock_data_dir(data_dir: &Path) -> Result<File, GatewayError> {
    let io_error = |error| GatewayError::DataDir {
        path: data_dir.to_owned(),
        error,
    };
    create_private_dir(data_dir).map_err(io_error)?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(DATA_FILE_MODE)
        .open(data_dir.join(LOCK_FILE))
        .map_err(io_error)?;
    // A lock file left by an older version may be world-readable.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(DATA_FILE_MODE))
        .map_err(io_error)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(GatewayError::DataDirBusy(data_dir.to_owned()))
        }
        Err(std::fs::TryLockError::Error(error)) => Err(io_error(error)),
    }
}

/// What the gateway may trust at startup: where the audit key and anchor live, and
/// whether an elevated mode found in the trail may be restored at all.
#[derive(Clone, Debug)]
pub struct StartupTrust {
    /// The audit key and anchor (see [`crate::anchor`]).
    pub anchoring: Anchoring,
    /// False when no operator could have declared an elevated mode in this
    /// configuration (`proxi mcp` without an operator credential): then an elevated
    /// mode in the trail is never restored, however valid it looks.
    pub restore_elevated: bool,
}

impl Gateway {
    /// Opens the data dir, restores the mode from the audit trail and starts the expiry task.
    /// The audit key and anchor live in the data dir (see [`Gateway::open_with`]).
    ///
    /// Must be called inside a Tokio runtime.
    pub async fn open(
        policy: PolicyEngine,
        config: GatewayConfig,
    ) -> Result<Arc<Gateway>, GatewayError> {
        let lock = lock_data_dir(&config.data_dir)?;
        let anchoring = Anchoring::in_data_dir(&config.data_dir).map_err(AuditError::from)?;
        let trust = StartupTrust {
            anchoring,
            restore_elevated: true,
        };
        Gateway::open_locked(policy, config, trust, lock, None).await
    }

    /// Like [`Gateway::open`], with the audit key, anchor and restore rule given.
    pub async fn open_with(
        policy: PolicyEngine,
        config: GatewayConfig,
        trust: StartupTrust,
    ) -> Result<Arc<Gateway>, GatewayError> {
        let lock = lock_data_dir(&config.data_dir)?;
        Gateway::open_locked(policy, config, trust, lock, None).await
    }

    /// Like [`Gateway::open_with`], with the audit trail kept in `store` (a shared
    /// PostgreSQL store) rather than in the data dir's SQLite database.
    pub async fn open_with_store(
        policy: PolicyEngine,
        config: GatewayConfig,
        trust: StartupTrust,
        store: Arc<dyn crate::audit::AuditStore>,
    ) -> Result<Arc<Gateway>, GatewayError> {
        let lock = lock_data_dir(&config.data_dir)?;
        Gateway::open_locked(policy, config, trust, lock, Some(store)).await
    }

    async fn open_locked(
        policy: PolicyEngine,
        config: GatewayConfig,
        trust: StartupTrust,
        lock: File,
        store: Option<Arc<dyn crate::audit::AuditStore>>,
    ) -> Result<Arc<Gateway>, GatewayError> {
        let (audit, recovered) = match store {
            Some(store) => AuditLog::open_store(store, trust.anchoring)?,
            None => AuditLog::open_anchored(&config.data_dir, config.durability, trust.anchoring)?,
        };
        if let Some(bytes) = config.audit_reserve_bytes {
            audit.set_space_reserve(bytes);
        }
        let mode_names = policy
            .modes()
            .map(|(_, mode)| Arc::from(mode.name()))
            .collect();
        let now = Utc::now();
        let initial = ModeState {
            mode: policy.default_mode(),
            expires: None,
            reason: None,
            changed_by: Principal::system().name().clone(),
            changed_at: now,
        };
        let (mode_events, _) = watch::channel(PolicyStatus {
            mode: String::new(),
            description: String::new(),
            allowed_tools: Vec::new(),
            blocked_tools: Vec::new(),
            always_blocked: Vec::new(),
            emergency_expires_at: None,
            default_mode: String::new(),
            available_modes: Vec::new(),
            reason: None,
            changed_by: String::new(),
            changed_at: String::new(),
        });
        let rate_limiter = RateLimiter::new(policy.rate_limits());
        let gateway = Arc::new(Gateway {
            policy,
            mode_names,
            state: RwLock::new(initial),
            infra: Mutex::new(CloudInfrastructure::new()),
            audit,
            mode_events,
            rate_limiter,
            data_dir: config.data_dir,
            _data_dir_lock: lock,
            mode_changes: tokio::sync::Mutex::new(()),
        });
        gateway
            .restore_mode(recovered, trust.restore_elevated)
            .await?;
        gateway.mode_events.send_replace(gateway.status());
        spawn_expiry_task(Arc::downgrade(&gateway), gateway.mode_events.subscribe());
        Ok(gateway)
    }

    /// Puts back the mode the trail last recorded, unless it has lapsed meanwhile.
    ///
    /// An elevated mode is restored only from a record that checks out (its hash and
    /// MAC, and the chain from it to the newest record), only if `restore_elevated`,
    /// and for at most the policy's current `max_emergency_ttl_seconds`. Otherwise the
    /// gateway starts in the default mode and records why.
    async fn restore_mode(
        &self,
        recovered: Recovered,
        restore_elevated: bool,
    ) -> Result<(), GatewayError> {
        let Some(record) = recovered.last_mode_event else {
            return Ok(());
        };
        let default = self.policy.default_mode();
        if record.mode != self.mode_name(default).as_ref() {
            if let Some(problem) = &recovered.mode_event_problem {
                tracing::warn!(%problem, "the recorded mode change does not verify; starting in the default mode");
                let why = format!(
                    "the recorded mode change does not verify, so it was not restored ({problem})"
                );
                return self.record_restore_refusal(&record, &why).await;
            }
            if !restore_elevated {
                return self
                    .record_restore_refusal(
                        &record,
                        "no operator credential is configured, so no elevated mode is restored",
                    )
                    .await;
            }
        }
        let Some(mode) = self.policy.mode_id(&record.mode) else {
            tracing::warn!(mode = %record.mode, "recorded mode no longer exists in the policy; starting in the default mode");
            return self
                .record_restore_lapse(&record, "the recorded mode no longer exists in the policy")
                .await;
        };
        let changed_at = DateTime::parse_from_rfc3339(&record.time)
            .map(|time| time.with_timezone(&Utc))
            .unwrap_or_else(|_| Utc::now());
        let mut state = ModeState {
            mode,
            expires: None,
            reason: record
                .detail
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_owned),
            changed_by: Arc::from(record.principal.as_str()),
            changed_at,
        };
        if mode != default {
            let expires_at = record
                .expires_at
                .as_deref()
                .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
                .map(|time| time.with_timezone(&Utc));
            let now = Utc::now();
            let remaining = expires_at.and_then(|at| (at - now).to_std().ok());
            match (expires_at, remaining) {
                (Some(at), Some(remaining)) if !remaining.is_zero() => {
                    let cap = self.policy.max_elevated_ttl();
                    if remaining > cap {
                        // Recorded, so that later restarts start from the capped deadline.
                        let capped_at = now
                            + chrono::Duration::from_std(cap).unwrap_or(chrono::Duration::zero());
                        self.record_restore_cap(&record, &state, capped_at, cap)
                            .await?;
                        state.expires = Some((Instant::now() + cap, capped_at));
                        state.changed_by = Principal::system().name().clone();
                        state.changed_at = now;
                    } else {
                        state.expires = Some((Instant::now() + remaining, at));
                    }
                }
                _ => {
                    return self
                        .record_restore_lapse(
                            &record,
                            "the mode lapsed while Proxi was not running",
                        )
                        .await;
                }
            }
        }
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = state;
        Ok(())
    }

    /// Records that an elevated mode was not restored, and why; the gateway stays in the default mode.
    async fn record_restore_refusal(
        &self,
        record: &AuditRecord,
        why: &str,
    ) -> Result<(), GatewayError> {
        let default = self.policy.default_mode();
        let detail = json!({"from": record.mode, "restore_from_seq": record.seq, "reason": why});
        self.append_system_mode_record(
            EntryKind::ModeExpired,
            default,
            "not_restored",
            detail,
            None,
        )
        .await
    }

    /// Records an elevated mode restored with its time left cut to the policy's cap.
    async fn record_restore_cap(
        &self,
        record: &AuditRecord,
        state: &ModeState,
        capped_at: DateTime<Utc>,
        cap: Duration,
    ) -> Result<(), GatewayError> {
        let detail = json!({
            "from": record.mode,
            "reason": state.reason,
            "ttl_seconds": cap.as_secs(),
            "restore_from_seq": record.seq,
            "note": "time left cut to the policy's max_emergency_ttl_seconds at restart",
        });
        self.append_system_mode_record(
            EntryKind::ModeChange,
            state.mode,
            "restored_capped",
            detail,
            Some(capped_at),
        )
        .await
    }

    async fn record_restore_lapse(
        &self,
        record: &AuditRecord,
        why: &str,
    ) -> Result<(), GatewayError> {
        if record.mode == self.mode_name(self.policy.default_mode()).as_ref() {
            return Ok(());
        }
        let default = self.policy.default_mode();
        let detail = json!({"from": record.mode, "reason": why});
        self.append_system_mode_record(EntryKind::ModeExpired, default, "expired", detail, None)
            .await
    }

    /// Records a mode event the system itself caused at startup (a restore
    /// refused, capped or lapsed), as an essential record, and waits until it is durable.
    async fn append_system_mode_record(
        &self,
        kind: EntryKind,
        mode: ModeId,
        outcome: &'static str,
        detail: Value,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(), GatewayError> {
        let entry = AuditEntry {
            time: Utc::now(),
            principal: Principal::system().name().clone(),
            kind,
            tool: None,
            arguments: None,
            mode: self.mode_name(mode).clone(),
            decision: AuditDecision::Allowed,
            reason_code: None,
            outcome,
            detail,
            expires_at,
            context: None,
        };
        self.append(entry, Priority::Essential).await
    }

    /// The policy in force.
    pub fn policy(&self) -> &PolicyEngine {
        &self.policy
    }

    /// The data dir this gateway owns.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The audit trail.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    fn mode_name(&self, mode: ModeId) -> &Arc<str> {
        // mode_names is built from the same engine, one entry per mode, in order.
        &self.mode_names[mode.index()]
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, ModeState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Validates, decides, runs and records one tool call.
    pub async fn execute(
        &self,
        principal: &Principal,
        tool_name: &str,
        arguments: Value,
    ) -> Result<Execution, GatewayError> {
        self.execute_with_context(principal, tool_name, arguments, None)
            .await
    }

    /// [`Gateway::execute`], recording the caller's free-form `context` (bounded) too.
    pub async fn execute_with_context(
        &self,
        principal: &Principal,
        tool_name: &str,
        arguments: Value,
        context: Option<Value>,
    ) -> Result<Execution, GatewayError> {
        let tool = ToolName::parse(tool_name);
        let priority = audit_priority(principal);
        // Before anything runs: a call whose record were refused would act unrecorded.
        self.audit.admit(priority).map_err(|error| match error {
            AuditError::LowSpace => GatewayError::AuditLowSpace,
            _ => GatewayError::AuditUnavailable,
        })?;
        // The rate limit comes before any other work, so a flood costs one bucket
        // check and one small record per call.
        if let Err(retry_after) = self.rate_limiter.check(principal.role(), tool) {
            return self
                .refuse_rate_limited(principal, tool_name, retry_after)
                .await;
        }
        let invalid_name = tool_name.chars().any(text::needs_escape);
        let shown_name = shown_tool_name(tool_name);
        // Argument checks need no lock: they depend on the call alone.
        let parsed = ParsedCall::parse(&self.policy, tool_name, &arguments);
        let now = Utc::now();
        let (pending, mode, outcome) = {
            let state = self.read_state();
            let mode_id = state.effective_mode(Instant::now(), self.policy.default_mode());
            let outcome = match parsed.decide(&self.policy, mode_id) {
                Verdict::UnknownTool if invalid_name => Outcome::InvalidToolName(format!(
                    "Tool name '{}' contains control, bidi, zero-width or line-separator characters; no tool has such a name. Known tools: {}",
                    text::escape(truncate(tool_name, MAX_TOOL_NAME_LEN)),
                    crate::catalog::listed_names(&self.policy).join(", ")
                )),
                Verdict::UnknownTool => Outcome::UnknownTool {
                    message: format!(
                        "Tool '{}' does not exist. Known tools: {}",
                        truncate(tool_name, MAX_TOOL_NAME_LEN),
                        crate::catalog::listed_names(&self.policy).join(", ")
                    ),
                },
                Verdict::InvalidArguments(error) => Outcome::InvalidArguments(error.to_string()),
                Verdict::Deny(denial) => Outcome::Denied {
                    message: self.policy.explain(&denial),
                    how_to_proceed: self.policy.how_to_proceed(&denial),
                    denial,
                },
                Verdict::Allow(AllowedCall::Builtin(call)) => {
                    let result = self
                        .infra
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .execute(&call, now);
                    match result {
                        Ok(result) => Outcome::Executed(result),
                        Err(error) => Outcome::Failed {
                            code: error.code(),
                            message: error.to_string(),
                        },
                    }
                }
                // Forwarding to upstreams is not wired yet: fail clearly, never run.
                Verdict::Allow(AllowedCall::Upstream { upstream, .. }) => Outcome::Failed {
                    code: UPSTREAM_UNAVAILABLE,
                    message: format!("upstream '{upstream}' is not connected"),
                },
            };
            let mode = self.mode_name(mode_id).clone();
            let mut entry =
                tool_call_entry(principal, &shown_name, arguments, &mode, &outcome, now);
            entry.context = context;
            (self.audit.submit_with(entry, priority), mode, outcome)
        };
        let audit_seq = pending
            .durable()
            .await
            .map_err(|_| GatewayError::AuditUnavailable)?;
        Ok(Execution {
            tool: shown_name,
            mode,
            outcome,
            audit_seq,
        })
    }

    /// Records and answers a call refused by a rate limit.
    ///
    /// The record is small whatever the request was: the tool name bounded and
    /// escaped, no arguments, a fixed detail. A flood of refusals cannot fill the
    /// disk faster than a flood of the smallest valid calls.
    async fn refuse_rate_limited(
        &self,
        principal: &Principal,
        tool_name: &str,
        retry_after: Duration,
    ) -> Result<Execution, GatewayError> {
        let shown_name = shown_tool_name(tool_name);
        let outcome = Outcome::RateLimited { retry_after };
        // Queued under the mode lock like any call, so the trail's order stays the
        // order in which modes took effect.
        let (pending, mode) = {
            let state = self.read_state();
            let mode_id = state.effective_mode(Instant::now(), self.policy.default_mode());
            let mode = self.mode_name(mode_id).clone();
            let mut entry = tool_call_entry(
                principal,
                &shown_name,
                Value::Null,
                &mode,
                &outcome,
                Utc::now(),
            );
            entry.arguments = None;
            (
                self.audit.submit_with(entry, audit_priority(principal)),
                mode,
            )
        };
        let audit_seq = pending
            .durable()
            .await
            .map_err(|_| GatewayError::AuditUnavailable)?;
        Ok(Execution {
            tool: shown_name,
            mode,
            outcome,
            audit_seq,
        })
    }

    /// Changes the mode on an operator's behalf and records it.
    pub async fn set_mode(
        &self,
        principal: &Principal,
        change: ModeChange,
    ) -> Result<PolicyStatus, ModeChangeError> {
        if principal.role() != Role::Operator {
            return Err(ModeChangeError::NotOperator);
        }
        let target = self.policy.mode_id(change.mode.trim()).ok_or_else(|| {
            ModeChangeError::UnknownMode {
                requested: truncate(&change.mode, 64).to_owned(),
                available: self
                    .mode_names
                    .iter()
                    .map(|n| n.as_ref())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })?;
        let target_name = self.mode_name(target).clone();
        let reason = change
            .reason
            .map(|reason| reason.trim().to_owned())
            .filter(|reason| !reason.is_empty());
        // A reason made of zero-width or control characters only looks given.
        if reason
            .as_deref()
            .is_some_and(|r| !text::has_visible_text(r))
        {
            return Err(ModeChangeError::ReasonInvisible);
        }
        if reason
            .as_ref()
            .is_some_and(|r| r.chars().count() > MAX_REASON_LEN)
        {
            return Err(ModeChangeError::ReasonTooLong);
        }
        let is_default = target == self.policy.default_mode();
        let ttl = if is_default {
            if change.ttl.is_some() {
                return Err(ModeChangeError::TtlOnDefaultMode(target_name.to_string()));
            }
            None
        } else {
            if reason.is_none() {
                return Err(ModeChangeError::ReasonRequired(target_name.to_string()));
            }
            let max = self.policy.max_elevated_ttl();
            let ttl = change.ttl.unwrap_or(DEFAULT_ELEVATED_TTL.min(max));
            if ttl.is_zero() || ttl > max {
                return Err(ModeChangeError::TtlOutOfRange {
                    requested: ttl.as_secs(),
                    max: max.as_secs(),
                });
            }
            Some(ttl)
        };
        let _one_change_at_a_time = self.mode_changes.lock().await;
        if self.audit.admit(Priority::Essential).is_err() {
            return Err(ModeChangeError::AuditUnavailable);
        }
        let now = Utc::now();
        let (pending, replaced) = {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            let replaced = state.clone();
            let previous = state.effective_mode(Instant::now(), self.policy.default_mode());
            let expires = ttl.map(|ttl| {
                let wall =
                    now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::zero());
                (Instant::now() + ttl, wall)
            });
            *state = ModeState {
                mode: target,
                expires,
                reason: reason.clone(),
                changed_by: principal.name().clone(),
                changed_at: now,
            };
            let pending = self.audit.submit_with(
                AuditEntry {
                    time: now,
                    principal: principal.name().clone(),
                    kind: EntryKind::ModeChange,
                    tool: None,
                    arguments: None,
                    mode: target_name,
                    decision: AuditDecision::Allowed,
                    reason_code: None,
                    outcome: "changed",
                    detail: json!({
                        "from": self.mode_name(previous).as_ref(),
                        "reason": reason,
                        "ttl_seconds": ttl.map(|ttl| ttl.as_secs()),
                    }),
                    expires_at: expires.map(|(_, wall)| wall),
                    context: None,
                },
                Priority::Essential,
            );
            (pending, replaced)
        };
        if pending.durable().await.is_err() {
            self.undo_unrecorded_mode_change(principal, now, replaced);
            return Err(ModeChangeError::AuditUnavailable);
        }
        let status = self.status();
        self.mode_events.send_replace(status.clone());
        Ok(status)
    }

    /// Returns to the default mode if the elevated mode's deadline has passed.
    async fn expire_if_due(&self) {
        let default = self.policy.default_mode();
        let pending = {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            let due = state
                .expires
                .is_some_and(|(deadline, _)| Instant::now() >= deadline);
            if !due {
                return;
            }
            let from = self.mode_name(state.mode).clone();
            let now = Utc::now();
            *state = ModeState {
                mode: default,
                expires: None,
                reason: Some(format!("{from} mode lapsed")),
                changed_by: Principal::system().name().clone(),
                changed_at: now,
            };
            self.audit.submit_with(
                AuditEntry {
                    time: now,
                    principal: Principal::system().name().clone(),
                    kind: EntryKind::ModeExpired,
                    tool: None,
                    arguments: None,
                    mode: self.mode_name(default).clone(),
                    decision: AuditDecision::Allowed,
                    reason_code: None,
                    outcome: "expired",
                    detail: json!({"from": from.as_ref(), "reason": "the time limit lapsed"}),
                    expires_at: None,
                    context: None,
                },
                Priority::Essential,
            )
        };
        if let Err(error) = pending.durable().await {
            tracing::error!(%error, "could not record the end of an elevated mode");
        }
        tracing::info!("elevated mode lapsed; back to the default mode");
        self.mode_events.send_replace(self.status());
    }

    /// The current policy state.
    pub fn status(&self) -> PolicyStatus {
        let state = self.read_state().clone();
        let default = self.policy.default_mode();
        let now = Instant::now();
        let mode_id = state.effective_mode(now, default);
        let lapsed = mode_id != state.mode;
        let mode = self.policy.mode(mode_id);
        PolicyStatus {
            mode: mode.name().to_owned(),
            description: mode.description().to_owned(),
            allowed_tools: names(mode.allowed().names()),
            blocked_tools: names(mode.blocked().names()),
            always_blocked: names(self.policy.always_blocked().names()),
            emergency_expires_at: if lapsed {
                None
            } else {
                state.expires.map(|(_, wall)| format_time(wall))
            },
            default_mode: self.mode_name(default).to_string(),
            available_modes: self.mode_names.iter().map(|n| n.to_string()).collect(),
            reason: if lapsed { None } else { state.reason },
            changed_by: state.changed_by.to_string(),
            changed_at: format_time(state.changed_at),
        }
    }

    /// Watches policy-status changes (mode changes and expiries).
    pub fn subscribe(&self) -> watch::Receiver<PolicyStatus> {
        self.mode_events.subscribe()
    }

    /// Every tool some mode allows (and every built-in, as before), its schema,
    /// and whether the current mode allows it. An upstream tool no mode allows is
    /// left out; a call to it is still decided and audited.
    pub fn catalog(&self) -> Vec<CatalogEntry> {
        let mode = self
            .read_state()
            .effective_mode(Instant::now(), self.policy.default_mode());
        crate::catalog::listing(&self.policy, mode)
    }

    /// Services and fleet size.
    pub fn infrastructure_status(&self) -> InfrastructureStatus {
        self.infra
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .status()
    }

    /// Puts a service into a bad state (operators only) and records it.
    pub async fn simulate_incident(
        &self,
        principal: &Principal,
        service: &str,
        health: ServiceHealth,
    ) -> Result<Result<InfrastructureStatus, InfraError>, GatewayError> {
        if self.audit.admit(Priority::Essential).is_err() {
            return Err(GatewayError::AuditUnavailable);
        }
        let now = Utc::now();
        let (pending, result) = {
            let mode = self
                .read_state()
                .effective_mode(Instant::now(), self.policy.default_mode());
            let mut infra = self.infra.lock().unwrap_or_else(PoisonError::into_inner);
            let result = infra
                .simulate_incident(service, health, now)
                .map(|()| infra.status());
            let entry = AuditEntry {
                time: now,
                principal: principal.name().clone(),
                kind: EntryKind::Incident,
                tool: None,
                arguments: Some(json!({"service": truncate(service, 128), "status": health})),
                mode: self.mode_name(mode).clone(),
                decision: AuditDecision::Allowed,
                reason_code: result.as_ref().err().map(InfraError::code),
                outcome: if result.is_ok() {
                    "simulated"
                } else {
                    "failed"
                },
                detail: match &result {
                    Ok(_) => json!(format!("{service} set to {health}")),
                    Err(error) => json!(error.to_string()),
                },
                expires_at: None,
                context: None,
            };
            (self.audit.submit_with(entry, Priority::Essential), result)
        };
        pending
            .durable()
            .await
            .map_err(|_| GatewayError::AuditUnavailable)?;
        Ok(result)
    }

    /// Records a refused authentication; `what` names the request. Used where no
    /// edge tally aggregates refusals (a router served without `BoundServer`).
    pub async fn record_auth_refusal(
        &self,
        principal: &Principal,
        what: &str,
        reason_code: &'static str,
    ) -> Result<(), GatewayError> {
        let detail = Value::String(truncate(what, 200).to_owned());
        self.record_edge_refusal(principal, reason_code, detail)
            .await
    }
}

impl Gateway {
    /// Records one refusal at the edge (or a summary of many, see
    /// `server::refusals`); `detail` names the source and the count.
    pub async fn record_edge_refusal(
        &self,
        principal: &Principal,
        reason_code: &'static str,
        detail: Value,
    ) -> Result<(), GatewayError> {
        let mode = self
            .read_state()
            .effective_mode(Instant::now(), self.policy.default_mode());
        let entry = AuditEntry {
            time: Utc::now(),
            principal: principal.name().clone(),
            kind: EntryKind::AuthRefused,
            tool: None,
            arguments: None,
            mode: self.mode_name(mode).clone(),
            decision: AuditDecision::Denied,
            reason_code: Some(reason_code),
            outcome: "refused",
            detail,
            expires_at: None,
            context: None,
        };
        self.append(entry, audit_priority(principal)).await
    }

    /// Records a tool request refused before it reached the policy (a malformed
    /// body, an oversized name): `rejected`, with the name cut to a bounded prefix.
    pub async fn record_malformed_request(
        &self,
        principal: &Principal,
        tool_name: &str,
        problem: &str,
    ) -> Result<(), GatewayError> {
        let mode = self
            .read_state()
            .effective_mode(Instant::now(), self.policy.default_mode());
        let entry = AuditEntry {
            time: Utc::now(),
            principal: principal.name().clone(),
            kind: EntryKind::ToolCall,
            tool: Some(truncate(tool_name, MAX_TOOL_NAME_LEN).to_owned()),
            arguments: None,
            mode: self.mode_name(mode).clone(),
            decision: AuditDecision::Rejected,
            reason_code: Some("malformed_request"),
            outcome: "malformed_request",
            detail: json!({
                "problem": truncate(problem, 200),
                "tool_name_bytes": tool_name.len(),
            }),
            expires_at: None,
            context: None,
        };
        self.append(entry, audit_priority(principal)).await
    }

    /// Records an entry that no mode decision depends on, and waits until it is durable.
    async fn append(&self, entry: AuditEntry, priority: Priority) -> Result<(), GatewayError> {
        self.audit.admit(priority).map_err(|error| match error {
            AuditError::LowSpace => GatewayError::AuditLowSpace,
            _ => GatewayError::AuditUnavailable,
        })?;
        self.audit
            .append_with(entry, priority)
            .await
            .map(|_| ())
            .map_err(|_| GatewayError::AuditUnavailable)
    }

    /// A mode change whose record failed never happened: put back the state it
    /// replaced, unless the expiry task has replaced it meanwhile (mode changes
    /// are serialized). Calls decided under it were queued behind its record and
    /// are refused with it.
    fn undo_unrecorded_mode_change(
        &self,
        principal: &Principal,
        changed_at: DateTime<Utc>,
        replaced: ModeState,
    ) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if state.changed_at == changed_at && Arc::ptr_eq(&state.changed_by, principal.name()) {
            *state = replaced;
        }
    }
}

fn names(names: Vec<&str>) -> Vec<String> {
    names.into_iter().map(str::to_owned).collect()
}

/// A requested tool name as records and answers show it: at most
/// [`MAX_TOOL_NAME_LEN`] bytes, with control, bidi and zero-width characters escaped.
fn shown_tool_name(tool_name: &str) -> String {
    text::escape(truncate(tool_name, MAX_TOOL_NAME_LEN)).into_owned()
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Operators' and Proxi's own records may use the disk-space reserve; the rest may not.
fn audit_priority(principal: &Principal) -> Priority {
    match principal.role() {
        Role::Operator | Role::System => Priority::Essential,
        Role::Agent | Role::Anonymous => Priority::Agent,
    }
}

/// A refusal message as a bounded record field.
fn recorded_message(message: &str) -> Value {
    Value::String(truncate(message, MAX_RECORDED_MESSAGE_BYTES).to_owned())
}

/// The record of one tool call. A rejected call (unknown tool, invalid arguments)
/// stores only a digest of its arguments ([`json_digest`]): nothing bounds what an
/// unparsed body holds, and storing it whole would let the agent fill the disk.
fn tool_call_entry(
    principal: &Principal,
    tool_name: &str,
    arguments: Value,
    mode: &Arc<str>,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> AuditEntry {
    let (decision, outcome_name, detail) = match outcome {
        Outcome::Executed(result) => (AuditDecision::Allowed, "executed", result.clone()),
        Outcome::Denied { message, .. } => {
            (AuditDecision::Denied, "denied", recorded_message(message))
        }
        Outcome::UnknownTool { .. } => (
            AuditDecision::Rejected,
            "unknown_tool",
            Value::String("no such tool".to_owned()),
        ),
        Outcome::InvalidArguments(message) => (
            AuditDecision::Rejected,
            "invalid_arguments",
            recorded_message(message),
        ),
        Outcome::InvalidToolName(_) => (
            AuditDecision::Rejected,
            "invalid_tool_name",
            Value::String(
                "the tool name contains control, bidi or zero-width characters".to_owned(),
            ),
        ),
        Outcome::RateLimited { retry_after } => (
            AuditDecision::Denied,
            "rate_limited",
            json!({"retry_after_ms": u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX)}),
        ),
        Outcome::Failed { message, .. } => {
            (AuditDecision::Allowed, "failed", recorded_message(message))
        }
    };
    let arguments = match decision {
        AuditDecision::Rejected => json_digest(&arguments),
        // A call denied by a tool-level rule never had its arguments validated, so
        // they may be anything: keep them whole only while they are small.
        AuditDecision::Denied
            if serde_json::to_string(&arguments)
                .map_or(true, |text| text.len() > STORED_PREFIX_BYTES) =>
        {
            json_digest(&arguments)
        }
        AuditDecision::Allowed | AuditDecision::Denied => arguments,
    };
    AuditEntry {
        time: now,
        principal: principal.name().clone(),
        kind: EntryKind::ToolCall,
        tool: Some(truncate(tool_name, MAX_TOOL_NAME_LEN).to_owned()),
        arguments: Some(arguments),
        mode: mode.clone(),
        decision,
        reason_code: outcome.reason_code(),
        outcome: outcome_name,
        detail,
        expires_at: None,
        context: None,
    }
}

/// Wakes at each elevated mode's deadline and returns to the default mode.
///
/// Holds only a weak reference, so dropping the last `Arc<Gateway>` ends it.
fn spawn_expiry_task(gateway: Weak<Gateway>, mut events: watch::Receiver<PolicyStatus>) {
    tokio::spawn(async move {
        loop {
            events.borrow_and_update();
            let deadline = {
                let Some(gateway) = gateway.upgrade() else {
                    return;
                };
                let state = gateway.read_state();
                state.expires.map(|(deadline, _)| deadline)
            };
            let changed = match deadline {
                Some(deadline) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                            let Some(gateway) = gateway.upgrade() else { return };
                            gateway.expire_if_due().await;
                            Ok(())
                        }
                        changed = events.changed() => changed,
                    }
                }
                None => events.changed().await,
            };
            if changed.is_err() {
                return;
            }
        }
    });
}
