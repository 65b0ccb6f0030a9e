//! Random and hostile requests: the engine never panics, never fails fatally on client
//! input, and answers every request that is not legitimately waiting.

use crate::engine_common;

use csnap_proto::*;
use csnap_server::engine::*;
use engine_common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random_range(rng: &mut StdRng) -> ChunkRange {
    match rng.gen_range(0..4) {
        0 => ChunkRange::new(rng.gen(), rng.gen()),
        1 => ChunkRange::new(u64::MAX - rng.gen_range(0..3), rng.gen_range(0..5)),
        _ => ChunkRange::new(rng.gen_range(0..20), rng.gen_range(0..4)),
    }
}

fn random_ranges(rng: &mut StdRng) -> Vec<ChunkRange> {
    (0..rng.gen_range(0..4))
        .map(|_| random_range(rng))
        .collect()
}

fn random_snap(rng: &mut StdRng) -> SnapId {
    SnapId(if rng.gen_bool(0.8) {
        rng.gen_range(0..5)
    } else {
        rng.gen()
    })
}

fn random_kind(rng: &mut StdRng) -> ClientKind {
    match rng.gen_range(0..3) {
        0 => ClientKind::Origin,
        1 => ClientKind::Admin,
        _ => ClientKind::Snapshot {
            snap: random_snap(rng),
        },
    }
}

fn random_msg(rng: &mut StdRng) -> ClientMsg {
    match rng.gen_range(0..16) {
        0 => ClientMsg::Hello {
            protocol_version: rng.gen_range(0..4),
            client: ClientId::new(rng.gen_range(0..6), random_kind(rng)),
            node: rng.gen(),
            incarnation: rng.gen_range(0..3),
            client_nonce: rng.gen(),
            resuming: rng.gen(),
        },
        1 => ClientMsg::AuthResponse { proof: rng.gen() },
        2 => ClientMsg::QueryWrite {
            ranges: random_ranges(rng),
        },
        3 => ClientMsg::QuerySnapshotRead {
            snap: random_snap(rng),
            ranges: random_ranges(rng),
        },
        4 => ClientMsg::FinishSnapshotRead {
            snap: random_snap(rng),
            ranges: random_ranges(rng),
        },
        5 => ClientMsg::SnapshotWrite {
            snap: random_snap(rng),
            ranges: random_ranges(rng),
        },
        6 => ClientMsg::FinishSnapshotWrite {
            snap: random_snap(rng),
            ranges: random_ranges(rng),
        },
        7 => ClientMsg::NewSnapshotAck {
            snap: random_snap(rng),
        },
        8 => ClientMsg::UploadLocks {
            locks: random_ranges(rng)
                .into_iter()
                .map(|range| HeldLock {
                    snap: random_snap(rng),
                    range,
                })
                .collect(),
            leases: random_ranges(rng)
                .into_iter()
                .map(|range| HeldLock {
                    snap: random_snap(rng),
                    range,
                })
                .collect(),
        },
        9 => ClientMsg::ResendDone,
        10 => ClientMsg::CreateSnapshot {
            name: match rng.gen_range(0..4) {
                0 => String::new(),
                1 => "x".repeat(300),
                2 => "a/b@c".into(),
                _ => format!("s{}", rng.gen_range(0..4)),
            },
            // Repeated tokens: resends, also of creations under way.
            token: rng.gen_range(0..3),
        },
        11 => {
            if rng.gen() {
                ClientMsg::DeleteSnapshot {
                    snap: random_snap(rng),
                }
            } else {
                ClientMsg::FindSnapshot {
                    name: format!("s{}", rng.gen_range(0..4)),
                }
            }
        }
        12 => ClientMsg::ListSnapshots {
            after: None,
            limit: u32::MAX,
        },
        _ => ClientMsg::Status,
    }
}

