//! The membership core of cluster mode: one sans-IO state machine per volume and node
//! ([`VolumeMembership`]), in the shape of the server engine: [`VolumeMembership::handle`]
//! takes an [`Input`], [`VolumeMembership::poll_output`] yields [`Output`]s,
//! [`VolumeMembership::poll_timeout`] says when to feed the next [`Input::Tick`], and
//! [`VolumeMembership::status`] says what it waits on. Time arrives only as input
//! (monotonic milliseconds); nothing here touches a socket, a clock or corosync.
//!
//! One file per concern, as dlm_controld has cpg.c, member.c, fence.c:
//! * [`state`]: the messages (the per-member state message and the failover/fencing ones);
//! * [`view`]: the *agreed* view (stable CPG view + quorum on the same ring + every
//!   member's state for this membership);
//! * [`choice`]: which member runs the server, a pure function of the agreed view;
//! * [`gather`]: the failover gather of every node's snapshot clients (seed 001);
//! * [`merge`]: stale-merge detection from the state exchange (seed 003);
//! * [`fence`]: fencing jobs with timeouts and retries.
//!
//! # The I/O contract (what the shell must do)
//!
//! Feed, in the order they happen:
//! * [`Input::Tick`] with the monotonic clock in ms: before any other input of a wake-up,
//!   and at the latest at [`VolumeMembership::poll_timeout`];
//! * [`Input::Group`]: every event of the volume's CPG group stream, in stream order
//!   (confchg, totem confchg, and deliveries with their raw payload: decoding is done
//!   here, a bad payload is logged and dropped). If the stream fails (corosync died) feed
//!   [`Input::GroupLost`] and make a new machine for the new group connection;
//! * [`Input::Quorum`]: every event of the quorum stream (the first one is the state at
//!   subscription);
//! * [`Input::Config`]: after a corosync.conf reload changed priorities or fencing;
//! * [`Input::Clients`]: the full list of snapshot clients attached on this node for the
//!   volume, whenever it changes;
//! * [`Input::ServerStarted`] / [`Input::ServerStopped`] / [`Input::ServerFailed`]: the
//!   local server process became ready / exited after a stop / exited on its own. Every
//!   [`Output::StopServer`] must be answered with `ServerStopped` once the process is
//!   certainly gone (also if it never started);
//! * [`Input::FenceResult`] for every [`Output::Fence`] (success only once the node is
//!   certainly off: cfg kill_node returned, `stonith_admin --fence` confirmed, the command
//!   exited 0).
//!
//! Carry out each output:
//! * [`Output::Mcast`]: multicast the bytes to the group (agreed order). A send that fails
//!   because the view changed needs no retry: every confchg makes the machine send its
//!   state again;
//! * [`Output::StartServer`]: start the volume's server process (it may read the store and
//!   replay its journal) but let it grant nothing until [`Output::ActivateServer`], which
//!   carries the gathered snapshot clients (the engine's `expected_snapshot_clients`) and
//!   how long to hold snapshot announcements (`hold_snapshots_until`);
//! * [`Output::ExtendLease`]: pass the serving lease to the server process, which must stop
//!   granting anything when it runs out even if the agent is stuck. The lease is counted from
//!   when the machine sent a heartbeat that came back through the ring (never from when the
//!   agent happened to process something), so `until_ms` may be sooner than a fresh
//!   `now + serving_lease`. The shell must also make sure a server never outlives its agent
//!   (parent-death signal), so that an agent's `Idle` means no server on its node;
//! * [`Output::StopServer`]: stop the server at once (quorum lost, lease out, stale);
//! * [`Output::DeclareGone`]: tell the local server a gathered client will not come back;
//! * [`Output::DropClients`]: (reset of a stale node) disconnect this node's clients so they
//!   reconnect to the real server. The machine keeps the node's client list across the
//!   reset (the clients live on), so the shell need not report an unchanged list again;
//! * [`Output::Fence`]: run the configured fencing for the node, answer with a result;
//! * [`Output::Log`]: log it (the event name is stable, for tests and operators).
//!
//! # Safety rules encoded here
//! * A server stops at once when its node's quorum is lost, its serving lease runs out, or
//!   its node turns out stale. Its lease is renewed only by its own [`state::Body::Heartbeat`]
//!   delivered back in the view it was sent in, to `sent + serving_lease`: cpg-glue drops a
//!   frame sent in a view its receiver has left, so a server whose agent is slow to see a
//!   partition renews nothing after the ring is gone.
//! * A new server starts only in an agreed quorate view, on the chosen member, when no
//!   member runs or stops a server, every server that departed is certainly stopped
//!   (fenced and confirmed, seen stopped by its own agent, or `serving_lease + margin` past
//!   its departure), and the view holds a member with *certain history* (below).
//! * The server is activated only when every member of the announce's view (minus leavers
//!   and stale members) answered with its clients.
//! * Stale members (state of another lineage after a merge) never become server, stop any
//!   server they run, and are fenced (or, with `fencing: reset`, reset) by exactly one
//!   member: the first claim delivered wins, fencing attempts are made only in an agreed
//!   quorate view, and two claimants that meet after a merge settle on one.
//! * A fencing job ends without a confirmation only when the node's server is certainly
//!   stopped and the node holds nothing of another lineage: a departed server (not stale)
//!   whose stop wait ran out, or a node back clean (`Idle`, and no state or the reference
//!   lineage). kill_node's "not in the membership" is no proof the node is off, so it is
//!   the lease that ends such a job, never the error; stale nodes are fenced or reset until
//!   confirmed or back without state. A reset happens once per incident.
//!
//! # Certain history
//! A member's history is *certain* when it knows every server that may still be active. It
//! is certain once it has been joined and quorate without a break for one stop wait
//! (`serving_lease + margin`), or once it is in an agreed quorate view with a member whose
//! state says it is certain for that very ring; it stops being certain when the quorum
//! service reports it not quorate, and an agent that restarts starts uncertain. Why that is
//! enough:
//! * Every announce is delivered in an agreed quorate view, and two quorate rings never
//!   coexist (majorities intersect, a node is in one ring at a time), so quorate rings
//!   follow each other in time. A node quorate without a break is in every quorate ring of
//!   that period, and an agent joined throughout is in every view of the group in them: it
//!   delivers every announce (every member of the sender's view delivers a frame the sender
//!   delivered, unless it leaves that view first: cpg-glue's model, and corosync's for
//!   members that stay with the sender; see docs/architecture.md for the corner where a
//!   member is cut off at that very moment), and sees the sender depart as a server (the
//!   announce itself marks its sender as one, even if its `Starting` state is cut off).
//! * A server announced before that unbroken run began belongs to a quorate ring that ended
//!   before the run's first ring formed. Its lease counts from a heartbeat sent while its
//!   ring was alive, so it is certainly over one stop wait after the run began.
//! * A certain member's knowledge reaches the others in the state exchange: servers in the
//!   view show in their role, departures it waits out in `unsettled`.
//!
//! Majority intersection alone is not enough: the member in the intersection may have
//! restarted (lost its memory) or have been in a non-quorate partition while the announce
//! went out (soak seed 0x900d0c65).

pub mod choice;
pub mod fence;
pub mod gather;
pub mod merge;
pub mod state;
pub mod view;

#[cfg(test)]
mod sim;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use cpg_glue::{GroupEvent, Member, NodeId, QuorumEvent, RingId};
use csnap_proto::msg::ClientId;

use crate::config::{CsnapConfig, Fencing};
use fence::{FenceAction, FenceTable};
use gather::Gather;
use state::{Body, Lineage, MemberState, Message, Role};
use view::{Agreed, Pending, ViewState};

/// Default serving lease: a server whose view is not agreed and quorate for this long
/// stops; others wait this plus the margin after it departed.
pub const DEFAULT_SERVING_LEASE_MS: u64 = 8_000;

/// The server engine's own margin on leases (`csnap_server::engine::LEASE_MARGIN_SECS`).
pub const LEASE_MARGIN_MS: u64 = csnap_server::engine::LEASE_MARGIN_SECS * 1000;

/// Origin clients' write lease, as the server's Welcome gives it (`origin_lease_secs`).
pub const DEFAULT_ORIGIN_LEASE_MS: u64 = 10_000;

/// What the machine needs to know about the cluster configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    /// `csnap_priority` by node (absent: 0).
    pub priorities: BTreeMap<NodeId, i32>,
    /// How to fence a node (from the `csnap` section).
    pub fencing: Fencing,
    /// Where this node's server for the volume listens (announced to the group).
    pub server_address: String,
    /// How long a server may serve without renewing its lease (ms).
    pub serving_lease_ms: u64,
    /// Added to every lease before counting on its expiry (clock rates, in-flight I/O).
    pub lease_margin_ms: u64,
    /// Origin clients' write lease: how long an old server's origin clients may still write
    /// after it stopped answering. The new server holds snapshots until then.
    pub origin_lease_ms: u64,
    /// One fencing attempt counts as failed after this long without a result.
    pub fence_timeout_ms: u64,
    /// Delay before the next attempt after a failure.
    pub fence_retry_ms: u64,
}

