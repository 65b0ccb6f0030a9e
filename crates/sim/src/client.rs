//! One client of the volume on a node: the real client library's sans-IO pieces (its
//! `Session` per metadata connection, the origin client's `OriginTracker`) with the
//! application operations in flight. The world drives it as `client::conn`'s shell and
//! `Volume` do, in steps.
//!
//! The origin client's write lease is kept here in simulated time (`lease_until`): it is
//! renewed, like `MetaConnection` does, to the sending time of a request answered by
//! `OriginWriteOk` or `KeepAliveOk` plus the lease the server's `Welcome` gave. The
//! library's `OriginTracker` checks its lease against the real clock, so the world renews
//! the tracker far ahead and applies the simulated lease itself: a cached write only while
//! the lease runs, and a granted write only until `lease_until + LEASE_MARGIN` (the margin
//! the server counts for a data write already submitted when the lease ran out).
//!
//! A snapshot client (`Role::Reader`) reads and writes its snapshot, as `Volume`'s
//! `read_snapshot` and `write_snapshot` do: `SnapshotWrite` gives each chunk its own store
//! chunk and a write lease (the session keeps the leases and uploads them after a
//! failover); the data goes to those store chunks, then `FinishSnapshotWrite` releases
//! them. The protocol bounds a granted snapshot write by no lease in time, so the world
//! carries out the data writes only within [`SNAP_WRITE_WINDOW_MS`] of the grant (a
//! process stalled longer between the answer and its I/O is not modelled).

use std::collections::BTreeMap;
use std::sync::Arc;

use csnap_blockdev::client::session::Session;
use csnap_blockdev::client::{OriginTracker, WriteGuard};
use csnap_proto::{ChunkRange, ClientId, ClientKind, RequestId, SnapId, StoreAddr};

use crate::network::ConnId;

/// A granted snapshot write's data goes to the store only this long after the grant.
pub const SNAP_WRITE_WINDOW_MS: u64 = 5_000;
use crate::reference::ReadWindow;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Origin,
    Admin,
    Reader { snap: SnapId },
}

pub enum OpState {
    /// Waiting for the answer to this request.
    Asked(RequestId),
    /// Origin write: granted; the data write is next.
    Granted(#[allow(dead_code)] WriteGuard),
    /// Snapshot read: located; the device reads are next.
    Located {
        store: Vec<StoreAddr>,
        origin_locked: Vec<ChunkRange>,
    },
    /// Snapshot write: each chunk has its own store chunk and a write lease (granted at
    /// `at`, simulated ms); the data writes are next, then `FinishSnapshotWrite`.
    Leased { addrs: Vec<StoreAddr>, at: u64 },
}

pub enum OpKind {
    Write {
        first_sector: u64,
        sectors: u64,
        fua: bool,
        tag: u64,
    },
    Create {
        name: String,
    },
    Read {
        offset: u64,
        len: u32,
        /// What it may read, fixed when asked.
        window: ReadWindow,
    },
    /// A write to the client's snapshot (through `SnapshotWrite`, as `Volume::write_snapshot`).
    SnapWrite {
        first_sector: u64,
        sectors: u64,
        fua: bool,
        tag: u64,
    },
    Delete {
        snap: SnapId,
    },
}

pub struct Op {
    pub kind: OpKind,
    pub state: OpState,
}

pub struct Client {
    pub role: Role,
    pub id: ClientId,
    pub session: Session,
    pub tracker: Option<Arc<OriginTracker>>,
    pub conn: Option<ConnId>,
    pub ops: Vec<Op>,
    /// `NewSnapshot` notices whose ack waits for the writes of older epochs to drain.
    pub acks: Vec<(u64, SnapId)>,
    /// Writes (origin, or snapshot for a snapshot client) completed since this client's
    /// last flush: (tag, first sector, sectors).
    pub unflushed: Vec<(u64, u64, u64)>,
    /// Origin write lease (simulated ms); 0: none.
    pub lease_until: u64,
    /// The server's origin lease from `Welcome` (ms).
    pub lease_ms: u64,
    /// When each unanswered request was first handed to the session.
    pub sent: BTreeMap<RequestId, u64>,
    pub last_keepalive: u64,
    /// The engine run (server serial) its current connection goes to.
    pub conn_serial: Option<u64>,
    /// The engine run that knows this client's origin read locks: it granted them, or
    /// the client's `UploadLocks` reached it.
    pub locks_known_by: Option<u64>,
    /// The client process is frozen (SIGSTOP, swapped out) until then.
    pub frozen_until: u64,
}

impl Client {
    pub fn new(role: Role, instance: u64, node: u32, incarnation: u64, key: &[u8]) -> Client {
        let kind = match role {
            Role::Origin => ClientKind::Origin,
            Role::Admin => ClientKind::Admin,
            Role::Reader { snap } => ClientKind::Snapshot { snap },
        };
        let id = ClientId::new(instance, kind);
        Client {
            role,
            id,
            session: Session::new(id, node, incarnation, key.to_vec()),
            tracker: (role == Role::Origin).then(|| OriginTracker::new(1 << 12)),
            conn: None,
            ops: Vec::new(),
            acks: Vec::new(),
            unflushed: Vec::new(),
            lease_until: 0,
            lease_ms: 0,
            sent: BTreeMap::new(),
            last_keepalive: 0,
            conn_serial: None,
            locks_known_by: None,
            frozen_until: 0,
        }
    }

    pub fn frozen(&self, now: u64) -> bool {
        self.frozen_until > now
    }
}
