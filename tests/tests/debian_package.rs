//! The Debian package: `scripts/build-deb` packages the debug build, the package installs
//! on this machine with `dpkg -i`, the installed `csnapctl --version`, the OCF agent's
//! meta-data, the man pages and the systemd unit work from their installed paths, and
//! `dpkg --purge` removes every file again.
//!
//! Needs root and dpkg-dev (scripts/setup installs it). It refuses to run on a machine where
//! a csnap package is already installed (it would replace and then remove it); set
//! `CSNAP_TEST_DEB_REPLACE=1` to allow that.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use csnap_e2e::prereq::{find_program, under_ci};

const PACKAGE: &str = "csnap";
const INSTALLED: &[&str] = &[
    "/usr/sbin/csnap-agent",
    "/usr/sbin/csnapctl",
    "/usr/sbin/csnap-server",
    "/lib/systemd/system/csnap-agent.service",
    "/usr/lib/ocf/resource.d/csnap/csnap",
    "/usr/share/doc/csnap/operations.md",
    "/usr/share/doc/csnap/examples/corosync.conf",
    "/usr/share/man/man8/csnap-agent.8.gz",
    "/usr/share/man/man8/csnapctl.8.gz",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Purges the package when the test ends, also when it fails half-way.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
    }
}

fn prerequisites(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (dpkg -i)".to_string());
    }
    for program in ["dpkg", "dpkg-deb", "dpkg-shlibdeps", "strip"] {
        if find_program(program).is_none() {
            missing.push(format!("`{program}` (scripts/setup installs dpkg-dev)"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let list = missing.join(", ");
    assert!(!under_ci(), "{test}: cannot run, missing {list}");
    eprintln!("SKIPPED {test}: missing {list} (set CI=true to make this a failure)");
    false
}

#[test]
fn the_package_installs_works_from_its_paths_and_purges_clean() {
    let test = "debian package";
    if !prerequisites(test) {
        return;
    }
    if installed() && std::env::var_os("CSNAP_TEST_DEB_REPLACE").is_none() {
        panic!(
            "{test}: a csnap package is installed on this machine; this test would replace \
             and remove it (set CSNAP_TEST_DEB_REPLACE=1 to allow that)"
        );
    }
    let root = repo_root();
    let out_dir = tempfile::tempdir().expect("temp dir");
    let built = run(Command::new(root.join("scripts/build-deb"))
        .args(["--profile", "debug", "--no-build", "--out"])
        .arg(out_dir.path()));
    let stdout = String::from_utf8_lossy(&built.stdout);
    let deb = PathBuf::from(stdout.lines().last().expect("build-deb prints the .deb"));
    assert!(
        deb.exists(),
        "build-deb said {} but it is not there",
        deb.display()
    );

    // What the package declares.
    let info = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .args(["Package", "Version", "Depends"]));
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("Package: csnap"), "{info}");
    assert!(
        info.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{info}"
    );
    for dep in ["libcpg4", "libcmap4", "libquorum5", "libcfg7", "corosync"] {
        assert!(info.contains(dep), "Depends lacks {dep}: {info}");
    }

    let _purge = Purge;
    run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(installed(), "dpkg -i left the package not installed");
    for path in INSTALLED {
        assert!(
            Path::new(path).exists(),
            "the package did not install {path}"
        );
    }

    let version = run(Command::new("/usr/sbin/csnapctl").arg("--version"));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("csnapctl {}", env!("CARGO_PKG_VERSION"))
    );
    let help = run(Command::new("/usr/sbin/csnap-agent").arg("--help"));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--control-socket"));

    // The OCF agent from its installed path, as pacemaker runs it.
    let meta = run(Command::new("/usr/lib/ocf/resource.d/csnap/csnap")
        .arg("meta-data")
        .env("OCF_ROOT", "/usr/lib/ocf"));
    let meta = String::from_utf8_lossy(&meta.stdout);
    assert!(
        meta.contains("<resource-agent name=\"csnap\"") && meta.contains("</resource-agent>"),
        "OCF meta-data from the installed agent:\n{meta}"
    );

    // The unit starts the installed binary.
    let unit =
        std::fs::read_to_string("/lib/systemd/system/csnap-agent.service").expect("installed unit");
    assert!(unit.contains("ExecStart=/usr/sbin/csnap-agent"), "{unit}");

    // Man pages are gzip'd roff naming the program.
    let page = run(Command::new("gzip").args(["-dc", "/usr/share/man/man8/csnapctl.8.gz"]));
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(page.starts_with(".TH CSNAPCTL 8"), "{page}");
    assert!(page.contains("snapshot"), "{page}");

    run(Command::new("dpkg").args(["--purge", PACKAGE]));
    assert!(!installed(), "dpkg --purge left the package installed");
    for path in INSTALLED {
        assert!(
            !Path::new(path).exists(),
            "{path} is still there after dpkg --purge"
        );
    }
}
