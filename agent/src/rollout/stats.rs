//! Anytime-valid confidence sequences for a failure proportion, and the canary-against-stable
//! comparison the rollout's statistical gates make with them.
//!
//! A gate looks at its counters every tick (ten times a second) for as long as a step lasts, and
//! longer when the evidence is not there yet. A fixed-sample test read that often would roll back
//! a healthy canary far more often than its confidence says (every look is another chance for
//! noise to cross the line). A confidence sequence holds at every sample size at once, so any
//! number of looks, and a window extended until the data decide, keep the stated error rate.
//!
//! The construction (Robbins 1970; Howard, Ramdas, McAuliffe and Sekhon 2021, "Time-uniform,
//! nonparametric, nonasymptotic confidence sequences"): after `n` Bernoulli trials with `x`
//! events (failures), for a candidate proportion `p0`,
//!
//! ```text
//! M(p0) = ∫ q^x (1-q)^(n-x) dBeta(q; 1/2, 1/2) / (p0^x (1-p0)^(n-x))
//!       = B(x + 1/2, n - x + 1/2) / (B(1/2, 1/2) · p0^x (1-p0)^(n-x))
//! ```
//!
//! is a nonnegative martingale with `M = 1` before any trial when the true proportion is `p0`, so
//! by Ville's inequality `P(M(p) ≥ 1/α at any n) ≤ α`. The set `{p0 : M(p0) < 1/α}` therefore
//! contains the true proportion at every `n` simultaneously with probability at least `1 − α`.
//! It is an interval around `x/n` because `ln M` is convex in `p0`. The mixing prior is Jeffreys'
//! Beta(1/2, 1/2), which puts weight near 0 and 1, where healthy and broken canaries sit.
//!
//! Everything here is exact: no normal approximation, which matters because a healthy service's
//! failure proportion is 0 or close to it.

/// Parameters of the Beta mixing distribution (Jeffreys' prior).
const PRIOR_A: f64 = 0.5;
const PRIOR_B: f64 = 0.5;

/// Bisection steps: each halves the bracket, and [0, 1] needs 53 to reach f64 resolution.
const BISECTION_STEPS: u32 = 64;

/// Largest sample size the "trials needed" estimate looks at.
const MAX_TRIALS_ESTIMATE: u64 = 1 << 40;

fn ln_beta(a: f64, b: f64) -> f64 {
    libm::lgamma(a) + libm::lgamma(b) - libm::lgamma(a + b)
}

/// `ln M(p0)` for `events` out of `trials` (see the module documentation).
pub fn log_mixture_ratio(events: u64, trials: u64, p0: f64) -> f64 {
    MixtureRatio::new(events, trials).ln_at(p0)
}

/// `ln M` for given counts, with the part that does not depend on `p0` computed once.
struct MixtureRatio {
    events: f64,
    misses: f64,
    ln_mixture: f64,
}

impl MixtureRatio {
    fn new(events: u64, trials: u64) -> Self {
        let events = events.min(trials);
        let (x, misses) = (events as f64, (trials - events) as f64);
        Self { events: x, misses, ln_mixture: ln_beta(PRIOR_A + x, PRIOR_B + misses) - ln_beta(PRIOR_A, PRIOR_B) }
    }

    fn ln_at(&self, p0: f64) -> f64 {
        // count · ln p with 0 · ln 0 = 0: no events say nothing against p0 = 0.
        let ln_likelihood = |count: f64, p: f64| if count == 0.0 { 0.0 } else { count * p.ln() };
        self.ln_mixture - ln_likelihood(self.events, p0) - ln_likelihood(self.misses, 1.0 - p0)
    }
}

/// Bounds of a proportion that hold at every sample size at once.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Interval {
    pub lower: f64,
    pub upper: f64,
}

/// The `1 − alpha` confidence sequence's interval after `events` out of `trials`.
pub fn confidence_interval(events: u64, trials: u64, alpha: f64) -> Interval {
    let events = events.min(trials);
    if trials == 0 {
        return Interval { lower: 0.0, upper: 1.0 };
    }
    let threshold = (1.0 / alpha).ln();
    let p_hat = events as f64 / trials as f64;
    // ln M is convex in p0 with its minimum (at most 0 < threshold) at p_hat: one crossing on
    // each side, found by bisection. Points outside [lower, upper] are rejected.
    let ratio = MixtureRatio::new(events, trials);
    let rejected = |p0: f64| ratio.ln_at(p0) >= threshold;
    let lower = if events == 0 || !rejected(0.0) { 0.0 } else { crossing(0.0, p_hat, rejected) };
    let upper = if events == trials || !rejected(1.0) { 1.0 } else { crossing(1.0, p_hat, rejected) };
    Interval { lower, upper }
}

