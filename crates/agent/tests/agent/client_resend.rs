//! Requests resent after a lost connection (issue 8, finding 7), through a proxy that drops
//! the answer to one request and cuts the connection: the client resends on its next
//! connection, and the resend must do what the first send meant.

use crate::support;

use std::path::PathBuf;
use std::sync::Arc;

use csnap_proto::frame::LENGTH_PREFIX;
use csnap_proto::{decode_complete_frame, ClientFrame, ClientMsg, SnapRef, TAG_LEN};
use support::{connect_volume, start_server, Fixture, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Mutex};

const CHUNK: u64 = 4096;

type Pick = fn(&ClientMsg) -> bool;

/// A Unix-socket proxy in front of the server. Once armed with a predicate, the first
/// connection that sends a matching request has the server's next frame (its answer)
/// dropped and is cut; new connections then wait until `release`.
struct Proxy {
    path: PathBuf,
    arm: Arc<Mutex<Option<Pick>>>,
    cut: watch::Receiver<bool>,
    release: watch::Sender<bool>,
}

impl Proxy {
    fn start(listen: PathBuf, server: PathBuf) -> Proxy {
        let listener = UnixListener::bind(&listen).unwrap();
        let arm: Arc<Mutex<Option<Pick>>> = Arc::default();
        let (cut_tx, cut) = watch::channel(false);
        let (release, release_rx) = watch::channel(true);
        let cut_tx = Arc::new(cut_tx);
        {
            let arm = arm.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let mut open = release_rx.clone();
                    let _ = open.wait_for(|o| *o).await;
                    let Ok(upstream) = UnixStream::connect(&server).await else {
                        continue;
                    };
                    tokio::spawn(pipe(client, upstream, arm.clone(), cut_tx.clone()));
                }
            });
        }
        Proxy {
            path: listen,
            arm,
            cut,
            release,
        }
    }

    /// Cuts the connection that next sends a request matching `pick`, dropping its answer,
    /// and holds reconnects until `release`.
    async fn drop_answer_to(&mut self, pick: Pick) {
        *self.arm.lock().await = Some(pick);
        self.release.send_replace(false);
    }

    async fn wait_cut(&mut self) {
        tokio::time::timeout(WAIT, self.cut.wait_for(|c| *c))
            .await
            .expect("the connection was cut in time")
            .unwrap();
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

/// Length of the whole frame at the start of `buf`, once all of it is there.
fn whole_frame(buf: &[u8]) -> Option<usize> {
    let prefix: [u8; LENGTH_PREFIX] = buf.get(..LENGTH_PREFIX)?.try_into().ok()?;
    let need = LENGTH_PREFIX + u32::from_be_bytes(prefix) as usize;
    (buf.len() >= need).then_some(need)
}

/// What a client frame asks, read as an on-path observer can: frames are authenticated,
/// not encrypted, so a sealed frame is the plain one with a tag appended.
fn peek_client_msg(frame: &[u8]) -> Option<ClientMsg> {
    if let Ok(f) = decode_complete_frame::<ClientFrame>(frame) {
        return Some(f.msg);
    }
    let untagged_len = frame.len().checked_sub(LENGTH_PREFIX + TAG_LEN)?;
    let mut plain = (untagged_len as u32).to_be_bytes().to_vec();
    plain.extend_from_slice(&frame[LENGTH_PREFIX..frame.len() - TAG_LEN]);
    decode_complete_frame::<ClientFrame>(&plain)
        .ok()
        .map(|f| f.msg)
}

async fn pipe(
    client: UnixStream,
    upstream: UnixStream,
    arm: Arc<Mutex<Option<Pick>>>,
    cut: Arc<watch::Sender<bool>>,
) {
    let (mut crd, mut cwr) = client.into_split();
    let (mut srd, mut swr) = upstream.into_split();
    let (marked_tx, mut marked) = watch::channel(false);
    let up = async move {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match crd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Some(used) = whole_frame(&buf) {
                let bytes: Vec<u8> = buf.drain(..used).collect();
                let Some(msg) = peek_client_msg(&bytes) else {
                    return;
                };
                let mut armed = arm.lock().await;
                if armed.is_some_and(|pick| pick(&msg)) {
                    *armed = None;
                    marked_tx.send_replace(true);
                }
                drop(armed);
                if swr.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = async move {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match srd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Some(used) = whole_frame(&buf) {
                let bytes: Vec<u8> = buf.drain(..used).collect();
                if *marked.borrow_and_update() {
                    // The answer to the marked request: lost with the connection.
                    cut.send_replace(true);
                    return;
                }
                if cwr.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        }
    };
    // Either direction ending ends both (dropping the halves closes the sockets).
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// `connect_volume` waits for the origin session only. The admin connection must be up
/// (piped by the proxy) before the proxy holds new connections back, or the request to
/// cut would never be sent (seen under load in CI).
async fn admin_session_up(client: &csnap_blockdev::client::Volume) {
    tokio::time::timeout(WAIT, client.list_snapshots())
        .await
        .expect("the admin session came up in time")
        .expect("an admin request through the proxy");
}

fn is_delete(m: &ClientMsg) -> bool {
    matches!(m, ClientMsg::DeleteSnapshot { .. })
}

fn is_create(m: &ClientMsg) -> bool {
    matches!(m, ClientMsg::CreateSnapshot { .. })
}

/// Deleting "x" by name; the answer is lost with the connection; meanwhile another admin
/// creates a new "x". The resend must not delete the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_delete_deletes_the_snapshot_it_meant_not_a_newer_one_with_its_name() {
    let fx = Fixture::new(CHUNK, CHUNK * 16, 16 << 20);
    let sock = fx.path("server.sock");
    let server = start_server(&fx, &sock, Vec::new()).await;
    let mut proxy = Proxy::start(fx.path("proxy.sock"), sock.clone());
    let client = connect_volume(&fx, &proxy.path, 0x100, 1, 1 << 10).await;
    admin_session_up(&client).await;
    let other = connect_volume(&fx, &sock, 0x200, 1, 1 << 10).await;
    let old = client.create_snapshot("x").await.expect("create x").id;

    proxy.drop_answer_to(is_delete).await;
    let delete = {
        let client = client.clone();
        tokio::spawn(async move { client.delete_snapshot(SnapRef::Name("x".into())).await })
    };
    proxy.wait_cut().await;
    // The first send deleted the old "x"; a new "x" appears before the client is back.
    let new = tokio::time::timeout(WAIT, other.create_snapshot("x"))
        .await
        .expect("created in time")
        .expect("a new x");
    assert_ne!(new.id, old);
    proxy.release();
    let deleted = tokio::time::timeout(WAIT, delete)
        .await
        .expect("the delete finished in time")
        .unwrap();
    let listed = other.list_snapshots().await.expect("list");
    assert!(
        listed.iter().any(|s| s.id == new.id && s.name == "x"),
        "the resent delete removed the newer snapshot {} named x (answer {deleted:?}); left: {listed:?}",
        new.id
    );
    assert!(listed.iter().all(|s| s.id != old), "the old x is gone");
    assert_eq!(deleted.expect("the delete succeeded"), old);
    client.shutdown().await;
    other.shutdown().await;
    server.shutdown().await.expect("clean shutdown");
}

/// Creating "y"; the answer is lost with the connection. The resend must answer success
/// with the snapshot the first send created, not "name taken", and create nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_create_answers_success_with_the_snapshot_it_created() {
    let fx = Fixture::new(CHUNK, CHUNK * 16, 16 << 20);
    let sock = fx.path("server.sock");
    let server = start_server(&fx, &sock, Vec::new()).await;
    let mut proxy = Proxy::start(fx.path("proxy.sock"), sock.clone());
    let client = connect_volume(&fx, &proxy.path, 0x100, 1, 1 << 10).await;
    admin_session_up(&client).await;
    let other = connect_volume(&fx, &sock, 0x200, 1, 1 << 10).await;

    proxy.drop_answer_to(is_create).await;
    let create = {
        let client = client.clone();
        tokio::spawn(async move { client.create_snapshot("y").await })
    };
    proxy.wait_cut().await;
    let listed = other.list_snapshots().await.expect("list");
    assert_eq!(listed.len(), 1, "the first send created y: {listed:?}");
    proxy.release();
    let created = tokio::time::timeout(WAIT, create)
        .await
        .expect("the create finished in time")
        .unwrap()
        .expect("the resent create answers success");
    assert_eq!(created.id, listed[0].id);
    assert_eq!(created.name, "y");
    assert_eq!(other.list_snapshots().await.expect("list").len(), 1);
    client.shutdown().await;
    other.shutdown().await;
    server.shutdown().await.expect("clean shutdown");
}

/// As above, but the server crashes after answering and a new one starts on the store
/// before the client is back (a failover): the resend still answers success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_resent_to_a_new_server_answers_success_with_the_snapshot_it_created() {
    let fx = Fixture::new(CHUNK, CHUNK * 16, 16 << 20);
    let sock = fx.path("server.sock");
    let server = start_server(&fx, &sock, Vec::new()).await;
    let mut proxy = Proxy::start(fx.path("proxy.sock"), sock.clone());
    let client = connect_volume(&fx, &proxy.path, 0x100, 1, 1 << 10).await;
    admin_session_up(&client).await;

    proxy.drop_answer_to(is_create).await;
    let create = {
        let client = client.clone();
        tokio::spawn(async move { client.create_snapshot("z").await })
    };
    proxy.wait_cut().await;
    // Crash-like: no clean shutdown; the next server recovers the store from its journal.
    drop(server);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let server = start_server(&fx, &sock, Vec::new()).await;
    proxy.release();
    let created = tokio::time::timeout(WAIT, create)
        .await
        .expect("the create finished in time")
        .unwrap()
        .expect("the resent create answers success");
    assert_eq!(created.name, "z");
    let listed = client.list_snapshots().await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, created.id);
    client.shutdown().await;
    server.shutdown().await.expect("clean shutdown");
}
