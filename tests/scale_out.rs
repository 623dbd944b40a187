//! Several `proxi serve` instances on one PostgreSQL store (issue 15), with a real
//! PostgreSQL cluster per test (see tests/common/postgres.rs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::postgres::PostgresServer;
use common::{
    AGENT_TOKEN, Api, OPERATOR_TOKEN, ServerProcess, high_rate_limit_policy_path, wait_until,
    write_credential,
};
use proxi::audit::{AuditRecord, AuditStore, PostgresStore};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// One instance on the shared store, with its own data dir (tokens, lock file).
fn instance(data_dir: &Path, store: &str, credential: &Path) -> ServerProcess {
    instance_with_policy(data_dir, store, credential, &high_rate_limit_policy_path())
}

/// [`instance`] under the policy at `policy`.
fn instance_with_policy(
    data_dir: &Path,
    store: &str,
    credential: &Path,
    policy: &Path,
) -> ServerProcess {
    ServerProcess::start_with_policy(
        data_dir,
        policy,
        &[
            "--store",
            store,
            "--operator-credential",
            credential.to_str().expect("a UTF-8 path"),
        ],
    )
}

/// `proxi audit verify --store URL`: success and what it printed.
fn verify_store(store: &str, credential: &Path, data_dir: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["audit", "verify", "--store", store, "--data-dir"])
        .arg(data_dir)
        .arg("--operator-credential")
        .arg(credential)
        .output()
        .expect("proxi runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

fn chain(store: &str) -> Vec<AuditRecord> {
    let store = PostgresStore::connect(store).expect("the store is reachable");
    let mut records = Vec::new();
    store
        .for_each_record(&mut |record| records.push(record))
        .expect("the chain is readable");
    records
}

/// Calls a read-only tool in a loop until `stop`, or until the instance is gone;
/// pushes the `audit_seq` of every acknowledged call.
fn agent(
    api: Api,
    stop: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<Vec<u64>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let request = api
                .http
                .post(format!("{}/tools/execute", api.url))
                .bearer_auth(AGENT_TOKEN)
                .json(&json!({"tool_name": "list_services", "arguments": {}}))
                .send()
                .await;
            // Once the instance dies, requests fail: that is the end of this agent.
            let Ok(response) = request else { break };
            if response.status() != StatusCode::OK {
                continue;
            }
            let Ok(body) = response.json::<Value>().await else {
                break;
            };
            let seq = body["audit_seq"]
                .as_u64()
                .expect("acknowledged calls carry audit_seq");
            acknowledged.lock().expect("not poisoned").push(seq);
        }
    })
}

async fn wait_for_count(what: &'static str, counter: &Arc<Mutex<Vec<u64>>>, at_least: usize) {
    let counter = Arc::clone(counter);
    tokio::task::spawn_blocking(move || {
        wait_until(what, Duration::from_secs(60), || {
            (counter.lock().expect("not poisoned").len() >= at_least).then_some(())
        })
    })
    .await
    .expect("the wait finished");
}

struct Cluster {
    postgres: PostgresServer,
    credential: PathBuf,
    dirs: Vec<tempfile::TempDir>,
    _credential_dir: tempfile::TempDir,
}

