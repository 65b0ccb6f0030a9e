//! The activation gate: no origin write granted before the gathered clients settled, and
//! the gather lists every snapshot client that may hold read locks of the old server.

use std::collections::BTreeSet;

use cpg_glue::NodeId;
use csnap_proto::ClientId;

use super::Check;
use crate::node::{Node, Server};

/// When an engine sends `OriginWriteOk`: every client of its activation list has
/// reconnected to it and sent `ResendDone`, or was declared gone by its agent.
pub fn on_grant(node: NodeId, server: &Server) -> Check {
    let missing: Vec<&ClientId> = server.expected.difference(&server.settled).collect();
    if !missing.is_empty() {
        return Err(format!(
            "{node}'s engine (g{}) granted an origin write before gathered clients {missing:?} settled",
            server.generation
        ));
    }
    Ok(())
}

/// At activation on `nodes[i]`: the list holds every snapshot client of every member that
/// was in the chooser's view from the choice to now and attached at both moments (stale
/// members are not gathered: they are fenced or reset).
pub fn on_activation(nodes: &[Node], i: usize, listed: &[ClientId]) -> Check {
    let Some((at_start, view_at_start)) = &nodes[i].start_snapshot else {
        return Err(format!("{}: activation without a choice", nodes[i].id));
    };
    let Some(agent) = nodes[i].agent.as_ref() else {
        return Ok(());
    };
    let st = agent.machine.status();
    let view_now: Vec<NodeId> = st.members.iter().map(|m| m.node).collect();
    for n in nodes {
        if !view_now.contains(&n.id)
            || !view_at_start.contains(&n.id)
            || n.agent.is_none()
            || st.stale.contains(&n.id)
        {
            continue;
        }
        let before = at_start.get(&n.id).cloned().unwrap_or_default();
        let now: BTreeSet<ClientId> = n.readers().into_iter().collect();
        for c in before.intersection(&now) {
            if !listed.contains(c) {
                return Err(format!(
                    "activation on {} misses snapshot client {c} of member {}",
                    nodes[i].id, n.id
                ));
            }
        }
    }
    Ok(())
}
