//! `csnapctl diff` against a real standalone agent and real NBD clients: a seeded random
//! write workload (qemu-io) with snapshots between rounds; every diff between any two
//! snapshots, and between each snapshot and the origin, must name exactly the chunks where
//! a byte comparison of the two exports (read with nbdcopy) differs. Each round writes a
//! pattern byte no earlier round used, at least 512 bytes at a time, so a written chunk
//! always differs in its bytes too and the two sets must be equal, not just contained.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use support::*;

pub(crate) const CHUNK: u64 = 16 * 1024;
const SIZE: u64 = 8 * MIB;

/// The chunks where two images' bytes differ.
pub(crate) fn byte_diff(a: &[u8], b: &[u8]) -> BTreeSet<u64> {
    assert_eq!(a.len(), b.len());
    a.chunks(CHUNK as usize)
        .zip(b.chunks(CHUNK as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

/// The chunks `csnapctl diff --json` names, checking the document's shape on the way.
pub(crate) fn diff_chunks(doc: &Value) -> BTreeSet<u64> {
    assert_eq!(doc["chunk_size"], CHUNK, "{doc}");
    let extents = doc["extents"].as_array().expect("extents array");
    let mut chunks = BTreeSet::new();
    let mut last_end = None;
    let mut bytes = 0;
    for e in extents {
        let (offset, length) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert!(
            length > 0 && offset % CHUNK == 0 && length % CHUNK == 0,
            "{e}"
        );
        // Sorted, disjoint and not adjacent: adjacent runs are joined.
        assert!(last_end.is_none_or(|end| offset > end), "{doc}");
        last_end = Some(offset + length);
        bytes += length;
        chunks.extend(offset / CHUNK..(offset + length) / CHUNK);
    }
    assert_eq!(doc["extent_count"], extents.len() as u64);
    assert_eq!(doc["changed_bytes"], bytes);
    chunks
}

async fn export_to_file(agent: &Agent, export: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    run_ok("nbdcopy", &[&agent.uri(export), out.to_str().unwrap()]).await;
    read_file(out)
}

pub(crate) async fn diff_json(
    socket: &Path,
    from: &str,
    to: Option<&str>,
    page_records: u32,
) -> Value {
    let pages = page_records.to_string();
    let mut args = vec!["diff", "vol", from];
    args.extend(to);
    args.extend(["--json", "--page-records", &pages]);
    let r = csnapctl(socket, &args).await;
    assert!(r.ok, "csnapctl {args:?}: {}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("diff JSON: {e}\n{}", r.stdout))
}

/// A standalone agent after a seeded random workload: snapshots `s0`..`s4`, each followed
/// by a round of random origin writes, and every export read back (the snapshots in
/// order, then the origin as `None`).
pub(crate) struct History {
    pub fx: Fixture,
    pub agent: Agent,
    pub seed: u64,
    pub names: Vec<String>,
    pub images: Vec<(Option<String>, Vec<u8>)>,
}

/// Builds a [`History`] for `test` (its seed printed and replayable); `None` when a
/// client tool is missing outside CI.
pub(crate) async fn random_history(test: &str) -> Option<History> {
    for tool in ["qemu-io", "nbdcopy"] {
        if !require_tool(tool) {
            return None;
        }
    }
    let seed = seed(test);
    let mut rng = StdRng::seed_from_u64(seed);
    let fx = Fixture::new(CHUNK, SIZE, 64 * MIB);
    let nbd = fx.path("d.nbd");
    let agent = Agent::start(
        &fx,
        "d",
        &["--nbd-listen", &format!("unix:{}", nbd.display())],
    )
    .await;
    let vol = agent.uri("vol");

    // s0 before any write, then a round of random writes before each next snapshot.
    let mut names: Vec<String> = Vec::new();
    for round in 0..5u8 {
        let name = format!("s{round}");
        agent.snapshot(&name).await;
        names.push(name);
        let byte = 0x10 + round;
        let writes: Vec<String> = (0..rng.gen_range(3..25))
            .map(|_| {
                let len = rng.gen_range(512..=3 * CHUNK);
                let offset = rng.gen_range(0..SIZE - len);
                format!("write -P {byte} {offset} {len}")
            })
            .collect();
        let cmds: Vec<&str> = writes.iter().map(String::as_str).collect();
        let mut args = vec!["-f", "raw", vol.as_str()];
        for c in &cmds {
            args.extend(["-c", c]);
        }
        run_ok("qemu-io", &args).await;
    }

    let mut images: Vec<(Option<String>, Vec<u8>)> = Vec::new();
    for name in &names {
        let out: PathBuf = fx.path(&format!("{name}.out"));
        images.push((
            Some(name.clone()),
            export_to_file(&agent, &format!("vol@{name}"), &out).await,
        ));
    }
    images.push((
        None,
        export_to_file(&agent, "vol", &fx.path("origin.out")).await,
    ));
    Some(History {
        fx,
        agent,
        seed,
        names,
        images,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_diff_equals_the_byte_comparison_of_the_exports() {
    // `_fx` keeps the fixture's directory (and the agent's sockets) until the end.
    let Some(History {
        fx: _fx,
        agent,
        seed,
        images,
        ..
    }) = random_history("every_diff_equals_the_byte_comparison_of_the_exports").await
    else {
        return;
    };
    let mut compared = 0;
    for (i, (from, from_bytes)) in images.iter().enumerate() {
        let Some(from) = from else { continue };
        for (to, to_bytes) in &images[i..] {
            // Small pages on some pairs: runs cross page boundaries there.
            let page_records = if compared % 2 == 0 { 16_000 } else { 3 };
            let doc = diff_json(&agent.control, from, to.as_deref(), page_records).await;
            let want = byte_diff(from_bytes, to_bytes);
            assert_eq!(
                diff_chunks(&doc),
                want,
                "seed {seed:#x}: diff {from} -> {to:?} (pages of {page_records} records)"
            );
            match to {
                Some(to) => assert_eq!(doc["to"]["snapshot"], to.as_str()),
                None => assert_eq!(doc["to"], "origin"),
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 5 * 6 / 2 + 5);

    // The text form lists the same extents, one "OFFSET LENGTH" per line.
    let r = csnapctl(&agent.control, &["diff", "vol", "s0"]).await;
    assert!(r.ok, "{}", r.stderr);
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("OFFSET LENGTH"));
    let text: BTreeSet<u64> = lines
        .flat_map(|l| {
            let (o, n) = l.split_once(' ').expect("two columns");
            let (o, n): (u64, u64) = (o.parse().unwrap(), n.parse().unwrap());
            o / CHUNK..(o + n) / CHUNK
        })
        .collect();
    assert_eq!(text, byte_diff(&images[0].1, &images[5].1));

    // A deleted snapshot in the middle: the diffs across it stay exact once its records
    // are reclaimed (records merged and shrunk).
    let r = csnapctl(
        &agent.control,
        &["snapshot", "delete", "vol", "s2", "--wait"],
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    let doc = diff_json(&agent.control, "s1", Some("s3"), 2).await;
    assert_eq!(
        diff_chunks(&doc),
        byte_diff(&images[1].1, &images[3].1),
        "seed {seed:#x}: s1 -> s3 after deleting s2"
    );

    // Errors name what was wrong, and exit 1.
    let r = csnapctl(&agent.control, &["diff", "vol", "s2", "s3"]).await;
    assert!(!r.ok);
    assert!(
        r.stderr.contains("no such snapshot") && r.stderr.contains("\"s2\""),
        "{}",
        r.stderr
    );
    let r = csnapctl(&agent.control, &["diff", "nosuch", "s1"]).await;
    assert!(!r.ok && r.stderr.contains("no such volume"), "{}", r.stderr);
    let same = diff_json(&agent.control, "s3", Some("s3"), 10).await;
    assert_eq!(same["extent_count"], 0);
}
