//! Owns what a recording's first bytes say: which container it is, and — for WAV — whether the
//! sizes in its header agree with the file's length. Pure: bytes and a length in, facts out.
//!
//! Recorders write WAV headers with placeholder sizes while a call is recorded (0, 8/0, sox's
//! `0x7FFFF0xx`, ffmpeg's `0xFFFFFFFF`) and fix them on close, so "the header disagrees with the
//! length" is the most reliable sign that a WAV is still being written.

/// How many leading bytes [`inspect`] wants (enough to walk past LIST/fact chunks to `data`).
pub const HEAD_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// A format we can check, and it is consistent with the file's length.
    Consistent,
    /// The header is valid but its sizes disagree with the file (still being written, or a writer
    /// that died before fixing it).
    Inconsistent(String),
    /// Too few bytes yet to tell (the recorder has not written the header).
    TooShort,
    /// The extension promises a format whose magic bytes are not there: not a recording.
    BadMagic(String),
    /// A format we have no check for.
    Unchecked,
}

/// Inspects `head` (the first bytes of the file, up to [`HEAD_LEN`]) of a file of `len` bytes whose
/// extension is `ext` (lower case, no dot).
pub fn inspect(ext: &str, head: &[u8], len: u64) -> Header {
    match ext {
        "wav" => wav(head, len),
        "mp3" => magic(head, 3, "MP3", |h| {
            h.starts_with(b"ID3") || (h[0] == 0xFF && h[1] & 0xE0 == 0xE0)
        }),
        "ogg" | "opus" => magic(head, 4, "Ogg", |h| h.starts_with(b"OggS")),
        "flac" => magic(head, 4, "FLAC", |h| {
            h.starts_with(b"fLaC") || h.starts_with(b"ID3")
        }),
        "m4a" => magic(head, 8, "MP4/M4A", |h| &h[4..8] == b"ftyp"),
        "wma" => magic(head, 4, "WMA (ASF)", |h| {
            h.starts_with(&[0x30, 0x26, 0xB2, 0x75])
        }),
        _ => Header::Unchecked,
    }
}

