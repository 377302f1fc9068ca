//! The page's state, apart from the browser socket that feeds it and the
//! views that show it: what the page knows of its connection, its form
//! errors and toasts, the tasks it started from, and the reconnect backoff.
//! Plain data and pure functions, so both the views (`ui`) and the socket
//! (`client`) import it and neither imports the other's insides.

use crate::kinds::{simulate_kind, KindInfo, ParamsError};
use crate::protocol::{Task, TaskState};
use crate::store::TaskView;
use leptos::prelude::*;

/// What the page knows of its WebSocket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
pub enum ConnState {
    Connecting,
    Connected,
    Reconnecting,
    Offline,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Connecting => "connecting",
            ConnState::Connected => "connected",
            ConnState::Reconnecting => "reconnecting",
            ConnState::Offline => "offline",
        }
    }
}

/// An error about the form, next to the field it concerns when known.
#[derive(Clone, Debug, PartialEq)]
pub struct FormError {
    /// The params property to blame (`#err-<field>`), when one is.
    pub field: Option<String>,
    pub text: String,
}

impl FormError {
    /// An error about the form as a whole.
    pub fn general(text: String) -> Self {
        FormError { field: None, text }
    }

    /// The page's own check of a field.
    pub fn local(e: ParamsError) -> Self {
        FormError {
            field: e.field,
            text: e.message,
        }
    }

