//! What members of a volume's group tell each other: the per-member state message sent on
//! every membership change (and whenever the sender's own state changes), and the few
//! control messages of a failover and of merge handling.
//!
//! Encoded with MessagePack through [`cpg_glue::typed`] (named fields: a field added with a
//! serde default stays compatible). Every message carries a version; a message that does not
//! decode, or has a version this code does not speak, is dropped with a log line and never
//! panics the machine: a peer running other code must not take the group down.

use cpg_glue::{Delivery, Member, NodeId, RingId};
use csnap_proto::msg::ClientId;
use serde::{Deserialize, Serialize};

/// The message format this code sends. Version 1 is the first; later versions may only add
/// fields with serde defaults (an incompatible change needs a new group name), and any
/// version but 0 is decoded (a field this code does not know is ignored, one it misses
/// takes its default). Version 2 added [`MemberState::server_address`].
pub const MESSAGE_VERSION: u16 = 2;

/// Which server activation a member's state descends from: the volume generation (bumped by
/// every new server activation) and the node that was activated with it. Two members with
/// different lineages hold state from different histories of the volume. `Lineage::default()`
/// (generation 0, no server) is "never part of any activation".
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Lineage {
    /// The volume generation of that activation.
    pub generation: u64,
    /// The node activated with it (`None`: never activated).
    pub server: Option<NodeId>,
}

impl std::fmt::Display for Lineage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.server {
            Some(node) => write!(f, "g{}@{}", self.generation, node),
            None => write!(f, "g{}", self.generation),
        }
    }
}

/// What a member's local server is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// No server process on this node for the volume.
    #[default]
    Idle,
    /// Chosen: the server process was started and the gather runs; not serving yet.
    Starting,
    /// Activated with the gathered client list; serving while its lease lasts.
    Serving,
    /// Told to stop; its exit is not confirmed yet. Counts as a live server for everyone.
    Stopping,
}

impl Role {
    /// Whether a server process may exist on the node (anything but `Idle`).
    pub fn has_server(self) -> bool {
        self != Role::Idle
    }
}

/// One member's state, multicast after every confchg it sees and whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// The activation this member's state descends from.
    pub lineage: Lineage,
    /// Whether the member holds any state of a lineage: a generation, a server, or attached
    /// snapshot clients. A member without state can never be stale.
    pub has_state: bool,
    /// What the member does for the volume.
    pub role: Role,
    /// Snapshot clients attached on the member's node.
    pub clients: Vec<ClientId>,
    /// Milliseconds left of the member's serving lease when it sent this (0 if none);
    /// informational (clocks of different nodes are not compared).
    pub lease_left_ms: u64,
    /// The group membership the sender saw when it sent this. A state counts for a view only
    /// if this equals the receiver's membership (as dlm_controld matches START messages).
    pub view: Vec<Member>,
    /// Whether the sender's previous agreed view was quorate and it has not lost quorum since:
    /// the sender belongs to the quorate side that predates this view (merge handling).
    pub was_quorate: bool,
    /// Agreed views the sender has been in since its join: "longest in the group" for the
    /// server choice.
    pub age: u64,
    /// The ring for which the sender's history is *certain*: it knows every server that may
    /// still be active (see the module `cluster` docs, "certain history"). `None` if it is
    /// not certain, or has not seen the quorum service report this ring quorate yet. A
    /// receiver trusts it only for the ring of its own agreed view.
    pub certain: Option<RingId>,
    /// Nodes whose server the sender saw depart and does not know to be stopped yet.
    pub unsettled: Vec<NodeId>,
    /// Nodes the sender holds as stale (to be fenced or reset).
    pub stale: Vec<NodeId>,
    /// Nodes the sender has claimed to fence or reset and not finished with: a member that
    /// joins later learns who acts, so it never starts a second fencer.
    pub fencing: Vec<NodeId>,
    /// Nodes whose fencing the sender knows confirmed (and that have not come back with
    /// state since): a lost `Fenced` message cannot leave a member waiting.
    #[serde(default)]
    pub fenced: Vec<NodeId>,
    /// Where the sender's server listens while it runs one (`Starting`, `Serving`,
    /// `Stopping`; empty otherwise, and from version-1 senders): a member that joins after
    /// the announce learns the address from the server's state. Since version 2.
    #[serde(default)]
    pub server_address: String,
}

/// Messages of a volume's group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// A member's state, sent whenever it changes and to every new view.
    State(MemberState),
    /// The chosen member starts a new server: every member whose lineage is `prev` (or who
    /// holds no state) adopts `next` and answers with [`Body::Clients`].
    Announce {
        /// The lineage it replaces.
        prev: Lineage,
        /// The lineage of the new server.
        next: Lineage,
        /// Where the new server listens (for clients to reconnect).
        address: String,
    },
    /// The answer to an announce: the snapshot clients attached on the sender's node.
    Clients {
        /// The lineage the sender adopted with the announce.
        lineage: Lineage,
        /// The snapshot clients attached on the sender's node.
        clients: Vec<ClientId>,
    },
    /// The sender takes on fencing (or resetting) `node`. The first claim delivered for a
    /// node wins, so exactly one member acts even when views differ.
    FenceClaim {
        /// The node to fence.
        node: NodeId,
        /// Reset it (`csnapctl reset-node`) rather than fence it.
        reset: bool,
    },
    /// The claimant's fencing of `node` was confirmed.
    Fenced {
        /// The node fenced.
        node: NodeId,
    },
    /// The serving member's lease heartbeat, with the sender's own monotonic clock when it
    /// sent it. Delivered back to the sender in the view it was sent in (cpg-glue drops a
    /// frame sent in a view its receiver has left), it proves the ring was still alive after
    /// `sent_at_ms`: the lease is renewed to `sent_at_ms + serving_lease`, never from the
    /// time the agent happens to process it.
    Heartbeat {
        /// The sender's monotonic clock when it sent the heartbeat (ms).
        sent_at_ms: u64,
    },
}

