//! A node's view of the cluster, as `corosync-quorumtool -s` prints it.

use cpg_glue::NodeId;

/// What one node's corosync reports about its partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Ring id as printed (`<representative>.<seq hex>`), e.g. `1.11`.
    pub ring: String,
    pub quorate: bool,
    /// Node ids in the partition, sorted.
    pub members: Vec<NodeId>,
}

impl NodeView {
    /// The ring sequence number (the hex part after the dot), which only grows.
    pub fn ring_seq(&self) -> Option<u64> {
        let (_, seq) = self.ring.split_once('.')?;
        u64::from_str_radix(seq, 16).ok()
    }
}

/// Parses `corosync-quorumtool -s` output; `None` if it lacks the ring, the quorate flag
/// or the membership table (corosync still starting, or a different output format).
pub fn parse_quorumtool(text: &str) -> Option<NodeView> {
    let mut ring = None;
    let mut quorate = None;
    let mut members = Vec::new();
    let mut in_table = false;
    let mut saw_table = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(value) = trimmed.strip_prefix("Ring ID:") {
            ring = Some(value.trim().to_string());
        } else if let Some(value) = trimmed.strip_prefix("Quorate:") {
            quorate = match value.trim() {
                "Yes" => Some(true),
                "No" => Some(false),
                _ => None,
            };
        } else if trimmed.starts_with("Nodeid") {
            in_table = true;
            saw_table = true;
        } else if in_table {
            let id = trimmed
                .split_whitespace()
                .next()
                .and_then(|w| w.parse().ok());
            match id {
                Some(id) => members.push(NodeId(id)),
                None => in_table = false,
            }
        }
    }
    if !saw_table {
        return None;
    }
    members.sort();
    Some(NodeView {
        ring: ring?,
        quorate: quorate?,
        members,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUORATE: &str = "Quorum information
------------------
Date:             Sun Nov 22 00:26:06 2026
Quorum provider:  corosync_votequorum
Nodes:            3
Node ID:          1
Ring ID:          1.9
Quorate:          Yes

Votequorum information
----------------------
Expected votes:   3
Highest expected: 3
Total votes:      3
Quorum:           2  
Flags:            Quorate 

Membership information
----------------------
    Nodeid      Votes Name
         3          1 n3
         1          1 n1 (local)
         2          1 n2
";

    #[test]
    fn parses_a_quorate_view() {
        assert_eq!(
            parse_quorumtool(QUORATE),
            Some(NodeView {
                ring: "1.9".into(),
                quorate: true,
                members: vec![NodeId(1), NodeId(2), NodeId(3)],
            })
        );
    }

    #[test]
    fn parses_an_inquorate_view() {
        let text = QUORATE
            .replace("Quorate:          Yes", "Quorate:          No")
            .replace("Ring ID:          1.9", "Ring ID:          3.d")
            .replace(
                "         1          1 n1 (local)\n         2          1 n2\n",
                "",
            );
        assert_eq!(
            parse_quorumtool(&text),
            Some(NodeView {
                ring: "3.d".into(),
                quorate: false,
                members: vec![NodeId(3)],
            })
        );
        assert_eq!(parse_quorumtool(&text).unwrap().ring_seq(), Some(0xd));
    }

    #[test]
    fn incomplete_output_is_no_view() {
        assert_eq!(parse_quorumtool("Cannot initialize CMAP service\n"), None);
        assert_eq!(
            parse_quorumtool(&QUORATE.replace("Ring ID:", "Ring:")),
            None
        );
    }
}
