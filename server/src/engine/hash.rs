//! The maps of the per-poll path (tasks, sessions, connections, queue
//! keys): foldhash instead of std's SipHash, which was 5.5 % of the
//! server's samples at 10,000 tasks (3.2 % after). Still seeded at random
//! per process; the keys are ids the server made, a client's string only
//! ever looks one up.

pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
