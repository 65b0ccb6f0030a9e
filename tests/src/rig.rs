//! Cluster mode on real corosync, shared by the cluster-mode tests and the failover
//! benchmark: N nodes in network namespaces, one real `csnap-agent` per node (no
//! `--standalone`: each reads the `csnap` section of its node's corosync.conf through
//! cmap), one volume whose origin and store are files in the run directory shared by every
//! node. I/O goes through each node's own NBD export (a unix socket in the node's
//! directory) with qemu-io and fio run inside the node's namespace; `csnapctl` talks to
//! each agent through its own control socket (`--control-socket`).
//!
//! A [`Rig`] is test code: it panics with a clear message when something it drives fails
//! (the panic prints every agent's log tail). Dropping it stops every process it started.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant, SystemTime};

use cpg_glue::NodeId;
use csnap_proto::control::VolumeStatus;

use crate::prereq::{find_program, under_ci};
use crate::text::strip_ansi;
use crate::{Cluster, ClusterConfig, CsnapSection, Signal};

pub const VOLUME: &str = "vol0";
pub const SERVER_PORT: u16 = 7788;
pub const MIB: u64 = 1 << 20;
/// Bound for one short command (qemu-io, csnapctl, nbdinfo).
pub const COMMAND: Duration = Duration::from_secs(30);

/// What a [`Rig`] is built with.
#[derive(Debug, Clone)]
pub struct RigConfig {
    pub nodes: u32,
    /// `csnap_priority` per node (node 1 gets 10 unless set otherwise).
    pub priorities: Vec<(u32, u32)>,
    /// `fencing:` of the csnap section (`kill_node`, `reset`, `command`, `stonith`).
    pub fencing: String,
    /// Further keys of the csnap section (`fence_command`, ...).
    pub extra: Vec<(String, String)>,
    /// Where `csnap-agent` and `csnapctl` are.
    pub bin_dir: PathBuf,
    pub origin_size: u64,
    pub store_size: u64,
    /// The volume's chunk size (`csnapctl format --chunk-size`).
    pub chunk_size: u64,
    /// corosync's token timeout.
    pub token_ms: u32,
    /// `RUST_LOG` of the agents.
    pub log: String,
    /// Extra environment (`NAME=value`) for one node's agent.
    pub agent_env: Vec<(u32, String)>,
    /// `fencing: command` with a command that confirms at once (it appends its argument
    /// to `fence.log` in the run directory): for a node the test powered off, what a power
    /// switch that answers would say. Overrides `fencing`.
    pub confirm_fencing: bool,
}

impl RigConfig {
    pub fn new(nodes: u32, fencing: &str, bin_dir: PathBuf) -> RigConfig {
        RigConfig {
            nodes,
            priorities: vec![(1, 10)],
            fencing: fencing.to_owned(),
            extra: Vec::new(),
            bin_dir,
            origin_size: 16 * MIB,
            store_size: 64 * MIB,
            chunk_size: 16 << 10,
            token_ms: 1000,
            log: "info".to_owned(),
            agent_env: Vec::new(),
            confirm_fencing: false,
        }
    }
}

/// The first volume of `csnapctl status --json` output from `node`.
pub fn volume_status(node: NodeId, text: &str) -> Result<VolumeStatus, String> {
    #[derive(serde::Deserialize)]
    struct Out {
        volumes: Vec<VolumeStatus>,
    }
    let out: Out = serde_json::from_str(text).map_err(|e| format!("{e}: {text}"))?;
    out.volumes
        .into_iter()
        .next()
        .ok_or_else(|| format!("node {node}: no volume in {text}"))
}

/// The directory of the built binaries for a test: `$CSNAP_BIN_DIR`, else the test's own
/// target directory (`target/<profile>/deps/TEST-HASH` -> `target/<profile>`).
pub fn test_bin_dir() -> PathBuf {
    match std::env::var_os("CSNAP_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("the test's own path");
            exe.parent()
                .and_then(Path::parent)
                .expect("the test binary lives in target/<profile>/deps")
                .to_path_buf()
        }
    }
}

/// `csnap-agent` and `csnapctl` in `dir`; panics when missing or older than the sources
/// they are built from (a stale binary would test old code).
pub fn binaries(dir: &Path) -> (PathBuf, PathBuf) {
    let agent = dir.join("csnap-agent");
    let ctl = dir.join("csnapctl");
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates");
    // Only what the two binaries are built from: a change to a crate's tests, fuzz targets
    // or to csnap-sim leaves them as they are (cargo does not relink them), and must not
    // make them look stale.
    let newest_source = BINARY_CRATES
        .iter()
        .flat_map(|c| {
            [
                newest_mtime(&crates.join(c).join("src")),
                newest_mtime(&crates.join(c).join("Cargo.toml")),
            ]
        })
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    for bin in [&agent, &ctl] {
        let built = std::fs::metadata(bin)
            .and_then(|m| m.modified())
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; build it first: `cargo build -p csnap-agent --bins` \
                     (or set CSNAP_BIN_DIR)",
                    bin.display()
                )
            });
        assert!(
            built >= newest_source,
            "{} is older than the sources under crates/: rebuild it with \
             `cargo build -p csnap-agent --bins` (or run `cargo test --workspace`)",
            bin.display()
        );
    }
    (agent, ctl)
}

