//! The tamper-evident audit trail: a hash-chained SQLite table written by one thread.
//!
//! Callers [`AuditLog::submit`] an entry, which only queues it (cheap, no I/O, safe
//! to call while holding the mode lock so that queue order is decision order), and
//! then await [`Pending::durable`] before answering their client. The writer thread
//! drains whatever has queued up into one transaction (group commit), so a burst of
//! N requests costs one fsync rather than N.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

/// File name of the audit database inside the data dir.
pub const AUDIT_DB_FILE: &str = "audit.db";
/// The `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Most records committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Audit trail failures.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// SQLite refused an operation.
    #[error("audit database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// The data dir could not be prepared.
    #[error("cannot prepare audit storage at {path}: {error}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The writer thread stopped or an earlier write failed; nothing more is accepted.
    #[error("the audit trail is unavailable")]
    Unavailable,
    /// The newest record does not match its hash, so appending would extend a forged chain.
    #[error(
        "the newest audit record (seq {0}) fails its hash check; run `proxi audit verify` and move the damaged database aside"
    )]
    TamperedTail(u64),
    /// A record could not be encoded.
    #[error("cannot encode an audit record: {0}")]
    Encoding(String),
    /// No audit database exists at the path.
    #[error("no audit database at {0}")]
    Missing(PathBuf),
}

/// What kind of event a record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A tool-execution request, whatever became of it.
    ToolCall,
    /// An operator changed the mode.
    ModeChange,
    /// An elevated mode lapsed and the system returned to the default mode.
    ModeExpired,
    /// A request was refused for a missing, wrong or insufficient token.
    AuthRefused,
    /// An operator simulated an incident.
    Incident,
}

impl EntryKind {
    /// The snake_case stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::ToolCall => "tool_call",
            EntryKind::ModeChange => "mode_change",
            EntryKind::ModeExpired => "mode_expired",
            EntryKind::AuthRefused => "auth_refused",
            EntryKind::Incident => "incident",
        }
    }
}

/// The policy verdict a record carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditDecision {
    /// The policy (or the operator's authority) allowed it.
    Allowed,
    /// The policy or authentication refused it.
    Denied,
    /// Refused before the policy was consulted: unknown tool or invalid arguments.
    Rejected,
}

impl AuditDecision {
    /// The snake_case stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditDecision::Allowed => "allowed",
            AuditDecision::Denied => "denied",
            AuditDecision::Rejected => "rejected",
        }
    }
}

/// An event to record, before it has a place in the chain.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    /// When it happened.
    pub time: DateTime<Utc>,
    /// Who asked: `operator`, `agent`, `mcp:<client>`, `system`, `anonymous`.
    pub principal: Arc<str>,
    /// What kind of event.
    pub kind: EntryKind,
    /// The tool named in the request, if any.
    pub tool: Option<String>,
    /// The request's arguments, if any.
    pub arguments: Option<Value>,
    /// The mode the decision was made in (for mode changes: the new mode).
    pub mode: Arc<str>,
    /// The verdict.
    pub decision: AuditDecision,
    /// Machine-readable reason for a refusal.
    pub reason_code: Option<&'static str>,
    /// What happened: `executed`, `denied`, `invalid_arguments`, `failed`, `changed`, ...
    pub outcome: &'static str,
    /// Result, error message or explanation.
    pub detail: Value,
    /// For mode changes, when the new mode lapses.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A stored, chained record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// RFC 3339 time, microsecond precision.
    pub time: String,
    /// Who asked.
    pub principal: String,
    /// `tool_call`, `mode_change`, `mode_expired`, `auth_refused` or `incident`.
    pub kind: String,
    /// The tool named, if any.
    pub tool: Option<String>,
    /// The arguments given, if any.
    pub arguments: Option<Value>,
    /// The mode in force (for mode changes: the new mode).
    pub mode: String,
    /// `allowed`, `denied` or `rejected`.
    pub decision: String,
    /// Reason code of a refusal.
    pub reason_code: Option<String>,
    /// What happened.
    pub outcome: String,
    /// Result, error or explanation.
    pub detail: Value,
    /// For mode changes, when the mode lapses.
    pub expires_at: Option<String>,
    /// Hash of the previous record.
    pub prev_hash: String,
    /// SHA-256 over `prev_hash` and this record's fields.
    pub hash: String,
}

