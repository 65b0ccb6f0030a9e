//! The export-diff benchmark (issue 13): how fast `csnapctl export-diff` streams the
//! changed chunks between two snapshots, against what the device gives for the same reads,
//! and against the cost without csnap's metadata (reading and comparing both snapshots).
//!
//! One csnap-agent --standalone (O_DIRECT) serves an origin of `--size` bytes filled with
//! incompressible data. Snapshot `a`; fio writes `--xdiff-changed-percent` of the volume's
//! chunks through NBD, 64 KiB at a time, each chunk at most once, scattered at random over
//! the whole volume; snapshot `b`. Then, in rounds: `csnapctl export-diff VOLUME --from a b`
//! into /dev/null (the stream's bytes counted by the agent's reads), and fio reading the
//! same number of random 64 KiB blocks of the origin file directly (libaio, O_DIRECT, the
//! same iodepth as export-diff's requests in flight), and reading the whole origin
//! sequentially (1 MiB, O_DIRECT) for the full-comparison estimate. Last, `csnapctl
//! rollback VOLUME a --wait`: the same chunks copied back onto the origin, timed once.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::engines::{self, Setup, VOLUME};
use crate::fio::{self, Access, FioJob, Length};
use crate::procs::{run_tool, Proc};
use crate::report::Engine;
use crate::setup::{self, WorkDir};

/// What the export-diff benchmark runs with.
#[derive(Clone, Debug)]
pub(crate) struct XdiffPlan {
    pub(crate) size: u64,
    pub(crate) chunk: u64,
    /// Changed chunks between the two snapshots, in hundredths of a percent.
    pub(crate) changed_per_10k: u64,
    pub(crate) rounds: u32,
    /// The origin is a sparse file (a 1 TiB volume fits no test disk written): only the
    /// changed chunks hold data, and the device references read the store file instead
    /// (written beforehand, so they read the disk, not holes).
    pub(crate) sparse_origin: bool,
}

/// Requests csnapctl export-diff keeps in flight (crates/agent/src/ctl_xdiff.rs), so the
/// device reference reads with the same depth.
const EXPORT_DEPTH: u32 = 64;

