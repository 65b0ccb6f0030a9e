//! The client library against the real server, in one process: concurrent origin writers,
//! snapshots created while they run, and the server restarted in the middle. Checks
//! invariant 1 (a snapshot shows, for every chunk, a version written no earlier than the
//! last write finished before the snapshot was requested and no later than the last write
//! started before it was acknowledged), that every acknowledged write is on the origin, and
//! that snapshot writes touch only their snapshot.

use crate::support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use csnap_blockdev::client::{client_id_for, ClientConfig, Volume};
use csnap_proto::{ClientId, ClientKind, SnapId};
use rand::{Rng, SeedableRng};
use support::{seed, start_server, Fixture, WAIT};

const CHUNK: u64 = 4096;
const CHUNKS: u64 = 128;
const WRITERS: u64 = 4;
const BASE: u64 = 1 << 32;

/// A chunk's contents name the chunk and the version written.
fn chunk_data(chunk: u64, version: u64) -> Bytes {
    let mut b = vec![0u8; CHUNK as usize];
    for (i, word) in b.chunks_mut(16).enumerate() {
        word[..8].copy_from_slice(&chunk.to_le_bytes());
        word[8..].copy_from_slice(&(version ^ i as u64).to_le_bytes());
    }
    Bytes::from(b)
}

/// The version a chunk's contents carry; panics on torn or foreign data.
fn version_of(chunk: u64, data: &[u8], what: &str) -> u64 {
    let v = u64::from_le_bytes(data[8..16].try_into().unwrap());
    assert_eq!(
        &chunk_data(chunk, v)[..],
        data,
        "{what}: chunk {chunk} holds torn or foreign data"
    );
    v
}

/// One write to a chunk: logical clock when it started and when it was acknowledged.
#[derive(Clone, Copy, Debug)]
struct WriteRecord {
    version: u64,
    started: u64,
    acked: u64,
}

struct Snap {
    id: SnapId,
    requested: u64,
    acked: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_taken_under_concurrent_writes_and_a_server_restart_keep_their_view() {
    let seed = seed("snapshots_taken_under_concurrent_writes_and_a_server_restart");
    let fx = Fixture::new(CHUNK, CHUNK * CHUNKS, 16 << 20);
    // Version 0 everywhere to start with.
    let origin = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.origin)
        .unwrap();
    for c in 0..CHUNKS {
        std::os::unix::fs::FileExt::write_all_at(&origin, &chunk_data(c, 0), c * CHUNK).unwrap();
    }
    let sock = fx.path("server.sock");
    let mut server = Some(start_server(&fx, &sock, Vec::new()).await);
    let key = std::fs::read(&fx.key_file).unwrap();
    let volume = Volume::connect(ClientConfig {
        server: csnap_proto::ListenAddr::Unix(sock.clone()).into(),
        key,
        instance: BASE,
        node: 1,
        origin: fx.origin.clone(),
        store: fx.store.clone(),
        connect_timeout: WAIT,
        cache_chunks: 1 << 16,
        direct_io: false,
    })
    .await
    .expect("client connects");

