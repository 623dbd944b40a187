//! The SQLite store, the embedded default: the `audit_log` table in the data dir,
//! written by the audit writer thread through one connection, read through
//! read-only connections of their own.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params, params_from_iter};

use super::*;
use crate::anchor::{Anchoring, AuditKey};

/// File name of the audit database inside the data dir.
pub const AUDIT_DB_FILE: &str = "audit.db";

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
    let policy_hash = if has_column(connection, "policy_hash")? {
        "policy_hash"
    } else {
        "NULL"
    };
    let role = if has_column(connection, "role")? {
        "role"
    } else {
        "NULL"
    };
    Ok(format!(
        "seq, ts, principal, kind, tool, arguments, mode, decision, reason_code, outcome, detail, expires_at, prev_hash, hash, {context}, {mac}, {policy_hash}, {role}"
    ))
}

fn has_column(connection: &Connection, name: &str) -> Result<bool, AuditError> {
    let count: i64 = connection.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('audit_log') WHERE name = ?1",
        [name],
        |row| row.get(0),
    )?;
    Ok(count > 0)
}

impl StoredRecord {
    pub(super) fn from_sql(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredRecord> {
        let seq: i64 = row.get(0)?;
        Ok(StoredRecord {
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
            policy_hash: row.get(16)?,
            role: row.get(17)?,
        })
    }
}

/// The trail in a SQLite database file (see [`AUDIT_DB_FILE`]).
#[derive(Debug)]
pub struct SqliteStore {
    data_dir: PathBuf,
    db_path: PathBuf,
    durability: Durability,
    /// Absent for a read-only store (`audit verify`, `audit tail`).
    writer: Option<Mutex<SqliteWriter>>,
}

/// The writer thread's connection and the chain head it last committed.
#[derive(Debug)]
struct SqliteWriter {
    connection: Connection,
    head: ChainHead,
    buffers: SealBuffers,
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database in `data_dir` for writing.
    ///
    /// The database and its WAL and shared-memory files are 0600.
    pub fn open(data_dir: &Path, durability: Durability) -> Result<SqliteStore, AuditError> {
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |error| AuditError::Io { path, error }
        };
        let db_path = data_dir.join(AUDIT_DB_FILE);
        // SQLite gives the -wal and -shm files the database file's permissions, so
        // creating that file 0600 first covers all three; chmod covers older trails.
        std::fs::File::options()
            .create(true)
            .append(true)
            .mode(DATA_FILE_MODE)
            .open(&db_path)
            .map_err(io_error(&db_path))?;
        for suffix in ["", "-wal", "-shm"] {
            let path = data_dir.join(format!("{AUDIT_DB_FILE}{suffix}"));
            make_private(&path).map_err(io_error(&path))?;
        }
        let connection = Connection::open(&db_path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        // Commits never fsync inside SQLite: with `Durability::Full` a separate
        // syncer thread fsyncs the WAL while the writer already commits the next
        // batch, and acknowledges only what the fsync covered (pipelined group commit).
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.execute_batch(
            "CREATE TABLE IF NOT EXISTS audit_log (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                ts TEXT NOT NULL,
                principal TEXT NOT NULL,
                kind TEXT NOT NULL,
                tool TEXT,
                arguments TEXT,
                mode TEXT NOT NULL,
                decision TEXT NOT NULL,
                reason_code TEXT,
                outcome TEXT NOT NULL,
                detail TEXT NOT NULL,
                expires_at TEXT,
                prev_hash TEXT NOT NULL,
                hash TEXT NOT NULL,
                context TEXT,
                mac TEXT,
                policy_hash TEXT,
                role TEXT
            );
            -- Scratch row the writer rewrites to find out whether writes succeed again.
            CREATE TABLE IF NOT EXISTS audit_probe (id INTEGER PRIMARY KEY, at TEXT NOT NULL);",
        )?;
        if !has_column(&connection, "context")? {
            // A trail from before `context` existed; its records hash the same without it.
            connection.execute_batch("ALTER TABLE audit_log ADD COLUMN context TEXT")?;
        }
        if !has_column(&connection, "policy_hash")? {
            // A trail from before policy versions; its records hash the same without it.
            connection.execute_batch("ALTER TABLE audit_log ADD COLUMN policy_hash TEXT")?;
        }
        if !has_column(&connection, "role")? {
            // A trail from before roles were recorded; its records hash the same without it.
            connection.execute_batch("ALTER TABLE audit_log ADD COLUMN role TEXT")?;
        }
        if !has_column(&connection, "mac")? {
            // A trail from before audit keys: the MAC check refuses to extend it.
            connection.execute_batch("ALTER TABLE audit_log ADD COLUMN mac TEXT")?;
        }
        connection.execute_batch(QUERY_INDEXES)?;
        let mut writer = SqliteWriter {
            connection,
            head: ChainHead::genesis(),
            buffers: SealBuffers::default(),
        };
        writer.reload_head()?;
        Ok(SqliteStore {
            data_dir: data_dir.to_owned(),
            db_path,
            durability,
            writer: Some(Mutex::new(writer)),
        })
    }

