//! Support for the tests of the real server: a store fixture on files, a protocol client
//! that speaks csnap-proto over a real socket (pipelined, with NewSnapshot handling the way
//! a real origin client does it), raw-socket helpers, and a guard for the csnap-server
//! binary run as a child process.
#![allow(dead_code)]

use csnap_proto::auth;
use csnap_proto::ListenAddr;
use csnap_proto::*;
use csnap_server::net::{self, ServerConfig};
use csnap_server::store::{FileDevice, FormatOptions, Store};
use futures::{SinkExt as _, StreamExt as _};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, RwLock};
use tokio_util::codec::{FramedRead, FramedWrite};

/// Every wait in these tests is bounded by this unless said otherwise.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// A seed from CSNAP_SEED or a fresh one, printed so a failure can be replayed.
pub(crate) fn seed(test: &str) -> u64 {
    csnap_proto::testing::seed(test, "CSNAP_SEED")
}

/// Deterministic contents of origin chunk `chunk` at write `version` (0 = initial).
pub(crate) fn pattern(chunk_size: usize, chunk: u64, version: u64) -> Vec<u8> {
    let mut out = vec![0u8; chunk_size];
    let mut x = chunk
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(version.wrapping_mul(0xD1B5_4A32_D192_ED03))
        | 1;
    for b in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    out
}

/// Files for one server: an origin (filled with `pattern(.., 0)`), a formatted store and a
/// key file.
pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub origin: PathBuf,
    pub store: PathBuf,
    pub key_file: PathBuf,
    pub key: Vec<u8>,
    pub chunk_size: u64,
    pub origin_chunks: u64,
}

impl Fixture {
    pub(crate) fn new(chunk_size: u64, origin_chunks: u64, store_bytes: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let origin = dir.path().join("origin");
        let store = dir.path().join("store");
        let key_file = dir.path().join("cluster.key");
        let f = File::create(&origin).unwrap();
        for c in 0..origin_chunks {
            f.write_all_at(&pattern(chunk_size as usize, c, 0), c * chunk_size)
                .unwrap();
        }
        File::create(&store).unwrap().set_len(store_bytes).unwrap();
        let dev = FileDevice::open(&store, false).unwrap();
        Store::format(
            &dev,
            &FormatOptions {
                chunk_size,
                origin_size: chunk_size * origin_chunks,
                now: 1_700_000_000,
                uuid: None,
            },
        )
        .unwrap();
        net::key::write_new_key(&key_file, false).unwrap();
        let key = net::key::load_key_file(&key_file).unwrap();
        Fixture {
            dir,
            origin,
            store,
            key_file,
            key,
            chunk_size,
            origin_chunks,
        }
    }

    pub(crate) fn small() -> Fixture {
        Fixture::new(4096, 256, 32 << 20)
    }

    pub(crate) fn config(&self, listen: ListenAddr) -> ServerConfig {
        ServerConfig::new(&self.origin, &self.store, listen, &self.key_file)
    }

    pub(crate) fn unix_addr(&self, name: &str) -> ListenAddr {
        ListenAddr::Unix(self.dir.path().join(name))
    }

    pub(crate) fn read_origin(&self, chunk: u64) -> Vec<u8> {
        read_at(
            &self.origin,
            chunk * self.chunk_size,
            self.chunk_size as usize,
        )
    }

    pub(crate) fn read_store_chunk(&self, store_chunk: u64) -> Vec<u8> {
        read_at(
            &self.store,
            store_chunk * self.chunk_size,
            self.chunk_size as usize,
        )
    }

    /// Opens the store directly (the server must not be running) and runs the checker.
    pub(crate) fn check_store(&self) -> csnap_server::store::CheckReport {
        let dev = Arc::new(FileDevice::open(&self.store, false).unwrap());
        let mut store = Store::open(dev, Default::default()).unwrap();
        let report = store.check().unwrap();
        store.close().unwrap();
        report
    }
}

pub(crate) fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

async fn recv<S: futures::Stream<Item = Result<ServerFrame, FrameError>> + Unpin>(
    rd: &mut S,
) -> Option<ServerFrame> {
    match tokio::time::timeout(WAIT, rd.next()).await {
        Ok(Some(Ok(f))) => Some(f),
        Ok(_) => None,
        Err(_) => panic!("no handshake reply within {WAIT:?}"),
    }
}

/// A connected byte stream to the server.
pub(crate) use csnap_proto::net::Stream as Io;

/// Dials the server as its clients do.
pub(crate) use csnap_proto::net::connect as connect_raw;

type Pending = Arc<Mutex<HashMap<RequestId, oneshot::Sender<ServerMsg>>>>;

