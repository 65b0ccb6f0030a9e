//! Online rollback in the engine, against a reference model (docs/architecture.md "Online
//! rollback").
//!
//! A seeded run: random origin writes (whole or half chunks) and reads by one origin
//! client that follows the protocol (acknowledges `NewSnapshot`/`RollbackStarting` at
//! once, asks with `QueryOriginRead` while a rollback runs), snapshot creations and
//! deletions, snapshot reads through read locks held over several steps, rollbacks to a
//! random snapshot, copies and commits finishing in random order, and server crashes
//! (failover onto the recovered store) in the middle of a copy-back. Checked at every
//! step: every origin read equals the reference origin (the rollback's source from the
//! moment the pin exists, plus the writes made since), every snapshot read equals the
//! snapshot as created (so the copy-back never changes another snapshot, the pin included),
//! refused requests name the rollback; at the end, after the rollback finished: the origin
//! device equals the reference, every live snapshot equals its model, the store is
//! consistent.
//!
//! Seeds: CSNAP_SEED=<n> replays one case; otherwise a random seed is printed.

use crate::engine_common;

use csnap_proto::*;
use csnap_server::engine::*;
use engine_common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

const CHUNKS: u64 = 48;

/// A small copy-back window, so the scan is still on its way while writes come.
fn rollback_config() -> EngineConfig {
    EngineConfig {
        rollback_window: 2,
        ..config()
    }
}

struct Run<S: TestStore> {
    rng: StdRng,
    h: Harness<S>,
    origin: ConnId,
    admin: ConnId,
    /// Asks before origin reads (a rollback runs, as the client was told).
    asking: bool,
    writes: BTreeMap<RequestId, (u64, usize, u64)>,
    /// The origin as its users must see it.
    reference: Vec<Data>,
    /// Every live snapshot's contents.
    snaps: BTreeMap<SnapId, Vec<Data>>,
    /// A snapshot read holding an origin read lock: (client conn, snapshot, chunk).
    locked_reads: Vec<(ConnId, SnapId, u64)>,
    /// Rollback requested (source), pin not yet created.
    requested: Option<SnapId>,
    /// The rollback running: (source, pin).
    running: Option<(SnapId, SnapId)>,
    rollback_reply: Option<RequestId>,
    next_value: u64,
    next_name: u64,
    next_client: u64,
    rollbacks_done: u32,
    trace: bool,
}

impl<S: TestStore> Run<S> {
    fn new(seed: u64, store: S) -> Run<S> {
        let mut h = Harness::with_store(rollback_config(), store);
        let origin = h.connect(1, ClientKind::Origin, false);
        let admin = h.admin();
        Run {
            rng: StdRng::seed_from_u64(seed),
            h,
            origin,
            admin,
            asking: false,
            writes: BTreeMap::new(),
            reference: vec![[0, 0]; CHUNKS as usize],
            snaps: BTreeMap::new(),
            locked_reads: Vec::new(),
            requested: None,
            running: None,
            rollback_reply: None,
            next_value: 1,
            next_name: 0,
            next_client: 100,
            rollbacks_done: 0,
            trace: std::env::var_os("CSNAP_TRACE").is_some(),
        }
    }

    fn note(&self, what: impl AsRef<str>) {
        if self.trace {
            eprintln!("{}", what.as_ref());
        }
    }

    /// The origin client's frames: grants are written at once (so an acknowledgement never
    /// leaves a granted write in flight), notices acknowledged at once.
    fn drain_origin(&mut self) {
        loop {
            let frames = self.h.replies(self.origin);
            if frames.is_empty() {
                break;
            }
            for f in frames {
                if f.reply_to.is_none() {
                    self.note(format!("notice {:?}", f.msg));
                }
                match (f.reply_to, f.msg) {
                    (Some(id), ServerMsg::OriginWriteOk { .. }) => {
                        let (c, half, v) = self.writes.remove(&id).expect("a write of ours");
                        self.h.origin[c as usize][half] = v;
                        self.reference[c as usize][half] = v;
                        let cursor = self
                            .h
                            .engine
                            .status()
                            .and_then(|s| s.rollback)
                            .map(|r| r.position);
                        self.note(format!(
                            "write {c}[{half}] = {v} (rollback cursor {cursor:?})"
                        ));
                    }
                    (None, ServerMsg::NewSnapshot { snap }) => {
                        self.h.send(self.origin, ClientMsg::NewSnapshotAck { snap });
                    }
                    (None, ServerMsg::RollbackStarting { pin, .. }) => {
                        self.asking = true;
                        self.h
                            .send(self.origin, ClientMsg::NewSnapshotAck { snap: pin });
                    }
                    (None, ServerMsg::RollbackDone { source }) => {
                        assert_eq!(self.running.map(|r| r.0), Some(source));
                        self.note(format!("rollback to {source} done"));
                        self.asking = false;
                        self.running = None;
                        self.rollbacks_done += 1;
                    }
                    other => panic!("origin client got {other:?}"),
                }
            }
        }
        self.notice_pin();
    }

