//! Shared pieces of the standalone tests: a formatted origin/store pair, csnap-agent
//! processes (killed by PID on drop), client tools run with bounded waits.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csnap_proto::control::{ControlRequest, ControlResponse};
use csnap_server::net;
use csnap_server::store::{FileDevice, FormatOptions, Store};

/// Longest wait for anything in these tests.
pub(crate) const WAIT: Duration = Duration::from_secs(60);
pub(crate) const MIB: u64 = 1 << 20;

pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `tool` is on PATH; under CI=true its absence is a failure.
pub(crate) fn require_tool(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    if !found {
        assert!(
            !in_ci(),
            "{tool} is required under CI=true but is not on PATH"
        );
        eprintln!("skipping: {tool} not found on PATH");
    }
    found
}

/// The seed of a randomised test: CSNAP_SEED if set, else fresh; always printed.
pub(crate) fn seed(test: &str) -> u64 {
    csnap_proto::testing::seed(test, "CSNAP_SEED")
}

/// Deterministic bytes for a seed.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A formatted origin + store and a key file in a temporary directory.
pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub origin: PathBuf,
    pub store: PathBuf,
    pub key_file: PathBuf,
    pub chunk_size: u64,
    pub origin_size: u64,
}

/// Creates an origin of `origin_size` bytes (recognisable contents) and a store for it,
/// formatted with `chunk_size`.
fn make_volume(origin: &Path, store: &Path, chunk_size: u64, origin_size: u64, store_size: u64) {
    let f = File::create(origin).unwrap();
    f.set_len(origin_size).unwrap();
    // Recognisable initial contents.
    f.write_all_at(&pattern(1, origin_size as usize), 0)
        .unwrap();
    File::create(store).unwrap().set_len(store_size).unwrap();
    let dev = FileDevice::open(store, false).unwrap();
    Store::format(
        &dev,
        &FormatOptions {
            chunk_size,
            origin_size,
            now: 1_700_000_000,
            uuid: None,
        },
    )
    .unwrap();
}

impl Fixture {
    pub(crate) fn new(chunk_size: u64, origin_size: u64, store_size: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let origin = dir.path().join("origin.img");
        let store = dir.path().join("store.img");
        let key_file = dir.path().join("cluster.key");
        make_volume(&origin, &store, chunk_size, origin_size, store_size);
        net::key::write_new_key(&key_file, false).unwrap();
        Fixture {
            dir,
            origin,
            store,
            key_file,
            chunk_size,
            origin_size,
        }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Another origin and store like the first, in the same directory: `NAME.img` and
    /// `NAME.store`.
    pub(crate) fn another_volume(&self, name: &str, store_size: u64) -> (PathBuf, PathBuf) {
        let origin = self.path(&format!("{name}.img"));
        let store = self.path(&format!("{name}.store"));
        make_volume(
            &origin,
            &store,
            self.chunk_size,
            self.origin_size,
            store_size,
        );
        (origin, store)
    }
}

/// A csnap-agent process; killed (by PID) on drop.
pub(crate) struct Agent {
    child: Option<Child>,
    pub control: PathBuf,
    pub nbd: Option<PathBuf>,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `csnap-agent --standalone` with `args` and waits until its control socket
    /// answers a status request.
    pub(crate) async fn start(fx: &Fixture, name: &str, args: &[&str]) -> Agent {
        let mut agent = Agent::spawn(fx, name, &fx.origin, &fx.store, args);
        agent.wait_ready().await;
        agent
    }

    /// Starts `csnap-agent --standalone` (volume `vol`, control socket `NAME.ctl` in the
    /// fixture's directory) on `origin` and `store` without waiting for it.
    pub(crate) fn spawn(
        fx: &Fixture,
        name: &str,
        origin: &Path,
        store: &Path,
        args: &[&str],
    ) -> Agent {
        Agent::spawn_on(
            fx,
            &fx.path(&format!("{name}.ctl")),
            name,
            origin,
            store,
            args,
        )
    }

    /// [`Agent::spawn`] with control socket `control` (its log is still `NAME.log`).
    pub(crate) fn spawn_on(
        fx: &Fixture,
        control: &Path,
        name: &str,
        origin: &Path,
        store: &Path,
        args: &[&str],
    ) -> Agent {
        Agent::spawn_with_env(fx, control, name, origin, store, args, &[])
    }

