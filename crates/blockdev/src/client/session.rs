//! The client side of one metadata session, sans-IO: frames in, frames and events out.
//!
//! A [`Session`] outlives connections. It remembers every request the server has not
//! answered yet and every read lock / write lease the server granted and the client has not
//! released, so that after a connection is lost (server crash, failover, network glitch) the
//! next connection can resume: authenticate with `resuming`, re-assert the locks and leases
//! (`UploadLocks`), resend the unanswered requests under their original ids, and close the
//! resync with `ResendDone`. The I/O shell ([`super::conn`]) only moves bytes.
//!
//! Inputs go in with [`Session::handle`] and what to do comes out of
//! [`Session::poll_output`]. There is no `poll_timeout`: nothing in the session changes with
//! time. The times a client keeps (its origin write lease, counted from the instant a
//! request was sent, and the keep-alive that renews it; the connect timeout and reconnect
//! back-off) are measured by the shell, which sends `KeepAlive` through `Submit`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use csnap_proto::auth::{self, Handshake, Nonce, SessionKeys};
use csnap_proto::{
    ChunkRange, ClientFrame, ClientId, ClientKind, ClientMsg, ErrorCode, HeldLock, RequestId,
    ServerFrame, ServerMsg, SnapId, StoreAddr, PROTOCOL_VERSION,
};

/// The message that releases the store reads of `store` once they are done, whatever they
/// returned: the addresses a `SnapshotReadOk` for snapshot `snap` gave, or an
/// `OriginReadOk` naming `snap` as its rollback source. Until it arrives the server keeps
/// those store chunks from reuse. Sent with [`SessionInput::Notify`] on the session that
/// got the answer (no answer comes back; a lost connection releases on the server's side).
/// `None` if there is nothing to release: no address, or an `OriginReadOk` from a server
/// that names no source (it holds nothing for origin reads).
pub fn store_reads_release(snap: Option<SnapId>, store: &[StoreAddr]) -> Option<ClientMsg> {
    let snap = snap?;
    if store.is_empty() {
        return None;
    }
    let mut chunks: Vec<u64> = store.iter().map(|a| a.chunk).collect();
    chunks.sort_unstable();
    Some(ClientMsg::ReleaseStoreReads {
        snap,
        ranges: ChunkRange::coalesce(chunks),
    })
}

/// What the shell hands the session ([`Session::handle`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionInput {
    /// A new connection is up: start the handshake with this fresh client nonce.
    Connected {
        /// Random per connection (the server's proof covers it).
        client_nonce: Nonce,
    },
    /// The connection is gone. Pending requests, locks and leases are kept for the next.
    Disconnected,
    /// A request that expects an answer; it gets id [`Session::next_request_id`]. Sent
    /// now if the session is open, otherwise when it is (re-)established.
    Submit(ClientMsg),
    /// Nobody waits for the answer to this request any more (the caller gave up).
    /// Requests whose answers carry locks or leases are kept: the grant must be recorded
    /// and released even if nobody reads the data.
    Abandon(RequestId),
    /// A message the server does not answer (`NewSnapshotAck`). Dropped when not
    /// connected: a server that lost our connection no longer waits for it.
    Notify(ClientMsg),
    /// A frame arrived from the server.
    Received(ServerFrame),
}

/// What the session asks its shell to do, or tells its owner ([`Session::poll_output`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Write this frame to the current connection.
    Send(ClientFrame),
    /// Frames on the current connection are sealed from now on: every frame sent after
    /// this is sealed with `keys.client_to_server`, and every frame received after the
    /// last one handled (the challenge) must be sealed with `keys.server_to_client`.
    SealFrames(SessionKeys),
    /// The answer to request `id` (submitted with [`SessionInput::Submit`]).
    Reply {
        /// The request's id.
        id: RequestId,
        /// The server's answer.
        msg: ServerMsg,
    },
    /// A notice from the server (`NewSnapshot`; on origin sessions also
    /// `RollbackStarting` and `RollbackDone`, after [`Session::rollback_running`] changed).
    Notice(ServerMsg),
    /// The session is (re-)established on this connection. Requests flow again.
    Established {
        /// Bytes per chunk of the volume.
        chunk_size: u32,
        /// The origin's size in chunks.
        origin_chunks: u64,
        /// The server's origin write lease (`Welcome::origin_lease_secs`).
        origin_lease_secs: u32,
        /// An online rollback runs (`Welcome::rollback`): origin reads ask first.
        rollback: bool,
    },
    /// The server refused the session for good (wrong key, protocol version): every
    /// pending request has failed with this reason, and reconnecting will not help.
    Refused {
        /// The server's error code.
        code: ErrorCode,
        /// The server's words.
        message: String,
    },
    /// The connection must be dropped (protocol violation by the server); reconnect.
    Drop {
        /// What the server did wrong.
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// No connection.
    Disconnected,
    /// Hello sent, waiting for the server's challenge. `hello`: what it said, less the
    /// server's nonce.
    AwaitChallenge { id: RequestId, hello: Handshake },
    /// Our proof sent, waiting for Welcome.
    AwaitWelcome { auth: RequestId },
    /// Session open; requests flow. `resend_done`: the id of our ResendDone, if unanswered.
    Open,
    /// Refused by the server; terminal.
    Refused,
}

