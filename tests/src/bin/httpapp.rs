//! sockshift-httpapp: the HTTP application of the metric-gate tests, its load generator, and a
//! one-shot webhook sender.
//!
//! `serve` answers every request with 200, or 500 for a set share of them, and counts them in
//! `http_requests_total{code}` on a separate `/metrics` listener for Prometheus. With `--netns`,
//! the metrics listener is bound first in the caller's namespace (where Prometheus and the agent
//! run) and the application listeners inside the given namespace (where the steered clients
//! are), so a canary can serve test traffic in a test namespace and still be scraped.

use std::{
    collections::BTreeMap,
    io::BufRead,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use clap::{Parser, Subcommand};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde_json::json;

#[derive(Parser)]
struct HttpApp {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves HTTP on each `--listen` address and Prometheus metrics on `--metrics`. Prints
    /// `ready metrics=ADDR listen=ADDR,...` (ports 0 are resolved). A line `error-percent P` on
    /// stdin changes the share of 500s.
    Serve {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        metrics: SocketAddr,
        /// Share of requests answered with 500, percent (exact: every request counts).
        #[arg(long, default_value_t = 0.0)]
        error_percent: f64,
        /// Wait this long before each answer.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Network namespace (e.g. /run/netns/NAME) of the `--listen` addresses.
        #[arg(long)]
        netns: Option<PathBuf>,
    },
    /// COUNT sequential requests to TARGET, each on a new connection; prints the statuses seen.
    Load {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: u32,
        /// Pause between requests.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// Stop after this many seconds even if COUNT is not reached.
        #[arg(long, default_value_t = 120)]
        max_seconds: u64,
    },
    /// Sends one webhook notification through the agent's webhook code, with `--allow` as
    /// `agent.webhook_allow`; prints `{"ok": bool, "error": "..."}`.
    Notify {
        #[arg(long)]
        url: String,
        #[arg(long)]
        allow: Vec<String>,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

struct App {
    /// Share of 500s in basis points (1/100 of a percent).
    error_bp: AtomicU32,
    served: AtomicU64,
    delay: Duration,
    requests: Family<CodeLabels, Counter>,
    registry: Registry,
}

impl App {
    /// Whether request number `n` (from 0) fails: exactly `error_bp` in 10 000 do, spread evenly.
    fn fails(&self, n: u64) -> bool {
        let bp = u64::from(self.error_bp.load(Ordering::Relaxed));
        (n + 1) * bp / 10_000 > n * bp / 10_000
    }
}

fn main() {
    match HttpApp::parse().command {
        Command::Serve { listen, metrics, error_percent, delay_ms, netns } => {
            serve(&listen, metrics, error_percent, delay_ms, netns)
        }
        Command::Load { target, count, interval_ms, max_seconds } => {
            runtime().block_on(load(target, count, interval_ms, max_seconds))
        }
        Command::Notify { url, allow } => runtime().block_on(notify(&url, &allow)),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

fn bind(addr: SocketAddr) -> TcpListener {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    listener.set_nonblocking(true).expect("nonblocking");
    listener
}

fn serve(listen: &[SocketAddr], metrics: SocketAddr, error_percent: f64, delay_ms: u64, netns: Option<PathBuf>) {
    assert!((0.0..=100.0).contains(&error_percent), "--error-percent must be from 0 to 100");
    // Bound before entering the namespace: this socket stays in the caller's.
    let metrics_listener = bind(metrics);
    if let Some(path) = &netns {
        // Still one thread (no runtime yet), so the whole process moves.
        let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {}: {}", path.display(), std::io::Error::last_os_error());
    }
    let app_listeners: Vec<TcpListener> = listen.iter().map(|addr| bind(*addr)).collect();

    let mut registry = Registry::default();
    let requests = Family::<CodeLabels, Counter>::default();
    registry.register("http_requests", "HTTP requests answered, by status code", requests.clone());
    // Both series exist from the start, so an error-rate query reads 0 (not "no data") for a
    // healthy application, as Prometheus' instrumentation guide recommends.
    for code in ["200", "500"] {
        let _ = requests.get_or_create(&CodeLabels { code: code.to_string() });
    }
    let app = Arc::new(App {
        error_bp: AtomicU32::new((error_percent * 100.0).round() as u32),
        served: AtomicU64::new(0),
        delay: Duration::from_millis(delay_ms),
        requests,
        registry,
    });

    let control = app.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if let Some(value) = line.strip_prefix("error-percent ").and_then(|v| v.trim().parse::<f64>().ok()) {
                control.error_bp.store((value.clamp(0.0, 100.0) * 100.0).round() as u32, Ordering::Relaxed);
            }
        }
    });

    runtime().block_on(async move {
        let metrics_listener = tokio::net::TcpListener::from_std(metrics_listener).unwrap();
        let metrics_addr = metrics_listener.local_addr().unwrap();
        let metrics_router = Router::new().route("/metrics", get(render_metrics)).with_state(app.clone());
        tokio::spawn(async move { axum::serve(metrics_listener, metrics_router).await.expect("metrics server") });
        let mut bound = Vec::new();
        for listener in app_listeners {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            bound.push(listener.local_addr().unwrap().to_string());
            let router = Router::new().fallback(answer).with_state(app.clone());
            tokio::spawn(async move { axum::serve(listener, router).await.expect("app server") });
        }
        println!("ready metrics={metrics_addr} listen={}", bound.join(","));
        std::future::pending::<()>().await;
    });
}

async fn answer(State(app): State<Arc<App>>) -> impl IntoResponse {
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    let n = app.served.fetch_add(1, Ordering::Relaxed);
    let status = if app.fails(n) { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK };
    app.requests.get_or_create(&CodeLabels { code: status.as_u16().to_string() }).inc();
    (status, if status.is_success() { "ok\n" } else { "failed\n" })
}

async fn render_metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let mut text = String::new();
    encode(&mut text, &app.registry).expect("encode metrics");
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}

async fn load(target: SocketAddr, count: u32, interval_ms: u64, max_seconds: u64) {
    let started = Instant::now();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let authority = target.to_string();
    for _ in 0..count {
        if started.elapsed() > Duration::from_secs(max_seconds) {
            break;
        }
        let request = agent::outbound::Request {
            method: http::Method::GET,
            authority: &authority,
            path_and_query: "/",
            authorization: None,
            body: None,
        };
        let result =
            tokio::time::timeout(Duration::from_secs(5), agent::outbound::exchange(target, request, 4096)).await;
        match result {
            Ok(Ok(response)) => *statuses.entry(response.status.as_u16().to_string()).or_default() += 1,
            Ok(Err(agent::outbound::ExchangeError::Connect { .. })) => {
                *errors.entry("connect".into()).or_default() += 1
            }
            Ok(Err(_)) => *errors.entry("http".into()).or_default() += 1,
            Err(_) => *errors.entry("timeout".into()).or_default() += 1,
        }
        if interval_ms > 0 {
            tokio::time::sleep(Duration::from_millis(interval_ms)).await;
        }
    }
    let report = json!({ "status": statuses, "errors": errors, "elapsed_ms": started.elapsed().as_millis() as u64 });
    println!("{report}");
}

async fn notify(url: &str, allow: &[String]) {
    let allow = agent::webhook::AllowList::from_config(allow).unwrap_or_else(|e| panic!("--allow: {e}"));
    let webhooks = agent::webhook::Webhooks::new(allow);
    let result = webhooks.notify(url, &json!({ "event": "test" })).await;
    let report = match result {
        Ok(()) => json!({ "ok": true }),
        Err(err) => json!({ "ok": false, "error": err.to_string() }),
    };
    println!("{report}");
}
