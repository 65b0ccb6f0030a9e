//! The metadata server's I/O shell around the sans-IO [`Engine`](crate::engine::Engine):
//! sockets, the engine thread, chunk copies, commits, ticks and shutdown.
//!
//! ```text
//!  accept ──► per-connection reader ──(bounded mpsc)──► engine thread ──► writer queues
//!                                                        │   ▲
//!                              status, declare_gone ─────┘   │ CopyDone
//!                                 copy workers (blocking pool, bounded) ◄── Copy
//! ```
//!
//! [`start`] checks the key file, opens the store (journal replay, generation bump), builds
//! the engine and serves until [`RunningServer::shutdown`] or a fatal store error.
//! docs/server.md describes running the server, its options and its logs.

mod conn;
mod copy_runs;
mod driver;
mod held_copies;
pub mod key;
mod lease;

use crate::engine::{Engine, EngineConfig, MetaError};
use crate::store::{self, BlockDevice, FileDevice, OpenOptions, Store};
use csnap_proto::net::{ListenError, Listener};
use csnap_proto::{ClientId, ListenAddr, ServerStatus};
pub use driver::{unix_now as clock_now_secs, CopyError, DataPath, ServerFailure};
use driver::{Control, Driver, DriverParts, Exit, Input};
use lease::{Extended, ServingLease};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use held_copies::{CopyDurability, HeldCopies};
pub use key::KeyFileError;

/// Everything `start` needs. [`ServerConfig::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The origin device (read for copy-outs).
    pub origin: PathBuf,
    /// The snapshot store device (formatted with `csnapctl format`).
    pub store: PathBuf,
    /// Where clients connect.
    pub listen: ListenAddr,
    /// The cluster key: a regular file of mode 0600 owned by the server's user.
    pub key_file: PathBuf,
    /// The request engine's configuration, as the engine takes it: the activation gate's
    /// client list (`expected_snapshot_clients`), the store-full policy, warning levels,
    /// unique promises, request bounds, orphan grace, origin leases, the snapshot hold
    /// after a failover, the authentication timeout (`auth_timeout_secs`). `start` fills
    /// in only what it owns: the cluster key (read from `key_file`) and the start time.
    pub engine: EngineConfig,
    /// Cluster mode: the membership generation this server is activated for; the store's
    /// open refuses a store a later generation served (`StoreError::ClusterGenerationAhead`).
    pub cluster_generation: Option<u64>,
    /// Bound of the store's metadata block cache, in bytes.
    pub cache_bytes: u64,
    /// Open the devices with O_DIRECT, so copy-outs read what other nodes wrote rather than
    /// a stale page cache. Required whenever a client may run on another host; a device
    /// or origin size that O_DIRECT cannot serve is then refused (`NoDirectIo`), never
    /// silently served buffered. `false` only where every client shares this host's page
    /// cache.
    pub direct_io: bool,
    /// Most simultaneous connections; more are refused at accept.
    pub max_connections: usize,
    /// Frames queued per connection; a client that lets its queue fill is closed.
    pub send_queue_frames: usize,
    /// Chunk copies running at once on the blocking pool.
    pub max_copies_in_flight: usize,
    /// Name in every log line (defaults to the store path).
    pub volume: String,
    /// Cluster mode: the end of the serving lease the agent granted at start. The server
    /// serves only until then, unless [`RunningServer::extend_serving_lease`] moves it
    /// later; once it has passed the server stops at once (`failed()` says "serving lease
    /// expired"). `None` (the default, standalone mode): no lease, serve until shut down.
    pub serving_lease_until: Option<Instant>,
}

impl ServerConfig {
    /// The configuration for these devices, address and key file, with the defaults for the rest.
    pub fn new(
        origin: impl Into<PathBuf>,
        store: impl Into<PathBuf>,
        listen: ListenAddr,
        key_file: impl Into<PathBuf>,
    ) -> ServerConfig {
        let store = store.into();
        ServerConfig {
            origin: origin.into(),
            volume: store.display().to_string(),
            store,
            listen,
            key_file: key_file.into(),
            engine: EngineConfig::default(),
            cluster_generation: None,
            cache_bytes: 64 << 20,
            direct_io: true,
            max_connections: 1024,
            send_queue_frames: 1024,
            max_copies_in_flight: 32,
            serving_lease_until: None,
        }
    }
}