/// Runs the benchmark and prints its table; `Ok(false)` when a step failed.
pub(crate) async fn run(
    plan: &XdiffPlan,
    dir: &WorkDir,
    agent: PathBuf,
    csnapctl: PathBuf,
) -> anyhow::Result<bool> {
    let started = setup::now_utc();
    let load_before = setup::load_average();
    let setup = Setup::csnap_only(dir.path(), agent, csnapctl, true);
    let chunks = plan.size / plan.chunk;
    let changed = (chunks * plan.changed_per_10k / 10_000).max(1);
    let (origin, size) = (setup.csnap_origin.clone(), plan.size);
    if plan.sparse_origin {
        eprintln!(
            "a sparse {} MiB origin; writing the store ...",
            plan.size >> 20
        );
        setup::create_sparse_file(&origin, size)?;
    } else {
        eprintln!("writing a {} MiB origin and store ...", plan.size >> 20);
        tokio::task::spawn_blocking(move || setup::write_filled_file(&origin, size, 7)).await??;
    }
    // The changes' copy-outs, and as many again for the rollback at the end (the pin
    // shares the changed origin chunks, so each is copied out before its copy back).
    let store_size = 2 * changed * plan.chunk + (256 << 20);
    // What the device references read: the origin, or the written store for a sparse
    // origin (whose holes would read without touching the disk).
    let (reference, reference_size) = if plan.sparse_origin {
        (setup.csnap_store.clone(), store_size)
    } else {
        (setup.csnap_origin.clone(), plan.size)
    };
    let store = setup.csnap_store.clone();
    tokio::task::spawn_blocking(move || setup::write_zeroed_file(&store, store_size)).await??;
    engines::format_csnap(&setup, plan.chunk).await?;
    let mut server = engines::start_origin(&setup, Engine::Csnap).await?;

    engines::csnap_snapshot(&setup, "a").await?;
    eprintln!("changing {changed} of {chunks} chunks at random through NBD ...");
    let writes = FioJob {
        name: "xdiff-changes".into(),
        access: Access::RandWrite,
        block_size: plan.chunk,
        iodepth: 16,
        jobs: 1,
        offset: 0,
        length: plan.size,
        run: Length::OnePass {
            cap: Duration::from_secs(1800),
        },
    };
    let mut args = writes.args(server.uri(), &dir.join("xdiff-changes.json"));
    args.push(format!("--number_ios={changed}"));
    let mut cmd = Command::new("fio");
    cmd.args(args);
    run_tool(
        "fio (changes)",
        cmd,
        &dir.join("xdiff-changes.log"),
        writes.run.bound(),
    )
    .await?;
    engines::csnap_snapshot(&setup, "b").await?;
    server.check_alive()?;

    let mut exports = Vec::new();
    let mut random_reads = Vec::new();
    let mut sequential = Vec::new();
    for round in 1..=plan.rounds {
        let log = dir.join("xdiff-export.log");
        let mut cmd = Command::new(&setup.csnapctl);
        cmd.arg("--socket").arg(setup.csnap_control()).args([
            "export-diff",
            VOLUME,
            "--from",
            "a",
            "b",
            "/dev/null",
        ]);
        let began = Instant::now();
        let status = Proc::spawn("csnapctl export-diff", cmd, &log)?
            .wait(Duration::from_secs(3600))
            .await?;
        if !status.success() {
            bail!(
                "csnapctl export-diff failed ({status}); see {}",
                log.display()
            );
        }
        let took = began.elapsed();
        exports.push(took);
        eprintln!(
            "  round {round}: export-diff {:.2} s ({:.1} MB/s)",
            took.as_secs_f64(),
            mb_per_sec(changed * plan.chunk, took)
        );

        let reads = FioJob {
            name: "xdiff-device-random".into(),
            access: Access::RandRead,
            block_size: plan.chunk,
            iodepth: EXPORT_DEPTH,
            jobs: 1,
            offset: 0,
            length: reference_size,
            run: Length::OnePass {
                cap: Duration::from_secs(1800),
            },
        };
        let out = dir.join("xdiff-device-random.json");
        let mut args = reads.file_args(&reference, true, &out);
        args.push(format!("--number_ios={changed}"));
        let mut cmd = Command::new("fio");
        cmd.args(args);
        run_tool(
            "fio (device, random)",
            cmd,
            &dir.join("xdiff-device.log"),
            reads.run.bound(),
        )
        .await?;
        random_reads.push(fio_bytes_per_sec(&out)?);

        let whole = FioJob {
            name: "xdiff-device-sequential".into(),
            access: Access::SeqRead,
            block_size: 1 << 20,
            iodepth: 16,
            ..reads.clone()
        };
        let out = dir.join("xdiff-device-sequential.json");
        let mut cmd = Command::new("fio");
        cmd.args(whole.file_args(&reference, true, &out));
        run_tool(
            "fio (device, sequential)",
            cmd,
            &dir.join("xdiff-device.log"),
            whole.run.bound(),
        )
        .await?;
        sequential.push(fio_bytes_per_sec(&out)?);
    }
    // Rollback of the same change: the origin back to `a`, copy-back followed to its end.
    let log = dir.join("xdiff-rollback.log");
    let mut cmd = Command::new(&setup.csnapctl);
    cmd.arg("--socket").arg(setup.csnap_control()).args([
        "rollback",
        VOLUME,
        "a",
        "--wait",
        "--timeout",
        "3600",
    ]);
    let began = Instant::now();
    let status = Proc::spawn("csnapctl rollback", cmd, &log)?
        .wait(Duration::from_secs(3700))
        .await?;
    if !status.success() {
        bail!(
            "csnapctl rollback --wait failed ({status}); see {}",
            log.display()
        );
    }
    let rollback = began.elapsed();
    server.check_alive()?;
    server.stop().await;

    let export = median_duration(&mut exports);
    let data = changed * plan.chunk;
    let export_rate = data as f64 / export.as_secs_f64().max(1e-9);
    let random = median(&mut random_reads);
    let seq = median(&mut sequential);
    let compare_both = 2.0 * plan.size as f64 / seq.max(1.0);
    println!(
        "csnap export-diff benchmark, {started}: {}\n",
        setup::describe_machine()
    );
    println!(
        "origin {} MiB{}, {} KiB chunks ({chunks}); {changed} chunks ({:.2}%) changed at random \
         between snapshots a and b; direct I/O; median of {} round(s); load average {load_before} \
         before, {} after\n",
        plan.size >> 20,
        if plan.sparse_origin {
            " (sparse: data only in the changed chunks; the device references read the \
             store file, written beforehand)"
        } else {
            ""
        },
        plan.chunk >> 10,
        plan.changed_per_10k as f64 / 100.0,
        plan.rounds,
        setup::load_average()
    );
    println!("| what | data | seconds | MB/s | x device (random reads of the same chunks) |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| csnapctl export-diff --from a b | {} MiB | {:.2} | {:.1} | {:.2} |",
        data >> 20,
        export.as_secs_f64(),
        export_rate / 1e6,
        export_rate / random.max(1.0)
    );
    println!(
        "| device: fio randread {} KiB x {changed}, iodepth {EXPORT_DEPTH}, O_DIRECT | {} MiB | {:.2} | {:.1} | 1.00 |",
        plan.chunk >> 10,
        data >> 20,
        data as f64 / random.max(1.0),
        random / 1e6
    );
    println!(
        "| without csnap's metadata: read both snapshots in full at the device's sequential rate | {} MiB | {:.2} | {:.1} | - |",
        (2 * plan.size) >> 20,
        compare_both,
        seq / 1e6
    );
    println!(
        "| csnapctl rollback vol a --wait (the same chunks copied back, once) | {} MiB | {:.2} | {:.1} | {:.2} |",
        data >> 20,
        rollback.as_secs_f64(),
        mb_per_sec(data, rollback),
        data as f64 / rollback.as_secs_f64().max(1e-9) / random.max(1.0)
    );
    println!(
        "\nexport-diff takes {:.1}x less time than reading and comparing both snapshots in \
         full would.",
        compare_both / export.as_secs_f64().max(1e-9)
    );
    Ok(true)
}

fn mb_per_sec(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64().max(1e-9) / 1e6
}

fn fio_bytes_per_sec(path: &std::path::Path) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read fio's output {}", path.display()))?;
    Ok(fio::parse_result(&text, true)?.bytes_per_sec)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn median_duration(values: &mut [Duration]) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}
