//! The pure split decision: which side, which backend. Same code in the kernel and on the host.

use crate::maps::{FrontendValue, COHORT_ALWAYS_CANARY, COHORT_NEVER_CANARY, FAMILY_V4, SIDE_CANARY, SIDE_STABLE};

/// Canary weight of 100 %, in parts per million.
pub const PPM_MAX: u32 = 1_000_000;

/// Word 2 of a v4-mapped IPv6 address (`::ffff:0:0/96`) as the kernel stores it.
pub const V4_MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// IPv4 address (network order, as in `user_ip4`) to the v4-mapped form used in map keys.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD2, ip4_be]
}

/// Whether a stored address is v4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn is_v4_mapped(addr_be: &[u32; 4]) -> bool {
    addr_be[0] == 0 && addr_be[1] == 0 && addr_be[2] == V4_MAPPED_WORD2
}

/// A 64-bit finalizer (splitmix64): every input bit affects every output bit.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Maps `key` under `seed` uniformly onto `0..range` (multiply-shift, no division).
#[inline(always)]
pub const fn hash_into(key: u64, seed: u32, range: u32) -> u32 {
    let h = mix64(key ^ ((seed as u64) << 32 | seed as u64).wrapping_mul(0xd6e8_feb8_6659_fd93));
    (((h >> 32) * range as u64) >> 32) as u32
}

/// The bucket `0..1_000_000` of a client or connection key. A key is canary while its bucket is
/// below the weight, so raising the weight only ever moves keys from stable to canary.
#[inline(always)]
pub const fn split_bucket(key: u64, seed: u32) -> u32 {
    hash_into(key, seed, PPM_MAX)
}

/// The side the weight alone gives a bucket.
#[inline(always)]
pub const fn side_for_bucket(bucket: u32, canary_ppm: u32) -> u8 {
    if bucket < canary_ppm {
        SIDE_CANARY
    } else {
        SIDE_STABLE
    }
}

/// Picks the side for one connection, or `None` to leave it untouched.
///
/// `cohort` is the client's override (COHORT_*), applied before the hash. When the canary has no
/// backend in `family`, its share goes to stable. The reverse never happens: a connection the
/// weight (or a `never` cohort) gives to stable is never sent to the canary, so weight 0 and the
/// kill switch mean no canary traffic at all; if stable has no backend in `family` the connection
/// is left untouched (the agent refuses such configurations, so this is a last line of defence).
#[inline(always)]
pub fn pick_side(frontend: &FrontendValue, family: u8, split_key: u64, cohort: u32) -> Option<u8> {
    let stable = frontend.backend_count(SIDE_STABLE, family);
    let canary = frontend.backend_count(SIDE_CANARY, family);
    let wanted = if cohort == COHORT_ALWAYS_CANARY {
        SIDE_CANARY
    } else if cohort == COHORT_NEVER_CANARY {
        SIDE_STABLE
    } else {
        side_for_bucket(split_bucket(split_key, frontend.seed), frontend.canary_ppm)
    };
    match (wanted, stable, canary) {
        (SIDE_STABLE, 0, _) => None,
        (SIDE_CANARY, 0, 0) => None,
        (SIDE_CANARY, _, 0) => Some(SIDE_STABLE),
        (side, _, _) => Some(side),
    }
}

/// Backend index within a side, spread per connection (TCP) or per socket (UDP) by its cookie.
/// The seed is inverted so that the index is independent of the side's bucket.
#[inline(always)]
pub const fn backend_index(socket_cookie: u64, seed: u32, count: u16) -> u16 {
    hash_into(socket_cookie, !seed, count as u32) as u16
}

/// The NETNS_SOCKETS bucket a network namespace (by cookie) counts its socket records in.
#[inline(always)]
pub const fn netns_bucket(netns_cookie: u64) -> u32 {
    hash_into(netns_cookie, 0x6e65_746e, crate::maps::NETNS_BUCKETS)
}

/// Family of a destination given the stored (possibly v4-mapped) address.
#[inline(always)]
pub const fn family_of(addr_be: &[u32; 4]) -> u8 {
    if is_v4_mapped(addr_be) {
        FAMILY_V4
    } else {
        crate::maps::FAMILY_V6
    }
}

/// Percent (0..=100, 4 decimals kept) to parts per million. The caller validates the range.
pub fn percent_to_ppm(percent: f64) -> u32 {
    let ppm = percent * 10_000.0 + 0.5;
    if ppm <= 0.0 {
        0
    } else if ppm >= PPM_MAX as f64 {
        PPM_MAX
    } else {
        ppm as u32
    }
}

/// Parts per million to percent.
pub fn ppm_to_percent(ppm: u32) -> f64 {
    ppm as f64 / 10_000.0
}

