//! Policy reload, end to end: `POST /policy/reload` on a real server while calls
//! run, refused files, the mode fallback, `SIGHUP`, `serve --watch` and
//! `proxi policy reload`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{
    AGENT_TOKEN, OPERATOR_TOKEN, ServerProcess, TestServer, audit_records,
    high_rate_limit_policy_path, wait_until,
};
use proxi::canonical::canonical_digest;
use proxi::policy_source::PolicySource;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The shipped policy with rate limits no test reaches.
fn base_policy() -> Value {
    let text = std::fs::read_to_string(high_rate_limit_policy_path()).expect("policy readable");
    serde_json::from_str(&text).expect("policy is JSON")
}

/// The base policy with restart_service allowed in NORMAL: its decisions differ.
fn restart_allowed_policy() -> Value {
    let mut policy = base_policy();
    policy["modes"]["NORMAL"]["allowed_tools"]
        .as_array_mut()
        .expect("allowed_tools")
        .push(json!("restart_service"));
    policy["modes"]["NORMAL"]["blocked_tools"] = json!(["scale_fleet", "delete_database"]);
    policy
}

fn hash(policy: &Value) -> String {
    canonical_digest(policy)
}

/// Replaces the file's content in one step (write beside it, rename over it), so
/// a reader never sees it half-written.
fn install(path: &Path, policy: &Value) {
    let next = path.with_extension("next");
    std::fs::write(
        &next,
        serde_json::to_string_pretty(policy).expect("serializable"),
    )
    .expect("write the policy");
    std::fs::rename(&next, path).expect("rename the policy into place");
}

/// A server started from `policy` written to a file it may reload.
async fn reloadable_server(dir: &Path, policy: &Value) -> (TestServer, PathBuf) {
    let path = dir.join("policy.json");
    install(&path, policy);
    let server = TestServer::start_with_policy(&path).await;
    assert!(
        server
            .gateway()
            .set_policy_source(PolicySource::File(path.clone()))
    );
    (server, path)
}

async fn reload(server: &TestServer) -> (StatusCode, Value) {
    server
        .api()
        .post("/policy/reload", Some(OPERATOR_TOKEN), json!({}))
        .await
}

async fn policy_hash(server: &TestServer) -> String {
    let (status, body) = server.api().get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["policy_hash"].as_str().expect("hash").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_reloads_while_calls_run_each_call_decided_under_the_policy_it_records() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (denying, allowing) = (base_policy(), restart_allowed_policy());
    let (server, path) = reloadable_server(dir.path(), &denying).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..3 {
        let api = server.api();
        let stop = stop.clone();
        callers.push(tokio::spawn(async move {
            let mut answered = 0_u32;
            while !stop.load(Ordering::SeqCst) {
                let (status, body) = api
                    .execute("restart_service", json!({"service_name": "web-server"}))
                    .await;
                assert!(
                    status == StatusCode::OK || status == StatusCode::FORBIDDEN,
                    "{status} {body}"
                );
                answered += 1;
            }
            answered
        }));
    }
    for round in 0..50 {
        let next = if round % 2 == 0 { &allowing } else { &denying };
        install(&path, next);
        let (status, body) = reload(&server).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["policy_hash"], json!(hash(next)), "{body}");
        assert_eq!(body["changed"], json!(true));
    }
    stop.store(true, Ordering::SeqCst);
    let mut answered = 0;
    for caller in callers {
        answered += caller.await.expect("caller task");
    }
    assert!(answered > 0);

    // The whole trail, not only the newest thousand records.
    let records = proxi::audit::read_recent(
        &server.data_dir().join(proxi::audit::AUDIT_DB_FILE),
        u32::MAX,
    )
    .expect("the trail is readable");
    let (allow_hash, deny_hash) = (hash(&allowing), hash(&denying));
    let calls: Vec<_> = records.iter().filter(|r| r.kind == "tool_call").collect();
    assert!(!calls.is_empty());
    let mut seen = (0, 0);
    for call in &calls {
        let recorded = call
            .policy_hash
            .as_deref()
            .expect("a decision names its policy");
        match call.decision.as_str() {
            "allowed" => {
                assert_eq!(recorded, allow_hash, "seq {}", call.seq);
                seen.0 += 1;
            }
            "denied" => {
                assert_eq!(recorded, deny_hash, "seq {}", call.seq);
                assert_eq!(call.reason_code.as_deref(), Some("blocked_in_mode"));
                seen.1 += 1;
            }
            other => panic!("unexpected decision {other} at seq {}", call.seq),
        }
    }
    // Between two reload records, every call was decided under the policy the
    // first of them installed.
    let mut in_force = deny_hash.clone();
    for record in &records {
        match record.kind.as_str() {
            "policy_reload" => {
                assert_eq!(record.outcome, "reloaded");
                assert_eq!(record.detail["previous_policy_hash"], json!(in_force));
                in_force = record.detail["policy_hash"]
                    .as_str()
                    .expect("hash")
                    .to_owned();
                assert_eq!(record.policy_hash.as_deref(), Some(in_force.as_str()));
            }
            "tool_call" => assert_eq!(record.policy_hash.as_deref(), Some(in_force.as_str())),
            _ => {}
        }
    }
    let reloads = records.iter().filter(|r| r.kind == "policy_reload").count();
    assert_eq!(reloads, 50);
    assert!(seen.0 > 0 || seen.1 > 0, "{seen:?}");
}

