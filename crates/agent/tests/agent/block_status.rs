//! Block status on csnap exports with real clients: `base:allocation` of the origin (its
//! file's holes) and of a snapshot (its copied-out chunks as data, the rest as the
//! origin's), read with `nbdinfo --map` and `qemu-img map`; nbdcopy of a sparse snapshot
//! keeps the copy sparse; and `qemu:dirty-bitmap:FROM` on every export names exactly the
//! chunks `csnapctl diff` names for the same two ends (on `diff.rs`'s random history).

use crate::diff::{diff_chunks, diff_json, random_history, History, CHUNK};
use crate::support;

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::fcntl::{fallocate, FallocateFlags};
use serde_json::Value;
use support::*;

const HOLE: u32 = 1;
const ZERO: u32 = 2;
const DIRTY: u32 = 1;

/// Adjacent runs of equal type joined (clients split where requests ended).
fn joined(runs: impl IntoIterator<Item = (u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for r in runs {
        match out.last_mut() {
            Some(last) if last.2 == r.2 && last.0 + last.1 == r.0 => last.1 += r.1,
            _ => out.push(r),
        }
    }
    out
}

/// `nbdinfo --map=CONTEXT --json`: (offset, length, type), covering the export in order.
async fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let map = format!("--map={context}");
    let out = run_ok("nbdinfo", &[&map, "--json", uri]).await;
    let doc: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    let runs = joined(doc.as_array().expect("a JSON array").iter().map(|e| {
        (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap() as u32,
        )
    }));
    let mut at = 0;
    for r in &runs {
        assert_eq!(r.0, at, "consecutive: {runs:?}");
        at += r.1;
    }
    runs
}

/// `qemu-img map --output=json` of `args` as (offset, length, HOLE/ZERO flags).
async fn qemu_img_map(args: &[&str]) -> Vec<(u64, u64, u32)> {
    let mut all = vec!["map", "--output=json"];
    all.extend(args);
    let out = run_ok("qemu-img", &all).await;
    let doc: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    joined(doc.as_array().expect("a JSON array").iter().map(|e| {
        let zero = e["zero"].as_bool().unwrap();
        let data = e["data"].as_bool().unwrap();
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            (u32::from(zero) * ZERO) | (u32::from(!data) * HOLE),
        )
    }))
}

fn punch(path: &Path, offset: u64, len: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(f.as_raw_fd(), mode, offset as i64, len as i64).expect("punching a hole");
}

/// Whether the file system under `dir` reports holes (SEEK_HOLE).
fn reports_holes(dir: &Path) -> bool {
    let path = dir.join("probe");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(MIB).unwrap();
    let runs = csnap_blockdev::sparse::allocation(&f, 0, MIB, 4).unwrap();
    let _ = std::fs::remove_file(&path);
    runs.len() == 1 && runs[0].hole
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_of_the_origin_and_a_snapshot() {
    for tool in ["nbdinfo", "qemu-img", "qemu-io", "nbdcopy"] {
        if !require_tool(tool) {
            return;
        }
    }
    for direct in [false, true] {
        let fx = Fixture::new(CHUNK, 8 * MIB, 64 * MIB);
        if !reports_holes(fx.dir.path()) {
            eprintln!("skipping: this file system reports no holes");
            return;
        }
        // Holes in the origin before the agent starts: [1, 3) and [5, 8) MiB.
        punch(&fx.origin, MIB, 2 * MIB);
        punch(&fx.origin, 5 * MIB, 3 * MIB);
        let nbd = fx.path("b.nbd");
        let mut args = vec!["--nbd-listen".to_owned(), format!("unix:{}", nbd.display())];
        if direct {
            args.push("--direct-io".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start(&fx, "b", &args).await;
        agent.snapshot("s0").await;
        // Two origin writes after the snapshot copy out three chunks: two that were holes
        // and one with data.
        run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                &agent.uri("vol"),
                "-c",
                &format!("write -P 0x11 {} {}", MIB + CHUNK, 2 * CHUNK),
                "-c",
                &format!("write -P 0x22 {} {CHUNK}", 512 * 1024),
            ],
        )
        .await;
        // Then the first range becomes a hole of the origin again (as a TRIM would make
        // it): the snapshot's copies of those chunks are data all the same.
        punch(&fx.origin, MIB + CHUNK, 2 * CHUNK);

        let origin = vec![
            (0, MIB, 0),
            (MIB, 2 * MIB, HOLE | ZERO),
            (3 * MIB, 2 * MIB, 0),
            (5 * MIB, 3 * MIB, HOLE | ZERO),
        ];
        let snapshot = vec![
            (0, MIB, 0),
            (MIB, CHUNK, HOLE | ZERO),
            (MIB + CHUNK, 2 * CHUNK, 0),
            (MIB + 3 * CHUNK, 2 * MIB - 3 * CHUNK, HOLE | ZERO),
            (3 * MIB, 2 * MIB, 0),
            (5 * MIB, 3 * MIB, HOLE | ZERO),
        ];
        let (vol, snap) = (agent.uri("vol"), agent.uri("vol@s0"));
        assert_eq!(
            nbdinfo_map(&vol, "base:allocation").await,
            origin,
            "direct {direct}"
        );
        assert_eq!(
            nbdinfo_map(&snap, "base:allocation").await,
            snapshot,
            "direct {direct}"
        );
        assert_eq!(
            qemu_img_map(&["-f", "raw", &vol]).await,
            origin,
            "direct {direct}"
        );
        assert_eq!(
            qemu_img_map(&["-f", "raw", &snap]).await,
            snapshot,
            "direct {direct}"
        );

        // The snapshot copied with nbdcopy: same bytes, every ZERO run reads as zeroes,
        // and the copy allocates its data only (3 MiB of 8).
        let out = fx.path("s0.copy");
        run_ok("nbdcopy", &[&snap, out.to_str().unwrap()]).await;
        let bytes = read_file(&out);
        assert_eq!(bytes.len() as u64, 8 * MIB);
        for &(offset, len, flags) in &snapshot {
            if flags & ZERO != 0 {
                let run = &bytes[offset as usize..(offset + len) as usize];
                assert!(
                    run.iter().all(|&b| b == 0),
                    "ZERO run {offset}+{len} has data"
                );
            }
        }
        let original = pattern(1, (8 * MIB) as usize);
        assert_eq!(
            &bytes[512 * 1024..512 * 1024 + CHUNK as usize],
            &original[512 * 1024..512 * 1024 + CHUNK as usize]
        );
        assert_eq!(&bytes[..MIB as usize], &original[..MIB as usize]);
        let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            (3 * MIB..=3 * MIB + 2 * CHUNK + 64 * 1024).contains(&allocated),
            "direct {direct}: the copy of a snapshot with 3 MiB of data allocates {allocated} bytes"
        );
    }
}

