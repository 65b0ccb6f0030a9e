//! The shared devices: one origin and one store that every node reaches (a SAN, or the
//! shared files of the real cluster tests), with volatile write caches.
//!
//! Every write is tagged by the node that wrote it. Reads from any node see the newest
//! version of a sector at once. A flush by a node makes that node's completed writes
//! durable (and with them everything older on those sectors). When a node crashes (power
//! off, fenced, killed), each of its unflushed writes is lost or kept, per write, chosen by
//! the world's RNG: a write may survive while an earlier one of the same node is lost.
//! Writes by other nodes are untouched. Devices never fail otherwise: the world is about
//! membership, failover and leases, not about I/O errors (`crates/server/tests/engine/powercut.rs`
//! covers power cuts of the whole rack).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use cpg_glue::NodeId;
use csnap_blockdev::client::DataDevice;
use csnap_server::store::BlockDevice;
use rand::rngs::StdRng;
use rand::Rng;

/// Sector size of the model.
pub const SECT: u64 = 512;

/// Which device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dev {
    Origin = 0,
    Store = 1,
}

/// One unflushed version of a sector.
#[derive(Clone, Debug)]
struct Version {
    op: u64,
    node: NodeId,
    data: Box<[u8]>,
}

#[derive(Debug)]
struct DiskState {
    durable: Vec<u8>,
    cached: BTreeMap<u64, Vec<Version>>,
}

#[derive(Debug)]
struct RackState {
    disks: [DiskState; 2],
    ops: u64,
}

/// Both shared devices.
#[derive(Clone, Debug)]
pub struct Rack {
    state: Arc<Mutex<RackState>>,
    lens: [u64; 2],
}

/// A sector version a crash lost: (device, sector, its contents).
pub type Lost = (Dev, u64, Box<[u8]>);

impl Rack {
    pub fn new(origin: Vec<u8>, store: Vec<u8>) -> Rack {
        let lens = [origin.len() as u64, store.len() as u64];
        let disk = |durable| DiskState {
            durable,
            cached: BTreeMap::new(),
        };
        Rack {
            state: Arc::new(Mutex::new(RackState {
                disks: [disk(origin), disk(store)],
                ops: 0,
            })),
            lens,
        }
    }

    fn lock(&self) -> MutexGuard<'_, RackState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device as node `node` reaches it.
    pub fn disk(&self, dev: Dev, node: NodeId) -> Disk {
        Disk {
            rack: self.clone(),
            dev,
            node,
        }
    }

    /// Node `node` crashed: each of its unflushed writes is lost or kept (per write, with a
    /// keep probability chosen per crash). Returns the lost versions (device, sector,
    /// contents) so the reference model can forget the application's (origin writes and
    /// snapshot writes; the server's own store writes do not decode as the application's).
    pub fn crash(&self, node: NodeId, rng: &mut StdRng) -> Vec<Lost> {
        let keep = match rng.gen_range(0..4) {
            0 => 0.0,
            1 => 1.0,
            _ => rng.gen_range(0.0..1.0),
        };
        let mut st = self.lock();
        let mut verdict: BTreeMap<u64, bool> = BTreeMap::new();
        let mut lost = Vec::new();
        for (d, disk) in st.disks.iter_mut().enumerate() {
            for (sector, versions) in disk.cached.iter_mut() {
                versions.retain(|v| {
                    if v.node != node {
                        return true;
                    }
                    let kept = *verdict.entry(v.op).or_insert_with(|| rng.gen_bool(keep));
                    if !kept {
                        let dev = if d == Dev::Origin as usize {
                            Dev::Origin
                        } else {
                            Dev::Store
                        };
                        lost.push((dev, *sector, v.data.clone()));
                    }
                    kept
                });
            }
            disk.cached.retain(|_, v| !v.is_empty());
        }
        lost
    }

    /// Unflushed versions held for `node` (for statistics).
    pub fn unflushed_of(&self, node: NodeId) -> usize {
        let st = self.lock();
        st.disks
            .iter()
            .flat_map(|d| d.cached.values().flatten())
            .filter(|v| v.node == node)
            .count()
    }

    /// Reads as any node would (the newest version).
    pub fn read(&self, dev: Dev, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(dev, buf.len(), offset)?;
        let st = self.lock();
        let d = &st.disks[dev as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let sector = pos / SECT;
            let within = (pos % SECT) as usize;
            let n = (SECT as usize - within).min(buf.len() - done);
            match d.cached.get(&sector).and_then(|v| v.last()) {
                Some(v) => buf[done..done + n].copy_from_slice(&v.data[within..within + n]),
                None => buf[done..done + n].copy_from_slice(&d.durable[pos as usize..][..n]),
            }
            done += n;
        }
        Ok(())
    }

