//! Stdio upstream processes: stderr reaches Proxi's log under the upstream's name,
//! and no process of an upstream's group survives it, whether the upstream is
//! killed (kill -9 of a wrapper that started the real server, as `npx` does), the
//! set is stopped, or the runtime is torn down. Uses the fixture upstream.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::upstream::{
    arguments, eventually, fixture, fixture_script, kill_9, processes_in_group, python, resolved,
    text_of,
};
use proxi::upstream::call::CallContext;
use proxi::upstream::config::{Secret, StdioTarget};
use proxi::upstream::set::UpstreamSet;
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// The fixture behind a shell that stays its parent (as an `npx` wrapper does): the
/// upstream's pid is the shell's, the server is its child. It first writes a line
/// to stderr.
fn wrapped_fixture(call_log: &Path) -> StdioTarget {
    let mut target = fixture(call_log);
    let script = r#"echo "wrapper says hello" >&2; "$0" "$1"; echo "wrapper done" >&2"#;
    target.args = vec![
        Secret::new("-c".into()),
        Secret::new(script.into()),
        Secret::new(python().display().to_string()),
        Secret::new(fixture_script().display().to_string()),
    ];
    target.command = "sh".into();
    target
}

/// Waits until the group led by `leader` has two live members (the shell and the server).
async fn wrapper_and_server(leader: u32) -> Vec<u32> {
    eventually(
        "the wrapper and its server",
        Duration::from_secs(20),
        || {
            let members = processes_in_group(leader);
            async move { (members.len() >= 2).then_some(members) }
        },
    )
    .await
}

async fn group_is_empty(leader: u32) {
    eventually(
        "the process group to be empty",
        Duration::from_secs(20),
        || {
            let members = processes_in_group(leader);
            async move { members.is_empty().then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_wrapper_takes_its_server_with_it_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let set = UpstreamSet::start(vec![resolved(
        "wrapped",
        wrapped_fixture(&call_log),
        true,
        MINUTE,
    )])
    .await
    .unwrap();
    let first = set.status()[0].pid.expect("a pid");
    let members = wrapper_and_server(first).await;
    assert!(members.contains(&first), "{members:?}");

    kill_9(first);
    // Without the group kill, the server would keep the pipes open and the session
    // alive, serving on as an orphan of the dead wrapper.
    group_is_empty(first).await;
    let second = eventually("a restart", Duration::from_secs(30), || {
        let status = set.status()[0].clone();
        async move { (status.up && status.starts >= 2).then_some(status) }
    })
    .await;
    assert_eq!(second.starts, 2, "{second:?}");
    let second = second.pid.expect("a pid while up");
    assert_ne!(second, first);
    let echo = set
        .call(
            "wrapped",
            "echo",
            arguments(json!({"message": "again"})),
            &CallContext::detached(),
        )
        .await
        .unwrap();
    assert_eq!(text_of(&echo), "again");

    set.shutdown().await;
    group_is_empty(second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_tool_restarts_the_upstream_and_the_next_call_works() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let set = UpstreamSet::start(vec![resolved("fx", fixture(&call_log), true, MINUTE)])
        .await
        .unwrap();
    let first = set.status()[0].pid.unwrap();
    let crashed = set
        .call("fx", "crash", None, &CallContext::detached())
        .await
        .unwrap_err();
    assert!(
        matches!(
            crashed,
            proxi::upstream::client::UpstreamError::Unavailable { .. }
        ),
        "{crashed:?}"
    );
    group_is_empty(first).await;
    eventually("a restart", Duration::from_secs(30), || {
        let status = set.status()[0].clone();
        async move { (status.up && status.starts == 2).then_some(()) }
    })
    .await;
    let echo = set
        .call(
            "fx",
            "echo",
            arguments(json!({"message": "back"})),
            &CallContext::detached(),
        )
        .await
        .unwrap();
    assert_eq!(text_of(&echo), "back");
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_tool_times_out_and_is_cancelled_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let set = UpstreamSet::start(vec![resolved(
        "fx",
        fixture(&call_log),
        true,
        Duration::from_millis(500),
    )])
    .await
    .unwrap();
    let began = Instant::now();
    let error = set
        .call("fx", "hang", None, &CallContext::detached())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            proxi::upstream::client::UpstreamError::Timeout { .. }
        ),
        "{error:?}"
    );
    assert!(began.elapsed() < Duration::from_secs(10));
    eventually(
        "the fixture to see the cancellation",
        Duration::from_secs(10),
        || {
            let calls = common::upstream::fixture_calls(&call_log);
            async move {
                calls
                    .iter()
                    .any(|c| c["tool"] == "hang" && c["event"] == "cancelled")
                    .then_some(())
            }
        },
    )
    .await;
    set.shutdown().await;
}

/// The runtime is dropped with the upstream up (what a process exit after SIGTERM
/// does to whatever was not shut down): the wrapper and its server both die.
#[test]
fn tearing_down_the_runtime_leaves_no_process_of_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (set, leader) = runtime.block_on(async {
        let set = UpstreamSet::start(vec![resolved(
            "wrapped",
            wrapped_fixture(&call_log),
            true,
            MINUTE,
        )])
        .await
        .unwrap();
        let leader = set.status()[0].pid.unwrap();
        wrapper_and_server(leader).await;
        (set, leader)
    });
    drop(runtime);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let members = processes_in_group(leader);
        if members.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "survivors of group {leader}: {members:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(set);
}

/// A `tracing` writer that keeps everything in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stderr_goes_to_the_log_under_the_upstreams_name() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    // Global: stderr is forwarded on the runtime's worker threads. (nextest runs
    // each test in a process of its own.)
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let set = UpstreamSet::start(vec![resolved(
        "wrapped",
        wrapped_fixture(&call_log),
        true,
        MINUTE,
    )])
    .await
    .unwrap();
    eventually(
        "the wrapper's stderr line in the log",
        Duration::from_secs(20),
        || {
            let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
            async move {
                log.lines()
                    .find(|line| line.contains("stderr: wrapper says hello"))
                    .map(str::to_owned)
            }
        },
    )
    .await
    .contains("upstream=\"wrapped\"")
    .then_some(())
    .expect("the stderr line names the upstream");
    set.shutdown().await;
}