/// A multiset of chunks (read locks or write leases), counted per chunk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkCounts(BTreeMap<u64, u32>);

impl ChunkCounts {
    fn add(&mut self, chunks: impl IntoIterator<Item = u64>) {
        for c in chunks {
            *self.0.entry(c).or_insert(0) += 1;
        }
    }

    fn remove(&mut self, chunks: impl IntoIterator<Item = u64>) {
        for c in chunks {
            if let Some(n) = self.0.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.0.remove(&c);
                }
            }
        }
    }

    /// How many in all (a chunk held twice counts twice).
    pub fn total(&self) -> u64 {
        self.0.values().map(|&n| u64::from(n)).sum()
    }

    /// The counts as ranges: a chunk held `n` times appears in `n` ranges, so the server
    /// re-creates exactly the same counts.
    fn as_locks(&self, snap: SnapId) -> Vec<HeldLock> {
        let mut out = Vec::new();
        let max = self.0.values().copied().max().unwrap_or(0);
        for layer in 1..=max {
            let chunks = self.0.iter().filter(|(_, &n)| n >= layer).map(|(&c, _)| c);
            out.extend(
                ChunkRange::coalesce(chunks)
                    .into_iter()
                    .map(|range| HeldLock { snap, range }),
            );
        }
        out
    }
}

fn chunks_of(ranges: &[ChunkRange]) -> impl Iterator<Item = u64> + '_ {
    ranges.iter().filter_map(|r| r.chunks()).flatten()
}

/// One client's metadata session with whichever server currently serves the volume.
#[derive(Debug)]
pub struct Session {
    client: ClientId,
    node: u32,
    /// Sent in every Hello: tells the server our reconnects from another client with the
    /// same id.
    incarnation: u64,
    kind: ClientKind,
    key: Vec<u8>,
    next_id: RequestId,
    phase: Phase,
    /// Whether a session was ever established (the next Hello says `resuming`).
    had_session: bool,
    /// Requests not answered yet, in submission order (resent in this order).
    pending: BTreeMap<RequestId, ClientMsg>,
    /// Read locks granted by `SnapshotReadOk` and not yet released by `FinishSnapshotReadOk`.
    locks: ChunkCounts,
    /// Write leases granted by `SnapshotWriteOk`, not yet released.
    leases: ChunkCounts,
    /// Ids of our UploadLocks / ResendDone on the current connection (answers expected).
    internal: BTreeMap<RequestId, &'static str>,
    /// Requests resent after a reconnect and not answered yet: the first send may have
    /// been carried out.
    resent: BTreeSet<RequestId>,
    /// What the shell has not taken yet ([`Session::poll_output`]).
    outputs: VecDeque<Output>,
    /// An online rollback runs, as the server last said (`Welcome`, `RollbackStarting`,
    /// `RollbackDone`).
    rollback: bool,
}

impl Session {
    /// A session for connection identity `client` (its kind says what it is for);
    /// `incarnation` is random per client process.
    pub fn new(client: ClientId, node: u32, incarnation: u64, key: Vec<u8>) -> Session {
        Session {
            client,
            node,
            incarnation,
            kind: client.kind,
            key,
            next_id: 1,
            phase: Phase::Disconnected,
            had_session: false,
            pending: BTreeMap::new(),
            locks: ChunkCounts::default(),
            leases: ChunkCounts::default(),
            internal: BTreeMap::new(),
            resent: BTreeSet::new(),
            outputs: VecDeque::new(),
            rollback: false,
        }
    }

    /// Takes one input; what it asks for comes out of [`Session::poll_output`].
    pub fn handle(&mut self, input: SessionInput) {
        let out = match input {
            SessionInput::Connected { client_nonce } => self.connected(client_nonce),
            SessionInput::Disconnected => {
                self.disconnected();
                Vec::new()
            }
            SessionInput::Submit(msg) => self.submit(msg),
            SessionInput::Abandon(id) => {
                self.abandon(id);
                Vec::new()
            }
            SessionInput::Notify(msg) => self.notify(msg),
            SessionInput::Received(frame) => self.received(frame),
        };
        self.outputs.extend(out);
    }

    /// The next thing the shell must do or deliver, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Every output waiting, in order.
    pub fn drain_outputs(&mut self) -> Vec<Output> {
        self.outputs.drain(..).collect()
    }

    /// The id the next [`SessionInput::Submit`] gets (its reply carries it).
    pub fn next_request_id(&self) -> RequestId {
        self.next_id
    }

    /// What the session is for (origin, a snapshot, admin).
    pub fn kind(&self) -> ClientKind {
        self.kind
    }

    /// Whether the session is established (requests flow).
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Whether the server refused the session for good.
    pub fn is_refused(&self) -> bool {
        self.phase == Phase::Refused
    }

    /// Whether an online rollback runs, as the server last said: origin reads must ask
    /// (`QueryOriginRead`) while it does.
    pub fn rollback_running(&self) -> bool {
        self.rollback
    }

