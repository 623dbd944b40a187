//! Attack: flood the audit trail with refused authentications.
//!
//! Before the fix every 401 was a durable record of its own: 2,000
//! unauthenticated requests wrote 2,000 records (issue 8 measured a flood writing 71,733 records,
//! 22 MB in 10 s), and a cross-origin POST with a foreign Host was audited too.
//! Now refusals are aggregated per source and window (the first recorded at once,
//! the rest as one summary with a count), and a foreign Host or Origin is refused
//! with 403 on every route before authentication, without a record.

mod common;

use common::{AGENT_TOKEN, Api, ServerProcess, audit_records};
use reqwest::StatusCode;

const FLOOD: u64 = 1000;

fn refusal_records(server: &ServerProcess) -> Vec<proxi::audit::AuditRecord> {
    audit_records(&server.data_dir)
        .into_iter()
        .filter(|record| record.kind == "auth_refused")
        .collect()
}

#[tokio::test]
async fn refused_authentications_are_one_record_per_source_and_window() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(
        dir.path(),
        // A window longer than the test: the summaries come from the shutdown flush.
        &["--refusal-window", "1h", "--durability", "process"],
    );
    let api = Api::new(&server.url);
    for round in 0..FLOOD {
        let token = (round % 2 == 0).then_some("not-a-valid-token");
        let (status, _) = api.get("/audit", token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let records = refusal_records(&server);
    eprintln!("{FLOOD} refused requests: {} records so far", records.len());
    assert_eq!(
        records.len(),
        2,
        "one per reason (missing, invalid) at once"
    );

    // Real calls still work.
    let (status, body) = api.execute("list_services", serde_json::json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Stopping the server writes the counts of the open windows.
    let data_dir = server.data_dir.clone();
    assert!(server.terminate().success());
    let records: Vec<_> = audit_records(&data_dir)
        .into_iter()
        .filter(|record| record.kind == "auth_refused")
        .collect();
    assert_eq!(records.len(), 4, "two first records and two summaries");
    let counted: u64 = records
        .iter()
        .map(|record| record.detail["count"].as_u64().expect("a count"))
        .sum();
    assert_eq!(counted, FLOOD, "every refusal is counted");
    assert!(
        records
            .iter()
            .all(|record| record.detail["source"] == "127.0.0.1")
    );
}

#[tokio::test]
async fn a_foreign_host_or_origin_is_refused_on_rest_before_auth_and_unaudited() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(dir.path(), &["--durability", "process"]);
    proxi::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let before = audit_records(&server.data_dir).len();
    let rebound = http
        .post(format!("{}/tools/execute", server.url))
        .header("host", "evil.example.com")
        .json(&serde_json::json!({"tool_name": "list_services"}))
        .send()
        .await
        .expect("request is sent");
    assert_eq!(rebound.status(), StatusCode::FORBIDDEN);
    let cross_origin = http
        .post(format!("{}/tools/execute", server.url))
        .header("origin", "http://evil.example.com")
        .bearer_auth(AGENT_TOKEN)
        .json(&serde_json::json!({"tool_name": "list_services"}))
        .send()
        .await
        .expect("request is sent");
    assert_eq!(cross_origin.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = cross_origin.json().await.expect("a JSON error");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|error| error.contains("Origin"))
    );
    assert_eq!(
        audit_records(&server.data_dir).len(),
        before,
        "nothing is recorded"
    );
}
