//! Sans-IO state machine for the fixed-newstyle handshake (option haggling).
//!
//! The I/O shell feeds client bytes in with [`Handshake::feed`] and repeatedly asks
//! [`Handshake::step`] what to do next: write bytes, read more, look something up in the
//! export set, or leave the handshake. Malformed *option contents* get an error reply and
//! the negotiation continues; only a broken framing (bad magic, unknown client flags) or
//! an unknown name in OPT_EXPORT_NAME ends the connection, as the protocol requires.

use bytes::{Buf, BytesMut};
use thiserror::Error;

use super::consts::*;
use super::export::ExportInfo;

/// Tunables of the negotiation.
#[derive(Clone, Debug)]
pub struct HandshakeConfig {
    /// Offer structured replies when the client asks (OPT_STRUCTURED_REPLY).
    pub structured_replies: bool,
    /// Option payloads longer than this are skipped and refused with REP_ERR_TOO_BIG.
    pub max_option_len: u32,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            structured_replies: true,
            // Name (4096) + info requests; anything larger is not a real option.
            max_option_len: 16 * 1024,
        }
    }
}

/// What the shell must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// Send these bytes to the client, then call `step` again.
    Write(Vec<u8>),
    /// Read more bytes from the client, `feed` them, then call `step` again. End of
    /// stream here is a client hard disconnect.
    ReadMore,
    /// Answer with [`Handshake::exports_listed`].
    ListExports,
    /// Open the named export; answer with [`Handshake::export_opened`]. When the
    /// handshake finishes, the export opened by the last lookup is the one to serve.
    OpenExport { name: String },
    /// The handshake is over; serve `Negotiated` (bytes fed beyond the handshake are
    /// available from [`Handshake::into_leftover`]).
    Transmission(Negotiated),
    /// The client aborted with OPT_ABORT (already acknowledged): close the connection.
    Aborted,
}

/// The outcome of a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportInfo,
    pub structured_replies: bool,
}

/// Why a handshake ended the connection.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("client sent unknown handshake flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option header has magic {0:#018x}, expected IHAVEOPT")]
    BadOptionMagic(u64),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExportName(String),
    #[error("{0} called while the handshake was not waiting for it")]
    UnexpectedAnswer(&'static str),
}

#[derive(Debug)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData {
        option: u32,
        len: u32,
    },
    /// Skipping an option payload we will not buffer; `reply` is sent afterwards.
    Discard {
        option: u32,
        remaining: u64,
        reply: u32,
    },
    AwaitList,
    AwaitExport(Lookup),
    Done,
}

#[derive(Debug)]
enum Lookup {
    ExportName { name: String },
    Info { option: u32, requests: Vec<u16> },
}

/// The handshake of one connection, from the server's point of view.
#[derive(Debug)]
pub struct Handshake {
    config: HandshakeConfig,
    state: State,
    input: BytesMut,
    output: Vec<u8>,
    no_zeroes: bool,
    structured_replies: bool,
    finished: Option<HandshakeStep>,
}

impl Handshake {
    /// Starts a handshake; the server greeting is the first `Write` step.
    pub fn new(config: HandshakeConfig) -> Handshake {
        let mut output = Vec::with_capacity(18);
        output.extend_from_slice(&NBDMAGIC.to_be_bytes());
        output.extend_from_slice(&IHAVEOPT.to_be_bytes());
        output.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Handshake {
            config,
            state: State::ClientFlags,
            input: BytesMut::new(),
            output,
            no_zeroes: false,
            structured_replies: false,
            finished: None,
        }
    }

    /// Appends bytes received from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// Bytes the client sent after the end of the handshake (normally none).
    pub fn into_leftover(self) -> BytesMut {
        self.input
    }