    /// Requests submitted and not answered yet.
    pub fn unanswered(&self) -> usize {
        self.pending.len()
    }

    /// Read locks currently held (counted per chunk).
    pub fn held_locks(&self) -> &ChunkCounts {
        &self.locks
    }

    /// Write leases currently held.
    pub fn held_leases(&self) -> &ChunkCounts {
        &self.leases
    }

    fn take_id(&mut self) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn connected(&mut self, client_nonce: Nonce) -> Vec<Output> {
        if self.phase == Phase::Refused {
            return Vec::new();
        }
        self.internal.clear();
        let id = self.take_id();
        self.phase = Phase::AwaitChallenge {
            id,
            hello: Handshake {
                protocol_version: u32::from(PROTOCOL_VERSION),
                client: self.client,
                node: self.node,
                incarnation: self.incarnation,
                resuming: self.had_session,
                client_nonce,
                server_nonce: [0; 32],
            },
        };
        vec![Output::Send(ClientFrame {
            id,
            msg: ClientMsg::Hello {
                protocol_version: u32::from(PROTOCOL_VERSION),
                client: self.client,
                node: self.node,
                incarnation: self.incarnation,
                client_nonce,
                resuming: self.had_session,
            },
        })]
    }

    fn disconnected(&mut self) {
        if self.phase != Phase::Refused {
            self.phase = Phase::Disconnected;
        }
        self.internal.clear();
    }

    fn submit(&mut self, msg: ClientMsg) -> Vec<Output> {
        let id = self.take_id();
        if self.phase == Phase::Refused {
            return vec![Output::Reply {
                id,
                msg: ServerMsg::Error {
                    code: ErrorCode::AuthFailed,
                    message: "the server refused this client's session".into(),
                },
            }];
        }
        self.pending.insert(id, msg.clone());
        if self.phase == Phase::Open {
            vec![Output::Send(ClientFrame { id, msg })]
        } else {
            Vec::new()
        }
    }

    fn abandon(&mut self, id: RequestId) {
        if let Some(ClientMsg::QueryWrite { .. }) = self.pending.get(&id) {
            self.pending.remove(&id);
            self.resent.remove(&id);
        }
    }

    fn notify(&mut self, msg: ClientMsg) -> Vec<Output> {
        if self.phase != Phase::Open {
            return Vec::new();
        }
        let id = self.take_id();
        vec![Output::Send(ClientFrame { id, msg })]
    }

    fn received(&mut self, frame: ServerFrame) -> Vec<Output> {
        let ServerFrame { reply_to, msg } = frame;
        let Some(id) = reply_to else {
            return match msg {
                ServerMsg::NewSnapshot { .. } => vec![Output::Notice(msg)],
                ServerMsg::RollbackStarting { .. } | ServerMsg::RollbackDone { .. }
                    if self.kind == ClientKind::Origin && self.phase == Phase::Open =>
                {
                    self.rollback = matches!(msg, ServerMsg::RollbackStarting { .. });
                    vec![Output::Notice(msg)]
                }
                other => vec![Output::Drop {
                    reason: format!("unexpected notice from the server: {other:?}"),
                }],
            };
        };
        match self.phase.clone() {
            Phase::AwaitChallenge {
                id: hello,
                hello: handshake,
            } if id == hello => self.on_challenge(msg, handshake),
            Phase::AwaitWelcome { auth } if id == auth => self.on_welcome(msg),
            Phase::Open => {
                if let Some(what) = self.internal.remove(&id) {
                    return match msg {
                        ServerMsg::UploadLocksOk | ServerMsg::ResendDoneOk => Vec::new(),
                        ServerMsg::Error { code, message } => vec![Output::Drop {
                            reason: format!("server rejected {what}: {code}: {message}"),
                        }],
                        other => vec![Output::Drop {
                            reason: format!("unexpected answer to {what}: {other:?}"),
                        }],
                    };
                }
                self.on_reply(id, msg)
            }
            Phase::Disconnected | Phase::Refused => Vec::new(),
            _ => vec![Output::Drop {
                reason: format!("unexpected frame during the handshake (reply to {id}): {msg:?}"),
            }],
        }
    }

    fn on_challenge(&mut self, msg: ServerMsg, hello: Handshake) -> Vec<Output> {
        match msg {
            ServerMsg::Challenge {
                server_nonce,
                proof,
            } => {
                let handshake = Handshake {
                    server_nonce,
                    ..hello
                };
                if !auth::verify_server_proof(&self.key, &handshake, &proof) {
                    return self.refuse(
                        ErrorCode::AuthFailed,
                        "the server's proof of the cluster key did not verify (different key?)"
                            .into(),
                    );
                }
                let proof = auth::client_proof(&self.key, &handshake);
                let auth = self.take_id();
                self.phase = Phase::AwaitWelcome { auth };
                vec![
                    Output::Send(ClientFrame {
                        id: auth,
                        msg: ClientMsg::AuthResponse { proof },
                    }),
                    Output::SealFrames(auth::session_keys(&self.key, &handshake)),
                ]
            }
            ServerMsg::Error { code, message } => self.refuse(code, message),
            other => vec![Output::Drop {
                reason: format!("expected Challenge, got {other:?}"),
            }],
        }
    }