/// Why a server could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
pub enum ServerError {
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("cannot open the {what} device {path}: {source}")]
    OpenDevice {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot open the snapshot store {path}: {source}")]
    Store {
        path: PathBuf,
        source: store::StoreError,
    },
    #[error(
        "origin {path} has {size} bytes but the store {store} was formatted for an origin of \
         {needed} bytes (wrong device?)"
    )]
    OriginTooSmall {
        path: PathBuf,
        size: u64,
        store: PathBuf,
        needed: u64,
    },
    #[error(
        "the snapshot store {path} is in use by another server on this node (it holds the \
         store's lock)"
    )]
    StoreInUse { path: PathBuf },
    #[error(
        "the {what} device {path} cannot be used with O_DIRECT, which a server must use when \
         clients on other hosts write the same devices: {why}"
    )]
    NoDirectIo {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("the request engine could not start: {0}")]
    Engine(#[source] MetaError),
    #[error("the store open task failed: {0}")]
    OpenTask(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot start the engine thread: {0}")]
    Thread(io::Error),
    #[error("the server is not running")]
    Stopped,
    #[error("the server failed: {0}")]
    Failed(#[source] ServerFailure),
    #[error("closing the snapshot store failed: {0}")]
    Close(#[source] store::StoreError),
    /// The serving lease ran out: before the server could start serving, or before an
    /// extension arrived (the server has then stopped, as `failed()` reports).
    #[error("the serving lease has expired")]
    LeaseExpired,
    /// `extend_serving_lease` on a server started without a lease (standalone mode).
    #[error("this server runs without a serving lease")]
    NoLease,
}

/// A running server. Dropping it without [`shutdown`](RunningServer::shutdown) stops
/// serving but leaves the store unclean (as a crash would).
pub struct RunningServer {
    local_addr: ListenAddr,
    ctl_tx: mpsc::UnboundedSender<Control>,
    stop: CancellationToken,
    fatal_rx: watch::Receiver<Option<ServerFailure>>,
    exit_rx: Option<oneshot::Receiver<Exit>>,
    tasks: Vec<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
    generation: u64,
    was_unclean: bool,
    lease: Arc<ServingLease>,
    first_origin_grant: Arc<AtomicU64>,
}

impl RunningServer {
    /// When this server granted its first origin write (Unix ms), if it did yet: the end
    /// of a failover as the writers see it (the agent shows it in `csnapctl status`).
    pub fn first_origin_write_at_ms(&self) -> Option<u64> {
        match self
            .first_origin_grant
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            ms => Some(ms),
        }
    }

    /// The bound address (with the real port when listening on port 0).
    pub fn local_addr(&self) -> ListenAddr {
        self.local_addr.clone()
    }

    /// The server generation of this run (bumped in the store at start).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// True if the previous server did not shut down cleanly (its journal was replayed).
    pub fn recovered_unclean(&self) -> bool {
        self.was_unclean
    }

    /// Cluster mode: the agent renewed the serving lease; serve until `until` (never
    /// shortens the lease). `Err(LeaseExpired)` when the lease had already run out: the
    /// server has stopped serving (or is stopping this instant) and stays stopped; a new
    /// server must be started (after the failover wait) instead. `Err(NoLease)` for a
    /// server started without a lease.
    pub fn extend_serving_lease(&self, until: Instant) -> Result<(), ServerError> {
        match self.lease.extend_at(until, Instant::now()) {
            Extended::Yes => Ok(()),
            Extended::Expired => Err(ServerError::LeaseExpired),
            Extended::NoLease => Err(ServerError::NoLease),
        }
    }

    /// The end of the serving lease as it stands; `None` without a lease or once it ran out.
    pub fn serving_lease_until(&self) -> Option<Instant> {
        self.lease.until()
    }

    /// The agent knows `client` is gone for good: stop waiting for it at the activation
    /// gate and release what it held.
    pub fn declare_gone(&self, client: ClientId) {
        let _ = self.ctl_tx.send(Control::DeclareGone(client));
    }

    /// The engine's status (what a client's `Status` request returns).
    pub async fn status(&self) -> Result<ServerStatus, ServerError> {
        let (tx, rx) = oneshot::channel();
        self.ctl_tx
            .send(Control::Status(tx))
            .map_err(|_| ServerError::Stopped)?;
        rx.await.map_err(|_| ServerError::Stopped)
    }

    /// Resolves when the server stopped serving after a fatal error, with the reason (its
    /// cause chain as `source`). Pending forever while it serves normally.
    pub async fn failed(&self) -> ServerFailure {
        let mut rx = self.fatal_rx.clone();
        let reason = match rx.wait_for(|f| f.is_some()).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }

    /// Clean shutdown: stop accepting, close every connection after its queued replies,
    /// let copies in flight land, close the store (marked clean). After a fatal error this
    /// returns `Failed` with its reason.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop_accepting();
        let _ = self.ctl_tx.send(Control::Shutdown);
        let exit = match self.exit_rx.take() {
            Some(rx) => rx.await.map_err(|_| ServerError::Stopped)?,
            None => return Err(ServerError::Stopped),
        };
        self.stop.cancel();
        self.cleanup();
        match exit {
            Exit::Shutdown(Ok(())) => Ok(()),
            Exit::Shutdown(Err(e)) => Err(ServerError::Close(e)),
            Exit::Fatal(reason) => Err(ServerError::Failed(reason)),
            Exit::Abandoned => Err(ServerError::Stopped),
        }
    }

    fn stop_accepting(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    fn cleanup(&mut self) {
        self.stop_accepting();
        if let Some(path) = self.unix_path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if self.exit_rx.is_some() {
            // Not shut down: stop serving and leave the store as a crash would.
            let _ = self.ctl_tx.send(Control::Abandon);
            self.stop.cancel();
        }
        self.cleanup();
    }
}

/// Opens the device at `path`, with O_DIRECT if asked; a device O_DIRECT cannot serve is
/// then an error, never a silent fall-back to the page cache (which other hosts' writes
/// bypass).
fn open_device(
    what: &'static str,
    path: &Path,
    direct: bool,
) -> Result<Arc<dyn BlockDevice>, ServerError> {
    let err = |source| ServerError::OpenDevice {
        what,
        path: path.to_owned(),
        source,
    };
    let no_direct = |why: String| ServerError::NoDirectIo {
        what,
        path: path.to_owned(),
        why,
    };
    if direct {
        return match FileDevice::open(path, true) {
            Ok(d) if d.len() % store::device::SECTOR as u64 == 0 => Ok(Arc::new(d)),
            Ok(d) => Err(no_direct(format!(
                "its size, {} bytes, is not a multiple of {} bytes",
                d.len(),
                store::device::SECTOR
            ))),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(no_direct(
                "its file system does not support O_DIRECT (tmpfs?)".into(),
            )),
            Err(e) => Err(err(e)),
        };
    }
    Ok(Arc::new(FileDevice::open(path, false).map_err(err)?))
}

struct Opened {
    store: Store,
    data: DataPath,
    /// The store device as the store and the copies use it, counting its flushes.
    store_flushes: Arc<store::FlushTracked>,
    /// Held while the server runs: a second server on this node refuses the store.
    _lock: StoreLock,
}

type StoreLock = nix::fcntl::Flock<std::fs::File>;

/// Takes an exclusive advisory lock on the store path. It only guards against two servers
/// on one node (the agent's election is what keeps servers on different nodes apart).
fn lock_store(path: &Path) -> Result<StoreLock, ServerError> {
    let file = std::fs::File::open(path).map_err(|source| ServerError::OpenDevice {
        what: "store",
        path: path.to_owned(),
        source,
    })?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(ServerError::StoreInUse {
            path: path.to_owned(),
        }),
        Err((_, errno)) => Err(ServerError::OpenDevice {
            what: "store",
            path: path.to_owned(),
            source: io::Error::from(errno),
        }),
    }
}

fn open_store(config: &ServerConfig) -> Result<Opened, ServerError> {
    let lock = lock_store(&config.store)?;
    let store_flushes = Arc::new(store::FlushTracked::new(open_device(
        "store",
        &config.store,
        config.direct_io,
    )?));
    let store_dev: Arc<dyn store::BlockDevice> = store_flushes.clone();
    let origin = open_device("origin", &config.origin, config.direct_io)?;
    let opts = OpenOptions {
        cache_blocks: (config.cache_bytes / store::device::SECTOR as u64)
            .try_into()
            .unwrap_or(usize::MAX),
        cluster_generation: config.cluster_generation,
    };
    let store = Store::open(store_dev.clone(), opts).map_err(|source| ServerError::Store {
        path: config.store.clone(),
        source,
    })?;
    let geometry = *store.geometry();
    let sector = store::device::SECTOR as u64;
    if config.direct_io && geometry.origin_size % sector != 0 {
        // The last (partial) chunk's length would not suit O_DIRECT.
        let _ = store.close();
        return Err(ServerError::NoDirectIo {
            what: "origin",
            path: config.origin.clone(),
            why: format!(
                "the store {} was formatted for an origin of {} bytes, not a multiple of {sector} \
                 bytes (format the store for an aligned origin size)",
                config.store.display(),
                geometry.origin_size
            ),
        });
    }
    if origin.len() < geometry.origin_size {
        // Leave the store as we found it apart from the generation bump.
        let _ = store.close();
        return Err(ServerError::OriginTooSmall {
            path: config.origin.clone(),
            size: origin.len(),
            store: config.store.clone(),
            needed: geometry.origin_size,
        });
    }
    Ok(Opened {
        store,
        data: DataPath::new(origin, store_dev, geometry),
        store_flushes,
        _lock: lock,
    })
}

/// A listening socket bound ahead of [`start_bound`]: clients that connect meanwhile wait
/// in the kernel's backlog until the server accepts them, instead of being refused and
/// backing off (cluster mode binds when its announce is delivered, before the gather and
/// the store's opening, so the first writes after a failover need no retry).
pub struct BoundListener(Listener);

impl std::fmt::Debug for BoundListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoundListener")
    }
}

