//! End to end: `proxi agent --provider mock` against a real `proxi serve` whose
//! EMERGENCY mode asks for approval of `scale_fleet` with `count` ≥ 6. The test
//! plays the operator over REST: it reads the approval id the agent prints,
//! then approves or denies it while the agent waits.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::approvals::{decide, listed, write_approval_policy};
use common::{AGENT_TOKEN, Api, ServerProcess};
use reqwest::StatusCode;

/// The approval policy's server, in EMERGENCY.
async fn served(dir: &Path) -> (ServerProcess, Api) {
    let policy = write_approval_policy(dir, 600, "agent approvals");
    let server = ServerProcess::start_with_policy(&dir.join("data"), &policy, &[]);
    let api = Api::new(&server.url);
    api.emergency().await;
    (server, api)
}

fn agent(dir: &Path, url: &str, extra: &[&str], task: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_proxi"));
    command
        .current_dir(dir)
        .args(["agent", "--provider", "mock", "--server", url])
        .args(extra)
        .arg(task)
        .env_remove("GOOGLE_API_KEY")
        .env_remove("PROXI_SERVER")
        .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// The agent's stdout, line by line, as it prints it.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

/// Reads lines until the agent says it waits for an approval; returns the id and
/// the transcript so far.
async fn approval_announced(
    receiver: mpsc::Receiver<String>,
) -> (String, Vec<String>, mpsc::Receiver<String>) {
    tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        loop {
            let line = receiver
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no approval notice in {seen:#?}"));
            seen.push(line.clone());
            if let Some((_, id)) = line.split_once("needs a human's approval: ") {
                // The next line names the operator's command.
                let command = receiver
                    .recv_timeout(Duration::from_secs(60))
                    .expect("the operator command follows");
                seen.push(command);
                return (id.trim().to_owned(), seen, receiver);
            }
        }
    })
    .await
    .unwrap()
}

async fn finish(mut child: Child, receiver: mpsc::Receiver<String>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let status = child.wait().expect("the agent exits");
        let rest: Vec<String> = receiver.iter().collect();
        (status.code().unwrap_or(-1), rest.join("\n"))
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_agent_waits_prints_the_operator_command_and_runs_the_approved_call_once() {
    let dir = tempfile::tempdir().unwrap();
    let (server, api) = served(dir.path()).await;
    let mut child = agent(dir.path(), &server.url, &[], "Scale the fleet to 8")
        .spawn()
        .unwrap();
    let receiver = lines(&mut child);
    let (id, seen, receiver) = approval_announced(receiver).await;
    let transcript = seen.join("\n");
    assert!(id.starts_with("apr_"), "{transcript}");
    assert!(
        transcript.contains(&format!("proxi approvals approve {id} --reason")),
        "{transcript}"
    );
    assert!(transcript.contains("waiting up to 5m"), "{transcript}");
    assert_eq!(listed(&api, "pending").await, vec![id.clone()]);

    // The operator approves while the agent is held.
    let (status, approved) = decide(&api, &id, "approve", "capacity checked").await;
    assert_eq!(status, StatusCode::OK, "{approved}");
    let (code, rest) = finish(child, receiver).await;
    assert_eq!(code, 0, "{rest}");
    assert!(rest.contains("approved by an operator"), "{rest}");
    assert!(rest.contains("ALLOWED"), "{rest}");

    let records = api.audit(200).await;
    let executed: Vec<_> = records
        .iter()
        .filter(|r| r["tool"] == "scale_fleet" && r["outcome"] == "executed")
        .collect();
    assert_eq!(executed.len(), 1, "ran once: {executed:?}");
    assert_eq!(executed[0]["detail"]["approval_id"], id.as_str());
    assert_eq!(executed[0]["detail"]["approved_by"], "operator");
    assert_eq!(listed(&api, "consumed").await, vec![id]);
}

#[tokio::test]
async fn a_denial_is_reported_plainly_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (server, api) = served(dir.path()).await;
    let mut child = agent(dir.path(), &server.url, &[], "Scale the fleet to 9")
        .spawn()
        .unwrap();
    let receiver = lines(&mut child);
    let (id, _, receiver) = approval_announced(receiver).await;
    let (status, _) = decide(&api, &id, "deny", "not during the freeze").await;
    assert_eq!(status, StatusCode::OK);
    let (code, rest) = finish(child, receiver).await;
    assert!(rest.contains("DENIED by an operator"), "{rest}");
    assert!(rest.contains("not during the freeze"), "{rest}");
    assert_ne!(code, 1, "a reported denial is not a crash: {rest}");
    let records = api.audit(200).await;
    assert!(
        !records
            .iter()
            .any(|r| r["tool"] == "scale_fleet" && r["outcome"] == "executed"),
        "nothing ran"
    );
}

#[tokio::test]
async fn no_decision_within_the_timeout_is_reported_as_a_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (server, api) = served(dir.path()).await;
    let output = agent(
        dir.path(),
        &server.url,
        &["--approval-timeout", "1s"],
        "Scale the fleet to 7",
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("no decision within --approval-timeout"),
        "{stdout}"
    );
    assert!(stdout.contains("approval_timeout"), "{stdout}");
    // Still pending: an operator can approve it later.
    assert_eq!(listed(&api, "pending").await.len(), 1);
}

#[test]
fn a_bad_approval_timeout_is_a_clap_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = agent(
        dir.path(),
        "http://127.0.0.1:9",
        &["--approval-timeout", "soon"],
        "Scale the fleet to 7",
    )
    .output()
    .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--approval-timeout") && stderr.contains("30s, 5m or 1h"),
        "{stderr}"
    );
}
