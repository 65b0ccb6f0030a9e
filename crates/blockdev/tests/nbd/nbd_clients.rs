//! Interoperability with real NBD clients: qemu-io, nbdinfo, nbdcopy, fio (nbd engine),
//! and socket activation by nbdinfo. Each test needs its tool: under CI=true a missing
//! tool fails the test, otherwise the test is skipped with a message.

use crate::nbd_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use nbd_support::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_over_tcp_and_unix() {
    if !require_tool("qemu-io") {
        return;
    }
    let server = TestServer::start(&[("disk", 16 * MIB, false)]).await;
    let tcp = server.tcp_uri("disk");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &tcp,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 1M 64k",
            "-c",
            "write -z 2M 512k",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 1M 64k",
            "-c",
            "read -P 0 2M 512k",
            "-c",
            "flush",
        ],
    )
    .await;
    // A second client over the unix socket sees the data, and unaligned I/O works.
    let unix = server.unix_uri("disk");
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &unix,
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 1M 64k",
            "-c",
            "write -P 0x11 3M 4096",
            "-c",
            "read -P 0x11 3M 4096",
            "-c",
            "discard 8M 1M",
        ],
    )
    .await;
    assert!(
        !out.stdout.contains("Pattern verification failed"),
        "{}",
        out.stdout
    );
    let file = std::fs::read(&server.export("disk").path).unwrap();
    assert!(file[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(file[MIB as usize..(MIB + 65536) as usize]
        .iter()
        .all(|&b| b == 0xcd));
    assert!(file[3 * MIB as usize..(3 * MIB + 4096) as usize]
        .iter()
        .all(|&b| b == 0x11));

    // A wrong pattern must be detected (the check above is meaningful).
    let out = run("qemu-io", &["-f", "raw", &tcp, "-c", "read -P 0x77 0 4096"]).await;
    assert!(
        out.stdout.contains("Pattern verification failed"),
        "{}",
        out.stdout
    );
}

fn export_named<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .find(|e| e["export-name"] == name)
        .unwrap_or_else(|| panic!("export {name} missing from {json}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_and_flags() {
    if !require_tool("nbdinfo") {
        return;
    }
    let server = TestServer::start(&[("disk", 8 * MIB, false), ("ro", 3 * MIB, true)]).await;
    let uri = format!("nbd://{}", server.tcp);
    let out = run_ok("nbdinfo", &["--list", "--json", &uri]).await;
    let json: Value = serde_json::from_str(&out.stdout).expect("nbdinfo JSON");
    assert_eq!(json["protocol"], "newstyle-fixed");
    assert_eq!(json["structured"], true);
    assert_eq!(json["exports"].as_array().unwrap().len(), 2);

    let disk = export_named(&json, "disk");
    assert_eq!(disk["export-size"], 8 * MIB);
    for (key, value) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_multi_conn", true),
        ("can_cache", false),
        ("can_df", false),
        ("can_fast_zero", true),
    ] {
        assert_eq!(disk[key], value, "disk {key}");
    }
    assert_eq!(disk["block_size_minimum"], 1);
    assert_eq!(disk["block_size_preferred"], 4096);
    assert_eq!(disk["block_size_maximum"], 32 * MIB);

    let ro = export_named(&json, "ro");
    assert_eq!(ro["export-size"], 3 * MIB);
    for (key, value) in [
        ("is_read_only", true),
        ("can_flush", true),
        ("can_fua", false),
        ("can_trim", false),
        ("can_zero", false),
    ] {
        assert_eq!(ro[key], value, "ro {key}");
    }

    // `--can X` exits 0 for true and 2 for false.
    for (export, feature, expected) in [
        ("disk", "fua", 0),
        ("disk", "flush", 0),
        ("disk", "trim", 0),
        ("disk", "zero", 0),
        ("disk", "multi-conn", 0),
        ("ro", "fua", 2),
        ("ro", "trim", 2),
        ("ro", "zero", 2),
        ("ro", "read-only", 0),
        ("disk", "read-only", 2),
    ] {
        let out = run("nbdinfo", &["--can", feature, &server.tcp_uri(export)]).await;
        assert_eq!(
            out.status.code(),
            Some(expected),
            "nbdinfo --can {feature} on {export}: {}",
            out.stderr
        );
    }

    // An unknown export is an error for the client, not a hang.
    let out = run("nbdinfo", &[&server.tcp_uri("nope")]).await;
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_reads_the_whole_export() {
    if !require_tool("nbdcopy") {
        return;
    }
    let seed = test_seed("nbdcopy_reads_the_whole_export");
    let server = TestServer::start(&[("disk", 12 * MIB + 4096 + 3, false)]).await;
    let source = &server.export("disk").path;
    // Random data with a hole, and an odd size.
    let mut data = pattern(seed, (12 * MIB + 4096 + 3) as usize);
    data[MIB as usize..3 * MIB as usize].fill(0);
    std::fs::write(source, &data).unwrap();
    let copy = server.dir.path().join("copy.img");
    run_ok(
        "nbdcopy",
        &[&server.tcp_uri("disk"), copy.to_str().unwrap()],
    )
    .await;
    let copied = std::fs::read(&copy).unwrap();
    assert_eq!(copied.len(), data.len());
    assert!(
        copied == data,
        "nbdcopy result differs from the source (seed {seed})"
    );

    // And back the other way, into the server, over the unix socket with multiple
    // connections (CAN_MULTI_CONN is advertised).
    let back = pattern(seed ^ 1, data.len());
    let src2 = server.dir.path().join("src2.img");
    std::fs::write(&src2, &back).unwrap();
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            src2.to_str().unwrap(),
            &server.unix_uri("disk"),
        ],
    )
    .await;
    let now = std::fs::read(source).unwrap();
    assert!(now == back, "nbdcopy into the export differs (seed {seed})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_nbd_engine_verifies() {
    if !require_tool("fio") {
        return;
    }
    let engines = run_ok("fio", &["--enghelp"]).await;
    if !engines.stdout.lines().any(|l| l.trim() == "nbd") {
        if in_ci() {
            panic!("fio has no nbd engine:\n{}", engines.stdout);
        }
        eprintln!("skipping: fio has no nbd ioengine");
        return;
    }
    let server = TestServer::start(&[("disk", 32 * MIB, false)]).await;
    let uri = server.tcp_uri("disk");
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // Otherwise fio leaves a verify state file in the working directory.
            "--verify_state_save=0",
            "--output-format=json",
        ],
    )
    .await;
    let json: Value = serde_json::from_str(&out.stdout[out.stdout.find('{').unwrap()..])
        .unwrap_or_else(|e| panic!("fio JSON: {e}\n{}", out.stdout));
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "{}", out.stdout);
    assert_eq!(job["write"]["io_bytes"], 16 * MIB, "bytes written");
    assert_eq!(job["read"]["io_bytes"], 16 * MIB, "bytes verified");
}

