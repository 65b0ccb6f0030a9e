//! nbd-bench: csnap's NBD exports against qemu-nbd, side by side, in one run.
//!
//!     scripts/bench-nbd [--quick] [--direct] [--size 2G] [--chunk-size 64K] [--rounds 3] ...
//!
//! Three servers, each on its own unix socket in a temporary directory or its own
//! loopback TCP port, measured by fio's nbd engine with the same iodepth and job count,
//! and fio on the raw file itself (the device limit):
//!
//! * **device**: fio with libaio and O_DIRECT (direct mode) or psync through the page
//!   cache (page mode) on the raw origin file; in the first-touch tests, the three I/Os a
//!   first touch must do (read the old chunk, write it to a store file with a flush per
//!   few copies, write the new data), counted as one first touch per three I/Os;
//! * **raw**: qemu-nbd on a raw origin file (the ceiling);
//! * **csnap**: csnap-agent --standalone on an origin file and a store formatted with
//!   csnapctl format (chunk size as given);
//! * **qcow2**: qemu-nbd on a qcow2 image of the same data, cluster size = chunk size, with
//!   internal snapshots made by `qemu-img snapshot -c` (the copy-on-write peer).
//!
//! Tests, in the order they run (origin size S):
//! 1. 4 KiB random read of the origin, no snapshot yet (timed).
//! 2. Snapshot s1. 64 KiB random first-touch writes to [0, S/4): fio's random map writes
//!    every block once, so every write hits a chunk not yet copied out (one pass).
//! 3. 64 KiB random writes to [0, S/4) again: every chunk is now unique (timed).
//! 4. Snapshots s2..sN. 64 KiB random first-touch writes to [S/4, S/2) (one pass).
//! 5. 1 MiB sequential read of snapshot s1, the whole device (timed): csnap `vol@s1`,
//!    qcow2 `qemu-nbd -l s1 --read-only`, raw the file itself.
//! 6. nbdcopy of snapshot s1 (the whole device) to a file, 1 MiB requests.
//!
//! The whole sequence runs once per chunk size (`--chunk-size 4K,64K`), cache mode
//! (`--cache direct|page|both`) and transport (`--transport unix|tcp|both`), each with
//! fresh images. Every server's CPU per request (user + system from /proc/PID/stat after
//! the ramp, over the requests fio counted) and most threads are printed with each figure.
//!
//! Goals (issue 4): at least 0.9x qemu-nbd raw where no copy-out is needed (1, 3, 5);
//! first-touch writes at least as fast as qcow2 (2, 4). The table goes to stdout as
//! Markdown, progress to stderr. Exit status 1 if a run failed (not if a goal is missed).

mod cluster;
mod engines;
mod fio;
mod memory;
mod procs;
mod report;
mod setup;
mod xdiff;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use engines::{Server, Setup, Transport};
use fio::{Access, FioJob, FioResult, Length};
use procs::{run_tool, Proc};
use report::{Engine, Goal, Row};
use setup::WorkDir;

