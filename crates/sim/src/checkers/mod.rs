//! The checkers, one per file. Each returns `Err(finding)`; the world stops the schedule
//! at the first finding and prints it with the trace and the replay command.
//!
//! * [`one_server`]: at most one serving engine per store at any instant, across all
//!   partitions; none on a node whose agent was told its partition lost quorum;
//! * [`gate`]: no origin write granted before the gathered clients settled (reconnected
//!   with `ResendDone` or declared gone), and every activation lists every snapshot client
//!   of every member present from the choice to the activation;
//! * [`snapshots`]: no origin write in flight when the store creates a snapshot, and every
//!   snapshot reads as the origin did at its creation plus its own writes (a promised
//!   snapshot write survives crashes like an origin write);
//! * [`read_locks`]: no origin write granted on a chunk while a snapshot client connected
//!   to that engine holds a read lock on it the engine granted or had uploaded;
//! * [`deletes`]: a deleted snapshot is gone: no read or write of it granted after its
//!   deletion was acknowledged, never listed live again, and its space comes back;
//! * [`durability`]: every acknowledged (promised durable) write survives node crashes,
//!   and every snapshot reported created stays listed;
//! * [`answered`]: once settled, every request of an open session is answered (resent
//!   requests are not lost at a failover);
//! * [`gather_ends`]: once healed and quiet, the failover finishes: one server, its
//!   activation gate open, every member agreeing on it;
//! * [`stale`]: a node that holds itself stale has no serving engine (it writes nothing
//!   before it is fenced or reset).

pub mod answered;
pub mod deletes;
pub mod durability;
pub mod gate;
pub mod gather_ends;
pub mod one_server;
pub mod read_locks;
pub mod snapshots;
pub mod stale;

/// A checker's verdict.
pub type Check = Result<(), String>;
