//! The `proxi` command line: a thin layer over the library.

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
use proxi::api::SetModeRequest;
use proxi::audit::{self, Durability};
use proxi::client::{ProxiClient, resolve_server_url, resolve_token};
use proxi::gateway::{Gateway, GatewayConfig};
use proxi::policy::{Decision, PolicyEngine};
use proxi::server::{AppState, BoundServer};
use proxi::tokens::{AGENT_TOKEN_ENV, OPERATOR_TOKEN_ENV, Tokens};
use proxi::tools::{ToolCall, ToolName};

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
    /// Policy file (default: the shipped policy, built in).
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
    /// Policy file.
    #[arg(long, default_value = "policies/ops_policy.json")]
    policy: PathBuf,
    /// Where the audit trail, tokens and lock file live.
    #[arg(long, default_value = "./proxi-data")]
    data_dir: PathBuf,
    /// `full`: answer only after the audit record is fsynced; `process`: after commit (survives kill -9, not power loss).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Full)]
    durability: DurabilityArg,
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
    #[command(flatten)]
    state: StateArgs,
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
        /// The policy file.
        file: PathBuf,
    },
    /// Show how the policy decides one call.
    Explain {
        /// Tool name, e.g. restart_service.
        tool: String,
        /// Mode to decide in (default: the policy's default mode).
        #[arg(long)]
        mode: Option<String>,
        /// Arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Policy file.
        #[arg(long, default_value = "policies/ops_policy.json")]
        policy: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the hash chain and name the first bad record.
    Verify {
        #[arg(long, default_value = "./proxi-data")]
        data_dir: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the newest records.
    Tail {
        #[arg(long, default_value = "./proxi-data")]
        data_dir: PathBuf,
        /// How many records.
        #[arg(short = 'n', long = "lines", default_value_t = 20)]
        count: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ServerArgs {
    /// Server URL (default: the data dir's server.json, else http://127.0.0.1:8000).
    #[arg(long, env = "PROXI_SERVER")]
    server: Option<String>,
    /// Data dir to read server.json and tokens.json from.
    #[arg(long, default_value = "./proxi-data")]
    data_dir: PathBuf,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Logs go to stderr so stdout stays clean for data (and for MCP over stdio).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            init_logging("info,rmcp=warn");
            serve(args).await
        }
        Command::Mcp(args) => {
            init_logging("info,rmcp=warn");
            mcp(args).await
        }
        Command::Policy(command) => policy(command),
        Command::Audit(command) => audit_command(command),
        Command::Mode(command) => mode(command).await,
        Command::Demo(args) => {
            init_logging("warn,rmcp=off");
            demo(args).await
        }
        Command::Agent(args) => {
            // rmcp logs transport failures that the agent already reports as errors.
            init_logging("warn,rmcp=off");
            agent(args).await
        }
    }
}

async fn open_gateway(state: &StateArgs) -> Result<(Arc<Gateway>, Tokens, Option<PathBuf>)> {
    let policy = PolicyEngine::load(&state.policy)?;
    let gateway = Gateway::open(
        policy,
        GatewayConfig {
            data_dir: state.data_dir.clone(),
            durability: state.durability.into(),
        },
    )
    .await?;
    let (tokens, sources) = Tokens::resolve(
        &state.data_dir,
        std::env::var(OPERATOR_TOKEN_ENV).ok(),
        std::env::var(AGENT_TOKEN_ENV).ok(),
    )?;
    Ok((gateway, tokens, sources.file))
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let (gateway, tokens, token_file) = open_gateway(&args.state).await?;
    let bound = BoundServer::bind(args.bind).await?;
    bound
        .advertise(gateway.data_dir())
        .context("cannot write server.json to the data dir")?;
    let mode = gateway.status().mode;
    eprintln!(
        "Proxi {} listening on {}",
        env!("CARGO_PKG_VERSION"),
        bound.url()
    );
    eprintln!("  policy:    {}", args.state.policy.display());
    eprintln!("  mode:      {mode}");
    eprintln!("  audit:     {}", gateway.audit().db_path().display());
    match token_file {
        Some(path) => eprintln!(
            "  tokens:    generated tokens are in {} (mode 0600)",
            path.display()
        ),
        None => eprintln!("  tokens:    from {OPERATOR_TOKEN_ENV} and {AGENT_TOKEN_ENV}"),
    }
    let state = AppState {
        gateway,
        tokens: Arc::new(tokens),
    };
    bound.serve_app(state, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn mcp(args: McpArgs) -> Result<ExitCode> {
    let (gateway, tokens, _) = open_gateway(&args.state).await?;
    let bound = BoundServer::bind(args.bind).await?;
    bound
        .advertise(gateway.data_dir())
        .context("cannot write server.json to the data dir")?;
    // Stdout belongs to the protocol: everything for humans goes to stderr.
    eprintln!(
        "Proxi {} serving MCP on stdio; operators reach this process at {}",
        env!("CARGO_PKG_VERSION"),
        bound.url()
    );
    let state = AppState {
        gateway: gateway.clone(),
        tokens: Arc::new(tokens),
    };
    let stop = CancellationToken::new();
    let mut http = tokio::spawn(bound.serve_app(state, stop.clone().cancelled_owned()));
    let stdio = proxi::mcp::stdio::serve(gateway, stop.clone());
    let outcome = tokio::select! {
        served = stdio => served.map_err(anyhow::Error::from),
        () = shutdown_signal() => Ok(()),
        ended = &mut http => Err(match ended {
            Ok(Ok(())) => anyhow::anyhow!("the HTTP server stopped unexpectedly"),
            Ok(Err(error)) => error.into(),
            Err(error) => error.into(),
        }),
    };
    stop.cancel();
    if !http.is_finished() {
        http.await??;
    }
    outcome.map(|()| ExitCode::SUCCESS)
}

async fn shutdown_signal() {
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
    eprintln!("shutting down");
}

fn policy(command: PolicyCommand) -> Result<ExitCode> {
    match command {
        PolicyCommand::Check { file } => {
            let engine = PolicyEngine::load(&file)?;
            println!("{}: valid", file.display());
            for (id, mode) in engine.modes() {
                let marker = if id == engine.default_mode() {
                    " (default)"
                } else {
                    ""
                };
                println!(
                    "  {}{marker}: allows {}",
                    mode.name(),
                    list_or_none(&mode.allowed().names())
                );
            }
            println!(
                "  always blocked: {}",
                list_or_none(&engine.always_blocked().names())
            );
            println!(
                "  elevated modes last at most {}s",
                engine.max_elevated_ttl().as_secs()
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Explain {
            tool,
            mode,
            args,
            policy,
        } => {
            let engine = PolicyEngine::load(&policy)?;
            let mode_id = match &mode {
                Some(name) => engine.mode_id(name).with_context(|| {
                    let known: Vec<&str> = engine.modes().map(|(_, m)| m.name()).collect();
                    format!("unknown mode '{name}' (modes: {})", known.join(", "))
                })?,
                None => engine.default_mode(),
            };
            let mode_name = engine.mode(mode_id).name();
            let Some(tool_name) = ToolName::parse(&tool) else {
                println!("DENIED  {tool} in {mode_name} mode");
                println!("  reason: unknown_tool");
                println!(
                    "  known tools: {}",
                    ToolName::ALL.map(ToolName::as_str).join(", ")
                );
                return Ok(ExitCode::from(1));
            };
            let arguments: serde_json::Value =
                serde_json::from_str(&args).context("--args is not valid JSON")?;
            let call = match ToolCall::parse(tool_name, &arguments) {
                Ok(call) => call,
                Err(error) => {
                    println!("REJECTED  {tool} in {mode_name} mode");
                    println!("  reason: invalid_arguments");
                    println!("  {error}");
                    return Ok(ExitCode::from(1));
                }
            };
            match engine.decide(mode_id, &call) {
                Decision::Allow => {
                    println!("ALLOWED  {tool} in {mode_name} mode");
                    println!(
                        "  {tool} is in {mode_name}'s allowed_tools, is not blocked, and its arguments meet every constraint"
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Decision::Deny(denial) => {
                    println!("DENIED  {tool} in {mode_name} mode");
                    println!("  reason: {}", denial.reason);
                    println!("  {}", engine.explain(&denial));
                    println!("  next: {}", engine.how_to_proceed(&denial));
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "nothing".to_owned()
    } else {
        names.join(", ")
    }
}

fn audit_db(data_dir: &Path) -> PathBuf {
    data_dir.join(audit::AUDIT_DB_FILE)
}

fn audit_command(command: AuditCommand) -> Result<ExitCode> {
    match command {
        AuditCommand::Verify { data_dir, json } => {
            let report = audit::verify(&audit_db(&data_dir))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if let Some(broken) = &report.first_bad {
                println!(
                    "audit trail BROKEN at record {}: {}",
                    broken.seq, broken.problem
                );
            } else {
                println!(
                    "audit trail OK: {} records, chain head {}",
                    report.records,
                    report.head.as_deref().unwrap_or("(empty)")
                );
            }
            Ok(if report.first_bad.is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        AuditCommand::Tail {
            data_dir,
            count,
            json,
        } => {
            if count == 0 || count > 100_000 {
                bail!("-n must be between 1 and 100000");
            }
            for record in audit::read_recent(&audit_db(&data_dir), count)? {
                if json {
                    println!("{}", serde_json::to_string(&record)?);
                } else {
                    println!(
                        "#{:<6} {} {:<22} {:<12} {:<18} {:<9} {:<10} {:<20} {}",
                        record.seq,
                        record.time,
                        record.principal,
                        record.kind,
                        record.tool.as_deref().unwrap_or("-"),
                        record.mode,
                        record.decision,
                        record.reason_code.as_deref().unwrap_or("-"),
                        record.outcome
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn operator_client(server: &ServerArgs) -> Result<ProxiClient> {
    let url = resolve_server_url(server.server.as_deref(), &server.data_dir);
    let token = resolve_token(
        std::env::var(OPERATOR_TOKEN_ENV).ok(),
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
    let print_status = |status: &proxi::api::PolicyStatus| {
        println!("mode: {}", status.mode);
        if let Some(expires) = &status.emergency_expires_at {
            println!("expires at: {expires}");
        }
        if let Some(reason) = &status.reason {
            println!("reason: {reason}");
        }
        println!("changed by: {} at {}", status.changed_by, status.changed_at);
        println!("allowed tools: {}", status.allowed_tools.join(", "));
        println!("always blocked: {}", status.always_blocked.join(", "));
    };
    match command {
        ModeCommand::Status { server, json } => {
            let client = operator_client(&server)?;
            let status = client.policy_status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
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
            print_status(&status);
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
        let mut sink = proxi::demo::TextSink::new(std::io::stdout(), terminal, terminal);
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

async fn agent(args: AgentArgs) -> Result<ExitCode> {
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
    let url = resolve_server_url(server_flag.as_deref(), &args.data_dir);
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
        eprintln!("provider: {note}");
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
        eprintln!("error: {error}");
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
