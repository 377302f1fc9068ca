//! The browser's end of the WebSocket: connects on load, applies every
//! server message to the page state, sends what the page queues, and
//! reconnects by itself with exponential backoff and jitter.

use crate::protocol::{ServerMsg, Task};
use crate::store;
use crate::ui::{ConnState, PageState};
use futures::channel::mpsc::Receiver;
use futures::future::{select, Either};
use futures::{SinkExt, StreamExt};
use gloo_net::websocket::{futures::WebSocket, Message};
use leptos::prelude::*;
use std::time::Duration;

/// Messages the page may queue for sending.
pub const OUTGOING_QUEUE_LEN: usize = 64;
const BACKOFF_FIRST_MS: f64 = 500.0;
const BACKOFF_MAX_MS: f64 = 15_000.0;

pub fn start(page: PageState, mut outgoing: Receiver<String>) {
    leptos::task::spawn_local(async move {
        let mut attempt: i32 = 0;
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
            page.conn.set(ConnState::Reconnecting);
            // Full jitter: spread the reconnects of many pages after a restart.
            let cap = (BACKOFF_FIRST_MS * 2f64.powi(attempt)).min(BACKOFF_MAX_MS);
            let wait = cap / 2.0 + web_sys::js_sys::Math::random() * cap / 2.0;
            attempt = (attempt + 1).min(16);
            sleep(Duration::from_millis(wait as u64)).await;
        }
    });
}

/// Applies one server frame. Returns true for `welcome`.
fn on_message(page: PageState, text: &str) -> bool {
    let Ok(msg) = serde_json::from_str::<ServerMsg>(text) else {
        return false;
    };
    match msg {
        ServerMsg::Welcome { tasks, .. } => {
            page.tasks.update(|list| store::replace_all(list, tasks));
            page.conn.set(ConnState::Connected);
            return true;
        }
        ServerMsg::Task { task } | ServerMsg::Accepted { task, .. } => upsert(page, task),
        ServerMsg::Error { code, message, .. } => page
            .start_error
            .set(Some(format!("{}: {message}", code.as_str()))),
    }
    false
}

fn upsert(page: PageState, task: Task) {
    let changed = page
        .tasks
        .try_update_untracked(|list| store::upsert(list, task));
    if changed == Some(true) {
        page.tasks.notify();
    }
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
