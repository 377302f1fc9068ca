//! The client protocol of `docs/protocol.md` section 1: every
//! message and the `Task` object, defined once and used by the server and the
//! wasm client alike. Parsing of client messages lives here too, so the error
//! a malformed frame gets is decided in one place.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version announced in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest `ref` a client may send, in chars.
pub const MAX_REF_CHARS: usize = 64;
/// Longest task id or kind a client may send, in bytes. Ours are far shorter.
pub const MAX_ID_BYTES: usize = 128;
/// Longest watch token a `refresh` may carry.
pub const MAX_TOKEN_BYTES: usize = 2048;

/// The lifecycle of a task. `succeeded`, `failed` and `cancelled` are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub const ALL: [TaskState; 5] = [
        TaskState::Queued,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    /// A task never leaves a final state.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }
}

/// The full current view of one task, as every `task`/`accepted` message and
/// `welcome` carry it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub kind: String,
    pub state: TaskState,
    pub done: u64,
    pub total: Option<u64>,
    pub message: Option<String>,
    pub result: Option<JsonText>,
    pub error: Option<String>,
    pub seq: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Extension (docs/protocol.md): the `params` the task was started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<JsonText>,
}

/// A JSON value a task carries (its `params`, its `result`), kept as its
/// compact text and shared by every copy of the task: a `Value` object of
/// two fields is a ~500-byte tree, held by every live and finished task
/// for its whole retention and cloned with every new state. Same JSON on
/// the wire as the `Value` it was made from, written out as the text itself
/// (no `Value` built per frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonText(std::sync::Arc<str>);

impl JsonText {
    pub fn new(value: &Value) -> Self {
        JsonText(value.to_string().into())
    }

    pub fn value(&self) -> Value {
        serde_json::from_str(&self.0).expect("always JSON text")
    }

    pub fn as_json(&self) -> &str {
        &self.0
    }
}

impl From<Value> for JsonText {
    fn from(value: Value) -> Self {
        JsonText::new(&value)
    }
}

impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Borrowed, checked in one scan: no tree, no copy.
        let raw: &serde_json::value::RawValue =
            serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(JsonText::from)
    }
}

impl Task {
    /// Progress in whole percent (0..=100), `None` while `total` is unknown.
    pub fn percent(&self) -> Option<u8> {
        match self.total {
            Some(0) => Some(if self.state == TaskState::Succeeded {
                100
            } else {
                0
            }),
            Some(total) => Some((self.done.min(total) * 100 / total) as u8),
            None if self.state == TaskState::Succeeded => Some(100),
            None => None,
        }
    }
}

/// The codes an `error` message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownKind,
    InvalidParams,
    NotFound,
    RateLimited,
    TooManyTasks,
    BackendUnavailable,
    Internal,
    /// Since 1.1: a watch token that is missing, invalid or expired.
    Unauthorized,
    /// Since 1.1: what the watch token does not allow (`start`; `cancel`
    /// without the permission).
    Forbidden,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownKind => "unknown_kind",
            ErrorCode::InvalidParams => "invalid_params",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyTasks => "too_many_tasks",
            ErrorCode::BackendUnavailable => "backend_unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
        }
    }
}

/// Server → client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Welcome {
        protocol: u32,
        /// The cookie session's token; `null` on a watch token's connection.
        session: Option<String>,
        tasks: Vec<Task>,
    },
    Task {
        task: Task,
    },
    Accepted {
        #[serde(rename = "ref")]
        reference: String,
        task: Task,
    },
    Error {
        #[serde(rename = "ref")]
        reference: Option<String>,
        code: ErrorCode,
        message: String,
    },
}

impl ServerMsg {
    pub fn error(reference: Option<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMsg::Error {
            reference,
            code,
            message: message.into(),
        }
    }
}

