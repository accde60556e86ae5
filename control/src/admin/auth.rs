//! Who may use the admin API: bearer tokens from `[admin] token_file`, one for the read
//! routes and one for the write routes.
//!
//! Invariants:
//! - the write token grants every route; the read token grants the read routes only;
//! - a read route is open when no read token is set; a write route without a write token
//!   is open only on a listener nobody else can reach (a unix socket, or a loopback TCP
//!   address that no service forwards to), and refused everywhere else;
//! - `/healthz` and `/readyz` are always open: they tell only whether sluice runs;
//! - tokens are compared in constant time and never printed (their `Debug` hides them).

use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

/// Shortest token accepted, in bytes: a token is a secret, not a password to remember.
pub const MIN_TOKEN_LEN: usize = 16;
/// Largest token file read.
pub const MAX_TOKEN_FILE: u64 = 64 * 1024;

/// The tokens of one token file.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    pub read: Option<String>,
    pub write: Option<String>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |t: &Option<String>| if t.is_some() { "<set>" } else { "<none>" };
        write!(f, "Tokens {{ read: {}, write: {} }}", shown(&self.read), shown(&self.write))
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: health and readiness.
    Open,
    Read,
    Write,
}

/// Why a request was refused: 401 (no valid token) or 403 (a valid token that does not
/// grant the route, or a write route on a listener where writes need a token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

/// The admin API's access policy, fixed at start; the tokens are passed to each check
/// (a reload may change them).
#[derive(Debug, Clone)]
pub struct Policy {
    /// Write routes may be used without a token: the listener is private (see the module
    /// doc). Decided at start from the listen address and the services.
    pub private_listener: bool,
    /// The listener, as shown in refusals.
    pub listener: String,
}

impl Policy {
    /// Decides a request that needs `need` and presented `presented` (the token of an
    /// `Authorization: Bearer` header, or the password of a `Basic` one).
    pub fn check(
        &self,
        tokens: &Tokens,
        need: Need,
        presented: Option<&str>,
    ) -> Result<(), Refused> {
        let matches = |token: &Option<String>| {
            token.as_deref().zip(presented).is_some_and(|(t, p)| same(t.as_bytes(), p.as_bytes()))
        };
        let is_write = matches(&tokens.write);
        let is_read = is_write || matches(&tokens.read);
        let unauthorized = |what: &str| Refused {
            status: 401,
            message: match presented {
                Some(_) => format!("the token presented is not a valid {what} token"),
                None => format!("this route needs the {what} token (Authorization: Bearer ...)"),
            },
        };
        match need {
            Need::Open => Ok(()),
            Need::Read if tokens.read.is_none() && tokens.write.is_none() => Ok(()),
            Need::Read if tokens.read.is_none() && presented.is_none() => Ok(()),
            Need::Read if is_read => Ok(()),
            Need::Read => Err(unauthorized("read")),
            Need::Write if is_write => Ok(()),
            Need::Write if tokens.write.is_some() && is_read => Err(Refused {
                status: 403,
                message: "the read token does not grant write routes; use the write token".into(),
            }),
            Need::Write if tokens.write.is_some() => Err(unauthorized("write")),
            Need::Write if self.private_listener => Ok(()),
            Need::Write => Err(Refused {
                status: 403,
                message: format!(
                    "write routes are refused on {} without a write token: set `write` in \
                     admin.token_file",
                    self.listener
                ),
            }),
        }
    }
}

/// Compares two secrets in time that depends on their lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token an `Authorization` header presents: `Bearer TOKEN`, or `Basic` with the token
/// as password (what a browser sends after its login prompt; the user name is ignored).
pub fn presented(authorization: &str) -> Option<String> {
    let (scheme, value) = authorization.trim().split_once(' ')?;
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(value.to_string());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(value)?).ok()?;
    decoded.split_once(':').map(|(_, password)| password.to_string())
}

/// Standard base64 (RFC 4648, with or without padding); `None` on any other character.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.trim_end_matches('=').bytes() {
        acc = (acc << 6) | u32::from(value(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The token file as written: TOML with `read` and/or `write`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    read: Option<Spanned<String>>,
    write: Option<Spanned<String>>,
}

/// An error in a token file: its key, the byte span and the message (located by the
/// caller like a config error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError {
    pub span: Range<usize>,
    pub key: String,
    pub message: String,
}

