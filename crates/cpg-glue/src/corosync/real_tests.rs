//! Tests against real corosync, each in a network namespace of its own.
//!
//! * `no_corosync_gives_not_running` (runs by default, needs root): in a fresh, empty
//!   network namespace nothing answers, and every service says so clearly.
//! * `single_node_end_to_end` (`--ignored`, needs root and corosync): starts one corosync
//!   in a private namespace and drives the whole API against it. The multi-node behaviour
//!   is tested by the netns cluster harness (package csnap-e2e).
//!
//! Without root (or corosync), they print why and pass, unless CI=true, where they fail.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::time::timeout;

use super::*;
use crate::typed::{TypedEvent, TypedGroup};
use crate::{Group, GroupError, GroupEvent, GroupSender, Member, MemberChange, Reason};

const STEP: Duration = Duration::from_secs(20);

/// Returns false (after saying why) when a prerequisite is missing; panics under CI=true.
fn prerequisites(what: &str, need_corosync: bool) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root".to_string());
    }
    if need_corosync {
        for tool in ["corosync", "corosync-cfgtool", "ip", "unshare"] {
            let found = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
                .unwrap_or(false);
            if !found {
                missing.push(tool.to_string());
            }
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{what}: needs {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true, so this is a failure)");
    }
    eprintln!("SKIPPED {msg}");
    false
}

/// Runs `body` on a thread inside the network namespace that `enter` puts it in, with a
/// tokio runtime, and returns its result (re-raising its panic).
fn on_thread_in_netns<R: Send + 'static>(
    enter: impl FnOnce() + Send + 'static,
    body: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = R>>> + Send + 'static,
) -> R {
    let thread = std::thread::spawn(move || {
        enter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(body())
    });
    match thread.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[test]
fn no_corosync_gives_not_running() {
    if !prerequisites("no_corosync_gives_not_running", false) {
        return;
    }
    let results = on_thread_in_netns(
        || nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap(),
        || {
            Box::pin(async {
                vec![
                    CorosyncGroup::join("csnap-no-corosync").await.err(),
                    CorosyncQuorum::connect().err(),
                    Cmap::connect().err(),
                    local_node_id().err(),
                    kill_node(crate::NodeId(2), "test").err(),
                ]
            })
        },
    );
    let expected = ["cpg", "quorum", "cmap", "cfg", "cfg"];
    for (result, service) in results.into_iter().zip(expected) {
        match result {
            Some(e @ GroupError::NotRunning { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains(&format!("corosync {service}")) && text.contains("running"),
                    "{text}"
                );
            }
            other => panic!("{service}: expected NotRunning, got {other:?}"),
        }
    }
}

/// One corosync in a network namespace and mount namespace of its own; removed on drop.
/// Cleaned up like the csnap-e2e harness's clusters: it holds the harness's machine-wide
/// lock while it lives (never beside a cluster), its corosync dies with the test thread
/// (`PR_SET_PDEATHSIG`), and a start first sweeps what an aborted earlier run left.
struct SingleNode {
    netns: String,
    dir: PathBuf,
    corosync: Option<Child>,
    corosync_pid: u32,
    /// The held lock; released when dropped, after everything else is gone.
    _lock: fs::File,
}

/// The csnap-e2e harness's lock file (tests/src/cluster.rs `LOCK_FILE`): one cluster or
/// single node on the machine at a time.
const LOCK_FILE: &str = "/tmp/csnap-e2e.lock";
/// How long a start waits for another run's cluster to finish.
const LOCK_WAIT: Duration = Duration::from_secs(900);
/// Names of this test's namespaces and directories: the prefix, then the owner's pid.
const NETNS_PREFIX: &str = "cpg-glue-cg";

/// Takes the machine-wide test lock, waiting (bounded) for a running cluster to finish.
fn take_lock() -> fs::File {
    use std::os::fd::AsRawFd;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .unwrap_or_else(|e| panic!("open {LOCK_FILE}: {e}"));
    let started = Instant::now();
    loop {
        // SAFETY: a valid open fd; flock has no memory-safety preconditions.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return file;
        }
        if started.elapsed() > LOCK_WAIT {
            panic!("{LOCK_FILE} still held by another test cluster after {LOCK_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes what an earlier run of this test left when its process was killed: every
/// namespace `cpg-glue-cg<pid>` whose pid is gone, the processes in it, its directory and
/// shared-memory files. Returns the names removed.
fn sweep_stale() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(owner) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    remove_shm_of(pid as u32);
                }
            }
        }
        let _ = run(Command::new("ip").args(["netns", "del", name]));
        let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("cpg-glue-cg{owner}")));
        removed.push(name.to_string());
    }
    removed
}

