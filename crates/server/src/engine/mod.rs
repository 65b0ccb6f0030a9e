//! The sans-IO request engine of the metadata server (events in, actions out), and the
//! store interface it runs on.

pub mod meta_store;

pub use meta_store::{
    Exception, MemStore, MetaStore, ReclaimProgress, SnapChunk, StoreError, StoreStats,
};
