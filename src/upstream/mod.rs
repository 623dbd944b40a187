//! Upstream MCP servers that Proxi governs (issue 10): their declaration in the
//! policy file, the names their tools get, an rmcp client session with each, and a
//! supervisor that keeps a stdio upstream running.
//!
//! Not yet wired into [`crate::gateway::Gateway::execute`]; nothing here decides or
//! audits a call.

pub mod call;
pub mod client;
pub mod config;
pub mod names;
pub mod routing;
pub mod set;
pub mod supervisor;
