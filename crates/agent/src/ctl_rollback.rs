//! `csnapctl rollback VOLUME SNAPSHOT`: the origin becomes the snapshot's contents, online
//! (docs/architecture.md "Online rollback"). The command returns once the start is durable:
//! from then on every reader of the origin sees the snapshot's contents while the server
//! copies them back in the background; `--wait` follows that copy-back to its end.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use csnap_proto::control::{ControlRequest, ControlResponse};
use csnap_proto::SnapId;

use crate::ctl::{
    ask, iso_utc, json, rollback_line, server_status, show_progress, unexpected, WaitTimeout,
};

const ROLLBACK_HELP: &str = "\
Rolls the volume's origin back to a snapshot, online: from the moment the command returns,
every node reading the origin (NBD users included) sees the snapshot's contents, each chunk
either wholly as before or wholly as the snapshot, never a mix; the server copies the
snapshot's chunks back onto the origin in the background (progress in `csnapctl status`
and the journal), and a crash or failover resumes that copy. Writes go on meanwhile.
Every other snapshot keeps its contents. The origin as it was is kept as a new snapshot
(named with --pin, by default before-rollback-<UTC time>): roll back to it to undo. Only
one rollback runs at a time; while it runs, snapshots cannot be created, and its snapshot
and the new one cannot be deleted.";

const ROLLBACK_EXAMPLES: &str = "\
EXAMPLES
  csnapctl rollback vol0 before-upgrade
  csnapctl rollback vol0 before-upgrade --pin broken-upgrade --wait --timeout 3600
  csnapctl rollback vol0 broken-upgrade              undo: back to the origin as it was";

/// `csnapctl rollback VOLUME SNAPSHOT`
#[derive(clap::Args, Clone, Debug)]
#[command(long_about = ROLLBACK_HELP, after_long_help = ROLLBACK_EXAMPLES)]
pub struct RollbackArgs {
    /// The volume.
    pub volume: String,
    /// The snapshot (by name) whose contents the origin gets.
    pub snapshot: String,
    /// The name of the new snapshot that keeps the origin as it was (default:
    /// before-rollback-<UTC time>).
    #[arg(long, value_name = "NAME")]
    pub pin: Option<String>,
    /// Wait until the copy-back is done, printing progress on stderr.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this many seconds (exit status 4; the rollback
    /// goes on).
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    pub timeout: u64,
    /// Print progress on stderr even when it is not a terminal.
    #[arg(long)]
    pub progress: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The pin's name when none is given: when the rollback started, in a form snapshot
/// names and NBD export names take as they are.
fn default_pin_name(unix: u64) -> String {
    format!("before-rollback-{}", iso_utc(unix).replace(':', ""))
}

/// How often `--wait` asks for the copy-back's progress.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// `csnapctl rollback`: starts an online rollback and, with `--wait`, follows it to the end.
pub async fn run_rollback(socket: &Path, args: RollbackArgs) -> anyhow::Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let pin_name = args.pin.clone().unwrap_or_else(|| default_pin_name(now));
    let req = ControlRequest::Rollback {
        volume: args.volume.clone(),
        snapshot: args.snapshot.clone(),
        pin_name,
    };
    let (volume, source, pin) = match ask(socket, req).await? {
        ControlResponse::RollbackStarted {
            volume,
            source,
            pin,
        } => (volume, source, pin),
        other => return Err(unexpected(other)),
    };
    if !args.json {
        println!(
            "volume {volume} reads as snapshot {} (id {}) from now on; the copy-back runs in the background",
            source.name, source.id
        );
        println!(
            "the origin as it was is snapshot {} (id {}): csnapctl rollback {volume} {} undoes this",
            pin.name, pin.id, pin.name
        );
    }
    let waited = if args.wait {
        let started = Instant::now();
        let limit = Duration::from_secs(args.timeout);
        wait_rolled_back(socket, &volume, pin.id, limit, show_progress(args.progress)).await?;
        let ms = started.elapsed().as_millis() as u64;
        if !args.json {
            println!(
                "volume {volume}: rollback to snapshot {} done in {ms} ms",
                source.name
            );
        }
        Some(ms)
    } else {
        None
    };
    if args.json {
        json(&serde_json::json!({
            "volume": volume,
            "source": source,
            "pin": pin,
            "done": waited.is_some(),
            "wait_ms": waited,
        }))
    } else {
        Ok(())
    }
}

/// Waits until the rollback whose pin is `pin` is no longer running, printing each new
/// progress line on stderr when `progress`; fails with [`WaitTimeout`] after `limit`.
pub async fn wait_rolled_back(
    socket: &Path,
    volume: &str,
    pin: SnapId,
    limit: Duration,
    progress: bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut last: Option<String> = None;
    loop {
        let status = server_status(socket, volume).await?;
        let running = status.rollback.filter(|r| r.pin == pin);
        let Some(r) = running else {
            return Ok(());
        };
        let line = rollback_line(&r);
        if progress && last.as_deref() != Some(&line) {
            eprintln!("csnapctl: {line}");
        }
        last = Some(line);
        if Instant::now() >= deadline {
            return Err(WaitTimeout(format!(
                "volume {volume}: the rollback is under way but its copy-back did not finish \
                 within {} s ({}); it goes on, see csnapctl status",
                limit.as_secs(),
                last.as_deref().unwrap_or("still running")
            ))
            .into());
        }
        tokio::time::sleep(WAIT_POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csnap_proto::RollbackStatus;

    #[test]
    fn the_default_pin_name_is_a_valid_snapshot_name_without_colons() {
        let name = default_pin_name(1_795_000_000);
        assert_eq!(name, "before-rollback-2026-11-18T110640Z");
        assert!(csnap_proto::validate_snapshot_name(&name).is_ok());
    }

    #[test]
    fn progress_lines_say_how_far_the_copy_back_got() {
        let r = RollbackStatus {
            source: SnapId(3),
            pin: SnapId(7),
            position: 250,
            origin_chunks: 1000,
            chunks_copied: 40,
        };
        assert_eq!(
            rollback_line(&r),
            "rollback to snapshot 3 (origin as it was: snapshot 7): 250 of 1000 chunks rolled back (25%), 40 copied back by this server"
        );
    }
}
