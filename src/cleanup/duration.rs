//! GitLab's human durations: `older_than` of the bulk tag delete and cleanup policies, and this
//! operator's `olderThan`, `notDownloadedFor` and `cadence`.
//!
//! GitLab reads these with the `chronic_duration` gem; this parser accepts the same everyday
//! forms and uses the same unit lengths:
//!
//! | unit | spellings (case-insensitive) | length |
//! | --- | --- | --- |
//! | second | `s`, `sec`, `secs`, `second`, `seconds` | 1 s |
//! | minute | `m`, `min`, `mins`, `minute`, `minutes` | 60 s |
//! | hour | `h`, `hr`, `hrs`, `hour`, `hours` | 3 600 s |
//! | day | `d`, `day`, `days` | 86 400 s |
//! | week | `w`, `wk`, `wks`, `week`, `weeks` | 7 days |
//! | month | `mo`, `mon`, `mos`, `month`, `months` | 30 days (as `chronic_duration`) |
//! | year | `y`, `yr`, `yrs`, `year`, `years` | 365.25 days (as `chronic_duration`) |
//!
//! A duration is one or more `<number><unit>` parts, optionally separated by spaces or commas
//! (`1h 30m`, `1 day, 2 hours`). Numbers may have a decimal fraction (`1.5h`).
//!
//! Deliberate differences from `chronic_duration`, all in the direction of deleting less:
//! - a bare number (`14`) is an error, not 14 seconds: a forgotten unit must not turn a
//!   two-week retention into fourteen seconds;
//! - zero, negative and unparsable input is an error naming the input, never "no limit";
//! - `m` is minutes (as in GitLab), so `1m` is one minute; write `1month` or `1mo` for months.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::{Error, Result};

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
const NANOS_PER_SECOND: u128 = 1_000_000_000;
/// 365.25 days, in nanoseconds, as `chronic_duration` counts a year.
const YEAR_NANOS: u128 = (365 * DAY as u128 + DAY as u128 / 4) * NANOS_PER_SECOND;

/// Unit spellings and their length in nanoseconds.
const UNITS: &[(&[&str], u128)] = &[
    (&["s", "sec", "secs", "second", "seconds"], NANOS_PER_SECOND),
    (
        &["m", "min", "mins", "minute", "minutes"],
        MINUTE as u128 * NANOS_PER_SECOND,
    ),
    (
        &["h", "hr", "hrs", "hour", "hours"],
        HOUR as u128 * NANOS_PER_SECOND,
    ),
    (&["d", "day", "days"], DAY as u128 * NANOS_PER_SECOND),
    (
        &["w", "wk", "wks", "week", "weeks"],
        7 * DAY as u128 * NANOS_PER_SECOND,
    ),
    (
        &["mo", "mon", "mos", "month", "months"],
        30 * DAY as u128 * NANOS_PER_SECOND,
    ),
    (&["y", "yr", "yrs", "year", "years"], YEAR_NANOS),
];

