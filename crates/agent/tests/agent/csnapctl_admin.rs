//! csnapctl for admins, against a real standalone csnap-agent: `--json` on every command
//! parses, times in local (TZ honoured) and ISO form, format progress, reclaim progress in
//! `status` and `snapshot delete --wait`, errors that name the node and volume, the exit
//! codes, and `--help` on every command.

use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use csnap_server::store::{FileDevice, OpenOptions, Store};
use serde_json::Value;
use support::{Agent, Fixture, Ran, MIB, WAIT};

/// Runs csnapctl with `args` (and `env`), bounded by `WAIT`: exit code and output.
async fn ctl_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, Ran) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_csnapctl"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .unwrap_or_else(|_| panic!("csnapctl {args:?} did not finish within {WAIT:?}"))
        .expect("run csnapctl");
    let ran = Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    (out.status.code(), ran)
}

/// A standalone agent of volume "vol" on `fx`, exporting on a unix socket.
async fn start(fx: &Fixture) -> Agent {
    let nbd = format!("unix:{}", fx.path("a.nbd").display());
    Agent::start(fx, "a", &["--nbd-listen", &nbd]).await
}

/// csnapctl against `agent`'s control socket.
async fn ctl(agent: &Agent, args: &[&str]) -> (Option<i32>, Ran) {
    let mut all = vec!["--socket", agent.control.to_str().expect("UTF-8 temp path")];
    all.extend_from_slice(args);
    ctl_env(&all, &[]).await
}

