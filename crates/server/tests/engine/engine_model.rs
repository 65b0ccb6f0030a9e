//! Model-based randomised test of the engine with a simulated data path.
//!
//! Several origin clients, snapshot clients and an admin run random interleavings of origin
//! writes (asked or under a unique promise), snapshot reads (store or read-locked origin,
//! four messages), snapshot writes, snapshot create/delete, copies and commits finishing in
//! random order, and ticks, against one engine that never fails over. The simulated
//! devices hold two values per chunk (two "halves"), so partial writes and the copies that
//! must preserve the other half are visible.
//!
//! Checked against a reference (for every snapshot: the origin contents at the instant
//! the store created it plus its own writes. Creation is two-phase, so no other write can
//! race it; the model registers a snapshot when the store has it, not when it was
//! requested):
//! * every snapshot read equals the reference (invariant 1);
//! * no snapshot is created while an origin client holds a granted write in flight;
//! * no origin write is granted, and no promised write lands, while a snapshot client holds a
//!   read lock on that chunk;
//! * a chunk is copied out again only if a snapshot was created since its last copy-out (one
//!   copy-out per chunk per write, whatever the number of snapshots);
//! * requests are answered with what they asked for (errors only for a deleted or invalid
//!   snapshot, or a full store); origin writes never fail; nothing panics; the store stays
//!   consistent.
//!
//! Failover (server crashes, the activation gate, clients reconnecting and resending, read
//! locks and snapshot write leases uploaded to the new server, snapshot creations and
//! deletions a crash loses or keeps) is checked by the whole-system simulation
//! (`crates/sim`, package `csnap-sim`) with real agents, engines and client sessions: its
//! checkers `snapshots.rs` (reads as at creation plus own writes, no usable grant at a
//! creation), `gate.rs` (no origin write before the gathered clients settled), `deletes.rs`
//! (a deleted snapshot is gone and its space comes back), `durability.rs` (promised writes
//! and reported snapshots survive), `answered.rs` (resent requests are answered) and
//! `gather_ends.rs`. docs/testing.md lists which of them took over each failover check this
//! test used to make.
//!
//! Seeds: CSNAP_SEED=<n> replays one case (a failing case prints it); CSNAP_MASTER_SEED=<n>
//! reruns a whole run; otherwise a time-based master seed is printed.

use crate::engine_common;

use csnap_proto::*;
use csnap_server::engine::*;
use engine_common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};

type Cands = BTreeSet<u64>;

struct ModelSnap {
    /// Acceptable values per chunk half.
    view: Vec<[Cands; 2]>,
    live: bool,
    deleted: bool,
}

#[derive(Default)]
struct OriginClient {
    client: u64,
    conn: Option<ConnId>,
    cache: BTreeSet<u64>,
    /// Writes waiting for their grant: request id -> (chunk, half, value) per chunk.
    queries: BTreeMap<RequestId, Vec<(u64, usize, u64)>>,
    in_flight: Vec<(u64, usize, u64)>,
    acks: Vec<SnapId>,
}

struct SnapClient {
    snap: SnapId,
    conn: Option<ConnId>,
    reads: BTreeMap<RequestId, u64>,
    /// Origin reads granted (read-locked) and not yet done.
    locked: Vec<u64>,
    writes: BTreeMap<RequestId, (u64, usize, u64)>,
    /// Granted snapshot writes not yet on the store: (chunk, store chunk, half, value).
    writing: Vec<(u64, u64, usize, u64)>,
    /// Landed snapshot writes whose lease is not yet released.
    unfinished: Vec<u64>,
}

impl SnapClient {
    fn busy(&self, chunk: u64) -> bool {
        self.reads.values().any(|c| *c == chunk)
            || self.locked.contains(&chunk)
            || self.writes.values().any(|w| w.0 == chunk)
            || self.writing.iter().any(|w| w.0 == chunk)
            || self.unfinished.contains(&chunk)
    }
}

