//! Per-call human approval over REST, end to end on loopback: a call that needs
//! approval does not run, an operator decides, the identical call runs once.

mod common;

use std::time::Duration;

use common::approvals::{decide, listed, request_scale, write_approval_policy};
use common::{AGENT_TOKEN, Api, OPERATOR_TOKEN, ServerProcess, TestServer, wait_until};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn server(dir: &tempfile::TempDir, ttl: u64) -> TestServer {
    let server = TestServer::start_with_policy(&write_approval_policy(dir.path(), ttl, "t")).await;
    server.api().emergency().await;
    server
}

fn fleet_size(body: &Value) -> u64 {
    body["fleet"]["instances"]
        .as_u64()
        .or_else(|| body["fleet_size"].as_u64())
        .unwrap_or_else(|| panic!("no fleet size in {body}"))
}

#[tokio::test]
async fn a_call_that_needs_approval_runs_once_after_an_operator_approves_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, 600).await;
    let api = server.api();

    // Below the rule's threshold nothing waits.
    let (status, body) = api.execute("scale_fleet", json!({"count": 5})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, body) = api.execute("scale_fleet", json!({"count": 8})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["success"], false);
    assert_eq!(body["approval_required"], true);
    assert_eq!(body["reason_code"], "approval_required");
    let id = body["approval_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("apr_"), "{id}");
    assert!(body["expires_at"].is_string(), "{body}");
    let how = body["how_to_proceed"].as_str().unwrap();
    assert!(
        how.contains(&id) && how.contains("retry the identical call"),
        "{how}"
    );
    // The identical call again: the same approval, not a second one.
    let (_, again) = api.execute("scale_fleet", json!({"count": 8})).await;
    assert_eq!(again["approval_id"], id.as_str());
    assert_eq!(listed(&api, "pending").await, vec![id.clone()]);

    let records = api.audit(100).await;
    let required: Vec<&Value> = records
        .iter()
        .filter(|r| r["outcome"] == "approval_required")
        .collect();
    assert_eq!(required.len(), 2, "{records:?}");
    assert_eq!(required[0]["detail"]["approval_id"], id.as_str());
    assert_eq!(required[0]["decision"], "denied");

    // Agents neither see nor decide approvals.
    let (status, _) = api.get("/approvals", Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api
        .post(
            &format!("/approvals/{id}/approve"),
            Some(AGENT_TOKEN),
            json!({"reason": "me"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, approved) = decide(&api, &id, "approve", "capacity for the incident").await;
    assert_eq!(status, StatusCode::OK, "{approved}");
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["decided_by"], "operator");
    assert_eq!(approved["principal"], "agent");
    let records = api.audit(100).await;
    let decision = records.iter().find(|r| r["kind"] == "approval").unwrap();
    assert_eq!(decision["principal"], "operator");
    assert_eq!(decision["outcome"], "approved");
    assert_eq!(decision["detail"]["requested_by"], "agent");
    assert_eq!(decision["detail"]["approval_id"], id.as_str());
    assert_eq!(decision["detail"]["reason"], "capacity for the incident");

    // Other arguments are another call: a new approval.
    let other = request_scale(&api, 9).await;
    assert_ne!(other, id);

    // Key order and whitespace do not make another call: same canonical JSON.
    let (status, body) = api
        .post(
            "/tools/execute",
            Some(AGENT_TOKEN),
            serde_json::from_str(r#"{"arguments": { "count" : 8 }, "tool_name": "scale_fleet"}"#)
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true, "{body}");
    let (_, infra) = api.get("/infrastructure/status", Some(AGENT_TOKEN)).await;
    assert_eq!(fleet_size(&infra), 8, "{infra}");
    let executed = api
        .audit(100)
        .await
        .into_iter()
        .filter(|r| r["outcome"] == "executed" && r["tool"] == "scale_fleet")
        .filter(|r| r["detail"]["approval_id"] == id.as_str())
        .count();
    assert_eq!(executed, 1);
    assert_eq!(listed(&api, "consumed").await, vec![id.clone()]);

    // Used once: the next identical call needs a new approval.
    let next = request_scale(&api, 8).await;
    assert_ne!(next, id);

    // The gauge counts what waits: `other` and `next`.
    let (_, metrics) = api.get("/metrics", Some(OPERATOR_TOKEN)).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(metrics.contains("proxi_approvals_pending 2"), "{metrics}");
}

#[tokio::test]
async fn twenty_identical_retries_at_once_run_the_tool_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, 600).await;
    let api = server.api();
    let id = request_scale(&api, 7).await;
    let (status, _) = decide(&api, &id, "approve", "go").await;
    assert_eq!(status, StatusCode::OK);
    let answers = join_all((0..20).map(|_| {
        let api = api.clone();
        async move { api.execute("scale_fleet", json!({"count": 7})).await }
    }))
    .await;
    let ran = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::OK)
        .count();
    assert_eq!(ran, 1, "{answers:?}");
    // The others were told to wait for a new approval, all the same one.
    let waiting: std::collections::BTreeSet<&str> = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::ACCEPTED)
        .map(|(_, body)| body["approval_id"].as_str().unwrap())
        .collect();
    assert_eq!(waiting.len(), 1, "{answers:?}");
    assert!(!waiting.contains(id.as_str()));
    let executed = api
        .audit(200)
        .await
        .into_iter()
        .filter(|r| r["tool"] == "scale_fleet" && r["outcome"] == "executed")
        .count();
    assert_eq!(executed, 1);
}

