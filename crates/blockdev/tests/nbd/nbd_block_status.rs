//! Block status on file exports: the metadata-context options and NBD_CMD_BLOCK_STATUS
//! through a hand-written client (every protocol rule), and `base:allocation` read by
//! real clients (`nbdinfo --map`, `qemu-img map`) against the file's real holes.

use crate::nbd_support;

use std::os::unix::fs::FileExt;

use csnap_blockdev::nbd::consts::*;
use nbd_support::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const HOLE_ZERO: u32 = STATE_HOLE | STATE_ZERO;

fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        data.extend_from_slice(&(q.len() as u32).to_be_bytes());
        data.extend_from_slice(q.as_bytes());
    }
    data
}

/// Sends a LIST or SET of metadata contexts; returns the (id, name) replies and the final
/// reply type.
async fn meta(
    c: &mut RawClient,
    option: u32,
    export: &str,
    queries: &[&str],
) -> (Vec<(u32, String)>, u32) {
    c.send_option(option, &meta_data(export, queries)).await;
    let mut contexts = Vec::new();
    loop {
        let r = c.read_opt_reply().await;
        assert_eq!(r.option, option);
        if r.kind != REP_META_CONTEXT {
            return (contexts, r.kind);
        }
        let id = u32::from_be_bytes(r.data[..4].try_into().unwrap());
        contexts.push((id, String::from_utf8(r.data[4..].to_vec()).unwrap()));
    }
}

/// The (context id, descriptors) of a BLOCK_STATUS chunk, and whether it was the last.
fn status_chunk(reply: &TxReply, cookie: u64) -> (u32, Vec<(u32, u32)>, bool) {
    match reply {
        TxReply::Chunk {
            cookie: c,
            flags,
            kind,
            payload,
        } if *c == cookie && *kind == REPLY_TYPE_BLOCK_STATUS => {
            assert!(
                payload.len() >= 12 && (payload.len() - 4).is_multiple_of(8),
                "{reply:?}"
            );
            let id = u32::from_be_bytes(payload[..4].try_into().unwrap());
            let descriptors = payload[4..]
                .chunks(8)
                .map(|d| {
                    (
                        u32::from_be_bytes(d[..4].try_into().unwrap()),
                        u32::from_be_bytes(d[4..].try_into().unwrap()),
                    )
                })
                .collect();
            (id, descriptors, flags & REPLY_FLAG_DONE != 0)
        }
        other => panic!("expected a BLOCK_STATUS chunk for cookie {cookie}, got {other:?}"),
    }
}

fn error_of(reply: &TxReply) -> Option<u32> {
    match reply {
        TxReply::Chunk { kind, payload, .. } if *kind == REPLY_TYPE_ERROR => {
            Some(u32::from_be_bytes(payload[..4].try_into().unwrap()))
        }
        TxReply::Simple { error, .. } if *error != 0 => Some(*error),
        _ => None,
    }
}

/// A server with a 4 MiB sparse file export `disk` holding data at [1 MiB, 1 MiB + 64 KiB)
/// and [3 MiB, 4 MiB), and a 1 MiB `other`; and whether the file system reports holes.
async fn sparse_server() -> (TestServer, bool) {
    let server = TestServer::start(&[("disk", 4 * MIB, false), ("other", MIB, false)]).await;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&server.export("disk").path)
        .unwrap();
    file.write_all_at(&vec![0x5a; 65536], MIB).unwrap();
    file.write_all_at(&vec![0xa5; MIB as usize], 3 * MIB)
        .unwrap();
    file.sync_all().unwrap();
    let runs = csnap_blockdev::sparse::allocation(&file, 0, 4 * MIB, 16).unwrap();
    (server, runs.len() > 1)
}

