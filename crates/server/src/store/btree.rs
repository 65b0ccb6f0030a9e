//! A B+tree of fixed-size records in 4 KiB blocks, used twice: the exception tree (key:
//! origin chunk, first snapshot id) and the snapshot table (key: snapshot id). Nodes are
//! updated in place through the journaled block cache, so a transaction's changes to a tree
//! are atomic.
//!
//! Node layout: 32-byte header {magic u32, crc32c u32, level u16 (0 = leaf), count u16,
//! reserved}, then `count` entries. Leaf entry: key {hi u64, lo u64} + value. Internal entry:
//! key + child block u64, where the key is a lower bound of the child's keys and every key
//! of child i is below key i+1. Empty leaves are unlinked and freed; nodes are not otherwise
//! merged (a sparse node costs space, never correctness).

use super::error::{Result, StoreError};
use super::format::*;
use super::meta::Meta;

pub(super) const NODE_HEADER: usize = 32;
const KEY_LEN: usize = 16;

/// A tree key, ordered by `hi` then `lo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Key {
    pub hi: u64,
    pub lo: u64,
}

impl Key {
    pub(super) const MIN: Key = Key { hi: 0, lo: 0 };

    pub(super) fn new(hi: u64, lo: u64) -> Key {
        Key { hi, lo }
    }
}

/// Which tree, with its node magic, value size and root in the root state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tree {
    Exceptions,
    Snapshots,
}

pub(super) const EXCEPTION_VALUE: usize = 16;
pub(super) const SNAPSHOT_VALUE: usize = 352;

impl Tree {
    pub(super) fn magic(self) -> u32 {
        match self {
            Tree::Exceptions => MAGIC_EXCEPTION_NODE,
            Tree::Snapshots => MAGIC_SNAPSHOT_NODE,
        }
    }

    pub(super) fn value_size(self) -> usize {
        match self {
            Tree::Exceptions => EXCEPTION_VALUE,
            Tree::Snapshots => SNAPSHOT_VALUE,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Tree::Exceptions => "exception tree",
            Tree::Snapshots => "snapshot table",
        }
    }

    pub(super) fn leaf_capacity(self) -> usize {
        (BLOCK - NODE_HEADER) / (KEY_LEN + self.value_size())
    }

    pub(super) fn internal_capacity(self) -> usize {
        (BLOCK - NODE_HEADER) / (KEY_LEN + 8)
    }

    fn root(self, r: &RootState) -> (u64, u32) {
        match self {
            Tree::Exceptions => (r.exception_root, r.exception_depth),
            Tree::Snapshots => (r.snapshot_root, r.snapshot_depth),
        }
    }

    fn set_root(self, r: &mut RootState, block: u64, depth: u32) {
        match self {
            Tree::Exceptions => {
                r.exception_root = block;
                r.exception_depth = depth;
            }
            Tree::Snapshots => {
                r.snapshot_root = block;
                r.snapshot_depth = depth;
            }
        }
    }
}

/// A decoded node. Leaves use `vals` (flat, `value_size` per entry), internal nodes
/// `children`.
#[derive(Clone, Debug)]
pub(super) struct Node {
    pub level: u16,
    pub keys: Vec<Key>,
    pub vals: Vec<u8>,
    pub children: Vec<u64>,
}

impl Node {
    pub(super) fn empty_leaf() -> Node {
        Node {
            level: 0,
            keys: Vec::new(),
            vals: Vec::new(),
            children: Vec::new(),
        }
    }

    pub(super) fn is_leaf(&self) -> bool {
        self.level == 0
    }

    fn val(&self, tree: Tree, i: usize) -> &[u8] {
        let v = tree.value_size();
        &self.vals[i * v..(i + 1) * v]
    }

    pub(super) fn decode(tree: Tree, block: u64, b: &[u8]) -> Result<Node> {
        let view = NodeView::parse(tree, block, b)?;
        view.check_order(tree, block)?;
        let count = view.len();
        let mut node = Node {
            level: view.level,
            keys: Vec::with_capacity(count + 1),
            vals: Vec::new(),
            children: Vec::new(),
        };
        node.keys.extend((0..count).map(|i| view.key(i)));
        if view.is_leaf() {
            node.vals.reserve(count * tree.value_size());
            for i in 0..count {
                node.vals.extend_from_slice(view.val(i));
            }
        } else {
            node.children.extend((0..count).map(|i| view.child(i)));
        }
        Ok(node)
    }

