//! The cluster-mode rows (issue 11): csnap in cluster mode, its NBD client on another
//! namespace node than its metadata server, against csnap standalone on the same kind of
//! origin, side by side in one run.
//!
//! A 2-node corosync cluster in network namespaces (`csnap_e2e::rig`, real corosync, one
//! agent per node, direct I/O as cluster mode always uses) serves a filled origin. Node 1
//! has the higher priority and serves the metadata; fio reaches node 2's export (its
//! metadata questions cross the veth network to node 1) and node 1's export (client and
//! server on one node). A standalone `csnap-agent --direct-io` serves a copy of the same
//! origin. Every timed test runs on the three in turn, `rounds` times, and each engine's
//! median is printed with its ratio to standalone. Every process the run starts is
//! stopped by PID at the end (the rig's teardown removes the namespaces).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use cpg_glue::NodeId;
use csnap_e2e::rig::{Rig, RigConfig, VOLUME};

use crate::engines::{self, Server, Setup};
use crate::fio::{self, Access, FioJob, FioResult, Length};
use crate::procs::{self, Proc};
use crate::report::Engine;
use crate::setup::{self, WorkDir};

/// What the cluster rows run with.
#[derive(Clone, Debug)]
pub(crate) struct ClusterPlan {
    pub size: u64,
    pub chunk: u64,
    pub rounds: u32,
    pub ramp: Duration,
    pub runtime: Duration,
    pub cap: Duration,
    pub iodepth: u32,
}

/// Where fio sends its requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Standalone,
    /// Client on node 2, metadata server on node 1.
    Remote,
    /// Client and metadata server both on node 1.
    Local,
}

impl Target {
    const ALL: [Target; 3] = [Target::Standalone, Target::Remote, Target::Local];

    /// The quarter of the volume this target first-touches.
    fn index(self) -> u64 {
        match self {
            Target::Standalone => 0,
            Target::Remote => 1,
            Target::Local => 2,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Target::Standalone => "standalone",
            Target::Remote => "cluster, client on another node",
            Target::Local => "cluster, client on the server's node",
        }
    }
}

