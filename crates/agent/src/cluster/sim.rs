//! A deterministic, single-threaded simulation of N membership machines over cpg-glue's
//! in-memory cluster (the same virtual-synchrony model the behavioural suite checks against
//! real corosync), with faults and checkers. Group and quorum streams are polled with
//! `now_or_never`: the in-memory cluster applies every operation at once, so nothing ever
//! waits and each run is a pure function of its seed.
//!
//! Checkers (run after every step):
//! * at most one node has an active server process (from `StartServer` until the stop is
//!   confirmed, the process crashes, its node is powered off, or the serving lease its
//!   agent gave it ran out: the server enforces that lease itself), across all partitions;
//! * a machine that was told its partition lost quorum has no serving server;
//! * an activation lists every snapshot client of every member that was in the view from
//!   the start of the gather to its end;
//! * no two live members of one partition fence the same node for one incident;
//! * a node that holds itself stale has no server granting anything (a stale node writes
//!   nothing before it is fenced or reset: its server stops the moment it learns);
//! * a fencing job is let go without a confirmation (`fence_unneeded`) only when the node's
//!   server certainly grants nothing (off, stopped, or its lease ran out);
//! * at the end (healed, quiet, fencing working): one server, every member agrees on it,
//!   no stale node left.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use futures::{FutureExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use cpg_glue::memory::{MemoryCluster, MemoryGroup, MemoryQuorum, MemorySender};
use cpg_glue::{Group, GroupSender, NodeId};
use csnap_proto::msg::{ClientId, ClientKind};

use super::state::Role;
use super::{Input, MembershipConfig, Output, VolumeMembership};
use crate::config::Fencing;

const GROUP: &str = "csnap:vol";

type ClientsByNode = BTreeMap<NodeId, BTreeSet<ClientId>>;

/// The server process of a node, as the checker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proc {
    Off,
    /// Started (may write the store), not yet ready.
    Starting,
    Ready,
    /// Told to stop; still counts until the stop is confirmed.
    Stopping,
}

struct Agent {
    machine: VolumeMembership,
    group: MemoryGroup,
    sender: MemorySender,
    quorum: MemoryQuorum,
    incarnation: u64,
}

struct Node {
    id: NodeId,
    agent: Option<Agent>,
    proc_: Proc,
    /// The serving lease the agent gave its server: the server process grants nothing
    /// after it (it enforces the lease itself, even if its agent is frozen).
    lease_until: u64,
    /// The agent is frozen (SIGSTOP, swapped out) until then: it sees nothing, its server
    /// process goes on until its lease runs out.
    frozen_until: u64,
    /// The agent runs (ticks, server and fence results) but processes nothing of its group
    /// and quorum streams (`lag_quorum_only`: of its quorum stream) until then: a node that
    /// learns of a partition, or of its quorum loss, later than the others.
    lag_until: u64,
    lag_quorum_only: bool,
    clients: BTreeSet<ClientId>,
    /// Clients of every node when this node's server was started, and its view then.
    start_snapshot: Option<(ClientsByNode, Vec<NodeId>)>,
}

#[derive(Debug, Clone)]
enum Due {
    ServerStarted,
    ServerStopped,
    ServerCrash,
    Fence { target: NodeId, ok: bool },
}

/// Knobs of one run.
#[derive(Debug, Clone)]
pub(super) struct Knobs {
    pub nodes: u32,
    pub fencing: Fencing,
    pub steps: usize,
    pub fence_fail: f64,
}

pub(super) struct Sim {
    pub rng: StdRng,
    pub cluster: MemoryCluster,
    nodes: Vec<Node>,
    pub now: u64,
    due: Vec<(u64, NodeId, u64, Due)>,
    next_incarnation: u64,
    next_client: u64,
    knobs: Knobs,
    /// target -> (fencer node, its incarnation)
    fencers: BTreeMap<NodeId, (NodeId, u64)>,
    pub logs: Vec<(NodeId, &'static str, String)>,
    pub trace: VecDeque<String>,
    pub activations: usize,
    pub stale_seen: usize,
    pub fences_done: usize,
    /// Every fencing attempt: (when, target).
    fence_attempts: Vec<(u64, NodeId)>,
    partitioned: bool,
    cfg: MembershipConfig,
}

pub(super) type Check = Result<(), String>;

impl Sim {
    pub(super) fn new(seed: u64, knobs: Knobs) -> Sim {
        let cluster = MemoryCluster::with_nodes(knobs.nodes).expect("in-memory cluster");
        let mut rng = StdRng::seed_from_u64(seed);
        let priorities = (1..=knobs.nodes)
            .map(|n| (NodeId(n), rng.gen_range(0..3)))
            .collect();
        let cfg = MembershipConfig {
            priorities,
            fencing: knobs.fencing.clone(),
            server_address: String::new(),
            serving_lease_ms: 8_000,
            lease_margin_ms: 2_000,
            origin_lease_ms: 10_000,
            fence_timeout_ms: 20_000,
            fence_retry_ms: 3_000,
        };
        let nodes = (1..=knobs.nodes)
            .map(|n| Node {
                id: NodeId(n),
                agent: None,
                proc_: Proc::Off,
                lease_until: 0,
                frozen_until: 0,
                lag_until: 0,
                lag_quorum_only: false,
                clients: BTreeSet::new(),
                start_snapshot: None,
            })
            .collect();
        let mut sim = Sim {
            rng,
            cluster,
            nodes,
            now: 1_000,
            due: Vec::new(),
            next_incarnation: 1,
            next_client: 1,
            knobs,
            fencers: BTreeMap::new(),
            logs: Vec::new(),
            trace: VecDeque::new(),
            activations: 0,
            stale_seen: 0,
            fences_done: 0,
            fence_attempts: Vec::new(),
            partitioned: false,
            cfg,
        };
        for i in 0..sim.nodes.len() {
            sim.start_agent(i);
        }
        sim
    }

    fn note(&mut self, line: String) {
        self.trace.push_back(line);
        if self.trace.len() > 200 {
            self.trace.pop_front();
        }
    }

    fn idx(&self, node: NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == node)
    }

    fn start_agent(&mut self, i: usize) {
        let id = self.nodes[i].id;
        if self.nodes[i].agent.is_some() || !self.cluster.is_up(id) {
            return;
        }
        let (Ok(group), Ok(quorum)) = (
            self.cluster.request_join(id, GROUP),
            self.cluster.quorum(id),
        ) else {
            return;
        };
        let local = group.local();
        let mut cfg = self.cfg.clone();
        cfg.server_address = format!("node{}:7000", id.0);
        let mut machine = VolumeMembership::new(cfg, local);
        machine.handle(Input::Tick { now_ms: self.now });
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        let sender = group.sender();
        self.nodes[i].agent = Some(Agent {
            machine,
            group,
            sender,
            quorum,
            incarnation,
        });
        self.note(format!("{} agent {id} starts as {local}", self.now));
    }

