//! Structured logs in a real systemd-journald: three real `csnap-agent`s in cluster mode
//! on a real 3-node corosync cluster (network namespaces), logging to a journald the test
//! starts (`csnap_e2e::journald`: standalone, in its own mount namespace, its journal in
//! the run directory).
//!
//! Nodes 1 and 2 run their agent as systemd runs a service with `StandardError=journal`:
//! stdout and stderr are a journal stream and `$JOURNAL_STREAM` names it, so the agent
//! finds out by itself that it runs under journald (`--log-target auto`, the default) and
//! logs structured entries over the native protocol. Node 3's agent gets
//! `--log-target journal` with its stderr in a file. A snapshot is created on the first
//! server, node 1 is powered off (corosync and agent SIGKILLed), and once a survivor
//! serves the snapshot is deleted there. Then `journalctl -D <journal> CSNAP_VOLUME=vol0 -o
//! json` must show, with CSNAP_VOLUME, CSNAP_NODE, CSNAP_EVENT, the event's MESSAGE_ID and
//! SYSLOG_IDENTIFIER=csnap-agent from the agent's own pid: node 1's first start
//! (server_chosen, gather_done, failover_done), snapshot_created from node 1's server, the
//! failover on the new server's node in order (server_departed, server_chosen, gather_done,
//! failover_done: the activation is ordered, then server_active: the store is open and the
//! server listens, and server_gate_open: origin writes are granted, these two in either
//! order), the other survivor seeing
//! the server depart and settle, and snapshot_deleted from the new server.
//!
//! Needs root, corosync, systemd-journald and journalctl; builds on the agent binaries
//! (`cargo build -p csnap-agent --bins` first, as for cluster_mode.rs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cpg_glue::NodeId;
use csnap_e2e::journald::{field, journald_or_skip, Journald};
use csnap_e2e::{Cluster, ClusterConfig, CsnapSection, Signal};
use csnap_proto::control::VolumeStatus;
use csnap_server::logging::message_id;

type Entry = serde_json::Map<String, serde_json::Value>;

const VOLUME: &str = "vol0";
const SERVER_PORT: u16 = 7788;
const MIB: u64 = 1 << 20;
/// A fresh agent waits one serving lease (8 s + 2 s) before it may start a server.
const FIRST_SERVER: Duration = Duration::from_secs(60);
/// Token detection, the departed server's lease (8 s + 2 s), the gather.
const FAILOVER: Duration = Duration::from_secs(60);
const COMMAND: Duration = Duration::from_secs(30);
/// journald writes what it received at once, but give it a moment.
const JOURNAL_WAIT: Duration = Duration::from_secs(15);

/// The cluster, the journal and the agents. Field order is drop order: the journal goes
/// before the cluster removes the run directory it lives in.
struct Rig {
    journal: Journald,
    cluster: Cluster,
    ctl: PathBuf,
    agents: std::collections::BTreeMap<NodeId, u32>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = self.journal.text(&[]);
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "---- the test journal (last 150 entries) ----\n{}",
                lines[lines.len().saturating_sub(150)..].join("\n")
            );
            for node in self.cluster.nodes() {
                let log = std::fs::read_to_string(self.cluster.node_dir(node).join("agent.log"))
                    .unwrap_or_default();
                if !log.is_empty() {
                    eprintln!("---- node {node} agent.log ----\n{log}");
                }
            }
        }
    }
}

impl Rig {
    fn control_socket(&self, node: NodeId) -> String {
        self.cluster
            .node_dir(node)
            .join("csnap.sock")
            .display()
            .to_string()
    }

