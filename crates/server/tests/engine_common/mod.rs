//! Test harness for the request engine: an engine over a `MemStore` (or any `TestStore`), plus a simulated data
//! path (origin and store chunk contents) driven by the engine's Copy actions, and helpers
//! that speak the protocol as a client would.
#![allow(dead_code)]

pub(crate) mod disk;

use csnap_proto::auth;
use csnap_proto::*;
use csnap_server::engine::*;
use std::collections::{BTreeSet, HashMap, VecDeque};

pub(crate) const KEY: &[u8] = b"cluster key for tests";

/// Simulated chunk contents: two halves, so partial writes (and therefore the copies that
/// preserve the other half) are visible.
pub(crate) type Data = [u64; 2];

/// What the tests need from a store beyond `MetaStore`: crash and recovery, a consistency
/// check, and every snapshot's state.
pub(crate) trait TestStore: MetaStore + Sized {
    /// Simulates a server crash and recovery: what was not committed is lost.
    fn crash_and_recover(&mut self);
    fn consistency(&mut self) -> Result<(), String>;
    /// Every snapshot the store still knows, deleting ones included, in id order.
    fn snapshot_states(&mut self) -> Vec<(SnapId, SnapshotState)>;
    /// A throwaway store (stands in while the engine is replaced).
    fn placeholder() -> Self;
}

impl TestStore for MemStore {
    fn crash_and_recover(&mut self) {
        self.crash();
    }

    fn consistency(&mut self) -> Result<(), String> {
        self.check()
    }

    fn snapshot_states(&mut self) -> Vec<(SnapId, SnapshotState)> {
        self.states()
    }

    fn placeholder() -> Self {
        MemStore::new(4096, 1, 1)
    }
}

/// Simulated store data, by store chunk address (a device chunk index: data chunks may
/// start after a metadata area). Never-written chunks read as `UNWRITTEN`.
#[derive(Default)]
pub(crate) struct StoreData(HashMap<usize, Data>);

pub(crate) const UNWRITTEN: Data = [u64::MAX, u64::MAX];

/// In `Harness::copies`, a destination with this bit set is origin chunk `to & !TO_ORIGIN`
/// (an online rollback's copy back, `Action::CopyToOrigin`; its source is the store).
pub(crate) const TO_ORIGIN: u64 = 1 << 63;

impl std::ops::Index<usize> for StoreData {
    type Output = Data;

    fn index(&self, chunk: usize) -> &Data {
        self.0.get(&chunk).unwrap_or(&UNWRITTEN)
    }
}

impl std::ops::IndexMut<usize> for StoreData {
    fn index_mut(&mut self, chunk: usize) -> &mut Data {
        self.0.entry(chunk).or_insert(UNWRITTEN)
    }
}

pub(crate) struct Harness<S: TestStore = MemStore> {
    pub engine: Engine<S>,
    pub origin: Vec<Data>,
    pub store_data: StoreData,
    pub inbox: HashMap<ConnId, VecDeque<ServerFrame>>,
    pub copies: VecDeque<(CopyId, CopySource, u64)>,
    /// Origin copy-outs emitted, per origin chunk.
    pub copy_outs: HashMap<u64, u32>,
    pub commit_pending: bool,
    pub closed: BTreeSet<ConnId>,
    pub logs: Vec<(LogLevel, String)>,
    pub fatal: Option<String>,
    /// Every copy the engine asked for, in order.
    pub copy_log: Vec<(CopySource, u64)>,
    /// Every frame sent, in order (drained by tests that check each one).
    pub sent: Vec<(ConnId, ServerFrame)>,
    /// Order of notable outputs, for ordering assertions.
    pub trace: Vec<String>,
    /// `Welcome::rollback` of the last connection `connect` opened.
    pub welcome_rollback: bool,
    next_conn: ConnId,
    next_id: RequestId,
}

/// Origin leases are long here, so tests that tick through time with idle origin clients
/// keep them; the lease tests set their own.
pub(crate) fn config() -> EngineConfig {
    EngineConfig {
        cluster_key: KEY.to_vec(),
        start_time: 1_000,
        origin_lease_secs: 100_000,
        ..EngineConfig::default()
    }
}

impl Harness<MemStore> {
    pub(crate) fn new(cfg: EngineConfig, origin_chunks: u64, store_chunks: u64) -> Self {
        Self::with_store(cfg, MemStore::new(4096, origin_chunks, store_chunks))
    }
}

impl<S: TestStore> Harness<S> {
    pub(crate) fn with_store(cfg: EngineConfig, store: S) -> Self {
        let mut s = store;
        let stats = s.stats().unwrap();
        let engine = Engine::new(s, cfg).unwrap();
        let mut h = Harness {
            engine,
            origin: vec![[0, 0]; stats.origin_chunks as usize],
            store_data: StoreData::default(),
            inbox: HashMap::new(),
            copies: VecDeque::new(),
            copy_outs: HashMap::new(),
            commit_pending: false,
            closed: BTreeSet::new(),
            logs: Vec::new(),
            fatal: None,
            copy_log: Vec::new(),
            sent: Vec::new(),
            trace: Vec::new(),
            welcome_rollback: false,
            next_conn: 1,
            next_id: 1,
        };
        h.pump();
        h
    }