struct Sim<S: TestStore> {
    rng: StdRng,
    h: Harness<S>,
    chunks: u64,
    origins: Vec<OriginClient>,
    snap_clients: Vec<SnapClient>,
    admin: ConnId,
    /// Create requests by request id: the name asked for.
    admin_creates: BTreeMap<RequestId, String>,
    /// Snapshot ids the store has had.
    seen_ids: BTreeSet<SnapId>,
    /// Snapshots the store created, ever.
    created: u64,
    admin_deletes: BTreeMap<RequestId, SnapId>,
    model: BTreeMap<SnapId, ModelSnap>,
    next_value: u64,
    next_client: u64,
    creates: u64,
    /// Snapshots created in the store at each chunk's last copy-out.
    last_copy_out: HashMap<u64, u64>,
    copy_outs_seen: HashMap<u64, u32>,
    checks: u64,
    grants: u64,
    full_store: bool,
    /// CSNAP_TRACE=1: print every step (for replaying a failing seed).
    tracing: bool,
}

impl<S: TestStore> Sim<S> {
    fn new(seed: u64, make_store: &MakeStore<S>) -> Sim<S> {
        let mut rng = StdRng::seed_from_u64(seed);
        let chunks = rng.gen_range(3..10);
        let full_store = rng.gen_bool(0.3);
        let store_chunks = if full_store {
            rng.gen_range(3..12)
        } else {
            512
        };
        let policy = if rng.gen_bool(0.5) {
            StoreFullPolicy::InvalidateOldest
        } else {
            StoreFullPolicy::FailSnapshotWritesOnly
        };
        let cfg = EngineConfig {
            store_full_policy: policy,
            reclaim_budget: rng.gen_range(1..4),
            promise_unique: rng.gen_bool(0.8),
            ..config()
        };
        let mut h = Harness::with_store(cfg, make_store(chunks, store_chunks));
        let admin = h.admin();
        let n_origins = rng.gen_range(1..4);
        let mut sim = Sim {
            rng,
            h,
            chunks,
            origins: Vec::new(),
            snap_clients: Vec::new(),
            admin,
            admin_creates: BTreeMap::new(),
            seen_ids: BTreeSet::new(),
            created: 0,
            admin_deletes: BTreeMap::new(),
            model: BTreeMap::new(),
            next_value: 1,
            next_client: 100,
            creates: 0,
            last_copy_out: HashMap::new(),
            copy_outs_seen: HashMap::new(),
            checks: 0,
            grants: 0,
            full_store,
            tracing: std::env::var_os("CSNAP_TRACE").is_some(),
        };
        for i in 0..n_origins {
            let conn = sim.h.connect(i + 1, ClientKind::Origin, false);
            sim.origins.push(OriginClient {
                client: i + 1,
                conn: Some(conn),
                ..OriginClient::default()
            });
        }
        sim
    }

    fn value(&mut self) -> u64 {
        self.next_value += 1;
        self.next_value
    }

    fn store_state(&mut self, snap: SnapId) -> Option<SnapshotState> {
        self.h
            .engine
            .store_mut()
            .snapshot_states()
            .into_iter()
            .find(|(id, _)| *id == snap)
            .map(|(_, s)| s)
    }

    fn snapshot_checkable(&mut self, snap: SnapId) -> bool {
        self.model.get(&snap).is_some_and(|m| m.live && !m.deleted)
            && self.store_state(snap) == Some(SnapshotState::Live)
    }

    /// A snapshot read returned `data` for chunk `c` of `snap`: compare with the model.
    fn check(&mut self, snap: SnapId, c: u64, data: Data, how: &str) {
        if !self.snapshot_checkable(snap) {
            return;
        }
        let m = self.model.get_mut(&snap).unwrap();
        for (half, (cands, value)) in m.view[c as usize].iter_mut().zip(data).enumerate() {
            assert!(
                cands.contains(&value),
                "snapshot {snap} chunk {c} half {half} read {value} via {how}, expected one of {cands:?}"
            );
            *cands = BTreeSet::from([value]);
        }
        self.checks += 1;
    }

