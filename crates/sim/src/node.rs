//! One node of the world: its agent (the real `VolumeMembership` with its in-memory group
//! and quorum handles), the volume's server when the agent runs one (the real `Engine` on
//! the real `Store` over the shared store device, with the server's chunk-copy
//! `DataPath`), and its clients.

use std::collections::{BTreeMap, BTreeSet};

use cpg_glue::memory::{MemoryGroup, MemoryQuorum, MemorySender};
use cpg_glue::NodeId;
use csnap_agent::cluster::VolumeMembership;
use csnap_proto::ClientId;
use csnap_server::engine::{CommitIo, CopyId, CopySource, Engine};
use csnap_server::net::DataPath;
use csnap_server::store::Store;

use crate::client::Client;

pub struct Agent {
    pub machine: VolumeMembership,
    pub group: MemoryGroup,
    pub sender: MemorySender,
    pub quorum: MemoryQuorum,
    pub incarnation: u64,
    /// The time of the last tick fed (every other input comes after a tick of its time).
    pub ticked: u64,
}

/// The server of one node, as the daemon's `LocalServer` has it.
pub enum Slot {
    Off,
    /// `StartServer` acknowledged; the store opens at `ActivateServer`.
    Ready {
        generation: u64,
    },
    Running(Box<Server>),
}

pub struct Server {
    pub engine: Engine<Store>,
    pub data: DataPath,
    pub generation: u64,
    /// Unique per server run in the world.
    pub serial: u64,
    pub copies: Vec<(CopyId, CopySource, u64)>,
    pub commit_due: bool,
    /// A commit begun whose journal I/O has not run yet (as the real server's runs on the
    /// blocking pool while the engine goes on handling events).
    pub commit_io: Option<CommitIo>,
    /// The activation gate as the agent gave it, and the clients that settled since
    /// (reconnected with `ResendDone`, or declared gone): what the gate checker compares.
    pub expected: BTreeSet<ClientId>,
    pub settled: BTreeSet<ClientId>,
    /// Connections whose `Hello` said `resuming: false`: that client settles at `Welcome`.
    pub fresh: BTreeMap<crate::network::ConnId, ClientId>,
    pub activated_at: u64,
}

/// Clients of every node when a server was chosen, and the chooser's view then.
pub type StartSnapshot = (BTreeMap<NodeId, BTreeSet<ClientId>>, Vec<NodeId>);

pub struct Node {
    pub id: NodeId,
    pub agent: Option<Agent>,
    pub slot: Slot,
    /// The serving lease the agent gave its server; the server stops when it runs out.
    pub lease_until: u64,
    pub clients: Vec<Client>,
    /// The agent sees nothing until then (its server and clients go on).
    pub frozen_until: u64,
    pub lag_until: u64,
    pub lag_quorum_only: bool,
    pub start_snapshot: Option<StartSnapshot>,
    /// The snapshot clients last reported to the agent.
    pub reported: Vec<ClientId>,
}

impl Node {
    pub fn new(id: NodeId) -> Node {
        Node {
            id,
            agent: None,
            slot: Slot::Off,
            lease_until: 0,
            clients: Vec::new(),
            frozen_until: 0,
            lag_until: 0,
            lag_quorum_only: false,
            start_snapshot: None,
            reported: Vec::new(),
        }
    }

    pub fn server(&self) -> Option<&Server> {
        match &self.slot {
            Slot::Running(s) => Some(s),
            _ => None,
        }
    }

    pub fn server_mut(&mut self) -> Option<&mut Server> {
        match &mut self.slot {
            Slot::Running(s) => Some(s),
            _ => None,
        }
    }

    /// Snapshot readers on this node (what the agent reports for the gather).
    pub fn readers(&self) -> Vec<ClientId> {
        let mut v: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|c| matches!(c.role, crate::client::Role::Reader { .. }))
            .map(|c| c.id)
            .collect();
        v.sort();
        v
    }
}
