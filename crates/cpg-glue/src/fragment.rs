//! Fragmentation of large payloads over CPG, as pure code (no corosync inside).
//!
//! Every CPG message csnap sends is one *frame*: a 25-byte header and a chunk of the
//! payload. A payload that fits in one frame goes as fragment 0 of 1.
//!
//! ```text
//! byte 0       format version (2)
//! bytes 1..9   message id, u64 little endian, unique per sending connection
//! bytes 9..13  fragment index, u32 LE (0-based)
//! bytes 13..17 fragment count, u32 LE (>= 1)
//! bytes 17..25 view tag, u64 LE: the sender's view when it sent the frame (see below)
//! ```
//!
//! Why not let libcpg fragment (it does, above its atomic size): its sender retries
//! `CS_ERR_TRY_AGAIN` with `usleep` inside the call (blocking our runtime) and prints to
//! stderr; and a process that joins in the middle of a fragmented message drops the tail
//! while older members deliver the whole message, so members of one view would disagree on
//! what was delivered. Here every frame is atomic and the rules below are applied by every
//! member to the same agreed-order event stream, so all members deliver the same messages:
//!
//! * a sender sends the frames of one message back to back (its sender holds a lock for the
//!   whole message), so per sender at most one message is in progress; a first fragment of a
//!   new message discards an unfinished older one (the sender gave up on it);
//! * a continuation that does not extend the sender's message in progress is dropped;
//! * a frame whose view tag is not the receiver's current view is dropped, with the
//!   message it belongs to. A CPG message of up to ~1 MiB travels as many totem packets,
//!   and corosync keeps sending a message's remaining packets in the next ring after a
//!   membership change: members that had its first packets complete it and deliver it
//!   after the change, while a node that merged in drops it for want of a beginning. So
//!   even a one-frame message can straddle a view change and reach only some members of
//!   the new view; the tag makes every member drop it instead. The tag hashes the last
//!   ring id and the group's members as the receiving stream has seen them, so members
//!   of one view agree on it; a sender whose stream lags behind corosync tags with an
//!   older view, and its message is then cut for everybody (consistently, if needlessly);
//! * a confchg in which anybody joined discards every message in progress (the joiner
//!   cannot have its beginning, so nobody delivers it), and one in which a member left
//!   discards that member's message in progress. A message cut this way is lost for
//!   everybody, its sender included: [`Reassembler::on_confchg`] names the cut messages,
//!   so the sender's own stream can tell it (see [`crate::Receipt`]).
//!
//! Both group implementations (real corosync and the in-memory cluster) send and
//! reassemble through this module, so tests of the in-memory cluster see the same cuts.

use std::collections::HashMap;

use crate::{ConfChg, Member};

/// Size of the frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 25;
/// Current frame format version.
pub const FRAME_VERSION: u8 = 2;

/// The header of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The sender's id of the message the frame is part of.
    pub message_id: u64,
    /// The frame's place in the message, from 0.
    pub index: u32,
    /// Frames in the message.
    pub count: u32,
    /// The sender's view when it sent the frame ([`view_tag`]).
    pub view: u64,
}

/// The tag of a view: FNV-1a over the last ring id and the sorted members, so that every
/// build and every member computes the same value for the same view.
pub fn view_tag(ring: Option<crate::RingId>, members: &[Member]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    match ring {
        Some(r) => {
            eat(&[1]);
            eat(&r.node.0.to_le_bytes());
            eat(&r.seq.to_le_bytes());
        }
        None => eat(&[0]),
    }
    for m in members {
        eat(&m.node.0.to_le_bytes());
        eat(&m.pid.to_le_bytes());
    }
    h
}

