//! Policy reloads from the command line: `proxi policy reload` (a client of
//! `POST /policy/reload`) and the triggers `proxi serve` starts (SIGHUP, `--watch`).

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Result, bail};

use proxi::gateway::Gateway;
use proxi::policy_source::PolicySource;
use proxi::text::escape;

use super::{ServerArgs, operator_client};

/// `proxi policy reload`: asks the server to read its policy file again and
/// prints both versions; a refused file is an error listing its problems.
pub(crate) async fn run(server: ServerArgs) -> Result<ExitCode> {
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
    let upstreams = &report.upstreams;
    for (what, names) in [
        ("started", &upstreams.added),
        ("stopped", &upstreams.removed),
        ("restarted", &upstreams.restarted),
    ] {
        if !names.is_empty() {
            out!("  upstreams {what}: {}", escape(&names.join(", ")))?;
        }
    }
    for warning in &report.warnings {
        out!("  warning: {}", escape(warning))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Remembers the policy file for reloads and starts what triggers them: SIGHUP,
/// and with `--watch` the file's changes. The built-in policy has no file to reload.
pub(crate) fn start_reloaders(
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
