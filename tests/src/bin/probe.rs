//! sockshift-probe: the servers and clients the end-to-end tests and the demo run inside their
//! network namespaces and cgroups. Clients print one JSON object with what they saw.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
struct Probe {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// TCP servers: each accepted connection is sent TAG and a newline, then held until the
    /// client closes. `--listen ADDR=TAG`, repeatable; `ADDR=TAG!reset` resets each connection
    /// right after the tag. With `--netns`, one set per namespace. A line `close TAG` on stdin
    /// closes that tag's listeners (new connections are refused, open ones stay); `reset TAG`
    /// resets that tag's open connections (prints `reset TAG N`).
    ServeTcp {
        #[arg(long, required = true)]
        listen: Vec<String>,
        #[arg(long)]
        netns: Vec<PathBuf>,
    },
    /// UDP servers: every datagram is answered with TAG. `--listen ADDR=TAG`, repeatable.
    ServeUdp {
        #[arg(long, required = true)]
        listen: Vec<String>,
    },
    /// COUNT sequential TCP connections to TARGET; counts the tags read and whether
    /// getpeername() reported TARGET.
    Tcp {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: u32,
        /// Stop after this many seconds even if COUNT is not reached.
        #[arg(long, default_value_t = 120)]
        max_seconds: u64,
        /// After the tag, read until the server closes; a reset then counts as `reset_after_tag`.
        #[arg(long)]
        drain: bool,
        /// Also report the tags of every SEGMENT consecutive connections.
        #[arg(long, default_value_t = 0)]
        segment: u32,
        /// Give up a connection attempt after this many milliseconds (closing the socket).
        #[arg(long, default_value_t = 3000)]
        connect_timeout_ms: u64,
        /// After the tag, send a line and wait for the server to acknowledge it (an RTT sample).
        #[arg(long)]
        request: bool,
    },
    /// Opens COUNT TCP connections to TARGET and keeps them; prints `held {tags}`, waits for a
    /// line on stdin, then reports per tag how many are still open and how many were reset.
    Hold {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: u32,
    },
    /// Times COUNT connect() calls to TARGET (each closed with a reset, leaving no TIME_WAIT);
    /// reports the median and mean nanoseconds of the connect() call alone.
    ConnectCost {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: u32,
    },
    /// COUNT UDP exchanges with TARGET, each on a new unconnected socket (or, with
    /// `--one-socket`, all on one); counts tags and whether replies came from TARGET.
    Udp {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        one_socket: bool,
    },
    /// UDP sockets driven from stdin: SOCKETS sockets (connected to TARGET with `--connected`).
    /// Prints `ready`; then each line `send` sends one datagram on every socket and prints a JSON
    /// array with, per socket, the reply's tag and whether it came from TARGET, or the error;
    /// `reconnect` reads each socket's pending error and connects it to TARGET again (what an
    /// application does after ECONNABORTED), and prints `reconnected [errno or null, ...]`.
    UdpSession {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1)]
        sockets: u32,
        #[arg(long)]
        connected: bool,
    },
    /// One unconnected UDP socket sends a datagram to each of TARGETS (as musl's resolver asks
    /// every nameserver at once), then reads the replies: reports each reply's source and tag.
    UdpMulti {
        #[arg(long, value_delimiter = ',', required = true)]
        targets: Vec<SocketAddr>,
    },
    /// Another socket load balancer, for the tests: loads a cgroup/connect4 program named NAME
    /// that rewrites `--rewrite FROM=TO` (ip:port, IPv4) or does nothing, attaches it to CGROUP
    /// with a bpf link, prints `attached PROGRAM_ID`, and holds it until stdin closes.
    AttachForeign {
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        rewrite: Option<String>,
        /// `connect4`, or `sock_release` (a program that does nothing there; no `--rewrite`).
        #[arg(long, default_value = "connect4")]
        hook: String,
    },
    /// Opens and closes COUNT UDP sockets that each send one datagram to TARGET, BATCH open at
    /// a time; pauses (printing `paused`) with a batch open every PAUSE_EVERY sockets until a
    /// line arrives on stdin.
    Churn {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 1000)]
        batch: u32,
        #[arg(long, default_value_t = 0)]
        pause_every: u32,
    },
    /// Client traffic at RATE new TCP connections a second to TARGET for SECONDS, arriving at
    /// random (Poisson) like independent users, each on its own thread: connect with a
    /// CONNECT_TIMEOUT_MS timeout, read the tag, close. Prints `started UNIX_MS`, then one JSON
    /// report: tags, errors by kind, and failed attempts per 100 ms since the start.
    Load {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 3000)]
        connect_timeout_ms: u64,
    },
}

