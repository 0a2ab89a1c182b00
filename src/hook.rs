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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock::now_ms;
use crate::completeness::{
    Decision, NameRules, NameSkip, Pending, Timing, gather_facts, judge, observe,
};
use crate::config::Config;
use crate::queue::{Hooked, NewJob, Queue, decode_path, encode_path};
use crate::watch::Roots;

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
/// Sections of a dotted key (`agent.extension` has two).
const MAX_DEPTH: usize = 4;
const SUFFIX: &str = ".req";
const TEMP_PREFIX: &str = ".tmp-";
/// A request whose recording is still being written (a writer holds it open, or its header is not
/// final yet) is looked at again every second for this long, then refused; the watcher still
/// queues the recording once it is complete, without the hook's call.
const PATIENCE: Duration = Duration::from_secs(120);
/// A temporary file a hook left behind (it died between create and rename) is removed after this.
const STALE_TEMP: Duration = Duration::from_secs(3600);
/// The drop folder is listed this often even without an event (a lost one, or no inotify).
const RESCAN: Duration = Duration::from_secs(30);
/// How often a missing drop folder is looked for.
const MISSING_RECHECK: Duration = Duration::from_secs(10);

/// One request, as the hook writes it and the daemon reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Always 1 for now; a daemon refuses a version it does not know.
    pub version: u32,
    /// The recording, absolute, stored as the queue stores paths (lossless text, `queue::paths`).
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// `--meta` pairs; a dotted key is a section (`agent.extension` → `{"agent":{"extension":…}}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
}

/// What the hook says about a call, as kept on its job (the `hook` column) until its declare.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HookCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
}

/// Applies the hook's call to a declare built from the name and sidecar: its id always, its
/// metadata only with `[declare] send_metadata` (like the rest). The hook wins over the name and
/// the sidecar: it is the recorder's own word about this call, given as the call ends. Metadata
/// is merged section by section, so `--meta agent.name=…` keeps the name's `agent.extension`.
pub fn apply_to_declare(h: &HookCall, req: &mut crate::api::DeclareRequest, send_metadata: bool) {
    if let Some(id) = &h.external_id {
        req.external_identifier = Some(id.clone());
    }
    if send_metadata && !h.metadata.is_empty() {
        merge(req.metadata.get_or_insert_with(Map::new), &h.metadata);
    }
}

fn merge(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

fn check_text(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{what} is {} bytes, more than {max}", s.len()));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{what} contains a control character (U+{:04X})",
            c as u32
        ));
    }
    Ok(())
}

/// A `--meta` key: sections of ASCII letters, digits, `_` and `-`, joined by dots.
pub fn check_key(k: &str) -> Result<(), String> {
    let ok_section = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if k.len() > MAX_KEY {
        return Err(format!(
            "meta key {k:?} is {} bytes, more than {MAX_KEY}",
            k.len()
        ));
    }
    let sections: Vec<&str> = k.split('.').collect();
    if !sections.iter().all(|s| ok_section(s)) || sections.len() > MAX_DEPTH {
        return Err(format!(
            "meta key {k:?} must be letters, digits, '_' and '-', in at most {MAX_DEPTH} \
             sections joined by dots (e.g. caller, agent.extension)"
        ));
    }
    Ok(())
}

impl Request {
    pub fn new(path: &Path, external_id: Option<String>, meta: BTreeMap<String, String>) -> Self {
        Request {
            version: 1,
            path: encode_path(path).into_owned(),
            external_id,
            meta,
        }
    }

    /// The recording's path, byte for byte.
    pub fn path(&self) -> PathBuf {
        decode_path(&self.path)
    }