    /// The pin exists once the store has the rollback record: from then on the origin
    /// reads as the source, and the pin as the origin was.
    fn notice_pin(&mut self) {
        let Some(source) = self.requested else {
            return;
        };
        if let Some(record) = self.h.engine.store_mut().rollback().unwrap() {
            assert_eq!(record.source, source);
            self.note(format!("rollback to {source} started, pin {}", record.pin));
            self.snaps.insert(record.pin, self.reference.clone());
            self.reference = self.snaps[&source].clone();
            self.running = Some((source, record.pin));
            self.requested = None;
        }
    }

    fn drain_admin(&mut self) {
        if let Some(id) = self.rollback_reply {
            if let Some(msg) = self.h.reply_to(self.admin, id) {
                match msg {
                    ServerMsg::RollbackStarted { source, pin } => {
                        assert_eq!(
                            self.running,
                            Some((source, pin.id)),
                            "answered after the start"
                        );
                        assert!(self.asking, "answered only once the origin client asks");
                    }
                    other => panic!("rollback answered {other:?}"),
                }
                self.rollback_reply = None;
            }
        }
    }

    fn value(&mut self) -> u64 {
        self.next_value += 1;
        self.next_value
    }

    fn live_snapshot(&mut self) -> Option<SnapId> {
        let ids: Vec<SnapId> = self.snaps.keys().copied().collect();
        (!ids.is_empty()).then(|| ids[self.rng.gen_range(0..ids.len())])
    }

    fn write(&mut self) {
        let c = self.rng.gen_range(0..CHUNKS);
        let half = self.rng.gen_range(0..2);
        let v = self.value();
        let id = self.h.send(
            self.origin,
            ClientMsg::QueryWrite {
                ranges: range(c, 1),
            },
        );
        self.writes.insert(id, (c, half, v));
    }

    fn read_origin(&mut self) {
        let c = self.rng.gen_range(0..CHUNKS);
        let got = if self.asking {
            let id = self.h.send(
                self.origin,
                ClientMsg::QueryOriginRead {
                    ranges: range(c, 1),
                },
            );
            match self.h.reply_to(self.origin, id) {
                Some(ServerMsg::OriginReadOk { store, source }) => match store.as_slice() {
                    [] => self.h.origin[c as usize],
                    [a] if a.chunk == c => {
                        let got = self.h.store_data[a.store_chunk as usize];
                        // Read done: the store address is released, as the client does.
                        let snap = source.expect("a store address names its source");
                        assert_eq!(Some(snap), self.running.map(|r| r.0).or(self.requested));
                        self.h.send(
                            self.origin,
                            ClientMsg::ReleaseStoreReads {
                                snap,
                                ranges: range(c, 1),
                            },
                        );
                        got
                    }
                    other => panic!("read of chunk {c} answered {other:?}"),
                },
                other => panic!("QueryOriginRead answered {other:?}"),
            }
        } else {
            assert!(
                self.running.is_none() && self.requested.is_none(),
                "reading the origin directly during a rollback"
            );
            self.h.origin[c as usize]
        };
        assert_eq!(got, self.reference[c as usize], "origin chunk {c}");
    }

    /// A snapshot read through the protocol: store chunks are read at once, an origin
    /// chunk is read-locked and read some steps later.
    fn read_snapshot(&mut self) {
        let Some(snap) = self.live_snapshot() else {
            return;
        };
        let c = self.rng.gen_range(0..CHUNKS);
        self.next_client += 1;
        let conn = self
            .h
            .connect(self.next_client, ClientKind::Snapshot { snap }, false);
        let id = self.h.send(
            conn,
            ClientMsg::QuerySnapshotRead {
                snap,
                ranges: range(c, 1),
            },
        );
        match self.h.reply_to(conn, id) {
            Some(ServerMsg::SnapshotReadOk {
                store,
                origin_locked,
            }) => {
                if let [a] = store.as_slice() {
                    let got = self.h.store_data[a.store_chunk as usize];
                    assert_eq!(
                        got, self.snaps[&snap][c as usize],
                        "snapshot {snap} chunk {c}"
                    );
                    self.h.handle(Event::ClientDisconnected { conn });
                } else {
                    assert_eq!(origin_locked, range(c, 1));
                    self.locked_reads.push((conn, snap, c));
                }
            }
            // Waiting for a copy-out or a commit: given up (the connection goes).
            None => self.h.handle(Event::ClientDisconnected { conn }),
            // The pin is visible once its creation is committed.
            Some(ServerMsg::Error {
                code: ErrorCode::NoSuchSnapshot,
                ..
            }) if self.running.is_some_and(|r| r.1 == snap) => {
                self.h.handle(Event::ClientDisconnected { conn })
            }
            other => panic!("snapshot read answered {other:?}"),
        }
    }