/// Client → server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    Start {
        #[serde(rename = "ref")]
        reference: String,
        kind: String,
        params: Value,
    },
    Subscribe {
        task: String,
    },
    Unsubscribe {
        task: String,
    },
    Cancel {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        task: String,
    },
    /// Extension (docs/protocol.md): drop a finished task from the session's
    /// list now rather than after the retention. No reply; a live task stays.
    Forget {
        task: String,
    },
    /// Since 1.1: a watch token's connection replaces its token before it
    /// expires (no reply when valid and of the same scope).
    Refresh {
        token: String,
    },
}

/// Why a client frame was refused: becomes an `error` message with this `ref`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub reference: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    fn bad_request(reference: Option<String>, message: impl Into<String>) -> Self {
        Rejection {
            reference,
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }
}

impl From<Rejection> for ServerMsg {
    fn from(r: Rejection) -> Self {
        ServerMsg::Error {
            reference: r.reference,
            code: r.code,
            message: r.message,
        }
    }
}

impl ClientMsg {
    /// Parses one text frame. Every way a frame can be wrong is a
    /// `bad_request` whose `ref` is the frame's own when that was valid.
    pub fn parse(text: &str) -> Result<ClientMsg, Rejection> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Rejection::bad_request(None, format!("malformed JSON: {e}")))?;
        let Value::Object(object) = &value else {
            return Err(Rejection::bad_request(
                None,
                "a message must be a JSON object",
            ));
        };
        let reference = match object.get("ref") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.chars().count() <= MAX_REF_CHARS => Some(s.clone()),
            Some(Value::String(_)) => {
                return Err(Rejection::bad_request(
                    None,
                    format!("`ref` is longer than {MAX_REF_CHARS} characters"),
                ))
            }
            Some(_) => return Err(Rejection::bad_request(None, "`ref` must be a string")),
        };
        match object.get("type") {
            Some(Value::String(_)) => {}
            Some(_) => return Err(Rejection::bad_request(reference, "`type` must be a string")),
            None => return Err(Rejection::bad_request(reference, "missing field `type`")),
        }
        let msg: ClientMsg = serde_json::from_value(value)
            .map_err(|e| Rejection::bad_request(reference.clone(), e.to_string()))?;
        msg.validate()
            .map_err(|m| Rejection::bad_request(reference, m))?;
        Ok(msg)
    }

    fn validate(&self) -> Result<(), String> {
        fn id(field: &str, s: &str) -> Result<(), String> {
            if s.is_empty() || s.len() > MAX_ID_BYTES {
                Err(format!("`{field}` must be 1 to {MAX_ID_BYTES} bytes"))
            } else {
                Ok(())
            }
        }
        match self {
            ClientMsg::Start { kind, params, .. } => {
                id("kind", kind)?;
                if !params.is_object() {
                    return Err("`params` must be a JSON object".into());
                }
                Ok(())
            }
            ClientMsg::Subscribe { task }
            | ClientMsg::Unsubscribe { task }
            | ClientMsg::Cancel { task, .. }
            | ClientMsg::Forget { task } => id("task", task),
            ClientMsg::Refresh { token } => {
                if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
                    Err(format!("`token` must be 1 to {MAX_TOKEN_BYTES} bytes"))
                } else {
                    Ok(())
                }
            }
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a ClientMsg always serialises")
    }
}

/// Every field any server message has, all optional: decoding through it
/// avoids serde's buffering of internally tagged enums, which is most of
/// the JSON code in the wasm. Same result as `serde_json::from_str::<ServerMsg>`.
#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    protocol: Option<u32>,
    session: Option<String>,
    tasks: Option<Vec<Task>>,
    task: Option<Task>,
    #[serde(rename = "ref")]
    reference: Option<String>,
    code: Option<ErrorCode>,
    message: Option<String>,
}

