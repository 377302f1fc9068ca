//! What the browser and the server share: the protocol types and the Leptos
//! UI. Browser-only code (the WebSocket client) sits behind `hydrate`,
//! server-only code (the HTML shell) behind `ssr`.

pub mod kinds;
pub mod page;
pub mod protocol;
pub mod simulate;
pub mod store;
pub mod ui;

#[cfg(feature = "hydrate")]
mod client;

pub use page::{InitialTasks, StylesheetHref};
pub use ui::App;

/// The id of the `<script>` in the page's head holding the session's tasks
/// at render time, for hydration to start from.
pub const INITIAL_TASKS_ID: &str = "tw-initial";

#[cfg(feature = "ssr")]
pub fn shell(options: leptos::prelude::LeptosOptions) -> impl leptos::prelude::IntoView {
    use leptos::prelude::*;
    let tasks = use_context::<InitialTasks>().unwrap_or_default().0;
    let title = page::page_title(tasks.iter());
    // `</` could end the script early; `<\/` is the same JSON string.
    let initial = serde_json::to_string(&tasks)
        .unwrap_or_else(|_| "[]".into())
        .replace("</", "<\\/");
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
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}
