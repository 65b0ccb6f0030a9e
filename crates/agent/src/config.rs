//! csnap's configuration: the `csnap` section of corosync.conf plus per-node keys in its
//! nodelist, parsed by a pure function from the flat key/value map that cmap holds.
//!
//! ```text
#![doc = include_str!("config_example.conf")]
//! ```
//!
//! (This example is [`EXAMPLE_CONF`]; a unit test checks it follows corosync's syntax and
//! parses, and the end-to-end tests load its `csnap` section into a real corosync.)
//!
//! Corosync stores items of unknown top-level sections as strings, a subsection as one more
//! dotted component: `csnap.vol0.origin`; nodelist entries appear as
//! `nodelist.node.<index>.nodeid` (a u32) and `nodelist.node.<index>.csnap_priority`.
//! Corosync keeps a value verbatim up to the end of the line: a `#` starts a comment only
//! as the first character of a line (after blanks), so a comment after a value becomes part
//! of the value and one after `name {` is a syntax error; quotes are not removed either.
//! The parser points these out when it sees them.
//!
//! # Reloading: the rules
//!
//! Edit corosync.conf on every node, then run `corosync-cfgtool -R` on one of them (every
//! node re-reads its own file); [`ConfigWatch`] yields the result. Corosync updates changed
//! and added keys, but it deletes keys that vanished from the file only in its own sections
//! (`totem`, `nodelist`, `logging`, `quorum`, ...: exec/cfg.c, `remove_deleted_entries`),
//! never in `csnap`: a key removed from the csnap section keeps its last value in cmap
//! until it is deleted by hand or corosync restarts. cmap is per node, so such a key must
//! be deleted on every node that has it. Hence:
//!
//! * A bad or missing value of a known key is an error ([`ConfigError::Invalid`], naming
//!   the key); whoever follows the [`ConfigWatch`] keeps its previous configuration.
//!   Fixing the file and reloading clears it.
//! * Unknown keys (a typo, a misspelt volume key, keys nested too deep, an unknown
//!   `csnap_*` key of a nodelist entry) and a `fence_command` without `fencing: command`
//!   are ignored with a [`ConfigWarning`] naming the key, never an error: after the typo
//!   is fixed in the file, the misspelt key is still in cmap, and rejecting it would turn a
//!   fixed typo into a reload failure that only a restart of corosync could clear. The
//!   warning says how to delete it: `corosync-cmapctl -d csnap.KEY` on each node. (The
//!   nodelist is pruned on reload: there, fixing the file is enough.)
//! * Removing a key from the file does not bring back its default, and removing a volume
//!   subsection does not remove the volume: the old values stay in effect until deleted
//!   with `corosync-cmapctl -d csnap.KEY` / `corosync-cmapctl -D csnap.VOLUME.` (`-D`
//!   deletes every key with that prefix) on every node.
//! * Errors that leftovers of a removed or renamed volume can cause (a volume missing a
//!   required key, two volumes on one port or NBD address, an unusable volume name) say
//!   which `corosync-cmapctl -D csnap.VOLUME.` clears them.
//!
//! `corosync-cmapctl -D csnap.` followed by `corosync-cfgtool -R` resets the whole section
//! to what the files say, but between the two commands the agents see an empty section (no
//! volumes); deleting the stale keys one by one avoids that.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use cpg_glue::corosync::{Cmap, CmapKeys, CmapWatch};
use cpg_glue::{GroupError, NodeId};
use futures::Stream;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The example in this module's documentation: a corosync.conf fragment (nodelist entry and
/// `csnap` section) showing every key.
pub const EXAMPLE_CONF: &str = include_str!("config_example.conf");

/// The cmap key prefixes the configuration is read from.
pub const CONFIG_PREFIXES: [&str; 2] = ["csnap.", "nodelist."];

/// Where the cluster key is read from unless `csnap.key_file` says otherwise.
pub const DEFAULT_KEY_FILE: &str = "/etc/csnap/cluster.key";
/// Where the agent's control socket is unless `csnap.control_socket` says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/csnap/csnap.sock";
/// Priority of a node without `csnap_priority`.
pub const DEFAULT_PRIORITY: i32 = 0;

/// How a node with stale state (found after a partition merge) is dealt with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fencing {
    /// corosync cfg `kill_node`: the node's corosync exits (`fencing: kill_node`).
    KillNode,
    /// Pacemaker's fencing (`fencing: stonith`).
    Stonith,
    /// An external command, called with the node id (`fencing: command` + `fence_command`).
    Command(PathBuf),
    /// No fencing: the stale node drops all its state and rejoins clean (`fencing: reset`).
    Reset,
}

/// Where a node's NBD server for a volume listens.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NbdListen {
    /// `unix:/path`
    Unix(PathBuf),
    /// `tcp:HOST:PORT` (an IP address; `[v6]:port` for IPv6)
    Tcp(SocketAddr),
}

/// One volume: a `csnap { NAME { ... } }` subsection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    /// The volume's name (the subsection's name; names its NBD export).
    pub name: String,
    /// The shared origin device.
    pub origin: PathBuf,
    /// The shared snapshot store device.
    pub store: PathBuf,
    /// TCP port the volume's server listens on (on whichever node runs it).
    pub server_port: u16,
    /// Where each node's NBD server for the volume listens.
    pub nbd_listen: NbdListen,
}

