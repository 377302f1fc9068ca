//! The web side: the page (Leptos SSR, with the session's tasks rendered
//! in), the WebSocket ([`ws`]), sessions by cookie ([`session`]), health and
//! metrics. Everything here asks [`crate::engine::Engine`].

pub mod session;
pub mod ws;

use crate::{metrics, AppState};
use app::{shell, App, InitialTasks};
use axum::routing::get;
use axum::Router;
use leptos_axum::{generate_route_list, LeptosRoutes};

/// Page, WebSocket, health and metrics.
pub fn router(state: AppState) -> Router {
    let routes = generate_route_list(App);
    let options = state.leptos_options.clone();
    // The page is rendered with the session's tasks already in it (read
    // by the session middleware, which may wait on Redis).
    let initial_tasks = move || {
        let tasks = leptos::prelude::use_context::<axum::http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<InitialTasks>().cloned())
            .unwrap_or_default();
        leptos::prelude::provide_context(tasks);
    };
    Router::new()
        .route("/ws", get(ws::handler))
        .leptos_routes_with_context(&state, routes, initial_tasks, move || {
            shell(options.clone())
        })
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            session::middleware,
        ))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics::render))
        .fallback(leptos_axum::file_and_error_handler::<AppState, _>(shell))
        .with_state(state)
}

/// A worker serves no page and no WebSocket: only its health and metrics.
pub fn worker_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics::render))
        .with_state(state)
}