/// Deterministic per-service seed from its name (FNV-1a), the same on every node and restart.
pub const fn service_seed(name: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < name.len() {
        hash ^= name[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::maps::{FAMILY_V6, SIDE_CANARY};

    fn frontend(canary_ppm: u32, stable: u16, canary: u16) -> FrontendValue {
        FrontendValue {
            canary_ppm,
            seed: service_seed(b"web"),
            stable_v4: stable,
            canary_v4: canary,
            stable_v6: stable,
            canary_v6: canary,
            ..Default::default()
        }
    }

    fn canary_share(canary_ppm: u32, keys: u64) -> f64 {
        let svc = frontend(canary_ppm, 1, 1);
        let canary = (0..keys).filter(|k| pick_side(&svc, FAMILY_V4, *k, 0) == Some(SIDE_CANARY)).count();
        canary as f64 * 100.0 / keys as f64
    }

    #[test]
    fn share_matches_target_within_half_a_point() {
        for percent in [1.0, 5.0, 20.0, 50.0] {
            let share = canary_share(percent_to_ppm(percent), 100_000);
            assert!((share - percent).abs() < 0.5, "target {percent} %, got {share} %");
        }
    }

    #[test]
    fn zero_gives_none_and_hundred_gives_all() {
        assert_eq!(canary_share(0, 100_000), 0.0);
        assert_eq!(canary_share(PPM_MAX, 100_000), 100.0);
    }

    #[test]
    fn raising_the_weight_never_moves_a_key_back_to_stable() {
        let weights: Vec<u32> = (0..=100).map(|p| p * 10_000).collect();
        for key in 0..20_000u64 {
            let mut was_canary = false;
            for &ppm in &weights {
                let canary = pick_side(&frontend(ppm, 3, 3), FAMILY_V6, key, 0) == Some(SIDE_CANARY);
                assert!(!was_canary || canary, "key {key} moved back to stable at {ppm} ppm");
                was_canary = canary;
            }
        }
    }

    #[test]
    fn seeds_make_services_independent() {
        let a = FrontendValue { seed: service_seed(b"web"), ..frontend(500_000, 1, 1) };
        let b = FrontendValue { seed: service_seed(b"api"), ..frontend(500_000, 1, 1) };
        let both = (0..100_000u64)
            .filter(|k| {
                pick_side(&a, FAMILY_V4, *k, 0) == Some(SIDE_CANARY)
                    && pick_side(&b, FAMILY_V4, *k, 0) == Some(SIDE_CANARY)
            })
            .count();
        // Independent halves overlap on a quarter of the keys.
        assert!((both as f64 / 1_000.0 - 25.0).abs() < 1.0, "overlap {both} of 100000");
    }

    #[test]
    fn a_canary_without_backends_sends_its_share_to_stable() {
        assert_eq!(pick_side(&frontend(PPM_MAX, 2, 0), FAMILY_V4, 7, 0), Some(SIDE_STABLE));
        assert_eq!(pick_side(&frontend(500_000, 0, 0), FAMILY_V4, 7, 0), None);
        assert_eq!(pick_side(&frontend(PPM_MAX, 0, 0), FAMILY_V4, 7, COHORT_ALWAYS_CANARY), None);
    }

    #[test]
    fn weight_zero_and_never_cohorts_never_give_the_canary_even_without_stable_backends() {
        for key in 0..10_000u64 {
            assert_eq!(pick_side(&frontend(0, 0, 2), FAMILY_V4, key, 0), None);
            assert_eq!(pick_side(&frontend(PPM_MAX, 0, 2), FAMILY_V6, key, COHORT_NEVER_CANARY), None);
            let half = pick_side(&frontend(500_000, 0, 2), FAMILY_V4, key, 0);
            assert_ne!(half, Some(SIDE_STABLE), "key {key}");
        }
        assert_eq!(pick_side(&frontend(PPM_MAX, 0, 2), FAMILY_V4, 7, 0), Some(SIDE_CANARY));
    }

    #[test]
    fn cohort_overrides_win_over_the_hash() {
        for key in 0..1_000u64 {
            assert_eq!(pick_side(&frontend(0, 1, 1), FAMILY_V4, key, COHORT_ALWAYS_CANARY), Some(SIDE_CANARY));
            assert_eq!(pick_side(&frontend(PPM_MAX, 1, 1), FAMILY_V4, key, COHORT_NEVER_CANARY), Some(SIDE_STABLE));
        }
    }

    #[test]
    fn backend_index_is_in_range_and_spreads() {
        let mut seen = [0u32; 7];
        for cookie in 0..70_000u64 {
            let i = backend_index(cookie, 42, 7);
            seen[i as usize] += 1;
        }
        for count in seen {
            assert!((9_000..11_000).contains(&count), "uneven spread {seen:?}");
        }
        assert_eq!(backend_index(5, 1, 1), 0);
    }

    #[test]
    fn netns_buckets_spread_sequential_cookies() {
        let buckets: std::collections::BTreeSet<u32> = (1..=1_000u64).map(netns_bucket).collect();
        assert!(buckets.len() > 990, "{} distinct buckets for 1000 namespaces", buckets.len());
        assert!(buckets.iter().all(|b| *b < crate::maps::NETNS_BUCKETS));
    }

    #[test]
    fn percent_keeps_four_decimals() {
        assert_eq!(percent_to_ppm(12.3456), 123_456);
        assert_eq!(percent_to_ppm(100.0), PPM_MAX);
        assert_eq!(percent_to_ppm(0.0), 0);
        assert_eq!(ppm_to_percent(123_456), 12.3456);
    }

    #[test]
    fn v4_mapped_round_trip() {
        let ip = u32::from_ne_bytes([127, 1, 0, 1]);
        let mapped = v4_mapped(ip);
        assert!(is_v4_mapped(&mapped));
        assert_eq!(family_of(&mapped), FAMILY_V4);
        let v6 = std::net::Ipv4Addr::new(127, 1, 0, 1).to_ipv6_mapped();
        let words: Vec<u32> = v6.octets().chunks(4).map(|c| u32::from_ne_bytes(c.try_into().unwrap())).collect();
        assert_eq!(words, mapped.to_vec());
    }
}