#[test]
fn hostile_request_streams_never_panic_or_stop_the_server() {
    let master = seed("hostile_request_streams_never_panic_or_stop_the_server");
    let mut rng = StdRng::seed_from_u64(master);
    for _ in 0..40 {
        let mut h = Harness::new(config(), 16, 8);
        // Some well-formed sessions so requests reach the deeper paths too.
        let mut conns = vec![
            h.connect(1, ClientKind::Origin, false),
            h.connect(2, ClientKind::Snapshot { snap: SnapId(1) }, rng.gen()),
        ];
        let admin = h.admin();
        conns.push(admin);
        h.create_snapshot(admin, "s0", &[conns[0]]);
        for _ in 0..400 {
            match rng.gen_range(0..10) {
                0 => conns.push(h.open_conn()),
                1 => {
                    let conn = conns[rng.gen_range(0..conns.len())];
                    h.handle(Event::ClientDisconnected { conn });
                }
                2 => h.settle(),
                3 => h.handle(Event::Tick {
                    now: 2_000 + rng.gen_range(0..100),
                }),
                4 => {
                    let conn = conns[rng.gen_range(0..conns.len())];
                    h.handle(Event::ClientBadFrame {
                        conn,
                        error: std::io::Error::other("garbage").into(),
                    });
                }
                5 => h.handle(Event::ClientDeclaredGone {
                    client: ClientId::new(rng.gen_range(0..6), random_kind(&mut rng)),
                }),
                _ => {
                    let conn = if rng.gen_bool(0.9) {
                        conns[rng.gen_range(0..conns.len())]
                    } else {
                        rng.gen()
                    };
                    let msg = random_msg(&mut rng);
                    h.send(conn, msg);
                }
            }
            assert!(
                h.fatal.is_none(),
                "client input made the server fail: {:?}",
                h.fatal
            );
            // Unknown copy or a CommitDone nobody asked for are ignored, not fatal.
            if rng.gen_bool(0.01) {
                h.handle(Event::CopyDone {
                    copy: rng.gen(),
                    result: Ok(()),
                });
            }
        }
        h.settle();
        assert!(h.fatal.is_none());
        h.engine.store().check().unwrap();
    }
}

/// A MemStore whose every operation fails with an I/O error once `budget` operations ran.
struct FailingStore {
    inner: MemStore,
    budget: u64,
}

impl FailingStore {
    fn tick(&mut self) -> Result<(), MetaError> {
        if self.budget == 0 {
            return Err(MetaError::from(std::io::Error::other(
                "injected EIO on the metadata device",
            )));
        }
        self.budget -= 1;
        Ok(())
    }
}

impl MetaStore for FailingStore {
    fn stats(&mut self) -> Result<StoreStats, MetaError> {
        self.tick()?;
        self.inner.stats()
    }
    fn create_snapshot(&mut self, name: &str, ctime: u64) -> Result<SnapshotInfo, MetaError> {
        self.tick()?;
        self.inner.create_snapshot(name, ctime)
    }
    fn next_snapshot_id(&mut self) -> Result<SnapId, MetaError> {
        self.tick()?;
        self.inner.next_snapshot_id()
    }
    fn delete_snapshot(&mut self, id: SnapId) -> Result<(), MetaError> {
        self.tick()?;
        self.inner.delete_snapshot(id)
    }
    fn invalidate_snapshot(&mut self, id: SnapId, reason: &str) -> Result<(), MetaError> {
        self.tick()?;
        self.inner.invalidate_snapshot(id, reason)
    }
    fn list_snapshots(&mut self) -> Result<Vec<SnapshotInfo>, MetaError> {
        self.tick()?;
        self.inner.list_snapshots()
    }
    fn snapshot(&mut self, id: SnapId) -> Result<Option<SnapshotInfo>, MetaError> {
        self.tick()?;
        self.inner.snapshot(id)
    }
    fn snapshot_by_name(&mut self, name: &str) -> Result<Option<SnapshotInfo>, MetaError> {
        self.tick()?;
        self.inner.snapshot_by_name(name)
    }
    fn oldest_sharing_origin(&mut self, chunk: u64) -> Result<Option<SnapId>, MetaError> {
        self.tick()?;
        self.inner.oldest_sharing_origin(chunk)
    }
    fn diff_page(
        &mut self,
        from: csnap_proto::DiffEnd,
        to: csnap_proto::DiffEnd,
        start: u64,
        budget: u32,
    ) -> Result<csnap_proto::DiffPage, MetaError> {
        self.tick()?;
        self.inner.diff_page(from, to, start, budget)
    }
    fn reserve_chunk(&mut self) -> Result<u64, MetaError> {
        self.tick()?;
        self.inner.reserve_chunk()
    }
    fn release_chunk(&mut self, store_chunk: u64) -> Result<(), MetaError> {
        self.tick()?;
        self.inner.release_chunk(store_chunk)
    }
    fn record_copy_out(&mut self, chunk: u64, store_chunk: u64) -> Result<bool, MetaError> {
        self.tick()?;
        self.inner.record_copy_out(chunk, store_chunk)
    }
    fn snapshot_chunk(&mut self, id: SnapId, chunk: u64) -> Result<SnapChunk, MetaError> {
        self.tick()?;
        self.inner.snapshot_chunk(id, chunk)
    }
    fn record_snapshot_exception(
        &mut self,
        id: SnapId,
        chunk: u64,
        store_chunk: u64,
    ) -> Result<(), MetaError> {
        self.tick()?;
        self.inner.record_snapshot_exception(id, chunk, store_chunk)
    }
    fn reclaim_step(&mut self, budget: usize) -> Result<ReclaimProgress, MetaError> {
        self.tick()?;
        self.inner.reclaim_step(budget)
    }
    fn commit(&mut self) -> Result<(), MetaError> {
        self.tick()?;
        self.inner.commit()
    }
}

