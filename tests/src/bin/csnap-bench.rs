//! csnap-bench: the store/server benchmark (issue 3). Prints figures, asserts nothing.
//!
//! ```text
//! cargo run --release -p csnap-e2e --bin csnap-bench -- [--quick]
//! ```
//!
//! 1. Origin-write copy-out throughput with 1, 64, 1,000 and 10,000 snapshots, through a
//!    real `csnap-server` (this binary re-executed as `serve-child`, which calls
//!    `net::start`) and a csnap-proto origin client that writes the origin itself after
//!    each grant, many requests in flight.
//! 2. Metadata lookup time per chunk (`Store::snapshot_chunk`, the lookup behind
//!    `QuerySnapshotRead`) at the same snapshot counts, on a populated exception tree.
//! 3. Server RSS with a 1 TiB sparse origin and store, after random copy-outs over the
//!    whole volume, for two metadata cache sizes (and a 16 GiB volume for comparison).
//!
//! 4. Diff of two snapshots from metadata only (`Store::diff_page`, behind `csnapctl diff`
//!    and export-diff) on a 1 TiB sparse volume with 1% of its chunks changed between
//!    them, against what reading and comparing both images in full would cost.
//!
//! Everything runs on sparse files in a temporary directory that is removed at the end.
//! docs/benchmarks.md has the figures and how to read them.

use clap::Parser;
use csnap_proto::auth;
use csnap_proto::ListenAddr;
use csnap_proto::*;
use csnap_server::net::{self, ServerConfig};
use csnap_server::store::{ChunkSource, FileDevice, FormatOptions, OpenOptions, Store};
use futures::{SinkExt as _, StreamExt as _};
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, RwLock, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite};

type BenchResult<T> = Result<T, String>;

/// Bound on every single wait for the server (a reply, the socket appearing, an exit).
const WAIT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

#[derive(Parser, Debug)]
#[command(
    name = "csnap-bench",
    about = "csnap store/server benchmark: copy-out throughput vs snapshot count, metadata \
             lookup time, server RSS on a 1 TiB sparse volume"
)]
struct Args {
    /// Small sizes (well under a minute; a smoke check, the figures are not meaningful).
    #[arg(long)]
    quick: bool,
    /// Parent of the temporary directory (must support O_DIRECT and sparse files).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Seed of the random chunk choices (printed; random when absent).
    #[arg(long)]
    seed: Option<u64>,
    /// Run only these parts (1, 2 = throughput and lookups; 3 = RSS; 4 = diff). Default: all.
    #[arg(long, value_delimiter = ',')]
    parts: Vec<u32>,
    #[command(subcommand)]
    child: Option<ChildCommand>,
}

#[derive(clap::Subcommand, Debug)]
enum ChildCommand {
    /// (internal) Run a server with `net::start` until SIGTERM; the benchmark starts this.
    #[command(hide = true)]
    ServeChild {
        #[arg(long)]
        origin: PathBuf,
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        cache_mb: u64,
    },
}

