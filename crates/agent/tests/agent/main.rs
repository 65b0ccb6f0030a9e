//! The agent, csnapctl and the client library against real servers and real NBD clients:
//! standalone mode, cluster mode's shell on the in-memory group, client sessions (follow,
//! identities, resends, snapshots, paging), `csnapctl` and the packaging files. One test
//! binary (one module per former file) so the workspace links one binary here instead of
//! ten.

#[path = "../support/mod.rs"]
mod support;

#[path = "../support/rollback_wait.rs"]
mod rollback_wait;

mod block_status;
mod check_cli;
mod client_follow;
mod client_identity;
mod client_resend;
mod client_snapshots;
mod cluster_memory;
mod csnapctl_admin;
mod diff;
mod many_snapshots;
mod nbd_conformance;
mod packaging;
mod rollback;
mod standalone;
mod xdiff;
