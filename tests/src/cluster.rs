//! The N-node corosync cluster in network namespaces.
//!
//! Layout of one run (run id `R`, node `N`):
//! * network namespace `cseRnN` with `lo` and `eth0` = 10.77.0.N/24, whose host end is the
//!   veth `cseRvN`, a port of the main bridge `cseRb0` (or of a side bridge while
//!   partitioned: partitions move veths between bridges, heal moves them all back);
//! * directory `/tmp/csnap-e2e/cseR/nN` with corosync.conf, corosync.log, corosync's
//!   state_dir and a private `run/` that is bind-mounted over `/run` in the node's own
//!   mount namespace (corosync allows one instance per `/run/corosync.pid`);
//! * one `corosync -f` per node, started from `ip netns exec cseRnN unshare -m ...`, its pid
//!   kept (the execs keep the pid, so it is corosync's own).
//!
//! Corosync clients reach a node's corosync through libqb IPC on abstract unix sockets,
//! which are per network namespace: `corosync-*` tools run with `ip netns exec`, and
//! in-process clients are created on a thread that entered the namespace
//! ([`Cluster::run_in_node`]).
//!
//! One cluster at a time runs on the machine (a `flock` on `/tmp/csnap-e2e.lock`), which
//! keeps a 2-core box from drowning in corosyncs and makes everything of our shape found
//! while holding the lock provably stale, so it is swept away first.
//!
//! Operations are blocking at heart (they run `ip` and corosync tools); the async methods
//! run them on tokio's blocking pool so group streams keep being polled meanwhile.
//! Everything is removed on drop, panics included; set `CSNAP_E2E_KEEP=1` to keep the
//! run directory (configs and logs) for a post-mortem.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use cpg_glue::NodeId;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cmd::{self, run, run_ok, run_ok_with_stdin, CmdOutput, COMMAND_TIMEOUT};
use crate::conf::{ConfSpec, CsnapSection, NodeSpec};
use crate::error::HarnessError;
use crate::names::RunNames;
use crate::prereq::{find_program, missing_prerequisites, prerequisites_or_skip};
use crate::spawn::Spawner;
use crate::sweep::{self, Runs};
use crate::topology::{assign_bridges, expected_views};
use crate::view::{parse_quorumtool, NodeView};

/// Where run directories live.
pub const BASE_DIR: &str = "/tmp/csnap-e2e";
/// The machine-wide cluster lock.
pub const LOCK_FILE: &str = "/tmp/csnap-e2e.lock";
/// Most nodes a cluster may have (addresses 10.77.0.1 .. 10.77.0.N).
pub const MAX_NODES: u32 = 32;

/// How long `start` waits for another run to release the machine.
const LOCK_WAIT: Duration = Duration::from_secs(900);
/// SIGTERM grace before SIGKILL when stopping a corosync (a clean leave takes ~2.5 s).
const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long a SIGKILLed process may take to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);
/// Bound for a closure run inside a node's namespace.
const IN_NODE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two membership polls.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How to build a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Number of nodes; ids are 1..=nodes.
    pub nodes: u32,
    /// Totem token timeout. 1000 ms detects a partition in ~3.5 s and has proved stable
    /// on a loaded 2-core machine, since corosync runs with realtime priority.
    pub token_ms: u32,
    /// `csnap_priority` per node (nodes not named get none).
    pub priorities: BTreeMap<NodeId, u32>,
    /// The `csnap { ... }` section every node starts with.
    pub csnap: CsnapSection,
    /// Text appended verbatim to every node's corosync.conf, now and on every rewrite
    /// (for hand-written sections the tests want corosync itself to parse).
    pub extra_conf: String,
    /// Bound for the initial membership to form.
    pub start_timeout: Duration,
    /// Bound for one membership change to be seen everywhere.
    pub settle_timeout: Duration,
}

impl ClusterConfig {
    pub fn new(nodes: u32) -> Self {
        ClusterConfig {
            nodes,
            token_ms: 1000,
            priorities: BTreeMap::new(),
            csnap: CsnapSection::new(),
            extra_conf: String::new(),
            start_timeout: Duration::from_secs(60),
            settle_timeout: Duration::from_secs(30),
        }
    }

    pub fn token_ms(mut self, token_ms: u32) -> Self {
        self.token_ms = token_ms;
        self
    }

    pub fn priority(mut self, node: u32, priority: u32) -> Self {
        self.priorities.insert(NodeId(node), priority);
        self
    }

    pub fn csnap(mut self, section: CsnapSection) -> Self {
        self.csnap = section;
        self
    }