    /// The agent process dies; its server (a child) dies with it, as do its clients.
    fn crash_agent(&mut self, i: usize) {
        if self.nodes[i].agent.take().is_some() {
            let id = self.nodes[i].id;
            self.nodes[i].proc_ = Proc::Off;
            self.nodes[i].clients.clear();
            self.note(format!("{} agent {id} crashes", self.now));
        }
    }

    /// Power off (kill or fence): corosync, agent, server and clients are gone.
    fn power_off(&mut self, i: usize) {
        let id = self.nodes[i].id;
        self.nodes[i].agent = None;
        self.nodes[i].proc_ = Proc::Off;
        self.nodes[i].clients.clear();
        if self.cluster.is_up(id) {
            let _ = self.cluster.kill_node(id);
        }
        self.fencers.remove(&id);
        self.note(format!("{} node {id} powered off", self.now));
    }

    fn feed(&mut self, i: usize, input: Input) -> Check {
        let Some(agent) = self.nodes[i].agent.as_mut() else {
            return Ok(());
        };
        let quorum_loss = matches!(&input, Input::Quorum(q) if !q.quorate);
        agent.machine.handle(input);
        if quorum_loss {
            let role = agent.machine.status().role;
            if role == Role::Serving || role == Role::Starting {
                return Err(format!(
                    "node {} still {role:?} after its partition lost quorum",
                    self.nodes[i].id
                ));
            }
        }
        self.drain(i)?;
        // Once its outputs are carried out (a stop takes effect at once).
        if let Some(agent) = self.nodes[i].agent.as_ref() {
            let st = agent.machine.status();
            if st.stale.contains(&st.local.node) && self.writing(i) {
                return Err(format!(
                    "{} holds itself stale and its server still grants ({:?})",
                    st.local, self.nodes[i].proc_
                ));
            }
        }
        Ok(())
    }

    fn drain(&mut self, i: usize) -> Check {
        loop {
            let id = self.nodes[i].id;
            let Some(agent) = self.nodes[i].agent.as_mut() else {
                return Ok(());
            };
            let Some(out) = agent.machine.poll_output() else {
                return Ok(());
            };
            let incarnation = agent.incarnation;
            match out {
                Output::Mcast(bytes) => {
                    let trace = std::env::var_os("CSNAP_CLUSTER_TRACE").is_some();
                    let local = agent.machine.local();
                    let body = trace
                        .then(|| {
                            super::state::Message::decode(&cpg_glue::Delivery {
                                from: local,
                                payload: bytes.clone(),
                            })
                            .ok()
                        })
                        .flatten();
                    let sent = agent.sender.mcast(bytes).now_or_never();
                    if let Some(m) = body {
                        self.note(format!("{} {id} mcast {:?}", self.now, m.body));
                    }
                    if !matches!(sent, Some(Ok(_))) {
                        self.note(format!("{} {id} mcast failed: {sent:?}", self.now));
                    }
                }
                Output::StartServer { generation } => {
                    if self.nodes[i].proc_ != Proc::Off {
                        return Err(format!(
                            "{id}: StartServer while its server is {:?}",
                            self.nodes[i].proc_
                        ));
                    }
                    self.nodes[i].proc_ = Proc::Starting;
                    // Until the first ExtendLease (which follows at once) nothing bounds it.
                    self.nodes[i].lease_until = u64::MAX;
                    let at = self.now + self.rng.gen_range(0..3_000);
                    self.due.push((at, id, incarnation, Due::ServerStarted));
                    self.note(format!("{} {id} StartServer g{generation}", self.now));
                    self.check_one_server()?;
                }
                Output::ActivateServer {
                    generation,
                    clients,
                    ..
                } => {
                    self.activations += 1;
                    self.note(format!(
                        "{} {id} Activate g{generation} {} clients",
                        self.now,
                        clients.len()
                    ));
                    self.check_gather(i, &clients)?;
                }
                Output::ExtendLease { until_ms } => self.nodes[i].lease_until = until_ms,
                Output::DeclareGone { .. } => {}
                Output::StopServer { reason } => {
                    self.note(format!("{} {id} StopServer {reason:?}", self.now));
                    if self.nodes[i].proc_ != Proc::Off {
                        self.nodes[i].proc_ = Proc::Stopping;
                    }
                    let at = self.now + self.rng.gen_range(0..2_000);
                    self.due.push((at, id, incarnation, Due::ServerStopped));
                }
                // The clients reconnect to the real server and live on (the shell reports
                // them only when they change: the machine must keep them).
                Output::DropClients => {}
                Output::Fence {
                    node,
                    attempt,
                    method,
                } => {
                    self.note(format!(
                        "{} {id} fences {node} (attempt {attempt})",
                        self.now
                    ));
                    self.fence_attempts.push((self.now, node));
                    if let Some(&(prev, inc)) = self.fencers.get(&node) {
                        if prev != id && self.alive_with(prev, inc) && self.same_side(prev, id) {
                            return Err(format!(
                                "{node} fenced by both {prev} and {id} in one partition"
                            ));
                        }
                    }
                    self.fencers.insert(node, (id, incarnation));
                    // corosync's cfg kill_node only reaches a node in the fencer's ring
                    // (CS_ERR_NOT_EXIST otherwise): a node that is off, or cut off, cannot
                    // be fenced that way.
                    let reachable = method != Fencing::KillNode || self.same_side(id, node);
                    let ok = !self.rng.gen_bool(self.knobs.fence_fail) && reachable;
                    // Sometimes no answer at all: the machine's timeout must retry.
                    if self.rng.gen_bool(0.9) {
                        let at = self.now + self.rng.gen_range(0..5_000);
                        self.due
                            .push((at, id, incarnation, Due::Fence { target: node, ok }));
                    }
                }
                Output::Log(event) => {
                    if event.name == "stale_merge" {
                        self.stale_seen += 1;
                    }
                    if event.name == "server_chosen" {
                        // The gate is open: every old server is certainly stopped, so the
                        // clients attached now are all the old server can have had.
                        let clients = self
                            .nodes
                            .iter()
                            .map(|n| (n.id, n.clients.clone()))
                            .collect();
                        let view = self.view_nodes(i);
                        self.nodes[i].start_snapshot = Some((clients, view));
                    }
                    if event.name == "fence_done" || event.name == "fence_unneeded" {
                        // That incident is over for this fencer (the node is off, or back
                        // clean): a later one may have another fencer.
                        let target = event
                            .detail
                            .split(|c: char| !c.is_ascii_digit())
                            .next()
                            .and_then(|n| n.parse().ok())
                            .map(NodeId);
                        if let Some(t) = target {
                            if self.fencers.get(&t).is_some_and(|(f, _)| *f == id) {
                                self.fencers.remove(&t);
                            }
                            // Fencing is let go without a confirmation only when the node's
                            // server certainly grants nothing any more.
                            if event.name == "fence_unneeded" {
                                if let Some(ti) = self.idx(t).filter(|&ti| self.writing(ti)) {
                                    return Err(format!(
                                        "{id} let go of fencing {t} while its server still grants ({:?}, lease until {}): {}",
                                        self.nodes[ti].proc_, self.nodes[ti].lease_until, event.detail
                                    ));
                                }
                            }
                        }
                        if event.name == "fence_done" {
                            self.fences_done += 1;
                        }
                    }
                    self.note(format!(
                        "{} {id} log {} {}",
                        self.now, event.name, event.detail
                    ));
                    self.logs.push((id, event.name, event.detail));
                }
            }
        }
    }