/// The expected base:allocation map of `sparse_server`'s disk: (offset, length, flags).
fn expected_map() -> Vec<(u64, u64, u32)> {
    vec![
        (0, MIB, HOLE_ZERO),
        (MIB, 65536, 0),
        (MIB + 65536, 2 * MIB - 65536, HOLE_ZERO),
        (3 * MIB, MIB, 0),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_contexts_and_block_status_follow_the_protocol() {
    let (server, holes) = sparse_server().await;
    let mut c = RawClient::connect(server.tcp).await;

    // Before structured replies both options are refused.
    assert_eq!(
        meta(&mut c, OPT_LIST_META_CONTEXT, "disk", &[]).await,
        (vec![], REP_ERR_INVALID)
    );
    assert_eq!(
        meta(&mut c, OPT_SET_META_CONTEXT, "disk", &["base:allocation"]).await,
        (vec![], REP_ERR_INVALID)
    );
    c.negotiate_structured().await;
    // LIST: everything, the base: wildcard, and unknown namespaces ignored; ids are 0.
    for queries in [
        &[][..],
        &["base:"][..],
        &["base:allocation", "x-other:thing"][..],
    ] {
        assert_eq!(
            meta(&mut c, OPT_LIST_META_CONTEXT, "disk", queries).await,
            (vec![(0, "base:allocation".to_owned())], REP_ACK),
            "{queries:?}"
        );
    }
    assert_eq!(
        meta(&mut c, OPT_LIST_META_CONTEXT, "disk", &["qemu:"]).await,
        (vec![], REP_ACK)
    );
    assert_eq!(
        meta(&mut c, OPT_LIST_META_CONTEXT, "nosuch", &[]).await.1,
        REP_ERR_UNKNOWN
    );
    assert_eq!(
        meta(&mut c, OPT_LIST_META_CONTEXT, "disk", &["nocolon"])
            .await
            .1,
        REP_ERR_INVALID
    );
    // SET: the wildcard selects nothing; the exact name does, with a non-zero id.
    assert_eq!(
        meta(&mut c, OPT_SET_META_CONTEXT, "disk", &["base:"]).await,
        (vec![], REP_ACK)
    );
    let (selected, end) = meta(
        &mut c,
        OPT_SET_META_CONTEXT,
        "disk",
        &["base:allocation", "qemu:dirty-bitmap:x"],
    )
    .await;
    assert_eq!(end, REP_ACK);
    assert_eq!(selected.len(), 1, "{selected:?}");
    let (id, name) = selected[0].clone();
    assert_eq!(name, "base:allocation");
    assert_ne!(id, 0);
    c.go("disk").await;

    // The whole export in one request: the file's holes and data.
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, (4 * MIB) as u32, &[])
        .await;
    let (got_id, descriptors, done) = status_chunk(&c.read_reply().await, 1);
    assert!(done);
    assert_eq!(got_id, id);
    assert_eq!(
        descriptors.iter().map(|d| u64::from(d.0)).sum::<u64>(),
        4 * MIB
    );
    if holes {
        let mut at = 0;
        let got: Vec<(u64, u64, u32)> = descriptors
            .iter()
            .map(|&(n, f)| {
                at += u64::from(n);
                (at - u64::from(n), u64::from(n), f)
            })
            .collect();
        assert_eq!(got, expected_map());
    } else {
        eprintln!("this file system reports no holes: checking coverage only");
    }
    // From inside a run; REQ_ONE gives one descriptor no longer than asked.
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 2, MIB + 4096, 8192, &[])
        .await;
    let (_, descriptors, _) = status_chunk(&c.read_reply().await, 2);
    assert_eq!(descriptors, vec![(8192, 0)]);
    c.request(CMD_BLOCK_STATUS, 0, 3, 0, 4096, &[]).await;
    let (_, descriptors, _) = status_chunk(&c.read_reply().await, 3);
    assert_eq!(descriptors.len(), 1, "one run is one descriptor");
    if holes {
        // It may reach past the request, up to the end of the hole.
        let (n, flags) = descriptors[0];
        assert!((4096..=MIB as u32).contains(&n), "{descriptors:?}");
        assert_eq!(flags, HOLE_ZERO);
    }
    // Length 0 and out of range: EINVAL, and the connection goes on.
    c.request(CMD_BLOCK_STATUS, 0, 4, 0, 0, &[]).await;
    assert_eq!(error_of(&c.read_reply().await), Some(EINVAL));
    c.request(CMD_BLOCK_STATUS, 0, 5, 4 * MIB - 512, 1024, &[])
        .await;
    assert_eq!(error_of(&c.read_reply().await), Some(EINVAL));
    c.request(CMD_BLOCK_STATUS, 0, 6, 4 * MIB - 512, 512, &[])
        .await;
    let (_, descriptors, _) = status_chunk(&c.read_reply().await, 6);
    assert_eq!(
        descriptors,
        vec![(512, 0)],
        "never past the end of the export"
    );

    // A selection made for another export does not hold, nor does none at all.
    for set_on in [Some("other"), None] {
        let mut c = RawClient::connect(server.tcp).await;
        c.negotiate_structured().await;
        if let Some(other) = set_on {
            let (s, end) = meta(&mut c, OPT_SET_META_CONTEXT, other, &["base:allocation"]).await;
            assert_eq!((s.len(), end), (1, REP_ACK));
        }
        c.go("disk").await;
        c.request(CMD_BLOCK_STATUS, 0, 7, 0, 4096, &[]).await;
        assert_eq!(error_of(&c.read_reply().await), Some(EINVAL), "{set_on:?}");
        c.request(CMD_READ, 0, 8, MIB, 4096, &[]).await;
        assert!(error_of(&c.read_reply().await).is_none(), "still usable");
    }
}

/// Adjacent runs with equal type joined: clients may split where the server did not.
fn joined(runs: impl IntoIterator<Item = (u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for r in runs {
        match out.last_mut() {
            Some(last) if last.2 == r.2 && last.0 + last.1 == r.0 => last.1 += r.1,
            _ => out.push(r),
        }
    }
    out
}

/// `nbdinfo --map=CONTEXT --json`: (offset, length, type).
async fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let map = format!("--map={context}");
    let out = run_ok("nbdinfo", &[&map, "--json", uri]).await;
    let doc: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    joined(doc.as_array().expect("a JSON array").iter().map(|e| {
        (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap() as u32,
        )
    }))
}

/// `qemu-img map --output=json` as base:allocation flags (zero -> ZERO, !data -> HOLE).
async fn qemu_img_map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", uri]).await;
    let doc: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    joined(doc.as_array().expect("a JSON array").iter().map(|e| {
        let zero = e["zero"].as_bool().unwrap();
        let data = e["data"].as_bool().unwrap();
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            (u32::from(zero) * STATE_ZERO) | (u32::from(!data) * STATE_HOLE),
        )
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_and_qemu_img_map_the_holes_of_a_file() {
    if !require_tool("nbdinfo") || !require_tool("qemu-img") {
        return;
    }
    let (server, holes) = sparse_server().await;
    if !holes {
        eprintln!("skipping: this file system reports no holes");
        return;
    }
    let uri = server.unix_uri("disk");
    assert_eq!(nbdinfo_map(&uri, "base:allocation").await, expected_map());
    assert_eq!(qemu_img_map(&uri).await, expected_map());
    let out = run_ok("nbdinfo", &["--json", &uri]).await;
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        doc["exports"][0]["contexts"],
        serde_json::json!(["base:allocation"]),
        "{doc}"
    );
}
