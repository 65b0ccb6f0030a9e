//! csnap-agent: the per-node daemon. Cluster mode (no flags) runs every volume of
//! corosync.conf's `csnap` section; `--standalone` runs one volume on one machine.

use std::process::ExitCode;

use clap::Parser;
use csnap_agent::daemon::{self, DaemonOptions};
use csnap_agent::standalone::{self, StandaloneArgs};
use csnap_server::logging::{self, LogTarget};

#[derive(Parser, Debug)]
#[command(name = "csnap-agent", version, about = "csnap per-node agent")]
struct Cli {
    /// One machine, no cluster: run the server, the client and the NBD exports here.
    #[arg(long)]
    standalone: bool,
    /// Where to log: the systemd journal, with structured fields (CSNAP_VOLUME, CSNAP_NODE,
    /// CSNAP_EVENT, MESSAGE_ID), when stderr is connected to it as systemd does for a
    /// service (auto), always (journal), or plain text on stderr (stderr).
    #[arg(long, value_name = "TARGET", default_value = "auto")]
    log_target: LogTarget,
    #[command(flatten)]
    args: StandaloneArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init("csnap-agent", cli.log_target) {
        eprintln!("csnap-agent: {e}");
        return ExitCode::FAILURE;
    }
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
