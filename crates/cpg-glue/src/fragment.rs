//! Fragmentation of large payloads over CPG, as pure code (no corosync inside).
//!
//! Every CPG message csnap sends is one *frame*: a 17-byte header and a chunk of the
//! payload. A payload that fits in one frame goes as fragment 0 of 1.
//!
//! ```text
//! byte 0      format version (1)
//! bytes 1..9  message id, u64 little endian, unique per sending connection
//! bytes 9..13 fragment index, u32 LE (0-based)
//! bytes 13..17 fragment count, u32 LE (>= 1)
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
pub const FRAME_HEADER_LEN: usize = 17;
/// Current frame format version.
pub const FRAME_VERSION: u8 = 1;

/// The header of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub message_id: u64,
    pub index: u32,
    pub count: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0] = FRAME_VERSION;
        out[1..9].copy_from_slice(&self.message_id.to_le_bytes());
        out[9..13].copy_from_slice(&self.index.to_le_bytes());
        out[13..17].copy_from_slice(&self.count.to_le_bytes());
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
        let header = FrameHeader {
            message_id: u64::from_le_bytes(id),
            index: u32::from_le_bytes(index),
            count: u32::from_le_bytes(count),
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

/// Splits `payload` into frames of at most `max_frame` bytes (header included).
/// `max_frame` must exceed the header; an empty payload is one header-only frame.
pub fn split_into_frames(
    message_id: u64,
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
    Complete { message_id: u64, payload: Vec<u8> },
    /// The frame was stored; more fragments are due.
    Incomplete,
    /// The frame was dropped (the reason says why); nothing to deliver.
    Dropped(String),
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
}

impl Reassembler {
    /// `max_message`: the largest reassembled payload accepted (larger ones are dropped).
    pub fn new(max_message: usize) -> Self {
        Reassembler {
            in_progress: HashMap::new(),
            max_message,
        }
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
            Err(why) => return FrameOutcome::Dropped(format!("malformed frame: {why}")),
        };
        if header.index == 0 {
            // A new message: whatever this sender had in progress was abandoned.
            let abandoned = self.in_progress.remove(&from);
            if chunk.len() > self.max_message {
                return FrameOutcome::Dropped(self.too_large(chunk.len()));
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
            return FrameOutcome::Dropped(format!(
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
            return FrameOutcome::Dropped(format!(
                "got fragment {}/{} of message {}, expected {expected}; both dropped",
                header.index, header.count, header.message_id
            ));
        }
        let total = partial.data.len() + chunk.len();
        if total > self.max_message {
            self.in_progress.remove(&from);
            return FrameOutcome::Dropped(self.too_large(total));
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
        };
        let mut frame = h.encode().to_vec();
        frame.extend_from_slice(b"abc");
        let (back, chunk) = FrameHeader::decode(&frame).unwrap();
        assert_eq!(back, h);
        assert_eq!(chunk, b"abc");
        assert_eq!(frame[0], FRAME_VERSION);
        assert_eq!(&frame[1..9], &0x0102_0304_0506_0708u64.to_le_bytes());

        assert!(FrameHeader::decode(&frame[..16])
            .unwrap_err()
            .contains("shorter"));
        let mut bad = frame.clone();
        bad[0] = 9;
        assert!(FrameHeader::decode(&bad).unwrap_err().contains("version 9"));
        let zero = FrameHeader {
            message_id: 1,
            index: 0,
            count: 0,
        };
        assert!(FrameHeader::decode(&zero.encode())
            .unwrap_err()
            .contains("count 0"));
        let past = FrameHeader {
            message_id: 1,
            index: 2,
            count: 2,
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
        assert!(matches!(r.on_frame(a, &fa[1]), FrameOutcome::Dropped(_)));
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
            assert!(matches!(o, FrameOutcome::Dropped(_)), "{o:?}");
            assert!(matches!(n, FrameOutcome::Dropped(_)), "{n:?}");
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

    #[test]
    fn abandoned_message_is_replaced_by_the_next_one() {
        let a = member(1, 10);
        let first = split_into_frames(1, &[1; 300], FRAME_HEADER_LEN + 100).unwrap();
        let second = split_into_frames(2, &[2; 150], FRAME_HEADER_LEN + 100).unwrap();
        let mut r = Reassembler::new(1 << 20);
        r.on_frame(a, &first[0]);
        r.on_frame(a, &second[0]);
        assert!(matches!(r.on_frame(a, &first[1]), FrameOutcome::Dropped(_)));
        // The out-of-sequence fragment also ended the second message.
        assert!(matches!(
            r.on_frame(a, &second[1]),
            FrameOutcome::Dropped(_)
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
            matches!(&out, FrameOutcome::Dropped(why) if why.contains("300 bytes")),
            "{out:?}"
        );
        assert_eq!(r.in_progress(), 0);
        let out = r.on_frame(a, b"short");
        assert!(
            matches!(&out, FrameOutcome::Dropped(why) if why.contains("malformed")),
            "{out:?}"
        );
    }

    /// Randomised: any interleaving of several senders' fragmented messages reassembles to
    /// exactly the sent payloads, in each sender's order. Replay with CPG_GLUE_SEED=<seed>.
    #[test]
    fn random_interleavings_reassemble() {
        let seed: u64 = std::env::var("CPG_GLUE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        println!("random_interleavings_reassemble seed={seed} (CPG_GLUE_SEED to replay)");
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
                        FrameOutcome::Dropped(why) => panic!("seed {seed}: dropped: {why}"),
                    }
                }
            }
            for (from, _, sent) in &queues {
                assert_eq!(got.remove(from).unwrap_or_default(), *sent, "seed {seed}");
            }
        }
    }
}
