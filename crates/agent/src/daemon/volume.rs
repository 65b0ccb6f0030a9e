//! The I/O shell of one volume in cluster mode: feeds the volume's CPG group, quorum,
//! clock, server and fencing results into its [`VolumeMembership`] and carries out what
//! the machine asks (see the I/O contract in [`crate::cluster`]). Generic over the group
//! and quorum implementations, so the same shell runs over real corosync and over
//! cpg-glue's in-memory cluster in tests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpg_glue::{Group, GroupEvent, GroupSender as _, NodeId, Quorum};
use csnap_proto::control::{
    ActivationGate, ClusterStatus, FailoverTiming, FenceJob, GatedClient, NodeClients,
};
use csnap_proto::{ClientId, ListenAddr, ServerStatus};
use csnap_server::net::{self as server_net, RunningServer, ServerConfig};
use csnap_server::store::StoreError;
use futures::StreamExt as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::fencing::Fencer;
use crate::cluster::{Input, LogEvent, MembershipConfig, Output, StopReason, VolumeMembership};
use crate::config::Fencing;

/// What one volume's shell needs besides its group and quorum.
#[derive(Debug, Clone)]
pub struct VolumeShellConfig {
    /// The volume's name.
    pub volume: String,
    /// The shared origin device.
    pub origin: PathBuf,
    /// The shared snapshot store device.
    pub store: PathBuf,
    /// The cluster key file (the server reads it when it starts).
    pub key_file: PathBuf,
    /// This node.
    pub node: NodeId,
    /// Where this node's server for the volume listens when it is chosen.
    pub server_listen: ListenAddr,
    /// The machine's configuration (its `server_address` is what clients dial).
    pub membership: MembershipConfig,
    /// Where each node's server for the volume listens (by the rule this node's own
    /// `server_address` follows). Only a fallback: the machine learns a server's address
    /// from its announce, or (a member that joined after the announce: a restarted or reset
    /// node) from the server's state (message version 2). A version-1 peer's state carries
    /// no address; during a rolling upgrade this fills it in.
    pub peer_addresses: BTreeMap<NodeId, String>,
    /// Open the shared devices O_DIRECT (always, in a real cluster: other hosts do not
    /// see this host's page cache).
    pub direct_io: bool,
}

/// Asked of a running volume shell (by the control socket).
#[derive(Debug)]
pub enum VolumeRequest {
    /// The membership state and, when this node runs it, the server's own status.
    Status(oneshot::Sender<(ClusterStatus, Option<ServerStatus>)>),
    /// The snapshot clients attached on this node changed (complete list).
    Clients(Vec<ClientId>),
    /// A configuration reload changed priorities or the fencing method.
    Config {
        /// `csnap_priority` by node.
        priorities: BTreeMap<NodeId, i32>,
        /// How to fence a node.
        fencing: Fencing,
    },
}

/// What the shell publishes for the node's client side: where the volume's server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLocation {
    /// The node running the server.
    pub node: NodeId,
    /// As announced by that node (`HOST:PORT` or `unix:PATH`).
    pub address: String,
    /// Bumped when this node was reset (`Output::DropClients`): the client side then
    /// reconnects everything, even to the same address, so the real server learns its
    /// locks afresh.
    pub resets: u64,
}

/// The local server's life, reported back into the loop.
enum ServerEvent {
    Started(Result<RunningServer, String>),
    Stopped(Result<(), String>),
    /// It stopped serving on its own (and was shut down after).
    Failed(String),
}

