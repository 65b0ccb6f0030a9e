//! Power cuts under the whole stack: the real server engine and store, the real chunk-copy
//! data path of the server (`net::DataPath`), and the real client library pieces (the
//! sans-IO `Session` of each metadata connection, the origin client's `OriginTracker`
//! with its unique-chunk promises and write epochs, the `Devices` data path with its FUA
//! and flush, and `snapshot_read_runs`), all doing their I/O against a model of two
//! devices (origin and store) with volatile write caches.
//!
//! # The harness
//!
//! Deterministic and single-threaded, in the style of TigerBeetle's simulator: one seeded
//! RNG chooses every step (deliver the next frame of some connection in either direction,
//! run one pending chunk copy, run the commit the engine asked for, start an application
//! write, carry out a granted origin write, flush, ack a `NewSnapshot` once the client's
//! older writes drained, create a snapshot, start or finish a snapshot read, tick), so a
//! seed replays a run exactly.
//!
//! Each server start picks how it commits: inline, or as the tokio driver does (finished
//! copies held in the driver's own `HeldCopies` until a flush of the store covers them,
//! the commit begun, its journal I/O run and the commit finished as three separate steps
//! with anything in between; a commit whose copies were all covered skips its first
//! flush). So power cuts land inside pipelined commits and after commits that relied on
//! an earlier flush for the data they point at. The test prints its seed; `CSNAP_SEED=<seed>` replays the
//! whole test and `CSNAP_POWERCUT_SEED=<seed>` one schedule (each failure names it).
//! `CSNAP_POWERCUT_SCHEDULES=<n>` multiplies the schedules of each scenario (soak).
//!
//! Each schedule runs several epochs. An epoch ends in a power cut: at a random device
//! operation (a write or flush on either device: mid-copy, mid-commit, mid-announcement of
//! a snapshot) or at the end of the epoch's steps. Then:
//!
//! * the devices come back with a random subset of their unflushed writes, per 512-byte
//!   sector: a sector written since its last flush holds its durable contents or any
//!   version written since (any subset, so multi-sector writes tear), or per write (a
//!   later write may survive an earlier one; sometimes exactly the newest writes do);
//!   half the cuts land on a flush, where the most is unflushed;
//! * the server (engine, store, copies in flight) and every connection are gone; each
//!   client either restarts (new identity, its operations failed) or survives and
//!   reconnects to the new server (resuming its session: resent requests, uploaded read
//!   locks); its operations that held a grant fail (the device lost power under them);
//! * the store is reopened (journal replay; sometimes the power fails again during
//!   recovery), checked, compared with the reference model below, and a new engine serves
//!   the survivors (the activation gate lists the surviving snapshot clients).
//!
//! # The rules checked
//!
//! Origin sectors: the reference keeps, per 512-byte sector, the versions written to it in
//! order, each marked *promised* once the library promised its durability to the
//! application: a write with FUA when it completes, or every write a client completed
//! before a flush of that client that completed. After a power cut a sector must hold
//! the last promised version or a later one (never an older one, never garbage).
//!
//! Snapshots: the moment the store creates a snapshot (phase two of creation, after every
//! origin client acknowledged `NewSnapshot`) no origin write may be in flight (checked).
//! The snapshot's view is the origin as the devices showed it then. While no power cut
//! happened since, every snapshot read must return exactly that view. After a power cut,
//! every snapshot the recovered store lists must have been created by some server at such
//! a moment (it may be one whose creation was never reported: then it is a consistent
//! point in time of that moment), and each of its sectors must hold a version that the
//! origin could have shown after a power cut at that moment (the last version promised
//! then, or a later one written before it); never a version written after the creation.
//! Every snapshot whose creation was reported to the application (`SnapshotCreated`) must
//! be listed after recovery (live, or invalid when the store-full policy gave it up).
//!
//! Store full: invalid snapshots are always older than every live one (the policy gives up
//! the oldest first), and the recovered store passes the checker.
//!
//! # Scenarios
//!
//! `basic` (small origin, many short schedules), `deep` (a larger origin with many
//! copy-outs per epoch: exception leaves split, internal nodes, commits that batch many
//! copy-outs) and `metadata_full` (a 32-block metadata area driven full: the store-full
//! policy invalidates the oldest snapshots, then crashes and recovery). Each asserts that
//! it exercised what it is for (crashes that needed a journal replay, grown trees,
//! invalidations).

use csnap_blockdev::client::session::{Output, Session, SessionInput};
use csnap_blockdev::client::{
    snapshot_read_runs, DataDevice, Devices, OriginTracker, Which, WriteGuard,
};
use csnap_proto::{
    ChunkRange, ClientFrame, ClientId, ClientKind, ClientMsg, ErrorCode, RequestId, ServerFrame,
    ServerMsg, SnapId,
};
use csnap_server::engine::{Action, CommitIo, ConnId, Engine, EngineConfig, Event};
use csnap_server::net::{DataPath, HeldCopies};
use csnap_server::store::{
    BlockDevice, ChunkSource, FlushTracked, FormatOptions, Geometry, OpenOptions, SnapState, Store,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const SECT: u64 = 512;
const CHUNK: u64 = 4096;
const SECTS_PER_CHUNK: u64 = CHUNK / SECT;
const KEY: &[u8] = b"powercut test cluster key";

// ---------------------------------------------------------------------------------------
// The device model.

/// One device: what survives a power cut, and per sector the versions written since its
/// last flush (the last one is what reads see), each with the write operation it came from.
struct DiskState {
    durable: Vec<u8>,
    cached: BTreeMap<u64, Vec<Version>>,
}

/// One unflushed version of a sector: (the write operation's number, the contents).
type Version = (u64, Box<[u8]>);

/// Both devices, on one power supply.
struct Rack {
    disks: Vec<DiskState>,
    /// Writes and flushes (on either device) left before the power fails.
    ops_left: Option<u64>,
    /// Or: flushes left; the power fails at the next one (a cut just before a flush
    /// loses the most).
    flushes_left: Option<u64>,
    off: bool,
    ops: u64,
    flushes: u64,
}

/// A handle on one device of a rack. Implements the server's `BlockDevice` and the
/// client's `DataDevice`.
#[derive(Clone)]
struct Disk {
    rack: Arc<Mutex<Rack>>,
    idx: usize,
    len: u64,
    name: &'static str,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "model device {}", self.name)
    }
}

fn power_lost() -> io::Error {
    io::Error::other("power cut (model)")
}

impl Rack {
    fn spend(&mut self, flush: bool) -> io::Result<()> {
        if self.off {
            return Err(power_lost());
        }
        if let (true, Some(left)) = (flush, self.flushes_left.as_mut()) {
            if *left == 0 {
                self.off = true;
                return Err(power_lost());
            }
            *left -= 1;
        }
        if let Some(left) = self.ops_left.as_mut() {
            if *left == 0 {
                self.off = true;
                return Err(power_lost());
            }
            *left -= 1;
        }
        self.ops += 1;
        Ok(())
    }
}