/// Runs the cluster rows and prints their table; `Ok(false)` if a measurement failed.
pub(crate) async fn run(
    plan: &ClusterPlan,
    dir: &WorkDir,
    agent: PathBuf,
    csnapctl: PathBuf,
) -> anyhow::Result<bool> {
    let started = setup::now_utc();
    let load_before = setup::load_average();
    let bin_dir = agent
        .parent()
        .context("the agent's path has no directory")?
        .to_path_buf();
    let mut rc = RigConfig::new(2, "kill_node", bin_dir);
    rc.origin_size = plan.size;
    rc.store_size = plan.size + (256 << 20);
    rc.chunk_size = plan.chunk;
    rc.log = "warn".into();
    let rig = Rig::start("nbd-bench cluster rows", rc)
        .await
        .context("the cluster needs root, corosync and ip netns (scripts/setup)")?;
    let (server, _) = rig
        .agreed_server(&[NodeId(1), NodeId(2)], Duration::from_secs(60))
        .await;
    anyhow::ensure!(
        server == NodeId(1),
        "node {} serves the metadata, expected node 1 (the higher priority)",
        server.0
    );
    // The cluster's origin is sparse; fill it like the standalone one, before any client
    // has read or written it (no snapshot exists, so no metadata refers to its contents).
    let origin = rig.cluster.dir().join("origin");
    let (path, size) = (origin.clone(), plan.size);
    tokio::task::spawn_blocking(move || setup::write_filled_file(&path, size, 1)).await??;

    let setup = Setup::csnap_only(dir.path(), agent, csnapctl.clone(), true);
    let (from, to) = (origin.clone(), setup.csnap_origin.clone());
    tokio::task::spawn_blocking(move || std::fs::copy(&from, &to))
        .await?
        .context("cannot copy the origin for the standalone agent")?;
    setup::create_sparse_file(&setup.csnap_store, plan.size + (256 << 20))?;
    engines::format_csnap(&setup, plan.chunk).await?;
    let standalone = engines::start_origin(&setup, Engine::Csnap).await?;

    let mut bench = ClusterBench {
        rig,
        standalone,
        setup,
        dir,
        failures: Vec::new(),
    };
    let s = plan.size;
    let timed = Length::Timed {
        ramp: plan.ramp,
        runtime: plan.runtime,
    };
    let job = |name: &str, access, bs, region: (u64, u64), run| FioJob {
        name: name.to_string(),
        access,
        block_size: bs,
        iodepth: plan.iodepth,
        jobs: 1,
        offset: region.0,
        length: region.1,
        run,
    };
    let mut rows = Vec::new();
    eprintln!("[cluster 1/3] 4K random read, origin");
    let read = |_| job("cl-randread-4k", Access::RandRead, 4096, (0, s), timed);
    rows.push((
        "4K random read, origin",
        bench.measure_all(read, plan.rounds).await,
    ));

    eprintln!("[cluster 2/3] 64K first-touch write, 1 snapshot");
    bench.snapshot("s1").await?;
    // Each target first-touches its own quarter of the volume once (the two cluster
    // targets share one origin and store, so they must not touch the same chunks).
    let region = |t: Target| (t.index() * s / 4, s / 4);
    let first_touch = Length::OnePass { cap: plan.cap };
    let mut first = Vec::new();
    for target in Target::ALL {
        let j = job(
            &format!("cl-firsttouch-{}", target.index()),
            Access::RandWrite,
            65536,
            region(target),
            first_touch,
        );
        first.push((target, bench.measure(&j, target).await));
    }
    rows.push((
        "64K first-touch write, 1 snapshot",
        first
            .into_iter()
            .filter_map(|(t, r)| bench.keep(t, r))
            .collect(),
    ));

    eprintln!("[cluster 3/3] 64K random write, unique chunks");
    // Each target's own quarter was just written in full: its chunks are now unique.
    let unique = |t: Target| {
        job(
            "cl-randwrite-unique",
            Access::RandWrite,
            65536,
            region(t),
            timed,
        )
    };
    rows.push((
        "64K random write, unique chunks",
        bench.measure_all(unique, plan.rounds).await,
    ));

    println!(
        "csnap cluster mode vs standalone, {started}: {}",
        setup::describe_machine()
    );
    println!();
    println!(
        "2-node corosync cluster in network namespaces (node 1 serves the metadata), origin \
         {} MiB (filled), {} KiB chunks, direct I/O everywhere, fio nbd engine over unix \
         sockets, iodepth {}, timed tests {} s after {} s ramp, median of {} round(s), \
         first-touch one pass over a separate quarter per target; load average {} before, \
         {} after",
        plan.size >> 20,
        plan.chunk >> 10,
        plan.iodepth,
        plan.runtime.as_secs(),
        plan.ramp.as_secs(),
        plan.rounds,
        load_before,
        setup::load_average()
    );
    println!();
    println!(
        "| test | standalone | cluster, client on another node | x standalone | cluster, \
         client on the server's node | x standalone |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (label, results) in &rows {
        let get = |t: Target| results.iter().find(|(x, _)| *x == t).map(|(_, r)| *r);
        let cell = |r: Option<FioResult>| {
            r.map_or("-".to_string(), |r| {
                format!(
                    "{:.0} IOPS, {} us/req",
                    r.iops,
                    r.cpu_us_per_request
                        .map_or("-".to_string(), |c| format!("{c:.0}"))
                )
            })
        };
        let ratio = |r: Option<FioResult>| match (r, get(Target::Standalone)) {
            (Some(r), Some(base)) if base.iops > 0.0 => format!("{:.2}", r.iops / base.iops),
            _ => "-".to_string(),
        };
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            cell(get(Target::Standalone)),
            cell(get(Target::Remote)),
            ratio(get(Target::Remote)),
            cell(get(Target::Local)),
            ratio(get(Target::Local)),
        );
    }
    println!();
    println!(
        "CPU per request: the serving agent's user + system time (standalone: its one \
         agent; cluster: both nodes' agents) over fio's requests. Goal (issue 11): unique \
         writes from another node at least 0.9x standalone."
    );
    for failure in &bench.failures {
        println!("\nFAILED: {failure}");
    }
    let ok = bench.failures.is_empty();
    bench.standalone.stop().await;
    drop(bench.rig);
    Ok(ok)
}

struct ClusterBench<'a> {
    rig: Rig,
    standalone: Server,
    setup: Setup,
    dir: &'a WorkDir,
    failures: Vec<String>,
}

