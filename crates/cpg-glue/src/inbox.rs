//! The receiving side shared by both group implementations: raw callback records (confchg,
//! totem confchg, frame) in corosync's order go in, [`GroupEvent`]s come out, and the local
//! sender's [`Receipt`]s learn the fate of each of its messages.
//!
//! Both the corosync stream and the in-memory stream feed their raw events through an
//! [`Inbox`], so fragmentation, cuts and receipts behave the same in both.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::channel::oneshot;

use crate::fragment::{view_tag, FrameOutcome, Reassembler};
use crate::{ConfChg, Delivery, GroupError, GroupEvent, Member, RingId, TotemConfChg};

/// One callback's record, as the group implementation received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEvent {
    ConfChg(ConfChg),
    Totem(TotemConfChg),
    /// One frame of a (possibly fragmented) message; see [`crate::fragment`].
    Frame {
        from: Member,
        data: Vec<u8>,
    },
}

/// The fate of one multicast message, as the sender's own group stream saw it.
///
/// Resolves with `Ok(())` once the sender's stream delivered the message (then every
/// member of that view delivers it), or with [`GroupError::Interrupted`] if a membership
/// change cut it (then nobody delivers it), or with [`GroupError::Disconnected`] if the
/// group stream ended first. It resolves only while the group's stream is being polled
/// (the stream is where corosync's order is known), so await it from another task than
/// the one reading the stream, or in a `select!` beside it. Dropping it is fine.
#[derive(Debug)]
pub struct Receipt {
    outcome: oneshot::Receiver<Result<(), GroupError>>,
    group: String,
}

impl Receipt {
    /// Waits for the message's fate (see [`Receipt`]).
    pub async fn delivered(self) -> Result<(), GroupError> {
        match self.outcome.await {
            Ok(outcome) => outcome,
            Err(_) => Err(GroupError::Disconnected {
                group: self.group,
                detail: "the group stream was dropped before the message's fate was known".into(),
            }),
        }
    }
}

/// The local sender's outstanding messages of one group connection, by message id.
/// Shared between the senders (which register) and the stream (which resolves).
#[derive(Debug)]
pub(crate) struct Receipts {
    group: String,
    inner: Mutex<ReceiptsInner>,
}

#[derive(Debug, Default)]
struct ReceiptsInner {
    pending: BTreeMap<u64, oneshot::Sender<Result<(), GroupError>>>,
    /// Why no message can be delivered any more, once the stream ended.
    closed: Option<String>,
}