    /// Advances the state machine as far as the fed input allows.
    pub fn step(&mut self) -> Result<HandshakeStep, HandshakeError> {
        loop {
            if !self.output.is_empty() {
                return Ok(HandshakeStep::Write(std::mem::take(&mut self.output)));
            }
            if let Some(step) = self.finished.take() {
                self.state = State::Done;
                return Ok(step);
            }
            match self.state {
                State::ClientFlags => {
                    if self.input.len() < 4 {
                        return Ok(HandshakeStep::ReadMore);
                    }
                    let flags = self.input.get_u32();
                    let unknown = flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
                    if unknown != 0 {
                        return Err(HandshakeError::UnknownClientFlags(flags));
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    if self.input.len() < 16 {
                        return Ok(HandshakeStep::ReadMore);
                    }
                    let magic = self.input.get_u64();
                    if magic != IHAVEOPT {
                        return Err(HandshakeError::BadOptionMagic(magic));
                    }
                    let option = self.input.get_u32();
                    let len = self.input.get_u32();
                    self.state = if is_known_option(option) && len <= self.config.max_option_len {
                        State::OptionData { option, len }
                    } else {
                        let reply = if is_known_option(option) {
                            REP_ERR_TOO_BIG
                        } else {
                            REP_ERR_UNSUP
                        };
                        State::Discard {
                            option,
                            remaining: u64::from(len),
                            reply,
                        }
                    };
                }
                State::Discard {
                    option,
                    remaining,
                    reply,
                } => {
                    let skip = remaining.min(self.input.len() as u64);
                    self.input.advance(skip as usize);
                    let remaining = remaining - skip;
                    if remaining > 0 {
                        self.state = State::Discard {
                            option,
                            remaining,
                            reply,
                        };
                        return Ok(HandshakeStep::ReadMore);
                    }
                    let message = if reply == REP_ERR_UNSUP {
                        format!("option {option} is not supported by this server")
                    } else {
                        "option payload too large".to_owned()
                    };
                    self.reply(option, reply, message.as_bytes());
                    self.state = State::OptionHeader;
                }
                State::OptionData { option, len } => {
                    if self.input.len() < len as usize {
                        return Ok(HandshakeStep::ReadMore);
                    }
                    let data = self.input.split_to(len as usize);
                    if let Some(step) = self.handle_option(option, &data)? {
                        return Ok(step);
                    }
                }
                State::AwaitList => return Err(HandshakeError::UnexpectedAnswer("step")),
                State::AwaitExport(_) => return Err(HandshakeError::UnexpectedAnswer("step")),
                State::Done => return Err(HandshakeError::UnexpectedAnswer("step")),
            }
        }
    }

    /// Answer to [`HandshakeStep::ListExports`].
    pub fn exports_listed(&mut self, exports: &[ExportInfo]) -> Result<(), HandshakeError> {
        if !matches!(self.state, State::AwaitList) {
            return Err(HandshakeError::UnexpectedAnswer("exports_listed"));
        }
        for export in exports {
            let name = truncate_utf8(&export.name, MAX_STRING_LEN);
            let mut data = Vec::with_capacity(4 + name.len());
            data.extend_from_slice(&(name.len() as u32).to_be_bytes());
            data.extend_from_slice(name.as_bytes());
            if let Some(description) = &export.description {
                data.extend_from_slice(truncate_utf8(description, MAX_STRING_LEN).as_bytes());
            }
            self.reply(OPT_LIST, REP_SERVER, &data);
        }
        self.reply(OPT_LIST, REP_ACK, &[]);
        self.state = State::OptionHeader;
        Ok(())
    }

    /// Answer to [`HandshakeStep::OpenExport`]: `None` if there is no such export.
    pub fn export_opened(&mut self, export: Option<&ExportInfo>) -> Result<(), HandshakeError> {
        let lookup = match std::mem::replace(&mut self.state, State::OptionHeader) {
            State::AwaitExport(lookup) => lookup,
            other => {
                self.state = other;
                return Err(HandshakeError::UnexpectedAnswer("export_opened"));
            }
        };
        match (lookup, export) {
            (Lookup::ExportName { name }, None) => {
                // The old option has no error reply: the protocol mandates a disconnect.
                self.state = State::Done;
                Err(HandshakeError::UnknownExportName(name))
            }
            (Lookup::ExportName { .. }, Some(export)) => {
                self.output.extend_from_slice(&export.size.to_be_bytes());
                self.output
                    .extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !self.no_zeroes {
                    self.output.extend_from_slice(&[0u8; 124]);
                }
                self.finish(export);
                Ok(())
            }
            (Lookup::Info { option, .. }, None) => {
                self.reply(option, REP_ERR_UNKNOWN, b"no such export");
                Ok(())
            }
            (Lookup::Info { option, requests }, Some(export)) => {
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.size.to_be_bytes());
                info.extend_from_slice(&export.transmission_flags().to_be_bytes());
                self.reply(option, REP_INFO, &info);
                // Always sent: harmless for clients that did not ask, and it tells
                // every client our (default or stricter) limits.
                let sizes = &export.block_sizes;
                let mut info = Vec::with_capacity(14);
                info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                info.extend_from_slice(&sizes.minimum.to_be_bytes());
                info.extend_from_slice(&sizes.preferred.to_be_bytes());
                info.extend_from_slice(&sizes.maximum_payload.to_be_bytes());
                self.reply(option, REP_INFO, &info);
                if requests.contains(&INFO_NAME) {
                    let mut info = INFO_NAME.to_be_bytes().to_vec();
                    info.extend_from_slice(truncate_utf8(&export.name, MAX_STRING_LEN).as_bytes());
                    self.reply(option, REP_INFO, &info);
                }
                if let (true, Some(description)) = (
                    requests.contains(&INFO_DESCRIPTION),
                    export.description.as_deref(),
                ) {
                    let mut info = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    info.extend_from_slice(truncate_utf8(description, MAX_STRING_LEN).as_bytes());
                    self.reply(option, REP_INFO, &info);
                }
                self.reply(option, REP_ACK, &[]);
                if option == OPT_GO {
                    self.finish(export);
                }
                Ok(())
            }
        }
    }

