//! NBD (Network Block Device) server: fixed-newstyle handshake, simple and structured
//! replies, TCP and unix-socket listeners, systemd socket activation.
//!
//! Layout: [`handshake`] and [`transmission`] are the sans-IO protocol core (bytes and
//! events in, bytes and actions out); [`server`] is the tokio shell; backends implement
//! [`Exports`]/[`Export`] ([`FileExports`] serves regular files). See docs/nbd.md.

pub mod activation;
mod connection;
pub mod consts;
pub mod export;
pub mod file;
pub mod handshake;
pub mod server;
pub mod transmission;

pub use connection::{ConnectionEnd, ConnectionError};
pub use export::{
    BlockSizes, BoxFuture, Export, ExportFeatures, ExportInfo, Exports, Extent, MetaContext,
    Payload,
};
pub use file::{FileExport, FileExports};
pub use handshake::{
    Handshake, HandshakeConfig, HandshakeError, HandshakeInput, HandshakeOutput, Negotiated,
};
pub use server::{NbdServer, ServerConfig};
pub use transmission::{validate, Command, Rejection, Reply, RequestError, RequestHeader};
