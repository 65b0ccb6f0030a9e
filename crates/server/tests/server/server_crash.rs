//! Crash consistency with the real process: the csnap-server binary under a load of origin
//! writes (the test client writes the origin itself after each grant, as a real client does)
//! and snapshot creates/deletes, SIGKILLed at a random moment, restarted, and checked:
//!
//! * invariant 1: every acknowledged snapshot reads exactly as at its creation, changed only
//!   by the acknowledged snapshot writes to it (the client writes the store chunk the server
//!   names, as a real snapshot client does);
//! * invariant 2: every acknowledged origin write is in the origin;
//! * invariant 5: the crashed store passes the consistency checker.
//!
//! Seeded (printed; replay with CSNAP_SEED): the seed fixes every operation and every kill
//! delay; thread timing can still move the exact kill point. CSNAP_CRASH_ITERATIONS sets
//! the number of kill/restart rounds (default 30).

use crate::server_support;

use csnap_proto::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use server_support::*;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ORIGIN_CHUNKS: u64 = 128;
const CHUNK: u64 = 4096;
const MAX_SNAPSHOTS: usize = 6;

#[derive(Clone, Default)]
struct Model {
    /// Version of each origin chunk's contents (see `pattern`).
    origin: Vec<u64>,
    /// Acknowledged live snapshots: id -> (name, origin versions at creation).
    snaps: BTreeMap<SnapId, (String, Vec<u64>)>,
    /// A create sent but not answered when the server died: (name, versions then).
    create_in_doubt: Option<(String, Vec<u64>)>,
    /// A delete sent but not answered.
    delete_in_doubt: Option<SnapId>,
    acknowledged_writes: u64,
    acknowledged_snapshot_writes: u64,
    next_version: u64,
    next_name: u64,
}

/// One workload round: random operations until the connection dies.
/// A snapshot write as a snapshot client does it: ask where, write the data there itself,
/// then release the write lease. The model changes once the data is written.
async fn snapshot_write(
    client: &Client,
    snap: SnapId,
    store: &std::path::Path,
    model: &Mutex<Model>,
    rng: &mut StdRng,
) -> Result<(), String> {
    let chunk = rng.gen_range(0..ORIGIN_CHUNKS);
    let ranges = vec![ChunkRange::new(chunk, 1)];
    let reply = client
        .request(ClientMsg::SnapshotWrite {
            snap,
            ranges: ranges.clone(),
        })
        .await?;
    let ServerMsg::SnapshotWriteOk { addrs } = reply else {
        panic!("snapshot write to {snap} chunk {chunk}: {reply:?}");
    };
    assert_eq!(addrs.len(), 1);
    assert_eq!(addrs[0].chunk, chunk);
    let version = {
        let mut m = model.lock().unwrap();
        m.next_version += 1;
        m.next_version
    };
    let file = std::fs::OpenOptions::new().write(true).open(store).unwrap();
    file.write_all_at(
        &pattern(CHUNK as usize, chunk, version),
        addrs[0].store_chunk * CHUNK,
    )
    .unwrap();
    {
        let mut m = model.lock().unwrap();
        if let Some((_, view)) = m.snaps.get_mut(&snap) {
            view[chunk as usize] = version;
        }
        m.acknowledged_snapshot_writes += 1;
    }
    match client
        .request(ClientMsg::FinishSnapshotWrite { snap, ranges })
        .await?
    {
        ServerMsg::FinishSnapshotWriteOk => Ok(()),
        other => panic!("FinishSnapshotWrite: {other:?}"),
    }
}

