//! The approval store in the data dir: `<data-dir>/approvals.db` (SQLite, WAL,
//! every commit synced), a file of its own so the audit database keeps one writer.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::{
    Approval, ApprovalError, ApprovalKind, ApprovalStatus, ApprovalStore, Binding, DecisionSeal,
    NewApproval, Verdict, new_id,
};
use crate::audit::DATA_FILE_MODE;

/// The database file's name in the data dir.
pub const APPROVALS_DB_FILE: &str = "approvals.db";

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

/// Approvals in a SQLite database of their own in the data dir. Under `proxi mcp`
/// the agent's user may be able to write that file, so every decision is sealed
/// ([`DecisionSeal`]) and an approved row is consumed only if its seal verifies.
#[derive(Debug)]
pub struct SqliteApprovals {
    connection: Mutex<Connection>,
    seal: DecisionSeal,
}

impl SqliteApprovals {
    /// Opens (creating if needed) `<data_dir>/approvals.db`, 0600, sealing
    /// decisions with `seal`.
    pub fn open(data_dir: &Path, seal: DecisionSeal) -> Result<SqliteApprovals, ApprovalError> {
        let path = data_dir.join(APPROVALS_DB_FILE);
        std::fs::File::options()
            .create(true)
            .append(true)
            .mode(DATA_FILE_MODE)
            .open(&path)
            .map_err(|error| ApprovalError::Io {
                path: path.clone(),
                error,
            })?;
        let connection = Connection::open(&path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        // A decision must survive a crash: few writes, each synced.
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.execute_batch(
            "CREATE TABLE IF NOT EXISTS approvals (
                id TEXT PRIMARY KEY,
                status TEXT NOT NULL,
                kind TEXT NOT NULL,
                principal TEXT NOT NULL,
                role TEXT NOT NULL,
                target TEXT NOT NULL,
                arguments_digest TEXT NOT NULL,
                policy_hash TEXT NOT NULL,
                arguments TEXT NOT NULL,
                mode TEXT NOT NULL,
                reason TEXT,
                created_ms INTEGER NOT NULL,
                expires_ms INTEGER NOT NULL,
                decided_by TEXT,
                decided_ms INTEGER,
                decision_reason TEXT,
                decision_seal TEXT,
                decision_recorded INTEGER NOT NULL DEFAULT 1
            );
            CREATE INDEX IF NOT EXISTS approvals_by_binding
                ON approvals (kind, principal, role, target, arguments_digest, created_ms);
            CREATE INDEX IF NOT EXISTS approvals_by_status ON approvals (status, expires_ms);",
        )?;
        // Files written before decisions were sealed lack the seal column.
        add_column_if_missing(&connection, "decision_seal", "TEXT")?;
        // Files written before decisions waited for their record lack this one;
        // their decisions were recorded before the caller heard of them.
        add_column_if_missing(
            &connection,
            "decision_recorded",
            "INTEGER NOT NULL DEFAULT 1",
        )?;
        Ok(SqliteApprovals {
            connection: Mutex::new(connection),
            seal,
        })
    }

    fn connection(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

fn from_millis(ms: i64) -> Result<DateTime<Utc>, ApprovalError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| ApprovalError::Corrupt(format!("time {ms} out of range")))
}

/// Raw columns of one row, converted after the query so that a bad row is a
/// typed error rather than a panic.
struct RawRow {
    id: String,
    status: String,
    kind: String,
    principal: String,
    role: String,
    target: String,
    arguments_digest: String,
    policy_hash: String,
    arguments: String,
    mode: String,
    reason: Option<String>,
    created_ms: i64,
    expires_ms: i64,
    decided_by: Option<String>,
    decided_ms: Option<i64>,
    decision_reason: Option<String>,
    decision_recorded: bool,
}

fn raw_row(row: &Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        id: row.get(0)?,
        status: row.get(1)?,
        kind: row.get(2)?,
        principal: row.get(3)?,
        role: row.get(4)?,
        target: row.get(5)?,
        arguments_digest: row.get(6)?,
        policy_hash: row.get(7)?,
        arguments: row.get(8)?,
        mode: row.get(9)?,
        reason: row.get(10)?,
        created_ms: row.get(11)?,
        expires_ms: row.get(12)?,
        decided_by: row.get(13)?,
        decided_ms: row.get(14)?,
        decision_reason: row.get(15)?,
        decision_recorded: row.get(16)?,
    })
}