/// Runs the volume until `stop` is cancelled (then stops the local server, leaves the
/// group and returns `Ok`) or the group connection is lost (returns the error after
/// stopping the server: the caller may rejoin with a new machine).
pub async fn run_volume<G: Group, Q: Quorum>(
    cfg: VolumeShellConfig,
    mut group: G,
    mut quorum: Q,
    fencer: Arc<dyn Fencer>,
    requests: &mut mpsc::UnboundedReceiver<VolumeRequest>,
    location: &watch::Sender<Option<ServerLocation>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let epoch = Instant::now();
    let now_ms = move || u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
    let local = group.local();
    let mut machine = VolumeMembership::new(cfg.membership.clone(), local);
    tracing::info!(member = %local, group = group.name(), "joined the volume's group");

    // Multicasts go out one at a time, in order, beside the loop (flow control can make a
    // send wait). A send lost to a view change needs no retry: the machine resends.
    let (mcast_tx, mut mcast_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let sender = group.sender();
    let mcast_task = tokio::spawn(async move {
        while let Some(bytes) = mcast_rx.recv().await {
            if let Err(e) = sender.mcast(bytes).await {
                tracing::debug!(error = %e, "multicast not sent (the machine resends after the view change)");
            }
        }
    });

    let (server_tx, mut server_rx) = mpsc::unbounded_channel::<ServerEvent>();
    let (fence_tx, mut fence_rx) = mpsc::unbounded_channel::<(NodeId, Result<(), String>)>();
    let mut server = LocalServer::new(cfg.clone(), epoch, server_tx);
    let mut group_error: Option<String> = None;
    let mut quorum_open = true;
    let mut resets = 0u64;
    let mut clock = FailoverClock::default();

    loop {
        machine.handle(Input::Tick { now_ms: now_ms() });
        while let Some(output) = machine.poll_output() {
            match output {
                Output::Mcast(bytes) => {
                    let _ = mcast_tx.send(bytes);
                }
                Output::StartServer { generation } => {
                    clock.announce_delivered();
                    server.start(generation, &mut machine);
                    if matches!(server.state, ServerState::Ready { .. }) {
                        clock.server_ready();
                    }
                }
                Output::ActivateServer {
                    generation,
                    clients,
                    hold_snapshots_ms,
                } => {
                    clock.activated(generation, &clients, &machine);
                    server.activate(generation, clients, hold_snapshots_ms);
                }
                Output::ExtendLease { until_ms } => server.extend_lease(until_ms),
                Output::StopServer { reason } => server.stop(reason, &mut machine),
                Output::DeclareGone { client } => server.declare_gone(client),
                Output::DropClients => {
                    csnap_server::key_event!(
                        WARN,
                        "node_reset",
                        [],
                        "this node was stale: its clients reconnect to the volume's real server"
                    );
                    resets += 1;
                    location.send_modify(|l| {
                        if let Some(l) = l {
                            l.resets = resets;
                        }
                    });
                }
                Output::Fence {
                    node,
                    method,
                    attempt,
                } => {
                    // The machine logged the key event (fence_requested) already.
                    tracing::info!(
                        csnap_target_node = node.0,
                        ?method,
                        attempt,
                        "running the fencing of node {node}"
                    );
                    let (fencer, tx) = (fencer.clone(), fence_tx.clone());
                    let reason = format!("csnap volume {}: stale state after a merge", cfg.volume);
                    tokio::spawn(
                        async move {
                            let result = fencer.fence(node, &method, &reason).await;
                            let _ = tx.send((node, result));
                        }
                        .in_current_span(),
                    );
                }
                Output::Log(event) => {
                    clock.on_log(&event, cfg.node);
                    log_event(&event);
                }
            }
        }
        clock.track_server(&machine, cfg.node);
        publish_location(&cfg, &machine, location, resets);
        if group_error.is_some() && !server.busy() {
            break;
        }

        let deadline = machine
            .poll_timeout()
            .map(|at| epoch + Duration::from_millis(at))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = stop.cancelled() => break,
            event = group.next(), if group_error.is_none() => match event {
                Some(Ok(event)) => {
                    clock.on_group_event(&event);
                    if let GroupEvent::ConfChg(c) = &event {
                        tracing::info!(members = ?c.members.iter().map(|m| m.to_string()).collect::<Vec<_>>(), "group membership changed");
                    }
                    machine.handle(Input::Group(event));
                }
                Some(Err(e)) => {
                    group_error = Some(e.to_string());
                    machine.handle(Input::GroupLost { detail: e.to_string() });
                }
                None => {
                    group_error = Some("the group stream ended".into());
                    machine.handle(Input::GroupLost { detail: "the group stream ended".into() });
                }
            },
            event = quorum.next(), if quorum_open => match event {
                Some(Ok(q)) => machine.handle(Input::Quorum(q)),
                Some(Err(e)) => {
                    quorum_open = false;
                    group_error = Some(format!("quorum connection lost: {e}"));
                    machine.handle(Input::GroupLost { detail: format!("quorum connection lost: {e}") });
                }
                None => {
                    quorum_open = false;
                    group_error = Some("the quorum stream ended".into());
                    machine.handle(Input::GroupLost { detail: "the quorum stream ended".into() });
                }
            },
            _ = tokio::time::sleep_until(deadline.into()) => {}
            Some(event) = server_rx.recv() => {
                let was_running = matches!(server.state, ServerState::Running { .. });
                server.on_event(event, &mut machine);
                if !was_running && matches!(server.state, ServerState::Running { .. }) {
                    clock.serving();
                }
            }
            reason = server.failed() => server.on_failed(reason),
            Some((node, result)) = fence_rx.recv() => {
                let (ok, detail) = match result {
                    Ok(()) => (true, "confirmed".to_owned()),
                    Err(e) => (false, e),
                };
                // The machine logs the key event (fence_done, fence_failed) for its job.
                if ok {
                    tracing::warn!(csnap_target_node = node.0, "the fencing of node {node} reports success");
                } else {
                    tracing::error!(csnap_target_node = node.0, error = %detail, "the fencing of node {node} failed");
                }
                machine.handle(Input::FenceResult { node, ok, detail });
            }
            Some(request) = requests.recv() => match request {
                VolumeRequest::Status(reply) => {
                    let local_status = server.status().await;
                    let _ = reply.send((cluster_status(&cfg, &machine, &server, &mut clock), local_status));
                }
                VolumeRequest::Clients(clients) => machine.handle(Input::Clients(clients)),
                VolumeRequest::Config { priorities, fencing } => {
                    machine.handle(Input::Config { priorities, fencing });
                }
            },
        }
    }

    // Leaving: the server stops first (nothing may serve without the group behind it).
    server.stop_now(&mut server_rx).await;
    location.send_replace(None);
    mcast_task.abort();
    match group_error {
        Some(e) => Err(anyhow::anyhow!("volume {}: {e}", cfg.volume)),
        None => {
            if let Err(e) = group.leave().await {
                tracing::warn!(error = %e, "leaving the group failed");
            }
            Ok(())
        }
    }
}

