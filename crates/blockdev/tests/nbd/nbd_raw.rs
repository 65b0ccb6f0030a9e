//! Protocol behaviour against a hand-written client: option haggling, error handling
//! that keeps the connection usable, and many requests in flight.

use crate::nbd_support;

use std::collections::HashMap;

use csnap_blockdev::nbd::consts::*;
use nbd_support::*;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_info_and_unknown_option_keep_sync() {
    let server = TestServer::start(&[("disk", 4 * MIB, false), ("ro", MIB, true)]).await;
    let mut c = RawClient::connect(server.tcp).await;

    // An unknown option with a payload is refused and skipped...
    c.send_option(0x7777, b"some payload").await;
    let reply = c.read_opt_reply().await;
    assert_eq!((reply.option, reply.kind), (0x7777, REP_ERR_UNSUP));

    // ...and the next option is parsed from the right place.
    c.send_option(OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let reply = c.read_opt_reply().await;
        assert_eq!(reply.option, OPT_LIST);
        if reply.kind == REP_ACK {
            break;
        }
        assert_eq!(reply.kind, REP_SERVER);
        let len = u32::from_be_bytes(reply.data[0..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(reply.data[4..4 + len].to_vec()).unwrap());
    }
    assert_eq!(names, ["disk", "ro"]);

    // OPT_LIST with data is invalid but harmless.
    c.send_option(OPT_LIST, b"x").await;
    assert_eq!(c.read_opt_reply().await.kind, REP_ERR_INVALID);

    // OPT_INFO reports size and flags and stays in negotiation.
    let replies = c
        .info_or_go(OPT_INFO, "ro", &[INFO_BLOCK_SIZE, INFO_NAME])
        .await;
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    let (size, flags) = export_info(&replies).unwrap();
    assert_eq!(size, MIB);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(
        flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FUA),
        0
    );
    let block = replies
        .iter()
        .find(|r| r.data.len() == 14 && r.data[0..2] == INFO_BLOCK_SIZE.to_be_bytes())
        .expect("block size info");
    assert_eq!(&block.data[2..6], &1u32.to_be_bytes());
    assert_eq!(&block.data[6..10], &4096u32.to_be_bytes());
    assert_eq!(&block.data[10..14], &(32u32 << 20).to_be_bytes());
    assert!(replies
        .iter()
        .any(|r| r.data.starts_with(&INFO_NAME.to_be_bytes()) && &r.data[2..] == b"ro"));

    // A malformed OPT_GO payload gets REP_ERR_INVALID, not a disconnect.
    c.send_option(OPT_GO, &[0, 0, 0, 200, b'x']).await;
    assert_eq!(c.read_opt_reply().await.kind, REP_ERR_INVALID);

    let (size, flags) = c.go("disk").await;
    assert_eq!(size, 4 * MIB);
    let expected = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_FAST_ZERO
        | TFLAG_CAN_MULTI_CONN;
    assert_eq!(flags, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_then_another_one() {
    let server = TestServer::start(&[("disk", MIB, false)]).await;
    let mut c = RawClient::connect(server.tcp).await;
    let replies = c.info_or_go(OPT_GO, "nope", &[]).await;
    assert_eq!(replies.len(), 1, "no INFO replies for an unknown export");
    assert_eq!(replies[0].kind, REP_ERR_UNKNOWN);
    // The default export (empty name) is the first one.
    let replies = c.info_or_go(OPT_INFO, "", &[]).await;
    assert_eq!(export_info(&replies).unwrap().0, MIB);
    let (size, _) = c.go("disk").await;
    assert_eq!(size, MIB);
    c.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    assert_eq!(
        c.read_reply().await,
        TxReply::Simple {
            cookie: 1,
            error: 0,
            data: vec![0; 512]
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_that_connection() {
    let server = TestServer::start(&[("disk", MIB, false)]).await;
    let mut good = RawClient::connect(server.tcp).await;

    // Bad option magic.
    let mut bad = RawClient::connect(server.tcp).await;
    bad.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    bad.expect_closed().await;
    // Unknown client flags.
    let mut bad = RawClient::connect_raw(server.tcp).await;
    bad.read_exact(18).await;
    bad.send(&0xffff_ffffu32.to_be_bytes()).await;
    bad.expect_closed().await;
    // Unknown name with the old OPT_EXPORT_NAME: the protocol requires a disconnect.
    let mut bad = RawClient::connect(server.tcp).await;
    bad.send_option(OPT_EXPORT_NAME, b"nope").await;
    bad.expect_closed().await;
    // Bad request magic in transmission.
    let mut bad = RawClient::connect(server.tcp).await;
    bad.go("disk").await;
    bad.send(&[0xde; 28]).await;
    bad.expect_closed().await;

    // The connection opened before, and new ones, still work.
    good.go("disk").await;
    good.request(CMD_WRITE, 0, 7, 0, 4, b"abcd").await;
    assert_eq!(
        good.read_reply().await,
        TxReply::Simple {
            cookie: 7,
            error: 0,
            data: vec![]
        }
    );
    let mut fresh = RawClient::connect(server.tcp).await;
    fresh.go("disk").await;
    fresh.request(CMD_READ, 0, 8, 0, 4, &[]).await;
    assert_eq!(
        fresh.read_reply().await,
        TxReply::Simple {
            cookie: 8,
            error: 0,
            data: b"abcd".to_vec()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_connection_stays_usable() {
    let server = TestServer::start(&[("disk", MIB, false), ("ro", MIB, true)]).await;
    let mut c = RawClient::connect(server.tcp).await;
    c.go("disk").await;
    let simple = |cookie, error| TxReply::Simple {
        cookie,
        error,
        data: vec![],
    };

    c.request(CMD_READ, 0, 1, MIB - 512, 1024, &[]).await;
    assert_eq!(c.read_reply().await, simple(1, EINVAL));
    c.request(CMD_READ, 0, 2, u64::MAX - 10, 512, &[]).await;
    assert_eq!(c.read_reply().await, simple(2, EINVAL), "offset overflow");
    // A write past the end: its payload must be skipped to find the next request.
    let payload = vec![0x5a; 4096];
    c.request(CMD_WRITE, 0, 3, MIB, 4096, &payload).await;
    assert_eq!(c.read_reply().await, simple(3, ENOSPC));
    c.request(CMD_TRIM, 0, 4, MIB, 1, &[]).await;
    assert_eq!(c.read_reply().await, simple(4, EINVAL));
    c.request(0x55, 0, 5, 0, 0, &[]).await;
    assert_eq!(c.read_reply().await, simple(5, EINVAL), "unknown command");
    c.request(CMD_READ, 1 << 9, 6, 0, 512, &[]).await;
    assert_eq!(c.read_reply().await, simple(6, EINVAL), "unknown flag");
    c.request(CMD_READ, 0, 9, 0, (32 << 20) + 1, &[]).await;
    assert_eq!(
        c.read_reply().await,
        simple(9, EINVAL),
        "read above the maximum payload"
    );

    // Still in sync: a good write and read.
    c.request(CMD_WRITE, CMD_FLAG_FUA, 10, 4096, 4096, &payload)
        .await;
    assert_eq!(c.read_reply().await, simple(10, 0));
    c.request(CMD_READ, 0, 11, 4096, 4096, &[]).await;
    assert_eq!(
        c.read_reply().await,
        TxReply::Simple {
            cookie: 11,
            error: 0,
            data: payload.clone()
        }
    );
    // Zero-length read succeeds with no data.
    c.request(CMD_READ, 0, 12, 0, 0, &[]).await;
    assert_eq!(c.read_reply().await, simple(12, 0));

    // Write zeroes (with and without NO_HOLE), trim, flush.
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 13, 4096, 1024, &[])
        .await;
    assert_eq!(c.read_reply().await, simple(13, 0));
    c.request(CMD_WRITE_ZEROES, 0, 14, 5120, 3072, &[]).await;
    assert_eq!(c.read_reply().await, simple(14, 0));
    c.request(CMD_READ, 0, 15, 4096, 4096, &[]).await;
    assert_eq!(
        c.read_reply().await,
        TxReply::Simple {
            cookie: 15,
            error: 0,
            data: vec![0; 4096]
        }
    );
    c.request(CMD_TRIM, CMD_FLAG_FUA, 16, 0, 65536, &[]).await;
    assert_eq!(c.read_reply().await, simple(16, 0));
    c.request(CMD_FLUSH, 0, 17, 0, 0, &[]).await;
    assert_eq!(c.read_reply().await, simple(17, 0));

    // Soft disconnect closes the connection.
    c.request(CMD_DISC, 0, 18, 0, 0, &[]).await;
    c.expect_closed().await;

    // Read-only export: every write kind gets EPERM, payloads are skipped, reads work.
    let mut r = RawClient::connect(server.tcp).await;
    r.go("ro").await;
    r.request(CMD_WRITE, 0, 1, 0, 512, &[1; 512]).await;
    assert_eq!(r.read_reply().await, simple(1, EPERM));
    r.request(CMD_TRIM, 0, 2, 0, 512, &[]).await;
    assert_eq!(r.read_reply().await, simple(2, EPERM));
    r.request(CMD_WRITE_ZEROES, 0, 3, 0, 512, &[]).await;
    assert_eq!(r.read_reply().await, simple(3, EPERM));
    r.request(CMD_READ, 0, 4, 0, 512, &[]).await;
    assert_eq!(
        r.read_reply().await,
        TxReply::Simple {
            cookie: 4,
            error: 0,
            data: vec![0; 512]
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies_carry_data_and_errors() {
    let server = TestServer::start(&[("disk", MIB, false)]).await;
    let mut c = RawClient::connect(server.tcp).await;
    c.negotiate_structured().await;
    // Asking twice is refused without harm.
    c.send_option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.read_opt_reply().await.kind, REP_ERR_INVALID);
    c.go("disk").await;

    let data = pattern(3, 8192);
    c.request(CMD_WRITE, 0, 1, 8192, 8192, &data).await;
    // Success without data may come as a simple reply.
    assert_eq!(
        c.read_reply().await,
        TxReply::Simple {
            cookie: 1,
            error: 0,
            data: vec![]
        }
    );

    c.request(CMD_READ, 0, 2, 8192, 8192, &[]).await;
    match c.read_reply().await {
        TxReply::Chunk {
            cookie: 2,
            flags,
            kind,
            payload,
        } => {
            assert_eq!(flags, REPLY_FLAG_DONE);
            assert_eq!(kind, REPLY_TYPE_OFFSET_DATA);
            assert_eq!(&payload[0..8], &8192u64.to_be_bytes());
            assert_eq!(&payload[8..], &data[..]);
        }
        other => panic!("expected an OFFSET_DATA chunk, got {other:?}"),
    }

    c.request(CMD_READ, 0, 3, MIB, 512, &[]).await;
    let reply = c.read_reply().await;
    assert_eq!(chunk_error(&reply), Some(EINVAL), "{reply:?}");
    if let TxReply::Chunk { flags, payload, .. } = &reply {
        assert_eq!(*flags, REPLY_FLAG_DONE);
        let msg_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
        assert_eq!(payload.len(), 6 + msg_len);
        assert!(String::from_utf8_lossy(&payload[6..]).contains("exceeds"));
    }

    // A zero-length read is a NONE chunk, never a simple reply.
    c.request(CMD_READ, 0, 4, 0, 0, &[]).await;
    assert_eq!(
        c.read_reply().await,
        TxReply::Chunk {
            cookie: 4,
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_NONE,
            payload: vec![]
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_option_and_abort() {
    let server = TestServer::start(&[("disk", 3 * MIB, false)]).await;
    // With NO_ZEROES: size and flags only.
    let mut c = RawClient::connect(server.tcp).await;
    c.send_option(OPT_EXPORT_NAME, b"disk").await;
    let reply = c.read_exact(10).await;
    assert_eq!(&reply[0..8], &(3 * MIB).to_be_bytes());
    c.request(CMD_READ, 0, 1, 0, 16, &[]).await;
    assert_eq!(
        c.read_reply().await,
        TxReply::Simple {
            cookie: 1,
            error: 0,
            data: vec![0; 16]
        }
    );

    // Without NO_ZEROES: 124 zero bytes follow.
    let mut c = RawClient::connect_raw(server.tcp).await;
    c.read_exact(18).await;
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await;
    c.send_option(OPT_EXPORT_NAME, b"").await;
    let reply = c.read_exact(10 + 124).await;
    assert_eq!(&reply[0..8], &(3 * MIB).to_be_bytes());
    assert!(reply[10..].iter().all(|&b| b == 0));
    c.request(CMD_READ, 0, 2, 0, 16, &[]).await;
    assert_eq!(
        c.read_reply().await,
        TxReply::Simple {
            cookie: 2,
            error: 0,
            data: vec![0; 16]
        }
    );

    let mut c = RawClient::connect(server.tcp).await;
    c.send_option(OPT_ABORT, &[]).await;
    let reply = c.read_opt_reply().await;
    assert_eq!((reply.option, reply.kind), (OPT_ABORT, REP_ACK));
    c.expect_closed().await;
}

/// Many writes and reads in flight at once on one connection: every cookie gets exactly
/// one reply, and the data read back matches a model of the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_match_a_model() {
    let seed = test_seed("pipelined_requests_match_a_model");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    const SIZE: u64 = 2 * MIB;
    const BLOCK: u64 = 4096;
    let server = TestServer::start(&[("disk", SIZE, false)]).await;
    let mut c = RawClient::connect(server.tcp).await;
    c.go("disk").await;
    let mut model = vec![0u8; SIZE as usize];

    // Round 1: writes to distinct blocks, all sent before any reply is read.
    let blocks = SIZE / BLOCK;
    let mut chosen: Vec<u64> = (0..blocks).collect();
    for i in (1..chosen.len()).rev() {
        chosen.swap(i, rng.gen_range(0..=i));
    }
    chosen.truncate(200);
    let mut expected = HashMap::new();
    for (cookie, &block) in chosen.iter().enumerate() {
        let data = pattern(rng.gen(), BLOCK as usize);
        let offset = block * BLOCK;
        model[offset as usize..(offset + BLOCK) as usize].copy_from_slice(&data);
        let flags = if rng.gen_bool(0.2) { CMD_FLAG_FUA } else { 0 };
        c.request(CMD_WRITE, flags, cookie as u64, offset, BLOCK as u32, &data)
            .await;
        expected.insert(cookie as u64, ());
    }
    for _ in 0..chosen.len() {
        match c.read_reply().await {
            TxReply::Simple {
                cookie, error: 0, ..
            } => {
                assert!(
                    expected.remove(&cookie).is_some(),
                    "duplicate or unknown cookie {cookie}"
                );
            }
            other => panic!("write failed: {other:?}"),
        }
    }
    assert!(expected.is_empty());

    // Round 2: random reads of any length, pipelined, checked against the model.
    let mut reads = HashMap::new();
    for cookie in 1000..1300u64 {
        let offset = rng.gen_range(0..SIZE - 1);
        let len = rng.gen_range(1..=(SIZE - offset).min(64 * 1024)) as u32;
        reads.insert(cookie, (offset, len));
        c.request(CMD_READ, 0, cookie, offset, len, &[]).await;
    }
    for _ in 0..reads.len() {
        match c.read_reply().await {
            TxReply::Simple {
                cookie,
                error: 0,
                data,
            } => {
                let (offset, len) = reads.remove(&cookie).expect("known cookie");
                assert_eq!(data.len(), len as usize);
                assert!(
                    data == model[offset as usize..offset as usize + len as usize],
                    "data mismatch at {offset}+{len} (seed {seed})"
                );
            }
            other => panic!("read failed: {other:?}"),
        }
    }
    assert!(reads.is_empty());
    let on_disk = std::fs::read(&server.export("disk").path).unwrap();
    assert!(
        on_disk == model,
        "file content differs from the model (seed {seed})"
    );
}

/// Requests sent in the same packet as OPT_GO (before its reply) are not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pipelined_behind_opt_go_are_served() {
    let server = TestServer::start(&[("disk", MIB, false)]).await;
    let mut c = RawClient::connect(server.tcp).await;
    let mut go = (4u32).to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    let mut msg = IHAVEOPT.to_be_bytes().to_vec();
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    msg.extend_from_slice(&(go.len() as u32).to_be_bytes());
    msg.extend_from_slice(&go);
    let request = csnap_blockdev::nbd::RequestHeader {
        flags: 0,
        kind: CMD_READ,
        cookie: 99,
        offset: 0,
        length: 8,
    };
    msg.extend_from_slice(&request.encode());
    c.send(&msg).await;
    c.pending_reads.insert(99, 8);
    loop {
        if c.read_opt_reply().await.kind == REP_ACK {
            break;
        }
    }
    assert_eq!(
        c.read_reply().await,
        TxReply::Simple {
            cookie: 99,
            error: 0,
            data: vec![0; 8]
        }
    );
}

/// A client that never finishes the handshake is dropped after the timeout, and with
/// one request slot per connection requests are still all answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_and_single_slot() {
    let config = csnap_blockdev::nbd::ServerConfig {
        max_in_flight: 1,
        handshake_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let server = TestServer::start_with(&[("disk", MIB, false)], config).await;
    let mut idle = RawClient::connect(server.tcp).await;
    let started = std::time::Instant::now();
    idle.expect_closed().await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));

    let mut c = RawClient::connect(server.tcp).await;
    c.go("disk").await;
    for cookie in 0..50u64 {
        let data = pattern(cookie, 512);
        c.request(CMD_WRITE, 0, cookie, cookie * 512, 512, &data)
            .await;
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        match c.read_reply().await {
            TxReply::Simple {
                cookie, error: 0, ..
            } => assert!(seen.insert(cookie)),
            other => panic!("{other:?}"),
        }
    }
    let file = std::fs::read(&server.export("disk").path).unwrap();
    for cookie in 0..50u64 {
        let at = (cookie * 512) as usize;
        assert_eq!(&file[at..at + 512], &pattern(cookie, 512)[..]);
    }
}
