//! Chaos engineering for the exchange: experiments as data ([`experiment`], TOML under
//! `chaos/experiments/`), fault injectors behind one trait ([`inject`]), the fault journal that
//! makes every change revertible ([`journal`]), kernel-state snapshots ([`snapshot`]), the
//! monitor ([`monitor`]), the analysis of what clients saw ([`analysis`]), and the runner that
//! takes an experiment through its phases ([`runner`]) to a report ([`report`], [`charts`]).

pub mod analysis;
pub mod charts;
pub mod experiment;
pub mod exporter;
pub mod inject;
pub mod journal;
pub mod monitor;
pub mod profile;
pub mod report;
pub mod runner;
pub mod snapshot;
pub mod target;

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) for a unix time in ms.
pub fn timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps() {
        assert_eq!(super::timestamp(0), "1970-01-01T00:00:00");
        assert_eq!(super::timestamp(1_795_663_284_000), "2026-11-26T03:21:24");
    }
}