#[tokio::test]
async fn a_refused_reload_keeps_the_old_policy_and_is_recorded_with_its_problems() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, path) = reloadable_server(dir.path(), &base_policy()).await;
    let before = policy_hash(&server).await;

    let mut broken = restart_allowed_policy();
    broken["modes"]["NORMAL"]["allowed_tools"]
        .as_array_mut()
        .expect("allowed_tools")
        .push(json!("no_such_builtin"));
    broken["unknown_key"] = json!(1);
    install(&path, &broken);
    let (status, body) = reload(&server).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let problems = body["problems"].as_array().expect("problems listed");
    assert!(!problems.is_empty(), "{body}");
    let text = body.to_string();
    assert!(
        !text.contains(dir.path().to_str().expect("utf-8")),
        "no path: {text}"
    );

    // Not JSON at all.
    std::fs::write(&path, "{ not json").expect("write");
    let (status, body) = reload(&server).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("not a valid policy document")
    );

    assert_eq!(policy_hash(&server).await, before);
    let (status, body) = server
        .api()
        .execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "still the old policy: {body}"
    );

    let refused: Vec<_> = audit_records(server.data_dir())
        .into_iter()
        .filter(|r| r.kind == "policy_reload")
        .collect();
    assert_eq!(refused.len(), 2);
    for record in &refused {
        assert_eq!(
            (record.decision.as_str(), record.outcome.as_str()),
            ("denied", "refused")
        );
        assert_eq!(record.reason_code.as_deref(), Some("policy_refused"));
        assert_eq!(record.detail["policy_hash"], json!(before));
        assert!(
            !record.detail["problems"]
                .as_array()
                .expect("problems")
                .is_empty()
        );
    }
}

#[tokio::test]
async fn a_reload_that_drops_the_mode_in_force_returns_to_the_default_mode() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, path) = reloadable_server(dir.path(), &base_policy()).await;
    server.api().emergency().await;

    let mut renamed = base_policy();
    let emergency = renamed["modes"]["EMERGENCY"].take();
    let modes = renamed["modes"].as_object_mut().expect("modes");
    modes.remove("EMERGENCY");
    modes.insert("INCIDENT".to_owned(), emergency);
    install(&path, &renamed);
    let (status, body) = reload(&server).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["mode_fallback"],
        json!({"from": "EMERGENCY", "to": "NORMAL"})
    );
    assert_eq!(body["mode"], json!("NORMAL"));
    let (_, status) = server.api().get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(status["mode"], json!("NORMAL"));
    assert_eq!(status["emergency_expires_at"], Value::Null);
    assert_eq!(status["available_modes"], json!(["INCIDENT", "NORMAL"]));
    let (status, _) = server
        .api()
        .execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let records = audit_records(server.data_dir());
    let tail: Vec<_> = records
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|r| (r.kind.as_str(), r.outcome.as_str(), r.mode.as_str()))
        .collect();
    assert_eq!(
        tail,
        [
            ("policy_reload", "reloaded", "NORMAL"),
            ("mode_expired", "policy_reloaded", "NORMAL"),
            ("tool_call", "denied", "NORMAL"),
        ]
    );

    // A mode the new policy keeps stays in force, with its deadline.
    let (status, body) = server
        .api()
        .set_mode("INCIDENT", Some("again"), Some(600))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut kept = renamed.clone();
    kept["description"] = json!("same modes, new text");
    install(&path, &kept);
    let (status, body) = reload(&server).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["mode"], json!("INCIDENT"));
    assert_eq!(body["mode_fallback"], Value::Null);
    let (_, status) = server.api().get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(status["mode"], json!("INCIDENT"));
    assert!(status["emergency_expires_at"].is_string(), "{status}");
}

