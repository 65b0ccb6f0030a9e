//! Serves regular files over NBD, for tests and manual use.
//!
//! nbd-file-server --listen 127.0.0.1:10809 --export disk=/var/tmp/disk.img
//! nbd-file-server --listen unix:/run/nbd.sock --export a=/tmp/a.img:ro --export b=/tmp/b.img
//! Under socket activation (LISTEN_FDS set, as by `nbdinfo -- [ nbd-file-server ... ]`)
//! `--listen` may be omitted. The first export is also served under the empty name.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use csnap_blockdev::nbd::activation::{take_activated_listeners, ActivatedListener};
use csnap_blockdev::nbd::{FileExports, NbdServer, ServerConfig};
use csnap_proto::net::Listener;
use csnap_proto::ListenAddr;

#[derive(Parser, Debug)]
#[command(about = "Serve regular files over NBD")]
struct Args {
    /// Address to listen on: HOST:PORT or unix:PATH (repeatable). Port 0 picks a free
    /// port; every bound address is printed as "listening on ADDR".
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<ListenAddr>,
    /// Export NAME=PATH, with an optional ":ro" (read-only) or ":rw" suffix (repeatable).
    #[arg(long = "export", value_name = "NAME=PATH[:ro]", required = true)]
    exports: Vec<ExportSpec>,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Refuse structured replies (clients then get simple replies only).
    #[arg(long)]
    no_structured_replies: bool,
    /// Seconds a client may take for the handshake.
    #[arg(long, default_value_t = 30)]
    handshake_timeout: u64,
}

#[derive(Clone, Debug)]
struct ExportSpec {
    name: String,
    path: PathBuf,
    read_only: bool,
}

impl std::str::FromStr for ExportSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not NAME=PATH[:ro]"))?;
        let (path, read_only) = if let Some(path) = rest.strip_suffix(":ro") {
            (path, true)
        } else if let Some(path) = rest.strip_suffix(":rw") {
            (path, false)
        } else {
            (rest, false)
        };
        if path.is_empty() {
            return Err(format!("{s:?} has an empty path"));
        }
        Ok(ExportSpec {
            name: name.to_owned(),
            path: PathBuf::from(path),
            read_only,
        })
    }
}

fn main() -> Result<()> {
    // Before any thread exists: reads and clears LISTEN_* from the environment.
    let activated = take_activated_listeners().context("socket activation")?;
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let mut exports = FileExports::new();
    for spec in &args.exports {
        exports
            .add(&spec.name, &spec.path, spec.read_only)
            .with_context(|| format!("export {:?}", spec.name))?;
    }
    let config = ServerConfig {
        max_in_flight: args.max_in_flight.max(1),
        handshake_timeout: Duration::from_secs(args.handshake_timeout.max(1)),
        handshake: csnap_blockdev::nbd::HandshakeConfig {
            structured_replies: !args.no_structured_replies,
            ..Default::default()
        },
    };
    let server = Arc::new(NbdServer::new(Arc::new(exports), config));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let mut listeners = Vec::new();
        for ActivatedListener { listener, name } in activated.into_iter().flatten() {
            let listener = Listener::from_std(listener).context("adopting an activated socket")?;
            tracing::info!(address = %listener, ?name, "socket activated");
            listeners.push(listener);
        }
        for addr in &args.listen {
            let listener = Listener::bind(addr).await?;
            // Only for sockets we bound: under activation stdout may be the client's.
            println!("listening on {listener}");
            listeners.push(listener);
        }
        if listeners.is_empty() {
            bail!("nothing to listen on: give --listen ADDR or start under socket activation");
        }
        let mut tasks = tokio::task::JoinSet::new();
        for listener in listeners {
            tasks.spawn(server.clone().serve(listener));
        }
        use std::io::Write;
        std::io::stdout().flush().ok();
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, shutting down"),
            _ = terminate.recv() => tracing::info!("terminated, shutting down"),
            Some(done) = tasks.join_next() => {
                // A listener serves until shutdown: ending first is a panic.
                done.context("listener task panicked")?;
            }
        }
        // In-flight requests are answered before connections close.
        if !server.shutdown(Duration::from_secs(10)).await {
            tracing::warn!(
                connections = server.connection_count(),
                "connections still open after 10 s, exiting anyway"
            );
        }
        Ok(())
    })
}
