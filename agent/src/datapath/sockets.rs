//! Finding the steered sockets a change leaves on the wrong backend, by their records in the
//! socket table (SOCKET_SLOTS and its spill table SOCKETS),
//! and destroying exactly those, on a worker thread of their own so that the control path never
//! waits for it.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::PathBuf,
    sync::mpsc::{channel, Receiver, Sender},
    time::{Duration, Instant},
};

use agent_common::{
    counter_slot, is_v4_mapped, SideCounters, SocketEntry, SocketSlot, SIDE_CANARY, SIDE_STABLE, SOCKET_UDP,
};
use aya::maps::{Array as BpfArray, HashMap as BpfHashMap, IterableMap, MapData};

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
    queued: Instant,
}

impl Job {
    fn new(selection: Selection, outcome: Option<Sender<Destroyed>>) -> Self {
        Self { selection, outcome, queued: Instant::now() }
    }
}

/// What the worker is sent.
enum Work {
    Destroy(Job),
    /// The sockets this selection picks are wanted again (the side's weight rose from 0, the
    /// backends came back): a background job queued before and not yet run no longer picks them.
    Keep(Selection),
}

impl Selection {
    /// This selection without what `keep` picks again: `None` when nothing is left. Only the
    /// exact shapes the datapath queues are narrowed (a side by its side, backends by backends);
    /// anything else is left as it is, which errs on the side of destroying.
    fn without(self, keep: &Selection) -> Option<Selection> {
        if self.service_id != keep.service_id || self.tcp != keep.tcp {
            return Some(self);
        }
        match (&self.side, &self.backends, &keep.side, &keep.backends) {
            (Some(side), None, Some(kept), None) if side == kept => None,
            (None, Some(backends), None, Some(kept)) => {
                let left: HashSet<([u32; 4], u16)> = backends.difference(kept).copied().collect();
                (!left.is_empty()).then_some(Selection { backends: Some(left), ..self })
            }
            _ => Some(self),
        }
    }
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
        // A slot's record, if the slot is taken.
        let record = |slot: &SocketSlot| (slot.cookie != 0).then_some((slot.cookie, slot.entry));
        let mut batched = HashMap::new();
        let read = for_each_slot_batch(&self.slots, |batch| batched.extend(batch.iter().filter_map(record)));
        match read {
            Ok(()) => records.extend(batched),
            Err(err) => {
                // Should a kernel refuse batch lookups on this array: one syscall per slot.
                log::warn!("reading the socket slots in batches: {err}; reading them one by one");
                records.extend(self.slots.iter().filter_map(Result::ok).filter_map(|slot| record(&slot)));
            }
        }
        records
    }
}

/// Slots read per `BPF_MAP_LOOKUP_BATCH` call: 64 KiB of slots.
const SLOTS_PER_BATCH: usize = 1024;

/// Every slot of the socket slot table, batch by batch, read with `BPF_MAP_LOOKUP_BATCH` (aya 0.14
/// has no batch operations): one syscall per 1,024 slots instead of one per slot, and one batch in
/// memory at a time. The table's 65,536 default slots take 10-14 ms of CPU (the kernel still
/// copies slot by slot), where reading them one by one took 37-41 ms (measured on the 2-CPU test
/// VM).
fn for_each_slot_batch(slots: &BpfArray<MapData, SocketSlot>, batch: impl FnMut(&[SocketSlot])) -> std::io::Result<()> {
    crate::bpf_sys::array_lookup_batches(slots.map().fd().as_fd(), slots.len(), SLOTS_PER_BATCH, batch)
}

/// How long a background job (one nobody waits on: connected UDP sockets after a weight drop or a
/// backend removal) waits, from when it was queued, for the jobs queued after it, so that they
/// share one read of the socket table. A read of the default 65,536 slots takes 10-14 ms of CPU
/// even in batches; without the wait, a run of weight changes (a job each) kept one of 2 CPUs
/// reading and put the 99th percentile from a weight change to its effect at 8-12 ms (2.4-3.9 ms
/// with it, release build). A change that undoes the job's cause meanwhile (the weight back above
/// 0, the backend back) takes its sockets out of it (`Work::Keep`). A job somebody waits on (a
/// rollback's termination) never waits.
const BACKGROUND_SETTLE: Duration = Duration::from_millis(250);

/// Jobs taken together: background ones waiting to settle, and any that somebody waits on.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
}

