//! callferry: ferries call recordings from a recorder's disk into ElevateAI speech analytics.
//!
//! The daemon is [`app::run`]; the command line is parsed and dispatched by [`cli`], and `main.rs`
//! only hands over its exit code. See ARCHITECTURE.md for the flow (watcher → queue → workers →
//! API → queue) and its invariants.

pub mod api;
pub mod app;
pub mod calls;
pub mod cli;
pub mod clock;
pub mod completeness;
pub mod config;
pub mod demo;
pub mod dispose;
pub mod filestream;
pub mod forget;
pub mod gate;
pub mod health;
pub mod hook;
pub mod metrics;
pub mod monitor;
pub mod pgcluster;
pub mod policy;
pub mod queue;
pub mod ratelimit;
pub mod results;
pub mod retry;
pub mod safefs;
pub mod secret;
pub mod shared;
pub mod status;
pub mod systemd;
pub mod wake;
pub mod watch;
pub mod watcher;
pub mod watchmetrics;
pub mod worker;
