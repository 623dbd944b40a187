//! `proxi mode`: show or change the mode of a running server.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;

use proxi::api::SetModeRequest;
use proxi::text::{escape, json_for_terminal};

use super::{ServerArgs, operator_client, parse_ttl};

#[derive(Subcommand)]
pub(crate) enum ModeCommand {
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

/// Runs `proxi mode` against the running server.
pub(crate) async fn run(command: ModeCommand) -> Result<ExitCode> {
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
