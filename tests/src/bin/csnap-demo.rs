//! csnap-demo: a guided tour on a real 3-node corosync cluster built in network namespaces
//! on this machine (the harness of docs/testing.md).
//!
//! 1. Three corosync nodes form a ring; a process on each joins a CPG group and prints the
//!    membership events it sees, in agreed order.
//! 2. A shared volume (origin and snapshot store: files every node sees): node 1 runs the
//!    metadata server and NBD exports, node 2 runs a client that reaches node 1's server over
//!    the cluster network. Data written through node 1, a snapshot, an overwrite through
//!    node 2: the snapshot keeps the old data, read through either node.
//! 3. Node 3 is cut off: both sides see the partition (NodeDown, new rings, quorum only on
//!    the majority side); healed, both see the merge (NodeUp, totem confchg last).
//!
//! Everything it starts is stopped and removed at the end, also on error (the cluster's
//! Drop kills processes by pid and deletes namespaces, links and the run directory).
//! Run it through `./scripts/demo`, which installs and builds what it needs.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cpg_glue::corosync::CorosyncGroup;
use cpg_glue::{GroupEvent, NodeId, Reason};
use csnap_e2e::{Cluster, ClusterConfig, Signal};
use futures::StreamExt;

const GROUP: &str = "csnap-demo";
const VOLUME: &str = "vol";
const SERVER_PORT: u16 = 7788;
const WAIT: Duration = Duration::from_secs(30);

/// What each node's group process has seen: its current member count.
type Seen = Arc<Mutex<BTreeMap<NodeId, usize>>>;

#[tokio::main]
async fn main() -> Result<()> {
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

    step("1. A 3-node corosync cluster in network namespaces (10.77.0.1-3)");
    let cluster = Cluster::start_with(ClusterConfig::new(3).priority(1, 10)).await?;
    print_views(&cluster).await?;

    step(&format!(
        "   A process on each node joins CPG group {GROUP:?}; each prints what it sees"
    ));
    let seen: Seen = Arc::default();
    let mut printers = Vec::new();
    for node in cluster.nodes() {
        let group = cluster
            .run_async_in_node(node, || CorosyncGroup::join(GROUP))
            .await??;
        printers.push(tokio::spawn(print_events(node, group, seen.clone())));
    }
    wait_until("every node's group shows 3 members", || {
        let s = seen.lock().unwrap_or_else(|e| e.into_inner());
        s.len() == 3 && s.values().all(|&n| n == 3)
    })
    .await?;

    step("2. A shared volume: origin 256 MiB, store 128 MiB, 64 KiB chunks, a cluster key");
    let dir = cluster.dir().join("volume");
    std::fs::create_dir_all(&dir)?;
    let origin = dir.join("origin.img");
    let store = dir.join("store.img");
    std::fs::File::create(&origin)?.set_len(256 << 20)?;
    std::fs::File::create(&store)?.set_len(128 << 20)?;
    let key = dir.join("cluster.key");
    run(&ctl, &["keygen", s(&key)])?;
    run(
        &ctl,
        &[
            "format",
            "--origin",
            s(&origin),
            "--store",
            s(&store),
            "--chunk-size",
            "64K",
        ],
    )?;

    step("   Node 1: metadata server + NBD exports; node 2: a client of node 1's server");
    let n1_nbd = dir.join("n1.nbd");
    let n2_nbd = dir.join("n2.nbd");
    let n1_ctl = dir.join("n1.sock");
    let n2_ctl = dir.join("n2.sock");
    let server_addr = format!("10.77.0.1:{SERVER_PORT}");
    let n1_nbd_arg = format!("unix:{}", n1_nbd.display());
    let n2_nbd_arg = format!("unix:{}", n2_nbd.display());
    let common = [
        "--standalone",
        "--volume",
        VOLUME,
        "--origin",
        s(&origin),
        "--store",
        s(&store),
        "--key-file",
        s(&key),
    ];
    let mut args1: Vec<&str> = common.to_vec();
    args1.extend([
        "--server-listen",
        &server_addr,
        "--nbd-listen",
        &n1_nbd_arg,
        "--control-socket",
        s(&n1_ctl),
        "--node",
        "1",
    ]);
    let agent1 = cluster
        .spawn_in_node(NodeId(1), s(&agent), &args1, "csnap-agent")
        .await?;
    wait_for_agent(&ctl, &n1_ctl).await?;
    let mut args2: Vec<&str> = common.to_vec();
    args2.extend([
        "--connect-server",
        &server_addr,
        "--nbd-listen",
        &n2_nbd_arg,
        "--control-socket",
        s(&n2_ctl),
        "--node",
        "2",
    ]);
    let agent2 = cluster
        .spawn_in_node(NodeId(2), s(&agent), &args2, "csnap-agent")
        .await?;
    wait_for_agent(&ctl, &n2_ctl).await?;
    println!("   node 1 serves metadata on {server_addr}; exports: {n1_nbd_arg}");
    println!("   node 2 exports: {n2_nbd_arg}");

    let uri = |sock: &Path, export: &str| format!("nbd+unix:///{export}?socket={}", sock.display());
    step("   Write 4 MiB of 0xaa through node 1");
    qemu_io(&uri(&n1_nbd, VOLUME), "write -P 0xaa 0 4M")?;
    step("   Snapshot \"before\" (through node 1's control socket)");
    run(
        &ctl,
        &[
            "--socket",
            s(&n1_ctl),
            "snapshot",
            "create",
            VOLUME,
            "before",
        ],
    )?;
    step("   Overwrite the same 4 MiB with 0xbb through node 2 (copy-out happens first)");
    qemu_io(&uri(&n2_nbd, VOLUME), "write -P 0xbb 0 4M")?;
    step("   Read back: the origin has 0xbb, snapshot vol@before still 0xaa, on both nodes");
    for sock in [&n1_nbd, &n2_nbd] {
        qemu_io(&uri(sock, VOLUME), "read -P 0xbb 0 4M")?;
        qemu_io(&uri(sock, &format!("{VOLUME}@before")), "read -P 0xaa 0 4M")?;
    }
    step("   The exports as NBD clients see them (nbdinfo --list, node 2)");
    let list = Command::new("nbdinfo")
        .args([
            "--list",
            &format!("nbd+unix:///?socket={}", n2_nbd.display()),
        ])
        .output()
        .context("run nbdinfo")?;
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        if line.starts_with("export=") || line.contains("export-size") {
            println!("     {}", line.trim());
        }
    }
    step("   csnapctl snapshot list / status");
    run(&ctl, &["--socket", s(&n1_ctl), "snapshot", "list", VOLUME])?;
    run(&ctl, &["--socket", s(&n1_ctl), "status", VOLUME])?;

    step("3. Cut node 3 off the network");
    cluster
        .partition(&[vec![NodeId(1), NodeId(2)], vec![NodeId(3)]])
        .await?;
    cluster.wait_converged().await?;
    wait_until(
        "nodes 1+2 see 2 members and node 3 sees itself alone",
        || {
            let s = seen.lock().unwrap_or_else(|e| e.into_inner());
            s.get(&NodeId(1)) == Some(&2) && s.get(&NodeId(3)) == Some(&1)
        },
    )
    .await?;
    print_views(&cluster).await?;

    step("   Heal: the partitions merge again");
    cluster.heal().await?;
    cluster.wait_converged().await?;
    wait_until("every node's group shows 3 members again", || {
        let s = seen.lock().unwrap_or_else(|e| e.into_inner());
        s.values().all(|&n| n == 3)
    })
    .await?;
    print_views(&cluster).await?;

    step("Done: stopping the agents and removing the cluster");
    for pid in [agent2, agent1] {
        cluster
            .stop_spawned(pid, Signal::SIGTERM, Duration::from_secs(10))
            .await?;
    }
    for p in printers {
        p.abort();
    }
    drop(cluster);
    println!("\nAll clean. Next: docs/operations.md (standalone use), docs/architecture.md.");
    Ok(())
}

