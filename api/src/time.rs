//! Wall-clock helpers. Edge devices often lack a real-time clock, so wall
//! times are for display only; ordering and liveness use counters and
//! monotonic clocks.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// RFC 3339 in UTC with millisecond precision: `2026-11-26T18:40:07.123Z`.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms % 1000)
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A kubectl-style age: `42s`, `5m`, `3h`, `12d`.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_718_407_123), "2026-11-26T18:40:07.123Z");
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(age(42_000), "42s");
        assert_eq!(age(300_000), "5m");
        assert_eq!(age(3 * 3_600_000), "3h");
        assert_eq!(age(12 * 86_400_000), "12d");
    }
}

/// Parses `500ms`, `5s`, `2m`, `1h` (one number, one unit).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let err = || format!("{s:?} is not a duration (use e.g. 500ms, 5s, 2m, 1h)");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000).ok_or_else(err)?,
        "m" => n.checked_mul(60_000).ok_or_else(err)?,
        "h" => n.checked_mul(3_600_000).ok_or_else(err)?,
        _ => return Err(err()),
    };
    Ok(std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod duration_tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "5", "s", "5 s", "1.5s", "-1s", "5d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
