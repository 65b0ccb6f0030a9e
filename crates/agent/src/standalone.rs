//! Standalone mode: one machine, no cluster. The metadata server (unless `--connect-server`
//! names one elsewhere), the client and the NBD exports run in this process; csnapctl talks
//! to it through the control socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use csnap_blockdev::client::{ClientConfig, Volume};
use csnap_blockdev::export::CsnapExports;
use csnap_blockdev::nbd::{self, Listener, NbdServer};
use csnap_proto::control::{ControlRequest, ControlResponse, VolumeStatus, DEFAULT_CONTROL_SOCKET};
use csnap_proto::validate_snapshot_name;
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
    /// unix socket VOLUME.server.sock beside the control socket.
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
        let volume = match &req {
            ControlRequest::SnapshotCreate { volume, .. }
            | ControlRequest::SnapshotList { volume, .. }
            | ControlRequest::SnapshotDelete { volume, .. } => Some(volume),
            ControlRequest::Status { volume } => volume.as_ref(),
        };
        if let Some(v) = volume {
            if *v != self.volume_name {
                return ControlResponse::error(format!(
                    "no such volume {v:?} (this agent serves volume {:?})",
                    self.volume_name
                ));
            }
        }
        let v = self.volume_name.clone();
        let result = match req {
            ControlRequest::SnapshotCreate { .. }
            | ControlRequest::SnapshotList { .. }
            | ControlRequest::SnapshotDelete { .. } => {
                return crate::snapshot_ops::handle(&v, &self.volume, req).await;
            }
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
        };
        result.unwrap_or_else(ControlResponse::error)
    }
}

/// Removes a unix socket file nobody listens on any more (left by a killed process).
fn remove_stale_socket(path: &std::path::Path) {
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

fn to_client_addr(addr: &server_net::ListenAddr) -> nbd::ListenAddr {
    match addr {
        server_net::ListenAddr::Tcp(a) => nbd::ListenAddr::Tcp(a.to_string()),
        server_net::ListenAddr::Unix(p) => nbd::ListenAddr::Unix(p.clone()),
    }
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
    let nbd_listen = match (&args.nbd_listen, args.server_only) {
        (_, true) => None,
        (Some(a), false) => Some(
            a.parse::<nbd::ListenAddr>()
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
            .parse::<nbd::ListenAddr>()
            .map_err(|e| anyhow::anyhow!("--connect-server: {e}"))?,
        None => {
            let listen = match &args.server_listen {
                Some(s) => s
                    .parse::<server_net::ListenAddr>()
                    .map_err(|e| anyhow::anyhow!("--server-listen: {e}"))?,
                None => {
                    let dir = control_socket
                        .parent()
                        .map(|d| d.to_path_buf())
                        .unwrap_or_else(|| PathBuf::from("."));
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    server_net::ListenAddr::Unix(dir.join(format!("{volume_name}.server.sock")))
                }
            };
            if let server_net::ListenAddr::Unix(p) = &listen {
                remove_stale_socket(p);
            }
            let mut cfg = ServerConfig::new(&origin, &store, listen, &key_path);
            cfg.volume = volume_name.clone();
            // On one host every process shares the page cache, so buffered I/O is
            // coherent there; FLUSH/FUA reach the devices either way.
            cfg.direct_io = direct_io;
            let running = server_net::start(cfg).await.with_context(|| {
                format!("cannot start the metadata server for volume {volume_name:?}")
            })?;
            let addr = to_client_addr(&running.local_addr());
            server = Some(running);
            addr
        }
    };
    let server_desc = match &server_addr {
        nbd::ListenAddr::Tcp(a) => a.clone(),
        nbd::ListenAddr::Unix(p) => format!("unix:{}", p.display()),
    };

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
        if let nbd::ListenAddr::Unix(p) = addr {
            remove_stale_socket(p);
        }
        let listener = Listener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for NBD on {addr:?}"))?;
        nbd_desc = listener.local_description();
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
            Some(s) => Some(s.failed().await),
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
    if let Some(nbd::ListenAddr::Unix(p)) = &nbd_listen {
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
