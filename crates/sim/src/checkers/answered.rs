//! Every request is answered: once the world settled and its clients finished the I/O they
//! had under way, no client with an open session still waits for an answer (requests
//! resent to a new server after a failover are not lost, and no grant waits for ever).

use super::Check;
use crate::node::Node;

pub fn check(nodes: &[Node], waited_ms: u64) -> Check {
    for n in nodes {
        for c in &n.clients {
            if c.conn.is_some() && c.session.is_open() && c.session.unanswered() > 0 {
                return Err(format!(
                    "client {} on {} still waits for {} answers {waited_ms} ms after settling",
                    c.id,
                    n.id,
                    c.session.unanswered()
                ));
            }
        }
    }
    Ok(())
}