    fn check(&self, dev: Dev, len: usize, offset: u64) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.lens[dev as usize] => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes at {offset} beyond {} ({dev:?})",
                    self.lens[dev as usize]
                ),
            )),
        }
    }

    fn write(&self, dev: Dev, node: NodeId, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(dev, buf.len(), offset)?;
        let mut st = self.lock();
        st.ops += 1;
        let op = st.ops;
        let d = &mut st.disks[dev as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let sector = pos / SECT;
            let within = (pos % SECT) as usize;
            let n = (SECT as usize - within).min(buf.len() - done);
            let base = (sector * SECT) as usize;
            let mut data: Box<[u8]> = match d.cached.get(&sector).and_then(|v| v.last()) {
                Some(v) => v.data.clone(),
                None => d.durable[base..base + SECT as usize].into(),
            };
            data[within..within + n].copy_from_slice(&buf[done..done + n]);
            d.cached
                .entry(sector)
                .or_default()
                .push(Version { op, node, data });
            done += n;
        }
        Ok(())
    }

    /// A flush by `node`: its writes reach the medium, and with each the older versions of
    /// the same sector (whoever wrote them) are superseded.
    fn flush(&self, dev: Dev, node: NodeId) -> io::Result<()> {
        let mut st = self.lock();
        let d = &mut st.disks[dev as usize];
        let mut emptied = BTreeSet::new();
        for (sector, versions) in d.cached.iter_mut() {
            if let Some(last) = versions.iter().rposition(|v| v.node == node) {
                let base = (*sector * SECT) as usize;
                d.durable[base..base + SECT as usize].copy_from_slice(&versions[last].data);
                versions.drain(..=last);
                if versions.is_empty() {
                    emptied.insert(*sector);
                }
            }
        }
        for s in emptied {
            d.cached.remove(&s);
        }
        Ok(())
    }
}

/// One device as one node reaches it. Implements the server's `BlockDevice` and the
/// client's `DataDevice`.
#[derive(Clone)]
pub struct Disk {
    rack: Rack,
    dev: Dev,
    node: NodeId,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shared {:?} device from {}", self.dev, self.node)
    }
}

impl Disk {
    fn label(&self) -> String {
        format!("{:?}@{}", self.dev, self.node)
    }
}

impl BlockDevice for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.rack.read(self.dev, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.rack.write(self.dev, self.node, buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.rack.flush(self.dev, self.node)
    }
    fn len(&self) -> u64 {
        self.rack.lens[self.dev as usize]
    }
    fn name(&self) -> String {
        self.label()
    }
}

impl DataDevice for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.rack.read(self.dev, buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.rack.write(self.dev, self.node, data, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.rack.flush(self.dev, self.node)
    }
    fn len(&self) -> u64 {
        self.rack.lens[self.dev as usize]
    }
    fn name(&self) -> String {
        self.label()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_crash_loses_only_that_nodes_unflushed_writes() {
        let rack = Rack::new(vec![0; 4096], vec![0; 4096]);
        let (a, b) = (NodeId(1), NodeId(2));
        let da = rack.disk(Dev::Origin, a);
        let db = rack.disk(Dev::Origin, b);
        BlockDevice::write_at(&da, &[1; 512], 0).unwrap();
        BlockDevice::flush(&da).unwrap();
        BlockDevice::write_at(&da, &[2; 512], 0).unwrap();
        BlockDevice::write_at(&db, &[3; 512], 512).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        // Crash until one loses the write (keep probability is random per crash).
        loop {
            let r2 = Rack::new(vec![0; 4096], vec![0; 4096]);
            let d = r2.disk(Dev::Origin, a);
            BlockDevice::write_at(&d, &[2; 512], 0).unwrap();
            if !r2.crash(a, &mut rng).is_empty() {
                let mut buf = [9u8; 512];
                r2.read(Dev::Origin, &mut buf, 0).unwrap();
                assert_eq!(buf, [0; 512]);
                break;
            }
        }
        let lost = rack.crash(b, &mut rng);
        let mut buf = [0u8; 512];
        rack.read(Dev::Origin, &mut buf, 0).unwrap();
        assert_eq!(
            buf, [2; 512],
            "node 2's crash does not touch node 1's writes"
        );
        rack.read(Dev::Origin, &mut buf, 512).unwrap();
        assert_eq!(buf[0] == 3, lost.is_empty());
    }

    #[test]
    fn a_flush_supersedes_older_versions_of_others() {
        let rack = Rack::new(vec![0; 1024], vec![0; 1024]);
        let (a, b) = (NodeId(1), NodeId(2));
        BlockDevice::write_at(&rack.disk(Dev::Origin, b), &[5; 512], 0).unwrap();
        BlockDevice::write_at(&rack.disk(Dev::Origin, a), &[6; 512], 0).unwrap();
        BlockDevice::flush(&rack.disk(Dev::Origin, a)).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        assert!(rack.crash(b, &mut rng).is_empty());
        let mut buf = [0u8; 512];
        rack.read(Dev::Origin, &mut buf, 0).unwrap();
        assert_eq!(buf, [6; 512]);
    }
}