    fn alive_with(&self, node: NodeId, incarnation: u64) -> bool {
        self.idx(node)
            .and_then(|i| self.nodes[i].agent.as_ref())
            .is_some_and(|a| a.incarnation == incarnation)
    }

    fn same_side(&self, a: NodeId, b: NodeId) -> bool {
        self.cluster.ring(a).is_some_and(|r| r.members.contains(&b))
    }

    fn view_nodes(&self, i: usize) -> Vec<NodeId> {
        self.nodes[i]
            .agent
            .as_ref()
            .map(|a| a.machine.status().members.iter().map(|m| m.node).collect())
            .unwrap_or_default()
    }

    /// Whether the node's server process may grant anything now (started or ready, within
    /// the lease its agent gave it).
    fn writing(&self, i: usize) -> bool {
        matches!(self.nodes[i].proc_, Proc::Starting | Proc::Ready)
            && self.now < self.nodes[i].lease_until
    }

    fn check_one_server(&self) -> Check {
        let active: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.proc_ != Proc::Off && self.now < n.lease_until)
            .map(|n| n.id)
            .collect();
        if active.len() > 1 {
            return Err(format!("two servers active at once: {active:?}"));
        }
        Ok(())
    }

    fn check_gather(&self, i: usize, listed: &[ClientId]) -> Check {
        let Some((at_start, view_at_start)) = &self.nodes[i].start_snapshot else {
            return Err("activation without a start".into());
        };
        let view_now = self.view_nodes(i);
        // Stale members are not gathered: they are fenced or reset instead.
        let stale = self.nodes[i]
            .agent
            .as_ref()
            .map(|a| a.machine.status().stale)
            .unwrap_or_default();
        for n in &self.nodes {
            if !view_now.contains(&n.id)
                || !view_at_start.contains(&n.id)
                || n.agent.is_none()
                || stale.contains(&n.id)
            {
                continue;
            }
            let before = at_start.get(&n.id).cloned().unwrap_or_default();
            for c in before.intersection(&n.clients) {
                if !listed.contains(c) {
                    return Err(format!(
                        "activation on {} misses client {c} of member {}",
                        self.nodes[i].id, n.id
                    ));
                }
            }
        }
        Ok(())
    }

    /// Delivers what is pending on one random node's streams, then due work.
    pub(super) fn step(&mut self) -> Check {
        let roll = self.rng.gen_range(0..100);
        match roll {
            0..=59 => self.deliver_burst(),
            60..=74 => self.advance(),
            75..=84 => self.client_change(),
            _ => self.fault(),
        }
    }

    /// Lets one node process a few pending events in a row (a failover can then finish
    /// within an old server's lease, which is what the one-server checker must see).
    fn deliver_burst(&mut self) -> Check {
        let i = self.rng.gen_range(0..self.nodes.len());
        for _ in 0..self.rng.gen_range(1..=4) {
            self.deliver_one(i)?;
        }
        Ok(())
    }

    fn deliver_one(&mut self, i: usize) -> Check {
        if self.nodes[i].frozen_until > self.now {
            return Ok(());
        }
        let quorum_first = self.rng.gen_bool(0.3);
        let lagging = self.nodes[i].lag_until > self.now;
        let (quorum_ok, group_ok) = (!lagging, !lagging || self.nodes[i].lag_quorum_only);
        for pass in 0..2 {
            let Some(agent) = self.nodes[i].agent.as_mut() else {
                return Ok(());
            };
            let quorum_pass = (pass == 0) == quorum_first;
            if (quorum_pass && !quorum_ok) || (!quorum_pass && !group_ok) {
                continue;
            }
            let input = if quorum_pass {
                match agent.quorum.next().now_or_never() {
                    Some(Some(Ok(q))) => Some(Input::Quorum(q)),
                    Some(Some(Err(e))) => Some(Input::GroupLost {
                        detail: e.to_string(),
                    }),
                    _ => None,
                }
            } else {
                match agent.group.next().now_or_never() {
                    Some(Some(Ok(ev))) => Some(Input::Group(ev)),
                    Some(Some(Err(e))) => Some(Input::GroupLost {
                        detail: e.to_string(),
                    }),
                    _ => None,
                }
            };
            if let Some(input) = input {
                let lost = matches!(input, Input::GroupLost { .. });
                self.feed(i, input)?;
                if lost {
                    self.crash_agent(i);
                }
                return Ok(());
            }
        }
        Ok(())
    }

    /// Delivers everything pending everywhere (bounded).
    pub(super) fn drain_all(&mut self) -> Check {
        for _ in 0..10_000 {
            let mut any = false;
            for i in 0..self.nodes.len() {
                if self.nodes[i].lag_until > self.now || self.nodes[i].frozen_until > self.now {
                    continue;
                }
                let Some(agent) = self.nodes[i].agent.as_mut() else {
                    continue;
                };
                let input = match agent.quorum.next().now_or_never() {
                    Some(Some(Ok(q))) => Some(Input::Quorum(q)),
                    _ => match agent.group.next().now_or_never() {
                        Some(Some(Ok(ev))) => Some(Input::Group(ev)),
                        Some(Some(Err(e))) => Some(Input::GroupLost {
                            detail: e.to_string(),
                        }),
                        _ => None,
                    },
                };
                if let Some(input) = input {
                    any = true;
                    let lost = matches!(input, Input::GroupLost { .. });
                    self.feed(i, input)?;
                    if lost {
                        self.crash_agent(i);
                    }
                }
            }
            if !any {
                return Ok(());
            }
        }
        Err("events never stopped flowing".into())
    }

    pub(super) fn advance_by(&mut self, ms: u64) -> Check {
        self.now += ms;
        let now = self.now;
        let mut due: Vec<(u64, NodeId, u64, Due)> = Vec::new();
        let frozen: BTreeSet<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.frozen_until > now)
            .map(|n| n.id)
            .collect();
        self.due.retain(|d| {
            if d.0 <= now && !frozen.contains(&d.1) {
                due.push(d.clone());
                false
            } else {
                true
            }
        });
        due.sort_by_key(|d| d.0);
        for (_, node, incarnation, what) in due {
            self.run_due(node, incarnation, what)?;
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].frozen_until <= now {
                self.feed(i, Input::Tick { now_ms: now })?;
            }
        }
        Ok(())
    }

    fn advance(&mut self) -> Check {
        let ms = if self.rng.gen_bool(0.5) {
            self.rng.gen_range(0..2_500)
        } else {
            self.rng.gen_range(0..400)
        };
        self.advance_by(ms)
    }

    fn run_due(&mut self, node: NodeId, incarnation: u64, what: Due) -> Check {
        let Some(i) = self.idx(node) else {
            return Ok(());
        };
        if !self.alive_with(node, incarnation) {
            return Ok(());
        }
        match what {
            Due::ServerStarted => {
                if self.nodes[i].proc_ == Proc::Starting {
                    self.nodes[i].proc_ = Proc::Ready;
                    self.feed(i, Input::ServerStarted)?;
                }
            }
            Due::ServerStopped => {
                self.nodes[i].proc_ = Proc::Off;
                self.feed(i, Input::ServerStopped)?;
            }
            Due::ServerCrash => {
                if self.nodes[i].proc_ != Proc::Off {
                    self.nodes[i].proc_ = Proc::Off;
                    self.feed(
                        i,
                        Input::ServerFailed {
                            detail: "simulated crash".into(),
                        },
                    )?;
                }
            }
            Due::Fence { target, ok } => {
                if ok {
                    if let Some(t) = self.idx(target) {
                        self.power_off(t);
                    }
                }
                self.feed(
                    i,
                    Input::FenceResult {
                        node: target,
                        ok,
                        detail: if ok {
                            "off".into()
                        } else {
                            "simulated failure".into()
                        },
                    },
                )?;
            }
        }
        Ok(())
    }

    fn client_change(&mut self) -> Check {
        let i = self.rng.gen_range(0..self.nodes.len());
        if self.nodes[i].agent.is_none() {
            return Ok(());
        }
        if self.nodes[i].clients.is_empty() || self.rng.gen_bool(0.6) {
            let c = ClientId::new(
                self.next_client,
                ClientKind::Snapshot {
                    snap: csnap_proto::SnapId(1),
                },
            );
            self.next_client += 1;
            self.nodes[i].clients.insert(c);
        } else if let Some(c) = self.nodes[i].clients.iter().next().copied() {
            self.nodes[i].clients.remove(&c);
        }
        let list: Vec<ClientId> = self.nodes[i].clients.iter().copied().collect();
        let line = format!("{} {} clients {}", self.now, self.nodes[i].id, list.len());
        self.note(line);
        self.feed(i, Input::Clients(list))
    }

    fn fault(&mut self) -> Check {
        let i = self.rng.gen_range(0..self.nodes.len());
        let id = self.nodes[i].id;
        match self.rng.gen_range(0..13) {
            0 => {
                if self.cluster.is_up(id) && self.up_count() > 1 {
                    self.power_off(i);
                }
            }
            1 => {
                if !self.cluster.is_up(id) {
                    let _ = self.cluster.restart_node(id);
                    self.note(format!("{} node {id} restarts", self.now));
                }
                self.start_agent(i);
            }
            2 => {
                let mut a = Vec::new();
                let mut b = Vec::new();
                for n in &self.nodes {
                    if self.rng.gen_bool(0.5) {
                        a.push(n.id)
                    } else {
                        b.push(n.id)
                    }
                }
                self.note(format!("{} partition {a:?} | {b:?}", self.now));
                let _ = self.cluster.partition(&[a, b]);
                self.partitioned = true;
            }
            3 => {
                self.note(format!("{} heal", self.now));
                self.cluster.heal();
                self.partitioned = false;
            }
            4 => {
                if self.nodes[i].proc_ != Proc::Off {
                    let inc = self.nodes[i].agent.as_ref().map_or(0, |a| a.incarnation);
                    let at = self.now + self.rng.gen_range(0..1_000);
                    self.due.push((at, id, inc, Due::ServerCrash));
                }
            }
            5 => {
                self.crash_agent(i);
            }
            6 => {
                let ms = self.rng.gen_range(0..15_000);
                self.nodes[i].frozen_until = self.now + ms;
                self.note(format!("{} agent {id} frozen for {ms} ms", self.now));
            }
            7 => {
                // A node (most often the server's) learns of membership or quorum changes
                // late while its clock, server and leases go on.
                let i = self
                    .server_node()
                    .filter(|_| self.rng.gen_bool(0.7))
                    .unwrap_or(i);
                let ms = self.rng.gen_range(0..15_000);
                self.nodes[i].lag_until = self.now + ms;
                self.nodes[i].lag_quorum_only = self.rng.gen_bool(0.5);
                let what = if self.nodes[i].lag_quorum_only {
                    "quorum"
                } else {
                    "group and quorum"
                };
                self.note(format!(
                    "{} {} lags on {what} for {ms} ms",
                    self.now, self.nodes[i].id
                ));
            }
            8 => {
                // Cut the server's node off (alone or with a minority), often while it is
                // slow to notice or frozen.
                let Some(s) = self.server_node() else {
                    return Ok(());
                };
                let sid = self.nodes[s].id;
                let mut small = vec![sid];
                let mut big = Vec::new();
                for n in &self.nodes {
                    if n.id == sid {
                        continue;
                    }
                    if small.len() < (self.nodes.len() - 1) / 2 && self.rng.gen_bool(0.3) {
                        small.push(n.id);
                    } else {
                        big.push(n.id);
                    }
                }
                self.note(format!("{} isolate server {small:?} | {big:?}", self.now));
                let _ = self.cluster.partition(&[small, big]);
                self.partitioned = true;
                let ms = self.rng.gen_range(0..15_000);
                match self.rng.gen_range(0..3) {
                    0 => {
                        self.nodes[s].lag_until = self.now + ms;
                        self.nodes[s].lag_quorum_only = self.rng.gen_bool(0.5);
                        self.note(format!("{} {sid} lags for {ms} ms", self.now));
                    }
                    1 => {
                        self.nodes[s].frozen_until = self.now + ms;
                        self.note(format!("{} agent {sid} frozen for {ms} ms", self.now));
                    }
                    _ => {}
                }
            }
            9 => {
                // An agent restarts (its memory is lost), often in a partition.
                self.crash_agent(i);
                self.start_agent(i);
            }
            _ => self.start_agent(i),
        }
        Ok(())
    }

    /// The node whose server process runs, if any.
    fn server_node(&self) -> Option<usize> {
        let with: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].proc_ != Proc::Off)
            .collect();
        with.first().copied()
    }

    fn up_count(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| self.cluster.is_up(n.id))
            .count()
    }

    /// Heal, bring every node and agent back, let fencing work and time pass; then check
    /// that the cluster converged.
    pub(super) fn settle(&mut self) -> Check {
        self.knobs.fence_fail = 0.0;
        self.cluster.heal();
        for n in &mut self.nodes {
            n.frozen_until = 0;
            n.lag_until = 0;
        }
        for _ in 0..400 {
            for i in 0..self.nodes.len() {
                let id = self.nodes[i].id;
                if !self.cluster.is_up(id) {
                    let _ = self.cluster.restart_node(id);
                }
                self.start_agent(i);
            }
            self.drain_all()?;
            self.advance_by(500)?;
            self.drain_all()?;
            if self.converged().is_ok() {
                return Ok(());
            }
        }
        self.converged()
    }

    fn converged(&self) -> Check {
        let mut servers = Vec::new();
        let mut seen = BTreeSet::new();
        for n in &self.nodes {
            let Some(a) = n.agent.as_ref() else {
                return Err(format!("{} has no agent", n.id));
            };
            let st = a.machine.status();
            if st.role == Role::Serving {
                servers.push(n.id);
            }
            if !st.stale.is_empty() {
                return Err(format!(
                    "{} still holds stale {:?}; {}",
                    n.id,
                    st.stale,
                    self.gates()
                ));
            }
            seen.insert(st.server);
        }
        if servers.len() != 1 {
            return Err(format!("serving: {servers:?}; {}", self.gates()));
        }
        if seen.len() != 1 {
            return Err(format!("members disagree on the server: {seen:?}"));
        }
        // Every member knows where the server listens (the sim's nodes listen on
        // `node<id>:7000`), also one that joined after the announce.
        let want = Some((servers[0], format!("node{}:7000", servers[0].0)));
        if seen.first() != Some(&want) {
            return Err(format!("the server's address is not known: {seen:?}"));
        }
        Ok(())
    }

    fn gates(&self) -> String {
        let gates: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| n.agent.as_ref())
            .map(|a| {
                let s = a.machine.status();
                format!(
                    "{} {:?} {} gate {:?} unsettled {:?} stale {:?} fencing {:?} members {} claims {:?} actor {:?}",
                    s.local,
                    s.role,
                    s.lineage,
                    s.gate,
                    s.unsettled,
                    s.stale,
                    s.fencing,
                    s.members.len(),
                    a.machine.claims,
                    a.machine.actor
                )
            })
            .collect();
        gates.join("; ")
    }

    pub(super) fn trace(&self) -> String {
        self.trace.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// One randomized schedule; returns statistics or the violation with a trace.
pub(super) fn run(seed: u64, knobs: Knobs) -> Result<Sim, String> {
    let steps = knobs.steps;
    let mut sim = Sim::new(seed, knobs);
    for _ in 0..steps {
        if let Err(e) = sim.step() {
            return Err(format!("{e}\n--- last events ---\n{}", sim.trace()));
        }
    }
    if let Err(e) = sim.settle() {
        return Err(format!(
            "did not converge: {e}\n--- last events ---\n{}",
            sim.trace()
        ));
    }
    Ok(sim)
}

/// A seed or count from the environment, parsed like every test seed
/// (`csnap_proto::testing`): a malformed value fails the test instead of being ignored.
fn env_u64(name: &str) -> Option<u64> {
    csnap_proto::testing::env_seed(name)
}

fn knobs_for(seed: u64) -> Knobs {
    let fencing = match seed % 3 {
        0 => Fencing::KillNode,
        1 => Fencing::Reset,
        _ => Fencing::Stonith,
    };
    Knobs {
        nodes: 3 + (seed % 3) as u32,
        fencing,
        steps: 300,
        fence_fail: 0.3,
    }
}

/// `CSNAP_CLUSTER_SEED=N` replays one schedule; `CSNAP_CLUSTER_SCHEDULES=N` sets how many
/// (default 2000); `CSNAP_CLUSTER_BASE` the first seed (default: fixed).
/// Schedules that soaks found failing once, replayed on every run:
/// 0x900d0c65 (two servers: an announce known only to a member that crashed),
/// 0x5eed0426 and 0x5eed074a (reset/announce livelocks), 0xabc003b6 (a node stale by the
/// view's verdict kept granting), 0x5eed25ca (a member without quorum anchored a departed
/// server's stop wait at its departure, although the server went on serving in the quorate
/// partition, and let go of fencing it too early).
#[test]
fn schedules_soaks_found_stay_fixed() {
    for seed in [
        0x900d_0c65,
        0x5eed_0426,
        0x5eed_074a,
        0xabc0_03b6,
        0x5eed_25ca,
    ] {
        if let Err(e) = run(seed, knobs_for(seed)) {
            panic!("seed {seed:#x}: {e}");
        }
    }
}

#[test]
fn randomized_schedules_keep_the_membership_rules() {
    if let Some(seed) = env_u64("CSNAP_CLUSTER_SEED") {
        eprintln!("replaying seed {seed:#x}");
        if let Err(e) = run(seed, knobs_for(seed)) {
            panic!("seed {seed:#x}: {e}");
        }
        return;
    }
    let count = env_u64("CSNAP_CLUSTER_SCHEDULES").unwrap_or(2_000);
    let base = env_u64("CSNAP_CLUSTER_BASE").unwrap_or(0x5eed_0000);
    eprintln!("cluster sim: {count} schedules from seed {base:#x}");
    let started = std::time::Instant::now();
    let (mut activations, mut stale, mut fenced) = (0, 0, 0);
    for k in 0..count {
        let seed = base.wrapping_add(k);
        match run(seed, knobs_for(seed)) {
            Ok(sim) => {
                activations += sim.activations;
                stale += sim.stale_seen;
                fenced += sim.fences_done;
            }
            Err(e) => panic!("seed {seed:#x} failed (replay: CSNAP_CLUSTER_SEED={seed:#x}): {e}"),
        }
    }
    eprintln!(
        "cluster sim: {count} schedules in {:?}: {activations} activations, {stale} stale detections, {fenced} fences/resets done",
        started.elapsed()
    );
    assert!(
        activations > count as usize,
        "the schedules must exercise failovers"
    );
    assert!(stale > 0, "the schedules must produce stale merges");
}

impl Sim {
    /// The node whose agent serves, if exactly one does.
    fn serving(&self) -> Option<usize> {
        let s: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i]
                    .agent
                    .as_ref()
                    .is_some_and(|a| a.machine.status().role == Role::Serving)
            })
            .collect();
        (s.len() == 1).then(|| s[0])
    }

    /// Delivers everything pending on the given nodes only.
    fn drain_only(&mut self, only: &[usize]) -> Check {
        for _ in 0..1_000 {
            let mut any = false;
            for &i in only {
                let Some(agent) = self.nodes[i].agent.as_mut() else {
                    continue;
                };
                let input = match agent.quorum.next().now_or_never() {
                    Some(Some(Ok(q))) => Some(Input::Quorum(q)),
                    _ => match agent.group.next().now_or_never() {
                        Some(Some(Ok(ev))) => Some(Input::Group(ev)),
                        _ => None,
                    },
                };
                if let Some(input) = input {
                    any = true;
                    self.feed(i, input)?;
                }
            }
            if !any {
                return Ok(());
            }
        }
        Ok(())
    }
}

