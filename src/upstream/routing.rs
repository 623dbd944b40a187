//! Which caller the upstream's traffic during a call belongs to.
//!
//! One upstream connection carries the calls of every caller, so whatever the
//! upstream sends while a call runs (progress, logging, sampling and elicitation
//! requests) must be attributed to one call, or to none, and never broadcast:
//!
//! - progress names the progress token Proxi put on the upstream request (rmcp gives
//!   every request its own), which maps back to exactly one call and its caller's token;
//! - a server→client request that came on the SSE stream of one call's POST (a
//!   Streamable HTTP upstream) belongs to that call;
//! - anything else (stdio, the standalone stream, logging) is attributed only when
//!   exactly one call is in flight on the connection; with several, it cannot be,
//!   so requests are refused and log messages stay in Proxi's log. A log message is
//!   attributed when the transport reads it ([`AttributingTransport`]), not when its
//!   handler task runs, which may be after the call's result has been read.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use rmcp::model::{
    JsonRpcMessage, JsonRpcNotification, ProgressNotificationParam, ProgressToken, RequestId,
    ServerNotification,
};
use rmcp::service::{InboundStreamOrigin, RoleClient, RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;

use super::call::CallerPeer;

/// Finished calls whose route is kept a little longer: rmcp hands each incoming
/// notification to its own task, so a progress notification the upstream sent
/// just before its result may be handled after the call has returned.
pub const LINGERING_ROUTES: usize = 64;

/// Progress notifications kept for a token not registered yet (the request is on
/// the wire before its handle, with the token, comes back to the caller).
pub const EARLY_PROGRESS: usize = 32;

#[derive(Debug)]
struct Route {
    request: RequestId,
    caller: Option<CallerPeer>,
    finished: bool,
}

#[derive(Debug, Default)]
struct Table {
    by_token: HashMap<ProgressToken, Route>,
    in_flight: usize,
    lingering: VecDeque<ProgressToken>,
    early: VecDeque<ProgressNotificationParam>,
}

/// The calls in flight on one upstream (over all its restarts) and their callers.
/// Cheap to clone; clones share the table.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    table: Arc<Mutex<Table>>,
}

/// A progress notification to forward: the caller's peer, with the caller's token
/// already in `params`.
#[derive(Debug, Clone)]
pub struct ProgressDelivery {
    /// Where it goes.
    pub caller: CallerPeer,
    /// The notification under the caller's progress token.
    pub params: ProgressNotificationParam,
}

/// How a message the upstream sent outside any request was attributed.
#[derive(Debug, Clone)]
pub enum Attribution {
    /// To this call's caller (an MCP client).
    Caller(CallerPeer),
    /// To a call without an MCP caller (REST, the CLI): nobody to forward to.
    NoPeer,
    /// No call is in flight.
    Idle,
    /// Several calls are in flight and nothing says which one it belongs to.
    Ambiguous,
}

impl Routes {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding this lock leaves only a map of plain values; the
        // table is still consistent enough to route (or refuse) the next message.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that `request`, sent with `token`, is a call for `caller`. Returns
    /// the progress that arrived for it before this registration, ready to forward.
    pub fn register(
        &self,
        token: ProgressToken,
        request: RequestId,
        caller: Option<CallerPeer>,
    ) -> Vec<ProgressDelivery> {
        let mut table = self.lock();
        let mut early = Vec::new();
        table.early.retain(|params| {
            if params.progress_token == token {
                early.push(params.clone());
                false
            } else {
                true
            }
        });
        let deliveries = early
            .into_iter()
            .filter_map(|params| deliver(caller.as_ref(), params))
            .collect();
        table.in_flight += 1;
        table.by_token.insert(
            token,
            Route {
                request,
                caller,
                finished: false,
            },
        );
        deliveries
    }

    /// Marks the call sent with `token` as finished; its route lingers for the
    /// last few [`LINGERING_ROUTES`] calls, then goes.
    pub fn finish(&self, token: &ProgressToken) {
        let mut table = self.lock();
        let Some(route) = table.by_token.get_mut(token) else {
            return;
        };
        if route.finished {
            return;
        }
        route.finished = true;
        table.in_flight -= 1;
        table.lingering.push_back(token.clone());
        while table.lingering.len() > LINGERING_ROUTES {
            if let Some(old) = table.lingering.pop_front() {
                table.by_token.remove(&old);
            }
        }
    }

