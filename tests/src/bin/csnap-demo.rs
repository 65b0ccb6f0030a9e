//! csnap-demo: the cluster tour, on a real 3-node corosync cluster built in network
//! namespaces on this machine (the harness of docs/testing.md).
//!
//! 1. Three corosync nodes form a ring; one `csnap-agent` per node in cluster mode (each
//!    reads the `csnap` section of its node's corosync.conf, no hand-started server) agree
//!    on the node that serves the shared volume.
//! 2. Data written through node 2's NBD export, a snapshot made from node 3, an overwrite:
//!    the snapshot, read through node 1, keeps the old data.
//! 3. The server's node is cut off: it stops serving (no quorum), the other two elect a new
//!    server. Healed, the old server's node is found stale and resets itself
//!    (`fencing: reset`): exactly one server remains.
//! 4. The server's node loses power (its corosync and agent SIGKILLed): a survivor takes
//!    over; the demo shows how long that took, and that I/O and the snapshot still work.
//!
//! Everything it starts is stopped and removed at the end, also on error or Ctrl-C (the
//! cluster's Drop kills processes by pid and deletes namespaces, links and the run
//! directory); on error the agents' log tails are printed first. Every wait is bounded.
//! Run it through `./scripts/demo`, which installs and builds what it needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use cpg_glue::NodeId;
use csnap_e2e::prereq::find_program;
use csnap_e2e::text::strip_ansi;
use csnap_e2e::{Cluster, ClusterConfig, CsnapSection, Signal};
use csnap_proto::control::{ClusterStatus, VolumeStatus};
use tokio::signal::unix::{signal, SignalKind};

