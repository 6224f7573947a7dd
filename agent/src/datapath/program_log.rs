//! The programs' own log (`agent.datapath_log`): aya-log records from the loaded object's
//! AYA_LOGS ring buffer, read by one thread and written to the agent's log under the target
//! `datapath`, with the numbers the kernel logs (service ids, sides, reasons) given their names.
//!
//! The reader follows the programs: when they are replaced (a new level), it drains the old
//! object's buffer once more, then reads the new one; at `off` it reads nothing.
//!
//! Each named record also goes to a [`RecordFeed`], which `GET /v1/datapath/log` (and so
//! `sockshift logs --datapath`) follows; with no one following, nothing is sent.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    os::fd::AsRawFd,
    sync::{mpsc, Arc, RwLock},
    time::Duration,
};

use agent_common::{
    LOG_CALL_CONNECT, LOG_CALL_DATAGRAM, LOG_KEY_CGROUP, LOG_KEY_CONNECTION, LOG_KEY_NETNS, LOG_REASON_BACKEND_MISSING,
    LOG_REASON_FLOW_TABLE_FULL, LOG_REASON_NETNS_FULL, LOG_REASON_NO_BACKEND_FAMILY, LOG_REASON_TABLE_FULL,
};
use aya::Ebpf;
use aya_log::EbpfLogger;

/// Target of the datapath's records in the agent's log.
pub const LOG_TARGET: &str = "datapath";

/// How long the reader sleeps in poll(2) before it looks for a new buffer: a replaced buffer is
/// picked up within this.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Records kept for a follower that falls behind; beyond this it is told how many it missed.
const FEED_BACKLOG: usize = 4096;

/// The named records as they are read, for whoever follows them (`GET /v1/datapath/log`).
pub type RecordFeed = tokio::sync::broadcast::Sender<String>;

/// Service id -> name, as the datapath holds them; written by the datapath, read per record.
pub type ServiceNames = Arc<RwLock<HashMap<u32, String>>>;

/// Hands the reader thread each loaded object's buffer.
pub struct LogReader {
    swap: mpsc::Sender<Option<EbpfLogger<Sink>>>,
    names: ServiceNames,
    feed: RecordFeed,
}

impl LogReader {
    pub fn start() -> Self {
        let (swap, buffers) = mpsc::channel();
        let names = ServiceNames::default();
        let (feed, _) = tokio::sync::broadcast::channel(FEED_BACKLOG);
        // The reader ends when the datapath (the sender) goes.
        let spawned = std::thread::Builder::new().name("datapath-log".into()).spawn(move || read(buffers));
        if let Err(err) = spawned {
            log::error!("cannot start the datapath log reader ({err}); datapath_log records are not read");
        }
        Self { swap, names, feed }
    }

    /// The records as they are read, for followers.
    pub fn feed(&self) -> RecordFeed {
        self.feed.clone()
    }

    /// Reads the log of `ebpf` (just loaded) from now on; `None` (level `off`): nothing.
    pub fn follow(&self, ebpf: Option<&mut Ebpf>) {
        let logger = ebpf.and_then(|ebpf| {
            match EbpfLogger::init_with_logger(ebpf, Sink { names: self.names.clone(), feed: self.feed.clone() }) {
                Ok(logger) => Some(logger),
                Err(err) => {
                    log::error!("cannot read the datapath log: {err}");
                    None
                }
            }
        });
        let _ = self.swap.send(logger);
    }

    /// The names the records get, by service id.
    pub fn set_names(&self, names: HashMap<u32, String>) {
        if let Ok(mut held) = self.names.write() {
            *held = names;
        }
    }
}

fn read(buffers: mpsc::Receiver<Option<EbpfLogger<Sink>>>) {
    let mut current: Option<EbpfLogger<Sink>> = None;
    loop {
        let next = if current.is_some() { buffers.try_recv() } else { buffers.recv().map_err(Into::into) };
        match next {
            Ok(next) => {
                if let Some(old) = current.as_mut() {
                    old.flush(); // what the replaced programs wrote last
                }
                current = next;
            }
            Err(mpsc::TryRecvError::Empty) => {}
            Err(mpsc::TryRecvError::Disconnected) => return,
        }
        if let Some(logger) = current.as_mut() {
            let mut fd = libc::pollfd { fd: logger.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // Sound: one valid pollfd, for the call's duration.
            unsafe { libc::poll(&mut fd, 1, POLL_INTERVAL.as_millis() as libc::c_int) };
            logger.flush();
        }
    }
}

/// Writes each record to the agent's log, named, and to the followers.
pub struct Sink {
    names: ServiceNames,
    feed: RecordFeed,
}

impl log::Log for Sink {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        let line = match self.names.read() {
            Ok(names) => describe(&text, &names),
            Err(_) => describe(&text, &HashMap::new()),
        };
        if self.feed.receiver_count() > 0 {
            // Fails only when the last follower left meanwhile.
            let _ = self.feed.send(line.clone());
        }
        // At the agent's info level whatever the record's: agent.datapath_log is the filter.
        log::info!(target: LOG_TARGET, "{line}");
    }

    fn flush(&self) {}
}

