//! `csnapctl rollback` end to end, with real NBD clients on a standalone agent: a seeded
//! history of qemu-io writes and snapshots `s0`..`s3` kept in a byte model, then a
//! rollback to one of them while nbdcopy reads the origin over and over and qemu-io keeps
//! writing whole chunks of it. Every read must show each chunk either as it was or as the
//! target (or as one of the concurrent writes, for the chunks they touch), never a mix,
//! and only the target once the command returned; afterwards the origin is the target
//! plus the writes made after the command returned, every snapshot (the pin included)
//! reads as it was taken, and rolling back to the pin undoes it. A second case SIGKILLs
//! the agent in the middle of the copy-back (made slow with the server's copy-back window
//! at one chunk) and restarts it: the copy-back resumes and ends with the same result.
//!
//! Seeds: `CSNAP_SEED=<n>` replays a case; otherwise a random seed is printed.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::*;

use crate::rollback_wait::assert_rollback_wait_saw_the_end;

const CHUNK: u64 = 16 * 1024;
/// The volume of the first case.
const SIZE: u64 = 8 * MIB;
const CHUNKS: u64 = SIZE / CHUNK;
/// The volume of the kill case: large enough that the copy-back (one chunk at a time) is
/// still running when the test has seen it start.
const KILL_SIZE: u64 = 32 * MIB;

/// The agent's NBD export and control socket, started with the copy-back window `window`.
fn spawn_agent(fx: &Fixture, name: &str, window: &str) -> Agent {
    let nbd = fx.path("r.nbd");
    Agent::spawn_with_env(
        fx,
        &fx.path("r.ctl"),
        name,
        &fx.origin,
        &fx.store,
        &["--nbd-listen", &format!("unix:{}", nbd.display())],
        &[("CSNAP_TEST_ROLLBACK_WINDOW", window)],
    )
}

/// The export's bytes, through nbdcopy.
async fn image(agent: &Agent, export: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    run_ok("nbdcopy", &[&agent.uri(export), out.to_str().unwrap()]).await;
    read_file(out)
}

fn chunk(bytes: &[u8], c: u64) -> &[u8] {
    &bytes[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize]
}

/// Applies `write -P byte offset len` to the model.
fn apply(model: &mut [u8], byte: u8, offset: u64, len: u64) {
    model[offset as usize..(offset + len) as usize].fill(byte);
}