impl FrameHeader {
    /// The header's bytes, as sent.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0] = FRAME_VERSION;
        out[1..9].copy_from_slice(&self.message_id.to_le_bytes());
        out[9..13].copy_from_slice(&self.index.to_le_bytes());
        out[13..17].copy_from_slice(&self.count.to_le_bytes());
        out[17..25].copy_from_slice(&self.view.to_le_bytes());
        out
    }

    /// Splits a received frame into header and payload chunk, checking the header.
    pub fn decode(frame: &[u8]) -> Result<(FrameHeader, &[u8]), String> {
        if frame.len() < FRAME_HEADER_LEN {
            return Err(format!(
                "frame of {} bytes is shorter than the {FRAME_HEADER_LEN}-byte header",
                frame.len()
            ));
        }
        if frame[0] != FRAME_VERSION {
            return Err(format!(
                "frame format version {} (this build speaks {FRAME_VERSION})",
                frame[0]
            ));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&frame[1..9]);
        let mut index = [0u8; 4];
        index.copy_from_slice(&frame[9..13]);
        let mut count = [0u8; 4];
        count.copy_from_slice(&frame[13..17]);
        let mut view = [0u8; 8];
        view.copy_from_slice(&frame[17..25]);
        let header = FrameHeader {
            message_id: u64::from_le_bytes(id),
            index: u32::from_le_bytes(index),
            count: u32::from_le_bytes(count),
            view: u64::from_le_bytes(view),
        };
        if header.count == 0 {
            return Err("fragment count 0".to_string());
        }
        if header.index >= header.count {
            return Err(format!(
                "fragment index {} not below count {}",
                header.index, header.count
            ));
        }
        Ok((header, &frame[FRAME_HEADER_LEN..]))
    }
}

/// Splits `payload` into frames of at most `max_frame` bytes (header included), tagged
/// with view 0. `max_frame` must exceed the header; an empty payload is one header-only
/// frame.
pub fn split_into_frames(
    message_id: u64,
    payload: &[u8],
    max_frame: usize,
) -> Result<Vec<Vec<u8>>, String> {
    split_into_frames_in_view(message_id, 0, payload, max_frame)
}

/// [`split_into_frames`] for a sender whose current view has tag `view`.
pub fn split_into_frames_in_view(
    message_id: u64,
    view: u64,
    payload: &[u8],
    max_frame: usize,
) -> Result<Vec<Vec<u8>>, String> {
    if max_frame <= FRAME_HEADER_LEN {
        return Err(format!(
            "frame size {max_frame} leaves no room after the {FRAME_HEADER_LEN}-byte header"
        ));
    }
    let chunk = max_frame - FRAME_HEADER_LEN;
    let count = payload.len().div_ceil(chunk).max(1);
    let count = u32::try_from(count)
        .map_err(|_| format!("{} bytes need too many fragments", payload.len()))?;
    let mut frames = Vec::with_capacity(count as usize);
    for index in 0..count {
        let start = index as usize * chunk;
        let end = (start + chunk).min(payload.len());
        let header = FrameHeader {
            message_id,
            index,
            count,
            view,
        };
        let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + end - start);
        frame.extend_from_slice(&header.encode());
        frame.extend_from_slice(&payload[start..end]);
        frames.push(frame);
    }
    Ok(frames)
}

/// What became of one received frame.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameOutcome {
    /// The frame completed message `message_id` of its sender: deliver `payload`.
    Complete {
        /// The sender's id of the message.
        message_id: u64,
        /// The whole message.
        payload: Vec<u8>,
    },
    /// The frame was stored; more fragments are due.
    Incomplete,
    /// The frame was dropped (the reason says why); nothing to deliver. `message_id`: the
    /// message of its sender it was part of, which nobody will deliver (`None` when the
    /// frame is unreadable).
    Dropped {
        /// The message it was part of, if readable.
        message_id: Option<u64>,
        /// Why it was dropped.
        why: String,
    },
}

#[derive(Debug)]
struct Partial {
    message_id: u64,
    next_index: u32,
    count: u32,
    data: Vec<u8>,
}

/// Reassembles fragmented messages from the agreed-order stream of one group member.
/// Deterministic: fed the same events, every member makes the same decisions.
#[derive(Debug)]
pub struct Reassembler {
    in_progress: HashMap<Member, Partial>,
    max_message: usize,
    /// The receiver's current view tag ([`view_tag`]); frames of other views are dropped.
    view: u64,
}

impl Reassembler {
    /// `max_message`: the largest reassembled payload accepted (larger ones are dropped).
    pub fn new(max_message: usize) -> Self {
        Reassembler {
            in_progress: HashMap::new(),
            max_message,
            view: 0,
        }
    }

