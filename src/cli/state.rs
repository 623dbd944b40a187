//! What `serve` and `mcp` share: the flags for the gateway's state and opening
//! the gateway, its tokens and its upstreams with them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};

use proxi::anchor::Anchoring;
use proxi::audit::{self, Durability};
use proxi::credential::OperatorCredential;
use proxi::gateway::{Gateway, GatewayConfig, StartupTrust};
use proxi::identities::postgres::PostgresPrincipals;
use proxi::identities::{DataDirPrincipals, PrincipalStore};
use proxi::policy_source::PolicySource;
use proxi::tokens::{AGENT_TOKEN_ENV, OPERATOR_TOKEN_ENV, Tokens};

use super::logging::{LogFormat, notice};
use super::{non_empty_env, postgres_url};

#[derive(Args, Clone)]
pub(crate) struct StateArgs {
    /// Policy file (default: policies/ops_policy.json if it exists, else the built-in policy).
    #[arg(long)]
    pub(crate) policy: Option<PathBuf>,
    /// Where the audit trail, tokens and lock file live.
    #[arg(long, default_value = "./proxi-data")]
    data_dir: PathBuf,
    /// `full`: answer only after the audit record is fsynced; `process`: after commit (survives kill -9, not power loss).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Full)]
    durability: DurabilityArg,
    /// Free disk space (MiB) kept for operators on the data dir's filesystem: below it
    /// agent calls get 503 while mode changes still work [default: 64, at most a tenth of the filesystem].
    #[arg(long, value_name = "MIB")]
    audit_reserve_mb: Option<u64>,
    /// Operator credential file (`proxi credential init`): the operator token and the audit key; the audit anchor is kept next to it.
    #[arg(long, env = "PROXI_OPERATOR_CREDENTIAL", value_name = "FILE")]
    operator_credential: Option<PathBuf>,
    /// Keep the audit trail in PostgreSQL (`postgres://USER@HOST:PORT/DB`, no TLS) shared by
    /// several instances; needs --operator-credential [default: SQLite in the data dir].
    #[arg(long, env = "PROXI_STORE", value_name = "URL")]
    store: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum DurabilityArg {
    Full,
    Process,
}

impl From<DurabilityArg> for Durability {
    fn from(value: DurabilityArg) -> Durability {
        match value {
            DurabilityArg::Full => Durability::Full,
            DurabilityArg::Process => Durability::Process,
        }
    }
}

/// Which command opens the gateway: `proxi mcp` runs as the agent's own user.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Launch {
    Serve,
    Stdio,
}

/// Opens the gateway with the policy, credential, store and tokens the flags
/// name; returns the tokens and the file generated tokens were written to.
pub(crate) async fn open_gateway(
    state: &StateArgs,
    launch: Launch,
    policy: &PolicySource,
    log: LogFormat,
) -> Result<(Arc<Gateway>, Tokens, Option<PathBuf>)> {
    let policy = policy.load()?;
    let credential = state
        .operator_credential
        .as_deref()
        .map(|path| OperatorCredential::load(path, Some(&state.data_dir)))
        .transpose()?;
    let operator = match (&credential, non_empty_env(OPERATOR_TOKEN_ENV)) {
        (Some(credential), Some(token)) if token != credential.operator_token() => bail!(
            "{OPERATOR_TOKEN_ENV} differs from the operator token in {}; set only one of them",
            credential.path().display()
        ),
        (Some(credential), _) => Some(credential.operator_token().to_owned()),
        (None, token) => token,
    };
    let anchoring = match &credential {
        Some(credential) => credential.anchoring(),
        None => Anchoring::in_data_dir(&state.data_dir)?,
    };
    if anchoring.is_external() {
        notice(
            log,
            &format!(
                "  audit key: from {}; anchor {}",
                state
                    .operator_credential
                    .as_deref()
                    .unwrap_or(Path::new("?"))
                    .display(),
                anchoring.anchor_path().display()
            ),
        );
    } else {
        notice(
            log,
            "  audit key: in the data dir (no --operator-credential): whoever can write the data dir can rewrite the trail undetected",
        );
    }
    // Under stdio an elevated mode is restored only when the key is out of the agent's reach.
    let restore_elevated = launch == Launch::Serve || anchoring.is_external();
    let config = GatewayConfig {
        data_dir: state.data_dir.clone(),
        durability: state.durability.into(),
        audit_reserve_bytes: state
            .audit_reserve_mb
            .map(|mb| mb.saturating_mul(1024 * 1024)),
    };
    let trust = StartupTrust {
        anchoring,
        restore_elevated,
    };
    let gateway = match &state.store {
        None => Gateway::open_with(policy, config, trust).await?,
        Some(store) => {
            // Every instance authenticates the one shared chain: they need one audit key.
            if credential.is_none() {
                bail!(
                    "--store needs --operator-credential: every instance on a shared store must use the same audit key"
                );
            }
            let url = postgres_url(store)?;
            let approvals = proxi::approval::open_store(
                Some(&url),
                &state.data_dir,
                proxi::approval::DecisionSeal::NoOperator,
            )?;
            let store = audit::PostgresStore::connect(&url)?;
            Gateway::open_with_store(policy, config, trust, Arc::new(store), approvals).await?
        }
    };
    let agent = std::env::var(AGENT_TOKEN_ENV).ok();
    let (tokens, sources) = match (launch, operator) {
        // The agent's own user reads this data dir: never generate or read an operator token there.
        (Launch::Stdio, None) => Tokens::resolve_without_operator(&state.data_dir, agent)?,
        (_, operator) => Tokens::resolve(&state.data_dir, operator, agent)?,
    };
    let tokens = match &state.store {
        Some(store) => with_shared_named_tokens(tokens, store, log)?,
        None => with_named_tokens(
            tokens,
            &state.data_dir,
            state.operator_credential.as_deref(),
            log,
        ),
    };
    Ok((gateway, tokens, sources.file))
}

