//! failover-bench: how long a failover takes, and where the time goes (issue 9,
//! "Benchmark").
//!
//! Real part: for each cluster size, an N-node corosync cluster in network namespaces with
//! one `csnap-agent` per node (`csnap_e2e::rig`), a writer on a non-server node writing 4 KiB
//! blocks through its NBD export in a tight loop (one in flight, every completion
//! timestamped), and `--runs` power-offs of the server's node (its corosync and its agent
//! SIGKILLed together; it is powered back on after each run). Per run it takes, on one host
//! clock: the power-off; the new server's agent's moments (`csnapctl status --json`,
//! `failover`: group confchg, old server settled, chosen, announce delivered, server ready,
//! gather done, store open and serving, first origin write granted); the writer's outage
//! (the longest gap between two completions around the power-off). Fencing is `command`
//! with a command that confirms at once (the node is off: what a power switch that
//! answers would say), so no lease wait; `--lease-runs` more runs with `kill_node`, which
//! cannot confirm a powered-off node, show what the serving-lease wait adds.
//!
//! Simulated part: the gather alone with 64 and 256 members on cpg-glue's in-memory
//! cluster with the real `VolumeMembership` machines: rounds (each member handles every
//! event it has, then its outputs go out) and messages until the activation, after the
//! server's node is killed.
//!
//!     scripts/bench-failover [--nodes 3,8] [--runs 10] [--lease-runs 3] [--sim 64,256]
//!
//! Needs root, corosync, qemu-io, fio, nbdinfo (the rig's prerequisites). Prints a
//! Markdown table on stdout, progress on stderr.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use cpg_glue::NodeId;
use csnap_e2e::nbd_writer::{wall_ms_f64, WriteLog, Writer};
use csnap_e2e::rig::{Rig, RigConfig, MIB, VOLUME};
use csnap_proto::control::FailoverTiming;

use csnap_e2e::gather_sim as sim;

#[derive(Debug, Parser)]
#[command(about = "Failover time of csnap's cluster mode, split into its phases")]
struct Args {
    /// Cluster sizes (real corosync in namespaces), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [3u32, 8])]
    nodes: Vec<u32>,
    /// Power-offs per cluster size with immediate fencing.
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// Power-offs with `fencing: kill_node` (the serving-lease wait), at the first size.
    #[arg(long, default_value_t = 3)]
    lease_runs: u32,
    /// Simulated gather sizes, comma-separated (0 or empty: none).
    #[arg(long, value_delimiter = ',', default_values_t = [64u32, 256])]
    sim: Vec<u32>,
    /// Where csnap-agent and csnapctl are (default: beside this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// corosync's token timeout, ms.
    #[arg(long, default_value_t = 1000)]
    token_ms: u32,
    /// Only the simulated gather.
    #[arg(long)]
    sim_only: bool,
}

/// One power-off, in ms (None: not seen).
#[derive(Debug, Clone, Default)]
struct Run {
    /// power-off -> confchg at the new server's node.
    detection: Option<f64>,
    /// confchg -> first origin write granted by the new server.
    csnap: Option<f64>,
    /// phase name -> ms.
    phases: BTreeMap<&'static str, f64>,
    /// The writer's longest gap around the power-off.
    outage: Option<f64>,
    gathered: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("failover-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failover-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

async fn run(args: Args) -> Result<(), String> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("own path: {e}"))?
            .parent()
            .ok_or("own path has no directory")?
            .to_path_buf(),
    };
    println!("# csnap failover benchmark\n");
    println!(
        "load average at start: {}; token {} ms; binaries {}\n",
        load(),
        args.token_ms,
        bin_dir.display()
    );
    if !args.sim_only {
        let mut tables = Vec::new();
        for &n in &args.nodes {
            let runs = measure(&args, &bin_dir, n, "command", args.runs).await?;
            tables.push((format!("{n} nodes, fenced at once"), runs));
        }
        if args.lease_runs > 0 {
            let n = args.nodes.first().copied().unwrap_or(3);
            let runs = measure(&args, &bin_dir, n, "kill_node", args.lease_runs).await?;
            tables.push((format!("{n} nodes, kill_node (lease wait)"), runs));
        }
        print_tables(&tables);
        println!("\nload average after the real runs: {}\n", load());
    }
    let sizes: Vec<u32> = args.sim.iter().copied().filter(|n| *n > 0).collect();
    if !sizes.is_empty() {
        println!("## Gather alone (in-memory group, real membership machines)\n");
        println!("| members | rounds to activation | messages multicast | deliveries | clients gathered | wall time |");
        println!("|---:|---:|---:|---:|---:|---:|");
        for n in sizes {
            let r = sim::gather(n)?;
            println!(
                "| {n} | {} | {} | {} | {} | {:.0} ms |",
                r.rounds,
                r.messages,
                r.deliveries,
                r.clients,
                r.wall.as_secs_f64() * 1000.0
            );
        }
    }
    Ok(())
}