/// A record as the kernel wrote it (`steer service_id=3 call=0 side=1 backend=::ffff:10.0.0.2
/// port=8080 ...`) with its numbers named (`steer service=web call=connect side=canary
/// backend=10.0.0.2:8080 ...`).
pub fn describe(text: &str, names: &HashMap<u32, String>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut tokens = text.split(' ').peekable();
    while let Some(token) = tokens.next() {
        let Some((field, value)) = token.split_once('=') else {
            out.push(token.to_string());
            continue;
        };
        let number: Option<u64> = value.parse().ok();
        let named = match (field, number) {
            ("service_id", Some(id)) => match u32::try_from(id).ok().and_then(|id| names.get(&id)) {
                Some(name) => format!("service={name}"),
                None => format!("service_id={id}"),
            },
            ("call", Some(call)) => format!("call={}", call_name(call)),
            ("side", Some(side)) => format!("side={}", if side == 0 { "stable" } else { "canary" }),
            ("key", Some(kind)) => format!("key={}", key_name(kind)),
            ("cohort", Some(cohort)) => format!("cohort={}", cohort_name(cohort)),
            ("reason", Some(reason)) => format!("reason={}", reason_name(reason)),
            ("backend" | "frontend", None) => {
                // An address, then its port: one `addr:port`.
                let port = tokens.next_if(|t| t.starts_with("port=")).map(|t| t["port=".len()..].to_string());
                let addr = value.parse::<Ipv6Addr>().map(|v6| match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(v6),
                });
                match (addr, port) {
                    (Ok(IpAddr::V4(v4)), Some(port)) => format!("{field}={v4}:{port}"),
                    (Ok(IpAddr::V6(v6)), Some(port)) => format!("{field}=[{v6}]:{port}"),
                    (Ok(addr), None) => format!("{field}={addr}"),
                    (Err(_), _) => token.to_string(),
                }
            }
            _ => token.to_string(),
        };
        out.push(named);
    }
    out.join(" ")
}

fn call_name(call: u64) -> &'static str {
    match u8::try_from(call) {
        Ok(LOG_CALL_CONNECT) => "connect",
        Ok(LOG_CALL_DATAGRAM) => "datagram",
        _ => "unknown",
    }
}

fn key_name(kind: u64) -> &'static str {
    match u8::try_from(kind) {
        Ok(LOG_KEY_CONNECTION) => "connection",
        Ok(LOG_KEY_NETNS) => "client_netns",
        Ok(LOG_KEY_CGROUP) => "client_cgroup",
        _ => "unknown",
    }
}

fn cohort_name(cohort: u64) -> &'static str {
    match u32::try_from(cohort) {
        Ok(agent_common::COHORT_ALWAYS_CANARY) => "always_canary",
        Ok(agent_common::COHORT_NEVER_CANARY) => "never_canary",
        _ => "none",
    }
}

fn reason_name(reason: u64) -> &'static str {
    match u8::try_from(reason) {
        Ok(LOG_REASON_NO_BACKEND_FAMILY) => "no_backend_of_family",
        Ok(LOG_REASON_BACKEND_MISSING) => "backend_slot_missing",
        Ok(LOG_REASON_TABLE_FULL) => "socket_table_full",
        Ok(LOG_REASON_NETNS_FULL) => "socket_netns_full",
        Ok(LOG_REASON_FLOW_TABLE_FULL) => "udp_flow_table_full",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_named() {
        let names = HashMap::from([(3, "web".to_string())]);
        let line = describe(
            "steer service_id=3 call=0 side=1 backend=::ffff:10.0.0.2 port=8080 bucket=12 weight_ppm=200000 key=1 \
             cohort=0",
            &names,
        );
        assert_eq!(
            line,
            "steer service=web call=connect side=canary backend=10.0.0.2:8080 bucket=12 weight_ppm=200000 \
             key=client_netns cohort=none"
        );
        let line = describe("fail_open service_id=9 call=1 side=0 reason=2 frontend=fd00::1 port=53", &names);
        assert_eq!(
            line,
            "fail_open service_id=9 call=datagram side=stable reason=socket_table_full frontend=[fd00::1]:53"
        );
    }
}
