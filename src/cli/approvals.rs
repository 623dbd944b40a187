//! `proxi approvals`: list the approvals of a running server and decide them
//! (operator token required).

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Subcommand;

use proxi::api::{Approval, ApprovalStatus};
use proxi::text::{escape, json_for_terminal};

use super::{ServerArgs, operator_client};

#[derive(Subcommand)]
pub(crate) enum ApprovalsCommand {
    /// List approvals, newest first.
    List {
        /// Only these: pending, approved, denied, expired or consumed.
        #[arg(long, default_value = "pending")]
        status: String,
        /// At most this many (1 to 500).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Approve a pending approval: the identical call may then run once.
    Approve {
        /// The approval id (apr_...).
        id: String,
        /// Why (required; recorded in the audit trail with your name).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Deny a pending approval: the identical call is refused.
    Deny {
        /// The approval id (apr_...).
        id: String,
        /// Why (required; recorded in the audit trail with your name).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Runs `proxi approvals` against the running server.
pub(crate) async fn run(command: ApprovalsCommand) -> Result<ExitCode> {
    match command {
        ApprovalsCommand::List {
            status,
            limit,
            json,
            server,
        } => {
            let status = match status.as_str() {
                "all" => None,
                text => match ApprovalStatus::parse(text) {
                    Some(status) => Some(status),
                    None => {
                        bail!("--status takes pending, approved, denied, expired, consumed or all")
                    }
                },
            };
            let list = operator_client(&server)?.approvals(status, limit).await?;
            if json {
                out!(
                    "{}",
                    json_for_terminal(&serde_json::to_string_pretty(&list)?)
                )?;
            } else if list.approvals.is_empty() {
                out!("no approvals")?;
            } else {
                for approval in &list.approvals {
                    print_approval(approval)?;
                }
            }
        }
        ApprovalsCommand::Approve { id, reason, server } => {
            let approval = operator_client(&server)?
                .decide_approval(&id, true, &reason)
                .await?;
            print_approval(&approval)?;
        }
        ApprovalsCommand::Deny { id, reason, server } => {
            let approval = operator_client(&server)?
                .decide_approval(&id, false, &reason)
                .await?;
            print_approval(&approval)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One approval, every field someone else chose escaped for the terminal.
fn print_approval(approval: &Approval) -> std::io::Result<()> {
    out!(
        "{} {} {} {} by {} in {} (expires {})",
        escape(&approval.id),
        approval.status,
        approval.binding.kind.as_str(),
        escape(&approval.binding.target),
        escape(&approval.binding.principal),
        escape(&approval.mode),
        approval.expires_at.to_rfc3339()
    )?;
    out!("    arguments: {}", escape(&approval.arguments.to_string()))?;
    if let Some(reason) = &approval.reason {
        out!("    reason: {}", escape(reason))?;
    }
    if let Some(by) = &approval.decided_by {
        out!(
            "    decided by {}: {}",
            escape(by),
            escape(approval.decision_reason.as_deref().unwrap_or(""))
        )?;
    }
    Ok(())
}
