//! csnap agent: membership, server choice, failover, merge handling.
//!
//! * [`daemon`]: cluster mode, every volume of corosync.conf's `csnap` section, driven by
//!   the membership core [`cluster`] (a sans-IO state machine);
//! * [`standalone`]: one machine, no cluster;
//! * [`config`]: the `csnap` section of corosync.conf, read through cmap;
//! * [`control`] and [`snapshot_ops`]: the control socket and what it serves;
//!   [`ctl`]: the csnapctl subcommands ([`ctl_rollback`]: online rollback).

pub mod cluster;
pub mod config;
pub mod control;
pub mod ctl;
pub mod ctl_diff;
pub mod ctl_rollback;
pub mod ctl_xdiff;
pub mod daemon;
pub mod snapshot_ops;
pub mod standalone;
