//! A minimal NBD client that writes small blocks in a tight loop and timestamps every
//! completion: what the failover benchmark (and a test) use to see an outage as a writer
//! sees it. It speaks just enough of the protocol (fixed newstyle handshake, `OPT_GO`,
//! simple replies, `CMD_WRITE`); every read is bounded and every error is returned, never
//! a panic.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util_free::CancelFlag;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;

/// Unix milliseconds, fractional (one host clock: comparable with the agents' `*_at_ms`).
pub fn wall_ms_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Completion times (Unix ms) of the writes, in order, and the error that ended the loop.
#[derive(Debug, Default)]
pub struct WriteLog {
    pub completions: Vec<f64>,
    pub error: Option<String>,
}

impl WriteLog {
    /// The longest gap between two consecutive completions that ends after `after_ms`:
    /// (last completion before it, first completion after it). `None` when no write
    /// completed after `after_ms`.
    pub fn outage_after(&self, after_ms: f64) -> Option<(f64, f64)> {
        let mut best: Option<(f64, f64)> = None;
        let mut prev: Option<f64> = None;
        for &t in &self.completions {
            if let Some(p) = prev {
                if t > after_ms && best.is_none_or(|(a, b)| t - p > b - a) {
                    best = Some((p, t));
                }
            }
            prev = Some(t);
        }
        best
    }
}

/// A running writer: stop it with [`Writer::stop`], which returns its log.
pub struct Writer {
    log: Arc<Mutex<WriteLog>>,
    stop: CancelFlag,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Connects to the NBD server at unix socket `socket`, export `export`, and writes
    /// `block` bytes at a time round-robin over `[0, span)` until stopped; each write waits
    /// for its reply (one in flight). A write that gets no reply within `stall` ends the
    /// loop with an error.
    pub async fn start(
        socket: &Path,
        export: &str,
        block: u32,
        span: u64,
        stall: Duration,
    ) -> Result<Writer, String> {
        let mut stream = tokio::time::timeout(Duration::from_secs(10), UnixStream::connect(socket))
            .await
            .map_err(|_| format!("{}: no connection within 10 s", socket.display()))?
            .map_err(|e| format!("{}: {e}", socket.display()))?;
        bounded(handshake(&mut stream, export), Duration::from_secs(10))
            .await
            .map_err(|e| format!("NBD handshake with {}: {e}", socket.display()))?;
        let log = Arc::new(Mutex::new(WriteLog::default()));
        let stop = CancelFlag::default();
        let task = {
            let (log, stop) = (log.clone(), stop.clone());
            tokio::spawn(async move {
                let result = write_loop(&mut stream, block, span, stall, &log, &stop).await;
                if let Err(e) = result {
                    lock(&log).error = Some(e);
                }
            })
        };
        Ok(Writer { log, stop, task })
    }

    /// The completions so far (a copy).
    pub fn completions(&self) -> Vec<f64> {
        lock(&self.log).completions.clone()
    }

    /// True if the loop ended on an error.
    pub fn failed(&self) -> Option<String> {
        lock(&self.log).error.clone()
    }

    /// Stops the loop (after the write in flight, bounded) and returns the log.
    pub async fn stop(self) -> WriteLog {
        self.stop.set();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(30), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        std::mem::take(&mut *lock(&self.log))
    }
}

fn lock(log: &Mutex<WriteLog>) -> std::sync::MutexGuard<'_, WriteLog> {
    match log.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, String>>,
    limit: Duration,
) -> Result<T, String> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?
}

async fn handshake(s: &mut UnixStream, export: &str) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.map_err(io)?;
    if greeting[0..8] != NBDMAGIC.to_be_bytes() || greeting[8..16] != IHAVEOPT.to_be_bytes() {
        return Err("not a newstyle NBD server".into());
    }
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .map_err(io)?;
    let name = export.as_bytes();
    let name_len = u32::try_from(name.len()).map_err(|_| "export name too long")?;
    let mut data = name_len.to_be_bytes().to_vec();
    data.extend_from_slice(name);
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut msg = IHAVEOPT.to_be_bytes().to_vec();
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(&data);
    s.write_all(&msg).await.map_err(io)?;
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).await.map_err(io)?;
        if head[0..8] != OPTION_REPLY_MAGIC.to_be_bytes() {
            return Err("bad option reply magic".into());
        }
        let kind = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
        let len = u32::from_be_bytes([head[16], head[17], head[18], head[19]]) as usize;
        if len > 1 << 16 {
            return Err(format!("option reply of {len} bytes"));
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.map_err(io)?;
        match kind {
            REP_INFO => continue,
            REP_ACK => return Ok(()),
            other => {
                return Err(format!(
                    "OPT_GO {export:?} refused ({other:#x}): {}",
                    String::from_utf8_lossy(&body)
                ))
            }
        }
    }
}

async fn write_loop(
    s: &mut UnixStream,
    block: u32,
    span: u64,
    stall: Duration,
    log: &Mutex<WriteLog>,
    stop: &CancelFlag,
) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    let blocks = (span / u64::from(block)).max(1);
    let mut payload = vec![0u8; block as usize];
    let mut cookie = 0u64;
    while !stop.is_set() {
        cookie += 1;
        let offset = (cookie % blocks) * u64::from(block);
        payload[..8].copy_from_slice(&cookie.to_be_bytes());
        let mut msg = Vec::with_capacity(28 + payload.len());
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&CMD_WRITE.to_be_bytes());
        msg.extend_from_slice(&cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&block.to_be_bytes());
        msg.extend_from_slice(&payload);
        let exchange = async {
            s.write_all(&msg).await.map_err(io)?;
            let mut reply = [0u8; 16];
            s.read_exact(&mut reply).await.map_err(io)?;
            Ok::<_, String>(reply)
        };
        let reply = tokio::time::timeout(stall, exchange)
            .await
            .map_err(|_| format!("write {cookie} at {offset}: no reply within {stall:?}"))??;
        let magic = u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]);
        let error = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
        let got = u64::from_be_bytes(reply[8..16].try_into().unwrap_or_default());
        if magic != SIMPLE_REPLY_MAGIC || got != cookie {
            return Err(format!("unexpected reply {reply:02x?} to write {cookie}"));
        }
        if error != 0 {
            return Err(format!("write {cookie} at {offset}: NBD error {error}"));
        }
        lock(log).completions.push(wall_ms_f64());
    }
    let mut disc = Vec::with_capacity(28);
    disc.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    disc.extend_from_slice(&0u16.to_be_bytes());
    disc.extend_from_slice(&CMD_DISC.to_be_bytes());
    disc.extend_from_slice(&(cookie + 1).to_be_bytes());
    disc.extend_from_slice(&0u64.to_be_bytes());
    disc.extend_from_slice(&0u32.to_be_bytes());
    let _ = s.write_all(&disc).await;
    Ok(())
}

/// A stop flag shared between the writer handle and its task.
mod tokio_util_free {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[derive(Clone, Default)]
    pub(super) struct CancelFlag(Arc<AtomicBool>);

    impl CancelFlag {
        pub(super) fn set(&self) {
            self.0.store(true, Ordering::Relaxed);
        }
        pub(super) fn is_set(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }
}
