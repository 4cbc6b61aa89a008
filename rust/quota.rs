//! Quotas: what a limiter allows one key, as a value.
//!
//! A [`Quota`] is an algorithm with its rate, capacity and (for windows) where windows
//! start. It is checked once, when it is made; after that every limiter, store and
//! backend reads it rather than its own copy of the rules: the in-process and
//! shared-memory limiters step with it, a quota change converts a key's state with it,
//! headers and logs name it, and the Redis backend takes its script arguments and key
//! names from it.

use crate::algorithms::{Algorithm, FixedWindow, Gcra, SlidingWindow, State};
use crate::clock::NANOS;
use crate::decision::Decision;
use crate::error::{Error, Result};
use crate::rate::Rate;
use std::fmt;

/// Which algorithm a quota is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    TokenBucket,
    LeakyBucket,
    FixedWindow,
    SlidingWindow,
}

/// (kind, identifier, name for people, name in the Redis scripts).
const KINDS: [(Kind, &str, &str, &str); 4] = [
    (Kind::TokenBucket, "token_bucket", "token bucket", "gcra"),
    (Kind::LeakyBucket, "leaky_bucket", "leaky bucket", "leaky"),
    (Kind::FixedWindow, "fixed_window", "fixed window", "fixed"),
    (Kind::SlidingWindow, "sliding_window", "sliding window", "sliding"),
];

impl Kind {
    fn row(self) -> &'static (Kind, &'static str, &'static str, &'static str) {
        KINDS.iter().find(|row| row.0 == self).expect("every kind has a row")
    }

    /// `"token_bucket"`, `"leaky_bucket"`, `"fixed_window"` or `"sliding_window"`.
    pub fn ident(self) -> &'static str {
        self.row().1
    }

    /// `"token bucket"`... for messages and logs.
    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// The algorithm's name in the Redis scripts: `"gcra"`, `"leaky"`, `"fixed"`, `"sliding"`.
    pub fn script(self) -> &'static str {
        self.row().3
    }

    /// The kind named by its identifier (`"token_bucket"`...).
    pub fn parse(ident: &str) -> Result<Kind> {
        KINDS.iter().find(|row| row.1 == ident).map(|row| row.0).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "algorithm must be 'token_bucket', 'leaky_bucket', 'fixed_window' or 'sliding_window', got {ident:?}"
            ))
        })
    }

    /// The kind named as in the Redis scripts (`"gcra"`...).
    pub fn from_script(name: &str) -> Result<Kind> {
        KINDS.iter().find(|row| row.3 == name).map(|row| row.0).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "script algorithm must be 'gcra', 'leaky', 'fixed' or 'sliding', got {name:?}"
            ))
        })
    }

    pub fn is_window(self) -> bool {
        matches!(self, Kind::FixedWindow | Kind::SlidingWindow)
    }
}

/// An algorithm with its quota. Made only through [`Quota::new`], so every `Quota` is a
/// valid one.
#[derive(Clone, Debug)]
pub struct Quota {
    algorithm: Algorithm,
}

/// What the Redis scripts take to describe a quota: the algorithm's name, the
/// microseconds per unit (buckets) or per window (windows), and the capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptArgs {
    pub algorithm: &'static str,
    pub micros: String,
    pub capacity: String,
}

impl Quota {
    /// `rate` with a burst (token bucket) or capacity (leaky bucket) of `burst`, the
    /// rate's count when `None`; windows take no burst (their limit is the count) and
    /// start `align_ns` after the Unix epoch's period boundaries (buckets ignore it).
    pub fn new(kind: Kind, rate: Rate, burst: Option<u64>, align_ns: i64) -> Result<Quota> {
        if kind.is_window() && burst.is_some() {
            return Err(Error::InvalidArgument(format!(
                "a {} has no burst: its limit is the rate's count",
                kind.name()
            )));
        }
        let algorithm = match kind {
            Kind::TokenBucket => Algorithm::TokenBucket(Gcra::new(rate, burst.unwrap_or(rate.count))?),
            Kind::LeakyBucket => Algorithm::LeakyBucket(Gcra::new(rate, burst.unwrap_or(rate.count))?),
            Kind::FixedWindow => Algorithm::FixedWindow(FixedWindow::aligned(rate, align_ns)?),
            Kind::SlidingWindow => Algorithm::SlidingWindow(SlidingWindow::aligned(rate, align_ns)?),
        };
        Ok(Quota { algorithm })
    }

