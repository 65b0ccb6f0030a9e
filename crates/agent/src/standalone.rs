//! Standalone mode: one machine, no cluster. The metadata server (unless `--connect-server`
//! names one elsewhere), the client and the NBD exports run in this process; csnapctl talks
//! to it through the control socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use csnap_blockdev::client::{ClientConfig, Volume};
use csnap_blockdev::export::CsnapExports;
use csnap_blockdev::nbd::NbdServer;
use csnap_proto::control::{ControlRequest, ControlResponse, VolumeStatus, DEFAULT_CONTROL_SOCKET};
use csnap_proto::net::{in_use_message, unix_socket_holder, Listener};
use csnap_proto::validate_snapshot_name;
use csnap_proto::ListenAddr;
use csnap_server::net::{self as server_net, RunningServer, ServerConfig};

/// `csnap-agent --standalone` options.
#[derive(clap::Args, Clone, Debug)]
pub struct StandaloneArgs {
    /// Volume name: the origin's NBD export name; snapshots are VOLUME@SNAPSHOT.
    #[arg(long)]
    pub volume: Option<String>,
    /// The origin device or file.
    #[arg(long)]
    pub origin: Option<PathBuf>,
    /// The snapshot store (formatted with `csnapctl format`).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Where the NBD exports listen: HOST:PORT or unix:PATH.
    #[arg(long)]
    pub nbd_listen: Option<String>,
    /// The control socket csnapctl talks to (default /run/csnap/csnap.sock; in cluster
    /// mode, corosync.conf's `csnap.control_socket`).
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// The cluster key (mode 0600). Without it an ephemeral key is generated (fine when
    /// every client runs in this process).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Where this process's metadata server listens (HOST:PORT or unix:PATH); default:
    /// unix socket CONTROL@VOLUME.server.sock beside the control socket, CONTROL being the
    /// control socket's file name without `.sock` (so agents with their own control
    /// sockets never share it, whatever their volumes are called).
    #[arg(long)]
    pub server_listen: Option<String>,
    /// Run no server; use the one at this address (another agent's, or csnap-server).
    /// Needs --key-file.
    #[arg(long, conflicts_with = "server_listen")]
    pub connect_server: Option<String>,
    /// Export snapshots read-only.
    #[arg(long)]
    pub snapshots_read_only: bool,
    /// This client's 64-bit instance id (default: random, which is what you want). Must
    /// differ between the volume's clients: the server refuses a second live client with
    /// the same id.
    #[arg(long)]
    pub client_id: Option<u64>,
    /// Node id reported to the server.
    #[arg(long, default_value_t = 0)]
    pub node: u32,
    /// Open the origin and store O_DIRECT in the client and the server; the exports then
    /// take 4 KiB-aligned I/O only. Implied whenever the server is reached over TCP
    /// (--server-listen tcp:..., --connect-server tcp:...): a client or server on another
    /// host would not see this host's page cache.
    #[arg(long)]
    pub direct_io: bool,
    /// Run the server and the control socket but no NBD exports (other processes'
    /// clients use the server through --connect-server). Needs --key-file.
    #[arg(long, conflicts_with = "connect_server")]
    pub server_only: bool,
}

fn required<T: Clone>(v: &Option<T>, flag: &str) -> anyhow::Result<T> {
    v.clone()
        .with_context(|| format!("standalone mode needs {flag}"))
}

/// What the control socket serves.
struct Agent {
    volume_name: String,
    volume: Arc<Volume>,
    mode: &'static str,
    origin: PathBuf,
    store: PathBuf,
    nbd_listen: String,
    server: String,
}