    /// Opens the database at `db_path` for reading only (it must exist; nothing is migrated).
    pub fn open_reader(db_path: &Path) -> Result<SqliteStore, AuditError> {
        open_reader(db_path)?;
        Ok(SqliteStore {
            data_dir: db_path
                .parent()
                .map(Path::to_owned)
                .unwrap_or_else(|| PathBuf::from(".")),
            db_path: db_path.to_owned(),
            durability: Durability::Process,
            writer: None,
        })
    }

    /// The database file.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    fn with_writer<T>(
        &self,
        work: impl FnOnce(&mut SqliteWriter) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        match &self.writer {
            Some(writer) => work(&mut writer.lock().unwrap_or_else(PoisonError::into_inner)),
            None => Err(AuditError::Unavailable),
        }
    }

    fn reader(&self) -> Result<(Connection, String), AuditError> {
        let connection = open_reader(&self.db_path)?;
        let columns = select_columns(&connection)?;
        Ok((connection, columns))
    }
}

/// One index per filter of [`AuditQuery`], each ending in `seq` so that a filtered
/// page is read in seq order straight from the index.
const QUERY_INDEXES: &str = "
    CREATE INDEX IF NOT EXISTS audit_log_principal ON audit_log (principal, seq);
    CREATE INDEX IF NOT EXISTS audit_log_kind ON audit_log (kind, seq);
    CREATE INDEX IF NOT EXISTS audit_log_tool ON audit_log (tool, seq);
    CREATE INDEX IF NOT EXISTS audit_log_decision ON audit_log (decision, seq);
    CREATE INDEX IF NOT EXISTS audit_log_reason_code ON audit_log (reason_code, seq);
    CREATE INDEX IF NOT EXISTS audit_log_ts ON audit_log (ts);";

impl SqliteWriter {
    /// Ends any transaction a failed commit left open and takes the chain head
    /// from the database, so the next record links to what is really stored.
    fn reload_head(&mut self) -> Result<(), AuditError> {
        if !self.connection.is_autocommit() {
            self.connection.execute_batch("ROLLBACK")?;
        }
        let head: Option<(i64, String)> = self
            .connection
            .query_row(
                "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        self.head = match head {
            Some((seq, hash)) => ChainHead {
                seq: u64::try_from(seq).unwrap_or(0),
                hash,
            },
            None => ChainHead::genesis(),
        };
        Ok(())
    }

    /// Writes the batch in one transaction; the head advances only on commit.
    fn append(&mut self, entries: &[&AuditEntry], key: &AuditKey) -> Result<Appended, AuditError> {
        if !self.connection.is_autocommit() {
            // A failed commit left a transaction open and its head may be stale.
            self.reload_head()?;
        }
        let transaction = self.connection.transaction()?;
        let mut head = self.head.clone();
        {
            let mut insert = transaction.prepare_cached(
                "INSERT INTO audit_log (seq, ts, principal, kind, tool, arguments, mode, decision, reason_code, outcome, detail, expires_at, prev_hash, hash, context, mac, policy_hash, role)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
            )?;
            for entry in entries {
                let record = seal(&mut head, entry, key, &mut self.buffers)?;
                insert.execute(params![
                    i64::try_from(record.seq).unwrap_or(i64::MAX),
                    record.time,
                    record.principal,
                    record.kind,
                    record.tool,
                    record.arguments,
                    record.mode,
                    record.decision,
                    record.reason_code,
                    record.outcome,
                    record.detail,
                    record.expires_at,
                    record.prev_hash,
                    record.hash,
                    record.context,
                    record.mac,
                    record.policy_hash,
                    record.role,
                ])?;
            }
        }
        transaction.commit()?;
        let first = self.head.seq + 1;
        self.head = head.clone();
        Ok(Appended {
            seqs: (first..=head.seq).collect(),
            head,
        })
    }
}