/// The standalone binary started on port 0; killed on drop.
struct ServerProcess {
    child: Child,
    address: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_binary(args: &[&str]) -> ServerProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nbd-file-server"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nbd-file-server");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let mut process = ServerProcess {
        child,
        address: String::new(),
    };
    let line = rx
        .recv_timeout(WAIT)
        .expect("nbd-file-server printed its address");
    process.address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    process
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_files_and_socket_activation_works() {
    if !require_tool("qemu-io") || !require_tool("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    std::fs::File::create(&a).unwrap().set_len(4 * MIB).unwrap();
    std::fs::write(&b, pattern(9, MIB as usize)).unwrap();
    let a_spec = format!("a={}", a.display());
    let b_spec = format!("b={}:ro", b.display());

    let server = spawn_binary(&[
        "--listen",
        "127.0.0.1:0",
        "--export",
        &a_spec,
        "--export",
        &b_spec,
    ]);
    let uri = format!("nbd://{}/a", server.address);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x42 0 64k",
            "-c",
            "read -P 0x42 0 64k",
        ],
    )
    .await;
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &format!("nbd://{}/b", server.address),
            "-c",
            "write 0 4k",
        ],
    )
    .await;
    // qemu sees READ_ONLY and refuses to open the export for writing.
    assert!(
        !out.status.success() && out.stderr.contains("Permission denied"),
        "writing a read-only export must fail: {} {}",
        out.stdout,
        out.stderr
    );
    drop(server);
    assert!(std::fs::read(&a).unwrap()[..65536]
        .iter()
        .all(|&x| x == 0x42));

    // nbdinfo starts the server itself with LISTEN_FDS/LISTEN_PID on a unix socket.
    let exe = env!("CARGO_BIN_EXE_nbd-file-server");
    let out = run_ok(
        "nbdinfo",
        &[
            "--json", "--", "[", exe, "--export", &b_spec, "--export", &a_spec, "]",
        ],
    )
    .await;
    let json: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo JSON: {e}\n{}", out.stdout));
    // The default export (empty name) is the first one given: b, read-only, 1 MiB.
    let export = &json["exports"][0];
    assert_eq!(export["export-size"], MIB, "{json}");
    assert_eq!(export["is_read_only"], true, "{json}");
}