#[tokio::test]
async fn reload_needs_the_operator_and_a_policy_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, _path) = reloadable_server(dir.path(), &base_policy()).await;
    let (status, _) = server
        .api()
        .post("/policy/reload", Some(AGENT_TOKEN), json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = server.api().post("/policy/reload", None, json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A server started without a file (the built-in default) has nothing to reload.
    let builtin = TestServer::start().await;
    let (status, body) = builtin
        .api()
        .post("/policy/reload", Some(OPERATOR_TOKEN), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].as_str().expect("error").contains("--policy"));
}

/// server-everything over stdio as a policy's upstream declaration; `env` is its
/// extra environment (a change of it restarts the upstream).
fn everything_declaration(required: bool, env: Value) -> Value {
    let entry = common::upstream::harness()
        .join("node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    assert!(
        entry.is_file(),
        "{} is missing: run scripts/upstream-harness.sh",
        entry.display()
    );
    json!({
        "command": "node",
        "args": [entry.display().to_string(), "stdio"],
        "env": env,
        "required": required,
    })
}

/// The base policy with `upstreams`, the built-ins kept and `ev__echo` allowed in NORMAL.
fn policy_with_upstreams(upstreams: Value) -> Value {
    let mut policy = base_policy();
    policy["simulated_cloud"] = json!(true);
    policy["upstreams"] = upstreams;
    policy["modes"]["NORMAL"]["allowed_tools"]
        .as_array_mut()
        .expect("allowed_tools")
        .push(json!("ev__echo"));
    policy
}

/// `server`'s gateway with its upstreams attached, as `proxi serve` does it; `${VAR}`s
/// resolve to nothing.
async fn attach(server: &TestServer) -> proxi::upstream::attach::AttachedUpstreams {
    proxi::upstream::attach::AttachedUpstreams::start(&server.gateway(), Arc::new(|_| None))
        .await
        .expect("upstreams start")
}