/// Parses a human duration such as `14d`, `1month`, `2 days` or `1h 30m`.
///
/// Errors name the input; the error's field is `duration` (rename with [`Error::in_field`]).
pub fn parse_duration(input: &str) -> Result<Duration> {
    let fail = |message: String| Error::InvalidDuration {
        field: "duration",
        input: input.to_owned(),
        message,
    };
    let text = input.trim();
    if text.is_empty() {
        return Err(fail("empty; write a number and a unit, e.g. 14d".into()));
    }
    if text.starts_with('-') {
        return Err(fail("must be positive".into()));
    }
    let bytes = text.as_bytes();
    let mut position = 0;
    let mut total_nanos: u128 = 0;
    let mut parts = 0;
    while position < bytes.len() {
        while position < bytes.len()
            && (bytes[position].is_ascii_whitespace() || bytes[position] == b',')
        {
            position += 1;
        }
        if position == bytes.len() {
            break;
        }
        let number_start = position;
        while position < bytes.len() && bytes[position].is_ascii_digit() {
            position += 1;
        }
        let whole = &text[number_start..position];
        let mut fraction = "";
        if position < bytes.len() && bytes[position] == b'.' {
            position += 1;
            let fraction_start = position;
            while position < bytes.len() && bytes[position].is_ascii_digit() {
                position += 1;
            }
            fraction = &text[fraction_start..position];
        }
        if whole.is_empty() && fraction.is_empty() {
            return Err(fail(format!(
                "expected a number at {:?}",
                &text[number_start..]
            )));
        }
        while position < bytes.len() && bytes[position] == b' ' {
            position += 1;
        }
        let unit_start = position;
        while position < bytes.len() && bytes[position].is_ascii_alphabetic() {
            position += 1;
        }
        let unit = &text[unit_start..position];
        if unit.is_empty() {
            return Err(fail(format!(
                "missing unit after {:?}; write e.g. {}d or {}h (units: s, m, h, d, w, month, y)",
                &text[number_start..unit_start].trim_end(),
                whole,
                whole
            )));
        }
        let unit_nanos = unit_length(unit).ok_or_else(|| {
            fail(format!(
                "unknown unit {unit:?}; use s, m (minutes), h, d, w, month or y"
            ))
        })?;
        let part =
            part_nanos(whole, fraction, unit_nanos).ok_or_else(|| fail("too large".into()))?;
        total_nanos = total_nanos
            .checked_add(part)
            .ok_or_else(|| fail("too large".into()))?;
        parts += 1;
    }
    if parts == 0 {
        return Err(fail("empty; write a number and a unit, e.g. 14d".into()));
    }
    if total_nanos == 0 {
        return Err(fail("must be greater than zero".into()));
    }
    let seconds =
        u64::try_from(total_nanos / NANOS_PER_SECOND).map_err(|_| fail("too large".into()))?;
    let nanos = (total_nanos % NANOS_PER_SECOND) as u32;
    Ok(Duration::new(seconds, nanos))
}

fn unit_length(unit: &str) -> Option<u128> {
    UNITS
        .iter()
        .find(|(spellings, _)| spellings.iter().any(|s| s.eq_ignore_ascii_case(unit)))
        .map(|(_, nanos)| *nanos)
}

/// `whole.fraction` units of `unit_nanos` each, truncated to whole nanoseconds.
fn part_nanos(whole: &str, fraction: &str, unit_nanos: u128) -> Option<u128> {
    let whole_value: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut nanos = whole_value.checked_mul(unit_nanos)?;
    // Digits past the 18th cannot change a result in nanoseconds of any unit up to a year.
    let fraction = &fraction[..fraction.len().min(18)];
    if !fraction.is_empty() {
        let numerator: u128 = fraction.parse().ok()?;
        let denominator = 10u128.checked_pow(fraction.len() as u32)?;
        nanos = nanos.checked_add(numerator.checked_mul(unit_nanos)? / denominator)?;
    }
    Some(nanos)
}

/// Renders a duration so that [`parse_duration`] reads it back exactly: whole days as `14d`,
/// otherwise `1d 2h 3m 4.5s` with zero parts left out. Months and weeks are written as days
/// (`30d`, not `1month`) because days are unambiguous and are what GitLab's `older_than` lists.
pub fn format_duration(duration: Duration) -> String {
    let mut seconds = duration.as_secs();
    let nanos = duration.subsec_nanos();
    if seconds == 0 && nanos == 0 {
        return "0s".to_owned();
    }
    let mut parts: Vec<String> = Vec::new();
    for (unit, length) in [("d", DAY), ("h", HOUR), ("m", MINUTE)] {
        if seconds >= length {
            parts.push(format!("{}{unit}", seconds / length));
            seconds %= length;
        }
    }
    if seconds > 0 || nanos > 0 {
        if nanos == 0 {
            parts.push(format!("{seconds}s"));
        } else {
            let fraction = format!("{nanos:09}");
            parts.push(format!("{seconds}.{}s", fraction.trim_end_matches('0')));
        }
    }
    parts.join(" ")
}

