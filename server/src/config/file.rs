//! The configuration file (`--config taskwire.toml`): the server's keys (a
//! flag or its variable given explicitly wins over the file), the backends
//! and the kinds clients may start. Parsed once at start-up with serde and
//! the `toml` crate; any mistake is an error naming the key and its line.
//! `${VAR}` in a URL, header, broker or secret comes from the environment
//! and is never logged.

use super::PollMode;
use app::kinds::{KindInfo, Schema};
use serde::Deserialize;
use std::path::Path;

/// A mistake in the file, with where it is.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct FileError {
    pub file: String,
    pub message: String,
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerKeys,
    #[serde(default, rename = "backend")]
    pub backends: Vec<toml::Spanned<RawBackend>>,
    #[serde(default, rename = "kind")]
    pub kinds: Vec<toml::Spanned<RawKind>>,
    #[serde(default, rename = "api_key")]
    pub api_keys: Vec<toml::Spanned<RawApiKey>>,
    pub tokens: Option<toml::Spanned<RawTokens>>,
    /// Checked as [`crate::webhook::WebhookSettings`] once `${VAR}` is expanded.
    pub webhooks: Option<toml::Spanned<toml::Table>>,
}

/// One `[[api_key]]`: a key of the server API (docs/embedding.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    pub name: String,
    /// Hex SHA-256 of the key (the key itself is never stored).
    pub sha256: String,
    pub requests_per_s: Option<u64>,
    pub burst: Option<u64>,
}

/// `[tokens]`: the watch tokens' secrets and default lifetime.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    #[serde(default)]
    pub secrets: Vec<String>,
    pub default_ttl_s: Option<u64>,
}

/// `[tokens]`, resolved (`${VAR}` expanded).
#[derive(Debug)]
pub struct TokensSpec {
    pub secrets: Vec<String>,
    pub default_ttl_s: Option<u64>,
}

/// `[server]`: the keys of the flags of the same name (`--listen` is
/// `listen`, `--max-body-bytes` is `max_body_bytes`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerKeys {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub redis: Option<String>,
    pub data_dir: Option<String>,
    pub ephemeral: Option<bool>,
    pub role: Option<String>,
    pub retention_s: Option<u64>,
    pub allowed_origins: Option<Vec<String>>,
    pub frame_ancestors: Option<String>,
    pub request_timeout_s: Option<u64>,
    pub max_body_bytes: Option<u64>,
    pub site_root: Option<String>,
    pub worker_threads: Option<u64>,
}

/// Most requests one pipelined connection carries at a time.
pub const MAX_PIPELINE_DEPTH: u64 = 64;

/// One `[[backend]]` as written: the keys every adapter has, and the rest
/// (the adapter's own), checked per adapter.
#[derive(Debug, Deserialize)]
pub struct RawBackend {
    pub name: String,
    pub adapter: String,
    pub poll_interval_ms: Option<u64>,
    pub poll_min_ms: Option<u64>,
    pub poll_mode: Option<String>,
    pub max_concurrent_polls: Option<u64>,
    pub max_polls_per_s: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub give_up_s: Option<u64>,
    pub pipeline_depth: Option<u64>,
    #[serde(flatten)]
    pub rest: toml::Table,
}

/// One `[[kind]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKind {
    pub name: String,
    pub backend: String,
    pub title: Option<String>,
    /// What the backend is asked to run: the Celery task name (required
    /// for the `celery` adapter; params become its kwargs), else the `kind`
    /// sent to the task service (default: the kind's own name).
    pub task: Option<String>,
    pub params: Option<Schema>,
    /// A webhook for every task of this kind (one from the server API wins).
    pub webhook: Option<String>,
}

/// How taskwire talks to one backend.
#[derive(Clone, Debug, PartialEq)]
pub enum AdapterSpec {
    /// The simulator, in this process.
    Embedded,
    /// The task-service API of docs/protocol.md at this base URL.
    Taskwire { url: String },
    /// Any JSON job API, described declaratively (docs/http-adapter.md):
    /// the adapter's keys, `${VAR}` expanded.
    Http(serde_json::Value),
    /// Celery on Redis (docs/celery.md).
    Celery {
        broker: String,
        result_backend: String,
        queue: String,
        terminate_on_cancel: bool,
    },
}

