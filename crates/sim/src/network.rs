//! Client <-> server connections. Frames ride TCP, so within a connection each direction
//! is in order; the faults a connection suffers are delay (frames held back for a while),
//! a stall across a partition (nothing passes until the heal), and drop, which is a
//! connection reset seen by both ends (the client's library reconnects and resumes its
//! session). Membership messages do not ride these: they go through the in-memory CPG
//! (`cpg_glue::memory`), which has its own partitions and heals.

use std::collections::VecDeque;

use csnap_proto::{ClientFrame, ClientId, ServerFrame};

/// The engine's connection id type.
pub type ConnId = csnap_server::engine::ConnId;

/// One connection between a client on `client_node` and the server on `server_node`.
#[derive(Debug)]
pub struct Conn {
    pub client_node: usize,
    pub client: ClientId,
    pub server_node: usize,
    /// Which server run on that node (a restarted server never sees an old connection).
    pub server_serial: u64,
    pub up: VecDeque<ClientFrame>,
    pub down: VecDeque<ServerFrame>,
    /// Frames are held back until then.
    pub delayed_until: u64,
}

impl Conn {
    pub fn new(client_node: usize, client: ClientId, server_node: usize, serial: u64) -> Conn {
        Conn {
            client_node,
            client,
            server_node,
            server_serial: serial,
            up: VecDeque::new(),
            down: VecDeque::new(),
            delayed_until: 0,
        }
    }
}
