//! docs/operations.md stays true: its commands are run by tests.
//!
//! * `every_command_of_operations_md_is_run_by_a_test`: every command of the document's
//!   `sh` blocks is either run literally by a test that reads it from the document (the
//!   sections in [`RUN_AS_WRITTEN`]), or a test or the demo runs the same program with the
//!   same subcommand and options (values may differ: paths, node names), or it is one of
//!   the few in [`NOT_RUN_HERE`], each with the reason it cannot run on a test machine.
//!   A command added to the document without a test fails here, naming it.
//! * `standalone_quick_start_runs_as_written`: the "Quick start" block and the store check
//!   after it, run line by line as a newcomer would type them, against the built binaries,
//!   with the paths moved into a temporary directory (`/srv/`, `/etc/csnap/`,
//!   `/run/csnap/`) and the agent's control socket there too (its server socket follows it).

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

fn operations_md() -> String {
    std::fs::read_to_string(repo().join("docs/operations.md")).expect("read docs/operations.md")
}

/// Sections whose `sh` blocks a test runs line by line as written.
const RUN_AS_WRITTEN: &[(&str, &str)] = &[(
    "### Quick start",
    "docs: standalone_quick_start_runs_as_written",
)];

/// Programs every command of which a test reads from the document and runs as written.
const PROGRAMS_RUN_AS_WRITTEN: &[(&str, &str)] = &[(
    "journalctl ",
    "journald: a_failover_shows_in_the_journal_with_csnap_fields",
)];

/// Commands no test can run on a test machine (matched by prefix), and why.
const NOT_RUN_HERE: &[(&str, &str)] = &[
    (
        "apt install ./target/deb/",
        "installs through apt; `--test debian_package` installs the same file with dpkg -i and purges it",
    ),
    (
        "install -m 0644 packaging/systemd/csnap-agent.service",
        "writes /etc/systemd/system; `--test agent packaging::` (csnap-agent) verifies the unit with systemd-analyze",
    ),
    (
        "systemctl daemon-reload && systemctl enable --now csnap-agent",
        "needs systemd as PID 1; READY/STATUS/WATCHDOG are checked through NOTIFY_SOCKET in the cluster tests",
    ),
    (
        "install -D -m 0755 packaging/ocf/csnap /usr/lib/ocf/resource.d/csnap/csnap",
        "writes /usr/lib/ocf; the pacemaker test mounts the agent at that path, the package test installs it there",
    ),
    (
        "pcs stonith create fence-node",
        "fence_ipmilan needs IPMI hardware; the pacemaker test creates its test fence device with `pcs stonith create`",
    ),
    (
        "journalctl -u csnap-agent -f",
        "follows a systemd unit for ever; the journald test runs the other queries",
    ),
    (
        "csnapctl format --origin /dev/disk/by-id/",
        "the walk-through's shared disks; the quick start formats files with the same command",
    ),
];

/// One command of an `sh` block: continuation lines joined, comment stripped.
#[derive(Debug, Clone)]
struct DocCommand {
    line: usize,
    section: String,
    text: String,
}

/// The commands of every `sh` fenced block (at any indentation) in `markdown`.
fn doc_commands(markdown: &str) -> Vec<DocCommand> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut in_sh = false;
    let mut in_other_fence = false;
    let mut pending: Option<(usize, String)> = None;
    for (index, raw) in markdown.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with("```") {
            if in_sh || in_other_fence {
                in_sh = false;
                in_other_fence = false;
            } else if line == "```sh" {
                in_sh = true;
            } else {
                in_other_fence = true;
            }
            continue;
        }
        if !in_sh && !in_other_fence && line.starts_with('#') {
            section = line.to_string();
            continue;
        }
        if !in_sh {
            continue;
        }
        let text = strip_comment(line);
        let (start, mut joined) = pending.take().unwrap_or((index + 1, String::new()));
        if let Some(head) = text.strip_suffix('\\') {
            joined.push_str(head.trim_end());
            joined.push(' ');
            pending = Some((start, joined));
            continue;
        }
        joined.push_str(text);
        let joined = joined.trim().to_string();
        if joined.is_empty() || joined == "..." {
            continue;
        }
        out.push(DocCommand {
            line: start,
            section: section.clone(),
            text: joined,
        });
    }
    out
}

/// `line` without a trailing `# comment` (a `#` outside quotes, at the start or after a
/// blank).
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut previous = ' ';
    for (at, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '#' && previous.is_whitespace() => return line[..at].trim_end(),
            None => {}
        }
        previous = c;
    }
    line.trim_end()
}

