//! Soak command for the whole-system simulation:
//!
//!     cargo run -p csnap-sim --release --bin csnap-sim -- --schedules 1000000 [--seed S]
//!
//! Runs schedules `S, S+1, …` (default `S`: random, printed), prints progress and the
//! exercised counts, and stops at the first failing schedule with its trace and replay
//! command (exit status 1). `--seed S --schedules 1 --trace` replays one with its trace;
//! `--keep-going` runs on and groups the failures at the end; `--reset` lets seeds pick
//! `fencing: reset` too (as `CSNAP_SIM_RESET=1`).

use std::process::ExitCode;
use std::time::Instant;

use csnap_sim::{run, Options, Seed, Stats};

fn usage() -> ExitCode {
    eprintln!("usage: csnap-sim [--schedules N] [--seed S] [--trace] [--keep-going] [--reset]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut schedules: u64 = 10_000;
    let mut seed: Option<Seed> = None;
    let mut trace = false;
    let mut keep_going = false;
    let mut reset = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--schedules" => match args.next().map(|v| Seed::parse(&v)) {
                Some(Ok(n)) => schedules = n.0,
                _ => return usage(),
            },
            "--seed" => match args.next().map(|v| Seed::parse(&v)) {
                Some(Ok(s)) => seed = Some(s),
                _ => return usage(),
            },
            "--trace" => trace = true,
            "--reset" => reset = true,
            "--keep-going" => keep_going = true,
            "-h" | "--help" => {
                usage();
                return ExitCode::SUCCESS;
            }
            _ => return usage(),
        }
    }
    let base = seed.unwrap_or_else(|| Seed(rand::random::<u64>() & 0xffff_ffff_0000_0000));
    eprintln!("csnap-sim: {schedules} schedules from seed {base}");
    let started = Instant::now();
    let mut total = Stats::default();
    let mut failures: std::collections::BTreeMap<String, (u64, Seed)> = Default::default();
    for k in 0..schedules {
        let s = base.nth(k);
        match run(s, Options { trace, reset }) {
            Ok(st) => total.add(&st),
            Err(e) if keep_going => {
                // Group findings by their first line, less numbers.
                let first = e.lines().next().unwrap_or("").to_owned();
                let key: String = first
                    .split_once(": ")
                    .map_or(first.as_str(), |(_, k)| k)
                    .chars()
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .collect();
                failures.entry(key).or_insert((0, s)).0 += 1;
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("csnap-sim: schedule {s} FAILED after {k} passing schedules");
                return ExitCode::from(1);
            }
        }
        if (k + 1) % 1000 == 0 || k + 1 == schedules {
            eprintln!(
                "csnap-sim: {} schedules passed in {:.1?} (last seed {s})",
                k + 1,
                started.elapsed()
            );
        }
    }
    eprintln!("csnap-sim: {total:?}");
    if !failures.is_empty() {
        for (what, (n, first)) in &failures {
            eprintln!("csnap-sim: {n} schedules failed (first {first}): {what}");
        }
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
