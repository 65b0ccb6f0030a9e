//! `csnapctl export-diff` / `import-diff` between two standalone agents: a seeded random
//! qemu-io workload with snapshots `s0`..`s4` on volume A (see `diff::random_history`),
//! replicated onto volume B (which starts with other contents) by a full stream for `s0`
//! and incremental streams piped from one csnapctl into the other after that; every
//! snapshot of B must read byte-equal to A's (nbdcopy). The refusals (wrong FROM, a
//! truncated or damaged stream, another volume size, a target written since FROM) must
//! leave B unchanged: the same snapshots, the same origin bytes.

use crate::diff::{byte_diff, random_history, History, CHUNK};
use crate::support;

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use csnap_proto::control::{
    ControlRequest, ControlResponse, ReadExtent, MAX_CONTROL_DATA, MAX_CONTROL_EXTENTS,
};
use csnap_proto::diff_stream::{Extent, StreamReader, StreamWriter};
use csnap_proto::SnapId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use support::*;

const CSNAPCTL: &str = env!("CARGO_BIN_EXE_csnapctl");

/// Volume B beside A's fixture, with contents of its own (not A's initial pattern), served
/// by a second standalone agent.
async fn target(fx: &Fixture, seed: u64) -> Agent {
    let (origin, store) = fx.another_volume("b", 64 * MIB);
    std::fs::File::options()
        .write(true)
        .open(&origin)
        .unwrap()
        .write_all_at(&pattern(seed ^ 0x5eed, fx.origin_size as usize), 0)
        .unwrap();
    let nbd = fx.path("b.nbd");
    let mut b = Agent::spawn(
        fx,
        "b",
        &origin,
        &store,
        &["--nbd-listen", &format!("unix:{}", nbd.display())],
    );
    b.wait_ready().await;
    b
}

async fn image(agent: &Agent, export: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    run_ok("nbdcopy", &[&agent.uri(export), out.to_str().unwrap()]).await;
    read_file(out)
}

