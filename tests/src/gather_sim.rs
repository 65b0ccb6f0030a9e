//! The failover gather alone, at sizes no namespace cluster reaches: N real
//! `VolumeMembership` machines over cpg-glue's in-memory cluster, driven single-threaded
//! in rounds (each member handles every event it has, then its outputs go out), with a
//! virtual clock that jumps over quiet waits. A first server is started, every member gets
//! one snapshot client, the server's node is killed, and the rounds, multicasts and
//! deliveries until the next activation are counted (fencing confirms at once, as with a
//! power switch that answers).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cpg_glue::memory::{MemoryCluster, MemoryGroup, MemoryQuorum};
use cpg_glue::{Group as _, GroupEvent, GroupSender as _, NodeId};
use csnap_agent::cluster::{Input, MembershipConfig, Output, VolumeMembership};
use csnap_agent::config::Fencing;
use csnap_proto::{ClientId, ClientKind};
use futures::{FutureExt as _, StreamExt as _};

/// What the failover cost in the simulation.
#[derive(Debug, Clone)]
pub struct GatherResult {
    /// Rounds in which something was delivered, from the kill to the activation.
    pub rounds: u64,
    /// Multicasts sent in that time.
    pub messages: u64,
    /// Group messages delivered (all members together).
    pub deliveries: u64,
    /// Snapshot clients in the activation.
    pub clients: usize,
    /// Real time the simulation took for the failover.
    pub wall: Duration,
}

struct Agent {
    id: NodeId,
    group: MemoryGroup,
    quorum: MemoryQuorum,
    machine: VolumeMembership,
}

#[derive(Default)]
struct Counts {
    messages: u64,
    deliveries: u64,
    /// (node, clients) of every activation.
    activations: Vec<(NodeId, usize)>,
}

/// One round: every live agent handles what it has and sends what it must. Returns
/// whether anything happened.
fn round(agents: &mut [Agent], alive: &dyn Fn(NodeId) -> bool, now: u64, c: &mut Counts) -> bool {
    let mut busy = false;
    for a in agents.iter_mut().filter(|a| alive(a.id)) {
        while let Some(Some(Ok(q))) = a.quorum.next().now_or_never() {
            a.machine.handle(Input::Quorum(q));
            busy = true;
        }
        while let Some(Some(Ok(e))) = a.group.next().now_or_never() {
            if matches!(e, GroupEvent::Deliver(_)) {
                c.deliveries += 1;
            }
            a.machine.handle(Input::Group(e));
            busy = true;
        }
        a.machine.handle(Input::Tick { now_ms: now });
        let sender = a.group.sender();
        while let Some(out) = a.machine.poll_output() {
            busy = true;
            match out {
                Output::Mcast(bytes) => {
                    c.messages += 1;
                    let _ = sender.mcast(bytes).now_or_never();
                }
                Output::StartServer { .. } => a.machine.handle(Input::ServerStarted),
                Output::StopServer { .. } => a.machine.handle(Input::ServerStopped),
                Output::ActivateServer { clients, .. } => c.activations.push((a.id, clients.len())),
                Output::Fence { node, .. } => a.machine.handle(Input::FenceResult {
                    node,
                    ok: true,
                    detail: "confirmed".into(),
                }),
                _ => {}
            }
        }
    }
    busy
}

/// Runs rounds until `done` or `limit` rounds; quiet rounds advance the clock to the
/// machines' next timeout. Returns the busy rounds.
fn run_until(
    agents: &mut [Agent],
    cluster: &MemoryCluster,
    now: &mut u64,
    c: &mut Counts,
    done: &dyn Fn(&Counts) -> bool,
    limit: u64,
) -> Result<u64, String> {
    let mut busy_rounds = 0;
    for _ in 0..limit {
        if done(c) {
            return Ok(busy_rounds);
        }
        let alive = |n: NodeId| cluster.is_up(n);
        if round(agents, &alive, *now, c) {
            busy_rounds += 1;
            *now += 1;
        } else {
            let next = agents
                .iter()
                .filter(|a| cluster.is_up(a.id))
                .filter_map(|a| a.machine.poll_timeout())
                .filter(|t| *t > *now)
                .min();
            *now = next.unwrap_or(*now + 1000);
        }
    }
    Err(format!("no activation within {limit} rounds"))
}

/// The failover of an `n`-member group (see the module doc).
pub fn gather(n: u32) -> Result<GatherResult, String> {
    let cluster = MemoryCluster::with_nodes(n).map_err(|e| e.to_string())?;
    let mut priorities = BTreeMap::new();
    priorities.insert(NodeId(1), 10);
    let mut agents = Vec::new();
    for id in cluster.nodes() {
        let group = cluster.join(id, "csnap:vol").map_err(|e| e.to_string())?;
        let quorum = cluster.quorum(id).map_err(|e| e.to_string())?;
        let cfg = MembershipConfig {
            priorities: priorities.clone(),
            fencing: Fencing::Command("/bin/true".into()),
            server_address: format!("10.0.0.{}:7788", id.0),
            serving_lease_ms: 8_000,
            lease_margin_ms: 2_000,
            origin_lease_ms: 10_000,
            fence_timeout_ms: 60_000,
            fence_retry_ms: 5_000,
        };
        let machine = VolumeMembership::new(cfg, group.local());
        agents.push(Agent {
            id,
            group,
            quorum,
            machine,
        });
    }
    let mut now = 1_000u64;
    let mut counts = Counts::default();
    let limit = 100_000;
    run_until(
        &mut agents,
        &cluster,
        &mut now,
        &mut counts,
        &|c| !c.activations.is_empty(),
        limit,
    )?;
    let first = counts.activations[0].0;
    // Every member has a snapshot client (a read lock the next server must wait for).
    for a in &mut agents {
        a.machine.handle(Input::Clients(vec![ClientId::new(
            u64::from(a.id.0),
            ClientKind::Snapshot {
                snap: csnap_proto::SnapId(1),
            },
        )]));
    }
    // Let the client lists and heartbeats settle.
    for _ in 0..50 {
        let alive = |n: NodeId| cluster.is_up(n);
        round(&mut agents, &alive, now, &mut counts);
        now += 10;
    }
    cluster.kill_node(first).map_err(|e| e.to_string())?;
    let mut c = Counts::default();
    let started = Instant::now();
    let rounds = run_until(
        &mut agents,
        &cluster,
        &mut now,
        &mut c,
        &|c| !c.activations.is_empty(),
        limit,
    )?;
    let wall = started.elapsed();
    let (node, clients) = c.activations[0];
    if node == first {
        return Err("the killed node activated again".into());
    }
    Ok(GatherResult {
        rounds,
        messages: c.messages,
        deliveries: c.deliveries,
        clients,
        wall,
    })
}
