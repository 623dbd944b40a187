//! The approval store in PostgreSQL, shared by every instance on one `--store`
//! (docs/scale-out.md). Same life cycle as [`super::sqlite::SqliteApprovals`]:
//! every transition is one conditional `UPDATE ... RETURNING`, so an approval is
//! consumed at most once and expired exactly once, whichever instance gets there.
//!
//! No TLS: the connection is for loopback or a trusted network, as for the trail.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{
    Approval, ApprovalError, ApprovalKind, ApprovalStatus, ApprovalStore, Binding, NewApproval,
    Verdict, new_id,
};

/// The advisory lock that serializes creations across instances, so the pending
/// cap and "identical requests share one approval" hold for the whole cluster
/// (the audit store uses 0x70726f7869 and the next number).
const CREATE_LOCK: i64 = 0x70_72_6f_78_69 + 16;
/// The advisory lock that serializes migrations of instances starting together.
const MIGRATION_LOCK: i64 = CREATE_LOCK + 1;
/// Longest wait for one store operation before it counts as failed (and the
/// caller denies).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections per instance: approvals are rare, a few suffice.
const POOL_SIZE: usize = 4;

/// The columns an insert writes, in the order `approval`/`raw_row` reads them.
macro_rules! inserted_columns {
    () => {
        "id, status, kind, principal, role, target, arguments_digest, policy_hash, \
         arguments, mode, reason, created_ms, expires_ms, decided_by, decided_ms, decision_reason"
    };
}
const COLUMNS: &str = inserted_columns!();
/// What a read selects: every inserted column and whether the decision is recorded.
const SELECTED: &str = concat!(inserted_columns!(), ", decision_recorded");

/// Tables and indexes; every statement is idempotent, run at every start.
const MIGRATIONS: &str = r#"
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT COLLATE "C" PRIMARY KEY,
    status TEXT COLLATE "C" NOT NULL,
    kind TEXT COLLATE "C" NOT NULL,
    principal TEXT COLLATE "C" NOT NULL,
    role TEXT COLLATE "C" NOT NULL,
    target TEXT COLLATE "C" NOT NULL,
    arguments_digest TEXT COLLATE "C" NOT NULL,
    policy_hash TEXT COLLATE "C" NOT NULL,
    arguments TEXT NOT NULL,
    mode TEXT NOT NULL,
    reason TEXT,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    decided_by TEXT,
    decided_ms BIGINT,
    decision_reason TEXT,
    -- Insertion order, to break ties between approvals created in one millisecond.
    row_order BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX IF NOT EXISTS approvals_by_binding
    ON approvals (kind, principal, role, target, arguments_digest, created_ms);
CREATE INDEX IF NOT EXISTS approvals_by_status ON approvals (status, expires_ms);
-- False from a decision until its audit record is durable (only then is it in
-- effect); rows from before the column were recorded before anyone heard of them.
ALTER TABLE approvals ADD COLUMN IF NOT EXISTS decision_recorded BOOLEAN NOT NULL DEFAULT TRUE;
"#;

/// Approvals in a PostgreSQL database shared by every instance.
pub struct PostgresApprovals {
    /// Its connections, on a runtime of their own (blocking callers, any thread).
    client: crate::postgres_pool::BlockingPool,
}

impl std::fmt::Debug for PostgresApprovals {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PostgresApprovals")
            .finish_non_exhaustive()
    }
}

/// A store failure as callers see it: what failed, never the statement.
fn server_error(error: tokio_postgres::Error) -> ApprovalError {
    let detail = match error.as_db_error() {
        Some(db) => db.code().code().to_owned(),
        None => "connection failed".to_owned(),
    };
    ApprovalError::Postgres(detail)
}

/// What callers see when an operation could not be run: what failed, in words.
fn pool_failure(failure: crate::postgres_pool::PoolFailure) -> ApprovalError {
    use crate::postgres_pool::PoolFailure;
    ApprovalError::Postgres(match failure {
        PoolFailure::Runtime(error) => format!("no client runtime: {error}"),
        PoolFailure::Build(error) => error,
        PoolFailure::Closed => "store closed".to_owned(),
        PoolFailure::Timeout(timeout) => format!("no answer within {timeout:?}"),
        PoolFailure::ThreadFailed => "client thread failed".to_owned(),
    })
}