    fn finish_locked_read(&mut self) {
        if self.locked_reads.is_empty() {
            return;
        }
        let i = self.rng.gen_range(0..self.locked_reads.len());
        let (conn, snap, c) = self.locked_reads.remove(i);
        let got = self.h.origin[c as usize];
        assert_eq!(
            got, self.snaps[&snap][c as usize],
            "locked read of snapshot {snap} chunk {c}"
        );
        self.h.send(
            conn,
            ClientMsg::FinishSnapshotRead {
                snap,
                ranges: range(c, 1),
            },
        );
        self.h.handle(Event::ClientDisconnected { conn });
    }

    fn create(&mut self) {
        self.next_name += 1;
        let name = format!("s{}", self.next_name);
        let id = self.h.send(
            self.admin,
            ClientMsg::CreateSnapshot {
                name: name.clone(),
                token: 0,
            },
        );
        if self.running.is_some() || self.requested.is_some() {
            let answer = self.h.reply_to(self.admin, id);
            assert_eq!(
                error_code(&answer),
                Some(ErrorCode::RollbackInProgress),
                "{answer:?}"
            );
            return;
        }
        // The origin client acknowledges at once: the store creates the snapshot now.
        let contents = self.reference.clone();
        self.drain_origin();
        self.settle_until_answered(id);
        match self.h.reply_to(self.admin, id) {
            Some(ServerMsg::SnapshotCreated { info }) => {
                self.note(format!("created snapshot {}", info.id));
                self.snaps.insert(info.id, contents);
            }
            Some(ServerMsg::Error {
                code: ErrorCode::StoreFull,
                ..
            }) => {}
            other => panic!("create answered {other:?}"),
        }
    }

    /// Runs copies and commits until `id` is answered (no rollback runs).
    fn settle_until_answered(&mut self, id: RequestId) {
        for _ in 0..1000 {
            if self
                .h
                .inbox
                .get(&self.admin)
                .is_some_and(|q| q.iter().any(|f| f.reply_to == Some(id)))
            {
                return;
            }
            if !(self.h.run_one_copy() || self.h.run_commit()) {
                break;
            }
            self.drain_origin();
        }
    }

    fn delete(&mut self) {
        let Some(snap) = self.live_snapshot() else {
            return;
        };
        if self.locked_reads.iter().any(|r| r.1 == snap) {
            return;
        }
        let id = self.h.send(self.admin, ClientMsg::DeleteSnapshot { snap });
        let involved = self.running.is_some_and(|(s, p)| s == snap || p == snap)
            || self.requested == Some(snap);
        if involved {
            let answer = self.h.reply_to(self.admin, id);
            assert_eq!(
                error_code(&answer),
                Some(ErrorCode::RollbackInProgress),
                "{answer:?}"
            );
            return;
        }
        self.snaps.remove(&snap);
        self.note(format!("deleted snapshot {snap}"));
    }

    fn rollback(&mut self) {
        let Some(source) = self.live_snapshot() else {
            return;
        };
        self.next_name += 1;
        let id = self.h.send(
            self.admin,
            ClientMsg::Rollback {
                snap: source,
                pin_name: format!("pin{}", self.next_name),
            },
        );
        if self.running.is_some() || self.requested.is_some() {
            let answer = self.h.reply_to(self.admin, id);
            assert_eq!(
                error_code(&answer),
                Some(ErrorCode::RollbackInProgress),
                "{answer:?}"
            );
            return;
        }
        self.note(format!("rollback to {source} requested"));
        self.requested = Some(source);
        self.rollback_reply = Some(id);
        self.drain_origin();
    }

