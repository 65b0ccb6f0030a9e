//! Feeds arbitrary client bytes to the handshake state machine, in chunks whose sizes
//! also come from the input, answering lookups from a fixed export set. The machine
//! must never panic, never loop, and keep replies framed.
#![no_main]

use csnap_blockdev::nbd::consts::OPTION_REPLY_MAGIC;
use csnap_blockdev::nbd::{
    BlockSizes, ExportFeatures, ExportInfo, Handshake, HandshakeConfig, HandshakeStep, MetaContext,
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

/// Every write after the greeting is a whole number of framed option replies.
fn assert_option_replies(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        assert!(bytes.len() >= 20, "truncated option reply");
        assert_eq!(&bytes[..8], &OPTION_REPLY_MAGIC.to_be_bytes()[..]);
        let len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
        assert!(
            bytes.len() >= 20 + len,
            "option reply shorter than its length"
        );
        bytes = &bytes[20 + len..];
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
    // The last write is checked once we know whether it ended the handshake: the
    // OPT_EXPORT_NAME reply (size, flags, maybe zeroes) is not an option reply.
    let mut unchecked: Option<Vec<u8>> = None;
    // Each step consumes input or finishes; bound the loop anyway.
    for _ in 0..(input.len() + 16) * 8 {
        let step = hs.step();
        if let Some(bytes) = unchecked.take() {
            match &step {
                Ok(HandshakeStep::Transmission(_)) if bytes.len() == 10 || bytes.len() == 134 => {}
                _ => assert_option_replies(&bytes),
            }
        }
        match step {
            Ok(HandshakeStep::Write(bytes)) => {
                if first {
                    assert_eq!(bytes.len(), 18, "greeting");
                } else {
                    unchecked = Some(bytes);
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
            Ok(HandshakeStep::MetaContexts { name }) => {
                let offered = [
                    MetaContext::new("base:allocation", 0),
                    MetaContext::new("qemu:dirty-bitmap:s1", 1),
                ];
                let found = matches!(name.as_str(), "" | "disk" | "ro").then_some(&offered[..]);
                hs.meta_contexts_found(found).unwrap();
            }
            Ok(HandshakeStep::Transmission(_)) | Ok(HandshakeStep::Aborted) | Err(_) => return,
        }
    }
    panic!("handshake made no progress");
});
