//! Cluster mode (`csnap-agent` without `--standalone`): every volume of corosync.conf's
//! `csnap` section, each in its own CPG group `csnap:VOLUME`, driven by the membership core
//! ([`crate::cluster`]) through the per-volume shell ([`volume`]); this node's client and
//! NBD exports follow the volume's server wherever it runs ([`client`]); fencing runs the
//! configured method ([`fencing`]). Reloads of corosync.conf start and stop volumes and
//! pass priority and fencing changes on.

pub mod client;
pub mod fencing;
pub mod notify;
pub mod volume;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use cpg_glue::corosync::{Cmap, CorosyncGroup, CorosyncQuorum};
use cpg_glue::NodeId;
use csnap_blockdev::client::Volume;
use csnap_proto::control::{ClusterStatus, ControlRequest, ControlResponse, VolumeStatus};
use csnap_proto::ListenAddr;
use csnap_server::net::{self as server_net};
use futures::StreamExt as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::cluster::MembershipConfig;
use crate::config::{ConfigError, ConfigWatch, CsnapConfig, NbdListen, ParsedConfig, VolumeConfig};
use client::{run_client_side, ClientSideConfig};
use fencing::{ClusterFencer, Fencer};
use volume::{run_volume, ServerLocation, VolumeRequest, VolumeShellConfig};

/// Options of cluster mode (the rest comes from corosync.conf).
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Overrides `csnap.control_socket` (several agents on one machine, in tests).
    pub control_socket: Option<PathBuf>,
    /// Export snapshots read-only (`--snapshots-read-only`).
    pub snapshots_read_only: bool,
}