/// How a handshake ended when it did not open a session.
#[derive(Debug)]
pub(crate) struct Refused {
    /// Whether the server's proof of the key verified with ours.
    pub server_proof_ok: bool,
    pub reply: Option<ServerMsg>,
}

/// A protocol client over a real socket. Replies are matched to requests by id; notices
/// go to `notices`. An origin client acknowledges `NewSnapshot` only once no origin write
/// it was granted is still in flight, and drops its unique-chunk cache then.
pub(crate) struct Client {
    out: mpsc::UnboundedSender<ClientFrame>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    pub notices: tokio::sync::Mutex<mpsc::UnboundedReceiver<ServerMsg>>,
    /// Held (shared) by origin writes from query to data write; taken exclusively to ack.
    gate: Arc<RwLock<()>>,
    unique: Arc<Mutex<HashSet<u64>>>,
    pub client: ClientId,
    pub chunk_size: u32,
    pub origin_chunks: u64,
    /// Every reply id seen, to check that none is duplicated.
    pub replies_seen: Arc<Mutex<Vec<RequestId>>>,
    closed: Arc<std::sync::atomic::AtomicBool>,
    reader: tokio::task::AbortHandle,
}

impl Drop for Client {
    /// Closes the connection (the writer task ends with `out`, the reader is aborted).
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A handshake: client instance `client`'s connection of `kind` (identity
/// `ClientId::new(client, kind)`, incarnation `client`: the same again is a reconnect).
pub(crate) struct Hello {
    pub client: u64,
    pub kind: ClientKind,
    pub resuming: bool,
}

/// An authenticated connection at the frame level, for tests that send by hand
/// (sealed frames both ways from here on; request ids 1 and 2 were the handshake's).
pub(crate) struct RawSession {
    pub rd: FramedRead<tokio::io::ReadHalf<Box<dyn Io>>, FrameCodec<ServerFrame, ClientFrame>>,
    pub wr: FramedWrite<tokio::io::WriteHalf<Box<dyn Io>>, FrameCodec<ServerFrame, ClientFrame>>,
    pub chunk_size: u32,
    pub origin_chunks: u64,
    /// The connection's frame keys (to craft frames by hand).
    pub keys: auth::SessionKeys,
}

impl RawSession {
    /// Hello, challenge, proof, Welcome; then both directions are sealed.
    pub(crate) async fn open(
        io: Box<dyn Io>,
        key: &[u8],
        hello: &Hello,
    ) -> Result<RawSession, Refused> {
        let (rd, wr) = tokio::io::split(io);
        let mut rd = FramedRead::new(rd, FrameCodec::<ServerFrame, ClientFrame>::new());
        let mut wr = FramedWrite::new(wr, FrameCodec::<ServerFrame, ClientFrame>::new());
        let client_nonce = auth::random_nonce();
        let client = ClientId::new(hello.client, hello.kind);
        let send = |id, msg| ClientFrame { id, msg };
        wr.send(send(
            1,
            ClientMsg::Hello {
                protocol_version: u32::from(PROTOCOL_VERSION),
                client,
                node: 1,
                incarnation: hello.client,
                client_nonce,
                resuming: hello.resuming,
            },
        ))
        .await
        .map_err(|_| Refused {
            server_proof_ok: false,
            reply: None,
        })?;
        let Some(challenge) = recv(&mut rd).await else {
            return Err(Refused {
                server_proof_ok: false,
                reply: None,
            });
        };
        let ServerMsg::Challenge {
            server_nonce,
            proof,
        } = challenge.msg
        else {
            return Err(Refused {
                server_proof_ok: false,
                reply: Some(challenge.msg),
            });
        };
        let handshake = auth::Handshake {
            protocol_version: u32::from(PROTOCOL_VERSION),
            client,
            node: 1,
            incarnation: hello.client,
            resuming: hello.resuming,
            client_nonce,
            server_nonce,
        };
        let server_proof_ok = auth::verify_server_proof(key, &handshake, &proof);
        let proof = auth::client_proof(key, &handshake);
        wr.send(send(2, ClientMsg::AuthResponse { proof }))
            .await
            .map_err(|_| Refused {
                server_proof_ok,
                reply: None,
            })?;
        // A server that accepts the proof seals its answer; a refusal comes in the clear.
        let keys = auth::session_keys(key, &handshake);
        if server_proof_ok {
            wr.encoder_mut().seal_from_now(&keys.client_to_server);
            rd.decoder_mut().open_from_now(&keys.server_to_client);
        }
        let welcome = recv(&mut rd).await;
        match welcome.map(|f| f.msg) {
            Some(ServerMsg::Welcome {
                chunk_size,
                origin_chunks,
                ..
            }) if server_proof_ok => Ok(RawSession {
                rd,
                wr,
                chunk_size,
                origin_chunks,
                keys,
            }),
            reply => Err(Refused {
                server_proof_ok,
                reply,
            }),
        }
    }
}

impl Client {
    pub(crate) async fn connect(
        addr: &ListenAddr,
        key: &[u8],
        client: u64,
        kind: ClientKind,
    ) -> Client {
        Self::handshake(
            connect_raw(addr).await.unwrap(),
            key,
            Hello {
                client,
                kind,
                resuming: false,
            },
        )
        .await
        .unwrap()
    }

