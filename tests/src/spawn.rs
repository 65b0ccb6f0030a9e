//! Starts long-lived child processes (the corosyncs) from one dedicated thread, each with
//! `PR_SET_PDEATHSIG = SIGKILL`: if the test process dies without running its cleanup
//! (SIGKILL, abort), the kernel kills its corosyncs too. The parent-death signal fires
//! when the *thread* that forked exits, hence one thread that lives as long as the
//! cluster rather than whichever (possibly short-lived) thread asked for the start.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::{self, JoinHandle};
use std::time::Duration;

type Job = (Command, mpsc::Sender<io::Result<Child>>);

/// How long a start request may wait for the spawner thread.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Spawner {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Option<JoinHandle<()>>,
}

impl Spawner {
    pub(crate) fn new() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = thread::Builder::new()
            .name("cse-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(spawn_tied_to_this_thread(&mut cmd));
                }
            })?;
        Ok(Spawner {
            jobs: Mutex::new(Some(tx)),
            thread: Some(thread),
        })
    }

    /// Spawns `cmd` from the spawner thread.
    pub(crate) fn spawn(&self, cmd: Command) -> io::Result<Child> {
        let (reply_tx, reply_rx) = mpsc::channel();
        {
            let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let jobs = jobs
                .as_ref()
                .ok_or_else(|| io::Error::other("spawner already shut down"))?;
            jobs.send((cmd, reply_tx))
                .map_err(|_| io::Error::other("spawner thread is gone"))?;
        }
        reply_rx
            .recv_timeout(SPAWN_TIMEOUT)
            .map_err(|e| io::Error::other(format!("spawner thread did not answer: {e}")))?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn spawn_tied_to_this_thread(cmd: &mut Command) -> io::Result<Child> {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid, raise), allocating nothing.
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
    cmd.spawn()
}