/// Fsyncs the WAL: every frame of every commit that returned before the call is
/// in the WAL file's page cache, so one fdatasync makes all of them durable.
/// Frames that a checkpoint moved into the database file meanwhile were synced by SQLite.
struct WalSync {
    wal_path: PathBuf,
    data_dir: PathBuf,
    wal: Option<std::fs::File>,
}

impl DurableSync for WalSync {
    fn sync(&mut self) -> std::io::Result<()> {
        if self.wal.is_none() {
            let wal = std::fs::File::open(&self.wal_path)?;
            // The WAL may be new: make its directory entry durable too, once.
            std::fs::File::open(&self.data_dir)?.sync_all()?;
            self.wal = Some(wal);
        }
        match &self.wal {
            Some(wal) => wal.sync_data(),
            None => Ok(()),
        }
    }
}

impl AuditStore for SqliteStore {
    fn describe(&self) -> String {
        self.db_path.display().to_string()
    }

    fn head(&self) -> Result<Option<StoredRecord>, AuditError> {
        let (connection, columns) = self.reader()?;
        Ok(connection
            .query_row(
                &format!("SELECT {columns} FROM audit_log ORDER BY seq DESC LIMIT 1"),
                [],
                StoredRecord::from_sql,
            )
            .optional()?)
    }

    fn hash_at(&self, seq: u64) -> Result<Option<String>, AuditError> {
        if seq == 0 {
            return Ok(Some(GENESIS_HASH.to_owned()));
        }
        let (connection, _) = self.reader()?;
        Ok(connection
            .query_row(
                "SELECT hash FROM audit_log WHERE seq = ?1",
                [i64::try_from(seq).unwrap_or(i64::MAX)],
                |row| row.get(0),
            )
            .optional()?)
    }

    fn append(&self, entries: &[&AuditEntry], key: &AuditKey) -> Result<Appended, AuditError> {
        self.with_writer(|writer| writer.append(entries, key))
    }

    fn reset(&self) -> Result<(), AuditError> {
        self.with_writer(SqliteWriter::reload_head)
    }

    fn probe(&self) -> Result<(), AuditError> {
        self.with_writer(|writer| {
            writer.reload_head()?;
            writer.connection.execute(
                "INSERT OR REPLACE INTO audit_probe (id, at) VALUES (1, ?1)",
                [format_time(Utc::now())],
            )?;
            Ok(())
        })
    }

    fn durable_sync(&self) -> Result<Option<Box<dyn DurableSync>>, AuditError> {
        Ok(match self.durability {
            Durability::Process => None,
            Durability::Full => Some(Box::new(WalSync {
                wal_path: self.data_dir.join(format!("{AUDIT_DB_FILE}-wal")),
                data_dir: self.data_dir.clone(),
                wal: None,
            })),
        })
    }

    fn free_space(&self) -> Option<std::io::Result<(u64, u64)>> {
        Some(disk_space(&self.data_dir))
    }

    fn last_mode_event(&self) -> Result<Option<AuditRecord>, AuditError> {
        let (connection, columns) = self.reader()?;
        Ok(connection
            .query_row(
                &format!(
                    "SELECT {columns} FROM audit_log WHERE kind IN ('mode_change', 'mode_expired') ORDER BY seq DESC LIMIT 1"
                ),
                [],
                StoredRecord::from_sql,
            )
            .optional()?
            .map(StoredRecord::into_record))
    }

    fn scan_from(
        &self,
        seq: u64,
        visit: &mut dyn FnMut(StoredRecord) -> bool,
    ) -> Result<(), AuditError> {
        let (connection, columns) = self.reader()?;
        let mut statement = connection.prepare(&format!(
            "SELECT {columns} FROM audit_log WHERE seq >= ?1 ORDER BY seq"
        ))?;
        let mut rows = statement.query([i64::try_from(seq).unwrap_or(i64::MAX)])?;
        while let Some(row) = rows.next()? {
            if !visit(StoredRecord::from_sql(row)?) {
                break;
            }
        }
        Ok(())
    }

