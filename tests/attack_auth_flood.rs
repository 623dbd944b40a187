//! Attack: flood the audit trail with refused authentications.
//!
//! Before the fix every 401 was a durable record of its own: 2,000
//! unauthenticated requests wrote 2,000 records (issue 8 measured a flood writing 71,733 records,
//! 22 MB in 10 s), and a cross-origin POST with a foreign Host was audited too.
//! Now refusals are aggregated per source and window (the first recorded at once,
//! the rest as one summary with a count), and a foreign Host or Origin is refused
//! with 403 on every route before authentication, without a record.

mod common;

use common::{AGENT_TOKEN, Api, ServerProcess, audit_records, high_rate_limit_policy_path};
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
        // Past the per-source rate of refusals: 429 instead of 401, still counted.
        assert!(
            status == StatusCode::UNAUTHORIZED || status == StatusCode::TOO_MANY_REQUESTS,
            "{status}"
        );
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

/// The flood: 10,000 bad tokens within 30 s from the agent's own address,
/// with agent calls interleaved. The trail stays at a few records, the source is
/// told to back off (429), and every agent call is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_bad_tokens_leave_the_trail_bounded_and_the_agent_answered() {
    const BAD_TOKENS: usize = 10_000;
    const FLOODERS: usize = 4;
    let dir = tempfile::tempdir().expect("temp dir");
    // The agent calls in a tight loop: under the shipped 50/s limit it would be
    // refused for its own rate, which is not what this test is about.
    let server = ServerProcess::start_with_policy(
        dir.path(),
        &high_rate_limit_policy_path(),
        &["--refusal-window", "1h"],
    );
    let started = std::time::Instant::now();
    let mut flooders = Vec::new();
    for flooder in 0..FLOODERS {
        let api = Api::new(&server.url);
        flooders.push(tokio::spawn(async move {
            let (mut refused, mut limited) = (0_usize, 0_usize);
            for round in 0..BAD_TOKENS / FLOODERS {
                let token = format!("bad-token-{flooder}-{round}");
                let (status, _) = api.get("/policy/status", Some(&token)).await;
                match status {
                    StatusCode::UNAUTHORIZED => refused += 1,
                    StatusCode::TOO_MANY_REQUESTS => limited += 1,
                    other => panic!("a bad token got {other}"),
                }
            }
            (refused, limited)
        }));
    }
    let agent = Api::new(&server.url);
    let mut answered = 0;
    while !flooders.iter().all(|flooder| flooder.is_finished()) {
        let (status, body) = agent.execute("list_services", serde_json::json!({})).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "the agent is answered during the flood: {body}"
        );
        answered += 1;
    }
    let (mut refused, mut limited) = (0, 0);
    for flooder in flooders {
        let (r, l) = flooder.await.expect("flooder");
        refused += r;
        limited += l;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{BAD_TOKENS} bad tokens in {elapsed:?}: {refused} x 401, {limited} x 429, {answered} agent calls"
    );
    assert!(elapsed < std::time::Duration::from_secs(30), "{elapsed:?}");
    assert_eq!(refused + limited, BAD_TOKENS);
    assert!(limited > 0, "the source is rate-limited");
    assert!(answered > 0);
    let records = audit_records(&server.data_dir);
    let refusals = records.iter().filter(|r| r.kind == "auth_refused").count();
    assert_eq!(refusals, 1, "one record for the window so far");
    let calls = records.iter().filter(|r| r.kind == "tool_call").count();
    assert_eq!(calls, answered, "every agent call is recorded");
    // The window's count comes out at shutdown: one summary.
    let data_dir = server.data_dir.clone();
    assert!(server.terminate().success());
    let refusal_records: Vec<_> = audit_records(&data_dir)
        .into_iter()
        .filter(|r| r.kind == "auth_refused")
        .collect();
    assert_eq!(refusal_records.len(), 2);
    let counted: u64 = refusal_records
        .iter()
        .map(|r| r.detail["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(counted, BAD_TOKENS as u64);
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