    /// The server crashes; a new one starts on the recovered store. Writes not granted are
    /// lost with the connection (never written); a rollback whose start was not committed
    /// is gone, and the origin reads as before it again.
    fn crash(&mut self) {
        self.note(format!("crash (rollback running: {:?})", self.running));
        self.h.failover(rollback_config());
        self.writes.clear();
        self.locked_reads.clear();
        self.rollback_reply = None;
        // A rollback still running in the model: its start was lost with the pin, or it
        // runs on, or its end became durable just before the crash (the store may commit
        // more than the engine asked for), which only the new server's Welcome says.
        self.next_client += 1;
        self.origin = self.h.connect(self.next_client, ClientKind::Origin, false);
        self.asking = self.h.welcome_rollback;
        if let Some((_, pin)) = self.running {
            if self.h.engine.store_mut().snapshot(pin).unwrap().is_none() {
                self.reference = self.snaps.remove(&pin).expect("pin modelled");
                self.running = None;
            } else if !self.asking {
                self.running = None;
                self.rollbacks_done += 1;
            }
        }
        assert_eq!(
            self.asking,
            self.running.is_some(),
            "Welcome says whether to ask"
        );
        self.requested = None;
        let live: Vec<SnapId> = self
            .h
            .engine
            .store_mut()
            .list_snapshots()
            .unwrap()
            .into_iter()
            .filter(|s| s.state == SnapshotState::Live)
            .map(|s| s.id)
            .collect();
        self.snaps.retain(|id, _| live.contains(id));
        self.admin = self.h.admin();
    }

    fn step(&mut self) {
        match self.rng.gen_range(0..100) {
            0..=24 => self.write(),
            25..=39 => self.read_origin(),
            40..=47 => self.read_snapshot(),
            48..=53 => self.finish_locked_read(),
            54..=57 => self.create(),
            58..=59 => self.delete(),
            60..=63 => self.rollback(),
            64..=79 => {
                let n = self.h.copies.len();
                if n > 0 {
                    let k = self.rng.gen_range(0..n);
                    self.h.run_copy_at(k);
                }
            }
            80..=93 => {
                self.h.run_commit();
            }
            94..=95 => self.crash(),
            _ => self.h.handle(Event::Tick { now: 1_000 }),
        }
        self.drain_origin();
        self.drain_admin();
        assert!(self.h.fatal.is_none(), "engine failed: {:?}", self.h.fatal);
    }

    /// Lets everything finish: locked reads end, the rollback completes.
    fn finish(&mut self) {
        while !self.locked_reads.is_empty() {
            self.finish_locked_read();
        }
        for _ in 0..100_000 {
            self.drain_origin();
            self.drain_admin();
            if !(self.h.run_one_copy() || self.h.run_commit()) {
                break;
            }
        }
        self.drain_origin();
        assert!(self.running.is_none(), "the rollback finished");
        assert!(!self.asking, "RollbackDone reached the origin client");
        assert!(
            self.writes.is_empty(),
            "every write was granted: {:?}",
            self.writes
        );
        for c in 0..CHUNKS {
            assert_eq!(
                self.h.origin[c as usize], self.reference[c as usize],
                "origin chunk {c}"
            );
        }
        let snaps: Vec<SnapId> = self.snaps.keys().copied().collect();
        for snap in snaps {
            for c in 0..CHUNKS {
                let got = match self.h.engine.store_mut().snapshot_chunk(snap, c).unwrap() {
                    SnapChunk::Origin => self.h.origin[c as usize],
                    SnapChunk::Store { store_chunk, .. } => self.h.store_data[store_chunk as usize],
                };
                assert_eq!(
                    got, self.snaps[&snap][c as usize],
                    "snapshot {snap} chunk {c}"
                );
            }
        }
        self.h.engine.store_mut().consistency().unwrap();
    }
}

/// Runs `cases` seeded cases of the model on stores made by `make_store`.
fn run_cases<S: TestStore>(test: &str, default_cases: u64, make_store: impl Fn() -> S) {
    let master = seed(test);
    let cases: u64 = std::env::var("CSNAP_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_cases);
    let mut rollbacks = 0;
    for case in 0..cases {
        let seed = master.wrapping_add(case);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut run = Run::new(seed, make_store());
            for _ in 0..400 {
                run.step();
            }
            run.finish();
            run.rollbacks_done
        }));
        match outcome {
            Ok(n) => rollbacks += n,
            Err(e) => {
                eprintln!("failing case: CSNAP_SEED={seed:#x} CSNAP_CASES=1 (add CSNAP_TRACE=1 for every step)");
                std::panic::resume_unwind(e);
            }
        }
    }
    eprintln!("{cases} cases, {rollbacks} rollbacks finished");
    assert!(
        rollbacks >= cases as u32,
        "only {rollbacks} rollbacks finished in {cases} cases"
    );
}

#[test]
fn rollback_under_random_writes_reads_and_crashes_matches_the_model() {
    run_cases(
        "rollback_under_random_writes_reads_and_crashes_matches_the_model",
        150,
        || MemStore::new(4096, CHUNKS, 400),
    );
}

