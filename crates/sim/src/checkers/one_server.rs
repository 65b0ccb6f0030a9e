//! At most one serving engine per store at any instant, globally (not per partition), and
//! none on a node whose agent knows its partition lost quorum.

use super::Check;
use crate::node::Node;

/// After every step: at most one node has a running engine. An engine counts from its
/// activation until it is dropped (stop, crash, power-off, or its serving lease ran out:
/// the world drops it the moment time passes its lease, as the server's own lease timer
/// does).
pub fn check(nodes: &[Node], now: u64) -> Check {
    let running: Vec<String> = nodes
        .iter()
        .filter_map(|n| {
            n.server()
                .map(|s| format!("{} (g{} lease until {})", n.id, s.generation, n.lease_until))
        })
        .collect();
    if running.len() > 1 {
        return Err(format!(
            "two serving engines on one store at {now}: {}",
            running.join(", ")
        ));
    }
    Ok(())
}

/// After the agent of `node` handled a quorum loss and its outputs were carried out.
pub fn after_quorum_loss(node: &Node) -> Check {
    if node.server().is_some() {
        return Err(format!(
            "{}: its partition lost quorum and its engine still serves",
            node.id
        ));
    }
    Ok(())
}
