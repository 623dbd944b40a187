//! The REST API end to end: the seed's scenarios, auth, bad input and modes,
//! against a real server on an ephemeral loopback port.

mod common;

use std::time::Duration;

use common::{AGENT_TOKEN, Api, OPERATOR_TOKEN, TestServer};
use proxi::reason::Reason;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn assert_denied(status: StatusCode, body: &Value, reason: &str) {
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["policy_violation"], true, "{body}");
    assert_eq!(body["reason_code"], reason, "{body}");
    assert!(
        body["blocked_reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{body}"
    );
}

async fn fleet_size(api: &Api) -> i64 {
    let (_, body) = api.get("/infrastructure/status", Some(AGENT_TOKEN)).await;
    body["fleet_size"].as_i64().expect("fleet_size")
}

async fn service_status(api: &Api, service: &str) -> String {
    let (_, body) = api.get("/infrastructure/status", Some(AGENT_TOKEN)).await;
    body["services"][service]
        .as_str()
        .expect("service")
        .to_owned()
}

#[tokio::test]
async fn scenario_1_normal_mode_blocks_restart() {
    let server = TestServer::start().await;
    let api = server.api();
    let (status, body) = api
        .execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    assert_denied(status, &body, Reason::BlockedInMode.as_str());
    assert_eq!(body["mode"], "NORMAL");
    assert!(
        body["how_to_proceed"]
            .as_str()
            .unwrap()
            .contains("EMERGENCY")
    );
}

#[tokio::test]
async fn scenario_2_emergency_mode_allows_the_fix() {
    let server = TestServer::start().await;
    let api = server.api();
    let (status, body) = api
        .post(
            "/infrastructure/simulate-incident",
            Some(OPERATOR_TOKEN),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(service_status(&api, "web-server").await, "critical");
    let (status, body) = api
        .set_mode("EMERGENCY", Some("web-server is critical"), Some(900))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["mode"], "EMERGENCY");
    assert!(body["emergency_expires_at"].is_string());
    let (status, body) = api
        .execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["result"]["status"], "healthy");
    assert_eq!(service_status(&api, "web-server").await, "healthy");
}

#[tokio::test]
async fn scenario_3_delete_database_is_blocked_in_every_mode() {
    let server = TestServer::start().await;
    let api = server.api();
    let (status, body) = api
        .execute("delete_database", json!({"db_name": "database"}))
        .await;
    assert_denied(status, &body, Reason::AlwaysBlocked.as_str());
    api.emergency().await;
    let (status, body) = api
        .execute("delete_database", json!({"db_name": "database"}))
        .await;
    assert_denied(status, &body, Reason::AlwaysBlocked.as_str());
    assert_eq!(service_status(&api, "database").await, "healthy");
}

#[tokio::test]
async fn scenario_4_chained_calls_are_each_decided() {
    let server = TestServer::start().await;
    let api = server.api();
    let chain = [
        (
            "restart_service",
            json!({"service_name": "web-server"}),
            Reason::BlockedInMode.as_str(),
        ),
        (
            "scale_fleet",
            json!({"count": 5}),
            Reason::BlockedInMode.as_str(),
        ),
        (
            "delete_database",
            json!({"db_name": "database"}),
            Reason::AlwaysBlocked.as_str(),
        ),
    ];
    for (tool, arguments, reason) in chain {
        let (status, body) = api.execute(tool, arguments).await;
        assert_denied(status, &body, reason);
    }
    let records = api.audit(10).await;
    let denied: Vec<&str> = records
        .iter()
        .filter(|r| r["decision"] == "denied")
        .map(|r| r["tool"].as_str().unwrap())
        .collect();
    assert_eq!(
        denied,
        ["restart_service", "scale_fleet", "delete_database"]
    );
}