/// A key event of the membership core, in the volume's span (CSNAP_VOLUME, CSNAP_NODE),
/// with CSNAP_EVENT and its MESSAGE_ID; the message is the event's summary and detail.
fn log_event(event: &LogEvent) {
    let summary = csnap_server::logging::event_info(event.name).map_or(event.name, |e| e.summary);
    let sep = if event.detail.is_empty() { "" } else { ": " };
    // `csnap_target_node` is absent (not 0) when the event is about no other node.
    let about = event.about.map(|n| n.0);
    if event.warn {
        csnap_server::key_event!(
            WARN,
            event.name,
            [csnap_target_node = about],
            "{summary}{sep}{}",
            event.detail
        );
    } else {
        csnap_server::key_event!(
            INFO,
            event.name,
            [csnap_target_node = about],
            "{summary}{sep}{}",
            event.detail
        );
    }
}

/// The server as the machine knows it, its address filled in from the configuration when
/// the machine learnt it from a version-1 peer's state (no address).
fn known_server(
    cfg: &VolumeShellConfig,
    server: Option<(NodeId, String)>,
) -> Option<(NodeId, String)> {
    let (node, address) = server?;
    if address.is_empty() {
        Some((node, cfg.peer_addresses.get(&node)?.clone()))
    } else {
        Some((node, address))
    }
}

