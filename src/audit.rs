//! The tamper-evident audit trail: a hash-chained SQLite table written by one thread.
//!
//! Callers [`AuditLog::submit`] an entry, which only queues it (cheap, no I/O, safe
//! to call while holding the mode lock so that queue order is decision order), and
//! then await [`Pending::durable`] before answering their client. The writer thread
//! drains whatever has queued up into one transaction (group commit), so a burst of
//! N requests costs one fsync rather than N.
//!
//! Every record is bounded (see [`MAX_RECORD_BYTES`]), agent traffic stops while
//! free disk space is below a reserve kept for operators, and a failed write makes
//! the log refuse agent traffic only until a later write succeeds.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::anchor::{AnchorError, AnchorFile, Anchoring, AuditKey, MacCheck};

/// File name of the audit database inside the data dir.
pub const AUDIT_DB_FILE: &str = "audit.db";
/// The `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Most records committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Bytes of a JSON text kept when the whole text is not stored.
pub const STORED_PREFIX_BYTES: usize = 1024;
/// Largest `arguments` or `detail` JSON text stored whole; longer ones become a digest.
pub const MAX_STORED_JSON_BYTES: usize = 8 * 1024;
/// Largest `context` JSON text stored whole; longer ones become a digest.
pub const MAX_STORED_CONTEXT_BYTES: usize = 2 * 1024;
/// Longest stored `principal`, `tool` or `mode`, in bytes.
pub const MAX_STORED_NAME_BYTES: usize = 256;
/// Upper bound of one record's stored text: the capped fields plus the fixed-size
/// ones (times, hashes, static outcome and reason codes), with room to spare.
pub const MAX_RECORD_BYTES: usize =
    3 * MAX_STORED_NAME_BYTES + 2 * MAX_STORED_JSON_BYTES + MAX_STORED_CONTEXT_BYTES + 512;
/// Free space kept for operators on the data dir's filesystem unless configured.
pub const DEFAULT_SPACE_RESERVE_BYTES: u64 = 64 * 1024 * 1024;
/// How often a log that failed a write, or is short of space, checks again.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Permissions of the data dir: only Proxi's user may list or enter it.
pub const DATA_DIR_MODE: u32 = 0o700;
/// Permissions of every file Proxi keeps in the data dir.
pub const DATA_FILE_MODE: u32 = 0o600;

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
    /// The writer thread stopped or a write failed; nothing more is accepted until a write succeeds.
    #[error("the audit trail is unavailable")]
    Unavailable,
    /// Free space on the data dir's filesystem is below the operators' reserve.
    #[error("free disk space for the audit trail is below the reserve kept for operators")]
    LowSpace,
    /// The newest record does not match its hash or MAC, so appending would extend a forged chain.
    #[error(
        "the newest audit record (seq {0}) fails its hash or MAC check; run `proxi audit verify` and move the damaged database aside"
    )]
    TamperedTail(u64),
    /// A record could not be encoded.
    #[error("cannot encode an audit record: {0}")]
    Encoding(String),
    /// No audit database exists at the path.
    #[error("no audit database at {0}")]
    Missing(PathBuf),
    /// The audit key or the anchor file could not be used.
    #[error(transparent)]
    Anchor(#[from] AnchorError),
    /// The newest record carries no MAC, so it cannot be told from a forgery.
    #[error(
        "the newest audit record (seq {0}) carries no MAC: the trail predates audit keys or its MACs were removed; run `proxi audit verify` and move the database aside"
    )]
    Unauthenticated(u64),
    /// The newest record was authenticated with another key than the one configured.
    #[error(
        "the audit trail was written with another audit key (record {seq} names key {found}, the configured key is {expected}); use the operator credential this data dir was created with"
    )]
    KeyMismatch {
        /// The record checked.
        seq: u64,
        /// The key id the record names.
        found: String,
        /// The configured key's id.
        expected: String,
    },
    /// The anchor names records the database no longer has.
    #[error(
        "the audit trail ends at record {last} but the anchor {anchor} says record {anchored} was written: the end of the trail was deleted; run `proxi audit verify` and move the damaged database aside"
    )]
    Truncated {
        /// The newest record present.
        last: u64,
        /// The newest record the anchor vouches for.
        anchored: u64,
        /// The anchor file.
        anchor: PathBuf,
    },
    /// The record the anchor vouches for has another hash: the chain was rewritten.
    #[error(
        "audit record {0} differs from the one the anchor vouches for: the trail was rewritten; run `proxi audit verify` and move the damaged database aside"
    )]
    Rewritten(u64),
    /// The trail has records but its anchor file is gone or was not made with this key.
    #[error(
        "the audit anchor {anchor} is {problem} although the trail has {records} record(s); a deleted tail could not be detected, so Proxi will not extend this trail"
    )]
    AnchorUntrusted {
        /// The anchor file.
        anchor: PathBuf,
        /// `missing` or `not authenticated by the configured key`.
        problem: &'static str,
        /// Records in the trail.
        records: u64,
    },
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
    /// The caller's free-form context (REST `context`), if it gave one.
    pub context: Option<Value>,
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
    /// The caller's context, bounded like `arguments` (absent in records without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
    /// `<key id>:<HMAC-SHA-256 of hash>` under the audit key (see [`crate::anchor`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
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
    context: Option<String>,
    mac: Option<String>,
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
    context: Option<&'a str>,
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
        // `context` came later: hashed only when present (with its own tag), so
        // records written before it existed keep their hashes.
        if let Some(context) = self.context {
            hasher.update([2u8]);
            hasher.update((context.len() as u64).to_be_bytes());
            hasher.update(context.as_bytes());
        }
        let mut hex = [0u8; 64];
        // 32 digest bytes always encode into exactly 64 hex digits.
        let _ = hex::encode_to_slice(hasher.finalize(), &mut hex);
        hex
    }
}

const SELECT_COLUMNS: &str = "seq, ts, principal, kind, tool, arguments, mode, decision, reason_code, outcome, detail, expires_at, prev_hash, hash, context, mac";