impl Batch {
    fn take(&mut self, work: Work) {
        match work {
            Work::Destroy(job) => self.jobs.push(job),
            Work::Keep(keep) => {
                // Only background jobs: a job somebody waits on was asked for as it is.
                self.jobs = std::mem::take(&mut self.jobs)
                    .into_iter()
                    .filter_map(|job| match job.outcome {
                        Some(_) => Some(job),
                        None => job.selection.without(&keep).map(|selection| Job { selection, ..job }),
                    })
                    .collect();
            }
        }
    }

    fn anyone_waits(&self) -> bool {
        self.jobs.iter().any(|job| job.outcome.is_some())
    }

    /// When the oldest job has settled (the worker asks only while nobody waits).
    fn settled(&self) -> Option<Instant> {
        self.jobs.iter().map(|job| job.queued).min().map(|queued| queued + BACKGROUND_SETTLE)
    }
}

/// Logs a destruction that did something (or failed).
fn log_outcome(services: &str, outcome: &Destroyed) {
    if outcome.sockets > 0 || !outcome.errors.is_empty() || outcome.not_found > 0 {
        log::info!(
            "service id {services}: destroyed {} steered sockets ({} chosen ones not found, searched {} network \
             namespaces){}",
            outcome.sockets,
            outcome.not_found,
            outcome.namespaces,
            if outcome.errors.is_empty() { String::new() } else { format!("; {}", outcome.errors.join("; ")) }
        );
    }
}

/// The worker: one thread that takes jobs in order. It reads the socket table through its own
/// handles.
pub struct Terminator {
    work: Sender<Work>,
}

impl Terminator {
    pub fn start(cgroup: PathBuf, sockets: SocketRecords) -> Self {
        let (work, queue) = channel::<Work>();
        std::thread::Builder::new()
            .name("sockshift-terminate".into())
            .spawn(move || {
                // Ends when the Datapath (the only sender) is dropped.
                while let Ok(first) = queue.recv() {
                    let mut batch = Batch::default();
                    batch.take(first);
                    // Background jobs wait until the oldest has settled, unless somebody waits.
                    while let Some(settled) = batch.settled().filter(|_| !batch.anyone_waits()) {
                        match queue.recv_timeout(settled.saturating_duration_since(Instant::now())) {
                            Ok(work) => batch.take(work),
                            Err(_) => break,
                        }
                    }
                    for work in queue.try_iter() {
                        batch.take(work);
                    }
                    let mut records: Option<HashMap<u64, SocketEntry>> = None;
                    let mut choose = |selection: &Selection| -> HashMap<u64, SocketAddr> {
                        if !sockets.may_hold(selection) {
                            return HashMap::new();
                        }
                        // Each chosen socket with the backend it was steered to: a socket now
                        // connected elsewhere (a UDP socket that connected again) is left alone.
                        records
                            .get_or_insert_with(|| sockets.records())
                            .iter()
                            .filter(|(_, entry)| selection.matches(entry))
                            .map(|(cookie, entry)| (*cookie, backend_of(entry)))
                            .collect()
                    };
                    // Those somebody waits on first, each on its own; then every background job's
                    // sockets in one pass (the same socket chosen twice is destroyed once).
                    let (waited, background): (Vec<Job>, Vec<Job>) =
                        batch.jobs.into_iter().partition(|job| job.outcome.is_some());
                    let mut destroyed = HashSet::new();
                    for job in waited {
                        let chosen = choose(&job.selection);
                        destroyed.extend(chosen.keys().copied());
                        let outcome = destroy_sockets(&cgroup, &chosen, TERMINATION_TIMEOUT);
                        log_outcome(&job.selection.service_id.to_string(), &outcome);
                        if let Some(reply) = job.outcome {
                            let _ = reply.send(outcome);
                        }
                    }
                    let mut chosen = HashMap::new();
                    let mut services = std::collections::BTreeSet::new();
                    for job in &background {
                        services.insert(job.selection.service_id);
                        chosen.extend(
                            choose(&job.selection).into_iter().filter(|(cookie, _)| !destroyed.contains(cookie)),
                        );
                    }
                    let outcome = destroy_sockets(&cgroup, &chosen, TERMINATION_TIMEOUT);
                    let services: Vec<String> = services.iter().map(u32::to_string).collect();
                    log_outcome(&services.join(", "), &outcome);
                }
            })
            .expect("spawning the termination worker");
        Self { work }
    }

