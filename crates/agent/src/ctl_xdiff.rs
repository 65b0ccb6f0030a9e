//! `csnapctl export-diff` and `csnapctl import-diff`: a snapshot's changes since an older
//! one (or all of it) as a diff stream (`csnap_proto::diff_stream`, docs/wire-protocol.md
//! "Diff stream"), and that stream applied to another volume's origin followed by a
//! snapshot of the same name, so `export-diff | ssh other import-diff` replicates a volume
//! incrementally.
//!
//! Data moves through the agent's control socket in requests of at most
//! [`MAX_CONTROL_DATA`] bytes, pipelined on one connection per command ([`Pipeline`]):
//! the export batches scattered extents into `ReadSnapshotExtents` requests with
//! [`EXPORT_IN_FLIGHT_BYTES`] outstanding, the import keeps [`IN_FLIGHT`] writes
//! outstanding. The agent reads the snapshot, writes the origin, through
//! its client of the volume (under the server's grants, so copy-on-write for the target's
//! existing snapshots holds), many requests at once.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, BufWriter, IsTerminal as _, Read, Seek as _, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use csnap_proto::control::{
    ControlRequest, ControlResponse, ReadExtent, MAX_CONTROL_DATA, MAX_CONTROL_EXTENTS,
    MAX_CONTROL_ZERO,
};
use csnap_proto::diff_stream::{
    Extent as StreamExtent, StreamError, StreamHeader, StreamReader, StreamWriter,
};
use csnap_proto::{DiffEnd, SnapId, SnapRef, SnapshotInfo, SnapshotState, MAX_DIFF_RECORDS};

use crate::control::{Pipeline, PIPELINE_DEPTH};
use crate::ctl::{agent_answer, ask, list_all, show_progress, unexpected};
use crate::ctl_diff::{Extent, Extents};

/// How often a progress line is printed on long runs.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Control requests in flight at once on the export's or import's one connection (each a
/// bounded read or write); the agent carries out up to `PIPELINE_DEPTH` of them at once.
const IN_FLIGHT: usize = PIPELINE_DEPTH;
/// Bytes of snapshot reads export-diff keeps asked for and not yet answered: enough for
/// the device to have many reads at once whether the change is one long run (32 requests
/// of 512 KiB) or scattered chunks (256 of 64 KiB, in batched requests).
const EXPORT_IN_FLIGHT_BYTES: u64 = 16 << 20;
/// Zero detection granularity of the export: a run of zero blocks becomes a zero record.
const ZERO_BLOCK: u64 = 4096;
/// Longest data run the exporter gathers before it writes a record.
const DATA_RUN: usize = 4 << 20;

