//! Shared harness for the store tests: a store on a `MemDevice` with the data path
//! simulated (every chunk's contents are a tag written into its first 8 bytes), and a
//! reference model of what each snapshot must see.
#![allow(dead_code)]

use csnap_proto::SnapId;
use csnap_server::engine::Refusal;
use csnap_server::store::{
    BlockDevice, ChunkSource, FormatOptions, Geometry, MemDevice, OpenOptions, SnapState, Store,
    StoreError,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;

pub(crate) const CHUNK: u64 = 4096;

/// The seed for a randomised test: `CSNAP_SEED` if set (to replay), else random. Printed
/// so a failure can be replayed.
pub(crate) fn seed(test: &str) -> u64 {
    csnap_proto::testing::seed(test, "CSNAP_SEED")
}

/// A store device with room for `data_chunks` more data chunks than the minimum.
pub(crate) fn device(extra_data_chunks: u64) -> MemDevice {
    let size = Geometry::smallest_store(CHUNK).unwrap() + extra_data_chunks * CHUNK;
    MemDevice::new(size)
}

pub(crate) fn format(dev: &MemDevice, origin_chunks: u64) {
    Store::format(
        dev,
        &FormatOptions {
            chunk_size: CHUNK,
            origin_size: origin_chunks * CHUNK,
            now: 1_700_000_000,
            uuid: None,
        },
    )
    .unwrap();
}

pub(crate) fn open(dev: &MemDevice) -> Result<Store, StoreError> {
    Store::open(Arc::new(dev.clone()), OpenOptions::default())
}

/// The metadata half of an origin copy-out, made with the store calls the request engine
/// makes (`MetaStore`: `oldest_sharing_origin`, `reserve_chunk`, `invalidate_snapshot`,
/// `reclaim_step`) under its default store-full policy, invalidate-oldest: when no chunk
/// is free, the oldest live snapshot is invalidated, what it alone held is reclaimed, and
/// the reservation is tried again. Returns the reserved chunk (`None` once no live
/// snapshot shares the origin chunk) and the snapshots invalidated on the way; the caller
/// copies the chunk there, then calls `record_copy_out`.
pub(crate) fn reserve_copy_out(
    store: &mut Store,
    chunk: u64,
) -> Result<(Option<u64>, Vec<SnapId>), StoreError> {
    let mut invalidated = Vec::new();
    loop {
        if store.oldest_sharing_origin(chunk)?.is_none() {
            return Ok((None, invalidated));
        }
        match store.reserve_chunk() {
            Ok(at) => return Ok((Some(at), invalidated)),
            Err(StoreError::Refused(Refusal::Full)) => {}
            Err(e) => return Err(e),
        }
        // A snapshot shares the chunk, so one is live.
        let Some(victim) = store.live_snapshots().next() else {
            return Ok((None, invalidated));
        };
        let reason = format!("store full during a copy-out of origin chunk {chunk}");
        store.invalidate_snapshot(victim, &reason)?;
        invalidated.push(victim);
        while store.free_chunks() == 0 {
            if store.reclaim_step(4096)?.done {
                break;
            }
        }
    }
}

/// An origin copy-out's metadata on a store that has room (no data copied): reserve and
/// record, if a live snapshot still shares the chunk. True if it recorded one.
pub(crate) fn record_copy_out(store: &mut Store, chunk: u64) -> Result<bool, StoreError> {
    if store.oldest_sharing_origin(chunk)?.is_none() {
        return Ok(false);
    }
    let at = store.reserve_chunk()?;
    store.record_copy_out(chunk, at)
}

pub(crate) fn write_tag(dev: &dyn BlockDevice, offset: u64, tag: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK as usize];
    buf[..8].copy_from_slice(&tag.to_le_bytes());
    buf[8..16].copy_from_slice(&(!tag).to_le_bytes());
    dev.write_at(&buf, offset)
}

pub(crate) fn read_tag(dev: &dyn BlockDevice, offset: u64) -> std::io::Result<u64> {
    let mut buf = [0u8; 16];
    dev.read_at(&mut buf, offset)?;
    let tag = u64::from_le_bytes(buf[..8].try_into().unwrap());
    let check = u64::from_le_bytes(buf[8..].try_into().unwrap());
    if check != !tag {
        return Ok(u64::MAX); // a chunk nobody wrote: never equal to a real tag
    }
    Ok(tag)
}

/// What one snapshot must see, per the reference model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RefSnap {
    pub name: String,
    pub live: bool,
    pub view: Vec<u64>,
}