    /// The receiver's view changed: from now on only frames tagged `view` are accepted.
    pub fn set_view(&mut self, view: u64) {
        self.view = view;
    }

    /// Number of senders with a message in progress.
    pub fn in_progress(&self) -> usize {
        self.in_progress.len()
    }

    /// Applies a group membership change (see the module comment). Returns the messages
    /// it cut, as (sender, message id), sorted: nobody will deliver them.
    pub fn on_confchg(&mut self, change: &ConfChg) -> Vec<(Member, u64)> {
        let mut cut: Vec<(Member, u64)> = if change.joined.is_empty() {
            change
                .left
                .iter()
                .filter_map(|left| {
                    self.in_progress
                        .remove(&left.member)
                        .map(|p| (left.member, p.message_id))
                })
                .collect()
        } else {
            self.in_progress
                .drain()
                .map(|(from, p)| (from, p.message_id))
                .collect()
        };
        cut.sort_unstable();
        cut
    }

    /// Feeds one frame received from `from`.
    pub fn on_frame(&mut self, from: Member, frame: &[u8]) -> FrameOutcome {
        let (header, chunk) = match FrameHeader::decode(frame) {
            Ok(parts) => parts,
            Err(why) => {
                return FrameOutcome::Dropped {
                    message_id: None,
                    why: format!("malformed frame: {why}"),
                }
            }
        };
        let dropped = |why: String| FrameOutcome::Dropped {
            message_id: Some(header.message_id),
            why,
        };
        if header.view != self.view {
            if self
                .in_progress
                .get(&from)
                .is_some_and(|p| p.message_id == header.message_id)
            {
                self.in_progress.remove(&from);
            }
            return dropped(format!(
                "fragment {}/{} of message {} was sent in another view",
                header.index, header.count, header.message_id
            ));
        }
        if header.index == 0 {
            // A new message: whatever this sender had in progress was abandoned.
            let abandoned = self.in_progress.remove(&from);
            if chunk.len() > self.max_message {
                return dropped(self.too_large(chunk.len()));
            }
            if header.count == 1 {
                return FrameOutcome::Complete {
                    message_id: header.message_id,
                    payload: chunk.to_vec(),
                };
            }
            let mut data = abandoned.map(|p| p.data).unwrap_or_default();
            data.clear();
            data.extend_from_slice(chunk);
            self.in_progress.insert(
                from,
                Partial {
                    message_id: header.message_id,
                    next_index: 1,
                    count: header.count,
                    data,
                },
            );
            return FrameOutcome::Incomplete;
        }
        let Some(partial) = self.in_progress.get_mut(&from) else {
            return dropped(format!(
                "fragment {}/{} of message {} has no beginning here",
                header.index, header.count, header.message_id
            ));
        };
        if partial.message_id != header.message_id
            || partial.next_index != header.index
            || partial.count != header.count
        {
            let expected = format!(
                "fragment {}/{} of message {}",
                partial.next_index, partial.count, partial.message_id
            );
            self.in_progress.remove(&from);
            return dropped(format!(
                "got fragment {}/{} of message {}, expected {expected}; both dropped",
                header.index, header.count, header.message_id
            ));
        }
        let total = partial.data.len() + chunk.len();
        if total > self.max_message {
            self.in_progress.remove(&from);
            return dropped(self.too_large(total));
        }
        partial.data.extend_from_slice(chunk);
        partial.next_index += 1;
        if partial.next_index < partial.count {
            return FrameOutcome::Incomplete;
        }
        match self.in_progress.remove(&from) {
            Some(done) => FrameOutcome::Complete {
                message_id: done.message_id,
                payload: done.data,
            },
            None => FrameOutcome::Incomplete,
        }
    }