const EXPORT_HELP: &str = "\
Writes a diff stream: the extents where snapshot TO differs from the older snapshot FROM
(with --from), or the whole of TO (without), with their data read from TO, and the names
of both snapshots. The stream is versioned and checksummed (every record, and the stream
as a whole); `csnapctl import-diff` applies it to another volume. Only changed chunks are
read (from the store's metadata, as `csnapctl diff` finds them); a full export reads the
whole snapshot. Runs of zeroes are sent as zero records, not data. Both snapshots stay
readable while the export runs; one deleted meanwhile makes the export fail. With
--progress (or on a terminal) a progress line goes to stderr every second.";

const EXPORT_EXAMPLES: &str = "\
EXAMPLES
  csnapctl export-diff vol0 monday monday.csdiff                 full: all of 'monday'
  csnapctl export-diff vol0 --from monday tuesday tuesday.csdiff
  csnapctl export-diff vol0 --from monday tuesday - | ssh backup csnapctl import-diff vol0 -";

const IMPORT_HELP: &str = "\
Applies a diff stream written by `csnapctl export-diff` to VOLUME's origin, then creates
the stream's TO snapshot on it. Nothing is changed until the whole stream has been read
and every checksum verified (a stream from stdin is kept in a spool file meanwhile, in
--spool-dir or $TMPDIR), so a truncated or damaged stream leaves the volume as it was.
The volume must have the stream's size; an incremental stream (from FROM) applies only
when FROM is the volume's latest snapshot and the origin has not been written since
except where the stream overwrites it; a full stream only onto a volume without
snapshots. If the apply fails half way (agent gone, store full), the latest snapshot is
still FROM: run the same import again.";

const IMPORT_EXAMPLES: &str = "\
EXAMPLES
  csnapctl import-diff vol0 monday.csdiff
  ssh primary csnapctl export-diff vol0 --from monday tuesday - | csnapctl import-diff vol0 -";

/// `csnapctl export-diff VOLUME [--from FROM] TO OUT|-`
#[derive(clap::Args, Clone, Debug)]
#[command(long_about = EXPORT_HELP, after_long_help = EXPORT_EXAMPLES)]
pub struct ExportDiffArgs {
    /// The volume.
    pub volume: String,
    /// The older snapshot the stream starts from; without it, a full export of TO.
    #[arg(long)]
    pub from: Option<String>,
    /// The snapshot whose contents the stream brings a volume to.
    pub to: String,
    /// Where to write the stream: a file (replaced), or `-` for stdout.
    pub out: String,
    /// Print progress on stderr even when it is not a terminal.
    #[arg(long)]
    pub progress: bool,
    /// Exception records the server walks per diff page (tests use small pages).
    #[arg(long, hide = true, default_value_t = MAX_DIFF_RECORDS)]
    pub page_records: u32,
    /// Print a summary as one JSON object when done: on stdout, or on stderr (its last
    /// line) when the stream goes to stdout (`-`).
    #[arg(long)]
    pub json: bool,
    /// Bytes of reads kept in flight (benchmarks compare depths).
    #[arg(long, hide = true, default_value_t = EXPORT_IN_FLIGHT_BYTES)]
    pub in_flight_bytes: u64,
}

/// `csnapctl import-diff VOLUME IN|-`
#[derive(clap::Args, Clone, Debug)]
#[command(long_about = IMPORT_HELP, after_long_help = IMPORT_EXAMPLES)]
pub struct ImportDiffArgs {
    /// The volume to apply the stream to.
    pub volume: String,
    /// The stream: a file, or `-` for stdin.
    pub input: String,
    /// Where a stream from stdin is spooled while it is verified (default: $TMPDIR, else
    /// /tmp); it needs room for the whole stream.
    #[arg(long)]
    pub spool_dir: Option<PathBuf>,
    /// Print progress on stderr even when it is not a terminal.
    #[arg(long)]
    pub progress: bool,
    /// Print the summary as one JSON object on stdout instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

/// What an export or import moved: the `--json` summary.
#[derive(Debug, PartialEq, serde::Serialize)]
struct Summary {
    volume: String,
    from: Option<String>,
    to: String,
    /// Extent records in the stream (data and zero).
    extents: u64,
    data_bytes: u64,
    zero_bytes: u64,
    seconds: f64,
    /// The snapshot an import created.
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_id: Option<SnapId>,
}

impl Summary {
    fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

async fn geometry(socket: &Path, volume: &str) -> anyhow::Result<(u64, u64)> {
    let req = ControlRequest::Geometry {
        volume: volume.to_owned(),
    };
    match ask(socket, req).await? {
        ControlResponse::Geometry {
            size, chunk_size, ..
        } if chunk_size > 0 => Ok((size, chunk_size)),
        other => Err(unexpected(other)),
    }
}

/// The live snapshot `name` among `all`.
fn live_snapshot<'a>(
    all: &'a [SnapshotInfo],
    volume: &str,
    name: &str,
) -> anyhow::Result<&'a SnapshotInfo> {
    let Some(s) = all.iter().find(|s| s.name == name) else {
        bail!("no such snapshot: volume {volume:?} has no snapshot named {name:?}");
    };
    if let SnapshotState::Invalid { reason } = &s.state {
        bail!(
            "snapshot {name:?} of volume {volume:?} is invalid ({reason}): its contents are gone"
        );
    }
    Ok(s)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Turns the snapshot's bytes into stream records: runs of zero blocks as zero records,
/// the rest as data records of up to [`DATA_RUN`] bytes.
struct Emitter<W: Write> {
    w: StreamWriter<W>,
    data: Option<(u64, Vec<u8>)>,
    zero: Option<(u64, u64)>,
    data_bytes: u64,
    zero_bytes: u64,
}

impl<W: Write> Emitter<W> {
    fn new(w: StreamWriter<W>) -> Self {
        Emitter {
            w,
            data: None,
            zero: None,
            data_bytes: 0,
            zero_bytes: 0,
        }
    }

    /// `bytes` of the snapshot at `offset` (ascending: after everything fed before).
    fn feed(&mut self, offset: u64, bytes: &[u8]) -> Result<(), StreamError> {
        let mut at = 0usize;
        while at < bytes.len() {
            let abs = offset + at as u64;
            let to_boundary = (ZERO_BLOCK - abs % ZERO_BLOCK) as usize;
            let end = bytes.len().min(at + to_boundary);
            let block = &bytes[at..end];
            if block.iter().all(|b| *b == 0) {
                self.zero(abs, block.len() as u64)?;
            } else {
                self.data(abs, block)?;
            }
            at = end;
        }
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<(), StreamError> {
        self.flush_data()?;
        match &mut self.zero {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => {
                self.flush_zero()?;
                self.zero = Some((offset, len));
            }
        }
        Ok(())
    }

    fn data(&mut self, offset: u64, block: &[u8]) -> Result<(), StreamError> {
        self.flush_zero()?;
        match &mut self.data {
            Some((o, v)) if *o + v.len() as u64 == offset && v.len() < DATA_RUN => {
                v.extend_from_slice(block)
            }
            _ => {
                self.flush_data()?;
                self.data = Some((offset, block.to_vec()));
            }
        }
        Ok(())
    }

    fn flush_data(&mut self) -> Result<(), StreamError> {
        if let Some((o, v)) = self.data.take() {
            self.w.data(o, &v)?;
            self.data_bytes += v.len() as u64;
        }
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<(), StreamError> {
        if let Some((o, l)) = self.zero.take() {
            self.w.zero(o, l)?;
            self.zero_bytes += l;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(u64, u64, u64, W), StreamError> {
        self.flush_data()?;
        self.flush_zero()?;
        let (summary, out) = self.w.finish()?;
        Ok((summary.records, self.data_bytes, self.zero_bytes, out))
    }
}

/// `[offset, offset + len)` cut into pieces of at most `max` bytes, lazily.
fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    (0..len.div_ceil(max)).map(move |i| {
        let at = offset + i * max;
        (at, max.min(end - at))
    })
}

struct Progress {
    on: bool,
    last: Instant,
}

impl Progress {
    fn new(asked: bool) -> Self {
        Progress {
            on: show_progress(asked),
            last: Instant::now(),
        }
    }

    fn due(&mut self) -> bool {
        if self.on && self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            true
        } else {
            false
        }
    }
}

/// Pieces of at most [`MAX_CONTROL_DATA`] bytes, in order, gathered into the extents of one
/// `ReadSnapshotExtents` request each: up to [`MAX_CONTROL_EXTENTS`] extents and
/// [`MAX_CONTROL_DATA`] bytes, so a change scattered chunk by chunk costs the agent one
/// metadata question, one release and one answer per batch rather than per chunk.
struct ReadBatches<I: Iterator<Item = (u64, u64)>> {
    pieces: std::iter::Peekable<I>,
}

impl<I: Iterator<Item = (u64, u64)>> ReadBatches<I> {
    fn new(pieces: I) -> Self {
        ReadBatches {
            pieces: pieces.peekable(),
        }
    }
}

impl<I: Iterator<Item = (u64, u64)>> Iterator for ReadBatches<I> {
    type Item = Vec<ReadExtent>;

    fn next(&mut self) -> Option<Vec<ReadExtent>> {
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        while batch.len() < MAX_CONTROL_EXTENTS {
            let Some(&(offset, len)) = self.pieces.peek() else {
                break;
            };
            // Every piece fits a request on its own; it joins this one if it still fits.
            let len = len.min(u64::from(MAX_CONTROL_DATA));
            if !batch.is_empty() && bytes + len > u64::from(MAX_CONTROL_DATA) {
                break;
            }
            self.pieces.next();
            bytes += len;
            batch.push(ReadExtent {
                offset,
                len: len as u32,
            });
        }
        (!batch.is_empty()).then_some(batch)
    }
}

/// Reads `extents` of snapshot `snap` (in order) into the stream over the export's one
/// control connection, in batched requests ([`ReadBatches`]) with up to `depth_bytes`
/// outstanding across extents, so many small scattered extents (a sparse change) are read
/// as fast as one long one.
async fn export_extents<W: Write>(
    pipe: &mut Pipeline,
    volume: &str,
    snap: SnapId,
    extents: &[Extent],
    depth_bytes: u64,
    emitter: &mut Emitter<W>,
) -> anyhow::Result<()> {
    let mut all = ReadBatches::new(
        extents
            .iter()
            .flat_map(|e| pieces(e.offset, e.length, u64::from(MAX_CONTROL_DATA))),
    );
    let mut asked: VecDeque<(Vec<ReadExtent>, u64)> = VecDeque::new();
    let mut asked_bytes = 0u64;
    loop {
        while asked.len() < PIPELINE_DEPTH && (asked.is_empty() || asked_bytes < depth_bytes) {
            let Some(batch) = all.next() else { break };
            let bytes: u64 = batch.iter().map(|e| u64::from(e.len)).sum();
            pipe.send(&ControlRequest::ReadSnapshotExtents {
                volume: volume.to_owned(),
                snap,
                extents: batch.clone(),
            })?;
            asked_bytes += bytes;
            asked.push_back((batch, bytes));
        }
        let Some((batch, bytes)) = asked.pop_front() else {
            return Ok(());
        };
        asked_bytes -= bytes;
        let answer = pipe.recv().await?;
        if let ControlResponse::Error { message, .. } = &answer {
            if message.starts_with("malformed control request") {
                bail!(
                    "the agent is older than this csnapctl: it does not know the batched \
                     snapshot reads export-diff uses (ReadSnapshotExtents); upgrade \
                     csnap-agent on this node ({message})"
                );
            }
        }
        match agent_answer(Some(volume), answer)? {
            ControlResponse::Data { data, .. } if data.len() as u64 == bytes => {
                let mut at = 0usize;
                for e in &batch {
                    let end = at + e.len as usize;
                    emitter
                        .feed(e.offset, &data[at..end])
                        .context("cannot write the diff stream")?;
                    at = end;
                }
            }
            ControlResponse::Data { data, .. } => bail!(
                "the agent answered a read of {} extents and {bytes} bytes (the first at \
                 offset {}) with {} bytes",
                batch.len(),
                batch.first().map_or(0, |e| e.offset),
                data.len()
            ),
            other => return Err(unexpected(other)),
        }
    }
}

/// Runs `csnapctl export-diff`.
pub async fn run_export_diff(socket: &Path, args: ExportDiffArgs) -> anyhow::Result<()> {
    let volume = args.volume.as_str();
    let (size, chunk_size) = geometry(socket, volume).await?;
    let chunk_bytes = u32::try_from(chunk_size)
        .with_context(|| format!("the agent reported a chunk size of {chunk_size} bytes"))?;
    let (all, _) = list_all(socket, volume).await?;
    let to = live_snapshot(&all, volume, &args.to)?.id;
    let from = match &args.from {
        Some(name) => {
            let from = live_snapshot(&all, volume, name)?.id;
            if from >= to {
                bail!(
                    "--from {name:?} (id {from}) is not older than {:?} (id {to}): a stream goes from an older snapshot to a newer one",
                    args.to
                );
            }
            Some(from)
        }
        None => None,
    };
    let header = StreamHeader {
        volume_bytes: size,
        chunk_bytes,
        created: now_secs(),
        from: args.from.clone(),
        to: args.to.clone(),
    };

    let out: Box<dyn Write> = if args.out == "-" {
        if std::io::stdout().is_terminal() {
            bail!(
                "refusing to write a binary diff stream to a terminal: name a file, or pipe stdout"
            );
        }
        Box::new(BufWriter::with_capacity(1 << 20, std::io::stdout().lock()))
    } else {
        let f = File::create(&args.out)
            .with_context(|| format!("cannot create the stream file {}", args.out))?;
        Box::new(BufWriter::with_capacity(1 << 20, f))
    };
    let result = export(socket, &args, header, from, to, out).await;
    if result.is_err() && args.out != "-" {
        // A partial stream would be refused anyway; do not leave it looking like one.
        let _ = std::fs::remove_file(&args.out);
    }
    result
}

async fn export(
    socket: &Path,
    args: &ExportDiffArgs,
    header: StreamHeader,
    from: Option<SnapId>,
    to: SnapId,
    out: Box<dyn Write>,
) -> anyhow::Result<()> {
    let volume = args.volume.as_str();
    let (size, chunk_size) = (header.volume_bytes, u64::from(header.chunk_bytes));
    let started = Instant::now();
    let mut progress = Progress::new(args.progress);
    let mut emitter = Emitter::new(
        StreamWriter::new(out, &header).context("cannot write the diff stream's header")?,
    );
    let depth = args.in_flight_bytes.max(1);
    let mut pipe = Pipeline::open(socket).await?;
    match from {
        None => {
            // A full export: the whole snapshot, so the target ends up equal whatever its
            // origin held before.
            let step = 64 * u64::from(MAX_CONTROL_DATA);
            for (at, n) in pieces(0, size, step) {
                let e = Extent {
                    offset: at,
                    length: n,
                };
                export_extents(&mut pipe, volume, to, &[e], depth, &mut emitter).await?;
                if progress.due() {
                    eprintln!(
                        "csnapctl: export-diff at byte {} of {size} ({}%)",
                        at + n,
                        (at + n).saturating_mul(100) / size.max(1)
                    );
                }
            }
        }
        Some(from) => {
            // The changed chunks, page by page, by id: a snapshot re-created under the
            // same name meanwhile is not mixed in (its reads fail instead).
            let mut extents = Extents::new(chunk_size, size);
            let mut start = 0u64;
            loop {
                let req = ControlRequest::Diff {
                    volume: volume.to_owned(),
                    from: Some(SnapRef::Id(from)),
                    to: Some(SnapRef::Id(to)),
                    start,
                    budget: args.page_records,
                };
                let page = match ask(socket, req).await? {
                    ControlResponse::Diff {
                        from: f,
                        to: t,
                        chunk_size: cs,
                        size: sz,
                        page,
                        ..
                    } if f == DiffEnd::Snapshot(from)
                        && t == DiffEnd::Snapshot(to)
                        && cs == chunk_size
                        && sz == size =>
                    {
                        page
                    }
                    other => return Err(unexpected(other)),
                };
                let mut done = Vec::new();
                for r in page.ranges {
                    done.extend(extents.add(r)?);
                }
                export_extents(&mut pipe, volume, to, &done, depth, &mut emitter).await?;
                match page.next {
                    None => break,
                    Some(next) if next > start => start = next,
                    Some(next) => {
                        bail!("the agent sent a next page at chunk {next}, not after {start}")
                    }
                }
                if progress.due() {
                    let chunks = size.div_ceil(chunk_size).max(1);
                    eprintln!(
                        "csnapctl: export-diff at chunk {start} of {chunks} ({}%), {} bytes of data so far",
                        start.saturating_mul(100) / chunks,
                        emitter.data_bytes
                    );
                }
            }
            if let Some(done) = extents.finish() {
                export_extents(&mut pipe, volume, to, &[done], depth, &mut emitter).await?;
            }
        }
    }
    let (records, data_bytes, zero_bytes, _) = emitter
        .finish()
        .context("cannot write the end of the diff stream")?;
    let summary = Summary {
        volume: volume.to_owned(),
        from: header.from.clone(),
        to: header.to.clone(),
        extents: records,
        data_bytes,
        zero_bytes,
        seconds: started.elapsed().as_secs_f64(),
        snapshot_id: None,
    };
    if args.json && args.out == "-" {
        // stdout carries the stream: the summary is stderr's last line.
        eprintln!("{}", summary.json());
    } else if args.json {
        println!("{}", summary.json());
    } else if progress.on {
        eprintln!(
            "csnapctl: exported {} of volume {volume}{}: {records} records, {data_bytes} bytes of data, {zero_bytes} bytes of zeroes, in {:.2} s",
            header.to,
            header
                .from
                .as_ref()
                .map(|f| format!(" since {f}"))
                .unwrap_or_default(),
            summary.seconds
        );
    }
    Ok(())
}

/// Reads everything through and copies it to `spool` (stdin is read once).
struct Tee<R: Read, W: Write> {
    input: R,
    spool: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        self.spool.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// The byte ranges a stream's extents cover, adjacent ones joined: ascending, disjoint.
#[derive(Default)]
struct Coverage(Vec<(u64, u64)>);

impl Coverage {
    fn add(&mut self, offset: u64, len: u64) {
        match self.0.last_mut() {
            Some((_, end)) if *end == offset => *end = offset + len,
            _ => self.0.push((offset, offset + len)),
        }
    }

    /// Whether `[offset, end)` lies inside one covered range.
    fn covers(&self, offset: u64, end: u64) -> bool {
        let i = self.0.partition_point(|(s, _)| *s <= offset);
        i > 0 && self.0[i - 1].1 >= end
    }

    /// The first byte range of `[0, size)` not covered, if any.
    fn first_gap(&self, size: u64) -> Option<(u64, u64)> {
        let mut at = 0;
        for &(s, e) in &self.0 {
            if s > at {
                return Some((at, s));
            }
            at = e;
        }
        (at < size).then_some((at, size))
    }
}

/// Reads and verifies a whole stream: its header and the ranges it covers.
fn verify(
    input: impl Read,
    what: &str,
    progress: &mut Progress,
) -> anyhow::Result<(StreamHeader, Coverage, u64, u64)> {
    let refuse = |e: StreamError| anyhow::anyhow!("refusing {what}: {e}; nothing was changed");
    let mut r = StreamReader::new(input).map_err(refuse)?;
    let mut coverage = Coverage::default();
    let mut data_bytes = 0;
    while let Some(e) = r.next_extent().map_err(refuse)? {
        coverage.add(e.offset(), e.len());
        if let StreamExtent::Data { data, .. } = &e {
            data_bytes += data.len() as u64;
        }
        if progress.due() {
            eprintln!(
                "csnapctl: import-diff: {} bytes of the stream verified",
                r.position()
            );
        }
    }
    let bytes = r.summary().extent_bytes;
    Ok((r.header().clone(), coverage, bytes, data_bytes))
}

/// The target volume's state the stream applies to: `None` for a full stream.
async fn check_target(
    socket: &Path,
    volume: &str,
    header: &StreamHeader,
) -> anyhow::Result<Option<SnapId>> {
    let (size, _) = geometry(socket, volume).await?;
    if size != header.volume_bytes {
        bail!(
            "the stream is for a volume of {} bytes, volume {volume:?} has {size}: nothing was changed",
            header.volume_bytes
        );
    }
    let (all, _) = list_all(socket, volume).await?;
    if all.iter().any(|s| s.name == header.to) {
        bail!(
            "volume {volume:?} already has a snapshot named {:?} (the stream was imported before?): nothing was changed",
            header.to
        );
    }
    let latest = all.iter().max_by_key(|s| s.id);
    match (&header.from, latest) {
        (None, None) => Ok(None),
        (None, Some(latest)) => bail!(
            "the stream is a full export (no FROM): it imports only onto a volume without snapshots, and volume {volume:?} has {} (the latest is {:?}); export an incremental stream with --from {:?}: nothing was changed",
            all.len(),
            latest.name,
            latest.name
        ),
        (Some(from), None) => bail!(
            "the stream starts from snapshot {from:?}, but volume {volume:?} has no snapshots: import the full stream (export-diff without --from) first: nothing was changed"
        ),
        (Some(from), Some(latest)) if latest.name != *from => bail!(
            "the stream starts from snapshot {from:?}, but the latest snapshot of volume {volume:?} is {:?}: export the stream with --from {:?} instead: nothing was changed",
            latest.name,
            latest.name
        ),
        (Some(from), Some(latest)) => {
            if let SnapshotState::Invalid { reason } = &latest.state {
                bail!("snapshot {from:?} of volume {volume:?} is invalid ({reason}): the stream cannot be applied onto it: nothing was changed");
            }
            Ok(Some(latest.id))
        }
    }
}

/// Refuses when the target's origin was written since `from` anywhere the stream does not
/// overwrite (the result would not be TO). Writes by an earlier, interrupted import of the
/// same stream lie inside what it overwrites, so a re-run passes.
async fn check_origin_unchanged(
    socket: &Path,
    volume: &str,
    from: SnapId,
    from_name: &str,
    coverage: &Coverage,
) -> anyhow::Result<()> {
    let (size, chunk_size) = geometry(socket, volume).await?;
    let mut extents = Extents::new(chunk_size, size);
    let mut start = 0u64;
    let mut changed = Vec::new();
    loop {
        let req = ControlRequest::Diff {
            volume: volume.to_owned(),
            from: Some(SnapRef::Id(from)),
            to: None,
            start,
            budget: MAX_DIFF_RECORDS,
        };
        let page = match ask(socket, req).await? {
            ControlResponse::Diff {
                from: f,
                to: DiffEnd::Origin,
                page,
                ..
            } if f == DiffEnd::Snapshot(from) => page,
            other => return Err(unexpected(other)),
        };
        for r in page.ranges {
            changed.extend(extents.add(r)?);
        }
        match page.next {
            None => break,
            Some(next) if next > start => start = next,
            Some(next) => bail!("the agent sent a next page at chunk {next}, not after {start}"),
        }
    }
    changed.extend(extents.finish());
    if let Some(e) = changed
        .iter()
        .find(|e| !coverage.covers(e.offset, e.offset + e.length))
    {
        bail!(
            "the origin of volume {volume:?} was written since snapshot {from_name:?} (at offset {}, {} bytes) where the stream does not overwrite it, so applying it would not reproduce the stream's snapshot: a replication target must not be written; nothing was changed",
            e.offset,
            e.length
        );
    }
    Ok(())
}

/// The control requests that apply one verified extent to the origin.
fn apply_requests(volume: &str, e: StreamExtent) -> Vec<ControlRequest> {
    match e {
        StreamExtent::Data { offset, data } => data
            .chunks(MAX_CONTROL_DATA as usize)
            .enumerate()
            .map(|(i, piece)| ControlRequest::WriteOrigin {
                volume: volume.to_owned(),
                offset: offset + (i as u64) * u64::from(MAX_CONTROL_DATA),
                data: piece.to_vec(),
            })
            .collect(),
        StreamExtent::Zero { offset, len } => pieces(offset, len, MAX_CONTROL_ZERO)
            .map(|(at, n)| ControlRequest::ZeroOrigin {
                volume: volume.to_owned(),
                offset: at,
                len: n,
            })
            .collect(),
    }
}

/// Waits for the oldest unanswered write of the import.
async fn applied_one(pipe: &mut Pipeline, volume: &str) -> anyhow::Result<()> {
    match agent_answer(Some(volume), pipe.recv().await?)? {
        ControlResponse::Done { .. } => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// Runs `csnapctl import-diff`.
pub async fn run_import_diff(socket: &Path, args: ImportDiffArgs) -> anyhow::Result<()> {
    let volume = args.volume.as_str();
    let mut progress = Progress::new(args.progress);
    let started = Instant::now();

    // Read and verify the whole stream before anything changes; stdin is spooled so it
    // can be read a second time to apply.
    let (source, header, coverage, extent_bytes, data_bytes): (Box<dyn Read>, _, _, _, _) =
        if args.input == "-" {
            let dir = args.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
            let spool = tempfile::tempfile_in(&dir)
                .with_context(|| format!("cannot create a spool file in {}", dir.display()))?;
            let mut tee = Tee {
                input: BufReader::with_capacity(1 << 20, std::io::stdin().lock()),
                spool: BufWriter::with_capacity(1 << 20, spool),
            };
            let (header, coverage, bytes, data) =
                verify(&mut tee, "the stream on stdin", &mut progress)?;
            let mut spool = tee
                .spool
                .into_inner()
                .map_err(|e| e.into_error())
                .with_context(|| format!("cannot write the spool file in {}", dir.display()))?;
            spool
                .rewind()
                .with_context(|| format!("cannot read the spool file in {}", dir.display()))?;
            (
                Box::new(BufReader::with_capacity(1 << 20, spool)),
                header,
                coverage,
                bytes,
                data,
            )
        } else {
            let open = || {
                File::open(&args.input)
                    .map(|f| BufReader::with_capacity(1 << 20, f))
                    .with_context(|| format!("cannot open the stream file {}", args.input))
            };
            let what = format!("the stream in {}", args.input);
            let (header, coverage, bytes, data) = verify(open()?, &what, &mut progress)?;
            (Box::new(open()?), header, coverage, bytes, data)
        };

    let from = check_target(socket, volume, &header).await?;
    match (from, &header.from) {
        (Some(id), Some(name)) => {
            check_origin_unchanged(socket, volume, id, name, &coverage).await?
        }
        _ => {
            if let Some((a, b)) = coverage.first_gap(header.volume_bytes) {
                bail!(
                    "refusing the stream: it is a full export but does not cover bytes {a}..{b} of the volume; nothing was changed"
                );
            }
        }
    }

    // Apply. The stream is read (and checked) again; from here on a failure leaves the
    // origin partly updated, but the latest snapshot is still FROM.
    let rerun = match &header.from {
        Some(f) => format!(
            "the latest snapshot of volume {volume:?} is still {f:?}, so running the same import again is safe"
        ),
        None => format!(
            "volume {volume:?} still has no snapshots, so running the same import again is safe"
        ),
    };
    let mut reader = StreamReader::new(source)
        .map_err(|e| anyhow::anyhow!("the stream changed while it was applied: {e}; {rerun}"))?;
    if *reader.header() != header {
        bail!("the stream changed while it was applied (its header differs); nothing was changed");
    }
    let mut applied = 0u64;
    let mut pipe = Pipeline::open(socket)
        .await
        .with_context(|| format!("nothing was changed; {rerun}"))?;
    let failed = |applied: u64| {
        format!(
            "import of snapshot {:?} failed after {applied} of {extent_bytes} bytes; {rerun}",
            header.to
        )
    };
    loop {
        let e = match reader.next_extent() {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) => bail!("the stream changed while it was applied: {e}; {rerun}"),
        };
        let len = e.len();
        for req in apply_requests(volume, e) {
            while pipe.unanswered() >= IN_FLIGHT {
                applied_one(&mut pipe, volume)
                    .await
                    .with_context(|| failed(applied))?;
            }
            pipe.send(&req).with_context(|| failed(applied))?;
        }
        applied += len;
        if progress.due() {
            eprintln!(
                "csnapctl: import-diff: {applied} of {extent_bytes} bytes applied ({}%)",
                applied.saturating_mul(100) / extent_bytes.max(1)
            );
        }
    }
    // Every write answered before the flush (the agent runs pipelined requests at once).
    while pipe.unanswered() > 0 {
        applied_one(&mut pipe, volume)
            .await
            .with_context(|| failed(applied))?;
    }
    drop(pipe);
    match ask(
        socket,
        ControlRequest::Flush {
            volume: volume.to_owned(),
        },
    )
    .await
    .with_context(|| format!("the origin writes could not be made durable; {rerun}"))?
    {
        ControlResponse::Done { .. } => {}
        other => return Err(unexpected(other)),
    }
    let info = match ask(
        socket,
        ControlRequest::SnapshotCreate {
            volume: volume.to_owned(),
            name: header.to.clone(),
        },
    )
    .await
    .with_context(|| {
        format!(
            "the stream was applied but its snapshot {:?} could not be created; {rerun}",
            header.to
        )
    })? {
        ControlResponse::SnapshotCreated { info, .. } => info,
        other => return Err(unexpected(other)),
    };
    let summary = Summary {
        volume: volume.to_owned(),
        from: header.from.clone(),
        to: header.to.clone(),
        extents: reader.summary().records,
        data_bytes,
        zero_bytes: extent_bytes - data_bytes,
        seconds: started.elapsed().as_secs_f64(),
        snapshot_id: Some(info.id),
    };
    if args.json {
        println!("{}", summary.json());
    } else {
        println!(
            "imported snapshot {} (id {}) into volume {volume}{}: {} records, {extent_bytes} bytes in {:.2} s",
            info.name,
            info.id,
            header
                .from
                .as_ref()
                .map(|f| format!(" on top of {f}"))
                .unwrap_or_default(),
            summary.extents,
            summary.seconds
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use csnap_proto::diff_stream::Extent as E;

    fn emit(feeds: &[(u64, Vec<u8>)]) -> Vec<E> {
        let header = StreamHeader {
            volume_bytes: 1 << 30,
            chunk_bytes: 65536,
            created: 0,
            from: None,
            to: "t".into(),
        };
        let mut em = Emitter::new(StreamWriter::new(Vec::new(), &header).unwrap());
        for (at, bytes) in feeds {
            em.feed(*at, bytes).unwrap();
        }
        let (_, _, _, out) = em.finish().unwrap();
        let mut r = StreamReader::new(out.as_slice()).unwrap();
        let mut all = Vec::new();
        while let Some(e) = r.next_extent().unwrap() {
            all.push(e);
        }
        all
    }

    #[test]
    fn zero_blocks_become_zero_records_and_runs_are_joined() {
        let mut a = vec![0u8; 3 * 4096];
        a[4096 + 7] = 1;
        // Joined across the two feeds: the zeroes at the end of the first and the start
        // of the second are one record.
        let b = [vec![0u8; 4096], vec![2u8; 100]].concat();
        let got = emit(&[(8192, a.clone()), (8192 + a.len() as u64, b)]);
        let mut one = vec![0u8; 4096];
        one[7] = 1;
        assert_eq!(
            got,
            vec![
                E::Zero {
                    offset: 8192,
                    len: 4096
                },
                E::Data {
                    offset: 8192 + 4096,
                    data: one
                },
                E::Zero {
                    offset: 8192 + 8192,
                    len: 8192
                },
                E::Data {
                    offset: 8192 + 4 * 4096,
                    data: vec![2u8; 100]
                },
            ]
        );
    }

    #[test]
    fn unaligned_feeds_are_cut_at_block_boundaries() {
        // 100 zero bytes then data in the same 4 KiB block: the block holds data.
        let bytes = [vec![0u8; 100], vec![9u8; 5000]].concat();
        let got = emit(&[(4000, bytes.clone())]);
        // [4000, 4096) is all zero (a block's tail), the rest is data.
        assert_eq!(
            got,
            vec![
                E::Zero {
                    offset: 4000,
                    len: 96
                },
                E::Data {
                    offset: 4096,
                    data: bytes[96..].to_vec()
                },
            ]
        );
    }

    #[test]
    fn coverage_joins_and_finds_gaps() {
        let mut c = Coverage::default();
        c.add(0, 10);
        c.add(10, 5);
        c.add(20, 5);
        assert!(c.covers(0, 15));
        assert!(c.covers(3, 12));
        assert!(!c.covers(3, 16));
        assert!(!c.covers(15, 20));
        assert!(c.covers(20, 25));
        assert!(!c.covers(25, 26));
        assert_eq!(c.first_gap(25), Some((15, 20)));
        let mut full = Coverage::default();
        full.add(0, 25);
        assert_eq!(full.first_gap(25), None);
        assert_eq!(full.first_gap(30), Some((25, 30)));
        assert_eq!(Coverage::default().first_gap(1), Some((0, 1)));
    }

    fn batches_of(pieces: &[(u64, u64)]) -> Vec<Vec<(u64, u32)>> {
        ReadBatches::new(pieces.iter().copied())
            .map(|b| b.iter().map(|e| (e.offset, e.len)).collect())
            .collect()
    }

    /// Scattered chunks fill requests up to the extent limit, in order, none lost.
    #[test]
    fn scattered_chunks_are_batched_up_to_the_extent_limit() {
        let chunk = 4096u64;
        let pieces: Vec<(u64, u64)> = (0..MAX_CONTROL_EXTENTS as u64 * 2 + 3)
            .map(|i| (i * 7 * chunk, chunk))
            .collect();
        let batches = batches_of(&pieces);
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![MAX_CONTROL_EXTENTS, MAX_CONTROL_EXTENTS, 3]);
        let flat: Vec<(u64, u64)> = batches
            .concat()
            .into_iter()
            .map(|(o, l)| (o, u64::from(l)))
            .collect();
        assert_eq!(flat, pieces);
    }

    /// A request never carries more than `MAX_CONTROL_DATA` bytes: 64 KiB chunks go 8 to
    /// a request, a full-size piece alone, unaligned pieces where they fit.
    #[test]
    fn batches_stay_within_the_data_limit() {
        let max = u64::from(MAX_CONTROL_DATA);
        let k = 64 * 1024;
        let pieces: Vec<(u64, u64)> = (0..17).map(|i| (i * 3 * k, k)).collect();
        let sizes: Vec<usize> = batches_of(&pieces).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![8, 8, 1]);
        let mixed = [
            (0, 100),
            (max, max),
            (3 * max, max - 100),
            (5 * max, 100),
            (7 * max, 1),
        ];
        assert_eq!(
            batches_of(&mixed),
            vec![
                vec![(0, 100)],
                vec![(max, max as u32)],
                vec![(3 * max, (max - 100) as u32), (5 * max, 100)],
                vec![(7 * max, 1)],
            ]
        );
        for b in batches_of(&mixed) {
            assert!(b.iter().map(|e| u64::from(e.1)).sum::<u64>() <= max);
        }
        assert!(batches_of(&[]).is_empty());
    }

    #[test]
    fn pieces_cover_the_range_in_bounded_steps() {
        let p: Vec<_> = pieces(10, 25, 10).collect();
        assert_eq!(p, vec![(10, 10), (20, 10), (30, 5)]);
        assert_eq!(pieces(0, 0, 10).count(), 0);
    }
}
