//! One integration-test binary: the daemon runs in-process against the project's fake ElevateAI,
//! on temp dirs; the CLI tests run the built binary.

mod adversary_fs;
mod bench_smoke;
mod calls;
mod chaos;
mod cli;
mod durability;
mod flow;
mod forget;
mod fsopen;
mod hardening;
mod helpers;
mod history;
mod hook;
mod hostile_server;
mod hung;
mod ops;
mod pg_bench;
mod pg_daemon;
mod pg_queue;
mod pg_soak;
mod pipeline;
mod recorders;
mod results;
mod roots;
mod sources;