    /// Moves the engine's actions into the simulated world.
    pub(crate) fn pump(&mut self) {
        while let Some(a) = self.engine.poll_output() {
            match a {
                Action::Send { conn, frame } => {
                    self.trace
                        .push(format!("send {conn} {:?}", short(&frame.msg)));
                    self.sent.push((conn, frame.clone()));
                    self.inbox.entry(conn).or_default().push_back(frame);
                }
                Action::SealFrames { conn, .. } => {
                    // Frames here are values, not bytes: nothing to seal.
                    self.trace.push(format!("seal {conn}"));
                }
                Action::Close { conn } => {
                    self.trace.push(format!("close {conn}"));
                    self.closed.insert(conn);
                }
                Action::Copy {
                    copy,
                    from,
                    to,
                    purpose,
                } => {
                    self.trace.push(format!("copy {from:?} -> {to}"));
                    if let (CopyPurpose::CopyOut, CopySource::Origin { chunk }) = (purpose, from) {
                        *self.copy_outs.entry(chunk).or_insert(0) += 1;
                    }
                    self.copy_log.push((from, to));
                    self.copies.push_back((copy, from, to));
                }
                Action::CopyToOrigin { copy, from, chunk } => {
                    self.trace
                        .push(format!("copy back {from} -> origin {chunk}"));
                    let from = CopySource::Store { store_chunk: from };
                    self.copy_log.push((from, chunk | TO_ORIGIN));
                    self.copies.push_back((copy, from, chunk | TO_ORIGIN));
                }
                Action::Commit => {
                    assert!(!self.commit_pending, "two commits outstanding");
                    self.trace.push("commit".into());
                    self.commit_pending = true;
                }
                Action::Log { level, message, .. } => self.logs.push((level, message)),
                Action::Fatal { error } => {
                    self.fatal = Some(csnap_server::engine::error_chain(&error))
                }
            }
        }
    }

    /// Server crash and failover: everything not committed is lost, copies in flight and
    /// unsent or undelivered frames vanish, and a new engine starts on the recovered store
    /// with the given activation list.
    pub(crate) fn failover(&mut self, cfg: EngineConfig) {
        let placeholder = Engine::new(S::placeholder(), config()).unwrap();
        let mut store = std::mem::replace(&mut self.engine, placeholder).into_store();
        store.crash_and_recover();
        self.engine = Engine::new(store, cfg).unwrap();
        self.copies.clear();
        self.commit_pending = false;
        self.inbox.clear();
        self.closed.clear();
        self.pump();
    }

    pub(crate) fn handle(&mut self, ev: Event) {
        self.engine.handle(ev);
        self.pump();
    }

    /// Performs the oldest queued copy on the simulated devices and reports it done.
    pub(crate) fn run_one_copy(&mut self) -> bool {
        self.run_copy_at(0)
    }

    /// Performs the queued copy at `index` (copies may finish in any order).
    pub(crate) fn run_copy_at(&mut self, index: usize) -> bool {
        let Some((copy, from, to)) = self.copies.remove(index) else {
            return false;
        };
        let data = match from {
            CopySource::Origin { chunk } => self.origin[chunk as usize],
            CopySource::Store { store_chunk } => self.store_data[store_chunk as usize],
        };
        if to & TO_ORIGIN != 0 {
            self.origin[(to & !TO_ORIGIN) as usize] = data;
        } else {
            self.store_data[to as usize] = data;
        }
        self.handle(Event::CopyDone {
            copy,
            result: Ok(()),
        });
        true
    }

    pub(crate) fn run_commit(&mut self) -> bool {
        if !self.commit_pending {
            return false;
        }
        self.commit_pending = false;
        self.trace.push("commit done".into());
        self.engine.run_commit();
        self.pump();
        true
    }

    /// Runs copies and commits until nothing is left.
    pub(crate) fn settle(&mut self) {
        while self.run_one_copy() || self.run_commit() {}
    }

    pub(crate) fn fresh_id(&mut self) -> RequestId {
        self.next_id += 1;
        self.next_id
    }

