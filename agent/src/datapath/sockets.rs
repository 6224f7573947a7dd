//! Finding the steered sockets a change leaves on the wrong backend, by their records in the
//! socket table (SOCKET_SLOTS and its spill table SOCKETS),
//! and destroying exactly those, on a worker thread of their own so that the control path never
//! waits for it.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    sync::mpsc::{channel, Receiver, Sender},
    time::{Duration, Instant},
};

use agent_common::{
    counter_slot, is_v4_mapped, SideCounters, SocketEntry, SocketSlot, SIDE_CANARY, SIDE_STABLE, SOCKET_UDP,
};
use aya::maps::{Array as BpfArray, HashMap as BpfHashMap, IterableMap, MapData};
use aya_obj::generated::{bpf_attr, bpf_cmd};

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
    /// every side it names say no record is open there. Reading the table takes 10-14 ms of CPU
    /// for the default 65,536 slots (read in batches); a service side whose weight dropped to 0
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
    /// table). Read while the programs change them: a slot taken meanwhile may show its new cookie
    /// with the entry of the socket before, which `destroy_sockets` then leaves alone, as it checks
    /// each socket's peer against the record's backend.
    pub fn records(&self) -> HashMap<u64, SocketEntry> {
        let mut records: HashMap<u64, SocketEntry> = self.spill.iter().filter_map(Result::ok).collect();
        let taken = |slot: &SocketSlot| slot.cookie != 0;
        match read_slots_batched(&self.slots) {
            Ok(slots) => records.extend(slots.iter().filter(|s| taken(s)).map(|s| (s.cookie, s.entry))),
            Err(err) => {
                // A kernel without batch lookups on arrays (before 5.6): one syscall per slot.
                log::debug!("reading the socket slots in batches: {err}; reading them one by one");
                records.extend(self.slots.iter().filter_map(Result::ok).filter(taken).map(|s| (s.cookie, s.entry)));
            }
        }
        records
    }
}

/// Slots read per `BPF_MAP_LOOKUP_BATCH` call: 64 KiB of slots.
const SLOTS_PER_BATCH: usize = 1024;

/// Every slot of the socket slot table, read with `BPF_MAP_LOOKUP_BATCH` (aya 0.14 has no batch
/// operations): one syscall per 1,024 slots instead of one per slot. The table's 65,536 default
/// slots take 64 syscalls and 10-14 ms of CPU (the kernel still copies slot by slot), where
/// reading them one by one took 37-41 ms (measured on the 2-CPU test VM).
fn read_slots_batched(slots: &BpfArray<MapData, SocketSlot>) -> std::io::Result<Vec<SocketSlot>> {
    let fd = slots.map().fd().as_fd().as_raw_fd();
    let mut all = Vec::with_capacity(slots.len() as usize);
    let mut keys = vec![0u32; SLOTS_PER_BATCH];
    let mut values = vec![SocketSlot::default(); SLOTS_PER_BATCH];
    // The kernel's cursor: where the previous batch stopped (none before the first).
    let mut cursor: Option<u32> = None;
    let mut next: u32 = 0;
    loop {
        // SAFETY: an all-zero bpf_attr is valid (the kernel requires unused fields to be zero),
        // and only its `batch` member is written and read; the pointers it carries stay valid
        // for the call and their buffers hold `count` keys and values.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        let result = unsafe {
            attr.batch.in_batch = cursor.as_ref().map_or(0, |c| c as *const u32 as u64);
            attr.batch.out_batch = &mut next as *mut u32 as u64;
            attr.batch.keys = keys.as_mut_ptr() as u64;
            attr.batch.values = values.as_mut_ptr() as u64;
            attr.batch.count = SLOTS_PER_BATCH as u32;
            attr.batch.map_fd = fd as u32;
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                &mut attr as *mut bpf_attr,
                std::mem::size_of::<bpf_attr>(),
            )
        };
        // ENOENT: the last batch (its count may still be above 0).
        let last = if result < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOENT) {
                return Err(err);
            }
            true
        } else {
            false
        };
        // SAFETY: the kernel wrote the count it copied back into the same member.
        let count = (unsafe { attr.batch.count } as usize).min(SLOTS_PER_BATCH);
        all.extend_from_slice(&values[..count]);
        if last || count == 0 {
            return Ok(all);
        }
        cursor = Some(next);
    }
}

