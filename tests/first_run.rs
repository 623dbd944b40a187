//! What a new user meets first: `proxi init`, the built-in policy outside the
//! repository, and `proxi policy explain` (with and without `--args`), which must
//! decide exactly as the running gateway does.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{AGENT_TOKEN, Api, OPERATOR_TOKEN, TestServer, wait_until};
use proxi::reason::Reason;
use proxi::server::ServerInfo;
use serde_json::{Value, json};

/// Runs the binary in `dir`, with no token or server from the environment.
fn proxi_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(args)
        .current_dir(dir)
        .env_remove("PROXI_OPERATOR_TOKEN")
        .env_remove("PROXI_AGENT_TOKEN")
        .env_remove("PROXI_SERVER")
        .env_remove("RUST_LOG")
        .output()
        .expect("proxi runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn init_writes_the_starter_files_and_never_overwrites_them() {
    let dir = tempfile::tempdir().unwrap();
    let output = proxi_in(dir.path(), &["init", "site"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("site/policies/ops_policy.json") && stdout.contains("starter policy"),
        "{stdout}"
    );
    assert!(
        stdout.contains("site/policies/upstreams.example.json")
            && stdout.contains("does not forward calls to upstreams yet"),
        "{stdout}"
    );
    let site = dir.path().join("site");
    let example: Value = serde_json::from_str(
        &std::fs::read_to_string(site.join("policies/upstreams.example.json")).unwrap(),
    )
    .unwrap();
    assert!(example["upstreams"].is_object(), "{example}");

    // In the new directory, the starter policy is the one commands pick up.
    let output = proxi_in(&site, &["policy", "check"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("policies/ops_policy.json: valid"),
        "{}",
        text(&output.stdout)
    );

    // A second run refuses, names the file, and leaves the user's edit alone.
    let starter = site.join("policies/ops_policy.json");
    std::fs::write(&starter, "{\"edited\": true}").unwrap();
    let output = proxi_in(dir.path(), &["init", "site"]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("ops_policy.json already exists") && stderr.contains("never overwrites"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&starter).unwrap(),
        "{\"edited\": true}"
    );
}

#[test]
fn serve_outside_the_repository_uses_the_built_in_policy_and_says_so() {
    let cwd = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["serve", "--bind", "127.0.0.1:0", "--durability", "process"])
        .arg("--data-dir")
        .arg(data.path())
        .current_dir(cwd.path())
        .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let started = wait_until("server.json", Duration::from_secs(60), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "proxi serve exited ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        ServerInfo::read(data.path()).filter(|info| info.pid == pid)
    });
    // The banner is written before server.json.
    let banner = std::fs::read_to_string(&log).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(banner.contains("policy:    built-in default"), "{banner}");
    assert!(banner.contains(&started.url), "{banner}");

    // Every other command that takes --policy falls back the same way.
    let output = proxi_in(cwd.path(), &["policy", "check"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).starts_with("built-in default: valid"));
    let output = proxi_in(
        cwd.path(),
        &["policy", "explain", "list_services", "--mode", "NORMAL"],
    );
    assert!(output.status.success(), "{}", text(&output.stdout));
    // A named file is never silently replaced by the built-in policy.
    let output = proxi_in(cwd.path(), &["policy", "check", "missing.json"]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("missing.json: cannot read the policy file"));
}

#[test]
fn explain_without_arguments_describes_the_tool_in_the_mode() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let explain = |tool: &str, mode: &str| {
        let output = proxi_in(repo, &["policy", "explain", tool, "--mode", mode]);
        (output.status.code(), text(&output.stdout))
    };

    let (code, out) = explain("restart_service", "NORMAL");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.starts_with("DENIED  restart_service in NORMAL mode")
            && out.contains("reason: blocked_in_mode")
            && out.contains("declare EMERGENCY")
            && out.contains("whatever the arguments"),
        "{out}"
    );
    assert!(!out.contains(Reason::InvalidArguments.as_str()), "{out}");

    let (code, out) = explain("scale_fleet", "EMERGENCY");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("ALLOWED  scale_fleet in EMERGENCY mode")
            && out.contains("`count` must be between 1 and 10"),
        "{out}"
    );

    let (code, out) = explain("restart_service", "EMERGENCY");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("constraints: none in EMERGENCY mode"), "{out}");

    let (code, out) = explain("delete_database", "EMERGENCY");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("reason: always_blocked"), "{out}");

    let (code, out) = explain("summon_root", "NORMAL");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.starts_with("REJECTED  summon_root") && out.contains("reason: unknown_tool"),
        "{out}"
    );
}

/// `explain`'s verdict (ALLOWED, DENIED, REJECTED) and reason code for one call.
fn explained(mode: &str, tool: &str, arguments: &Value) -> (String, Option<String>) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = proxi_in(
        repo,
        &[
            "policy",
            "explain",
            tool,
            "--mode",
            mode,
            "--args",
            &arguments.to_string(),
        ],
    );
    let out = text(&output.stdout);
    let verdict = out.split_whitespace().next().unwrap_or_default().to_owned();
    let reason = out
        .lines()
        .find_map(|line| line.trim().strip_prefix("reason: "))
        .map(str::to_owned);
    (verdict, reason)
}

#[tokio::test]
async fn explain_decides_every_call_as_the_gateway_records_it() {
    let server = TestServer::start().await;
    let api: Api = server.api();
    let calls = [
        ("list_services", json!({})),
        ("get_service_status", json!({"service_name": "web-server"})),
        ("get_service_status", json!({})),
        ("restart_service", json!({"service_name": "web-server"})),
        // Wrong arguments for a tool the mode forbids: the tool rules decide.
        ("restart_service", json!({})),
        ("scale_fleet", json!({"count": -1})),
        ("scale_fleet", json!({"count": 5})),
        ("scale_fleet", json!({"count": 50})),
        ("delete_database", json!({"db_name": "database"})),
        ("delete_database", json!({"oops": true})),
        ("summon_root", json!({})),
    ];
    for mode in ["NORMAL", "EMERGENCY"] {
        if mode == "EMERGENCY" {
            api.emergency().await;
        }
        for (tool, arguments) in &calls {
            let (status, body) = api.execute(tool, arguments.clone()).await;
            let record = api.audit(1).await.pop().expect("the call was audited");
            assert_eq!(record["tool"], *tool, "{body}");
            let (verdict, reason) = explained(mode, tool, arguments);
            let expected = match record["decision"].as_str() {
                Some("allowed") => "ALLOWED",
                Some("denied") => "DENIED",
                Some("rejected") => "REJECTED",
                other => panic!("unexpected decision {other:?}"),
            };
            assert_eq!(
                verdict, expected,
                "{mode} {tool} {arguments}: gateway answered {status} {body}, audited {record}"
            );
            // A tool that ran and failed has a tool error code, which explain cannot know.
            if record["outcome"] != "failed" {
                assert_eq!(
                    reason.as_deref(),
                    record["reason_code"].as_str(),
                    "{mode} {tool} {arguments}: audited {record}"
                );
            }
        }
    }
}
