//! Helpers for tests that run real upstream MCP servers: the pinned npm servers
//! that scripts/upstream-harness.sh installs, and process checks for orphan tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proxi::upstream::config::{ResolvedUpstream, Secret, StdioTarget, Transport};
use rmcp::model::{CallToolResult, JsonObject};

/// Where scripts/upstream-harness.sh installs the servers.
pub fn harness() -> PathBuf {
    std::env::var_os("PROXI_UPSTREAM_HARNESS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/upstream-harness"))
}

/// A stdio target running the pinned server `package` with `args`, under plain `node`.
pub fn server(package: &str, args: &[&str]) -> StdioTarget {
    let entry = harness()
        .join("node_modules/@modelcontextprotocol")
        .join(package)
        .join("dist/index.js");
    assert!(
        entry.is_file(),
        "{} is missing: run scripts/upstream-harness.sh to install the pinned upstream MCP servers",
        entry.display()
    );
    let mut all_args = vec![Secret::new(entry.display().to_string())];
    all_args.extend(args.iter().map(|arg| Secret::new((*arg).to_owned())));
    StdioTarget {
        command: "node".into(),
        args: all_args,
        env: Default::default(),
        cwd: None,
    }
}

pub fn everything() -> StdioTarget {
    server("server-everything", &["stdio"])
}

pub fn arguments(value: serde_json::Value) -> Option<JsonObject> {
    match value {
        serde_json::Value::Object(map) => Some(map),
        other => panic!("arguments must be an object, not {other}"),
    }
}

pub fn text_of(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|block| block.as_text().map(|text| text.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `condition` (every 20 ms) until it returns `Some`, failing with `what` after `timeout`.
pub async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `pid` is a live process: it exists and is not a zombie. (A child killed
/// after its runtime is gone stays a zombie until its parent exits: it runs nothing.)
pub fn process_exists(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself hold spaces.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z' | 'X'))
}

pub fn kill_9(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -9 {pid} failed");
}

/// A free loopback port for a server that takes its port from the environment.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A declared-and-resolved stdio upstream, as the policy loader would give it.
pub fn resolved(
    name: &str,
    target: StdioTarget,
    required: bool,
    call_timeout: Duration,
) -> ResolvedUpstream {
    ResolvedUpstream {
        name: name.to_owned(),
        transport: Transport::Stdio(target),
        required,
        call_timeout,
    }
}

/// A stdio target that is not an MCP server: it exits at once.
pub fn not_an_mcp_server() -> StdioTarget {
    StdioTarget {
        command: "true".into(),
        args: vec![],
        env: Default::default(),
        cwd: None,
    }
}

/// Where scripts/mcp-harness.sh puts the Python venv with the official MCP SDK.
pub fn python() -> PathBuf {
    let venv = std::env::var_os("PROXI_MCP_HARNESS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/mcp-harness"));
    let python = venv.join("venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/mcp-harness.sh to install the MCP Python SDK the fixture upstream runs on",
        python.display()
    );
    python
}

/// tests/fixtures/fixture_upstream.py.
pub fn fixture_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fixture_upstream.py")
}

/// The fixture upstream over stdio, recording every call it receives in `call_log`.
pub fn fixture(call_log: &Path) -> StdioTarget {
    let mut env = std::collections::BTreeMap::new();
    env.insert(
        "FIXTURE_CALL_LOG".to_owned(),
        Secret::new(call_log.display().to_string()),
    );
    StdioTarget {
        command: python().display().to_string(),
        args: vec![Secret::new(fixture_script().display().to_string())],
        env,
        cwd: None,
    }
}

/// The lines the fixture recorded in `call_log` (none if it has no file yet).
pub fn fixture_calls(call_log: &Path) -> Vec<serde_json::Value> {
    match std::fs::read_to_string(call_log) {
        Ok(text) => text
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
            .collect(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => panic!("cannot read {}: {error}", call_log.display()),
    }
}

/// Waits (up to a minute) until the fixture has recorded `event` ("call" or
/// "cancelled") for its tool `tool` (the upstream's own name, without prefix).
pub async fn wait_for_fixture_call(call_log: &Path, tool: &str, event: &str) {
    eventually(
        &format!("the fixture to record {event} {tool}"),
        Duration::from_secs(60),
        || async {
            fixture_calls(call_log)
                .iter()
                .any(|call| call["tool"] == tool && call["event"] == event)
                .then_some(())
        },
    )
    .await
}

/// The process ids whose process group is `group` (walks /proc).
pub fn processes_in_group(group: u32) -> Vec<u32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After "pid (comm) ": state, ppid, pgrp, ...
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let state = fields.first().copied().unwrap_or("");
        if fields.get(2).and_then(|pgrp| pgrp.parse::<u32>().ok()) == Some(group)
            && state != "Z"
            && state != "X"
        {
            members.push(pid);
        }
    }
    members
}