    pub fn extra_conf(mut self, text: impl Into<String>) -> Self {
        self.extra_conf = text.into();
        self
    }
}

/// A running N-node corosync cluster; removed again on drop.
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    names: RunNames,
    dir: PathBuf,
    config: ClusterConfig,
    specs: Vec<NodeSpec>,
    state: Mutex<State>,
    spawner: Spawner,
    /// Declared last so it is released after teardown (fields drop in order).
    _lock: Flock<File>,
}

#[derive(Default)]
struct State {
    /// Corosync processes not yet reaped, by node.
    procs: BTreeMap<NodeId, Child>,
    /// How each node's last corosync ended, for error messages.
    exits: BTreeMap<NodeId, ExitStatus>,
    /// Bridge index each node's veth is on (0 = main bridge).
    side: BTreeMap<NodeId, u32>,
    /// Bridges created so far.
    bridges: BTreeSet<u32>,
    /// Current csnap section per node.
    csnap: BTreeMap<NodeId, CsnapSection>,
    /// Other long-running processes started in nodes ([`Cluster::spawn_in_node`]), by pid.
    spawned: BTreeMap<u32, (NodeId, Child)>,
    /// Every process of this run that may hold libqb IPC files in `/dev/shm` (corosyncs,
    /// spawned processes, whatever ran in the namespaces): removed at teardown.
    ipc_pids: BTreeSet<u32>,
}

impl Cluster {
    /// Builds an `n`-node cluster with default settings and waits until every node sees
    /// all `n` members.
    pub async fn start(n: u32) -> Result<Cluster, HarnessError> {
        Self::start_with(ClusterConfig::new(n)).await
    }

    /// Builds a cluster as `config` says and waits until every node sees all members.
    pub async fn start_with(config: ClusterConfig) -> Result<Cluster, HarnessError> {
        let inner = tokio::task::spawn_blocking(move || Inner::start(config))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        Ok(Cluster {
            inner: Arc::new(inner),
        })
    }

    /// For tests: checks prerequisites (skipping loudly, or failing under `CI=true`, see
    /// [`prerequisites_or_skip`]) and starts the cluster, panicking if that fails.
    pub async fn start_or_skip(test: &str, config: ClusterConfig) -> Option<Cluster> {
        if !prerequisites_or_skip(test) {
            return None;
        }
        match Self::start_with(config).await {
            Ok(cluster) => Some(cluster),
            Err(e) => panic!("{test}: cannot start the corosync test cluster: {e}"),
        }
    }

    /// Node ids, sorted.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.inner.specs.iter().map(|s| s.id).collect()
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    /// The run's names (namespaces, links).
    pub fn names(&self) -> &RunNames {
        &self.inner.names
    }

    /// The run directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Node `node`'s directory: corosync.conf, corosync.log, state files.
    pub fn node_dir(&self, node: NodeId) -> PathBuf {
        self.inner.node_dir(node)
    }

    /// Name of `node`'s network namespace.
    pub fn netns(&self, node: NodeId) -> String {
        self.inner.names.netns(node.0)
    }

    /// Node `node`'s address on the test network.
    pub fn addr(&self, node: NodeId) -> Option<Ipv4Addr> {
        self.inner.spec(node).ok().map(|s| s.addr)
    }

    /// The `csnap` section `node`'s corosync.conf has now.
    pub fn csnap_section(&self, node: NodeId) -> Option<CsnapSection> {
        self.inner.state().csnap.get(&node).cloned()
    }

    /// Pid of `node`'s corosync, if it is running.
    pub fn pid(&self, node: NodeId) -> Option<u32> {
        self.inner.pid(node)
    }

    /// Whether `node`'s corosync is running (reaps it if it exited on its own).
    pub fn is_running(&self, node: NodeId) -> bool {
        self.inner.pid(node).is_some()
    }

    /// The last `lines` lines of `node`'s corosync.log.
    pub fn log_tail(&self, node: NodeId, lines: usize) -> String {
        self.inner.log_tail(node, lines)
    }

    /// Starts `node`'s corosync (it must not be running). Does not wait for membership.
    pub async fn start_node(&self, node: NodeId) -> Result<(), HarnessError> {
        self.blocking(move |inner| inner.start_node(node)).await
    }

    /// Stops `node`'s corosync: SIGTERM (a clean leave), SIGKILL after a grace period.
    pub async fn stop_node(&self, node: NodeId) -> Result<(), HarnessError> {
        self.blocking(move |inner| inner.stop_node(node)).await
    }

