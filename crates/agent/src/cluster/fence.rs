//! Fencing jobs of the member that claimed them: one per node, with a timeout per attempt
//! and a retry delay after a failure. Fencing is retried until it is confirmed or no
//! longer needed (the node came back clean, or a departed server's lease certainly ran
//! out: the caller cancels the job then, see `VolumeMembership::end_fencing`): giving up would
//! leave a node with state of another lineage loose, so failures are logged each time and
//! shown in status instead (dlm_controld also keeps trying; a person can step in).

use std::collections::BTreeMap;

use cpg_glue::NodeId;

use crate::config::Fencing;

/// Where the fencing of one node stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// An attempt is out; counted failed if no result by `deadline_ms`.
    Running {
        /// Monotonic ms.
        deadline_ms: u64,
    },
    /// The last attempt failed; the next starts at `at_ms`.
    RetryAt {
        /// Monotonic ms.
        at_ms: u64,
    },
}

/// The fencing of one node, until it is confirmed or cancelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// How the node is fenced.
    pub method: Fencing,
    /// The number of the current (or last) attempt, from 1.
    pub attempt: u32,
    /// Running, or waiting to retry.
    pub state: JobState,
    /// Why the last attempt failed, if one did.
    pub last_error: Option<String>,
}

/// What the table wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceAction {
    /// Start an attempt to fence `node`.
    Attempt {
        /// The node to fence.
        node: NodeId,
        /// How.
        method: Fencing,
        /// The attempt's number, from 1.
        attempt: u32,
    },
    /// An attempt got no result in time: it counts as failed.
    TimedOut {
        /// The node it was fencing.
        node: NodeId,
        /// The attempt's number.
        attempt: u32,
    },
}

/// The fencing jobs of one volume's membership core, one per node being fenced.
#[derive(Debug, Clone, Default)]
pub struct FenceTable {
    jobs: BTreeMap<NodeId, Job>,
}

impl FenceTable {
    /// Starts fencing `node` unless a job for it exists; returns the first attempt.
    pub fn start(
        &mut self,
        node: NodeId,
        method: Fencing,
        now: u64,
        timeout_ms: u64,
    ) -> Option<FenceAction> {
        if self.jobs.contains_key(&node) {
            return None;
        }
        self.jobs.insert(
            node,
            Job {
                method: method.clone(),
                attempt: 1,
                state: JobState::Running {
                    deadline_ms: now.saturating_add(timeout_ms),
                },
                last_error: None,
            },
        );
        Some(FenceAction::Attempt {
            node,
            method,
            attempt: 1,
        })
    }

    /// A result came back. `Some(true)`: confirmed, the job is done. `Some(false)`: failed,
    /// retried after `retry_ms`. `None`: no job was running for the node (a late result of
    /// an attempt that had timed out; a late success is still taken as confirmation by the
    /// caller only if it returns `Some(true)`, so it is taken here too).
    pub fn result(
        &mut self,
        node: NodeId,
        ok: bool,
        detail: &str,
        now: u64,
        retry_ms: u64,
    ) -> Option<bool> {
        let job = self.jobs.get_mut(&node)?;
        if ok {
            self.jobs.remove(&node);
            return Some(true);
        }
        job.last_error = Some(detail.to_owned());
        job.state = JobState::RetryAt {
            at_ms: now.saturating_add(retry_ms),
        };
        Some(false)
    }

    /// Timeouts and due retries.
    pub fn tick(&mut self, now: u64, timeout_ms: u64, retry_ms: u64) -> Vec<FenceAction> {
        let mut out = Vec::new();
        for (node, job) in self.jobs.iter_mut() {
            match job.state {
                JobState::Running { deadline_ms } if now >= deadline_ms => {
                    out.push(FenceAction::TimedOut {
                        node: *node,
                        attempt: job.attempt,
                    });
                    job.last_error = Some(format!("attempt {} timed out", job.attempt));
                    job.state = JobState::RetryAt {
                        at_ms: now.saturating_add(retry_ms),
                    };
                }
                JobState::RetryAt { at_ms } if now >= at_ms => {
                    job.attempt = job.attempt.saturating_add(1);
                    job.state = JobState::Running {
                        deadline_ms: now.saturating_add(timeout_ms),
                    };
                    out.push(FenceAction::Attempt {
                        node: *node,
                        method: job.method.clone(),
                        attempt: job.attempt,
                    });
                }
                _ => {}
            }
        }
        out
    }

    /// The node no longer needs fencing.
    pub fn cancel(&mut self, node: NodeId) -> bool {
        self.jobs.remove(&node).is_some()
    }

    /// Every job, by the node it fences.
    pub fn jobs(&self) -> &BTreeMap<NodeId, Job> {
        &self.jobs
    }

    /// The earliest deadline or retry time.
    pub fn next_deadline(&self) -> Option<u64> {
        self.jobs
            .values()
            .map(|j| match j.state {
                JobState::Running { deadline_ms } => deadline_ms,
                JobState::RetryAt { at_ms } => at_ms,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_time_out_fail_and_retry_until_confirmed() {
        let mut t = FenceTable::default();
        let n = NodeId(3);
        assert!(matches!(
            t.start(n, Fencing::KillNode, 0, 100),
            Some(FenceAction::Attempt { attempt: 1, .. })
        ));
        assert_eq!(
            t.start(n, Fencing::KillNode, 0, 100),
            None,
            "one job per node"
        );
        assert!(t.tick(99, 100, 10).is_empty());
        assert_eq!(
            t.tick(100, 100, 10),
            vec![FenceAction::TimedOut {
                node: n,
                attempt: 1
            }]
        );
        assert!(matches!(
            t.tick(110, 100, 10).as_slice(),
            [FenceAction::Attempt { attempt: 2, .. }]
        ));
        assert_eq!(t.result(n, false, "no route", 120, 10), Some(false));
        assert_eq!(t.next_deadline(), Some(130));
        assert!(matches!(
            t.tick(130, 100, 10).as_slice(),
            [FenceAction::Attempt { attempt: 3, .. }]
        ));
        assert_eq!(t.result(n, true, "", 140, 10), Some(true));
        assert!(t.jobs().is_empty());
        assert_eq!(t.result(n, true, "", 150, 10), None);
    }
}
