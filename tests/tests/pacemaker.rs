//! The OCF resource agent (`packaging/ocf/csnap`, `ocf:csnap:csnap`) and csnap under a real
//! Pacemaker cluster in network namespaces.
//!
//! * `ocf_agent_passes_ocf_tester`: Debian's `ocf-tester` (resource-agents) against the agent
//!   on a one-node corosync cluster, then the agent's own exit codes and `ocf-exit-reason:`
//!   lines for a missing program, a bad parameter, a killed agent and a stopped (SIGSTOP)
//!   agent whose control socket does not answer.
//! * `pacemaker_runs_csnap_as_a_clone`: three nodes, corosync and pacemaker each
//!   (tests/src/pacemaker.rs), configured with the `pcs` commands of docs/operations.md;
//!   then, on one cluster:
//!   1. the clone starts on every node (`crm_mon --output-as=xml`, `pcs status`) and the
//!      volume gets a server (`csnapctl status --json` on every node);
//!   2. a node's csnap-agent killed by hand (SIGKILL by pid) is restarted by pacemaker
//!      (its monitor notices: a recorded `not running` failure, a new pid);
//!   3. the server's node powered off (every process in its namespace SIGKILLed): with
//!      `fencing: stonith` the survivors fence it through pacemaker (`stonith_admin`, the
//!      test fence device), another node serves and qemu-io through a survivor's NBD
//!      export writes and verifies; the node then boots again and rejoins;
//!   4. the server's node partitioned away: the test fence device cannot reach it (like
//!      a power switch on the cut network), so the majority waits out its serving lease
//!      and takes over; on the heal the old server's node is stale and is fenced through
//!      `stonith_admin`; exactly one server remains.
//!
//! The pacemaker cluster runs with `stonith-enabled=false`, so that pacemaker itself does
//! not fence the lost nodes (in production it would, with a real device, and that is fine
//! for csnap too): here it is csnap's agent that calls `stonith_admin`, and the test can
//! see that it did. `no-quorum-policy=freeze` keeps the cut-off node's agent running, so
//! that it comes back stale.
//!
//! The agents are the workspace's built binaries (as in tests/tests/cluster_mode.rs:
//! `$CSNAP_BIN_DIR`, else this test's target directory; build them first with
//! `cargo build -p csnap-agent --bins`). On failure the agents' and pacemaker's log tails
//! are printed; `CSNAP_E2E_KEEP=1` keeps the run directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cpg_glue::NodeId;
use csnap_e2e::pacemaker::{
    node_name, prerequisites_or_skip, programs_or_skip, tail, Pacemaker, PacemakerConfig,
};
use csnap_e2e::{Cluster, ClusterConfig, CsnapSection};
use csnap_proto::control::VolumeStatus;

const VOLUME: &str = "vol0";
const SERVER_PORT: u16 = 7788;
const MIB: u64 = 1 << 20;
const ORIGIN_SIZE: u64 = 16 * MIB;
const STORE_SIZE: u64 = 64 * MIB;
/// The origin's export on a node, at the agent's default NBD socket (every node has its
/// own /run).
const NBD_URI: &str = "nbd+unix:///vol0?socket=/run/csnap/vol0.nbd";
/// The snapshot the walk-through of docs/operations.md takes before the failover, and its export.
const SNAPSHOT: &str = "before-failover";
const SNAPSHOT_URI: &str = "nbd+unix:///vol0@before-failover?socket=/run/csnap/vol0.nbd";

/// The commands docs/operations.md gives an admin, run here word for word (the test
/// checks the document still says so).
const PCS_CREATE: &[&str] = &[
    "resource",
    "create",
    "csnap",
    "ocf:csnap:csnap",
    "clone",
    "interleave=true",
];
const PCS_PROPERTIES: &[&str] = &[
    "property",
    "set",
    "stonith-enabled=false",
    "no-quorum-policy=freeze",
];

