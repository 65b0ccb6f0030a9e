//! Framing and message round trips, and the bad-input cases: every malformed frame is a
//! clear error, never a panic.

use csnap_proto::*;
use proptest::prelude::*;

fn all_client_msgs() -> Vec<ClientMsg> {
    let r = vec![ChunkRange::new(3, 2), ChunkRange::new(100, 1)];
    vec![
        ClientMsg::Hello {
            protocol_version: u32::from(PROTOCOL_VERSION),
            client: ClientId::new(0xfeed, ClientKind::Snapshot { snap: SnapId(4) }),
            node: 2,
            incarnation: 0x1234_5678_9abc_def0,
            client_nonce: [9; 32],
            resuming: true,
        },
        ClientMsg::AuthResponse { proof: [7; 32] },
        ClientMsg::QueryWrite { ranges: r.clone() },
        ClientMsg::QuerySnapshotRead {
            snap: SnapId(1),
            ranges: r.clone(),
        },
        ClientMsg::FinishSnapshotRead {
            snap: SnapId(1),
            ranges: r.clone(),
        },
        ClientMsg::SnapshotWrite {
            snap: SnapId(2),
            ranges: r.clone(),
        },
        ClientMsg::NewSnapshotAck { snap: SnapId(5) },
        ClientMsg::FinishSnapshotWrite {
            snap: SnapId(2),
            ranges: r.clone(),
        },
        ClientMsg::UploadLocks {
            locks: vec![HeldLock {
                snap: SnapId(1),
                range: r[0],
            }],
            leases: vec![HeldLock {
                snap: SnapId(1),
                range: r[1],
            }],
        },
        ClientMsg::ResendDone,
        ClientMsg::CreateSnapshot {
            name: "nightly".into(),
            token: create_token(),
        },
        ClientMsg::DeleteSnapshot { snap: SnapId(3) },
        ClientMsg::FindSnapshot {
            name: "nightly".into(),
        },
        ClientMsg::ListSnapshots {
            after: Some(SnapId(7)),
            limit: 100,
        },
        ClientMsg::Status,
        ClientMsg::Rollback {
            snap: SnapId(1),
            pin_name: "before-rollback".into(),
        },
        ClientMsg::QueryOriginRead {
            ranges: vec![ChunkRange::new(0, 8)],
        },
        ClientMsg::Diff {
            from: DiffEnd::Snapshot(SnapId(3)),
            to: DiffEnd::Origin,
            start: 17,
            budget: 4096,
        },
        ClientMsg::KeepAlive,
        ClientMsg::ReleaseStoreReads {
            snap: SnapId(4),
            ranges: vec![ChunkRange::new(0, 3)],
        },
    ]
}