impl Disk {
    fn lock(&self) -> MutexGuard<'_, Rack> {
        self.rack.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, len: usize, offset: u64) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes at {offset} beyond {} ({})",
                    self.len, self.name
                ),
            )),
        }
    }

    fn do_read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(buf.len(), offset)?;
        let rack = self.lock();
        if rack.off {
            return Err(power_lost());
        }
        let d = &rack.disks[self.idx];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let sector = pos / SECT;
            let within = (pos % SECT) as usize;
            let n = (SECT as usize - within).min(buf.len() - done);
            match d.cached.get(&sector).and_then(|v| v.last()) {
                Some((_, data)) => buf[done..done + n].copy_from_slice(&data[within..within + n]),
                None => buf[done..done + n].copy_from_slice(&d.durable[pos as usize..][..n]),
            }
            done += n;
        }
        Ok(())
    }

    fn do_write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(buf.len(), offset)?;
        let mut rack = self.lock();
        rack.spend(false)?;
        let op = rack.ops;
        let d = &mut rack.disks[self.idx];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let sector = pos / SECT;
            let within = (pos % SECT) as usize;
            let n = (SECT as usize - within).min(buf.len() - done);
            let base = (sector * SECT) as usize;
            let mut data: Box<[u8]> = match d.cached.get(&sector).and_then(|v| v.last()) {
                Some((_, v)) => v.clone(),
                None => d.durable[base..base + SECT as usize].into(),
            };
            data[within..within + n].copy_from_slice(&buf[done..done + n]);
            d.cached.entry(sector).or_default().push((op, data));
            done += n;
        }
        Ok(())
    }

    fn do_flush(&self) -> io::Result<()> {
        let mut rack = self.lock();
        rack.spend(true)?;
        rack.flushes += 1;
        let d = &mut rack.disks[self.idx];
        for (sector, versions) in std::mem::take(&mut d.cached) {
            if let Some((_, last)) = versions.last() {
                let base = (sector * SECT) as usize;
                d.durable[base..base + SECT as usize].copy_from_slice(last);
            }
        }
        Ok(())
    }
}

