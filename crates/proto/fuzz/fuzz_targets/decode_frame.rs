//! Any bytes: decoding never panics, plain or sealed; whatever decodes re-encodes (within
//! the frame limit) to a frame that decodes to the same message, plain and sealed.
#![no_main]

use csnap_proto::auth::{session_keys, Handshake};
use csnap_proto::{
    decode_frame, decode_frame_with, encode_frame_with, frame_bytes, ClientFrame, ClientId,
    ClientKind, Decoded, FrameOpener, FrameSealer, ServerFrame,
};
use libfuzzer_sys::fuzz_target;

fn keys() -> csnap_proto::auth::SessionKeys {
    session_keys(
        b"fuzz key",
        &Handshake {
            protocol_version: 5,
            client: ClientId::new(1, ClientKind::Origin),
            node: 1,
            incarnation: 1,
            resuming: false,
            client_nonce: [1; 32],
            server_nonce: [2; 32],
        },
    )
}

fuzz_target!(|data: &[u8]| {
    let keys = keys();
    // Random bytes never pass the tag check (and never panic trying).
    let mut opener = FrameOpener::new(&keys.client_to_server);
    assert!(!matches!(
        decode_frame_with::<ClientFrame>(data, Some(&mut opener)),
        Ok(Decoded::Frame(..))
    ));
    if let Ok(Decoded::Frame(msg, _)) = decode_frame::<ClientFrame>(data) {
        // A compact input (structs as arrays) may re-encode past the frame limit.
        let Ok(again) = frame_bytes(&msg) else {
            return;
        };
        match decode_frame::<ClientFrame>(&again) {
            Ok(Decoded::Frame(back, used)) => {
                assert_eq!(back, msg);
                assert_eq!(used, again.len());
            }
            other => panic!("re-encoded frame does not decode: {other:?}"),
        }
        let mut sealed = Vec::new();
        if encode_frame_with(
            &msg,
            Some(&mut FrameSealer::new(&keys.client_to_server)),
            &mut sealed,
        )
        .is_ok()
        {
            let mut opener = FrameOpener::new(&keys.client_to_server);
            assert!(matches!(
                decode_frame_with::<ClientFrame>(&sealed, Some(&mut opener)),
                Ok(Decoded::Frame(ref back, _)) if *back == msg
            ));
        }
    }
    if let Ok(Decoded::Frame(msg, _)) = decode_frame::<ServerFrame>(data) {
        let Ok(again) = frame_bytes(&msg) else {
            return;
        };
        assert!(matches!(
            decode_frame::<ServerFrame>(&again),
            Ok(Decoded::Frame(ref back, _)) if *back == msg
        ));
    }
});