fn step(text: &str) {
    println!("\n== {text}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or("<non-utf8 path>")
}

fn run(program: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {}", program.display()))?;
    let name = program.file_name().and_then(|n| n.to_str()).unwrap_or("?");
    println!("   $ {name} {}", args.join(" "));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("     {line}");
    }
    if !out.status.success() {
        bail!(
            "{name} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn qemu_io(uri: &str, cmd: &str) -> Result<()> {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", uri, "-c", cmd])
        .output()
        .context("run qemu-io")?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("   $ qemu-io -c '{cmd}' {uri}");
    for line in text.lines().take(2) {
        println!("     {line}");
    }
    if !out.status.success() || text.contains("Pattern verification failed") {
        bail!(
            "qemu-io '{cmd}' on {uri} failed: {}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

async fn wait_for_agent(ctl: &Path, socket: &Path) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let ok = Command::new(ctl)
            .args(["--socket", s(socket), "status", VOLUME])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "agent with control socket {} did not come up within {WAIT:?}",
                socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        if Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn print_views(cluster: &Cluster) -> Result<()> {
    for node in cluster.nodes() {
        let v = cluster.view(node).await?;
        println!(
            "   node {node}: ring {:<6} quorate {:<5} members {:?}",
            v.ring,
            v.quorate,
            v.members.iter().map(|n| n.0).collect::<Vec<_>>()
        );
    }
    Ok(())
}

async fn print_events(node: NodeId, mut group: CorosyncGroup, seen: Seen) {
    while let Some(event) = group.next().await {
        match event {
            Ok(GroupEvent::ConfChg(c)) => {
                let fmt = |l: &[cpg_glue::MemberChange]| {
                    l.iter()
                        .map(|m| format!("{}({})", m.member.node, reason(m.reason)))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                println!(
                    "   [node {node}] confchg: members {:?} joined [{}] left [{}]",
                    c.members.iter().map(|m| m.node.0).collect::<Vec<_>>(),
                    fmt(&c.joined),
                    fmt(&c.left)
                );
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(node, c.members.len());
            }
            Ok(GroupEvent::TotemConfChg(t)) => println!(
                "   [node {node}] totem confchg: ring {} nodes {:?}",
                t.ring,
                t.members.iter().map(|n| n.0).collect::<Vec<_>>()
            ),
            Ok(GroupEvent::Deliver(d)) => {
                println!(
                    "   [node {node}] message from {}: {} bytes",
                    d.from,
                    d.payload.len()
                )
            }
            Err(e) => {
                println!("   [node {node}] group error: {e}");
                break;
            }
        }
    }
}

fn reason(r: Reason) -> &'static str {
    match r {
        Reason::Join => "join",
        Reason::Leave => "leave",
        Reason::NodeDown => "nodedown",
        Reason::NodeUp => "nodeup",
        Reason::ProcDown => "procdown",
    }
}