fn publish_location(
    cfg: &VolumeShellConfig,
    machine: &VolumeMembership,
    location: &watch::Sender<Option<ServerLocation>>,
    resets: u64,
) {
    let status = machine.status();
    let now = known_server(cfg, status.server.filter(|_| status.quorate)).map(|(node, address)| {
        ServerLocation {
            node,
            address,
            resets,
        }
    });
    location.send_if_modified(|current| {
        // A lost quorum does not move the clients away from a server they use: they keep
        // asking it (it stops by itself) until a new one is known.
        if now.is_some() && *current != now {
            *current = now;
            true
        } else {
            false
        }
    });
}

fn cluster_status(
    cfg: &VolumeShellConfig,
    machine: &VolumeMembership,
    server: &LocalServer,
    clock: &mut FailoverClock,
) -> ClusterStatus {
    let s = machine.status();
    ClusterStatus {
        node: cfg.node.0,
        member: s.local.to_string(),
        role: format!("{:?}", s.role),
        generation: s.lineage.generation,
        ring: s.ring.map(|r| r.to_string()),
        members: s.members.iter().map(|m| m.to_string()).collect(),
        quorate: s.quorate,
        server_node: s.server.as_ref().map(|(n, _)| n.0),
        server_address: known_server(cfg, s.server).map(|(_, a)| a),
        gate: format!("{:?}", s.gate),
        stale: s.stale.iter().map(|n| n.0).collect(),
        departed_servers: s.unsettled.iter().map(|n| n.0).collect(),
        fencing: s
            .fencing
            .iter()
            .map(|n| FenceJob {
                node: n.0,
                method: format!("{:?}", cfg.membership.fencing),
            })
            .collect(),
        lease_left_ms: s.lease_left_ms,
        failover: clock.timing(server),
        local_server: server.describe(),
        clients: s
            .clients
            .iter()
            .map(|(n, list)| NodeClients {
                node: n.0,
                clients: list.iter().map(|c| c.to_string()).collect(),
            })
            .collect(),
        activation: s.activation.map(|a| ActivationGate {
            generation: a.generation,
            gathering: a.gathering,
            waiting_for: a.waiting.iter().map(|m| m.to_string()).collect(),
            clients: a
                .clients
                .iter()
                .map(|(c, n, gone)| GatedClient {
                    client: c.to_string(),
                    node: n.0,
                    declared_gone: *gone,
                })
                .collect(),
        }),
        view_generation: s.view_lineage.generation,
    }
}

/// Binds the server's address at once, from inside the loop without waiting: a TCP bind
/// completes on its first poll; should a unix socket's liveness probe not, the activation
/// binds instead.
fn bind_now(addr: &ListenAddr) -> Result<server_net::BoundListener, String> {
    use futures::FutureExt as _;
    match server_net::bind_early(addr).now_or_never() {
        Some(r) => r.map_err(|e| e.to_string()),
        None => Err("binding would wait".into()),
    }
}

/// Unix milliseconds of the wall clock (0 before 1970).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The moments of this node's last server activation (`csnapctl status`, the failover
/// benchmark), taken by the shell from what it feeds the machine and what the machine
/// asks: nothing here decides anything.
#[derive(Debug, Default)]
struct FailoverClock {
    /// The last group confchg with a member leaving, and the last one at all.
    confchg_left: Option<u64>,
    confchg_any: Option<u64>,
    totem: Option<u64>,
    /// The last `old_server_settled` event.
    settled: Option<u64>,
    /// The last server of the volume on another node this node knew of.
    last_remote_server: Option<u32>,
    /// The activation in progress or done last.
    current: Option<FailoverTiming>,
}

