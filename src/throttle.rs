//! One event let through at most once a period, from any number of
//! threads, without a lock: the WARN about dropped access-log lines, and
//! pingora's ERROR line for a failed accept().

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Timed by the monotonic clock: by the wall clock, a clock stepped back
/// (NTP, a VM resumed) would silence the events for as long as the step.
pub struct Throttle {
    origin: Instant,
    every: Duration,
    /// Milliseconds from `origin` to the last event let through, plus one;
    /// 0: none yet.
    last: AtomicU64,
}

impl Throttle {
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            origin: Instant::now(),
            every,
            last: AtomicU64::new(0),
        }
    }

    /// Whether an event may come now; if so, it is counted as come.
    pub fn due(&self) -> bool {
        self.due_at(Instant::now())
    }

    /// Whether an event may come at `now`; if so, it is counted as come.
    pub fn due_at(&self, now: Instant) -> bool {
        let since_origin = now.saturating_duration_since(self.origin).as_millis();
        let now = u64::try_from(since_origin).unwrap_or(u64::MAX - 1) + 1;
        let last = self.last.load(Ordering::Relaxed);
        let every = u64::try_from(self.every.as_millis()).unwrap_or(u64::MAX);
        (last == 0 || now >= last.saturating_add(every))
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event at once, then none until `every` has passed.
    #[test]
    fn an_event_comes_at_most_once_a_period() {
        let every = Duration::from_secs(10);
        let throttle = Throttle::new(every);
        let start = Instant::now();
        assert!(throttle.due_at(start), "the first event comes at once");
        assert!(!throttle.due_at(start + every / 2));
        assert!(!throttle.due_at(start + every - Duration::from_millis(1)));
        assert!(throttle.due_at(start + every));
        assert!(!throttle.due_at(start + every + Duration::from_secs(1)));
        assert!(throttle.due_at(start + every * 2));
    }
}
