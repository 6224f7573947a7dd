//! Service ids and backend slots: which are in use, which may be handed out.
//!
//! A service id names a service's counters and cohort entries, and every socket record of the
//! service carries it. An id is therefore never handed to another service while anything may
//! still charge it: a removed service's id *drains* until its counters say no socket record of
//! it is open, and ids that pinned state (from an earlier run) still uses are never handed out
//! before they are claimed by their own service or drained.

use std::{
    collections::{BTreeMap, HashSet},
    time::Instant,
};

/// Service ids: `0..limit`.
#[derive(Debug)]
pub struct ServiceIds {
    limit: u32,
    /// Ids of installed services.
    in_use: HashSet<u32>,
    /// Ids of removed services (and of pinned state no service claimed), since when.
    draining: BTreeMap<u32, Instant>,
    /// Ids pinned state referenced at start that no service has claimed yet.
    pinned: HashSet<u32>,
    /// Where the search for a free id starts: ids are handed out round the range, so a freed id
    /// is the last to be reused.
    cursor: u32,
}

impl ServiceIds {
    /// `pinned`: every id found in pinned frontends, counters and cohorts.
    pub fn new(limit: u32, pinned: HashSet<u32>) -> Self {
        let cursor = pinned.iter().max().map_or(0, |max| (max + 1) % limit.max(1));
        Self { limit, in_use: HashSet::new(), draining: BTreeMap::new(), pinned, cursor }
    }

    /// Claims `id` for a service that had it in an earlier run; `false` if it is not available
    /// (another service holds it, or it is draining).
    pub fn claim(&mut self, id: u32) -> bool {
        if self.pinned.remove(&id) {
            self.in_use.insert(id);
            true
        } else {
            false
        }
    }

    /// A free id, or `None` when every id is installed, draining or pinned.
    pub fn allocate(&mut self) -> Option<u32> {
        for step in 0..self.limit {
            let id = (self.cursor + step) % self.limit;
            if !self.in_use.contains(&id) && !self.draining.contains_key(&id) && !self.pinned.contains(&id) {
                self.in_use.insert(id);
                self.cursor = (id + 1) % self.limit;
                return Some(id);
            }
        }
        None
    }

    /// Gives back an id that was allocated but never used (a change that failed).
    pub fn unallocate(&mut self, id: u32) {
        self.in_use.remove(&id);
    }

    /// Gives back a claimed id (a change that failed): pinned state still uses it.
    pub fn unclaim(&mut self, id: u32) {
        self.in_use.remove(&id);
        self.pinned.insert(id);
    }

    /// A service is gone: its id drains from `now`.
    pub fn release(&mut self, id: u32, now: Instant) {
        self.in_use.remove(&id);
        self.draining.insert(id, now);
    }

    /// Pinned ids no service claimed drain from `now` (after the first sync of a run).
    pub fn drain_unclaimed(&mut self, now: Instant) {
        for id in std::mem::take(&mut self.pinned) {
            self.draining.insert(id, now);
        }
    }

    /// Ids that have drained since before `before`.
    pub fn draining_since(&self, before: Instant) -> Vec<u32> {
        self.draining.iter().filter(|(_, since)| **since <= before).map(|(id, _)| *id).collect()
    }

    /// A drained id may be handed out again.
    pub fn free(&mut self, id: u32) {
        self.draining.remove(&id);
    }

    pub fn draining(&self) -> usize {
        self.draining.len()
    }

    /// Ids of removed services (and unclaimed pinned state) still draining.
    pub fn draining_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.draining.keys().copied()
    }

    #[cfg(test)]
    pub fn is_draining(&self, id: u32) -> bool {
        self.draining.contains_key(&id)
    }
}

/// BACKENDS slots: which runs are free. A revision is a run of slots, named by its first; slot 0
/// is never handed out (a zeroed frontend value names no revision). Runs are handed out first-fit
/// (low slots are reused first) and merged with their free neighbours when given back.
#[derive(Debug)]
pub struct BackendSlots {
    /// Free runs: first slot -> length.
    free: BTreeMap<u32, u32>,
    capacity: u32,
}

impl BackendSlots {
    /// Slots a revision of `backends` backends takes: one each, and one for an empty set too, so
    /// that every revision has a first slot of its own to be named by.
    pub fn run_len(backends: usize) -> u32 {
        u32::try_from(backends).unwrap_or(u32::MAX).max(1)
    }

    /// Slots `1..capacity`, less the runs (first slot, length) pinned state uses.
    pub fn new(capacity: u32, taken: impl IntoIterator<Item = (u32, u32)>) -> Self {
        let mut taken: Vec<(u32, u32)> = taken.into_iter().filter(|(_, len)| *len > 0).collect();
        taken.sort_unstable();
        let mut free = BTreeMap::new();
        let mut next = 1u32;
        for (start, len) in taken {
            let start = start.clamp(1, capacity);
            if start > next {
                free.insert(next, start - next);
            }
            next = next.max(start.saturating_add(len).min(capacity));
        }
        if capacity > next {
            free.insert(next, capacity - next);
        }
        Self { free, capacity }
    }