    /// Kills `node`'s corosync with SIGKILL (a crash: no leave message).
    pub async fn kill_node(&self, node: NodeId) -> Result<(), HarnessError> {
        self.blocking(move |inner| inner.kill_node(node)).await
    }

    /// Stops `node`'s corosync if running, then starts it again.
    pub async fn restart_node(&self, node: NodeId) -> Result<(), HarnessError> {
        self.blocking(move |inner| {
            if inner.pid(node).is_some() {
                inner.stop_node(node)?;
            }
            inner.start_node(node)
        })
        .await
    }

    /// Waits (bounded) until `node`'s corosync has exited on its own (e.g. cfg kill_node).
    pub async fn wait_exited(
        &self,
        node: NodeId,
        timeout: Duration,
    ) -> Result<ExitStatus, HarnessError> {
        self.blocking(move |inner| inner.wait_exited(node, timeout))
            .await
    }

    /// Splits the network: each slice is one partition, nodes in no slice are isolated
    /// alone. Replaces any earlier partitioning. Does not wait for membership.
    pub async fn partition(&self, sides: &[Vec<NodeId>]) -> Result<(), HarnessError> {
        let sides = sides.to_vec();
        self.blocking(move |inner| inner.partition(&sides)).await
    }

    /// Reconnects every node with every other. Does not wait for membership.
    pub async fn heal(&self) -> Result<(), HarnessError> {
        self.blocking(|inner| inner.heal()).await
    }

    /// Starts a long-running `program args...` inside `node`'s network namespace (e.g. a
    /// csnap agent; it shares the host's mount namespace and /run, not corosync's), its
    /// stdout and stderr appended to `<node dir>/<log_name>.log`.
    /// Returns its pid; it is SIGKILLed when the cluster is dropped, or earlier with
    /// [`Self::stop_spawned`].
    pub async fn spawn_in_node(
        &self,
        node: NodeId,
        program: &str,
        args: &[&str],
        log_name: &str,
    ) -> Result<u32, HarnessError> {
        let mut cmd = self.inner.in_netns(node, program)?;
        cmd.args(args);
        let log_name = log_name.to_string();
        self.blocking(move |inner| inner.spawn_in_node(node, cmd, &log_name))
            .await
    }

    /// Like [`Self::spawn_in_node`], but with `env` added and stdout and stderr going to
    /// `output` (e.g. a journal stream socket, see `crate::journald`).
    pub async fn spawn_in_node_with_output(
        &self,
        node: NodeId,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        output: File,
    ) -> Result<u32, HarnessError> {
        let mut cmd = self.inner.in_netns(node, program)?;
        cmd.args(args);
        cmd.envs(env.iter().copied());
        let err = output
            .try_clone()
            .map_err(|e| HarnessError::io("dup the output file", e))?;
        self.blocking(move |inner| inner.spawn_with_output(node, cmd, output, err))
            .await
    }

    /// Records processes this run killed or will kill that it did not start itself (e.g.
    /// pacemaker's daemons), so teardown removes their libqb IPC files from `/dev/shm`.
    pub fn note_ipc_pids(&self, pids: impl IntoIterator<Item = u32>) {
        self.inner.state().ipc_pids.extend(pids);
    }

    /// Signals a process started by [`Self::spawn_in_node`], SIGKILLs it after `grace`,
    /// reaps it and returns how it ended.
    pub async fn stop_spawned(
        &self,
        pid: u32,
        signal: Signal,
        grace: Duration,
    ) -> Result<ExitStatus, HarnessError> {
        self.blocking(move |inner| inner.stop_spawned(pid, signal, grace))
            .await
    }

    /// Runs `program args...` inside `node`'s network namespace.
    pub async fn exec(
        &self,
        node: NodeId,
        program: &str,
        args: &[&str],
    ) -> Result<CmdOutput, HarnessError> {
        let mut cmd = self.inner.in_netns(node, program)?;
        cmd.args(args);
        self.blocking(move |_| run(&mut cmd, None, COMMAND_TIMEOUT))
            .await
    }

    /// [`Self::exec`], requiring success; returns stdout.
    pub async fn exec_ok(
        &self,
        node: NodeId,
        program: &str,
        args: &[&str],
    ) -> Result<String, HarnessError> {
        let mut cmd = self.inner.in_netns(node, program)?;
        cmd.args(args);
        self.blocking(move |_| run_ok(&mut cmd, COMMAND_TIMEOUT))
            .await
    }

    /// What `node`'s corosync reports (`corosync-quorumtool -s`).
    pub async fn view(&self, node: NodeId) -> Result<NodeView, HarnessError> {
        self.blocking(move |inner| inner.view(node)).await
    }

