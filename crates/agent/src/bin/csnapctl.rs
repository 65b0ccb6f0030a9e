//! csnapctl: the csnap administration command.
//!
//! Subcommands are variants of `Command`; each has its own argument struct and handler.
//! `format` works on local devices directly (no agent needed).

use clap::{Args, Parser, Subcommand};
use csnap_server::store::format::Superblock;
use csnap_server::store::tool::{format_paths, parse_size, FormatRequest};
use csnap_server::store::StoreError;
use std::path::PathBuf;
use std::process::ExitCode;

const AFTER_LONG_HELP: &str = "\
EXAMPLES
  csnapctl status                       every volume: server, generation, members, quorum,
                                        the gate the agent waits on, the last failover
  csnapctl status vol0 --json           the same as JSON, for scripts and monitoring
  csnapctl snapshot create vol0 nightly then `nbd://localhost/vol0@nightly` reads it
  csnapctl snapshot list vol0
  csnapctl snapshot delete vol0 nightly
  csnapctl keygen /etc/csnap/key        the cluster key (copy it to every node)
  csnapctl format --origin /dev/vg/origin --store /dev/vg/store
  csnapctl check --origin /dev/vg/origin --store /dev/vg/store

Snapshot and status commands go through the local agent's control socket and work from
any node (snapshot operations are forwarded to the volume's server). format and check
work on the devices directly; check refuses a store a server is using.

EXIT STATUS
  0 success; 1 failure, with a message on stderr naming what was wrong (check: 1 means
  problems were found; 2 means the store was not checked).

SEE ALSO
  csnap-agent(8), /usr/share/doc/csnap/operations.md";

#[derive(Parser, Debug)]
#[command(
    name = "csnapctl",
    version,
    about = "Administer csnap cluster snapshot volumes",
    after_long_help = AFTER_LONG_HELP
)]
struct Cli {
    /// The agent's control socket (for snapshot and status).
    #[arg(long, global = true, default_value = csnap_proto::control::DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Format a snapshot store for an origin device (destroys what the store held).
    Format(FormatArgs),
    /// Create, list or delete snapshots of a volume (through the agent).
    #[command(subcommand)]
    Snapshot(csnap_agent::ctl::SnapshotCmd),
    /// Show the status of the agent's volumes.
    Status(csnap_agent::ctl::StatusArgs),
    /// Write a new random cluster key (32 bytes, mode 0600) for servers and clients.
    Keygen(KeygenArgs),
    /// Check a store's consistency without changing it (exit 0: consistent, 1: problems
    /// found or the store is unreadable, 2: not checked, e.g. a server is using it).
    Check(CheckArgs),
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// The store device or file.
    #[arg(long)]
    store: PathBuf,
    /// The origin device or file: also check its size matches the store.
    #[arg(long)]
    origin: Option<PathBuf>,
}

fn run_check(args: &CheckArgs) -> ExitCode {
    use csnap_server::store::tool::{check_paths, CheckError};
    let outcome = match check_paths(&args.store, args.origin.as_deref()) {
        Ok(o) => o,
        Err(e @ CheckError::InUse(_)) => {
            eprintln!("csnapctl: error: {e}");
            return ExitCode::from(2);
        }
        Err(CheckError::Store(e)) => {
            println!(
                "{}: DAMAGED: cannot be read as a csnap store",
                args.store.display()
            );
            println!("  {e}");
            return ExitCode::from(1);
        }
    };
    let i = &outcome.info;
    let r = &outcome.report;
    println!("store {} (uuid {})", args.store.display(), i.uuid);
    println!(
        "  chunk size {}  origin {} bytes  data {} chunks ({} free)  metadata {} blocks ({} free)",
        i.chunk_size,
        i.origin_size,
        i.data_chunks,
        i.free_chunks,
        i.meta_blocks,
        i.free_meta_blocks
    );
    println!(
        "  {} snapshots  {} exception records  {} data chunks used  {} metadata blocks used",
        i.snapshots, r.exception_records, r.data_chunks_used, r.meta_blocks_used
    );
    if outcome.was_unclean {
        println!("  not shut down cleanly: the journal was replayed in memory for the check (the disk is unchanged)");
    }
    if outcome.is_clean() {
        println!("consistent");
        return ExitCode::SUCCESS;
    }
    let problems: Vec<&String> = outcome.problems().collect();
    println!("{} PROBLEMS:", problems.len());
    for p in problems {
        println!("  {p}");
    }
    ExitCode::from(1)
}

#[derive(Args, Debug)]
struct KeygenArgs {
    /// Where to write the key (copy it to every node, keeping mode 0600).
    path: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
}

fn run_keygen(args: &KeygenArgs) -> ExitCode {
    match csnap_server::net::key::write_new_key(&args.path, args.force) {
        Ok(()) => {
            println!(
                "wrote a new {}-byte cluster key to {} (mode 0600)",
                csnap_server::net::key::KEY_LEN,
                args.path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("csnapctl: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Args, Debug)]
struct FormatArgs {
    /// The origin device or file (read only, to learn its size).
    #[arg(long)]
    origin: PathBuf,
    /// The store device or file to format.
    #[arg(long)]
    store: PathBuf,
    /// Chunk size: a power of two from 4K to 1M (e.g. 4K, 16K, 64K, 1M).
    #[arg(long, default_value = "16K", value_parser = parse_size)]
    chunk_size: u64,
    /// Overwrite an existing csnap store.
    #[arg(long)]
    force: bool,
}

fn print_format_summary(args: &FormatArgs, sb: &Superblock) {
    let g = &sb.geometry;
    println!(
        "formatted {} as a csnap store for {}",
        args.store.display(),
        args.origin.display()
    );
    println!(
        "  uuid         {}",
        csnap_server::store::format::uuid_string(&sb.uuid)
    );
    println!("  chunk size   {} bytes", g.chunk_size);
    println!(
        "  origin       {} bytes ({} chunks)",
        g.origin_size,
        g.origin_chunks()
    );
    println!(
        "  data area    {} chunks ({} bytes)",
        g.data_chunks,
        g.data_chunks * g.chunk_size
    );
    println!(
        "  metadata     {} node blocks, journal {} blocks",
        g.meta_blocks, g.journal_blocks
    );
}

fn run_format(args: &FormatArgs) -> Result<(), StoreError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let sb = format_paths(&FormatRequest {
        origin: &args.origin,
        store: &args.store,
        chunk_size: args.chunk_size,
        force: args.force,
        now,
    })?;
    print_format_summary(args, &sb);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Format(args) => run_format(args),
        Command::Snapshot(cmd) => {
            let run = csnap_agent::ctl::run_snapshot(&cli.socket, cmd.clone());
            return csnap_agent::ctl::run_cli(run);
        }
        Command::Status(args) => {
            let run = csnap_agent::ctl::run_status(&cli.socket, args.clone());
            return csnap_agent::ctl::run_cli(run);
        }
        Command::Keygen(args) => return run_keygen(args),
        Command::Check(args) => return run_check(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("csnapctl: error: {e}");
            ExitCode::FAILURE
        }
    }
}
