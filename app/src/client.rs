//! The browser's end of the WebSocket: connects on load, applies every
//! server message to the page state, sends what the page queues, and
//! reconnects by itself with exponential backoff and full jitter. Also the
//! page's clock tick, the online/offline events and finish notifications.

use crate::page::{backoff_ms, ConnState, FormError, PageState};
use crate::protocol::{ErrorCode, ServerMsg, Task};
use crate::store;
use futures::channel::mpsc::Receiver;
use futures::future::{select, Either};
use futures::{SinkExt, StreamExt};
use gloo_net::websocket::{futures::WebSocket, Message};
use leptos::prelude::*;
use std::time::Duration;
use web_sys::js_sys;

/// Messages the page may queue for sending.
pub const OUTGOING_QUEUE_LEN: usize = 64;

pub fn start(page: PageState, mut outgoing: Receiver<String>) {
    page.now.set(js_sys::Date::now() as u64);
    // The clock the elapsed times and the reconnect countdown read.
    set_interval(
        move || page.now.set(js_sys::Date::now() as u64),
        Duration::from_secs(1),
    );
    // The socket is the truth; the browser's offline/online events only
    // colour the indicator (a short blip may not break the socket).
    let _ = window_event_listener(leptos::ev::offline, move |_| {
        page.conn.set(ConnState::Offline)
    });
    let _ = window_event_listener(leptos::ev::online, move |_| {
        if page.open.get_untracked() {
            page.conn.set(ConnState::Connected);
        }
    });

    leptos::task::spawn_local(async move {
        let mut attempt: u32 = 0;
        loop {
            if let Ok(ws) = WebSocket::open(&ws_url()) {
                let (mut sink, mut stream) = ws.split();
                loop {
                    match select(stream.next(), outgoing.next()).await {
                        Either::Left((Some(Ok(Message::Text(text))), _)) => {
                            if on_message(page, &text) {
                                attempt = 0;
                            }
                        }
                        Either::Left((Some(Ok(Message::Bytes(_))), _)) => {}
                        Either::Left((Some(Err(_)) | None, _)) => break,
                        Either::Right((Some(text), _)) => {
                            if sink.send(Message::Text(text)).await.is_err() {
                                break;
                            }
                        }
                        Either::Right((None, _)) => return,
                    }
                }
            }
            page.open.set(false);
            let wait = backoff_ms(attempt, js_sys::Math::random());
            attempt = attempt.saturating_add(1);
            let online = web_sys::window().is_some_and(|w| w.navigator().on_line());
            page.conn.set(if online {
                ConnState::Reconnecting
            } else {
                ConnState::Offline
            });
            page.reconnect_at.set(js_sys::Date::now() as u64 + wait);
            sleep(Duration::from_millis(wait)).await;
            page.conn.set(ConnState::Connecting);
        }
    });
}

/// Applies one server frame. Returns true for `welcome`.
fn on_message(page: PageState, text: &str) -> bool {
    let Some(msg) = ServerMsg::from_json(text) else {
        return false;
    };
    match msg {
        ServerMsg::Welcome { tasks, .. } => {
            page.tasks.update(|list| store::replace_all(list, tasks));
            page.conn.set(ConnState::Connected);
            page.open.set(true);
            return true;
        }
        ServerMsg::Accepted { task, .. } => {
            page.form_error.set(None);
            upsert(page, task);
        }
        ServerMsg::Task { task } => upsert(page, task),
        ServerMsg::Error {
            reference,
            code,
            message,
        } => {
            let from_form = reference
                .as_deref()
                .is_some_and(|r| r.starts_with("start-"));
            if from_form || code == ErrorCode::InvalidParams {
                page.form_error
                    .set(Some(FormError::from_server(code.as_str(), &message)));
            } else {
                let text = format!("{}: {message}", code.as_str());
                page.toast(text, crate::protocol::TaskState::Failed);
            }
        }
    }
    false
}

fn upsert(page: PageState, task: Task) {
    let short = task.id.chars().take(9).collect::<String>();
    let state = task.state;
    let kind = page.kind_title(&task.kind);
    let outcome = page
        .tasks
        .try_update_untracked(|list| store::upsert(list, task));
    let Some((changed, became_final)) = outcome else {
        return;
    };
    if changed {
        page.tasks.notify();
    }
    if became_final {
        let text = format!("{kind} {short} {}", state.as_str());
        page.toast(text.clone(), state);
        notify(&text);
    }
}

/// A browser notification, if the user allowed them.
fn notify(text: &str) {
    use web_sys::{Notification, NotificationPermission};
    if Notification::permission() == NotificationPermission::Granted {
        let _ = Notification::new(&format!("taskwire: {text}"));
    }
}

/// Asks for permission to show browser notifications.
pub fn ask_notifications() {
    let _ = web_sys::Notification::request_permission();
}

fn ws_url() -> String {
    let location = window().location();
    let scheme = if location.protocol().as_deref() == Ok("https:") {
        "wss"
    } else {
        "ws"
    };
    let host = location.host().unwrap_or_default();
    format!("{scheme}://{host}/ws")
}

async fn sleep(d: Duration) {
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    set_timeout(
        move || {
            let _ = tx.send(());
        },
        d,
    );
    let _ = rx.await;
}