    fn locked_by_snapshot_clients(&self, c: u64) -> bool {
        self.snap_clients.iter().any(|sc| sc.locked.contains(&c))
    }

    /// Data lands on the origin: pending snapshots may or may not include it.
    fn trace(&self, what: impl FnOnce() -> String) {
        if self.tracing {
            eprintln!("sim: {}", what());
        }
    }

    fn land_origin(&mut self, c: u64, half: usize, v: u64) {
        self.trace(|| format!("origin chunk {c} half {half} := {v}"));
        self.h.origin[c as usize][half] = v;
    }

    /// Registers every snapshot the store created since the last look: its reference is
    /// the origin now (no granted origin write may be in flight).
    fn register_new_snapshots(&mut self) {
        let ids: Vec<SnapId> = self
            .h
            .engine
            .store_mut()
            .snapshot_states()
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !self.seen_ids.contains(id))
            .collect();
        for snap in ids {
            self.seen_ids.insert(snap);
            self.created += 1;
            let view: Vec<[Cands; 2]> = self
                .h
                .origin
                .iter()
                .map(|d| [BTreeSet::from([d[0]]), BTreeSet::from([d[1]])])
                .collect();
            for o in &self.origins {
                assert!(
                    o.in_flight.is_empty(),
                    "snapshot {snap} created while origin client {} still has a granted write in flight",
                    o.client
                );
            }
            self.trace(|| format!("the store created snapshot {snap}"));
            self.model.insert(
                snap,
                ModelSnap {
                    view,
                    live: false,
                    deleted: false,
                },
            );
        }
    }

    /// Inspects what the engine did: grants, creations, copy-outs.
    fn audit(&mut self) {
        self.register_new_snapshots();
        if self.tracing {
            for t in std::mem::take(&mut self.h.trace) {
                eprintln!("engine: {t}");
            }
        } else {
            self.h.trace.clear();
        }
        for (conn, frame) in std::mem::take(&mut self.h.sent) {
            match frame.msg {
                ServerMsg::OriginWriteOk { ref ranges, .. } => {
                    self.grants += 1;
                    for c in ranges.iter().flat_map(|r| r.chunks().unwrap()) {
                        assert!(
                            !self.locked_by_snapshot_clients(c),
                            "origin write on chunk {c} granted (conn {conn}) while a snapshot client holds a read lock on it"
                        );
                    }
                }
                ServerMsg::SnapshotCreated { ref info } => {
                    if let Some(m) = self.model.get_mut(&info.id) {
                        m.live = true;
                    }
                }
                ServerMsg::Error {
                    code: ErrorCode::Internal,
                    ref message,
                } => {
                    panic!("internal error: {message}")
                }
                _ => {}
            }
        }
        for (&c, &n) in &self.h.copy_outs {
            let seen = self.copy_outs_seen.entry(c).or_insert(0);
            if n > *seen {
                assert_eq!(n, *seen + 1, "several copy-outs of chunk {c} at once");
                let created = self.created;
                if let Some(&at) = self.last_copy_out.get(&c) {
                    assert!(
                        created > at,
                        "chunk {c} copied out again without a new snapshot"
                    );
                }
                self.last_copy_out.insert(c, created);
                *seen = n;
            }
        }
        assert!(self.h.fatal.is_none(), "fatal: {:?}", self.h.fatal);
    }

    fn send(&mut self, conn: ConnId, msg: ClientMsg) -> RequestId {
        let id = self.h.send(conn, msg);
        self.audit();
        id
    }

    fn handle(&mut self, ev: Event) {
        self.h.handle(ev);
        self.audit();
    }

    // ---- steps ----

    fn origin_write(&mut self) {
        let i = self.rng.gen_range(0..self.origins.len());
        let Some(conn) = self.origins[i].conn else {
            return;
        };
        let c = self.rng.gen_range(0..self.chunks);
        let two = c + 1 < self.chunks && self.rng.gen_bool(0.2);
        let targets: Vec<u64> = if two { vec![c, c + 1] } else { vec![c] };
        let writes: Vec<(u64, usize, u64)> = targets
            .iter()
            .map(|&c| (c, self.rng.gen_range(0..2), self.value()))
            .collect();
        if targets.iter().all(|c| self.origins[i].cache.contains(c)) {
            self.trace(|| format!("origin client {i} writes under promise: {writes:?}"));
            for (c, half, v) in writes {
                assert!(
                    !self.locked_by_snapshot_clients(c),
                    "promised write to chunk {c} while a snapshot client holds a read lock"
                );
                self.land_origin(c, half, v);
            }
            return;
        }
        let id = self.send(
            conn,
            ClientMsg::QueryWrite {
                ranges: vec![ChunkRange::new(c, targets.len() as u32)],
            },
        );
        self.trace(|| format!("origin client {i} asks {id}: {writes:?}"));
        self.origins[i].queries.insert(id, writes);
    }

    fn land_in_flight(&mut self) {
        let i = self.rng.gen_range(0..self.origins.len());
        if self.origins[i].in_flight.is_empty() {
            return;
        }
        let k = self.rng.gen_range(0..self.origins[i].in_flight.len());
        let (c, half, v) = self.origins[i].in_flight.remove(k);
        self.land_origin(c, half, v);
        self.maybe_ack(i);
    }

    fn maybe_ack(&mut self, i: usize) {
        let o = &mut self.origins[i];
        if o.in_flight.is_empty() && !o.acks.is_empty() {
            let acks = std::mem::take(&mut o.acks);
            if let Some(conn) = o.conn {
                for snap in acks {
                    self.send(conn, ClientMsg::NewSnapshotAck { snap });
                }
            }
        }
    }

    fn live_snapshots(&self) -> Vec<SnapId> {
        self.model
            .iter()
            .filter(|(_, m)| m.live && !m.deleted)
            .map(|(id, _)| *id)
            .collect()
    }

    /// A connected snapshot client for `snap` (connects one if needed).
    fn snap_client(&mut self, snap: SnapId) -> Option<usize> {
        if let Some(i) = self.snap_clients.iter().position(|sc| sc.snap == snap) {
            return self.snap_clients[i].conn.map(|_| i);
        }
        self.next_client += 1;
        let client = self.next_client;
        let conn = self.h.connect(client, ClientKind::Snapshot { snap }, false);
        self.audit();
        self.snap_clients.push(SnapClient {
            snap,
            conn: Some(conn),
            reads: BTreeMap::new(),
            locked: Vec::new(),
            writes: BTreeMap::new(),
            writing: Vec::new(),
            unfinished: Vec::new(),
        });
        Some(self.snap_clients.len() - 1)
    }

    fn pick_snapshot_op(&mut self) -> Option<(usize, ConnId, SnapId, u64)> {
        let live = self.live_snapshots();
        if live.is_empty() {
            return None;
        }
        let snap = live[self.rng.gen_range(0..live.len())];
        let i = self.snap_client(snap)?;
        let c = self.rng.gen_range(0..self.chunks);
        if self.snap_clients[i].busy(c) {
            return None;
        }
        Some((i, self.snap_clients[i].conn?, snap, c))
    }

    fn snapshot_read(&mut self) {
        let Some((i, conn, snap, c)) = self.pick_snapshot_op() else {
            return;
        };
        let id = self.send(
            conn,
            ClientMsg::QuerySnapshotRead {
                snap,
                ranges: vec![ChunkRange::new(c, 1)],
            },
        );
        self.snap_clients[i].reads.insert(id, c);
    }

    fn snapshot_write(&mut self) {
        let Some((i, conn, snap, c)) = self.pick_snapshot_op() else {
            return;
        };
        let half = self.rng.gen_range(0..2);
        let v = self.value();
        let id = self.send(
            conn,
            ClientMsg::SnapshotWrite {
                snap,
                ranges: vec![ChunkRange::new(c, 1)],
            },
        );
        self.snap_clients[i].writes.insert(id, (c, half, v));
    }

    fn finish_locked_read(&mut self) {
        let candidates: Vec<usize> = (0..self.snap_clients.len())
            .filter(|&i| {
                let sc = &self.snap_clients[i];
                sc.conn.is_some() && !sc.locked.is_empty()
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let i = candidates[self.rng.gen_range(0..candidates.len())];
        let k = self.rng.gen_range(0..self.snap_clients[i].locked.len());
        let c = self.snap_clients[i].locked.remove(k);
        let snap = self.snap_clients[i].snap;
        let data = self.h.origin[c as usize];
        self.check(snap, c, data, "read-locked origin");
        let conn = self.snap_clients[i].conn.unwrap();
        let id = self.send(
            conn,
            ClientMsg::FinishSnapshotRead {
                snap,
                ranges: vec![ChunkRange::new(c, 1)],
            },
        );
        assert_eq!(
            self.h.reply_to(conn, id),
            Some(ServerMsg::FinishSnapshotReadOk),
            "release of a held lock is confirmed at once"
        );
    }

    /// A granted snapshot write reaches the store.
    fn land_snapshot_write(&mut self, i: usize) {
        if self.snap_clients[i].writing.is_empty() {
            return;
        }
        let k = self.rng.gen_range(0..self.snap_clients[i].writing.len());
        let (c, x, half, v) = self.snap_clients[i].writing.remove(k);
        self.h.store_data[x as usize][half] = v;
        let snap = self.snap_clients[i].snap;
        self.trace(|| {
            format!("snapshot {snap} write lands: chunk {c} half {half} := {v} at store {x}")
        });
        // Update the model even if the snapshot was deleted meanwhile.
        if let Some(m) = self.model.get_mut(&snap) {
            m.view[c as usize][half] = BTreeSet::from([v]);
        }
        self.snap_clients[i].unfinished.push(c);
    }

    fn finish_snapshot_write(&mut self, i: usize) {
        let Some(conn) = self.snap_clients[i].conn else {
            return;
        };
        if self.snap_clients[i].unfinished.is_empty() {
            return;
        }
        let c = self.snap_clients[i].unfinished.remove(0);
        let snap = self.snap_clients[i].snap;
        let id = self.send(
            conn,
            ClientMsg::FinishSnapshotWrite {
                snap,
                ranges: vec![ChunkRange::new(c, 1)],
            },
        );
        assert_eq!(
            self.h.reply_to(conn, id),
            Some(ServerMsg::FinishSnapshotWriteOk)
        );
    }

    fn snapshot_write_progress(&mut self) {
        if self.snap_clients.is_empty() {
            return;
        }
        let i = self.rng.gen_range(0..self.snap_clients.len());
        if self.rng.gen_bool(0.5) {
            self.land_snapshot_write(i);
        } else {
            self.finish_snapshot_write(i);
        }
    }

    fn create(&mut self) {
        if self.model.len() + self.admin_creates.len() >= 12 {
            return;
        }
        let name = format!("snap{}", self.creates);
        let id = self.h.fresh_id();
        self.creates += 1;
        // The model learns of the snapshot when the store creates it (see audit).
        self.admin_creates.insert(id, name.clone());
        self.h.handle(Event::ClientRequest {
            conn: self.admin,
            frame: ClientFrame {
                id,
                msg: ClientMsg::CreateSnapshot { name, token: id },
            },
        });
        self.audit();
    }

    fn delete(&mut self) {
        let live = self.live_snapshots();
        if live.is_empty() || !self.rng.gen_bool(0.5) {
            return;
        }
        let snap = live[self.rng.gen_range(0..live.len())];
        self.model.get_mut(&snap).unwrap().deleted = true;
        self.trace(|| format!("delete snapshot {snap}"));
        let id = self.send(self.admin, ClientMsg::DeleteSnapshot { snap });
        self.admin_deletes.insert(id, snap);
    }

    /// A client handles the next frame waiting for it.
    fn deliver(&mut self) {
        let n_o = self.origins.len();
        let n_s = self.snap_clients.len();
        let pick = self.rng.gen_range(0..n_o + n_s + 1);
        if pick < n_o {
            self.deliver_origin(pick);
        } else if pick < n_o + n_s {
            self.deliver_snap(pick - n_o);
        } else {
            self.deliver_admin();
        }
    }

    fn next_frame(&mut self, conn: ConnId) -> Option<ServerFrame> {
        self.h.inbox.get_mut(&conn)?.pop_front()
    }

    fn deliver_origin(&mut self, i: usize) {
        let Some(conn) = self.origins[i].conn else {
            return;
        };
        let Some(frame) = self.next_frame(conn) else {
            return;
        };
        self.trace(|| format!("origin client {i} (conn {conn}) gets {frame:?}"));
        match frame.msg {
            ServerMsg::OriginWriteOk { ranges, unique } => {
                let id = frame.reply_to.unwrap();
                let writes = self.origins[i]
                    .queries
                    .remove(&id)
                    .unwrap_or_else(|| panic!("OriginWriteOk for unknown request {id}"));
                let granted: BTreeSet<u64> =
                    ranges.iter().flat_map(|r| r.chunks().unwrap()).collect();
                assert!(writes.iter().all(|w| granted.contains(&w.0)));
                if unique {
                    self.origins[i].cache.extend(granted);
                }
                self.origins[i].in_flight.extend(writes);
            }
            ServerMsg::NewSnapshot { snap } => {
                self.origins[i].cache.clear();
                self.origins[i].acks.push(snap);
                self.maybe_ack(i);
            }
            other => panic!("origin client got {other:?}"),
        }
    }

    fn deliver_snap(&mut self, i: usize) {
        let Some(conn) = self.snap_clients[i].conn else {
            return;
        };
        let Some(frame) = self.next_frame(conn) else {
            return;
        };
        let snap = self.snap_clients[i].snap;
        let id = frame.reply_to;
        self.trace(|| format!("snapshot client {i} (conn {conn}, snap {snap}) gets {frame:?}"));
        match frame.msg {
            ServerMsg::SnapshotReadOk {
                store,
                origin_locked,
            } => {
                let c = self.snap_clients[i].reads.remove(&id.unwrap()).unwrap();
                let read_store = !store.is_empty();
                for a in store {
                    assert_eq!(a.chunk, c);
                    let data = self.h.store_data[a.store_chunk as usize];
                    self.check(snap, c, data, "store");
                }
                if read_store {
                    self.send(
                        conn,
                        ClientMsg::ReleaseStoreReads {
                            snap,
                            ranges: vec![ChunkRange::new(c, 1)],
                        },
                    );
                }
                for r in origin_locked {
                    assert_eq!(r, ChunkRange::new(c, 1));
                    self.snap_clients[i].locked.push(c);
                }
            }
            ServerMsg::SnapshotWriteOk { addrs } => {
                let (c, half, v) = self.snap_clients[i].writes.remove(&id.unwrap()).unwrap();
                assert_eq!(addrs.len(), 1);
                assert_eq!(addrs[0].chunk, c);
                self.snap_clients[i]
                    .writing
                    .push((c, addrs[0].store_chunk, half, v));
            }
            ServerMsg::Error { code, message } => {
                let id = id.unwrap();
                self.snap_clients[i].reads.remove(&id);
                let write = self.snap_clients[i].writes.remove(&id);
                let state = self.store_state(snap);
                let ok = match code {
                    // Deleted (or invalidated, then deleted) since the request was sent.
                    ErrorCode::NoSuchSnapshot => {
                        self.model.get(&snap).is_some_and(|m| m.deleted)
                            || !matches!(state, Some(SnapshotState::Live))
                    }
                    ErrorCode::SnapshotInvalid => !matches!(state, Some(SnapshotState::Live)),
                    ErrorCode::StoreFull => self.full_store && write.is_some(),
                    _ => false,
                };
                assert!(
                    ok,
                    "snapshot {snap} request failed: {code:?} {message} (state {state:?})"
                );
            }
            ServerMsg::UploadLocksOk
            | ServerMsg::ResendDoneOk
            | ServerMsg::FinishSnapshotReadOk
            | ServerMsg::FinishSnapshotWriteOk => {}
            other => panic!("snapshot client got {other:?}"),
        }
    }

    fn deliver_admin(&mut self) {
        let Some(frame) = self.next_frame(self.admin) else {
            return;
        };
        let id = frame.reply_to.unwrap();
        match frame.msg {
            ServerMsg::SnapshotCreated { info } => {
                assert_eq!(self.admin_creates.remove(&id), Some(info.name));
                assert!(
                    self.seen_ids.contains(&info.id),
                    "snapshot {} reported created, never seen in the store",
                    info.id
                );
            }
            ServerMsg::SnapshotDeleted { snap } => {
                assert_eq!(self.admin_deletes.remove(&id), Some(snap));
            }
            other => panic!("admin got {other:?}"),
        }
    }

    fn run_copy(&mut self) {
        if self.h.copies.is_empty() {
            return;
        }
        let k = self.rng.gen_range(0..self.h.copies.len());
        self.h.run_copy_at(k);
        self.audit();
    }

    fn commit(&mut self) {
        self.h.run_commit();
        self.audit();
    }

    fn tick(&mut self) {
        let now = 2_000 + self.rng.gen_range(0..10);
        self.handle(Event::Tick { now });
    }

    fn step(&mut self) {
        let r = self.rng.gen_range(0..100);
        match r {
            0..=17 => self.origin_write(),
            18..=25 => self.snapshot_read(),
            26..=31 => self.snapshot_write(),
            32..=39 => self.finish_locked_read(),
            40..=43 => self.create(),
            44..=45 => self.delete(),
            46..=57 => self.run_copy(),
            58..=65 => self.commit(),
            66..=84 => self.deliver(),
            85..=88 => self.land_in_flight(),
            89..=90 => self.snapshot_write_progress(),
            _ => self.tick(),
        }
    }

    /// Lets everything in flight finish, then reads every chunk of every live snapshot.
    fn quiesce_and_verify(&mut self) {
        for _ in 0..10_000 {
            let before = (self.h.copies.len(), self.h.commit_pending);
            self.run_copy();
            self.commit();
            for i in 0..self.origins.len() {
                while let Some(w) = self.origins[i].in_flight.pop() {
                    self.land_origin(w.0, w.1, w.2);
                }
                self.maybe_ack(i);
                self.deliver_origin(i);
            }
            for i in 0..self.snap_clients.len() {
                self.deliver_snap(i);
                while !self.snap_clients[i].writing.is_empty() {
                    self.land_snapshot_write(i);
                }
                while !self.snap_clients[i].unfinished.is_empty() {
                    self.finish_snapshot_write(i);
                }
                while !self.snap_clients[i].locked.is_empty() {
                    self.finish_one(i);
                }
            }
            self.deliver_admin();
            let idle = self.h.copies.is_empty()
                && !self.h.commit_pending
                && self.h.inbox.values().all(|q| q.is_empty())
                && self
                    .origins
                    .iter()
                    .all(|o| o.queries.is_empty() && o.in_flight.is_empty())
                && self.snap_clients.iter().all(|s| {
                    s.reads.is_empty()
                        && s.writes.is_empty()
                        && s.locked.is_empty()
                        && s.writing.is_empty()
                        && s.unfinished.is_empty()
                });
            if idle && before == (0, false) {
                break;
            }
        }
        assert!(
            self.origins.iter().all(|o| o.queries.is_empty()),
            "origin writes never answered: {:?}",
            self.origins
                .iter()
                .map(|o| o.queries.keys().collect::<Vec<_>>())
                .collect::<Vec<_>>()
        );
        if let Err(e) = self.h.engine.store_mut().consistency() {
            panic!("store inconsistent after the run: {e}");
        }
        for snap in self.live_snapshots() {
            if !self.snapshot_checkable(snap) {
                continue;
            }
            for c in 0..self.chunks {
                let data = match self.h.engine.store_mut().snapshot_chunk(snap, c).unwrap() {
                    SnapChunk::Origin => self.h.origin[c as usize],
                    SnapChunk::Store { store_chunk, .. } => self.h.store_data[store_chunk as usize],
                };
                self.check(snap, c, data, "final sweep");
            }
        }
    }

    fn finish_one(&mut self, i: usize) {
        let c = self.snap_clients[i].locked.remove(0);
        let snap = self.snap_clients[i].snap;
        let data = self.h.origin[c as usize];
        self.check(snap, c, data, "read-locked origin");
        let conn = self.snap_clients[i].conn.unwrap();
        let id = self.send(
            conn,
            ClientMsg::FinishSnapshotRead {
                snap,
                ranges: vec![ChunkRange::new(c, 1)],
            },
        );
        assert_eq!(
            self.h.reply_to(conn, id),
            Some(ServerMsg::FinishSnapshotReadOk)
        );
    }
}

/// Names a failing case's seed (and the test that replays it) when the case panics.
struct SeedReport(u64, String);

impl Drop for SeedReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "failing case: seed={} (replay: {})",
                csnap_proto::testing::Seed(self.0),
                csnap_proto::testing::replay_hint(&self.1, "CSNAP_SEED", self.0)
            );
        }
    }
}

