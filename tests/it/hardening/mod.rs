//! Issue 5: crash safety, faults and bad input. These tests run the real binary where the
//! behaviour under test belongs to the process (signals, `kill -9`, exit codes, logs).

mod bad_input;
mod disk_full;
pub(crate) mod proc;
mod security;
mod soak;
mod stop;