fn parse_listen(spec: &str) -> (SocketAddr, String) {
    let (addr, tag) = spec.rsplit_once('=').expect("--listen ADDR=TAG");
    (addr.parse().expect("--listen address"), tag.to_string())
}

fn enter_netns(path: &PathBuf) {
    let file = std::fs::File::open(path).expect("open netns");
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {}: {}", path.display(), std::io::Error::last_os_error());
}

/// Listening sockets by tag, for `close TAG`.
static LISTENERS: std::sync::Mutex<Vec<(String, i32)>> = std::sync::Mutex::new(Vec::new());
/// Open accepted connections by tag, for `reset TAG`. A serving thread removes its entry (under
/// the lock) before it closes the socket, so a listed fd is always the connection it names.
static OPEN: std::sync::Mutex<Vec<(String, i32)>> = std::sync::Mutex::new(Vec::new());

fn serve_tcp(listener: TcpListener, tag: String) {
    let (tag, reset) = match tag.strip_suffix("!reset") {
        Some(tag) => (tag.to_string(), true),
        None => (tag, false),
    };
    LISTENERS.lock().unwrap().push((tag.clone(), std::os::fd::AsRawFd::as_raw_fd(&listener)));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { break };
        let tag = tag.clone();
        thread::spawn(move || {
            let _ = stream.write_all(format!("{tag}\n").as_bytes());
            if reset {
                close_with_reset(&stream);
                return;
            }
            let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
            OPEN.lock().unwrap().push((tag.clone(), fd));
            let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
            let mut sink = [0u8; 256];
            while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
            OPEN.lock().unwrap().retain(|(_, open)| *open != fd);
        });
    }
}

fn bind_tcp(addr: SocketAddr) -> TcpListener {
    TcpListener::bind(addr).unwrap_or_else(|err| panic!("bind {addr}: {err}"))
}