fn scripted(fencing: Fencing) -> Sim {
    Sim::new(
        7,
        Knobs {
            nodes: 3,
            fencing,
            steps: 0,
            fence_fail: 0.0,
        },
    )
}

/// The server is cut off and its node learns nothing (frozen): the majority must not start
/// a server before the old one's serving lease is certainly over.
#[test]
fn a_cut_off_server_is_waited_out_before_a_new_one_starts() {
    let mut sim = scripted(Fencing::Reset);
    sim.settle().unwrap();
    let s = sim.serving().expect("one server");
    let old = sim.nodes[s].id;
    let rest: Vec<usize> = (0..3).filter(|&i| i != s).collect();
    let sides = [
        vec![old],
        rest.iter().map(|&i| sim.nodes[i].id).collect::<Vec<_>>(),
    ];
    sim.cluster.partition(&sides).unwrap();
    sim.drain_only(&rest).unwrap();
    // Time passes for the majority only (the old server's agent is frozen).
    for _ in 0..9 {
        sim.now += 1_000;
        for &i in &rest {
            let now = sim.now;
            sim.feed(i, Input::Tick { now_ms: now }).unwrap();
        }
        sim.drain_only(&rest).unwrap();
        assert!(
            rest.iter().all(|&i| sim.nodes[i].proc_ == Proc::Off),
            "a new server started while the old one may still serve"
        );
    }
    // After serving lease + margin the majority takes over.
    for _ in 0..30 {
        sim.now += 1_000;
        for &i in &rest {
            let now = sim.now;
            sim.feed(i, Input::Tick { now_ms: now }).unwrap();
        }
        sim.drain_only(&rest).unwrap();
        let due: Vec<_> = std::mem::take(&mut sim.due);
        for (_, node, inc, what) in due {
            if node != old {
                sim.run_due(node, inc, what).unwrap();
            }
        }
    }
    assert!(rest.iter().any(|&i| sim.nodes[i].proc_ == Proc::Ready));
}

