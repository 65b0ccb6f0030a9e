//! One volume as seen from one node: the data paths of the origin and of its snapshots.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use csnap_proto::{
    ChunkRange, ClientId, ClientKind, ClientMsg, DiffEnd, DiffPage, ErrorCode, ServerMsg,
    ServerStatus, SnapId, SnapRef, SnapshotInfo, StoreAddr, MAX_LIST_PAGE,
};

use super::cache::{CacheStats, OriginTracker, WriteGuard};
use super::conn::{ConnConfig, MetaConnection, ServerTarget, SessionInfo};
use super::devices::{Devices, Which};
use super::session::store_reads_release;
use super::ClientError;

/// Most chunks one metadata question (QueryWrite, QuerySnapshotRead, SnapshotWrite)
/// names: an NBD request over more chunks is split into several questions, so every
/// request up to NBD's 32 MiB is served whatever the chunk size while each question and
/// its answer stay small (the server's `max_request_chunks` default is 4096).
pub const MAX_QUESTION_CHUNKS: u64 = 1024;

/// One page of a snapshot listing (see `Volume::list_snapshots_page`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPage {
    /// The snapshots of this page, by id.
    pub snapshots: Vec<SnapshotInfo>,
    /// Later snapshots exist: ask again after the last id of this page.
    pub more: bool,
    /// False while the server still counts usage after start (`chunks_held` partial).
    pub usage_exact: bool,
}

/// How a node's client reaches its volume.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The metadata server: a fixed address (`ListenAddr::into()`), or, in cluster mode, a
    /// watch of its address that every connection of the volume follows on failover.
    pub server: ServerTarget,
    /// The cluster key (shared secret, HMAC).
    pub key: Vec<u8>,
    /// This client's 64-bit instance id (random unless configured): each connection's
    /// identity is `ClientId::new(instance, kind)`. Must differ between the volume's
    /// clients (the server refuses a second live client with the same id, see
    /// `ErrorCode::DuplicateClient`).
    pub instance: u64,
    /// This node's id.
    pub node: u32,
    /// The shared origin device.
    pub origin: PathBuf,
    /// The shared snapshot store device.
    pub store: PathBuf,
    /// How long `connect` waits for the first session.
    pub connect_timeout: Duration,
    /// Most origin chunks remembered as unique.
    pub cache_chunks: usize,
    /// Open the origin and store O_DIRECT (needed when other nodes write them too);
    /// I/O must then be 4 KiB aligned.
    pub direct_io: bool,
}

/// The identity of one connection of client `instance`: the instance and what the
/// connection is for. Connections of one client differ in kind, clients in instance, so no
/// two connections of different clients (or kinds) can share an identity.
pub fn client_id_for(instance: u64, kind: ClientKind) -> ClientId {
    ClientId::new(instance, kind)
}

/// Test hook for the cluster tests: `CSNAP_TEST_HOLD_SNAPSHOT_READ_MS=N` in the
/// environment makes every snapshot read that holds origin read locks keep them N ms
/// before reading (a slow reader across a failover, deterministically). Unset (always, in
/// production) it costs one lookup per process.
fn test_hold_snapshot_reads() -> Option<std::time::Duration> {
    static HOLD: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *HOLD.get_or_init(|| {
        let ms = std::env::var("CSNAP_TEST_HOLD_SNAPSHOT_READ_MS").ok()?;
        match ms.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => {
                tracing::warn!(
                    ms,
                    "test hook: snapshot reads hold their read locks {ms} ms longer"
                );
                Some(std::time::Duration::from_millis(ms))
            }
            _ => None,
        }
    })
}

/// A connected volume.
#[derive(Debug)]
pub struct Volume {
    cfg: ClientConfig,
    /// Random for this process: sent in every Hello of every connection.
    incarnation: u64,
    devices: Devices,
    chunk_size: u64,
    origin_chunks: u64,
    size: u64,
    tracker: Arc<OriginTracker>,
    origin: MetaConnection,
    admin: MetaConnection,
    snapshots: Mutex<HashMap<SnapId, Arc<MetaConnection>>>,
    /// Bumped whenever a snapshot connection is added or removed (what
    /// [`Volume::snapshot_clients`] returns changed): the cluster agent reports the node's
    /// snapshot clients to the membership on this, not on a timer.
    snapshots_changed: tokio::sync::watch::Sender<u64>,
}

/// Store reads an answer gave out, released when this is dropped: after the reads finished
/// (whatever they returned), or when the read is abandoned (its future dropped, e.g. a
/// sibling piece of the same read failed), so that no store read stays held for the life
/// of the session.
struct StoreReadsHeld<'a> {
    conn: &'a MetaConnection,
    release: Option<ClientMsg>,
}

impl Drop for StoreReadsHeld<'_> {
    fn drop(&mut self) {
        if let Some(msg) = self.release.take() {
            self.conn.notify(msg);
        }
    }
}

fn unexpected(request: &'static str, answer: ServerMsg) -> ClientError {
    ClientError::Unexpected {
        request,
        answer: format!("{answer:?}"),
    }
}

