//! The NBD servers under test: qemu-nbd on the raw file, csnap-agent --standalone, and
//! qemu-nbd on the qcow2 image (its writable origin, or one internal snapshot read-only).
//! Each listens on its own unix socket in the work directory; each is a [`Proc`], so it
//! is stopped by PID however the benchmark ends.

use std::io::Read as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::procs::{run_tool, Proc};
use crate::report::Engine;

/// The volume (export) name everywhere; snapshots are `VOLUME@SNAPSHOT`.
pub const VOLUME: &str = "vol";
/// Longest wait for a server to accept NBD connections.
const READY_WAIT: Duration = Duration::from_secs(60);
/// Bound for short tools (qemu-img snapshot, csnapctl).
const TOOL_WAIT: Duration = Duration::from_secs(120);

/// Paths and options shared by every server.
pub struct Setup {
    pub dir: PathBuf,
    pub raw_image: PathBuf,
    pub csnap_origin: PathBuf,
    pub csnap_store: PathBuf,
    pub qcow2_image: PathBuf,
    pub agent: PathBuf,
    pub csnapctl: PathBuf,
    /// O_DIRECT in every server (qemu-nbd --cache=none, csnap-agent --direct-io).
    pub direct: bool,
}

impl Setup {
    fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    pub fn csnap_control(&self) -> PathBuf {
        self.dir.join("csnap.ctl")
    }

    fn qemu_nbd(&self, image: &Path, format: &str, socket: &Path, export: &str) -> Command {
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--format")
            .arg(format)
            .arg("--persistent")
            .arg("--shared=0")
            .arg("--export-name")
            .arg(export)
            .arg("--socket")
            .arg(socket);
        if self.direct {
            cmd.arg("--cache=none");
        }
        cmd.arg(image);
        cmd
    }
}

/// A running NBD server and the URI of the export measured on it.
pub struct Server {
    proc: Proc,
    socket: PathBuf,
    uri: String,
}

impl Server {
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Measures `export` of this server from now on.
    pub fn point_at(&mut self, export: &str) {
        self.uri = uri(export, &self.socket);
    }

    /// Fails (with its log) if the server has died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.proc.exited() {
            bail!(
                "{} exited ({status}). Log tail:\n{}",
                self.proc.name(),
                self.proc.log_tail(30)
            );
        }
        Ok(())
    }

    pub async fn stop(self) {
        self.proc.stop().await;
    }
}

fn uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Starts `engine`'s server on the origin (writable).
pub async fn start_origin(setup: &Setup, engine: Engine) -> anyhow::Result<Server> {
    let name = engine.label();
    let socket = setup.socket(name);
    let cmd = match engine {
        Engine::Raw => setup.qemu_nbd(&setup.raw_image, "raw", &socket, VOLUME),
        Engine::Qcow2 => setup.qemu_nbd(&setup.qcow2_image, "qcow2", &socket, VOLUME),
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
                .arg(format!("unix:{}", socket.display()))
                .arg("--control-socket")
                .arg(setup.csnap_control())
                .env("RUST_LOG", "warn");
            if setup.direct {
                cmd.arg("--direct-io");
            }
            cmd
        }
    };
    start(name, cmd, &setup.log(name), socket, VOLUME).await
}

/// Starts qemu-nbd on internal snapshot `snapshot` of the qcow2 image, read-only (the
/// writable qcow2 server must be stopped: they would fight over the image lock).
pub async fn start_qcow2_snapshot(setup: &Setup, snapshot: &str) -> anyhow::Result<Server> {
    let name = format!("qcow2-{snapshot}");
    let export = format!("{VOLUME}@{snapshot}");
    let socket = setup.socket(&name);
    let mut cmd = setup.qemu_nbd(&setup.qcow2_image, "qcow2", &socket, &export);
    cmd.arg("--read-only").arg("--load-snapshot").arg(snapshot);
    start(&name, cmd, &setup.log(&name), socket, &export).await
}

async fn start(
    name: &str,
    cmd: Command,
    log: &Path,
    socket: PathBuf,
    export: &str,
) -> anyhow::Result<Server> {
    let mut proc = Proc::spawn(name, cmd, log)?;
    wait_for_nbd(&mut proc, &socket).await?;
    Ok(Server {
        proc,
        uri: uri(export, &socket),
        socket,
    })
}

/// Waits until the server at `socket` greets a connection with the NBD magic.
async fn wait_for_nbd(proc: &mut Proc, socket: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        if let Some(status) = proc.exited() {
            bail!(
                "{} exited ({status}) before serving NBD. Log tail:\n{}",
                proc.name(),
                proc.log_tail(30)
            );
        }
        if greets_with_nbd_magic(socket) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} does not serve NBD on {} after {READY_WAIT:?}. Log tail:\n{}",
                proc.name(),
                socket.display(),
                proc.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn greets_with_nbd_magic(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .is_err()
    {
        return false;
    }
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
}

/// Creates snapshot `name` of the csnap volume through csnapctl and the control socket.
pub async fn csnap_snapshot(setup: &Setup, name: &str) -> anyhow::Result<()> {
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
pub async fn qcow2_snapshot(setup: &Setup, name: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["snapshot", "-c", name]).arg(&setup.qcow2_image);
    run_tool("qemu-img snapshot", cmd, &setup.log("qemu-img"), TOOL_WAIT).await
}

/// csnapctl status --json, for the record (copy-outs, cache hits).
pub async fn csnap_status(setup: &Setup) -> anyhow::Result<serde_json::Value> {
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
