//! Socket activation over TCP with named fds: the test binds the socket, hands it to
//! nbd-file-server as fd 3 the way systemd does, and talks NBD to it.

use crate::nbd_support;

use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};

use csnap_blockdev::nbd::consts::*;
use nbd_support::*;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_socket_activation_with_fd_names() {
    if !require_tool("bash") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, pattern(5, 65536)).unwrap();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();
    // Let the child inherit the socket; the shell moves it to fd 3 and sets LISTEN_PID
    // to its own pid, which `exec` keeps for the server.
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
    let mut flags = nix::fcntl::FdFlag::from_bits_truncate(flags);
    flags.remove(nix::fcntl::FdFlag::FD_CLOEXEC);
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(flags)).unwrap();

    // Tests in the same binary open and close descriptors concurrently, so the socket can
    // have any number: bash (dash takes only 0-9 in a redirection) moves it, and when it
    // already is fd 3 it stays (`3<&3 3<&-` would close it).
    let move_to_3 = if fd == 3 {
        String::new()
    } else {
        format!(" 3<&{fd} {fd}<&-")
    };
    let script = format!(
        "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=nbd exec \"$0\" --export \"$1\"{move_to_3}"
    );
    let export = format!("disk={}:ro", image.display());
    let child = Command::new("bash")
        .args([
            "-c",
            &script,
            env!("CARGO_BIN_EXE_nbd-file-server"),
            &export,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the server through bash");
    let mut child = Killed(child);
    // The server owns the socket now; ours can go (connections queue on the shared one).
    drop(listener);

    let mut c = RawClient::connect(addr).await;
    let (size, flags) = c.go("").await;
    assert_eq!(size, 65536);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    c.request(CMD_READ, 0, 1, 1000, 100, &[]).await;
    assert_eq!(
        c.read_reply().await,
        TxReply::Simple {
            cookie: 1,
            error: 0,
            data: pattern(5, 65536)[1000..1100].to_vec()
        }
    );
    c.request(CMD_DISC, 0, 2, 0, 0, &[]).await;
    c.expect_closed().await;

    // Activated sockets are not announced on stdout (it may belong to the client).
    let _ = child.0.kill();
    let out = child.0.wait_with_output_lossy();
    assert!(!out.contains("listening on"), "stdout: {out:?}");
}

trait StdoutLossy {
    fn wait_with_output_lossy(&mut self) -> String;
}

impl StdoutLossy for Child {
    fn wait_with_output_lossy(&mut self) -> String {
        use std::io::Read;
        let _ = self.wait();
        let mut out = String::new();
        if let Some(mut stdout) = self.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        out
    }
}
