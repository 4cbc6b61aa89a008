//! Rates: `count` units per `period`, parsed from strings such as `"100/minute"`.

use crate::clock::NANOS;
use crate::error::{Error, Result};

/// The largest count a rate accepts (above it, float round trips through Python lose units).
pub const MAX_COUNT: u64 = 1 << 53;
/// The shortest period: one microsecond.
pub const MIN_PERIOD_NS: u64 = 1_000;
/// The longest period in days: 36,525 (100 years of 365.25 days).
pub const MAX_PERIOD_DAYS: u64 = 36_525;
/// The longest period: [`MAX_PERIOD_DAYS`] days, 3,155,760,000 s.
pub const MAX_PERIOD_NS: u64 = MAX_PERIOD_DAYS * 86_400 * NANOS;

fn too_long(what: impl std::fmt::Display) -> String {
    format!("rate period {what} is too long (at most {MAX_PERIOD_DAYS} days, 100 years of 365.25 days)")
}

/// `count` units per `period_ns` nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u64,
    pub period_ns: u64,
}

/// Unit names (lower case) and their length. The name before last is the one `Display`
/// writes for a period of exactly one unit; the first is its short form.
const UNITS: &[(&[&str], u64)] = &[
    (&["us", "\u{b5}s", "\u{3bc}s", "usec", "microsecond", "microseconds"], 1_000),
    (&["ms", "msec", "millisecond", "milliseconds"], 1_000_000),
    (&["s", "sec", "secs", "second", "seconds"], NANOS),
    (&["m", "min", "mins", "minute", "minutes"], 60 * NANOS),
    (&["h", "hr", "hrs", "hour", "hours"], 3_600 * NANOS),
    (&["d", "day", "days"], 86_400 * NANOS),
    (&["w", "wk", "week", "weeks"], 7 * 86_400 * NANOS),
];

impl Rate {
    /// A rate from a count and a period in nanoseconds, validated.
    pub fn new(count: u64, period_ns: u64) -> Result<Rate> {
        if count == 0 {
            return Err(Error::InvalidRate("rate count must be at least 1, got 0".into()));
        }
        if count > MAX_COUNT {
            return Err(Error::InvalidRate(format!("rate count {count} is too large (at most {MAX_COUNT})")));
        }
        if period_ns < MIN_PERIOD_NS {
            return Err(Error::InvalidRate(format!("rate period must be at least 1 microsecond, got {period_ns} ns")));
        }
        if period_ns > MAX_PERIOD_NS {
            return Err(Error::InvalidRate(too_long(format_args!("{} s", period_ns / NANOS))));
        }
        Ok(Rate { count, period_ns })
    }

    /// A rate from a count and a period in seconds (finite and positive).
    pub fn from_secs(count: u64, period: f64) -> Result<Rate> {
        if !period.is_finite() || period <= 0.0 {
            return Err(Error::InvalidRate(format!(
                "rate period must be a finite number of seconds above 0, got {period}"
            )));
        }
        let ns = period * NANOS as f64;
        if ns > MAX_PERIOD_NS as f64 {
            return Err(Error::InvalidRate(too_long(format_args!("{period} s"))));
        }
        Rate::new(count, ns.round() as u64)
    }