/// How long a background job (one nobody waits on: connected UDP sockets after a weight drop or a
/// backend removal) waits for the jobs queued after it, so that they share one read of the socket
/// table. A read of the default 65,536 slots takes 10-14 ms of CPU even in batches; without the
/// wait, a run of weight changes (a job each) kept one of 2 CPUs reading and put the 99th
/// percentile from a weight change to its effect at 8-9 ms (2.3-2.6 ms with it). A job somebody
/// waits on (a rollback's termination) never waits.
const BACKGROUND_SETTLE: Duration = Duration::from_millis(250);

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
                // Ends when the Datapath (the only sender) is dropped. Jobs queued while one ran
                // are taken together and share one read of the socket table: a run of weight
                // changes queues a job each.
                while let Ok(first) = queue.recv() {
                    let mut jobs = vec![first];
                    // A job nobody waits on (connected UDP sockets after a weight drop) waits a
                    // moment for those a run of changes queues after it, so that they share one
                    // read; a job somebody waits on (a rollback's termination) ends the wait.
                    let settled = Instant::now() + BACKGROUND_SETTLE;
                    while jobs.iter().all(|job| job.outcome.is_none()) {
                        match queue.recv_timeout(settled.saturating_duration_since(Instant::now())) {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    jobs.extend(queue.try_iter());
                    let mut records: Option<HashMap<u64, SocketEntry>> = None;
                    for job in jobs {
                        let chosen: HashMap<u64, SocketAddr> = if sockets.may_hold(&job.selection) {
                            // Each chosen socket with the backend it was steered to: a socket now
                            // connected elsewhere (a UDP socket that connected again) is left
                            // alone.
                            records
                                .get_or_insert_with(|| sockets.records())
                                .iter()
                                .filter(|(_, entry)| job.selection.matches(entry))
                                .map(|(cookie, entry)| (*cookie, backend_of(entry)))
                                .collect()
                        } else {
                            HashMap::new()
                        };
                        let outcome = destroy_sockets(&cgroup, &chosen, TERMINATION_TIMEOUT);
                        if outcome.sockets > 0 || !outcome.errors.is_empty() || outcome.not_found > 0 {
                            log::info!(
                                "service id {}: destroyed {} steered sockets ({} chosen ones not found, searched \
                                 {} network namespaces){}",
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

    /// Against a real kernel array (root, as `cargo xtask test` runs): the batched read returns
    /// exactly what reading slot by slot does, over several batches and a partial last one.
    #[test]
    fn the_batched_slot_read_matches_the_slot_by_slot_read() {
        for len in [1u32, SLOTS_PER_BATCH as u32, 3 * SLOTS_PER_BATCH as u32 + 17] {
            let mut slots: BpfArray<MapData, SocketSlot> =
                BpfArray::create(len, 0).expect("creating a BPF array needs root (cargo xtask test)");
            for i in (0..len).step_by(7) {
                let mut slot =
                    SocketSlot { cookie: 1000 + u64::from(i), overflow: u64::from(i % 3), ..Default::default() };
                slot.entry = entry(i, (i % 2) as u8, "10.0.0.9:53", i % 5 == 0);
                slots.set(i, slot, 0).unwrap();
            }
            let one_by_one: Vec<SocketSlot> = slots.iter().map(Result::unwrap).collect();
            let batched = read_slots_batched(&slots).expect("BPF_MAP_LOOKUP_BATCH on an array");
            assert_eq!(batched.len(), len as usize);
            assert_eq!(batched, one_by_one, "{len} slots");
            assert_eq!(batched.iter().filter(|s| s.cookie != 0).count(), len.div_ceil(7) as usize);
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
