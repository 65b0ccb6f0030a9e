//! `csnapctl diff`: the byte extents where one end of a volume (a snapshot, or the live
//! origin) differs from a snapshot, from the server's exception records alone: no data is
//! read. The diff arrives page by page through the agent (each page one control request, a
//! bounded walk on the server), and is written out as it comes, so a 1 TiB volume never
//! has its whole diff in memory.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use csnap_proto::control::{ControlRequest, ControlResponse};
use csnap_proto::{ChunkRange, DiffEnd, SnapRef, MAX_DIFF_RECORDS};

use crate::ctl::{ask, show_progress, unexpected};

const DIFF_HELP: &str = "\
Prints the byte extents where snapshot TO (or, without TO, the live origin) differs from
snapshot FROM, from the store's metadata alone: no data is read, so a 1 TiB volume with 1%
changed takes well under a second per 10,000 changed chunks. Extents are whole chunks
(the store's copy-on-write unit) that were written between the two; a chunk rewritten with
the bytes it held is still listed. Adjacent chunks come as one extent. Output is streamed
as the server walks its records; with --progress (or on a terminal) a progress line goes
to stderr every second on long runs. A diff against the live origin is a view of a moving
target: writes landing while it runs may or may not be listed.";

const DIFF_EXAMPLES: &str = "\
EXAMPLES
  csnapctl diff vol0 monday tuesday
  csnapctl diff vol0 nightly                 what changed on the origin since 'nightly'
  csnapctl diff vol0 monday tuesday --json | jq '.changed_bytes'";

/// `csnapctl diff VOLUME FROM [TO]`
#[derive(clap::Args, Clone, Debug)]
#[command(long_about = DIFF_HELP, after_long_help = DIFF_EXAMPLES)]
pub struct DiffArgs {
    /// The volume.
    pub volume: String,
    /// The older snapshot (by name).
    pub from: String,
    /// The newer snapshot (by name); without it, the live origin.
    pub to: Option<String>,
    /// Print one JSON document on stdout, its extents streamed as they come.
    #[arg(long)]
    pub json: bool,
    /// Print progress on stderr even when it is not a terminal.
    #[arg(long)]
    pub progress: bool,
    /// Exception records the server walks per page (tests use small pages to cross many
    /// page boundaries).
    #[arg(long, hide = true, default_value_t = MAX_DIFF_RECORDS)]
    pub page_records: u32,
}

/// How often a progress line is printed on long runs.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// An extent in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) offset: u64,
    pub(crate) length: u64,
}

/// Turns the pages' chunk ranges into byte extents, joining runs that a page boundary cut
/// in two, and counts them.
pub(crate) struct Extents {
    chunk_size: u64,
    size: u64,
    pending: Option<Extent>,
    count: u64,
    bytes: u64,
}

impl Extents {
    /// No extents yet, for a volume of `size` bytes in chunks of `chunk_size`.
    pub(crate) fn new(chunk_size: u64, size: u64) -> Extents {
        Extents {
            chunk_size,
            size,
            pending: None,
            count: 0,
            bytes: 0,
        }
    }

    /// Adds a range; returns the extent it completed, if any.
    pub(crate) fn add(&mut self, r: ChunkRange) -> anyhow::Result<Option<Extent>> {
        let chunks = r
            .chunks()
            .with_context(|| format!("the server sent a wrapping range {}+{}", r.start, r.count))?;
        let offset = chunks.start.saturating_mul(self.chunk_size);
        let end = chunks.end.saturating_mul(self.chunk_size).min(self.size);
        if offset >= end {
            bail!(
                "the server sent chunks {}+{} past the volume's {} bytes",
                r.start,
                r.count,
                self.size
            );
        }
        let next = Extent {
            offset,
            length: end - offset,
        };
        match &mut self.pending {
            Some(p) if p.offset + p.length == next.offset => {
                p.length += next.length;
                Ok(None)
            }
            _ => Ok(self.pending.replace(next).map(|done| self.counted(done))),
        }
    }

    pub(crate) fn finish(&mut self) -> Option<Extent> {
        self.pending.take().map(|done| self.counted(done))
    }

    fn counted(&mut self, e: Extent) -> Extent {
        self.count += 1;
        self.bytes += e.length;
        e
    }
}

