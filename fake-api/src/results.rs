//! Canned result documents, shaped like ElevateAI's public docs
//! (docs.elevateai.com "Get Phrase-by-Phrase Transcript", "Get Punctuated
//! Transcript", "Get CX AI") and the models of its .NET SDK.
//!
//! Every processed interaction gets the same short billing-dispute call;
//! the timings and scores are derived from the text so the three documents
//! agree with each other.

use std::sync::LazyLock;

use serde_json::{Value, json};

const AGENT: &str = "participantOne";
const CUSTOMER: &str = "participantTwo";

const CONVERSATION: &[(&str, &str)] = &[
    (
        AGENT,
        "Thank you for calling Northwind Energy, this is Anna. How can I help you today?",
    ),
    (
        CUSTOMER,
        "Hi Anna. I got my bill this morning and it's almost twice what I usually pay.",
    ),
    (
        AGENT,
        "I'm sorry to hear that, let me take a look. Can I have your account number, please?",
    ),
    (CUSTOMER, "Sure, it's four four seven one two nine."),
    (
        AGENT,
        "Thank you. I can see the March meter reading was estimated, which is why the amount is higher.",
    ),
    (CUSTOMER, "So I don't actually owe that much?"),
    (
        AGENT,
        "That's right. If you give me a current reading, I'll correct the bill and send a new one today.",
    ),
    (CUSTOMER, "Great. The meter says three eight two five one."),
    (
        AGENT,
        "Perfect, I've updated it and your new balance is sixty two dollars. Is there anything else I can help with?",
    ),
    (
        CUSTOMER,
        "No, that's all. Thanks for sorting it out so quickly.",
    ),
];

const WORD_MS: u64 = 310;
const TURN_GAP_MS: u64 = 450;

struct Word {
    participant: &'static str,
    /// Lower-cased, punctuation stripped: the phrase-by-phrase form.
    plain: String,
    /// As written, for rebuilding punctuated sentences.
    raw: &'static str,
    start: u64,
    end: u64,
    score: f64,
}

struct Turn {
    participant: &'static str,
    start: u64,
    end: u64,
}

struct Timeline {
    words: Vec<Word>,
    turns: Vec<Turn>,
    duration: u64,
}

static TIMELINE: LazyLock<Timeline> = LazyLock::new(timeline);

