//! The memory test (issue 11, item 4): the agent's resident memory with many snapshots, a
//! huge sparse volume and several NBD connections at once, against a fixed goal.
//!
//! One csnap-agent --standalone serves a sparse origin of `--memory-volume` bytes (1 TiB by
//! default). While fio writes 64 KiB blocks at random over the whole volume through
//! `connections` NBD connections (so copy-outs spread exception records over the whole
//! tree), csnapctl creates `snapshots` snapshots one after the other. Then `connections`
//! fio readers, one per export (the origin and snapshots spread over the range of names),
//! read 4 KiB blocks at random across the whole volume at once. The agent's VmRSS is
//! sampled every 100 ms throughout, and VmHWM (the kernel's own peak) is read at the end.
//! The server runs inside the agent in standalone mode, so the agent's figures include it.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::engines::{self, Setup, VOLUME};
use crate::fio::{Access, FioJob, Length};
use crate::procs::{self, Proc};
use crate::report::Engine;
use crate::setup::{self, WorkDir};

/// What the memory test runs with.
#[derive(Clone, Debug)]
pub(crate) struct MemoryPlan {
    pub volume: u64,
    pub chunk: u64,
    pub snapshots: u32,
    pub connections: u32,
    pub write_time: Duration,
    pub read_time: Duration,
    pub direct: bool,
    pub goal_bytes: u64,
}

/// One line of the table: the agent's memory at the end of a phase.
struct Phase {
    label: String,
    rss: u64,
    peak_sampled: u64,
    /// What the clients did meanwhile (fio's IOPS), to show the load was real.
    load: String,
}

/// Runs the memory test and prints its table; `Ok(false)` when a step failed (not when
/// the goal is missed, which the table says).
pub(crate) async fn run(
    plan: &MemoryPlan,
    dir: &WorkDir,
    agent: std::path::PathBuf,
    csnapctl: std::path::PathBuf,
) -> anyhow::Result<bool> {
    let started = setup::now_utc();
    let load_before = setup::load_average();
    let setup = Setup::csnap_only(dir.path(), agent, csnapctl, plan.direct);
    setup::create_sparse_file(&setup.csnap_origin, plan.volume)?;
    // Every write may copy out a chunk: room for all of them plus metadata, sparse.
    setup::create_sparse_file(&setup.csnap_store, (plan.volume / 16).max(8 << 30))?;
    engines::format_csnap(&setup, plan.chunk).await?;

    let mut server = engines::start_origin(&setup, Engine::Csnap).await?;
    let pid = server
        .pid()
        .context("the csnap agent has no PID right after it started")?;
    let mut phases = Vec::new();
    let mut peak = 0u64;
    let record = |label: String, peak_sampled: u64, load: String| -> anyhow::Result<Phase> {
        let m = procs::memory_sample(pid).context("cannot read the agent's /proc status")?;
        Ok(Phase {
            label,
            rss: m.rss,
            peak_sampled,
            load,
        })
    };
    phases.push(record(
        "serving, no snapshot, no client".into(),
        0,
        "-".into(),
    )?);

    // Phase 1: writers over the whole volume while the snapshots are created.
    eprintln!(
        "memory: {} snapshots while {} connections write 64 KiB blocks at random over {} GiB",
        plan.snapshots,
        plan.connections,
        plan.volume >> 30
    );
    let writers = FioJob {
        name: "memory-writes".into(),
        access: Access::RandWrite,
        block_size: 65536,
        iodepth: 16,
        jobs: plan.connections,
        offset: 0,
        length: plan.volume,
        run: Length::Timed {
            ramp: Duration::ZERO,
            runtime: plan.write_time,
        },
    };
    let output = dir.join("memory-writes.json");
    let mut fio = Command::new("fio");
    fio.args(writers.args(server.uri(), &output));
    let writer = Proc::spawn("fio writers", fio, &dir.join("memory-writes.log"))?;
    let snapshots = async {
        for k in 1..=plan.snapshots {
            engines::csnap_snapshot(&setup, &format!("m{k}")).await?;
            if k % 100 == 0 {
                eprintln!("  {k} snapshots");
            }
        }
        anyhow::Ok(())
    };
    let (made, writes, sampled) = sample_while(pid, async {
        let made = snapshots.await;
        let writes = writer.wait(writers.run.bound()).await;
        (made, writes)
    })
    .await
    .map(|((m, w), s)| (m, w, s))?;
    made.context("creating the snapshots")?;
    let status = writes.context("fio writers")?;
    if !status.success() {
        bail!(
            "the fio writers failed ({status}); see {}",
            dir.join("memory-writes.log").display()
        );
    }
    peak = peak.max(sampled);
    let written = fio_iops(&output, false)?;
    phases.push(record(
        format!(
            "{} snapshots made under {} writing connections",
            plan.snapshots, plan.connections
        ),
        sampled,
        format!("{written:.0} write IOPS"),
    )?);

    // Phase 2: one reader per export, all at once.
    let exports = reader_exports(plan.snapshots, plan.connections);
    eprintln!(
        "memory: {} readers at once on {}",
        exports.len(),
        exports.join(", ")
    );
    let mut readers = Vec::new();
    for (i, export) in exports.iter().enumerate() {
        server.point_at(export);
        let job = FioJob {
            name: format!("memory-read-{i}"),
            access: Access::RandRead,
            block_size: 4096,
            iodepth: 16,
            jobs: 1,
            offset: 0,
            length: plan.volume,
            run: Length::Timed {
                ramp: Duration::ZERO,
                runtime: plan.read_time,
            },
        };
        let mut fio = Command::new("fio");
        fio.args(job.args(server.uri(), &dir.join(&format!("memory-read-{i}.json"))));
        let proc = Proc::spawn(
            &format!("fio reader {i}"),
            fio,
            &dir.join(&format!("memory-read-{i}.log")),
        )?;
        readers.push((proc, job.run.bound()));
    }
    let (statuses, sampled) = sample_while(pid, async {
        let mut statuses = Vec::new();
        for (proc, bound) in readers {
            statuses.push(proc.wait(bound).await);
        }
        statuses
    })
    .await?;
    for (i, status) in statuses.into_iter().enumerate() {
        let status = status.with_context(|| format!("fio reader {i}"))?;
        if !status.success() {
            bail!(
                "fio reader {i} failed ({status}); see {}",
                dir.join(&format!("memory-read-{i}.log")).display()
            );
        }
    }
    peak = peak.max(sampled);
    let mut read = 0.0;
    for i in 0..exports.len() {
        read += fio_iops(&dir.join(&format!("memory-read-{i}.json")), true)?;
    }
    phases.push(record(
        format!(
            "{} readers on {} exports at once",
            exports.len(),
            exports.len()
        ),
        sampled,
        format!("{read:.0} read IOPS"),
    )?);
    let hwm = procs::memory_sample(pid)
        .context("cannot read the agent's /proc status")?
        .hwm;
    server.check_alive()?;
    let status = engines::csnap_status(&setup).await;
    server.stop().await;

    println!(
        "csnap agent memory, {started}: {}",
        setup::describe_machine()
    );
    println!();
    println!(
        "sparse origin {} GiB, {} KiB chunks, {} snapshots, {} NBD connections (fio nbd \
         engine, iodepth 16 each) writing 64 KiB blocks for {} s, then {} readers of 4 KiB \
         blocks for {} s; {}; load average {} before, {} after",
        plan.volume >> 30,
        plan.chunk >> 10,
        plan.snapshots,
        plan.connections,
        plan.write_time.as_secs(),
        plan.connections,
        plan.read_time.as_secs(),
        if plan.direct {
            "csnap-agent --direct-io"
        } else {
            "page cache"
        },
        load_before,
        setup::load_average()
    );
    match status {
        Ok(s) => println!(
            "csnap at the end: snapshots {}, store chunks used {}",
            s.pointer("/volumes/0/server_status/snapshots")
                .map_or("?".into(), |x| x.to_string()),
            match (
                s.pointer("/volumes/0/server_status/store_chunks")
                    .and_then(|x| x.as_u64()),
                s.pointer("/volumes/0/server_status/free_chunks")
                    .and_then(|x| x.as_u64()),
            ) {
                (Some(total), Some(free)) => total.saturating_sub(free).to_string(),
                _ => "?".into(),
            }
        ),
        Err(e) => println!("csnap status unavailable: {e:#}"),
    }
    println!();
    println!("| phase | clients' load | agent RSS at the end (MiB) | highest sampled RSS (MiB) |");
    println!("|---|---:|---:|---:|");
    for p in &phases {
        println!(
            "| {} | {} | {:.1} | {} |",
            p.label,
            p.load,
            mib(p.rss),
            if p.peak_sampled == 0 {
                "-".to_string()
            } else {
                format!("{:.1}", mib(p.peak_sampled))
            }
        );
    }
    let worst = hwm.max(peak);
    println!();
    println!(
        "Peak resident memory (VmHWM) {:.1} MiB; goal under {:.0} MiB: {}",
        mib(worst),
        mib(plan.goal_bytes),
        if worst < plan.goal_bytes {
            "met"
        } else {
            "MISSED"
        }
    );
    Ok(true)
}

