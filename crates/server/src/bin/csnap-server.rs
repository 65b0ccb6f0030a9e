//! csnap-server: the metadata server of one csnap volume. See docs/server.md.

use clap::Parser;
use csnap_proto::ClientId;
use csnap_proto::ListenAddr;
use csnap_server::engine::StoreFullPolicy;
use csnap_server::logging::{self, LogTarget};
use csnap_server::net::{self, ServerConfig};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "csnap-server",
    version,
    about = "Metadata server of a csnap cluster snapshot volume"
)]
struct Args {
    /// The origin device (read for copy-outs).
    #[arg(long, value_name = "PATH")]
    origin: PathBuf,
    /// The snapshot store device (formatted with `csnapctl format`).
    #[arg(long, value_name = "PATH")]
    store: PathBuf,
    /// Where to listen: HOST:PORT or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    listen: ListenAddr,
    /// The cluster key file (mode 0600, owned by this user; `csnapctl keygen` writes one).
    #[arg(long, value_name = "PATH")]
    key_file: PathBuf,
    /// A snapshot client of the previous server that must reconnect (or be declared gone)
    /// before any origin write is granted. Repeatable; `INSTANCE/snapN` (INSTANCE decimal
    /// or 0x-hex, as the server's logs and status print it).
    #[arg(long = "expect-client", value_name = "ID", value_parser = parse_client_id)]
    expect_clients: Vec<ClientId>,
    /// What to sacrifice when the store is full: invalidate-oldest or
    /// fail-snapshot-writes-only.
    #[arg(long, value_name = "P", default_value = "invalidate-oldest")]
    store_full_policy: StoreFullPolicy,
    /// Usage levels (percent, comma separated) of the store's data area at which a warning
    /// is logged and shown in the status; 0 for none.
    #[arg(long, value_name = "P,...", default_value = "80,90", value_delimiter = ',', value_parser = parse_percent)]
    warn_data: Vec<u8>,
    /// The same for the store's metadata area.
    #[arg(long, value_name = "P,...", default_value = "80,90", value_delimiter = ',', value_parser = parse_percent)]
    warn_metadata: Vec<u8>,
    /// Metadata cache size in MiB.
    #[arg(long, value_name = "N", default_value_t = 64)]
    cache_mb: u64,
    /// Use buffered I/O instead of O_DIRECT on the devices (only safe when no other node
    /// writes them).
    #[arg(long)]
    buffered_io: bool,
    /// Never promise uniqueness to origin clients (disables their write cache).
    #[arg(long)]
    no_unique_promises: bool,
    /// Name of the volume in log lines (default: the store path).
    #[arg(long, value_name = "NAME")]
    volume: Option<String>,
    /// Where to log: the systemd journal (structured fields) when stderr is connected to it
    /// (auto), always (journal), or plain text on stderr (stderr).
    #[arg(long, value_name = "TARGET", default_value = "auto")]
    log_target: LogTarget,
}

fn parse_percent(s: &str) -> Result<u8, String> {
    match s.trim().trim_end_matches('%').parse::<u8>() {
        Ok(p) if p <= 100 => Ok(p),
        _ => Err(format!(
            "{s:?} is not a percentage from 1 to 100 (or 0 for no warning)"
        )),
    }
}

fn parse_client_id(s: &str) -> Result<ClientId, String> {
    s.parse()
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = logging::init("csnap-server", args.log_target) {
        eprintln!("csnap-server: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("csnap-server-io")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("csnap-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let mut config = ServerConfig::new(args.origin, args.store, args.listen, args.key_file);
    config.engine.expected_snapshot_clients = args.expect_clients;
    config.engine.store_full_policy = args.store_full_policy;
    config.engine.data_warn_percents = args.warn_data;
    config.engine.metadata_warn_percents = args.warn_metadata;
    config.cache_bytes = args.cache_mb.saturating_mul(1 << 20);
    config.direct_io = !args.buffered_io;
    config.engine.promise_unique = !args.no_unique_promises;
    if let Some(v) = args.volume {
        config.volume = v;
    }
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let server = match net::start(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            eprintln!("csnap-server: {e}");
            return ExitCode::from(2);
        }
    };
    let failure = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); None }
        _ = int.recv() => { tracing::info!("SIGINT: shutting down"); None }
        reason = server.failed() => Some(reason),
    };
    match (server.shutdown().await, failure) {
        (Ok(()), None) => {
            tracing::info!("clean shutdown");
            ExitCode::SUCCESS
        }
        (Err(e), _) => {
            tracing::error!("stopped: {e}");
            ExitCode::FAILURE
        }
        (Ok(()), Some(reason)) => {
            tracing::error!("stopped after a failure: {reason}");
            ExitCode::FAILURE
        }
    }
}
