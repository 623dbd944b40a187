//! The SQLite store: the `audit_log` table, its readers and the chain check over it.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::*;
use crate::anchor::{Anchoring, AuditKey};

/// File name of the audit database inside the data dir.
pub const AUDIT_DB_FILE: &str = "audit.db";

pub(super) const SELECT_COLUMNS: &str = "seq, ts, principal, kind, tool, arguments, mode, decision, reason_code, outcome, detail, expires_at, prev_hash, hash, context, mac";

/// The select list that fits the `audit_log` table of `connection`: a database
/// written before `context` or `mac` existed reads them as NULL (read-only readers
/// do not migrate).
pub(super) fn select_columns(connection: &Connection) -> Result<String, AuditError> {
    let context = if has_column(connection, "context")? {
        "context"
    } else {
        "NULL"
    };
    let mac = if has_column(connection, "mac")? {
        "mac"
    } else {
        "NULL"
    };
    Ok(format!(
        "seq, ts, principal, kind, tool, arguments, mode, decision, reason_code, outcome, detail, expires_at, prev_hash, hash, {context}, {mac}"
    ))
}

pub(super) fn has_column(connection: &Connection, name: &str) -> Result<bool, AuditError> {
    let count: i64 = connection.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('audit_log') WHERE name = ?1",
        [name],
        |row| row.get(0),
    )?;
    Ok(count > 0)
}

impl Row {
    pub(super) fn from_sql(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
        let seq: i64 = row.get(0)?;
        Ok(Row {
            seq: u64::try_from(seq).unwrap_or(0),
            time: row.get(1)?,
            principal: row.get(2)?,
            kind: row.get(3)?,
            tool: row.get(4)?,
            arguments: row.get(5)?,
            mode: row.get(6)?,
            decision: row.get(7)?,
            reason_code: row.get(8)?,
            outcome: row.get(9)?,
            detail: row.get(10)?,
            expires_at: row.get(11)?,
            prev_hash: row.get(12)?,
            hash: row.get(13)?,
            context: row.get(14)?,
            mac: row.get(15)?,
        })
    }
}
pub(super) fn open_reader(db_path: &Path) -> Result<Connection, AuditError> {
    if !db_path.exists() {
        return Err(AuditError::Missing(db_path.to_owned()));
    }
    let connection = Connection::open_with_flags(
        db_path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(connection)
}

/// The newest `limit` records of the trail at `db_path`, oldest first.
pub fn read_recent(db_path: &Path, limit: u32) -> Result<Vec<AuditRecord>, AuditError> {
    let connection = open_reader(db_path)?;
    let columns = select_columns(&connection)?;
    let mut statement = connection.prepare(&format!(
        "SELECT {columns} FROM audit_log ORDER BY seq DESC LIMIT ?1"
    ))?;
    let mut records = statement
        .query_map([limit], Row::from_sql)?
        .map(|row| row.map(Row::into_record))
        .collect::<Result<Vec<_>, _>>()?;
    records.reverse();
    Ok(records)
}

/// Calls `visit` on every record of the trail at `db_path`, oldest first.
pub fn for_each_record(
    db_path: &Path,
    mut visit: impl FnMut(AuditRecord),
) -> Result<(), AuditError> {
    let connection = open_reader(db_path)?;
    let columns = select_columns(&connection)?;
    let mut statement =
        connection.prepare(&format!("SELECT {columns} FROM audit_log ORDER BY seq"))?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        visit(Row::from_sql(row)?.into_record());
    }
    Ok(())
}

pub(super) fn hash_at(connection: &Connection, seq: u64) -> Result<Option<String>, AuditError> {
    if seq == 0 {
        return Ok(Some(GENESIS_HASH.to_owned()));
    }
    Ok(connection
        .query_row(
            "SELECT hash FROM audit_log WHERE seq = ?1",
            [i64::try_from(seq).unwrap_or(i64::MAX)],
            |row| row.get(0),
        )
        .optional()?)
}

/// At startup: the anchor must be authentic and must not be ahead of, or differ from, the trail.
pub(super) fn check_anchor(
    connection: &Connection,
    anchoring: &Anchoring,
    last_seq: u64,
) -> Result<(), AuditError> {
    let path = anchoring.anchor_path().to_owned();
    let untrusted = |problem| AuditError::AnchorUntrusted {
        anchor: path.clone(),
        problem,
        records: last_seq,
    };
    match anchoring.read_anchor()? {
        None if last_seq > 0 => Err(untrusted("missing")),
        None => Ok(()),
        Some(anchor) if !anchor.is_authentic(anchoring.key()) => {
            Err(untrusted("not authenticated by the configured key"))
        }
        Some(anchor) if anchor.seq > last_seq => Err(AuditError::Truncated {
            last: last_seq,
            anchored: anchor.seq,
            anchor: path,
        }),
        Some(anchor) => match hash_at(connection, anchor.seq)? {
            Some(hash) if hash == anchor.hash => Ok(()),
            _ => Err(AuditError::Rewritten(anchor.seq)),
        },
    }
}

