//! csnap-agent: the per-node daemon. Cluster mode (no flags) runs every volume of
//! corosync.conf's `csnap` section; `--standalone` runs one volume on one machine.

use std::process::ExitCode;

use clap::Parser;
use csnap_agent::daemon::{self, DaemonOptions};
use csnap_agent::standalone::{self, StandaloneArgs};

#[derive(Parser, Debug)]
#[command(name = "csnap-agent", version, about = "csnap per-node agent")]
struct Cli {
    /// One machine, no cluster: run the server, the client and the NBD exports here.
    #[arg(long)]
    standalone: bool,
    #[command(flatten)]
    args: StandaloneArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("csnap-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = if cli.standalone {
        runtime.block_on(standalone::run(cli.args))
    } else {
        runtime.block_on(daemon::run(DaemonOptions {
            control_socket: cli.args.control_socket.clone(),
            snapshots_read_only: cli.args.snapshots_read_only,
        }))
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("csnap-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