    /// Every rule a request must keep, the same in the hook (usage errors) and the daemon.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != 1 {
            return Err(format!(
                "request version {} is not known to this daemon (1 is); update callferry",
                self.version
            ));
        }
        let path = self.path();
        if !path.is_absolute() {
            return Err(format!("the path {} is not absolute", path.display()));
        }
        if path.as_os_str().len() > libc::PATH_MAX as usize {
            return Err("the path is longer than PATH_MAX".into());
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(format!("the path {} contains `..`", path.display()));
        }
        if let Some(id) = &self.external_id {
            check_text("the external id", id, MAX_ID)?;
            if id.trim().is_empty() {
                return Err("the external id is empty".into());
            }
        }
        if self.meta.len() > MAX_PAIRS {
            return Err(format!(
                "{} meta pairs, more than {MAX_PAIRS}",
                self.meta.len()
            ));
        }
        for (k, v) in &self.meta {
            check_key(k)?;
            check_text(&format!("the value of meta key {k}"), v, MAX_VALUE)?;
        }
        self.metadata().map(|_| ())
    }

    /// The `--meta` pairs in ElevateAI's shape: dotted keys become sections.
    pub fn metadata(&self) -> Result<Map<String, Value>, String> {
        let mut m = Map::new();
        // Sorted: a key comes before its own sections ("agent" < "agent.id").
        for (key, value) in &self.meta {
            let mut parts: Vec<&str> = key.split('.').collect();
            let last = parts.pop().unwrap_or_default();
            let mut at = &mut m;
            for p in parts {
                let slot = at
                    .entry(p.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                at = slot
                    .as_object_mut()
                    .ok_or_else(|| format!("meta key {key}: {p} is given a value of its own"))?;
            }
            if at.get(last).is_some_and(Value::is_object) {
                return Err(format!("meta key {key} is also a section of other keys"));
            }
            at.insert(last.to_string(), Value::String(value.clone()));
        }
        Ok(m)
    }

    pub fn call(&self) -> HookCall {
        HookCall {
            external_id: self.external_id.clone(),
            metadata: self.metadata().unwrap_or_default(),
        }
    }
}