    /// A quota of the same kind, with windows starting at the same place, at another rate:
    /// what a quota change at run time means.
    pub fn with_rate(&self, rate: Rate, burst: Option<u64>) -> Result<Quota> {
        Quota::new(self.kind(), rate, burst, self.align_ns().unwrap_or(0))
    }

    /// The quota a script describes with its arguments (see [`Quota::script_args`]). A
    /// bucket's rate is not kept there, only its interval, so the rate comes back as
    /// `capacity` units per `capacity` intervals.
    pub fn from_script_args(algorithm: &str, micros: f64, capacity: u64) -> Result<Quota> {
        let kind = Kind::from_script(algorithm)?;
        // The same float operations as the Python code that wrote these numbers.
        let period = if kind.is_window() { micros / 1e6 } else { capacity as f64 * micros / 1e6 };
        let rate = Rate::from_secs(capacity, period)?;
        Quota::new(kind, rate, (!kind.is_window()).then_some(capacity), 0)
    }

    /// The step functions, bound to the clock they are stepped with.
    #[inline(always)]
    pub fn algorithm(&self) -> &Algorithm {
        &self.algorithm
    }

    /// This quota with windows read on a clock whose time plus `epoch_offset` is Unix time.
    pub fn bound(self, epoch_offset: u64) -> Quota {
        Quota { algorithm: self.algorithm.bound(epoch_offset) }
    }

    pub fn kind(&self) -> Kind {
        match self.algorithm {
            Algorithm::TokenBucket(_) => Kind::TokenBucket,
            Algorithm::LeakyBucket(_) => Kind::LeakyBucket,
            Algorithm::FixedWindow(_) => Kind::FixedWindow,
            Algorithm::SlidingWindow(_) => Kind::SlidingWindow,
        }
    }

    pub fn rate(&self) -> Rate {
        self.algorithm.rate()
    }

    /// The capacity: burst, queue size or window limit.
    pub fn limit(&self) -> u64 {
        self.algorithm.limit()
    }

    /// Where windows start (ns after the Unix epoch, as given), for a window.
    pub fn align_ns(&self) -> Option<i64> {
        self.algorithm.align_ns()
    }

    /// `align_ns` modulo the period: two windows quotas whose alignments differ by whole
    /// periods count the same windows.
    fn phase_ns(&self) -> Option<u64> {
        let period = self.rate().period_ns as i128;
        self.align_ns().map(|a| (a as i128).rem_euclid(period) as u64)
    }

    /// The longest time a key can need, after its last admitted call, to be fresh again.
    pub fn time_to_fresh(&self) -> u64 {
        self.algorithm.time_to_fresh()
    }

    /// The time in which a whole quota comes back: the window, or the burst's refill.
    pub fn restore_ns(&self) -> u64 {
        if self.kind().is_window() {
            self.rate().period_ns
        } else {
            self.time_to_fresh()
        }
    }

    /// Decides a call of `cost` units at `now` from the key's `state`.
    #[inline(always)]
    pub fn step(&self, state: State, now: u64, cost: u64) -> (State, Decision) {
        self.algorithm.step(state, now, cost)
    }

    /// Charges (`delta > 0`) or refunds (`delta < 0`) units of a call made at
    /// `charged_at` (see [`Algorithm::adjust`]).
    pub fn adjust(&self, state: State, now: u64, delta: i64, charged_at: u64) -> State {
        self.algorithm.adjust(state, now, delta, charged_at)
    }

    #[inline]
    pub fn is_fresh(&self, state: State, now: u64) -> bool {
        self.algorithm.is_fresh(state, now)
    }