impl PostgresApprovals {
    /// Connects to the database at `url` (`postgres://USER@HOST:PORT/DB`) and runs
    /// the migrations. Fails if the server cannot be reached now.
    pub fn connect(url: &str) -> Result<PostgresApprovals, ApprovalError> {
        let config = crate::postgres_pool::config(url, "proxi-approvals")
            .map_err(|_| ApprovalError::Postgres("invalid store URL".to_owned()))?;
        let client = crate::postgres_pool::BlockingPool::new(
            config,
            "proxi-approvals-pg",
            POOL_SIZE,
            OPERATION_TIMEOUT,
        )
        .map_err(pool_failure)?;
        let store = PostgresApprovals { client };
        store.run(|mut client| async move {
            let transaction = client.transaction().await.map_err(server_error)?;
            transaction
                .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(server_error)?;
            transaction
                .batch_execute(MIGRATIONS)
                .await
                .map_err(server_error)?;
            transaction.commit().await.map_err(server_error)
        })?;
        Ok(store)
    }

    /// Runs `work` with a pooled connection on the store's runtime and waits for
    /// it, bounded by [`OPERATION_TIMEOUT`]. Callable from any thread.
    fn run<T, F, Work>(&self, work: Work) -> Result<T, ApprovalError>
    where
        T: Send,
        F: Future<Output = Result<T, ApprovalError>> + Send,
        Work: FnOnce(deadpool_postgres::Object) -> F + Send,
    {
        let pool = self.client.pool();
        let attempt = async move {
            let client = pool
                .get()
                .await
                .map_err(|error| ApprovalError::Postgres(format!("no connection: {error}")))?;
            work(client).await
        };
        self.client
            .run(OPERATION_TIMEOUT, attempt)
            .unwrap_or_else(|failure| Err(pool_failure(failure)))
    }
}

fn millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

fn from_millis(ms: i64) -> Result<DateTime<Utc>, ApprovalError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| ApprovalError::Corrupt(format!("timestamp {ms}")))
}

fn approval(row: &Row) -> Result<Approval, ApprovalError> {
    let text = |index: usize| row.try_get::<_, String>(index).map_err(server_error);
    let optional = |index: usize| {
        row.try_get::<_, Option<String>>(index)
            .map_err(server_error)
    };
    let id = text(0)?;
    let corrupt = |what: &str| ApprovalError::Corrupt(format!("{what} of {id}"));
    let status = ApprovalStatus::parse(&text(1)?).ok_or_else(|| corrupt("status"))?;
    let kind = ApprovalKind::parse(&text(2)?).ok_or_else(|| corrupt("kind"))?;
    let arguments = serde_json::from_str(&text(8)?).map_err(|_| corrupt("arguments"))?;
    let created_ms: i64 = row.try_get(11).map_err(server_error)?;
    let expires_ms: i64 = row.try_get(12).map_err(server_error)?;
    let decided_ms: Option<i64> = row.try_get(14).map_err(server_error)?;
    let decision_recorded: bool = row.try_get(16).map_err(server_error)?;
    Ok(Approval {
        status,
        binding: Binding {
            kind,
            principal: text(3)?,
            role: text(4)?,
            target: text(5)?,
            arguments_digest: text(6)?,
            policy_hash: text(7)?,
        },
        arguments,
        mode: text(9)?,
        reason: optional(10)?,
        created_at: from_millis(created_ms)?,
        expires_at: from_millis(expires_ms)?,
        decided_by: optional(13)?,
        decided_at: decided_ms.map(from_millis).transpose()?,
        decision_reason: optional(15)?,
        decision_recorded,
        id,
    })
}

