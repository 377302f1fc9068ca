//! The web side: the page (Leptos SSR, with the session's tasks rendered
//! in), the WebSocket ([`ws`]), sessions by cookie ([`session`]), the
//! site's files and every response's headers ([`headers`]), health, and the
//! operators' listener ([`admin_router`]). Everything here asks
//! [`crate::engine::Engine`].

pub mod api;
pub mod headers;
pub mod session;
pub mod sse;
pub mod ws;

use crate::{metrics, AppState};
use app::{shell, App, InitialTasks, Kinds, StylesheetHref};
use axum::extract::Request;
use axum::handler::HandlerWithoutStateExt;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::routing::get;
use axum::Router;
use headers::{Csp, HashedAssets};
use leptos::prelude::{provide_context, use_context};
use leptos_axum::{generate_route_list, LeptosRoutes, ResponseOptions};
use std::time::Duration;
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

/// Page, WebSocket, the site's files and health. `/metrics` is not here:
/// it is on the admin listener.
pub fn router(state: AppState, assets: HashedAssets) -> Router {
    let routes = generate_route_list(App);
    let options = state.leptos_options.clone();
    let csp = Csp::new(&state.config.frame_ancestors, dev_reload_port(&options));
    let stylesheet = StylesheetHref(match assets.hash_of("css") {
        Some(h) => format!("/{}/{}.{h}.css", options.site_pkg_dir, options.output_name),
        None => format!("/{}/{}.css", options.site_pkg_dir, options.output_name),
    });
    // The kinds the page offers (and `/api/kinds` lists): the configured
    // ones, or `simulate` when none are (any kind goes to the one backend).
    let kinds = Kinds::offered(state.engine.kinds());
    // Every rendered page (and the 404 page): the session's tasks (read by
    // the session middleware, which may wait on Redis), the kinds, the
    // stylesheet's name, and the CSP carrying this response's nonce.
    let page_context = {
        let kinds = kinds.clone();
        move || {
            let tasks = use_context::<axum::http::request::Parts>()
                .and_then(|parts| parts.extensions.get::<InitialTasks>().cloned())
                .unwrap_or_default();
            provide_context(tasks);
            provide_context(kinds.clone());
            provide_context(stylesheet.clone());
            if let (Some(nonce), Some(response)) =
                (leptos::nonce::use_nonce(), use_context::<ResponseOptions>())
            {
                if let Some(policy) = csp.header(&nonce) {
                    response.insert_header(header::CONTENT_SECURITY_POLICY, policy);
                }
            }
        }
    };
    // The built site's files, each as the `.br`/`.gz` twin the client
    // accepts when there is one; conditional requests get 304. Any other
    // path: the page, with status 404.
    let render = leptos_axum::render_app_to_stream_with_context(page_context.clone(), {
        let options = options.clone();
        move || shell(options.clone())
    });
    let site_files = ServeDir::new(&*options.site_root)
        .precompressed_br()
        .precompressed_gzip()
        .not_found_service((move |req: Request| render(req)).into_service());
    let page = Router::new()
        .route("/ws", get(ws::handler))
        .route("/sse", get(sse::handler))
        .leptos_routes_with_context(&state, routes, page_context.clone(), move || {
            shell(options.clone())
        })
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            session::middleware,
        ))
        .route("/healthz", get(|| async { "ok" }))
        // The server API authenticates by key: no cookie session.
        .merge(api::router())
        .route(
            "/api/kinds",
            get(move || {
                let kinds = kinds.0.clone();
                async move { axum::Json(kinds) }
            }),
        )
        .fallback_service(site_files)
        .layer(axum::middleware::from_fn_with_state(
            assets,
            headers::cache_control,
        ));
    let page = if state.config.frame_ancestors.trim() == "'none'" {
        // For browsers older than CSP's frame-ancestors.
        page.layer(SetResponseHeaderLayer::if_not_present(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
    } else {
        page
    };
    hygiene(page, &state).with_state(state)
}

/// A worker serves no page and no WebSocket: only its health (its
/// `/metrics` is on the admin listener, as everywhere).
pub fn worker_router(state: AppState) -> Router {
    let r = Router::new().route("/healthz", get(|| async { "ok" }));
    hygiene(r, &state).with_state(state)
}

/// The operators' listener (`--admin-listen`): metrics and health.
pub fn admin_router(state: AppState) -> Router {
    let r = Router::new()
        .route("/metrics", get(metrics::render))
        .route("/healthz", get(|| async { "ok" }));
    hygiene(r, &state).with_state(state)
}

/// What every listener gets: compression where the file has no compressed
/// twin, the headers every response carries, a body limit, a timeout, and
/// request tracing at debug level (method, path, status, latency).
fn hygiene(r: Router<AppState>, state: &AppState) -> Router<AppState> {
    let config = &state.config;
    r.layer(CompressionLayer::new())
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ))
        .layer(RequestBodyLimitLayer::new(
            usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
        ))
        // A WebSocket's response is its 101: the timeout ends there.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(config.request_timeout_s),
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::DEBUG))
                .on_response(DefaultOnResponse::new().level(Level::DEBUG)),
        )
}

/// Under `cargo leptos watch` the page opens the live-reload WebSocket.
fn dev_reload_port(options: &leptos::prelude::LeptosOptions) -> Option<u32> {
    std::env::var_os("LEPTOS_WATCH").map(|_| options.reload_port)
}
