//! The reference model the checkers compare against: what every origin sector may hold, and
//! what every snapshot must read.
//!
//! Every sector an application writes carries its write's tag and its own sector number
//! (plus a check word), so a torn, misplaced or stale sector is recognised.

use std::collections::BTreeMap;

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
    pub id: u64,
    pub name: String,
    /// Per sector, what it may read: the origin's version at creation, plus the version
    /// before it when a crash lost that one before the chunk was copied out.
    pub allowed: Vec<Vec<u64>>,
    /// The application was told it exists (`SnapshotCreated`).
    pub reported: bool,
}

/// The whole reference: origin sectors and snapshots.
#[derive(Debug)]
pub struct Reference {
    pub origin: Vec<History>,
    pub snaps: BTreeMap<u64, SnapRecord>,
    pub next_tag: u64,
}

impl Reference {
    pub fn new(sectors: u64) -> Reference {
        Reference {
            origin: (0..sectors).map(|_| History(vec![(0, true)])).collect(),
            snaps: BTreeMap::new(),
            next_tag: 1,
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
            let a = &mut rec.allowed[sector as usize];
            if a.contains(&tag) && !a.contains(&before) {
                a.push(before);
            }
        }
        Ok(())
    }

    /// The store created snapshot `id`: it reads the origin as it is now.
    pub fn created(&mut self, id: u64, name: String) {
        let allowed = self.origin.iter().map(|h| vec![h.current()]).collect();
        self.snaps.insert(
            id,
            SnapRecord {
                id,
                name,
                allowed,
                reported: false,
            },
        );
    }
}
