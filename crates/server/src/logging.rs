//! Logging for csnap's daemons (`csnap-agent`, `csnap-server`): structured entries in the
//! systemd journal when the process runs under journald, plain text on stderr otherwise.
//!
//! * [`LogTarget::Auto`] (the default) logs to the journal when the process's stderr is
//!   connected to it: systemd sets `$JOURNAL_STREAM` to the `DEVICE:INODE` of the stream
//!   it gives a service, and the variable counts only when it matches stderr (a child of
//!   the service that redirected its stderr elsewhere inherits the variable, not the
//!   stream). [`LogTarget::Journal`] forces the journal, [`LogTarget::Stderr`] text.
//! * In the journal, every tracing field becomes a journal field of the same name in upper
//!   case (`tracing-journald` with no field prefix): the spans csnap opens carry
//!   `csnap_volume` and `csnap_node` (journal `CSNAP_VOLUME`, `CSNAP_NODE`), key events
//!   `csnap_event` (`CSNAP_EVENT`) and `message_id` (`MESSAGE_ID`, from [`EVENTS`]), so
//!   `journalctl CSNAP_VOLUME=vol0 CSNAP_EVENT=failover_done` finds them. `SYSLOG_IDENTIFIER`
//!   is the program's name; levels map to priorities ERROR 3, WARN 4, INFO 6, DEBUG and
//!   TRACE 7.
//! * On stderr the same fields appear as `name=value` (the `message_id` is left out).
//!
//! `RUST_LOG` filters either way (default `info`).

use std::fmt;
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::EnvFilter;

/// One key event: its `CSNAP_EVENT` name, its fixed `MESSAGE_ID` and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventInfo {
    /// The `CSNAP_EVENT` name.
    pub name: &'static str,
    /// 128 bits in lower-case hex, as journald wants a `MESSAGE_ID`.
    pub message_id: &'static str,
    /// Short meaning, the start of the entry's `MESSAGE`.
    pub summary: &'static str,
}

const fn ev(name: &'static str, message_id: &'static str, summary: &'static str) -> EventInfo {
    EventInfo {
        name,
        message_id,
        summary,
    }
}

