//! Finding and removing the harness's kernel objects: this run's at teardown, and every
//! run's left behind by a test process that died without cleaning up (the stale sweep).
//! Only names of the harness's exact shape (see [`crate::names`]) are ever touched.

use std::path::Path;
use std::process::Command;

use crate::cmd::{run, run_ok, COMMAND_TIMEOUT};
use crate::names::{self, Kind};

/// Which runs' objects to look at.
#[derive(Debug, Clone, Copy)]
pub enum Runs<'a> {
    /// Only this run id.
    One(&'a str),
    /// Every harness run (the stale sweep; only safe under the cluster lock).
    All,
}

impl Runs<'_> {
    fn matches(&self, name: &str) -> Option<Kind> {
        let (run, kind, _) = names::parse(name)?;
        match self {
            Runs::One(id) if *id != run => None,
            _ => Some(kind),
        }
    }
}

/// Harness network namespaces present now.
pub fn list_netns(runs: Runs<'_>) -> Vec<String> {
    let out =
        run_ok(Command::new("ip").args(["netns", "list"]), COMMAND_TIMEOUT).unwrap_or_default();
    out.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| runs.matches(name) == Some(Kind::Netns))
        .map(str::to_string)
        .collect()
}

/// Harness links (veths, bridges) present now in the host namespace.
pub fn list_links(runs: Runs<'_>) -> Vec<String> {
    let out = run_ok(
        Command::new("ip").args(["-o", "link", "show"]),
        COMMAND_TIMEOUT,
    )
    .unwrap_or_default();
    // Lines look like "7: csexxxxxv1@if2: <BROADCAST,..." .
    out.lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name))
        .filter(|name| matches!(runs.matches(name), Some(Kind::Veth | Kind::Bridge)))
        .map(str::to_string)
        .collect()
}

/// Pids of corosync processes started from a config file under `dir`.
pub fn corosyncs_under(dir: &Path) -> Vec<u32> {
    let needle = format!("{}/", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            comm.trim() == "corosync" && String::from_utf8_lossy(&cmdline).contains(&needle)
        })
        .collect()
}

/// Pids of the processes in network namespace `ns` (`ip netns pids`).
pub fn pids_in_netns(ns: &str) -> Vec<u32> {
    run_ok(
        Command::new("ip").args(["netns", "pids", ns]),
        COMMAND_TIMEOUT,
    )
    .unwrap_or_default()
    .split_whitespace()
    .filter_map(|p| p.parse().ok())
    .collect()
}

/// Deletes the harness links and namespaces of `runs`; returns what it removed and the
/// failures (as messages), never stopping at the first failure.
pub fn remove_objects(runs: Runs<'_>) -> (Vec<String>, Vec<String>) {
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    // Veths first (deleting one end removes its peer in the namespace), then bridges,
    // then the namespaces themselves.
    let mut links = list_links(runs);
    links.sort_by_key(|name| matches!(names::parse(name), Some((_, Kind::Bridge, _))));
    for link in links {
        match run(
            Command::new("ip").args(["link", "del", &link]),
            None,
            COMMAND_TIMEOUT,
        ) {
            Ok(out) if out.success() => removed.push(format!("link {link}")),
            Ok(out) if out.stderr.contains("Cannot find device") => {}
            Ok(out) => failed.push(format!("ip link del {link}: {}", out.stderr.trim())),
            Err(e) => failed.push(e.to_string()),
        }
    }
    for ns in list_netns(runs) {
        match run(
            Command::new("ip").args(["netns", "del", &ns]),
            None,
            COMMAND_TIMEOUT,
        ) {
            Ok(out) if out.success() => removed.push(format!("netns {ns}")),
            Ok(out) => failed.push(format!("ip netns del {ns}: {}", out.stderr.trim())),
            Err(e) => failed.push(e.to_string()),
        }
    }
    (removed, failed)
}

/// Removes everything an earlier, crashed harness run left behind: its corosyncs (found by
/// their config path under `base_dir`), links, namespaces and directories. Call only while
/// holding the cluster lock, which guarantees no live run owns any of it.
pub fn sweep_stale(base_dir: &Path) -> Vec<String> {
    let mut report = Vec::new();
    let mut killed = std::collections::BTreeSet::new();
    for pid in corosyncs_under(base_dir) {
        killed.insert(pid);
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
            report.push(format!("corosync pid {pid}"));
        }
    }
    // Whatever else still runs in a stale namespace (pacemaker's daemons and the csnap
    // agents they started are not the test's children, so no parent-death signal ends
    // them) would keep the namespace alive after its name is deleted.
    for ns in list_netns(Runs::All) {
        for pid in pids_in_netns(&ns) {
            killed.insert(pid);
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                report.push(format!("pid {pid} in netns {ns}"));
            }
        }
    }
    let files = cpg_glue::testkit::remove_ipc_files_of(&killed);
    if files > 0 {
        report.push(format!("{files} libqb IPC files in /dev/shm"));
    }
    let (removed, failed) = remove_objects(Runs::All);
    report.extend(removed);
    report.extend(failed.into_iter().map(|f| format!("FAILED {f}")));
    if let Ok(entries) = std::fs::read_dir(base_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(names::PREFIX) && std::fs::remove_dir_all(entry.path()).is_ok() {
                report.push(format!("dir {}", entry.path().display()));
            }
        }
    }
    report
}
