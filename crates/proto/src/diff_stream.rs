//! The csnap diff stream: the changed extents of a volume between two snapshots, as
//! `csnapctl export-diff` writes and `csnapctl import-diff` reads, so that
//! `export-diff | ssh other import-diff` replicates a volume incrementally.
//!
//! Versioned and checksummed so a reader can refuse a foreign, newer, truncated or damaged
//! stream before it changes anything. All integers little-endian; docs/wire-protocol.md
//! ("Diff stream") has the byte layout:
//!
//! ```text
//! header   "CSNAPDIF" version:u32 volume_bytes:u64 chunk_bytes:u32 created:u64
//!          from_len:u16 from to_len:u16 to crc:u32
//! record*  'D' offset:u64 len:u32 data[len] crc:u32      data to write at offset
//!          'Z' offset:u64 len:u64 crc:u32                zeroes at offset
//! end      'E' records:u64 data_bytes:u64 stream_crc:u32 crc:u32
//! ```
//!
//! Every record's `crc` is CRC-32C over the record from its kind byte up to the crc;
//! `stream_crc` is CRC-32C over every byte of the stream before the end record, so a
//! dropped or reordered record is caught too. Extents are ascending and disjoint and lie
//! inside the volume. An empty `from` means the stream holds the whole of `to` (a full
//! export), to be imported onto an empty volume.

use std::io::{self, Read, Write};

use crate::types::validate_snapshot_name;

/// First bytes of every diff stream.
pub const MAGIC: [u8; 8] = *b"CSNAPDIF";
/// The stream version this build writes and reads.
pub const VERSION: u32 = 1;
/// Largest data record a writer emits and a reader accepts (a reader never allocates more
/// for one record, whatever the stream says).
pub const MAX_DATA_RECORD: u32 = 16 << 20;

const KIND_DATA: u8 = b'D';
const KIND_ZERO: u8 = b'Z';
const KIND_END: u8 = b'E';

/// What a diff stream is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// Size of the volume in bytes.
    pub volume_bytes: u64,
    /// The exporting store's chunk size (extents are whole chunks, except at the volume's
    /// end); informational for the importer.
    pub chunk_bytes: u32,
    /// When the export began, Unix seconds.
    pub created: u64,
    /// The snapshot the stream starts from; `None` for a full export.
    pub from: Option<String>,
    /// The snapshot whose contents the stream brings the volume to.
    pub to: String,
}