fn timeline() -> Timeline {
    let mut words = Vec::new();
    let mut turns = Vec::new();
    let mut t = 1_410;
    for (turn_no, (participant, text)) in CONVERSATION.iter().enumerate() {
        let start = t;
        for (i, raw) in text.split_whitespace().enumerate() {
            let plain: String = raw
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .flat_map(char::to_lowercase)
                .collect();
            // Longer words take longer to say; a little per-word jitter keeps
            // the offsets from looking machine-made.
            let len = WORD_MS + 12 * plain.len() as u64 + ((turn_no * 7 + i * 13) % 5) as u64 * 9;
            let score = round(0.81 + ((turn_no * 31 + i * 17) % 19) as f64 / 100.0, 2);
            words.push(Word {
                participant,
                plain,
                raw,
                start: t,
                end: t + len,
                score,
            });
            t += len;
        }
        turns.push(Turn {
            participant,
            start,
            end: t,
        });
        t += TURN_GAP_MS;
    }
    Timeline {
        words,
        turns,
        duration: t + 600,
    }
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// `{phrases, phraseSegments}` for the words selected by `keep`.
fn phrase_block(keep: impl Fn(&Word) -> bool) -> Value {
    let mut phrases: Vec<&str> = Vec::new();
    let mut segments = Vec::new();
    for w in TIMELINE.words.iter().filter(|w| keep(w)) {
        let index = match phrases.iter().position(|p| *p == w.plain) {
            Some(i) => i,
            None => {
                phrases.push(&w.plain);
                phrases.len() - 1
            }
        };
        segments.push(json!({
            "startTimeOffset": w.start,
            "endTimeOffset": w.end,
            "phraseIndex": index,
            "score": w.score,
        }));
    }
    json!({ "phrases": phrases, "phraseSegments": segments })
}

pub(super) static TRANSCRIPT: LazyLock<Value> = LazyLock::new(|| {
    json!({
        "allParticipants": phrase_block(|_| true),
        "participantOne": phrase_block(|w| w.participant == AGENT),
        "participantTwo": phrase_block(|w| w.participant == CUSTOMER),
        "redactionSegments": [],
    })
});

pub(super) static PUNCTUATED: LazyLock<Value> = LazyLock::new(|| {
    let mut segments = Vec::new();
    let mut sentence: Vec<&Word> = Vec::new();
    let words = &TIMELINE.words;
    for (i, w) in words.iter().enumerate() {
        sentence.push(w);
        let turn_ends = words
            .get(i + 1)
            .is_none_or(|n| n.participant != w.participant);
        if w.raw.ends_with(['.', '?', '!']) || turn_ends {
            let score = sentence.iter().map(|w| w.score).sum::<f64>() / sentence.len() as f64;
            let text: Vec<&str> = sentence.iter().map(|w| w.raw).collect();
            segments.push(json!({
                "participant": w.participant,
                "startTimeOffset": sentence[0].start,
                "endTimeOffset": w.end,
                "phrase": text.join(" "),
                "score": round(score, 4),
            }));
            sentence.clear();
        }
    }
    json!({ "sentenceSegments": segments, "redactionSegments": [] })
});

/// Behavioural models of the "Customer Satisfaction" bundle as named in the
/// CX AI docs.
const CSAT_MODELS: &[&str] = &[
    "acknowledgeLoyalty",
    "activeListening",
    "beEmpathetic",
    "buildRapport",
    "demonstrateOwnership",
    "effectiveQuestioning",
    "inappropriateActions",
    "promoteSelfService",
    "setClearExpectations",
];

const VULNERABLE_MODELS: &[&str] = &[
    "anxiety",
    "financialDifficulty",
    "healthConcern",
    "lifeEvent",
];

fn bundle(name: &str, models: &[&str], salt: usize) -> Value {
    let duration = TIMELINE.duration as f64;
    let models: Vec<Value> = models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let k = (i * 7 + salt * 11) as f64;
            let score = 2.0 + (k * 0.37) % 6.0;
            let min = score - 1.0 - (k * 0.13) % 1.5;
            let max = score + 0.8 + (k * 0.29) % 2.0;
            let q = |n: f64| round(min + (max - min) * ((k + n * 3.1) * 0.21 % 1.0), 7);
            json!({
                "name": m,
                "score": round(score, 7),
                "minScore": round(min, 7),
                "minScoreOffset": ((k * 0.11 % 1.0) * duration) as u64,
                "maxScore": round(max, 7),
                "maxScoreOffset": ((k * 0.17 % 1.0) * duration) as u64,
                "quartile1": q(1.0),
                "quartile2": q(2.0),
                "quartile3": q(3.0),
                "quartile4": q(4.0),
            })
        })
        .collect();
    json!({ "name": name, "models": models })
}

/// Voice while the selected speakers talk, silence in between.
fn voice_activity(keep: impl Fn(&Turn) -> bool) -> Value {
    let mut segments = Vec::new();
    let mut t = 0;
    for turn in TIMELINE.turns.iter().filter(|t| keep(t)) {
        if turn.start > t {
            segments.push(
                json!({"startTimeOffset": t, "endTimeOffset": turn.start, "result": "silence"}),
            );
        }
        segments.push(
            json!({"startTimeOffset": turn.start, "endTimeOffset": turn.end, "result": "voice"}),
        );
        t = turn.end;
    }
    if TIMELINE.duration > t {
        segments.push(
            json!({"startTimeOffset": t, "endTimeOffset": TIMELINE.duration, "result": "silence"}),
        );
    }
    Value::Array(segments)
}

pub(super) static AI_RESULTS: LazyLock<Value> = LazyLock::new(|| {
    json!({
        "allParticipants": {
            "enlightenBundles": [
                bundle("Customer Satisfaction", CSAT_MODELS, 0),
                bundle("Vulnerable Customer", VULNERABLE_MODELS, 1),
            ],
            "voiceActivitySegments": voice_activity(|_| true),
        },
        "participantOne": {
            "enlightenBundles": [bundle("Customer Satisfaction", CSAT_MODELS, 2)],
            "voiceActivitySegments": voice_activity(|t| t.participant == AGENT),
        },
        "participantTwo": {
            "enlightenBundles": [bundle("Vulnerable Customer", VULNERABLE_MODELS, 3)],
            "voiceActivitySegments": voice_activity(|t| t.participant == CUSTOMER),
        },
    })
});