impl Agent {
    async fn handle(&self, req: ControlRequest) -> ControlResponse {
        if let Some(v) = req.volume() {
            if *v != self.volume_name {
                return ControlResponse::error(format!(
                    "no such volume {v:?} (this agent serves volume {:?})",
                    self.volume_name
                ));
            }
        }
        let v = self.volume_name.clone();
        let result = match req {
            ControlRequest::Status { .. } => match self.volume.status().await {
                Ok(server_status) => {
                    let cache = self.volume.cache_stats();
                    Ok(ControlResponse::Status {
                        volumes: vec![VolumeStatus {
                            volume: v.clone(),
                            mode: self.mode.to_owned(),
                            origin: self.origin.display().to_string(),
                            store: self.store.display().to_string(),
                            nbd_listen: self.nbd_listen.clone(),
                            server: self.server.clone(),
                            server_status,
                            origin_sessions: self.volume.origin_sessions(),
                            cache_hits: cache.hits,
                            cache_misses: cache.misses,
                            cached_chunks: cache.cached_chunks as u64,
                            cluster: None,
                        }],
                    })
                }
                Err(e) => Err(format!(
                    "cannot get the status of volume {v:?}: {}",
                    crate::snapshot_ops::describe(&e)
                )),
            },
            req => return crate::snapshot_ops::handle(&v, &self.volume, req).await,
        };
        result.unwrap_or_else(ControlResponse::error)
    }
}

/// Test hook for the rollback e2e tests: `CSNAP_TEST_ROLLBACK_WINDOW=N` in the agent's
/// environment makes the server's rollback copy back at most N chunks at once, so a test
/// can stop it in the middle of a copy-back (standalone, and in cluster mode whenever this
/// agent's node serves). Not for production use.
pub(crate) fn test_rollback_window() -> Option<usize> {
    let window = std::env::var("CSNAP_TEST_ROLLBACK_WINDOW").ok()?;
    match window.parse::<usize>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            tracing::warn!(%window, "ignoring CSNAP_TEST_ROLLBACK_WINDOW: not a positive number");
            None
        }
    }
}

/// Longest unix socket path the kernel takes (`sun_path` holds 108 bytes with the NUL).
const MAX_UNIX_PATH: usize = 107;

/// The default server socket of volume `volume` for the agent whose control socket is
/// `control`: `DIR/CONTROL@VOLUME.server.sock`, DIR being the control socket's directory and
/// CONTROL its file name without `.sock`. Distinct control sockets give distinct server
/// sockets (a volume name has no '@', so the last '@' splits the two unambiguously). A path
/// too long for a unix socket names the volume by a hash instead of its name.
pub fn default_server_socket(control: &Path, volume: &str) -> PathBuf {
    let dir = control
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file = control
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "csnap".to_owned());
    let stem = file.strip_suffix(".sock").unwrap_or(&file);
    let named = dir.join(format!("{stem}@{volume}.server.sock"));
    if named.as_os_str().len() <= MAX_UNIX_PATH {
        return named;
    }
    dir.join(format!(
        "{stem}@{:016x}.server.sock",
        fnv1a(volume.as_bytes())
    ))
}