/// The same on the on-disk store (its exception runs, journal replay after a crash, the
/// rollback record in the root state).
#[test]
fn rollback_under_random_writes_reads_and_crashes_matches_the_model_on_disk() {
    run_cases(
        "rollback_under_random_writes_reads_and_crashes_matches_the_model_on_disk",
        40,
        || disk::DiskStore::new(CHUNKS, 400),
    );
}

/// The basic flow, step by step: the answer waits for the start's commit; reads of chunks
/// not yet copied back go to the source's store chunk; a write there waits until the chunk
/// is copied back and committed; other snapshots, the pin included, keep their contents;
/// a second rollback, deleting the source, writing it and creating a snapshot are refused.
#[test]
fn a_rollback_step_by_step() {
    let mut h = Harness::new(config(), 8, 64);
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    h.origin[3] = [30, 30];
    let target = h.create_snapshot(admin, "target", &[origin]);
    let other = h.create_snapshot(admin, "other", &[origin]);
    // Chunk 3 changes after both snapshots: copied out for them.
    h.granted_origin_write(origin, 3);
    h.origin[3] = [31, 31];

    let id = h.send(
        admin,
        ClientMsg::Rollback {
            snap: target,
            pin_name: "before".into(),
        },
    );
    let pin = match h.notices(origin).as_slice() {
        [ServerMsg::RollbackStarting { source, pin }] if *source == target => *pin,
        other => panic!("{other:?}"),
    };
    h.send(origin, ClientMsg::NewSnapshotAck { snap: pin });
    // The second round (for clients that connected meanwhile) reaches this one too.
    h.ack_rollback_starts(origin);
    assert!(
        h.reply_to(admin, id).is_none(),
        "not before the start is committed"
    );
    let refused = [
        h.send(
            admin,
            ClientMsg::Rollback {
                snap: other,
                pin_name: "x".into(),
            },
        ),
        h.send(admin, ClientMsg::DeleteSnapshot { snap: target }),
        h.send(admin, ClientMsg::DeleteSnapshot { snap: pin }),
        h.send(
            admin,
            ClientMsg::CreateSnapshot {
                name: "new".into(),
                token: 0,
            },
        ),
        h.send(
            admin,
            ClientMsg::Diff {
                from: DiffEnd::Snapshot(target),
                to: DiffEnd::Origin,
                start: 0,
                budget: 100,
            },
        ),
    ];
    for r in refused {
        let answer = h.reply_to(admin, r);
        assert_eq!(
            error_code(&answer),
            Some(ErrorCode::RollbackInProgress),
            "{answer:?}"
        );
        if let Some(ServerMsg::Error { message, .. }) = answer {
            assert!(message.contains("rollback"), "{message}");
        }
    }
    // Before any copy: chunk 3 reads from the target's store chunk.
    let q = h.send(
        origin,
        ClientMsg::QueryOriginRead {
            ranges: range(0, 8),
        },
    );
    let store = match h.reply_to(origin, q) {
        Some(ServerMsg::OriginReadOk { store, .. }) => store,
        other => panic!("{other:?}"),
    };
    assert_eq!(store.len(), 1);
    assert_eq!(
        (store[0].chunk, h.store_data[store[0].store_chunk as usize]),
        (3, [30, 30])
    );
    // A write to chunk 3 waits for the copy back.
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(3, 1),
        },
    );
    assert!(h.reply_to(origin, w).is_none());
    h.settle();
    match h.reply_to(admin, id) {
        Some(ServerMsg::RollbackStarted { source, pin: info }) => {
            assert_eq!(
                (source, info.id, info.name.as_str()),
                (target, pin, "before")
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        h.reply_to(origin, w),
        Some(ServerMsg::OriginWriteOk { .. })
    ));
    assert_eq!(h.origin[3], [30, 30], "rolled back");
    assert_eq!(
        h.notices(origin),
        vec![ServerMsg::RollbackDone { source: target }]
    );
    for (snap, want) in [(other, [30, 30]), (pin, [31, 31]), (target, [30, 30])] {
        let got = match h.engine.store_mut().snapshot_chunk(snap, 3).unwrap() {
            SnapChunk::Origin => h.origin[3],
            SnapChunk::Store { store_chunk, .. } => h.store_data[store_chunk as usize],
        };
        assert_eq!(got, want, "snapshot {snap}");
    }
    assert!(h
        .logs
        .iter()
        .any(|(_, m)| m.contains("rolled back to snapshot")));
    assert!(h.engine.store_mut().rollback().unwrap().is_none());
}