async fn workload(
    fx_origin: std::path::PathBuf,
    fx_store: std::path::PathBuf,
    addr: csnap_proto::ListenAddr,
    key: Vec<u8>,
    model: Arc<Mutex<Model>>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let origin_file = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx_origin)
        .unwrap();
    let Ok(io) = connect_raw(&addr).await else {
        return;
    };
    let Ok(origin) = Client::handshake(
        io,
        &key,
        Hello {
            client: 0x0A,
            kind: ClientKind::Origin,
            resuming: false,
        },
    )
    .await
    else {
        return;
    };
    let Ok(io) = connect_raw(&addr).await else {
        return;
    };
    let Ok(admin) = Client::handshake(
        io,
        &key,
        Hello {
            client: 0xAD,
            kind: ClientKind::Admin,
            resuming: false,
        },
    )
    .await
    else {
        return;
    };
    let mut snap_clients: HashMap<SnapId, Client> = HashMap::new();
    loop {
        let roll = rng.gen_range(0..100);
        let target = {
            let m = model.lock().unwrap();
            let ids: Vec<SnapId> = m.snaps.keys().copied().collect();
            (!ids.is_empty()).then(|| ids[rng.gen_range(0..ids.len())])
        };
        if let (true, Some(snap)) = (roll < 15, target) {
            let client = match snap_clients.entry(snap) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let Ok(io) = connect_raw(&addr).await else {
                        return;
                    };
                    let hello = Hello {
                        client: 0x5000 + snap.0,
                        kind: ClientKind::Snapshot { snap },
                        resuming: false,
                    };
                    let Ok(c) = Client::handshake(io, &key, hello).await else {
                        return;
                    };
                    e.insert(c)
                }
            };
            if snapshot_write(client, snap, &fx_store, &model, &mut rng)
                .await
                .is_err()
            {
                return;
            }
        } else if roll < 80 {
            let chunk = rng.gen_range(0..ORIGIN_CHUNKS);
            let version = {
                let mut m = model.lock().unwrap();
                m.next_version += 1;
                m.next_version
            };
            let data = pattern(CHUNK as usize, chunk, version);
            if origin
                .origin_write(&origin_file, chunk, &data)
                .await
                .is_err()
            {
                return;
            }
            let mut m = model.lock().unwrap();
            m.origin[chunk as usize] = version;
            m.acknowledged_writes += 1;
        } else if roll < 92 || model.lock().unwrap().snaps.len() < 2 {
            let (name, view) = {
                let mut m = model.lock().unwrap();
                m.next_name += 1;
                let name = format!("s{}", m.next_name);
                m.create_in_doubt = Some((name.clone(), m.origin.clone()));
                (name, m.origin.clone())
            };
            match admin
                .request(ClientMsg::CreateSnapshot {
                    name: name.clone(),
                    token: 0,
                })
                .await
            {
                Ok(ServerMsg::SnapshotCreated { info }) => {
                    assert_eq!(info.name, name);
                    let mut m = model.lock().unwrap();
                    m.create_in_doubt = None;
                    m.snaps.insert(info.id, (name, view));
                }
                Ok(other) => panic!("create {name}: {other:?}"),
                Err(_) => return,
            }
        } else {
            let victim = {
                let m = model.lock().unwrap();
                if m.snaps.len() <= MAX_SNAPSHOTS / 2 {
                    continue;
                }
                let keys: Vec<SnapId> = m.snaps.keys().copied().collect();
                keys[rng.gen_range(0..keys.len())]
            };
            model.lock().unwrap().delete_in_doubt = Some(victim);
            match admin
                .request(ClientMsg::DeleteSnapshot { snap: victim })
                .await
            {
                Ok(ServerMsg::SnapshotDeleted { snap }) => {
                    assert_eq!(snap, victim);
                    let mut m = model.lock().unwrap();
                    m.delete_in_doubt = None;
                    m.snaps.remove(&victim);
                    snap_clients.remove(&victim);
                }
                Ok(other) => panic!("delete {victim}: {other:?}"),
                Err(_) => return,
            }
        }
        // Keep the snapshot count bounded so the store never fills.
        if model.lock().unwrap().snaps.len() > MAX_SNAPSHOTS {
            let oldest = *model.lock().unwrap().snaps.keys().next().unwrap();
            model.lock().unwrap().delete_in_doubt = Some(oldest);
            match admin
                .request(ClientMsg::DeleteSnapshot { snap: oldest })
                .await
            {
                Ok(ServerMsg::SnapshotDeleted { .. }) => {
                    let mut m = model.lock().unwrap();
                    m.delete_in_doubt = None;
                    m.snaps.remove(&oldest);
                    snap_clients.remove(&oldest);
                }
                Ok(other) => panic!("delete {oldest}: {other:?}"),
                Err(_) => return,
            }
        }
    }
}

fn expected_bytes(versions: &[u64]) -> Vec<u8> {
    versions
        .iter()
        .enumerate()
        .flat_map(|(c, v)| pattern(CHUNK as usize, c as u64, *v))
        .collect()
}