    fn too_large(&self, size: usize) -> String {
        format!(
            "message grows to {size} bytes, over the {} byte maximum",
            self.max_message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemberChange, NodeId, Reason};
    use rand::{Rng, SeedableRng};

    fn member(node: u32, pid: u32) -> Member {
        Member {
            node: NodeId(node),
            pid,
        }
    }

    fn complete(message_id: u64, payload: Vec<u8>) -> FrameOutcome {
        FrameOutcome::Complete {
            message_id,
            payload,
        }
    }

    fn change(joined: &[Member], left: &[Member]) -> ConfChg {
        ConfChg {
            members: vec![],
            joined: joined
                .iter()
                .map(|m| MemberChange {
                    member: *m,
                    reason: Reason::Join,
                })
                .collect(),
            left: left
                .iter()
                .map(|m| MemberChange {
                    member: *m,
                    reason: Reason::NodeDown,
                })
                .collect(),
        }
    }

    #[test]
    fn header_round_trips_and_rejects_garbage() {
        let h = FrameHeader {
            message_id: 0x0102_0304_0506_0708,
            index: 3,
            count: 9,
            view: 0xfeed,
        };
        let mut frame = h.encode().to_vec();
        frame.extend_from_slice(b"abc");
        let (back, chunk) = FrameHeader::decode(&frame).unwrap();
        assert_eq!(back, h);
        assert_eq!(chunk, b"abc");
        assert_eq!(frame[0], FRAME_VERSION);
        assert_eq!(&frame[1..9], &0x0102_0304_0506_0708u64.to_le_bytes());

        assert!(FrameHeader::decode(&frame[..24])
            .unwrap_err()
            .contains("shorter"));
        let mut bad = frame.clone();
        bad[0] = 9;
        assert!(FrameHeader::decode(&bad).unwrap_err().contains("version 9"));
        let zero = FrameHeader {
            message_id: 1,
            index: 0,
            count: 0,
            view: 0,
        };
        assert!(FrameHeader::decode(&zero.encode())
            .unwrap_err()
            .contains("count 0"));
        let past = FrameHeader {
            message_id: 1,
            index: 2,
            count: 2,
            view: 0,
        };
        assert!(FrameHeader::decode(&past.encode())
            .unwrap_err()
            .contains("index 2"));
    }

    #[test]
    fn split_covers_payload_exactly() {
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let frames = split_into_frames(7, &payload, FRAME_HEADER_LEN + 300).unwrap();
        assert_eq!(frames.len(), 4);
        assert!(frames.iter().all(|f| f.len() <= FRAME_HEADER_LEN + 300));
        let mut joined = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let (h, chunk) = FrameHeader::decode(f).unwrap();
            assert_eq!((h.message_id, h.index, h.count), (7, i as u32, 4));
            joined.extend_from_slice(chunk);
        }
        assert_eq!(joined, payload);

        let empty = split_into_frames(8, &[], 100).unwrap();
        assert_eq!(empty.len(), 1);
        assert_eq!(empty[0].len(), FRAME_HEADER_LEN);
        assert!(split_into_frames(1, b"x", FRAME_HEADER_LEN).is_err());
    }

    #[test]
    fn reassembles_interleaved_senders() {
        let (a, b) = (member(1, 10), member(2, 20));
        let pa: Vec<u8> = vec![1; 250];
        let pb: Vec<u8> = vec![2; 130];
        let fa = split_into_frames(1, &pa, FRAME_HEADER_LEN + 100).unwrap();
        let fb = split_into_frames(1, &pb, FRAME_HEADER_LEN + 100).unwrap();
        let mut r = Reassembler::new(1 << 20);
        assert_eq!(r.on_frame(a, &fa[0]), FrameOutcome::Incomplete);
        assert_eq!(r.on_frame(b, &fb[0]), FrameOutcome::Incomplete);
        assert_eq!(r.on_frame(a, &fa[1]), FrameOutcome::Incomplete);
        assert_eq!(r.on_frame(b, &fb[1]), complete(1, pb));
        assert_eq!(r.on_frame(a, &fa[2]), complete(1, pa));
        assert_eq!(r.in_progress(), 0);
    }

    #[test]
    fn single_frame_message_and_empty_payload() {
        let mut r = Reassembler::new(100);
        let f = split_into_frames(5, b"hello", 64).unwrap();
        assert_eq!(
            r.on_frame(member(1, 1), &f[0]),
            complete(5, b"hello".to_vec())
        );
        let e = split_into_frames(6, b"", 64).unwrap();
        assert_eq!(r.on_frame(member(1, 1), &e[0]), complete(6, vec![]));
    }

