//! The accept loop: HTTP/1.1 on hyper with a header-read timeout and a bounded
//! set of connections.
//!
//! - Every connection gets hyper's `header_read_timeout` (with a Tokio timer): a
//!   client that does not finish a request's headers in time is dropped. hyper
//!   starts that timer whenever it waits for a request head, so it also bounds
//!   how long an idle keep-alive connection is kept.
//! - At most `max_connections` are open. At the cap, the connection idle longest
//!   (no request in progress: still sending headers, or between requests) is
//!   closed to admit the new one; only when every connection is busy with a
//!   request is the newcomer closed. A half-open flood thus evicts itself, while
//!   a client that sends its request promptly, such as an operator holding the
//!   operator token, is served: it would be evicted only if the attacker opened
//!   `max_connections` connections in the instant between its connect and its
//!   headers. No token is needed to get this, because the token is only known
//!   after the headers, which is exactly what a slowloris withholds.
//! - Each request sees the peer address as axum's `ConnectInfo`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::extract::Request;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::limits::EdgeLimits;

/// One open connection, as the table sees it.
#[derive(Debug)]
struct Connection {
    /// Requests whose response has not been fully sent.
    in_flight: AtomicUsize,
    /// Milliseconds since the table's epoch when the connection last became idle.
    idle_since: AtomicU64,
    close: CancellationToken,
}

/// The open connections and the cap on them.
#[derive(Debug)]
pub struct ConnectionTable {
    max: usize,
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Connection>>>,
}

impl ConnectionTable {
    /// A table admitting at most `max` connections.
    pub fn new(max: usize) -> Arc<ConnectionTable> {
        Arc::new(ConnectionTable {
            max: max.max(1),
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Admits a new connection, evicting the longest-idle one at the cap;
    /// `None` if every open connection is busy with a request.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.len() >= self.max {
            let victim = open
                .iter()
                .filter(|(_, connection)| connection.in_flight.load(Ordering::Acquire) == 0)
                .min_by_key(|(_, connection)| connection.idle_since.load(Ordering::Acquire))
                .map(|(id, _)| *id)?;
            if let Some(evicted) = open.remove(&victim) {
                evicted.close.cancel();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.now_ms()),
            close: CancellationToken::new(),
        });
        open.insert(id, connection.clone());
        Some(Slot {
            table: self.clone(),
            id,
            connection,
        })
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A connection's place in the table; leaves it on drop.
struct Slot {
    table: Arc<ConnectionTable>,
    id: u64,
    connection: Arc<Connection>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// Marks a connection busy from a request's start until its response body is done.
struct Busy {
    table: Arc<ConnectionTable>,
    connection: Arc<Connection>,
}

impl Busy {
    fn start(table: &Arc<ConnectionTable>, connection: &Arc<Connection>) -> Busy {
        connection.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy {
            table: table.clone(),
            connection: connection.clone(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.connection
            .idle_since
            .store(self.table.now_ms(), Ordering::Release);
        self.connection.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds `guard` (a busy mark, a permit) until it is sent
/// or dropped, so long streams (SSE) count for as long as they last.
pub(crate) struct Holding<G> {
    inner: Body,
    _guard: G,
}

impl<G: Send + Unpin + 'static> Holding<G> {
    /// `body`, holding `guard` until it ends.
    pub(crate) fn wrap(body: Body, guard: G) -> Body {
        Body::new(Holding {
            inner: body,
            _guard: guard,
        })
    }
}

impl<G: Unpin> hyper::body::Body for Holding<G> {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open requests finish.
///
/// Everything runs inside this future (the connections in a `JoinSet`), so
/// aborting the task that serves drops every connection with it.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &EdgeLimits,
    table: Arc<ConnectionTable>,
    shutdown: impl Future<Output = ()>,
) {
    let stop = CancellationToken::new();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically EMFILE/ENFILE: wait a moment rather than spin.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = table.admit() else {
            tracing::debug!(%peer, "connection cap reached and every connection busy; closing");
            continue;
        };
        // Streamed (SSE) answers go out in several writes; with Nagle's algorithm
        // each later write waits for the client's delayed ACK (~40 ms).
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        connections.spawn(serve_connection(
            stream,
            peer,
            app.clone(),
            slot,
            limits.header_timeout,
            stop.clone(),
        ));
    }
    drop(listener);
    stop.cancel();
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    slot: Slot,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let table = slot.table.clone();
    let connection = slot.connection.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let busy = Busy::start(&table, &connection);
        let mut request: Request = request.map(Body::new);
        request.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        async move {
            let response = match app.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(response.map(|body| Holding::wrap(body, busy)))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    tokio::select! {
        result = served.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
        }
        () = slot.connection.close.cancelled() => {
            tracing::debug!(%peer, "closed an idle connection to make room");
        }
        () = shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
    drop(slot);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_longest_idle_connection_makes_room() {
        let table = ConnectionTable::new(2);
        let first = table.admit().expect("room");
        let second = table.admit().expect("room");
        first.connection.idle_since.store(5, Ordering::Release);
        second.connection.idle_since.store(1, Ordering::Release);
        let third = table.admit().expect("an idle connection is evicted");
        assert!(
            second.connection.close.is_cancelled(),
            "the longest idle goes"
        );
        assert!(!first.connection.close.is_cancelled());
        assert_eq!(table.open(), 2);
        drop(second);
        assert_eq!(
            table.open(),
            2,
            "an evicted slot leaves the table only once"
        );
        drop((first, third));
        assert_eq!(table.open(), 0);
    }

    #[test]
    fn connections_busy_with_a_request_are_never_evicted() {
        let table = ConnectionTable::new(2);
        let first = table.admit().expect("room");
        let second = table.admit().expect("room");
        let busy_first = Busy::start(&table, &first.connection);
        let busy_second = Busy::start(&table, &second.connection);
        assert!(table.admit().is_none(), "every connection is busy");
        drop(busy_second);
        assert!(
            table.admit().is_some(),
            "a finished request leaves its connection idle"
        );
        assert!(second.connection.close.is_cancelled());
        drop(busy_first);
    }
}
