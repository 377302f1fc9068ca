//! The configuration of a declarative HTTP backend as written
//! ([`HttpSpec`], embedded in a `[[backend]]` table), and what it resolves
//! to once a preset's defaults are filled in and every key is checked
//! ([`Resolved`]). Nothing here does I/O.

use super::template::{Path, Placeholder};
use crate::backend::client::Client;
use app::protocol::TaskState;
use hyper::header::{HeaderName, HeaderValue};
use hyper::Method;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

/// The presets [`HttpSpec::preset`] may name.
pub const PRESETS: &[&str] = &["google-lro"];

/// A job API described in configuration: how to start a job, read its
/// status and cancel it, and where the contract's fields sit in the
/// answers. See docs/http-adapter.md.
///
/// Meant to be `#[serde(flatten)]`ed into a `[[backend]]` table, so it does
/// not deny unknown keys itself (its sub-tables do); call
/// [`HttpSpec::validate`] after parsing.
#[derive(Clone, Default, PartialEq, Deserialize)]
pub struct HttpSpec {
    /// `http://host[:port][/prefix]`; the paths below are appended to it.
    pub url: String,
    /// Sent with every request. Values are secrets: never logged, and
    /// `Debug` shows only the names.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Defaults for a known API shape ([`PRESETS`]); explicit keys win.
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub start: StartSpec,
    #[serde(default)]
    pub status: RequestSpec,
    /// Without it (and without a preset that has one), cancel is refused.
    #[serde(default)]
    pub cancel: Option<RequestSpec>,
    #[serde(default)]
    pub fields: FieldsSpec,
    /// The backend's state values → contract states (`queued`, `running`,
    /// `succeeded`, `failed`, `cancelled`). Empty: the values must be
    /// contract state names themselves.
    #[serde(default)]
    pub states: BTreeMap<String, String>,
}

/// `start = { method, path, body, id }`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartSpec {
    /// Default `POST`.
    pub method: Option<String>,
    /// Required (unless a preset gives one); may use `{kind}`.
    pub path: Option<String>,
    /// A JSON template: `"{kind}"` and `"{params}"` are substituted as
    /// JSON values. None: no body.
    pub body: Option<serde_json::Value>,
    /// JSON pointer to the job's id in the start answer (a string or an
    /// integer).
    pub id: Option<String>,
}

/// `status = { method, path, body }` and `cancel = { ... }`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    /// Default `GET` for status, `POST` for cancel.
    pub method: Option<String>,
    /// Required (unless a preset gives one); must use `{id}` (or `{+id}`).
    pub path: Option<String>,
    /// A JSON template; `"{id}"` is substituted.
    pub body: Option<serde_json::Value>,
}

/// `[backend.fields]`: RFC 6901 JSON pointers into the status answer.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldsSpec {
    /// The backend's state value, looked up in `states`. Required unless
    /// `done_flag` is set.
    pub state: Option<String>,
    /// A boolean: true = finished (failed if `error` is there, else
    /// succeeded, unless `state` maps to a final state); false or absent =
    /// running (unless `state` maps to something).
    pub done_flag: Option<String>,
    /// Steps done (non-negative integer, or a numeric string), with `total`.
    pub done: Option<String>,
    pub total: Option<String>,
    /// Percent done, 0..=100 (float ok); instead of `done` and `total`.
    pub percent: Option<String>,
    pub message: Option<String>,
    /// Any JSON; reported when the job succeeded.
    pub result: Option<String>,
    /// A string (an object: its `message`, else its JSON); reported when the job failed.
    pub error: Option<String>,
    /// RFC 3339, or Unix epoch ms. None or absent: when taskwire first saw
    /// the current state and progress.
    pub changed_at: Option<String>,
}

impl fmt::Debug for HttpSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSpec")
            .field("url", &self.url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("preset", &self.preset)
            .field("start", &self.start)
            .field("status", &self.status)
            .field("cancel", &self.cancel)
            .field("fields", &self.fields)
            .field("states", &self.states)
            .finish()
    }
}