/// Where the output goes and in which form.
struct Output<W: Write> {
    out: W,
    json: bool,
    first: bool,
}

impl<W: Write> Output<W> {
    fn header(
        &mut self,
        volume: &str,
        args: &DiffArgs,
        from: DiffEnd,
        to: DiffEnd,
        chunk_size: u64,
    ) -> std::io::Result<()> {
        if self.json {
            let end = |name: Option<&String>, end: DiffEnd| match (name, end) {
                (Some(name), DiffEnd::Snapshot(id)) => {
                    serde_json::json!({ "snapshot": name, "id": id })
                }
                _ => serde_json::json!("origin"),
            };
            let head = serde_json::json!({
                "volume": volume,
                "from": end(Some(&args.from), from),
                "to": end(args.to.as_ref(), to),
                "chunk_size": chunk_size,
            });
            // The document is written as it streams: the head's fields, then the extents
            // array, then the totals.
            let head = head.to_string();
            let fields = head.strip_suffix('}').unwrap_or(&head);
            write!(self.out, "{fields},\"extents\":[")
        } else {
            writeln!(self.out, "OFFSET LENGTH")
        }
    }

    fn extent(&mut self, e: Extent) -> std::io::Result<()> {
        if self.json {
            let sep = if self.first { "" } else { "," };
            self.first = false;
            write!(
                self.out,
                "{sep}\n{{\"offset\":{},\"length\":{}}}",
                e.offset, e.length
            )
        } else {
            writeln!(self.out, "{} {}", e.offset, e.length)
        }
    }

    fn footer(&mut self, extents: &Extents, records: u64) -> std::io::Result<()> {
        if self.json {
            writeln!(
                self.out,
                "],\"extent_count\":{},\"changed_bytes\":{},\"records_walked\":{records}}}",
                extents.count, extents.bytes
            )?;
        }
        self.out.flush()
    }
}

fn end_name(name: Option<&String>, end: DiffEnd) -> String {
    match (name, end) {
        (Some(n), DiffEnd::Snapshot(id)) => format!("snapshot {n} (id {id})"),
        _ => "the origin".to_owned(),
    }
}

