//! Shared helpers for end-to-end tests: real servers on ephemeral loopback ports.
#![allow(dead_code)] // Each test binary uses a different subset.

pub mod approvals;
pub mod identities;
pub mod mcp_client;
pub mod mcp_harness;
pub mod postgres;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxi::api::{AuditPage, IncidentRequest, SetModeRequest};
use proxi::audit::{AuditRecord, Durability};
use proxi::client::ProxiClient;
use proxi::gateway::{Gateway, GatewayConfig};
use proxi::policy::PolicyEngine;
use proxi::server::{self, AppState, ServerInfo};
use proxi::tokens::Tokens;
use reqwest::StatusCode;
use serde_json::Value;

/// The operator token every test server started here accepts.
pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789";
/// The agent token every test server started here accepts.
pub const AGENT_TOKEN: &str = "test-agent-token-0123456789";

/// The shipped policy file.
pub fn policy_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/ops_policy.json")
}

/// The shipped policy with rate limits no test reaches, for tests that flood
/// the gateway on purpose (and the load scripts).
pub fn high_rate_limit_policy_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/high_rate_limits.json")
}

/// Polls `condition` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `proxi serve` child process on an ephemeral port.
pub struct ServerProcess {
    pub child: Child,
    pub url: String,
    pub data_dir: PathBuf,
}

impl ServerProcess {
    /// Starts `proxi serve` on `data_dir` and waits until it answers.
    pub fn start(data_dir: &Path, extra: &[&str]) -> ServerProcess {
        ServerProcess::start_with_policy(data_dir, &policy_path(), extra)
    }

    /// Starts `proxi serve` with `policy` on `data_dir` and waits until it answers.
    pub fn start_with_policy(data_dir: &Path, policy: &Path, extra: &[&str]) -> ServerProcess {
        // `extra` may name another policy.
        let policy = (!extra.contains(&"--policy")).then_some(policy);
        let mut command = ServerProcess::command(data_dir, policy);
        command.args(extra);
        ServerProcess::spawn(command, data_dir)
    }