/// The crates under crates/ that csnap-agent and csnapctl are built from.
const BINARY_CRATES: [&str; 5] = ["proto", "cpg-glue", "server", "blockdev", "agent"];

/// The newest modification time of a `.rs` file or Cargo.toml at or below `path`.
fn newest_mtime(path: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    if path.is_file() {
        return std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or(newest);
    }
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs")
                || p.file_name().is_some_and(|n| n == "Cargo.toml")
            {
                if let Ok(m) = meta.modified() {
                    newest = newest.max(m);
                }
            }
        }
    }
    newest
}

/// Outside CI, skips (loudly) when a tool the tests drive is missing.
pub fn tools_or_skip(test: &str) -> bool {
    let missing: Vec<&str> = ["qemu-io", "fio", "nbdinfo"]
        .into_iter()
        .filter(|p| find_program(p).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(!under_ci(), "{test}: missing {missing:?} (CI=true)");
    eprintln!("SKIPPED {test}: missing {missing:?}");
    false
}

/// An N-node cluster with an agent per node, serving one volume.
pub struct Rig {
    pub cluster: Cluster,
    pub ctl: PathBuf,
    pub agent: PathBuf,
    /// Agent pid by node (absent once killed).
    pub agents: BTreeMap<NodeId, u32>,
    /// The socket each agent sends its systemd notifications to (`$NOTIFY_SOCKET`).
    notify: BTreeMap<NodeId, std::os::unix::net::UnixDatagram>,
    pub test: String,
    log: String,
    agent_env: Vec<(u32, String)>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in self.cluster.nodes() {
                eprintln!(
                    "---- {}: node {node} agent log (last lines) ----\n{}",
                    self.test,
                    self.agent_log_tail(node, 60)
                );
            }
        }
    }
}

impl Rig {
    /// Starts the cluster (by default node 1 has the highest csnap_priority, so it serves
    /// first), the shared origin, store and key, each node's csnap section and its agent.
    /// `None` (skipped, loudly) outside CI when a prerequisite is missing.
    pub async fn start(test: &str, rc: RigConfig) -> Option<Rig> {
        if !tools_or_skip(test) {
            return None;
        }
        let (agent, ctl) = binaries(&rc.bin_dir);
        let mut config = ClusterConfig::new(rc.nodes).token_ms(rc.token_ms);
        for (node, priority) in &rc.priorities {
            config = config.priority(*node, *priority);
        }
        let cluster = Cluster::start_or_skip(test, config).await?;
        let mut rig = Rig {
            cluster,
            ctl,
            agent: agent.clone(),
            agents: Default::default(),
            notify: Default::default(),
            test: test.to_owned(),
            log: rc.log.clone(),
            agent_env: rc.agent_env.clone(),
        };
        let dir = rig.cluster.dir().to_path_buf();
        let (origin, store, key) = (dir.join("origin"), dir.join("store"), dir.join("key"));
        std::fs::File::create(&origin)
            .and_then(|f| f.set_len(rc.origin_size))
            .expect("create the origin file");
        std::fs::File::create(&store)
            .and_then(|f| f.set_len(rc.store_size))
            .expect("create the store file");
        let ctl_s = rig.ctl.display().to_string();
        let chunk_size = rc.chunk_size.to_string();
        run_checked(
            &ctl_s,
            &[
                "format",
                "--origin",
                &origin.display().to_string(),
                "--store",
                &store.display().to_string(),
                "--chunk-size",
                &chunk_size,
            ],
        )
        .await;
        run_checked(&ctl_s, &["keygen", &key.display().to_string()]).await;
        let mut extra = rc.extra.clone();
        let mut fencing = rc.fencing.clone();
        if rc.confirm_fencing {
            let script = dir.join("fence-ok");
            let log = dir.join("fence.log");
            std::fs::write(
                &script,
                format!("#!/bin/sh\necho \"$@\" >> '{}'\nexit 0\n", log.display()),
            )
            .expect("write the fence script");
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
                .expect("make the fence script executable");
            fencing = "command".into();
            extra.push(("fence_command".into(), script.display().to_string()));
        }

        // One section per node: the same volume, but each node's NBD socket in its own
        // directory (the agents share the host's file system).
        for node in rig.cluster.nodes() {
            let mut section = CsnapSection::new()
                .set("key_file", key.display().to_string())
                .and_then(|s| s.set("fencing", fencing.as_str()))
                .and_then(|s| s.set(format!("{VOLUME}.origin"), origin.display().to_string()))
                .and_then(|s| s.set(format!("{VOLUME}.store"), store.display().to_string()))
                .and_then(|s| s.set(format!("{VOLUME}.server_port"), SERVER_PORT.to_string()))
                .and_then(|s| {
                    s.set(
                        format!("{VOLUME}.nbd_listen"),
                        format!("unix:{}", rig.nbd_socket(node).display()),
                    )
                })
                .expect("a valid csnap section");
            for (k, v) in &extra {
                section = section
                    .set(k.as_str(), v.as_str())
                    .expect("a valid csnap key");
            }
            rig.cluster
                .set_csnap(&[node], section)
                .await
                .expect("write the node's csnap section and reload");
        }
        for node in rig.cluster.nodes() {
            rig.start_agent(node).await;
        }
        Some(rig)
    }

