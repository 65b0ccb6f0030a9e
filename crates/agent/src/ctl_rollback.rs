//! `csnapctl rollback VOLUME SNAPSHOT`: the origin becomes the snapshot's contents, online
//! (docs/architecture.md "Online rollback"). The command returns once the start is durable:
//! from then on every reader of the origin sees the snapshot's contents while the server
//! copies them back in the background; `--wait` follows that copy-back to its end.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use csnap_proto::control::{ControlRequest, ControlResponse};
use csnap_proto::{RollbackStatus, SnapId};

use crate::control::ControlError;
use crate::ctl::{
    ask, iso_utc, json, rollback_line, server_status, show_progress, unexpected, AgentError,
    WaitTimeout,
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

/// What one look at the rollback found.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// The server answered and runs no rollback with this pin: it is over.
    Done,
    /// The server answered: the rollback is under way.
    Running(RollbackStatus),
    /// The agent answered, but no server did (a failover or a restart under way): the
    /// agent's status then carries no server figures at all.
    NoServer,
    /// The agent did not answer, or answered with an error (it is restarting, or its
    /// volume is not up yet).
    NoAgent(String),
}

/// Whether `status` (the agent's copy of the server's) is a server's answer: a server
/// always says its chunk size; an agent that could not ask one reports the empty default.
fn seen_in(status: csnap_proto::ServerStatus, pin: SnapId) -> Seen {
    if status.chunk_size == 0 {
        return Seen::NoServer;
    }
    match status.rollback.filter(|r| r.pin == pin) {
        Some(r) => Seen::Running(*r),
        None => Seen::Done,
    }
}

/// Errors a later look may not see: the agent restarting or not answering, or answering
/// that it cannot reach its volume yet. A bad frame (another csnapctl version) or an
/// unexpected answer is not waited out.
fn transient(e: &anyhow::Error) -> bool {
    if let Some(c) = e.downcast_ref::<ControlError>() {
        return match c {
            ControlError::Frame { .. } | ControlError::Bind { .. } => false,
            // An answer that does not decode comes back as invalid data.
            ControlError::Io { source, .. } => source.kind() != std::io::ErrorKind::InvalidData,
            _ => true,
        };
    }
    e.downcast_ref::<AgentError>().is_some()
}

/// The longest one status request may take while waiting: a hung agent must not hold
/// `--wait` past its timeout.
const LOOK_LIMIT: Duration = Duration::from_secs(15);

/// One look at the rollback through the agent at `socket`, given at most `limit`.
async fn look(socket: &Path, volume: &str, pin: SnapId, limit: Duration) -> anyhow::Result<Seen> {
    match tokio::time::timeout(limit, server_status(socket, volume)).await {
        Err(_) => Ok(Seen::NoAgent(format!(
            "the agent at {} did not answer within {} ms",
            socket.display(),
            limit.as_millis()
        ))),
        Ok(Ok(status)) => Ok(seen_in(status, pin)),
        Ok(Err(e)) if transient(&e) => Ok(Seen::NoAgent(format!("{e:#}"))),
        Ok(Err(e)) => Err(e),
    }
}

/// Waits until the rollback whose pin is `pin` is no longer running, printing each new
/// progress line on stderr when `progress`; fails with [`WaitTimeout`] after `limit`.
/// A failover or a restart of the local agent meanwhile does not end the wait: the
/// rollback goes on (its new server resumes it), so a lost control connection or an agent
/// without a server is asked again until `limit`, with a line on stderr saying so.
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
        let remaining = deadline.saturating_duration_since(Instant::now());
        let seen = look(
            socket,
            volume,
            pin,
            remaining.clamp(Duration::from_secs(1), LOOK_LIMIT),
        )
        .await?;
        let line = match seen {
            Seen::Done => return Ok(()),
            Seen::Running(r) => rollback_line(&r),
            Seen::NoServer => format!(
                "waiting for volume {volume}'s server (none answers yet: a failover or a                  restart is under way; the rollback resumes on the new server)"
            ),
            Seen::NoAgent(why) => format!("waiting for the agent ({why})"),
        };
        let waiting = line.starts_with("waiting for");
        if (progress || waiting) && last.as_deref() != Some(&line) {
            eprintln!("csnapctl: {line}");
        }
        last = Some(line);
        if Instant::now() >= deadline {
            return Err(WaitTimeout(format!(
                "volume {volume}: the rollback is under way but its copy-back was not seen to                  finish within {} s ({}); it goes on, see csnapctl status",
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

    #[test]
    fn the_default_pin_name_is_a_valid_snapshot_name_without_colons() {
        let name = default_pin_name(1_795_000_000);
        assert_eq!(name, "before-rollback-2026-11-18T110640Z");
        assert!(csnap_proto::validate_snapshot_name(&name).is_ok());
    }

    #[test]
    fn progress_lines_say_how_far_the_copy_back_got() {
        let mut r = RollbackStatus {
            source: SnapId(3),
            pin: SnapId(7),
            position: 250,
            origin_chunks: 1000,
            chunks_copied: 40,
            source_name: "before-upgrade".into(),
            pin_name: "broken-1".into(),
        };
        assert_eq!(
            rollback_line(&r),
            "rollback to snapshot 3 (\"before-upgrade\") (origin as it was: snapshot 7 (\"broken-1\")): 250 of 1000 chunks rolled back (25%), 40 copied back by this server"
        );
        // An older server says no names: ids only.
        r.source_name.clear();
        r.pin_name.clear();
        assert_eq!(
            rollback_line(&r),
            "rollback to snapshot 3 (origin as it was: snapshot 7): 250 of 1000 chunks rolled back (25%), 40 copied back by this server"
        );
    }

    #[test]
    fn an_agent_without_a_server_is_not_taken_for_a_finished_rollback() {
        let running = RollbackStatus {
            source: SnapId(3),
            pin: SnapId(7),
            position: 250,
            origin_chunks: 1000,
            chunks_copied: 40,
            source_name: "s".into(),
            pin_name: "p".into(),
        };
        let served = csnap_proto::ServerStatus {
            chunk_size: 16384,
            ..Default::default()
        };
        // A cluster agent during a failover reports the default status: no rollback, but
        // no server either.
        assert_eq!(seen_in(Default::default(), SnapId(7)), Seen::NoServer);
        assert_eq!(seen_in(served.clone(), SnapId(7)), Seen::Done);
        let with = csnap_proto::ServerStatus {
            rollback: Some(Box::new(running.clone())),
            ..served
        };
        assert_eq!(seen_in(with.clone(), SnapId(7)), Seen::Running(running));
        // Another rollback (another pin) is not the one waited for.
        assert_eq!(seen_in(with, SnapId(8)), Seen::Done);
    }

    #[test]
    fn a_lost_agent_is_waited_for_but_a_bad_answer_is_not() {
        let path = std::path::PathBuf::from("/run/csnap/csnap.sock");
        for e in [
            ControlError::NotRunning { path: path.clone() },
            ControlError::Refused { path: path.clone() },
            ControlError::NoAnswer { path: path.clone() },
        ] {
            assert!(transient(&e.into()));
        }
        assert!(transient(
            &AgentError {
                origin: "node 2".into(),
                message: "volume \"vol0\" is stopping".into()
            }
            .into()
        ));
        assert!(!transient(
            &ControlError::Io {
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "bad frame"),
            }
            .into()
        ));
        assert!(!transient(&anyhow::anyhow!(
            "unexpected answer from the agent"
        )));
    }
}