/// The text columns of one row, exactly as stored and hashed.
struct Row {
    seq: u64,
    time: String,
    principal: String,
    kind: String,
    tool: Option<String>,
    arguments: Option<String>,
    mode: String,
    decision: String,
    reason_code: Option<String>,
    outcome: String,
    detail: String,
    expires_at: Option<String>,
    prev_hash: String,
    hash: String,
}

/// One record's columns, borrowed: what is hashed and what is bound to the INSERT.
struct Fields<'a> {
    seq: u64,
    time: &'a str,
    principal: &'a str,
    kind: &'a str,
    tool: Option<&'a str>,
    arguments: Option<&'a str>,
    mode: &'a str,
    decision: &'a str,
    reason_code: Option<&'a str>,
    outcome: &'a str,
    detail: &'a str,
    expires_at: Option<&'a str>,
}

impl Fields<'_> {
    /// SHA-256 over the previous hash, the sequence number and every column,
    /// each length-prefixed so that no two different rows hash the same bytes;
    /// returned as lowercase hex.
    fn hash(&self, prev_hash: &str) -> [u8; 64] {
        let mut hasher = Sha256::new();
        hasher.update(prev_hash.as_bytes());
        hasher.update(self.seq.to_be_bytes());
        let fields = [
            Some(self.time),
            Some(self.principal),
            Some(self.kind),
            self.tool,
            self.arguments,
            Some(self.mode),
            Some(self.decision),
            self.reason_code,
            Some(self.outcome),
            Some(self.detail),
            self.expires_at,
        ];
        for field in fields {
            match field {
                None => hasher.update([0u8]),
                Some(text) => {
                    hasher.update([1u8]);
                    hasher.update((text.len() as u64).to_be_bytes());
                    hasher.update(text.as_bytes());
                }
            }
        }
        let mut hex = [0u8; 64];
        // 32 digest bytes always encode into exactly 64 hex digits.
        let _ = hex::encode_to_slice(hasher.finalize(), &mut hex);
        hex
    }
}

const SELECT_COLUMNS: &str = "seq, ts, principal, kind, tool, arguments, mode, decision, reason_code, outcome, detail, expires_at, prev_hash, hash";

impl Row {
    fn from_sql(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
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
        })
    }

    fn fields(&self) -> Fields<'_> {
        Fields {
            seq: self.seq,
            time: &self.time,
            principal: &self.principal,
            kind: &self.kind,
            tool: self.tool.as_deref(),
            arguments: self.arguments.as_deref(),
            mode: &self.mode,
            decision: &self.decision,
            reason_code: self.reason_code.as_deref(),
            outcome: &self.outcome,
            detail: &self.detail,
            expires_at: self.expires_at.as_deref(),
        }
    }

    fn hash_is_valid(&self) -> bool {
        self.fields().hash(&self.prev_hash).as_slice() == self.hash.as_bytes()
    }

    fn into_record(self) -> AuditRecord {
        let parse = |text: &str| {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        };
        AuditRecord {
            seq: self.seq,
            arguments: self.arguments.as_deref().map(parse),
            detail: parse(&self.detail),
            time: self.time,
            principal: self.principal,
            kind: self.kind,
            tool: self.tool,
            mode: self.mode,
            decision: self.decision,
            reason_code: self.reason_code,
            outcome: self.outcome,
            expires_at: self.expires_at,
            prev_hash: self.prev_hash,
            hash: self.hash,
        }
    }
}

/// Formats a time the way records store it.
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// How hard each commit pushes data to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge only after the WAL is fsynced: survives power loss as well as
    /// process crashes. Fsyncs are grouped and overlap the next batch's writes.
    #[default]
    Full,
    /// Acknowledge after commit without fsync: survives `kill -9` (the data is in
    /// the OS page cache) but may lose the newest records on power loss.
    Process,
}

struct Job {
    entry: AuditEntry,
    done: oneshot::Sender<Result<u64, AuditError>>,
}

/// A queued entry; await [`Pending::durable`] before acknowledging the request.
#[derive(Debug)]
pub struct Pending(PendingState);

#[derive(Debug)]
enum PendingState {
    Queued(oneshot::Receiver<Result<u64, AuditError>>),
    Refused,
}