const CONF_TOTEM: &str = "totem {
    version: 2
    cluster_name: cpgglue
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: 1000
}
";

/// The whole corosync.conf: `node_extra` adds lines to the node's nodelist entry,
/// `app_section` is appended.
fn conf_text(dir: &Path, node_extra: &str, app_section: &str) -> String {
    format!(
        "{CONF_TOTEM}nodelist {{\n    node {{\n        ring0_addr: 10.77.0.1\n        nodeid: 1\n        name: n1\n        glue_rank: 10\n{node_extra}    }}\n}}\nquorum {{\n    provider: corosync_votequorum\n}}\nlogging {{\n    to_logfile: yes\n    logfile: {log}\n    to_syslog: no\n    to_stderr: no\n}}\nsystem {{\n    state_dir: {state}\n}}\n{app_section}",
        log = dir.join("corosync.log").display(),
        state = dir.join("state").display(),
    )
}

/// An application's own top-level section (corosync keeps unknown sections in cmap as
/// strings, `glue_test.sub.port` and so on); `extra` adds one more line to `sub`.
fn app_section(port: &str, extra: &str) -> String {
    format!(
        "glue_test {{\n    mode: reset\n    sub {{\n        path: /dev/h1-origin\n        port: {port}\n{extra}    }}\n}}\n"
    )
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl SingleNode {
    fn start() -> SingleNode {
        let lock = take_lock();
        let swept = sweep_stale();
        if !swept.is_empty() {
            eprintln!("single node: removed what an aborted run left: {swept:?}");
        }
        let tag = format!("cg{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("cpg-glue-{tag}"));
        let mut node = SingleNode {
            netns: format!("cpg-glue-{tag}"),
            dir,
            corosync: None,
            corosync_pid: 0,
            _lock: lock,
        };
        fs::create_dir_all(node.dir.join("run")).unwrap();
        fs::create_dir_all(node.dir.join("state")).unwrap();
        node.write_conf(&app_section("7788", ""));
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        let ns = node.netns.clone();
        run(Command::new("ip").args(["netns", "add", &ns])).unwrap();
        for args in [
            vec!["-n", &ns, "link", "set", "lo", "up"],
            vec![
                "-n", &ns, "link", "add", &a, "type", "veth", "peer", "name", &b,
            ],
            vec!["-n", &ns, "addr", "add", "10.77.0.1/24", "dev", &a],
            vec!["-n", &ns, "link", "set", &a, "up"],
            vec!["-n", &ns, "link", "set", &b, "up"],
        ] {
            run(Command::new("ip").args(&args)).unwrap();
        }
        let script = format!(
            "mount --bind {run} /run && exec corosync -f -c {conf}",
            run = node.dir.join("run").display(),
            conf = node.dir.join("corosync.conf").display()
        );
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &ns,
            "unshare",
            "-m",
            "--propagation",
            "private",
        ])
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: runs in the forked child before exec, making only async-signal-safe
        // calls. `ip netns exec`, `unshare` and `sh` exec in place, so the death signal
        // reaches corosync when this test thread dies without running Drop.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::raise(libc::SIGKILL);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        node.corosync_pid = child.id();
        node.corosync = Some(child);
        node
    }

    fn write_conf(&self, section: &str) {
        fs::write(
            self.dir.join("corosync.conf"),
            conf_text(&self.dir, "", section),
        )
        .unwrap();
    }

    /// Enters this node's network namespace (for the current thread).
    fn enter_fn(&self) -> impl FnOnce() + Send + 'static {
        let path = PathBuf::from("/var/run/netns").join(&self.netns);
        move || {
            let ns = fs::File::open(&path).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        }
    }

    fn corosync_pid(&self) -> u32 {
        self.corosync_pid
    }
}

