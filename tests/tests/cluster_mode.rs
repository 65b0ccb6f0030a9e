//! Cluster mode on real corosync: three nodes in network namespaces, one real `csnap-agent`
//! per node (no `--standalone`: each reads the `csnap` section of its node's corosync.conf
//! through cmap), one volume whose origin and store are files in the run directory shared
//! by every node. I/O goes through each node's own NBD export (a unix socket in the node's
//! directory) with qemu-io and fio run inside the node's namespace; `csnapctl` talks to each
//! agent through its own control socket (`--control-socket`).
//!
//! The agents are the workspace's built binaries: `$CSNAP_BIN_DIR` if set, else the
//! directory of this test's own target (`target/debug`). `cargo test --workspace` builds
//! them first; alone, run `cargo build -p csnap-agent --bins` before
//! `cargo test -p csnap-e2e --test cluster_mode` (a binary older than the agent's sources
//! fails the test rather than testing old code).
//!
//! On failure every agent's log tail is printed (and `CSNAP_E2E_KEEP=1` keeps them).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant, SystemTime};

use cpg_glue::NodeId;
use csnap_e2e::prereq::{find_program, under_ci};
use csnap_e2e::text::strip_ansi;
use csnap_e2e::{Cluster, ClusterConfig, CsnapSection, Signal};
use csnap_proto::control::VolumeStatus;

const VOLUME: &str = "vol0";
const SERVER_PORT: u16 = 7788;
const MIB: u64 = 1 << 20;
const ORIGIN_SIZE: u64 = 16 * MIB;
const STORE_SIZE: u64 = 64 * MIB;
/// Bound for the first server of a fresh cluster (a fresh agent waits one serving lease,
/// 8 s + 2 s, before it may start a server, as it cannot know what ran before it).
const FIRST_SERVER: Duration = Duration::from_secs(45);
/// Bound for a failover: corosync's detection (token 1000 ms) plus the departed server's
/// serving lease (8 s + 2 s margin) plus the gather.
const FAILOVER: Duration = Duration::from_secs(45);
/// Bound for one short command (qemu-io, csnapctl, nbdinfo).
const COMMAND: Duration = Duration::from_secs(30);

