//! Watch tokens: what a browser presents on `/ws?token=` or `/sse?token=`.
//! A compact format of our own, documented in docs/embedding.md:
//!
//! `tw1.<base64url(claims JSON)>.<base64url(HMAC-SHA256(secret, "tw1." + claims part))>`
//!
//! The claims name the scope (an owner, or one task of an owner, within the
//! API key that asked), whether `cancel` is allowed, and the expiry. Several
//! secrets may be configured for rotation: the first signs, all verify.

use super::owner_session;
use crate::engine::fanout::View;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::sync::Arc;

type HmacSha256 = Hmac<Sha256>;

/// The version prefix: a token of another format is refused, never guessed at.
const PREFIX: &str = "tw1.";
/// Shortest secret taken (bytes): an HMAC key shorter than this is guessable.
pub const MIN_SECRET_BYTES: usize = 16;

/// What a token watches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// The API key's name that asked for the token.
    #[serde(rename = "k")]
    pub key: String,
    #[serde(rename = "o")]
    pub owner: String,
    /// One task of the owner; `None`: every task of the owner, present and future.
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// A token's claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(flatten)]
    pub scope: Scope,
    /// Whether `cancel` is allowed.
    #[serde(rename = "c", default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
    /// Expiry, Unix ms.
    #[serde(rename = "e")]
    pub expires_ms: u64,
}

impl Claims {
    /// The session the scope's tasks live in.
    pub fn session(&self) -> Arc<str> {
        owner_session(&self.scope.key, &self.scope.owner)
    }

    /// What a connection with this token sees of that session.
    pub fn view(&self) -> View {
        match &self.scope.task {
            Some(task) => View::Task(task.as_str().into()),
            None => View::Owner,
        }
    }
}

/// Why a token was refused (all are `unauthorized` / HTTP 401).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the watch token is malformed")]
    Malformed,
    #[error("the watch token's signature does not match")]
    BadSignature,
    #[error("the watch token has expired")]
    Expired,
}

/// Signs with the first secret, verifies with any.
pub struct Signer {
    secrets: Vec<Vec<u8>>,
}

impl Signer {
    /// At least one secret, each at least [`MIN_SECRET_BYTES`] long.
    pub fn new(secrets: Vec<Vec<u8>>) -> Result<Signer, String> {
        if secrets.is_empty() {
            return Err("at least one secret is needed".into());
        }
        if let Some(i) = secrets.iter().position(|s| s.len() < MIN_SECRET_BYTES) {
            return Err(format!(
                "secret #{} is shorter than {MIN_SECRET_BYTES} bytes",
                i + 1
            ));
        }
        Ok(Signer { secrets })
    }

    /// A signer over one random secret: tokens die with the process.
    pub fn ephemeral() -> Signer {
        let secret = crate::task::id::random_hex(32).into_bytes();
        Signer {
            secrets: vec![secret],
        }
    }

    fn mac(secret: &[u8], signed: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(signed.as_bytes());
        mac
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let body = serde_json::to_vec(claims).expect("claims serialise");
        let signed = format!("{PREFIX}{}", B64.encode(body));
        let tag = Self::mac(&self.secrets[0], &signed).finalize().into_bytes();
        format!("{signed}.{}", B64.encode(tag))
    }

    /// The claims of a token signed by one of the secrets and not expired at `now_ms`.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Claims, TokenError> {
        let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let body = signed.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let tag = B64.decode(tag).map_err(|_| TokenError::Malformed)?;
        // Every secret is tried (no early exit): verify_slice is constant-time.
        let mut valid = false;
        for secret in &self.secrets {
            valid |= Self::mac(secret, signed).verify_slice(&tag).is_ok();
        }
        if !valid {
            return Err(TokenError::BadSignature);
        }
        let body = B64.decode(body).map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&body).map_err(|_| TokenError::Malformed)?;
        if claims.expires_ms <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(task: Option<&str>, expires_ms: u64) -> Claims {
        Claims {
            scope: Scope {
                key: "shop".into(),
                owner: "alice".into(),
                task: task.map(Into::into),
            },
            cancel: false,
            expires_ms,
        }
    }

    fn signer(secrets: &[&str]) -> Signer {
        Signer::new(secrets.iter().map(|s| s.as_bytes().to_vec()).collect()).unwrap()
    }

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let s = signer(&["0123456789abcdef0123"]);
        let c = claims(Some("t1"), 1_000);
        let token = s.sign(&c);
        assert!(token.starts_with("tw1."));
        assert_eq!(s.verify(&token, 999), Ok(c.clone()));
        assert_eq!(s.verify(&token, 1_000), Err(TokenError::Expired));
        assert_eq!(c.view(), View::Task("t1".into()));
        assert_eq!(claims(None, 1).view(), View::Owner);
    }

    #[test]
    fn tampering_and_other_secrets_are_refused() {
        let s = signer(&["0123456789abcdef0123"]);
        let token = s.sign(&claims(None, 1_000));
        let (body, tag) = token.rsplit_once('.').unwrap();
        // Another owner in the claims, the old signature.
        let forged_body = format!(
            "tw1.{}",
            B64.encode(serde_json::to_vec(&claims(None, 1_000).scope).unwrap())
        );
        assert_eq!(
            s.verify(&format!("{forged_body}.{tag}"), 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            signer(&["another-secret-of-16"]).verify(&token, 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(s.verify(body, 0), Err(TokenError::Malformed));
        assert_eq!(s.verify("", 0), Err(TokenError::Malformed));
        assert_eq!(s.verify("tw1..", 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn rotation_the_first_signs_all_verify() {
        let old = signer(&["old-secret-0123456"]);
        let both = signer(&["new-secret-0123456", "old-secret-0123456"]);
        let token = old.sign(&claims(None, 10));
        assert!(both.verify(&token, 0).is_ok());
        let fresh = both.sign(&claims(None, 10));
        assert!(old.verify(&fresh, 0).is_err());
        assert!(Signer::new(vec![b"short".to_vec()]).is_err());
        assert!(Signer::new(vec![]).is_err());
    }
}