/// The server's partition loses quorum: it stops at once.
#[test]
fn a_server_without_quorum_stops_at_once() {
    let mut sim = scripted(Fencing::KillNode);
    sim.settle().unwrap();
    let s = sim.serving().expect("one server");
    let old = sim.nodes[s].id;
    let others: Vec<NodeId> = sim
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|n| *n != old)
        .collect();
    sim.cluster.partition(&[vec![old], others]).unwrap();
    sim.drain_only(&[s]).unwrap();
    let st = sim.nodes[s].agent.as_ref().unwrap().machine.status();
    assert!(!st.quorate);
    assert_eq!(st.role, Role::Stopping);
    // Heal: the old server comes back with the old lineage once the majority moved on, and
    // is fenced by exactly one member; the cluster converges.
    sim.settle().unwrap();
}

/// Soak seed 0x900d0c65 in short: a member that was cut off without quorum, and agents that
/// restarted, cannot know what the quorate side ran meanwhile. When only such members are
/// left, no server starts before one stop wait has passed in an unbroken quorate run.
#[test]
fn members_without_certain_history_wait_one_stop_wait() {
    let mut sim = scripted(Fencing::Reset);
    sim.settle().unwrap();
    let s = sim.serving().expect("one server");
    let x = (0..3).find(|&i| i != s).unwrap();
    let xid = sim.nodes[x].id;
    let rest: Vec<NodeId> = sim
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|n| *n != xid)
        .collect();
    sim.cluster.partition(&[vec![xid], rest]).unwrap();
    sim.drain_only(&[x]).unwrap();
    assert!(!sim.nodes[x].agent.as_ref().unwrap().machine.certain);
    // Every other agent restarts (its server dies with it): nobody certain is left.
    for i in (0..3).filter(|&i| i != x) {
        sim.crash_agent(i);
        sim.start_agent(i);
    }
    sim.cluster.heal();
    sim.drain_all().unwrap();
    let healed = sim.now;
    let wait = sim.cfg.stop_wait_ms();
    while sim.now + 1_000 < healed + wait {
        sim.advance_by(500).unwrap();
        sim.drain_all().unwrap();
        assert!(
            sim.nodes.iter().all(|n| n.proc_ == Proc::Off),
            "a server started {} ms after the heal, without certain history",
            sim.now - healed
        );
    }
    sim.settle().unwrap();
}