/// A positive duration written the human way; parses with [`parse_duration`] and displays
/// with [`format_duration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(Duration);

impl HumanDuration {
    pub fn as_duration(self) -> Duration {
        self.0
    }
}

impl From<HumanDuration> for Duration {
    fn from(value: HumanDuration) -> Self {
        value.0
    }
}

impl FromStr for HumanDuration {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self> {
        parse_duration(input).map(HumanDuration)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&format_duration(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn days(n: u64) -> Duration {
        Duration::from_secs(n * DAY)
    }

    #[test]
    fn parses_the_forms_gitlab_documents_and_accepts() {
        let cases = [
            ("30m", Duration::from_secs(30 * 60)),
            ("1h", Duration::from_secs(3600)),
            ("1d", days(1)),
            ("2d", days(2)),
            ("14d", days(14)),
            ("90d", days(90)),
            ("1month", days(30)),
            ("3month", days(90)),
            ("3months", days(90)),
            ("1 day", days(1)),
            ("2 days", days(2)),
            ("1 week", days(7)),
            ("1w", days(7)),
            ("2 weeks", days(14)),
            ("1y", Duration::from_secs(365 * DAY + DAY / 4)),
            ("45s", Duration::from_secs(45)),
            ("1h 30m", Duration::from_secs(5400)),
            ("1 day, 2 hours", Duration::from_secs(DAY + 2 * HOUR)),
            ("1.5h", Duration::from_secs(5400)),
            (".5d", Duration::from_secs(DAY / 2)),
            ("  7D  ", days(7)),
            ("1Month", days(30)),
            ("1mo", days(30)),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_duration(input), Ok(expected), "{input}");
        }
    }

    #[test]
    fn gitlab_policy_ui_values_parse() {
        // Cadence: 1d | 7d | 14d | 1month | 3month; older_than: 7d | 14d | 30d | 90d.
        let cadence: Vec<u64> = ["1d", "7d", "14d", "1month", "3month"]
            .iter()
            .map(|value| parse_duration(value).unwrap().as_secs() / DAY)
            .collect();
        assert_eq!(cadence, [1, 7, 14, 30, 90]);
        let older_than: Vec<u64> = ["7d", "14d", "30d", "90d"]
            .iter()
            .map(|value| parse_duration(value).unwrap().as_secs() / DAY)
            .collect();
        assert_eq!(older_than, [7, 14, 30, 90]);
    }

    #[test]
    fn rejects_zero_negative_and_garbage_naming_the_input() {
        for input in [
            "",
            "   ",
            "0d",
            "0",
            "-1d",
            "14",
            "d",
            "1 fortnight",
            "1d x",
            "abc",
            "1..5d",
            "0s 0m",
            "1e3d",
            "99999999999999999999999999999999999999999y",
        ] {
            let error = parse_duration(input).expect_err(input);
            let message = error.to_string();
            assert!(message.contains(&format!("{input:?}")), "{message}");
            assert_eq!(error.reason(), "InvalidSpec");
        }
        let bare = parse_duration("14").unwrap_err().to_string();
        assert!(bare.contains("missing unit"), "{bare}");
    }

    #[test]
    fn renders_back() {
        assert_eq!(format_duration(days(14)), "14d");
        assert_eq!(format_duration(days(30)), "30d");
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h 30m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        let human: HumanDuration = "1month".parse().unwrap();
        assert_eq!(human.to_string(), "30d");
        assert_eq!(human.as_duration(), days(30));
    }

    proptest! {
        #[test]
        fn render_then_parse_is_identity(seconds in 0u64..10_000_000_000, nanos in 0u32..1_000_000_000) {
            let duration = Duration::new(seconds, nanos);
            prop_assume!(!duration.is_zero());
            prop_assert_eq!(parse_duration(&format_duration(duration)), Ok(duration));
        }

        #[test]
        fn never_panics(input in ".{0,40}") {
            let _ = parse_duration(&input);
        }
    }
}
