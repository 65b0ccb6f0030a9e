//! Names of the kernel objects one cluster run creates. Every name is
//! `cse<run><kind><index>`: a fixed prefix, a 5-character run id unique per run, a kind
//! letter (`n` network namespace, `v` host end of a node's veth, `b` bridge) and an index.
//! Interface names must stay within 15 characters (IFNAMSIZ - 1); these use at most 11.
//! The fixed shape lets the stale sweep recognise exactly our objects and nothing else.

use rand::Rng;

/// Prefix of every namespace, link and directory the harness creates.
pub const PREFIX: &str = "cse";
const RUN_ID_LEN: usize = 5;
const RUN_ID_ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// What kind of object a harness name denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Netns,
    Veth,
    Bridge,
}

impl Kind {
    fn letter(self) -> char {
        match self {
            Kind::Netns => 'n',
            Kind::Veth => 'v',
            Kind::Bridge => 'b',
        }
    }
}

/// The names of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunNames {
    run: String,
}

impl RunNames {
    /// A fresh random run id.
    pub fn random() -> Self {
        let mut rng = rand::thread_rng();
        let run = (0..RUN_ID_LEN)
            .map(|_| RUN_ID_ALPHABET[rng.gen_range(0..RUN_ID_ALPHABET.len())] as char)
            .collect();
        RunNames { run }
    }

    /// The run id (5 characters of [0-9a-z]).
    pub fn run_id(&self) -> &str {
        &self.run
    }

    fn name(&self, kind: Kind, index: u32) -> String {
        format!("{PREFIX}{}{}{index}", self.run, kind.letter())
    }

    /// Network namespace of node `node`.
    pub fn netns(&self, node: u32) -> String {
        self.name(Kind::Netns, node)
    }

    /// Host end of node `node`'s veth pair (the namespace end is always `eth0`).
    pub fn veth(&self, node: u32) -> String {
        self.name(Kind::Veth, node)
    }

    /// Bridge number `index`; 0 is the main bridge that connects everyone.
    pub fn bridge(&self, index: u32) -> String {
        self.name(Kind::Bridge, index)
    }
}

/// Parses a harness name back into (run id, kind, index); `None` for anything else, so the
/// sweep never touches an object it did not make.
pub fn parse(name: &str) -> Option<(&str, Kind, u32)> {
    let rest = name.strip_prefix(PREFIX)?;
    if rest.len() < RUN_ID_LEN + 2 || !rest.is_char_boundary(RUN_ID_LEN) {
        return None;
    }
    let (run, rest) = rest.split_at(RUN_ID_LEN);
    if !run.bytes().all(|b| RUN_ID_ALPHABET.contains(&b)) {
        return None;
    }
    let mut chars = rest.chars();
    let kind = match chars.next()? {
        'n' => Kind::Netns,
        'v' => Kind::Veth,
        'b' => Kind::Bridge,
        _ => return None,
    };
    let digits = chars.as_str();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 3 {
        return None;
    }
    Some((run, kind, digits.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interface_limit_and_parse_back() {
        let names = RunNames::random();
        for index in [0, 1, 8, 254] {
            for (kind, name) in [
                (Kind::Netns, names.netns(index)),
                (Kind::Veth, names.veth(index)),
                (Kind::Bridge, names.bridge(index)),
            ] {
                assert!(name.len() <= 15, "{name} longer than IFNAMSIZ-1");
                assert_eq!(parse(&name), Some((names.run_id(), kind, index)), "{name}");
            }
        }
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for name in [
            "eth0",
            "lo",
            "cs1",
            "csbr0",
            "cse",
            "cseabcdn",
            "cseABCDEn1",
            "cseabcden1x",
            "cseabcdex1",
            "cseab-den1",
            "cseabcden12345",
            "veth3",
        ] {
            assert_eq!(parse(name), None, "{name}");
        }
    }

    #[test]
    fn run_ids_differ() {
        let ids: std::collections::BTreeSet<_> = (0..50)
            .map(|_| RunNames::random().run_id().to_string())
            .collect();
        assert!(ids.len() > 45, "run ids collide too often: {ids:?}");
    }
}
