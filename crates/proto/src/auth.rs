//! Authentication with the cluster key (HMAC-SHA256): a mutual challenge/response over the
//! whole handshake, then a key per connection and direction that authenticates every later
//! frame (see [`crate::frame::FrameSealer`]).
//!
//! Both sides contribute a fresh nonce. The server proves the key first (so a client never
//! sends a proof to an impostor that could replay it), then the client. The proofs use
//! different labels, so one side's proof can never be reflected as the other's. Proofs and
//! frame keys cover every field of the handshake ([`Handshake`]): a relayed handshake with
//! any field changed fails, and frames of one connection are worthless on another.

use crate::types::{ClientId, ClientKind};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use std::fmt;

/// 32 random bytes, fresh per connection.
pub type Nonce = [u8; 32];
/// An HMAC-SHA256 tag.
pub type Mac = [u8; 32];

pub(crate) type HmacSha256 = Hmac<Sha256>;

const SERVER_PROOF: &[u8] = b"csnap v5 server proof";
const CLIENT_PROOF: &[u8] = b"csnap v5 client proof";
const CLIENT_TO_SERVER: &[u8] = b"csnap v5 client-to-server frames";
const SERVER_TO_CLIENT: &[u8] = b"csnap v5 server-to-client frames";

/// A fresh random nonce (OS-seeded RNG).
pub fn random_nonce() -> Nonce {
    rand::random()
}

/// Everything the two sides said in a handshake: the client's `Hello` and the server's
/// nonce. Proofs and frame keys are computed over all of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// The protocol version the client speaks.
    pub protocol_version: u32,
    /// Who the connection is, and what it is for.
    pub client: ClientId,
    /// The client's node.
    pub node: u32,
    /// Random per client process, the same on every reconnect.
    pub incarnation: u64,
    /// The client had a session with a previous server.
    pub resuming: bool,
    /// The client's random nonce for this connection.
    pub client_nonce: Nonce,
    /// The server's random nonce for this connection.
    pub server_nonce: Nonce,
}

impl Handshake {
    /// The transcript as the MACs cover it: fixed-width fields, so no two handshakes
    /// encode alike. Client id: instance (u64 LE), kind (0 origin, 1 admin, 2 snapshot),
    /// snapshot id (u64 LE, 0 unless a snapshot connection).
    fn transcript(&self) -> [u8; 4 + 17 + 4 + 8 + 1 + 32 + 32] {
        let (kind, snap) = match self.client.kind {
            ClientKind::Origin => (0u8, 0u64),
            ClientKind::Admin => (1, 0),
            ClientKind::Snapshot { snap } => (2, snap.0),
        };
        let mut out = [0u8; 98];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&self.protocol_version.to_le_bytes());
        put(&self.client.instance.to_le_bytes());
        put(&[kind]);
        put(&snap.to_le_bytes());
        put(&self.node.to_le_bytes());
        put(&self.incarnation.to_le_bytes());
        put(&[u8::from(self.resuming)]);
        put(&self.client_nonce);
        put(&self.server_nonce);
        out
    }

    fn tag(&self, key: &[u8], label: &[u8]) -> HmacSha256 {
        let mut mac = keyed(key);
        mac.update(label);
        mac.update(&[0]);
        mac.update(&self.transcript());
        mac
    }
}

/// HMAC-SHA256 keyed with `key`.
pub(crate) fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

/// The server's proof of the cluster key.
pub fn server_proof(key: &[u8], handshake: &Handshake) -> Mac {
    handshake
        .tag(key, SERVER_PROOF)
        .finalize()
        .into_bytes()
        .into()
}

/// The client's proof of the cluster key.
pub fn client_proof(key: &[u8], handshake: &Handshake) -> Mac {
    handshake
        .tag(key, CLIENT_PROOF)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a server proof in constant time.
pub fn verify_server_proof(key: &[u8], handshake: &Handshake, proof: &Mac) -> bool {
    handshake.tag(key, SERVER_PROOF).verify_slice(proof).is_ok()
}

/// Checks a client proof in constant time.
pub fn verify_client_proof(key: &[u8], handshake: &Handshake, proof: &Mac) -> bool {
    handshake.tag(key, CLIENT_PROOF).verify_slice(proof).is_ok()
}

/// A key that authenticates the frames of one direction of one connection.
#[derive(Clone, PartialEq, Eq)]
pub struct FrameKey(pub(crate) [u8; 32]);

impl fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FrameKey(..)")
    }
}