fn all_server_msgs() -> Vec<ServerMsg> {
    let info = SnapshotInfo {
        id: SnapId(3),
        name: "n".into(),
        ctime: 1_700_000_000,
        state: SnapshotState::Invalid {
            reason: "store full".into(),
        },
        chunks_held: 12,
    };
    vec![
        ServerMsg::Challenge {
            server_nonce: [1; 32],
            proof: [2; 32],
        },
        ServerMsg::Welcome {
            protocol_version: 1,
            chunk_size: 65536,
            origin_chunks: 1 << 20,
            origin_lease_secs: 10,
            rollback: false,
        },
        ServerMsg::KeepAliveOk,
        ServerMsg::OriginWriteOk {
            ranges: vec![ChunkRange::new(1, 8)],
            unique: true,
        },
        ServerMsg::SnapshotReadOk {
            store: vec![StoreAddr {
                chunk: 1,
                store_chunk: 77,
            }],
            origin_locked: vec![ChunkRange::new(2, 1)],
        },
        ServerMsg::FinishSnapshotReadOk,
        ServerMsg::SnapshotWriteOk {
            addrs: vec![StoreAddr {
                chunk: 5,
                store_chunk: 6,
            }],
        },
        ServerMsg::FinishSnapshotWriteOk,
        ServerMsg::NewSnapshot { snap: SnapId(9) },
        ServerMsg::UploadLocksOk,
        ServerMsg::ResendDoneOk,
        ServerMsg::SnapshotCreated { info: info.clone() },
        ServerMsg::SnapshotDeleted { snap: SnapId(3) },
        ServerMsg::SnapshotFound { info: info.clone() },
        ServerMsg::SnapshotList {
            snapshots: vec![info],
            more: true,
            usage_exact: false,
        },
        ServerMsg::DiffPage(DiffPage {
            ranges: vec![ChunkRange::new(4, 2), ChunkRange::new(9, 1)],
            next: Some(12),
            records_walked: 5,
        }),
        ServerMsg::Status(ServerStatus {
            active: false,
            awaited_clients: vec![ClientId::new(1, ClientKind::Snapshot { snap: SnapId(2) })],
            connected_clients: 3,
            chunk_size: 4096,
            origin_chunks: 10,
            store_chunks: 20,
            free_chunks: 5,
            snapshots: 2,
            pending_snapshots: 1,
            store_full_policy: "invalidate-oldest".into(),
            reclaiming: true,
            usage_exact: true,
            metadata_blocks: 256,
            free_metadata_blocks: 40,
            space_warnings: vec![SpaceWarning {
                area: StoreArea::Metadata,
                level_percent: 80,
                used_percent: 84,
            }],
            reclaim: Some(ReclaimStatus {
                snapshots: vec![SnapId(4)],
                position: 7,
                origin_chunks: 10,
            }),
            rollback: Some(Box::new(RollbackStatus {
                source: SnapId(1),
                pin: SnapId(5),
                position: 3,
                origin_chunks: 10,
                chunks_copied: 2,
                source_name: "before-upgrade".into(),
                pin_name: "broken-1".into(),
            })),
        }),
        ServerMsg::Welcome {
            protocol_version: 7,
            chunk_size: 65536,
            origin_chunks: 1 << 20,
            origin_lease_secs: 10,
            rollback: true,
        },
        ServerMsg::RollbackStarting {
            source: SnapId(1),
            pin: SnapId(5),
        },
        ServerMsg::RollbackDone { source: SnapId(1) },
        ServerMsg::OriginReadOk {
            store: vec![StoreAddr {
                chunk: 3,
                store_chunk: 900,
            }],
            source: Some(SnapId(1)),
        },
        ServerMsg::Error {
            code: ErrorCode::RollbackInProgress,
            message: "a rollback of the origin to snapshot 1 is in progress".into(),
        },
        ServerMsg::Error {
            code: ErrorCode::NoSuchSnapshot,
            message: "no snapshot named x".into(),
        },
        ServerMsg::Error {
            code: ErrorCode::DuplicateClient,
            message: "client 0x64/origin is already connected".into(),
        },
    ]
}

#[test]
fn create_tokens_are_random_and_fit_what_the_server_keeps() {
    let tokens: std::collections::HashSet<u64> = (0..1000).map(|_| create_token()).collect();
    assert!(tokens.len() > 990, "tokens repeat");
    for t in tokens {
        assert!(t != 0 && t < 1 << CREATE_TOKEN_BITS, "{t:#x}");
    }
}