    /// The first slot of a free run of `len` slots (at least one), now taken; `None` if no free
    /// run is that long.
    pub fn allocate(&mut self, len: u32) -> Option<u32> {
        let len = len.max(1);
        let (&start, &run) = self.free.iter().find(|(_, run)| **run >= len)?;
        self.free.remove(&start);
        if run > len {
            self.free.insert(start + len, run - len);
        }
        Some(start)
    }

    /// Gives back the run `allocate(len)` returned. A run outside the table, or one that overlaps
    /// a free run (given back twice), is ignored: no slot is ever free twice.
    pub fn release(&mut self, start: u32, len: u32) {
        let len = len.max(1);
        if start == 0 || start.saturating_add(len) > self.capacity {
            return;
        }
        let end = start + len;
        let overlaps_before = self.free.range(..end).next_back().is_some_and(|(&s, &run)| s + run > start);
        if overlaps_before {
            return;
        }
        let (mut start, mut len) = (start, len);
        if let Some((&before, &run)) = self.free.range(..start).next_back() {
            if before + run == start {
                self.free.remove(&before);
                start = before;
                len += run;
            }
        }
        if let Some(run) = self.free.remove(&(start + len)) {
            len += run;
        }
        self.free.insert(start, len);
    }

    /// Free slots in all.
    pub fn free_slots(&self) -> u32 {
        self.free.values().sum()
    }

    /// The longest free run: the most slots one revision can take now.
    pub fn longest_run(&self) -> u32 {
        self.free.values().copied().max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn pinned_ids_are_never_handed_to_another_service() {
        let mut ids = ServiceIds::new(8, [0, 3].into());
        let handed: Vec<u32> = (0..6).map(|_| ids.allocate().unwrap()).collect();
        assert!(!handed.contains(&0) && !handed.contains(&3), "{handed:?}");
        assert_eq!(ids.allocate(), None, "0 and 3 stay reserved until claimed or drained");
        assert!(ids.claim(3));
        assert!(!ids.claim(3), "claimed once");
        ids.unclaim(3);
        assert_eq!(ids.allocate(), None, "a failed change gives a claimed id back to pinned state");
        assert!(ids.claim(3));
        ids.drain_unclaimed(Instant::now());
        assert!(ids.is_draining(0));
        assert_eq!(ids.allocate(), None, "a draining id is not free");
        ids.free(0);
        assert_eq!(ids.allocate(), Some(0));
    }

    #[test]
    fn a_released_id_drains_and_is_reused_last() {
        let mut ids = ServiceIds::new(4, HashSet::new());
        let a = ids.allocate().unwrap();
        let start = Instant::now();
        ids.release(a, start);
        assert_eq!(ids.draining_since(start), vec![a]);
        assert!(ids.draining_since(start - Duration::from_millis(1)).is_empty());
        ids.free(a);
        let next: Vec<u32> = (0..4).map(|_| ids.allocate().unwrap()).collect();
        assert_eq!(next.last(), Some(&a), "round the range: the freed id comes last: {next:?}");
    }

    #[test]
    fn backend_slots_are_runs_that_merge_when_given_back() {
        assert_eq!((BackendSlots::run_len(0), BackendSlots::run_len(3)), (1, 3));
        let mut slots = BackendSlots::new(16, [(4, 2), (10, 1)]);
        assert_eq!(slots.free_slots(), 12, "1..16 less 4, 5 and 10");
        assert_eq!(slots.allocate(3), Some(1), "first fit: slots 1..4");
        assert_eq!(slots.allocate(0), Some(6), "an empty revision still takes a slot of its own");
        assert_eq!(slots.allocate(4), Some(11));
        assert_eq!(slots.allocate(2), Some(7));
        assert_eq!(slots.longest_run(), 1, "slots 9 and 15 are left");
        assert_eq!(slots.allocate(2), None, "no run of two is free");
        slots.release(7, 2);
        slots.release(11, 4);
        assert_eq!(slots.allocate(3), Some(7), "7..10 merged with 9");
        slots.release(1, 3);
        slots.release(4, 2);
        slots.release(6, 0);
        slots.release(7, 3);
        slots.release(10, 1);
        assert_eq!((slots.free_slots(), slots.longest_run()), (15, 15), "everything merged back into 1..16");
        slots.release(0, 1);
        slots.release(15, 5);
        assert_eq!(slots.free_slots(), 15, "runs outside the table are ignored");
        assert_eq!(slots.allocate(4), Some(1));
        slots.release(1, 4);
        slots.release(1, 4);
        slots.release(3, 2);
        assert_eq!((slots.free_slots(), slots.longest_run()), (15, 15), "a run given back twice is free once");
    }
}
