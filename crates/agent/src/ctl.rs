//! csnapctl's `snapshot` and `status` subcommands: requests to the agent's control socket.

use std::path::Path;

use anyhow::bail;
use csnap_proto::control::{ClusterStatus, ControlRequest, ControlResponse, VolumeStatus};
use csnap_proto::{SnapshotInfo, SnapshotState, MAX_LIST_PAGE};

/// `csnapctl snapshot ...`
#[derive(clap::Subcommand, Clone, Debug)]
pub enum SnapshotCmd {
    /// Create a snapshot of the volume's origin as it is now.
    Create {
        volume: String,
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List the volume's snapshots.
    List {
        volume: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (its space is reclaimed in the background).
    Delete {
        volume: String,
        name: String,
        #[arg(long)]
        json: bool,
    },
}

/// `csnapctl status [VOLUME]`
#[derive(clap::Args, Clone, Debug)]
pub struct StatusArgs {
    pub volume: Option<String>,
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
        "{:>6}  {:<24}  {:<20}  {:>10}  STATE",
        "ID", "NAME", "CREATED (UTC)", "CHUNKS"
    );
    for s in list {
        println!(
            "{:>6}  {:<24}  {:<20}  {:>10}  {}",
            s.id,
            s.name,
            utc_time(s.ctime),
            s.chunks_held,
            state(&s.state)
        );
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` (UTC), without a date-time dependency.
pub fn utc_time(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
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
    println!(
        "  this node {} ({})  role {}  generation {}  gate {}",
        c.node, c.member, c.role, c.generation, c.gate
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
            println!(
                "  last activation: generation {} ({from}), {} ms from chosen to activated, {} \
                 snapshot clients gathered{total}",
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

fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn ask(socket: &Path, req: ControlRequest) -> anyhow::Result<ControlResponse> {
    match crate::control::request(socket, &req).await? {
        ControlResponse::Error { message } => bail!("{message}"),
        other => Ok(other),
    }
}

fn unexpected(r: ControlResponse) -> anyhow::Error {
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
        } => match ask(socket, ControlRequest::SnapshotDelete { volume, name }).await? {
            ControlResponse::SnapshotDeleted { volume, name, id } => {
                if as_json {
                    json(&serde_json::json!({"volume": volume, "deleted": name, "id": id}))
                } else {
                    println!("deleted snapshot {name} (id {id}) of volume {volume}");
                    Ok(())
                }
            }
            other => Err(unexpected(other)),
        },
    }
}

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
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("csnapctl: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::utc_time;

    #[test]
    fn utc_time_formats_known_instants() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_time(1_795_310_228), "2026-11-22 01:17:08");
        assert_eq!(utc_time(4_107_542_399), "2100-02-28 23:59:59");
    }
}