/// The boundary between `rejected_end` (rejected) and `accepted` (not), by bisection; returns the
/// last point known to be rejected, so that the interval errs on the wide side.
fn crossing(rejected_end: f64, accepted: f64, rejected: impl Fn(f64) -> bool) -> f64 {
    let (mut out, mut inside) = (rejected_end, accepted);
    for _ in 0..BISECTION_STEPS {
        let middle = (out + inside) / 2.0;
        if rejected(middle) {
            out = middle;
        } else {
            inside = middle;
        }
    }
    out
}

/// Events out of trials on one side over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub events: u64,
    pub trials: u64,
}

/// What the comparison concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The canary's proportion exceeds stable's by more than the tolerance, at the confidence.
    Worse,
    /// The canary's proportion exceeds stable's by less than the tolerance, at the confidence.
    NotWorse,
    /// Not enough evidence either way yet.
    Undecided,
}

/// Canary against stable for one proportion.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    pub canary: Counts,
    pub stable: Counts,
    pub canary_interval: Interval,
    pub stable_interval: Interval,
    pub decision: Decision,
    /// About how many canary trials in all the window needs to decide `not_worse` if the canary
    /// keeps its present proportion (and stable its lower bound); `None` when it is decided, or
    /// when the present proportion could never pass.
    pub canary_trials_needed: Option<u64>,
}

/// Compares the canary's proportion with stable's: `worse` once the canary's lower bound exceeds
/// stable's upper bound plus `tolerance`, `not_worse` once the canary's upper bound is below
/// stable's lower bound plus `tolerance`. Each side's confidence sequence is at `1 − α/2`
/// (`α = 1 − confidence`), so the chance that either conclusion is ever wrong, over every look,
/// is at most `α` (a union bound over the two sequences).
pub fn compare(canary: Counts, stable: Counts, tolerance: f64, confidence: f64) -> Comparison {
    let alpha_per_side = (1.0 - confidence) / 2.0;
    let canary_interval = confidence_interval(canary.events, canary.trials, alpha_per_side);
    let stable_interval = confidence_interval(stable.events, stable.trials, alpha_per_side);
    let decision = if canary_interval.lower > stable_interval.upper + tolerance {
        Decision::Worse
    } else if canary_interval.upper < stable_interval.lower + tolerance {
        Decision::NotWorse
    } else {
        Decision::Undecided
    };
    Comparison { canary, stable, canary_interval, stable_interval, decision, canary_trials_needed: None }
}

impl Comparison {
    /// Fills in `canary_trials_needed` (a few dozen interval computations: for people reading
    /// the state, not for the engine's every tick).
    pub fn with_estimate(mut self, tolerance: f64, confidence: f64) -> Self {
        if self.decision == Decision::Undecided {
            let limit = self.stable_interval.lower + tolerance;
            self.canary_trials_needed = trials_needed(self.canary, limit, (1.0 - confidence) / 2.0);
        }
        self
    }
}