/// The select list that fits the `audit_log` table of `connection`: a database
/// written before `context` or `mac` existed reads them as NULL (read-only readers
/// do not migrate).
fn select_columns(connection: &Connection) -> Result<String, AuditError> {
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

fn has_column(connection: &Connection, name: &str) -> Result<bool, AuditError> {
    let count: i64 = connection.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('audit_log') WHERE name = ?1",
        [name],
        |row| row.get(0),
    )?;
    Ok(count > 0)
}

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
            context: row.get(14)?,
            mac: row.get(15)?,
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
            context: self.context.as_deref(),
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
            context: self.context.as_deref().map(parse),
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
            mac: self.mac,
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

/// Who an entry is for, which decides what happens to it when disk space runs low
/// or a write has failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Agent traffic and refused authentications: refused first, as soon as free
    /// space drops below the reserve or while the log recovers from a failed write.
    Agent,
    /// Operator actions and Proxi's own mode events: may use the reserve, and are
    /// still attempted while the log recovers (each attempt doubles as a probe).
    Essential,
}

/// The stored form of a JSON value whose text is not kept whole: a bounded prefix
/// of its compact text, the SHA-256 of the whole text and its length in bytes.
///
/// Shape: `{"truncated": bool, "prefix": "...", "sha256": "<hex>", "bytes": N}`;
/// `truncated` is false when the prefix is the whole text.
pub fn json_digest(value: &Value) -> Value {
    digest_text(&serde_json::to_string(value).unwrap_or_default())
}

fn digest_text(text: &str) -> Value {
    let prefix = cut(text, STORED_PREFIX_BYTES);
    serde_json::json!({
        "truncated": prefix.len() < text.len(),
        "prefix": prefix,
        "sha256": hex::encode(Sha256::digest(text.as_bytes())),
        "bytes": text.len(),
    })
}

/// Cuts `text` to at most `max` bytes on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Serializes `value` into `buffer`; a text longer than `max` is replaced by its digest.
fn write_bounded(buffer: &mut Vec<u8>, value: &Value, max: usize) -> Result<(), AuditError> {
    buffer.clear();
    serde_json::to_writer(&mut *buffer, value).map_err(json_error)?;
    if buffer.len() > max {
        let digest = digest_text(utf8(buffer)?);
        buffer.clear();
        serde_json::to_writer(&mut *buffer, &digest).map_err(json_error)?;
    }
    Ok(())
}

struct Job {
    entry: AuditEntry,
    priority: Priority,
    /// The failure count when the job was queued: a job queued before a failure
    /// may depend on state that was never recorded, so it is refused.
    generation: u64,
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

/// Writes succeed.
const HEALTHY: u8 = 0;
/// A write failed: agent entries are refused until a probe or an essential write succeeds.
const RECOVERING: u8 = 1;
/// The writer or syncer is gone, or an fsync failed (after which the kernel may
/// have dropped dirty pages, so no later success proves anything): only a
/// restart, which re-reads and checks the chain, recovers.
const FAILED: u8 = 2;

/// State the handle, the writer and the syncer share.
#[derive(Debug)]
struct Shared {
    health: AtomicU8,
    /// Bumped by every failed write (see [`Job::generation`]).
    generation: AtomicU64,
    /// Free space was below the reserve at the last check.
    low_space: AtomicBool,
    /// Bytes of free space kept for essential entries.
    reserve: AtomicU64,
    /// Records, commit times and queue depth for `/metrics`.
    metrics: crate::metrics::AuditMetrics,
    /// Seq of the newest durable record, for live readers of the trail.
    committed: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn health(&self) -> u8 {
        self.health.load(Ordering::SeqCst)
    }

    fn fail_permanently(&self) {
        self.health.store(FAILED, Ordering::SeqCst);
    }

    /// Whether an entry of `priority` may be queued now.
    fn accepts(&self, priority: Priority) -> bool {
        match self.health() {
            HEALTHY => true,
            RECOVERING => priority == Priority::Essential,
            _ => false,
        }
    }
}

/// Handle to the audit trail; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct AuditLog {
    sender: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    db_path: PathBuf,
}

/// What [`AuditLog::open`] found in an existing trail.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Number of records already in the chain.
    pub records: u64,
    /// The newest mode change or expiry, to restore the mode after a restart.
    pub last_mode_event: Option<AuditRecord>,
    /// Why `last_mode_event` cannot be trusted: the first problem in the chain from
    /// it to the newest record (hash, link or MAC), if there is one.
    pub mode_event_problem: Option<String>,
    /// True when the audit key and anchor live outside the data dir.
    pub anchored_externally: bool,
}

/// Creates `dir` (and missing parents) readable by Proxi's user only.
///
/// An existing directory keeps its permissions (it may be shared on purpose),
/// but a warning names it if other users can read it.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DATA_DIR_MODE)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o777),
            "the data dir is accessible to other users; chmod 700 it"
        );
    }
    Ok(())
}

/// Makes `path` (if it exists) readable and writable by Proxi's user only.
fn make_private(path: &Path) -> std::io::Result<()> {
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(DATA_FILE_MODE)) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Free and total bytes of the filesystem holding `path`, as unprivileged users see them.
fn disk_space(path: &Path) -> std::io::Result<(u64, u64)> {
    let stats = rustix::fs::statvfs(path)?;
    let block = stats.f_frsize.max(1);
    Ok((
        stats.f_bavail.saturating_mul(block),
        stats.f_blocks.saturating_mul(block),
    ))
}

impl AuditLog {
    /// Opens (creating if needed) the trail in `data_dir` and starts its writer thread.
    ///
    /// The data dir is created 0700 and the database and its WAL and shared-memory
    /// files are 0600. The free-space reserve starts at [`DEFAULT_SPACE_RESERVE_BYTES`],
    /// capped at a tenth of the filesystem; see [`AuditLog::set_space_reserve`].
    /// The audit key and anchor live in the data dir too; see [`AuditLog::open_anchored`].
    pub fn open(
        data_dir: &Path,
        durability: Durability,
    ) -> Result<(AuditLog, Recovered), AuditError> {
        create_private_dir(data_dir).map_err(|error| AuditError::Io {
            path: data_dir.to_owned(),
            error,
        })?;
        let anchoring = Anchoring::in_data_dir(data_dir)?;
        AuditLog::open_anchored(data_dir, durability, anchoring)
    }

