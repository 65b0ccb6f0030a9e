//! Part of the engine's state: the store's usage warning levels already logged.
//!
//! Invariant: a level is in `warned` from the moment usage reached it (logged once) until
//! usage fell [`WARN_REARM_POINTS`] below it (re-armed), so usage hovering at a level does
//! not flood the log.

use super::io::WARN_REARM_POINTS;
use csnap_proto::StoreArea;
use std::collections::BTreeSet;

/// A change of one warning level to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Crossing {
    /// Usage reached `level` percent.
    Reached { level: u8 },
    /// Usage fell far enough below `level` to re-arm it.
    Rearmed { level: u8 },
}

#[derive(Default)]
pub(super) struct SpaceWatch {
    /// Usage warning levels logged and not yet re-armed: (area, percent).
    warned: BTreeSet<(StoreArea, u8)>,
}

impl SpaceWatch {
    /// The levels of `area` that usage (`used` of `total`) crossed since the last call.
    pub(super) fn crossings(
        &mut self,
        area: StoreArea,
        used: u64,
        total: u64,
        levels: &[u8],
    ) -> Vec<Crossing> {
        let mut out = Vec::new();
        for &level in levels {
            let warned = self.warned.contains(&(area, level));
            if !warned && at_level(used, total, level) {
                self.warned.insert((area, level));
                out.push(Crossing::Reached { level });
            } else if warned && below(used, total, rearm_level(level)) {
                self.warned.remove(&(area, level));
                out.push(Crossing::Rearmed { level });
            }
        }
        out
    }
}

/// The highest of `levels` that usage is at or above now.
pub(super) fn current_level(used: u64, total: u64, levels: &[u8]) -> Option<u8> {
    levels
        .iter()
        .copied()
        .filter(|l| at_level(used, total, *l))
        .max()
}

/// `used` of `total` in percent, rounded down (0 for an empty area).
pub(super) fn percent(used: u64, total: u64) -> u8 {
    if total == 0 {
        return 0;
    }
    (u128::from(used) * 100 / u128::from(total)).min(100) as u8
}

/// Where a warning at `level` percent is re-armed: `WARN_REARM_POINTS` lower, or half
/// the level for levels under twice that.
fn rearm_level(level: u8) -> u8 {
    level - WARN_REARM_POINTS.min(level / 2)
}

/// Is `used` of `total` below `level` percent?
fn below(used: u64, total: u64, level: u8) -> bool {
    u128::from(used) * 100 < u128::from(level) * u128::from(total)
}

/// Is `used` of `total` at or above `level` percent? A level of 0 or an empty area never is.
fn at_level(used: u64, total: u64, level: u8) -> bool {
    level > 0 && total > 0 && u128::from(used) * 100 >= u128::from(level) * u128::from(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_is_logged_once_until_rearmed() {
        let mut w = SpaceWatch::default();
        let levels = [80, 90, 0];
        let data = StoreArea::Data;
        assert!(w.crossings(data, 79, 100, &levels).is_empty());
        assert_eq!(
            w.crossings(data, 91, 100, &levels),
            vec![
                Crossing::Reached { level: 80 },
                Crossing::Reached { level: 90 }
            ]
        );
        assert!(
            w.crossings(data, 86, 100, &levels).is_empty(),
            "not re-armed yet"
        );
        assert_eq!(
            w.crossings(data, 84, 100, &levels),
            vec![Crossing::Rearmed { level: 90 }]
        );
        assert!(w.crossings(StoreArea::Metadata, 0, 0, &levels).is_empty());
        assert_eq!(current_level(84, 100, &levels), Some(80));
        assert_eq!(current_level(84, 0, &levels), None);
        assert_eq!(percent(1, 3), 33);
        assert_eq!(rearm_level(6), 3);
    }
}