fn main() {
    match Probe::parse().command {
        Command::ServeTcp { listen, netns } => {
            let specs: Vec<_> = listen.iter().map(|s| parse_listen(s)).collect();
            let mut threads = Vec::new();
            if netns.is_empty() {
                for (addr, tag) in specs {
                    let listener = bind_tcp(addr);
                    threads.push(thread::spawn(move || serve_tcp(listener, tag)));
                }
            } else {
                let (ready_tx, ready_rx) = std::sync::mpsc::channel();
                let expected = netns.len() * specs.len();
                for ns in netns {
                    for (addr, tag) in specs.clone() {
                        let (ns, ready) = (ns.clone(), ready_tx.clone());
                        threads.push(thread::spawn(move || {
                            enter_netns(&ns); // per thread: sockets made here live in `ns`
                            let listener = bind_tcp(addr);
                            ready.send(()).unwrap();
                            serve_tcp(listener, tag)
                        }));
                    }
                }
                for _ in 0..expected {
                    ready_rx.recv().expect("a server thread failed to bind");
                }
            }
            println!("ready");
            thread::spawn(|| {
                for line in std::io::stdin().lines().map_while(Result::ok) {
                    if let Some(tag) = line.strip_prefix("close ") {
                        for fd in LISTENERS.lock().unwrap().iter().filter(|(t, _)| t == tag).map(|(_, fd)| *fd) {
                            // Wakes the accept loop with an error; it then drops the listener.
                            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                        }
                        println!("closed {tag}");
                    } else if let Some(tag) = line.strip_prefix("reset ") {
                        let open = OPEN.lock().unwrap();
                        let mut count = 0;
                        for fd in open.iter().filter(|(t, _)| t == tag).map(|(_, fd)| *fd) {
                            // connect(AF_UNSPEC) disconnects a TCP socket, with a reset to the peer.
                            let unspec =
                                libc::sockaddr { sa_family: libc::AF_UNSPEC as libc::sa_family_t, sa_data: [0; 14] };
                            unsafe {
                                libc::connect(fd, &unspec, std::mem::size_of::<libc::sockaddr>() as libc::socklen_t)
                            };
                            count += 1;
                        }
                        println!("reset {tag} {count}");
                    }
                }
            });
            for t in threads {
                let _ = t.join();
            }
        }
        Command::ServeUdp { listen } => {
            let mut threads = Vec::new();
            for (addr, tag) in listen.iter().map(|s| parse_listen(s)) {
                let socket = UdpSocket::bind(addr).unwrap_or_else(|err| panic!("bind {addr}: {err}"));
                threads.push(thread::spawn(move || {
                    let mut buf = [0u8; 1500];
                    while let Ok((_, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(tag.as_bytes(), from);
                    }
                }));
            }
            println!("ready");
            for t in threads {
                let _ = t.join();
            }
        }
        Command::Tcp { target, count, max_seconds, drain, segment, connect_timeout_ms, request } => {
            let mut segments: Vec<BTreeMap<String, u32>> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(max_seconds);
            let mut tags: BTreeMap<String, u32> = BTreeMap::new();
            let mut errors: BTreeMap<String, u32> = BTreeMap::new();
            let (mut peer_is_target, mut peer_other) = (0u32, BTreeMap::<String, u32>::new());
            let mut reset_after_tag = 0u32;
            for i in 0..count {
                if Instant::now() > deadline {
                    break;
                }
                if segment > 0 && i % segment == 0 {
                    segments.push(BTreeMap::new());
                }
                match tcp_once(target, drain, Duration::from_millis(connect_timeout_ms), request) {
                    Ok((tag, peer, reset)) => {
                        reset_after_tag += reset as u32;
                        if let Some(current) = segments.last_mut() {
                            *current.entry(tag.clone()).or_default() += 1;
                        }
                        *tags.entry(tag).or_default() += 1;
                        if peer == target {
                            peer_is_target += 1;
                        } else {
                            *peer_other.entry(peer.to_string()).or_default() += 1;
                        }
                    }
                    Err(err) => *errors.entry(format!("{:?}", err.kind())).or_default() += 1,
                }
            }
            println!(
                "{}",
                json!({ "tags": tags, "errors": errors, "peer_is_target": peer_is_target, "peer_other": peer_other, "reset_after_tag": reset_after_tag, "segments": segments })
            );
        }
        Command::ConnectCost { target, count } => {
            let mut samples = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let started = Instant::now();
                let stream = TcpStream::connect(target).expect("connect");
                samples.push(started.elapsed().as_nanos() as u64);
                close_with_reset(&stream);
            }
            samples.sort_unstable();
            let mean = samples.iter().sum::<u64>() / samples.len().max(1) as u64;
            println!(
                "{}",
                json!({ "median_ns": samples[samples.len() / 2], "mean_ns": mean, "samples": samples.len() })
            );
        }
        Command::Hold { target, count } => {
            let mut held = Vec::new();
            let mut tags: BTreeMap<String, u32> = BTreeMap::new();
            for _ in 0..count {
                let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3)).expect("connect");
                stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut tag = Vec::new();
                let mut byte = [0u8; 1];
                while stream.read(&mut byte).expect("read tag") == 1 && byte[0] != b'\n' {
                    tag.push(byte[0]);
                }
                let tag = String::from_utf8_lossy(&tag).into_owned();
                *tags.entry(tag.clone()).or_default() += 1;
                held.push((tag, stream));
            }
            println!("held {}", json!(tags));
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).unwrap();
            let mut report: BTreeMap<String, BTreeMap<&str, u32>> = BTreeMap::new();
            for (tag, mut stream) in held {
                stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
                let mut buf = [0u8; 16];
                let status = match stream.read(&mut buf) {
                    Ok(0) => "closed",
                    Ok(_) => "data",
                    Err(err) => match err.kind() {
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "open",
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => "reset",
                        _ => "error",
                    },
                };
                *report.entry(tag).or_default().entry(status).or_default() += 1;
            }
            println!("{}", json!(report));
        }
        Command::Udp { target, count, one_socket } => {
            let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
            let mut tags: BTreeMap<String, u32> = BTreeMap::new();
            let mut errors: BTreeMap<String, u32> = BTreeMap::new();
            let (mut from_target, mut from_other) = (0u32, 0u32);
            let shared = one_socket.then(|| UdpSocket::bind(bind).expect("bind"));
            for _ in 0..count {
                let fresh;
                let socket = match &shared {
                    Some(s) => s,
                    None => {
                        fresh = UdpSocket::bind(bind).expect("bind");
                        &fresh
                    }
                };
                socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let mut buf = [0u8; 1500];
                let result = socket.send_to(b"q", target).and_then(|_| socket.recv_from(&mut buf));
                match result {
                    Ok((n, from)) => {
                        *tags.entry(String::from_utf8_lossy(&buf[..n]).into_owned()).or_default() += 1;
                        if from == target {
                            from_target += 1
                        } else {
                            from_other += 1
                        }
                    }
                    Err(err) => *errors.entry(format!("{:?}", err.kind())).or_default() += 1,
                }
            }
            println!(
                "{}",
                json!({ "tags": tags, "errors": errors, "from_target": from_target, "from_other": from_other })
            );
        }
        Command::UdpSession { target, sockets, connected } => udp_session(target, sockets, connected),
        Command::UdpMulti { targets } => {
            let bind: SocketAddr = if targets[0].is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
            let socket = UdpSocket::bind(bind).expect("bind");
            socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut errors: BTreeMap<String, u32> = BTreeMap::new();
            for target in &targets {
                if let Err(err) = socket.send_to(b"q", target) {
                    *errors.entry(format!("{:?}", err.kind())).or_default() += 1;
                }
            }
            let mut replies = Vec::new();
            let mut buf = [0u8; 1500];
            for _ in &targets {
                match socket.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        replies.push(json!({ "from": from.to_string(), "tag": String::from_utf8_lossy(&buf[..n]) }))
                    }
                    Err(err) => *errors.entry(format!("{:?}", err.kind())).or_default() += 1,
                }
            }
            println!("{}", json!({ "replies": replies, "errors": errors }));
        }
        Command::AttachForeign { cgroup, name, rewrite, hook } => {
            attach_foreign(&cgroup, &name, rewrite.as_deref(), &hook)
        }
        Command::Churn { target, count, batch, pause_every } => {
            let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
            let mut done = 0u32;
            let mut send_errors = 0u32;
            while done < count {
                let n = batch.min(count - done);
                let sockets: Vec<UdpSocket> = (0..n)
                    .map(|_| {
                        let s = UdpSocket::bind(bind).expect("bind");
                        if s.send_to(b"x", target).is_err() {
                            send_errors += 1;
                        }
                        s
                    })
                    .collect();
                done += n;
                if pause_every > 0 && done.is_multiple_of(pause_every) && done < count {
                    println!("paused {done} {}", sockets.len());
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).unwrap();
                }
                drop(sockets);
            }
            println!("{}", json!({ "sockets": done, "send_errors": send_errors }));
        }
        Command::Load { target, rate, seconds, connect_timeout_ms } => load(target, rate, seconds, connect_timeout_ms),
    }
}

