//! The page: a form to start a simulated task, the connection indicator and
//! the session's tasks with live progress bars. The server renders it (with
//! an empty list) and the browser hydrates it, then fills it from the
//! WebSocket's `welcome` and keeps it live.

use crate::protocol::{ClientMsg, Task, TaskState};
use leptos::prelude::*;
use leptos_meta::{provide_meta_context, Stylesheet, Title};

/// What the page knows of its WebSocket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
pub enum ConnState {
    Connecting,
    Connected,
    Reconnecting,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Connecting => "connecting",
            ConnState::Connected => "connected",
            ConnState::Reconnecting => "reconnecting",
        }
    }
}

/// The page's reactive state, shared by its parts.
#[derive(Clone, Copy)]
pub struct PageState {
    pub tasks: RwSignal<Vec<Task>>,
    pub conn: RwSignal<ConnState>,
    /// The last error about starting (or cancelling) a task.
    pub start_error: RwSignal<Option<String>>,
}

#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    let page = PageState {
        tasks: RwSignal::new(Vec::new()),
        conn: RwSignal::new(ConnState::Connecting),
        start_error: RwSignal::new(None),
    };
    let hydrated = RwSignal::new(false);

    #[cfg(feature = "hydrate")]
    let (send, mut outgoing) = {
        let (tx, rx) = futures::channel::mpsc::channel::<String>(crate::client::OUTGOING_QUEUE_LEN);
        let tx = std::sync::Mutex::new(tx);
        let send = Callback::new(move |msg: ClientMsg| {
            if page.conn.get_untracked() != ConnState::Connected {
                page.start_error
                    .set(Some("not connected to the server; retrying".into()));
                return;
            }
            let sent = tx
                .lock()
                .is_ok_and(|mut tx| tx.try_send(msg.to_json()).is_ok());
            if !sent {
                page.start_error
                    .set(Some("too many requests waiting; try again".into()));
            }
        });
        (send, Some(rx))
    };
    #[cfg(not(feature = "hydrate"))]
    let send = Callback::new(|_: ClientMsg| {});

    // Effects run only in the browser: this is where the page goes live.
    Effect::new(move |_| {
        #[cfg(feature = "hydrate")]
        if let Some(rx) = outgoing.take() {
            crate::client::start(page, rx);
        }
        hydrated.set(true);
    });

    view! {
        <Stylesheet id="leptos" href="/pkg/taskwire.css"/>
        <Title text="taskwire"/>
        <main data-hydrated=move || hydrated.get().then_some("true")>
            <header class="top">
                <h1>"taskwire"</h1>
                <ConnIndicator conn=page.conn/>
            </header>
            <StartForm send=send error=page.start_error/>
            <TaskList tasks=page.tasks send=send/>
        </main>
    }
}

#[component]
fn ConnIndicator(conn: RwSignal<ConnState>) -> impl IntoView {
    view! {
        <span id="conn" class="conn" data-state=move || conn.get().as_str() role="status">
            {move || conn.get().as_str()}
        </span>
    }
}

/// The `simulate` params the form describes, or what is wrong with them.
pub fn simulate_params(
    duration_ms: &str,
    steps: &str,
    fail_at: &str,
) -> Result<serde_json::Value, String> {
    let duration_ms: u64 = duration_ms
        .trim()
        .parse()
        .ok()
        .filter(|d| (1..=86_400_000).contains(d))
        .ok_or("duration must be a whole number of milliseconds, 1 to 86400000")?;
    let steps: u64 = steps
        .trim()
        .parse()
        .ok()
        .filter(|s| (1..=1_000_000_000).contains(s))
        .ok_or("steps must be a whole number, 1 to 1000000000")?;
    let fail_at = match fail_at.trim() {
        "" => None,
        f => Some(
            f.parse::<u64>()
                .ok()
                .filter(|f| *f <= steps)
                .ok_or("fail at must be empty or a step from 0 to steps")?,
        ),
    };
    Ok(serde_json::json!({ "duration_ms": duration_ms, "steps": steps, "fail_at": fail_at }))
}