#[test]
fn a_store_error_at_any_point_stops_the_engine_cleanly() {
    for budget in 1..80 {
        let store = FailingStore {
            inner: MemStore::new(4096, 8, 8),
            budget,
        };
        let Ok(mut engine) = Engine::new(store, config()) else {
            continue;
        };
        let mut fatal = None;
        let mut step = |engine: &mut Engine<FailingStore>, ev: Event| {
            engine.handle(ev);
            while let Some(a) = engine.poll_output() {
                match a {
                    Action::Fatal { error } => fatal = Some(error),
                    Action::Commit => {
                        let result = engine.store_mut().commit().map_err(Failure::from);
                        engine.handle(Event::CommitDone { result });
                    }
                    Action::Copy { copy, .. } => engine.handle(Event::CopyDone {
                        copy,
                        result: Ok(()),
                    }),
                    _ => {}
                }
            }
        };
        let req = |id, msg| Event::ClientRequest {
            conn: 1,
            frame: ClientFrame { id, msg },
        };
        // An admin session, authenticated with real proofs, then work that touches the store.
        step(
            &mut engine,
            Event::ClientConnected {
                conn: 1,
                server_nonce: [1; 32],
            },
        );
        step(
            &mut engine,
            req(
                1,
                ClientMsg::Hello {
                    protocol_version: u32::from(PROTOCOL_VERSION),
                    client: ClientId::new(5, ClientKind::Admin),
                    node: 1,
                    incarnation: 5,
                    client_nonce: [2; 32],
                    resuming: false,
                },
            ),
        );
        let proof = csnap_proto::auth::client_proof(
            KEY,
            &csnap_proto::auth::Handshake {
                protocol_version: u32::from(PROTOCOL_VERSION),
                client: ClientId::new(5, ClientKind::Admin),
                node: 1,
                incarnation: 5,
                resuming: false,
                client_nonce: [2; 32],
                server_nonce: [1; 32],
            },
        );
        step(&mut engine, req(2, ClientMsg::AuthResponse { proof }));
        for i in 0..10 {
            step(
                &mut engine,
                req(
                    10 + i,
                    ClientMsg::CreateSnapshot {
                        name: format!("s{i}"),
                        token: 0,
                    },
                ),
            );
            step(
                &mut engine,
                req(
                    30 + i,
                    ClientMsg::ListSnapshots {
                        after: None,
                        limit: u32::MAX,
                    },
                ),
            );
            step(
                &mut engine,
                req(
                    50 + i,
                    ClientMsg::DeleteSnapshot {
                        snap: SnapId(i + 1),
                    },
                ),
            );
            step(&mut engine, Event::Tick { now: 5_000 + i });
        }
        let fatal = fatal.unwrap_or_else(|| panic!("budget {budget}: no fatal action"));
        let reason = error_chain(&fatal);
        assert!(reason.contains("injected EIO"), "{reason}");
        // The store's error is the cause, kept whole: its io::Error is reachable.
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&fatal);
        let mut io = None;
        while let Some(c) = cause {
            io = io.or(c.downcast_ref::<std::io::Error>().map(|e| e.kind()));
            cause = c.source();
        }
        assert_eq!(
            io,
            Some(std::io::ErrorKind::Other),
            "budget {budget}: the I/O error is the source: {fatal:?}"
        );
        assert!(engine.has_failed());
    }
}