fn magic(head: &[u8], need: usize, name: &str, ok: impl Fn(&[u8]) -> bool) -> Header {
    if head.len() < need {
        Header::TooShort
    } else if ok(head) {
        Header::Consistent
    } else {
        Header::BadMagic(format!(
            "not a {name} file (its first bytes are not {name}'s)"
        ))
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn wav(head: &[u8], len: u64) -> Header {
    if head.len() < 12 {
        return Header::TooShort;
    }
    let (riff, wave) = (&head[0..4], &head[8..12]);
    if wave != b"WAVE" || !(riff == b"RIFF" || riff == b"RF64" || riff == b"BW64") {
        return Header::BadMagic("not a WAV file (no RIFF/WAVE header)".into());
    }
    if riff != b"RIFF" {
        // RF64/BW64 keep the real sizes in a ds64 chunk; their 32-bit fields are placeholders by
        // design. Check the ds64 riff size.
        return match head.get(12..16) {
            Some(b"ds64") => match head.get(20..28) {
                Some(s) => {
                    let riff64 = u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
                    if riff64.saturating_add(8) == len {
                        Header::Consistent
                    } else {
                        Header::Inconsistent(format!(
                            "RF64 size field says {} bytes, file has {len}",
                            riff64.saturating_add(8)
                        ))
                    }
                }
                None => Header::TooShort,
            },
            _ => Header::TooShort,
        };
    }
    let riff_size = u32_at(head, 4).unwrap_or(0) as u64;
    // Walk the chunks to `data`.
    let mut at = 12usize;
    let data = loop {
        let (Some(id), Some(size)) = (head.get(at..at + 4), u32_at(head, at + 4)) else {
            // The header is not complete on disk yet, or `data` lies beyond what we read.
            return if len as usize > head.len() && head.len() >= HEAD_LEN {
                Header::Unchecked
            } else {
                Header::TooShort
            };
        };
        if id == b"data" {
            break (at as u64 + 8, size as u64);
        }
        at = at + 8 + size as usize + (size as usize & 1);
    };
    let (data_start, data_size) = data;
    let riff_ok = riff_size + 8 == len;
    // Some writers pad the data chunk to an even length; some put chunks after it (LIST at the end):
    // data must fit in the file and the RIFF size must cover the file exactly.
    let data_ok = data_start + data_size <= len && data_size > 0;
    if riff_ok && data_ok {
        return Header::Consistent;
    }
    let what = match (riff_size, data_size) {
        (0, _) | (_, 0) => "placeholder sizes (0)".to_string(),
        (0xFFFF_FFFF, _) | (_, 0xFFFF_FFFF) => "placeholder sizes (0xFFFFFFFF)".to_string(),
        (r, _) if r & 0xFFFF_FF00 == 0x7FFF_F000 => "placeholder sizes (0x7FFFF0xx)".to_string(),
        _ => format!(
            "header says {} bytes (data {}), file has {len}",
            riff_size + 8,
            data_size
        ),
    };
    Header::Inconsistent(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(riff: u32, data: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(b"RIFF");
        h.extend_from_slice(&riff.to_le_bytes());
        h.extend_from_slice(b"WAVEfmt ");
        h.extend_from_slice(&16u32.to_le_bytes());
        h.extend_from_slice(&[1, 0, 1, 0, 0x40, 0x1F, 0, 0, 0x80, 0x3E, 0, 0, 2, 0, 16, 0]);
        h.extend_from_slice(b"data");
        h.extend_from_slice(&data.to_le_bytes());
        h
    }

    #[test]
    fn a_finished_wav_is_consistent() {
        let h = header(36 + 1000, 1000);
        assert_eq!(inspect("wav", &h, 44 + 1000), Header::Consistent);
    }

    #[test]
    fn recorder_placeholders_are_inconsistent() {
        for (r, d) in [
            (0, 0),
            (8, 0),
            (0x7FFF_F024, 0x7FFF_F000),
            (0xFFFF_FFFF, 0xFFFF_FFFF),
        ] {
            let h = header(r, d);
            assert!(
                matches!(inspect("wav", &h, 44 + 5000), Header::Inconsistent(_)),
                "{r:#x}/{d:#x}"
            );
        }
    }

    #[test]
    fn a_wav_that_grew_after_its_header_was_fixed_is_inconsistent() {
        let h = header(36 + 1000, 1000);
        assert!(matches!(
            inspect("wav", &h, 44 + 3000),
            Header::Inconsistent(_)
        ));
        assert!(matches!(
            inspect("wav", &h, 44 + 500),
            Header::Inconsistent(_)
        ));
    }

    #[test]
    fn chunks_before_data_are_walked() {
        let mut h = Vec::new();
        h.extend_from_slice(b"RIFF");
        h.extend_from_slice(&(4 + 8 + 3 + 1 + 8 + 100u32).to_le_bytes());
        h.extend_from_slice(b"WAVE");
        h.extend_from_slice(b"LIST");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(b"abc\0"); // odd size, padded
        h.extend_from_slice(b"data");
        h.extend_from_slice(&100u32.to_le_bytes());
        let len = h.len() as u64 + 100;
        assert_eq!(inspect("wav", &h, len), Header::Consistent);
    }

    #[test]
    fn short_and_foreign_files() {
        assert_eq!(inspect("wav", b"RIFF", 4), Header::TooShort);
        assert!(matches!(
            inspect("wav", b"hello this is text", 18),
            Header::BadMagic(_)
        ));
        assert!(matches!(inspect("mp3", b"<html>", 6), Header::BadMagic(_)));
        assert_eq!(inspect("mp3", b"ID3\x04", 1000), Header::Consistent);
        assert_eq!(
            inspect("mp3", &[0xFF, 0xFB, 0x90], 1000),
            Header::Consistent
        );
        assert_eq!(inspect("ogg", b"OggS\0", 1000), Header::Consistent);
        assert_eq!(inspect("flac", b"fLaC", 1000), Header::Consistent);
        assert_eq!(
            inspect("m4a", b"\0\0\0\x20ftypM4A ", 1000),
            Header::Consistent
        );
        assert_eq!(inspect("gsm", b"anything", 1000), Header::Unchecked);
    }
}