/// A node from corosync's nodelist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// corosync's node id.
    pub id: NodeId,
    /// The node's `name`, if the nodelist gives one.
    pub name: Option<String>,
    /// `ring0_addr` as written (an address or a host name).
    pub ring0_addr: Option<String>,
    /// `csnap_priority`, default [`DEFAULT_PRIORITY`].
    pub priority: i32,
}

/// Everything csnap reads from corosync.conf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsnapConfig {
    /// The cluster key file every server and client proves with.
    pub key_file: PathBuf,
    /// The agent's control socket (`csnapctl` talks to it).
    pub control_socket: PathBuf,
    /// How a node whose server cannot be known to have stopped is fenced.
    pub fencing: Fencing,
    /// By volume name.
    pub volumes: BTreeMap<String, VolumeConfig>,
    /// By node id.
    pub nodes: BTreeMap<NodeId, NodeConfig>,
}

const TOP_LEVEL_KEYS: &[&str] = &["key_file", "control_socket", "fencing", "fence_command"];
const VOLUME_KEYS: &[&str] = &["origin", "store", "server_port", "nbd_listen"];
const NODE_CSNAP_KEYS: &[&str] = &["csnap_priority"];
const MAX_VOLUME_NAME: usize = 64;

/// Why the configuration could not be had.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A value in corosync.conf (as cmap holds it) is wrong; `key` is the cmap key.
    #[error("corosync.conf key {key}: {detail}")]
    Invalid {
        /// The cmap key.
        key: String,
        /// What is wrong with its value.
        detail: String,
    },
    /// cmap could not be read (corosync not running, connection lost, ...).
    #[error("reading the csnap configuration from cmap: {0}")]
    Cmap(#[from] GroupError),
}

/// A key that is ignored: unknown (a typo, or left over after it was removed from
/// corosync.conf, see the module documentation) or unused. `detail` says why and how to
/// clear it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigWarning {
    /// The cmap key, e.g. `csnap.keyfile` or `nodelist.node.1.csnap_prio`.
    pub key: String,
    /// Why it is ignored and how to clear it.
    pub detail: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "corosync.conf key {} ignored: {}", self.key, self.detail)
    }
}

/// A configuration that parsed, with the keys that were ignored on the way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedConfig {
    /// What was read.
    pub config: CsnapConfig,
    /// In key order; empty when every key was used.
    pub warnings: Vec<ConfigWarning>,
}

/// How to get rid of a `csnap.*` key that corosync.conf no longer has.
fn stale_key_hint(key: &str) -> String {
    format!(
        "a key removed from the csnap section stays in cmap after corosync-cfgtool -R; \
         delete it on every node that still has it with `corosync-cmapctl -d {key}`"
    )
}

/// How to get rid of what is left in cmap of a volume subsection that was removed or
/// renamed in corosync.conf.
fn stale_volume_hint(volume: &str) -> String {
    format!(
        " (if volume {volume} was removed or renamed in corosync.conf, its old keys stay in \
         cmap: delete them on every node with `corosync-cmapctl -D csnap.{volume}.`)"
    )
}

fn config_error(key: &str, detail: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        detail: detail.into(),
    }
}

/// Points at the usual corosync.conf pitfalls when a value did not parse.
fn hint(value: &str) -> &'static str {
    if value.contains('#') {
        " (corosync.conf has no inline comments: put `#` comments on their own line)"
    } else if value.starts_with('"') || value.starts_with('\'') {
        " (corosync keeps quotes as part of the value: drop them)"
    } else {
        ""
    }
}

fn absolute_path(key: &str, value: &str) -> Result<PathBuf, ConfigError> {
    if value.is_empty() {
        return Err(config_error(key, "is empty; expected an absolute path"));
    }
    if !value.starts_with('/') {
        return Err(config_error(
            key,
            format!("{value:?} is not an absolute path{}", hint(value)),
        ));
    }
    if value.contains('#') {
        return Err(config_error(key, format!("{value:?}{}", hint(value))));
    }
    Ok(PathBuf::from(value))
}

fn parse_fencing_method(key: &str, value: &str) -> Result<&'static str, ConfigError> {
    match value {
        "kill_node" => Ok("kill_node"),
        "stonith" => Ok("stonith"),
        "command" => Ok("command"),
        "reset" => Ok("reset"),
        _ => Err(config_error(
            key,
            format!(
                "unknown fencing method {value:?}; expected kill_node, stonith, command or reset{}",
                hint(value)
            ),
        )),
    }
}

fn parse_port(key: &str, value: &str) -> Result<u16, ConfigError> {
    match value.parse::<u16>() {
        Ok(0) | Err(_) => Err(config_error(
            key,
            format!("{value:?} is not a TCP port (1-65535){}", hint(value)),
        )),
        Ok(port) => Ok(port),
    }
}

fn parse_nbd_listen(key: &str, value: &str) -> Result<NbdListen, ConfigError> {
    if let Some(path) = value.strip_prefix("unix:") {
        return Ok(NbdListen::Unix(absolute_path(key, path)?));
    }
    if let Some(addr) = value.strip_prefix("tcp:") {
        return addr.parse::<SocketAddr>().map(NbdListen::Tcp).map_err(|_| {
            config_error(
                key,
                format!(
                    "{addr:?} is not IP:PORT (e.g. tcp:127.0.0.1:10809 or tcp:[::1]:10809){}",
                    hint(value)
                ),
            )
        });
    }
    Err(config_error(
        key,
        format!(
            "{value:?} must start with unix: or tcp: (e.g. unix:/run/csnap/vol0.nbd){}",
            hint(value)
        ),
    ))
}