#[tokio::test]
async fn an_approval_is_decided_again_under_the_current_mode() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, 600).await;
    let api = server.api();
    let id = request_scale(&api, 6).await;
    decide(&api, &id, "approve", "go").await;
    api.normal().await;
    let (status, body) = api.execute("scale_fleet", json!({"count": 6})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason_code"], "blocked_in_mode");
    let (_, infra) = api.get("/infrastructure/status", Some(AGENT_TOKEN)).await;
    assert_ne!(fleet_size(&infra), 6, "{infra}");
}

#[tokio::test]
async fn an_operator_cannot_approve_a_call_it_made_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, 600).await;
    let api = server.api();
    let (status, body) = api
        .post(
            "/tools/execute",
            Some(OPERATOR_TOKEN),
            json!({"tool_name": "restart_service", "arguments": {"service_name": "database"}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["approval_id"].as_str().unwrap();
    let (status, body) = decide(&api, id, "approve", "trust me").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("made itself"),
        "{body}"
    );
    assert_eq!(listed(&api, "pending").await, [id.to_owned()]);
}

#[tokio::test]
async fn a_denied_call_is_refused_and_decisions_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, 600).await;
    let api = server.api();
    let id = request_scale(&api, 10).await;
    for (reason, expected) in [
        ("", StatusCode::BAD_REQUEST),
        ("   ", StatusCode::BAD_REQUEST),
        (&"x".repeat(501) as &str, StatusCode::BAD_REQUEST),
    ] {
        let (status, body) = decide(&api, &id, "deny", reason).await;
        assert_eq!(status, expected, "{body}");
    }
    let (status, _) = decide(&api, "apr_0123", "deny", "no").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = decide(&api, "not-an-id", "deny", "no").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = decide(&api, &id, "deny", "too many instances").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "denied");
    let (status, _) = decide(&api, &id, "approve", "changed my mind").await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = api.execute("scale_fleet", json!({"count": 10})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason_code"], "approval_denied");
    assert_eq!(body["approval_required"], true);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("too many instances"),
        "{body}"
    );
    for query in ["status=nope", "limit=0", "limit=501", "colour=red"] {
        let (status, _) = api
            .get(&format!("/approvals?{query}"), Some(OPERATOR_TOKEN))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
    }
    assert_eq!(listed(&api, "denied").await, [id]);
}

