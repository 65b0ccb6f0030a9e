//! The NBD servers under test: qemu-nbd on the raw file, csnap-agent --standalone, and
//! qemu-nbd on the qcow2 image (its writable origin, or one internal snapshot read-only).
//! Each listens on its own unix socket in the work directory or on its own loopback TCP
//! port; each is a [`Proc`], so it
//! is stopped by PID however the benchmark ends.

use std::io::Read as _;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::procs::{run_tool, Proc};
use crate::report::Engine;

/// The volume (export) name everywhere; snapshots are `VOLUME@SNAPSHOT`.
pub(crate) const VOLUME: &str = "vol";
/// Longest wait for a server to accept NBD connections.
const READY_WAIT: Duration = Duration::from_secs(60);
/// Bound for short tools (qemu-img snapshot, csnapctl).
const TOOL_WAIT: Duration = Duration::from_secs(120);

/// Paths and options shared by every server.
pub(crate) struct Setup {
    pub dir: PathBuf,
    pub raw_image: PathBuf,
    pub csnap_origin: PathBuf,
    pub csnap_store: PathBuf,
    pub qcow2_image: PathBuf,
    pub agent: PathBuf,
    pub csnapctl: PathBuf,
    /// O_DIRECT in every server (qemu-nbd --cache=none, csnap-agent --direct-io).
    pub direct: bool,
    /// How clients reach every server.
    pub transport: Transport,
    /// qemu-nbd's `--aio` flag.
    pub qemu_aio: &'static str,
}

/// How fio reaches the servers: a unix socket in the work directory, or TCP on loopback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Unix,
    Tcp,
}

impl Transport {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        }
    }
}

/// Where a server listens.
#[derive(Clone, Debug)]
enum Endpoint {
    Unix(PathBuf),
    /// A port on 127.0.0.1.
    Tcp(u16),
}

/// A free loopback port (the kernel's choice; the listener is closed again, so another
/// program could take it first: the server's start then fails and says so).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| anyhow::anyhow!("cannot find a free loopback port: {e}"))?;
    Ok(listener.local_addr()?.port())
}

impl Setup {
    /// A setup for csnap alone (the memory, cluster and export-diff runs): its origin and
    /// store files in `dir`, unix sockets, no qemu-nbd images.
    pub(crate) fn csnap_only(dir: &Path, agent: PathBuf, csnapctl: PathBuf, direct: bool) -> Setup {
        Setup {
            dir: dir.to_path_buf(),
            raw_image: dir.join("unused-raw.img"),
            csnap_origin: dir.join("csnap-origin.img"),
            csnap_store: dir.join("csnap-store.img"),
            qcow2_image: dir.join("unused.qcow2"),
            agent,
            csnapctl,
            direct,
            transport: Transport::Unix,
            qemu_aio: "--aio=threads",
        }
    }

    fn endpoint(&self, name: &str) -> anyhow::Result<Endpoint> {
        Ok(match self.transport {
            Transport::Unix => Endpoint::Unix(self.dir.join(format!("{name}.sock"))),
            Transport::Tcp => Endpoint::Tcp(free_port()?),
        })
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    pub(crate) fn csnap_control(&self) -> PathBuf {
        self.dir.join("csnap.ctl")
    }

    fn qemu_nbd(&self, image: &Path, format: &str, endpoint: &Endpoint, export: &str) -> Command {
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--format")
            .arg(format)
            .arg("--persistent")
            .arg("--shared=0")
            .arg("--export-name")
            .arg(export);
        match endpoint {
            Endpoint::Unix(socket) => {
                cmd.arg("--socket").arg(socket);
            }
            Endpoint::Tcp(port) => {
                cmd.args(["--bind", "127.0.0.1", "--port"])
                    .arg(port.to_string());
            }
        }
        if self.direct {
            cmd.arg("--cache=none");
        }
        cmd.arg(self.qemu_aio);
        cmd.arg(image);
        cmd
    }
}

/// A running NBD server and the URI of the export measured on it.
pub(crate) struct Server {
    proc: Proc,
    endpoint: Endpoint,
    uri: String,
}

impl Server {
    pub(crate) fn uri(&self) -> &str {
        &self.uri
    }

    /// Measures `export` of this server from now on.
    pub(crate) fn point_at(&mut self, export: &str) {
        self.uri = uri(export, &self.endpoint);
    }

    /// The serving process's PID (for its CPU time and thread count).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Fails (with its log) if the server has died.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.proc.exited() {
            bail!(
                "{} exited ({status}). Log tail:\n{}",
                self.proc.name(),
                self.proc.log_tail(30)
            );
        }
        Ok(())
    }

    pub(crate) async fn stop(self) {
        self.proc.stop().await;
    }
}

fn uri(export: &str, endpoint: &Endpoint) -> String {
    match endpoint {
        Endpoint::Unix(socket) => format!("nbd+unix:///{export}?socket={}", socket.display()),
        Endpoint::Tcp(port) => format!("nbd://127.0.0.1:{port}/{export}"),
    }
}

