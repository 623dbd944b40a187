//! Named identities end to end: `proxi token add/list/revoke` through the real
//! binary, named tokens against a running `proxi serve` over REST, MCP and the
//! console, and the audit trail naming each principal with its role.

mod common;

use std::time::Duration;

use common::identities::{add_token, revoke_token, token_command};
use common::{
    AGENT_TOKEN, Api, OPERATOR_TOKEN, ServerProcess, audit_records, mcp_initialize_body, mcp_post,
};
use proxi::audit::AuditRecord;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, COOKIE, ORIGIN, SET_COOKIE};
use serde_json::{Value, json};

fn http() -> reqwest::Client {
    proxi::tls::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client builds")
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn last_of_kind(records: &[AuditRecord], kind: &str) -> AuditRecord {
    records
        .iter()
        .rev()
        .find(|record| record.kind == kind)
        .unwrap_or_else(|| panic!("a {kind} record in {records:#?}"))
        .clone()
}

#[test]
fn token_add_list_and_revoke_keep_only_digests_and_refuse_bad_names() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path();
    let alice = add_token(data, "alice", "operator");
    let bot = add_token(data, "deploy-bot", "agent");
    assert_ne!(alice, bot);
    assert!(alice.len() >= 32, "a strong token: {alice}");

    let duplicate = token_command(data, &["add", "alice", "--role", "agent"]);
    assert!(!duplicate.status.success());
    assert!(
        stderr(&duplicate).contains("already exists"),
        "{}",
        stderr(&duplicate)
    );
    for bad in [
        "Alice",
        "1bot",
        "operator",
        "agent",
        "system",
        "anonymous",
        "a b",
    ] {
        let refused = token_command(data, &["add", bad, "--role", "agent"]);
        assert!(!refused.status.success(), "{bad} was accepted");
    }

    let registry = std::fs::read_to_string(data.join(proxi::identities::PRINCIPALS_FILE))
        .expect("the registry exists");
    assert!(
        !registry.contains(&alice) && !registry.contains(&bot),
        "tokens are never stored"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.join(proxi::identities::PRINCIPALS_FILE))
            .expect("metadata")
            .permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600);

    let listed = token_command(data, &["list", "--json"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let text = String::from_utf8(listed.stdout).expect("utf-8");
    assert!(!text.contains(&alice), "list never shows a token");
    let entries: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(entries[0]["name"], "alice");
    assert_eq!(entries[0]["role"], "operator");
    assert_eq!(entries[1]["name"], "deploy-bot");
    assert_eq!(entries[1]["role"], "agent");
    assert!(entries[0]["created"].as_str().is_some());
    assert_eq!(entries[0]["revoked"], Value::Null);

    revoke_token(data, "alice");
    let again = token_command(data, &["revoke", "alice"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already revoked"),
        "{}",
        stderr(&again)
    );
    let table = token_command(data, &["list"]);
    let table = String::from_utf8(table.stdout).expect("utf-8");
    let alice_row = table
        .lines()
        .find(|line| line.starts_with("alice "))
        .expect("alice is listed");
    assert!(!alice_row.trim_end().ends_with('-'), "revoked: {alice_row}");
    assert!(table.contains("deploy-bot"), "{table}");

    // Without the operator secret the registry cannot be signed.
    let keyless = std::process::Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["token", "add", "carol", "--role", "operator", "--data-dir"])
        .arg(data)
        .env_remove("PROXI_OPERATOR_TOKEN")
        .env_remove("PROXI_OPERATOR_CREDENTIAL")
        .output()
        .expect("runs");
    assert!(!keyless.status.success());
    assert!(
        stderr(&keyless).contains("no operator secret"),
        "{}",
        stderr(&keyless)
    );
}

#[tokio::test]
async fn named_tokens_act_under_their_names_over_rest_and_mcp() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(dir.path(), &["--durability", "process"]);
    // Added while the server runs: it picks them up without a restart.
    let alice = add_token(dir.path(), "alice", "operator");
    let bot = add_token(dir.path(), "deploy-bot", "agent");
    let api = Api::new(&server.url);

    let (status, body) = api
        .post(
            "/policy/set-mode",
            Some(&alice),
            json!({"mode": "EMERGENCY", "reason": "alice on call", "ttl_seconds": 600}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = api
        .post(
            "/tools/execute",
            Some(&bot),
            json!({"tool_name": "list_services", "arguments": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = api
        .post("/policy/set-mode", Some(&bot), json!({"mode": "NORMAL"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a named agent is an agent");
    // The built-in tokens keep working as `operator` and `agent`.
    let (status, _) = api
        .post(
            "/tools/execute",
            Some(AGENT_TOKEN),
            json!({"tool_name": "list_services", "arguments": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let http = http();
    let (status, session, _) = mcp_post(
        &http,
        &server.url,
        &bot,
        None,
        mcp_initialize_body("claude-code"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let session = session.expect("a session id");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    mcp_post(&http, &server.url, &bot, Some(&session), initialized).await;
    let call = json!({
        "jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "get_service_status", "arguments": {"service_name": "web-server"}}
    });
    let (status, _, body) = mcp_post(&http, &server.url, &bot, Some(&session), call).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Another named token cannot use deploy-bot's session.
    let ping = json!({"jsonrpc": "2.0", "id": 3, "method": "ping"});
    let (status, _, _) = mcp_post(&http, &server.url, &alice, Some(&session), ping).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let records = audit_records(dir.path());
    let change = last_of_kind(&records, "mode_change");
    assert_eq!(change.principal, "alice");
    assert_eq!(change.role.as_deref(), Some("operator"));
    let calls: Vec<&AuditRecord> = records.iter().filter(|r| r.kind == "tool_call").collect();
    let who: Vec<(&str, Option<&str>)> = calls
        .iter()
        .map(|r| (r.principal.as_str(), r.role.as_deref()))
        .collect();
    assert_eq!(
        who,
        [
            ("deploy-bot", Some("agent")),
            ("agent", Some("agent")),
            ("deploy-bot (mcp:claude-code)", Some("agent")),
        ]
    );
    let (status, body) = api.get("/audit?limit=50", Some(&alice)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a named operator reads the audit: {body}"
    );
    assert!(
        body["records"]
            .as_array()
            .expect("records")
            .iter()
            .any(|r| r["principal"] == "alice" && r["role"] == "operator"),
        "{body}"
    );
}

#[tokio::test]
async fn a_revoked_token_is_refused_by_the_running_server_on_the_next_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(dir.path(), &["--durability", "process"]);
    let bot = add_token(dir.path(), "deploy-bot", "agent");
    let api = Api::new(&server.url);
    let call = json!({"tool_name": "list_services", "arguments": {}});
    let (status, _) = api.post("/tools/execute", Some(&bot), call.clone()).await;
    assert_eq!(status, StatusCode::OK);
    revoke_token(dir.path(), "deploy-bot");
    let (status, body) = api.post("/tools/execute", Some(&bot), call.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = api.get("/policy/status", Some(&bot)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Over MCP too.
    let (status, _, _) = mcp_post(
        &http(),
        &server.url,
        &bot,
        None,
        mcp_initialize_body("claude-code"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let refusal = last_of_kind(&audit_records(dir.path()), "auth_refused");
    assert_eq!(refusal.principal, "anonymous");
    assert_eq!(refusal.reason_code.as_deref(), Some("invalid_token"));
    // The built-in tokens are unaffected.
    let (status, _) = api.get("/policy/status", Some(OPERATOR_TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
}

/// Logs in to the console with `token`: the status and the session cookie pair, if any.
async fn console_login(url: &str, token: &str) -> (StatusCode, Option<String>) {
    let response = http()
        .post(format!("{url}/console/login"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ORIGIN, url)
        .body(format!("token={token}"))
        .send()
        .await
        .expect("login is sent");
    let cookie = response
        .headers()
        .get(SET_COOKIE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(str::to_owned);
    (response.status(), cookie)
}

async fn overview(url: &str, cookie: &str) -> (StatusCode, Value) {
    let response = http()
        .get(format!("{url}/console/api/overview"))
        .header(COOKIE, cookie)
        .send()
        .await
        .expect("sent");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_named_operator_logs_in_to_the_console_and_its_sessions_are_audited() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(dir.path(), &["--durability", "process"]);
    let alice = add_token(dir.path(), "alice", "operator");
    let bot = add_token(dir.path(), "deploy-bot", "agent");

    let (status, _) = console_login(&server.url, &bot).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a named agent cannot log in");

    let (status, cookie) = console_login(&server.url, &alice).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = cookie.expect("a session cookie");
    let (status, body) = overview(&server.url, &cookie).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["principal"], "alice");
    let page = http()
        .get(format!("{}/console", server.url))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    let csrf = page
        .split(r#"<meta name="csrf-token" content=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries a CSRF token")
        .to_owned();
    let response = http()
        .post(format!("{}/console/logout", server.url))
        .header(COOKIE, &cookie)
        .header(ORIGIN, &server.url)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);

    let records = audit_records(dir.path());
    let login = last_of_kind(&records, "console_login");
    assert_eq!(
        (login.principal.as_str(), login.role.as_deref()),
        ("alice", Some("operator"))
    );
    assert_eq!(login.outcome, "logged_in");
    let logout = last_of_kind(&records, "console_logout");
    assert_eq!(logout.principal, "alice");
    assert!(logout.seq > login.seq);

    // A revoked operator's open console session ends with its token.
    let (status, cookie) = console_login(&server.url, &alice).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = cookie.expect("a session cookie");
    revoke_token(dir.path(), "alice");
    let (status, _) = overview(&server.url, &cookie).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = console_login(&server.url, &alice).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