    pub(crate) fn open_conn(&mut self) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.handle(Event::ClientConnected {
            conn,
            server_nonce: [conn as u8; 32],
        });
        conn
    }

    pub(crate) fn send(&mut self, conn: ConnId, msg: ClientMsg) -> RequestId {
        let id = self.fresh_id();
        self.handle(Event::ClientRequest {
            conn,
            frame: ClientFrame { id, msg },
        });
        id
    }

    /// Writes origin chunk `chunk` through `conn` as a client would: asks (`QueryWrite`),
    /// lets every copy and commit it needs run, and checks the write was granted.
    pub(crate) fn granted_origin_write(&mut self, conn: ConnId, chunk: u64) {
        let w = self.send(
            conn,
            ClientMsg::QueryWrite {
                ranges: range(chunk, 1),
            },
        );
        self.settle();
        match self.reply_to(conn, w) {
            Some(ServerMsg::OriginWriteOk { .. }) => {}
            other => panic!("write of origin chunk {chunk}: expected OriginWriteOk, got {other:?}"),
        }
    }

    /// Acknowledges every `RollbackStarting` waiting on `conn` as an origin client does once
    /// its older reads and writes landed (other notices waiting there are dropped).
    pub(crate) fn ack_rollback_starts(&mut self, conn: ConnId) {
        for n in self.notices(conn) {
            if let ServerMsg::RollbackStarting { pin, .. } = n {
                self.send(conn, ClientMsg::NewSnapshotAck { snap: pin });
            }
        }
    }

    pub(crate) fn replies(&mut self, conn: ConnId) -> Vec<ServerFrame> {
        self.inbox
            .get_mut(&conn)
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }

    /// The reply to request `id`, if it arrived (removing it from the inbox).
    pub(crate) fn reply_to(&mut self, conn: ConnId, id: RequestId) -> Option<ServerMsg> {
        let q = self.inbox.get_mut(&conn)?;
        let pos = q.iter().position(|f| f.reply_to == Some(id))?;
        q.remove(pos).map(|f| f.msg)
    }

    /// Notices (frames that answer no request) waiting on a connection, removed.
    pub(crate) fn notices(&mut self, conn: ConnId) -> Vec<ServerMsg> {
        let Some(q) = self.inbox.get_mut(&conn) else {
            return Vec::new();
        };
        let (n, rest): (Vec<_>, Vec<_>) = q.drain(..).partition(|f| f.reply_to.is_none());
        q.extend(rest);
        n.into_iter().map(|f| f.msg).collect()
    }

    /// Connects and authenticates client instance `client`'s connection of this kind
    /// (identity `ClientId::new(client, kind)`, incarnation `client`: connecting the same
    /// one again is a reconnect); returns its connection.
    pub(crate) fn connect(&mut self, client: u64, kind: ClientKind, resuming: bool) -> ConnId {
        let conn = self.open_conn();
        let client_nonce = [client as u8 ^ 0x5a; 32];
        let id = ClientId::new(client, kind);
        let hello = self.send(
            conn,
            ClientMsg::Hello {
                protocol_version: u32::from(PROTOCOL_VERSION),
                client: id,
                node: 1,
                incarnation: client,
                client_nonce,
                resuming,
            },
        );
        let Some(ServerMsg::Challenge {
            server_nonce,
            proof,
        }) = self.reply_to(conn, hello)
        else {
            panic!("no challenge");
        };
        let handshake = auth::Handshake {
            protocol_version: u32::from(PROTOCOL_VERSION),
            client: id,
            node: 1,
            incarnation: client,
            resuming,
            client_nonce,
            server_nonce,
        };
        assert!(
            auth::verify_server_proof(KEY, &handshake, &proof),
            "server proof must verify"
        );
        let proof = auth::client_proof(KEY, &handshake);
        let id = self.send(conn, ClientMsg::AuthResponse { proof });
        match self.reply_to(conn, id) {
            Some(ServerMsg::Welcome { rollback, .. }) => {
                self.welcome_rollback = rollback;
                conn
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub(crate) fn admin(&mut self) -> ConnId {
        self.connect(9_000 + self.next_conn, ClientKind::Admin, false)
    }

    /// Creates a snapshot through `admin`, acking NewSnapshot on every given origin conn.
    pub(crate) fn create_snapshot(
        &mut self,
        admin: ConnId,
        name: &str,
        origins: &[ConnId],
    ) -> SnapId {
        let id = self.send(
            admin,
            ClientMsg::CreateSnapshot {
                name: name.into(),
                token: 0,
            },
        );
        for &o in origins {
            for n in self.notices(o) {
                if let ServerMsg::NewSnapshot { snap } = n {
                    self.send(o, ClientMsg::NewSnapshotAck { snap });
                }
            }
        }
        self.settle();
        match self.reply_to(admin, id) {
            Some(ServerMsg::SnapshotCreated { info }) => info.id,
            other => panic!("expected SnapshotCreated, got {other:?}"),
        }
    }

    pub(crate) fn errors(&self, level: LogLevel) -> Vec<String> {
        self.logs
            .iter()
            .filter(|(l, _)| *l == level)
            .map(|(_, m)| m.clone())
            .collect()
    }
}

pub(crate) fn range(start: u64, count: u32) -> Vec<ChunkRange> {
    vec![ChunkRange::new(start, count)]
}

pub(crate) fn error_code(msg: &Option<ServerMsg>) -> Option<ErrorCode> {
    match msg {
        Some(ServerMsg::Error { code, .. }) => Some(*code),
        _ => None,
    }
}

fn short(msg: &ServerMsg) -> String {
    let s = format!("{msg:?}");
    s.split([' ', '{', '(']).next().unwrap_or("").to_string()
}

/// The seed for a randomised test: CSNAP_SEED if set, else random; printed.
pub(crate) fn seed(test: &str) -> u64 {
    csnap_proto::testing::seed(test, "CSNAP_SEED")
}