/// Problem seen on real corosync: the server's node is powered off; kill_node cannot reach
/// it (not in the membership), and the survivors fail over once its lease ran out. The
/// fencing job must end then: when the node is powered back on, a retry must not kill it
/// before (or after) its fresh agent says it holds nothing.
#[test]
fn a_powered_off_server_is_waited_out_and_not_fenced_when_it_comes_back() {
    let mut sim = scripted(Fencing::KillNode);
    sim.settle().unwrap();
    let s = sim.serving().expect("one server");
    let old = sim.nodes[s].id;
    sim.power_off(s);
    sim.drain_all().unwrap();
    let off_at = sim.now;
    let wait = sim.cfg.stop_wait_ms();
    while sim.now < off_at + wait + 10_000 {
        sim.advance_by(500).unwrap();
        sim.drain_all().unwrap();
    }
    let n = sim.serving().expect("failed over");
    assert_ne!(sim.nodes[n].id, old);
    for i in (0..3).filter(|&i| i != s) {
        let st = sim.nodes[i].agent.as_ref().unwrap().machine.status();
        assert!(
            st.fencing.is_empty(),
            "{}: fencing {:?} after {old}'s lease certainly ran out",
            st.local,
            st.fencing
        );
    }
    // Powered back on: corosync first, the agent a while later.
    sim.cluster.restart_node(old).unwrap();
    let back_at = sim.now;
    for _ in 0..40 {
        sim.advance_by(500).unwrap();
        sim.drain_all().unwrap();
    }
    sim.start_agent(s);
    for _ in 0..40 {
        sim.advance_by(500).unwrap();
        sim.drain_all().unwrap();
    }
    assert!(
        !sim.fence_attempts
            .iter()
            .any(|(at, t)| *at >= back_at && *t == old),
        "{old} fenced after it was powered back on: {:?}",
        sim.fence_attempts
    );
    assert!(sim.cluster.is_up(old));
    assert!(!sim.logs.iter().any(|(_, name, _)| *name == "stale_merge"));
    sim.converged().unwrap();
}

/// With `fencing: reset`, a stale node drops its state once per incident: a reset order
/// repeated before the node's own clean state is back (the claimant repeats it in a new
/// view; or a second claim wins once the first claimant's state no longer lists the node)
/// finds nothing to drop and does nothing. On real corosync the node reset itself twice
/// within milliseconds (`stale_reset` for g1@1, then for g0).
#[test]
fn a_stale_node_resets_itself_once() {
    let mut sim = scripted(Fencing::Reset);
    sim.settle().unwrap();
    let s = sim.serving().expect("one server");
    let old = sim.nodes[s].id;
    let rest: Vec<usize> = (0..3).filter(|&i| i != s).collect();
    let others: Vec<NodeId> = rest.iter().map(|&i| sim.nodes[i].id).collect();
    sim.cluster.partition(&[vec![old], others]).unwrap();
    sim.drain_all().unwrap();
    for _ in 0..60 {
        sim.advance_by(500).unwrap();
        sim.drain_all().unwrap();
    }
    assert!(rest.iter().any(|&i| sim.nodes[i].proc_ == Proc::Ready));
    sim.cluster.heal();
    let resets = |sim: &Sim| {
        sim.logs
            .iter()
            .filter(|(n, name, _)| *n == old && *name == "stale_reset")
            .count()
    };
    let mut repeated = false;
    'outer: for _ in 0..10_000 {
        let mut any = false;
        for i in 0..3 {
            let Some(agent) = sim.nodes[i].agent.as_mut() else {
                continue;
            };
            let input = match agent.quorum.next().now_or_never() {
                Some(Some(Ok(q))) => Some(Input::Quorum(q)),
                _ => match agent.group.next().now_or_never() {
                    Some(Some(Ok(ev))) => Some(Input::Group(ev)),
                    _ => None,
                },
            };
            let Some(input) = input else { continue };
            any = true;
            sim.feed(i, input).unwrap();
            if i == s && !repeated && resets(&sim) == 1 {
                // The order again, before the node's own clean state came back to it.
                let m = &sim.nodes[s].agent.as_ref().unwrap().machine;
                let claimant = *m.claims.get(&old).expect("a claimant");
                assert!(m.stale.contains(&old));
                let payload = super::state::Message::new(super::state::Body::FenceClaim {
                    node: old,
                    reset: true,
                })
                .encode()
                .unwrap();
                let again = cpg_glue::GroupEvent::Deliver(cpg_glue::Delivery {
                    from: claimant,
                    payload,
                });
                sim.feed(s, Input::Group(again)).unwrap();
                repeated = true;
                break 'outer;
            }
        }
        if !any {
            break;
        }
    }
    assert!(repeated, "no reset seen:\n{}", sim.trace());
    sim.settle().unwrap();
    assert_eq!(
        resets(&sim),
        1,
        "{old} reset more than once:\n{}",
        sim.trace()
    );
}