#[component]
fn StartForm(send: Callback<ClientMsg>, error: RwSignal<Option<String>>) -> impl IntoView {
    let duration = RwSignal::new("10000".to_string());
    let steps = RwSignal::new("100".to_string());
    let fail_at = RwSignal::new(String::new());
    let started = StoredValue::new(0u64);

    let on_submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        match simulate_params(
            &duration.get_untracked(),
            &steps.get_untracked(),
            &fail_at.get_untracked(),
        ) {
            Err(e) => error.set(Some(e)),
            Ok(params) => {
                error.set(None);
                started.update_value(|n| *n += 1);
                send.run(ClientMsg::Start {
                    reference: format!("start-{}", started.get_value()),
                    kind: "simulate".into(),
                    params,
                });
            }
        }
    };

    view! {
        <form id="start-form" class="start" on:submit=on_submit novalidate>
            <label>
                "Duration (ms)"
                <input name="duration_ms" type="number" min="1" max="86400000" required
                    prop:value=move || duration.get()
                    on:input=move |ev| duration.set(event_target_value(&ev))/>
            </label>
            <label>
                "Steps"
                <input name="steps" type="number" min="1" max="1000000000" required
                    prop:value=move || steps.get()
                    on:input=move |ev| steps.set(event_target_value(&ev))/>
            </label>
            <label>
                "Fail at step (optional)"
                <input name="fail_at" type="number" min="0" placeholder="never"
                    prop:value=move || fail_at.get()
                    on:input=move |ev| fail_at.set(event_target_value(&ev))/>
            </label>
            <button type="submit">"Start"</button>
            <p id="start-error" class="form-error" role="alert">{move || error.get()}</p>
        </form>
    }
}

#[component]
fn TaskList(tasks: RwSignal<Vec<Task>>, send: Callback<ClientMsg>) -> impl IntoView {
    let ids = move || tasks.with(|ts| ts.iter().map(|t| t.id.clone()).collect::<Vec<_>>());
    view! {
        <section class="tasks">
            <h2>"Tasks"</h2>
            <Show when=move || tasks.with(|t| t.is_empty())>
                <p class="empty">"No tasks yet: start one above."</p>
            </Show>
            <ul id="tasks">
                <For each=ids key=|id| id.clone() children=move |id| view! { <TaskCard id tasks send/> }/>
            </ul>
        </section>
    }
}

#[component]
fn TaskCard(id: String, tasks: RwSignal<Vec<Task>>, send: Callback<ClientMsg>) -> impl IntoView {
    let task = {
        let id = id.clone();
        Memo::new(move |_| tasks.with(|ts| ts.iter().find(|t| t.id == id).cloned()))
    };
    let state =
        Memo::new(move |_| task.with(|t| t.as_ref().map_or(TaskState::Queued, |t| t.state)));
    let pct = Memo::new(move |_| task.with(|t| t.as_ref().and_then(Task::percent)));
    let field = move |f: fn(&Task) -> Option<String>| move || task.with(|t| t.as_ref().and_then(f));
    let message = field(|t| t.message.clone());
    let error = field(|t| t.error.clone());
    let kind = field(|t| Some(t.kind.clone()));
    let count = field(|t| {
        Some(match t.total {
            Some(total) => format!("{} / {}", t.done, total),
            None => format!("{} / ?", t.done),
        })
    });
    let label = format!("progress of task {id}");
    let cancel_id = id.clone();
    let cancel = move |_| {
        send.run(ClientMsg::Cancel {
            reference: None,
            task: cancel_id.clone(),
        })
    };

    view! {
        <li class="task" data-task-id=id.clone() data-state=move || state.get().as_str()>
            <div class="task-head">
                <span class="kind">{kind}</span>
                <code class="task-id">{id.clone()}</code>
                <span class=move || format!("state badge badge-{}", state.get().as_str())>
                    {move || state.get().as_str()}
                </span>
            </div>
            <div class="bar" role="progressbar" aria-label=label aria-valuemin="0" aria-valuemax="100"
                aria-valuenow=move || pct.get().map(|p| p.to_string())>
                <div class="fill" style:width=move || format!("{}%", pct.get().unwrap_or(0))></div>
            </div>
            <div class="meta">
                <span class="pct">{move || pct.get().map_or_else(|| "…".to_string(), |p| format!("{p}%"))}</span>
                <span class="count">{count}</span>
                <Show when=move || !state.get().is_final()>
                    <button class="cancel" type="button" on:click=cancel.clone()>"Cancel"</button>
                </Show>
            </div>
            <p class="message">{message}</p>
            <p class="error">{error}</p>
        </li>
    }
}

#[cfg(test)]
mod tests {
    use super::simulate_params;

    #[test]
    fn form_params_are_checked_before_sending() {
        assert_eq!(
            simulate_params("1000", "10", "").unwrap(),
            serde_json::json!({"duration_ms": 1000, "steps": 10, "fail_at": null})
        );
        assert_eq!(simulate_params("1000", "10", "5").unwrap()["fail_at"], 5);
        assert!(simulate_params("0", "10", "").is_err());
        assert!(simulate_params("1000", "x", "").is_err());
        assert!(simulate_params("1000", "10", "11").is_err());
    }
}
