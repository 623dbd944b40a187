//! Attack: the agent floods the audit trail with huge rejected calls to fill the disk.
//!
//! Before the fix every 60 KB unknown-tool body was stored whole; now a rejected
//! call keeps a bounded prefix and the SHA-256 of its arguments.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use common::{AGENT_TOKEN, Api, OPERATOR_TOKEN, ServerProcess};
use reqwest::StatusCode;
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
            proxi::tls::install_crypto_provider();
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
    // 320 calls may finish within the shipped rate limit's burst window (50/s,
    // burst 100) on a fast machine; this test measures records, not the limiter.
    let server =
        ServerProcess::start_with_policy(dir.path(), &common::high_rate_limit_policy_path(), &[]);
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
        records.push(serde_json::to_value(proxi::api::AuditRecord::from(record)).unwrap());
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

/// A tmpfs mounted on a temporary directory for one test; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        assert!(
            matches!(status, Ok(status) if status.success()),
            "cannot mount a {size} tmpfs on {} ({status:?}): this test needs root and mount(8)",
            dir.path().display()
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free_bytes(&self) -> u64 {
        let stats = rustix::fs::statvfs(self.path()).unwrap();
        stats.f_bavail * stats.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes zeros to `path` until the filesystem is full or `limit` bytes are written.
fn fill(path: &Path, limit: u64) {
    let mut file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let chunk = vec![0u8; 16 * 1024];
    let mut written = 0;
    while written < limit {
        let want = chunk.len().min((limit - written) as usize);
        match file.write(&chunk[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
}

fn cli_verify(data_dir: &Path) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_agents_first_and_the_log_recovers_without_restart() {
    let tmpfs = Tmpfs::mount("4m");
    let data_dir = tmpfs.path().join("data");
    let filler = tmpfs.path().join("filler");
    let server = ServerProcess::start(&data_dir, &["--audit-reserve-mb", "1"]);
    let api = Api::new(&server.url);
    let mut acknowledged: Vec<(u64, String)> = Vec::new();
    let acknowledge = |acknowledged: &mut Vec<(u64, String)>, body: &Value| {
        acknowledged.push((
            body["audit_seq"]
                .as_u64()
                .expect("an answer carries audit_seq"),
            body["tool"].as_str().unwrap().to_owned(),
        ));
    };

    let (status, body) = api.execute("list_services", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    acknowledge(&mut acknowledged, &body);

    // Leave half the reserve free: agent calls stop, the operator's do not.
    fill(&filler, tmpfs.free_bytes() - 512 * 1024);
    let mut refused = None;
    // The writer notices the shortage at its next commit, so at most one more call gets through.
    for _ in 0..3 {
        let (status, body) = api.execute("list_services", json!({})).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(body);
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        acknowledge(&mut acknowledged, &body);
    }
    let refused = refused.expect("agent calls are refused below the reserve");
    assert!(
        refused["error"].as_str().unwrap().contains("disk space"),
        "{refused}"
    );
    let (status, body) = api
        .set_mode("EMERGENCY", Some("disk is filling up"), Some(600))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the operator may use the reserve: {body}"
    );
    let (status, _) = api
        .execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "agents still wait");

    // Now fill the disk for real, and let operator traffic run into the wall.
    fill(&filler, u64::MAX);
    let blob = "x".repeat(60_000);
    let mut failed = false;
    for _ in 0..5000 {
        let (status, body) = api
            .post(
                "/tools/execute",
                Some(OPERATOR_TOKEN),
                json!({"tool_name": "fill_the_disk", "arguments": {"blob": blob}}),
            )
            .await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            failed = true;
            break;
        }
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        acknowledge(&mut acknowledged, &body);
    }
    assert!(failed, "a full disk makes audit writes fail");
    eprintln!(
        "disk full after {} acknowledged records",
        acknowledged.len()
    );
    let (status, _) = api.execute("list_services", json!({})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    // Free the space: agents are served again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    let mut polls = 0;
    let body = loop {
        let (status, body) = api.execute("list_services", json!({})).await;
        if status == StatusCode::OK {
            break body;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            Instant::now() < deadline,
            "agent calls still get 503 20 s after the disk was freed: the audit log did not recover"
        );
        polls += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    eprintln!("recovered after {polls} refused polls");
    acknowledge(&mut acknowledged, &body);
    let (status, body) = api.set_mode("NORMAL", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (ok, report) = cli_verify(&data_dir);
    assert!(ok, "the chain verifies after the failure: {report}");
    drop(server);
    let mut stored = std::collections::HashMap::new();
    proxi::audit::for_each_record(&data_dir.join("audit.db"), |record| {
        stored.insert(record.seq, record.tool);
    })
    .unwrap();
    for (seq, tool) in &acknowledged {
        assert_eq!(
            stored.get(seq),
            Some(&Some(tool.clone())),
            "acknowledged call {seq} is in the trail"
        );
    }
}

#[tokio::test]
async fn a_mode_change_whose_record_failed_does_not_take_effect() {
    let server = common::TestServer::start().await;
    let api = server.api();
    let db = server.data_dir().join("audit.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER break_mode_changes BEFORE INSERT ON audit_log
             WHEN NEW.kind = 'mode_change'
             BEGIN SELECT RAISE(ABORT, 'injected write failure'); END;",
        )
        .unwrap();
    let (status, _) = api
        .set_mode("EMERGENCY", Some("unrecorded"), Some(600))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("DROP TRIGGER break_mode_changes")
        .unwrap();
    // Once the log has recovered, the agent finds the mode the trail records.
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    let (status, body) = loop {
        let (status, body) = api
            .execute("restart_service", json!({"service_name": "web-server"}))
            .await;
        if status != StatusCode::SERVICE_UNAVAILABLE {
            break (status, body);
        }
        assert!(Instant::now() < deadline, "the audit log did not recover");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["mode"], "NORMAL", "{body}");
    assert_eq!(server.gateway().status().mode, "NORMAL");
}

#[tokio::test]
async fn the_context_is_recorded_and_bounded() {
    let server = common::TestServer::start().await;
    let api = server.api();
    let (status, body) = api
        .post(
            "/tools/execute",
            Some(AGENT_TOKEN),
            json!({"tool_name": "list_services", "arguments": {}, "context": {"ticket": "INC-7"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let huge = "c".repeat(50_000);
    let (status, body) = api
        .post(
            "/tools/execute",
            Some(AGENT_TOKEN),
            json!({"tool_name": "list_services", "arguments": {}, "context": {"notes": huge}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let records = api.audit(2).await;
    assert_eq!(records[0]["context"], json!({"ticket": "INC-7"}));
    let stored = &records[1]["context"];
    assert_eq!(stored["truncated"], true, "{stored}");
    assert_eq!(stored["bytes"], 50_012, "{stored}");
    assert!(
        stored["prefix"].as_str().unwrap().len() <= proxi::audit::STORED_PREFIX_BYTES,
        "{stored}"
    );
    let (ok, report) = cli_verify(server.data_dir());
    assert!(ok, "{report}");
}

#[tokio::test]
async fn invalid_arguments_are_recorded_as_a_digest_with_a_bounded_message() {
    let server = common::TestServer::start().await;
    let api = server.api();
    let key = "k".repeat(50_000);
    let (status, body) = api
        .execute(
            "get_service_status",
            json!({"service_name": "web-server", key.clone(): 1}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let record = api.audit(1).await.remove(0);
    assert_eq!(record["outcome"], "invalid_arguments", "{record}");
    assert_eq!(record["arguments"]["truncated"], true, "{record}");
    assert_eq!(record["arguments"]["sha256"].as_str().unwrap().len(), 64);
    let detail = record["detail"].as_str().unwrap();
    assert!(detail.len() <= 1024, "{} bytes of detail", detail.len());
    assert!(
        serde_json::to_string(&record).unwrap().len() < 4096,
        "the whole record is small"
    );
}

/// A tool the mode blocks is denied before its arguments are validated, so its
/// arguments may be anything: the record keeps only a digest of large ones.
#[tokio::test]
async fn a_denied_call_with_huge_arguments_stores_a_bounded_record() {
    let server = common::TestServer::start().await;
    let api = server.api();
    let blob = "x".repeat(50_000);
    let (status, body) = api
        .execute("delete_database", json!({"db_name": "users", "blob": blob}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let record = api.audit(1).await.remove(0);
    assert_eq!(record["decision"], "denied", "{record}");
    assert_eq!(record["arguments"]["truncated"], true, "{record}");
    assert!(
        serde_json::to_string(&record).unwrap().len() < 4096,
        "the whole record is small"
    );
    let (status, _) = api
        .execute("delete_database", json!({"db_name": "users"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let record = api.audit(1).await.remove(0);
    assert_eq!(
        record["arguments"],
        json!({"db_name": "users"}),
        "small arguments stay whole"
    );
}
