//! Attack on the operator's own tools (issue 8, item 17): `proxi audit tail | head`
//! panicked ("failed printing to stdout: Broken pipe") once `head` had what it
//! wanted. Now every CLI output path ends quietly, with success, on a closed pipe.

mod common;

use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use chrono::Utc;
use common::policy_path;
use proxi::audit::{AuditDecision, AuditEntry, AuditLog, Durability, EntryKind};
use serde_json::json;

/// Runs proxi with stdout connected to a pipe whose reading end is already
/// closed, so its first write fails with EPIPE, deterministically.
fn run_into_closed_pipe(args: &[&std::ffi::OsStr]) -> Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("proxi runs")
}

fn assert_quiet_exit(what: &str, output: &Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what}: {:?} {stderr}",
        output.status
    );
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(stderr.trim().is_empty(), "{what} printed: {stderr}");
}

fn trail_with_records(data_dir: &std::path::Path, count: usize) {
    let (audit, _) = AuditLog::open(data_dir, Durability::Process).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        for _ in 0..count {
            audit
                .append(AuditEntry {
                    time: Utc::now(),
                    principal: proxi::principal::Principal::agent(),
                    kind: EntryKind::ToolCall,
                    tool: Some("list_services".to_owned()),
                    arguments: Some(json!({})),
                    mode: Arc::from("NORMAL"),
                    decision: AuditDecision::Allowed,
                    reason_code: None,
                    outcome: "executed",
                    detail: json!(null),
                    expires_at: None,
                    context: None,
                    policy_hash: None,
                })
                .await
                .unwrap();
        }
    });
}

#[test]
fn cli_output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    trail_with_records(dir.path(), 50);
    let data = dir.path().as_os_str();
    let policy = policy_path();
    let cases: [(&str, Vec<&std::ffi::OsStr>); 5] = [
        (
            "audit tail",
            vec![
                "audit".as_ref(),
                "tail".as_ref(),
                "--data-dir".as_ref(),
                data,
            ],
        ),
        (
            "audit tail --json",
            vec![
                "audit".as_ref(),
                "tail".as_ref(),
                "--json".as_ref(),
                "--data-dir".as_ref(),
                data,
            ],
        ),
        (
            "audit verify",
            vec![
                "audit".as_ref(),
                "verify".as_ref(),
                "--data-dir".as_ref(),
                data,
            ],
        ),
        (
            "policy check",
            vec!["policy".as_ref(), "check".as_ref(), policy.as_os_str()],
        ),
        // A path that still prints with println!: the panic hook ends it quietly.
        (
            "policy explain",
            vec![
                "policy".as_ref(),
                "explain".as_ref(),
                "list_services".as_ref(),
                "--policy".as_ref(),
                policy.as_os_str(),
            ],
        ),
    ];
    for (what, args) in cases {
        assert_quiet_exit(what, &run_into_closed_pipe(&args));
    }
}

#[test]
fn audit_tail_into_head_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    // Far more output than a pipe buffers, so proxi is still writing when head exits.
    trail_with_records(dir.path(), 2000);
    // pipefail: the pipeline's status is proxi's, which must be success.
    let output = Command::new("bash")
        .args(["-o", "pipefail", "-c"])
        .arg(format!(
            "'{}' audit tail -n 2000 --data-dir '{}' | head -n 1",
            env!("CARGO_BIN_EXE_proxi"),
            dir.path().display()
        ))
        .output()
        .expect("sh runs");
    assert_quiet_exit("audit tail | head -n 1", &output);
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 1);
}
