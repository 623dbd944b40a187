//! Replaying 100,000 tool-call records under a candidate policy (target: under 2 s).
//!
//! Run: `cargo bench --bench replay`

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use criterion::{Criterion, criterion_group, criterion_main};
use proxi::anchor::AuditKey;
use proxi::audit::{AuditDecision, AuditEntry, AuditStore, Durability, EntryKind, SqliteStore};
use proxi::policy::PolicyEngine;
use serde_json::json;

const RECORDS: usize = 100_000;
const BATCH: usize = 1_000;

/// Half the calls in NORMAL, half in EMERGENCY, over the six built-ins.
fn entry(index: usize) -> AuditEntry {
    let (tool, arguments) = match index % 4 {
        0 => ("list_services", json!({})),
        1 => ("restart_service", json!({"service_name": "web-server"})),
        2 => ("scale_fleet", json!({"count": index % 12})),
        _ => ("read_logs", json!({"service_name": "api", "lines": 20})),
    };
    AuditEntry {
        time: Utc::now(),
        principal: proxi::principal::Principal::agent(),
        kind: EntryKind::ToolCall,
        tool: Some(tool.to_owned()),
        arguments: Some(arguments),
        mode: Arc::from(if index.is_multiple_of(2) {
            "NORMAL"
        } else {
            "EMERGENCY"
        }),
        decision: AuditDecision::Allowed,
        reason_code: None,
        outcome: "executed",
        detail: json!({"ok": true}),
        expires_at: None,
        context: None,
        policy_hash: None,
    }
}

fn replay(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path(), Durability::Process).expect("store opens");
    let key = AuditKey::from_bytes([7; 32]);
    for start in (0..RECORDS).step_by(BATCH) {
        let entries: Vec<AuditEntry> = (start..start + BATCH).map(entry).collect();
        let refs: Vec<&AuditEntry> = entries.iter().collect();
        store.append(&refs, &key).expect("batch appended");
    }
    let candidate = PolicyEngine::from_json(
        include_str!("../policies/ops_policy.json"),
        "ops_policy.json",
    )
    .expect("the shipped policy is valid");

    let mut group = c.benchmark_group("replay");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("100k_tool_calls", |b| {
        b.iter(|| {
            let report = proxi::replay::replay(&store, &candidate, None).expect("replay runs");
            assert_eq!(report.replayed, RECORDS as u64);
            report
        })
    });
    group.finish();
}

criterion_group!(benches, replay);
criterion_main!(benches);