/// After a restart: resolve the operations in doubt, then check every snapshot and the
/// origin against the model.
async fn verify(fx: &Fixture, addr: &csnap_proto::ListenAddr, model: &mut Model, round: usize) {
    let admin = Client::connect(addr, &fx.key, 0xAD, ClientKind::Admin).await;
    let listed = match admin
        .request(ClientMsg::ListSnapshots {
            after: None,
            limit: u32::MAX,
        })
        .await
        .unwrap()
    {
        ServerMsg::SnapshotList { snapshots, .. } => snapshots,
        other => panic!("list: {other:?}"),
    };
    if let Some(id) = model.delete_in_doubt.take() {
        if !listed.iter().any(|s| s.id == id) {
            model.snaps.remove(&id);
        }
    }
    if let Some((name, view)) = model.create_in_doubt.take() {
        if let Some(s) = listed.iter().find(|s| s.name == name) {
            model.snaps.insert(s.id, (name, view));
        }
    }
    let listed_ids: Vec<SnapId> = listed.iter().map(|s| s.id).collect();
    let model_ids: Vec<SnapId> = model.snaps.keys().copied().collect();
    assert_eq!(
        listed_ids, model_ids,
        "round {round}: the server lists exactly the acknowledged snapshots"
    );
    for s in &listed {
        assert_eq!(
            s.state,
            SnapshotState::Live,
            "round {round}: snapshot {} invalidated",
            s.id
        );
    }
    for (id, (name, view)) in &model.snaps {
        let reader = Client::connect(
            addr,
            &fx.key,
            0x5000 + id.0,
            ClientKind::Snapshot { snap: *id },
        )
        .await;
        let got = reader
            .read_snapshot(
                *id,
                ChunkRange::new(0, ORIGIN_CHUNKS as u32),
                &fx.origin,
                &fx.store,
            )
            .await
            .unwrap();
        let want = expected_bytes(view);
        if got != want {
            let bad: Vec<usize> = (0..ORIGIN_CHUNKS as usize)
                .filter(|c| {
                    let r = c * CHUNK as usize..(c + 1) * CHUNK as usize;
                    got[r.clone()] != want[r]
                })
                .collect();
            panic!("round {round}: snapshot {id} ({name}) changed after creation in chunks {bad:?} (invariant 1)");
        }
    }
    let origin_now = read_at(&fx.origin, 0, (ORIGIN_CHUNKS * CHUNK) as usize);
    assert!(
        origin_now == expected_bytes(&model.origin),
        "round {round}: an acknowledged origin write was lost (invariant 2)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_keeps_snapshots_writes_and_the_store_consistent() {
    let seed = seed("sigkill_under_load_keeps_snapshots_writes_and_the_store_consistent");
    let rounds: usize = std::env::var("CSNAP_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut rng = StdRng::seed_from_u64(seed);
    let fx = Fixture::new(CHUNK, ORIGIN_CHUNKS, 16 << 20);
    let addr = fx.unix_addr("crash.sock");
    let model = Arc::new(Mutex::new(Model {
        origin: vec![0; ORIGIN_CHUNKS as usize],
        ..Model::default()
    }));
    let crashed_copy = fx.dir.path().join("crashed-store");
    let started = std::time::Instant::now();
    let mut total_writes = 0;
    let mut total_snapshot_writes = 0;

    for round in 0..rounds {
        let mut proc = ServerProcess::spawn(&fx, &addr, &[], &format!("round{round}.log"));
        proc.wait_listening().await;
        if round > 0 {
            let mut m = model.lock().unwrap().clone();
            verify(&fx, &addr, &mut m, round).await;
            *model.lock().unwrap() = m;
            let log = proc.stderr();
            assert!(
                log.contains("UNCLEAN SHUTDOWN"),
                "round {round}: the restarted server reports the crash:\n{log}"
            );
        }

        let kill_after = Duration::from_millis(rng.gen_range(5..150));
        let load = tokio::spawn(workload(
            fx.origin.clone(),
            fx.store.clone(),
            addr.clone(),
            fx.key.clone(),
            model.clone(),
            rng.gen(),
        ));
        tokio::time::sleep(kill_after).await;
        proc.kill9();
        match tokio::time::timeout(WAIT, load).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!("round {round}: the workload did not notice the dead server"),
        }
        total_writes = model.lock().unwrap().acknowledged_writes;
        total_snapshot_writes = model.lock().unwrap().acknowledged_snapshot_writes;

        // Invariant 5 on a copy of the crashed store (the next server recovers the original).
        std::fs::copy(&fx.store, &crashed_copy).unwrap();
        let dev = Arc::new(csnap_server::store::FileDevice::open(&crashed_copy, false).unwrap());
        let mut store = csnap_server::store::Store::open(dev, Default::default())
            .unwrap_or_else(|e| panic!("round {round}: crashed store does not open: {e}"));
        assert!(
            store.was_unclean(),
            "round {round}: SIGKILL leaves the store unclean; the server's log:\n{}",
            proc.stderr()
        );
        let report = store.check().unwrap();
        assert!(
            report.is_clean(),
            "round {round}: store inconsistent after SIGKILL: {:?}",
            report.problems
        );
    }

    // Last restart, verification, clean shutdown, and a clean store.
    let mut proc = ServerProcess::spawn(&fx, &addr, &[], "final.log");
    proc.wait_listening().await;
    let mut m = model.lock().unwrap().clone();
    verify(&fx, &addr, &mut m, rounds).await;
    let status = proc.terminate();
    assert!(status.success(), "{}", proc.stderr());
    let report = fx.check_store();
    assert!(report.is_clean(), "{:?}", report.problems);
    eprintln!(
        "{rounds} SIGKILL rounds, {total_writes} acknowledged origin writes, {total_snapshot_writes} snapshot writes, {} snapshots at the end, {:?}",
        m.snaps.len(),
        started.elapsed()
    );
    assert!(
        total_writes > 0 && total_snapshot_writes > 0,
        "the workload made progress"
    );
}