/// csnapctl that must succeed, with stdout parsed as JSON.
async fn ctl_json(agent: &Agent, args: &[&str]) -> Value {
    let (code, out) = ctl(agent, args).await;
    assert_eq!(
        code,
        Some(0),
        "csnapctl {args:?}:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("csnapctl {args:?}: not JSON ({e}):\n{}", out.stdout))
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// A snapshot (id 1, "old") holding a copy-out of every origin chunk, so that deleting it
/// gives the reclaim pass `origin_chunks` records to walk.
fn populate(fx: &Fixture) {
    let dev = Arc::new(FileDevice::open(&fx.store, false).expect("open store"));
    let mut store = Store::open(dev, OpenOptions::default()).expect("open store");
    store
        .create_snapshot("old", 1_700_000_000)
        .expect("create snapshot");
    for chunk in 0..fx.origin_size / fx.chunk_size {
        // The store calls the engine makes for a copy-out (room is plenty here).
        if store
            .oldest_sharing_origin(chunk)
            .expect("sharing")
            .is_some()
        {
            let at = store.reserve_chunk().expect("reserve a chunk");
            store.record_copy_out(chunk, at).expect("record copy-out");
        }
        if chunk % 512 == 511 {
            store.commit().expect("commit");
        }
    }
    store.commit().expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_has_json_with_iso_times_and_local_times_honour_tz() {
    let fx = Fixture::new(4096, 4 * MIB, 32 * MIB);
    let agent = start(&fx).await;

    let created = ctl_json(&agent, &["snapshot", "create", "vol", "nightly", "--json"]).await;
    assert_eq!(created["volume"], "vol");
    assert_eq!(created["snapshot"]["name"], "nightly");
    let ctime = created["snapshot"]["ctime"].as_u64().expect("raw ctime");
    let iso = created["snapshot"]["ctime_iso"]
        .as_str()
        .expect("ctime_iso");
    assert!(iso.ends_with('Z') && iso.contains('T'), "{iso}");

    let list = ctl_json(&agent, &["snapshot", "list", "vol", "--json"]).await;
    assert_eq!(list["volume"], "vol");
    assert_eq!(list["snapshots"][0]["name"], "nightly");
    assert_eq!(list["snapshots"][0]["ctime"].as_u64(), Some(ctime));
    assert_eq!(list["snapshots"][0]["ctime_iso"].as_str(), Some(iso));
    assert!(list["usage_exact"].is_boolean());

    let status = ctl_json(&agent, &["status", "--json"]).await;
    let v = &status["volumes"][0];
    assert_eq!(v["volume"], "vol");
    assert_eq!(v["mode"], "standalone");
    assert_eq!(v["server_status"]["snapshots"], 1);
    assert!(v["server_status"]["reclaiming"].is_boolean());
    let status_one = ctl_json(&agent, &["status", "vol", "--json"]).await;
    assert_eq!(status_one["volumes"].as_array().map(Vec::len), Some(1));

    // The text list shows the creation time in local time with its offset, per TZ.
    let sock = agent.control.to_str().expect("UTF-8");
    for (tz, offset) in [
        ("XST-1", "+01:00"),
        ("YST+5:30", "-05:30"),
        ("UTC0", "+00:00"),
    ] {
        let (code, out) = ctl_env(
            &["--socket", sock, "snapshot", "list", "vol"],
            &[("TZ", tz)],
        )
        .await;
        assert_eq!(code, Some(0), "{}", out.stderr);
        let line = out
            .stdout
            .lines()
            .find(|l| l.contains("nightly"))
            .unwrap_or_else(|| panic!("no nightly in:\n{}", out.stdout));
        assert!(line.contains(offset), "TZ={tz}: {line}");
    }
    let (_, utc) = ctl_env(
        &["--socket", sock, "snapshot", "list", "vol"],
        &[("TZ", "UTC0")],
    )
    .await;
    // ISO 2026-11-26T18:02:11Z is 2026-11-26 18:02:11 +00:00 in UTC.
    let want = format!("{} +00:00", iso.trim_end_matches('Z').replacen('T', " ", 1));
    assert!(utc.stdout.contains(&want), "{want} in:\n{}", utc.stdout);

    let deleted = ctl_json(&agent, &["snapshot", "delete", "vol", "nightly", "--json"]).await;
    assert_eq!(deleted["volume"], "vol");
    assert_eq!(deleted["deleted"], "nightly");
    assert_eq!(deleted["id"], 1);
    assert_eq!(deleted["reclaimed"], false);

    // keygen
    let key = fx.path("new.key");
    let (code, out) = ctl(&agent, &["keygen", key.to_str().expect("UTF-8"), "--json"]).await;
    assert_eq!(code, Some(0), "{}", out.stderr);
    let k: Value = serde_json::from_str(&out.stdout).expect("keygen JSON");
    assert_eq!(k["bytes"], 32);
    assert_eq!(k["mode"], "0600");
    assert_eq!(std::fs::metadata(&key).expect("key").len(), 32);

    // check: the agent holds the store, so it is not checked (exit 2), in JSON too.
    let store = fx.store.to_str().expect("UTF-8");
    let (code, out) = ctl(&agent, &["check", "--store", store, "--json"]).await;
    assert_eq!(code, Some(2), "{}\n{}", out.stdout, out.stderr);
    let c: Value = serde_json::from_str(&out.stdout).expect("check JSON");
    assert_eq!(c["checked"], false);
    assert!(out.stderr.contains("in use"), "{}", out.stderr);
    drop(agent);
    let (code, out) = ctl_env(&["check", "--store", store, "--json"], &[]).await;
    assert_eq!(code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let c: Value = serde_json::from_str(&out.stdout).expect("check JSON");
    assert_eq!(c["checked"], true);
    assert_eq!(c["consistent"], true);
    assert_eq!(c["chunk_size"], 4096);
    assert!(c["problems"].as_array().is_some_and(Vec::is_empty));
}

#[tokio::test]
async fn format_reports_progress_on_stderr_and_json_on_stdout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = dir.path().join("origin.img");
    let store = dir.path().join("store.img");
    // Sparse: 3 GiB each, no blocks until written.
    for p in [&origin, &store] {
        std::fs::File::create(p)
            .and_then(|f| f.set_len(3 << 30))
            .expect("sparse file");
    }
    let (o, s) = (
        origin.to_str().expect("UTF-8"),
        store.to_str().expect("UTF-8"),
    );
    let started = Instant::now();
    let (code, out) = ctl_env(
        &[
            "format",
            "--origin",
            o,
            "--store",
            s,
            "--chunk-size",
            "4K",
            "--json",
            "--progress",
        ],
        &[],
    )
    .await;
    eprintln!("format of a 3 GiB store took {:?}", started.elapsed());
    assert_eq!(code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not only JSON ({e}):\n{}", out.stdout));
    assert_eq!(v["chunk_size"], 4096);
    assert_eq!(v["origin_size"].as_u64(), Some(3 << 30));
    assert!(v["created_iso"].as_str().is_some_and(|t| t.ends_with('Z')));
    let progress: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("metadata blocks written"))
        .collect();
    assert!(progress.len() >= 2, "progress lines:\n{}", out.stderr);
    assert!(progress[0].contains(" 0% (0 of "), "{}", out.stderr);
    assert!(
        progress.last().is_some_and(|l| l.contains("100%")),
        "{}",
        out.stderr
    );

    // Without --progress and with stderr not a terminal: no progress, the text summary.
    let (code, out) = ctl_env(
        &["format", "--origin", o, "--store", s, "--force"],
        &[("TZ", "XST-1")],
    )
    .await;
    assert_eq!(code, Some(0), "{}", out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    assert!(
        out.stdout.contains("created") && out.stdout.contains("+01:00"),
        "{}",
        out.stdout
    );

    // A formatted store is not overwritten without --force: exit 1, naming the store.
    let (code, out) = ctl_env(&["format", "--origin", o, "--store", s], &[]).await;
    assert_eq!(code, Some(1), "{}", out.stderr);
    drop(dir);
}

/// Polls `status` until `pred` holds for its text output, bounded by `limit`.
async fn status_until(agent: &Agent, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (code, out) = ctl(agent, &["status", "vol"]).await;
        assert_eq!(code, Some(0), "{}", out.stderr);
        if pred(&out.stdout) {
            return out.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "status never matched within {limit:?}; last:\n{}",
            out.stdout
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_progress_shows_in_status_and_delete_wait_returns_after_it() {
    // 65,536 origin chunks, each with a copy-out held only by snapshot 1: an idle server
    // reclaims about 8,192 records a tick, so the pass takes several seconds.
    let fx = Fixture::new(4096, 256 * MIB, 320 * MIB);
    populate(&fx);
    let agent = start(&fx).await;
    let before = ctl_json(&agent, &["status", "--json"]).await;
    let free_before = before["volumes"][0]["server_status"]["free_chunks"]
        .as_u64()
        .expect("free_chunks");

    let started = Instant::now();
    let waiter = {
        let sock = agent.control.to_str().expect("UTF-8").to_owned();
        tokio::spawn(async move {
            ctl_env(
                &[
                    "--socket",
                    &sock,
                    "snapshot",
                    "delete",
                    "vol",
                    "old",
                    "--wait",
                    "--timeout",
                    "50",
                    "--json",
                ],
                &[],
            )
            .await
        })
    };
    // While it runs, status shows how far the pass got.
    let shown = status_until(&agent, WAIT, |s| {
        s.lines()
            .any(|l| l.contains("reclaiming snapshot 1: ") && l.contains("% (origin chunk "))
    })
    .await;
    eprintln!("{shown}");
    let json = ctl_json(&agent, &["status", "--json"]).await;
    let r = &json["volumes"][0]["server_status"]["reclaim"];
    if !r.is_null() {
        assert_eq!(r["origin_chunks"], 65_536, "{r}");
        assert!(r["position"].as_u64().is_some_and(|p| p <= 65_536), "{r}");
    }

    let (code, out) = tokio::time::timeout(WAIT, waiter)
        .await
        .expect("delete --wait finished")
        .expect("join");
    eprintln!(
        "delete --wait took {:?}:\n{}",
        started.elapsed(),
        out.stderr
    );
    assert_eq!(code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("delete JSON");
    assert_eq!(v["reclaimed"], true);
    assert!(v["wait_ms"].is_u64());
    let progress: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("reclaiming snapshot 1: "))
        .collect();
    assert!(!progress.is_empty(), "no progress lines:\n{}", out.stderr);

    // Right after --wait returned: no reclaim left, and the space is back.
    let after = ctl_json(&agent, &["status", "--json"]).await;
    let s = &after["volumes"][0]["server_status"];
    assert_eq!(s["reclaiming"], false, "{s}");
    assert!(s["reclaim"].is_null(), "{s}");
    assert!(
        s["free_chunks"]
            .as_u64()
            .is_some_and(|f| f >= free_before + 65_536),
        "free before {free_before}, after {s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_node_and_volume_and_exit_codes_tell_failures_apart() {
    let fx = Fixture::new(4096, 4 * MIB, 32 * MIB);
    let agent = start(&fx).await;
    let host = host();

    // The agent answered with an error: exit 1, naming node and volume.
    let (code, out) = ctl(&agent, &["snapshot", "delete", "vol", "nosuch"]).await;
    assert_eq!(code, Some(1), "{}", out.stderr);
    let want = format!("csnapctl: error: node {host}, volume vol: ");
    assert!(
        out.stderr.starts_with(&want),
        "{want:?} in {:?}",
        out.stderr
    );
    assert!(out.stderr.contains("\"nosuch\""), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);

    // The same with --json: stdout stays empty (no half document), stderr says why.
    let (code, out) = ctl(&agent, &["snapshot", "delete", "vol", "nosuch", "--json"]).await;
    assert_eq!(code, Some(1));
    assert!(
        out.stdout.is_empty() && out.stderr.contains(&want),
        "{}",
        out.stderr
    );

    // An unknown volume: the error lists the volumes there are.
    for args in [
        &["status", "nope"][..],
        &["snapshot", "list", "nope"][..],
        &["snapshot", "create", "nope", "x"][..],
    ] {
        let (code, out) = ctl(&agent, args).await;
        assert_eq!(code, Some(1), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr
                .contains(&format!("node {host}, volume nope: no such volume"))
                && out.stderr.contains("\"vol\""),
            "{args:?}: {}",
            out.stderr
        );
    }

    // A bad snapshot name and a duplicate: exit 1, named.
    let (code, _) = ctl(&agent, &["snapshot", "create", "vol", "a"]).await;
    assert_eq!(code, Some(0));
    let (code, out) = ctl(&agent, &["snapshot", "create", "vol", "a"]).await;
    assert_eq!(code, Some(1));
    assert!(
        out.stderr.contains(&want) && out.stderr.contains("duplicate"),
        "{}",
        out.stderr
    );

    // Usage errors: exit 2.
    let (code, _) = ctl(&agent, &["snapshot", "create", "vol"]).await;
    assert_eq!(code, Some(2));
    let (code, _) = ctl(&agent, &["status", "--bogus"]).await;
    assert_eq!(code, Some(2));

    // No agent: exit 3, naming the socket and suggesting the agent is not running.
    let gone = fx.path("no-such.ctl");
    let gone = gone.to_str().expect("UTF-8");
    for args in [&["status"][..], &["snapshot", "list", "vol"][..]] {
        let mut all = vec!["--socket", gone];
        all.extend_from_slice(args);
        let (code, out) = ctl_env(&all, &[]).await;
        assert_eq!(code, Some(3), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains(gone) && out.stderr.contains("is csnap-agent running"),
            "{}",
            out.stderr
        );
    }
    // A stale socket (nobody listening): exit 3 too.
    let stale = fx.path("stale.ctl");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let (code, out) = ctl_env(&["--socket", stale.to_str().expect("UTF-8"), "status"], &[]).await;
    assert_eq!(code, Some(3), "{}", out.stderr);
    assert!(out.stderr.contains("not running"), "{}", out.stderr);
    drop(agent);
    let _ = Path::new(gone);
}

#[tokio::test]
async fn help_on_every_command_reads_like_a_manual() {
    let (code, out) = ctl_env(&["--help"], &[]).await;
    assert_eq!(code, Some(0));
    for part in [
        "EXAMPLES",
        "EXIT STATUS",
        "  3  ",
        "  4  ",
        "ENVIRONMENT",
        "--json",
    ] {
        assert!(
            out.stdout.contains(part),
            "{part:?} in csnapctl --help:\n{}",
            out.stdout
        );
    }
    for cmd in [
        &["format"][..],
        &["status"][..],
        &["keygen"][..],
        &["check"][..],
        &["snapshot", "create"][..],
        &["snapshot", "list"][..],
        &["snapshot", "delete"][..],
        &["diff"][..],
        &["rollback"][..],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let (code, out) = ctl_env(&args, &[]).await;
        assert_eq!(code, Some(0), "{cmd:?}");
        assert!(
            out.stdout.contains("EXAMPLES") && out.stdout.contains("--json"),
            "{cmd:?} --help:\n{}",
            out.stdout
        );
        // A description paragraph, not only the one-line summary.
        assert!(out.stdout.lines().count() > 15, "{cmd:?}:\n{}", out.stdout);
    }
    let (code, out) = ctl_env(&["snapshot", "--help"], &[]).await;
    assert_eq!(code, Some(0));
    assert!(out.stdout.contains("forwards"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_wait_that_times_out_exits_4_with_the_snapshot_deleted() {
    let fx = Fixture::new(4096, 256 * MIB, 320 * MIB);
    populate(&fx);
    let agent = start(&fx).await;
    let (code, out) = ctl(
        &agent,
        &[
            "snapshot",
            "delete",
            "vol",
            "old",
            "--wait",
            "--timeout",
            "0",
        ],
    )
    .await;
    assert_eq!(code, Some(4), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("deleted snapshot old (id 1)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("not reclaimed within 0 s"),
        "{}",
        out.stderr
    );
    // It is deleted all the same: a second delete finds no such snapshot.
    let (code, out) = ctl(&agent, &["snapshot", "delete", "vol", "old"]).await;
    assert_eq!(code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("no such snapshot"), "{}", out.stderr);
}