    fn finish(&mut self, export: &ExportInfo) {
        self.finished = Some(HandshakeStep::Transmission(Negotiated {
            export: export.clone(),
            structured_replies: self.structured_replies,
        }));
        self.state = State::Done;
    }

    /// Handles one complete option; returns a step when the shell must act.
    fn handle_option(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<HandshakeStep>, HandshakeError> {
        self.state = State::OptionHeader;
        match option {
            OPT_EXPORT_NAME => match std::str::from_utf8(data) {
                Ok(name) if name.len() <= MAX_STRING_LEN => {
                    self.state = State::AwaitExport(Lookup::ExportName {
                        name: name.to_owned(),
                    });
                    Ok(Some(HandshakeStep::OpenExport {
                        name: name.to_owned(),
                    }))
                }
                // No error reply exists for this option; an unusable name is "unknown".
                _ => Err(HandshakeError::UnknownExportName(
                    String::from_utf8_lossy(data).into_owned(),
                )),
            },
            OPT_ABORT => {
                self.reply(OPT_ABORT, REP_ACK, &[]);
                self.finished = Some(HandshakeStep::Aborted);
                Ok(None)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply(OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    return Ok(None);
                }
                self.state = State::AwaitList;
                Ok(Some(HandshakeStep::ListExports))
            }
            OPT_INFO | OPT_GO => match parse_info_request(data) {
                Ok((name, requests)) => {
                    self.state = State::AwaitExport(Lookup::Info { option, requests });
                    Ok(Some(HandshakeStep::OpenExport { name }))
                }
                Err(message) => {
                    self.reply(option, REP_ERR_INVALID, message.as_bytes());
                    Ok(None)
                }
            },
            OPT_STRUCTURED_REPLY => {
                if !self.config.structured_replies {
                    self.reply(option, REP_ERR_UNSUP, b"structured replies are disabled");
                } else if !data.is_empty() {
                    self.reply(
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else if self.structured_replies {
                    self.reply(
                        option,
                        REP_ERR_INVALID,
                        b"structured replies already negotiated",
                    );
                } else {
                    self.structured_replies = true;
                    self.reply(option, REP_ACK, &[]);
                }
                Ok(None)
            }
            OPT_STARTTLS => {
                self.reply(option, REP_ERR_POLICY, b"TLS is not offered by this server");
                Ok(None)
            }
            _ => {
                self.reply(option, REP_ERR_UNSUP, b"option not supported");
                Ok(None)
            }
        }
    }

    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        self.output
            .extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.output.extend_from_slice(&option.to_be_bytes());
        self.output.extend_from_slice(&reply_type.to_be_bytes());
        self.output
            .extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.output.extend_from_slice(data);
    }
}

/// Options whose payload we parse (everything else is skipped unbuffered).
fn is_known_option(option: u32) -> bool {
    matches!(
        option,
        OPT_EXPORT_NAME
            | OPT_ABORT
            | OPT_LIST
            | OPT_STARTTLS
            | OPT_INFO
            | OPT_GO
            | OPT_STRUCTURED_REPLY
    )
}

/// Parses the OPT_INFO / OPT_GO payload: name length, name, count, info requests.
pub fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), String> {
    let mut rest = data;
    if rest.len() < 4 {
        return Err("payload shorter than the name length field".into());
    }
    let name_len = rest.get_u32() as usize;
    if name_len > MAX_STRING_LEN {
        return Err(format!("export name of {name_len} bytes exceeds 4096"));
    }
    if rest.len() < name_len + 2 {
        return Err("payload shorter than the export name and request count".into());
    }
    let name = std::str::from_utf8(&rest[..name_len])
        .map_err(|_| "export name is not UTF-8".to_owned())?
        .to_owned();
    rest.advance(name_len);
    let count = rest.get_u16() as usize;
    if rest.len() != count * 2 {
        return Err(format!(
            "{count} information requests announced but {} bytes follow",
            rest.len()
        ));
    }
    let requests = (0..count).map(|_| rest.get_u16()).collect();
    Ok((name, requests))
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::export::{BlockSizes, ExportFeatures};
    use proptest::prelude::*;

    fn export(name: &str) -> ExportInfo {
        ExportInfo {
            name: name.to_owned(),
            description: Some("a test disk".into()),
            size: 1 << 20,
            read_only: false,
            features: ExportFeatures::default(),
            block_sizes: BlockSizes::default(),
        }
    }

    fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    fn go_data(name: &str) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        data
    }