impl BlockDevice for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.do_read(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.do_write(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.do_flush()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn name(&self) -> String {
        self.name.to_owned()
    }
}

impl DataDevice for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.do_read(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.do_write(data, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.do_flush()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn name(&self) -> String {
        self.name.to_owned()
    }
}

/// The two devices: origin (index 0) and store (index 1).
struct Devs {
    rack: Arc<Mutex<Rack>>,
    origin: Disk,
    store: Disk,
}

impl Devs {
    fn from_images(origin: Vec<u8>, store: Vec<u8>) -> Devs {
        let (olen, slen) = (origin.len() as u64, store.len() as u64);
        let rack = Arc::new(Mutex::new(Rack {
            disks: vec![
                DiskState {
                    durable: origin,
                    cached: BTreeMap::new(),
                },
                DiskState {
                    durable: store,
                    cached: BTreeMap::new(),
                },
            ],
            ops_left: None,
            flushes_left: None,
            off: false,
            ops: 0,
            flushes: 0,
        }));
        let disk = |idx, len, name| Disk {
            rack: rack.clone(),
            idx,
            len,
            name,
        };
        Devs {
            origin: disk(0, olen, "origin"),
            store: disk(1, slen, "store"),
            rack,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Rack> {
        self.rack.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn powered_off(&self) -> bool {
        self.lock().off
    }

    fn cut_after(&self, ops: Option<u64>) {
        self.lock().ops_left = ops;
    }

    fn cut_at_flush(&self, flushes: u64) {
        self.lock().flushes_left = Some(flushes);
    }

    /// The devices after a power cut: per sector written since its last flush, the
    /// durable contents or any version written since, chosen by `rng`. Either each sector
    /// on its own (torn writes), or each write operation as a whole reached the medium or
    /// did not (so that one write may survive while an earlier one is lost: the orderings
    /// a missing flush exposes). Returns fresh, powered devices.
    fn power_cut(&self, rng: &mut StdRng) -> Devs {
        let rack = self.lock();
        // How likely an unflushed sector (or write) is to have reached the medium.
        let keep = match rng.gen_range(0..5) {
            0 => 0.0,
            1 => 1.0,
            _ => rng.gen_range(0.0..1.0),
        };
        let per_write = rng.gen_bool(0.5);
        let mut kept_ops: BTreeMap<u64, bool> = BTreeMap::new();
        // Sometimes the device wrote back its newest writes first: every write after a
        // random one reached the medium, none before (what a missing ordering flush
        // between two writes exposes).
        if per_write && rng.gen_bool(0.5) {
            let ops: BTreeSet<u64> = rack
                .disks
                .iter()
                .flat_map(|d| d.cached.values().flatten().map(|(op, _)| *op))
                .collect();
            let from = ops.iter().nth(rng.gen_range(0..=ops.len())).copied();
            for op in ops {
                kept_ops.insert(op, from.is_some_and(|f| op >= f));
            }
        }
        let mut images = Vec::new();
        for d in &rack.disks {
            let mut image = d.durable.clone();
            for (sector, versions) in &d.cached {
                let chosen = if per_write {
                    // The latest version whose write reached the medium.
                    versions
                        .iter()
                        .rev()
                        .find(|(op, _)| *kept_ops.entry(*op).or_insert_with(|| rng.gen_bool(keep)))
                        .map(|(_, v)| v)
                } else if rng.gen_bool(keep) {
                    Some(&versions[rng.gen_range(0..versions.len())].1)
                } else {
                    None
                };
                if let Some(v) = chosen {
                    let base = (*sector * SECT) as usize;
                    image[base..base + SECT as usize].copy_from_slice(v);
                }
            }
            images.push(image);
        }
        drop(rack);
        let store = images.pop().unwrap_or_default();
        let origin = images.pop().unwrap_or_default();
        Devs::from_images(origin, store)
    }
}

// ---------------------------------------------------------------------------------------
// Sector contents: every sector the application writes carries its write's tag and its
// own sector number, so a torn, misplaced or stale sector is recognised.

fn sector_bytes(tag: u64, sector: u64) -> Vec<u8> {
    let mut b = vec![0u8; SECT as usize];
    b[..8].copy_from_slice(&tag.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    let check = tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sector ^ 0x5eed;
    b[16..24].copy_from_slice(&check.to_le_bytes());
    let fill = (tag.wrapping_mul(31) ^ sector) as u8;
    for x in &mut b[24..] {
        *x = fill;
    }
    b
}

/// The tag in a sector that should be origin sector `sector`, or why it is not one.
fn decode(buf: &[u8], sector: u64) -> Result<u64, String> {
    let word = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    let tag = word(0);
    if buf == sector_bytes(tag, sector).as_slice() {
        return Ok(tag);
    }
    Err(format!(
        "garbage (tag field {tag}, sector field {}, first bytes {:02x?})",
        word(1),
        &buf[..24]
    ))
}

// ---------------------------------------------------------------------------------------
// The reference model.

/// Versions of one origin sector since the last power cut: (tag, promised durable).
#[derive(Clone, Debug)]
struct History(Vec<(u64, bool)>);

impl History {
    /// What a power cut now may leave: the last promised version and every later one.
    fn allowed(&self) -> Vec<u64> {
        let from = self.0.iter().rposition(|(_, p)| *p).unwrap_or(0);
        self.0[from..].iter().map(|(t, _)| *t).collect()
    }

    fn current(&self) -> u64 {
        self.0.last().map_or(0, |(t, _)| *t)
    }
}

/// A snapshot as the harness saw the store create it.
#[derive(Clone, Debug)]
struct SnapRecord {
    id: u64,
    /// Exactly what it must read while no power cut happened since `exact` was taken.
    exact: Vec<u64>,
    /// Per sector, what it may read after a power cut.
    allowed: Vec<Vec<u64>>,
    /// The application was told it exists.
    reported: bool,
}

// ---------------------------------------------------------------------------------------
// Clients.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Origin,
    Admin,
    Reader { snap: SnapId },
}

enum OpState {
    /// Waiting for the answer to this request.
    Asked(RequestId),
    /// Origin write: granted (or cached unique); the data write is next.
    Granted(#[allow(dead_code)] WriteGuard),
    /// Snapshot read: the server answered; the device reads are next.
    Located {
        store: Vec<csnap_proto::StoreAddr>,
        origin_locked: Vec<ChunkRange>,
    },
}

enum OpKind {
    Write {
        first_sector: u64,
        sectors: u64,
        fua: bool,
        tag: u64,
    },
    Create {
        name: String,
    },
    Read {
        offset: u64,
        len: u32,
    },
}

struct Op {
    kind: OpKind,
    state: OpState,
}

struct Client {
    role: Role,
    id: ClientId,
    session: Session,
    tracker: Option<Arc<OriginTracker>>,
    conn: Option<ConnId>,
    ops: Vec<Op>,
    /// `NewSnapshot` notices whose ack waits for the writes of older epochs to drain.
    acks: Vec<(u64, SnapId)>,
    /// Writes completed since this client's last flush: (tag, sectors).
    unflushed: Vec<(u64, u64, u64)>,
}

impl Client {
    fn new(role: Role, instance: u64, rng: &mut StdRng) -> Client {
        let kind = match role {
            Role::Origin => ClientKind::Origin,
            Role::Admin => ClientKind::Admin,
            Role::Reader { snap } => ClientKind::Snapshot { snap },
        };
        let id = ClientId::new(instance, kind);
        Client {
            role,
            id,
            session: Session::new(id, 1, rng.gen(), KEY.to_vec()),
            tracker: (role == Role::Origin).then(|| OriginTracker::new(1 << 16)),
            conn: None,
            ops: Vec::new(),
            acks: Vec::new(),
            unflushed: Vec::new(),
        }
    }
}

/// One connection's frames in flight, per direction (each direction in order).
#[derive(Default)]
struct Wire {
    up: VecDeque<ClientFrame>,
    down: VecDeque<ServerFrame>,
}

// ---------------------------------------------------------------------------------------
// Scenarios.

#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    origin_chunks: u64,
    /// Data chunks beyond the smallest store.
    extra_data_chunks: u64,
    /// A metadata area of exactly this many node blocks (else the default for the size).
    meta_blocks: Option<u64>,
    schedules: u64,
    epochs: u32,
    steps: u32,
    origin_clients: u32,
    readers: u32,
    /// Most sectors one application write covers.
    max_write_sectors: u64,
    /// Origin writes go to the first `hot_chunks` chunks half of the time.
    hot_chunks: u64,
    /// Relative weight of starting a snapshot creation.
    create_weight: u32,
    max_snapshots: usize,
    /// Every server commits the pipelined way, and the power often fails at a flush of a
    /// commit's journal I/O (with its blocks written, unflushed): where a copy the commit
    /// points at without flushing first must already be durable.
    cut_in_pipelined_commits: bool,
}

const BASIC: Scenario = Scenario {
    name: "basic",
    origin_chunks: 24,
    extra_data_chunks: 64,
    meta_blocks: None,
    schedules: 24,
    epochs: 4,
    steps: 400,
    origin_clients: 2,
    readers: 2,
    max_write_sectors: 20,
    hot_chunks: 6,
    create_weight: 3,
    max_snapshots: 12,
    cut_in_pipelined_commits: false,
};

/// `basic`, with every commit pipelined and the power cut inside commits.
const PIPELINED: Scenario = Scenario {
    name: "pipelined",
    schedules: 48,
    cut_in_pipelined_commits: true,
    ..BASIC
};

const DEEP: Scenario = Scenario {
    name: "deep",
    origin_chunks: 768,
    extra_data_chunks: 3000,
    meta_blocks: None,
    schedules: 3,
    epochs: 3,
    steps: 4000,
    origin_clients: 3,
    readers: 2,
    max_write_sectors: 16,
    hot_chunks: 16,
    create_weight: 1,
    max_snapshots: 16,
    cut_in_pipelined_commits: false,
};

const METADATA_FULL: Scenario = Scenario {
    name: "metadata_full",
    origin_chunks: 512,
    extra_data_chunks: 6000,
    meta_blocks: Some(32),
    schedules: 2,
    epochs: 3,
    steps: 9000,
    origin_clients: 2,
    readers: 1,
    max_write_sectors: 8,
    hot_chunks: 0,
    create_weight: 1,
    max_snapshots: 60,
    cut_in_pipelined_commits: false,
};

/// What a schedule exercised (summed over a scenario).
#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    power_cuts: u64,
    cuts_mid_operation: u64,
    replays: u64,
    recovery_cuts: u64,
    writes_acked: u64,
    snapshots_reported: u64,
    snapshots_unreported_survived: u64,
    snapshot_reads: u64,
    copies: u64,
    commits: u64,
    /// Pipelined commits whose copies a flush had covered, so they skipped their first.
    commits_data_stable: u64,
    invalidated: u64,
    invalidated_metadata_full: u64,
    device_ops: u64,
    max_node_blocks: u64,
    survivors: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.power_cuts += o.power_cuts;
        self.cuts_mid_operation += o.cuts_mid_operation;
        self.replays += o.replays;
        self.recovery_cuts += o.recovery_cuts;
        self.writes_acked += o.writes_acked;
        self.snapshots_reported += o.snapshots_reported;
        self.snapshots_unreported_survived += o.snapshots_unreported_survived;
        self.snapshot_reads += o.snapshot_reads;
        self.copies += o.copies;
        self.commits += o.commits;
        self.commits_data_stable += o.commits_data_stable;
        self.invalidated += o.invalidated;
        self.invalidated_metadata_full += o.invalidated_metadata_full;
        self.device_ops += o.device_ops;
        self.max_node_blocks = self.max_node_blocks.max(o.max_node_blocks);
        self.survivors += o.survivors;
    }
}

// ---------------------------------------------------------------------------------------
// The simulation.

struct Sim {
    sc: Scenario,
    seed: u64,
    rng: StdRng,
    devs: Devs,
    geometry: Geometry,
    engine: Option<Engine<Store>>,
    data: Option<DataPath>,
    now: u64,
    next_conn: ConnId,
    wires: BTreeMap<ConnId, Wire>,
    copies: Vec<(u64, csnap_server::engine::CopySource, u64)>,
    commit_due: bool,
    /// How this server commits: inline (`Engine::run_commit`, copies reported at once), or
    /// as the tokio driver does (copies held until a flush covers them, the journal I/O
    /// begun, run and finished as three separate steps, the first flush skipped when every
    /// copy the commit records was covered). Chosen at each server start.
    pipelined: bool,
    /// The store device as the pipelined server sees it, counting its flushes.
    store_flushes: Option<Arc<FlushTracked>>,
    held: HeldCopies<u64>,
    /// A begun commit: its I/O (None once run) and whether it flushes the data first.
    commit_io: Option<(Option<CommitIo>, bool)>,
    server_failed: Option<String>,
    clients: Vec<Client>,
    next_instance: u64,
    origin: Vec<History>,
    next_tag: u64,
    snaps: BTreeMap<String, SnapRecord>,
    names: u64,
    /// Store snapshot ids seen created by the current server.
    seen_ids: BTreeSet<u64>,
    epoch_step: u32,
    tally: Tally,
}

fn sectors(sc: &Scenario) -> u64 {
    sc.origin_chunks * SECTS_PER_CHUNK
}

impl Sim {
    fn new(sc: Scenario, seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = sectors(&sc);
        let mut origin_image = Vec::with_capacity((n * SECT) as usize);
        for s in 0..n {
            origin_image.extend_from_slice(&sector_bytes(0, s));
        }
        let store_len =
            Geometry::smallest_store(CHUNK).expect("geometry") + sc.extra_data_chunks * CHUNK;
        let devs = Devs::from_images(origin_image, vec![0u8; store_len as usize]);
        let opts = FormatOptions {
            chunk_size: CHUNK,
            origin_size: sc.origin_chunks * CHUNK,
            now: 1_700_000_000,
            uuid: Some([7; 16]),
        };
        let geometry = match sc.meta_blocks {
            Some(m) => Store::format_with_metadata_blocks(&devs.store, &opts, m),
            None => Store::format(&devs.store, &opts),
        }
        .expect("format")
        .geometry;
        let mut clients = Vec::new();
        let mut next_instance = 1;
        for _ in 0..sc.origin_clients {
            clients.push(Client::new(Role::Origin, next_instance, &mut rng));
            next_instance += 1;
        }
        clients.push(Client::new(Role::Admin, next_instance, &mut rng));
        next_instance += 1;
        let mut sim = Sim {
            sc,
            seed,
            rng,
            devs,
            geometry,
            engine: None,
            data: None,
            now: 1_700_000_100,
            next_conn: 1,
            wires: BTreeMap::new(),
            copies: Vec::new(),
            commit_due: false,
            pipelined: false,
            store_flushes: None,
            held: HeldCopies::default(),
            commit_io: None,
            server_failed: None,
            clients,
            next_instance,
            origin: (0..n).map(|_| History(vec![(0, true)])).collect(),
            next_tag: 1,
            snaps: BTreeMap::new(),
            names: 0,
            seen_ids: BTreeSet::new(),
            epoch_step: 0,
            tally: Tally::default(),
        };
        sim.start_server(Vec::new());
        sim
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "[scenario {} schedule seed {seed} (replay: CSNAP_POWERCUT_SEED={seed} CSNAP_POWERCUT_SCENARIO={})] {what}",
            self.sc.name,
            self.sc.name,
            seed = csnap_proto::testing::Seed(self.seed),
        )
    }

    fn engine(&mut self) -> &mut Engine<Store> {
        match self.engine.as_mut() {
            Some(e) => e,
            None => panic!("no server"),
        }
    }

    // ---- the server side ----

    fn start_server(&mut self, expected: Vec<ClientId>) {
        self.pipelined = self.sc.cut_in_pipelined_commits || self.rng.gen_bool(0.5);
        let flushes = Arc::new(FlushTracked::new(Arc::new(self.devs.store.clone())));
        let store_dev: Arc<dyn BlockDevice> = if self.pipelined {
            flushes.clone()
        } else {
            Arc::new(self.devs.store.clone())
        };
        self.store_flushes = Some(flushes);
        let store = match Store::open(store_dev.clone(), OpenOptions::default()) {
            Ok(s) => s,
            Err(e) => self.fail(format!("store does not open: {e}")),
        };
        self.geometry = *store.geometry();
        let cfg = EngineConfig {
            cluster_key: KEY.to_vec(),
            expected_snapshot_clients: expected,
            start_time: self.now,
            // Leases are not what this test is about: long enough never to run out.
            origin_lease_secs: 1_000_000,
            ..EngineConfig::default()
        };
        let engine = match Engine::new(store, cfg) {
            Ok(e) => e,
            Err(e) => self.fail(format!("engine does not start: {e}")),
        };
        self.data = Some(DataPath::new(
            Arc::new(self.devs.origin.clone()),
            store_dev,
            self.geometry,
        ));
        self.engine = Some(engine);
        self.seen_ids = self
            .engine()
            .store()
            .snapshots()
            .iter()
            .map(|r| r.id.0)
            .collect();
        self.pump();
    }

    /// Feeds one event to the engine and carries out its actions.
    fn handle(&mut self, event: Event) {
        if self.server_failed.is_some() {
            return;
        }
        self.engine().handle(event);
        self.pump();
    }

    fn pump(&mut self) {
        while let Some(action) = self.engine.as_mut().and_then(|e| e.poll_output()) {
            match action {
                Action::Send { conn, frame } => {
                    if let Some(w) = self.wires.get_mut(&conn) {
                        w.down.push_back(frame);
                    }
                }
                // Frames travel here as values: nothing to seal.
                Action::SealFrames { .. } => {}
                Action::Close { conn } => {
                    if self.wires.remove(&conn).is_some() {
                        self.fail(format!("the server closed connection {conn}"));
                    }
                }
                Action::Copy { copy, from, to, .. } => self.copies.push((copy, from, to)),
                Action::CopyToOrigin { chunk, .. } => self.fail(format!(
                    "copy back onto origin chunk {chunk}: this test starts no rollback"
                )),
                Action::Commit => self.commit_due = true,
                Action::Log { .. } => {}
                Action::Fatal { error } => {
                    let reason = csnap_server::engine::error_chain(&error);
                    if !self.devs.powered_off() {
                        self.fail(format!("server failed without a power cut: {reason}"));
                    }
                    self.server_failed = Some(reason);
                }
            }
        }
        self.note_creations();
    }

    /// Records every snapshot the store created since the last look (phase two of a
    /// creation happens inside `Engine::handle`).
    fn note_creations(&mut self) {
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        let new: Vec<(u64, String)> = engine
            .store()
            .snapshots()
            .into_iter()
            .filter(|r| !self.seen_ids.contains(&r.id.0))
            .map(|r| (r.id.0, r.name))
            .collect();
        for (id, name) in new {
            self.seen_ids.insert(id);
            // Nothing may be writing the origin now.
            for c in &self.clients {
                for op in &c.ops {
                    if matches!(op.state, OpState::Granted(_)) {
                        self.fail(format!(
                            "snapshot {id} ({name}) created while client {} holds an origin write grant",
                            c.id
                        ));
                    }
                }
            }
            let rec = SnapRecord {
                id,
                exact: self.origin.iter().map(History::current).collect(),
                allowed: self.origin.iter().map(History::allowed).collect(),
                reported: false,
            };
            self.snaps.insert(name, rec);
        }
        self.check_policy_order();
    }

    /// Invalid snapshots are all older than every live one.
    fn check_policy_order(&mut self) {
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        let rows = engine.store().snapshots();
        let oldest_live = rows
            .iter()
            .filter(|r| r.state == SnapState::Live)
            .map(|r| r.id)
            .min();
        let newest_invalid = rows
            .iter()
            .filter(|r| matches!(r.state, SnapState::Invalid { .. }))
            .map(|r| r.id)
            .max();
        if let (Some(l), Some(i)) = (oldest_live, newest_invalid) {
            if i > l {
                self.fail(format!(
                    "snapshot {i} was invalidated while the older snapshot {l} is live: {rows:?}"
                ));
            }
        }
    }

    // ---- the client side ----

    /// Carries out a client's session outputs (what `client::conn`'s shell does).
    fn outputs(&mut self, ci: usize, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send(frame) => {
                    if let Some(w) = self.clients[ci].conn.and_then(|c| self.wires.get_mut(&c)) {
                        w.up.push_back(frame);
                    }
                }
                Output::SealFrames(_) => {}
                Output::Reply { id, msg } => self.reply(ci, id, msg),
                Output::Notice(ServerMsg::NewSnapshot { snap }) => {
                    let c = &mut self.clients[ci];
                    match &c.tracker {
                        Some(t) => {
                            let epoch = t.invalidate();
                            c.acks.push((epoch, snap));
                        }
                        None => {
                            let out = {
                                c.session
                                    .handle(SessionInput::Notify(ClientMsg::NewSnapshotAck {
                                        snap,
                                    }));
                                c.session.drain_outputs()
                            };
                            self.outputs(ci, out);
                        }
                    }
                }
                Output::Notice(other) => self.fail(format!("unexpected notice {other:?}")),
                Output::Established { .. } => {
                    if let Some(t) = &self.clients[ci].tracker {
                        t.renew(Instant::now() + Duration::from_secs(24 * 3600));
                    }
                }
                Output::Refused { code, message } => {
                    self.fail(format!("client refused: {code}: {message}"))
                }
                Output::Drop { reason } => self.fail(format!(
                    "client {} dropped its connection: {reason}",
                    self.clients[ci].id
                )),
            }
        }
    }

    fn submit(&mut self, ci: usize, msg: ClientMsg) -> RequestId {
        let (id, out) = {
            let id = self.clients[ci].session.next_request_id();
            self.clients[ci].session.handle(SessionInput::Submit(msg));
            (id, self.clients[ci].session.drain_outputs())
        };
        self.outputs(ci, out);
        id
    }

    /// An answer reached a client.
    fn reply(&mut self, ci: usize, id: RequestId, msg: ServerMsg) {
        let Some(pos) = self.clients[ci]
            .ops
            .iter()
            .position(|o| matches!(o.state, OpState::Asked(r) if r == id))
        else {
            // Answers to releases the library sends on its own.
            return;
        };
        let op = self.clients[ci].ops.remove(pos);
        match (op.kind, msg) {
            (kind @ OpKind::Write { .. }, ServerMsg::OriginWriteOk { ranges, unique }) => {
                let Some(t) = self.clients[ci].tracker.clone() else {
                    self.fail("a grant for a client without a tracker".into());
                };
                t.renew(Instant::now() + Duration::from_secs(24 * 3600));
                let chunks = ranges.iter().filter_map(|r| r.chunks()).flatten();
                let guard = t.granted(chunks, unique);
                self.clients[ci].ops.push(Op {
                    kind,
                    state: OpState::Granted(guard),
                });
            }
            (OpKind::Create { name }, ServerMsg::SnapshotCreated { info }) => {
                match self.snaps.get_mut(&name) {
                    Some(rec) if rec.id == info.id.0 => rec.reported = true,
                    other => {
                        let other = format!("{other:?}");
                        self.fail(format!(
                            "snapshot {name} reported created as {:?}, but the store created {other}",
                            info.id
                        ))
                    }
                }
                self.tally.snapshots_reported += 1;
            }
            (
                OpKind::Create { .. },
                ServerMsg::Error {
                    code: ErrorCode::StoreFull,
                    ..
                },
            ) => {}
            (
                kind @ OpKind::Read { .. },
                ServerMsg::SnapshotReadOk {
                    store,
                    origin_locked,
                },
            ) => self.clients[ci].ops.push(Op {
                kind,
                state: OpState::Located {
                    store,
                    origin_locked,
                },
            }),
            // The snapshot was given up by the store-full policy.
            (OpKind::Read { .. }, ServerMsg::Error { .. }) => {}
            (_, other) => self.fail(format!(
                "client {} got an unexpected answer {other:?}",
                self.clients[ci].id
            )),
        }
    }

    fn connect(&mut self, ci: usize) {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.wires.insert(conn, Wire::default());
        self.clients[ci].conn = Some(conn);
        let server_nonce = self.rng.gen();
        self.handle(Event::ClientConnected { conn, server_nonce });
        let client_nonce = self.rng.gen();
        let out = {
            self.clients[ci]
                .session
                .handle(SessionInput::Connected { client_nonce });
            self.clients[ci].session.drain_outputs()
        };
        self.outputs(ci, out);
    }

    fn start_write(&mut self, ci: usize) {
        let n = sectors(&self.sc);
        let first = if self.sc.hot_chunks > 0 && self.rng.gen_bool(0.5) {
            self.rng.gen_range(0..self.sc.hot_chunks * SECTS_PER_CHUNK)
        } else {
            self.rng.gen_range(0..n)
        };
        let count = self
            .rng
            .gen_range(1..=self.sc.max_write_sectors)
            .min(n - first);
        let fua = self.rng.gen_bool(0.2);
        let tag = self.next_tag;
        self.next_tag += 1;
        let kind = OpKind::Write {
            first_sector: first,
            sectors: count,
            fua,
            tag,
        };
        let first_chunk = first / SECTS_PER_CHUNK;
        let last_chunk = (first + count - 1) / SECTS_PER_CHUNK;
        // As `Volume::write_origin`: through the cache if every chunk is promised unique.
        let tracker = self.clients[ci].tracker.clone();
        if let Some(guard) = tracker.and_then(|t| t.try_cached(first_chunk..last_chunk + 1)) {
            self.clients[ci].ops.push(Op {
                kind,
                state: OpState::Granted(guard),
            });
            return;
        }
        let range = ChunkRange::new(first_chunk, (last_chunk - first_chunk + 1) as u32);
        let id = self.submit(
            ci,
            ClientMsg::QueryWrite {
                ranges: vec![range],
            },
        );
        self.clients[ci].ops.push(Op {
            kind,
            state: OpState::Asked(id),
        });
    }

    fn devices(&self) -> Devices {
        Devices::new(
            Arc::new(self.devs.origin.clone()),
            Arc::new(self.devs.store.clone()),
        )
    }

    /// Carries out a granted origin write (the data write of `Volume::write_origin`).
    fn do_write(&mut self, ci: usize, pos: usize) {
        let op = self.clients[ci].ops.remove(pos);
        let OpKind::Write {
            first_sector,
            sectors,
            fua,
            tag,
        } = op.kind
        else {
            return;
        };
        let mut data = Vec::with_capacity((sectors * SECT) as usize);
        for s in first_sector..first_sector + sectors {
            data.extend_from_slice(&sector_bytes(tag, s));
        }
        let result = self
            .devices()
            .write_blocking(Which::Origin, first_sector * SECT, &data, fua);
        drop(op.state);
        match result {
            Ok(()) => {
                for s in first_sector..first_sector + sectors {
                    self.origin[s as usize].0.push((tag, fua));
                }
                self.clients[ci]
                    .unflushed
                    .push((tag, first_sector, sectors));
                self.tally.writes_acked += u64::from(fua);
            }
            Err(_) if self.devs.powered_off() => {
                // The device lost power under it: the application sees an error; the
                // data may or may not be there (a FUA write's sync may be what failed).
                for s in first_sector..first_sector + sectors {
                    self.origin[s as usize].0.push((tag, false));
                }
            }
            Err(e) => self.fail(format!("origin write failed: {e}")),
        }
    }

    /// `Volume::flush`: both devices; on success every write this client completed before
    /// is promised durable.
    fn do_flush(&mut self, ci: usize) {
        let devs = self.devices();
        let result = devs
            .sync_blocking(Which::Origin)
            .and(devs.sync_blocking(Which::Store));
        match result {
            Ok(()) => {
                for (tag, first, n) in std::mem::take(&mut self.clients[ci].unflushed) {
                    for s in first..first + n {
                        if let Some(v) = self.origin[s as usize]
                            .0
                            .iter_mut()
                            .rev()
                            .find(|(t, _)| *t == tag)
                        {
                            v.1 = true;
                        }
                    }
                    self.tally.writes_acked += 1;
                }
            }
            Err(_) if self.devs.powered_off() => {}
            Err(e) => self.fail(format!("flush failed: {e}")),
        }
    }

    /// The device reads of a located snapshot read (`Volume::read_snapshot`), checked
    /// against the snapshot's exact view, then the releases.
    fn do_read(&mut self, ci: usize, pos: usize) {
        let op = self.clients[ci].ops.remove(pos);
        let (
            OpKind::Read { offset, len },
            OpState::Located {
                store,
                origin_locked,
            },
        ) = (op.kind, op.state)
        else {
            return;
        };
        let Role::Reader { snap } = self.clients[ci].role else {
            return;
        };
        let devs = self.devices();
        let mut data = Vec::new();
        let mut failed = false;
        for (which, at, n) in snapshot_read_runs(CHUNK, &store, offset, len) {
            match devs.read_blocking(which, at, n as usize) {
                Ok(b) => data.extend_from_slice(&b),
                Err(_) if self.devs.powered_off() => failed = true,
                Err(e) => self.fail(format!("snapshot read failed: {e}")),
            }
        }
        if !failed {
            self.tally.snapshot_reads += 1;
            let rec = self
                .snaps
                .values()
                .find(|r| r.id == snap.0)
                .cloned()
                .unwrap_or_else(|| self.fail(format!("read of unknown snapshot {snap}")));
            for (i, piece) in data.chunks(SECT as usize).enumerate() {
                let s = offset / SECT + i as u64;
                let want = rec.exact[s as usize];
                match decode(piece, s) {
                    Ok(t) if t == want => {}
                    got => self.fail(format!(
                        "snapshot {snap} sector {s} (chunk {}) reads {got:?}, but it was {want} at creation (store addrs {store:?})",
                        s / SECTS_PER_CHUNK
                    )),
                }
            }
        }
        if !store.is_empty() {
            let mut chunks: Vec<u64> = store.iter().map(|a| a.chunk).collect();
            chunks.sort_unstable();
            let session = &mut self.clients[ci].session;
            session.handle(SessionInput::Notify(ClientMsg::ReleaseStoreReads {
                snap,
                ranges: csnap_proto::ChunkRange::coalesce(chunks),
            }));
            let out = session.drain_outputs();
            self.outputs(ci, out);
        }
        if !origin_locked.is_empty() {
            self.submit(
                ci,
                ClientMsg::FinishSnapshotRead {
                    snap,
                    ranges: origin_locked,
                },
            );
        }
    }

    fn start_read(&mut self, reader: u64) {
        let live: Vec<u64> = match self.engine.as_ref() {
            Some(e) => e
                .store()
                .snapshots()
                .iter()
                .filter(|r| r.state == SnapState::Live)
                .map(|r| r.id.0)
                .collect(),
            None => return,
        };
        let reported: Vec<u64> = self
            .snaps
            .values()
            .filter(|r| r.reported && live.contains(&r.id))
            .map(|r| r.id)
            .collect();
        if reported.is_empty() {
            return;
        }
        // Mostly the newest few.
        let pick = reported.len() - 1 - self.rng.gen_range(0..reported.len().min(4));
        let snap = SnapId(reported[pick]);
        let ci = match self
            .clients
            .iter()
            .position(|c| c.role == Role::Reader { snap } && c.id.instance == reader)
        {
            Some(ci) => ci,
            None => {
                let c = Client::new(Role::Reader { snap }, reader, &mut self.rng);
                self.clients.push(c);
                self.clients.len() - 1
            }
        };
        let n = sectors(&self.sc);
        let first = self.rng.gen_range(0..n);
        let count = self.rng.gen_range(1..=24).min(n - first);
        let offset = first * SECT;
        let len = (count * SECT) as u32;
        let range = ChunkRange::new(
            first / SECTS_PER_CHUNK,
            ((first + count - 1) / SECTS_PER_CHUNK - first / SECTS_PER_CHUNK + 1) as u32,
        );
        let id = self.submit(
            ci,
            ClientMsg::QuerySnapshotRead {
                snap,
                ranges: vec![range],
            },
        );
        self.clients[ci].ops.push(Op {
            kind: OpKind::Read { offset, len },
            state: OpState::Asked(id),
        });
    }

    fn start_create(&mut self, ci: usize) {
        self.names += 1;
        let name = format!("s{}", self.names);
        let token = self.rng.gen_range(1..1u64 << 40);
        let id = self.submit(
            ci,
            ClientMsg::CreateSnapshot {
                name: name.clone(),
                token,
            },
        );
        self.clients[ci].ops.push(Op {
            kind: OpKind::Create { name },
            state: OpState::Asked(id),
        });
    }

    // ---- one step ----

    /// Chooses and runs one enabled step. Returns false if nothing could run.
    fn step(&mut self) -> bool {
        #[derive(Clone, Copy)]
        enum S {
            Up(ConnId),
            Down(ConnId),
            Copy(usize),
            Commit,
            CommitIo,
            FinishCommit,
            ReleaseStable,
            ReleaseAll,
            Connect(usize),
            StartWrite(usize),
            Write(usize, usize),
            Flush(usize),
            Ack(usize),
            Create(usize),
            StartRead(u64),
            Read(usize, usize),
            Tick,
        }
        let mut choices: Vec<(u32, S)> = Vec::new();
        for (conn, w) in &self.wires {
            if !w.up.is_empty() {
                choices.push((6, S::Up(*conn)));
            }
            if !w.down.is_empty() {
                choices.push((6, S::Down(*conn)));
            }
        }
        for i in 0..self.copies.len() {
            choices.push((4, S::Copy(i)));
        }
        if self.pipelined {
            if !self.held.is_empty() {
                choices.push((2, S::ReleaseStable));
                if !self.commit_due && self.commit_io.is_none() {
                    // The driver's move when no commit is coming to cover them.
                    choices.push((1, S::ReleaseAll));
                }
            }
            match &self.commit_io {
                None if self.commit_due => choices.push((3, S::Commit)),
                None => {}
                Some((Some(_), _)) => choices.push((3, S::CommitIo)),
                Some((None, _)) => choices.push((3, S::FinishCommit)),
            }
        } else if self.commit_due {
            choices.push((3, S::Commit));
        }
        let snapshots = self.snaps.len();
        for (ci, c) in self.clients.iter().enumerate() {
            if c.conn.is_none() {
                let drained = c
                    .tracker
                    .as_ref()
                    .is_none_or(|t| t.stats().writes_in_flight == 0);
                if drained {
                    choices.push((4, S::Connect(ci)));
                }
                continue;
            }
            match c.role {
                Role::Origin => {
                    if c.ops.len() < 4 {
                        choices.push((5, S::StartWrite(ci)));
                    }
                    for (pos, op) in c.ops.iter().enumerate() {
                        if matches!(op.state, OpState::Granted(_)) {
                            choices.push((5, S::Write(ci, pos)));
                        }
                    }
                    if !c.unflushed.is_empty() {
                        choices.push((1, S::Flush(ci)));
                    }
                    if !c.acks.is_empty() {
                        choices.push((3, S::Ack(ci)));
                    }
                }
                Role::Admin => {
                    if c.ops.is_empty() && snapshots < self.sc.max_snapshots {
                        choices.push((self.sc.create_weight, S::Create(ci)));
                    }
                }
                Role::Reader { .. } => {
                    for (pos, op) in c.ops.iter().enumerate() {
                        if matches!(op.state, OpState::Located { .. }) {
                            choices.push((3, S::Read(ci, pos)));
                        }
                    }
                }
            }
        }
        for r in 0..self.sc.readers {
            choices.push((2, S::StartRead(1000 + u64::from(r))));
        }
        choices.push((1, S::Tick));
        let total: u32 = choices.iter().map(|(w, _)| *w).sum();
        if total == 0 {
            return false;
        }
        let mut pick = self.rng.gen_range(0..total);
        let mut chosen = choices[0].1;
        for (w, s) in &choices {
            if pick < *w {
                chosen = *s;
                break;
            }
            pick -= *w;
        }
        match chosen {
            S::Up(conn) => {
                if let Some(frame) = self.wires.get_mut(&conn).and_then(|w| w.up.pop_front()) {
                    self.handle(Event::ClientRequest { conn, frame });
                }
            }
            S::Down(conn) => {
                let Some(frame) = self.wires.get_mut(&conn).and_then(|w| w.down.pop_front()) else {
                    return true;
                };
                if let Some(ci) = self.clients.iter().position(|c| c.conn == Some(conn)) {
                    let out = {
                        self.clients[ci]
                            .session
                            .handle(SessionInput::Received(frame));
                        self.clients[ci].session.drain_outputs()
                    };
                    self.outputs(ci, out);
                }
            }
            S::Copy(i) => {
                let (copy, from, to) = self.copies.remove(i);
                let result = match self.data.as_ref() {
                    Some(d) => d.copy(from, to),
                    None => return true,
                };
                if let Err(e) = &result {
                    if !self.devs.powered_off() {
                        self.fail(format!("copy failed: {e}"));
                    }
                }
                self.tally.copies += 1;
                match result {
                    Ok(()) if self.pipelined => {
                        // Stamped after the write returned, as the driver does.
                        let stamp = self.store_flushes.as_ref().map_or(0, |f| f.stamp());
                        self.held.hold(stamp, copy);
                    }
                    result => {
                        let result = result.map_err(csnap_server::engine::Failure::new);
                        self.handle(Event::CopyDone { copy, result });
                    }
                }
            }
            S::ReleaseStable | S::ReleaseAll => {
                let Some(flushes) = self.store_flushes.clone() else {
                    return true;
                };
                let released = if matches!(chosen, S::ReleaseAll) {
                    self.held.release_all(&flushes)
                } else {
                    self.held.release_stable(&flushes)
                };
                for copy in released {
                    self.handle(Event::CopyDone {
                        copy,
                        result: Ok(()),
                    });
                }
            }
            S::Commit if self.pipelined => {
                self.commit_due = false;
                if self.server_failed.is_none() {
                    let flush_first = self.held.commit_must_flush_first();
                    if let Some(io) = self.engine().begin_commit() {
                        self.commit_io = Some((Some(io), flush_first));
                    }
                    self.pump();
                    self.tally.commits += 1;
                }
            }
            S::Commit => {
                self.commit_due = false;
                if self.server_failed.is_none() {
                    self.engine().run_commit();
                    self.pump();
                    self.tally.commits += 1;
                }
            }
            S::CommitIo => {
                if let Some((io, flush_first)) = self.commit_io.as_mut() {
                    if let Some(io) = io.take() {
                        if self.sc.cut_in_pipelined_commits && self.rng.gen_bool(0.1) {
                            // At the flush after the journal writes (the first and only
                            // one when the data flush is skipped), or at the data flush.
                            let at = if *flush_first {
                                self.rng.gen_range(0..2)
                            } else {
                                0
                            };
                            self.devs.cut_at_flush(at);
                        }
                        if *flush_first {
                            io.run();
                        } else {
                            self.tally.commits_data_stable += 1;
                            io.run_data_stable();
                        }
                    }
                }
            }
            S::FinishCommit => {
                self.commit_io = None;
                if self.server_failed.is_none() {
                    self.engine().finish_commit();
                    self.pump();
                }
            }
            S::Connect(ci) => self.connect(ci),
            S::StartWrite(ci) => self.start_write(ci),
            S::Write(ci, pos) => self.do_write(ci, pos),
            S::Flush(ci) => self.do_flush(ci),
            S::Ack(ci) => {
                let Some(t) = self.clients[ci].tracker.clone() else {
                    return true;
                };
                let mut ready = Vec::new();
                self.clients[ci].acks.retain(|(epoch, snap)| {
                    // As the shell's spawned task: ack once the older epochs drained.
                    let drained = futures::FutureExt::now_or_never(t.drained(*epoch)).is_some();
                    if drained {
                        ready.push(*snap);
                    }
                    !drained
                });
                for snap in ready {
                    let session = &mut self.clients[ci].session;
                    session.handle(SessionInput::Notify(ClientMsg::NewSnapshotAck { snap }));
                    let out = session.drain_outputs();
                    self.outputs(ci, out);
                }
            }
            S::Create(ci) => self.start_create(ci),
            S::StartRead(r) => self.start_read(r),
            S::Read(ci, pos) => self.do_read(ci, pos),
            S::Tick => {
                self.now += 1;
                let now = self.now;
                self.handle(Event::Tick { now });
            }
        }
        true
    }

    // ---- power cut and recovery ----

    fn power_cut(&mut self) {
        self.tally.power_cuts += 1;
        self.tally.device_ops += self.devs.lock().ops;
        if self.devs.powered_off() {
            self.tally.cuts_mid_operation += 1;
        }
        // The server and every connection are gone.
        self.engine = None;
        self.data = None;
        self.copies.clear();
        self.commit_due = false;
        self.held = HeldCopies::default();
        self.commit_io = None;
        self.store_flushes = None;
        self.server_failed = None;
        self.wires.clear();
        let mut devs = self.devs.power_cut(&mut self.rng);
        // Clients: restart or survive.
        let mut expected = Vec::new();
        let old = std::mem::take(&mut self.clients);
        for mut c in old {
            if self.rng.gen_bool(0.5) {
                // Restart: a new process with a new identity; its operations failed.
                if c.role == Role::Origin || c.role == Role::Admin {
                    let inst = self.next_instance;
                    self.next_instance += 1;
                    self.clients.push(Client::new(c.role, inst, &mut self.rng));
                }
                continue;
            }
            self.tally.survivors += 1;
            c.session.handle(SessionInput::Disconnected);
            c.conn = None;
            c.acks.clear();
            c.unflushed.clear();
            if let Some(t) = &c.tracker {
                t.invalidate();
            }
            let mut finish = Vec::new();
            c.ops.retain_mut(|op| match &op.state {
                OpState::Asked(_) => true,
                // The device lost power under a granted write: it failed.
                OpState::Granted(_) => false,
                OpState::Located { origin_locked, .. } => {
                    if !origin_locked.is_empty() {
                        finish.push(origin_locked.clone());
                    }
                    false
                }
            });
            if let Role::Reader { snap } = c.role {
                for ranges in finish {
                    // Queued until the session is up again; nobody reads the outputs.
                    c.session
                        .handle(SessionInput::Submit(ClientMsg::FinishSnapshotRead {
                            snap,
                            ranges,
                        }));
                    drop(c.session.drain_outputs());
                }
                expected.push(c.id);
            }
            self.clients.push(c);
        }
        // Recovery; sometimes the power fails again while the journal is replayed.
        for _ in 0..self.rng.gen_range(0..3) {
            let budget = self.rng.gen_range(0..40);
            devs.cut_after(Some(budget));
            match Store::open(Arc::new(devs.store.clone()), OpenOptions::default()) {
                Ok(store) => drop(store),
                Err(e) if devs.powered_off() => drop(e),
                Err(e) => self.fail(format!("recovery failed: {e}")),
            }
            if devs.powered_off() {
                self.tally.recovery_cuts += 1;
            }
            devs = devs.power_cut(&mut self.rng);
        }
        self.devs = devs;
        self.verify_recovered();
        self.start_server(expected);
    }

    /// Checks the recovered devices against the reference, then makes the reference
    /// exact again (what the devices now hold is durable).
    fn verify_recovered(&mut self) {
        let mut store = match Store::open(Arc::new(self.devs.store.clone()), OpenOptions::default())
        {
            Ok(s) => s,
            Err(e) => self.fail(format!("store does not open after the power cut: {e}")),
        };
        if store.transactions_replayed() > 0 {
            self.tally.replays += 1;
        }
        match store.check() {
            Ok(r) if r.is_clean() => {}
            Ok(r) => self.fail(format!("checker after recovery: {:#?}", r.problems)),
            Err(e) => self.fail(format!("checker failed: {e}")),
        }
        let info = store.info();
        self.tally.max_node_blocks = self
            .tally
            .max_node_blocks
            .max(info.meta_blocks - info.free_meta_blocks);
        // The origin: every sector holds its last promised version or a later one.
        let n = sectors(&self.sc);
        let mut image = vec![0u8; (n * SECT) as usize];
        if let Err(e) = BlockDevice::read_at(&self.devs.origin, &mut image, 0) {
            self.fail(format!("origin read: {e}"));
        }
        let mut now = Vec::with_capacity(n as usize);
        for s in 0..n {
            let piece = &image[(s * SECT) as usize..((s + 1) * SECT) as usize];
            let allowed = self.origin[s as usize].allowed();
            match decode(piece, s) {
                Ok(t) if allowed.contains(&t) => now.push(t),
                got => self.fail(format!(
                    "origin sector {s} (chunk {}) holds {got:?} after the power cut; allowed {allowed:?} (history {:?})",
                    s / SECTS_PER_CHUNK,
                    self.origin[s as usize]
                )),
            }
        }
        // Snapshots.
        let rows = store.snapshots();
        let listed: BTreeMap<String, (u64, SnapState)> = rows
            .iter()
            .map(|r| (r.name.clone(), (r.id.0, r.state.clone())))
            .collect();
        for (name, rec) in &self.snaps {
            if rec.reported && !listed.contains_key(name) {
                self.fail(format!(
                    "snapshot {name} (id {}) was reported created but is gone after recovery: {rows:?}",
                    rec.id
                ));
            }
        }
        let mut keep = BTreeMap::new();
        for (name, (id, state)) in &listed {
            let Some(rec) = self.snaps.get(name).cloned() else {
                self.fail(format!(
                    "recovered store lists a snapshot {name} nobody created"
                ));
            };
            if rec.id != *id {
                self.fail(format!(
                    "snapshot {name} has id {id} after recovery, created as {}",
                    rec.id
                ));
            }
            if !rec.reported {
                self.tally.snapshots_unreported_survived += 1;
            }
            if let SnapState::Invalid { reason } = state {
                self.tally.invalidated += 1;
                if reason.contains("metadata") {
                    self.tally.invalidated_metadata_full += 1;
                }
            }
            let mut rec = rec;
            if *state == SnapState::Live {
                let mut exact = Vec::with_capacity(n as usize);
                for chunk in 0..self.sc.origin_chunks {
                    let src = match store.snapshot_chunk(SnapId(*id), chunk) {
                        Ok(s) => s,
                        Err(e) => self.fail(format!("snapshot {id} chunk {chunk}: {e}")),
                    };
                    let data: Vec<u8> = match src {
                        ChunkSource::Origin => {
                            image[(chunk * CHUNK) as usize..((chunk + 1) * CHUNK) as usize].to_vec()
                        }
                        ChunkSource::Store { store_chunk, .. } => {
                            let mut buf = vec![0u8; CHUNK as usize];
                            let off = self.geometry.chunk_offset(store_chunk);
                            if let Err(e) = BlockDevice::read_at(&self.devs.store, &mut buf, off) {
                                self.fail(format!("store read: {e}"));
                            }
                            buf
                        }
                    };
                    for (i, piece) in data.chunks(SECT as usize).enumerate() {
                        let s = chunk * SECTS_PER_CHUNK + i as u64;
                        let allowed = &rec.allowed[s as usize];
                        match decode(piece, s) {
                            Ok(t) if allowed.contains(&t) => exact.push(t),
                            got => self.fail(format!(
                                "snapshot {name} (id {id}, {}reported) sector {s} (chunk {chunk}, {src:?}) holds {got:?} after the power cut; allowed {allowed:?}",
                                if rec.reported { "" } else { "not " }
                            )),
                        }
                    }
                }
                rec.exact = exact.clone();
                rec.allowed = exact.into_iter().map(|t| vec![t]).collect();
            }
            keep.insert(name.clone(), rec);
        }
        // Invalid snapshots are older than every live one.
        let oldest_live = rows
            .iter()
            .filter(|r| r.state == SnapState::Live)
            .map(|r| r.id)
            .min();
        let newest_invalid = rows
            .iter()
            .filter(|r| matches!(r.state, SnapState::Invalid { .. }))
            .map(|r| r.id)
            .max();
        if let (Some(l), Some(i)) = (oldest_live, newest_invalid) {
            if i > l {
                self.fail(format!(
                    "after recovery snapshot {i} is invalid, older {l} live"
                ));
            }
        }
        // Lost creations are forgotten (a resent create may make them again).
        self.snaps = keep;
        self.origin = now.into_iter().map(|t| History(vec![(t, true)])).collect();
        drop(store);
    }

    fn run(mut self) -> Tally {
        for _ in 0..self.sc.epochs {
            // Where the power fails: at a random device operation, or at the epoch's end.
            // (A step does about half a device operation on average, and a flush about
            // every six operations.)
            let steps = u64::from(self.sc.steps);
            match self.rng.gen_range(0..8) {
                0..=2 => self
                    .devs
                    .cut_after(Some(self.rng.gen_range(steps / 8..steps * 2 / 3))),
                3..=5 => self
                    .devs
                    .cut_at_flush(self.rng.gen_range(steps / 48..steps / 10)),
                _ => {}
            }
            self.epoch_step = 0;
            while self.epoch_step < self.sc.steps {
                self.epoch_step += 1;
                if !self.step() {
                    break;
                }
                if self.devs.powered_off() || self.server_failed.is_some() {
                    break;
                }
            }
            self.power_cut();
        }
        self.tally
    }
}

