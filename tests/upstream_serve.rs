//! `proxi serve` and its stdio upstreams as processes: SIGTERM of Proxi leaves no
//! process of an upstream behind, and neither does kill -9 of an upstream (which
//! Proxi then restarts). The upstream is the fixture behind a shell that stays its
//! parent, as an `npx` wrapper does, so a grandchild is what could be orphaned.

mod common;

use std::path::Path;
use std::time::Duration;

use common::upstream::{fixture_script, kill_9, processes_in_group, python};
use common::{ServerProcess, wait_until, write_policy};
use serde_json::json;

/// Live processes whose environment holds `FIXTURE_CALL_LOG=<call_log>`: the
/// wrapper and the fixture of this test only.
fn fixture_processes(call_log: &Path) -> Vec<(u32, u32)> {
    let marker = format!("FIXTURE_CALL_LOG={}", call_log.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !environ
            .split(|byte| *byte == 0)
            .any(|entry| entry == marker.as_bytes())
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if matches!(fields.first(), Some(&"Z" | &"X")) {
            continue;
        }
        if let Some(group) = fields.get(2).and_then(|pgrp| pgrp.parse::<u32>().ok()) {
            found.push((pid, group));
        }
    }
    found
}

fn policy_with_wrapped_fixture(dir: &Path, call_log: &Path) -> std::path::PathBuf {
    let script = r#""$0" "$1"; echo "wrapper done" >&2"#;
    let policy = json!({
        "description": "upstream_serve: the fixture behind a shell wrapper.",
        "default_mode": "NORMAL",
        "max_emergency_ttl_seconds": 3600,
        "upstreams": {
            "fx": {
                "command": "sh",
                "args": ["-c", script, python().display().to_string(), fixture_script().display().to_string()],
                "env": {"FIXTURE_CALL_LOG": call_log.display().to_string()},
                "required": true
            }
        },
        "modes": {
            "NORMAL": {"allowed_tools": ["fx__echo"]},
            "EMERGENCY": {"allowed_tools": ["fx__echo"]}
        }
    });
    write_policy(dir, "wrapped.json", &policy.to_string())
}

/// Waits for the wrapper and its fixture: two processes in one group, led by the wrapper.
fn wrapper_and_fixture(call_log: &Path) -> (u32, Vec<u32>) {
    wait_until(
        "the wrapper and its fixture",
        Duration::from_secs(30),
        || {
            let found = fixture_processes(call_log);
            let group = found.first()?.1;
            let members = processes_in_group(group);
            (found.len() == 2 && found.iter().all(|(_, g)| *g == group) && members.len() == 2)
                .then_some((group, members))
        },
    )
}

#[test]
fn sigterm_of_proxi_leaves_no_upstream_process() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let policy = policy_with_wrapped_fixture(dir.path(), &call_log);
    let server = ServerProcess::start_with_policy(&dir.path().join("data"), &policy, &[]);
    let (group, members) = wrapper_and_fixture(&call_log);
    let status = server.terminate();
    assert!(status.success(), "proxi exited with {status}");
    // Proxi has exited: whatever of the group is still alive is an orphan.
    wait_until(
        "the upstream's group to be empty",
        Duration::from_secs(10),
        || processes_in_group(group).is_empty().then_some(()),
    );
    assert!(
        fixture_processes(&call_log).is_empty(),
        "orphans of {members:?}: {:?}",
        fixture_processes(&call_log)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_upstream_leaves_no_orphan_and_proxi_restarts_it() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let policy = policy_with_wrapped_fixture(dir.path(), &call_log);
    let server = ServerProcess::start_with_policy(&dir.path().join("data"), &policy, &[]);
    let (group, _) = wrapper_and_fixture(&call_log);
    kill_9(group); // the wrapper leads its group
    wait_until(
        "the killed upstream's group to be empty",
        Duration::from_secs(20),
        || processes_in_group(group).is_empty().then_some(()),
    );
    let (restarted, _) = wrapper_and_fixture(&call_log);
    assert_ne!(restarted, group);

    let api = common::Api::new(&server.url);
    let (status, body) = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let (status, body) = api
                .execute("fx__echo", json!({"message": "after restart"}))
                .await;
            if status.is_success() {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a call succeeds after the restart");
    assert!(status.is_success(), "{status}: {body}");
    assert_eq!(body["success"], true, "{body}");
    let status = server.terminate();
    assert!(status.success(), "proxi exited with {status}");
    wait_until(
        "the restarted group to be empty",
        Duration::from_secs(10),
        || processes_in_group(restarted).is_empty().then_some(()),
    );
}
