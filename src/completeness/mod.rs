//! Owns the answer to "is this file a recording we should upload, and is it complete yet?", and
//! why not yet.
//!
//! The rule here is pure: it sees names, stat snapshots, the facts a look inside the file gave
//! and a clock passed in, never the disk, so it can be tested by the hundred and grown without
//! touching the watcher's I/O. The facts come from the submodules: [`facts`] opens the file and
//! gathers them (the only I/O here, run by the caller on the file's lane), [`audio`] reads a
//! header, [`writers`] asks the kernel whether anyone still writes the file.

pub mod audio;
pub mod facts;
pub mod writers;

use std::path::Path;
use std::time::Duration;

use globset::GlobSet;

pub use audio::Header;
pub use facts::{gather_facts, stat_of};
pub use writers::Writers;

use crate::config::WatchConfig;

/// Why a path is not a recording to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameSkip {
    /// Its extension is not in `watch.extensions`.
    Extension,
    /// A `watch.ignore` glob matches it (temporary files, dotfiles, ...).
    Ignored,
}

/// Name rules from `[watch]`: extension allow-list and ignore globs.
pub struct NameRules<'a> {
    pub extensions: &'a [String],
    pub ignore: &'a GlobSet,
}

impl<'a> NameRules<'a> {
    pub fn of(w: &'a WatchConfig) -> Self {
        NameRules {
            extensions: &w.extensions,
            ignore: &w.ignore_set,
        }
    }

    /// `rel` is the path relative to its watched folder; the globs are tried on the file name and on
    /// every folder name in `rel`, so `.*` also hides files under a hidden folder (rsync's temp dirs).
    pub fn check(&self, rel: &Path) -> Result<(), NameSkip> {
        let Some(name) = rel.file_name() else {
            return Err(NameSkip::Extension);
        };
        for comp in rel.components() {
            if self.ignore.is_match(comp.as_os_str()) {
                return Err(NameSkip::Ignored);
            }
        }
        let ext = Path::new(name)
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        match ext {
            Some(e) if self.extensions.contains(&e) => Ok(()),
            _ => Err(NameSkip::Extension),
        }
    }
}

/// What one `stat` of a file said. Equality is what "unchanged" means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i64,
    pub dev: u64,
    pub ino: u64,
}

impl Stat {
    pub fn mtime_ms(&self) -> i64 {
        self.mtime_ns.div_euclid(1_000_000)
    }
}

/// What we know of a file we are waiting on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub stat: Stat,
    /// Since when (wall clock, ms) the file is known not to have changed.
    pub quiet_since_ms: i64,
}

/// Folds a new stat into what we knew. On first sight the file has been quiet since its mtime
/// (files found by a scan after a restart are not made to wait again); a change restarts the clock.
pub fn observe(prev: Option<&Observed>, stat: Stat, now_ms: i64) -> Observed {
    match prev {
        Some(p) if p.stat == stat => *p,
        Some(_) => Observed {
            stat,
            quiet_since_ms: now_ms,
        },
        None => Observed {
            stat,
            // An mtime in the future (clock skew on a share) must not make the file look quiet.
            quiet_since_ms: stat.mtime_ms().min(now_ms),
        },
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not yet, for this reason; look again after this long (or sooner, on an event).
    NotYet(Duration, Pending),
    /// Complete: upload this version.
    Complete,
    /// Never became consistent, but nothing has touched it for `orphan_grace`: upload it anyway
    /// (a truncated call is better than none), with this warning.
    CompleteAnyway(String),
    /// Stop tracking it (until it changes again), for this reason.
    Reject(String),
}

/// Why a file is not complete yet: logged once per reason by the watcher, told by `enqueue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// Changed less than `watch.settle` ago.
    Settling,
    /// Another process has it open for writing.
    WriterOpen,
    /// Too short yet to hold its header.
    HeaderNotWritten,
    /// Its header disagrees with its length (a placeholder the recorder fixes at the end).
    HeaderNotFinal(String),
    /// It could not be read (permissions not granted yet, an I/O error): looked at again later.
    Unreadable(String),
    /// Its folder does not answer (a hung mount): looked at again once it does.
    NoAnswer,
}

impl std::fmt::Display for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pending::Settling => f.write_str("waiting for it to stay unchanged for watch.settle"),
            Pending::WriterOpen => f.write_str("still open for writing by another process"),
            Pending::HeaderNotWritten => f.write_str("header not written yet"),
            Pending::HeaderNotFinal(why) => write!(f, "header not final yet: {why}"),
            Pending::Unreadable(e) => write!(f, "cannot read it: {e}; will try again"),
            Pending::NoAnswer => f.write_str("its folder does not answer"),
        }
    }
}

