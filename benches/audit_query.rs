//! Filtered audit queries on a trail of 1,000,000 records (target: each under 50 ms).
//!
//! Run: `cargo bench --bench audit_query`. The first run writes the SQLite trail
//! under `target/bench-fixtures/audit-1m/` (a minute or so); later runs reuse it
//! (and migrate its indexes). The same queries then run on PostgreSQL: a throwaway
//! cluster (tests/common/postgres.rs, from scripts/postgres-harness.sh) filled with
//! the same 1,000,000 records and analyzed, a few minutes per run.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{Duration, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use proxi::anchor::AuditKey;
use proxi::audit::{
    AUDIT_DB_FILE, AuditDecision, AuditEntry, AuditQuery, AuditStore, Durability, EntryKind,
    PostgresStore, SqliteStore,
};

#[allow(dead_code)]
#[path = "../tests/common/postgres.rs"]
mod postgres;
use serde_json::json;

/// The trail's size: 1,000,000 under `cargo bench`; 10,000 when the benchmark runs
/// as a test (`cargo test`/nextest run each case once, in its own process, to check
/// that the queries answer: writing a million records per case would take minutes).
fn records() -> u64 {
    if std::env::args().any(|arg| arg == "--bench") {
        1_000_000
    } else {
        10_000
    }
}
const BATCH: u64 = 1000;
const TOOLS: [&str; 8] = [
    "list_services",
    "read_logs",
    "get_fleet_status",
    "restart_service",
    "scale_fleet",
    "delete_database",
    "github.create_issue",
    "github.list_issues",
];

/// The n-th record of the fixture: mostly agent calls, some operator and MCP
/// callers, every eighth tool, a tenth of them denied, a few mode changes.
fn entry(n: u64, start: chrono::DateTime<Utc>) -> AuditEntry {
    let principal = match n % 20 {
        0 => proxi::principal::Principal::operator(),
        1..=3 => proxi::principal::Principal::mcp_stdio_agent("claude"),
        _ => proxi::principal::Principal::agent(),
    };
    let denied = n % 10 == 7;
    let mode_change = n.is_multiple_of(5000);
    AuditEntry {
        // One record a millisecond: the trail spans about 17 minutes.
        time: start + Duration::milliseconds(n as i64),
        principal,
        kind: if mode_change {
            EntryKind::ModeChange
        } else {
            EntryKind::ToolCall
        },
        tool: (!mode_change).then(|| TOOLS[(n % TOOLS.len() as u64) as usize].to_owned()),
        arguments: Some(json!({"n": n})),
        mode: Arc::from("NORMAL"),
        decision: if denied {
            AuditDecision::Denied
        } else {
            AuditDecision::Allowed
        },
        reason_code: denied.then_some(proxi::reason::Reason::BlockedInMode),
        outcome: if denied { "denied" } else { "executed" },
        detail: json!({"ok": !denied}),
        expires_at: None,
        context: None,
        policy_hash: None,
    }
}

fn fixture() -> (PathBuf, chrono::DateTime<Utc>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-fixtures")
        .join(format!("audit-{}", records()));
    let start = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .expect("a valid time")
        .to_utc();
    let db = dir.join(AUDIT_DB_FILE);
    if let Ok(store) = SqliteStore::open_reader(&db)
        && store
            .head()
            .ok()
            .flatten()
            .is_some_and(|head| head.seq == records())
    {
        // Opening it for writing runs the migrations: the indexes of this version.
        drop(SqliteStore::open(&dir, Durability::Process).expect("migrate the fixture"));
        return (db, start);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the fixture dir");
    let store = SqliteStore::open(&dir, Durability::Process).expect("open the fixture store");
    let key = AuditKey::from_bytes([7; 32]);
    for batch in 0..records() / BATCH {
        let entries: Vec<AuditEntry> = (1..=BATCH)
            .map(|n| entry(batch * BATCH + n, start))
            .collect();
        let refs: Vec<&AuditEntry> = entries.iter().collect();
        store.append(&refs, &key).expect("append to the fixture");
    }
    (db, start)
}

/// A throwaway PostgreSQL cluster holding the same trail, analyzed (as autovacuum
/// would after such a load) so that the planner knows the columns' spread.
fn postgres_fixture(start: chrono::DateTime<Utc>) -> (postgres::PostgresServer, PostgresStore) {
    let server = postgres::PostgresServer::start();
    let store = PostgresStore::connect(&server.url()).expect("connect to the fixture cluster");
    let key = AuditKey::from_bytes([7; 32]);
    for batch in 0..records() / BATCH {
        let entries: Vec<AuditEntry> = (1..=BATCH)
            .map(|n| entry(batch * BATCH + n, start))
            .collect();
        let refs: Vec<&AuditEntry> = entries.iter().collect();
        store.append(&refs, &key).expect("append to the fixture");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
            .await
            .expect("connect for ANALYZE");
        tokio::spawn(connection);
        client
            .batch_execute("VACUUM ANALYZE audit_log")
            .await
            .expect("ANALYZE");
    });
    (server, store)
}

fn cases(start: chrono::DateTime<Utc>) -> [(&'static str, AuditQuery); 6] {
    [
        (
            "newest_100_of_operator",
            AuditQuery {
                principal: Some("operator".into()),
                limit: 100,
                ..AuditQuery::default()
            },
        ),
        (
            "tool_glob_page_after_cursor",
            AuditQuery {
                tool: Some("github.*".into()),
                after_seq: Some(500_000),
                limit: 100,
                ..AuditQuery::default()
            },
        ),
        (
            "denied_by_reason_newest_1000",
            AuditQuery {
                decision: Some("denied".into()),
                reason_code: Some(proxi::reason::Reason::BlockedInMode.as_str().into()),
                limit: 1000,
                ..AuditQuery::default()
            },
        ),
        (
            "mode_changes_page",
            AuditQuery {
                kind: Some("mode_change".into()),
                after_seq: Some(0),
                limit: 100,
                ..AuditQuery::default()
            },
        ),
        (
            "time_window_of_agent_restarts",
            AuditQuery {
                principal: Some("agent".into()),
                tool: Some("restart_service".into()),
                since: Some(start + Duration::seconds(300)),
                until: Some(start + Duration::seconds(360)),
                limit: 1000,
                ..AuditQuery::default()
            },
        ),
        (
            "rare_combination_mcp_denied_delete",
            AuditQuery {
                principal: Some("agent (mcp:claude)".into()),
                tool: Some("delete_database".into()),
                decision: Some("denied".into()),
                after_seq: Some(0),
                limit: 100,
                ..AuditQuery::default()
            },
        ),
    ]
}

fn run_group(c: &mut Criterion, group: &str, store: &dyn AuditStore, start: chrono::DateTime<Utc>) {
    let mut group = c.benchmark_group(group);
    for (name, query) in &cases(start) {
        group.bench_function(*name, |b| {
            b.iter(|| store.query(black_box(query)).expect("the query answers"))
        });
    }
    group.finish();
}

fn queries(c: &mut Criterion) {
    let (db, start) = fixture();
    let store = SqliteStore::open_reader(&db).expect("open the fixture");
    run_group(c, "audit_query_1m", &store, start);
    let (_server, store) = postgres_fixture(start);
    run_group(c, "audit_query_1m_postgres", &store, start);
}

criterion_group!(benches, queries);
criterion_main!(benches);
