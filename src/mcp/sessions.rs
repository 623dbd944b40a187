//! Legacy MCP sessions, bounded and bound to the token that opened them.
//!
//! rmcp's [`LocalSessionManager`] keeps every session until it idles out and
//! knows nothing about who opened it. [`SessionRegistry`] adds what Proxi needs:
//! - a cap on sessions per principal and in total, and a per-principal rate of
//!   session creation (governor), checked by the `/mcp` guard *before* rmcp
//!   builds a session, so a refusal is a clear 429/503 and costs nothing;
//! - the owner of each session: the guard binds a new session id to the
//!   principal whose token opened it, and refuses that id to any other token.
//!
//! [`BoundSessions`] wraps the local manager so that every way a session ends
//! (DELETE, idle timeout, shutdown) frees its slot: rmcp calls `close_session`
//! when a session's worker stops, whatever the reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::http::StatusCode;
use futures::Stream;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError,
};
use rmcp::transport::streamable_http_server::session::{
    ServerSseMessage, SessionId, SessionManager,
};

use crate::reason::Reason;
use crate::server::limits::EdgeLimits;

/// Why a new session was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionRefusal {
    /// The principal opens sessions faster than its rate allows.
    RateLimited,
    /// The principal already holds its maximum number of sessions.
    PrincipalCap(usize),
    /// The server holds its maximum number of sessions.
    TotalCap(usize),
}