    let clock = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let history: Arc<Mutex<Vec<Vec<WriteRecord>>>> = Arc::new(Mutex::new(
        (0..CHUNKS)
            .map(|_| {
                vec![WriteRecord {
                    version: 0,
                    started: 0,
                    acked: 0,
                }]
            })
            .collect(),
    ));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (volume, clock, stop, history) =
            (volume.clone(), clock.clone(), stop.clone(), history.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ w);
            let mut version = 0;
            let mut writes = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // Writer w owns the chunks c with c % WRITERS == w: per chunk, writes are
                // sequential, so "the last write before" is well defined.
                let chunk = rng.gen_range(0..CHUNKS / WRITERS) * WRITERS + w;
                version += 1;
                let v = (w << 48) | version;
                let started = clock.fetch_add(1, Ordering::SeqCst);
                tokio::time::timeout(
                    WAIT,
                    volume.write_origin(chunk * CHUNK, chunk_data(chunk, v), false),
                )
                .await
                .expect("origin write finished in time")
                .expect("origin write");
                let acked = clock.fetch_add(1, Ordering::SeqCst);
                history.lock().unwrap()[chunk as usize].push(WriteRecord {
                    version: v,
                    started,
                    acked,
                });
                writes += 1;
            }
            writes
        }));
    }

    // A reader reads the snapshots created so far while the writers run (origin-locked
    // chunks, four-message protocol, across the restart) and remembers what it saw.
    let created: Arc<Mutex<Vec<SnapId>>> = Arc::new(Mutex::new(Vec::new()));
    let read_from: Arc<Mutex<std::collections::BTreeSet<SnapId>>> = Arc::default();
    let reader = {
        let (volume, stop, created, read_from) = (
            volume.clone(),
            stop.clone(),
            created.clone(),
            read_from.clone(),
        );
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xabc);
            let mut seen: Vec<(SnapId, u64, u64)> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let snap = {
                    let list = created.lock().unwrap();
                    if list.is_empty() {
                        None
                    } else {
                        Some(list[rng.gen_range(0..list.len())])
                    }
                };
                let Some(snap) = snap else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                read_from.lock().unwrap().insert(snap);
                let first = rng.gen_range(0..CHUNKS - 8);
                let data = tokio::time::timeout(
                    WAIT,
                    volume.read_snapshot(snap, first * CHUNK, (8 * CHUNK) as u32),
                )
                .await
                .expect("snapshot read finished in time")
                .expect("snapshot read");
                for i in 0..8 {
                    let c = first + i;
                    let chunk = &data[(i * CHUNK) as usize..((i + 1) * CHUNK) as usize];
                    seen.push((
                        snap,
                        c,
                        version_of(c, chunk, "snapshot read during the run"),
                    ));
                }
            }
            seen
        })
    };

    let mut snaps = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let restart_at = rng.gen_range(2..6);
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..80))).await;
        if i == restart_at {
            // Crash-like: drop the server without a clean shutdown, then start a new one on
            // the same store while the writers keep going.
            eprintln!("restarting the server before snapshot {i}");
            drop(server.take());
            tokio::time::sleep(Duration::from_millis(50)).await;
            let expected: Vec<ClientId> = read_from
                .lock()
                .unwrap()
                .iter()
                .map(|&snap| client_id_for(BASE, ClientKind::Snapshot { snap }))
                .collect();
            server = Some(start_server(&fx, &sock, expected).await);
        }
        let requested = clock.fetch_add(1, Ordering::SeqCst);
        let info = tokio::time::timeout(WAIT, volume.create_snapshot(&format!("s{i}")))
            .await
            .expect("snapshot created in time")
            .expect("snapshot created");
        let acked = clock.fetch_add(1, Ordering::SeqCst);
        snaps.push(Snap {
            id: info.id,
            requested,
            acked,
        });
        created.lock().unwrap().push(info.id);
    }
    stop.store(true, Ordering::SeqCst);
    let seen_during_run = tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    let mut total = 0;
    for w in writers {
        total += tokio::time::timeout(WAIT, w).await.unwrap().unwrap();
    }
    eprintln!("{total} origin writes, {} snapshots", snaps.len());
    assert!(total > 100, "the writers did work ({total} writes)");

    let history = history.lock().unwrap().clone();
    // Every acknowledged write is on the origin (the last one per chunk).
    for c in 0..CHUNKS {
        let data = volume.read_origin(c * CHUNK, CHUNK as u32).await.unwrap();
        let last = history[c as usize].last().unwrap().version;
        assert_eq!(
            version_of(c, &data, "origin"),
            last,
            "origin chunk {c} (seed {seed})"
        );
    }
    // Every snapshot shows a version the invariant allows, for every chunk.
    for s in &snaps {
        let data =
            tokio::time::timeout(WAIT, volume.read_snapshot(s.id, 0, (CHUNK * CHUNKS) as u32))
                .await
                .unwrap()
                .unwrap();
        for c in 0..CHUNKS {
            let what = format!("snapshot {}", s.id);
            let seen = version_of(
                c,
                &data[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize],
                &what,
            );
            let writes = &history[c as usize];
            let floor = writes
                .iter()
                .rev()
                .find(|w| w.acked < s.requested)
                .map_or(0, |w| w.version);
            let allowed: Vec<u64> = writes
                .iter()
                .filter(|w| w.started < s.acked)
                .map(|w| w.version)
                .skip_while(|&v| v != floor)
                .collect();
            assert!(
                allowed.contains(&seen),
                "snapshot {} chunk {c}: saw version {seen:#x}, allowed {allowed:x?} (seed {seed})",
                s.id
            );
        }
    }

    // What the reader saw while the origin was being written is what the snapshots hold.
    assert!(
        !seen_during_run.is_empty(),
        "the reader read snapshots during the run"
    );
    for &(snap, c, v) in &seen_during_run {
        let data = volume
            .read_snapshot(snap, c * CHUNK, CHUNK as u32)
            .await
            .unwrap();
        assert_eq!(
            version_of(c, &data, "final snapshot read"),
            v,
            "snapshot {snap} chunk {c} read differently during the run (seed {seed})"
        );
    }
    eprintln!(
        "{} snapshot chunk reads during the run",
        seen_during_run.len()
    );

    // A snapshot write changes that snapshot only.
    let target = snaps[0].id;
    let before_other = volume
        .read_snapshot(snaps[1].id, 0, (CHUNK * 4) as u32)
        .await
        .unwrap();
    let before_origin = volume.read_origin(0, (CHUNK * 4) as u32).await.unwrap();
    let mark = Bytes::from(vec![0xe7u8; (CHUNK + 100) as usize]);
    volume
        .write_snapshot(target, 1000, mark.clone(), true)
        .await
        .unwrap();
    let back = volume
        .read_snapshot(target, 1000, mark.len() as u32)
        .await
        .unwrap();
    assert_eq!(back, mark, "snapshot write reads back");
    assert_eq!(
        volume
            .read_snapshot(snaps[1].id, 0, (CHUNK * 4) as u32)
            .await
            .unwrap(),
        before_other
    );
    assert_eq!(
        volume.read_origin(0, (CHUNK * 4) as u32).await.unwrap(),
        before_origin
    );

    let stats = volume.cache_stats();
    eprintln!(
        "cache: {stats:?}, origin sessions {}",
        volume.origin_sessions()
    );
    assert!(
        volume.origin_sessions() >= 2,
        "the client reconnected after the restart"
    );
    assert!(stats.hits > 0, "the unique-chunk cache served writes");
    volume.shutdown().await;
    if let Some(s) = server {
        s.shutdown().await.expect("clean shutdown");
    }
}

