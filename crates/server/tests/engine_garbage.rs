//! Random and hostile requests: the engine never panics, never fails fatally on client
//! input, and answers every request that is not legitimately waiting.

mod engine_common;

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

fn random_msg(rng: &mut StdRng) -> ClientMsg {
    match rng.gen_range(0..16) {
        0 => ClientMsg::Hello {
            protocol_version: rng.gen_range(0..3),
            client: ClientId(rng.gen_range(0..6)),
            node: rng.gen(),
            kind: match rng.gen_range(0..3) {
                0 => ClientKind::Origin,
                1 => ClientKind::Admin,
                _ => ClientKind::Snapshot {
                    snap: random_snap(rng),
                },
            },
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
        },
        11 => ClientMsg::DeleteSnapshot {
            snap: if rng.gen() {
                SnapRef::Id(random_snap(rng))
            } else {
                SnapRef::Name(format!("s{}", rng.gen_range(0..4)))
            },
        },
        12 => ClientMsg::ListSnapshots,
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
                        error: "garbage".into(),
                    });
                }
                5 => h.handle(Event::ClientDeclaredGone {
                    client: ClientId(rng.gen_range(0..6)),
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