    /// Rewrites the `csnap` section of the listed nodes' corosync.conf and has corosync
    /// reload its configuration (`corosync-cfgtool -R`, run on the first listed node that is
    /// running; the reload is cluster-wide, each node re-reading its own file).
    pub async fn set_csnap(
        &self,
        nodes: &[NodeId],
        section: CsnapSection,
    ) -> Result<(), HarnessError> {
        let nodes = nodes.to_vec();
        self.blocking(move |inner| inner.set_csnap(&nodes, &section))
            .await
    }

    /// Waits (bounded by the settle timeout) until every running node sees exactly the
    /// running nodes on its side of the network, the nodes of one side agree on the ring
    /// id, and exactly the sides holding a majority of all nodes are quorate.
    pub async fn wait_converged(&self) -> Result<BTreeMap<NodeId, NodeView>, HarnessError> {
        let timeout = self.inner.config.settle_timeout;
        self.blocking(move |inner| inner.wait_converged(timeout))
            .await
    }

    /// Runs `f` on a fresh thread that entered `node`'s network namespace and the current
    /// tokio runtime, so corosync clients created in `f` (CPG, quorum, cmap, cfg) talk to
    /// that node's corosync; their file descriptors work from any thread afterwards.
    /// Must be called from within a tokio runtime. Bounded: 60 s.
    pub async fn run_in_node<F, R>(&self, node: NodeId, f: F) -> Result<R, HarnessError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        self.inner.spec(node)?;
        let ns_path = PathBuf::from("/run/netns").join(self.netns(node));
        let ns = File::open(&ns_path)
            .map_err(|e| HarnessError::io(format!("open {}", ns_path.display()), e))?;
        let runtime = tokio::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        thread::Builder::new()
            .name(format!("cse-in-n{node}"))
            .spawn(move || {
                let entered = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET);
                drop(ns);
                let result = match entered {
                    Ok(()) => {
                        let _guard = runtime.enter();
                        Ok(f())
                    }
                    Err(errno) => Err(HarnessError::io(
                        format!("enter the network namespace of node {node}"),
                        errno.into(),
                    )),
                };
                let _ = tx.send(result);
            })
            .map_err(|e| HarnessError::io("start a thread for run_in_node", e))?;
        match tokio::time::timeout(IN_NODE_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(HarnessError::NodeState {
                node,
                detail: "the closure given to run_in_node panicked".into(),
            }),
            Err(_) => Err(HarnessError::Timeout {
                what: format!("a closure run in node {node}"),
                waited: IN_NODE_TIMEOUT,
                last: "still running".into(),
            }),
        }
    }

    /// Like [`Cluster::run_in_node`] for async work: the future `f` makes is driven to
    /// completion on the namespace thread (with the current runtime's drivers), so every
    /// connection attempt it makes, including retries, happens inside `node`'s namespace.
    pub async fn run_async_in_node<F, Fut, R>(&self, node: NodeId, f: F) -> Result<R, HarnessError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = R>,
        R: Send + 'static,
    {
        let runtime = tokio::runtime::Handle::current();
        self.run_in_node(node, move || runtime.block_on(f())).await
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, HarnessError>
    where
        F: FnOnce(&Inner) -> Result<T, HarnessError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }
}

