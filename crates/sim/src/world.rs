//! The world and its scheduler: one seeded RNG picks every step, time is simulated
//! (milliseconds), and everything runs on one thread, so a seed replays a schedule exactly.
//!
//! The agents' outputs are carried out as the daemon's shell does
//! (`crates/agent/src/daemon/volume.rs`): `StartServer` is acknowledged at once and the
//! store opens at `ActivateServer` (journal replay), whose gathered clients become the
//! engine's `expected_snapshot_clients` and whose hold becomes `hold_snapshots_until`;
//! `ExtendLease` moves the serving lease, which the server enforces on its own (the world
//! drops an engine the moment time passes its lease and reports `ServerFailed`);
//! `StopServer` drops the engine at once and confirms `ServerStopped` a little later;
//! `DeclareGone` goes to the engine; `DropClients` resets the node's connections; `Fence`
//! powers the target off (when the attempt succeeds) and answers `FenceResult`.
//! Clients find the server through their own agent's agreed server (as
//! `ServerTarget::Follow`), reconnect and resume their sessions.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpg_glue::memory::MemoryCluster;
use cpg_glue::{Group, GroupSender, NodeId};
use csnap_agent::cluster::{Input, MembershipConfig, Output, VolumeMembership};
use csnap_agent::config::Fencing;
use csnap_blockdev::client::session::{Output as SessionOut, SessionInput};
use csnap_blockdev::client::{snapshot_read_runs, Devices, Which};
use csnap_proto::{ChunkRange, ClientId, ClientMsg, ErrorCode, RequestId, ServerMsg, SnapId};
use csnap_server::engine::{Action, Engine, EngineConfig, Event};
use csnap_server::net::DataPath;
use csnap_server::store::{FormatOptions, Geometry, OpenOptions, SnapState, Store};
use futures::{FutureExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checkers::{self, Check};
use crate::client::{Client, Op, OpKind, OpState, Role};
use crate::disk::{Dev, Rack, SECT};
use crate::network::{Conn, ConnId};
use crate::node::{Agent, Node, Server, Slot};
use crate::reference::{sector_bytes, Reference};
use crate::seed::Seed;

pub const CHUNK: u64 = 4096;
pub const SECTS_PER_CHUNK: u64 = CHUNK / SECT;
pub const KEY: &[u8] = b"csnap simulation cluster key";
const GROUP: &str = "csnap:vol0";
/// Unix seconds at simulated time 0 (engine ticks and snapshot ctimes).
const EPOCH_SECS: u64 = 1_700_000_000;
/// The margin the server adds to leases (`LEASE_MARGIN_SECS`).
pub const MARGIN_MS: u64 = csnap_server::engine::LEASE_MARGIN_SECS * 1000;

/// Knobs of one schedule, derived from its seed.
#[derive(Clone, Debug)]
pub struct Knobs {
    pub nodes: u32,
    pub fencing: Fencing,
    pub steps: u32,
    pub fence_fail: f64,
    pub origin_chunks: u64,
    /// Snapshots alive (not deleted) at once.
    pub max_snapshots: usize,
    /// Snapshot creations asked per schedule.
    pub max_names: usize,
}

/// How a run is made (not part of the seed).
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Print the trace as it happens.
    pub trace: bool,
    /// Let seeds pick `fencing: reset` too (one in three). Off by default so that a seed
    /// replays as it was found; CI's shards 2 and 3 turn it on.
    pub reset: bool,
}

impl Options {
    /// From `CSNAP_SIM_RESET=1`.
    pub fn from_env() -> Options {
        Options {
            trace: false,
            reset: std::env::var("CSNAP_SIM_RESET").is_ok_and(|v| v == "1"),
        }
    }
}

impl Knobs {
    pub fn for_seed(seed: Seed, opts: Options) -> Knobs {
        let fencing = if opts.reset {
            match seed.0 % 3 {
                0 => Fencing::KillNode,
                1 => Fencing::Reset,
                _ => Fencing::Stonith,
            }
        } else if seed.0 & 1 == 0 {
            Fencing::KillNode
        } else {
            Fencing::Stonith
        };
        Knobs {
            nodes: 3 + ((seed.0 / 3) % 3) as u32,
            fencing,
            steps: 260,
            fence_fail: 0.2,
            origin_chunks: 8,
            max_snapshots: 4,
            max_names: 6,
        }
    }
}

/// What a schedule exercised (summed over a run by the caller).
#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    pub activations: u64,
    /// Activations after another server had run (a failover).
    pub failovers: u64,
    /// Failovers whose gate listed snapshot clients.
    pub gathered_failovers: u64,
    /// Gathered clients that reconnected to the new engine (`ResendDone`).
    pub gathered_reconnected: u64,
    pub declared_gone: u64,
    pub partitions: u64,
    pub stale_merges: u64,
    pub fences_done: u64,
    pub resets: u64,
    pub power_offs: u64,
    pub lost_writes: u64,
    pub server_crashes: u64,
    pub lease_expiries: u64,
    pub conn_drops: u64,
    pub frozen_clients: u64,
    pub writes_acked: u64,
    pub writes_checked: u64,
    pub grants: u64,
    pub snapshots_created: u64,
    pub snapshot_reads: u64,
    /// Snapshot writes whose data reached the store.
    pub snapshot_writes: u64,
    /// Snapshot deletions acknowledged by an engine.
    pub snapshots_deleted: u64,
    /// Schedules whose final check saw the space of deleted snapshots come back.
    pub space_back: u64,
    /// Snapshot clients that reconnected holding snapshot write leases (uploaded to the
    /// new server).
    pub leases_uploaded: u64,
    /// Snapshot clients that reconnected holding origin read locks.
    pub locks_uploaded: u64,
    /// Simulated time the final quiet phase took (all schedules; the longest one).
    pub finish_ms: u64,
    pub finish_ms_max: u64,
    pub settled: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.finish_ms_max = self.finish_ms_max.max(o.finish_ms_max);
        macro_rules! sum { ($($f:ident),*) => { $( self.$f += o.$f; )* } }
        sum!(
            activations,
            failovers,
            gathered_failovers,
            gathered_reconnected,
            declared_gone,
            partitions,
            stale_merges,
            fences_done,
            resets,
            power_offs,
            lost_writes,
            server_crashes,
            lease_expiries,
            conn_drops,
            frozen_clients,
            writes_acked,
            writes_checked,
            grants,
            snapshots_created,
            snapshot_reads,
            snapshot_writes,
            snapshots_deleted,
            space_back,
            leases_uploaded,
            locks_uploaded,
            finish_ms,
            settled
        );
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Due {
    ServerStarted,
    ServerStopped,
    Fence { target: NodeId, ok: bool },
}

pub struct World {
    pub seed: Seed,
    pub rng: StdRng,
    pub knobs: Knobs,
    pub now: u64,
    pub cluster: MemoryCluster,
    pub cfg: MembershipConfig,
    pub nodes: Vec<Node>,
    pub rack: Rack,
    pub geometry: Geometry,
    pub conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    pub(crate) due: Vec<(u64, usize, u64, Due)>,
    next_incarnation: u64,
    next_instance: u64,
    next_serial: u64,
    names: u64,
    pub reference: Reference,
    pub stats: Stats,
    trace: VecDeque<String>,
    pub trace_all: bool,
    pub(crate) sides: Option<Vec<Vec<NodeId>>>,
    /// target -> (fencer node, its agent incarnation)
    fencers: BTreeMap<NodeId, (NodeId, u64)>,
    /// Whether a server ever ran (the next activation is then a failover).
    served_before: bool,
}

fn tick_secs(ms: u64) -> u64 {
    EPOCH_SECS + ms / 1000
}

impl World {
    pub fn new(seed: Seed, opts: Options) -> Result<World, String> {
        let knobs = Knobs::for_seed(seed, opts);
        let mut rng = StdRng::seed_from_u64(seed.0);
        let cluster = MemoryCluster::with_nodes(knobs.nodes)
            .map_err(|e| format!("in-memory cluster: {e}"))?;
        let priorities = (1..=knobs.nodes)
            .map(|n| (NodeId(n), rng.gen_range(0..3)))
            .collect();
        let cfg = MembershipConfig {
            priorities,
            fencing: knobs.fencing.clone(),
            server_address: String::new(),
            serving_lease_ms: 8_000,
            lease_margin_ms: MARGIN_MS,
            origin_lease_ms: 10_000,
            fence_timeout_ms: 20_000,
            fence_retry_ms: 3_000,
        };
        let sectors = knobs.origin_chunks * SECTS_PER_CHUNK;
        let mut origin = Vec::with_capacity((sectors * SECT) as usize);
        for s in 0..sectors {
            origin.extend_from_slice(&sector_bytes(0, s));
        }
        let store_len =
            Geometry::smallest_store(CHUNK).map_err(|e| format!("geometry: {e}"))? + 48 * CHUNK;
        let rack = Rack::new(origin, vec![0u8; store_len as usize]);
        let opts = FormatOptions {
            chunk_size: CHUNK,
            origin_size: knobs.origin_chunks * CHUNK,
            now: EPOCH_SECS,
            uuid: Some([9; 16]),
        };
        let geometry = Store::format(&rack.disk(Dev::Store, NodeId(0)), &opts)
            .map_err(|e| format!("format: {e}"))?
            .geometry;
        // The format is durable before the cluster starts.
        csnap_server::store::BlockDevice::flush(&rack.disk(Dev::Store, NodeId(0)))
            .map_err(|e| format!("flush: {e}"))?;
        let nodes = (1..=knobs.nodes).map(|n| Node::new(NodeId(n))).collect();
        let mut w = World {
            seed,
            rng,
            knobs,
            now: 1_000,
            cluster,
            cfg,
            nodes,
            rack,
            geometry,
            conns: BTreeMap::new(),
            next_conn: 1,
            due: Vec::new(),
            next_incarnation: 1,
            next_instance: 1,
            next_serial: 1,
            names: 0,
            reference: Reference::new(sectors),
            stats: Stats::default(),
            trace: VecDeque::new(),
            trace_all: false,
            sides: None,
            fencers: BTreeMap::new(),
            served_before: false,
        };
        for i in 0..w.nodes.len() {
            w.start_agent(i)?;
        }
        Ok(w)
    }

