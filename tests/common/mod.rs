//! Shared helpers for end-to-end tests: real servers on ephemeral loopback ports.
#![allow(dead_code)] // Each test binary uses a different subset.

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

pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789";
pub const AGENT_TOKEN: &str = "test-agent-token-0123456789";

/// The shipped policy file.
pub fn policy_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/ops_policy.json")
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
        let _ = std::fs::remove_file(data_dir.join(server::SERVER_FILE));
        let child = Command::new(env!("CARGO_BIN_EXE_proxi"))
            .arg("serve")
            .args(["--bind", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .arg("--policy")
            .arg(policy_path())
            .args(extra)
            .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the proxi binary starts");
        let pid = child.id();
        let url = wait_until("server.json", Duration::from_secs(30), || {
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
        let dir = tempfile::tempdir().expect("temp dir");
        let policy = PolicyEngine::load(&policy_path()).expect("policy loads");
        let gateway = Gateway::open(
            policy,
            GatewayConfig {
                data_dir: dir.path().to_owned(),
                durability: Durability::Process,
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
    pub async fn tool_calls(&self) -> Vec<AuditRecord> {
        let AuditPage { records, .. } = self.operator.audit(1000).await.expect("audit");
        records
            .into_iter()
            .filter(|record| record.kind == "tool_call")
            .collect()
    }
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