impl AdapterSpec {
    pub fn name(&self) -> &'static str {
        match self {
            AdapterSpec::Embedded => "embedded",
            AdapterSpec::Taskwire { .. } => "taskwire",
            AdapterSpec::Http(_) => "http",
            AdapterSpec::Celery { .. } => "celery",
        }
    }
}

/// One backend, every key resolved (unset keys from the flags).
#[derive(Clone, Debug, PartialEq)]
pub struct BackendSpec {
    pub name: String,
    pub adapter: AdapterSpec,
    pub tuning: Tuning,
}

/// One kind, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct KindSpec {
    pub info: KindInfo,
    /// Index into the backends.
    pub backend: usize,
    /// What the backend is asked to run (the Celery task name; else the
    /// kind's own name).
    pub remote: String,
    /// Where every final state of this kind's tasks is POSTed (contract §4).
    pub webhook: Option<String>,
}

/// How a backend is polled: its cadence, limits, timeout and give-up. The
/// flags' values are the defaults a `[[backend]]` takes for the keys it
/// leaves out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tuning {
    pub poll_interval_ms: u64,
    pub poll_min_ms: u64,
    pub poll_mode: PollMode,
    pub max_concurrent_polls: u64,
    pub max_polls_per_s: u64,
    pub timeout_ms: u64,
    pub give_up_s: u64,
    /// `GET` polls sent pipelined, this many per connection at a time
    /// (HTTP/1.1 pipelining; 0: off). The `taskwire` and `http` adapters.
    pub pipeline_depth: u64,
}

/// The file, parsed: its server keys, backends and kinds.
pub struct Loaded {
    pub server: ServerKeys,
    pub backends: Vec<BackendSpec>,
    pub kinds: Vec<KindSpec>,
    pub api_keys: Vec<crate::auth::ApiKey>,
    pub tokens: Option<TokensSpec>,
    pub webhooks: Option<crate::webhook::WebhookSettings>,
}

/// Reads and checks the file at `path`; `env` looks a variable up.
pub fn load(
    path: &Path,
    defaults: &Tuning,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, FileError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| FileError {
        file: file.clone(),
        message: format!("cannot read it: {e}"),
    })?;
    parse(&text, defaults, env).map_err(|message| FileError { file, message })
}

