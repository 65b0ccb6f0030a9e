//! The results table: figures per engine, the ratios csnap/raw and csnap/qcow2, and
//! whether each test's goal is met.

use std::fmt::Write as _;

use crate::fio::FioResult;

/// The engines compared: the file itself and three NBD servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Engine {
    /// fio on the raw origin file itself (libaio + O_DIRECT, or psync through the page
    /// cache): the device limit, no NBD at all.
    Device,
    /// qemu-nbd on the raw origin file: the ceiling for an NBD server.
    Raw,
    /// csnap-agent --standalone.
    Csnap,
    /// qemu-nbd on a qcow2 image with internal snapshots: the copy-on-write peer.
    Qcow2,
}

impl Engine {
    pub(crate) const ALL: [Engine; 4] = [Engine::Device, Engine::Raw, Engine::Csnap, Engine::Qcow2];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Engine::Device => "device",
            Engine::Raw => "raw",
            Engine::Csnap => "csnap",
            Engine::Qcow2 => "qcow2",
        }
    }

    fn index(self) -> usize {
        match self {
            Engine::Device => 0,
            Engine::Raw => 1,
            Engine::Csnap => 2,
            Engine::Qcow2 => 3,
        }
    }
}

/// What csnap must reach in a test.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Goal {
    /// csnap's throughput at least this fraction of qemu-nbd raw.
    VsRaw(f64),
    /// csnap's throughput at least this fraction of qemu-nbd qcow2.
    VsQcow2(f64),
}

impl Goal {
    fn describe(self) -> String {
        match self {
            Goal::VsRaw(x) => format!(">= {x:.1}x raw"),
            Goal::VsQcow2(x) => format!(">= {x:.1}x qcow2"),
        }
    }
}

/// Whether a goal was met.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Verdict {
    Met,
    NotMet,
    /// A figure it needs is missing (a run failed).
    Unknown,
}

/// One test: what each engine measured.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub label: String,
    pub goal: Goal,
    results: [Option<FioResult>; 4],
    /// Lowest and highest IOPS over the rounds.
    spread: [Option<(f64, f64)>; 4],
}

impl Row {
    pub(crate) fn new(label: impl Into<String>, goal: Goal) -> Row {
        Row {
            label: label.into(),
            goal,
            results: [None; 4],
            spread: [None; 4],
        }
    }

    pub(crate) fn set(&mut self, engine: Engine, result: FioResult) {
        self.results[engine.index()] = Some(result);
    }

    /// Records the lowest and highest IOPS of `engine`'s rounds.
    pub(crate) fn set_spread(&mut self, engine: Engine, min_iops: f64, max_iops: f64) {
        self.spread[engine.index()] = Some((min_iops, max_iops));
    }

    pub(crate) fn get(&self, engine: Engine) -> Option<FioResult> {
        self.results[engine.index()]
    }

    /// csnap's throughput over `other`'s (bytes per second, which for one block size is
    /// also the IOPS ratio).
    pub(crate) fn ratio(&self, other: Engine) -> Option<f64> {
        self.ratio_of(Engine::Csnap, other)
    }

    /// `engine`'s throughput over `other`'s.
    pub(crate) fn ratio_of(&self, engine: Engine, other: Engine) -> Option<f64> {
        let this = self.get(engine)?.bytes_per_sec;
        let other = self.get(other)?.bytes_per_sec;
        (other > 0.0).then(|| this / other)
    }

    pub(crate) fn verdict(&self) -> Verdict {
        let (ratio, wanted) = match self.goal {
            Goal::VsRaw(x) => (self.ratio(Engine::Raw), x),
            Goal::VsQcow2(x) => (self.ratio(Engine::Qcow2), x),
        };
        match ratio {
            Some(r) if r >= wanted => Verdict::Met,
            Some(_) => Verdict::NotMet,
            None => Verdict::Unknown,
        }
    }
}

fn ratio_text(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "-".to_string(), |r| format!("{r:.2}"))
}

