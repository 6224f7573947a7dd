//! `sockshift-fuzz`: runs the fuzz targets for a bounded time each (`cargo xtask fuzz`, and
//! briefly in `cargo xtask test`). A failure prints the shrunk input, the seed to replay it
//! (`--seed`) and exits 1.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use proptest::{
    strategy::Strategy,
    test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner},
};
use sockshift_fuzz::{strategies, Input, StateDir};

#[derive(Parser)]
#[command(name = "sockshift-fuzz", about = "Fuzz the agent's config parser, request bodies, persisted state and plans")]
struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Only this target: config, bodies, state, plans.
    #[arg(long)]
    target: Option<String>,
    /// RNG seed (printed at start; give it to replay a run).
    #[arg(long)]
    seed: Option<u64>,
}

thread_local! {
    /// Set while a fuzz target runs on one input, whose panic the runner reports.
    static IN_TARGET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

const TARGETS: [&str; 4] = ["config", "bodies", "state", "plans"];
/// Inputs per proptest run; the time budget is checked between runs.
const CASES_PER_ROUND: u32 = 64;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let targets: Vec<&str> = match &args.target {
        Some(target) if TARGETS.contains(&target.as_str()) => vec![target.as_str()],
        Some(other) => bail!("no fuzz target {other:?}: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    // Failures of a target are reported once, shrunk, by the runner: silence the panic messages
    // of the cases it tries while shrinking. A panic anywhere else (building inputs, the runner
    // itself) keeps the default message, or it would end the run with no word of why.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !IN_TARGET.get() {
            default_hook(info);
        }
    }));
    println!("fuzzing {} for {} s each, seed {seed}", targets.join(", "), args.seconds);
    let budget = Duration::from_secs(args.seconds);
    let mut failed = 0;
    let mut passed = 0;
    for target in targets {
        let outcome = match target {
            "config" => run(target, budget, seed, strategies::toml_input(), sockshift_fuzz::config),
            "bodies" => {
                run(target, budget, seed, strategies::json_input(strategies::body_seeds()), sockshift_fuzz::bodies)
            }
            "state" => {
                let dir = StateDir::new();
                run(target, budget, seed, strategies::json_input(strategies::state_seeds()), move |input| {
                    sockshift_fuzz::state(&dir, input)
                })
            }
            "plans" => run(
                target,
                budget,
                seed,
                strategies::json_input(strategies::body_seeds().split_off(3)),
                sockshift_fuzz::plans,
            ),
            _ => unreachable!(),
        };
        match outcome {
            Ok(cases) => {
                passed += 1;
                println!("fuzz target {target}: {cases} inputs, no failure");
            }
            Err(message) => {
                failed += 1;
                eprintln!("fuzz target {target} FAILED (seed {seed}):\n{message}");
            }
        }
    }
    println!("fuzz: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} fuzz targets failed");
    }
    Ok(())
}

/// Runs `target` on inputs of `strategy` until `budget` is spent: (inputs tried) or the shrunk
/// failing input and why.
fn run(
    name: &str,
    budget: Duration,
    seed: u64,
    strategy: impl Strategy<Value = Input>,
    target: impl Fn(&Input),
) -> Result<u64, String> {
    let started = Instant::now();
    let mut cases = 0u64;
    let mut round = 0u64;
    while started.elapsed() < budget {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&round.to_le_bytes());
        key[16..16 + name.len().min(16)].copy_from_slice(&name.as_bytes()[..name.len().min(16)]);
        let config =
            Config { cases: CASES_PER_ROUND, failure_persistence: None, max_shrink_iters: 4096, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
        let result = runner.run(&strategy, |input| {
            /// Clears `IN_TARGET` however the target ends, a panic included.
            struct Leave;
            impl Drop for Leave {
                fn drop(&mut self) {
                    IN_TARGET.set(false);
                }
            }
            IN_TARGET.set(true);
            let _leave = Leave;
            target(&input);
            Ok(())
        });
        match result {
            Ok(()) => cases += u64::from(CASES_PER_ROUND),
            Err(TestError::Fail(why, input)) => {
                let shown = match &input {
                    Input::Text(text) => format!("text: {text:?}"),
                    Input::Bytes(bytes) => format!("bytes: {:?}", String::from_utf8_lossy(bytes)),
                };
                return Err(format!("{why}\ninput ({shown})"));
            }
            Err(TestError::Abort(why)) => return Err(format!("aborted: {why}")),
        }
        round += 1;
    }
    Ok(cases)
}