    /// Opens the trail in `data_dir`, authenticated by `anchoring`'s key and anchor.
    ///
    /// Refuses a trail whose newest record fails its hash or MAC, that was written
    /// with another key, or that ends before its anchor (a deleted tail).
    pub fn open_anchored(
        data_dir: &Path,
        durability: Durability,
        anchoring: Anchoring,
    ) -> Result<(AuditLog, Recovered), AuditError> {
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |error| AuditError::Io { path, error }
        };
        create_private_dir(data_dir).map_err(io_error(data_dir))?;
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
                mac TEXT
            );
            -- Scratch row the writer rewrites to find out whether writes succeed again.
            CREATE TABLE IF NOT EXISTS audit_probe (id INTEGER PRIMARY KEY, at TEXT NOT NULL);",
        )?;
        if !has_column(&connection, "context")? {
            // A trail from before `context` existed; its records hash the same without it.
            connection.execute_batch("ALTER TABLE audit_log ADD COLUMN context TEXT")?;
        }
        if !has_column(&connection, "mac")? {
            // A trail from before audit keys: the MAC check below refuses to extend it.
            connection.execute_batch("ALTER TABLE audit_log ADD COLUMN mac TEXT")?;
        }

        let key = anchoring.key();
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
            Some(row) => match key.check_record(&row.hash, row.mac.as_deref()) {
                MacCheck::Valid => (row.seq, row.hash),
                MacCheck::OtherKey(found) => {
                    return Err(AuditError::KeyMismatch {
                        seq: row.seq,
                        found,
                        expected: key.id().to_owned(),
                    });
                }
                MacCheck::Missing => return Err(AuditError::Unauthenticated(row.seq)),
                MacCheck::Invalid => return Err(AuditError::TamperedTail(row.seq)),
            },
            None => (0, GENESIS_HASH.to_owned()),
        };
        check_anchor(&connection, &anchoring, last_seq)?;
        // Proves the anchor is writable before anything is acknowledged.
        anchoring.write_anchor(last_seq, &last_hash)?;
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
        let mode_event_problem = match &last_mode_event {
            Some(record) => check_chain_from(&connection, record.seq, key)?
                .map(|broken| format!("record {}: {}", broken.seq, broken.problem)),
            None => None,
        };
        let anchored_externally = anchoring.is_external();
        let anchor = Arc::new(AnchorWriter {
            file: anchoring.open_for_updates()?,
            head: Mutex::new((last_seq, last_hash.clone())),
            failing: AtomicBool::new(false),
        });

        let (sender, receiver) = mpsc::channel();
        let total = disk_space(data_dir).map(|(_, total)| total).unwrap_or(0);
        let shared = Arc::new(Shared {
            health: AtomicU8::new(HEALTHY),
            generation: AtomicU64::new(0),
            low_space: AtomicBool::new(false),
            reserve: AtomicU64::new(DEFAULT_SPACE_RESERVE_BYTES.min(total / 10)),
            metrics: crate::metrics::AuditMetrics::default(),
            committed: tokio::sync::watch::channel(last_seq).0,
        });
        let syncer = match durability {
            Durability::Process => None,
            Durability::Full => {
                let (sync_sender, sync_receiver) = mpsc::channel();
                let syncer = Syncer {
                    wal_path: data_dir.join(format!("{AUDIT_DB_FILE}-wal")),
                    data_dir: data_dir.to_owned(),
                    wal: None,
                    shared: Arc::clone(&shared),
                    anchor: Arc::clone(&anchor),
                };
                std::thread::Builder::new()
                    .name("proxi-audit-sync".into())
                    .spawn(move || syncer.run(sync_receiver))
                    .map_err(io_error(&db_path))?;
                Some(sync_sender)
            }
        };
        let mut writer = Writer {
            connection,
            data_dir: data_dir.to_owned(),
            last_seq,
            last_hash,
            shared: Arc::clone(&shared),
            anchor,
            syncer,
        };
        writer.check_space();
        std::thread::Builder::new()
            .name("proxi-audit-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(io_error(&db_path))?;
        Ok((
            AuditLog {
                sender,
                shared,
                db_path,
            },
            Recovered {
                records: last_seq,
                last_mode_event,
                mode_event_problem,
                anchored_externally,
            },
        ))
    }

    /// Sets the free space (bytes) kept for essential entries on the data dir's
    /// filesystem: below it, [`AuditLog::admit`] refuses agent traffic.
    pub fn set_space_reserve(&self, bytes: u64) {
        // Only the writer sets `low_space`, at its next commit or probe: it must see
        // the flag change, because a log short of space wakes up to check again.
        self.shared.reserve.store(bytes, Ordering::SeqCst);
    }

    /// The free space kept for essential entries, in bytes.
    pub fn space_reserve(&self) -> u64 {
        self.shared.reserve.load(Ordering::SeqCst)
    }

    /// Whether work of `priority` may start: call it before acting, because an
    /// action whose record is then refused would have happened unrecorded.
    ///
    /// Agent work is refused while the log recovers from a failed write
    /// ([`AuditError::Unavailable`]) or while free space is below the reserve
    /// ([`AuditError::LowSpace`]); essential work only once the log has failed for good.
    pub fn admit(&self, priority: Priority) -> Result<(), AuditError> {
        if !self.shared.accepts(priority) {
            return Err(AuditError::Unavailable);
        }
        if priority == Priority::Agent && self.shared.low_space.load(Ordering::SeqCst) {
            return Err(AuditError::LowSpace);
        }
        Ok(())
    }

    /// Queues an agent-priority entry. Never blocks and never does I/O.
    pub fn submit(&self, entry: AuditEntry) -> Pending {
        self.submit_with(entry, Priority::Agent)
    }

    /// Queues an entry of `priority`. Never blocks and never does I/O.
    ///
    /// Free space is not checked here: work that [`AuditLog::admit`] let start
    /// gets its record, which the reserve has room for.
    pub fn submit_with(&self, entry: AuditEntry, priority: Priority) -> Pending {
        // Read before the health check: a failure in between bumps the generation,
        // so the writer refuses this job rather than commit it after the failure.
        let generation = self.shared.generation.load(Ordering::SeqCst);
        if !self.shared.accepts(priority) {
            return Pending(PendingState::Refused);
        }
        let (done, receiver) = oneshot::channel();
        let job = Job {
            entry,
            priority,
            generation,
            done,
        };
        match self.sender.send(job) {
            Ok(()) => {
                self.shared.metrics.queue_depth.inc();
                Pending(PendingState::Queued(receiver))
            }
            Err(_) => Pending(PendingState::Refused),
        }
    }

    /// Queues an agent-priority entry and waits for it to be durable.
    pub async fn append(&self, entry: AuditEntry) -> Result<u64, AuditError> {
        self.submit(entry).durable().await
    }

    /// Queues an entry of `priority` and waits for it to be durable.
    pub async fn append_with(
        &self,
        entry: AuditEntry,
        priority: Priority,
    ) -> Result<u64, AuditError> {
        self.submit_with(entry, priority).durable().await
    }

    /// False from a failed write until a later write succeeds (and for good once
    /// the writer is gone or an fsync failed).
    pub fn is_healthy(&self) -> bool {
        self.shared.health() == HEALTHY
    }

    /// Whether free space was below the reserve at the writer's last check.
    pub fn is_low_on_space(&self) -> bool {
        self.shared.low_space.load(Ordering::SeqCst)
    }

    /// Where the database lives.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// The series this log updates (records, commit seconds, queue depth).
    pub fn metrics(&self) -> &crate::metrics::AuditMetrics {
        &self.shared.metrics
    }

    /// Watches the seq of the newest durable record (0: none yet); a live reader
    /// wakes on each change and reads what it has not seen from the store.
    pub fn committed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.committed.subscribe()
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
    data_dir: PathBuf,
    last_seq: u64,
    last_hash: String,
    shared: Arc<Shared>,
    /// Records the committed head in the anchor (here, or after the syncer's fsync).
    anchor: Arc<AnchorWriter>,
    /// Present for `Durability::Full`: committed batches wait there for their fsync.
    syncer: Option<mpsc::Sender<Acks>>,
}