/// A store factory: (origin chunks, store chunks) -> store.
type MakeStore<S> = dyn Fn(u64, u64) -> S;

fn run_case<S: TestStore>(
    test: &str,
    seed: u64,
    steps: usize,
    make_store: &MakeStore<S>,
) -> (u64, u64) {
    let _report = SeedReport(seed, test.to_owned());
    let mut sim = Sim::new(seed, make_store);
    for _ in 0..steps {
        sim.step();
    }
    sim.quiesce_and_verify();
    (sim.checks, sim.grants)
}

/// Runs `count` random cases (or the one named by CSNAP_SEED) on stores from `make_store`.
pub(crate) fn run_cases<S: TestStore>(
    test: &str,
    count: u64,
    steps: usize,
    make_store: &MakeStore<S>,
) {
    if let Some(seed) = csnap_proto::testing::env_seed("CSNAP_SEED") {
        eprintln!(
            "{test}: replaying case seed={}",
            csnap_proto::testing::Seed(seed)
        );
        run_case(test, seed, steps, make_store);
        return;
    }
    // The master seed reruns all cases; a failing case prints its own CSNAP_SEED.
    let master = csnap_proto::testing::seed(test, "CSNAP_MASTER_SEED");
    let mut rng = StdRng::seed_from_u64(master);
    let (mut checks, mut grants) = (0, 0);
    for _ in 0..count {
        let (c, g) = run_case(test, rng.gen(), steps, make_store);
        checks += c;
        grants += g;
    }
    eprintln!(
        "{test}: {count} cases, {checks} snapshot reads checked, {grants} origin writes granted"
    );
    assert!(checks > count, "the test must actually read snapshots");
    assert!(grants > count, "the test must actually write the origin");
}

#[test]
fn random_interleavings_keep_every_snapshot_intact() {
    run_cases(
        "random_interleavings_keep_every_snapshot_intact",
        150,
        600,
        &|origin_chunks, store_chunks| MemStore::new(4096, origin_chunks, store_chunks),
    );
}

/// The same on the real on-disk store (journal, B-trees, bitmaps) instead of `MemStore`.
#[test]
fn random_interleavings_on_the_on_disk_store() {
    run_cases(
        "random_interleavings_on_the_on_disk_store",
        100,
        600,
        &engine_common::disk::DiskStore::new,
    );
}
