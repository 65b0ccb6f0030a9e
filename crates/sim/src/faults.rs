//! The faults the scheduler injects: power-off of a node (corosync, agent, server and
//! clients at once, losing the node's unflushed writes), its restart, two-sided partitions
//! (also cutting the server's node off with a minority while its agent is frozen or slow to
//! see it), heals, a crash of the server process alone, agent crashes and restarts (memory
//! lost), frozen and lagging agents, dropped (reset) and delayed client connections, and
//! frozen clients.

use rand::Rng;

use crate::checkers::Check;
use crate::world::World;

impl World {
    pub(crate) fn fault(&mut self) -> Check {
        let i = self.rng.gen_range(0..self.nodes.len());
        let id = self.nodes[i].id;
        match self.rng.gen_range(0..15) {
            0 => {
                let up = self
                    .nodes
                    .iter()
                    .filter(|n| self.cluster.is_up(n.id))
                    .count();
                if self.cluster.is_up(id) && up > 1 {
                    self.power_off(i)?;
                }
            }
            1 => {
                if !self.cluster.is_up(id) {
                    let _ = self.cluster.restart_node(id);
                    self.note(format!("{} node {id} restarts", self.now));
                }
                self.start_agent(i)?;
            }
            2 => {
                let mut a = Vec::new();
                let mut b = Vec::new();
                for n in &self.nodes {
                    if self.rng.gen_bool(0.5) {
                        a.push(n.id)
                    } else {
                        b.push(n.id)
                    }
                }
                self.note(format!("{} partition {a:?} | {b:?}", self.now));
                let _ = self.cluster.partition(&[a.clone(), b.clone()]);
                self.sides = Some(vec![a, b]);
                self.stats.partitions += 1;
            }
            3 => {
                self.note(format!("{} heal", self.now));
                self.cluster.heal();
                self.sides = None;
            }
            4 => {
                if self.nodes[i].server().is_some() {
                    self.stats.server_crashes += 1;
                    self.server_failed(i, "server process crashed")?;
                }
            }
            5 => self.crash_agent(i),
            6 => {
                let ms = self.rng.gen_range(0..15_000);
                self.nodes[i].frozen_until = self.now + ms;
                self.note(format!("{} agent {id} frozen for {ms} ms", self.now));
            }
            7 => {
                let i = self
                    .server_node()
                    .filter(|_| self.rng.gen_bool(0.7))
                    .unwrap_or(i);
                let ms = self.rng.gen_range(0..15_000);
                self.nodes[i].lag_until = self.now + ms;
                self.nodes[i].lag_quorum_only = self.rng.gen_bool(0.5);
                self.note(format!(
                    "{} {} lags for {ms} ms",
                    self.now, self.nodes[i].id
                ));
            }
            8 => {
                // Cut the server's node off (alone or with a minority), often while its
                // agent is slow to notice or frozen.
                let Some(s) = self.server_node() else {
                    return Ok(());
                };
                let sid = self.nodes[s].id;
                let mut small = vec![sid];
                let mut big = Vec::new();
                for n in &self.nodes {
                    if n.id == sid {
                        continue;
                    }
                    if small.len() < (self.nodes.len() - 1) / 2 && self.rng.gen_bool(0.3) {
                        small.push(n.id);
                    } else {
                        big.push(n.id);
                    }
                }
                self.note(format!("{} isolate server {small:?} | {big:?}", self.now));
                let _ = self.cluster.partition(&[small.clone(), big.clone()]);
                self.sides = Some(vec![small, big]);
                self.stats.partitions += 1;
                let ms = self.rng.gen_range(0..15_000);
                match self.rng.gen_range(0..3) {
                    0 => {
                        self.nodes[s].lag_until = self.now + ms;
                        self.nodes[s].lag_quorum_only = self.rng.gen_bool(0.5);
                    }
                    1 => self.nodes[s].frozen_until = self.now + ms,
                    _ => {}
                }
            }
            9 => {
                self.crash_agent(i);
                self.start_agent(i)?;
            }
            10 | 11 => {
                let keys: Vec<_> = self.conns.keys().copied().collect();
                if keys.is_empty() {
                    return Ok(());
                }
                let c = keys[self.rng.gen_range(0..keys.len())];
                if self.rng.gen_bool(0.5) {
                    self.stats.conn_drops += 1;
                    self.note(format!("{} conn {c} dropped", self.now));
                    self.reset_conn(c)?;
                } else {
                    let ms = self.rng.gen_range(0..5_000);
                    if let Some(conn) = self.conns.get_mut(&c) {
                        conn.delayed_until = self.now + ms;
                    }
                }
            }
            12 => {
                let n = self.nodes[i].clients.len();
                if n > 0 {
                    let ci = self.rng.gen_range(0..n);
                    let ms = self.rng.gen_range(0..16_000);
                    self.nodes[i].clients[ci].frozen_until = self.now + ms;
                    self.stats.frozen_clients += 1;
                    let cid = self.nodes[i].clients[ci].id;
                    self.note(format!(
                        "{} client {cid} on {id} frozen for {ms} ms",
                        self.now
                    ));
                }
            }
            _ => self.start_agent(i)?,
        }
        Ok(())
    }

    fn server_node(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| self.nodes[i].server().is_some())
    }
}