/// [`load`] of a file's text.
pub fn parse(
    text: &str,
    defaults: &Tuning,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, String> {
    // toml's own errors name the line, the column and the key.
    let raw: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    let line_of =
        |span: std::ops::Range<usize>| text[..span.start.min(text.len())].lines().count() + 1;
    let mut backends: Vec<BackendSpec> = Vec::new();
    for (i, b) in raw.backends.iter().enumerate() {
        let at = format!("[[backend]] #{} (line {})", i + 1, line_of(b.span()));
        let spec = backend(b.get_ref(), defaults, env).map_err(|e| format!("{at}: {e}"))?;
        if backends.iter().any(|o| o.name == spec.name) {
            return Err(format!("{at}: name `{}` is used twice", spec.name));
        }
        backends.push(spec);
    }
    let mut kinds: Vec<KindSpec> = Vec::new();
    for (i, k) in raw.kinds.iter().enumerate() {
        let at = format!("[[kind]] #{} (line {})", i + 1, line_of(k.span()));
        let k = k.get_ref();
        check_name(&k.name).map_err(|e| format!("{at}: name: {e}"))?;
        if kinds.iter().any(|o| o.info.name == k.name) {
            return Err(format!("{at}: name `{}` is used twice", k.name));
        }
        let backend = backends
            .iter()
            .position(|b| b.name == k.backend)
            .ok_or_else(|| format!("{at}: backend: no [[backend]] is named `{}`", k.backend))?;
        let is_celery = matches!(backends[backend].adapter, AdapterSpec::Celery { .. });
        let remote = match (&k.task, is_celery) {
            (Some(t), _) => t.clone(),
            (None, true) => {
                return Err(format!(
                    "{at}: task: a kind of a celery backend names its Celery task"
                ))
            }
            (None, false) => k.name.clone(),
        };
        if let Some(schema) = &k.params {
            schema
                .validate()
                .map_err(|e| format!("{at}: params: {e}"))?;
        }
        kinds.push(KindSpec {
            info: KindInfo {
                name: k.name.clone(),
                title: k.title.clone(),
                params: k.params.clone(),
            },
            backend,
            remote,
            webhook: k
                .webhook
                .as_deref()
                .map(|w| expand(w, env))
                .transpose()
                .map_err(|e| format!("{at}: webhook: {e}"))?,
        });
    }
    let mut api_keys: Vec<crate::auth::ApiKey> = Vec::new();
    for (i, k) in raw.api_keys.iter().enumerate() {
        let at = format!("[[api_key]] #{} (line {})", i + 1, line_of(k.span()));
        let k = k.get_ref();
        check_name(&k.name).map_err(|e| format!("{at}: name: {e}"))?;
        if api_keys.iter().any(|o| *o.name == *k.name) {
            return Err(format!("{at}: name `{}` is used twice", k.name));
        }
        let sha256 = expand(&k.sha256, env)
            .and_then(|hex| crate::auth::parse_sha256_hex(&hex))
            .map_err(|e| format!("{at}: sha256: {e}"))?;
        let requests_per_s = k
            .requests_per_s
            .unwrap_or(crate::auth::DEFAULT_KEY_REQUESTS_PER_S);
        if requests_per_s == 0 {
            return Err(format!("{at}: requests_per_s: must be at least 1"));
        }
        api_keys.push(crate::auth::ApiKey {
            name: k.name.as_str().into(),
            sha256,
            requests_per_s,
            burst: k.burst.unwrap_or(crate::auth::DEFAULT_KEY_BURST),
        });
    }
    let tokens = match &raw.tokens {
        None => None,
        Some(t) => {
            let at = format!("[tokens] (line {})", line_of(t.span()));
            let t = t.get_ref();
            let mut secrets = Vec::new();
            for (i, secret) in t.secrets.iter().enumerate() {
                let secret = expand(secret, env).map_err(|e| format!("{at}: secrets: {e}"))?;
                if secret.len() < crate::auth::token::MIN_SECRET_BYTES {
                    return Err(format!(
                        "{at}: secrets: #{} is shorter than {} bytes",
                        i + 1,
                        crate::auth::token::MIN_SECRET_BYTES
                    ));
                }
                secrets.push(secret);
            }
            if t.default_ttl_s == Some(0) {
                return Err(format!("{at}: default_ttl_s: must be at least 1"));
            }
            Some(TokensSpec {
                secrets,
                default_ttl_s: t.default_ttl_s,
            })
        }
    };
    let webhooks = match &raw.webhooks {
        None => None,
        Some(t) => {
            let at = format!("[webhooks] (line {})", line_of(t.span()));
            let mut table = t.get_ref().clone();
            expand_table(&mut table, env).map_err(|e| format!("{at}: {e}"))?;
            let settings: crate::webhook::WebhookSettings = toml::Value::Table(table)
                .try_into()
                .map_err(|e| format!("{at}: {e}"))?;
            settings.validate().map_err(|e| format!("{at}: {e}"))?;
            Some(settings)
        }
    };
    if let Some(k) = kinds.iter().find(|k| k.webhook.is_some()) {
        if webhooks.is_none() {
            return Err(format!(
                "[[kind]] `{}`: webhook: needs a [webhooks] table (its secret and allow-list)",
                k.info.name
            ));
        }
    }
    Ok(Loaded {
        server: raw.server,
        backends,
        kinds,
        api_keys,
        tokens,
        webhooks,
    })
}

fn backend(
    b: &RawBackend,
    d: &Tuning,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<BackendSpec, String> {
    check_name(&b.name).map_err(|e| format!("name: {e}"))?;
    let mut rest = b.rest.clone();
    let mut take_str = |key: &str, required: bool| -> Result<Option<String>, String> {
        match rest.remove(key) {
            Some(toml::Value::String(s)) => {
                expand(&s, env).map(Some).map_err(|e| format!("{key}: {e}"))
            }
            Some(_) => Err(format!("{key}: must be a string")),
            None if required => Err(format!(
                "{key}: missing (the {} adapter needs it)",
                b.adapter
            )),
            None => Ok(None),
        }
    };
    let adapter = match b.adapter.as_str() {
        "embedded" => AdapterSpec::Embedded,
        "taskwire" => {
            let url = take_str("url", true)?.unwrap_or_default();
            if !url.starts_with("http://") {
                return Err(format!(
                    "url: `{url}` must be an http:// URL (put a TLS proxy in front)"
                ));
            }
            AdapterSpec::Taskwire {
                url: url.trim_end_matches('/').to_string(),
            }
        }
        "celery" => {
            let broker = take_str("broker", true)?.unwrap_or_default();
            let result_backend =
                take_str("result_backend", false)?.unwrap_or_else(|| broker.clone());
            let queue = take_str("queue", false)?.unwrap_or_else(|| "celery".into());
            let terminate_on_cancel = match rest.remove("terminate_on_cancel") {
                None => false,
                Some(toml::Value::Boolean(t)) => t,
                Some(_) => return Err("terminate_on_cancel: must be true or false".into()),
            };
            for (key, url) in [("broker", &broker), ("result_backend", &result_backend)] {
                if !url.starts_with("redis://") {
                    return Err(format!(
                        "{key}: must be a redis:// URL (the Redis broker and result backend)"
                    ));
                }
            }
            AdapterSpec::Celery {
                broker,
                result_backend,
                queue,
                terminate_on_cancel,
            }
        }
        "http" => {
            // The declarative adapter checks its own keys.
            let mut table = std::mem::take(&mut rest);
            expand_table(&mut table, env)?;
            let value = serde_json::to_value(&table).map_err(|e| e.to_string())?;
            AdapterSpec::Http(value)
        }
        other => {
            return Err(format!(
                "adapter: `{other}` is not one of taskwire, http, celery, embedded"
            ))
        }
    };
    if let Some(key) = rest.keys().next() {
        return Err(format!("{key}: not a key of the {} adapter", b.adapter));
    }
    let poll_mode = match b.poll_mode.as_deref() {
        None => d.poll_mode,
        Some("adaptive") => PollMode::Adaptive,
        Some("fixed") => PollMode::Fixed,
        Some(other) => return Err(format!("poll_mode: `{other}` is not adaptive or fixed")),
    };
    let poll_interval_ms = b.poll_interval_ms.unwrap_or(d.poll_interval_ms);
    if !(10..=3_600_000).contains(&poll_interval_ms) {
        return Err("poll_interval_ms: must be from 10 to 3600000".into());
    }
    let poll_min_ms = b.poll_min_ms.unwrap_or(d.poll_min_ms.min(poll_interval_ms));
    if poll_min_ms == 0 || poll_min_ms > poll_interval_ms {
        return Err("poll_min_ms: must be from 1 to poll_interval_ms".into());
    }
    let max_concurrent_polls = b.max_concurrent_polls.unwrap_or(d.max_concurrent_polls);
    if max_concurrent_polls == 0 {
        return Err("max_concurrent_polls: must be at least 1".into());
    }
    let speaks_http = matches!(adapter, AdapterSpec::Taskwire { .. } | AdapterSpec::Http(_));
    let pipeline_depth = match b.pipeline_depth {
        None if speaks_http => d.pipeline_depth,
        None => 0,
        Some(n) if speaks_http && n <= MAX_PIPELINE_DEPTH => n,
        Some(_) if speaks_http => {
            return Err(format!(
                "pipeline_depth: must be from 0 to {MAX_PIPELINE_DEPTH}"
            ))
        }
        Some(_) => {
            return Err(format!(
                "pipeline_depth: the {} adapter does not speak HTTP to its backend",
                adapter.name()
            ))
        }
    };
    let timeout_ms = b.timeout_ms.unwrap_or(d.timeout_ms);
    if timeout_ms == 0 {
        return Err("timeout_ms: must be at least 1".into());
    }
    Ok(BackendSpec {
        name: b.name.clone(),
        adapter,
        tuning: Tuning {
            poll_interval_ms,
            poll_min_ms,
            poll_mode,
            max_concurrent_polls,
            max_polls_per_s: b.max_polls_per_s.unwrap_or(d.max_polls_per_s),
            timeout_ms,
            give_up_s: b.give_up_s.unwrap_or(d.give_up_s),
            pipeline_depth,
        },
    })
}

/// Names go into metrics labels and stored task routes: keep them plain.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` must be 1 to 64 of a-z, A-Z, 0-9, `_`, `-`, `.`"
        ))
    }
}

