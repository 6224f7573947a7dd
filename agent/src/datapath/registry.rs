//! Service ids and backend revisions: which are in use, which may be handed out.
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

/// Backend revisions: never 0 (a zeroed value cannot match a real revision), never one whose
/// slots are still in the map.
#[derive(Debug)]
pub struct Revisions {
    next: u32,
}

impl Revisions {
    pub fn new(highest_pinned: Option<u32>) -> Self {
        Self { next: highest_pinned.map_or(1, |r| r.wrapping_add(1).max(1)) }
    }

    pub fn allocate(&mut self, taken: impl Fn(u32) -> bool) -> u32 {
        loop {
            let revision = self.next;
            self.next = self.next.wrapping_add(1).max(1);
            if !taken(revision) {
                return revision;
            }
        }
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
    fn revisions_skip_zero_and_taken() {
        let mut revisions = Revisions::new(Some(u32::MAX));
        assert_eq!(revisions.allocate(|_| false), 1);
        assert_eq!(revisions.allocate(|r| r == 2 || r == 3), 4);
    }
}
