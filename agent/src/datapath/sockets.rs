//! Finding the steered sockets a change leaves on the wrong backend, by their records in the
//! socket table (SOCKET_SLOTS and its spill table SOCKETS),
//! and destroying exactly those, on a worker thread of their own so that the control path never
//! waits for it.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::mpsc::{channel, Receiver, Sender},
    time::Duration,
};

use agent_common::{
    counter_slot, is_v4_mapped, SideCounters, SocketEntry, SocketSlot, SIDE_CANARY, SIDE_STABLE, SOCKET_UDP,
};
use aya::maps::{Array as BpfArray, HashMap as BpfHashMap, MapData};

use super::{addr_words, TERMINATION_TIMEOUT};
use crate::terminate::{destroy_sockets, Destroyed};

/// Which socket records to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub service_id: u32,
    /// Only sockets steered to this side.
    pub side: Option<u8>,
    /// Only sockets steered to one of these backends (address words, port in network order).
    pub backends: Option<HashSet<([u32; 4], u16)>>,
    /// TCP connections too (connected UDP sockets always).
    pub tcp: bool,
}

impl Selection {
    /// Connected UDP sockets of a service steered to `side`.
    pub fn side(service_id: u32, side: u8) -> Self {
        Self { service_id, side: Some(side), backends: None, tcp: false }
    }

    /// Connected UDP sockets of a service steered to one of `backends`.
    pub fn backends(service_id: u32, backends: Vec<SocketAddr>) -> Self {
        let backends = backends.iter().map(|b| (addr_words(b), b.port().to_be())).collect();
        Self { service_id, side: None, backends: Some(backends), tcp: false }
    }

    /// TCP connections as well.
    pub fn with_tcp(self) -> Self {
        Self { tcp: true, ..self }
    }

    pub fn matches(&self, entry: &SocketEntry) -> bool {
        entry.service_id == self.service_id
            && (self.tcp || entry.flags & SOCKET_UDP != 0)
            && self.side.is_none_or(|side| entry.side == side)
            && self
                .backends
                .as_ref()
                .is_none_or(|backends| backends.contains(&(entry.backend_addr_be, entry.backend_port_be)))
    }
}

/// The backend a record says its socket was steered to.
fn backend_of(entry: &SocketEntry) -> SocketAddr {
    let mut octets = [0u8; 16];
    for (i, word) in entry.backend_addr_be.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    let ip = if is_v4_mapped(&entry.backend_addr_be) {
        IpAddr::V4(v6.to_ipv4_mapped().expect("v4-mapped"))
    } else {
        IpAddr::V6(v6)
    };
    SocketAddr::new(ip, u16::from_be(entry.backend_port_be))
}

/// A termination under way; `wait` gives its outcome.
#[derive(Debug)]
pub struct Termination {
    outcome: Receiver<Destroyed>,
}

impl Termination {
    /// Blocks until the termination is done (at most a little over `TERMINATION_TIMEOUT`).
    pub fn wait(self) -> Destroyed {
        self.outcome.recv_timeout(TERMINATION_TIMEOUT + Duration::from_secs(5)).unwrap_or_else(|_| Destroyed {
            errors: vec!["the termination worker did not answer".into()],
            ..Default::default()
        })
    }
}

struct Job {
    selection: Selection,
    outcome: Option<Sender<Destroyed>>,
}

/// The socket table, read by the agent: the slots and the spill table; and the counters, which
/// say whether a service side holds any record at all.
pub struct SocketRecords {
    pub slots: BpfArray<MapData, SocketSlot>,
    pub spill: BpfHashMap<MapData, u64, SocketEntry>,
    pub counters: Option<BpfArray<MapData, SideCounters>>,
}

impl SocketRecords {
    /// Whether the table may hold a record `selection` picks: false only when the counters of
    /// every side it names say no record is open there. Reading the table means one syscall per
    /// slot (65,536 by default, about 0.1 s of CPU); a service side whose weight dropped to 0
    /// usually has no connected UDP socket at all. Asked when the job runs, after the change that
    /// queued it: a `connect()` that read the frontend before the change has counted its record
    /// by then.
    pub fn may_hold(&self, selection: &Selection) -> bool {
        let Some(counters) = &self.counters else { return true };
        let sides = match selection.side {
            Some(side) => vec![side],
            None => vec![SIDE_STABLE, SIDE_CANARY],
        };
        sides.into_iter().any(|side| {
            counter_slot(selection.service_id, side)
                .and_then(|slot| counters.get(&slot, 0).ok())
                .is_none_or(|c| c.open_socket_records() > 0)
        })
    }

