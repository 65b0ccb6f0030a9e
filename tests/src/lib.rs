//! csnap-e2e: the end-to-end test harness. [`Cluster`] builds an N-node corosync cluster
//! in network namespaces on this machine (one bridge, a veth and a namespace per node, one
//! corosync per node in its own mount namespace), and offers what tests need: stop, kill
//! and restart a node's corosync, partition and heal the network, run commands or
//! in-process corosync clients inside a node, rewrite the `csnap` section and reload,
//! and wait (bounded) for the expected membership. It implements
//! [`cpg_glue::testkit::TestCluster`], so the behavioural suite that runs on the
//! in-memory cluster runs on real corosync too. [`pacemaker::Pacemaker`] adds one
//! pacemakerd per node for the Pacemaker tests. See docs/testing.md.

// A test crate: its public items are the harness its own tests and benchmark binaries
// use, described per module; a doc per field or variant would repeat the name.
#![allow(missing_docs)]

pub mod bench;
pub mod cluster;
pub mod cmd;
pub mod conf;
pub mod error;
pub mod gather_sim;
pub mod journald;
pub mod names;
pub mod nbd_writer;
pub mod pacemaker;
pub mod prereq;
pub mod rig;
mod spawn;
pub mod sweep;
mod testkit_impl;
pub mod text;
pub mod topology;
pub mod view;

pub use cluster::{Cluster, ClusterConfig};
pub use conf::CsnapSection;
pub use error::HarnessError;
pub use prereq::prerequisites_or_skip;
pub use view::NodeView;

/// Signals for [`Cluster::stop_spawned`].
pub use nix::sys::signal::Signal;