/// A seed or count from the environment (decimal or 0x hex; a malformed value fails).
fn env_u64(name: &str) -> Option<u64> {
    csnap_proto::testing::env_seed(name)
}

fn run_scenario(sc: Scenario) -> Tally {
    let replay_scenario = std::env::var("CSNAP_POWERCUT_SCENARIO").ok();
    if let Some(one) = env_u64("CSNAP_POWERCUT_SEED") {
        if replay_scenario.as_deref().is_none_or(|s| s == sc.name) {
            eprintln!("{}: replaying schedule seed {one}", sc.name);
            return Sim::new(sc, one).run();
        }
        return Tally::default();
    }
    let seed = csnap_proto::testing::seed(&format!("powercut::{}", sc.name), "CSNAP_SEED");
    let factor = env_u64("CSNAP_POWERCUT_SCHEDULES").unwrap_or(1).max(1);
    let schedules = sc.schedules * factor;
    eprintln!("powercut {}: {schedules} schedules", sc.name);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut total = Tally::default();
    let started = Instant::now();
    for _ in 0..schedules {
        let s: u64 = rng.gen();
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Sim::new(sc, s).run()));
        match result {
            Ok(t) => total.add(&t),
            Err(e) => {
                let s = csnap_proto::testing::Seed(s);
                eprintln!(
                    "powercut {}: schedule seed {s} failed (replay it alone: CSNAP_POWERCUT_SCENARIO={} CSNAP_POWERCUT_SEED={s})",
                    sc.name, sc.name
                );
                std::panic::resume_unwind(e);
            }
        }
    }
    eprintln!(
        "powercut {}: {schedules} schedules in {:.1?}: {total:?}",
        sc.name,
        started.elapsed()
    );
    total
}