impl HttpSpec {
    /// Checks everything that must hold for [`super::DeclarativeBackend::new`]
    /// to succeed; the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        self.resolve().map(|_| ())
    }

    /// The spec with the preset's defaults filled in, checked.
    pub(crate) fn resolve(&self) -> Result<Resolved, String> {
        let preset = match self.preset.as_deref() {
            None => HttpSpec::default(),
            Some("google-lro") => google_lro(),
            Some(other) => {
                return Err(format!(
                    "backend.preset: unknown preset `{other}` (known: {})",
                    PRESETS.join(", ")
                ))
            }
        };
        let or = |mine: &Option<String>, theirs: &Option<String>| mine.clone().or(theirs.clone());

        Client::new(&self.url, Duration::from_secs(1))
            .map_err(|e| format!("backend.url: {}", inner_message(e)))?;

        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            let key = format!("backend.headers.{name}");
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{key}: not a valid header name"))?;
            if ["host", "content-length", "transfer-encoding", "connection"]
                .contains(&header.as_str())
            {
                return Err(format!("{key}: taskwire sets this header itself"));
            }
            // The value is a secret: the message does not repeat it.
            let mut value = HeaderValue::from_str(value)
                .map_err(|_| format!("{key}: the value is not a valid header value"))?;
            value.set_sensitive(true);
            headers.push((header, value));
        }

        let start = Call::new(
            "backend.start",
            or(&self.start.method, &preset.start.method).as_deref(),
            Method::POST,
            or(&self.start.path, &preset.start.path),
            self.start.body.clone().or(preset.start.body.clone()),
            &[Placeholder::Kind, Placeholder::Params],
        )?;
        let start_id = or(&self.start.id, &preset.start.id)
            .ok_or("backend.start.id: required (a JSON pointer into the start answer)")?;
        check_pointer("backend.start.id", &start_id)?;

        let status = Call::new(
            "backend.status",
            or(&self.status.method, &preset.status.method).as_deref(),
            Method::GET,
            or(&self.status.path, &preset.status.path),
            self.status.body.clone().or(preset.status.body.clone()),
            &[Placeholder::Id],
        )?;
        status.require_id("backend.status")?;
        let cancel = match (&self.cancel, &preset.cancel) {
            (None, None) => None,
            (mine, theirs) => {
                let mine = mine.clone().unwrap_or_default();
                let theirs = theirs.clone().unwrap_or_default();
                let call = Call::new(
                    "backend.cancel",
                    or(&mine.method, &theirs.method).as_deref(),
                    Method::POST,
                    or(&mine.path, &theirs.path),
                    mine.body.or(theirs.body),
                    &[Placeholder::Id],
                )?;
                call.require_id("backend.cancel")?;
                Some(call)
            }
        };

        let (f, p) = (&self.fields, &preset.fields);
        // Explicit progress keys replace the preset's progress keys as a whole.
        let mine_progress = f.done.is_some() || f.total.is_some() || f.percent.is_some();
        let progress_from = if mine_progress { f } else { p };
        let fields = FieldsSpec {
            state: or(&f.state, &p.state),
            done_flag: or(&f.done_flag, &p.done_flag),
            done: progress_from.done.clone(),
            total: progress_from.total.clone(),
            percent: progress_from.percent.clone(),
            message: or(&f.message, &p.message),
            result: or(&f.result, &p.result),
            error: or(&f.error, &p.error),
            changed_at: or(&f.changed_at, &p.changed_at),
        };
        fields.check()?;

        let mut states = HashMap::with_capacity(self.states.len());
        for (value, state) in &self.states {
            let contract = TaskState::ALL
                .into_iter()
                .find(|s| s.as_str() == state)
                .ok_or_else(|| {
                    format!(
                        "backend.states.{value}: `{state}` is not a contract state ({})",
                        contract_states()
                    )
                })?;
            states.insert(value.clone(), contract);
        }

        Ok(Resolved {
            url: self.url.clone(),
            headers,
            start,
            start_id,
            status,
            cancel,
            fields,
            states,
        })
    }
}

/// AIP-151 long-running operations: the start answer is an Operation whose
/// `name` is the id; `GET /v1/{name}` polls it; `done` says finished, then
/// `error` ({code, message}) or `response`; progress is in `metadata`.
fn google_lro() -> HttpSpec {
    let s = |v: &str| Some(v.to_string());
    HttpSpec {
        start: StartSpec {
            method: s("POST"),
            path: None,
            body: Some(serde_json::Value::String("{params}".into())),
            id: s("/name"),
        },
        status: RequestSpec {
            method: s("GET"),
            path: s("/v1/{+id}"),
            body: None,
        },
        cancel: Some(RequestSpec {
            method: s("POST"),
            path: s("/v1/{+id}:cancel"),
            body: Some(serde_json::json!({})),
        }),
        fields: FieldsSpec {
            done_flag: s("/done"),
            percent: s("/metadata/progressPercent"),
            result: s("/response"),
            error: s("/error"),
            changed_at: s("/metadata/updateTime"),
            ..FieldsSpec::default()
        },
        ..HttpSpec::default()
    }
}

fn contract_states() -> String {
    TaskState::ALL.map(|s| s.as_str()).join(", ")
}

fn inner_message(e: crate::backend::BackendError) -> String {
    match e {
        crate::backend::BackendError::Protocol(m) => m,
        other => other.to_string(),
    }
}

fn check_pointer(key: &str, pointer: &str) -> Result<(), String> {
    if pointer.is_empty() || pointer.starts_with('/') {
        Ok(())
    } else {
        Err(format!(
            "{key}: `{pointer}` is not a JSON pointer (RFC 6901: empty, or starting with `/`)"
        ))
    }
}

