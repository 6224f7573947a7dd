//! A real 3-member etcd cluster for the cluster-mode tests: Debian's `etcd` on free loopback
//! ports, data directories under a temporary directory, optionally with TLS and client
//! certificates (a CA, server and client certificates generated at test time with rcgen).
//! Everything is killed and removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::{free_port, unique_name};

/// Members in every test cluster: the smallest that survives losing one.
pub const MEMBERS: usize = 3;

/// PEM files of a test PKI.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Signed by `ca`: etcd accepts it.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA etcd does not trust, and a client certificate it signed: etcd refuses it.
    pub rogue_ca: PathBuf,
    pub rogue_client_cert: PathBuf,
    pub rogue_client_key: PathBuf,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    process: Option<Child>,
}

/// A running etcd cluster, killed and removed on drop.
pub struct EtcdCluster {
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
    tls: Option<TlsFiles>,
}

impl EtcdCluster {
    /// Three members over plain HTTP, healthy when this returns.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Three members that serve clients over TLS and require a client certificate signed by
    /// their CA (`--client-cert-auth`).
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let token = unique_name("etcd");
        let dir = std::env::temp_dir().join(&token);
        std::fs::create_dir_all(&dir).unwrap();
        let tls = tls.then(|| generate_pki(&dir));
        let members = (0..MEMBERS)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.join(format!("m{i}.data")),
                log: dir.join(format!("m{i}.log")),
                process: None,
            })
            .collect();
        let mut cluster = Self { dir, token, members, tls };
        for i in 0..MEMBERS {
            cluster.start_member(i);
        }
        cluster.wait_healthy(&[0, 1, 2], Duration::from_secs(30));
        cluster
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.members[i].client_port)
    }

    /// Client port of member `i` (for a [`TcpProxy`] in front of it).
    pub fn client_port(&self, i: usize) -> u16 {
        self.members[i].client_port
    }

    pub fn endpoints(&self) -> Vec<String> {
        (0..MEMBERS).map(|i| self.endpoint(i)).collect()
    }

    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// A `[cluster]` config for these endpoints (with the good client certificate under TLS).
    pub fn cluster_config(&self, node: &str, prefix: &str) -> agent::cluster::ClusterConfig {
        let mut config = agent::cluster::ClusterConfig::new(self.endpoints());
        config.node = Some(node.to_string());
        config.prefix = prefix.to_string();
        if let Some(tls) = &self.tls {
            config.ca_file = Some(tls.ca.clone());
            config.cert_file = Some(tls.client_cert.clone());
            config.key_file = Some(tls.client_key.clone());
        }
        config
    }

    /// Starts (or restarts, on its data) member `i`; does not wait for it to be healthy.
    pub fn start_member(&mut self, i: usize) {
        assert!(self.members[i].process.is_none(), "etcd member {i} is already running");
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let scheme = self.scheme();
        let member = &self.members[i];
        let client_url = format!("{scheme}://127.0.0.1:{}", member.client_port);
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&member.log).unwrap();
        let mut cmd = Command::new("etcd");
        cmd.arg(format!("--name={}", member.name))
            .arg(format!("--data-dir={}", member.data_dir.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg("--initial-cluster-state=new")
            // Loopback: a quick heartbeat elects a new leader within about a second of a kill.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cert-file={}", tls.server_cert.display()))
                .arg(format!("--key-file={}", tls.server_key.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca.display()))
                .arg("--client-cert-auth");
        }
        // etcd 3.4 refuses to start on anything but amd64 (and, from 3.5, arm64) unless told
        // the architecture is deliberate.
        if std::env::consts::ARCH != "x86_64" {
            let go_arch = match std::env::consts::ARCH {
                "aarch64" => "arm64",
                "powerpc64" => "ppc64le",
                other => other,
            };
            cmd.env("ETCD_UNSUPPORTED_ARCH", go_arch);
        }
        let child = cmd.spawn().expect("start etcd (Debian's etcd-server; `cargo xtask test` installs it)");
        self.members[i].process = Some(child);
    }

    /// SIGKILLs member `i` (no goodbye to its peers or clients).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILLs every member: etcd is gone for every client.
    pub fn stop_all(&mut self) {
        for i in 0..MEMBERS {
            self.kill_member(i);
        }
    }

    /// Starts every stopped member on its data and waits until all are healthy.
    pub fn restart_all(&mut self) {
        for i in 0..MEMBERS {
            if self.members[i].process.is_none() {
                self.start_member(i);
            }
        }
        self.wait_healthy(&[0, 1, 2], Duration::from_secs(30));
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].process.is_some()
    }

    /// Waits until each member in `members` answers a linearizable read (so the cluster has a
    /// leader and quorum).
    pub fn wait_healthy(&self, members: &[usize], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let endpoints: Vec<String> = members.iter().map(|&i| self.endpoint(i)).collect();
        loop {
            let output = self.etcdctl_at(&endpoints, &["endpoint", "health"]);
            if output.status.success() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd members {members:?} not healthy after {timeout:?}: {}\n{}",
                    String::from_utf8_lossy(&output.stderr),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs etcdctl against the running members (with the good client certificate).
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let endpoints: Vec<String> = (0..MEMBERS).filter(|&i| self.is_running(i)).map(|i| self.endpoint(i)).collect();
        self.etcdctl_at(&endpoints, args)
    }

    /// etcdctl that must succeed; returns its stdout.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        let output = self.etcdctl(args);
        assert!(output.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn etcdctl_at(&self, endpoints: &[String], args: &[&str]) -> Output {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=5s");
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cacert={}", tls.ca.display()))
                .arg(format!("--cert={}", tls.client_cert.display()))
                .arg(format!("--key={}", tls.client_key.display()));
        }
        cmd.args(args).output().expect("run etcdctl (Debian's etcd-client; `cargo xtask test` installs it)")
    }

    /// The cluster's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl_ok(&["get", "/", "--prefix", "--keys-only", "--limit=1", "--write-out=json"]);
        let json: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        json["header"]["revision"].as_i64().expect("header.revision")
    }

    /// Compacts the history up to the current revision (physically, so it is really gone).
    /// Returns the revision compacted to.
    pub fn compact(&self) -> i64 {
        let revision = self.revision();
        self.etcdctl_ok(&["compact", &revision.to_string(), "--physical"]);
        revision
    }

    /// Every member's log, for a failure message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!("--- {} ---\n{}", m.name, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA, a server certificate for 127.0.0.1 (also a client certificate: etcd's gateway dials