#[test]
fn basic() {
    let t = run_scenario(BASIC);
    if env_u64("CSNAP_POWERCUT_SEED").is_some() {
        return;
    }
    assert!(t.cuts_mid_operation > 0, "{t:?}");
    assert!(
        t.replays > 0,
        "some power cuts must need a journal replay: {t:?}"
    );
    assert!(t.snapshots_reported > 0 && t.snapshot_reads > 0, "{t:?}");
    assert!(t.survivors > 0, "{t:?}");
    assert!(
        t.commits_data_stable > 0,
        "some pipelined commits must have skipped their first flush: {t:?}"
    );
}

#[test]
fn pipelined() {
    let t = run_scenario(PIPELINED);
    if env_u64("CSNAP_POWERCUT_SEED").is_some() {
        return;
    }
    assert!(
        t.commits_data_stable > 0 && t.replays > 0,
        "commits must have skipped their first flush, and cuts needed replays: {t:?}"
    );
}

#[test]
fn deep() {
    let t = run_scenario(DEEP);
    if env_u64("CSNAP_POWERCUT_SEED").is_some() {
        return;
    }
    assert!(t.replays > 0, "{t:?}");
    assert!(
        t.max_node_blocks > 4,
        "the exception tree must grow internal nodes: {t:?}"
    );
    assert!(
        t.commits_data_stable > 0,
        "some pipelined commits must have skipped their first flush: {t:?}"
    );
}

#[test]
fn metadata_full() {
    let t = run_scenario(METADATA_FULL);
    if env_u64("CSNAP_POWERCUT_SEED").is_some() {
        return;
    }
    assert!(
        t.invalidated_metadata_full > 0,
        "the store-full policy must have given up snapshots for the metadata area: {t:?}"
    );
}
