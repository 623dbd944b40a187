//! Upstream calls end to end through the real `proxi serve` binary, with the
//! fixture upstream (tests/fixtures/fixture_upstream.py, which records every call
//! it receives): results passed through over REST and MCP, a denied call that
//! never reaches the upstream, the drain on a mode switch (a slow call completes,
//! a hung one is cancelled upstream), kill -9 during a call leaving an intent
//! whose outcome is unknown, a hung upstream timing out, a crashed one being
//! unavailable while Proxi carries on.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::mcp_client::{call_tool, connect, connect_with, result_of, send_call};
use common::upstream::{eventually, fixture_calls, fixture_script, python, wait_for_fixture_call};
use common::{AGENT_TOKEN, Api, ServerProcess, write_policy};
use proxi::reason::Reason;
use reqwest::StatusCode;
use rmcp::model::{ClientCapabilities, ClientConfig, Implementation};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// A policy with the fixture as upstream `fx`: NORMAL allows only `fx__echo`,
/// EMERGENCY every `fx__*` tool.
fn policy(
    dir: &Path,
    call_log: &Path,
    drain_timeout_seconds: u64,
    call_timeout_seconds: u64,
) -> PathBuf {
    let text = json!({
        "default_mode": "NORMAL",
        "drain_timeout_seconds": drain_timeout_seconds,
        "rate_limits": [{"principal": "*", "tools": "*", "rate": "1000/s", "burst": 1000}],
        "upstreams": {
            "fx": {
                "command": python().display().to_string(),
                "args": [fixture_script().display().to_string()],
                "env": {"FIXTURE_CALL_LOG": call_log.display().to_string()},
                "required": true,
                "call_timeout_seconds": call_timeout_seconds,
            }
        },
        "modes": {
            "NORMAL": {"description": "read", "allowed_tools": ["fx__echo"]},
            "EMERGENCY": {"description": "act", "allowed_tools": ["fx__*"]}
        }
    });
    write_policy(dir, "upstream.json", &text.to_string())
}

struct Setup {
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    call_log: PathBuf,
    server: ServerProcess,
    api: Api,
}

fn start(drain_timeout_seconds: u64, call_timeout_seconds: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let policy = policy(
        dir.path(),
        &call_log,
        drain_timeout_seconds,
        call_timeout_seconds,
    );
    let data_dir = dir.path().join("data");
    let server = ServerProcess::start_with_policy(&data_dir, &policy, &[]);
    let api = Api::new(&server.url);
    Setup {
        _dir: dir,
        data_dir,
        call_log,
        server,
        api,
    }
}