impl TryFrom<RawRow> for Approval {
    type Error = ApprovalError;

    fn try_from(raw: RawRow) -> Result<Approval, ApprovalError> {
        let corrupt = |what: &str| ApprovalError::Corrupt(format!("{what} of {}", raw.id));
        Ok(Approval {
            status: ApprovalStatus::parse(&raw.status).ok_or_else(|| corrupt("status"))?,
            binding: Binding {
                kind: ApprovalKind::parse(&raw.kind).ok_or_else(|| corrupt("kind"))?,
                principal: raw.principal,
                role: raw.role,
                target: raw.target,
                arguments_digest: raw.arguments_digest,
                policy_hash: raw.policy_hash,
            },
            arguments: serde_json::from_str(&raw.arguments).map_err(|_| corrupt("arguments"))?,
            mode: raw.mode,
            reason: raw.reason,
            created_at: from_millis(raw.created_ms)?,
            expires_at: from_millis(raw.expires_ms)?,
            decided_by: raw.decided_by,
            decided_at: raw.decided_ms.map(from_millis).transpose()?,
            decision_reason: raw.decision_reason,
            decision_recorded: raw.decision_recorded,
            id: raw.id,
        })
    }
}

/// Adds `column` to `approvals` with `definition` when an older file lacks it.
fn add_column_if_missing(
    connection: &Connection,
    column: &str,
    definition: &str,
) -> Result<(), ApprovalError> {
    let present: bool = connection.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('approvals') WHERE name = ?1",
        [column],
        |row| row.get(0),
    )?;
    if !present {
        connection.execute_batch(&format!(
            "ALTER TABLE approvals ADD COLUMN {column} {definition}"
        ))?;
    }
    Ok(())
}

fn select_one(
    connection: &Connection,
    sql_tail: &str,
    params: impl rusqlite::Params,
) -> Result<Option<Approval>, ApprovalError> {
    let sql = format!("SELECT {SELECTED} FROM approvals {sql_tail}");
    connection
        .query_row(&sql, params, raw_row)
        .optional()?
        .map(Approval::try_from)
        .transpose()
}