impl Drop for SingleNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.corosync.take() {
            // `ip netns exec` and `sh` exec into corosync: the child's pid is corosync's.
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = run(Command::new("ip").args(["netns", "del", &self.netns]));
        remove_shm_of(self.corosync_pid);
        if self.dir.join("run").exists() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A corosync killed with SIGKILL leaves its libqb shared-memory files behind; remove those
/// of `pid`.
fn remove_shm_of(pid: u32) {
    if pid != 0 {
        crate::testkit::remove_ipc_files_of(&[pid].into_iter().collect());
    }
}

async fn next_event(group: &mut CorosyncGroup, what: &str) -> GroupEvent {
    match timeout(STEP, group.next()).await {
        Ok(Some(Ok(event))) => event,
        other => panic!("waiting for {what}: got {other:?}"),
    }
}

/// Waits until corosync in the current namespace answers (bounded).
async fn wait_for_corosync() {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Cmap::connect() {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("corosync did not come up within 30 s: {e}"),
        }
    }
    // Quorate (a 1-node cluster is at once), so that joins are not refused.
    let mut quorum = CorosyncQuorum::connect().unwrap();
    loop {
        match timeout(STEP, quorum.next()).await {
            Ok(Some(Ok(q))) if q.quorate => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("quorum never came: {other:?}"),
        }
    }
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Hello {
    generation: u64,
    text: String,
}

/// Starts one real corosync in a network namespace of its own (root; under CI=true a
/// missing prerequisite fails). About a second.
#[test]
fn single_node_end_to_end() {
    if !prerequisites("single_node_end_to_end", true) {
        return;
    }
    // What an aborted run leaves (a namespace and a directory of a pid that is gone) is
    // removed by the next start.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = format!("{NETNS_PREFIX}{dead}");
    let stale_dir = std::env::temp_dir().join(format!("cpg-glue-cg{dead}"));
    run(Command::new("ip").args(["netns", "add", &stale])).unwrap();
    fs::create_dir_all(&stale_dir).unwrap();
    let node = SingleNode::start();
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(&stale),
        "stale namespace {stale} survived the start's sweep"
    );
    assert!(
        !stale_dir.exists(),
        "stale directory {stale_dir:?} survived"
    );
    let dir = node.dir.clone();
    let pid = node.corosync_pid();
    on_thread_in_netns(node.enter_fn(), move || {
        Box::pin(async move { exercise(dir, pid).await })
    });
    drop(node);
}