/// Words of a command line as a shell splits them (quotes removed; no expansions).
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => word.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            None => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// What a test must contain to count as running `words`: the program, its first two
/// subcommand-like words and every option name (values are free).
fn signature(words: &[String]) -> Vec<String> {
    let Some(program) = words.first() else {
        return Vec::new();
    };
    let program = program.rsplit('/').next().unwrap_or(program).to_string();
    let mut needed = vec![program];
    let mut subcommands = 0;
    for word in &words[1..] {
        if let Some(option) = word.strip_prefix('-') {
            if !option.is_empty() {
                needed.push(word.split('=').next().unwrap_or(word).to_string());
            }
        } else if subcommands < 2
            && word
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '-' || c == '_')
            && !needed.iter().any(|n| n.starts_with('-'))
        {
            needed.push(word.clone());
            subcommands += 1;
        }
    }
    needed
}

/// Whether `text` (Rust source) has `word` as a word of its own: in a string literal's
/// words or a command line, not inside a longer name (`-t` is not found in `--test`).
fn contains_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        let bounds = |c: Option<char>| {
            c.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        };
        bounds(before) && bounds(after)
    })
}

/// Every test and demo source: the files a command's signature is looked for in.
fn test_sources() -> BTreeMap<PathBuf, String> {
    let root = repo();
    let mut dirs = vec![root.join("tests/tests"), root.join("tests/src")];
    if let Ok(crates) = std::fs::read_dir(root.join("crates")) {
        dirs.extend(crates.flatten().map(|c| c.path().join("tests")));
    }
    let mut files = BTreeMap::new();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "docs.rs")
            {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    files.insert(path, text);
                }
            }
        }
    }
    files
}

#[test]
fn every_command_of_operations_md_is_run_by_a_test() {
    let commands = doc_commands(&operations_md());
    assert!(
        commands.len() >= 30,
        "found only {} commands in docs/operations.md: is the sh-block parser broken?",
        commands.len()
    );
    let sources = test_sources();
    let root = repo();
    let mut untested = Vec::new();
    for command in &commands {
        let how = if let Some((_, test)) = RUN_AS_WRITTEN
            .iter()
            .find(|(section, _)| command.section == *section)
        {
            format!("run as written by {test}")
        } else if let Some((_, why)) = NOT_RUN_HERE
            .iter()
            .find(|(prefix, _)| command.text.starts_with(prefix))
        {
            format!("not run here: {why}")
        } else if let Some((_, test)) = PROGRAMS_RUN_AS_WRITTEN
            .iter()
            .find(|(program, _)| command.text.starts_with(program))
        {
            format!("run as written by {test}")
        } else {
            // `a && b`: each part on its own.
            let mut found = Vec::new();
            for part in command.text.split("&&") {
                let needed = signature(&shell_words(part));
                match sources
                    .iter()
                    .find(|(_, text)| needed.iter().all(|n| contains_word(text, n)))
                {
                    Some((path, _)) => found.push(
                        path.strip_prefix(&root)
                            .unwrap_or(path)
                            .display()
                            .to_string(),
                    ),
                    None => {
                        untested.push(format!(
                            "docs/operations.md:{} `{}` (no test contains all of {needed:?})",
                            command.line, command.text
                        ));
                        found.clear();
                        break;
                    }
                }
            }
            if found.is_empty() {
                continue;
            }
            format!(
                "same program, subcommand and options in {}",
                found.join(", ")
            )
        };
        println!("line {:>4}: {}\n      {how}", command.line, command.text);
    }
    assert!(
        untested.is_empty(),
        "commands in docs/operations.md that no test runs (add a test, or run the section as \
         written):\n  {}",
        untested.join("\n  ")
    );
}

#[test]
fn the_command_parser_handles_continuations_comments_and_quotes() {
    let md = "## S\n```sh\ncsnapctl a \\\n    --x 1   # note\n# only a comment\n...\n\
              qemu-io -c 'write -P 0xaa 0 1M' 'nbd+unix:///v#1'\n```\n```text\nnot a command\n```\n";
    let commands = doc_commands(md);
    let texts: Vec<&str> = commands.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "csnapctl a --x 1",
            "qemu-io -c 'write -P 0xaa 0 1M' 'nbd+unix:///v#1'"
        ]
    );
    assert_eq!(commands[0].line, 3);
    assert_eq!(commands[0].section, "## S");
    assert_eq!(
        shell_words(&commands[1].text),
        ["qemu-io", "-c", "write -P 0xaa 0 1M", "nbd+unix:///v#1"]
    );
    assert_eq!(
        signature(&shell_words(
            "csnapctl snapshot create vol nightly --json --x=1"
        )),
        ["csnapctl", "snapshot", "create", "--json", "--x"]
    );
    assert_eq!(signature(&shell_words("scripts/build-deb")), ["build-deb"]);
}

