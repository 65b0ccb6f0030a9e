//! Shared helpers for the NBD integration tests: an in-process server over temp files,
//! a raw protocol client, and gating for external client tools.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use csnap_blockdev::nbd::consts::*;
use csnap_blockdev::nbd::{FileExports, NbdServer, RequestHeader, ServerConfig};
use csnap_proto::net::Listener;
use csnap_proto::ListenAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Every network wait in these tests is bounded by this.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

pub(crate) async fn bounded<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// One export in a test server.
pub(crate) struct TestExport {
    pub name: &'static str,
    pub path: PathBuf,
    pub size: u64,
    pub read_only: bool,
}

/// An in-process server listening on 127.0.0.1:0 and a unix socket, over temp files.
pub(crate) struct TestServer {
    pub dir: tempfile::TempDir,
    pub tcp: SocketAddr,
    pub unix: PathBuf,
    pub exports: Vec<TestExport>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl TestServer {
    /// Starts a server with the given (name, size, read_only) exports, each backed by a
    /// fresh sparse file.
    pub(crate) async fn start(specs: &[(&'static str, u64, bool)]) -> TestServer {
        Self::start_with(specs, ServerConfig::default()).await
    }

    pub(crate) async fn start_with(
        specs: &[(&'static str, u64, bool)],
        config: ServerConfig,
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut exports = FileExports::new();
        let mut described = Vec::new();
        for &(name, size, read_only) in specs {
            let path = dir.path().join(format!("{name}.img"));
            std::fs::File::create(&path).unwrap().set_len(size).unwrap();
            exports.add(name, &path, read_only).unwrap();
            described.push(TestExport {
                name,
                path,
                size,
                read_only,
            });
        }
        let server = Arc::new(NbdServer::new(Arc::new(exports), config));
        let tcp = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let tcp_addr = match tcp.local_addr() {
            Some(ListenAddr::Tcp(bound)) => bound.parse().unwrap(),
            other => unreachable!("a TCP listener at {other:?}"),
        };
        let unix = dir.path().join("nbd.sock");
        let unix_listener = Listener::bind(&ListenAddr::Unix(unix.clone()))
            .await
            .unwrap();
        let tasks = vec![
            tokio::spawn(server.clone().serve(tcp)),
            tokio::spawn(server.serve(unix_listener)),
        ];
        TestServer {
            dir,
            tcp: tcp_addr,
            unix,
            exports: described,
            tasks,
        }
    }

    pub(crate) fn export(&self, name: &str) -> &TestExport {
        self.exports.iter().find(|e| e.name == name).unwrap()
    }

    pub(crate) fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    pub(crate) fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix.display())
    }
}

/// CI=true turns a missing prerequisite into a failure.
pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether an external tool exists on PATH; without it the test fails under CI and is
/// skipped (with a message) otherwise.
pub(crate) fn require_tool(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| is_executable(&dir.join(tool))));
    if !found {
        if in_ci() {
            panic!("{tool} is required under CI=true but was not found on PATH");
        }
        eprintln!("skipping: {tool} not found on PATH");
    }
    found
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Output of a finished client command.
pub(crate) struct Ran {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command to completion within `WAIT`; it is killed if the test gives up.
pub(crate) async fn run(program: &str, args: &[&str]) -> Ran {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = bounded(&format!("{program} {args:?}"), child)
        .await
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    Ran {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Like [`run`] but requires success.
pub(crate) async fn run_ok(program: &str, args: &[&str]) -> Ran {
    let ran = run(program, args).await;
    assert!(
        ran.status.success(),
        "{program} {args:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        ran.status,
        ran.stdout,
        ran.stderr
    );
    ran
}

/// A reply to an option during the handshake.
#[derive(Debug)]
pub(crate) struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A transmission-phase reply (simple, or one structured chunk).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TxReply {
    Simple {
        cookie: u64,
        error: u32,
        data: Vec<u8>,
    },
    Chunk {
        cookie: u64,
        flags: u16,
        kind: u16,
        payload: Vec<u8>,
    },
}

impl TxReply {
    pub(crate) fn cookie(&self) -> u64 {
        match self {
            TxReply::Simple { cookie, .. } | TxReply::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// A hand-written NBD client that can send anything, including garbage.
pub(crate) struct RawClient {
    pub stream: TcpStream,
    pub structured: bool,
    /// Lengths of outstanding simple-reply reads, by cookie (to frame their data).
    pub pending_reads: std::collections::HashMap<u64, u32>,
}

impl RawClient {
    /// Connects and completes the greeting (fixed newstyle, NO_ZEROES).
    pub(crate) async fn connect(addr: SocketAddr) -> RawClient {
        let mut client = RawClient::connect_raw(addr).await;
        let mut greeting = [0u8; 18];
        bounded("greeting", client.stream.read_exact(&mut greeting))
            .await
            .unwrap();
        assert_eq!(&greeting[0..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&greeting[8..16], &IHAVEOPT.to_be_bytes());
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        client
            .send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await;
        client
    }

    pub(crate) async fn connect_raw(addr: SocketAddr) -> RawClient {
        let stream = bounded("connect", TcpStream::connect(addr)).await.unwrap();
        RawClient {
            stream,
            structured: false,
            pending_reads: Default::default(),
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        bounded("send", self.stream.write_all(bytes)).await.unwrap();
    }

    pub(crate) async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut msg = IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.send(&msg).await;
    }

    pub(crate) async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        bounded("read", self.stream.read_exact(&mut buf))
            .await
            .unwrap();
        buf
    }

    pub(crate) async fn read_opt_reply(&mut self) -> OptReply {
        let head = self.read_exact(20).await;
        assert_eq!(
            &head[0..8],
            &OPTION_REPLY_MAGIC.to_be_bytes(),
            "option reply magic"
        );
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let data = self.read_exact(len).await;
        OptReply { option, kind, data }
    }

    /// Sends OPT_INFO/OPT_GO and collects the replies up to the final one.
    pub(crate) async fn info_or_go(
        &mut self,
        option: u32,
        name: &str,
        requests: &[u16],
    ) -> Vec<OptReply> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            data.extend_from_slice(&r.to_be_bytes());
        }
        self.send_option(option, &data).await;
        let mut replies = Vec::new();
        loop {
            let reply = self.read_opt_reply().await;
            assert_eq!(reply.option, option);
            let last = reply.kind != REP_INFO;
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }

    /// OPT_GO that must succeed; returns (size, transmission flags).
    pub(crate) async fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self.info_or_go(OPT_GO, name, &[INFO_BLOCK_SIZE]).await;
        assert_eq!(
            replies.last().unwrap().kind,
            REP_ACK,
            "OPT_GO {name:?}: {replies:?}"
        );
        export_info(&replies).expect("NBD_INFO_EXPORT in OPT_GO replies")
    }

    pub(crate) async fn negotiate_structured(&mut self) {
        self.send_option(OPT_STRUCTURED_REPLY, &[]).await;
        let reply = self.read_opt_reply().await;
        assert_eq!(reply.kind, REP_ACK);
        self.structured = true;
    }

    /// Sends one request (header plus payload).
    pub(crate) async fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let header = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        if kind == CMD_READ && !self.structured {
            self.pending_reads.insert(cookie, length);
        }
        let mut msg = header.encode().to_vec();
        msg.extend_from_slice(payload);
        self.send(&msg).await;
    }

    /// Reads one reply message. For simple replies to reads sent through `request`,
    /// the data is read when the error is zero.
    pub(crate) async fn read_reply(&mut self) -> TxReply {
        let magic = u32::from_be_bytes(self.read_exact(4).await.try_into().unwrap());
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let rest = self.read_exact(12).await;
                let error = u32::from_be_bytes(rest[0..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
                let read_len = self.pending_reads.remove(&cookie);
                let data = match (error, read_len) {
                    (0, Some(len)) => self.read_exact(len as usize).await,
                    _ => Vec::new(),
                };
                TxReply::Simple {
                    cookie,
                    error,
                    data,
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let rest = self.read_exact(16).await;
                let flags = u16::from_be_bytes(rest[0..2].try_into().unwrap());
                let kind = u16::from_be_bytes(rest[2..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
                let len = u32::from_be_bytes(rest[12..16].try_into().unwrap());
                let payload = self.read_exact(len as usize).await;
                TxReply::Chunk {
                    cookie,
                    flags,
                    kind,
                    payload,
                }
            }
            other => panic!("unexpected reply magic {other:#x}"),
        }
    }

    /// Waits for the server to close the connection (EOF or reset).
    pub(crate) async fn expect_closed(&mut self) {
        let mut buf = [0u8; 256];
        loop {
            match bounded("server close", self.stream.read(&mut buf)).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }
}

/// Extracts (size, flags) from the NBD_INFO_EXPORT reply.
pub(crate) fn export_info(replies: &[OptReply]) -> Option<(u64, u16)> {
    replies.iter().find_map(|r| {
        (r.kind == REP_INFO && r.data.len() == 12 && r.data[0..2] == INFO_EXPORT.to_be_bytes())
            .then(|| {
                (
                    u64::from_be_bytes(r.data[2..10].try_into().unwrap()),
                    u16::from_be_bytes(r.data[10..12].try_into().unwrap()),
                )
            })
    })
}

/// Error code of a structured error chunk, if it is one.
pub(crate) fn chunk_error(reply: &TxReply) -> Option<u32> {
    match reply {
        TxReply::Chunk { kind, payload, .. } if *kind == REPLY_TYPE_ERROR => {
            Some(u32::from_be_bytes(payload[0..4].try_into().unwrap()))
        }
        _ => None,
    }
}

/// Deterministic test data from a seed (no external RNG needed for patterns).
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Seed for randomised tests: NBD_TEST_SEED replays a run; the seed is printed.
pub(crate) fn test_seed(test: &str) -> u64 {
    csnap_proto::testing::seed(test, "NBD_TEST_SEED")
}