/// The reference: the origin, and each listed snapshot's view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reference {
    pub origin: Vec<u64>,
    pub snaps: BTreeMap<SnapId, RefSnap>,
}

/// A store plus the simulated data path and the reference model.
pub(crate) struct Sim {
    pub dev: MemDevice,
    pub store: Store,
    pub reference: Reference,
    pub origin_chunks: u64,
    pub next_tag: u64,
    pub names: u64,
}

/// Outcome of one simulated operation.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Done {
    Ok,
    Skipped,
}

impl Sim {
    pub(crate) fn new(extra_data_chunks: u64, origin_chunks: u64) -> Sim {
        let dev = device(extra_data_chunks);
        format(&dev, origin_chunks);
        let store = open(&dev).unwrap();
        let reference = Reference {
            origin: (0..origin_chunks).map(|c| 1_000_000 + c).collect(),
            snaps: BTreeMap::new(),
        };
        Sim {
            dev,
            store,
            reference,
            origin_chunks,
            next_tag: 1,
            names: 0,
        }
    }

    pub(crate) fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    pub(crate) fn create(&mut self) -> Result<SnapId, StoreError> {
        self.names += 1;
        let name = format!("snap-{}", self.names);
        let rec = self
            .store
            .create_snapshot(&name, 1_700_000_000 + self.names)?;
        self.reference.snaps.insert(
            rec.id,
            RefSnap {
                name,
                live: true,
                view: self.reference.origin.clone(),
            },
        );
        Ok(rec.id)
    }

    pub(crate) fn delete(&mut self, id: SnapId) -> Result<(), StoreError> {
        self.store.delete_snapshot(id)?;
        self.reference.snaps.remove(&id);
        Ok(())
    }

    /// The metadata half of an origin write: copy-out (if needed) recorded, not committed.
    /// Returns the tag the origin chunk gets once the caller applies the write.
    pub(crate) fn origin_write_prepare(&mut self, chunk: u64) -> Result<u64, StoreError> {
        let (store_chunk, invalidated) = reserve_copy_out(&mut self.store, chunk)?;
        for id in &invalidated {
            if let Some(s) = self.reference.snaps.get_mut(id) {
                s.live = false;
            }
        }
        if let Some(x) = store_chunk {
            let off = self.store.chunk_offset(x);
            write_tag(
                self.store.device().as_ref(),
                off,
                self.reference.origin[chunk as usize],
            )
            .map_err(|e| io(e, off))?;
            assert!(self.store.record_copy_out(chunk, x)?);
        }
        Ok(self.tag())
    }

    /// The metadata half of a snapshot write: unshare if needed (copy + record). Returns the
    /// store chunk the write goes to, or `None` if the store is full (write refused).
    pub(crate) fn snapshot_write_prepare(
        &mut self,
        id: SnapId,
        chunk: u64,
    ) -> Result<Option<u64>, StoreError> {
        match self.store.snapshot_chunk(id, chunk)? {
            ChunkSource::Store {
                store_chunk,
                exclusive: true,
            } => Ok(Some(store_chunk)),
            source => {
                let new = match self.store.reserve_chunk() {
                    Ok(c) => c,
                    Err(StoreError::Refused(Refusal::Full)) => return Ok(None),
                    Err(e) => return Err(e),
                };
                let dev = self.store.device().clone();
                let old = match source {
                    ChunkSource::Origin => self.reference.origin[chunk as usize],
                    ChunkSource::Store { store_chunk, .. } => {
                        let off = self.store.chunk_offset(store_chunk);
                        read_tag(dev.as_ref(), off).map_err(|e| io(e, off))?
                    }
                };
                let off = self.store.chunk_offset(new);
                write_tag(dev.as_ref(), off, old).map_err(|e| io(e, off))?;
                self.store.record_snapshot_exception(id, chunk, new)?;
                Ok(Some(new))
            }
        }
    }

    /// Writes a snapshot's data (after its metadata was committed).
    pub(crate) fn snapshot_write_data(
        &mut self,
        id: SnapId,
        chunk: u64,
        store_chunk: u64,
        tag: u64,
    ) -> Result<(), StoreError> {
        let off = self.store.chunk_offset(store_chunk);
        write_tag(self.store.device().as_ref(), off, tag).map_err(|e| io(e, off))?;
        if let Some(s) = self.reference.snaps.get_mut(&id) {
            s.view[chunk as usize] = tag;
        }
        Ok(())
    }