/// Most attempts in flight at once: a bound on threads when the target black-holes them.
const LOAD_MAX_IN_FLIGHT: usize = 4096;

fn load(target: SocketAddr, rate: f64, seconds: f64, connect_timeout_ms: u64) {
    let started = Instant::now();
    let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    println!("started {unix_ms}");
    let _ = std::io::stdout().flush();
    let connect_timeout = Duration::from_millis(connect_timeout_ms);
    let (results, outcomes) = std::sync::mpsc::channel::<(Duration, Result<String, String>)>();
    let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // xorshift64 seeded from the clock: arrivals need to be random, not reproducible.
    let mut state = (unix_ms as u64) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut next = Duration::ZERO;
    let mut workers = Vec::new();
    let mut skipped = 0u64;
    loop {
        // Exponential gaps between arrivals: a Poisson process at `rate`.
        next += Duration::from_secs_f64(-(1.0 - uniform()).ln() / rate);
        if next.as_secs_f64() >= seconds {
            break;
        }
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            thread::sleep(wait);
        }
        if in_flight.load(std::sync::atomic::Ordering::Relaxed) >= LOAD_MAX_IN_FLIGHT {
            skipped += 1;
            continue;
        }
        in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (results, in_flight) = (results.clone(), in_flight.clone());
        workers.push(thread::spawn(move || {
            let at = started.elapsed();
            let outcome = TcpStream::connect_timeout(&target, connect_timeout)
                .and_then(|mut stream| {
                    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                    let mut tag = Vec::new();
                    let mut byte = [0u8; 1];
                    while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
                        tag.push(byte[0]);
                    }
                    Ok(String::from_utf8_lossy(&tag).into_owned())
                })
                .map_err(|err| format!("{:?}", err.kind()));
            in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            let _ = results.send((at, outcome));
        }));
    }
    drop(results);
    for worker in workers {
        let _ = worker.join();
    }
    let mut tags: BTreeMap<String, u32> = BTreeMap::new();
    let mut errors: BTreeMap<String, u32> = BTreeMap::new();
    let mut failures_by_100ms = vec![0u32; (seconds * 10.0).ceil() as usize + 1];
    let mut attempts = 0u32;
    for (at, outcome) in outcomes {
        attempts += 1;
        match outcome {
            Ok(tag) => *tags.entry(tag).or_default() += 1,
            Err(kind) => {
                *errors.entry(kind).or_default() += 1;
                let bucket = ((at.as_millis() / 100) as usize).min(failures_by_100ms.len() - 1);
                failures_by_100ms[bucket] += 1;
            }
        }
    }
    println!(
        "{}",
        json!({ "attempts": attempts, "skipped": skipped, "tags": tags, "errors": errors, "failures_by_100ms": failures_by_100ms })
    );
}