/// Every key event csnap logs, with its `MESSAGE_ID` (documented in docs/operations.md,
/// "Monitoring with journalctl"; a test keeps the two in step). The ids never change once
/// released: operators' queries and alerting rules use them.
pub const EVENTS: &[EventInfo] = &[
    // Server choice and failover (membership core, on the node concerned).
    ev(
        "server_chosen",
        "6134694a26c84d5aabb0576fde6b8a6b",
        "this node was chosen to run the volume's server",
    ),
    ev(
        "gather_done",
        "2eb209bc879c4375bacfd3f2fe55d33c",
        "every member's snapshot clients gathered; activating the server",
    ),
    ev(
        "gather_restart",
        "0c7f525c9180405b846f97f1da107553",
        "the gather was cut by a membership change; starting over",
    ),
    ev(
        "clients_gone",
        "6b269861f2b64a23849f0a379a1dc0e5",
        "snapshot clients of departed nodes are not waited for",
    ),
    ev(
        "failover_done",
        "013790b9f4aa47039c57516253a781d2",
        "the new server serves",
    ),
    ev(
        "server_active",
        "9e9668dcb1934f77b4cb3080fd857720",
        "the local server opened the store and listens",
    ),
    ev(
        "server_stop",
        "2918b1c2e7bb40dbbdb660723eb9b39e",
        "stopping the local server",
    ),
    ev(
        "server_stopped",
        "7b4e54566ae444129b7f0d1c41ab6081",
        "the local server stopped",
    ),
    ev(
        "server_failed",
        "e179e00999fa44549b6250708eba4b11",
        "the local server failed",
    ),
    ev(
        "start_abandoned",
        "cb08fc85dfdb4d3284a4fe61146ea235",
        "a server start was abandoned",
    ),
    ev(
        "announce_superseded",
        "6fee14fef96f4135a311de775420dcf6",
        "this node's server announce lost to another lineage",
    ),
    ev(
        "server_departed",
        "c4689ebd8b5c46248ac611497aa9d1f4",
        "the server's node left the group",
    ),
    ev(
        "old_server_settled",
        "b908d0212ad74d50a26b6bb30c98a2e0",
        "a departed server is certainly stopped",
    ),
    ev(
        "lineage_adopted",
        "fd32a3b0caca4655a9b77d538ee4f986",
        "this clean node takes the lineage of the quorate view it joined",
    ),
    // Quorum, leases, history.
    ev(
        "quorum_lost",
        "98abddd5a8234f48974a6aff40184ad5",
        "quorum lost",
    ),
    ev(
        "lease_expired",
        "688b31e59c1949a295bd63a5df756e9a",
        "the serving lease ran out",
    ),
    ev(
        "history_uncertain",
        "a1b6313b0c164e5c98011b6126884717",
        "this node's history is not certain any more",
    ),
    ev(
        "history_certain",
        "ae9cf3735c67400fa89534a214e81518",
        "this node's history is certain",
    ),
    ev(
        "group_lost",
        "eebcaf40054f4f119db328c97e6bfa6f",
        "the connection to corosync was lost",
    ),
    // Partition merges and fencing.
    ev(
        "stale_merge",
        "e48d249d00ca4286bcbe52e6cdcdcc2f",
        "a node holds state of another lineage after a merge",
    ),
    ev(
        "stale_resolved",
        "abe597f873d543129604eaa8197e6db3",
        "a stale node is clean again",
    ),
    ev(
        "stale_reset",
        "b8afc6f9c0bb419cb23e72044085db8e",
        "this node is stale: dropping its state",
    ),
    ev(
        "store_generation_ahead",
        "728694d9c1a64808bd98f4c4f04b9318",
        "the store was served by a later cluster generation: not serving stale state",
    ),
    ev(
        "node_reset",
        "deaa25f5c9764bf095f61f1fe01d0558",
        "this node was stale: its clients reconnect to the real server",
    ),
    ev(
        "reset_done",
        "a83835c0dadd475f902f3bc069cb44df",
        "reset done",
    ),
    ev(
        "fence_requested",
        "e5755eaf8dce49da879d32031ed58946",
        "fencing requested",
    ),
    ev(
        "fence_done",
        "b680185c25234d6892fec6966149994f",
        "fencing done",
    ),
    ev(
        "fence_failed",
        "94e8f739011b45f888e323602fbf5468",
        "fencing failed",
    ),
    ev(
        "fence_unneeded",
        "286de2d80872453fbe545a642164746f",
        "fencing not needed any more",
    ),
    ev(
        "fence_yielded",
        "f60bc107eb2943d196c0b60b2fdea232",
        "another member fences the node",
    ),
    // Protocol trouble.
    ev(
        "bad_message",
        "a656a68bb32a4f7f967561e41f3edcd3",
        "a group message could not be decoded",
    ),
    ev(
        "encode_failed",
        "26cdcffdbc074418ac89a3d56a78b692",
        "a group message could not be encoded",
    ),
    // The server engine.
    ev(
        "snapshot_created",
        "aedf415e927b489697034c520dcacebb",
        "snapshot created",
    ),
    ev(
        "snapshot_deleted",
        "a133d599fa2d42caac6cc8f3ae3e9775",
        "snapshot deleted",
    ),
    ev(
        "store_filling",
        "4719fa5c73d541bb9e7abfcdd2e037dd",
        "the snapshot store passed a usage warning level",
    ),
    ev(
        "store_full",
        "8b20dddb59ab4f628ae721fd59e47f37",
        "the snapshot store is full: a snapshot was invalidated",
    ),
    ev(
        "server_gate_open",
        "c66ac08c40da4f0b94137ce65116c4ae",
        "the server grants origin writes",
    ),
    ev(
        "rollback_started",
        "7385fe3857d94e2aa1232922bfb89d62",
        "an online rollback of the origin to a snapshot started (or resumed after a restart)",
    ),
    ev(
        "rollback_progress",
        "3027ab85363f49a39a85e195f866cd47",
        "an online rollback copied back another tenth of the origin",
    ),
    ev(
        "rollback_done",
        "10ecf78c281f4c75bc82102dde445399",
        "an online rollback finished: the origin is the snapshot's contents",
    ),
];

/// The catalogue entry of a key event.
pub fn event_info(name: &str) -> Option<&'static EventInfo> {
    EVENTS.iter().find(|e| e.name == name)
}

/// The `MESSAGE_ID` of a key event (None for a name not in [`EVENTS`]).
pub fn message_id(name: &str) -> Option<&'static str> {
    event_info(name).map(|e| e.message_id)
}

/// Logs key event `$name` (a `&str` from [`EVENTS`]) at `$level` with its `csnap_event` and
/// `message_id` fields, the further fields in brackets, then the message:
/// `key_event!(INFO, "snapshot_created", [csnap_snapshot = %name], "snapshot {name} created")`.
#[macro_export]
macro_rules! key_event {
    ($level:ident, $name:expr, [], $($msg:tt)+) => {{
        let name: &str = $name;
        ::tracing::event!(
            ::tracing::Level::$level,
            csnap_event = name,
            message_id = $crate::logging::message_id(name),
            $($msg)+
        )
    }};
    ($level:ident, $name:expr, [$($field:tt)+], $($msg:tt)+) => {{
        let name: &str = $name;
        ::tracing::event!(
            ::tracing::Level::$level,
            csnap_event = name,
            message_id = $crate::logging::message_id(name),
            $($field)+,
            $($msg)+
        )
    }};
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogTarget {
    /// The journal when stderr is connected to it (`$JOURNAL_STREAM`), else stderr.
    #[default]
    Auto,
    /// The journal (native protocol, `/run/systemd/journal/socket`).
    Journal,
    /// Plain text on stderr.
    Stderr,
}

/// Whether `journal_stream` (the value of `$JOURNAL_STREAM`, `DEVICE:INODE` in decimal)
/// names the file with this device and inode numbers.
pub fn journal_stream_matches(journal_stream: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    matches!((d.parse::<u64>(), i.parse::<u64>()), (Ok(d), Ok(i)) if d == dev && i == ino)
}

/// Whether this process's stderr is the journal stream systemd gave it.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some(value) = value.to_str() else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(meta) => journal_stream_matches(value, meta.dev(), meta.ino()),
        Err(_) => false,
    }
}

