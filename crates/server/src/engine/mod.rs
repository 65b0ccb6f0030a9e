//! The sans-IO request engine of the metadata server (events in, actions out), and the
//! store interface it runs on.
//!
//! * [`MetaStore`]: what the engine needs from the snapshot store; [`MemStore`] is the
//!   in-memory reference implementation.
//! * [`Engine`]: feed [`Event`]s, carry out [`Action`]s. No sockets, threads or clocks.

mod io;
mod machine;
pub mod meta_store;

pub use io::{
    Action, ConnId, CopyId, CopyPurpose, CopySource, EngineConfig, Event, LogEvent, LogLevel,
    StoreFullPolicy, LEASE_MARGIN_SECS, WARN_REARM_POINTS,
};
pub use machine::Engine;
pub use meta_store::{
    Exception, MemStore, MetaError, MetaStore, MetadataSpace, ReclaimPosition, ReclaimProgress,
    SnapChunk, StoreStats, CREATE_TOKEN_MASK,
};
