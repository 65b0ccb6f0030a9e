//! Sans-IO state machine for the fixed-newstyle handshake (option haggling).
//!
//! The same shape as the server engine and the cluster core: the I/O shell hands inputs
//! in with [`Handshake::handle`] (client bytes, or the answer to a lookup) and asks
//! [`Handshake::poll_output`] what to do next: write bytes, read more, look something up
//! in the export set, or leave the handshake. It has no `poll_timeout`: nothing in the
//! negotiation changes with time. Its one deadline, the whole handshake's
//! ([`ServerConfig::handshake_timeout`](super::server::ServerConfig::handshake_timeout)),
//! ends the connection whatever state it is in, so the shell applies it around the
//! negotiation.
//!
//! Malformed *option contents* get an error reply and the negotiation continues; only a
//! broken framing (bad magic, unknown client flags) or an unknown name in OPT_EXPORT_NAME
//! ends the connection, as the protocol requires.

use bytes::{Buf, BytesMut};
use thiserror::Error;

use super::consts::*;
use super::export::{ExportInfo, MetaContext};

/// Most metadata contexts one NBD_OPT_SET_META_CONTEXT may select: each costs one reply
/// chunk (and one backend lookup) per NBD_CMD_BLOCK_STATUS.
pub const MAX_SELECTED_CONTEXTS: usize = 32;

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

/// What the shell must do next (from [`Handshake::poll_output`]).
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeOutput {
    /// Send these bytes to the client, then poll again.
    Write(Vec<u8>),
    /// Read more bytes from the client and hand them in ([`HandshakeInput::Bytes`]),
    /// then poll again. End of stream here is a client hard disconnect.
    ReadMore,
    /// List the exports; answer with [`HandshakeInput::ExportsListed`].
    ListExports,
    /// Open the named export; answer with [`HandshakeInput::ExportOpened`]. When the
    /// handshake finishes, the export opened by the last lookup is the one to serve.
    OpenExport {
        /// The export's name, as the client gave it.
        name: String,
    },
    /// The handshake is over; serve `Negotiated` (bytes fed beyond the handshake are
    /// available from [`Handshake::into_leftover`]).
    Transmission(Negotiated),
    /// The client aborted with OPT_ABORT (already acknowledged): close the connection.
    Aborted,
    /// Find the metadata contexts export `name` offers (NBD_OPT_LIST_META_CONTEXT or
    /// NBD_OPT_SET_META_CONTEXT); answer with [`HandshakeInput::MetaContexts`].
    MetaContexts {
        /// The export's name, as the client gave it.
        name: String,
    },
}

/// What the shell hands the handshake ([`Handshake::handle`]): bytes from the client, or
/// the answer to the lookup the last [`HandshakeOutput`] asked for.
#[derive(Debug)]
pub enum HandshakeInput<'a> {
    /// Bytes received from the client.
    Bytes(&'a [u8]),
    /// Answer to [`HandshakeOutput::ListExports`].
    ExportsListed(&'a [ExportInfo]),
    /// Answer to [`HandshakeOutput::OpenExport`]: `None` if there is no such export.
    ExportOpened(Option<&'a ExportInfo>),
    /// Answer to [`HandshakeOutput::MetaContexts`]: every context the export offers, or
    /// `None` if there is no such export.
    MetaContexts(Option<&'a [MetaContext]>),
}

/// A metadata context selected with NBD_OPT_SET_META_CONTEXT, under the id the server
/// gave it (sent back in every NBD_REPLY_TYPE_BLOCK_STATUS chunk for it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectedContext {
    /// The id the client was told.
    pub id: u32,
    /// The context it stands for.
    pub context: MetaContext,
}

/// The outcome of a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The export to serve.
    pub export: ExportInfo,
    /// Whether the client asked for structured replies and got them.
    pub structured_replies: bool,
    /// The contexts of the last NBD_OPT_SET_META_CONTEXT, if it named the export that
    /// was finally selected (empty otherwise: NBD_CMD_BLOCK_STATUS is then refused).
    pub meta_contexts: Vec<SelectedContext>,
}

/// Why a handshake ended the connection.
#[derive(Debug, Error, PartialEq, Eq)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
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
    AwaitMeta(MetaLookup),
    Done,
}