/// One changed extent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Extent {
    /// These bytes at `offset`.
    Data {
        /// Byte offset in the volume.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// `len` zero bytes at `offset`.
    Zero {
        /// Byte offset in the volume.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

impl Extent {
    /// Where it starts (byte offset in the volume).
    pub fn offset(&self) -> u64 {
        match self {
            Extent::Data { offset, .. } | Extent::Zero { offset, .. } => *offset,
        }
    }

    /// How many bytes it covers.
    pub fn len(&self) -> u64 {
        match self {
            Extent::Data { data, .. } => data.len() as u64,
            Extent::Zero { len, .. } => *len,
        }
    }

    /// Whether it covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Totals of a complete stream (its end record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSummary {
    /// Extent records.
    pub records: u64,
    /// Bytes the extents cover (data and zeroes).
    pub extent_bytes: u64,
}

/// Why a diff stream cannot be read or written.
#[derive(Debug, thiserror::Error)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
pub enum StreamError {
    #[error("not a csnap diff stream (it starts with {found:02x?}, not \"CSNAPDIF\")")]
    BadMagic { found: [u8; 8] },
    #[error("diff stream version {found} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error("the diff stream is truncated: it ends at byte {at}, inside {inside}, before its end record")]
    Truncated { at: u64, inside: &'static str },
    #[error("the diff stream is damaged: {what} at byte {at} fails its checksum")]
    Checksum { what: &'static str, at: u64 },
    #[error("the diff stream is damaged at byte {at}: {what}")]
    Invalid { at: u64, what: String },
    #[error("diff stream: {0}")]
    Io(#[from] io::Error),
}

/// CRC-32C of `bytes` continued from `crc`.
fn crc(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

/// Writes a diff stream: the header first, then ascending extents, then `finish`.
pub struct StreamWriter<W: Write> {
    out: W,
    volume_bytes: u64,
    stream_crc: u32,
    summary: StreamSummary,
    /// End of the last extent written: the next must start at or after it.
    end_of_last: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the header. Refuses names that are not valid snapshot names.
    pub fn new(mut out: W, header: &StreamHeader) -> Result<Self, StreamError> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&header.volume_bytes.to_le_bytes());
        b.extend_from_slice(&header.chunk_bytes.to_le_bytes());
        b.extend_from_slice(&header.created.to_le_bytes());
        // An empty `from` is a full export; `to` always names a snapshot.
        let from = header.from.as_deref().unwrap_or("");
        for (name, may_be_empty) in [(from, true), (header.to.as_str(), false)] {
            if !(may_be_empty && name.is_empty()) {
                validate_snapshot_name(name).map_err(|why| StreamError::Invalid {
                    at: 0,
                    what: format!("snapshot name {name:?}: {why}"),
                })?;
            }
            let len = u16::try_from(name.len()).map_err(|_| StreamError::Invalid {
                at: 0,
                what: "snapshot name longer than 65535 bytes".into(),
            })?;
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        let c = crc(0, &b);
        b.extend_from_slice(&c.to_le_bytes());
        out.write_all(&b)?;
        Ok(StreamWriter {
            out,
            volume_bytes: header.volume_bytes,
            stream_crc: crc(0, &b),
            summary: StreamSummary::default(),
            end_of_last: 0,
        })
    }

    fn check_extent(&self, offset: u64, len: u64) -> Result<(), StreamError> {
        let end = offset.checked_add(len).filter(|e| *e <= self.volume_bytes);
        if len == 0 || end.is_none() || offset < self.end_of_last {
            return Err(StreamError::Invalid {
                at: 0,
                what: format!(
                    "extent {offset}+{len} is empty, past the volume's {} bytes, or before the previous extent's end {}",
                    self.volume_bytes, self.end_of_last
                ),
            });
        }
        Ok(())
    }

    fn emit(&mut self, record: &[u8]) -> Result<(), StreamError> {
        self.out.write_all(record)?;
        self.stream_crc = crc(self.stream_crc, record);
        Ok(())
    }

    /// Writes `data` at `offset` (split into records of at most `MAX_DATA_RECORD` bytes).
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<(), StreamError> {
        self.check_extent(offset, data.len() as u64)?;
        let mut at = offset;
        for piece in data.chunks(MAX_DATA_RECORD as usize) {
            let mut head = [0u8; 13];
            head[0] = KIND_DATA;
            head[1..9].copy_from_slice(&at.to_le_bytes());
            head[9..13].copy_from_slice(&(piece.len() as u32).to_le_bytes());
            let c = crc(crc(0, &head), piece);
            self.out.write_all(&head)?;
            self.out.write_all(piece)?;
            self.out.write_all(&c.to_le_bytes())?;
            self.stream_crc = crc(crc(crc(self.stream_crc, &head), piece), &c.to_le_bytes());
            self.summary.records += 1;
            at += piece.len() as u64;
        }
        self.summary.extent_bytes += data.len() as u64;
        self.end_of_last = at;
        Ok(())
    }

    /// Writes `len` zero bytes at `offset`.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), StreamError> {
        self.check_extent(offset, len)?;
        let mut r = [0u8; 21];
        r[0] = KIND_ZERO;
        r[1..9].copy_from_slice(&offset.to_le_bytes());
        r[9..17].copy_from_slice(&len.to_le_bytes());
        let c = crc(0, &r[..17]);
        r[17..].copy_from_slice(&c.to_le_bytes());
        self.emit(&r)?;
        self.summary.records += 1;
        self.summary.extent_bytes += len;
        self.end_of_last = offset + len;
        Ok(())
    }

    /// Writes the end record and flushes; returns the totals and the writer's output.
    pub fn finish(mut self) -> Result<(StreamSummary, W), StreamError> {
        let mut r = [0u8; 25];
        r[0] = KIND_END;
        r[1..9].copy_from_slice(&self.summary.records.to_le_bytes());
        r[9..17].copy_from_slice(&self.summary.extent_bytes.to_le_bytes());
        r[17..21].copy_from_slice(&self.stream_crc.to_le_bytes());
        let c = crc(0, &r[..21]);
        r[21..].copy_from_slice(&c.to_le_bytes());
        self.out.write_all(&r)?;
        self.out.flush()?;
        Ok((self.summary, self.out))
    }
}

/// Reads a diff stream, checking every record as it comes. `next` returns `Ok(None)` only
/// after a valid end record whose totals and stream checksum match what was read, so a
/// caller that applies extents only after that (or stages them) never applies a truncated
/// or damaged stream.
pub struct StreamReader<R: Read> {
    input: R,
    header: StreamHeader,
    /// Bytes consumed so far (for error positions).
    at: u64,
    stream_crc: u32,
    summary: StreamSummary,
    end_of_last: u64,
    done: bool,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self, StreamError> {
        let mut at = 0u64;
        let mut fixed = [0u8; 32];
        // The magic alone first, so a short foreign file is called foreign, not truncated.
        read_exact(&mut input, &mut fixed[..8], &mut at, "the header")?;
        let magic: [u8; 8] = fixed[..8].try_into().unwrap_or_default();
        if magic != MAGIC {
            return Err(StreamError::BadMagic { found: magic });
        }
        read_exact(&mut input, &mut fixed[8..], &mut at, "the header")?;
        let version = u32_at(&fixed, 8);
        if version != VERSION {
            return Err(StreamError::UnsupportedVersion { found: version });
        }
        let mut running = crc(0, &fixed);
        let mut names = Vec::with_capacity(2);
        for _ in 0..2 {
            let mut len = [0u8; 2];
            read_exact(&mut input, &mut len, &mut at, "the header")?;
            running = crc(running, &len);
            let mut name = vec![0u8; usize::from(u16::from_le_bytes(len))];
            read_exact(&mut input, &mut name, &mut at, "the header")?;
            running = crc(running, &name);
            names.push(name);
        }
        let mut stored = [0u8; 4];
        read_exact(&mut input, &mut stored, &mut at, "the header")?;
        if u32::from_le_bytes(stored) != running {
            return Err(StreamError::Checksum {
                what: "the header",
                at: 0,
            });
        }
        let mut names = names.into_iter().map(|n| {
            String::from_utf8(n).map_err(|_| StreamError::Invalid {
                at: 0,
                what: "a snapshot name is not UTF-8".into(),
            })
        });
        let from = names.next().transpose()?.filter(|n| !n.is_empty());
        let to = names.next().transpose()?.unwrap_or_default();
        for name in from.iter().chain(std::iter::once(&to)) {
            validate_snapshot_name(name).map_err(|why| StreamError::Invalid {
                at: 0,
                what: format!("snapshot name {name:?}: {why}"),
            })?;
        }
        let header = StreamHeader {
            volume_bytes: u64_at(&fixed, 12),
            chunk_bytes: u32_at(&fixed, 20),
            created: u64_at(&fixed, 24),
            from,
            to,
        };
        let stream_crc = crc(running, &stored);
        Ok(StreamReader {
            input,
            header,
            at,
            stream_crc,
            summary: StreamSummary::default(),
            end_of_last: 0,
            done: false,
        })
    }

    /// The stream's header, as read.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// The totals read so far (all of them once `next` returned `Ok(None)`).
    pub fn summary(&self) -> StreamSummary {
        self.summary
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.at
    }

    fn invalid(&self, at: u64, what: String) -> StreamError {
        StreamError::Invalid { at, what }
    }

    /// The next extent, or `None` after the verified end record.
    pub fn next_extent(&mut self) -> Result<Option<Extent>, StreamError> {
        if self.done {
            return Ok(None);
        }
        let start = self.at;
        let mut kind = [0u8; 1];
        read_exact(&mut self.input, &mut kind, &mut self.at, "a record")?;
        match kind[0] {
            KIND_DATA => {
                let mut head = [0u8; 13];
                head[0] = KIND_DATA;
                read_exact(
                    &mut self.input,
                    &mut head[1..],
                    &mut self.at,
                    "a data record",
                )?;
                let offset = u64_at(&head, 1);
                let len = u32_at(&head, 9);
                if len > MAX_DATA_RECORD {
                    return Err(self.invalid(
                        start,
                        format!("a data record of {len} bytes (at most {MAX_DATA_RECORD})"),
                    ));
                }
                self.check_extent(start, offset, u64::from(len))?;
                let mut data = vec![0u8; len as usize];
                read_exact(&mut self.input, &mut data, &mut self.at, "a data record")?;
                let mut stored = [0u8; 4];
                read_exact(&mut self.input, &mut stored, &mut self.at, "a data record")?;
                if u32::from_le_bytes(stored) != crc(crc(0, &head), &data) {
                    return Err(StreamError::Checksum {
                        what: "a data record",
                        at: start,
                    });
                }
                self.stream_crc = crc(crc(crc(self.stream_crc, &head), &data), &stored);
                self.accept(offset, u64::from(len));
                Ok(Some(Extent::Data { offset, data }))
            }
            KIND_ZERO => {
                let mut r = [0u8; 21];
                r[0] = KIND_ZERO;
                read_exact(&mut self.input, &mut r[1..], &mut self.at, "a zero record")?;
                if u32_at(&r, 17) != crc(0, &r[..17]) {
                    return Err(StreamError::Checksum {
                        what: "a zero record",
                        at: start,
                    });
                }
                let (offset, len) = (u64_at(&r, 1), u64_at(&r, 9));
                self.check_extent(start, offset, len)?;
                self.stream_crc = crc(self.stream_crc, &r);
                self.accept(offset, len);
                Ok(Some(Extent::Zero { offset, len }))
            }
            KIND_END => {
                let mut r = [0u8; 25];
                r[0] = KIND_END;
                read_exact(&mut self.input, &mut r[1..], &mut self.at, "the end record")?;
                if u32_at(&r, 21) != crc(0, &r[..21]) {
                    return Err(StreamError::Checksum {
                        what: "the end record",
                        at: start,
                    });
                }
                let (records, bytes) = (u64_at(&r, 1), u64_at(&r, 9));
                if records != self.summary.records || bytes != self.summary.extent_bytes {
                    return Err(self.invalid(
                        start,
                        format!(
                            "the end record counts {records} records of {bytes} bytes, the stream had {} of {}",
                            self.summary.records, self.summary.extent_bytes
                        ),
                    ));
                }
                if u32_at(&r, 17) != self.stream_crc {
                    return Err(StreamError::Checksum {
                        what: "the stream as a whole (a record is missing, repeated or reordered)",
                        at: start,
                    });
                }
                let mut extra = [0u8; 1];
                match self.input.read(&mut extra) {
                    Ok(0) => {}
                    Ok(_) => return Err(self.invalid(self.at, "bytes after the end record".into())),
                    Err(e) => return Err(StreamError::Io(e)),
                }
                self.done = true;
                Ok(None)
            }
            other => Err(self.invalid(start, format!("unknown record kind 0x{other:02x}"))),
        }
    }

    fn check_extent(&self, at: u64, offset: u64, len: u64) -> Result<(), StreamError> {
        let end = offset.checked_add(len);
        if len == 0 {
            return Err(self.invalid(at, "an empty extent".into()));
        }
        if end.is_none_or(|e| e > self.header.volume_bytes) {
            return Err(self.invalid(
                at,
                format!(
                    "extent {offset}+{len} ends past the volume's {} bytes",
                    self.header.volume_bytes
                ),
            ));
        }
        if offset < self.end_of_last {
            return Err(self.invalid(
                at,
                format!(
                    "extent at {offset} starts before the previous one's end {}",
                    self.end_of_last
                ),
            ));
        }
        Ok(())
    }

    fn accept(&mut self, offset: u64, len: u64) {
        self.summary.records += 1;
        self.summary.extent_bytes += len;
        self.end_of_last = offset + len;
    }
}

fn read_exact(
    input: &mut impl Read,
    buf: &mut [u8],
    at: &mut u64,
    inside: &'static str,
) -> Result<(), StreamError> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(StreamError::Truncated {
                    at: *at + filled as u64,
                    inside,
                })
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StreamError::Io(e)),
        }
    }
    *at += buf.len() as u64;
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(from: Option<&str>) -> StreamHeader {
        StreamHeader {
            volume_bytes: 1 << 20,
            chunk_bytes: 64 << 10,
            created: 1_790_000_000,
            from: from.map(str::to_owned),
            to: "tuesday".into(),
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), &header(Some("monday"))).unwrap();
        w.data(0, &[7u8; 4096]).unwrap();
        w.zero(65536, 65536).unwrap();
        w.data(200_000, b"hello").unwrap();
        let (summary, out) = w.finish().unwrap();
        assert_eq!(
            summary,
            StreamSummary {
                records: 3,
                extent_bytes: 4096 + 65536 + 5
            }
        );
        out
    }

    fn read_all(bytes: &[u8]) -> Result<(StreamHeader, Vec<Extent>), StreamError> {
        let mut r = StreamReader::new(bytes)?;
        let mut out = Vec::new();
        while let Some(e) = r.next_extent()? {
            out.push(e);
        }
        Ok((r.header().clone(), out))
    }

    #[test]
    fn a_stream_reads_back_as_written() {
        let (h, extents) = read_all(&sample()).unwrap();
        assert_eq!(h, header(Some("monday")));
        assert_eq!(
            extents,
            vec![
                Extent::Data {
                    offset: 0,
                    data: vec![7u8; 4096]
                },
                Extent::Zero {
                    offset: 65536,
                    len: 65536
                },
                Extent::Data {
                    offset: 200_000,
                    data: b"hello".to_vec()
                },
            ]
        );
        // A full export has no `from`.
        let w = StreamWriter::new(Vec::new(), &header(None)).unwrap();
        let (_, out) = w.finish().unwrap();
        assert_eq!(read_all(&out).unwrap().0.from, None);
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            match read_all(&bytes[..cut]) {
                Err(StreamError::Truncated { at, .. }) => assert_eq!(at, cut as u64),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let bytes = sample();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[i] ^= 1 << bit;
                assert!(
                    read_all(&damaged).is_err(),
                    "byte {i} bit {bit} flipped went unnoticed"
                );
            }
        }
    }

    #[test]
    fn a_dropped_or_repeated_record_is_refused() {
        let mut w = StreamWriter::new(Vec::new(), &header(None)).unwrap();
        w.zero(0, 10).unwrap();
        w.zero(100, 10).unwrap();
        let (_, bytes) = w.finish().unwrap();
        let head_len = bytes.len() - 2 * 21 - 25;
        let (head, rest) = bytes.split_at(head_len);
        let (first, rest) = rest.split_at(21);
        let (_second, end) = rest.split_at(21);
        let dropped: Vec<u8> = [head, first, end].concat();
        assert!(matches!(
            read_all(&dropped),
            Err(StreamError::Invalid { .. })
        ));
        let repeated: Vec<u8> = [head, first, first, end].concat();
        assert!(read_all(&repeated).is_err());
        let extra: Vec<u8> = [bytes.as_slice(), b"x"].concat();
        assert!(matches!(read_all(&extra), Err(StreamError::Invalid { .. })));
    }

    #[test]
    fn foreign_and_newer_streams_name_what_is_wrong() {
        let mut bytes = sample();
        let e = read_all(b"qcow2 image, surely not a diff").unwrap_err();
        assert!(e.to_string().contains("not a csnap diff stream"), "{e}");
        bytes[8] = 2;
        let e = read_all(&bytes).unwrap_err();
        assert!(
            matches!(e, StreamError::UnsupportedVersion { found: 2 }),
            "{e}"
        );
    }

    #[test]
    fn writers_refuse_extents_out_of_order_or_outside_the_volume() {
        let mut w = StreamWriter::new(Vec::new(), &header(None)).unwrap();
        w.data(4096, &[1; 10]).unwrap();
        assert!(w.data(0, &[1; 10]).is_err());
        assert!(w.zero((1 << 20) - 5, 10).is_err());
        assert!(w.zero(8192, 0).is_err());
        let bad = StreamHeader {
            to: "a/b".into(),
            ..header(None)
        };
        assert!(StreamWriter::new(Vec::new(), &bad).is_err());
    }
}
