//! The `proxi` command line: a thin layer over the library.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use proxi::agent::select::{ProviderChoice, SelectedProvider, select_provider};
use proxi::agent::{
    AgentConfig, AgentObserver, DEFAULT_MAX_STEPS, RunOutcome, RunRecord, ToolCallRecord,
    describe_call,
};
use proxi::anchor::Anchoring;
use proxi::api::SetModeRequest;
use proxi::audit::{self, AuditStore, Durability};
use proxi::client::{ProxiClient, resolve_server_url, resolve_token};
use proxi::credential::OperatorCredential;
use proxi::decision::{self, ToolVerdict, Verdict};
use proxi::gateway::{Gateway, GatewayConfig, StartupTrust};
use proxi::policy::{Denial, PolicyEngine};
use proxi::policy_source::PolicySource;
use proxi::server::limits::EdgeLimits;
use proxi::server::{AppState, BoundServer};
use proxi::text::{escape, json_for_terminal};
use proxi::tokens::{AGENT_TOKEN_ENV, OPERATOR_TOKEN_ENV, Tokens};

/// Writes one line to stdout and reports failure instead of panicking as
/// `println!` does, so that a closed pipe (`proxi audit tail | head`) ends the
/// command quietly (see [`is_broken_pipe`]).
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)
    };
}

// Requests allocate on Tokio workers and the audit writer frees on its own thread;
// mimalloc handles that cross-thread pattern far better than glibc malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "proxi",
    version,
    about = "A policy guard between AI agents and the infrastructure they operate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: `text` (coloured only on a terminal, and never when
    /// NO_COLOR is set) or `json` (one JSON object per line, for log shippers).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server: the REST API and MCP (Streamable HTTP) at /mcp.
    Serve(ServeArgs),
    /// Serve MCP over stdio; REST and /mcp also listen on --bind for operators.
    Mcp(McpArgs),
    /// Validate or explain a policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Inspect the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Show or change the mode of a running server.
    #[command(subcommand)]
    Mode(ModeCommand),
    /// Run the SRE agent on a task; it acts only through the governed tools.
    Agent(AgentArgs),
    /// Run the seed's ten scenarios end to end against an in-process server (no API key needed).
    Demo(DemoArgs),
    /// Manage the operator credential (operator token and audit key, kept outside the data dir).
    #[command(subcommand)]
    Credential(CredentialCommand),
    /// Write a starter policy and an example upstream policy into DIR to edit.
    Init {
        /// Directory to write into; created if missing. Existing files are never overwritten.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum CredentialCommand {
    /// Create a new credential file (mode 0600) with a fresh operator token and audit key.
    Init {
        /// Where to write it: outside the data dir, where the agent cannot read it.
        file: PathBuf,
    },
}