fn select_many(
    connection: &Connection,
    sql_tail: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Approval>, ApprovalError> {
    let sql = format!("SELECT {SELECTED} FROM approvals {sql_tail}");
    let mut statement = connection.prepare(&sql)?;
    let rows = statement.query_map(params, raw_row)?;
    rows.map(|row| Approval::try_from(row?)).collect()
}

impl ApprovalStore for SqliteApprovals {
    fn create(
        &self,
        request: NewApproval,
        max_pending: usize,
    ) -> Result<(Approval, bool), ApprovalError> {
        let mut connection = self.connection();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let binding = &request.binding;
        let now = millis(request.created_at);
        let existing = select_one(
            &transaction,
            "WHERE status = 'pending' AND expires_ms > ?1 AND kind = ?2 AND principal = ?3 \
             AND role = ?4 AND target = ?5 AND arguments_digest = ?6 AND policy_hash = ?7 \
             ORDER BY created_ms DESC LIMIT 1",
            params![
                now,
                binding.kind.as_str(),
                binding.principal,
                binding.role,
                binding.target,
                binding.arguments_digest,
                binding.policy_hash
            ],
        )?;
        if let Some(existing) = existing {
            return Ok((existing, false));
        }
        let pending: i64 = transaction.query_row(
            "SELECT COUNT(*) FROM approvals WHERE status = 'pending' AND expires_ms > ?1",
            [now],
            |row| row.get(0),
        )?;
        if usize::try_from(pending).unwrap_or(usize::MAX) >= max_pending {
            return Err(ApprovalError::TooManyPending(max_pending));
        }
        let id = new_id()?;
        let arguments = serde_json::to_string(&request.arguments)
            .map_err(|error| ApprovalError::Corrupt(error.to_string()))?;
        transaction.execute(
            &format!(
                "INSERT INTO approvals ({COLUMNS}) VALUES \
                 (?1, 'pending', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, NULL, NULL, NULL)"
            ),
            params![
                id,
                binding.kind.as_str(),
                binding.principal,
                binding.role,
                binding.target,
                binding.arguments_digest,
                binding.policy_hash,
                arguments,
                request.mode,
                request.reason,
                now,
                millis(request.expires_at)
            ],
        )?;
        let created = select_one(&transaction, "WHERE id = ?1", [&id])?.ok_or_else(|| {
            ApprovalError::Corrupt("a row inserted in this transaction is missing".to_owned())
        })?;
        transaction.commit()?;
        Ok((created, true))
    }

    fn get(&self, id: &str) -> Result<Option<Approval>, ApprovalError> {
        select_one(&self.connection(), "WHERE id = ?1", [id])
    }

    fn latest_for(&self, binding: &Binding) -> Result<Option<Approval>, ApprovalError> {
        select_one(
            &self.connection(),
            "WHERE kind = ?1 AND principal = ?2 AND role = ?3 AND target = ?4 \
             AND arguments_digest = ?5 ORDER BY created_ms DESC, rowid DESC LIMIT 1",
            params![
                binding.kind.as_str(),
                binding.principal,
                binding.role,
                binding.target,
                binding.arguments_digest
            ],
        )
    }

    fn list(
        &self,
        status: Option<ApprovalStatus>,
        limit: usize,
    ) -> Result<Vec<Approval>, ApprovalError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let connection = self.connection();
        match status {
            Some(status) => select_many(
                &connection,
                "WHERE status = ?1 ORDER BY created_ms DESC, rowid DESC LIMIT ?2",
                params![status.as_str(), limit],
            ),
            None => select_many(
                &connection,
                "ORDER BY created_ms DESC, rowid DESC LIMIT ?1",
                [limit],
            ),
        }
    }

    fn decide(
        &self,
        id: &str,
        verdict: Verdict,
        approver: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Approval, ApprovalError> {
        let mut connection = self.connection();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current =
            select_one(&transaction, "WHERE id = ?1", [id])?.ok_or(ApprovalError::NotFound)?;
        if current.status != ApprovalStatus::Pending {
            return Err(ApprovalError::NotPending(current.status));
        }
        if current.is_expired_at(now) {
            return Err(ApprovalError::Expired);
        }
        let status = match verdict {
            Verdict::Approve => ApprovalStatus::Approved,
            Verdict::Deny => ApprovalStatus::Denied,
        };
        // Unsealed and unrecorded: `confirm_decision` seals it once its record is
        // durable, so a row flipped to recorded by hand still fails the seal.
        transaction.execute(
            "UPDATE approvals SET status = ?2, decided_by = ?3, decided_ms = ?4, \
             decision_reason = ?5, decision_seal = NULL, decision_recorded = 0 \
             WHERE id = ?1 AND status = 'pending'",
            params![id, status.as_str(), approver, millis(now), reason],
        )?;
        let decided =
            select_one(&transaction, "WHERE id = ?1", [id])?.ok_or(ApprovalError::NotFound)?;
        transaction.commit()?;
        Ok(decided)
    }

    fn confirm_decision(&self, id: &str) -> Result<bool, ApprovalError> {
        let mut connection = self.connection();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(decided) = select_one(
            &transaction,
            "WHERE id = ?1 AND status IN ('approved', 'denied') AND decision_recorded = 0",
            [id],
        )?
        else {
            return Ok(false);
        };
        let seal = self.seal.seal(&decided);
        transaction.execute(
            "UPDATE approvals SET decision_seal = ?2, decision_recorded = 1 WHERE id = ?1",
            params![id, seal],
        )?;
        transaction.commit()?;
        Ok(true)
    }

    fn revert_decision(&self, id: &str, decided: ApprovalStatus) -> Result<bool, ApprovalError> {
        let changed = self.connection().execute(
            "UPDATE approvals SET status = 'pending', decided_by = NULL, decided_ms = NULL, \
             decision_reason = NULL, decision_seal = NULL, decision_recorded = 1 \
             WHERE id = ?1 AND status = ?2 AND decision_recorded = 0",
            params![id, decided.as_str()],
        )?;
        Ok(changed == 1)
    }

    fn consume(&self, id: &str, now: DateTime<Utc>) -> Result<Option<Approval>, ApprovalError> {
        let mut connection = self.connection();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = transaction.execute(
            "UPDATE approvals SET status = 'consumed' \
             WHERE id = ?1 AND status = 'approved' AND decision_recorded = 1 AND expires_ms > ?2",
            params![id, millis(now)],
        )?;
        if changed != 1 {
            return Ok(None);
        }
        let Some(consumed) = select_one(&transaction, "WHERE id = ?1", [id])? else {
            return Ok(None);
        };
        let stored: Option<String> = transaction.query_row(
            "SELECT decision_seal FROM approvals WHERE id = ?1",
            [id],
            |row| row.get(0),
        )?;
        let approved = Approval {
            status: ApprovalStatus::Approved,
            ..consumed.clone()
        };
        if !self.seal.verifies(&approved, stored.as_deref()) {
            // Rolled back on drop: the forged row is left as it was, never used.
            return Err(ApprovalError::Untrusted(id.to_owned()));
        }
        transaction.commit()?;
        Ok(Some(consumed))
    }

    fn expire_due(&self, now: DateTime<Utc>) -> Result<Vec<Approval>, ApprovalError> {
        let mut connection = self.connection();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let due = select_many(
            &transaction,
            "WHERE status IN ('pending', 'approved') AND expires_ms <= ?1 ORDER BY expires_ms",
            [millis(now)],
        )?;
        transaction.execute(
            "UPDATE approvals SET status = 'expired' \
             WHERE status IN ('pending', 'approved') AND expires_ms <= ?1",
            [millis(now)],
        )?;
        transaction.commit()?;
        Ok(due)
    }

    fn unconfirmed_decisions(
        &self,
        decided_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Approval>, ApprovalError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        select_many(
            &self.connection(),
            "WHERE status IN ('approved', 'denied') AND decision_recorded = 0 \
             AND decided_ms < ?1 ORDER BY decided_ms, rowid LIMIT ?2",
            params![millis(decided_before), limit],
        )
    }

    fn next_expiry(&self) -> Result<Option<DateTime<Utc>>, ApprovalError> {
        let ms: Option<i64> = self.connection().query_row(
            "SELECT MIN(expires_ms) FROM approvals WHERE status IN ('pending', 'approved')",
            [],
            |row| row.get(0),
        )?;
        ms.map(from_millis).transpose()
    }

    fn count_pending(&self) -> Result<usize, ApprovalError> {
        let count: i64 = self.connection().query_row(
            "SELECT COUNT(*) FROM approvals WHERE status = 'pending'",
            [],
            |row| row.get(0),
        )?;
        Ok(usize::try_from(count).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn test_seal() -> DecisionSeal {
        DecisionSeal::Keyed(crate::anchor::AuditKey::from_bytes([9; 32]))
    }

    fn binding(principal: &str, digest: &str) -> Binding {
        Binding {
            kind: ApprovalKind::ToolCall,
            principal: principal.to_owned(),
            role: "agent".to_owned(),
            target: "scale_fleet".to_owned(),
            arguments_digest: digest.to_owned(),
            policy_hash: "p1".to_owned(),
        }
    }

    fn request(binding: Binding, now: DateTime<Utc>) -> NewApproval {
        NewApproval {
            binding,
            arguments: json!({"count": 8}),
            mode: "EMERGENCY".to_owned(),
            reason: None,
            created_at: now,
            expires_at: now + chrono::Duration::seconds(600),
        }
    }

    /// What an agent that can write the data dir might do: mark its pending
    /// approval approved by hand, with or without copying another row's seal.
    fn forge_approved(dir: &Path, id: &str, seal_from: Option<&str>) {
        let connection = Connection::open(dir.join(APPROVALS_DB_FILE)).unwrap();
        connection
            .execute(
                "UPDATE approvals SET status = 'approved', decided_by = 'operator', \
                 decision_seal = (SELECT decision_seal FROM approvals WHERE id = ?2) WHERE id = ?1",
                params![id, seal_from.unwrap_or("")],
            )
            .unwrap();
    }

    #[test]
    fn an_approval_marked_approved_outside_proxi_is_never_consumed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteApprovals::open(dir.path(), test_seal()).unwrap();
        let now = Utc::now();
        let (real, _) = store
            .create(request(binding("agent", "d1"), now), 10)
            .unwrap();
        let (forged, _) = store
            .create(request(binding("agent", "d2"), now), 10)
            .unwrap();
        store
            .decide(&real.id, Verdict::Approve, "alice", "ok", now)
            .unwrap();
        assert!(store.confirm_decision(&real.id).unwrap());
        // No seal at all, then the seal of another (genuinely approved) row.
        forge_approved(dir.path(), &forged.id, None);
        assert!(matches!(
            store.consume(&forged.id, now),
            Err(ApprovalError::Untrusted(id)) if id == forged.id
        ));
        forge_approved(dir.path(), &forged.id, Some(&real.id));
        assert!(matches!(
            store.consume(&forged.id, now),
            Err(ApprovalError::Untrusted(_))
        ));
        // Refused, not consumed: the row is as the forger left it.
        assert_eq!(
            store.get(&forged.id).unwrap().unwrap().status,
            ApprovalStatus::Approved
        );
        // The genuine one still works, once.
        assert!(store.consume(&real.id, now).unwrap().is_some());
        // A store reopened under another key trusts none of the old seals.
        let (late, _) = store
            .create(request(binding("agent", "d3"), now), 10)
            .unwrap();
        store
            .decide(&late.id, Verdict::Approve, "alice", "ok", now)
            .unwrap();
        assert!(store.confirm_decision(&late.id).unwrap());
        drop(store);
        let other_key = DecisionSeal::Keyed(crate::anchor::AuditKey::from_bytes([1; 32]));
        let reopened = SqliteApprovals::open(dir.path(), other_key).unwrap();
        assert!(matches!(
            reopened.consume(&late.id, now),
            Err(ApprovalError::Untrusted(_))
        ));
    }

    #[test]
    fn without_an_operator_no_approved_row_is_consumed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteApprovals::open(dir.path(), DecisionSeal::NoOperator).unwrap();
        let now = Utc::now();
        let (approval, _) = store
            .create(request(binding("agent", "d1"), now), 10)
            .unwrap();
        forge_approved(dir.path(), &approval.id, None);
        assert!(matches!(
            store.consume(&approval.id, now),
            Err(ApprovalError::Untrusted(_))
        ));
    }

    #[test]
    fn pending_approved_consumed_once_and_identical_requests_share_one_approval() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteApprovals::open(dir.path(), test_seal()).unwrap();
        let now = Utc::now();
        let (first, fresh) = store
            .create(request(binding("agent", "d1"), now), 10)
            .unwrap();
        assert!(fresh);
        assert_eq!(first.status, ApprovalStatus::Pending);
        let (again, fresh) = store
            .create(request(binding("agent", "d1"), now), 10)
            .unwrap();
        assert!(!fresh);
        assert_eq!(again.id, first.id);
        let (other, fresh) = store
            .create(request(binding("agent", "d2"), now), 10)
            .unwrap();
        assert!(fresh);
        assert_ne!(other.id, first.id);
        assert_eq!(store.count_pending().unwrap(), 2);
        // Not approved yet: nothing to consume.
        assert_eq!(store.consume(&first.id, now).unwrap(), None);
        let approved = store
            .decide(&first.id, Verdict::Approve, "alice", "looks right", now)
            .unwrap();
        assert_eq!(approved.status, ApprovalStatus::Approved);
        assert_eq!(approved.decided_by.as_deref(), Some("alice"));
        assert!(store.confirm_decision(&first.id).unwrap());
        assert!(matches!(
            store.decide(&first.id, Verdict::Deny, "bob", "no", now),
            Err(ApprovalError::NotPending(ApprovalStatus::Approved))
        ));
        let consumed = store.consume(&first.id, now).unwrap().unwrap();
        assert_eq!(consumed.status, ApprovalStatus::Consumed);
        assert_eq!(store.consume(&first.id, now).unwrap(), None);
        assert_eq!(
            store
                .latest_for(&binding("agent", "d1"))
                .unwrap()
                .unwrap()
                .id,
            first.id
        );
        assert_eq!(store.latest_for(&binding("other", "d1")).unwrap(), None);
        let listed = store.list(Some(ApprovalStatus::Pending), 10).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, other.id);
        assert_eq!(store.list(None, 1).unwrap().len(), 1);
        assert!(matches!(
            store.decide("apr_00", Verdict::Approve, "alice", "x", now),
            Err(ApprovalError::NotFound)
        ));
    }

    #[test]
    fn unconfirmed_decisions_older_than_the_cutoff_are_listed_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteApprovals::open(dir.path(), test_seal()).unwrap();
        let now = Utc::now();
        let earlier = now - chrono::TimeDelta::seconds(120);
        let mut ids = Vec::new();
        for digest in ["a", "b", "c", "d"] {
            let (approval, _) = store
                .create(request(binding("agent", digest), earlier), 10)
                .unwrap();
            ids.push(approval.id);
        }
        // a: approved long ago, b: denied long ago, c: approved just now (all
        // unconfirmed); d: approved long ago and confirmed.
        store
            .decide(&ids[0], Verdict::Approve, "alice", "ok", earlier)
            .unwrap();
        store
            .decide(&ids[1], Verdict::Deny, "alice", "no", earlier)
            .unwrap();
        store
            .decide(&ids[2], Verdict::Approve, "alice", "ok", now)
            .unwrap();
        store
            .decide(&ids[3], Verdict::Approve, "alice", "ok", earlier)
            .unwrap();
        assert!(store.confirm_decision(&ids[3]).unwrap());
        let listed = |cutoff, limit| -> Vec<(String, ApprovalStatus)> {
            store
                .unconfirmed_decisions(cutoff, limit)
                .unwrap()
                .into_iter()
                .map(|approval| (approval.id, approval.status))
                .collect()
        };
        let old = now - chrono::TimeDelta::seconds(60);
        assert_eq!(
            listed(old, 10),
            [
                (ids[0].clone(), ApprovalStatus::Approved),
                (ids[1].clone(), ApprovalStatus::Denied)
            ]
        );
        assert_eq!(listed(old, 1).len(), 1, "bounded by the limit");
        let cutoff = now + chrono::TimeDelta::seconds(1);
        assert_eq!(listed(cutoff, 10).len(), 3, "the recent one too");
        // Taken back: none is listed any more.
        for (id, status) in listed(cutoff, 10) {
            assert!(store.revert_decision(&id, status).unwrap());
        }
        assert!(listed(cutoff, 10).is_empty());
        assert_eq!(store.count_pending().unwrap(), 3);
    }

    #[test]
    fn a_decision_is_usable_only_once_confirmed_and_revertible_only_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteApprovals::open(dir.path(), test_seal()).unwrap();
        let now = Utc::now();
        let (approval, _) = store
            .create(request(binding("agent", "d"), now), 10)
            .unwrap();
        let decided = store
            .decide(&approval.id, Verdict::Approve, "alice", "ok", now)
            .unwrap();
        assert_eq!(decided.status, ApprovalStatus::Approved);
        assert!(!decided.decision_recorded);
        // Its record is not durable yet: no call may use it.
        assert_eq!(store.consume(&approval.id, now).unwrap(), None);
        // The record failed: back to pending, and decidable again.
        assert!(
            !store
                .revert_decision(&approval.id, ApprovalStatus::Denied)
                .unwrap(),
            "only the decision that was made is reverted"
        );
        assert!(
            store
                .revert_decision(&approval.id, ApprovalStatus::Approved)
                .unwrap()
        );
        let pending = store.get(&approval.id).unwrap().unwrap();
        assert_eq!(pending.status, ApprovalStatus::Pending);
        assert_eq!(pending.decided_by, None);
        assert!(
            !store.confirm_decision(&approval.id).unwrap(),
            "nothing to confirm"
        );
        store
            .decide(&approval.id, Verdict::Approve, "bob", "ok now", now)
            .unwrap();
        assert!(store.confirm_decision(&approval.id).unwrap());
        assert!(store.get(&approval.id).unwrap().unwrap().decision_recorded);
        // Recorded: never taken back, and usable once.
        assert!(
            !store
                .revert_decision(&approval.id, ApprovalStatus::Approved)
                .unwrap()
        );
        let consumed = store.consume(&approval.id, now).unwrap().unwrap();
        assert_eq!(consumed.decided_by.as_deref(), Some("bob"));
        assert!(
            !store
                .revert_decision(&approval.id, ApprovalStatus::Approved)
                .unwrap()
        );
        // An unconfirmed decision flipped to recorded by hand has no seal.
        let (forged, _) = store
            .create(request(binding("agent", "e"), now), 10)
            .unwrap();
        store
            .decide(&forged.id, Verdict::Approve, "alice", "ok", now)
            .unwrap();
        Connection::open(dir.path().join(APPROVALS_DB_FILE))
            .unwrap()
            .execute(
                "UPDATE approvals SET decision_recorded = 1 WHERE id = ?1",
                [&forged.id],
            )
            .unwrap();
        assert!(matches!(
            store.consume(&forged.id, now),
            Err(ApprovalError::Untrusted(_))
        ));
    }

    #[test]
    fn consume_is_won_by_exactly_one_of_many_threads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteApprovals::open(dir.path(), test_seal()).unwrap());
        let now = Utc::now();
        let (approval, _) = store
            .create(request(binding("agent", "d"), now), 10)
            .unwrap();
        store
            .decide(&approval.id, Verdict::Approve, "alice", "ok", now)
            .unwrap();
        assert!(store.confirm_decision(&approval.id).unwrap());
        let winners: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..20)
                .map(|_| {
                    let store = Arc::clone(&store);
                    let id = approval.id.clone();
                    scope.spawn(move || store.consume(&id, now).unwrap().is_some())
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| usize::from(handle.join().unwrap()))
                .sum()
        });
        assert_eq!(winners, 1);
    }

    #[test]
    fn the_pending_cap_expiry_and_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now();
        let ids = {
            let store = SqliteApprovals::open(dir.path(), test_seal()).unwrap();
            let (a, _) = store
                .create(request(binding("agent", "a"), now), 2)
                .unwrap();
            let (b, _) = store
                .create(request(binding("agent", "b"), now), 2)
                .unwrap();
            assert!(matches!(
                store.create(request(binding("agent", "c"), now), 2),
                Err(ApprovalError::TooManyPending(2))
            ));
            store
                .decide(&b.id, Verdict::Approve, "alice", "ok", now)
                .unwrap();
            assert!(store.confirm_decision(&b.id).unwrap());
            (a.id, b.id)
        };
        // Reopened: the states are still there.
        let store = SqliteApprovals::open(dir.path(), test_seal()).unwrap();
        assert_eq!(
            store.get(&ids.1).unwrap().unwrap().status,
            ApprovalStatus::Approved
        );
        assert_eq!(
            store.next_expiry().unwrap().map(|t| t.timestamp_millis()),
            Some((now + chrono::Duration::seconds(600)).timestamp_millis())
        );
        assert!(store.expire_due(now).unwrap().is_empty());
        let later = now + chrono::Duration::seconds(600);
        // Lapsed: neither decided nor used, even before the expiry pass.
        assert!(matches!(
            store.decide(&ids.0, Verdict::Approve, "alice", "ok", later),
            Err(ApprovalError::Expired)
        ));
        assert_eq!(store.consume(&ids.1, later).unwrap(), None);
        let expired = store.expire_due(later).unwrap();
        assert_eq!(expired.len(), 2);
        assert!(store.expire_due(later).unwrap().is_empty(), "expired once");
        assert_eq!(store.next_expiry().unwrap(), None);
        assert_eq!(
            store.get(&ids.0).unwrap().unwrap().status,
            ApprovalStatus::Expired
        );
        // Room again.
        store
            .create(request(binding("agent", "c"), later), 2)
            .unwrap();
    }
}
