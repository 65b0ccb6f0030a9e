//! The `csnap-server` binary on a store whose metadata area fills: the store-full policy
//! invalidates the oldest snapshots (logged), usage warnings show in the log and the
//! status, and after a SIGKILL the restarted server (journal replay) serves on.

use crate::server_support;

use csnap_proto::*;
use csnap_server::store::{FileDevice, FormatOptions, Store};
use server_support::*;
use std::fs::OpenOptions;

const ADMIN: u64 = 0xAD;
const ORIGIN: u64 = 0x0A;
const READER: u64 = 0x5E;
const CHUNK: u64 = 4096;

/// A fixture whose store has only 40 node blocks: a few thousand records fill it.
fn small_metadata_fixture() -> Fixture {
    let fx = Fixture::new(CHUNK, 512, 24 << 20);
    let dev = FileDevice::open(&fx.store, false).unwrap();
    Store::format_with_metadata_blocks(
        &dev,
        &FormatOptions {
            chunk_size: CHUNK,
            origin_size: CHUNK * 512,
            now: 1_700_000_000,
            uuid: None,
        },
        40,
    )
    .unwrap();
    fx
}

async fn list(admin: &Client) -> Vec<SnapshotInfo> {
    match admin
        .request(ClientMsg::ListSnapshots {
            after: None,
            limit: u32::MAX,
        })
        .await
        .unwrap()
    {
        ServerMsg::SnapshotList { snapshots, .. } => snapshots,
        other => panic!("list: {other:?}"),
    }
}

async fn status(admin: &Client) -> ServerStatus {
    match admin.request(ClientMsg::Status).await.unwrap() {
        ServerMsg::Status(s) => s,
        other => panic!("status: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_survives_a_full_metadata_area_and_a_restart() {
    let fx = small_metadata_fixture();
    let addr = fx.unix_addr("space.sock");
    let mut proc = ServerProcess::spawn(&fx, &addr, &["--warn-metadata", "20"], "server.log");
    proc.wait_listening().await;
    let origin_file = OpenOptions::new().write(true).open(&fx.origin).unwrap();
    let origin = Client::connect(&addr, &fx.key, ORIGIN, ClientKind::Origin).await;
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;
    // Round r: a snapshot (it sees version r), then chunks 0..250 get version r + 1.
    let mut snaps = Vec::new();
    for round in 0..8u64 {
        match admin
            .request(ClientMsg::CreateSnapshot {
                name: format!("r{round}"),
                token: 0,
            })
            .await
            .unwrap()
        {
            ServerMsg::SnapshotCreated { info } => snaps.push(info.id),
            other => panic!("create r{round}: {other:?}\n{}", proc.stderr()),
        }
        for c in 0..250 {
            origin
                .origin_write(&origin_file, c, &pattern(CHUNK as usize, c, round + 1))
                .await
                .unwrap_or_else(|e| panic!("round {round} chunk {c}: {e}\n{}", proc.stderr()));
        }
    }
    let snapshots = list(&admin).await;
    let invalid: Vec<SnapId> = snapshots
        .iter()
        .filter(|s| matches!(&s.state, SnapshotState::Invalid { reason } if reason.contains("metadata")))
        .map(|s| s.id)
        .collect();
    assert!(!invalid.is_empty(), "{snapshots:?}");
    assert_eq!(invalid, snaps[..invalid.len()].to_vec(), "oldest first");
    let st = status(&admin).await;
    assert_eq!(st.metadata_blocks, 40);
    assert!(
        st.space_warnings
            .iter()
            .any(|w| w.area == StoreArea::Metadata && w.level_percent == 20),
        "{st:?}"
    );
    let log = proc.stderr();
    assert!(
        log.contains("SNAPSHOT STORE FULL (the metadata area is full)"),
        "{log}"
    );
    assert!(
        log.contains("SNAPSHOT STORE FILLING: metadata area"),
        "{log}"
    );
    let newest = *snaps.last().unwrap();
    let reader = Client::connect(
        &addr,
        &fx.key,
        READER,
        ClientKind::Snapshot { snap: newest },
    )
    .await;
    let seen = reader
        .read_snapshot(newest, ChunkRange::new(5, 1), &fx.origin, &fx.store)
        .await
        .unwrap();
    assert!(
        seen == pattern(CHUNK as usize, 5, 7),
        "snapshot r7 must see version 7"
    );
    drop((origin, admin, reader));

    // A crash, and a new server on the same store: it replays the journal and serves on.
    proc.kill9();
    let mut proc = ServerProcess::spawn(&fx, &addr, &["--warn-metadata", "20"], "restart.log");
    proc.wait_listening().await;
    let origin = Client::connect(&addr, &fx.key, ORIGIN, ClientKind::Origin).await;
    let admin = Client::connect(&addr, &fx.key, ADMIN, ClientKind::Admin).await;
    for c in (0..50).chain(250..350) {
        origin
            .origin_write(&origin_file, c, &pattern(CHUNK as usize, c, 20))
            .await
            .unwrap_or_else(|e| panic!("after restart, chunk {c}: {e}\n{}", proc.stderr()));
    }
    let reader = Client::connect(
        &addr,
        &fx.key,
        READER,
        ClientKind::Snapshot { snap: newest },
    )
    .await;
    for c in [5, 300] {
        let seen = reader
            .read_snapshot(newest, ChunkRange::new(c, 1), &fx.origin, &fx.store)
            .await
            .unwrap();
        let version = if c < 250 { 7 } else { 0 };
        assert!(
            seen == pattern(CHUNK as usize, c, version),
            "chunk {c} of snapshot r7 after the restart"
        );
    }
    assert!(status(&admin).await.active);
    drop((origin, admin, reader));
    let exit = proc.terminate();
    assert!(exit.success(), "{}", proc.stderr());
    assert!(proc.stderr().contains("UNCLEAN SHUTDOWN"));
    let report = fx.check_store();
    assert!(report.is_clean(), "{:?}", report.problems);
}
