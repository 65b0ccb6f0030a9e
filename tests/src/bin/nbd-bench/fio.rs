//! fio jobs over the nbd engine: the command line of one measurement, and its JSON result.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

/// The access pattern of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    RandRead,
    RandWrite,
    SeqRead,
}

impl Access {
    fn rw(self) -> &'static str {
        match self {
            Access::RandRead => "randread",
            Access::RandWrite => "randwrite",
            Access::SeqRead => "read",
        }
    }

    fn is_read(self) -> bool {
        matches!(self, Access::RandRead | Access::SeqRead)
    }
}

/// How long a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Length {
    /// Loops over its region for `runtime` after an unmeasured `ramp`; random offsets may
    /// repeat (no random map).
    Timed { ramp: Duration, runtime: Duration },
    /// Touches every block of its region exactly once (fio's random map), in a random
    /// order; stops early at `cap`.
    OnePass { cap: Duration },
}

impl Length {
    /// The longest the job may take, fio's own start-up included.
    pub(crate) fn bound(&self) -> Duration {
        let slack = Duration::from_secs(60);
        match *self {
            Length::Timed { ramp, runtime } => ramp + runtime + slack,
            Length::OnePass { cap } => cap + slack,
        }
    }
}

/// One fio measurement. The region `[offset, offset + length)` is split evenly between
/// the `jobs` jobs (each its own NBD connection), so one-pass jobs never touch a block
/// twice between them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FioJob {
    pub name: String,
    pub access: Access,
    pub block_size: u64,
    pub iodepth: u32,
    pub jobs: u32,
    pub offset: u64,
    pub length: u64,
    pub run: Length,
}

impl FioJob {
    /// Bytes of the region each job covers (a whole number of blocks).
    pub(crate) fn per_job_length(&self) -> u64 {
        let per_job = self.length / u64::from(self.jobs.max(1));
        per_job - per_job % self.block_size
    }

    /// fio's command line (after the program name) for this job against `uri`, its JSON
    /// result written to `output`.
    pub(crate) fn args(&self, uri: &str, output: &Path) -> Vec<String> {
        self.args_with(
            vec!["--ioengine=nbd".to_string(), format!("--uri={uri}")],
            output,
        )
    }

    /// fio's command line for this job on the file `path` itself (the device limit):
    /// libaio with O_DIRECT when `direct`, else psync through the page cache (psync has
    /// one request in flight per job whatever the iodepth).
    pub(crate) fn file_args(&self, path: &Path, direct: bool, output: &Path) -> Vec<String> {
        let engine = if direct {
            ["--ioengine=libaio", "--direct=1"]
        } else {
            ["--ioengine=psync", "--direct=0"]
        };
        let mut target: Vec<String> = engine.iter().map(|s| s.to_string()).collect();
        target.push(format!("--filename={}", path.display()));
        self.args_with(target, output)
    }

    /// fio's command line for the I/O every first touch must do, on the files themselves:
    /// the first-touch device limit. Three streams share the job's in-flight budget (a
    /// first touch has one of its I/Os in flight at a time): 64 KiB reads of old chunks
    /// from `origin`, their copies written to `store` one after another (where csnap's
    /// allocator puts them) with an `fdatasync` every [`COPIES_PER_FLUSH`] writes (the
    /// journal commit that records them), and the new data written to `origin`. Time-based
    /// for the job's one-pass cap (at most [`FIRST_TOUCH_LIMIT_RUNTIME`]); the journal's
    /// own writes are left out, so it is an upper bound. [`parse_first_touch_limit`]
    /// turns the result into first touches per second.
    pub(crate) fn first_touch_device_args(
        &self,
        origin: &Path,
        store: &Path,
        direct: bool,
        output: &Path,
    ) -> Vec<String> {
        let engine = if direct { "libaio" } else { "psync" };
        let runtime = match self.run {
            Length::Timed { runtime, .. } => runtime,
            Length::OnePass { cap } => cap,
        }
        .min(FIRST_TOUCH_LIMIT_RUNTIME);
        let depth = self.iodepth.max(3);
        let (reads, copies) = (depth / 3, depth / 3);
        let writes = depth - reads - copies;
        let region = self.per_job_length() * u64::from(self.jobs.max(1));
        let mut args = vec![
            format!("--ioengine={engine}"),
            format!("--direct={}", u8::from(direct)),
            format!("--bs={}", self.block_size),
            "--randrepeat=1".to_string(),
            "--norandommap=1".to_string(),
            "--time_based=1".to_string(),
            format!("--runtime={}ms", runtime.as_millis()),
            "--group_reporting=1".to_string(),
            "--output-format=json".to_string(),
            format!("--output={}", output.display()),
        ];
        let origin_stream = |name: &str, rw: &str, depth: u32| {
            [
                format!("--name={}-{name}", self.name),
                format!("--filename={}", origin.display()),
                format!("--rw={rw}"),
                format!("--iodepth={depth}"),
                format!("--offset={}", self.offset),
                format!("--size={region}"),
            ]
        };
        args.extend(origin_stream("copy-read", "randread", reads));
        args.extend([
            format!("--name={}-copy-write", self.name),
            format!("--filename={}", store.display()),
            "--rw=write".to_string(),
            format!("--iodepth={copies}"),
            "--offset=0".to_string(),
            format!("--size={region}"),
            format!("--fdatasync={COPIES_PER_FLUSH}"),
        ]);
        args.extend(origin_stream("origin-write", "randwrite", writes));
        args
    }