impl ClusterBench<'_> {
    /// Each target's job in turn, `rounds` times; each target's median.
    async fn measure_all(
        &mut self,
        job: impl Fn(Target) -> FioJob,
        rounds: u32,
    ) -> Vec<(Target, FioResult)> {
        let mut runs: Vec<(Target, Vec<FioResult>)> =
            Target::ALL.iter().map(|&t| (t, Vec::new())).collect();
        for _ in 0..rounds {
            for (target, results) in runs.iter_mut() {
                let outcome = self.measure(&job(*target), *target).await;
                if let Some((_, r)) = self.keep(*target, outcome) {
                    results.push(r);
                }
            }
        }
        runs.into_iter()
            .filter_map(|(t, results)| fio::median(&results).map(|m| (t, m)))
            .collect()
    }

    fn keep(
        &mut self,
        target: Target,
        outcome: anyhow::Result<FioResult>,
    ) -> Option<(Target, FioResult)> {
        match outcome {
            Ok(r) => {
                eprintln!(
                    "  {:<38} {:>9.0} IOPS, CPU {} us/request, load {}",
                    target.label(),
                    r.iops,
                    r.cpu_us_per_request
                        .map_or("-".to_string(), |c| format!("{c:.1}")),
                    setup::load_average()
                );
                Some((target, r))
            }
            Err(e) => {
                eprintln!("  {} FAILED: {e:#}", target.label());
                self.failures.push(format!("{}: {e:#}", target.label()));
                None
            }
        }
    }

    /// One fio run against `target`; the CPU of the agents serving it is counted from the
    /// end of the ramp to fio's exit.
    async fn measure(&mut self, job: &FioJob, target: Target) -> anyhow::Result<FioResult> {
        let (uri, pids) = match target {
            Target::Standalone => {
                self.standalone.check_alive()?;
                (
                    self.standalone.uri().to_string(),
                    self.standalone.pid().into_iter().collect::<Vec<_>>(),
                )
            }
            Target::Remote | Target::Local => {
                let node = if target == Target::Remote {
                    NodeId(2)
                } else {
                    NodeId(1)
                };
                let pids: Vec<u32> = self.rig.agents.values().copied().collect();
                anyhow::ensure!(pids.len() == 2, "a cluster agent is gone");
                (self.rig.nbd_uri(node, VOLUME), pids)
            }
        };
        let stem = format!("{}-{:?}", job.name, target);
        let output = self.dir.join(&format!("{stem}.json"));
        let log = self.dir.join(&format!("{stem}.log"));
        let mut cmd = Command::new("fio");
        cmd.args(job.args(&uri, &output));
        tokio::task::spawn_blocking(nix::unistd::sync).await?;
        let ramp = match job.run {
            Length::Timed { ramp, .. } => ramp,
            Length::OnePass { .. } => Duration::ZERO,
        };
        let cpu = |pids: &[u32]| -> Option<Duration> {
            pids.iter()
                .map(|&p| procs::cpu_sample(p).map(|s| s.cpu))
                .sum::<Option<Duration>>()
        };
        let child = Proc::spawn("fio", cmd, &log)?;
        let mut first = None;
        let sampler = async {
            tokio::time::sleep(ramp).await;
            first = cpu(&pids);
            std::future::pending::<()>().await
        };
        let status = tokio::select! {
            status = child.wait(job.run.bound()) => status?,
            _ = sampler => anyhow::bail!("the CPU sampler stopped"),
        };
        let last = cpu(&pids);
        if !status.success() {
            anyhow::bail!(
                "fio failed ({status}): {}",
                procs::log_tail(&log, 20).trim()
            );
        }
        let text = std::fs::read_to_string(&output).unwrap_or_default();
        let mut result = fio::parse_result(&text, job.reads())?;
        if let (Some(a), Some(b)) = (first, last) {
            let used = b.saturating_sub(a);
            result.cpu_us_per_request = Some(used.as_secs_f64() * 1e6 / result.ios.max(1) as f64);
        }
        Ok(result)
    }

    /// Snapshot `name` on the standalone agent and on the cluster (from node 2).
    async fn snapshot(&mut self, name: &str) -> anyhow::Result<()> {
        engines::csnap_snapshot(&self.setup, name).await?;
        self.rig
            .ctl(NodeId(2), &["snapshot", "create", VOLUME, name])
            .await
            .map_err(|e| anyhow::anyhow!("cluster snapshot {name}: {e}"))?;
        Ok(())
    }
}
