//! Serves the API: an accept loop with a connection limit, each connection driven by hyper's
//! HTTP/1 server with a header-read timer. `axum::serve` has neither: it sets no timer (so
//! hyper's header timeout is off) and accepts without bound, so a few hundred clients that
//! trickle header bytes, or simply stay idle, could hold the agent's memory and file
//! descriptors and keep the kill switch from answering.
//!
//! The bounds:
//! - the request head (request line and headers) must arrive within [`HEADER_TIMEOUT`] of the
//!   first moment the connection waits for it; this is also the keep-alive idle timeout
//!   (hyper starts the same timer while it waits for the next request);
//! - the head may use at most [`MAX_HEAD_BYTES`] of buffer;
//! - the body must arrive within `BODY_TIMEOUT` and fit in `MAX_BODY_BYTES` (see `extract`);
//! - at most [`MAX_CONNECTIONS`] connections are open. At the limit, the oldest connection that
//!   has not yet sent an authenticated request is closed to make room for the new one, else the
//!   oldest authenticated one that is idle between requests: slow or idle clients (even ones with
//!   a token) cannot lock out an operator. Only when every open connection is in the middle of a
//!   request is a new one refused.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use axum::{body::Body, Router};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{
    guard::{ConnInfo, Denied},
    AppState,
};

/// Time for a request's head to arrive, and for an idle keep-alive connection's next request.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer of a connection, which bounds the request head (hyper's minimum is 8 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Open connections at most.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long shutdown waits for requests in flight.
const DRAIN_BOUND: Duration = Duration::from_secs(5);

/// The open connections, oldest first (ids increase), with what the limit needs to know.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: BTreeMap<u64, Slot>,
}

struct Slot {
    authenticated: Arc<AtomicBool>,
    /// Requests being answered on the connection.
    busy: Arc<AtomicU32>,
    close: CancellationToken,
}

impl Connections {
    /// Makes room for one more connection; false when every open one is answering a request.
    fn make_room(&mut self, limit: usize) -> bool {
        if self.open.len() < limit {
            return true;
        }
        let oldest = |pick: &dyn Fn(&Slot) -> bool| self.open.iter().find(|(_, slot)| pick(slot)).map(|(id, _)| *id);
        let victim = oldest(&|slot| !slot.authenticated.load(Ordering::Relaxed))
            .or_else(|| oldest(&|slot| slot.busy.load(Ordering::Relaxed) == 0));
        match victim.and_then(|id| self.open.remove(&id)) {
            Some(slot) => {
                slot.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets requests in flight
/// finish (bounded by [`DRAIN_BOUND`]).
pub async fn serve(listener: TcpListener, router: Router, state: Arc<AppState>, shutdown: CancellationToken) {
    serve_with_limit(listener, router, state, shutdown, MAX_CONNECTIONS).await
}

async fn serve_with_limit(
    listener: TcpListener,
    router: Router,
    state: Arc<AppState>,
    shutdown: CancellationToken,
    limit: usize,
) {
    let connections = Arc::new(Mutex::new(Connections::default()));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
            // Reap finished connection tasks as they end, so the set does not grow.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors (or memory): wait rather than spin; connections that
                // end free what the next accept needs.
                log::warn!("accepting an API connection: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let authenticated = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicU32::new(0));
        let close = CancellationToken::new();
        let id = {
            let mut connections = connections.lock().unwrap_or_else(PoisonError::into_inner);
            if !connections.make_room(limit) {
                drop(connections);
                state.denied.count(Denied::ConnectionLimit);
                log::warn!("API connection from {peer} refused: {limit} connections are answering requests");
                continue;
            }
            let id = connections.next_id;
            connections.next_id += 1;
            let slot = Slot { authenticated: authenticated.clone(), busy: busy.clone(), close: close.clone() };
            connections.open.insert(id, slot);
            id
        };
        let info = ConnInfo { peer, authenticated };
        let router = router.clone();
        let shutdown = shutdown.clone();
        let connections = connections.clone();
        tasks.spawn(async move {
            serve_connection(stream, info, busy, router, close, shutdown).await;
            connections.lock().unwrap_or_else(PoisonError::into_inner).open.remove(&id);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_BOUND, async { while tasks.join_next().await.is_some() {} }).await.is_err() {
        log::warn!("API requests still in flight after {DRAIN_BOUND:?}; closing them");
        tasks.abort_all();
    }
}

/// One connection: HTTP/1 with the header timer, closed at once when the limit evicts it, and
/// gracefully (after the request in flight) at shutdown.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    info: ConnInfo,
    busy: Arc<AtomicU32>,
    router: Router,
    close: CancellationToken,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(info.clone());
        let busy = Busy::enter(busy.clone());
        let answer = router.clone().oneshot(request.map(Body::new));
        async move {
            let response = answer.await;
            drop(busy);
            response
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = close.cancelled() => return,
        () = shutdown.cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(DRAIN_BOUND, connection).await;
}

/// Counts a request in flight on its connection while it lives (also when the request's future
/// is dropped half-way).
struct Busy(Arc<AtomicU32>);

impl Busy {
    fn enter(count: Arc<AtomicU32>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_closes_anonymous_connections_first_then_idle_ones() {
        let mut connections = Connections::default();
        let mut closes = Vec::new();
        // 0: authenticated and idle, 1: anonymous, 2: authenticated and busy, 3: anonymous.
        for (id, authenticated, busy) in [(0u64, true, 0), (1, false, 0), (2, true, 1), (3, false, 0)] {
            let slot = Slot {
                authenticated: Arc::new(AtomicBool::new(authenticated)),
                busy: Arc::new(AtomicU32::new(busy)),
                close: CancellationToken::new(),
            };
            closes.push(slot.close.clone());
            connections.open.insert(id, slot);
        }
        let closed = |closes: &[CancellationToken]| {
            closes.iter().enumerate().filter(|(_, c)| c.is_cancelled()).map(|(i, _)| i).collect::<Vec<_>>()
        };
        assert!(connections.make_room(4));
        assert_eq!(closed(&closes), [1], "the oldest anonymous connection goes first");
        assert!(connections.make_room(3));
        assert_eq!(closed(&closes), [1, 3]);
        assert!(connections.make_room(2));
        assert_eq!(closed(&closes), [0, 1, 3], "then the oldest idle one");
        assert!(!connections.make_room(1), "every open connection busy: refused");
        assert_eq!(connections.open.len(), 1);
    }
}