/// A chunk the source still shares with the origin needs no copy back, and a write to it
/// after the start goes ahead (copied out for the source and the pin alike): the copy-back
/// must not mistake that copy-out for a chunk to roll back, also after a crash.
#[test]
fn a_write_after_the_start_to_a_chunk_the_source_shares_is_kept() {
    let mut h = Harness::new(
        EngineConfig {
            rollback_window: 1,
            ..config()
        },
        8,
        64,
    );
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let target = h.create_snapshot(admin, "target", &[origin]);
    for c in [1, 2] {
        h.granted_origin_write(origin, c);
        h.origin[c as usize] = [10 + c, 10 + c];
    }
    h.send(
        admin,
        ClientMsg::Rollback {
            snap: target,
            pin_name: "before".into(),
        },
    );
    h.ack_rollback_starts(origin);
    h.ack_rollback_starts(origin);
    h.run_commit();
    // Chunk 5 is the target's and the origin's: written now, while the copy-back is at 1.
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(5, 1),
        },
    );
    for _ in 0..4 {
        if h.copies
            .iter()
            .any(|c| c.1 == CopySource::Origin { chunk: 5 })
        {
            break;
        }
        h.run_commit();
    }
    let k = h
        .copies
        .iter()
        .position(|c| c.1 == CopySource::Origin { chunk: 5 })
        .expect("chunk 5 copied out for the source and the pin");
    h.run_copy_at(k);
    while h.run_commit() {}
    assert!(matches!(
        h.reply_to(origin, w),
        Some(ServerMsg::OriginWriteOk { .. })
    ));
    assert!(
        h.engine.status().unwrap().rollback.unwrap().position <= 2,
        "the copy-back is not past chunk 2"
    );
    h.origin[5] = [55, 55];
    // The server crashes before the copy-back got past chunk 2, and resumes.
    h.failover(EngineConfig {
        rollback_window: 1,
        ..config()
    });
    assert!(h.engine.store_mut().rollback().unwrap().is_some());
    h.settle();
    assert!(h.engine.store_mut().rollback().unwrap().is_none(), "done");
    assert_eq!(h.origin[1], [0, 0], "rolled back");
    assert_eq!(h.origin[2], [0, 0], "rolled back");
    assert_eq!(h.origin[5], [55, 55], "the write after the start is kept");
}

/// A full store with nothing to give up but the rollback's source and pin: the copy-back
/// pauses (said once in the log, not at every event) and writes that need a copy-out wait,
/// instead of the store-full policy invalidating the source or the pin.
#[test]
fn a_full_store_pauses_the_rollback_and_never_sacrifices_its_source_or_pin() {
    let mut h = Harness::new(config(), 8, 2);
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let target = h.create_snapshot(admin, "target", &[origin]);
    for c in [0, 1] {
        h.granted_origin_write(origin, c);
        h.origin[c as usize] = [9, 9];
    }
    assert_eq!(
        h.engine.status().unwrap().free_chunks,
        0,
        "the store is full"
    );
    h.send(
        admin,
        ClientMsg::Rollback {
            snap: target,
            pin_name: "before".into(),
        },
    );
    for _ in 0..2 {
        h.ack_rollback_starts(origin);
    }
    h.settle();
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(5, 1),
        },
    );
    for now in 1_001..1_010 {
        h.handle(Event::Tick { now });
        h.settle();
    }
    assert!(h.reply_to(origin, w).is_none(), "the write waits for room");
    let paused = h
        .errors(LogLevel::Error)
        .into_iter()
        .filter(|m| m.contains("rollback paused"))
        .count();
    assert_eq!(paused, 1, "said once");
    let states = h.engine.store().states();
    assert!(
        states.iter().all(|(_, s)| *s == SnapshotState::Live),
        "nobody sacrificed: {states:?}"
    );
    assert_eq!(h.engine.status().unwrap().rollback.unwrap().position, 0);
    assert_eq!(
        h.origin[0],
        [9, 9],
        "nothing copied back over a chunk the pin shares"
    );
}

/// Runs ticks from `from` on (reclaim walks on ticks), settling copies and commits.
fn tick_and_settle<S: TestStore>(h: &mut Harness<S>, from: u64) {
    for t in 0..10 {
        h.handle(Event::Tick { now: from + t });
        h.settle();
    }
}