#[tokio::test]
async fn at_most_a_hundred_approvals_wait_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, 600).await;
    let api = server.api();
    for index in 0..100 {
        let (status, body) = api
            .execute(
                "restart_service",
                json!({"service_name": format!("svc-{index}")}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let (status, body) = api
        .execute("restart_service", json!({"service_name": "one-more"}))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["reason_code"], "approval_required");
    assert!(body.get("approval_id").is_none(), "{body}");
}

#[tokio::test]
async fn a_waiting_request_is_held_until_an_operator_decides() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, 600).await;
    let api = server.api();
    let (status, body) = api
        .post(
            "/tools/execute",
            Some(AGENT_TOKEN),
            json!({"tool_name": "scale_fleet", "arguments": {"count": 9}, "wait_for_approval_seconds": 301}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let waiting = tokio::spawn({
        let api = api.clone();
        async move {
            api.post(
                "/tools/execute",
                Some(AGENT_TOKEN),
                json!({"tool_name": "scale_fleet", "arguments": {"count": 9}, "wait_for_approval_seconds": 120}),
            )
            .await
        }
    });
    let mut pending = Vec::new();
    for _ in 0..500 {
        pending = listed(&api, "pending").await;
        if !pending.is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(pending.len(), 1, "the held request asked for approval");
    assert!(!waiting.is_finished());
    decide(&api, &pending[0], "approve", "go ahead").await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("answered after the decision")
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true);

    // Denied while held: refused.
    let waiting = tokio::spawn({
        let api = api.clone();
        async move {
            api.post(
                "/tools/execute",
                Some(AGENT_TOKEN),
                json!({"tool_name": "restart_service", "arguments": {"service_name": "database"}, "wait_for_approval_seconds": 120}),
            )
            .await
        }
    });
    let mut pending = Vec::new();
    for _ in 0..500 {
        pending = listed(&api, "pending").await;
        if !pending.is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    decide(&api, &pending[0], "deny", "not the database").await;
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason_code"], "approval_denied");
}

/// The agent's call through a `proxi serve` process.
fn blocking_execute(api: &Api, count: u64) -> (StatusCode, Value) {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(api.execute("scale_fleet", json!({ "count": count })))
}

fn blocking<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Runtime::new().unwrap().block_on(future)
}

#[test]
fn approvals_survive_a_restart_and_a_changed_policy_is_a_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = write_approval_policy(dir.path(), 600, "first");
    let server = ServerProcess::start_with_policy(&data, &policy, &[]);
    let api = Api::new(&server.url);
    blocking(api.emergency());
    let kept = blocking(request_scale(&api, 6));
    let stale = blocking(request_scale(&api, 7));
    blocking(decide(&api, &kept, "approve", "ok"));
    blocking(decide(&api, &stale, "approve", "ok"));
    server.kill();

    // Same policy after a crash: the approval is still there and runs once.
    let server = ServerProcess::start_with_policy(&data, &policy, &[]);
    let api = Api::new(&server.url);
    let (status, body) = blocking_execute(&api, 6);
    assert_eq!(status, StatusCode::OK, "{body}");
    server.terminate();

    // Another policy version: the approval no longer matches; a new one is asked for.
    let changed = write_approval_policy(dir.path(), 600, "second");
    let server = ServerProcess::start_with_policy(&data, &changed, &[]);
    let api = Api::new(&server.url);
    let (status, body) = blocking_execute(&api, 7);
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["reason_code"], "approval_mismatch");
    assert_ne!(body["approval_id"], stale.as_str());
    server.terminate();
}