impl FailoverClock {
    fn on_group_event(&mut self, event: &GroupEvent) {
        let now = wall_ms();
        match event {
            GroupEvent::ConfChg(c) => {
                self.confchg_any = Some(now);
                if !c.left.is_empty() {
                    self.confchg_left = Some(now);
                }
            }
            GroupEvent::TotemConfChg(_) => self.totem = Some(now),
            GroupEvent::Deliver(_) => {}
        }
    }

    fn track_server(&mut self, machine: &VolumeMembership, local: NodeId) {
        if let Some((node, _)) = machine.status().server {
            if node != local {
                self.last_remote_server = Some(node.0);
            }
        }
    }

    fn on_log(&mut self, event: &LogEvent, local: NodeId) {
        let now = wall_ms();
        match event.name {
            // Settled as this node sees it: its stop wait ran out or its agent reported it
            // idle; or this node fenced it (a `Fenced` from another member is silent).
            "old_server_settled" | "fence_done" => self.settled = Some(now),
            "server_chosen" => {
                let confchg = self.confchg_left.or(self.confchg_any);
                let after = |at: Option<u64>| at.filter(|t| confchg.is_none_or(|c| *t >= c));
                self.current = Some(FailoverTiming {
                    departed_server: self.last_remote_server.filter(|n| *n != local.0),
                    confchg_at_ms: confchg,
                    totem_confchg_at_ms: after(self.totem),
                    old_server_settled_at_ms: after(self.settled),
                    chosen_at_ms: Some(now),
                    ..FailoverTiming::default()
                });
            }
            _ => {}
        }
    }

    fn announce_delivered(&mut self) {
        if let Some(t) = &mut self.current {
            t.announce_delivered_at_ms = Some(wall_ms());
        }
    }

    fn server_ready(&mut self) {
        if let Some(t) = &mut self.current {
            t.server_ready_at_ms = Some(wall_ms());
        }
    }

    fn activated(&mut self, generation: u64, clients: &[ClientId], machine: &VolumeMembership) {
        if let Some(t) = &mut self.current {
            t.generation = generation;
            t.activated_at_ms = Some(wall_ms());
            t.gathered_clients = clients.iter().map(|c| c.to_string()).collect();
            t.chosen_to_activated_ms = machine
                .status()
                .last_failover
                .filter(|(g, _)| *g == generation)
                .map_or(0, |(_, ms)| ms);
        }
    }

    fn serving(&mut self) {
        if let Some(t) = &mut self.current {
            t.serving_at_ms = Some(wall_ms());
        }
    }

    /// The last activation's timing, with the running server's first origin grant (kept
    /// once seen, also after that server stopped).
    fn timing(&mut self, server: &LocalServer) -> Option<FailoverTiming> {
        let t = self.current.as_mut()?;
        if let ServerState::Running { generation, server } = &server.state {
            if *generation == t.generation && t.first_origin_write_at_ms.is_none() {
                t.first_origin_write_at_ms = server.first_origin_write_at_ms();
            }
        }
        Some(t.clone())
    }
}

/// The volume's metadata server in this process, when this node runs it.
///
/// `StartServer` is answered at once: the server opens the store (and replays its journal)
/// when `ActivateServer` brings the gathered clients, which the engine needs at start.
struct LocalServer {
    cfg: VolumeShellConfig,
    epoch: Instant,
    events: mpsc::UnboundedSender<ServerEvent>,
    state: ServerState,
    /// The serving lease the machine gave (monotonic ms since `epoch`).
    lease_until_ms: u64,
    /// Nonzero once a store open was refused because a later cluster generation served the
    /// store (`store_generation_ahead`): that generation. Sticky until the agent restarts:
    /// the membership core starts again at the next generation after a failed start, and
    /// would otherwise count up past the store's and serve the stale state after all.
    store_ahead: Arc<AtomicU64>,
}

