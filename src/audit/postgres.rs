//! The PostgreSQL store, for several Proxi instances sharing one trail (see
//! docs/scale-out.md). One hash chain for all instances: every batch takes a
//! transaction-scoped advisory lock, reads the chain head inside the transaction,
//! appends and commits, so batches of different instances never interleave.
//!
//! No TLS: the connection is for loopback or a trusted network.

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::*;
use crate::anchor::AuditKey;
use crate::postgres_pool::PoolFailure;

/// The advisory lock that serializes appends to the chain (any fixed number; this
/// one spells "proxi" in ASCII).
const CHAIN_LOCK: i64 = 0x70_72_6f_78_69;
/// The advisory lock that serializes migrations of instances starting together.
const MIGRATION_LOCK: i64 = CHAIN_LOCK + 1;
/// Longest wait for one store operation before it counts as failed.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections per instance: the writer's and a few readers'.
const POOL_SIZE: usize = 6;
/// How long an instance may go without a heartbeat before the others count it dead.
const ALIVE_WITHIN: &str = "3 seconds";
/// How long the heartbeat of an instance gone for good is kept (with what it left in flight).
const FORGET_AFTER: &str = "1 hour";
/// Records fetched per round trip while scanning the chain.
const SCAN_PAGE: i64 = 2000;

const COLUMNS: &str = "seq, ts, principal, kind, tool, arguments, mode, decision, reason_code, outcome, detail, expires_at, prev_hash, hash, context, mac, policy_hash, role";

/// Tables and indexes; every statement is idempotent, run at every start.
const MIGRATIONS: &str = r#"
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY,
    ts TEXT COLLATE "C" NOT NULL,
    principal TEXT COLLATE "C" NOT NULL,
    kind TEXT COLLATE "C" NOT NULL,
    tool TEXT COLLATE "C",
    arguments TEXT,
    mode TEXT NOT NULL,
    decision TEXT COLLATE "C" NOT NULL,
    reason_code TEXT COLLATE "C",
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
-- Added after the first release of this schema: the policy that decided a call.
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS policy_hash TEXT;
-- Added later still: the role the principal acted in.
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS role TEXT;
-- One index per query filter, continuing with seq (a page is read in seq order
-- from it); the three that lead queries of several filters carry the other filter
-- columns as keys, so the others are checked in the index (see sqlite.rs).
DROP INDEX IF EXISTS audit_log_principal;
DROP INDEX IF EXISTS audit_log_tool;
DROP INDEX IF EXISTS audit_log_reason_code;
CREATE INDEX IF NOT EXISTS audit_log_principal_filters
    ON audit_log (principal, seq, kind, tool, decision, reason_code, ts);
CREATE INDEX IF NOT EXISTS audit_log_tool_filters
    ON audit_log (tool, seq, principal, kind, decision, reason_code, ts);
CREATE INDEX IF NOT EXISTS audit_log_reason_code_filters
    ON audit_log (reason_code, seq, principal, kind, tool, decision, ts);
CREATE INDEX IF NOT EXISTS audit_log_kind ON audit_log (kind, seq);
CREATE INDEX IF NOT EXISTS audit_log_decision ON audit_log (decision, seq);
CREATE INDEX IF NOT EXISTS audit_log_ts ON audit_log (ts);
-- The highest seq ever committed, updated in every batch's transaction: a deleted
-- tail shows as records this row vouches for but the table lacks.
CREATE TABLE IF NOT EXISTS audit_high_water (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL
);
INSERT INTO audit_high_water (id, seq) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
-- Scratch row the writer rewrites to find out whether writes succeed again.
CREATE TABLE IF NOT EXISTS audit_probe (id INTEGER PRIMARY KEY, at TIMESTAMPTZ NOT NULL);
-- The mode shared by every instance: written in the transaction of the mode record
-- it reflects; every mode record bumps the epoch.
CREATE TABLE IF NOT EXISTS proxi_mode (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    mode TEXT NOT NULL,
    expires_at TEXT,
    epoch BIGINT NOT NULL,
    seq BIGINT NOT NULL
);
-- Every instance's last sign of life (its heartbeat), by the id its connection registered.
CREATE TABLE IF NOT EXISTS proxi_instances (
    id TEXT PRIMARY KEY,
    seen TIMESTAMPTZ NOT NULL
);
-- Allowed calls whose intent is committed and whose outcome is not: inserted in the
-- intent's transaction, deleted in the outcome's, read by a switch's drain.
CREATE TABLE IF NOT EXISTS proxi_in_flight (
    intent_seq BIGINT PRIMARY KEY,
    instance TEXT NOT NULL,
    tool TEXT NOT NULL,
    arguments TEXT
);
"#;

