//! Owns the recorder's end-of-call hook: `callferry enqueue --now [--external-id ID] [--meta K=V]…
//! FILE`, run by Asterisk's MixMonitor post-command or FreeSWITCH's record-stop hook, and the
//! daemon's side of it.
//!
//! The hook runs as the recorder's user (`asterisk`, `freeswitch`), which can open neither the
//! queue (0600, the service's) nor, preferably, the configuration (it may hold the token). So the
//! hook writes a small request into a drop folder the daemon owns (`[watch] hook_dir`, by default
//! [`DEFAULT_DIR`], which the hook finds without the configuration: `--hook-dir`, then
//! [`DIR_ENV`], then the default). The folder is `callferry:callferry-hook`, mode 3730: the group
//! may create files in it but not list it (nor, thanks to the sticky bit, remove or replace
//! another's request); new files get the group (setgid).
//!
//! A request is written whole under a temporary name the daemon ignores (`.tmp-…`), flushed, and
//! renamed to `<uuid>.req`. The daemon trusts nothing in it: it opens it without following links,
//! takes only a small regular file with one link, checks its JSON strictly (shape, sizes,
//! characters), takes the path only below a watched folder (the recording is opened from there
//! one component at a time without following links, `safefs`), gives the recording the watcher's
//! checks minus the settle wait, and queues it with the call in one transaction
//! (`Queue::enqueue_hooked`), so the watcher finding the same file is the same job and one
//! declare. Then the request is removed. A refused request is a warning that says why, and is
//! removed; it is never retried forever. Values are data: nothing here runs a shell, and they
//! reach the declare byte for byte.
//!
//! The parts: [`request`] is the request's format and its rules (the same on both sides),
//! [`submit`] the hook's side (the CLI), [`intake`] the daemon's (the drop folder and what becomes
//! of each request), [`vet`] the daemon's look at one request and its recording.

mod intake;
mod request;
mod submit;
#[cfg(test)]
mod tests;
mod vet;

pub use intake::run;
pub use request::{
    DecodeError, HookCall, Request, RequestError, apply_to_declare, check_key, percent_decode,
};
pub use submit::{SubmitError, hook_dir, submit};

/// The drop folder, when neither `--hook-dir` nor [`DIR_ENV`] names another. Its home is the
/// config (the default of `[watch] hook_dir`), which must not import the hook.
pub use crate::config::DEFAULT_HOOK_DIR as DEFAULT_DIR;
/// The environment variable the hook reads its drop folder from.
pub const DIR_ENV: &str = "CALLFERRY_HOOK_DIR";
/// The group whose members may drop requests (the recorder's user joins it).
pub const GROUP: &str = "callferry-hook";
/// A request's largest size: far above what the limits below allow, far below anything costly.
pub const MAX_REQUEST: u64 = 128 * 1024;
/// `--meta` pairs per request.
pub const MAX_PAIRS: usize = 32;
/// Bytes in a `--meta` key (its dotted sections included).
pub const MAX_KEY: usize = 128;
/// Bytes in a `--meta` value.
pub const MAX_VALUE: usize = 1024;
/// Bytes in an external id.
pub const MAX_ID: usize = 256;
const SUFFIX: &str = ".req";
const TEMP_PREFIX: &str = ".tmp-";