    fn on_welcome(&mut self, msg: ServerMsg) -> Vec<Output> {
        match msg {
            ServerMsg::Welcome {
                chunk_size,
                origin_chunks,
                origin_lease_secs,
                rollback,
                ..
            } => {
                let resuming = self.had_session;
                self.had_session = true;
                self.phase = Phase::Open;
                self.rollback = rollback;
                let mut out = vec![Output::Established {
                    chunk_size,
                    origin_chunks,
                    origin_lease_secs,
                    rollback,
                }];
                if !resuming {
                    // A first session holds nothing; requests submitted meanwhile go now.
                    out.extend(self.pending.iter().map(|(&id, msg)| {
                        Output::Send(ClientFrame {
                            id,
                            msg: msg.clone(),
                        })
                    }));
                    return out;
                }
                if let ClientKind::Snapshot { snap } = self.kind {
                    let id = self.take_id();
                    self.internal.insert(id, "UploadLocks");
                    out.push(Output::Send(ClientFrame {
                        id,
                        msg: ClientMsg::UploadLocks {
                            locks: self.locks.as_locks(snap),
                            leases: self.leases.as_locks(snap),
                        },
                    }));
                }
                self.resent.extend(self.pending.keys().copied());
                out.extend(self.pending.iter().map(|(&id, msg)| {
                    Output::Send(ClientFrame {
                        id,
                        msg: msg.clone(),
                    })
                }));
                let id = self.take_id();
                self.internal.insert(id, "ResendDone");
                out.push(Output::Send(ClientFrame {
                    id,
                    msg: ClientMsg::ResendDone,
                }));
                out
            }
            ServerMsg::Error { code, message } => self.refuse(code, message),
            other => vec![Output::Drop {
                reason: format!("expected Welcome, got {other:?}"),
            }],
        }
    }

    fn refuse(&mut self, code: ErrorCode, message: String) -> Vec<Output> {
        self.phase = Phase::Refused;
        self.resent.clear();
        let mut out: Vec<Output> = std::mem::take(&mut self.pending)
            .into_keys()
            .map(|id| Output::Reply {
                id,
                msg: ServerMsg::Error {
                    code,
                    message: message.clone(),
                },
            })
            .collect();
        out.push(Output::Refused { code, message });
        out
    }