impl SessionRefusal {
    /// 429 for what the caller can fix by slowing down or closing sessions, 503 for the server's cap.
    pub fn status(self) -> StatusCode {
        match self {
            SessionRefusal::RateLimited | SessionRefusal::PrincipalCap(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            SessionRefusal::TotalCap(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The audit record's reason code.
    pub fn reason_code(self) -> Reason {
        match self {
            SessionRefusal::RateLimited => Reason::SessionRateLimited,
            SessionRefusal::PrincipalCap(_) => Reason::SessionLimitPrincipal,
            SessionRefusal::TotalCap(_) => Reason::SessionLimitTotal,
        }
    }

    /// What the client is told.
    pub fn message(self) -> String {
        match self {
            SessionRefusal::RateLimited => {
                "MCP sessions are being opened too fast for this token; retry later".to_owned()
            }
            SessionRefusal::PrincipalCap(max) => format!(
                "this token already holds {max} MCP sessions, the most allowed; \
                 reuse one or end one with DELETE /mcp"
            ),
            SessionRefusal::TotalCap(max) => {
                format!("the server holds {max} MCP sessions, the most it allows; retry later")
            }
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    owners: HashMap<SessionId, Arc<str>>,
    /// Sessions (bound or being created) per principal.
    held: HashMap<Arc<str>, usize>,
    total: usize,
}

impl Counts {
    fn release(&mut self, owner: &Arc<str>) {
        self.total = self.total.saturating_sub(1);
        if let Some(held) = self.held.get_mut(owner) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.held.remove(owner);
            }
        }
    }
}

/// Who owns which session, and how many each principal holds.
pub struct SessionRegistry {
    max_total: usize,
    max_per_principal: usize,
    creation: DefaultKeyedRateLimiter<Arc<str>>,
    counts: Mutex<Counts>,
}

impl std::fmt::Debug for SessionRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRegistry")
            .field("max_total", &self.max_total)
            .field("max_per_principal", &self.max_per_principal)
            .finish_non_exhaustive()
    }
}

impl SessionRegistry {
    /// A registry enforcing the session limits of `limits`.
    pub fn new(limits: &EdgeLimits) -> Arc<SessionRegistry> {
        let quota = Quota::per_minute(limits.sessions_per_minute).allow_burst(limits.session_burst);
        Arc::new(SessionRegistry {
            max_total: limits.max_sessions,
            max_per_principal: limits.max_sessions_per_principal,
            creation: RateLimiter::keyed(quota),
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot for a session `owner` is about to open, or says why not.
    /// Caps are checked before the rate, so a refused request spends no rate.
    pub fn reserve(self: &Arc<Self>, owner: &Arc<str>) -> Result<Reservation, SessionRefusal> {
        let mut counts = self.counts();
        if counts.total >= self.max_total {
            return Err(SessionRefusal::TotalCap(self.max_total));
        }
        if counts.held.get(owner).copied().unwrap_or(0) >= self.max_per_principal {
            return Err(SessionRefusal::PrincipalCap(self.max_per_principal));
        }
        if self.creation.check_key(owner).is_err() {
            return Err(SessionRefusal::RateLimited);
        }
        counts.total += 1;
        *counts.held.entry(owner.clone()).or_default() += 1;
        Ok(Reservation {
            registry: self.clone(),
            owner: Some(owner.clone()),
        })
    }

    /// The principal that opened session `id`, if it is open.
    pub fn owner(&self, id: &str) -> Option<Arc<str>> {
        self.counts().owners.get(id).cloned()
    }

    /// Frees the slot of session `id`; a second call for the same id does nothing.
    pub fn release(&self, id: &str) {
        let mut counts = self.counts();
        if let Some(owner) = counts.owners.remove(id) {
            counts.release(&owner);
        }
    }

    /// Sessions open or being opened, all principals together.
    pub fn total(&self) -> usize {
        self.counts().total
    }
}

/// A slot taken for a session being created; freed on drop unless bound to an id.
#[derive(Debug)]
pub struct Reservation {
    registry: Arc<SessionRegistry>,
    owner: Option<Arc<str>>,
}

impl Reservation {
    /// The session came into being as `id`: it now belongs to the reserving principal.
    pub fn bind(mut self, id: SessionId) {
        if let Some(owner) = self.owner.take() {
            self.registry.counts().owners.insert(id, owner);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            self.registry.counts().release(&owner);
        }
    }
}

/// rmcp's local session manager, with a shorter idle timeout, that frees each
/// session's slot in the [`SessionRegistry`] when the session ends.
#[derive(Debug)]
pub struct BoundSessions {
    inner: LocalSessionManager,
    registry: Arc<SessionRegistry>,
}

impl BoundSessions {
    /// Sessions that close after `idle_timeout` without traffic.
    pub fn new(registry: Arc<SessionRegistry>, idle_timeout: Duration) -> BoundSessions {
        let mut inner = LocalSessionManager::default();
        inner.session_config.keep_alive = Some(idle_timeout);
        // A session that never completes its handshake is dropped just as soon.
        inner.session_config.init_timeout = Some(idle_timeout);
        BoundSessions { inner, registry }
    }
}

type Local = LocalSessionManager;

impl SessionManager for BoundSessions {
    type Error = LocalSessionManagerError;
    type Transport = <Local as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        <Local as SessionManager>::create_session(&self.inner).await
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        <Local as SessionManager>::initialize_session(&self.inner, id, message).await
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        <Local as SessionManager>::has_session(&self.inner, id).await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        self.registry.release(id);
        <Local as SessionManager>::close_session(&self.inner, id).await
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        <Local as SessionManager>::create_stream(&self.inner, id, message).await
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        <Local as SessionManager>::accept_message(&self.inner, id, message).await
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        <Local as SessionManager>::create_standalone_stream(&self.inner, id).await
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        <Local as SessionManager>::resume(&self.inner, id, last_event_id).await
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn registry(total: usize, per_principal: usize, burst: u32) -> Arc<SessionRegistry> {
        SessionRegistry::new(&EdgeLimits {
            max_sessions: total,
            max_sessions_per_principal: per_principal,
            session_burst: NonZeroU32::new(burst).expect("nonzero"),
            sessions_per_minute: NonZeroU32::MIN,
            ..EdgeLimits::default()
        })
    }

    #[test]
    fn caps_hold_per_principal_and_in_total() {
        let registry = registry(3, 2, 100);
        let agent: Arc<str> = Arc::from("agent");
        let operator: Arc<str> = Arc::from("operator");
        registry
            .reserve(&agent)
            .expect("first")
            .bind(Arc::from("a1"));
        registry
            .reserve(&agent)
            .expect("second")
            .bind(Arc::from("a2"));
        assert_eq!(
            registry.reserve(&agent).err(),
            Some(SessionRefusal::PrincipalCap(2))
        );
        registry
            .reserve(&operator)
            .expect("third")
            .bind(Arc::from("o1"));
        assert_eq!(
            registry.reserve(&operator).err(),
            Some(SessionRefusal::TotalCap(3))
        );
        assert_eq!(registry.owner("a1").as_deref(), Some("agent"));
        registry.release("a1");
        registry.release("a1");
        assert_eq!(registry.total(), 2);
        assert!(registry.reserve(&agent).is_ok());
    }

    #[test]
    fn an_unbound_reservation_frees_its_slot() {
        let registry = registry(1, 1, 100);
        let agent: Arc<str> = Arc::from("agent");
        drop(registry.reserve(&agent).expect("slot"));
        assert_eq!(registry.total(), 0);
        assert!(registry.reserve(&agent).is_ok());
    }

    #[test]
    fn creation_is_rate_limited_per_principal() {
        let registry = registry(100, 100, 2);
        let agent: Arc<str> = Arc::from("agent");
        let operator: Arc<str> = Arc::from("operator");
        registry.reserve(&agent).expect("1").bind(Arc::from("a1"));
        registry.reserve(&agent).expect("2").bind(Arc::from("a2"));
        assert_eq!(
            registry.reserve(&agent).err(),
            Some(SessionRefusal::RateLimited)
        );
        assert!(
            registry.reserve(&operator).is_ok(),
            "another token has its own rate"
        );
    }
}