    /// A key's `state` re-expressed under the quota `to`, keeping what it has used (see
    /// [`Algorithm::convert`]). Both must be of one kind.
    pub fn convert(&self, to: &Quota, state: State, now: u64) -> State {
        self.algorithm.convert(&to.algorithm, state, now)
    }

    /// Refuses a quota of another kind in place of this one.
    pub fn check_same_kind(&self, other: &Quota) -> Result<()> {
        if self.kind() != other.kind() {
            let (mine, theirs) = (self.kind().name(), other.kind().name());
            return Err(Error::InvalidArgument(format!("a {mine} limiter's quota must stay a {mine}, got a {theirs}")));
        }
        Ok(())
    }

    /// The answer to a new key that finds its store full: denied, until a tracked key can
    /// give its room up, which takes at most the time to fresh.
    pub fn full(&self) -> Decision {
        Decision {
            allowed: false,
            limit: self.limit(),
            remaining: 0,
            reset_after: 0,
            retry_after: Some(self.time_to_fresh()),
            delay: 0,
        }
    }

    /// This quota split between `parts` processes (each gets at least one unit): what one
    /// of them may admit on its own while the store they share is out of reach.
    pub fn share(&self, parts: u64) -> Result<Quota> {
        if parts == 0 {
            return Err(Error::InvalidArgument("a quota is shared by at least 1 process, got 0".into()));
        }
        let rate = self.rate();
        let per = Rate::new((rate.count / parts).max(1), rate.period_ns)?;
        let burst = (!self.kind().is_window()).then(|| (self.limit() / parts).max(1));
        Quota::new(self.kind(), per, burst, self.align_ns().unwrap_or(0))
    }

    /// What the Redis scripts take for this quota.
    pub fn script_args(&self) -> ScriptArgs {
        let micros = if self.kind().is_window() { self.period_micros() } else { self.interval_micros() };
        ScriptArgs {
            algorithm: self.kind().script(),
            micros: python_float_repr(micros),
            capacity: self.limit().to_string(),
        }
    }

    /// The period in microseconds, computed as the Redis backend has always computed it
    /// (its keys are named with it).
    fn period_micros(&self) -> f64 {
        self.rate().period_ns as f64 / NANOS as f64 * 1e6
    }

    fn interval_micros(&self) -> f64 {
        self.period_micros() / self.rate().count as f64
    }

    /// The name of this quota's keys on Redis when the limiter is given no name, such as
    /// `tb-100-60000000.0-100`: limiters with different quotas never share keys.
    pub fn redis_id(&self) -> String {
        let short = match self.kind() {
            Kind::TokenBucket => "tb",
            Kind::LeakyBucket => "lb",
            Kind::FixedWindow => "fw",
            Kind::SlidingWindow => "sw",
        };
        let rate = self.rate();
        let period = python_float_repr(self.period_micros());
        let mut id = if self.kind().is_window() {
            format!("{short}-{}-{period}", rate.count)
        } else {
            format!("{short}-{}-{period}-{}", rate.count, self.limit())
        };
        if let Some(phase) = self.phase_ns().filter(|&p| p != 0) {
            id += &format!("-a{phase}");
        }
        id
    }

    /// What a limiter's keys are salted with in a shared-memory store: quotas that count
    /// differently never share keys. Part of the store's layout (version 2): changing it
    /// would orphan every key of a store opened by another build.
    pub fn shared_memory_id(&self) -> String {
        let rate = self.rate();
        let mut id = format!("{}|{}|{}|{}", self.kind().name(), rate.count, rate.period_ns, self.limit());
        if let Some(phase) = self.phase_ns() {
            id += &format!("|{phase}");
        }
        id
    }
}

/// Two quotas are equal when they count alike: same kind, rate, capacity and windows
/// (whatever clock they are bound to).
impl PartialEq for Quota {
    fn eq(&self, other: &Quota) -> bool {
        self.kind() == other.kind()
            && self.rate() == other.rate()
            && self.limit() == other.limit()
            && self.phase_ns() == other.phase_ns()
    }
}

impl Eq for Quota {}