    /// Full handshake on `io`. A wrong key still sends its (wrong) proof so the server's
    /// verdict is seen.
    pub(crate) async fn handshake(
        io: Box<dyn Io>,
        key: &[u8],
        hello: Hello,
    ) -> Result<Client, Refused> {
        let RawSession {
            mut rd,
            mut wr,
            chunk_size,
            origin_chunks,
            ..
        } = RawSession::open(io, key, &hello).await?;
        let client = ClientId::new(hello.client, hello.kind);

        let pending: Pending = Arc::default();
        let next_id = Arc::new(AtomicU64::new(100));
        let (out, mut out_rx) = mpsc::unbounded_channel::<ClientFrame>();
        let (notice_tx, notices) = mpsc::unbounded_channel();
        let gate = Arc::new(RwLock::new(()));
        let unique: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let replies_seen: Arc<Mutex<Vec<RequestId>>> = Arc::default();
        tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if wr.send(f).await.is_err() {
                    return;
                }
            }
        });
        let (p, o, n, g, u, seen) = (
            pending.clone(),
            out.clone(),
            next_id.clone(),
            gate.clone(),
            unique.clone(),
            replies_seen.clone(),
        );
        let is_origin = hello.kind == ClientKind::Origin;
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gone = closed.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(frame)) = rd.next().await {
                match frame.reply_to {
                    Some(id) => {
                        seen.lock().unwrap().push(id);
                        let waiter = p.lock().unwrap().remove(&id);
                        if let Some(w) = waiter {
                            let _ = w.send(frame.msg);
                        }
                    }
                    None => {
                        if let (ServerMsg::NewSnapshot { snap }, true) = (&frame.msg, is_origin) {
                            let (snap, g, u, o, n) =
                                (*snap, g.clone(), u.clone(), o.clone(), n.clone());
                            tokio::spawn(async move {
                                let _writes_done = g.write().await;
                                u.lock().unwrap().clear();
                                let id = n.fetch_add(1, Ordering::Relaxed);
                                let _ = o.send(ClientFrame {
                                    id,
                                    msg: ClientMsg::NewSnapshotAck { snap },
                                });
                            });
                        }
                        let _ = notice_tx.send(frame.msg);
                    }
                }
            }
            // Connection gone: fail every waiter, and every later request.
            gone.store(true, Ordering::SeqCst);
            p.lock().unwrap().clear();
        });
        Ok(Client {
            out,
            pending,
            next_id,
            notices: tokio::sync::Mutex::new(notices),
            gate,
            unique,
            client,
            chunk_size,
            origin_chunks,
            replies_seen,
            closed,
            reader: reader.abort_handle(),
        })
    }

    /// Sends a request; the receiver gets its reply.
    pub(crate) fn send(&self, msg: ClientMsg) -> (RequestId, oneshot::Receiver<ServerMsg>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        if self.closed.load(Ordering::SeqCst) {
            self.pending.lock().unwrap().remove(&id);
        }
        let _ = self.out.send(ClientFrame { id, msg });
        (id, rx)
    }

    /// One request, its reply within `WAIT`; Err if the connection closed.
    pub(crate) async fn request(&self, msg: ClientMsg) -> Result<ServerMsg, String> {
        self.request_within(msg, WAIT).await
    }

    pub(crate) async fn request_within(
        &self,
        msg: ClientMsg,
        limit: Duration,
    ) -> Result<ServerMsg, String> {
        let (id, rx) = self.send(msg);
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(format!("connection closed before the reply to {id}")),
            Err(_) => Err(format!("no reply to request {id} within {limit:?}")),
        }
    }

    /// An origin write as a real client does it: ask unless the chunk is known unique,
    /// then write the data to the origin file itself.
    pub(crate) async fn origin_write(
        &self,
        origin: &File,
        chunk: u64,
        data: &[u8],
    ) -> Result<(), String> {
        let _in_flight = self.gate.read().await;
        let cached = self.unique.lock().unwrap().contains(&chunk);
        if !cached {
            match self
                .request(ClientMsg::QueryWrite {
                    ranges: vec![ChunkRange::new(chunk, 1)],
                })
                .await?
            {
                ServerMsg::OriginWriteOk { unique, .. } => {
                    if unique {
                        self.unique.lock().unwrap().insert(chunk);
                    }
                }
                other => return Err(format!("QueryWrite({chunk}) answered {other:?}")),
            }
        }
        origin
            .write_all_at(data, chunk * u64::from(self.chunk_size))
            .map_err(|e| e.to_string())
    }

    /// Reads `chunks` of snapshot `snap` as a snapshot client does: from the store where
    /// the server says so, else from the origin under a read lock, released afterwards.
    pub(crate) async fn read_snapshot(
        &self,
        snap: SnapId,
        range: ChunkRange,
        origin: &Path,
        store: &Path,
    ) -> Result<Vec<u8>, String> {
        let cs = u64::from(self.chunk_size);
        let reply = self
            .request(ClientMsg::QuerySnapshotRead {
                snap,
                ranges: vec![range],
            })
            .await?;
        let ServerMsg::SnapshotReadOk {
            store: in_store,
            origin_locked,
        } = reply
        else {
            return Err(format!("QuerySnapshotRead answered {reply:?}"));
        };
        let mut out = vec![0u8; (u64::from(range.count) * cs) as usize];
        let at = |chunk: u64| ((chunk - range.start) * cs) as usize;
        for a in &in_store {
            let data = read_at(store, a.store_chunk * cs, cs as usize);
            out[at(a.chunk)..at(a.chunk) + cs as usize].copy_from_slice(&data);
        }
        for r in &origin_locked {
            for c in r.chunks().unwrap() {
                let data = read_at(origin, c * cs, cs as usize);
                out[at(c)..at(c) + cs as usize].copy_from_slice(&data);
            }
        }
        let located: u64 = in_store.len() as u64
            + origin_locked
                .iter()
                .map(|r| u64::from(r.count))
                .sum::<u64>();
        if located != u64::from(range.count) {
            return Err(format!(
                "read of {range:?} located {located} chunks: {in_store:?} {origin_locked:?}"
            ));
        }
        if !origin_locked.is_empty() {
            match self
                .request(ClientMsg::FinishSnapshotRead {
                    snap,
                    ranges: origin_locked,
                })
                .await?
            {
                ServerMsg::FinishSnapshotReadOk => {}
                other => return Err(format!("FinishSnapshotRead answered {other:?}")),
            }
        }
        Ok(out)
    }

    pub(crate) async fn next_notice(&self, limit: Duration) -> Option<ServerMsg> {
        let mut rx = self.notices.lock().await;
        tokio::time::timeout(limit, rx.recv()).await.ok().flatten()
    }
}