/// A member that joins after the announce learns the server's address from the server's
/// state, not only its node.
#[test]
fn a_member_joining_after_the_announce_knows_the_server_address() {
    let mut sim = scripted(Fencing::Reset);
    sim.settle().unwrap();
    let s = sim.serving().expect("one server");
    let x = (0..3).find(|&i| i != s).unwrap();
    sim.crash_agent(x);
    sim.drain_all().unwrap();
    sim.start_agent(x);
    sim.drain_all().unwrap();
    sim.advance_by(500).unwrap();
    sim.drain_all().unwrap();
    let st = sim.nodes[x].agent.as_ref().unwrap().machine.status();
    let sid = sim.nodes[s].id;
    assert_eq!(st.server, Some((sid, format!("node{}:7000", sid.0))));
}

/// A restarted agent (no lineage) whose node then attaches a snapshot client to the
/// running server holds state of the running lineage, not of "no lineage": the next view
/// change must not call it stale and fence it (whole-system simulation seed
/// 0x515700000040 fenced such a node for nothing).
#[test]
fn a_restarted_agent_with_new_clients_is_not_stale_at_the_next_view_change() {
    let mut sim = scripted(Fencing::KillNode);
    sim.settle().unwrap();
    let s = sim.serving().expect("one server");
    let x = (0..3).find(|&i| i != s).unwrap();
    sim.crash_agent(x);
    sim.drain_all().unwrap();
    sim.start_agent(x);
    for _ in 0..4 {
        sim.advance_by(500).unwrap();
        sim.drain_all().unwrap();
    }
    let reader = ClientId::new(
        9_999,
        ClientKind::Snapshot {
            snap: csnap_proto::SnapId(1),
        },
    );
    sim.nodes[x].clients.insert(reader);
    sim.feed(x, Input::Clients(vec![reader])).unwrap();
    sim.drain_all().unwrap();
    // A view change: the third node's agent restarts.
    let y = (0..3).find(|&i| i != s && i != x).unwrap();
    sim.crash_agent(y);
    sim.drain_all().unwrap();
    sim.start_agent(y);
    for _ in 0..10 {
        sim.advance_by(500).unwrap();
        sim.drain_all().unwrap();
    }
    assert!(
        !sim.logs.iter().any(|(_, name, _)| *name == "stale_merge"),
        "a restarted node was called stale: {:?}",
        sim.logs
            .iter()
            .filter(|(_, n, _)| *n == "stale_merge")
            .collect::<Vec<_>>()
    );
    assert!(sim.fence_attempts.is_empty(), "{:?}", sim.fence_attempts);
    assert!(sim
        .logs
        .iter()
        .any(|(n, name, _)| *name == "lineage_adopted" && *n == sim.nodes[x].id));
    sim.converged().unwrap();
}

/// With `fencing: reset`, an agent that restarted while its node's snapshot reader stayed
/// attached (in the whole-system simulation readers outlive their agent) reports the reader
/// before its first agreed view, is stale (clients, no lineage) and resets. The reader
/// reconnects to the real server holding its read locks, and the shell does not report the
/// unchanged list again: the next failover's gather must still list it. It did not (the
/// reset cleared the machine's client list; whole-system simulation seed 0x515700000040).
#[test]
fn a_reset_node_keeps_its_snapshot_clients_in_the_next_gather() {
    let mut sim = scripted(Fencing::Reset);
    sim.settle().unwrap();
    let s = sim.serving().expect("one server");
    let x = (0..3).find(|&i| i != s).unwrap();
    let reader = ClientId::new(
        9_999,
        ClientKind::Snapshot {
            snap: csnap_proto::SnapId(1),
        },
    );
    sim.nodes[x].clients.insert(reader);
    sim.feed(x, Input::Clients(vec![reader])).unwrap();
    sim.drain_all().unwrap();
    // The agent dies; the reader lives on and is reported by the new agent at once.
    sim.nodes[x].agent = None;
    sim.drain_all().unwrap();
    sim.start_agent(x);
    sim.feed(x, Input::Clients(vec![reader])).unwrap();
    for _ in 0..20 {
        sim.advance_by(500).unwrap();
        sim.drain_all().unwrap();
    }
    let id = sim.nodes[x].id;
    assert!(
        sim.logs
            .iter()
            .any(|(n, name, _)| *n == id && *name == "stale_reset"),
        "the restarted agent was not reset:\n{}",
        sim.trace()
    );
    let resets_before = sim
        .logs
        .iter()
        .filter(|(_, n, _)| *n == "stale_reset")
        .count();
    sim.converged().unwrap();
    // The server's node powers off: the next server's gather must list the reader (the
    // checker compares every activation with the clients attached at the choice).
    let before = sim.activations;
    sim.power_off(s);
    for _ in 0..80 {
        sim.advance_by(500).unwrap();
        sim.drain_all().unwrap();
    }
    assert!(sim.activations > before, "no failover:\n{}", sim.trace());
    assert_eq!(
        sim.logs
            .iter()
            .filter(|(_, n, _)| *n == "stale_reset")
            .count(),
        resets_before,
        "a reset node with clients was reset again:\n{}",
        sim.trace()
    );
}

