//! The check of a `csnapctl rollback --wait --progress` that outlived the loss of what
//! answered it (its agent restarted, or its volume's server failed over). Shared by the
//! agent's tests and the cluster tests (tests/tests/cluster_mode.rs includes this file by
//! path): it uses std only, so neither crate imports the other.

use std::process::ExitStatus;

/// The command succeeded and said "done in"; its progress lines on stderr name the source
/// and the pin; and stderr shows it waited, with one of `waited_lines` (its line for a
/// missing agent, or for a volume without a server).
pub(crate) fn assert_rollback_wait_saw_the_end(
    status: ExitStatus,
    stdout: &str,
    stderr: &str,
    source: &str,
    pin: &str,
    waited_lines: &[&str],
) {
    assert!(
        status.success() && stdout.contains("done in"),
        "rollback --wait: {status}\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("(\"{source}\") (origin as it was: snapshot"))
            && stderr.contains(&format!("(\"{pin}\")):")),
        "the progress lines do not name the source {source:?} and the pin {pin:?}:\n{stderr}"
    );
    assert!(
        waited_lines.iter().any(|line| stderr.contains(line)),
        "--wait did not say it waited (one of {waited_lines:?}):\n{stderr}"
    );
}