#[test]
fn an_expiry_is_recorded_once_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = write_approval_policy(dir.path(), 1, "short");
    let server = ServerProcess::start_with_policy(&data, &policy, &[]);
    let api = Api::new(&server.url);
    blocking(api.emergency());
    let (_, body) = blocking_execute(&api, 8);
    let id = body["approval_id"].as_str().unwrap().to_owned();
    let expires_at: chrono::DateTime<chrono::Utc> =
        body["expires_at"].as_str().unwrap().parse().unwrap();
    server.kill();
    // Lapses while no server runs.
    wait_until("the approval's expiry", Duration::from_secs(10), || {
        (chrono::Utc::now() > expires_at).then_some(())
    });
    let expiries = |api: &Api| {
        blocking(api.audit(200))
            .into_iter()
            .filter(|r| r["kind"] == "approval" && r["outcome"] == "expired")
            .map(|r| r["detail"]["approval_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let server = ServerProcess::start_with_policy(&data, &policy, &[]);
    let api = Api::new(&server.url);
    assert_eq!(expiries(&api), vec![id.clone()]);
    assert_eq!(blocking(listed(&api, "expired")), vec![id.clone()]);
    // The identical call is told its approval expired, and gets a new one.
    let (status, body) = blocking_execute(&api, 8);
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["reason_code"], "approval_expired");
    server.terminate();
    let server = ServerProcess::start_with_policy(&data, &policy, &[]);
    let api = Api::new(&server.url);
    let recorded = expiries(&api);
    assert_eq!(
        recorded.iter().filter(|seen| **seen == id).count(),
        1,
        "{recorded:?}"
    );
    server.terminate();
}

fn proxi_approvals(url: &str, token: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_proxi"))
        .arg("approvals")
        .args(args)
        .args(["--server", url])
        .env("PROXI_OPERATOR_TOKEN", token)
        .env_remove("PROXI_SERVER")
        .output()
        .expect("proxi runs")
}

#[test]
fn the_cli_lists_and_decides_approvals_through_the_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = write_approval_policy(dir.path(), 600, "cli");
    let server = ServerProcess::start_with_policy(&data, &policy, &[]);
    let api = Api::new(&server.url);
    blocking(api.emergency());
    let id = blocking(request_scale(&api, 8));

    let listed = proxi_approvals(&server.url, OPERATOR_TOKEN, &["list"]);
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{listed:?}");
    assert!(
        stdout.contains(&id) && stdout.contains("pending") && stdout.contains("scale_fleet"),
        "{stdout}"
    );
    // The agent's token is refused, and nothing is decided.
    let refused = proxi_approvals(
        &server.url,
        AGENT_TOKEN,
        &["approve", &id, "--reason", "me"],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("403"),
        "{refused:?}"
    );
    let bad = proxi_approvals(
        &server.url,
        OPERATOR_TOKEN,
        &["approve", "../policy", "--reason", "x"],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not an approval id"),
        "{bad:?}"
    );

    let approved = proxi_approvals(
        &server.url,
        OPERATOR_TOKEN,
        &["approve", &id, "--reason", "cli ok"],
    );
    let stdout = String::from_utf8_lossy(&approved.stdout);
    assert!(approved.status.success(), "{approved:?}");
    assert!(
        stdout.contains("approved") && stdout.contains("cli ok"),
        "{stdout}"
    );
    let again = proxi_approvals(
        &server.url,
        OPERATOR_TOKEN,
        &["deny", &id, "--reason", "late"],
    );
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("409"),
        "{again:?}"
    );

    let (status, body) = blocking_execute(&api, 8);
    assert_eq!(status, StatusCode::OK, "{body}");
    let consumed = proxi_approvals(
        &server.url,
        OPERATOR_TOKEN,
        &["list", "--status", "consumed"],
    );
    assert!(String::from_utf8_lossy(&consumed.stdout).contains(&id));
    server.terminate();
}

#[test]
fn a_named_operator_cannot_approve_its_own_call_but_another_can() {
    use common::identities::add_token;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let alice = add_token(&data, "alice", "operator");
    let bob = add_token(&data, "bob", "operator");
    let policy = write_approval_policy(dir.path(), 600, "named");
    let server = ServerProcess::start_with_policy(&data, &policy, &[]);
    let api = Api::new(&server.url);
    blocking(api.emergency());
    let (status, body) = blocking(api.post(
        "/tools/execute",
        Some(&alice),
        json!({"tool_name": "restart_service", "arguments": {"service_name": "database"}}),
    ));
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["approval_id"].as_str().unwrap().to_owned();
    let path = format!("/approvals/{id}/approve");
    let (status, body) = blocking(api.post(&path, Some(&alice), json!({"reason": "mine"})));
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = blocking(api.post(&path, Some(&bob), json!({"reason": "checked"})));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["decided_by"], "bob");
    assert_eq!(body["principal"], "alice");
    let records = blocking(api.audit(100));
    let decision = records.iter().find(|r| r["kind"] == "approval").unwrap();
    assert_eq!(decision["principal"], "bob");
    assert_eq!(decision["detail"]["requested_by"], "alice");
    server.terminate();
}

