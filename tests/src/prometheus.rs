//! A real Prometheus server (Debian's `prometheus`, installed by `cargo xtask test`) for the
//! metric-gate tests: its own config scraping the given loopback targets every second, its own
//! data directory and a free port on the host's loopback, so it never meets the package's system
//! service or another test's server. Stopped (and its directory removed) on drop; `stop` and
//! `start` in between simulate an outage, keeping the data.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{free_port, unique_name};

/// Seconds between scrapes (and rule evaluations).
pub const SCRAPE_INTERVAL_SECONDS: u32 = 1;

/// One `/metrics` endpoint to scrape, with labels Prometheus adds to its series.
#[derive(Debug, Clone)]
pub struct ScrapeTarget {
    pub addr: SocketAddr,
    pub labels: Vec<(String, String)>,
}

impl ScrapeTarget {
    pub fn new(addr: SocketAddr, labels: &[(&str, &str)]) -> Self {
        Self { addr, labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }
}

/// A running Prometheus.
pub struct Prometheus {
    pub addr: SocketAddr,
    dir: PathBuf,
    process: Option<Child>,
}

impl Prometheus {
    /// Writes the config, starts the server and waits until it is ready and has scraped every
    /// target once.
    pub fn start(targets: &[ScrapeTarget]) -> Self {
        let dir = std::env::temp_dir().join(unique_name("prometheus"));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let mut config = format!(
            "global:\n  scrape_interval: {SCRAPE_INTERVAL_SECONDS}s\n  scrape_timeout: {SCRAPE_INTERVAL_SECONDS}s\n  \
             evaluation_interval: {SCRAPE_INTERVAL_SECONDS}s\nscrape_configs:\n  - job_name: app\n    static_configs:\n"
        );
        for target in targets {
            writeln!(config, "      - targets: [\"{}\"]", target.addr).unwrap();
            if !target.labels.is_empty() {
                writeln!(config, "        labels:").unwrap();
                for (key, value) in &target.labels {
                    writeln!(config, "          {key}: {value:?}").unwrap();
                }
            }
        }
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut prometheus = Self { addr, dir, process: None };
        prometheus.spawn();
        prometheus.wait_for_targets(targets.len());
        prometheus
    }

    /// `http://127.0.0.1:PORT`, for `agent.prometheus`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let binary = which_prometheus();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", self.dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", self.dir.join("data").display()))
            .arg(format!("--web.listen-address={}", self.addr))
            .args(["--storage.tsdb.retention.time=1h", "--log.level=warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        self.process = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(response) = agent::client::request(self.addr, None, "GET", "/-/ready", None) {
                if response.status == 200 {
                    return;
                }
            }
            if let Some(status) = self.process.as_mut().unwrap().try_wait().unwrap() {
                panic!("prometheus exited with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("prometheus did not become ready: {}", self.log());
    }

    /// Waits until `count` targets have been scraped successfully (`up == 1`).
    pub fn wait_for_targets(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = self.api_get("/api/v1/query?query=sum(up)");
            let value = up["data"]["result"][0]["value"][1].as_str().and_then(|v| v.parse::<f64>().ok());
            if value.is_some_and(|v| v as usize >= count) {
                return;
            }
            assert!(Instant::now() < deadline, "prometheus has not scraped {count} targets: {up}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A GET of the HTTP API (`path` already URL-encoded): its JSON body.
    pub fn api_get(&self, path: &str) -> serde_json::Value {
        agent::client::request(self.addr, None, "GET", path, None).map(|r| r.body).unwrap_or_default()
    }

    /// Stops the server (SIGTERM, waiting for it to exit); the data stays for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.process.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data, and waits until it is ready.
    pub fn restart(&mut self) {
        assert!(self.process.is_none(), "prometheus is still running");
        self.spawn();
    }

    /// SIGSTOP: the port still accepts connections (the kernel's backlog) but nothing answers.
    pub fn freeze(&self) {
        unsafe { libc::kill(self.process.as_ref().expect("running").id() as i32, libc::SIGSTOP) };
    }

    pub fn thaw(&self) {
        unsafe { libc::kill(self.process.as_ref().expect("running").id() as i32, libc::SIGCONT) };
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(child) = &self.process {
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which_prometheus() -> PathBuf {
    let path = PathBuf::from("/usr/bin/prometheus");
    assert!(path.exists(), "Debian's prometheus is not installed: run `cargo xtask test`, which installs it");
    path
}