/// The table as Markdown (readable as plain text too): one line per test and engine,
/// the goal's verdict on csnap's line.
pub(crate) fn render(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| test | engine | IOPS (median) | IOPS min-max | MB/s | x raw | x device \
         | CPU us/request | threads | goal |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for row in rows {
        for engine in Engine::ALL {
            let _ = write!(out, "| {} | {} ", row.label, engine.label());
            match row.get(engine) {
                Some(r) => {
                    let spread = row.spread[engine.index()]
                        .map_or_else(|| "-".to_string(), |(a, b)| format!("{a:.0}-{b:.0}"));
                    let _ = write!(
                        out,
                        "| {:.0} | {spread} | {:.1} ",
                        r.iops,
                        r.megabytes_per_sec()
                    );
                }
                None => out.push_str("| failed | - | - "),
            }
            let cpu = row
                .get(engine)
                .and_then(|r| r.cpu_us_per_request)
                .map_or_else(|| "-".to_string(), |c| format!("{c:.1}"));
            let threads = row
                .get(engine)
                .and_then(|r| r.threads)
                .map_or_else(|| "-".to_string(), |t| t.to_string());
            let goal = if engine == Engine::Csnap {
                let verdict = match row.verdict() {
                    Verdict::Met => "met",
                    Verdict::NotMet => "NOT MET",
                    Verdict::Unknown => "unknown (a run failed)",
                };
                format!("{} {verdict}", row.goal.describe())
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {} | {} | {cpu} | {threads} | {goal} |",
                ratio_text(row.ratio_of(engine, Engine::Raw)),
                ratio_text(row.ratio_of(engine, Engine::Device)),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn result(mb_per_sec: f64, block: f64) -> FioResult {
        FioResult {
            ios: 1000,
            bytes: 1000 * block as u64,
            iops: mb_per_sec * 1e6 / block,
            bytes_per_sec: mb_per_sec * 1e6,
            runtime: Duration::from_secs(1),
            cpu_us_per_request: Some(12.5),
            threads: Some(3),
        }
    }

    fn row(goal: Goal, raw: f64, csnap: f64, qcow2: f64) -> Row {
        let mut row = Row::new("t", goal);
        row.set(Engine::Device, result(400.0, 4096.0));
        row.set(Engine::Raw, result(raw, 4096.0));
        row.set(Engine::Csnap, result(csnap, 4096.0));
        row.set(Engine::Qcow2, result(qcow2, 4096.0));
        row
    }

    #[test]
    fn ratios_are_csnap_over_the_other_engine() {
        let r = row(Goal::VsRaw(0.9), 200.0, 150.0, 100.0);
        assert!((r.ratio(Engine::Raw).unwrap() - 0.75).abs() < 1e-9);
        assert!((r.ratio(Engine::Qcow2).unwrap() - 1.5).abs() < 1e-9);
    }

    #[test]
    fn verdicts_compare_against_the_goal_engine_inclusively() {
        assert_eq!(
            row(Goal::VsRaw(0.9), 100.0, 90.0, 1.0).verdict(),
            Verdict::Met
        );
        assert_eq!(
            row(Goal::VsRaw(0.9), 100.0, 89.9, 1000.0).verdict(),
            Verdict::NotMet
        );
        assert_eq!(
            row(Goal::VsQcow2(1.0), 1.0, 50.0, 50.0).verdict(),
            Verdict::Met
        );
        assert_eq!(
            row(Goal::VsQcow2(1.0), 1000.0, 49.0, 50.0).verdict(),
            Verdict::NotMet
        );
    }

    #[test]
    fn a_missing_figure_makes_the_verdict_unknown_not_met() {
        let mut r = Row::new("t", Goal::VsQcow2(1.0));
        r.set(Engine::Csnap, result(10.0, 4096.0));
        r.set(Engine::Raw, result(1.0, 4096.0));
        assert_eq!(r.verdict(), Verdict::Unknown);
        assert_eq!(r.ratio(Engine::Qcow2), None);
        let text = render(&[r]);
        assert!(text.contains("failed"), "{text}");
        assert!(text.contains("unknown"), "{text}");
    }

    #[test]
    fn the_table_has_one_line_per_test_and_engine_with_every_figure() {
        let mut a = row(Goal::VsRaw(0.9), 200.0, 190.0, 100.0);
        a.label = "randread 4K".into();
        a.set_spread(Engine::Csnap, 45000.0, 47000.0);
        let mut b = row(Goal::VsQcow2(1.0), 200.0, 50.0, 100.0);
        b.label = "first-touch".into();
        let text = render(&[a, b]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2 + 2 * 4, "{text}");
        assert!(
            lines[2].starts_with(
                "| randread 4K | device | 97656 | - | 400.0 | 2.00 | 1.00 | 12.5 | 3 |  |"
            ),
            "{}",
            lines[2]
        );
        assert_eq!(
            lines[4],
            "| randread 4K | csnap | 46387 | 45000-47000 | 190.0 | 0.95 | 0.47 | 12.5 | 3 | >= 0.9x raw met |"
        );
        assert!(
            lines[8].ends_with("| 0.25 | 0.12 | 12.5 | 3 | >= 1.0x qcow2 NOT MET |"),
            "{}",
            lines[8]
        );
        for line in &lines {
            assert_eq!(line.matches('|').count(), 11, "{line}");
        }
    }
}