impl MembershipConfig {
    /// From the parsed corosync.conf section, with default timings.
    pub fn from_csnap(config: &CsnapConfig, server_address: String) -> MembershipConfig {
        MembershipConfig {
            priorities: config
                .nodes
                .iter()
                .map(|(id, n)| (*id, n.priority))
                .collect(),
            fencing: config.fencing.clone(),
            server_address,
            serving_lease_ms: DEFAULT_SERVING_LEASE_MS,
            lease_margin_ms: LEASE_MARGIN_MS,
            origin_lease_ms: DEFAULT_ORIGIN_LEASE_MS,
            fence_timeout_ms: 60_000,
            fence_retry_ms: 5_000,
        }
    }

    /// How long after a server departed it is certainly stopped without fencing.
    pub fn stop_wait_ms(&self) -> u64 {
        self.serving_lease_ms.saturating_add(self.lease_margin_ms)
    }

    fn clients_wait_ms(&self) -> u64 {
        self.origin_lease_ms.saturating_add(self.lease_margin_ms)
    }

    fn priority(&self, node: NodeId) -> i32 {
        self.priorities
            .get(&node)
            .copied()
            .unwrap_or(crate::config::DEFAULT_PRIORITY)
    }
}

/// Everything the machine reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The monotonic clock, in ms (never goes back; an older value is ignored).
    Tick {
        /// Milliseconds of the shell's monotonic clock.
        now_ms: u64,
    },
    /// An event of the volume's CPG group, in stream order.
    Group(GroupEvent),
    /// The group connection failed (corosync died): stop serving at once.
    GroupLost {
        /// What failed.
        detail: String,
    },
    /// A change of quorum.
    Quorum(QuorumEvent),
    /// A configuration reload.
    Config {
        /// `csnap_priority` by node.
        priorities: BTreeMap<NodeId, i32>,
        /// How to fence a node.
        fencing: Fencing,
    },
    /// The snapshot clients attached on this node, complete list.
    Clients(Vec<ClientId>),
    /// The local server started and is ready to be activated.
    ServerStarted,
    /// The local server exited cleanly.
    ServerStopped,
    /// The local server failed (exited with an error).
    ServerFailed {
        /// Why, as the server said.
        detail: String,
    },
    /// The result of a fencing attempt asked for with [`Output::Fence`].
    FenceResult {
        /// The node fenced.
        node: NodeId,
        /// Whether it is certainly stopped now.
        ok: bool,
        /// What the fencing command said.
        detail: String,
    },
}

/// Why the local server is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// This node's partition lost quorum.
    QuorumLost,
    /// The serving lease ran out before it was renewed.
    LeaseExpired,
    /// This node holds state of another lineage.
    Stale,
    /// An announce did not go as planned (another lineage won the race).
    Superseded,
    /// The group connection failed (corosync died).
    GroupLost,
}

/// A log line with a stable event name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEvent {
    /// The stable event name (`key=...` in the log).
    pub name: &'static str,
    /// Logged as a warning rather than as information.
    pub warn: bool,
    /// What happened, for people.
    pub detail: String,
    /// The node the event is about, when that is another node than the one logging it
    /// (the departed server, the stale or fenced node).
    pub about: Option<NodeId>,
}

/// Everything the machine asks the shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send these bytes to the volume's group.
    Mcast(Vec<u8>),
    /// Start the local server (not serving yet) for this generation.
    StartServer {
        /// The store generation the server starts as.
        generation: u64,
    },
    /// Let the started server serve: the gather is done.
    ActivateServer {
        /// The generation it was started as.
        generation: u64,
        /// The snapshot clients of the previous server it must wait for (its activation gate).
        clients: Vec<ClientId>,
        /// Hold snapshot announcements this long: the old server's origin clients may
        /// still write through cached promises until then.
        hold_snapshots_ms: u64,
    },
    /// Extend the local server's serving lease.
    ExtendLease {
        /// The new end (monotonic ms).
        until_ms: u64,
    },
    /// Stop the local server.
    StopServer {
        /// Why.
        reason: StopReason,
    },
    /// Tell the server this snapshot client is gone (its node left): release what it holds.
    DeclareGone {
        /// The client gone.
        client: ClientId,
    },
    /// This node was reset: drop every client connection and reconnect, so the server learns their
    /// locks afresh.
    DropClients,
    /// Fence a node whose server cannot be known to have stopped; answer with
    /// [`Input::FenceResult`].
    Fence {
        /// The node to fence.
        node: NodeId,
        /// How.
        method: Fencing,
        /// The attempt's number, from 1 (for retries and logs).
        attempt: u32,
    },
    /// Log this line.
    Log(LogEvent),
}

/// The gate the machine waits on, as `dlm_tool status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// No agreed view yet.
    View(Pending),
    /// This node's partition has no quorum.
    NotQuorate,
    /// This node holds state of another lineage and waits to be fenced or reset.
    Stale,
    /// History not certain (just started, or quorum was lost): waits until `until_ms` (a
    /// stop wait into an unbroken quorate run), or for a member certain for this ring.
    History {
        /// When the uncertainty ends (monotonic ms).
        until_ms: u64,
    },
    /// Departed servers not known to be stopped yet.
    OldServer(Vec<NodeId>),
    /// Another member runs (or stops) the server.
    Served(Member),
    /// Another member was chosen and has not started yet.
    Chosen(Member),
    /// Waiting for a member that still has a server or unsettled departures.
    Peers,
    /// Gather: answers missing from these members.
    Gather(Vec<Member>),
    /// Waiting for the local server process to report ready.
    ServerStart,
    /// This node serves.
    Serving,
    /// The local server was told to stop.
    Stopping,
}

/// What `csnapctl status` shows for the volume on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This node.
    pub local: Member,
    /// What this node does for the volume.
    pub role: Role,
    /// The volume's lineage as this node holds it.
    pub lineage: Lineage,
    /// The ring of the agreed view.
    pub ring: Option<RingId>,
    /// The members of the agreed view.
    pub members: Vec<Member>,
    /// Whether the partition is quorate now.
    pub quorate: bool,
    /// The member running the server as this node knows it.
    pub server: Option<(NodeId, String)>,
    /// What the machine waits on.
    pub gate: Gate,
    /// Nodes held stale (their state is of another lineage).
    pub stale: Vec<NodeId>,
    /// Departed nodes not known to be stopped yet.
    pub unsettled: Vec<NodeId>,
    /// Nodes being fenced.
    pub fencing: Vec<NodeId>,
    /// How long the local serving lease still runs (ms; 0 when not serving).
    pub lease_left_ms: u64,
    /// The last failover this node activated: (generation, ms from chosen to activated).
    pub last_failover: Option<(u64, u64)>,
    /// Snapshot clients per node of the view, as each member's latest delivered state
    /// lists them (this node's own current list for itself); nodes without any left out.
    pub clients: BTreeMap<NodeId, Vec<ClientId>>,
    /// The activation gate's list while this node starts or serves: the gather in progress,
    /// or the list the server was activated with.
    pub activation: Option<ActivationList>,
    /// The lineage of the last agreed view (what every member that is not stale holds):
    /// a node without a lineage of its own (new, or reset as stale) follows it until it
    /// adopts the next announce.
    pub view_lineage: Lineage,
}

/// The combined client list handed to the new server's activation gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationList {
    /// The generation being activated.
    pub generation: u64,
    /// True while the gather runs (the server is not activated yet).
    pub gathering: bool,
    /// Gather: members whose answer is still missing.
    pub waiting: Vec<Member>,
    /// Each listed client, its node, and whether this agent declared it gone (its node
    /// left, or stopped listing it). A client not declared gone is either reconnected or
    /// still awaited: only the server knows which (its `pending_snapshots`).
    pub clients: Vec<(ClientId, NodeId, bool)>,
}

/// How many announces are remembered to upgrade states sent before their sender saw one.
const ANNOUNCE_MEMORY: usize = 16;

/// The membership core of one volume on one node.
#[derive(Debug)]
pub struct VolumeMembership {
    cfg: MembershipConfig,
    local: Member,
    now: u64,
    view: ViewState,
    outputs: VecDeque<Output>,