impl ServerMsg {
    /// Decodes one server frame (the browser's path).
    pub fn from_json(text: &str) -> Option<ServerMsg> {
        let e: Envelope = serde_json::from_str(text).ok()?;
        Some(match e.kind.as_str() {
            "welcome" => ServerMsg::Welcome {
                protocol: e.protocol?,
                session: e.session,
                tasks: e.tasks?,
            },
            "task" => ServerMsg::Task { task: e.task? },
            "accepted" => ServerMsg::Accepted {
                reference: e.reference?,
                task: e.task?,
            },
            "error" => ServerMsg::Error {
                reference: e.reference,
                code: e.code?,
                message: e.message?,
            },
            _ => return None,
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a ServerMsg always serialises")
    }
}

/// A `task` message that borrows its task: the server serialises each state
/// once, however many connections it goes to. Same JSON as `ServerMsg::Task`.
#[derive(Serialize)]
#[serde(tag = "type", rename = "task")]
pub struct TaskMsgRef<'a> {
    pub task: &'a Task,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task_json() -> Value {
        json!({
            "id": "t1", "kind": "simulate", "state": "running", "done": 3, "total": 100,
            "message": null, "result": null, "error": null, "seq": 4,
            "created_ms": 1_700_000_000_000u64, "updated_ms": 1_700_000_000_500u64
        })
    }

