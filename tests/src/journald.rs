//! A real `systemd-journald` for tests, without systemd as PID 1 and without touching the
//! machine's journal.
//!
//! journald runs standalone in a mount namespace of its own (`unshare --mount`) where a
//! directory of the test, `<dir>/run-systemd`, is bind-mounted over `/run/systemd` and
//! `<dir>/log` over `/run/log`. Not socket-activated, it binds its sockets itself
//! (`/run/systemd/journal/{socket,stdout,dev-log}`, so in `<dir>/run-systemd/journal/`), and
//! with `Storage=volatile` (a drop-in in `<dir>/run-systemd/journald.conf.d/`, read from
//! `/run/systemd/journald.conf.d`) it writes `/run/log/journal/MACHINE-ID/system.journal`,
//! so `<dir>/log/journal`, which `journalctl -D` reads. Kernel messages, syslog forwarding
//! and rate limits are off.
//!
//! A process logs to it as it would under systemd:
//! * the native protocol (`tracing-journald`, `sd_journal_send`) needs
//!   `/run/systemd/journal/socket`, a fixed path: [`Journald::wrap`] runs a program in a
//!   mount namespace with the same bind mount over `/run/systemd` (the pid stays the
//!   program's: `unshare` and `sh` exec it);
//! * a stdout/stderr stream: [`Journald::stream`] connects to the `stdout` socket (through
//!   the test directory: a unix socket is reached through any path to it), sends the
//!   stream header systemd sends for a service and returns the socket with the
//!   `$JOURNAL_STREAM` value (`DEVICE:INODE`) a service gets.
//!
//! The journald process is started with a parent-death signal and stopped (by pid) on
//! drop; its directory belongs to the caller (e.g. under the cluster's run directory).

use std::fs::File;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cmd::{self, run_ok, wait_bounded};
use crate::error::HarnessError;
use crate::prereq::{find_program, under_ci};

/// Where Debian keeps the daemon.
const JOURNALD_PATHS: &[&str] = &[
    "/lib/systemd/systemd-journald",
    "/usr/lib/systemd/systemd-journald",
];
/// How long journald may take to create its sockets.
const START_WAIT: Duration = Duration::from_secs(15);
/// SIGTERM grace before SIGKILL on drop.
const STOP_GRACE: Duration = Duration::from_secs(5);

const CONFIG: &str = "[Journal]\n\
Storage=volatile\n\
ReadKMsg=no\n\
ForwardToSyslog=no\n\
ForwardToKMsg=no\n\
ForwardToConsole=no\n\
ForwardToWall=no\n\
RateLimitIntervalSec=0\n\
RuntimeMaxFileSize=8M\n";

/// The daemon's path, if installed.
pub fn journald_program() -> Option<PathBuf> {
    JOURNALD_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// What a journal test needs beyond the cluster's prerequisites, as readable reasons.
pub fn missing_journald_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    if journald_program().is_none() {
        missing.push(format!(
            "systemd-journald (looked in {JOURNALD_PATHS:?}; apt-get install systemd)"
        ));
    }
    if find_program("journalctl").is_none() {
        missing.push("program `journalctl` (apt-get install systemd)".into());
    }
    for dir in ["/run/systemd", "/run/log"] {
        if !Path::new(dir).is_dir() {
            missing.push(format!(
                "directory {dir} (a mount point for the test's journal)"
            ));
        }
    }
    missing
}

/// Under `CI=true` panics when something is missing; elsewhere prints `SKIPPED` and
/// returns false.
pub fn journald_or_skip(test: &str) -> bool {
    let missing = missing_journald_prerequisites();
    if missing.is_empty() {
        return true;
    }
    assert!(!under_ci(), "{test}: missing {missing:?} (CI=true)");
    eprintln!("SKIPPED {test}: missing {missing:?}");
    false
}

/// A running journald (see the module doc).
pub struct Journald {
    dir: PathBuf,
    child: Option<Child>,
}

