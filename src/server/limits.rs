//! Bounds on what clients can hold at the network edge: connections, header
//! reads, MCP sessions, and how refusals are summarised in the audit trail.
//!
//! The defaults keep a server under a flood of sessions and connections within
//! 256 MB: a legacy MCP session costs about 134 KB, so 256 sessions are ~35 MB.

use std::num::NonZeroU32;
use std::time::Duration;

/// Every edge limit of one server; `serve` flags set them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeLimits {
    /// Open TCP connections at most. At the cap, the connection that has been
    /// idle longest (no request in progress, e.g. still sending its headers) is
    /// closed to make room, so a prompt client always gets through.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers; it also bounds how
    /// long an idle keep-alive connection waits for its next request.
    pub header_timeout: Duration,
    /// Legacy (`initialize`) MCP sessions open at most, all principals together.
    pub max_sessions: usize,
    /// Legacy MCP sessions one principal (token) may hold at once.
    pub max_sessions_per_principal: usize,
    /// A session with no traffic for this long is closed.
    pub session_idle_timeout: Duration,
    /// Sessions one principal may open per minute, sustained.
    pub sessions_per_minute: NonZeroU32,
    /// Sessions one principal may open in a burst above the sustained rate.
    pub session_burst: NonZeroU32,
    /// Refusals of one source within this window share one audit record.
    pub refusal_window: Duration,
    /// Sources whose refusals are counted separately; the rest share one bucket.
    pub max_refusal_sources: usize,
}

impl Default for EdgeLimits {
    fn default() -> EdgeLimits {
        EdgeLimits {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            max_sessions: 256,
            max_sessions_per_principal: 128,
            session_idle_timeout: Duration::from_secs(60),
            sessions_per_minute: NonZeroU32::new(120).unwrap_or(NonZeroU32::MIN),
            session_burst: NonZeroU32::new(30).unwrap_or(NonZeroU32::MIN),
            refusal_window: Duration::from_secs(60),
            max_refusal_sources: 1024,
        }
    }
}