/// Waits (up to a second) until the peer has acknowledged everything sent (TIOCOUTQ is 0).
fn wait_until_acknowledged(stream: &TcpStream) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let mut unacked: libc::c_int = 0;
        let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(stream), libc::TIOCOUTQ, &mut unacked) };
        if rc != 0 || unacked == 0 || Instant::now() > deadline {
            return;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Linger 0: dropping the stream then sends RST instead of FIN (and leaves no TIME_WAIT).
fn close_with_reset(stream: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn tcp_once(
    target: SocketAddr,
    drain: bool,
    connect_timeout: Duration,
    request: bool,
) -> std::io::Result<(String, SocketAddr, bool)> {
    let mut stream = TcpStream::connect_timeout(&target, connect_timeout)?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let peer = stream.peer_addr()?;
    let mut tag = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
        tag.push(byte[0]);
    }
    if request {
        stream.write_all(b"request\n")?;
        // The kernel's ACK of this data is an RTT sample; give it time to arrive.
        wait_until_acknowledged(&stream);
    }
    let mut reset = false;
    if drain {
        // Our FIN lets a holding server close; a resetting one answers with RST.
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 256];
        loop {
            match stream.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(err) => {
                    reset = err.kind() == std::io::ErrorKind::ConnectionReset;
                    break;
                }
            }
        }
    }
    Ok((String::from_utf8_lossy(&tag).into_owned(), peer, reset))
}

/// See `Command::UdpSession`.
fn udp_session(target: SocketAddr, count: u32, connected: bool) {
    let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let sockets: Vec<UdpSocket> = (0..count)
        .map(|_| {
            let socket = UdpSocket::bind(bind).expect("bind");
            // A reply is a loopback echo: it comes within milliseconds, but a loaded 2-core CI
            // machine running the suite's heavy tests beside this one stalled one past 1 s.
            socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            if connected {
                socket.connect(target).expect("connect");
            }
            socket
        })
        .collect();
    println!("ready");
    for line in std::io::stdin().lines().map_while(Result::ok) {
        match line.trim() {
            "send" => {
                let mut results = Vec::new();
                for socket in &sockets {
                    let mut buf = [0u8; 1500];
                    let exchange = if connected {
                        socket.send(b"q").and_then(|_| socket.recv_from(&mut buf))
                    } else {
                        socket.send_to(b"q", target).and_then(|_| socket.recv_from(&mut buf))
                    };
                    results.push(match exchange {
                        Ok((n, from)) => {
                            json!({ "tag": String::from_utf8_lossy(&buf[..n]), "from_target": from == target })
                        }
                        Err(err) => json!({ "error": format!("{:?}", err.kind()), "errno": err.raw_os_error() }),
                    });
                }
                println!("{}", json!(results));
            }
            "reconnect" => {
                // An application reads the pending error (ECONNABORTED on a destroyed socket),
                // then connects again.
                let pending: Vec<Option<i32>> = sockets
                    .iter()
                    .map(|socket| {
                        let error = socket.take_error().expect("SO_ERROR").and_then(|e| e.raw_os_error());
                        socket.connect(target).expect("connect");
                        // What came while the socket was not connected (the late reply to an
                        // exchange its destruction interrupted) answers nothing it sends next.
                        // Connected, it receives only from its peer: what is queued now is all
                        // there is to drop.
                        socket.set_nonblocking(true).expect("non-blocking");
                        let mut buf = [0u8; 1500];
                        while socket.recv(&mut buf).is_ok() {}
                        socket.set_nonblocking(false).expect("blocking");
                        error
                    })
                    .collect();
                println!("reconnected {}", json!(pending));
            }
            _ => {}
        }
    }
}

