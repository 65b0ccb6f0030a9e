//! Prerequisites of the namespace cluster, and the project rule for missing ones: under
//! `CI=true` a test that cannot run fails; elsewhere it says why loudly and passes.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Programs the harness runs.
const PROGRAMS: &[&str] = &[
    "ip",
    "unshare",
    "sh",
    "corosync",
    "corosync-quorumtool",
    "corosync-cfgtool",
    "corosync-cmapctl",
];

/// Where programs are looked for besides `$PATH` (corosync lives in /usr/sbin, which a
/// non-login root shell may not have on its path).
const EXTRA_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Full path of `program`, if installed.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Everything missing for a namespace cluster, as readable reasons; empty when all is there.
pub fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (network namespaces, bridges and mounts need it)".to_string());
    }
    for program in PROGRAMS {
        if find_program(program).is_none() {
            missing.push(format!(
                "program `{program}` (install corosync and iproute2: scripts/setup)"
            ));
        }
    }
    missing
}

/// True when running under CI (`CI=true`), where a missing prerequisite is a failure.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks the prerequisites for `test`. All there: `true`. Missing under `CI=true`: panics
/// naming what is missing. Missing elsewhere: prints a loud SKIPPED line and returns
/// `false`; the caller returns early.
pub fn prerequisites_or_skip(test: &str) -> bool {
    let missing = missing_prerequisites();
    if missing.is_empty() {
        return true;
    }
    let list = missing.join(", ");
    if under_ci() {
        panic!("{test}: cannot run, missing {list} (CI=true turns a skip into a failure)");
    }
    // Straight to the stderr handle: the test harness captures eprintln! of passing
    // tests, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: missing {list} (set CI=true to make this a failure)"
    );
    false
}