fn valid_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_VOLUME_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Default)]
struct RawVolume<'a> {
    origin: Option<&'a str>,
    store: Option<&'a str>,
    server_port: Option<&'a str>,
    nbd_listen: Option<&'a str>,
}

#[derive(Default)]
struct RawNode<'a> {
    nodeid: Option<&'a str>,
    name: Option<&'a str>,
    ring0_addr: Option<&'a str>,
    priority: Option<&'a str>,
}

impl CsnapConfig {
    /// Parses the flat cmap keys (`csnap.*` and `nodelist.*`; other keys are ignored, so
    /// the whole map may be passed), following the reload rules in the module
    /// documentation: a bad or missing value is an error naming its key; an unknown or
    /// unused key is a warning naming it.
    pub fn from_cmap<'a>(keys: &'a CmapKeys) -> Result<ParsedConfig, ConfigError> {
        let mut top: BTreeMap<&str, &str> = BTreeMap::new();
        let mut raw_volumes: BTreeMap<&str, RawVolume> = BTreeMap::new();
        let mut raw_nodes: BTreeMap<u32, RawNode> = BTreeMap::new();
        let mut warnings = Vec::new();
        let mut warn = |key: &str, detail: String| {
            warnings.push(ConfigWarning {
                key: key.to_string(),
                detail,
            })
        };

        for (key, value) in keys {
            if let Some(rest) = key.strip_prefix("csnap.") {
                let parts: Vec<&str> = rest.split('.').collect();
                match parts.as_slice() {
                    [name] if TOP_LEVEL_KEYS.contains(name) => {
                        top.insert(name, value.as_str());
                    }
                    [name] => warn(
                        key,
                        format!(
                            "unknown key {name:?} in the csnap section (known keys: {}, and \
                             volume subsections); {}",
                            TOP_LEVEL_KEYS.join(", "),
                            stale_key_hint(key)
                        ),
                    ),
                    [volume, item] if VOLUME_KEYS.contains(item) => {
                        if TOP_LEVEL_KEYS.contains(volume) || !valid_volume_name(volume) {
                            return Err(config_error(
                                key,
                                format!(
                                    "{volume:?} is not a usable volume name (letters, digits, \
                                     _ and -, at most {MAX_VOLUME_NAME}, not a csnap key \
                                     name){}",
                                    stale_volume_hint(volume)
                                ),
                            ));
                        }
                        let raw = raw_volumes.entry(volume).or_default();
                        let slot = match *item {
                            "origin" => &mut raw.origin,
                            "store" => &mut raw.store,
                            "server_port" => &mut raw.server_port,
                            _ => &mut raw.nbd_listen,
                        };
                        *slot = Some(value.as_str());
                    }
                    [volume, item] => warn(
                        key,
                        format!(
                            "unknown key {item:?} in volume {volume} (known keys: {}); {}",
                            VOLUME_KEYS.join(", "),
                            stale_key_hint(key)
                        ),
                    ),
                    _ => warn(
                        key,
                        format!(
                            "nested too deep (the csnap section holds keys and one level of \
                             volume subsections); {}",
                            stale_key_hint(key)
                        ),
                    ),
                }
            } else if let Some(rest) = key.strip_prefix("nodelist.node.") {
                let Some((index, item)) = rest.split_once('.') else {
                    continue;
                };
                let Ok(index) = index.parse::<u32>() else {
                    continue;
                };
                let raw = raw_nodes.entry(index).or_default();
                match item {
                    "nodeid" => raw.nodeid = Some(value.as_str()),
                    "name" => raw.name = Some(value.as_str()),
                    "ring0_addr" => raw.ring0_addr = Some(value.as_str()),
                    "csnap_priority" => raw.priority = Some(value.as_str()),
                    other if other.starts_with("csnap_") => warn(
                        key,
                        format!(
                            "unknown per-node csnap key {other:?} (known: {}); fix it in \
                             corosync.conf and run corosync-cfgtool -R (corosync re-reads \
                             the nodelist as a whole)",
                            NODE_CSNAP_KEYS.join(", ")
                        ),
                    ),
                    // corosync's own per-node keys are not ours to judge.
                    _ => {}
                }
            }
        }

        let key_file = match top.get("key_file") {
            Some(v) => absolute_path("csnap.key_file", v)?,
            None => PathBuf::from(DEFAULT_KEY_FILE),
        };
        let control_socket = match top.get("control_socket") {
            Some(v) => absolute_path("csnap.control_socket", v)?,
            None => PathBuf::from(DEFAULT_CONTROL_SOCKET),
        };
        let method = match top.get("fencing") {
            Some(v) => parse_fencing_method("csnap.fencing", v)?,
            None => "kill_node",
        };
        let fencing = match (method, top.get("fence_command")) {
            ("command", Some(path)) => {
                Fencing::Command(absolute_path("csnap.fence_command", path)?)
            }
            ("command", None) => {
                return Err(config_error(
                    "csnap.fence_command",
                    "missing; required with fencing: command",
                ))
            }
            (other, unused) => {
                if unused.is_some() {
                    warn(
                        "csnap.fence_command",
                        format!(
                            "only used with fencing: command, and fencing is {other}; {}",
                            stale_key_hint("csnap.fence_command")
                        ),
                    );
                }
                match other {
                    "stonith" => Fencing::Stonith,
                    "reset" => Fencing::Reset,
                    _ => Fencing::KillNode,
                }
            }
        };

        let mut volumes = BTreeMap::new();
        let mut port_owner: BTreeMap<u16, &str> = BTreeMap::new();
        let mut listen_owner: BTreeMap<NbdListen, &str> = BTreeMap::new();
        for (name, raw) in raw_volumes {
            let key = |item: &str| format!("csnap.{name}.{item}");
            let required = |value: Option<&'a str>, item: &str| -> Result<&'a str, ConfigError> {
                value.ok_or_else(|| {
                    config_error(
                        &key(item),
                        format!("missing; volume {name} needs it{}", stale_volume_hint(name)),
                    )
                })
            };
            let origin = absolute_path(&key("origin"), required(raw.origin, "origin")?)?;
            let store = absolute_path(&key("store"), required(raw.store, "store")?)?;
            if origin == store {
                return Err(config_error(
                    &key("store"),
                    format!("is the same device as the origin ({})", origin.display()),
                ));
            }
            let server_port = parse_port(
                &key("server_port"),
                required(raw.server_port, "server_port")?,
            )?;
            if let Some(other) = port_owner.insert(server_port, name) {
                return Err(config_error(
                    &key("server_port"),
                    format!(
                        "port {server_port} is already used by volume {other}{}",
                        stale_volume_hint(other)
                    ),
                ));
            }
            let nbd_listen = match raw.nbd_listen {
                Some(v) => parse_nbd_listen(&key("nbd_listen"), v)?,
                None => NbdListen::Unix(PathBuf::from(format!("/run/csnap/{name}.nbd"))),
            };
            if let Some(other) = listen_owner.insert(nbd_listen.clone(), name) {
                return Err(config_error(
                    &key("nbd_listen"),
                    format!(
                        "the same address is already used by volume {other}{}",
                        stale_volume_hint(other)
                    ),
                ));
            }
            volumes.insert(
                name.to_string(),
                VolumeConfig {
                    name: name.to_string(),
                    origin,
                    store,
                    server_port,
                    nbd_listen,
                },
            );
        }

        let mut nodes: BTreeMap<NodeId, NodeConfig> = BTreeMap::new();
        for (index, raw) in raw_nodes {
            let key = |item: &str| format!("nodelist.node.{index}.{item}");
            let Some(nodeid) = raw.nodeid else {
                if raw.priority.is_some() {
                    return Err(config_error(
                        &key("nodeid"),
                        "missing; a node with csnap_priority needs a nodeid",
                    ));
                }
                continue;
            };
            let id = match nodeid.parse::<u32>() {
                Ok(id) if id > 0 => NodeId(id),
                _ => {
                    return Err(config_error(
                        &key("nodeid"),
                        format!("{nodeid:?} is not a node id (1-4294967295)"),
                    ))
                }
            };
            let priority = match raw.priority {
                Some(v) => v.parse::<i32>().map_err(|_| {
                    config_error(
                        &key("csnap_priority"),
                        format!("{v:?} is not an integer{}", hint(v)),
                    )
                })?,
                None => DEFAULT_PRIORITY,
            };
            let node = NodeConfig {
                id,
                name: raw.name.map(str::to_string),
                ring0_addr: raw.ring0_addr.map(str::to_string),
                priority,
            };
            if nodes.insert(id, node).is_some() {
                return Err(config_error(
                    &key("nodeid"),
                    format!("node id {id} appears twice in the nodelist"),
                ));
            }
        }

        Ok(ParsedConfig {
            config: CsnapConfig {
                key_file,
                control_socket,
                fencing,
                volumes,
                nodes,
            },
            warnings,
        })
    }

    /// A node's configured priority ([`DEFAULT_PRIORITY`] for nodes not in the nodelist).
    pub fn priority_of(&self, node: NodeId) -> i32 {
        self.nodes
            .get(&node)
            .map(|n| n.priority)
            .unwrap_or(DEFAULT_PRIORITY)
    }
}

