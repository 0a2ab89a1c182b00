//! The configuration as the file spells it: one serde struct per section, each with its defaults
//! beside the key names, and the list of known keys derived from these structs (so a key added
//! here is known everywhere at once). Values stay strings until [`super::validate`] reads them.

use std::str::FromStr;
use std::sync::LazyLock;

use serde::Deserialize;
use serde::de::DeserializeOwned;

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Raw {
    pub(super) api: RawApi,
    pub(super) declare: RawDeclare,
    pub(super) watch: RawWatch,
    pub(super) queue: RawQueue,
    pub(super) upload: RawUpload,
    pub(super) after_upload: RawAfterUpload,
    pub(super) results: RawResults,
    pub(super) metrics: RawMetrics,
    pub(super) log: RawLog,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawApi {
    pub(super) base_url: String,
    pub(super) token: Option<String>,
    pub(super) token_file: Option<String>,
    pub(super) connect_timeout: String,
    pub(super) stall_timeout: String,
    pub(super) pause_recheck: String,
    #[serde(deserialize_with = "lenient")]
    pub(super) allow_insecure_http: bool,
    pub(super) ca_file: String,
}

impl Default for RawApi {
    fn default() -> Self {
        RawApi {
            base_url: "https://api.elevateai.com/v1".into(),
            token: None,
            token_file: None,
            connect_timeout: "10s".into(),
            stall_timeout: "60s".into(),
            pause_recheck: "60s".into(),
            allow_insecure_http: false,
            ca_file: String::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawDeclare {
    pub(super) language_tag: String,
    pub(super) vertical: String,
    pub(super) model: Option<String>,
    pub(super) transcription_mode: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) include_ai_results: bool,
    #[serde(deserialize_with = "lenient")]
    pub(super) send_metadata: bool,
    pub(super) timezone: String,
}

impl Default for RawDeclare {
    fn default() -> Self {
        RawDeclare {
            language_tag: "en-us".into(),
            vertical: "default".into(),
            model: Some("echo".into()),
            transcription_mode: None,
            include_ai_results: false,
            send_metadata: false,
            timezone: "local".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawWatch {
    pub(super) paths: Vec<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) recursive: bool,
    pub(super) extensions: Vec<String>,
    pub(super) ignore: Vec<String>,
    pub(super) settle: String,
    pub(super) orphan_grace: String,
    pub(super) poll_interval: String,
    pub(super) rescan_interval: String,
    pub(super) naming: String,
    pub(super) sidecar_wait: String,
    pub(super) hook_dir: String,
}

impl Default for RawWatch {
    fn default() -> Self {
        RawWatch {
            paths: Vec::new(),
            recursive: true,
            extensions: [
                "wav", "mp3", "ogg", "opus", "flac", "m4a", "gsm", "wma", "aac",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            ignore: [".*", "*.part", "*.tmp", "*.filepart", "*~"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            settle: "5s".into(),
            orphan_grace: "10m".into(),
            poll_interval: "0s".into(),
            rescan_interval: "10m".into(),
            naming: "auto".into(),
            sidecar_wait: "0s".into(),
            hook_dir: super::DEFAULT_HOOK_DIR.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawQueue {
    pub(super) database: String,
    pub(super) keep_history: String,
    pub(super) lease: String,
}

impl Default for RawQueue {
    fn default() -> Self {
        RawQueue {
            database: "/var/lib/callferry/queue.db".into(),
            keep_history: "90d".into(),
            lease: "30s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawUpload {
    #[serde(deserialize_with = "lenient")]
    pub(super) workers: i64,
    #[serde(deserialize_with = "lenient")]
    pub(super) max_attempts: i64,
    #[serde(deserialize_with = "lenient")]
    pub(super) max_declares: i64,
    pub(super) max_age: String,
    pub(super) backoff_initial: String,
    pub(super) backoff_max: String,
    #[serde(deserialize_with = "lenient")]
    pub(super) max_bytes_per_sec: i64,
    pub(super) shutdown_grace: String,
}

impl Default for RawUpload {
    fn default() -> Self {
        RawUpload {
            workers: 4,
            max_attempts: 12,
            max_declares: 3,
            max_age: "7d".into(),
            backoff_initial: "2s".into(),
            backoff_max: "10m".into(),
            max_bytes_per_sec: 0,
            shutdown_grace: "30s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawAfterUpload {
    pub(super) action: String,
    pub(super) move_to: String,
    pub(super) when: Option<String>,
}

impl Default for RawAfterUpload {
    fn default() -> Self {
        RawAfterUpload {
            action: "keep".into(),
            move_to: String::new(),
            when: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawResults {
    #[serde(deserialize_with = "lenient")]
    pub(super) enabled: bool,
    pub(super) output_dir: String,
    pub(super) kinds: Vec<String>,
    pub(super) poll_interval: String,
    pub(super) max_wait: String,
    #[serde(deserialize_with = "lenient")]
    pub(super) max_requests_per_sec: f64,
    pub(super) format: String,
    #[serde(deserialize_with = "lenient")]
    pub(super) max_bytes: i64,
    #[serde(deserialize_with = "lenient")]
    pub(super) delete_remote_after_fetch: bool,
}

impl Default for RawResults {
    fn default() -> Self {
        RawResults {
            enabled: false,
            output_dir: "/var/lib/callferry/results".into(),
            kinds: vec!["transcript".into(), "punctuated".into(), "ai".into()],
            poll_interval: "30s".into(),
            max_wait: "24h".into(),
            max_requests_per_sec: 10.0,
            format: "json".into(),
            max_bytes: 256 * 1024 * 1024,
            delete_remote_after_fetch: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: String,
    pub(super) unhealthy_after: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            listen: String::new(),
            unhealthy_after: "10m".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: String,
    pub(super) level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Environment values always arrive as strings; accept `"8"` where a number is wanted and `"true"`
/// where a bool is, while a TOML file may use the native types.
fn lenient<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: FromStr + DeserializeOwned,
    T::Err: std::fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        Native(T),
        Text(String),
    }
    match Either::<T>::deserialize(de)? {
        Either::Native(v) => Ok(v),
        Either::Text(s) => s.trim().parse::<T>().map_err(|e| {
            serde::de::Error::custom(format!("cannot read {s:?} as the expected type: {e}"))
        }),
    }
}

/// Every section and its keys, in the structs' order, read from the structs above: serde's derive
/// hands each struct's field names to `deserialize_struct`, and [`probe`] records them. A key
/// added to a struct is known (and suggested, and listed in messages) with nothing else to edit.
pub(super) static KNOWN_KEYS: LazyLock<Vec<(&'static str, &'static [&'static str])>> =
    LazyLock::new(|| {
        let mut sections = Vec::new();
        Raw::deserialize(probe::Sections(&mut sections))
            .expect("the raw configuration structs are plain structs of sections");
        sections
    });

/// A deserializer that produces nothing but the field names serde's derive declares. Each section
/// is answered with an empty map, so `#[serde(default)]` builds it and the walk goes on.
mod probe {
    use serde::de::value::{Error, StrDeserializer};
    use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
    use serde::forward_to_deserialize_any;

    type Keys = (&'static str, &'static [&'static str]);

    /// The top level: its fields are the sections.
    pub struct Sections<'a>(pub &'a mut Vec<Keys>);

    impl<'de> de::Deserializer<'de> for Sections<'_> {
        type Error = Error;
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_map(EachSection {
                names: fields.iter(),
                current: "",
                out: self.0,
            })
        }
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(de::Error::custom(
                "the configuration's top level is not a struct",
            ))
        }
        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    struct EachSection<'a> {
        names: std::slice::Iter<'static, &'static str>,
        current: &'static str,
        out: &'a mut Vec<Keys>,
    }

    impl<'de> MapAccess<'de> for EachSection<'_> {
        type Error = Error;
        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Error> {
            let Some(name) = self.names.next() else {
                return Ok(None);
            };
            self.current = name;
            let key: StrDeserializer<'_, Error> = name.into_deserializer();
            seed.deserialize(key).map(Some)
        }
        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
            let mut keys: &'static [&'static str] = &[];
            let value = seed.deserialize(Section(&mut keys))?;
            self.out.push((self.current, keys));
            Ok(value)
        }
    }

    /// One section: records its fields and answers with an empty table.
    struct Section<'a>(&'a mut &'static [&'static str]);

    impl<'de> de::Deserializer<'de> for Section<'_> {
        type Error = Error;
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            *self.0 = fields;
            visitor.visit_map(Empty)
        }
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(de::Error::custom("a configuration section is not a struct"))
        }
        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    struct Empty;

    impl<'de> MapAccess<'de> for Empty {
        type Error = Error;
        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            _: K,
        ) -> Result<Option<K::Value>, Error> {
            Ok(None)
        }
        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, _: V) -> Result<V::Value, Error> {
            Err(de::Error::custom("an empty table has no values"))
        }
    }
}
