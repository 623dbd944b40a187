//! Running one task against a Proxi server: the set-up `proxi agent` and
//! `proxi demo` share (open the transport, build the agent, run, close).

use std::fmt;

use super::backend::{BackendError, McpBackend, RestBackend, ToolBackend};
use super::provider::LlmProvider;
use super::{Agent, AgentConfig, AgentError, AgentFailure, AgentObserver, RunRecord};
use crate::client::ProxiClient;

/// How the agent's tool calls reach the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `POST /tools/execute`.
    Rest,
    /// MCP over Streamable HTTP at `/mcp`.
    Mcp,
}

impl Transport {
    /// `rest` or `mcp`, as run records name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Rest => "rest",
            Transport::Mcp => "mcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where and as whom the agent works.
#[derive(Clone, Debug)]
pub struct ServerConnection {
    /// The server's base URL.
    pub url: String,
    /// The agent's bearer token.
    pub token: Option<String>,
    /// REST or MCP.
    pub transport: Transport,
}

/// Runs `task` on the server: opens the transport, runs the agent with `config`
/// and `observer`, and closes an MCP session afterwards. A transport that cannot
/// be opened is a failure with an empty record, like any other backend failure.
pub async fn run_task(
    provider: &dyn LlmProvider,
    server: &ServerConnection,
    config: AgentConfig,
    observer: Option<&dyn AgentObserver>,
    task: &str,
) -> Result<RunRecord, AgentFailure> {
    let failed = |error: BackendError| {
        AgentFailure::new(
            AgentError::Backend(error),
            RunRecord::new(task, provider, server.transport.as_str()),
        )
    };
    match server.transport {
        Transport::Rest => {
            let client = ProxiClient::new(&server.url, server.token.clone())
                .map_err(|error| failed(error.into()))?;
            let backend = RestBackend::new(client);
            agent(provider, &backend, config, observer).run(task).await
        }
        Transport::Mcp => {
            let backend = McpBackend::connect(&server.url, server.token.clone())
                .await
                .map_err(failed)?;
            let result = agent(provider, &backend, config, observer).run(task).await;
            backend.close().await;
            result
        }
    }
}

fn agent<'a>(
    provider: &'a dyn LlmProvider,
    backend: &'a dyn ToolBackend,
    config: AgentConfig,
    observer: Option<&'a dyn AgentObserver>,
) -> Agent<'a> {
    let agent = Agent::new(provider, backend).with_config(config);
    match observer {
        Some(observer) => agent.with_observer(observer),
        None => agent,
    }
}
