//! Standalone mode end to end, with real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy,
//! fio) against csnap-agent processes. Each test needs its tools: under CI=true a missing
//! tool fails the test, otherwise it is skipped with a message.

use crate::support;

use std::time::Duration;

use csnap_proto::control::{ControlRequest, ControlResponse};
use serde_json::Value;
use support::*;

const CHUNK: u64 = 16 * 1024;

fn qemu_io_args<'a>(uri: &'a str, cmds: &'a [&'a str]) -> Vec<&'a str> {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args
}

async fn qemu_io(uri: &str, cmds: &[&str]) -> Ran {
    let r = run_ok("qemu-io", &qemu_io_args(uri, cmds)).await;
    // qemu-io exits 0 even when a pattern check fails; it says so on stdout.
    assert!(
        !r.stdout.contains("Pattern verification failed") && !r.stdout.contains("failed:"),
        "qemu-io {cmds:?} on {uri}:\n{}",
        r.stdout
    );
    r
}

async fn list_exports(uri: &str) -> Vec<Value> {
    let out = run_ok("nbdinfo", &["--list", "--json", uri]).await;
    let json: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo JSON: {e}\n{}", out.stdout));
    json["exports"].as_array().cloned().unwrap_or_default()
}

fn export_names(exports: &[Value]) -> Vec<String> {
    let mut names: Vec<String> = exports
        .iter()
        .filter_map(|e| e["export-name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_and_snapshots_with_qemu_io_qemu_img_nbdinfo_nbdcopy() {
    for tool in ["qemu-io", "qemu-img", "nbdinfo", "nbdcopy"] {
        if !require_tool(tool) {
            return;
        }
    }
    let fx = Fixture::new(CHUNK, 16 * MIB, 64 * MIB);
    let nbd = fx.path("a.nbd");
    // No --key-file: the agent makes an ephemeral key.
    let mut agent = Agent::start(
        &fx,
        "a",
        &["--nbd-listen", &format!("unix:{}", nbd.display())],
    )
    .await;
    let vol = agent.uri("vol");

    // Patterns on the origin, including writes that start and end inside chunks.
    qemu_io(&vol, &["write -P 0xaa 0 1M", "write -P 0xbb 1100000 70000"]).await;
    qemu_io(&vol, &["read -P 0xaa 0 1M", "read -P 0xbb 1100000 70000"]).await;

    agent.snapshot("s1").await;
    let s1_copy = fx.path("s1.img");
    std::fs::copy(&fx.origin, &s1_copy).unwrap();

    // Overwrite the origin across chunk boundaries and inside one chunk.
    qemu_io(
        &vol,
        &[
            "write -P 0xcc 524288 1M",
            "write -P 0xdd 5000 3000",
            "flush",
        ],
    )
    .await;
    qemu_io(&vol, &["read -P 0xcc 524288 1M", "read -P 0xdd 5000 3000"]).await;
    assert_ne!(
        read_file(&fx.origin),
        read_file(&s1_copy),
        "the origin changed"
    );

    // The snapshot still reads as the origin did when it was taken.
    let s1 = agent.uri("vol@s1");
    qemu_io(&s1, &["read -P 0xaa 0 1M", "read -P 0xbb 1100000 70000"]).await;
    assert_same_image(&s1_copy, &s1).await;

    // A second snapshot, then more origin writes: both snapshots keep their views.
    agent.snapshot("s2").await;
    let s2_copy = fx.path("s2.img");
    std::fs::copy(&fx.origin, &s2_copy).unwrap();
    qemu_io(&vol, &["write -P 0x11 0 4M"]).await;
    let s2 = agent.uri("vol@s2");
    assert_same_image(&s1_copy, &s1).await;
    assert_same_image(&s2_copy, &s2).await;

    // nbdcopy of whole volumes equals their sources.
    let origin_out = fx.path("origin-out.img");
    run_ok("nbdcopy", &[&vol, origin_out.to_str().unwrap()]).await;
    assert!(
        read_file(&origin_out) == read_file(&fx.origin),
        "nbdcopy of the origin differs"
    );
    let s2_out = fx.path("s2-out.img");
    run_ok("nbdcopy", &[&s2, s2_out.to_str().unwrap()]).await;
    assert!(
        read_file(&s2_out) == read_file(&s2_copy),
        "nbdcopy of snapshot s2 differs"
    );

    // Snapshots are writable; writes to one leave the origin and the others alone.
    let origin_before = read_file(&fx.origin);
    qemu_io(&s1, &["write -P 0xee 2000000 100000", "flush"]).await;
    qemu_io(&s1, &["read -P 0xee 2000000 100000", "read -P 0xaa 0 4096"]).await;
    assert!(
        read_file(&fx.origin) == origin_before,
        "a snapshot write changed the origin"
    );
    assert_same_image(&s2_copy, &s2).await;

    // OPT_LIST shows the exports as they are now, with their flags.
    let exports = list_exports(&vol).await;
    assert_eq!(export_names(&exports), vec!["vol", "vol@s1", "vol@s2"]);
    for e in &exports {
        assert_eq!(e["export-size"], 16 * MIB, "{e}");
        assert_eq!(e["is_read_only"], false, "{e}");
        assert_eq!(e["can_flush"], true, "{e}");
        assert_eq!(e["can_fua"], true, "{e}");
        assert_eq!(e["can_multi_conn"], true, "{e}");
    }

    // Administration through csnapctl; errors name what was wrong.
    let ctl = |args: &'static [&'static str]| csnapctl(&agent.control, args);
    let dup = ctl(&["snapshot", "create", "vol", "s2"]).await;
    assert!(
        !dup.ok && dup.stderr.contains("duplicate name") && dup.stderr.contains("s2"),
        "{}",
        dup.stderr
    );
    let nov = ctl(&["snapshot", "list", "nope"]).await;
    assert!(
        !nov.ok && nov.stderr.contains("no such volume") && nov.stderr.contains("nope"),
        "{}",
        nov.stderr
    );
    let del = ctl(&["snapshot", "delete", "vol", "s1", "--json"]).await;
    assert!(del.ok, "{}", del.stderr);
    let del: Value = serde_json::from_str(&del.stdout).unwrap();
    assert_eq!(del["deleted"], "s1");
    let nos = ctl(&["snapshot", "delete", "vol", "s1"]).await;
    assert!(
        !nos.ok && nos.stderr.contains("no such snapshot") && nos.stderr.contains("s1"),
        "{}",
        nos.stderr
    );
    assert_eq!(
        export_names(&list_exports(&vol).await),
        vec!["vol", "vol@s2"]
    );
    let list = ctl(&["snapshot", "list", "vol", "--json"]).await;
    assert!(list.ok, "{}", list.stderr);
    let list: Value = serde_json::from_str(&list.stdout).unwrap();
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, vec!["s2"]);
    let text = ctl(&["snapshot", "list", "vol"]).await;
    assert!(
        text.ok && text.stdout.contains("s2") && !text.stdout.contains("s1"),
        "{}",
        text.stdout
    );
    let status = ctl(&["status", "vol", "--json"]).await;
    assert!(status.ok, "{}", status.stderr);
    let status: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["volumes"][0]["volume"], "vol");
    assert_eq!(status["volumes"][0]["mode"], "standalone");
    assert_eq!(status["volumes"][0]["server_status"]["snapshots"], 1);
    assert_eq!(status["volumes"][0]["server_status"]["chunk_size"], CHUNK);
    let created = ctl(&["snapshot", "create", "vol", "s3"]).await;
    assert!(
        created.ok && created.stdout.contains("created snapshot s3"),
        "{}",
        created.stdout
    );
    let absent = csnapctl(&fx.path("nobody.sock"), &["status"]).await;
    assert!(
        !absent.ok
            && absent.stderr.contains("agent not running at")
            && absent.stderr.contains("nobody.sock"),
        "{}",
        absent.stderr
    );

    // The deleted snapshot's export is gone; s2 is still intact after the delete.
    let gone = run("nbdinfo", &[&s1]).await;
    assert!(
        !gone.ok,
        "vol@s1 still opens after its deletion:\n{}",
        gone.stdout
    );
    assert_same_image(&s2_copy, &s2).await;

    assert!(agent.stop(), "clean shutdown on SIGTERM:\n{}", agent.log());
}