/// A rollback to `target` (whose store chunk holds origin chunk 3's old contents) on a
/// store of two chunks, stopped before any copy: the origin client's `QueryOriginRead` of
/// chunk 3 is answered with the target's store chunk. Returns (origin conn, admin conn,
/// target, the store chunk the origin client was told to read).
fn rollback_with_an_origin_store_read(h: &mut Harness) -> (ConnId, ConnId, SnapId, u64) {
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    h.origin[3] = [30, 30];
    let target = h.create_snapshot(admin, "target", &[origin]);
    h.granted_origin_write(origin, 3);
    h.origin[3] = [31, 31];
    let (id, x) = start_rollback_and_read_chunk_3(h, origin, admin, target, "before");
    assert_eq!(h.store_data[x as usize], [30, 30]);
    // The copy-back ends; the origin client's read of store chunk x is still running.
    h.settle();
    assert!(matches!(
        h.reply_to(admin, id),
        Some(ServerMsg::RollbackStarted { .. })
    ));
    assert_eq!(
        h.notices(origin),
        vec![ServerMsg::RollbackDone { source: target }]
    );
    (origin, admin, target, x)
}

/// Starts a rollback of the origin to `source` (pin `pin_name`), acknowledges its start on
/// the origin session, and asks where origin chunk 3 reads from: it must be one store chunk
/// of `source`. Returns (the rollback request, that store chunk), the read still unreleased.
fn start_rollback_and_read_chunk_3(
    h: &mut Harness,
    origin: ConnId,
    admin: ConnId,
    source: SnapId,
    pin_name: &str,
) -> (RequestId, u64) {
    let id = h.send(
        admin,
        ClientMsg::Rollback {
            snap: source,
            pin_name: pin_name.into(),
        },
    );
    h.ack_rollback_starts(origin);
    h.ack_rollback_starts(origin);
    let q = h.send(
        origin,
        ClientMsg::QueryOriginRead {
            ranges: range(3, 1),
        },
    );
    match h.reply_to(origin, q) {
        Some(ServerMsg::OriginReadOk {
            store,
            source: Some(s),
        }) if store.len() == 1 && s == source => (id, store[0].store_chunk),
        other => panic!("expected one store chunk of source {source:?}, got {other:?}"),
    }
}

/// The source is deleted right after the rollback (reclaim runs on ticks from `now`), and
/// the pin needs a copy-out of origin chunk 1 on a full store: the only chunk reclaim could
/// give it is the one the origin client is still reading. Returns the write waiting for it.
fn delete_source_and_write(
    h: &mut Harness,
    origin: ConnId,
    admin: ConnId,
    target: SnapId,
    now: u64,
) -> RequestId {
    let d = h.send(admin, ClientMsg::DeleteSnapshot { snap: target });
    h.settle();
    assert!(matches!(
        h.reply_to(admin, d),
        Some(ServerMsg::SnapshotDeleted { .. })
    ));
    tick_and_settle(h, now);
    h.copy_log.clear();
    let w = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(1, 1),
        },
    );
    h.settle();
    w
}

/// Issue 13: a store address `OriginReadOk` gave out is the source's until the origin
/// client releases it (`ReleaseStoreReads { snap: source }` on its origin session), as for
/// snapshot reads: the rollback ending and the source being deleted meanwhile do not let a
/// copy-out reuse it under the read.
#[test]
fn an_origin_read_from_the_store_keeps_the_source_chunk_until_released() {
    let mut h = Harness::new(config(), 8, 2);
    let (origin, admin, target, x) = rollback_with_an_origin_store_read(&mut h);
    let w = delete_source_and_write(&mut h, origin, admin, target, 2_000);
    assert!(
        h.copy_log.iter().all(|(_, to)| *to != x),
        "store chunk {x} was reused by a copy-out while the origin client may still read it: {:?}",
        h.copy_log
    );
    assert_eq!(h.reply_to(origin, w), None, "the write waits for the space");
    // A release naming another snapshot releases nothing (and is logged).
    h.send(
        origin,
        ClientMsg::ReleaseStoreReads {
            snap: SnapId(target.0 + 100),
            ranges: range(3, 1),
        },
    );
    tick_and_settle(&mut h, 3_000);
    assert_eq!(h.reply_to(origin, w), None, "still held");
    assert!(
        h.errors(LogLevel::Warn)
            .iter()
            .any(|m| m.contains("ReleaseStoreReads refused")),
        "{:?}",
        h.logs
    );
    // The read is done: the chunk is reclaimed and reused, the write goes through.
    h.send(
        origin,
        ClientMsg::ReleaseStoreReads {
            snap: target,
            ranges: range(3, 1),
        },
    );
    tick_and_settle(&mut h, 4_000);
    assert_write_reused(&mut h, origin, w, x);
}

