//! The failover gather alone, at sizes no namespace cluster reaches: N real
//! `VolumeMembership` machines over cpg-glue's in-memory cluster, driven single-threaded
//! in sweeps (each member handles every event it has, then its multicasts go out), with a
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
    /// Synchronous rounds from the kill to the activation in which something happened
    /// (each member handles all that was delivered to it, then every multicast of the
    /// round goes out): the number of message latencies on the failover's critical path.
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

/// Handles everything `a` has pending; returns the multicasts it asked for (the caller
/// sends them at the end of the round) and whether anything happened. With `coalesce`, a
/// multicast asked before a later membership event of the same drain is dropped, as if
/// that view change had cut it (what cpg-glue does to a frame sent in a view its receivers
/// left; the machine never depends on one message): this keeps the join storm of the
/// setup from costing N^3 deliveries.
fn drain(a: &mut Agent, now: u64, coalesce: bool, c: &mut Counts) -> (Vec<Vec<u8>>, bool) {
    let mut busy = false;
    let mut outbox: Vec<Vec<u8>> = Vec::new();
    loop {
        let input = match a.quorum.next().now_or_never() {
            Some(Some(Ok(q))) => Some(Input::Quorum(q)),
            _ => match a.group.next().now_or_never() {
                Some(Some(Ok(e))) => {
                    match &e {
                        GroupEvent::Deliver(_) => c.deliveries += 1,
                        GroupEvent::ConfChg(_) | GroupEvent::TotemConfChg(_) => {
                            if coalesce {
                                outbox.clear();
                            }
                        }
                    }
                    Some(Input::Group(e))
                }
                _ => None,
            },
        };
        let Some(input) = input else { break };
        busy = true;
        a.machine.handle(input);
        a.machine.handle(Input::Tick { now_ms: now });
        busy |= outputs(a, &mut outbox, c);
    }
    a.machine.handle(Input::Tick { now_ms: now });
    busy |= outputs(a, &mut outbox, c);
    (outbox, busy)
}

/// Carries out `a`'s outputs (multicasts go to `outbox`).
fn outputs(a: &mut Agent, outbox: &mut Vec<Vec<u8>>, c: &mut Counts) -> bool {
    let mut busy = false;
    while let Some(out) = a.machine.poll_output() {
        busy = true;
        match out {
            Output::Mcast(bytes) => outbox.push(bytes),
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
    busy
}

/// One synchronous round: every live agent handles what was delivered to it by the end of
/// the previous round, then all their multicasts go out together. Returns whether
/// anything happened.
fn round(
    agents: &mut [Agent],
    cluster: &MemoryCluster,
    now: u64,
    coalesce: bool,
    c: &mut Counts,
) -> bool {
    let mut busy = false;
    let mut sends = Vec::new();
    for a in agents.iter_mut().filter(|a| cluster.is_up(a.id)) {
        let (outbox, b) = drain(a, now, coalesce, c);
        busy |= b;
        if !outbox.is_empty() {
            sends.push((a.group.sender(), outbox));
        }
    }
    for (sender, outbox) in sends {
        for bytes in outbox {
            c.messages += 1;
            let _ = sender.mcast(bytes).now_or_never();
        }
    }
    busy
}

/// Rounds until an activation; a round in which nothing happened advances the clock to
/// the machines' next timeout. Returns the rounds in which something happened.
fn run_until(
    agents: &mut [Agent],
    cluster: &MemoryCluster,
    now: &mut u64,
    coalesce: bool,
    c: &mut Counts,
    limit: u64,
) -> Result<u64, String> {
    let mut rounds = 0;
    for _ in 0..limit {
        if !c.activations.is_empty() {
            return Ok(rounds);
        }
        if round(agents, cluster, *now, coalesce, c) {
            rounds += 1;
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

/// Rounds until nothing is pending anywhere (bounded).
fn settle(agents: &mut [Agent], cluster: &MemoryCluster, now: &mut u64, c: &mut Counts) {
    for _ in 0..1000 {
        if !round(agents, cluster, *now, true, c) {
            return;
        }
        *now += 1;
    }
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
    let mut setup = Counts::default();
    run_until(&mut agents, &cluster, &mut now, true, &mut setup, 100_000)?;
    let first = setup.activations[0].0;
    // Every member has a snapshot client (a read lock the next server must wait for).
    for a in &mut agents {
        a.machine.handle(Input::Clients(vec![ClientId::new(
            u64::from(a.id.0),
            ClientKind::Snapshot {
                snap: csnap_proto::SnapId(1),
            },
        )]));
    }
    settle(&mut agents, &cluster, &mut now, &mut setup);
    cluster.kill_node(first).map_err(|e| e.to_string())?;
    let mut c = Counts::default();
    let started = Instant::now();
    let rounds = run_until(&mut agents, &cluster, &mut now, false, &mut c, 100_000)?;
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