/// One volume this agent runs.
struct RunningVolume {
    config: VolumeConfig,
    stop: CancellationToken,
    requests: mpsc::UnboundedSender<VolumeRequest>,
    client: watch::Receiver<Option<Arc<Volume>>>,
    /// True while the volume's membership task is in its group.
    joined: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Where this node's server for `volume` listens, and the address other nodes dial.
fn server_addresses(
    config: &CsnapConfig,
    node: NodeId,
    volume: &VolumeConfig,
) -> (ListenAddr, String) {
    let ring0 = config.nodes.get(&node).and_then(|n| n.ring0_addr.clone());
    match ring0.as_deref().map(str::parse::<IpAddr>) {
        Some(Ok(ip)) => {
            let addr = SocketAddr::new(ip, volume.server_port);
            (ListenAddr::from(addr), addr.to_string())
        }
        // A host name (or no nodelist entry): listen everywhere, advertise the name.
        _ => (
            ListenAddr::from(SocketAddr::new(
                IpAddr::from([0, 0, 0, 0]),
                volume.server_port,
            )),
            format!(
                "{}:{}",
                ring0.unwrap_or_else(|| "localhost".into()),
                volume.server_port
            ),
        ),
    }
}

fn nbd_addr(listen: &NbdListen) -> ListenAddr {
    match listen {
        NbdListen::Unix(p) => ListenAddr::Unix(p.clone()),
        NbdListen::Tcp(a) => ListenAddr::from(*a),
    }
}

struct Node {
    id: NodeId,
    key: Vec<u8>,
    key_file: PathBuf,
    options: DaemonOptions,
    fencer: Arc<dyn Fencer>,
    /// Signalled when a volume lost its corosync connection: corosync died or restarted,
    /// so the configuration watch is set up again too (its own connection does not always
    /// notice).
    corosync_lost: Arc<tokio::sync::Notify>,
}

impl Node {
    fn start_volume(&self, config: &CsnapConfig, volume: &VolumeConfig) -> RunningVolume {
        let (listen, advertise) = server_addresses(config, self.id, volume);
        let shell = VolumeShellConfig {
            volume: volume.name.clone(),
            origin: volume.origin.clone(),
            store: volume.store.clone(),
            key_file: self.key_file.clone(),
            node: self.id,
            server_listen: listen,
            membership: MembershipConfig::from_csnap(config, advertise),
            peer_addresses: config
                .nodes
                .keys()
                .map(|id| (*id, server_addresses(config, *id, volume).1))
                .collect(),
            direct_io: true,
        };
        let stop = CancellationToken::new();
        let (req_tx, mut req_rx) = mpsc::unbounded_channel();
        let (loc_tx, loc_rx) = watch::channel::<Option<ServerLocation>>(None);
        let (vol_tx, vol_rx) = watch::channel::<Option<Arc<Volume>>>(None);
        let fencer = self.fencer.clone();
        let corosync_lost = self.corosync_lost.clone();
        let group_name = format!("csnap:{}", volume.name);
        let (joined_tx, joined_rx) = watch::channel(false);
        // Every line of the volume's tasks (membership, server, client side) carries the
        // volume and the node (journal fields CSNAP_VOLUME, CSNAP_NODE).
        let span =
            tracing::info_span!("volume", csnap_volume = %volume.name, csnap_node = self.id.0);
        let membership = {
            let stop = stop.clone();
            let (replay, connected) = (req_tx.clone(), vol_rx.clone());
            let node = self.id;
            tokio::spawn(async move {
                let mut rejoin = false;
                // A lost corosync connection ends one machine; the next joins afresh.
                while !stop.is_cancelled() {
                    if std::mem::replace(&mut rejoin, true) {
                        // The new machine starts knowing none of this node's snapshot
                        // clients, and the client side only reports changes: tell it now.
                        let current = connected.borrow().clone();
                        if let Some(v) = current {
                            let mut clients = v.snapshot_clients();
                            clients.sort();
                            let _ = replay.send(VolumeRequest::Clients(clients));
                        }
                    }
                    let joined = async {
                        let group = CorosyncGroup::join(&group_name).await?;
                        let quorum = CorosyncQuorum::connect()?;
                        Ok::<_, cpg_glue::GroupError>((group, quorum))
                    };
                    let ended = match joined.await {
                        Ok((group, quorum)) => {
                            joined_tx.send_replace(true);
                            let ended = run_volume(
                                shell.clone(),
                                group,
                                quorum,
                                fencer.clone(),
                                &mut req_rx,
                                &loc_tx,
                                stop.clone(),
                            )
                            .await
                            .map_err(|e| format!("{e:#}"));
                            joined_tx.send_replace(false);
                            ended
                        }
                        Err(e) => Err(format!("cannot join group {group_name}: {e}")),
                    };
                    match ended {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::error!(volume = %shell.volume, error = %e, "the volume's membership ended; rejoining in 2 s");
                            corosync_lost.notify_one();
                            let retry = tokio::time::sleep(Duration::from_secs(2));
                            tokio::pin!(retry);
                            // Meanwhile `csnapctl status` still gets an answer (without a
                            // group there is no server on this node: run_volume stopped it).
                            let mut pending_clients = None;
                            loop {
                                tokio::select! {
                                    _ = stop.cancelled() => return,
                                    _ = &mut retry => break,
                                    Some(request) = req_rx.recv() => match request {
                                        VolumeRequest::Status(reply) => {
                                            let _ = reply.send((detached_status(node, &e), None));
                                        }
                                        VolumeRequest::Clients(c) => pending_clients = Some(c),
                                        VolumeRequest::Config { .. } => {}
                                    },
                                }
                            }
                            if let Some(c) = pending_clients {
                                let _ = replay.send(VolumeRequest::Clients(c));
                            }
                        }
                    }
                }
            }.instrument(span.clone()))
        };
        let client_cfg = ClientSideConfig {
            volume: volume.name.clone(),
            origin: volume.origin.clone(),
            store: volume.store.clone(),
            key: self.key.clone(),
            node: self.id.0,
            instance: rand::random(),
            direct_io: true,
            nbd_listen: Some(nbd_addr(&volume.nbd_listen)),
            snapshots_read_only: self.options.snapshots_read_only,
        };
        let client = {
            let (stop, req_tx) = (stop.clone(), req_tx.clone());
            tokio::spawn(
                async move {
                    if let Err(e) = run_client_side(client_cfg, loc_rx, req_tx, vol_tx, stop).await
                    {
                        tracing::error!(error = %e, "the volume's client side ended");
                    }
                }
                .instrument(span.clone()),
            )
        };
        tracing::info!(volume = %volume.name, "volume started");
        RunningVolume {
            config: volume.clone(),
            stop,
            requests: req_tx,
            client: vol_rx,
            joined: joined_rx,
            tasks: vec![membership, client],
        }
    }
}

