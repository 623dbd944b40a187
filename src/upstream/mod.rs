//! Upstream MCP servers that Proxi governs: their declaration in the
//! policy file, the names their tools get, an rmcp client session with each, and a
//! supervisor that keeps a stdio upstream running.
//!
//! Nothing here decides or audits a call: [`crate::gateway::Gateway::execute_call`]
//! does, and hands allowed calls to the set through [`call::UpstreamCalls`];
//! [`attach`] starts the set for `serve` and `mcp`.

pub mod attach;
pub mod call;
pub mod client;
pub mod config;
pub mod names;
pub mod routing;
pub mod set;
pub mod supervisor;