    /// Starts `node`'s agent (its log is appended to `agent.log`).
    pub async fn start_agent(&mut self, node: NodeId) {
        let agent = self.agent.clone();
        let socket = self.control_socket(node).display().to_string();
        // As systemd would run it (Type=notify, WatchdogSec=2). A restarted agent gets a
        // fresh socket.
        let notify_path = self.cluster.node_dir(node).join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .expect("bind the notification socket");
        self.notify.insert(node, notify);
        let notify_env = format!("NOTIFY_SOCKET={}", notify_path.display());
        let log_env = format!("RUST_LOG={}", self.log);
        let agent_path = agent.display().to_string();
        let socket_arg = socket.clone();
        let mut args: Vec<&str> =
            vec!["NO_COLOR=1", &log_env, &notify_env, "WATCHDOG_USEC=2000000"];
        for (n, e) in &self.agent_env {
            if *n == node.0 {
                args.push(e.as_str());
            }
        }
        args.extend([agent_path.as_str(), "--control-socket", socket_arg.as_str()]);
        let pid = self
            .cluster
            .spawn_in_node(node, "env", &args, "agent")
            .await
            .expect("start the node's agent");
        self.agents.insert(node, pid);
    }

    pub fn nbd_socket(&self, node: NodeId) -> PathBuf {
        self.cluster.node_dir(node).join("vol0.nbd")
    }

    pub fn control_socket(&self, node: NodeId) -> PathBuf {
        self.cluster.node_dir(node).join("csnap.sock")
    }