impl std::hash::Hash for Quota {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.kind(), self.rate(), self.limit(), self.phase_ns()).hash(state)
    }
}

/// `token bucket 100/minute`: what logs call it.
impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind().name(), self.rate())
    }
}

/// A float as Python's `repr` writes it: the shortest digits that read back as the same
/// float, in positional notation from 1e-4 up to 1e16 (with ".0" when whole) and in
/// scientific notation (`1e+16`, `2.5e-05`) outside. The Redis backend's key names
/// were always written by Python; this writes the same names.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // How many digits the shortest round trip takes, from Rust's `{:e}`; which digits, from
    // the exact value rounded half to even to that many, as Python picks them when two
    // strings of that length are equally close ("...45.25" is "...45.2", not "...45.3").
    let shortest = format!("{:e}", x.abs());
    let length = shortest.split_once('e').map_or(1, |(m, _)| m.chars().filter(char::is_ascii_digit).count());
    let scientific = format!("{:.*e}", length - 1, x.abs());
    let (mantissa, exp) = scientific.split_once('e').expect("`{:e}` writes an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` writes an integer exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    // The value is 0.<digits> x 10^point.
    let point = exp + 1;
    let body = if !(-4 < point && point <= 16) {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        format!("{first}{dot}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.unsigned_abs())
    } else if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        let (whole, frac) = digits.split_at(point as usize);
        format!("{whole}.{frac}")
    };
    if x < 0.0 {
        format!("-{body}")
    } else {
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(kind: Kind, rate: &str, burst: Option<u64>) -> Quota {
        Quota::new(kind, Rate::parse(rate).unwrap(), burst, 0).unwrap()
    }

    #[test]
    fn validates_itself() {
        assert_eq!(q(Kind::TokenBucket, "100/minute", None).limit(), 100);
        assert_eq!(q(Kind::LeakyBucket, "100/minute", Some(7)).limit(), 7);
        let no_burst = Quota::new(Kind::FixedWindow, Rate::parse("5/s").unwrap(), Some(3), 0).unwrap_err();
        assert_eq!(no_burst.to_string(), "a fixed window has no burst: its limit is the rate's count");
        assert!(Quota::new(Kind::TokenBucket, Rate::parse("5/s").unwrap(), Some(0), 0).is_err());
        assert!(Quota::new(Kind::SlidingWindow, Rate::new(1 << 41, NANOS).unwrap(), None, 0).is_err());
        assert!(Quota::new(Kind::FixedWindow, Rate::parse("5/s").unwrap(), None, i64::MAX).is_err());
        assert_eq!(Kind::parse("sliding_window").unwrap(), Kind::SlidingWindow);
        assert!(Kind::parse("gcra").unwrap_err().to_string().contains("'token_bucket'"));
        assert_eq!(Kind::from_script("leaky").unwrap(), Kind::LeakyBucket);
        assert!(Kind::from_script("token_bucket").is_err());
    }

    #[test]
    fn names_itself() {
        let tb = q(Kind::TokenBucket, "100/minute", Some(20));
        assert_eq!(tb.to_string(), "token bucket 100/minute");
        assert_eq!(tb.redis_id(), "tb-100-60000000.0-20");
        assert_eq!(tb.shared_memory_id(), "token bucket|100|60000000000|20");
        assert_eq!(tb.restore_ns(), 12 * NANOS, "20 units at 100/minute");
        let sw = q(Kind::SlidingWindow, "7/day", None);
        assert_eq!(sw.redis_id(), "sw-7-86400000000.0");
        assert_eq!(sw.shared_memory_id(), "sliding window|7|86400000000000|7|0");
        assert_eq!(sw.restore_ns(), 86_400 * NANOS);
        let aligned = Quota::new(Kind::FixedWindow, Rate::parse("1/h").unwrap(), None, -(NANOS as i64)).unwrap();
        assert_eq!(aligned.redis_id(), "fw-1-3600000000.0-a3599000000000");
        assert_eq!(aligned.shared_memory_id(), "fixed window|1|3600000000000|1|3599000000000");
        assert_eq!(q(Kind::LeakyBucket, "1/250us", None).redis_id(), "lb-1-250.0-1");
    }

    #[test]
    fn equal_when_counting_alike() {
        let day = Rate::parse("3/day").unwrap();
        let a = Quota::new(Kind::FixedWindow, day, None, 3600 * NANOS as i64).unwrap();
        let b = Quota::new(Kind::FixedWindow, day, None, (3600 - 86_400) * NANOS as i64).unwrap().bound(12_345);
        assert_eq!(a, b, "an alignment a whole period away, on another clock");
        assert_ne!(a, Quota::new(Kind::SlidingWindow, day, None, 3600 * NANOS as i64).unwrap());
        assert_ne!(q(Kind::TokenBucket, "10/s", None), q(Kind::TokenBucket, "10/s", Some(11)));
        let with = a.with_rate(Rate::parse("5/day").unwrap(), None).unwrap();
        assert_eq!((with.kind(), with.align_ns(), with.limit()), (Kind::FixedWindow, Some(3600 * NANOS as i64), 5));
        assert!(a.check_same_kind(&with).is_ok());
        let err = a.check_same_kind(&q(Kind::TokenBucket, "1/s", None)).unwrap_err().to_string();
        assert_eq!(err, "a fixed window limiter's quota must stay a fixed window, got a token bucket");
    }

    #[test]
    fn script_args_round_trip() {
        let tb = q(Kind::TokenBucket, "100/minute", Some(20));
        let args = tb.script_args();
        assert_eq!(args, ScriptArgs { algorithm: "gcra", micros: "600000.0".into(), capacity: "20".into() });
        let back = Quota::from_script_args("gcra", 600000.0, 20).unwrap();
        assert_eq!((back.rate(), back.limit()), (Rate::new(20, 12 * NANOS).unwrap(), 20));
        let fw = q(Kind::FixedWindow, "10/s", None);
        assert_eq!(fw.script_args().micros, "1000000.0");
        assert_eq!(Quota::from_script_args("fixed", 1e6, 10).unwrap(), fw);
        assert_eq!(q(Kind::TokenBucket, "3/s", None).script_args().micros, "333333.3333333333");
        assert!(Quota::from_script_args("nope", 1.0, 1).is_err());
        assert!(Quota::from_script_args("gcra", f64::NAN, 1).is_err());
    }

    #[test]
    fn shares_keep_at_least_one_unit() {
        let tb = q(Kind::TokenBucket, "100/minute", Some(20));
        let share = tb.share(3).unwrap();
        assert_eq!((share.rate(), share.limit()), (Rate::new(33, 60 * NANOS).unwrap(), 6));
        let tiny = q(Kind::SlidingWindow, "2/s", None).share(5).unwrap();
        assert_eq!((tiny.kind(), tiny.limit()), (Kind::SlidingWindow, 1));
        assert!(tb.share(0).is_err());
    }

    #[test]
    fn full_store_answer() {
        let d = q(Kind::TokenBucket, "1/minute", Some(5)).full();
        assert!(!d.allowed);
        assert_eq!((d.limit, d.remaining, d.retry_after), (5, 0, Some(300 * NANOS)));
    }

    #[test]
    fn floats_read_as_python_writes_them() {
        for (x, want) in [
            (600000.0, "600000.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1234567890123456.7, "1234567890123456.8"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (2.5e-7, "2.5e-07"),
            (1.5e300, "1.5e+300"),
            (333333.3333333333, "333333.3333333333"),
            (-12.5, "-12.5"),
            (0.0, "0.0"),
            (123.0, "123.0"),
            (86400000000.0, "86400000000.0"),
            (3.1557600000000003e15, "3155760000000000.5"),
            (1125899907370045.0 + 0.25, "1125899907370045.2"),
            (2.5e-5, "2.5e-05"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x:e}");
        }
        assert_eq!(python_float_repr(f64::INFINITY), "inf");
        assert_eq!(python_float_repr(f64::NAN), "nan");
    }
}