/// Fsyncs the WAL for every batch the writer committed since the last fsync.
struct Syncer {
    wal_path: PathBuf,
    data_dir: PathBuf,
    wal: Option<std::fs::File>,
    shared: Arc<Shared>,
    anchor: Arc<AnchorWriter>,
}

impl Syncer {
    fn run(mut self, receiver: mpsc::Receiver<Acks>) {
        while let Ok(mut acks) = receiver.recv() {
            while let Ok(more) = receiver.try_recv() {
                acks.extend(more);
            }
            // Read before the fsync: every commit that set this head is covered by it.
            let head = self.anchor.head();
            let synced = if self.shared.health() == FAILED {
                Err(std::io::Error::other("an earlier fsync failed"))
            } else {
                self.sync()
            };
            match synced {
                Ok(()) => {
                    let newest = acks.iter().map(|(_, seq)| *seq).max();
                    self.anchor.persist(head);
                    if let Some(newest) = newest {
                        self.shared.committed.send_replace(newest);
                    }
                    for (done, seq) in acks {
                        let _ = done.send(Ok(seq));
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "audit fsync failed; refusing everything until restart");
                    self.shared.fail_permanently();
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
        loop {
            // A healthy log with room to spare sleeps until work arrives; otherwise
            // it wakes up regularly to find out whether things got better.
            let watching =
                self.shared.health() == RECOVERING || self.shared.low_space.load(Ordering::SeqCst);
            let job = if watching {
                match receiver.recv_timeout(PROBE_INTERVAL) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.probe();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match receiver.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            };
            batch.push(job);
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.shared.metrics.queue_depth.dec_by(batch.len() as i64);
            self.process(&mut batch);
        }
    }

    /// Commits what may be committed of `batch` and answers every caller in it.
    fn process(&mut self, batch: &mut Vec<Job>) {
        let health = self.shared.health();
        let generation = self.shared.generation.load(Ordering::SeqCst);
        let writable = |job: &Job| {
            job.generation == generation
                && match health {
                    HEALTHY => true,
                    RECOVERING => job.priority == Priority::Essential,
                    _ => false,
                }
        };
        if !batch.iter().all(writable) {
            let (keep, refuse): (Vec<Job>, Vec<Job>) = batch.drain(..).partition(writable);
            for job in refuse {
                let _ = job.done.send(Err(AuditError::Unavailable));
            }
            *batch = keep;
        }
        if batch.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let committed = self.commit(batch);
        self.shared
            .metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match committed {
            Ok(first_seq) => {
                self.shared.metrics.records.inc_by(batch.len() as u64);
                if health == RECOVERING {
                    self.recovered();
                }
                self.check_space();
                let acks: Acks = batch
                    .drain(..)
                    .enumerate()
                    .map(|(offset, job)| (job.done, first_seq + offset as u64))
                    .collect();
                match &self.syncer {
                    Some(syncer) => {
                        if let Err(mpsc::SendError(acks)) = syncer.send(acks) {
                            self.shared.fail_permanently();
                            for (done, _) in acks {
                                let _ = done.send(Err(AuditError::Unavailable));
                            }
                        }
                    }
                    None => {
                        let newest = acks.last().map(|(_, seq)| *seq);
                        if let Some(newest) = newest {
                            self.shared.committed.send_replace(newest);
                        }
                        for (done, seq) in acks {
                            // A caller that gave up waiting is not an error for the log.
                            let _ = done.send(Ok(seq));
                        }
                    }
                }
            }
            Err(error) => {
                tracing::error!(%error, "audit write failed; refusing agent traffic until writes succeed again");
                self.write_failed();
                for job in batch.drain(..) {
                    let _ = job.done.send(Err(AuditError::Unavailable));
                }
            }
        }
    }

    /// After a failed commit: nothing of the batch was acknowledged. Entries queued
    /// before now may rest on state that was never recorded (a mode change in the
    /// failed batch), so bumping the generation refuses them all.
    fn write_failed(&mut self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        let _ = self.shared.health.compare_exchange(
            HEALTHY,
            RECOVERING,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.check_space();
        if let Err(error) = self.reload_head() {
            // Commits reload the head again before writing; until that works, none happens.
            tracing::error!(%error, "cannot re-read the audit chain head");
        }
    }

    fn recovered(&self) {
        if self
            .shared
            .health
            .compare_exchange(RECOVERING, HEALTHY, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            tracing::warn!("audit writes succeed again; accepting agent traffic");
        }
    }

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
        (self.last_seq, self.last_hash) = match head {
            Some((seq, hash)) => (u64::try_from(seq).unwrap_or(0), hash),
            None => (0, GENESIS_HASH.to_owned()),
        };
        Ok(())
    }

    /// Re-checks free space, and while recovering tries a small write: when it
    /// succeeds the log accepts agent traffic again.
    fn probe(&mut self) {
        self.check_space();
        if self.shared.health() != RECOVERING {
            return;
        }
        let attempt = self.reload_head().and_then(|()| {
            self.connection
                .execute(
                    "INSERT OR REPLACE INTO audit_probe (id, at) VALUES (1, ?1)",
                    [format_time(Utc::now())],
                )
                .map_err(AuditError::from)
        });
        match attempt {
            Ok(_) => self.recovered(),
            Err(error) => tracing::debug!(%error, "audit write probe failed"),
        }
    }

    /// Records whether free space is below the reserve; logs each change.
    fn check_space(&mut self) {
        let reserve = self.shared.reserve.load(Ordering::SeqCst);
        let low = match disk_space(&self.data_dir) {
            Ok((free, _)) => free < reserve,
            Err(error) => {
                tracing::warn!(%error, "cannot read free disk space; treating it as low");
                true
            }
        };
        if self.shared.low_space.swap(low, Ordering::SeqCst) != low {
            if low {
                tracing::warn!(
                    reserve_bytes = reserve,
                    "free disk space is below the audit reserve; refusing agent traffic"
                );
            } else {
                tracing::warn!("free disk space is above the audit reserve again");
            }
        }
    }

    /// Writes the batch in one transaction; the chain state advances only on commit.
    fn commit(&mut self, batch: &[Job]) -> Result<u64, AuditError> {
        if !self.connection.is_autocommit() {
            // A failed commit left a transaction open and its head may be stale.
            self.reload_head()?;
        }
        let transaction = self.connection.transaction()?;
        let mut seq = self.last_seq;
        let mut hash = [0u8; 64];
        hash.copy_from_slice(self.last_hash.as_bytes());
        // Reused across rows so that a batch costs no per-row allocation for JSON.
        let mut arguments = Vec::with_capacity(256);
        let mut detail = Vec::with_capacity(256);
        let mut context = Vec::with_capacity(64);
        {
            let mut insert = transaction.prepare_cached(
                "INSERT INTO audit_log (seq, ts, principal, kind, tool, arguments, mode, decision, reason_code, outcome, detail, expires_at, prev_hash, hash, context, mac)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?;
            for job in batch {
                let entry = &job.entry;
                seq += 1;
                let time = format_time(entry.time);
                let expires_at = entry.expires_at.map(format_time);
                if let Some(value) = &entry.arguments {
                    write_bounded(&mut arguments, value, MAX_STORED_JSON_BYTES)?;
                }
                write_bounded(&mut detail, &entry.detail, MAX_STORED_JSON_BYTES)?;
                if let Some(value) = &entry.context {
                    write_bounded(&mut context, value, MAX_STORED_CONTEXT_BYTES)?;
                }
                let fields = Fields {
                    seq,
                    time: &time,
                    principal: cut(&entry.principal, MAX_STORED_NAME_BYTES),
                    kind: entry.kind.as_str(),
                    tool: entry
                        .tool
                        .as_deref()
                        .map(|tool| cut(tool, MAX_STORED_NAME_BYTES)),
                    arguments: match entry.arguments {
                        Some(_) => Some(utf8(&arguments)?),
                        None => None,
                    },
                    mode: cut(&entry.mode, MAX_STORED_NAME_BYTES),
                    decision: entry.decision.as_str(),
                    reason_code: entry.reason_code,
                    outcome: entry.outcome,
                    detail: utf8(&detail)?,
                    expires_at: expires_at.as_deref(),
                    context: match entry.context {
                        Some(_) => Some(utf8(&context)?),
                        None => None,
                    },
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
                    fields.context,
                    self.anchor.key().record_mac(utf8(&hash)?),
                ])?;
            }
        }
        transaction.commit()?;
        let first = self.last_seq + 1;
        self.last_seq = seq;
        self.last_hash = utf8(&hash)?.to_owned();
        self.anchor
            .committed(seq, &self.last_hash, self.syncer.is_none());
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

/// The result of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Records examined.
    pub records: u64,
    /// Hash of the newest record (the chain head), if any.
    pub head: Option<String>,
    /// The first broken record, if any.
    pub first_bad: Option<BrokenRecord>,
    /// The newest record the anchor vouches for, when a key was given and the anchor checked out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchored_seq: Option<u64>,
    /// Whether the key and anchor used live outside the data dir (`None`: no key given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchored_externally: Option<bool>,
}

/// Where and how the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenRecord {
    /// The sequence number of the first record that does not check out.
    pub seq: u64,
    /// What is wrong with it.
    pub problem: String,
}

/// Checks records one after another: sequence, link, hash and (with a key) MAC.
struct ChainCheck<'a> {
    key: Option<&'a AuditKey>,
    expected_seq: u64,
    /// `None` while the first record's link is not to be checked (a check from the middle).
    previous_hash: Option<String>,
}

impl ChainCheck<'_> {
    fn check(&mut self, row: Row) -> Result<(), BrokenRecord> {
        let broken = |problem: String| BrokenRecord {
            seq: row.seq,
            problem,
        };
        if row.seq != self.expected_seq {
            return Err(broken(if row.seq > self.expected_seq {
                format!(
                    "expected record {} next but found {}: record(s) {}..{} were deleted",
                    self.expected_seq,
                    row.seq,
                    self.expected_seq,
                    row.seq - 1
                )
            } else {
                format!("record {} is out of order", row.seq)
            }));
        }
        if self
            .previous_hash
            .as_ref()
            .is_some_and(|previous| *previous != row.prev_hash)
        {
            return Err(broken(
                "does not link to the record before it (records were deleted, reordered or replaced)"
                    .to_owned(),
            ));
        }
        if !row.hash_is_valid() {
            return Err(broken(
                "its content does not match its hash (the record was edited)".to_owned(),
            ));
        }
        if let Some(key) = self.key {
            match key.check_record(&row.hash, row.mac.as_deref()) {
                MacCheck::Valid => {}
                MacCheck::Missing => {
                    return Err(broken(
                        "carries no MAC: it was not written by Proxi with an audit key, or its MAC was removed"
                            .to_owned(),
                    ));
                }
                MacCheck::OtherKey(found) => {
                    return Err(broken(format!(
                        "key mismatch: it was authenticated with audit key {found}, but the key given is {}; use the operator credential this trail was written with",
                        key.id()
                    )));
                }
                MacCheck::Invalid => {
                    return Err(broken(
                        "its MAC does not match: the record was edited and its hash recomputed without the audit key (re-hashed)"
                            .to_owned(),
                    ));
                }
            }
        }
        self.previous_hash = Some(row.hash);
        self.expected_seq += 1;
        Ok(())
    }
}

fn hash_at(connection: &Connection, seq: u64) -> Result<Option<String>, AuditError> {
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
fn check_anchor(
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
fn check_chain_from(
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

/// The committed chain head, and writing it to the anchor file.
struct AnchorWriter {
    file: AnchorFile,
    head: Mutex<(u64, String)>,
    failing: AtomicBool,
}

impl AnchorWriter {
    fn key(&self) -> &AuditKey {
        self.file.key()
    }

    fn head(&self) -> (u64, String) {
        self.head
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Notes a commit; with `persist_now` (no fsync to wait for) also writes the anchor.
    fn committed(&self, seq: u64, hash: &str, persist_now: bool) {
        *self.head.lock().unwrap_or_else(PoisonError::into_inner) = (seq, hash.to_owned());
        if persist_now {
            self.persist((seq, hash.to_owned()));
        }
    }

    /// Writes the anchor. A failure leaves the old, lower anchor in place (it is never
    /// ahead of the trail, so nothing false is claimed) and is logged once until it heals.
    fn persist(&self, (seq, hash): (u64, String)) {
        match self.file.update(seq, &hash) {
            Ok(()) => {
                if self.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("the audit anchor is written again");
                }
            }
            Err(error) => {
                if !self.failing.swap(true, Ordering::AcqRel) {
                    tracing::error!(%error, "cannot update the audit anchor; a deleted tail after record {seq} would go unnoticed until it is written again");
                }
            }
        }
    }
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

fn verify_with(db_path: &Path, anchoring: Option<&Anchoring>) -> Result<Verification, AuditError> {
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
fn finish_unanchored(
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
            context: None,
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

    #[test]
    fn a_digest_keeps_a_prefix_and_the_hash_of_the_whole_text() {
        let value = json!({"blob": "é".repeat(2000)});
        let text = serde_json::to_string(&value).unwrap();
        let digest = json_digest(&value);
        assert_eq!(digest["truncated"], true);
        assert_eq!(digest["bytes"], text.len());
        assert_eq!(
            digest["sha256"],
            hex::encode(Sha256::digest(text.as_bytes()))
        );
        let prefix = digest["prefix"].as_str().unwrap();
        assert!(prefix.len() <= STORED_PREFIX_BYTES && text.starts_with(prefix));
        let small = json_digest(&json!({"a": 1}));
        assert_eq!(small["truncated"], false);
        assert_eq!(small["prefix"], "{\"a\":1}");
    }

    #[tokio::test]
    async fn every_variable_field_of_a_record_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        let mut huge = entry(1);
        huge.principal = Arc::from("p".repeat(10_000));
        huge.tool = Some("t".repeat(10_000));
        huge.arguments = Some(json!({"a": "x".repeat(100_000)}));
        huge.detail = json!("d".repeat(100_000));
        huge.context = Some(json!({"c": "y".repeat(100_000)}));
        log.append(huge).await.unwrap();
        let record = log.recent(1).unwrap().remove(0);
        let stored = serde_json::to_string(&record).unwrap();
        assert!(stored.len() < MAX_RECORD_BYTES, "{} bytes", stored.len());
        assert_eq!(record.principal.len(), MAX_STORED_NAME_BYTES);
        for field in [
            &record.arguments.unwrap(),
            &record.detail,
            &record.context.unwrap(),
        ] {
            assert_eq!(field["truncated"], true, "{field}");
            assert_eq!(field["sha256"].as_str().unwrap().len(), 64);
        }
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn the_context_is_stored_and_covered_by_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        let mut with_context = entry(1);
        with_context.context = Some(json!({"ticket": "INC-42"}));
        log.append(with_context).await.unwrap();
        log.append(entry(2)).await.unwrap();
        let records = log.recent(2).unwrap();
        assert_eq!(records[0].context, Some(json!({"ticket": "INC-42"})));
        assert_eq!(records[1].context, None);
        drop(log);
        tamper(
            dir.path(),
            r#"UPDATE audit_log SET context = '{"ticket":"INC-43"}' WHERE seq = 1"#,
        );
        assert_eq!(first_bad(dir.path()), Some(1));
    }

    #[tokio::test]
    async fn a_trail_from_before_context_verifies_and_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 3).await);
        // The schema of earlier versions: no context column.
        tamper(dir.path(), "ALTER TABLE audit_log DROP COLUMN context");
        assert_eq!(verify(&dir.path().join(AUDIT_DB_FILE)).unwrap().records, 3);
        assert_eq!(first_bad(dir.path()), None);
        let (log, recovered) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert_eq!(recovered.records, 3);
        let mut with_context = entry(4);
        with_context.context = Some(json!({"why": "after migration"}));
        assert_eq!(log.append(with_context).await.unwrap(), 4);
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn below_the_reserve_only_essential_work_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert!(log.admit(Priority::Agent).is_ok());
        log.set_space_reserve(u64::MAX);
        // The writer notices at its next commit.
        log.append(entry(1)).await.unwrap();
        assert!(matches!(
            log.admit(Priority::Agent),
            Err(AuditError::LowSpace)
        ));
        assert!(log.admit(Priority::Essential).is_ok());
        assert_eq!(
            log.append_with(entry(2), Priority::Essential)
                .await
                .unwrap(),
            2
        );
        // Space comes back: the writer's periodic check lifts the refusal by itself.
        log.set_space_reserve(0);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log.admit(Priority::Agent).is_err() {
            assert!(std::time::Instant::now() < deadline, "still refused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!log.is_low_on_space());
    }

    /// Makes every insert into the chain fail, as a full disk would, until removed.
    const BREAK_WRITES: &str = "CREATE TRIGGER break_writes BEFORE INSERT ON audit_log
        BEGIN SELECT RAISE(ABORT, 'injected write failure'); END;";

    #[tokio::test]
    async fn a_failed_write_refuses_agents_until_a_write_succeeds_again() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Full).unwrap();
        log.append(entry(1)).await.unwrap();
        tamper(dir.path(), BREAK_WRITES);
        assert!(log.append(entry(2)).await.is_err());
        assert!(!log.is_healthy());
        assert!(matches!(
            log.admit(Priority::Agent),
            Err(AuditError::Unavailable)
        ));
        assert!(log.admit(Priority::Essential).is_ok());
        assert!(log.append(entry(3)).await.is_err(), "agents are refused");
        let essential = log.append_with(entry(4), Priority::Essential);
        assert!(essential.await.is_err(), "the write still fails");

        tamper(dir.path(), "DROP TRIGGER break_writes");
        // An essential write is also a probe: its success ends the recovery.
        let seq = log
            .append_with(entry(5), Priority::Essential)
            .await
            .unwrap();
        assert_eq!(seq, 2, "failed batches leave no hole in the chain");
        assert!(log.is_healthy());
        assert_eq!(log.append(entry(6)).await.unwrap(), 3);
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn the_probe_makes_the_log_healthy_again_without_traffic() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        tamper(dir.path(), BREAK_WRITES);
        assert!(log.append(entry(1)).await.is_err());
        tamper(dir.path(), "DROP TRIGGER break_writes");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !log.is_healthy() {
            assert!(
                std::time::Instant::now() < deadline,
                "the probe never succeeded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(log.append(entry(2)).await.unwrap(), 1);
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn entries_queued_before_a_failure_are_refused_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        log.append(entry(1)).await.unwrap();
        // Hold the write lock so that everything is queued before the first batch
        // fails; only the record of entry(0) is refused by the database, so later
        // batches could be written if nothing stopped them.
        let blocker = Connection::open(dir.path().join(AUDIT_DB_FILE)).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut pendings: Vec<Pending> = (0..MAX_BATCH as i64 + 500)
            .map(|n| log.submit_with(entry(n), Priority::Essential))
            .collect();
        blocker
            .execute_batch(
                r#"CREATE TRIGGER break_one BEFORE INSERT ON audit_log
                   WHEN NEW.arguments = '{"count":0}'
                   BEGIN SELECT RAISE(ABORT, 'injected write failure'); END;"#,
            )
            .unwrap();
        blocker.execute_batch("COMMIT").unwrap();
        let first = pendings.remove(0);
        assert!(first.durable().await.is_err(), "the first batch fails");
        let mut written = Vec::new();
        for pending in pendings {
            if let Ok(seq) = pending.durable().await {
                written.push(seq);
            }
        }
        // They were decided before the failure, perhaps under state that the failed
        // batch recorded: none of them may be written after it.
        assert!(written.is_empty(), "{} written", written.len());
        assert!(!log.is_healthy());
        let seq = log
            .append_with(entry(5), Priority::Essential)
            .await
            .unwrap();
        assert_eq!(seq, 2);
        assert_eq!(first_bad(dir.path()), None);
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

    fn anchoring(dir: &Path) -> Anchoring {
        Anchoring::in_data_dir(dir).unwrap()
    }

    fn anchored_problem(dir: &Path, anchoring: &Anchoring) -> Option<BrokenRecord> {
        verify_anchored(&dir.join(AUDIT_DB_FILE), anchoring)
            .unwrap()
            .first_bad
    }

    /// Recomputes every hash as someone without the key would after an edit.
    fn rehash(dir: &Path) {
        let connection = Connection::open(dir.join(AUDIT_DB_FILE)).unwrap();
        let rows: Vec<Row> = connection
            .prepare(&format!(
                "SELECT {SELECT_COLUMNS} FROM audit_log ORDER BY seq"
            ))
            .unwrap()
            .query_map([], Row::from_sql)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut previous = GENESIS_HASH.to_owned();
        for row in rows {
            let hash = String::from_utf8(row.fields().hash(&previous).to_vec()).unwrap();
            connection
                .execute(
                    "UPDATE audit_log SET prev_hash = ?1, hash = ?2 WHERE seq = ?3",
                    params![previous, hash, row.seq as i64],
                )
                .unwrap();
            previous = hash;
        }
    }

    #[tokio::test]
    async fn an_anchored_chain_verifies_and_names_its_anchor() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 4).await);
        let report =
            verify_anchored(&dir.path().join(AUDIT_DB_FILE), &anchoring(dir.path())).unwrap();
        assert_eq!(report.first_bad, None);
        assert_eq!(report.anchored_seq, Some(4));
        assert_eq!(report.anchored_externally, Some(false));
    }

    #[tokio::test]
    async fn a_truncated_tail_is_caught_by_the_anchor_even_with_sqlite_sequence_fixed() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 5).await);
        tamper(
            dir.path(),
            "DELETE FROM audit_log WHERE seq >= 4; UPDATE sqlite_sequence SET seq = 3 WHERE name = 'audit_log';",
        );
        assert_eq!(
            first_bad(dir.path()),
            None,
            "the hash chain alone cannot tell"
        );
        let broken = anchored_problem(dir.path(), &anchoring(dir.path())).unwrap();
        assert_eq!(broken.seq, 4);
        assert!(broken.problem.contains("truncated"), "{}", broken.problem);
        assert!(matches!(
            AuditLog::open(dir.path(), Durability::Process),
            Err(AuditError::Truncated {
                last: 3,
                anchored: 5,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_rehashed_edit_is_named_by_its_mac() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 5).await);
        tamper(
            dir.path(),
            "UPDATE audit_log SET principal = 'operator' WHERE seq = 2",
        );
        rehash(dir.path());
        assert_eq!(
            first_bad(dir.path()),
            None,
            "the hash chain alone cannot tell"
        );
        let broken = anchored_problem(dir.path(), &anchoring(dir.path())).unwrap();
        assert_eq!(broken.seq, 2);
        assert!(broken.problem.contains("re-hashed"), "{}", broken.problem);
        assert!(matches!(
            AuditLog::open(dir.path(), Durability::Process),
            Err(AuditError::TamperedTail(5))
        ));
    }

    #[tokio::test]
    async fn another_key_is_reported_as_a_key_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 2).await);
        let other = tempfile::tempdir().unwrap();
        let wrong = Anchoring::external(AuditKey::from_bytes([9; 32]), &other.path().join("cred"));
        let broken = anchored_problem(dir.path(), &wrong).unwrap();
        assert_eq!(broken.seq, 1);
        assert!(
            broken.problem.contains("key mismatch"),
            "{}",
            broken.problem
        );
        assert!(matches!(
            AuditLog::open_anchored(dir.path(), Durability::Process, wrong),
            Err(AuditError::KeyMismatch { seq: 2, .. })
        ));
    }

    #[tokio::test]
    async fn an_edited_mode_change_before_the_tail_is_reported_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 1).await;
        let mut change = entry(0);
        change.kind = EntryKind::ModeChange;
        change.expires_at = Some(Utc::now());
        log.append(change).await.unwrap();
        log.append(entry(3)).await.unwrap();
        drop(log);
        let (_, recovered) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert_eq!(recovered.mode_event_problem, None);
        tamper(
            dir.path(),
            "UPDATE audit_log SET expires_at = '2099-01-01T00:00:00.000000Z' WHERE seq = 2",
        );
        let (_, recovered) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert_eq!(recovered.last_mode_event.map(|record| record.seq), Some(2));
        let problem = recovered.mode_event_problem.unwrap();
        assert!(problem.starts_with("record 2:"), "{problem}");
    }
}