#[tokio::test]
async fn an_agent_may_ask_for_emergency_but_only_an_operator_grants_it() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_with_policy(&write_approval_policy(dir.path(), 600, "elevation")).await;
    let api = server.api();
    let (status, body) = api
        .execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["how_to_proceed"]
            .as_str()
            .unwrap()
            .contains("/policy/request-mode"),
        "{body}"
    );
    let request = json!({"mode": "EMERGENCY", "reason": "web-server is down", "ttl_seconds": 600});
    let (status, body) = api
        .post("/policy/request-mode", Some(AGENT_TOKEN), request.clone())
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["kind"], "mode_change");
    let id = body["approval_id"].as_str().unwrap().to_owned();
    let (_, status_now) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(status_now["mode"], "NORMAL", "asking changes nothing");
    // Bad requests are refused before anything is pending.
    let (status, _) = api
        .post(
            "/policy/request-mode",
            Some(AGENT_TOKEN),
            json!({"mode": "EMERGENCY"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api
        .post(
            &format!("/approvals/{id}/approve"),
            Some(AGENT_TOKEN),
            json!({"reason": "me"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, body) = decide(&api, &id, "approve", "confirmed the outage").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, status_now) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(status_now["mode"], "EMERGENCY", "{status_now}");
    assert_eq!(status_now["changed_by"], "operator");
    let records = api.audit(100).await;
    let change = records
        .iter()
        .rev()
        .find(|r| r["kind"] == "mode_change")
        .unwrap();
    assert_eq!(change["principal"], "operator");
    let reason = change["detail"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&id) && reason.contains("by agent"),
        "{reason}"
    );
    let requested = records
        .iter()
        .find(|r| r["kind"] == "approval" && r["outcome"] == "requested")
        .unwrap();
    assert_eq!(requested["principal"], "agent");
    assert_eq!(listed(&api, "consumed").await, vec![id]);
}

#[tokio::test]
async fn elevation_requests_are_refused_unless_the_policy_enables_them() {
    let server = TestServer::start().await;
    let (status, body) = server
        .api()
        .post(
            "/policy/request-mode",
            Some(AGENT_TOKEN),
            json!({"mode": "EMERGENCY", "reason": "please"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (_, body) = server
        .api()
        .execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    assert!(
        !body["how_to_proceed"]
            .as_str()
            .unwrap()
            .contains("request-mode"),
        "{body}"
    );
}

/// Makes every approval record fail to commit, as a full disk would, while the
/// trail stays healthy for everything else: so the gateway's `admit` check before
/// a decision passes and only the decision's own record fails.
const BREAK_APPROVAL_RECORDS: &str = "CREATE TRIGGER break_approval_records
    BEFORE INSERT ON audit_log WHEN NEW.kind = 'approval'
    BEGIN SELECT RAISE(ABORT, 'injected write failure'); END;";

fn audit_sql(server: &TestServer, sql: &str) {
    rusqlite::Connection::open(server.data_dir().join("audit.db"))
        .unwrap()
        .execute_batch(sql)
        .unwrap();
}

/// The agent's identical call, retried while the trail recovers from the failed
/// write (503 until a write succeeds again).
async fn once_the_trail_recovers(api: &Api, count: u64) -> (StatusCode, Value) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = api.execute("scale_fleet", json!({ "count": count })).await;
        if status != StatusCode::SERVICE_UNAVAILABLE {
            return (status, body);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the trail never recovered"
        );
        // The probe runs on its own timer; this only paces the retries.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The approval records of `id`, as `outcome`s in trail order.
async fn approval_records(api: &Api, id: &str) -> Vec<String> {
    api.audit(200)
        .await
        .into_iter()
        .filter(|r| r["kind"] == "approval" && r["detail"]["approval_id"] == id)
        .map(|r| r["outcome"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn an_approval_whose_record_fails_is_taken_back_and_the_call_does_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, 600).await;
    let api = server.api();
    let (_, infra) = api.get("/infrastructure/status", Some(AGENT_TOKEN)).await;
    let fleet_before = fleet_size(&infra);
    let id = request_scale(&api, 8).await;

    audit_sql(&server, BREAK_APPROVAL_RECORDS);
    let (status, body) = decide(&api, &id, "approve", "capacity").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // Not in effect: pending again, nobody's decision.
    assert_eq!(listed(&api, "pending").await, vec![id.clone()]);
    assert!(listed(&api, "approved").await.is_empty());
    // A denial whose record fails is taken back as well.
    let (status, body) = decide(&api, &id, "deny", "no").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(listed(&api, "pending").await, vec![id.clone()]);
    audit_sql(&server, "DROP TRIGGER break_approval_records");

    // The agent's retry finds it still waiting: nothing ran.
    let (status, body) = once_the_trail_recovers(&api, 8).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["approval_id"], id.as_str(), "{body}");
    let (_, infra) = api.get("/infrastructure/status", Some(AGENT_TOKEN)).await;
    assert_eq!(fleet_size(&infra), fleet_before, "{infra}");
    assert!(approval_records(&api, &id).await.is_empty());

    // Decided again with the trail working: recorded once, then the call runs once.
    let (status, body) = decide(&api, &id, "approve", "capacity").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(approval_records(&api, &id).await, ["approved"]);
    let (status, body) = api.execute("scale_fleet", json!({"count": 8})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true, "{body}");
}

#[tokio::test]
async fn an_approval_decided_but_not_yet_recorded_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, 600).await;
    let api = server.api();
    let id = request_scale(&api, 8).await;
    // The instant between the store's decision and its record becoming durable,
    // held open: the agent's retry must not consume it (its record might fail,
    // and the decision be taken back, after the call ran).
    rusqlite::Connection::open(server.data_dir().join("approvals.db"))
        .unwrap()
        .execute(
            "UPDATE approvals SET status = 'approved', decided_by = 'operator', \
             decided_ms = 0, decision_recorded = 0 WHERE id = ?1",
            [&id],
        )
        .unwrap();
    let (status, body) = api.execute("scale_fleet", json!({"count": 8})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["reason_code"], "approval_required", "{body}");
    assert_eq!(
        body["approval_id"],
        id.as_str(),
        "the same approval: {body}"
    );
    assert_eq!(listed(&api, "approved").await, vec![id.clone()]);
    assert!(listed(&api, "consumed").await.is_empty());
}

#[test]
fn a_decision_a_crash_left_unrecorded_is_taken_back_at_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = write_approval_policy(dir.path(), 600, "t");
    let server = ServerProcess::start_with_policy(&data, &policy, &[]);
    let api = Api::new(&server.url);
    blocking(api.emergency());
    let id = blocking(request_scale(&api, 8));
    let denied = blocking(request_scale(&api, 9));
    server.kill();
    // What a crash between the store's decision and its record leaves behind:
    // decided, not confirmed. Before, it stayed listed as decided but was never
    // usable, and a stranded denial never expired either.
    for (id, status) in [(&id, "approved"), (&denied, "denied")] {
        rusqlite::Connection::open(data.join("approvals.db"))
            .unwrap()
            .execute(
                "UPDATE approvals SET status = ?2, decided_by = 'operator', \
                 decided_ms = 0, decision_recorded = 0 WHERE id = ?1",
                [id.as_str(), status],
            )
            .unwrap();
    }

    let server = ServerProcess::start_with_policy(&data, &policy, &[]);
    let api = Api::new(&server.url);
    let mut pending = blocking(listed(&api, "pending"));
    pending.sort();
    let mut expected = vec![id.clone(), denied.clone()];
    expected.sort();
    assert_eq!(pending, expected);
    assert!(blocking(listed(&api, "approved")).is_empty());
    assert!(blocking(listed(&api, "denied")).is_empty());
    for stranded in [&id, &denied] {
        let records: Vec<Value> = blocking(api.audit(200))
            .into_iter()
            .filter(|r| r["kind"] == "approval" && r["detail"]["approval_id"] == stranded.as_str())
            .collect();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0]["outcome"], "decision_reverted");
        assert_eq!(records[0]["principal"], "system", "{records:?}");
    }
    // Pending again: an operator decides it anew, and the call runs once.
    let (status, body) = blocking(decide(&api, &id, "approve", "capacity"));
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = blocking_execute(&api, 8);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true, "{body}");
    server.terminate();
}