impl Journald {
    /// Starts journald with its state under `dir` (created) and waits for its sockets.
    pub fn start(dir: &Path) -> Result<Journald, HarnessError> {
        let program = journald_program()
            .ok_or_else(|| HarnessError::Prerequisite("systemd-journald".into()))?;
        let run_systemd = dir.join("run-systemd");
        let log = dir.join("log");
        for d in [run_systemd.join("journald.conf.d"), log.clone()] {
            std::fs::create_dir_all(&d)
                .map_err(|e| HarnessError::io(format!("create {}", d.display()), e))?;
        }
        let conf = run_systemd.join("journald.conf.d/csnap-test.conf");
        std::fs::write(&conf, CONFIG)
            .map_err(|e| HarnessError::io(format!("write {}", conf.display()), e))?;
        let out_path = dir.join("journald.out");
        let out = File::create(&out_path)
            .map_err(|e| HarnessError::io(format!("create {}", out_path.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| HarnessError::io(format!("dup {}", out_path.display()), e))?;
        let mut command = Command::new("unshare");
        // Paths go in as positional parameters: no quoting needed.
        command
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount --bind \"$1\" /run/systemd && mount --bind \"$2\" /run/log && exec \"$3\"")
            .arg("sh")
            .arg(&run_systemd)
            .arg(&log)
            .arg(&program)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: runs in the forked child before exec and only makes async-signal-safe
        // system calls (prctl, getppid, raise), allocating nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::raise(libc::SIGKILL);
                }
                Ok(())
            });
        }
        let what = cmd::describe(&command);
        let child = command
            .spawn()
            .map_err(|e| HarnessError::io(format!("start `{what}`"), e))?;
        let mut journald = Journald {
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let deadline = Instant::now() + START_WAIT;
        loop {
            let sockets = ["socket", "stdout"]
                .iter()
                .all(|s| journald.socket_dir().join(s).exists());
            if sockets {
                return Ok(journald);
            }
            if let Some(child) = journald.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    journald.child = None;
                    return Err(HarnessError::Timeout {
                        what: "systemd-journald to create its sockets".into(),
                        waited: START_WAIT,
                        last: format!(
                            "it exited ({status}): {}",
                            std::fs::read_to_string(&out_path)
                                .unwrap_or_default()
                                .trim()
                        ),
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: "systemd-journald to create its sockets".into(),
                    waited: START_WAIT,
                    last: std::fs::read_to_string(&out_path).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// journald's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The directory bind-mounted over `/run/systemd` (for journald and [`Self::wrap`]).
    pub fn run_systemd(&self) -> PathBuf {
        self.dir.join("run-systemd")
    }

    /// Where journald's sockets are, as seen from outside its namespace.
    pub fn socket_dir(&self) -> PathBuf {
        self.run_systemd().join("journal")
    }

    /// The journal directory for `journalctl -D`.
    pub fn journal_dir(&self) -> PathBuf {
        self.dir.join("log").join("journal")
    }

    /// `program args...` as a command line that runs it with this journal's sockets at
    /// `/run/systemd/journal` (its own mount namespace; the pid stays the program's).
    pub fn wrap(&self, program: &str, args: &[&str]) -> (String, Vec<String>) {
        let mut all: Vec<String> = ["--mount", "--propagation", "private", "sh", "-c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        all.push("mount --bind \"$1\" /run/systemd && shift && exec \"$@\"".into());
        all.push("sh".into());
        all.push(self.run_systemd().display().to_string());
        all.push(program.to_owned());
        all.extend(args.iter().map(|s| s.to_string()));
        ("unshare".into(), all)
    }

    /// A stream to the journal as systemd gives a service's stdout/stderr
    /// (`StandardOutput=journal`): the socket, and the `$JOURNAL_STREAM` value for it.
    pub fn stream(&self, identifier: &str) -> Result<(File, String), HarnessError> {
        let path = self.socket_dir().join("stdout");
        let mut stream = UnixStream::connect(&path)
            .map_err(|e| HarnessError::io(format!("connect to {}", path.display()), e))?;
        // identifier, unit id, priority (info), level prefix, forward to syslog, kmsg,
        // console: what systemd's stream header carries.
        let header = format!("{identifier}\n\n6\n1\n0\n0\n0\n");
        stream
            .write_all(header.as_bytes())
            .and_then(|()| stream.shutdown(std::net::Shutdown::Read))
            .map_err(|e| HarnessError::io("send the journal stream header", e))?;
        let file = File::from(OwnedFd::from(stream));
        let meta = file
            .metadata()
            .map_err(|e| HarnessError::io("fstat the journal stream", e))?;
        Ok((file, format!("{}:{}", meta.dev(), meta.ino())))
    }

    /// The entries `journalctl -D <journal> -o json MATCHES...` shows, in journal order.
    pub fn entries(
        &self,
        matches: &[&str],
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, HarnessError> {
        let mut command = Command::new(
            find_program("journalctl")
                .ok_or_else(|| HarnessError::Prerequisite("program `journalctl`".into()))?,
        );
        command
            .arg("-D")
            .arg(self.journal_dir())
            .args(["-o", "json", "--no-pager"])
            .args(matches);
        let text = run_ok(&mut command, cmd::COMMAND_TIMEOUT)?;
        let mut entries = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(serde_json::Value::Object(map)) => entries.push(map),
                Ok(other) => {
                    return Err(HarnessError::invalid(
                        "journalctl output",
                        format!("not an object: {other}"),
                    ))
                }
                Err(e) => {
                    return Err(HarnessError::invalid(
                        "journalctl output",
                        format!("{e}: {line}"),
                    ))
                }
            }
        }
        Ok(entries)
    }

    /// `journalctl -D <journal> ARGS...`: its stdout, or the error.
    pub fn journalctl(&self, args: &[&str]) -> Result<String, HarnessError> {
        let mut command = Command::new(
            find_program("journalctl")
                .ok_or_else(|| HarnessError::Prerequisite("program `journalctl`".into()))?,
        );
        command
            .arg("-D")
            .arg(self.journal_dir())
            .arg("--no-pager")
            .args(args);
        run_ok(&mut command, cmd::COMMAND_TIMEOUT)
    }

    /// `journalctl -D <journal> MATCHES...` in its short text form (for failure output).
    pub fn text(&self, matches: &[&str]) -> String {
        let Some(program) = find_program("journalctl") else {
            return String::new();
        };
        let mut command = Command::new(program);
        command
            .arg("-D")
            .arg(self.journal_dir())
            .args(["--no-pager", "-o", "short-precise"])
            .args(matches);
        match cmd::run(&mut command, None, cmd::COMMAND_TIMEOUT) {
            Ok(out) => out.stdout,
            Err(e) => format!("(journalctl failed: {e})"),
        }
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        if !matches!(wait_bounded(&mut child, STOP_GRACE), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A journal entry's field as text (journalctl prints a field given more than once as an
/// array, binary values as arrays of bytes).
pub fn field(entry: &serde_json::Map<String, serde_json::Value>, name: &str) -> Option<String> {
    match entry.get(name)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(values) => {
            values.first().and_then(|v| v.as_str()).map(String::from)
        }
        other => Some(other.to_string()),
    }
}
