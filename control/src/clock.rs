//! Time arithmetic that cannot panic. The control thread, the health checker, DNS
//! discovery and the log sinks compute their deadlines here: `Instant + Duration` panics
//! when the sum is beyond what the clock can hold, and a configured duration must never
//! take a thread down (validation bounds them too, at `config::MAX_DURATION`).

use std::time::{Duration, Instant};

/// How far away a deadline that the clock cannot hold is put: never reached in practice.
pub const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `now + d`, saturating at [`FAR_FUTURE`] from `now` (or `now` itself, should even that
/// not fit).
pub fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).or_else(|| now.checked_add(FAR_FUTURE)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_beyond_the_clock_saturates() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::from_secs(3)), now + Duration::from_secs(3));
        assert!(after(now, Duration::MAX) >= now + Duration::from_secs(365 * 86_400));
    }
}