    /// A refusal from the server, at the field its message names: the
    /// engine's schema check writes `<field>: <why>` (the field shows
    /// `<why>`); the simulator quotes the field in backticks
    /// (`` `steps` must be… ``). About no field: `code: message`.
    pub fn from_server(code: &str, message: &str) -> Self {
        let plain = |f: &str| {
            !f.is_empty()
                && f.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        };
        if let Some((field, why)) = message.split_once(": ").filter(|(f, _)| plain(f)) {
            return FormError {
                field: Some(field.to_string()),
                text: why.to_string(),
            };
        }
        let mut quoted = message.split('`');
        quoted.next();
        match quoted.next().filter(|f| plain(f)) {
            Some(field) => FormError {
                field: Some(field.to_string()),
                text: message.to_string(),
            },
            None => FormError::general(format!("{code}: {message}")),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Toast {
    pub id: u64,
    pub text: String,
    pub state: TaskState,
}

/// Toasts on screen at once; older ones give way.
pub const MAX_TOASTS: usize = 5;

/// The page's reactive state, shared by its parts.
#[derive(Clone, Copy)]
pub struct PageState {
    pub tasks: RwSignal<Vec<TaskView>>,
    pub conn: RwSignal<ConnState>,
    /// Whether the WebSocket is open and welcomed (what sending depends on;
    /// `conn` may say "offline" during a blip that did not break it).
    pub open: RwSignal<bool>,
    /// When the next reconnect is due (Unix ms), while reconnecting.
    pub reconnect_at: RwSignal<u64>,
    /// The browser's clock, ticking each second; 0 until hydrated (so the
    /// server's render and the first client render agree).
    pub now: RwSignal<u64>,
    pub form_error: RwSignal<Option<FormError>>,
    pub toasts: RwSignal<Vec<Toast>>,
    /// The kinds the page offers (what cards and toasts call them).
    pub kinds: StoredValue<Vec<KindInfo>>,
}

impl PageState {
    /// A kind's title when the page knows the kind, else its name.
    pub fn kind_title(&self, kind: &str) -> String {
        self.kinds.with_value(|ks| {
            ks.iter()
                .find(|k| k.name == kind)
                .map_or_else(|| kind.to_string(), |k| k.title().to_string())
        })
    }

    pub fn toast(&self, text: String, state: TaskState) {
        let id = self
            .toasts
            .with_untracked(|t| t.last().map_or(0, |t| t.id + 1));
        self.toasts.update(|t| {
            t.push(Toast { id, text, state });
            if t.len() > MAX_TOASTS {
                t.remove(0);
            }
        });
        #[cfg(feature = "hydrate")]
        {
            let toasts = self.toasts;
            set_timeout(
                move || toasts.update(|t| t.retain(|x| x.id != id)),
                std::time::Duration::from_secs(6),
            );
        }
    }
}

/// The session's tasks as the server knows them at render time.
#[derive(Clone, Debug, Default)]
pub struct InitialTasks(pub Vec<Task>);

/// The kinds the page offers, in the order its selector lists them; the
/// server provides them (and writes them into the page's head for
/// hydration).
#[derive(Clone, Debug, PartialEq)]
pub struct Kinds(pub Vec<KindInfo>);

impl Kinds {
    /// The configured kinds; none configured (any kind goes to the one
    /// backend): the simulator's `simulate`.
    pub fn offered(configured: Vec<KindInfo>) -> Kinds {
        if configured.is_empty() {
            Kinds(vec![simulate_kind()])
        } else {
            Kinds(configured)
        }
    }
}

impl Default for Kinds {
    fn default() -> Self {
        Kinds::offered(Vec::new())
    }
}

/// Where the page's stylesheet is (its name carries a content hash when
/// cargo-leptos hashed the assets); the server provides it.
#[derive(Clone, Debug)]
pub struct StylesheetHref(pub String);

/// "taskwire", or "(N running) taskwire" while N tasks run.
pub fn page_title<'a>(tasks: impl Iterator<Item = &'a Task>) -> String {
    match tasks.filter(|t| !t.state.is_final()).count() {
        0 => "taskwire".to_string(),
        n => format!("({n} running) taskwire"),
    }
}

/// The first reconnect waits up to this long...
pub const BACKOFF_FIRST_MS: u64 = 500;
/// ...doubling per failed attempt up to this cap.
pub const BACKOFF_MAX_MS: u64 = 15_000;
/// Never sooner than this, so a page never spins on a dead server.
pub const BACKOFF_FLOOR_MS: u64 = 100;

/// How long to wait before reconnect `attempt` (0 = the first), with full
/// jitter: uniform over `[0, cap]` where the cap doubles per attempt up to
/// [`BACKOFF_MAX_MS`], so many pages cut off by one restart spread out
/// instead of coming back together. `unit` is a uniform draw from `[0, 1)`
/// (`Math.random()` in the browser).
pub fn backoff_ms(attempt: u32, unit: f64) -> u64 {
    let cap = BACKOFF_FIRST_MS
        .saturating_mul(1u64 << attempt.min(20))
        .min(BACKOFF_MAX_MS);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    ((cap as f64 * unit) as u64).max(BACKOFF_FLOOR_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_find_their_field() {
        let field = |m: &str| FormError::from_server("invalid_params", m).field;
        // The engine's schema check.
        assert_eq!(
            field("n: How many must be from 1 to 100").as_deref(),
            Some("n")
        );
        // The simulator's own.
        assert_eq!(
            field("`steps` must be an integer").as_deref(),
            Some("steps")
        );
        assert_eq!(field("backend down: connection refused"), None);
        assert_eq!(field("no such kind"), None);
        let e = FormError::from_server("invalid_params", "n: too big");
        assert_eq!(e.text, "too big");
        let e = FormError::from_server("unavailable", "backend down: refused");
        assert_eq!(e.text, "unavailable: backend down: refused");
    }

    #[test]
    fn no_configured_kinds_offer_simulate() {
        assert_eq!(Kinds::offered(vec![]).0, vec![simulate_kind()]);
        let k = KindInfo {
            name: "count".into(),
            title: None,
            params: None,
        };
        assert_eq!(Kinds::offered(vec![k.clone()]).0, vec![k]);
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_cap() {
        // The whole range from (near) zero to the cap is reachable.
        assert_eq!(backoff_ms(0, 0.0), BACKOFF_FLOOR_MS);
        assert_eq!(backoff_ms(0, 0.999_999), BACKOFF_FIRST_MS - 1);
        assert_eq!(backoff_ms(1, 0.5), BACKOFF_FIRST_MS);
        assert_eq!(backoff_ms(3, 0.5), 2_000);
        // The cap stops doubling at the maximum, whatever the attempt.
        for attempt in [5, 10, 31, u32::MAX] {
            assert!(backoff_ms(attempt, 0.999_999) < BACKOFF_MAX_MS);
            assert!(backoff_ms(attempt, 0.999_999) > BACKOFF_MAX_MS - 10);
        }
        // Bad draws do not escape the range.
        assert_eq!(backoff_ms(2, f64::NAN), BACKOFF_FLOOR_MS);
        assert_eq!(backoff_ms(2, 7.0), 2_000);
        assert_eq!(backoff_ms(2, -1.0), BACKOFF_FLOOR_MS);
    }

    #[test]
    fn the_title_counts_running_tasks() {
        assert_eq!(page_title([].iter()), "taskwire");
    }
}
