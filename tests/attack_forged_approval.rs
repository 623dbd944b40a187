//! An agent that can write the data dir (as under `proxi mcp`, where it runs as the
//! agent's user) marks its own pending approval approved in `approvals.db`. Before
//! decisions were sealed, the identical call then ran with no operator involved.
//! Now an approved row whose seal does not verify is never used: the call does not
//! run and a genuine approval is asked for.

mod common;

use common::approvals::{decide, listed, request_scale, write_approval_policy};
use common::{AGENT_TOKEN, TestServer};
use proxi::approval::sqlite::APPROVALS_DB_FILE;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn an_approval_marked_approved_in_the_data_dir_does_not_run_the_call() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server =
        TestServer::start_with_policy(&write_approval_policy(dir.path(), 600, "forged")).await;
    server.api().emergency().await;
    let api = server.api();

    // A genuine decision, whose seal the forger may copy.
    let genuine = request_scale(&api, 6).await;
    let (status, _) = decide(&api, &genuine, "approve", "checked").await;
    assert_eq!(status, StatusCode::OK);

    let forged = request_scale(&api, 9).await;
    let db = rusqlite::Connection::open(server.data_dir().join(APPROVALS_DB_FILE))
        .expect("the agent opens the file");
    db.busy_timeout(std::time::Duration::from_secs(5))
        .expect("busy timeout");
    let changed = db
        .execute(
            "UPDATE approvals SET status = 'approved', decided_by = 'operator', \
             decision_reason = 'lgtm', \
             decision_seal = (SELECT decision_seal FROM approvals WHERE id = ?2) WHERE id = ?1",
            [forged.as_str(), genuine.as_str()],
        )
        .expect("the agent writes the file");
    assert_eq!(changed, 1);

    let (status, body) = api.execute("scale_fleet", json!({"count": 9})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["reason_code"], "approval_mismatch", "{body}");
    let fresh = body["approval_id"].as_str().expect("a new approval id");
    assert_ne!(fresh, forged);
    let (_, infra) = api.get("/infrastructure/status", Some(AGENT_TOKEN)).await;
    assert_ne!(infra["fleet"]["instances"], 9, "{infra}");
    let ran = server
        .tool_calls()
        .await
        .into_iter()
        .filter(|record| record.tool.as_deref() == Some("scale_fleet"))
        .filter(|record| record.outcome == "executed")
        .count();
    assert_eq!(ran, 0, "nothing ran on the forged approval");
    assert!(listed(&api, "pending").await.contains(&fresh.to_owned()));

    // The genuine approval still runs its call, once.
    let (status, body) = api.execute("scale_fleet", json!({"count": 6})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