#[tokio::test]
async fn an_elevation_whose_approval_record_fails_changes_no_mode() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_with_policy(&write_approval_policy(dir.path(), 600, "elevation")).await;
    let api = server.api();
    let request = json!({"mode": "EMERGENCY", "reason": "web-server is down", "ttl_seconds": 600});
    let (status, body) = api
        .post("/policy/request-mode", Some(AGENT_TOKEN), request)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["approval_id"].as_str().unwrap().to_owned();

    audit_sql(&server, BREAK_APPROVAL_RECORDS);
    let (status, body) = decide(&api, &id, "approve", "confirmed the outage").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    audit_sql(&server, "DROP TRIGGER break_approval_records");
    let (_, status_now) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(status_now["mode"], "NORMAL", "{status_now}");
    assert_eq!(listed(&api, "pending").await, vec![id.clone()]);
    let changes = api
        .audit(200)
        .await
        .into_iter()
        .filter(|r| r["kind"] == "mode_change")
        .count();
    assert_eq!(changes, 0);

    // Once decided with a record, it takes effect.
    let (status, body) = decide(&api, &id, "approve", "confirmed the outage").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, status_now) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(status_now["mode"], "EMERGENCY", "{status_now}");
    assert_eq!(approval_records(&api, &id).await, ["requested", "approved"]);
}