enum ServerState {
    Idle,
    /// Told to start; waiting for the activation. The listener is bound already when
    /// that worked (clients that learn the address from the announce queue in its backlog
    /// instead of being refused and backing off).
    Ready {
        generation: u64,
        listener: Option<server_net::BoundListener>,
    },
    /// Opening the store; `stop` set if a stop came meanwhile.
    Opening {
        generation: u64,
        stop: bool,
    },
    Running {
        generation: u64,
        server: Box<RunningServer>,
    },
    /// Shutting down; `ServerStopped` goes to the machine when done.
    Stopping,
}

impl LocalServer {
    fn new(
        cfg: VolumeShellConfig,
        epoch: Instant,
        events: mpsc::UnboundedSender<ServerEvent>,
    ) -> LocalServer {
        LocalServer {
            cfg,
            epoch,
            events,
            state: ServerState::Idle,
            lease_until_ms: 0,
            store_ahead: Arc::new(AtomicU64::new(0)),
        }
    }

    fn busy(&self) -> bool {
        matches!(
            self.state,
            ServerState::Opening { .. } | ServerState::Stopping
        )
    }

    fn describe(&self) -> Option<String> {
        match &self.state {
            ServerState::Idle => None,
            ServerState::Ready { generation, .. } => {
                Some(format!("ready (generation {generation})"))
            }
            ServerState::Opening { generation, .. } => {
                Some(format!("opening the store (generation {generation})"))
            }
            ServerState::Running { generation, server } => Some(format!(
                "serving at {} (generation {generation}, store generation {})",
                server.local_addr(),
                server.generation()
            )),
            ServerState::Stopping => Some("stopping".into()),
        }
    }

