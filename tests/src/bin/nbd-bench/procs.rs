//! The benchmark's child processes. Each runs in its own process group, so a terminal's
//! Ctrl-C reaches the benchmark alone (which then stops them in order), and with
//! `PR_SET_PDEATHSIG = SIGKILL`, so a benchmark killed outright takes them along. Every
//! child is stopped by its PID when its [`Proc`] is dropped, whatever the reason.
//!
//! The parent-death signal fires when the forking *thread* exits: the benchmark spawns
//! everything from its main thread (a current-thread runtime), which outlives them all.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a stopped process may take to exit after SIGTERM before it gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// A running child, stopped (SIGTERM, then SIGKILL) by PID on drop.
pub(crate) struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout/stderr appended to `log`.
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open log file {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("cannot duplicate log file {}", log.display()))?;
        let parent = std::process::id() as libc::pid_t;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: runs in the forked child before exec and makes only async-signal-safe
        // calls (prctl, getppid, raise); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl.
                if libc::getppid() != parent {
                    libc::raise(libc::SIGKILL);
                }
                Ok(())
            });
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({program})"))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// The PID, while the process has not been reaped.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The exit status, if the process has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (asynchronously, so Ctrl-C can cancel it) for the process to exit on its own;
    /// stops it and fails if it is still running after `limit`.
    pub(crate) async fn wait(mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.stop_now();
                bail!(
                    "{} did not finish within {limit:?}; stopped it. Log tail:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL after a grace period; reaps it.
    pub(crate) async fn stop(mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as libc::pid_t);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                self.child = None;
                return;
            }
            tokio::time::sleep(POLL).await;
        }
        self.stop_now();
    }

    /// The last `lines` lines of the process's log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Synchronous stop for drop paths: SIGTERM, a short grace, SIGKILL, reap.
    fn stop_now(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = Pid::from_raw(child.id() as libc::pid_t);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Runs a short command to completion (bounded by `limit`), failing with its output when
/// it fails.
pub(crate) async fn run_tool(
    name: &str,
    cmd: Command,
    log: &Path,
    limit: Duration,
) -> anyhow::Result<()> {
    let status = Proc::spawn(name, cmd, log)?.wait(limit).await?;
    if !status.success() {
        bail!("{name} failed ({status}). Log tail:\n{}", log_tail(log, 20));
    }
    Ok(())
}

/// The last `lines` lines of a log file.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// CPU time (user + system) and thread count of a process, from /proc/PID/stat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CpuSample {
    pub cpu: Duration,
    pub threads: u32,
}

/// Reads `pid`'s CPU time and thread count; `None` if it is gone or unreadable.
pub(crate) fn cpu_sample(pid: u32) -> Option<CpuSample> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text, clock_ticks()?)
}

fn clock_ticks() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0)
}

/// Parses /proc/PID/stat: the command name may hold spaces and parentheses, so the fields
/// are counted after its last ')'. utime and stime are fields 14 and 15, num_threads 20.
fn parse_stat(text: &str, ticks_per_sec: u64) -> Option<CpuSample> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let ticks = field(14)?.checked_add(field(15)?)?;
    let threads = u32::try_from(field(20)?).ok()?;
    Some(CpuSample {
        cpu: Duration::from_micros(ticks.checked_mul(1_000_000)? / ticks_per_sec),
        threads,
    })
}

/// Resident memory of a process, from /proc/PID/status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemorySample {
    /// VmRSS: resident now, in bytes.
    pub rss: u64,
    /// VmHWM: the highest resident size since the process started, in bytes.
    pub hwm: u64,
}

/// Reads `pid`'s resident memory; `None` if it is gone or unreadable.
pub(crate) fn memory_sample(pid: u32) -> Option<MemorySample> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status(&text)
}

/// Parses the `VmRSS:` and `VmHWM:` lines (in kB) of /proc/PID/status.
fn parse_status(text: &str) -> Option<MemorySample> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let mut words = line[name.len()..].split_whitespace();
        let kb = words.next()?.parse::<u64>().ok()?;
        (words.next()? == "kB").then_some(kb.checked_mul(1024)?)
    };
    Some(MemorySample {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (qemu (nbd) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    7 0 12345 1000 100 18446744073709551615";
        let s = parse_stat(line, 100).unwrap();
        assert_eq!(s.cpu, Duration::from_secs(3));
        assert_eq!(s.threads, 7);
        assert_eq!(parse_stat("garbage", 100), None);
        assert_eq!(parse_stat("1 (x) S 1 2", 100), None);
    }

    #[test]
    fn status_memory_lines_are_read_in_kilobytes() {
        let text = "Name:\tcsnap-agent\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t9\n";
        assert_eq!(
            parse_status(text),
            Some(MemorySample {
                rss: 10 << 20,
                hwm: 20 << 20
            })
        );
        assert_eq!(parse_status("VmRSS:\t12 kB\n"), None);
        assert_eq!(parse_status("VmRSS:\tlots kB\nVmHWM:\t1 kB\n"), None);
        assert!(memory_sample(std::process::id()).is_some_and(|m| m.rss > 0 && m.hwm >= m.rss));
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = cpu_sample(std::process::id()).unwrap();
        assert!(s.threads >= 1);
    }
}