async fn echo(server: &TestServer, message: &str) -> (StatusCode, Value) {
    server
        .api()
        .execute("ev__echo", json!({"message": message}))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_restarts_and_removes_upstreams_and_their_tools() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut base = base_policy();
    base["simulated_cloud"] = json!(true);
    let (server, path) = reloadable_server(dir.path(), &base).await;
    let upstreams = attach(&server).await;
    let mut tools_changed = server.gateway().tools_changed();
    tools_changed.borrow_and_update();
    let (status, body) = echo(&server, "before").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason_code"], json!("unknown_tool"), "{body}");

    // Added: started before the reload answers (required), its tool callable at once.
    let added = policy_with_upstreams(json!({"ev": everything_declaration(true, json!({}))}));
    install(&path, &added);
    let (status, body) = reload(&server).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["upstreams"],
        json!({"added": ["ev"], "removed": [], "restarted": []})
    );
    assert!(tools_changed.has_changed().expect("gateway alive"));
    let (status, body) = echo(&server, "added").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.to_string().contains("added"), "{body}");
    let first_pid = upstreams.set().status()[0].pid.expect("ev runs");

    // Changed (its env): restarted, a new process, the old one stopped.
    let changed = policy_with_upstreams(
        json!({"ev": everything_declaration(true, json!({"PROXI_TEST": "restart"}))}),
    );
    install(&path, &changed);
    let (status, body) = reload(&server).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["upstreams"],
        json!({"added": [], "removed": [], "restarted": ["ev"]})
    );
    let second_pid = upstreams.set().status()[0].pid.expect("ev runs again");
    assert_ne!(first_pid, second_pid);
    assert!(!common::upstream::process_exists(first_pid));
    let (status, body) = echo(&server, "restarted").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Removed: stopped, and its tool unknown again.
    install(&path, &base);
    let (status, body) = reload(&server).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["upstreams"],
        json!({"added": [], "removed": ["ev"], "restarted": []})
    );
    assert!(upstreams.set().status().is_empty());
    assert!(!common::upstream::process_exists(second_pid));
    let (status, body) = echo(&server, "removed").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason_code"], json!("unknown_tool"), "{body}");
    let listed: Vec<String> = server
        .gateway()
        .catalog()
        .into_iter()
        .map(|entry| entry.name)
        .collect();
    assert!(
        !listed.iter().any(|name| name.starts_with("ev__")),
        "{listed:?}"
    );

    let reloads: Vec<Value> = audit_records(server.data_dir())
        .into_iter()
        .filter(|r| r.kind == "policy_reload")
        .map(|r| r.detail["upstreams"].clone())
        .collect();
    assert_eq!(
        reloads,
        [
            json!({"added": ["ev"], "removed": [], "restarted": []}),
            json!({"added": [], "removed": [], "restarted": ["ev"]}),
            json!({"added": [], "removed": ["ev"], "restarted": []}),
        ]
    );
    upstreams.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_new_upstream_cannot_start_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let running = policy_with_upstreams(json!({"ev": everything_declaration(true, json!({}))}));
    let (server, path) = reloadable_server(dir.path(), &running).await;
    let upstreams = attach(&server).await;
    let before = policy_hash(&server).await;
    let pid = upstreams.set().status()[0].pid.expect("ev runs");
    let (status, body) = echo(&server, "running").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A required upstream that is not an MCP server.
    let mut broken = running.clone();
    broken["upstreams"]["broken"] = json!({"command": "true", "required": true});
    broken["description"] = json!("adds a broken upstream");
    install(&path, &broken);
    let (status, body) = reload(&server).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let problem = body["problems"][0].as_str().expect("problem").to_owned();
    assert!(problem.contains("broken"), "{problem}");
    assert!(
        !body.to_string().contains("node_modules"),
        "no command line or path: {body}"
    );

    // A ${VAR} that is not set: named, and nothing is started.
    let mut missing = running.clone();
    missing["upstreams"]["ev"]["env"] = json!({"TOKEN": "${PROXI_TEST_UNSET_SECRET}"});
    install(&path, &missing);
    let (status, body) = reload(&server).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let problem = body["problems"][0].as_str().expect("problem").to_owned();
    assert!(problem.contains("PROXI_TEST_UNSET_SECRET"), "{problem}");

    // The old policy and upstreams stay in force.
    assert_eq!(policy_hash(&server).await, before);
    let status_now = upstreams.set().status();
    assert_eq!(status_now.len(), 1);
    assert_eq!(status_now[0].pid, Some(pid));
    let (status, body) = echo(&server, "still").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let refused: Vec<_> = audit_records(server.data_dir())
        .into_iter()
        .filter(|r| r.kind == "policy_reload")
        .collect();
    assert_eq!(refused.len(), 2);
    for record in &refused {
        assert_eq!(
            (record.decision.as_str(), record.outcome.as_str()),
            ("denied", "refused")
        );
        assert_eq!(record.detail["policy_hash"], json!(before));
    }
    assert!(
        refused[0].detail["problems"][0]
            .as_str()
            .expect("problem")
            .contains("broken")
    );
    upstreams.shutdown().await;
}

#[tokio::test]
async fn a_reload_that_changes_the_upstreams_without_upstreams_attached_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, path) = reloadable_server(dir.path(), &base_policy()).await;
    let mut with_upstream = base_policy();
    with_upstream["simulated_cloud"] = json!(true);
    with_upstream["upstreams"] = json!({"files": {"command": "true"}});
    install(&path, &with_upstream);
    let (status, body) = reload(&server).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["problems"][0]
            .as_str()
            .expect("problem")
            .contains("upstreams")
    );
}

/// The newest accepted reload's record in the data dir, once there is one whose
/// policy hash is `expected`.
fn wait_for_reload_to(data_dir: &Path, expected: &str) -> proxi::audit::AuditRecord {
    wait_until("the reload record", Duration::from_secs(20), || {
        audit_records(data_dir).into_iter().rev().find(|r| {
            r.kind == "policy_reload"
                && r.outcome == "reloaded"
                && r.detail["policy_hash"] == json!(expected)
        })
    })
}

#[test]
fn sighup_reloads_the_policy_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("policy.json");
    install(&path, &base_policy());
    let data_dir = dir.path().join("data");
    let server = ServerProcess::start_with_policy(&data_dir, &path, &[]);
    let next = restart_allowed_policy();
    install(&path, &next);
    let sent = Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    let reload = wait_for_reload_to(&data_dir, &hash(&next));
    assert_eq!(
        reload.detail["previous_policy_hash"],
        json!(hash(&base_policy()))
    );
    assert_eq!(reload.detail["trigger"], json!("sighup"));
    assert_eq!(reload.principal, "system");
}