/// A versioned message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The message format's version ([`MESSAGE_VERSION`] when sent by this build).
    pub version: u16,
    /// What it says.
    pub body: Body,
}

/// Why a delivered message was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes do not decode (the decoder's words).
    #[error("{0}")]
    Malformed(String),
    #[error(
        "message version {got} from {from} is not understood (this node speaks {MESSAGE_VERSION})"
    )]
    /// A version this build does not speak.
    Version {
        /// The message's version.
        got: u16,
        /// Who sent it.
        from: Member,
    },
}

impl Message {
    /// A message of this build's version.
    pub fn new(body: Body) -> Message {
        Message {
            version: MESSAGE_VERSION,
            body,
        }
    }

    /// Encodes for multicast. Encoding our own plain data cannot fail in practice; the
    /// error is returned rather than unwrapped all the same.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        cpg_glue::typed::encode(self).map_err(|e| e.to_string())
    }

    /// Decodes a delivery; never panics on any input.
    pub fn decode(delivery: &Delivery) -> Result<Message, DecodeError> {
        let msg: Message =
            cpg_glue::typed::decode(delivery).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if msg.version == 0 {
            return Err(DecodeError::Version {
                got: msg.version,
                from: delivery.from,
            });
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csnap_proto::msg::ClientKind;

    fn member(node: u32) -> Member {
        Member {
            node: NodeId(node),
            pid: 100 + node,
        }
    }

    fn sample() -> MemberState {
        MemberState {
            lineage: Lineage {
                generation: 3,
                server: Some(NodeId(2)),
            },
            has_state: true,
            role: Role::Serving,
            clients: vec![ClientId::new(
                7,
                ClientKind::Snapshot {
                    snap: csnap_proto::SnapId(1),
                },
            )],
            lease_left_ms: 5000,
            view: vec![member(1), member(2)],
            was_quorate: true,
            age: 4,
            certain: Some(cpg_glue::RingId {
                node: NodeId(1),
                seq: 4,
            }),
            unsettled: vec![NodeId(3)],
            stale: vec![],
            fencing: vec![],
            fenced: vec![],
            server_address: "node2:7000".into(),
        }
    }

    #[test]
    fn state_round_trips() {
        let msg = Message::new(Body::State(sample()));
        let payload = msg.encode().unwrap();
        let back = Message::decode(&Delivery {
            from: member(2),
            payload,
        })
        .unwrap();
        assert_eq!(back, msg);
    }

    /// A version-1 state (no `server_address`) still decodes, with an empty address.
    #[test]
    fn a_state_without_the_address_field_decodes() {
        #[derive(Serialize)]
        struct V1State {
            lineage: Lineage,
            has_state: bool,
            role: Role,
            clients: Vec<ClientId>,
            lease_left_ms: u64,
            view: Vec<Member>,
            was_quorate: bool,
            age: u64,
            certain: Option<RingId>,
            unsettled: Vec<NodeId>,
            stale: Vec<NodeId>,
            fencing: Vec<NodeId>,
        }
        #[derive(Serialize)]
        enum V1Body {
            State(V1State),
        }
        #[derive(Serialize)]
        struct V1Message {
            version: u16,
            body: V1Body,
        }
        let s = sample();
        let old = V1Message {
            version: 1,
            body: V1Body::State(V1State {
                lineage: s.lineage,
                has_state: s.has_state,
                role: s.role,
                clients: s.clients.clone(),
                lease_left_ms: s.lease_left_ms,
                view: s.view.clone(),
                was_quorate: s.was_quorate,
                age: s.age,
                certain: s.certain,
                unsettled: s.unsettled.clone(),
                stale: s.stale.clone(),
                fencing: s.fencing.clone(),
            }),
        };
        let payload = cpg_glue::typed::encode(&old).unwrap();
        let back = Message::decode(&Delivery {
            from: member(2),
            payload,
        })
        .unwrap();
        let Body::State(got) = back.body else {
            panic!("not a state: {back:?}")
        };
        assert_eq!(back.version, 1);
        assert_eq!(
            got,
            MemberState {
                server_address: String::new(),
                fenced: vec![],
                ..s
            }
        );
    }

    #[test]
    fn garbage_truncation_and_bad_versions_are_errors_not_panics() {
        let good = Message::new(Body::State(sample())).encode().unwrap();
        for cut in 0..good.len() {
            let d = Delivery {
                from: member(3),
                payload: good[..cut].to_vec(),
            };
            assert!(Message::decode(&d).is_err(), "cut at {cut}");
        }
        let mut flipped = good.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = Message::decode(&Delivery {
                from: member(3),
                payload: flipped.clone(),
            });
            flipped[i] ^= 0xff;
        }
        let zero = Message {
            version: 0,
            body: Body::Fenced { node: NodeId(1) },
        };
        let err = Message::decode(&Delivery {
            from: member(3),
            payload: zero.encode().unwrap(),
        })
        .unwrap_err();
        assert!(matches!(err, DecodeError::Version { got: 0, .. }));
    }

    #[test]
    fn lineages_order_by_generation_first() {
        let a = Lineage {
            generation: 2,
            server: Some(NodeId(9)),
        };
        let b = Lineage {
            generation: 3,
            server: Some(NodeId(1)),
        };
        assert!(a < b);
        assert!(Lineage::default() < a);
        assert_eq!(b.to_string(), "g3@1");
    }
}