async fn exercise(dir: PathBuf, corosync_pid: u32) {
    let started = Instant::now();
    wait_for_corosync().await;
    println!(
        "single_node_end_to_end: corosync up after {:?}",
        started.elapsed()
    );

    // cfg, quorum.
    assert_eq!(local_node_id().unwrap(), crate::NodeId(1));
    let err = kill_node(crate::NodeId(99), "cpg-glue test").unwrap_err();
    assert!(
        err.to_string()
            .contains("node 99 is not in the current membership"),
        "{err}"
    );
    let mut quorum = CorosyncQuorum::connect().unwrap();
    let q = match timeout(STEP, quorum.next()).await {
        Ok(Some(Ok(q))) => q,
        other => panic!("first quorum item: {other:?}"),
    };
    assert!(q.quorate);
    assert_eq!(q.members, vec![crate::NodeId(1)]);

    // CPG: own join confchg, then the initial totem confchg.
    let name = format!("cpg-glue-smoke-{}", std::process::id());
    let mut group = CorosyncGroup::join(&name).await.unwrap();
    let me = group.local();
    assert_eq!(me.node, crate::NodeId(1));
    assert_eq!(me.pid, std::process::id());
    assert_eq!(group.name(), name);
    match next_event(&mut group, "own join confchg").await {
        GroupEvent::ConfChg(c) => {
            assert_eq!(c.members, vec![me]);
            assert_eq!(
                c.joined,
                vec![MemberChange {
                    member: me,
                    reason: Reason::Join
                }]
            );
            assert!(c.left.is_empty());
        }
        other => panic!("expected the join confchg first, got {other:?}"),
    }
    match next_event(&mut group, "initial totem confchg").await {
        GroupEvent::TotemConfChg(t) => {
            assert_eq!(t.members, vec![crate::NodeId(1)]);
            assert_eq!(t.ring, q.ring, "totem ring and quorum ring agree");
        }
        other => panic!("expected the initial totem confchg, got {other:?}"),
    }

    // Agreed-order delivery, including a fragmented message between two small ones.
    let sender = group.sender();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    assert!(group.atomic_message_size() < big.len());
    assert!(group.atomic_message_size() > 60_000);
    sender.mcast(b"one".to_vec()).await.unwrap();
    sender.mcast(big.clone()).await.unwrap();
    sender.mcast(Vec::new()).await.unwrap();
    sender.mcast(b"three".to_vec()).await.unwrap();
    for expected in [b"one".to_vec(), big, Vec::new(), b"three".to_vec()] {
        match next_event(&mut group, "own delivery").await {
            GroupEvent::Deliver(d) => {
                assert_eq!(d.from, me);
                assert_eq!(d.payload.len(), expected.len());
                assert!(d.payload == expected, "payload differs");
            }
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
    match sender.mcast(vec![0; MAX_MESSAGE_SIZE + 1]).await {
        Err(GroupError::MessageTooLarge { size, max }) => {
            assert_eq!((size, max), (MAX_MESSAGE_SIZE + 1, MAX_MESSAGE_SIZE))
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    // A burst from several tasks: every message arrives once, each task's in its order.
    let mut tasks = Vec::new();
    for t in 0..4u8 {
        let s = group.sender();
        tasks.push(tokio::spawn(async move {
            for i in 0..250u8 {
                s.mcast(vec![t, i]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut next_of = [0u8; 4];
    for _ in 0..1000 {
        match next_event(&mut group, "burst delivery").await {
            GroupEvent::Deliver(d) => {
                let (t, i) = (d.payload[0] as usize, d.payload[1]);
                assert_eq!(i, next_of[t], "task {t} out of order");
                next_of[t] += 1;
            }
            other => panic!("expected a burst delivery, got {other:?}"),
        }
    }

    // Typed layer over the real group.
    let mut typed: TypedGroup<CorosyncGroup, Hello> = TypedGroup::new(group);
    let hello = Hello {
        generation: 3,
        text: "hi".into(),
    };
    typed.sender().send(&hello).await.unwrap();
    typed
        .sender()
        .inner()
        .mcast(b"\xc1garbage".to_vec())
        .await
        .unwrap();
    match timeout(STEP, typed.next()).await {
        Ok(Some(Ok(TypedEvent::Deliver { from, msg }))) => {
            assert_eq!(from, me);
            assert_eq!(msg, hello);
        }
        other => panic!("typed delivery: {other:?}"),
    }
    match timeout(STEP, typed.next()).await {
        Ok(Some(Err(GroupError::Codec { detail, .. }))) => {
            assert!(detail.contains(&me.to_string()), "{detail}")
        }
        other => panic!("malformed typed delivery: {other:?}"),
    }

    other_processes(&name).await;

    // Leave: the sender then reports Disconnected.
    let group = typed.into_inner();
    let sender = group.sender();
    group.leave().await.unwrap();
    assert!(matches!(
        sender.mcast(b"late".to_vec()).await,
        Err(GroupError::Disconnected { .. })
    ));

    // cmap: keys, the watch's baseline, reload notices.
    let cmap = Cmap::connect().unwrap();
    let keys = cmap.get_prefix("glue_test.").unwrap();
    let expected = |port: &str| -> CmapKeys {
        [
            ("glue_test.mode", "reset"),
            ("glue_test.sub.path", "/dev/h1-origin"),
            ("glue_test.sub.port", port),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    assert_eq!(keys, expected("7788"));
    let nodelist = cmap.get_prefix("nodelist.node.0.").unwrap();
    assert_eq!(
        nodelist.get("nodelist.node.0.nodeid").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        nodelist
            .get("nodelist.node.0.glue_rank")
            .map(String::as_str),
        Some("10")
    );
    let watched = ["glue_test.", "nodelist.node.0."];
    let both = cmap.get_prefixes(&watched).unwrap();
    assert_eq!(both.len(), keys.len() + nodelist.len());
    assert!(cmap.get_prefix("no_such_section.").unwrap().is_empty());
    let (initial, mut watch) = cmap.watch(&watched).unwrap();
    assert_eq!(
        initial, both,
        "the watch's baseline is the keys as they are"
    );

    // With `extra`, one more key in the app section (`glue_test.sub.extra`) and in the
    // nodelist entry (`nodelist.node.0.glue_flag`).
    let reload = |port: &str, extra: bool| {
        let (node_extra, app_extra) = if extra {
            ("        glue_flag: 1\n", "        extra: 1\n")
        } else {
            ("", "")
        };
        fs::write(
            dir.join("corosync.conf"),
            conf_text(&dir, node_extra, &app_section(port, app_extra)),
        )
        .unwrap();
        // Children inherit this thread's network namespace.
        run(Command::new("corosync-cfgtool").arg("-R")).unwrap();
    };
    // A reload that changes nothing yields nothing: the next item is the later change.
    reload("7788", false);
    reload("7799", true);
    let item = match timeout(STEP, watch.next()).await {
        Ok(Some(Ok(keys))) => keys,
        other => panic!("reload notice: {other:?}"),
    };
    let mut after = expected("7799");
    after.insert("glue_test.sub.extra".to_string(), "1".to_string());
    assert_eq!(
        item.get("nodelist.node.0.glue_rank").map(String::as_str),
        Some("10")
    );
    item.into_iter()
        .filter(|(k, _)| k.starts_with("glue_test."))
        .for_each(|(k, v)| assert_eq!(after.remove(&k), Some(v), "key {k}"));
    assert!(after.is_empty(), "missing after the reload: {after:?}");

    // Corosync does not prune keys removed from an unknown section on reload: `extra` stays
    // (what the agent's reload rules are built around), while the nodelist is pruned.
    reload("7700", false);
    match timeout(STEP, watch.next()).await {
        Ok(Some(Ok(keys))) => {
            assert_eq!(
                keys.get("glue_test.sub.port").map(String::as_str),
                Some("7700")
            );
            assert_eq!(
                keys.get("glue_test.sub.extra").map(String::as_str),
                Some("1"),
                "a key removed from the file stays in cmap after a reload"
            );
            assert_eq!(
                keys.get("nodelist.node.0.glue_flag"),
                None,
                "corosync prunes keys removed from the nodelist"
            );
        }
        other => panic!("second reload notice: {other:?}"),
    }

    // corosync dies: every stream reports Disconnected, then ends.
    let mut group = CorosyncGroup::join(&name).await.unwrap();
    assert!(matches!(
        next_event(&mut group, "rejoin confchg").await,
        GroupEvent::ConfChg(_)
    ));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(corosync_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    until_disconnected(&mut group, "group").await;
    until_disconnected(&mut quorum, "quorum").await;
    until_disconnected(&mut watch, "cmap watch").await;
    println!(
        "single_node_end_to_end: all checks passed after {:?}",
        started.elapsed()
    );
}

const CHILD_GROUP: &str = "CPG_GLUE_CHILD_GROUP";
const CHILD_ENDS_BY: &str = "CPG_GLUE_CHILD_ENDS_BY";

fn child_payload() -> Vec<u8> {
    (0..2_500_000u32).map(|i| (i % 253) as u8).collect()
}

/// The other process of `other_processes`: this test binary, run again in the same network
/// namespace with the group name in the environment. Does nothing when run on its own.
#[test]
#[ignore = "helper process for single_node_end_to_end"]
fn child_member() {
    let Ok(name) = std::env::var(CHILD_GROUP) else {
        return;
    };
    let leave = std::env::var(CHILD_ENDS_BY).as_deref() == Ok("leave");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut group = CorosyncGroup::join(&name).await.unwrap();
        // Frames are tagged with the sender's view: send once the stream has the view.
        let mut view = crate::view::ViewTracker::new(group.local());
        while view.stable().is_none() {
            match timeout(STEP, group.next()).await {
                Ok(Some(Ok(event))) => view.apply(&event),
                other => panic!("child, waiting for its view: {other:?}"),
            }
        }
        let sender = group.sender();
        sender.mcast(child_payload()).await.unwrap();
        sender.mcast(b"child-hello".to_vec()).await.unwrap();
        loop {
            match timeout(STEP, group.next()).await {
                Ok(Some(Ok(GroupEvent::Deliver(d)))) if d.payload == b"bye" => break,
                Ok(Some(Ok(_))) => {}
                other => panic!("child: {other:?}"),
            }
        }
        if leave {
            group.leave().await.unwrap();
        } else {
            // Wait to be killed (bounded).
            tokio::time::sleep(STEP).await;
        }
    });
}

/// Two more processes join the group in turn: the first leaves, the second is killed.
/// Checks their joins and departures with the right reasons, and that their fragmented
/// messages arrive whole.
async fn other_processes(base: &str) {
    let name = format!("{base}-multi");
    let mut group = CorosyncGroup::join(&name).await.unwrap();
    let me = group.local();
    while !matches!(
        next_event(&mut group, "totem confchg").await,
        GroupEvent::TotemConfChg(_)
    ) {}
    for ends_by in ["leave", "kill"] {
        // Spawned from this thread, the child is in this network namespace too.
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "corosync::real_tests::child_member", "--ignored"])
            .env(CHILD_GROUP, &name)
            .env(CHILD_ENDS_BY, ends_by)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let child_member = Member {
            node: me.node,
            pid: child.id(),
        };
        let mut seen_join = false;
        let mut got = Vec::new();
        while got.len() < 2 {
            match next_event(&mut group, "child join and messages").await {
                GroupEvent::ConfChg(c) => {
                    let mut both = vec![me, child_member];
                    both.sort();
                    assert_eq!(c.members, both);
                    assert_eq!(
                        c.joined,
                        vec![MemberChange {
                            member: child_member,
                            reason: Reason::Join
                        }]
                    );
                    seen_join = true;
                }
                GroupEvent::Deliver(d) => {
                    assert!(seen_join, "delivery before the sender's join");
                    assert_eq!(d.from, child_member);
                    got.push(d.payload);
                }
                GroupEvent::TotemConfChg(t) => panic!("unexpected totem confchg {t:?}"),
            }
        }
        assert!(got[0] == child_payload(), "the child's fragmented message");
        assert_eq!(got[1], b"child-hello");
        group.sender().mcast(b"bye".to_vec()).await.unwrap();
        let expected = if ends_by == "leave" {
            Reason::Leave
        } else {
            // Once it has the bye, kill it.
            while !matches!(
                next_event(&mut group, "own bye").await,
                GroupEvent::Deliver(ref d) if d.payload == b"bye"
            ) {}
            child.kill().unwrap();
            Reason::ProcDown
        };
        loop {
            match next_event(&mut group, "child departure").await {
                GroupEvent::Deliver(d) => assert_eq!(d.payload, b"bye"),
                GroupEvent::ConfChg(c) => {
                    assert_eq!(c.members, vec![me]);
                    assert_eq!(
                        c.left,
                        vec![MemberChange {
                            member: child_member,
                            reason: expected
                        }]
                    );
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let status = child.wait().unwrap();
        if ends_by == "leave" {
            assert!(status.success(), "child failed: {status}");
        }
    }
    group.leave().await.unwrap();
}

/// Reads `stream` until it reports Disconnected (bounded), then checks that it ends.
async fn until_disconnected<S, T>(stream: &mut S, what: &str)
where
    S: futures::Stream<Item = Result<T, GroupError>> + Unpin,
    T: std::fmt::Debug,
{
    loop {
        match timeout(STEP, stream.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(GroupError::Disconnected { .. }))) => break,
            other => panic!("{what} after corosync died: {other:?}"),
        }
    }
    assert!(
        timeout(STEP, stream.next()).await.unwrap().is_none(),
        "{what} goes on after Disconnected"
    );
}
