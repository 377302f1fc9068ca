//! What the web server says about what it serves: security and cache
//! headers, compressed files by content negotiation, the admin listener,
//! body limits. A real server on port 0, a site directory of the test's own.

mod common;

use common::TestApp;
use reqwest::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_SECURITY_POLICY, IF_MODIFIED_SINCE,
    LAST_MODIFIED, REFERRER_POLICY, VARY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use reqwest::StatusCode;
use server::config::Config;
use std::path::PathBuf;

/// A built site of the test's own: `pkg/taskwire.js` with a `.br` and a
/// `.gz` twin (their bytes are markers, not real compression: the test
/// checks which file went out), a CSS file without twins, a favicon.
struct Site(PathBuf);

const JS: &str = "console.log('taskwire');\n";

impl Site {
    fn new(name: &str) -> Site {
        let root = std::env::temp_dir().join(format!("tw-site-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("pkg")).unwrap();
        std::fs::write(root.join("pkg/taskwire.js"), JS).unwrap();
        std::fs::write(root.join("pkg/taskwire.js.br"), b"BROTLI-TWIN").unwrap();
        std::fs::write(root.join("pkg/taskwire.js.gz"), b"GZIP-TWIN").unwrap();
        std::fs::write(
            root.join("pkg/taskwire.css"),
            ".task { color: red; }\n".repeat(200),
        )
        .unwrap();
        std::fs::write(root.join("favicon.svg"), "<svg/>").unwrap();
        Site(root)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn spawn(site: &Site, f: impl FnOnce(&mut Config)) -> TestApp {
    let mut config = Config::for_tests();
    config.site_root = Some(site.0.clone());
    f(&mut config);
    TestApp::spawn(config).await
}

fn header(resp: &reqwest::Response, name: impl reqwest::header::AsHeaderName) -> &str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The nonce of the page's module script (the hydration bootstrap).
fn script_nonce(html: &str) -> Option<&str> {
    let at = html.find("<script type=\"module\" nonce=\"")?;
    let rest = &html[at + "<script type=\"module\" nonce=\"".len()..];
    rest.split('"').next()
}

#[tokio::test]
async fn the_page_carries_a_csp_with_its_scripts_nonce_and_the_security_headers() {
    let site = Site::new("page");
    let app = spawn(&site, |_| {}).await;
    let http = reqwest::Client::new();
    let mut nonces = vec![];
    for _ in 0..2 {
        let resp = http
            .get(format!("http://{}/", app.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let csp = header(&resp, CONTENT_SECURITY_POLICY).to_string();
        assert_eq!(header(&resp, X_CONTENT_TYPE_OPTIONS), "nosniff");
        assert_eq!(header(&resp, REFERRER_POLICY), "no-referrer");
        assert_eq!(header(&resp, X_FRAME_OPTIONS), "DENY");
        assert_eq!(header(&resp, CACHE_CONTROL), "no-cache");
        let html = resp.text().await.unwrap();
        let nonce = script_nonce(&html)
            .unwrap_or_else(|| panic!("a module script with a nonce in:\n{html}"))
            .to_string();
        assert!(nonce.len() >= 16, "a nonce of 128 bits: {nonce}");
        assert!(
            csp.starts_with(&format!(
                "script-src 'nonce-{nonce}' 'self' 'wasm-unsafe-eval';"
            )),
            "{csp}"
        );
        for part in [
            "default-src 'none'",
            "connect-src 'self'",
            "style-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ] {
            assert!(csp.contains(part), "{part} missing from {csp}");
        }
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        // No inline style anywhere in the page: the CSP would refuse it.
        assert!(!html.contains(" style=\""), "inline style in:\n{html}");
        nonces.push(nonce);
    }
    assert_ne!(nonces[0], nonces[1], "a nonce is used once");
    app.stop().await;
}

#[tokio::test]
async fn frame_ancestors_is_configurable() {
    let site = Site::new("frame");
    let app = spawn(&site, |c| {
        c.frame_ancestors = "'self' https://intranet.example".into();
    })
    .await;
    let resp = reqwest::get(format!("http://{}/", app.addr)).await.unwrap();
    assert!(header(&resp, CONTENT_SECURITY_POLICY)
        .ends_with("frame-ancestors 'self' https://intranet.example"));
    assert_eq!(
        header(&resp, X_FRAME_OPTIONS),
        "",
        "DENY would forbid the host"
    );
    app.stop().await;
}

#[tokio::test]
async fn files_go_out_as_their_compressed_twin_the_client_accepts() {
    let site = Site::new("twins");
    let app = spawn(&site, |_| {}).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/pkg/taskwire.js", app.addr);
    for (accept, encoding, body) in [
        ("gzip, deflate, br", "br", &b"BROTLI-TWIN"[..]),
        ("gzip", "gzip", &b"GZIP-TWIN"[..]),
        ("identity", "", JS.as_bytes()),
    ] {
        let resp = http
            .get(&url)
            .header(ACCEPT_ENCODING, accept)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{accept}");
        assert_eq!(header(&resp, CONTENT_ENCODING), encoding, "{accept}");
        assert!(
            header(&resp, VARY)
                .to_ascii_lowercase()
                .contains("accept-encoding"),
            "{accept}: Vary {:?}",
            resp.headers().get(VARY)
        );
        assert_eq!(header(&resp, X_CONTENT_TYPE_OPTIONS), "nosniff");
        // Not hashed here (no hash.txt beside the test binary): the same
        // name may hold new content, so it is revalidated.
        assert_eq!(header(&resp, CACHE_CONTROL), "no-cache");
        assert_eq!(&resp.bytes().await.unwrap()[..], body, "{accept}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_file_without_a_twin_is_compressed_on_the_fly_and_revalidates_to_304() {
    let site = Site::new("fly");
    let app = spawn(&site, |_| {}).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/pkg/taskwire.css", app.addr);
    let resp = http
        .get(&url)
        .header(ACCEPT_ENCODING, "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, CONTENT_ENCODING), "gzip");
    let modified = header(&resp, LAST_MODIFIED).to_string();
    let bytes = resp.bytes().await.unwrap();
    assert!(
        bytes.len() < 4400 / 4,
        "4,400 repetitive bytes gzip to {}",
        bytes.len()
    );
    let again = http
        .get(&url)
        .header(IF_MODIFIED_SINCE, modified)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);

    let icon = http
        .get(format!("http://{}/favicon.svg", app.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(icon.status(), StatusCode::OK);
    assert_eq!(header(&icon, CACHE_CONTROL), "public, max-age=3600");
    app.stop().await;
}

#[tokio::test]
async fn metrics_are_on_the_admin_listener_only() {
    let site = Site::new("admin");
    let app = spawn(&site, |_| {}).await;
    assert_ne!(app.admin.port(), app.addr.port());
    let public = reqwest::get(format!("http://{}/metrics", app.addr))
        .await
        .unwrap();
    assert_eq!(public.status(), StatusCode::NOT_FOUND);
    assert!(!public.text().await.unwrap().contains("# TYPE"));
    let health = reqwest::get(format!("http://{}/healthz", app.addr))
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let admin = reqwest::get(format!("http://{}/metrics", app.admin))
        .await
        .unwrap();
    assert_eq!(admin.status(), StatusCode::OK);
    assert!(admin.text().await.unwrap().contains("# TYPE taskwire_"));
    app.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let site = Site::new("limit");
    let app = spawn(&site, |c| c.max_body_bytes = 1024).await;
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("http://{}/", app.addr))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    app.stop().await;
}

#[tokio::test]
async fn the_kinds_are_listed_and_written_into_the_page() {
    let site = Site::new("kinds");
    let app = spawn(&site, |_| {}).await;
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("http://{}/api/kinds", app.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        header(&resp, reqwest::header::CONTENT_TYPE).starts_with("application/json"),
        "{:?}",
        resp.headers()
    );
    let listed: Vec<app::kinds::KindInfo> = resp.json().await.unwrap();
    // No [[kind]] configured: the page offers the simulator's kind.
    assert_eq!(listed, vec![app::kinds::simulate_kind()]);

    let html = http
        .get(format!("http://{}/", app.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let open = "<script id=\"tw-kinds\" type=\"application/json\">";
    let at = html
        .find(open)
        .unwrap_or_else(|| panic!("{open} in:\n{html}"))
        + open.len();
    let json = &html[at..at + html[at..].find("</script>").unwrap()];
    let written: Vec<app::kinds::KindInfo> = serde_json::from_str(json).unwrap();
    assert_eq!(written, listed);
    // The form from the schema: simulate's fields, no selector for one kind.
    for name in ["duration_ms", "steps", "fail_at"] {
        assert!(
            html.contains(&format!("name=\"{name}\"")),
            "{name} in:\n{html}"
        );
    }
    assert!(!html.contains("id=\"kind\""), "{html}");
    app.stop().await;
}
