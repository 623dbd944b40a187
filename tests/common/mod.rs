//! Shared set-up for the agent's integration tests: a real in-process Proxi server.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use proxi::api::{AuditPage, IncidentRequest, SetModeRequest};
use proxi::audit::{AuditRecord, Durability};
use proxi::client::ProxiClient;
use proxi::gateway::{Gateway, GatewayConfig};
use proxi::policy::PolicyEngine;
use proxi::server::{self, AppState};
use proxi::tokens::Tokens;

/// Operator token of test servers.
pub const OPERATOR_TOKEN: &str = "operator-token-for-tests-0123456789";
/// Agent token of test servers.
pub const AGENT_TOKEN: &str = "agent-token-for-tests-0123456789";

/// The repository's policy file.
pub fn policy_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies/ops_policy.json")
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
