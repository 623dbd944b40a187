//! `proxi mcp`: MCP over stdio, with the HTTP server beside it for operators.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use tokio_util::sync::CancellationToken;

use proxi::policy_source::PolicySource;
use proxi::server::{AppState, BoundServer};

use super::logging::{LogFormat, notice};
use super::state::{Launch, StateArgs, open_gateway, shutdown_signal, start_upstreams};

#[derive(Args)]
pub(crate) struct McpArgs {
    /// Address of this process's HTTP server (REST and /mcp), which an operator uses
    /// to change its mode; port 0 picks a free port, recorded in <data-dir>/server.json.
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    #[command(flatten)]
    state: StateArgs,
}

/// Runs `proxi mcp` until stdin closes, a signal arrives or the HTTP server fails.
pub(crate) async fn run(args: McpArgs, log: LogFormat) -> Result<ExitCode> {
    let policy = PolicySource::from_flag(args.state.policy.as_deref());
    let (gateway, tokens, _) = open_gateway(&args.state, Launch::Stdio, &policy, log).await?;
    let upstreams = start_upstreams(&gateway, log).await?;
    if !tokens.has_operator() {
        notice(
            log,
            "no operator credential: this process has no operator endpoint and stays in the default mode (pass --operator-credential FILE, see README \"Trust model\")",
        );
    }
    // An operator reloads with `POST /policy/reload` (its token is required). There is
    // no SIGHUP reloader here: this process runs as the agent's user, who can signal it.
    gateway.set_policy_source(policy.clone());
    if let PolicySource::File(path) = &policy
        && let Some(writable) = writable_by_this_user(path)
    {
        notice(
            log,
            &format!(
                "warning: {} is writable by this process's user, which under proxi mcp is the agent's: the agent could rewrite the policy, to be loaded at the next start or reload; make the file and its directory read-only to this user (README \"Trust model\")",
                writable.display()
            ),
        );
    }
    let bound = BoundServer::bind(args.bind).await?;
    // Stdout belongs to the protocol: everything for humans goes to stderr.
    notice(
        log,
        &format!(
            "Proxi {} serving MCP on stdio (policy: {policy}); operators reach this process at {}",
            env!("CARGO_PKG_VERSION"),
            bound.url()
        ),
    );
    bound
        .advertise(gateway.data_dir())
        .context("cannot write server.json to the data dir")?;
    let state = AppState {
        gateway: gateway.clone(),
        tokens: Arc::new(tokens),
    };
    let stop = CancellationToken::new();
    let mut http = tokio::spawn(bound.serve_app(state, stop.clone().cancelled_owned()));
    let stdio = proxi::mcp::stdio::serve(gateway, stop.clone());
    let outcome = tokio::select! {
        served = stdio => served.map_err(anyhow::Error::from),
        () = shutdown_signal(log) => Ok(()),
        ended = &mut http => Err(match ended {
            Ok(Ok(())) => anyhow::anyhow!("the HTTP server stopped unexpectedly"),
            Ok(Err(error)) => error.into(),
            Err(error) => error.into(),
        }),
    };
    stop.cancel();
    if let Some(upstreams) = upstreams {
        upstreams.shutdown().await;
    }
    if !http.is_finished() {
        http.await??;
    }
    outcome.map(|()| ExitCode::SUCCESS)
}

/// The policy file, or the directory it sits in (where it could be replaced), if
/// this process's user may write it.
fn writable_by_this_user(path: &Path) -> Option<PathBuf> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    [path.to_owned(), directory]
        .into_iter()
        .find(|candidate| rustix::fs::access(candidate, rustix::fs::Access::WRITE_OK).is_ok())
}