#[derive(Args)]
struct DemoArgs {
    /// Run only this scenario (1-10).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=10))]
    scenario: Option<u8>,
    /// Write machine-readable results to stdout instead of the transcript.
    #[arg(long)]
    json: bool,
    /// Keep the data dir here (new or empty) so `proxi audit verify --data-dir DIR` can check it.
    #[arg(long, value_name = "DIR")]
    keep_data: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Policy file (default: policies/ops_policy.json if it exists, else the built-in policy).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Mode switches in the stress scenario (at least 1000 for the seed's test).
    #[arg(long, default_value_t = proxi::demo::DEFAULT_STRESS_SWITCHES)]
    stress_switches: usize,
    /// Most model turns per agent run.
    #[arg(long, default_value_t = DEFAULT_MAX_STEPS, value_parser = parse_max_steps)]
    max_steps: usize,
}

/// Which model drives the agent; shared by `agent` and `demo`.
#[derive(Args)]
struct ModelArgs {
    /// LLM provider (agent default: gemini when GOOGLE_API_KEY is set, else mock; demo default: mock).
    #[arg(long, value_enum)]
    provider: Option<ProviderArg>,
    /// Model name (default depends on the provider).
    #[arg(long)]
    model: Option<String>,
    /// Override the provider's base URL (OpenAI-compatible servers, proxies).
    #[arg(long)]
    base_url: Option<String>,
    /// Seconds one model turn may take (default: $PROXI_MODEL_TIMEOUT, else 120).
    #[arg(long, value_name = "SECONDS", value_parser = parse_model_timeout)]
    model_timeout: Option<std::time::Duration>,
    /// Sampling temperature (agent default: the provider's; demo default: 0).
    #[arg(long)]
    temperature: Option<f64>,
    /// Sampling seed, for providers that honour one (agent default: none; demo default: 0).
    #[arg(long)]
    seed: Option<u64>,
}

impl ModelArgs {
    fn options(&self) -> proxi::agent::select::ModelOptions {
        proxi::agent::select::ModelOptions {
            model: self.model.clone(),
            base_url: self.base_url.clone(),
            timeout: self.model_timeout,
            temperature: self.temperature,
            seed: self.seed,
        }
    }
}

fn parse_model_timeout(text: &str) -> Result<std::time::Duration, String> {
    proxi::agent::genai_provider::parse_timeout(text)
        .ok_or_else(|| "expected a positive number of seconds, at most 86400".to_owned())
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProviderArg {
    Gemini,
    Openai,
    Anthropic,
    Ollama,
    Mock,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Via {
    Rest,
    Mcp,
}

#[derive(Args)]
struct AgentArgs {
    /// The task, e.g. "Restart the web server".
    #[arg(required = true, num_args = 1..)]
    task: Vec<String>,
    /// Server URL (default: $PROXI_SERVER, else the data dir's server.json, else http://127.0.0.1:8000).
    #[arg(long)]
    server: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    /// Most model turns before the agent stops.
    #[arg(long, default_value_t = DEFAULT_MAX_STEPS, value_parser = parse_max_steps)]
    max_steps: usize,
    /// How tool calls reach the server.
    #[arg(long, value_enum, default_value_t = Via::Rest)]
    via: Via,
    /// Print one machine-readable JSON run record instead of the transcript.
    #[arg(long)]
    json: bool,
    /// Data dir to read server.json and tokens.json from.
    #[arg(long, default_value = "./proxi-data")]
    data_dir: PathBuf,
}

#[derive(Args, Clone)]
struct StateArgs {
    /// Policy file (default: policies/ops_policy.json if it exists, else the built-in policy).
    #[arg(long)]
    policy: Option<PathBuf>,
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
enum DurabilityArg {
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

#[derive(Args)]
struct ServeArgs {
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
}

/// Limits at the network edge (defaults fit a flood into 256 MB; see `EdgeLimits`).
#[derive(Args)]
struct EdgeArgs {
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

#[derive(Args)]
struct McpArgs {
    /// Address of this process's HTTP server (REST and /mcp), which an operator uses
    /// to change its mode; port 0 picks a free port, recorded in <data-dir>/server.json.
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file.
    Check {
        /// The policy file (default: policies/ops_policy.json if it exists, else the built-in policy).
        file: Option<PathBuf>,
        /// Also start (or reach) the policy's upstreams, list their tools and check
        /// the rules against them.
        #[arg(long)]
        connect: bool,
    },
    /// Show how the policy decides one call.
    Explain {
        /// Tool name, e.g. restart_service.
        tool: String,
        /// Mode to decide in (default: the policy's default mode).
        #[arg(long)]
        mode: Option<String>,
        /// Arguments as a JSON object; without them, how the mode treats the tool itself.
        #[arg(long)]
        args: Option<String>,
        /// Policy file (default: policies/ops_policy.json if it exists, else the built-in policy).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Start (or reach) the policy's upstreams to learn their tools and schemas.
        #[arg(long)]
        connect: bool,
    },
    /// List every decision that changes from OLD to NEW, per mode and tool.
    /// Exits 0 with no changes, 1 with some.
    Diff {
        /// The policy in force.
        old: PathBuf,
        /// The candidate policy.
        new: PathBuf,
        /// Print the changes as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a running server read its policy file again (operator token); a file
    /// that fails its checks is refused and the old policy stays in force.
    Reload {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Decide every tool call of the audit trail again under a candidate policy,
    /// in the mode recorded with it, and list the calls whose outcome changes.
    Replay {
        /// The candidate policy.
        #[arg(long)]
        candidate: PathBuf,
        #[arg(long, default_value = "./proxi-data")]
        data_dir: PathBuf,
        /// The trail's PostgreSQL store, as given to `serve` [default: SQLite in the data dir].
        #[arg(long, env = "PROXI_STORE", value_name = "URL")]
        store: Option<String>,
        /// Only calls at or after this time: RFC 3339, or a duration ago (`2h`, `30m`).
        #[arg(long)]
        since: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the hash chain, check every MAC and the anchor, and name the first bad record.
    Verify {
        #[arg(long, default_value = "./proxi-data")]
        data_dir: PathBuf,
        /// The operator credential the server uses (else the key in the data dir).
        #[arg(long, env = "PROXI_OPERATOR_CREDENTIAL", value_name = "FILE")]
        operator_credential: Option<PathBuf>,
        /// The trail's PostgreSQL store, as given to `serve` [default: SQLite in the data dir].
        #[arg(long, env = "PROXI_STORE", value_name = "URL")]
        store: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the newest records.
    Tail {
        #[arg(long, default_value = "./proxi-data")]
        data_dir: PathBuf,
        /// The trail's PostgreSQL store, as given to `serve` [default: SQLite in the data dir].
        #[arg(long, env = "PROXI_STORE", value_name = "URL")]
        store: Option<String>,
        /// How many records.
        #[arg(short = 'n', long = "lines", default_value_t = 20)]
        count: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        filters: TailFilters,
        /// Then keep printing new records as the server commits them (GET
        /// /audit/stream; needs the running server and the operator token).
        #[arg(short = 'f', long)]
        follow: bool,
        /// Server URL for --follow (default: the data dir's server.json).
        #[arg(long, env = "PROXI_SERVER")]
        server: Option<String>,
        /// Operator credential file for --follow (after PROXI_OPERATOR_TOKEN).
        #[arg(long, env = "PROXI_OPERATOR_CREDENTIAL", value_name = "FILE")]
        operator_credential: Option<PathBuf>,
    },
}

/// Which records `audit tail` shows (the filters of `GET /audit`).
#[derive(Args, Default)]
struct TailFilters {
    /// Only this principal (e.g. `agent`, `operator`).
    #[arg(long)]
    principal: Option<String>,
    /// Only this kind (`tool_call`, `mode_change`, `mode_expired`, `auth_refused`, `incident`).
    #[arg(long)]
    kind: Option<String>,
    /// Only this tool; `*` matches any run of characters (`restart_*`).
    #[arg(long)]
    tool: Option<String>,
    /// Only this decision (`allowed`, `denied`, `rejected`).
    #[arg(long)]
    decision: Option<String>,
    /// Only this reason code (e.g. `blocked_in_mode`).
    #[arg(long)]
    reason_code: Option<String>,
    /// Only records at or after this RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Only records before this RFC 3339 time.
    #[arg(long)]
    until: Option<String>,
}

impl TailFilters {
    /// The filters as query parameters of `GET /audit` and `/audit/stream`.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        [
            ("principal", &self.principal),
            ("kind", &self.kind),
            ("tool", &self.tool),
            ("decision", &self.decision),
            ("reason_code", &self.reason_code),
            ("since", &self.since),
            ("until", &self.until),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.clone().map(|value| (name, value)))
        .collect()
    }

    /// The filters as a store query for the newest `limit` records.
    fn query(&self, limit: u32) -> Result<audit::AuditQuery> {
        let time = |flag: &str, value: &Option<String>| -> Result<_> {
            value
                .as_deref()
                .map(|text| {
                    chrono::DateTime::parse_from_rfc3339(text)
                        .map(|time| time.to_utc())
                        .with_context(|| format!("--{flag} must be an RFC 3339 time"))
                })
                .transpose()
        };
        Ok(audit::AuditQuery {
            principal: self.principal.clone(),
            kind: self.kind.clone(),
            tool: self.tool.clone(),
            decision: self.decision.clone(),
            reason_code: self.reason_code.clone(),
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
            after_seq: None,
            limit,
        })
    }
}

#[derive(Args)]
struct ServerArgs {
    /// Server URL (default: the data dir's server.json, else http://127.0.0.1:8000).
    #[arg(long, env = "PROXI_SERVER")]
    server: Option<String>,
    /// Data dir to read server.json and tokens.json from.
    #[arg(long, default_value = "./proxi-data")]
    data_dir: PathBuf,
    /// Operator credential file to take the operator token from (after PROXI_OPERATOR_TOKEN).
    #[arg(long, env = "PROXI_OPERATOR_CREDENTIAL", value_name = "FILE")]
    operator_credential: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ModeCommand {
    /// Show the current mode.
    Status {
        #[command(flatten)]
        server: ServerArgs,
        /// Print the raw JSON status.
        #[arg(long)]
        json: bool,
    },
    /// Change the mode (operator token required).
    Set {
        /// Target mode, e.g. EMERGENCY or NORMAL.
        mode: String,
        /// Why (required for elevated modes; recorded in the audit trail).
        #[arg(long)]
        reason: Option<String>,
        /// How long an elevated mode lasts, e.g. 900, 15m, 1h.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

fn parse_max_steps(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(steps) if (1..=100).contains(&steps) => Ok(steps),
        _ => Err("expected a number of steps between 1 and 100".to_owned()),
    }
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
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

/// Whether `error` comes from writing to a reader that went away: `head` read
/// what it wanted and closed the pipe. That ends the command, quietly.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Output paths that still use `println!` (or `eprintln!`) panic on a closed
/// pipe; this ends the process quietly instead of printing a panic. Stable Rust
/// has no safe way to restore SIGPIPE's default action, hence the hook.
fn exit_quietly_on_broken_pipe() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to std") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
}

fn main() -> ExitCode {
    exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    proxi::tls::install_crypto_provider();
    let log = cli.log_format;
    init_logging(default_log_filter(&cli.command), log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            report_error(log, &format!("cannot start the async runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            report_error(log, &format!("{error:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The log filter a command uses when `RUST_LOG` is not set.
fn default_log_filter(command: &Command) -> &'static str {
    match command {
        Command::Serve(_) | Command::Mcp(_) => "info,rmcp=warn",
        // rmcp logs transport failures that the agent already reports as errors.
        Command::Demo(_) | Command::Agent(_) => "warn,rmcp=off",
        Command::Policy(_)
        | Command::Audit(_)
        | Command::Mode(_)
        | Command::Init { .. }
        | Command::Credential(_) => "warn",
    }
}

/// Whether stderr gets ANSI colours: only on a terminal, and never when `NO_COLOR`
/// is set to anything non-empty (<https://no-color.org>).
fn stderr_colours() -> bool {
    use std::io::IsTerminal;
    colours_allowed(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

fn no_color() -> bool {
    !colours_allowed(true, std::env::var_os("NO_COLOR").as_deref())
}

fn colours_allowed(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

fn init_logging(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Logs go to stderr so stdout stays clean for data (and for MCP over stdio).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(stderr_colours()).try_init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .with_current_span(false)
            .try_init(),
    };
}

/// Tells a person something on stderr: a plain line, or under `--log-format json`
/// an info event, so that stderr carries nothing but JSON.
fn notice(format: LogFormat, text: &str) {
    match format {
        LogFormat::Text => eprintln!("{text}"),
        LogFormat::Json => tracing::info!("{text}"),
    }
}

/// Reports the error a command ended with: `error: ...`, or an error event under
/// `--log-format json`.
fn report_error(format: LogFormat, message: &str) {
    match format {
        LogFormat::Text => eprintln!("error: {message}"),
        LogFormat::Json => tracing::error!("{message}"),
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let log = cli.log_format;
    match cli.command {
        Command::Serve(args) => serve(args, log).await,
        Command::Mcp(args) => mcp(args, log).await,
        Command::Policy(command) => policy(command).await,
        Command::Credential(CredentialCommand::Init { file }) => {
            let credential = OperatorCredential::create(&file)?;
            println!(
                "wrote {} (mode 0600): the operator token and the audit key",
                credential.path().display()
            );
            println!(
                "pass it to `proxi serve`, `proxi mcp`, `proxi mode` and `proxi audit verify` with --operator-credential; the audit anchor will be kept next to it"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(command) => audit_command(command).await,
        Command::Mode(command) => mode(command).await,
        Command::Demo(args) => demo(args).await,
        Command::Agent(args) => agent(args, log).await,
        Command::Init { dir } => init(&dir),
    }
}

/// Which command opens the gateway: `proxi mcp` runs as the agent's own user.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Launch {
    Serve,
    Stdio,
}

async fn open_gateway(
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
            let store = audit::PostgresStore::connect(&postgres_url(store)?)?;
            Gateway::open_with_store(policy, config, trust, Arc::new(store)).await?
        }
    };
    let agent = std::env::var(AGENT_TOKEN_ENV).ok();
    let (tokens, sources) = match (launch, operator) {
        // The agent's own user reads this data dir: never generate or read an operator token there.
        (Launch::Stdio, None) => Tokens::resolve_without_operator(&state.data_dir, agent)?,
        (_, operator) => Tokens::resolve(&state.data_dir, operator, agent)?,
    };
    Ok((gateway, tokens, sources.file))
}

async fn serve(args: ServeArgs, log: LogFormat) -> Result<ExitCode> {
    let policy = PolicySource::from_flag(args.state.policy.as_deref());
    let (gateway, tokens, token_file) =
        open_gateway(&args.state, Launch::Serve, &policy, log).await?;
    let upstreams = start_upstreams(&gateway, log).await?;
    let _reloaders = policy_reloaders(&gateway, &policy, args.watch)?;
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

/// Remembers the policy file for reloads and starts what triggers them: SIGHUP,
/// and with `--watch` the file's changes. The built-in policy has no file to reload.
fn policy_reloaders(
    gateway: &Arc<Gateway>,
    policy: &PolicySource,
    watch: bool,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    gateway.set_policy_source(policy.clone());
    let mut tasks = vec![proxi::policy_watch::spawn_sighup_reloader(gateway)?];
    match policy {
        PolicySource::File(path) if watch => tasks.push(proxi::policy_watch::spawn_file_watcher(
            gateway,
            path.clone(),
            proxi::policy_watch::WATCH_INTERVAL,
        )),
        PolicySource::BuiltIn if watch => {
            bail!("--watch needs a policy file (--policy FILE); the built-in policy cannot change")
        }
        _ => {}
    }
    Ok(tasks)
}

/// Starts the policy's upstreams (if any) and attaches them to the gateway; one
/// that fails to start is logged and retried in the background unless required.
async fn start_upstreams(
    gateway: &Arc<Gateway>,
    log: LogFormat,
) -> Result<Option<proxi::upstream::attach::AttachedUpstreams>> {
    let upstreams = proxi::upstream::attach::AttachedUpstreams::start(gateway, &|name| {
        std::env::var(name).ok()
    })
    .await?;
    if let Some(upstreams) = &upstreams {
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
    }
    Ok(upstreams)
}

async fn mcp(args: McpArgs, log: LogFormat) -> Result<ExitCode> {
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

async fn shutdown_signal(log: LogFormat) {
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

async fn policy(command: PolicyCommand) -> Result<ExitCode> {
    match command {
        PolicyCommand::Check { file, connect } => {
            let source = PolicySource::from_flag(file.as_deref());
            let engine = source.load()?;
            print_policy_check(&source, &engine)?;
            if !connect {
                return Ok(ExitCode::SUCCESS);
            }
            let (bound, failures) = connect_upstreams(&engine).await;
            let errors = print_connected_check(&bound, &failures)?;
            Ok(if errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        PolicyCommand::Explain {
            tool,
            mode,
            args,
            policy,
            connect,
        } => {
            let engine = PolicySource::from_flag(policy.as_deref()).load()?;
            let engine = if connect {
                let (bound, failures) = connect_upstreams(&engine).await;
                for (upstream, reason) in &failures {
                    eprintln!("warning: upstream {upstream}: {}", escape(reason));
                }
                bound
            } else {
                engine
            };
            explain(&engine, &tool, mode.as_deref(), args.as_deref())
        }
        PolicyCommand::Diff { old, new, json } => {
            let diff =
                proxi::policy_diff::diff(&PolicyEngine::load(&old)?, &PolicyEngine::load(&new)?);
            if json {
                out!("{}", json_for_terminal(&serde_json::to_string(&diff)?))?;
            } else {
                // Tool names and rules come from the files; keep terminals safe.
                for line in diff.to_string().lines() {
                    out!("{}", escape(line))?;
                }
            }
            Ok(if diff.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        PolicyCommand::Reload { server } => {
            let report = operator_client(&server)?.reload_policy().await?;
            out!(
                "policy reloaded: {} -> {}{}",
                report.previous_policy_hash,
                report.policy_hash,
                if report.changed { "" } else { " (unchanged)" }
            )?;
            out!("  mode: {}", escape(&report.mode))?;
            if let Some(fallback) = &report.mode_fallback {
                out!(
                    "  the new policy has no mode {}: back to {}",
                    escape(&fallback.from),
                    escape(&fallback.to)
                )?;
            }
            for warning in &report.warnings {
                out!("  warning: {}", escape(warning))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Replay {
            candidate,
            data_dir,
            store,
            since,
            json,
        } => {
            let candidate = PolicyEngine::load(&candidate)?;
            let since = since.as_deref().map(parse_since).transpose()?;
            if store.is_none() {
                let db = data_dir.join(audit::AUDIT_DB_FILE);
                if !db.exists() {
                    return Err(audit::AuditError::Missing(db).into());
                }
            }
            let reader = audit_store(store.as_deref(), &data_dir)?;
            let report = proxi::replay::replay(reader.as_ref(), &candidate, since)?;
            if json {
                // Compact: the terminal-safe form escapes newlines too.
                out!("{}", json_for_terminal(&serde_json::to_string(&report)?))?;
            } else {
                // Tool and principal names in the trail are the agent's choice.
                for line in report.to_string().lines() {
                    out!("{}", escape(line))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Connects to every upstream of `engine` and binds it to what they listed.
async fn connect_upstreams(engine: &PolicyEngine) -> (PolicyEngine, Vec<(String, String)>) {
    let discovery = proxi::catalog::discover(engine, &|name| std::env::var(name).ok()).await;
    (
        engine.bind(std::sync::Arc::new(discovery.catalog)),
        discovery.failures,
    )
}

/// `policy check --connect`'s report on the rules against the tools the upstreams
/// listed. Returns the number of errors (unreachable upstreams, constraints that
/// cannot fit, unusable schemas); the rest are warnings.
fn print_connected_check(
    engine: &PolicyEngine,
    failures: &[(String, String)],
) -> std::io::Result<usize> {
    let catalog = engine.catalog();
    let mut errors = 0;
    out!("connected:")?;
    for name in engine.upstreams().keys() {
        if let Some((_, reason)) = failures.iter().find(|(upstream, _)| upstream == name) {
            errors += 1;
            out!("  error: upstream {name}: {}", escape(reason))?;
            continue;
        }
        let prefix = format!("{name}{}", proxi::upstream::names::SEPARATOR);
        let tools: Vec<&str> = catalog
            .tools()
            .map(|(_, tool)| tool.name())
            .filter(|tool| tool.starts_with(&prefix))
            .collect();
        out!("  {name}: {} tools: {}", tools.len(), list_or_none(&tools))?;
    }
    for skipped in catalog.skipped() {
        out!(
            "  warning: left out {} tool {}: {}",
            skipped.upstream,
            escape(&format!("{:?}", skipped.tool)),
            skipped.reason
        )?;
    }
    for (upstream, left_out) in catalog.over_cap() {
        out!(
            "  warning: {upstream} lists more than {} tools; {left_out} left out",
            proxi::catalog::MAX_TOOLS_PER_UPSTREAM
        )?;
    }
    let hidden: Vec<&str> = engine
        .tools_no_mode_allows()
        .into_iter()
        .map(|tool| catalog.tool(tool).name())
        .collect();
    if !hidden.is_empty() {
        out!(
            "  warning: no mode allows (hidden from tools/list): {}",
            hidden.join(", ")
        )?;
    }
    for finding in engine.findings() {
        if finding.is_error() {
            errors += 1;
            out!("  error: {}", escape(&finding.to_string()))?;
        } else {
            out!("  warning: {}", escape(&finding.to_string()))?;
        }
    }
    for (id, mode) in engine.modes() {
        let marker = if id == engine.default_mode() {
            " (default)"
        } else {
            ""
        };
        let allowed: Vec<&str> = catalog
            .tools()
            .filter(|(tool, _)| engine.permits_tool(id, *tool))
            .map(|(_, tool)| tool.name())
            .collect();
        out!("  {}{marker} runs: {}", mode.name(), list_or_none(&allowed))?;
    }
    if errors == 0 {
        out!("connected check: ok")?;
    } else {
        out!("connected check: {errors} error(s)")?;
    }
    Ok(errors)
}

/// `proxi policy explain`: the decision `Gateway::execute` would take, from the
/// same function, for a call (with `--args`) or for the tool alone.
fn explain(
    engine: &PolicyEngine,
    tool: &str,
    mode: Option<&str>,
    args: Option<&str>,
) -> Result<ExitCode> {
    let mode_id = match mode {
        Some(name) => engine.mode_id(name).with_context(|| {
            let known: Vec<&str> = engine.modes().map(|(_, m)| m.name()).collect();
            format!("unknown mode '{name}' (modes: {})", known.join(", "))
        })?,
        None => engine.default_mode(),
    };
    let mode_name = engine.mode(mode_id).name();
    let print_denial = |denial: &Denial| {
        println!("DENIED  {tool} in {mode_name} mode");
        println!("  reason: {}", denial.reason);
        println!("  {}", engine.explain(denial));
        println!("  next: {}", engine.how_to_proceed(denial));
    };
    let print_unknown = || {
        println!("REJECTED  {tool} in {mode_name} mode");
        println!("  reason: unknown_tool");
        println!(
            "  no tool has this name; known tools: {}",
            list_or_none(&proxi::catalog::listed_names(engine))
        );
        let upstream = tool
            .split_once(proxi::upstream::names::SEPARATOR)
            .map(|(upstream, _)| upstream);
        if upstream.is_some_and(|upstream| engine.upstreams().contains_key(upstream))
            && engine.catalog().lookup(tool).is_none()
        {
            println!("  (upstream tools are known only after connecting: pass --connect)");
        }
    };
    let allowed = match args {
        None => match decision::decide_tool(engine, mode_id, tool) {
            ToolVerdict::UnknownTool => {
                print_unknown();
                false
            }
            ToolVerdict::Denied(denial) => {
                print_denial(&denial);
                println!("  (this holds whatever the arguments)");
                false
            }
            ToolVerdict::Allowed { constraints } => {
                println!(
                    "ALLOWED  {tool} in {mode_name} mode, for arguments that pass the checks below"
                );
                println!("  {tool} is in {mode_name}'s allowed_tools and is not blocked");
                let arguments = engine
                    .catalog()
                    .lookup(tool)
                    .map(|id| engine.catalog().tool(id).argument_names())
                    .unwrap_or_default();
                if !arguments.is_empty() {
                    println!(
                        "  arguments must match its JSON Schema: {}",
                        arguments.join(", ")
                    );
                }
                if constraints.is_empty() {
                    println!("  constraints: none in {mode_name} mode");
                } else {
                    println!("  constraints in {mode_name} mode:");
                    for constraint in constraints {
                        println!("    - {constraint}");
                    }
                }
                println!("  (pass --args '{{...}}' to decide one call)");
                true
            }
        },
        Some(args) => {
            let arguments: serde_json::Value =
                serde_json::from_str(args).context("--args is not valid JSON")?;
            match decision::decide_call(engine, mode_id, tool, &arguments) {
                Verdict::UnknownTool => {
                    print_unknown();
                    false
                }
                Verdict::Deny(denial) => {
                    print_denial(&denial);
                    false
                }
                Verdict::InvalidArguments(error) => {
                    println!("REJECTED  {tool} in {mode_name} mode");
                    println!("  reason: {}", decision::INVALID_ARGUMENTS);
                    println!("  {error}");
                    println!("  next: send arguments that match the tool's JSON Schema");
                    false
                }
                Verdict::Allow(_) => {
                    println!("ALLOWED  {tool} in {mode_name} mode");
                    println!(
                        "  {tool} is in {mode_name}'s allowed_tools, is not blocked, and its arguments meet every constraint"
                    );
                    true
                }
            }
        }
    };
    Ok(if allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `proxi init`: writes the starter files and says what each one is for.
fn init(dir: &Path) -> Result<ExitCode> {
    let written = proxi::starter::write_starter_files(dir)?;
    for (file, path) in proxi::starter::STARTER_FILES.iter().zip(&written) {
        println!("wrote {}: {}", path.display(), file.purpose);
    }
    println!(
        "next: cd {} && proxi policy check && proxi serve",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `policy check`'s report: what the policy enforces, as loaded (after the
/// built-in defaults are applied), so a reader sees the effective rules.
fn print_policy_check(source: &PolicySource, engine: &PolicyEngine) -> std::io::Result<()> {
    out!("{}: valid", escape(&source.to_string()))?;
    out!("  policy_hash: {}", engine.policy_hash())?;
    for (id, mode) in engine.modes() {
        let marker = if id == engine.default_mode() {
            " (default)"
        } else {
            ""
        };
        // Upstream tools are unknown offline, so such a policy is shown as written.
        let (allowed, blocked) = if engine.upstreams().is_empty() {
            (mode.allowed().names(), mode.blocked().names())
        } else {
            (mode.allowed_patterns(), mode.blocked_patterns())
        };
        out!(
            "  {}{marker}: allows {}",
            mode.name(),
            list_or_none(&allowed)
        )?;
        out!("    blocks: {}", list_or_none(&blocked))?;
        let constraints = mode.constraint_descriptions();
        if constraints.is_empty() {
            out!("    argument constraints: none")?;
        } else {
            out!("    argument constraints:")?;
            for constraint in constraints {
                out!("      {}", escape(&constraint))?;
            }
        }
    }
    let always_blocked = if engine.upstreams().is_empty() {
        engine.always_blocked().names()
    } else {
        engine.always_blocked_patterns()
    };
    out!("  always blocked: {}", list_or_none(&always_blocked))?;
    if !engine.upstreams().is_empty() {
        let names: Vec<&str> = engine.upstreams().keys().map(String::as_str).collect();
        out!(
            "  upstreams: {} (their tools are checked with --connect)",
            names.join(", ")
        )?;
        out!(
            "  built-in simulated cloud: {}",
            if engine.simulated_cloud() {
                "yes"
            } else {
                "no"
            }
        )?;
    } else {
        for finding in engine.findings() {
            out!("  warning: {}", escape(&finding.to_string()))?;
        }
    }
    out!(
        "  elevated modes last at most {}s",
        engine.max_elevated_ttl().as_secs()
    )?;
    let source = if engine.rate_limits_are_default() {
        " (built-in default: the policy has no rate_limits)"
    } else {
        ""
    };
    if engine.rate_limits().is_empty() {
        out!("  rate limits: none{source}")?;
    } else {
        out!("  rate limits{source}:")?;
        for rule in engine.rate_limits() {
            out!("    {rule}")?;
        }
    }
    Ok(())
}

/// `--since`: an RFC 3339 time, or a duration before now (`2h`, `30m`).
fn parse_since(text: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(time.to_utc());
    }
    let ago = humantime::parse_duration(text)
        .with_context(|| format!("--since {text:?}: not an RFC 3339 time or a duration"))?;
    Ok(chrono::Utc::now() - chrono::Duration::from_std(ago)?)
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "nothing".to_owned()
    } else {
        names.join(", ")
    }
}

/// The store `audit` subcommands read: PostgreSQL when `store` names it, else
/// the SQLite database in `data_dir` (which must exist).
fn audit_store(store: Option<&str>, data_dir: &Path) -> Result<Arc<dyn AuditStore>> {
    Ok(match store {
        Some(url) => Arc::new(audit::PostgresStore::connect(&postgres_url(url)?)?),
        None => Arc::new(audit::SqliteStore::open_reader(
            &data_dir.join(audit::AUDIT_DB_FILE),
        )?),
    })
}

fn postgres_url(store: &str) -> Result<String> {
    if !audit::is_postgres_url(store) {
        bail!("--store takes a postgres:// URL (without it the trail is SQLite in the data dir)");
    }
    Ok(store.to_owned())
}

async fn audit_command(command: AuditCommand) -> Result<ExitCode> {
    match command {
        AuditCommand::Verify {
            data_dir,
            operator_credential,
            store,
            json,
        } => {
            let store = audit_store(store.as_deref(), &data_dir)?;
            // The key is found the way `serve` finds it: the credential, else the data dir.
            let anchoring = match &operator_credential {
                Some(path) => OperatorCredential::load(path, Some(&data_dir))?.anchoring(),
                None => Anchoring::existing_in_data_dir(&data_dir).context(
                    "no audit key: pass --operator-credential FILE (or set PROXI_OPERATOR_CREDENTIAL)",
                )?,
            };
            let report = store.verify(Some(&anchoring))?;
            if json {
                out!(
                    "{}",
                    json_for_terminal(&serde_json::to_string_pretty(&report)?)
                )?;
            } else if let Some(broken) = &report.first_bad {
                out!(
                    "audit trail BROKEN at record {}: {}",
                    broken.seq,
                    escape(&broken.problem)
                )?;
            } else {
                out!(
                    "audit trail OK: {} records, chain head {}",
                    report.records,
                    escape(report.head.as_deref().unwrap_or("(empty)"))
                )?;
                if anchoring.is_external() {
                    out!(
                        "  every MAC checks out with audit key {}; anchored at record {}",
                        anchoring.key().id(),
                        report.anchored_seq.unwrap_or(0)
                    )?;
                } else {
                    out!(
                        "  MACs checked with the key in the data dir: this proves nothing against someone who can write the data dir (use --operator-credential)"
                    )?;
                }
            }
            Ok(if report.first_bad.is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        AuditCommand::Tail {
            data_dir,
            store,
            count,
            json,
            filters,
            follow,
            server,
            operator_credential,
        } => {
            if count == 0 || count > 100_000 {
                bail!("-n must be between 1 and 100000");
            }
            let filtered = !filters.pairs().is_empty();
            let reader = audit_store(store.as_deref(), &data_dir)?;
            let records = if filtered {
                if count > audit::MAX_QUERY_LIMIT {
                    bail!(
                        "with filters, -n must be at most {}",
                        audit::MAX_QUERY_LIMIT
                    );
                }
                reader.query(&filters.query(count)?)?.records
            } else {
                reader.recent(count)?
            };
            // An upstream call's intent that no record resolves: in flight, or cut
            // short by a crash. Shown as such, never as a plain "pending".
            let unresolved = proxi::audit_view::unresolved_intents(&records);
            let mut last_seq = 0;
            for record in records {
                let outcome = if unresolved.contains(&record.seq) {
                    proxi::audit_view::OUTCOME_UNKNOWN
                } else {
                    record.outcome.as_str()
                };
                print_record(&record, outcome, json)?;
                last_seq = record.seq;
            }
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            let client = operator_client(&ServerArgs {
                server,
                data_dir,
                operator_credential,
            })?;
            // No record printed means none matches: following from 0 misses nothing.
            follow_audit(&client, &filters, last_seq, json).await
        }
    }
}

/// Prints one record; every field may hold text the agent chose (tool names,
/// client names) or that someone with file access wrote, so nothing reaches the
/// terminal unescaped.
fn print_record(record: &audit::AuditRecord, outcome: &str, json: bool) -> std::io::Result<()> {
    if json {
        let text = serde_json::to_string(record).map_err(std::io::Error::other)?;
        out!("{}", json_for_terminal(&text))
    } else {
        out!(
            "#{:<6} {} {:<22} {:<12} {:<18} {:<9} {:<10} {:<20} {}",
            record.seq,
            escape(&record.time),
            escape(&record.principal),
            escape(&record.kind),
            escape(record.tool.as_deref().unwrap_or("-")),
            escape(&record.mode),
            escape(&record.decision),
            escape(record.reason_code.as_deref().unwrap_or("-")),
            escape(outcome)
        )
    }
}

/// `audit tail --follow`: prints records after `after` as the server commits
/// them, until interrupted or the server goes away. A stream the server ends (it
/// drops a reader that falls behind) is resumed after the last seq printed.
async fn follow_audit(
    client: &ProxiClient,
    filters: &TailFilters,
    mut after: u64,
    json: bool,
) -> Result<ExitCode> {
    let pairs = filters.pairs();
    loop {
        let mut stream = client.audit_stream(&pairs, Some(after)).await?;
        while let Some(record) = stream.next().await? {
            after = record.seq;
            print_record(&record, &record.outcome, json)?;
        }
    }
}

fn operator_client(server: &ServerArgs) -> Result<ProxiClient> {
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

async fn mode(command: ModeCommand) -> Result<ExitCode> {
    // The server's answer carries text other people chose (the reason, who
    // changed the mode): escape it all before it reaches the terminal.
    let print_status = |status: &proxi::api::PolicyStatus| -> std::io::Result<()> {
        out!("mode: {}", escape(&status.mode))?;
        if let Some(expires) = &status.emergency_expires_at {
            out!("expires at: {}", escape(expires))?;
        }
        if let Some(reason) = &status.reason {
            out!("reason: {}", escape(reason))?;
        }
        out!(
            "changed by: {} at {}",
            escape(&status.changed_by),
            escape(&status.changed_at)
        )?;
        out!(
            "allowed tools: {}",
            escape(&status.allowed_tools.join(", "))
        )?;
        out!(
            "always blocked: {}",
            escape(&status.always_blocked.join(", "))
        )
    };
    match command {
        ModeCommand::Status { server, json } => {
            let client = operator_client(&server)?;
            let status = client.policy_status().await?;
            if json {
                out!(
                    "{}",
                    json_for_terminal(&serde_json::to_string_pretty(&status)?)
                )?;
            } else {
                print_status(&status)?;
            }
        }
        ModeCommand::Set {
            mode,
            reason,
            ttl,
            server,
        } => {
            let client = operator_client(&server)?;
            let status = client
                .set_mode(&SetModeRequest {
                    mode,
                    reason,
                    ttl_seconds: ttl.map(|ttl| ttl.as_secs().max(1)),
                })
                .await?;
            print_status(&status)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints each tool call as soon as it is decided.
struct LiveTranscript;

impl AgentObserver for LiveTranscript {
    fn after_tool_call<'a>(
        &'a self,
        _step: usize,
        record: &'a ToolCallRecord,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            println!("  {}", describe_call(record));
            if let Some(message) = &record.message
                && record.decision != proxi::agent::backend::Decision::Allowed
            {
                println!("      {message}");
            }
        })
    }
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

async fn demo(args: DemoArgs) -> Result<ExitCode> {
    use std::io::IsTerminal;
    let _ = dotenvy::dotenv();
    let mut model = args.model.options();
    model.temperature = model.temperature.or(Some(proxi::demo::DEFAULT_TEMPERATURE));
    model.seed = model.seed.or(Some(proxi::demo::DEFAULT_SEED));
    let options = proxi::demo::DemoOptions {
        scenario: args.scenario,
        provider: args.model.provider.map(provider_choice),
        model,
        max_steps: args.max_steps,
        keep_data: args.keep_data,
        policy: args.policy,
        stress_switches: args.stress_switches,
    };
    let report = if args.json {
        let mut sink = proxi::demo::ProgressOnly {
            enabled: std::io::stderr().is_terminal(),
        };
        let report = proxi::demo::run(options, &mut sink).await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        report
    } else {
        let terminal = std::io::stdout().is_terminal();
        let mut sink =
            proxi::demo::TextSink::new(std::io::stdout(), terminal && !no_color(), terminal);
        proxi::demo::run(options, &mut sink).await?
    };
    Ok(if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn provider_choice(provider: ProviderArg) -> ProviderChoice {
    match provider {
        ProviderArg::Gemini => ProviderChoice::Gemini,
        ProviderArg::Openai => ProviderChoice::OpenAi,
        ProviderArg::Anthropic => ProviderChoice::Anthropic,
        ProviderArg::Ollama => ProviderChoice::Ollama,
        ProviderArg::Mock => ProviderChoice::Mock,
    }
}

fn agent_provider(args: &ModelArgs) -> Result<SelectedProvider> {
    Ok(select_provider(
        args.provider.map(provider_choice),
        &args.options(),
        non_empty_env,
    )?)
}

async fn agent(args: AgentArgs, log: LogFormat) -> Result<ExitCode> {
    // Like the seed: keys may live in .env; real environment variables win.
    let _ = dotenvy::dotenv();
    let task = args.task.join(" ");
    if task.trim().is_empty() {
        bail!("the task is empty");
    }
    let SelectedProvider {
        provider,
        description: note,
    } = agent_provider(&args.model)?;
    let server_flag = args
        .server
        .clone()
        .or_else(|| non_empty_env("PROXI_SERVER"));
    let url = resolve_server_url(server_flag.as_deref(), &args.data_dir)?;
    let token = resolve_token(std::env::var(AGENT_TOKEN_ENV).ok(), &args.data_dir, false);
    if token.is_none() {
        bail!(
            "no agent token: set {AGENT_TOKEN_ENV} or point --data-dir at the server's data dir (tokens.json)"
        );
    }
    let via = match args.via {
        Via::Rest => "rest",
        Via::Mcp => "mcp",
    };
    if args.json {
        notice(log, &format!("provider: {note}"));
    } else {
        println!("Proxi agent");
        println!("  provider: {note}");
        println!("  server:   {url} via {via}");
        println!("  task:     {task}");
        println!();
    }
    let config = AgentConfig {
        max_steps: args.max_steps,
        ..AgentConfig::default()
    };
    let live = LiveTranscript;
    let observer: Option<&dyn AgentObserver> = (!args.json).then_some(&live as &dyn AgentObserver);
    let server = proxi::agent::run::ServerConnection {
        url,
        token,
        transport: match args.via {
            Via::Rest => proxi::agent::run::Transport::Rest,
            Via::Mcp => proxi::agent::run::Transport::Mcp,
        },
    };
    let result =
        proxi::agent::run::run_task(provider.as_ref(), &server, config, observer, &task).await;
    let (record, failure) = match result {
        Ok(record) => (record, None),
        Err(failure) => (*failure.record, Some(failure.error)),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else if !record.steps.is_empty() || failure.is_none() {
        print_summary(&record);
    }
    if let Some(error) = failure {
        report_error(log, &error.to_string());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::from(record.exit_code()))
}

fn print_summary(record: &RunRecord) {
    let calls = record.tool_calls().count();
    if calls == 0 {
        println!("  (no tool calls)");
    }
    println!();
    if record.outcome != RunOutcome::Failed {
        println!("{}", record.final_answer);
        println!();
    }
    println!(
        "{} step(s), {calls} tool call(s); mode at start: {}",
        record.steps.len(),
        if record.mode_at_start.is_empty() {
            "unknown"
        } else {
            &record.mode_at_start
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_needs_a_terminal_and_no_no_color() {
        assert!(colours_allowed(true, None));
        assert!(colours_allowed(true, Some(OsStr::new(""))));
        assert!(!colours_allowed(true, Some(OsStr::new("1"))));
        assert!(!colours_allowed(false, None));
    }
}