fn cluster(instances: usize) -> Cluster {
    let postgres = PostgresServer::start();
    let credential_dir = tempfile::tempdir().expect("temp dir");
    let credential = write_credential(credential_dir.path(), OPERATOR_TOKEN, 42);
    Cluster {
        postgres,
        credential,
        dirs: (0..instances)
            .map(|_| tempfile::tempdir().expect("temp dir"))
            .collect(),
        _credential_dir: credential_dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_one_instance_under_load_keeps_every_acknowledged_call_in_one_chain() {
    let cluster = cluster(3);
    let url = cluster.postgres.url();
    let servers: Vec<ServerProcess> = cluster
        .dirs
        .iter()
        .map(|dir| instance(dir.path(), &url, &cluster.credential))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged: Vec<Arc<Mutex<Vec<u64>>>> =
        (0..3).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
    let mut agents = Vec::new();
    for (server, acknowledged) in servers.iter().zip(&acknowledged) {
        for _ in 0..3 {
            agents.push(agent(
                Api::new(&server.url),
                Arc::clone(&stop),
                Arc::clone(acknowledged),
            ));
        }
    }
    for counter in &acknowledged {
        wait_for_count("calls acknowledged by every instance", counter, 100).await;
    }
    let mut servers = servers.into_iter();
    let (a, b, c) = (
        servers.next().expect("A"),
        servers.next().expect("B"),
        servers.next().expect("C"),
    );
    b.kill();
    // A and C carry on after B's crash.
    let after_crash: Vec<usize> = [0, 2]
        .iter()
        .map(|&index| acknowledged[index].lock().expect("not poisoned").len())
        .collect();
    wait_for_count("A to carry on", &acknowledged[0], after_crash[0] + 100).await;
    wait_for_count("C to carry on", &acknowledged[2], after_crash[1] + 100).await;
    stop.store(true, Ordering::Relaxed);
    for agent in agents {
        agent.await.expect("the agent finished cleanly");
    }

    let (ok, output) = verify_store(&url, &cluster.credential, cluster.dirs[0].path());
    assert!(ok, "audit verify --store after the crash: {output}");
    assert!(output.contains("audit trail OK"), "{output}");
    let stored = chain(&url);
    let mut all: Vec<u64> = acknowledged
        .iter()
        .flat_map(|counter| counter.lock().expect("not poisoned").clone())
        .collect();
    let total = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), total, "two acknowledged calls share a seq");
    for seq in &all {
        let record = stored
            .iter()
            .find(|record| record.seq == *seq)
            .unwrap_or_else(|| panic!("acknowledged call {seq} is missing from the chain"));
        assert_eq!(record.kind, "tool_call");
        assert_eq!(record.tool.as_deref(), Some("list_services"));
    }
    drop((a, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_down_calls_get_503_and_service_resumes_without_a_restart() {
    let cluster = cluster(1);
    let url = cluster.postgres.url();
    let server = instance(cluster.dirs[0].path(), &url, &cluster.credential);
    let api = Api::new(&server.url);
    let (status, body) = api.execute("list_services", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    cluster.postgres.stop();
    let (status, body) = api.execute("list_services", json!({})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (status, body) = api.set_mode("EMERGENCY", Some("incident"), Some(60)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (status, body) = api.execute("list_services", json!({})).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "nothing runs: {body}"
    );

    cluster.postgres.start_again();
    let url_for_wait = server.url.clone();
    let seq = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let api = Api::new(&url_for_wait);
        wait_until("service to resume", Duration::from_secs(30), || {
            let (status, body) = runtime.block_on(api.execute("list_services", json!({})));
            (status == StatusCode::OK).then(|| body["audit_seq"].as_u64())
        })
    })
    .await
    .expect("the wait finished")
    .expect("an acknowledged call carries audit_seq");
    assert!(seq >= 2, "the chain continues after the outage");
    api.emergency().await;

    let (ok, output) = verify_store(&url, &cluster.credential, cluster.dirs[0].path());
    assert!(ok, "audit verify --store after the outage: {output}");
    let stored = chain(&url);
    let mode_changes = stored
        .iter()
        .filter(|record| record.kind == "mode_change")
        .count();
    assert_eq!(mode_changes, 1, "the refused mode change left no record");
    assert_eq!(
        stored.last().map(|record| record.kind.as_str()),
        Some("mode_change")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mode_change_is_in_the_shared_mode_row_before_set_mode_returns() {
    let cluster = cluster(2);
    let url = cluster.postgres.url();
    let a = instance(cluster.dirs[0].path(), &url, &cluster.credential);
    let b = instance(cluster.dirs[1].path(), &url, &cluster.credential);
    let store = Arc::new(PostgresStore::connect(&url).expect("the store is reachable"));
    let shared = |store: Arc<PostgresStore>| async move {
        tokio::task::spawn_blocking(move || store.shared_mode().expect("the row is readable"))
            .await
            .expect("the read finished")
    };
    assert_eq!(shared(Arc::clone(&store)).await, None, "no mode record yet");

    Api::new(&a.url).emergency().await;
    let row = shared(Arc::clone(&store)).await.expect("the row exists");
    assert_eq!((row.mode.as_str(), row.epoch), ("EMERGENCY", 1));
    assert!(row.expires_at.is_some(), "the lapse time is shared too");
    let records = chain(&url);
    let change = records.last().expect("a record");
    assert_eq!((change.kind.as_str(), change.seq), ("mode_change", row.seq));

    // A change through another instance lands in the same row, one epoch on.
    Api::new(&b.url).normal().await;
    let row = shared(store).await.expect("the row exists");
    assert_eq!(
        (row.mode.as_str(), row.epoch, row.expires_at),
        ("NORMAL", 2, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_noticed_by_two_instances_is_recorded_once() {
    let cluster = cluster(2);
    let url = cluster.postgres.url();
    let a = instance(cluster.dirs[0].path(), &url, &cluster.credential);
    let (status, body) = Api::new(&a.url)
        .set_mode("EMERGENCY", Some("incident"), Some(4))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // B starts during the emergency and restores it from the shared chain: both
    // instances now hold the same elevated mode and lapse time.
    let b = instance(cluster.dirs[1].path(), &url, &cluster.credential);
    let mode_of = |server: &ServerProcess| {
        let api = Api::new(&server.url);
        async move {
            let (status, body) = api.get("/policy/status", Some(OPERATOR_TOKEN)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["mode"].as_str().expect("a mode").to_owned()
        }
    };
    assert_eq!(mode_of(&b).await, "EMERGENCY", "B restored the emergency");
    let urls = [a.url.clone(), b.url.clone()];
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        wait_until("both instances to lapse", Duration::from_secs(30), || {
            urls.iter()
                .all(|url| {
                    let (_, body) =
                        runtime.block_on(Api::new(url).get("/policy/status", Some(OPERATOR_TOKEN)));
                    body["mode"] == "NORMAL"
                })
                .then_some(())
        })
    })
    .await
    .expect("the wait finished");
    let expiries: Vec<AuditRecord> = chain(&url)
        .into_iter()
        .filter(|record| record.kind == "mode_expired")
        .collect();
    assert_eq!(expiries.len(), 1, "{expiries:#?}");
    let (ok, output) = verify_store(&url, &cluster.credential, cluster.dirs[0].path());
    assert!(ok, "{output}");
}

/// A decision entry as the gateway queues it (an allowed call's write-ahead intent).
fn intent(tool: &str, mode: &str) -> proxi::audit::AuditEntry {
    proxi::audit::AuditEntry {
        time: chrono::Utc::now(),
        principal: proxi::principal::Principal::agent(),
        kind: proxi::audit::EntryKind::ToolCall,
        tool: Some(tool.to_owned()),
        arguments: Some(json!({"service_name": "web-server"})),
        mode: Arc::from(mode),
        decision: proxi::audit::AuditDecision::Allowed,
        reason_code: None,
        outcome: "pending",
        detail: json!({}),
        expires_at: None,
        context: None,
        policy_hash: None,
    }
}

fn mode_change(mode: &str) -> proxi::audit::AuditEntry {
    proxi::audit::AuditEntry {
        kind: proxi::audit::EntryKind::ModeChange,
        principal: proxi::principal::Principal::operator(),
        tool: None,
        arguments: None,
        outcome: "changed",
        ..intent("", mode)
    }
}

#[test]
fn a_decision_taken_under_a_stale_epoch_is_recorded_as_refused_in_its_transaction() {
    let postgres = PostgresServer::start();
    let store = PostgresStore::connect(&postgres.url()).expect("the store is reachable");
    let key = proxi::anchor::AuditKey::from_bytes([9; 32]);
    // Epoch 0 → 1: a decision taken under 0 and queued behind the change is stale,
    // one that carries the change's epoch is not, and an unchecked entry passes.
    let (emergency, stale, current, unchecked) = (
        mode_change("EMERGENCY"),
        intent("restart_service", "NORMAL"),
        intent("restart_service", "EMERGENCY"),
        intent("list_services", "NORMAL"),
    );
    let appended = store
        .append_decided(
            &[&emergency, &stale, &current, &unchecked],
            &[None, Some(0), Some(1), None],
            &key,
        )
        .expect("the batch commits");
    assert_eq!(appended.stale, vec![1]);
    assert_eq!(appended.seqs, vec![1, 2, 3, 4]);
    // Another instance's batch: its decision under epoch 1 is current until a
    // change commits ahead of it in the chain.
    let normal = mode_change("NORMAL");
    let late = intent("restart_service", "EMERGENCY");
    let appended = store
        .append_decided(&[&normal, &late], &[None, Some(1)], &key)
        .expect("the batch commits");
    assert_eq!(appended.stale, vec![1]);
    let records = chain(&postgres.url());
    let summary: Vec<(&str, &str, Option<&str>, &str)> = records
        .iter()
        .map(|r| {
            (
                r.mode.as_str(),
                r.decision.as_str(),
                r.reason_code.as_deref(),
                r.outcome.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("EMERGENCY", "allowed", None, "changed"),
            ("EMERGENCY", "denied", Some("mode_changed"), "mode_changed"),
            ("EMERGENCY", "allowed", None, "pending"),
            ("NORMAL", "allowed", None, "pending"),
            ("NORMAL", "allowed", None, "changed"),
            ("NORMAL", "denied", Some("mode_changed"), "mode_changed"),
        ]
    );
    assert_eq!(records[5].detail["decided_epoch"], 1);
    assert_eq!(records[5].detail["epoch"], 2);
    let row = store.shared_mode().expect("readable").expect("a row");
    assert_eq!((row.mode.as_str(), row.epoch), ("NORMAL", 2));
    assert!(store.verify(None).expect("verifies").first_bad.is_none());
}

/// The mode `/policy/status` reports on `url`.
async fn mode_on(url: &str) -> String {
    let (status, body) = Api::new(url)
        .get("/policy/status", Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["mode"].as_str().expect("a mode").to_owned()
}

async fn wait_for_mode(url: &str, mode: &'static str) {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        wait_until(
            "the instance to adopt the mode",
            Duration::from_secs(10),
            || (runtime.block_on(mode_on(&url)) == mode).then_some(()),
        )
    })
    .await
    .expect("the wait finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_acts_only_under_the_shared_mode_and_adopts_each_change() {
    let cluster = cluster(2);
    let url = cluster.postgres.url();
    let a = instance(cluster.dirs[0].path(), &url, &cluster.credential);
    let b = instance(cluster.dirs[1].path(), &url, &cluster.credential);
    let restart = json!({"service_name": "web-server"});
    let (status, body) = Api::new(&b.url)
        .execute("restart_service", restart.clone())
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "NORMAL denies it: {body}");

    Api::new(&a.url).emergency().await;
    wait_for_mode(&b.url, "EMERGENCY").await;
    let (status, body) = Api::new(&b.url)
        .execute("restart_service", restart.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "B acts under A's emergency: {body}");

    // Right after A's switch back, B has either adopted NORMAL (403) or decides
    // under its stale emergency, which the store refuses (409): it never runs.
    Api::new(&a.url).normal().await;
    let (status, body) = Api::new(&b.url).execute("restart_service", restart).await;
    assert!(
        status == StatusCode::FORBIDDEN
            || (status == StatusCode::CONFLICT && body["reason_code"] == "mode_changed"),
        "{status} {body}"
    );
    wait_for_mode(&b.url, "NORMAL").await;

    let records = chain(&url);
    let last_normal = records
        .iter()
        .rposition(|r| r.kind == "mode_change" && r.mode == "NORMAL")
        .expect("the switch back is recorded");
    let executed: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.tool.as_deref() == Some("restart_service") && r.outcome == "executed")
        .collect();
    assert_eq!(executed.len(), 1, "{executed:#?}");
    let intent_seq = executed[0].detail["intent_seq"]
        .as_u64()
        .expect("an outcome refers to its intent");
    let intent = records
        .iter()
        .find(|r| r.seq == intent_seq)
        .expect("the intent");
    assert_eq!(
        (intent.outcome.as_str(), intent.mode.as_str()),
        ("pending", "EMERGENCY")
    );
    assert!(intent.detail["decided_epoch"].is_u64(), "{intent:?}");
    assert!(
        records[last_normal..]
            .iter()
            .all(|r| !(r.tool.as_deref() == Some("restart_service") && r.outcome == "executed")),
        "nothing ran after the switch to NORMAL"
    );
    let (ok, output) = verify_store(&url, &cluster.credential, cluster.dirs[0].path());
    assert!(ok, "{output}");
}

/// Calls restart_service (active: EMERGENCY only) in a loop until `stop`; counts
/// the answers by status.
fn active_agent(
    api: Api,
    stop: Arc<AtomicBool>,
    statuses: Arc<Mutex<Vec<u16>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let (status, body) = api
                .execute("restart_service", json!({"service_name": "web-server"}))
                .await;
            assert!(
                [StatusCode::OK, StatusCode::FORBIDDEN, StatusCode::CONFLICT].contains(&status),
                "{status} {body}"
            );
            if status == StatusCode::CONFLICT {
                assert_eq!(body["reason_code"], "mode_changed", "{body}");
            }
            statuses.lock().expect("not poisoned").push(status.as_u16());
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_switches_on_a_while_b_and_c_call_active_tools_never_run_one_under_normal() {
    const SWITCHES: usize = 1000;
    let cluster = cluster(3);
    let url = cluster.postgres.url();
    let servers: Vec<ServerProcess> = cluster
        .dirs
        .iter()
        .map(|dir| instance(dir.path(), &url, &cluster.credential))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let agents: Vec<_> = servers[1..]
        .iter()
        .flat_map(|server| [server, server])
        .map(|server| {
            active_agent(
                Api::new(&server.url),
                Arc::clone(&stop),
                Arc::clone(&statuses),
            )
        })
        .collect();
    let a = Api::new(&servers[0].url);
    for switch in 0..SWITCHES {
        let (status, body) = if switch % 2 == 0 {
            a.set_mode("EMERGENCY", Some("thrash"), Some(600)).await
        } else {
            a.set_mode("NORMAL", None, None).await
        };
        assert_eq!(status, StatusCode::OK, "switch {switch}: {body}");
    }
    a.normal().await;
    stop.store(true, Ordering::Relaxed);
    for agent in agents {
        agent.await.expect("the agent finished cleanly");
    }

    // Replay the shared chain in seq order, following its mode records.
    let records = chain(&url);
    let mut mode = "NORMAL".to_owned();
    let mut mode_records_seen = 0usize;
    // intent seq → how many mode records preceded it
    let mut intents = std::collections::HashMap::new();
    let (mut executed, mut refused_stale) = (0, 0);
    for record in &records {
        if record.kind == "mode_change" || record.kind == "mode_expired" {
            mode = record.mode.clone();
            mode_records_seen += 1;
            continue;
        }
        if record.tool.as_deref() != Some("restart_service") {
            continue;
        }
        match (record.decision.as_str(), record.outcome.as_str()) {
            ("allowed", "pending") => {
                assert_eq!(
                    mode, "EMERGENCY",
                    "an intent committed under {mode}: {record:?}"
                );
                assert_eq!(record.mode, "EMERGENCY", "{record:?}");
                intents.insert(record.seq, mode_records_seen);
            }
            ("allowed", outcome) => {
                let intent = record.detail["intent_seq"].as_u64().unwrap_or_else(|| {
                    panic!("an active call ran without a committed intent: {record:?}")
                });
                let before = intents.remove(&intent).unwrap_or_else(|| {
                    panic!("outcome {} of an unknown intent {intent}", record.seq)
                });
                // At most the switch to NORMAL between intent and outcome: that
                // switch waited for the call before the next one was sent.
                assert!(
                    mode_records_seen - before <= 1,
                    "call {intent} outlived the switch that should have drained it: {record:?}"
                );
                assert_eq!(outcome, "executed", "{record:?}");
                executed += 1;
            }
            ("denied", "mode_changed") => refused_stale += 1,
            ("denied", _) => assert_eq!(record.mode, "NORMAL", "{record:?}"),
            other => panic!("unexpected restart_service record {other:?}: {record:?}"),
        }
    }
    assert!(
        intents.is_empty(),
        "intents without an outcome: {intents:?}"
    );
    assert!(mode_records_seen > SWITCHES, "{mode_records_seen}");
    let answered = statuses.lock().expect("not poisoned").clone();
    let ok = answered.iter().filter(|&&status| status == 200).count();
    assert_eq!(ok, executed, "every 200 is one executed call in the chain");
    assert!(executed > 0, "B and C ran calls during the emergencies");
    eprintln!(
        "{SWITCHES} switches; {} calls on B and C: {executed} executed, {refused_stale} refused as stale, the rest denied",
        answered.len()
    );
    let (verified, output) = verify_store(&url, &cluster.credential, cluster.dirs[0].path());
    assert!(verified, "{output}");
}

/// A policy whose EMERGENCY allows the fixture upstream's slow and hanging tools,
/// which NORMAL denies; a switch drains them for up to 2 s.
fn policy_with_slow_upstream(dir: &Path) -> PathBuf {
    let call_log = dir.join("calls.jsonl");
    let policy = json!({
        "description": "scale_out: slow upstream calls that a switch to NORMAL must drain.",
        "simulated_cloud": true,
        "default_mode": "NORMAL",
        "max_emergency_ttl_seconds": 3600,
        "drain_timeout_seconds": 2,
        "upstreams": {
            "fx": {
                "command": common::upstream::python().display().to_string(),
                "args": [common::upstream::fixture_script().display().to_string()],
                "env": {"FIXTURE_CALL_LOG": call_log.display().to_string()},
                "required": true
            }
        },
        "modes": {
            "NORMAL": {"allowed_tools": ["list_services"]},
            "EMERGENCY": {"allowed_tools": ["list_services", "fx__slow", "fx__hang"]}
        }
    });
    common::write_policy(dir, "slow-upstream.json", &policy.to_string())
}

/// Waits until the chain holds the intent of a call to `tool` after seq `after`; its seq.
async fn wait_for_intent(url: &str, tool: &'static str, after: u64) -> u64 {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        wait_until("the intent to commit", Duration::from_secs(20), || {
            chain(&url)
                .into_iter()
                .find(|r| {
                    r.seq > after && r.tool.as_deref() == Some(tool) && r.outcome == "pending"
                })
                .map(|r| r.seq)
        })
    })
    .await
    .expect("the wait finished")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switch_to_normal_on_a_returns_only_after_the_calls_running_on_b_ended() {
    let cluster = cluster(2);
    let url = cluster.postgres.url();
    let policy_dir = tempfile::tempdir().expect("temp dir");
    let policy = policy_with_slow_upstream(policy_dir.path());
    let a = instance_with_policy(cluster.dirs[0].path(), &url, &cluster.credential, &policy);
    let b = instance_with_policy(cluster.dirs[1].path(), &url, &cluster.credential, &policy);

    // A call on B that ends by itself within the drain timeout: A waits for it.
    Api::new(&a.url).emergency().await;
    wait_for_mode(&b.url, "EMERGENCY").await;
    let b_api = Api::new(&b.url);
    let slow = tokio::spawn(async move { b_api.execute("fx__slow", json!({"ms": 1500})).await });
    let intent = wait_for_intent(&url, "fx__slow", 0).await;
    Api::new(&a.url).normal().await;
    let records = chain(&url);
    let outcome = records
        .iter()
        .find(|r| r.detail["intent_seq"] == intent)
        .expect("B's call ended before A's switch returned");
    assert_eq!(outcome.outcome, "executed", "{outcome:?}");
    let summary = records
        .iter()
        .find(|r| r.kind == "mode_drained" && r.detail["remote"].is_object())
        .expect("A recorded what it waited for");
    assert_eq!(
        summary.detail["remote"]["finished"][0]["intent_seq"], intent,
        "{summary:?}"
    );
    let (status, body) = slow.await.expect("the call finished");
    assert_eq!(status, StatusCode::OK, "{body}");

    // A call on B that never ends: B cancels it at its drain timeout, and A's switch
    // returns only once the cancellation is recorded.
    Api::new(&a.url).emergency().await;
    wait_for_mode(&b.url, "EMERGENCY").await;
    let b_api = Api::new(&b.url);
    let hang = tokio::spawn(async move { b_api.execute("fx__hang", json!({})).await });
    let intent = wait_for_intent(&url, "fx__hang", intent).await;
    Api::new(&a.url).normal().await;
    let outcome = chain(&url)
        .into_iter()
        .find(|r| r.detail["intent_seq"] == intent)
        .expect("B's hanging call was cancelled before A's switch returned");
    assert_eq!(outcome.outcome, "cancelled", "{outcome:?}");
    let (status, body) = hang.await.expect("the call finished");
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (ok, output) = verify_store(&url, &cluster.credential, cluster.dirs[0].path());
    assert!(ok, "{output}");
}

/// Approvals live in the shared store with `--store`: a call held on A is listed
/// and approved on B, runs once on whichever instance the identical call reaches
/// first, and is consumed for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_given_on_one_instance_is_consumed_once_across_instances() {
    let cluster = cluster(2);
    let url = cluster.postgres.url();
    let policy_dir = tempfile::tempdir().expect("temp dir");
    let policy = common::approvals::write_approval_policy(policy_dir.path(), 600, "shared");
    let a = instance_with_policy(cluster.dirs[0].path(), &url, &cluster.credential, &policy);
    let b = instance_with_policy(cluster.dirs[1].path(), &url, &cluster.credential, &policy);
    let (api_a, api_b) = (Api::new(&a.url), Api::new(&b.url));
    api_a.emergency().await;
    wait_for_mode(&b.url, "EMERGENCY").await;

    let id = common::approvals::request_scale(&api_a, 7).await;
    // B sees A's pending approval: one table, not one per data dir.
    assert_eq!(
        common::approvals::listed(&api_b, "pending").await,
        vec![id.clone()]
    );
    let (status, body) = common::approvals::decide(&api_b, &id, "approve", "capacity").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The identical call through B runs; through A afterwards it needs a new approval.
    let (status, body) = api_b.execute("scale_fleet", json!({"count": 7})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let again = common::approvals::request_scale(&api_a, 7).await;
    assert_ne!(again, id);
    assert_eq!(
        common::approvals::listed(&api_a, "consumed").await,
        vec![id.clone()]
    );
    let executed = chain(&url)
        .into_iter()
        .filter(|record| record.tool.as_deref() == Some("scale_fleet"))
        .filter(|record| record.outcome == "executed")
        .count();
    assert_eq!(executed, 1);
}

/// The first scale-out check, with three instances: once A's set-mode has
/// returned, B and C report the new mode on their very next status request (no
/// waiting for a watcher tick), and their calls are decided under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mode_change_on_a_is_seen_by_b_and_c_before_set_mode_returns() {
    let cluster = cluster(3);
    let url = cluster.postgres.url();
    let instances: Vec<ServerProcess> = cluster
        .dirs
        .iter()
        .map(|dir| instance(dir.path(), &url, &cluster.credential))
        .collect();
    let apis: Vec<Api> = instances.iter().map(|i| Api::new(&i.url)).collect();
    for round in 0..10 {
        let (target, tool_status) = if round % 2 == 0 {
            ("EMERGENCY", StatusCode::OK)
        } else {
            ("NORMAL", StatusCode::FORBIDDEN)
        };
        if round % 2 == 0 {
            apis[0].emergency().await;
        } else {
            apis[0].normal().await;
        }
        for api in &apis[1..] {
            assert_eq!(mode_on(&api.url).await, target, "round {round}");
            let (status, body) = api
                .execute("restart_service", json!({"service_name": "web-server"}))
                .await;
            assert_eq!(status, tool_status, "round {round}: {body}");
        }
    }
}