// TEMPORARY (console branch): the store helper's filtered query lands with the
// audit split under these names; this scan stands in until that merge replaces it.

/// Most records one query returns.
pub const MAX_QUERY_LIMIT: u32 = 1000;

/// A filtered read of the trail; every filter optional, all given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Exact principal.
    pub principal: Option<String>,
    /// Exact kind.
    pub kind: Option<String>,
    /// Tool name, exact or a `*` glob.
    pub tool: Option<String>,
    /// Exact decision.
    pub decision: Option<String>,
    /// Exact reason code.
    pub reason_code: Option<String>,
    /// Records at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Records strictly before this time.
    pub until: Option<DateTime<Utc>>,
    /// The cursor: only records with a greater seq, oldest first.
    pub after_seq: Option<u64>,
    /// Most records returned; clamped to 1..=[`MAX_QUERY_LIMIT`].
    pub limit: u32,
}

/// One page of a query.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditPage {
    /// Matching records, oldest first.
    pub records: Vec<AuditRecord>,
    /// With a cursor: the seq to continue after, when more records match.
    pub next_after_seq: Option<u64>,
}

fn glob_matches(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(mut remaining) = text.strip_prefix(head) else {
                return false;
            };
            let parts: Vec<&str> = rest.split('*').collect();
            for (index, part) in parts.iter().enumerate() {
                if index == parts.len() - 1 {
                    return remaining.ends_with(part);
                }
                match remaining.find(part) {
                    Some(at) => remaining = &remaining[at + part.len()..],
                    None => return false,
                }
            }
            true
        }
    }
}