    /// Parses `"100/minute"`, `"100 per minute"`, `"10/s"`, `"5/2s"`, `"5 per 2 seconds"`,
    /// `"1000/hour"`, `"7/day"`, `"10/500ms"`, `"1/250us"`, `"3/1.5h"`. Case and spaces do
    /// not matter. Periods run from 1 µs to [`MAX_PERIOD_DAYS`] days.
    pub fn parse(text: &str) -> Result<Rate> {
        let bad = |why: &str| {
            Error::InvalidRate(format!(
                "invalid rate {text:?}: {why} (expected e.g. \"100/minute\", \"10 per second\", \"5/2s\")"
            ))
        };
        let lower = text.trim().to_ascii_lowercase();
        let (count_part, period_part) = if let Some((a, b)) = lower.split_once('/') {
            (a, b)
        } else if let Some((a, b)) = lower.split_once(" per ") {
            (a, b)
        } else {
            return Err(bad("no '/' or 'per' between count and period"));
        };
        let count_part = count_part.trim();
        if count_part.is_empty() {
            return Err(bad("missing count"));
        }
        if !count_part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the count must be a whole number of at least 1"));
        }
        let count: u64 = count_part.parse().map_err(|_| bad("the count is too large"))?;
        let period_part = period_part.trim();
        let split =
            period_part.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(|| bad("missing period unit"))?;
        let (mult_text, unit_text) = period_part.split_at(split);
        let unit_text = unit_text.trim();
        let multiplier: f64 = if mult_text.is_empty() {
            1.0
        } else {
            mult_text.parse().map_err(|_| bad("the period multiplier is not a number"))?
        };
        if multiplier.is_nan() || multiplier <= 0.0 || !multiplier.is_finite() {
            return Err(bad("the period multiplier must be above 0"));
        }
        let unit_ns =
            UNITS.iter().find(|(names, _)| names.contains(&unit_text)).map(|(_, ns)| *ns).ok_or_else(|| {
                if unit_text.starts_with("month") || unit_text.starts_with("year") {
                    bad("months and years have no fixed length; use days, e.g. \"1000/30d\"")
                } else {
                    bad(&format!("unknown period unit {unit_text:?} (use us, ms, s, m, h, d or w)"))
                }
            })?;
        let period = multiplier * unit_ns as f64;
        if period > MAX_PERIOD_NS as f64 {
            return Err(bad(&format!("the period is too long (at most {MAX_PERIOD_DAYS} days)")));
        }
        Rate::new(count, period.round() as u64).map_err(|e| bad(&e.to_string()))
    }

    /// The period in seconds.
    pub fn period_secs(&self) -> f64 {
        self.period_ns as f64 / NANOS as f64
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (names, ns) in UNITS.iter().rev() {
            let long = names[names.len() - 2];
            if self.period_ns == *ns {
                return write!(f, "{}/{}", self.count, long);
            }
        }
        for (names, ns) in UNITS.iter().rev() {
            if self.period_ns % ns == 0 {
                return write!(f, "{}/{}{}", self.count, self.period_ns / ns, names[0]);
            }
        }
        write!(f, "{}/{}s", self.count, self.period_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Rate {
        Rate::parse(s).unwrap()
    }

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(p("100/minute"), Rate { count: 100, period_ns: 60 * NANOS });
        assert_eq!(p("100 per minute"), p("100/minute"));
        assert_eq!(p("10/s"), Rate { count: 10, period_ns: NANOS });
        assert_eq!(p("10/second"), p("10/s"));
        assert_eq!(p("5/2s"), Rate { count: 5, period_ns: 2 * NANOS });
        assert_eq!(p("5 per 2 seconds"), p("5/2s"));
        assert_eq!(p("1000/hour"), Rate { count: 1000, period_ns: 3600 * NANOS });
        assert_eq!(p("7/day"), Rate { count: 7, period_ns: 86_400 * NANOS });
        assert_eq!(p(" 10 / 500ms "), Rate { count: 10, period_ns: 500_000_000 });
        assert_eq!(p("3/1.5H"), Rate { count: 3, period_ns: 5_400 * NANOS });
        assert_eq!(p("1/w"), Rate { count: 1, period_ns: 7 * 86_400 * NANOS });
        for us in ["1/1us", "1/us", "1/1\u{b5}s", "1/1\u{3bc}s", "1 per 1 microsecond", "1/1 usec", "1/1US"] {
            assert_eq!(p(us), Rate { count: 1, period_ns: MIN_PERIOD_NS }, "{us}");
        }
        assert_eq!(p("3/250us"), Rate { count: 3, period_ns: 250_000 });
    }

    #[test]
    fn the_bounds_are_exactly_the_documented_ones() {
        assert_eq!(MAX_PERIOD_NS, 3_155_760_000 * NANOS);
        assert_eq!(p("1/36525d").period_ns, MAX_PERIOD_NS);
        assert_eq!(p("1/5217.857142857143w").period_ns, MAX_PERIOD_NS);
        assert!(Rate::parse("1/36526d").unwrap_err().to_string().contains("at most 36525 days"));
        assert!(Rate::new(1, MAX_PERIOD_NS).is_ok());
        assert!(Rate::new(1, MAX_PERIOD_NS + 1).unwrap_err().to_string().contains("at most 36525 days"));
        assert!(Rate::from_secs(1, 3_155_760_000.0).is_ok());
        assert!(Rate::from_secs(1, 3_155_760_001.0).is_err());
        assert_eq!(p("1/0.001ms").period_ns, MIN_PERIOD_NS);
        assert!(Rate::parse("1/0.999us").unwrap_err().to_string().contains("at least 1 microsecond"));
    }

    #[test]
    fn rejects_bad_strings_with_reasons() {
        for (s, why) in [
            ("", "no '/'"),
            ("100", "no '/'"),
            ("/minute", "missing count"),
            ("0/minute", "at least 1"),
            ("-5/minute", "whole number"),
            ("1.5/minute", "whole number"),
            ("10/fortnight", "unknown period unit"),
            ("10/month", "no fixed length"),
            ("10/0s", "above 0"),
            ("10/1.2.3s", "not a number"),
            ("10/5", "missing period unit"),
            ("99999999999999999999999/s", "too large"),
            ("10/1000000w", "too long"),
            ("10/0.0001ms", "at least 1 microsecond"),
        ] {
            let err = Rate::parse(s).unwrap_err().to_string();
            assert!(err.contains(why), "{s:?}: {err}");
        }
    }

    #[test]
    fn validates_numbers() {
        assert!(Rate::from_secs(1, f64::NAN).is_err());
        assert!(Rate::from_secs(1, f64::INFINITY).is_err());
        assert!(Rate::from_secs(1, -1.0).is_err());
        assert!(Rate::from_secs(1, 0.0).is_err());
        assert!(Rate::from_secs(0, 1.0).is_err());
        assert!(Rate::from_secs(MAX_COUNT + 1, 1.0).is_err());
        assert_eq!(Rate::from_secs(3, 0.25).unwrap().period_ns, 250_000_000);
    }

    #[test]
    fn displays_compactly() {
        assert_eq!(p("100/minute").to_string(), "100/minute");
        assert_eq!(p("5/2s").to_string(), "5/2s");
        assert_eq!(p("5/90s").to_string(), "5/90s");
        assert_eq!(p("5/2h").to_string(), "5/2h");
        assert_eq!(p("1/1.5ms").to_string(), "1/1500us");
        assert_eq!(p("7/us").to_string(), "7/microsecond");
        assert_eq!(p("1/1.5us").to_string(), "1/0.0000015s");
        for r in ["1/1.5ms", "7/us", "1/1.5us", "9/36525d", "2/1000001us"] {
            assert_eq!(p(&p(r).to_string()), p(r), "{r}");
        }
    }
}