    /// Drives a handshake over `input` delivered in the given chunk sizes, answering
    /// lookups from an export set containing "disk". Returns everything written and
    /// the final outcome.
    fn drive(
        input: &[u8],
        chunks: &[usize],
    ) -> (Vec<u8>, Result<Option<Negotiated>, HandshakeError>) {
        let mut hs = Handshake::new(HandshakeConfig::default());
        let mut written = Vec::new();
        let mut pos = 0;
        let mut chunk = chunks.iter().cycle();
        loop {
            match hs.step() {
                Ok(HandshakeStep::Write(bytes)) => written.extend_from_slice(&bytes),
                Ok(HandshakeStep::ReadMore) => {
                    if pos == input.len() {
                        return (written, Ok(None));
                    }
                    let n = (*chunk.next().unwrap()).max(1).min(input.len() - pos);
                    hs.feed(&input[pos..pos + n]);
                    pos += n;
                }
                Ok(HandshakeStep::ListExports) => hs.exports_listed(&[export("disk")]).unwrap(),
                Ok(HandshakeStep::OpenExport { name }) => {
                    let found = (name == "disk" || name.is_empty()).then(|| export("disk"));
                    if let Err(e) = hs.export_opened(found.as_ref()) {
                        return (written, Err(e));
                    }
                }
                Ok(HandshakeStep::Transmission(n)) => return (written, Ok(Some(n))),
                Ok(HandshakeStep::Aborted) => return (written, Ok(None)),
                Err(e) => return (written, Err(e)),
            }
        }
    }