    fn start(&mut self, generation: u64, machine: &mut VolumeMembership) {
        match self.state {
            ServerState::Idle => {
                // Bind now (non-blocking for TCP; a unix socket path is checked and
                // created): the gather and the store's opening then happen while clients
                // already connect. Binding fails only when the address is in use; the
                // activation tries again then.
                let listener = match bind_now(&self.cfg.server_listen) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot bind the server's address yet; binding at activation");
                        None
                    }
                };
                self.state = ServerState::Ready {
                    generation,
                    listener,
                };
                machine.handle(Input::ServerStarted);
            }
            _ => {
                tracing::warn!(
                    generation,
                    "asked to start a server while one is not idle; ignored"
                );
            }
        }
    }

    fn lease_instant(&self) -> Instant {
        self.epoch + Duration::from_millis(self.lease_until_ms)
    }

    fn activate(&mut self, generation: u64, clients: Vec<ClientId>, hold_snapshots_ms: u64) {
        let ServerState::Ready {
            generation: ready, ..
        } = self.state
        else {
            tracing::warn!(generation, "activation without a started server; ignored");
            return;
        };
        if ready != generation {
            tracing::warn!(
                generation,
                ready,
                "activation for another generation; ignored"
            );
            return;
        }
        let listener = match std::mem::replace(&mut self.state, ServerState::Idle) {
            ServerState::Ready { listener, .. } => listener,
            _ => None,
        };
        let mut config = ServerConfig::new(
            &self.cfg.origin,
            &self.cfg.store,
            self.cfg.server_listen.clone(),
            &self.cfg.key_file,
        );
        config.volume = self.cfg.volume.clone();
        config.direct_io = self.cfg.direct_io;
        if let Some(window) = crate::standalone::test_rollback_window() {
            config.engine.rollback_window = window;
        }
        config.engine.expected_snapshot_clients = clients.clone();
        config.cluster_generation = Some(generation);
        config.engine.hold_snapshots_until =
            server_net::clock_now_secs() + hold_snapshots_ms.div_ceil(1000);
        config.serving_lease_until = Some(self.lease_instant());
        tracing::info!(
            generation,
            expected_clients = clients.len(),
            hold_snapshots_ms,
            "activating the server"
        );
        self.state = ServerState::Opening {
            generation,
            stop: false,
        };
        let events = self.events.clone();
        let ahead = self.store_ahead.load(Ordering::SeqCst);
        if ahead != 0 {
            tracing::error!(
                generation,
                store_cluster_generation = ahead,
                "not serving: the store was served at a later cluster generation (refused before); restart the agents once the store's lineage is sorted out"
            );
            let _ = events.send(ServerEvent::Started(Err(format!(
                "the store was served at cluster generation {ahead}, later than this node's \
                 lineage: not serving stale state (restart the agent once resolved)"
            ))));
            return;
        }
        let store_ahead = self.store_ahead.clone();
        // In the volume's span: the server's lines carry the volume and the node.
        tokio::spawn(
            async move {
                let result =
                    server_net::start_bound(config, listener)
                        .await
                        .map_err(|e| {
                            if let server_net::ServerError::Store {
                                source: StoreError::ClusterGenerationAhead { store, activating },
                                ..
                            } = &e
                            {
                                store_ahead.store(*store, Ordering::SeqCst);
                                csnap_server::key_event!(
                                ERROR,
                                "store_generation_ahead",
                                [csnap_generation = *activating, store_cluster_generation = *store],
                                "not serving: the store was served at cluster generation {store}, \
                                 after generation {activating} this node activates"
                            );
                            }
                            e.to_string()
                        });
                let _ = events.send(ServerEvent::Started(result));
            }
            .in_current_span(),
        );
    }

    fn extend_lease(&mut self, until_ms: u64) {
        self.lease_until_ms = self.lease_until_ms.max(until_ms);
        if let ServerState::Running { server, .. } = &self.state {
            if let Err(e) = server.extend_serving_lease(self.lease_instant()) {
                tracing::warn!(error = %e, "cannot extend the serving lease");
            }
        }
    }

    fn declare_gone(&self, client: ClientId) {
        if let ServerState::Running { server, .. } = &self.state {
            server.declare_gone(client);
        }
    }

    fn stop(&mut self, reason: StopReason, machine: &mut VolumeMembership) {
        // The machine logged the key event (server_stop) when it decided.
        tracing::warn!(?reason, "stopping the local server");
        match std::mem::replace(&mut self.state, ServerState::Idle) {
            ServerState::Idle | ServerState::Ready { .. } => machine.handle(Input::ServerStopped),
            ServerState::Opening { generation, .. } => {
                self.state = ServerState::Opening {
                    generation,
                    stop: true,
                };
            }
            ServerState::Running { server, .. } => {
                self.state = ServerState::Stopping;
                let events = self.events.clone();
                tokio::spawn(async move {
                    let result = server.shutdown().await.map_err(|e| e.to_string());
                    let _ = events.send(ServerEvent::Stopped(result));
                });
            }
            ServerState::Stopping => self.state = ServerState::Stopping,
        }
    }

    fn on_event(&mut self, event: ServerEvent, machine: &mut VolumeMembership) {
        match event {
            ServerEvent::Started(result) => {
                let ServerState::Opening { generation, stop } =
                    std::mem::replace(&mut self.state, ServerState::Idle)
                else {
                    return;
                };
                match result {
                    Ok(server) if stop => {
                        self.state = ServerState::Stopping;
                        let events = self.events.clone();
                        tokio::spawn(async move {
                            let result = server.shutdown().await.map_err(|e| e.to_string());
                            let _ = events.send(ServerEvent::Stopped(result));
                        });
                    }
                    Ok(server) => {
                        csnap_server::key_event!(INFO, "server_active", [csnap_generation = generation,
                            listen = %server.local_addr(), store_generation = server.generation(),
                            recovered_unclean = server.recovered_unclean()],
                            "the server is active");
                        if let Err(e) = server.extend_serving_lease(self.lease_instant()) {
                            tracing::warn!(error = %e, "cannot extend the serving lease");
                        }
                        self.state = ServerState::Running {
                            generation,
                            server: Box::new(server),
                        };
                    }
                    Err(e) if stop => {
                        tracing::warn!(error = %e, "the server did not start (a stop was asked anyway)");
                        machine.handle(Input::ServerStopped);
                    }
                    Err(e) => {
                        // The machine logs the key event (server_failed).
                        tracing::error!(error = %e, "the server did not start");
                        machine.handle(Input::ServerFailed { detail: e });
                    }
                }
            }
            ServerEvent::Failed(detail) => {
                self.state = ServerState::Idle;
                machine.handle(Input::ServerFailed { detail });
            }
            ServerEvent::Stopped(result) => {
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "the server stopped uncleanly (the next one replays its journal)");
                } else {
                    // The machine logs the key event (server_stopped).
                    tracing::info!("the server stopped");
                }
                self.state = ServerState::Idle;
                machine.handle(Input::ServerStopped);
            }
        }
    }

    /// Resolves when the running server failed on its own.
    async fn failed(&self) -> String {
        match &self.state {
            ServerState::Running { server, .. } => server.failed().await.to_string(),
            _ => std::future::pending().await,
        }
    }

    fn on_failed(&mut self, reason: String) {
        // The machine logs the key event (server_failed) once it is shut down.
        tracing::error!(%reason, "the server stopped serving");
        if let ServerState::Running { server, .. } =
            std::mem::replace(&mut self.state, ServerState::Stopping)
        {
            let events = self.events.clone();
            tokio::spawn(async move {
                let _ = server.shutdown().await;
                let _ = events.send(ServerEvent::Failed(reason));
            });
        }
    }

    async fn status(&self) -> Option<ServerStatus> {
        match &self.state {
            ServerState::Running { server, .. } => server.status().await.ok(),
            _ => None,
        }
    }

    /// Stops whatever runs or is being started or stopped, and waits until it is gone.
    async fn stop_now(&mut self, events: &mut mpsc::UnboundedReceiver<ServerEvent>) {
        loop {
            match std::mem::replace(&mut self.state, ServerState::Idle) {
                ServerState::Idle | ServerState::Ready { .. } => return,
                ServerState::Running { server, .. } => {
                    if let Err(e) = server.shutdown().await {
                        tracing::warn!(error = %e, "server shutdown");
                    }
                    return;
                }
                state @ (ServerState::Opening { .. } | ServerState::Stopping) => {
                    self.state = state;
                    match events.recv().await {
                        Some(ServerEvent::Started(Ok(server))) => {
                            self.state = ServerState::Running {
                                generation: 0,
                                server: Box::new(server),
                            };
                        }
                        Some(_) | None => return,
                    }
                }
            }
        }
    }
}