/// Runs `csnapctl diff`.
pub async fn run_diff(socket: &Path, args: DiffArgs) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut output = Output {
        out: std::io::BufWriter::new(stdout.lock()),
        json: args.json,
        first: true,
    };
    let progress = show_progress(args.progress);
    let started = Instant::now();
    let mut last_progress = started;
    let write_err = |e: std::io::Error| anyhow::anyhow!("cannot write the diff to stdout: {e}");

    // The first page names the ends; the next ones pass the ids it resolved, so a snapshot
    // re-created under the same name in the meantime is not silently compared.
    let mut from = Some(SnapRef::Name(args.from.clone()));
    let mut to = args.to.clone().map(SnapRef::Name);
    let mut start = 0u64;
    let mut extents: Option<Extents> = None;
    let mut records = 0u64;
    let mut ends = (DiffEnd::Origin, DiffEnd::Origin);
    loop {
        let req = ControlRequest::Diff {
            volume: args.volume.clone(),
            from: from.clone(),
            to: to.clone(),
            start,
            budget: args.page_records,
        };
        let (from_end, to_end, chunk_size, size, page) = match ask(socket, req).await? {
            ControlResponse::Diff {
                from,
                to,
                chunk_size,
                size,
                page,
                ..
            } => (from, to, chunk_size, size, page),
            other => return Err(unexpected(other)),
        };
        if !matches!(from_end, DiffEnd::Snapshot(_))
            || to_end == DiffEnd::Origin && args.to.is_some()
        {
            bail!("the agent resolved the diff's ends to {from_end} and {to_end}, not the snapshots named");
        }
        let ext = match &mut extents {
            Some(ext) => ext,
            None => {
                if chunk_size == 0 {
                    bail!("the agent reported a chunk size of 0");
                }
                ends = (from_end, to_end);
                output
                    .header(&args.volume, &args, from_end, to_end, chunk_size)
                    .map_err(write_err)?;
                from = end_ref(from_end);
                to = end_ref(to_end);
                extents.insert(Extents {
                    chunk_size,
                    size,
                    pending: None,
                    count: 0,
                    bytes: 0,
                })
            }
        };
        records += page.records_walked;
        for r in page.ranges {
            if let Some(done) = ext.add(r)? {
                output.extent(done).map_err(write_err)?;
            }
        }
        match page.next {
            None => break,
            Some(next) if next > start => start = next,
            Some(next) => bail!("the agent sent a next page at chunk {next}, not after {start}"),
        }
        if progress && last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            let chunks = size.div_ceil(chunk_size).max(1);
            eprintln!(
                "csnapctl: diff at chunk {start} of {chunks} ({}%), {} extents so far",
                start.saturating_mul(100) / chunks,
                ext.count
            );
        }
    }
    let Some(ext) = extents.as_mut() else {
        bail!("the agent sent no diff page");
    };
    if let Some(done) = ext.finish() {
        output.extent(done).map_err(write_err)?;
    }
    output.footer(ext, records).map_err(write_err)?;
    if progress {
        eprintln!(
            "csnapctl: {} extents, {} bytes differ between {} and {} of volume {} ({records} records walked in {:.2} s)",
            ext.count,
            ext.bytes,
            end_name(Some(&args.from), ends.0),
            end_name(args.to.as_ref(), ends.1),
            args.volume,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// How the next pages name an end the first page resolved.
fn end_ref(end: DiffEnd) -> Option<SnapRef> {
    match end {
        DiffEnd::Snapshot(id) => Some(SnapRef::Id(id)),
        DiffEnd::Origin => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extents(chunk_size: u64, size: u64) -> Extents {
        Extents::new(chunk_size, size)
    }

    #[test]
    fn runs_cut_by_a_page_boundary_are_joined_and_the_last_chunk_is_clipped() {
        let mut e = extents(4096, 10 * 4096 + 100);
        assert_eq!(e.add(ChunkRange::new(0, 2)).unwrap(), None);
        // The next page continues the run.
        assert_eq!(e.add(ChunkRange::new(2, 1)).unwrap(), None);
        assert_eq!(
            e.add(ChunkRange::new(5, 1)).unwrap(),
            Some(Extent {
                offset: 0,
                length: 3 * 4096
            })
        );
        assert_eq!(
            e.add(ChunkRange::new(10, 1)).unwrap(),
            Some(Extent {
                offset: 5 * 4096,
                length: 4096
            })
        );
        assert_eq!(
            e.finish(),
            Some(Extent {
                offset: 10 * 4096,
                length: 100
            })
        );
        assert_eq!((e.count, e.bytes), (3, 4 * 4096 + 100));
        assert!(e.add(ChunkRange::new(11, 1)).is_err(), "past the end");
        assert!(e.add(ChunkRange::new(u64::MAX, 2)).is_err(), "wrapping");
    }

    #[test]
    fn json_output_is_one_document() {
        let mut out = Output {
            out: Vec::new(),
            json: true,
            first: true,
        };
        let args = DiffArgs {
            volume: "v\"0".into(),
            from: "a".into(),
            to: None,
            json: true,
            progress: false,
            page_records: 1,
        };
        let mut e = extents(65536, 1 << 20);
        out.header(
            "v\"0",
            &args,
            DiffEnd::Snapshot(csnap_proto::SnapId(3)),
            DiffEnd::Origin,
            65536,
        )
        .unwrap();
        for r in [ChunkRange::new(1, 1), ChunkRange::new(4, 2)] {
            if let Some(done) = e.add(r).unwrap() {
                out.extent(done).unwrap();
            }
        }
        if let Some(done) = e.finish() {
            out.extent(done).unwrap();
        }
        out.footer(&e, 7).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out.out).unwrap();
        assert_eq!(doc["volume"], "v\"0");
        assert_eq!(doc["from"]["snapshot"], "a");
        assert_eq!(doc["from"]["id"], 3);
        assert_eq!(doc["to"], "origin");
        assert_eq!(doc["extents"][1]["offset"], 4 * 65536);
        assert_eq!(doc["extents"][1]["length"], 2 * 65536);
        assert_eq!(doc["extent_count"], 2);
        assert_eq!(doc["changed_bytes"], 3 * 65536);
        assert_eq!(doc["records_walked"], 7);
    }
}