    /// Parses the contract's JSON, re-serialises it and gets the same JSON;
    /// the browser's decoder agrees with serde's.
    fn round_trip_server(v: Value) {
        let msg: ServerMsg = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&msg).unwrap(), v);
        assert_eq!(ServerMsg::from_json(&v.to_string()), Some(msg));
    }

    #[test]
    fn server_messages_round_trip_as_in_the_contract() {
        round_trip_server(
            json!({"type":"welcome","protocol":1,"session":"abc","tasks":[task_json()]}),
        );
        round_trip_server(json!({"type":"task","task":task_json()}));
        round_trip_server(json!({"type":"accepted","ref":"r1","task":task_json()}));
        round_trip_server(
            json!({"type":"error","ref":"r1","code":"not_found","message":"no such task"}),
        );
        round_trip_server(json!({"type":"error","ref":null,"code":"bad_request","message":"x"}));
        let mut done = task_json();
        done["state"] = json!("succeeded");
        done["result"] = json!({"steps": 100});
        done["total"] = json!(null);
        round_trip_server(json!({"type":"task","task":done}));
    }

    #[test]
    fn every_error_code_and_state_is_spelled_as_in_the_contract() {
        for (code, text) in [
            (ErrorCode::BadRequest, "bad_request"),
            (ErrorCode::UnknownKind, "unknown_kind"),
            (ErrorCode::InvalidParams, "invalid_params"),
            (ErrorCode::NotFound, "not_found"),
            (ErrorCode::RateLimited, "rate_limited"),
            (ErrorCode::TooManyTasks, "too_many_tasks"),
            (ErrorCode::BackendUnavailable, "backend_unavailable"),
            (ErrorCode::Internal, "internal"),
            (ErrorCode::Unauthorized, "unauthorized"),
            (ErrorCode::Forbidden, "forbidden"),
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(text));
            assert_eq!(code.as_str(), text);
        }
        for s in TaskState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        }
    }

    #[test]
    fn the_borrowing_task_message_is_the_same_json() {
        let task: Task = serde_json::from_value(task_json()).unwrap();
        assert_eq!(
            serde_json::to_string(&TaskMsgRef { task: &task }).unwrap(),
            ServerMsg::Task { task }.to_json()
        );
    }

    #[test]
    fn client_messages_round_trip_as_in_the_contract() {
        for v in [
            json!({"type":"start","ref":"r1","kind":"simulate","params":{"duration_ms":1000,"steps":10,"fail_at":null}}),
            json!({"type":"subscribe","task":"t1"}),
            json!({"type":"unsubscribe","task":"t1"}),
            json!({"type":"cancel","ref":"r2","task":"t1"}),
            json!({"type":"cancel","task":"t1"}),
        ] {
            let msg = ClientMsg::parse(&v.to_string()).unwrap();
            assert_eq!(serde_json::to_value(&msg).unwrap(), v);
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let msg = ClientMsg::parse(r#"{"type":"subscribe","task":"t1","extra":[1]}"#).unwrap();
        assert_eq!(msg, ClientMsg::Subscribe { task: "t1".into() });
    }

    fn rejected(text: &str) -> (Option<String>, ErrorCode) {
        let r = ClientMsg::parse(text).expect_err(text);
        (r.reference, r.code)
    }

    #[test]
    fn what_the_contract_calls_bad_request_is_refused_with_the_right_ref() {
        use ErrorCode::BadRequest as B;
        let r = |s: &str| Some(s.to_string());
        assert_eq!(rejected("not json"), (None, B));
        assert_eq!(rejected(""), (None, B));
        assert_eq!(rejected("42"), (None, B));
        assert_eq!(rejected(r#"{"ref":"a"}"#), (r("a"), B));
        assert_eq!(rejected(r#"{"type":7,"ref":"a"}"#), (r("a"), B));
        assert_eq!(rejected(r#"{"type":"explode","ref":"a"}"#), (r("a"), B));
        assert_eq!(
            rejected(r#"{"type":"start","ref":"a","params":{}}"#),
            (r("a"), B)
        );
        assert_eq!(
            rejected(r#"{"type":"start","ref":"a","kind":"k"}"#),
            (r("a"), B)
        );
        assert_eq!(
            rejected(r#"{"type":"start","ref":"a","kind":"k","params":1}"#),
            (r("a"), B)
        );
        assert_eq!(
            rejected(r#"{"type":"start","ref":"a","kind":"","params":{}}"#),
            (r("a"), B)
        );
        assert_eq!(
            rejected(r#"{"type":"start","kind":"k","params":{}}"#),
            (None, B)
        );
        assert_eq!(rejected(r#"{"type":"subscribe"}"#), (None, B));
        assert_eq!(rejected(r#"{"type":"subscribe","task":""}"#), (None, B));
        assert_eq!(
            rejected(r#"{"type":"cancel","ref":"c","task":5}"#),
            (r("c"), B)
        );
        // An invalid ref is itself refused, with ref null.
        assert_eq!(
            rejected(r#"{"type":"cancel","ref":5,"task":"t"}"#),
            (None, B)
        );
        let long = format!(
            r#"{{"type":"cancel","ref":"{}","task":"t"}}"#,
            "x".repeat(65)
        );
        assert_eq!(rejected(&long), (None, B));
        let ok = format!(
            r#"{{"type":"cancel","ref":"{}","task":"t"}}"#,
            "é".repeat(64)
        );
        assert!(
            ClientMsg::parse(&ok).is_ok(),
            "64 characters, more bytes, is fine"
        );
    }

    #[test]
    fn params_and_result_are_written_as_the_json_they_were() {
        let mut v = task_json();
        v["params"] = json!({"duration_ms": 5000, "nested": {"a": [1, 2.5, "x\"y"]}, "é": null});
        v["result"] = json!([{"k": true}, -3]);
        let task: Task = serde_json::from_value(v.clone()).unwrap();
        // Through the text writer (the wire) and through `Value`'s (tests).
        let text = serde_json::to_string(&task).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v);
        assert_eq!(serde_json::to_value(&task).unwrap(), v);
        assert_eq!(task.params.as_ref().unwrap().value(), v["params"]);
    }

    #[test]
    fn percent_is_whole_and_bounded() {
        let mut t: Task = serde_json::from_value(task_json()).unwrap();
        assert_eq!(t.percent(), Some(3));
        t.total = None;
        assert_eq!(t.percent(), None);
        t.total = Some(3);
        t.done = 5;
        assert_eq!(t.percent(), Some(100));
    }
}