/// The status of a volume whose membership is not running (no corosync connection).
fn detached_status(node: NodeId, error: &str) -> ClusterStatus {
    ClusterStatus {
        node: node.0,
        member: String::new(),
        role: "Idle".into(),
        generation: 0,
        ring: None,
        members: Vec::new(),
        quorate: false,
        server_node: None,
        server_address: None,
        gate: format!("Corosync (not in the group: {error})"),
        stale: Vec::new(),
        departed_servers: Vec::new(),
        fencing: Vec::new(),
        lease_left_ms: 0,
        failover: None,
        local_server: None,
        clients: Vec::new(),
        activation: None,
        view_generation: 0,
    }
}

async fn stop_volume(name: &str, v: RunningVolume) {
    v.stop.cancel();
    for task in v.tasks {
        if tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .is_err()
        {
            tracing::error!(volume = %name, "the volume did not stop within 60 s");
        }
    }
    tracing::info!(volume = %name, "volume stopped");
}

type Volumes = Arc<Mutex<BTreeMap<String, (VolumeConfig, RunningHandles)>>>;

/// What the control socket needs of a running volume.
#[derive(Clone)]
struct RunningHandles {
    requests: mpsc::UnboundedSender<VolumeRequest>,
    client: watch::Receiver<Option<Arc<Volume>>>,
}

async fn volume_status(
    node: NodeId,
    config: &VolumeConfig,
    handles: &RunningHandles,
) -> Result<VolumeStatus, String> {
    let name = &config.name;
    let (tx, rx) = oneshot::channel();
    handles
        .requests
        .send(VolumeRequest::Status(tx))
        .map_err(|_| format!("volume {name:?} is stopping"))?;
    let (cluster, local) = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .map_err(|_| format!("volume {name:?}: no status within 10 s"))?
        .map_err(|_| format!("volume {name:?} is stopping"))?;
    let client = handles.client.borrow().clone();
    // The server's own figures: from the local server when this node runs it, else asked
    // through the client, briefly, and only when the view has a server: status must stay
    // quick during an outage, when it matters most.
    let (server_status, sessions, cache) = match &client {
        Some(v) => {
            let remote = if local.is_none() && cluster.quorate && cluster.server_node.is_some() {
                tokio::time::timeout(Duration::from_secs(1), v.status())
                    .await
                    .ok()
                    .and_then(Result::ok)
            } else {
                None
            };
            (local.or(remote), v.origin_sessions(), Some(v.cache_stats()))
        }
        None => (local, 0, None),
    };
    Ok(VolumeStatus {
        volume: name.clone(),
        mode: format!("cluster (node {node})"),
        origin: config.origin.display().to_string(),
        store: config.store.display().to_string(),
        nbd_listen: match &config.nbd_listen {
            NbdListen::Unix(p) => format!("unix:{}", p.display()),
            NbdListen::Tcp(a) => a.to_string(),
        },
        server: cluster
            .server_address
            .clone()
            .unwrap_or_else(|| format!("none yet (waiting: {})", cluster.gate)),
        server_status: server_status.unwrap_or_default(),
        origin_sessions: sessions,
        cache_hits: cache.as_ref().map_or(0, |c| c.hits),
        cache_misses: cache.as_ref().map_or(0, |c| c.misses),
        cached_chunks: cache.as_ref().map_or(0, |c| c.cached_chunks as u64),
        cluster: Some(cluster),
    })
}

