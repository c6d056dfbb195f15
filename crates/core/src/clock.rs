//! The service clock. Everything the service dates (default and effective expiry, lastModified,
//! state transition times) reads it; authentication freshness never does (it uses the wall clock).

use std::sync::atomic::{AtomicI64, Ordering};
use time::{Duration, OffsetDateTime};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> OffsetDateTime;
}

/// Wall-clock time plus an offset that only moves forward: the emulator's time-travel control.
/// With a zero offset it is the wall clock. The service stores the offset, so it survives a
/// restart; only an explicit reset puts it back to zero.
#[derive(Debug, Default)]
pub struct ServiceClock {
    offset_nanos: AtomicI64,
}

impl ServiceClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by` (negative durations are ignored: time never runs back,
    /// so expiry that has happened stays happened).
    pub fn advance(&self, by: Duration) {
        let nanos = by.whole_nanoseconds().clamp(0, i64::MAX as i128) as i64;
        // Saturating: an offset at the limit (about 292 years) stays there, never wraps back.
        let _ = self
            .offset_nanos
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| {
                Some(o.saturating_add(nanos))
            });
    }

    /// Sets the offset outright: restoring a stored offset at start-up, or `ZERO` to go back to
    /// the wall clock (`bluebatch clock reset`). Negative offsets count as zero.
    pub fn set_offset(&self, offset: Duration) {
        let nanos = offset.whole_nanoseconds().clamp(0, i64::MAX as i128) as i64;
        self.offset_nanos.store(nanos, Ordering::SeqCst);
    }

    pub fn offset(&self) -> Duration {
        Duration::nanoseconds(self.offset_nanos.load(Ordering::SeqCst))
    }
}

impl Clock for ServiceClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc() + self.offset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_moves_forward_only() {
        let c = ServiceClock::new();
        let before = c.now();
        c.advance(Duration::days(2));
        c.advance(Duration::days(-5));
        let after = c.now();
        assert!(after - before >= Duration::days(2));
        assert!(after - before < Duration::days(2) + Duration::minutes(1));
    }

    #[test]
    fn advance_saturates_instead_of_wrapping() {
        let c = ServiceClock::new();
        c.advance(Duration::weeks(1_000_000));
        c.advance(Duration::weeks(1_000_000));
        assert_eq!(c.offset(), Duration::nanoseconds(i64::MAX));
        assert!(c.now() > OffsetDateTime::now_utc());
    }

    #[test]
    fn set_offset_restores_and_resets() {
        let c = ServiceClock::new();
        c.set_offset(Duration::days(5));
        assert_eq!(c.offset(), Duration::days(5));
        c.set_offset(Duration::days(-1));
        assert_eq!(c.offset(), Duration::ZERO);
    }
}