impl Pending {
    /// Waits until the entry is committed; returns its sequence number.
    pub async fn durable(self) -> Result<u64, AuditError> {
        match self.0 {
            PendingState::Queued(receiver) => {
                receiver.await.unwrap_or(Err(AuditError::Unavailable))
            }
            PendingState::Refused => Err(AuditError::Unavailable),
        }
    }
}

/// Handle to the audit trail; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct AuditLog {
    sender: mpsc::Sender<Job>,
    healthy: Arc<AtomicBool>,
    db_path: PathBuf,
}

/// What [`AuditLog::open`] found in an existing trail.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Number of records already in the chain.
    pub records: u64,
    /// The newest mode change or expiry, to restore the mode after a restart.
    pub last_mode_event: Option<AuditRecord>,
}

impl AuditLog {
    /// Opens (creating if needed) the trail in `data_dir` and starts its writer thread.
    pub fn open(
        data_dir: &Path,
        durability: Durability,
    ) -> Result<(AuditLog, Recovered), AuditError> {
        std::fs::create_dir_all(data_dir).map_err(|error| AuditError::Io {
            path: data_dir.to_owned(),
            error,
        })?;
        let db_path = data_dir.join(AUDIT_DB_FILE);
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
                hash TEXT NOT NULL
            );",
        )?;

        let last: Option<Row> = connection
            .query_row(
                &format!("SELECT {SELECT_COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT 1"),
                [],
                Row::from_sql,
            )
            .optional()?;
        let (last_seq, last_hash) = match last {
            Some(row) if !row.hash_is_valid() => {
                return Err(AuditError::TamperedTail(row.seq));
            }
            Some(row) => (row.seq, row.hash),
            None => (0, GENESIS_HASH.to_owned()),
        };
        let last_mode_event = connection
            .query_row(
                &format!(
                    "SELECT {SELECT_COLUMNS} FROM audit_log WHERE kind IN ('mode_change', 'mode_expired') ORDER BY seq DESC LIMIT 1"
                ),
                [],
                Row::from_sql,
            )
            .optional()?
            .map(Row::into_record);

        let (sender, receiver) = mpsc::channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let syncer = match durability {
            Durability::Process => None,
            Durability::Full => {
                let (sync_sender, sync_receiver) = mpsc::channel();
                let syncer = Syncer {
                    wal_path: data_dir.join(format!("{AUDIT_DB_FILE}-wal")),
                    data_dir: data_dir.to_owned(),
                    wal: None,
                    healthy: Arc::clone(&healthy),
                };
                std::thread::Builder::new()
                    .name("proxi-audit-sync".into())
                    .spawn(move || syncer.run(sync_receiver))
                    .map_err(|error| AuditError::Io {
                        path: db_path.clone(),
                        error,
                    })?;
                Some(sync_sender)
            }
        };
        let writer = Writer {
            connection,
            last_seq,
            last_hash,
            healthy: Arc::clone(&healthy),
            syncer,
        };
        std::thread::Builder::new()
            .name("proxi-audit-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|error| AuditError::Io {
                path: db_path.clone(),
                error,
            })?;
        Ok((
            AuditLog {
                sender,
                healthy,
                db_path,
            },
            Recovered {
                records: last_seq,
                last_mode_event,
            },
        ))
    }

    /// Queues an entry. Never blocks and never does I/O.
    pub fn submit(&self, entry: AuditEntry) -> Pending {
        if !self.is_healthy() {
            return Pending(PendingState::Refused);
        }
        let (done, receiver) = oneshot::channel();
        match self.sender.send(Job { entry, done }) {
            Ok(()) => Pending(PendingState::Queued(receiver)),
            Err(_) => Pending(PendingState::Refused),
        }
    }

    /// Queues an entry and waits for it to be durable.
    pub async fn append(&self, entry: AuditEntry) -> Result<u64, AuditError> {
        self.submit(entry).durable().await
    }

    /// False once a write has failed: from then on every submit is refused.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Where the database lives.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// The newest `limit` records, oldest first.
    pub fn recent(&self, limit: u32) -> Result<Vec<AuditRecord>, AuditError> {
        read_recent(&self.db_path, limit)
    }
}

/// Commit acknowledgements waiting for an fsync: each caller and its sequence number.
type Acks = Vec<(oneshot::Sender<Result<u64, AuditError>>, u64)>;

