//! `proxi audit`: verify the trail and print its records.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use proxi::anchor::Anchoring;
use proxi::audit;
use proxi::client::ProxiClient;
use proxi::credential::OperatorCredential;
use proxi::text::{escape, json_for_terminal};

use super::{ServerArgs, audit_store, operator_client};

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
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
pub(crate) struct TailFilters {
    /// Only this principal (e.g. `agent`, `operator`).
    #[arg(long)]
    principal: Option<String>,
    /// Only this kind (`tool_call`, `mode_change`, `mode_expired`, `mode_drained`,
    /// `auth_refused`, `incident`, `policy_reload`, `approval`, `console_login`,
    /// `console_logout`).
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
        let query = audit::AuditQuery {
            principal: self.principal.clone(),
            kind: self.kind.clone(),
            tool: self.tool.clone(),
            decision: self.decision.clone(),
            reason_code: self.reason_code.clone(),
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
            after_seq: None,
            limit,
        };
        query.check()?;
        Ok(query)
    }
}

/// Runs `proxi audit`; `verify` exits 1 on a broken trail.
pub(crate) async fn run(command: AuditCommand) -> Result<ExitCode> {
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
                print_record(&proxi::api::AuditRecord::from(&record), outcome, json)?;
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

/// Prints one record (`--json`: as `GET /audit` sends it); every field may hold text the agent chose (tool names,
/// client names) or that someone with file access wrote, so nothing reaches the
/// terminal unescaped.
fn print_record(
    record: &proxi::api::AuditRecord,
    outcome: &str,
    json: bool,
) -> std::io::Result<()> {
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