#[test]
fn client_ids_print_and_parse_and_every_kind_is_its_own_identity() {
    let ids = [
        ClientId::new(0x64, ClientKind::Origin),
        ClientId::new(0x64, ClientKind::Admin),
        ClientId::new(0x64, ClientKind::Snapshot { snap: SnapId(0) }),
        ClientId::new(
            0x64,
            ClientKind::Snapshot {
                snap: SnapId(u64::MAX),
            },
        ),
        ClientId::new(u64::MAX, ClientKind::Origin),
    ];
    for (i, a) in ids.iter().enumerate() {
        assert_eq!(a.to_string().parse::<ClientId>(), Ok(*a), "{a}");
        for b in &ids[i + 1..] {
            assert_ne!(a, b);
        }
    }
    assert_eq!(ids[0].to_string(), "0x64/origin");
    assert_eq!(ids[2].to_string(), "0x64/snap0");
    assert_eq!(
        "100/snap7".parse::<ClientId>(),
        Ok(ClientId::new(100, ClientKind::Snapshot { snap: SnapId(7) }))
    );
    for bad in [
        "",
        "0x64",
        "0x64/",
        "/origin",
        "0x64/snap",
        "0x64/snapx",
        "zz/admin",
        "1/admins",
    ] {
        let err = bad.parse::<ClientId>().expect_err(bad);
        assert!(err.contains("INSTANCE/origin"), "{err}");
    }
}

#[test]
fn every_message_round_trips_through_a_frame() {
    for (i, msg) in all_client_msgs().into_iter().enumerate() {
        let frame = ClientFrame { id: i as u64, msg };
        let bytes = frame_bytes(&frame).unwrap();
        assert_eq!(decode_complete_frame::<ClientFrame>(&bytes).unwrap(), frame);
    }
    for (i, msg) in all_server_msgs().into_iter().enumerate() {
        let frame = ServerFrame {
            reply_to: if i % 2 == 0 { Some(i as u64) } else { None },
            msg,
        };
        let bytes = frame_bytes(&frame).unwrap();
        assert_eq!(decode_complete_frame::<ServerFrame>(&bytes).unwrap(), frame);
    }
}

#[test]
fn a_stream_of_frames_decodes_frame_by_frame_and_partial_frames_wait() {
    let frames: Vec<ClientFrame> = all_client_msgs()
        .into_iter()
        .enumerate()
        .map(|(i, msg)| ClientFrame { id: i as u64, msg })
        .collect();
    let mut stream = Vec::new();
    for f in &frames {
        encode_frame(f, &mut stream).unwrap();
    }
    let mut pos = 0;
    let mut decoded = Vec::new();
    while pos < stream.len() {
        // A prefix that stops one byte short of the frame end is Incomplete.
        if let Decoded::Frame(_, used) = decode_frame::<ClientFrame>(&stream[pos..]).unwrap() {
            assert!(matches!(
                decode_frame::<ClientFrame>(&stream[pos..pos + used - 1]).unwrap(),
                Decoded::Incomplete { need } if need == used
            ));
        }
        match decode_frame::<ClientFrame>(&stream[pos..]).unwrap() {
            Decoded::Frame(f, used) => {
                decoded.push(f);
                pos += used;
            }
            Decoded::Incomplete { .. } => panic!("whole stream present"),
        }
    }
    assert_eq!(decoded, frames);
}

#[test]
fn oversize_frames_are_rejected_on_both_sides() {
    let mut buf = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    buf.push(PROTOCOL_VERSION);
    let err = decode_frame::<ClientFrame>(&buf).unwrap_err();
    assert!(matches!(err, FrameError::Oversize { .. }), "{err}");
    assert!(err.to_string().contains("exceeds the maximum"));

    let huge = ClientFrame {
        id: 1,
        msg: ClientMsg::QueryWrite {
            ranges: vec![ChunkRange::new(u64::MAX, u32::MAX); MAX_FRAME / 8],
        },
    };
    assert!(matches!(
        frame_bytes(&huge),
        Err(FrameError::Oversize { .. })
    ));
}