/// 64-bit FNV-1a: a stable short stand-in for a long name.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Runs standalone mode until SIGTERM/SIGINT (clean shutdown) or a server failure (error).
pub async fn run(args: StandaloneArgs) -> anyhow::Result<()> {
    let control_socket = args
        .control_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET));
    let volume_name = required(&args.volume, "--volume NAME")?;
    if let Err(why) = validate_snapshot_name(&volume_name) {
        bail!("invalid volume name {volume_name:?}: {why}");
    }
    let origin = required(&args.origin, "--origin PATH")?;
    let store = required(&args.store, "--store PATH")?;
    // Before starting anything: a second agent on the same control socket would otherwise
    // start its server first and fail on whatever it collides with next.
    if let Some(holder) = unix_socket_holder(&control_socket) {
        bail!(
            "cannot listen on the control socket {}: {}; give each standalone agent its own \
             --control-socket",
            control_socket.display(),
            in_use_message(&holder)
        );
    }
    let nbd_listen = match (&args.nbd_listen, args.server_only) {
        (_, true) => None,
        (Some(a), false) => Some(
            a.parse::<ListenAddr>()
                .map_err(|e| anyhow::anyhow!("--nbd-listen: {e}"))?,
        ),
        (None, false) => bail!("standalone mode needs --nbd-listen ADDR (or --server-only)"),
    };

    // The key: given, or ephemeral in a private temporary directory.
    let mut _ephemeral_dir = None;
    let key_path = match (&args.key_file, &args.connect_server) {
        (Some(p), _) => p.clone(),
        (None, Some(_)) => bail!("--connect-server needs --key-file (the server's cluster key)"),
        (None, None) if args.server_only => {
            bail!("--server-only needs --key-file (its clients must share the key)")
        }
        (None, None) => {
            // Beside the control socket (a runtime directory), private to this process.
            let runtime_dir = control_socket
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map(|d| d.to_path_buf())
                .unwrap_or_else(std::env::temp_dir);
            std::fs::create_dir_all(&runtime_dir)
                .with_context(|| format!("cannot create {}", runtime_dir.display()))?;
            let dir = tempfile::Builder::new()
                .prefix(".csnap-ephemeral-key")
                .tempdir_in(&runtime_dir)
                .with_context(|| {
                    format!(
                        "cannot create a directory for the ephemeral key in {}",
                        runtime_dir.display()
                    )
                })?;
            let path = dir.path().join("cluster.key");
            server_net::key::write_new_key(&path, false)
                .context("cannot write the ephemeral key")?;
            tracing::info!(path = %path.display(), "no --key-file: using an ephemeral key");
            _ephemeral_dir = Some(dir);
            path
        }
    };
    let key = server_net::key::load_key_file(&key_path)?;

    // Buffered I/O is coherent only among processes of one kernel (one page cache). Over
    // TCP, the server or other clients may be on other hosts: then O_DIRECT, always.
    let over_tcp = |addr: &Option<String>| addr.as_deref().is_some_and(|a| !a.starts_with("unix:"));
    let direct_io =
        args.direct_io || over_tcp(&args.server_listen) || over_tcp(&args.connect_server);
    if direct_io && !args.direct_io {
        tracing::info!(
            "the server is reached over TCP, so the origin and store are opened O_DIRECT \
             (clients on other hosts would not see this host's page cache)"
        );
    }

    // The server, unless another one serves this volume.
    let mut server: Option<RunningServer> = None;
    let server_addr = match &args.connect_server {
        Some(addr) => addr
            .parse::<ListenAddr>()
            .map_err(|e| anyhow::anyhow!("--connect-server: {e}"))?,
        None => {
            let listen = match &args.server_listen {
                Some(s) => s
                    .parse::<ListenAddr>()
                    .map_err(|e| anyhow::anyhow!("--server-listen: {e}"))?,
                None => {
                    let path = default_server_socket(&control_socket, &volume_name);
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("cannot create {}", dir.display()))?;
                    }
                    ListenAddr::Unix(path)
                }
            };
            let mut cfg = ServerConfig::new(&origin, &store, listen, &key_path);
            cfg.volume = volume_name.clone();
            // On one host every process shares the page cache, so buffered I/O is
            // coherent there; FLUSH/FUA reach the devices either way.
            cfg.direct_io = direct_io;
            if let Some(window) = test_rollback_window() {
                cfg.engine.rollback_window = window;
            }
            let running = server_net::start(cfg).await.with_context(|| {
                format!("cannot start the metadata server for volume {volume_name:?}")
            })?;
            let addr = running.local_addr();
            server = Some(running);
            addr
        }
    };
    let server_desc = server_addr.to_string();

    let instance = args.client_id.unwrap_or_else(rand::random);
    let volume = Volume::connect(ClientConfig {
        server: server_addr.into(),
        key,
        instance,
        node: args.node,
        origin: origin.clone(),
        store: store.clone(),
        connect_timeout: Duration::from_secs(30),
        cache_chunks: 1 << 20,
        direct_io,
    })
    .await
    .with_context(|| {
        format!("cannot connect volume {volume_name:?} to its server at {server_desc}")
    })?;

    let exports = CsnapExports::new(&volume_name, volume.clone(), args.snapshots_read_only);
    let nbd_server = Arc::new(NbdServer::new(Arc::new(exports), Default::default()));
    let mut nbd_task = None;
    let mut nbd_desc = "none (--server-only)".to_owned();
    if let Some(addr) = &nbd_listen {
        let listener = Listener::bind(addr)
            .await
            .context("cannot serve the NBD exports")?;
        nbd_desc = listener.to_string();
        let span = tracing::info_span!("volume", csnap_volume = %volume_name);
        nbd_task = Some(tokio::spawn(tracing::Instrument::instrument(
            nbd_server.clone().serve(listener),
            span,
        )));
    }

    let control = crate::control::bind(&control_socket)?;
    let agent = Arc::new(Agent {
        volume_name: volume_name.clone(),
        volume: volume.clone(),
        mode: if server.is_some() {
            "standalone"
        } else {
            "client"
        },
        origin,
        store,
        nbd_listen: nbd_desc.clone(),
        server: server_desc.clone(),
    });
    let handler = Arc::new(move |req: ControlRequest| {
        let agent = agent.clone();
        async move { agent.handle(req).await }
    });
    let control_task = tokio::spawn(crate::control::serve(
        control,
        crate::control::Identity::this_host(None),
        handler,
    ));
    tracing::info!(volume = %volume_name, nbd = %nbd_desc, server = %server_desc,
        control = %control_socket.display(), client = format_args!("{instance:#x}"), "csnap-agent ready");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let failure = async {
        match &server {
            Some(s) => Some(s.failed().await.to_string()),
            None => std::future::pending().await,
        }
    };
    let outcome: anyhow::Result<()> = tokio::select! {
        _ = sigterm.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
        reason = failure => Err(anyhow::anyhow!("the metadata server failed: {}", reason.unwrap_or_default())),
    };
    tracing::info!(volume = %volume_name, "csnap-agent stopping");
    control_task.abort();
    let _ = std::fs::remove_file(&control_socket);
    if !nbd_server.shutdown(Duration::from_secs(10)).await {
        tracing::warn!("NBD connections still open after 10 s; closing anyway");
    }
    if let Some(t) = nbd_task {
        t.abort();
    }
    if let Some(ListenAddr::Unix(p)) = &nbd_listen {
        let _ = std::fs::remove_file(p);
    }
    volume.shutdown().await;
    if let Some(s) = server {
        if outcome.is_ok() {
            s.shutdown().await.context("clean server shutdown failed")?;
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_server_sockets_are_named_after_control_socket_and_volume() {
        let p = |c: &str, v: &str| default_server_socket(Path::new(c), v);
        assert_eq!(
            p("/run/csnap/csnap.sock", "vol"),
            PathBuf::from("/run/csnap/csnap@vol.server.sock")
        );
        // Two agents with one volume name and their own control sockets in one directory.
        assert_ne!(p("/d/a.sock", "v"), p("/d/b.sock", "v"));
        assert_eq!(p("/d/a.ctl", "v"), PathBuf::from("/d/a.ctl@v.server.sock"));
        assert_eq!(p("ctl.sock", "v"), PathBuf::from("./ctl@v.server.sock"));
        assert_eq!(
            p("/d/a.sock", "Grüße snap"),
            PathBuf::from("/d/a@Grüße snap.server.sock")
        );
    }

    #[test]
    fn long_volume_names_are_hashed_to_fit_a_unix_socket() {
        let long = "x".repeat(255);
        let path = default_server_socket(Path::new("/run/csnap/csnap.sock"), &long);
        assert!(path.as_os_str().len() <= MAX_UNIX_PATH, "{path:?}");
        assert_eq!(
            path,
            PathBuf::from(format!(
                "/run/csnap/csnap@{:016x}.server.sock",
                fnv1a(long.as_bytes())
            ))
        );
        let other = default_server_socket(Path::new("/run/csnap/csnap.sock"), &"y".repeat(255));
        assert_ne!(path, other);
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