impl Volume {
    /// Opens the devices, connects to the server and waits for the first session.
    pub async fn connect(cfg: ClientConfig) -> Result<Arc<Volume>, ClientError> {
        let devices = Devices::open(&cfg.origin, &cfg.store, cfg.direct_io)?;
        let tracker = OriginTracker::new(cfg.cache_chunks);
        let incarnation = rand::random();
        let origin = MetaConnection::start(
            conn_config(&cfg, incarnation, ClientKind::Origin),
            Some(tracker.clone()),
        );
        let admin = MetaConnection::start(conn_config(&cfg, incarnation, ClientKind::Admin), None);
        let SessionInfo {
            chunk_size,
            origin_chunks,
            ..
        } = origin.wait_established(cfg.connect_timeout).await?;
        let chunk_size = u64::from(chunk_size);
        let size = devices.origin_len();
        if chunk_size == 0 || size.div_ceil(chunk_size) != origin_chunks {
            return Err(ClientError::Geometry(format!(
                "origin {} is {size} bytes, but the server's store describes {origin_chunks} chunks of {chunk_size} bytes (wrong origin or store?)",
                cfg.origin.display()
            )));
        }
        Ok(Arc::new(Volume {
            cfg,
            incarnation,
            devices,
            chunk_size,
            origin_chunks,
            size,
            tracker,
            origin,
            admin,
            snapshots: Mutex::new(HashMap::new()),
            snapshots_changed: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// The identities of this client's snapshot connections (one per snapshot it has
    /// used): what a new server must wait for after a failover, since each may hold read
    /// locks on the old one (cluster mode gathers them from every node).
    pub fn snapshot_clients(&self) -> Vec<ClientId> {
        let snapshots = match self.snapshots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        snapshots
            .keys()
            .map(|snap| client_id_for(self.cfg.instance, ClientKind::Snapshot { snap: *snap }))
            .collect()
    }

    /// Changes whenever [`Volume::snapshot_clients`] may have changed.
    pub fn snapshot_clients_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.snapshots_changed.subscribe()
    }

    /// Size of the origin (and of every snapshot) in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The origin's size in chunks.
    pub fn origin_chunks(&self) -> u64 {
        self.origin_chunks
    }

    /// The origin write cache's figures.
    pub fn cache_stats(&self) -> CacheStats {
        self.tracker.stats()
    }

    /// How many sessions the origin connection established (reconnects + 1).
    pub fn origin_sessions(&self) -> u64 {
        self.origin.session_info().map_or(0, |i| i.sessions)
    }

    /// The chunks `[offset, offset + len)` touches.
    fn chunk_range(&self, offset: u64, len: u64) -> Result<ChunkRange, ClientError> {
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(ClientError::Geometry(format!(
                "I/O of {len} bytes at {offset} is outside the volume ({} bytes)",
                self.size
            )));
        }
        let first = offset / self.chunk_size;
        let last = (offset + len - 1) / self.chunk_size;
        let count = u32::try_from(last - first + 1)
            .map_err(|_| ClientError::Geometry(format!("I/O of {len} bytes is too large")))?;
        Ok(ChunkRange::new(first, count))
    }

    // ---- origin ----

    /// Reads the origin. While an online rollback runs, asks the server first where each
    /// chunk is (`QueryOriginRead`): chunks not yet copied back are read from the
    /// rollback source's store chunks, the others from the origin.
    pub async fn read_origin(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        let range = self.chunk_range(offset, u64::from(len))?;
        let route = self.tracker.read_route();
        if !route.ask {
            let data = self.devices.read(Which::Origin, offset, len as usize).await;
            drop(route.guard);
            return data;
        }
        let data = if u64::from(range.count) <= MAX_QUESTION_CHUNKS {
            self.read_origin_asking(range, offset, len).await
        } else {
            let pieces = self.question_pieces(offset, u64::from(len));
            let parts =
                futures::future::try_join_all(pieces.into_iter().map(|(at, n)| async move {
                    let range = self.chunk_range(at, n)?;
                    self.read_origin_asking(range, at, n as u32).await
                }))
                .await;
            parts.map(|parts| {
                let mut out = BytesMut::with_capacity(len as usize);
                for part in &parts {
                    out.extend_from_slice(part);
                }
                out.freeze()
            })
        };
        drop(route.guard);
        data
    }

    /// One origin read of at most [`MAX_QUESTION_CHUNKS`] chunks while a rollback runs.
    async fn read_origin_asking(
        &self,
        range: ChunkRange,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, ClientError> {
        let reply = self
            .origin
            .request(ClientMsg::QueryOriginRead {
                ranges: vec![range],
            })
            .await?;
        let (store, source) = match reply.msg {
            ServerMsg::OriginReadOk { store, source } => (store, source),
            other => return Err(unexpected("QueryOriginRead", other)),
        };
        // The server keeps the source's store chunks from reuse (it may be deleted as soon
        // as the rollback ends) until this releases them, whatever happens to the read.
        let _held = StoreReadsHeld {
            conn: &self.origin,
            release: store_reads_release(source, &store),
        };
        let asked = range.chunks().unwrap_or(0..0);
        let store_len = self.devices.store_len();
        let outside = |a: &StoreAddr| {
            !asked.contains(&a.chunk)
                || a.store_chunk
                    .checked_add(1)
                    .and_then(|end| end.checked_mul(self.chunk_size))
                    .is_none_or(|end| end > store_len)
        };
        if let Some(bad) = store.iter().find(|a| outside(a)) {
            return Err(ClientError::Unexpected {
                request: "QueryOriginRead",
                answer: format!(
                    "origin chunk {} at store chunk {}: not asked for, or outside the store",
                    bad.chunk, bad.store_chunk
                ),
            });
        }
        Ok(join(self.gather(&store, offset, len).await?))
    }

    /// `[offset, offset + len)` cut at every multiple of [`MAX_QUESTION_CHUNKS`] chunks:
    /// pieces that each need one bounded metadata question. Empty for `len == 0`.
    fn question_pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let step = self.chunk_size.saturating_mul(MAX_QUESTION_CHUNKS).max(1);
        let end = offset.saturating_add(len);
        let mut pieces = Vec::new();
        let mut at = offset;
        while at < end {
            let next = (at / step).saturating_add(1).saturating_mul(step).min(end);
            pieces.push((at, next - at));
            at = next;
        }
        pieces
    }

    /// Permission to change the origin's chunks `range` (at most
    /// [`MAX_QUESTION_CHUNKS`]): from the unique-chunk cache, else from the server, which
    /// copies out shared chunks before it answers.
    async fn origin_grant(&self, range: ChunkRange) -> Result<WriteGuard, ClientError> {
        let Some(chunks) = range.chunks() else {
            return Err(ClientError::Geometry("chunk range overflows".into()));
        };
        if let Some(g) = self.tracker.try_cached(chunks) {
            return Ok(g);
        }
        let reply = self
            .origin
            .request(ClientMsg::QueryWrite {
                ranges: vec![range],
            })
            .await?;
        match (reply.msg, reply.grant) {
            (ServerMsg::OriginWriteOk { .. }, Some(g)) => Ok(g),
            (other, _) => Err(unexpected("QueryWrite", other)),
        }
    }

    /// Where the origin has holes (they read as zeroes) in `[offset, offset + len)`: at
    /// most `max_runs` runs from `offset` on, from SEEK_DATA/SEEK_HOLE (all data on a
    /// block device). Metadata of the file only; the server is not asked. While an online
    /// rollback runs (or no session says whether one does), everything is data.
    pub async fn origin_allocation(
        &self,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<crate::sparse::AllocRun>, ClientError> {
        self.chunk_range(offset, len)?;
        if self.tracker.asks_before_reads() {
            // The origin's holes are not the rollback source's: all data until it is done.
            return Ok(vec![crate::sparse::AllocRun { len, hole: false }]);
        }
        self.devices
            .allocation(Which::Origin, offset, len, max_runs)
            .await
    }

    /// Writes the origin: asks the server first unless every chunk is cached unique; the
    /// server copies out shared chunks before it answers. A request over more than
    /// [`MAX_QUESTION_CHUNKS`] chunks is written as several pieces at once, each under
    /// its own grant (NBD does not promise that a write is atomic).
    pub async fn write_origin(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), ClientError> {
        let range = self.chunk_range(offset, data.len() as u64)?;
        if u64::from(range.count) <= MAX_QUESTION_CHUNKS {
            return self.write_origin_piece(range, offset, data, fua).await;
        }
        let pieces = self.question_pieces(offset, data.len() as u64);
        futures::future::try_join_all(pieces.into_iter().map(|(at, n)| {
            let from = (at - offset) as usize;
            let piece = data.slice(from..from + n as usize);
            async move {
                let range = self.chunk_range(at, n)?;
                self.write_origin_piece(range, at, piece, fua).await
            }
        }))
        .await?;
        Ok(())
    }

    async fn write_origin_piece(
        &self,
        range: ChunkRange,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), ClientError> {
        let guard = self.origin_grant(range).await?;
        let result = self.devices.write(Which::Origin, offset, data, fua).await;
        drop(guard);
        result
    }

    /// `[offset, offset + len)` split into the partial chunk at its start, the whole
    /// chunks and the partial chunk at its end (each `(offset, len)`, `len` 0 if absent).
    fn chunk_edges(&self, offset: u64, len: u64) -> [(u64, u64); 3] {
        let cs = self.chunk_size;
        let end = offset + len;
        let whole_start = offset.div_ceil(cs) * cs;
        let whole_end = end / cs * cs;
        if whole_start >= whole_end {
            // No whole chunk: all of it is one edge.
            return [(offset, len), (whole_start, 0), (end, 0)];
        }
        [
            (offset, whole_start - offset),
            (whole_start, whole_end - whole_start),
            (whole_end, end - whole_end),
        ]
    }

    /// Makes `[offset, offset + len)` of the origin (`snap: None`) or of a snapshot read
    /// back as zeroes, with the same copy-on-write rules as a write: every chunk is
    /// changed only under the permission a write would get (origin: after the server
    /// copied out chunks a snapshot shares; snapshot: in the snapshot's own exception).
    /// Whole chunks are zeroed with `fallocate` (the origin's deallocated if `punch`, the
    /// store's kept allocated); the partial chunks at the edges are written as zeroes.
    /// With `fast`, a request that would write zeroes anywhere fails with
    /// `ClientError::Unsupported` before anything changes (NBD FAST_ZERO).
    pub async fn write_zeroes(
        &self,
        snap: Option<SnapId>,
        offset: u64,
        len: u64,
        punch: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), ClientError> {
        if len == 0 {
            return Ok(());
        }
        self.chunk_range(offset, len)?;
        let [head, whole, tail] = self.chunk_edges(offset, len);
        let which = if snap.is_some() {
            Which::Store
        } else {
            Which::Origin
        };
        // The store is never deallocated: its space is what later copy-outs count on.
        let punch = punch && snap.is_none();
        if fast && (head.1 > 0 || tail.1 > 0 || !self.devices.zero_is_fast(which, punch)) {
            return Err(ClientError::Unsupported(format!(
                "fast zero of {len} bytes at {offset}: only whole {}-byte chunks on a device \
                 that zeroes without writing are fast",
                self.chunk_size
            )));
        }
        let edges = [head, tail].into_iter().filter(|e| e.1 > 0).map(|(at, n)| {
            let zeroes = Bytes::from(vec![0u8; n as usize]);
            async move {
                match snap {
                    None => self.write_origin(at, zeroes, fua).await,
                    Some(s) => self.write_snapshot(s, at, zeroes, fua).await,
                }
            }
        });
        let middle = self
            .question_pieces(whole.0, whole.1)
            .into_iter()
            .map(|(at, n)| async move {
                let range = self.chunk_range(at, n)?;
                match snap {
                    None => {
                        let guard = self.origin_grant(range).await?;
                        let result = self
                            .devices
                            .zero(Which::Origin, at, n, punch, fast, fua)
                            .await;
                        drop(guard);
                        result
                    }
                    Some(s) => self.zero_snapshot_piece(s, range, at, n, fast, fua).await,
                }
            });
        let (a, b) = futures::future::join(
            futures::future::try_join_all(edges),
            futures::future::try_join_all(middle),
        )
        .await;
        a.and(b).map(|_| ())
    }

    /// TRIM: deallocates the whole chunks of `[offset, offset + len)` in the origin (their
    /// contents become zeroes), each under the grant a write would need, so a chunk a
    /// snapshot shares is copied out first. Partial chunks at the edges are left as they
    /// are (TRIM is advisory: a copy-out to free less than a chunk would cost more than
    /// it frees), and so is everything when the origin cannot deallocate. On a snapshot
    /// TRIM changes nothing: deallocating its exception would only make its chunks read
    /// the origin's current data, and zeroing them would spend store space.
    pub async fn trim(
        &self,
        snap: Option<SnapId>,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), ClientError> {
        if len == 0 {
            return Ok(());
        }
        self.chunk_range(offset, len)?;
        if snap.is_some() || !self.devices.can_punch(Which::Origin) {
            return Ok(());
        }
        let [_, whole, _] = self.chunk_edges(offset, len);
        let pieces = self
            .question_pieces(whole.0, whole.1)
            .into_iter()
            .map(|(at, n)| async move {
                let range = self.chunk_range(at, n)?;
                let guard = self.origin_grant(range).await?;
                let result = self.devices.discard(Which::Origin, at, n, fua).await;
                drop(guard);
                result
            });
        futures::future::try_join_all(pieces).await?;
        Ok(())
    }

    /// Makes every completed write durable: fdatasync the origin and the store (snapshot
    /// data lands in the store; copy-outs are already synced by the server).
    pub async fn flush(&self) -> Result<(), ClientError> {
        let (a, b) = tokio::join!(
            self.devices.sync(Which::Origin),
            self.devices.sync(Which::Store)
        );
        a.and(b)
    }

    // ---- snapshots ----

    fn snapshot_conn(&self, snap: SnapId) -> Arc<MetaConnection> {
        let mut map = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        let mut added = false;
        let conn = map
            .entry(snap)
            .or_insert_with(|| {
                added = true;
                Arc::new(MetaConnection::start(
                    conn_config(&self.cfg, self.incarnation, ClientKind::Snapshot { snap }),
                    None,
                ))
            })
            .clone();
        drop(map);
        if added {
            self.snapshots_changed.send_modify(|v| *v += 1);
        }
        conn
    }

    /// The part of chunk `chunk` that `[offset, offset+len)` covers, as
    /// (offset in the volume, offset within the chunk, length).
    fn piece(&self, chunk: u64, offset: u64, len: u64) -> (u64, u64, u64) {
        let chunk_start = chunk * self.chunk_size;
        let start = offset.max(chunk_start);
        let end = (offset + len).min(chunk_start + self.chunk_size);
        (start, start - chunk_start, end - start)
    }

    /// Reads a snapshot: ask where each chunk lives; read the store for chunks with an
    /// exception and the origin for the others (read-locked for us meanwhile, so no origin
    /// write can change them under the read), then release the locks.
    pub async fn read_snapshot(
        &self,
        snap: SnapId,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, ClientError> {
        Ok(join(self.read_snapshot_parts(snap, offset, len).await?))
    }

    /// [`Volume::read_snapshot`] as consecutive parts, one per device run: a read that
    /// spans the origin and the store is not copied into one buffer (the NBD export sends
    /// the parts as they are).
    pub async fn read_snapshot_parts(
        &self,
        snap: SnapId,
        offset: u64,
        len: u32,
    ) -> Result<Vec<Bytes>, ClientError> {
        let range = self.chunk_range(offset, u64::from(len))?;
        if u64::from(range.count) <= MAX_QUESTION_CHUNKS {
            return self.read_snapshot_piece(snap, range, offset, len).await;
        }
        // One bounded question per piece, all at once.
        let pieces = self.question_pieces(offset, u64::from(len));
        let parts = futures::future::try_join_all(pieces.into_iter().map(|(at, n)| async move {
            let range = self.chunk_range(at, n)?;
            self.read_snapshot_piece(snap, range, at, n as u32).await
        }))
        .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    async fn read_snapshot_piece(
        &self,
        snap: SnapId,
        range: ChunkRange,
        offset: u64,
        len: u32,
    ) -> Result<Vec<Bytes>, ClientError> {
        let conn = self.snapshot_conn(snap);
        let (store, origin_locked) = ask_snapshot_read(&conn, snap, vec![range]).await?;
        let held = StoreReadsHeld {
            conn: &conn,
            release: store_reads_release(Some(snap), &store),
        };
        let data = self.gather(&store, offset, len).await;
        // Done with those store addresses (whatever the reads returned): until now the
        // server kept them from reuse.
        drop(held);
        finish_snapshot_read(&conn, snap, origin_locked);
        data
    }

    /// The device runs of a snapshot read, read at once, in order.
    async fn gather(
        &self,
        store: &[StoreAddr],
        offset: u64,
        len: u32,
    ) -> Result<Vec<Bytes>, ClientError> {
        let runs = snapshot_read_runs(self.chunk_size, store, offset, len);
        // Copied-out chunks lie scattered in the store, so a large snapshot read is many
        // runs: issue them all at once rather than one after another.
        futures::future::try_join_all(
            runs.iter()
                .map(|&(w, o, l)| self.devices.read(w, o, l as usize)),
        )
        .await
    }

    /// Reads several extents `(offset, len)` of a snapshot (any offsets, in any order) under
    /// ONE metadata question for all their chunks and one release, with every device read
    /// issued at once: a change scattered chunk by chunk (`export-diff`) costs one round
    /// trip per batch, not per chunk. The parts come back in the order asked. Extents
    /// needing more than [`MAX_QUESTION_CHUNKS`] chunks together are read one by one.
    pub async fn read_snapshot_extents(
        &self,
        snap: SnapId,
        extents: &[(u64, u32)],
    ) -> Result<Vec<Bytes>, ClientError> {
        let mut chunks_asked = 0u64;
        for &(offset, len) in extents {
            chunks_asked += u64::from(self.chunk_range(offset, u64::from(len))?.count);
        }
        if extents.is_empty() {
            return Ok(Vec::new());
        }
        if chunks_asked > MAX_QUESTION_CHUNKS {
            return futures::future::try_join_all(
                extents
                    .iter()
                    .map(|&(offset, len)| self.read_snapshot(snap, offset, len)),
            )
            .await;
        }
        let conn = self.snapshot_conn(snap);
        let (store, origin_locked) =
            ask_snapshot_read(&conn, snap, extent_chunks(self.chunk_size, extents)).await?;
        let held = StoreReadsHeld {
            conn: &conn,
            release: store_reads_release(Some(snap), &store),
        };
        let store = &store;
        let data =
            futures::future::try_join_all(extents.iter().map(|&(offset, len)| async move {
                Ok(join(self.gather(store, offset, len).await?))
            }))
            .await;
        drop(held);
        finish_snapshot_read(&conn, snap, origin_locked);
        data
    }

    /// Writes a snapshot: the server gives each chunk its own exception (copying the
    /// previous contents there first, so partial-chunk writes are fine) and a write lease;
    /// write the data there, then release the leases.
    pub async fn write_snapshot(
        &self,
        snap: SnapId,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), ClientError> {
        let range = self.chunk_range(offset, data.len() as u64)?;
        if u64::from(range.count) <= MAX_QUESTION_CHUNKS {
            return self
                .write_snapshot_piece(snap, range, offset, data, fua)
                .await;
        }
        let pieces = self.question_pieces(offset, data.len() as u64);
        futures::future::try_join_all(pieces.into_iter().map(|(at, n)| {
            let from = (at - offset) as usize;
            let piece = data.slice(from..from + n as usize);
            async move {
                let range = self.chunk_range(at, n)?;
                self.write_snapshot_piece(snap, range, at, piece, fua).await
            }
        }))
        .await?;
        Ok(())
    }

    /// The snapshot's own exceptions for `range`, each leased for writing (the server
    /// copies the previous contents there first).
    async fn snapshot_lease(
        &self,
        snap: SnapId,
        range: ChunkRange,
    ) -> Result<(Arc<MetaConnection>, Vec<StoreAddr>), ClientError> {
        let conn = self.snapshot_conn(snap);
        let reply = conn
            .request(ClientMsg::SnapshotWrite {
                snap,
                ranges: vec![range],
            })
            .await?;
        match reply.msg {
            ServerMsg::SnapshotWriteOk { addrs } => Ok((conn, addrs)),
            other => Err(unexpected("SnapshotWrite", other)),
        }
    }

    /// Zeroes whole chunks of a snapshot in its exceptions (kept allocated).
    async fn zero_snapshot_piece(
        &self,
        snap: SnapId,
        range: ChunkRange,
        offset: u64,
        len: u64,
        fast: bool,
        fua: bool,
    ) -> Result<(), ClientError> {
        let (conn, addrs) = self.snapshot_lease(snap, range).await?;
        let at: HashMap<u64, u64> = addrs.iter().map(|a| (a.chunk, a.store_chunk)).collect();
        let mut result = Ok(());
        for chunk in offset / self.chunk_size..(offset + len) / self.chunk_size {
            let Some(&sc) = at.get(&chunk) else {
                result = Err(ClientError::Unexpected {
                    request: "SnapshotWrite",
                    answer: format!("no store address for chunk {chunk}"),
                });
                break;
            };
            let store_off = sc * self.chunk_size;
            result = self
                .devices
                .zero(Which::Store, store_off, self.chunk_size, false, fast, false)
                .await;
            if result.is_err() {
                break;
            }
        }
        let result = match result {
            Ok(()) if fua => self.devices.sync(Which::Store).await,
            other => other,
        };
        self.release_snapshot_leases(conn, snap, &addrs);
        result
    }

    fn release_snapshot_leases(
        &self,
        conn: Arc<MetaConnection>,
        snap: SnapId,
        addrs: &[StoreAddr],
    ) {
        let leased = ChunkRange::coalesce(addrs.iter().map(|a| a.chunk));
        if !leased.is_empty() {
            let msg = ClientMsg::FinishSnapshotWrite {
                snap,
                ranges: leased,
            };
            // As for reads: the session owns the release from here on.
            tokio::spawn(async move {
                if let Err(e) = conn.request(msg).await {
                    tracing::warn!(%snap, err = %e, "releasing snapshot write leases failed");
                }
            });
        }
    }

    async fn write_snapshot_piece(
        &self,
        snap: SnapId,
        range: ChunkRange,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), ClientError> {
        let (conn, addrs) = self.snapshot_lease(snap, range).await?;
        let result = self.scatter(&addrs, offset, data).await;
        let result = match result {
            Ok(()) if fua => self.devices.sync(Which::Store).await,
            other => other,
        };
        self.release_snapshot_leases(conn, snap, &addrs);
        result
    }

    async fn scatter(
        &self,
        addrs: &[StoreAddr],
        offset: u64,
        data: Bytes,
    ) -> Result<(), ClientError> {
        let at: HashMap<u64, u64> = addrs.iter().map(|a| (a.chunk, a.store_chunk)).collect();
        let len = data.len() as u64;
        let first = offset / self.chunk_size;
        let last = (offset + len - 1) / self.chunk_size;
        for chunk in first..=last {
            let Some(&sc) = at.get(&chunk) else {
                return Err(ClientError::Unexpected {
                    request: "SnapshotWrite",
                    answer: format!("no store address for chunk {chunk}"),
                });
            };
            let (vol_off, within, n) = self.piece(chunk, offset, len);
            let from = (vol_off - offset) as usize;
            let piece = data.slice(from..from + n as usize);
            self.devices
                .write(Which::Store, sc * self.chunk_size + within, piece, false)
                .await?;
        }
        Ok(())
    }

    // ---- administration ----

    /// Creates a snapshot. The request carries a fresh token: if the connection is lost
    /// before the answer, the session resends it and the server answers with the snapshot
    /// the first send created (not `NameTaken`).
    pub async fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo, ClientError> {
        let msg = ClientMsg::CreateSnapshot {
            name: name.into(),
            token: csnap_proto::create_token(),
        };
        match self.admin.request(msg).await?.msg {
            ServerMsg::SnapshotCreated { info } => Ok(info),
            other => Err(unexpected("CreateSnapshot", other)),
        }
    }

    /// Deletes a snapshot. A name is looked up once (`FindSnapshot`) and the delete names
    /// the id, so a resend after a lost connection can never hit a newer snapshot that
    /// took the name meanwhile.
    pub async fn delete_snapshot(&self, snap: SnapRef) -> Result<SnapId, ClientError> {
        let snap = match snap {
            SnapRef::Id(id) => id,
            SnapRef::Name(name) => self.find_snapshot(&name).await?.id,
        };
        match self
            .admin
            .request(ClientMsg::DeleteSnapshot { snap })
            .await?
            .msg
        {
            ServerMsg::SnapshotDeleted { snap } => {
                let conn = self
                    .snapshots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&snap);
                if let Some(conn) = conn {
                    self.snapshots_changed.send_modify(|v| *v += 1);
                    conn.shutdown().await;
                }
                Ok(snap)
            }
            other => Err(unexpected("DeleteSnapshot", other)),
        }
    }

    /// Rolls the origin back to snapshot `source`, online; the origin as it is now is kept
    /// as a new snapshot named `pin_name`. Returns the pin once the start is durable (the
    /// copy-back goes on in the background; `status` shows its progress).
    ///
    /// If the connection is lost before the answer, the session resends the request; a
    /// resend refused because the first send already started this very rollback (its pin
    /// name taken, or a rollback running) is answered with that rollback's pin while it
    /// runs. (So is asking again for the rollback that runs, with its pin's name.)
    pub async fn rollback(
        &self,
        source: SnapId,
        pin_name: &str,
    ) -> Result<SnapshotInfo, ClientError> {
        let msg = ClientMsg::Rollback {
            snap: source,
            pin_name: pin_name.into(),
        };
        match self.admin.request(msg).await {
            Ok(reply) => match reply.msg {
                ServerMsg::RollbackStarted { source: s, pin } if s == source => Ok(pin),
                other => Err(unexpected("Rollback", other)),
            },
            Err(
                e @ ClientError::Server {
                    code: ErrorCode::NameTaken | ErrorCode::RollbackInProgress,
                    ..
                },
            ) => match self.our_rollback(source, pin_name).await {
                Some(pin) => Ok(pin),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// The pin of the rollback to `source` with pin `pin_name`, if that one runs.
    async fn our_rollback(&self, source: SnapId, pin_name: &str) -> Option<SnapshotInfo> {
        let pin = self.find_snapshot(pin_name).await.ok()?;
        let status = self.status().await.ok()?;
        match status.rollback {
            Some(r) if r.source == source && r.pin == pin.id => Some(pin),
            _ => None,
        }
    }

    /// The live or invalid snapshot named `name` (`ClientError::Server{NoSuchSnapshot}`
    /// if none).
    pub async fn find_snapshot(&self, name: &str) -> Result<SnapshotInfo, ClientError> {
        let msg = ClientMsg::FindSnapshot { name: name.into() };
        match self.admin.request(msg).await?.msg {
            ServerMsg::SnapshotFound { info } => Ok(info),
            other => Err(unexpected("FindSnapshot", other)),
        }
    }

    /// Every listed snapshot, in id order, fetched page by page (each reply fits a frame).
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, ClientError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self.list_snapshots_page(after, MAX_LIST_PAGE).await?;
            all.extend(page.snapshots);
            match (page.more, all.last()) {
                (true, Some(last)) => after = Some(last.id),
                _ => return Ok(all),
            }
        }
    }

    /// One page of snapshots: those with id above `after`, at most `limit` (the server may
    /// return fewer).
    pub async fn list_snapshots_page(
        &self,
        after: Option<SnapId>,
        limit: u32,
    ) -> Result<SnapshotPage, ClientError> {
        let msg = ClientMsg::ListSnapshots { after, limit };
        match self.admin.request(msg).await?.msg {
            ServerMsg::SnapshotList {
                snapshots,
                more,
                usage_exact,
            } => {
                // A page that says "more" but is empty, or goes backwards, would loop forever.
                let ordered = snapshots.windows(2).all(|w| w[0].id < w[1].id)
                    && snapshots
                        .first()
                        .is_none_or(|s| after.is_none_or(|a| s.id > a));
                if !ordered || (more && snapshots.is_empty()) {
                    return Err(ClientError::Unexpected {
                        request: "ListSnapshots",
                        answer: format!(
                            "a page out of order, or empty with more to come (after {after:?})"
                        ),
                    });
                }
                Ok(SnapshotPage {
                    snapshots,
                    more,
                    usage_exact,
                })
            }
            other => Err(unexpected("ListSnapshots", other)),
        }
    }

    /// One page of the diff between two ends: the chunks at or after `start` they read
    /// differently (see `ClientMsg::Diff`). Ask again from `next` until it is `None`.
    pub async fn diff_page(
        &self,
        from: DiffEnd,
        to: DiffEnd,
        start: u64,
        budget: u32,
    ) -> Result<DiffPage, ClientError> {
        let msg = ClientMsg::Diff {
            from,
            to,
            start,
            budget,
        };
        match self.admin.request(msg).await?.msg {
            ServerMsg::DiffPage(page) => {
                // Ranges out of order, outside [start, next), or a `next` that does not move
                // forward would make a caller loop or report chunks twice.
                let end = page.next.unwrap_or(u64::MAX);
                let mut at = start;
                for r in &page.ranges {
                    match r.chunks() {
                        Some(c) if r.count > 0 && c.start >= at && c.end <= end => at = c.end,
                        _ => {
                            return Err(ClientError::Unexpected {
                                request: "Diff",
                                answer: format!(
                                "range {}+{} out of order or outside the page (from chunk {start})",
                                r.start, r.count
                            ),
                            })
                        }
                    }
                }
                if page.next.is_some_and(|n| n <= start) {
                    return Err(ClientError::Unexpected {
                        request: "Diff",
                        answer: format!("a next page at chunk {end}, not after {start}"),
                    });
                }
                Ok(page)
            }
            other => Err(unexpected("Diff", other)),
        }
    }

    /// The server's status figures (`csnapctl status`).
    pub async fn status(&self) -> Result<ServerStatus, ClientError> {
        match self.admin.request(ClientMsg::Status).await?.msg {
            ServerMsg::Status(s) => Ok(s),
            other => Err(unexpected("Status", other)),
        }
    }

    /// Drops every metadata connection of this volume (origin, admin, each snapshot) and
    /// connects again at once to the server target's current address, resuming: read
    /// locks and write leases are re-uploaded, unanswered requests resent, nothing fails.
    /// The cluster agent's reset of a stale node (`DropClients`) calls this so its
    /// clients reach the real server; a change of the target's address does the same on
    /// its own.
    pub fn reconnect(&self) {
        self.origin.reconnect();
        self.admin.reconnect();
        for c in self
            .snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            c.reconnect();
        }
    }

    /// How many sessions the snapshot connection of `snap` established (0 if it has
    /// none yet).
    pub fn snapshot_sessions(&self, snap: SnapId) -> u64 {
        self.snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&snap)
            .and_then(|c| c.session_info())
            .map_or(0, |i| i.sessions)
    }

    /// Closes every metadata connection (unanswered requests fail).
    pub async fn shutdown(&self) {
        let snaps: Vec<Arc<MetaConnection>> = self
            .snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in snaps {
            c.shutdown().await;
        }
        self.origin.shutdown().await;
        self.admin.shutdown().await;
    }
}

/// Parts of a read in one buffer (a copy only if there are several).
fn join(parts: Vec<Bytes>) -> Bytes {
    if let [only] = parts.as_slice() {
        return only.clone();
    }
    let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
    for part in &parts {
        out.extend_from_slice(part);
    }
    out.freeze()
}

/// Where a snapshot read of `[offset, offset + len)` finds its bytes, given the server's
/// answer (`store`: the chunks with an exception and their store chunks; every other chunk
/// is read from the origin): (device, device offset, length) runs in volume order, where
/// consecutive chunks from the same device that are contiguous there too form one run.
pub fn snapshot_read_runs(
    chunk_size: u64,
    store: &[StoreAddr],
    offset: u64,
    len: u32,
) -> Vec<(Which, u64, u64)> {
    let in_store: HashMap<u64, u64> = store.iter().map(|a| (a.chunk, a.store_chunk)).collect();
    let mut runs: Vec<(Which, u64, u64)> = Vec::new();
    if len == 0 || chunk_size == 0 {
        return runs;
    }
    let end = offset + u64::from(len);
    let first = offset / chunk_size;
    let last = (end - 1) / chunk_size;
    for chunk in first..=last {
        let chunk_start = chunk * chunk_size;
        let vol_off = offset.max(chunk_start);
        let n = end.min(chunk_start + chunk_size) - vol_off;
        let (which, dev_off) = match in_store.get(&chunk) {
            Some(&sc) => (Which::Store, sc * chunk_size + (vol_off - chunk_start)),
            None => (Which::Origin, vol_off),
        };
        match runs.last_mut() {
            Some((w, o, l)) if *w == which && *o + *l == dev_off => *l += n,
            _ => runs.push((which, dev_off, n)),
        }
    }
    runs
}

/// The chunks that extents `(offset, len)` touch, each once (extents may share a chunk or
/// overlap: the question, and the release of its locks, name each chunk once), as
/// ascending ranges.
/// Every extent must be non-empty and `chunk_size` non-zero.
fn extent_chunks(chunk_size: u64, extents: &[(u64, u32)]) -> Vec<ChunkRange> {
    let mut chunks: Vec<u64> = Vec::new();
    for &(offset, len) in extents {
        if len == 0 || chunk_size == 0 {
            continue;
        }
        let first = offset / chunk_size;
        let last = (offset + u64::from(len) - 1) / chunk_size;
        chunks.extend(first..=last);
    }
    chunks.sort_unstable();
    chunks.dedup();
    ChunkRange::coalesce(chunks)
}

fn conn_config(cfg: &ClientConfig, incarnation: u64, kind: ClientKind) -> ConnConfig {
    ConnConfig {
        server: cfg.server.clone(),
        key: cfg.key.clone(),
        client: client_id_for(cfg.instance, kind),
        node: cfg.node,
        incarnation,
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(5),
    }
}

/// Asks the server for a snapshot read of `ranges`: the store addresses of the chunks the
/// snapshot keeps there (held from reuse until released, see [`StoreReadsHeld`]) and the
/// origin chunks it read-locked, to be released by [`finish_snapshot_read`].
async fn ask_snapshot_read(
    conn: &MetaConnection,
    snap: SnapId,
    ranges: Vec<ChunkRange>,
) -> Result<(Vec<StoreAddr>, Vec<ChunkRange>), ClientError> {
    let reply = conn
        .request(ClientMsg::QuerySnapshotRead { snap, ranges })
        .await?;
    let (store, origin_locked) = match reply.msg {
        ServerMsg::SnapshotReadOk {
            store,
            origin_locked,
        } => (store, origin_locked),
        other => return Err(unexpected("QuerySnapshotRead", other)),
    };
    if !origin_locked.is_empty() {
        if let Some(hold) = test_hold_snapshot_reads() {
            // Test hook (see `test_hold_snapshot_reads`): keep the read locks longer.
            tokio::time::sleep(hold).await;
        }
    }
    Ok((store, origin_locked))
}

/// Releases a snapshot read's origin locks, whatever happened to the reads; the session
/// resends the release after a reconnect, so nothing waits for it here.
fn finish_snapshot_read(conn: &Arc<MetaConnection>, snap: SnapId, origin_locked: Vec<ChunkRange>) {
    if origin_locked.is_empty() {
        return;
    }
    let conn = conn.clone();
    tokio::spawn(async move {
        let msg = ClientMsg::FinishSnapshotRead {
            snap,
            ranges: origin_locked,
        };
        if let Err(e) = conn.request(msg).await {
            tracing::warn!(%snap, err = %e, "releasing snapshot read locks failed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection of every client has its own identity: a client's origin, admin and
    /// snapshot connections, and those of other clients whose base ids are close together
    /// (base 100's admin connection must not be base 101's origin connection, nor base
    /// 100's connection for snapshot 1 base 103's origin connection).
    #[test]
    fn connection_ids_of_different_clients_and_kinds_never_collide() {
        let mut kinds = vec![ClientKind::Origin, ClientKind::Admin];
        kinds.extend((0..40).map(|s| ClientKind::Snapshot { snap: SnapId(s) }));
        kinds.extend((u64::MAX - 2..=u64::MAX).map(|s| ClientKind::Snapshot { snap: SnapId(s) }));
        let bases = [
            100,
            101,
            102,
            103,
            141,
            1 << 32,
            (1 << 32) + 1,
            u64::MAX - 1,
            u64::MAX,
        ];
        let mut seen: HashMap<ClientId, (u64, ClientKind)> = HashMap::new();
        for base in bases {
            for &kind in &kinds {
                let id = client_id_for(base, kind);
                if let Some(prev) = seen.insert(id, (base, kind)) {
                    panic!(
                        "client id {id} is both base {:#x} {:?} and base {base:#x} {kind:?}",
                        prev.0, prev.1
                    );
                }
            }
        }
    }

    /// Unaligned extents sharing chunks, overlapping and out of order: every chunk they
    /// touch, each once, ascending.
    #[test]
    fn extent_chunks_names_each_touched_chunk_once() {
        let k = 64 * 1024;
        let extents = [
            (10 * k + 100, 50),        // inside chunk 10
            (10 * k + 4000, k as u32), // chunks 10 and 11 (crosses a boundary)
            (3 * k, 2 * k as u32),     // chunks 3, 4
            (4 * k + 1, 1),            // chunk 4 again
            (20 * k - 1, 2),           // chunks 19 and 20
        ];
        assert_eq!(
            extent_chunks(k, &extents),
            vec![
                ChunkRange::new(3, 2),
                ChunkRange::new(10, 2),
                ChunkRange::new(19, 2),
            ]
        );
        assert_eq!(extent_chunks(k, &[]), Vec::<ChunkRange>::new());
    }
}
