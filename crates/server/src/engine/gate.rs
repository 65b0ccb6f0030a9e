//! Part of the engine's state: the activation gate after a failover.
//!
//! Invariant: while a snapshot client of the previous server is awaited, no origin write
//! is granted and nothing is reclaimed (its read locks and write leases are not uploaded
//! yet); the set only shrinks, and the gate never closes again once open.

use csnap_proto::ClientId;
use std::collections::BTreeSet;

pub(super) struct Gate {
    awaited: BTreeSet<ClientId>,
}

impl Gate {
    /// A gate waiting for `clients` (open at once if there are none).
    pub(super) fn new(clients: &[ClientId]) -> Gate {
        Gate {
            awaited: clients.iter().copied().collect(),
        }
    }

    pub(super) fn is_open(&self) -> bool {
        self.awaited.is_empty()
    }

    /// The clients still awaited, in order.
    pub(super) fn awaited(&self) -> Vec<ClientId> {
        self.awaited.iter().copied().collect()
    }

    /// `client` is back or gone: true if it was awaited.
    pub(super) fn settle(&mut self, client: ClientId) -> bool {
        self.awaited.remove(&client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csnap_proto::{ClientKind, SnapId};

    #[test]
    fn opens_when_the_last_awaited_client_settles() {
        let a = ClientId::new(1, ClientKind::Snapshot { snap: SnapId(1) });
        let b = ClientId::new(2, ClientKind::Snapshot { snap: SnapId(1) });
        let mut g = Gate::new(&[b, a, b]);
        assert_eq!(g.awaited(), vec![a, b]);
        assert!(g.settle(a) && !g.settle(a));
        assert!(!g.is_open());
        assert!(g.settle(b) && g.is_open());
        assert!(Gate::new(&[]).is_open());
    }
}