/// A seeded history: snapshots `s0`..`s3`, each followed by a round of random writes
/// (many chunks each, so the copy-back has work). Returns the snapshots' contents and the
/// origin's, from the model.
async fn history(
    agent: &Agent,
    rng: &mut StdRng,
    size: u64,
) -> (BTreeMap<String, Vec<u8>>, Vec<u8>) {
    let mut model = pattern(1, size as usize);
    let mut snaps = BTreeMap::new();
    let vol = agent.uri("vol");
    for round in 0..4u8 {
        let name = format!("s{round}");
        agent.snapshot(&name).await;
        snaps.insert(name, model.clone());
        let byte = 0x10 + round;
        let mut args: Vec<String> = vec!["-f".into(), "raw".into(), vol.clone()];
        for _ in 0..rng.gen_range(20..40) {
            let len = rng.gen_range(512..=4 * CHUNK);
            let offset = rng.gen_range(0..size - len);
            apply(&mut model, byte, offset, len);
            args.push("-c".into());
            args.push(format!("write -P {byte} {offset} {len}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ok("qemu-io", &args).await;
    }
    (snaps, model)
}

/// The rollback running on the volume, from `csnapctl status --json` (`None`: none).
async fn rollback_status(agent: &Agent) -> Option<serde_json::Value> {
    let r = csnapctl(&agent.control, &["status", "vol", "--json"]).await;
    assert!(r.ok, "status: {}", r.stderr);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let rb = doc["volumes"][0]["server_status"]["rollback"].clone();
    (!rb.is_null()).then_some(rb)
}

/// Waits (bounded) until no rollback runs.
async fn wait_done(agent: &Agent, seed: u64) {
    let deadline = Instant::now() + WAIT;
    while rollback_status(agent).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "seed {seed:#x}: the rollback did not finish within {WAIT:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a rollback with csnapctl (no --wait); returns the JSON answer.
async fn start_rollback(agent: &Agent, target: &str, pin: &str, seed: u64) -> serde_json::Value {
    let r = csnapctl(
        &agent.control,
        &["rollback", "vol", target, "--pin", pin, "--json"],
    )
    .await;
    assert!(r.ok, "seed {seed:#x}: rollback to {target}: {}", r.stderr);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["source"]["name"], target, "{doc}");
    assert_eq!(doc["pin"]["name"], pin, "{doc}");
    assert_eq!(doc["done"], false, "{doc}");
    doc
}

/// Every snapshot reads as the model says.
async fn assert_snapshots(
    agent: &Agent,
    fx: &Fixture,
    snaps: &BTreeMap<String, Vec<u8>>,
    seed: u64,
) {
    for (name, want) in snaps {
        let got = image(agent, &format!("vol@{name}"), &fx.path("snap.out")).await;
        assert_eq!(got.len(), want.len());
        for c in 0..want.len() as u64 / CHUNK {
            assert!(
                chunk(&got, c) == chunk(want, c),
                "seed {seed:#x}: snapshot {name} chunk {c} changed"
            );
        }
    }
}

/// What the concurrent writer did: per chunk, the values written (registered before the
/// write is sent), and the value of the last write that started after the rollback
/// command returned.
#[derive(Default)]
struct Writes {
    values: BTreeMap<u64, BTreeSet<u8>>,
    after_return: BTreeMap<u64, u8>,
    /// The last write of each chunk started before the command returned.
    before_return_last: BTreeSet<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_under_nbd_reads_and_writes_keeps_every_other_snapshot() {
    for tool in ["qemu-io", "nbdcopy"] {
        if !require_tool(tool) {
            return;
        }
    }
    let seed = seed("rollback_under_nbd_reads_and_writes_keeps_every_other_snapshot");
    let mut rng = StdRng::seed_from_u64(seed);
    let fx = Fixture::new(CHUNK, SIZE, 64 * MIB);
    let mut agent = spawn_agent(&fx, "r", "1");
    agent.wait_ready().await;
    let (mut snaps, old) = history(&agent, &mut rng, SIZE).await;
    let target = format!("s{}", rng.gen_range(0..4));
    let new = snaps[&target].clone();
    // The chunks the concurrent writer writes (whole chunks, one byte value each).
    let written: Vec<u64> = (0..8).map(|_| rng.gen_range(0..CHUNKS)).collect();

    // Refusals first: nothing changes.
    let r = csnapctl(&agent.control, &["rollback", "vol", "nosuch"]).await;
    assert!(
        !r.ok && r.stderr.contains("no snapshot named \"nosuch\""),
        "{}",
        r.stderr
    );
    let r = csnapctl(&agent.control, &["rollback", "vol", &target, "--pin", "s1"]).await;
    assert!(
        !r.ok && r.stderr.contains("already has a snapshot named \"s1\""),
        "{}",
        r.stderr
    );
    assert!(rollback_status(&agent).await.is_none());

    let returned: Arc<Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes: Arc<Mutex<Writes>> = Arc::default();

    // The writer: whole-chunk writes to `written`, four per qemu-io run.
    let writer = {
        let (vol, returned, stop, writes) = (
            agent.uri("vol"),
            returned.clone(),
            stop.clone(),
            writes.clone(),
        );
        let mut rng = StdRng::seed_from_u64(seed ^ 0x3717e);
        let written = written.clone();
        tokio::spawn(async move {
            let mut next: u8 = 0xa0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut args: Vec<String> = vec!["-f".into(), "raw".into(), vol.clone()];
                {
                    let started_after = returned.lock().unwrap().is_some();
                    let mut w = writes.lock().unwrap();
                    for _ in 0..4 {
                        let c = written[rng.gen_range(0..written.len())];
                        next = if next == 0xfe { 0xa0 } else { next + 1 };
                        w.values.entry(c).or_default().insert(next);
                        if started_after {
                            w.after_return.insert(c, next);
                            w.before_return_last.remove(&c);
                        } else {
                            w.before_return_last.insert(c);
                        }
                        args.push("-c".into());
                        args.push(format!("write -P {next} {} {CHUNK}", c * CHUNK));
                    }
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                run_ok("qemu-io", &args).await;
            }
        })
    };

    // The reader: whole-origin nbdcopy passes, each chunk checked.
    let reader = {
        let (fx_out, returned, stop, writes) = (
            fx.path("read.out"),
            returned.clone(),
            stop.clone(),
            writes.clone(),
        );
        let uri = agent.uri("vol");
        let (old, new) = (old.clone(), new.clone());
        tokio::spawn(async move {
            let mut passes = 0u32;
            loop {
                let stopping = stop.load(std::sync::atomic::Ordering::SeqCst);
                let after_return = returned
                    .lock()
                    .unwrap()
                    .is_some_and(|t| t <= Instant::now());
                let _ = std::fs::remove_file(&fx_out);
                run_ok("nbdcopy", &[&uri, fx_out.to_str().unwrap()]).await;
                let got = read_file(&fx_out);
                let w = writes.lock().unwrap();
                for c in 0..CHUNKS {
                    let g = chunk(&got, c);
                    let as_written = w
                        .values
                        .get(&c)
                        .is_some_and(|v| g.iter().all(|b| *b == g[0]) && v.contains(&g[0]));
                    let fine =
                        g == chunk(&new, c) || as_written || (!after_return && g == chunk(&old, c));
                    assert!(
                        fine,
                        "seed {seed:#x}: read pass {passes} (after the command returned: \
                         {after_return}): origin chunk {c} is neither the target's, \
                         {}nor a concurrent write's",
                        if after_return { "" } else { "the old one, " }
                    );
                }
                passes += 1;
                if stopping {
                    return passes;
                }
            }
        })
    };

    tokio::time::sleep(Duration::from_millis(300)).await;
    let doc = start_rollback(&agent, &target, "undo", seed).await;
    *returned.lock().unwrap() = Some(Instant::now());
    let pin_id = doc["pin"]["id"].as_u64().unwrap();
    // A second rollback meanwhile is refused (if the first is still running).
    let r = csnapctl(&agent.control, &["rollback", "vol", "s0"]).await;
    if r.ok {
        panic!(
            "seed {seed:#x}: a second rollback was accepted: {}",
            r.stdout
        );
    }
    if !r.stderr.contains("already has a rollback running") {
        // It may have ended already; then the refusal would be a bug.
        assert!(
            rollback_status(&agent).await.is_none(),
            "seed {seed:#x}: {}",
            r.stderr
        );
        eprintln!(
            "the copy-back ended before the second request: {}",
            r.stderr
        );
    }
    if let Some(rb) = rollback_status(&agent).await {
        assert_eq!(rb["pin"].as_u64(), Some(pin_id), "{rb}");
    }
    wait_done(&agent, seed).await;
    // Let the writer run a little after the end too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let passes = tokio::time::timeout(WAIT, reader)
        .await
        .expect("reader ends")
        .expect("reader passed");
    tokio::time::timeout(WAIT, writer)
        .await
        .expect("writer ends")
        .expect("writer ran");
    eprintln!("{passes} read passes during the rollback to {target}");

    // The origin: the target plus the writes made after the command returned.
    let got = image(&agent, "vol", &fx.path("origin.out")).await;
    // The writer and the reader are done: the record is ours now.
    let w = std::mem::take(&mut *writes.lock().unwrap());
    for c in 0..CHUNKS {
        let g = chunk(&got, c);
        match (w.after_return.get(&c), w.before_return_last.contains(&c)) {
            (Some(v), false) => assert!(
                g.iter().all(|b| b == v),
                "seed {seed:#x}: chunk {c} lost the write made after the rollback returned"
            ),
            (_, true) => assert!(
                g == chunk(&new, c)
                    || (g.iter().all(|b| *b == g[0]) && w.values[&c].contains(&g[0])),
                "seed {seed:#x}: chunk {c}"
            ),
            (None, false) => assert!(
                g == chunk(&new, c),
                "seed {seed:#x}: origin chunk {c} is not the target's"
            ),
        }
    }
    let after = got.clone();
    // Every snapshot as taken; the pin is the origin as it was (no write touched it
    // before the command: the writer's chunks are checked by value).
    snaps.insert("undo".into(), {
        let pin = image(&agent, "vol@undo", &fx.path("pin.out")).await;
        for c in 0..CHUNKS {
            if !w.values.contains_key(&c) {
                assert!(
                    chunk(&pin, c) == chunk(&old, c),
                    "seed {seed:#x}: the pin's chunk {c} is not the origin as it was"
                );
            }
        }
        pin
    });
    assert_snapshots(&agent, &fx, &snaps, seed).await;

    // Undo: back to the pin, waiting for the copy-back.
    let r = csnapctl(
        &agent.control,
        &[
            "rollback",
            "vol",
            "undo",
            "--pin",
            "redo",
            "--wait",
            "--timeout",
            "120",
            "--progress",
        ],
    )
    .await;
    assert!(r.ok, "seed {seed:#x}: undo: {}", r.stderr);
    assert!(r.stdout.contains("done in"), "{}", r.stdout);
    assert!(rollback_status(&agent).await.is_none());
    let undone = image(&agent, "vol", &fx.path("origin.out")).await;
    assert!(
        undone == snaps["undo"],
        "seed {seed:#x}: undo did not restore the pin"
    );
    snaps.insert("redo".into(), after);
    assert_snapshots(&agent, &fx, &snaps, seed).await;
    assert!(agent.stop(), "clean exit\n{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_killed_mid_copy_back_resumes_after_a_restart() {
    for tool in ["qemu-io", "nbdcopy"] {
        if !require_tool(tool) {
            return;
        }
    }
    let seed = seed("a_rollback_killed_mid_copy_back_resumes_after_a_restart");
    let mut rng = StdRng::seed_from_u64(seed);
    let fx = Fixture::new(CHUNK, KILL_SIZE, 256 * MIB);
    let mut agent = spawn_agent(&fx, "r", "1");
    agent.wait_ready().await;
    let (mut snaps, mut old) = history(&agent, &mut rng, KILL_SIZE).await;
    // Every chunk differs from s0 from here on: a long copy-back.
    let vol = agent.uri("vol");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &vol,
            "-c",
            &format!("write -P 119 0 {KILL_SIZE}"),
        ],
    )
    .await;
    apply(&mut old, 119, 0, KILL_SIZE);
    let target = "s0";
    let new = snaps[target].clone();

    // --wait with no time to wait: exit 4, and the rollback goes on.
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_csnapctl"))
            .arg("--socket")
            .arg(&agent.control)
            .args([
                "rollback",
                "vol",
                target,
                "--pin",
                "undo",
                "--wait",
                "--timeout",
                "0",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("csnapctl answered in time")
    .expect("csnapctl runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "seed {seed:#x}: {stdout}\n{stderr}"
    );
    assert!(stdout.contains("undo (id"), "the pin is named: {stdout}");
    assert!(stderr.contains("it goes on"), "{stderr}");
    // Wait until the copy-back is under way, then kill the agent (its server) by PID.
    let deadline = Instant::now() + WAIT;
    let position = loop {
        let rb = rollback_status(&agent)
            .await
            .unwrap_or_else(|| panic!("seed {seed:#x}: the copy-back ended before the kill"));
        let position = rb["position"].as_u64().unwrap();
        if position > 0 {
            break position;
        }
        assert!(Instant::now() < deadline, "the copy-back never moved");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let pid = agent.pid();
    agent.kill();
    eprintln!(
        "killed agent {pid} with the copy-back at chunk {position} of {}",
        KILL_SIZE / CHUNK
    );

    // The restarted server copies back 16 chunks at once (the default): bounded time.
    let mut agent = spawn_agent(&fx, "r2", "16");
    agent.wait_ready().await;
    // The origin reads as the target at once, whether or not the copy-back is done.
    let got = image(&agent, "vol", &fx.path("origin.out")).await;
    let still = rollback_status(&agent).await;
    eprintln!("after the restart: {still:?}");
    assert!(
        got == new,
        "seed {seed:#x}: the origin is not the target after the restart"
    );
    wait_done(&agent, seed).await;
    assert!(
        agent.log().contains("rolled back to snapshot"),
        "the restarted server finished the copy-back\n{}",
        agent.log()
    );
    let got = image(&agent, "vol", &fx.path("origin.out")).await;
    assert!(got == new, "seed {seed:#x}: the origin is not the target");
    snaps.insert("undo".into(), old);
    assert_snapshots(&agent, &fx, &snaps, seed).await;
    assert!(agent.stop(), "clean exit\n{}", agent.log());
}

/// `csnapctl rollback --wait` outlives its agent: the agent (and its server) is SIGKILLed
/// in the middle of the copy-back the command is following, and started again a moment
/// later. The command says on stderr that it waits for the agent, keeps asking until the
/// restarted server resumed and finished the copy-back, and ends as if nothing happened:
/// exit 0, "done in". The origin is then the target, the pin the origin as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_wait_outlives_a_restart_of_its_agent() {
    for tool in ["qemu-io", "nbdcopy"] {
        if !require_tool(tool) {
            return;
        }
    }
    let fx = Fixture::new(CHUNK, KILL_SIZE, 256 * MIB);
    let mut agent = spawn_agent(&fx, "r", "1");
    agent.wait_ready().await;
    let vol = agent.uri("vol");
    let fill = |byte: u8| format!("write -P {byte} 0 {KILL_SIZE}");
    run_ok("qemu-io", &["-f", "raw", &vol, "-c", &fill(17)]).await;
    agent.snapshot("s0").await;
    // Every chunk differs from s0: a long copy-back at one chunk at a time.
    run_ok("qemu-io", &["-f", "raw", &vol, "-c", &fill(119)]).await;

    let waiter = tokio::process::Command::new(env!("CARGO_BIN_EXE_csnapctl"))
        .arg("--socket")
        .arg(&agent.control)
        .args(["rollback", "vol", "s0", "--pin", "undo"])
        .args(["--wait", "--timeout", "120", "--progress"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start csnapctl rollback --wait");
    // Kill once the copy-back is under way.
    let deadline = Instant::now() + WAIT;
    let position = loop {
        if let Some(rb) = rollback_status(&agent).await {
            let position = rb["position"].as_u64().unwrap_or(0);
            if position > 0 {
                break position;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the copy-back was not seen under way within {WAIT:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    agent.kill();
    eprintln!(
        "killed the agent with the copy-back at chunk {position} of {}",
        KILL_SIZE / CHUNK
    );
    // Long enough for the waiting command to find no agent (it asks every 200 ms).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut agent = spawn_agent(&fx, "r2", "16");
    agent.wait_ready().await;

    let out = tokio::time::timeout(WAIT, waiter.wait_with_output())
        .await
        .expect("csnapctl rollback --wait ended in time")
        .expect("csnapctl ran");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_rollback_wait_saw_the_end(
        out.status,
        &stdout,
        &stderr,
        "s0",
        "undo",
        &["csnapctl: waiting for the agent"],
    );
    assert!(
        stderr
            .contains("rollback to snapshot 1 (\"s0\") (origin as it was: snapshot 2 (\"undo\"))"),
        "the progress lines do not name the snapshots by id:\n{stderr}\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("resuming the rollback"),
        "the restarted server resumed the copy-back\n{}",
        agent.log()
    );
    assert!(rollback_status(&agent).await.is_none());
    let origin = image(&agent, "vol", &fx.path("origin.out")).await;
    assert!(
        origin.iter().all(|b| *b == 17),
        "the origin is not s0 after the rollback"
    );
    let pin = image(&agent, "vol@undo", &fx.path("pin.out")).await;
    assert!(
        pin.iter().all(|b| *b == 119),
        "the pin is not the origin as it was"
    );
    assert!(agent.stop(), "clean exit\n{}", agent.log());
}