    fn conversation() -> Vec<u8> {
        let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        input.extend(option(0x1234, &[9; 100]));
        input.extend(option(OPT_LIST, &[]));
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_INFO, &go_data("missing")));
        input.extend(option(OPT_GO, &go_data("disk")));
        input
    }

    #[test]
    fn result_does_not_depend_on_how_input_is_split() {
        let input = conversation();
        let (whole, outcome) = drive(&input, &[input.len()]);
        let negotiated = outcome.unwrap().expect("reached transmission");
        assert!(negotiated.structured_replies);
        assert_eq!(negotiated.export.name, "disk");
        let seed = csnap_proto::testing::seed(
            "result_does_not_depend_on_how_input_is_split",
            "NBD_TEST_SEED",
        );
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        for _ in 0..200 {
            let chunks: Vec<usize> = (0..8)
                .map(|_| rand::Rng::gen_range(&mut rng, 1..40))
                .collect();
            let (written, outcome) = drive(&input, &chunks);
            assert_eq!(written, whole, "seed {seed}, chunks {chunks:?}");
            assert_eq!(outcome.unwrap(), Some(negotiated.clone()));
        }
    }

    #[test]
    fn replies_are_in_order_and_well_formed() {
        let (written, _) = drive(&conversation(), &[1000]);
        let mut rest = &written[18..];
        let mut seen = Vec::new();
        while !rest.is_empty() {
            assert_eq!(rest.get_u64(), OPTION_REPLY_MAGIC);
            let option = rest.get_u32();
            let kind = rest.get_u32();
            let len = rest.get_u32() as usize;
            rest.advance(len);
            seen.push((option, kind));
        }
        assert_eq!(
            seen,
            vec![
                (0x1234, REP_ERR_UNSUP),
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_ACK),
                (OPT_STRUCTURED_REPLY, REP_ACK),
                (OPT_INFO, REP_ERR_UNKNOWN),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ]
        );
    }

    #[test]
    fn oversized_known_option_is_skipped_with_too_big() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(option(OPT_GO, &vec![0; 100_000]));
        input.extend(option(OPT_GO, &go_data("disk")));
        let (written, outcome) = drive(&input, &[4096]);
        assert!(outcome.unwrap().is_some());
        assert_eq!(
            &written[18 + 8..18 + 16],
            &[
                &OPT_GO.to_be_bytes()[..],
                &REP_ERR_TOO_BIG.to_be_bytes()[..]
            ]
            .concat()[..]
        );
    }

    #[test]
    fn answers_out_of_turn_are_errors_not_panics() {
        let mut hs = Handshake::new(HandshakeConfig::default());
        assert!(hs.exports_listed(&[]).is_err());
        assert!(hs.export_opened(None).is_err());
        assert!(matches!(hs.step(), Ok(HandshakeStep::Write(_))));
    }

    #[test]
    fn info_request_parsing() {
        assert_eq!(parse_info_request(&go_data("x")), Ok(("x".into(), vec![])));
        let mut data = go_data("ab");
        data.truncate(data.len() - 2);
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&[0, 3, 0, 1]);
        assert_eq!(parse_info_request(&data), Ok(("ab".into(), vec![3, 1])));
        assert!(parse_info_request(&[0, 0, 0, 1, b'a']).is_err());
        assert!(
            parse_info_request(&[0, 0, 0, 1, 0xff, 0, 0]).is_err(),
            "not UTF-8"
        );
        assert!(
            parse_info_request(&[0, 0, 0, 0, 0, 1]).is_err(),
            "missing request"
        );
    }

    proptest! {
        /// Arbitrary client bytes never panic the state machine, and every reply it
        /// writes is framed with the option reply magic.
        #[test]
        fn arbitrary_input_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..600), split in 1usize..64) {
            let mut input = 3u32.to_be_bytes().to_vec();
            input.extend(tail);
            let (written, _) = drive(&input, &[split]);
            prop_assert!(written.len() >= 18);
        }

        /// Valid options with random payloads keep the stream in sync: a GO sent after
        /// them always succeeds.
        #[test]
        fn any_option_sequence_keeps_sync(opts in proptest::collection::vec((0u32..16, proptest::collection::vec(any::<u8>(), 0..64)), 0..8)) {
            let mut input = 1u32.to_be_bytes().to_vec();
            for (opt, data) in &opts {
                if matches!(*opt, OPT_EXPORT_NAME | OPT_ABORT | OPT_GO) {
                    continue;
                }
                input.extend(option(*opt, data));
            }
            input.extend(option(OPT_GO, &go_data("disk")));
            let (_, outcome) = drive(&input, &[7]);
            prop_assert_eq!(outcome.map(|n| n.map(|n| n.export.name)), Ok(Some("disk".to_owned())));
        }
    }
}
