//! csnap client library and NBD server.

pub mod nbd;