    /// What snapshot `id` reads at `chunk` through the store.
    pub(crate) fn read(&mut self, id: SnapId, chunk: u64) -> Result<u64, StoreError> {
        match self.store.snapshot_chunk(id, chunk)? {
            ChunkSource::Origin => Ok(self.reference.origin[chunk as usize]),
            ChunkSource::Store { store_chunk, .. } => {
                let off = self.store.chunk_offset(store_chunk);
                read_tag(self.store.device().as_ref(), off).map_err(|e| io(e, off))
            }
        }
    }

    /// Checks every live snapshot's every chunk and the snapshot list against the
    /// reference, and runs the consistency checker.
    pub(crate) fn verify(&mut self, context: &str) {
        let report = self.store.check().unwrap();
        assert!(
            report.is_clean(),
            "{context}: checker found {:#?}",
            report.problems
        );
        let listed: BTreeMap<SnapId, (String, bool)> = self
            .store
            .snapshots()
            .into_iter()
            .map(|r| (r.id, (r.name, r.state == SnapState::Live)))
            .collect();
        let expected: BTreeMap<SnapId, (String, bool)> = self
            .reference
            .snaps
            .iter()
            .map(|(id, s)| (*id, (s.name.clone(), s.live)))
            .collect();
        assert_eq!(listed, expected, "{context}: snapshot list");
        let snaps: Vec<(SnapId, Vec<u64>)> = self
            .reference
            .snaps
            .iter()
            .filter(|(_, s)| s.live)
            .map(|(id, s)| (*id, s.view.clone()))
            .collect();
        for (id, view) in snaps {
            for chunk in 0..self.origin_chunks {
                let got = self.read(id, chunk).unwrap();
                assert_eq!(
                    got, view[chunk as usize],
                    "{context}: snapshot {id} chunk {chunk}"
                );
            }
        }
    }

    pub(crate) fn reopen(&mut self) {
        let store = std::mem::replace(&mut self.store, placeholder(&self.dev));
        store.close().unwrap();
        self.store = open(&self.dev).unwrap();
        assert!(!self.store.was_unclean());
    }

    pub(crate) fn drain_reclaim(&mut self) {
        for _ in 0..100_000 {
            if self.store.reclaim_step(64).unwrap().done {
                return;
            }
        }
        panic!("reclaim never finished");
    }

    /// An origin write to a random chunk (copy-out if a snapshot shares it), applied to
    /// the reference.
    pub(crate) fn random_origin_write(&mut self, rng: &mut StdRng) {
        let chunk = rng.gen_range(0..self.origin_chunks);
        let tag = self.origin_write_prepare(chunk).unwrap();
        self.reference.origin[chunk as usize] = tag;
    }

    /// A write to a random chunk of a random live snapshot (if any; skipped when the store
    /// is full), applied to the reference.
    pub(crate) fn random_snapshot_write(&mut self, rng: &mut StdRng) {
        let (Some(id), chunk) = (self.random_live(rng), rng.gen_range(0..self.origin_chunks))
        else {
            return;
        };
        if let Some(at) = self.snapshot_write_prepare(id, chunk).unwrap() {
            let tag = self.tag();
            self.snapshot_write_data(id, chunk, at, tag).unwrap();
        }
    }

    /// Deletes a random listed snapshot, if any.
    pub(crate) fn random_delete(&mut self, rng: &mut StdRng) {
        if let Some(id) = self.random_listed(rng) {
            self.delete(id).unwrap();
        }
    }

    pub(crate) fn random_live(&self, rng: &mut StdRng) -> Option<SnapId> {
        let live: Vec<SnapId> = self
            .reference
            .snaps
            .iter()
            .filter(|(_, s)| s.live)
            .map(|(id, _)| *id)
            .collect();
        (!live.is_empty()).then(|| live[rng.gen_range(0..live.len())])
    }

    pub(crate) fn random_listed(&self, rng: &mut StdRng) -> Option<SnapId> {
        let ids: Vec<SnapId> = self.reference.snaps.keys().copied().collect();
        (!ids.is_empty()).then(|| ids[rng.gen_range(0..ids.len())])
    }
}

/// A throwaway store on a fresh device, used while swapping the real one out.
fn placeholder(_dev: &MemDevice) -> Store {
    let dev = device(0);
    format(&dev, 1);
    open(&dev).unwrap()
}

pub(crate) fn io(source: std::io::Error, offset: u64) -> StoreError {
    StoreError::Io {
        op: "test data path",
        device: "memory device".into(),
        offset,
        source,
    }
}

pub(crate) fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}