    pub fn note(&mut self, line: String) {
        if self.trace_all {
            eprintln!("{line}");
        }
        self.trace.push_back(line);
        if self.trace.len() > 300 {
            self.trace.pop_front();
        }
    }

    pub fn trace(&self) -> String {
        self.trace.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    pub fn idx(&self, node: NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == node)
    }

    /// Whether nodes `a` and `b` can reach each other over the network now.
    pub fn reachable(&self, a: usize, b: usize) -> bool {
        let (a, b) = (self.nodes[a].id, self.nodes[b].id);
        match &self.sides {
            None => true,
            Some(sides) => sides.iter().any(|s| s.contains(&a) && s.contains(&b)),
        }
    }

    // ---- agents ----

    pub(crate) fn start_agent(&mut self, i: usize) -> Check {
        let id = self.nodes[i].id;
        if self.nodes[i].agent.is_some() || !self.cluster.is_up(id) {
            return Ok(());
        }
        let (Ok(group), Ok(quorum)) = (
            self.cluster.request_join(id, GROUP),
            self.cluster.quorum(id),
        ) else {
            return Ok(());
        };
        let local = group.local();
        let mut cfg = self.cfg.clone();
        cfg.server_address = format!("{}:7788", id.0);
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
            ticked: self.now,
        });
        self.nodes[i].reported.clear();
        // The node's clients start with the agent (they live in its process).
        let inst = self.instance();
        self.nodes[i]
            .clients
            .push(Client::new(Role::Origin, inst, id.0, incarnation, KEY));
        self.note(format!("{} agent {id} starts as {local}", self.now));
        self.report_clients(i)
    }

    fn instance(&mut self) -> u64 {
        let n = self.next_instance;
        self.next_instance += 1;
        n
    }

    /// The agent process dies: its server and its clients (in-process) die with it.
    pub(crate) fn crash_agent(&mut self, i: usize) {
        if self.nodes[i].agent.take().is_some() {
            let id = self.nodes[i].id;
            self.drop_server(i, "agent crashed");
            self.drop_clients(i);
            self.note(format!("{} agent {id} crashes", self.now));
        }
    }

    /// Power off: corosync, agent, server and clients are gone, and the node's unflushed
    /// writes to the shared devices are lost or kept, per write.
    pub(crate) fn power_off(&mut self, i: usize) -> Check {
        let id = self.nodes[i].id;
        self.crash_agent(i);
        if self.cluster.is_up(id) {
            let _ = self.cluster.kill_node(id);
        }
        self.fencers.remove(&id);
        let lost = self.rack.crash(id, &mut self.rng);
        self.stats.power_offs += 1;
        self.stats.lost_writes += lost.iter().filter(|l| l.0 == Dev::Origin).count() as u64;
        self.note(format!(
            "{} node {id} powered off ({} origin versions lost)",
            self.now,
            lost.iter().filter(|l| l.0 == Dev::Origin).count()
        ));
        for (dev, sector, data) in lost {
            // Versions the application wrote carry their tag; others (zero, the server's
            // metadata, copies) are ignored.
            match dev {
                Dev::Origin => {
                    if let Ok(tag) = crate::reference::decode(&data, sector) {
                        self.reference.lost(sector, tag)?;
                    }
                }
                Dev::Store => {
                    if let Some((tag, vol_sector)) = crate::reference::decode_any(&data) {
                        self.reference.snap_lost(vol_sector, tag)?;
                    }
                }
            }
        }
        checkers::durability::origin(&self.rack, &self.reference)
    }

    fn drop_clients(&mut self, i: usize) {
        let clients = std::mem::take(&mut self.nodes[i].clients);
        for c in clients {
            if let Some(conn) = c.conn {
                self.close_server_side(conn);
            }
        }
        self.nodes[i].reported.clear();
    }

    /// Tells the agent the node's snapshot clients when they changed.
    pub(crate) fn report_clients(&mut self, i: usize) -> Check {
        let now = self.nodes[i].readers();
        if now == self.nodes[i].reported || self.nodes[i].agent.is_none() {
            return Ok(());
        }
        self.nodes[i].reported = now.clone();
        self.feed(i, Input::Clients(now))
    }

    /// Hands an input to node `i`'s agent as the daemon's shell does: every wake-up begins
    /// with a tick of the current time. (A "frozen" agent processes no group or quorum
    /// events, but, as in the membership soak, hears its own server's exit and its node's
    /// clients.)
    pub(crate) fn feed(&mut self, i: usize, input: Input) -> Check {
        let now = self.now;
        let Some(agent) = self.nodes[i].agent.as_mut() else {
            return Ok(());
        };
        let quorum_loss = matches!(&input, Input::Quorum(q) if !q.quorate);
        if agent.ticked < now {
            agent.ticked = now;
            if !matches!(input, Input::Tick { .. }) {
                agent.machine.handle(Input::Tick { now_ms: now });
            }
        }
        agent.machine.handle(input);
        self.drain(i)?;
        self.report_clients(i)?;
        if quorum_loss {
            checkers::one_server::after_quorum_loss(&self.nodes[i])?;
        }
        checkers::stale::check(&self.nodes[i])
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
                    if self.trace_all {
                        let delivery = cpg_glue::Delivery {
                            from: agent.machine.local(),
                            payload: bytes.clone(),
                        };
                        if let Ok(m) = csnap_agent::cluster::state::Message::decode(&delivery) {
                            eprintln!("{} {id} mcast {:?}", self.now, m.body);
                        }
                    }
                    let sent = agent.sender.mcast(bytes).now_or_never();
                    if !matches!(sent, Some(Ok(_))) {
                        self.note(format!("{} {id} mcast failed: {sent:?}", self.now));
                    }
                }
                Output::StartServer { generation } => {
                    if !matches!(self.nodes[i].slot, Slot::Off) {
                        return Err(format!("{id}: StartServer while a server is there"));
                    }
                    self.nodes[i].slot = Slot::Ready { generation };
                    self.nodes[i].lease_until = 0;
                    let at = self.now + self.rng.gen_range(0..300);
                    self.due.push((at, i, incarnation, Due::ServerStarted));
                    self.note(format!("{} {id} StartServer g{generation}", self.now));
                }
                Output::ActivateServer {
                    generation,
                    clients,
                    hold_snapshots_ms,
                } => self.activate(i, generation, clients, hold_snapshots_ms)?,
                Output::ExtendLease { until_ms } => {
                    self.nodes[i].lease_until = self.nodes[i].lease_until.max(until_ms);
                }
                Output::StopServer { reason } => {
                    self.note(format!("{} {id} StopServer {reason:?}", self.now));
                    self.drop_server(i, "stopped");
                    let at = self.now + self.rng.gen_range(0..1_000);
                    self.due.push((at, i, incarnation, Due::ServerStopped));
                }
                Output::DeclareGone { client } => {
                    self.note(format!("{} {id} DeclareGone {client}", self.now));
                    self.stats.declared_gone += 1;
                    if let Some(s) = self.nodes[i].server_mut() {
                        s.settled.insert(client);
                    }
                    self.engine_event(i, Event::ClientDeclaredGone { client })?;
                }
                Output::DropClients => {
                    self.stats.resets += 1;
                    self.note(format!("{} {id} DropClients (reset)", self.now));
                    let conns: Vec<ConnId> = self.nodes[i]
                        .clients
                        .iter()
                        .filter_map(|c| c.conn)
                        .collect();
                    for c in conns {
                        self.reset_conn(c)?;
                    }
                }
                Output::Fence {
                    node,
                    attempt,
                    method,
                } => {
                    self.note(format!(
                        "{} {id} fences {node} (attempt {attempt})",
                        self.now
                    ));
                    self.fencers.insert(node, (id, incarnation));
                    // cfg kill_node only reaches a node in the fencer's ring.
                    let reachable = method != Fencing::KillNode
                        || self
                            .cluster
                            .ring(id)
                            .is_some_and(|r| r.members.contains(&node));
                    let ok = !self.rng.gen_bool(self.knobs.fence_fail) && reachable;
                    if self.rng.gen_bool(0.9) {
                        let at = self.now + self.rng.gen_range(0..4_000);
                        self.due
                            .push((at, i, incarnation, Due::Fence { target: node, ok }));
                    }
                }
                Output::Log(event) => {
                    match event.name {
                        "stale_merge" => self.stats.stale_merges += 1,
                        "fence_done" => self.stats.fences_done += 1,
                        "server_chosen" => {
                            let clients = self
                                .nodes
                                .iter()
                                .map(|n| (n.id, n.readers().into_iter().collect()))
                                .collect();
                            let view = self.nodes[i]
                                .agent
                                .as_ref()
                                .map(|a| {
                                    a.machine.status().members.iter().map(|m| m.node).collect()
                                })
                                .unwrap_or_default();
                            self.nodes[i].start_snapshot = Some((clients, view));
                        }
                        _ => {}
                    }
                    self.note(format!(
                        "{} {id} log {} {}",
                        self.now, event.name, event.detail
                    ));
                }
            }
        }
    }

    // ---- servers ----

    fn activate(
        &mut self,
        i: usize,
        generation: u64,
        clients: Vec<ClientId>,
        hold_ms: u64,
    ) -> Check {
        let id = self.nodes[i].id;
        let Slot::Ready { generation: ready } = self.nodes[i].slot else {
            return Err(format!("{id}: ActivateServer without a started server"));
        };
        if ready != generation {
            return Err(format!(
                "{id}: activation g{generation} for a server started as g{ready}"
            ));
        }
        checkers::gate::on_activation(&self.nodes, i, &clients)?;
        self.note(format!(
            "{} {id} Activate g{generation} gate {clients:?} hold {hold_ms} ms",
            self.now
        ));
        if self.now >= self.nodes[i].lease_until {
            // As `net::start`: too late to serve at all.
            self.nodes[i].slot = Slot::Off;
            return self.feed(
                i,
                Input::ServerFailed {
                    detail: "serving lease expired before the activation".into(),
                },
            );
        }
        let store = Store::open(
            Arc::new(self.rack.disk(Dev::Store, id)),
            OpenOptions::default(),
        )
        .map_err(|e| format!("{id}: the store does not open: {e}"))?;
        let rows = store.snapshots();
        let alive: Vec<(SnapId, bool)> = rows
            .iter()
            .map(|r| (r.id, r.state != SnapState::Deleting))
            .collect();
        checkers::deletes::listed(&self.reference, &alive)?;
        let listed: Vec<(SnapId, String)> = rows.into_iter().map(|r| (r.id, r.name)).collect();
        checkers::durability::reported_listed(&mut self.reference, &listed)?;
        let cfg = EngineConfig {
            cluster_key: KEY.to_vec(),
            expected_snapshot_clients: clients.clone(),
            start_time: tick_secs(self.now),
            origin_lease_secs: self.cfg.origin_lease_ms / 1000,
            // As the daemon's shell: the clock's whole second plus the hold rounded up.
            hold_snapshots_until: tick_secs(self.now) + hold_ms.div_ceil(1000),
            orphan_lock_grace_secs: 20,
            ..EngineConfig::default()
        };
        let engine = Engine::new(store, cfg).map_err(|e| format!("{id}: engine: {e}"))?;
        let data = DataPath::new(
            Arc::new(self.rack.disk(Dev::Origin, id)),
            Arc::new(self.rack.disk(Dev::Store, id)),
            self.geometry,
        );
        let serial = self.next_serial;
        self.next_serial += 1;
        self.stats.activations += 1;
        if self.served_before {
            self.stats.failovers += 1;
            if !clients.is_empty() {
                self.stats.gathered_failovers += 1;
            }
        }
        self.served_before = true;
        self.nodes[i].slot = Slot::Running(Box::new(Server {
            engine,
            data,
            generation,
            serial,
            copies: Vec::new(),
            commit_due: false,
            commit_io: None,
            expected: clients.into_iter().collect(),
            settled: BTreeSet::new(),
            fresh: BTreeMap::new(),
            activated_at: self.now,
        }));
        checkers::one_server::check(&self.nodes, self.now)?;
        self.pump(i)
    }

    /// The engine of node `i` is gone (stop, crash, lease): its connections reset.
    pub(crate) fn drop_server(&mut self, i: usize, why: &str) {
        let was = std::mem::replace(&mut self.nodes[i].slot, Slot::Off);
        if let Slot::Running(s) = was {
            self.note(format!(
                "{} {} engine g{} gone ({why})",
                self.now, self.nodes[i].id, s.generation
            ));
            let conns: Vec<ConnId> = self
                .conns
                .iter()
                .filter(|(_, c)| c.server_node == i && c.server_serial == s.serial)
                .map(|(k, _)| *k)
                .collect();
            for c in conns {
                self.close_client_side(c);
            }
        }
    }

    /// The server process crashed on its own (or its lease ran out): the agent hears.
    pub(crate) fn server_failed(&mut self, i: usize, detail: &str) -> Check {
        if self.nodes[i].server().is_none() {
            return Ok(());
        }
        self.drop_server(i, detail);
        self.feed(
            i,
            Input::ServerFailed {
                detail: detail.to_owned(),
            },
        )
    }

    fn engine_event(&mut self, i: usize, event: Event) -> Check {
        let Some(s) = self.nodes[i].server_mut() else {
            return Ok(());
        };
        s.engine.handle(event);
        self.pump(i)
    }

    fn pump(&mut self, i: usize) -> Check {
        let id = self.nodes[i].id;
        loop {
            let Some(s) = self.nodes[i].server_mut() else {
                return Ok(());
            };
            let Some(action) = s.engine.poll_output() else {
                break;
            };
            match action {
                Action::Send { conn, frame } => {
                    let serial = s.serial;
                    if matches!(frame.msg, ServerMsg::Welcome { .. }) {
                        // A fresh session (not resuming) holds nothing: it settles at
                        // once, as the engine's gate counts it.
                        if let Some(client) = s.fresh.remove(&conn) {
                            if s.expected.contains(&client) && s.settled.insert(client) {
                                self.stats.gathered_reconnected += 1;
                            }
                        }
                    }
                    if let ServerMsg::OriginWriteOk { ranges, .. } = &frame.msg {
                        checkers::gate::on_grant(id, s)?;
                        self.stats.grants += 1;
                        let chunks: Vec<u64> =
                            ranges.iter().filter_map(|r| r.chunks()).flatten().collect();
                        checkers::read_locks::on_grant(&self.nodes, id.0, serial, &chunks)?;
                    }
                    if matches!(frame.msg, ServerMsg::SnapshotReadOk { .. }) {
                        if let Some((cn, ci)) = self.conns.get(&conn).and_then(|c| {
                            Some((c.client_node, self.find_client(c.client_node, c.client)?))
                        }) {
                            self.nodes[cn].clients[ci].locks_known_by = Some(serial);
                        }
                    }
                    let what = match frame.msg {
                        ServerMsg::SnapshotReadOk { .. } => Some("SnapshotReadOk"),
                        ServerMsg::SnapshotWriteOk { .. } => Some("SnapshotWriteOk"),
                        _ => None,
                    };
                    if let Some(what) = what {
                        let kind = self.conns.get(&conn).map(|c| c.client.kind);
                        if let Some(csnap_proto::ClientKind::Snapshot { snap }) = kind {
                            checkers::deletes::on_grant(&self.reference, id.0, snap, what)?;
                        }
                    }
                    if let ServerMsg::SnapshotDeleted { snap } = frame.msg {
                        if let Some(rec) = self.reference.snaps.get_mut(&snap) {
                            if !rec.deleted {
                                rec.deleted = true;
                                self.stats.snapshots_deleted += 1;
                                self.note(format!(
                                    "{} {id}'s engine acknowledges the deletion of {snap}",
                                    self.now
                                ));
                            }
                        }
                    }
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.down.push_back(frame);
                    }
                }
                Action::SealFrames { .. } => {}
                Action::Log { level, message, .. } => {
                    if self.trace_all {
                        self.note(format!("{} {id} engine {level:?}: {message}", self.now));
                    }
                }
                Action::Close { conn } => {
                    self.note(format!("{} {id} engine closes conn {conn}", self.now));
                    self.close_client_side(conn);
                }
                Action::Copy { copy, from, to, .. } => s.copies.push((copy, from, to)),
                Action::CopyToOrigin { chunk, .. } => {
                    return Err(format!(
                        "{id}: copy back onto origin chunk {chunk}, but this simulation starts no rollback"
                    ));
                }
                Action::Commit => s.commit_due = true,
                Action::Fatal { error } => {
                    let reason = csnap_server::engine::error_chain(&error);
                    return Err(format!("{id}: the engine failed: {reason}"));
                }
            }
        }
        self.note_creations(i)
    }

    /// Snapshots the store of node `i` created since the last look.
    fn note_creations(&mut self, i: usize) -> Check {
        let Some(s) = self.nodes[i].server() else {
            return Ok(());
        };
        let new: Vec<(SnapId, String)> = s
            .engine
            .store()
            .snapshots()
            .into_iter()
            .filter(|r| !self.reference.snaps.contains_key(&r.id))
            .map(|r| (r.id, r.name))
            .collect();
        for (id, name) in new {
            checkers::snapshots::on_creation(&self.nodes, self.now, MARGIN_MS, id)?;
            self.stats.snapshots_created += 1;
            self.note(format!("{} store creates snapshot {id} ({name})", self.now));
            self.reference.created(id, name);
        }
        Ok(())
    }

    // ---- connections ----

    fn find_client(&self, node: usize, id: ClientId) -> Option<usize> {
        self.nodes[node].clients.iter().position(|c| c.id == id)
    }

    /// The server end learns the connection is gone (if that server still runs).
    fn close_server_side(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let i = c.server_node;
        let live = self.nodes[i]
            .server()
            .is_some_and(|s| s.serial == c.server_serial);
        if live {
            // Errors surface at the next engine step; a disconnect never fails.
            let _ = self.engine_event(i, Event::ClientDisconnected { conn });
        }
    }

    /// The client end learns the connection is gone.
    fn close_client_side(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(ci) = self.find_client(c.client_node, c.client) {
            let cl = &mut self.nodes[c.client_node].clients[ci];
            cl.conn = None;
            cl.conn_serial = None;
            cl.session.handle(SessionInput::Disconnected);
            cl.acks.clear();
            if let Some(t) = &cl.tracker {
                t.invalidate();
            }
        }
    }

    /// A reset seen by both ends.
    pub(crate) fn reset_conn(&mut self, conn: ConnId) -> Check {
        let Some(c) = self.conns.get(&conn) else {
            return Ok(());
        };
        let (sn, serial) = (c.server_node, c.server_serial);
        self.close_client_side(conn);
        if self.nodes[sn].server().is_some_and(|s| s.serial == serial) {
            self.engine_event(sn, Event::ClientDisconnected { conn })?;
        }
        Ok(())
    }

    /// Where client `ci` of node `i` should be connected: its agent's agreed server, when
    /// an engine runs there and the network lets it through.
    fn target(&self, i: usize) -> Option<usize> {
        let (node, _addr) = self.nodes[i].agent.as_ref()?.machine.server()?;
        let s = self.idx(*node)?;
        (self.nodes[s].server().is_some() && self.reachable(i, s)).then_some(s)
    }

    fn connect(&mut self, i: usize, ci: usize) -> Check {
        let Some(s) = self.target(i) else {
            return Ok(());
        };
        let Some(serial) = self.nodes[s].server().map(|x| x.serial) else {
            return Ok(());
        };
        let conn = self.next_conn;
        self.next_conn += 1;
        let cid = self.nodes[i].clients[ci].id;
        self.conns.insert(conn, Conn::new(i, cid, s, serial));
        self.nodes[i].clients[ci].conn = Some(conn);
        self.nodes[i].clients[ci].conn_serial = Some(serial);
        let server_nonce = self.rng.gen();
        self.engine_event(s, Event::ClientConnected { conn, server_nonce })?;
        if self.nodes[i].clients[ci].session.held_leases().total() > 0 {
            self.stats.leases_uploaded += 1;
        }
        if self.nodes[i].clients[ci].session.held_locks().total() > 0 {
            self.stats.locks_uploaded += 1;
        }
        let client_nonce = self.rng.gen();
        let out = {
            self.nodes[i].clients[ci]
                .session
                .handle(SessionInput::Connected { client_nonce });
            self.nodes[i].clients[ci].session.drain_outputs()
        };
        self.outputs(i, ci, out)
    }

    fn deliver_up(&mut self, conn: ConnId) -> Check {
        let Some(c) = self.conns.get_mut(&conn) else {
            return Ok(());
        };
        let Some(frame) = c.up.pop_front() else {
            return Ok(());
        };
        let (s, client, client_node, serial) =
            (c.server_node, c.client, c.client_node, c.server_serial);
        if let ClientMsg::Hello {
            resuming: false,
            client: hello_client,
            ..
        } = &frame.msg
        {
            if let Some(srv) = self.nodes[s].server_mut() {
                srv.fresh.insert(conn, *hello_client);
            }
        }
        if matches!(frame.msg, ClientMsg::UploadLocks { .. }) {
            if let Some(ci) = self.find_client(client_node, client) {
                self.nodes[client_node].clients[ci].locks_known_by = Some(serial);
            }
        }
        if matches!(frame.msg, ClientMsg::ResendDone) {
            if let Some(srv) = self.nodes[s].server_mut() {
                if srv.expected.contains(&client) && srv.settled.insert(client) {
                    self.stats.gathered_reconnected += 1;
                }
            }
        }
        self.engine_event(s, Event::ClientRequest { conn, frame })
    }

    fn deliver_down(&mut self, conn: ConnId) -> Check {
        let Some(c) = self.conns.get_mut(&conn) else {
            return Ok(());
        };
        let Some(frame) = c.down.pop_front() else {
            return Ok(());
        };
        let (i, client) = (c.client_node, c.client);
        let Some(ci) = self.find_client(i, client) else {
            return Ok(());
        };
        if let Some(req) = frame.reply_to {
            // The lease counts from when the answered request was sent.
            let cl = &mut self.nodes[i].clients[ci];
            if matches!(
                frame.msg,
                ServerMsg::OriginWriteOk { .. } | ServerMsg::KeepAliveOk
            ) && cl.lease_ms > 0
            {
                if let Some(sent) = cl.sent.get(&req) {
                    cl.lease_until = cl.lease_until.max(sent + cl.lease_ms);
                }
            }
            cl.sent.remove(&req);
        }
        let out = {
            self.nodes[i].clients[ci]
                .session
                .handle(SessionInput::Received(frame));
            self.nodes[i].clients[ci].session.drain_outputs()
        };
        self.outputs(i, ci, out)
    }

    // ---- clients ----

    fn outputs(&mut self, i: usize, ci: usize, outs: Vec<SessionOut>) -> Check {
        for o in outs {
            let cid = self.nodes[i].clients[ci].id;
            match o {
                SessionOut::Send(frame) => {
                    let now = self.now;
                    let cl = &mut self.nodes[i].clients[ci];
                    cl.sent.entry(frame.id).or_insert(now);
                    if let Some(c) = cl.conn.and_then(|c| self.conns.get_mut(&c)) {
                        c.up.push_back(frame);
                    }
                }
                SessionOut::SealFrames(_) => {}
                SessionOut::Reply { id, msg } => self.reply(i, ci, id, msg)?,
                SessionOut::Notice(ServerMsg::NewSnapshot { snap }) => {
                    let cl = &mut self.nodes[i].clients[ci];
                    match &cl.tracker {
                        Some(t) => {
                            let epoch = t.invalidate();
                            cl.acks.push((epoch, snap));
                        }
                        None => {
                            let out = {
                                cl.session.handle(SessionInput::Notify(
                                    ClientMsg::NewSnapshotAck { snap },
                                ));
                                cl.session.drain_outputs()
                            };
                            self.outputs(i, ci, out)?;
                        }
                    }
                }
                SessionOut::Notice(other) => {
                    return Err(format!("client {cid}: unexpected notice {other:?}"))
                }
                SessionOut::Established {
                    origin_lease_secs, ..
                } => {
                    self.nodes[i].clients[ci].lease_ms = u64::from(origin_lease_secs) * 1000;
                }
                SessionOut::Refused { code, message } => {
                    return Err(format!("client {cid} refused: {code}: {message}"))
                }
                SessionOut::Drop { reason } => {
                    self.note(format!(
                        "{} client {cid} drops its connection: {reason}",
                        self.now
                    ));
                    if let Some(c) = self.nodes[i].clients[ci].conn {
                        self.reset_conn(c)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn submit(&mut self, i: usize, ci: usize, msg: ClientMsg) -> Result<RequestId, String> {
        let (id, out) = {
            let id = self.nodes[i].clients[ci].session.next_request_id();
            self.nodes[i].clients[ci]
                .session
                .handle(SessionInput::Submit(msg));
            (id, self.nodes[i].clients[ci].session.drain_outputs())
        };
        self.nodes[i].clients[ci].sent.insert(id, self.now);
        self.outputs(i, ci, out)?;
        Ok(id)
    }

    fn reply(&mut self, i: usize, ci: usize, id: RequestId, msg: ServerMsg) -> Check {
        let cid = self.nodes[i].clients[ci].id;
        let Some(pos) = self.nodes[i].clients[ci]
            .ops
            .iter()
            .position(|o| matches!(o.state, OpState::Asked(r) if r == id))
        else {
            // Answers to what the library sends on its own (releases, keep-alives).
            return Ok(());
        };
        let op = self.nodes[i].clients[ci].ops.remove(pos);
        match (op.kind, msg) {
            (kind @ OpKind::Write { .. }, ServerMsg::OriginWriteOk { ranges, unique }) => {
                let Some(t) = self.nodes[i].clients[ci].tracker.clone() else {
                    return Err(format!("{cid}: a grant for a client without a tracker"));
                };
                t.renew(Instant::now() + Duration::from_secs(24 * 3600));
                let chunks = ranges.iter().filter_map(|r| r.chunks()).flatten();
                let guard = t.granted(chunks, unique);
                self.nodes[i].clients[ci].ops.push(Op {
                    kind,
                    state: OpState::Granted(guard),
                });
            }
            (OpKind::Create { name }, ServerMsg::SnapshotCreated { info }) => {
                match self.reference.snaps.get_mut(&info.id) {
                    Some(rec) if rec.name == name => rec.reported = true,
                    other => {
                        return Err(format!(
                        "snapshot {name} reported created as {:?}, but the store created {other:?}",
                        info.id
                    ))
                    }
                }
            }
            (
                OpKind::Create { .. },
                ServerMsg::Error {
                    code: ErrorCode::StoreFull,
                    ..
                },
            ) => {}
            (
                kind @ OpKind::Read { .. },
                ServerMsg::SnapshotReadOk {
                    store,
                    origin_locked,
                },
            ) => self.nodes[i].clients[ci].ops.push(Op {
                kind,
                state: OpState::Located {
                    store,
                    origin_locked,
                },
            }),
            // A snapshot whose deletion was asked, or (writes) a full store: the
            // application sees an error. Any other refusal is a finding.
            (
                OpKind::Read { .. } | OpKind::SnapWrite { .. },
                ServerMsg::Error { code, message },
            ) if self.refusal_ok(i, ci, code) => {
                self.note(format!(
                    "{} client {cid} refused: {code}: {message}",
                    self.now
                ));
            }
            (kind @ OpKind::SnapWrite { .. }, ServerMsg::SnapshotWriteOk { addrs }) => {
                let at = self.now;
                self.nodes[i].clients[ci].ops.push(Op {
                    kind,
                    state: OpState::Leased { addrs, at },
                })
            }
            (OpKind::Delete { .. }, ServerMsg::SnapshotDeleted { .. }) => {}
            (
                OpKind::Delete { .. },
                ServerMsg::Error {
                    code: ErrorCode::NoSuchSnapshot,
                    ..
                },
            ) => {}
            (_, other) => return Err(format!("client {cid} got an unexpected answer {other:?}")),
        }
        Ok(())
    }

    /// Whether a snapshot read or write may be refused with `code`: its snapshot's
    /// deletion was asked, or the store is full (writes need space; a full store may
    /// invalidate snapshots).
    fn refusal_ok(&self, i: usize, ci: usize, code: ErrorCode) -> bool {
        let Role::Reader { snap } = self.nodes[i].clients[ci].role else {
            return false;
        };
        let asked = self
            .reference
            .snaps
            .get(&snap)
            .is_none_or(|r| r.delete_asked);
        match code {
            ErrorCode::NoSuchSnapshot => asked,
            ErrorCode::StoreFull | ErrorCode::SnapshotInvalid => true,
            _ => false,
        }
    }

    fn devices(&self, i: usize) -> Devices {
        let id = self.nodes[i].id;
        Devices::new(
            Arc::new(self.rack.disk(Dev::Origin, id)),
            Arc::new(self.rack.disk(Dev::Store, id)),
        )
    }

    fn start_write(&mut self, i: usize, ci: usize) -> Check {
        let n = self.reference.origin.len() as u64;
        let first = if self.rng.gen_bool(0.5) {
            self.rng.gen_range(0..2 * SECTS_PER_CHUNK)
        } else {
            self.rng.gen_range(0..n)
        };
        let count = self.rng.gen_range(1..=12).min(n - first);
        let fua = self.rng.gen_bool(0.3);
        let tag = self.reference.tag();
        let kind = OpKind::Write {
            first_sector: first,
            sectors: count,
            fua,
            tag,
        };
        let first_chunk = first / SECTS_PER_CHUNK;
        let last_chunk = (first + count - 1) / SECTS_PER_CHUNK;
        let cl = &self.nodes[i].clients[ci];
        // As `Volume::write_origin`: through the cache while the lease runs and every
        // chunk is promised unique; the data write follows at once.
        if self.now < cl.lease_until {
            if let Some(guard) = cl
                .tracker
                .clone()
                .and_then(|t| t.try_cached(first_chunk..last_chunk + 1))
            {
                self.nodes[i].clients[ci].ops.push(Op {
                    kind,
                    state: OpState::Granted(guard),
                });
                let pos = self.nodes[i].clients[ci].ops.len() - 1;
                return self.do_write(i, ci, pos);
            }
        }
        let range = ChunkRange::new(first_chunk, (last_chunk - first_chunk + 1) as u32);
        let id = self.submit(
            i,
            ci,
            ClientMsg::QueryWrite {
                ranges: vec![range],
            },
        )?;
        self.nodes[i].clients[ci].ops.push(Op {
            kind,
            state: OpState::Asked(id),
        });
        Ok(())
    }

    /// Carries out a granted origin write, or fails it when the client's lease (plus the
    /// margin for a write already under way) ran out.
    fn do_write(&mut self, i: usize, ci: usize, pos: usize) -> Check {
        let op = self.nodes[i].clients[ci].ops.remove(pos);
        let OpKind::Write {
            first_sector,
            sectors,
            fua,
            tag,
        } = op.kind
        else {
            return Ok(());
        };
        if self.now >= self.nodes[i].clients[ci].lease_until + MARGIN_MS {
            return Ok(());
        }
        let mut data = Vec::with_capacity((sectors * SECT) as usize);
        for s in first_sector..first_sector + sectors {
            data.extend_from_slice(&sector_bytes(tag, s));
        }
        let result = self
            .devices(i)
            .write_blocking(Which::Origin, first_sector * SECT, &data, fua);
        drop(op.state);
        result.map_err(|e| format!("origin write failed: {e}"))?;
        self.reference.written(tag, first_sector, sectors, fua);
        self.stats.writes_acked += u64::from(fua);
        self.nodes[i].clients[ci]
            .unflushed
            .push((tag, first_sector, sectors));
        Ok(())
    }

    fn do_flush(&mut self, i: usize, ci: usize) -> Check {
        let devs = self.devices(i);
        devs.sync_blocking(Which::Origin)
            .and(devs.sync_blocking(Which::Store))
            .map_err(|e| format!("flush failed: {e}"))?;
        let role = self.nodes[i].clients[ci].role;
        for (tag, first, n) in std::mem::take(&mut self.nodes[i].clients[ci].unflushed) {
            match role {
                Role::Reader { snap } => self.reference.snap_promise(snap, tag, first, n),
                _ => self.reference.promise(tag, first, n),
            }
            self.stats.writes_acked += 1;
        }
        Ok(())
    }

    fn do_read(&mut self, i: usize, ci: usize, pos: usize) -> Check {
        let op = self.nodes[i].clients[ci].ops.remove(pos);
        let (
            OpKind::Read {
                offset,
                len,
                window,
            },
            OpState::Located {
                store,
                origin_locked,
            },
        ) = (op.kind, op.state)
        else {
            return Ok(());
        };
        let Role::Reader { snap } = self.nodes[i].clients[ci].role else {
            return Ok(());
        };
        let devs = self.devices(i);
        let mut data = Vec::new();
        for (which, at, n) in snapshot_read_runs(CHUNK, &store, offset, len) {
            let b = devs
                .read_blocking(which, at, n as usize)
                .map_err(|e| format!("snapshot read failed: {e}"))?;
            data.extend_from_slice(&b);
        }
        self.stats.snapshot_reads += 1;
        checkers::snapshots::on_read(&self.reference, snap, offset, &data, Some(&window)).map_err(
            |e| {
                format!(
                    "{e} (read by {} on {})",
                    self.nodes[i].clients[ci].id, self.nodes[i].id
                )
            },
        )?;
        if !store.is_empty() {
            let mut chunks: Vec<u64> = store.iter().map(|a| a.chunk).collect();
            chunks.sort_unstable();
            let session = &mut self.nodes[i].clients[ci].session;
            session.handle(SessionInput::Notify(ClientMsg::ReleaseStoreReads {
                snap,
                ranges: csnap_proto::ChunkRange::coalesce(chunks),
            }));
            let out = session.drain_outputs();
            self.outputs(i, ci, out)?;
        }
        if !origin_locked.is_empty() {
            self.submit(
                i,
                ci,
                ClientMsg::FinishSnapshotRead {
                    snap,
                    ranges: origin_locked,
                },
            )?;
        }
        Ok(())
    }

    fn start_read(&mut self, i: usize, ci: usize) -> Check {
        let Role::Reader { snap } = self.nodes[i].clients[ci].role else {
            return Ok(());
        };
        let n = self.reference.origin.len() as u64;
        // Half the reads go where half the writes go (the first two chunks), so read locks
        // and origin writes meet.
        let first = if self.rng.gen_bool(0.5) {
            self.rng.gen_range(0..2 * SECTS_PER_CHUNK)
        } else {
            self.rng.gen_range(0..n)
        };
        let count = self.rng.gen_range(1..=24).min(n - first);
        let range = ChunkRange::new(
            first / SECTS_PER_CHUNK,
            ((first + count - 1) / SECTS_PER_CHUNK - first / SECTS_PER_CHUNK + 1) as u32,
        );
        let id = self.submit(
            i,
            ci,
            ClientMsg::QuerySnapshotRead {
                snap,
                ranges: vec![range],
            },
        )?;
        let window = self.reference.read_window(snap, first, count);
        self.nodes[i].clients[ci].ops.push(Op {
            kind: OpKind::Read {
                offset: first * SECT,
                len: (count * SECT) as u32,
                window,
            },
            state: OpState::Asked(id),
        });
        Ok(())
    }

    /// A snapshot client asks to write its snapshot (`Volume::write_snapshot`).
    fn start_snap_write(&mut self, i: usize, ci: usize) -> Check {
        let Role::Reader { snap } = self.nodes[i].clients[ci].role else {
            return Ok(());
        };
        let n = self.reference.origin.len() as u64;
        let first = if self.rng.gen_bool(0.5) {
            self.rng.gen_range(0..2 * SECTS_PER_CHUNK)
        } else {
            self.rng.gen_range(0..n)
        };
        let count = self.rng.gen_range(1..=12).min(n - first);
        let fua = self.rng.gen_bool(0.3);
        let tag = self.reference.tag();
        let first_chunk = first / SECTS_PER_CHUNK;
        let last_chunk = (first + count - 1) / SECTS_PER_CHUNK;
        let range = ChunkRange::new(first_chunk, (last_chunk - first_chunk + 1) as u32);
        let id = self.submit(
            i,
            ci,
            ClientMsg::SnapshotWrite {
                snap,
                ranges: vec![range],
            },
        )?;
        self.nodes[i].clients[ci].ops.push(Op {
            kind: OpKind::SnapWrite {
                first_sector: first,
                sectors: count,
                fua,
                tag,
            },
            state: OpState::Asked(id),
        });
        Ok(())
    }

    /// Carries out a granted snapshot write: the data to the store chunks the server gave
    /// (within the window after the grant), then the leases are released.
    fn do_snap_write(&mut self, i: usize, ci: usize, pos: usize) -> Check {
        let op = self.nodes[i].clients[ci].ops.remove(pos);
        let (
            OpKind::SnapWrite {
                first_sector,
                sectors,
                fua,
                tag,
            },
            OpState::Leased { addrs, at },
        ) = (op.kind, op.state)
        else {
            return Ok(());
        };
        let Role::Reader { snap } = self.nodes[i].clients[ci].role else {
            return Ok(());
        };
        if self.now <= at + crate::client::SNAP_WRITE_WINDOW_MS {
            // One write per chunk, to its store chunk (as `Volume::scatter`).
            let devs = self.devices(i);
            let end = first_sector + sectors;
            let mut s = first_sector;
            while s < end {
                let chunk = s / SECTS_PER_CHUNK;
                let upto = end.min((chunk + 1) * SECTS_PER_CHUNK);
                let Some(a) = addrs.iter().find(|a| a.chunk == chunk) else {
                    return Err(format!(
                        "SnapshotWriteOk for {snap} gave no store chunk for chunk {chunk}: {addrs:?}"
                    ));
                };
                let mut data = Vec::with_capacity(((upto - s) * SECT) as usize);
                for x in s..upto {
                    data.extend_from_slice(&sector_bytes(tag, x));
                }
                let at = a.store_chunk * CHUNK + (s % SECTS_PER_CHUNK) * SECT;
                devs.write_blocking(Which::Store, at, &data, false)
                    .map_err(|e| format!("snapshot write failed: {e}"))?;
                s = upto;
            }
            if fua {
                devs.sync_blocking(Which::Store)
                    .map_err(|e| format!("flush failed: {e}"))?;
            }
            self.reference
                .snap_written(snap, tag, first_sector, sectors, fua);
            self.stats.snapshot_writes += 1;
            self.stats.writes_acked += u64::from(fua);
            self.nodes[i].clients[ci]
                .unflushed
                .push((tag, first_sector, sectors));
        }
        let mut chunks: Vec<u64> = addrs.iter().map(|a| a.chunk).collect();
        chunks.sort_unstable();
        if !chunks.is_empty() {
            self.submit(
                i,
                ci,
                ClientMsg::FinishSnapshotWrite {
                    snap,
                    ranges: ChunkRange::coalesce(chunks),
                },
            )?;
        }
        Ok(())
    }

    /// A snapshot reader attaches on node `i` (for a reported, live snapshot), or one
    /// detaches.
    fn reader_change(&mut self, i: usize) -> Check {
        if self.nodes[i].agent.is_none() {
            return Ok(());
        }
        let readers = self.nodes[i].readers();
        if !readers.is_empty() && self.rng.gen_bool(0.4) {
            // Readers of a deleted snapshot go first (as `Volume::delete_snapshot` drops them).
            let deleted = |c: &Client| match c.role {
                Role::Reader { snap } => self.reference.snaps.get(&snap).is_some_and(|r| r.deleted),
                _ => false,
            };
            let ci = self.nodes[i]
                .clients
                .iter()
                .position(|c| matches!(c.role, Role::Reader { .. }) && deleted(c))
                .or_else(|| {
                    self.nodes[i]
                        .clients
                        .iter()
                        .position(|c| matches!(c.role, Role::Reader { .. }))
                });
            if let Some(ci) = ci {
                let busy = self.nodes[i].clients[ci]
                    .ops
                    .iter()
                    .any(|o| matches!(o.state, OpState::Located { .. } | OpState::Leased { .. }));
                if !busy {
                    let c = self.nodes[i].clients.remove(ci);
                    if let Some(conn) = c.conn {
                        self.reset_conn(conn)?;
                        self.conns.remove(&conn);
                    }
                    self.note(format!(
                        "{} reader {} on {} detaches",
                        self.now, c.id, self.nodes[i].id
                    ));
                }
            }
        } else if readers.len() < 2 {
            let reported: Vec<SnapId> = self
                .reference
                .snaps
                .values()
                .filter(|r| r.reported && !r.deleted)
                .map(|r| r.id)
                .collect();
            if reported.is_empty() {
                return Ok(());
            }
            let snap = reported[self.rng.gen_range(0..reported.len())];
            let inst = self.instance();
            let inc = self.nodes[i].agent.as_ref().map_or(0, |a| a.incarnation);
            let c = Client::new(Role::Reader { snap }, inst, self.nodes[i].id.0, inc, KEY);
            self.note(format!(
                "{} reader {} on {} attaches to {snap}",
                self.now, c.id, self.nodes[i].id
            ));
            self.nodes[i].clients.push(c);
        }
        self.report_clients(i)
    }

    /// The admin client on node `i` deletes a snapshot (sometimes) or creates one.
    fn admin_step(&mut self, i: usize) -> Check {
        if self.rng.gen_bool(0.2) {
            self.start_delete(i)
        } else {
            self.start_create(i)
        }
    }

    /// The admin client of node `i` (made on first use).
    fn admin(&mut self, i: usize) -> usize {
        match self.nodes[i]
            .clients
            .iter()
            .position(|c| c.role == Role::Admin)
        {
            Some(ci) => ci,
            None => {
                let inst = self.instance();
                let inc = self.nodes[i].agent.as_ref().map_or(0, |a| a.incarnation);
                let c = Client::new(Role::Admin, inst, self.nodes[i].id.0, inc, KEY);
                self.nodes[i].clients.push(c);
                self.nodes[i].clients.len() - 1
            }
        }
    }

    fn start_create(&mut self, i: usize) -> Check {
        let alive = self.reference.snaps.values().filter(|r| !r.deleted).count();
        if self.names as usize >= self.knobs.max_names || alive >= self.knobs.max_snapshots {
            return Ok(());
        }
        let ci = self.admin(i);
        if !self.nodes[i].clients[ci].ops.is_empty() {
            return Ok(());
        }
        self.names += 1;
        let name = format!("s{}", self.names);
        let token = self.rng.gen_range(1..1u64 << 40);
        let id = self.submit(
            i,
            ci,
            ClientMsg::CreateSnapshot {
                name: name.clone(),
                token,
            },
        )?;
        self.nodes[i].clients[ci].ops.push(Op {
            kind: OpKind::Create { name },
            state: OpState::Asked(id),
        });
        Ok(())
    }

    /// Deletes a snapshot the application was told of (by id, as `Volume::delete_snapshot`
    /// after its lookup).
    fn start_delete(&mut self, i: usize) -> Check {
        let known: Vec<SnapId> = self
            .reference
            .snaps
            .values()
            .filter(|r| r.reported && !r.deleted)
            .map(|r| r.id)
            .collect();
        if known.is_empty() {
            return Ok(());
        }
        let snap = known[self.rng.gen_range(0..known.len())];
        let ci = self.admin(i);
        if !self.nodes[i].clients[ci].ops.is_empty() {
            return Ok(());
        }
        self.note(format!(
            "{} admin on {} deletes {snap}",
            self.now, self.nodes[i].id
        ));
        if let Some(rec) = self.reference.snaps.get_mut(&snap) {
            rec.delete_asked = true;
        }
        let id = self.submit(i, ci, ClientMsg::DeleteSnapshot { snap })?;
        self.nodes[i].clients[ci].ops.push(Op {
            kind: OpKind::Delete { snap },
            state: OpState::Asked(id),
        });
        Ok(())
    }

    fn ack(&mut self, i: usize, ci: usize) -> Check {
        let Some(t) = self.nodes[i].clients[ci].tracker.clone() else {
            return Ok(());
        };
        let mut ready = Vec::new();
        self.nodes[i].clients[ci].acks.retain(|(epoch, snap)| {
            let drained = t.drained(*epoch).now_or_never().is_some();
            if drained {
                ready.push(*snap);
            }
            !drained
        });
        for snap in ready {
            let session = &mut self.nodes[i].clients[ci].session;
            session.handle(SessionInput::Notify(ClientMsg::NewSnapshotAck { snap }));
            let out = session.drain_outputs();
            self.outputs(i, ci, out)?;
        }
        Ok(())
    }

    // ---- the scheduler ----

    /// One step chosen by the RNG among the enabled ones.
    pub fn step(&mut self) -> Check {
        #[derive(Clone, Copy)]
        enum S {
            Agent(usize),
            Advance,
            Up(ConnId),
            Down(ConnId),
            Copy(usize, usize),
            Commit(usize),
            CommitIo(usize),
            Client(usize, usize),
            Reader(usize),
            Create(usize),
            Fault,
        }
        let mut choices: Vec<(u32, S)> = Vec::new();
        for i in 0..self.nodes.len() {
            if self.nodes[i].agent.is_some() {
                choices.push((6, S::Agent(i)));
                choices.push((1, S::Reader(i)));
                choices.push((1, S::Create(i)));
                for ci in 0..self.nodes[i].clients.len() {
                    if !self.nodes[i].clients[ci].frozen(self.now) {
                        choices.push((3, S::Client(i, ci)));
                    }
                }
            }
            if let Some(s) = self.nodes[i].server() {
                for k in 0..s.copies.len() {
                    choices.push((3, S::Copy(i, k)));
                }
                if s.commit_due {
                    choices.push((3, S::Commit(i)));
                }
                if s.commit_io.is_some() {
                    choices.push((3, S::CommitIo(i)));
                }
            }
        }
        for (id, c) in &self.conns {
            if c.delayed_until > self.now || !self.reachable(c.client_node, c.server_node) {
                continue;
            }
            if !c.up.is_empty() {
                choices.push((4, S::Up(*id)));
            }
            if !c.down.is_empty() {
                choices.push((4, S::Down(*id)));
            }
        }
        choices.push((5, S::Advance));
        choices.push((2, S::Fault));
        let total: u32 = choices.iter().map(|(w, _)| *w).sum();
        let mut pick = self.rng.gen_range(0..total);
        let mut chosen = S::Advance;
        for (w, s) in &choices {
            if pick < *w {
                chosen = *s;
                break;
            }
            pick -= *w;
        }
        match chosen {
            S::Agent(i) => {
                for _ in 0..self.rng.gen_range(1..=4) {
                    self.deliver_one(i)?;
                }
            }
            S::Advance => {
                let ms = if self.rng.gen_bool(0.3) {
                    self.rng.gen_range(0..2_500)
                } else {
                    self.rng.gen_range(0..300)
                };
                self.advance_by(ms)?;
            }
            S::Up(c) => self.deliver_up(c)?,
            S::Down(c) => self.deliver_down(c)?,
            S::Copy(i, k) => {
                let Some(s) = self.nodes[i].server_mut() else {
                    return Ok(());
                };
                let (copy, from, to) = s.copies.remove(k);
                if let Err(e) = s.data.copy(from, to) {
                    return Err(format!("copy failed: {e}"));
                }
                self.engine_event(
                    i,
                    Event::CopyDone {
                        copy,
                        result: Ok(()),
                    },
                )?;
            }
            S::Commit(i) => {
                if let Some(s) = self.nodes[i].server_mut() {
                    s.commit_due = false;
                    s.commit_io = s.engine.begin_commit();
                }
                self.pump(i)?;
            }
            S::CommitIo(i) => {
                if let Some(s) = self.nodes[i].server_mut() {
                    if let Some(io) = s.commit_io.take() {
                        io.run();
                        s.engine.finish_commit();
                    }
                }
                self.pump(i)?;
            }
            S::Client(i, ci) => self.client_step(i, ci)?,
            S::Reader(i) => self.reader_change(i)?,
            S::Create(i) => self.admin_step(i)?,
            S::Fault => self.fault()?,
        }
        checkers::one_server::check(&self.nodes, self.now)
    }

    /// One thing a client does.
    fn client_step(&mut self, i: usize, ci: usize) -> Check {
        let now = self.now;
        // Follow the agreed server: a connection to another node is left.
        let target = self.target(i);
        let cl = &self.nodes[i].clients[ci];
        if let Some(conn) = cl.conn {
            let at = self.conns.get(&conn).map(|c| c.server_node);
            let agreed = self.nodes[i]
                .agent
                .as_ref()
                .and_then(|a| a.machine.server())
                .and_then(|(n, _)| self.idx(*n));
            if agreed.is_some() && at != agreed {
                self.note(format!(
                    "{now} client {} leaves {at:?} for {agreed:?}",
                    cl.id
                ));
                return self.reset_conn(conn);
            }
        }
        // Grants that can no longer be used fail (the application sees an error).
        let margin_over = now >= cl.lease_until + MARGIN_MS;
        if margin_over {
            self.nodes[i].clients[ci]
                .ops
                .retain(|o| !matches!(o.state, OpState::Granted(_)));
        }
        let cl = &self.nodes[i].clients[ci];
        if cl.conn.is_none() {
            let drained = cl
                .tracker
                .as_ref()
                .is_none_or(|t| t.stats().writes_in_flight == 0);
            if drained && target.is_some() {
                return self.connect(i, ci);
            }
            // Requests queue in the session while disconnected.
        }
        let granted: Vec<usize> = cl
            .ops
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o.state, OpState::Granted(_)))
            .map(|(p, _)| p)
            .collect();
        let located: Vec<usize> = cl
            .ops
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o.state, OpState::Located { .. }))
            .map(|(p, _)| p)
            .collect();
        match cl.role {
            Role::Origin => {
                if !granted.is_empty() && self.rng.gen_bool(0.6) {
                    let p = granted[self.rng.gen_range(0..granted.len())];
                    return self.do_write(i, ci, p);
                }
                if !cl.acks.is_empty() && self.rng.gen_bool(0.5) {
                    return self.ack(i, ci);
                }
                if self.keepalive(i, ci)? {
                    return Ok(());
                }
                let cl = &self.nodes[i].clients[ci];
                if !cl.unflushed.is_empty() && self.rng.gen_bool(0.2) {
                    return self.do_flush(i, ci);
                }
                if cl.ops.len() < 3 {
                    return self.start_write(i, ci);
                }
                Ok(())
            }
            Role::Reader { .. } => {
                // A located read may take a while (its origin read locks are held across
                // whatever happens meanwhile, failovers included).
                if !located.is_empty() && self.rng.gen_bool(0.3) {
                    return self.do_read(i, ci, located[0]);
                }
                if let Some(p) = cl
                    .ops
                    .iter()
                    .position(|o| matches!(o.state, OpState::Leased { .. }))
                {
                    return self.do_snap_write(i, ci, p);
                }
                if !cl.unflushed.is_empty() && self.rng.gen_bool(0.2) {
                    return self.do_flush(i, ci);
                }
                if cl.ops.len() < 2 {
                    if self.rng.gen_bool(0.4) {
                        return self.start_snap_write(i, ci);
                    }
                    return self.start_read(i, ci);
                }
                Ok(())
            }
            Role::Admin => Ok(()),
        }
    }

    /// An origin client renews its write lease three times per lease (as `MetaConnection`).
    fn keepalive(&mut self, i: usize, ci: usize) -> Result<bool, String> {
        let now = self.now;
        let cl = &self.nodes[i].clients[ci];
        let due = cl.role == Role::Origin
            && cl.lease_ms > 0
            && cl.conn.is_some()
            && now >= cl.last_keepalive + cl.lease_ms / 3;
        if due {
            self.nodes[i].clients[ci].last_keepalive = now;
            self.submit(i, ci, ClientMsg::KeepAlive)?;
        }
        Ok(due)
    }

    /// Lets node `i`'s agent process one pending group or quorum event.
    pub(crate) fn deliver_one(&mut self, i: usize) -> Check {
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

    /// Everything pending on every agent's streams (bounded).
    pub fn drain_agents(&mut self) -> Check {
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
        Err("membership events never stopped flowing".into())
    }

    /// Time passes: serving leases run out, due results arrive, everyone ticks.
    pub fn advance_by(&mut self, ms: u64) -> Check {
        self.now += ms;
        let now = self.now;
        for i in 0..self.nodes.len() {
            if self.nodes[i].server().is_some() && now >= self.nodes[i].lease_until {
                self.stats.lease_expiries += 1;
                self.server_failed(i, "serving lease expired")?;
            }
        }
        let mut due = Vec::new();
        let frozen: Vec<bool> = self.nodes.iter().map(|n| n.frozen_until > now).collect();
        self.due.retain(|d| {
            if d.0 <= now && !frozen[d.1] {
                due.push(d.clone());
                false
            } else {
                true
            }
        });
        due.sort_by_key(|d| d.0);
        for (_, i, incarnation, what) in due {
            self.run_due(i, incarnation, what)?;
        }
        for i in 0..self.nodes.len() {
            if let Some(s) = self.nodes[i].server_mut() {
                s.engine.handle(Event::Tick {
                    now: tick_secs(now),
                });
                self.pump(i)?;
            }
            if self.nodes[i].frozen_until <= now {
                self.feed(i, Input::Tick { now_ms: now })?;
            }
        }
        Ok(())
    }

    fn run_due(&mut self, i: usize, incarnation: u64, what: Due) -> Check {
        let alive = self.nodes[i]
            .agent
            .as_ref()
            .is_some_and(|a| a.incarnation == incarnation);
        if !alive {
            return Ok(());
        }
        match what {
            Due::ServerStarted => {
                if matches!(self.nodes[i].slot, Slot::Ready { .. }) {
                    self.feed(i, Input::ServerStarted)?;
                }
            }
            Due::ServerStopped => {
                if matches!(self.nodes[i].slot, Slot::Ready { .. }) {
                    self.nodes[i].slot = Slot::Off;
                }
                if matches!(self.nodes[i].slot, Slot::Off) {
                    self.feed(i, Input::ServerStopped)?;
                }
            }
            Due::Fence { target, ok } => {
                if ok {
                    if let Some(t) = self.idx(target) {
                        self.power_off(t)?;
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

    // ---- the start and the end of a schedule ----

    /// Before faults: time passes until the first server serves (the agents' history
    /// becomes certain after one stop wait) and the clients are connected.
    pub fn warm_up(&mut self) -> Check {
        for _ in 0..100 {
            self.drain_agents()?;
            self.advance_by(1_000)?;
            self.drain_agents()?;
            for _ in 0..4 {
                self.quiet_step()?;
            }
            if checkers::gather_ends::converged(&self.nodes).is_ok() {
                break;
            }
        }
        checkers::gather_ends::converged(&self.nodes)
            .map_err(|e| format!("no server after warming up: {e}"))?;
        // A first snapshot, and readers of it on some nodes: what a failover's gather is
        // about.
        let i = self.rng.gen_range(0..self.nodes.len());
        self.start_create(i)?;
        for _ in 0..100 {
            self.quiet_step()?;
            if self.reference.snaps.values().any(|r| r.reported) {
                break;
            }
            self.drain_agents()?;
            self.advance_by(300)?;
        }
        for i in 0..self.nodes.len() {
            if self.rng.gen_bool(0.6) {
                self.reader_change(i)?;
            }
        }
        Ok(())
    }

    /// Heal, power everything on, stop faults, let time pass until the failover finished
    /// (or give up with the gather checker's finding), then the final checks.
    pub fn settle(&mut self) -> Check {
        self.knobs.fence_fail = 0.0;
        self.cluster.heal();
        self.sides = None;
        for n in &mut self.nodes {
            n.frozen_until = 0;
            n.lag_until = 0;
            for c in &mut n.clients {
                c.frozen_until = 0;
            }
        }
        for c in self.conns.values_mut() {
            c.delayed_until = 0;
        }
        let mut last = Err("not tried".to_string());
        for _ in 0..300 {
            for i in 0..self.nodes.len() {
                let id = self.nodes[i].id;
                if !self.cluster.is_up(id) {
                    let _ = self.cluster.restart_node(id);
                }
                self.start_agent(i)?;
            }
            self.drain_agents()?;
            self.advance_by(500)?;
            self.drain_agents()?;
            // Clients and the server work off what is pending.
            for _ in 0..8 {
                self.quiet_step()?;
            }
            last = checkers::gather_ends::converged(&self.nodes);
            if last.is_ok() {
                break;
            }
        }
        last?;
        self.stats.settled += 1;
        self.final_checks()
    }

    /// A step without faults or new work: frames, copies, commits, reconnections, acks.
    fn quiet_step(&mut self) -> Check {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for c in conns {
            self.deliver_up(c)?;
            self.deliver_down(c)?;
        }
        for i in 0..self.nodes.len() {
            if let Some(s) = self.nodes[i].server_mut() {
                if let Some((copy, from, to)) = s.copies.pop() {
                    if let Err(e) = s.data.copy(from, to) {
                        return Err(format!("copy failed: {e}"));
                    }
                    self.engine_event(
                        i,
                        Event::CopyDone {
                            copy,
                            result: Ok(()),
                        },
                    )?;
                }
            }
            if self.nodes[i]
                .server()
                .is_some_and(|s| s.commit_due || s.commit_io.is_some())
            {
                if let Some(s) = self.nodes[i].server_mut() {
                    if let Some(io) = s.commit_io.take() {
                        io.run();
                        s.engine.finish_commit();
                    } else {
                        s.commit_due = false;
                        s.commit_io = s.engine.begin_commit();
                    }
                }
                self.pump(i)?;
            }
            for ci in 0..self.nodes[i].clients.len() {
                let cl = &self.nodes[i].clients[ci];
                if cl.conn.is_none() {
                    let drained = cl
                        .tracker
                        .as_ref()
                        .is_none_or(|t| t.stats().writes_in_flight == 0);
                    if drained {
                        self.connect(i, ci)?;
                    }
                } else {
                    if !cl.acks.is_empty() {
                        self.ack(i, ci)?;
                    }
                    self.keepalive(i, ci)?;
                }
                // Snapshot I/O under way finishes (its leases and store reads are released).
                let cl = &self.nodes[i].clients[ci];
                if let Some(p) = cl.ops.iter().position(|o| {
                    matches!(o.state, OpState::Leased { .. } | OpState::Located { .. })
                }) {
                    if matches!(cl.ops[p].state, OpState::Leased { .. }) {
                        self.do_snap_write(i, ci, p)?;
                    } else {
                        self.do_read(i, ci, p)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// After settling: the origin holds every promised write, and every live snapshot of
    /// the serving store reads as the origin did at its creation (every chunk, through
    /// the store's own mapping).
    fn final_checks(&mut self) -> Check {
        self.finish()?;
        checkers::durability::origin(&self.rack, &self.reference)?;
        let Some(i) = (0..self.nodes.len()).find(|&i| self.nodes[i].server().is_some()) else {
            return Err("no engine after settling".into());
        };
        let rows = match self.nodes[i].server() {
            Some(s) => s.engine.store().snapshots(),
            None => Vec::new(),
        };
        let listed: Vec<(SnapId, String)> = rows.iter().map(|r| (r.id, r.name.clone())).collect();
        checkers::durability::reported_listed(&mut self.reference, &listed)?;
        for r in rows.iter().filter(|r| r.state == SnapState::Live) {
            for chunk in 0..self.knobs.origin_chunks {
                let src = match self.nodes[i].server_mut() {
                    Some(s) => s
                        .engine
                        .store_mut()
                        .snapshot_chunk(r.id, chunk)
                        .map_err(|e| format!("snapshot {} chunk {chunk}: {e}", r.id))?,
                    None => return Ok(()),
                };
                let mut buf = vec![0u8; CHUNK as usize];
                match src {
                    csnap_server::store::ChunkSource::Origin => {
                        self.rack.read(Dev::Origin, &mut buf, chunk * CHUNK)
                    }
                    csnap_server::store::ChunkSource::Store { store_chunk, .. } => self.rack.read(
                        Dev::Store,
                        &mut buf,
                        self.geometry.chunk_offset(store_chunk),
                    ),
                }
                .map_err(|e| format!("read: {e}"))?;
                checkers::snapshots::on_read(&self.reference, r.id, chunk * CHUNK, &buf, None)
                    .map_err(|e| format!("after settling: {e}"))?;
                self.stats.snapshot_reads += 1;
            }
        }
        self.stats.writes_checked += self.reference.origin.len() as u64;
        Ok(())
    }
}

impl World {
    /// What the world still has to do after settling, quietly: the applications finish
    /// the I/O they had under way (granted origin writes carried out or failed, snapshot
    /// reads and writes done, leases released), the engine reclaims the space of deleted
    /// snapshots (a write lease of a client that died holds its chunk for the orphan
    /// grace) and answers every request. A fence result still on its way may power a node
    /// off meanwhile: it is powered on again and the failover must finish too.
    fn finish(&mut self) -> Check {
        let mut waited = 0;
        loop {
            let converged = checkers::gather_ends::converged(&self.nodes);
            let reclaiming = self.nodes.iter().find_map(|n| n.server()).is_none_or(|s| {
                s.engine.store().reclaim_position().is_some()
                    || !s.copies.is_empty()
                    || s.commit_due
                    || s.commit_io.is_some()
            });
            let answered = checkers::answered::check(&self.nodes, waited);
            if converged.is_ok() && !reclaiming && answered.is_ok() {
                break;
            }
            if waited >= 90_000 {
                self.stats.finish_ms_max = self.stats.finish_ms_max.max(waited);
                converged?;
                answered?;
                break;
            }
            // Seconds matter here (holds, grace periods, reclaim run on the engine's
            // whole-second ticks): big steps keep this phase cheap.
            self.advance_by(3_000)?;
            waited += 3_000;
            for i in 0..self.nodes.len() {
                let id = self.nodes[i].id;
                if !self.cluster.is_up(id) {
                    let _ = self.cluster.restart_node(id);
                }
                self.start_agent(i)?;
            }
            self.drain_agents()?;
            for i in 0..self.nodes.len() {
                for ci in 0..self.nodes[i].clients.len() {
                    while let Some(p) = self.nodes[i].clients[ci]
                        .ops
                        .iter()
                        .position(|o| matches!(o.state, OpState::Granted(_)))
                    {
                        self.do_write(i, ci, p)?;
                    }
                }
            }
            for _ in 0..2 {
                self.quiet_step()?;
            }
        }
        self.stats.finish_ms += waited;
        self.stats.finish_ms_max = self.stats.finish_ms_max.max(waited);
        self.space_back()
    }

    /// After [`World::finish`]: the store's checker counts the data chunks in use, which
    /// must be exactly those the remaining snapshots map, with nothing left to reclaim.
    fn space_back(&mut self) -> Check {
        let Some(i) = (0..self.nodes.len()).find(|&i| self.nodes[i].server().is_some()) else {
            return Err("no engine after settling".into());
        };
        let Some(s) = self.nodes[i].server_mut() else {
            return Ok(());
        };
        let store = s.engine.store_mut();
        let deleting = match store.reclaim_position() {
            Some((_, ids)) => ids,
            None => Vec::new(),
        };
        if deleting.is_empty() && !self.reference.snaps.values().any(|r| r.delete_asked) {
            // Nothing was deleted: the store's checker is not needed (it is the expensive
            // part of this check).
            return Ok(());
        }
        let rows = store.snapshots();
        let mut mapped = BTreeSet::new();
        for r in rows.iter().filter(|r| r.state != SnapState::Deleting) {
            for chunk in 0..self.knobs.origin_chunks {
                if let csnap_server::store::ChunkSource::Store { store_chunk, .. } = store
                    .snapshot_chunk(r.id, chunk)
                    .map_err(|e| format!("snapshot {} chunk {chunk}: {e}", r.id))?
                {
                    mapped.insert(store_chunk);
                }
            }
        }
        let report = store
            .check()
            .map_err(|e| format!("the store's checker failed: {e}"))?;
        if !report.is_clean() {
            return Err(format!("the store's checker: {:?}", report.problems));
        }
        checkers::deletes::space_back(&deleting, report.data_chunks_used, &mapped)?;
        if self.reference.snaps.values().any(|r| r.deleted) {
            self.stats.space_back += 1;
        }
        Ok(())
    }
}

/// Runs one schedule: `steps` random steps, then settle and the final checks.
pub fn run(seed: Seed, opts: Options) -> Result<Stats, String> {
    let mut w = World::new(seed, opts)?;
    w.trace_all = opts.trace;
    let steps = w.knobs.steps;
    let result = (|| {
        w.warm_up()?;
        for _ in 0..steps {
            w.step()?;
        }
        w.settle()
    })();
    match result {
        Ok(()) => Ok(w.stats),
        Err(e) => Err(format!(
            "schedule {seed} (nodes {}, fencing {:?}) failed at {} ms: {e}\n--- last events ---\n{}\n--- replay: {} ---",
            w.knobs.nodes,
            w.knobs.fencing,
            w.now,
            w.trace(),
            seed.replay_command(opts.reset)
        )),
    }
}