/// A LIST or SET of metadata contexts waiting for the export's offer.
#[derive(Debug)]
struct MetaLookup {
    option: u32,
    export: String,
    queries: Vec<String>,
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
    finished: Option<HandshakeOutput>,
    /// The export named by the last NBD_OPT_SET_META_CONTEXT and what it selected.
    selection: Option<(String, Vec<SelectedContext>)>,
    /// Context ids are unique within the connection, so a stale one is never reused.
    next_context_id: u32,
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
            selection: None,
            next_context_id: 1,
        }
    }

    /// Takes one input: bytes from the client (never refused), or the answer to a
    /// lookup, refused if it is not the answer the handshake waits for.
    pub fn handle(&mut self, input: HandshakeInput<'_>) -> Result<(), HandshakeError> {
        match input {
            HandshakeInput::Bytes(bytes) => {
                self.input.extend_from_slice(bytes);
                Ok(())
            }
            HandshakeInput::ExportsListed(exports) => self.exports_listed(exports),
            HandshakeInput::ExportOpened(export) => self.export_opened(export),
            HandshakeInput::MetaContexts(offered) => self.meta_contexts_found(offered),
        }
    }

    /// Bytes the client sent after the end of the handshake (normally none).
    pub fn into_leftover(self) -> BytesMut {
        self.input
    }

    /// Advances the state machine as far as the input handed in allows, and says what
    /// the shell must do next.
    pub fn poll_output(&mut self) -> Result<HandshakeOutput, HandshakeError> {
        loop {
            if !self.output.is_empty() {
                return Ok(HandshakeOutput::Write(std::mem::take(&mut self.output)));
            }
            if let Some(step) = self.finished.take() {
                self.state = State::Done;
                return Ok(step);
            }
            match self.state {
                State::ClientFlags => {
                    if self.input.len() < 4 {
                        return Ok(HandshakeOutput::ReadMore);
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
                        return Ok(HandshakeOutput::ReadMore);
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
                        return Ok(HandshakeOutput::ReadMore);
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
                        return Ok(HandshakeOutput::ReadMore);
                    }
                    let data = self.input.split_to(len as usize);
                    if let Some(step) = self.handle_option(option, &data)? {
                        return Ok(step);
                    }
                }
                State::AwaitList | State::AwaitMeta(_) => {
                    return Err(HandshakeError::UnexpectedAnswer("poll_output"))
                }
                State::AwaitExport(_) => {
                    return Err(HandshakeError::UnexpectedAnswer("poll_output"))
                }
                State::Done => return Err(HandshakeError::UnexpectedAnswer("poll_output")),
            }
        }
    }

    fn exports_listed(&mut self, exports: &[ExportInfo]) -> Result<(), HandshakeError> {
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

    fn export_opened(&mut self, export: Option<&ExportInfo>) -> Result<(), HandshakeError> {
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

    fn meta_contexts_found(
        &mut self,
        offered: Option<&[MetaContext]>,
    ) -> Result<(), HandshakeError> {
        let lookup = match std::mem::replace(&mut self.state, State::OptionHeader) {
            State::AwaitMeta(lookup) => lookup,
            other => {
                self.state = other;
                return Err(HandshakeError::UnexpectedAnswer("meta_contexts_found"));
            }
        };
        let MetaLookup {
            option,
            export,
            queries,
        } = lookup;
        let Some(offered) = offered else {
            let message = format!("no export named {:?}", truncate_utf8(&export, 256));
            self.reply(option, REP_ERR_UNKNOWN, message.as_bytes());
            return Ok(());
        };
        let list = option == OPT_LIST_META_CONTEXT;
        let matched = select_contexts(offered, &queries, list);
        if list {
            for context in matched {
                self.reply_context(option, 0, &context.name);
            }
            self.reply(option, REP_ACK, &[]);
            return Ok(());
        }
        if matched.len() > MAX_SELECTED_CONTEXTS {
            let message = format!(
                "{} metadata contexts selected, at most {MAX_SELECTED_CONTEXTS} are allowed",
                matched.len()
            );
            self.reply(option, REP_ERR_TOO_BIG, message.as_bytes());
            return Ok(());
        }
        let mut selected = Vec::with_capacity(matched.len());
        for context in matched {
            let id = self.next_context_id;
            self.next_context_id = self.next_context_id.wrapping_add(1).max(1);
            self.reply_context(option, id, &context.name);
            selected.push(SelectedContext {
                id,
                context: context.clone(),
            });
        }
        self.reply(option, REP_ACK, &[]);
        self.selection = Some((export, selected));
        Ok(())
    }

    fn reply_context(&mut self, option: u32, id: u32, name: &str) {
        let name = truncate_utf8(name, MAX_STRING_LEN);
        let mut data = Vec::with_capacity(4 + name.len());
        data.extend_from_slice(&id.to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        self.reply(option, REP_META_CONTEXT, &data);
    }

    fn finish(&mut self, export: &ExportInfo) {
        // The selection holds only for the export it was made for (the protocol's
        // "same export name" rule).
        let meta_contexts = match self.selection.take() {
            Some((name, selected)) if name == export.name => selected,
            _ => Vec::new(),
        };
        self.finished = Some(HandshakeOutput::Transmission(Negotiated {
            export: export.clone(),
            structured_replies: self.structured_replies,
            meta_contexts,
        }));
        self.state = State::Done;
    }

    /// Handles one complete option; returns a step when the shell must act.
    fn handle_option(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<HandshakeOutput>, HandshakeError> {
        self.state = State::OptionHeader;
        match option {
            OPT_EXPORT_NAME => match std::str::from_utf8(data) {
                Ok(name) if name.len() <= MAX_STRING_LEN => {
                    self.state = State::AwaitExport(Lookup::ExportName {
                        name: name.to_owned(),
                    });
                    Ok(Some(HandshakeOutput::OpenExport {
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
                self.finished = Some(HandshakeOutput::Aborted);
                Ok(None)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply(OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    return Ok(None);
                }
                self.state = State::AwaitList;
                Ok(Some(HandshakeOutput::ListExports))
            }
            OPT_INFO | OPT_GO => match parse_info_request(data) {
                Ok((name, requests)) => {
                    self.state = State::AwaitExport(Lookup::Info { option, requests });
                    Ok(Some(HandshakeOutput::OpenExport { name }))
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
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if option == OPT_SET_META_CONTEXT {
                    // A SET replaces the earlier selection, even when it fails.
                    self.selection = None;
                }
                if !self.structured_replies {
                    self.reply(
                        option,
                        REP_ERR_INVALID,
                        b"metadata contexts need structured replies (NBD_OPT_STRUCTURED_REPLY) first",
                    );
                    return Ok(None);
                }
                match parse_meta_request(data) {
                    Ok((export, queries)) => {
                        if option == OPT_SET_META_CONTEXT && queries.is_empty() {
                            // No query selects nothing; the (empty) selection still
                            // names the export.
                            self.selection = Some((export, Vec::new()));
                            self.reply(option, REP_ACK, &[]);
                            return Ok(None);
                        }
                        self.state = State::AwaitMeta(MetaLookup {
                            option,
                            export: export.clone(),
                            queries,
                        });
                        Ok(Some(HandshakeOutput::MetaContexts { name: export }))
                    }
                    Err(message) => {
                        self.reply(option, REP_ERR_INVALID, message.as_bytes());
                        Ok(None)
                    }
                }
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
            | OPT_LIST_META_CONTEXT
            | OPT_SET_META_CONTEXT
    )
}

/// Parses the NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload: export name
/// length, name, query count, then each query's length and text. Every query must start
/// with a non-empty namespace and a colon.
pub fn parse_meta_request(data: &[u8]) -> Result<(String, Vec<String>), String> {
    let mut rest = data;
    let name = take_string(&mut rest, "export name")?;
    if rest.len() < 4 {
        return Err("payload shorter than the query count".into());
    }
    let count = rest.get_u32();
    // Each query takes at least 4 bytes: a count the payload cannot hold is a lie, and
    // must not size an allocation.
    if u64::from(count) * 4 > rest.len() as u64 {
        return Err(format!(
            "{count} queries announced but only {} bytes follow",
            rest.len()
        ));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for i in 0..count {
        let query = take_string(&mut rest, "query")?;
        match query.split_once(':') {
            Some((namespace, _)) if !namespace.is_empty() => queries.push(query),
            _ => {
                return Err(format!(
                    "query {i} ({:?}) does not start with a namespace and a colon",
                    truncate_utf8(&query, 256)
                ))
            }
        }
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last query", rest.len()));
    }
    Ok((name, queries))
}

/// Reads a 32-bit length and that many bytes of UTF-8 (at most 4096).
fn take_string(rest: &mut &[u8], what: &str) -> Result<String, String> {
    if rest.len() < 4 {
        return Err(format!("payload shorter than the {what} length"));
    }
    let len = rest.get_u32() as usize;
    if len > MAX_STRING_LEN {
        return Err(format!("{what} of {len} bytes exceeds 4096"));
    }
    if rest.len() < len {
        return Err(format!("payload shorter than the {what} of {len} bytes"));
    }
    let text = std::str::from_utf8(&rest[..len])
        .map_err(|_| format!("{what} is not UTF-8"))?
        .to_owned();
    rest.advance(len);
    Ok(text)
}

/// The offered contexts the queries name, each once, in offer order. For a LIST, no
/// query means every context, and a query ending in a colon (`base:`,
/// `qemu:dirty-bitmap:`) is a wildcard for every context whose name starts with it (the
/// `base:` namespace's rule, and qemu's for its own). For a SET only exact names select:
/// the spec says a wildcard there selects nothing, and unknown names are ignored.
pub fn select_contexts<'a>(
    offered: &'a [MetaContext],
    queries: &[String],
    list: bool,
) -> Vec<&'a MetaContext> {
    offered
        .iter()
        .filter(|c| {
            (list && queries.is_empty())
                || queries.iter().any(|q| {
                    *q == c.name || (list && q.ends_with(':') && c.name.starts_with(q.as_str()))
                })
        })
        .collect()
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
            match hs.poll_output() {
                Ok(HandshakeOutput::Write(bytes)) => written.extend_from_slice(&bytes),
                Ok(HandshakeOutput::ReadMore) => {
                    if pos == input.len() {
                        return (written, Ok(None));
                    }
                    let n = (*chunk.next().unwrap()).max(1).min(input.len() - pos);
                    hs.handle(HandshakeInput::Bytes(&input[pos..pos + n]))
                        .unwrap();
                    pos += n;
                }
                Ok(HandshakeOutput::ListExports) => hs
                    .handle(HandshakeInput::ExportsListed(&[export("disk")]))
                    .unwrap(),
                Ok(HandshakeOutput::OpenExport { name }) => {
                    let found = (name == "disk" || name.is_empty()).then(|| export("disk"));
                    if let Err(e) = hs.handle(HandshakeInput::ExportOpened(found.as_ref())) {
                        return (written, Err(e));
                    }
                }
                Ok(HandshakeOutput::Transmission(n)) => return (written, Ok(Some(n))),
                Ok(HandshakeOutput::Aborted) => return (written, Ok(None)),
                Ok(HandshakeOutput::MetaContexts { name }) => {
                    let offered = (name == "disk" || name.is_empty()).then(offered_contexts);
                    hs.handle(HandshakeInput::MetaContexts(offered.as_deref()))
                        .unwrap();
                }
                Err(e) => return (written, Err(e)),
            }
        }
    }

    fn offered_contexts() -> Vec<MetaContext> {
        vec![
            MetaContext::new("base:allocation", 0),
            MetaContext::new("qemu:dirty-bitmap:s1", 11),
            MetaContext::new("qemu:dirty-bitmap:s2", 12),
        ]
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            data.extend_from_slice(&(q.len() as u32).to_be_bytes());
            data.extend_from_slice(q.as_bytes());
        }
        data
    }

    /// The option replies after the greeting: (option, reply type, data).
    fn replies(written: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut rest = &written[18..];
        let mut out = Vec::new();
        while rest.len() >= 20 {
            assert_eq!(rest.get_u64(), OPTION_REPLY_MAGIC);
            let option = rest.get_u32();
            let kind = rest.get_u32();
            let len = rest.get_u32() as usize;
            out.push((option, kind, rest[..len].to_vec()));
            rest.advance(len);
        }
        out
    }

    /// The contexts (id, name) of the META_CONTEXT replies to `option`.
    fn contexts_of(replies: &[(u32, u32, Vec<u8>)], option: u32) -> Vec<(u32, String)> {
        replies
            .iter()
            .filter(|r| r.0 == option && r.1 == REP_META_CONTEXT)
            .map(|r| {
                let id = u32::from_be_bytes(r.2[..4].try_into().unwrap());
                (id, String::from_utf8(r.2[4..].to_vec()).unwrap())
            })
            .collect()
    }

    fn start(structured: bool) -> Vec<u8> {
        let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        if structured {
            input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        }
        input
    }

    #[test]
    fn list_meta_context_matches_queries_and_wildcards() {
        let names = |queries: &[&str]| {
            let mut input = start(true);
            input.extend(option(OPT_LIST_META_CONTEXT, &meta_data("disk", queries)));
            let (written, _) = drive(&input, &[1000]);
            let r = replies(&written);
            assert_eq!(
                r.last().map(|r| (r.0, r.1)),
                Some((OPT_LIST_META_CONTEXT, REP_ACK))
            );
            let found = contexts_of(&r, OPT_LIST_META_CONTEXT);
            assert!(found.iter().all(|(id, _)| *id == 0), "LIST ids are 0");
            found.into_iter().map(|(_, n)| n).collect::<Vec<_>>()
        };
        let all = vec![
            "base:allocation".to_owned(),
            "qemu:dirty-bitmap:s1".into(),
            "qemu:dirty-bitmap:s2".into(),
        ];
        assert_eq!(names(&[]), all, "no query lists everything");
        assert_eq!(names(&["base:"]), vec!["base:allocation"]);
        assert_eq!(names(&["qemu:"]), all[1..].to_vec());
        assert_eq!(names(&["qemu:dirty-bitmap:"]), all[1..].to_vec());
        assert_eq!(
            names(&["qemu:dirty-bitmap:s2", "base:allocation"]),
            vec![all[0].clone(), all[2].clone()]
        );
        assert!(
            names(&["base:nosuch", "other:thing"]).is_empty(),
            "unknown ones are ignored"
        );
    }

    #[test]
    fn set_meta_context_selects_for_the_same_export_only() {
        let go = |set_on: &str, go_to: &str, queries: &[&str]| {
            let mut input = start(true);
            input.extend(option(OPT_SET_META_CONTEXT, &meta_data(set_on, queries)));
            input.extend(option(OPT_GO, &go_data(go_to)));
            let (written, outcome) = drive(&input, &[7]);
            (replies(&written), outcome.unwrap().expect("transmission"))
        };
        let (r, n) = go(
            "disk",
            "disk",
            &["base:allocation", "qemu:dirty-bitmap:s2", "base:", "x:y"],
        );
        let set = contexts_of(&r, OPT_SET_META_CONTEXT);
        assert_eq!(
            set.len(),
            2,
            "a wildcard and unknown names select nothing: {set:?}"
        );
        assert_ne!(set[0].0, set[1].0, "ids are unique");
        let selected: Vec<(u32, String, u64)> = n
            .meta_contexts
            .iter()
            .map(|c| (c.id, c.context.name.clone(), c.context.tag))
            .collect();
        assert_eq!(
            selected,
            vec![
                (set[0].0, "base:allocation".into(), 0),
                (set[1].0, "qemu:dirty-bitmap:s2".into(), 12)
            ]
        );
        // Another export at GO: nothing selected.
        let (_, n) = go("", "disk", &["base:allocation"]);
        assert!(n.meta_contexts.is_empty());
        // OPT_EXPORT_NAME keeps the selection for the same name too.
        let mut input = start(true);
        input.extend(option(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
        ));
        input.extend(option(OPT_EXPORT_NAME, b"disk"));
        let (_, outcome) = drive(&input, &[1000]);
        assert_eq!(outcome.unwrap().unwrap().meta_contexts.len(), 1);
    }

    #[test]
    fn set_meta_context_errors_and_resets() {
        // Before structured replies: refused, for LIST too.
        let mut input = start(false);
        input.extend(option(OPT_LIST_META_CONTEXT, &meta_data("disk", &[])));
        input.extend(option(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
        ));
        input.extend(option(OPT_GO, &go_data("disk")));
        let (written, outcome) = drive(&input, &[1000]);
        let kinds: Vec<u32> = replies(&written).iter().map(|r| r.1).collect();
        assert_eq!(&kinds[..2], &[REP_ERR_INVALID, REP_ERR_INVALID]);
        assert!(outcome.unwrap().unwrap().meta_contexts.is_empty());

        // A later SET replaces the selection, even when it fails.
        let mut input = start(true);
        input.extend(option(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
        ));
        input.extend(option(
            OPT_SET_META_CONTEXT,
            &meta_data("missing", &["base:allocation"]),
        ));
        input.extend(option(OPT_GO, &go_data("disk")));
        let (written, outcome) = drive(&input, &[1000]);
        let r = replies(&written);
        assert!(r
            .iter()
            .any(|r| r.0 == OPT_SET_META_CONTEXT && r.1 == REP_ERR_UNKNOWN));
        assert!(outcome.unwrap().unwrap().meta_contexts.is_empty());
        let mut input = start(true);
        input.extend(option(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
        ));
        input.extend(option(OPT_SET_META_CONTEXT, &[0, 0, 0, 9]));
        input.extend(option(OPT_GO, &go_data("disk")));
        let (written, outcome) = drive(&input, &[1000]);
        assert!(replies(&written).iter().any(|r| r.1 == REP_ERR_INVALID));
        assert!(outcome.unwrap().unwrap().meta_contexts.is_empty());
        // No query selects nothing, with a plain ACK.
        let mut input = start(true);
        input.extend(option(OPT_SET_META_CONTEXT, &meta_data("disk", &[])));
        input.extend(option(OPT_GO, &go_data("disk")));
        let (written, outcome) = drive(&input, &[1000]);
        assert_eq!(replies(&written)[1].1, REP_ACK);
        assert!(outcome.unwrap().unwrap().meta_contexts.is_empty());
    }

    #[test]
    fn meta_request_parsing() {
        assert_eq!(
            parse_meta_request(&meta_data("d", &["base:allocation", "qemu:"])),
            Ok(("d".into(), vec!["base:allocation".into(), "qemu:".into()]))
        );
        assert_eq!(
            parse_meta_request(&meta_data("", &[])),
            Ok((String::new(), vec![]))
        );
        for bad in [
            meta_data("d", &["nocolon"]),
            meta_data("d", &[":leaf"]),
            [meta_data("d", &["base:"]), vec![0]].concat(),
            {
                let mut d = meta_data("d", &[]);
                d.truncate(d.len() - 1);
                d
            },
            {
                // A count of 2^32-1 with nothing behind it.
                let mut d = meta_data("d", &[]);
                let n = d.len();
                d[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
                d
            },
            vec![0, 0, 0, 1, 0xff, 0, 0, 0, 0],
            [vec![0, 0, 0x10, 0x01], vec![b'a'; 4097], vec![0; 4]].concat(),
        ] {
            assert!(parse_meta_request(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn too_many_selected_contexts_are_refused() {
        let many: Vec<MetaContext> = (0..40)
            .map(|i| MetaContext::new(format!("qemu:dirty-bitmap:s{i}"), i))
            .collect();
        let queries: Vec<String> = many.iter().map(|c| c.name.clone()).collect();
        assert_eq!(select_contexts(&many, &queries, false).len(), 40);
        let mut hs = Handshake::new(HandshakeConfig::default());
        let mut input = start(true);
        let q: Vec<&str> = queries.iter().map(String::as_str).collect();
        input.extend(option(OPT_SET_META_CONTEXT, &meta_data("disk", &q)));
        hs.handle(HandshakeInput::Bytes(&input)).unwrap();
        let mut written = Vec::new();
        loop {
            match hs.poll_output().unwrap() {
                HandshakeOutput::Write(b) => written.extend(b),
                HandshakeOutput::MetaContexts { name } => {
                    assert_eq!(name, "disk");
                    hs.handle(HandshakeInput::MetaContexts(Some(&many)))
                        .unwrap();
                }
                HandshakeOutput::ReadMore => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        let r = replies(&written);
        assert_eq!(r.last().map(|r| r.1), Some(REP_ERR_TOO_BIG));
        assert!(contexts_of(&r, OPT_SET_META_CONTEXT).is_empty());
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
        assert!(hs.handle(HandshakeInput::ExportsListed(&[])).is_err());
        assert!(hs.handle(HandshakeInput::ExportOpened(None)).is_err());
        assert!(hs.handle(HandshakeInput::MetaContexts(None)).is_err());
        assert!(matches!(hs.poll_output(), Ok(HandshakeOutput::Write(_))));
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
