//! csnap agent: membership, server choice, failover, merge handling.
//!
//! For now: the cluster configuration from corosync.conf ([`config`]), standalone mode
//! ([`standalone`]) with its control socket ([`control`]) and the csnapctl snapshot/status
//! subcommands ([`ctl`]); the membership core of cluster mode ([`cluster`]), a sans-IO
//! state machine not yet wired into the daemon.

pub mod cluster;
pub mod config;
pub mod control;
pub mod ctl;
pub mod standalone;
