//! The page: the start form, the connection indicator, the session's tasks as
//! live cards (progress bar, rate, ETA, sparkline), filters and toasts. The
//! server renders it with the session's tasks already in it; the browser
//! hydrates it and keeps it live from the WebSocket.

use crate::page::{ConnState, FormError, PageState, Toast};
use crate::protocol::{ClientMsg, Task, TaskState};
use crate::simulate::{simulate_params, KIND_SIMULATE};
use crate::store::{self, TaskView};
use leptos::prelude::*;

/// Which tasks the list shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    All,
    Running,
    State(TaskState),
}

impl Filter {
    fn shows(self, state: TaskState) -> bool {
        match self {
            Filter::All => true,
            Filter::Running => !state.is_final(),
            Filter::State(s) => s == state,
        }
    }
}

/// On the server, from context; in the browser, from the JSON the server
/// wrote into the page's head, so hydration starts from the same list.
fn initial_tasks() -> Vec<Task> {
    #[cfg(feature = "ssr")]
    {
        use_context::<crate::page::InitialTasks>()
            .map(|i| i.0)
            .unwrap_or_default()
    }
    #[cfg(all(feature = "hydrate", not(feature = "ssr")))]
    {
        document()
            .get_element_by_id(crate::INITIAL_TASKS_ID)
            .and_then(|e| e.text_content())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }
    #[cfg(not(any(feature = "ssr", feature = "hydrate")))]
    {
        Vec::new()
    }
}