/// A lost origin connection's store reads stay counted for the orphan grace time, even
/// though the client comes back at once (its reads may still run), then are released.
#[test]
fn a_lost_origin_connection_keeps_its_store_reads_for_the_grace_time() {
    let cfg = EngineConfig {
        orphan_lock_grace_secs: 60,
        ..config()
    };
    let mut h = Harness::new(cfg, 8, 2);
    let (old, admin, target, x) = rollback_with_an_origin_store_read(&mut h);
    h.handle(Event::Tick { now: 1_100 });
    h.handle(Event::ClientDisconnected { conn: old });
    assert!(
        h.errors(LogLevel::Warn)
            .iter()
            .any(|m| m.contains("store read(s) of rollback source(s) unreleased")),
        "{:?}",
        h.logs
    );
    let origin = h.connect(1, ClientKind::Origin, false);
    let w = delete_source_and_write(&mut h, origin, admin, target, 1_110);
    assert!(
        h.copy_log.iter().all(|(_, to)| *to != x),
        "store chunk {x} reused within the grace time: {:?}",
        h.copy_log
    );
    assert_eq!(h.reply_to(origin, w), None, "the write waits for the space");
    tick_and_settle(&mut h, 1_160);
    assert_write_reused(&mut h, origin, w, x);
}

/// One origin session may hold store reads of two sources (a rollback ended before it
/// released, the next began): each release reaches its own source's leases only.
#[test]
fn store_reads_of_two_sources_are_released_separately() {
    let mut h = Harness::new(config(), 8, 4);
    let (origin, admin, first, x) = rollback_with_an_origin_store_read(&mut h);
    // The origin is rolled back to `first`; `second` is that, with chunk 3 changed after.
    let second = h.create_snapshot(admin, "second", &[origin]);
    h.granted_origin_write(origin, 3);
    h.origin[3] = [32, 32];
    let (_, y) = start_rollback_and_read_chunk_3(&mut h, origin, admin, second, "before2");
    assert_ne!(x, y);
    h.settle();
    h.notices(origin);
    // Releasing the second source's read of chunk 3 leaves the first one's held.
    h.send(
        origin,
        ClientMsg::ReleaseStoreReads {
            snap: second,
            ranges: range(3, 1),
        },
    );
    let st = h.engine.status().expect("status");
    let d = h.send(admin, ClientMsg::DeleteSnapshot { snap: first });
    h.settle();
    assert!(matches!(
        h.reply_to(admin, d),
        Some(ServerMsg::SnapshotDeleted { .. })
    ));
    tick_and_settle(&mut h, 2_000);
    assert_eq!(
        h.engine.status().expect("status").free_chunks,
        st.free_chunks,
        "the first source's chunk is not reclaimed while its read is held"
    );
    h.send(
        origin,
        ClientMsg::ReleaseStoreReads {
            snap: first,
            ranges: range(3, 1),
        },
    );
    tick_and_settle(&mut h, 3_000);
    assert!(
        h.engine.status().expect("status").free_chunks > st.free_chunks,
        "reclaimed once released"
    );
}

/// After a failover the new server does not know the store reads the old one gave out
/// (they are not uploaded again): reclaim waits until `hold_snapshots_until`, when the old
/// server's clients' reads have certainly finished, so a read still running on the
/// deleted source's chunk is not overwritten by a copy-out meanwhile.
#[test]
fn after_a_failover_reclaim_waits_for_the_hold() {
    let mut h = Harness::new(config(), 8, 2);
    let (_, _, target, x) = rollback_with_an_origin_store_read(&mut h);
    h.failover(EngineConfig {
        start_time: 1_100,
        hold_snapshots_until: 1_130,
        ..config()
    });
    let origin = h.connect(1, ClientKind::Origin, true);
    let admin = h.admin();
    let w = delete_source_and_write(&mut h, origin, admin, target, 1_110);
    assert!(
        h.copy_log.iter().all(|(_, to)| *to != x),
        "store chunk {x} reused before the hold ended: {:?}",
        h.copy_log
    );
    assert_eq!(h.reply_to(origin, w), None, "the write waits for the space");
    assert_eq!(
        h.engine.poll_timeout(),
        Some(1_130),
        "a tick at the hold's end"
    );
    tick_and_settle(&mut h, 1_130);
    assert_write_reused(&mut h, origin, w, x);
}

/// The origin write `w` went through, its copy-out reusing store chunk `x` (released at last).
fn assert_write_reused(h: &mut Harness, origin: ConnId, w: RequestId, x: u64) {
    assert!(matches!(
        h.reply_to(origin, w),
        Some(ServerMsg::OriginWriteOk { .. })
    ));
    assert!(
        h.copy_log.iter().any(|(_, to)| *to == x),
        "store chunk {x} not reused: {:?}",
        h.copy_log
    );
}
