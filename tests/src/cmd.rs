//! Running external commands (ip, corosync tools) with a time bound and captured output.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::HarnessError;

/// Default bound for a management command (`ip`, `corosync-quorumtool`, ...).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// What a finished command printed.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// `cmd` as a readable shell-like string for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion, feeding `stdin` if given, killing it after `timeout`.
/// Does not judge the exit status; see [`run_ok`].
pub fn run(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<CmdOutput, HarnessError> {
    let command = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| HarnessError::io(format!("start `{command}`"), e))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Inputs are small `ip -batch` scripts, well below a pipe's buffer.
        pipe.write_all(input)
            .map_err(|e| HarnessError::io(format!("write stdin of `{command}`"), e))?;
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = match wait_bounded(&mut child, timeout)
        .map_err(|e| HarnessError::io(format!("wait for `{command}`"), e))?
    {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HarnessError::CommandTimeout { command, timeout });
        }
    };
    Ok(CmdOutput {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Runs `cmd` and returns its stdout; a non-zero exit is an error carrying stderr.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String, HarnessError> {
    run_ok_with_stdin(cmd, None, timeout)
}

/// [`run_ok`] with input on stdin.
pub fn run_ok_with_stdin(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<String, HarnessError> {
    let out = run(cmd, stdin, timeout)?;
    if out.success() {
        Ok(out.stdout)
    } else {
        Err(HarnessError::Command {
            command: describe(cmd),
            status: out.status.to_string(),
            stderr: out.stderr.trim().to_string(),
        })
    }
}

/// Waits for `child` to exit, at most `timeout`. `Ok(None)`: still running.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let out = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            None,
            COMMAND_TIMEOUT,
        )
        .unwrap();
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn run_ok_reports_failure_with_stderr() {
        let err = run_ok(
            Command::new("sh").args(["-c", "echo broken >&2; exit 1"]),
            COMMAND_TIMEOUT,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sh -c") && text.contains("broken"), "{text}");
    }

    #[test]
    fn feeds_stdin() {
        let out =
            run_ok_with_stdin(&mut Command::new("cat"), Some(b"abc"), COMMAND_TIMEOUT).unwrap();
        assert_eq!(out, "abc");
    }

    #[test]
    fn kills_a_command_that_overruns() {
        let started = Instant::now();
        let err = run(
            Command::new("sleep").arg("30"),
            None,
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(matches!(err, HarnessError::CommandTimeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
