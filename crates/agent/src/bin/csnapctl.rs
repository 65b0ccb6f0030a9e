//! csnapctl: the csnap administration command.
//!
//! Subcommands are variants of `Command`; each has its own argument struct and handler.
//! `format`, `check` and `keygen` work on local files and devices directly (no agent
//! needed); `snapshot` and `status` go through the agent's control socket (`ctl.rs`).

use clap::{Args, Parser, Subcommand};
use csnap_agent::ctl::{
    iso_utc, json, local_time, show_progress, EXIT_FAILURE, EXIT_OK, EXIT_USAGE,
};
use csnap_server::store::format::{uuid_string, Superblock};
use csnap_server::store::tool::{format_paths_with_progress, parse_size, FormatRequest};
use csnap_server::store::{FormatProgress, StoreError};
use std::path::PathBuf;
use std::process::ExitCode;

const AFTER_LONG_HELP: &str = "\
EXAMPLES
  csnapctl status                       every volume: server, generation, members, quorum,
                                        the gate the agent waits on, the last failover
  csnapctl status vol0 --json           the same as JSON, for scripts and monitoring
  csnapctl snapshot create vol0 nightly then `nbd://localhost/vol0@nightly` reads it
  csnapctl snapshot list vol0
  csnapctl snapshot delete vol0 nightly --wait
  csnapctl diff vol0 monday tuesday     the byte extents written between two snapshots
  csnapctl rollback vol0 monday --wait  the origin becomes snapshot monday, online
  csnapctl export-diff vol0 --from monday tuesday - | ssh backup csnapctl import-diff vol0 -
                                        replicate tuesday's changes to another cluster
  csnapctl keygen /etc/csnap/key        the cluster key (copy it to every node)
  csnapctl format --origin /dev/vg/origin --store /dev/vg/store
  csnapctl check --origin /dev/vg/origin --store /dev/vg/store

Snapshot, diff, export-diff, import-diff, rollback and status commands go through the local agent's control socket and work from
any node (snapshot operations are forwarded to the volume's server). format, check and
keygen work on the devices and files directly; check refuses a store a server is using.
`csnapctl COMMAND --help` describes each command.

OUTPUT
  Every command takes --json: one JSON document on stdout (shapes in operations.md,
  \"csnapctl reference\"); errors and progress always go to stderr. Times are shown in
  local time with the UTC offset (TZ is honoured); JSON has the raw Unix time and the
  same instant in ISO 8601 UTC beside it (ctime and ctime_iso, *_at_ms and *_at_iso).
  Errors from the agent name the node that answered and the volume:
    csnapctl: error: node 2 (host-b), volume vol0: no such snapshot: ...

EXIT STATUS
  0  success (check: the store is consistent)
  1  failure: the agent answered with an error, the device could not be formatted or
     written (check: problems were found, or the store is unreadable)
  2  usage error (unknown option, missing argument); check: the store was not checked
     (e.g. a server is using it)
  3  the agent could not be reached: no control socket, connection refused, no answer
  4  snapshot delete --wait: the timeout ran out before the reclaim finished (the
     snapshot is deleted); rollback --wait: the timeout ran out before the copy-back
     finished (the rollback goes on)

ENVIRONMENT
  TZ   the time zone for times shown (default: /etc/localtime)

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
    #[command(long_about = FORMAT_HELP, after_long_help = FORMAT_EXAMPLES)]
    Format(FormatArgs),
    /// Create, list or delete snapshots of a volume (through the agent).
    #[command(subcommand, long_about = SNAPSHOT_HELP)]
    Snapshot(csnap_agent::ctl::SnapshotCmd),
    /// Show the status of the agent's volumes.
    Status(csnap_agent::ctl::StatusArgs),
    /// Print the extents where a snapshot (or the origin) differs from an older snapshot,
    /// from metadata alone.
    Diff(csnap_agent::ctl_diff::DiffArgs),
    /// Write a snapshot's changes since an older one (or all of it) as a checksummed
    /// stream, for import-diff on another volume.
    ExportDiff(csnap_agent::ctl_xdiff::ExportDiffArgs),
    /// Apply a stream from export-diff to a volume and create its snapshot there.
    ImportDiff(csnap_agent::ctl_xdiff::ImportDiffArgs),
    /// Roll the volume's origin back to a snapshot, online (the origin as it was is kept
    /// as a new snapshot).
    Rollback(csnap_agent::ctl_rollback::RollbackArgs),
    /// Write a new random cluster key (32 bytes, mode 0600) for servers and clients.
    #[command(long_about = KEYGEN_HELP, after_long_help = KEYGEN_EXAMPLES)]
    Keygen(KeygenArgs),
    /// Check a store's consistency without changing it (exit 0: consistent, 1: problems
    /// found or the store is unreadable, 2: not checked, e.g. a server is using it).
    #[command(long_about = CHECK_HELP, after_long_help = CHECK_EXAMPLES)]
    Check(CheckArgs),
}

const SNAPSHOT_HELP: &str = "\
Creates, lists and deletes snapshots of a volume through the local agent, from any node:
the agent forwards the request to the node serving the volume. `csnapctl snapshot
COMMAND --help` describes each.";

const CHECK_HELP: &str = "\
Checks a store's consistency without changing it: every exception record, the free
maps, the snapshot table and (with --origin) that the origin has the size the store was
formatted for. A store not shut down cleanly has its journal replayed in memory only.
check takes a shared lock on the store and refuses (exit 2) while a server on this node
uses it.

Exit status: 0 consistent; 1 problems found, or the store cannot be read as a csnap
store; 2 not checked.";

const CHECK_EXAMPLES: &str = "\
EXAMPLES
  csnapctl check --store /dev/vg/store --origin /dev/vg/origin
  csnapctl check --store /dev/vg/store --json | jq .consistent";

#[derive(Args, Debug)]
struct CheckArgs {
    /// The store device or file.
    #[arg(long)]
    store: PathBuf,
    /// The origin device or file: also check its size matches the store.
    #[arg(long)]
    origin: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn print_json(v: &serde_json::Value) -> bool {
    match json(v) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("csnapctl: error: cannot write JSON: {e}");
            false
        }
    }
}

