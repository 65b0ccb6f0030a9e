//! The shared behavioural suite: the same tests run against the in-memory cluster
//! ([`crate::memory`]) and against a real corosync cluster in network namespaces (the
//! `csnap-e2e` harness). Both implement [`TestCluster`]; the [`suite`] functions are generic
//! over it.

use std::{future::Future, time::Duration};

use crate::{Group, GroupError, NodeId, Quorum};

/// A cluster the behavioural suite can drive.
pub trait TestCluster: Send + Sync {
    type G: Group;
    type Q: Quorum;
    /// Node ids of the cluster, sorted.
    fn nodes(&self) -> Vec<NodeId>;
    /// Join `group` as a new process on `node`.
    fn join(
        &self,
        node: NodeId,
        group: &str,
    ) -> impl Future<Output = Result<Self::G, GroupError>> + Send;
    /// Follow quorum on `node`; the first item is the current state.
    fn quorum(&self, node: NodeId) -> impl Future<Output = Result<Self::Q, GroupError>> + Send;
    /// Split the network: each slice is one partition; nodes named in no slice are isolated
    /// alone. Replaces any earlier partitioning.
    fn partition(&self, sides: &[Vec<NodeId>]) -> impl Future<Output = Result<(), String>> + Send;
    /// Reconnect every node with every other.
    fn heal(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Upper bound for one membership change to be seen by every member (the in-memory
    /// cluster: short; real corosync: token + consensus + margin, e.g. 30 s).
    fn settle(&self) -> Duration;
    /// The largest payload a member may multicast, if the cluster knows it; the
    /// `too_large` suite check is skipped when it does not.
    fn max_message_size(&self) -> Option<usize> {
        None
    }
}

/// The behavioural suite. Each function drives one scenario on a cluster and panics with a
/// message naming the node, what was expected and what was seen. None assumes an exact event
/// count (a real join may produce several confchgs as members appear): they read each
/// member's stream with bounded waits until the awaited condition and assert the invariants
/// of virtual synchrony on everything they read.
///
/// Every function joins its own processes and leaves them at the end, so several may run in
/// turn on one cluster (with distinct group names, to be safe from late events). Each joins
/// at most one process per node and group: corosync identifies a process by node and pid,
/// and a harness drives every node from one OS process.
pub mod suite {
    use std::collections::BTreeSet;
    use std::fmt::Write as _;
    use std::time::Duration;

    use futures::{Stream, StreamExt};
    use tokio::time::{timeout_at, Instant};

    use super::TestCluster;
    use crate::{
        ConfChg, Group, GroupError, GroupEvent, GroupSender, Member, NodeId, QuorumEvent, Reason,
        TotemConfChg,
    };

    /// What one process has observed so far, with the invariants every event must keep.
    struct Observed {
        local: Member,
        seen: Vec<GroupEvent>,
        /// Group membership after the last confchg; `None` before the first.
        view: Option<BTreeSet<Member>>,
        last_totem: Option<TotemConfChg>,
        deliveries: usize,
    }

    impl Observed {
        fn new(local: Member) -> Self {
            Observed {
                local,
                seen: Vec::new(),
                view: None,
                last_totem: None,
                deliveries: 0,
            }
        }

        fn view(&self) -> BTreeSet<Member> {
            self.view.clone().unwrap_or_default()
        }

        fn ring_members(&self) -> Vec<NodeId> {
            self.last_totem
                .as_ref()
                .map(|t| t.members.clone())
                .unwrap_or_default()
        }

        /// Apply one event; panics if it breaks an invariant.
        fn apply(&mut self, event: GroupEvent) {
            match &event {
                GroupEvent::ConfChg(c) => self.apply_confchg(c),
                GroupEvent::TotemConfChg(t) => {
                    if !is_sorted(&t.members) {
                        self.fail("totem members sorted", &format!("{:?}", t.members));
                    }
                    if let Some(prev) = &self.last_totem {
                        if t.ring.seq <= prev.ring.seq {
                            self.fail(
                                &format!("a ring seq above the previous ring {}", prev.ring),
                                &format!("ring {}", t.ring),
                            );
                        }
                    }
                    if !t.members.contains(&self.local.node) {
                        self.fail("own node in the totem membership", &describe(&event));
                    }
                    self.last_totem = Some(t.clone());
                }
                GroupEvent::Deliver(_) => {
                    if self.view.is_none() {
                        self.fail("no delivery before the join confchg", &describe(&event));
                    }
                    self.deliveries += 1;
                }
            }
            self.seen.push(event);
        }

        fn apply_confchg(&mut self, c: &ConfChg) {
            let members: BTreeSet<Member> = c.members.iter().copied().collect();
            if !is_sorted(&c.members) || members.len() != c.members.len() {
                self.fail(
                    "confchg members sorted and distinct",
                    &format!("{:?}", c.members),
                );
            }
            if !members.contains(&self.local) {
                self.fail("itself among the confchg members", &describe_confchg(c));
            }
            match &self.view {
                None => {
                    if !c
                        .joined
                        .iter()
                        .any(|j| j.member == self.local && j.reason == Reason::Join)
                    {
                        self.fail("its own join as the first confchg", &describe_confchg(c));
                    }
                }
                Some(view) => {
                    let mut expected = view.clone();
                    for l in &c.left {
                        expected.remove(&l.member);
                    }
                    expected.extend(c.joined.iter().map(|j| j.member));
                    if expected != members {
                        self.fail(
                            &format!(
                                "members = previous view {} - left + joined",
                                procs_str(view)
                            ),
                            &describe_confchg(c),
                        );
                    }
                }
            }
            self.view = Some(members);
        }

        fn fail(&self, expected: &str, seen: &str) -> ! {
            panic!(
                "process {} (node {}): expected {expected}, saw {seen}; its events so far: {}",
                self.local,
                self.local.node,
                describe_all(&self.seen)
            )
        }
    }

    /// One process the suite drives.
    struct Proc<G> {
        group: G,
        obs: Observed,
    }

    impl<G: Group> Proc<G> {
        fn new(group: G) -> Self {
            let local = group.local();
            Proc {
                group,
                obs: Observed::new(local),
            }
        }

        fn local(&self) -> Member {
            self.obs.local
        }

        /// Read events until `done` holds (checked after each event) and return the events
        /// read by this call. Panics on timeout, end of stream or error.
        async fn until(
            &mut self,
            deadline: Instant,
            awaiting: &str,
            mut done: impl FnMut(&Observed) -> bool,
        ) -> Vec<GroupEvent> {
            let start = self.obs.seen.len();
            while !done(&self.obs) {
                let event = match timeout_at(deadline, self.group.next()).await {
                    Err(_) => self.obs.fail(awaiting, "nothing more before the deadline"),
                    Ok(None) => self.obs.fail(awaiting, "the end of its stream"),
                    Ok(Some(Err(e))) => self.obs.fail(awaiting, &format!("error: {e}")),
                    Ok(Some(Ok(event))) => event,
                };
                self.obs.apply(event);
            }
            self.obs.seen[start..].to_vec()
        }
    }

    /// One node's quorum stream.
    struct QuorumWatch<Q> {
        node: NodeId,
        stream: Q,
        seen: Vec<QuorumEvent>,
    }

    impl<Q: Stream<Item = Result<QuorumEvent, GroupError>> + Unpin> QuorumWatch<Q> {
        /// Read until an event satisfies `done`; returns it.
        async fn until(
            &mut self,
            deadline: Instant,
            awaiting: &str,
            mut done: impl FnMut(&QuorumEvent) -> bool,
        ) -> QuorumEvent {
            loop {
                let event = match timeout_at(deadline, self.stream.next()).await {
                    Err(_) => self.fail(awaiting, "nothing more before the deadline"),
                    Ok(None) => self.fail(awaiting, "the end of its quorum stream"),
                    Ok(Some(Err(e))) => self.fail(awaiting, &format!("error: {e}")),
                    Ok(Some(Ok(event))) => event,
                };
                if let Some(prev) = self.seen.last() {
                    if event.ring.seq < prev.ring.seq {
                        self.fail(
                            &format!("quorum ring seqs never decreasing (was {})", prev.ring),
                            &format!("{event:?}"),
                        );
                    }
                }
                self.seen.push(event.clone());
                if done(&event) {
                    return event;
                }
            }
        }

        fn fail(&self, expected: &str, seen: &str) -> ! {
            panic!(
                "quorum on node {}: expected {expected}, saw {seen}; its events so far: {:?}",
                self.node, self.seen
            )
        }
    }

    fn is_sorted<T: Ord>(items: &[T]) -> bool {
        items.windows(2).all(|w| w[0] <= w[1])
    }

    fn procs_str<'a>(members: impl IntoIterator<Item = &'a Member>) -> String {
        let list: Vec<String> = members.into_iter().map(|m| m.to_string()).collect();
        format!("[{}]", list.join(", "))
    }

    fn nodes_str(nodes: &[NodeId]) -> String {
        let list: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        format!("[{}]", list.join(", "))
    }

    fn describe_confchg(c: &ConfChg) -> String {
        let list = |v: &[crate::MemberChange]| {
            v.iter()
                .map(|m| format!("{} {:?}", m.member, m.reason))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let members: Vec<String> = c.members.iter().map(|m| m.to_string()).collect();
        format!(
            "confchg(members [{}], left [{}], joined [{}])",
            members.join(", "),
            list(&c.left),
            list(&c.joined)
        )
    }

    fn describe(event: &GroupEvent) -> String {
        match event {
            GroupEvent::ConfChg(c) => describe_confchg(c),
            GroupEvent::TotemConfChg(t) => {
                format!("totem(ring {}, nodes {})", t.ring, nodes_str(&t.members))
            }
            GroupEvent::Deliver(d) => {
                format!("deliver(from {}, {} bytes)", d.from, d.payload.len())
            }
        }
    }

    /// The last events of a log, for panic messages.
    fn describe_all(events: &[GroupEvent]) -> String {
        const SHOWN: usize = 30;
        let mut out = String::new();
        let skip = events.len().saturating_sub(SHOWN);
        if skip > 0 {
            let _ = write!(out, "({skip} earlier) ");
        }
        for e in &events[skip..] {
            let _ = write!(out, "{}; ", describe(e));
        }
        out
    }

    fn settle_deadline<C: TestCluster>(c: &C) -> Instant {
        Instant::now() + c.settle()
    }

    /// Join one process per node in `nodes` (in that order) and wait until each sees all
    /// of them in its view and has a totem confchg.
    async fn join_all<C: TestCluster>(c: &C, group: &str, nodes: &[NodeId]) -> Vec<Proc<C::G>> {
        let mut procs = Vec::new();
        for &node in nodes {
            let joined = timeout_at(settle_deadline(c), c.join(node, group)).await;
            match joined {
                Ok(Ok(g)) => procs.push(Proc::new(g)),
                Ok(Err(e)) => panic!("node {node}: joining group {group:?} failed: {e}"),
                Err(_) => panic!("node {node}: joining group {group:?} did not finish in time"),
            }
        }
        let all: BTreeSet<Member> = procs.iter().map(|p| p.local()).collect();
        let deadline = settle_deadline(c);
        for p in &mut procs {
            p.until(
                deadline,
                &format!(
                    "a view of all joined processes {} and a totem confchg",
                    procs_str(&all)
                ),
                |o| o.view() == all && o.last_totem.is_some(),
            )
            .await;
        }
        procs
    }

    async fn leave_all<C: TestCluster>(c: &C, procs: Vec<Proc<C::G>>) {
        for p in procs {
            let local = p.local();
            match timeout_at(settle_deadline(c), p.group.leave()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("process {local} (node {}): leave failed: {e}", local.node),
                Err(_) => panic!(
                    "process {local} (node {}): leave did not finish",
                    local.node
                ),
            }
        }
    }

    /// One process per node joins `group`; each sees every member in its view (all joins
    /// with `Reason::Join`) and a totem confchg listing every node of the (whole) cluster.
    pub async fn members_see_each_other<C: TestCluster>(c: &C, group: &str) {
        let nodes = c.nodes();
        assert!(!nodes.is_empty(), "the cluster has no nodes");
        let procs = join_all(c, group, &nodes).await;
        for p in &procs {
            if p.obs.ring_members() != nodes {
                p.obs.fail(
                    &format!("a totem confchg listing all nodes {}", nodes_str(&nodes)),
                    &format!("ring members {}", nodes_str(&p.obs.ring_members())),
                );
            }
            for event in &p.obs.seen {
                if let GroupEvent::ConfChg(c) = event {
                    let only_joins =
                        c.left.is_empty() && c.joined.iter().all(|j| j.reason == Reason::Join);
                    if !only_joins {
                        p.obs.fail(
                            "only joins (Reason::Join) while members join",
                            &describe_confchg(c),
                        );
                    }
                }
            }
        }
        leave_all(c, procs).await;
    }

    const PAYLOAD_MAGIC: &[u8; 4] = b"csao";

    /// The suite's message: sender node, sender pid, index, so a receiver can check who
    /// sent what and in which order.
    fn encode(from: Member, index: u64) -> Vec<u8> {
        let mut out = PAYLOAD_MAGIC.to_vec();
        out.extend_from_slice(&from.node.0.to_be_bytes());
        out.extend_from_slice(&from.pid.to_be_bytes());
        out.extend_from_slice(&index.to_be_bytes());
        out
    }

    fn decode(payload: &[u8]) -> Option<(Member, u64)> {
        if payload.len() != 20 || &payload[..4] != PAYLOAD_MAGIC {
            return None;
        }
        let node = u32::from_be_bytes(payload[4..8].try_into().ok()?);
        let pid = u32::from_be_bytes(payload[8..12].try_into().ok()?);
        let index = u64::from_be_bytes(payload[12..20].try_into().ok()?);
        Some((
            Member {
                node: NodeId(node),
                pid,
            },
            index,
        ))
    }

    /// Wait for a spawned task; a panic inside it is re-raised with its own message.
    async fn join_task<T>(task: tokio::task::JoinHandle<T>) -> T {
        match task.await {
            Ok(value) => value,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("suite task failed: {e}"),
        }
    }

    /// One process per node joins; all multicast `per_member` messages at once (one task
    /// per sender, a reader task per member). Every member must receive the identical
    /// sequence of (sender, payload), `members x per_member` long, each sender's messages
    /// in its send order.
    pub async fn agreed_order<C: TestCluster>(c: &C, group: &str, per_member: usize) {
        let nodes = c.nodes();
        let procs = join_all(c, group, &nodes).await;
        let members: Vec<Member> = procs.iter().map(|p| p.local()).collect();
        let total = members.len() * per_member;
        // Generous: the bound only stops a broken run, it is not a performance assertion.
        let allowance =
            Duration::from_millis(10).saturating_mul(u32::try_from(total).unwrap_or(u32::MAX));
        let deadline = Instant::now() + c.settle() + allowance;

        let senders: Vec<_> = procs
            .iter()
            .map(|p| (p.local(), p.group.sender()))
            .collect();
        let readers: Vec<_> = procs
            .into_iter()
            .map(|mut p| {
                tokio::spawn(async move {
                    let start = p.obs.seen.len();
                    p.until(deadline, &format!("{total} deliveries"), |o| {
                        o.deliveries >= total
                    })
                    .await;
                    let got: Vec<(Member, Vec<u8>)> = p.obs.seen[start..]
                        .iter()
                        .filter_map(|e| match e {
                            GroupEvent::Deliver(d) => Some((d.from, d.payload.clone())),
                            _ => None,
                        })
                        .collect();
                    (p, got)
                })
            })
            .collect();
        let sending: Vec<_> = senders
            .into_iter()
            .map(|(local, sender)| {
                tokio::spawn(async move {
                    for index in 0..per_member as u64 {
                        match timeout_at(deadline, sender.mcast(encode(local, index))).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => panic!(
                                "process {local} (node {}): mcast of message {index} failed: {e}",
                                local.node
                            ),
                            Err(_) => panic!(
                                "process {local} (node {}): mcast of message {index} not done in time",
                                local.node
                            ),
                        }
                    }
                })
            })
            .collect();
        for task in sending {
            join_task(task).await;
        }
        let mut results = Vec::new();
        for task in readers {
            results.push(join_task(task).await);
        }

        let (first, reference) = (&results[0].0, &results[0].1);
        for (p, got) in &results {
            if got.len() != total {
                p.obs.fail(
                    &format!("exactly {total} deliveries"),
                    &format!("{}", got.len()),
                );
            }
            if let Some(i) = got.iter().zip(reference.iter()).position(|(a, b)| a != b) {
                p.obs.fail(
                    &format!(
                        "the same delivery order as process {}, whose delivery {i} is from {}",
                        first.local(),
                        reference[i].0
                    ),
                    &format!("delivery {i} from {}", got[i].0),
                );
            }
            let mut next_index = std::collections::BTreeMap::<Member, u64>::new();
            for (i, (from, payload)) in got.iter().enumerate() {
                let Some((sender, index)) = decode(payload) else {
                    p.obs.fail(
                        "only the suite's messages",
                        &format!("delivery {i}: {payload:?}"),
                    );
                };
                if sender != *from || !members.contains(from) {
                    p.obs.fail(
                        &format!("delivery {i} from a member, as its payload says ({sender})"),
                        &format!("from {from}"),
                    );
                }
                let expected = next_index.entry(sender).or_insert(0);
                if index != *expected {
                    p.obs.fail(
                        &format!("message {expected} next from {sender} (FIFO per sender)"),
                        &format!("message {index} as delivery {i}"),
                    );
                }
                *expected += 1;
            }
        }
        leave_all(c, results.into_iter().map(|(p, _)| p).collect()).await;
    }

    /// Isolate `isolated` from the other nodes (at least two), check both sides, heal and
    /// check the merge.
    ///
    /// Partition: each side sees the other side's processes leave with `NodeDown` before a
    /// totem confchg of its own side (the majority lacks `isolated`; `isolated` has only
    /// itself); same-side members see identical transitions; quorum holds on the majority
    /// side only, with the same ring as the totem confchg. Merge: each side sees the other's
    /// processes join with `NodeUp`, then the totem confchg with all nodes, last; one ring
    /// for all with a seq above both sides'; quorum everywhere. Ring seqs strictly increase.
    pub async fn partition_and_merge<C: TestCluster>(c: &C, group: &str, isolated: NodeId) {
        let nodes = c.nodes();
        assert!(
            nodes.len() >= 3 && nodes.contains(&isolated),
            "partition_and_merge needs 3 or more nodes including the isolated node {isolated}, got {nodes:?}"
        );
        let rest: Vec<NodeId> = nodes.iter().copied().filter(|&n| n != isolated).collect();
        let mut procs = join_all(c, group, &nodes).await;
        let all: BTreeSet<Member> = procs.iter().map(|p| p.local()).collect();
        let side_of = |node: NodeId| {
            if node == isolated {
                vec![isolated]
            } else {
                rest.clone()
            }
        };
        let procs_on = |side: &[NodeId]| -> BTreeSet<Member> {
            all.iter()
                .copied()
                .filter(|m| side.contains(&m.node))
                .collect()
        };

        let deadline = settle_deadline(c);
        let mut quorums = Vec::new();
        for &node in &nodes {
            let stream = match timeout_at(deadline, c.quorum(node)).await {
                Ok(Ok(q)) => q,
                Ok(Err(e)) => panic!("node {node}: following quorum failed: {e}"),
                Err(_) => panic!("node {node}: following quorum did not start in time"),
            };
            let mut q = QuorumWatch {
                node,
                stream,
                seen: Vec::new(),
            };
            q.until(
                deadline,
                &format!("quorate with all nodes {nodes:?}"),
                |e| e.quorate && e.members == nodes,
            )
            .await;
            quorums.push(q);
        }
        let seq_before = procs
            .iter()
            .filter_map(|p| p.obs.last_totem.as_ref().map(|t| t.ring.seq))
            .max()
            .unwrap_or(0);

        // Partition.
        if let Err(e) = c.partition(std::slice::from_ref(&rest)).await {
            panic!("isolating node {isolated} failed: {e}");
        }
        let deadline = settle_deadline(c);
        let mut split_transitions = Vec::new();
        for p in &mut procs {
            let side = side_of(p.local().node);
            let events = p
                .until(
                    deadline,
                    &format!("a totem confchg of side {}", nodes_str(&side)),
                    |o| o.ring_members() == side,
                )
                .await;
            let gone: BTreeSet<Member> = all.difference(&procs_on(&side)).copied().collect();
            check_transition(
                &p.obs,
                &events,
                &gone,
                Reason::NodeDown,
                &procs_on(&side),
                seq_before,
            );
            split_transitions.push((p.local(), events));
        }
        same_transitions(&split_transitions, &rest);
        for q in &mut quorums {
            let side = side_of(q.node);
            let quorate = q.node != isolated;
            let ring = procs
                .iter()
                .find(|p| p.local().node == q.node)
                .and_then(|p| p.obs.last_totem.as_ref().map(|t| t.ring));
            q.until(
                deadline,
                &format!("quorate={quorate} with members {side:?} on ring {ring:?}"),
                |e| e.quorate == quorate && e.members == side && Some(e.ring) == ring,
            )
            .await;
        }
        let seq_split = procs
            .iter()
            .filter_map(|p| p.obs.last_totem.as_ref().map(|t| t.ring.seq))
            .max()
            .unwrap_or(0);

        // Merge.
        if let Err(e) = c.heal().await {
            panic!("healing the partition of node {isolated} failed: {e}");
        }
        let deadline = settle_deadline(c);
        let mut merge_transitions = Vec::new();
        for p in &mut procs {
            let events = p
                .until(
                    deadline,
                    &format!("a totem confchg of all nodes {}", nodes_str(&nodes)),
                    |o| o.ring_members() == nodes,
                )
                .await;
            let side = side_of(p.local().node);
            let back: BTreeSet<Member> = all.difference(&procs_on(&side)).copied().collect();
            check_transition(&p.obs, &events, &back, Reason::NodeUp, &all, seq_split);
            merge_transitions.push((p.local(), events));
        }
        same_transitions(&merge_transitions, &rest);
        let merged_ring = procs[0].obs.last_totem.as_ref().map(|t| t.ring);
        for p in &procs {
            let ring = p.obs.last_totem.as_ref().map(|t| t.ring);
            if ring != merged_ring {
                p.obs.fail(
                    &format!(
                        "the merged ring {merged_ring:?} that process {} has",
                        procs[0].local()
                    ),
                    &format!("{ring:?}"),
                );
            }
        }
        for q in &mut quorums {
            q.until(
                deadline,
                &format!("quorate with all nodes {nodes:?} on ring {merged_ring:?}"),
                |e| e.quorate && e.members == nodes && Some(e.ring) == merged_ring,
            )
            .await;
        }
        leave_all(c, procs).await;
    }

    /// Check one side's view of a ring transition: every process in `changed` appears with
    /// `reason` (in left for NodeDown, in joined for NodeUp), no other reason occurs, the
    /// view ends as `final_view`, and the totem confchg is last with a seq above `seq_floor`.
    fn check_transition(
        obs: &Observed,
        events: &[GroupEvent],
        changed: &BTreeSet<Member>,
        reason: Reason,
        final_view: &BTreeSet<Member>,
        seq_floor: u64,
    ) {
        let mut seen_changed = BTreeSet::new();
        for event in events {
            if let GroupEvent::ConfChg(c) = event {
                for m in c.left.iter().chain(&c.joined) {
                    let allowed = match reason {
                        // A merge may first report what went down on the way (corosync
                        // sends a NodeDown confchg before the NodeUp one).
                        Reason::NodeUp => matches!(m.reason, Reason::NodeUp | Reason::NodeDown),
                        _ => m.reason == reason,
                    };
                    if !allowed {
                        obs.fail(
                            &format!("only {reason:?} changes in this transition"),
                            &describe_confchg(c),
                        );
                    }
                }
                let list = if reason == Reason::NodeUp {
                    &c.joined
                } else {
                    &c.left
                };
                seen_changed.extend(list.iter().filter(|m| m.reason == reason).map(|m| m.member));
            }
        }
        if !changed.is_subset(&seen_changed) {
            obs.fail(
                &format!("{} reported with {reason:?}", procs_str(changed)),
                &format!("only {}", procs_str(&seen_changed)),
            );
        }
        if obs.view() != *final_view {
            obs.fail(
                &format!("the view {}", procs_str(final_view)),
                &procs_str(&obs.view()),
            );
        }
        match events.last() {
            Some(GroupEvent::TotemConfChg(t)) if t.ring.seq > seq_floor => {}
            other => obs.fail(
                &format!("the totem confchg last, with a ring seq above {seq_floor:x}"),
                &other.map(describe).unwrap_or_default(),
            ),
        }
    }

    /// Processes on the nodes of `side` saw identical transitions.
    fn same_transitions(transitions: &[(Member, Vec<GroupEvent>)], side: &[NodeId]) {
        let on_side: Vec<&(Member, Vec<GroupEvent>)> = transitions
            .iter()
            .filter(|(m, _)| side.contains(&m.node))
            .collect();
        if let Some((first, reference)) = on_side.first() {
            for (member, events) in &on_side[1..] {
                if events != reference {
                    panic!(
                        "processes {first} and {member} are on the same side {side:?} but saw different transitions:\n  {first}: {}\n  {member}: {}",
                        describe_all(reference),
                        describe_all(events)
                    );
                }
            }
        }
    }

    /// A member that calls leave is seen by the others with `Reason::Leave`; a member whose
    /// handle is dropped (a process death) with `Reason::ProcDown`. Needs 3 or more nodes.
    pub async fn leave_and_procdown<C: TestCluster>(c: &C, group: &str) {
        let nodes = c.nodes();
        assert!(
            nodes.len() >= 3,
            "leave_and_procdown needs 3 or more nodes, got {nodes:?}"
        );
        let mut procs = join_all(c, group, &nodes).await;

        let leaver = procs.remove(0);
        let leaver_id = leaver.local();
        match timeout_at(settle_deadline(c), leaver.group.leave()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!(
                "process {leaver_id} (node {}): leave failed: {e}",
                leaver_id.node
            ),
            Err(_) => panic!(
                "process {leaver_id} (node {}): leave did not finish",
                leaver_id.node
            ),
        }
        expect_departure(c, &mut procs, leaver_id, Reason::Leave).await;

        let dying = procs.remove(0);
        let dying_id = dying.local();
        drop(dying);
        expect_departure(c, &mut procs, dying_id, Reason::ProcDown).await;

        leave_all(c, procs).await;
    }

    async fn expect_departure<C: TestCluster>(
        c: &C,
        procs: &mut [Proc<C::G>],
        gone: Member,
        reason: Reason,
    ) {
        let deadline = settle_deadline(c);
        for p in procs.iter_mut() {
            let events = p
                .until(deadline, &format!("{gone} leaving with {reason:?}"), |o| {
                    !o.view().contains(&gone)
                })
                .await;
            let shown = events.iter().rev().find_map(|e| match e {
                GroupEvent::ConfChg(c) => c.left.iter().find(|l| l.member == gone).copied(),
                _ => None,
            });
            if shown.map(|l| l.reason) != Some(reason) {
                p.obs.fail(
                    &format!("{gone} in a confchg's left list with {reason:?}"),
                    &format!("{shown:?}"),
                );
            }
        }
    }

    /// A payload one byte over the cluster's limit is refused with `MessageTooLarge`, and
    /// the group still works afterwards (a limit-sized message is delivered when the limit
    /// is small enough to send in a test). Skipped, saying so, if the cluster does not
    /// report its limit.
    pub async fn too_large<C: TestCluster>(c: &C, group: &str) {
        let Some(max) = c.max_message_size() else {
            println!("too_large: skipped, the cluster does not report its message size limit");
            return;
        };
        let nodes = c.nodes();
        let Some(&node) = nodes.first() else {
            panic!("the cluster has no nodes");
        };
        let mut procs = join_all(c, group, &[node]).await;
        let p = &mut procs[0];
        let sender = p.group.sender();
        let deadline = settle_deadline(c);
        match timeout_at(deadline, sender.mcast(vec![0; max + 1])).await {
            Ok(Err(GroupError::MessageTooLarge {
                size,
                max: reported,
            })) if size == max + 1 && reported == max => {}
            Ok(other) => p.obs.fail(
                &format!("MessageTooLarge {{ size: {}, max: {max} }}", max + 1),
                &format!("{other:?}"),
            ),
            Err(_) => p
                .obs
                .fail("MessageTooLarge at once", "no answer before the deadline"),
        }
        let fits = if max <= 1 << 20 {
            vec![7; max]
        } else {
            b"still works".to_vec()
        };
        match timeout_at(deadline, sender.mcast(fits.clone())).await {
            Ok(Ok(())) => {}
            other => p.obs.fail(
                &format!("a {}-byte mcast to succeed", fits.len()),
                &format!("{other:?}"),
            ),
        }
        let events = p
            .until(deadline, "its own message delivered", |o| o.deliveries >= 1)
            .await;
        match events.last() {
            Some(GroupEvent::Deliver(d)) if d.payload == fits && d.from == p.local() => {}
            other => p.obs.fail(
                "its own message back",
                &format!("{:?}", other.map(describe)),
            ),
        }
        leave_all(c, procs).await;
    }
}