/// The `sh` blocks of `section` (up to the next heading of any level) as command lines.
fn section_commands(markdown: &str, section: &str) -> Vec<String> {
    doc_commands(markdown)
        .into_iter()
        .filter(|c| c.section == section)
        .map(|c| c.text)
        .collect()
}

/// Runs `line` with `sh -c` (PATH has the built binaries first); panics unless it succeeds,
/// returns its stdout.
fn run_line(line: &str, path_env: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", line])
        .env("PATH", path_env)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run `{line}`: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && !stdout.contains("verification failed"),
        "`{line}`: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

#[test]
fn standalone_quick_start_runs_as_written() {
    const TEST: &str = "standalone_quick_start_runs_as_written";
    let missing: Vec<&str> = ["qemu-io", "nbdinfo", "sh", "truncate"]
        .into_iter()
        .filter(|p| csnap_e2e::prereq::find_program(p).is_none())
        .collect();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{TEST}: missing {missing:?} in CI"
        );
        eprintln!("{TEST}: SKIPPED: missing {missing:?}");
        return;
    }
    let bin_dir = csnap_e2e::rig::test_bin_dir();
    let _fresh = csnap_e2e::rig::binaries(&bin_dir);
    let tmp = tempfile::tempdir().expect("temp dir");
    let t = tmp.path().display().to_string();
    for dir in ["srv", "etc/csnap", "run/csnap"] {
        std::fs::create_dir_all(tmp.path().join(dir)).expect("make the quick start's dirs");
    }
    let control = format!("{t}/run/csnap/csnap.sock");
    let relocate = |line: &str| {
        line.replace("/srv/", &format!("{t}/srv/"))
            .replace("/etc/csnap/", &format!("{t}/etc/csnap/"))
            .replace("/run/csnap/", &format!("{t}/run/csnap/"))
            .replace(
                "csnap-agent --standalone ",
                &format!("csnap-agent --standalone --control-socket {control} "),
            )
            .replace("csnapctl ", &format!("csnapctl --socket {control} "))
    };
    let path_env = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let docs = operations_md();
    let quick_start = section_commands(&docs, "### Quick start");
    assert!(
        quick_start.len() >= 10
            && quick_start
                .iter()
                .any(|l| l.starts_with("csnap-agent --standalone")),
        "{TEST}: the Quick start block changed shape: {quick_start:#?}"
    );
    let mut agent: Option<KilledOnDrop> = None;
    let mut outputs = Vec::new();
    // The store check the section ends with runs after the agent stopped (below).
    for line in quick_start
        .iter()
        .filter(|l| !l.starts_with("csnapctl check "))
    {
        let line = relocate(line);
        if line.starts_with("csnap-agent ") {
            let child = Command::new("sh")
                .args(["-c", &format!("exec {line}")])
                .env("PATH", &path_env)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{TEST}: start `{line}`: {e}"));
            agent = Some(KilledOnDrop(child));
            let nbd = tmp.path().join("run/csnap/vol.nbd");
            let deadline = Instant::now() + Duration::from_secs(30);
            while !(is_socket(&nbd) && is_socket(Path::new(&control))) {
                assert!(
                    Instant::now() < deadline,
                    "{TEST}: the agent's NBD and control sockets did not appear within 30 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        outputs.push((line.clone(), run_line(&line, &path_env)));
    }
    let output_of = |prefix: &str| {
        outputs
            .iter()
            .find(|(line, _)| line.contains(prefix))
            .map(|(_, out)| out.clone())
            .unwrap_or_else(|| panic!("{TEST}: no `{prefix}` line ran"))
    };
    assert!(output_of("nbdinfo --list").contains("vol"));
    assert!(output_of("snapshot list vol").contains("before-upgrade"));
    let status: serde_json::Value = serde_json::from_str(&output_of("status vol --json"))
        .expect("csnapctl status vol --json prints JSON");
    assert!(
        status.to_string().contains("\"vol\""),
        "{TEST}: status names the volume: {status}"
    );

    // The store check after the quick start: with the agent stopped (it refuses a store in
    // use), as the document says.
    let KilledOnDrop(agent) = &mut agent.expect("the quick start starts the agent");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = agent.try_wait().expect("wait for the agent") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = agent.kill();
            let _ = agent.wait();
            panic!("{TEST}: the agent did not exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{TEST}: the agent exited with {status}");
    let checks: Vec<&String> = quick_start
        .iter()
        .filter(|l| l.starts_with("csnapctl check "))
        .collect();
    assert_eq!(
        checks.len(),
        1,
        "{TEST}: one store check in the quick start"
    );
    let report = run_line(&relocate(checks[0]), &path_env);
    assert!(report.contains("consistent"), "{TEST}: {report}");
}

fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// The agent the quick start runs: SIGKILLed and reaped if the test ends early.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
