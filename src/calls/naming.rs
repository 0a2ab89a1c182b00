//! Recorders' naming conventions: what a recording's file name says about its call (the call's id,
//! direction, time and numbers). Pure functions of the name; nothing here touches the disk.

use jiff::civil;
use regex::Regex;

/// `[watch] naming`: how a file's name carries its call.
#[derive(Debug, Clone)]
pub enum Naming {
    /// FreePBX, then FusionPBX; else nothing.
    Auto,
    FreePbx,
    FusionPbx,
    /// Names carry nothing: the id is the recording's path below its watched folder.
    None,
    /// A regex with named groups: `external_id` is the call's id; the others go to metadata.
    Pattern(Regex),
}

/// Why a `naming` value is neither a known convention nor a usable regex.
#[derive(Debug, thiserror::Error)]
pub enum NamingError {
    #[error("is neither auto, freepbx, fusionpbx nor none, and not a valid regex: {0}")]
    NotARegex(#[from] regex::Error),
    #[error(
        "the regex {0:?} has no (?P<external_id>...) group: name the part of the file name that \
         is the call's id"
    )]
    NoExternalId(String),
}

impl Naming {
    pub fn parse(s: &str) -> Result<Naming, NamingError> {
        match s.trim() {
            "" | "auto" => Ok(Naming::Auto),
            "freepbx" => Ok(Naming::FreePbx),
            "fusionpbx" => Ok(Naming::FusionPbx),
            "none" => Ok(Naming::None),
            pattern => {
                let re = Regex::new(pattern)?;
                if !re.capture_names().flatten().any(|n| n == "external_id") {
                    return Err(NamingError::NoExternalId(pattern.to_string()));
                }
                Ok(Naming::Pattern(re))
            }
        }
    }
}

/// Which way a call went, in ElevateAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
    Internal,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
            Direction::Internal => "internal",
        }
    }
}

/// What a name says. Every field is optional: a name may say only some of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FromName {
    pub external_id: Option<String>,
    pub direction: Option<Direction>,
    /// When the recording started, in the recorder's zone (`[declare] timezone`).
    pub recorded: Option<civil::DateTime>,
    /// The customer's number (the caller of an inbound call, the number dialled by an outbound one).
    pub customer_number: Option<String>,
    /// The extension on our side.
    pub agent_extension: Option<String>,
    /// A queue (`q600`) or ring group (`g700`) the call came through.
    pub queue: Option<String>,
    /// A custom pattern's other named groups, in pattern order.
    pub fields: Vec<(String, String)>,
}

/// Reads the file name (without folders) as `naming` says. `None`: the name follows no convention.
pub fn recognise(naming: &Naming, file_name: &str) -> Option<FromName> {
    match naming {
        Naming::Auto => freepbx(file_name).or_else(|| fusionpbx(file_name)),
        Naming::FreePbx => freepbx(file_name),
        Naming::FusionPbx => fusionpbx(file_name),
        Naming::None => None,
        Naming::Pattern(re) => pattern(re, file_name),
    }
}

fn freepbx_re() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        // {kind}-{to}-{from}-{YYYYMMDD}-{HHMMSS}-{uniqueid}.{ext}; the uniqueid is Asterisk's
        // `epoch.sequence`, and is what the CDR's `uniqueid` and `recordingfile` columns hold.
        Regex::new(
            r"^(?P<kind>in|out|external|internal|exten|ondemand|q[0-9]+|g[0-9]+)-(?P<to>[^-]*)-(?P<from>[^-]*)-(?P<date>[0-9]{8})-(?P<time>[0-9]{6})-(?P<uid>[0-9]+\.[0-9]+)\.[A-Za-z0-9]+$",
        )
        .expect("valid regex")
    })
}

fn freepbx(name: &str) -> Option<FromName> {
    let c = freepbx_re().captures(name)?;
    let kind = &c["kind"];
    let (to, from) = (non_empty(&c["to"]), non_empty(&c["from"]));
    let (direction, customer, agent, queue) = match kind {
        "in" => (Some(Direction::Inbound), from, to, None),
        "out" | "external" => (Some(Direction::Outbound), to, from, None),
        "internal" | "exten" => (Some(Direction::Internal), None, from, None),
        q if q.starts_with('q') || q.starts_with('g') => {
            (Some(Direction::Inbound), from, None, Some(q.to_string()))
        }
        // `ondemand`: recorded with *1 during any kind of call.
        _ => (None, None, None, None),
    };
    Some(FromName {
        external_id: Some(c["uid"].to_string()),
        direction,
        recorded: date_time(&c["date"], &c["time"]),
        customer_number: customer,
        agent_extension: agent,
        queue,
        fields: Vec::new(),
    })
}

fn fusionpbx(name: &str) -> Option<FromName> {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(
            r"^(?P<uuid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\.[A-Za-z0-9]+$",
        )
        .expect("valid regex")
    });
    let c = re.captures(name)?;
    Some(FromName {
        // FreeSWITCH's call uuid, as its XML CDR names it (lower case).
        external_id: Some(c["uuid"].to_ascii_lowercase()),
        ..FromName::default()
    })
}