    /// Destroys the selected sockets; the handle tells how many.
    pub fn destroy(&self, selection: Selection) -> Termination {
        let (outcome, receiver) = channel();
        let _ = self.work.send(Work::Destroy(Job::new(selection, Some(outcome))));
        Termination { outcome: receiver }
    }

    /// Destroys the selected connected UDP sockets, without waiting.
    pub fn destroy_connected_udp(&self, selection: Selection) {
        let selection = Selection { tcp: false, ..selection };
        let _ = self.work.send(Work::Destroy(Job::new(selection, None)));
    }

    /// The connected UDP sockets `selection` picks are wanted again (the weight rose from 0, the
    /// backends are back): background jobs still waiting leave them alone.
    pub fn keep_connected_udp(&self, selection: Selection) {
        let _ = self.work.send(Work::Keep(Selection { tcp: false, ..selection }));
    }

    /// A service's canary weight went from `was_ppm` to `now_ppm`: a drop to 0 destroys the
    /// canary's connected UDP sockets, a rise from 0 takes them out of a drop still waiting.
    pub fn canary_weight_changed(&self, service_id: u32, was_ppm: u32, now_ppm: u32) {
        if was_ppm > 0 && now_ppm == 0 {
            self.destroy_connected_udp(Selection::side(service_id, SIDE_CANARY));
        } else if was_ppm == 0 && now_ppm > 0 {
            self.keep_connected_udp(Selection::side(service_id, SIDE_CANARY));
        }
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
            let mut batched = Vec::new();
            let mut batches = 0;
            for_each_slot_batch(&slots, |batch| {
                assert!(batch.len() <= SLOTS_PER_BATCH);
                batches += 1;
                batched.extend_from_slice(batch);
            })
            .expect("BPF_MAP_LOOKUP_BATCH on an array");
            assert_eq!(batches, (len as usize).div_ceil(SLOTS_PER_BATCH), "{len} slots");
            assert_eq!(batched.len(), len as usize);
            assert_eq!(batched, one_by_one, "{len} slots");
            assert_eq!(batched.iter().filter(|s| s.cookie != 0).count(), len.div_ceil(7) as usize);
        }
    }

    fn background(selection: Selection) -> Work {
        Work::Destroy(Job::new(selection, None))
    }

    fn addr(backend: &str) -> SocketAddr {
        backend.parse().unwrap()
    }

    /// A weight back above 0, or a backend back, before a background job ran: the job no longer
    /// picks those sockets (it would destroy UDP sockets steered there since); other jobs, and
    /// jobs somebody waits on, are untouched.
    #[test]
    fn a_change_undone_before_its_job_ran_takes_its_sockets_out_of_it() {
        let mut batch = Batch::default();
        batch.take(background(Selection::side(7, SIDE_CANARY)));
        batch.take(background(Selection::side(8, SIDE_CANARY)));
        batch.take(background(Selection::backends(7, vec![addr("10.0.0.1:53"), addr("10.0.0.2:53")])));
        let (reply, _answer) = channel();
        batch.take(Work::Destroy(Job::new(Selection::side(7, SIDE_CANARY).with_tcp(), Some(reply))));
        assert!(batch.anyone_waits());
        batch.take(Work::Keep(Selection::side(7, SIDE_CANARY)));
        batch.take(Work::Keep(Selection::backends(7, vec![addr("10.0.0.2:53")])));
        let left: Vec<&Selection> = batch.jobs.iter().map(|job| &job.selection).collect();
        assert_eq!(
            left,
            [
                &Selection::side(8, SIDE_CANARY),
                &Selection::backends(7, vec![addr("10.0.0.1:53")]),
                &Selection::side(7, SIDE_CANARY).with_tcp(),
            ]
        );
        batch.take(Work::Keep(Selection::backends(7, vec![addr("10.0.0.1:53")])));
        assert_eq!(batch.jobs.len(), 2, "a job with no backend left is dropped");
        // A job queued after the keep is a new drop: it stays.
        batch.take(background(Selection::side(7, SIDE_CANARY)));
        batch.take(Work::Keep(Selection::side(7, SIDE_STABLE)));
        assert_eq!(batch.jobs.len(), 3);
        assert!(batch.settled().is_some());
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