    async fn ctl(&self, node: NodeId, args: &[&str]) -> Result<String, String> {
        let socket = self.control_socket(node);
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.cluster.netns(node)])
            .arg(&self.ctl)
            .args(["--socket", &socket])
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(COMMAND, child).await {
            Err(_) => {
                return Err(format!(
                    "csnapctl {args:?} on node {node}: no end in {COMMAND:?}"
                ))
            }
            Ok(Err(e)) => return Err(format!("csnapctl on node {node}: {e}")),
            Ok(Ok(out)) => out,
        };
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

    /// `csnapctl` through `node`'s agent once its client reached the server (the agents
    /// agree on a server before every node's client has connected to it).
    async fn ctl_once_connected(&self, node: NodeId, args: &[&str]) -> String {
        let deadline = Instant::now() + COMMAND;
        loop {
            match self.ctl(node, args).await {
                Ok(out) => return out,
                Err(e) if e.contains("no server yet") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    async fn status(&self, node: NodeId) -> Result<VolumeStatus, String> {
        let text = self.ctl(node, &["status", VOLUME, "--json"]).await?;
        csnap_e2e::rig::volume_status(node, &text)
    }

    /// Waits until every node of `nodes` is quorate and names the same server, one of
    /// them, which says it serves; returns it.
    async fn agreed_server(&self, nodes: &[NodeId], limit: Duration) -> NodeId {
        let deadline = Instant::now() + limit;
        loop {
            let mut seen = Vec::new();
            for &n in nodes {
                seen.push((n, self.status(n).await.map(|s| s.cluster)));
            }
            let servers: Vec<Option<u32>> = seen
                .iter()
                .map(|(_, s)| {
                    s.as_ref()
                        .ok()
                        .and_then(Option::as_ref)
                        .filter(|c| c.quorate)
                        .and_then(|c| c.server_node)
                })
                .collect();
            if let Some(Some(first)) = servers.first() {
                let serving = seen.iter().any(|(n, s)| {
                    n.0 == *first
                        && s.as_ref()
                            .ok()
                            .and_then(Option::as_ref)
                            .is_some_and(|c| c.role == "Serving")
                });
                if serving && servers.iter().all(|s| *s == Some(*first)) {
                    return NodeId(*first);
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed, serving server among {nodes:?} within {limit:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The volume's journal entries, once `ready` says they are all there (bounded).
    async fn entries_until(&self, what: &str, ready: impl Fn(&[Entry]) -> bool) -> Vec<Entry> {
        let deadline = Instant::now() + JOURNAL_WAIT;
        loop {
            let entries = self
                .journal
                .entries(&[&format!("CSNAP_VOLUME={VOLUME}")])
                .expect("journalctl reads the test journal");
            if ready(&entries) {
                return entries;
            }
            assert!(
                Instant::now() < deadline,
                "the journal has no {what} within {JOURNAL_WAIT:?}; events: {:?}",
                events(&entries)
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// (CSNAP_NODE, CSNAP_EVENT) of every key event, in journal order.
fn events(entries: &[Entry]) -> Vec<(String, String)> {
    entries
        .iter()
        .filter_map(|e| Some((field(e, "CSNAP_NODE")?, field(e, "CSNAP_EVENT")?)))
        .collect()
}

/// Whether `wanted` occurs in `seq` in this order (not necessarily adjacent).
fn in_order(seq: &[String], wanted: &[&str]) -> bool {
    let mut it = seq.iter();
    wanted.iter().all(|w| it.any(|s| s == w))
}

/// The events node `node` logged, in order.
fn node_events(entries: &[Entry], node: NodeId) -> Vec<String> {
    events(entries)
        .into_iter()
        .filter(|(n, _)| *n == node.0.to_string())
        .map(|(_, e)| e)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_shows_in_the_journal_with_csnap_fields() {
    let test = "a_failover_shows_in_the_journal_with_csnap_fields";
    if !journald_or_skip(test) {
        return;
    }
    let (agent, ctl) = csnap_e2e::rig::binaries(&csnap_e2e::rig::test_bin_dir());
    let Some(cluster) = Cluster::start_or_skip(test, ClusterConfig::new(3).priority(1, 10)).await
    else {
        return;
    };
    let journal = Journald::start(&cluster.dir().join("journal")).expect("start systemd-journald");
    let mut rig = Rig {
        journal,
        cluster,
        ctl,
        agents: Default::default(),
    };
    let dir = rig.cluster.dir().to_path_buf();
    let (origin, store, key) = (dir.join("origin"), dir.join("store"), dir.join("key"));
    std::fs::File::create(&origin)
        .and_then(|f| f.set_len(16 * MIB))
        .expect("create the origin");
    std::fs::File::create(&store)
        .and_then(|f| f.set_len(64 * MIB))
        .expect("create the store");
    for args in [
        vec![
            "format".to_string(),
            "--origin".into(),
            origin.display().to_string(),
            "--store".into(),
            store.display().to_string(),
            "--chunk-size".into(),
            "16K".into(),
        ],
        vec!["keygen".into(), key.display().to_string()],
    ] {
        let out = std::process::Command::new(&rig.ctl)
            .args(&args)
            .output()
            .expect("run csnapctl");
        assert!(out.status.success(), "csnapctl {args:?}: {out:?}");
    }
    for node in rig.cluster.nodes() {
        let nbd = rig.cluster.node_dir(node).join("vol0.nbd");
        let section = CsnapSection::new()
            .set("key_file", key.display().to_string())
            .and_then(|s| s.set(format!("{VOLUME}.origin"), origin.display().to_string()))
            .and_then(|s| s.set(format!("{VOLUME}.store"), store.display().to_string()))
            .and_then(|s| s.set(format!("{VOLUME}.server_port"), SERVER_PORT.to_string()))
            .and_then(|s| {
                s.set(
                    format!("{VOLUME}.nbd_listen"),
                    format!("unix:{}", nbd.display()),
                )
            })
            .expect("a valid csnap section");
        rig.cluster
            .set_csnap(&[node], section)
            .await
            .expect("write the node's csnap section and reload");
    }

    let agent_s = agent.display().to_string();
    for node in rig.cluster.nodes() {
        let socket = rig.control_socket(node);
        let pid = if node.0 == 3 {
            // Told to log to the journal; its stderr is a plain file.
            let (program, args) = rig.journal.wrap(
                "env",
                &[
                    "RUST_LOG=info",
                    &agent_s,
                    "--log-target",
                    "journal",
                    "--control-socket",
                    &socket,
                ],
            );
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            rig.cluster
                .spawn_in_node(node, &program, &args, "agent")
                .await
        } else {
            // As systemd runs a service: stdout and stderr are a journal stream.
            let (stream, journal_stream) =
                rig.journal.stream("csnap-agent").expect("a journal stream");
            let (program, args) = rig.journal.wrap(&agent_s, &["--control-socket", &socket]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            rig.cluster
                .spawn_in_node_with_output(
                    node,
                    &program,
                    &args,
                    &[
                        ("JOURNAL_STREAM", journal_stream.as_str()),
                        ("RUST_LOG", "info"),
                    ],
                    stream,
                )
                .await
        };
        rig.agents
            .insert(node, pid.expect("start the node's agent"));
    }

    let all = rig.cluster.nodes();
    let first = rig.agreed_server(&all, FIRST_SERVER).await;
    assert_eq!(first, NodeId(1), "node 1 has the highest csnap_priority");
    rig.ctl_once_connected(NodeId(2), &["snapshot", "create", VOLUME, "before"])
        .await;
    // An NBD user that hangs up in the handshake on node 2: the NBD server's
    // per-connection warning must say which volume and node it is about.
    let nbd = rig.cluster.node_dir(NodeId(2)).join("vol0.nbd");
    drop(std::os::unix::net::UnixStream::connect(&nbd).expect("connect to node 2's NBD socket"));
    let nbd_lines = rig
        .entries_until(
            "the NBD server's warning about the hung-up connection",
            |e| {
                e.iter().any(|e| {
                    field(e, "MESSAGE").is_some_and(|m| m.contains("NBD connection failed"))
                })
            },
        )
        .await;
    let warning = nbd_lines
        .iter()
        .find(|e| field(e, "MESSAGE").is_some_and(|m| m.contains("NBD connection failed")))
        .expect("the warning");
    assert_eq!(
        field(warning, "CSNAP_VOLUME").as_deref(),
        Some(VOLUME),
        "{warning:?}"
    );
    assert_eq!(
        field(warning, "CSNAP_NODE").as_deref(),
        Some("2"),
        "{warning:?}"
    );

    // Power-off of the server's node.
    let pid = rig.agents.remove(&first).expect("node 1's agent runs");
    let (corosync, killed) = tokio::join!(
        rig.cluster.kill_node(first),
        rig.cluster
            .stop_spawned(pid, Signal::SIGKILL, Duration::from_secs(5))
    );
    corosync.expect("kill node 1's corosync");
    killed.expect("kill node 1's agent");
    let survivors: Vec<NodeId> = all.iter().copied().filter(|n| *n != first).collect();
    let second = rig.agreed_server(&survivors, FAILOVER).await;
    let watcher = *survivors
        .iter()
        .find(|n| **n != second)
        .expect("two survivors");
    rig.ctl_once_connected(watcher, &["snapshot", "delete", VOLUME, "before"])
        .await;

    let entries = rig
        .entries_until(
            "failover_done and snapshot_deleted from the new server",
            |entries| {
                let ev = node_events(entries, second);
                in_order(&ev, &["failover_done", "snapshot_deleted"])
            },
        )
        .await;

    // Every key event carries the volume, the node, its MESSAGE_ID and who logged it.
    let keyed: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.contains_key("CSNAP_EVENT"))
        .collect();
    assert!(keyed.len() >= 10, "few key events: {:?}", events(&entries));
    for e in &keyed {
        let name = field(e, "CSNAP_EVENT").unwrap_or_default();
        assert_eq!(field(e, "CSNAP_VOLUME").as_deref(), Some(VOLUME), "{e:?}");
        let node: u32 = field(e, "CSNAP_NODE")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no CSNAP_NODE: {e:?}"));
        assert_eq!(
            field(e, "MESSAGE_ID").as_deref(),
            message_id(&name),
            "the MESSAGE_ID of {name}: {e:?}"
        );
        assert!(
            message_id(&name).is_some(),
            "{name} is not in the catalogue"
        );
        assert_eq!(
            field(e, "SYSLOG_IDENTIFIER").as_deref(),
            Some("csnap-agent"),
            "{e:?}"
        );
        assert_eq!(field(e, "_TRANSPORT").as_deref(), Some("journal"), "{e:?}");
        let pid = field(e, "_PID").unwrap_or_default();
        if node != first.0 {
            assert_eq!(
                Some(&pid),
                rig.agents
                    .get(&NodeId(node))
                    .map(|p| p.to_string())
                    .as_ref(),
                "node {node}'s events come from its agent's pid: {e:?}"
            );
        }
        assert!(
            !field(e, "MESSAGE").unwrap_or_default().is_empty(),
            "an empty MESSAGE: {e:?}"
        );
    }

    // The first server's start, then its snapshot.
    let on_first = node_events(&entries, first);
    assert!(
        in_order(
            &on_first,
            &[
                "server_chosen",
                "gather_done",
                "failover_done",
                "snapshot_created"
            ]
        ),
        "node {first}: {on_first:?}"
    );
    let created = entries
        .iter()
        .find(|e| field(e, "CSNAP_EVENT").as_deref() == Some("snapshot_created"))
        .expect("snapshot_created");
    assert_eq!(
        field(created, "CSNAP_SNAPSHOT").as_deref(),
        Some("before"),
        "{created:?}"
    );
    assert!(field(created, "CSNAP_SNAPSHOT_ID").is_some(), "{created:?}");

    // Events about another node name it in a field: the departed server here.
    let departed: Vec<&Entry> = entries
        .iter()
        .filter(|e| field(e, "CSNAP_EVENT").as_deref() == Some("server_departed"))
        .collect();
    assert!(!departed.is_empty(), "no server_departed");
    for e in &departed {
        assert_eq!(
            field(e, "CSNAP_TARGET_NODE"),
            Some(first.0.to_string()),
            "server_departed names the departed server: {e:?}"
        );
    }
    let chosen = entries
        .iter()
        .find(|e| field(e, "CSNAP_EVENT").as_deref() == Some("server_chosen"))
        .expect("server_chosen");
    assert_eq!(field(chosen, "CSNAP_TARGET_NODE"), None, "{chosen:?}");

    // The failover on the new server's node, in order, after the power-off. The agent's
    // server_active and the engine's server_gate_open come from two threads right after
    // the activation (with no snapshot client to wait for, the gate opens as the engine
    // starts): each follows failover_done, in either order.
    let on_second = node_events(&entries, second);
    for last in ["server_active", "server_gate_open"] {
        assert!(
            in_order(
                &on_second,
                &[
                    "server_departed",
                    "server_chosen",
                    "gather_done",
                    "failover_done",
                    last,
                    "snapshot_deleted"
                ]
            ),
            "node {second}: {on_second:?}"
        );
    }
    let on_watcher = node_events(&entries, watcher);
    assert!(
        in_order(&on_watcher, &["server_departed", "old_server_settled"]),
        "node {watcher}: {on_watcher:?}"
    );
    // In the whole journal the first server's events come before the failover.
    let all_events: Vec<String> = events(&entries).into_iter().map(|(_, e)| e).collect();
    assert!(
        in_order(
            &all_events,
            &[
                "server_chosen",
                "failover_done",
                "snapshot_created",
                "server_departed",
                "server_chosen",
                "failover_done",
                "snapshot_deleted"
            ]
        ),
        "{all_events:?}"
    );

    // The operators' query for one event.
    let done = rig
        .journal
        .entries(&[
            &format!("CSNAP_VOLUME={VOLUME}"),
            "CSNAP_EVENT=failover_done",
        ])
        .expect("journalctl");
    let nodes: Vec<String> = done.iter().filter_map(|e| field(e, "CSNAP_NODE")).collect();
    assert_eq!(
        nodes,
        vec![first.0.to_string(), second.0.to_string()],
        "failover_done entries: {done:?}"
    );
    let by_id = rig
        .journal
        .entries(&[&format!(
            "MESSAGE_ID={}",
            message_id("failover_done").unwrap_or_default()
        )])
        .expect("journalctl");
    assert_eq!(by_id.len(), 2, "{by_id:?}");

    // The other queries docs/operations.md shows.
    let fields = rig
        .journal
        .journalctl(&["-F", "CSNAP_EVENT"])
        .expect("journalctl -F");
    for e in [
        "server_chosen",
        "gather_done",
        "failover_done",
        "snapshot_created",
    ] {
        assert!(
            fields.lines().any(|l| l == e),
            "journalctl -F CSNAP_EVENT: {fields}"
        );
    }
    let warnings = rig
        .journal
        .journalctl(&["-t", "csnap-agent", "-p", "warning", "-o", "json"])
        .expect("journalctl -t -p");
    assert!(
        warnings.contains("\"server_departed\"") && !warnings.contains("\"server_chosen\""),
        "journalctl -t csnap-agent -p warning: {warnings}"
    );

    // Every journalctl command of docs/operations.md, as written (the harness adds only
    // `-D <journal> --no-pager`): each answers, and those about this failover find it.
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .expect("read docs/operations.md");
    let queries: Vec<&str> = docs
        .lines()
        .map(|l| l.split(" #").next().unwrap_or(l).trim())
        .filter(|l| l.starts_with("journalctl ") && !l.ends_with(" -f"))
        .collect();
    assert!(
        queries.len() >= 8,
        "journalctl lines in the docs: {queries:?}"
    );
    for query in &queries {
        let args: Vec<&str> = query.split_whitespace().skip(1).collect();
        let out = rig
            .journal
            .journalctl(&args)
            .unwrap_or_else(|e| panic!("`{query}` (docs/operations.md): {e}"));
        let about_this_failover = ["failover_done", "013790b9f4aa47039c57516253a781d2"]
            .iter()
            .any(|m| query.contains(m))
            || *query == format!("journalctl CSNAP_VOLUME={VOLUME}");
        assert!(
            !about_this_failover || out.contains("serves"),
            "`{query}` (docs/operations.md) finds no failover: {out}"
        );
    }

    // Server lines (not only key events) carry the volume and node too.
    assert!(
        entries.iter().any(
            |e| field(e, "TARGET").is_some_and(|t| t.starts_with("csnap_server"))
                && field(e, "CSNAP_NODE").is_some()
        ),
        "no server line with CSNAP_NODE"
    );
    // Node 3 logged nothing as text (the journal was its target).
    let text = std::fs::read_to_string(rig.cluster.node_dir(NodeId(3)).join("agent.log"))
        .unwrap_or_default();
    assert!(
        !text.contains("INFO") && !text.contains("WARN"),
        "node 3's stderr has log lines: {text}"
    );
}

/// A process this test started, SIGKILLed and reaped on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How the agent picks its log target, without a cluster: an agent in cluster mode with
/// no corosync to reach logs `waiting for corosync` at once, which shows where its lines
/// go. With `$JOURNAL_STREAM` naming another file than its stderr (a child of a service
/// that redirected its stderr) it logs text to stderr; with `--log-target stderr` and a
/// journal stream as stderr its text lines reach the journal as a stream (`_TRANSPORT=stdout`,
/// no CSNAP fields parsed); with `--log-target journal` and no journal socket it refuses to
/// start, saying why.
#[test]
fn the_log_target_follows_journal_stream_and_the_option() {
    let test = "the_log_target_follows_journal_stream_and_the_option";
    if !journald_or_skip(test) || !csnap_e2e::prerequisites_or_skip(test) {
        return;
    }
    let (agent, _) = csnap_e2e::rig::binaries(&csnap_e2e::rig::test_bin_dir());
    let dir = PathBuf::from(format!("/tmp/csnap-e2e-journald-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test directory");
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = RemoveDir(dir.clone());
    let journal = Journald::start(&dir.join("journal")).expect("start systemd-journald");
    let agent_s = agent.display().to_string();
    let socket = dir.join("csnap.sock").display().to_string();
    let start = |args: &[&str], stderr: std::fs::File, env: &[(&str, &str)]| -> Killed {
        let mut all = vec![agent_s.as_str(), "--control-socket", socket.as_str()];
        all.extend_from_slice(args);
        let (program, wrapped) = journal.wrap(all[0], &all[1..]);
        let child = std::process::Command::new(program)
            .args(&wrapped)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the agent");
        Killed(child)
    };
    let wait_for = |what: &str, ready: &dyn Fn() -> Option<String>| -> String {
        let deadline = Instant::now() + JOURNAL_WAIT;
        loop {
            if let Some(found) = ready() {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{test}: no {what} within {JOURNAL_WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // JOURNAL_STREAM of another file: text on stderr.
    let (_stream, value) = journal.stream("other").expect("a journal stream");
    let text_path = dir.join("agent.err");
    let file = std::fs::File::create(&text_path).expect("create the stderr file");
    {
        let _agent = start(&[], file, &[("JOURNAL_STREAM", value.as_str())]);
        let text = wait_for("text line on stderr", &|| {
            std::fs::read_to_string(&text_path)
                .ok()
                .filter(|t| t.contains("waiting for corosync"))
        });
        assert!(text.contains("WARN"), "{text}");
    }

    // --log-target stderr on a journal stream: text lines, stored as a stream's.
    let (stream, value) = journal.stream("csnap-text").expect("a journal stream");
    {
        let _agent = start(
            &["--log-target", "stderr"],
            stream,
            &[("JOURNAL_STREAM", value.as_str())],
        );
        let entry = wait_for("stream entry in the journal", &|| {
            let entries = journal.entries(&["SYSLOG_IDENTIFIER=csnap-text"]).ok()?;
            entries
                .iter()
                .find(|e| field(e, "MESSAGE").is_some_and(|m| m.contains("waiting for corosync")))
                .map(|e| format!("{e:?}"))
        });
        assert!(
            entry.contains("\"_TRANSPORT\": String(\"stdout\")"),
            "{entry}"
        );
    }
    let native = journal
        .entries(&["SYSLOG_IDENTIFIER=csnap-agent"])
        .expect("journalctl");
    assert!(native.is_empty(), "no native entries expected: {native:?}");

    // --log-target journal without a journal socket: a clear refusal.
    if !Path::new("/run/systemd/journal/socket").exists() {
        let out = std::process::Command::new(&agent)
            .args(["--log-target", "journal", "--control-socket", &socket])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run the agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("cannot log to the journal (/run/systemd/journal/socket)"),
            "{stderr}"
        );
    }
}
