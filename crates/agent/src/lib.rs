//! csnap agent: membership, server choice, failover, merge handling.
//!
//! For now: standalone mode ([`standalone`]) with its control socket ([`control`]) and
//! the csnapctl snapshot/status subcommands ([`ctl`]).

pub mod control;
pub mod ctl;
pub mod standalone;
