//! The sans-IO request engine of the metadata server (events in, actions out), and the
//! store interface it runs on.
//!
//! * [`MetaStore`]: what the engine needs from the snapshot store; [`MemStore`] is the
//!   in-memory reference implementation.
//! * [`Engine`]: feed [`Event`]s, carry out [`Action`]s. No sockets, threads or clocks.
//! * [`MetaError`] -> [`Failure`] -> [`Fatal`]: the error chain (each keeps its cause as
//!   `source`); [`error_chain`] prints one on a line.
//!
//! The engine's state is split into parts, each a struct in its own file with pure
//! methods on its own state and one invariant to keep; `machine.rs` holds the [`Engine`],
//! which owns one of each and, with the flows in its child modules (`session_flow.rs`,
//! `io_flow.rs`, `copy_flow.rs`, `snapshot_flow.rs`, `status.rs`, `rollback_flow.rs`), is
//! the only code that combines them (the parts never import it):
//!
//! * `sessions`: connections, authentication, what each holds, lost origin clients;
//! * `gate`: the activation gate (snapshot clients of the previous server awaited);
//! * `locks`: read locks, snapshot write leases, orphaned locks;
//! * `work` and `waiters`: requests not answered yet, and what each waits for;
//! * `copies`: origin copy-outs and unshares in flight;
//! * `commits`: store generations, the commit in flight, replies deferred until durable;
//! * `snapshots`: snapshot creations from request through announcement to visibility;
//! * `space`: usage warning levels logged;
//! * `rollback`: the online rollback's copy-back (window, cursor, what is durable).

mod commits;
mod copies;
mod failure;
mod gate;
mod io;
mod locks;
mod machine;
pub mod meta_store;
mod requests;
mod rollback;
mod sessions;
mod snapshots;
mod space;
mod waiters;
mod work;

pub use failure::{chain as error_chain, Failure, Fatal};
pub use io::{
    Action, CommitIo, ConnId, CopyId, CopyPurpose, CopySource, EngineConfig, Event, LogEvent,
    LogLevel, StoreFullPolicy, LEASE_MARGIN_SECS, WARN_REARM_POINTS,
};
pub use machine::Engine;
pub use meta_store::{
    Cause, Exception, MemStore, MetaError, MetaStore, MetadataSpace, ReclaimPosition,
    ReclaimProgress, Refusal, RollbackRecord, SnapChunk, StoreStats, CREATE_TOKEN_MASK,
};