/// The smallest sample size at which `events/trials` kept constant has an upper bound below
/// `limit`; `None` if that never happens.
fn trials_needed(now: Counts, limit: f64, alpha: f64) -> Option<u64> {
    let p_hat = if now.trials == 0 { 0.0 } else { now.events.min(now.trials) as f64 / now.trials as f64 };
    if p_hat >= limit {
        return None;
    }
    let passes = |trials: u64| {
        let events = (p_hat * trials as f64).round() as u64;
        confidence_interval(events, trials, alpha).upper < limit
    };
    let mut low = now.trials.max(1);
    if passes(low) {
        return Some(low);
    }
    let mut high = low.saturating_mul(2);
    while !passes(high) {
        if high >= MAX_TRIALS_ESTIMATE {
            return None;
        }
        (low, high) = (high, high.saturating_mul(2));
    }
    // `passes` is monotone enough here (the rounding of events wobbles by one) for an estimate.
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if passes(middle) {
            high = middle;
        } else {
            low = middle;
        }
    }
    Some(high)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    /// Reference values computed with scipy and statsmodels by
    /// `agent/tests/fixtures/rollout_stats.py`, which also checks the closed form of `M` against
    /// scipy's numerical integration of its defining integral.
    const FIXTURES: &str = include_str!("../../tests/fixtures/rollout_stats.json");

    #[derive(Deserialize)]
    struct Fixtures {
        mixture: Vec<MixtureCase>,
        intervals: Vec<IntervalCase>,
        comparisons: Vec<ComparisonCase>,
    }

    #[derive(Deserialize)]
    struct MixtureCase {
        events: u64,
        trials: u64,
        p0: f64,
        log_mixture_ratio: f64,
    }

    #[derive(Deserialize)]
    struct IntervalCase {
        events: u64,
        trials: u64,
        alpha: f64,
        lower: f64,
        upper: f64,
        /// statsmodels' Clopper–Pearson interval at the same level, for a fixed sample size.
        clopper_pearson: [f64; 2],
    }

    #[derive(Deserialize)]
    struct ComparisonCase {
        canary: [u64; 2],
        stable: [u64; 2],
        tolerance: f64,
        confidence: f64,
        decision: Decision,
    }

    fn fixtures() -> Fixtures {
        serde_json::from_str(FIXTURES).expect("rollout_stats.json parses")
    }

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * (1.0 + b.abs())
    }

    #[test]
    fn mixture_ratio_matches_the_scipy_reference() {
        let cases = fixtures().mixture;
        assert!(cases.len() >= 20);
        for c in cases {
            let ours = log_mixture_ratio(c.events, c.trials, c.p0);
            assert!(
                close(ours, c.log_mixture_ratio, 1e-9),
                "ln M({} of {}, p0 = {}): {ours} here, {} in scipy",
                c.events,
                c.trials,
                c.p0,
                c.log_mixture_ratio
            );
        }
    }

    #[test]
    fn interval_bounds_match_the_scipy_reference_and_contain_the_fixed_sample_interval() {
        let cases = fixtures().intervals;
        assert!(cases.len() >= 20);
        for c in cases {
            let ours = confidence_interval(c.events, c.trials, c.alpha);
            let what = format!("{} of {} at alpha {}", c.events, c.trials, c.alpha);
            assert!(close(ours.lower, c.lower, 1e-9), "{what}: lower {} here, {} in scipy", ours.lower, c.lower);
            assert!(close(ours.upper, c.upper, 1e-9), "{what}: upper {} here, {} in scipy", ours.upper, c.upper);
            // Valid at every sample size costs width over a test for one fixed sample size.
            let [cp_lower, cp_upper] = c.clopper_pearson;
            assert!(
                ours.lower <= cp_lower + 1e-12 && ours.upper >= cp_upper - 1e-12,
                "{what}: {ours:?} vs {cp_lower}..{cp_upper}"
            );
        }
    }

    #[test]
    fn decisions_match_the_scipy_reference() {
        let cases = fixtures().comparisons;
        assert!(cases.len() >= 10);
        for decision in [Decision::Worse, Decision::NotWorse, Decision::Undecided] {
            assert!(cases.iter().any(|c| c.decision == decision), "fixtures cover {decision:?}");
        }
        for c in cases {
            let canary = Counts { events: c.canary[0], trials: c.canary[1] };
            let stable = Counts { events: c.stable[0], trials: c.stable[1] };
            let ours = compare(canary, stable, c.tolerance, c.confidence);
            assert_eq!(ours.decision, c.decision, "{canary:?} vs {stable:?}, tolerance {}: {ours:?}", c.tolerance);
        }
    }

    /// xorshift64*: a deterministic generator, enough for simulated connection outcomes.
    struct Rng(u64);

    impl Rng {
        fn unit(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }

        fn binomial(&mut self, trials: u64, p: f64) -> u64 {
            (0..trials).filter(|_| self.unit() < p).count() as u64
        }
    }

    /// Simulates a canary at `canary_p` against stable at `stable_p`, 5 % of traffic on the
    /// canary, looking after every batch like the engine does, until a decision or `max_canary`
    /// trials. Returns the decisions reached, and in how many runs a fixed-sample one-sided
    /// z-test at the same confidence, read at every look, would have rolled back.
    fn simulate(canary_p: f64, stable_p: f64, runs: u32, max_canary: u64, seed: u64) -> ([u32; 3], u32) {
        let mut rng = Rng(seed);
        let mut outcome = [0u32; 3];
        let mut naive_rollbacks = 0;
        for _ in 0..runs {
            let (mut canary, mut stable) = (Counts::default(), Counts::default());
            let mut naive_rolled_back = false;
            let decision = loop {
                canary.trials += 10;
                canary.events += rng.binomial(10, canary_p);
                stable.trials += 190;
                stable.events += rng.binomial(190, stable_p);
                let (pc, ps) =
                    (canary.events as f64 / canary.trials as f64, stable.events as f64 / stable.trials as f64);
                let se = (pc * (1.0 - pc) / canary.trials as f64 + ps * (1.0 - ps) / stable.trials as f64).sqrt();
                // z_0.95 = 1.645: the one-sided critical value for confidence 0.95.
                naive_rolled_back |= se > 0.0 && (pc - ps - 0.02) / se > 1.645;
                let decision = compare(canary, stable, 0.02, 0.95).decision;
                if decision != Decision::Undecided || canary.trials >= max_canary {
                    break decision;
                }
            };
            outcome[decision as usize] += 1;
            naive_rollbacks += u32::from(naive_rolled_back);
        }
        (outcome, naive_rollbacks)
    }

    /// The error rate holds over repeated looks: a canary exactly at the tolerance (H0 holds,
    /// at its edge) is judged `worse` in at most 5 % of rollouts at confidence 0.95, with a
    /// look after every 10 canary trials up to 2,000, where a fixed-sample test read at every
    /// look rolls back far more than 5 %.
    #[test]
    fn repeated_looks_keep_the_false_rollback_rate() {
        let ([worse, not_worse, undecided], naive) = simulate(0.03, 0.01, 400, 2_000, 7);
        println!(
            "canary at the tolerance: {worse} of 400 rolled back ({naive} with a z-test at every look), {undecided} \
             undecided after 2,000 attempts"
        );
        assert!(worse <= 20, "{worse} of 400 rolled back: more than 5 %");
        assert!(naive > 40, "the fixed-sample test read at every look should exceed 10 %: {naive}");
        assert_eq!(not_worse, 0, "a canary at the tolerance never proves itself inside it: {not_worse}");
        assert_eq!(worse + undecided, 400);
    }

    /// A canary 1 point worse than stable with a 2-point tolerance is never judged worse, and
    /// passes once there is enough evidence.
    #[test]
    fn a_slightly_worse_canary_is_not_rolled_back_and_passes_with_evidence() {
        let ([worse, not_worse, _], naive) = simulate(0.02, 0.01, 200, 20_000, 11);
        println!(
            "canary 1 point worse: {worse} of 200 rolled back ({naive} with a z-test at every look), {not_worse} \
             passed within 20,000 attempts"
        );
        assert_eq!(worse, 0);
        assert!(not_worse >= 190, "{not_worse} of 200 passed within 20,000 canary trials");
    }

    /// A canary that refuses everything is judged worse after a handful of attempts.
    #[test]
    fn a_refusing_canary_is_judged_worse_within_a_few_attempts() {
        let stable = Counts { events: 0, trials: 40 };
        let judged = (1..=20)
            .find(|n| compare(Counts { events: *n, trials: *n }, stable, 0.02, 0.95).decision == Decision::Worse);
        assert_eq!(judged, Some(3), "3 refused canary attempts against 40 good stable ones are enough");
        let one = compare(Counts { events: 1, trials: 1 }, Counts { events: 0, trials: 1000 }, 0.02, 0.95);
        assert_eq!(one.decision, Decision::Undecided, "one failed attempt is not evidence: {one:?}");
    }

    /// A healthy canary needs a known number of attempts to pass at the defaults.
    #[test]
    fn healthy_canary_passes_after_the_trials_it_needs() {
        let stable = Counts { events: 0, trials: 100_000 };
        let comparison = compare(Counts { events: 0, trials: 50 }, stable, 0.02, 0.95).with_estimate(0.02, 0.95);
        let needed = comparison.canary_trials_needed.expect("a healthy canary can pass");
        assert!((300..400).contains(&needed), "{needed}");
        assert_eq!(compare(Counts { events: 0, trials: needed }, stable, 0.02, 0.95).decision, Decision::NotWorse);
        assert_eq!(compare(Counts { events: 0, trials: needed - 1 }, stable, 0.02, 0.95).decision, Decision::Undecided);
        let hopeless = compare(Counts { events: 10, trials: 100 }, stable, 0.02, 0.95).with_estimate(0.02, 0.95);
        assert_eq!(hopeless.canary_trials_needed, None, "10 % failing never passes a 2-point tolerance");
    }

    #[test]
    fn no_data_decides_nothing() {
        let none = Counts::default();
        assert_eq!(confidence_interval(0, 0, 0.05), Interval { lower: 0.0, upper: 1.0 });
        assert_eq!(compare(none, none, 0.02, 0.95).decision, Decision::Undecided);
    }
}