/// `${VAR}` → the variable's value; `$${` is a literal `${`. A variable
/// that is not set is an error naming it (never its value).
pub fn expand(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(lit) = after.strip_prefix("${") {
            out.push_str("${");
            rest = lit;
        } else if let Some(var) = after.strip_prefix('{') {
            let end = var
                .find('}')
                .ok_or_else(|| "`${` without its closing `}`".to_string())?;
            let name = &var[..end];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("`${{{name}}}` is not a variable name"));
            }
            let value =
                env(name).ok_or_else(|| format!("the environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &var[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn expand_table(t: &mut toml::Table, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
    for (key, v) in t.iter_mut() {
        expand_value(v, env).map_err(|e| format!("{key}: {e}"))?;
    }
    Ok(())
}

fn expand_value(v: &mut toml::Value, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
    match v {
        toml::Value::String(s) => *s = expand(s, env)?,
        toml::Value::Array(a) => {
            for x in a {
                expand_value(x, env)?;
            }
        }
        toml::Value::Table(t) => expand_table(t, env)?,
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Tuning {
        Tuning {
            poll_interval_ms: 500,
            poll_min_ms: 100,
            poll_mode: PollMode::Adaptive,
            max_concurrent_polls: 512,
            max_polls_per_s: 50_000,
            timeout_ms: 5_000,
            give_up_s: 300,
            pipeline_depth: 0,
        }
    }

    fn env(name: &str) -> Option<String> {
        (name == "JOBS_TOKEN").then(|| "s3cret".to_string())
    }

    const EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:3000"

[[backend]]
name = "sim"
adapter = "taskwire"
url = "http://127.0.0.1:4000"
poll_interval_ms = 250
max_concurrent_polls = 256

[[backend]]
name = "jobs"
adapter = "http"
url = "http://127.0.0.1:5000"
headers = { Authorization = "Bearer ${JOBS_TOKEN}" }
start  = { method = "POST", path = "/v1/jobs", body = { type = "{kind}", input = "{params}" }, id = "/name" }
status = { method = "GET", path = "/v1/{id}" }
[backend.fields]
state = "/metadata/state"
[backend.states]
RUNNING = "running"

[[backend]]
name = "celery"
adapter = "celery"
broker = "redis://127.0.0.1:6379/0"
result_backend = "redis://127.0.0.1:6379/1"

[[kind]]
name = "simulate"
backend = "sim"
title = "Simulated work"
params = { type = "object", required = ["duration_ms", "steps"], properties = { duration_ms = { type = "integer", minimum = 1, maximum = 86400000, default = 10000, title = "Duration (ms)" }, steps = { type = "integer", minimum = 1, default = 100 } } }

[[kind]]
name = "count"
backend = "celery"
task = "tasks.count"
params = { type = "object", properties = { n = { type = "integer", minimum = 1, maximum = 1000 } } }
"#;

    #[test]
    fn the_example_parses_with_defaults_from_the_flags() {
        let l = parse(EXAMPLE, &defaults(), &env).unwrap();
        assert_eq!(l.server.listen.as_deref(), Some("127.0.0.1:3000"));
        assert_eq!(l.backends.len(), 3);
        let sim = &l.backends[0];
        assert_eq!(sim.tuning.poll_interval_ms, 250);
        assert_eq!(sim.tuning.max_concurrent_polls, 256);
        assert_eq!(sim.tuning.timeout_ms, 5_000, "from the flags");
        assert_eq!(
            sim.adapter,
            AdapterSpec::Taskwire {
                url: "http://127.0.0.1:4000".into()
            }
        );
        match &l.backends[1].adapter {
            AdapterSpec::Http(v) => {
                assert_eq!(v["headers"]["Authorization"], "Bearer s3cret");
                assert_eq!(v["url"], "http://127.0.0.1:5000");
                assert_eq!(v["start"]["body"]["input"], "{params}");
            }
            other => panic!("{other:?}"),
        }
        match &l.backends[2].adapter {
            AdapterSpec::Celery { queue, .. } => assert_eq!(queue, "celery"),
            other => panic!("{other:?}"),
        }
        assert_eq!(l.kinds.len(), 2);
        assert_eq!(l.kinds[0].backend, 0);
        assert_eq!(l.kinds[0].remote, "simulate");
        assert_eq!(l.kinds[1].backend, 2);
        assert_eq!(l.kinds[1].remote, "tasks.count");
        let schema = l.kinds[0].info.params.as_ref().unwrap();
        let names: Vec<&str> = schema.properties.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["duration_ms", "steps"], "in the file's order");
    }

    #[test]
    fn keys_tokens_and_webhooks_of_the_host_api() {
        let text = r#"
[[api_key]]
name = "shop"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

[tokens]
secrets = ["${JOBS_TOKEN}-0123456789abcdef", "an-older-secret-0123"]
default_ttl_s = 60

[webhooks]
secret = "${JOBS_TOKEN}-webhook-secret"
allow = ["http://127.0.0.1:9000/hooks/"]
timeout_ms = 1000
"#;
        let l = parse(text, &defaults(), &env).unwrap();
        assert_eq!(&*l.api_keys[0].name, "shop");
        assert_eq!(l.api_keys[0].sha256[0], 0x9f);
        let tokens = l.tokens.unwrap();
        assert_eq!(tokens.secrets[0], "s3cret-0123456789abcdef");
        assert_eq!(tokens.default_ttl_s, Some(60));
        let hooks = l.webhooks.unwrap();
        assert_eq!(hooks.secret, "s3cret-webhook-secret");
        assert_eq!(hooks.timeout_ms, 1000);
        assert_eq!(hooks.retry_initial_ms, 1000, "a default");
        let e = err("[[api_key]]\nname = \"shop\"\nsha256 = \"abc\"\n");
        assert!(e.contains("[[api_key]] #1 (line 1): sha256"), "{e}");
        let e = err("[tokens]\nsecrets = [\"short\"]\n");
        assert!(
            e.contains("[tokens] (line 1): secrets: #1 is shorter"),
            "{e}"
        );
        let e = err(
            "[webhooks]\nallow = [\"http://h/\"]\nsecret = \"0123456789abcdefgh\"\ntimout_ms = 1\n",
        );
        assert!(
            e.contains("[webhooks] (line 1)") && e.contains("timout_ms"),
            "{e}"
        );
    }

    fn err(text: &str) -> String {
        match parse(text, &defaults(), &env) {
            Ok(_) => panic!("{text} parsed"),
            Err(e) => e,
        }
    }

    #[test]
    fn pipeline_depth_is_for_the_http_adapters_only() {
        let text = "[[backend]]\nname = \"a\"\nadapter = \"taskwire\"\nurl = \"http://x:1\"\npipeline_depth = 8\n[[backend]]\nname = \"b\"\nadapter = \"embedded\"\n";
        let mut d = defaults();
        d.pipeline_depth = 4;
        let loaded = parse(text, &d, &env).unwrap();
        assert_eq!(loaded.backends[0].tuning.pipeline_depth, 8);
        assert_eq!(
            loaded.backends[1].tuning.pipeline_depth, 0,
            "the flag's default is for HTTP backends"
        );
        let e = err("[[backend]]\nname = \"a\"\nadapter = \"embedded\"\npipeline_depth = 2\n");
        assert!(
            e.contains("pipeline_depth") && e.contains("embedded"),
            "{e}"
        );
        let e = err("[[backend]]\nname = \"a\"\nadapter = \"taskwire\"\nurl = \"http://x:1\"\npipeline_depth = 65\n");
        assert!(e.contains("pipeline_depth") && e.contains("64"), "{e}");
    }

    #[test]
    fn mistakes_name_the_key_and_the_line() {
        let e = err("[server]\nlisten = 3\n");
        assert!(e.contains("line 2") && e.contains("listen"), "{e}");
        let e = err("[server]\nlisen = \"x\"\n");
        assert!(e.contains("lisen"), "{e}");
        let e = err("\n\n[[backend]]\nname = \"a\"\nadapter = \"taskwire\"\n");
        assert!(e.contains("line 3") && e.contains("url"), "{e}");
        let e = err("[[backend]]\nname = \"a\"\nadapter = \"taskwire\"\nurl = \"http://x:1\"\nbroker = \"redis://\"\n");
        assert!(
            e.contains("broker") && e.contains("taskwire adapter"),
            "{e}"
        );
        let e = err("[[backend]]\nname = \"a\"\nadapter = \"soap\"\n");
        assert!(e.contains("adapter") && e.contains("soap"), "{e}");
        let e = err("[[backend]]\nname = \"a b\"\nadapter = \"embedded\"\n");
        assert!(e.contains("name"), "{e}");
        let e = err("[[backend]]\nname = \"a\"\nadapter = \"embedded\"\n[[backend]]\nname = \"a\"\nadapter = \"embedded\"\n");
        assert!(e.contains("twice") && e.contains("line 4"), "{e}");
        let e = err("[[backend]]\nname = \"a\"\nadapter = \"embedded\"\n[[kind]]\nname = \"k\"\nbackend = \"b\"\n");
        assert!(e.contains("line 4") && e.contains("`b`"), "{e}");
        let e = err("[[backend]]\nname = \"a\"\nadapter = \"embedded\"\npoll_mode = \"lazy\"\n");
        assert!(e.contains("poll_mode"), "{e}");
        let e = err("[[backend]]\nname = \"a\"\nadapter = \"embedded\"\n[[kind]]\nname = \"k\"\nbackend = \"a\"\nparams = { type = \"object\", required = [\"x\"] }\n");
        assert!(e.contains("params") && e.contains("`x`"), "{e}");
        let e = err("[[backend]]\nname = \"c\"\nadapter = \"celery\"\nbroker = \"redis://h/0\"\n[[kind]]\nname = \"k\"\nbackend = \"c\"\n");
        assert!(e.contains("task"), "{e}");
    }

    #[test]
    fn a_missing_variable_is_named_and_its_value_never_shown() {
        let e =
            err("[[backend]]\nname = \"a\"\nadapter = \"taskwire\"\nurl = \"http://${NOPE}:1\"\n");
        assert!(e.contains("NOPE") && e.contains("url"), "{e}");
        let l = parse(
            "[[backend]]\nname = \"a\"\nadapter = \"celery\"\nbroker = \"redis://:${JOBS_TOKEN}@h/0\"\n",
            &defaults(),
            &env,
        )
        .unwrap();
        assert!(!format!("{:?}", l.kinds).contains("s3cret"));
    }

    #[test]
    fn expansion() {
        assert_eq!(expand("a ${JOBS_TOKEN} b", &env).unwrap(), "a s3cret b");
        assert_eq!(expand("$${JOBS_TOKEN}", &env).unwrap(), "${JOBS_TOKEN}");
        assert_eq!(expand("cost $5", &env).unwrap(), "cost $5");
        assert!(expand("${JOBS_TOKEN", &env).is_err());
        assert!(expand("${A-B}", &env).is_err());
    }

    #[test]
    fn an_empty_file_is_todays_defaults() {
        let l = parse("", &defaults(), &env).unwrap();
        assert!(l.backends.is_empty() && l.kinds.is_empty());
    }
}