/// Attaches the data dir's registry of named tokens, signed with a key derived from
/// the operator token; without an operator token no named token is accepted.
fn with_named_tokens(
    tokens: Tokens,
    data_dir: &Path,
    credential: Option<&Path>,
    log: LogFormat,
) -> Tokens {
    let Some(key) = tokens.registry_key() else {
        return tokens;
    };
    let mut principals = DataDirPrincipals::new(data_dir, Some(key));
    if let Some(credential) = credential {
        principals = principals.with_credential(credential);
    }
    match principals.list() {
        Ok(listed) if !listed.is_empty() => notice(
            log,
            &format!(
                "  named tokens: {} principal(s) in {}",
                listed.len(),
                principals.path().display()
            ),
        ),
        Ok(_) => {}
        Err(error) => notice(log, &format!("  named tokens: refused: {error}")),
    }
    tokens.with_principals(Arc::new(principals))
}

/// Attaches the named tokens of the shared PostgreSQL store, whose rows are signed
/// with the key derived from the operator token (as the data-dir registry is).
fn with_shared_named_tokens(tokens: Tokens, store: &str, log: LogFormat) -> Result<Tokens> {
    let Some(key) = tokens.registry_key() else {
        return Ok(tokens);
    };
    let principals = PostgresPrincipals::connect(&postgres_url(store)?, key)?;
    match principals.list() {
        Ok(listed) if !listed.is_empty() => notice(
            log,
            &format!("  named tokens: {} principal(s) in the store", listed.len()),
        ),
        Ok(_) => {}
        Err(error) => notice(log, &format!("  named tokens: {error}")),
    }
    Ok(tokens.with_principals(Arc::new(principals)))
}

/// Starts the policy's upstreams (if any) and attaches them to the gateway; one
/// that fails to start is logged and retried in the background unless required.
/// Attached even when there are none, so that a reload may add some.
pub(crate) async fn start_upstreams(
    gateway: &Arc<Gateway>,
    log: LogFormat,
) -> Result<Option<proxi::upstream::attach::AttachedUpstreams>> {
    let upstreams = proxi::upstream::attach::AttachedUpstreams::start(
        gateway,
        Arc::new(|name| std::env::var(name).ok()),
    )
    .await?;
    for status in upstreams.set().status() {
        notice(
            log,
            &format!(
                "  upstream {}: {} ({})",
                status.name,
                if status.up { "up" } else { "starting" },
                status.transport.as_str()
            ),
        );
    }
    Ok(Some(upstreams))
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal(log: LogFormat) {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
    notice(log, "shutting down");
}