#[test]
fn truncated_wrong_version_empty_and_garbage_frames_are_clear_errors() {
    let good = frame_bytes(&ClientFrame {
        id: 7,
        msg: ClientMsg::Status,
    })
    .unwrap();

    let err = decode_complete_frame::<ClientFrame>(&good[..good.len() - 1]).unwrap_err();
    assert!(matches!(err, FrameError::Truncated { .. }), "{err}");

    let mut wrong = good.clone();
    wrong[4] = 99;
    let err = decode_frame::<ClientFrame>(&wrong).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("unsupported protocol version 99 (this side speaks {PROTOCOL_VERSION})")
    );

    assert!(matches!(
        decode_frame::<ClientFrame>(&[0, 0, 0, 0]),
        Err(FrameError::Empty)
    ));

    let garbage = [0, 0, 0, 4, PROTOCOL_VERSION, 0xc1, 0xff, 0x00];
    let err = decode_frame::<ClientFrame>(&garbage).unwrap_err();
    assert!(matches!(err, FrameError::Malformed(_)), "{err}");

    // A valid body followed by junk inside the frame.
    let mut padded = good.clone();
    padded.push(0);
    let len = (padded.len() - 4) as u32;
    padded[..4].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(
        decode_frame::<ClientFrame>(&padded),
        Err(FrameError::TrailingBytes(1))
    ));

    // A server frame is not a client frame.
    let server = frame_bytes(&ServerFrame {
        reply_to: None,
        msg: ServerMsg::ResendDoneOk,
    })
    .unwrap();
    assert!(matches!(
        decode_frame::<ClientFrame>(&server),
        Err(FrameError::Malformed(_))
    ));
}