    pub(super) fn encode(&self, tree: Tree, b: &mut [u8]) {
        b.fill(0);
        put_u32(b, 0, tree.magic());
        b[8..10].copy_from_slice(&self.level.to_le_bytes());
        b[10..12].copy_from_slice(&(self.keys.len() as u16).to_le_bytes());
        let entry = if self.is_leaf() {
            KEY_LEN + tree.value_size()
        } else {
            KEY_LEN + 8
        };
        for (i, k) in self.keys.iter().enumerate() {
            let at = NODE_HEADER + i * entry;
            put_u64(b, at, k.hi);
            put_u64(b, at + 8, k.lo);
            if self.is_leaf() {
                b[at + KEY_LEN..at + entry].copy_from_slice(self.val(tree, i));
            } else {
                put_u64(b, at + KEY_LEN, self.children[i]);
            }
        }
    }

    /// Splits off the upper part of an overfull node. `appending` (the new entry went to the
    /// end) keeps the left node full, so trees filled in key order stay dense.
    fn split(&mut self, tree: Tree, appending: bool) -> Node {
        let at = if appending {
            self.keys.len() - 1
        } else {
            self.keys.len() / 2
        };
        let mut right = Node {
            level: self.level,
            keys: self.keys.split_off(at),
            vals: Vec::new(),
            children: Vec::new(),
        };
        if self.is_leaf() {
            right.vals = self.vals.split_off(at * tree.value_size());
        } else {
            right.children = self.children.split_off(at);
        }
        right
    }
}

/// A node read in place from its block, without copying the entries: a look-up (hundreds
/// per 1 MiB request with 4 KiB chunks) allocates nothing and reads only the keys its
/// binary search compares. [`NodeView::parse`] checks the header, [`NodeView::check_order`]
/// the keys: [`Node::decode`] runs both.
struct NodeView<'a> {
    b: &'a [u8],
    level: u16,
    count: usize,
    entry: usize,
    value: usize,
}

impl<'a> NodeView<'a> {
    fn parse(tree: Tree, block: u64, b: &'a [u8]) -> Result<NodeView<'a>> {
        let corrupt = |what: String| StoreError::CorruptMetadata {
            block,
            area: tree.name(),
            what,
        };
        if b.len() < BLOCK {
            return Err(corrupt(format!("node block of {} bytes", b.len())));
        }
        if get_u32(b, 0) != tree.magic() {
            return Err(corrupt(format!(
                "node magic {:#010x}, expected {:#010x}",
                get_u32(b, 0),
                tree.magic()
            )));
        }
        let level = u16::from_le_bytes([b[8], b[9]]);
        let count = u16::from_le_bytes([b[10], b[11]]) as usize;
        let cap = if level == 0 {
            tree.leaf_capacity()
        } else {
            tree.internal_capacity()
        };
        if count > cap || level > 32 {
            return Err(corrupt(format!(
                "node count {count} at level {level} exceeds capacity {cap}"
            )));
        }
        let value = if level == 0 { tree.value_size() } else { 8 };
        Ok(NodeView {
            b,
            level,
            count,
            entry: KEY_LEN + value,
            value,
        })
    }

    /// The keys ascend (a look-up's binary search relies on it). Costs a pass over the
    /// node, so look-ups run it once per block contents ([`read_view`]).
    fn check_order(&self, tree: Tree, block: u64) -> Result<()> {
        if (1..self.count).any(|i| self.key(i - 1) >= self.key(i)) {
            return Err(StoreError::CorruptMetadata {
                block,
                area: tree.name(),
                what: "node keys are not in ascending order".into(),
            });
        }
        Ok(())
    }

    fn is_leaf(&self) -> bool {
        self.level == 0
    }

    fn len(&self) -> usize {
        self.count
    }

    fn key(&self, i: usize) -> Key {
        let at = NODE_HEADER + i * self.entry;
        Key::new(get_u64(self.b, at), get_u64(self.b, at + 8))
    }

    /// A leaf's value `i`.
    fn val(&self, i: usize) -> &'a [u8] {
        let at = NODE_HEADER + i * self.entry + KEY_LEN;
        &self.b[at..at + self.value]
    }

