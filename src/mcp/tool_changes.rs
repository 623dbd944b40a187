//! Passing "the tool list changed" on to MCP clients, for the front end to call
//! once its own tool list has been rebuilt (an upstream's
//! `notifications/tools/list_changed`, a restart; see
//! `crate::upstream::set::UpstreamSet::tools_changed`).
//!
//! Two kinds of client listen differently: a session of the handshake-era
//! protocol versions gets `notifications/tools/list_changed` on its peer
//! ([`forward_to_session`], started when the session is initialized); a
//! 2026-07-28 client asks with `subscriptions/listen` and `toolsListChanged`
//! ([`forward_to_listener`], run inside the handler's `listen`). Either way a
//! tick is announced only after it happened, and a burst of ticks may be
//! announced once: clients re-fetch the whole list anyway.
//!
//! The server must advertise `tools.listChanged` for clients to expect these.

use rmcp::RoleServer;
use rmcp::service::{Peer, SubscriptionContext};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// Sends `notifications/tools/list_changed` to `peer` after each change of
/// `changes` seen from now on, until the session ends (a send fails) or the
/// returned handle is aborted.
pub fn forward_to_session(
    peer: Peer<RoleServer>,
    mut changes: watch::Receiver<u64>,
) -> AbortHandle {
    // Changes before this point are in the list the client is about to fetch.
    changes.borrow_and_update();
    let forwarder = tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            if peer.notify_tool_list_changed().await.is_err() {
                break;
            }
        }
    });
    forwarder.abort_handle()
}

/// Whether a `subscriptions/listen` stream asked for tool list changes.
pub fn wants_tool_changes(context: &SubscriptionContext) -> bool {
    context.accepted().tools_list_changed == Some(true)
}

/// Announces each change of `changes` on the listen stream `context` until the
/// client cancels it or the sink fails. Returns at once when the stream did not
/// ask for tool list changes ([`wants_tool_changes`]).
pub async fn forward_to_listener(context: &SubscriptionContext, mut changes: watch::Receiver<u64>) {
    if !wants_tool_changes(context) {
        return;
    }
    changes.borrow_and_update();
    loop {
        tokio::select! {
            () = context.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() || context.sink().notify_tool_list_changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use rmcp::ErrorData;
    use rmcp::model::{
        ClientConfig, ProtocolVersion, ServerCapabilities, ServerConfig, ServerNotification,
        SubscriptionFilter,
    };
    use rmcp::service::NotificationContext;
    use rmcp::{ClientHandler, RoleClient, ServerHandler, ServiceExt};

    use super::*;

    /// A server that starts forwarding when its session is initialized.
    struct Server {
        changes: watch::Receiver<u64>,
        forwarding: Arc<tokio::sync::Notify>,
    }

    impl ServerHandler for Server {
        fn get_info(&self) -> ServerConfig {
            ServerConfig::new(
                ServerCapabilities::builder()
                    .enable_tools()
                    .enable_tool_list_changed()
                    .build(),
            )
        }

        async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
            forward_to_session(context.peer, self.changes.clone());
            self.forwarding.notify_one();
        }

        fn accepted_subscription_filter(
            &self,
            requested: &SubscriptionFilter,
        ) -> Option<SubscriptionFilter> {
            Some(requested.clone())
        }

        async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
            self.forwarding.notify_one();
            forward_to_listener(&context, self.changes.clone()).await;
            Ok(())
        }
    }

    /// Serves `Server` on one end of an in-memory pipe and returns the other end.
    fn serve_over_pipe(
        changes: watch::Receiver<u64>,
        forwarding: Arc<tokio::sync::Notify>,
    ) -> tokio::io::DuplexStream {
        let (server_end, client_end) = tokio::io::duplex(1 << 14);
        let server = Server {
            changes,
            forwarding,
        };
        tokio::spawn(async move {
            if let Ok(running) = server.serve(server_end).await {
                let _ = running.waiting().await;
            }
        });
        client_end
    }

    #[derive(Clone, Default)]
    struct Client {
        heard: Arc<AtomicUsize>,
        notified: Arc<tokio::sync::Notify>,
        stateless: bool,
    }

    impl ClientHandler for Client {
        fn get_info(&self) -> ClientConfig {
            let config = ClientConfig::default();
            if self.stateless {
                config.with_protocol_version(ProtocolVersion::V_2026_07_28)
            } else {
                config.with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
            }
        }

        async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
            self.heard.fetch_add(1, Ordering::SeqCst);
            self.notified.notify_one();
        }
    }

    #[tokio::test]
    async fn a_session_hears_each_change_after_it_started() {
        let (changes_tx, changes) = watch::channel(0u64);
        // A change before the session exists is not announced.
        changes_tx.send_modify(|count| *count += 1);
        let forwarding = Arc::new(tokio::sync::Notify::new());
        let client_end = serve_over_pipe(changes, forwarding.clone());
        let client = Client::default();
        let running = client.clone().serve(client_end).await.unwrap();
        forwarding.notified().await;
        assert_eq!(client.heard.load(Ordering::SeqCst), 0);

        let heard = || async {
            tokio::time::timeout(Duration::from_secs(10), client.notified.notified())
                .await
                .expect("the client hears of the change");
        };
        changes_tx.send_modify(|count| *count += 1);
        heard().await;
        assert_eq!(client.heard.load(Ordering::SeqCst), 1);
        changes_tx.send_modify(|count| *count += 1);
        heard().await;
        assert_eq!(client.heard.load(Ordering::SeqCst), 2);
        running.cancel().await.unwrap();
    }

    #[tokio::test]
    async fn a_listener_that_asked_for_tool_changes_hears_them() {
        let (changes_tx, changes) = watch::channel(0u64);
        let forwarding = Arc::new(tokio::sync::Notify::new());
        let client_end = serve_over_pipe(changes, forwarding.clone());
        let client = Client {
            stateless: true,
            ..Client::default()
        };
        let running = rmcp::service::serve_client_with_lifecycle(
            client,
            client_end,
            rmcp::service::ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await
        .unwrap();
        let mut subscription = running
            .peer()
            .listen(SubscriptionFilter::builder().tools_list_changed().build())
            .await
            .expect("subscriptions/listen is acknowledged");
        forwarding.notified().await;
        changes_tx.send_modify(|count| *count += 1);
        let heard = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("the listener hears of the change")
            .unwrap();
        assert!(
            matches!(
                heard,
                Some(ServerNotification::ToolListChangedNotification(_))
            ),
            "{heard:?}"
        );
        running.cancel().await.unwrap();
    }
}