#[test]
fn codec_decodes_split_input_and_reports_truncation_at_eof() {
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};
    let mut codec = FrameCodec::<ClientFrame, ClientFrame>::new();
    let frame = ClientFrame {
        id: 3,
        msg: ClientMsg::ListSnapshots {
            after: None,
            limit: 10,
        },
    };
    let mut wire = BytesMut::new();
    codec.encode(frame.clone(), &mut wire).unwrap();
    codec.encode(frame.clone(), &mut wire).unwrap();
    let mut rx = BytesMut::new();
    let mut got = Vec::new();
    for b in wire.iter() {
        rx.extend_from_slice(&[*b]);
        if let Some(f) = codec.decode(&mut rx).unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, vec![frame.clone(), frame]);
    assert!(rx.is_empty());
    let mut partial = BytesMut::from(&wire[..3]);
    assert!(matches!(
        codec.decode_eof(&mut partial),
        Err(FrameError::Truncated { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes never panic the decoder.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_frame::<ClientFrame>(&bytes);
        let _ = decode_frame::<ServerFrame>(&bytes);
    }

    /// Valid frames with random corruption never panic either (this reaches deep into the
    /// body decoder, unlike purely random bytes).
    #[test]
    fn corrupted_frames_never_panic(
        which in 0usize..16,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let msgs = all_client_msgs();
        let mut bytes = frame_bytes(&ClientFrame { id: 1, msg: msgs[which % msgs.len()].clone() }).unwrap();
        for (at, val) in flips {
            let at = 4 + at % (bytes.len() - 4);
            bytes[at] = val;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        let _ = decode_frame::<ClientFrame>(&bytes);
        let _ = decode_complete_frame::<ClientFrame>(&bytes);
    }
}

#[test]
fn deeply_nested_unknown_fields_are_refused_without_exhausting_the_stack() {
    // {"id": 1, "msg": "Status", "x": [[[[...]]]]} with 500k nesting levels.
    let mut body = vec![0x83];
    body.extend_from_slice(&[0xa2, b'i', b'd', 0x01]);
    body.extend_from_slice(&[0xa3, b'm', b's', b'g', 0xa6]);
    body.extend_from_slice(b"Status");
    body.extend_from_slice(&[0xa1, b'x']);
    body.extend(std::iter::repeat_n(0x91, 500_000));
    body.push(0xc0);
    let mut frame = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    frame.push(PROTOCOL_VERSION);
    frame.extend_from_slice(&body);
    let err = decode_frame::<ClientFrame>(&frame).unwrap_err();
    assert!(matches!(err, FrameError::Malformed(_)), "{err}");

    // The same message without the bomb decodes (unknown fields are ignored).
    let mut body = vec![0x83];
    body.extend_from_slice(&[0xa2, b'i', b'd', 0x01]);
    body.extend_from_slice(&[0xa3, b'm', b's', b'g', 0xa6]);
    body.extend_from_slice(b"Status");
    body.extend_from_slice(&[0xa1, b'x', 0x91, 0x91, 0xc0]);
    let mut frame = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    frame.push(PROTOCOL_VERSION);
    frame.extend_from_slice(&body);
    assert_eq!(
        decode_complete_frame::<ClientFrame>(&frame).unwrap(),
        ClientFrame {
            id: 1,
            msg: ClientMsg::Status
        }
    );
}

/// The largest possible page (names and invalidation reasons at their longest) still
/// encodes under the frame limit, and paging always makes progress.
#[test]
fn the_fullest_snapshot_page_fits_a_frame() {
    let fat = |i: u64| SnapshotInfo {
        id: SnapId(u64::MAX - i),
        name: "\u{10FFFF}".repeat(63) + "abc",
        ctime: u64::MAX,
        state: SnapshotState::Invalid {
            reason: "r".repeat(4000),
        },
        chunks_held: u64::MAX,
    };
    let infos: Vec<SnapshotInfo> = (0..5000).map(fat).collect();
    let n = csnap_proto::page_len(&infos, u32::MAX);
    assert!(n >= 1 && n < infos.len());
    let frame = ServerFrame {
        reply_to: Some(u64::MAX),
        msg: ServerMsg::SnapshotList {
            snapshots: infos[..n].to_vec(),
            more: true,
            usage_exact: false,
        },
    };
    let bytes = frame_bytes(&frame).unwrap();
    assert!(bytes.len() <= MAX_FRAME + 4, "{} bytes", bytes.len());
    for info in &infos[..1] {
        let alone = frame_bytes(&ServerFrame {
            reply_to: None,
            msg: ServerMsg::SnapshotCreated { info: info.clone() },
        })
        .unwrap();
        // The bound covers the real encoding (minus the envelope around one info).
        assert!(alone.len() <= csnap_proto::encoded_size_bound(info) + 64);
    }
    let small: Vec<SnapshotInfo> = (0..3000)
        .map(|i| SnapshotInfo {
            name: format!("s{i}"),
            state: SnapshotState::Live,
            ..fat(i)
        })
        .collect();
    assert_eq!(
        csnap_proto::page_len(&small, u32::MAX),
        csnap_proto::MAX_LIST_PAGE as usize
    );
    assert_eq!(csnap_proto::page_len(&small, 0), 1);
    assert_eq!(csnap_proto::page_len(&[], 10), 0);
}

/// The largest diff page a server can send (one full-width range per chunk walked, plus
/// the chunk the budget ran out in) fits a frame.
#[test]
fn the_fullest_diff_page_fits_a_frame() {
    let ranges: Vec<ChunkRange> = (0..=u64::from(MAX_DIFF_RECORDS))
        .map(|i| ChunkRange::new(u64::MAX - 2 * i - u64::from(u32::MAX), u32::MAX))
        .collect();
    let frame = ServerFrame {
        reply_to: Some(u64::MAX),
        msg: ServerMsg::DiffPage(DiffPage {
            ranges,
            next: Some(u64::MAX),
            records_walked: u64::MAX,
        }),
    };
    let bytes = frame_bytes(&frame).unwrap();
    assert!(bytes.len() <= MAX_FRAME + 4, "{} bytes", bytes.len());
}

/// A status from a server that does not send the space fields (metadata figures, usage
/// warnings) still decodes, with them empty: they were added without a version bump.
#[test]
fn a_status_without_the_space_fields_decodes() {
    #[derive(serde::Serialize)]
    struct EarlierStatus {
        active: bool,
        awaited_clients: Vec<ClientId>,
        connected_clients: u32,
        chunk_size: u32,
        origin_chunks: u64,
        store_chunks: u64,
        free_chunks: u64,
        snapshots: u32,
        pending_snapshots: u32,
        store_full_policy: String,
        reclaiming: bool,
        usage_exact: bool,
    }
    let bytes = rmp_serde::to_vec_named(&EarlierStatus {
        active: true,
        awaited_clients: vec![],
        connected_clients: 1,
        chunk_size: 4096,
        origin_chunks: 10,
        store_chunks: 20,
        free_chunks: 5,
        snapshots: 2,
        pending_snapshots: 0,
        store_full_policy: "invalidate-oldest".into(),
        reclaiming: false,
        usage_exact: true,
    })
    .unwrap();
    let status: ServerStatus = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(status.free_chunks, 5);
    assert_eq!(
        (status.metadata_blocks, status.free_metadata_blocks),
        (0, 0)
    );
    assert!(status.space_warnings.is_empty());
}

/// `OriginReadOk::source` came without a version bump: an answer from a server before it
/// decodes with `source: None` (nothing to release), and an older client's decoder, which
/// has no such field, still reads today's answer.
#[test]
fn origin_read_ok_with_and_without_its_source_decodes() {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    enum EarlierServerMsg {
        OriginReadOk { store: Vec<StoreAddr> },
    }
    let store = vec![StoreAddr {
        chunk: 3,
        store_chunk: 900,
    }];
    let earlier = rmp_serde::to_vec_named(&EarlierServerMsg::OriginReadOk {
        store: store.clone(),
    })
    .unwrap();
    let now: ServerMsg = rmp_serde::from_slice(&earlier).unwrap();
    assert_eq!(
        now,
        ServerMsg::OriginReadOk {
            store: store.clone(),
            source: None
        }
    );
    let today = rmp_serde::to_vec_named(&ServerMsg::OriginReadOk {
        store: store.clone(),
        source: Some(SnapId(4)),
    })
    .unwrap();
    let old: EarlierServerMsg = rmp_serde::from_slice(&today).unwrap();
    assert_eq!(old, EarlierServerMsg::OriginReadOk { store });
}

fn sealed_pair() -> (FrameSealer, FrameOpener, auth::SessionKeys) {
    let handshake = auth::Handshake {
        protocol_version: u32::from(PROTOCOL_VERSION),
        client: ClientId::new(1, ClientKind::Admin),
        node: 1,
        incarnation: 9,
        resuming: false,
        client_nonce: [1; 32],
        server_nonce: [2; 32],
    };
    let keys = auth::session_keys(b"cluster key", &handshake);
    (
        FrameSealer::new(&keys.client_to_server),
        FrameOpener::new(&keys.client_to_server),
        keys,
    )
}

fn sealed(sealer: &mut FrameSealer, msg: &ClientMsg) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame_with(
        &ClientFrame {
            id: 1,
            msg: msg.clone(),
        },
        Some(sealer),
        &mut out,
    )
    .unwrap();
    out
}

fn open(opener: &mut FrameOpener, buf: &[u8]) -> Result<ClientFrame, FrameError> {
    match decode_frame_with::<ClientFrame>(buf, Some(opener))? {
        Decoded::Frame(frame, used) => {
            assert_eq!(used, buf.len());
            Ok(frame)
        }
        Decoded::Incomplete { need } => panic!("incomplete, need {need}"),
    }
}

#[test]
fn sealed_frames_round_trip_in_order_and_cost_one_tag() {
    let (mut sealer, mut opener, _) = sealed_pair();
    for msg in all_client_msgs() {
        let plain = frame_bytes(&ClientFrame {
            id: 1,
            msg: msg.clone(),
        })
        .unwrap();
        let buf = sealed(&mut sealer, &msg);
        assert_eq!(buf.len(), plain.len() + TAG_LEN);
        assert_eq!(open(&mut opener, &buf).unwrap().msg, msg);
    }
    assert_eq!(sealer.sealed(), opener.opened());
    // A partial sealed frame waits without using a sequence number.
    let buf = sealed(&mut sealer, &ClientMsg::KeepAlive);
    let before = opener.opened();
    assert!(matches!(
        decode_frame_with::<ClientFrame>(&buf[..buf.len() - 1], Some(&mut opener)),
        Ok(Decoded::Incomplete { .. })
    ));
    assert_eq!(opener.opened(), before);
    assert!(open(&mut opener, &buf).is_ok());
}

#[test]
fn tampered_replayed_reordered_dropped_and_forged_frames_fail_authentication() {
    let (mut sealer, mut opener, keys) = sealed_pair();
    let msg = ClientMsg::DeleteSnapshot { snap: SnapId(3) };
    let first = sealed(&mut sealer, &msg);
    // Every single flipped bit after the length prefix is caught, before parsing.
    for at in csnap_proto::frame::LENGTH_PREFIX..first.len() {
        for bit in 0..8 {
            let mut bad = first.clone();
            bad[at] ^= 1 << bit;
            let mut o = opener.clone();
            assert!(
                matches!(open(&mut o, &bad), Err(FrameError::BadTag { seq: 0 })),
                "flip of bit {bit} of byte {at} not caught"
            );
        }
    }
    assert!(open(&mut opener, &first).is_ok());
    // Replay of frame 0 as frame 1.
    assert!(matches!(
        open(&mut opener.clone(), &first),
        Err(FrameError::BadTag { seq: 1 })
    ));
    // Reorder: frames 1 and 2 swapped; drop: frame 1 skipped.
    let second = sealed(&mut sealer, &ClientMsg::KeepAlive);
    let third = sealed(&mut sealer, &ClientMsg::ResendDone);
    assert!(matches!(
        open(&mut opener.clone(), &third),
        Err(FrameError::BadTag { seq: 1 })
    ));
    // The other direction's key, or a plain frame, is no seal.
    let mut wrong_dir = FrameSealer::new(&keys.server_to_client);
    let _ = sealed(&mut wrong_dir, &ClientMsg::KeepAlive);
    let forged = sealed(&mut wrong_dir, &ClientMsg::KeepAlive);
    assert!(matches!(
        open(&mut opener.clone(), &forged),
        Err(FrameError::BadTag { seq: 1 })
    ));
    let plain = frame_bytes(&ClientFrame {
        id: 1,
        msg: ClientMsg::KeepAlive,
    })
    .unwrap();
    assert!(open(&mut opener.clone(), &plain).is_err());
    let tiny = [0, 0, 0, 1, PROTOCOL_VERSION];
    assert!(matches!(
        open(&mut opener.clone(), &tiny),
        Err(FrameError::NoTag { length: 1 })
    ));
    // In order, the stream goes on.
    assert!(open(&mut opener, &second).is_ok());
    assert!(open(&mut opener, &third).is_ok());
    // A sealed frame is not a plain one.
    assert!(decode_frame::<ClientFrame>(&second).is_err());
}

#[test]
fn codec_switches_to_sealed_frames_where_told() {
    use tokio_util::codec::{Decoder as _, Encoder as _};
    let (_, _, keys) = sealed_pair();
    let mut tx = FrameCodec::<ServerFrame, ClientFrame>::new();
    let mut rx = FrameCodec::<ClientFrame, ServerFrame>::new();
    let mut wire = bytes::BytesMut::new();
    let frame = |msg| ClientFrame { id: 1, msg };
    tx.encode(frame(ClientMsg::KeepAlive), &mut wire).unwrap();
    tx.seal_from_now(&keys.client_to_server);
    tx.encode(frame(ClientMsg::ResendDone), &mut wire).unwrap();
    assert_eq!(
        rx.decode(&mut wire).unwrap().unwrap().msg,
        ClientMsg::KeepAlive
    );
    // Still plain on the receiving side: the sealed frame does not parse.
    assert!(rx.decode(&mut wire.clone()).is_err());
    rx.open_from_now(&keys.client_to_server);
    assert_eq!(
        rx.decode(&mut wire).unwrap().unwrap().msg,
        ClientMsg::ResendDone
    );
    assert!(wire.is_empty());
}
