//! Owns the fake's injected latency: a sleep precise to microseconds.
//!
//! tokio's timer works in millisecond slots and its wake-ups come up to a millisecond or two late.
//! Measured with callferry-bench: a 20 ms latency made a request take 22.3 ms, and the
//! benchmark then counted the fake's lateness against the client under test ("nothing of ours adds
//! to the wait"). A timerfd wakes the runtime's epoll at the requested instant.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

fn armed_timer(d: Duration) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls; the descriptor is owned by the OwnedFd from here on.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        },
    };
    // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Sleeps for `d`, to the microsecond. Falls back to tokio's sleep if a timerfd cannot be had.
pub async fn sleep_precisely(d: Duration) {
    if d.is_zero() {
        return;
    }
    let started = tokio::time::Instant::now();
    // SAFETY: the OwnedFd is a valid open timerfd, owned by the AsyncFd until it is dropped, and
    // always returns the same descriptor.
    let timer = armed_timer(d).and_then(|fd| {
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
    });
    let Ok(timer) = timer else {
        return tokio::time::sleep_until(started + d).await;
    };
    loop {
        let Ok(mut ready) = timer.readable().await else {
            return tokio::time::sleep_until(started + d).await;
        };
        let mut expirations = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a buffer of 8.
        let n = unsafe { libc::read(timer.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
        if n == 8 {
            return;
        }
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_wakes_early() {
        // How late it wakes is a benchmark figure (the fake alone at 20 ms latency), not a test.
        for ms in [1, 3, 7] {
            let d = Duration::from_millis(ms);
            let t = std::time::Instant::now();
            sleep_precisely(d).await;
            assert!(t.elapsed() >= d, "{:?} < {d:?}", t.elapsed());
        }
        sleep_precisely(Duration::ZERO).await;
    }
}
