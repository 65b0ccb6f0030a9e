//! The server through the `Exports`/`Export` traits with a non-file backend: requests
//! on one connection run concurrently and replies come back in completion order, and
//! backend errors reach the client as protocol errors.

use crate::nbd_support;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use csnap_blockdev::nbd::consts::*;
use csnap_blockdev::nbd::{
    BoxFuture, Export, ExportFeatures, ExportInfo, Exports, NbdServer, Payload, ServerConfig,
};
use csnap_proto::net::Listener;
use csnap_proto::ListenAddr;
use nbd_support::*;

const SIZE: u64 = 1 << 20;
/// Reads at this offset are slow; writes at this offset fail with EDQUOT.
const SLOW: u64 = 0;
const FAILING: u64 = 4096;
/// Reads come back in parts of this many bytes.
const READ_PART: usize = 4093;

struct MemExport {
    data: Mutex<Vec<u8>>,
    slow_reads_started: Arc<AtomicUsize>,
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_only(&self) -> bool {
        false
    }
    fn features(&self) -> ExportFeatures {
        ExportFeatures {
            multi_conn: false,
            ..Default::default()
        }
    }
    fn read_at(&self, offset: u64, len: u32) -> BoxFuture<'_, io::Result<Payload>> {
        Box::pin(async move {
            if offset == SLOW {
                self.slow_reads_started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let data = self.data.lock().unwrap();
            // In parts of an odd size, as a snapshot read gathered from several places
            // comes: a 1 MiB read is more parts than one vectored write takes.
            let parts = data[offset as usize..offset as usize + len as usize]
                .chunks(READ_PART)
                .map(Bytes::copy_from_slice)
                .collect();
            Ok(Payload::from_parts(parts))
        })
    }
    fn write_at(&self, offset: u64, bytes: Bytes, _fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            if offset == FAILING {
                return Err(io::Error::from_raw_os_error(libc::EDQUOT));
            }
            self.data.lock().unwrap()[offset as usize..offset as usize + bytes.len()]
                .copy_from_slice(&bytes);
            Ok(())
        })
    }
    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(
        &self,
        _: u64,
        _: u64,
        _: bool,
        _: bool,
        _: bool,
    ) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)) })
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

struct MemExports {
    export: Arc<MemExport>,
}

impl Exports for MemExports {
    fn list(&self) -> BoxFuture<'_, io::Result<Vec<ExportInfo>>> {
        Box::pin(async move { Ok(vec![ExportInfo::of("mem", &*self.export)]) })
    }
    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Option<Arc<dyn Export>>>> {
        Box::pin(async move { Ok((name == "mem").then(|| self.export.clone() as Arc<dyn Export>)) })
    }
}

struct MemServer {
    server: Arc<NbdServer>,
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
    slow_reads_started: Arc<AtomicUsize>,
}

async fn start_mem_server() -> MemServer {
    let slow_reads_started = Arc::new(AtomicUsize::new(0));
    let (server, addr, task) = start_mem_server_with(slow_reads_started.clone()).await;
    MemServer {
        server,
        addr,
        task,
        slow_reads_started,
    }
}

