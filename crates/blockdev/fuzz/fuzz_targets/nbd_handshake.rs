//! Feeds arbitrary client bytes to the handshake state machine, in chunks whose sizes
//! also come from the input, answering lookups from a fixed export set. The machine
//! must never panic, never loop, and keep replies framed.
#![no_main]

use csnap_blockdev::nbd::consts::OPTION_REPLY_MAGIC;
use csnap_blockdev::nbd::{
    BlockSizes, ExportFeatures, ExportInfo, Handshake, HandshakeConfig, HandshakeInput, HandshakeOutput, MetaContext,
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
        let step = hs.poll_output();
        if let Some(bytes) = unchecked.take() {
            match &step {
                Ok(HandshakeOutput::Transmission(_)) if bytes.len() == 10 || bytes.len() == 134 => {}
                _ => assert_option_replies(&bytes),
            }
        }
        match step {
            Ok(HandshakeOutput::Write(bytes)) => {
                if first {
                    assert_eq!(bytes.len(), 18, "greeting");
                } else {
                    unchecked = Some(bytes);
                }
                first = false;
            }
            Ok(HandshakeOutput::ReadMore) => {
                if pos >= input.len() {
                    return;
                }
                let end = (pos + chunk).min(input.len());
                hs.handle(HandshakeInput::Bytes(&input[pos..end])).unwrap();
                pos = end;
            }
            Ok(HandshakeOutput::ListExports) => {
                hs.handle(HandshakeInput::ExportsListed(&[export("disk"), export("ro")])).unwrap();
            }
            Ok(HandshakeOutput::OpenExport { name }) => {
                let found = matches!(name.as_str(), "" | "disk" | "ro").then(|| export(&name));
                if hs.handle(HandshakeInput::ExportOpened(found.as_ref())).is_err() {
                    return;
                }
            }
            Ok(HandshakeOutput::MetaContexts { name }) => {
                let offered = [
                    MetaContext::new("base:allocation", 0),
                    MetaContext::new("qemu:dirty-bitmap:s1", 1),
                ];
                let found = matches!(name.as_str(), "" | "disk" | "ro").then_some(&offered[..]);
                hs.handle(HandshakeInput::MetaContexts(found)).unwrap();
            }
            Ok(HandshakeOutput::Transmission(_)) | Ok(HandshakeOutput::Aborted) | Err(_) => return,
        }
    }
    panic!("handshake made no progress");
});
