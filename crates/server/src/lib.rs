//! csnap snapshot store and metadata server.
pub mod engine;
pub mod logging;
pub mod net;
pub mod store;