/// Sends raw bytes and collects every frame the server answers until it closes (bounded).
/// Returns the decoded replies and whether the server closed the connection.
pub(crate) async fn raw_exchange(addr: &ListenAddr, bytes: &[u8]) -> (Vec<ServerFrame>, bool) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut io = connect_raw(addr).await.unwrap();
    io.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), io.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    let mut frames = Vec::new();
    let mut at = 0;
    while let Ok(Decoded::Frame(f, used)) = decode_frame::<ServerFrame>(&buf[at..]) {
        frames.push(f);
        at += used;
    }
    (frames, closed)
}

/// The csnap-server binary as a child process; killed (by PID) on drop.
pub(crate) struct ServerProcess {
    child: Option<std::process::Child>,
    pub stderr_path: PathBuf,
    pub addr: ListenAddr,
}

impl ServerProcess {
    pub(crate) fn spawn(
        fx: &Fixture,
        addr: &ListenAddr,
        extra: &[&str],
        log_name: &str,
    ) -> ServerProcess {
        let stderr_path = fx.dir.path().join(log_name);
        let stderr = File::create(&stderr_path).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_csnap-server"));
        cmd.arg("--origin")
            .arg(&fx.origin)
            .arg("--store")
            .arg(&fx.store)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--key-file")
            .arg(&fx.key_file)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr);
        let child = cmd.spawn().expect("spawn csnap-server");
        ServerProcess {
            child: Some(child),
            stderr_path,
            addr: addr.clone(),
        }
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits until the server accepts connections (or panics with its log if it exited).
    pub(crate) async fn wait_listening(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if connect_raw(&self.addr).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("csnap-server exited with {status}:\n{}", self.stderr());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "csnap-server not listening within {WAIT:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the process to exit on its own (bounded).
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "csnap-server did not exit within {limit:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// SIGKILL, then reap.
    pub(crate) fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.wait_exit(WAIT);
    }

    /// SIGTERM, then wait for a clean exit.
    pub(crate) fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(WAIT)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