/// Sizes of one run.
#[derive(Clone, Debug)]
struct Plan {
    snapshot_counts: Vec<u64>,
    /// Chunk size of parts 1 and 2.
    chunk_size: u64,
    /// Fresh origin chunks written (each needing a copy-out) per measurement.
    writes_per_count: u64,
    /// Measurements per snapshot count (each on its own fresh region); the median counts.
    repeats: u64,
    /// Origin writes in flight.
    write_depth: usize,
    /// Snapshot creates in flight.
    create_depth: usize,
    /// Exception records put in the tree (metadata only) before part 1.
    populate_records: u64,
    lookups: usize,
    /// Part 3: (origin = store size, metadata cache MiB) per row.
    rss_rows: Vec<(u64, u64)>,
    rss_chunk_size: u64,
    rss_populate_records: u64,
    rss_copy_outs: u64,
    /// Part 4: volume size; changed chunks per 10,000.
    diff_volume: u64,
    diff_changed_per_10k: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                snapshot_counts: vec![1, 64, 1000, 10_000],
                chunk_size: 64 << 10,
                writes_per_count: 128,
                repeats: 1,
                write_depth: 32,
                create_depth: 64,
                populate_records: 20_000,
                lookups: 20_000,
                rss_rows: vec![(TIB, 4), (TIB, 16)],
                rss_chunk_size: 4096,
                rss_populate_records: 100_000,
                rss_copy_outs: 500,
                diff_volume: 16 * GIB,
                diff_changed_per_10k: 100,
            }
        } else {
            Plan {
                snapshot_counts: vec![1, 64, 1000, 10_000],
                chunk_size: 64 << 10,
                writes_per_count: 1024,
                repeats: 7,
                write_depth: 32,
                create_depth: 64,
                populate_records: 300_000,
                lookups: 200_000,
                rss_rows: vec![(TIB, 4), (TIB, 16), (16 * GIB, 4)],
                rss_chunk_size: 4096,
                rss_populate_records: 1_000_000,
                rss_copy_outs: 3_000,
                diff_volume: TIB,
                diff_changed_per_10k: 100,
            }
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(ChildCommand::ServeChild {
        origin,
        store,
        socket,
        key_file,
        cache_mb,
    }) = args.child
    {
        return serve_child(origin, store, socket, key_file, cache_mb);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("csnap-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("csnap-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// The server child process

/// The child: a real server (`net::start`, O_DIRECT devices, the shell's copy workers and
/// group commit) on a Unix socket, until SIGTERM.
fn serve_child(
    origin: PathBuf,
    store: PathBuf,
    socket: PathBuf,
    key_file: PathBuf,
    cache_mb: u64,
) -> ExitCode {
    // Stop (cleanly, as on SIGTERM) when the benchmark dies, whatever killed it.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM) {
        eprintln!("serve-child: cannot ask for SIGTERM at the benchmark's exit: {e}");
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("serve-child: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("serve-child: cannot install SIGTERM handler: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut config = ServerConfig::new(origin, store, ListenAddr::Unix(socket), key_file);
        config.cache_bytes = cache_mb * MIB;
        config.volume = "bench".into();
        let server = match net::start(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("serve-child: {e}");
                return ExitCode::from(2);
            }
        };
        let failure = tokio::select! {
            _ = term.recv() => None,
            reason = server.failed() => Some(reason),
        };
        match (server.shutdown().await, failure) {
            (Ok(()), None) => ExitCode::SUCCESS,
            (Err(e), _) => {
                eprintln!("serve-child: {e}");
                ExitCode::FAILURE
            }
            (Ok(()), Some(reason)) => {
                eprintln!("serve-child: failed: {reason}");
                ExitCode::FAILURE
            }
        }
    })
}

/// The server child, killed (by PID) if still running when dropped.
struct ServerChild {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl ServerChild {
    async fn start(fx: &Fixture, cache_mb: u64, name: &str) -> BenchResult<ServerChild> {
        let socket = fx.dir.join(format!("{name}.sock"));
        let log = fx.dir.join(format!("{name}.log"));
        // This very binary, even if a rebuild has replaced the file since it started.
        let exe = PathBuf::from("/proc/self/exe");
        let stderr = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(exe)
            .arg("serve-child")
            .arg("--origin")
            .arg(&fx.origin)
            .arg("--store")
            .arg(&fx.store)
            .arg("--socket")
            .arg(&socket)
            .arg("--key-file")
            .arg(&fx.key_file)
            .arg("--cache-mb")
            .arg(cache_mb.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start the server child: {e}"))?;
        let mut server = ServerChild {
            child: Some(child),
            socket,
            log,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if tokio::net::UnixStream::connect(&server.socket)
                .await
                .is_ok()
            {
                return Ok(server);
            }
            if let Some(child) = server.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    server.child = None;
                    return Err(format!(
                        "the server exited with {status}: {}",
                        server.log_tail()
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("the server did not listen within {WAIT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// SIGTERM, then a clean exit within `WAIT` (the store is closed cleanly).
    async fn stop(mut self) -> BenchResult<()> {
        let Some(mut child) = self.child.take() else {
            return Err("the server is not running".into());
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .map_err(|e| format!("SIGTERM to the server: {e}"))?;
        let deadline = Instant::now() + WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(format!(
                        "the server exited with {status}: {}",
                        self.log_tail()
                    ))
                }
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("the server did not stop within {WAIT:?}"));
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => return Err(format!("waiting for the server: {e}")),
            }
        }
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// User + system CPU time of a process (all its threads, live or exited).
fn cpu_time(pid: u32) -> BenchResult<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // Fields after the command name (which may hold spaces) start at its closing paren;
    // utime and stime are fields 14 and 15, i.e. the 12th and 13th after it.
    let after = text
        .rfind(')')
        .map(|at| &text[at + 1..])
        .ok_or_else(|| format!("{path}: no command field"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> BenchResult<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("{path}: field {} is not a number", i + 3))
    };
    let per_sec = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        _ => 100,
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_micros(total * 1_000_000 / per_sec))
}

/// Threads of a process.
fn threads(pid: u32) -> BenchResult<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("{path} has no Threads line"))
}

/// VmRSS and VmHWM of a process, in KiB.
fn rss_kib(pid: u32) -> BenchResult<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let field = |name: &str| -> BenchResult<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("{path} has no {name} line"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

// ---------------------------------------------------------------------------------------
// Files

/// A temporary directory, removed (with everything in it) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path) -> BenchResult<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = parent.join(format!("csnap-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Origin, store and key file of one volume, inside the benchmark's directory.
struct Fixture {
    dir: PathBuf,
    origin: PathBuf,
    store: PathBuf,
    key_file: PathBuf,
    key: Vec<u8>,
    chunk_size: u64,
    origin_chunks: u64,
    /// Time `Store::format` took, and the bytes the store file occupies after it.
    format_time: Duration,
    store_allocated_after_format: u64,
}

impl Fixture {
    /// Sparse origin and store files of the given sizes, the store formatted.
    fn new(
        dir: &Path,
        name: &str,
        chunk_size: u64,
        origin_bytes: u64,
        store_bytes: u64,
    ) -> BenchResult<Fixture> {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let origin = dir.join("origin");
        let store = dir.join("store");
        let key_file = dir.join("cluster.key");
        for (path, len) in [(&origin, origin_bytes), (&store, store_bytes)] {
            File::create(path)
                .and_then(|f| f.set_len(len))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let dev = FileDevice::open(&store, true)
            .map_err(|e| format!("{} (O_DIRECT): {e}", store.display()))?;
        let started = Instant::now();
        Store::format(
            &dev,
            &FormatOptions {
                chunk_size,
                origin_size: origin_bytes,
                now: unix_now(),
                uuid: None,
            },
        )
        .map_err(|e| format!("format {}: {e}", store.display()))?;
        let format_time = started.elapsed();
        let store_allocated_after_format = allocated_bytes(&store)?;
        net::key::write_new_key(&key_file, false).map_err(|e| e.to_string())?;
        let key = net::key::load_key_file(&key_file).map_err(|e| e.to_string())?;
        Ok(Fixture {
            dir,
            origin,
            store,
            key_file,
            key,
            chunk_size,
            origin_chunks: origin_bytes / chunk_size,
            format_time,
            store_allocated_after_format,
        })
    }

    fn open_store(&self, cache_blocks: usize) -> BenchResult<Store> {
        let dev = FileDevice::open(&self.store, true)
            .map_err(|e| format!("{}: {e}", self.store.display()))?;
        Store::open(
            Arc::new(dev),
            OpenOptions {
                cache_blocks,
                ..OpenOptions::default()
            },
        )
        .map_err(|e| format!("open {}: {e}", self.store.display()))
    }

    /// Fills origin chunks `chunks` with data (so a copy-out reads real blocks, not holes).
    fn fill_origin(&self, chunks: std::ops::Range<u64>) -> BenchResult<()> {
        let f = File::options()
            .write(true)
            .open(&self.origin)
            .map_err(|e| format!("{}: {e}", self.origin.display()))?;
        let batch = 64u64;
        let mut rng = StdRng::seed_from_u64(chunks.start);
        let mut buf = vec![0u8; (batch * self.chunk_size) as usize];
        let mut c = chunks.start;
        while c < chunks.end {
            let n = batch.min(chunks.end - c);
            rng.fill(&mut buf[..]);
            f.write_all_at(&buf[..(n * self.chunk_size) as usize], c * self.chunk_size)
                .map_err(|e| format!("filling the origin: {e}"))?;
            c += n;
        }
        f.sync_all().map_err(|e| format!("syncing the origin: {e}"))
    }
}

fn allocated_bytes(path: &Path) -> BenchResult<u64> {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Puts `count` exception records for distinct random chunks of `chunks` into the tree, in
/// chunk order (dense leaves, and far fewer journal commits than random order), metadata only (the reserved store chunks are never written: the data area stays
/// sparse). Needs a live snapshot. Returns the chunks, sorted, and the time taken.
fn populate_tree(
    store: &mut Store,
    chunks: std::ops::Range<u64>,
    count: u64,
    rng: &mut StdRng,
) -> BenchResult<(Vec<u64>, Duration)> {
    let span = chunks.end - chunks.start;
    let count = count.min(span);
    let mut picked = BTreeSet::new();
    while (picked.len() as u64) < count {
        picked.insert(chunks.start + rng.gen_range(0..span));
    }
    let started = Instant::now();
    for (i, &chunk) in picked.iter().enumerate() {
        let store_chunk = store
            .reserve_chunk()
            .map_err(|e| format!("populate: reserve: {e}"))?;
        let recorded = store
            .record_copy_out(chunk, store_chunk)
            .map_err(|e| format!("populate: record chunk {chunk}: {e}"))?;
        if !recorded {
            return Err(format!("populate: chunk {chunk} needed no copy-out"));
        }
        if (i + 1).is_multiple_of(1024) {
            store
                .commit()
                .map_err(|e| format!("populate: commit: {e}"))?;
        }
    }
    store
        .commit()
        .map_err(|e| format!("populate: commit: {e}"))?;
    Ok((picked.into_iter().collect(), started.elapsed()))
}

// ---------------------------------------------------------------------------------------
// A csnap-proto client

type Pending = Arc<Mutex<HashMap<RequestId, oneshot::Sender<ServerMsg>>>>;

/// A pipelined protocol client on a Unix socket. An origin client acknowledges
/// `NewSnapshot` only when none of its granted writes is still in flight (the `gate`), as
/// a real origin client must.
struct Client {
    out: mpsc::UnboundedSender<ClientFrame>,
    pending: Pending,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
    /// Held shared by an origin write from its query to its data write.
    gate: Arc<RwLock<()>>,
    reader: tokio::task::AbortHandle,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    async fn connect(socket: &Path, key: &[u8], id: u64, kind: ClientKind) -> BenchResult<Client> {
        let io = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect {}: {e}", socket.display()))?;
        let (rd, wr) = io.into_split();
        let mut rd = FramedRead::new(rd, FrameCodec::<ServerFrame, ClientFrame>::new());
        let mut wr = FramedWrite::new(wr, FrameCodec::<ServerFrame, ClientFrame>::new());
        let client = ClientId::new(id, kind);
        let client_nonce = auth::random_nonce();
        let incarnation = rand::random();
        let lost = |what: &str| format!("handshake: {what}");
        wr.send(ClientFrame {
            id: 1,
            msg: ClientMsg::Hello {
                protocol_version: u32::from(PROTOCOL_VERSION),
                client,
                node: 1,
                incarnation,
                client_nonce,
                resuming: false,
            },
        })
        .await
        .map_err(|e| lost(&e.to_string()))?;
        let challenge = next_frame(&mut rd).await?;
        let ServerMsg::Challenge {
            server_nonce,
            proof,
        } = challenge
        else {
            return Err(lost(&format!("expected a challenge, got {challenge:?}")));
        };
        let handshake = auth::Handshake {
            protocol_version: u32::from(PROTOCOL_VERSION),
            client,
            node: 1,
            incarnation,
            resuming: false,
            client_nonce,
            server_nonce,
        };
        if !auth::verify_server_proof(key, &handshake, &proof) {
            return Err(lost("the server's proof does not verify with our key"));
        }
        let proof = auth::client_proof(key, &handshake);
        wr.send(ClientFrame {
            id: 2,
            msg: ClientMsg::AuthResponse { proof },
        })
        .await
        .map_err(|e| lost(&e.to_string()))?;
        // Every frame from here on is sealed, both ways.
        let keys = auth::session_keys(key, &handshake);
        wr.encoder_mut().seal_from_now(&keys.client_to_server);
        rd.decoder_mut().open_from_now(&keys.server_to_client);
        match next_frame(&mut rd).await? {
            ServerMsg::Welcome { .. } => {}
            other => return Err(lost(&format!("expected Welcome, got {other:?}"))),
        }

        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(RwLock::new(()));
        let (out, mut out_rx) = mpsc::unbounded_channel::<ClientFrame>();
        tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if wr.send(f).await.is_err() {
                    return;
                }
            }
        });
        let (p, g, o, gone) = (pending.clone(), gate.clone(), out.clone(), closed.clone());
        let acks = Arc::new(AtomicU64::new(1 << 62));
        let reader = tokio::spawn(async move {
            while let Some(Ok(frame)) = rd.next().await {
                match (frame.reply_to, frame.msg) {
                    (Some(id), msg) => {
                        let waiter = p.lock().ok().and_then(|mut p| p.remove(&id));
                        if let Some(w) = waiter {
                            let _ = w.send(msg);
                        }
                    }
                    (None, ServerMsg::NewSnapshot { snap }) => {
                        let (g, o, acks) = (g.clone(), o.clone(), acks.clone());
                        tokio::spawn(async move {
                            let _no_write_in_flight = g.write().await;
                            let id = acks.fetch_add(1, Ordering::Relaxed);
                            let _ = o.send(ClientFrame {
                                id,
                                msg: ClientMsg::NewSnapshotAck { snap },
                            });
                        });
                    }
                    (None, _) => {}
                }
            }
            gone.store(true, Ordering::SeqCst);
            if let Ok(mut p) = p.lock() {
                p.clear();
            }
        });
        Ok(Client {
            out,
            pending,
            next_id: AtomicU64::new(100),
            closed,
            gate,
            reader: reader.abort_handle(),
        })
    }

    async fn request(&self, msg: ClientMsg) -> BenchResult<ServerMsg> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err("the server closed the connection".into());
        }
        self.out
            .send(ClientFrame { id, msg })
            .map_err(|_| "the connection is closed".to_string())?;
        match tokio::time::timeout(WAIT, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(format!("connection closed before the reply to {id}")),
            Err(_) => Err(format!("no reply to request {id} within {WAIT:?}")),
        }
    }
}

async fn next_frame(
    rd: &mut FramedRead<tokio::net::unix::OwnedReadHalf, FrameCodec<ServerFrame, ClientFrame>>,
) -> BenchResult<ServerMsg> {
    match tokio::time::timeout(WAIT, rd.next()).await {
        Ok(Some(Ok(f))) => Ok(f.msg),
        Ok(Some(Err(e))) => Err(format!("handshake: bad frame: {e}")),
        Ok(None) => Err("handshake: the server closed the connection".into()),
        Err(_) => Err(format!("handshake: no reply within {WAIT:?}")),
    }
}

async fn status(admin: &Client) -> BenchResult<ServerStatus> {
    match admin.request(ClientMsg::Status).await? {
        ServerMsg::Status(s) => Ok(s),
        other => Err(format!("Status answered {other:?}")),
    }
}

/// Creates snapshots `bench-{from}..bench-{to-1}`, `depth` requests in flight.
async fn create_snapshots(
    admin: &Arc<Client>,
    from: u64,
    to: u64,
    depth: usize,
) -> BenchResult<()> {
    let permits = Arc::new(Semaphore::new(depth));
    let mut tasks = tokio::task::JoinSet::new();
    for i in from..to {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let admin = admin.clone();
        tasks.spawn(async move {
            let _permit = permit;
            match admin
                .request(ClientMsg::CreateSnapshot {
                    name: format!("bench-{i}"),
                    token: csnap_proto::create_token(),
                })
                .await?
            {
                ServerMsg::SnapshotCreated { .. } => Ok(()),
                other => Err(format!("CreateSnapshot bench-{i} answered {other:?}")),
            }
        });
        while let Some(done) = tasks.try_join_next() {
            done.map_err(|e| e.to_string())??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Origin writes as a client does them, `depth` in flight: one `QueryWrite` per request
/// (`chunks_per_request` single-chunk ranges), then (if `data`) the client's own write of
/// the data to the origin file. Returns each query's round-trip time.
async fn origin_writes(
    client: &Arc<Client>,
    origin: Option<Arc<File>>,
    chunk_size: u64,
    chunks: &[u64],
    chunks_per_request: usize,
    depth: usize,
) -> BenchResult<Vec<Duration>> {
    let permits = Arc::new(Semaphore::new(depth));
    let data: Arc<Vec<u8>> = Arc::new((0..chunk_size).map(|i| (i * 7 + 1) as u8).collect());
    let mut tasks = tokio::task::JoinSet::new();
    let mut latencies = Vec::with_capacity(chunks.len() / chunks_per_request + 1);
    for group in chunks.chunks(chunks_per_request) {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (client, origin, data) = (client.clone(), origin.clone(), data.clone());
        let ranges: Vec<ChunkRange> = group.iter().map(|&c| ChunkRange::new(c, 1)).collect();
        tasks.spawn(async move {
            let _permit = permit;
            let _in_flight = client.gate.clone().read_owned().await;
            let started = Instant::now();
            match client
                .request(ClientMsg::QueryWrite {
                    ranges: ranges.clone(),
                })
                .await?
            {
                ServerMsg::OriginWriteOk { .. } => {}
                other => return Err(format!("QueryWrite answered {other:?}")),
            }
            let latency = started.elapsed();
            if let Some(origin) = origin {
                tokio::task::spawn_blocking(move || {
                    for r in &ranges {
                        origin
                            .write_all_at(&data, r.start * chunk_size)
                            .map_err(|e| format!("writing the origin: {e}"))?;
                    }
                    Ok::<_, String>(())
                })
                .await
                .map_err(|e| e.to_string())??;
            }
            Ok(latency)
        });
        while let Some(done) = tasks.try_join_next() {
            latencies.push(done.map_err(|e| e.to_string())??);
        }
    }
    while let Some(done) = tasks.join_next().await {
        latencies.push(done.map_err(|e| e.to_string())??);
    }
    Ok(latencies)
}

// ---------------------------------------------------------------------------------------
// Figures

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn human(bytes: u64) -> String {
    if bytes >= TIB {
        format!("{} TiB", bytes / TIB)
    } else if bytes >= GIB {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

/// One measurement of part 1.
struct WriteRun {
    writes: u64,
    /// Server CPU time (user + system, all threads) spent on the run.
    server_cpu: Duration,
    copy_outs: u64,
    elapsed: Duration,
    query_p50: Duration,
    query_p99: Duration,
}

impl WriteRun {
    fn rate(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64()
    }
}

struct ThroughputRow {
    snapshots: u64,
    create_time: Duration,
    created: u64,
    /// Every repeat, in the order run.
    runs: Vec<WriteRun>,
}

impl ThroughputRow {
    /// The repeat with the median rate.
    fn median(&self) -> Option<&WriteRun> {
        let mut by_rate: Vec<&WriteRun> = self.runs.iter().collect();
        by_rate.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
        by_rate.get(by_rate.len() / 2).copied()
    }
}

struct LookupRow {
    snapshots: u64,
    records: u64,
    from_store: f64,
    /// Metadata blocks read from the device during the measured lookups.
    cache_misses: u64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
    mean: Duration,
}

// ---------------------------------------------------------------------------------------
// The benchmark

async fn run(args: Args) -> BenchResult<()> {
    let plan = Plan::new(args.quick);
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = TempDir::new(&parent)?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let want = |p: u32| args.parts.is_empty() || args.parts.contains(&p);
    println!(
        "csnap-bench{}: seed {seed} (replay the chunk choices with --seed {seed}), files in {}",
        if args.quick { " --quick" } else { "" },
        tmp.0.display()
    );
    println!(
        "path: csnap-server child process (net::start: engine thread, O_DIRECT devices, copy \
         workers, group commit with fdatasync) <-> csnap-proto origin client over a Unix \
         socket, which writes the origin itself after each grant"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    if want(1) || want(2) {
        throughput_and_lookups(&plan, &tmp.0, &mut rng).await?;
    }
    if want(3) {
        rss(&plan, &tmp.0, &mut rng).await?;
    }
    if want(4) {
        diff(&plan, &tmp.0, &mut rng)?;
    }
    Ok(())
}

/// Parts 1 and 2: one volume (and one running server) per snapshot count, so the
/// measurements can be interleaved: round r writes region r of every volume in turn, and
/// load from elsewhere on the machine hits every count alike. Snapshots are created through
/// the server and timed; each measurement writes a region of fresh origin chunks, so every
/// write needs exactly one copy-out. Then the servers stop cleanly and the lookups run on
/// the stores they left.
async fn throughput_and_lookups(plan: &Plan, dir: &Path, rng: &mut StdRng) -> BenchResult<()> {
    let cs = plan.chunk_size;
    let w = plan.writes_per_count;
    let written_chunks = plan.repeats * w;
    // The populated part of the tree lives above the write regions.
    let origin_chunks = written_chunks + plan.populate_records * 4;
    let data_chunks = written_chunks + plan.populate_records + 1024;
    let store_bytes = data_chunks * cs * 5 / 4 + 256 * MIB;
    println!(
        "\nvolumes (one per snapshot count): chunk {} KiB, origin {} ({} chunks, sparse; the \
         {} MiB written by the benchmark filled with data first), store {} (sparse)",
        cs >> 10,
        human(origin_chunks * cs),
        origin_chunks,
        written_chunks * cs / MIB,
        human(store_bytes),
    );
    struct Volume {
        snapshots: u64,
        fx: Fixture,
        populated: Vec<u64>,
        server: ServerChild,
        admin: Arc<Client>,
        origin_client: Arc<Client>,
        origin_file: Arc<File>,
        row: ThroughputRow,
    }
    let mut volumes = Vec::new();
    for &n in &plan.snapshot_counts {
        let fx = Fixture::new(dir, &format!("n{n}"), cs, origin_chunks * cs, store_bytes)?;
        fx.fill_origin(0..written_chunks)?;
        // Snapshot 1 and the populated tree, through the store API (metadata only).
        let mut store = fx.open_store(8192)?;
        store
            .create_snapshot("bench-0", unix_now())
            .map_err(|e| format!("create bench-0: {e}"))?;
        let (populated, took) = populate_tree(
            &mut store,
            written_chunks..origin_chunks,
            plan.populate_records,
            rng,
        )?;
        store.close().map_err(|e| format!("close: {e}"))?;
        eprintln!(
            "  volume for {n} snapshots: format {:.1} ms, {} records populated in {:.1} s",
            ms(fx.format_time),
            populated.len(),
            took.as_secs_f64()
        );
        let server = ServerChild::start(&fx, 64, "server").await?;
        let admin = Arc::new(Client::connect(&server.socket, &fx.key, 1, ClientKind::Admin).await?);
        let origin_client =
            Arc::new(Client::connect(&server.socket, &fx.key, 2, ClientKind::Origin).await?);
        let started = Instant::now();
        create_snapshots(&admin, 1, n, plan.create_depth).await?;
        let create_time = started.elapsed();
        let listed = status(&admin).await?.snapshots;
        if u64::from(listed) != n {
            return Err(format!("the server lists {listed} snapshots, expected {n}"));
        }
        let origin_file = Arc::new(
            File::options()
                .write(true)
                .open(&fx.origin)
                .map_err(|e| format!("{}: {e}", fx.origin.display()))?,
        );
        volumes.push(Volume {
            snapshots: n,
            fx,
            populated,
            server,
            admin,
            origin_client,
            origin_file,
            row: ThroughputRow {
                snapshots: n,
                create_time,
                created: n - 1,
                runs: Vec::new(),
            },
        });
    }
    println!(
        "populated each exception tree with {} records on random chunks (inserted in chunk \
         order, metadata only: no data copied)",
        plan.populate_records
    );

    for round in 0..plan.repeats {
        for v in &mut volumes {
            let region: Vec<u64> = (round * w..(round + 1) * w).collect();
            let before = status(&v.admin).await?;
            let cpu_before = cpu_time(v.server.pid())?;
            let started = Instant::now();
            let mut latencies = origin_writes(
                &v.origin_client,
                Some(v.origin_file.clone()),
                cs,
                &region,
                1,
                plan.write_depth,
            )
            .await?;
            let elapsed = started.elapsed();
            let server_cpu = cpu_time(v.server.pid())?.saturating_sub(cpu_before);
            let after = status(&v.admin).await?;
            latencies.sort();
            let run = WriteRun {
                writes: w,
                server_cpu,
                copy_outs: before.free_chunks.saturating_sub(after.free_chunks),
                elapsed,
                query_p50: percentile(&latencies, 0.5),
                query_p99: percentile(&latencies, 0.99),
            };
            eprintln!(
                "  round {round}, {} snapshots: {:.1} MB/s, {} copy-outs",
                v.snapshots,
                run.rate() * cs as f64 / 1e6,
                run.copy_outs
            );
            v.row.runs.push(run);
        }
    }

    let mut throughput = Vec::new();
    let mut lookups = Vec::new();
    for v in volumes {
        drop(v.origin_client);
        drop(v.admin);
        v.server.stop().await?;
        let regions: Vec<(u64, u64)> = (0..plan.repeats).map(|r| (r * w, v.snapshots)).collect();
        lookups.push(measure_lookups(
            plan,
            &v.fx,
            v.snapshots,
            &regions,
            &v.populated,
            rng,
        )?);
        throughput.push(v.row);
    }
    print_throughput(plan, &throughput);
    print_lookups(plan, &lookups);
    Ok(())
}

/// Part 2 on the store the server left (closed cleanly): half the lookups on chunks
/// copied out while the snapshot existed (answered from the store), half on the populated
/// chunks with any live snapshot (mostly answered "origin", after the same tree descent).
fn measure_lookups(
    plan: &Plan,
    fx: &Fixture,
    snapshots: u64,
    written_regions: &[(u64, u64)],
    populated: &[u64],
    rng: &mut StdRng,
) -> BenchResult<LookupRow> {
    let w = plan.writes_per_count;
    let mut store = fx.open_store(8192)?;
    let live: Vec<SnapId> = store.live_snapshots().collect();
    if live.is_empty() || written_regions.is_empty() || populated.is_empty() {
        return Err("nothing to look up".into());
    }
    let sample = |rng: &mut StdRng, i: usize| {
        if i.is_multiple_of(2) {
            let (start, existing) = written_regions[rng.gen_range(0..written_regions.len())];
            let sharing = &live[..(existing as usize).min(live.len())];
            (
                sharing[rng.gen_range(0..sharing.len())],
                start + rng.gen_range(0..w),
            )
        } else {
            (
                live[rng.gen_range(0..live.len())],
                populated[rng.gen_range(0..populated.len())],
            )
        }
    };
    // Warm the cache with as many lookups as are measured.
    for i in 0..plan.lookups {
        let (s, c) = sample(rng, i);
        store
            .snapshot_chunk(s, c)
            .map_err(|e| format!("lookup ({s}, {c}): {e}"))?;
    }
    let misses_before = store.meta_stats().cache_misses;
    let mut times = Vec::with_capacity(plan.lookups);
    let mut in_store = 0usize;
    for i in 0..plan.lookups {
        let (s, c) = sample(rng, i);
        let t = Instant::now();
        let source = store
            .snapshot_chunk(s, c)
            .map_err(|e| format!("lookup ({s}, {c}): {e}"))?;
        times.push(t.elapsed());
        if matches!(source, ChunkSource::Store { .. }) {
            in_store += 1;
        }
    }
    let cache_misses = store.meta_stats().cache_misses - misses_before;
    store.close().map_err(|e| format!("close: {e}"))?;
    let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
    times.sort();
    Ok(LookupRow {
        snapshots,
        records: written_regions.len() as u64 * w + populated.len() as u64,
        from_store: in_store as f64 / plan.lookups.max(1) as f64,
        cache_misses,
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
        p999: percentile(&times, 0.999),
        max: times.last().copied().unwrap_or_default(),
        mean,
    })
}

fn print_throughput(plan: &Plan, rows: &[ThroughputRow]) {
    let cs = plan.chunk_size;
    println!(
        "\n## 1. Origin-write copy-out throughput ({} KiB chunks; per row {} rounds x {} fresh \
         chunks, interleaved with the other rows; one chunk per QueryWrite, {} in flight, 1 \
         origin client)\n",
        cs >> 10,
        plan.repeats,
        plan.writes_per_count,
        plan.write_depth
    );
    println!(
        "| snapshots | created before ({} in flight) | copy-outs / writes | median MB/s | median \
         copy-outs/s | each round, copy-outs/s | server CPU per copy-out | QueryWrite p50 | p99 \
         | vs 1 snapshot: ratio of medians | median of per-round ratios |",
        plan.create_depth
    );
    println!("|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|");
    let base = rows.first();
    let base_rate = base.and_then(|r| r.median()).map_or(0.0, |r| r.rate());
    for r in rows {
        let Some(m) = r.median() else { continue };
        let ratio = if base_rate > 0.0 {
            m.rate() / base_rate
        } else {
            0.0
        };
        // Round i of this row ran right after round i of the first: the paired ratio
        // cancels load that drifted between rounds.
        let mut paired: Vec<f64> = base
            .map(|b| {
                b.runs
                    .iter()
                    .zip(&r.runs)
                    .map(|(b, x)| x.rate() / b.rate())
                    .collect()
            })
            .unwrap_or_default();
        paired.sort_by(f64::total_cmp);
        let paired_median = paired.get(paired.len() / 2).copied().unwrap_or(0.0);
        let create = if r.created == 0 {
            "-".to_string()
        } else {
            format!(
                "{} in {:.2} s ({:.0}/s)",
                r.created,
                r.create_time.as_secs_f64(),
                r.created as f64 / r.create_time.as_secs_f64()
            )
        };
        let goal = match (r.snapshots, ratio >= 0.95, paired_median >= 0.95) {
            (1000, true, true) => " (goal >= 0.95x: met)",
            (1000, false, false) => " (goal >= 0.95x: NOT met)",
            (1000, _, _) => " (goal >= 0.95x: met by one measure only)",
            _ => "",
        };
        let all: Vec<String> = r.runs.iter().map(|x| format!("{:.0}", x.rate())).collect();
        let copy_outs: u64 = r.runs.iter().map(|x| x.copy_outs).sum();
        let writes: u64 = r.runs.iter().map(|x| x.writes).sum();
        let cpu: Duration = r.runs.iter().map(|x| x.server_cpu).sum();
        println!(
            "| {} | {} | {} / {} | {:.1} | {:.0} | {} | {:.0} µs | {:.2} ms | {:.2} ms | {:.2}x | \
             {:.2}x{} |",
            r.snapshots,
            create,
            copy_outs,
            writes,
            m.rate() * cs as f64 / 1e6,
            m.rate(),
            all.join(", "),
            us(cpu) / copy_outs.max(1) as f64,
            ms(m.query_p50),
            ms(m.query_p99),
            ratio,
            paired_median,
            goal
        );
    }
}

fn print_lookups(plan: &Plan, rows: &[LookupRow]) {
    println!(
        "\n## 2. Metadata lookup per chunk (Store::snapshot_chunk, in process, 32 MiB cache, \
         warm; {} lookups per row after as many warm-up lookups: half on copied-out chunks by \
         a snapshot they cover, half on the populated chunks by any live snapshot)\n",
        plan.lookups
    );
    println!(
        "| snapshots | exception records | answered from store | blocks read | p50 | p99 | p99.9 \
         | max | mean |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.0}% | {} | {:.2} µs | {:.2} µs | {:.1} µs | {:.0} µs | {:.2} µs |",
            r.snapshots,
            r.records,
            r.from_store * 100.0,
            r.cache_misses,
            us(r.p50),
            us(r.p99),
            us(r.p999),
            us(r.max),
            us(r.mean)
        );
    }
}

/// Part 3: one volume per size, populated with random records (metadata only) so the tree
/// is far larger than the small cache, then random copy-outs over the whole volume through
/// the server, once per cache size; RSS of the server process before and after.
async fn rss(plan: &Plan, dir: &Path, rng: &mut StdRng) -> BenchResult<()> {
    let cs = plan.rss_chunk_size;
    let mut lines = Vec::new();
    let mut volumes: Vec<u64> = plan.rss_rows.iter().map(|r| r.0).collect();
    volumes.dedup();
    println!(
        "\n## 3. Server RSS ({} KiB chunks, sparse origin = store size; {} records put in the \
         tree first (metadata only), then {} random copy-outs over the whole volume through the \
         server, 64 chunks per QueryWrite, 8 in flight, no origin data written)\n",
        cs >> 10,
        plan.rss_populate_records,
        plan.rss_copy_outs
    );
    for volume in volumes {
        let fx = Fixture::new(
            dir,
            &format!("rss-{}", human(volume).replace(' ', "")),
            cs,
            volume,
            volume,
        )?;
        println!(
            "{} volume ({} origin chunks): format {:.2} s, store file allocated after format {:.1} \
             MiB",
            human(volume),
            fx.origin_chunks,
            fx.format_time.as_secs_f64(),
            fx.store_allocated_after_format as f64 / MIB as f64
        );
        let mut store = fx.open_store(8192)?;
        store
            .create_snapshot("rss", unix_now())
            .map_err(|e| format!("create rss: {e}"))?;
        let (_, took) = populate_tree(
            &mut store,
            0..fx.origin_chunks,
            plan.rss_populate_records,
            rng,
        )?;
        let meta_used = {
            let info = store.info();
            (info.meta_blocks - info.free_meta_blocks) * 4096
        };
        store.close().map_err(|e| format!("close: {e}"))?;
        println!(
            "  populated {} records in {:.1} s: {:.1} MiB of tree blocks",
            plan.rss_populate_records,
            took.as_secs_f64(),
            meta_used as f64 / MIB as f64
        );
        for &(_, cache_mb) in plan.rss_rows.iter().filter(|r| r.0 == volume) {
            let server = ServerChild::start(&fx, cache_mb, &format!("rss-{cache_mb}")).await?;
            let client =
                Arc::new(Client::connect(&server.socket, &fx.key, 7, ClientKind::Origin).await?);
            let admin = Client::connect(&server.socket, &fx.key, 8, ClientKind::Admin).await?;
            let (rss_start, _) = rss_kib(server.pid())?;
            let mut chunks = BTreeSet::new();
            while (chunks.len() as u64) < plan.rss_copy_outs {
                chunks.insert(rng.gen_range(0..fx.origin_chunks));
            }
            let mut chunks: Vec<u64> = chunks.into_iter().collect();
            chunks.shuffle(rng);
            // Sorted within each request: one request names distinct ascending chunks.
            for group in chunks.chunks_mut(64) {
                group.sort_unstable();
            }
            // Status answers from counters (no exception-tree walk; usage is counted in the
            // background after start).
            let status_started = Instant::now();
            let before = status(&admin).await?;
            let status_time = status_started.elapsed();
            let (rss_after_status, _) = rss_kib(server.pid())?;
            let started = Instant::now();
            // VmRSS after each quarter: a bounded cache levels off, a leak keeps climbing.
            let mut quarters = Vec::new();
            for part in chunks.chunks(chunks.len().div_ceil(4).max(1)) {
                origin_writes(&client, None, cs, part, 64, 8).await?;
                quarters.push(format!("{:.1}", rss_kib(server.pid())?.0 as f64 / 1024.0));
            }
            let elapsed = started.elapsed();
            let after = status(&admin).await?;
            let (rss_end, hwm) = rss_kib(server.pid())?;
            let server_threads = threads(server.pid())?;
            drop(client);
            drop(admin);
            server.stop().await?;
            let copied = before.free_chunks.saturating_sub(after.free_chunks);
            lines.push(format!(
                "| {} | {} MiB | {} | {:.0} | {:.1} MiB | {:.1} MiB ({:.0} ms) | {} | {:.1} MiB | {:.1} MiB | {} |",
                human(volume),
                cache_mb,
                copied,
                copied as f64 / elapsed.as_secs_f64(),
                rss_start as f64 / 1024.0,
                rss_after_status as f64 / 1024.0,
                ms(status_time),
                quarters.join(" / "),
                rss_end as f64 / 1024.0,
                hwm as f64 / 1024.0,
                server_threads
            ));
        }
    }
    println!(
        "\n| volume | cache | copy-outs | copy-outs/s | VmRSS at start | after 1st Status (its time) | \
         VmRSS (MiB) after each quarter | VmRSS after | VmHWM | threads |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Part 4: diff from metadata

/// Records walked per `diff_page` call, as a server answering one request would.
const DIFF_PAGE_RECORDS: usize = 4096;

/// Part 4: snapshot `a`, copy-outs of a random 1% of the chunks (metadata only), snapshot
/// `b`; then the whole diff `a -> b` and `b -> origin`, paged, from a freshly opened store.
/// The comparison is what the diff spares: reading both images in full, at the sequential
/// O_DIRECT read rate measured on this machine's temporary file system.
fn diff(plan: &Plan, dir: &Path, rng: &mut StdRng) -> BenchResult<()> {
    let cs = 64 << 10;
    let fx = Fixture::new(dir, "diff", cs, plan.diff_volume, plan.diff_volume)?;
    let changed = fx.origin_chunks * plan.diff_changed_per_10k / 10_000;
    println!(
        "\n## 4. Diff from metadata ({} volume, {} KiB chunks = {} chunks; snapshot a, {} random \
         chunks changed ({}%), snapshot b; the store reopened before each diff; pages of {} \
         records)\n",
        human(plan.diff_volume),
        cs >> 10,
        fx.origin_chunks,
        changed,
        plan.diff_changed_per_10k as f64 / 100.0,
        DIFF_PAGE_RECORDS
    );
    let (a, b) = {
        let mut store = fx.open_store(8192)?;
        let a = store
            .create_snapshot("a", unix_now())
            .map_err(|e| format!("create a: {e}"))?
            .id;
        let (_, took) = populate_tree(&mut store, 0..fx.origin_chunks, changed, rng)?;
        let b = store
            .create_snapshot("b", unix_now())
            .map_err(|e| format!("create b: {e}"))?
            .id;
        store.close().map_err(|e| format!("close: {e}"))?;
        println!(
            "changed {changed} chunks (copy-outs recorded, no data written) in {:.1} s",
            took.as_secs_f64()
        );
        (a, b)
    };
    println!("| diff | chunks found | ranges | records walked | pages | seconds | s per 10,000 changed chunks | goal |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for (label, from, to, expect) in [
        (
            "a -> b",
            DiffEnd::Snapshot(a),
            DiffEnd::Snapshot(b),
            changed,
        ),
        ("b -> origin", DiffEnd::Snapshot(b), DiffEnd::Origin, 0),
    ] {
        let mut store = fx.open_store(8192)?;
        let started = Instant::now();
        let (mut found, mut ranges, mut walked, mut pages) = (0u64, 0u64, 0u64, 0u64);
        let mut next = Some(0);
        while let Some(at) = next {
            let page = store
                .diff_page(from, to, at, DIFF_PAGE_RECORDS)
                .map_err(|e| format!("diff {label} from chunk {at}: {e}"))?;
            found += page.ranges.iter().map(|r| u64::from(r.count)).sum::<u64>();
            ranges += page.ranges.len() as u64;
            walked += page.records_walked;
            pages += 1;
            next = page.next;
        }
        let took = started.elapsed().as_secs_f64();
        if found != expect {
            return Err(format!(
                "diff {label}: found {found} chunks, expected {expect}"
            ));
        }
        let per_10k = took * 10_000.0 / changed.max(1) as f64;
        println!(
            "| {label} | {found} | {ranges} | {walked} | {pages} | {took:.3} | {per_10k:.3} | {} |",
            if per_10k < 1.0 {
                "< 1 s met"
            } else {
                "< 1 s MISSED"
            }
        );
    }
    let rate = sequential_read_rate(dir)?;
    let full = 2.0 * plan.diff_volume as f64 / rate;
    println!(
        "\nwithout the metadata: reading both images in full ({} each) at this machine's \
         sequential O_DIRECT read rate of {:.0} MB/s (measured on 256 MiB) takes about {:.0} s \
         ({:.1} h), and finds the same chunks only by comparing every byte",
        human(plan.diff_volume),
        rate / 1e6,
        full,
        full / 3600.0
    );
    Ok(())
}

/// Bytes per second of a sequential O_DIRECT read of a freshly written 256 MiB file.
fn sequential_read_rate(dir: &Path) -> BenchResult<f64> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("read-rate.img");
    let size = 256 * MIB;
    let block = 4 * MIB as usize;
    {
        let f = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut data = vec![0u8; block];
        let mut rng = StdRng::seed_from_u64(1);
        for off in (0..size).step_by(block) {
            rng.fill(&mut data[..]);
            f.write_all_at(&data, off)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        f.sync_all()
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(|e| format!("{} (O_DIRECT): {e}", path.display()))?;
    // O_DIRECT needs an aligned buffer: carve a 4 KiB-aligned window out of a larger one.
    let mut raw = vec![0u8; block + 4096];
    let skew = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skew..skew + block];
    let started = Instant::now();
    for off in (0..size).step_by(block) {
        f.read_exact_at(buf, off)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let took = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    Ok(size as f64 / took.max(1e-9))
}
