//! `proxi policy`: check, explain, diff and replay a policy.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;

use proxi::audit;
use proxi::decision::{self, ToolVerdict, Verdict};
use proxi::policy::{Denial, PolicyEngine};
use proxi::policy_source::PolicySource;
use proxi::text::{escape, json_for_terminal};

use super::audit_store;

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
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
        server: super::ServerArgs,
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

/// Runs `proxi policy`; exit code 1 means a finding (errors, changes, a denial).
pub(crate) async fn run(command: PolicyCommand) -> Result<ExitCode> {
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
        PolicyCommand::Reload { server } => super::reload::run(server).await,
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
                    println!("  reason: {}", proxi::reason::Reason::InvalidArguments);
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
        for (tools, rule) in mode.approval_rules() {
            let ttl = mode.approval_ttl().as_secs();
            out!("    needs approval: {tools} {rule} (expires after {ttl} s)")?;
        }
        for rule in engine.guards(id).rules() {
            out!("    guard: {}", escape(&rule.to_string()))?;
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