#[component]
pub fn App() -> impl IntoView {
    let mut initial: Vec<TaskView> = Vec::new();
    store::replace_all(&mut initial, initial_tasks());
    let page = PageState {
        tasks: RwSignal::new(initial),
        conn: RwSignal::new(ConnState::Connecting),
        open: RwSignal::new(false),
        reconnect_at: RwSignal::new(0),
        now: RwSignal::new(0),
        form_error: RwSignal::new(None),
        toasts: RwSignal::new(Vec::new()),
    };
    let hydrated = RwSignal::new(false);

    #[cfg(feature = "hydrate")]
    let (send, mut outgoing) = {
        let (tx, rx) = futures::channel::mpsc::channel::<String>(crate::client::OUTGOING_QUEUE_LEN);
        let tx = std::sync::Mutex::new(tx);
        let send = Callback::new(move |msg: ClientMsg| {
            let start = matches!(msg, ClientMsg::Start { .. });
            let problem = if !page.open.get_untracked() {
                Some("not connected to the server; retrying")
            } else if !tx
                .lock()
                .is_ok_and(|mut tx| tx.try_send(msg.to_json()).is_ok())
            {
                Some("too many requests waiting; try again")
            } else {
                None
            };
            if let Some(p) = problem {
                if start {
                    page.form_error.set(Some(FormError::about(p.into())));
                } else {
                    page.toast(p.into(), TaskState::Failed);
                }
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

    // The server writes the first <title> (see `shell`); the browser keeps
    // it current. Plain `document.title`: leptos_meta costs ~1 KB gzip.
    #[cfg(feature = "hydrate")]
    Effect::new(move |_| {
        let title = page
            .tasks
            .with(|list| crate::page::page_title(list.iter().map(|v| &v.task)));
        document().set_title(&title);
    });
    let filter = RwSignal::new(Filter::All);

    view! {
        <main data-hydrated=move || hydrated.get().then_some("true")>
            <header class="top">
                <h1>"taskwire"</h1>
                <button type="button" class="secondary notify" title="Notify me when a task finishes"
                    on:click=move |_| {
                        #[cfg(feature = "hydrate")]
                        crate::client::ask_notifications();
                    }>
                    "Notify me"
                </button>
                <ConnIndicator page/>
            </header>
            <StartForm send page/>
            <Toolbar page filter send/>
            <TaskList page filter send/>
            <Toasts toasts=page.toasts/>
        </main>
    }
}

#[component]
fn ConnIndicator(page: PageState) -> impl IntoView {
    let text = move || match page.conn.get() {
        ConnState::Reconnecting => {
            let now = page.now.get();
            let at = page.reconnect_at.get();
            if now == 0 || at <= now {
                "reconnecting…".to_string()
            } else {
                format!("reconnecting in {} s", (at - now).div_ceil(1000))
            }
        }
        ConnState::Connecting => "connecting…".to_string(),
        s => s.as_str().to_string(),
    };
    view! {
        <span id="conn" class="conn" data-state=move || page.conn.get().as_str() role="status" aria-live="polite">
            {text}
        </span>
    }
}

#[component]
fn Field(
    name: &'static str,
    label: &'static str,
    value: RwSignal<String>,
    error: RwSignal<Option<FormError>>,
    #[prop(optional)] placeholder: &'static str,
    min: &'static str,
) -> impl IntoView {
    let err_id = format!("err-{name}");
    let mine = move || {
        error.with(|e| {
            e.as_ref()
                .filter(|e| e.field == Some(name))
                .map(|e| e.text.clone())
        })
    };
    view! {
        <label>
            {label}
            <input name=name type="number" min=min inputmode="numeric" placeholder=placeholder
                aria-invalid=move || mine().map(|_| "true")
                aria-describedby=err_id.clone()
                value=value.get_untracked()
                prop:value=move || value.get()
                on:input=move |ev| value.set(event_target_value(&ev))/>
            <span class="field-error" id=err_id>{mine}</span>
        </label>
    }
}

#[component]
fn StartForm(send: Callback<ClientMsg>, page: PageState) -> impl IntoView {
    let duration = RwSignal::new("10000".to_string());
    let steps = RwSignal::new("100".to_string());
    let fail_at = RwSignal::new(String::new());
    let started = StoredValue::new(0u64);
    let error = page.form_error;

    let start = move |count: u32| match simulate_params(
        &duration.get_untracked(),
        &steps.get_untracked(),
        &fail_at.get_untracked(),
    ) {
        Err(e) => error.set(Some(e)),
        Ok(params) => {
            error.set(None);
            for _ in 0..count {
                started.update_value(|n| *n += 1);
                send.run(ClientMsg::Start {
                    reference: format!("start-{}", started.get_value()),
                    kind: KIND_SIMULATE.into(),
                    params: params.clone(),
                });
            }
        }
    };
    let on_submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        start(1);
    };

    view! {
        <form id="start-form" class="start" on:submit=on_submit novalidate>
            <Field name="duration_ms" label="Duration (ms)" value=duration error min="1"/>
            <Field name="steps" label="Steps" value=steps error min="1"/>
            <Field name="fail_at" label="Fail at step (optional)" value=fail_at error min="0" placeholder="never"/>
            <div class="actions">
                <button type="submit">"Start"</button>
                <button type="button" class="secondary" id="start-10" on:click=move |_| start(10)>"Start 10"</button>
            </div>
            <p id="start-error" class="form-error" role="alert">{move || error.get().map(|e| e.text)}</p>
        </form>
    }
}

#[component]
fn Toolbar(page: PageState, filter: RwSignal<Filter>, send: Callback<ClientMsg>) -> impl IntoView {
    let count = move |f: Filter| {
        page.tasks
            .with(|t| t.iter().filter(|v| f.shows(v.task.state)).count())
    };
    let button = move |f: Filter, label: &'static str| {
        view! {
            <button type="button" class="chip" aria-pressed=move || (filter.get() == f).to_string()
                data-filter=label on:click=move |_| filter.set(f)>
                {label} " " <span class="n">{move || count(f)}</span>
            </button>
        }
    };
    let clear = move |_| {
        let finished: Vec<String> = page.tasks.with_untracked(|t| {
            t.iter()
                .filter(|v| v.task.state.is_final())
                .map(|v| v.task.id.clone())
                .collect()
        });
        page.tasks
            .update(|t| t.retain(|v| !v.task.state.is_final()));
        for task in finished {
            send.run(ClientMsg::Forget { task });
        }
    };
    view! {
        <nav class="toolbar" aria-label="Filter tasks">
            {button(Filter::All, "all")}
            {button(Filter::Running, "running")}
            {button(Filter::State(TaskState::Succeeded), "succeeded")}
            {button(Filter::State(TaskState::Failed), "failed")}
            {button(Filter::State(TaskState::Cancelled), "cancelled")}
            <button type="button" class="secondary clear" id="clear-finished" on:click=clear
                disabled=move || count(Filter::Running) == count(Filter::All)>
                "Clear finished"
            </button>
        </nav>
    }
}

#[component]
fn TaskList(page: PageState, filter: RwSignal<Filter>, send: Callback<ClientMsg>) -> impl IntoView {
    let ids = move || {
        let f = filter.get();
        page.tasks.with(|ts| {
            ts.iter()
                .filter(|v| f.shows(v.task.state))
                .map(|v| v.task.id.clone())
                .collect::<Vec<_>>()
        })
    };
    view! {
        <section class="tasks" aria-label="Tasks">
            {move || {
                page.tasks
                    .with(|t| t.is_empty())
                    .then(|| view! { <p class="empty">"No tasks yet: start one above."</p> })
            }}
            <ul id="tasks">
                <For each=ids key=|id| id.clone() children=move |id| view! { <TaskCard id page send/> }/>
            </ul>
        </section>
    }
}

/// `1.2 s`, `3 m 05 s`, `2 h 01 m`.
pub fn fmt_duration(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{}.{} s", s, (ms % 1000) / 100)
    } else if s < 3600 {
        format!("{} m {:02} s", s / 60, s % 60)
    } else {
        format!("{} h {:02} m", s / 3600, (s % 3600) / 60)
    }
}

/// One decimal without float formatting (keeps it out of the wasm).
fn fmt_rate(per_s: f64) -> String {
    let tenths = (per_s * 10.0).round() as u64;
    format!("{}.{}/s", tenths / 10, tenths % 10)
}

fn fmt_params(params: &serde_json::Value) -> String {
    let get = |k: &str| params.get(k).and_then(|v| v.as_u64());
    let mut parts = vec![];
    if let Some(d) = get("duration_ms") {
        parts.push(format!(
            "{} over {}",
            get("steps").unwrap_or(0),
            fmt_duration(d)
        ));
    }
    if let Some(f) = get("fail_at") {
        parts.push(format!("fails at {f}"));
    }
    parts.join(" · ")
}

/// The sparkline's points: progress over time in a 100 × 20 box.
pub fn spark_points(samples: &[(u64, u64)], total: Option<u64>) -> String {
    let (Some(&(t0, _)), Some(&(t1, _))) = (samples.first(), samples.last()) else {
        return String::new();
    };
    let span = (t1 - t0).max(1);
    let max = total
        .unwrap_or_else(|| samples.iter().map(|s| s.1).max().unwrap_or(1))
        .max(1);
    samples
        .iter()
        .map(|&(t, d)| format!("{},{}", (t - t0) * 100 / span, 20 - d.min(max) * 20 / max))
        .collect::<Vec<_>>()
        .join(" ")
}

#[component]
fn TaskCard(id: String, page: PageState, send: Callback<ClientMsg>) -> impl IntoView {
    let view_of = {
        let id = id.clone();
        Memo::new(move |_| {
            page.tasks
                .with(|ts| ts.iter().find(|v| v.task.id == id).cloned())
        })
    };
    let task = move |f: fn(&Task) -> String| {
        move || view_of.with(|v| v.as_ref().map(|v| f(&v.task)).unwrap_or_default())
    };
    let state = Memo::new(move |_| {
        view_of.with(|v| v.as_ref().map_or(TaskState::Queued, |v| v.task.state))
    });
    let pct = Memo::new(move |_| view_of.with(|v| v.as_ref().and_then(|v| v.task.percent())));
    let live = move || !state.get().is_final();
    let elapsed = move || {
        let now = page.now.get();
        view_of.with(|v| {
            v.as_ref().map(|v| {
                let t = &v.task;
                let end = if t.state.is_final() {
                    t.updated_ms
                } else {
                    now.max(t.updated_ms)
                };
                fmt_duration(end.saturating_sub(t.created_ms))
            })
        })
    };
    let rate = move || view_of.with(|v| v.as_ref().and_then(|v| v.rate()).map(fmt_rate));
    let eta = move || {
        view_of.with(|v| {
            v.as_ref()
                .and_then(|v| v.eta_ms())
                .map(|ms| format!("ETA {}", fmt_duration(ms)))
        })
    };
    let spark = move || {
        view_of.with(|v| {
            v.as_ref()
                .map(|v| spark_points(&v.samples, v.task.total))
                .unwrap_or_default()
        })
    };
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
                <span class="kind">{task(|t| t.kind.clone())}</span>
                <span class="params">{task(|t| t.params.as_ref().map(fmt_params).unwrap_or_default())}</span>
                <span class=move || format!("state badge badge-{}", state.get().as_str())>
                    {move || state.get().as_str()}
                </span>
            </div>
            <div class="bar-row">
                <div class="bar" role="progressbar" aria-label=label aria-valuemin="0" aria-valuemax="100"
                    aria-valuenow=move || pct.get().map(|p| p.to_string())>
                    // A class per whole percent, not a style attribute: the page's CSP
                    // allows no inline style (style/main.css holds .p0 … .p100).
                    <div class=move || format!("fill p{}", pct.get().unwrap_or(0).min(100))></div>
                </div>
                <svg class="spark" viewBox="0 0 100 20" preserveAspectRatio="none" aria-hidden="true">
                    <polyline points=spark/>
                </svg>
            </div>
            <div class="meta">
                <span class="pct">{move || pct.get().map_or_else(|| "…".to_string(), |p| format!("{p}%"))}</span>
                <span class="count">{task(|t| match t.total {
                    Some(total) => format!("{} / {}", t.done, total),
                    None => format!("{} / ?", t.done),
                })}</span>
                <span class="elapsed" title="elapsed">{elapsed}</span>
                <span class="rate">{rate}</span>
                <span class="eta">{move || live().then(eta)}</span>
                {move || {
                    let cancel = cancel.clone();
                    live().then(|| view! { <button class="cancel" type="button" on:click=cancel>"Cancel"</button> })
                }}
            </div>
            <p class="message">{task(|t| t.message.clone().unwrap_or_default())}</p>
            <p class="error">{task(|t| t.error.clone().unwrap_or_default())}</p>
            <code class="task-id">{id.clone()}</code>
        </li>
    }
}

#[component]
fn Toasts(toasts: RwSignal<Vec<Toast>>) -> impl IntoView {
    view! {
        <div class="toasts" role="status" aria-live="polite">
            {move || {
                toasts
                    .get()
                    .into_iter()
                    .map(|t| view! { <div class=format!("toast toast-{}", t.state.as_str())>{t.text}</div> })
                    .collect_view()
            }}
        </div>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_without_floats() {
        assert_eq!(fmt_duration(1_234), "1.2 s");
        assert_eq!(fmt_duration(65_000), "1 m 05 s");
        assert_eq!(fmt_duration(3_660_000), "1 h 01 m");
        assert_eq!(fmt_rate(12.34), "12.3/s");
        assert_eq!(
            spark_points(&[(0, 0), (50, 5), (100, 10)], Some(10)),
            "0,20 50,10 100,0"
        );
    }
}