/// its own TLS port with it), a client certificate, and a second CA with its own client.
fn generate_pki(dir: &Path) -> TlsFiles {
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca = new_ca("sockshift test CA");
    let rogue = new_ca("rogue CA");
    let (server_cert, server_key) = leaf(
        &ca,
        "etcd",
        &["127.0.0.1", "localhost"],
        &[ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
    );
    let (client_cert, client_key) = leaf(&ca, "sockshift-agent", &[], &[ExtendedKeyUsagePurpose::ClientAuth]);
    let (rogue_cert, rogue_key) = leaf(&rogue, "sockshift-agent", &[], &[ExtendedKeyUsagePurpose::ClientAuth]);
    TlsFiles {
        ca: write("ca.pem", ca.pem()),
        server_cert: write("server.pem", server_cert),
        server_key: write("server-key.pem", server_key),
        client_cert: write("client.pem", client_cert),
        client_key: write("client-key.pem", client_key),
        rogue_ca: write("rogue-ca.pem", rogue.pem()),
        rogue_client_cert: write("rogue-client.pem", rogue_cert),
        rogue_client_key: write("rogue-client-key.pem", rogue_key),
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate signed by `ca`: (certificate PEM, key PEM).
fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    sans: &[&str],
    usages: &[ExtendedKeyUsagePurpose],
) -> (String, String) {
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = usages.to_vec();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A TCP forwarder on loopback to one etcd member, which a test can cut (every connection
/// through it closed, new ones closed at once) and restore: a client partitioned from etcd
/// while etcd itself goes on (and compacts, say).
pub struct TcpProxy {
    pub port: u16,
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct ProxyState {
    cut: bool,
    stopping: bool,
    connections: Vec<std::net::TcpStream>,
}

impl TcpProxy {
    /// Forwards 127.0.0.1:<port> to 127.0.0.1:`target_port`.
    pub fn start(target_port: u16) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(std::sync::Mutex::new(ProxyState::default()));
        let shared = state.clone();
        let accept = std::thread::spawn(move || {
            for incoming in listener.incoming() {
                let Ok(client) = incoming else { continue };
                let mut state = shared.lock().unwrap();
                if state.stopping {
                    return;
                }
                if state.cut {
                    continue; // dropped: closed at once
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target_port)) else { continue };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
                state.connections.push(client);
                state.connections.push(server);
            }
        });
        Self { port, state, accept: Some(accept) }
    }

    /// The proxy's client URL.
    pub fn endpoint(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Closes every connection through the proxy and refuses new ones until `restore`.
    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.cut = true;
        for connection in state.connections.drain(..) {
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.state.lock().unwrap().cut = false;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.state.lock().unwrap().stopping = true;
        // Wake the accept loop so that it sees `stopping`.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}