/// Everything checked, ready to use.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub url: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub start: Call,
    pub start_id: String,
    pub status: Call,
    pub cancel: Option<Call>,
    pub fields: FieldsSpec,
    pub states: HashMap<String, TaskState>,
}

/// One request: method, path template, body template.
#[derive(Debug)]
pub(crate) struct Call {
    pub method: Method,
    pub path: Path,
    pub body: Option<serde_json::Value>,
}

impl Call {
    fn new(
        key: &str,
        method: Option<&str>,
        default_method: Method,
        path: Option<String>,
        body: Option<serde_json::Value>,
        allowed: &[Placeholder],
    ) -> Result<Call, String> {
        let method = match method {
            None => default_method,
            Some(m) => match m.to_ascii_uppercase().as_str() {
                "GET" => Method::GET,
                "POST" => Method::POST,
                "PUT" => Method::PUT,
                "PATCH" => Method::PATCH,
                "DELETE" => Method::DELETE,
                _ => {
                    return Err(format!(
                        "{key}.method: `{m}` is not one of GET, POST, PUT, PATCH, DELETE"
                    ))
                }
            },
        };
        let path = path.ok_or_else(|| format!("{key}.path: required"))?;
        let path = Path::parse(&path, allowed).map_err(|e| format!("{key}.path: {e}"))?;
        Ok(Call { method, path, body })
    }

    fn require_id(&self, key: &str) -> Result<(), String> {
        if self.path.has(Placeholder::Id) {
            Ok(())
        } else {
            Err(format!("{key}.path: must contain `{{id}}` (or `{{+id}}`)"))
        }
    }
}

