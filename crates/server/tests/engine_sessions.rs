//! Client identities, resent requests and shared durability results (issue 8, findings
//! 6-8): who a connection is, what a request resent after a reconnect does, and that a
//! failed commit stays failed for everyone who waited for it.

mod engine_common;

use csnap_proto::*;
use csnap_server::engine::*;
use engine_common::*;

/// Several replies wait for one commit (two copy-outs and a delete). The commit fails: none
/// of them is answered (each would tell a client its change is durable), the engine stops,
/// and later requests get `Internal`.
#[test]
fn a_failed_commit_answers_none_of_its_waiters() {
    let mut h = Harness::new(config(), 16, 16);
    let origin = h.connect(1, ClientKind::Origin, false);
    let admin = h.admin();
    let s0 = h.create_snapshot(admin, "s0", &[origin]);
    let _s1 = h.create_snapshot(admin, "s1", &[origin]);
    let w0 = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(0, 1),
        },
    );
    let w1 = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(1, 1),
        },
    );
    while h.run_one_copy() {}
    let del = h.send(
        admin,
        ClientMsg::DeleteSnapshot {
            snap: SnapRef::Id(s0),
        },
    );
    assert!(
        h.commit_pending,
        "the copy-outs and the delete wait for a commit"
    );
    h.commit_pending = false;
    h.handle(Event::CommitDone {
        result: Err("EIO on the journal".into()),
    });
    assert!(h.fatal.as_deref().is_some_and(|r| r.contains("EIO")));
    for (conn, id) in [(origin, w0), (origin, w1), (admin, del)] {
        assert_eq!(
            h.reply_to(conn, id),
            None,
            "request {id} answered after a failed commit"
        );
    }
    let later = h.send(
        origin,
        ClientMsg::QueryWrite {
            ranges: range(2, 1),
        },
    );
    assert_eq!(
        error_code(&h.reply_to(origin, later)),
        Some(ErrorCode::Internal)
    );
    // Nor does a late CommitDone (or any event) revive it.
    h.handle(Event::CommitDone { result: Ok(()) });
    for (conn, id) in [(origin, w0), (origin, w1), (admin, del)] {
        assert_eq!(h.reply_to(conn, id), None);
    }
}
