//! csnapctl's `snapshot` and `status` subcommands: requests to the agent's control
//! socket, and what every subcommand shares: exit codes, error classes, time formats,
//! JSON output.

use std::io::IsTerminal as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use csnap_proto::control::{
    error_origin, ClusterStatus, ControlRequest, ControlResponse, VolumeStatus,
};
use csnap_proto::{ReclaimStatus, SnapId, SnapshotInfo, SnapshotState, MAX_LIST_PAGE};

use crate::control::ControlError;

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: the command failed (the agent answered with an error, a device could
/// not be formatted, `check` found problems).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: bad usage (clap's own), or `check` did not check the store.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the agent could not be reached (no control socket, refused, no answer).
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit status: `snapshot delete --wait` timed out before the reclaim finished (the
/// snapshot is deleted; its space is still being given back).
pub const EXIT_TIMEOUT: u8 = 4;

/// An error the agent answered with, naming the node that answered and the volume.
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", prefix(origin))]
pub struct AgentError {
    /// Who answered: the node and the volume (empty when the agent did not say).
    pub origin: String,
    /// What went wrong.
    pub message: String,
}

fn prefix(origin: &str) -> String {
    if origin.is_empty() {
        String::new()
    } else {
        format!("{origin}: ")
    }
}

/// `--wait` ran out of time.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WaitTimeout(pub String);

/// The exit status for an error of an agent subcommand.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<WaitTimeout>().is_some() {
        return EXIT_TIMEOUT;
    }
    match e.downcast_ref::<ControlError>() {
        Some(
            ControlError::NotRunning { .. }
            | ControlError::Refused { .. }
            | ControlError::Io { .. }
            | ControlError::NoAnswer { .. }
            | ControlError::Timeout { .. },
        ) => EXIT_UNREACHABLE,
        _ => EXIT_FAILURE,
    }
}

const CREATE_HELP: &str = "\
Creates a snapshot of the volume's origin as it is at this moment. The agent forwards the
request to the volume's server, which waits until every node writing the origin has
acknowledged, so the snapshot is crash-consistent across the cluster. The snapshot is then
exported read-write over NBD as VOLUME@NAME.";

const CREATE_EXAMPLES: &str = "\
EXAMPLES
  csnapctl snapshot create vol0 nightly
  csnapctl snapshot create vol0 before-upgrade --json
  qemu-img info nbd+unix:///vol0@nightly?socket=/run/csnap/nbd.sock";

const LIST_HELP: &str = "\
Lists the volume's snapshots: id, name, creation time (local time with its UTC offset,
honouring TZ), the store chunks each holds alone, and state (live, deleting, or invalid
with the reason, e.g. invalidated by the store-full policy).";

const LIST_EXAMPLES: &str = "\
EXAMPLES
  csnapctl snapshot list vol0
  TZ=UTC csnapctl snapshot list vol0
  csnapctl snapshot list vol0 --json | jq -r '.snapshots[].name'";

const DELETE_HELP: &str = "\
Deletes a snapshot: its export goes away at once; the store space it held alone is given
back by a background reclaim pass over the exception tree, whose progress `csnapctl
status` shows. With --wait, waits (at most --timeout seconds) until that pass finished,
printing its progress on stderr.";

const DELETE_EXAMPLES: &str = "\
EXAMPLES
  csnapctl snapshot delete vol0 nightly
  csnapctl snapshot delete vol0 nightly --wait --timeout 600";

