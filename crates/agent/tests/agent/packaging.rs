//! The packaging files are valid for the tools that read them.

use std::path::Path;
use std::process::Command;

/// `systemd-analyze verify` accepts the unit (with ExecStart pointed at the built binary,
/// since verify checks that it exists).
#[test]
fn the_systemd_unit_verifies() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    if !have {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "systemd-analyze is required under CI=true"
        );
        eprintln!("skipping: systemd-analyze not found");
        return;
    }
    let unit =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/systemd/csnap-agent.service");
    let text = std::fs::read_to_string(&unit).expect("the unit file");
    assert!(
        text.contains("\nType=notify\n") && text.contains("\nWatchdogSec="),
        "{text}"
    );
    assert!(text.contains("\nRequires=corosync.service\n"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("csnap-agent.service");
    std::fs::write(
        &copy,
        text.replace("/usr/sbin/csnap-agent", env!("CARGO_BIN_EXE_csnap-agent")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