/// What a look inside the file said, gathered by the caller once the file is quiet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub header: Header,
    pub writers: Writers,
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Quiet period: unchanged this long.
    pub settle: Duration,
    /// How long a file whose header never becomes consistent (and that nobody writes) is waited
    /// for before it is uploaded anyway.
    pub orphan_grace: Duration,
}

impl Timing {
    pub fn of(w: &WatchConfig) -> Self {
        Timing {
            settle: w.settle,
            orphan_grace: w.orphan_grace,
        }
    }
}

/// The whole rule, once the file is quiet: nobody writing it, and (for formats we can read) a
/// header that agrees with its length. A header that stays inconsistent with no writer for
/// `orphan_grace` is a recorder that died: uploaded anyway, with a warning.
pub fn judge(o: &Observed, facts: &Facts, now_ms: i64, t: Timing) -> Decision {
    match decide(o, now_ms, t.settle) {
        Decision::Complete => {}
        other => return other,
    }
    let quiet = quiet_for(o, now_ms);
    let again = t.settle.max(Duration::from_millis(100));
    if facts.writers == Writers::Present {
        return Decision::NotYet(again, Pending::WriterOpen);
    }
    match &facts.header {
        Header::Consistent | Header::Unchecked => Decision::Complete,
        Header::BadMagic(why) => Decision::Reject(why.clone()),
        Header::Inconsistent(why) => {
            if quiet >= t.orphan_grace {
                Decision::CompleteAnyway(format!(
                    "its header never became consistent ({why}) and nothing has written to it for {}",
                    humantime::format_duration(t.orphan_grace)
                ))
            } else {
                Decision::NotYet(
                    (t.orphan_grace - quiet).min(again),
                    Pending::HeaderNotFinal(why.clone()),
                )
            }
        }
        Header::TooShort => {
            if quiet >= t.orphan_grace {
                Decision::Reject("too short to be a recording (no complete header)".into())
            } else {
                Decision::NotYet(
                    (t.orphan_grace - quiet).min(again),
                    Pending::HeaderNotWritten,
                )
            }
        }
    }
}

/// The verdict on a quiet file after a fresh look inside it (`looked`, from [`gather_facts`]):
/// what is known of it now, and the decision. `None`: it is gone (its event forgets it).
pub fn assess(
    o: &Observed,
    looked: std::io::Result<(Stat, Facts)>,
    now_ms: i64,
    t: Timing,
) -> Option<(Observed, Decision)> {
    match looked {
        Ok((stat, facts)) => {
            let o = observe(Some(o), stat, now_ms);
            let d = judge(&o, &facts, now_ms, t);
            Some((o, d))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            let d = match crate::safefs::not_regular_reason(&e) {
                // Replaced by a FIFO, a folder or a link: no longer a recording here.
                Some(why) => Decision::Reject(why.to_string()),
                None => Decision::NotYet(
                    t.settle.max(Duration::from_secs(1)),
                    Pending::Unreadable(e.to_string()),
                ),
            };
            Some((*o, d))
        }
    }
}

fn quiet_for(o: &Observed, now_ms: i64) -> Duration {
    Duration::from_millis(now_ms.saturating_sub(o.quiet_since_ms).max(0) as u64)
}

/// The quiet-period part of the rule: size > 0, and size, mtime and inode unchanged for `settle`.
pub fn decide(o: &Observed, now_ms: i64, settle: Duration) -> Decision {
    let quiet = quiet_for(o, now_ms);
    if quiet < settle {
        return Decision::NotYet(settle - quiet, Pending::Settling);
    }
    if o.stat.size == 0 {
        // Asterisk creates the file at 0 bytes and writes later; a later write brings it back.
        return Decision::Reject("empty file (0 bytes); waiting for it to grow".into());
    }
    Decision::Complete
}

#[cfg(test)]
mod tests {
    use super::*;
    use globset::{Glob, GlobSetBuilder};
    use proptest::prelude::*;

    fn globs(g: &[&str]) -> GlobSet {
        let mut b = GlobSetBuilder::new();
        for x in g {
            b.add(Glob::new(x).unwrap());
        }
        b.build().unwrap()
    }

    fn st(size: u64, mtime_ms: i64) -> Stat {
        Stat {
            size,
            mtime_ns: mtime_ms * 1_000_000,
            dev: 1,
            ino: 7,
        }
    }

