//! The one seed type. Every schedule is a pure function of its [`Seed`]: the world's single
//! RNG is seeded from it and its knobs (node count, fencing method) derive from it.
//!
//! Environment:
//! * `CSNAP_SIM_SEED=<seed>` (decimal or `0x…`): replay that one schedule with a trace;
//! * `CSNAP_SIM_SCHEDULES=<n>`: how many schedules a run makes;
//! * `CSNAP_SIM_BASE=<seed>`: the first seed of a run (schedule `k` has seed `base + k`);
//! * `CSNAP_SIM_RESET=1`: seeds may also pick `fencing: reset` (see `world::Options`).

use std::fmt;

/// One schedule's seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seed(pub u64);

impl Seed {
    /// Parses decimal or `0x` hexadecimal, like every test seed
    /// (`csnap_proto::testing::parse_seed`).
    pub fn parse(text: &str) -> Result<Seed, String> {
        csnap_proto::testing::parse_seed(text).map(Seed)
    }

    /// The `k`-th schedule of a run starting at `self`.
    pub fn nth(self, k: u64) -> Seed {
        Seed(self.0.wrapping_add(k))
    }

    /// The command that replays this schedule alone, with its trace.
    pub fn replay_command(self, reset: bool) -> String {
        let reset = if reset { "CSNAP_SIM_RESET=1 " } else { "" };
        format!(
            "{reset}CSNAP_SIM_SEED={self} cargo test -p csnap-sim --test schedules -- --nocapture"
        )
    }
}

impl fmt::Display for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Reads a seed from the environment, as every test does
/// (`csnap_proto::testing::try_env_seed`); a malformed value is an error, not a silent
/// default.
pub fn env_seed(name: &str) -> Result<Option<Seed>, String> {
    csnap_proto::testing::try_env_seed(name).map(|seed| seed.map(Seed))
}

/// Reads a count from the environment.
pub fn env_count(name: &str) -> Result<Option<u64>, String> {
    env_seed(name).map(|s| s.map(|s| s.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!(Seed::parse("0x10"), Ok(Seed(16)));
        assert_eq!(Seed::parse(" 17 "), Ok(Seed(17)));
        assert!(Seed::parse("x").is_err());
        assert_eq!(Seed(255).to_string(), "0xff");
        assert_eq!(Seed::parse(&Seed(0xabc).to_string()), Ok(Seed(0xabc)));
    }
}