#[test]
fn serve_watch_reloads_when_the_file_changes_and_the_cli_reloads_on_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("policy.json");
    install(&path, &base_policy());
    let data_dir = dir.path().join("data");
    let server = ServerProcess::start_with_policy(&data_dir, &path, &["--watch"]);
    let next = restart_allowed_policy();
    install(&path, &next);
    let watched = wait_for_reload_to(&data_dir, &hash(&next));
    assert_eq!(watched.detail["trigger"], json!("watch"));

    // `proxi policy reload` asks the same server (found through server.json).
    let mut again = next.clone();
    again["description"] = json!("reloaded by the CLI");
    install(&path, &again);
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["policy", "reload", "--data-dir"])
        .arg(&data_dir)
        .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env_remove("PROXI_SERVER")
        .output()
        .expect("proxi runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&hash(&again)), "{stdout}");

    // A broken file: the CLI exits 1 and lists the problem.
    std::fs::write(&path, "{\"modes\": {}, \"bogus\": 1}").expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["policy", "reload", "--server", &server.url])
        .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .output()
        .expect("proxi runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bogus"), "{stderr}");
    let refused = wait_until("the refused reload", Duration::from_secs(20), || {
        audit_records(&data_dir)
            .into_iter()
            .find(|r| r.kind == "policy_reload" && r.outcome == "refused")
    });
    assert_eq!(refused.detail["policy_hash"], json!(hash(&again)));
    drop(server);
}

/// The base policy with the fixture upstream as `fx` (its calls logged in
/// `call_log`), `fx__slow` and `fx__hang` allowed in NORMAL, and a short drain.
fn policy_with_fixture(call_log: &Path, drain_timeout_seconds: u64) -> Value {
    let mut policy = base_policy();
    policy["simulated_cloud"] = json!(true);
    policy["drain_timeout_seconds"] = json!(drain_timeout_seconds);
    policy["upstreams"] = json!({
        "fx": {
            "command": common::upstream::python().display().to_string(),
            "args": [common::upstream::fixture_script().display().to_string()],
            "env": {"FIXTURE_CALL_LOG": call_log.display().to_string()},
            "required": true,
            "call_timeout_seconds": 120,
        }
    });
    let allowed = policy["modes"]["NORMAL"]["allowed_tools"]
        .as_array_mut()
        .expect("allowed_tools");
    allowed.push(json!("fx__slow"));
    allowed.push(json!("fx__hang"));
    policy
}

