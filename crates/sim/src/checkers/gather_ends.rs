//! The gather always ends: once the world is healed, every node is up and time passes
//! without faults, exactly one engine serves with its activation gate open, every agent
//! agrees on the server and its address, and nobody waits on a gather.

use csnap_agent::cluster::state::Role;
use csnap_agent::cluster::Gate;

use super::Check;
use crate::node::Node;

pub fn converged(nodes: &[Node]) -> Check {
    let mut serving = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for n in nodes {
        let Some(a) = n.agent.as_ref() else {
            return Err(format!("{} has no agent", n.id));
        };
        let st = a.machine.status();
        if st.role == Role::Serving {
            serving.push(n.id);
        }
        if let Gate::Gather(missing) = &st.gate {
            return Err(format!("{} still gathers, missing {missing:?}", n.id));
        }
        if !st.stale.is_empty() {
            return Err(format!("{} still holds stale {:?}", n.id, st.stale));
        }
        seen.insert(st.server.clone());
    }
    if serving.len() != 1 {
        return Err(format!("serving agents: {serving:?}"));
    }
    if seen.len() != 1 {
        return Err(format!("agents disagree on the server: {seen:?}"));
    }
    let s = serving[0];
    let Some(node) = nodes.iter().find(|n| n.id == s) else {
        return Err(format!("serving node {s} unknown"));
    };
    let Some(server) = node.server() else {
        return Err(format!("{s}'s agent serves but no engine runs there"));
    };
    if !server.engine.is_active() {
        return Err(format!(
            "{s}'s engine still waits at its activation gate for {:?}",
            server.engine.awaited_clients()
        ));
    }
    Ok(())
}