    pub fn nbd_uri(&self, node: NodeId, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket(node).display()
        )
    }

    pub fn agent_log(&self, node: NodeId) -> String {
        std::fs::read_to_string(self.cluster.node_dir(node).join("agent.log"))
            .map(|s| strip_ansi(&s))
            .unwrap_or_default()
    }

    pub fn agent_log_tail(&self, node: NodeId, lines: usize) -> String {
        let log = self.agent_log(node);
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs `program args` inside `node`'s namespace, bounded by `limit` (killed then).
    pub async fn run_in(
        &self,
        node: NodeId,
        program: &str,
        args: &[&str],
        limit: Duration,
    ) -> Result<Output, String> {
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.cluster.netns(node), program])
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(limit, child).await {
            Err(_) => Err(format!(
                "{program} {args:?} in node {node}: no end within {limit:?}"
            )),
            Ok(Err(e)) => Err(format!("{program} in node {node}: {e}")),
            Ok(Ok(out)) => Ok(out),
        }
    }

    /// `csnapctl --socket <node's> args...` in the node; stdout on success.
    pub async fn ctl(&self, node: NodeId, args: &[&str]) -> Result<String, String> {
        let socket = self.control_socket(node).display().to_string();
        let mut all = vec!["--socket", socket.as_str()];
        all.extend_from_slice(args);
        let out = self
            .run_in(node, &self.ctl.display().to_string(), &all, COMMAND)
            .await?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "csnapctl {args:?} on node {node}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The volume's status as `node`'s agent reports it (`csnapctl status --json`).
    pub async fn status(&self, node: NodeId) -> Result<VolumeStatus, String> {
        let text = self.ctl(node, &["status", VOLUME, "--json"]).await?;
        volume_status(node, &text)
    }

    /// Waits until every node of `nodes` reports the same server, that server is one of
    /// them and says it serves, every one is quorate and its NBD export answers. Returns
    /// the server and its status.
    pub async fn agreed_server(&self, nodes: &[NodeId], limit: Duration) -> (NodeId, VolumeStatus) {
        let deadline = Instant::now() + limit;
        loop {
            let mut seen = Vec::new();
            for &n in nodes {
                seen.push((n, self.status(n).await));
            }
            let servers: Vec<Option<u32>> = seen
                .iter()
                .map(|(_, s)| {
                    s.as_ref()
                        .ok()
                        .and_then(|s| s.cluster.as_ref())
                        .filter(|c| c.quorate)
                        .and_then(|c| c.server_node)
                })
                .collect();
            if let Some(Some(first)) = servers.first() {
                let server = NodeId(*first);
                let serving = seen.iter().find(|(n, _)| *n == server).and_then(|(_, s)| {
                    s.as_ref()
                        .ok()
                        .filter(|s| s.cluster.as_ref().is_some_and(|c| c.role == "Serving"))
                });
                if servers.iter().all(|s| *s == Some(*first)) {
                    if let Some(status) = serving {
                        let mut exports = true;
                        for &n in nodes {
                            exports &= self.export_answers(n).await;
                        }
                        if exports {
                            return (server, status.clone());
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                let shown: Vec<String> = seen
                    .iter()
                    .map(|(n, s)| match s {
                        Ok(s) => format!("node {n}: {:?}", s.cluster),
                        Err(e) => format!("node {n}: {e}"),
                    })
                    .collect();
                panic!(
                    "{}: no agreed, serving server among {nodes:?} within {limit:?}:\n{}",
                    self.test,
                    shown.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Whether `node`'s NBD export of the origin answers (nbdinfo --size).
    pub async fn export_answers(&self, node: NodeId) -> bool {
        let uri = self.nbd_uri(node, VOLUME);
        matches!(
            self.run_in(node, "nbdinfo", &["--size", &uri], Duration::from_secs(10)).await,
            Ok(out) if out.status.success()
        )
    }

    /// qemu-io commands (`write -P ...`, `read -P ...`) on `export` through `node`'s NBD
    /// socket; panics unless every command succeeded and verified.
    pub async fn qemu_io(&self, node: NodeId, export: &str, commands: &[String]) {
        let out = self.qemu_io_raw(node, export, commands, COMMAND).await;
        let out = out.unwrap_or_else(|e| panic!("{}: {e}", self.test));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success()
                && !stdout.contains("verification failed")
                && !stdout.contains("error")
                && !stderr.contains("rror"),
            "{}: qemu-io {commands:?} on {export} through node {node}: {}\n{stdout}\n{stderr}",
            self.test,
            out.status
        );
    }

    pub async fn qemu_io_raw(
        &self,
        node: NodeId,
        export: &str,
        commands: &[String],
        limit: Duration,
    ) -> Result<Output, String> {
        let uri = self.nbd_uri(node, export);
        let mut args = vec!["-f", "raw"];
        for c in commands {
            args.extend(["-c", c.as_str()]);
        }
        args.push(&uri);
        self.run_in(node, "qemu-io", &args, limit).await
    }

    /// Creates snapshot `name` through `node`'s agent; returns its id.
    pub async fn snapshot(&self, node: NodeId, name: &str) -> u64 {
        let text = self
            .ctl(node, &["snapshot", "create", VOLUME, name, "--json"])
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.test));
        let v: serde_json::Value = serde_json::from_str(&text).expect("csnapctl's JSON");
        v["snapshot"]["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no snapshot id in {text}"))
    }

    /// Every systemd notification `node`'s agent sent since the last call.
    pub fn notifications(&self, node: NodeId) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        if let Some(socket) = self.notify.get(&node) {
            while let Ok(n) = socket.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        out
    }

    /// Power-off of `node`: its corosync and its agent SIGKILLed together.
    pub async fn power_off(&mut self, node: NodeId) {
        let pid = self.agents.remove(&node).expect("the node's agent runs");
        let (corosync, agent) = tokio::join!(
            self.cluster.kill_node(node),
            self.cluster
                .stop_spawned(pid, Signal::SIGKILL, Duration::from_secs(5))
        );
        corosync.expect("kill the node's corosync");
        agent.expect("kill the node's agent");
    }

    /// Asserts that `node`'s agent log has a line with `event=NAME` (as the cluster core's
    /// and the shell's events are logged).
    pub fn assert_logged(&self, node: NodeId, event: &str) {
        let log = self.agent_log(node);
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("event=\"{event}\""))
                    || l.contains(&format!("event={event}"))),
            "{}: node {node}'s agent log has no event={event}",
            self.test
        );
    }
}

/// Runs a host command (formatting the store, making the key), panicking on failure.
pub async fn run_checked(program: &str, args: &[&str]) {
    let out = tokio::time::timeout(
        COMMAND,
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?}: no end within {COMMAND:?}"))
    .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn write(pattern: u8, offset: u64, len: u64) -> String {
    format!("write -P 0x{pattern:02x} {offset} {len}")
}

pub fn read(pattern: u8, offset: u64, len: u64) -> String {
    format!("read -P 0x{pattern:02x} {offset} {len}")
}
