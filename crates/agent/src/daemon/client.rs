//! A node's client side of one volume in cluster mode: the client library following the
//! volume's server wherever the membership puts it, and the NBD exports on top.

use std::sync::Arc;
use std::time::Duration;

use csnap_blockdev::client::{ClientConfig, ServerTarget, Volume};
use csnap_blockdev::export::CsnapExports;
use csnap_blockdev::nbd::NbdServer;
use csnap_proto::net::Listener;
use csnap_proto::ListenAddr;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::volume::{client_address, ServerLocation, VolumeRequest};

/// What the client side needs.
#[derive(Debug, Clone)]
pub struct ClientSideConfig {
    /// The volume's name.
    pub volume: String,
    /// The shared origin device.
    pub origin: std::path::PathBuf,
    /// The shared snapshot store device.
    pub store: std::path::PathBuf,
    /// The cluster key.
    pub key: Vec<u8>,
    /// This node's id.
    pub node: u32,
    /// This agent's client instance (random per process: the server tells its reconnects from
    /// another agent's).
    pub instance: u64,
    /// Open the shared devices O_DIRECT.
    pub direct_io: bool,
    /// Where the volume's NBD server listens (`None`: no NBD server).
    pub nbd_listen: Option<ListenAddr>,
    /// Export snapshots read-only (`--snapshots-read-only`).
    pub snapshots_read_only: bool,
}

/// Runs until `stop`: connects the volume once a server is known (following it after),
/// publishes the connected volume, serves NBD, and tells the membership shell the node's
/// snapshot clients whenever they change.
pub async fn run_client_side(
    cfg: ClientSideConfig,
    mut location: watch::Receiver<Option<ServerLocation>>,
    membership: mpsc::UnboundedSender<VolumeRequest>,
    connected: watch::Sender<Option<Arc<Volume>>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // The address the client library dials, following the membership's server.
    let (target_tx, target_rx) = watch::channel(None);
    let (resets_tx, mut resets_rx) = watch::channel(0u64);
    let follow = async {
        loop {
            let addr = location.borrow_and_update().as_ref().and_then(|l| {
                client_address(l)
                    .map_err(
                        |e| tracing::error!(volume = %cfg.volume, error = %e, "bad server address"),
                    )
                    .ok()
            });
            let resets = location.borrow().as_ref().map_or(0, |l| l.resets);
            resets_tx.send_if_modified(|r| {
                let bumped = resets > *r;
                *r = (*r).max(resets);
                bumped
            });
            target_tx.send_if_modified(|t| {
                if addr.is_some() && *t != addr {
                    *t = addr;
                    true
                } else {
                    false
                }
            });
            if location.changed().await.is_err() {
                // The membership shell is gone; `work` ends on `stop`.
                std::future::pending::<()>().await;
            }
        }
    };
    let work = async {
        let volume = loop {
            let attempt = Volume::connect(ClientConfig {
                server: ServerTarget::Follow(target_rx.clone()),
                key: cfg.key.clone(),
                instance: cfg.instance,
                node: cfg.node,
                origin: cfg.origin.clone(),
                store: cfg.store.clone(),
                connect_timeout: Duration::from_secs(3600),
                cache_chunks: 1 << 20,
                direct_io: cfg.direct_io,
            });
            let attempt = tokio::select! {
                _ = stop.cancelled() => return,
                attempt = attempt => attempt,
            };
            match attempt {
                Ok(v) => break v,
                Err(e) => {
                    tracing::warn!(volume = %cfg.volume, error = %e, "the volume's client could not connect yet; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        tracing::info!(volume = %cfg.volume, "the volume's client is connected");
        connected.send_replace(Some(volume.clone()));
        let exports = CsnapExports::new(&cfg.volume, volume.clone(), cfg.snapshots_read_only);
        let nbd_server = Arc::new(NbdServer::new(Arc::new(exports), Default::default()));
        let mut nbd_task = None;
        if let Some(addr) = &cfg.nbd_listen {
            match Listener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(volume = %cfg.volume, nbd = %listener, "NBD exports listening");
                    nbd_task = Some(tokio::spawn(
                        nbd_server.clone().serve(listener).in_current_span(),
                    ));
                }
                Err(e) => {
                    tracing::error!(volume = %cfg.volume, error = %e, "cannot serve the NBD exports")
                }
            }
        }
        // The membership hears of every change of the node's snapshot clients at once
        // (a failover's gather collects what it was told).
        let mut changed = volume.snapshot_clients_changed();
        let mut told = None;
        loop {
            changed.borrow_and_update();
            let mut clients = volume.snapshot_clients();
            clients.sort();
            if told.as_ref() != Some(&clients) {
                let _ = membership.send(VolumeRequest::Clients(clients.clone()));
                told = Some(clients);
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                Ok(()) = changed.changed() => {}
                Ok(()) = resets_rx.changed() => volume.reconnect(),
            }
        }
        if !nbd_server.shutdown(Duration::from_secs(10)).await {
            tracing::warn!(volume = %cfg.volume, "NBD connections still open after 10 s; closing anyway");
        }
        if let Some(t) = nbd_task {
            t.abort();
        }
        if let Some(ListenAddr::Unix(p)) = &cfg.nbd_listen {
            let _ = std::fs::remove_file(p);
        }
        connected.send_replace(None);
        volume.shutdown().await;
    };
    tokio::select! {
        _ = follow => {}
        _ = work => {}
    }
    Ok(())
}
