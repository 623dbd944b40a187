//! `GET /audit` filters and cursor, and `GET /audit/stream` (SSE) with resume,
//! against a real server on loopback.

mod common;

use std::time::Duration;

use common::{AGENT_TOKEN, Api, OPERATOR_TOKEN, TestServer};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn audit(api: &Api, query: &str) -> (StatusCode, Value) {
    api.get(&format!("/audit?{query}"), Some(OPERATOR_TOKEN))
        .await
}

fn seqs(body: &Value) -> Vec<u64> {
    body["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|record| record["seq"].as_u64().expect("seq"))
        .collect()
}

async fn some_calls(api: &Api) {
    for _ in 0..3 {
        let (status, body) = api.execute("list_services", json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    for _ in 0..2 {
        let (status, body) = api
            .execute("restart_service", json!({"service_name": "web-server"}))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    }
    let (status, body) = api
        .execute("get_service_status", json!({"service_name": "database"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn filters_select_by_tool_glob_decision_reason_and_principal() {
    let server = TestServer::start().await;
    let api = server.api();
    some_calls(&api).await;
    api.emergency().await;

    let (status, body) = audit(&api, "tool=list_*&decision=allowed").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["count"], 3, "{body}");
    let (_, body) = audit(&api, "tool=*_status").await;
    assert_eq!(body["count"], 1, "{body}");
    assert_eq!(body["records"][0]["tool"], "get_service_status");
    let (_, body) = audit(&api, "decision=denied&kind=tool_call").await;
    assert_eq!(body["count"], 2, "{body}");
    let reason = body["records"][0]["reason_code"].as_str().expect("reason");
    let (_, body) = audit(&api, &format!("reason_code={reason}")).await;
    assert_eq!(body["count"], 2, "{body}");
    let (_, body) = audit(&api, "kind=mode_change&principal=operator").await;
    assert_eq!(body["count"], 1, "{body}");
    let (_, body) = audit(&api, "principal=agent&tool=list_services").await;
    assert_eq!(body["count"], 3, "{body}");
    // A time window that ends before the first record matches nothing.
    let (_, body) = audit(&api, "until=2000-01-01T00:00:00Z").await;
    assert_eq!(body["count"], 0, "{body}");
    let (_, body) = audit(&api, "since=2000-01-01T00:00:00Z&tool=list_services").await;
    assert_eq!(body["count"], 3, "{body}");
}

#[tokio::test]
async fn after_seq_pages_oldest_first_and_says_when_more_follow() {
    let server = TestServer::start().await;
    let api = server.api();
    some_calls(&api).await;

    let (_, all) = audit(&api, "kind=tool_call&limit=1000").await;
    let all = seqs(&all);
    assert_eq!(all.len(), 6);

    let mut pages = Vec::new();
    let mut cursor = 0;
    loop {
        let (status, body) =
            audit(&api, &format!("kind=tool_call&after_seq={cursor}&limit=4")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        pages.push(seqs(&body));
        match body.get("next_after_seq").and_then(Value::as_u64) {
            Some(next) => {
                assert_eq!(Some(&next), pages.last().and_then(|page| page.last()));
                cursor = next;
            }
            None => break,
        }
    }
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert_eq!(pages.concat(), all, "pages are oldest first and complete");

    // Without a cursor: the newest `limit`, oldest first, and no next page.
    let (_, body) = audit(&api, "kind=tool_call&limit=2").await;
    assert_eq!(seqs(&body), all[4..].to_vec());
    assert!(body.get("next_after_seq").is_none(), "{body}");
}

#[tokio::test]
async fn bad_filters_are_refused_with_a_clear_400() {
    let server = TestServer::start().await;
    let api = server.api();
    for (query, needle) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("since=yesterday", "since"),
        ("until=12", "until"),
        ("colour=red", "colour"),
        // Before, a kind or decision no record can have answered an empty page.
        (
            "kind=toolcall",
            "unknown kind \"toolcall\"; the kinds are tool_call,",
        ),
        (
            "decision=maybe",
            "unknown decision \"maybe\"; the decisions are allowed, denied, rejected",
        ),
    ] {
        let (status, body) = audit(&api, query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(
            body["error"].as_str().expect("error").contains(needle),
            "{query}: {body}"
        );
    }
    let long = "x".repeat(300);
    let (status, _) = audit(&api, &format!("tool={long}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api.get("/audit", Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api.get("/audit/stream", Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// Reads SSE events (`id`, `event`, parsed `data`) from a streaming response.
struct Events {
    bytes: futures::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buffer: String,
}

impl Events {
    async fn open(api: &Api, query: &str, last_event_id: Option<u64>) -> Events {
        let mut request = api
            .http
            .get(format!("{}/audit/stream?{query}", api.url))
            .bearer_auth(OPERATOR_TOKEN);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await.expect("stream opens");
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .expect("content type")
                .starts_with("text/event-stream")
        );
        Events {
            bytes: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next record event: (id, record).
    async fn next(&mut self) -> (u64, Value) {
        let read = async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let field = |name: &str| {
                        block
                            .lines()
                            .find_map(|line| line.strip_prefix(name))
                            .map(|value| value.trim().to_owned())
                    };
                    if field("event:").as_deref() != Some("record") {
                        continue;
                    }
                    let id = field("id:").expect("id").parse().expect("numeric id");
                    let data = serde_json::from_str(&field("data:").expect("data")).expect("json");
                    return (id, data);
                }
                let chunk = self
                    .bytes
                    .next()
                    .await
                    .expect("the stream stays open")
                    .expect("the stream reads");
                self.buffer
                    .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("an event arrives")
    }
}

#[tokio::test]
async fn the_stream_sends_new_records_with_their_seq_and_resumes_after_last_event_id() {
    let server = TestServer::start().await;
    let api = server.api();
    let (status, _) = api.execute("list_services", json!({})).await;
    assert_eq!(status, StatusCode::OK);

    // Starts at the head: the call before does not come again.
    let mut events = Events::open(&api, "", None).await;
    let (_, first) = api
        .execute("get_service_status", json!({"service_name": "database"}))
        .await;
    let first_seq = first["audit_seq"].as_u64().expect("seq");
    let (id, record) = events.next().await;
    assert_eq!(id, first_seq);
    assert_eq!(record["seq"], first_seq);
    assert_eq!(record["tool"], "get_service_status");

    // Records committed while no one listens arrive after a reconnect.
    drop(events);
    let mut later = Vec::new();
    for _ in 0..3 {
        let (_, body) = api.execute("list_services", json!({})).await;
        later.push(body["audit_seq"].as_u64().expect("seq"));
    }
    let mut resumed = Events::open(&api, "", Some(first_seq)).await;
    for expected in &later {
        assert_eq!(resumed.next().await.0, *expected);
    }

    // Filters apply to the stream too.
    let mut denied = Events::open(&api, "decision=denied", None).await;
    let _ = api.execute("list_services", json!({})).await;
    let (_, refused) = api
        .execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    let (id, record) = denied.next().await;
    assert_eq!(Some(id), refused["audit_seq"].as_u64());
    assert_eq!(record["decision"], "denied");
}

#[tokio::test]
async fn a_stream_that_is_not_read_does_not_hold_up_calls() {
    let server = TestServer::start_with_policy(&common::high_rate_limit_policy_path()).await;
    let api = server.api();
    // Opened and never read: its buffer fills while calls go on.
    let _idle = Events::open(&api, "", None).await;
    for _ in 0..600 {
        let (status, body) = api.execute("list_services", json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, body) = audit(&api, "tool=list_services&limit=1000").await;
    assert_eq!(body["count"], 600);
}

fn tail(data_dir: &std::path::Path, extra: &[&str]) -> Vec<Value> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["audit", "tail", "--json", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .output()
        .expect("proxi runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON record per line"))
        .collect()
}

#[tokio::test]
async fn audit_tail_takes_the_same_filters_and_follows_the_stream() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = common::ServerProcess::start(dir.path(), &[]);
    let api = Api::new(&server.url);
    some_calls(&api).await;

    let listed = tail(dir.path(), &["--tool", "list_*", "-n", "2"]);
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|record| record["tool"] == "list_services")
    );
    let denied = tail(dir.path(), &["--decision", "denied", "--kind", "tool_call"]);
    assert_eq!(denied.len(), 2);
    let none = tail(dir.path(), &["--until", "2000-01-01T00:00:00Z"]);
    assert!(none.is_empty());

    let mut follower = std::process::Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args([
            "audit",
            "tail",
            "--json",
            "--follow",
            "-n",
            "1",
            "--decision",
            "denied",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--server", &server.url])
        .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("proxi runs");
    let stdout = follower.stdout.take().expect("stdout");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let next = || -> Value {
        let line = received
            .recv_timeout(Duration::from_secs(20))
            .expect("a line from audit tail --follow");
        serde_json::from_str(&line).expect("json")
    };
    // The newest matching record first, then what arrives.
    let newest = next();
    assert_eq!(newest["decision"], "denied");
    let _ = api.execute("list_services", json!({})).await;
    let (_, refused) = api
        .execute("delete_database", json!({"database_name": "x"}))
        .await;
    let arrived = next();
    assert_eq!(arrived["seq"], refused["audit_seq"], "{arrived}");
    assert_eq!(arrived["tool"], "delete_database");
    let _ = follower.kill();
    let _ = follower.wait();
}
