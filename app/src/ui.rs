//! The page: the start form, the connection indicator, the session's tasks as
//! live cards (progress bar, rate, ETA, sparkline), filters and toasts. The
//! server renders it with the session's tasks already in it; the browser
//! hydrates it and keeps it live from the WebSocket.

use crate::form::{self, Control};
use crate::kinds::{KindInfo, Property};
use crate::page::{ConnState, FormError, Kinds, PageState, Toast};
use crate::protocol::{ClientMsg, Task, TaskState};
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

/// The kinds the page offers: on the server from context, in the browser
/// from the JSON the server wrote into the page's head (the same list, so
/// hydration renders the same form).
fn offered_kinds() -> Vec<KindInfo> {
    #[cfg(feature = "ssr")]
    {
        use_context::<Kinds>().unwrap_or_default().0
    }
    #[cfg(all(feature = "hydrate", not(feature = "ssr")))]
    {
        let configured: Vec<KindInfo> = document()
            .get_element_by_id(crate::KINDS_ID)
            .and_then(|e| e.text_content())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Kinds::offered(configured).0
    }
    #[cfg(not(any(feature = "ssr", feature = "hydrate")))]
    {
        Kinds::default().0
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
        kinds: StoredValue::new(offered_kinds()),
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
                    page.form_error.set(Some(FormError::general(p.into())));
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

/// One property's control, its label (the title, else the name), its help
/// (the description) and its error (`#err-<name>`).
#[component]
fn Field(
    name: String,
    prop: Property,
    required: bool,
    value: RwSignal<String>,
    error: RwSignal<Option<FormError>>,
) -> impl IntoView {
    let input_id = format!("field-{name}");
    let err_id = format!("err-{name}");
    let help_id = format!("help-{name}");
    let described = match prop.description {
        Some(_) => format!("{help_id} {err_id}"),
        None => err_id.clone(),
    };
    let mine = {
        let name = name.clone();
        move || {
            error.with(|e| {
                e.as_ref()
                    .filter(|e| e.field.as_deref() == Some(name.as_str()))
                    .map(|e| e.text.clone())
            })
        }
    };
    let invalid = {
        let mine = mine.clone();
        move || mine().map(|_| "true")
    };
    let label = prop.label(&name).to_string();
    let num = |n: Option<f64>| n.map(|n| n.to_string());
    let control = form::control(&prop);
    let input = match control {
        Control::Number { integer } => view! {
            <input id=input_id.clone() name=name.clone() type="number"
                min=num(prop.minimum) max=num(prop.maximum)
                step=if integer { "1" } else { "any" }
                inputmode=if integer { "numeric" } else { "decimal" }
                required=required
                aria-invalid=invalid aria-describedby=described
                value=value.get_untracked()
                prop:value=move || value.get()
                on:input=move |ev| value.set(event_target_value(&ev))/>
        }
        .into_any(),
        Control::Text => view! {
            <input id=input_id.clone() name=name.clone() type="text"
                maxlength=prop.max_length.map(|n| n.to_string())
                required=required
                aria-invalid=invalid aria-describedby=described
                value=value.get_untracked()
                prop:value=move || value.get()
                on:input=move |ev| value.set(event_target_value(&ev))/>
        }
        .into_any(),
        Control::Checkbox => view! {
            <input id=input_id.clone() name=name.clone() type="checkbox"
                aria-invalid=invalid aria-describedby=described
                checked=value.get_untracked() == "true"
                prop:checked=move || value.get() == "true"
                on:change=move |ev| value.set(if event_target_checked(&ev) { "true".into() } else { String::new() })/>
        }
        .into_any(),
        Control::Select => {
            let start = value.get_untracked();
            let options = prop.one_of.clone().unwrap_or_default();
            // No value yet (no default): an empty choice first.
            let blank = (!required || prop.default.is_none())
                .then(|| view! { <option value="" selected=start.is_empty()>"—"</option> });
            let options = options
                .iter()
                .map(|v| {
                    let val = form::option_value(v);
                    let selected = val == start;
                    view! { <option value=val selected=selected>{form::option_label(v)}</option> }
                })
                .collect_view();
            view! {
                <select id=input_id.clone() name=name.clone()
                    required=required
                    aria-invalid=invalid aria-describedby=described
                    prop:value=move || value.get()
                    on:change=move |ev| value.set(event_target_value(&ev))>
                    {blank}
                    {options}
                </select>
            }
            .into_any()
        }
    };
    let help = prop
        .description
        .clone()
        .map(|d| view! { <span class="field-help" id=help_id>{d}</span> });
    let class = if control == Control::Checkbox {
        "field check"
    } else {
        "field"
    };
    view! {
        <div class=class>
            <label for=input_id>{label}</label>
            {input}
            {help}
            <span class="field-error" id=err_id>{mine}</span>
        </div>
    }
}

/// The form of every kind the page offers: a selector when there are
/// several, and the chosen kind's fields, from its schema.
#[component]
fn StartForm(send: Callback<ClientMsg>, page: PageState) -> impl IntoView {
    let kinds = page.kinds.get_value();
    // Each kind's fields keep their text while another kind is chosen.
    let values: Vec<Vec<RwSignal<String>>> = kinds
        .iter()
        .map(|k| {
            k.params.as_ref().map_or_else(Vec::new, |s| {
                s.properties
                    .iter()
                    .map(|(_, p)| RwSignal::new(form::initial_value(p)))
                    .collect()
            })
        })
        .collect();
    let values = StoredValue::new(values);
    let kinds = StoredValue::new(kinds);
    let chosen = RwSignal::new(0usize);
    let started = StoredValue::new(0u64);
    let error = page.form_error;

    let start = move |count: u32| {
        let i = chosen.get_untracked();
        let Some(kind) = kinds.with_value(|ks| ks.get(i).cloned()) else {
            return;
        };
        let text: Vec<String> = values.with_value(|v| {
            v.get(i)
                .map(|fields| fields.iter().map(|s| s.get_untracked()).collect())
                .unwrap_or_default()
        });
        match form::form_params(&kind, &text) {
            Err(e) => error.set(Some(FormError::local(e))),
            Ok(params) => {
                error.set(None);
                for _ in 0..count {
                    started.update_value(|n| *n += 1);
                    send.run(ClientMsg::Start {
                        reference: format!("start-{}", started.get_value()),
                        kind: kind.name.clone(),
                        params: params.clone(),
                    });
                }
            }
        }
    };
    let on_submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        start(1);
    };

    let selector = (kinds.with_value(Vec::len) > 1).then(|| {
        let options = kinds.with_value(|ks| {
            ks.iter()
                .enumerate()
                .map(|(i, k)| {
                    view! { <option value=i.to_string() selected=i == 0>{k.title().to_string()}</option> }
                })
                .collect_view()
        });
        view! {
            <div class="field kind-pick">
                <label for="kind">"Kind"</label>
                <select id="kind" prop:value=move || chosen.get().to_string()
                    on:change=move |ev| {
                        if let Ok(i) = event_target_value(&ev).parse::<usize>() {
                            error.set(None);
                            chosen.set(i);
                        }
                    }>
                    {options}
                </select>
            </div>
        }
    });
    let fields = move || {
        let i = chosen.get();
        let kind = kinds.with_value(|ks| ks.get(i).cloned());
        let signals = values.with_value(|v| v.get(i).cloned().unwrap_or_default());
        kind.and_then(|k| k.params).map(|schema| {
            let about = schema
                .description
                .clone()
                .map(|d| view! { <p class="kind-help">{d}</p> });
            let fields = schema
                .properties
                .into_iter()
                .zip(signals)
                .map(|((name, prop), value)| {
                    let required = schema.required.contains(&name);
                    view! { <Field name prop required value error/> }
                })
                .collect_view();
            view! { {about} {fields} }
        })
    };

    // The field to fix gets the focus, whether the page or the server found
    // the fault (a screen reader reads its label, then its error through
    // aria-describedby).
    #[cfg(feature = "hydrate")]
    Effect::new(move |_| {
        use wasm_bindgen::JsCast;
        let field = error.with(|e| e.as_ref().and_then(|e| e.field.clone()));
        if let Some(input) = field
            .and_then(|f| document().get_element_by_id(&format!("field-{f}")))
            .and_then(|el| el.dyn_into::<web_sys::HtmlElement>().ok())
        {
            let _ = input.focus();
        }
    });
    // An error at a field of the chosen kind shows there; any other here.
    let general_error = move || {
        let shown = |field: &str| {
            kinds.with_value(|ks| {
                ks.get(chosen.get())
                    .and_then(|k| k.params.as_ref())
                    .is_some_and(|s| s.properties.iter().any(|(name, _)| name == field))
            })
        };
        error
            .get()
            .filter(|e| !e.field.as_deref().is_some_and(shown))
            .map(|e| e.text)
    };

    view! {
        <form id="start-form" class="start" on:submit=on_submit novalidate>
            {selector}
            <div class="fields">{fields}</div>
            <div class="actions">
                <button type="submit">"Start"</button>
                <button type="button" class="secondary" id="start-10" on:click=move |_| start(10)>"Start 10"</button>
            </div>
            <p id="start-error" class="form-error" role="alert">{general_error}</p>
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

/// `simulate`'s params as "100 over 10.0 s · fails at 5"; any other
/// kind's as "n: 5 · mode: fast".
fn fmt_params(params: &serde_json::Value) -> String {
    let get = |k: &str| params.get(k).and_then(|v| v.as_u64());
    let mut parts = vec![];
    if let Some(d) = get("duration_ms") {
        parts.push(format!(
            "{} over {}",
            get("steps").unwrap_or(0),
            fmt_duration(d)
        ));
        if let Some(f) = get("fail_at") {
            parts.push(format!("fails at {f}"));
        }
    } else if let Some(map) = params.as_object() {
        for (k, v) in map {
            match v {
                serde_json::Value::Null => {}
                serde_json::Value::String(s) => parts.push(format!("{k}: {s}")),
                v => parts.push(format!("{k}: {v}")),
            }
        }
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
                <span class="kind" data-kind=task(|t| t.kind.clone())>
                    {move || page.kind_title(&view_of.with(|v| v.as_ref().map(|v| v.task.kind.clone()).unwrap_or_default()))}
                </span>
                <span class="params">{task(|t| t.params.as_ref().map(|p| fmt_params(&p.value())).unwrap_or_default())}</span>
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
            fmt_params(&serde_json::json!({"duration_ms": 1500, "steps": 6, "fail_at": 2})),
            "6 over 1.5 s · fails at 2"
        );
        assert_eq!(
            fmt_params(&serde_json::json!({"n": 5, "mode": "fast", "x": null})),
            "mode: fast · n: 5"
        );
        assert_eq!(
            spark_points(&[(0, 0), (50, 5), (100, 10)], Some(10)),
            "0,20 50,10 100,0"
        );
    }
}