/// What [`init`] set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// Logging to journald.
    Journal,
    /// Logging to stderr.
    Stderr,
}

/// Installs the global subscriber for `program` (its `SYSLOG_IDENTIFIER`). With
/// [`LogTarget::Journal`] a journal that cannot be reached is an error (nothing is
/// installed); with [`LogTarget::Auto`] it falls back to stderr and says why there.
pub fn init(program: &str, target: LogTarget) -> Result<Installed, String> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let want_journal = match target {
        LogTarget::Journal => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => stderr_is_journal(),
    };
    let mut fallback = None;
    if want_journal {
        match journal_layer(program) {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init()
                    .map_err(|e| format!("cannot install the logger: {e}"))?;
                return Ok(Installed::Journal);
            }
            Err(e) if target == LogTarget::Journal => {
                return Err(format!(
                    "cannot log to the journal (/run/systemd/journal/socket): {e}"
                ))
            }
            Err(e) => fallback = Some(e),
        }
    }
    use std::io::IsTerminal as _;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .fmt_fields(TextFields)
        .with_env_filter(filter())
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    if let Some(e) = fallback {
        tracing::warn!(error = %e, "stderr is connected to the journal but its socket is not reachable; logging text to stderr");
    }
    Ok(Installed::Stderr)
}

fn journal_layer(program: &str) -> std::io::Result<tracing_journald::Layer> {
    use tracing_journald::{Priority, PriorityMappings};
    Ok(tracing_journald::layer()?
        .with_field_prefix(None)
        .with_syslog_identifier(program.to_owned())
        .with_priority_mappings(PriorityMappings {
            error: Priority::Error,
            warn: Priority::Warning,
            info: Priority::Informational,
            debug: Priority::Debug,
            trace: Priority::Debug,
        }))
}

/// Text fields as tracing-subscriber's default (`message` bare, `name=value` with strings
/// quoted), without `message_id` (for the journal only).
struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = TextVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct TextVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() || field.name() == "message_id" || field.name().starts_with("log.")
        {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{sep}{value:?}")
        } else {
            write!(self.writer, "{sep}{}={value:?}", field.name())
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn event_names_and_ids_are_unique_and_well_formed() {
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for e in EVENTS {
            assert!(names.insert(e.name), "{} twice", e.name);
            assert!(ids.insert(e.message_id), "{} twice", e.message_id);
            assert!(
                e.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}",
                e.name
            );
            assert_eq!(e.message_id.len(), 32, "{}", e.name);
            assert!(
                e.message_id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{}",
                e.name
            );
        }
        assert_eq!(
            message_id("failover_done"),
            Some("013790b9f4aa47039c57516253a781d2")
        );
        assert_eq!(message_id("no_such_event"), None);
    }

    #[test]
    fn journal_stream_must_match_device_and_inode() {
        assert!(journal_stream_matches("8:1234", 8, 1234));
        assert!(journal_stream_matches("8:1234\n", 8, 1234));
        assert!(!journal_stream_matches("8:1235", 8, 1234));
        assert!(!journal_stream_matches("9:1234", 8, 1234));
        assert!(!journal_stream_matches("", 8, 1234));
        assert!(!journal_stream_matches("8", 8, 1234));
        assert!(!journal_stream_matches("8:x", 8, 1234));
        assert!(!journal_stream_matches("-1:1234", 8, 1234));
    }

    /// The operators' page documents every event with its id.
    #[test]
    fn docs_list_every_event_with_its_message_id() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/operations.md");
        let docs = std::fs::read_to_string(path).expect("docs/operations.md");
        let section = docs
            .split("## Monitoring with journalctl")
            .nth(1)
            .expect("docs/operations.md has a \"Monitoring with journalctl\" section");
        for e in EVENTS {
            let row = format!("| `{}` | `{}` |", e.name, e.message_id);
            assert!(
                section.contains(&row),
                "docs/operations.md lacks the row {row}"
            );
        }
    }

    /// The text format keeps `name=value` (tests and operators grep `event="NAME"`) and
    /// leaves the MESSAGE_ID out.
    #[test]
    fn text_lines_carry_the_fields_but_not_the_message_id() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .fmt_fields(TextFields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("volume", csnap_volume = "vol0", csnap_node = 2);
            let _e = span.enter();
            crate::key_event!(
                INFO,
                "failover_done",
                [generation = 3u64],
                "serving after {} ms",
                10
            );
        });
        let text =
            String::from_utf8_lossy(&buf.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
        assert!(
            text.contains("volume{csnap_volume=\"vol0\" csnap_node=2}"),
            "{text}"
        );
        assert!(
            text.contains("serving after 10 ms csnap_event=\"failover_done\" generation=3"),
            "{text}"
        );
        assert!(!text.contains("message_id"), "{text}");
        assert!(!text.contains("013790b9"), "{text}");
    }
}
