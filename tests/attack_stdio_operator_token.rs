//! Issue 8, item 5: under `proxi mcp` the agent could read the operator token.
//!
//! The agent's MCP client starts `proxi mcp` as the agent's own user, so the data dir
//! is the agent's to read. Before the fix `proxi mcp` generated both tokens into
//! `<data-dir>/tokens.json`; reading it and posting EMERGENCY worked. Now `proxi mcp`
//! never generates, stores or reads an operator token there: the operator supplies a
//! credential file outside the data dir, or the process has no operator endpoint and
//! never restores an elevated mode.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use common::{AGENT_TOKEN, Api, ServerProcess, policy_path, wait_until};
use proxi::server::ServerInfo;
use proxi::tokens::TokensFile;
use reqwest::StatusCode;
use serde_json::json;

/// A `proxi mcp` process whose stdin stays open (the MCP client) until dropped.
struct StdioProxi {
    child: Child,
    _stdin: ChildStdin,
    url: String,
}

impl Drop for StdioProxi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_stdio(data_dir: &Path, extra: &[&str], agent_token: Option<&str>) -> StdioProxi {
    let _ = std::fs::remove_file(data_dir.join(proxi::server::SERVER_FILE));
    let mut command = Command::new(env!("CARGO_BIN_EXE_proxi"));
    command
        .args(["mcp", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .arg("--policy")
        .arg(policy_path())
        .args(extra)
        .env_remove("PROXI_OPERATOR_TOKEN")
        .env_remove("PROXI_AGENT_TOKEN")
        .env_remove("PROXI_OPERATOR_CREDENTIAL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(token) = agent_token {
        command.env("PROXI_AGENT_TOKEN", token);
    }
    let mut child = command.spawn().expect("proxi mcp starts");
    let stdin = child.stdin.take().expect("piped stdin");
    let pid = child.id();
    let url = wait_until("server.json", Duration::from_secs(30), || {
        ServerInfo::read(data_dir)
            .filter(|info| info.pid == pid)
            .map(|info| info.url)
    });
    StdioProxi {
        child,
        _stdin: stdin,
        url,
    }
}

/// Every file in the data dir, as bytes, so a test can look for a secret in any of them.
fn data_dir_contents(data_dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    std::fs::read_dir(data_dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|entry| entry.path().is_file())
        .map(|entry| {
            (
                entry.path(),
                std::fs::read(entry.path()).unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn without_a_credential_the_data_dir_holds_no_operator_token_and_mode_changes_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let proxi = start_stdio(data.path(), &[], None);
    let stored = TokensFile::read(data.path()).unwrap();
    assert_eq!(
        stored.operator_token, None,
        "an operator token was written where the agent reads"
    );
    for (path, bytes) in data_dir_contents(data.path()) {
        assert!(
            !String::from_utf8_lossy(&bytes).contains("operator_token"),
            "{} mentions an operator token",
            path.display()
        );
    }
    // The agent's own token (which it may read) cannot change the mode.
    let agent = stored.agent_token.expect("the agent token is generated");
    let (status, body) = Api::new(&proxi.url)
        .post(
            "/policy/set-mode",
            Some(&agent),
            json!({"mode": "EMERGENCY", "reason": "self-promotion", "ttl_seconds": 600}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no operator endpoint"),
        "{body}"
    );
    let (_, status) = Api::new(&proxi.url)
        .get("/policy/status", Some(&agent))
        .await;
    assert_eq!(status["mode"], "NORMAL");
}

#[tokio::test]
async fn with_a_credential_outside_the_data_dir_the_operator_works_and_the_token_stays_out() {
    let data = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let credential = secrets.path().join("operator.json");
    let init = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["credential", "init"])
        .arg(&credential)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&credential).unwrap()).unwrap();
    let operator = file["operator_token"].as_str().unwrap().to_owned();
    assert!(
        !String::from_utf8_lossy(&init.stdout).contains(&operator),
        "the token is never printed"
    );

    let proxi = start_stdio(
        data.path(),
        &["--operator-credential", credential.to_str().unwrap()],
        Some(AGENT_TOKEN),
    );
    let api = Api::new(&proxi.url);
    let (status, body) = api
        .post(
            "/policy/set-mode",
            Some(&operator),
            json!({"mode": "EMERGENCY", "reason": "operator", "ttl_seconds": 600}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for (path, bytes) in data_dir_contents(data.path()) {
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&operator),
            "{} holds the operator token",
            path.display()
        );
    }

    // A credential inside the data dir is refused outright.
    drop(proxi);
    let inside = data.path().join("operator.json");
    std::fs::copy(&credential, &inside).unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["mcp", "--data-dir"])
        .arg(data.path())
        .arg("--policy")
        .arg(policy_path())
        .arg("--operator-credential")
        .arg(&inside)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("inside the data dir"));
}

#[tokio::test]
async fn without_a_credential_an_elevated_mode_in_the_trail_is_not_restored() {
    // The agent owns this data dir, key included, so it could forge a valid-looking
    // EMERGENCY record; here an honest one stands in for it.
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), &[]);
    Api::new(&server.url).emergency().await;
    server.kill();

    let proxi = start_stdio(data.path(), &[], Some(AGENT_TOKEN));
    let (_, status) = Api::new(&proxi.url)
        .get("/policy/status", Some(AGENT_TOKEN))
        .await;
    assert_eq!(status["mode"], "NORMAL", "{status}");
}