/// The two frame keys of a connection, derived from the cluster key and the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionKeys {
    /// Seals the client's frames.
    pub client_to_server: FrameKey,
    /// Seals the server's frames.
    pub server_to_client: FrameKey,
}

/// The frame keys of the connection that made `handshake`.
pub fn session_keys(key: &[u8], handshake: &Handshake) -> SessionKeys {
    let derive = |label| FrameKey(handshake.tag(key, label).finalize().into_bytes().into());
    SessionKeys {
        client_to_server: derive(CLIENT_TO_SERVER),
        server_to_client: derive(SERVER_TO_CLIENT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake() -> Handshake {
        Handshake {
            protocol_version: 5,
            client: ClientId::new(7, ClientKind::Origin),
            node: 3,
            incarnation: 0x1234,
            resuming: false,
            client_nonce: [1u8; 32],
            server_nonce: [2u8; 32],
        }
    }

    /// Every field of the handshake changes both proofs and both frame keys.
    fn variants() -> Vec<(&'static str, Handshake)> {
        let h = handshake();
        let snap = |s| {
            ClientId::new(
                7,
                ClientKind::Snapshot {
                    snap: crate::SnapId(s),
                },
            )
        };
        vec![
            (
                "protocol_version",
                Handshake {
                    protocol_version: 4,
                    ..h
                },
            ),
            (
                "instance",
                Handshake {
                    client: ClientId::new(8, ClientKind::Origin),
                    ..h
                },
            ),
            (
                "kind",
                Handshake {
                    client: ClientId::new(7, ClientKind::Admin),
                    ..h
                },
            ),
            (
                "snapshot kind",
                Handshake {
                    client: snap(0),
                    ..h
                },
            ),
            ("node", Handshake { node: 4, ..h }),
            (
                "incarnation",
                Handshake {
                    incarnation: 0x1235,
                    ..h
                },
            ),
            (
                "resuming",
                Handshake {
                    resuming: true,
                    ..h
                },
            ),
            (
                "client_nonce",
                Handshake {
                    client_nonce: [3u8; 32],
                    ..h
                },
            ),
            (
                "server_nonce",
                Handshake {
                    server_nonce: [3u8; 32],
                    ..h
                },
            ),
            (
                "swapped nonces",
                Handshake {
                    client_nonce: h.server_nonce,
                    server_nonce: h.client_nonce,
                    ..h
                },
            ),
        ]
    }

    #[test]
    fn proofs_verify_only_with_the_same_key_role_and_handshake() {
        let h = handshake();
        let sp = server_proof(b"key", &h);
        let cp = client_proof(b"key", &h);
        assert!(verify_server_proof(b"key", &h, &sp));
        assert!(verify_client_proof(b"key", &h, &cp));
        assert!(!verify_server_proof(b"other", &h, &sp));
        assert!(!verify_client_proof(b"key", &h, &sp), "no reflection");
        assert!(!verify_server_proof(b"key", &h, &cp), "no reflection");
        for (field, other) in variants() {
            assert!(
                !verify_server_proof(b"key", &other, &sp),
                "server proof ignores {field}"
            );
            assert!(
                !verify_client_proof(b"key", &other, &cp),
                "client proof ignores {field}"
            );
        }
        assert_ne!(random_nonce(), random_nonce());
    }

    #[test]
    fn frame_keys_differ_per_direction_handshake_and_key() {
        let h = handshake();
        let keys = session_keys(b"key", &h);
        assert_ne!(keys.client_to_server, keys.server_to_client);
        assert_ne!(keys, session_keys(b"other", &h));
        assert_eq!(keys, session_keys(b"key", &h));
        for (field, other) in variants() {
            let k = session_keys(b"key", &other);
            assert_ne!(
                k.client_to_server, keys.client_to_server,
                "key ignores {field}"
            );
            assert_ne!(
                k.server_to_client, keys.server_to_client,
                "key ignores {field}"
            );
        }
        // Frame keys are not the proofs (a proof seen on the wire gives no frame key).
        assert_ne!(keys.client_to_server.0, client_proof(b"key", &h));
        assert_eq!(format!("{:?}", keys.client_to_server), "FrameKey(..)");
    }
}