/// Audit store failures specific to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The `--store` URL is not a PostgreSQL connection string.
    #[error("invalid PostgreSQL store URL: {0}")]
    Url(String),
    /// The server refused a statement or the connection broke.
    #[error("PostgreSQL: {0}")]
    Server(#[from] tokio_postgres::Error),
    /// No connection could be had from the pool (server down, or all busy).
    #[error("no PostgreSQL connection: {0}")]
    Pool(String),
    /// An operation took longer than the store allows one (5 s).
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
    /// The store's own runtime could not be started.
    #[error("cannot start the PostgreSQL client runtime: {0}")]
    Runtime(std::io::Error),
}

impl From<tokio_postgres::Error> for AuditError {
    fn from(error: tokio_postgres::Error) -> AuditError {
        AuditError::Postgres(PostgresError::Server(error))
    }
}

/// The trail in a PostgreSQL database shared by every instance.
pub struct PostgresStore {
    /// `user@host:port/db`, never the password.
    target: String,
    /// Its connections, on a runtime of their own: its callers are the writer
    /// thread and blocking readers, which must not depend on whichever runtime
    /// the caller runs.
    connections: crate::postgres_pool::BlockingPool,
    buffers: Mutex<SealBuffers>,
    /// This connection's instance id (random, per process), for in-flight rows and heartbeats.
    instance: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// What an operation that could not be run counts as.
fn pool_failure(failure: PoolFailure) -> AuditError {
    match failure {
        PoolFailure::Timeout(timeout) => PostgresError::Timeout(timeout).into(),
        PoolFailure::Runtime(error) => PostgresError::Runtime(error).into(),
        PoolFailure::Build(error) => PostgresError::Pool(error).into(),
        PoolFailure::Closed | PoolFailure::ThreadFailed => AuditError::Unavailable,
    }
}

/// Whether `location` names a PostgreSQL store rather than a path.
pub fn is_postgres_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://USER@HOST:PORT/DB`) and runs
    /// the migrations. Fails if the server cannot be reached now.
    pub fn connect(url: &str) -> Result<PostgresStore, AuditError> {
        let config = crate::postgres_pool::config(url, "proxi")
            .map_err(|error| PostgresError::Url(error.to_string()))?;
        let target = describe_config(&config);
        let connections = crate::postgres_pool::BlockingPool::new(
            config,
            "proxi-postgres",
            POOL_SIZE,
            OPERATION_TIMEOUT,
        )
        .map_err(pool_failure)?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|error| PostgresError::Pool(error.to_string()))?;
        let instance = format!(
            "{}-{}",
            std::process::id(),
            id.iter()
                .map(|byte| format!("{byte:02x}"))
                .collect::<String>()
        );
        let store = PostgresStore {
            target,
            connections,
            buffers: Mutex::new(SealBuffers::default()),
            instance,
        };
        store.migrate()?;
        store.heartbeat()?;
        Ok(store)
    }

    /// Runs `work` on the store's runtime and waits for it, bounded by
    /// [`OPERATION_TIMEOUT`]. Callable from any thread, inside a runtime or not.
    fn run<T: Send>(
        &self,
        work: impl Future<Output = Result<T, AuditError>> + Send,
    ) -> Result<T, AuditError> {
        self.connections
            .run(OPERATION_TIMEOUT, work)
            .unwrap_or_else(|failure| Err(pool_failure(failure)))
    }

    async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, AuditError> {
        pool.get()
            .await
            .map_err(|error| PostgresError::Pool(error.to_string()).into())
    }

    fn migrate(&self) -> Result<(), AuditError> {
        let pool = self.connections.pool();
        self.run(async move {
            let mut client = Self::client(pool).await?;
            let transaction = client.transaction().await?;
            transaction
                .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            transaction.batch_execute(MIGRATIONS).await?;
            transaction.commit().await?;
            Ok(())
        })
    }

    fn query_records(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<StoredRecord>, AuditError> {
        let pool = self.connections.pool();
        self.run(async move {
            let client = Self::client(pool).await?;
            let rows = client.query(sql, params).await?;
            rows.iter().map(stored_record).collect()
        })
    }
}

