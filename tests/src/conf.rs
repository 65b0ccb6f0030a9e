//! corosync.conf for one test node, rendered from a plain description.
//!
//! Corosync's parser wants every `{` at the end of its line and one `key: value` per line;
//! unknown top-level sections (our `csnap { ... }`) and unknown per-node keys
//! (`csnap_priority`) are read into cmap unchanged, so agents find them there.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use cpg_glue::NodeId;

use crate::error::HarnessError;

/// The `csnap { ... }` section, as flat dotted keys below `csnap.`: the key `vol0.origin`
/// renders as `vol0 { origin: ... }` and reads back from cmap as `csnap.vol0.origin`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CsnapSection {
    entries: BTreeMap<String, String>,
}

impl CsnapSection {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key` (dotted path below `csnap.`) = `value`, refusing anything corosync's
    /// parser would misread: empty or non-identifier key parts, values with line breaks or
    /// braces, and a key that is both a value and a subsection.
    pub fn set(
        mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, HarnessError> {
        let (key, value) = (key.into(), value.into());
        for part in key.split('.') {
            if part.is_empty()
                || !part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(HarnessError::invalid(
                    "csnap key",
                    format!("{key:?}: each dot-separated part must be [A-Za-z0-9_-]+"),
                ));
            }
        }
        if value.is_empty() || value.trim() != value || value.contains(['\n', '\r', '{', '}']) {
            return Err(HarnessError::invalid(
                "csnap value",
                format!("{key} = {value:?}: must be non-empty, one line, no braces, no surrounding blanks"),
            ));
        }
        let clashes = self.entries.keys().find(|other| {
            other.starts_with(&format!("{key}.")) || key.starts_with(&format!("{other}."))
        });
        if let Some(other) = clashes {
            return Err(HarnessError::invalid(
                "csnap key",
                format!("{key:?} and {other:?}: a key cannot be both a value and a section"),
            ));
        }
        self.entries.insert(key, value);
        Ok(self)
    }

    /// The entries as cmap shows them: keys with the `csnap.` prefix.
    pub fn as_cmap(&self) -> BTreeMap<String, String> {
        self.entries
            .iter()
            .map(|(k, v)| (format!("csnap.{k}"), v.clone()))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Renders `csnap { ... }` (nothing when empty).
    fn render(&self, out: &mut String) {
        if self.entries.is_empty() {
            return;
        }
        out.push_str("csnap {\n");
        // Keys are sorted, so the members of one subsection are adjacent: open and close
        // sections as the common prefix with the previous key changes.
        let mut open: Vec<&str> = Vec::new();
        for (key, value) in &self.entries {
            let parts: Vec<&str> = key.split('.').collect();
            let (leaf, path) = parts.split_last().expect("split yields at least one part");
            let common = open.iter().zip(path).take_while(|(a, b)| a == b).count();
            while open.len() > common {
                open.pop();
                let _ = writeln!(out, "{}}}", indent(open.len() + 1));
            }
            for part in &path[common..] {
                let _ = writeln!(out, "{}{part} {{", indent(open.len() + 1));
                open.push(part);
            }
            let _ = writeln!(out, "{}{leaf}: {value}", indent(open.len() + 1));
        }
        while !open.is_empty() {
            open.pop();
            let _ = writeln!(out, "{}}}", indent(open.len() + 1));
        }
        out.push_str("}\n");
    }
}

fn indent(level: usize) -> String {
    "    ".repeat(level)
}

/// One node in the nodelist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub id: NodeId,
    pub addr: Ipv4Addr,
    /// `csnap_priority` in the node's nodelist entry (cmap `nodelist.node.K.csnap_priority`).
    pub priority: Option<u32>,
}

impl NodeSpec {
    /// The node's name in the nodelist: `n<id>`.
    pub fn name(&self) -> String {
        format!("n{}", self.id)
    }
}

/// Everything one node's corosync.conf says.
#[derive(Debug, Clone)]
pub struct ConfSpec<'a> {
    pub cluster_name: &'a str,
    pub token_ms: u32,
    pub nodes: &'a [NodeSpec],
    /// The node's own directory: its log file and corosync's state_dir live there.
    pub node_dir: &'a Path,
    pub csnap: &'a CsnapSection,
    /// Text appended verbatim after everything else (e.g. a section written by hand).
    pub extra: &'a str,
}

impl ConfSpec<'_> {
    pub fn render(&self) -> String {
        let dir = self.node_dir.display();
        let mut out = String::new();
        let _ = write!(
            out,
            "# Written by the csnap-e2e test harness.\n\
             totem {{\n    version: 2\n    cluster_name: {}\n    transport: knet\n    \
             crypto_cipher: none\n    crypto_hash: none\n    token: {}\n}}\n\
             nodelist {{\n",
            self.cluster_name, self.token_ms
        );
        for node in self.nodes {
            let _ = write!(
                out,
                "    node {{\n        ring0_addr: {}\n        nodeid: {}\n        name: {}\n",
                node.addr,
                node.id,
                node.name()
            );
            if let Some(priority) = node.priority {
                let _ = writeln!(out, "        csnap_priority: {priority}");
            }
            out.push_str("    }\n");
        }
        let _ = write!(
            out,
            "}}\nquorum {{\n    provider: corosync_votequorum\n}}\n\
             logging {{\n    to_logfile: yes\n    logfile: {dir}/corosync.log\n    \
             to_syslog: no\n    to_stderr: no\n    timestamp: on\n}}\n\
             system {{\n    state_dir: {dir}\n}}\n"
        );
        self.csnap.render(&mut out);
        out.push_str(self.extra);
        if !self.extra.is_empty() && !self.extra.ends_with('\n') {
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csnap_section_renders_nested_blocks() {
        let section = CsnapSection::new()
            .set("fence", "cfg")
            .unwrap()
            .set("vol0.origin", "/dev/sda")
            .unwrap()
            .set("vol0.store", "/dev/sdb")
            .unwrap()
            .set("vol1.limits.chunk", "64k")
            .unwrap()
            .set("zz", "last value")
            .unwrap();
        let mut out = String::new();
        section.render(&mut out);
        let expected = "csnap {\n    fence: cfg\n    vol0 {\n        origin: /dev/sda\n        \
                        store: /dev/sdb\n    }\n    vol1 {\n        limits {\n            \
                        chunk: 64k\n        }\n    }\n    zz: last value\n}\n";
        assert_eq!(out, expected);
        assert_eq!(
            section
                .as_cmap()
                .get("csnap.vol1.limits.chunk")
                .map(String::as_str),
            Some("64k")
        );
    }

    #[test]
    fn csnap_section_refuses_what_corosync_would_misparse() {
        let base = CsnapSection::new().set("vol0.origin", "/dev/a").unwrap();
        for (key, value) in [
            ("", "x"),
            ("a..b", "x"),
            ("a b", "x"),
            ("a{", "x"),
            ("k", ""),
            ("k", "two\nlines"),
            ("k", "brace}"),
            ("k", " padded"),
            ("vol0", "leaf-and-section"),
            ("vol0.origin.deeper", "x"),
        ] {
            assert!(base.clone().set(key, value).is_err(), "{key:?} = {value:?}");
        }
    }

    #[test]
    fn conf_has_every_node_and_the_sections_tests_rely_on() {
        let nodes = [
            NodeSpec {
                id: NodeId(1),
                addr: Ipv4Addr::new(10, 77, 0, 1),
                priority: Some(10),
            },
            NodeSpec {
                id: NodeId(2),
                addr: Ipv4Addr::new(10, 77, 0, 2),
                priority: None,
            },
        ];
        let csnap = CsnapSection::new().set("fence", "cfg").unwrap();
        let text = ConfSpec {
            cluster_name: "cseabcde",
            token_ms: 1500,
            nodes: &nodes,
            node_dir: Path::new("/tmp/x/n1"),
            csnap: &csnap,
            extra: "other {\n    # by hand\n    k: v\n}",
        }
        .render();
        for needle in [
            "transport: knet",
            "token: 1500",
            "ring0_addr: 10.77.0.1\n        nodeid: 1\n        name: n1\n        csnap_priority: 10\n",
            "ring0_addr: 10.77.0.2\n        nodeid: 2\n        name: n2\n    }",
            "provider: corosync_votequorum",
            "logfile: /tmp/x/n1/corosync.log",
            "state_dir: /tmp/x/n1",
            "csnap {\n    fence: cfg\n}\nother {\n    # by hand\n    k: v\n}\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        // Corosync's parser rejects anything after an opening brace on the same line.
        for line in text.lines() {
            if let Some(pos) = line.find('{') {
                assert_eq!(pos + 1, line.len(), "text after '{{' in {line:?}");
            }
        }
    }
}