impl Inner {
    fn start(config: ClusterConfig) -> Result<Inner, HarnessError> {
        let missing = missing_prerequisites();
        if !missing.is_empty() {
            return Err(HarnessError::Prerequisite(missing.join(", ")));
        }
        if config.nodes == 0 || config.nodes > MAX_NODES {
            return Err(HarnessError::invalid(
                "cluster size",
                format!("{} nodes (1..={MAX_NODES})", config.nodes),
            ));
        }
        if let Some(node) = config
            .priorities
            .keys()
            .find(|n| n.0 == 0 || n.0 > config.nodes)
        {
            return Err(HarnessError::UnknownNode(*node));
        }
        let base = Path::new(BASE_DIR);
        std::fs::create_dir_all(base)
            .map_err(|e| HarnessError::io(format!("create {BASE_DIR}"), e))?;
        let lock = acquire_lock()?;
        let swept = sweep::sweep_stale(base);
        if !swept.is_empty() {
            eprintln!(
                "csnap-e2e: removed leftovers of an earlier crashed run: {}",
                swept.join(", ")
            );
        }

        let names = RunNames::random();
        let dir = base.join(format!("{}{}", crate::names::PREFIX, names.run_id()));
        let specs: Vec<NodeSpec> = (1..=config.nodes)
            .map(|id| NodeSpec {
                id: NodeId(id),
                addr: Ipv4Addr::new(10, 77, 0, id as u8),
                priority: config.priorities.get(&NodeId(id)).copied(),
            })
            .collect();
        let state = State {
            csnap: specs.iter().map(|s| (s.id, config.csnap.clone())).collect(),
            side: specs.iter().map(|s| (s.id, 0)).collect(),
            ..State::default()
        };
        let spawner =
            Spawner::new().map_err(|e| HarnessError::io("start the spawner thread", e))?;
        // From here on, dropping `inner` (also on an early error return) removes whatever
        // was created so far.
        let inner = Inner {
            names,
            dir,
            config,
            specs,
            state: Mutex::new(state),
            spawner,
            _lock: lock,
        };
        inner.build_network()?;
        for spec in &inner.specs {
            let node_dir = inner.node_dir(spec.id);
            std::fs::create_dir_all(&node_dir)
                .map_err(|e| HarnessError::io(format!("create {}", node_dir.display()), e))?;
            inner.write_conf(spec.id, &inner.config.csnap)?;
        }
        for spec in &inner.specs {
            inner.start_node(spec.id)?;
        }
        inner.wait_converged(inner.config.start_timeout)?;
        // A corosync that exited at once (e.g. refusing its corosync.conf) is not running,
        // and a cluster of no running nodes counts as converged: say so instead.
        for spec in &inner.specs {
            if inner.pid(spec.id).is_none() {
                return Err(HarnessError::NodeState {
                    node: spec.id,
                    detail: format!(
                        "corosync exited while the cluster started (does it refuse its \
                         corosync.conf?); its log ends:\n{}",
                        inner.log_tail(spec.id, 20)
                    ),
                });
            }
        }
        Ok(inner)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spec(&self, node: NodeId) -> Result<&NodeSpec, HarnessError> {
        self.specs
            .iter()
            .find(|s| s.id == node)
            .ok_or(HarnessError::UnknownNode(node))
    }

    fn node_dir(&self, node: NodeId) -> PathBuf {
        self.dir.join(format!("n{node}"))
    }

    fn conf_path(&self, node: NodeId) -> PathBuf {
        self.node_dir(node).join("corosync.conf")
    }

    fn log_tail(&self, node: NodeId, lines: usize) -> String {
        let mut out = String::new();
        for file in ["corosync.log", "corosync.out"] {
            let text = std::fs::read_to_string(self.node_dir(node).join(file)).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            for line in &all[all.len().saturating_sub(lines)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// `ip netns exec <node's netns> <program>`.
    fn in_netns(&self, node: NodeId, program: &str) -> Result<Command, HarnessError> {
        self.spec(node)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names.netns(node.0), program]);
        Ok(cmd)
    }

    /// Bridge, namespaces, veths (one `ip -batch` on the host), then each namespace's
    /// addresses and links (one `ip -n NS -batch` each).
    fn build_network(&self) -> Result<(), HarnessError> {
        let main = self.names.bridge(0);
        self.state().bridges.insert(0);
        let mut host = format!("link add {main} type bridge\nlink set {main} up\n");
        for spec in &self.specs {
            let (ns, veth) = (self.names.netns(spec.id.0), self.names.veth(spec.id.0));
            host.push_str(&format!(
                "netns add {ns}\n\
                 link add {veth} type veth peer name eth0 netns {ns}\n\
                 link set {veth} master {main} up\n"
            ));
        }
        ip_batch(None, &host)?;
        for spec in &self.specs {
            let ns = self.names.netns(spec.id.0);
            ip_batch(
                Some(&ns),
                &format!(
                    "addr add {}/24 dev eth0\nlink set eth0 up\nlink set lo up\n",
                    spec.addr
                ),
            )?;
        }
        Ok(())
    }

    fn write_conf(&self, node: NodeId, csnap: &CsnapSection) -> Result<(), HarnessError> {
        let node_dir = self.node_dir(node);
        let text = ConfSpec {
            cluster_name: &format!("cse{}", self.names.run_id()),
            token_ms: self.config.token_ms,
            nodes: &self.specs,
            node_dir: &node_dir,
            csnap,
            extra: &self.config.extra_conf,
        }
        .render();
        let path = self.conf_path(node);
        let tmp = path.with_extension("conf.new");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| HarnessError::io(format!("write {}", path.display()), e))
    }

    fn pid(&self, node: NodeId) -> Option<u32> {
        let mut state = self.state();
        let child = state.procs.get_mut(&node)?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            Ok(Some(status)) => {
                state.procs.remove(&node);
                state.exits.insert(node, status);
                None
            }
            // Cannot tell: treat as running so nobody starts a second instance.
            Err(_) => Some(child.id()),
        }
    }

