//! What the browser and the server share: the protocol types and the Leptos
//! UI. Browser-only code (the WebSocket client) sits behind `hydrate`,
//! server-only code (the HTML shell) behind `ssr`.

pub mod form;
pub mod kinds;
pub mod page;
pub mod protocol;
pub mod simulate;
pub mod store;
pub mod ui;

#[cfg(feature = "hydrate")]
mod client;

pub use page::{InitialTasks, Kinds, StylesheetHref};
pub use ui::App;

/// The id of the `<script>` in the page's head holding the session's tasks
/// at render time, for hydration to start from.
pub const INITIAL_TASKS_ID: &str = "tw-initial";

/// The id of the `<script>` in the page's head holding the kinds the page
/// offers (a JSON array of [`kinds::KindInfo`]), for hydration to render
/// the same form.
pub const KINDS_ID: &str = "tw-kinds";

/// JSON for a `<script type="application/json">`: `</` could end the
/// script early; `<\/` is the same JSON string.
#[cfg(feature = "ssr")]
fn script_json<T: serde::Serialize>(value: &T, empty: &str) -> String {
    serde_json::to_string(value)
        .unwrap_or_else(|_| empty.into())
        .replace("</", "<\\/")
}

#[cfg(feature = "ssr")]
pub fn shell(options: leptos::prelude::LeptosOptions) -> impl leptos::prelude::IntoView {
    use leptos::prelude::*;
    let tasks = use_context::<InitialTasks>().unwrap_or_default().0;
    let title = page::page_title(tasks.iter());
    let initial = script_json(&tasks, "[]");
    let kinds = script_json(&use_context::<Kinds>().unwrap_or_default().0, "[]");
    let stylesheet = use_context::<page::StylesheetHref>()
        .map(|h| h.0)
        .unwrap_or_else(|| format!("/{}/{}.css", options.site_pkg_dir, options.output_name));
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
                <meta name="color-scheme" content="light dark"/>
                <link rel="icon" type="image/svg+xml" href="/favicon.svg"/>
                <AutoReload options=options.clone()/>
                <HydrationScripts options/>
                <title>{title}</title>
                <link rel="stylesheet" id="leptos" href=stylesheet/>
                <script id=INITIAL_TASKS_ID type="application/json" inner_html=initial></script>
                <script id=KINDS_ID type="application/json" inner_html=kinds></script>
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}