const VOLUME: &str = "vol0";
const SERVER_PORT: u16 = 7788;
const MIB: u64 = 1 << 20;
/// Bound for the first server of a fresh cluster: a fresh agent waits one serving lease
/// (8 s + 2 s) before any server starts, as it cannot know what ran before it.
const FIRST_SERVER: Duration = Duration::from_secs(45);
/// Bound for a failover: corosync's detection plus the departed server's serving lease
/// (8 s + 2 s) plus the gather.
const FAILOVER: Duration = Duration::from_secs(45);
/// Bound for one short command (qemu-io, csnapctl, nbdinfo).
const COMMAND: Duration = Duration::from_secs(30);
/// Bound for the whole tour.
const WHOLE: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() -> ExitCode {
    let started = Instant::now();
    // Ctrl-C ends the tour like an error, so the cluster is still removed.
    let mut sigint = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("csnap-demo: cannot catch SIGINT: {e}");
            return ExitCode::FAILURE;
        }
    };
    let demo = tokio::select! {
        d = Demo::start() => d,
        _ = sigint.recv() => Err(anyhow!("interrupted")),
    };
    let demo = match demo {
        Ok(d) => d,
        Err(e) => {
            eprintln!("\ncsnap-demo FAILED while starting: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = tokio::select! {
        r = tokio::time::timeout(WHOLE, demo.tour()) => {
            r.unwrap_or_else(|_| Err(anyhow!("the tour did not end within {WHOLE:?}")))
        }
        _ = sigint.recv() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok(()) => {
            step("5. Clean up: stop the agents, remove the cluster");
            demo.stop_agents().await;
            drop(demo);
            println!(
                "   namespaces, processes and files removed; the tour took {:.0} s",
                started.elapsed().as_secs_f64()
            );
            println!("\nNext: docs/operations.md (running it), docs/architecture.md (how).");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ncsnap-demo FAILED: {e:#}");
            for node in demo.cluster.nodes() {
                eprintln!(
                    "---- node {node}: agent log (last 40 lines) ----\n{}",
                    demo.agent_log_tail(node, 40)
                );
                eprintln!(
                    "---- node {node}: corosync log (last 10 lines) ----\n{}",
                    demo.cluster.log_tail(node, 10)
                );
            }
            eprintln!("---- removing the cluster ----");
            drop(demo);
            ExitCode::FAILURE
        }
    }
}

/// The cluster, the binaries and the agents' pids.
struct Demo {
    cluster: Cluster,
    ctl: PathBuf,
    /// Agent pid by node (absent once killed).
    agents: std::sync::Mutex<BTreeMap<NodeId, u32>>,
}

impl Demo {
    /// Checks the tools, starts the cluster (node 1 has the highest csnap_priority), makes
    /// the shared volume and key, writes each node's csnap section and starts the agents.
    async fn start() -> Result<Demo> {
        let bin_dir = std::env::current_exe()?
            .parent()
            .context("no directory for the running binary")?
            .to_path_buf();
        let agent = bin_dir.join("csnap-agent");
        let ctl = bin_dir.join("csnapctl");
        for b in [&agent, &ctl] {
            if !b.exists() {
                bail!(
                    "{} is not built; run ./scripts/demo (it builds the workspace)",
                    b.display()
                );
            }
        }
        let missing: Vec<&str> = ["corosync", "qemu-io", "nbdinfo", "ip"]
            .into_iter()
            .filter(|p| find_program(p).is_none())
            .collect();
        if !missing.is_empty() {
            bail!("missing {missing:?}: run ./scripts/setup (as root)");
        }

        step("1. A 3-node corosync cluster in network namespaces (10.77.0.1-3)");
        let cluster = Cluster::start_with(ClusterConfig::new(3).priority(1, 10)).await?;
        for node in cluster.nodes() {
            let v = cluster.view(node).await?;
            println!(
                "   node {node}: ring {} quorate {} members {:?}",
                v.ring,
                v.quorate,
                v.members.iter().map(|n| n.0).collect::<Vec<_>>()
            );
        }
        let demo = Demo {
            cluster,
            ctl,
            agents: Default::default(),
        };

        let dir = demo.cluster.dir().to_path_buf();
        let (origin, store, key) = (dir.join("origin"), dir.join("store"), dir.join("key"));
        std::fs::File::create(&origin)?.set_len(16 * MIB)?;
        std::fs::File::create(&store)?.set_len(64 * MIB)?;
        host(
            &demo.ctl,
            &[
                "format",
                "--origin",
                s(&origin),
                "--store",
                s(&store),
                "--chunk-size",
                "16K",
            ],
        )
        .await?;
        host(&demo.ctl, &["keygen", s(&key)]).await?;
        println!(
            "   volume {VOLUME}: origin 16 MiB and store 64 MiB, files every node sees; \
             a cluster key"
        );

        // One section per node: the same volume, each node's NBD socket in its own
        // directory (the agents share the host's file system).
        for node in demo.cluster.nodes() {
            let section = CsnapSection::new()
                .set("key_file", s(&key))
                .and_then(|x| x.set("fencing", "reset"))
                .and_then(|x| x.set(format!("{VOLUME}.origin"), s(&origin)))
                .and_then(|x| x.set(format!("{VOLUME}.store"), s(&store)))
                .and_then(|x| x.set(format!("{VOLUME}.server_port"), SERVER_PORT.to_string()))
                .and_then(|x| {
                    x.set(
                        format!("{VOLUME}.nbd_listen"),
                        format!("unix:{}", demo.nbd_socket(node).display()),
                    )
                })
                .map_err(|e| anyhow!("csnap section: {e}"))?;
            demo.cluster.set_csnap(&[node], section).await?;
        }
        println!(
            "   corosync.conf on each node: csnap {{ key_file, fencing: reset, {VOLUME} {{ \
             origin, store, server_port: {SERVER_PORT}, nbd_listen }} }}, node 1 \
             csnap_priority 10"
        );
        for node in demo.cluster.nodes() {
            let socket = demo.control_socket(node);
            let pid = demo
                .cluster
                .spawn_in_node(
                    node,
                    "env",
                    &[
                        "NO_COLOR=1",
                        "RUST_LOG=info",
                        s(&agent),
                        "--control-socket",
                        s(&socket),
                    ],
                    "agent",
                )
                .await?;
            demo.agents.lock().unwrap().insert(node, pid);
        }
        println!("   started `csnap-agent --control-socket <node dir>/csnap.sock` on each node");
        Ok(demo)
    }

    async fn tour(&self) -> Result<()> {
        let all = self.cluster.nodes();

        // 1. Agreement.
        println!(
            "   waiting for a server (fresh agents first wait out one serving lease, \
             8 s + 2 s: they cannot know what ran before them)..."
        );
        let t = Instant::now();
        let (first, _) = self.agreed_server(&all, FIRST_SERVER).await?;
        println!(
            "   after {:.1} s all three agree: node {first} serves {VOLUME}",
            secs(t)
        );
        self.show_status(NodeId(3)).await?;

        // 2. Shared I/O and a snapshot.
        step("2. Write through node 2, snapshot from node 3, overwrite, read through node 1");
        self.qemu_io(NodeId(2), VOLUME, &["write -P 0x11 0 4M"])
            .await?;
        let out = self
            .ctl(NodeId(3), &["snapshot", "create", VOLUME, "before"])
            .await?;
        println!("   node 3 $ csnapctl snapshot create {VOLUME} before");
        print_indented(&out);
        self.qemu_io(NodeId(2), VOLUME, &["write -P 0x22 0 2M"])
            .await?;
        self.qemu_io(
            NodeId(1),
            VOLUME,
            &["read -P 0x22 0 2M", "read -P 0x11 2M 2M"],
        )
        .await?;
        self.qemu_io(
            NodeId(1),
            &format!("{VOLUME}@before"),
            &["read -P 0x11 0 4M"],
        )
        .await?;
        println!("   the origin has the new data, snapshot {VOLUME}@before the old, on every node");

        // 3. Partition and heal.
        step(&format!(
            "3. Cut the server's node {first} off from the other two"
        ));
        let gen0 = self.cluster_status(first).await?.generation;
        let majority: Vec<NodeId> = all.iter().copied().filter(|n| *n != first).collect();
        let cut = Clock::now();
        self.cluster
            .partition(&[vec![first], majority.clone()])
            .await?;
        // Timings come from the agents' logs: `csnapctl status` on a node whose server is
        // unreachable waits up to 5 s for the server's own report, so polling it is slow.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let c = self.cluster_status(first).await?;
            if !c.quorate && c.role != "Serving" && c.local_server.is_none() {
                println!(
                    "   {}: node {first}'s agent hears from corosync that its partition lost \
                     quorum and stops its server at once",
                    self.at(first, "quorum_lost", cut)
                );
                println!(
                    "   {}: the server has stopped (node {first}: role {}, gate {})",
                    self.at(first, "server_stopped", cut),
                    c.role,
                    c.gate
                );
                break;
            }
            if Instant::now() > deadline {
                bail!("the minority server on node {first} did not stop within 20 s: {c:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let attempt = self
            .qemu_io_raw(
                first,
                VOLUME,
                &["write -P 0x99 12M 64K"],
                Duration::from_secs(4),
            )
            .await;
        match attempt {
            Ok(out) if String::from_utf8_lossy(&out.stdout).contains("wrote ") => {
                bail!(
                    "a write through the minority node {first} completed: {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            }
            _ => println!("   a write through node {first} gets no grant (given up after 4 s)"),
        }
        let (second, st) = self.agreed_server(&majority, FAILOVER).await?;
        let c = st.cluster.context("no cluster status")?;
        if c.generation <= gen0 {
            bail!(
                "the majority's server has generation {} <= {gen0}",
                c.generation
            );
        }
        println!(
            "   {}: the majority {} knows node {first}'s serving lease (8 s + 2 s) has run out",
            self.at(second, "old_server_settled", cut),
            list(&majority),
        );
        println!(
            "   {}: node {second} serves generation {} (was {gen0})",
            self.at(second, "server_active", cut),
            c.generation
        );
        self.qemu_io(
            majority[0],
            VOLUME,
            &["read -P 0x22 0 2M", "write -P 0x33 4M 1M"],
        )
        .await?;

        step(&format!(
            "   Heal the network: node {first} comes back with generation {gen0}'s state"
        ));
        let healed = Clock::now();
        self.cluster.heal().await?;
        let (after, _) = self.agreed_server(&all, FAILOVER).await?;
        if after != second {
            bail!("after the heal node {after} serves, not the majority's node {second}");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let old = loop {
            let c = self.cluster_status(first).await?;
            if c.role == "Idle" && c.stale.is_empty() && c.local_server.is_none() {
                break c;
            }
            if Instant::now() > deadline {
                bail!("node {first} did not come back clean within 20 s: {c:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for node in &all {
            for (event, line) in self.events(
                *node,
                &["stale_merge", "fence_requested", "node_reset"],
                healed,
            ) {
                println!("   {event}: node {node}: {line}");
            }
        }
        if !self.agent_log(first).contains("node_reset") {
            bail!("node {first}'s agent log has no event=node_reset");
        }
        println!(
            "   node {first} is back, clean: role {}, no stale nodes, its old lineage dropped \
             (generation {} until the next activation)",
            old.role, old.generation
        );
        self.one_server(&all, second).await?;
        self.qemu_io(first, VOLUME, &["read -P 0x33 4M 1M"]).await?;
        println!("   node {first} reads what the majority wrote while it was cut off");

        // 4. Power-off failover.
        step(&format!(
            "4. Power-off of the server's node {second} (its corosync and agent SIGKILLed)"
        ));
        let survivors: Vec<NodeId> = all.iter().copied().filter(|n| *n != second).collect();
        let gen_before = self.cluster_status(second).await?.generation;
        let pid = self
            .agents
            .lock()
            .unwrap()
            .remove(&second)
            .context("the server node's agent")?;
        let cut = Clock::now();
        let (corosync, agent) = tokio::join!(
            self.cluster.kill_node(second),
            self.cluster
                .stop_spawned(pid, Signal::SIGKILL, Duration::from_secs(5))
        );
        corosync?;
        agent?;
        let (third, st) = self.agreed_server(&survivors, FAILOVER).await?;
        let seen = secs(cut.instant);
        let c = st.cluster.context("no cluster status")?;
        let watcher = *survivors.iter().find(|n| **n != third).unwrap_or(&third);
        println!(
            "   {}: node {watcher}'s agent sees node {second} leave (corosync's detection: \
             token 1000 ms + consensus)",
            self.at(watcher, "server_departed", cut)
        );
        println!(
            "   {}: node {second}'s serving lease (8 s + 2 s from its last renewal) has \
             certainly run out; `fencing: reset` cannot confirm a powered-off node, so the \
             survivors wait for it",
            self.at(third, "old_server_settled", cut)
        );
        println!(
            "   {}: node {third} serves generation {} (was {gen_before}); {} from its choice to \
             activation, the gather included",
            self.at(third, "server_active", cut),
            c.generation,
            c.failover
                .as_ref()
                .map(|f| format!("{} ms", f.chosen_to_activated_ms))
                .unwrap_or_else(|| "?".into())
        );
        println!("   {seen:.1} s: both survivors' status agree on it and their exports answer");
        for node in &survivors {
            self.qemu_io(*node, &format!("{VOLUME}@before"), &["read -P 0x11 0 4M"])
                .await?;
        }
        let writer = *survivors.iter().find(|n| **n != third).unwrap_or(&third);
        self.qemu_io(
            writer,
            VOLUME,
            &["write -P 0x44 8M 1M", "read -P 0x44 8M 1M"],
        )
        .await?;
        println!(
            "   I/O through node {writer} works, snapshot {VOLUME}@before still has the old data"
        );
        self.show_status(writer).await?;
        Ok(())
    }

    fn nbd_socket(&self, node: NodeId) -> PathBuf {
        self.cluster.node_dir(node).join("vol0.nbd")
    }

    fn control_socket(&self, node: NodeId) -> PathBuf {
        self.cluster.node_dir(node).join("csnap.sock")
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

    /// The agent log lines of `node` with one of `events` logged after `since`, as
    /// (time since `since`, line without its timestamp, level and module path).
    fn events(&self, node: NodeId, events: &[&str], since: Clock) -> Vec<(String, String)> {
        self.agent_log(node)
            .lines()
            .filter(|l| {
                events.iter().any(|e| {
                    l.contains(&format!("event=\"{e}\"")) || l.contains(&format!("event={e}"))
                })
            })
            .filter_map(|l| {
                let after = since.to(l)?;
                // "TIMESTAMP  LEVEL [span: ]module: message fields" -> "message fields"
                let mut rest = l.split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
                while let Some((head, tail)) = rest.split_once(": ") {
                    if head.contains(' ') && !head.contains('{') {
                        break;
                    }
                    rest = tail.to_string();
                }
                Some((format!("{after:4.1} s"), rest))
            })
            .collect()
    }

    /// "N.N s": when `node`'s agent first logged `event` after `since`.
    fn at(&self, node: NodeId, event: &str, since: Clock) -> String {
        let pattern = format!("event=\"{event}\"");
        self.agent_log(node)
            .lines()
            .filter(|l| l.contains(&pattern))
            .filter_map(|l| since.to(l))
            .next()
            .map(|s| format!("{s:4.1} s"))
            .unwrap_or_else(|| format!("(no {event} in node {node}'s log)"))
    }

    /// Stops the agents that still run (SIGTERM, SIGKILL after 10 s).
    async fn stop_agents(&self) {
        let pids: Vec<u32> = self.agents.lock().unwrap().values().copied().collect();
        for pid in pids {
            let _ = self
                .cluster
                .stop_spawned(pid, Signal::SIGTERM, Duration::from_secs(10))
                .await;
        }
    }

    /// Runs `program args` inside `node`'s namespace, bounded by `limit` (killed then).
    async fn run_in(
        &self,
        node: NodeId,
        program: &str,
        args: &[&str],
        limit: Duration,
    ) -> Result<std::process::Output> {
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.cluster.netns(node), program])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(limit, child).await {
            Err(_) => bail!("{program} {args:?} in node {node}: no end within {limit:?}"),
            Ok(r) => r.with_context(|| format!("{program} in node {node}")),
        }
    }

    /// `csnapctl --socket <node's> args...` in the node; stdout on success.
    async fn ctl(&self, node: NodeId, args: &[&str]) -> Result<String> {
        let socket = self.control_socket(node);
        let mut all = vec!["--socket", s(&socket)];
        all.extend_from_slice(args);
        let out = self.run_in(node, s(&self.ctl), &all, COMMAND).await?;
        if !out.status.success() {
            bail!(
                "csnapctl {} on node {node}: {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The volume's status as `node`'s agent reports it (`csnapctl status --json`).
    async fn status(&self, node: NodeId) -> Result<VolumeStatus> {
        #[derive(serde::Deserialize)]
        struct Out {
            volumes: Vec<VolumeStatus>,
        }
        let text = self.ctl(node, &["status", VOLUME, "--json"]).await?;
        let out: Out =
            serde_json::from_str(&text).with_context(|| format!("csnapctl's JSON: {text}"))?;
        out.volumes
            .into_iter()
            .next()
            .with_context(|| format!("node {node}: no volume in {text}"))
    }

    async fn cluster_status(&self, node: NodeId) -> Result<ClusterStatus> {
        self.status(node)
            .await?
            .cluster
            .with_context(|| format!("node {node}'s agent reports no cluster status"))
    }

    /// `csnapctl status` from `node`, trimmed to the membership lines.
    async fn show_status(&self, node: NodeId) -> Result<()> {
        let text = self.ctl(node, &["status", VOLUME]).await?;
        println!("   node {node} $ csnapctl status {VOLUME}   (membership lines)");
        for line in text.lines() {
            let l = line.trim();
            if l.starts_with("cluster:") || l.starts_with("this node") || l.starts_with("ring ") {
                println!("     {l}");
            }
        }
        Ok(())
    }

    /// Waits until every node of `nodes` reports the same quorate server, that server is
    /// one of them and serves, and every node's NBD export answers.
    async fn agreed_server(
        &self,
        nodes: &[NodeId],
        limit: Duration,
    ) -> Result<(NodeId, VolumeStatus)> {
        let deadline = Instant::now() + limit;
        loop {
            let mut seen = Vec::new();
            for &n in nodes {
                seen.push((n, self.status(n).await));
            }
            let server_of = |s: &Result<VolumeStatus>| {
                s.as_ref()
                    .ok()
                    .and_then(|s| s.cluster.as_ref())
                    .filter(|c| c.quorate)
                    .and_then(|c| c.server_node)
            };
            if let Some(first) = server_of(&seen[0].1) {
                let server = NodeId(first);
                let serving = seen.iter().find(|(n, _)| *n == server).and_then(|(_, s)| {
                    s.as_ref()
                        .ok()
                        .filter(|s| s.cluster.as_ref().is_some_and(|c| c.role == "Serving"))
                });
                if seen.iter().all(|(_, s)| server_of(s) == Some(first)) {
                    if let Some(status) = serving {
                        let mut exports = true;
                        for &n in nodes {
                            exports &= self.export_answers(n).await;
                        }
                        if exports {
                            return Ok((server, status.clone()));
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                let shown: Vec<String> = seen
                    .iter()
                    .map(|(n, s)| match s {
                        Ok(s) => format!("node {n}: {:?}", s.cluster),
                        Err(e) => format!("node {n}: {e:#}"),
                    })
                    .collect();
                bail!(
                    "no agreed, serving server among nodes {} within {limit:?}:\n{}",
                    list(nodes),
                    shown.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Checks that exactly one of `nodes` serves, and that it is `server`.
    async fn one_server(&self, nodes: &[NodeId], server: NodeId) -> Result<()> {
        let mut serving = Vec::new();
        for &n in nodes {
            let c = self.cluster_status(n).await?;
            if c.role == "Serving" || c.local_server.is_some() {
                serving.push(n);
            }
        }
        if serving != [server] {
            bail!(
                "serving nodes: [{}], expected only node {server}",
                list(&serving)
            );
        }
        println!("   exactly one server: node {server}");
        Ok(())
    }

    /// Whether `node`'s NBD export of the origin answers (nbdinfo --size).
    async fn export_answers(&self, node: NodeId) -> bool {
        let uri = self.nbd_uri(node, VOLUME);
        matches!(
            self.run_in(node, "nbdinfo", &["--size", &uri], Duration::from_secs(10)).await,
            Ok(out) if out.status.success()
        )
    }

    fn nbd_uri(&self, node: NodeId, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket(node).display()
        )
    }

    /// qemu-io commands on `export` through `node`'s NBD export; fails unless every
    /// command succeeded and verified. Prints the commands and qemu-io's summary lines.
    async fn qemu_io(&self, node: NodeId, export: &str, commands: &[&str]) -> Result<()> {
        let out = self.qemu_io_raw(node, export, commands, COMMAND).await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!(
            "   node {node} $ qemu-io {} {export}",
            commands
                .iter()
                .map(|c| format!("-c '{c}'"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        for line in stdout.lines().filter(|l| !l.contains("ops/sec")) {
            println!("     {line}");
        }
        if !out.status.success()
            || stdout.contains("verification failed")
            || stdout.contains("error")
            || stderr.contains("rror")
        {
            bail!(
                "qemu-io {commands:?} on {export} through node {node}: {}\n{stdout}\n{stderr}",
                out.status
            );
        }
        Ok(())
    }

    async fn qemu_io_raw(
        &self,
        node: NodeId,
        export: &str,
        commands: &[&str],
        limit: Duration,
    ) -> Result<std::process::Output> {
        let uri = self.nbd_uri(node, export);
        let mut args = vec!["-f", "raw"];
        for c in commands {
            args.extend(["-c", c]);
        }
        args.push(&uri);
        self.run_in(node, "qemu-io", &args, limit).await
    }
}

/// A moment, both as an `Instant` and as the wall clock the agents' logs use.
#[derive(Clone, Copy)]
struct Clock {
    instant: Instant,
    /// Seconds since the start of the UTC day.
    day_secs: f64,
}

impl Clock {
    fn now() -> Clock {
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            instant: Instant::now(),
            day_secs: unix.as_secs_f64() % 86_400.0,
        }
    }

    /// Seconds from this moment to the timestamp of a log line
    /// (`2026-01-02T13:07:37.939299Z ...`), if the line is from after it.
    fn to(&self, line: &str) -> Option<f64> {
        let stamp = line.split_whitespace().next()?;
        let time = stamp.split_once('T')?.1.strip_suffix('Z')?;
        let mut parts = time.split(':');
        let h: f64 = parts.next()?.parse().ok()?;
        let m: f64 = parts.next()?.parse().ok()?;
        let s: f64 = parts.next()?.parse().ok()?;
        let d = (h * 3600.0 + m * 60.0 + s - self.day_secs).rem_euclid(86_400.0);
        // A line from before this moment wraps to almost a day.
        (d < 43_200.0).then_some(d)
    }
}

fn step(text: &str) {
    println!("\n== {text}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or("<non-utf8 path>")
}

fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

fn list(nodes: &[NodeId]) -> String {
    nodes
        .iter()
        .map(|n| n.0.to_string())
        .collect::<Vec<_>>()
        .join("+")
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("     {line}");
    }
}

/// Runs a host command (formatting the store, making the key), bounded.
async fn host(program: &Path, args: &[&str]) -> Result<()> {
    let out = tokio::time::timeout(
        COMMAND,
        tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("{} {args:?}: no end within {COMMAND:?}", program.display()))?
    .with_context(|| format!("run {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} {}: {}: {}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
