//! End to end: the real `proxi` binary runs `proxi agent --provider mock --json`
//! against `proxi serve` started as a child process on an ephemeral port.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use common::{AGENT_TOKEN, OPERATOR_TOKEN, ServerProcess};
use proxi::agent::RunRecord;
use proxi::agent::backend::Decision;
use proxi::reason::Reason;
/// Variables that would change which provider or server the agent picks.
const AMBIENT: [&str; 8] = [
    "GOOGLE_API_KEY",
    "GEMINI_API_KEY",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "OLLAMA_HOST",
    "PROXI_SERVER",
    "PROXI_AGENT_TOKEN",
];

fn proxi(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_proxi"));
    // The temp dir has no .env, so nothing leaks in from the developer's machine.
    command.current_dir(dir);
    for name in AMBIENT {
        command.env_remove(name);
    }
    command
}

/// `proxi serve` on `dir/data` as a child; killed when dropped.
fn serve(dir: &Path) -> ServerProcess {
    ServerProcess::start(&dir.join("data"), &["--durability", "process"])
}

fn agent(dir: &Path, url: &str, task: &str) -> Output {
    proxi(dir)
        .args([
            "agent",
            "--provider",
            "mock",
            "--json",
            "--server",
            url,
            task,
        ])
        .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
        .output()
        .expect("proxi agent runs")
}

fn record(output: &Output) -> RunRecord {
    assert!(
        output.status.success(),
        "proxi agent failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON run record")
}

#[test]
fn mock_agent_runs_through_a_served_proxi() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path());

    let output = agent(dir.path(), &served.url, "Restart the web server");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("provider: mock"), "{stderr}");
    let run = record(&output);
    assert_eq!(run.provider, "mock");
    assert_eq!(run.transport, "rest");
    let calls: Vec<_> = run.tool_calls().collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].tool, "restart_service");
    assert_eq!(calls[0].decision, Decision::Denied);
    assert_eq!(
        calls[0].reason_code.as_deref(),
        Some(Reason::BlockedInMode.as_str())
    );
    assert!(
        run.final_answer
            .starts_with("❌ I cannot restart the web server in NORMAL mode."),
        "{}",
        run.final_answer
    );
    // The raw JSON carries the documented fields.
    let raw: Value = serde_json::from_slice(&output.stdout).unwrap();
    for field in ["task", "steps", "final_answer", "outcome", "mode_at_start"] {
        assert!(raw.get(field).is_some(), "missing {field}");
    }

    // An operator declares an emergency; the same task is now allowed.
    let status = proxi(dir.path())
        .args([
            "mode",
            "set",
            "EMERGENCY",
            "--reason",
            "cli test",
            "--server",
        ])
        .arg(&served.url)
        .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let run = record(&agent(dir.path(), &served.url, "Restart the web server"));
    let calls: Vec<_> = run.tool_calls().collect();
    assert_eq!(calls[0].decision, Decision::Allowed);
    assert_eq!(calls[0].mode.as_deref(), Some("EMERGENCY"));
    assert!(run.final_answer.contains("✓ Restarting web-server..."));
}

#[test]
fn the_agent_explains_a_missing_token() {
    let dir = tempfile::tempdir().unwrap();
    let output = proxi(dir.path())
        .args([
            "agent",
            "--provider",
            "mock",
            "--server",
            "http://127.0.0.1:9",
            "hi",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("PROXI_AGENT_TOKEN"), "{stderr}");
}

#[test]
fn a_real_provider_without_its_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = proxi(dir.path())
        .args([
            "agent",
            "--provider",
            "anthropic",
            "--server",
            "http://127.0.0.1:9",
            "hi",
        ])
        .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ANTHROPIC_API_KEY is not set"), "{stderr}");
}

/// A reply that claims a restart no call performed is not a success: the run
/// record lists the claim and the exit code is 3. The model is replayed over the
/// OpenAI format and the model timeout is taken from the environment.
#[tokio::test]
async fn an_unverified_claim_exits_non_zero() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path());
    let llm = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "choices": [{"index": 0, "message": {"role": "assistant",
                "content": "✅ restart_service(web-server)"}, "finish_reason": "stop"}]
        })))
        .mount(&llm)
        .await;
    let output = tokio::process::Command::from(proxi(dir.path()))
        .args(["agent", "--provider", "openai", "--model", "qwen", "--json"])
        .arg("--base-url")
        .arg(format!("{}/v1", llm.uri()))
        .args(["--server", &served.url, "Restart the web server"])
        .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
        .env("PROXI_MODEL_TIMEOUT", "45")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("timeout 45 s"), "{stderr}");
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let run: RunRecord = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(run.unverified_claims, ["✅ restart_service(web-server)"]);
}