    // The local member's own facts.
    role: Role,
    lineage: Lineage,
    clients: Vec<ClientId>,
    lease_until: u64,
    /// When this node last multicast a lease [`Body::Heartbeat`] (None: send one at the
    /// next agreed quorate view).
    beat_sent_at: Option<u64>,
    server_ready: bool,
    /// The lineage of the announce this node sent and waits for.
    starting: Option<Lineage>,
    gather: Option<Gather>,
    /// After activation: gathered clients still expected, by node.
    expected: BTreeMap<ClientId, NodeId>,
    /// After activation: the generation and the whole list it was activated with (for
    /// status; `expected` loses the clients declared gone).
    activated: Option<(u64, BTreeMap<ClientId, NodeId>)>,
    chosen_at: u64,
    last_failover: Option<(u64, u64)>,
    age: u64,
    /// `age` when the current membership began: what this node's states in it report, so
    /// that a state sent again later in the view gives the same choice.
    view_age: u64,
    /// Whether a server process was started (and not yet seen exiting).
    spawned: bool,
    /// An own announce is sent and neither delivered nor cut yet: no second one may go out
    /// (an abandoned start's announce can still arrive, and must not be taken for a new one).
    announce_in_flight: bool,
    /// The highest generation this node announced.
    last_announced: u64,
    joined_at: Option<u64>,
    /// This node's history is certain: it knows every server that may still be active (see
    /// "Certain history" above).
    certain: bool,
    /// Since when the quorum service has reported quorate without a break (None: not
    /// quorate now). An uncertain node becomes certain a stop wait after this (or its own
    /// join, whichever is later).
    quorate_since: Option<u64>,
    last_agreed_quorate: bool,
    /// Whether a confchg came since the last state this node sent.
    view_changed: bool,
    last_sent: Option<MemberState>,
    reset_pending: bool,
    /// This machine reset itself as stale once: it never adopts a view's lineage again
    /// (a reset node that adopted could be listed stale again by a state still in flight,
    /// reset, adopt, ...: a loop the whole-system simulation found with `fencing: reset`).
    was_reset: bool,
    /// This node's snapshot clients were sent to the real server by a reset and the node
    /// has been quorate without a break since: they are no state of another lineage, so
    /// they do not count in `has_state` (which would make the node stale again: a reset
    /// loop), yet they are reported in every state and gather answer. A node without a
    /// lineage that stays quorate hears every announce and adopts it (its clients then
    /// belong to that lineage); one that loses quorum may come back with clients of a
    /// server the quorate side replaced, so its clients count as state again from then.
    /// Before this the reset cleared the client list, and the shell, which reports clients
    /// only when they change, never told it again: the readers reconnected to the real
    /// server holding read locks and the next failover's gather missed them
    /// (whole-system simulation seed 0x515700000040 with `fencing: reset`).
    reset_clients_clean: bool,
    /// A reset order for this node (its claimant) that came before this node knew itself
    /// stale: carried out once it does, while the claim holds. (A node that learns of its
    /// quorum late agrees on the view, and finds itself stale, after the order was
    /// delivered; the order is repeated only in the next view, so the node stayed stale
    /// and its server candidate list blocked for ever: whole-system simulation seed
    /// 0x1234000000001e48 with `fencing: reset`.)
    reset_order: Option<Member>,

    // What this node knows of the others.
    last_states: BTreeMap<Member, MemberState>,
    /// Departed servers not yet certainly stopped: node -> when they certainly are.
    unsettled: BTreeMap<NodeId, u64>,
    /// Departed servers already settled (not re-added from older peer states).
    settled: BTreeSet<NodeId>,
    stale: BTreeSet<NodeId>,
    /// Nodes whose fencing was confirmed (a peer's old state cannot make them stale again
    /// until they show up with state).
    fenced: BTreeSet<NodeId>,
    /// Who fences (or resets) which node.
    claims: BTreeMap<NodeId, Member>,
    /// Fencing jobs make attempts only in an agreed quorate view (as of the last input).
    fencing_ok: bool,
    /// Deliveries so far (a position in the agreed order, the same relative order at every
    /// member): when each claim was taken and when each member's last state arrived.
    delivered: u64,
    claim_at: BTreeMap<NodeId, u64>,
    state_at: BTreeMap<Member, u64>,
    claim_sent: BTreeSet<NodeId>,
    fences: FenceTable,
    /// Origin clients of every stopped server have certainly stopped writing by then.
    clients_safe_at: u64,
    server: Option<(NodeId, String)>,
    announces: VecDeque<(Lineage, Lineage, Vec<Member>)>,
    agreed_key: Option<(RingId, Vec<Member>)>,
    actor: Option<NodeId>,
    actor_side: Vec<NodeId>,
    /// The reference lineage of the last agreed view (see [`merge`]).
    reference: Lineage,
    chosen: Option<Member>,
}

impl VolumeMembership {
    /// A machine for the process `local` (the shell's group member identity).
    pub fn new(cfg: MembershipConfig, local: Member) -> VolumeMembership {
        VolumeMembership {
            cfg,
            local,
            now: 0,
            view: ViewState::new(local),
            outputs: VecDeque::new(),
            role: Role::Idle,
            lineage: Lineage::default(),
            clients: Vec::new(),
            lease_until: 0,
            beat_sent_at: None,
            server_ready: false,
            starting: None,
            gather: None,
            expected: BTreeMap::new(),
            activated: None,
            chosen_at: 0,
            last_failover: None,
            age: 0,
            view_age: 0,
            spawned: false,
            announce_in_flight: false,
            last_announced: 0,
            joined_at: None,
            certain: false,
            quorate_since: None,
            last_agreed_quorate: false,
            view_changed: false,
            last_sent: None,
            reset_pending: false,
            was_reset: false,
            reset_clients_clean: false,
            reset_order: None,
            last_states: BTreeMap::new(),
            unsettled: BTreeMap::new(),
            settled: BTreeSet::new(),
            stale: BTreeSet::new(),
            fenced: BTreeSet::new(),
            claims: BTreeMap::new(),
            fencing_ok: false,
            delivered: 0,
            claim_at: BTreeMap::new(),
            state_at: BTreeMap::new(),
            claim_sent: BTreeSet::new(),
            fences: FenceTable::default(),
            clients_safe_at: 0,
            server: None,
            announces: VecDeque::new(),
            agreed_key: None,
            actor: None,
            actor_side: Vec::new(),
            reference: Lineage::default(),
            chosen: None,
        }
    }

    /// This node's member identity.
    pub fn local(&self) -> Member {
        self.local
    }

    /// The server as this node knows it (node, address): `status().server` without the
    /// rest of the status (the whole-system simulation asks after every step).
    pub fn server(&self) -> Option<&(NodeId, String)> {
        self.server.as_ref()
    }

    /// Whether this node holds itself stale: `status().stale` contains the local node.
    pub fn holds_itself_stale(&self) -> bool {
        self.stale.contains(&self.local.node)
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When the machine next needs a tick (absolute monotonic ms), if it waits for time.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut at: Vec<u64> = self.unsettled.values().copied().collect();
        if self.fencing_ok {
            at.extend(self.fences.next_deadline());
        }
        if self.role == Role::Starting || self.role == Role::Serving {
            at.push(self.lease_until);
            // Renew well before the lease runs out.
            at.push(self.beat_sent_at.unwrap_or(0) + self.cfg.serving_lease_ms / 4);
        }
        at.extend(self.certain_at());
        at.into_iter().min()
    }

    /// What `csnapctl status` shows (see [`Status`]).
    pub fn status(&self) -> Status {
        Status {
            local: self.local,
            role: self.role,
            lineage: self.lineage,
            ring: self.view.stable().map(|v| v.ring),
            members: self.view.members(),
            quorate: self.view.quorate_now(),
            server: self.server.clone(),
            gate: self.gate(),
            stale: self.stale.iter().copied().collect(),
            unsettled: self.unsettled.keys().copied().collect(),
            fencing: self.fences.jobs().keys().copied().collect(),
            lease_left_ms: self.lease_left(),
            last_failover: self.last_failover,
            clients: self.clients_per_node(),
            activation: self.activation_list(),
            view_lineage: self.reference,
        }
    }

    /// Snapshot clients per node of the view (see [`Status::clients`]).
    fn clients_per_node(&self) -> BTreeMap<NodeId, Vec<ClientId>> {
        let members = self.view.members();
        let mut per_node: BTreeMap<NodeId, Vec<ClientId>> = BTreeMap::new();
        for (m, s) in &self.last_states {
            if *m != self.local && members.contains(m) && !s.clients.is_empty() {
                per_node
                    .entry(m.node)
                    .or_default()
                    .extend(s.clients.iter().copied());
            }
        }
        if !self.clients.is_empty() {
            per_node
                .entry(self.local.node)
                .or_default()
                .extend(self.clients.iter().copied());
        }
        for list in per_node.values_mut() {
            list.sort();
            list.dedup();
        }
        per_node
    }