    /// An internal node's child `i`.
    fn child(&self, i: usize) -> u64 {
        get_u64(self.b, NODE_HEADER + i * self.entry + KEY_LEN)
    }

    /// The number of leading keys for which `pred` holds (keys are ascending).
    fn partition_point(&self, pred: impl Fn(Key) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(self.key(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Index of the child whose range holds `key` (as [`child_index`]).
    fn child_index(&self, key: Key) -> usize {
        self.partition_point(|k| k <= key).saturating_sub(1)
    }
}

/// A node of `tree` read in place through the cache; its key order is checked on the
/// first read of each block contents.
fn read_view(meta: &mut Meta, tree: Tree, block: u64) -> Result<NodeView<'_>> {
    let b = meta.read_checked(block, |b| {
        NodeView::parse(tree, block, b)?.check_order(tree, block)
    })?;
    NodeView::parse(tree, block, b)
}

/// Index of the child whose range holds `key`.
fn child_index(keys: &[Key], key: Key) -> usize {
    keys.partition_point(|k| *k <= key).saturating_sub(1)
}

fn read_node(meta: &mut Meta, tree: Tree, block: u64) -> Result<Node> {
    let data = meta.read(block)?;
    Node::decode(tree, block, data)
}

fn write_node(meta: &mut Meta, tree: Tree, block: u64, node: &Node) -> Result<()> {
    let b = meta.write(block)?;
    node.encode(tree, b);
    Ok(())
}

/// Calls `f` on entries with key >= `from` in ascending order until it returns false.
pub(super) fn visit_forward(
    meta: &mut Meta,
    tree: Tree,
    from: Key,
    f: &mut dyn FnMut(Key, &[u8]) -> bool,
) -> Result<()> {
    let (root, _) = tree.root(&meta.root);
    visit_fwd(meta, tree, root, from, f, 0).map(|_| ())
}

fn visit_fwd(
    meta: &mut Meta,
    tree: Tree,
    block: u64,
    from: Key,
    f: &mut dyn FnMut(Key, &[u8]) -> bool,
    depth: u32,
) -> Result<bool> {
    let children = {
        let node = read_view(meta, tree, block)?;
        check_depth(tree, block, depth)?;
        if node.is_leaf() {
            for i in node.partition_point(|k| k < from)..node.len() {
                if !f(node.key(i), node.val(i)) {
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        node.child_index(from)..node.len()
    };
    // The node is read again per child (a cache hit): a walk rarely goes past its first.
    for i in children {
        let child = read_view(meta, tree, block)?.child(i);
        if !visit_fwd(meta, tree, child, from, f, depth + 1)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Calls `f` on entries with key <= `upto` in descending order until it returns false.
pub(super) fn visit_backward(
    meta: &mut Meta,
    tree: Tree,
    upto: Key,
    f: &mut dyn FnMut(Key, &[u8]) -> bool,
) -> Result<()> {
    let (root, _) = tree.root(&meta.root);
    visit_bwd(meta, tree, root, upto, f, 0).map(|_| ())
}

fn visit_bwd(
    meta: &mut Meta,
    tree: Tree,
    block: u64,
    upto: Key,
    f: &mut dyn FnMut(Key, &[u8]) -> bool,
    depth: u32,
) -> Result<bool> {
    let children = {
        let node = read_view(meta, tree, block)?;
        check_depth(tree, block, depth)?;
        if node.is_leaf() {
            for i in (0..node.partition_point(|k| k <= upto)).rev() {
                if !f(node.key(i), node.val(i)) {
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        if node.len() == 0 {
            return Ok(true);
        }
        (0..=node.child_index(upto)).rev()
    };
    for i in children {
        let child = read_view(meta, tree, block)?.child(i);
        if !visit_bwd(meta, tree, child, upto, f, depth + 1)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn check_depth(tree: Tree, block: u64, depth: u32) -> Result<()> {
    if depth > 32 {
        return Err(StoreError::CorruptMetadata {
            block,
            area: tree.name(),
            what: "tree deeper than 32 levels (a cycle?)".into(),
        });
    }
    Ok(())
}

/// The entry with the greatest key <= `key`.
pub(super) fn get_le(meta: &mut Meta, tree: Tree, key: Key) -> Result<Option<(Key, Vec<u8>)>> {
    let mut found = None;
    visit_backward(meta, tree, key, &mut |k, v| {
        found = Some((k, v.to_vec()));
        false
    })?;
    Ok(found)
}

/// Inserts or replaces the value under `key`.
pub(super) fn insert(meta: &mut Meta, tree: Tree, key: Key, value: &[u8]) -> Result<()> {
    debug_assert_eq!(value.len(), tree.value_size());
    let (root, depth) = tree.root(&meta.root);
    let mut path: Vec<(u64, Node, usize)> = Vec::new();
    let mut block = root;
    let mut node = read_node(meta, tree, block)?;
    while !node.is_leaf() {
        if node.keys.is_empty() || path.len() > 32 {
            return Err(StoreError::CorruptMetadata {
                block,
                area: tree.name(),
                what: "empty or too deep internal node".into(),
            });
        }
        let idx = child_index(&node.keys, key);
        if key < node.keys[idx] {
            // Only the leftmost child: lower its bound so the invariant keeps holding.
            node.keys[idx] = key;
            write_node(meta, tree, block, &node)?;
        }
        let child = node.children[idx];
        path.push((block, node, idx));
        block = child;
        node = read_node(meta, tree, block)?;
    }
    let v = tree.value_size();
    let pos = match node.keys.binary_search(&key) {
        Ok(i) => {
            node.vals[i * v..(i + 1) * v].copy_from_slice(value);
            return write_node(meta, tree, block, &node);
        }
        Err(i) => i,
    };
    node.keys.insert(pos, key);
    node.vals.splice(pos * v..pos * v, value.iter().copied());
    let mut appending = pos + 1 == node.keys.len();
    let mut capacity = tree.leaf_capacity();
    // Split upward while nodes overflow.
    loop {
        if node.keys.len() <= capacity {
            return write_node(meta, tree, block, &node);
        }
        let right = node.split(tree, appending);
        let right_block = meta.alloc_meta()?;
        let sep = right.keys[0];
        write_node(meta, tree, block, &node)?;
        let b = meta.fresh(right_block)?;
        right.encode(tree, b);
        capacity = tree.internal_capacity();
        match path.pop() {
            Some((parent_block, mut parent, idx)) => {
                parent.keys.insert(idx + 1, sep);
                parent.children.insert(idx + 1, right_block);
                appending = idx + 2 == parent.keys.len();
                block = parent_block;
                node = parent;
            }
            None => {
                let new_root = meta.alloc_meta()?;
                let top = Node {
                    level: node.level + 1,
                    keys: vec![node.keys[0], sep],
                    vals: Vec::new(),
                    children: vec![block, right_block],
                };
                let b = meta.fresh(new_root)?;
                top.encode(tree, b);
                tree.set_root(&mut meta.root, new_root, depth + 1);
                return Ok(());
            }
        }
    }
}

/// Removes `key`; returns whether it was present. Empty nodes are unlinked and freed; a
/// node left less than half full is merged with a sibling when both fit in one node (so
/// removing records gives node blocks back, not just emptier leaves); a root left with a
/// single child is replaced by it. Never allocates a node.
pub(super) fn remove(meta: &mut Meta, tree: Tree, key: Key) -> Result<bool> {
    let (root, _) = tree.root(&meta.root);
    let mut path: Vec<(u64, Node, usize)> = Vec::new();
    let mut block = root;
    let mut node = read_node(meta, tree, block)?;
    while !node.is_leaf() {
        if node.keys.is_empty() || path.len() > 32 {
            return Err(StoreError::CorruptMetadata {
                block,
                area: tree.name(),
                what: "empty or too deep internal node".into(),
            });
        }
        let idx = child_index(&node.keys, key);
        let child = node.children[idx];
        path.push((block, node, idx));
        block = child;
        node = read_node(meta, tree, block)?;
    }
    let Ok(pos) = node.keys.binary_search(&key) else {
        return Ok(false);
    };
    let v = tree.value_size();
    node.keys.remove(pos);
    node.vals.drain(pos * v..(pos + 1) * v);
    // Bottom-up: unlink empty nodes, merge sparse ones; stop at the first node whose
    // parent does not change.
    while let Some((parent_block, mut parent, idx)) = path.pop() {
        if node.keys.is_empty() {
            meta.free_meta(block)?;
            parent.keys.remove(idx);
            parent.children.remove(idx);
        } else if !merge_with_sibling(meta, tree, &mut parent, idx, block, &node)? {
            write_node(meta, tree, block, &node)?;
            return Ok(true);
        }
        block = parent_block;
        node = parent;
    }
    if node.keys.is_empty() && !node.is_leaf() {
        // The whole tree emptied: the root becomes an empty leaf.
        node.level = 0;
        let (root, _) = tree.root(&meta.root);
        tree.set_root(&mut meta.root, root, 0);
    }
    write_node(meta, tree, block, &node)?;
    collapse_root(meta, tree)?;
    Ok(true)
}

/// If `node` (child `idx` of `parent`, at `block`, changed in memory) is less than half
/// full and fits in one node with a neighbour, moves both into the left one, frees the
/// right one and drops it from `parent` (changed in memory, for the caller to write).
/// Returns false, changing nothing, otherwise.
fn merge_with_sibling(
    meta: &mut Meta,
    tree: Tree,
    parent: &mut Node,
    idx: usize,
    block: u64,
    node: &Node,
) -> Result<bool> {
    let capacity = if node.is_leaf() {
        tree.leaf_capacity()
    } else {
        tree.internal_capacity()
    };
    if node.keys.len() * 2 >= capacity {
        return Ok(false);
    }
    let sibling_idx = if idx > 0 {
        idx - 1
    } else if idx + 1 < parent.children.len() {
        idx + 1
    } else {
        return Ok(false);
    };
    let sibling_block = parent.children[sibling_idx];
    let sibling = read_node(meta, tree, sibling_block)?;
    if sibling.level != node.level {
        return Err(StoreError::CorruptMetadata {
            block: sibling_block,
            area: tree.name(),
            what: format!(
                "level {} next to a level {} sibling",
                sibling.level, node.level
            ),
        });
    }
    if sibling.keys.len() + node.keys.len() > capacity {
        return Ok(false);
    }
    let (mut left, right, left_block, right_block, right_idx) = if sibling_idx < idx {
        (sibling, node.clone(), sibling_block, block, idx)
    } else {
        (node.clone(), sibling, block, sibling_block, sibling_idx)
    };
    if let (Some(a), Some(b)) = (left.keys.last(), right.keys.first()) {
        if a >= b {
            return Err(StoreError::CorruptMetadata {
                block: right_block,
                area: tree.name(),
                what: "sibling nodes' keys overlap".into(),
            });
        }
    }
    left.keys.extend(right.keys);
    left.vals.extend(right.vals);
    left.children.extend(right.children);
    write_node(meta, tree, left_block, &left)?;
    meta.free_meta(right_block)?;
    parent.keys.remove(right_idx);
    parent.children.remove(right_idx);
    Ok(true)
}

/// Replaces an internal root that has one child by that child (repeatedly).
fn collapse_root(meta: &mut Meta, tree: Tree) -> Result<()> {
    for _ in 0..=32 {
        let (root, depth) = tree.root(&meta.root);
        let node = read_node(meta, tree, root)?;
        if node.is_leaf() || node.children.len() != 1 {
            return Ok(());
        }
        if node.children[0] == root {
            break;
        }
        tree.set_root(&mut meta.root, node.children[0], depth.saturating_sub(1));
        meta.free_meta(root)?;
    }
    let (root, _) = tree.root(&meta.root);
    Err(StoreError::CorruptMetadata {
        block: root,
        area: tree.name(),
        what: "a chain of single-child roots that does not end (a cycle?)".into(),
    })
}

/// Called by `walk` with (block, node, lower bound, upper bound) of every node.
pub(super) type NodeVisitor<'a> = dyn FnMut(u64, &Node, Key, Option<Key>) -> Result<()> + 'a;

/// Walks every node (for the checker): calls `f(block, node, low, high)` where keys of the
/// node must lie in `[low, high)`.
pub(super) fn walk(meta: &mut Meta, tree: Tree, f: &mut NodeVisitor<'_>) -> Result<()> {
    let (root, depth) = tree.root(&meta.root);
    let node = read_node(meta, tree, root)?;
    if u32::from(node.level) != depth {
        return Err(StoreError::CorruptMetadata {
            block: root,
            area: tree.name(),
            what: format!("root level {} but recorded depth {depth}", node.level),
        });
    }
    walk_node(meta, tree, root, node, Key::MIN, None, f)
}

fn walk_node(
    meta: &mut Meta,
    tree: Tree,
    block: u64,
    node: Node,
    low: Key,
    high: Option<Key>,
    f: &mut NodeVisitor<'_>,
) -> Result<()> {
    f(block, &node, low, high)?;
    if node.is_leaf() {
        return Ok(());
    }
    for i in 0..node.children.len() {
        let child_low = node.keys[i];
        let child_high = node.keys.get(i + 1).copied().or(high);
        let child = read_node(meta, tree, node.children[i])?;
        if child.level + 1 != node.level {
            return Err(StoreError::CorruptMetadata {
                block: node.children[i],
                area: tree.name(),
                what: format!("level {} under a level {} node", child.level, node.level),
            });
        }
        walk_node(
            meta,
            tree,
            node.children[i],
            child,
            child_low,
            child_high,
            f,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FormatOptions, MemDevice, OpenOptions, Store};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    fn store() -> Store {
        let dev = MemDevice::new(64 << 20);
        Store::format(
            &dev,
            &FormatOptions {
                chunk_size: 4096,
                origin_size: 1 << 30,
                now: 0,
                uuid: Some([3; 16]),
            },
        )
        .unwrap();
        Store::open(Arc::new(dev), OpenOptions::default()).unwrap()
    }

    /// Walks the tree checking every node's keys against its bounds and levels; returns
    /// the keys in order.
    fn keys_checked(meta: &mut Meta) -> Vec<Key> {
        let mut keys = Vec::new();
        walk(meta, Tree::Exceptions, &mut |block, node, low, high| {
            for k in &node.keys {
                assert!(*k >= low, "block {block}: key {k:?} below {low:?}");
                assert!(
                    high.is_none_or(|h| *k < h),
                    "block {block}: key {k:?} not below {high:?}"
                );
            }
            if node.is_leaf() {
                keys.extend_from_slice(&node.keys);
            }
            Ok(())
        })
        .unwrap();
        keys
    }

    /// Random inserts and removes over a three-level tree: merges (of leaves and internal
    /// nodes) keep the keys, the bounds and the free count right, and removing every key
    /// gives back every node.
    #[test]
    fn removals_merge_nodes_and_keep_the_tree_valid() {
        let mut s = store();
        let meta = &mut s.meta;
        let start_free = meta.root.meta_free;
        let mut rng = StdRng::seed_from_u64(7);
        let mut model = BTreeSet::new();
        let value = [0u8; EXCEPTION_VALUE];
        let mut ops = 0;
        // Commits now and then: a transaction holds at most MAX_TX_BLOCKS blocks.
        fn step(meta: &mut Meta, ops: &mut u32) {
            *ops += 1;
            if (*ops).is_multiple_of(40) {
                meta.commit().unwrap();
            }
        }
        // Random keys: leaves split in the middle (about half full), 30,000 keys need
        // more than 169 leaves, so the root is two levels up.
        while model.len() < 30_000 {
            let k = Key::new(rng.gen_range(0..1_000_000), rng.gen_range(0..4));
            insert(meta, Tree::Exceptions, k, &value).unwrap();
            model.insert(k);
            step(meta, &mut ops);
        }
        assert!(
            meta.root.exception_depth >= 2,
            "{}",
            meta.root.exception_depth
        );
        let used_full = start_free - meta.root.meta_free;
        // Remove 90% at random, checking now and then.
        let mut all: Vec<Key> = model.iter().copied().collect();
        while model.len() > 3_000 {
            let i = rng.gen_range(0..all.len());
            let k = all.swap_remove(i);
            assert!(remove(meta, Tree::Exceptions, k).unwrap());
            model.remove(&k);
            step(meta, &mut ops);
            if model.len() % 5_000 == 0 {
                let keys = keys_checked(meta);
                assert_eq!(keys, model.iter().copied().collect::<Vec<_>>());
            }
        }
        meta.commit().unwrap();
        let keys = keys_checked(meta);
        assert_eq!(keys, model.iter().copied().collect::<Vec<_>>());
        let used_sparse = start_free - meta.root.meta_free;
        assert!(
            used_sparse * 4 < used_full,
            "a tenth of the keys still hold {used_sparse} of {used_full} nodes"
        );
        for k in model.iter().copied().collect::<Vec<_>>() {
            assert!(remove(meta, Tree::Exceptions, k).unwrap());
            step(meta, &mut ops);
        }
        meta.commit().unwrap();
        assert!(keys_checked(meta).is_empty());
        assert_eq!(meta.root.exception_depth, 0);
        assert_eq!(meta.root.meta_free, start_free, "every node given back");
        let report = s.check().unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
    }

    /// Look-ups read nodes in place: on a three-level tree `get_le` and `visit_forward`
    /// agree with a model, and keys out of order are found after the block changes, even
    /// though the block was read (and checked) before.
    #[test]
    fn in_place_look_ups_agree_with_a_model_and_notice_unordered_keys() {
        let mut s = store();
        let meta = &mut s.meta;
        let mut rng = StdRng::seed_from_u64(11);
        let mut model = BTreeMap::new();
        let mut ops = 0;
        while model.len() < 30_000 {
            let k = Key::new(rng.gen_range(0..1_000_000), rng.gen_range(0..4));
            let mut value = [0u8; EXCEPTION_VALUE];
            value[..8].copy_from_slice(&k.hi.to_le_bytes());
            value[8] = k.lo as u8;
            insert(meta, Tree::Exceptions, k, &value).unwrap();
            model.insert(k, value.to_vec());
            ops += 1;
            if ops % 40 == 0 {
                meta.commit().unwrap();
            }
        }
        meta.commit().unwrap();
        assert!(meta.root.exception_depth >= 2);
        for _ in 0..2_000 {
            let probe = Key::new(rng.gen_range(0..1_000_001), rng.gen_range(0..5));
            let expected = model
                .range(..=probe)
                .next_back()
                .map(|(k, v)| (*k, v.clone()));
            assert_eq!(
                get_le(meta, Tree::Exceptions, probe).unwrap(),
                expected,
                "{probe:?}"
            );
            let mut seen = Vec::new();
            visit_forward(meta, Tree::Exceptions, probe, &mut |k, v| {
                seen.push((k, v.to_vec()));
                seen.len() < 5
            })
            .unwrap();
            let expected: Vec<_> = model
                .range(probe..)
                .take(5)
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            assert_eq!(seen, expected, "{probe:?}");
        }
        // Swap the first two keys of the leaf holding the smallest key, as a bad write would.
        let smallest = *model.keys().next().unwrap();
        let mut leaf = meta.root.exception_root;
        loop {
            let node = read_node(meta, Tree::Exceptions, leaf).unwrap();
            if node.is_leaf() {
                break;
            }
            leaf = node.children[0];
        }
        let b = meta.write(leaf).unwrap();
        let first = b[NODE_HEADER..NODE_HEADER + KEY_LEN].to_vec();
        let second_at = NODE_HEADER + KEY_LEN + EXCEPTION_VALUE;
        let second = b[second_at..second_at + KEY_LEN].to_vec();
        b[NODE_HEADER..NODE_HEADER + KEY_LEN].copy_from_slice(&second);
        b[second_at..second_at + KEY_LEN].copy_from_slice(&first);
        let err = get_le(meta, Tree::Exceptions, smallest).unwrap_err();
        assert!(err.to_string().contains("not in ascending order"), "{err}");
    }
}