/// Bound for the clone to start everywhere after `pcs resource create`.
const CLONE_START: Duration = Duration::from_secs(90);
/// Bound for the first server: a fresh agent waits one serving lease (8 s + 2 s) first.
const FIRST_SERVER: Duration = Duration::from_secs(60);
/// Bound for a failover: detection (token 1000 ms), fencing or the lease (10 s), gather.
const FAILOVER: Duration = Duration::from_secs(75);
/// Bound for pacemaker to notice a killed agent (monitor every 10 s) and restart it.
const RECOVERY: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

/// Origin, store (formatted) and key in the run directory; the csnap section every node
/// gets (control socket and NBD socket at their defaults: every node has its own /run).
async fn shared_volume(cluster: &Cluster, ctl: &Path, fencing: &str) -> CsnapSection {
    let dir = cluster.dir();
    let (origin, store, key) = (dir.join("origin"), dir.join("store"), dir.join("key"));
    std::fs::File::create(&origin)
        .and_then(|f| f.set_len(ORIGIN_SIZE))
        .expect("create the origin file");
    std::fs::File::create(&store)
        .and_then(|f| f.set_len(STORE_SIZE))
        .expect("create the store file");
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
        let out = tokio::process::Command::new(ctl)
            .args(&args)
            .output()
            .await
            .expect("run csnapctl");
        assert!(
            out.status.success(),
            "csnapctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    CsnapSection::new()
        .set("key_file", key.display().to_string())
        .and_then(|s| s.set("fencing", fencing))
        .and_then(|s| s.set(format!("{VOLUME}.origin"), origin.display().to_string()))
        .and_then(|s| s.set(format!("{VOLUME}.store"), store.display().to_string()))
        .and_then(|s| s.set(format!("{VOLUME}.server_port"), SERVER_PORT.to_string()))
        .expect("a valid csnap section")
}

// ---------------------------------------------------------------------------------------
// ocf-tester and the agent's exit codes

/// One call of the resource agent inside node 1's namespace: (exit code, stdout, stderr).
async fn ra(
    cluster: &Cluster,
    agent: &Path,
    action: &str,
    params: &[(&str, String)],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &cluster.netns(NodeId(1)), "env"])
        .arg("OCF_ROOT=/usr/lib/ocf")
        .arg("OCF_RESOURCE_INSTANCE=csnap");
    for (k, v) in params {
        cmd.arg(format!("OCF_RESKEY_{k}={v}"));
    }
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg(agent).arg(action).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("the agent's {action} did not end within 120 s"))
        .expect("run the resource agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn exit_reason(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("ocf-exit-reason:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocf_agent_passes_ocf_tester() {
    const TEST: &str = "ocf_agent_passes_ocf_tester";
    if !programs_or_skip(TEST, &["ocf-tester", "xmllint"]) {
        return;
    }
    let (agent_bin, ctl) = csnap_e2e::rig::binaries(&csnap_e2e::rig::test_bin_dir());
    let Some(cluster) = Cluster::start_or_skip(TEST, ClusterConfig::new(1)).await else {
        return;
    };
    let node = NodeId(1);
    let section = shared_volume(&cluster, &ctl, "kill_node").await;
    cluster
        .set_csnap(&[node], section)
        .await
        .expect("write the csnap section and reload");

    // ocf-tester runs `meta-data` as user nobody: the agent must be readable on its way.
    let dir = cluster.node_dir(node).join("ocf");
    std::fs::create_dir_all(&dir).expect("create the agent's directory");
    let agent = dir.join("csnap");
    std::fs::copy(repo().join("packaging/ocf/csnap"), &agent).expect("copy the agent");
    let params: Vec<(&str, String)> = vec![
        ("binary", agent_bin.display().to_string()),
        ("csnapctl", ctl.display().to_string()),
        ("pidfile", dir.join("csnap-agent.pid").display().to_string()),
        ("logfile", dir.join("csnap-agent.log").display().to_string()),
        (
            "control_socket",
            dir.join("csnap.sock").display().to_string(),
        ),
    ];
    let log = dir.join("csnap-agent.log");
    let show_log = || format!("agent log:\n{}", tail(&log, 30));

    let started = Instant::now();
    let mut tester = tokio::process::Command::new("ip");
    tester
        .args([
            "netns",
            "exec",
            &cluster.netns(node),
            "ocf-tester",
            "-n",
            "csnap",
        ])
        .kill_on_drop(true);
    for (k, v) in &params {
        tester.args(["-o", &format!("{k}={v}")]);
    }
    tester.arg(&agent);
    let out = tokio::time::timeout(Duration::from_secs(180), tester.output())
        .await
        .expect("ocf-tester ends within 180 s")
        .expect("run ocf-tester");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("passed all tests"),
        "ocf-tester: {}\n{stdout}\n{stderr}\n{}",
        out.status,
        show_log()
    );
    eprintln!("{TEST}: ocf-tester passed in {:?}", started.elapsed());

    // Exit codes and reasons, beyond what ocf-tester checks.
    let with = |key: &str, value: &str| -> Vec<(&str, String)> {
        params
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    if *k == key {
                        value.to_string()
                    } else {
                        v.clone()
                    },
                )
            })
            .collect()
    };
    let (code, _, err) = ra(
        &cluster,
        &agent,
        "validate-all",
        &with("binary", "/nonexistent/csnap-agent"),
        &[],
    )
    .await;
    assert_eq!(code, 5, "missing binary: ERR_INSTALLED; {err}");
    assert!(
        exit_reason(&err).is_some_and(|r| r.contains("/nonexistent/csnap-agent")),
        "{err}"
    );
    let (code, _, err) = ra(
        &cluster,
        &agent,
        "start",
        &with("pidfile", "relative.pid"),
        &[],
    )
    .await;
    assert_eq!(code, 6, "relative pid file: ERR_CONFIGURED; {err}");
    assert!(
        exit_reason(&err).is_some_and(|r| r.contains("absolute")),
        "{err}"
    );
    let (code, _, _) = ra(&cluster, &agent, "promote", &params, &[]).await;
    assert_eq!(code, 3, "promote: ERR_UNIMPLEMENTED");
    // A probe on a node without the programs: not running.
    let (code, _, err) = ra(
        &cluster,
        &agent,
        "monitor",
        &with("binary", "/nonexistent/csnap-agent"),
        &[("OCF_RESKEY_CRM_meta_interval", "0")],
    )
    .await;
    assert_eq!(code, 7, "probe without the binary: NOT_RUNNING; {err}");

    let (code, _, err) = ra(&cluster, &agent, "start", &params, &[]).await;
    assert_eq!(code, 0, "start: {err}\n{}", show_log());
    let pid: i32 = std::fs::read_to_string(dir.join("csnap-agent.pid"))
        .expect("the pid file")
        .trim()
        .parse()
        .expect("a pid");
    let agent_pid = nix::unistd::Pid::from_raw(pid);
    // Stopped (SIGSTOP): alive, but its socket does not answer: failed, with a reason.
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGSTOP)
        .expect("SIGSTOP the agent");
    let stuck = ra(
        &cluster,
        &agent,
        "monitor",
        &params,
        &[("OCF_RESKEY_CRM_meta_timeout", "8000")],
    )
    .await;
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGCONT)
        .expect("SIGCONT the agent");
    assert_eq!(stuck.0, 1, "a stuck agent: ERR_GENERIC; {}", stuck.2);
    assert!(
        exit_reason(&stuck.2).is_some_and(|r| r.contains("does not answer")),
        "{}",
        stuck.2
    );
    let (code, _, err) = ra(&cluster, &agent, "monitor", &params, &[]).await;
    assert_eq!(code, 0, "monitor after SIGCONT: {err}");
    // Killed: not running (pacemaker counts that as a failure of a recurring monitor).
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGKILL)
        .expect("SIGKILL the agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _, err) = ra(&cluster, &agent, "monitor", &params, &[]).await;
        if code == 7 {
            assert!(
                exit_reason(&err).is_some_and(|r| r.contains(&format!("pid {pid}) is gone"))),
                "{err}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "monitor of a killed agent: {code} {err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _, err) = ra(&cluster, &agent, "stop", &params, &[]).await;
    assert_eq!(code, 0, "stop after a kill: {err}");
    assert!(
        !dir.join("csnap-agent.pid").exists(),
        "stop removes the pid file"
    );

    // An agent that ignores SIGTERM (stopped) is SIGKILLed before the stop timeout.
    let (code, _, err) = ra(&cluster, &agent, "start", &params, &[]).await;
    assert_eq!(code, 0, "start again: {err}\n{}", show_log());
    let pid: i32 = std::fs::read_to_string(dir.join("csnap-agent.pid"))
        .expect("the pid file")
        .trim()
        .parse()
        .expect("a pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP the agent");
    let stop_started = Instant::now();
    let (code, _, err) = ra(
        &cluster,
        &agent,
        "stop",
        &params,
        &[("OCF_RESKEY_CRM_meta_timeout", "12000")],
    )
    .await;
    assert_eq!(code, 0, "stop of a stuck agent: {err}");
    assert!(
        stop_started.elapsed() < Duration::from_secs(12),
        "stop took {:?}, beyond its timeout",
        stop_started.elapsed()
    );
    assert!(
        err.contains("SIGKILL"),
        "the stop says it had to SIGKILL: {err}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .is_empty(),
        "the stuck agent is gone"
    );

    // Without corosync, start refuses with a reason.
    cluster.stop_node(node).await.expect("stop corosync");
    let (code, _, err) = ra(&cluster, &agent, "start", &params, &[]).await;
    assert_eq!(code, 1, "start without corosync: {err}");
    assert!(
        exit_reason(&err).is_some_and(|r| r.contains("corosync does not answer")),
        "{err}"
    );
    assert!(!dir.join("csnap-agent.pid").exists(), "nothing started");
}

// ---------------------------------------------------------------------------------------
// The pacemaker cluster

/// The 3-node cluster with pacemaker, configured as the docs say.
struct Rig<'a> {
    pcmk: Pacemaker<'a>,
    test: &'static str,
}

impl Drop for Rig<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in self.pcmk.cluster().nodes() {
                eprintln!(
                    "---- {}: node {node} csnap-agent.log (last lines) ----\n{}",
                    self.test,
                    tail(&self.pcmk.log_dir(node).join("csnap/csnap-agent.log"), 40)
                );
            }
            eprintln!("---- fence.log ----\n{}", self.pcmk.fence_log());
        }
    }
}