#[tokio::test]
async fn scenario_5_boundary_values_fail_argument_validation() {
    let server = TestServer::start().await;
    let api = server.api();
    api.emergency().await;
    for count in [json!(-1), json!(0), json!(1000), json!("3"), json!(2.5)] {
        let (status, body) = api.execute("scale_fleet", json!({"count": count})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["reason_code"], Reason::InvalidArguments.as_str());
        assert_eq!(body["policy_violation"], false);
        assert!(body["error"].as_str().unwrap().contains("count"), "{body}");
    }
    assert_eq!(fleet_size(&api).await, 3);
    // Within the schema but over the EMERGENCY constraint: a policy decision.
    let (status, body) = api.execute("scale_fleet", json!({"count": 50})).await;
    assert_denied(status, &body, Reason::ConstraintViolated.as_str());
    assert_eq!(fleet_size(&api).await, 3);
    let (status, body) = api.execute("scale_fleet", json!({"count": 5})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(fleet_size(&api).await, 5);
}

#[tokio::test]
async fn scenario_6_mode_changes_are_seen_by_the_next_call() {
    let server = TestServer::start().await;
    let api = server.api();
    let restart = json!({"service_name": "cache"});
    let (status, _) = api.execute("restart_service", restart.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    api.emergency().await;
    let (status, body) = api.execute("restart_service", restart.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["mode"], "EMERGENCY");
    api.normal().await;
    let (status, body) = api.execute("restart_service", restart).await;
    assert_denied(status, &body, Reason::BlockedInMode.as_str());
    assert_eq!(body["mode"], "NORMAL");
}

#[tokio::test]
async fn scenario_7_unknown_tools_are_rejected_with_the_real_list() {
    let server = TestServer::start().await;
    let api = server.api();
    let (status, body) = api
        .execute("magic_fix", json!({"service_name": "web-server"}))
        .await;
    assert_denied(status, &body, Reason::UnknownTool.as_str());
    let known: Vec<&str> = body["known_tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(known.len(), 6);
    assert!(known.contains(&"restart_service"));
    let records = api.audit(1).await;
    assert_eq!(records[0]["tool"], "magic_fix");
    assert_eq!(records[0]["reason_code"], Reason::UnknownTool.as_str());
}

#[tokio::test]
async fn scenario_8_unknown_services_fail_resource_validation() {
    let server = TestServer::start().await;
    let api = server.api();
    api.emergency().await;
    let (status, body) = api
        .execute(
            "restart_service",
            json!({"service_name": "payment-service"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["success"], false);
    assert_eq!(body["policy_violation"], false);
    assert_eq!(body["reason_code"], Reason::UnknownService.as_str());
    assert!(body["error"].as_str().unwrap().contains("payment-service"));
}

#[tokio::test]
async fn scenario_9_read_only_monitoring_is_allowed() {
    let server = TestServer::start().await;
    let api = server.api();
    let (status, body) = api.execute("list_services", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["result"]["services"].as_array().unwrap().len(), 4);
    let (status, body) = api
        .execute("get_service_status", json!({"service_name": "api-gateway"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["result"]["status"], "healthy");
    // Reads change nothing, so the action log is still empty.
    let (status, body) = api.execute("read_logs", json!({"lines": 5})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["result"]["returned"], 0);
}

#[tokio::test]
async fn health_status_and_catalog_follow_the_mode() {
    let server = TestServer::start().await;
    let api = server.api();
    let (status, health) = api.get("/", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["mode"], "NORMAL");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));

    let (_, policy) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(policy["mode"], "NORMAL");
    assert_eq!(policy["always_blocked"], json!(["delete_database"]));
    assert_eq!(policy["emergency_expires_at"], Value::Null);
    assert_eq!(
        policy["allowed_tools"],
        json!(["list_services", "get_service_status", "read_logs"])
    );

    let allowed = |catalog: &Value, tool: &str| {
        catalog["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == tool)
            .map(|t| t["allowed"].as_bool().unwrap())
            .unwrap()
    };
    let (_, catalog) = api.get("/tools/catalog", Some(AGENT_TOKEN)).await;
    assert_eq!(catalog["tools"].as_array().unwrap().len(), 6);
    assert!(!allowed(&catalog, "restart_service"));
    let scale = catalog["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "scale_fleet")
        .unwrap();
    assert_eq!(scale["category"], "active");
    assert_eq!(scale["input_schema"]["properties"]["count"]["minimum"], 1);
    api.emergency().await;
    let (_, catalog) = api.get("/tools/catalog", Some(AGENT_TOKEN)).await;
    assert!(allowed(&catalog, "restart_service"));
    assert!(!allowed(&catalog, "delete_database"));
}

#[tokio::test]
async fn auth_refusals_are_401_or_403_and_audited() {
    let server = TestServer::start().await;
    let api = server.api();
    let response = api
        .http
        .get(format!("{}/policy/status", api.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let (status, body) = api.get("/tools/catalog", Some("not-the-token")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].is_string());
    let (status, _) = api.execute("list_services", json!({})).await;
    assert_eq!(status, StatusCode::OK);

    // The agent token may not touch operator endpoints.
    let (status, _) = api
        .post(
            "/policy/set-mode",
            Some(AGENT_TOKEN),
            json!({"mode": "EMERGENCY", "reason": "me"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api
        .post(
            "/infrastructure/simulate-incident",
            Some(AGENT_TOKEN),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api.get("/audit", Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, policy) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(
        policy["mode"], "NORMAL",
        "the agent must not escalate itself"
    );

    let records = api.audit(20).await;
    let refusals: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["kind"] == "auth_refused")
        .map(|r| {
            (
                r["principal"].as_str().unwrap(),
                r["reason_code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        refusals,
        [
            ("anonymous", Reason::MissingToken.as_str()),
            ("anonymous", Reason::InvalidToken.as_str()),
            // Refusals are aggregated: the first of a window per source and reason
            // is recorded at once, the other two go into its summary record.
            ("agent", Reason::Forbidden.as_str()),
        ]
    );
}

#[tokio::test]
async fn mode_changes_are_validated() {
    let server = TestServer::start().await;
    let api = server.api();
    let (status, body) = api.set_mode("PANIC", Some("why not"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("unknown mode 'PANIC'") && error.contains("EMERGENCY"),
        "{error}"
    );
    let (status, body) = api.set_mode("EMERGENCY", None, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("reason"));
    let (status, body) = api.set_mode("EMERGENCY", Some("x"), Some(7200)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("3600"), "{body}");
    let (status, _) = api.set_mode("EMERGENCY", Some("x"), Some(0)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api.set_mode("NORMAL", None, Some(60)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = api
        .set_mode("emergency", Some("lower case is fine"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["mode"], "EMERGENCY");
    assert_eq!(body["reason"], "lower case is fine");
    let records = api.audit(1).await;
    assert_eq!(records[0]["kind"], "mode_change");
    assert_eq!(records[0]["principal"], "operator");
    assert_eq!(records[0]["detail"]["ttl_seconds"], 900);
    assert_eq!(records[0]["detail"]["reason"], "lower case is fine");
}

#[tokio::test]
async fn emergency_lapses_by_itself_and_the_lapse_is_audited() {
    let server = TestServer::start().await;
    let api = server.api();
    let (status, body) = api
        .set_mode("EMERGENCY", Some("short drill"), Some(1))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = api
        .execute("restart_service", json!({"service_name": "cache"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    // Wait for the expiry task to record the lapse (polling, bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let records = api.audit(5).await;
        if records.iter().any(|r| r["kind"] == "mode_expired") {
            let lapse = records
                .iter()
                .find(|r| r["kind"] == "mode_expired")
                .unwrap();
            assert_eq!(lapse["principal"], "system");
            assert_eq!(lapse["mode"], "NORMAL");
            assert_eq!(lapse["detail"]["from"], "EMERGENCY");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the emergency never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, policy) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(policy["mode"], "NORMAL");
    assert_eq!(policy["emergency_expires_at"], Value::Null);
    let (status, body) = api
        .execute("restart_service", json!({"service_name": "cache"}))
        .await;
    assert_denied(status, &body, Reason::BlockedInMode.as_str());
}

#[tokio::test]
async fn incidents_and_audit_queries_are_validated() {
    let server = TestServer::start().await;
    let api = server.api();
    let (status, body) = api
        .post(
            "/infrastructure/simulate-incident",
            Some(OPERATOR_TOKEN),
            json!({"service": "cache", "status": "degraded"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["infrastructure"]["services"]["cache"], "degraded");
    let (status, _) = api
        .post(
            "/infrastructure/simulate-incident",
            Some(OPERATOR_TOKEN),
            json!({"service": "cache", "status": "on-fire"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = api
        .post(
            "/infrastructure/simulate-incident",
            Some(OPERATOR_TOKEN),
            json!({"service": "mainframe"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    for query in [
        "?limit=0",
        "?limit=1001",
        "?limit=abc",
        "?limit=-1",
        "?page=2",
    ] {
        let (status, body) = api
            .get(&format!("/audit{query}"), Some(OPERATOR_TOKEN))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(body["error"].is_string());
    }
    // The rejected status never reached the gateway; the unknown service did, and failed.
    let records = api.audit(1000).await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["kind"], "incident");
    assert_eq!(records[1]["outcome"], "failed");
    assert_eq!(records[1]["reason_code"], Reason::UnknownService.as_str());
}

/// No internals in error bodies: paths, SQL, panics or Rust type names.
fn assert_safe_error(status: StatusCode, body: &Value, expected: StatusCode) {
    assert_eq!(status, expected, "{body}");
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {body}"));
    for leak in [
        "/tmp",
        "/work",
        "/root",
        ".rs",
        "sqlite",
        "SELECT",
        "panicked",
        "backtrace",
        "proxi::",
    ] {
        assert!(!error.contains(leak), "error leaks {leak:?}: {error}");
    }
}

#[tokio::test]
async fn bad_input_gets_clear_4xx_answers_and_the_server_stays_up() {
    let server = TestServer::start().await;
    let api = server.api();
    let raw = |body: &'static str, content_type: &'static str| {
        let api = api.clone();
        async move {
            let response = api
                .http
                .post(format!("{}/tools/execute", api.url))
                .bearer_auth(AGENT_TOKEN)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body)
        }
    };
    let (status, body) = raw("{not json", "application/json").await;
    assert_safe_error(status, &body, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed JSON")
    );
    let (status, body) = raw(r#"{"tool_name":"list_services"}"#, "text/plain").await;
    assert_safe_error(status, &body, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, body) = raw(
        r#"{"tool_name":"list_services","sudo":true}"#,
        "application/json",
    )
    .await;
    assert_safe_error(status, &body, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `sudo`")
    );
    let (status, body) = raw(r#"{"tool_name": 7}"#, "application/json").await;
    assert_safe_error(status, &body, StatusCode::BAD_REQUEST);
    let (status, body) = raw(r#"[]"#, "application/json").await;
    assert_safe_error(status, &body, StatusCode::BAD_REQUEST);

    let long_name = "x".repeat(129);
    let (status, body) = api.execute(&long_name, json!({})).await;
    assert_safe_error(status, &body, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("128 bytes"));

    let huge = json!({"tool_name": "read_logs", "arguments": {"pad": "y".repeat(70 * 1024)}});
    let (status, body) = api.post("/tools/execute", Some(AGENT_TOKEN), huge).await;
    assert_safe_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE);

    let (status, body) = api.execute("list_services", json!("not an object")).await;
    assert_safe_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    // get_service_status, which NORMAL allows: a blocked tool is denied whatever its arguments.
    let (status, body) = api
        .execute(
            "get_service_status",
            json!({"service_name": "../../etc/passwd"}),
        )
        .await;
    assert_safe_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY);

    let (status, body) = api.get("/no/such/endpoint", Some(AGENT_TOKEN)).await;
    assert_safe_error(status, &body, StatusCode::NOT_FOUND);
    let (status, body) = api.get("/tools/execute", Some(AGENT_TOKEN)).await;
    assert_safe_error(status, &body, StatusCode::METHOD_NOT_ALLOWED);
    let (status, body) = api
        .post(
            "/policy/set-mode",
            Some(OPERATOR_TOKEN),
            json!({"mode": "EMERGENCY", "reason": "x".repeat(600)}),
        )
        .await;
    assert_safe_error(status, &body, StatusCode::BAD_REQUEST);

    let (status, _) = api.get("/", None).await;
    assert_eq!(status, StatusCode::OK, "the server survived");
}
