//! The shared behavioural suite (cpg_glue::testkit::suite) against the in-memory cluster,
//! plus what only the in-memory cluster can inject: node death and restart, multi-way
//! partitions, a transition with nodes both lost and gained.

use cpg_glue::memory::MemoryCluster;
use cpg_glue::testkit::suite;
use cpg_glue::{
    ConfChg, Group, GroupError, GroupEvent, GroupSender, Member, MemberChange, NodeId, Reason,
    TotemConfChg,
};
use futures::{FutureExt, StreamExt};

fn cluster(n: u32) -> MemoryCluster {
    MemoryCluster::with_nodes(n).unwrap()
}

fn ids(ids: &[u32]) -> Vec<NodeId> {
    ids.iter().copied().map(NodeId).collect()
}

#[tokio::test]
async fn members_see_each_other_3_5_8() {
    for n in [3, 5, 8] {
        suite::members_see_each_other(&cluster(n), "see").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agreed_order_3_nodes_1000_each() {
    suite::agreed_order(&cluster(3), "order", 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agreed_order_8_nodes() {
    suite::agreed_order(&cluster(8), "order", 300).await;
}

#[tokio::test]
async fn partition_and_merge_3_5_8() {
    suite::partition_and_merge(&cluster(3), "split", NodeId(3)).await;
    // Isolating the lowest node moves the ring representative on the majority side.
    suite::partition_and_merge(&cluster(5), "split", NodeId(1)).await;
    suite::partition_and_merge(&cluster(8), "split", NodeId(5)).await;
}

#[tokio::test]
async fn leave_and_procdown_3_5() {
    suite::leave_and_procdown(&cluster(3), "bye").await;
    suite::leave_and_procdown(&cluster(5), "bye").await;
}

#[tokio::test]
async fn too_large_small_and_default_limit() {
    let small = cluster(3);
    small.set_max_message_size(1024);
    suite::too_large(&small, "big").await;
    suite::too_large(&cluster(3), "big").await;
}

/// The suite functions leave their groups, so they can run one after another on one
/// cluster, as the real-corosync harness does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_suite_in_turn_on_one_cluster() {
    let c = cluster(5);
    suite::members_see_each_other(&c, "a").await;
    suite::agreed_order(&c, "b", 100).await;
    suite::partition_and_merge(&c, "c", NodeId(2)).await;
    suite::leave_and_procdown(&c, "d").await;
    suite::too_large(&c, "e").await;
    suite::partition_and_merge(&c, "c", NodeId(4)).await;
}

/// Everything queued on a group stream right now (the in-memory cluster applies every
/// operation at once, so nothing more is on the way).
fn drain(g: &mut cpg_glue::memory::MemoryGroup) -> Vec<Result<GroupEvent, GroupError>> {
    let mut out = Vec::new();
    while let Some(Some(item)) = g.next().now_or_never() {
        out.push(item);
    }
    out
}

fn confchg(
    members: &[Member],
    left: &[(Member, Reason)],
    joined: &[(Member, Reason)],
) -> GroupEvent {
    let changes = |v: &[(Member, Reason)]| {
        v.iter()
            .map(|&(member, reason)| MemberChange { member, reason })
            .collect()
    };
    GroupEvent::ConfChg(ConfChg {
        members: members.to_vec(),
        left: changes(left),
        joined: changes(joined),
    })
}

fn events(items: Vec<Result<GroupEvent, GroupError>>) -> Vec<GroupEvent> {
    items.into_iter().map(|i| i.unwrap()).collect()
}

#[tokio::test]
async fn kill_ends_streams_and_restart_merges_back() {
    let c = cluster(3);
    let mut g1 = c.join(NodeId(1), "g").unwrap();
    let mut g3 = c.join(NodeId(3), "g").unwrap();
    let mut q3 = c.quorum(NodeId(3)).unwrap();
    let mut q1 = c.quorum(NodeId(1)).unwrap();
    let (p1, p3) = (g1.local(), g3.local());
    drain(&mut g1);
    drain(&mut g3);
    let first = q1.next().await.unwrap().unwrap();
    assert!(first.quorate);
    q3.next().await.unwrap().unwrap();

    c.kill_node(NodeId(3)).unwrap();
    let seen3 = drain(&mut g3);
    assert!(
        matches!(seen3.as_slice(), [Err(GroupError::Disconnected { .. })]),
        "killed process: {seen3:?}"
    );
    assert!(g3.next().await.is_none(), "stream ends after Disconnected");
    assert!(matches!(
        q3.next().await,
        Some(Err(GroupError::Disconnected { .. }))
    ));
    let ring = c.ring(NodeId(1)).unwrap();
    assert_eq!(ring.members, ids(&[1, 2]));
    assert!(ring.ring.seq > first.ring.seq);
    assert_eq!(
        events(drain(&mut g1)),
        vec![
            confchg(&[p1], &[(p3, Reason::NodeDown)], &[]),
            GroupEvent::TotemConfChg(ring.clone()),
        ]
    );
    let q = q1.next().await.unwrap().unwrap();
    assert!(q.quorate, "2 of 3 votes are quorate");
    assert_eq!((q.ring, q.members), (ring.ring, ids(&[1, 2])));

    // The dead node refuses work; sending from its old handle fails.
    assert!(matches!(
        c.join(NodeId(3), "g"),
        Err(GroupError::NotRunning { .. })
    ));
    assert!(matches!(
        c.quorum(NodeId(3)),
        Err(GroupError::NotRunning { .. })
    ));
    assert!(matches!(
        g3.sender().mcast(b"x".to_vec()).await,
        Err(GroupError::Disconnected { .. })
    ));
    assert!(matches!(
        c.kill_node(NodeId(3)),
        Err(GroupError::Invalid(_))
    ));
    drop(g3); // no ProcDown: it is gone already
    assert!(drain(&mut g1).is_empty());

    // Restart: a new ring, but no process to report.
    c.restart_node(NodeId(3)).unwrap();
    let merged = c.ring(NodeId(3)).unwrap();
    assert_eq!(merged.members, ids(&[1, 2, 3]));
    assert!(merged.ring.seq > ring.ring.seq);
    assert_eq!(
        events(drain(&mut g1)),
        vec![GroupEvent::TotemConfChg(merged.clone())]
    );
    let mut g3 = c.join(NodeId(3), "g").unwrap();
    let p3b = g3.local();
    assert_ne!(p3b, p3, "a restarted node's process gets a new pid");
    assert_eq!(
        events(drain(&mut g3)),
        vec![
            confchg(&[p1, p3b], &[], &[(p3b, Reason::Join)]),
            GroupEvent::TotemConfChg(merged),
        ]
    );
}

#[tokio::test]
async fn merge_of_two_multi_node_sides() {
    let c = cluster(4);
    let mut gs: Vec<_> = (1..=4).map(|n| c.join(NodeId(n), "g").unwrap()).collect();
    let p: Vec<Member> = gs.iter().map(|g| g.local()).collect();
    c.partition(&[ids(&[1, 2]), ids(&[3, 4])]).unwrap();
    for g in &mut gs {
        drain(g);
    }
    let left_ring = c.ring(NodeId(1)).unwrap();
    let right_ring = c.ring(NodeId(3)).unwrap();
    assert_eq!(left_ring.ring.node, NodeId(1));
    assert_eq!(right_ring.ring.node, NodeId(3));
    // Neither side has more than half of the 4 votes.
    for n in 1..=4 {
        assert!(
            !c.quorum(NodeId(n))
                .unwrap()
                .next()
                .await
                .unwrap()
                .unwrap()
                .quorate
        );
    }

    c.heal();
    let merged = c.ring(NodeId(4)).unwrap();
    assert!(merged.ring.seq > left_ring.ring.seq.max(right_ring.ring.seq));
    let all = p.clone();
    let up = |a: Member, b: Member| [(a, Reason::NodeUp), (b, Reason::NodeUp)];
    for (i, g) in gs.iter_mut().enumerate() {
        let other = if i < 2 {
            up(p[2], p[3])
        } else {
            up(p[0], p[1])
        };
        assert_eq!(
            events(drain(g)),
            vec![
                confchg(&all, &[], &other),
                GroupEvent::TotemConfChg(merged.clone())
            ],
            "process {i}"
        );
    }
}

#[tokio::test]
async fn one_transition_losing_and_gaining_nodes() {
    let c = cluster(3);
    c.partition(&[ids(&[1, 2]), ids(&[3])]).unwrap();
    let mut g1 = c.join(NodeId(1), "g").unwrap();
    let g2 = c.join(NodeId(2), "g").unwrap();
    let g3 = c.join(NodeId(3), "g").unwrap();
    let (p1, p2, p3) = (g1.local(), g2.local(), g3.local());
    drain(&mut g1);
    // Node 2 moves away and node 3 comes in, in one step.
    c.partition(&[ids(&[1, 3]), ids(&[2])]).unwrap();
    let ring = c.ring(NodeId(1)).unwrap();
    assert_eq!(ring.members, ids(&[1, 3]));
    assert_eq!(
        events(drain(&mut g1)),
        vec![
            confchg(&[p1], &[(p2, Reason::NodeDown)], &[]),
            confchg(&[p1, p3], &[], &[(p3, Reason::NodeUp)]),
            GroupEvent::TotemConfChg(ring),
        ]
    );
}

#[tokio::test]
async fn three_way_partition_and_messages_stay_inside() {
    let c = cluster(5);
    let mut gs: Vec<_> = (1..=5).map(|n| c.join(NodeId(n), "g").unwrap()).collect();
    // Node 5 named in no slice: alone.
    c.partition(&[ids(&[1, 2]), ids(&[3, 4])]).unwrap();
    for g in &mut gs {
        drain(g);
    }
    let rings: Vec<TotemConfChg> = (1..=5).map(|n| c.ring(NodeId(n)).unwrap()).collect();
    assert_eq!(rings[4].members, ids(&[5]));
    // Three distinct rings that share one seq (corosync: the highest seq known + 4 on
    // every side), told apart only by their representative.
    let seqs: std::collections::BTreeSet<u64> = rings.iter().map(|r| r.ring.seq).collect();
    assert_eq!(seqs.len(), 1, "one seq on all sides: {rings:?}");
    let reps: std::collections::BTreeSet<NodeId> = rings.iter().map(|r| r.ring.node).collect();
    assert_eq!(reps, ids(&[1, 3, 5]).into_iter().collect(), "{rings:?}");

    gs[2].sender().mcast(b"from 3".to_vec()).await.unwrap();
    for (i, g) in gs.iter_mut().enumerate() {
        let got = events(drain(g));
        if i == 2 || i == 3 {
            assert!(matches!(got.as_slice(), [GroupEvent::Deliver(d)] if d.payload == b"from 3"));
        } else {
            assert!(
                got.is_empty(),
                "node {} outside the sender's partition got {got:?}",
                i + 1
            );
        }
    }
}

#[tokio::test]
async fn bad_arguments_are_refused_with_clear_errors() {
    assert!(matches!(
        MemoryCluster::new(&[]),
        Err(GroupError::Invalid(_))
    ));
    assert!(matches!(
        MemoryCluster::new(&ids(&[1, 1])),
        Err(GroupError::Invalid(_))
    ));
    let c = cluster(3);
    let unknown = c.join(NodeId(9), "g").unwrap_err();
    assert!(unknown.to_string().contains("node 9"), "{unknown}");
    assert!(matches!(c.join(NodeId(1), ""), Err(GroupError::Invalid(_))));
    assert!(matches!(
        c.join(NodeId(1), &"x".repeat(129)),
        Err(GroupError::Invalid(_))
    ));
    assert!(matches!(
        c.partition(&[ids(&[1, 9])]),
        Err(GroupError::Invalid(_))
    ));
    assert!(matches!(
        c.partition(&[ids(&[1, 2]), ids(&[2])]),
        Err(GroupError::Invalid(_))
    ));
    assert!(matches!(
        c.restart_node(NodeId(1)),
        Err(GroupError::Invalid(_))
    ));
    assert_eq!(
        c.ring(NodeId(1)).unwrap().members,
        ids(&[1, 2, 3]),
        "refused calls change nothing"
    );

    let g = c.join(NodeId(1), "g").unwrap();
    let sender = g.sender();
    g.leave().await.unwrap();
    let after = sender.mcast(b"late".to_vec()).await.unwrap_err();
    assert!(matches!(after, GroupError::Disconnected { .. }), "{after}");
}

/// Multi-frame messages across a join, a leave, a partition and a merge: with small frames
/// the in-memory cluster cuts messages as corosync does, and the senders learn it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_are_cut_consistently_and_senders_learn_it() {
    for n in [3, 5] {
        let c = cluster(n);
        c.set_max_frame_size(cpg_glue::fragment::FRAME_HEADER_LEN + 64)
            .unwrap();
        let stats = suite::large_messages_across_changes(&c, "big").await;
        println!("{n} nodes: {stats:?}");
        assert!(stats.delivered > 0, "{stats:?}");
        assert!(
            stats.cut > 0,
            "membership changes between frames must cut some messages: {stats:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_joins_reach_stable_views() {
    for n in [3, 5] {
        let totem_first = suite::racing_joins(&cluster(n), ["one", "two"]).await;
        assert!(
            totem_first > 0,
            "joins requested together: some process sees the ring before its own join"
        );
    }
}

#[tokio::test]
async fn leave_right_after_join_is_clean() {
    suite::leave_right_after_join(&cluster(3), "quick").await;
}

#[tokio::test]
async fn quorum_flips_on_the_same_ring_with_expected_votes() {
    suite::quorum_flips_on_the_same_ring(&cluster(3), NodeId(3)).await;
    suite::quorum_flips_on_the_same_ring(&cluster(5), NodeId(1)).await;
}

/// exec/cpg.c sends a process its initial totem confchg on the first join or leave its
/// node delivers after the process asked to join: another process's join can be that
/// one, and then the process sees the ring before its own join confchg. The view tracker
/// calls the view stable once both have been seen.
#[tokio::test]
async fn initial_totem_before_own_join_and_the_stable_view() {
    use cpg_glue::view::ViewTracker;
    let c = cluster(2);
    let mut p = c.request_join(NodeId(1), "alpha").unwrap();
    let mut q = c.join(NodeId(2), "beta").unwrap();
    let ring = c.ring(NodeId(1)).unwrap();
    assert_eq!(events(drain(&mut q)).len(), 2);
    // q's join came first: p has the ring already; its own join is delivered when a
    // stream is read next, and no second totem confchg follows it.
    let mut tracker = ViewTracker::new(p.local());
    tracker.apply(&GroupEvent::TotemConfChg(ring.clone()));
    assert_eq!(tracker.stable(), None, "no own join yet");
    assert_eq!(
        events(drain(&mut p)),
        vec![
            GroupEvent::TotemConfChg(ring.clone()),
            confchg(&[p.local()], &[], &[(p.local(), Reason::Join)])
        ]
    );
    tracker.apply(&confchg(&[p.local()], &[], &[(p.local(), Reason::Join)]));
    let view = tracker.stable().expect("stable after the join");
    assert_eq!((view.ring, view.members), (ring.ring, vec![p.local()]));
}

/// A merge in which a node's corosync also restarted within the token timeout: its old
/// processes go with NodeDown although the node is in the new ring (a restarted corosync
/// has a ring id of its own, so exec/cpg.c puts it in the downlist).
#[tokio::test]
async fn a_bounced_node_shows_nodedown_while_it_stays_in_the_ring() {
    let c = cluster(3);
    let mut a = c.join(NodeId(1), "g").unwrap();
    let b = c.join(NodeId(2), "g").unwrap();
    let (pa, pb) = (a.local(), b.local());
    c.partition(&[ids(&[1, 2]), ids(&[3])]).unwrap();
    let cc = c.join(NodeId(3), "g").unwrap();
    let pc = cc.local();
    drain(&mut a);
    c.bounce_node(NodeId(2), true).unwrap();
    let ring = c.ring(NodeId(1)).unwrap();
    assert_eq!(ring.members, ids(&[1, 2, 3]));
    assert_eq!(
        events(drain(&mut a)),
        vec![
            confchg(&[pa], &[(pb, Reason::NodeDown)], &[]),
            confchg(&[pa, pc], &[], &[(pc, Reason::NodeUp)]),
            GroupEvent::TotemConfChg(ring),
        ]
    );
    drop((b, cc));
}

/// A graceful corosync stop: the others see ProcDown (the departures made it out) or
/// NodeDown (they did not); either way a ring without the node follows.
#[tokio::test]
async fn a_graceful_stop_shows_procdown_or_nodedown() {
    for departures_sent in [true, false] {
        let c = cluster(3);
        let mut a = c.join(NodeId(1), "g").unwrap();
        let gone = c.join(NodeId(3), "g").unwrap();
        let (pa, pg) = (a.local(), gone.local());
        drain(&mut a);
        c.stop_node(NodeId(3), departures_sent).unwrap();
        let reason = if departures_sent {
            Reason::ProcDown
        } else {
            Reason::NodeDown
        };
        let ring = c.ring(NodeId(1)).unwrap();
        assert_eq!(
            events(drain(&mut a)),
            vec![
                confchg(&[pa], &[(pg, reason)], &[]),
                GroupEvent::TotemConfChg(ring)
            ]
        );
    }
}