async fn start_mem_server_with(
    slow_reads_started: Arc<AtomicUsize>,
) -> (
    Arc<NbdServer>,
    std::net::SocketAddr,
    tokio::task::JoinHandle<()>,
) {
    let exports = MemExports {
        export: Arc::new(MemExport {
            data: Mutex::new(vec![7; SIZE as usize]),
            slow_reads_started: slow_reads_started.clone(),
        }),
    };
    let server = Arc::new(NbdServer::new(Arc::new(exports), ServerConfig::default()));
    let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let Some(ListenAddr::Tcp(bound)) = listener.local_addr() else {
        unreachable!("a TCP listener has a TCP address")
    };
    let addr = bound.parse().unwrap();
    let task = tokio::spawn(server.clone().serve(listener));
    (server, addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_come_back_in_completion_order() {
    let MemServer { addr, task, .. } = start_mem_server().await;

    let mut c = RawClient::connect(addr).await;
    let (size, flags) = c.go("mem").await;
    assert_eq!(size, SIZE);
    assert_eq!(flags & TFLAG_CAN_MULTI_CONN, 0, "not advertised when false");
    assert_eq!(flags & TFLAG_SEND_TRIM, 0, "default features have no trim");

    // The slow read goes first, the fast one second: the fast reply must overtake.
    c.request(CMD_READ, 0, 1, SLOW, 16, &[]).await;
    c.request(CMD_READ, 0, 2, 8192, 16, &[]).await;
    let first = c.read_reply().await;
    let second = c.read_reply().await;
    assert_eq!(first.cookie(), 2, "fast reply first: {first:?}");
    assert_eq!(second.cookie(), 1);
    assert_eq!(
        second,
        TxReply::Simple {
            cookie: 1,
            error: 0,
            data: vec![7; 16]
        }
    );

    // A backend EDQUOT is reported as ENOSPC; the connection goes on.
    c.request(CMD_WRITE, 0, 3, FAILING, 4, b"oops").await;
    assert_eq!(
        c.read_reply().await,
        TxReply::Simple {
            cookie: 3,
            error: ENOSPC,
            data: vec![]
        }
    );
    // Trim was not advertised, so it is refused before reaching the backend.
    c.request(CMD_TRIM, 0, 4, 0, 4096, &[]).await;
    assert_eq!(
        c.read_reply().await,
        TxReply::Simple {
            cookie: 4,
            error: EINVAL,
            data: vec![]
        }
    );
    c.request(CMD_WRITE, 0, 5, 100, 4, b"good").await;
    assert_eq!(c.read_reply().await.cookie(), 5);
    c.request(CMD_READ, 0, 6, 100, 4, &[]).await;
    assert_eq!(
        c.read_reply().await,
        TxReply::Simple {
            cookie: 6,
            error: 0,
            data: b"good".to_vec()
        }
    );
    task.abort();
}

/// Reads that come back in many parts (more than one vectored write takes) arrive whole and
/// in order, several in flight at once, between other replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_many_parts_arrive_whole() {
    let MemServer { addr, task, .. } = start_mem_server().await;
    let mut c = RawClient::connect(addr).await;
    c.go("mem").await;
    let pattern: Vec<u8> = (0..SIZE as usize - 8192).map(|i| (i % 251) as u8).collect();
    c.request(CMD_WRITE, 0, 1, 8192, pattern.len() as u32, &pattern)
        .await;
    assert_eq!(c.read_reply().await.cookie(), 1);
    // 4 reads of about 250 parts each, and a small one between them.
    let reads = [
        (8192u64, 1_000_000u32),
        (8192 + 77, 999_001),
        (12_288, 700_000),
        (20_000, 1_000_000),
    ];
    for (i, &(offset, len)) in reads.iter().enumerate() {
        c.request(CMD_READ, 0, 10 + i as u64, offset, len, &[])
            .await;
    }
    c.request(CMD_READ, 0, 20, 9000, 3, &[]).await;
    let mut seen = 0;
    for _ in 0..=reads.len() {
        let TxReply::Simple {
            cookie,
            error,
            data,
        } = c.read_reply().await
        else {
            panic!("simple replies only");
        };
        assert_eq!(error, 0);
        let (offset, len) = match cookie {
            20 => (9000, 3),
            n => reads[(n - 10) as usize],
        };
        let at = offset as usize - 8192;
        assert!(
            data == pattern[at..at + len as usize],
            "read {cookie}: wrong bytes"
        );
        seen += 1;
    }
    assert_eq!(seen, reads.len() + 1);
    task.abort();
}

/// Shutdown answers the requests already in flight, then closes every connection
/// (including one still in its handshake) and stops accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let MemServer {
        server,
        addr,
        task,
        slow_reads_started,
    } = start_mem_server().await;
    let mut c = RawClient::connect(addr).await;
    c.go("mem").await;
    let mut in_handshake = RawClient::connect(addr).await;
    bounded("both connections counted", async {
        while server.connection_count() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    c.request(CMD_READ, 0, 1, SLOW, 16, &[]).await;
    // Shut down only once the backend is working on the request.
    bounded("slow read started", async {
        while slow_reads_started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let shutdown = tokio::spawn({
        let server = server.clone();
        async move { server.shutdown(Duration::from_secs(10)).await }
    });
    assert_eq!(
        c.read_reply().await,
        TxReply::Simple {
            cookie: 1,
            error: 0,
            data: vec![7; 16]
        },
        "the in-flight read is answered"
    );
    c.expect_closed().await;
    in_handshake.expect_closed().await;
    assert!(
        bounded("shutdown", shutdown).await.unwrap(),
        "all connections closed"
    );
    assert_eq!(server.connection_count(), 0);
    bounded("listener ends", task).await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}