    /// Every record with its socket's cookie (a socket has one record, in a slot or in the spill
    /// table). Read slot by slot while the programs change them: a slot taken meanwhile may show
    /// its new cookie with the entry of the socket before, which `destroy_sockets` then leaves
    /// alone, as it checks each socket's peer against the record's backend.
    pub fn records(&self) -> HashMap<u64, SocketEntry> {
        let mut records: HashMap<u64, SocketEntry> = self.spill.iter().filter_map(Result::ok).collect();
        records.extend(self.slots.iter().filter_map(Result::ok).filter(|s| s.cookie != 0).map(|s| (s.cookie, s.entry)));
        records
    }
}

/// The worker: one thread that takes jobs in order. It reads the socket table through its own
/// handles.
pub struct Terminator {
    jobs: Sender<Job>,
}

impl Terminator {
    pub fn start(cgroup: PathBuf, sockets: SocketRecords) -> Self {
        let (jobs, queue) = channel::<Job>();
        std::thread::Builder::new()
            .name("sockshift-terminate".into())
            .spawn(move || {
                // Ends when the Datapath (the only sender) is dropped.
                for job in queue {
                    if !sockets.may_hold(&job.selection) {
                        if let Some(reply) = job.outcome {
                            let _ = reply.send(Destroyed::default());
                        }
                        continue;
                    }
                    // Each chosen socket with the backend it was steered to: a socket now
                    // connected elsewhere (a UDP socket that connected again) is left alone.
                    let chosen: HashMap<u64, SocketAddr> = sockets
                        .records()
                        .into_iter()
                        .filter(|(_, entry)| job.selection.matches(entry))
                        .map(|(cookie, entry)| (cookie, backend_of(&entry)))
                        .collect();
                    let outcome = destroy_sockets(&cgroup, &chosen, TERMINATION_TIMEOUT);
                    if outcome.sockets > 0 || !outcome.errors.is_empty() || outcome.not_found > 0 {
                        log::info!(
                            "service id {}: destroyed {} steered sockets ({} chosen ones not found, searched {} \
                             network namespaces){}",
                            job.selection.service_id,
                            outcome.sockets,
                            outcome.not_found,
                            outcome.namespaces,
                            if outcome.errors.is_empty() {
                                String::new()
                            } else {
                                format!("; {}", outcome.errors.join("; "))
                            }
                        );
                    }
                    if let Some(reply) = job.outcome {
                        let _ = reply.send(outcome);
                    }
                }
            })
            .expect("spawning the termination worker");
        Self { jobs }
    }

    /// Destroys the selected sockets; the handle tells how many.
    pub fn destroy(&self, selection: Selection) -> Termination {
        let (outcome, receiver) = channel();
        let _ = self.jobs.send(Job { selection, outcome: Some(outcome) });
        Termination { outcome: receiver }
    }

    /// Destroys the selected connected UDP sockets, without waiting.
    pub fn destroy_connected_udp(&self, selection: Selection) {
        let _ = self.jobs.send(Job { selection: Selection { tcp: false, ..selection }, outcome: None });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(service_id: u32, side: u8, backend: &str, udp: bool) -> SocketEntry {
        let backend: SocketAddr = backend.parse().unwrap();
        SocketEntry {
            backend_addr_be: addr_words(&backend),
            backend_port_be: backend.port().to_be(),
            service_id,
            side,
            flags: if udp { SOCKET_UDP } else { 0 },
            ..Default::default()
        }
    }

    #[test]
    fn a_record_gives_back_its_backend() {
        for backend in ["10.0.0.2:53", "[fd00::7]:8080"] {
            let backend: SocketAddr = backend.parse().unwrap();
            assert_eq!(backend_of(&entry(1, 0, &backend.to_string(), true)), backend);
        }
    }

    #[test]
    fn selections_pick_exactly_their_sockets() {
        let canary_udp = Selection::side(7, 1);
        assert!(canary_udp.matches(&entry(7, 1, "10.0.0.1:53", true)));
        assert!(!canary_udp.matches(&entry(7, 1, "10.0.0.1:53", false)), "TCP only with with_tcp");
        assert!(!canary_udp.matches(&entry(7, 0, "10.0.0.1:53", true)), "stable side");
        assert!(!canary_udp.matches(&entry(8, 1, "10.0.0.1:53", true)), "another service");
        assert!(Selection::side(7, 1).with_tcp().matches(&entry(7, 1, "10.0.0.1:80", false)));
        let gone = Selection::backends(7, vec!["10.0.0.2:53".parse().unwrap()]);
        assert!(gone.matches(&entry(7, 0, "10.0.0.2:53", true)));
        assert!(!gone.matches(&entry(7, 0, "10.0.0.3:53", true)));
        assert!(!gone.matches(&entry(7, 0, "10.0.0.2:54", true)), "same address, other port");
    }
}
