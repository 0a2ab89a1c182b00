//! Owns how a file path is stored in the queue: losslessly, as text.
//!
//! A Unix path is bytes, and recorders write names in whatever encoding the caller's name came in
//! (Latin-1 caller names are common). A path stored lossily (`to_string_lossy`) no longer names the
//! file: the job "vanished", and the file was queued again at every rescan, forever.
//!
//! The `path` and `root` columns stay TEXT so the `UNIQUE (path, size, mtime_ns)` key, the JSON
//! batches of `enqueue` and every existing row keep working unchanged: a path that is valid UTF-8 is
//! stored as itself. Each byte that is not part of valid UTF-8 is stored as one character of the
//! last 256 code points of Unicode (U+10FF00 + byte, in plane 16's private use area, which no file
//! name uses in practice); such a character that really occurs in a name is itself stored as its
//! four escaped UTF-8 bytes, so the encoding is injective. Display replaces each escaped byte by
//! U+FFFD, as `to_string_lossy` does.

use std::borrow::Cow;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

const BASE: u32 = 0x10_FF00;

fn escaped(c: char) -> bool {
    c as u32 >= BASE
}

fn push_byte(out: &mut String, b: u8) {
    out.push(char::from_u32(BASE + b as u32).expect("U+10FF00..U+10FFFF are scalar values"));
}

/// The stored text of `p` (borrowed when `p` is plain UTF-8).
pub fn encode_path(p: &Path) -> Cow<'_, str> {
    let bytes = p.as_os_str().as_bytes();
    if let Ok(s) = std::str::from_utf8(bytes)
        && !s.chars().any(escaped)
    {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if escaped(c) {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    push_byte(&mut out, b);
                }
            } else {
                out.push(c);
            }
        }
        for &b in chunk.invalid() {
            push_byte(&mut out, b);
        }
    }
    Cow::Owned(out)
}

/// The path whose stored text is `s`, byte for byte.
pub fn decode_path(s: &str) -> PathBuf {
    if !s.chars().any(escaped) {
        return PathBuf::from(s);
    }
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        if escaped(c) {
            out.push((c as u32 - BASE) as u8);
        } else {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// What to show people for stored text `s`: the path with each byte that is not UTF-8 as U+FFFD.
pub fn display_path(s: &str) -> String {
    decode_path(s).to_string_lossy().into_owned()
}

/// Serializes stored path text as it is displayed (for `list --json`).
pub fn serialize_display<S: serde::Serializer>(s: &str, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&display_path(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn os(b: &[u8]) -> PathBuf {
        PathBuf::from(OsString::from_vec(b.to_vec()))
    }

    #[test]
    fn utf8_paths_are_stored_as_they_were_before() {
        for p in ["/rec/a.wav", "/rec/Zoë/ß.wav", "/rec/日本.wav", ""] {
            assert!(matches!(encode_path(Path::new(p)), Cow::Borrowed(s) if s == p));
            assert_eq!(decode_path(p), Path::new(p));
        }
    }

    #[test]
    fn latin1_names_survive_and_display_lossily() {
        let p = os(b"/rec/Jos\xe9 Mu\xf1oz.wav");
        let s = encode_path(&p);
        assert_ne!(s, p.to_string_lossy());
        assert_eq!(decode_path(&s), p);
        assert_eq!(display_path(&s), "/rec/Jos\u{FFFD} Mu\u{FFFD}oz.wav");
        // Two names that are the same once lossy stay two.
        assert_ne!(s, encode_path(&os(b"/rec/Jos\xe8 Mu\xf1oz.wav")));
    }

    proptest! {
        #[test]
        fn every_byte_string_round_trips(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            let p = os(&b);
            prop_assert_eq!(decode_path(&encode_path(&p)), p);
        }

        #[test]
        fn the_encoding_is_injective(
            a in proptest::collection::vec(any::<u8>(), 0..12),
            b in proptest::collection::vec(any::<u8>(), 0..12),
        ) {
            prop_assume!(a != b);
            let (pa, pb) = (os(&a), os(&b));
            prop_assert_ne!(encode_path(&pa), encode_path(&pb));
        }

        #[test]
        fn names_with_the_escape_characters_round_trip(s in "[a\u{10FF00}-\u{10FFFF}é/]{0,12}") {
            let p = PathBuf::from(&s);
            prop_assert_eq!(decode_path(&encode_path(&p)), p);
        }
    }
}