    fn on_reply(&mut self, id: RequestId, msg: ServerMsg) -> Vec<Output> {
        let Some(request) = self.pending.remove(&id) else {
            // An answer to a request resent after a reconnect that the old server had
            // answered too late, or to an abandoned one: nobody waits for it.
            return Vec::new();
        };
        let resent = self.resent.remove(&id);
        match (&request, &msg) {
            // The first send deleted it (its answer was lost with the connection), or
            // someone else did: either way it is gone, as asked. (Deletes name an id, so
            // the resend cannot have hit another snapshot.)
            (
                ClientMsg::DeleteSnapshot { snap },
                ServerMsg::Error {
                    code: ErrorCode::NoSuchSnapshot,
                    ..
                },
            ) if resent => {
                return vec![Output::Reply {
                    id,
                    msg: ServerMsg::SnapshotDeleted { snap: *snap },
                }];
            }
            (
                ClientMsg::QuerySnapshotRead { .. },
                ServerMsg::SnapshotReadOk { origin_locked, .. },
            ) => {
                self.locks.add(chunks_of(origin_locked));
            }
            (ClientMsg::FinishSnapshotRead { ranges, .. }, ServerMsg::FinishSnapshotReadOk) => {
                self.locks.remove(chunks_of(ranges));
            }
            // The server no longer knows these locks (it restarted and they expired):
            // they are gone either way.
            (
                ClientMsg::FinishSnapshotRead { ranges, .. },
                ServerMsg::Error {
                    code: ErrorCode::NotLocked,
                    ..
                },
            ) => {
                self.locks.remove(chunks_of(ranges));
            }
            (ClientMsg::SnapshotWrite { .. }, ServerMsg::SnapshotWriteOk { addrs }) => {
                self.leases.add(addrs.iter().map(|a| a.chunk));
            }
            (ClientMsg::FinishSnapshotWrite { ranges, .. }, ServerMsg::FinishSnapshotWriteOk)
            | (
                ClientMsg::FinishSnapshotWrite { ranges, .. },
                ServerMsg::Error {
                    code: ErrorCode::NotLocked,
                    ..
                },
            ) => {
                self.leases.remove(chunks_of(ranges));
            }
            _ => {}
        }
        vec![Output::Reply { id, msg }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(s: &mut Session, client_nonce: Nonce) -> Vec<Output> {
        s.handle(SessionInput::Connected { client_nonce });
        s.drain_outputs()
    }

    fn receive(s: &mut Session, frame: ServerFrame) -> Vec<Output> {
        s.handle(SessionInput::Received(frame));
        s.drain_outputs()
    }

    fn notify(s: &mut Session, msg: ClientMsg) -> Vec<Output> {
        s.handle(SessionInput::Notify(msg));
        s.drain_outputs()
    }

    fn submit(s: &mut Session, msg: ClientMsg) -> (RequestId, Vec<Output>) {
        let id = s.next_request_id();
        s.handle(SessionInput::Submit(msg));
        (id, s.drain_outputs())
    }
    use csnap_proto::StoreAddr;

    const KEY: &[u8] = b"test key";

    fn sent(out: &[Output]) -> Vec<ClientFrame> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(f) => Some(f.clone()),
                _ => None,
            })
            .collect()
    }

    /// Plays the server side of the handshake; returns what the session sent after Welcome.
    fn handshake(s: &mut Session, key: &[u8]) -> Vec<Output> {
        handshake_saying(s, key, false)
    }

    /// The handshake, with a Welcome that says whether a rollback runs.
    fn handshake_saying(s: &mut Session, key: &[u8], rollback: bool) -> Vec<Output> {
        let cn = [1u8; 32];
        let sn = [2u8; 32];
        let out = connect(s, cn);
        let hello = sent(&out).remove(0);
        let handshake = match hello.msg {
            ClientMsg::Hello {
                protocol_version,
                client,
                node,
                incarnation,
                client_nonce,
                resuming,
            } => Handshake {
                protocol_version,
                client,
                node,
                incarnation,
                resuming,
                client_nonce,
                server_nonce: sn,
            },
            other => panic!("expected Hello, got {other:?}"),
        };
        assert_eq!(handshake.client_nonce, cn);
        let out = receive(
            s,
            ServerFrame {
                reply_to: Some(hello.id),
                msg: ServerMsg::Challenge {
                    server_nonce: sn,
                    proof: auth::server_proof(key, &handshake),
                },
            },
        );
        let Some(authf) = sent(&out).into_iter().next() else {
            return out;
        };
        match &authf.msg {
            ClientMsg::AuthResponse { proof } => {
                assert!(auth::verify_client_proof(key, &handshake, proof))
            }
            other => panic!("expected AuthResponse, got {other:?}"),
        }
        // The proof is followed by the switch to sealed frames, with this handshake's keys.
        assert_eq!(
            out.last(),
            Some(&Output::SealFrames(auth::session_keys(key, &handshake)))
        );
        receive(
            s,
            ServerFrame {
                reply_to: Some(authf.id),
                msg: ServerMsg::Welcome {
                    protocol_version: 1,
                    chunk_size: 4096,
                    origin_chunks: 100,
                    origin_lease_secs: 10,
                    rollback,
                },
            },
        )
    }

    #[test]
    fn requests_queue_until_the_session_opens_then_flow() {
        let mut s = Session::new(ClientId::new(9, ClientKind::Origin), 1, 99, KEY.to_vec());
        let (id, out) = submit(
            &mut s,
            ClientMsg::QueryWrite {
                ranges: vec![ChunkRange::new(3, 2)],
            },
        );
        assert!(out.is_empty(), "nothing is sent before the handshake");
        let out = handshake(&mut s, KEY);
        assert!(matches!(
            out[0],
            Output::Established {
                chunk_size: 4096,
                ..
            }
        ));
        let frames = sent(&out);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].id, id);
        let out = receive(
            &mut s,
            ServerFrame {
                reply_to: Some(id),
                msg: ServerMsg::OriginWriteOk {
                    ranges: vec![ChunkRange::new(3, 2)],
                    unique: true,
                },
            },
        );
        assert!(matches!(out[0], Output::Reply { id: rid, .. } if rid == id));
        assert_eq!(s.unanswered(), 0);
    }

    #[test]
    fn an_impostor_without_the_key_is_refused_and_pending_requests_fail() {
        let mut s = Session::new(ClientId::new(9, ClientKind::Origin), 1, 99, KEY.to_vec());
        let (id, _) = submit(
            &mut s,
            ClientMsg::QueryWrite {
                ranges: vec![ChunkRange::new(0, 1)],
            },
        );
        let out = handshake(&mut s, b"other key");
        assert!(sent(&out).is_empty(), "no proof is sent to an impostor");
        assert!(out.iter().any(|o| matches!(o, Output::Reply { id: r, msg: ServerMsg::Error { code: ErrorCode::AuthFailed, .. } } if *r == id)));
        assert!(out.iter().any(|o| matches!(o, Output::Refused { .. })));
        assert!(s.is_refused());
        assert!(
            connect(&mut s, [0; 32],).is_empty(),
            "a refused session stays refused"
        );
    }

    #[test]
    fn reconnect_uploads_locks_and_leases_resends_unanswered_then_resend_done() {
        let snap = SnapId(4);
        let mut s = Session::new(
            ClientId::new(5, ClientKind::Snapshot { snap }),
            2,
            99,
            KEY.to_vec(),
        );
        handshake(&mut s, KEY);
        // A read that got origin locks on chunks 10..12, twice on chunk 11.
        let (r1, out) = submit(
            &mut s,
            ClientMsg::QuerySnapshotRead {
                snap,
                ranges: vec![ChunkRange::new(10, 2)],
            },
        );
        assert_eq!(sent(&out).len(), 1);
        receive(
            &mut s,
            ServerFrame {
                reply_to: Some(r1),
                msg: ServerMsg::SnapshotReadOk {
                    store: vec![],
                    origin_locked: vec![ChunkRange::new(10, 2)],
                },
            },
        );
        let (r2, _) = submit(
            &mut s,
            ClientMsg::QuerySnapshotRead {
                snap,
                ranges: vec![ChunkRange::new(11, 1)],
            },
        );
        receive(
            &mut s,
            ServerFrame {
                reply_to: Some(r2),
                msg: ServerMsg::SnapshotReadOk {
                    store: vec![],
                    origin_locked: vec![ChunkRange::new(11, 1)],
                },
            },
        );
        // A write lease on chunk 20.
        let (w1, _) = submit(
            &mut s,
            ClientMsg::SnapshotWrite {
                snap,
                ranges: vec![ChunkRange::new(20, 1)],
            },
        );
        receive(
            &mut s,
            ServerFrame {
                reply_to: Some(w1),
                msg: ServerMsg::SnapshotWriteOk {
                    addrs: vec![StoreAddr {
                        chunk: 20,
                        store_chunk: 77,
                    }],
                },
            },
        );
        // Release of chunk 10 sent but not answered; another read unanswered.
        let (f1, _) = submit(
            &mut s,
            ClientMsg::FinishSnapshotRead {
                snap,
                ranges: vec![ChunkRange::new(10, 1)],
            },
        );
        let (r3, _) = submit(
            &mut s,
            ClientMsg::QuerySnapshotRead {
                snap,
                ranges: vec![ChunkRange::new(30, 1)],
            },
        );
        assert_eq!(s.held_locks().total(), 3);
        assert_eq!(s.held_leases().total(), 1);

        s.handle(SessionInput::Disconnected);
        let (r4, out) = submit(
            &mut s,
            ClientMsg::QuerySnapshotRead {
                snap,
                ranges: vec![ChunkRange::new(40, 1)],
            },
        );
        assert!(out.is_empty(), "queued while disconnected");
        let out = connect(&mut s, [7; 32]);
        assert!(matches!(
            sent(&out)[0].msg,
            ClientMsg::Hello { resuming: true, .. }
        ));
        s.handle(SessionInput::Disconnected);
        let out = handshake(&mut s, KEY);
        let frames = sent(&out);
        let ClientMsg::UploadLocks { locks, leases } = &frames[0].msg else {
            panic!("expected UploadLocks first, got {:?}", frames[0]);
        };
        let mut lock_chunks: Vec<u64> =
            chunks_of(&locks.iter().map(|l| l.range).collect::<Vec<_>>()).collect();
        lock_chunks.sort();
        assert_eq!(lock_chunks, vec![10, 11, 11]);
        assert_eq!(
            leases,
            &vec![HeldLock {
                snap,
                range: ChunkRange::new(20, 1)
            }]
        );
        let resent: Vec<RequestId> = frames[1..frames.len() - 1].iter().map(|f| f.id).collect();
        assert_eq!(
            resent,
            vec![f1, r3, r4],
            "unanswered requests resent in order, same ids"
        );
        assert_eq!(frames.last().map(|f| &f.msg), Some(&ClientMsg::ResendDone));
        let upload_id = frames[0].id;
        let done_id = frames.last().map(|f| f.id).unwrap();
        assert!(s
            .received(ServerFrame {
                reply_to: Some(upload_id),
                msg: ServerMsg::UploadLocksOk
            })
            .is_empty());
        assert!(s
            .received(ServerFrame {
                reply_to: Some(done_id),
                msg: ServerMsg::ResendDoneOk
            })
            .is_empty());
        // The resent release is answered: the lock is gone, exactly once.
        receive(
            &mut s,
            ServerFrame {
                reply_to: Some(f1),
                msg: ServerMsg::FinishSnapshotReadOk,
            },
        );
        assert_eq!(s.held_locks().total(), 2);
        // A duplicate late answer changes nothing.
        assert!(s
            .received(ServerFrame {
                reply_to: Some(f1),
                msg: ServerMsg::FinishSnapshotReadOk,
            })
            .is_empty());
        assert_eq!(s.held_locks().total(), 2);
    }

    /// Admin requests resent after a reconnect keep their content (the create its token,
    /// the delete its id); a resent delete answered `NoSuchSnapshot` was carried out by
    /// its first send (or the snapshot went otherwise): it is reported deleted. A first
    /// send answered `NoSuchSnapshot` stays an error.
    #[test]
    fn resent_admin_requests_keep_their_token_and_id() {
        let mut s = Session::new(ClientId::new(3, ClientKind::Admin), 1, 99, KEY.to_vec());
        handshake(&mut s, KEY);
        let create = ClientMsg::CreateSnapshot {
            name: "x".into(),
            token: 0x5eed,
        };
        let (c, _) = submit(&mut s, create.clone());
        let (d, _) = submit(&mut s, ClientMsg::DeleteSnapshot { snap: SnapId(7) });
        let (d2, _) = submit(&mut s, ClientMsg::DeleteSnapshot { snap: SnapId(8) });
        let out = receive(
            &mut s,
            ServerFrame {
                reply_to: Some(d2),
                msg: ServerMsg::Error {
                    code: ErrorCode::NoSuchSnapshot,
                    message: "no snapshot 8".into(),
                },
            },
        );
        assert!(matches!(
            out.as_slice(),
            [Output::Reply {
                msg: ServerMsg::Error { .. },
                ..
            }]
        ));
        s.handle(SessionInput::Disconnected);
        let frames = sent(&handshake(&mut s, KEY));
        assert_eq!(frames[0], ClientFrame { id: c, msg: create });
        assert_eq!(
            frames[1],
            ClientFrame {
                id: d,
                msg: ClientMsg::DeleteSnapshot { snap: SnapId(7) }
            }
        );
        let out = receive(
            &mut s,
            ServerFrame {
                reply_to: Some(d),
                msg: ServerMsg::Error {
                    code: ErrorCode::NoSuchSnapshot,
                    message: "no snapshot 7".into(),
                },
            },
        );
        assert_eq!(
            out,
            vec![Output::Reply {
                id: d,
                msg: ServerMsg::SnapshotDeleted { snap: SnapId(7) }
            }]
        );
    }

    #[test]
    fn new_snapshot_notices_are_passed_up_and_acks_are_not_queued_while_down() {
        let mut s = Session::new(ClientId::new(1, ClientKind::Origin), 1, 99, KEY.to_vec());
        handshake(&mut s, KEY);
        let out = receive(
            &mut s,
            ServerFrame {
                reply_to: None,
                msg: ServerMsg::NewSnapshot { snap: SnapId(3) },
            },
        );
        assert_eq!(
            out,
            vec![Output::Notice(ServerMsg::NewSnapshot { snap: SnapId(3) })]
        );
        assert_eq!(
            sent(&notify(
                &mut s,
                ClientMsg::NewSnapshotAck { snap: SnapId(3) }
            ))
            .len(),
            1
        );
        s.handle(SessionInput::Disconnected);
        assert!(s
            .notify(ClientMsg::NewSnapshotAck { snap: SnapId(3) })
            .is_empty());
        assert_eq!(s.unanswered(), 0);
    }

    fn notice(msg: ServerMsg) -> ServerFrame {
        ServerFrame {
            reply_to: None,
            msg,
        }
    }

    /// `RollbackStarting` and `RollbackDone` reach the origin client's shell as notices
    /// and switch whether origin reads ask; a `Welcome` says it again on every session,
    /// so a rollback that ended (or started) while the client was away is followed too.
    #[test]
    fn rollback_notices_and_welcome_say_whether_origin_reads_ask() {
        let mut s = Session::new(ClientId::new(1, ClientKind::Origin), 1, 99, KEY.to_vec());
        let out = handshake(&mut s, KEY);
        assert!(matches!(
            out[0],
            Output::Established {
                rollback: false,
                ..
            }
        ));
        assert!(!s.rollback_running());
        let starting = ServerMsg::RollbackStarting {
            source: SnapId(2),
            pin: SnapId(5),
        };
        assert_eq!(
            receive(&mut s, notice(starting.clone())),
            vec![Output::Notice(starting)]
        );
        assert!(s.rollback_running());
        // The acknowledgement is the snapshot one, naming the pin.
        let acks = sent(&notify(
            &mut s,
            ClientMsg::NewSnapshotAck { snap: SnapId(5) },
        ));
        assert_eq!(acks.len(), 1);
        assert_eq!(s.unanswered(), 0, "an acknowledgement expects no answer");

        // Lost the server; the new one finished the rollback meanwhile.
        s.handle(SessionInput::Disconnected);
        assert!(
            s.rollback_running(),
            "nothing changes until a server says so"
        );
        let out = handshake_saying(&mut s, KEY, false);
        assert!(matches!(
            out[0],
            Output::Established {
                rollback: false,
                ..
            }
        ));
        assert!(!s.rollback_running());

        // Away again, and a rollback started meanwhile: the Welcome says so.
        s.handle(SessionInput::Disconnected);
        let out = handshake_saying(&mut s, KEY, true);
        assert!(matches!(out[0], Output::Established { rollback: true, .. }));
        assert!(s.rollback_running());
        let done = ServerMsg::RollbackDone { source: SnapId(2) };
        assert_eq!(
            receive(&mut s, notice(done.clone())),
            vec![Output::Notice(done)]
        );
        assert!(!s.rollback_running());
    }

    /// The release after store reads: one message naming the snapshot (a snapshot read's,
    /// or the rollback source an `OriginReadOk` named), the chunks coalesced in order;
    /// nothing for no addresses or an answer that names no source (an older server).
    #[test]
    fn store_reads_are_released_under_the_snapshot_the_answer_named() {
        let addr = |chunk, store_chunk| StoreAddr { chunk, store_chunk };
        let store = [addr(7, 1), addr(3, 9), addr(4, 2), addr(9, 5)];
        assert_eq!(
            store_reads_release(Some(SnapId(2)), &store),
            Some(ClientMsg::ReleaseStoreReads {
                snap: SnapId(2),
                ranges: vec![
                    ChunkRange::new(3, 2),
                    ChunkRange::new(7, 1),
                    ChunkRange::new(9, 1)
                ],
            })
        );
        assert_eq!(store_reads_release(Some(SnapId(2)), &[]), None);
        assert_eq!(store_reads_release(None, &store), None);
    }

    /// An origin session sends the release of an `OriginReadOk`'s store reads as it is
    /// (no answer awaited, nothing kept), and drops it while disconnected: the server
    /// releases a lost connection's store reads itself (after the orphan grace time).
    #[test]
    fn an_origin_session_sends_store_read_releases_only_while_connected() {
        let mut s = Session::new(ClientId::new(1, ClientKind::Origin), 1, 99, KEY.to_vec());
        handshake_saying(&mut s, KEY, true);
        let (q, _) = submit(
            &mut s,
            ClientMsg::QueryOriginRead {
                ranges: vec![ChunkRange::new(4, 3)],
            },
        );
        let store = vec![StoreAddr {
            chunk: 5,
            store_chunk: 40,
        }];
        receive(
            &mut s,
            ServerFrame {
                reply_to: Some(q),
                msg: ServerMsg::OriginReadOk {
                    store: store.clone(),
                    source: Some(SnapId(2)),
                },
            },
        );
        let release = store_reads_release(Some(SnapId(2)), &store).expect("a release");
        let frames = sent(&notify(&mut s, release.clone()));
        assert!(
            matches!(frames.as_slice(), [f] if f.msg == release),
            "{frames:?}"
        );
        assert_eq!(s.unanswered(), 0, "no answer awaited");
        s.handle(SessionInput::Disconnected);
        assert!(notify(&mut s, release).is_empty(), "dropped while away");
        let frames = sent(&handshake_saying(&mut s, KEY, false));
        assert!(
            frames
                .iter()
                .all(|f| !matches!(f.msg, ClientMsg::ReleaseStoreReads { .. })),
            "not resent after the reconnect: {frames:?}"
        );
    }

    /// `QueryOriginRead` is an ordinary request: answered by its `OriginReadOk`, resent
    /// under its id after a reconnect; it holds no read lock (its store reads are released
    /// by the caller, see `store_reads_release`).
    #[test]
    fn origin_read_questions_are_answered_and_resent_like_any_request() {
        let mut s = Session::new(ClientId::new(1, ClientKind::Origin), 1, 99, KEY.to_vec());
        handshake_saying(&mut s, KEY, true);
        let ask = ClientMsg::QueryOriginRead {
            ranges: vec![ChunkRange::new(4, 3)],
        };
        let (q, out) = submit(&mut s, ask.clone());
        assert_eq!(
            sent(&out),
            vec![ClientFrame {
                id: q,
                msg: ask.clone()
            }]
        );
        s.handle(SessionInput::Disconnected);
        let frames = sent(&handshake_saying(&mut s, KEY, true));
        assert_eq!(
            frames[0],
            ClientFrame { id: q, msg: ask },
            "resent, same id"
        );
        let answer = ServerMsg::OriginReadOk {
            store: vec![StoreAddr {
                chunk: 5,
                store_chunk: 40,
            }],
            source: Some(SnapId(2)),
        };
        let out = receive(
            &mut s,
            ServerFrame {
                reply_to: Some(q),
                msg: answer.clone(),
            },
        );
        assert_eq!(out, vec![Output::Reply { id: q, msg: answer }]);
        assert_eq!(s.unanswered(), 0);
        assert_eq!(s.held_locks().total(), 0, "no read lock");
    }

    /// Rollback notices are for origin sessions: any other session that gets one drops
    /// the connection (the server is confused) instead of acting on it.
    #[test]
    fn a_rollback_notice_on_a_snapshot_or_admin_session_drops_the_connection() {
        for kind in [ClientKind::Admin, ClientKind::Snapshot { snap: SnapId(3) }] {
            let mut s = Session::new(ClientId::new(1, kind), 1, 99, KEY.to_vec());
            handshake(&mut s, KEY);
            for msg in [
                ServerMsg::RollbackStarting {
                    source: SnapId(2),
                    pin: SnapId(5),
                },
                ServerMsg::RollbackDone { source: SnapId(2) },
            ] {
                let out = receive(&mut s, notice(msg));
                assert!(
                    matches!(out.as_slice(), [Output::Drop { reason }] if reason.contains("unexpected notice")),
                    "{kind:?}: {out:?}"
                );
                assert!(!s.rollback_running());
            }
        }
    }

    #[test]
    fn locks_as_ranges_keep_multiplicity() {
        let mut c = ChunkCounts::default();
        c.add([1, 2, 3, 2, 7]);
        let locks = c.as_locks(SnapId(1));
        let ranges: Vec<ChunkRange> = locks.iter().map(|l| l.range).collect();
        assert_eq!(
            ranges,
            vec![
                ChunkRange::new(1, 3),
                ChunkRange::new(7, 1),
                ChunkRange::new(2, 1)
            ]
        );
        c.remove([2, 2, 9]);
        assert_eq!(c.total(), 3);
    }
}