/// Parses a token file's text.
pub fn parse_tokens(text: &str) -> Result<Tokens, Vec<TokenError>> {
    let raw: TokenFile = toml::from_str(text).map_err(|e| {
        vec![TokenError {
            span: e.span().unwrap_or(0..0),
            key: "(file)".into(),
            message: e.message().trim().to_string(),
        }]
    })?;
    let mut errors = Vec::new();
    let mut take = |value: Option<Spanned<String>>, key: &str| {
        let value = value?;
        let token = value.get_ref().trim();
        let bad = if token.len() < MIN_TOKEN_LEN {
            Some(format!("a token has at least {MIN_TOKEN_LEN} characters"))
        } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
            Some("a token is printable ASCII without spaces".to_string())
        } else {
            None
        };
        match bad {
            Some(message) => {
                errors.push(TokenError { span: value.span(), key: key.into(), message });
                None
            }
            None => Some(token.to_string()),
        }
    };
    let tokens = Tokens { read: take(raw.read, "read"), write: take(raw.write, "write") };
    if errors.is_empty() && tokens.read.is_none() && tokens.write.is_none() {
        errors.push(TokenError {
            span: 0..0,
            key: "(file)".into(),
            message: "a token file sets `read`, `write` or both".into(),
        });
    }
    if errors.is_empty() {
        Ok(tokens)
    } else {
        Err(errors)
    }
}

/// Reads a token file, at most [`MAX_TOKEN_FILE`] bytes of it.
pub fn read_token_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(std::io::Error::other(format!("larger than {MAX_TOKEN_FILE} bytes")));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "read-token-0123456789";
    const W: &str = "write-token-0123456789";

    fn policy(read: Option<&str>, write: Option<&str>, private: bool) -> (Policy, Tokens) {
        let policy = Policy { private_listener: private, listener: "http://0.0.0.0:9900".into() };
        (policy, Tokens { read: read.map(Into::into), write: write.map(Into::into) })
    }

    fn status(p: &(Policy, Tokens), need: Need, token: Option<&str>) -> u16 {
        p.0.check(&p.1, need, token).map_or_else(|r| r.status, |()| 200)
    }

    #[test]
    fn tokens_grant_their_routes_and_no_more() {
        let p = policy(Some(R), Some(W), false);
        assert_eq!(status(&p, Need::Read, None), 401);
        assert_eq!(status(&p, Need::Read, Some("nope-nope-nope-nope")), 401);
        assert_eq!(status(&p, Need::Read, Some(R)), 200);
        assert_eq!(status(&p, Need::Read, Some(W)), 200);
        assert_eq!(status(&p, Need::Write, None), 401);
        assert_eq!(status(&p, Need::Write, Some(R)), 403);
        assert_eq!(status(&p, Need::Write, Some(W)), 200);
        assert_eq!(status(&p, Need::Open, None), 200);
    }

    #[test]
    fn without_a_write_token_writes_are_open_on_private_listeners_only() {
        assert_eq!(status(&policy(None, None, true), Need::Write, None), 200);
        assert_eq!(status(&policy(None, None, false), Need::Write, None), 403);
        assert_eq!(status(&policy(Some(R), None, false), Need::Write, Some(R)), 403);
        assert_eq!(status(&policy(None, None, false), Need::Read, None), 200);
        // A write token alone leaves reads open, but a wrong token is still refused.
        let p = policy(None, Some(W), false);
        assert_eq!(status(&p, Need::Read, None), 200);
        assert_eq!(status(&p, Need::Read, Some("wrong-wrong-wrong-wrong")), 401);
    }

    #[test]
    fn bearer_and_basic_headers_present_the_token() {
        assert_eq!(presented("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(presented("bearer  abc ").as_deref(), Some("abc"));
        // "admin:s3cret" in base64.
        assert_eq!(presented("Basic YWRtaW46czNjcmV0").as_deref(), Some("s3cret"));
        assert_eq!(presented("Basic !!!"), None);
        assert_eq!(presented("Digest abc"), None);
        assert_eq!(base64_decode("YQ"), Some(b"a".to_vec()));
    }

    #[test]
    fn token_files_are_validated_with_their_keys() {
        let t = parse_tokens(&format!("read = \"{R}\"\nwrite = \"{W}\"\n")).unwrap();
        assert_eq!((t.read.as_deref(), t.write.as_deref()), (Some(R), Some(W)));
        let e = parse_tokens("read = \"short\"\n").unwrap_err();
        assert_eq!(e[0].key, "read");
        let e = parse_tokens("reed = \"x\"\n").unwrap_err();
        assert!(e[0].message.contains("unknown field"), "{e:?}");
        assert!(parse_tokens("").is_err());
        assert!(!format!("{t:?}").contains(R), "Debug must hide tokens");
    }

    #[test]
    fn comparison_is_exact() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
