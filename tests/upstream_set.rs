//! `UpstreamSet` against the real pinned servers (server-everything,
//! server-filesystem; scripts/upstream-harness.sh installs them): concurrent start,
//! required upstreams, listings and status, per-call cancellation and timeouts.

mod common;

use std::time::{Duration, Instant};

use common::upstream::{
    arguments, eventually, everything, kill_9, not_an_mcp_server, resolved, server, text_of,
};
use proxi::upstream::call::CallContext;
use proxi::upstream::client::UpstreamError;
use proxi::upstream::set::{TransportKind, UpstreamSet};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_upstreams_never_hold_up_the_required_ones() {
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().canonicalize().unwrap();
    std::fs::write(root_path.join("notes.txt"), "hello\n").unwrap();
    let set = UpstreamSet::start(vec![
        resolved("ev", everything(), true, MINUTE),
        resolved(
            "fs",
            server("server-filesystem", &[root_path.to_str().unwrap()]),
            false,
            MINUTE,
        ),
        resolved("broken", not_an_mcp_server(), false, MINUTE),
    ])
    .await
    .unwrap();
    assert_eq!(set.names(), ["broken", "ev", "fs"]);

    // The required upstream is listed by the time start returns.
    let listings = set.listings();
    let ev = listings["ev"].as_ref().expect("ev is listed");
    assert!(
        ev.tools.iter().any(|tool| tool.exposed_name == "ev__echo"),
        "{:?}",
        ev.tools
    );
    let echo = set
        .call(
            "ev",
            "echo",
            arguments(json!({"message": "hi"})),
            &CallContext::detached(),
        )
        .await
        .unwrap();
    assert!(text_of(&echo).contains("hi"), "{echo:?}");

    // The optional one comes up in the background; a tick of tools_changed
    // comes with (or after) its listing.
    let mut changed = set.tools_changed();
    tokio::time::timeout(
        Duration::from_secs(30),
        changed.wait_for(|_| set.listings()["fs"].is_ok()),
    )
    .await
    .expect("fs is listed within 30 s")
    .unwrap();
    let read = set
        .call(
            "fs",
            "read_text_file",
            arguments(json!({"path": root_path.join("notes.txt")})),
            &CallContext::detached(),
        )
        .await
        .unwrap();
    assert_eq!(text_of(&read), "hello\n");

    // The broken one says why, and calls to it fail fast.
    let broken = set.listings()["broken"].clone().unwrap_err();
    assert!(
        matches!(&broken, UpstreamError::Unavailable { upstream, .. } if upstream == "broken"),
        "{broken:?}"
    );
    let began = Instant::now();
    let error = set
        .call("broken", "anything", None, &CallContext::detached())
        .await
        .unwrap_err();
    assert!(
        matches!(error, UpstreamError::Unavailable { .. }),
        "{error:?}"
    );
    assert!(began.elapsed() < Duration::from_secs(5));
    let unknown = set
        .call("nobody", "echo", None, &CallContext::detached())
        .await
        .unwrap_err();
    assert!(
        matches!(&unknown, UpstreamError::Unavailable { upstream, .. } if upstream == "nobody"),
        "{unknown:?}"
    );

    let status = set.status();
    let by_name = |name: &str| status.iter().find(|s| s.name == name).unwrap().clone();
    let ev_status = by_name("ev");
    assert!(ev_status.up && ev_status.required);
    assert_eq!(ev_status.starts, 1);
    assert_eq!(ev_status.transport, TransportKind::Stdio);
    assert!(ev_status.pid.is_some());
    assert_eq!(ev_status.tools, Some(ev.tools.len()));
    let broken_status = by_name("broken");
    assert!(!broken_status.up);
    assert_eq!(broken_status.starts, 0);
    assert!(broken_status.last_error.is_some());
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_upstream_that_fails_to_start_is_an_error_naming_it() {
    let began = Instant::now();
    let error = UpstreamSet::start(vec![
        resolved("ev", everything(), false, MINUTE),
        resolved("needed", not_an_mcp_server(), true, MINUTE),
    ])
    .await
    .unwrap_err();
    assert!(
        matches!(&error, UpstreamError::Unavailable { upstream, .. } if upstream == "needed"),
        "{error:?}"
    );
    assert!(error.to_string().contains("needed"), "{error}");
    assert!(began.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_call_leaves_the_other_running() {
    let set = UpstreamSet::start(vec![resolved("ev", everything(), true, MINUTE)])
        .await
        .unwrap();
    let slow = || arguments(json!({"duration": 2, "steps": 2}));
    let doomed = CallContext {
        cancel: CancellationToken::new(),
        caller: None,
    };
    let kept = CallContext::detached();
    let cancel = doomed.cancel.clone();
    let began = Instant::now();
    let (cancelled, completed, ()) = tokio::join!(
        set.call("ev", "trigger-long-running-operation", slow(), &doomed),
        set.call("ev", "trigger-long-running-operation", slow(), &kept),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
        },
    );
    assert_eq!(
        cancelled.unwrap_err(),
        UpstreamError::Cancelled {
            upstream: "ev".into()
        }
    );
    let completed = completed.unwrap();
    assert_ne!(completed.is_error, Some(true), "{completed:?}");
    assert!(
        text_of(&completed).to_lowercase().contains("completed"),
        "{completed:?}"
    );
    assert!(began.elapsed() >= Duration::from_secs(2));

    // An already-cancelled context is never sent.
    let error = set
        .call("ev", "echo", arguments(json!({"message": "x"})), &doomed)
        .await
        .unwrap_err();
    assert!(
        matches!(error, UpstreamError::Cancelled { .. }),
        "{error:?}"
    );
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upstream_has_its_own_call_timeout() {
    let set = UpstreamSet::start(vec![
        resolved("quick", everything(), true, Duration::from_millis(300)),
        resolved("patient", everything(), true, MINUTE),
    ])
    .await
    .unwrap();
    let slow = || arguments(json!({"duration": 1, "steps": 1}));
    let error = set
        .call(
            "quick",
            "trigger-long-running-operation",
            slow(),
            &CallContext::detached(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        error,
        UpstreamError::Timeout {
            upstream: "quick".into(),
            after: Duration::from_millis(300)
        }
    );
    let done = set
        .call(
            "patient",
            "trigger-long-running-operation",
            slow(),
            &CallContext::detached(),
        )
        .await
        .unwrap();
    assert_ne!(done.is_error, Some(true), "{done:?}");
    // The timed-out upstream carries on.
    let echo = set
        .call(
            "quick",
            "echo",
            arguments(json!({"message": "on"})),
            &CallContext::detached(),
        )
        .await
        .unwrap();
    assert!(text_of(&echo).contains("on"));
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_is_listed_again_and_ticks_tools_changed() {
    let set = UpstreamSet::start(vec![resolved("ev", everything(), true, MINUTE)])
        .await
        .unwrap();
    let mut changed = set.tools_changed();
    changed.borrow_and_update();
    let pid = set.status()[0].pid.unwrap();
    kill_9(pid);
    // Down, then up again with a second start and a fresh listing.
    eventually(
        "ev to restart and be listed",
        Duration::from_secs(30),
        || {
            let status = set.status()[0].clone();
            let listed = set.listings()["ev"].is_ok();
            async move { (status.up && status.starts == 2 && listed).then_some(()) }
        },
    )
    .await;
    assert!(changed.has_changed().unwrap());
    let echo = set
        .call(
            "ev",
            "echo",
            arguments(json!({"message": "back"})),
            &CallContext::detached(),
        )
        .await
        .unwrap();
    assert!(text_of(&echo).contains("back"));
    set.shutdown().await;
}
