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

    /// When a reservation of `n` units made at `now` may start.
    fn reserve(&self, n: u64, now: Instant) -> Instant {
        let cost = Duration::from_secs_f64(n as f64 / self.per_sec);
        let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
        *next = start + cost;
        start
    }

    pub async fn acquire(&self, n: u64) {
        let start = self.reserve(n, Instant::now());
        tokio::time::sleep_until(start.into()).await;
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

    #[test]
    fn idle_time_is_not_banked_beyond_the_burst() {
        let l = RateLimiter::new(1000.0);
        let later = Instant::now() + Duration::from_secs(60);
        let s = l.reserve(1000, later);
        assert!(s >= later - BURST);
    }
}
