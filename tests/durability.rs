//! Crash safety with the real binary: kill -9 under load loses no acknowledged
//! call, the chain still verifies, and the mode and its expiry survive restarts.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    AGENT_TOKEN, Api, OPERATOR_TOKEN, ServerProcess, high_rate_limit_policy_path, wait_until,
};
use proxi::audit::{self, AuditRecord};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn records(data_dir: &std::path::Path) -> Vec<AuditRecord> {
    let mut records = Vec::new();
    audit::for_each_record(&data_dir.join(audit::AUDIT_DB_FILE), |r| records.push(r)).unwrap();
    records
}

fn cli_verify(data_dir: &std::path::Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_no_acknowledged_call() {
    let dir = tempfile::tempdir().unwrap();
    // Eight clients flood on purpose: this test is about durability, not rate limits.
    let server = ServerProcess::start_with_policy(dir.path(), &high_rate_limit_policy_path(), &[]);
    let api = Api::new(&server.url);
    let acknowledged: Arc<Mutex<Vec<(u64, String, Value)>>> = Arc::default();

    let mut clients = Vec::new();
    for client in 0..8 {
        let api = api.clone();
        let acknowledged = acknowledged.clone();
        clients.push(tokio::spawn(async move {
            for call in 0.. {
                let (tool, arguments) = if call % 2 == 0 {
                    (
                        "get_service_status",
                        json!({"service_name": format!("svc-{client}-{call}")}),
                    )
                } else {
                    ("list_services", json!({}))
                };
                let request = api
                    .http
                    .post(format!("{}/tools/execute", api.url))
                    .bearer_auth(AGENT_TOKEN)
                    .json(&json!({"tool_name": tool, "arguments": arguments}))
                    .send()
                    .await;
                // Once the server dies, requests fail: that is the end of this client.
                let Ok(response) = request else { break };
                let Ok(body) = response.json::<Value>().await else {
                    break;
                };
                let seq = body["audit_seq"]
                    .as_u64()
                    .expect("acknowledged calls carry audit_seq");
                acknowledged
                    .lock()
                    .unwrap()
                    .push((seq, tool.to_owned(), arguments));
            }
        }));
    }

    // Let a few hundred calls be acknowledged, then crash mid-flight.
    let wait_for = acknowledged.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("acknowledged calls", Duration::from_secs(60), || {
            (wait_for.lock().unwrap().len() >= 400).then_some(())
        })
    })
    .await
    .unwrap();
    server.kill();
    for client in clients {
        client.await.unwrap();
    }

    let (ok, output) = cli_verify(dir.path());
    assert!(ok, "audit verify after the crash: {output}");
    let stored = records(dir.path());
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    for (seq, tool, arguments) in &acknowledged {
        let record = stored
            .iter()
            .find(|record| record.seq == *seq)
            .unwrap_or_else(|| panic!("acknowledged call {seq} is missing from the audit trail"));
        assert_eq!(record.tool.as_deref(), Some(tool.as_str()));
        assert_eq!(record.arguments.as_ref(), Some(arguments));
    }

    // The chain continues after a restart.
    let last = stored.last().unwrap().seq;
    let server = ServerProcess::start(dir.path(), &[]);
    let (status, body) = Api::new(&server.url)
        .execute("list_services", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["audit_seq"], last + 1);
    server.kill();
    let (ok, output) = cli_verify(dir.path());
    assert!(ok, "{output}");
}

#[tokio::test]
async fn the_mode_and_its_expiry_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let api = Api::new(&server.url);
    let (status, before) = api
        .set_mode("EMERGENCY", Some("db failover"), Some(600))
        .await;
    assert_eq!(status, StatusCode::OK);
    server.kill();

    let server = ServerProcess::start(dir.path(), &[]);
    let api = Api::new(&server.url);
    let (_, after) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(after["mode"], "EMERGENCY");
    assert_eq!(
        after["emergency_expires_at"],
        before["emergency_expires_at"]
    );
    assert_eq!(after["reason"], "db failover");
    let (status, _) = api
        .execute("restart_service", json!({"service_name": "cache"}))
        .await;
    assert_eq!(status, StatusCode::OK);

    // Shorten the emergency, crash, and let it lapse while nothing runs.
    let (status, short) = api.set_mode("EMERGENCY", Some("brief"), Some(1)).await;
    assert_eq!(status, StatusCode::OK);
    server.kill();
    let expires_at =
        chrono::DateTime::parse_from_rfc3339(short["emergency_expires_at"].as_str().unwrap())
            .unwrap();
    wait_until("the emergency deadline", Duration::from_secs(10), || {
        (chrono::Utc::now() > expires_at).then_some(())
    });

    let server = ServerProcess::start(dir.path(), &[]);
    let api = Api::new(&server.url);
    let (_, status) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(status["mode"], "NORMAL");
    let lapse = records(dir.path())
        .into_iter()
        .rev()
        .find(|r| r.kind == "mode_expired")
        .expect("the lapse is recorded");
    assert_eq!(lapse.principal, "system");
    assert_eq!(lapse.detail["from"], "EMERGENCY");
    let (status, body) = api
        .execute("restart_service", json!({"service_name": "cache"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

#[test]
fn a_second_server_cannot_share_a_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let _first = ServerProcess::start(dir.path(), &[]);
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--policy")
        .arg(common::policy_path())
        .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("in use by another proxi process"),
        "{stderr}"
    );
}

#[test]
fn generated_tokens_are_written_privately_and_never_printed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--policy")
        .arg(common::policy_path())
        .env_remove("PROXI_OPERATOR_TOKEN")
        .env_remove("PROXI_AGENT_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_until("server.json", Duration::from_secs(30), || {
        proxi::server::ServerInfo::read(dir.path()).filter(|info| info.pid == pid)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let mut printed = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();

    let path = dir.path().join(proxi::tokens::TOKENS_FILE);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let tokens = proxi::tokens::TokensFile::read(dir.path()).unwrap();
    let operator = tokens.operator_token.unwrap();
    let agent = tokens.agent_token.unwrap();
    assert!(printed.contains(&path.display().to_string()), "{printed}");
    assert!(
        !printed.contains(&operator) && !printed.contains(&agent),
        "a token was printed"
    );
}
