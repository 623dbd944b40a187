//! `proxi serve`: the HTTP server (REST and MCP at /mcp).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use proxi::policy_source::PolicySource;
use proxi::server::limits::EdgeLimits;
use proxi::server::{AppState, BoundServer};
use proxi::tokens::{AGENT_TOKEN_ENV, OPERATOR_TOKEN_ENV};

use super::logging::{LogFormat, notice};
use super::parse_ttl;
use super::state::{Launch, StateArgs, open_gateway, shutdown_signal, start_upstreams};

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    bind: SocketAddr,
    /// Also serve /metrics here, without a token, for Prometheus scrapers.
    #[arg(long, value_name = "ADDR")]
    metrics_bind: Option<SocketAddr>,
    #[command(flatten)]
    state: StateArgs,
    #[command(flatten)]
    edge: EdgeArgs,
    /// Reload the policy file when it changes (it is also reloaded on SIGHUP and
    /// on `proxi policy reload`).
    #[arg(long)]
    watch: bool,
    /// Also decide every call under this policy, for comparison only: calls are
    /// answered as before; disagreements are recorded on the call's record (`detail.shadow_decision`) and counted.
    #[arg(long, value_name = "FILE")]
    shadow_policy: Option<std::path::PathBuf>,
}

/// Limits at the network edge (defaults fit a flood into 256 MB; see `EdgeLimits`).
#[derive(Args)]
pub(crate) struct EdgeArgs {
    /// Open connections at most; at the cap the longest-idle one is closed [default: 512].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Time to send a request's headers, and most idle time between requests [default: 10s].
    #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
    header_timeout: Option<Duration>,
    /// MCP sessions open at most, all tokens together [default: 256].
    #[arg(long, value_name = "N")]
    max_mcp_sessions: Option<usize>,
    /// MCP sessions one token may hold [default: 128].
    #[arg(long, value_name = "N")]
    max_mcp_sessions_per_token: Option<usize>,
    /// An MCP session idle this long is closed [default: 60s].
    #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
    mcp_session_idle: Option<Duration>,
    /// MCP sessions one token may open per minute [default: 120].
    #[arg(long, value_name = "N")]
    mcp_sessions_per_minute: Option<std::num::NonZeroU32>,
    /// MCP sessions one token may open in a burst [default: 30].
    #[arg(long, value_name = "N")]
    mcp_session_burst: Option<std::num::NonZeroU32>,
    /// Refused requests of one source within this window share one audit record [default: 60s].
    #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
    refusal_window: Option<Duration>,
}

impl EdgeArgs {
    fn limits(&self) -> EdgeLimits {
        let default = EdgeLimits::default();
        EdgeLimits {
            max_connections: self.max_connections.unwrap_or(default.max_connections),
            header_timeout: self.header_timeout.unwrap_or(default.header_timeout),
            max_sessions: self.max_mcp_sessions.unwrap_or(default.max_sessions),
            max_sessions_per_principal: self
                .max_mcp_sessions_per_token
                .unwrap_or(default.max_sessions_per_principal),
            session_idle_timeout: self
                .mcp_session_idle
                .unwrap_or(default.session_idle_timeout),
            sessions_per_minute: self
                .mcp_sessions_per_minute
                .unwrap_or(default.sessions_per_minute),
            session_burst: self.mcp_session_burst.unwrap_or(default.session_burst),
            refusal_window: self.refusal_window.unwrap_or(default.refusal_window),
            ..default
        }
    }
}

/// Runs `proxi serve` until Ctrl-C or SIGTERM.
pub(crate) async fn run(args: ServeArgs, log: LogFormat) -> Result<ExitCode> {
    let policy = PolicySource::from_flag(args.state.policy.as_deref());
    let (gateway, tokens, token_file) =
        open_gateway(&args.state, Launch::Serve, &policy, log).await?;
    let upstreams = start_upstreams(&gateway, log).await?;
    let _reloaders = super::reload::start_reloaders(&gateway, &policy, args.watch)?;
    if let Some(path) = &args.shadow_policy {
        let shadow = proxi::policy::PolicyEngine::load(path)?;
        gateway.set_shadow_policy(&shadow);
        notice(
            log,
            &format!("  shadow:    {} ({})", path.display(), shadow.policy_hash()),
        );
    }
    let bound = BoundServer::bind(args.bind)
        .await?
        .with_limits(args.edge.limits());
    let mode = gateway.status().mode;
    let version = env!("CARGO_PKG_VERSION");
    let audit = gateway.audit().describe();
    let tokens_from = match token_file {
        Some(path) => format!("generated tokens are in {} (mode 0600)", path.display()),
        None => format!("from {OPERATOR_TOKEN_ENV} and {AGENT_TOKEN_ENV}"),
    };
    // The banner goes out before server.json, so whoever waits for that file has it.
    match log {
        LogFormat::Text => {
            eprintln!("Proxi {version} listening on {}", bound.url());
            eprintln!("  policy:    {policy}");
            eprintln!("  mode:      {mode}");
            eprintln!("  audit:     {audit}");
            eprintln!("  tokens:    {tokens_from}");
        }
        LogFormat::Json => tracing::info!(
            url = %bound.url(),
            %policy,
            %mode,
            %audit,
            tokens = %tokens_from,
            "Proxi {version} listening"
        ),
    }
    bound
        .advertise(gateway.data_dir())
        .context("cannot write server.json to the data dir")?;
    let state = AppState {
        gateway,
        tokens: Arc::new(tokens),
    };
    if let Some(address) = args.metrics_bind {
        let (scrape, _task) = proxi::server::metrics::spawn_scrape_listener(
            state.clone(),
            address,
            args.edge.limits(),
            std::future::pending(),
        )
        .await?;
        notice(
            log,
            &format!("metrics (no token) on http://{scrape}/metrics"),
        );
    }
    let served = bound.serve_app(state, shutdown_signal(log)).await;
    if let Some(upstreams) = upstreams {
        upstreams.shutdown().await;
    }
    served?;
    Ok(ExitCode::SUCCESS)
}
