//! csnap client library and NBD server.