    #[test]
    fn leaver_partial_is_discarded_others_kept() {
        let (a, b) = (member(1, 10), member(2, 20));
        let fa = split_into_frames(1, &[1; 200], FRAME_HEADER_LEN + 100).unwrap();
        let fb = split_into_frames(1, &[2; 200], FRAME_HEADER_LEN + 100).unwrap();
        let mut r = Reassembler::new(1 << 20);
        r.on_frame(a, &fa[0]);
        r.on_frame(b, &fb[0]);
        assert_eq!(r.on_confchg(&change(&[], &[a])), vec![(a, 1)]);
        assert_eq!(r.in_progress(), 1);
        assert!(matches!(
            r.on_frame(a, &fa[1]),
            FrameOutcome::Dropped { .. }
        ));
        assert_eq!(r.on_frame(b, &fb[1]), complete(1, vec![2; 200]));
    }

    #[test]
    fn a_join_discards_everything_in_progress_for_everybody() {
        // An old member and the joiner see the same tail after the join's confchg;
        // both must drop it.
        let (a, joiner) = (member(1, 10), member(3, 30));
        let fa = split_into_frames(4, &[7; 300], FRAME_HEADER_LEN + 100).unwrap();
        let mut old = Reassembler::new(1 << 20);
        let mut new = Reassembler::new(1 << 20);
        old.on_frame(a, &fa[0]);
        let join = change(&[joiner], &[]);
        assert_eq!(old.on_confchg(&join), vec![(a, 4)], "the cut is named");
        assert_eq!(new.on_confchg(&join), vec![]);
        for f in &fa[1..] {
            let o = old.on_frame(a, f);
            let n = new.on_frame(a, f);
            assert!(matches!(o, FrameOutcome::Dropped { .. }), "{o:?}");
            assert!(matches!(n, FrameOutcome::Dropped { .. }), "{n:?}");
        }
        // The next whole message is delivered by both again.
        let next = split_into_frames(5, &[8; 150], FRAME_HEADER_LEN + 100).unwrap();
        for f in &next[..1] {
            assert_eq!(old.on_frame(a, f), FrameOutcome::Incomplete);
            assert_eq!(new.on_frame(a, f), FrameOutcome::Incomplete);
        }
        assert_eq!(old.on_frame(a, &next[1]), complete(5, vec![8; 150]));
        assert_eq!(new.on_frame(a, &next[1]), complete(5, vec![8; 150]));
    }

    /// Corosync can deliver a message's tail (or all of a one-frame message) after a
    /// membership change to the old members only: with view tags every member of the new
    /// view drops it, and the sender's own stream names it cut.
    #[test]
    fn frames_of_another_view_are_dropped_by_every_member() {
        let (a, b, merged) = (member(1, 10), member(2, 20), member(3, 30));
        let old_view = view_tag(
            Some(crate::RingId {
                node: NodeId(1),
                seq: 8,
            }),
            &[a, b],
        );
        let new_view = view_tag(
            Some(crate::RingId {
                node: NodeId(1),
                seq: 12,
            }),
            &[a, b, merged],
        );
        assert_ne!(old_view, new_view);
        let frames =
            split_into_frames_in_view(9, old_view, &[5; 150], FRAME_HEADER_LEN + 100).unwrap();
        let one = split_into_frames_in_view(10, old_view, b"small", 100).unwrap();
        let mut old_member = Reassembler::new(1 << 20);
        old_member.set_view(old_view);
        assert_eq!(old_member.on_frame(a, &frames[0]), FrameOutcome::Incomplete);
        // The merge: the NodeUp confchg and the new ring. The old member keeps nothing it
        // could complete, the merged member never had the beginning.
        old_member.set_view(new_view);
        let mut new_member = Reassembler::new(1 << 20);
        new_member.set_view(new_view);
        for r in [&mut old_member, &mut new_member] {
            assert!(matches!(
                r.on_frame(a, &frames[1]),
                FrameOutcome::Dropped {
                    message_id: Some(9),
                    ..
                }
            ));
            assert!(matches!(
                r.on_frame(a, &one[0]),
                FrameOutcome::Dropped {
                    message_id: Some(10),
                    ..
                }
            ));
        }
        // The next message, sent in the new view, is delivered by both.
        let next = split_into_frames_in_view(11, new_view, b"after", 100).unwrap();
        assert_eq!(
            old_member.on_frame(a, &next[0]),
            complete(11, b"after".to_vec())
        );
        assert_eq!(
            new_member.on_frame(a, &next[0]),
            complete(11, b"after".to_vec())
        );
    }

