//! `/metrics` end to end: the operator token on the main listener, the
//! token-free `--metrics-bind` listener, and the series README's metrics section lists.

mod common;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::{AGENT_TOKEN, Api, OPERATOR_TOKEN, ServerProcess, TestServer};
use reqwest::StatusCode;
use serde_json::json;

async fn scrape(api: &Api, token: Option<&str>) -> (StatusCode, String, String) {
    let mut request = api.http.get(format!("{}/metrics", api.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request is sent");
    let status = response.status();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, content_type, response.text().await.expect("body"))
}

/// The value of the sample line that starts with `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn metrics_need_the_operator_token_and_count_calls_modes_and_records() {
    let server = TestServer::start().await;
    let api = server.api();
    let (status, _, _) = scrape(&api, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = scrape(&api, Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, body) = api.execute("list_services", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = api
        .execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = api.execute("drop_tables", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    api.emergency().await;

    let (status, content_type, text) = scrape(&api, Some(OPERATOR_TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let calls = |labels: &str| sample(&text, &format!("proxi_tool_calls_total{{{labels}}}"));
    assert_eq!(
        calls(r#"tool="list_services",decision="allowed",reason_code="""#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        calls(r#"tool="restart_service",decision="denied",reason_code="not_allowed""#).or_else(
            || calls(r#"tool="restart_service",decision="denied",reason_code="blocked_in_mode""#)
        ),
        Some(1.0),
        "{text}"
    );
    // A name that is no tool is counted under one label, whatever the agent sent.
    assert_eq!(
        calls(r#"tool="other",decision="rejected",reason_code="unknown_tool""#),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("drop_tables"), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"proxi_tool_call_duration_seconds_count{tool="list_services",decision="allowed"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"proxi_mode{mode="EMERGENCY"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"proxi_mode{mode="NORMAL"}"#),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "proxi_mode_changes_total"),
        Some(1.0),
        "{text}"
    );
    // Three tool calls and the mode change, at least (refusals add their own).
    let records = sample(&text, "proxi_audit_records_total").expect("records");
    assert!(records >= 4.0, "{text}");
    assert!(sample(&text, "proxi_audit_commit_seconds_count").expect("commits") >= 1.0);
    assert_eq!(
        sample(&text, "proxi_audit_queue_depth"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "proxi_approvals_pending"),
        Some(0.0),
        "{text}"
    );
    // No upstream is wired into the gateway yet: the family has no series.
    assert!(!text.contains("proxi_upstream_up{"), "{text}");
}

#[test]
fn metrics_bind_serves_metrics_without_a_token_and_nothing_else() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = ServerProcess::start(dir.path(), &["--metrics-bind", "127.0.0.1:0"]);
    let stderr = server.child.stderr.take().expect("stderr is piped");
    let mut lines = BufReader::new(stderr).lines();
    let scrape_url = loop {
        let line = lines
            .next()
            .expect("the server announces the metrics listener")
            .expect("stderr is readable");
        if let Some(rest) = line.strip_prefix("metrics (no token) on ") {
            break rest.trim_end_matches("/metrics").to_owned();
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let scraper = Api::new(&scrape_url);
        let (status, _, text) = scrape(&scraper, None).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert!(text.contains("proxi_tool_calls_total"), "{text}");
        let (status, _) = scraper.get("/policy/status", Some(AGENT_TOKEN)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // The main listener still wants the token.
        let (status, _, _) = scrape(&Api::new(&server.url), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // A scraper names the listener by whatever address it reaches it at.
        let response = scraper
            .http
            .get(format!("{scrape_url}/metrics"))
            .header("Host", "metrics.internal:9464")
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("request is sent");
        assert_eq!(response.status(), StatusCode::OK);
    });
}
