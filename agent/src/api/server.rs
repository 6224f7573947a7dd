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
//!   has not yet sent an authenticated request is closed to make room for the new one: slow or
//!   idle clients cannot lock out an operator who has a token (or, without `[agent.auth]`, any
//!   client that sends a whole request). Only when every open connection has authenticated is
//!   a new one refused.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
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
    close: CancellationToken,
}

impl Connections {
    /// Makes room for one more connection; false when every open one has authenticated.
    fn make_room(&mut self, limit: usize) -> bool {
        if self.open.len() < limit {
            return true;
        }
        let oldest_anonymous =
            self.open.iter().find(|(_, slot)| !slot.authenticated.load(Ordering::Relaxed)).map(|(id, _)| *id);
        match oldest_anonymous.and_then(|id| self.open.remove(&id)) {
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
        let close = CancellationToken::new();
        let id = {
            let mut connections = connections.lock().unwrap_or_else(PoisonError::into_inner);
            if !connections.make_room(limit) {
                drop(connections);
                state.denied.count(Denied::ConnectionLimit);
                log::warn!("API connection from {peer} refused: {limit} authenticated connections are open");
                continue;
            }
            let id = connections.next_id;
            connections.next_id += 1;
            connections.open.insert(id, Slot { authenticated: authenticated.clone(), close: close.clone() });
            id
        };
        let info = ConnInfo { peer, authenticated };
        let router = router.clone();
        let shutdown = shutdown.clone();
        let connections = connections.clone();
        tasks.spawn(async move {
            serve_connection(stream, info, router, close, shutdown).await;
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
    router: Router,
    close: CancellationToken,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(info.clone());
        router.clone().oneshot(request.map(Body::new))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_closes_the_oldest_unauthenticated_connection() {
        let mut connections = Connections::default();
        let mut closes = Vec::new();
        for id in 0..3u64 {
            let close = CancellationToken::new();
            closes.push(close.clone());
            let authenticated = Arc::new(AtomicBool::new(id == 0));
            connections.open.insert(id, Slot { authenticated, close });
        }
        assert!(connections.make_room(3));
        assert!(!closes[0].is_cancelled(), "an authenticated connection stays");
        assert!(closes[1].is_cancelled(), "the oldest anonymous one goes");
        assert!(!closes[2].is_cancelled());
        assert_eq!(connections.open.len(), 2);
        connections.open.get(&2).unwrap().authenticated.store(true, Ordering::Relaxed);
        connections.open.insert(3, Slot { authenticated: Arc::new(AtomicBool::new(true)), close: Default::default() });
        assert!(!connections.make_room(3), "every open connection authenticated: refused");
    }
}
