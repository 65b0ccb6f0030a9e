//! The NBD server and the data path: the raw protocol, the backend, the activation gate
//! and real NBD clients. One test binary (one module per former file) so the workspace links
//! one binary here instead of four.

#[path = "../nbd_support/mod.rs"]
mod nbd_support;

mod nbd_activation;
mod nbd_backend;
mod nbd_block_status;
mod nbd_clients;
mod nbd_raw;