    const SETTLE: Duration = Duration::from_secs(5);

    #[test]
    fn name_rules() {
        let exts = vec!["wav".to_string(), "mp3".to_string()];
        let ig = globs(&[".*", "*.part", "*.tmp", "*~"]);
        let r = NameRules {
            extensions: &exts,
            ignore: &ig,
        };
        assert_eq!(r.check(Path::new("a/b/call.wav")), Ok(()));
        assert_eq!(r.check(Path::new("CALL.WAV")), Ok(()));
        assert_eq!(r.check(Path::new("call.txt")), Err(NameSkip::Extension));
        assert_eq!(r.check(Path::new("call")), Err(NameSkip::Extension));
        assert_eq!(
            r.check(Path::new(".call.wav.XyZ12")),
            Err(NameSkip::Ignored)
        );
        assert_eq!(r.check(Path::new(".call.wav")), Err(NameSkip::Ignored));
        assert_eq!(r.check(Path::new("call.wav.part")), Err(NameSkip::Ignored));
        assert_eq!(r.check(Path::new(".sync/call.wav")), Err(NameSkip::Ignored));
        assert_eq!(r.check(Path::new("call.wav~")), Err(NameSkip::Ignored));
    }

    #[test]
    fn a_file_found_long_after_its_last_write_is_complete_at_once() {
        let o = observe(None, st(100, 1_000), 60_000);
        assert_eq!(decide(&o, 60_000, SETTLE), Decision::Complete);
    }

    #[test]
    fn a_fresh_file_waits_for_settle() {
        let o = observe(None, st(100, 10_000), 10_000);
        assert_eq!(
            decide(&o, 10_000, SETTLE),
            Decision::NotYet(SETTLE, Pending::Settling)
        );
        assert_eq!(
            decide(&o, 12_000, SETTLE),
            Decision::NotYet(Duration::from_secs(3), Pending::Settling)
        );
        assert_eq!(decide(&o, 15_000, SETTLE), Decision::Complete);
    }

    #[test]
    fn a_change_restarts_the_quiet_period() {
        let o = observe(None, st(100, 10_000), 10_000);
        let o = observe(Some(&o), st(200, 14_000), 14_000);
        assert!(matches!(decide(&o, 15_000, SETTLE), Decision::NotYet(..)));
        assert_eq!(decide(&o, 19_000, SETTLE), Decision::Complete);
    }

    #[test]
    fn future_mtime_does_not_count_as_quiet() {
        let o = observe(None, st(100, 99_000_000), 10_000);
        assert!(matches!(decide(&o, 10_000, SETTLE), Decision::NotYet(..)));
    }

    #[test]
    fn empty_file_is_rejected_after_settle_not_before() {
        let o = observe(None, st(0, 10_000), 10_000);
        assert!(matches!(decide(&o, 11_000, SETTLE), Decision::NotYet(..)));
        assert!(matches!(decide(&o, 16_000, SETTLE), Decision::Reject(_)));
    }

    const T: Timing = Timing {
        settle: SETTLE,
        orphan_grace: Duration::from_secs(600),
    };

    fn facts(header: Header, writers: Writers) -> Facts {
        Facts { header, writers }
    }

    #[test]
    fn a_writer_holding_the_file_keeps_it_waiting() {
        let o = observe(None, st(100, 1_000), 60_000);
        let d = judge(&o, &facts(Header::Consistent, Writers::Present), 60_000, T);
        assert!(matches!(d, Decision::NotYet(..)), "{d:?}");
        let d = judge(&o, &facts(Header::Consistent, Writers::None), 60_000, T);
        assert_eq!(d, Decision::Complete);
        // Cannot tell (no CAP_LEASE, NFS): the quiet period decides.
        let d = judge(
            &o,
            &facts(Header::Consistent, Writers::Unknown("x".into())),
            60_000,
            T,
        );
        assert_eq!(d, Decision::Complete);
    }

