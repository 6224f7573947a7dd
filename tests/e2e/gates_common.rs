//! What the metric-gate tests share: the HTTP application (`sockshift-httpapp`) serving and
//! counting requests by status code, its load generator, and webhook receivers on loopback.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use e2e::{built_binary, spawn_in, NetNs, Placement, Spawned};

/// The error rate of the canary of "web" over the step's window, as a user writes it.
pub const ERROR_RATE: &str = r#"sum(rate(http_requests_total{app="{{service}}",track="canary",code=~"5.."}[{{window}}]))
  / sum(rate(http_requests_total{app="{{service}}",track="canary"}[{{window}}]))"#;

/// A running `sockshift-httpapp serve`.
pub struct HttpApp {
    pub process: Spawned,
    pub metrics: SocketAddr,
    pub listen: SocketAddr,
}

/// An application answering `error_percent` % of requests with 500; with `netns`, it serves
/// inside that namespace while its metrics stay on the host's loopback for Prometheus.
pub fn start_app(netns: Option<&NetNs>, error_percent: f64) -> HttpApp {
    let percent = error_percent.to_string();
    let path = netns.map(|ns| ns.path().display().to_string());
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--error-percent", &percent];
    if let Some(path) = &path {
        args.extend(["--netns", path]);
    }
    let mut process = spawn_in(Placement::default(), &built_binary("sockshift-httpapp"), &args);
    let ready = process.wait_for_line("ready");
    let field = |name: &str| -> SocketAddr {
        let value = ready.split_whitespace().find_map(|w| w.strip_prefix(name)).expect(name);
        value.split(',').next().unwrap().parse().unwrap()
    };
    HttpApp { metrics: field("metrics="), listen: field("listen="), process }
}

/// Steady traffic (a request every 5 ms, on new connections) from `placement` to `target`,
/// for at most 60 s; stops when dropped.
pub fn start_load(placement: Placement<'_>, target: SocketAddr) -> Spawned {
    let target = target.to_string();
    let args = ["load", "--target", &target, "--count", "100000", "--interval-ms", "5", "--max-seconds", "60"];
    spawn_in(placement, &built_binary("sockshift-httpapp"), &args)
}

/// Request heads and bodies a receiver got.
pub type Requests = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// What a receiver does with a request.
#[derive(Clone, Copy)]
pub enum Behaviour {
    Answer(u16),
    /// Answers 200 after this long.
    Slow(Duration),
    /// 200 with a 1 GiB body, written as fast as the client reads.
    Stream,
    /// 200 promising 1 MB, then one byte every 50 ms.
    Trickle,
    /// 200 with this body, if the request carries this `Authorization` header; else 401.
    Prometheus {
        authorization: &'static str,
        body: &'static str,
    },
}

/// A webhook receiver on the host's loopback, one thread per connection.
pub struct Receiver {
    pub addr: SocketAddr,
    /// Request heads and bodies received.
    pub requests: Requests,
    pub connections: Arc<AtomicU64>,
    pub open: Arc<AtomicU64>,
    pub max_open: Arc<AtomicU64>,
    /// Body bytes the client accepted (`Stream`, `Trickle`).
    pub streamed: Arc<AtomicU64>,
}

impl Receiver {
    pub fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let receiver = Self {
            addr: listener.local_addr().unwrap(),
            requests: Arc::default(),
            connections: Arc::default(),
            open: Arc::default(),
            max_open: Arc::default(),
            streamed: Arc::default(),
        };
        let (requests, connections, open, max_open, streamed) = (
            receiver.requests.clone(),
            receiver.connections.clone(),
            receiver.open.clone(),
            receiver.max_open.clone(),
            receiver.streamed.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                connections.fetch_add(1, Ordering::SeqCst);
                let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                max_open.fetch_max(now_open, Ordering::SeqCst);
                let (requests, open, streamed) = (requests.clone(), open.clone(), streamed.clone());
                std::thread::spawn(move || {
                    handle(stream, behaviour, &requests, &streamed);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        receiver
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn allow(&self) -> String {
        self.addr.to_string()
    }
}

fn handle(mut stream: TcpStream, behaviour: Behaviour, requests: &Mutex<Vec<(String, Vec<u8>)>>, streamed: &AtomicU64) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    requests.lock().unwrap().push((head.clone(), body));
    let mut answer = |status: u16, body: &str| {
        let _ =
            write!(stream, "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    };
    match behaviour {
        Behaviour::Answer(status) => answer(status, "answer from the test receiver\r\nX-Injected: no"),
        Behaviour::Slow(delay) => {
            std::thread::sleep(delay);
            answer(200, "late");
        }
        Behaviour::Prometheus { authorization, body } => {
            if head.lines().any(|l| l.eq_ignore_ascii_case(&format!("authorization: {authorization}"))) {
                answer(200, body)
            } else {
                answer(401, "missing token")
            }
        }
        Behaviour::Stream => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n");
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..(1 << 30) / chunk.len() {
                if stream.write_all(&chunk).is_err() {
                    return;
                }
                streamed.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
        Behaviour::Trickle => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n");
            for _ in 0..1200 {
                if stream.write_all(b"x").is_err() {
                    return;
                }
                streamed.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