/// Decodes `%XX` escapes (`--urlencoded`): what FreeSWITCH's `url_encode` and Asterisk's
/// `URIENCODE` give, so a value with spaces (or nothing) stays one argument where a hook splits
/// its arguments on spaces (FreeSWITCH's `luarun`). Both leave `$`, `(` and `'` as they are: not a
/// shell's quoting. `+` stays `+` (phone numbers).
pub fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{s:?}: '%' must be followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// Where the hook drops its request: `--hook-dir`, else [`DIR_ENV`], else [`DEFAULT_DIR`].
pub fn hook_dir(arg: Option<&Path>, env: &BTreeMap<String, String>) -> PathBuf {
    arg.map(Path::to_path_buf)
        .or_else(|| {
            env.get(DIR_ENV)
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// Why a request could not be written.
#[derive(Debug)]
pub enum SubmitError {
    /// The drop folder is missing or not writable by this user: an admin's to fix (exit 78).
    Setup(String),
    /// Anything else (a full disk, an I/O error): exit 1.
    Failed(String),
}

fn who() -> String {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut res: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to memory we own, sized as passed.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut res) };
    if rc == 0 && !res.is_null() {
        // SAFETY: getpwuid_r filled pw_name with a NUL-terminated string inside `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
        return name.to_string_lossy().into_owned();
    }
    format!("uid {uid}")
}

fn setup_advice(dir: &Path) -> String {
    format!(
        "as root: install -d -o callferry -g {GROUP} -m 3730 {d} (the package does this), and \
         usermod -aG {GROUP} {user}, then restart the recorder so it runs with the new group",
        d = dir.display(),
        user = who(),
    )
}

/// Writes `req` into `dir` durably: a temporary name, flushed, renamed to `<uuid>.req`, and the
/// rename flushed. Returns the request's path.
///
/// The folder cannot be opened by the group (it is not listable), so its entry is made durable by
/// flushing the renamed file once more: the rename changes the file's ctime, which puts the new
/// entry in the journal commit that this fsync waits for (ext4, XFS, btrfs). Where the folder can
/// be opened (root, another layout) it is flushed too.
pub fn submit(dir: &Path, req: &Request) -> Result<PathBuf, SubmitError> {
    let body = serde_json::to_vec(req).map_err(|e| SubmitError::Failed(e.to_string()))?;
    if body.len() as u64 > MAX_REQUEST {
        return Err(SubmitError::Failed(format!(
            "the request would be {} bytes, more than {MAX_REQUEST}",
            body.len()
        )));
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(SubmitError::Setup(format!(
                "the hook folder {} is not a folder; {}",
                dir.display(),
                setup_advice(dir)
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SubmitError::Setup(format!(
                "the hook folder {} does not exist; {} (a daemon with another [watch] hook_dir \
                 needs the same --hook-dir or {DIR_ENV} here)",
                dir.display(),
                setup_advice(dir)
            )));
        }
        Err(e) => {
            return Err(SubmitError::Setup(format!(
                "{} cannot reach the hook folder {}: {e}; {}",
                who(),
                dir.display(),
                setup_advice(dir)
            )));
        }
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tmp = dir.join(format!("{TEMP_PREFIX}{id}"));
    let fin = dir.join(format!("{id}{SUFFIX}"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                SubmitError::Setup(format!(
                    "{} cannot write into the hook folder {}: {e}; {}",
                    who(),
                    dir.display(),
                    setup_advice(dir)
                ))
            }
            _ => SubmitError::Failed(format!("cannot create {}: {e}", tmp.display())),
        })?;
    let written = (|| {
        // The daemon reads it as another user; a recorder's umask (027) must not hide it. Only
        // the folder's owner and group can reach it anyway.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &fin)?;
        f.sync_all()?;
        if let Ok(d) = std::fs::File::open(dir) {
            d.sync_all()?;
        }
        Ok::<(), std::io::Error>(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&fin);
        return Err(SubmitError::Failed(format!(
            "cannot write the request into {}: {e}",
            dir.display()
        )));
    }
    Ok(fin)
}

/// Reads one request, trusting nothing: no link followed, a regular file with one link (a hard
/// link to someone else's file is not a request), at most [`MAX_REQUEST`] bytes, strict JSON.
/// Returns its owner's uid (once known) and it.
fn read_request(dir: &Path, name: &OsStr) -> (Option<u32>, Result<Request, String>) {
    let mut uid = None;
    let r = read_request_as(dir, name, &mut uid);
    (uid, r)
}

fn read_request_as(dir: &Path, name: &OsStr, uid: &mut Option<u32>) -> Result<Request, String> {
    let p = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&p)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => "it is a symbolic link".to_string(),
            _ => format!("cannot open it: {e}"),
        })?;
    let m = f.metadata().map_err(|e| format!("cannot stat it: {e}"))?;
    *uid = Some(m.uid());
    if !m.is_file() {
        return Err("it is not a regular file".into());
    }
    if m.nlink() != 1 {
        return Err(format!(
            "it has {} hard links (a request has one)",
            m.nlink()
        ));
    }
    if m.len() > MAX_REQUEST {
        return Err(format!(
            "it is {} bytes, more than the {MAX_REQUEST} a request may be",
            m.len()
        ));
    }
    let mut body = Vec::with_capacity(m.len() as usize);
    f.take(MAX_REQUEST + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if body.len() as u64 > MAX_REQUEST {
        return Err(format!("it grew past {MAX_REQUEST} bytes"));
    }
    let req: Request = serde_json::from_slice(&body).map_err(|e| {
        let mut why = e.to_string();
        why.truncate(200);
        format!("it is not a valid request: {why}")
    })?;
    req.validate()?;
    Ok(req)
}

/// The watched folder `path` is below, and the path as the watcher names it (below that folder as
/// configured). A path through a watched folder's real location (the folder is a link) is named
/// through the link, so the watcher and the hook find one job.
async fn locate(cfg: &Config, roots: &Roots, path: &Path) -> Result<(PathBuf, PathBuf), String> {
    let watched = &cfg.watch.paths;
    let recursive = cfg.watch.recursive;
    if let Some(r) = crate::watcher::root_of(watched, path, recursive) {
        return Ok((r.clone(), path.to_path_buf()));
    }
    for r in watched {
        let rr = r.clone();
        let Ok(Ok(real)) = roots
            .get(r)
            .scan
            .run(move |_| std::fs::canonicalize(&rr))
            .await
        else {
            continue;
        };
        if let Ok(rel) = path.strip_prefix(&real)
            && !rel.as_os_str().is_empty()
        {
            let named = r.join(rel);
            if let Some(root) = crate::watcher::root_of(watched, &named, recursive) {
                return Ok((root.clone(), named));
            }
        }
    }
    Err(format!(
        "{} is not inside a watched folder ({}{})",
        path.display(),
        watched
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        if recursive { "" } else { ", not recursive" }
    ))
}

enum Verdict {
    Refuse(String),
    /// Still being written; looked at again.
    NotYet(String),
}

/// The watcher's checks, minus the settle wait: the recorder says the call is over.
fn check(cfg: &Config, root: &Path, path: &Path, now: i64) -> Result<NewJob, Verdict> {
    let rel = path.strip_prefix(root).unwrap_or(path);
    match NameRules::of(&cfg.watch).check(rel) {
        Ok(()) => {}
        Err(NameSkip::Extension) => {
            return Err(Verdict::Refuse(format!(
                "its extension is not one of watch.extensions ({})",
                cfg.watch.extensions.join(", ")
            )));
        }
        Err(NameSkip::Ignored) => {
            return Err(Verdict::Refuse(format!(
                "it matches a watch.ignore pattern ({})",
                cfg.watch.ignore.join(", ")
            )));
        }
    }
    let (stat, facts) = gather_facts(root, path).map_err(|e| {
        Verdict::Refuse(match crate::safefs::not_regular_reason(&e) {
            Some(why) => why.to_string(),
            None if e.kind() == std::io::ErrorKind::NotFound => "it does not exist".into(),
            None => format!("it cannot be read: {e}"),
        })
    })?;
    let timing = Timing {
        settle: Duration::ZERO,
        orphan_grace: cfg.watch.orphan_grace,
    };
    match judge(&observe(None, stat, now), &facts, now, timing) {
        Decision::Complete | Decision::CompleteAnyway(_) => Ok(NewJob {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
            size: stat.size,
            mtime_ns: stat.mtime_ns,
            dev: stat.dev,
            ino: stat.ino,
        }),
        Decision::NotYet(_, Pending::WriterOpen) => Err(Verdict::NotYet(
            "a process still has it open for writing".into(),
        )),
        Decision::NotYet(_, why) => Err(Verdict::NotYet(why.to_string())),
        Decision::Reject(why) => Err(Verdict::Refuse(why)),
    }
}

/// Why the drop folder is not used.
fn check_dir(dir: &Path) -> Result<(), String> {
    let m = std::fs::metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "it does not exist".to_string(),
        _ => e.to_string(),
    })?;
    if !m.is_dir() {
        return Err("it is not a folder".into());
    }
    if m.mode() & 0o002 != 0 {
        // Anyone could queue anything in the watched folders, and read or remove others' requests.
        return Err(format!(
            "it is writable by everyone (mode {:o}): make it chmod 3730, owned by callferry, \
             group {GROUP}",
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The daemon's side: takes requests from `[watch] hook_dir` until `cancel`, including those
/// written while it was stopped.
pub async fn run(
    cfg: Arc<Config>,
    queue: Queue,
    roots: Arc<Roots>,
    wake_workers: Arc<Notify>,
    cancel: CancellationToken,
) {
    let Some(dir) = cfg.watch.hook_dir.clone() else {
        return;
    };
    let mut t = Taker {
        cfg,
        queue,
        roots,
        wake_workers,
        dir,
        waiting: HashMap::new(),
        stuck: HashSet::new(),
    };
    let events = Arc::new(Notify::new());
    let mut watch: Option<notify::RecommendedWatcher> = None;
    let mut usable = false;
    let mut said: Option<String> = None;
    loop {
        let d = t.dir.clone();
        let state = tokio::task::spawn_blocking(move || check_dir(&d))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match state {
            Ok(()) => {
                if !usable {
                    info!(folder = %t.dir.display(), "taking the recorder's end-of-call requests (callferry enqueue --now)");
                    usable = true;
                    said = None;
                    watch = watch_dir(&t.dir, &events);
                }
                if let Err(e) = t.round().await {
                    warn!(folder = %t.dir.display(), error = %e, "cannot list the hook folder");
                    usable = false;
                    watch = None;
                }
            }
            Err(why) => {
                usable = false;
                watch = None;
                if said.as_deref() != Some(why.as_str()) {
                    let level_info = why == "it does not exist";
                    if level_info {
                        info!(folder = %t.dir.display(), "no hook folder ({why}): `callferry enqueue --now` requests are not taken until it exists (README: The recorder's hook)");
                    } else {
                        warn!(folder = %t.dir.display(), reason = %why, "the hook folder is not used: `callferry enqueue --now` requests are not taken");
                    }
                    said = Some(why);
                }
            }
        }
        let wait = if !t.waiting.is_empty() {
            Duration::from_secs(1)
        } else if !usable {
            MISSING_RECHECK
        } else if watch.is_some() {
            RESCAN
        } else {
            Duration::from_secs(2)
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = events.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn watch_dir(dir: &Path, events: &Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let ev = events.clone();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            ev.notify_one();
        }
    })
    .ok()?;
    match w.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => Some(w),
        Err(e) => {
            warn!(folder = %dir.display(), error = %e, "cannot watch the hook folder; it is listed every 2 s instead");
            None
        }
    }
}

struct Taker {
    cfg: Arc<Config>,
    queue: Queue,
    roots: Arc<Roots>,
    wake_workers: Arc<Notify>,
    dir: PathBuf,
    /// Requests whose recording is still being written: since when, and why.
    waiting: HashMap<OsString, Instant>,
    /// Refused requests that could not be removed: said once.
    stuck: HashSet<OsString>,
}

impl Taker {
    /// Takes every request in the folder once.
    async fn round(&mut self) -> std::io::Result<()> {
        let d = self.dir.clone();
        let names = tokio::task::spawn_blocking(move || list(&d))
            .await
            .map_err(std::io::Error::other)??;
        self.waiting.retain(|n, _| names.contains(n));
        self.stuck.retain(|n| names.contains(n));
        for name in names {
            if !self.stuck.contains(&name) {
                self.take(name).await;
            }
        }
        Ok(())
    }

    async fn take(&mut self, name: OsString) {
        let (d, n) = (self.dir.clone(), name.clone());
        let (uid, read) = tokio::task::spawn_blocking(move || read_request(&d, &n))
            .await
            .unwrap_or_else(|e| (None, Err(e.to_string())));
        let req = match read {
            Ok(r) => r,
            Err(why) => return self.refuse(&name, uid, None, &why).await,
        };
        let uid = uid.unwrap_or_default();
        let asked = req.path();
        let (root, path) = match locate(&self.cfg, &self.roots, &asked).await {
            Ok(found) => found,
            Err(why) => return self.refuse(&name, Some(uid), Some(&asked), &why).await,
        };
        let (cfg, r, p) = (self.cfg.clone(), root.clone(), path.clone());
        let checked = self
            .roots
            .get(&root)
            .files
            .run(move |_| check(&cfg, &r, &p, now_ms()))
            .await;
        let job = match checked {
            Ok(Ok(job)) => job,
            Ok(Err(Verdict::Refuse(why))) => {
                return self.refuse(&name, Some(uid), Some(&path), &why).await;
            }
            Ok(Err(Verdict::NotYet(why))) => return self.not_yet(&name, uid, &path, &why).await,
            Err(hung) => return self.not_yet(&name, uid, &path, &hung.to_string()).await,
        };
        let call = req.call();
        let json = serde_json::to_string(&call).unwrap_or_default();
        let outcome = match self.queue.enqueue_hooked(&job, &json, now_ms()).await {
            Ok(o) => o,
            Err(e) => {
                // The database's trouble, not the request's: it stays, and is taken again.
                warn!(request = ?name, path = %path.display(), error = %e, "cannot queue the recorder's request yet; it is taken again shortly");
                self.waiting.entry(name).or_insert_with(Instant::now);
                return;
            }
        };
        // The request goes only once what it said cannot be rolled back by a power cut.
        if let Err(e) = self.queue.sync_wal().await {
            warn!(request = ?name, error = %e, "cannot make the recorder's request durable yet; it is taken again shortly");
            self.waiting.entry(name).or_insert_with(Instant::now);
            return;
        }
        let ext = call.external_id.as_deref().unwrap_or("");
        match outcome {
            Hooked::Attached { id, new } => {
                info!(job_id = id, path = %path.display(), external_id = %ext, from_uid = uid, new, "queued at the recorder's request (end of call): its declare carries the hook's id and metadata");
                self.wake_workers.notify_waiters();
            }
            Hooked::Busy { id } => {
                let why = format!("its job #{id} is in a worker's hands (before its declare)");
                return self.not_yet(&name, uid, &path, &why).await;
            }
            Hooked::TooLate {
                id,
                state,
                interaction_id,
            } => {
                warn!(job_id = id, path = %path.display(), state = %state, interaction_id = ?interaction_id, external_id = %ext, from_uid = uid,
                    "the recorder's request came after this recording's declare: its id and metadata are not sent (the interaction keeps what the name or sidecar gave)");
            }
            Hooked::Pruned => {
                info!(path = %path.display(), from_uid = uid, "the recorder's request names a recording uploaded long ago (pruned) or forgotten; nothing to do");
            }
        }
        self.remove(&name).await;
    }

    async fn not_yet(&mut self, name: &OsStr, uid: u32, path: &Path, why: &str) {
        let since = *self
            .waiting
            .entry(name.to_os_string())
            .or_insert_with(Instant::now);
        if since.elapsed() >= PATIENCE {
            let why = format!(
                "{why} for {}s after the request; the watcher queues it once it is complete, \
                 without the request's id and metadata",
                PATIENCE.as_secs()
            );
            self.refuse(name, Some(uid), Some(path), &why).await;
        } else {
            debug!(request = ?name, path = %path.display(), reason = %why, "the recorder's request waits: its recording is not complete yet");
        }
    }

    async fn refuse(&mut self, name: &OsStr, uid: Option<u32>, path: Option<&Path>, why: &str) {
        warn!(request = %self.dir.join(name).display(), from_uid = ?uid, path = ?path.map(|p| p.display().to_string()), reason = %why,
            "refused the recorder's request (callferry enqueue --now); it is removed");
        self.remove(name).await;
    }

    async fn remove(&mut self, name: &OsStr) {
        self.waiting.remove(name);
        let p = self.dir.join(name);
        let r = tokio::task::spawn_blocking(move || {
            std::fs::remove_file(&p).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => std::fs::remove_dir(&p).map_err(|_| e),
            })
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = r {
            warn!(request = %self.dir.join(name).display(), error = %e, "cannot remove the recorder's request; it is left alone (remove it by hand)");
            self.stuck.insert(name.to_os_string());
        }
    }
}

/// The requests in the folder (`*.req`, not hidden); temporary files left by a hook that died are
/// removed once stale.
fn list(dir: &Path) -> std::io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let b = name.as_bytes();
        if b.starts_with(TEMP_PREFIX.as_bytes()) {
            let stale = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > STALE_TEMP);
            if stale {
                debug!(file = ?name, "removing a hook's stale temporary file");
                let _ = std::fs::remove_file(e.path());
            }
            continue;
        }
        if !b.starts_with(b".") && b.ends_with(SUFFIX.as_bytes()) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(meta: &[(&str, &str)]) -> Request {
        Request::new(
            Path::new("/rec/a.wav"),
            None,
            meta.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn dotted_keys_become_sections_and_values_stay_exact() {
        let r = req(&[
            ("caller", "';$(touch /tmp/x)'"),
            ("agent.extension", "1001"),
            ("agent.name", "Zoë \"Z\" O'Brien"),
        ]);
        r.validate().unwrap();
        assert_eq!(
            Value::Object(r.metadata().unwrap()),
            json!({
                "caller": "';$(touch /tmp/x)'",
                "agent": { "extension": "1001", "name": "Zoë \"Z\" O'Brien" },
            })
        );
    }

    #[test]
    fn bad_requests_say_why() {
        for (r, want) in [
            (req(&[("a b", "x")]), "letters, digits"),
            (req(&[("a..b", "x")]), "letters, digits"),
            (req(&[("a.b.c.d.e", "x")]), "sections"),
            (req(&[("k", "line\nbreak")]), "control character"),
            (req(&[("k", &"x".repeat(MAX_VALUE + 1))]), "more than"),
            (
                req(&[("agent", "x"), ("agent.id", "y")]),
                "value of its own",
            ),
            (
                Request::new(Path::new("rel/a.wav"), None, BTreeMap::new()),
                "not absolute",
            ),
            (
                Request::new(Path::new("/rec/../etc/a.wav"), None, BTreeMap::new()),
                "`..`",
            ),
            (
                Request::new(Path::new("/rec/a.wav"), Some(" ".into()), BTreeMap::new()),
                "empty",
            ),
            (
                Request {
                    version: 2,
                    ..req(&[])
                },
                "version 2",
            ),
        ] {
            let e = r.validate().expect_err(want);
            assert!(e.contains(want), "{e} (wanted {want})");
        }
        let many: Vec<(String, String)> = (0..=MAX_PAIRS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        let r = Request::new(Path::new("/a.wav"), None, many.into_iter().collect());
        assert!(r.validate().unwrap_err().contains("meta pairs"));
    }

    #[test]
    fn percent_decoding_is_exact_and_strict() {
        assert_eq!(
            percent_decode("%27%3B%24%28touch%20%2Ftmp%2Fx%29%27").unwrap(),
            "';$(touch /tmp/x)'"
        );
        assert_eq!(percent_decode("+14155550123").unwrap(), "+14155550123");
        assert!(percent_decode("50%").is_err());
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%ff").is_err());
    }

    #[test]
    fn the_hook_wins_section_by_section_and_metadata_needs_send_metadata() {
        let declare = || crate::api::DeclareRequest {
            kind: "audio".into(),
            language_tag: "en-us".into(),
            vertical: "default".into(),
            audio_transcription_mode: None,
            model: None,
            include_ai_results: false,
            original_filename: None,
            external_identifier: Some("from-name".into()),
            metadata: json!({"agent": {"extension": "1001"}, "direction": "inbound"})
                .as_object()
                .cloned(),
        };
        let h = req(&[("agent.name", "Bob"), ("direction", "outbound")]);
        let mut hc = h.call();
        hc.external_id = Some("crm-1".into());
        let mut d = declare();
        apply_to_declare(&hc, &mut d, true);
        assert_eq!(d.external_identifier.as_deref(), Some("crm-1"));
        assert_eq!(
            Value::Object(d.metadata.unwrap()),
            json!({"agent": {"extension": "1001", "name": "Bob"}, "direction": "outbound"})
        );
        let mut d = declare();
        d.metadata = None;
        apply_to_declare(&hc, &mut d, false);
        assert_eq!(d.external_identifier.as_deref(), Some("crm-1"));
        assert!(d.metadata.is_none());
    }

    #[test]
    fn a_request_round_trips_through_the_folder_and_links_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let name = b"\xe9t\xe9.wav";
        let path = Path::new("/rec").join(OsStr::from_bytes(name));
        let r = Request::new(&path, Some("id-1".into()), BTreeMap::new());
        let written = submit(d.path(), &r).unwrap();
        let names = list(d.path()).unwrap();
        assert_eq!(names, vec![written.file_name().unwrap().to_os_string()]);
        let back = read_request(d.path(), &names[0]).1.unwrap();
        assert_eq!(back, r);
        assert_eq!(back.path(), path, "a non-UTF-8 name survives byte for byte");

        std::os::unix::fs::symlink(&written, d.path().join("link.req")).unwrap();
        let e = read_request(d.path(), OsStr::new("link.req"))
            .1
            .unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::hard_link(&written, d.path().join("hard.req")).unwrap();
        let e = read_request(d.path(), OsStr::new("hard.req"))
            .1
            .unwrap_err();
        assert!(e.contains("hard links"), "{e}");
        std::fs::write(
            d.path().join("big.req"),
            vec![b' '; MAX_REQUEST as usize + 1],
        )
        .unwrap();
        let e = read_request(d.path(), OsStr::new("big.req")).1.unwrap_err();
        assert!(e.contains("more than"), "{e}");
        std::fs::write(
            d.path().join("extra.req"),
            br#"{"version":1,"path":"/a.wav","command":"rm -rf /"}"#,
        )
        .unwrap();
        let e = read_request(d.path(), OsStr::new("extra.req"))
            .1
            .unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        // Temporary files are not requests.
        std::fs::write(d.path().join(".tmp-x"), b"{").unwrap();
        assert!(!list(d.path()).unwrap().iter().any(|n| n == ".tmp-x"));
    }

    #[test]
    fn a_missing_folder_is_the_admins_to_fix() {
        let d = tempfile::tempdir().unwrap();
        let r = req(&[]);
        match submit(&d.path().join("none"), &r) {
            Err(SubmitError::Setup(m)) => {
                assert!(
                    m.contains("does not exist") && m.contains("install -d"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
