//! Attack: the agent floods the audit trail with huge rejected calls to fill the disk.
//!
//! Before the fix every 60 KB unknown-tool body was stored whole; now a rejected
//! call keeps a bounded prefix and the SHA-256 of its arguments.

mod common;

use std::time::Instant;

use common::{AGENT_TOKEN, ServerProcess};
use serde_json::{Value, json};

/// Bytes the audit database holds once its WAL is checkpointed (the server must be stopped).
fn audit_bytes(data_dir: &std::path::Path) -> u64 {
    let db = data_dir.join("audit.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    std::fs::metadata(db).unwrap().len()
}

/// 16 connections, each posting `per_connection` unknown-tool calls with 60 KB of arguments.
async fn flood(url: &str, per_connection: usize) -> usize {
    let blob = "x".repeat(60_000);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let url = url.to_owned();
        let body = json!({"tool_name": "exfiltrate", "arguments": {"blob": blob}});
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().no_proxy().build().unwrap();
            let mut answered = 0;
            for _ in 0..per_connection {
                let response = http
                    .post(format!("{url}/tools/execute"))
                    .bearer_auth(AGENT_TOKEN)
                    .json(&body)
                    .send()
                    .await
                    .expect("request is sent");
                assert_eq!(response.status(), 403, "an unknown tool is refused");
                answered += 1;
            }
            answered
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_huge_rejected_calls_stores_bounded_records() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let started = Instant::now();
    let calls = flood(&server.url, 20).await;
    let elapsed = started.elapsed();
    drop(server);
    let written = audit_bytes(dir.path());
    eprintln!(
        "flood: {calls} calls of 60 KB in {:.2} s; audit grew by {:.2} MB ({} bytes per call)",
        elapsed.as_secs_f64(),
        written as f64 / 1e6,
        written / calls as u64
    );
    assert!(
        written / (calls as u64) < 4096,
        "each rejected call must cost a bounded record, got {} bytes per call",
        written / calls as u64
    );
    let mut records: Vec<Value> = Vec::new();
    proxi::audit::for_each_record(&dir.path().join("audit.db"), |record| {
        records.push(serde_json::to_value(record).unwrap());
    })
    .unwrap();
    let last = records.last().expect("the flood is recorded");
    assert_eq!(last["outcome"], "unknown_tool");
    let stored = &last["arguments"];
    assert_eq!(stored["truncated"], true, "{stored}");
    assert_eq!(stored["bytes"], 60_011, "{stored}");
    assert_eq!(
        stored["sha256"].as_str().map(str::len),
        Some(64),
        "{stored}"
    );
    assert!(
        stored["prefix"]
            .as_str()
            .unwrap()
            .starts_with("{\"blob\":\"xxx")
    );
}
