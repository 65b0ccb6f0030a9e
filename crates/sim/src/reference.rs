//! The reference model the checkers compare against: what every origin sector may hold, and
//! what every snapshot must read.
//!
//! Every sector an application writes carries its write's tag and its own sector number
//! (plus a check word), so a torn, misplaced or stale sector is recognised.

use std::collections::BTreeMap;

use csnap_proto::SnapId;

use crate::disk::SECT;

pub fn sector_bytes(tag: u64, sector: u64) -> Vec<u8> {
    let mut b = vec![0u8; SECT as usize];
    b[..8].copy_from_slice(&tag.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    let check = tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sector ^ 0x5eed;
    b[16..24].copy_from_slice(&check.to_le_bytes());
    let fill = (tag.wrapping_mul(31) ^ sector) as u8;
    for x in &mut b[24..] {
        *x = fill;
    }
    b
}

/// The tag in a sector that should be origin sector `sector`, or why it is not one.
pub fn decode(buf: &[u8], sector: u64) -> Result<u64, String> {
    if buf.len() < 24 {
        return Err(format!("short sector ({} bytes)", buf.len()));
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    let tag = word(0);
    if buf == sector_bytes(tag, sector).as_slice() {
        return Ok(tag);
    }
    Err(format!(
        "garbage (tag field {tag}, sector field {}, first bytes {:02x?})",
        word(1),
        &buf[..24]
    ))
}

/// The (tag, volume sector) an application sector carries, if it is one.
pub fn decode_any(buf: &[u8]) -> Option<(u64, u64)> {
    let sector = u64::from_le_bytes(buf.get(8..16)?.try_into().ok()?);
    decode(buf, sector).ok().map(|tag| (tag, sector))
}

/// Versions of one origin sector, oldest first: (tag, promised durable). Versions a crash
/// lost are removed.
#[derive(Clone, Debug)]
pub struct History(pub Vec<(u64, bool)>);

impl History {
    /// What the device may hold now: the last promised version or any later one.
    pub fn allowed(&self) -> Vec<u64> {
        let from = self.0.iter().rposition(|(_, p)| *p).unwrap_or(0);
        self.0[from..].iter().map(|(t, _)| *t).collect()
    }

    pub fn current(&self) -> u64 {
        self.0.last().map_or(0, |(t, _)| *t)
    }
}

/// A snapshot as the checker saw the store create it.
#[derive(Clone, Debug)]
pub struct SnapRecord {
    pub id: SnapId,
    pub name: String,
    /// Per sector, what it read at creation: the origin's version then, plus the version
    /// before it when a crash lost that one before the chunk was copied out.
    pub base: Vec<Vec<u64>>,
    /// Its own writes that reached the store, per sector, oldest first: (tag, promised
    /// durable). Versions a crash lost are removed.
    pub writes: BTreeMap<u64, Vec<(u64, bool)>>,
    /// The application was told it exists (`SnapshotCreated`).
    pub reported: bool,
    /// The application asked for its deletion (which may take effect unacknowledged).
    pub delete_asked: bool,
    /// An engine acknowledged its deletion (`SnapshotDeleted`, sent once committed).
    pub deleted: bool,
}

impl SnapRecord {
    /// What sector `s` of the snapshot may read now: its last own write promised durable
    /// or a later one; without one, what it read at creation or any own write since.
    pub fn allowed(&self, s: u64) -> Vec<u64> {
        let base = self.base.get(s as usize).cloned().unwrap_or_default();
        let Some(w) = self.writes.get(&s).filter(|w| !w.is_empty()) else {
            return base;
        };
        match w.iter().rposition(|(_, p)| *p) {
            Some(from) => w[from..].iter().map(|(t, _)| *t).collect(),
            None => base.into_iter().chain(w.iter().map(|(t, _)| *t)).collect(),
        }
    }

    /// Whether `tag` is one of its own writes to sector `s` (still on the device).
    pub fn wrote(&self, s: u64, tag: u64) -> bool {
        self.writes
            .get(&s)
            .is_some_and(|w| w.iter().any(|(t, _)| *t == tag))
    }
}

/// What a snapshot read may return, fixed when the read was asked: for each sector, what
/// it could read then; it may also read what it could read when the data arrives, or any
/// own write of the snapshot that landed meanwhile (`tag_floor`: tags from then on).
#[derive(Clone, Debug, Default)]
pub struct ReadWindow {
    pub then: Vec<Vec<u64>>,
    pub tag_floor: u64,
}

/// The whole reference: origin sectors and snapshots.
#[derive(Debug)]
pub struct Reference {
    pub origin: Vec<History>,
    pub snaps: BTreeMap<SnapId, SnapRecord>,
    pub next_tag: u64,
    /// Snapshot writes by tag: (snapshot, first sector, sectors).
    pub snap_writes: BTreeMap<u64, (SnapId, u64, u64)>,
}

impl Reference {
    pub fn new(sectors: u64) -> Reference {
        Reference {
            origin: (0..sectors).map(|_| History(vec![(0, true)])).collect(),
            snaps: BTreeMap::new(),
            next_tag: 1,
            snap_writes: BTreeMap::new(),
        }
    }

    pub fn tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    /// A write of `tag` reached the device (not yet promised durable).
    pub fn written(&mut self, tag: u64, first: u64, n: u64, promised: bool) {
        for s in first..first + n {
            self.origin[s as usize].0.push((tag, promised));
        }
    }

    /// A flush completed after the write of `tag`: it is promised durable.
    pub fn promise(&mut self, tag: u64, first: u64, n: u64) {
        for s in first..first + n {
            if let Some(v) = self.origin[s as usize]
                .0
                .iter_mut()
                .rev()
                .find(|(t, _)| *t == tag)
            {
                v.1 = true;
            }
        }
    }

    /// A crash lost this version of a sector. A promised version is never lost: that is
    /// a finding, returned as an error.
    pub fn lost(&mut self, sector: u64, tag: u64) -> Result<(), String> {
        let h = &mut self.origin[sector as usize];
        let Some(pos) = h.0.iter().rposition(|(t, _)| *t == tag) else {
            return Ok(());
        };
        if h.0[pos].1 {
            return Err(format!(
                "origin sector {sector}: write {tag} was promised durable but a crash lost it"
            ));
        }
        let before = if pos > 0 { h.0[pos - 1].0 } else { 0 };
        h.0.remove(pos);
        for rec in self.snaps.values_mut() {
            let a = &mut rec.base[sector as usize];
            if a.contains(&tag) && !a.contains(&before) {
                a.push(before);
            }
        }
        Ok(())
    }

    /// The store created snapshot `id`: it reads the origin as it is now.
    pub fn created(&mut self, id: SnapId, name: String) {
        let base = self.origin.iter().map(|h| vec![h.current()]).collect();
        self.snaps.insert(
            id,
            SnapRecord {
                id,
                name,
                base,
                writes: BTreeMap::new(),
                reported: false,
                delete_asked: false,
                deleted: false,
            },
        );
    }

    /// A read of `snap` at sectors `first..first + n` is asked now.
    pub fn read_window(&self, snap: SnapId, first: u64, n: u64) -> ReadWindow {
        let then = match self.snaps.get(&snap) {
            Some(rec) => (first..first + n).map(|s| rec.allowed(s)).collect(),
            None => Vec::new(),
        };
        ReadWindow {
            then,
            tag_floor: self.next_tag,
        }
    }

    /// A snapshot write of `tag` reached the store device.
    pub fn snap_written(&mut self, snap: SnapId, tag: u64, first: u64, n: u64, promised: bool) {
        self.snap_writes.insert(tag, (snap, first, n));
        if let Some(rec) = self.snaps.get_mut(&snap) {
            for s in first..first + n {
                rec.writes.entry(s).or_default().push((tag, promised));
            }
        }
    }

    /// A flush of the writing client completed after the snapshot write of `tag`.
    pub fn snap_promise(&mut self, snap: SnapId, tag: u64, first: u64, n: u64) {
        if let Some(rec) = self.snaps.get_mut(&snap) {
            for s in first..first + n {
                if let Some(v) = rec
                    .writes
                    .get_mut(&s)
                    .and_then(|w| w.iter_mut().rev().find(|(t, _)| *t == tag))
                {
                    v.1 = true;
                }
            }
        }
    }

    /// A crash lost snapshot write `tag` at volume sector `sector`. A promised one is a
    /// finding (unless its snapshot was deleted since: then nobody may read it).
    pub fn snap_lost(&mut self, sector: u64, tag: u64) -> Result<(), String> {
        let Some(&(snap, first, n)) = self.snap_writes.get(&tag) else {
            return Ok(());
        };
        if !(first..first + n).contains(&sector) {
            return Ok(());
        }
        let Some(rec) = self.snaps.get_mut(&snap) else {
            return Ok(());
        };
        let Some(w) = rec.writes.get_mut(&sector) else {
            return Ok(());
        };
        let Some(pos) = w.iter().rposition(|(t, _)| *t == tag) else {
            return Ok(());
        };
        if w[pos].1 && !rec.deleted {
            return Err(format!(
                "snapshot {snap} sector {sector}: write {tag} was promised durable but a crash lost it"
            ));
        }
        w.remove(pos);
        Ok(())
    }
}