fn outcomes(records: &[Value]) -> Vec<(String, String)> {
    records
        .iter()
        .filter(|record| record["kind"] == "tool_call")
        .map(|record| {
            (
                record["tool"].as_str().unwrap_or_default().to_owned(),
                record["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_passes_upstream_results_through_and_a_denied_call_never_reaches_the_upstream() {
    let setup = start(10, 60);
    let (status, body) = setup
        .api
        .execute("fx__echo", json!({"message": "hi there"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["result"]["content"][0]["type"], "text");
    assert_eq!(body["result"]["content"][0]["text"], "hi there");
    // Not allowed in NORMAL: denied, one record, never forwarded.
    let (status, body) = setup.api.execute("fx__slow", json!({"ms": 1})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let calls = fixture_calls(&setup.call_log);
    assert!(calls.iter().all(|call| call["tool"] == "echo"), "{calls:?}");
    let records = setup.api.audit(100).await;
    assert_eq!(
        outcomes(&records),
        [
            ("fx__echo".into(), "pending".into()),
            ("fx__echo".into(), "executed".into()),
            ("fx__slow".into(), "denied".into()),
        ]
    );
    let intent = &records[records.len() - 3];
    assert_eq!(
        records[records.len() - 2]["detail"]["intent_seq"],
        intent["seq"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_to_normal_waits_for_a_slow_rest_call_and_lists_it() {
    let setup = start(30, 60);
    setup.api.emergency().await;
    let slow = tokio::spawn({
        let api = setup.api.clone();
        async move { api.execute("fx__slow", json!({"ms": 1500})).await }
    });
    wait_for_fixture_call(&setup.call_log, "slow", "call").await;
    let (status, switch) = setup.api.set_mode("NORMAL", None, None).await;
    assert_eq!(status, StatusCode::OK, "{switch}");
    // The switch returned after the call ended, and says so.
    assert_eq!(switch["drained"][0]["tool"], "fx__slow", "{switch}");
    assert_eq!(switch["drained"][0]["outcome"], "executed");
    assert!(slow.is_finished() || slow.await.is_ok());
    let records = setup.api.audit(100).await;
    let kinds: Vec<_> = records
        .iter()
        .map(|record| {
            format!(
                "{}:{}",
                record["kind"].as_str().unwrap(),
                record["outcome"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        kinds[kinds.len() - 4..],
        [
            "tool_call:pending",
            "mode_change:changed",
            "tool_call:executed",
            "mode_drained:drained"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_still_running_at_the_drain_timeout_is_cancelled_upstream_over_mcp() {
    let setup = start(1, 60);
    setup.api.emergency().await;
    let client = connect(&setup.server.url, AGENT_TOKEN, "drain-test").await;
    let peer = client.peer().clone();
    let hung = tokio::spawn(async move { call_tool(&peer, "fx__hang", json!({})).await });
    wait_for_fixture_call(&setup.call_log, "hang", "call").await;
    let (status, switch) = setup.api.set_mode("NORMAL", None, None).await;
    assert_eq!(status, StatusCode::OK, "{switch}");
    assert_eq!(switch["cancelled"][0]["tool"], "fx__hang", "{switch}");
    assert_eq!(switch["cancelled"][0]["outcome"], "cancelled");
    let result = hung.await.unwrap();
    assert_eq!(result.is_error, Some(true));
    assert_eq!(
        result.structured_content.as_ref().unwrap()["reason_code"],
        "cancelled"
    );
    // The upstream heard the cancellation (notifications/cancelled).
    wait_for_fixture_call(&setup.call_log, "hang", "cancelled").await;
    let records = setup.api.audit(100).await;
    assert_eq!(records.last().unwrap()["kind"], "mode_drained");
    assert_eq!(records.last().unwrap()["outcome"], "cancelled");
    client.cancel().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_passes_an_upstream_result_through_unchanged() {
    let setup = start(10, 60);
    let client = connect(&setup.server.url, AGENT_TOKEN, "pass").await;
    let result = call_tool(&client, "fx__echo", json!({"message": "verbatim"})).await;
    assert_ne!(result.is_error, Some(true));
    assert_eq!(result.content[0].as_text().unwrap().text, "verbatim");
    // Proxi adds nothing of its own to an upstream's result.
    assert!(
        result
            .meta
            .as_ref()
            .is_none_or(|meta| !meta.0.contains_key("dev.proxi/audit_seq"))
    );
    client.cancel().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_upstream_times_out_and_a_crashed_one_is_unavailable_while_proxi_carries_on() {
    let setup = start(10, 1);
    setup.api.emergency().await;
    let (status, body) = setup.api.execute("fx__hang", json!({})).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["reason_code"], Reason::UpstreamTimeout.as_str());
    let (status, body) = setup.api.execute("fx__crash", json!({})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["reason_code"], Reason::UpstreamUnavailable.as_str());
    assert!(
        !body.to_string().contains(".py"),
        "no paths in answers: {body}"
    );
    let records = setup.api.audit(100).await;
    let recorded = outcomes(&records);
    assert!(
        recorded.contains(&("fx__hang".into(), "timeout".into())),
        "{recorded:?}"
    );
    assert!(
        recorded.contains(&("fx__crash".into(), "unavailable".into())),
        "{recorded:?}"
    );
    // Proxi answers, and the restarted upstream serves again. While it restarts its
    // tools stay known: a call is decided and fails fast as unavailable, never
    // `unknown_tool` (the catalog keeps the upstream's last listing).
    eventually("the fixture to be back", MINUTE, || async {
        let (status, body) = setup
            .api
            .execute("fx__echo", json!({"message": "back"}))
            .await;
        if status != StatusCode::OK {
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
            assert_eq!(
                body["reason_code"],
                Reason::UpstreamUnavailable.as_str(),
                "{body}"
            );
        }
        (status == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_upstream_call_leaves_an_intent_whose_outcome_is_unknown() {
    let setup = start(10, 60);
    setup.api.emergency().await;
    let _slow = tokio::spawn({
        let api = setup.api.clone();
        async move { api.execute("fx__slow", json!({"ms": 60000})).await }
    });
    wait_for_fixture_call(&setup.call_log, "slow", "call").await;
    let Setup {
        server, data_dir, ..
    } = setup;
    server.kill();
    let tail = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["audit", "tail", "-n", "10", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&tail.stdout);
    assert!(tail.status.success(), "{text}");
    let intent = text
        .lines()
        .find(|line| line.contains("fx__slow"))
        .unwrap_or_else(|| panic!("the intent is in the tail: {text}"));
    assert!(intent.contains("pending: outcome unknown"), "{text}");
    let verify = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["audit", "verify", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// The mode-thrash property of tests/consistency.rs with real upstream I/O: workers
/// call an active upstream tool that takes 50–200 ms while the mode flips between
/// EMERGENCY and NORMAL. From the trail: every call was decided under the mode in
/// force at its position, no active call was allowed under NORMAL, and every active
/// call decided before a switch to NORMAL had its outcome recorded before the next
/// switch began: a switch to NORMAL returns only once no active tool is running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_active_upstream_call_outlives_a_switch_to_normal_while_the_mode_thrashes() {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const WORKERS: u64 = 6;
    const SWITCHES: usize = 1_000;
    let setup = start(10, 60);
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let api = setup.api.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut calls = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (tool, arguments) = if calls % 4 == 3 {
                    ("fx__echo", json!({"message": "read"}))
                } else {
                    (
                        "fx__slow",
                        json!({"ms": 50 + (worker * 37 + calls * 53) % 151}),
                    )
                };
                let (status, body) = api.execute(tool, arguments).await;
                assert!(
                    status == StatusCode::OK || status == StatusCode::FORBIDDEN,
                    "unexpected {status}: {body}"
                );
                calls += 1;
            }
            calls
        }));
    }
    for switch in 0..SWITCHES {
        let (mode, reason) = if switch % 2 == 0 {
            ("EMERGENCY", Some("thrash"))
        } else {
            ("NORMAL", None)
        };
        let (status, body) = setup.api.set_mode(mode, reason, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            body.get("cancelled").is_none(),
            "nothing waits 10 s: {body}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for worker in workers {
        total += worker.await.unwrap();
    }
    let Setup {
        server, data_dir, ..
    } = setup;
    assert!(server.terminate().success());

    let db = data_dir.join(proxi::audit::AUDIT_DB_FILE);
    let records = proxi::audit::read_recent(&db, 100_000).unwrap();
    let mut mode_in_force = "NORMAL".to_owned();
    let mut intents: HashMap<u64, (String, String)> = HashMap::new();
    let mut outcome_of: HashMap<u64, u64> = HashMap::new();
    let mut normal_switches: Vec<u64> = Vec::new();
    let mut switches: Vec<u64> = Vec::new();
    let mut calls = 0;
    for record in &records {
        match record.kind.as_str() {
            "mode_change" => {
                mode_in_force = record.mode.clone();
                switches.push(record.seq);
                if record.mode == "NORMAL" {
                    normal_switches.push(record.seq);
                }
            }
            "mode_drained" => {}
            "tool_call" => match proxi::audit_view::resolved_intent(record) {
                Some(intent) => {
                    let (tool, mode) = intents.get(&intent).expect("an outcome follows its intent");
                    assert_eq!(record.mode, *mode, "an outcome carries its intent's mode");
                    assert_eq!(record.tool.as_deref(), Some(tool.as_str()));
                    outcome_of.insert(intent, record.seq);
                }
                None => {
                    calls += 1;
                    assert_eq!(
                        record.mode, mode_in_force,
                        "record {} was decided under {} while {} was in force",
                        record.seq, record.mode, mode_in_force
                    );
                    let tool = record.tool.clone().unwrap_or_default();
                    if record.decision == "allowed" {
                        assert!(proxi::audit_view::is_intent(record));
                        if tool == "fx__slow" {
                            assert_ne!(
                                record.mode, "NORMAL",
                                "active call allowed under NORMAL: {}",
                                record.seq
                            );
                        }
                        intents.insert(record.seq, (tool, record.mode.clone()));
                    }
                }
            },
            other => panic!("unexpected record kind {other}"),
        }
    }
    assert_eq!(calls, total, "every answered call is in the trail");
    assert_eq!(switches.len(), SWITCHES);
    let mut drained = 0;
    for (intent, (tool, mode)) in &intents {
        let outcome = *outcome_of
            .get(intent)
            .expect("every intent has its outcome");
        if tool != "fx__slow" || mode != "EMERGENCY" {
            continue;
        }
        // The first switch to NORMAL after the decision, and the switch after it.
        let Some(&to_normal) = normal_switches.iter().find(|&&seq| seq > *intent) else {
            continue;
        };
        let next = switches
            .iter()
            .copied()
            .find(|&seq| seq > to_normal)
            .unwrap_or(u64::MAX);
        assert!(
            outcome < next,
            "active call {intent} (outcome {outcome}) was still running after the switch to NORMAL at {to_normal} returned"
        );
        if outcome > to_normal {
            drained += 1;
        }
    }
    assert!(drained > 0, "some switch had to wait for an active call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_client_that_goes_away_cancels_its_upstream_call_which_is_still_recorded() {
    let setup = start(10, 60);
    setup.api.emergency().await;
    let hung = tokio::spawn({
        let api = setup.api.clone();
        async move { api.execute("fx__hang", json!({})).await }
    });
    wait_for_fixture_call(&setup.call_log, "hang", "call").await;
    // Dropping the request closes the connection; Proxi drops the handler future.
    hung.abort();
    wait_for_fixture_call(&setup.call_log, "hang", "cancelled").await;
    let last = eventually("the outcome record", MINUTE, || async {
        let records = setup.api.audit(10).await;
        let last = records.last().cloned()?;
        (last["outcome"] == "cancelled").then_some(last)
    })
    .await;
    assert_eq!(last["tool"], "fx__hang");
    assert!(last["detail"]["intent_seq"].is_u64(), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_cancellation_cancels_exactly_its_upstream_call() {
    let setup = start(10, 60);
    setup.api.emergency().await;
    let client = connect(&setup.server.url, AGENT_TOKEN, "canceller").await;
    // A second call in flight beside it must not be touched.
    let bystander = tokio::spawn({
        let peer = client.peer().clone();
        async move { call_tool(&peer, "fx__slow", json!({"ms": 1500})).await }
    });
    wait_for_fixture_call(&setup.call_log, "slow", "call").await;
    let handle = send_call(&client, "fx__hang", json!({})).await;
    wait_for_fixture_call(&setup.call_log, "hang", "call").await;
    handle
        .cancel(Some("the user gave up".into()))
        .await
        .unwrap();
    wait_for_fixture_call(&setup.call_log, "hang", "cancelled").await;
    let slow = bystander.await.unwrap();
    assert_ne!(slow.is_error, Some(true), "{slow:?}");
    let calls = fixture_calls(&setup.call_log);
    assert!(
        !calls
            .iter()
            .any(|call| call["tool"] == "slow" && call["event"] == "cancelled"),
        "{calls:?}"
    );
    let recorded = eventually("the cancelled outcome", MINUTE, || async {
        let records = setup.api.audit(20).await;
        outcomes(&records)
            .contains(&("fx__hang".into(), "cancelled".into()))
            .then_some(outcomes(&records))
    })
    .await;
    assert!(
        recorded.contains(&("fx__slow".into(), "executed".into())),
        "{recorded:?}"
    );
    client.cancel().await.ok();
}

#[test]
fn proxi_mcp_over_stdio_starts_the_upstreams_and_passes_results_through() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let policy = policy(dir.path(), &call_log, 10, 60);
    let mut mcp = common::McpStdio::start(&dir.path().join("data"), &policy, "stdio-test");
    let result = mcp.call_tool("fx__echo", json!({"message": "over stdio"}));
    assert_ne!(result["isError"], true, "{result}");
    assert_eq!(result["content"][0]["text"], "over stdio", "{result}");
    assert_eq!(
        result["structuredContent"]["result"], "over stdio",
        "{result}"
    );
    let denied = mcp.call_tool("fx__hang", json!({}));
    assert_eq!(denied["isError"], true, "{denied}");
    assert_eq!(
        denied["structuredContent"]["reason_code"],
        Reason::NotAllowed.as_str(),
        "{denied}"
    );
    mcp.close();
    let calls = fixture_calls(&call_log);
    assert!(calls.iter().all(|call| call["tool"] == "echo"), "{calls:?}");
}

/// An MCP client that counts `notifications/tools/list_changed`.
#[derive(Clone)]
struct ListChangedCounter {
    count: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

impl rmcp::ClientHandler for ListChangedCounter {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("list-changed", "1.0"),
        )
    }

    async fn on_tool_list_changed(
        &self,
        _context: rmcp::service::NotificationContext<rmcp::RoleClient>,
    ) {
        self.count.send_modify(|count| *count += 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_list_changed_refreshes_tools_list_and_is_passed_on_to_clients() {
    let setup = start(10, 60);
    setup.api.emergency().await;
    let counter = ListChangedCounter {
        count: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
    };
    let mut heard = counter.count.subscribe();
    let client = connect_with(counter.clone(), &setup.server.url, AGENT_TOKEN).await;
    let names = |tools: Vec<rmcp::model::Tool>| -> Vec<String> {
        tools
            .into_iter()
            .map(|tool| tool.name.to_string())
            .collect()
    };
    let before = names(client.peer().list_all_tools().await.unwrap());
    assert!(before.contains(&"fx__echo".to_owned()), "{before:?}");
    assert!(!before.contains(&"fx__added_late".to_owned()), "{before:?}");

    let (status, body) = setup
        .api
        .execute("fx__add_tool", json!({"name": "added_late"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tokio::time::timeout(MINUTE, heard.wait_for(|count| *count > 0))
        .await
        .expect("the client to hear tools/list_changed")
        .unwrap();
    let after = names(client.peer().list_all_tools().await.unwrap());
    assert!(after.contains(&"fx__added_late".to_owned()), "{after:?}");
    // The new tool is governed like the others: EMERGENCY's `fx__*` allows it.
    let result = call_tool(&client, "fx__added_late", json!({"message": "new"})).await;
    assert_ne!(result.is_error, Some(true), "{result:?}");
    assert_eq!(result.content[0].as_text().unwrap().text, "new");
    client.cancel().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_each_upstream_as_up() {
    let setup = start(10, 60);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let text = http
        .get(format!("{}/metrics", setup.server.url))
        .bearer_auth(common::OPERATOR_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines()
            .any(|line| line == "proxi_upstream_up{upstream=\"fx\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_and_pattern_violations_never_reach_the_upstream_over_rest_and_mcp() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let text = json!({
        "default_mode": "NORMAL",
        "rate_limits": [{"principal": "*", "tools": "*", "rate": "1000/s", "burst": 1000}],
        "upstreams": {
            "fx": {
                "command": python().display().to_string(),
                "args": [fixture_script().display().to_string()],
                "env": {"FIXTURE_CALL_LOG": call_log.display().to_string()},
                "required": true,
            }
        },
        "modes": {
            "NORMAL": {
                "description": "echo lower-case words only",
                "allowed_tools": ["fx__echo"],
                "constraints": {"fx__echo": {"message": {"pattern": "[a-z]+"}}}
            }
        }
    });
    let policy = write_policy(dir.path(), "pattern.json", &text.to_string());
    let server = ServerProcess::start_with_policy(&dir.path().join("data"), &policy, &[]);
    let api = Api::new(&server.url);

    // REST: wrong type (the upstream's own inputSchema), then a pattern that must
    // match the whole value ("ok DROP" contains a match but is not one).
    let (status, body) = api.execute("fx__echo", json!({"message": 7})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        body["reason_code"],
        Reason::InvalidArguments.as_str(),
        "{body}"
    );
    let (status, body) = api.execute("fx__echo", json!({"message": "ok DROP"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        body["reason_code"],
        Reason::ConstraintViolated.as_str(),
        "{body}"
    );

    // MCP: the same refusals are isError results with the reason code.
    let client = connect(&server.url, AGENT_TOKEN, "violations").await;
    for (arguments, reason) in [
        (json!({"message": 7}), Reason::InvalidArguments.as_str()),
        (
            json!({"message": "DROP"}),
            Reason::ConstraintViolated.as_str(),
        ),
    ] {
        let result = call_tool(&client, "fx__echo", arguments).await;
        assert_eq!(result.is_error, Some(true), "{result:?}");
        let structured = result.structured_content.expect("structuredContent");
        assert_eq!(structured["reason_code"], reason, "{structured}");
    }
    // A valid call goes through, and it is the only one the upstream ever saw.
    let result = call_tool(&client, "fx__echo", json!({"message": "fine"})).await;
    assert_ne!(result.is_error, Some(true), "{result:?}");
    client.cancel().await.ok();
    let received: Vec<Value> = fixture_calls(&call_log)
        .into_iter()
        .filter(|call| call["tool"] == "echo")
        .collect();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0]["arguments"]["message"], "fine", "{received:?}");
}

/// An MCP client of Proxi that keeps the progress notifications it receives.
#[derive(Clone, Default)]
struct ProgressKeeper {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(rmcp::model::ProgressToken, f64)>>>,
}

impl rmcp::ClientHandler for ProgressKeeper {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("progress-keeper", "1.0"),
        )
    }

    async fn on_progress(
        &self,
        params: rmcp::model::ProgressNotificationParam,
        _context: rmcp::service::NotificationContext<rmcp::RoleClient>,
    ) {
        self.seen
            .lock()
            .unwrap()
            .push((params.progress_token, params.progress));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_through_proxi_reaches_only_its_caller_under_the_callers_token() {
    let setup = start(10, 60);
    setup.api.emergency().await;
    let connect = || async {
        let keeper = ProgressKeeper::default();
        let client = connect_with(keeper.clone(), &setup.server.url, AGENT_TOKEN).await;
        (client, keeper)
    };
    let (alice, alice_seen) = connect().await;
    let (bob, bob_seen) = connect().await;
    let send =
        |peer, steps: u64| send_call(peer, "fx__progress", json!({"steps": steps, "gap_ms": 30}));
    let alice_call = send(alice.peer(), 5).await;
    let bob_call = send(bob.peer(), 3).await;
    let (alice_token, bob_token) = (
        alice_call.progress_token.clone(),
        bob_call.progress_token.clone(),
    );
    let (alice_result, bob_result) = tokio::join!(result_of(alice_call), result_of(bob_call));
    for (result, expected) in [(alice_result, "5 steps done"), (bob_result, "3 steps done")] {
        assert_eq!(result.content[0].as_text().unwrap().text, expected)
    }
    // Progress is forwarded beside the result, so the last one may trail it.
    eventually("all progress to arrive", MINUTE, || {
        let counts = (
            alice_seen.seen.lock().unwrap().len(),
            bob_seen.seen.lock().unwrap().len(),
        );
        async move { (counts == (5, 3)).then_some(()) }
    })
    .await;
    let alice_progress = alice_seen.seen.lock().unwrap().clone();
    let bob_progress = bob_seen.seen.lock().unwrap().clone();
    assert!(
        alice_progress
            .iter()
            .all(|(token, _)| *token == alice_token),
        "{alice_progress:?}"
    );
    assert!(
        bob_progress.iter().all(|(token, _)| *token == bob_token),
        "{bob_progress:?}"
    );
    let mut values: Vec<f64> = alice_progress.iter().map(|(_, value)| *value).collect();
    values.sort_by(f64::total_cmp);
    assert_eq!(values, [1.0, 2.0, 3.0, 4.0, 5.0]);
    alice.cancel().await.ok();
    bob.cancel().await.ok();
}