    #[test]
    fn a_placeholder_header_waits_then_is_uploaded_anyway_after_the_orphan_grace() {
        let o = observe(None, st(100, 1_000), 10_000);
        let f = facts(
            Header::Inconsistent("placeholder sizes (0)".into()),
            Writers::None,
        );
        assert!(matches!(judge(&o, &f, 10_000, T), Decision::NotYet(..)));
        assert!(matches!(judge(&o, &f, 500_000, T), Decision::NotYet(..)));
        match judge(&o, &f, 601_000, T) {
            Decision::CompleteAnyway(why) => assert!(why.contains("placeholder"), "{why}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn foreign_content_is_rejected_and_unknown_formats_pass_on_quiet() {
        let o = observe(None, st(100, 1_000), 60_000);
        let f = facts(Header::BadMagic("not a WAV file".into()), Writers::None);
        assert!(matches!(judge(&o, &f, 60_000, T), Decision::Reject(_)));
        let f = facts(Header::Unchecked, Writers::None);
        assert_eq!(judge(&o, &f, 60_000, T), Decision::Complete);
    }

    #[test]
    fn not_yet_says_why() {
        let o = observe(None, st(100, 1_000), 60_000);
        let why = |h: Header, w: Writers| match judge(&o, &facts(h, w), 60_000, T) {
            Decision::NotYet(_, p) => p,
            d => panic!("{d:?}"),
        };
        assert_eq!(
            why(Header::Consistent, Writers::Present),
            Pending::WriterOpen
        );
        assert_eq!(
            why(Header::Inconsistent("riff 0".into()), Writers::None),
            Pending::HeaderNotFinal("riff 0".into())
        );
        assert_eq!(
            why(Header::TooShort, Writers::None),
            Pending::HeaderNotWritten
        );
        let fresh = observe(None, st(100, 60_000), 60_000);
        assert!(matches!(
            judge(
                &fresh,
                &facts(Header::Consistent, Writers::Present),
                60_000,
                T
            ),
            Decision::NotYet(_, Pending::Settling)
        ));
    }

    #[test]
    fn a_fresh_look_folds_in_its_stat_and_errors_have_their_decision() {
        let o = observe(None, st(100, 1_000), 60_000);
        let (seen, d) = assess(
            &o,
            Ok((st(100, 1_000), facts(Header::Consistent, Writers::None))),
            60_000,
            T,
        )
        .unwrap();
        assert_eq!((seen, d), (o, Decision::Complete));
        // Grown since the quiet period began: waits again.
        let (seen, d) = assess(
            &o,
            Ok((st(200, 59_900), facts(Header::Consistent, Writers::None))),
            60_000,
            T,
        )
        .unwrap();
        assert_eq!(seen.stat.size, 200);
        assert!(matches!(d, Decision::NotYet(_, Pending::Settling)), "{d:?}");
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(assess(&o, Err(gone), 60_000, T).is_none());
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(matches!(
            assess(&o, Err(denied), 60_000, T),
            Some((_, Decision::NotYet(_, Pending::Unreadable(_))))
        ));
    }

    proptest! {
        /// Never complete while a writer holds the file or before settle, whatever the header.
        #[test]
        fn never_complete_with_a_writer_or_within_settle(
            quiet_ms in 0i64..2_000_000, writer in any::<bool>(), hdr in 0u8..5,
        ) {
            let now = 10_000_000i64;
            let o = observe(None, st(100, now - quiet_ms), now);
            let header = match hdr {
                0 => Header::Consistent,
                1 => Header::Inconsistent("x".into()),
                2 => Header::TooShort,
                3 => Header::BadMagic("x".into()),
                _ => Header::Unchecked,
            };
            let w = if writer { Writers::Present } else { Writers::None };
            let d = judge(&o, &facts(header.clone(), w), now, T);
            if matches!(d, Decision::Complete | Decision::CompleteAnyway(_)) {
                prop_assert!(!writer);
                prop_assert!(quiet_ms >= SETTLE.as_millis() as i64);
                if matches!(header, Header::Inconsistent(_)) {
                    prop_assert!(quiet_ms >= T.orphan_grace.as_millis() as i64);
                }
            }
        }

        /// Whatever the history, a file is never complete less than `settle` after its last change.
        #[test]
        fn never_complete_within_settle_of_a_change(
            steps in proptest::collection::vec((0i64..3_000, 0u64..4), 1..40),
            settle_ms in 1u64..10_000,
        ) {
            let settle = Duration::from_millis(settle_ms);
            let mut now = 1_000_000i64;
            let mut size = 1u64;
            let mut o = observe(None, st(size, now), now);
            let mut last_change = now;
            for (dt, grow) in steps {
                now += dt;
                if grow > 0 { size += grow; last_change = now; }
                o = observe(Some(&o), st(size, last_change), now);
                if decide(&o, now, settle) == Decision::Complete {
                    prop_assert!(now - last_change >= settle_ms as i64);
                }
            }
        }
    }
}
