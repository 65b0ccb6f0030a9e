//! csnap-agent: the per-node daemon. Cluster mode (no flags) runs every volume of
//! corosync.conf's `csnap` section; `--standalone` runs one volume on one machine.

use std::process::ExitCode;

use clap::Parser;
use csnap_agent::daemon::{self, DaemonOptions};
use csnap_agent::standalone::{self, StandaloneArgs};
use csnap_server::logging::{self, LogTarget};

const LONG_ABOUT: &str = "\
csnap per-node agent.

Cluster mode (no --standalone): runs every volume of the `csnap` section of corosync.conf,
read through cmap and followed across `corosync-cfgtool -R` reloads. For each volume it
joins the CPG group csnap:VOLUME, agrees with the other nodes' agents on the node that runs
the volume's metadata server (highest csnap_priority, then longest in the group, then
lowest node id), runs that server when chosen, gathers every node's snapshot clients before
a new server grants origin writes, stops serving when its partition loses quorum, and
fences (or resets) nodes that come back from a partition with stale state. On every node it
runs the volume's client and its NBD exports: VOLUME (the origin) and VOLUME@SNAPSHOT.

Standalone mode (--standalone): one volume on one machine: server, client and NBD exports
in this process, configured by the options below.";

const AFTER_LONG_HELP: &str = "\
CONFIGURATION (cluster mode)
  corosync.conf, section csnap: key_file, control_socket, fencing (kill_node, stonith,
  command, reset), fence_command; per volume: origin, store, server_port, nbd_listen; per
  node in the nodelist: csnap_priority. /usr/share/doc/csnap/examples/corosync.conf has an
  example; docs/operations.md describes every key.

SIGNALS
  SIGTERM, SIGINT  stop cleanly: the local server marks its store clean, groups are left.

LOGGING
  To the systemd journal with CSNAP_VOLUME, CSNAP_NODE, CSNAP_EVENT and MESSAGE_ID fields
  when run as a service (see --log-target); RUST_LOG filters (default info).

EXIT STATUS
  0 after a clean stop; 1 when it cannot start (bad configuration, corosync unreachable,
  devices that cannot be opened) or fails; the message on stderr names what was wrong.

FILES
  /run/csnap/csnap.sock   control socket (csnapctl)
  /lib/systemd/system/csnap-agent.service, /usr/lib/ocf/resource.d/csnap/csnap

SEE ALSO
  csnapctl(8), corosync.conf(5), pcs(8), /usr/share/doc/csnap/operations.md";

#[derive(Parser, Debug)]
#[command(
    name = "csnap-agent",
    version,
    about = "csnap per-node agent",
    long_about = LONG_ABOUT,
    after_long_help = AFTER_LONG_HELP
)]
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

/// Most threads in the runtime's blocking pool (file I/O, fence commands).
const BLOCKING_THREADS: usize = 32;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init("csnap-agent", cli.log_target) {
        eprintln!("csnap-agent: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // The data path's pread/pwrite ran on the blocking pool (now only where io_uring
        // is refused, and for flushes, zeroing and copies). Tokio's default of 512
        // threads let 8 busy NBD connections grow it past 130 threads, and the allocator
        // memory those threads kept took the agent to about 200 MiB; 32 threads keep it
        // under 80 MiB with the same throughput on the benchmark (docs/benchmarks.md,
        // "Memory").
        .max_blocking_threads(BLOCKING_THREADS)
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