    #[test]
    fn abandoned_message_is_replaced_by_the_next_one() {
        let a = member(1, 10);
        let first = split_into_frames(1, &[1; 300], FRAME_HEADER_LEN + 100).unwrap();
        let second = split_into_frames(2, &[2; 150], FRAME_HEADER_LEN + 100).unwrap();
        let mut r = Reassembler::new(1 << 20);
        r.on_frame(a, &first[0]);
        r.on_frame(a, &second[0]);
        assert!(matches!(
            r.on_frame(a, &first[1]),
            FrameOutcome::Dropped { .. }
        ));
        // The out-of-sequence fragment also ended the second message.
        assert!(matches!(
            r.on_frame(a, &second[1]),
            FrameOutcome::Dropped { .. }
        ));
        assert_eq!(r.in_progress(), 0);
    }

    #[test]
    fn oversized_and_malformed_frames_are_dropped() {
        let a = member(1, 10);
        let mut r = Reassembler::new(250);
        let big = split_into_frames(1, &[0; 300], FRAME_HEADER_LEN + 100).unwrap();
        r.on_frame(a, &big[0]);
        r.on_frame(a, &big[1]);
        let out = r.on_frame(a, &big[2]);
        assert!(
            matches!(&out, FrameOutcome::Dropped { why, .. } if why.contains("300 bytes")),
            "{out:?}"
        );
        assert_eq!(r.in_progress(), 0);
        let out = r.on_frame(a, b"short");
        assert!(
            matches!(&out, FrameOutcome::Dropped { why, .. } if why.contains("malformed")),
            "{out:?}"
        );
    }

    /// Randomised: any interleaving of several senders' fragmented messages reassembles to
    /// exactly the sent payloads, in each sender's order. Replay with CPG_GLUE_SEED=<seed>.
    #[test]
    fn random_interleavings_reassemble() {
        let seed = csnap_proto::testing::seed("random_interleavings_reassemble", "CPG_GLUE_SEED");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _round in 0..50 {
            let senders: Vec<Member> = (1..=rng.gen_range(1..5))
                .map(|n| member(n, n * 7))
                .collect();
            // Per sender: its frames, back to back, and the payloads they carry.
            type SenderQueue = (Member, std::collections::VecDeque<Vec<u8>>, Vec<Vec<u8>>);
            let mut queues: Vec<SenderQueue> = Vec::new();
            for s in &senders {
                let mut frames = std::collections::VecDeque::new();
                let mut sent = Vec::new();
                for m in 0..rng.gen_range(1..6u64) {
                    let len = rng.gen_range(0..700);
                    let payload: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    frames.extend(split_into_frames(m, &payload, FRAME_HEADER_LEN + 64).unwrap());
                    sent.push(payload);
                }
                queues.push((*s, frames, sent));
            }
            let mut r = Reassembler::new(1 << 20);
            let mut got: HashMap<Member, Vec<Vec<u8>>> = HashMap::new();
            while queues.iter().any(|q| !q.1.is_empty()) {
                let pick = rng.gen_range(0..queues.len());
                let (from, frames, _) = &mut queues[pick];
                if let Some(frame) = frames.pop_front() {
                    match r.on_frame(*from, &frame) {
                        FrameOutcome::Complete { payload, .. } => {
                            got.entry(*from).or_default().push(payload)
                        }
                        FrameOutcome::Incomplete => {}
                        FrameOutcome::Dropped { why, .. } => panic!("seed {seed}: dropped: {why}"),
                    }
                }
            }
            for (from, _, sent) in &queues {
                assert_eq!(got.remove(from).unwrap_or_default(), *sent, "seed {seed}");
            }
        }
    }
}