/// The dirty chunks of a `qemu:dirty-bitmap` map (chunk-aligned).
fn dirty_chunks(map: &[(u64, u64, u32)]) -> BTreeSet<u64> {
    map.iter()
        .filter(|r| r.2 & DIRTY != 0)
        .flat_map(|&(offset, len, _)| {
            assert!(
                offset.is_multiple_of(CHUNK) && len.is_multiple_of(CHUNK),
                "{map:?}"
            );
            offset / CHUNK..(offset + len) / CHUNK
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_bitmaps_equal_csnapctl_diff() {
    if !require_tool("nbdinfo") || !require_tool("qemu-img") {
        return;
    }
    let Some(History {
        fx,
        agent,
        seed,
        names,
        ..
    }) = random_history("dirty_bitmaps_equal_csnapctl_diff").await
    else {
        return;
    };
    // Every export offers base:allocation and one dirty bitmap per snapshot.
    let out = run_ok("nbdinfo", &["--json", &agent.uri("vol@s2")]).await;
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    let mut want = vec!["base:allocation".to_owned()];
    want.extend(names.iter().map(|n| format!("qemu:dirty-bitmap:{n}")));
    assert_eq!(
        doc["exports"][0]["contexts"],
        serde_json::json!(want),
        "{doc}"
    );

    let mut compared = 0;
    for from in &names {
        let context = format!("qemu:dirty-bitmap:{from}");
        let ends = names.iter().map(|n| Some(n.as_str())).chain([None]);
        for to in ends {
            let export = to.map_or("vol".to_owned(), |t| format!("vol@{t}"));
            let map = nbdinfo_map(&agent.uri(&export), &context).await;
            let doc = diff_json(&agent.control, from, to, 16_000).await;
            assert_eq!(
                dirty_chunks(&map),
                diff_chunks(&doc),
                "seed {seed:#x}: {context} on {export}"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 5 * 6);

    // qemu's own reader of dirty bitmaps: x-dirty-bitmap shows dirty runs as data:false.
    let sock = agent
        .nbd
        .as_ref()
        .expect("a unix socket")
        .display()
        .to_string();
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={sock},export=vol,x-dirty-bitmap=qemu:dirty-bitmap:s1"
    );
    let qemu = qemu_img_map(&["--image-opts", &opts]).await;
    let qemu_dirty: BTreeSet<u64> = qemu
        .iter()
        .filter(|r| r.2 & HOLE != 0)
        .flat_map(|&(o, n, _)| o / CHUNK..(o + n) / CHUNK)
        .collect();
    let doc = diff_json(&agent.control, "s1", None, 16_000).await;
    assert_eq!(
        qemu_dirty,
        diff_chunks(&doc),
        "seed {seed:#x}: qemu-img map x-dirty-bitmap"
    );

    // An unknown FROM is simply not selected: nbdinfo reports the context missing.
    let r = run(
        "nbdinfo",
        &["--map=qemu:dirty-bitmap:nosuch", &agent.uri("vol")],
    )
    .await;
    assert!(!r.ok, "{}", r.stdout);
    drop(fx);
}