/// `runs` power-offs of the server's node on a fresh `n`-node rig.
async fn measure(
    args: &Args,
    bin_dir: &std::path::Path,
    n: u32,
    fencing: &str,
    runs: u32,
) -> Result<Vec<Run>, String> {
    let test = format!("failover-bench {n} nodes {fencing}");
    let mut rc = RigConfig::new(n, fencing, bin_dir.to_path_buf());
    rc.token_ms = args.token_ms;
    rc.log = "info".into();
    // The node is off (the bench killed it): `command` fencing confirms at once, as a
    // power switch would; `kill_node` cannot reach it, so the lease is waited out.
    rc.confirm_fencing = fencing == "command";
    let Some(mut rig) = Rig::start(&test, rc).await else {
        return Err(format!("{test}: prerequisites missing (see above)"));
    };
    let nodes = rig.cluster.nodes();
    let mut out = Vec::new();
    for i in 0..runs {
        eprintln!("{test}: run {}/{runs} (load {})", i + 1, load());
        let (server, _) = rig.agreed_server(&nodes, Duration::from_secs(90)).await;
        let writer_node = *nodes
            .iter()
            .find(|n| **n != server)
            .ok_or("no node besides the server")?;
        let writer = Writer::start(
            &rig.nbd_socket(writer_node),
            VOLUME,
            4096,
            MIB,
            Duration::from_secs(120),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if let Some(e) = writer.failed() {
            return Err(format!(
                "{test}: the writer failed before the power-off: {e}"
            ));
        }
        let cut = wall_ms_f64();
        rig.power_off(server).await;
        let survivors: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != server).collect();
        let (second, _) = rig.agreed_server(&survivors, Duration::from_secs(90)).await;
        // Wait for the writer to get through, and for the new server's first grant.
        let deadline = Instant::now() + Duration::from_secs(60);
        let timing = loop {
            let resumed = writer.completions().last().is_some_and(|t| *t > cut);
            let status = rig.status(second).await.ok();
            let timing: Option<FailoverTiming> =
                status.and_then(|s| s.cluster).and_then(|c| c.failover);
            if resumed
                && timing
                    .as_ref()
                    .is_some_and(|t| t.first_origin_write_at_ms.is_some())
            {
                break timing;
            }
            if let Some(e) = writer.failed() {
                return Err(format!("{test}: the writer failed: {e}"));
            }
            if Instant::now() > deadline {
                eprintln!("{test}: no first write seen within 60 s: {timing:?}");
                break timing;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let log = writer.stop().await;
        let run = evaluate(cut, timing.as_ref(), &log);
        eprintln!("{test}: run {}: {run:?}", i + 1);
        out.push(run);
        // Power the node back on for the next run.
        rig.cluster
            .start_node(server)
            .await
            .map_err(|e| format!("start node {server}'s corosync: {e}"))?;
        rig.start_agent(server).await;
    }
    Ok(out)
}

fn evaluate(cut: f64, timing: Option<&FailoverTiming>, log: &WriteLog) -> Run {
    let mut run = Run {
        outage: log.outage_after(cut).map(|(a, b)| b - a),
        ..Run::default()
    };
    let Some(t) = timing else {
        return run;
    };
    run.gathered = t.gathered_clients.len();
    let confchg = t.confchg_at_ms.or(t.totem_confchg_at_ms);
    run.detection = confchg.map(|c| c as f64 - cut);
    run.csnap = t.confchg_to_first_write_ms().map(|ms| ms as f64);
    for (name, ms) in t.phases() {
        run.phases.insert(name, ms as f64);
    }
    run
}

/// (median, p99) of the known values, and how many there were.
fn stats(values: impl Iterator<Item = Option<f64>>) -> Option<(f64, f64, usize)> {
    let mut v: Vec<f64> = values.flatten().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| {
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    Some((pick(0.5), pick(0.99), v.len()))
}

fn cell(s: Option<(f64, f64, usize)>) -> String {
    match s {
        Some((median, p99, _)) => format!("{median:.0} / {p99:.0}"),
        None => "-".into(),
    }
}

fn print_tables(tables: &[(String, Vec<Run>)]) {
    const PHASES: [&str; 8] = [
        "old server settled",
        "chosen",
        "announce delivered",
        "server ready",
        "gather done",
        "serving",
        "first origin write",
        "",
    ];
    println!("## Failover after a power-off of the server's node (ms, median / p99)\n");
    let mut head = String::from("| cluster | runs | (a) detection: power-off -> confchg | (b) csnap: confchg -> first origin write |");
    let mut rule = String::from("|---|---:|---:|---:|");
    for p in PHASES.iter().filter(|p| !p.is_empty()) {
        head.push_str(&format!(" (b) -> {p} |"));
        rule.push_str("---:|");
    }
    head.push_str(" (c) outage seen by the writer |");
    rule.push_str("---:|");
    println!("{head}\n{rule}");
    for (name, runs) in tables {
        let mut line = format!(
            "| {name} | {} | {} | {} |",
            runs.len(),
            cell(stats(runs.iter().map(|r| r.detection))),
            cell(stats(runs.iter().map(|r| r.csnap)))
        );
        for p in PHASES.iter().filter(|p| !p.is_empty()) {
            line.push_str(&format!(
                " {} |",
                cell(stats(runs.iter().map(|r| r.phases.get(p).copied())))
            ));
        }
        line.push_str(&format!(
            " {} |",
            cell(stats(runs.iter().map(|r| r.outage)))
        ));
        println!("{line}");
    }
    println!(
        "\nEach (b) -> phase column is the time from the previous moment to that one \
         (a phase not seen in a run is left out of its figures)."
    );
}
