//! Seeds for randomised tests, parsed and printed the same way in every crate (feature
//! `testing`; only tests use it).
//!
//! A seed is written in decimal or `0x` hexadecimal (both replay the same run) and printed
//! as `seed=0x…` with the environment variable and command that replay it. A malformed
//! value in the environment fails the test loudly instead of silently picking a fresh seed,
//! which would make a "replay" test something else.

use std::fmt;

/// A test's seed. `Display` prints `0x…`, which [`parse_seed`] reads back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seed(pub u64);

impl fmt::Display for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Parses a seed: decimal or `0x`/`0X` hexadecimal, surrounding blanks ignored.
pub fn parse_seed(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|e| format!("not a seed (decimal or 0x hex): {t:?}: {e}"))
}

/// The seed in environment variable `var`, if set; an error naming the variable if the
/// value is not a seed (never a silent fresh seed).
pub fn try_env_seed(var: &str) -> Result<Option<u64>, String> {
    match std::env::var(var) {
        Ok(v) => parse_seed(&v).map(Some).map_err(|e| format!("{var}: {e}")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(format!("{var}: {e}")),
    }
}

/// The seed in environment variable `var`, if set. Panics (failing the test) with the
/// variable's name if the value is not a seed.
pub fn env_seed(var: &str) -> Option<u64> {
    try_env_seed(var).unwrap_or_else(|e| panic!("{e}"))
}

/// How to replay `seed` through `var`: `VAR=0x… cargo test -p PACKAGE -- TEST` (the package
/// is the one whose test is running, when cargo says so).
pub fn replay_hint(test: &str, var: &str, seed: u64) -> String {
    let package = std::env::var("CARGO_PKG_NAME")
        .map(|p| format!(" -p {p}"))
        .unwrap_or_default();
    format!("{var}={} cargo test{package} -- {test}", Seed(seed))
}

/// The seed of randomised test `test`: `var` from the environment if set (a replay), else a
/// fresh random one. Printed to stderr as `TEST: seed=0x… (replay: VAR=0x… cargo test …)`.
pub fn seed(test: &str, var: &str) -> u64 {
    let (seed, how) = match env_seed(var) {
        Some(s) => (s, "replaying, from the environment"),
        None => (rand::random(), "fresh"),
    };
    eprintln!(
        "{test}: seed={} ({how}; replay: {})",
        Seed(seed),
        replay_hint(test, var, seed)
    );
    seed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_and_hex_parse_to_the_same_seed() {
        assert_eq!(parse_seed("255"), Ok(255));
        assert_eq!(parse_seed(" 0xff\n"), Ok(255));
        assert_eq!(parse_seed("0XFF"), Ok(255));
        assert_eq!(parse_seed(&Seed(u64::MAX).to_string()), Ok(u64::MAX));
        assert_eq!(Seed(0xabc).to_string(), "0xabc");
    }

    #[test]
    fn malformed_seeds_are_refused() {
        for bad in ["", "x", "0x", "-1", "0xg", "18446744073709551616", "1.5"] {
            let e = parse_seed(bad).unwrap_err();
            assert!(e.contains("not a seed"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn replay_hint_names_the_variable_and_the_hex_seed() {
        let hint = replay_hint("some_test", "CSNAP_SEED", 16);
        assert!(hint.starts_with("CSNAP_SEED=0x10 cargo test"), "{hint}");
        assert!(hint.ends_with("-- some_test"), "{hint}");
    }
}
