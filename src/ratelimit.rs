//! Owns rate caps shared by many tasks: the upload bandwidth cap (`[upload] max_bytes_per_sec`) and
//! the results follower's request cap (`[results] max_requests_per_sec`). One pacing schedule that
//! every task reserves on, so the sum of their rates stays at the cap.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Paces byte reservations at a fixed rate. A reservation takes the next free slot on a shared
/// timeline and waits until its slot starts; idle time is not saved up beyond `BURST`, so a long
/// pause is not followed by a flood.
pub struct RateLimiter {
    per_sec: f64,
    next_free: Mutex<Instant>,
}

const BURST: Duration = Duration::from_millis(50);

impl RateLimiter {
    /// `per_sec` units (bytes, requests) per second.
    pub fn new(per_sec: f64) -> Self {
        RateLimiter {
            per_sec: if per_sec > 0.0 { per_sec } else { 1.0 },
            next_free: Mutex::new(Instant::now()),
        }
    }

    fn cost(&self, n: u64) -> Duration {
        Duration::from_secs_f64(n as f64 / self.per_sec)
    }

    /// When a reservation of `n` units made at `now` may start.
    fn reserve(&self, n: u64, now: Instant) -> Instant {
        let cost = self.cost(n);
        let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
        *next = start + cost;
        start
    }

    /// Gives back a reservation that will not be used. Its slot goes to whoever reserves next:
    /// reservations already made keep theirs, so over any stretch of time the sum stays at the cap.
    fn release(&self, cost: Duration, now: Instant) {
        let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        *next = next.checked_sub(cost).unwrap_or(now).max(now);
    }

    /// Waits for the turn of `n` units. Cancel-safe: a wait that is dropped (an aborted upload)
    /// releases its reservation, which otherwise would hold back every later caller.
    pub async fn acquire(&self, n: u64) {
        let start = self.reserve(n, Instant::now());
        let mut pending = Pending {
            limiter: self,
            cost: Some(self.cost(n)),
        };
        tokio::time::sleep_until(start.into()).await;
        pending.cost = None;
    }
}

/// A reservation whose turn has not come yet.
struct Pending<'a> {
    limiter: &'a RateLimiter,
    cost: Option<Duration>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(cost) = self.cost.take() {
            self.limiter.release(cost, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_spaced_by_their_cost() {
        let l = RateLimiter::new(1000.0);
        let t0 = Instant::now() + Duration::from_secs(1);
        let a = l.reserve(500, t0);
        let b = l.reserve(500, t0);
        let c = l.reserve(1000, t0);
        assert_eq!(b - a, Duration::from_millis(500));
        assert_eq!(c - b, Duration::from_millis(500));
        // 2000 bytes at 1000 B/s occupy two seconds of the schedule.
        assert_eq!(l.reserve(1, t0) - a, Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_cancelled_wait_releases_its_reservation() {
        let l = RateLimiter::new(1000.0);
        let t0 = Instant::now();
        // The first second of the schedule is taken; the next caller waits for it.
        l.acquire(1000).await;
        let waiting = tokio::time::timeout(Duration::from_millis(20), l.acquire(1000)).await;
        assert!(waiting.is_err(), "the second reservation had to wait");
        // The abandoned second gives its slot back: the next reservation starts after the first
        // one's second, not after a second nobody uses.
        let next = l.reserve(1, Instant::now());
        assert!(
            next < t0 + Duration::from_millis(1500),
            "next slot at +{:?}",
            next - t0
        );
        assert!(next >= t0 + Duration::from_millis(1000) - BURST);
    }

    #[test]
    fn idle_time_is_not_banked_beyond_the_burst() {
        let l = RateLimiter::new(1000.0);
        let later = Instant::now() + Duration::from_secs(60);
        let s = l.reserve(1000, later);
        assert!(s >= later - BURST);
    }
}