/// Starts `engine`'s server on the origin (writable).
pub(crate) async fn start_origin(setup: &Setup, engine: Engine) -> anyhow::Result<Server> {
    let name = engine.label();
    let endpoint = setup.endpoint(name)?;
    let cmd = match engine {
        Engine::Device => bail!("the device limit is fio on the file itself, not a server"),
        Engine::Raw => setup.qemu_nbd(&setup.raw_image, "raw", &endpoint, VOLUME),
        Engine::Qcow2 => setup.qemu_nbd(&setup.qcow2_image, "qcow2", &endpoint, VOLUME),
        Engine::Csnap => {
            let mut cmd = Command::new(&setup.agent);
            cmd.arg("--standalone")
                .arg("--volume")
                .arg(VOLUME)
                .arg("--origin")
                .arg(&setup.csnap_origin)
                .arg("--store")
                .arg(&setup.csnap_store)
                .arg("--nbd-listen")
                .arg(match &endpoint {
                    Endpoint::Unix(socket) => format!("unix:{}", socket.display()),
                    Endpoint::Tcp(port) => format!("127.0.0.1:{port}"),
                })
                .arg("--control-socket")
                .arg(setup.csnap_control())
                .env("RUST_LOG", "warn");
            if setup.direct {
                cmd.arg("--direct-io");
            }
            cmd
        }
    };
    start(name, cmd, &setup.log(name), endpoint, VOLUME).await
}

/// Starts qemu-nbd on internal snapshot `snapshot` of the qcow2 image, read-only (the
/// writable qcow2 server must be stopped: they would fight over the image lock).
pub(crate) async fn start_qcow2_snapshot(setup: &Setup, snapshot: &str) -> anyhow::Result<Server> {
    let name = format!("qcow2-{snapshot}");
    let export = format!("{VOLUME}@{snapshot}");
    let endpoint = setup.endpoint(&name)?;
    let mut cmd = setup.qemu_nbd(&setup.qcow2_image, "qcow2", &endpoint, &export);
    cmd.arg("--read-only").arg("--load-snapshot").arg(snapshot);
    start(&name, cmd, &setup.log(&name), endpoint, &export).await
}

async fn start(
    name: &str,
    cmd: Command,
    log: &Path,
    endpoint: Endpoint,
    export: &str,
) -> anyhow::Result<Server> {
    let mut proc = Proc::spawn(name, cmd, log)?;
    wait_for_nbd(&mut proc, &endpoint).await?;
    Ok(Server {
        proc,
        uri: uri(export, &endpoint),
        endpoint,
    })
}

/// Waits until the server at `socket` greets a connection with the NBD magic.
async fn wait_for_nbd(proc: &mut Proc, endpoint: &Endpoint) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        if let Some(status) = proc.exited() {
            bail!(
                "{} exited ({status}) before serving NBD. Log tail:\n{}",
                proc.name(),
                proc.log_tail(30)
            );
        }
        if greets_with_nbd_magic(endpoint) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} does not serve NBD on {endpoint:?} after {READY_WAIT:?}. Log tail:\n{}",
                proc.name(),
                proc.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn greets_with_nbd_magic(endpoint: &Endpoint) -> bool {
    let timeout = Some(Duration::from_secs(2));
    let mut magic = [0u8; 8];
    let read = match endpoint {
        Endpoint::Unix(socket) => UnixStream::connect(socket).and_then(|mut s| {
            s.set_read_timeout(timeout)?;
            s.read_exact(&mut magic)
        }),
        Endpoint::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).and_then(|mut s| {
            s.set_read_timeout(timeout)?;
            s.read_exact(&mut magic)
        }),
    };
    read.is_ok() && &magic == b"NBDMAGIC"
}

/// Formats the csnap origin and store (`csnapctl format`) with `chunk`-byte chunks.
pub(crate) async fn format_csnap(setup: &Setup, chunk: u64) -> anyhow::Result<()> {
    let mut format = Command::new(&setup.csnapctl);
    format
        .arg("format")
        .arg("--origin")
        .arg(&setup.csnap_origin)
        .arg("--store")
        .arg(&setup.csnap_store)
        .arg("--chunk-size")
        .arg(chunk.to_string());
    run_tool(
        "csnapctl format",
        format,
        &setup.dir.join("csnapctl.log"),
        Duration::from_secs(600),
    )
    .await
}

/// Creates snapshot `name` of the csnap volume through csnapctl and the control socket.
pub(crate) async fn csnap_snapshot(setup: &Setup, name: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new(&setup.csnapctl);
    cmd.arg("--socket")
        .arg(setup.csnap_control())
        .args(["snapshot", "create", VOLUME, name]);
    run_tool(
        "csnapctl snapshot create",
        cmd,
        &setup.log("csnapctl"),
        TOOL_WAIT,
    )
    .await
}

/// Creates internal snapshot `name` in the qcow2 image (no server may have it open).
pub(crate) async fn qcow2_snapshot(setup: &Setup, name: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["snapshot", "-c", name]).arg(&setup.qcow2_image);
    run_tool("qemu-img snapshot", cmd, &setup.log("qemu-img"), TOOL_WAIT).await
}

/// csnapctl status --json, for the record (copy-outs, cache hits).
pub(crate) async fn csnap_status(setup: &Setup) -> anyhow::Result<serde_json::Value> {
    let log = setup.log("csnap-status");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new(&setup.csnapctl);
    cmd.arg("--socket")
        .arg(setup.csnap_control())
        .args(["status", VOLUME, "--json"]);
    run_tool("csnapctl status", cmd, &log, TOOL_WAIT).await?;
    let text = std::fs::read_to_string(&log)?;
    Ok(serde_json::from_str(&text)?)
}
