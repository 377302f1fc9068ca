//! What the browser and the server share: the protocol types and the Leptos
//! UI. Browser-only code (the WebSocket client) sits behind `hydrate`,
//! server-only code (the HTML shell) behind `ssr`.

pub mod protocol;
pub mod store;
mod ui;

#[cfg(feature = "hydrate")]
mod client;

pub use ui::App;

#[cfg(feature = "ssr")]
pub fn shell(options: leptos::prelude::LeptosOptions) -> impl leptos::prelude::IntoView {
    use leptos::prelude::*;
    use leptos_meta::MetaTags;
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
                <MetaTags/>
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}
