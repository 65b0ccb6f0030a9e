//! The real server over real sockets and files: the protocol, crashes, leases, space, the
//! cluster generation check, and the request-rate benchmark (ignored). One test binary (one
//! module per former file) so the workspace links one binary here instead of six.

#[path = "../server_support/mod.rs"]
mod server_support;

mod server_bench;
mod server_cluster_generation;
mod server_crash;
mod server_lease;
mod server_net;
mod server_space;