async fn select_one(
    client: &impl GenericClient,
    sql_tail: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Approval>, ApprovalError> {
    let sql = format!("SELECT {SELECTED} FROM approvals {sql_tail}");
    client
        .query_opt(&sql, params)
        .await
        .map_err(server_error)?
        .as_ref()
        .map(approval)
        .transpose()
}

async fn select_many(
    client: &impl GenericClient,
    sql_tail: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Approval>, ApprovalError> {
    let sql = format!("SELECT {SELECTED} FROM approvals {sql_tail}");
    client
        .query(&sql, params)
        .await
        .map_err(server_error)?
        .iter()
        .map(approval)
        .collect()
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl ApprovalStore for PostgresApprovals {
    fn create(
        &self,
        request: NewApproval,
        max_pending: usize,
    ) -> Result<(Approval, bool), ApprovalError> {
        let id = new_id()?;
        let arguments = serde_json::to_string(&request.arguments)
            .map_err(|error| ApprovalError::Corrupt(error.to_string()))?;
        self.run(|mut client| async move {
            let transaction = client.transaction().await.map_err(server_error)?;
            transaction
                .execute("SELECT pg_advisory_xact_lock($1)", &[&CREATE_LOCK])
                .await
                .map_err(server_error)?;
            let binding = &request.binding;
            let now = millis(request.created_at);
            let existing = select_one(
                &transaction,
                "WHERE status = 'pending' AND expires_ms > $1 AND kind = $2 AND principal = $3 \
                 AND role = $4 AND target = $5 AND arguments_digest = $6 AND policy_hash = $7 \
                 ORDER BY created_ms DESC, row_order DESC LIMIT 1",
                &[
                    &now,
                    &binding.kind.as_str(),
                    &binding.principal,
                    &binding.role,
                    &binding.target,
                    &binding.arguments_digest,
                    &binding.policy_hash,
                ],
            )
            .await?;
            if let Some(existing) = existing {
                return Ok((existing, false));
            }
            let pending: i64 = transaction
                .query_one(
                    "SELECT COUNT(*) FROM approvals WHERE status = 'pending' AND expires_ms > $1",
                    &[&now],
                )
                .await
                .and_then(|row| row.try_get(0))
                .map_err(server_error)?;
            if usize::try_from(pending).unwrap_or(usize::MAX) >= max_pending {
                return Err(ApprovalError::TooManyPending(max_pending));
            }
            let row = transaction
                .query_one(
                    &format!(
                        "INSERT INTO approvals ({COLUMNS}) VALUES \
                         ($1, 'pending', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
                         NULL, NULL, NULL) RETURNING {SELECTED}"
                    ),
                    &[
                        &id,
                        &binding.kind.as_str(),
                        &binding.principal,
                        &binding.role,
                        &binding.target,
                        &binding.arguments_digest,
                        &binding.policy_hash,
                        &arguments,
                        &request.mode,
                        &request.reason,
                        &now,
                        &millis(request.expires_at),
                    ],
                )
                .await
                .map_err(server_error)?;
            let created = approval(&row)?;
            transaction.commit().await.map_err(server_error)?;
            Ok((created, true))
        })
    }

    fn get(&self, id: &str) -> Result<Option<Approval>, ApprovalError> {
        self.run(|client| async move { select_one(&client, "WHERE id = $1", &[&id]).await })
    }

    fn latest_for(&self, binding: &Binding) -> Result<Option<Approval>, ApprovalError> {
        self.run(|client| async move {
            select_one(
                &client,
                "WHERE kind = $1 AND principal = $2 AND role = $3 AND target = $4 \
                 AND arguments_digest = $5 ORDER BY created_ms DESC, row_order DESC LIMIT 1",
                &[
                    &binding.kind.as_str(),
                    &binding.principal,
                    &binding.role,
                    &binding.target,
                    &binding.arguments_digest,
                ],
            )
            .await
        })
    }

    fn list(
        &self,
        status: Option<ApprovalStatus>,
        limit: usize,
    ) -> Result<Vec<Approval>, ApprovalError> {
        let limit = limit_param(limit);
        self.run(|client| async move {
            match status {
                Some(status) => {
                    select_many(
                        &client,
                        "WHERE status = $1 ORDER BY created_ms DESC, row_order DESC LIMIT $2",
                        &[&status.as_str(), &limit],
                    )
                    .await
                }
                None => {
                    select_many(
                        &client,
                        "ORDER BY created_ms DESC, row_order DESC LIMIT $1",
                        &[&limit],
                    )
                    .await
                }
            }
        })
    }

    fn decide(
        &self,
        id: &str,
        verdict: Verdict,
        approver: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Approval, ApprovalError> {
        let status = match verdict {
            Verdict::Approve => ApprovalStatus::Approved,
            Verdict::Deny => ApprovalStatus::Denied,
        };
        let now = millis(now);
        self.run(|client| async move {
            let decided = client
                .query_opt(
                    &format!(
                        "UPDATE approvals SET status = $2, decided_by = $3, decided_ms = $4, \
                         decision_reason = $5, decision_recorded = FALSE \
                         WHERE id = $1 AND status = 'pending' AND expires_ms > $4 \
                         RETURNING {SELECTED}"
                    ),
                    &[&id, &status.as_str(), &approver, &now, &reason],
                )
                .await
                .map_err(server_error)?;
            if let Some(row) = decided {
                return approval(&row);
            }
            // Not decided: say why, from the row as it is now.
            let current = select_one(&client, "WHERE id = $1", &[&id])
                .await?
                .ok_or(ApprovalError::NotFound)?;
            if current.status != ApprovalStatus::Pending {
                return Err(ApprovalError::NotPending(current.status));
            }
            Err(ApprovalError::Expired)
        })
    }

    fn confirm_decision(&self, id: &str) -> Result<bool, ApprovalError> {
        self.run(|client| async move {
            let changed = client
                .execute(
                    "UPDATE approvals SET decision_recorded = TRUE \
                     WHERE id = $1 AND status IN ('approved', 'denied') AND NOT decision_recorded",
                    &[&id],
                )
                .await
                .map_err(server_error)?;
            Ok(changed == 1)
        })
    }

    fn revert_decision(&self, id: &str, decided: ApprovalStatus) -> Result<bool, ApprovalError> {
        self.run(|client| async move {
            // One conditional statement: an instance consuming the approval would
            // need `decision_recorded`, which this requires to be false.
            let changed = client
                .execute(
                    "UPDATE approvals SET status = 'pending', decided_by = NULL, \
                     decided_ms = NULL, decision_reason = NULL, decision_recorded = TRUE \
                     WHERE id = $1 AND status = $2 AND NOT decision_recorded",
                    &[&id, &decided.as_str()],
                )
                .await
                .map_err(server_error)?;
            Ok(changed == 1)
        })
    }

    fn consume(&self, id: &str, now: DateTime<Utc>) -> Result<Option<Approval>, ApprovalError> {
        let now = millis(now);
        self.run(|client| async move {
            client
                .query_opt(
                    &format!(
                        "UPDATE approvals SET status = 'consumed' \
                         WHERE id = $1 AND status = 'approved' AND decision_recorded \
                         AND expires_ms > $2 RETURNING {SELECTED}"
                    ),
                    &[&id, &now],
                )
                .await
                .map_err(server_error)?
                .as_ref()
                .map(approval)
                .transpose()
        })
    }

    fn expire_due(&self, now: DateTime<Utc>) -> Result<Vec<Approval>, ApprovalError> {
        let now = millis(now);
        self.run(|mut client| async move {
            let transaction = client.transaction().await.map_err(server_error)?;
            // FOR UPDATE: an instance expiring concurrently waits for these rows,
            // then re-reads them as expired and skips them, so each is returned once.
            // Rows are locked in one order everywhere, so two passes cannot deadlock.
            let due = select_many(
                &transaction,
                "WHERE status IN ('pending', 'approved') AND expires_ms <= $1 \
                 ORDER BY expires_ms, id FOR UPDATE",
                &[&now],
            )
            .await?;
            let ids: Vec<&str> = due.iter().map(|approval| approval.id.as_str()).collect();
            if !ids.is_empty() {
                transaction
                    .execute(
                        "UPDATE approvals SET status = 'expired' WHERE id = ANY($1)",
                        &[&ids],
                    )
                    .await
                    .map_err(server_error)?;
            }
            transaction.commit().await.map_err(server_error)?;
            Ok(due)
        })
    }

    fn unconfirmed_decisions(
        &self,
        decided_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Approval>, ApprovalError> {
        let decided_before = millis(decided_before);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(|client| async move {
            select_many(
                &client,
                "WHERE status IN ('approved', 'denied') AND NOT decision_recorded \
                 AND decided_ms < $1 ORDER BY decided_ms, row_order LIMIT $2",
                &[&decided_before, &limit],
            )
            .await
        })
    }

    fn next_expiry(&self) -> Result<Option<DateTime<Utc>>, ApprovalError> {
        self.run(|client| async move {
            let ms: Option<i64> = client
                .query_one(
                    "SELECT MIN(expires_ms) FROM approvals WHERE status IN ('pending', 'approved')",
                    &[],
                )
                .await
                .and_then(|row| row.try_get(0))
                .map_err(server_error)?;
            ms.map(from_millis).transpose()
        })
    }

    fn count_pending(&self) -> Result<usize, ApprovalError> {
        self.run(|client| async move {
            let count: i64 = client
                .query_one(
                    "SELECT COUNT(*) FROM approvals WHERE status = 'pending'",
                    &[],
                )
                .await
                .and_then(|row| row.try_get(0))
                .map_err(server_error)?;
            Ok(usize::try_from(count).unwrap_or(0))
        })
    }
}
