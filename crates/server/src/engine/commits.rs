//! Part of the engine's state: store generations, the one commit in flight, and the
//! replies held until their generation is durable.
//!
//! Every store mutation takes a new generation ([`Commits::touch`]); a generation is
//! durable once a commit started at or after it completed. Invariant: `committed <=
//! in_flight <= dirty`, at most one commit is in flight, and a deferred reply or a
//! per-chunk generation is kept only while its generation is not yet durable. Nothing a
//! crash could undo is shown to a client: replies wait in `deferred`, exceptions are
//! exposed only once [`Commits::exceptions_committed`].

use super::io::Requester;
use csnap_proto::ServerMsg;
use std::collections::HashMap;

#[derive(Default)]
pub(super) struct Commits {
    /// Generation of the latest store mutation; `committed` is the latest durable one.
    dirty: u64,
    committed: u64,
    in_flight: Option<u64>,
    /// Someone waits for a commit (or a mutation wants one).
    wanted: bool,
    /// Per origin chunk, the generation of the last exception recorded on it.
    chunk_gen: HashMap<u64, u64>,
    /// Generation of the last delete/invalidation (may make chunks unique).
    snapset_gen: u64,
    /// Generation of the last reclaim that freed chunks (reusable once committed).
    free_gen: u64,
    /// Replies held until their generation is committed.
    deferred: Vec<(u64, Requester, ServerMsg)>,
}

impl Commits {
    /// A store mutation: its generation (a commit is wanted for it).
    pub(super) fn touch(&mut self) -> u64 {
        self.dirty += 1;
        self.wanted = true;
        self.dirty
    }

    /// Someone waits for the next commit.
    pub(super) fn want(&mut self) {
        self.wanted = true;
    }

    /// An exception was recorded on `chunk` (a store mutation).
    pub(super) fn exception_recorded(&mut self, chunk: u64) {
        let gen = self.touch();
        self.chunk_gen.insert(chunk, gen);
    }

    /// A snapshot was deleted or invalidated (a store mutation): its generation.
    pub(super) fn snapset_changed(&mut self) -> u64 {
        self.snapset_gen = self.touch();
        self.snapset_gen
    }

    /// Reclaim freed chunks (a store mutation): reusable once committed.
    pub(super) fn chunks_freed(&mut self) {
        self.free_gen = self.touch();
    }

    /// Freed chunks wait for a commit before they can be reused.
    pub(super) fn frees_uncommitted(&self) -> bool {
        self.free_gen > self.committed
    }

    /// Holds `msg` for `who` until generation `gen` is durable.
    pub(super) fn defer(&mut self, gen: u64, who: Requester, msg: ServerMsg) {
        self.deferred.push((gen, who, msg));
    }

    /// Starts a commit if one is wanted, none is in flight and something is not durable.
    /// True if the shell must run one now.
    pub(super) fn start(&mut self) -> bool {
        if self.wanted && self.in_flight.is_none() && self.dirty > self.committed {
            self.in_flight = Some(self.dirty);
            self.wanted = false;
            true
        } else {
            false
        }
    }

    /// The commit in flight is done (the caller handles a failure): the replies that were
    /// waiting for it, or `None` if no commit was in flight.
    pub(super) fn done(&mut self) -> Option<Vec<(Requester, ServerMsg)>> {
        let gen = self.in_flight.take()?;
        self.committed = gen;
        self.chunk_gen.retain(|_, g| *g > gen);
        let (ready, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|(g, _, _)| *g <= gen);
        self.deferred = later;
        Some(ready.into_iter().map(|(_, who, msg)| (who, msg)).collect())
    }

    /// A commit is in flight (its `done` has not been seen).
    pub(super) fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Generation `gen` is durable.
    pub(super) fn is_committed(&self, gen: u64) -> bool {
        gen <= self.committed
    }

    /// Exceptions recorded on `chunk` are durable.
    pub(super) fn exceptions_committed(&self, chunk: u64) -> bool {
        self.chunk_gen
            .get(&chunk)
            .is_none_or(|g| *g <= self.committed)
    }

    /// Exceptions on `chunk` and every delete/invalidation (which can make a chunk unique or
    /// an exception exclusive) are durable.
    pub(super) fn chunk_committed(&self, chunk: u64) -> bool {
        self.exceptions_committed(chunk) && self.snapset_gen <= self.committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn one_commit_at_a_time_and_replies_wait_for_theirs() {
        let mut c = Commits::default();
        assert!(!c.start(), "nothing to commit");
        c.exception_recorded(4);
        let who = Requester { conn: 1, id: 9 };
        c.defer(1, who, ServerMsg::KeepAliveOk);
        assert!(!c.exceptions_committed(4));
        assert!(c.start());
        let gen2 = c.snapset_changed();
        c.defer(gen2, who, ServerMsg::ResendDoneOk);
        assert!(!c.start(), "a second commit waits for the first");
        let ready = c.done().expect("a commit was in flight");
        assert_eq!(ready, vec![(who, ServerMsg::KeepAliveOk)]);
        assert!(c.exceptions_committed(4));
        assert!(!c.chunk_committed(4), "the deletion is not durable yet");
        assert!(c.start());
        assert_eq!(c.done(), Some(vec![(who, ServerMsg::ResendDoneOk)]));
        assert!(c.chunk_committed(4) && c.is_committed(gen2));
        assert_eq!(c.done(), None, "no commit in flight");
    }
}
