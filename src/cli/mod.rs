//! The subcommands of the `proxi` binary, one module each, and the few helpers
//! several of them share (reaching a running server as the operator, opening
//! the audit store, parsing durations).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;

use proxi::audit::{AUDIT_DB_FILE, AuditStore, PostgresStore, SqliteStore, is_postgres_url};
use proxi::client::{ProxiClient, resolve_server_url, resolve_token};
use proxi::credential::OperatorCredential;
use proxi::tokens::OPERATOR_TOKEN_ENV;

/// Writes one line to stdout and reports failure instead of panicking as
/// `println!` does, so that a closed pipe (`proxi audit tail | head`) ends the
/// command quietly (see `is_broken_pipe` in main.rs).
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)
    };
}

pub(crate) mod agent;
pub(crate) mod audit;
pub(crate) mod credential;
pub(crate) mod demo;
pub(crate) mod init;
pub(crate) mod logging;
pub(crate) mod mcp;
pub(crate) mod mode;
pub(crate) mod model;
pub(crate) mod policy;
pub(crate) mod serve;
pub(crate) mod state;
pub(crate) mod token;

/// The environment variable `name`, unless it is unset or blank.
pub(crate) fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

/// `--max-steps`: a whole number from 1 to 100.
pub(crate) fn parse_max_steps(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(steps) if (1..=100).contains(&steps) => Ok(steps),
        _ => Err("expected a number of steps between 1 and 100".to_owned()),
    }
}

/// A duration flag: plain seconds (`900`) or a humantime duration (`15m`, `1h`).
pub(crate) fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|error| error.to_string());
    }
    humantime::parse_duration(text)
        .map_err(|error| format!("expected seconds or a duration like 15m or 1h: {error}"))
}

/// The store `audit` subcommands read: PostgreSQL when `store` names it, else
/// the SQLite database in `data_dir` (which must exist).
pub(crate) fn audit_store(store: Option<&str>, data_dir: &Path) -> Result<Arc<dyn AuditStore>> {
    Ok(match store {
        Some(url) => Arc::new(PostgresStore::connect(&postgres_url(url)?)?),
        None => Arc::new(SqliteStore::open_reader(&data_dir.join(AUDIT_DB_FILE))?),
    })
}

/// `--store`, checked to be a `postgres://` URL.
pub(crate) fn postgres_url(store: &str) -> Result<String> {
    if !is_postgres_url(store) {
        bail!("--store takes a postgres:// URL (without it the trail is SQLite in the data dir)");
    }
    Ok(store.to_owned())
}

#[derive(Args)]
pub(crate) struct ServerArgs {
    /// Server URL (default: the data dir's server.json, else http://127.0.0.1:8000).
    #[arg(long, env = "PROXI_SERVER")]
    pub(crate) server: Option<String>,
    /// Data dir to read server.json and tokens.json from.
    #[arg(long, default_value = "./proxi-data")]
    pub(crate) data_dir: PathBuf,
    /// Operator credential file to take the operator token from (after PROXI_OPERATOR_TOKEN).
    #[arg(long, env = "PROXI_OPERATOR_CREDENTIAL", value_name = "FILE")]
    pub(crate) operator_credential: Option<PathBuf>,
}

/// A client for the running server with the operator token: from
/// `PROXI_OPERATOR_TOKEN`, else the credential file, else the data dir's tokens.json.
pub(crate) fn operator_client(server: &ServerArgs) -> Result<ProxiClient> {
    let url = resolve_server_url(server.server.as_deref(), &server.data_dir)?;
    let from_credential = match &server.operator_credential {
        Some(path) if non_empty_env(OPERATOR_TOKEN_ENV).is_none() => Some(
            OperatorCredential::load(path, Some(&server.data_dir))?
                .operator_token()
                .to_owned(),
        ),
        _ => None,
    };
    let token = resolve_token(
        non_empty_env(OPERATOR_TOKEN_ENV).or(from_credential),
        &server.data_dir,
        true,
    );
    if token.is_none() {
        bail!(
            "no operator token: set {OPERATOR_TOKEN_ENV} or point --data-dir at the server's data dir (tokens.json)"
        );
    }
    Ok(ProxiClient::new(&url, token)?)
}
