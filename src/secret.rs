//! Owns the API token's in-memory form: a type that can be handed around but never printed.
//!
//! It has no `Display`, its `Debug` prints `[redacted]`, and the bytes are only reachable through
//! [`Secret::expose`], so a stray `{:?}` in a log line or an error cannot leak the token.
//!
//! Also owns [`Redactor`], which takes credentials back out of text that came from outside: a
//! server may quote what it was sent (a 401 "invalid token 'abc…'"), and whatever it says ends up
//! in logs, the database and `status`. And [`display_url`], the form of a URL that may be shown.

use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for the one place that puts it into a request header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// What replaces a credential in any text we show or keep.
pub const REDACTED: &str = "[redacted]";

/// Shorter "secrets" are not searched for: a one-letter password would shred every message, and
/// no real token is that short.
const MIN_SECRET_LEN: usize = 4;

/// Removes known credentials from text that came from outside before anyone sees or stores it.
///
/// Each credential is searched for in the forms a server could plausibly echo it in: as sent, and
/// for a URL's user info also percent-decoded and as the Basic authorization value reqwest sends.
#[derive(Clone, Default)]
pub struct Redactor {
    needles: Vec<String>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} secrets)", self.needles.len())
    }
}

impl Redactor {
    pub fn new() -> Self {
        Redactor::default()
    }

    /// Adds one credential (ignored if too short to be one).
    pub fn with(mut self, secret: &str) -> Self {
        let s = secret.trim();
        if s.len() >= MIN_SECRET_LEN && !self.needles.iter().any(|n| n == s) {
            self.needles.push(s.to_string());
            // Longest first, so a secret that contains another is replaced whole.
            self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        }
        self
    }

    pub fn with_token(self, token: &Secret) -> Self {
        self.with(token.expose())
    }

    /// Adds the user info of `url` (`https://user:pass@host`), if any.
    pub fn with_url_credentials(mut self, url: &url::Url) -> Self {
        let user = url.username();
        let Some(pass) = url.password() else {
            // A user name alone is sent as Basic `user:`; it is the secret then.
            if !user.is_empty() {
                let decoded = percent_decode(user);
                self = self.with(user).with(&decoded);
                self = self.with(&base64(format!("{decoded}:").as_bytes()));
            }
            return self;
        };
        let (user_d, pass_d) = (percent_decode(user), percent_decode(pass));
        self = self.with(pass).with(&pass_d);
        self.with(&base64(format!("{user_d}:{pass_d}").as_bytes()))
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// Whether `text` holds any of the credentials.
    pub fn finds(&self, text: &str) -> bool {
        self.needles.iter().any(|n| text.contains(n.as_str()))
    }

    /// `body` with every credential replaced, before anything cuts it short: a cut could keep the
    /// start of a token that a later pass would no longer recognise.
    pub fn redact_bytes(&self, body: &[u8]) -> Vec<u8> {
        let mut out = body.to_vec();
        for n in &self.needles {
            let n = n.as_bytes();
            if !out.windows(n.len()).any(|w| w == n) {
                continue;
            }
            let mut next = Vec::with_capacity(out.len());
            let mut i = 0;
            while i < out.len() {
                if out[i..].starts_with(n) {
                    next.extend_from_slice(REDACTED.as_bytes());
                    i += n.len();
                } else {
                    next.push(out[i]);
                    i += 1;
                }
            }
            out = next;
        }
        out
    }

    /// `text` with every credential replaced by [`REDACTED`].
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), REDACTED);
            }
        }
        out
    }
}

/// `url` as it may be printed: user name and password replaced, everything else kept.
pub fn display_url(url: &url::Url) -> String {
    if url.username().is_empty() && url.password().is_none() {
        return url.as_str().to_string();
    }
    let mut shown = url.clone();
    // Setting user info cannot fail on a URL that already has some.
    let _ = shown.set_username("redacted");
    if url.password().is_some() {
        let _ = shown.set_password(Some("redacted"));
    }
    shown.to_string()
}

/// A URL-like string that may not parse (so [`display_url`] cannot be used), with anything
/// between `://` and the last `@` of its authority replaced.
pub fn display_url_text(s: &str) -> String {
    let Some(start) = s.find("://").map(|i| i + 3) else {
        return s.to_string();
    };
    let end = s[start..]
        .find(['/', '?', '#'])
        .map_or(s.len(), |i| start + i);
    match s[start..end].rfind('@') {
        Some(at) => format!("{}redacted@{}", &s[..start], &s[start + at + 1..]),
        None => s.to_string(),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard base64 with padding: the form of a Basic `Authorization` value. Hand-written, as this
/// is its only use.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_text_loses_every_form_of_the_credentials() {
        let url = url::Url::parse("https://ops:p%40ss-w0rd@api.example/v1").unwrap();
        let r = Redactor::new()
            .with_token(&Secret::new("tok-123456"))
            .with_url_credentials(&url);
        let basic = base64(b"ops:p@ss-w0rd");
        let text = format!(
            "invalid token 'tok-123456'; got Basic {basic}; password p@ss-w0rd or p%40ss-w0rd"
        );
        let out = r.redact(&text);
        assert!(r.finds(&text));
        assert!(!r.finds(&out), "{out}");
        assert_eq!(
            out,
            "invalid token '[redacted]'; got Basic [redacted]; password [redacted] or [redacted]"
        );
        assert_eq!(
            r.redact_bytes(b"\xff tok-123456\x00 tok-12345"),
            b"\xff [redacted]\x00 tok-12345"
        );
        // Too short to be a secret: left alone rather than shredding the message.
        assert_eq!(Redactor::new().with("ab").redact("abc"), "abc");
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
    }

    #[test]
    fn urls_are_shown_without_user_info() {
        let u = url::Url::parse("https://user:pass@api.example/v1").unwrap();
        let shown = display_url(&u);
        assert!(
            !shown.contains("pass") && !shown.contains("user"),
            "{shown}"
        );
        assert!(shown.contains("api.example/v1"), "{shown}");
        assert_eq!(
            display_url_text("https://u:p@w@host:99999/v1"),
            "https://redacted@host:99999/v1"
        );
        assert_eq!(display_url_text("not a url"), "not a url");
        let plain = url::Url::parse("https://api.example/v1").unwrap();
        assert_eq!(display_url(&plain), "https://api.example/v1");
    }

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("super-secret-token");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some([redacted])");
        assert_eq!(s.expose(), "super-secret-token");
    }
}