    fn highest_seq_written(&self) -> Result<Option<u64>, AuditError> {
        let (connection, _) = self.reader()?;
        // AUTOINCREMENT remembers the highest seq ever written.
        Ok(connection
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'audit_log'",
                [],
                |row| row.get::<_, i64>(0),
            )
            .optional()?
            .and_then(|seq| u64::try_from(seq).ok()))
    }

    fn recent(&self, limit: u32) -> Result<Vec<AuditRecord>, AuditError> {
        let (connection, columns) = self.reader()?;
        let mut statement = connection.prepare(&format!(
            "SELECT {columns} FROM audit_log ORDER BY seq DESC LIMIT ?1"
        ))?;
        let mut records = statement
            .query_map([limit], StoredRecord::from_sql)?
            .map(|row| row.map(StoredRecord::into_record))
            .collect::<Result<Vec<_>, _>>()?;
        records.reverse();
        Ok(records)
    }

    fn query(&self, query: &AuditQuery) -> Result<AuditPage, AuditError> {
        let (connection, columns) = self.reader()?;
        let mut conditions: Vec<&str> = Vec::new();
        let mut values: Vec<SqlValue> = Vec::new();
        let mut exact = |column: &'static str, value: &Option<String>| {
            if let Some(value) = value {
                conditions.push(column);
                values.push(SqlValue::Text(value.clone()));
            }
        };
        exact("principal = ?", &query.principal);
        exact("kind = ?", &query.kind);
        exact("decision = ?", &query.decision);
        exact("reason_code = ?", &query.reason_code);
        match query.tool_pattern() {
            Some((pattern, true)) => {
                conditions.push("tool GLOB ?");
                values.push(SqlValue::Text(sqlite_glob(pattern)));
            }
            Some((tool, false)) => {
                conditions.push("tool = ?");
                values.push(SqlValue::Text(tool.to_owned()));
            }
            None => {}
        }
        if let Some(since) = query.since {
            conditions.push("ts >= ?");
            values.push(SqlValue::Text(format_time(since)));
        }
        if let Some(until) = query.until {
            conditions.push("ts < ?");
            values.push(SqlValue::Text(format_time(until)));
        }
        if let Some(after) = query.after_seq {
            conditions.push("seq > ?");
            values.push(SqlValue::Integer(i64::try_from(after).unwrap_or(i64::MAX)));
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let (order, fetch) = query.fetch_plan();
        let mut statement = connection.prepare(&format!(
            "SELECT {columns} FROM audit_log {filter} ORDER BY seq {order} LIMIT {fetch}"
        ))?;
        let records = statement
            .query_map(params_from_iter(values.iter()), StoredRecord::from_sql)?
            .map(|row| row.map(StoredRecord::into_record))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AuditPage::from_fetched(query, records))
    }
}

/// `*` globs as SQLite GLOB patterns: every other GLOB metacharacter matches itself.
fn sqlite_glob(pattern: &str) -> String {
    let mut glob = String::with_capacity(pattern.len());
    for character in pattern.chars() {
        match character {
            '?' => glob.push_str("[?]"),
            '[' => glob.push_str("[[]"),
            other => glob.push(other),
        }
    }
    glob
}

fn open_reader(db_path: &Path) -> Result<Connection, AuditError> {
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
    SqliteStore::open_reader(db_path)?.recent(limit)
}

/// Calls `visit` on every record of the trail at `db_path`, oldest first.
pub fn for_each_record(
    db_path: &Path,
    mut visit: impl FnMut(AuditRecord),
) -> Result<(), AuditError> {
    SqliteStore::open_reader(db_path)?.for_each_record(&mut visit)
}

/// Recomputes the whole hash chain of the trail at `db_path` and reports the first
/// record that breaks it. Checks no MACs: see [`verify_anchored`].
pub fn verify(db_path: &Path) -> Result<Verification, AuditError> {
    SqliteStore::open_reader(db_path)?.verify(None)
}

/// Like [`verify`], and also checks every record's MAC and the anchor with
/// `anchoring`'s key: reports a re-hashed record, a key mismatch and a deleted tail.
pub fn verify_anchored(db_path: &Path, anchoring: &Anchoring) -> Result<Verification, AuditError> {
    SqliteStore::open_reader(db_path)?.verify(Some(anchoring))
}
