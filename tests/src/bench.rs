//! The CPG benchmark, generic over [`TestCluster`] so the real corosync cluster and the
//! in-memory one are measured by the same code (see the `cpg-bench` binary).
//!
//! * Latency: one member multicasts a small message and waits for its own agreed-order
//!   delivery, one message at a time (the others keep reading their streams meanwhile).
//! * Throughput: every member multicasts `count` messages of one size at once; the time
//!   runs until every member has received all `members x count` of them.

use std::time::{Duration, Instant};

use cpg_glue::testkit::TestCluster;
use cpg_glue::{Group, GroupEvent, GroupSender, Member, NodeId};
use futures::StreamExt;
use tokio::time::timeout_at;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// Round trips measured (after `warmup` unmeasured ones).
    pub latency_samples: usize,
    pub warmup: usize,
    /// Payload of a latency probe.
    pub latency_payload: usize,
    /// Throughput payload sizes, and per size how many messages each member sends.
    pub throughput: Vec<(usize, usize)>,
    /// Bound for each phase.
    pub phase_timeout: Duration,
}

/// Round-trip latency figures.
#[derive(Debug, Clone)]
pub struct Latency {
    pub samples: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// One throughput run.
#[derive(Debug, Clone)]
pub struct Throughput {
    pub payload: usize,
    /// Messages every member received.
    pub messages: usize,
    pub elapsed: Duration,
}

impl Throughput {
    pub fn messages_per_sec(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    pub fn megabytes_per_sec(&self) -> f64 {
        (self.messages * self.payload) as f64 / self.elapsed.as_secs_f64() / 1e6
    }
}

#[derive(Debug, Clone)]
pub struct BenchResult {
    pub members: usize,
    pub latency: Latency,
    pub throughput: Vec<Throughput>,
}

struct Proc<G> {
    group: G,
    local: Member,
}

/// Runs `plan` on `cluster` in group `name`, one process per node.
pub async fn run<C: TestCluster>(
    cluster: &C,
    name: &str,
    plan: &BenchPlan,
) -> Result<BenchResult, String> {
    let mut procs = join_all(cluster, name).await?;
    let members = procs.len();
    let latency = measure_latency(&mut procs, plan).await?;
    let mut throughput = Vec::new();
    for &(payload, count) in &plan.throughput {
        let (back, result) = measure_throughput(procs, payload, count, plan.phase_timeout).await?;
        procs = back;
        throughput.push(result);
    }
    for p in procs {
        let local = p.local;
        tokio::time::timeout(plan.phase_timeout, p.group.leave())
            .await
            .map_err(|_| format!("{local}: leave did not finish"))?
            .map_err(|e| format!("{local}: leave failed: {e}"))?;
    }
    Ok(BenchResult {
        members,
        latency,
        throughput,
    })
}

/// Joins one process per node and waits until each sees all of them and a totem confchg.
async fn join_all<C: TestCluster>(cluster: &C, name: &str) -> Result<Vec<Proc<C::G>>, String> {
    let nodes: Vec<NodeId> = cluster.nodes();
    let deadline = tokio::time::Instant::now() + cluster.settle();
    let mut procs = Vec::new();
    for &node in &nodes {
        let group = timeout_at(deadline, cluster.join(node, name))
            .await
            .map_err(|_| format!("node {node}: join did not finish"))?
            .map_err(|e| format!("node {node}: join failed: {e}"))?;
        let local = group.local();
        procs.push(Proc { group, local });
    }
    for p in &mut procs {
        let (mut full_view, mut totem) = (false, false);
        while !(full_view && totem) {
            match timeout_at(deadline, p.group.next()).await {
                Ok(Some(Ok(GroupEvent::ConfChg(c)))) => full_view = c.members.len() == nodes.len(),
                Ok(Some(Ok(GroupEvent::TotemConfChg(_)))) => totem = true,
                Ok(Some(Ok(GroupEvent::Deliver(_)))) => {}
                Ok(Some(Err(e))) => return Err(format!("{}: {e}", p.local)),
                Ok(None) => return Err(format!("{}: stream ended while joining", p.local)),
                Err(_) => {
                    return Err(format!(
                        "{}: never saw all {} members",
                        p.local,
                        nodes.len()
                    ))
                }
            }
        }
    }
    Ok(procs)
}

/// Reads `group` (so corosync never blocks on an unread client) until `expected`
/// deliveries have arrived: every probe of the latency phase, so none is left over.
async fn drain<G: Group>(
    mut group: G,
    expected: usize,
    deadline: tokio::time::Instant,
) -> Result<G, String> {
    let mut seen = 0;
    while seen < expected {
        match timeout_at(deadline, group.next()).await {
            Ok(Some(Ok(GroupEvent::Deliver(_)))) => seen += 1,
            Ok(Some(Ok(other))) => {
                return Err(format!("{}: membership changed: {other:?}", group.local()))
            }
            Ok(Some(Err(e))) => return Err(format!("{}: {e}", group.local())),
            Ok(None) => return Err(format!("{}: stream ended", group.local())),
            Err(_) => {
                return Err(format!(
                    "{}: {seen} of {expected} probes seen in time",
                    group.local()
                ))
            }
        }
    }
    Ok(group)
}

async fn measure_latency<G: Group>(
    procs: &mut Vec<Proc<G>>,
    plan: &BenchPlan,
) -> Result<Latency, String> {
    let mut prober = procs.remove(0);
    let deadline = tokio::time::Instant::now() + plan.phase_timeout;
    let probes = plan.warmup + plan.latency_samples;
    let drains: Vec<_> = procs
        .drain(..)
        .map(|p| (p.local, tokio::spawn(drain(p.group, probes, deadline))))
        .collect();
    let sender = prober.group.sender();
    let mut samples = Vec::with_capacity(plan.latency_samples);
    let probe_len = plan.latency_payload.max(8);
    let mut failure = None;
    for i in 0..probes as u64 {
        let mut payload = vec![0u8; probe_len];
        payload[..8].copy_from_slice(&i.to_be_bytes());
        let started = Instant::now();
        match timeout_at(deadline, sender.mcast(payload.clone())).await {
            Ok(Ok(_receipt)) => {}
            Ok(Err(e)) => {
                failure = Some(format!("{}: mcast failed: {e}", prober.local));
                break;
            }
            Err(_) => {
                failure = Some(format!("{}: latency phase ran out of time", prober.local));
                break;
            }
        }
        let delivered = loop {
            match timeout_at(deadline, prober.group.next()).await {
                Ok(Some(Ok(GroupEvent::Deliver(d)))) if d.from == prober.local => {
                    break d.payload == payload;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => {
                    failure = Some(format!("{}: {e}", prober.local));
                    break false;
                }
                Ok(None) | Err(_) => {
                    failure = Some(format!("{}: own message not delivered", prober.local));
                    break false;
                }
            }
        };
        if !delivered {
            failure.get_or_insert_with(|| format!("{}: own messages out of order", prober.local));
            break;
        }
        if i >= plan.warmup as u64 {
            samples.push(started.elapsed());
        }
    }
    procs.push(prober);
    if let Some(failure) = failure {
        // The drains would wait for probes that never come.
        for (_, task) in &drains {
            task.abort();
        }
        return Err(failure);
    }
    for (local, task) in drains {
        let group = task
            .await
            .map_err(|e| format!("{local}: drain task failed: {e}"))??;
        procs.push(Proc { group, local });
    }
    samples.sort();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok(Latency {
        samples: samples.len(),
        p50: pick(0.50),
        p99: pick(0.99),
        max: pick(1.0),
    })
}

async fn measure_throughput<G: Group>(
    procs: Vec<Proc<G>>,
    payload: usize,
    count: usize,
    phase_timeout: Duration,
) -> Result<(Vec<Proc<G>>, Throughput), String> {
    let total = procs.len() * count;
    let deadline = tokio::time::Instant::now() + phase_timeout;
    let senders: Vec<_> = procs.iter().map(|p| (p.local, p.group.sender())).collect();
    let started = Instant::now();
    let readers: Vec<_> = procs
        .into_iter()
        .map(|mut p| {
            tokio::spawn(async move {
                let mut received = 0;
                while received < total {
                    match timeout_at(deadline, p.group.next()).await {
                        Ok(Some(Ok(GroupEvent::Deliver(d)))) if d.payload.len() == payload => {
                            received += 1
                        }
                        Ok(Some(Ok(GroupEvent::Deliver(d)))) => {
                            return Err(format!(
                                "{}: a {}-byte delivery in the {payload}-byte run",
                                p.local,
                                d.payload.len()
                            ))
                        }
                        Ok(Some(Ok(other))) => {
                            return Err(format!("{}: membership changed: {other:?}", p.local))
                        }
                        Ok(Some(Err(e))) => return Err(format!("{}: {e}", p.local)),
                        Ok(None) => return Err(format!("{}: stream ended", p.local)),
                        Err(_) => {
                            return Err(format!(
                                "{}: {received} of {total} {payload}-byte messages in {phase_timeout:?}",
                                p.local
                            ))
                        }
                    }
                }
                Ok((p, Instant::now()))
            })
        })
        .collect();
    let sending: Vec<_> = senders
        .into_iter()
        .map(|(local, sender)| {
            tokio::spawn(async move {
                let message = vec![0x5a; payload];
                for i in 0..count {
                    match timeout_at(deadline, sender.mcast(message.clone())).await {
                        Ok(Ok(_receipt)) => {}
                        Ok(Err(e)) => return Err(format!("{local}: mcast {i} failed: {e}")),
                        Err(_) => return Err(format!("{local}: mcast {i} not done in time")),
                    }
                }
                Ok(())
            })
        })
        .collect();
    let mut failures = Vec::new();
    for task in sending {
        if let Err(e) = task.await.map_err(|e| e.to_string()).and_then(|r| r) {
            failures.push(e);
        }
    }
    let mut back = Vec::new();
    let mut finished = started;
    for task in readers {
        match task.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok((p, at)) => {
                finished = finished.max(at);
                back.push(p);
            }
            Err(e) => failures.push(e),
        }
    }
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    Ok((
        back,
        Throughput {
            payload,
            messages: total,
            elapsed: finished - started,
        },
    ))
}