    fn args_with(&self, target: Vec<String>, output: &Path) -> Vec<String> {
        let per_job = self.per_job_length();
        let mut args = vec![format!("--name={}", self.name)];
        args.extend(target);
        args.extend([
            format!("--rw={}", self.access.rw()),
            format!("--bs={}", self.block_size),
            format!("--iodepth={}", self.iodepth),
            format!("--numjobs={}", self.jobs),
            format!("--offset={}", self.offset),
            format!("--size={per_job}"),
            format!("--offset_increment={per_job}"),
            "--group_reporting=1".to_string(),
            // The same offsets for every engine.
            "--randrepeat=1".to_string(),
            "--output-format=json".to_string(),
            format!("--output={}", output.display()),
        ]);
        match self.run {
            Length::Timed { ramp, runtime } => {
                args.push("--time_based=1".to_string());
                args.push(format!("--ramp_time={}ms", ramp.as_millis()));
                args.push(format!("--runtime={}ms", runtime.as_millis()));
                args.push("--norandommap=1".to_string());
            }
            Length::OnePass { cap } => {
                args.push(format!("--runtime={}ms", cap.as_millis()));
            }
        }
        args
    }

    /// Whether the job reads (else it writes).
    pub(crate) fn reads(&self) -> bool {
        self.access.is_read()
    }
}

/// What one fio job measured (all its jobs together).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct FioResult {
    pub ios: u64,
    pub bytes: u64,
    pub iops: f64,
    pub bytes_per_sec: f64,
    pub runtime: Duration,
    /// User + system CPU of the serving process per request over the measured run, in
    /// microseconds (none for the device limit, which has no server).
    pub cpu_us_per_request: Option<f64>,
    /// Most threads the serving process had during the run.
    pub threads: Option<u32>,
}

impl FioResult {
    pub(crate) fn megabytes_per_sec(&self) -> f64 {
        self.bytes_per_sec / 1e6
    }
}

/// Parses fio's `--output-format=json` output of a group-reported job; `reads` picks the
/// read or the write side. A job fio reports as failed, or one that did no I/O, is an
/// error.
pub(crate) fn parse_result(json: &str, reads: bool) -> anyhow::Result<FioResult> {
    // fio may print notices before the JSON document.
    let start = json
        .find('{')
        .context("fio output holds no JSON document")?;
    let doc: Value = serde_json::from_str(&json[start..]).context("fio output is not JSON")?;
    let job = doc
        .get("jobs")
        .and_then(Value::as_array)
        .and_then(|jobs| jobs.first())
        .context("fio JSON has no jobs")?;
    let error = job.get("error").and_then(Value::as_i64).unwrap_or(0);
    if error != 0 {
        bail!("fio reports error {error} ({})", errno_name(error));
    }
    let side_name = if reads { "read" } else { "write" };
    let side = job
        .get(side_name)
        .with_context(|| format!("fio JSON job has no {side_name:?} section"))?;
    let field = |name: &str| {
        side.get(name)
            .and_then(Value::as_f64)
            .with_context(|| format!("fio JSON {side_name}.{name} missing or not a number"))
    };
    let result = FioResult {
        ios: field("total_ios")? as u64,
        bytes: field("io_bytes")? as u64,
        iops: field("iops")?,
        bytes_per_sec: field("bw_bytes")?,
        runtime: Duration::from_millis(field("runtime")? as u64),
        cpu_us_per_request: None,
        threads: None,
    };
    if result.ios == 0 || result.bytes == 0 {
        bail!("fio did no {side_name}s");
    }
    Ok(result)
}