#[derive(Debug, Parser)]
#[command(about = "csnap NBD vs qemu-nbd (raw and qcow2 with internal snapshots), with fio")]
struct Args {
    /// A short smoke run: 256 MiB origin, one round of 2 s per timed test, no ramp.
    #[arg(long)]
    quick: bool,
    /// Origin size (default 2G; 256M with --quick).
    #[arg(long, value_parser = setup::parse_size)]
    size: Option<u64>,
    /// csnap chunk size and qcow2 cluster size: 4K..64K, so a 64 KiB first-touch write
    /// never shares a chunk with another write. A list (4K,64K) runs everything once per
    /// size.
    #[arg(long, default_value = "64K", value_delimiter = ',', value_parser = setup::parse_size)]
    chunk_size: Vec<u64>,
    /// Snapshots before the second first-touch test.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(2..=10_000))]
    snapshots: u32,
    /// fio iodepth (the same for every engine).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    iodepth: u32,
    /// fio jobs, each with its own NBD connection (the same for every engine).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    jobs: u32,
    /// Rounds of each timed test, engines round-robin; the table shows each engine's
    /// median (default 3; 1 with --quick). First-touch tests run once (a region can be
    /// touched first only once).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: Option<u32>,
    /// Seconds each timed test runs (default 10; 2 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    runtime: Option<u64>,
    /// Unmeasured seconds before each timed test (default 2; 0 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=600))]
    ramp: Option<u64>,
    /// Cap, in seconds, on each one-pass first-touch run (it stops early if reached).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
    first_touch_cap: u64,
    /// direct: O_DIRECT everywhere (qemu-nbd --cache=none, csnap-agent --direct-io, fio
    /// libaio direct=1 on the file); page: the page cache everywhere (fio psync on the
    /// file); both: the whole run once per mode, never mixed.
    #[arg(long, value_enum, default_value_t = CacheMode::Both)]
    cache: CacheMode,
    /// qemu-nbd's I/O engine (`--aio`): threads (its default), native (Linux AIO; direct
    /// I/O only) or io_uring. csnap's own is io_uring unless CSNAP_IO_URING=0 is set.
    #[arg(long, value_enum, default_value_t = QemuAio::Threads)]
    qemu_aio: QemuAio,
    /// How the qcow2 image gets its data: `convert` (qemu-img convert from the filled raw
    /// file: clusters sequential and all allocated) or `client` (an empty image filled
    /// through qemu-nbd by nbdcopy, as a VM's writes would: clusters in arrival order).
    #[arg(long, value_enum, default_value_t = Qcow2Fill::Convert)]
    qcow2_fill: Qcow2Fill,
    /// csnap's store file: `written` (every block written once beforehand, as a block
    /// device or logical volume is: a copy-out costs its data write, and a flush no
    /// file-system journal commit for newly allocated blocks) or `sparse` (blocks allocated
    /// by the file system on first use, as in runs before 2026-11-27).
    #[arg(long, value_enum, default_value_t = StoreFile::Written)]
    csnap_store: StoreFile,
    /// Same as --cache direct (kept for old command lines).
    #[arg(long, conflicts_with = "cache")]
    direct: bool,
    /// How fio reaches the servers: unix sockets, TCP on 127.0.0.1, or both (the whole run
    /// once per transport).
    #[arg(long, value_enum, default_value_t = TransportMode::Both)]
    transport: TransportMode,
    /// Where the temporary directory goes (its file system holds every image).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Keep the temporary directory (images, logs, fio JSON).
    #[arg(long)]
    keep: bool,
    /// Where csnap-agent and csnapctl are (default: beside this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Run the cluster-mode rows instead of the engine matrix: csnap in cluster mode (a
    /// 2-node corosync cluster in network namespaces, root needed) with the client on
    /// another node than the metadata server, and on the server's node, against csnap
    /// standalone; direct I/O, unix sockets, the first --chunk-size, --size, --rounds.
    #[arg(long, conflicts_with = "memory")]
    cluster: bool,
    /// Run the memory test instead of the speed tests: the agent's resident memory with
    /// --memory-snapshots snapshots of a --memory-volume sparse volume and
    /// --memory-connections NBD connections at once (issue 11: under 128 MiB). Uses the
    /// first --chunk-size and --cache direct unless --cache page.
    #[arg(long)]
    memory: bool,
    /// Run the export-diff benchmark instead of the speed tests (issue 13): `csnapctl
    /// export-diff --from a b` of --xdiff-changed-percent of the chunks of a --size origin,
    /// changed at random between the snapshots, against the device reading the same chunks
    /// and against reading both snapshots in full. Uses the first --chunk-size, direct I/O,
    /// --rounds.
    #[arg(long, conflicts_with_all = ["memory", "cluster"])]
    export_diff: bool,
    /// The export-diff benchmark's changed share of the volume, in percent.
    #[arg(long, default_value_t = 1.0)]
    xdiff_changed_percent: f64,
    /// The export-diff benchmark's origin: `filled` (every block written beforehand) or
    /// `sparse` (data only where the changes write it: a 1 TiB volume on a small disk).
    #[arg(long, value_enum, default_value_t = XdiffOrigin::Filled)]
    xdiff_origin: XdiffOrigin,
    /// The memory test's sparse volume size.
    #[arg(long, default_value = "1T", value_parser = setup::parse_size)]
    memory_volume: u64,
    /// Snapshots the memory test creates.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    memory_snapshots: u32,
    /// NBD connections the memory test keeps busy at once (writers, then readers).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    memory_connections: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CacheMode {
    Direct,
    Page,
    Both,
}

/// How qemu-nbd does its I/O (its `--aio` option), for the qemu-nbd setups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QemuAio {
    /// A thread pool.
    Threads,
    /// Linux native AIO.
    Native,
    /// io_uring.
    #[value(name = "io_uring")]
    IoUring,
}

