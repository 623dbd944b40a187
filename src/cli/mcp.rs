//! `proxi mcp`: MCP over stdio, with the HTTP server beside it for operators.

use std::net::SocketAddr;
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
