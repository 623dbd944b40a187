//! Attack: open MCP sessions until the server runs out of memory.
//!
//! Before the fix every `initialize` built a ~134 KB session that lived 300 s idle,
//! with no cap and no record: 2,000 initializes took a plain build from 37 to
//! 307 MB RSS (20,000 reached 2.7 GB). Now sessions are capped per token and in
//! total, their creation is rate-limited, refusals are 429/503 JSON-RPC errors
//! and are audited in aggregate, and idle sessions close sooner.

mod common;

use std::time::Duration;

use common::{
    AGENT_TOKEN, OPERATOR_TOKEN, ServerProcess, audit_records, mcp_initialize_body, mcp_post,
    rss_mib, wait_until,
};
use proxi::reason::Reason;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn http() -> reqwest::Client {
    proxi::tls::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client builds")
}

fn refusals(server: &ServerProcess, reason: &str) -> Vec<proxi::audit::AuditRecord> {
    audit_records(&server.data_dir)
        .into_iter()
        .filter(|record| record.reason_code.as_deref() == Some(reason))
        .collect()
}

#[tokio::test]
async fn a_session_flood_is_capped_refused_clearly_and_audited_in_aggregate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(
        dir.path(),
        &[
            "--max-mcp-sessions",
            "30",
            "--max-mcp-sessions-per-token",
            "20",
            "--mcp-sessions-per-minute",
            "6000",
            "--mcp-session-burst",
            "1000",
            "--refusal-window",
            "1h",
            "--durability",
            "process",
        ],
    );
    let http = http();
    let before = rss_mib(server.child.id());
    let mut opened = 0;
    let mut refused = 0;
    for _ in 0..500 {
        let (status, session, body) = mcp_post(
            &http,
            &server.url,
            AGENT_TOKEN,
            None,
            mcp_initialize_body("flood"),
        )
        .await;
        match status {
            StatusCode::OK => {
                assert!(session.is_some(), "an opened session has an id");
                opened += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let error: Value = serde_json::from_str(&body).expect("a JSON-RPC error");
                assert_eq!(error["jsonrpc"], "2.0");
                assert_eq!(error["id"], 1);
                assert_eq!(error["error"]["code"], -32001);
                assert_eq!(
                    error["error"]["data"]["reason_code"],
                    Reason::SessionLimitPrincipal.as_str()
                );
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let after = rss_mib(server.child.id());
    eprintln!(
        "500 initializes by one token: {opened} opened, {refused} refused; RSS {before} -> {after} MiB"
    );
    assert_eq!((opened, refused), (20, 480));
    assert!(
        after < before + 40,
        "RSS grew from {before} to {after} MiB under a capped session flood"
    );

    // Another token has its own share, up to the server's total.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let (status, _, _) = mcp_post(
            &http,
            &server.url,
            OPERATOR_TOKEN,
            None,
            mcp_initialize_body("operator"),
        )
        .await;
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        10
    );
    assert_eq!(statuses[10], StatusCode::SERVICE_UNAVAILABLE);

    // 480 refusals: one record at once, the rest in one summary when the window
    // closes, here when the server stops (the window is longer than the test).
    assert_eq!(
        refusals(&server, Reason::SessionLimitPrincipal.as_str()).len(),
        1
    );
    let data_dir = server.data_dir.clone();
    assert!(server.terminate().success());
    let summary: Vec<_> = audit_records(&data_dir)
        .into_iter()
        .filter(|record| {
            record.reason_code.as_deref() == Some(Reason::SessionLimitPrincipal.as_str())
        })
        .collect();
    assert_eq!(summary.len(), 2);
    assert_eq!(summary[0].principal, "agent");
    assert_eq!(summary[0].detail["count"], 1);
    assert_eq!(summary[1].detail["count"], 479);
    assert_eq!(summary[1].detail["summary"], true);
    assert_eq!(summary[1].detail["source"], "127.0.0.1");
}

#[tokio::test]
async fn session_creation_is_rate_limited_per_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(
        dir.path(),
        &[
            "--mcp-sessions-per-minute",
            "1",
            "--mcp-session-burst",
            "5",
            "--durability",
            "process",
        ],
    );
    let http = http();
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let (status, _, body) = mcp_post(
            &http,
            &server.url,
            AGENT_TOKEN,
            None,
            mcp_initialize_body("fast"),
        )
        .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            let error: Value = serde_json::from_str(&body).expect("a JSON-RPC error");
            assert_eq!(
                error["error"]["data"]["reason_code"],
                Reason::SessionRateLimited.as_str()
            );
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        refusals(&server, Reason::SessionRateLimited.as_str()).len(),
        1
    );
}

#[tokio::test]
async fn an_idle_session_is_closed_and_frees_its_slot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(
        dir.path(),
        &[
            "--max-mcp-sessions-per-token",
            "1",
            "--mcp-session-idle",
            "1s",
            "--durability",
            "process",
        ],
    );
    let http = http();
    let (status, session, _) = mcp_post(
        &http,
        &server.url,
        AGENT_TOKEN,
        None,
        mcp_initialize_body("idle"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let session = session.expect("a session id");
    let (status, _, _) = mcp_post(
        &http,
        &server.url,
        AGENT_TOKEN,
        None,
        mcp_initialize_body("second"),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the token's one slot is taken"
    );

    // Once the session has idled out, its slot is free again.
    let reopened = tokio::task::spawn_blocking({
        let url = server.url.clone();
        move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            wait_until("the idle session to close", Duration::from_secs(20), || {
                runtime.block_on(async {
                    let (status, _, _) =
                        mcp_post(&http, &url, AGENT_TOKEN, None, mcp_initialize_body("again"))
                            .await;
                    (status == StatusCode::OK).then_some(())
                })
            });
            runtime.block_on(async {
                let ping = json!({"jsonrpc": "2.0", "id": 2, "method": "ping"});
                mcp_post(&http, &url, AGENT_TOKEN, Some(&session), ping)
                    .await
                    .0
            })
        }
    })
    .await
    .expect("the poll finishes");
    assert_eq!(reopened, StatusCode::NOT_FOUND, "the idle session is gone");
}