impl QemuAio {
    /// The qemu-nbd option that selects it.
    pub fn flag(self) -> &'static str {
        match self {
            QemuAio::Threads => "--aio=threads",
            QemuAio::Native => "--aio=native",
            QemuAio::IoUring => "--aio=io_uring",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Qcow2Fill {
    Convert,
    Client,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StoreFile {
    Written,
    Sparse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum XdiffOrigin {
    Filled,
    Sparse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TransportMode {
    Unix,
    Tcp,
    Both,
}

/// Everything a run decided, for the header.
#[derive(Clone)]
struct Plan {
    size: u64,
    chunk: u64,
    runtime: Duration,
    rounds: u32,
    ramp: Duration,
    cap: Duration,
    iodepth: u32,
    jobs: u32,
    snapshots: u32,
    direct: bool,
    transport: Transport,
}

impl Plan {
    fn from_args(args: &Args) -> anyhow::Result<Plan> {
        let size = args
            .size
            .unwrap_or(if args.quick { 256 << 20 } else { 2 << 30 });
        for &chunk in &args.chunk_size {
            anyhow::ensure!(
                chunk.is_power_of_two() && (4096..=65536).contains(&chunk),
                "--chunk-size must be powers of two from 4K to 64K (got {chunk})"
            );
        }
        let chunk = args.chunk_size.first().copied().unwrap_or(65536);
        let unit = 4 * u64::from(args.jobs) * (1 << 20);
        anyhow::ensure!(
            size >= unit && size & ((4 << 20) - 1) == 0,
            "--size must be a multiple of 4 MiB and at least {} MiB for {} jobs",
            unit >> 20,
            args.jobs
        );
        Ok(Plan {
            size,
            chunk,
            runtime: Duration::from_secs(args.runtime.unwrap_or(if args.quick { 2 } else { 10 })),
            rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 3 }),
            ramp: Duration::from_secs(args.ramp.unwrap_or(if args.quick { 0 } else { 2 })),
            cap: Duration::from_secs(args.first_touch_cap),
            iodepth: args.iodepth,
            jobs: args.jobs,
            snapshots: args.snapshots,
            direct: args.direct,
            transport: Transport::Unix,
        })
    }

    fn job(
        &self,
        name: &str,
        access: Access,
        block_size: u64,
        region: (u64, u64),
        run: Length,
    ) -> FioJob {
        FioJob {
            name: name.to_string(),
            access,
            block_size,
            iodepth: self.iodepth,
            jobs: self.jobs,
            offset: region.0,
            length: region.1,
            run,
        }
    }

    fn timed(&self) -> Length {
        Length::Timed {
            ramp: self.ramp,
            runtime: self.runtime,
        }
    }

    fn one_pass(&self) -> Length {
        Length::OnePass { cap: self.cap }
    }
}

/// The servers running now, stopped by PID when dropped.
struct Servers {
    raw: Option<Server>,
    csnap: Option<Server>,
    qcow2: Option<Server>,
}

impl Servers {
    fn get(&mut self, engine: Engine) -> Option<&mut Server> {
        match engine {
            Engine::Device => None,
            Engine::Raw => self.raw.as_mut(),
            Engine::Csnap => self.csnap.as_mut(),
            Engine::Qcow2 => self.qcow2.as_mut(),
        }
    }
}

/// nbdcopy's request size in the copy test (its requests are what CPU per request counts).
const COPY_REQUEST: u64 = 1 << 20;
/// Longest a whole-snapshot copy may take.
const COPY_WAIT: Duration = Duration::from_secs(900);

/// One measurement: a fio job, or nbdcopy of the whole export to a file.
enum Work {
    Fio(FioJob),
    /// First-touch writes: a fio job on the servers; on the device, the three I/Os every
    /// first touch must do (`FioJob::first_touch_device_args`), its physical limit.
    FirstTouch(FioJob),
    Copy {
        name: String,
        size: u64,
    },
}

impl Work {
    fn name(&self) -> &str {
        match self {
            Work::Fio(job) | Work::FirstTouch(job) => &job.name,
            Work::Copy { name, .. } => name,
        }
    }

    fn tool(&self) -> &'static str {
        match self {
            Work::Fio(_) | Work::FirstTouch(_) => "fio",
            Work::Copy { .. } => "nbdcopy",
        }
    }
}

struct Bench {
    setup: Setup,
    servers: Servers,
    failures: Vec<String>,
}

impl Bench {
    /// Runs `job` against every engine in turn, `rounds` times round-robin (so load from
    /// elsewhere hits every engine alike), and records each engine's median run in `row`.
    /// A failed run is reported; an engine with no successful run leaves its cell empty.
    async fn measure_all(&mut self, job: &Work, rounds: u32, row: &mut Row) {
        let mut runs: Vec<(Engine, Vec<FioResult>)> =
            Engine::ALL.iter().map(|&e| (e, Vec::new())).collect();
        for round in 1..=rounds {
            for (engine, results) in runs.iter_mut() {
                let engine = *engine;
                match self.measure(job, engine).await {
                    Ok(r) => {
                        eprintln!(
                            "  {:<6} round {round}: {:>9.0} IOPS {:>8.1} MB/s  ({} I/Os in {:.1} s) \
                             CPU {} us/request, {} threads, load {}",
                            engine.label(),
                            r.iops,
                            r.megabytes_per_sec(),
                            r.ios,
                            r.runtime.as_secs_f64(),
                            r.cpu_us_per_request
                                .map_or_else(|| "-".to_string(), |c| format!("{c:.1}")),
                            r.threads.map_or_else(|| "-".to_string(), |t| t.to_string()),
                            setup::load_average()
                        );
                        results.push(r);
                    }
                    Err(e) => {
                        eprintln!("  {:<5} round {round} FAILED: {e:#}", engine.label());
                        self.failures.push(format!(
                            "{} on {} (round {round}): {e:#}",
                            row.label,
                            engine.label()
                        ));
                    }
                }
            }
        }
        for (engine, results) in runs {
            if let Some(median) = fio::median(&results) {
                row.set(engine, median);
                let iops = results.iter().map(|r| r.iops);
                let min = iops.clone().fold(f64::INFINITY, f64::min);
                let max = iops.fold(0.0, f64::max);
                row.set_spread(engine, min, max);
            }
        }
    }

    async fn measure(&mut self, work: &Work, engine: Engine) -> anyhow::Result<FioResult> {
        let stem = format!("{}-{}", work.name(), engine.label());
        let output = self.setup.dir.join(format!("{stem}.json"));
        let log = self.setup.dir.join(format!("{stem}.log"));
        let copy = self.setup.dir.join("copy.img");
        let (source, pid) = if engine == Engine::Device {
            (None, None)
        } else {
            let server = self
                .servers
                .get(engine)
                .with_context(|| format!("the {} server is not running", engine.label()))?;
            server.check_alive()?;
            (Some(server.uri().to_string()), server.pid())
        };
        let (cmd, bound, ramp) = match work {
            Work::Fio(job) | Work::FirstTouch(job) => {
                let mut cmd = Command::new("fio");
                match (&source, work) {
                    (Some(uri), _) => cmd.args(job.args(uri, &output)),
                    (None, Work::FirstTouch(_)) => {
                        let store = self.device_store(job.length).await?;
                        cmd.args(job.first_touch_device_args(
                            &self.setup.raw_image,
                            &store,
                            self.setup.direct,
                            &output,
                        ))
                    }
                    (None, _) => {
                        cmd.args(job.file_args(&self.setup.raw_image, self.setup.direct, &output))
                    }
                };
                let ramp = match job.run {
                    fio::Length::Timed { ramp, .. } => ramp,
                    fio::Length::OnePass { .. } => Duration::ZERO,
                };
                (cmd, job.run.bound(), ramp)
            }
            Work::Copy { .. } => {
                let _ = std::fs::remove_file(&copy);
                let mut cmd = Command::new("nbdcopy");
                cmd.arg(format!("--request-size={COPY_REQUEST}"));
                match &source {
                    Some(uri) => cmd.arg(uri),
                    None => cmd.arg(&self.setup.raw_image),
                };
                cmd.arg(&copy);
                (cmd, COPY_WAIT, Duration::ZERO)
            }
        };
        // Write back what the previous run left dirty, so it does not bill this one.
        tokio::task::spawn_blocking(nix::unistd::sync).await?;
        let started = std::time::Instant::now();
        let child = Proc::spawn(work.tool(), cmd, &log)?;
        // The server's CPU is counted from the end of the ramp (fio does not count the
        // ramp's requests) to the client's exit; its threads are sampled as it runs.
        let mut first = None;
        let mut threads = 0u32;
        let sampler = async {
            tokio::time::sleep(ramp).await;
            first = pid.and_then(procs::cpu_sample);
            loop {
                if let Some(s) = pid.and_then(procs::cpu_sample) {
                    threads = threads.max(s.threads);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };
        let status = tokio::select! {
            status = child.wait(bound) => status?,
            _ = sampler => anyhow::bail!("the CPU sampler stopped"),
        };
        let elapsed = started.elapsed();
        let last = pid.and_then(procs::cpu_sample);
        if !status.success() {
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            anyhow::bail!("{} failed ({status}): {}", work.tool(), log_text.trim());
        }
        if let Some(server) = self.servers.get(engine) {
            server.check_alive()?;
        }
        let mut result = match work {
            Work::Fio(job) | Work::FirstTouch(job) => {
                let text = std::fs::read_to_string(&output).unwrap_or_default();
                match (work, engine) {
                    (Work::FirstTouch(_), Engine::Device) => {
                        fio::parse_first_touch_limit(&text, job.block_size)?
                    }
                    _ => fio::parse_result(&text, job.reads())?,
                }
            }
            Work::Copy { size, .. } => {
                let copied = std::fs::metadata(&copy).map(|m| m.len()).unwrap_or(0);
                let _ = std::fs::remove_file(&copy);
                anyhow::ensure!(
                    copied == *size,
                    "nbdcopy wrote {copied} bytes, not the {size} of the export"
                );
                let secs = elapsed.as_secs_f64().max(1e-6);
                let ios = size.div_ceil(COPY_REQUEST);
                FioResult {
                    ios,
                    bytes: *size,
                    iops: ios as f64 / secs,
                    bytes_per_sec: *size as f64 / secs,
                    runtime: elapsed,
                    cpu_us_per_request: None,
                    threads: None,
                }
            }
        };
        if let (Some(a), Some(b)) = (first, last) {
            let cpu = b.cpu.saturating_sub(a.cpu);
            result.cpu_us_per_request = Some(cpu.as_secs_f64() * 1e6 / result.ios as f64);
            result.threads = Some(threads.max(b.threads));
        }
        Ok(result)
    }

    /// The store file of the first-touch device limit (written beforehand, as a block
    /// device is), at least `length` bytes.
    async fn device_store(&self, length: u64) -> anyhow::Result<std::path::PathBuf> {
        let path = self.setup.dir.join("device-store.img");
        let present = std::fs::metadata(&path).map_or(0, |m| m.len());
        if present < length {
            let target = path.clone();
            tokio::task::spawn_blocking(move || setup::write_filled_file(&target, length, 7))
                .await??;
        }
        Ok(path)
    }

    /// Records a failed step.
    fn failed(&mut self, step: &str, error: anyhow::Error) {
        eprintln!("  {step} FAILED: {error:#}");
        self.failures.push(format!("{step}: {error:#}"));
    }

    /// Snapshots `first..=last` (named sK) on csnap and qcow2 (whose writable server is
    /// stopped meanwhile: qemu-img needs the image to itself).
    async fn snapshots(&mut self, first: u32, last: u32) -> anyhow::Result<()> {
        eprintln!("snapshots s{first}..s{last} on csnap and qcow2");
        for k in first..=last {
            engines::csnap_snapshot(&self.setup, &format!("s{k}")).await?;
        }
        if let Some(server) = self.servers.qcow2.take() {
            server.stop().await;
        }
        for k in first..=last {
            engines::qcow2_snapshot(&self.setup, &format!("s{k}")).await?;
        }
        self.servers.qcow2 = Some(engines::start_origin(&self.setup, Engine::Qcow2).await?);
        Ok(())
    }
}

async fn prepare(args: &Args, plan: &Plan, dir: &WorkDir) -> anyhow::Result<Setup> {
    let (agent, csnapctl) = binaries(args)?;
    let setup = Setup {
        dir: dir.path().to_path_buf(),
        raw_image: dir.join("raw.img"),
        csnap_origin: dir.join("csnap-origin.img"),
        csnap_store: dir.join("csnap-store.img"),
        qcow2_image: dir.join("image.qcow2"),
        agent,
        csnapctl,
        direct: plan.direct,
        transport: plan.transport,
        qemu_aio: args.qemu_aio.flag(),
    };
    anyhow::ensure!(
        plan.direct || args.qemu_aio != QemuAio::Native,
        "--qemu-aio native needs direct I/O (qemu-nbd refuses it with the page cache): use \
         --cache direct"
    );
    for tool in ["fio", "qemu-nbd", "qemu-img"] {
        let log = dir.join("versions.log");
        let mut cmd = Command::new(tool);
        cmd.arg("--version");
        run_tool(tool, cmd, &log, Duration::from_secs(30))
            .await
            .with_context(|| format!("{tool} is needed (apt-get install fio qemu-utils)"))?;
    }

    eprintln!("writing a {} MiB origin ...", plan.size >> 20);
    let (raw, size) = (setup.raw_image.clone(), plan.size);
    tokio::task::spawn_blocking(move || setup::write_filled_file(&raw, size, 1)).await??;
    let (from, to) = (setup.raw_image.clone(), setup.csnap_origin.clone());
    tokio::task::spawn_blocking(move || std::fs::copy(&from, &to))
        .await?
        .context("cannot copy the origin for csnap")?;
    // Room for both first-touch regions plus metadata.
    let (store, store_size) = (setup.csnap_store.clone(), plan.size + (256 << 20));
    match args.csnap_store {
        StoreFile::Sparse => setup::create_sparse_file(&store, store_size)?,
        StoreFile::Written => {
            eprintln!("writing a {} MiB store ...", store_size >> 20);
            tokio::task::spawn_blocking(move || setup::write_zeroed_file(&store, store_size))
                .await??
        }
    }
    engines::format_csnap(&setup, plan.chunk).await?;
    match args.qcow2_fill {
        Qcow2Fill::Convert => {
            let mut convert = Command::new("qemu-img");
            convert
                .args(["convert", "-f", "raw", "-O", "qcow2", "-o"])
                .arg(format!("cluster_size={}", plan.chunk))
                .arg(&setup.raw_image)
                .arg(&setup.qcow2_image);
            run_tool(
                "qemu-img convert",
                convert,
                &dir.join("qemu-img.log"),
                Duration::from_secs(600),
            )
            .await?;
        }
        Qcow2Fill::Client => fill_qcow2_through_nbd(&setup, plan).await?,
    }
    Ok(setup)
}

/// An empty qcow2 image filled with the raw origin's bytes through qemu-nbd by nbdcopy
/// (several connections, requests in flight), so its clusters are allocated in the order
/// the writes arrive, as a VM's would be, not laid out in order by `qemu-img convert`.
async fn fill_qcow2_through_nbd(setup: &Setup, plan: &Plan) -> anyhow::Result<()> {
    let mut create = Command::new("qemu-img");
    create
        .args(["create", "-f", "qcow2", "-o"])
        .arg(format!("cluster_size={}", plan.chunk))
        .arg(&setup.qcow2_image)
        .arg(plan.size.to_string());
    let log = setup.dir.join("qemu-img.log");
    run_tool("qemu-img create", create, &log, Duration::from_secs(60)).await?;
    let server = engines::start_origin(setup, Engine::Qcow2).await?;
    let mut copy = Command::new("nbdcopy");
    copy.arg("--connections=4")
        .arg("--requests=16")
        .arg(&setup.raw_image)
        .arg(server.uri());
    let copied = run_tool("nbdcopy into qcow2", copy, &log, COPY_WAIT).await;
    server.stop().await;
    copied
}

fn describe_status(status: &serde_json::Value) -> String {
    let Some(v) = status.pointer("/volumes/0") else {
        return "no volume in csnapctl status".to_string();
    };
    let field = |path: &str| v.pointer(path).map_or("?".to_string(), |x| x.to_string());
    let used = match (
        v.pointer("/server_status/store_chunks")
            .and_then(|x| x.as_u64()),
        v.pointer("/server_status/free_chunks")
            .and_then(|x| x.as_u64()),
    ) {
        (Some(total), Some(free)) => (total - free.min(total)).to_string(),
        _ => "?".to_string(),
    };
    format!(
        "snapshots {}, store chunks used {used}, unique-cache hits {} misses {}",
        field("/server_status/snapshots"),
        field("/cache_hits"),
        field("/cache_misses")
    )
}

/// The whole benchmark once per cache mode and transport asked for, each with its own
/// work directory and table.
async fn run(args: Args) -> anyhow::Result<bool> {
    let base = Plan::from_args(&args)?;
    if args.memory {
        return run_memory(&args, &base).await;
    }
    if args.export_diff {
        anyhow::ensure!(
            args.xdiff_changed_percent > 0.0 && args.xdiff_changed_percent <= 100.0,
            "--xdiff-changed-percent must be in (0, 100], not {}",
            args.xdiff_changed_percent
        );
        let plan = xdiff::XdiffPlan {
            size: base.size,
            chunk: base.chunk,
            changed_per_10k: (args.xdiff_changed_percent * 100.0).round() as u64,
            rounds: base.rounds,
            sparse_origin: args.xdiff_origin == XdiffOrigin::Sparse,
        };
        let dir = WorkDir::create(&args.dir, args.keep)?;
        eprintln!("work directory {}", dir.path().display());
        let (agent, csnapctl) = binaries(&args)?;
        return xdiff::run(&plan, &dir, agent, csnapctl).await;
    }
    if args.cluster {
        let plan = cluster::ClusterPlan {
            size: base.size,
            chunk: base.chunk,
            rounds: base.rounds,
            ramp: base.ramp,
            runtime: base.runtime,
            cap: base.cap,
            iodepth: base.iodepth,
        };
        let dir = WorkDir::create(&args.dir, args.keep)?;
        eprintln!("work directory {}", dir.path().display());
        let (agent, csnapctl) = binaries(&args)?;
        return cluster::run(&plan, &dir, agent, csnapctl).await;
    }
    let directs: &[bool] = match (args.direct, args.cache) {
        (true, _) | (_, CacheMode::Direct) => &[true],
        (_, CacheMode::Page) => &[false],
        (_, CacheMode::Both) => &[true, false],
    };
    let transports: &[Transport] = match args.transport {
        TransportMode::Unix => &[Transport::Unix],
        TransportMode::Tcp => &[Transport::Tcp],
        TransportMode::Both => &[Transport::Unix, Transport::Tcp],
    };
    let mut ok = true;
    for &chunk in &args.chunk_size {
        for &direct in directs {
            for &transport in transports {
                let plan = Plan {
                    chunk,
                    direct,
                    transport,
                    ..base.clone()
                };
                eprintln!(
                    "=== {} KiB chunks, {} cache, {} ===",
                    chunk >> 10,
                    if direct { "direct" } else { "page" },
                    transport.label()
                );
                ok &= run_one(&args, &plan).await?;
                println!();
            }
        }
    }
    Ok(ok)
}

async fn run_memory(args: &Args, base: &Plan) -> anyhow::Result<bool> {
    let volume = args.memory_volume;
    anyhow::ensure!(
        volume >= 1 << 30 && volume.is_multiple_of(base.chunk),
        "--memory-volume must be at least 1 GiB and a multiple of the chunk size"
    );
    let plan = memory::MemoryPlan {
        volume,
        chunk: base.chunk,
        snapshots: args.memory_snapshots,
        connections: args.memory_connections,
        write_time: Duration::from_secs(args.runtime.unwrap_or(if args.quick { 5 } else { 30 })),
        read_time: Duration::from_secs(args.runtime.unwrap_or(if args.quick { 3 } else { 10 })),
        direct: args.cache != CacheMode::Page,
        goal_bytes: 128 << 20,
    };
    let dir = WorkDir::create(&args.dir, args.keep)?;
    eprintln!("work directory {}", dir.path().display());
    let (agent, csnapctl) = binaries(args)?;
    memory::run(&plan, &dir, agent, csnapctl).await
}

/// csnap-agent and csnapctl: from --bin-dir, else beside this program.
fn binaries(args: &Args) -> anyhow::Result<(PathBuf, PathBuf)> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .context("cannot find this program's path")?
            .parent()
            .context("this program's path has no directory")?
            .to_path_buf(),
    };
    let hint = "cargo build --release -p csnap-agent --bins";
    Ok((
        setup::require_binary(&bin_dir, "csnap-agent", hint)?,
        setup::require_binary(&bin_dir, "csnapctl", hint)?,
    ))
}

async fn run_one(args: &Args, plan: &Plan) -> anyhow::Result<bool> {
    let plan = plan.clone();
    let started = setup::now_utc();
    let load_before = setup::load_average();
    let dir = WorkDir::create(&args.dir, args.keep)?;
    eprintln!("work directory {}", dir.path().display());
    let setup = prepare(args, &plan, &dir).await?;
    let mut bench = Bench {
        servers: Servers {
            raw: None,
            csnap: None,
            qcow2: None,
        },
        setup,
        failures: Vec::new(),
    };
    for engine in Engine::ALL {
        if engine == Engine::Device {
            continue;
        }
        let server = engines::start_origin(&bench.setup, engine).await?;
        match engine {
            Engine::Device => {}
            Engine::Raw => bench.servers.raw = Some(server),
            Engine::Csnap => bench.servers.csnap = Some(server),
            Engine::Qcow2 => bench.servers.qcow2 = Some(server),
        }
    }

    let s = plan.size;
    let first_region = (0, s / 4);
    let second_region = (s / 4, s / 4);
    let n = plan.snapshots;
    let mut randread = Row::new("4K random read, origin", Goal::VsRaw(0.9));
    let mut unique = Row::new("64K random write, unique chunks", Goal::VsRaw(0.9));
    let mut first_touch_1 = Row::new("64K first-touch write, 1 snapshot", Goal::VsQcow2(1.0));
    let mut first_touch_n = Row::new(
        format!("64K first-touch write, {n} snapshots"),
        Goal::VsQcow2(1.0),
    );
    let mut seqread = Row::new("1M sequential read, snapshot s1", Goal::VsRaw(0.9));
    let mut copy = Row::new(
        "nbdcopy of snapshot s1 to a file (1M requests)",
        Goal::VsRaw(0.9),
    );

    eprintln!("[1/6] {}", randread.label);
    let job = plan.job("randread-4k", Access::RandRead, 4096, (0, s), plan.timed());
    bench
        .measure_all(&Work::Fio(job.clone()), plan.rounds, &mut randread)
        .await;

    // A failed step skips the tests that need it; the table still shows what was measured.
    let mut ready = bench
        .snapshots(1, 1)
        .await
        .map_err(|e| bench.failed("snapshot s1", e))
        .is_ok();
    eprintln!("[2/6] {}", first_touch_1.label);
    let job = plan.job(
        "firsttouch-1",
        Access::RandWrite,
        65536,
        first_region,
        plan.one_pass(),
    );
    if ready {
        bench
            .measure_all(&Work::FirstTouch(job.clone()), 1, &mut first_touch_1)
            .await;
    }

    eprintln!("[3/6] {}", unique.label);
    let job = plan.job(
        "randwrite-unique",
        Access::RandWrite,
        65536,
        first_region,
        plan.timed(),
    );
    if ready {
        bench
            .measure_all(&Work::Fio(job.clone()), plan.rounds, &mut unique)
            .await;
        ready = bench
            .snapshots(2, n)
            .await
            .map_err(|e| bench.failed("snapshots", e))
            .is_ok();
    }
    eprintln!("[4/6] {}", first_touch_n.label);
    let job = plan.job(
        &format!("firsttouch-{n}"),
        Access::RandWrite,
        65536,
        second_region,
        plan.one_pass(),
    );
    if ready {
        bench
            .measure_all(&Work::FirstTouch(job.clone()), 1, &mut first_touch_n)
            .await;
    }
    let csnap_status = engines::csnap_status(&bench.setup).await;

    eprintln!("[5/6] {}", seqread.label);
    if let Some(server) = bench.servers.qcow2.take() {
        server.stop().await;
    }
    if ready {
        match engines::start_qcow2_snapshot(&bench.setup, "s1").await {
            Ok(server) => bench.servers.qcow2 = Some(server),
            Err(e) => bench.failed("qemu-nbd on snapshot s1", e),
        }
        if let Some(csnap) = bench.servers.csnap.as_mut() {
            csnap.point_at(&format!("{}@s1", engines::VOLUME));
        }
    }
    let job = plan.job(
        "seqread-snapshot",
        Access::SeqRead,
        1 << 20,
        (0, s),
        plan.timed(),
    );
    if ready {
        bench
            .measure_all(&Work::Fio(job.clone()), plan.rounds, &mut seqread)
            .await;
    }
    eprintln!("[6/6] {}", copy.label);
    if ready {
        let work = Work::Copy {
            name: "nbdcopy-snapshot".to_string(),
            size: s,
        };
        bench.measure_all(&work, plan.rounds, &mut copy).await;
    }

    let rows = [
        randread,
        unique,
        first_touch_1,
        first_touch_n,
        seqread,
        copy,
    ];
    println!(
        "csnap NBD benchmark, {started}: {}",
        setup::describe_machine()
    );
    println!();
    println!(
        "origin {} MiB, chunk/cluster {} KiB, fio nbd engine over {} iodepth {} x {} job(s), \
         timed tests {} s after {} s ramp, median of {} round(s), first-touch tests one pass; \
         {}; load average {} before, {} after",
        plan.size >> 20,
        plan.chunk >> 10,
        match plan.transport {
            Transport::Unix => "unix sockets",
            Transport::Tcp => "TCP on 127.0.0.1",
        },
        plan.iodepth,
        plan.jobs,
        plan.runtime.as_secs(),
        plan.ramp.as_secs(),
        plan.rounds,
        if plan.direct {
            "O_DIRECT everywhere (qemu-nbd --cache=none, csnap-agent --direct-io, device: fio \
             libaio direct=1 on the raw file)"
        } else {
            "page cache everywhere (images on one file system, nothing dropped; sync before \
             each run; device: fio psync on the raw file, one request in flight per job)"
        },
        load_before,
        setup::load_average()
    );
    println!(
        "qemu-nbd {}; qcow2 image {}; csnap store file {}; csnap device I/O {}",
        args.qemu_aio.flag(),
        match args.qcow2_fill {
            Qcow2Fill::Convert => "made by qemu-img convert",
            Qcow2Fill::Client => "written by nbdcopy through qemu-nbd",
        },
        match args.csnap_store {
            StoreFile::Written => "written beforehand (as a block device)",
            StoreFile::Sparse => "sparse (allocated on first use)",
        },
        match std::env::var("CSNAP_IO_URING").as_deref() {
            Ok("0") => "on the blocking pool (CSNAP_IO_URING=0)",
            _ => "through io_uring where the kernel allows it",
        }
    );
    match csnap_status {
        Ok(status) => println!(
            "csnap after the first-touch tests: {}",
            describe_status(&status)
        ),
        Err(e) => println!("csnap status unavailable: {e:#}"),
    }
    println!();
    print!("{}", report::render(&rows));
    for failure in &bench.failures {
        println!("\nFAILED: {failure}");
    }
    Ok(bench.failures.is_empty())
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Current-thread runtime: every child is spawned from this (main) thread, which lives
    // as long as they do, so their parent-death signal fires only when we are gone.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nbd-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let interrupted = async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
                _ = hup.recv() => "SIGHUP",
            }
        };
        // Dropping the run stops every process it started (by PID) and removes the
        // directory.
        tokio::select! {
            outcome = run(args) => outcome,
            signal = interrupted => Err(anyhow::anyhow!("interrupted by {signal}; stopped every process")),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("nbd-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