/// The address clients dial for a location, parsed.
pub fn client_address(location: &ServerLocation) -> Result<ListenAddr, String> {
    location
        .address
        .parse::<ListenAddr>()
        .map_err(|e| format!("server address {:?}: {e}", location.address))
}

#[cfg(test)]
mod log_tests {
    /// Every event name the membership core logs (`self.log("NAME", ...)`) has a
    /// MESSAGE_ID in the catalogue (`csnap_server::logging::EVENTS`), so no key event
    /// reaches the journal without one.
    #[test]
    fn every_membership_event_has_a_message_id() {
        let source = include_str!("../cluster/mod.rs");
        let mut names = Vec::new();
        for (at, _) in source.match_indices("self.log(") {
            let rest = &source[at + "self.log(".len()..];
            let Some(start) = rest.find('"') else {
                continue;
            };
            // The name is the call's first argument: only whitespace before its quote.
            if !rest[..start].trim().is_empty() {
                continue;
            }
            let rest = &rest[start + 1..];
            let Some(end) = rest.find('"') else { continue };
            names.push(&rest[..end]);
        }
        assert!(names.len() > 20, "found only {names:?}");
        for name in names {
            assert!(
                csnap_server::logging::message_id(name).is_some(),
                "the membership core logs {name:?}, which has no MESSAGE_ID in csnap_server::logging::EVENTS"
            );
        }
    }
}
