//! The shared behavioural suite: the same tests run against the in-memory cluster
//! ([`crate::memory`]) and against a real corosync cluster in network namespaces (the
//! `csnap-e2e` harness). Both implement [`TestCluster`]; the [`suite`] functions are generic
//! over it.

use std::{future::Future, time::Duration};

use crate::{Group, GroupError, NodeId, Quorum};

/// A cluster the behavioural suite can drive.
pub trait TestCluster: Send + Sync {
    /// A member's group connection.
    type G: Group;
    /// A node's quorum follower.
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
    /// `corosync-quorumtool -e votes` on `node`: set votequorum's expected votes of its
    /// partition (quorum may flip without a ring change).
    fn set_expected_votes(
        &self,
        node: NodeId,
        votes: u32,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Upper bound for one membership change to be seen by every member (the in-memory
    /// cluster: short; real corosync: token + consensus + margin, e.g. 30 s).
    fn settle(&self) -> Duration;
    /// The largest payload a member may multicast, if the cluster knows it; the
    /// `too_large` suite check is skipped when it does not.
    fn max_message_size(&self) -> Option<usize> {
        None
    }
    /// A payload size that travels as several frames (so membership changes can cut it).
    fn multi_frame_payload(&self) -> usize;
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
/// Removes the libqb IPC files in `/dev/shm` that belong to `pids`: the per-connection
/// directories `qb-<server pid>-<client pid>-<fd>-XXXXXX` with either end in `pids`, and
/// blackboxes `qb-<name>-<pid>-blackbox-*`. A process killed with SIGKILL (a power cut in a
/// test) leaves these behind, at 16 MiB of tmpfs per ring; a suite that kills corosyncs by
/// the hundred would fill `/dev/shm`. Returns how many entries it removed.
pub fn remove_ipc_files_of(pids: &std::collections::BTreeSet<u32>) -> usize {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !ipc_file_owner_in(&name, pids) {
            continue;
        }
        let path = entry.path();
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed += usize::from(result.is_ok());
    }
    removed
}

/// Whether the `/dev/shm` entry `name` is a libqb file of a process in `pids`.
fn ipc_file_owner_in(name: &str, pids: &std::collections::BTreeSet<u32>) -> bool {
    let Some(rest) = name.strip_prefix("qb-") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('-').collect();
    let pid_at = |i: usize| parts.get(i).and_then(|p| p.parse::<u32>().ok());
    if let Some(at) = parts.iter().position(|p| *p == "blackbox") {
        // qb-<name with dashes>-<pid>-blackbox-{data,header}
        return at >= 1 && pid_at(at - 1).is_some_and(|pid| pids.contains(&pid));
    }
    // qb-<server pid>-<client pid>-<fd>-<mkdtemp suffix>
    [pid_at(0), pid_at(1)]
        .into_iter()
        .flatten()
        .any(|pid| pids.contains(&pid))
}

#[cfg(test)]
mod ipc_file_tests {
    use super::ipc_file_owner_in;

    #[test]
    fn ipc_files_are_matched_by_either_end_or_the_blackbox_owner() {
        let pids = [100, 2000].into_iter().collect();
        assert!(ipc_file_owner_in("qb-100-555-30-AbCdEf", &pids));
        assert!(ipc_file_owner_in("qb-555-2000-7-xyzXYZ", &pids));
        assert!(!ipc_file_owner_in("qb-555-556-7-xyzXYZ", &pids));
        assert!(!ipc_file_owner_in("qb-1000-556-7-xyzXYZ", &pids));
        assert!(ipc_file_owner_in("qb-corosync-100-blackbox-data", &pids));
        assert!(ipc_file_owner_in(
            "qb-pacemaker-based-2000-blackbox-header",
            &pids
        ));
        assert!(!ipc_file_owner_in("qb-corosync-101-blackbox-data", &pids));
        assert!(!ipc_file_owner_in("qb-request-cpg-header", &pids));
        assert!(!ipc_file_owner_in("other-100-555", &pids));
    }
}

/// The behavioural tests, each generic over a [`TestCluster`].
pub mod suite {
    use std::collections::BTreeSet;
    use std::fmt::Write as _;
    use std::time::Duration;

    use futures::{Stream, StreamExt};
    use tokio::time::{timeout_at, Instant};

    use super::TestCluster;
    use crate::view::ViewTracker;
    use crate::{
        ConfChg, Group, GroupError, GroupEvent, GroupSender, Member, NodeId, QuorumEvent, Reason,
        Receipt, TotemConfChg,
    };

    /// What one process has observed so far, with the invariants every event must keep.
    struct Observed {
        local: Member,
        seen: Vec<GroupEvent>,
        /// Group membership after the last confchg; `None` before the first.
        view: Option<BTreeSet<Member>>,
        last_totem: Option<TotemConfChg>,
        deliveries: usize,
        tracker: ViewTracker,
    }

    impl Observed {
        fn new(local: Member) -> Self {
            Observed {
                local,
                seen: Vec::new(),
                view: None,
                last_totem: None,
                deliveries: 0,
                tracker: ViewTracker::new(local),
            }
        }

        /// The stable view (see [`crate::view`]) equals `members` on a ring of `nodes`.
        fn stable_is(&self, members: &BTreeSet<Member>, nodes: &[NodeId]) -> bool {
            self.tracker.stable().is_some_and(|v| {
                v.members.iter().copied().collect::<BTreeSet<_>>() == *members && v.nodes == nodes
            })
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
                    // Along one node's history seqs grow; the same ring may come twice (the
                    // initial totem confchg and a transition's).
                    // The same ring id may also come with another node list: corosync's
                    // initial totem confchg sent during a sync carries the new ring id
                    // with the old list, and the right one follows.
                    if let Some(prev) = &self.last_totem {
                        if t.ring.seq < prev.ring.seq
                            || (t.ring.seq == prev.ring.seq && t.ring != prev.ring)
                        {
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
            self.tracker.apply(&event);
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
                    "a stable view (own join and a totem confchg seen, no transition open) of all joined processes {}",
                    procs_str(&all)
                ),
                |o| o.view() == all && o.stable_is(&all, &o.ring_members()),
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
                    let mut receipts = Vec::new();
                    for index in 0..per_member as u64 {
                        match timeout_at(deadline, sender.mcast(encode(local, index))).await {
                            Ok(Ok(receipt)) => receipts.push(receipt),
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
                    // No membership change: every message is reported delivered.
                    for (index, receipt) in receipts.into_iter().enumerate() {
                        match timeout_at(deadline, receipt.delivered()).await {
                            Ok(Ok(())) => {}
                            other => panic!(
                                "process {local} (node {}): message {index}'s receipt: expected delivered, got {other:?}",
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
                        // sends a NodeDown confchg before the NodeUp one) and end with
                        // ProcDown for processes a merged node no longer has (exec/cpg.c's
                        // joinlist zombie removal).
                        Reason::NodeUp => matches!(
                            m.reason,
                            Reason::NodeUp | Reason::NodeDown | Reason::ProcDown
                        ),
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
        let receipt = match timeout_at(deadline, sender.mcast(fits.clone())).await {
            Ok(Ok(receipt)) => receipt,
            other => p.obs.fail(
                &format!("a {}-byte mcast to succeed", fits.len()),
                &format!("{other:?}"),
            ),
        };
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
        if let Err(e) = receipt.delivered().await {
            p.obs.fail("its receipt to say delivered", &e.to_string());
        }
        leave_all(c, procs).await;
    }

    /// What [`large_messages_across_changes`] saw.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CutStats {
        /// Messages whose receipt said delivered.
        pub delivered: usize,
        /// Messages whose receipt said a membership change cut them.
        pub cut: usize,
    }

    /// A large message of the suite: header (sender, index) then a pattern of `len` bytes.
    fn big_payload(from: Member, index: u64, len: usize) -> Vec<u8> {
        let mut out = encode(from, index);
        let seed = (from.pid as u64) ^ index.rotate_left(17);
        out.extend((0..len).map(|i| (seed.wrapping_add(i as u64 * 31) >> 3) as u8));
        out
    }

    fn check_big_payload(payload: &[u8]) -> Option<(Member, u64)> {
        let (from, index) = decode(payload.get(..20)?)?;
        (big_payload(from, index, payload.len() - 20) == payload).then_some((from, index))
    }

    /// A reader task's shared progress, so the test body can wait for membership.
    #[derive(Default)]
    struct Progress {
        ring: Vec<NodeId>,
        view: BTreeSet<Member>,
        /// Fence messages seen, by sender.
        fences: BTreeSet<Member>,
    }

    type Shared<T> = std::sync::Arc<std::sync::Mutex<T>>;

    /// Each message a sender sent, by index, with its fate.
    type Fates = Vec<(u64, Result<(), GroupError>)>;

    fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads a process's stream in a task until told to stop; publishes its progress.
    fn spawn_reader<G: Group>(
        mut p: Proc<G>,
        progress: Shared<Progress>,
        mut stop: tokio::sync::oneshot::Receiver<()>,
        deadline: Instant,
    ) -> tokio::task::JoinHandle<Proc<G>> {
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = &mut stop => return p,
                    next = timeout_at(deadline, p.group.next()) => match next {
                        Err(_) => p.obs.fail("events until the test ends", "nothing more before the deadline"),
                        Ok(None) => p.obs.fail("events until the test ends", "the end of its stream"),
                        Ok(Some(Err(e))) => p.obs.fail("events until the test ends", &format!("error: {e}")),
                        Ok(Some(Ok(event))) => event,
                    },
                };
                let fence = match &event {
                    GroupEvent::Deliver(d) if d.payload.starts_with(FENCE) => Some(d.from),
                    _ => None,
                };
                p.obs.apply(event);
                let mut shared = locked(&progress);
                shared.ring = p.obs.ring_members();
                shared.view = p.obs.view();
                shared.fences.extend(fence);
            }
        })
    }

    const FENCE: &[u8] = b"fence";

    /// Messages a sender keeps in flight before it waits for the oldest one's fate. A bound
    /// keeps the in-memory cluster (whose mcast never blocks) from queueing millions of
    /// messages and starving the readers and the test body on a small machine; it is large
    /// enough that every membership change still finds messages between frames.
    const SENDER_WINDOW: usize = 32;

    /// Sends large messages until told to stop; returns each message's index and fate.
    fn spawn_sender<S: GroupSender>(
        local: Member,
        sender: S,
        len: usize,
        sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        deadline: Instant,
    ) -> tokio::task::JoinHandle<Fates> {
        use std::sync::atomic::Ordering;
        async fn fate_of(
            local: Member,
            (index, receipt): (u64, Receipt),
            deadline: Instant,
        ) -> (u64, Result<(), GroupError>) {
            match timeout_at(deadline, receipt.delivered()).await {
                Ok(fate) => (index, fate),
                Err(_) => panic!("process {local}: message {index}'s fate unknown at the deadline"),
            }
        }
        tokio::spawn(async move {
            let mut in_flight: std::collections::VecDeque<(u64, Receipt)> = Default::default();
            let mut fates = Vec::new();
            let mut index = 0;
            while !stop.load(Ordering::Acquire) {
                match timeout_at(deadline, sender.mcast(big_payload(local, index, len))).await {
                    Ok(Ok(receipt)) => in_flight.push_back((index, receipt)),
                    // The process left or its connection is gone: it sends no more.
                    Ok(Err(GroupError::Disconnected { .. })) => break,
                    Ok(Err(e)) => panic!("process {local}: mcast of message {index} failed: {e}"),
                    Err(_) => panic!("process {local}: mcast of message {index} not done in time"),
                }
                index += 1;
                sent.fetch_add(1, Ordering::Release);
                if in_flight.len() > SENDER_WINDOW {
                    if let Some(oldest) = in_flight.pop_front() {
                        fates.push(fate_of(local, oldest, deadline).await);
                    }
                }
                // An mcast that completes at once never returns to the scheduler by itself.
                tokio::task::yield_now().await;
            }
            for pending in in_flight {
                fates.push(fate_of(local, pending, deadline).await);
            }
            fates
        })
    }

    /// One process of [`large_messages_across_changes`]: its reader and sender tasks.
    struct Running<G: Group> {
        local: Member,
        progress: Shared<Progress>,
        stop_reader: Option<tokio::sync::oneshot::Sender<()>>,
        reader: tokio::task::JoinHandle<Proc<G>>,
        sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
        sender: tokio::task::JoinHandle<Fates>,
        /// Tells this process's sender to stop.
        stop_sending: std::sync::Arc<std::sync::atomic::AtomicBool>,
        fence: G::Sender,
    }

    /// Waits until every running sender has sent two more messages (or stopped).
    async fn sent_some<G: Group>(running: &[Running<G>], deadline: Instant) {
        use std::sync::atomic::Ordering;
        let marks: Vec<u64> = running
            .iter()
            .map(|r| r.sent.load(Ordering::Acquire))
            .collect();
        loop {
            if running
                .iter()
                .zip(&marks)
                .all(|(r, m)| r.sender.is_finished() || r.sent.load(Ordering::Acquire) >= m + 2)
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("senders made no progress before the deadline");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until every running reader's published progress satisfies `ok`.
    async fn until_all<G: Group>(
        running: &[Running<G>],
        what: &str,
        deadline: Instant,
        ok: impl Fn(Member, &Progress) -> bool,
    ) {
        loop {
            let pending: Vec<Member> = running
                .iter()
                .filter(|r| !ok(r.local, &locked(&r.progress)))
                .map(|r| r.local)
                .collect();
            if pending.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: processes {} not there before the deadline",
                    procs_str(&pending)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Large (multi-frame) messages sent by every member without pause while a process
    /// joins, a process leaves, a node is cut off and the partition heals. Checks: every
    /// delivered payload is intact; each sender learns every message's fate, and a message
    /// reported delivered was delivered by its sender, one reported cut by nobody; members
    /// that went through the same view change delivered the same messages in the same
    /// order before it (virtual synchrony). Needs 3 or more nodes; returns the counts.
    pub async fn large_messages_across_changes<C: TestCluster>(c: &C, group: &str) -> CutStats {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let nodes = c.nodes();
        assert!(
            nodes.len() >= 3,
            "large_messages_across_changes needs 3 or more nodes, got {nodes:?}"
        );
        let len = c.multi_frame_payload();
        let (first_nodes, late_node) = (&nodes[..nodes.len() - 1], nodes[nodes.len() - 1]);
        let deadline = Instant::now() + c.settle() * 12;
        let start = |p: Proc<C::G>| {
            let stop_sending = Arc::new(AtomicBool::new(false));
            let local = p.local();
            let progress: Shared<Progress> = Arc::new(Mutex::new(Progress::default()));
            let (tx, rx) = tokio::sync::oneshot::channel();
            let sent = Arc::new(AtomicU64::new(0));
            let fence = p.group.sender();
            let sender = spawn_sender(
                local,
                p.group.sender(),
                len,
                sent.clone(),
                stop_sending.clone(),
                deadline,
            );
            let reader = spawn_reader(p, progress.clone(), rx, deadline);
            Running {
                local,
                progress,
                stop_reader: Some(tx),
                reader,
                sent,
                sender,
                stop_sending,
                fence,
            }
        };
        let mut running: Vec<Running<C::G>> = join_all(c, group, first_nodes)
            .await
            .into_iter()
            .map(start)
            .collect();

        // A process joins while everybody sends.
        sent_some(&running, deadline).await;
        let joiner = match timeout_at(settle_deadline(c), c.join(late_node, group)).await {
            Ok(Ok(g)) => Proc::new(g),
            other => panic!(
                "node {late_node}: joining during the sends failed: {:?}",
                other.map(|r| r.err())
            ),
        };
        running.push(start(joiner));
        let everyone: BTreeSet<Member> = running.iter().map(|r| r.local).collect();
        until_all(&running, "a view with the joiner", deadline, |_, p| {
            p.view == everyone
        })
        .await;

        // The first process leaves while the others send. It stops sending first and
        // reads up to its own fence, so its log holds every message of its own whose
        // receipt says delivered (a receipt does not wait for the reader).
        sent_some(&running, deadline).await;
        let mut leaver = running.remove(0);
        let leaver_id = leaver.local;
        leaver.stop_sending.store(true, Ordering::Release);
        let leaver_fates = join_task(leaver.sender).await;
        match timeout_at(deadline, leaver.fence.mcast(FENCE.to_vec())).await {
            Ok(Ok(_)) => {}
            other => panic!("process {leaver_id}: fence before leaving failed: {other:?}"),
        }
        while !locked(&leaver.progress).fences.contains(&leaver_id) {
            if Instant::now() > deadline {
                panic!("process {leaver_id}: its own fence not delivered before the deadline");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(tx) = leaver.stop_reader.take() {
            let _ = tx.send(());
        }
        let leaver_proc = join_task(leaver.reader).await;
        let leaver_log = leaver_proc.obs.seen.clone();
        match timeout_at(settle_deadline(c), leaver_proc.group.leave()).await {
            Ok(Ok(())) => {}
            other => panic!("process {leaver_id}: leave during the sends failed: {other:?}"),
        }
        let rest: BTreeSet<Member> = running.iter().map(|r| r.local).collect();
        until_all(&running, "a view without the leaver", deadline, |_, p| {
            p.view == rest
        })
        .await;

        // Cut the late node off while everybody sends, then heal.
        sent_some(&running, deadline).await;
        let majority: Vec<NodeId> = first_nodes.to_vec();
        if let Err(e) = c.partition(std::slice::from_ref(&majority)).await {
            panic!("isolating node {late_node} failed: {e}");
        }
        until_all(&running, "a ring of its side", deadline, |m, p| {
            p.ring
                == if m.node == late_node {
                    vec![late_node]
                } else {
                    majority.clone()
                }
        })
        .await;
        sent_some(&running, deadline).await;
        if let Err(e) = c.heal().await {
            panic!("healing failed: {e}");
        }
        until_all(&running, "the merged ring and view", deadline, |_, p| {
            p.ring == nodes && p.view == rest
        })
        .await;
        sent_some(&running, deadline).await;

        // Stop, fence, collect.
        for r in &running {
            r.stop_sending.store(true, Ordering::Release);
        }
        for r in &running {
            if let Err(e) = timeout_at(deadline, r.fence.mcast(FENCE.to_vec()))
                .await
                .unwrap_or_else(|_| panic!("process {}: fence not sent in time", r.local))
            {
                panic!("process {}: fence failed: {e}", r.local);
            }
        }
        until_all(&running, "every member's fence", deadline, |_, p| {
            p.fences.is_superset(&rest)
        })
        .await;
        let mut logs: Vec<(Member, Vec<GroupEvent>, bool)> = vec![(leaver_id, leaver_log, false)];
        let mut fates: Vec<(Member, Fates)> = vec![(leaver_id, leaver_fates)];
        let mut procs = Vec::new();
        for mut r in running {
            fates.push((r.local, join_task(r.sender).await));
            if let Some(tx) = r.stop_reader.take() {
                let _ = tx.send(());
            }
            let p = join_task(r.reader).await;
            logs.push((r.local, p.obs.seen.clone(), true));
            procs.push(p);
        }

        // Intact payloads; who delivered what.
        let mut delivered_by: std::collections::BTreeMap<(Member, u64), BTreeSet<Member>> =
            Default::default();
        for (who, log, _) in &logs {
            for event in log {
                if let GroupEvent::Deliver(d) = event {
                    if d.payload.starts_with(FENCE) {
                        continue;
                    }
                    match check_big_payload(&d.payload) {
                        Some((from, index)) if from == d.from => {
                            delivered_by.entry((from, index)).or_default().insert(*who);
                        }
                        _ => panic!(
                            "process {who}: a corrupt or misattributed {}-byte message from {}",
                            d.payload.len(),
                            d.from
                        ),
                    }
                }
            }
        }
        let mut stats = CutStats {
            delivered: 0,
            cut: 0,
        };
        for (sender, list) in &fates {
            for (index, fate) in list {
                let by = delivered_by.get(&(*sender, *index));
                match fate {
                    Ok(()) => {
                        stats.delivered += 1;
                        if !by.is_some_and(|s| s.contains(sender)) {
                            panic!("process {sender}: message {index} reported delivered, but its own stream never delivered it (delivered by {by:?})");
                        }
                    }
                    Err(GroupError::Interrupted { .. }) => {
                        stats.cut += 1;
                        if let Some(by) = by {
                            panic!("process {sender}: message {index} reported cut, yet {} delivered it", procs_str(by));
                        }
                    }
                    // The leaver's last messages: its stream ended before their fate.
                    Err(GroupError::Disconnected { .. }) if *sender == leaver_id => {}
                    Err(e) => panic!("process {sender}: message {index}: unexpected fate {e}"),
                }
            }
        }
        check_virtual_synchrony(&logs);
        leave_all(c, procs).await;
        stats
    }

    /// Processes that saw the same view change after the same view delivered the same
    /// messages, in the same order, between the two. View boundaries are confchgs and
    /// totem confchgs of a new ring (a repeated ring id, such as the initial totem
    /// confchg, is no boundary). Logs marked complete also close their last view at the
    /// last fence (all of them read up to the same final fences).
    fn check_virtual_synchrony(logs: &[(Member, Vec<GroupEvent>, bool)]) {
        let mut segments: std::collections::BTreeMap<String, (Member, Vec<Vec<u8>>)> =
            Default::default();
        let mut record = |key: String, who: Member, between: &Vec<Vec<u8>>| {
            match segments
            .get(&key)
        {
            Some((other, theirs)) if theirs != between => panic!(
                "processes {other} and {who} went through the same view change but delivered different messages before it ({} vs {} messages)",
                theirs.len(),
                between.len()
            ),
            Some(_) => {}
            None => {
                segments.insert(key, (who, between.clone()));
            }
        }
        };
        for (who, log, complete) in logs {
            let mut ring: Option<crate::RingId> = None;
            let mut start: Option<GroupEvent> = None;
            let mut between: Vec<Vec<u8>> = Vec::new();
            for event in log {
                let boundary = match event {
                    GroupEvent::Deliver(d) => {
                        between.push(d.payload.clone());
                        false
                    }
                    GroupEvent::ConfChg(_) => true,
                    GroupEvent::TotemConfChg(t) => Some(t.ring) != ring,
                };
                if !boundary {
                    continue;
                }
                if let Some(begin) = start.take() {
                    record(format!("{ring:?} {begin:?} -> {event:?}"), *who, &between);
                }
                between.clear();
                if let GroupEvent::TotemConfChg(t) = event {
                    ring = Some(t.ring);
                }
                start = Some(event.clone());
            }
            if let (true, Some(begin)) = (*complete, start) {
                // Up to the last fence: a message a sender had under way when it was told
                // to stop may follow the fences, and readers stop at the fences.
                let upto = between
                    .iter()
                    .rposition(|p| p.starts_with(FENCE))
                    .map_or(0, |i| i + 1);
                between.truncate(upto);
                record(format!("{ring:?} {begin:?} -> the fences"), *who, &between);
            }
        }
    }

    /// Every node joins two groups at the same moment (all joins started together), so
    /// some processes get their initial totem confchg before their own join confchg. Every
    /// process still reaches a stable view (see [`crate::view`]) of all processes of its
    /// group on all nodes. Returns how many saw the totem confchg first.
    pub async fn racing_joins<C: TestCluster>(c: &C, groups: [&str; 2]) -> usize {
        let nodes = c.nodes();
        let joins = nodes
            .iter()
            .flat_map(|&n| groups.iter().map(move |&g| (n, g)));
        let results = futures::future::join_all(joins.map(|(n, g)| async move {
            (n, g, timeout_at(settle_deadline(c), c.join(n, g)).await)
        }))
        .await;
        let mut procs: Vec<(String, Proc<C::G>)> = Vec::new();
        for (node, group, joined) in results {
            match joined {
                Ok(Ok(g)) => procs.push((group.to_owned(), Proc::new(g))),
                other => panic!(
                    "node {node}: joining {group} failed: {:?}",
                    other.map(|r| r.err())
                ),
            }
        }
        let deadline = settle_deadline(c);
        let mut totem_first = 0;
        for group in groups {
            let all: BTreeSet<Member> = procs
                .iter()
                .filter(|(g, _)| g == group)
                .map(|(_, p)| p.local())
                .collect();
            for (_, p) in procs.iter_mut().filter(|(g, _)| g == group) {
                p.until(
                    deadline,
                    &format!("a stable view of {} on all nodes", procs_str(&all)),
                    |o| o.stable_is(&all, &nodes),
                )
                .await;
                let first_confchg = p
                    .obs
                    .seen
                    .iter()
                    .position(|e| matches!(e, GroupEvent::ConfChg(_)));
                let first_totem = p
                    .obs
                    .seen
                    .iter()
                    .position(|e| matches!(e, GroupEvent::TotemConfChg(_)));
                if first_totem < first_confchg {
                    totem_first += 1;
                }
            }
        }
        leave_all(c, procs.into_iter().map(|(_, p)| p).collect()).await;
        totem_first
    }

    /// A process that leaves right after its join (before its join was delivered) leaves
    /// cleanly: the others see it join, then leave with `Reason::Leave`.
    pub async fn leave_right_after_join<C: TestCluster>(c: &C, group: &str) {
        let nodes = c.nodes();
        let mut procs = join_all(c, group, &nodes[..1]).await;
        let quick =
            match timeout_at(settle_deadline(c), c.join(nodes[nodes.len() - 1], group)).await {
                Ok(Ok(g)) => g,
                other => panic!(
                    "joining the quick leaver failed: {:?}",
                    other.map(|r| r.err())
                ),
            };
        let quick_id = quick.local();
        match timeout_at(settle_deadline(c), quick.leave()).await {
            Ok(Ok(())) => {}
            other => panic!("process {quick_id}: leave right after join failed: {other:?}"),
        }
        let p = &mut procs[0];
        let events = p
            .until(settle_deadline(c), &format!("{quick_id} joining, then leaving"), |o| {
                o.seen.iter().any(|e| matches!(e, GroupEvent::ConfChg(c) if c.left.iter().any(|l| l.member == quick_id)))
            })
            .await;
        let reasons: Vec<Reason> = events
            .iter()
            .filter_map(|e| match e {
                GroupEvent::ConfChg(c) => c
                    .joined
                    .iter()
                    .chain(&c.left)
                    .find(|m| m.member == quick_id)
                    .map(|m| m.reason),
                _ => None,
            })
            .collect();
        if reasons != [Reason::Join, Reason::Leave] {
            p.obs.fail(
                &format!("{quick_id} with Join then Leave"),
                &format!("{reasons:?}"),
            );
        }
        leave_all(c, procs).await;
    }

    /// Quorum flips without a ring change: the cut-off node, unquorate, becomes quorate on
    /// the same ring when its expected votes drop to 1 (`corosync-quorumtool -e 1`). Needs
    /// 3 or more nodes. Heals and restores expected votes at the end.
    pub async fn quorum_flips_on_the_same_ring<C: TestCluster>(c: &C, isolated: NodeId) {
        let nodes = c.nodes();
        assert!(nodes.len() >= 3 && nodes.contains(&isolated));
        let rest: Vec<NodeId> = nodes.iter().copied().filter(|&n| n != isolated).collect();
        let deadline = settle_deadline(c);
        let stream = match timeout_at(deadline, c.quorum(isolated)).await {
            Ok(Ok(q)) => q,
            other => panic!(
                "node {isolated}: following quorum failed: {:?}",
                other.map(|r| r.err())
            ),
        };
        let mut q = QuorumWatch {
            node: isolated,
            stream,
            seen: Vec::new(),
        };
        q.until(deadline, "quorate with all nodes", |e| {
            e.quorate && e.members == nodes
        })
        .await;
        if let Err(e) = c.partition(std::slice::from_ref(&rest)).await {
            panic!("isolating node {isolated} failed: {e}");
        }
        let deadline = settle_deadline(c);
        let alone = q
            .until(deadline, "unquorate alone", |e| {
                !e.quorate && e.members == [isolated]
            })
            .await;
        if let Err(e) = c.set_expected_votes(isolated, 1).await {
            panic!("node {isolated}: setting expected votes to 1 failed: {e}");
        }
        let flipped = q.until(deadline, "quorate alone", |e| e.quorate).await;
        if flipped.ring != alone.ring || flipped.members != alone.members {
            q.fail(
                &format!(
                    "the flip on the same ring {} with the same members",
                    alone.ring
                ),
                &format!("{flipped:?}"),
            );
        }
        if let Err(e) = c.heal().await {
            panic!("healing failed: {e}");
        }
        q.until(settle_deadline(c), "quorate with all nodes again", |e| {
            e.quorate && e.members == nodes
        })
        .await;
        if let Err(e) = c.set_expected_votes(isolated, nodes.len() as u32).await {
            panic!("node {isolated}: restoring expected votes failed: {e}");
        }
    }
}
