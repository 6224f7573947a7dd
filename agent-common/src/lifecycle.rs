//! The life of a steered socket's record: what closing a TCP socket counts, when sock_release may
//! delete the record, which RTT readings are samples. Pure, so the rules are proven on the host.
//!
//! `sock_release` runs when the application closes a socket, before the kernel closes the TCP
//! connection (`inet_release` calls the hook, then `tcp_close`). A record deleted there would be
//! gone when the kernel ends an attempt the client gave up, or closes a connection whose RTT we
//! want. So a TCP record whose state callbacks are on (armed) lives until sock_ops sees the socket
//! reach CLOSE, which every TCP socket does exactly once.

use crate::maps::{SOCKET_ARMED, SOCKET_ESTABLISHED, SOCKET_RELEASED};

/// Kernel TCP states (`BPF_TCP_*`), as sock_ops and `bpf_sock.state` report them.
pub const TCP_ESTABLISHED: u32 = 1;
pub const TCP_SYN_SENT: u32 = 2;
pub const TCP_CLOSE: u32 = 7;

/// What a TCP socket reaching CLOSE says about its connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// It had established (or never started an attempt): nothing to count here.
    NotAnAttempt,
    /// The kernel ended the attempt while the application waited (refused, unreachable, timed
    /// out by the kernel's own SYN retries).
    Failed,
    /// The application closed the socket before the attempt completed (its connect timeout).
    Abandoned,
}

/// The outcome of a TCP socket going from `old_state` to CLOSE with record `flags`.
#[inline(always)]
pub const fn attempt_outcome(flags: u16, old_state: u32) -> AttemptOutcome {
    if old_state != TCP_SYN_SENT || flags & SOCKET_ESTABLISHED != 0 {
        AttemptOutcome::NotAnAttempt
    } else if flags & SOCKET_RELEASED != 0 {
        AttemptOutcome::Abandoned
    } else {
        AttemptOutcome::Failed
    }
}

/// Whether sock_release leaves the record for sock_ops to delete at CLOSE: the socket is armed
/// and the kernel has not closed it yet.
#[inline(always)]
pub const fn kept_past_release(flags: u16, state: u32) -> bool {
    flags & SOCKET_ARMED != 0 && state != TCP_CLOSE
}

/// A smoothed RTT reading (`srtt_us`, scaled by 8) as a sample in microseconds, or `None` when
/// the kernel has none: it keeps 0 until a valid measurement, e.g. after a retransmitted SYN
/// without TCP timestamps, and a 0 would drag the average down exactly when a side drops SYNs.
#[inline(always)]
pub const fn srtt_sample_us(srtt_scaled: u32) -> Option<u64> {
    if srtt_scaled == 0 {
        None
    } else {
        Some((srtt_scaled >> 3) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::SOCKET_HAD_RTO;

    #[test]
    fn an_attempt_the_client_gave_up_is_abandoned_not_failed() {
        assert_eq!(attempt_outcome(SOCKET_ARMED | SOCKET_RELEASED, TCP_SYN_SENT), AttemptOutcome::Abandoned);
        assert_eq!(attempt_outcome(SOCKET_ARMED, TCP_SYN_SENT), AttemptOutcome::Failed);
        assert_eq!(attempt_outcome(SOCKET_ARMED | SOCKET_HAD_RTO, TCP_SYN_SENT), AttemptOutcome::Failed);
    }

    #[test]
    fn closing_an_established_connection_is_not_an_attempt() {
        let established = SOCKET_ARMED | SOCKET_ESTABLISHED;
        assert_eq!(attempt_outcome(established, TCP_ESTABLISHED), AttemptOutcome::NotAnAttempt);
        assert_eq!(attempt_outcome(established | SOCKET_RELEASED, 4), AttemptOutcome::NotAnAttempt);
        // A reset in SYN_SENT after ESTABLISHED cannot happen; if the flag says it established, it
        // is never counted twice.
        assert_eq!(attempt_outcome(established, TCP_SYN_SENT), AttemptOutcome::NotAnAttempt);
    }

    #[test]
    fn release_keeps_only_armed_records_of_open_connections() {
        assert!(kept_past_release(SOCKET_ARMED, TCP_SYN_SENT));
        assert!(kept_past_release(SOCKET_ARMED | SOCKET_ESTABLISHED, TCP_ESTABLISHED));
        assert!(!kept_past_release(SOCKET_ARMED, TCP_CLOSE));
        assert!(!kept_past_release(0, TCP_ESTABLISHED));
    }

    #[test]
    fn zero_srtt_is_no_sample() {
        assert_eq!(srtt_sample_us(0), None);
        assert_eq!(srtt_sample_us(8 * 250), Some(250));
        assert_eq!(srtt_sample_us(3), Some(0));
    }
}