/// Reads the configuration once. To follow reloads use [`ConfigWatch::start`], which also
/// returns the configuration at its start (reading here first and watching afterwards
/// would miss a reload in between).
pub fn read(cmap: &Cmap) -> Result<ParsedConfig, ConfigError> {
    CsnapConfig::from_cmap(&cmap.get_prefixes(&CONFIG_PREFIXES)?)
}

/// The configuration after each change of its cmap keys (`corosync-cfgtool -R`,
/// `corosync-cmapctl`): a new [`ParsedConfig`] (its warnings included), or the
/// [`ConfigError::Invalid`] naming the bad key (the stream goes on: the fix is yielded as
/// usual). A failed read is a
/// [`ConfigError::Cmap`]; a lost connection is a `ConfigError::Cmap(GroupError::Disconnected)`,
/// after which the stream ends. An item equal to the previous one is not repeated.
pub struct ConfigWatch {
    keys: CmapWatch,
    /// The last item yielded (initially the one [`ConfigWatch::start`] returned); `None`
    /// after a read failure, so the next good read is yielded even if unchanged.
    last: Option<Result<ParsedConfig, (String, String)>>,
}

/// Comparable form of a parse result.
fn comparable(
    parsed: &Result<ParsedConfig, ConfigError>,
) -> Option<Result<ParsedConfig, (String, String)>> {
    match parsed {
        Ok(config) => Some(Ok(config.clone())),
        Err(ConfigError::Invalid { key, detail }) => Some(Err((key.clone(), detail.clone()))),
        Err(ConfigError::Cmap(_)) => None,
    }
}

