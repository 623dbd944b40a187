//! `proxi mcp`: the MCP server on stdin/stdout.
//!
//! Stdout carries protocol messages only; Proxi's logs go to stderr.

use std::sync::Arc;

use rmcp::ServiceExt;
use rmcp::service::ServerInitializeError;
use tokio_util::sync::CancellationToken;

use super::{McpShared, Transport};
use crate::gateway::Gateway;

/// Why serving MCP over stdio failed.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The handshake (or the first message) failed.
    #[error("MCP over stdio could not start: {0}")]
    Start(Box<ServerInitializeError>),
    /// The session task ended abnormally.
    #[error("the MCP stdio session failed: {0}")]
    Session(#[from] tokio::task::JoinError),
}

/// Serves one MCP client on stdin/stdout until it closes stdin or `shutdown` fires.
pub async fn serve(gateway: Arc<Gateway>, shutdown: CancellationToken) -> Result<(), StdioError> {
    let handler = McpShared::new(gateway).handler(Transport::Stdio);
    let running = match handler
        .serve_with_ct(rmcp::transport::stdio(), shutdown)
        .await
    {
        Ok(running) => running,
        // A client that leaves before initializing is a normal end, not a failure.
        Err(ServerInitializeError::ConnectionClosed(_) | ServerInitializeError::Cancelled) => {
            return Ok(());
        }
        Err(error) => return Err(StdioError::Start(Box::new(error))),
    };
    running.waiting().await?;
    Ok(())
}
