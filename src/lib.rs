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

#[cfg(test)]
mod layout {
    /// The README's Layout tables name every module of the library and of the fake, so a reader
    /// finds each from the file list (the table had fallen behind five modules once).
    #[test]
    fn the_readme_layout_names_every_module() {
        let readme = include_str!("../README.md");
        let layout = readme
            .split("\n## Layout\n")
            .nth(1)
            .expect("README has a Layout section");
        let layout = layout.split("\n## ").next().unwrap_or(layout);
        let modules = |lib: &'static str| {
            lib.lines()
                .filter_map(|l| l.trim_start_matches("pub ").strip_prefix("mod "))
                .filter_map(|l| l.strip_suffix(';'))
                .filter(|m| *m != "tests")
                .collect::<Vec<_>>()
        };
        let ours = modules(include_str!("lib.rs"));
        let fakes = modules(include_str!("../fake-api/src/lib.rs"));
        assert!(ours.len() > 20 && fakes.len() > 5, "{ours:?} {fakes:?}");
        for m in ours.iter().chain(&fakes) {
            assert!(
                layout.contains(&format!("| `{m}`")) || layout.contains(&format!("| `{m}/`")),
                "README's Layout tables do not name the module `{m}`"
            );
        }
    }
}
