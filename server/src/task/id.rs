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

/// A fresh task id: `t` and 24 hex chars, in the same partition as
/// `session` ([`partition`] of [`PARTITIONS`]): the Redis engine finds a
/// task's keys from its id alone. The last byte is chosen so (of 256 tries
/// one in [`PARTITIONS`] fits); the other 88 bits stay random.
pub fn new_task_id(session: &str) -> String {
    let want = partition(session);
    loop {
        let head = format!("t{}", random_hex(TASK_ID_BYTES - 1));
        for last in 0..=255u8 {
            let id = format!("{head}{last:02x}");
            if partition(&id) == want {
                return id;
            }
        }
    }
}

/// How many partitions the Redis engine splits tasks and sessions into.
/// Fixed: it decides where every key lives in Redis.
pub const PARTITIONS: u16 = 64;

/// The partition of a session token or task id: FNV-1a of it.
pub fn partition(s: &str) -> u16 {
    (hash32(s) % u32::from(PARTITIONS)) as u16
}

/// FNV-1a of `s`: the same on every process and every version.
pub fn hash32(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
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