/// Copy-outs one journal commit records under load, in the first-touch device limit
/// (3.3 measured with 16 in flight: docs/benchmarks.md, "Where the time goes").
pub(crate) const COPIES_PER_FLUSH: u32 = 4;
/// The longest the first-touch device limit runs (it is time-based).
pub(crate) const FIRST_TOUCH_LIMIT_RUNTIME: Duration = Duration::from_secs(10);

/// Parses the result of [`FioJob::first_touch_device_args`]: every three I/Os (an origin
/// read, a store write, an origin write) are one first touch of `block_size` bytes.
pub(crate) fn parse_first_touch_limit(json: &str, block_size: u64) -> anyhow::Result<FioResult> {
    let reads = parse_result(json, true).context("the first-touch limit's origin reads")?;
    let writes = parse_result(json, false).context("the first-touch limit's writes")?;
    let runtime = reads.runtime.max(writes.runtime);
    let secs = runtime.as_secs_f64().max(1e-3);
    let touches = (reads.ios + writes.ios) / 3;
    let bytes = touches * block_size;
    Ok(FioResult {
        ios: touches,
        bytes,
        iops: touches as f64 / secs,
        bytes_per_sec: bytes as f64 / secs,
        runtime,
        cpu_us_per_request: None,
        threads: None,
    })
}

/// The run with the median throughput (the lower middle one of an even count).
pub(crate) fn median(results: &[FioResult]) -> Option<FioResult> {
    let mut sorted = results.to_vec();
    sorted.sort_by(|a, b| a.bytes_per_sec.total_cmp(&b.bytes_per_sec));
    sorted.get(sorted.len().saturating_sub(1) / 2).copied()
}

