//! Admission control: a token bucket on new connections, so a reconnect
//! storm is told to come back later (close 4007 with a jittered
//! `retry_after_ms`) instead of melting the node and everything behind it.

use std::sync::Mutex;
use std::time::Instant;

/// A token bucket shared by every worker of the node.
pub struct Admission {
    /// Tokens added per second; 0 disables admission control.
    rate: f64,
    burst: f64,
    retry_base_ms: u64,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Admission {
    pub fn new(rate: u32, burst: u32, retry_base_ms: u64) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            retry_base_ms,
            state: Mutex::new(Bucket {
                tokens: f64::from(burst.max(1)),
                refilled: Instant::now(),
            }),
        }
    }

    /// Takes a token for a new connection, or says after how many
    /// milliseconds to come back: the time the bucket needs to refill for
    /// everyone already told to wait is unknown, so the hint is the base plus
    /// full jitter over as much again, spreading the retries out.
    pub fn admit(&self, now: Instant) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let Ok(mut bucket) = self.state.lock() else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(self.retry_base_ms + fastrand::u64(0..=self.retry_base_ms))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_rate() {
        let admission = Admission::new(10, 3, 500);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(admission.admit(start).is_ok());
        }
        let retry = admission.admit(start).expect_err("bucket empty");
        assert!((500..=1000).contains(&retry), "{retry}");
        // 100 ms at 10/s is one more token, not two.
        let later = start + Duration::from_millis(100);
        assert!(admission.admit(later).is_ok());
        assert!(admission.admit(later).is_err());
    }

    #[test]
    fn refill_is_capped_at_the_burst() {
        let admission = Admission::new(1000, 2, 10);
        let later = Instant::now() + Duration::from_secs(60);
        assert!(admission.admit(later).is_ok());
        assert!(admission.admit(later).is_ok());
        assert!(admission.admit(later).is_err());
    }

    #[test]
    fn zero_rate_admits_everyone() {
        let admission = Admission::new(0, 0, 10);
        for _ in 0..10_000 {
            assert!(admission.admit(Instant::now()).is_ok());
        }
    }
}