/// The names of the volume's snapshots, in id order.
async fn snapshot_names(agent: &Agent) -> Vec<String> {
    let r = csnapctl(&agent.control, &["snapshot", "list", "vol", "--json"]).await;
    assert!(r.ok, "{}", r.stderr);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let list = doc["snapshots"]
        .as_array()
        .or_else(|| doc.as_array())
        .unwrap_or_else(|| panic!("snapshot list JSON: {doc}"));
    list.iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Runs `export-diff` on A piped into `import-diff` on B (bash, pipefail).
async fn pipe(a: &Agent, b: &Agent, from: Option<&str>, to: &str, spool: &Path) -> Ran {
    let from = from.map(|f| format!("--from {f}")).unwrap_or_default();
    let script = format!(
        "set -o pipefail; {CSNAPCTL} --socket {} export-diff vol {from} {to} - --page-records 3 \
         | {CSNAPCTL} --socket {} import-diff vol - --spool-dir {}",
        a.control.display(),
        b.control.display(),
        spool.display()
    );
    run("bash", &["-c", &script]).await
}

async fn export_file(a: &Agent, from: Option<&str>, to: &str, out: &Path) -> Vec<u8> {
    let out_s = out.to_str().unwrap();
    let mut args = vec!["export-diff", "vol"];
    if let Some(f) = from {
        args.extend(["--from", f]);
    }
    args.extend([to, out_s]);
    let r = csnapctl(&a.control, &args).await;
    assert!(r.ok, "export-diff {args:?}: {}", r.stderr);
    read_file(out)
}

async fn import_file(b: &Agent, file: &Path) -> Ran {
    csnapctl(&b.control, &["import-diff", "vol", file.to_str().unwrap()]).await
}

/// B's snapshots and origin bytes, to show a refused import changed nothing.
async fn state(b: &Agent, fx: &Fixture) -> (Vec<String>, Vec<u8>) {
    (
        snapshot_names(b).await,
        image(b, "vol", &fx.path("b-origin.out")).await,
    )
}

/// Every snapshot B has reads as A's of the same name, and B's origin as the last.
async fn assert_replica(h: &History, b: &Agent, upto: usize) {
    let names: Vec<String> = h.names[..=upto].to_vec();
    assert_eq!(snapshot_names(b).await, names, "seed {:#x}", h.seed);
    for (i, name) in names.iter().enumerate() {
        let got = image(
            b,
            &format!("vol@{name}"),
            &h.fx.path(&format!("b-{name}.out")),
        )
        .await;
        assert!(
            got == h.images[i].1,
            "seed {:#x}: B's {name} differs from A's after importing up to {}",
            h.seed,
            h.names[upto]
        );
    }
    let origin = image(b, "vol", &h.fx.path("b-origin.out")).await;
    assert!(
        origin == h.images[upto].1,
        "seed {:#x}: B's origin is not {} after the import",
        h.seed,
        h.names[upto]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_import_chains_reproduce_every_snapshot() {
    let Some(mut h) = random_history("export_import_chains_reproduce_every_snapshot").await else {
        return;
    };
    let b = target(&h.fx, h.seed).await;
    let spool = h.fx.path("spool");
    std::fs::create_dir_all(&spool).unwrap();

    // s0 in full, through a file.
    let full = h.fx.path("s0.csdiff");
    export_file(&h.agent, None, "s0", &full).await;
    let r = import_file(&b, &full).await;
    assert!(r.ok, "seed {:#x}: {}", h.seed, r.stderr);
    assert_replica(&h, &b, 0).await;

    // Then each next snapshot incrementally, piped.
    for i in 1..h.names.len() {
        let r = pipe(&h.agent, &b, Some(&h.names[i - 1]), &h.names[i], &spool).await;
        assert!(r.ok, "seed {:#x}: {}: {}", h.seed, h.names[i], r.stderr);
        assert!(r.stdout.contains("imported snapshot"), "{}", r.stdout);
        assert_replica(&h, &b, i).await;
    }
    // Zeroes written on A (NBD WRITE_ZEROES, whole and partial chunks, and zero bytes
    // written as data) travel as zero records and land as zeroes on B.
    let vol_a = h.agent.uri("vol");
    let size = h.fx.origin_size;
    let zero_a = format!("write -z 0 {}", 3 * CHUNK);
    let zero_b = format!("write -P 0 {} {}", 5 * CHUNK + 100, 2 * CHUNK);
    let zero_c = format!("write -z {} 1000", size - CHUNK - 1000);
    run_ok(
        "qemu-io",
        &[
            "-f", "raw", &vol_a, "-c", &zero_a, "-c", &zero_b, "-c", &zero_c,
        ],
    )
    .await;
    h.agent.snapshot("s5").await;
    let s5 = image(&h.agent, "vol@s5", &h.fx.path("s5.out")).await;
    assert!(s5[..3 * CHUNK as usize].iter().all(|b| *b == 0));
    let stream = export_file(&h.agent, Some("s4"), "s5", &h.fx.path("s4-s5.csdiff")).await;
    let mut r = StreamReader::new(stream.as_slice()).unwrap();
    let mut zero_bytes = 0;
    while let Some(e) = r.next_extent().unwrap() {
        if let Extent::Zero { len, .. } = e {
            zero_bytes += len;
        }
    }
    assert!(zero_bytes >= 3 * CHUNK + 2 * CHUNK - 4096, "{zero_bytes}");
    h.names.push("s5".into());
    h.images.insert(5, (Some("s5".into()), s5));
    let r = pipe(&h.agent, &b, Some("s4"), "s5", &spool).await;
    assert!(r.ok, "seed {:#x}: s5: {}", h.seed, r.stderr);
    assert_replica(&h, &b, 5).await;

    // The spool files are gone with the imports.
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);

    // An incremental stream holds only the changed chunks (every data or zero record lies
    // in a chunk the byte comparison names).
    let stream = export_file(&h.agent, Some("s3"), "s4", &h.fx.path("s3-s4.csdiff")).await;
    let changed = byte_diff(&h.images[3].1, &h.images[4].1);
    let mut r = StreamReader::new(stream.as_slice()).unwrap();
    assert_eq!(r.header().from.as_deref(), Some("s3"));
    assert_eq!(r.header().chunk_bytes as u64, CHUNK);
    while let Some(e) = r.next_extent().unwrap() {
        for c in e.offset() / CHUNK..(e.offset() + e.len()).div_ceil(CHUNK) {
            assert!(
                changed.contains(&c),
                "seed {:#x}: chunk {c} unchanged",
                h.seed
            );
        }
    }
}

/// Rewrites a stream with another volume size in its header (checksums made anew).
fn with_volume_bytes(stream: &[u8], volume_bytes: u64) -> Vec<u8> {
    let mut r = StreamReader::new(stream).unwrap();
    let mut header = r.header().clone();
    header.volume_bytes = volume_bytes;
    let mut w = StreamWriter::new(Vec::new(), &header).unwrap();
    while let Some(e) = r.next_extent().unwrap() {
        match e {
            Extent::Data { offset, data } => w.data(offset, &data).unwrap(),
            Extent::Zero { offset, len } => w.zero(offset, len).unwrap(),
        }
    }
    w.finish().unwrap().1
}

async fn assert_refused(b: &Agent, fx: &Fixture, file: &Path, want: &str, seed: u64) {
    let before = state(b, fx).await;
    let r = import_file(b, file).await;
    assert!(!r.ok, "seed {seed:#x}: {} was imported", file.display());
    assert!(
        r.stderr.contains(want) && r.stderr.contains("nothing was changed"),
        "seed {seed:#x}: {}: want {want:?} in\n{}",
        file.display(),
        r.stderr
    );
    assert!(
        state(b, fx).await == before,
        "seed {seed:#x}: refusing {} changed volume B",
        file.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_streams_are_refused_and_leave_the_target_unchanged() {
    let Some(h) = random_history("bad_streams_are_refused_and_leave_the_target_unchanged").await
    else {
        return;
    };
    let (a, fx, seed) = (&h.agent, &h.fx, h.seed);
    let b = target(fx, seed).await;
    let path = |n: &str| -> PathBuf { fx.path(n) };
    export_file(a, None, "s0", &path("s0.csdiff")).await;
    export_file(a, Some("s0"), "s1", &path("s0-s1.csdiff")).await;
    let s1_s2 = export_file(a, Some("s1"), "s2", &path("s1-s2.csdiff")).await;
    export_file(a, Some("s2"), "s3", &path("s2-s3.csdiff")).await;
    export_file(a, Some("s3"), "s4", &path("s3-s4.csdiff")).await;

    // Onto a volume without snapshots only a full stream applies.
    assert_refused(&b, fx, &path("s0-s1.csdiff"), "has no snapshots", seed).await;
    assert!(import_file(&b, &path("s0.csdiff")).await.ok);
    assert_refused(
        &b,
        fx,
        &path("s0.csdiff"),
        "already has a snapshot named",
        seed,
    )
    .await;
    assert!(import_file(&b, &path("s0-s1.csdiff")).await.ok);
    export_file(a, None, "s2", &path("s2-full.csdiff")).await;
    assert_refused(&b, fx, &path("s2-full.csdiff"), "full export", seed).await;

    // FROM must be B's latest snapshot (s1).
    assert_refused(
        &b,
        fx,
        &path("s2-s3.csdiff"),
        "latest snapshot of volume",
        seed,
    )
    .await;
    assert_refused(
        &b,
        fx,
        &path("s0-s1.csdiff"),
        "already has a snapshot",
        seed,
    )
    .await;

    // A stream cut anywhere, or with one byte flipped, is refused whole.
    for cut in [10, s1_s2.len() / 3, s1_s2.len() / 2, s1_s2.len() - 1] {
        std::fs::write(path("cut.csdiff"), &s1_s2[..cut]).unwrap();
        assert_refused(&b, fx, &path("cut.csdiff"), "truncated", seed).await;
    }
    for at in [40, s1_s2.len() / 2, s1_s2.len() - 3] {
        let mut bad = s1_s2.clone();
        bad[at] ^= 0x20;
        std::fs::write(path("flipped.csdiff"), &bad).unwrap();
        // Damaged, or (a flipped length) truncated: refused either way.
        assert_refused(&b, fx, &path("flipped.csdiff"), "the diff stream is", seed).await;
    }
    // Through stdin as well (the spooled path).
    let before = state(&b, fx).await;
    let script = format!(
        "head -c {} {} | {CSNAPCTL} --socket {} import-diff vol -",
        s1_s2.len() / 2,
        path("s1-s2.csdiff").display(),
        b.control.display()
    );
    let r = run("bash", &["-c", &script]).await;
    assert!(!r.ok && r.stderr.contains("truncated"), "{}", r.stderr);
    assert!(state(&b, fx).await == before, "seed {seed:#x}");

    // Another volume size.
    std::fs::write(
        path("bigger.csdiff"),
        with_volume_bytes(&s1_s2, fx.origin_size * 2),
    )
    .unwrap();
    assert_refused(&b, fx, &path("bigger.csdiff"), "is for a volume of", seed).await;

    // After all that, the good stream still applies exactly.
    let r = import_file(&b, &path("s1-s2.csdiff")).await;
    assert!(r.ok, "seed {seed:#x}: {}", r.stderr);
    assert_replica(&h, &b, 2).await;

    // An interrupted import wrote only where its stream writes: simulated by junk written
    // to B's origin inside s2 -> s3's changes. The import still applies, and exactly.
    let changed = byte_diff(&h.images[2].1, &h.images[3].1);
    let inside = *changed.iter().next().expect("s2 -> s3 changed something");
    let vol_b = b.uri("vol");
    let w = format!("write -P 0xee {} 512", inside * CHUNK + 100);
    run_ok("qemu-io", &["-f", "raw", &vol_b, "-c", &w]).await;
    let r = import_file(&b, &path("s2-s3.csdiff")).await;
    assert!(r.ok, "seed {seed:#x}: {}", r.stderr);
    assert_replica(&h, &b, 3).await;

    // A write outside what s3 -> s4 replaces: the result would not be s4, so refused.
    let changed = byte_diff(&h.images[3].1, &h.images[4].1);
    let outside = (0..fx.origin_size / CHUNK)
        .find(|c| !changed.contains(c))
        .expect("s3 -> s4 left a chunk alone");
    let w = format!("write -P 0xee {} 512", outside * CHUNK);
    run_ok("qemu-io", &["-f", "raw", &vol_b, "-c", &w]).await;
    assert_refused(&b, fx, &path("s3-s4.csdiff"), "was written since", seed).await;
}

/// A volume of `size` bytes served by agent `a` (with `env`), snapshot `a`, then a seeded
/// scattered change: `scattered` random chunks rewritten (whole or in part, each with a
/// byte of its own) and one long run of `run` bytes, then snapshot `b`.
async fn scattered_change(
    test: &str,
    size: u64,
    scattered: u64,
    run: u64,
    env: &[(&str, &str)],
) -> Option<(Fixture, Agent, u64)> {
    for tool in ["qemu-io", "nbdcopy"] {
        if !require_tool(tool) {
            return None;
        }
    }
    let seed = seed(test);
    let mut rng = StdRng::seed_from_u64(seed);
    let fx = Fixture::new(CHUNK, size, size + 16 * MIB);
    let nbd = fx.path("a.nbd");
    let nbd_arg = format!("unix:{}", nbd.display());
    let mut a = Agent::spawn_with_env(
        &fx,
        &fx.path("a.ctl"),
        "a",
        &fx.origin,
        &fx.store,
        &["--nbd-listen", &nbd_arg],
        env,
    );
    a.wait_ready().await;
    a.snapshot("a").await;
    let chunks = size / CHUNK;
    let mut writes: Vec<String> = (0..scattered)
        .map(|_| {
            let chunk = rng.gen_range(0..chunks);
            let within = rng.gen_range(0..CHUNK / 2);
            let len = rng.gen_range(512..=CHUNK - within);
            let byte = rng.gen_range(1..=255u8);
            format!("write -P {byte} {} {len}", chunk * CHUNK + within)
        })
        .collect();
    let run_at = rng.gen_range(0..(size - run) / CHUNK) * CHUNK + 100;
    writes.push(format!("write -P 0x5a {run_at} {}", run.min(size - run_at)));
    let vol = a.uri("vol");
    let mut args = vec!["-f", "raw", vol.as_str()];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    run_ok("qemu-io", &args).await;
    a.snapshot("b").await;
    Some((fx, a, seed))
}

/// The last line of `text` as a JSON object.
fn last_json_line(text: &str) -> Value {
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {text}"))
}

/// The stream's extent records and their data and zero bytes.
fn stream_totals(stream: &[u8]) -> (u64, u64, u64) {
    let mut r = StreamReader::new(stream).unwrap();
    let (mut records, mut data, mut zero) = (0, 0, 0);
    while let Some(e) = r.next_extent().unwrap() {
        records += 1;
        match e {
            Extent::Data { data: d, .. } => data += d.len() as u64,
            Extent::Zero { len, .. } => zero += len,
        }
    }
    (records, data, zero)
}

/// Many scattered changed chunks and a long run, far more reads than the export keeps in
/// flight on its one connection, round-trip byte-exactly; the `--json` summaries of both
/// commands name the stream's totals (to stdout, or to stderr's last line when the stream
/// itself goes to stdout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_scattered_change_round_trips_exactly_with_json_summaries() {
    let test = "a_large_scattered_change_round_trips_exactly_with_json_summaries";
    let Some((fx, a, seed)) = scattered_change(test, 32 * MIB, 700, 3 * MIB, &[]).await else {
        return;
    };
    let b = target(&fx, seed).await;
    let image_a = image(&a, "vol@a", &fx.path("a-a.out")).await;
    let image_b = image(&a, "vol@b", &fx.path("a-b.out")).await;

    // The full stream of `a`, imported with --json.
    let full = export_file(&a, None, "a", &fx.path("a.csdiff")).await;
    let (records, data, zero) = stream_totals(&full);
    assert_eq!(data + zero, fx.origin_size, "seed {seed:#x}");
    let r = csnapctl(
        &b.control,
        &[
            "import-diff",
            "vol",
            fx.path("a.csdiff").to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(r.ok, "seed {seed:#x}: {}", r.stderr);
    let doc = last_json_line(&r.stdout);
    assert_eq!(doc["volume"], "vol");
    assert_eq!(doc["from"], Value::Null);
    assert_eq!(doc["to"], "a");
    assert_eq!(doc["extents"], records);
    assert_eq!(doc["data_bytes"], data);
    assert_eq!(doc["zero_bytes"], zero);
    assert!(doc["seconds"].as_f64().is_some_and(|s| s >= 0.0), "{doc}");
    assert!(doc["snapshot_id"].as_u64().is_some(), "{doc}");

    // The incremental stream to a file, --json on stdout.
    let out = fx.path("a-b.csdiff");
    let r = csnapctl(
        &a.control,
        &[
            "export-diff",
            "vol",
            "--from",
            "a",
            "b",
            out.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(r.ok, "seed {seed:#x}: {}", r.stderr);
    let stream = read_file(&out);
    let (records, data, zero) = stream_totals(&stream);
    let doc = last_json_line(&r.stdout);
    assert_eq!(doc["volume"], "vol");
    assert_eq!(doc["from"], "a");
    assert_eq!(doc["to"], "b");
    assert_eq!(doc["extents"], records);
    assert_eq!(doc["data_bytes"], data);
    assert_eq!(doc["zero_bytes"], zero);
    assert!(doc.get("snapshot_id").is_none(), "{doc}");
    let changed = byte_diff(&image_a, &image_b);
    assert!(
        data >= (changed.len() as u64 - 1) * CHUNK / 2,
        "seed {seed:#x}: {data} bytes of data for {} changed chunks",
        changed.len()
    );

    // The same piped, with both summaries.
    let export_err = fx.path("export.err");
    let script = format!(
        "set -o pipefail; {CSNAPCTL} --socket {} export-diff vol --from a b - --json 2>{} \
         | {CSNAPCTL} --socket {} import-diff vol - --json",
        a.control.display(),
        export_err.display(),
        b.control.display(),
    );
    let r = run("bash", &["-c", &script]).await;
    assert!(r.ok, "seed {seed:#x}: {}", r.stderr);
    let exported = last_json_line(&std::fs::read_to_string(&export_err).unwrap());
    let imported = last_json_line(&r.stdout);
    assert_eq!(exported["extents"], records, "{exported}");
    assert_eq!(exported["data_bytes"], data, "{exported}");
    for field in [
        "volume",
        "from",
        "to",
        "extents",
        "data_bytes",
        "zero_bytes",
    ] {
        assert_eq!(
            exported[field], imported[field],
            "{field}: {exported} / {imported}"
        );
    }
    assert_eq!(snapshot_names(&b).await, ["a", "b"]);
    assert!(
        image(&b, "vol@a", &fx.path("b-a.out")).await == image_a,
        "seed {seed:#x}: B's a differs from A's"
    );
    assert!(
        image(&b, "vol@b", &fx.path("b-b.out")).await == image_b,
        "seed {seed:#x}: B's b differs from A's"
    );
    assert!(
        image(&b, "vol", &fx.path("b-origin.out")).await == image_b,
        "seed {seed:#x}: B's origin is not b"
    );
}

/// A snapshot deleted while its export runs (reads held by the test hook so the export is
/// still going) makes export-diff fail naming the read that failed; a file OUT is removed,
/// and the partial stream piped into import-diff is refused, leaving the target unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_whose_snapshot_is_deleted_midway_fails_clearly() {
    let test = "an_export_whose_snapshot_is_deleted_midway_fails_clearly";
    // Batched reads (8 chunks a request, 32 requests in flight) finish the export in a
    // few waves: each held long enough that the deletion 0.5 s in lands mid-export.
    let hold = [("CSNAP_TEST_HOLD_SNAPSHOT_READ_MS", "600")];
    let Some((fx, a, seed)) = scattered_change(test, 16 * MIB, 600, MIB, &hold).await else {
        return;
    };
    let b = target(&fx, seed).await;
    let full = fx.path("a.csdiff");
    export_file(&a, None, "a", &full).await;
    assert!(import_file(&b, &full).await.ok);
    let before = state(&b, &fx).await;

    let out = fx.path("a-b.csdiff");
    let script = format!(
        "set -o pipefail; {CSNAPCTL} --socket {} export-diff vol --from a b - \
         | {CSNAPCTL} --socket {} import-diff vol - & sleep 0.5; \
         {CSNAPCTL} --socket {} snapshot delete vol b >&2; wait $!",
        a.control.display(),
        b.control.display(),
        a.control.display(),
    );
    let r = run("bash", &["-c", &script]).await;
    assert!(
        !r.ok,
        "seed {seed:#x}: the export survived the deletion: {}",
        r.stdout
    );
    assert!(
        r.stderr.contains("cannot read snapshot") && r.stderr.contains("truncated"),
        "seed {seed:#x}: want the failed read and the refused stream in\n{}",
        r.stderr
    );
    assert!(state(&b, &fx).await == before, "seed {seed:#x}: B changed");

    // Into a file: the same failure, and no partial file left behind.
    a.snapshot("c").await;
    let script = format!(
        "{CSNAPCTL} --socket {} export-diff vol --from a c {} & sleep 0.5; \
         {CSNAPCTL} --socket {} snapshot delete vol c >&2; wait $!",
        a.control.display(),
        out.display(),
        a.control.display(),
    );
    let r = run("bash", &["-c", &script]).await;
    assert!(!r.ok, "seed {seed:#x}: the export survived the deletion");
    assert!(
        r.stderr.contains("cannot read snapshot"),
        "seed {seed:#x}: {}",
        r.stderr
    );
    assert!(!out.exists(), "seed {seed:#x}: a partial stream was left");
}

/// The message of an `Error` answer (panics on any other answer).
fn error_message(resp: ControlResponse) -> String {
    match resp {
        ControlResponse::Error { message, .. } => message,
        other => panic!("want an error, got {other:?}"),
    }
}

/// `ReadSnapshotExtents` (what export-diff batches its reads into): seeded random extents
/// of a changed snapshot, unaligned, crossing chunk boundaries, sharing chunks and out of
/// order, read in one request, equal the snapshot's bytes as NBD reads them; requests over
/// the limits, outside the volume or of an unknown snapshot get clear errors, and the agent
/// goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_snapshot_reads_return_the_extents_in_order_and_refuse_bad_requests() {
    let test = "batched_snapshot_reads_return_the_extents_in_order_and_refuse_bad_requests";
    let Some((fx, a, seed)) = scattered_change(test, 16 * MIB, 200, MIB, &[]).await else {
        return;
    };
    let snap = SnapId(a.snapshot("c").await);
    // Changed after the snapshot: the read must still return the snapshot's bytes.
    let vol = a.uri("vol");
    run_ok(
        "qemu-io",
        &["-f", "raw", vol.as_str(), "-c", "write -P 0x77 0 4M"],
    )
    .await;
    let image = image(&a, "vol@c", &fx.path("c.out")).await;
    let mut rng = StdRng::seed_from_u64(seed ^ 0xe7);
    let size = image.len() as u64;
    let read = |extents: Vec<ReadExtent>| ControlRequest::ReadSnapshotExtents {
        volume: "vol".into(),
        snap,
        extents,
    };
    for round in 0..20 {
        let count = rng.gen_range(1..=MAX_CONTROL_EXTENTS);
        let budget = u64::from(MAX_CONTROL_DATA) / count as u64;
        let extents: Vec<ReadExtent> = (0..count)
            .map(|_| {
                let len = rng.gen_range(1..=budget.min(3 * CHUNK));
                let offset = rng.gen_range(0..=size - len);
                ReadExtent {
                    offset,
                    len: len as u32,
                }
            })
            .collect();
        let want: Vec<u8> = extents
            .iter()
            .flat_map(|e| image[e.offset as usize..(e.offset + u64::from(e.len)) as usize].to_vec())
            .collect();
        match a.ctl(read(extents.clone())).await {
            ControlResponse::Data { data, .. } => assert!(
                data == want,
                "seed {seed:#x} round {round}: the bytes of {extents:?} differ"
            ),
            other => panic!("seed {seed:#x} round {round}: {other:?}"),
        }
    }
    let one = |offset, len| ReadExtent { offset, len };
    let too_many = vec![one(0, 512); MAX_CONTROL_EXTENTS + 1];
    assert!(error_message(a.ctl(read(too_many)).await).contains("extents"));
    assert!(error_message(a.ctl(read(Vec::new())).await).contains("extents"));
    let too_large = vec![one(0, MAX_CONTROL_DATA), one(CHUNK, 1)];
    assert!(error_message(a.ctl(read(too_large)).await).contains("too large"));
    let outside = vec![one(0, 512), one(size - 100, 200)];
    assert!(error_message(a.ctl(read(outside)).await).contains("outside volume"));
    let empty = vec![one(0, 0)];
    assert!(error_message(a.ctl(read(empty)).await).contains("empty"));
    let unknown = ControlRequest::ReadSnapshotExtents {
        volume: "vol".into(),
        snap: SnapId(snap.0 + 1000),
        extents: vec![one(0, 512), one(5 * CHUNK - 10, 20)],
    };
    let msg = error_message(a.ctl(unknown).await);
    assert!(msg.contains("cannot read snapshot"), "{msg}");
    // Still serving after the refusals.
    match a.ctl(read(vec![one(CHUNK - 1, 2)])).await {
        ControlResponse::Data { data, .. } => {
            assert_eq!(data, image[CHUNK as usize - 1..CHUNK as usize + 1])
        }
        other => panic!("seed {seed:#x}: {other:?}"),
    }
}
