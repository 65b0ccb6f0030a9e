//! The harness's network model as pure functions: which bridge each node's veth goes on
//! for a partition, and what membership every running node should then report.

use std::collections::BTreeMap;

use cpg_glue::NodeId;

use crate::error::HarnessError;

/// Bridge per node for `sides`: the k-th non-empty side gets bridge k+1 (bridge 0 is the
/// main bridge, used when healed), and each node named in no side gets a bridge of its
/// own. Unknown nodes and nodes named twice are refused.
pub fn assign_bridges(
    nodes: &[NodeId],
    sides: &[Vec<NodeId>],
) -> Result<BTreeMap<NodeId, u32>, HarnessError> {
    let mut assignment = BTreeMap::new();
    let mut next_bridge = 1;
    for side in sides.iter().filter(|s| !s.is_empty()) {
        for &node in side {
            if !nodes.contains(&node) {
                return Err(HarnessError::UnknownNode(node));
            }
            if assignment.insert(node, next_bridge).is_some() {
                return Err(HarnessError::invalid(
                    "partition",
                    format!("node {node} named in more than one side: {sides:?}"),
                ));
            }
        }
        next_bridge += 1;
    }
    for &node in nodes {
        assignment.entry(node).or_insert_with(|| {
            next_bridge += 1;
            next_bridge - 1
        });
    }
    Ok(assignment)
}

/// What each running node should see: the running nodes on its bridge, and quorate iff
/// they hold a strict majority of all `configured` nodes (votequorum, one vote each).
pub fn expected_views(
    configured: usize,
    running: &[NodeId],
    bridge_of: &BTreeMap<NodeId, u32>,
) -> BTreeMap<NodeId, (Vec<NodeId>, bool)> {
    running
        .iter()
        .map(|node| {
            let mut peers: Vec<NodeId> = running
                .iter()
                .copied()
                .filter(|p| bridge_of.get(p) == bridge_of.get(node))
                .collect();
            peers.sort();
            let quorate = peers.len() * 2 > configured;
            (*node, (peers, quorate))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[u32]) -> Vec<NodeId> {
        list.iter().copied().map(NodeId).collect()
    }

    fn bridges(pairs: &[(u32, u32)]) -> BTreeMap<NodeId, u32> {
        pairs.iter().map(|&(n, b)| (NodeId(n), b)).collect()
    }

    #[test]
    fn sides_get_bridges_and_the_unnamed_are_isolated() {
        let nodes = ids(&[1, 2, 3, 4, 5]);
        assert_eq!(
            assign_bridges(&nodes, &[ids(&[1, 2])]).unwrap(),
            bridges(&[(1, 1), (2, 1), (3, 2), (4, 3), (5, 4)])
        );
        assert_eq!(
            assign_bridges(&nodes, &[vec![], ids(&[5, 3]), ids(&[1])]).unwrap(),
            bridges(&[(1, 2), (2, 3), (3, 1), (4, 4), (5, 1)])
        );
        assert_eq!(
            assign_bridges(&nodes, &[]).unwrap(),
            bridges(&[(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)])
        );
    }

    #[test]
    fn bad_partitions_are_refused() {
        let nodes = ids(&[1, 2, 3]);
        assert!(matches!(
            assign_bridges(&nodes, &[ids(&[1, 4])]),
            Err(HarnessError::UnknownNode(NodeId(4)))
        ));
        let twice = assign_bridges(&nodes, &[ids(&[1, 2]), ids(&[2, 3])]).unwrap_err();
        assert!(twice.to_string().contains("node 2"), "{twice}");
    }

    #[test]
    fn expected_views_follow_bridges_running_nodes_and_majority() {
        // 5 nodes: 1,2,3 on bridge 1 (3 is stopped), 4,5 on bridge 2.
        let views = expected_views(
            5,
            &ids(&[1, 2, 4, 5]),
            &bridges(&[(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)]),
        );
        assert_eq!(views.len(), 4, "a stopped node has no view");
        assert_eq!(
            views[&NodeId(1)],
            (ids(&[1, 2]), false),
            "2 of 5 is no majority"
        );
        assert_eq!(views[&NodeId(4)], (ids(&[4, 5]), false));
        let healed = expected_views(
            5,
            &ids(&[1, 2, 4]),
            &bridges(&[(1, 0), (2, 0), (3, 0), (4, 0), (5, 0)]),
        );
        assert_eq!(healed[&NodeId(2)], (ids(&[1, 2, 4]), true));
        let tie = expected_views(
            4,
            &ids(&[1, 2, 3, 4]),
            &bridges(&[(1, 1), (2, 1), (3, 2), (4, 2)]),
        );
        assert!(tie.values().all(|(_, quorate)| !quorate), "2 of 4 is a tie");
    }
}
