//! Proxi: a policy guard between an AI agent and the infrastructure it operates.
//!
//! Every tool call passes [`gateway::Gateway::execute`]: arguments are checked
//! against the tool's schema, the [`policy::PolicyEngine`] decides under the
//! current mode, the simulated cloud runs the call, and the
//! [`audit::AuditLog`] records it before anyone hears the answer.

#![warn(missing_docs)]

pub mod agent;
pub mod anchor;
pub mod answer;
pub mod api;
pub mod approval;
pub mod audit;
pub mod audit_view;
pub mod canonical;
pub mod catalog;
pub mod client;
pub mod credential;
pub mod decision;
pub mod demo;
pub mod gateway;
pub mod guards;
pub mod identities;
pub mod infra;
pub mod mcp;
pub mod metrics;
pub mod mode;
pub mod policy;
pub mod policy_diff;
pub mod policy_source;
pub mod policy_watch;
mod postgres_pool;
pub mod principal;
pub mod rate_limit;
pub mod reason;
pub mod replay;
pub mod server;
pub mod starter;
pub mod text;
pub mod tls;
pub mod tokens;
pub mod tools;
pub mod upstream;
