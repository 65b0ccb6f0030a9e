//! `csnapctl check`: a good store is consistent (exit 0) and left byte for byte unchanged,
//! even when it was not shut down cleanly; a damaged one exits 1 naming the damage; a
//! mismatched origin is a finding; a store a server holds is refused (exit 2).

use crate::support;

use std::sync::Arc;

use csnap_proto::ListenAddr;
use csnap_server::net::{self, ServerConfig};
use csnap_server::store::format::BLOCK;
use csnap_server::store::{read_superblock, BlockDevice, FileDevice, OpenOptions, Store};
use support::{read_file, run, Fixture, Ran, WAIT};

async fn check(args: &[&str]) -> (Option<i32>, Ran) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_csnapctl"))
        .arg("check")
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out).await.unwrap().unwrap();
    let ran = Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    (out.status.code(), ran)
}

/// Snapshots and copy-outs, so the check has records to verify; left as after a crash
/// (not closed: a journal to replay).
fn populate(fx: &Fixture) {
    let dev = Arc::new(FileDevice::open(&fx.store, false).unwrap());
    let mut store = Store::open(dev, OpenOptions::default()).unwrap();
    for round in 0..3u64 {
        store
            .create_snapshot(&format!("s{round}"), 1_700_000_000)
            .unwrap();
        for chunk in (round..64).step_by(3) {
            // The store calls the engine makes for a copy-out (room is plenty here).
            if store.oldest_sharing_origin(chunk).unwrap().is_some() {
                let at = store.reserve_chunk().unwrap();
                store.record_copy_out(chunk, at).unwrap();
            }
        }
        store.commit().unwrap();
    }
    drop(store);
}

#[tokio::test]
async fn check_reports_good_damaged_and_busy_stores() {
    let fx = Fixture::new(4096, 1 << 20, 16 << 20);
    populate(&fx);
    let store = fx.store.to_str().unwrap();
    let origin = fx.origin.to_str().unwrap();

    // Good (and unclean): consistent, and the check changed nothing on disk.
    let before = read_file(&fx.store);
    let (code, out) = check(&["--store", store, "--origin", origin]).await;
    assert_eq!(code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("consistent"), "{}", out.stdout);
    assert!(out.stdout.contains("3 snapshots"), "{}", out.stdout);
    assert!(
        out.stdout.contains("not shut down cleanly"),
        "{}",
        out.stdout
    );
    assert!(read_file(&fx.store) == before, "check modified the store");

    // An origin of another size is a finding.
    let other = fx.path("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let (code, out) = check(&["--store", store, "--origin", other.to_str().unwrap()]).await;
    assert_eq!(code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("formatted for a 1048576-byte origin"),
        "{}",
        out.stdout
    );

    // A server holds the store: refused, exit 2.
    let mut cfg = ServerConfig::new(
        &fx.origin,
        &fx.store,
        ListenAddr::Unix(fx.path("server.sock")),
        &fx.key_file,
    );
    cfg.direct_io = false;
    let server = tokio::time::timeout(WAIT, net::start(cfg))
        .await
        .unwrap()
        .unwrap();
    let (code, out) = check(&["--store", store]).await;
    assert_eq!(code, Some(2), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("in use"), "{}", out.stderr);
    server.shutdown().await.unwrap();

    // Damaged: garbage in the middle of the exception tree's root node.
    let dev = FileDevice::open(&fx.store, false).unwrap();
    let root = read_superblock(&dev).unwrap().root.exception_root;
    dev.write_at(&[0xab; 64], root * BLOCK as u64 + 1024)
        .unwrap();
    dev.flush().unwrap();
    let (code, out) = check(&["--store", store]).await;
    assert_eq!(code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("DAMAGED") || out.stdout.contains("PROBLEMS"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("consistent"), "{}", out.stdout);

    // A missing store is an error, not a pass.
    let r = run(
        env!("CARGO_BIN_EXE_csnapctl"),
        &["check", "--store", fx.path("nope").to_str().unwrap()],
    )
    .await;
    assert!(!r.ok);
}