impl Rig<'_> {
    /// `csnapctl status vol0 --json` on `node`.
    async fn status(&self, node: NodeId) -> Result<VolumeStatus, String> {
        let text = self
            .pcmk
            .exec_ok(node, "csnapctl", &["status", VOLUME, "--json"])
            .await
            .map_err(|e| e.to_string())?;
        csnap_e2e::rig::volume_status(node, &text)
    }

    /// Waits until every node of `nodes` is quorate and names the same server, which is
    /// one of them and serves, and every node's NBD export answers. Returns the server.
    async fn agreed_server(&self, nodes: &[NodeId], limit: Duration) -> NodeId {
        let deadline = Instant::now() + limit;
        loop {
            let mut seen = Vec::new();
            for &n in nodes {
                seen.push((n, self.status(n).await));
            }
            let servers: BTreeSet<Option<u32>> = seen
                .iter()
                .map(|(_, s)| {
                    s.as_ref()
                        .ok()
                        .and_then(|s| s.cluster.as_ref())
                        .filter(|c| c.quorate)
                        .and_then(|c| c.server_node)
                })
                .collect();
            if let [Some(server)] = servers.iter().collect::<Vec<_>>()[..] {
                let server = NodeId(*server);
                let serving = seen.iter().any(|(n, s)| {
                    *n == server
                        && s.as_ref()
                            .is_ok_and(|s| s.cluster.as_ref().is_some_and(|c| c.role == "Serving"))
                });
                if serving {
                    let mut exports = true;
                    for &n in nodes {
                        exports &= self
                            .pcmk
                            .exec_timeout(
                                n,
                                "nbdinfo",
                                &["--size", NBD_URI],
                                Duration::from_secs(10),
                            )
                            .await
                            .is_ok_and(|o| o.success());
                    }
                    if exports {
                        return server;
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
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// qemu-io `commands` on the origin through `node`'s NBD export; panics unless every
    /// command succeeded (and every read verified).
    async fn qemu_io(&self, node: NodeId, commands: &[&str], limit: Duration) {
        self.qemu_io_on(node, NBD_URI, commands, limit).await;
    }

    /// qemu-io `commands` on the NBD export `uri` of `node`, as [`Self::qemu_io`].
    async fn qemu_io_on(&self, node: NodeId, uri: &str, commands: &[&str], limit: Duration) {
        let mut args = vec!["-f", "raw"];
        for c in commands {
            args.extend(["-c", c]);
        }
        args.push(uri);
        let out = self
            .pcmk
            .exec_timeout(node, "qemu-io", &args, limit)
            .await
            .unwrap_or_else(|e| panic!("{}: qemu-io {commands:?} on node {node}: {e}", self.test));
        assert!(
            out.success()
                && !out.stdout.contains("verification failed")
                && !out.stdout.contains("error")
                && !out.stderr.contains("rror"),
            "{}: qemu-io {commands:?} on node {node}: {}\n{}\n{}",
            self.test,
            out.status,
            out.stdout,
            out.stderr
        );
    }

    /// The pid in `node`'s csnap-agent pid file, if that process runs in the node.
    fn agent_pid(&self, node: NodeId) -> Option<u32> {
        let text =
            std::fs::read_to_string(self.pcmk.run_dir(node).join("csnap/csnap-agent.pid")).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        self.pcmk.pids_in(node).contains(&pid).then_some(pid)
    }

    fn agent_log(&self, node: NodeId) -> String {
        std::fs::read_to_string(self.pcmk.log_dir(node).join("csnap/csnap-agent.log"))
            .unwrap_or_default()
    }

    /// Waits until crm_mon on `on` shows the clone started on exactly `nodes`.
    async fn clone_started_on(&self, on: NodeId, nodes: &[NodeId], limit: Duration) {
        let want: BTreeSet<String> = nodes.iter().map(|n| node_name(*n)).collect();
        self.pcmk
            .wait_status(on, &format!("csnap started on {want:?}"), limit, |s| {
                s.started_on("csnap") == want
            })
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.test));
    }

    /// Waits until crm_mon on `on` lists a successful fencing of `target` requested by
    /// stonith_admin (csnap's agent), and the test device's log shows it.
    async fn fenced_through_pacemaker(&self, on: NodeId, target: NodeId, limit: Duration) {
        let name = node_name(target);
        let status = self
            .pcmk
            .wait_status(
                on,
                &format!("a fencing of {name} in the history"),
                limit,
                |s| {
                    s.fence_events.iter().any(|e| {
                        e.get("target") == Some(&name)
                            && e.get("status").map(String::as_str) == Some("success")
                            && e.get("client")
                                .is_some_and(|c| c.starts_with("stonith_admin"))
                    })
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.test));
        assert!(
            self.pcmk.fence_log().contains(&format!("plug={name} ")),
            "{}: the fence device has no record of {name}: {}\n{:?}",
            self.test,
            self.pcmk.fence_log(),
            status.fence_events
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacemaker_runs_csnap_as_a_clone() {
    const TEST: &str = "pacemaker_runs_csnap_as_a_clone";
    if !prerequisites_or_skip(TEST, &["qemu-io", "nbdinfo"]) {
        return;
    }
    let docs =
        std::fs::read_to_string(repo().join("docs/operations.md")).expect("docs/operations.md");
    for command in [PCS_CREATE, PCS_PROPERTIES] {
        let line = format!("pcs {}", command.join(" "));
        assert!(
            docs.contains(&line),
            "docs/operations.md no longer says `{line}`"
        );
    }
    let (agent_bin, ctl) = csnap_e2e::rig::binaries(&csnap_e2e::rig::test_bin_dir());
    let test_start = Instant::now();
    // Node 1 has the highest csnap_priority: it serves first.
    let config = ClusterConfig::new(3).priority(1, 10);
    let Some(cluster) = Cluster::start_or_skip(TEST, config).await else {
        return;
    };
    let section = shared_volume(&cluster, &ctl, "stonith").await;
    let all = cluster.nodes();
    cluster
        .set_csnap(&all, section)
        .await
        .expect("write the csnap section and reload");
    let pcmk = Pacemaker::start(
        &cluster,
        PacemakerConfig {
            ocf_agent: repo().join("packaging/ocf/csnap"),
            sbin: vec![
                (
                    "fence_csnap_test".into(),
                    repo().join("tests/fence/fence_csnap_test"),
                ),
                ("csnap-agent".into(), agent_bin),
                ("csnapctl".into(), ctl),
            ],
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{TEST}: start pacemaker: {e}"));
    let rig = Rig { pcmk, test: TEST };
    let (n1, n2, n3) = (NodeId(1), NodeId(2), NodeId(3));
    eprintln!("{TEST}: pacemaker up after {:?}", test_start.elapsed());

    // 1. Configure as the docs say, on node 1.
    rig.pcmk
        .exec_ok(n1, "pcs", PCS_PROPERTIES)
        .await
        .expect("pcs property set");
    let fence_dir = rig.pcmk.fence_dir().display().to_string();
    let hosts: Vec<String> = all.iter().map(|n| node_name(*n)).collect();
    rig.pcmk
        .exec_ok(
            n1,
            "pcs",
            &[
                "stonith",
                "create",
                "fence-test",
                "fence_csnap_test",
                &format!("state_dir={fence_dir}"),
                &format!("pcmk_host_list={}", hosts.join(" ")),
            ],
        )
        .await
        .expect("pcs stonith create");
    rig.pcmk
        .exec_ok(n1, "pcs", PCS_CREATE)
        .await
        .expect("pcs resource create");
    let describe = rig
        .pcmk
        .exec_ok(n1, "pcs", &["resource", "describe", "ocf:csnap:csnap"])
        .await
        .expect("pcs resource describe");
    assert!(
        describe.contains("control_socket") && describe.contains("csnap-agent"),
        "{TEST}: pcs resource describe ocf:csnap:csnap:\n{describe}"
    );
    rig.clone_started_on(n2, &all, CLONE_START).await;
    let pcs_status = rig
        .pcmk
        .exec_ok(n3, "pcs", &["status"])
        .await
        .expect("pcs status");
    assert!(
        pcs_status.contains("Clone Set: csnap-clone [csnap]")
            && pcs_status.contains("Started: [ n1 n2 n3 ]"),
        "{TEST}: pcs status:\n{pcs_status}"
    );
    let server = rig.agreed_server(&all, FIRST_SERVER).await;
    assert_eq!(server, n1, "{TEST}: the highest csnap_priority serves");
    rig.qemu_io(n2, &["write -P 0x11 0 1M"], Duration::from_secs(30))
        .await;
    rig.qemu_io(n3, &["read -P 0x11 0 1M"], Duration::from_secs(30))
        .await;
    // The walk-through's snapshot, taken on a node that does not serve.
    let created = rig
        .pcmk
        .exec_ok(n3, "csnapctl", &["snapshot", "create", VOLUME, SNAPSHOT])
        .await
        .expect("csnapctl snapshot create vol0 before-failover");
    assert!(created.contains(SNAPSHOT), "{TEST}: {created}");
    eprintln!(
        "{TEST}: clone started, server {server}, I/O works after {:?}",
        test_start.elapsed()
    );

    // 2. A node's agent killed by hand is restarted by pacemaker.
    let phase = Instant::now();
    let old = rig.agent_pid(n2).expect("node 2's csnap-agent runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL node 2's agent");
    let deadline = Instant::now() + RECOVERY;
    loop {
        if rig.agent_pid(n2).is_some_and(|p| p != old) && rig.status(n2).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{TEST}: pacemaker did not restart node 2's killed agent within {RECOVERY:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = rig
        .pcmk
        .wait_status(
            n1,
            "the monitor failure on n2 recorded and the clone started everywhere again",
            Duration::from_secs(30),
            |s| {
                s.started_on("csnap").len() == 3
                    && s.failures.iter().any(|f| {
                        f.get("node").map(String::as_str) == Some("n2")
                            && f.get("op_key")
                                .is_some_and(|k| k.starts_with("csnap_monitor"))
                            && f.get("exitcode").map(String::as_str) == Some("7")
                            && f.get("exitreason").is_some_and(|r| r.contains("is gone"))
                    })
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{TEST}: {e}"));
    eprintln!("{TEST}: pacemaker recorded {:?}", status.failures);
    let failed_status = rig
        .pcmk
        .exec_ok(n3, "pcs", &["status"])
        .await
        .expect("pcs status");
    assert!(
        failed_status.contains("is gone"),
        "{TEST}: pcs status shows no reason for the failure:\n{failed_status}"
    );
    rig.pcmk
        .exec_ok(n1, "pcs", &["resource", "cleanup", "csnap"])
        .await
        .expect("pcs resource cleanup");
    rig.pcmk
        .wait_status(
            n1,
            "no failure after the cleanup",
            Duration::from_secs(30),
            |s| s.failures.is_empty() && s.started_on("csnap").len() == 3,
        )
        .await
        .unwrap_or_else(|e| panic!("{TEST}: {e}"));
    assert_eq!(
        rig.agreed_server(&all, FAILOVER).await,
        n1,
        "{TEST}: the server stays"
    );
    eprintln!(
        "{TEST}: killed agent restarted by pacemaker in {:?}",
        phase.elapsed()
    );

    // 3. Power-off of the server's node: fenced through pacemaker, another node serves,
    //    I/O through a survivor's export continues.
    let phase = Instant::now();
    rig.pcmk.power_off(n1).await.expect("power off node 1");
    rig.qemu_io(
        n2,
        &[
            "write -P 0x22 1M 1M",
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 1M",
        ],
        FAILOVER,
    )
    .await;
    let io_back = phase.elapsed();
    // The snapshot survived the failover and still shows the origin as it was.
    rig.qemu_io_on(
        n3,
        SNAPSHOT_URI,
        &["read -P 0x11 0 1M", "read -P 0 1M 1M"],
        FAILOVER,
    )
    .await;
    let survivors = [n2, n3];
    let second = rig.agreed_server(&survivors, FAILOVER).await;
    rig.fenced_through_pacemaker(n2, n1, Duration::from_secs(30))
        .await;
    let history = rig
        .pcmk
        .exec_ok(n3, "stonith_admin", &["--history", "n1"])
        .await
        .expect("stonith_admin --history n1");
    assert!(
        history.contains("n1") && history.contains("stonith_admin"),
        "{TEST}: stonith_admin --history n1:\n{history}"
    );
    eprintln!(
        "{TEST}: node 1 powered off: fenced through stonith_admin, node {second} serves, I/O back after {io_back:?}"
    );
    // Node 1 boots again and rejoins.
    cluster
        .start_node(n1)
        .await
        .expect("start node 1's corosync");
    cluster
        .wait_converged()
        .await
        .expect("node 1 rejoins corosync");
    rig.pcmk
        .start_node(n1)
        .await
        .expect("start node 1's pacemaker");
    rig.clone_started_on(n2, &all, CLONE_START).await;
    assert_eq!(
        rig.agreed_server(&all, FAILOVER).await,
        second,
        "{TEST}: the server stays where it is when node 1 returns"
    );
    rig.qemu_io(n1, &["read -P 0x22 1M 1M"], Duration::from_secs(30))
        .await;
    eprintln!("{TEST}: node 1 back after {:?}", phase.elapsed());

    // 4. Partition the server's node away: the device cannot reach it, the majority waits
    //    out its lease and takes over; the heal finds it stale and fences it.
    let phase = Instant::now();
    let stale = second;
    let majority: Vec<NodeId> = all.iter().copied().filter(|n| *n != stale).collect();
    cluster
        .partition(std::slice::from_ref(&majority))
        .await
        .expect("partition");
    let third = rig.agreed_server(&majority, FAILOVER).await;
    assert_ne!(third, stale);
    assert!(
        !rig.pcmk.pids_in(stale).is_empty(),
        "{TEST}: node {stale} was fenced while cut off (the device should not reach it)"
    );
    rig.qemu_io(
        majority[0],
        &["read -P 0x22 1M 1M", "write -P 0x33 2M 1M"],
        FAILOVER,
    )
    .await;
    eprintln!(
        "{TEST}: node {stale} cut off, node {third} serves after {:?}",
        phase.elapsed()
    );
    // The majority asked pacemaker to fence the departed server at once; that fails (the
    // device cannot reach it) and csnap lets it go when its lease has run out. Pacemaker's
    // fencer keeps retrying such a request for a while on its own: heal only once it has
    // given up, so that the node comes back (stale) instead of being fenced by a request
    // from before the heal.
    let stale_name = node_name(stale);
    let status = rig
        .pcmk
        .wait_status(
            majority[0],
            &format!("pacemaker's fencer to give up on {stale_name}"),
            Duration::from_secs(120),
            |s| {
                let events: Vec<_> = s
                    .fence_events
                    .iter()
                    .filter(|e| e.get("target") == Some(&stale_name))
                    .collect();
                !events.is_empty()
                    && events
                        .iter()
                        .all(|e| e.get("status").is_some_and(|st| st == "failed"))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{TEST}: {e}"));
    eprintln!(
        "{TEST}: the fencer gave up on node {stale} after {:?}: {:?}",
        phase.elapsed(),
        status.fence_events
    );
    assert!(
        !rig.pcmk.pids_in(stale).is_empty(),
        "{TEST}: node {stale} was fenced while cut off"
    );
    cluster.heal().await.expect("heal");
    let deadline = Instant::now() + FAILOVER;
    while !rig.pcmk.pids_in(stale).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{TEST}: stale node {stale} was not fenced within {FAILOVER:?} of the heal"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    rig.fenced_through_pacemaker(majority[0], stale, Duration::from_secs(30))
        .await;
    let merged: Vec<String> = majority
        .iter()
        .map(|n| rig.agent_log(*n))
        .filter(|log| log.contains("stale_merge"))
        .collect();
    assert!(
        !merged.is_empty(),
        "{TEST}: no survivor logged the stale merge"
    );
    assert_eq!(
        rig.agreed_server(&majority, FAILOVER).await,
        third,
        "{TEST}: exactly one server remains"
    );
    rig.qemu_io(
        majority[1],
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 1M",
            "read -P 0x33 2M 1M",
        ],
        Duration::from_secs(30),
    )
    .await;
    eprintln!(
        "{TEST}: stale node {stale} fenced through stonith_admin after the heal; phase {:?}, test {:?}",
        phase.elapsed(),
        test_start.elapsed()
    );
    drop(rig);
}
