//! A stale node writes nothing before it is fenced or reset: once its agent holds itself
//! stale (state of another lineage after a merge), its engine is gone.

use super::Check;
use crate::node::Node;

pub fn check(node: &Node) -> Check {
    let Some(agent) = node.agent.as_ref() else {
        return Ok(());
    };
    if node.server().is_some() && agent.machine.holds_itself_stale() {
        return Err(format!(
            "{} holds itself stale and its engine still serves",
            agent.machine.local()
        ));
    }
    Ok(())
}
