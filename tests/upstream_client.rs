//! The upstream client and supervisor against real third-party MCP servers:
//! `@modelcontextprotocol/server-filesystem` and `@modelcontextprotocol/server-everything`,
//! pinned by tests/upstream-harness/package.json and installed by
//! scripts/upstream-harness.sh (scripts/test.sh runs it first).

mod common;

use std::time::{Duration, Instant};

use common::upstream::{
    arguments, eventually, everything, free_port, kill_9, process_exists, server, text_of,
};
use proxi::upstream::client::{UpstreamClient, UpstreamError, UpstreamHandler};
use proxi::upstream::config::Secret;
use proxi::upstream::supervisor::Supervisor;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_tools_are_listed_and_read_text_file_reads_a_file() {
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().canonicalize().unwrap();
    std::fs::write(
        root_path.join("runbook.md"),
        "restart the pod, then check the logs\n",
    )
    .unwrap();
    let target = server("server-filesystem", &[root_path.to_str().unwrap()]);
    let client = UpstreamClient::connect_stdio("fs", &target, UpstreamHandler::new("fs"))
        .await
        .unwrap();

    let listing = client.list_tools().await.unwrap();
    assert!(listing.skipped.is_empty(), "{:?}", listing.skipped);
    let read = listing
        .tools
        .iter()
        .find(|tool| tool.exposed_name == "fs__read_text_file")
        .unwrap_or_else(|| {
            let names: Vec<_> = listing.tools.iter().map(|t| &t.exposed_name).collect();
            panic!("no fs__read_text_file among {names:?}")
        });
    assert_eq!(read.tool.name, "read_text_file");
    assert!(
        read.tool
            .description
            .as_deref()
            .is_some_and(|d| !d.is_empty())
    );
    let properties = read.tool.input_schema.get("properties").unwrap();
    assert!(properties.get("path").is_some(), "{properties}");
    let annotations = read.tool.annotations.as_ref().expect("annotations");
    assert_eq!(annotations.read_only_hint, Some(true));

    let path = root_path.join("runbook.md");
    let result = client
        .call_tool(
            "read_text_file",
            arguments(json!({"path": path})),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_ne!(result.is_error, Some(true), "{result:?}");
    assert_eq!(text_of(&result), "restart the pod, then check the logs\n");

    // The upstream's own refusal is a result with isError, not a client error.
    let outside = client
        .call_tool(
            "read_text_file",
            arguments(json!({"path": "/etc/hostname"})),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(outside.is_error, Some(true), "{outside:?}");

    let pid = client.pid().expect("stdio child pid");
    client.shutdown().await;
    eventually(
        "the filesystem server to exit",
        Duration::from_secs(15),
        || async { (!process_exists(pid)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_tools_are_exposed_under_the_upstream_prefix() {
    let client = UpstreamClient::connect_stdio(
        "everything",
        &everything(),
        UpstreamHandler::new("everything"),
    )
    .await
    .unwrap();
    let listing = client.list_tools().await.unwrap();
    assert!(listing.skipped.is_empty(), "{:?}", listing.skipped);
    assert!(listing.tools.len() >= 5, "{:?}", listing.tools);
    for tool in &listing.tools {
        assert_eq!(tool.exposed_name, format!("everything__{}", tool.tool.name));
    }
    let names: Vec<_> = listing
        .tools
        .iter()
        .map(|t| t.exposed_name.as_str())
        .collect();
    for expected in [
        "everything__echo",
        "everything__get-sum",
        "everything__trigger-long-running-operation",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }

    let sum = client
        .call_tool(
            "get-sum",
            arguments(json!({"a": 2, "b": 40})),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(text_of(&sum).contains("42"), "{sum:?}");

    let unknown = client
        .call_tool("no-such-tool", None, Duration::from_secs(30))
        .await;
    // Either a JSON-RPC error or an isError result, but never a hang or a crash.
    match unknown {
        Err(UpstreamError::Rejected { upstream, .. }) => assert_eq!(upstream, "everything"),
        Ok(result) => assert_eq!(result.is_error, Some(true), "{result:?}"),
        Err(other) => panic!("unexpected {other:?}"),
    }
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tool_times_out_and_the_session_carries_on() {
    let client = UpstreamClient::connect_stdio(
        "everything",
        &everything(),
        UpstreamHandler::new("everything"),
    )
    .await
    .unwrap();
    let began = Instant::now();
    let error = client
        .call_tool(
            "trigger-long-running-operation",
            arguments(json!({"duration": 30, "steps": 3})),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert_eq!(
        error,
        UpstreamError::Timeout {
            upstream: "everything".into(),
            after: Duration::from_millis(300)
        }
    );
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );

    let echo = client
        .call_tool(
            "echo",
            arguments(json!({"message": "still here"})),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(text_of(&echo).contains("still here"), "{echo:?}");
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_upstream_fails_fast_and_is_restarted() {
    let supervisor = Supervisor::start("everything", everything(), Duration::from_secs(60));
    supervisor
        .wait_until_up(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(supervisor.starts(), 1);
    let first_pid = supervisor.pid().expect("pid");
    let echo = supervisor
        .call_tool("echo", arguments(json!({"message": "before"})))
        .await
        .unwrap();
    assert!(text_of(&echo).contains("before"));

    kill_9(first_pid);
    // Calls made while it is down fail with Unavailable, long before the 60 s timeout.
    let began = Instant::now();
    let error = eventually(
        "a call to fail with Unavailable",
        Duration::from_secs(10),
        || async {
            match supervisor
                .call_tool("echo", arguments(json!({"message": "down"})))
                .await
            {
                Err(error @ UpstreamError::Unavailable { .. }) => Some(error),
                _ => None,
            }
        },
    )
    .await;
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    assert!(
        matches!(&error, UpstreamError::Unavailable { upstream, .. } if upstream == "everything")
    );

    let second_pid = eventually(
        "the supervisor to restart the upstream",
        Duration::from_secs(30),
        || async {
            supervisor
                .pid()
                .filter(|pid| *pid != first_pid && supervisor.starts() == 2)
        },
    )
    .await;
    let echo = supervisor
        .call_tool("echo", arguments(json!({"message": "after"})))
        .await
        .unwrap();
    assert!(text_of(&echo).contains("after"));
    eventually(
        "the killed child to be reaped",
        Duration::from_secs(15),
        || async { (!process_exists(first_pid)).then_some(()) },
    )
    .await;

    supervisor.shutdown().await;
    eventually(
        "the restarted child to exit after shutdown",
        Duration::from_secs(15),
        || async { (!process_exists(second_pid)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_supervisor_stops_the_child() {
    let supervisor = Supervisor::start("everything", everything(), Duration::from_secs(60));
    supervisor
        .wait_until_up(Duration::from_secs(30))
        .await
        .unwrap();
    let pid = supervisor.pid().expect("pid");
    assert!(process_exists(pid));
    drop(supervisor);
    eventually(
        "the child to exit after the supervisor is dropped",
        Duration::from_secs(15),
        || async { (!process_exists(pid)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_upstream_sees_only_its_declared_env_and_a_small_baseline() {
    let mut target = everything();
    target
        .env
        .insert("RUNBOOK_ROOT".into(), Secret::new("/srv/runbooks".into()));
    let client =
        UpstreamClient::connect_stdio("everything", &target, UpstreamHandler::new("everything"))
            .await
            .unwrap();
    let result = client
        .call_tool("get-env", None, Duration::from_secs(30))
        .await
        .unwrap();
    let env: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text_of(&result)).unwrap();
    assert_eq!(env.get("RUNBOOK_ROOT"), Some(&json!("/srv/runbooks")));
    let allowed = |key: &str| {
        key == "RUNBOOK_ROOT"
            || proxi::upstream::client::INHERITED_ENV.contains(&key)
            // Node itself may add these to its own process.env.
            || key.starts_with("NODE_")
    };
    let leaked: Vec<_> = env.keys().filter(|key| !allowed(key)).collect();
    assert!(leaked.is_empty(), "the upstream inherited {leaked:?}");
    // The test process itself has many more (CARGO_*, NEXTEST_*), so this would fail
    // if the child inherited the whole environment.
    assert!(std::env::vars_os().count() > env.len());
    client.shutdown().await;
}

/// Proxi's shutdown path when nothing waits for the supervisor: the runtime is
/// torn down with the session still up. The child must die with it.
#[test]
fn tearing_down_the_runtime_kills_the_child() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (supervisor, pid) = runtime.block_on(async {
        let supervisor = Supervisor::start("everything", everything(), Duration::from_secs(60));
        supervisor
            .wait_until_up(Duration::from_secs(30))
            .await
            .unwrap();
        let pid = supervisor.pid().expect("pid");
        (supervisor, pid)
    });
    assert!(process_exists(pid));
    drop(runtime);
    let deadline = Instant::now() + Duration::from_secs(15);
    while process_exists(pid) {
        assert!(
            Instant::now() < deadline,
            "child {pid} survived the runtime: {:?}",
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(supervisor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamable_http_upstream_is_listed_and_called() {
    let port = free_port();
    let entry = everything().args[0].expose().to_owned();
    let mut server = tokio::process::Command::new("node")
        .args([entry.as_str(), "streamableHttp"])
        .env("PORT", port.to_string())
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let declaration: proxi::upstream::config::UpstreamDeclaration = serde_json::from_value(json!({
        "url": "http://127.0.0.1:${EVERYTHING_PORT}/mcp",
        "headers": {"Authorization": "Bearer ${EVERYTHING_TOKEN}"}
    }))
    .unwrap();
    let lookup = move |name: &str| match name {
        "EVERYTHING_PORT" => Some(port.to_string()),
        "EVERYTHING_TOKEN" => Some("not-checked-by-this-server".to_owned()),
        _ => None,
    };
    let resolved = declaration.resolve("web", &lookup).unwrap();
    let proxi::upstream::config::Transport::Http(target) = resolved.transport else {
        panic!("an http upstream")
    };
    let client = eventually(
        "the http server to accept a session",
        Duration::from_secs(30),
        || {
            let target = target.clone();
            async move {
                UpstreamClient::connect_http("web", &target, UpstreamHandler::new("web"))
                    .await
                    .ok()
            }
        },
    )
    .await;
    assert_eq!(client.pid(), None);
    let listing = client.list_tools().await.unwrap();
    assert!(
        listing.tools.iter().any(|t| t.exposed_name == "web__echo"),
        "{:?}",
        listing.tools
    );
    let echo = client
        .call_tool(
            "echo",
            arguments(json!({"message": "over http"})),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(text_of(&echo).contains("over http"), "{echo:?}");
    client.shutdown().await;
    server.kill().await.unwrap();
}
