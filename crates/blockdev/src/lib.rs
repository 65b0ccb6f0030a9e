//! csnap client library and NBD server.

pub mod client;
pub mod export;
pub mod nbd;
pub mod sparse;