/// Checks the chain from record `seq` (its content and MAC, not its link backwards)
/// to the newest record; returns the first problem.
pub(super) fn check_chain_from(
    connection: &Connection,
    seq: u64,
    key: &AuditKey,
) -> Result<Option<BrokenRecord>, AuditError> {
    let mut statement = connection.prepare(&format!(
        "SELECT {SELECT_COLUMNS} FROM audit_log WHERE seq >= ?1 ORDER BY seq"
    ))?;
    let mut rows = statement.query([i64::try_from(seq).unwrap_or(i64::MAX)])?;
    let mut check = ChainCheck {
        key: Some(key),
        expected_seq: seq,
        previous_hash: None,
    };
    while let Some(row) = rows.next()? {
        if let Err(broken) = check.check(Row::from_sql(row)?) {
            return Ok(Some(broken));
        }
    }
    Ok(None)
}

/// Recomputes the whole hash chain and reports the first record that breaks it.
/// Checks no MACs: see [`verify_anchored`].
pub fn verify(db_path: &Path) -> Result<Verification, AuditError> {
    verify_with(db_path, None)
}

/// Like [`verify`], and also checks every record's MAC and the anchor with
/// `anchoring`'s key: reports a re-hashed record, a key mismatch and a deleted tail.
pub fn verify_anchored(db_path: &Path, anchoring: &Anchoring) -> Result<Verification, AuditError> {
    verify_with(db_path, Some(anchoring))
}

pub(super) fn verify_with(
    db_path: &Path,
    anchoring: Option<&Anchoring>,
) -> Result<Verification, AuditError> {
    let connection = open_reader(db_path)?;
    let anchor = match anchoring {
        Some(anchoring) => Some(anchoring.read_anchor()?),
        None => None,
    };
    let anchor_seq = anchor
        .as_ref()
        .and_then(|anchor| anchor.as_ref().map(|a| a.seq));
    let columns = select_columns(&connection)?;
    let mut statement =
        connection.prepare(&format!("SELECT {columns} FROM audit_log ORDER BY seq"))?;
    let mut rows = statement.query([])?;
    let mut check = ChainCheck {
        key: anchoring.map(Anchoring::key),
        expected_seq: 1,
        previous_hash: Some(GENESIS_HASH.to_owned()),
    };
    let mut records = 0;
    let mut hash_at_anchor = (anchor_seq == Some(0)).then(|| GENESIS_HASH.to_owned());
    let result = |records, first_bad: Option<BrokenRecord>, head: Option<String>| Verification {
        records,
        head: if first_bad.is_none() { head } else { None },
        first_bad,
        anchored_seq: None,
        anchored_externally: anchoring.map(Anchoring::is_external),
    };
    while let Some(row) = rows.next()? {
        let row = Row::from_sql(row)?;
        records += 1;
        if Some(row.seq) == anchor_seq {
            hash_at_anchor = Some(row.hash.clone());
        }
        if let Err(broken) = check.check(row) {
            return Ok(result(records, Some(broken), None));
        }
    }
    let last = check.expected_seq - 1;
    let head = check.previous_hash.filter(|_| records > 0);
    if let (Some(anchoring), Some(anchor)) = (anchoring, anchor) {
        let path = anchoring.anchor_path().display();
        let problem = match anchor {
            None if records > 0 => Some(BrokenRecord {
                seq: last,
                problem: format!(
                    "the anchor {path} is missing: it was deleted, or this trail was not written with this key; a deleted tail cannot be ruled out"
                ),
            }),
            None => None,
            Some(anchor) if anchor.key_id != anchoring.key().id() => Some(BrokenRecord {
                seq: anchor.seq,
                problem: format!(
                    "key mismatch: the anchor {path} was made with audit key {}, but the key given is {}",
                    anchor.key_id,
                    anchoring.key().id()
                ),
            }),
            Some(anchor) if !anchor.is_authentic(anchoring.key()) => Some(BrokenRecord {
                seq: anchor.seq,
                problem: format!("the anchor {path} was forged (its MAC does not match)"),
            }),
            Some(anchor) if anchor.seq > last => Some(BrokenRecord {
                seq: last + 1,
                problem: format!(
                    "records {}..{} were written (the anchor vouches for {}) but are missing: the end of the trail was deleted (truncated)",
                    last + 1,
                    anchor.seq,
                    anchor.seq
                ),
            }),
            Some(anchor) if hash_at_anchor.as_deref() != Some(anchor.hash.as_str()) => {
                Some(BrokenRecord {
                    seq: anchor.seq,
                    problem: "differs from the record the anchor vouches for: the trail was rewritten from here".to_owned(),
                })
            }
            Some(anchor) => {
                let mut verification = result(records, None, head.clone());
                verification.anchored_seq = Some(anchor.seq);
                return finish_unanchored(&connection, verification, last);
            }
        };
        if let Some(problem) = problem {
            return Ok(result(records, Some(problem), None));
        }
    }
    finish_unanchored(&connection, result(records, None, head), last)
}

/// The hash-only tail check: AUTOINCREMENT remembers the highest seq ever written,
/// which exposes a deleted tail unless `sqlite_sequence` was edited too.
pub(super) fn finish_unanchored(
    connection: &Connection,
    mut verification: Verification,
    last: u64,
) -> Result<Verification, AuditError> {
    let highest: Option<u64> = connection
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'audit_log'",
            [],
            |row| row.get::<_, i64>(0),
        )
        .optional()?
        .and_then(|seq| u64::try_from(seq).ok());
    if let Some(highest) = highest
        && highest > last
    {
        verification.head = None;
        verification.first_bad = Some(BrokenRecord {
            seq: last + 1,
            problem: format!(
                "records {}..{highest} were written but are missing (the end of the log was deleted)",
                last + 1
            ),
        });
    }
    Ok(verification)
}
