//! Decision and execution happen under one mode, even while the mode thrashes:
//! concurrent executes race hundreds of mode switches, then the audit trail must
//! show that no active tool ran under NORMAL and every call was decided under the
//! mode the chain says was in force.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{TestServer, high_rate_limit_policy_path};
use proxi::audit::AuditRecord;
use reqwest::StatusCode;
use serde_json::json;

const WORKERS: usize = 8;
const MODE_SWITCHES: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_active_tool_runs_under_normal_while_the_mode_thrashes() {
    // The workers flood on purpose: this test is about ordering, not rate limits.
    let server = TestServer::start_with_policy(&high_rate_limit_policy_path()).await;
    let api = server.api();
    let stop = Arc::new(AtomicBool::new(false));

    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let api = api.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut calls = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let (tool, arguments) = match calls % 3 {
                    0 => ("restart_service", json!({"service_name": "web-server"})),
                    1 => (
                        "scale_fleet",
                        json!({"count": 1 + (worker as i64 + calls as i64) % 10}),
                    ),
                    _ => ("list_services", json!({})),
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

    for switch in 0..MODE_SWITCHES {
        if switch % 2 == 0 {
            api.emergency().await;
        } else {
            api.normal().await;
        }
    }
    api.normal().await;
    stop.store(true, Ordering::Relaxed);
    let mut total_calls = 0;
    for worker in workers {
        total_calls += worker.await.expect("worker finished cleanly");
    }

    let gateway = server.gateway();
    let store = gateway.audit().store();
    let mut records: Vec<AuditRecord> = Vec::new();
    store
        .for_each_record(&mut |record| records.push(record))
        .unwrap();
    let verification = store.verify(None).unwrap();
    assert_eq!(verification.first_bad, None);

    let mut mode_in_force = "NORMAL".to_owned();
    let (mut switches, mut tool_calls, mut active_allowed, mut active_denied) = (0, 0, 0, 0);
    for record in &records {
        match record.kind.as_str() {
            "mode_change" => {
                mode_in_force = record.mode.clone();
                switches += 1;
            }
            "tool_call" => {
                tool_calls += 1;
                assert_eq!(
                    record.mode, mode_in_force,
                    "record {} was decided under {} while the chain says {} was in force",
                    record.seq, record.mode, mode_in_force
                );
                let active = matches!(
                    record.tool.as_deref(),
                    Some("restart_service" | "scale_fleet")
                );
                if active && record.decision == "allowed" {
                    assert_ne!(
                        record.mode, "NORMAL",
                        "active tool ran under NORMAL: record {}",
                        record.seq
                    );
                    active_allowed += 1;
                } else if active {
                    assert_eq!(record.mode, "NORMAL");
                    active_denied += 1;
                }
            }
            other => panic!("unexpected record kind {other}"),
        }
    }
    assert_eq!(switches, MODE_SWITCHES + 1);
    assert_eq!(
        tool_calls, total_calls as usize,
        "every acknowledged call is in the trail"
    );
    assert!(
        active_allowed > 0 && active_denied > 0,
        "the race was exercised both ways"
    );

    let (_, infra) = api
        .get("/infrastructure/status", Some(common::AGENT_TOKEN))
        .await;
    assert_eq!(infra["services"]["web-server"], "healthy");
    let fleet = infra["fleet_size"].as_i64().unwrap();
    assert!(
        (1..=10).contains(&fleet),
        "fleet size {fleet} is consistent"
    );
}