    fn start_node(&self, node: NodeId) -> Result<(), HarnessError> {
        self.spec(node)?;
        if let Some(pid) = self.pid(node) {
            return Err(HarnessError::NodeState {
                node,
                detail: format!("corosync already running (pid {pid})"),
            });
        }
        let node_dir = self.node_dir(node);
        // A fresh /run each time: a SIGKILLed corosync leaves its pid file behind.
        let run_dir = node_dir.join("run");
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| HarnessError::io(format!("create {}", run_dir.display()), e))?;
        let out_path = node_dir.join("corosync.out");
        let out = File::options()
            .create(true)
            .append(true)
            .open(&out_path)
            .map_err(|e| HarnessError::io(format!("open {}", out_path.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| HarnessError::io(format!("dup {}", out_path.display()), e))?;
        let corosync = find_program("corosync")
            .ok_or_else(|| HarnessError::Prerequisite("program `corosync`".into()))?;
        let mut cmd = Command::new("ip");
        // Paths go in as positional parameters, so no quoting is needed.
        cmd.args(["netns", "exec", &self.names.netns(node.0)])
            .args(["unshare", "--mount", "--propagation", "private"])
            .args([
                "sh",
                "-c",
                "mount --bind \"$1\" /run && exec \"$2\" -f -c \"$3\"",
                "sh",
            ])
            .arg(&run_dir)
            .arg(&corosync)
            .arg(self.conf_path(node))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = self
            .spawner
            .spawn(cmd)
            .map_err(|e| HarnessError::io(format!("start corosync on node {node}"), e))?;
        let mut state = self.state();
        state.exits.remove(&node);
        state.ipc_pids.insert(child.id());
        state.procs.insert(node, child);
        Ok(())
    }

    fn spawn_in_node(
        &self,
        node: NodeId,
        cmd: Command,
        log_name: &str,
    ) -> Result<u32, HarnessError> {
        if log_name.is_empty()
            || !log_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(HarnessError::invalid(
                "log name",
                format!("{log_name:?}: use [A-Za-z0-9_-]+"),
            ));
        }
        let path = self.node_dir(node).join(format!("{log_name}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| HarnessError::io(format!("open {}", path.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| HarnessError::io(format!("dup {}", path.display()), e))?;
        self.spawn_with_output(node, cmd, out, err)
    }

    fn spawn_with_output(
        &self,
        node: NodeId,
        mut cmd: Command,
        out: File,
        err: File,
    ) -> Result<u32, HarnessError> {
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let what = cmd::describe(&cmd);
        let child = self
            .spawner
            .spawn(cmd)
            .map_err(|e| HarnessError::io(format!("start `{what}`"), e))?;
        let pid = child.id();
        let mut state = self.state();
        state.ipc_pids.insert(pid);
        state.spawned.insert(pid, (node, child));
        Ok(pid)
    }

    fn stop_spawned(
        &self,
        pid: u32,
        signal: Signal,
        grace: Duration,
    ) -> Result<ExitStatus, HarnessError> {
        let Some((node, mut child)) = self.state().spawned.remove(&pid) else {
            return Err(HarnessError::invalid(
                "pid",
                format!("{pid} was not started by spawn_in_node (or was stopped already)"),
            ));
        };
        stop_child(&mut child, signal, grace).ok_or_else(|| HarnessError::NodeState {
            node,
            detail: format!("process {pid} did not exit even after SIGKILL"),
        })
    }

    fn stop_node(&self, node: NodeId) -> Result<(), HarnessError> {
        self.end_process(node, Signal::SIGTERM, STOP_GRACE)
    }

    fn kill_node(&self, node: NodeId) -> Result<(), HarnessError> {
        self.end_process(node, Signal::SIGKILL, REAP_WAIT)
    }

    /// Sends `signal`, waits up to `grace`, then SIGKILLs and reaps.
    fn end_process(
        &self,
        node: NodeId,
        signal: Signal,
        grace: Duration,
    ) -> Result<(), HarnessError> {
        self.spec(node)?;
        let Some(mut child) = self.state().procs.remove(&node) else {
            return Err(HarnessError::NodeState {
                node,
                detail: "corosync is not running".into(),
            });
        };
        let status = stop_child(&mut child, signal, grace);
        match status {
            Some(status) => {
                self.state().exits.insert(node, status);
                Ok(())
            }
            None => {
                let pid = child.id();
                self.state().procs.insert(node, child);
                Err(HarnessError::NodeState {
                    node,
                    detail: format!("corosync pid {pid} did not exit even after SIGKILL"),
                })
            }
        }
    }

    fn wait_exited(&self, node: NodeId, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.pid(node).is_none() {
                return self.state().exits.get(&node).copied().ok_or_else(|| {
                    HarnessError::NodeState {
                        node,
                        detail: "corosync was never started".into(),
                    }
                });
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("corosync on node {node} to exit"),
                    waited: timeout,
                    last: "still running".into(),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn partition(&self, sides: &[Vec<NodeId>]) -> Result<(), HarnessError> {
        let nodes: Vec<NodeId> = self.specs.iter().map(|s| s.id).collect();
        self.move_ports(&assign_bridges(&nodes, sides)?)
    }

    fn heal(&self) -> Result<(), HarnessError> {
        let assignment = self.specs.iter().map(|s| (s.id, 0)).collect();
        self.move_ports(&assignment)
    }

    /// Puts each node's veth on the bridge `assignment` names, creating bridges as needed.
    fn move_ports(&self, assignment: &BTreeMap<NodeId, u32>) -> Result<(), HarnessError> {
        let mut state = self.state();
        let new_bridges: BTreeSet<u32> = assignment
            .values()
            .copied()
            .filter(|b| !state.bridges.contains(b))
            .collect();
        let mut script = String::new();
        for &bridge in &new_bridges {
            let name = self.names.bridge(bridge);
            script.push_str(&format!(
                "link add {name} type bridge\nlink set {name} up\n"
            ));
        }
        for (&node, &bridge) in assignment {
            if state.side.get(&node) != Some(&bridge) {
                script.push_str(&format!(
                    "link set {} master {}\n",
                    self.names.veth(node.0),
                    self.names.bridge(bridge)
                ));
            }
        }
        if script.is_empty() {
            return Ok(());
        }
        let result = ip_batch(None, &script);
        // Bridges may exist even if a later line failed; teardown deletes by name anyway.
        state.bridges.extend(new_bridges);
        result?;
        state.side.extend(assignment.iter().map(|(&n, &b)| (n, b)));
        Ok(())
    }

    fn view(&self, node: NodeId) -> Result<NodeView, HarnessError> {
        let mut cmd = self.in_netns(node, "corosync-quorumtool")?;
        cmd.arg("-s");
        // Exits non-zero when inquorate; the text is what counts.
        let out = run(&mut cmd, None, COMMAND_TIMEOUT)?;
        parse_quorumtool(&out.stdout).ok_or_else(|| HarnessError::Command {
            command: cmd::describe(&cmd),
            status: out.status.to_string(),
            stderr: format!("{}{}", out.stdout.trim(), out.stderr.trim()),
        })
    }

    /// What every running node should see now (see [`expected_views`]).
    fn expected_views(&self) -> BTreeMap<NodeId, (Vec<NodeId>, bool)> {
        let running: Vec<NodeId> = self
            .specs
            .iter()
            .map(|s| s.id)
            .filter(|&n| self.pid(n).is_some())
            .collect();
        let bridge_of = self.state().side.clone();
        expected_views(self.specs.len(), &running, &bridge_of)
    }

    fn wait_converged(
        &self,
        timeout: Duration,
    ) -> Result<BTreeMap<NodeId, NodeView>, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let expected = self.expected_views();
            let mut views = BTreeMap::new();
            let mut problems = Vec::new();
            for (&node, (members, quorate)) in &expected {
                match self.view(node) {
                    Ok(view) if view.members == *members && view.quorate == *quorate => {
                        views.insert(node, view);
                    }
                    Ok(view) => problems.push(format!(
                        "node {node} sees {:?} quorate={} on ring {}, expected {members:?} quorate={quorate}",
                        view.members, view.quorate, view.ring
                    )),
                    Err(e) => problems.push(format!("node {node}: {e}")),
                }
            }
            // Nodes that see the same members must agree on the ring as well.
            for (node, view) in &views {
                if let Some((other, other_view)) = views
                    .iter()
                    .find(|(_, v)| v.members == view.members && v.ring != view.ring)
                {
                    problems.push(format!(
                        "node {node} is on ring {} but node {other} on ring {}",
                        view.ring, other_view.ring
                    ));
                }
            }
            let stopped: Vec<String> = self
                .state()
                .exits
                .iter()
                .map(|(node, status)| format!("node {node} corosync exited: {status}"))
                .collect();
            if problems.is_empty() {
                return Ok(views);
            }
            if Instant::now() >= deadline {
                problems.extend(stopped);
                return Err(HarnessError::Timeout {
                    what: "the cluster membership to converge".into(),
                    waited: timeout,
                    last: problems.join("; "),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn set_csnap(&self, nodes: &[NodeId], section: &CsnapSection) -> Result<(), HarnessError> {
        for &node in nodes {
            self.spec(node)?;
        }
        for &node in nodes {
            self.write_conf(node, section)?;
            self.state().csnap.insert(node, section.clone());
        }
        let Some(&reloader) = nodes
            .iter()
            .chain(self.specs.iter().map(|s| &s.id))
            .find(|&&n| self.pid(n).is_some())
        else {
            return Ok(());
        };
        let mut cmd = self.in_netns(reloader, "corosync-cfgtool")?;
        cmd.arg("-R");
        run_ok(&mut cmd, COMMAND_TIMEOUT).map(|_| ())
    }

    fn teardown(&mut self) {
        let panicking = thread::panicking();
        let in_namespaces: Vec<u32> = self
            .specs
            .iter()
            .flat_map(|spec| sweep::pids_in_netns(&self.names.netns(spec.id.0)))
            .collect();
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        state.ipc_pids.extend(in_namespaces);
        // Processes started in nodes first, so none sees its corosync vanish.
        for (pid, (node, child)) in state.spawned.iter_mut() {
            if stop_child(child, Signal::SIGKILL, REAP_WAIT).is_none() {
                eprintln!("csnap-e2e: process {pid} in node {node} survived SIGKILL");
            }
        }
        state.spawned.clear();
        for (node, child) in state.procs.iter_mut() {
            if stop_child(child, Signal::SIGKILL, REAP_WAIT).is_none() {
                eprintln!(
                    "csnap-e2e: corosync of node {node} (pid {}) survived SIGKILL",
                    child.id()
                );
            }
        }
        state.procs.clear();
        // Everything is dead now: its libqb files in /dev/shm can go.
        let ipc_pids = std::mem::take(&mut state.ipc_pids);
        cpg_glue::testkit::remove_ipc_files_of(&ipc_pids);
        if panicking {
            for spec in &self.specs {
                eprintln!(
                    "---- csnap-e2e node {} corosync log (last lines) ----\n{}",
                    spec.id,
                    self.log_tail(spec.id, 25)
                );
            }
        }
        let (_, failed) = sweep::remove_objects(Runs::One(self.names.run_id()));
        for failure in failed {
            eprintln!("csnap-e2e: cleanup: {failure}");
        }
        if std::env::var_os("CSNAP_E2E_KEEP").is_some_and(|v| v != "0") {
            eprintln!("csnap-e2e: keeping {} (CSNAP_E2E_KEEP)", self.dir.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("csnap-e2e: cleanup: remove {}: {e}", self.dir.display());
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Signals `child`, waits up to `grace`, then SIGKILLs; `None` if it still did not exit.
fn stop_child(child: &mut Child, signal: Signal, grace: Duration) -> Option<ExitStatus> {
    let pid = Pid::from_raw(child.id() as i32);
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = kill(pid, signal);
    if let Ok(Some(status)) = cmd::wait_bounded(child, grace) {
        return Some(status);
    }
    let _ = kill(pid, Signal::SIGKILL);
    cmd::wait_bounded(child, REAP_WAIT).ok().flatten()
}

/// Runs an `ip -batch` script, in the host namespace or in `netns`.
fn ip_batch(netns: Option<&str>, script: &str) -> Result<(), HarnessError> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    run_ok_with_stdin(
        cmd.args(["-batch", "-"]),
        Some(script.as_bytes()),
        COMMAND_TIMEOUT,
    )
    .map(|_| ())
}

/// Takes the machine-wide cluster lock, waiting (bounded) for another run to finish.
fn acquire_lock() -> Result<Flock<File>, HarnessError> {
    let started = Instant::now();
    let mut announced = false;
    loop {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .map_err(|e| HarnessError::io(format!("open {LOCK_FILE}"), e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {}
            Err((_, errno)) => {
                return Err(HarnessError::io(format!("lock {LOCK_FILE}"), errno.into()))
            }
        }
        if started.elapsed() >= LOCK_WAIT {
            return Err(HarnessError::Timeout {
                what: format!("the cluster lock {LOCK_FILE}"),
                waited: LOCK_WAIT,
                last: "another csnap-e2e cluster still holds it".into(),
            });
        }
        if !announced && started.elapsed() > Duration::from_secs(2) {
            eprintln!("csnap-e2e: waiting for another test cluster to finish ({LOCK_FILE})");
            announced = true;
        }
        thread::sleep(Duration::from_millis(100));
    }
}