impl AuditQuery {
    fn matches(&self, record: &AuditRecord) -> bool {
        let exact = |filter: &Option<String>, value: Option<&str>| {
            filter.as_deref().is_none_or(|wanted| Some(wanted) == value)
        };
        let time = DateTime::parse_from_rfc3339(&record.time).map(|time| time.to_utc());
        exact(&self.principal, Some(&record.principal))
            && exact(&self.kind, Some(&record.kind))
            && exact(&self.decision, Some(&record.decision))
            && exact(&self.reason_code, record.reason_code.as_deref())
            && self.tool.as_deref().is_none_or(|pattern| {
                record
                    .tool
                    .as_deref()
                    .is_some_and(|tool| glob_matches(pattern, tool))
            })
            && self
                .since
                .is_none_or(|since| time.is_ok_and(|time| time >= since))
            && self
                .until
                .is_none_or(|until| time.is_ok_and(|time| time < until))
    }
}

impl AuditLog {
    /// Answers a filtered query; blocking I/O.
    pub fn query(&self, query: &AuditQuery) -> Result<AuditPage, AuditError> {
        let limit = query.limit.clamp(1, MAX_QUERY_LIMIT) as usize;
        let after = query.after_seq.unwrap_or(0);
        let mut matching = Vec::new();
        for_each_record(&self.db_path, |record| {
            if record.seq > after && query.matches(&record) {
                matching.push(record);
            }
        })?;
        let next_after_seq = match query.after_seq {
            Some(_) if matching.len() > limit => {
                matching.truncate(limit);
                matching.last().map(|record| record.seq)
            }
            Some(_) => None,
            None => {
                let skip = matching.len().saturating_sub(limit);
                matching.drain(..skip);
                None
            }
        };
        Ok(AuditPage {
            records: matching,
            next_after_seq,
        })
    }
}
