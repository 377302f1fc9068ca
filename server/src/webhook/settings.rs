//! The `[webhooks]` table of the configuration file.

use serde::Deserialize;

/// `[webhooks]`. Every key but `secret` has a default; unknown keys are
/// refused so a typo does not silently fall back to a default.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// HMAC key of `X-Taskwire-Signature` (`${VAR}` already expanded).
    /// Required as soon as `allow` names a prefix.
    pub secret: String,
    /// URL prefixes a webhook may use (see `allow.rs`). Empty: webhooks off.
    pub allow: Vec<String>,
    /// One attempt, connecting included, must answer within this.
    pub timeout_ms: u64,
    /// The first retry's cap (the delay is uniform in `[0, cap]`); the cap
    /// doubles per failure.
    pub retry_initial_ms: u64,
    /// The cap stops doubling here.
    pub retry_max_ms: u64,
    /// No attempt is made later than this after the first one.
    pub give_up_s: u64,
    /// Deliveries waiting (to be sent or retried) at most; beyond, a new
    /// one is refused, logged and counted (`outcome="refused"`).
    pub max_queue: usize,
    /// POSTs in flight at once (per process).
    pub max_in_flight: usize,
    /// A PEM file of CA certificates trusted for https webhooks besides
    /// Mozilla's roots (a private CA).
    pub ca_file: Option<String>,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            secret: String::new(),
            allow: Vec::new(),
            timeout_ms: 5_000,
            retry_initial_ms: 1_000,
            retry_max_ms: 3_600_000,
            give_up_s: 86_400,
            max_queue: 10_000,
            max_in_flight: 32,
            ca_file: None,
        }
    }
}

/// Below this, a secret is refused (an HMAC key is only as good as it is long).
pub const MIN_SECRET_BYTES: usize = 16;

impl WebhookSettings {
    /// What [`crate::webhook::Webhooks::start`] refuses, in words.
    pub fn validate(&self) -> Result<(), String> {
        if !self.allow.is_empty() && self.secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "webhooks.secret must be at least {MIN_SECRET_BYTES} bytes when webhooks.allow is set"
            ));
        }
        for (name, v) in [
            ("timeout_ms", self.timeout_ms),
            ("retry_initial_ms", self.retry_initial_ms),
            ("retry_max_ms", self.retry_max_ms),
            ("max_queue", self.max_queue as u64),
            ("max_in_flight", self.max_in_flight as u64),
        ] {
            if v == 0 {
                return Err(format!("webhooks.{name} must be above 0"));
            }
        }
        if self.retry_max_ms < self.retry_initial_ms {
            return Err("webhooks.retry_max_ms must be at least webhooks.retry_initial_ms".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_table_with_defaults() {
        let s: WebhookSettings = toml::from_str(
            r#"
            secret = "0123456789abcdef"
            allow = ["https://shop.example/hooks/"]
            timeout_ms = 5000
            retry_initial_ms = 1000
            give_up_s = 86400
            "#,
        )
        .unwrap();
        assert_eq!(s.allow, ["https://shop.example/hooks/"]);
        assert_eq!((s.max_queue, s.max_in_flight), (10_000, 32));
        assert!(s.validate().is_ok());
        assert_eq!(
            toml::from_str::<WebhookSettings>("").unwrap(),
            WebhookSettings::default()
        );
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        assert!(toml::from_str::<WebhookSettings>("timeout = 5").is_err());
        let weak = WebhookSettings {
            allow: vec!["http://a/".into()],
            secret: "short".into(),
            ..Default::default()
        };
        assert!(weak.validate().unwrap_err().contains("secret"));
        let zero = WebhookSettings {
            max_in_flight: 0,
            ..Default::default()
        };
        assert!(zero.validate().is_err());
    }
}