fn describe_config(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

fn stored_record(row: &Row) -> Result<StoredRecord, AuditError> {
    let seq: i64 = row.try_get(0)?;
    Ok(StoredRecord {
        seq: u64::try_from(seq).unwrap_or(0),
        time: row.try_get(1)?,
        principal: row.try_get(2)?,
        kind: row.try_get(3)?,
        tool: row.try_get(4)?,
        arguments: row.try_get(5)?,
        mode: row.try_get(6)?,
        decision: row.try_get(7)?,
        reason_code: row.try_get(8)?,
        outcome: row.try_get(9)?,
        detail: row.try_get(10)?,
        expires_at: row.try_get(11)?,
        prev_hash: row.try_get(12)?,
        hash: row.try_get(13)?,
        context: row.try_get(14)?,
        mac: row.try_get(15)?,
        policy_hash: row.try_get(16)?,
        role: row.try_get(17)?,
    })
}

fn is_mode_record(kind: &str) -> bool {
    kind == EntryKind::ModeChange.as_str() || kind == EntryKind::ModeExpired.as_str()
}

fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// `*` globs as LIKE patterns: `%`, `_` and the escape character match themselves.
fn like_pattern(glob: &str) -> String {
    let mut pattern = String::with_capacity(glob.len() + 4);
    for character in glob.chars() {
        match character {
            '\\' | '%' | '_' => {
                pattern.push('\\');
                pattern.push(character);
            }
            '*' => pattern.push('%'),
            other => pattern.push(other),
        }
    }
    pattern
}

impl AuditStore for PostgresStore {
    fn describe(&self) -> String {
        self.target.clone()
    }

    fn head(&self) -> Result<Option<StoredRecord>, AuditError> {
        Ok(self
            .query_records(
                &format!("SELECT {COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT 1"),
                &[],
            )?
            .pop())
    }

    fn hash_at(&self, seq: u64) -> Result<Option<String>, AuditError> {
        if seq == 0 {
            return Ok(Some(GENESIS_HASH.to_owned()));
        }
        let pool = self.connections.pool();
        self.run(async move {
            let client = Self::client(pool).await?;
            let row = client
                .query_opt(
                    "SELECT hash FROM audit_log WHERE seq = $1",
                    &[&seq_param(seq)],
                )
                .await?;
            Ok(row.map(|row| row.try_get(0)).transpose()?)
        })
    }

    fn append(&self, entries: &[&AuditEntry], key: &AuditKey) -> Result<Appended, AuditError> {
        self.append_decided(entries, &[], key)
    }

    fn shares_mode(&self) -> bool {
        true
    }

    fn append_decided(
        &self,
        entries: &[&AuditEntry],
        decided_epochs: &[Option<u64>],
        key: &AuditKey,
    ) -> Result<Appended, AuditError> {
        let pool = self.connections.pool();
        let mut buffers = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        let buffers = &mut *buffers;
        self.run(async move {
            let mut client = Self::client(pool).await?;
            let transaction = client.transaction().await?;
            // Statements prepared once per connection, and sent together: each
            // round trip saved is one more batch per second under the chain lock.
            let (lock, read_head, read_mode) = tokio::try_join!(
                transaction.prepare_cached("SELECT pg_advisory_xact_lock($1)"),
                transaction.prepare_cached("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"),
                transaction.prepare_cached("SELECT mode, seq, epoch FROM proxi_mode WHERE id = 1"),
            )?;
            // In this order on the one connection: the lock (held until commit or
            // rollback: one instance's batch at a time), then the reads under it.
            let (_, head_row, mode_row) = tokio::try_join!(
                transaction.execute(&lock, &[&CHAIN_LOCK]),
                transaction.query_opt(&read_head, &[]),
                transaction.query_opt(&read_mode, &[]),
            )?;
            let mut head = match head_row {
                Some(row) => ChainHead {
                    seq: u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0),
                    hash: row.try_get(1)?,
                },
                None => ChainHead::genesis(),
            };
            // The shared mode as of this transaction (under the chain lock, so no
            // other batch moves it), followed through the batch.
            let mut shared_mode: Option<(String, u64)> = None;
            let mut epoch = 0;
            if let Some(row) = mode_row {
                shared_mode = Some((
                    row.try_get(0)?,
                    u64::try_from(row.try_get::<_, i64>(1)?).unwrap_or(0),
                ));
                epoch = u64::try_from(row.try_get::<_, i64>(2)?).unwrap_or(0);
            }
            let mut records = Vec::with_capacity(entries.len());
            let mut seqs = Vec::with_capacity(entries.len());
            let mut stale = Vec::new();
            let (mut intents, mut intent_tools, mut intent_arguments) =
                (Vec::new(), Vec::new(), Vec::new());
            let mut resolved: Vec<i64> = Vec::new();
            for (index, entry) in entries.iter().enumerate() {
                // Every instance that held the elevated mode notices its lapse; the
                // first to commit records it, the others find the mode already back.
                if entry.kind == EntryKind::ModeExpired
                    && let Some((mode, seq)) = &shared_mode
                    && *mode == *entry.mode
                {
                    seqs.push(*seq);
                    continue;
                }
                // A decision taken under another epoch than the row's may rest on
                // a mode no longer in force: it is recorded as refused, never run.
                let refused;
                let entry = match decided_epochs.get(index).copied().flatten() {
                    Some(decided) if decided != epoch => {
                        stale.push(index);
                        let mode = shared_mode.as_ref().map_or(&*entry.mode, |(mode, _)| mode);
                        refused = entry.refused_as_stale(decided, epoch, mode);
                        &refused
                    }
                    _ => *entry,
                };
                let record = seal(&mut head, entry, key, buffers)?;
                if is_mode_record(&record.kind) {
                    shared_mode = Some((record.mode.clone(), record.seq));
                    epoch += 1;
                }
                if entry.kind == EntryKind::ToolCall {
                    if entry.decision == AuditDecision::Allowed
                        && entry.outcome == crate::audit_view::PENDING
                    {
                        intents.push(seq_param(record.seq));
                        intent_tools.push(record.tool.clone().unwrap_or_default());
                        intent_arguments.push(record.arguments.clone());
                    }
                    if let Some(intent) = entry
                        .detail
                        .get(crate::audit_view::INTENT_SEQ)
                        .and_then(serde_json::Value::as_u64)
                    {
                        resolved.push(seq_param(intent));
                    }
                }
                seqs.push(record.seq);
                records.push(record);
            }
            if records.is_empty() {
                transaction.commit().await?;
                return Ok(Appended { head, seqs, stale });
            }
            // One statement for the whole batch: columns as arrays, unnested.
            let column = |get: fn(&StoredRecord) -> Option<&str>| -> Vec<Option<&str>> {
                records.iter().map(get).collect()
            };
            let seq_column: Vec<i64> = records.iter().map(|record| seq_param(record.seq)).collect();
            let times = column(|r| Some(&r.time));
            let principals = column(|r| Some(&r.principal));
            let kinds = column(|r| Some(&r.kind));
            let tools = column(|r| r.tool.as_deref());
            let arguments = column(|r| r.arguments.as_deref());
            let modes = column(|r| Some(&r.mode));
            let decisions = column(|r| Some(&r.decision));
            let reasons = column(|r| r.reason_code.as_deref());
            let outcomes = column(|r| Some(&r.outcome));
            let details = column(|r| Some(&r.detail));
            let expiries = column(|r| r.expires_at.as_deref());
            let prev_hashes = column(|r| Some(&r.prev_hash));
            let hashes = column(|r| Some(&r.hash));
            let contexts = column(|r| r.context.as_deref());
            let macs = column(|r| r.mac.as_deref());
            let policy_hashes = column(|r| r.policy_hash.as_deref());
            let roles = column(|r| r.role.as_deref());
            let insert_sql = format!(
                "INSERT INTO audit_log ({COLUMNS}) SELECT * FROM UNNEST(
                    $1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[],
                    $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::TEXT[], $11::TEXT[], $12::TEXT[],
                    $13::TEXT[], $14::TEXT[], $15::TEXT[], $16::TEXT[], $17::TEXT[], $18::TEXT[])"
            );
            let (insert, raise_high_water) = tokio::try_join!(
                transaction.prepare_cached(&insert_sql),
                transaction.prepare_cached(
                    "UPDATE audit_high_water SET seq = GREATEST(seq, $1) WHERE id = 1"
                ),
            )?;
            let high_water = seq_param(head.seq);
            let high_water_params: [&(dyn ToSql + Sync); 1] = [&high_water];
            let insert_params: [&(dyn ToSql + Sync); 18] = [
                        &seq_column,
                        &times,
                        &principals,
                        &kinds,
                        &tools,
                        &arguments,
                        &modes,
                        &decisions,
                        &reasons,
                        &outcomes,
                        &details,
                        &expiries,
                        &prev_hashes,
                        &hashes,
                        &contexts,
                        &macs,
                        &policy_hashes,
                        &roles,
                    ];
            tokio::try_join!(
                transaction.execute(&insert, &insert_params),
                transaction.execute(&raise_high_water, &high_water_params),
            )?;
            if !intents.is_empty() {
                transaction
                    .execute(
                        "INSERT INTO proxi_in_flight (intent_seq, instance, tool, arguments)
                         SELECT seq, $2, tool, arguments FROM UNNEST($1::BIGINT[], $3::TEXT[], $4::TEXT[])
                             AS t(seq, tool, arguments)",
                        &[&intents, &self.instance, &intent_tools, &intent_arguments],
                    )
                    .await?;
            }
            if !resolved.is_empty() {
                transaction
                    .execute(
                        "DELETE FROM proxi_in_flight WHERE intent_seq = ANY($1)",
                        &[&resolved],
                    )
                    .await?;
            }
            let mode_records: Vec<&StoredRecord> = records
                .iter()
                .filter(|record| is_mode_record(&record.kind))
                .collect();
            if let Some(last) = mode_records.last() {
                let bump = i64::try_from(mode_records.len()).unwrap_or(i64::MAX);
                transaction
                    .execute(
                        "INSERT INTO proxi_mode (id, mode, expires_at, epoch, seq) VALUES (1, $1, $2, $3, $4)
                         ON CONFLICT (id) DO UPDATE SET mode = EXCLUDED.mode,
                             expires_at = EXCLUDED.expires_at,
                             epoch = proxi_mode.epoch + EXCLUDED.epoch, seq = EXCLUDED.seq",
                        &[&last.mode, &last.expires_at, &bump, &seq_param(last.seq)],
                    )
                    .await?;
            }
            transaction.commit().await?;
            Ok(Appended { head, seqs, stale })
        })
    }

    fn shared_mode(&self) -> Result<Option<SharedMode>, AuditError> {
        let pool = self.connections.pool();
        self.run(async move {
            let client = Self::client(pool).await?;
            let row = client
                .query_opt(
                    "SELECT mode, expires_at, epoch, seq FROM proxi_mode WHERE id = 1",
                    &[],
                )
                .await?;
            let Some(row) = row else { return Ok(None) };
            let number = |index: usize| -> Result<u64, AuditError> {
                Ok(u64::try_from(row.try_get::<_, i64>(index)?).unwrap_or(0))
            };
            Ok(Some(SharedMode {
                mode: row.try_get(0)?,
                expires_at: row.try_get(1)?,
                epoch: number(2)?,
                seq: number(3)?,
            }))
        })
    }

    fn in_flight_before(&self, seq: u64) -> Result<Vec<InFlightIntent>, AuditError> {
        let pool = self.connections.pool();
        self.run(async move {
            let client = Self::client(pool).await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT f.intent_seq, f.instance, COALESCE(i.seen > now() - interval '{ALIVE_WITHIN}', false),
                                f.tool, f.arguments
                         FROM proxi_in_flight f LEFT JOIN proxi_instances i ON i.id = f.instance
                         WHERE f.intent_seq < $1 ORDER BY f.intent_seq"
                    ),
                    &[&seq_param(seq)],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(InFlightIntent {
                        intent_seq: u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0),
                        instance: row.try_get(1)?,
                        alive: row.try_get(2)?,
                        tool: row.try_get(3)?,
                        arguments: row.try_get(4)?,
                    })
                })
                .collect()
        })
    }

    fn heartbeat(&self) -> Result<(), AuditError> {
        let pool = self.connections.pool();
        let instance = &self.instance;
        self.run(async move {
            let client = Self::client(pool).await?;
            client
                .execute(
                    "INSERT INTO proxi_instances (id, seen) VALUES ($1, now())
                     ON CONFLICT (id) DO UPDATE SET seen = EXCLUDED.seen",
                    &[instance],
                )
                .await?;
            // Bounded: instances gone for long, and the calls they left unresolved.
            client
                .batch_execute(&format!(
                    "DELETE FROM proxi_instances WHERE seen < now() - interval '{FORGET_AFTER}';
                     DELETE FROM proxi_in_flight f
                         WHERE NOT EXISTS (SELECT 1 FROM proxi_instances i WHERE i.id = f.instance);"
                ))
                .await?;
            Ok(())
        })
    }

    fn reset(&self) -> Result<(), AuditError> {
        // Every append reads the head inside its own transaction: nothing is cached.
        Ok(())
    }

    fn probe(&self) -> Result<(), AuditError> {
        let pool = self.connections.pool();
        self.run(async move {
            let client = Self::client(pool).await?;
            client
                .execute(
                    "INSERT INTO audit_probe (id, at) VALUES (1, now())
                     ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at",
                    &[],
                )
                .await?;
            Ok(())
        })
    }

    fn durable_sync(&self) -> Result<Option<Box<dyn DurableSync>>, AuditError> {
        // A commit returns after the server made it durable (synchronous_commit).
        Ok(None)
    }

    fn free_space(&self) -> Option<std::io::Result<(u64, u64)>> {
        None
    }

    fn last_mode_event(&self) -> Result<Option<AuditRecord>, AuditError> {
        Ok(self
            .query_records(
                &format!(
                    "SELECT {COLUMNS} FROM audit_log WHERE kind IN ('mode_change', 'mode_expired') ORDER BY seq DESC LIMIT 1"
                ),
                &[],
            )?
            .pop()
            .map(StoredRecord::into_record))
    }

    fn scan_from(
        &self,
        seq: u64,
        visit: &mut dyn FnMut(StoredRecord) -> bool,
    ) -> Result<(), AuditError> {
        let mut from = seq_param(seq);
        loop {
            let page = self.query_records(
                &format!(
                    "SELECT {COLUMNS} FROM audit_log WHERE seq >= $1 ORDER BY seq LIMIT {SCAN_PAGE}"
                ),
                &[&from],
            )?;
            let full = page.len() as i64 == SCAN_PAGE;
            for record in page {
                from = seq_param(record.seq) + 1;
                if !visit(record) {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn highest_seq_written(&self) -> Result<Option<u64>, AuditError> {
        let pool = self.connections.pool();
        self.run(async move {
            let client = Self::client(pool).await?;
            let row = client
                .query_opt("SELECT seq FROM audit_high_water WHERE id = 1", &[])
                .await?;
            Ok(row
                .map(|row| row.try_get::<_, i64>(0))
                .transpose()?
                .and_then(|seq| u64::try_from(seq).ok()))
        })
    }

    fn recent(&self, limit: u32) -> Result<Vec<AuditRecord>, AuditError> {
        let mut records = self.query_records(
            &format!("SELECT {COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT $1"),
            &[&i64::from(limit)],
        )?;
        records.reverse();
        Ok(records.into_iter().map(StoredRecord::into_record).collect())
    }

    fn query(&self, query: &AuditQuery) -> Result<AuditPage, AuditError> {
        let mut conditions: Vec<String> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        let mut exact = |column: &str, value: &Option<String>| {
            if let Some(value) = value {
                texts.push(value.clone());
                conditions.push(format!("{column} = ${}", texts.len()));
            }
        };
        exact("principal", &query.principal);
        exact("kind", &query.kind);
        exact("decision", &query.decision);
        exact("reason_code", &query.reason_code);
        match query.tool_pattern() {
            Some((pattern, true)) => {
                texts.push(like_pattern(pattern));
                conditions.push(format!("tool LIKE ${} ESCAPE '\\'", texts.len()));
            }
            Some((tool, false)) => {
                texts.push(tool.to_owned());
                conditions.push(format!("tool = ${}", texts.len()));
            }
            None => {}
        }
        if let Some(since) = query.since {
            texts.push(format_time(since));
            conditions.push(format!("ts >= ${}", texts.len()));
        }
        if let Some(until) = query.until {
            texts.push(format_time(until));
            conditions.push(format!("ts < ${}", texts.len()));
        }
        let after = query.after_seq.map(seq_param);
        if after.is_some() {
            conditions.push(format!("seq > ${}", texts.len() + 1));
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let (order, fetch) = query.fetch_plan();
        let mut params: Vec<&(dyn ToSql + Sync)> = texts
            .iter()
            .map(|text| text as &(dyn ToSql + Sync))
            .collect();
        if let Some(after) = &after {
            params.push(after);
        }
        let records: Vec<AuditRecord> = self
            .query_records(
                &format!(
                    "SELECT {COLUMNS} FROM audit_log {filter} ORDER BY seq {order} LIMIT {fetch}"
                ),
                &params,
            )?
            .into_iter()
            .map(StoredRecord::into_record)
            .collect();
        Ok(AuditPage::from_fetched(query, records))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_glob_becomes_a_like_pattern_with_only_the_star_special() {
        assert_eq!(like_pattern("restart_*"), "restart\\_%");
        assert_eq!(like_pattern("100%*"), "100\\%%");
        assert_eq!(like_pattern("a\\b"), "a\\\\b");
    }

    #[test]
    fn a_store_location_is_a_url_or_a_path() {
        assert!(is_postgres_url("postgres://proxi@127.0.0.1:5432/proxi"));
        assert!(is_postgres_url("postgresql://proxi@127.0.0.1/proxi"));
        assert!(!is_postgres_url("./proxi-data"));
    }

    #[test]
    fn the_description_never_shows_the_password() {
        let config: tokio_postgres::Config = "postgres://proxi:secret@127.0.0.1:6543/trail"
            .parse()
            .unwrap();
        let described = describe_config(&config);
        assert_eq!(described, "postgres://proxi@127.0.0.1:6543/trail");
    }
}