    /// Where the upstream's progress notification `params` goes: the caller of the
    /// call its token belongs to, under that caller's own token; `None` when the
    /// caller asked for no progress, has no peer, or the token is unknown (then it
    /// is kept briefly in case its call is being registered right now).
    pub fn progress(&self, params: ProgressNotificationParam) -> Option<ProgressDelivery> {
        let mut table = self.lock();
        match table.by_token.get(&params.progress_token) {
            Some(route) => deliver(route.caller.as_ref(), params),
            None => {
                if table.early.len() >= EARLY_PROGRESS {
                    table.early.pop_front();
                }
                table.early.push_back(params);
                None
            }
        }
    }

    /// Attributes a message that came with the call `origin` (an HTTP response
    /// stream), or with nothing: then it belongs to the one call in flight, if
    /// there is exactly one.
    pub fn attribute(&self, origin: Option<&RequestId>) -> Attribution {
        let table = self.lock();
        let route = match origin {
            Some(request) => table
                .by_token
                .values()
                .find(|route| !route.finished && &route.request == request),
            None => match table.in_flight {
                0 => return Attribution::Idle,
                1 => table.by_token.values().find(|route| !route.finished),
                _ => return Attribution::Ambiguous,
            },
        };
        match route {
            Some(Route {
                caller: Some(caller),
                ..
            }) => Attribution::Caller(caller.clone()),
            Some(_) => Attribution::NoPeer,
            None => Attribution::Idle,
        }
    }

    /// How many calls are in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }
}

fn deliver(
    caller: Option<&CallerPeer>,
    mut params: ProgressNotificationParam,
) -> Option<ProgressDelivery> {
    let caller = caller?;
    params.progress_token = caller.progress_token.clone()?;
    Some(ProgressDelivery {
        caller: caller.clone(),
        params,
    })
}

/// The attribution of a log message, made when the transport read it: stored in
/// the notification's extensions for [`on_logging_message`](rmcp::ClientHandler::on_logging_message).
///
/// rmcp hands each notification to its own task, so by the time that task runs,
/// the call whose result followed the message on the wire may have finished, and
/// the one call in flight would then be nobody's (or the next caller's). Reading
/// is sequential, so attributing in `receive` sees the calls as they were when the
/// message arrived.
#[derive(Debug, Clone)]
pub struct AttributedOnArrival(pub Attribution);

/// A transport to an upstream that attributes each log message as it is read
/// (see [`AttributedOnArrival`]); everything else passes through untouched.
pub struct AttributingTransport<T> {
    inner: T,
    routes: Routes,
}

impl<T> AttributingTransport<T> {
    /// Wraps `inner`, attributing against `routes` (the upstream handler's).
    pub fn new(inner: T, routes: Routes) -> Self {
        AttributingTransport { inner, routes }
    }
}