/// Binds `addr` (as [`start`] would) without serving yet.
pub async fn bind_early(addr: &ListenAddr) -> Result<BoundListener, ServerError> {
    Ok(BoundListener(Listener::bind(addr).await?))
}

/// Starts a server: checks the key file, opens the store (replaying its journal and bumping
/// the server generation), builds the engine, listens and serves.
///
/// Every line the server logs (engine thread, connection tasks) is in a span `server`,
/// a child of the span current at the call, which should carry `csnap_volume` (the
/// agent's volume span carries it and `csnap_node`); without a current span the server's
/// own span carries `csnap_volume`.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    start_bound(config, None).await
}

/// [`start`] on a listener bound earlier by [`bind_early`] (for `config.listen`), or
/// binding now when `None`.
pub async fn start_bound(
    config: ServerConfig,
    bound: Option<BoundListener>,
) -> Result<RunningServer, ServerError> {
    let span = if tracing::Span::current().is_none() {
        tracing::info_span!("server", csnap_volume = %config.volume)
    } else {
        tracing::info_span!("server")
    };
    start_in(config, bound, span.clone()).instrument(span).await
}

async fn start_in(
    config: ServerConfig,
    bound: Option<BoundListener>,
    span: tracing::Span,
) -> Result<RunningServer, ServerError> {
    let cluster_key = key::load_key_file(&config.key_file)?;
    let lease = Arc::new(ServingLease::new(config.serving_lease_until));
    if lease.expired() {
        // Too late to serve at all: do not even touch the store.
        return Err(ServerError::LeaseExpired);
    }
    let listener = match bound {
        Some(BoundListener(l)) => l,
        None => Listener::bind(&config.listen).await?,
    };
    // A listener this server bound always knows its address.
    let local_addr = listener
        .local_addr()
        .cloned()
        .unwrap_or_else(|| config.listen.clone());
    let unix_path = local_addr.unix_path().map(Path::to_owned);
    let cleanup_socket = |p: &Option<PathBuf>| {
        if let Some(p) = p {
            let _ = std::fs::remove_file(p);
        }
    };

    let cfg = config.clone();
    let opened = match tokio::task::spawn_blocking(move || open_store(&cfg)).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            cleanup_socket(&unix_path);
            return Err(e);
        }
        Err(e) => {
            cleanup_socket(&unix_path);
            return Err(ServerError::OpenTask(e));
        }
    };
    let Opened {
        store,
        data,
        store_flushes,
        _lock: store_lock,
    } = opened;
    if lease.expired() {
        // The lease ran out while the store opened (journal replay): serve nothing, and
        // leave the store as it is (no close, no commit) for the next server.
        tracing::error!(
            volume = %config.volume,
            "SERVING LEASE EXPIRED while the store was opening: not serving"
        );
        drop(store);
        cleanup_socket(&unix_path);
        return Err(ServerError::LeaseExpired);
    }
    let generation = store.superblock().server_generation;
    let was_unclean = store.was_unclean();
    let volume = config.volume.clone();
    if was_unclean {
        tracing::warn!(
            %volume,
            generation,
            previous_generation = generation.saturating_sub(1),
            transactions_replayed = store.transactions_replayed(),
            "UNCLEAN SHUTDOWN of the previous server (generation {}): store recovered from its journal",
            generation.saturating_sub(1)
        );
    } else {
        tracing::info!(%volume, generation, "store opened (previous shutdown was clean)");
    }

    let engine_config = EngineConfig {
        cluster_key: cluster_key.clone(),
        auth_timeout_secs: config.engine.auth_timeout_secs.max(1),
        start_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        ..config.engine.clone()
    };
    let engine = match Engine::new(store, engine_config) {
        Ok(e) => e,
        Err(e) => {
            cleanup_socket(&unix_path);
            return Err(ServerError::Engine(e));
        }
    };

    let rt = tokio::runtime::Handle::current();
    let (net_tx, net_rx) = mpsc::channel::<Input>(1024);
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let (fatal_tx, fatal_rx) = watch::channel(None);
    let fatal_tx = Arc::new(fatal_tx);
    let (exit_tx, exit_rx) = oneshot::channel();
    let stop = CancellationToken::new();
    let first_origin_grant = Arc::new(AtomicU64::new(0));
    let driver = Driver::new(DriverParts {
        engine,
        rt: rt.clone(),
        net_rx,
        ctl_rx,
        ctl_tx: ctl_tx.clone(),
        data: Arc::new(data),
        store_flushes,
        max_copies: config.max_copies_in_flight,
        fatal_tx: fatal_tx.clone(),
        stop: stop.clone(),
        volume: volume.clone(),
        lease: lease.clone(),
        span: span.clone(),
        first_origin_grant: first_origin_grant.clone(),
    });
    let thread_stop = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("csnap-engine".into())
        .spawn(move || {
            // A bug that panics the engine must not leave a process that accepts
            // connections and serves nothing: it becomes a fatal error like any other.
            let exit = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.run()))
            {
                Ok(exit) => exit,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    let reason = ServerFailure::Panicked(what);
                    tracing::error!(%reason, "FATAL: the server stops serving now");
                    let _ = fatal_tx.send(Some(reason.clone()));
                    thread_stop.cancel();
                    Exit::Fatal(reason)
                }
            };
            // The store is closed (or abandoned): another server may take it now.
            drop(store_lock);
            let _ = exit_tx.send(exit);
        });
    if let Err(e) = spawned {
        cleanup_socket(&unix_path);
        return Err(ServerError::Thread(e));
    }

    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    // Every log line of the connection tasks carries the volume, like the engine thread's.
    let acceptor = tokio::spawn(
        accept_loop(
            listener,
            conn::ConnShared {
                net_tx,
                queue_frames: config.send_queue_frames,
                server_stop: stop.clone(),
                lease: lease.clone(),
            },
            slots,
        )
        .instrument(span),
    );
    match config.serving_lease_until {
        Some(until) => tracing::info!(
            %volume,
            listen = %local_addr,
            generation,
            lease_left_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
            "serving (under a serving lease)"
        ),
        None => tracing::info!(%volume, listen = %local_addr, generation, "serving"),
    }
    Ok(RunningServer {
        local_addr,
        ctl_tx,
        stop,
        fatal_rx,
        exit_rx: Some(exit_rx),
        tasks: vec![acceptor],
        unix_path,
        generation,
        was_unclean,
        lease,
        first_origin_grant,
    })
}

async fn accept_loop(listener: Listener, shared: conn::ConnShared, slots: Arc<Semaphore>) {
    static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
    let stop = shared.server_stop.clone();
    listener
        .accept_until(stop.cancelled(), |stream, peer| {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many connections; refusing");
                return;
            };
            let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(
                conn::serve_connection(stream, conn, peer, shared.clone(), permit)
                    .in_current_span(),
            );
        })
        .await;
}