fn errno_name(errno: i64) -> String {
    i32::try_from(errno)
        .map(|e| std::io::Error::from_raw_os_error(e).to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(access: Access, run: Length) -> FioJob {
        FioJob {
            name: "t".into(),
            access,
            block_size: 65536,
            iodepth: 16,
            jobs: 3,
            offset: 1 << 20,
            length: 100 << 20,
            run,
        }
    }

    #[test]
    fn one_pass_jobs_split_the_region_into_disjoint_whole_blocks() {
        let j = job(
            Access::RandWrite,
            Length::OnePass {
                cap: Duration::from_secs(5),
            },
        );
        let per_job = j.per_job_length();
        assert_eq!(per_job % j.block_size, 0);
        assert!(per_job * 3 <= j.length);
        assert!(per_job * 3 + 3 * j.block_size > j.length);
        let args = j.args("nbd+unix:///vol?socket=/s", Path::new("/o.json"));
        assert!(args.contains(&format!("--size={per_job}")));
        assert!(args.contains(&format!("--offset_increment={per_job}")));
        assert!(args.contains(&"--offset=1048576".to_string()));
        assert!(args.contains(&"--runtime=5000ms".to_string()));
        // The random map must stay on: it is what makes every write a first touch.
        assert!(!args.iter().any(|a| a.contains("norandommap")));
        assert!(!args.iter().any(|a| a.contains("time_based")));
    }

    #[test]
    fn device_jobs_run_on_the_file() {
        let j = job(
            Access::RandRead,
            Length::Timed {
                ramp: Duration::ZERO,
                runtime: Duration::from_secs(1),
            },
        );
        let direct = j.file_args(Path::new("/raw.img"), true, Path::new("/o.json"));
        for want in ["--ioengine=libaio", "--direct=1", "--filename=/raw.img"] {
            assert!(direct.contains(&want.to_string()), "{want}: {direct:?}");
        }
        assert!(!direct.iter().any(|a| a.contains("uri")));
        let cached = j.file_args(Path::new("/raw.img"), false, Path::new("/o.json"));
        assert!(cached.contains(&"--ioengine=psync".to_string()));
        assert!(cached.contains(&"--direct=0".to_string()));
    }

    #[test]
    fn timed_jobs_are_time_based_without_random_map() {
        let j = job(
            Access::SeqRead,
            Length::Timed {
                ramp: Duration::from_secs(2),
                runtime: Duration::from_secs(20),
            },
        );
        let args = j.args("nbd+unix:///vol@s1?socket=/s", Path::new("/o.json"));
        for want in [
            "--rw=read",
            "--time_based=1",
            "--ramp_time=2000ms",
            "--runtime=20000ms",
            "--norandommap=1",
            "--ioengine=nbd",
            "--uri=nbd+unix:///vol@s1?socket=/s",
            "--output=/o.json",
        ] {
            assert!(args.contains(&want.to_string()), "{want} missing: {args:?}");
        }
        assert_eq!(j.run.bound(), Duration::from_secs(82));
    }

    const SAMPLE: &str = r#"fio: connected to NBD server
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "t",
      "error" : 0,
      "read" : { "io_bytes" : 733970432, "bw_bytes" : 366801815, "iops" : 89551.2,
                 "runtime" : 2001, "total_ios" : 179192 },
      "write" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "runtime" : 0,
                  "total_ios" : 0 }
    }
  ]
}"#;

    #[test]
    fn parses_the_side_asked_for() {
        let r = parse_result(SAMPLE, true).unwrap();
        assert_eq!(r.ios, 179192);
        assert_eq!(r.bytes, 733970432);
        assert_eq!(r.runtime, Duration::from_millis(2001));
        assert!((r.iops - 89551.2).abs() < 1e-6);
        assert!((r.megabytes_per_sec() - 366.801815).abs() < 1e-6);
        let err = parse_result(SAMPLE, false).unwrap_err().to_string();
        assert!(err.contains("no writes"), "{err}");
    }

    #[test]
    fn the_first_touch_limit_runs_three_streams_on_the_files() {
        let j = job(
            Access::RandWrite,
            Length::OnePass {
                cap: Duration::from_secs(300),
            },
        );
        let args = j.first_touch_device_args(
            Path::new("/origin.img"),
            Path::new("/store.img"),
            true,
            Path::new("/o.json"),
        );
        let names = args.iter().filter(|a| a.starts_with("--name=")).count();
        assert_eq!(names, 3, "{args:?}");
        for want in [
            "--ioengine=libaio",
            "--direct=1",
            "--rw=randread",
            "--rw=write",
            "--rw=randwrite",
            "--filename=/store.img",
            "--fdatasync=4",
            "--runtime=10000ms",
            "--time_based=1",
        ] {
            assert!(args.contains(&want.to_string()), "{want} missing: {args:?}");
        }
        // The three streams share the job's 16 in flight.
        let depths: u32 = args
            .iter()
            .filter_map(|a| a.strip_prefix("--iodepth="))
            .map(|d| d.parse::<u32>().unwrap())
            .sum();
        assert_eq!(depths, 16);
        // Global options come before the first section.
        let first_name = args.iter().position(|a| a.starts_with("--name=")).unwrap();
        let output = args.iter().position(|a| a == "--output=/o.json").unwrap();
        assert!(output < first_name);
    }

    #[test]
    fn the_first_touch_limit_counts_three_ios_per_touch() {
        let json = SAMPLE.replace(
            r#""write" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "runtime" : 0,
                  "total_ios" : 0 }"#,
            r#""write" : { "io_bytes" : 1, "bw_bytes" : 1, "iops" : 1.0, "runtime" : 4002,
                  "total_ios" : 20808 }"#,
        );
        let r = parse_first_touch_limit(&json, 65536).unwrap();
        assert_eq!(r.ios, (179192 + 20808) / 3);
        assert_eq!(r.runtime, Duration::from_millis(4002));
        assert!((r.iops - r.ios as f64 / 4.002).abs() < 1e-6);
        assert_eq!(r.bytes, r.ios * 65536);
        assert!(parse_first_touch_limit(SAMPLE, 65536).is_err());
    }

    #[test]
    fn the_median_is_the_middle_run_by_throughput() {
        let run = |mbs: f64| FioResult {
            ios: 1,
            bytes: 1,
            iops: mbs,
            bytes_per_sec: mbs * 1e6,
            runtime: Duration::from_secs(1),
            cpu_us_per_request: None,
            threads: None,
        };
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[run(5.0)]), Some(run(5.0)));
        assert_eq!(median(&[run(9.0), run(1.0), run(5.0)]), Some(run(5.0)));
        assert_eq!(
            median(&[run(9.0), run(1.0), run(5.0), run(7.0)]),
            Some(run(5.0))
        );
    }

    #[test]
    fn fio_errors_and_garbage_are_errors() {
        let failed = SAMPLE.replace("\"error\" : 0", "\"error\" : 5");
        let err = format!("{:#}", parse_result(&failed, true).unwrap_err());
        assert!(err.contains("error 5"), "{err}");
        assert!(parse_result("fio: engine nbd not loadable", true).is_err());
        assert!(parse_result("{\"jobs\": []}", true).is_err());
        let missing = SAMPLE.replace("\"iops\" : 89551.2,", "");
        let err = format!("{:#}", parse_result(&missing, true).unwrap_err());
        assert!(err.contains("read.iops"), "{err}");
    }
}