/// `csnapctl snapshot ...`
#[derive(clap::Subcommand, Clone, Debug)]
pub enum SnapshotCmd {
    /// Create a snapshot of the volume's origin as it is now.
    #[command(long_about = CREATE_HELP, after_long_help = CREATE_EXAMPLES)]
    Create {
        /// The volume (its name in corosync.conf or --volume).
        volume: String,
        /// The new snapshot's name (letters, digits, '.', '_', '-'; unique in the volume).
        name: String,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the volume's snapshots.
    #[command(long_about = LIST_HELP, after_long_help = LIST_EXAMPLES)]
    List {
        /// The volume.
        volume: String,
        /// Print the list as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (its space is reclaimed in the background).
    #[command(long_about = DELETE_HELP, after_long_help = DELETE_EXAMPLES)]
    Delete {
        /// The volume.
        volume: String,
        /// The snapshot's name.
        name: String,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Wait until the background reclaim gave the snapshot's space back, printing
        /// progress on stderr.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (exit status 4).
        #[arg(long, default_value_t = 600, value_name = "SECONDS")]
        timeout: u64,
    },
}

const STATUS_HELP: &str = "\
Shows each volume the local agent runs: mode, devices, listeners, the server's state
(active, or waiting for snapshot clients), store and metadata space with warnings,
snapshots, clients, background reclaim progress, and in cluster mode the volume's group:
server node, this node's role and generation, ring, quorum, members, the gate the agent
waits on, stale and departed nodes, fencing in progress, and the last server activation
(failover) with its local time and the time each phase took.";

const STATUS_EXAMPLES: &str = "\
EXAMPLES
  csnapctl status
  csnapctl status vol0
  csnapctl status vol0 --json | jq '.volumes[0].cluster.server_node'";

/// `csnapctl status [VOLUME]`
#[derive(clap::Args, Clone, Debug)]
#[command(long_about = STATUS_HELP, after_long_help = STATUS_EXAMPLES)]
pub struct StatusArgs {
    /// Only this volume (default: every volume of the agent).
    pub volume: Option<String>,
    /// Print the status as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn state(s: &SnapshotState) -> String {
    match s {
        SnapshotState::Live => "live".into(),
        SnapshotState::Invalid { reason } => format!("invalid ({reason})"),
        SnapshotState::Deleting => "deleting".into(),
    }
}

fn print_snapshots(list: &[SnapshotInfo]) {
    println!(
        "{:>6}  {:<24}  {:<26}  {:>10}  STATE",
        "ID", "NAME", "CREATED", "CHUNKS"
    );
    for s in list {
        println!(
            "{:>6}  {:<24}  {:<26}  {:>10}  {}",
            s.id,
            s.name,
            local_time(s.ctime),
            s.chunks_held,
            state(&s.state)
        );
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` (UTC), without a date-time dependency.
pub fn utc_time(unix: u64) -> String {
    civil_time(i64::try_from(unix).unwrap_or(i64::MAX))
}

/// Unix seconds as ISO 8601 UTC: `2026-11-26T18:02:11Z`.
pub fn iso_utc(unix: u64) -> String {
    format!("{}Z", utc_time(unix).replacen(' ', "T", 1))
}

/// Unix milliseconds as ISO 8601 UTC with milliseconds: `2026-11-26T18:02:11.042Z`.
pub fn iso_utc_ms(unix_ms: u64) -> String {
    format!(
        "{}.{:03}Z",
        utc_time(unix_ms / 1000).replacen(' ', "T", 1),
        unix_ms % 1000
    )
}

extern "C" {
    /// POSIX `tzset(3)` (the libc crate does not declare it): re-reads TZ.
    fn tzset();
}

/// The local time zone's offset from UTC at `unix` (seconds east), from `TZ` or
/// /etc/localtime through the C library; `None` if it cannot say.
pub fn local_offset(unix: u64) -> Option<i64> {
    let t = libc::time_t::try_from(unix).ok()?;
    // SAFETY: `tzset` only (re)reads TZ into the C library's state; `localtime_r` writes
    // only to `tm`, which lives on this stack frame, and reads `t`.
    let tm = unsafe {
        tzset();
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return None;
        }
        tm
    };
    Some(tm.tm_gmtoff)
}

/// Unix seconds in local time with the offset: `2026-11-26 19:02:11 +01:00`.
pub fn local_time(unix: u64) -> String {
    with_offset(unix, local_offset(unix).unwrap_or(0))
}

/// Unix seconds at `offset` seconds east of UTC, with the offset: `... +01:00`.
pub fn with_offset(unix: u64, offset: i64) -> String {
    let local = i64::try_from(unix)
        .unwrap_or(i64::MAX)
        .saturating_add(offset);
    let sign = if offset < 0 { '-' } else { '+' };
    let off = offset.unsigned_abs();
    format!(
        "{} {sign}{:02}:{:02}",
        civil_time(local),
        off / 3_600,
        off / 60 % 60
    )
}

/// Seconds since 1970 (may be negative) as `YYYY-MM-DD HH:MM:SS`.
fn civil_time(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3_600,
        secs / 60 % 60,
        secs % 60
    )
}

fn print_status(v: &VolumeStatus) {
    let s = &v.server_status;
    println!("volume {} ({})", v.volume, v.mode);
    println!("  origin {}  store {}", v.origin, v.store);
    println!("  nbd {}  server {}", v.nbd_listen, v.server);
    println!(
        "  server {}  chunk size {}  origin chunks {}  store chunks {} ({} free)",
        if s.active {
            "active"
        } else {
            "waiting for snapshot clients"
        },
        s.chunk_size,
        s.origin_chunks,
        s.store_chunks,
        s.free_chunks
    );
    println!(
        "  snapshots {} (+{} being created)  clients {}  reclaiming {}  store-full policy {}",
        s.snapshots, s.pending_snapshots, s.connected_clients, s.reclaiming, s.store_full_policy
    );
    if let Some(r) = &s.reclaim {
        println!("  {}", reclaim_line(r));
    }
    if let Some(r) = &s.rollback {
        println!("  {}", rollback_line(r));
    }
    if s.metadata_blocks > 0 {
        let used = s.metadata_blocks.saturating_sub(s.free_metadata_blocks);
        println!(
            "  metadata area {} of {} node blocks used ({}%)",
            used,
            s.metadata_blocks,
            used * 100 / s.metadata_blocks
        );
    }
    for w in &s.space_warnings {
        println!(
            "  WARNING: store {} {}% used (warning level {}%); when full, the store-full policy ({}) applies",
            w.area, w.used_percent, w.level_percent, s.store_full_policy
        );
    }
    println!(
        "  origin sessions {}  unique cache {} chunks, {} hits, {} misses",
        v.origin_sessions, v.cached_chunks, v.cache_hits, v.cache_misses
    );
    if let Some(c) = &v.cluster {
        print_cluster(c);
    }
}

fn node_list(nodes: &[u32]) -> String {
    if nodes.is_empty() {
        "none".into()
    } else {
        nodes
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The membership part of a cluster-mode volume, as `dlm_tool status` shows a lockspace.
fn print_cluster(c: &ClusterStatus) {
    match (c.server_node, &c.server_address) {
        (Some(n), Some(a)) => println!("  cluster: server node {n} at {a}"),
        (Some(n), None) => println!("  cluster: server node {n}"),
        _ => println!("  cluster: no server"),
    }
    let generation = if c.generation == 0 && c.view_generation != 0 {
        format!("none held (view's {})", c.view_generation)
    } else {
        c.generation.to_string()
    };
    println!(
        "  this node {} ({})  role {}  generation {}  gate {}",
        c.node, c.member, c.role, generation, c.gate
    );
    println!(
        "  ring {}  {}  members {}",
        c.ring.as_deref().unwrap_or("none"),
        if c.quorate { "quorate" } else { "NOT quorate" },
        if c.members.is_empty() {
            "none".into()
        } else {
            c.members.join(" ")
        }
    );
    let fencing = if c.fencing.is_empty() {
        "none".into()
    } else {
        c.fencing
            .iter()
            .map(|j| format!("{} ({})", j.node, j.method))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "  stale {}  departed servers {}  fencing {}",
        node_list(&c.stale),
        node_list(&c.departed_servers),
        fencing
    );
    println!("  serving lease left {} ms", c.lease_left_ms);
    if c.clients.is_empty() {
        println!("  snapshot clients: none in the view");
    } else {
        println!("  snapshot clients:");
        for n in &c.clients {
            println!("    node {}: {}", n.node, n.clients.join(" "));
        }
    }
    if let Some(a) = &c.activation {
        let list: Vec<String> = a
            .clients
            .iter()
            .map(|g| {
                let gone = if g.declared_gone { " gone" } else { "" };
                format!("{}@{}{gone}", g.client, g.node)
            })
            .collect();
        let list = if list.is_empty() {
            "no clients".to_owned()
        } else {
            list.join(" ")
        };
        if a.gathering {
            let waiting = if a.waiting_for.is_empty() {
                "none".to_owned()
            } else {
                a.waiting_for.join(" ")
            };
            println!(
                "  activation gate generation {}: gathering, answers missing from {waiting}; so far {list}",
                a.generation
            );
        } else {
            println!("  activation gate generation {}: {list}", a.generation);
        }
    }
    match &c.failover {
        None => println!("  last activation: none on this node"),
        Some(f) => {
            let from = match f.departed_server {
                Some(n) => format!("failover from node {n}"),
                None => "start".to_owned(),
            };
            let total = f
                .confchg_to_first_write_ms()
                .map(|ms| format!(", confchg to first origin write {ms} ms"))
                .unwrap_or_default();
            let at = f
                .activated_at_ms
                .or(f.chosen_at_ms)
                .map(|ms| format!(" at {}", local_time(ms / 1000)))
                .unwrap_or_default();
            println!(
                "  last activation{at}: generation {} ({from}), {} ms from chosen to activated, \
                 {} snapshot clients gathered{total}",
                f.generation,
                f.chosen_to_activated_ms,
                f.gathered_clients.len()
            );
            let phases: Vec<String> = f
                .phases()
                .iter()
                .map(|(name, ms)| format!("{name} +{ms} ms"))
                .collect();
            if !phases.is_empty() {
                println!("    {}", phases.join(", "));
            }
        }
    }
    if let Some(local) = &c.local_server {
        println!("  local server {local}");
    }
}

/// `reclaiming snapshot 7: 42% (origin chunk 4200 of 10000)`.
pub fn reclaim_line(r: &ReclaimStatus) -> String {
    let which = match r.snapshots.as_slice() {
        [] => "reclaiming".to_owned(),
        [one] => format!("reclaiming snapshot {one}"),
        many => format!(
            "reclaiming snapshots {}",
            many.iter()
                .map(SnapId::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    };
    format!(
        "{which}: {}% (origin chunk {} of {})",
        r.percent(),
        r.position.min(r.origin_chunks),
        r.origin_chunks
    )
}

/// Adds ISO 8601 UTC forms next to the raw times in csnapctl's JSON: `ctime` (unix
/// seconds) gets `ctime_iso`, every `*_at_ms` (unix milliseconds) gets `*_at_iso`.
pub fn add_iso_times(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let mut extra = Vec::new();
            for (k, val) in map.iter_mut() {
                add_iso_times(val);
                let Some(n) = val.as_u64() else { continue };
                if k == "ctime" {
                    extra.push(("ctime_iso".to_owned(), iso_utc(n)));
                } else if let Some(stem) = k.strip_suffix("_at_ms") {
                    extra.push((format!("{stem}_at_iso"), iso_utc_ms(n)));
                }
            }
            for (k, iso) in extra {
                map.insert(k, serde_json::Value::String(iso));
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(add_iso_times),
        _ => {}
    }
}

/// Prints `v` as pretty JSON with ISO times added (see [`add_iso_times`]).
pub fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    let mut value = serde_json::to_value(v)?;
    add_iso_times(&mut value);
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

pub(crate) async fn ask(socket: &Path, req: ControlRequest) -> anyhow::Result<ControlResponse> {
    let asked_volume = req.volume().map(str::to_owned);
    let answer = crate::control::request(socket, &req).await?;
    agent_answer(asked_volume.as_deref(), answer)
}

/// The agent's answer to a request about `asked_volume`, its `Error` made an error that
/// names where it came from.
pub(crate) fn agent_answer(
    asked_volume: Option<&str>,
    answer: ControlResponse,
) -> anyhow::Result<ControlResponse> {
    match answer {
        ControlResponse::Error {
            message,
            node,
            host,
            volume,
        } => Err(AgentError {
            origin: error_origin(node, host.as_deref(), volume.as_deref().or(asked_volume)),
            message,
        }
        .into()),
        other => Ok(other),
    }
}

pub(crate) fn unexpected(r: ControlResponse) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the agent: {r:?}")
}

/// Every snapshot of `volume`, page by page (one control connection per page, each reply
/// under the frame limit), and whether the usage figures are exact.
pub async fn list_all(socket: &Path, volume: &str) -> anyhow::Result<(Vec<SnapshotInfo>, bool)> {
    let mut all: Vec<SnapshotInfo> = Vec::new();
    let mut exact = true;
    loop {
        let req = ControlRequest::SnapshotList {
            volume: volume.to_owned(),
            after: all.last().map(|s| s.id),
            limit: MAX_LIST_PAGE,
        };
        match ask(socket, req).await? {
            ControlResponse::SnapshotList {
                snapshots,
                more,
                usage_exact,
                ..
            } => {
                let after = all.last().map(|s| s.id);
                if more && snapshots.is_empty()
                    || snapshots
                        .first()
                        .is_some_and(|s| after.is_some_and(|a| s.id <= a))
                {
                    bail!("the agent sent a snapshot page out of order or empty with more to come");
                }
                exact &= usage_exact;
                all.extend(snapshots);
                if !more {
                    return Ok((all, exact));
                }
            }
            other => return Err(unexpected(other)),
        }
    }
}

/// Runs `csnapctl snapshot ...`.
pub async fn run_snapshot(socket: &Path, cmd: SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Create {
            volume,
            name,
            json: as_json,
        } => match ask(socket, ControlRequest::SnapshotCreate { volume, name }).await? {
            ControlResponse::SnapshotCreated { volume, info } => {
                if as_json {
                    json(&serde_json::json!({"volume": volume, "snapshot": info}))
                } else {
                    println!(
                        "created snapshot {} (id {}) of volume {volume}",
                        info.name, info.id
                    );
                    Ok(())
                }
            }
            other => Err(unexpected(other)),
        },
        SnapshotCmd::List {
            volume,
            json: as_json,
        } => {
            let (snapshots, usage_exact) = list_all(socket, &volume).await?;
            if as_json {
                json(&serde_json::json!({
                    "volume": volume,
                    "snapshots": snapshots,
                    "usage_exact": usage_exact,
                }))
            } else {
                print_snapshots(&snapshots);
                if !usage_exact {
                    println!("(CHUNKS still being counted since the server started: partial)");
                }
                Ok(())
            }
        }
        SnapshotCmd::Delete {
            volume,
            name,
            json: as_json,
            wait,
            timeout,
        } => match ask(socket, ControlRequest::SnapshotDelete { volume, name }).await? {
            ControlResponse::SnapshotDeleted { volume, name, id } => {
                if !as_json {
                    println!("deleted snapshot {name} (id {id}) of volume {volume}");
                }
                let waited = if wait {
                    let started = Instant::now();
                    wait_reclaimed(socket, &volume, id, Duration::from_secs(timeout)).await?;
                    let ms = started.elapsed().as_millis() as u64;
                    if !as_json {
                        println!("reclaimed the space of snapshot {name} (id {id}) in {ms} ms");
                    }
                    Some(ms)
                } else {
                    None
                };
                if as_json {
                    json(&serde_json::json!({
                        "volume": volume,
                        "deleted": name,
                        "id": id,
                        "reclaimed": waited.is_some(),
                        "wait_ms": waited,
                    }))
                } else {
                    Ok(())
                }
            }
            other => Err(unexpected(other)),
        },
    }
}

/// How often `--wait` asks the agent for the reclaim's progress.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// The volume's server status (one status request).
pub(crate) async fn server_status(
    socket: &Path,
    volume: &str,
) -> anyhow::Result<csnap_proto::ServerStatus> {
    match ask(
        socket,
        ControlRequest::Status {
            volume: Some(volume.to_owned()),
        },
    )
    .await?
    {
        ControlResponse::Status { volumes } => volumes
            .into_iter()
            .find(|v| v.volume == volume)
            .map(|v| v.server_status)
            .ok_or_else(|| anyhow::anyhow!("the agent's status did not include volume {volume}")),
        other => Err(unexpected(other)),
    }
}

/// Waits until background reclaim no longer works for snapshot `id` (or at all, with a
/// server that does not say which snapshots it reclaims), printing each new percentage
/// on stderr; fails with [`WaitTimeout`] after `limit`.
pub async fn wait_reclaimed(
    socket: &Path,
    volume: &str,
    id: SnapId,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut last: Option<String> = None;
    loop {
        let s = server_status(socket, volume).await?;
        let busy = match &s.reclaim {
            Some(r) => r.snapshots.is_empty() || r.snapshots.contains(&id),
            None => s.reclaiming,
        };
        if !busy {
            return Ok(());
        }
        if let Some(r) = &s.reclaim {
            let line = reclaim_line(r);
            if last.as_deref() != Some(&line) {
                eprintln!("csnapctl: {line}");
                last = Some(line);
            }
        }
        if Instant::now() >= deadline {
            return Err(WaitTimeout(format!(
                "volume {volume}: snapshot {id} is deleted but its space was not reclaimed \
                 within {} s ({}); see csnapctl status",
                limit.as_secs(),
                last.as_deref().unwrap_or("reclaim still running")
            ))
            .into());
        }
        tokio::time::sleep(WAIT_POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// Whether progress lines go to stderr: asked for, or stderr is a terminal.
pub fn show_progress(asked: bool) -> bool {
    asked || std::io::stderr().is_terminal()
}

/// Runs `csnapctl status`.
pub async fn run_status(socket: &Path, args: StatusArgs) -> anyhow::Result<()> {
    match ask(
        socket,
        ControlRequest::Status {
            volume: args.volume,
        },
    )
    .await?
    {
        ControlResponse::Status { volumes } => {
            if args.json {
                json(&serde_json::json!({ "volumes": volumes }))
            } else {
                for v in &volumes {
                    print_status(v);
                }
                Ok(())
            }
        }
        other => Err(unexpected(other)),
    }
}

/// Runs one agent subcommand to completion for csnapctl's `main`: prints the error (with
/// its causes) and maps the outcome to the exit code.
pub fn run_cli<F: std::future::Future<Output = anyhow::Result<()>>>(
    command: F,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("csnapctl: error: cannot start the runtime: {e}");
            return std::process::ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(command) {
        Ok(()) => std::process::ExitCode::from(EXIT_OK),
        Err(e) => {
            eprintln!("csnapctl: error: {e:#}");
            std::process::ExitCode::from(exit_code(&e))
        }
    }
}

/// One line of rollback progress (`csnapctl status` and `rollback --wait`).
pub fn rollback_line(r: &csnap_proto::RollbackStatus) -> String {
    format!(
        "rollback to snapshot {}{} (origin as it was: snapshot {}{}): {} of {} chunks rolled back ({}%), {} copied back by this server",
        r.source,
        quoted_name(&r.source_name),
        r.pin,
        quoted_name(&r.pin_name),
        r.position.min(r.origin_chunks),
        r.origin_chunks,
        r.percent(),
        r.chunks_copied
    )
}

/// ` ("NAME")` after a snapshot id; nothing when the server did not say the name.
fn quoted_name(name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else {
        format!(" ({name:?})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_and_offset_forms() {
        assert_eq!(iso_utc(1_795_310_228), "2026-11-22T01:17:08Z");
        assert_eq!(iso_utc_ms(1_795_310_228_042), "2026-11-22T01:17:08.042Z");
        assert_eq!(
            with_offset(1_795_310_228, 3_600),
            "2026-11-22 02:17:08 +01:00"
        );
        assert_eq!(
            with_offset(1_795_310_228, -(5 * 3_600 + 30 * 60)),
            "2026-11-21 19:47:08 -05:30"
        );
        assert_eq!(with_offset(0, -3_600), "1969-12-31 23:00:00 -01:00");
    }

    /// The local form honours TZ (POSIX zone strings need no tz database). The only test
    /// in this binary that touches TZ, so no other test sees it change.
    #[test]
    fn local_time_honours_tz() {
        let t = 1_795_310_228;
        std::env::set_var("TZ", "XST-1");
        assert_eq!(local_time(t), "2026-11-22 02:17:08 +01:00");
        std::env::set_var("TZ", "YST+5:30");
        assert_eq!(local_time(t), "2026-11-21 19:47:08 -05:30");
        // Summer time: 2026-07-01 is in daylight saving under the EU rule.
        std::env::set_var("TZ", "CET-1CEST,M3.5.0,M10.5.0/3");
        assert_eq!(local_time(1_782_900_000), "2026-07-01 12:00:00 +02:00");
        assert_eq!(local_time(t), "2026-11-22 02:17:08 +01:00");
        std::env::set_var("TZ", "UTC0");
        assert_eq!(local_time(t), "2026-11-22 01:17:08 +00:00");
    }

    #[test]
    fn json_gets_iso_times_next_to_the_raw_ones() {
        let mut v = serde_json::json!({
            "snapshots": [{"ctime": 0, "name": "a"}],
            "failover": {"chosen_at_ms": 1_500, "confchg_at_ms": null},
        });
        add_iso_times(&mut v);
        assert_eq!(v["snapshots"][0]["ctime_iso"], "1970-01-01T00:00:00Z");
        assert_eq!(v["failover"]["chosen_at_iso"], "1970-01-01T00:00:01.500Z");
        assert!(v["failover"].get("confchg_at_iso").is_none());
    }

    #[test]
    fn reclaim_lines() {
        let r = ReclaimStatus {
            snapshots: vec![SnapId(7)],
            position: 4_200,
            origin_chunks: 10_000,
        };
        assert_eq!(
            reclaim_line(&r),
            "reclaiming snapshot 7: 42% (origin chunk 4200 of 10000)"
        );
    }

    #[test]
    fn exit_codes_by_error_class() {
        let unreachable = anyhow::Error::from(ControlError::NotRunning {
            path: "/nowhere".into(),
        });
        assert_eq!(exit_code(&unreachable), EXIT_UNREACHABLE);
        let answered = anyhow::Error::from(AgentError {
            origin: "node 2, volume v".into(),
            message: "no".into(),
        });
        assert_eq!(answered.to_string(), "node 2, volume v: no");
        assert_eq!(exit_code(&answered), EXIT_FAILURE);
        assert_eq!(exit_code(&WaitTimeout("t".into()).into()), EXIT_TIMEOUT);
    }

    #[test]
    fn utc_time_formats_known_instants() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_time(1_795_310_228), "2026-11-22 01:17:08");
        assert_eq!(utc_time(4_107_542_399), "2100-02-28 23:59:59");
    }
}
