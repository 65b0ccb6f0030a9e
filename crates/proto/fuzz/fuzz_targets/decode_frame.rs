//! Any bytes: decoding never panics; whatever decodes re-encodes (within the frame limit)
//! to a frame that decodes to the same message.
#![no_main]

use csnap_proto::{decode_frame, frame_bytes, ClientFrame, Decoded, ServerFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
