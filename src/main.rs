//! The `proxi` command line: a thin layer over the library. Each subcommand
//! lives in its own module under `cli/`; this file parses the flags and
//! dispatches.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod cli;

use cli::agent::AgentArgs;
use cli::audit::AuditCommand;
use cli::credential::CredentialCommand;
use cli::demo::DemoArgs;
use cli::logging::{LogFormat, init_logging, report_error};
use cli::mcp::McpArgs;
use cli::mode::ModeCommand;
use cli::policy::PolicyCommand;
use cli::serve::ServeArgs;
use cli::token::TokenCommand;

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
    /// List and decide the approvals of a running server (operator token).
    #[command(subcommand)]
    Approvals(cli::approvals::ApprovalsCommand),
    /// Run the demo: twelve scenarios (blocked and allowed actions, mode changes, bad
    /// input, a stress test, an approved call, an elevation request) against an
    /// in-process server, checked against its audit trail (no API key needed).
    Demo(DemoArgs),
    /// Manage the operator credential (operator token and audit key, kept outside the data dir).
    #[command(subcommand)]
    Credential(CredentialCommand),
    /// Issue, list and revoke the tokens of named operators and agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Write a starter policy and an example upstream policy into DIR to edit.
    Init {
        /// Directory to write into; created if missing. Existing files are never overwritten.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
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
        | Command::Approvals(_)
        | Command::Init { .. }
        | Command::Credential(_)
        | Command::Token(_) => "warn",
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let log = cli.log_format;
    match cli.command {
        Command::Serve(args) => cli::serve::run(args, log).await,
        Command::Mcp(args) => cli::mcp::run(args, log).await,
        Command::Policy(command) => cli::policy::run(command).await,
        Command::Credential(command) => cli::credential::run(command),
        Command::Token(command) => cli::token::run(command),
        Command::Audit(command) => cli::audit::run(command).await,
        Command::Mode(command) => cli::mode::run(command).await,
        Command::Approvals(command) => cli::approvals::run(command).await,
        Command::Demo(args) => cli::demo::run(args).await,
        Command::Agent(args) => cli::agent::run(args, log).await,
        Command::Init { dir } => cli::init::run(&dir),
    }
}