/// The IOPS fio reported in its JSON output file.
fn fio_iops(output: &std::path::Path, reads: bool) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(output)
        .with_context(|| format!("cannot read fio's output {}", output.display()))?;
    Ok(crate::fio::parse_result(&text, reads)?.iops)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// The exports the readers use: the origin, then snapshots spread evenly over m1..mN.
fn reader_exports(snapshots: u32, connections: u32) -> Vec<String> {
    let mut exports = vec![VOLUME.to_string()];
    let others = connections.saturating_sub(1);
    for i in 0..others {
        let k = 1 + u64::from(i) * u64::from(snapshots.saturating_sub(1))
            / u64::from(others.saturating_sub(1).max(1));
        exports.push(format!("{VOLUME}@m{k}"));
    }
    exports
}

/// Runs `work`, sampling `pid`'s RSS every 100 ms; returns its output and the highest RSS
/// seen. Fails if the process disappears meanwhile.
async fn sample_while<T>(
    pid: u32,
    work: impl std::future::Future<Output = T>,
) -> anyhow::Result<(T, u64)> {
    let mut highest = 0u64;
    let started = Instant::now();
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            out = &mut work => return Ok((out, highest)),
            _ = tick.tick() => {
                let m = procs::memory_sample(pid).with_context(|| {
                    format!("the agent (pid {pid}) vanished after {:?}", started.elapsed())
                })?;
                highest = highest.max(m.rss);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_cover_the_origin_and_spread_snapshots() {
        assert_eq!(
            reader_exports(1000, 8),
            [
                "vol",
                "vol@m1",
                "vol@m167",
                "vol@m334",
                "vol@m500",
                "vol@m667",
                "vol@m833",
                "vol@m1000"
            ]
        );
        assert_eq!(reader_exports(1, 2), ["vol", "vol@m1"]);
        assert_eq!(reader_exports(5, 1), ["vol"]);
    }
}
