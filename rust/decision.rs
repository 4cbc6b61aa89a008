//! The answer to a check, and how several answers make one.

/// The outcome of one step. Times are in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The capacity: burst, window limit or queue size.
    pub limit: u64,
    /// Whole units still available after this call.
    pub remaining: u64,
    /// Time until the key is back to its fresh state.
    pub reset_after: u64,
    /// Time until `cost` would be admitted: 0 when allowed, `None` when it never can be
    /// (the cost is above the capacity).
    pub retry_after: Option<u64>,
    /// How long an admitted call should wait before proceeding (leaky bucket only).
    pub delay: u64,
}

impl Decision {
    /// A denial that no wait can turn into an admission (the cost is above the capacity).
    pub fn never(limit: u64, remaining: u64, reset_after: u64) -> Decision {
        Decision { allowed: false, limit, remaining, reset_after, retry_after: None, delay: 0 }
    }

    /// What a limiter in shadow mode answers instead of this denial.
    #[inline]
    pub fn shadow_admitted(self) -> Decision {
        Decision { allowed: true, retry_after: Some(0), ..self }
    }
}

/// The outcome of a check: the decision given and, when a limiter in shadow mode admitted
/// a call it would have denied, the denial it would have given (for the log: its
/// `retry_after` is the one that matters, the admission's is 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    pub decision: Decision,
    pub shadowed: Option<Decision>,
}

impl Checked {
    /// A check that shadow mode did not touch.
    pub fn plain(decision: Decision) -> Checked {
        Checked { decision, shadowed: None }
    }
}

/// Combines the decisions of limits that all apply to one call: admitted only if every
/// one admits; `limit` and `remaining` from the one with the least remaining; the
/// longest `retry_after`, `reset_after` and `delay`.
pub fn combine(decisions: &[Decision]) -> Decision {
    finish(decisions[1..].iter().fold(decisions[0], fold))
}

/// [`combine`] one decision at a time: `fold` each into the first, then `finish`.
#[inline]
pub fn fold(mut out: Decision, d: &Decision) -> Decision {
    out.allowed &= d.allowed;
    if d.remaining < out.remaining {
        out.limit = d.limit;
        out.remaining = d.remaining;
    }
    out.reset_after = out.reset_after.max(d.reset_after);
    out.delay = out.delay.max(d.delay);
    out.retry_after = match (out.retry_after, d.retry_after) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    };
    out
}

/// The last touch of [`combine`]: a denied call has nothing to wait for before proceeding.
#[inline]
pub fn finish(mut out: Decision) -> Decision {
    if !out.allowed {
        out.delay = 0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(limit: u64, remaining: u64, reset_after: u64, delay: u64) -> Decision {
        Decision { allowed: true, limit, remaining, reset_after, retry_after: Some(0), delay }
    }

    #[test]
    fn the_least_remaining_and_the_longest_times_win() {
        let d = combine(&[admit(10, 7, 5, 0), admit(3, 1, 2, 4), admit(100, 50, 9, 1)]);
        assert_eq!(d, admit(3, 1, 9, 4));
        assert_eq!(combine(&[admit(5, 5, 0, 0)]), admit(5, 5, 0, 0));
    }

    #[test]
    fn one_denial_denies_and_never_stays_never() {
        let wait = Decision { allowed: false, limit: 2, remaining: 0, reset_after: 8, retry_after: Some(6), delay: 0 };
        let d = combine(&[admit(10, 7, 5, 3), wait]);
        assert!(!d.allowed);
        assert_eq!((d.limit, d.remaining, d.retry_after, d.delay), (2, 0, Some(6), 0), "a denial waits for nothing");
        let never = Decision::never(1, 1, 0);
        assert_eq!(combine(&[wait, never]).retry_after, None);
        assert_eq!(combine(&[never, wait]).retry_after, None);
    }

    #[test]
    fn shadow_admission_keeps_the_numbers() {
        let wait = Decision { allowed: false, limit: 2, remaining: 0, reset_after: 8, retry_after: Some(6), delay: 0 };
        let a = wait.shadow_admitted();
        assert!(a.allowed);
        assert_eq!((a.limit, a.remaining, a.reset_after, a.retry_after), (2, 0, 8, Some(0)));
        assert_eq!(Checked::plain(a).shadowed, None);
    }
}