    /// [`Agent::spawn_on`] with extra environment variables (test hooks).
    pub(crate) fn spawn_with_env(
        fx: &Fixture,
        control: &Path,
        name: &str,
        origin: &Path,
        store: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let control = control.to_path_buf();
        let log = fx.path(&format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_csnap-agent"))
            .arg("--standalone")
            .arg("--volume")
            .arg("vol")
            .arg("--origin")
            .arg(origin)
            .arg("--store")
            .arg(store)
            .arg("--control-socket")
            .arg(&control)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn csnap-agent");
        let nbd = args
            .iter()
            .position(|a| *a == "--nbd-listen")
            .and_then(|i| args.get(i + 1))
            .and_then(|a| a.strip_prefix("unix:"))
            .map(PathBuf::from);
        Agent {
            child: Some(child),
            control,
            nbd,
            log,
        }
    }

    /// Waits (bounded) for the agent to exit by itself; its exit status and log.
    pub(crate) fn wait_exit(&mut self) -> (std::process::ExitStatus, String) {
        let mut c = self.child.take().expect("agent still owned");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return (status, self.log());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("csnap-agent did not exit within {WAIT:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) async fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(ControlResponse::Status { .. }) = csnap_agent::control::request(
                &self.control,
                &ControlRequest::Status { volume: None },
            )
            .await
            {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("csnap-agent exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "csnap-agent not ready within {WAIT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// NBD URI of an export on this agent's unix socket.
    pub(crate) fn uri(&self, export: &str) -> String {
        let sock = self.nbd.as_ref().expect("agent has an NBD socket");
        format!("nbd+unix:///{export}?socket={}", sock.display())
    }

    /// SIGKILL, as a crash.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (bounded); returns whether it exited 0.
    pub(crate) fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) async fn ctl(&self, req: ControlRequest) -> ControlResponse {
        tokio::time::timeout(WAIT, csnap_agent::control::request(&self.control, &req))
            .await
            .expect("control request answered in time")
            .expect("control request")
    }

    pub(crate) async fn snapshot(&self, name: &str) -> u64 {
        match self
            .ctl(ControlRequest::SnapshotCreate {
                volume: "vol".into(),
                name: name.into(),
            })
            .await
        {
            ControlResponse::SnapshotCreated { info, .. } => info.id.0,
            other => panic!("snapshot create {name}: {other:?}\n{}", self.log()),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Output of a finished tool.
pub(crate) struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a tool to completion within `WAIT` (killed on timeout or drop).
pub(crate) async fn run(program: &str, args: &[&str]) -> Ran {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, child)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub(crate) async fn run_ok(program: &str, args: &[&str]) -> Ran {
    let r = run(program, args).await;
    assert!(
        r.ok,
        "{program} {args:?} failed\nstdout:\n{}\nstderr:\n{}",
        r.stdout, r.stderr
    );
    r
}

/// Asserts with `qemu-img compare` that the NBD export at `uri` holds exactly the bytes of
/// the raw image `file`.
pub(crate) async fn assert_same_image(file: &Path, uri: &str) {
    let file = file.to_str().expect("temp paths are UTF-8");
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", file, uri],
    )
    .await;
}

pub(crate) fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs the csnapctl binary against `socket`.
pub(crate) async fn csnapctl(socket: &Path, args: &[&str]) -> Ran {
    let mut all = vec!["--socket", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    run(env!("CARGO_BIN_EXE_csnapctl"), &all).await
}

/// The metadata server in this process on a unix socket, buffered I/O (one host);
/// `expected`: the activation gate's list (what the cluster agent's gather would report).
pub(crate) async fn start_server(
    fx: &Fixture,
    sock: &Path,
    expected: Vec<csnap_proto::ClientId>,
) -> net::RunningServer {
    let mut cfg = net::ServerConfig::new(
        &fx.origin,
        &fx.store,
        csnap_proto::ListenAddr::Unix(sock.to_owned()),
        &fx.key_file,
    );
    cfg.direct_io = false;
    cfg.engine.expected_snapshot_clients = expected;
    tokio::time::timeout(WAIT, net::start(cfg))
        .await
        .expect("server started in time")
        .expect("server starts")
}

/// A client library volume (buffered I/O) for client `instance` on `node`, connected to
/// the server at `sock`.
pub(crate) async fn connect_volume(
    fx: &Fixture,
    sock: &Path,
    instance: u64,
    node: u32,
    cache_chunks: usize,
) -> std::sync::Arc<csnap_blockdev::client::Volume> {
    let volume = csnap_blockdev::client::Volume::connect(csnap_blockdev::client::ClientConfig {
        server: csnap_proto::ListenAddr::Unix(sock.to_owned()).into(),
        key: std::fs::read(&fx.key_file).unwrap(),
        instance,
        node,
        origin: fx.origin.clone(),
        store: fx.store.clone(),
        connect_timeout: WAIT,
        cache_chunks,
        direct_io: false,
    });
    tokio::time::timeout(WAIT, volume)
        .await
        .expect("connected in time")
        .expect("client connects")
}
