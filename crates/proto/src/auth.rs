//! Mutual challenge/response authentication with the cluster key (HMAC-SHA256).
//!
//! Both sides contribute a fresh nonce. The server proves the key first (so a client never
//! sends a proof to an impostor that could replay it), then the client. The proofs use
//! different labels, so one side's proof can never be reflected as the other's.

use crate::msg::{ClientId, ClientKind};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// 32 random bytes, fresh per connection.
pub type Nonce = [u8; 32];
/// An HMAC-SHA256 tag.
pub type Mac = [u8; 32];

type HmacSha256 = Hmac<Sha256>;

const SERVER_LABEL: &[u8] = b"csnap v1 server proof";
const CLIENT_LABEL: &[u8] = b"csnap v1 client proof";

/// A fresh random nonce (OS-seeded RNG).
pub fn random_nonce() -> Nonce {
    rand::random()
}

/// The client id as the proofs cover it: instance (u64 LE), kind (0 origin, 1 admin,
/// 2 snapshot), snapshot id (u64 LE, 0 unless a snapshot connection).
fn client_id_bytes(client: ClientId) -> [u8; 17] {
    let (kind, snap) = match client.kind {
        ClientKind::Origin => (0u8, 0u64),
        ClientKind::Admin => (1, 0),
        ClientKind::Snapshot { snap } => (2, snap.0),
    };
    let mut out = [0u8; 17];
    out[..8].copy_from_slice(&client.instance.to_le_bytes());
    out[8] = kind;
    out[9..].copy_from_slice(&snap.to_le_bytes());
    out
}

fn tag(
    key: &[u8],
    label: &[u8],
    client: ClientId,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
) -> HmacSha256 {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(label);
    mac.update(&client_id_bytes(client));
    mac.update(client_nonce);
    mac.update(server_nonce);
    mac
}

/// The server's proof of the cluster key.
pub fn server_proof(
    key: &[u8],
    client: ClientId,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
) -> Mac {
    tag(key, SERVER_LABEL, client, client_nonce, server_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// The client's proof of the cluster key.
pub fn client_proof(
    key: &[u8],
    client: ClientId,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
) -> Mac {
    tag(key, CLIENT_LABEL, client, client_nonce, server_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a server proof in constant time.
pub fn verify_server_proof(
    key: &[u8],
    client: ClientId,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
    proof: &Mac,
) -> bool {
    tag(key, SERVER_LABEL, client, client_nonce, server_nonce)
        .verify_slice(proof)
        .is_ok()
}

/// Checks a client proof in constant time.
pub fn verify_client_proof(
    key: &[u8],
    client: ClientId,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
    proof: &Mac,
) -> bool {
    tag(key, CLIENT_LABEL, client, client_nonce, server_nonce)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_key_and_role() {
        let (cn, sn) = ([1u8; 32], [2u8; 32]);
        let c = ClientId::new(7, ClientKind::Origin);
        let sp = server_proof(b"key", c, &cn, &sn);
        assert!(verify_server_proof(b"key", c, &cn, &sn, &sp));
        assert!(!verify_server_proof(b"other", c, &cn, &sn, &sp));
        assert!(
            !verify_client_proof(b"key", c, &cn, &sn, &sp),
            "no reflection"
        );
        assert!(!verify_server_proof(
            b"key",
            ClientId::new(8, ClientKind::Origin),
            &cn,
            &sn,
            &sp
        ));
        // The kind is part of the identity the proof covers.
        assert!(!verify_server_proof(
            b"key",
            ClientId::new(7, ClientKind::Admin),
            &cn,
            &sn,
            &sp
        ));
        let snap = |s| {
            ClientId::new(
                7,
                ClientKind::Snapshot {
                    snap: crate::SnapId(s),
                },
            )
        };
        let ssp = server_proof(b"key", snap(1), &cn, &sn);
        assert!(!verify_server_proof(b"key", snap(2), &cn, &sn, &ssp));
        let cp = client_proof(b"key", c, &cn, &sn);
        assert!(verify_client_proof(b"key", c, &cn, &sn, &cp));
        assert!(!verify_client_proof(b"key", c, &sn, &cn, &cp));
        assert_ne!(random_nonce(), random_nonce());
    }
}
