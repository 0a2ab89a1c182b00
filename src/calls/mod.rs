//! Owns a recording's call: the id it is known by (ElevateAI's `externalIdentifier`, the key that
//! joins a transcript to its CDR or CRM record) and the call's facts as ElevateAI `metadata`, read
//! from the recorder's naming convention ([`naming`]).

pub mod index;
pub mod naming;
pub mod sidecar;

use std::path::Path;

use jiff::tz::TimeZone;
use serde_json::{Map, Value, json};

use naming::{FromName, Naming};

/// Who a recording is, as declared.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The call's id from its name; else the recording's path below its watched folder.
    pub external_id: String,
    /// ElevateAI's shape; empty when the name says nothing. Sent only with
    /// `[declare] send_metadata`.
    pub metadata: Map<String, Value>,
}

/// The call recorded at `path`, found under the watched folder `root`. `tz` is the zone the
/// recorder writes its names' date-times in. What a sidecar says wins over the name.
pub fn identify_with(
    naming: &Naming,
    tz: &TimeZone,
    root: &Path,
    path: &Path,
    sidecar: Option<&sidecar::Sidecar>,
) -> Call {
    let mut call = identify(naming, tz, root, path);
    if let Some(s) = sidecar {
        if let Some(id) = &s.external_id {
            call.external_id = id.clone();
        }
        if let Some(m) = &s.metadata {
            call.metadata.extend(m.clone());
        }
    }
    call
}

/// [`identify_with`] from the name alone.
pub fn identify(naming: &Naming, tz: &TimeZone, root: &Path, path: &Path) -> Call {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let from = naming::recognise(naming, &name).unwrap_or_default();
    let external_id = from.external_id.clone().unwrap_or_else(|| {
        path.strip_prefix(root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    });
    Call {
        external_id,
        metadata: metadata(&from, tz),
    }
}

fn metadata(from: &FromName, tz: &TimeZone) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(d) = from.direction {
        m.insert("direction".into(), json!(d.as_str()));
    }
    // An hour that does not exist in the zone (a DST gap) is shifted forward, as clocks were.
    if let Some(ts) = from
        .recorded
        .and_then(|dt| dt.to_zoned(tz.clone()).ok())
        .map(|z| z.timestamp())
    {
        m.insert(
            "recorded".into(),
            json!(ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
        );
    }
    if let Some(n) = &from.customer_number {
        m.insert("customer".into(), json!({ "phoneNumber": n }));
    }
    if let Some(x) = &from.agent_extension {
        m.insert("agent".into(), json!({ "extension": x }));
    }
    // A pattern's own groups: `agent__id` is `{"agent": {"id": …}}` (group names cannot hold a dot).
    for (key, value) in &from.fields {
        let mut parts: Vec<&str> = key.split("__").filter(|p| !p.is_empty()).collect();
        let Some(last) = parts.pop() else { continue };
        let mut at = &mut m;
        for p in parts {
            let slot = at.entry(p.to_string()).or_insert_with(|| json!({}));
            if !slot.is_object() {
                *slot = json!({});
            }
            at = slot.as_object_mut().expect("an object");
        }
        at.insert(last.to_string(), json!(value));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freepbx_call_in_its_zone_becomes_utc_metadata() {
        let tz = TimeZone::get("America/New_York").unwrap();
        let root = Path::new("/var/spool/asterisk/monitor");
        let path = root.join("2026/12/01/out-5551234-1001-20261201-101500-1764584100.42.wav");
        let call = identify(&Naming::Auto, &tz, root, &path);
        assert_eq!(call.external_id, "1764584100.42");
        assert_eq!(
            Value::Object(call.metadata),
            json!({
                "direction": "outbound",
                "recorded": "2026-12-01T15:15:00Z",
                "customer": { "phoneNumber": "5551234" },
                "agent": { "extension": "1001" },
            })
        );
    }

    #[test]
    fn a_name_without_a_convention_is_known_by_its_path_below_the_root() {
        let root = Path::new("/rec");
        let call = identify(
            &Naming::Auto,
            &TimeZone::UTC,
            root,
            &root.join("site-a/2026/meeting.wav"),
        );
        assert_eq!(call.external_id, "site-a/2026/meeting.wav");
        assert!(call.metadata.is_empty());
    }

    #[test]
    fn pattern_groups_nest_on_double_underscores() {
        let n = Naming::parse(r"^(?P<agent__id>[a-z]+)-(?P<external_id>[0-9]+)\.wav$").unwrap();
        let call = identify(
            &n,
            &TimeZone::UTC,
            Path::new("/r"),
            Path::new("/r/bob-77.wav"),
        );
        assert_eq!(call.external_id, "77");
        assert_eq!(
            Value::Object(call.metadata),
            json!({ "agent": { "id": "bob" } })
        );
    }
}