struct Writer {
    connection: Connection,
    last_seq: u64,
    last_hash: String,
    healthy: Arc<AtomicBool>,
    /// Present for `Durability::Full`: committed batches wait there for their fsync.
    syncer: Option<mpsc::Sender<Acks>>,
}

/// Fsyncs the WAL for every batch the writer committed since the last fsync.
struct Syncer {
    wal_path: PathBuf,
    data_dir: PathBuf,
    wal: Option<std::fs::File>,
    healthy: Arc<AtomicBool>,
}

impl Syncer {
    fn run(mut self, receiver: mpsc::Receiver<Acks>) {
        while let Ok(mut acks) = receiver.recv() {
            while let Ok(more) = receiver.try_recv() {
                acks.extend(more);
            }
            match self.sync() {
                Ok(()) => {
                    for (done, seq) in acks {
                        let _ = done.send(Ok(seq));
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "audit fsync failed; refusing further tool calls");
                    self.healthy.store(false, Ordering::Release);
                    for (done, _) in acks {
                        let _ = done.send(Err(AuditError::Unavailable));
                    }
                }
            }
        }
    }

    /// Every frame of every commit that returned before this call is in the WAL
    /// file's page cache, so one fdatasync makes all of them durable. Frames that
    /// a checkpoint moved into the database file meanwhile were synced by SQLite.
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

impl Writer {
    fn run(mut self, receiver: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(64);
        while let Ok(job) = receiver.recv() {
            batch.push(job);
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if !self.healthy.load(Ordering::Acquire) {
                for job in batch.drain(..) {
                    let _ = job.done.send(Err(AuditError::Unavailable));
                }
                continue;
            }
            match self.commit(&batch) {
                Ok(first_seq) => {
                    let acks: Acks = batch
                        .drain(..)
                        .enumerate()
                        .map(|(offset, job)| (job.done, first_seq + offset as u64))
                        .collect();
                    match &self.syncer {
                        Some(syncer) => {
                            if let Err(mpsc::SendError(acks)) = syncer.send(acks) {
                                self.healthy.store(false, Ordering::Release);
                                for (done, _) in acks {
                                    let _ = done.send(Err(AuditError::Unavailable));
                                }
                            }
                        }
                        None => {
                            for (done, seq) in acks {
                                // A caller that gave up waiting is not an error for the log.
                                let _ = done.send(Ok(seq));
                            }
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "audit write failed; refusing further tool calls");
                    self.healthy.store(false, Ordering::Release);
                    for job in batch.drain(..) {
                        let _ = job.done.send(Err(AuditError::Unavailable));
                    }
                }
            }
        }
    }

    /// Writes the batch in one transaction; the chain state advances only on commit.
    fn commit(&mut self, batch: &[Job]) -> Result<u64, AuditError> {
        let transaction = self.connection.transaction()?;
        let mut seq = self.last_seq;
        let mut hash = [0u8; 64];
        hash.copy_from_slice(self.last_hash.as_bytes());
        // Reused across rows so that a batch costs no per-row allocation for JSON.
        let mut arguments = Vec::with_capacity(256);
        let mut detail = Vec::with_capacity(256);
        {
            let mut insert = transaction.prepare_cached(
                "INSERT INTO audit_log (seq, ts, principal, kind, tool, arguments, mode, decision, reason_code, outcome, detail, expires_at, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            for job in batch {
                let entry = &job.entry;
                seq += 1;
                let time = format_time(entry.time);
                let expires_at = entry.expires_at.map(format_time);
                arguments.clear();
                if let Some(value) = &entry.arguments {
                    serde_json::to_writer(&mut arguments, value).map_err(json_error)?;
                }
                detail.clear();
                serde_json::to_writer(&mut detail, &entry.detail).map_err(json_error)?;
                let fields = Fields {
                    seq,
                    time: &time,
                    principal: &entry.principal,
                    kind: entry.kind.as_str(),
                    tool: entry.tool.as_deref(),
                    arguments: match entry.arguments {
                        Some(_) => Some(utf8(&arguments)?),
                        None => None,
                    },
                    mode: &entry.mode,
                    decision: entry.decision.as_str(),
                    reason_code: entry.reason_code,
                    outcome: entry.outcome,
                    detail: utf8(&detail)?,
                    expires_at: expires_at.as_deref(),
                };
                let prev_hash = hash;
                hash = fields.hash(utf8(&prev_hash)?);
                insert.execute(params![
                    i64::try_from(seq).unwrap_or(i64::MAX),
                    fields.time,
                    fields.principal,
                    fields.kind,
                    fields.tool,
                    fields.arguments,
                    fields.mode,
                    fields.decision,
                    fields.reason_code,
                    fields.outcome,
                    fields.detail,
                    fields.expires_at,
                    utf8(&prev_hash)?,
                    utf8(&hash)?,
                ])?;
            }
        }
        transaction.commit()?;
        let first = self.last_seq + 1;
        self.last_seq = seq;
        self.last_hash = utf8(&hash)?.to_owned();
        Ok(first)
    }
}

fn json_error(error: serde_json::Error) -> AuditError {
    AuditError::Encoding(error.to_string())
}

/// serde_json and hex emit UTF-8 only; a failure here is a bug, reported rather than panicking.
fn utf8(bytes: &[u8]) -> Result<&str, AuditError> {
    std::str::from_utf8(bytes).map_err(|error| AuditError::Encoding(error.to_string()))
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
    let connection = open_reader(db_path)?;
    let mut statement = connection.prepare(&format!(
        "SELECT {SELECT_COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT ?1"
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
    let mut statement = connection.prepare(&format!(
        "SELECT {SELECT_COLUMNS} FROM audit_log ORDER BY seq"
    ))?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        visit(Row::from_sql(row)?.into_record());
    }
    Ok(())
}

/// The result of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Records examined.
    pub records: u64,
    /// Hash of the newest record (the chain head), if any.
    pub head: Option<String>,
    /// The first broken record, if any.
    pub first_bad: Option<BrokenRecord>,
}

/// Where and how the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenRecord {
    /// The sequence number of the first record that does not check out.
    pub seq: u64,
    /// What is wrong with it.
    pub problem: String,
}

/// Recomputes the whole chain and reports the first record that breaks it.
pub fn verify(db_path: &Path) -> Result<Verification, AuditError> {
    let connection = open_reader(db_path)?;
    let mut statement = connection.prepare(&format!(
        "SELECT {SELECT_COLUMNS} FROM audit_log ORDER BY seq"
    ))?;
    let mut rows = statement.query([])?;
    let mut expected_seq = 1;
    let mut previous_hash = GENESIS_HASH.to_owned();
    let mut records = 0;
    let broken = |records, seq, problem: String| Verification {
        records,
        head: None,
        first_bad: Some(BrokenRecord { seq, problem }),
    };
    while let Some(row) = rows.next()? {
        let row = Row::from_sql(row)?;
        records += 1;
        if row.seq != expected_seq {
            let problem = if row.seq > expected_seq {
                format!(
                    "expected record {expected_seq} next but found {}: record(s) {expected_seq}..{} were deleted",
                    row.seq,
                    row.seq - 1
                )
            } else {
                format!("record {} is out of order", row.seq)
            };
            return Ok(broken(records, row.seq, problem));
        }
        if row.prev_hash != previous_hash {
            return Ok(broken(
                records,
                row.seq,
                "does not link to the record before it (records were deleted, reordered or replaced)"
                    .to_owned(),
            ));
        }
        if !row.hash_is_valid() {
            return Ok(broken(
                records,
                row.seq,
                "its content does not match its hash (the record was edited)".to_owned(),
            ));
        }
        previous_hash = row.hash;
        expected_seq += 1;
    }
    // AUTOINCREMENT remembers the highest seq ever written, which exposes a deleted tail.
    let highest: Option<u64> = connection
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'audit_log'",
            [],
            |row| row.get::<_, i64>(0),
        )
        .optional()?
        .and_then(|seq| u64::try_from(seq).ok());
    if let Some(highest) = highest
        && highest >= expected_seq
    {
        return Ok(broken(
            records,
            expected_seq,
            format!(
                "records {expected_seq}..{highest} were written but are missing (the end of the log was deleted)"
            ),
        ));
    }
    Ok(Verification {
        records,
        head: (records > 0).then_some(previous_hash),
        first_bad: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(n: i64) -> AuditEntry {
        AuditEntry {
            time: Utc::now(),
            principal: Arc::from("agent"),
            kind: EntryKind::ToolCall,
            tool: Some("scale_fleet".into()),
            arguments: Some(json!({"count": n})),
            mode: Arc::from("EMERGENCY"),
            decision: AuditDecision::Allowed,
            reason_code: None,
            outcome: "executed",
            detail: json!({"fleet_size": n}),
            expires_at: None,
        }
    }

    async fn log_with(dir: &Path, count: i64) -> AuditLog {
        let (log, _) = AuditLog::open(dir, Durability::Process).unwrap();
        for n in 1..=count {
            log.append(entry(n)).await.unwrap();
        }
        log
    }

    fn tamper(dir: &Path, sql: &str) {
        Connection::open(dir.join(AUDIT_DB_FILE))
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }

    fn first_bad(dir: &Path) -> Option<u64> {
        verify(&dir.join(AUDIT_DB_FILE))
            .unwrap()
            .first_bad
            .map(|broken| broken.seq)
    }

    #[tokio::test]
    async fn an_intact_chain_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 5).await;
        let report = verify(log.db_path()).unwrap();
        assert_eq!(report.records, 5);
        assert_eq!(report.first_bad, None);
        let records = log.recent(2).unwrap();
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(records[1].prev_hash, records[0].hash);
        assert_eq!(records[1].arguments, Some(json!({"count": 5})));
    }