/// See `Command::AttachForeign`: a hand-assembled program (no compiler needed), loaded and
/// attached with raw bpf(2) calls.
fn attach_foreign(cgroup: &std::path::Path, name: &str, rewrite: Option<&str>, hook: &str) {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;
    let (program_type, attach_type) = match hook {
        "connect4" => (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT),
        "sock_release" if rewrite.is_none() => (BPF_PROG_TYPE_CGROUP_SOCK, BPF_CGROUP_INET_SOCK_RELEASE),
        _ => panic!("--hook {hook}: connect4, or sock_release without --rewrite"),
    };
    /// One instruction: code, dst and src registers, offset, immediate.
    fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
        let mut raw = [0u8; 8];
        raw[0] = code;
        raw[1] = (src << 4) | dst;
        raw[2..4].copy_from_slice(&off.to_ne_bytes());
        raw[4..8].copy_from_slice(&imm.to_ne_bytes());
        raw
    }
    let (ldx_w, jne32_k, mov32_k, stx_w, mov64_k, exit) = (0x61, 0x56, 0xb4, 0x63, 0xb7, 0x95);
    // bpf_sock_addr: user_ip4 at 4, user_port at 24 (both network order).
    let mut program = Vec::new();
    if let Some(spec) = rewrite {
        let (from, to) = spec.split_once('=').expect("--rewrite FROM=TO");
        let (from, to): (std::net::SocketAddrV4, std::net::SocketAddrV4) =
            (from.parse().expect("FROM ip:port"), to.parse().expect("TO ip:port"));
        let ip = |a: &std::net::SocketAddrV4| u32::from_ne_bytes(a.ip().octets()) as i32;
        let port = |a: &std::net::SocketAddrV4| a.port().to_be() as i32;
        program.extend([
            insn(ldx_w, 2, 1, 4, 0),
            insn(jne32_k, 2, 0, 6, ip(&from)),
            insn(ldx_w, 2, 1, 24, 0),
            insn(jne32_k, 2, 0, 4, port(&from)),
            insn(mov32_k, 2, 0, 0, ip(&to)),
            insn(stx_w, 1, 2, 4, 0),
            insn(mov32_k, 2, 0, 0, port(&to)),
            insn(stx_w, 1, 2, 24, 0),
        ]);
    }
    program.extend([insn(mov64_k, 0, 0, 0, 1), insn(exit, 0, 0, 0, 0)]);
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    let put32 = |attr: &mut [u8; 128], at: usize, v: u32| attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    let put64 = |attr: &mut [u8; 128], at: usize, v: u64| attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    put32(&mut attr, 0, program_type);
    put32(&mut attr, 4, program.len() as u32);
    put64(&mut attr, 8, program.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    let name_bytes = name.as_bytes();
    attr[48..48 + name_bytes.len().min(15)].copy_from_slice(&name_bytes[..name_bytes.len().min(15)]);
    put32(&mut attr, 68, attach_type);
    let prog = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_mut_ptr(), attr.len()) };
    assert!(prog >= 0, "BPF_PROG_LOAD: {}", std::io::Error::last_os_error());
    let dir = std::fs::File::open(cgroup).expect("open cgroup");
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, prog as u32);
    put32(&mut attr, 4, std::os::fd::AsRawFd::as_raw_fd(&dir) as u32);
    put32(&mut attr, 8, attach_type);
    let link = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, attr.as_mut_ptr(), attr.len()) };
    assert!(link >= 0, "BPF_LINK_CREATE: {}", std::io::Error::last_os_error());
    // The program's id, from /proc/self/fdinfo of its fd.
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{prog}")).expect("fdinfo");
    let id = info.lines().find_map(|l| l.strip_prefix("prog_id:")).map(str::trim).unwrap_or("?").to_string();
    println!("attached {id}");
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    // Exiting closes the link fd: the program detaches.
}
