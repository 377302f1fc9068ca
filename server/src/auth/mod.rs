//! Who may use the server API and what a watch token lets a browser see
//! (contract section 3). API keys are configured as the SHA-256 of the key
//! (the key itself is never stored) and compared in constant time; a key's
//! name is what logs and metrics show. [`token`] signs and checks watch
//! tokens.
//!
//! Tasks started over the API belong to an *owner* (the host's name for its
//! user), within the API key that started them: two host apps that both
//! have a user `42` never see each other's tasks. An owner's tasks live in
//! a session of their own, [`owner_session`], that no cookie can name, so
//! the engine treats them exactly like a browser session's.

pub mod token;

use crate::rate::TokenBucket;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use subtle::ConstantTimeEq;
pub use token::{Claims, Scope, Signer, TokenError};

/// Longest `owner` the API takes (contract: ≤ 128).
pub const MAX_OWNER_CHARS: usize = 128;
/// Default watch-token lifetime when the config says nothing.
pub const DEFAULT_TOKEN_TTL_S: u64 = 3600;
/// Longest lifetime a caller may ask for (`ttl_s`).
pub const MAX_TOKEN_TTL_S: u64 = 7 * 24 * 3600;
/// Per-key request rate of the server API, when the config says nothing.
pub const DEFAULT_KEY_REQUESTS_PER_S: u64 = 200;
pub const DEFAULT_KEY_BURST: u64 = 400;

/// One configured API key.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiKey {
    /// Shown in logs and metrics (never the key).
    pub name: Arc<str>,
    /// SHA-256 of the key.
    pub sha256: [u8; 32],
    /// Requests a second the key may make (a token bucket), and its burst.
    pub requests_per_s: u64,
    pub burst: u64,
}

/// The server API's keys, each with its own rate limit.
#[derive(Default)]
pub struct ApiKeys {
    keys: Vec<(ApiKey, Mutex<TokenBucket>)>,
}

/// What a presented key turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyCheck {
    /// A configured key: its name.
    Ok(Arc<str>),
    /// A configured key over its rate: how long until the next request (ms).
    Limited(Arc<str>, u64),
    /// Not a key of this server.
    Unknown,
}

impl ApiKeys {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        ApiKeys {
            keys: keys
                .into_iter()
                .map(|k| {
                    let bucket = TokenBucket::new(k.requests_per_s, k.burst);
                    (k, Mutex::new(bucket))
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Which key `presented` is: its SHA-256 is compared with every
    /// configured one, in constant time and without stopping at a match, so
    /// the answer's timing says nothing about the keys. Takes one request
    /// from the key's rate at `now_ms`.
    pub fn check(&self, presented: &str, now_ms: u64) -> KeyCheck {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (i, (key, _)) in self.keys.iter().enumerate() {
            if bool::from(digest.ct_eq(&key.sha256)) {
                found = Some(i);
            }
        }
        let Some(i) = found else {
            return KeyCheck::Unknown;
        };
        let (key, bucket) = &self.keys[i];
        let taken = bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(now_ms as f64);
        match taken {
            Ok(()) => KeyCheck::Ok(key.name.clone()),
            Err(wait) => KeyCheck::Limited(key.name.clone(), wait.as_millis() as u64),
        }
    }
}

/// `hex` as the 32 bytes of a SHA-256, or why not.
pub fn parse_sha256_hex(hex: &str) -> Result<[u8; 32], String> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(
            "must be the 64 hex digits of the key's SHA-256 (`printf %s KEY | sha256sum`)".into(),
        );
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// The session an owner's tasks live in, within the key `key`: a name no
/// cookie can take (cookies are 32 hex digits).
pub fn owner_session(key: &str, owner: &str) -> Arc<str> {
    format!("@{key}/{owner}").into()
}

/// Checks an `owner` of the API: at most [`MAX_OWNER_CHARS`] characters,
/// no control characters.
pub fn check_owner(owner: &str) -> Result<(), String> {
    if owner.chars().count() > MAX_OWNER_CHARS {
        return Err(format!("owner: at most {MAX_OWNER_CHARS} characters"));
    }
    if owner.chars().any(char::is_control) {
        return Err("owner: no control characters".into());
    }
    Ok(())
}

/// The server API's keys and the watch tokens' signer, as `AppState` holds them.
pub struct Auth {
    pub keys: ApiKeys,
    pub signer: Signer,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, secret: &str) -> ApiKey {
        ApiKey {
            name: name.into(),
            sha256: Sha256::digest(secret.as_bytes()).into(),
            requests_per_s: 1,
            burst: 2,
        }
    }

    #[test]
    fn keys_are_known_by_their_digest_and_rate_limited() {
        let keys = ApiKeys::new(vec![key("shop", "s3cret"), key("blog", "other")]);
        assert_eq!(keys.check("s3cret", 0), KeyCheck::Ok("shop".into()));
        assert_eq!(keys.check("other", 0), KeyCheck::Ok("blog".into()));
        assert_eq!(keys.check("s3cre", 0), KeyCheck::Unknown);
        assert_eq!(keys.check("", 0), KeyCheck::Unknown);
        assert_eq!(keys.check("s3cret", 0), KeyCheck::Ok("shop".into()));
        assert!(matches!(keys.check("s3cret", 0), KeyCheck::Limited(_, _)));
        assert_eq!(keys.check("s3cret", 1000), KeyCheck::Ok("shop".into()));
    }

    #[test]
    fn sha256_hex_is_checked() {
        let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(parse_sha256_hex(hex).unwrap()[0], 0x9f);
        assert!(parse_sha256_hex("abc").is_err());
        assert!(parse_sha256_hex(&"g".repeat(64)).is_err());
    }

    #[test]
    fn owners_are_bounded_and_sessions_never_look_like_cookies() {
        assert!(check_owner(&"é".repeat(128)).is_ok());
        assert!(check_owner(&"é".repeat(129)).is_err());
        assert!(check_owner("a\nb").is_err());
        let s = owner_session("shop", "42");
        assert!(!crate::task::id::is_session_token(&s));
        assert_ne!(owner_session("shop", "42"), owner_session("blog", "42"));
    }
}
