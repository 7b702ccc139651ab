//! Client-side request pacing, shared process-wide per GitLab host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

/// Spaces requests at least `interval` apart (no bursts beyond one request).
#[derive(Debug)]
pub(crate) struct RateLimiter {
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    interval: Duration,
    next_free: Option<Instant>,
}

impl RateLimiter {
    fn new(interval: Duration) -> Self {
        Self {
            state: Mutex::new(LimiterState {
                interval,
                next_free: None,
            }),
        }
    }

    #[cfg(test)]
    fn interval(&self) -> Duration {
        self.lock().interval
    }

    /// Waits for this request's slot.
    pub(crate) async fn acquire(&self) {
        let slot = {
            let mut state = self.lock();
            let now = Instant::now();
            let slot = state.next_free.map_or(now, |next| next.max(now));
            state.next_free = Some(slot + state.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    fn slow_down_to(&self, interval: Duration) {
        let mut state = self.lock();
        state.interval = state.interval.max(interval);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LimiterState> {
        // The state stays consistent even if a holder panicked: it is two plain values.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

type Registry = Mutex<HashMap<String, Weak<RateLimiter>>>;

fn registry() -> &'static Registry {
    static LIMITERS: OnceLock<Registry> = OnceLock::new();
    LIMITERS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The limiter of `host`, created on first use; `None` when `requests_per_second` is not a
/// positive finite number. Clients of the same host share one limiter at the lowest rate any
/// of them asked for; it is dropped with the last client.
pub(crate) fn limiter_for(
    host: &str,
    requests_per_second: Option<f64>,
) -> Option<Arc<RateLimiter>> {
    let rate = requests_per_second.filter(|rate| rate.is_finite() && *rate > 0.0)?;
    let interval = Duration::from_secs_f64((1.0 / rate).min(3600.0));
    let mut limiters = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    limiters.retain(|_, limiter| limiter.strong_count() > 0);
    if let Some(existing) = limiters.get(host).and_then(Weak::upgrade) {
        existing.slow_down_to(interval);
        return Some(existing);
    }
    let limiter = Arc::new(RateLimiter::new(interval));
    limiters.insert(host.to_owned(), Arc::downgrade(&limiter));
    Some(limiter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_host_shares_one_limiter_at_the_lowest_rate() {
        let first = limiter_for("shared.example:443", Some(10.0)).expect("limiter");
        let second = limiter_for("shared.example:443", Some(2.0)).expect("limiter");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first.interval(), Duration::from_millis(500));
        let third = limiter_for("shared.example:443", Some(100.0)).expect("limiter");
        assert_eq!(third.interval(), Duration::from_millis(500));
        let other = limiter_for("other.example:443", Some(10.0)).expect("limiter");
        assert!(!Arc::ptr_eq(&first, &other));
    }

    #[test]
    fn no_limit_without_a_positive_rate() {
        assert!(limiter_for("none.example:443", None).is_none());
        assert!(limiter_for("none.example:443", Some(0.0)).is_none());
        assert!(limiter_for("none.example:443", Some(f64::NAN)).is_none());
    }

    #[test]
    fn dropped_limiters_are_forgotten() {
        let first = limiter_for("dropped.example:443", Some(1.0)).expect("limiter");
        drop(first);
        let second = limiter_for("dropped.example:443", Some(4.0)).expect("limiter");
        assert_eq!(second.interval(), Duration::from_millis(250));
    }

    // A lower bound only: a slow machine can make it longer, never shorter.
    #[tokio::test]
    async fn requests_are_spaced_by_the_interval() {
        let limiter = RateLimiter::new(Duration::from_millis(40));
        let start = Instant::now();
        limiter.acquire().await;
        limiter.acquire().await;
        limiter.acquire().await;
        assert!(Instant::now() - start >= Duration::from_millis(80));
    }
}