/// The intent record of the one call to `tool`, and the outcome record that
/// refers to it by seq; fails unless there is exactly one of each.
fn intent_and_outcome(
    records: &[proxi::audit::AuditRecord],
    tool: &str,
) -> (proxi::audit::AuditRecord, proxi::audit::AuditRecord) {
    let calls: Vec<_> = records
        .iter()
        .filter(|r| r.kind == "tool_call" && r.tool.as_deref() == Some(tool))
        .filter(|r| r.decision == "allowed")
        .collect();
    assert_eq!(
        calls.len(),
        2,
        "one intent and one outcome for {tool}: {calls:?}"
    );
    let (intent, outcome) = (calls[0].clone(), calls[1].clone());
    assert_eq!(
        (intent.decision.as_str(), intent.outcome.as_str()),
        ("allowed", "pending"),
        "{intent:?}"
    );
    assert_eq!(
        outcome.detail["intent_seq"],
        json!(intent.seq),
        "{outcome:?}"
    );
    (intent, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_that_removes_an_upstream_ends_its_calls_in_flight_recorded_and_leaves_no_process()
{
    let dir = tempfile::tempdir().expect("temp dir");
    let call_log = dir.path().join("calls.jsonl");
    let mut base = base_policy();
    base["simulated_cloud"] = json!(true);
    // The drain is the new policy's: the file the reload installs sets it.
    base["drain_timeout_seconds"] = json!(3);
    let (server, path) = reloadable_server(dir.path(), &policy_with_fixture(&call_log, 3)).await;
    let upstreams = attach(&server).await;
    let pid = upstreams.set().status()[0].pid.expect("fx runs");

    // Two calls in flight: one that ends within the drain, one that never ends.
    let api = server.api();
    let slow = tokio::spawn({
        let api = api.clone();
        async move { api.execute("fx__slow", json!({"ms": 1000})).await }
    });
    let hung = tokio::spawn({
        let api = api.clone();
        async move { api.execute("fx__hang", json!({})).await }
    });
    common::upstream::wait_for_fixture_call(&call_log, "slow", "call").await;
    common::upstream::wait_for_fixture_call(&call_log, "hang", "call").await;

    install(&path, &base);
    let (status, body) = reload(&server).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["upstreams"],
        json!({"added": [], "removed": ["fx"], "restarted": []})
    );
    // The reload answered after both calls ended: the slow one ran to its end
    // within the drain, the hung one was cancelled at the drain timeout.
    assert!(server.gateway().in_flight_intents().is_empty());
    let (status, body) = slow.await.expect("slow call task");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true, "{body}");
    let (status, body) = hung.await.expect("hung call task");
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["reason_code"], "cancelled", "{body}");

    // No orphan: the fixture and its whole process group are gone.
    assert!(upstreams.set().status().is_empty());
    assert!(!common::upstream::process_exists(pid));
    assert!(
        common::upstream::processes_in_group(pid)
            .into_iter()
            .all(|member| !common::upstream::process_exists(member)),
        "a process of the removed upstream's group survived"
    );

    // The tool is gone, and saying so is recorded too.
    let (status, body) = api.execute("fx__hang", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason_code"], "unknown_tool", "{body}");

    // Nothing lost: each call has its intent and its outcome, which refers to it;
    // both outcomes follow the reload's record (the drain came after it), and the
    // refused call is the last record.
    let mut records = audit_records(server.data_dir());
    records.sort_by_key(|record| record.seq);
    let reload_seq = records
        .iter()
        .find(|r| r.kind == "policy_reload")
        .expect("the reload's record")
        .seq;
    let (slow_intent, slow_outcome) = intent_and_outcome(&records, "fx__slow");
    let (hang_intent, hang_outcome) = intent_and_outcome(&records, "fx__hang");
    assert_eq!(slow_outcome.outcome, "executed", "{slow_outcome:?}");
    assert_eq!(hang_outcome.outcome, "cancelled", "{hang_outcome:?}");
    assert!(slow_intent.seq < reload_seq && hang_intent.seq < reload_seq);
    assert!(hang_outcome.seq > reload_seq, "{hang_outcome:?}");
    let last = records.last().expect("records");
    assert_eq!(last.tool.as_deref(), Some("fx__hang"));
    assert_eq!(last.outcome, "unknown_tool", "{last:?}");
    assert!(
        proxi::audit_view::unresolved_intents(&records).is_empty(),
        "an intent without an outcome"
    );
    upstreams.shutdown().await;
}

/// Before, `proxi mcp` never learnt its policy file: an operator's reload was
/// refused as if the policy were the built-in one. Reloads there come only from
/// the operator's token; the agent's token (which it holds) is refused.
#[tokio::test]
async fn an_operator_reloads_the_policy_of_proxi_mcp_and_the_agent_cannot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("policy.json");
    install(&path, &base_policy());
    let credential = dir.path().join("operator.json");
    let init = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["credential", "init"])
        .arg(&credential)
        .output()
        .expect("proxi credential init runs");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(&credential).expect("credential")).unwrap();
    let operator = file["operator_token"].as_str().expect("token").to_owned();
    let data = dir.path().join("data");
    let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["mcp", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .arg("--policy")
        .arg(&path)
        .arg("--operator-credential")
        .arg(&credential)
        .env_remove("PROXI_OPERATOR_TOKEN")
        .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("proxi mcp starts");
    let pid = child.id();
    let url = wait_until("server.json", Duration::from_secs(30), || {
        proxi::server::ServerInfo::read(&data)
            .filter(|info| info.pid == pid)
            .map(|info| info.url)
    });
    let api = common::Api::new(&url);
    let next = restart_allowed_policy();
    install(&path, &next);

    let (status, body) = api
        .post("/policy/reload", Some(AGENT_TOKEN), json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = api.post("/policy/reload", Some(&operator), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["policy_hash"], json!(hash(&next)), "{body}");
    let (_, status) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(status["policy_hash"], json!(hash(&next)), "{status}");
    let record = wait_for_reload_to(&data, &hash(&next));
    assert_eq!(
        record.detail["previous_policy_hash"],
        json!(hash(&base_policy()))
    );

    let _ = child.kill();
    let _ = child.wait();
    // This process's user (the agent's, under proxi mcp) can write the file: said at start.
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).expect("log");
    assert!(log.contains("is writable by this process's user"), "{log}");
}