/// Issue 8, finding 1, end to end: two origin clients (each with its own connection and
/// unique-chunk cache) write in a causal chain, B then A, round after round, while
/// snapshots are created. A snapshot must never hold A's write of round k without B's
/// write of round k (B's finished before A's began): a state no crash could produce. The
/// engine test `no_origin_write_is_granted_between_the_announcement_and_the_last_ack`
/// shows the interleaving deterministically; this checks the whole stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_origin_clients_in_a_causal_chain_never_split_a_snapshot() {
    let fx = Fixture::new(CHUNK, CHUNK * 8, 16 << 20);
    let origin = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.origin)
        .unwrap();
    for c in 0..8 {
        std::os::unix::fs::FileExt::write_all_at(&origin, &chunk_data(c, 0), c * CHUNK).unwrap();
    }
    let sock = fx.path("server.sock");
    let server = start_server(&fx, &sock, Vec::new()).await;
    let key = std::fs::read(&fx.key_file).unwrap();
    let connect = |base: u64, node: u32| {
        Volume::connect(ClientConfig {
            server: csnap_proto::ListenAddr::Unix(sock.clone()).into(),
            key: key.clone(),
            instance: base,
            node,
            origin: fx.origin.clone(),
            store: fx.store.clone(),
            connect_timeout: WAIT,
            cache_chunks: 1 << 10,
            direct_io: false,
        })
    };
    let a = connect(BASE, 1).await.expect("client A connects");
    let b = connect(BASE + 1, 2).await.expect("client B connects");
    let stop = Arc::new(AtomicBool::new(false));
    let chain = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                for (volume, chunk) in [(&b, 1u64), (&a, 0u64)] {
                    tokio::time::timeout(
                        WAIT,
                        volume.write_origin(chunk * CHUNK, chunk_data(chunk, round), false),
                    )
                    .await
                    .expect("origin write finished in time")
                    .expect("origin write");
                }
            }
            round
        })
    };
    let mut snaps = Vec::new();
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let info = tokio::time::timeout(WAIT, a.create_snapshot(&format!("c{i}")))
            .await
            .expect("snapshot created in time")
            .expect("snapshot created");
        snaps.push(info.id);
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = tokio::time::timeout(WAIT, chain).await.unwrap().unwrap();
    assert!(rounds > 40, "the chain ran ({rounds} rounds)");
    for snap in snaps {
        let data = a.read_snapshot(snap, 0, (2 * CHUNK) as u32).await.unwrap();
        let in_a = version_of(0, &data[..CHUNK as usize], "snapshot chunk 0");
        let in_b = version_of(1, &data[CHUNK as usize..], "snapshot chunk 1");
        assert!(
            in_a <= in_b,
            "snapshot {snap} holds A's write of round {in_a} but only B's write of round {in_b}, which finished before it"
        );
    }
    assert!(a.cache_stats().hits > 0, "A wrote through its cache");
    a.shutdown().await;
    b.shutdown().await;
    server.shutdown().await.expect("clean shutdown");
}