/// The built binaries: `$CSNAP_BIN_DIR` or this test's target directory.
fn binaries() -> (PathBuf, PathBuf) {
    let dir = match std::env::var_os("CSNAP_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            // target/debug/deps/cluster_mode-HASH -> target/debug
            let exe = std::env::current_exe().expect("the test's own path");
            exe.parent()
                .and_then(Path::parent)
                .expect("the test binary lives in target/<profile>/deps")
                .to_path_buf()
        }
    };
    let agent = dir.join("csnap-agent");
    let ctl = dir.join("csnapctl");
    let newest_source = newest_mtime(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates"));
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

/// The newest modification time of a `.rs` file or Cargo.toml below `dir`.
fn newest_mtime(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut stack = vec![dir.to_path_buf()];
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
fn tools_or_skip(test: &str) -> bool {
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

/// A 3-node cluster with an agent per node, serving one volume.
struct Rig {
    cluster: Cluster,
    ctl: PathBuf,
    /// Agent pid by node (absent once killed).
    agents: std::collections::BTreeMap<NodeId, u32>,
    /// The socket each agent sends its systemd notifications to (`$NOTIFY_SOCKET`).
    notify: std::collections::BTreeMap<NodeId, std::os::unix::net::UnixDatagram>,
    test: String,
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
    /// Starts the cluster (node 1 has the highest csnap_priority, so it serves first),
    /// the shared origin, store and key, each node's csnap section and its agent.
    async fn start(test: &str, fencing: &str) -> Option<Rig> {
        if !tools_or_skip(test) {
            return None;
        }
        let (agent, ctl) = binaries();
        let config = ClusterConfig::new(3).priority(1, 10);
        let cluster = Cluster::start_or_skip(test, config).await?;
        let mut rig = Rig {
            cluster,
            ctl,
            agents: Default::default(),
            notify: Default::default(),
            test: test.to_owned(),
        };
        let dir = rig.cluster.dir().to_path_buf();
        let (origin, store, key) = (dir.join("origin"), dir.join("store"), dir.join("key"));
        std::fs::File::create(&origin)
            .and_then(|f| f.set_len(ORIGIN_SIZE))
            .expect("create the origin file");
        std::fs::File::create(&store)
            .and_then(|f| f.set_len(STORE_SIZE))
            .expect("create the store file");
        let ctl_s = rig.ctl.display().to_string();
        run_checked(
            &ctl_s,
            &[
                "format",
                "--origin",
                &origin.display().to_string(),
                "--store",
                &store.display().to_string(),
                "--chunk-size",
                "16K",
            ],
        )
        .await;
        run_checked(&ctl_s, &["keygen", &key.display().to_string()]).await;

        // One section per node: the same volume, but each node's NBD socket in its own
        // directory (the agents share the host's file system).
        for node in rig.cluster.nodes() {
            let section = CsnapSection::new()
                .set("key_file", key.display().to_string())
                .and_then(|s| s.set("fencing", fencing))
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
            rig.cluster
                .set_csnap(&[node], section)
                .await
                .expect("write the node's csnap section and reload");
        }
        for node in rig.cluster.nodes() {
            rig.start_agent(node, &agent).await;
        }
        Some(rig)
    }

    /// Starts `node`'s agent (its log is appended to `agent.log`).
    async fn start_agent(&mut self, node: NodeId, agent: &Path) {
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
        let pid = self
            .cluster
            .spawn_in_node(
                node,
                "env",
                &[
                    "NO_COLOR=1",
                    "RUST_LOG=info",
                    &notify_env,
                    "WATCHDOG_USEC=2000000",
                    &agent.display().to_string(),
                    "--control-socket",
                    &socket,
                ],
                "agent",
            )
            .await
            .expect("start the node's agent");
        self.agents.insert(node, pid);
    }

    fn nbd_socket(&self, node: NodeId) -> PathBuf {
        self.cluster.node_dir(node).join("vol0.nbd")
    }

    fn control_socket(&self, node: NodeId) -> PathBuf {
        self.cluster.node_dir(node).join("csnap.sock")
    }

    fn nbd_uri(&self, node: NodeId, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket(node).display()
        )
    }

    fn agent_log(&self, node: NodeId) -> String {
        std::fs::read_to_string(self.cluster.node_dir(node).join("agent.log"))
            .map(|s| strip_ansi(&s))
            .unwrap_or_default()
    }

    fn agent_log_tail(&self, node: NodeId, lines: usize) -> String {
        let log = self.agent_log(node);
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs `program args` inside `node`'s namespace, bounded by `limit` (killed then).
    async fn run_in(
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
    async fn ctl(&self, node: NodeId, args: &[&str]) -> Result<String, String> {
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
    async fn status(&self, node: NodeId) -> Result<VolumeStatus, String> {
        #[derive(serde::Deserialize)]
        struct Out {
            volumes: Vec<VolumeStatus>,
        }
        let text = self.ctl(node, &["status", VOLUME, "--json"]).await?;
        let out: Out = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        out.volumes
            .into_iter()
            .next()
            .ok_or_else(|| format!("node {node}: no volume in {text}"))
    }

    /// Waits until every node of `nodes` reports the same server, that server is one of
    /// them and says it serves, every one is quorate and its NBD export answers. Returns
    /// the server and its status.
    async fn agreed_server(&self, nodes: &[NodeId], limit: Duration) -> (NodeId, VolumeStatus) {
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
    async fn export_answers(&self, node: NodeId) -> bool {
        let uri = self.nbd_uri(node, VOLUME);
        matches!(
            self.run_in(node, "nbdinfo", &["--size", &uri], Duration::from_secs(10)).await,
            Ok(out) if out.status.success()
        )
    }

    /// qemu-io commands (`write -P ...`, `read -P ...`) on `export` through `node`'s NBD
    /// socket; panics unless every command succeeded and verified.
    async fn qemu_io(&self, node: NodeId, export: &str, commands: &[String]) {
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

    async fn qemu_io_raw(
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
    async fn snapshot(&self, node: NodeId, name: &str) -> u64 {
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
    fn notifications(&self, node: NodeId) -> Vec<String> {
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
    async fn power_off(&mut self, node: NodeId) {
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
    fn assert_logged(&self, node: NodeId, event: &str) {
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
async fn run_checked(program: &str, args: &[&str]) {
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

fn write(pattern: u8, offset: u64, len: u64) -> String {
    format!("write -P 0x{pattern:02x} {offset} {len}")
}

fn read(pattern: u8, offset: u64, len: u64) -> String {
    format!("read -P 0x{pattern:02x} {offset} {len}")
}

/// Every agent agrees on one server; a write through one node's export, a snapshot made
/// through another node's agent and reads through the third see the same volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_agree_on_one_server_and_share_the_volume() {
    let Some(rig) = Rig::start("cluster mode: one server", "kill_node").await else {
        return;
    };
    let nodes = rig.cluster.nodes();
    let (server, status) = rig.agreed_server(&nodes, FIRST_SERVER).await;
    let cluster = status.cluster.clone().expect("cluster status");
    assert_eq!(server, NodeId(1), "node 1 has the highest csnap_priority");
    assert_eq!(cluster.members.len(), 3, "{cluster:?}");
    assert_eq!(
        cluster.server_address.as_deref(),
        Some(format!("10.77.0.1:{SERVER_PORT}").as_str()),
        "the server listens on its ring0 address"
    );
    assert!(cluster.generation >= 1, "{cluster:?}");
    for n in &nodes {
        let s = rig.status(*n).await.expect("status");
        let c = s.cluster.expect("cluster status");
        assert_eq!(c.generation, cluster.generation, "node {n}: {c:?}");
        assert_eq!(c.node, n.0);
        assert_eq!(c.role, if *n == server { "Serving" } else { "Idle" });
    }

    let (writer, snapper, reader) = (NodeId(2), NodeId(3), NodeId(1));
    rig.qemu_io(
        writer,
        VOLUME,
        &[write(0x11, 0, 4 * MIB), write(0x22, 4 * MIB, 4 * MIB)],
    )
    .await;
    rig.snapshot(snapper, "before").await;
    rig.qemu_io(writer, VOLUME, &[write(0x33, 0, 2 * MIB)])
        .await;

    for node in [reader, snapper] {
        rig.qemu_io(
            node,
            VOLUME,
            &[
                read(0x33, 0, 2 * MIB),
                read(0x11, 2 * MIB, 2 * MIB),
                read(0x22, 4 * MIB, 4 * MIB),
                read(0, 8 * MIB, 8 * MIB),
            ],
        )
        .await;
        rig.qemu_io(
            node,
            &format!("{VOLUME}@before"),
            &[read(0x11, 0, 4 * MIB), read(0x22, 4 * MIB, 4 * MIB)],
        )
        .await;
    }
    let list = rig
        .ctl(reader, &["snapshot", "list", VOLUME])
        .await
        .expect("snapshot list");
    assert!(list.contains("before"), "{list}");

    // As systemd sees it: READY=1 once the groups were joined, then watchdog pings (every
    // second with WatchdogSec=2) carrying a STATUS line per volume.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen: Vec<String> = Vec::new();
    loop {
        seen.extend(rig.notifications(server));
        let ready = seen.iter().any(|m| m.lines().any(|l| l == "READY=1"));
        let pinged = seen
            .iter()
            .any(|m| m.contains("WATCHDOG=1") && m.contains("STATUS=vol0: Serving (served here"));
        if ready && pinged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {server}: no READY=1 and watchdog ping with a status: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The human status shows the cluster fields.
    let text = rig.ctl(snapper, &["status"]).await.expect("status");
    for want in ["server node 1", "generation", "members", "quorate", "gate"] {
        assert!(
            text.contains(want),
            "csnapctl status lacks {want:?}:\n{text}"
        );
    }
}

/// The server's node loses power while fio writes with verify through another node: the
/// survivors elect a new server (higher generation), fio resumes and verifies everything,
/// and a snapshot taken before still reads its data. Powered back on, the node rejoins
/// without being fenced and agrees on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_off_of_the_server_node_fails_over_under_fio() {
    let Some(mut rig) = Rig::start("cluster mode: power-off", "kill_node").await else {
        return;
    };
    let nodes = rig.cluster.nodes();
    let (first, status) = rig.agreed_server(&nodes, FIRST_SERVER).await;
    let first_gen = status.cluster.expect("cluster status").generation;
    let io_node = NodeId(2);
    assert_ne!(first, io_node);

    rig.qemu_io(io_node, VOLUME, &[write(0x44, 0, ORIGIN_SIZE)])
        .await;
    rig.snapshot(NodeId(3), "pre").await;

    // fio: sequential writes over the whole origin, rate-limited to last across the
    // failover, then reads everything back with checksums.
    let uri = rig.nbd_uri(io_node, VOLUME);
    let fio = {
        let ns = rig.cluster.netns(io_node);
        // fio saves its verify state in the working directory when it stops early.
        let workdir = rig.cluster.dir().to_path_buf();
        tokio::spawn(async move {
            let out = tokio::process::Command::new("ip")
                .args(["netns", "exec", &ns, "fio"])
                .current_dir(workdir)
                .args([
                    "--name=failover",
                    "--ioengine=nbd",
                    &format!("--uri={uri}"),
                    "--rw=write",
                    "--bs=64k",
                    "--size=16M",
                    "--rate=2m",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                    "--verify_state_save=0",
                ])
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            tokio::time::timeout(Duration::from_secs(120), out).await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!fio.is_finished(), "fio ended before the power-off");
    let cut = Instant::now();
    rig.power_off(first).await;

    let survivors: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != first).collect();
    let (second, status) = rig.agreed_server(&survivors, FAILOVER).await;
    let took = cut.elapsed();
    let c = status.cluster.clone().expect("cluster status");
    assert_ne!(second, first);
    assert!(c.generation > first_gen, "{c:?}");
    assert!(c.failover.is_some(), "{c:?}");
    eprintln!("failover from node {first} to node {second} in {took:?}: {c:?}");

    let out = fio
        .await
        .expect("the fio task")
        .expect("fio ended within 120 s")
        .expect("fio ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("err= 0") && !stderr.contains("verify"),
        "fio through node {io_node} across the failover: {}\n{stdout}\n{stderr}",
        out.status
    );

    for node in &survivors {
        rig.qemu_io(
            *node,
            &format!("{VOLUME}@pre"),
            &[read(0x44, 0, ORIGIN_SIZE)],
        )
        .await;
    }
    rig.qemu_io(
        NodeId(3),
        VOLUME,
        &[write(0x45, 0, MIB), read(0x45, 0, MIB)],
    )
    .await;

    // kill_node could not reach the powered-off node (not in the membership); the fencing
    // job ended once its serving lease had certainly run out, as the failover itself
    // waited for.
    let fencer = survivors
        .iter()
        .copied()
        .find(|n| rig.agent_log(*n).contains("fence_unneeded"))
        .unwrap_or_else(|| panic!("no survivor let go of fencing node {first}"));
    rig.assert_logged(fencer, "fence_requested");

    // Power the node back on: corosync first, its agent a little later (as after a boot).
    // Nothing may fence it: its old server is certainly gone, and its new agent holds
    // nothing. It rejoins and agrees on the server, address included.
    rig.cluster
        .start_node(first)
        .await
        .expect("start the node's corosync again");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        rig.cluster.is_running(first),
        "node {first}'s corosync was killed after it was powered back on"
    );
    let (agent, _) = binaries();
    rig.start_agent(first, &agent).await;
    let (again, status) = rig.agreed_server(&nodes, FAILOVER).await;
    assert_eq!(
        again, second,
        "the server moved when node {first} came back"
    );
    let address = status.cluster.expect("cluster status").server_address;
    let back = rig.status(first).await.expect("the rebooted node's status");
    let c = back.cluster.expect("cluster status");
    assert_eq!(c.server_address, address, "{c:?}");
    assert!(c.stale.is_empty() && c.fencing.is_empty(), "{c:?}");
    assert!(
        rig.cluster.is_running(first),
        "node {first} was fenced after it came back"
    );
    for n in &nodes {
        let log = rig.agent_log(*n);
        assert!(
            !log.contains("stale_merge"),
            "node {n} took the rebooted node for stale"
        );
    }
}

/// What the partition phase leaves: the old server (alone in the minority), the
/// majority and its server.
struct Split {
    first: NodeId,
    majority: Vec<NodeId>,
    second: NodeId,
}

/// Cuts the server's node off from the other two: the minority stops serving at once and
/// a write through it gets no grant; the majority elects a new server (higher generation)
/// and reads the old data, writes new data through it.
async fn partition_the_server_away(rig: &Rig) -> Split {
    let nodes = rig.cluster.nodes();
    let (first, status) = rig.agreed_server(&nodes, FIRST_SERVER).await;
    let first_gen = status.cluster.expect("cluster status").generation;
    rig.qemu_io(NodeId(2), VOLUME, &[write(0x55, 0, MIB)]).await;

    let majority: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != first).collect();
    rig.cluster
        .partition(&[vec![first], majority.clone()])
        .await
        .expect("partition");

    // The minority stops serving as soon as it sees it lost quorum.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = rig.status(first).await.expect("minority status");
        let c = s.cluster.expect("cluster status");
        if !c.quorate && c.role != "Serving" && c.local_server.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the minority server did not stop within 20 s: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its clients get no grants: a write through its export does not complete.
    let attempt = rig
        .qemu_io_raw(
            first,
            VOLUME,
            &[write(0x99, 12 * MIB, 64 * 1024)],
            Duration::from_secs(4),
        )
        .await;
    match &attempt {
        // qemu-io says `wrote N/N bytes` for a completed write.
        Ok(out) => assert!(
            !String::from_utf8_lossy(&out.stdout).contains("wrote "),
            "a write through the minority completed: {}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(e) => eprintln!("the minority's write did not complete: {e}"),
    }

    let (second, status) = rig.agreed_server(&majority, FAILOVER).await;
    let c = status.cluster.expect("cluster status");
    assert!(c.generation > first_gen, "{c:?}");
    rig.qemu_io(
        majority[0],
        VOLUME,
        &[read(0x55, 0, MIB), write(0x66, MIB, MIB)],
    )
    .await;
    rig.qemu_io(majority[1], VOLUME, &[read(0x66, MIB, MIB)])
        .await;

    Split {
        first,
        majority,
        second,
    }
}

/// The server's node is cut off from the other two: it stops serving (no quorum) and its
/// clients get nothing; the majority elects a new server and I/O goes on there. After the
/// heal the old server's node is stale, fenced with kill_node (its corosync exits), and
/// exactly one server remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_server_stops_and_is_fenced_after_the_heal() {
    let Some(rig) = Rig::start("cluster mode: partition", "kill_node").await else {
        return;
    };
    let Split {
        first,
        majority,
        second,
    } = partition_the_server_away(&rig).await;

    rig.cluster.heal().await.expect("heal");
    // The stale node is fenced: cfg kill_node makes its corosync exit.
    rig.cluster
        .wait_exited(first, Duration::from_secs(40))
        .await
        .unwrap_or_else(|e| panic!("the stale node {first} was not fenced: {e}"));
    let (after, _) = rig.agreed_server(&majority, FAILOVER).await;
    assert_eq!(after, second, "the majority's server stays");
    let old = rig
        .status(first)
        .await
        .expect("the fenced node's agent answers");
    let oc = old.cluster.expect("cluster status");
    assert_ne!(oc.role, "Serving", "{oc:?}");
    assert!(oc.local_server.is_none(), "{oc:?}");

    let fencer = majority
        .iter()
        .copied()
        .find(|n| rig.agent_log(*n).contains("fence_done"))
        .unwrap_or_else(|| panic!("no majority agent logged fence_done"));
    rig.assert_logged(fencer, "stale_merge");
    rig.assert_logged(fencer, "fence_requested");
    rig.assert_logged(fencer, "fence_done");
    rig.qemu_io(
        majority[1],
        VOLUME,
        &[read(0x55, 0, MIB), read(0x66, MIB, MIB)],
    )
    .await;
}

/// As above with `fencing: reset`: after the heal the stale node drops its state by
/// itself (no one kills its corosync), its client reconnects to the majority's server,
/// and I/O through its export sees the majority's writes. Exactly one server remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_server_resets_itself_after_the_heal() {
    let Some(rig) = Rig::start("cluster mode: partition, reset", "reset").await else {
        return;
    };
    let nodes = rig.cluster.nodes();
    let Split {
        first,
        majority,
        second,
    } = partition_the_server_away(&rig).await;

    rig.cluster.heal().await.expect("heal");
    // All three agree on the majority's server again, the old one included.
    let (after, _) = rig.agreed_server(&nodes, FAILOVER).await;
    assert_eq!(after, second, "the majority's server stays");
    assert!(
        rig.cluster.is_running(first),
        "reset does not kill corosync"
    );
    let old = rig.status(first).await.expect("the reset node's status");
    let oc = old.cluster.expect("cluster status");
    assert_eq!(oc.role, "Idle", "{oc:?}");
    assert!(oc.stale.is_empty() && oc.local_server.is_none(), "{oc:?}");
    for n in &majority {
        let c = rig
            .status(*n)
            .await
            .expect("status")
            .cluster
            .expect("cluster");
        assert!(c.stale.is_empty(), "node {n}: {c:?}");
    }
    rig.assert_logged(first, "stale_merge");
    rig.assert_logged(first, "node_reset");
    let actor = majority
        .iter()
        .copied()
        .find(|n| rig.agent_log(*n).contains("event=\"fence_requested\""))
        .unwrap_or_else(|| panic!("no majority agent ordered the reset"));
    rig.assert_logged(actor, "stale_merge");

    // The reset node's client now uses the real server: it sees the majority's writes,
    // and its own writes are seen by the others.
    rig.qemu_io(first, VOLUME, &[read(0x55, 0, MIB), read(0x66, MIB, MIB)])
        .await;
    rig.qemu_io(first, VOLUME, &[write(0x77, 2 * MIB, MIB)])
        .await;
    rig.qemu_io(majority[0], VOLUME, &[read(0x77, 2 * MIB, MIB)])
        .await;
}

/// Corosync restarts under a running agent (a node's corosync upgraded or crashed and
/// restarted): the agent keeps running, rejoins the volume's group, sets its configuration
/// watch up again (so later reloads are followed) and agrees on the server again; the
/// volume never stops being served by the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_survives_a_restart_of_its_corosync() {
    let Some(rig) = Rig::start("cluster mode: corosync restart", "kill_node").await else {
        return;
    };
    let nodes = rig.cluster.nodes();
    let (server, _) = rig.agreed_server(&nodes, FIRST_SERVER).await;
    let bounced = *nodes
        .iter()
        .find(|n| **n != server)
        .expect("a non-server node");
    rig.cluster
        .restart_node(bounced)
        .await
        .expect("restart the node's corosync");
    let (again, _) = rig.agreed_server(&nodes, FAILOVER).await;
    assert_eq!(
        again, server,
        "a bystander's corosync restart moves no server"
    );
    let deadline = Instant::now() + FAILOVER;
    while !rig.agent_log(bounced).contains("cmap watch set up again") {
        assert!(
            Instant::now() < deadline,
            "{}: node {bounced}'s agent did not set its cmap watch up again",
            rig.test
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    rig.qemu_io(bounced, VOLUME, &[write(0x5a, 0, MIB), read(0x5a, 0, MIB)])
        .await;
}
