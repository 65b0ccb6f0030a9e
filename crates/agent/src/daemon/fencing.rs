//! Carrying out `Output::Fence`: the configured method against a node, with a result only
//! once the node is certainly off (or the attempt failed).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use cpg_glue::NodeId;

use crate::config::Fencing;

/// How a fencing attempt is made. The machine times attempts out and retries; an
/// implementation should still give up by itself after a while.
pub trait Fencer: Send + Sync + 'static {
    /// Fences `node` by `method` (`reason` is for its logs): `Ok` once it is certainly stopped,
    /// `Err` with what went wrong.
    fn fence<'a>(
        &'a self,
        node: NodeId,
        method: &'a Fencing,
        reason: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

/// One attempt of an external command may take this long before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Fencing on a real cluster: corosync's cfg `kill_node`, pacemaker's `stonith_admin`, or
/// the configured command.
pub struct ClusterFencer {
    /// Node names (corosync.conf `name`, else `ring0_addr`) for stonith_admin, which
    /// fences by name.
    pub names: BTreeMap<NodeId, String>,
    /// `stonith_admin` (a path in tests).
    pub stonith_admin: PathBuf,
}

impl Fencer for ClusterFencer {
    fn fence<'a>(
        &'a self,
        node: NodeId,
        method: &'a Fencing,
        reason: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            match method {
                Fencing::KillNode => {
                    let reason = reason.to_owned();
                    // A blocking IPC call to corosync.
                    tokio::task::spawn_blocking(move || {
                        cpg_glue::corosync::kill_node(node, &reason)
                    })
                    .await
                    .map_err(|e| format!("kill_node task failed: {e}"))?
                    .map_err(|e| format!("corosync cfg kill_node {node}: {e}"))
                }
                Fencing::Stonith => {
                    let name = self.names.get(&node).cloned().ok_or_else(|| {
                        format!("node {node} has no name or ring0_addr in corosync.conf's nodelist: stonith_admin cannot fence it")
                    })?;
                    run(
                        &self.stonith_admin,
                        &["--fence".into(), name, "--timeout".into(), "90".into()],
                    )
                    .await
                }
                Fencing::Command(path) => run(path, &[node.0.to_string()]).await,
                // Nothing to do to another node: the stale node resets itself.
                Fencing::Reset => Ok(()),
            }
        })
    }
}

/// Runs `program args`, bounded by [`COMMAND_TIMEOUT`]; success is exit status 0.
async fn run(program: &std::path::Path, args: &[String]) -> Result<(), String> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
        Err(_) => Err(format!(
            "`{shown}` did not finish within {COMMAND_TIMEOUT:?}"
        )),
        Ok(Err(e)) => Err(format!("cannot run `{shown}`: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}
