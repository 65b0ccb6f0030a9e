//! The consistency checker: walks both trees and both bitmaps and reports every
//! disagreement. Used by tests after every crash, and by `csnapctl check`.

use super::btree::{self, Tree};
use super::error::Result;
use super::meta::Space;
use super::{ExceptionRecord, SnapState, SnapshotRecord, Store};
use csnap_proto::SnapId;
use std::collections::{BTreeMap, HashMap, HashSet};

/// What the checker found. `problems` is empty for a consistent store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Everything found wrong, one line each.
    pub problems: Vec<String>,
    /// Exception records in the tree.
    pub exception_records: u64,
    /// Data chunks in use.
    pub data_chunks_used: u64,
    /// Metadata blocks in use.
    pub meta_blocks_used: u64,
    /// Snapshots in the table.
    pub snapshots: u64,
}

impl CheckReport {
    /// Whether nothing was found wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Stop collecting after this many problems (a badly damaged store would list millions).
const MAX_PROBLEMS: usize = 100;

pub(super) fn run(store: &mut Store) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut problems = Vec::new();
    let geo = store.meta.geo;
    let origin_chunks = geo.origin_chunks();
    let mut node_blocks: HashSet<u64> = HashSet::new();

    // Exception tree structure and records.
    let mut records: Vec<ExceptionRecord> = Vec::new();
    btree::walk(
        &mut store.meta,
        Tree::Exceptions,
        &mut |block, node, low, high| {
            if !geo.is_meta_block(block) {
                problems.push(format!("exception node {block} is outside the node area"));
            }
            if !node_blocks.insert(block) {
                problems.push(format!("node block {block} is linked twice"));
            }
            for k in &node.keys {
                if *k < low || high.is_some_and(|h| *k >= h) {
                    problems.push(format!(
                        "exception node {block}: key {k:?} outside its range"
                    ));
                }
            }
            if node.is_leaf() {
                for (i, k) in node.keys.iter().enumerate() {
                    let v =
                        &node.vals[i * btree::EXCEPTION_VALUE..(i + 1) * btree::EXCEPTION_VALUE];
                    records.push(ExceptionRecord::decode(*k, v));
                }
            }
            Ok(())
        },
    )?;
    report.exception_records = records.len() as u64;

    // Per record and per chunk rules.
    let mut owners: HashMap<u64, (u64, u64)> = HashMap::new(); // store chunk -> (origin chunk, refs)
    let mut shared_flags: HashMap<u64, bool> = HashMap::new();
    let mut i = 0;
    while i < records.len() {
        let chunk = records[i].chunk;
        let mut end = i;
        while end < records.len() && records[end].chunk == chunk {
            end += 1;
        }
        let group = &records[i..end];
        if chunk >= origin_chunks {
            problems.push(format!(
                "records for origin chunk {chunk}, beyond the origin"
            ));
        }
        // Walk the chunk's runs in order: disjoint, and FILL records' promises hold.
        let mut covered_to = SnapId(0); // highest id covered so far (0: none)
        let mut uncovered_live_below: Option<SnapId> = None;
        for r in group {
            if r.first < SnapId::FIRST || r.first > r.last {
                problems.push(format!(
                    "chunk {chunk}: empty or invalid run {}..={}",
                    r.first, r.last
                ));
            }
            if r.first <= covered_to && covered_to >= SnapId::FIRST {
                problems.push(format!(
                    "chunk {chunk}: run {}..={} overlaps the previous run",
                    r.first, r.last
                ));
            }
            let next_uncovered = covered_to.next();
            if uncovered_live_below.is_none() && r.first > next_uncovered {
                uncovered_live_below = store.live.range(next_uncovered..r.first).next().copied();
            }
            if r.fill {
                if let Some(id) = uncovered_live_below {
                    problems.push(format!(
                        "chunk {chunk}: FILL run {}..={} but live snapshot {id} below it is uncovered",
                        r.first, r.last
                    ));
                }
            }
            covered_to = covered_to.max(r.last);
            if !geo.is_data_chunk(r.store_chunk) {
                problems.push(format!(
                    "chunk {chunk}: run {}..={} points at {} outside the data area",
                    r.first, r.last, r.store_chunk
                ));
            }
            let entry = owners.entry(r.store_chunk).or_insert((chunk, 0));
            if entry.0 != chunk {
                problems.push(format!(
                    "store chunk {} is named by origin chunks {} and {chunk}",
                    r.store_chunk, entry.0
                ));
            }
            entry.1 += 1;
            *shared_flags.entry(r.store_chunk).or_insert(true) &= r.shared;
        }
        i = end;
    }
    for (store_chunk, (chunk, refs)) in &owners {
        if *refs > 1 && shared_flags.get(store_chunk) != Some(&true) {
            problems.push(format!(
                "store chunk {store_chunk} is named by {refs} runs of origin chunk {chunk} without the SHARED flag"
            ));
        }
    }