    /// The activation gate's list (see [`Status::activation`]).
    fn activation_list(&self) -> Option<ActivationList> {
        if let Some(g) = &self.gather {
            return Some(ActivationList {
                generation: g.lineage.generation,
                gathering: true,
                waiting: g.waiting(),
                clients: g.clients().iter().map(|(c, n)| (*c, *n, false)).collect(),
            });
        }
        let (generation, list) = self.activated.as_ref()?;
        Some(ActivationList {
            generation: *generation,
            gathering: false,
            waiting: Vec::new(),
            clients: list
                .iter()
                .map(|(c, n)| (*c, *n, !self.expected.contains_key(c)))
                .collect(),
        })
    }

    /// Takes one input; what it asks for comes out of [`VolumeMembership::poll_output`].
    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Tick { now_ms } => self.now = self.now.max(now_ms),
            Input::Group(event) => self.on_group(event),
            Input::GroupLost { detail } => {
                self.log("group_lost", true, detail);
                self.stop_server(StopReason::GroupLost);
            }
            Input::Quorum(q) => self.on_quorum(q),
            Input::Config {
                priorities,
                fencing,
            } => {
                self.cfg.priorities = priorities;
                self.cfg.fencing = fencing;
            }
            Input::Clients(mut clients) => {
                clients.sort();
                clients.dedup();
                self.clients = clients;
            }
            Input::ServerStarted => {
                if self.role == Role::Starting {
                    self.server_ready = true;
                }
            }
            Input::ServerStopped => self.on_server_exit(None),
            Input::ServerFailed { detail } => self.on_server_exit(Some(detail)),
            Input::FenceResult { node, ok, detail } => self.on_fence_result(node, ok, detail),
        }
        self.evaluate();
    }

    // ---- inputs -------------------------------------------------------------------------

    fn on_group(&mut self, event: GroupEvent) {
        match &event {
            GroupEvent::ConfChg(change) => {
                let was_joined = self.view.joined();
                self.view_age = self.age;
                self.view.apply(&event);
                if !was_joined && self.view.joined() {
                    self.joined_at = Some(self.now);
                    // Knowing nothing of what ran before, assume a server and its origin
                    // clients may have been active right up to now.
                    self.clients_safe_at = self
                        .now
                        .saturating_add(self.cfg.stop_wait_ms())
                        .saturating_add(self.cfg.clients_wait_ms());
                }
                for left in &change.left {
                    self.on_departure(left.member);
                }
                let merged = change
                    .joined
                    .iter()
                    .any(|j| j.reason == cpg_glue::Reason::NodeUp);
                if merged && self.role == Role::Starting {
                    // Merged members never heard the announce, and may hold snapshot clients
                    // of the old server: start over with an announce they take part in.
                    self.log(
                        "gather_restart",
                        true,
                        "members merged during the gather".into(),
                    );
                    self.stop_server(StopReason::Superseded);
                }
                let members = self.view.members();
                if let Some(g) = self.gather.as_mut() {
                    g.retain(|m| members.contains(m));
                    g.forget_left(|m| members.contains(m));
                }
                self.declare_gone_where(|node| !members.iter().any(|m| m.node == node));
                self.claim_sent.clear();
                self.beat_sent_at = None;
                self.view_changed = true;
                self.abort_lost_announce();
            }
            GroupEvent::TotemConfChg(totem) => {
                let same_ring = self.view.ring() == Some(totem.ring);
                self.view.apply(&event);
                if same_ring {
                    // The same ring again (a process whose join was on its way gets the
                    // initial totem confchg and then the ring's own): the view did not
                    // change, nothing sent in it was cut.
                    return;
                }
                // Frames carry the sender's view; one sent before this event reached the
                // sender is dropped by every member, so everything is sent again now.
                self.view_changed = true;
                self.claim_sent.clear();
                self.beat_sent_at = None;
                self.abort_lost_announce();
            }
            GroupEvent::Deliver(delivery) => {
                self.delivered += 1;
                match Message::decode(delivery) {
                    Ok(msg) => self.on_message(delivery.from, msg.body),
                    Err(e) => self.log("bad_message", true, e.to_string()),
                }
            }
        }
    }

    /// An announce not delivered to its own sender before a membership event never will be
    /// (it was sent in a view that is over): start over.
    fn abort_lost_announce(&mut self) {
        self.announce_in_flight = false;
        if self.role == Role::Starting && self.gather.is_none() {
            self.log(
                "gather_restart",
                true,
                "the announce was cut by a membership change".into(),
            );
            self.stop_server(StopReason::Superseded);
        }
    }

    fn on_departure(&mut self, member: Member) {
        if let Some(last) = self.last_states.remove(&member) {
            if last.role.has_server() {
                let at = self.now.saturating_add(self.cfg.stop_wait_ms());
                let entry = self.unsettled.entry(member.node).or_insert(at);
                *entry = (*entry).max(at);
                self.settled.remove(&member.node);
                self.log_about(
                    "server_departed",
                    true,
                    member.node,
                    format!(
                        "{member} left while {:?}; certainly stopped at {at} ms unless fenced first",
                        last.role
                    ),
                );
            }
        }
        // A claimant that left before it finished: the next actor claims again.
        self.claims.retain(|_, c| *c != member);
    }

    fn on_quorum(&mut self, q: QuorumEvent) {
        let lost = !q.quorate && self.view.quorate_now();
        self.view.apply_quorum(q);
        if self.view.quorate_now() {
            if self.quorate_since.is_none() {
                // While this node was without quorum, a server it saw depart may have gone
                // on serving (and renewing its lease) in a quorate partition elsewhere. That
                // partition ended no later than now (two quorate partitions never overlap),
                // so its server has certainly stopped one stop wait from now at the latest.
                let floor = self.now.saturating_add(self.cfg.stop_wait_ms());
                for until in self.unsettled.values_mut() {
                    *until = (*until).max(floor);
                }
            }
            self.quorate_since.get_or_insert(self.now);
        } else {
            // A quorate partition this node is not part of may start a server it never
            // hears of: its history is uncertain until it waited out such a server.
            if self.certain {
                self.log(
                    "history_uncertain",
                    false,
                    "not quorate: a server may start elsewhere".into(),
                );
            }
            self.certain = false;
            self.quorate_since = None;
            self.last_agreed_quorate = false;
            self.reset_clients_clean = false;
            if self.role == Role::Starting || self.role == Role::Serving {
                self.log("quorum_lost", true, "stopping the server at once".into());
                self.stop_server(StopReason::QuorumLost);
            } else if lost {
                self.log("quorum_lost", false, String::new());
            }
        }
    }

    fn on_message(&mut self, from: Member, body: Body) {
        match body {
            Body::State(state) => self.on_state(from, state),
            Body::Announce {
                prev,
                next,
                address,
            } => self.on_announce(from, prev, next, address),
            Body::Clients { lineage, clients } => {
                if let Some(g) = self.gather.as_mut().filter(|g| g.lineage == lineage) {
                    g.answer(from, &clients);
                }
            }
            Body::FenceClaim { node, reset } => self.on_claim(from, node, reset),
            Body::Fenced { node } => self.on_fenced(node),
            Body::Heartbeat { sent_at_ms } => {
                if from == self.local {
                    self.on_heartbeat(sent_at_ms);
                }
            }
        }
    }

    /// Own heartbeat delivered: the ring was alive after it was sent, in the view it was
    /// sent in (agreed and quorate then), so the lease runs from its sending.
    fn on_heartbeat(&mut self, sent_at: u64) {
        if (self.role == Role::Starting || self.role == Role::Serving)
            && self.view.quorate_now()
            && !self.stale.contains(&self.local.node)
        {
            let until = sent_at.saturating_add(self.cfg.serving_lease_ms);
            if until > self.lease_until {
                self.lease_until = until;
                self.outputs
                    .push_back(Output::ExtendLease { until_ms: until });
            }
        }
    }

    /// `node` was fenced and confirmed: not stale, its server certainly stopped.
    fn on_fenced(&mut self, node: NodeId) {
        self.stale.remove(&node);
        self.fenced.insert(node);
        if self.unsettled.remove(&node).is_some() {
            self.settled.insert(node);
        }
        self.claims.remove(&node);
        self.claim_sent.remove(&node);
        self.fences.cancel(node);
        self.clients_safe_at = self
            .clients_safe_at
            .max(self.now.saturating_add(self.cfg.clients_wait_ms()));
    }

    fn on_state(&mut self, from: Member, mut state: MemberState) {
        // A state sent before its sender delivered an announce it was part of says the old
        // lineage; the sender adopted the new one at the announce, as everyone did.
        // Only a state sent for the announce's own membership can predate the announce at
        // its sender (a member delivers an announce of its view before any later confchg):
        // a state for a later membership that names the announce's `prev` is newer than the
        // announce (a restarted or reset member that adopted or announced a lineage equal to
        // that old `prev`), and must not be raised to the old `next`. (Whole-system
        // simulation seed 0xc0ffee000000199c: a restarted agent's own g1 was read as an
        // older g1 superseded by g2, the members holding g1 were fenced one after the other,
        // for ever.)
        for (prev, next, members) in &self.announces {
            if state.lineage == *prev && members.contains(&from) && state.view == *members {
                state.lineage = *next;
            }
        }
        let before = self.last_states.get(&from).map(|s| s.role);
        if before.is_some_and(Role::has_server) && !state.role.has_server() {
            // Its own agent saw the server exit.
            self.clients_safe_at = self
                .clients_safe_at
                .max(self.now.saturating_add(self.cfg.clients_wait_ms()));
        }
        if state.role.has_server() {
            self.settled.remove(&from.node);
            if state.role == Role::Serving || state.role == Role::Starting {
                // Its address comes with its state (empty from a version-1 sender: the
                // shell's configured addresses fill in then).
                let known = self.server.as_ref().filter(|s| s.0 == from.node);
                if known.is_none_or(|s| s.1.is_empty() && !state.server_address.is_empty()) {
                    self.server = Some((from.node, state.server_address.clone()));
                }
            }
        } else if self.unsettled.remove(&from.node).is_some() {
            self.settled.insert(from.node);
            // Its server stopped at the latest now, and that server's origin clients may
            // go on writing through their leases until a clients' wait from then. (Its
            // last state with a server role was forgotten at its departure, so the rule
            // above does not see this exit; whole-system simulation seed 0x515700000057
            // activated a new server with no hold and created a snapshot while an origin
            // client of the old server could still write.)
            self.clients_safe_at = self
                .clients_safe_at
                .max(self.now.saturating_add(self.cfg.clients_wait_ms()));
            self.log_about(
                "old_server_settled",
                false,
                from.node,
                format!("{from} reports no server"),
            );
        }
        if !state.role.has_server()
            && state.has_state
            && state.lineage == self.reference
            && !self.stale.contains(&from.node)
        {
            // Back clean (see `end_fencing`): no server on its node (an agent reports `Idle`
            // only once its server is gone, and a restarted agent's server died with the
            // old agent), and nothing of another lineage. A node without any state is
            // handled below, by every member at once.
            self.end_fencing(
                from.node,
                format!(
                    "{from} is back with no server and lineage {}",
                    state.lineage
                ),
            );
        }
        // The node speaks for itself again (back after its fencing, with or without state):
        // its fencing is history, what it says now counts.
        self.fenced.remove(&from.node);
        if !state.has_state {
            let was_stale = self.stale.remove(&from.node);
            let mine = self.claims.get(&from.node) == Some(&self.local);
            // Every member drops the claim at the same point of the agreed order, whatever
            // it held of the node: claims must stay the same everywhere.
            let cancelled = self.fences.cancel(from.node);
            if cancelled || (was_stale && mine) {
                self.log_about(
                    "fence_done",
                    false,
                    from.node,
                    format!("{} is back without state (reset or restarted)", from.node),
                );
            } else if was_stale {
                self.log_about(
                    "stale_resolved",
                    false,
                    from.node,
                    format!("{} is clean", from.node),
                );
            }
            self.claims.remove(&from.node);
            self.claim_sent.remove(&from.node);
        }
        for n in &state.unsettled {
            if !self.unsettled.contains_key(n) && !self.settled.contains(n) && *n != self.local.node
            {
                let at = self.now.saturating_add(self.cfg.stop_wait_ms());
                self.unsettled.insert(*n, at);
            }
        }
        for n in &state.stale {
            // An older report cannot make a node stale again once it showed up clean.
            // What the node itself says now counts over its earlier states.
            let clean = if *n == self.local.node {
                !self.has_state()
            } else if from.node == *n {
                !state.has_state
            } else {
                self.last_states
                    .iter()
                    .any(|(m, s)| m.node == *n && !s.has_state)
            };
            if !clean && !self.fenced.contains(n) && self.stale.insert(*n) {
                self.log_about(
                    "stale_merge",
                    true,
                    *n,
                    format!("{n} is stale (from {from})"),
                );
            }
        }
        if from != self.local {
            for n in &state.fencing {
                if !self.claims.contains_key(n) {
                    self.claims.insert(*n, from);
                    self.claim_at.insert(*n, self.delivered);
                }
            }
        }
        for n in &state.fenced {
            // Once a fenced node is back (in the view again), older reports of its fencing
            // are history.
            let back = from.node == *n || self.view.members().iter().any(|m| m.node == *n);
            if !back && !self.fenced.contains(n) && *n != self.local.node {
                self.on_fenced(*n);
            }
        }
        // A state sent after the announce is an answer to it (its clients are the node's
        // list after the old server certainly stopped): a lost reply cannot stall the gather.
        // A member without any state has no clients to report, whatever lineage it knows
        // (it may not have adopted the announce because it held itself stale then).
        if let Some(g) = self
            .gather
            .as_mut()
            .filter(|g| g.lineage == state.lineage || !state.has_state)
        {
            g.answer(from, &state.clients);
        }
        // After activation, gathered clients its node no longer lists are gone.
        if from.node != self.local.node || from == self.local {
            let listed: BTreeSet<ClientId> = state.clients.iter().copied().collect();
            let gone: Vec<ClientId> = self
                .expected
                .iter()
                .filter(|(c, n)| **n == from.node && !listed.contains(c))
                .map(|(c, _)| *c)
                .collect();
            for client in gone {
                self.expected.remove(&client);
                self.outputs.push_back(Output::DeclareGone { client });
            }
        }
        self.last_states.insert(from, state.clone());
        self.state_at.insert(from, self.delivered);
        self.view.record(from, state);
    }

    fn on_announce(&mut self, from: Member, prev: Lineage, next: Lineage, address: String) {
        let members = self.view.members();
        // Its sender may run a server from now on, even if its state saying so never
        // arrives (a view change can cut it): if it departs, it departs as a server.
        if let Some(last) = self.last_states.get_mut(&from) {
            if last.role == Role::Idle {
                last.role = Role::Starting;
            }
        }
        self.announces.push_back((prev, next, members.clone()));
        while self.announces.len() > ANNOUNCE_MEMORY {
            self.announces.pop_front();
        }
        if self.reference == prev {
            self.reference = next;
        }
        for (m, s) in self.view.states_mut() {
            if s.lineage == prev && members.contains(m) {
                s.lineage = next;
            }
        }
        for (m, s) in self.last_states.iter_mut() {
            if s.lineage == prev && members.contains(m) {
                s.lineage = next;
            }
        }
        let adopt = !self.stale.contains(&self.local.node)
            && (self.lineage == prev || self.lineage == Lineage::default());
        if adopt {
            self.lineage = next;
            self.server = Some((from.node, address));
            let reply = Body::Clients {
                lineage: next,
                clients: self.clients.clone(),
            };
            self.mcast(reply);
        }
        if from == self.local {
            self.announce_in_flight = false;
            if adopt && self.starting == Some(next) && self.role == Role::Starting {
                // Only now, with the announce first in the agreed order, may a server
                // process exist: a competing announce delivered earlier would have
                // superseded this one before anything touched the store.
                self.spawned = true;
                self.outputs.push_back(Output::StartServer {
                    generation: next.generation,
                });
                self.outputs.push_back(Output::ExtendLease {
                    until_ms: self.lease_until,
                });
                let stale = &self.stale;
                let (left_out, waited): (Vec<Member>, Vec<Member>) =
                    members.iter().partition(|m| stale.contains(&m.node));
                let mut gather = Gather::new(next, waited);
                gather.leave_out(left_out);
                self.gather = Some(gather);
            } else if self.starting == Some(next) {
                self.log(
                    "announce_superseded",
                    true,
                    format!("own announce {next} came after a change of lineage"),
                );
                self.stop_server(StopReason::Superseded);
            }
        }
    }

    fn on_claim(&mut self, from: Member, node: NodeId, reset: bool) {
        // Every member records the first claim delivered, whatever it knows of the node: a
        // claim taken by some members only would leave each side waiting for the other.
        let wins = match self.live_claim(node) {
            Some(c) => c == from,
            None => true,
        };
        if !wins {
            return;
        }
        self.claims.insert(node, from);
        self.claim_at.insert(node, self.delivered);
        if reset && node == self.local.node && !self.reset_pending {
            self.reset_order = Some(from);
        }
        if self.stale.contains(&node) || self.unsettled.contains_key(&node) {
            if from == self.local {
                // `claim_sent` stays: a reset order goes out once per view, not again on
                // every delivery while the node is still stopping its server.
                if reset {
                    self.log_about(
                        "fence_requested",
                        true,
                        node,
                        format!("reset of stale node {node} ordered"),
                    );
                } else {
                    self.start_fence(node);
                }
            }
            // Once per incident: a repeated reset order (the claimant repeats it in every
            // view until it sees the clean state) finds nothing left to drop, and must not
            // drop what the node holds legitimately since (a lineage adopted, clients).
            if reset && node == self.local.node && !self.reset_pending && self.has_state() {
                self.reset();
            }
        }
    }

    /// Starts a fencing job for `node` unless one runs.
    fn start_fence(&mut self, node: NodeId) {
        if let Some(FenceAction::Attempt {
            node,
            method,
            attempt,
        }) = self.fences.start(
            node,
            self.cfg.fencing.clone(),
            self.now,
            self.cfg.fence_timeout_ms,
        ) {
            self.log_about(
                "fence_requested",
                true,
                node,
                format!("fencing {node} with {method:?}, attempt {attempt}"),
            );
            self.outputs.push_back(Output::Fence {
                node,
                method,
                attempt,
            });
        }
    }

    fn on_fence_result(&mut self, node: NodeId, ok: bool, detail: String) {
        match self
            .fences
            .result(node, ok, &detail, self.now, self.cfg.fence_retry_ms)
        {
            Some(true) => {
                self.log_about(
                    "fence_done",
                    false,
                    node,
                    format!("{node} fenced: {detail}"),
                );
                self.on_fenced(node);
                self.mcast(Body::Fenced { node });
            }
            Some(false) => {
                // A departed server that cannot be reached (kill_node: not in the ring, which
                // is no proof it is off) is let go once its lease certainly ran out.
                let until = match self.unsettled.get(&node) {
                    Some(at) if !self.stale.contains(&node) => {
                        format!(", or until its lease certainly ran out at {at} ms")
                    }
                    _ => String::new(),
                };
                self.log_about(
                    "fence_failed",
                    true,
                    node,
                    format!(
                        "{node}: {detail}; retrying in {} ms{until}",
                        self.cfg.fence_retry_ms
                    ),
                )
            }
            None => {}
        }
    }

    fn on_server_exit(&mut self, failure: Option<String>) {
        let had = self.role.has_server();
        self.server_ready = false;
        self.spawned = false;
        if had {
            self.role = Role::Idle;
            self.starting = None;
            self.gather = None;
            self.expected.clear();
            self.activated = None;
            self.clients_safe_at = self
                .clients_safe_at
                .max(self.now.saturating_add(self.cfg.clients_wait_ms()));
            if self.server.as_ref().map(|s| s.0) == Some(self.local.node) {
                self.server = None;
            }
        }
        match failure {
            Some(detail) => self.log("server_failed", true, detail),
            None if had => self.log("server_stopped", false, String::new()),
            None => {}
        }
    }

    // ---- decisions ----------------------------------------------------------------------

    fn evaluate(&mut self) {
        if self.role == Role::Starting || self.role == Role::Serving {
            if !self.view.quorate_now() {
                self.log("quorum_lost", true, "stopping the server at once".into());
                self.stop_server(StopReason::QuorumLost);
            } else if self.now >= self.lease_until {
                self.log(
                    "lease_expired",
                    true,
                    "no agreed quorate view in time".into(),
                );
                self.stop_server(StopReason::LeaseExpired);
            } else if self.stale.contains(&self.local.node) {
                self.stop_server(StopReason::Stale);
            }
        }
        self.settle_departed();
        if !self.certain && self.certain_at().is_some_and(|t| self.now >= t) {
            self.certain = true;
            self.log(
                "history_certain",
                false,
                "quorate and joined for a whole stop wait".into(),
            );
        }
        let agreed = self.view.agreed().ok();
        self.fencing_ok = agreed.as_ref().is_some_and(|a| a.quorate) && self.view.quorate_now();
        if let Some(agreed) = agreed {
            self.on_agreed(agreed);
        }
        if (self.role == Role::Starting || self.role == Role::Serving)
            && self.stale.contains(&self.local.node)
        {
            // The verdict of this very view: a stale node's server stops before anything
            // else happens, not at the next input.
            self.stop_server(StopReason::Stale);
        }
        // Fencing jobs make attempts only in an agreed quorate view: a claimant cut off from
        // the quorate side pauses (that side claims the node again when it sees the claimant
        // leave; at the merge, one of the two yields, see `claim_fencing`, which runs first).
        let actions = if self.fencing_ok {
            self.fences
                .tick(self.now, self.cfg.fence_timeout_ms, self.cfg.fence_retry_ms)
        } else {
            Vec::new()
        };
        for action in actions {
            match action {
                FenceAction::Attempt {
                    node,
                    method,
                    attempt,
                } => {
                    self.log_about(
                        "fence_requested",
                        true,
                        node,
                        format!("fencing {node} with {method:?}, attempt {attempt}"),
                    );
                    self.outputs.push_back(Output::Fence {
                        node,
                        method,
                        attempt,
                    });
                }
                FenceAction::TimedOut { node, attempt } => self.log_about(
                    "fence_failed",
                    true,
                    node,
                    format!("{node}: attempt {attempt} timed out"),
                ),
            }
        }
        self.maybe_activate();
        self.reset_if_ordered();
        if self.reset_pending && self.role == Role::Idle {
            self.reset_pending = false;
            self.log("reset_done", false, "rejoining without state".into());
        }
        self.send_state_if_changed();
    }

    fn settle_departed(&mut self) {
        let due: Vec<(NodeId, u64)> = self
            .unsettled
            .iter()
            .filter(|(_, at)| self.now >= **at)
            .map(|(n, at)| (*n, *at))
            .collect();
        for (node, at) in due {
            self.unsettled.remove(&node);
            self.settled.insert(node);
            self.clients_safe_at = self
                .clients_safe_at
                .max(at.saturating_add(self.cfg.clients_wait_ms()));
            self.log_about(
                "old_server_settled",
                false,
                node,
                format!("{node}: serving lease certainly expired"),
            );
            if !self.stale.contains(&node) {
                // Certainly stopped by other means: fencing it now would only hit the node
                // after it came back (kill_node reaches it again once it rejoins the ring).
                self.end_fencing(node, "its serving lease certainly ran out".into());
            }
        }
    }

    /// Ends this node's fencing of `node` without a confirmation, because it is no longer
    /// needed: the node's server is certainly stopped (its lease plus margin ran out since it
    /// departed, or its agent says it runs none) and it holds nothing of another lineage
    /// (stale nodes are never let go this way). Only the claimant's own claim and job end
    /// here; the claimant's next state no longer lists the node, which ends the claim for
    /// every member at one point of the agreed order (`live_claim`).
    fn end_fencing(&mut self, node: NodeId, why: String) {
        let mine = self.claims.get(&node) == Some(&self.local);
        let job = self.fences.cancel(node);
        if mine {
            self.claims.remove(&node);
            self.claim_sent.remove(&node);
        }
        if mine || job {
            self.log_about(
                "fence_unneeded",
                false,
                node,
                format!("{node} needs no fencing any more: {why}"),
            );
        }
    }

    fn on_agreed(&mut self, agreed: Agreed) {
        let key = (agreed.ring, agreed.members.clone());
        if self.agreed_key.as_ref() != Some(&key) {
            self.agreed_key = Some(key);
            self.age += 1;
            // The verdict from the states as they were when the view first had all of them
            // (a point of the group's delivery order, the same at every member), not as
            // they are when this node finds the view agreed: a member that learns of the
            // ring's quorum late agrees after more deliveries (a peer's later state says
            // `was_quorate`, or lists a stale node), and a verdict from those could name
            // another actor than its peers' did, each waiting for the other to fence
            // (whole-system simulation seed 0xc0ffee00383f: a restarted agent held stale,
            // and nobody ever fenced it).
            let verdict = merge::analyze(&agreed.first_states);
            for node in &verdict.stale {
                if self.stale.insert(*node) {
                    self.log_about(
                        "stale_merge",
                        true,
                        *node,
                        format!(
                            "{node} holds state of another lineage (reference {})",
                            verdict.reference
                        ),
                    );
                }
            }
            self.actor = verdict.actor;
            self.actor_side = verdict.side;
            self.reference = verdict.reference;
            self.last_agreed_quorate = agreed.quorate && self.view.quorate_now();
            let stale = &self.stale;
            if let Some(g) = self.gather.as_mut() {
                let now_stale = g.retain(|m| !stale.contains(&m.node));
                g.leave_out(now_stale);
            }
        }
        if !agreed.quorate || !self.view.quorate_now() {
            return;
        }
        if self.lineage == Lineage::default()
            && self.reference != Lineage::default()
            && !self.role.has_server()
            && !self.reset_pending
            && !self.was_reset
            && !self.stale.contains(&self.local.node)
            && agreed
                .states
                .values()
                .all(|s| !s.stale.contains(&self.local.node))
        {
            // A clean member (a new or restarted agent, never reset) takes the lineage of
            // the quorate view it is agreed in, as a member that heard its announce did: its
            // node's clients attach to that lineage's server. Without this it held "no
            // lineage" with clients attached, and the next state exchange called it stale
            // (whole-system simulation seed 0x515700000040: fenced for nothing, or reset
            // with its readers left out of the next gather).
            self.lineage = self.reference;
            self.log(
                "lineage_adopted",
                false,
                format!("clean member takes the view's lineage {}", self.reference),
            );
        }
        if (self.role == Role::Starting || self.role == Role::Serving)
            && !self.stale.contains(&self.local.node)
        {
            // The lease is renewed only when this heartbeat comes back (see `on_heartbeat`):
            // processing an agreed view late, after the ring is gone, renews nothing.
            let due = self
                .beat_sent_at
                .is_none_or(|t| self.now >= t + self.cfg.serving_lease_ms / 4);
            if due {
                self.beat_sent_at = Some(self.now);
                self.mcast(Body::Heartbeat {
                    sent_at_ms: self.now,
                });
            }
        }
        if !self.certain {
            // A member certain for this very ring shared what it knows in its state (its
            // unsettled departures; servers in the view show in their roles): from here on
            // this node hears every announce as long as it stays quorate.
            let ring = agreed.ring;
            if let Some((m, _)) = agreed
                .states
                .iter()
                .find(|(m, s)| **m != self.local && s.certain == Some(ring))
            {
                let m = *m;
                self.certain = true;
                self.log(
                    "history_certain",
                    false,
                    format!("learnt from {m}, certain in ring {ring}"),
                );
            }
        }
        self.claim_fencing(&agreed);
        let chosen = choice::choose(&agreed.states, &self.stale, |n| self.cfg.priority(n));
        self.chosen = chosen;
        if chosen == Some(self.local)
            && self.role == Role::Idle
            && !self.server_ready
            && !self.announce_in_flight
            && self.gate_open(&agreed)
        {
            self.start(&agreed);
        }
    }

    fn gate_open(&self, agreed: &Agreed) -> bool {
        self.certain
            && self.unsettled.is_empty()
            && !self.stale.contains(&self.local.node)
            && !self.reset_pending
            && agreed.states.values().all(|s| {
                s.unsettled.is_empty()
                    && !s.role.has_server()
                    && !s.stale.contains(&self.local.node)
            })
    }

    /// As the actor: claim fencing of stale nodes and of departed servers not known to be
    /// stopped (the latter only with a real fencing method; with reset, their lease is
    /// waited out).
    fn claim_fencing(&mut self, agreed: &Agreed) {
        // Two members claiming one node (each claimed while the other was out of its view):
        // the claimant from the quorate side that predates the merge keeps it, else the
        // lowest node id; the same answer everywhere, from the view's states.
        let claimed: BTreeSet<NodeId> = agreed
            .states
            .values()
            .flat_map(|s| s.fencing.iter().copied())
            .collect();
        for node in claimed {
            let claimants: Vec<(&Member, &MemberState)> = agreed
                .states
                .iter()
                .filter(|(_, s)| s.fencing.contains(&node))
                .collect();
            if claimants.len() < 2 {
                continue;
            }
            let Some(winner) = claimants
                .iter()
                .max_by_key(|(m, s)| (s.was_quorate, std::cmp::Reverse(m.node)))
                .map(|(m, _)| **m)
            else {
                continue;
            };
            self.claim_at.insert(node, self.delivered);
            if self.claims.insert(node, winner) == Some(self.local) && winner != self.local {
                self.claim_sent.remove(&node);
                if self.fences.cancel(node) {
                    self.log_about(
                        "fence_yielded",
                        false,
                        node,
                        format!("{node} is fenced by {winner}"),
                    );
                }
            }
        }
        let reset = self.cfg.fencing == Fencing::Reset;
        // The verdict's actor, unless stale knowledge arrived since: then the next of its
        // side, then the lowest member that is not stale.
        let stale = &self.stale;
        let actor = self
            .actor
            .filter(|a| !stale.contains(a))
            .or_else(|| self.actor_side.iter().copied().find(|n| !stale.contains(n)))
            .or_else(|| {
                agreed
                    .members
                    .iter()
                    .map(|m| m.node)
                    .find(|n| !stale.contains(n))
            });
        let mut wanted: Vec<(NodeId, bool)> = self
            .stale
            .iter()
            .filter(|n| **n != self.local.node)
            .map(|n| (*n, reset))
            .collect();
        if !reset {
            for n in self.unsettled.keys() {
                if !self.stale.contains(n) && !agreed.members.iter().any(|m| m.node == *n) {
                    wanted.push((*n, false));
                }
            }
        }
        for (node, reset) in wanted {
            let present = agreed.members.iter().any(|m| m.node == node);
            match self.live_claim(node).as_ref() {
                Some(c) if *c == self.local => {
                    // A reset order must reach the node: repeat it when it is back in view.
                    if reset && present && !self.claim_sent.contains(&node) {
                        self.claim_sent.insert(node);
                        self.mcast(Body::FenceClaim { node, reset });
                    }
                    // Ours, and no job running (it was cancelled, then the node turned out
                    // stale again): fence it.
                    if !reset {
                        self.start_fence(node);
                    }
                }
                Some(c) if agreed.members.contains(c) => {}
                _ => {
                    if actor == Some(self.local.node)
                        && !self.claim_sent.contains(&node)
                        && (!reset || present)
                    {
                        self.claim_sent.insert(node);
                        self.mcast(Body::FenceClaim { node, reset });
                    }
                }
            }
        }
    }

    fn start(&mut self, agreed: &Agreed) {
        let generation = agreed
            .states
            .values()
            .map(|s| s.lineage.generation)
            .chain(self.last_states.values().map(|s| s.lineage.generation))
            .chain([self.lineage.generation, self.last_announced])
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        // Never announce a lineage twice: an announce taken for cut can still arrive (the
        // view tag cannot tell a view from an identical later one), and must not be
        // mistaken for this one.
        self.last_announced = generation;
        let next = Lineage {
            generation,
            server: Some(self.local.node),
        };
        self.role = Role::Starting;
        self.starting = Some(next);
        self.announce_in_flight = true;
        self.server_ready = false;
        self.chosen_at = self.now;
        // The lease counts from the announce's sending: its delivery back proves the ring
        // was alive after that.
        self.lease_until = self.now.saturating_add(self.cfg.serving_lease_ms);
        self.beat_sent_at = Some(self.now);
        self.log(
            "server_chosen",
            false,
            format!(
                "{} starts the server for {next} in ring {} ({} members)",
                self.local,
                agreed.ring,
                agreed.members.len()
            ),
        );
        // Every member that is not stale holds the reference lineage (or no state), so
        // every one of them adopts the announce.
        let prev = self.reference;
        if self.lineage == Lineage::default() {
            // A member without lineage (a reset one never adopts a view's) starts from the
            // reference lineage, as its announce says: its `Starting` state must not read
            // as "a server of lineage g0", which the others call stale; the node then
            // stopped its start, reset, was chosen again, ... for ever (whole-system
            // simulation seed 0x5157000000000439 with `fencing: reset`).
            self.lineage = prev;
        }
        let address = self.cfg.server_address.clone();
        self.mcast(Body::Announce {
            prev,
            next,
            address,
        });
    }

    fn maybe_activate(&mut self) {
        if self.role != Role::Starting || !self.server_ready {
            return;
        }
        let members = self.view.members();
        let Some(gather) = self.gather.as_mut() else {
            return;
        };
        if !gather.done() {
            return;
        }
        let dropped = gather.drop_nodes(|n| members.iter().any(|m| m.node == n));
        let generation = gather.lineage.generation;
        let expected = gather.clients().clone();
        self.gather = None;
        if !dropped.is_empty() {
            self.log(
                "clients_gone",
                false,
                format!("{} clients of departed nodes not waited for", dropped.len()),
            );
        }
        let hold = self.clients_safe_at.saturating_sub(self.now);
        let took = self.now.saturating_sub(self.chosen_at);
        self.log(
            "gather_done",
            false,
            format!("{} snapshot clients to wait for", expected.len()),
        );
        self.outputs.push_back(Output::ActivateServer {
            generation,
            clients: expected.keys().copied().collect(),
            hold_snapshots_ms: hold,
        });
        self.activated = Some((generation, expected.clone()));
        self.expected = expected;
        self.role = Role::Serving;
        self.starting = None;
        self.server = Some((self.local.node, self.cfg.server_address.clone()));
        self.last_failover = Some((generation, took));
        self.log(
            "failover_done",
            false,
            format!("generation {generation} serving {took} ms after the choice; snapshots held {hold} ms"),
        );
    }

    // ---- helpers ------------------------------------------------------------------------

    fn stop_server(&mut self, reason: StopReason) {
        if self.role == Role::Starting && !self.spawned {
            // The announce was not delivered yet: no process to stop.
            self.role = Role::Idle;
            self.starting = None;
            self.gather = None;
            self.log("start_abandoned", true, format!("{reason:?}"));
            return;
        }
        if self.role == Role::Starting || self.role == Role::Serving {
            self.role = Role::Stopping;
            self.gather = None;
            self.starting = None;
            self.expected.clear();
            self.activated = None;
            self.outputs.push_back(Output::StopServer { reason });
            self.log("server_stop", true, format!("{reason:?}"));
        }
    }

    /// Reset of a stale node: stop any server, disconnect the node's clients so they
    /// reconnect to the real server, forget the lineage; the clean state goes out once the
    /// server is confirmed stopped. The client list stays (the clients live on and attach
    /// to the real server, where the next failover's gather must find them) but no longer
    /// counts as state of another lineage (see `reset_clients_clean`).
    fn reset(&mut self) {
        self.log(
            "stale_reset",
            true,
            format!("dropping state of lineage {}", self.lineage),
        );
        self.stop_server(StopReason::Stale);
        // Generation 0 until the next announce, in status and in every state this node
        // sends: its state's lineage is what the merge analysis compares, and a reset node
        // that took the view's lineage could be listed stale again by a state still in
        // flight and reset again (the loop `was_reset` prevents). Status shows the view's
        // lineage beside it (`Status::view_lineage`), which is what the node follows.
        self.lineage = Lineage::default();
        self.reset_order = None;
        // (The order came from a member of an agreed quorate view, in this node's view: this
        // node is in the quorate ring even if its own quorum stream lags. A later quorum
        // loss makes its clients count as state again.)
        self.reset_clients_clean = true;
        self.outputs.push_back(Output::DropClients);
        self.reset_pending = true;
        self.was_reset = true;
    }

    /// Carries out a reset order that came before this node knew itself stale (see
    /// `reset_order`), once it does and while the order's claim still holds.
    fn reset_if_ordered(&mut self) {
        let Some(claimant) = self.reset_order else {
            return;
        };
        let node = self.local.node;
        // (The claim as recorded, not `live_claim`: a state of the claimant sent before it
        // delivered its own claim lists no fencing yet, and would void the order.)
        if self.reset_pending || self.claims.get(&node) != Some(&claimant) {
            self.reset_order = None;
            return;
        }
        if self.stale.contains(&node) && self.has_state() {
            self.reset_order = None;
            self.reset();
        }
    }

    fn declare_gone_where(&mut self, gone_node: impl Fn(NodeId) -> bool) {
        let gone: Vec<ClientId> = self
            .expected
            .iter()
            .filter(|(_, n)| gone_node(**n))
            .map(|(c, _)| *c)
            .collect();
        for client in gone {
            self.expected.remove(&client);
            self.outputs.push_back(Output::DeclareGone { client });
        }
    }

    /// The member acting on `node`, if its claim still holds: the claimant is in the view,
    /// and its last state either came before the claim or still lists the node (a claimant
    /// that finished or gave up says so in its next state). Every member computes the same,
    /// from the same deliveries in the same order.
    fn live_claim(&self, node: NodeId) -> Option<Member> {
        let c = *self.claims.get(&node)?;
        if !self.view.members().contains(&c) {
            return None;
        }
        let claimed = self.claim_at.get(&node).copied().unwrap_or(0);
        let listed = match (self.state_at.get(&c), self.last_states.get(&c)) {
            (Some(at), Some(s)) => *at <= claimed || s.fencing.contains(&node),
            _ => true,
        };
        listed.then_some(c)
    }

    /// When this node's history becomes certain by waiting, if it keeps quorum: a stop wait
    /// after the later of its join and the start of its unbroken quorate run.
    fn certain_at(&self) -> Option<u64> {
        if self.certain {
            return None;
        }
        let since = self.quorate_since?.max(self.joined_at?);
        Some(since.saturating_add(self.cfg.stop_wait_ms()))
    }

    /// The ring this node's state may vouch for: certain, and the quorum service reported
    /// that very ring (the latest totem ring) quorate.
    fn certain_ring(&self) -> Option<RingId> {
        let q = self.view.quorum()?;
        (self.certain && q.quorate && Some(q.ring) == self.view.ring()).then_some(q.ring)
    }

    fn has_state(&self) -> bool {
        self.lineage != Lineage::default()
            || self.role.has_server()
            || (!self.clients.is_empty() && !self.reset_clients_clean)
    }

    fn lease_left(&self) -> u64 {
        if self.role == Role::Starting || self.role == Role::Serving {
            self.lease_until.saturating_sub(self.now)
        } else {
            0
        }
    }

    fn member_state(&self) -> MemberState {
        let mut fencing: Vec<NodeId> = self
            .claims
            .iter()
            .filter(|(_, c)| **c == self.local)
            .map(|(n, _)| *n)
            .collect();
        fencing.sort();
        MemberState {
            lineage: self.lineage,
            has_state: self.has_state(),
            role: self.role,
            clients: self.clients.clone(),
            lease_left_ms: self.lease_left(),
            view: self.view.members(),
            was_quorate: self.last_agreed_quorate,
            age: self.view_age,
            certain: self.certain_ring(),
            unsettled: self.unsettled.keys().copied().collect(),
            stale: self.stale.iter().copied().collect(),
            fencing,
            fenced: self.fenced.iter().copied().collect(),
            server_address: if self.role.has_server() {
                self.cfg.server_address.clone()
            } else {
                String::new()
            },
        }
    }

    fn send_state_if_changed(&mut self) {
        if !self.view.joined() || !self.view.members().contains(&self.local) {
            return;
        }
        let now = self.member_state();
        let same = self.last_sent.as_ref().is_some_and(|s| {
            s.lineage == now.lineage
                && s.has_state == now.has_state
                && s.role == now.role
                && s.clients == now.clients
                && s.view == now.view
                && s.certain == now.certain
                && s.unsettled == now.unsettled
                && s.stale == now.stale
                && s.fencing == now.fencing
                && s.fenced == now.fenced
        });
        if same && !self.view_changed {
            return;
        }
        self.view_changed = false;
        self.last_sent = Some(now.clone());
        self.mcast(Body::State(now));
    }

    fn mcast(&mut self, body: Body) {
        match Message::new(body).encode() {
            Ok(bytes) => self.outputs.push_back(Output::Mcast(bytes)),
            Err(e) => self.log("encode_failed", true, e),
        }
    }

    fn log(&mut self, name: &'static str, warn: bool, detail: String) {
        self.outputs.push_back(Output::Log(LogEvent {
            name,
            warn,
            detail,
            about: None,
        }));
    }

    /// [`Self::log`] for an event about another node (the departed server, the stale or
    /// fenced node), which the shell puts in a field of its own.
    fn log_about(&mut self, name: &'static str, warn: bool, about: NodeId, detail: String) {
        self.outputs.push_back(Output::Log(LogEvent {
            name,
            warn,
            detail,
            about: Some(about),
        }));
    }

    fn gate(&self) -> Gate {
        match self.role {
            Role::Serving => return Gate::Serving,
            Role::Stopping => return Gate::Stopping,
            Role::Starting => {
                return match &self.gather {
                    Some(g) if !g.done() => Gate::Gather(g.waiting()),
                    _ => Gate::ServerStart,
                }
            }
            Role::Idle => {}
        }
        let agreed = match self.view.agreed() {
            Ok(a) => a,
            Err(p) => return Gate::View(p),
        };
        if !agreed.quorate || !self.view.quorate_now() {
            return Gate::NotQuorate;
        }
        if self.stale.contains(&self.local.node) {
            return Gate::Stale;
        }
        if let Some((m, _)) = agreed.states.iter().find(|(_, s)| s.role.has_server()) {
            return Gate::Served(*m);
        }
        if !self.unsettled.is_empty() {
            return Gate::OldServer(self.unsettled.keys().copied().collect());
        }
        if !self.certain {
            return Gate::History {
                until_ms: self
                    .certain_at()
                    .unwrap_or(self.now.saturating_add(self.cfg.stop_wait_ms())),
            };
        }
        match self.chosen {
            Some(c) if c != self.local => Gate::Chosen(c),
            _ => Gate::Peers,
        }
    }
}