fn run_check(args: &CheckArgs) -> ExitCode {
    use csnap_server::store::tool::{check_paths, CheckError};
    let store = args.store.display().to_string();
    let outcome = match check_paths(&args.store, args.origin.as_deref()) {
        Ok(o) => o,
        Err(e @ CheckError::InUse(_)) => {
            if args.json {
                print_json(&serde_json::json!({
                    "store": store,
                    "checked": false,
                    "consistent": null,
                    "error": e.to_string(),
                }));
            }
            eprintln!("csnapctl: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(CheckError::Store(e)) => {
            if args.json {
                print_json(&serde_json::json!({
                    "store": store,
                    "checked": true,
                    "consistent": false,
                    "damaged": true,
                    "problems": [format!("cannot be read as a csnap store: {e}")],
                }));
            } else {
                println!("{store}: DAMAGED: cannot be read as a csnap store");
                println!("  {e}");
            }
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let i = &outcome.info;
    let r = &outcome.report;
    let problems: Vec<&String> = outcome.problems().collect();
    let code = if outcome.is_clean() {
        EXIT_OK
    } else {
        EXIT_FAILURE
    };
    if args.json {
        let ok = print_json(&serde_json::json!({
            "store": store,
            "checked": true,
            "consistent": outcome.is_clean(),
            "damaged": false,
            "uuid": i.uuid,
            "chunk_size": i.chunk_size,
            "origin_size": i.origin_size,
            "origin_chunks": i.origin_chunks,
            "data_chunks": i.data_chunks,
            "free_chunks": i.free_chunks,
            "meta_blocks": i.meta_blocks,
            "free_meta_blocks": i.free_meta_blocks,
            "snapshots": i.snapshots,
            "exception_records": r.exception_records,
            "data_chunks_used": r.data_chunks_used,
            "meta_blocks_used": r.meta_blocks_used,
            "unclean": outcome.was_unclean,
            "problems": problems,
        }));
        return ExitCode::from(if ok { code } else { EXIT_FAILURE });
    }
    println!("store {store} (uuid {})", i.uuid);
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
    } else {
        println!("{} PROBLEMS:", problems.len());
        for p in problems {
            println!("  {p}");
        }
    }
    ExitCode::from(code)
}

const KEYGEN_HELP: &str = "\
Writes a new random cluster key: 32 bytes from the system's random source, in a file of
mode 0600. Servers and clients authenticate every frame with it, so every node needs the
same file (copy it with scp -p, or keep it in your configuration management). Refuses
to replace an existing file without --force.";

const KEYGEN_EXAMPLES: &str = "\
EXAMPLES
  csnapctl keygen /etc/csnap/key
  scp -p /etc/csnap/key node2:/etc/csnap/key";

#[derive(Args, Debug)]
struct KeygenArgs {
    /// Where to write the key (copy it to every node, keeping mode 0600).
    path: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn run_keygen(args: &KeygenArgs) -> ExitCode {
    match csnap_server::net::key::write_new_key(&args.path, args.force) {
        Ok(()) => {
            let bytes = csnap_server::net::key::KEY_LEN;
            if args.json {
                let ok = print_json(&serde_json::json!({
                    "path": args.path.display().to_string(),
                    "bytes": bytes,
                    "mode": "0600",
                }));
                return ExitCode::from(if ok { EXIT_OK } else { EXIT_FAILURE });
            }
            println!(
                "wrote a new {bytes}-byte cluster key to {} (mode 0600)",
                args.path.display()
            );
            ExitCode::from(EXIT_OK)
        }
        Err(e) => {
            eprintln!("csnapctl: error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

const FORMAT_HELP: &str = "\
Formats a snapshot store for an origin device: plans the store's metadata (bitmaps, the
exception and snapshot trees, the journal) and data areas from the two sizes, writes the
bitmaps and the empty trees, and writes the superblocks last. The origin is only read
(for its size). A store that already holds a csnap store (even a damaged one) is left
alone unless --force.

Progress goes to stderr while the metadata is written, when stderr is a terminal or with
--progress; the summary (or --json) goes to stdout.";

const FORMAT_EXAMPLES: &str = "\
EXAMPLES
  csnapctl format --origin /dev/vg/origin --store /dev/vg/store
  csnapctl format --origin /dev/vg/origin --store /dev/vg/store --chunk-size 64K --force
  csnapctl format --origin disk.img --store store.img --json --progress";

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
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Print progress on stderr even when it is not a terminal.
    #[arg(long)]
    progress: bool,
}

fn format_summary(args: &FormatArgs, sb: &Superblock) -> serde_json::Value {
    let g = &sb.geometry;
    serde_json::json!({
        "store": args.store.display().to_string(),
        "origin": args.origin.display().to_string(),
        "uuid": uuid_string(&sb.uuid),
        "chunk_size": g.chunk_size,
        "origin_size": g.origin_size,
        "origin_chunks": g.origin_chunks(),
        "data_chunks": g.data_chunks,
        "data_bytes": g.data_chunks * g.chunk_size,
        "meta_blocks": g.meta_blocks,
        "journal_blocks": g.journal_blocks,
        "created": sb.created,
    })
}

fn print_format_summary(args: &FormatArgs, sb: &Superblock) {
    let g = &sb.geometry;
    println!(
        "formatted {} as a csnap store for {}",
        args.store.display(),
        args.origin.display()
    );
    println!("  uuid         {}", uuid_string(&sb.uuid));
    println!("  created      {}", local_time(sb.created));
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

/// Progress lines: `csnapctl: format: 42% (1234 of 2938 metadata blocks written)`, one
/// per whole percent at most.
fn format_progress(store: String) -> impl FnMut(FormatProgress) {
    let mut last: Option<u64> = None;
    move |p: FormatProgress| {
        let pct = (p.done_blocks.min(p.total_blocks) * 100)
            .checked_div(p.total_blocks)
            .unwrap_or(100);
        if last != Some(pct) {
            last = Some(pct);
            eprintln!(
                "csnapctl: format {store}: {pct}% ({} of {} metadata blocks written)",
                p.done_blocks, p.total_blocks
            );
        }
    }
}

fn run_format(args: &FormatArgs) -> Result<(), StoreError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let req = FormatRequest {
        origin: &args.origin,
        store: &args.store,
        chunk_size: args.chunk_size,
        force: args.force,
        now,
    };
    let sb = if show_progress(args.progress) {
        let mut report = format_progress(args.store.display().to_string());
        format_paths_with_progress(&req, &mut report)?
    } else {
        format_paths_with_progress(&req, &mut |_| {})?
    };
    if args.json {
        let mut v = format_summary(args, &sb);
        v["created_iso"] = iso_utc(sb.created).into();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        );
    } else {
        print_format_summary(args, &sb);
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Format(args) => match run_format(args) {
            Ok(()) => ExitCode::from(EXIT_OK),
            Err(e) => {
                eprintln!("csnapctl: error: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::Snapshot(cmd) => {
            csnap_agent::ctl::run_cli(csnap_agent::ctl::run_snapshot(&cli.socket, cmd.clone()))
        }
        Command::Status(args) => {
            csnap_agent::ctl::run_cli(csnap_agent::ctl::run_status(&cli.socket, args.clone()))
        }
        Command::Diff(args) => {
            csnap_agent::ctl::run_cli(csnap_agent::ctl_diff::run_diff(&cli.socket, args.clone()))
        }
        Command::ExportDiff(args) => csnap_agent::ctl::run_cli(
            csnap_agent::ctl_xdiff::run_export_diff(&cli.socket, args.clone()),
        ),
        Command::ImportDiff(args) => csnap_agent::ctl::run_cli(
            csnap_agent::ctl_xdiff::run_import_diff(&cli.socket, args.clone()),
        ),
        Command::Rollback(args) => csnap_agent::ctl::run_cli(
            csnap_agent::ctl_rollback::run_rollback(&cli.socket, args.clone()),
        ),
        Command::Keygen(args) => run_keygen(args),
        Command::Check(args) => run_check(args),
    }
}