    // Data bitmap agrees with the references.
    let data_bits = store.meta.all_bits(Space::Data)?;
    let mut used = 0u64;
    for (index, bit) in data_bits.iter().enumerate() {
        let chunk = geo.data_start_chunk + index as u64;
        let referenced = owners.contains_key(&chunk);
        if *bit {
            used += 1;
        }
        if *bit && !referenced {
            problems.push(format!(
                "store chunk {chunk} is allocated but nothing names it (leak)"
            ));
        } else if !*bit && referenced {
            problems.push(format!("store chunk {chunk} is in use but marked free"));
        }
    }
    report.data_chunks_used = used;
    let data_free = geo.data_chunks - used;
    if store.meta.root.data_free != data_free {
        problems.push(format!(
            "free data chunk count is {} but the bitmap has {data_free} free",
            store.meta.root.data_free
        ));
    }

    // Snapshot table agrees with memory.
    let mut table: BTreeMap<SnapId, SnapshotRecord> = BTreeMap::new();
    let mut decode_errors = Vec::new();
    btree::walk(
        &mut store.meta,
        Tree::Snapshots,
        &mut |block, node, low, high| {
            if !geo.is_meta_block(block) {
                problems.push(format!("snapshot node {block} is outside the node area"));
            }
            if !node_blocks.insert(block) {
                problems.push(format!("node block {block} is linked twice"));
            }
            for k in &node.keys {
                if *k < low || high.is_some_and(|h| *k >= h) {
                    problems.push(format!(
                        "snapshot node {block}: key {k:?} outside its range"
                    ));
                }
            }
            if node.is_leaf() {
                for (i, k) in node.keys.iter().enumerate() {
                    let v = &node.vals[i * btree::SNAPSHOT_VALUE..(i + 1) * btree::SNAPSHOT_VALUE];
                    match SnapshotRecord::decode(block, *k, v) {
                        Ok(r) => {
                            table.insert(r.id, r);
                        }
                        Err(e) => decode_errors.push(e.to_string()),
                    }
                }
            }
            Ok(())
        },
    )?;
    problems.extend(decode_errors);
    report.snapshots = table.len() as u64;
    if table != store.snaps {
        problems.push(format!(
            "snapshot table ({} rows) differs from the loaded snapshot list ({} rows)",
            table.len(),
            store.snaps.len()
        ));
    }
    let live_in_table: Vec<SnapId> = table
        .values()
        .filter(|r| r.state == SnapState::Live)
        .map(|r| r.id)
        .collect();
    if live_in_table != store.live.iter().copied().collect::<Vec<_>>() {
        problems.push("live snapshot index differs from the snapshot table".into());
    }
    if let Some(max) = table.keys().next_back() {
        if max.0 >= store.meta.root.next_snap_id {
            problems.push(format!(
                "snapshot id {max} is not below the id counter {}",
                store.meta.root.next_snap_id
            ));
        }
    }

    // Metadata bitmap agrees with the node blocks.
    let meta_bits = store.meta.all_bits(Space::Meta)?;
    let mut meta_used = 0u64;
    for (index, bit) in meta_bits.iter().enumerate() {
        let block = geo.meta_start + index as u64;
        if *bit {
            meta_used += 1;
        }
        if *bit != node_blocks.contains(&block) {
            problems.push(format!(
                "node block {block} is {} in the bitmap but {} by a tree",
                if *bit { "allocated" } else { "free" },
                if node_blocks.contains(&block) {
                    "used"
                } else {
                    "not used"
                }
            ));
        }
    }
    report.meta_blocks_used = meta_used;
    if store.meta.root.meta_free != geo.meta_blocks - meta_used {
        problems.push(format!(
            "free metadata block count is {} but the bitmap has {} free",
            store.meta.root.meta_free,
            geo.meta_blocks - meta_used
        ));
    }
    super::rollback::check(store, &mut problems);
    problems.truncate(MAX_PROBLEMS);
    report.problems = problems;
    Ok(report)
}