impl ConfigWatch {
    /// Starts watching `cmap` and returns the configuration as it was once the watch was
    /// in place, so every later change is yielded by the stream and none is missed. The
    /// outer error: the watch could not be set up; the inner: the configuration there is
    /// now is bad. Must be called inside a tokio runtime context.
    pub fn start(
        cmap: Cmap,
    ) -> Result<(Result<ParsedConfig, ConfigError>, ConfigWatch), GroupError> {
        let (keys, watch) = cmap.watch(&CONFIG_PREFIXES)?;
        let initial = CsnapConfig::from_cmap(&keys);
        let watch = ConfigWatch {
            keys: watch,
            last: comparable(&initial),
        };
        Ok((initial, watch))
    }
}

impl Stream for ConfigWatch {
    type Item = Result<ParsedConfig, ConfigError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            let keys = match Pin::new(&mut this.keys).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => {
                    this.last = None;
                    return Poll::Ready(Some(Err(ConfigError::Cmap(e))));
                }
                Poll::Ready(Some(Ok(keys))) => keys,
            };
            let parsed = CsnapConfig::from_cmap(&keys);
            let now = comparable(&parsed);
            if now != this.last {
                this.last = now;
                return Poll::Ready(Some(parsed));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// What corosync-cmapctl showed for a real corosync.conf (see the module example).
    fn full() -> Vec<(&'static str, &'static str)> {
        vec![
            ("csnap.key_file", "/etc/csnap/k.key"),
            ("csnap.control_socket", "/run/csnap/c.sock"),
            ("csnap.fencing", "command"),
            ("csnap.fence_command", "/usr/local/sbin/my-fence"),
            ("csnap.vol0.origin", "/dev/disk/by-id/origin0"),
            ("csnap.vol0.store", "/dev/disk/by-id/store0"),
            ("csnap.vol0.server_port", "7788"),
            ("csnap.vol0.nbd_listen", "unix:/run/csnap/vol0.nbd"),
            ("csnap.db-1.origin", "/dev/vg/db"),
            ("csnap.db-1.store", "/dev/vg/dbsnap"),
            ("csnap.db-1.server_port", "7789"),
            ("csnap.db-1.nbd_listen", "tcp:127.0.0.1:10809"),
            ("nodelist.local_node_pos", "0"),
            ("nodelist.node.0.nodeid", "1"),
            ("nodelist.node.0.name", "n1"),
            ("nodelist.node.0.ring0_addr", "10.77.0.1"),
            ("nodelist.node.0.csnap_priority", "10"),
            ("nodelist.node.1.nodeid", "2"),
            ("nodelist.node.1.ring0_addr", "10.77.0.2"),
            ("nodelist.node.1.csnap_priority", "-5"),
            ("nodelist.node.2.nodeid", "3"),
            ("nodelist.node.2.ring0_addr", "10.77.0.3"),
            ("totem.token", "1000"),
        ]
    }

    fn parse_all(pairs: &[(&str, &str)]) -> Result<ParsedConfig, ConfigError> {
        CsnapConfig::from_cmap(&map(pairs))
    }

    /// Parses a map that must give no warnings.
    fn parse(pairs: &[(&str, &str)]) -> Result<CsnapConfig, ConfigError> {
        parse_all(pairs).map(|p| {
            assert!(
                p.warnings.is_empty(),
                "unexpected warnings {:?}",
                p.warnings
            );
            p.config
        })
    }

    /// Parses a map that must give exactly one warning, and returns its key and detail.
    fn warning_of(pairs: &[(&str, &str)]) -> (CsnapConfig, String, String) {
        match parse_all(pairs) {
            Ok(ParsedConfig {
                config,
                mut warnings,
            }) if warnings.len() == 1 => {
                let w = warnings.remove(0);
                (config, w.key, w.detail)
            }
            other => panic!("expected one warning, got {other:?}"),
        }
    }

    fn error_of(pairs: &[(&str, &str)]) -> (String, String) {
        match parse(pairs) {
            Err(ConfigError::Invalid { key, detail }) => (key, detail),
            other => panic!("expected a Config error, got {other:?}"),
        }
    }

    fn with(changes: &[(&'static str, Option<&'static str>)]) -> Vec<(&'static str, &'static str)> {
        let mut pairs = full();
        for (key, value) in changes {
            pairs.retain(|(k, _)| k != key);
            if let Some(v) = value {
                pairs.push((key, v));
            }
        }
        pairs
    }

    #[test]
    fn full_section_parses() {
        let c = parse(&full()).unwrap();
        assert_eq!(c.key_file, PathBuf::from("/etc/csnap/k.key"));
        assert_eq!(c.control_socket, PathBuf::from("/run/csnap/c.sock"));
        assert_eq!(
            c.fencing,
            Fencing::Command("/usr/local/sbin/my-fence".into())
        );
        assert_eq!(c.volumes.len(), 2);
        let v = &c.volumes["vol0"];
        assert_eq!(v.name, "vol0");
        assert_eq!(v.origin, PathBuf::from("/dev/disk/by-id/origin0"));
        assert_eq!(v.store, PathBuf::from("/dev/disk/by-id/store0"));
        assert_eq!(v.server_port, 7788);
        assert_eq!(v.nbd_listen, NbdListen::Unix("/run/csnap/vol0.nbd".into()));
        assert_eq!(
            c.volumes["db-1"].nbd_listen,
            NbdListen::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(c.nodes[&NodeId(1)].name.as_deref(), Some("n1"));
        assert_eq!(c.nodes[&NodeId(1)].ring0_addr.as_deref(), Some("10.77.0.1"));
        assert_eq!(c.priority_of(NodeId(1)), 10);
        assert_eq!(c.priority_of(NodeId(2)), -5);
        assert_eq!(c.priority_of(NodeId(3)), DEFAULT_PRIORITY);
        assert_eq!(c.priority_of(NodeId(99)), DEFAULT_PRIORITY);
    }

    #[test]
    fn empty_map_gives_defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.key_file, PathBuf::from(DEFAULT_KEY_FILE));
        assert_eq!(c.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert_eq!(c.fencing, Fencing::KillNode);
        assert!(c.volumes.is_empty());
        assert!(c.nodes.is_empty());
    }

    #[test]
    fn fencing_methods_and_defaults() {
        let base = [
            ("csnap.vol0.origin", "/o"),
            ("csnap.vol0.store", "/s"),
            ("csnap.vol0.server_port", "1"),
        ];
        for (text, expected) in [
            ("kill_node", Fencing::KillNode),
            ("stonith", Fencing::Stonith),
            ("reset", Fencing::Reset),
        ] {
            let mut pairs = base.to_vec();
            pairs.push(("csnap.fencing", text));
            assert_eq!(parse(&pairs).unwrap().fencing, expected);
        }
        let c = parse(&base).unwrap();
        assert_eq!(
            c.volumes["vol0"].nbd_listen,
            NbdListen::Unix("/run/csnap/vol0.nbd".into())
        );
    }

    #[test]
    fn unknown_keys_are_warnings_naming_the_key_and_the_fix() {
        let (c, key, detail) = warning_of(&with(&[("csnap.keyfile", Some("/x"))]));
        assert_eq!(key, "csnap.keyfile");
        assert_eq!(c, parse(&full()).unwrap(), "the typo is ignored");
        assert!(
            detail.contains("unknown key") && detail.contains("key_file"),
            "{detail}"
        );
        assert!(
            detail.contains("`corosync-cmapctl -d csnap.keyfile`"),
            "{detail}"
        );

        let (c, key, detail) = warning_of(&with(&[("csnap.vol0.orign", Some("/x"))]));
        assert_eq!(key, "csnap.vol0.orign");
        assert_eq!(
            c.volumes["vol0"].origin,
            PathBuf::from("/dev/disk/by-id/origin0")
        );
        assert!(
            detail.contains("volume vol0")
                && detail.contains("origin")
                && detail.contains("corosync-cmapctl -d csnap.vol0.orign"),
            "{detail}"
        );

        let (_, key, detail) = warning_of(&with(&[("csnap.vol0.deeper.x", Some("1"))]));
        assert_eq!(key, "csnap.vol0.deeper.x");
        assert!(detail.contains("nested too deep"), "{detail}");
        let (_, key, _) = warning_of(&with(&[("csnap.bad.name.x", Some("1"))]));
        assert_eq!(key, "csnap.bad.name.x");

        // A subsection with nothing but unknown keys is no volume.
        let (c, key, _) = warning_of(&with(&[("csnap.vol9.orign", Some("/x"))]));
        assert_eq!(key, "csnap.vol9.orign");
        assert!(!c.volumes.contains_key("vol9"));

        // The nodelist is pruned on reload: fixing the file is enough there.
        let (_, key, detail) = warning_of(&with(&[("nodelist.node.1.csnap_prio", Some("3"))]));
        assert_eq!(key, "nodelist.node.1.csnap_prio");
        assert!(
            detail.contains("csnap_priority") && detail.contains("corosync-cfgtool -R"),
            "{detail}"
        );

        // Several: all of them, in key order.
        let parsed = parse_all(&with(&[
            ("csnap.zz", Some("1")),
            ("csnap.aa", Some("2")),
            ("csnap.vol0.x", Some("3")),
        ]))
        .unwrap();
        let keys: Vec<&str> = parsed.warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["csnap.aa", "csnap.vol0.x", "csnap.zz"]);

        // corosync's own keys in the nodelist and other sections are not ours.
        parse(&with(&[
            ("nodelist.node.1.ring1_addr", Some("10.0.0.1")),
            ("quorum.two_node", Some("1")),
        ]))
        .unwrap();
    }

    #[test]
    fn an_unused_fence_command_is_a_warning() {
        let (c, key, detail) = warning_of(&with(&[("csnap.fencing", Some("stonith"))]));
        assert_eq!(c.fencing, Fencing::Stonith);
        assert_eq!(key, "csnap.fence_command");
        assert!(
            detail.contains("fencing is stonith")
                && detail.contains("corosync-cmapctl -d csnap.fence_command"),
            "{detail}"
        );
        // Unused, its value is not judged.
        let (c, key, _) = warning_of(&with(&[
            ("csnap.fencing", Some("reset")),
            ("csnap.fence_command", Some("relative")),
        ]));
        assert_eq!(
            (c.fencing, key.as_str()),
            (Fencing::Reset, "csnap.fence_command")
        );
    }

    /// What cmap holds across reloads when an admin fixes a typo or removes a volume
    /// (corosync keeps keys removed from the csnap section): each step parses, or fails
    /// with an error that says how to clear the leftovers.
    #[test]
    fn leftovers_of_edits_never_block_a_reload() {
        // Typo, then fixed in the file: the typo stays in cmap beside the right key.
        let typo = with(&[("csnap.control_sock", Some("/run/x.sock"))]);
        let (c, key, _) = warning_of(&typo);
        assert_eq!(
            (c.control_socket, key.as_str()),
            (PathBuf::from("/run/csnap/c.sock"), "csnap.control_sock")
        );
        let mut fixed = typo.clone();
        fixed.retain(|(k, _)| *k != "csnap.control_socket");
        fixed.push(("csnap.control_socket", "/run/x.sock"));
        let (c, key, _) = warning_of(&fixed);
        assert_eq!(
            (c.control_socket, key.as_str()),
            (PathBuf::from("/run/x.sock"), "csnap.control_sock")
        );

        // fencing: command -> kill_node with fence_command removed from the file.
        let (c, key, _) = warning_of(&with(&[("csnap.fencing", Some("kill_node"))]));
        assert_eq!(
            (c.fencing, key.as_str()),
            (Fencing::KillNode, "csnap.fence_command")
        );

        // Volume db-1 renamed to db-2 in the file: db-1 is still there, on the same port.
        let mut renamed = map(&full());
        for (k, v) in map(&full()) {
            if let Some(item) = k.strip_prefix("csnap.db-1.") {
                renamed.insert(format!("csnap.db-2.{item}"), v);
            }
        }
        let (key, detail) = match CsnapConfig::from_cmap(&renamed) {
            Err(ConfigError::Invalid { key, detail }) => (key, detail),
            other => panic!("expected an Invalid error, got {other:?}"),
        };
        assert_eq!(key, "csnap.db-2.server_port");
        assert!(
            detail.contains("already used by volume db-1")
                && detail.contains("`corosync-cmapctl -D csnap.db-1.`"),
            "{detail}"
        );

        // A volume whose subsection lost keys (partly written, then renamed).
        let (key, detail) = error_of(&with(&[("csnap.db-1.store", None)]));
        assert_eq!(key, "csnap.db-1.store");
        assert!(
            detail.contains("corosync-cmapctl -D csnap.db-1."),
            "{detail}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("csnap.key_file", "etc/key", "csnap.key_file", "absolute"),
            ("csnap.control_socket", "", "csnap.control_socket", "empty"),
            (
                "csnap.fencing",
                "shoot",
                "csnap.fencing",
                "unknown fencing method",
            ),
            (
                "csnap.fencing",
                "kill_node   # kill_node | stonith",
                "csnap.fencing",
                "no inline comments",
            ),
            ("csnap.key_file", "\"/etc/k\"", "csnap.key_file", "quotes"),
            (
                "csnap.vol0.server_port",
                "0",
                "csnap.vol0.server_port",
                "TCP port",
            ),
            (
                "csnap.vol0.server_port",
                "70000",
                "csnap.vol0.server_port",
                "TCP port",
            ),
            (
                "csnap.vol0.server_port",
                "77a",
                "csnap.vol0.server_port",
                "TCP port",
            ),
            (
                "csnap.vol0.nbd_listen",
                "/run/x.nbd",
                "csnap.vol0.nbd_listen",
                "unix: or tcp:",
            ),
            (
                "csnap.vol0.nbd_listen",
                "tcp:localhost",
                "csnap.vol0.nbd_listen",
                "IP:PORT",
            ),
            (
                "csnap.vol0.nbd_listen",
                "unix:rel",
                "csnap.vol0.nbd_listen",
                "absolute",
            ),
            (
                "csnap.vol0.origin",
                "/dev/disk/by-id/store0",
                "csnap.vol0.store",
                "same device",
            ),
            (
                "csnap.db-1.server_port",
                "7788",
                "csnap.vol0.server_port",
                "already used",
            ),
            (
                "csnap.db-1.nbd_listen",
                "unix:/run/csnap/vol0.nbd",
                "csnap.vol0.nbd_listen",
                "already used",
            ),
            (
                "nodelist.node.0.csnap_priority",
                "high",
                "nodelist.node.0.csnap_priority",
                "integer",
            ),
            (
                "nodelist.node.1.nodeid",
                "1",
                "nodelist.node.1.nodeid",
                "twice",
            ),
            (
                "nodelist.node.1.nodeid",
                "0",
                "nodelist.node.1.nodeid",
                "not a node id",
            ),
            (
                "csnap.fencing.origin",
                "/x",
                "csnap.fencing.origin",
                "volume name",
            ),
            ("csnap.v!.origin", "/x", "csnap.v!.origin", "volume name"),
        ];
        for (key, value, expected_key, needle) in cases {
            let pairs = with(&[(key, Some(value))]);
            let (got_key, detail) = error_of(&pairs);
            assert_eq!(&got_key, expected_key, "setting {key}={value:?}: {detail}");
            assert!(
                detail.contains(needle),
                "setting {key}={value:?}: {detail:?} lacks {needle:?}"
            );
        }
    }

    #[test]
    fn missing_values_are_named() {
        for item in ["origin", "store", "server_port"] {
            let key: &'static str = match item {
                "origin" => "csnap.vol0.origin",
                "store" => "csnap.vol0.store",
                _ => "csnap.vol0.server_port",
            };
            let (got, detail) = error_of(&with(&[(key, None)]));
            assert_eq!(got, key);
            assert!(
                detail.contains("missing") && detail.contains("vol0"),
                "{detail}"
            );
        }
        let (key, detail) = error_of(&with(&[("csnap.fence_command", None)]));
        assert_eq!(key, "csnap.fence_command");
        assert!(
            detail.contains("required with fencing: command"),
            "{detail}"
        );

        let (key, _) = error_of(&with(&[
            ("nodelist.node.2.nodeid", None),
            ("nodelist.node.2.csnap_priority", Some("1")),
        ]));
        assert_eq!(key, "nodelist.node.2.nodeid");
        // A nodelist entry without nodeid and without csnap keys is skipped.
        let c = parse(&with(&[("nodelist.node.2.nodeid", None)])).unwrap();
        assert_eq!(c.nodes.len(), 2);
    }

    #[test]
    fn errors_display_the_key() {
        let (key, detail) = error_of(&with(&[("csnap.vol0.server_port", Some("x"))]));
        let text = ConfigError::Invalid { key, detail }.to_string();
        assert!(
            text.starts_with("corosync.conf key csnap.vol0.server_port:"),
            "{text}"
        );
        let (_, key, detail) = warning_of(&with(&[("csnap.keyfile", Some("/x"))]));
        let text = ConfigWarning { key, detail }.to_string();
        assert!(
            text.starts_with("corosync.conf key csnap.keyfile ignored: unknown key"),
            "{text}"
        );
    }

    /// Corosync's line rules (exec/coroparse.c): a line is a comment if its first non-blank
    /// character is `#`; `name {` must end its line; `}` stands alone; anything else is
    /// `key: value`, the value running to the end of the line.
    #[test]
    fn example_follows_corosync_syntax() {
        let mut depth = 0usize;
        for (n, line) in EXAMPLE_CONF.lines().enumerate() {
            let text = line.trim();
            let n = n + 1;
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            assert!(!text.contains('#'), "line {n}: inline comment in {line:?}");
            if let Some(name) = text.strip_suffix('{') {
                assert!(!name.trim().is_empty(), "line {n}: section without a name");
                assert!(!name.contains(['{', '}', ':']), "line {n}: {line:?}");
                depth += 1;
            } else if text == "}" {
                assert!(depth > 0, "line {n}: unbalanced }}");
                depth -= 1;
            } else {
                assert!(!text.contains(['{', '}']), "line {n}: brace in {line:?}");
                let (key, value) = text
                    .split_once(':')
                    .unwrap_or_else(|| panic!("line {n}: not `key: value`: {line:?}"));
                assert!(
                    !key.trim().is_empty() && !value.trim().is_empty(),
                    "line {n}"
                );
            }
        }
        assert_eq!(depth, 0, "unclosed section");
    }

    /// The example as cmap holds it: sections become dotted key components and the n-th
    /// `node` of the nodelist becomes `nodelist.node.<n>` (as corosync numbers them).
    fn example_as_cmap() -> BTreeMap<String, String> {
        let mut path: Vec<String> = Vec::new();
        let mut nodes = 0;
        let mut keys = BTreeMap::new();
        for line in EXAMPLE_CONF.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_suffix('{') {
                let name = name.trim();
                if name == "node" && path == ["nodelist"] {
                    path.push(format!("node.{nodes}"));
                    nodes += 1;
                } else {
                    path.push(name.to_string());
                }
            } else if line == "}" {
                path.pop();
            } else if let Some((key, value)) = line.split_once(':') {
                let mut full = path.clone();
                full.push(key.trim().to_string());
                keys.insert(full.join("."), value.trim().to_string());
            }
        }
        keys
    }

    #[test]
    fn example_parses() {
        let keys = example_as_cmap();
        assert_eq!(
            keys.get("csnap.fencing").map(String::as_str),
            Some("kill_node")
        );
        let parsed = CsnapConfig::from_cmap(&keys).unwrap();
        assert_eq!(parsed.warnings, []);
        let c = parsed.config;
        assert_eq!(c.key_file, PathBuf::from(DEFAULT_KEY_FILE));
        assert_eq!(c.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert_eq!(c.fencing, Fencing::KillNode);
        let v = &c.volumes["vol0"];
        assert_eq!(v.server_port, 7788);
        assert_ne!(v.origin, v.store);
        assert_eq!(v.nbd_listen, NbdListen::Unix("/run/csnap/vol0.nbd".into()));
        assert_eq!(c.priority_of(NodeId(1)), 10);
        assert_eq!(c.nodes[&NodeId(1)].name.as_deref(), Some("alpha"));
    }
}