async fn fio_has_nbd() -> bool {
    if !require_tool("fio") {
        return false;
    }
    let engines = run_ok("fio", &["--enghelp"]).await;
    let has = engines.stdout.lines().any(|l| l.trim() == "nbd");
    assert!(
        has || !in_ci(),
        "fio has no nbd engine:\n{}",
        engines.stdout
    );
    if !has {
        eprintln!("skipping: fio has no nbd ioengine");
    }
    has
}

/// Runs fio with crc32c verification on `uri` over `[offset, offset + size)`.
async fn fio_verify(
    uri: &str,
    name: &str,
    rw: &str,
    offset: u64,
    size: u64,
    dir: &std::path::Path,
) -> Value {
    let out = run(
        "fio",
        &[
            &format!("--name={name}"),
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            "--bs=4k",
            &format!("--offset={offset}"),
            &format!("--size={size}"),
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            &format!("--directory={}", dir.display()),
            "--output-format=json",
        ],
    )
    .await;
    let json: Value = out
        .stdout
        .find('{')
        .and_then(|at| serde_json::from_str(&out.stdout[at..]).ok())
        .unwrap_or_else(|| {
            panic!(
                "fio {name} gave no JSON\nstdout:\n{}\nstderr:\n{}",
                out.stdout, out.stderr
            )
        });
    assert!(out.ok, "fio {name} failed:\n{}\n{}", out.stdout, out.stderr);
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "fio {name}: {}", out.stdout);
    json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verify_with_snapshots_created_mid_run() {
    if !fio_has_nbd().await || !require_tool("qemu-img") {
        return;
    }
    let fx = Fixture::new(CHUNK, 32 * MIB, 128 * MIB);
    let nbd = fx.path("a.nbd");
    let key = fx.key_file.to_str().unwrap().to_owned();
    let agent = Agent::start(
        &fx,
        "a",
        &[
            "--nbd-listen",
            &format!("unix:{}", nbd.display()),
            "--key-file",
            &key,
            // Client and server both bypass the page cache, as on a real shared device.
            "--direct-io",
        ],
    )
    .await;
    let vol = agent.uri("vol");
    let control = agent.control.clone();
    let snapshotter = tokio::spawn(async move {
        let mut made = 0;
        for i in 0..8 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let name = format!("mid{i}");
            let r = csnapctl(&control, &["snapshot", "create", "vol", &name]).await;
            assert!(r.ok, "csnapctl snapshot create {name}: {}", r.stderr);
            made += 1;
        }
        made
    });
    let json = fio_verify(&vol, "mixed", "randrw", 0, 16 * MIB, fx.dir.path()).await;
    let job = &json["jobs"][0];
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap_or(0) > 0,
        "fio wrote"
    );
    let made = tokio::time::timeout(WAIT, snapshotter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(made, 8);

    // After the run: a last snapshot equals the origin at that moment, and every
    // snapshot taken mid-run is still listed and readable end to end.
    agent.snapshot("final").await;
    let copy = fx.path("final.img");
    std::fs::copy(&fx.origin, &copy).unwrap();
    assert_same_image(&copy, &agent.uri("vol@final")).await;
    match agent
        .ctl(ControlRequest::Status {
            volume: Some("vol".into()),
        })
        .await
    {
        ControlResponse::Status { volumes } => {
            let v = &volumes[0];
            assert_eq!(v.server_status.snapshots, 9, "{v:?}");
            assert!(v.server_status.active);
            assert!(
                v.cache_hits > 0,
                "the unique-chunk cache served writes: {v:?}"
            );
        }
        other => panic!("status: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_client_processes_survive_a_server_kill_and_restart() {
    if !fio_has_nbd().await || !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let seed = seed("two_client_processes_survive_a_server_kill_and_restart");
    let fx = Fixture::new(CHUNK, 32 * MIB, 128 * MIB);
    let key = fx.key_file.to_str().unwrap().to_owned();
    let srv_sock = format!("unix:{}", fx.path("srv.sock").display());
    let server_args = [
        "--server-only",
        "--key-file",
        &key,
        "--server-listen",
        &srv_sock,
    ];
    let mut server = Agent::start(&fx, "srv", &server_args).await;
    let client_args = |name: &str, id: &str| -> Vec<String> {
        vec![
            "--connect-server".into(),
            srv_sock.clone(),
            "--key-file".into(),
            key.clone(),
            "--client-id".into(),
            id.into(),
            "--nbd-listen".into(),
            format!("unix:{}", fx.path(&format!("{name}.nbd")).display()),
        ]
    };
    let a_args = client_args("a", "4294967296");
    let b_args = client_args("b", "8589934592");
    let a = Agent::start(
        &fx,
        "a",
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let b = Agent::start(
        &fx,
        "b",
        &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;

    // A snapshot of known contents, copied aside.
    qemu_io(&a.uri("vol"), &["write -P 0x5a 0 2M"]).await;
    server.snapshot("before").await;
    let before = fx.path("before.img");
    std::fs::copy(&fx.origin, &before).unwrap();

    // Both clients write (disjoint halves, each verified by its own fio) and B reads the
    // snapshot meanwhile; the server is SIGKILLed and restarted in the middle.
    let (ua, ub) = (a.uri("vol"), b.uri("vol"));
    let dir = fx.dir.path().to_owned();
    let dir2 = dir.clone();
    let fio_a =
        tokio::spawn(async move { fio_verify(&ua, "a", "randrw", 0, 12 * MIB, &dir).await });
    let fio_b =
        tokio::spawn(
            async move { fio_verify(&ub, "b", "randwrite", 16 * MIB, 12 * MIB, &dir2).await },
        );
    let snap_uri = b.uri("vol@before");
    let reader_copy = before.clone();
    let reader = tokio::spawn(async move {
        for _ in 0..3 {
            assert_same_image(&reader_copy, &snap_uri).await;
        }
    });
    let kill_after = Duration::from_millis(200 + seed % 600);
    eprintln!("killing the server after {kill_after:?}");
    tokio::time::sleep(kill_after).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = Agent::start(&fx, "srv2", &server_args).await;

    let ja = tokio::time::timeout(WAIT, fio_a)
        .await
        .expect("fio a finished")
        .unwrap();
    let jb = tokio::time::timeout(WAIT, fio_b)
        .await
        .expect("fio b finished")
        .unwrap();
    tokio::time::timeout(WAIT, reader)
        .await
        .expect("reader finished")
        .unwrap();
    for (name, j) in [("a", &ja), ("b", &jb)] {
        eprintln!("fio {name}: {} ms", j["jobs"][0]["job_runtime"]);
        assert_eq!(j["jobs"][0]["error"], 0, "fio {name}");
        assert!(
            j["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or(0) > 0,
            "fio {name} wrote"
        );
    }

    // The snapshot survived the crash and the concurrent writers, read from either client.
    for c in [&a, &b] {
        assert_same_image(&before, &c.uri("vol@before")).await;
    }
    // Both clients re-established their sessions with the restarted server.
    for (name, c) in [("a", &a), ("b", &b)] {
        match c.ctl(ControlRequest::Status { volume: None }).await {
            ControlResponse::Status { volumes } => {
                assert!(
                    volumes[0].origin_sessions >= 2,
                    "client {name} reconnected: {:?}\n{}",
                    volumes[0],
                    c.log()
                );
                assert_eq!(volumes[0].mode, "client");
            }
            other => panic!("status {name}: {other:?}"),
        }
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_exported_read_only_on_request() {
    for tool in ["qemu-io", "nbdinfo"] {
        if !require_tool(tool) {
            return;
        }
    }
    let fx = Fixture::new(CHUNK, 4 * MIB, 32 * MIB);
    let nbd = fx.path("ro.nbd");
    let agent = Agent::start(
        &fx,
        "ro",
        &[
            "--nbd-listen",
            &format!("unix:{}", nbd.display()),
            "--snapshots-read-only",
        ],
    )
    .await;
    qemu_io(&agent.uri("vol"), &["write -P 0x42 0 64k"]).await;
    agent.snapshot("frozen").await;
    let exports = list_exports(&agent.uri("vol")).await;
    assert_eq!(export_names(&exports), vec!["vol", "vol@frozen"]);
    for e in &exports {
        let read_only = e["export-name"] == "vol@frozen";
        assert_eq!(e["is_read_only"], read_only, "{e}");
    }
    let snap = agent.uri("vol@frozen");
    let refused = run("qemu-io", &qemu_io_args(&snap, &["write -P 0x43 0 4k"])).await;
    // qemu-io refuses to open a read-only export for writing.
    assert!(
        !refused.ok && refused.stderr.contains("Permission denied"),
        "a write to a read-only snapshot export went through:\n{}\n{}",
        refused.stdout,
        refused.stderr
    );
    // qemu-io opens read-only exports read-only; the data is untouched either way.
    let ro = run(
        "qemu-io",
        &["-r", "-f", "raw", &snap, "-c", "read -P 0x42 0 64k"],
    )
    .await;
    assert!(ro.ok && !ro.stdout.contains("failed"), "{}", ro.stdout);
}

/// Issue 8, finding 4: when the server is reached over TCP, clients or the server may be
/// on other hosts, whose writes bypass this host's page cache: the agent opens the devices
/// O_DIRECT without being asked, and an origin O_DIRECT cannot serve (its store was
/// formatted for a size that is not a multiple of 4 KiB) is refused with an error naming
/// O_DIRECT and the origin, instead of being served buffered. Over a unix socket (one
/// host, one page cache) the same volume is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reached_over_tcp_uses_direct_io_and_refuses_what_it_cannot_serve() {
    let fx = Fixture::new(CHUNK, 4 * MIB + 1000, 16 * MIB);
    let origin = fx.origin.to_str().unwrap();
    let store = fx.store.to_str().unwrap();
    let key = fx.key_file.to_str().unwrap();
    let control = fx.path("tcp.ctl");
    let ran = support::run(
        env!("CARGO_BIN_EXE_csnap-agent"),
        &[
            "--standalone",
            "--volume",
            "vol",
            "--origin",
            origin,
            "--store",
            store,
            "--key-file",
            key,
            "--control-socket",
            control.to_str().unwrap(),
            "--server-listen",
            "127.0.0.1:0",
            "--server-only",
        ],
    )
    .await;
    assert!(!ran.ok, "the agent served an unaligned origin over TCP");
    assert!(
        ran.stderr.contains("O_DIRECT") && ran.stderr.contains(origin),
        "the error names O_DIRECT and the origin: {}",
        ran.stderr
    );
    // The same volume over a unix socket: one host, buffered I/O is coherent.
    let sock = format!("unix:{}", fx.path("srv.sock").display());
    let agent = Agent::start(
        &fx,
        "unix",
        &["--server-only", "--key-file", key, "--server-listen", &sock],
    )
    .await;
    drop(agent);
}

/// Waits (bounded) until every thread of `pid` is in the stopped state.
fn wait_all_threads_stopped(pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process exists");
        let all_stopped = tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|stat| {
                    // The state follows the parenthesised command name.
                    let after = stat.rsplit_once(") ")?.1;
                    after.chars().next()
                })
                .is_some_and(|state| state == 'T' || state == 't')
        });
        if all_stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} not stopped within 10 s of SIGSTOP"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Issue 8, finding 2, with real processes: an origin client (its own csnap-agent process)
/// is frozen with SIGSTOP right after writing a chunk twice (the second time through its
/// unique-chunk promise). A snapshot created meanwhile waits for it only until its write
/// lease has certainly run out (12 s), not for ever. Thawed, the client must not write
/// through its old promise (its lease ran out while it was frozen): it asks the server,
/// which copies the chunk out first, so the snapshot keeps what was there before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_origin_client_holds_a_snapshot_for_its_lease_only_and_then_asks_again() {
    if !require_tool("qemu-io") {
        return;
    }
    let fx = Fixture::new(CHUNK, 8 * MIB, 64 * MIB);
    let key = fx.key_file.to_str().unwrap().to_owned();
    let srv_sock = format!("unix:{}", fx.path("srv.sock").display());
    let server = Agent::start(
        &fx,
        "srv",
        &[
            "--server-only",
            "--key-file",
            &key,
            "--server-listen",
            &srv_sock,
        ],
    )
    .await;
    let client_args = |name: &str, id: &str| -> Vec<String> {
        vec![
            "--connect-server".into(),
            srv_sock.clone(),
            "--key-file".into(),
            key.clone(),
            "--client-id".into(),
            id.into(),
            "--nbd-listen".into(),
            format!("unix:{}", fx.path(&format!("{name}.nbd")).display()),
        ]
    };
    let (a_args, b_args) = (
        client_args("a", "4294967296"),
        client_args("b", "8589934592"),
    );
    let a = Agent::start(
        &fx,
        "a",
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let b = Agent::start(
        &fx,
        "b",
        &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    qemu_io(
        &a.uri("vol"),
        &["write -P 0x11 0 16k", "write -P 0x22 0 16k"],
    )
    .await;
    match a.ctl(ControlRequest::Status { volume: None }).await {
        ControlResponse::Status { volumes } => assert!(
            volumes[0].cache_hits >= 1,
            "the second write went through the promise: {:?}",
            volumes[0]
        ),
        other => panic!("status: {other:?}"),
    }

    let frozen = nix::unistd::Pid::from_raw(a.pid() as i32);
    nix::sys::signal::kill(frozen, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // A process-directed SIGSTOP stops the process only once one of its threads handles
    // it; on a loaded machine the others may run on meanwhile (and ack the snapshot).
    wait_all_threads_stopped(a.pid());
    let started = std::time::Instant::now();
    let created = tokio::time::timeout(Duration::from_secs(45), server.snapshot("frozen")).await;
    let waited = started.elapsed();
    nix::sys::signal::kill(frozen, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        created.is_ok(),
        "the snapshot waited more than 45 s for a frozen origin client\nserver log:\n{}",
        server.log()
    );
    eprintln!("snapshot created {waited:?} after the origin client was frozen");
    assert!(
        server.log().contains("write lease"),
        "the server says why it stopped waiting:\n{}",
        server.log()
    );

    qemu_io(&a.uri("vol"), &["write -P 0x33 0 16k"]).await;
    qemu_io(&b.uri("vol@frozen"), &["read -P 0x22 0 16k"]).await;
    qemu_io(&b.uri("vol"), &["read -P 0x33 0 16k"]).await;
}

/// An NBD URI path for an export name: every byte outside RFC 3986's unreserved set
/// percent-encoded (UTF-8), as docs/nbd.md says a client should write it.
fn uri_path(export: &str) -> String {
    export
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn snapshot_names(agent: &Agent) -> Vec<String> {
    match agent
        .ctl(ControlRequest::SnapshotList {
            volume: "vol".into(),
            after: None,
            limit: 1000,
        })
        .await
    {
        ControlResponse::SnapshotList { snapshots, .. } => {
            snapshots.into_iter().map(|s| s.name).collect()
        }
        other => panic!("snapshot list: {other:?}"),
    }
}

/// Issue 12, item 7: `csnapctl snapshot create vol $'a\nb'` is refused with the same clear
/// error as a name with '@' or '/', and nothing is created; so are the other names that
/// would break a listing's row or could not stand in an NBD URI. A Unicode name is
/// accepted and its export is reached through a percent-encoded NBD URI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_control_characters_are_refused_and_nothing_is_created() {
    let fx = Fixture::new(CHUNK, 4 * MIB, 16 * MIB);
    let nbd = fx.path("names.nbd");
    let agent = Agent::start(
        &fx,
        "names",
        &["--nbd-listen", &format!("unix:{}", nbd.display())],
    )
    .await;
    let control = "name contains a control character (such as NUL, tab, newline or DEL)";
    let layout = "name contains a Unicode line separator or text-direction control";
    let long = "x".repeat(256);
    for (name, why) in [
        ("a\nb", control),
        ("a\tb", control),
        ("\rx", control),
        ("a\u{7f}", control),
        ("a\u{85}b", control),
        ("a\u{2028}b", layout),
        ("a\u{202e}b", layout),
        ("a@b", "name contains '@' or '/'"),
        ("a/b", "name contains '@' or '/'"),
        (long.as_str(), "name is longer than 255 bytes"),
    ] {
        let r = csnapctl(&agent.control, &["snapshot", "create", "vol", name]).await;
        let expected = format!("invalid snapshot name {name:?}: {why}");
        assert!(
            !r.ok && r.stderr.contains(&expected),
            "csnapctl snapshot create vol {name:?}: ok={}, expected {expected:?}\nstdout:\n{}\nstderr:\n{}",
            r.ok,
            r.stdout,
            r.stderr
        );
    }
    assert_eq!(snapshot_names(&agent).await, Vec::<String>::new());

    let unicode = "Grüße 1";
    let r = csnapctl(&agent.control, &["snapshot", "create", "vol", unicode]).await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(snapshot_names(&agent).await, vec![unicode.to_owned()]);
    let listed = csnapctl(&agent.control, &["snapshot", "list", "vol"]).await;
    assert!(
        listed.ok && listed.stdout.contains(unicode),
        "{}",
        listed.stdout
    );

    // The export, named in a percent-encoded URI (qemu-io and nbdinfo decode it).
    for tool in ["qemu-io", "nbdinfo"] {
        if !require_tool(tool) {
            return;
        }
    }
    let path = uri_path(&format!("vol@{unicode}"));
    assert_eq!(path, "vol%40Gr%C3%BC%C3%9Fe%201");
    let uri = format!("nbd+unix:///{path}?socket={}", nbd.display());
    let info = run_ok("nbdinfo", &["--json", &uri]).await;
    let json: Value = serde_json::from_str(&info.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo JSON: {e}\n{}", info.stdout));
    let export = &json["exports"][0];
    assert_eq!(export["export-name"], format!("vol@{unicode}"), "{json}");
    assert_eq!(export["export-size"], 4 * MIB, "{json}");
    // The snapshot reads the origin as it was: the fixture's pattern.
    let expected = support::pattern(1, 4096);
    let out = run_ok("qemu-io", &["-r", "-f", "raw", &uri, "-c", "read -v 0 16"]).await;
    let first: String = expected[..16].iter().map(|b| format!("{b:02x} ")).collect();
    assert!(out.stdout.contains(first.trim_end()), "{}", out.stdout);
}

/// Issue 12, item 7: two standalone agents serving volumes of one name from one directory
/// (each with its own control socket, `NAME.ctl`) get their own default server sockets,
/// `NAME.ctl@vol.server.sock`, and both serve. A third agent told to listen where the first
/// one's server does, and a fourth on the first one's control socket, are refused with the
/// holder's pid and command, said once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_standalone_agents_in_one_directory_do_not_collide() {
    let fx = Fixture::new(CHUNK, 4 * MIB, 16 * MIB);
    let (origin_b, store_b) = fx.another_volume("b", 16 * MIB);
    let (origin_c, store_c) = fx.another_volume("c", 16 * MIB);
    let nbd = |n: &str| format!("unix:{}", fx.path(&format!("{n}.nbd")).display());
    let a = Agent::start(&fx, "a", &["--nbd-listen", &nbd("a")]).await;
    let mut b = Agent::spawn(&fx, "b", &origin_b, &store_b, &["--nbd-listen", &nbd("b")]);
    b.wait_ready().await;

    for (agent, name) in [(&a, "a"), (&b, "b")] {
        match agent.ctl(ControlRequest::Status { volume: None }).await {
            ControlResponse::Status { volumes } => {
                let sock = fx.path(&format!("{name}.ctl@vol.server.sock"));
                assert_eq!(volumes[0].server, format!("unix:{}", sock.display()));
            }
            other => panic!("status: {other:?}"),
        }
    }
    a.snapshot("only-on-a").await;
    b.snapshot("only-on-b").await;
    assert_eq!(snapshot_names(&a).await, vec!["only-on-a".to_owned()]);
    assert_eq!(snapshot_names(&b).await, vec!["only-on-b".to_owned()]);

    let holder = format!(
        "another process is listening there: pid {} (csnap-agent)",
        a.pid()
    );
    let a_server = format!("unix:{}", fx.path("a.ctl@vol.server.sock").display());
    let mut c = Agent::spawn(
        &fx,
        "c",
        &origin_c,
        &store_c,
        &["--nbd-listen", &nbd("c"), "--server-listen", &a_server],
    );
    let (status, log) = c.wait_exit();
    assert!(!status.success(), "{log}");
    assert_eq!(log.matches(&holder).count(), 1, "{log}");
    assert!(
        log.contains(&format!("cannot listen on {a_server}")),
        "{log}"
    );

    let mut d = Agent::spawn_on(
        &fx,
        &a.control,
        "d",
        &origin_c,
        &store_c,
        &["--nbd-listen", &nbd("d")],
    );
    let (status, log) = d.wait_exit();
    assert!(!status.success(), "{log}");
    assert_eq!(log.matches(&holder).count(), 1, "{log}");
    assert!(log.contains("its own --control-socket"), "{log}");

    // The refused agents disturbed nothing.
    a.snapshot("still-a").await;
    b.snapshot("still-b").await;
}