/// Whole-system simulation seed 0xc0ffee00383f (stonith, 3 nodes): after a heal, node 1's
/// restarted agent (clients, no lineage) was stale, and nobody ever fenced it. Node 3 took
/// the verdict from the states it held when the merged view was agreed (nobody quorate
/// before: actor node 2); node 2 heard of the ring's quorum later, after node 3's next
/// state (`was_quorate`, listing node 1 stale), and its verdict from those states named
/// node 3. Each waited for the other. Both must take the verdict from the states of one
/// point of the delivery order, whenever their quorum event comes.
#[test]
fn members_hearing_of_quorum_at_different_points_pick_the_same_fencer() {
    use super::state::{Body, Lineage, MemberState, Message};
    use cpg_glue::{
        ConfChg, Delivery, GroupEvent, Member, MemberChange, QuorumEvent, Reason, RingId,
        TotemConfChg,
    };
    let member = |n: u32| Member {
        node: NodeId(n),
        pid: 100 + n,
    };
    let members = vec![member(1), member(2), member(3)];
    let g1 = Lineage {
        generation: 1,
        server: Some(NodeId(2)),
    };
    let reader = ClientId::new(
        12,
        ClientKind::Snapshot {
            snap: csnap_proto::SnapId(1),
        },
    );
    let state = |lineage: Lineage, clients: Vec<ClientId>, was_quorate: bool, stale: Vec<u32>| {
        MemberState {
            has_state: true,
            lineage,
            role: Role::Idle,
            clients,
            lease_left_ms: 0,
            view: members.clone(),
            was_quorate,
            age: 1,
            certain: None,
            unsettled: vec![],
            stale: stale.into_iter().map(NodeId).collect(),
            fencing: vec![],
            fenced: vec![],
            server_address: String::new(),
        }
    };
    let deliver = |from: Member, s: MemberState| {
        Input::Group(GroupEvent::Deliver(Delivery {
            from,
            payload: Message::new(Body::State(s)).encode().unwrap(),
        }))
    };
    let ring = RingId {
        node: NodeId(1),
        seq: 29,
    };
    // The group's events, the same at every member: the merged view and the first states
    // (node 1 restarted with a reader and no lineage; nobody was quorate before).
    let events = vec![
        Input::Group(GroupEvent::ConfChg(ConfChg {
            members: members.clone(),
            left: vec![],
            joined: members
                .iter()
                .map(|m| MemberChange {
                    member: *m,
                    reason: Reason::Join,
                })
                .collect(),
        })),
        Input::Group(GroupEvent::TotemConfChg(TotemConfChg {
            ring,
            members: vec![NodeId(1), NodeId(2), NodeId(3)],
        })),
        deliver(
            member(1),
            state(Lineage::default(), vec![reader], false, vec![]),
        ),
        deliver(member(2), state(g1, vec![], false, vec![])),
        deliver(member(3), state(g1, vec![], false, vec![])),
    ];
    let quorum = Input::Quorum(QuorumEvent {
        quorate: true,
        ring,
        members: vec![NodeId(1), NodeId(2), NodeId(3)],
    });
    // Node 3 agreed at once and says so in its next state.
    let later = deliver(member(3), state(g1, vec![], true, vec![1]));
    let claims = |local: u32, quorum_at: usize| {
        let cfg = MembershipConfig {
            priorities: BTreeMap::new(),
            fencing: Fencing::Stonith,
            server_address: format!("node{local}:7000"),
            serving_lease_ms: 8_000,
            lease_margin_ms: 2_000,
            origin_lease_ms: 10_000,
            fence_timeout_ms: 20_000,
            fence_retry_ms: 3_000,
        };
        let mut m = VolumeMembership::new(cfg, member(local));
        m.handle(Input::Tick { now_ms: 1_000 });
        let mut inputs = events.clone();
        inputs.push(later.clone());
        inputs.insert(quorum_at, quorum.clone());
        let mut claimed = Vec::new();
        for input in inputs {
            m.handle(input);
            while let Some(out) = m.poll_output() {
                if let Output::Mcast(payload) = out {
                    let d = Delivery {
                        from: member(local),
                        payload,
                    };
                    if let Ok(Message {
                        body: Body::FenceClaim { node, .. },
                        ..
                    }) = Message::decode(&d)
                    {
                        claimed.push(node);
                    }
                }
            }
        }
        assert!(m.holds_itself_stale() == (local == 1));
        claimed
    };
    // Node 3 hears of the quorum before node 3's later state, node 2 after it.
    let by_3 = claims(3, 5);
    let by_2 = claims(2, 6);
    assert_eq!(
        (by_2, by_3),
        (vec![NodeId(1)], vec![]),
        "exactly one member (node 2, the lowest of the side) claims node 1"
    );
}

/// Status after a reset (issue 9): the reset node holds no lineage of its own (generation
/// 0 in its state, so it is never taken for state of another lineage again) but reports
/// the view's lineage it rejoined; the serving node's status lists the reset node's reader
/// per node, and the next server's activation list carries it.
#[test]
fn status_shows_the_rejoined_lineage_clients_per_node_and_the_activation_list() {
    let mut sim = scripted(Fencing::Reset);
    sim.settle().unwrap();
    let s = sim.serving().expect("one server");
    let old = sim.nodes[s].id;
    let reader = ClientId::new(
        4_242,
        ClientKind::Snapshot {
            snap: csnap_proto::SnapId(1),
        },
    );
    sim.nodes[s].clients.insert(reader);
    sim.feed(s, Input::Clients(vec![reader])).unwrap();
    sim.drain_all().unwrap();
    let rest: Vec<usize> = (0..3).filter(|&i| i != s).collect();
    let others: Vec<NodeId> = rest.iter().map(|&i| sim.nodes[i].id).collect();
    sim.cluster.partition(&[vec![old], others]).unwrap();
    for _ in 0..60 {
        sim.advance_by(500).unwrap();
        sim.drain_all().unwrap();
    }
    let t = sim.serving().expect("the majority serves");
    assert!(rest.contains(&t), "{}", sim.trace());
    sim.cluster.heal();
    for _ in 0..40 {
        sim.advance_by(500).unwrap();
        sim.drain_all().unwrap();
    }
    assert!(
        sim.logs
            .iter()
            .any(|(n, name, _)| *n == old && *name == "stale_reset"),
        "the old server was not reset:\n{}",
        sim.trace()
    );
    let status = |sim: &Sim, i: usize| sim.nodes[i].agent.as_ref().unwrap().machine.status();
    let at_t = status(&sim, t);
    let reset = status(&sim, s);
    assert_ne!(at_t.lineage.generation, 0);
    assert_eq!(
        reset.lineage.generation, 0,
        "a reset node holds no lineage until the next announce"
    );
    assert_eq!(
        reset.view_lineage, at_t.lineage,
        "the reset node reports the lineage it rejoined"
    );
    assert_eq!(
        at_t.clients.get(&old),
        Some(&vec![reader]),
        "the server's status lists the reset node's reader"
    );
    let act = at_t
        .activation
        .expect("the serving node shows its activation list");
    assert!(!act.gathering);
    assert_eq!(act.generation, at_t.lineage.generation);
    assert!(
        act.clients.iter().all(|(c, _, _)| *c != reader),
        "the reader's node was cut off at that activation"
    );
    // The next failover gathers the reader from the reset node.
    sim.power_off(t);
    for _ in 0..80 {
        sim.advance_by(500).unwrap();
        sim.drain_all().unwrap();
    }
    let u = sim.serving().expect("a new server");
    let at_u = status(&sim, u);
    let act = at_u.activation.expect("activation list");
    assert_eq!(act.generation, at_u.lineage.generation);
    assert!(
        act.clients.contains(&(reader, old, false)),
        "the reset node's reader is in the gathered list: {act:?}\n{}",
        sim.trace()
    );
    if u != s {
        assert_eq!(
            status(&sim, s).lineage,
            at_u.lineage,
            "adopted the announce"
        );
    }
}
