//! A whole-system simulation of csnap cluster mode, deterministic and single-threaded (in
//! the style of TigerBeetle's `src/testing/` and raft-rs's harness).
//!
//! # The world
//!
//! N nodes (3 to 5) over cpg-glue's in-memory cluster (`cpg_glue::memory`: the same
//! virtual-synchrony model the behavioural suite checks against real corosync). Each node
//! has:
//! * its agent: the real membership core (`csnap_agent::cluster::VolumeMembership`) with
//!   its group and quorum handles, its outputs carried out as the daemon's shell does
//!   ([`world`] says exactly how);
//! * the volume's server when its agent runs one: the real server `Engine` over the real
//!   `Store`, on the shared store device, with the server's chunk-copy `DataPath`;
//! * its clients: the real client library's `Session` per metadata connection, an origin
//!   client with its `OriginTracker` (unique-chunk promises, write epochs, `NewSnapshot`
//!   acks after older writes drained), snapshot clients that read (`snapshot_read_runs`)
//!   and write (`SnapshotWrite`, the data to the store chunks named, `FinishSnapshotWrite`)
//!   their snapshot, and an admin client that creates and deletes snapshots. Clients
//!   follow their agent's agreed server, and reconnect and resume their sessions (read
//!   locks and write leases uploaded) after a failover.
//!
//! One shared origin and one shared store ([`disk`]) with volatile write caches: a node's
//! crash loses any subset of that node's unflushed writes. Client <-> server frames ride
//! connections ([`network`]) that can be delayed, stalled by a partition or reset.
//!
//! One seeded RNG picks every step ([`world::World::step`]): an agent processes pending
//! membership events, time passes (leases run out, ticks), a frame is delivered, the
//! server runs a copy or a commit, a client writes, flushes, acks, reads or reconnects, a
//! reader attaches or detaches, a snapshot is created or deleted, or a fault ([`faults`]).
//! Then the world is healed, every node powered on, and it must converge
//! ([`checkers::gather_ends`]), finish the applications' I/O quietly and pass the final
//! checks.
//!
//! # Checkers
//!
//! See [`checkers`]: one serving engine per store at any instant (globally) and none after
//! a quorum loss; no origin write granted before the gathered clients settled, nor on a
//! chunk read-locked by a client the engine knows of; every snapshot reads as the origin
//! did at its creation plus its own writes; every acknowledged write (origin or snapshot)
//! survives; a deleted snapshot is gone and its space comes back; every request is
//! answered; the gather always ends; a stale node writes nothing before it is fenced or
//! reset. These also check failover for the server engine (`engine_model.rs` has none).
//!
//! # Replay
//!
//! Every failure prints its seed and `CSNAP_SIM_SEED=<seed> cargo test -p csnap-sim --test
//! schedules -- --nocapture`, which replays that schedule alone with its whole trace.
//! The soak command is `cargo run -p csnap-sim --release --bin csnap-sim -- --schedules N
//! [--seed S] [--keep-going] [--reset]`.
//!
//! Seeds pick `fencing: kill_node` or `stonith` by parity; with `CSNAP_SIM_RESET=1` (or
//! `--reset`; always in CI's shards 2 and 3) `kill_node`, `reset` or `stonith` by seed
//! mod 3.

// A test crate: its public items exist for its own test binaries (the schedules), and the
// module docs above say what each part of the world is; a doc per field or variant would
// repeat the name.
#![allow(missing_docs)]

pub mod checkers;
pub mod client;
pub mod disk;
pub mod faults;
pub mod network;
pub mod node;
pub mod reference;
pub mod seed;
pub mod world;

pub use seed::Seed;
pub use world::{run, Options, Stats, World};