async fn handle_control(node: NodeId, volumes: Volumes, req: ControlRequest) -> ControlResponse {
    let wanted = req.volume().map(str::to_owned);
    let selected: Vec<(VolumeConfig, RunningHandles)> = {
        let map = match volumes.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        match &wanted {
            Some(name) => match map.get(name) {
                Some(v) => vec![v.clone()],
                None => {
                    return ControlResponse::error(format!(
                        "no such volume {name:?} (this agent runs {})",
                        map.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                }
            },
            None => map.values().cloned().collect(),
        }
    };
    match req {
        ControlRequest::Status { .. } => {
            let mut out = Vec::new();
            for (config, handles) in &selected {
                match volume_status(node, config, handles).await {
                    Ok(s) => out.push(s),
                    Err(message) => return ControlResponse::error(message),
                }
            }
            ControlResponse::Status { volumes: out }
        }
        req => {
            let Some((config, handles)) = selected.into_iter().next() else {
                return ControlResponse::error("no volume");
            };
            let client = handles.client.borrow().clone();
            match client {
                Some(v) => crate::snapshot_ops::handle(&config.name, &v, req).await,
                None => ControlResponse::error(format!(
                    "volume {:?} has no server yet (see csnapctl status)",
                    config.name
                )),
            }
        }
    }
}

/// How often the agent tries to reach corosync while it is not running.
const COROSYNC_RETRY: Duration = Duration::from_secs(2);

/// Starts watching the configuration in cmap: the configuration there now and the watch.
fn watch_config() -> Result<(Result<ParsedConfig, ConfigError>, ConfigWatch), String> {
    let cmap = Cmap::connect().map_err(|e| format!("cannot connect to corosync's cmap: {e}"))?;
    ConfigWatch::start(cmap).map_err(|e| format!("cannot watch corosync.conf through cmap: {e}"))
}

/// Waits (until SIGTERM/SIGINT: `None`) for corosync to answer, then returns the
/// configuration, its watch and the local node id. A csnap section that is invalid at
/// start is an error: there is no previous configuration to keep.
async fn reach_corosync(
    sigterm: &mut tokio::signal::unix::Signal,
    notifier: &notify::Notifier,
) -> anyhow::Result<Option<(ParsedConfig, ConfigWatch, NodeId)>> {
    let mut logged = false;
    loop {
        let attempt = watch_config().and_then(|(initial, watch)| {
            let id = cpg_glue::corosync::local_node_id()
                .map_err(|e| format!("cannot ask corosync for the local node id: {e}"))?;
            Ok((initial, watch, id))
        });
        let waiting = match attempt {
            Ok((Ok(parsed), watch, id)) => return Ok(Some((parsed, watch, id))),
            Ok((Err(ConfigError::Invalid { key, detail }), _, _)) => {
                anyhow::bail!("corosync.conf key {key}: {detail}")
            }
            Ok((Err(ConfigError::Cmap(e)), _, _)) => e.to_string(),
            Err(e) => e,
        };
        if !logged {
            tracing::warn!(error = %waiting, "waiting for corosync (retrying every {COROSYNC_RETRY:?})");
            notifier.send(&format!("STATUS=waiting for corosync: {waiting}"));
            logged = true;
        }
        tokio::select! {
            _ = sigterm.recv() => return Ok(None),
            _ = tokio::signal::ctrl_c() => return Ok(None),
            _ = tokio::time::sleep(COROSYNC_RETRY) => {}
        }
    }
}

/// Runs cluster mode until SIGTERM/SIGINT.
pub async fn run(options: DaemonOptions) -> anyhow::Result<()> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let notifier = Arc::new(notify::Notifier::from_env());
    let Some((parsed, config_watch, id)) = reach_corosync(&mut sigterm, &notifier).await? else {
        return Ok(());
    };
    let mut config_watch = Some(config_watch);
    for w in &parsed.warnings {
        tracing::warn!(key = %w.key, "corosync.conf: {}", w.detail);
    }
    let mut config = parsed.config;
    let key = server_net::key::load_key_file(&config.key_file)?;
    let node = Node {
        id,
        key,
        key_file: config.key_file.clone(),
        options: options.clone(),
        corosync_lost: Arc::default(),
        fencer: Arc::new(ClusterFencer {
            names: config
                .nodes
                .iter()
                .filter_map(|(id, n)| {
                    n.name
                        .clone()
                        .or_else(|| n.ring0_addr.clone())
                        .map(|name| (*id, name))
                })
                .collect(),
            stonith_admin: PathBuf::from("stonith_admin"),
        }),
    };

    let mut running: BTreeMap<String, RunningVolume> = BTreeMap::new();
    let volumes: Volumes = Arc::default();
    let sync_handles = |running: &BTreeMap<String, RunningVolume>, volumes: &Volumes| {
        let mut map = match volumes.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.clear();
        for (name, v) in running {
            map.insert(
                name.clone(),
                (
                    v.config.clone(),
                    RunningHandles {
                        requests: v.requests.clone(),
                        client: v.client.clone(),
                    },
                ),
            );
        }
    };
    for v in config.volumes.values() {
        running.insert(v.name.clone(), node.start_volume(&config, v));
    }
    sync_handles(&running, &volumes);

    let control_path = options
        .control_socket
        .clone()
        .unwrap_or_else(|| config.control_socket.clone());
    if let Some(dir) = control_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let control = crate::control::bind(&control_path)?;
    let handler = {
        let volumes = volumes.clone();
        Arc::new(move |req: ControlRequest| handle_control(id, volumes.clone(), req))
    };
    let control_task = tokio::spawn(crate::control::serve(
        control,
        crate::control::Identity::this_host(Some(id.0)),
        handler,
    ));
    // READY=1 once every volume joined its group (the control socket is bound already).
    let ready_task = {
        let notifier = notifier.clone();
        let mut joined: Vec<watch::Receiver<bool>> =
            running.values().map(|v| v.joined.clone()).collect();
        tokio::spawn(async move {
            for j in &mut joined {
                if j.wait_for(|joined| *joined).await.is_err() {
                    return;
                }
            }
            notifier.send("READY=1\nSTATUS=every volume joined its group");
            tracing::info!("every volume joined its group (systemd notified)");
        })
    };
    let watchdog_every = notifier
        .watchdog()
        .map(|w| w / 2)
        .unwrap_or(Duration::from_secs(3600));
    let mut watchdog = tokio::time::interval(watchdog_every);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Without a watch (corosync went away), try to set one up again on this beat.
    let mut rewatch = tokio::time::interval(COROSYNC_RETRY);
    rewatch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(node = id.0, volumes = ?running.keys().collect::<Vec<_>>(),
        control = %control_path.display(), "csnap-agent ready (cluster mode)");

    loop {
        let change = tokio::select! {
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            change = next_change(&mut config_watch) => change,
            _ = rewatch.tick(), if config_watch.is_none() => match watch_config() {
                Ok((initial, watch)) => {
                    tracing::info!("cmap watch set up again: following corosync.conf reloads");
                    config_watch = Some(watch);
                    // What the configuration is now counts as a reload.
                    initial
                }
                Err(e) => {
                    tracing::debug!(error = %e, "corosync does not answer yet");
                    continue;
                }
            },
            _ = node.corosync_lost.notified() => {
                if config_watch.take().is_some() {
                    tracing::warn!("corosync went away under a volume: setting the cmap watch up again once it answers");
                }
                continue;
            }
            _ = watchdog.tick() => {
                // Ping only when every volume's event loop answers (a stuck loop must let
                // systemd's watchdog restart the agent), and say where each volume is.
                match volumes_summary(id, &volumes, watchdog_every / 2).await {
                    Some(summary) => notifier.send(&format!("WATCHDOG=1\nSTATUS={summary}")),
                    None => tracing::error!("a volume's event loop does not answer: no watchdog ping"),
                }
                continue;
            }
        };
        match change {
            Ok(parsed) => {
                for w in &parsed.warnings {
                    tracing::warn!(key = %w.key, "corosync.conf: {}", w.detail);
                }
                config = parsed.config;
                apply_config(&node, &mut running, &config).await;
                sync_handles(&running, &volumes);
            }
            Err(ConfigError::Invalid { key, detail }) => tracing::error!(%key, %detail,
                "corosync.conf reload: the csnap section is invalid; keeping the running configuration"),
            Err(ConfigError::Cmap(e)) => {
                tracing::warn!(error = %e, "lost the cmap watch (corosync restarted?); reloads are followed again once corosync answers");
                config_watch = None;
            }
        }
    }
    tracing::info!("csnap-agent stopping");
    notifier.send("STOPPING=1\nSTATUS=stopping");
    ready_task.abort();
    control_task.abort();
    let _ = std::fs::remove_file(&control_path);
    let stops = running
        .into_iter()
        .map(|(name, v)| async move { stop_volume(&name, v).await });
    futures::future::join_all(stops).await;
    Ok(())
}

/// One line for systemd's STATUS: each volume's role, server and gate. `None` if a
/// volume's event loop did not answer within `limit`.
async fn volumes_summary(node: NodeId, volumes: &Volumes, limit: Duration) -> Option<String> {
    let selected: Vec<(VolumeConfig, RunningHandles)> = {
        let map = match volumes.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.values().cloned().collect()
    };
    let mut parts = Vec::new();
    for (config, handles) in &selected {
        let (tx, rx) = oneshot::channel();
        handles.requests.send(VolumeRequest::Status(tx)).ok()?;
        let (cluster, _) = tokio::time::timeout(limit, rx).await.ok()?.ok()?;
        let server = match cluster.server_node {
            Some(n) if n == node.0 => "served here".to_owned(),
            Some(n) => format!("server on node {n}"),
            None => "no server".to_owned(),
        };
        parts.push(format!(
            "{}: {} ({server}, generation {}, gate {})",
            config.name, cluster.role, cluster.generation, cluster.gate
        ));
    }
    Some(if parts.is_empty() {
        "no volumes configured".to_owned()
    } else {
        parts.join("; ")
    })
}

/// The next configuration change; pending while there is no watch (corosync went away:
/// the main loop sets one up again every [`COROSYNC_RETRY`]).
async fn next_change(watch: &mut Option<ConfigWatch>) -> Result<ParsedConfig, ConfigError> {
    match watch {
        Some(w) => match w.next().await {
            Some(change) => change,
            None => Err(ConfigError::Cmap(cpg_glue::GroupError::Disconnected {
                group: "cmap".into(),
                detail: "the configuration watch ended".into(),
            })),
        },
        None => std::future::pending().await,
    }
}

/// Brings the running volumes in line with `new`: volumes removed or changed stop, new
/// ones start, priority and fencing changes go to every running volume.
async fn apply_config(
    node: &Node,
    running: &mut BTreeMap<String, RunningVolume>,
    new: &CsnapConfig,
) {
    let removed: Vec<String> = running
        .keys()
        .filter(|name| new.volumes.get(*name) != running.get(*name).map(|v| &v.config))
        .cloned()
        .collect();
    for name in removed {
        if let Some(v) = running.remove(&name) {
            tracing::info!(volume = %name, "volume removed or changed in corosync.conf: stopping it");
            stop_volume(&name, v).await;
        }
    }
    for v in new.volumes.values() {
        if !running.contains_key(&v.name) {
            tracing::info!(volume = %v.name, "volume added or changed in corosync.conf: starting it");
            running.insert(v.name.clone(), node.start_volume(new, v));
        }
    }
    let priorities: BTreeMap<NodeId, i32> =
        new.nodes.iter().map(|(id, n)| (*id, n.priority)).collect();
    for v in running.values() {
        let _ = v.requests.send(VolumeRequest::Config {
            priorities: priorities.clone(),
            fencing: new.fencing.clone(),
        });
    }
}