impl Receipts {
    pub(crate) fn new(group: &str) -> Arc<Receipts> {
        Arc::new(Receipts {
            group: group.to_owned(),
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ReceiptsInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers message `id` before its first frame goes out (the stream may deliver it
    /// before the send returns). Fails once the stream has ended.
    pub(crate) fn register(&self, id: u64) -> Result<Receipt, GroupError> {
        let mut inner = self.lock();
        if let Some(why) = &inner.closed {
            return Err(GroupError::Disconnected {
                group: self.group.clone(),
                detail: why.clone(),
            });
        }
        let (tx, rx) = oneshot::channel();
        inner.pending.insert(id, tx);
        Ok(Receipt {
            outcome: rx,
            group: self.group.clone(),
        })
    }

    /// Forgets message `id`, whose send failed (the sender was told by the error).
    pub(crate) fn forget(&self, id: u64) {
        self.lock().pending.remove(&id);
    }

    /// Message `id` was delivered. The local sender's messages reach the stream in id
    /// order, so any older one still pending was lost (abandoned or cut).
    fn delivered(&self, id: u64) {
        let mut inner = self.lock();
        let newer = inner.pending.split_off(&(id + 1));
        let done = std::mem::replace(&mut inner.pending, newer);
        drop(inner);
        for (older_or_this, tx) in done {
            let outcome = if older_or_this == id {
                Ok(())
            } else {
                Err(self.interrupted(older_or_this, "it was abandoned before it was complete"))
            };
            let _ = tx.send(outcome);
        }
    }

    /// Message `id` was cut by a membership change.
    fn cut(&self, id: u64) {
        let tx = self.lock().pending.remove(&id);
        if let Some(tx) = tx {
            let _ = tx.send(Err(
                self.interrupted(id, "a membership change cut it; no member delivered it")
            ));
        }
    }

    fn interrupted(&self, id: u64, why: &str) -> GroupError {
        GroupError::Interrupted {
            group: self.group.clone(),
            detail: format!("message {id}: {why}"),
        }
    }

    /// The stream ended: every pending message fails with `Disconnected`, and so does
    /// every later registration.
    pub(crate) fn close(&self, why: &str) {
        let pending = {
            let mut inner = self.lock();
            if inner.closed.is_none() {
                inner.closed = Some(why.to_owned());
            }
            std::mem::take(&mut inner.pending)
        };
        for (_, tx) in pending {
            let _ = tx.send(Err(GroupError::Disconnected {
                group: self.group.clone(),
                detail: format!("{why}; the message's fate is unknown"),
            }));
        }
    }
}

/// Turns one connection's raw events into group events and resolves its receipts.
#[derive(Debug)]
pub(crate) struct Inbox {
    local: Member,
    group: String,
    reassembler: Reassembler,
    receipts: Arc<Receipts>,
    ready: VecDeque<GroupEvent>,
    /// Whether the local process's own join confchg has come through.
    own_join_seen: bool,
    ring: Option<RingId>,
    members: Vec<Member>,
    /// The current view's tag ([`view_tag`]), shared with the senders, which tag their
    /// frames with it.
    view: Arc<AtomicU64>,
}

impl Inbox {
    pub(crate) fn new(
        local: Member,
        group: &str,
        max_message: usize,
        receipts: Arc<Receipts>,
        view: Arc<AtomicU64>,
    ) -> Inbox {
        view.store(view_tag(None, &[]), Ordering::Release);
        let mut reassembler = Reassembler::new(max_message);
        reassembler.set_view(view_tag(None, &[]));
        Inbox {
            local,
            group: group.to_owned(),
            reassembler,
            receipts,
            ready: VecDeque::new(),
            own_join_seen: false,
            ring: None,
            members: Vec::new(),
            view,
        }
    }

    fn update_view(&mut self) {
        let tag = view_tag(self.ring, &self.members);
        self.reassembler.set_view(tag);
        self.view.store(tag, Ordering::Release);
    }

    /// Whether the local process's own join confchg has come through (it may still be
    /// waiting in the queue of events not yet read).
    pub(crate) fn own_join_seen(&self) -> bool {
        self.own_join_seen
    }

    pub(crate) fn push(&mut self, event: RawEvent) {
        match event {
            RawEvent::ConfChg(change) => {
                if change
                    .joined
                    .iter()
                    .any(|j| j.member == self.local && j.reason == crate::Reason::Join)
                {
                    self.own_join_seen = true;
                }
                for (from, id) in self.reassembler.on_confchg(&change) {
                    if from == self.local {
                        self.receipts.cut(id);
                    }
                }
                self.members = change.members.clone();
                self.update_view();
                self.ready.push_back(GroupEvent::ConfChg(change));
            }
            RawEvent::Totem(totem) => {
                self.ring = Some(totem.ring);
                self.update_view();
                self.ready.push_back(GroupEvent::TotemConfChg(totem))
            }
            RawEvent::Frame { from, data } => match self.reassembler.on_frame(from, &data) {
                FrameOutcome::Complete {
                    message_id,
                    payload,
                } => {
                    if from == self.local {
                        self.receipts.delivered(message_id);
                    }
                    self.ready
                        .push_back(GroupEvent::Deliver(Delivery { from, payload }));
                }
                FrameOutcome::Incomplete => {}
                FrameOutcome::Dropped { message_id, why } => {
                    if let (true, Some(id)) = (from == self.local, message_id) {
                        self.receipts.cut(id);
                    }
                    tracing::warn!(group = %self.group, %from, "dropped a CPG frame: {why}")
                }
            },
        }
    }

    pub(crate) fn pop(&mut self) -> Option<GroupEvent> {
        self.ready.pop_front()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    /// The stream ended: outstanding receipts fail.
    pub(crate) fn close(&self, why: &str) {
        self.receipts.close(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fragment::FRAME_HEADER_LEN;
    use crate::{MemberChange, NodeId, Reason};
    use futures::FutureExt;

    fn member(node: u32, pid: u32) -> Member {
        Member {
            node: NodeId(node),
            pid,
        }
    }

    fn outcome(r: Receipt) -> Option<Result<(), GroupError>> {
        r.delivered().now_or_never()
    }

    #[test]
    fn receipts_resolve_on_delivery_cut_and_close() {
        let me = member(1, 7);
        let other = member(2, 9);
        let receipts = Receipts::new("g");
        let view = Arc::new(AtomicU64::new(0));
        let mut inbox = Inbox::new(me, "g", 1 << 20, receipts.clone(), view.clone());
        // The tests' frames are sent in the view the inbox is in.
        let frames = |id: u64, len: usize| {
            crate::fragment::split_into_frames_in_view(
                id,
                view.load(Ordering::Acquire),
                &vec![id as u8; len],
                FRAME_HEADER_LEN + 10,
            )
            .unwrap()
        };

        // Delivered: resolves Ok only once the last frame went through the stream.
        let r0 = receipts.register(0).unwrap();
        let f0 = frames(0, 25);
        inbox.push(RawEvent::Frame {
            from: me,
            data: f0[0].clone(),
        });
        let mut r0 = Box::pin(r0.delivered());
        assert!((&mut r0).now_or_never().is_none(), "not yet delivered");
        for f in &f0[1..] {
            inbox.push(RawEvent::Frame {
                from: me,
                data: f.clone(),
            });
        }
        assert!(matches!(r0.now_or_never(), Some(Ok(()))));
        assert!(matches!(inbox.pop(), Some(GroupEvent::Deliver(d)) if d.from == me));

        // Cut by a join: Interrupted, and nobody got a delivery.
        let r1 = receipts.register(1).unwrap();
        inbox.push(RawEvent::Frame {
            from: me,
            data: frames(1, 25)[0].clone(),
        });
        inbox.push(RawEvent::ConfChg(ConfChg {
            members: vec![me, other],
            left: vec![],
            joined: vec![MemberChange {
                member: other,
                reason: Reason::Join,
            }],
        }));
        assert!(matches!(
            outcome(r1),
            Some(Err(GroupError::Interrupted { .. }))
        ));

        // A message another member cut does not touch ours.
        let r2 = receipts.register(2).unwrap();
        inbox.push(RawEvent::Frame {
            from: other,
            data: frames(5, 25)[0].clone(),
        });
        inbox.push(RawEvent::ConfChg(ConfChg {
            members: vec![me],
            left: vec![MemberChange {
                member: other,
                reason: Reason::NodeDown,
            }],
            joined: vec![],
        }));
        // An older message that never arrived is lost once a newer one is delivered.
        let r3 = receipts.register(3).unwrap();
        inbox.push(RawEvent::Frame {
            from: me,
            data: frames(3, 5)[0].clone(),
        });
        assert!(matches!(
            outcome(r2),
            Some(Err(GroupError::Interrupted { .. }))
        ));
        assert!(matches!(outcome(r3), Some(Ok(()))));

        // The stream ends: pending receipts and later registrations fail.
        let r4 = receipts.register(4).unwrap();
        inbox.close("left the group");
        assert!(matches!(
            outcome(r4),
            Some(Err(GroupError::Disconnected { .. }))
        ));
        assert!(matches!(
            receipts.register(5),
            Err(GroupError::Disconnected { .. })
        ));
    }
}
