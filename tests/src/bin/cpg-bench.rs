//! cpg-bench: agreed-order multicast latency and throughput of csnap's Group layer, on a
//! real N-node corosync cluster in network namespaces (this machine only) and on the
//! in-memory Group, printed side by side.
//!
//!     cargo run --release -p csnap-e2e --bin cpg-bench -- [--nodes 3] [--samples 2000]
//!
//! Needs root and corosync for the corosync column (without them it says so and measures
//! the in-memory Group only). Every phase is bounded; the cluster is removed at the end.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use cpg_glue::memory::MemoryCluster;
use csnap_e2e::bench::{self, BenchPlan, BenchResult};
use csnap_e2e::prereq::missing_prerequisites;
use csnap_e2e::{Cluster, ClusterConfig};

#[derive(Debug, Parser)]
#[command(about = "CPG agreed-multicast latency and throughput: corosync vs in-memory")]
struct Args {
    /// Cluster size (one group member per node).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=8))]
    nodes: u32,
    /// Latency round trips to measure.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    samples: u64,
    /// Throughput payload sizes in bytes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 1024, 16384, 262144])]
    sizes: Vec<usize>,
    /// Bytes each member sends per throughput size (message count = this / size,
    /// clamped to 20..=5000).
    #[arg(long, default_value_t = 8 << 20)]
    bytes_per_member: usize,
    /// Totem token timeout of the corosync cluster, ms.
    #[arg(long, default_value_t = 1000)]
    token_ms: u32,
    /// Bound for each phase, seconds.
    #[arg(long, default_value_t = 300)]
    phase_timeout: u64,
    /// Measure the in-memory Group only.
    #[arg(long)]
    memory_only: bool,
}

fn plan(args: &Args) -> BenchPlan {
    BenchPlan {
        latency_samples: args.samples as usize,
        warmup: 100,
        latency_payload: 64,
        throughput: args
            .sizes
            .iter()
            .map(|&size| {
                let size = size.max(1);
                (size, (args.bytes_per_member / size).clamp(20, 5000))
            })
            .collect(),
        phase_timeout: Duration::from_secs(args.phase_timeout),
    }
}

fn duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.3} ms", us / 1e3)
    }
}

fn size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// One table row per figure, one column per backend.
fn print_table(plan: &BenchPlan, columns: &[(&str, &Result<BenchResult, String>)]) {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |label: String, cell: &dyn Fn(&BenchResult) -> String| {
        let cells = columns
            .iter()
            .map(|(_, r)| match r {
                Ok(r) => cell(r),
                Err(_) => "-".into(),
            })
            .collect();
        rows.push((label, cells));
    };
    let probe = size(plan.latency_payload);
    row(format!("latency p50 ({probe} round trip)"), &|r| {
        duration(r.latency.p50)
    });
    row(format!("latency p99 ({probe} round trip)"), &|r| {
        duration(r.latency.p99)
    });
    row(format!("latency max ({probe} round trip)"), &|r| {
        duration(r.latency.max)
    });
    for (i, &(payload, count)) in plan.throughput.iter().enumerate() {
        let label = format!("{} x {count}/member", size(payload));
        row(format!("throughput {label}: msg/s"), &|r| {
            format!("{:.0}", r.throughput[i].messages_per_sec())
        });
        row(format!("throughput {label}: MB/s"), &|r| {
            format!("{:.2}", r.throughput[i].megabytes_per_sec())
        });
    }
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    print!("{:width$}", "");
    for (name, _) in columns {
        print!("  {name:>14}");
    }
    println!();
    for (label, cells) in rows {
        print!("{label:width$}");
        for cell in cells {
            print!("  {cell:>14}");
        }
        println!();
    }
    for (name, result) in columns {
        if let Err(e) = result {
            println!("{name}: not measured: {e}");
        }
    }
}

async fn corosync_column(args: &Args, plan: &BenchPlan) -> Result<BenchResult, String> {
    if args.memory_only {
        return Err("--memory-only".into());
    }
    let missing = missing_prerequisites();
    if !missing.is_empty() {
        return Err(format!("missing {}", missing.join(", ")));
    }
    eprintln!(
        "cpg-bench: starting a {}-node corosync cluster in network namespaces",
        args.nodes
    );
    let cluster = Cluster::start_with(ClusterConfig::new(args.nodes).token_ms(args.token_ms))
        .await
        .map_err(|e| format!("cluster start failed: {e}"))?;
    eprintln!("cpg-bench: measuring corosync");
    let result = bench::run(&cluster, "cpg-bench", plan).await;
    drop(cluster);
    result
}

async fn memory_column(args: &Args, plan: &BenchPlan) -> Result<BenchResult, String> {
    eprintln!("cpg-bench: measuring the in-memory Group");
    let cluster = MemoryCluster::with_nodes(args.nodes).map_err(|e| e.to_string())?;
    bench::run(&cluster, "cpg-bench", plan).await
}

fn main() -> ExitCode {
    let args = Args::parse();
    let plan = plan(&args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cpg-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (real, memory) = runtime.block_on(async {
        let real = corosync_column(&args, &plan).await;
        let memory = memory_column(&args, &plan).await;
        (real, memory)
    });
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "cpg-bench: {} nodes, one member each; agreed-order multicast; {} latency samples; \
         corosync: knet, token {} ms, network namespaces on one host; {cpus} CPUs",
        args.nodes, args.samples, args.token_ms
    );
    print_table(&plan, &[("corosync", &real), ("in-memory", &memory)]);
    if memory.is_err() || (real.is_err() && !args.memory_only && missing_prerequisites().is_empty())
    {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
