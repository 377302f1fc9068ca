//! Random ids: task ids and session tokens, from the OS random source.

/// Random bytes in a task id (shown as twice as many hex chars, after `t`).
const TASK_ID_BYTES: usize = 12;

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS random source failing is not something a request can cause.
    getrandom::fill(&mut buf).expect("the OS random source works");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh task id: `t` and 24 hex chars.
pub fn new_task_id() -> String {
    format!("t{}", random_hex(TASK_ID_BYTES))
}

/// Random bytes in a session token (128 bits).
const SESSION_TOKEN_BYTES: usize = 16;

/// A fresh session token: 32 lowercase hex chars.
pub fn new_session_token() -> String {
    random_hex(SESSION_TOKEN_BYTES)
}

/// A well-formed session token: 32 lowercase hex chars (128 random bits).
pub fn is_session_token(s: &str) -> bool {
    s.len() == 2 * SESSION_TOKEN_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
