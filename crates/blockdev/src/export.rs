//! The csnap NBD exports: `VOLUME` is the origin, `VOLUME@SNAPSHOT` each snapshot, as the
//! server lists them at the moment a client asks.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use csnap_proto::{SnapId, SnapshotInfo, SnapshotState};

use crate::client::Volume;
use crate::nbd::{BlockSizes, BoxFuture, Export, ExportFeatures, ExportInfo, Exports};

/// The exports of one volume.
#[derive(Debug)]
pub struct CsnapExports {
    name: String,
    volume: Arc<Volume>,
    snapshots_read_only: bool,
}

impl CsnapExports {
    /// `name` is the volume name (the origin export's name). With `snapshots_read_only`,
    /// snapshot exports refuse writes (advertised read-only).
    pub fn new(name: &str, volume: Arc<Volume>, snapshots_read_only: bool) -> CsnapExports {
        CsnapExports {
            name: name.to_owned(),
            volume,
            snapshots_read_only,
        }
    }

    fn info(&self, name: String, description: String, read_only: bool) -> ExportInfo {
        ExportInfo {
            name,
            description: Some(description),
            size: self.volume.size(),
            read_only,
            features: features(),
            block_sizes: block_sizes(&self.volume),
        }
    }

    fn snapshot_of<'a>(&self, export: &'a str) -> Option<&'a str> {
        export
            .strip_prefix(self.name.as_str())
            .and_then(|rest| rest.strip_prefix('@'))
    }
}

fn features() -> ExportFeatures {
    ExportFeatures {
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        fast_zero: true,
        // Every connection writes through the same files; FLUSH syncs them all.
        multi_conn: true,
        rotational: false,
    }
}

/// The NBD maximum payload: the 2^25 bytes the protocol says a server should accept from
/// clients that never negotiate sizes. The client splits larger requests into bounded
/// metadata questions (`client::MAX_QUESTION_CHUNKS`), so this holds for every chunk size.
pub const MAX_PAYLOAD: u32 = 32 << 20;

fn block_sizes(volume: &Volume) -> BlockSizes {
    let chunk = u32::try_from(volume.chunk_size()).unwrap_or(MAX_PAYLOAD);
    BlockSizes {
        // Any alignment: under direct I/O unaligned requests are read-modify-written
        // (client::devices), as qemu-nbd --cache=none does.
        minimum: 1,
        preferred: chunk.clamp(4096, MAX_PAYLOAD),
        maximum_payload: MAX_PAYLOAD,
    }
}

fn is_listed(s: &SnapshotInfo) -> bool {
    s.state == SnapshotState::Live
}

impl Exports for CsnapExports {
    fn list(&self) -> BoxFuture<'_, io::Result<Vec<ExportInfo>>> {
        Box::pin(async move {
            let snapshots = self.volume.list_snapshots().await?;
            let mut list = vec![self.info(
                self.name.clone(),
                format!("csnap volume {} (origin)", self.name),
                false,
            )];
            for s in snapshots.iter().filter(|s| is_listed(s)) {
                list.push(self.info(
                    format!("{}@{}", self.name, s.name),
                    format!(
                        "snapshot {} (id {}) of {}, created {}",
                        s.name, s.id, self.name, s.ctime
                    ),
                    self.snapshots_read_only,
                ));
            }
            Ok(list)
        })
    }

    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Option<Arc<dyn Export>>>> {
        Box::pin(async move {
            if name.is_empty() || name == self.name {
                let export: Arc<dyn Export> = Arc::new(CsnapExport {
                    volume: self.volume.clone(),
                    snap: None,
                    read_only: false,
                    description: format!("csnap volume {} (origin)", self.name),
                });
                return Ok(Some(export));
            }
            let Some(wanted) = self.snapshot_of(name) else {
                return Ok(None);
            };
            let snapshots = self.volume.list_snapshots().await?;
            let Some(s) = snapshots.iter().find(|s| s.name == wanted && is_listed(s)) else {
                return Ok(None);
            };
            let export: Arc<dyn Export> = Arc::new(CsnapExport {
                volume: self.volume.clone(),
                snap: Some(s.id),
                read_only: self.snapshots_read_only,
                description: format!("snapshot {} (id {}) of {}", s.name, s.id, self.name),
            });
            Ok(Some(export))
        })
    }
}

/// The origin (`snap: None`) or one snapshot.
#[derive(Debug)]
pub struct CsnapExport {
    volume: Arc<Volume>,
    snap: Option<SnapId>,
    read_only: bool,
    description: String,
}

impl Export for CsnapExport {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn features(&self) -> ExportFeatures {
        features()
    }

    fn block_sizes(&self) -> BlockSizes {
        block_sizes(&self.volume)
    }

    fn description(&self) -> Option<String> {
        Some(self.description.clone())
    }

    fn read_at(&self, offset: u64, len: u32) -> BoxFuture<'_, io::Result<Bytes>> {
        Box::pin(async move {
            Ok(match self.snap {
                None => self.volume.read_origin(offset, len).await?,
                Some(s) => self.volume.read_snapshot(s, offset, len).await?,
            })
        })
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            match self.snap {
                None => self.volume.write_origin(offset, data, fua).await?,
                Some(s) => self.volume.write_snapshot(s, offset, data, fua).await?,
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move { Ok(self.volume.flush().await?) })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
        fast: bool,
    ) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            Ok(self
                .volume
                .write_zeroes(self.snap, offset, len, may_trim, fast, fua)
                .await?)
        })
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        // See `Volume::trim`: whole origin chunks are deallocated under a write grant;
        // on a snapshot TRIM is a no-op, which the protocol allows.
        Box::pin(async move { Ok(self.volume.trim(self.snap, offset, len, fua).await?) })
    }
}
