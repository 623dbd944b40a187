//! `proxi agent`: the SRE agent on one task, through the governed tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};

use proxi::agent::select::{SelectedProvider, select_provider};
use proxi::agent::{
    AgentConfig, AgentObserver, ApprovalResult, DEFAULT_MAX_STEPS, RunOutcome, RunRecord,
    ToolCallRecord, describe_call,
};
use proxi::client::{resolve_server_url, resolve_token};
use proxi::tokens::AGENT_TOKEN_ENV;

use super::logging::{LogFormat, notice, report_error};
use super::model::{ModelArgs, provider_choice};
use super::{non_empty_env, parse_max_steps};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Via {
    Rest,
    Mcp,
}

#[derive(Args)]
pub(crate) struct AgentArgs {
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
    /// How long to wait for an operator to decide a call that needs a human's
    /// approval (e.g. 30s, 5m, 1h; 0s reports the pending approval at once). The
    /// approved call is then made once; a denial, an expiry or the timeout is reported.
    #[arg(long, default_value = "5m", value_parser = parse_approval_timeout)]
    approval_timeout: std::time::Duration,
    /// Data dir to read server.json and tokens.json from.
    #[arg(long, default_value = "./proxi-data")]
    data_dir: PathBuf,
}

/// Prints each tool call as soon as it is decided.
struct LiveTranscript;

impl AgentObserver for LiveTranscript {
    fn waiting_for_approval<'a>(
        &'a self,
        notice: &'a proxi::agent::ApprovalNotice,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            println!(
                "  step {}: {} {} needs a human's approval: {}",
                notice.step,
                notice.tool,
                proxi::agent::canonical_json(&notice.arguments),
                notice.approval_id
            );
            println!(
                "      waiting up to {} for an operator to run: {}",
                humantime::format_duration(notice.timeout),
                notice.operator_command()
            );
        })
    }

    fn after_tool_call<'a>(
        &'a self,
        _step: usize,
        record: &'a ToolCallRecord,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            println!("  {}", describe_call(record));
            if let Some(wait) = &record.approval {
                println!(
                    "      approval {}: {}",
                    wait.approval_id,
                    match wait.result {
                        ApprovalResult::Approved =>
                            "approved by an operator; the call was made once",
                        ApprovalResult::Denied => "DENIED by an operator; the call did not run",
                        ApprovalResult::Expired =>
                            "EXPIRED before an operator decided; the call did not run",
                        ApprovalResult::TimedOut =>
                            "no decision within --approval-timeout; the call did not run",
                        ApprovalResult::Other => "the server's answer changed (see below)",
                    }
                );
            }
            if let Some(message) = &record.message
                && record.decision != proxi::agent::backend::Decision::Allowed
            {
                println!("      {message}");
            }
        })
    }
}

/// Under `--json` stdout is the run record only: approval waits go to stderr.
struct StderrNotices(LogFormat);

impl AgentObserver for StderrNotices {
    fn after_tool_call<'a>(
        &'a self,
        _step: usize,
        _record: &'a ToolCallRecord,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn waiting_for_approval<'a>(
        &'a self,
        wait: &'a proxi::agent::ApprovalNotice,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            notice(
                self.0,
                &format!(
                    "{} needs a human's approval: {}; waiting up to {} for an operator to run: {}",
                    wait.tool,
                    wait.approval_id,
                    humantime::format_duration(wait.timeout),
                    wait.operator_command()
                ),
            );
        })
    }
}

fn agent_provider(args: &ModelArgs) -> Result<SelectedProvider> {
    Ok(select_provider(
        args.provider.map(provider_choice),
        &args.options(),
        non_empty_env,
    )?)
}

/// Runs `proxi agent`; the exit code follows the run's outcome.
pub(crate) async fn run(args: AgentArgs, log: LogFormat) -> Result<ExitCode> {
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
        approval_timeout: (!args.approval_timeout.is_zero()).then_some(args.approval_timeout),
        ..AgentConfig::default()
    };
    let live = LiveTranscript;
    let quiet = StderrNotices(log);
    let observer: &dyn AgentObserver = if args.json { &quiet } else { &live };
    let observer = Some(observer);
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

/// `--approval-timeout`: a duration such as `30s`, `5m` or `1h` (humantime's grammar).
fn parse_approval_timeout(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|error| format!("{error}; give a duration with a unit, such as 30s, 5m or 1h"))
}

#[cfg(test)]
mod tests {
    use super::parse_approval_timeout;
    use std::time::Duration;

    #[test]
    fn approval_timeouts_are_durations_with_units() {
        assert_eq!(parse_approval_timeout("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_approval_timeout("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_approval_timeout("0s"), Ok(Duration::ZERO));
        assert!(parse_approval_timeout("5").is_err());
        assert!(parse_approval_timeout("soon").is_err());
    }
}
