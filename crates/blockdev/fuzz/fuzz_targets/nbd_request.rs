//! Parses and validates arbitrary request headers against exports of varying shape.
//! Accepted data commands must lie inside the export and respect its limits.
#![no_main]

use csnap_blockdev::nbd::consts::REQUEST_HEADER_LEN;
use csnap_blockdev::nbd::{
    validate, BlockSizes, Command, ExportFeatures, ExportInfo, RequestHeader,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let minimum = [1u32, 512, 4096, 65536][usize::from(shape & 3)];
    let export = ExportInfo {
        name: "disk".into(),
        description: None,
        size: u64::from(shape) << 20,
        read_only: shape & 4 != 0,
        features: ExportFeatures {
            trim: shape & 8 != 0,
            write_zeroes: shape & 16 != 0,
            fua: shape & 32 != 0,
            ..Default::default()
        },
        block_sizes: BlockSizes {
            minimum,
            preferred: minimum.max(4096),
            maximum_payload: 32 << 20,
        },
    };
    for header in rest.chunks(REQUEST_HEADER_LEN) {
        let Ok(request) = RequestHeader::parse(header) else {
            continue;
        };
        assert_eq!(RequestHeader::parse(&request.encode()), Ok(request));
        let Ok(command) = validate(&request, &export) else {
            continue;
        };
        let (offset, len, writes) = match command {
            Command::Read { offset, len } => (offset, len, false),
            Command::Write { offset, len, .. } => (offset, len, true),
            Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. } => {
                (offset, len, true)
            }
            Command::BlockStatus { .. } | Command::Flush | Command::Disconnect => continue,
        };
        assert!(!(writes && export.read_only));
        assert!(offset + u64::from(len) <= export.size);
        assert_eq!(offset % u64::from(minimum), 0);
        assert_eq!(len % minimum, 0);
    }
});