fn pattern(re: &Regex, name: &str) -> Option<FromName> {
    let c = re.captures(name)?;
    let mut out = FromName::default();
    for group in re.capture_names().flatten() {
        let Some(value) = c.name(group).map(|m| m.as_str()).and_then(non_empty) else {
            continue;
        };
        match group {
            "external_id" => out.external_id = Some(value),
            "direction" => {
                out.direction = match value.to_ascii_lowercase().as_str() {
                    "in" | "inbound" | "incoming" => Some(Direction::Inbound),
                    "out" | "outbound" | "outgoing" => Some(Direction::Outbound),
                    "internal" => Some(Direction::Internal),
                    _ => None,
                }
            }
            _ => out.fields.push((group.to_string(), value)),
        }
    }
    out.external_id.as_ref()?;
    Some(out)
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn date_time(date: &str, time: &str) -> Option<civil::DateTime> {
    let n = |s: &str| s.parse::<i32>().ok();
    let d = civil::Date::new(
        n(&date[0..4])? as i16,
        n(&date[4..6])? as i8,
        n(&date[6..8])? as i8,
    )
    .ok()?;
    let t = civil::Time::new(
        n(&time[0..2])? as i8,
        n(&time[2..4])? as i8,
        n(&time[4..6])? as i8,
        0,
    )
    .ok()?;
    Some(d.to_datetime(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(name: &str) -> Option<FromName> {
        recognise(&Naming::Auto, name)
    }

    #[test]
    fn freepbx_names_of_every_kind() {
        let out = auto("out-5551234-1001-20261201-101500-1764584100.42.wav").unwrap();
        assert_eq!(out.external_id.as_deref(), Some("1764584100.42"));
        assert_eq!(out.direction, Some(Direction::Outbound));
        assert_eq!(out.customer_number.as_deref(), Some("5551234"));
        assert_eq!(out.agent_extension.as_deref(), Some("1001"));
        assert_eq!(
            out.recorded,
            Some(civil::date(2026, 12, 1).at(10, 15, 0, 0))
        );

        let inbound = auto("in-8005550100-+14155550123-20261201-235959-1764633599.7.wav").unwrap();
        assert_eq!(inbound.direction, Some(Direction::Inbound));
        assert_eq!(inbound.customer_number.as_deref(), Some("+14155550123"));
        assert_eq!(inbound.agent_extension.as_deref(), Some("8005550100"));

        let queue = auto("q600-600-5551234-20261201-090000-1764579600.3.mp3").unwrap();
        assert_eq!(queue.queue.as_deref(), Some("q600"));
        assert_eq!(queue.direction, Some(Direction::Inbound));
        assert_eq!(queue.customer_number.as_deref(), Some("5551234"));

        let exten = auto("exten-1002-1001-20261201-090000-1764579600.4.wav").unwrap();
        assert_eq!(exten.direction, Some(Direction::Internal));
        assert_eq!(exten.agent_extension.as_deref(), Some("1001"));
        assert_eq!(exten.customer_number, None);

        // Anonymous callers leave a field empty; an impossible date is no date, not a failure.
        let anon = auto("in-100--20261301-090000-1764579600.5.wav").unwrap();
        assert_eq!(anon.customer_number, None);
        assert_eq!(anon.recorded, None);
        assert_eq!(anon.external_id.as_deref(), Some("1764579600.5"));

        let ondemand = auto("ondemand-1001-5551234-20261201-090000-1764579600.6.wav").unwrap();
        assert_eq!(ondemand.direction, None);
    }

    #[test]
    fn fusionpbx_uuids_and_names_that_are_neither() {
        let f = auto("A1B2C3D4-0000-4000-8000-00000000abcd.wav").unwrap();
        assert_eq!(
            f.external_id.as_deref(),
            Some("a1b2c3d4-0000-4000-8000-00000000abcd")
        );
        for name in [
            "meeting.wav",
            "out-5551234-1001-20261201-101500.wav",
            "a1b2c3d4-0000-4000-8000-00000000abcd.wav.part",
            "xin-1-2-20261201-101500-1.2.wav",
        ] {
            assert_eq!(auto(name), None, "{name}");
        }
        assert_eq!(
            recognise(
                &Naming::None,
                "out-5551234-1001-20261201-101500-1764584100.42.wav"
            ),
            None
        );
        assert_eq!(
            recognise(&Naming::FusionPbx, "out-1-2-20261201-101500-1.2.wav"),
            None
        );
    }

    #[test]
    fn a_custom_pattern_names_its_id_and_fields() {
        let n = Naming::parse(
            r"^(?P<agent>[a-z]+)_(?P<direction>IN|OUT)_(?P<external_id>[0-9]+)\.wav$",
        )
        .unwrap();
        let got = recognise(&n, "alice_OUT_123456.wav").unwrap();
        assert_eq!(got.external_id.as_deref(), Some("123456"));
        assert_eq!(got.direction, Some(Direction::Outbound));
        assert_eq!(got.fields, vec![("agent".to_string(), "alice".to_string())]);
        assert_eq!(recognise(&n, "alice_SIDEWAYS_1.wav"), None);

        let err = Naming::parse(r"^(?P<id>[0-9]+)\.wav$")
            .unwrap_err()
            .to_string();
        assert!(err.contains("external_id"), "{err}");
        let err = Naming::parse(r"^(?P<external_id>[0-9+\.wav$")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid regex"), "{err}");
    }
}