    /// The `proxi serve` command the helpers start, for a caller to add flags to
    /// or redirect: an ephemeral loopback port, `data_dir`, `policy` (if given),
    /// the test tokens, `warn` logs, stdout discarded and stderr piped.
    pub fn command(data_dir: &Path, policy: Option<&Path>) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_proxi"));
        command
            .arg("serve")
            .args(["--bind", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir);
        if let Some(policy) = policy {
            command.arg("--policy").arg(policy);
        }
        command
            .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// Spawns `command` (a `proxi serve` on `data_dir`, set up by the caller) and
    /// waits until this child has written `server.json`; fails at once with its
    /// exit status if it stops first.
    pub fn spawn(mut command: Command, data_dir: &Path) -> ServerProcess {
        let _ = std::fs::remove_file(data_dir.join(server::SERVER_FILE));
        let mut child = command.spawn().expect("the proxi binary starts");
        let pid = child.id();
        let url = wait_until("server.json", Duration::from_secs(60), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("proxi serve exited before it listened: {status}");
            }
            ServerInfo::read(data_dir)
                .filter(|info| info.pid == pid)
                .map(|info| info.url)
        });
        ServerProcess {
            child,
            url,
            data_dir: data_dir.to_owned(),
        }
    }

    /// SIGTERM, as an operator stops the server, and waits until it has exited.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("the kill command runs");
        assert!(sent.success(), "SIGTERM was not delivered");
        wait_until("the server to exit", Duration::from_secs(30), || {
            self.child.try_wait().expect("the child can be waited for")
        })
    }

    /// SIGKILL, as in a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw HTTP client that returns status and JSON body, for asserting exact API behaviour.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(url: &str) -> Api {
        proxi::tls::install_crypto_provider();
        Api {
            url: url.to_owned(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client builds"),
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut request = self.http.get(format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        decode(request.send().await.expect("request is sent")).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut request = self.http.post(format!("{}{path}", self.url)).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        decode(request.send().await.expect("request is sent")).await
    }

    pub async fn execute(&self, tool: &str, arguments: Value) -> (StatusCode, Value) {
        self.post(
            "/tools/execute",
            Some(AGENT_TOKEN),
            serde_json::json!({"tool_name": tool, "arguments": arguments}),
        )
        .await
    }

    pub async fn set_mode(
        &self,
        mode: &str,
        reason: Option<&str>,
        ttl: Option<u64>,
    ) -> (StatusCode, Value) {
        let mut body = serde_json::json!({"mode": mode});
        if let Some(reason) = reason {
            body["reason"] = reason.into();
        }
        if let Some(ttl) = ttl {
            body["ttl_seconds"] = ttl.into();
        }
        self.post("/policy/set-mode", Some(OPERATOR_TOKEN), body)
            .await
    }

    pub async fn emergency(&self) {
        let (status, body) = self
            .set_mode("EMERGENCY", Some("test incident"), Some(600))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    pub async fn normal(&self) {
        let (status, body) = self.set_mode("NORMAL", None, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    pub async fn audit(&self, limit: u32) -> Vec<Value> {
        let (status, body) = self
            .get(&format!("/audit?limit={limit}"), Some(OPERATOR_TOKEN))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["records"].as_array().expect("records").clone()
    }
}

async fn decode(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("body is read");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// A Proxi server on an ephemeral loopback port with its own data dir.
pub struct TestServer {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// A client holding the operator token.
    pub operator: ProxiClient,
    /// A client holding the agent token.
    pub agent: ProxiClient,
    gateway: Arc<Gateway>,
    _dir: tempfile::TempDir,
    handle: tokio::task::JoinHandle<Result<(), proxi::server::ServerError>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl TestServer {
    /// Starts a server with the repository's policy.
    pub async fn start() -> TestServer {
        TestServer::start_with_policy(&policy_path()).await
    }

    /// Starts a server with the policy file at `path`.
    pub async fn start_with_policy(path: &Path) -> TestServer {
        TestServer::start_with_engine(PolicyEngine::load(path).expect("policy loads")).await
    }

    /// Starts a server with an engine already bound (e.g. to upstream tools).
    pub async fn start_with_engine(policy: PolicyEngine) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let gateway = Gateway::open(
            policy,
            GatewayConfig {
                data_dir: dir.path().to_owned(),
                durability: Durability::Process,
                audit_reserve_bytes: None,
            },
        )
        .await
        .expect("gateway opens");
        let state = AppState {
            gateway: gateway.clone(),
            tokens: Arc::new(Tokens::new(OPERATOR_TOKEN, AGENT_TOKEN)),
        };
        let (address, handle) = server::spawn(state, "127.0.0.1:0".parse().expect("address"))
            .await
            .expect("server starts");
        let url = format!("http://{address}");
        TestServer {
            operator: ProxiClient::new(&url, Some(OPERATOR_TOKEN.to_owned())).expect("client"),
            agent: ProxiClient::new(&url, Some(AGENT_TOKEN.to_owned())).expect("client"),
            url,
            gateway,
            _dir: dir,
            handle,
        }
    }

    /// A raw client for asserting exact HTTP behaviour.
    pub fn api(&self) -> Api {
        Api::new(&self.url)
    }

    /// The gateway behind the server.
    pub fn gateway(&self) -> Arc<Gateway> {
        self.gateway.clone()
    }

    /// The server's data dir (audit database, tokens).
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Switches to EMERGENCY (operator).
    pub async fn emergency(&self) {
        self.operator
            .set_mode(&SetModeRequest {
                mode: "EMERGENCY".to_owned(),
                reason: Some("test incident".to_owned()),
                ttl_seconds: None,
            })
            .await
            .expect("mode change");
    }

    /// Breaks a service (operator).
    pub async fn incident(&self, service: &str, status: &str) {
        self.operator
            .simulate_incident(&IncidentRequest {
                service: service.to_owned(),
                status: status.to_owned(),
            })
            .await
            .expect("incident");
    }

    /// Every tool-call record in the audit trail, oldest first.
    pub async fn tool_calls(&self) -> Vec<proxi::api::AuditRecord> {
        let AuditPage { records, .. } = self.operator.audit(1000).await.expect("audit");
        records
            .into_iter()
            .filter(|record| record.kind == "tool_call")
            .collect()
    }
}

/// The newest (up to 1000) audit records of a data dir, oldest first, read from the database.
pub fn audit_records(data_dir: &Path) -> Vec<AuditRecord> {
    proxi::audit::read_recent(&data_dir.join(proxi::audit::AUDIT_DB_FILE), 1000)
        .expect("the audit trail is readable")
}

/// Resident memory of a process in MiB, from /proc.
pub fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in proc status");
    kib / 1024
}

/// Raw JSON-RPC over `/mcp` with `token`: the status, the session id header and the body.
pub async fn mcp_post(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    session: Option<&str>,
    body: Value,
) -> (StatusCode, Option<String>, String) {
    let mut request = http
        .post(format!("{url}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18")
        .bearer_auth(token)
        .json(&body);
    if let Some(session) = session {
        request = request.header("mcp-session-id", session);
    }
    let response = request.send().await.expect("request is sent");
    let status = response.status();
    let session = response
        .headers()
        .get("mcp-session-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.expect("body is read");
    (status, session, text)
}

/// An MCP `initialize` request body.
pub fn mcp_initialize_body(client: &str) -> Value {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": client, "version": "1.0"}
        }
    })
}

/// `proxi mcp` as an MCP client launches it: JSON-RPC lines on stdin and stdout.
pub struct McpStdio {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    next_id: u64,
}

impl McpStdio {
    /// Starts `proxi mcp` on `data_dir` with `policy` and completes `initialize`
    /// under `client_name`.
    pub fn start(data_dir: &Path, policy: &Path, client_name: &str) -> McpStdio {
        let mut child = Command::new(env!("CARGO_BIN_EXE_proxi"))
            .arg("mcp")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--policy")
            .arg(policy)
            .args(["--durability", "process"])
            .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("proxi mcp starts");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let Ok(line) = line else { return };
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        let mut client = McpStdio {
            stdin: child.stdin.take(),
            child,
            lines,
            next_id: 1,
        };
        let initialized = client.request(
            "initialize",
            serde_json::json!({
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": client_name, "version": "1.0"}
            }),
        );
        assert!(initialized.get("result").is_some(), "{initialized}");
        client.send(&serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        client
    }

    fn send(&mut self, message: &Value) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{message}").expect("write to proxi mcp");
        stdin.flush().expect("flush");
    }

    /// Sends a request and returns its response (notifications in between are skipped).
    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(
            &serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        );
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .expect("proxi mcp answers within 30 s");
            let message: Value = serde_json::from_str(&line).expect("stdout carries JSON-RPC only");
            if message["id"] == id {
                return message;
            }
        }
    }

    /// `tools/call`; returns the result object.
    pub fn call_tool(&mut self, name: &str, arguments: Value) -> Value {
        let response = self.request(
            "tools/call",
            serde_json::json!({"name": name, "arguments": arguments}),
        );
        response
            .get("result")
            .cloned()
            .unwrap_or_else(|| panic!("tools/call failed: {response}"))
    }

    /// Closes stdin and waits for `proxi mcp` to exit.
    pub fn close(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().expect("wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "proxi mcp exits when stdin closes"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for McpStdio {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `text` as a policy file in `dir` and returns its path.
pub fn write_policy(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the policy file");
    path
}

/// The shipped policy with its `rate_limits` replaced by `rules`.
pub fn shipped_policy_with_rate_limits(rules: Value) -> String {
    let text = std::fs::read_to_string(policy_path()).expect("read the shipped policy");
    let mut policy: Value = serde_json::from_str(&text).expect("the shipped policy is JSON");
    policy["rate_limits"] = rules;
    policy.to_string()
}

/// Writes an operator credential file (mode 0600) holding `operator_token` and a
/// fixed audit key derived from `key_seed`, in `dir` (which must be outside any data dir).
pub fn write_credential(dir: &Path, operator_token: &str, key_seed: u8) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("operator-{key_seed}.json"));
    let body = serde_json::json!({
        "operator_token": operator_token,
        "audit_key": hex::encode([key_seed; 32]),
    });
    std::fs::write(&path, body.to_string()).expect("credential written");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// Waits (bounded) for a child that is expected to exit by itself, and collects its output.
pub fn wait_for_exit(mut child: Child, timeout: Duration) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("child status").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("child output")
}

/// A wiremock responder that answers each request with the next prepared JSON
/// body and repeats the last one: a model replaying recorded turns.
pub struct Replay(std::sync::Mutex<std::collections::VecDeque<Value>>);

impl Replay {
    /// Replays `bodies` in order.
    pub fn new(bodies: Vec<Value>) -> Replay {
        Replay(std::sync::Mutex::new(bodies.into()))
    }
}

impl wiremock::Respond for Replay {
    fn respond(&self, _request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let mut bodies = self.0.lock().unwrap_or_else(|error| error.into_inner());
        let body = if bodies.len() > 1 {
            bodies.pop_front()
        } else {
            bodies.front().cloned()
        };
        wiremock::ResponseTemplate::new(200).set_body_json(body.unwrap_or(Value::Null))
    }
}
