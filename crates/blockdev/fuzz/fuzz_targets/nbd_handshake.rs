//! Feeds arbitrary client bytes to the handshake state machine, in chunks whose sizes
//! also come from the input, answering lookups from a fixed export set. The machine
//! must never panic, never loop, and keep replies framed.
#![no_main]

use csnap_blockdev::nbd::consts::OPTION_REPLY_MAGIC;
use csnap_blockdev::nbd::{
    BlockSizes, ExportFeatures, ExportInfo, Handshake, HandshakeConfig, HandshakeStep,
};
use libfuzzer_sys::fuzz_target;

fn export(name: &str) -> ExportInfo {
    ExportInfo {
        name: name.to_owned(),
        description: Some("fuzz".into()),
        size: 1 << 30,
        read_only: name == "ro",
        features: ExportFeatures::default(),
        block_sizes: BlockSizes::default(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut hs = Handshake::new(HandshakeConfig::default());
    let mut pos = 0;
    let mut first = true;
    // Each step consumes input or finishes; bound the loop anyway.
    for _ in 0..(input.len() + 16) * 8 {
        match hs.step() {
            Ok(HandshakeStep::Write(bytes)) => {
                if !first {
                    assert_eq!(&bytes[..8], &OPTION_REPLY_MAGIC.to_be_bytes()[..]);
                }
                first = false;
            }
            Ok(HandshakeStep::ReadMore) => {
                if pos >= input.len() {
                    return;
                }
                let end = (pos + chunk).min(input.len());
                hs.feed(&input[pos..end]);
                pos = end;
            }
            Ok(HandshakeStep::ListExports) => {
                hs.exports_listed(&[export("disk"), export("ro")]).unwrap();
            }
            Ok(HandshakeStep::OpenExport { name }) => {
                let found = matches!(name.as_str(), "" | "disk" | "ro").then(|| export(&name));
                if hs.export_opened(found.as_ref()).is_err() {
                    return;
                }
            }
            Ok(HandshakeStep::Transmission(_)) | Ok(HandshakeStep::Aborted) | Err(_) => return,
        }
    }
    panic!("handshake made no progress");
});