/// Resolved, the pointers are checked: `state` or `done_flag` is there;
/// `done` (with `total`) or `percent`, not both.
impl FieldsSpec {
    fn check(&self) -> Result<(), String> {
        for (name, pointer) in [
            ("state", &self.state),
            ("done_flag", &self.done_flag),
            ("done", &self.done),
            ("total", &self.total),
            ("percent", &self.percent),
            ("message", &self.message),
            ("result", &self.result),
            ("error", &self.error),
            ("changed_at", &self.changed_at),
        ] {
            if let Some(p) = pointer {
                check_pointer(&format!("backend.fields.{name}"), p)?;
            }
        }
        if self.state.is_none() && self.done_flag.is_none() {
            return Err(
                "backend.fields.state: required (unless backend.fields.done_flag is set)".into(),
            );
        }
        if self.percent.is_some() && (self.done.is_some() || self.total.is_some()) {
            return Err(
                "backend.fields.percent: give either done (with total) or percent, not both".into(),
            );
        }
        if self.total.is_some() && self.done.is_none() {
            return Err("backend.fields.total: needs backend.fields.done".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> HttpSpec {
        toml::from_str(toml_text).expect("parses")
    }

    const JOBS: &str = r#"
        url = "http://127.0.0.1:5000"
        headers = { Authorization = "Bearer s3cret" }
        start  = { method = "POST", path = "/v1/jobs", body = { type = "{kind}", input = "{params}" }, id = "/name" }
        status = { method = "GET", path = "/v1/{id}" }
        cancel = { method = "POST", path = "/v1/{id}:cancel" }
        [fields]
        state = "/metadata/state"
        done = "/metadata/done"
        total = "/metadata/total"
        message = "/metadata/message"
        result = "/response"
        error = "/error/message"
        changed_at = "/metadata/update_time"
        [states]
        PENDING = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"
    "#;

    fn err(text: &str) -> String {
        spec(text).validate().unwrap_err()
    }

    #[test]
    fn the_documented_example_is_valid() {
        let s = spec(JOBS);
        s.validate().unwrap();
        let r = s.resolve().unwrap();
        assert_eq!(r.states["RUNNING"], TaskState::Running);
        assert_eq!(r.start.method, Method::POST);
        assert!(r.cancel.is_some());
    }

    #[test]
    fn debug_never_shows_header_values() {
        let shown = format!("{:?}", spec(JOBS));
        assert!(shown.contains("Authorization"));
        assert!(!shown.contains("s3cret"));
        let shown = format!("{:?}", spec(JOBS).resolve().unwrap());
        assert!(!shown.contains("s3cret"));
    }

    #[test]
    fn each_broken_key_is_named() {
        let cases = [
            (
                "url = \"http://127.0.0.1:5000\"",
                "https://x",
                "backend.url:",
            ),
            (
                "state = \"/metadata/state\"",
                "state = \"metadata/state\"",
                "backend.fields.state: `metadata/state` is not a JSON pointer",
            ),
            (
                "total = \"/metadata/total\"",
                "total = \"/metadata/total\"\npercent = \"/p\"",
                "backend.fields.percent:",
            ),
            (
                "RUNNING = \"running\"",
                "RUNNING = \"runing\"",
                "backend.states.RUNNING: `runing` is not a contract state",
            ),
            (
                "path = \"/v1/{id}\"",
                "path = \"/v1/jobs\"",
                "backend.status.path: must contain `{id}`",
            ),
            (
                "path = \"/v1/{id}:cancel\"",
                "path = \"/v1/cancel\"",
                "backend.cancel.path: must contain `{id}`",
            ),
            (
                "method = \"GET\"",
                "method = \"FETCH\"",
                "backend.status.method: `FETCH` is not one of",
            ),
            (
                "id = \"/name\"",
                "id = \"name\"",
                "backend.start.id: `name` is not a JSON pointer",
            ),
            (
                "path = \"/v1/jobs\"",
                "path = \"/v1/{job}\"",
                "backend.start.path: unknown placeholder `{job}`",
            ),
            (
                "path = \"/v1/jobs\"",
                "path = \"/v1/{id}\"",
                "backend.start.path: `{id}` cannot be used here",
            ),
            (
                "path = \"/v1/{id}\"",
                "path = \"v1/{id}\"",
                "backend.status.path: must start with `/`",
            ),
            (
                "Authorization = \"Bearer s3cret\"",
                "Host = \"x\"",
                "backend.headers.Host: taskwire sets this header itself",
            ),
            (
                "Authorization = \"Bearer s3cret\"",
                "Authorization = \"Bearer s3cret\\n\"",
                "backend.headers.Authorization: the value is not a valid header value",
            ),
            (
                "state = \"/metadata/state\"",
                "",
                "backend.fields.state: required",
            ),
            (
                "done = \"/metadata/done\"",
                "",
                "backend.fields.total: needs",
            ),
        ];
        for (from, to, expected) in cases {
            assert!(JOBS.contains(from), "{from}");
            let text = JOBS.replacen(from, to, 1);
            let text = if to.starts_with("https") {
                JOBS.replacen("http://127.0.0.1:5000", to, 1)
            } else {
                text
            };
            let message = err(&text);
            assert!(message.starts_with(expected), "{expected} vs {message}");
            assert!(!message.contains("s3cret"), "{message}");
        }
        let message = err(&format!("preset = \"aws\"\n{JOBS}"));
        assert!(message.starts_with("backend.preset: unknown preset `aws`"));
        let message = err("url = \"http://h\"\nstart = { path = \"/x\" }\nstatus = { path = \"/{id}\" }\nfields = { state = \"/s\" }");
        assert!(
            message.starts_with("backend.start.id: required"),
            "{message}"
        );
    }

    #[test]
    fn sub_tables_deny_unknown_keys() {
        let text = JOBS.replacen("result = ", "reslt = ", 1);
        assert!(toml::from_str::<HttpSpec>(&text).is_err());
        let text = JOBS.replacen("id = \"/name\"", "id = \"/name\", idd = \"/x\"", 1);
        assert!(toml::from_str::<HttpSpec>(&text).is_err());
    }

    #[test]
    fn the_preset_fills_defaults_and_explicit_keys_win() {
        let s = spec(
            r#"
            url = "http://127.0.0.1:9"
            preset = "google-lro"
            start = { path = "/v1/projects/p/jobs:run" }
            "#,
        );
        let r = s.resolve().unwrap();
        assert_eq!(r.start_id, "/name");
        assert_eq!(r.fields.done_flag.as_deref(), Some("/done"));
        assert_eq!(
            r.fields.percent.as_deref(),
            Some("/metadata/progressPercent")
        );
        assert_eq!(r.fields.error.as_deref(), Some("/error"));
        assert!(r.fields.state.is_none());
        assert!(r.cancel.is_some());

        let s = spec(
            r#"
            url = "http://127.0.0.1:9"
            preset = "google-lro"
            start = { path = "/v1beta/things:run" }
            status = { path = "/v1beta/{+id}" }
            [fields]
            done = "/metadata/stepsDone"
            total = "/metadata/stepsTotal"
            state = "/metadata/state"
            [states]
            CANCELLING = "running"
            "#,
        );
        let r = s.resolve().unwrap();
        assert!(
            r.fields.percent.is_none(),
            "explicit done/total replace percent"
        );
        assert_eq!(r.fields.done.as_deref(), Some("/metadata/stepsDone"));
        assert_eq!(r.fields.state.as_deref(), Some("/metadata/state"));
        assert_eq!(r.fields.done_flag.as_deref(), Some("/done"));

        // The start path is the API's own: no preset knows it.
        let message = spec("url = \"http://h\"\npreset = \"google-lro\"")
            .validate()
            .unwrap_err();
        assert_eq!(message, "backend.start.path: required");
    }
}
