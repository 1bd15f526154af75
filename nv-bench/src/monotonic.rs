//! `CLOCK_MONOTONIC` in nanoseconds: one clock for every process on the host, so `nv-bench`
//! and the `nv-floor` helper it starts can subtract each other's stamps.

pub fn monotonic_ns() -> u128 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `now`, which lives across the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u128 * 1_000_000_000 + now.tv_nsec as u128
}
