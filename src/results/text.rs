//! The plain-text transcript (`format = "text"`), rendered from the punctuated transcript.

use std::path::Path;

/// The parts of a punctuated transcript the text rendering uses. Read from the file with only
/// these fields kept, so a large transcript costs its phrases' size, not a whole JSON tree.
#[derive(serde::Deserialize, Default)]
pub(super) struct Punctuated {
    #[serde(rename = "sentenceSegments", default)]
    segments: Option<Vec<Segment>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct Segment {
    participant: Option<serde_json::Value>,
    #[serde(rename = "startTimeOffset")]
    start: Option<serde_json::Value>,
    phrase: Option<serde_json::Value>,
}

/// A plain-text transcript from the punctuated transcript: one line per speaker turn, with its
/// start time.
pub fn render_text(punctuated: &serde_json::Value) -> String {
    let p: Punctuated = serde_json::from_value(punctuated.clone()).unwrap_or_default();
    render_segments(p.segments.as_deref().unwrap_or_default())
}

/// [`render_text`] of a punctuated transcript in a file; a document of another shape gives an
/// empty text, as it always has.
pub(super) fn render_text_file(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let p: Punctuated = serde_json::from_reader(std::io::BufReader::new(file)).unwrap_or_default();
    Ok(render_segments(p.segments.as_deref().unwrap_or_default()))
}

pub(super) fn render_segments(segments: &[Segment]) -> String {
    let mut out = String::new();
    let mut turn: Option<(String, u64, Vec<String>)> = None;
    let flush = |out: &mut String, t: &(String, u64, Vec<String>)| {
        let s = t.1 / 1000;
        out.push_str(&format!(
            "[{:02}:{:02}:{:02}] {}: {}\n",
            s / 3600,
            (s / 60) % 60,
            s % 60,
            speaker(&t.0),
            t.2.join(" ")
        ));
    };
    for seg in segments {
        let who = seg
            .participant
            .as_ref()
            .and_then(|p| p.as_str())
            .unwrap_or("unknown")
            .to_string();
        let start = seg.start.as_ref().and_then(|v| v.as_u64()).unwrap_or(0);
        let phrase = seg
            .phrase
            .as_ref()
            .and_then(|p| p.as_str())
            .unwrap_or("")
            .trim()
            .to_string();
        match &mut turn {
            Some(t) if t.0 == who => t.2.push(phrase),
            _ => {
                if let Some(t) = &turn {
                    flush(&mut out, t);
                }
                turn = Some((who, start, vec![phrase]));
            }
        }
    }
    if let Some(t) = &turn {
        flush(&mut out, t);
    }
    out
}

pub(super) fn speaker(p: &str) -> String {
    match p {
        "participantOne" => "Speaker 1".into(),
        "participantTwo" => "Speaker 2".into(),
        other => other.into(),
    }
}