    #[tokio::test]
    async fn concurrent_appends_get_distinct_sequence_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        let pendings: Vec<Pending> = (0..500).map(|n| log.submit(entry(n))).collect();
        let mut seqs = Vec::new();
        for pending in pendings {
            seqs.push(pending.durable().await.unwrap());
        }
        assert_eq!(seqs, (1..=500).collect::<Vec<u64>>());
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn full_durability_acknowledges_every_record_after_its_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Full).unwrap();
        let pendings: Vec<Pending> = (0..300).map(|n| log.submit(entry(n))).collect();
        let mut seqs = Vec::new();
        for pending in pendings {
            seqs.push(pending.durable().await.unwrap());
        }
        assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
        assert!(dir.path().join("audit.db-wal").exists());
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn an_edited_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 5).await);
        tamper(
            dir.path(),
            "UPDATE audit_log SET outcome = 'denied' WHERE seq = 3",
        );
        assert_eq!(first_bad(dir.path()), Some(3));
    }

    #[tokio::test]
    async fn a_deleted_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 5).await);
        tamper(dir.path(), "DELETE FROM audit_log WHERE seq = 2");
        assert_eq!(first_bad(dir.path()), Some(3));
    }

    #[tokio::test]
    async fn a_deleted_tail_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 5).await);
        tamper(dir.path(), "DELETE FROM audit_log WHERE seq >= 4");
        assert_eq!(first_bad(dir.path()), Some(4));
    }

    #[tokio::test]
    async fn reordered_records_are_named() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 5).await);
        tamper(
            dir.path(),
            "UPDATE audit_log SET seq = 100 WHERE seq = 2;
             UPDATE audit_log SET seq = 2 WHERE seq = 4;
             UPDATE audit_log SET seq = 4 WHERE seq = 100;",
        );
        assert_eq!(first_bad(dir.path()), Some(2));
    }

    #[tokio::test]
    async fn a_reopened_log_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 3).await);
        let (log, recovered) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert_eq!(recovered.records, 3);
        assert_eq!(log.append(entry(4)).await.unwrap(), 4);
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn a_forged_tail_stops_the_log_from_opening() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 3).await);
        tamper(
            dir.path(),
            "UPDATE audit_log SET principal = 'nobody' WHERE seq = 3",
        );
        assert!(matches!(
            AuditLog::open(dir.path(), Durability::Process),
            Err(AuditError::TamperedTail(3))
        ));
    }

    #[tokio::test]
    async fn the_last_mode_event_is_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 1).await;
        let mut change = entry(0);
        change.kind = EntryKind::ModeChange;
        change.tool = None;
        change.arguments = None;
        change.outcome = "changed";
        log.append(change).await.unwrap();
        log.append(entry(2)).await.unwrap();
        drop(log);
        let (_, recovered) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert_eq!(recovered.last_mode_event.map(|record| record.seq), Some(2));
    }
}