/// Store reads are released (issue 8, finding 9): the client library tells the server when
/// it is done with the store addresses of a snapshot read, so deleting the snapshot after
/// reads from the store gives its space back; an unreleased read would hold the reclaim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_snapshot_after_store_reads_gives_its_space_back() {
    let fx = Fixture::new(CHUNK, CHUNK * 16, 16 << 20);
    let origin = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.origin)
        .unwrap();
    for c in 0..16 {
        std::os::unix::fs::FileExt::write_all_at(&origin, &chunk_data(c, 0), c * CHUNK).unwrap();
    }
    let sock = fx.path("server.sock");
    let server = start_server(&fx, &sock, Vec::new()).await;
    let volume = Volume::connect(ClientConfig {
        server: csnap_proto::ListenAddr::Unix(sock.clone()).into(),
        key: std::fs::read(&fx.key_file).unwrap(),
        instance: BASE,
        node: 1,
        origin: fx.origin.clone(),
        store: fx.store.clone(),
        connect_timeout: WAIT,
        cache_chunks: 1 << 10,
        direct_io: false,
    })
    .await
    .expect("client connects");
    let free_at_start = volume.status().await.unwrap().free_chunks;
    let snap = volume.create_snapshot("read-then-delete").await.unwrap();
    for c in 0..16 {
        volume
            .write_origin(c * CHUNK, chunk_data(c, 1), false)
            .await
            .unwrap();
    }
    let free_with_copies = volume.status().await.unwrap().free_chunks;
    assert_eq!(free_with_copies + 16, free_at_start, "16 chunks copied out");
    for _ in 0..3 {
        let data = volume
            .read_snapshot(snap.id, 0, (16 * CHUNK) as u32)
            .await
            .unwrap();
        assert_eq!(
            version_of(
                5,
                &data[(5 * CHUNK) as usize..(6 * CHUNK) as usize],
                "snapshot"
            ),
            0
        );
    }
    volume
        .delete_snapshot(csnap_proto::SnapRef::Id(snap.id))
        .await
        .unwrap();
    // Well under the server's grace for a lost client's leases (which would free them
    // without any release): only the releases can make this in time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let free = volume.status().await.unwrap().free_chunks;
        if free == free_at_start {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deleted snapshot's 16 chunks did not come back ({free} free, {free_at_start} at start)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    volume.shutdown().await;
    server.shutdown().await.expect("clean shutdown");
}