impl<T> Transport<RoleClient> for AttributingTransport<T>
where
    T: Transport<RoleClient>,
{
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleClient>> {
        let mut message = self.inner.receive().await?;
        if let JsonRpcMessage::Notification(JsonRpcNotification {
            notification: ServerNotification::LoggingMessageNotification(log),
            ..
        }) = &mut message
        {
            let origin = match log.extensions.get::<InboundStreamOrigin>() {
                Some(InboundStreamOrigin::OutboundRequest(id)) => Some(id.clone()),
                _ => None,
            };
            let attribution = self.routes.attribute(origin.as_ref());
            log.extensions.insert(AttributedOnArrival(attribution));
        }
        Some(message)
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::NumberOrString;

    fn token(n: i64) -> ProgressToken {
        ProgressToken(NumberOrString::Number(n))
    }

    fn progress(n: i64, value: f64) -> ProgressNotificationParam {
        ProgressNotificationParam::new(token(n), value)
    }

    #[test]
    fn progress_for_an_unknown_token_is_held_until_its_call_registers() {
        let routes = Routes::default();
        assert!(routes.progress(progress(7, 1.0)).is_none());
        // No peer: nothing to deliver, but the early notification is consumed.
        let delivered = routes.register(token(7), RequestId::Number(1), None);
        assert!(delivered.is_empty());
        assert!(routes.lock().early.is_empty());
    }

    #[test]
    fn early_progress_is_bounded() {
        let routes = Routes::default();
        for n in 0..(EARLY_PROGRESS as i64 + 10) {
            routes.progress(progress(n, 1.0));
        }
        assert_eq!(routes.lock().early.len(), EARLY_PROGRESS);
    }

    #[test]
    fn attribution_needs_exactly_one_call_without_an_origin() {
        let routes = Routes::default();
        assert!(matches!(routes.attribute(None), Attribution::Idle));
        routes.register(token(1), RequestId::Number(10), None);
        assert!(matches!(routes.attribute(None), Attribution::NoPeer));
        routes.register(token(2), RequestId::Number(11), None);
        assert!(matches!(routes.attribute(None), Attribution::Ambiguous));
        // With an origin, the right call is found even with several in flight.
        assert!(matches!(
            routes.attribute(Some(&RequestId::Number(11))),
            Attribution::NoPeer
        ));
        assert!(matches!(
            routes.attribute(Some(&RequestId::Number(99))),
            Attribution::Idle
        ));
        routes.finish(&token(1));
        routes.finish(&token(1));
        assert_eq!(routes.in_flight(), 1);
        // A finished call is no longer a target.
        assert!(matches!(
            routes.attribute(Some(&RequestId::Number(10))),
            Attribution::Idle
        ));
    }

    #[test]
    fn finished_routes_linger_only_for_the_last_few_calls() {
        let routes = Routes::default();
        for n in 0..(LINGERING_ROUTES as i64 + 5) {
            routes.register(token(n), RequestId::Number(n), None);
            routes.finish(&token(n));
        }
        let table = routes.lock();
        assert_eq!(table.by_token.len(), LINGERING_ROUTES);
        assert_eq!(table.in_flight, 0);
        assert!(!table.by_token.contains_key(&token(0)));
    }

    /// Hands out the messages it was built with, then ends.
    struct Scripted(VecDeque<RxJsonRpcMessage<RoleClient>>);

    impl Transport<RoleClient> for Scripted {
        type Error = std::io::Error;

        fn send(
            &mut self,
            _item: TxJsonRpcMessage<RoleClient>,
        ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
            std::future::ready(Ok(()))
        }

        async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleClient>> {
            self.0.pop_front()
        }

        async fn close(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    fn log_message() -> RxJsonRpcMessage<RoleClient> {
        #[allow(deprecated)]
        let notification = ServerNotification::LoggingMessageNotification(
            rmcp::model::LoggingMessageNotification::new(
                rmcp::model::LoggingMessageNotificationParam::new(
                    rmcp::model::LoggingLevel::Info,
                    serde_json::json!("disk at 91%"),
                ),
            ),
        );
        JsonRpcMessage::Notification(JsonRpcNotification {
            jsonrpc: Default::default(),
            notification,
        })
    }

    fn stamped(message: &RxJsonRpcMessage<RoleClient>) -> Option<Attribution> {
        match message {
            JsonRpcMessage::Notification(JsonRpcNotification {
                notification: ServerNotification::LoggingMessageNotification(log),
                ..
            }) => log
                .extensions
                .get::<AttributedOnArrival>()
                .map(|AttributedOnArrival(attribution)| attribution.clone()),
            _ => None,
        }
    }

    // The CI failure this fixes: the log message's handler task ran after the call's
    // result had been read and its route finished, so the message went to Proxi's
    // log instead of the caller. The attribution made on arrival must survive that.
    #[tokio::test]
    async fn a_log_message_keeps_the_attribution_it_had_when_read() {
        let routes = Routes::default();
        routes.register(token(1), RequestId::Number(1), None);
        let mut transport =
            AttributingTransport::new(Scripted(VecDeque::from([log_message()])), routes.clone());
        let message = transport.receive().await.expect("one message");
        routes.finish(&token(1));
        assert!(matches!(routes.attribute(None), Attribution::Idle));
        assert!(
            matches!(stamped(&message), Some(Attribution::NoPeer)),
            "{:?}",
            stamped(&message)
        );
    }

    #[tokio::test]
    async fn a_log_message_read_with_no_call_in_flight_is_nobodys() {
        let routes = Routes::default();
        let mut transport =
            AttributingTransport::new(Scripted(VecDeque::from([log_message()])), routes.clone());
        let message = transport.receive().await.expect("one message");
        routes.register(token(2), RequestId::Number(2), None);
        assert!(matches!(stamped(&message), Some(Attribution::Idle)));
    }
}
