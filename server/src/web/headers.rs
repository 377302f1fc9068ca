//! What every response says about itself: the page's Content-Security-Policy
//! (with the nonce of its one inline script), the security headers of every
//! response, and how long a browser may keep what it fetched.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

/// Assets whose name carries their content's hash: never fetched again.
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Files of the site without a hash in their name (`favicon.svg`): kept an
/// hour, then revalidated (`Last-Modified` makes that a 304).
pub const SHORT: &str = "public, max-age=3600";
/// The page itself: always revalidated (it carries the session's tasks).
pub const NO_CACHE: &str = "no-cache";

/// The page's policy, built once: only the nonce changes per response.
#[derive(Debug, Clone)]
pub struct Csp {
    /// Everything after `script-src 'nonce-…'`.
    rest: Arc<str>,
}

impl Csp {
    /// `frame_ancestors`: `'none'`, or the sources that may frame the page.
    /// `dev_reload_port`: under `cargo leptos watch`, the live-reload
    /// WebSocket's port.
    pub fn new(frame_ancestors: &str, dev_reload_port: Option<u32>) -> Csp {
        // The WebSocket and the wasm (fetched, then compiled: hence
        // 'wasm-unsafe-eval', which allows WebAssembly and not eval())
        // come from the page's own origin; `'self'` covers ws:/wss: there.
        let reload = dev_reload_port
            .map(|p| format!(" ws://*:{p}"))
            .unwrap_or_default();
        let rest = format!(
            "'self' 'wasm-unsafe-eval'; default-src 'none'; connect-src 'self'{reload}; \
             style-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
             frame-ancestors {frame_ancestors}"
        );
        Csp { rest: rest.into() }
    }

    /// The header for one response, allowing the inline script that carries
    /// `nonce` (the hydration bootstrap; the initial tasks are a JSON data
    /// block, which a CSP does not govern).
    pub fn header(&self, nonce: &str) -> Option<HeaderValue> {
        HeaderValue::from_str(&format!("script-src 'nonce-{nonce}' {}", self.rest)).ok()
    }
}

/// The site's files with a content hash in their name, from the
/// `hash.txt` cargo-leptos writes beside the binary (`hash-files`).
#[derive(Debug, Clone, Default)]
pub struct HashedAssets {
    /// `"js"`, `"wasm"`, `"css"` → the hash in their names.
    by_kind: Arc<Vec<(String, String)>>,
    /// `/pkg/taskwire.HASH.wasm`, … : the paths served immutable.
    paths: Arc<HashSet<String>>,
}

impl HashedAssets {
    /// Reads `hash_file` (a line `kind: hash` per asset); absent or
    /// unreadable: no asset is hashed.
    pub fn load(hash_file: &Path, pkg_dir: &str, output_name: &str) -> HashedAssets {
        let Ok(text) = std::fs::read_to_string(hash_file) else {
            return HashedAssets::default();
        };
        let by_kind: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, h)| (k.trim().to_string(), h.trim().to_string()))
            .filter(|(k, h)| !k.is_empty() && !h.is_empty())
            .collect();
        let paths = by_kind
            .iter()
            .filter(|(k, _)| matches!(k.as_str(), "js" | "wasm" | "css"))
            .map(|(k, h)| format!("/{pkg_dir}/{output_name}.{h}.{k}"))
            .collect();
        HashedAssets {
            by_kind: Arc::new(by_kind),
            paths: Arc::new(paths),
        }
    }

    pub fn hash_of(&self, kind: &str) -> Option<&str> {
        self.by_kind
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, h)| h.as_str())
    }

    pub fn is_hashed(&self, path: &str) -> bool {
        self.paths.contains(path)
    }
}

/// Sets `Cache-Control` (and `Vary` on files that have compressed twins)
/// where the handler did not: hashed assets immutable, HTML `no-cache`,
/// the site's other files an hour. API answers are left alone.
pub async fn cache_control(
    State(assets): State<HashedAssets>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    let mut resp = next.run(req).await;
    let headers = resp.headers_mut();
    if headers.contains_key(header::CACHE_CONTROL) {
        return resp;
    }
    let value = if is_html(headers) {
        NO_CACHE
    } else if !matches!(resp.status(), StatusCode::OK | StatusCode::NOT_MODIFIED)
        || !is_site_file(&path)
    {
        return resp;
    } else if assets.is_hashed(&path) {
        IMMUTABLE
    } else if path.starts_with("/pkg/") {
        // Built without hashed names: the same name may hold new content.
        NO_CACHE
    } else {
        SHORT
    };
    let headers = resp.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(value));
    // Served by content negotiation (a `.br`/`.gz` twin, or compressed on
    // the fly): caches must key on what the client accepts.
    if value != NO_CACHE || path.starts_with("/pkg/") {
        append_vary(headers, "accept-encoding");
    }
    resp
}

fn is_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"))
}

/// A path of the built site (not a route of the server).
fn is_site_file(path: &str) -> bool {
    path.starts_with("/pkg/") || path.rsplit('/').next().is_some_and(|f| f.contains('.'))
}

fn append_vary(headers: &mut HeaderMap, name: &'static str) {
    let present = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(name));
    if !present {
        headers.append(header::VARY, HeaderValue::from_static(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_the_nonce_the_wasm_and_its_own_origin_only() {
        let csp = Csp::new("'none'", None);
        let v = csp.header("abc123").unwrap();
        let v = v.to_str().unwrap();
        assert!(v.starts_with("script-src 'nonce-abc123' 'self' 'wasm-unsafe-eval';"));
        assert!(v.contains("default-src 'none'"));
        assert!(v.contains("connect-src 'self';"));
        assert!(v.contains("frame-ancestors 'none'"));
        assert!(!v.contains("unsafe-inline"));
        assert!(!v.contains("'unsafe-eval'"));
        let dev = Csp::new("'self' https://intranet.example", Some(3001));
        let v = dev.header("n").unwrap();
        assert!(v
            .to_str()
            .unwrap()
            .contains("connect-src 'self' ws://*:3001;"));
        assert!(v
            .to_str()
            .unwrap()
            .ends_with("frame-ancestors 'self' https://intranet.example"));
    }

    #[test]
    fn a_nonce_that_cannot_be_a_header_gives_none() {
        assert!(Csp::new("'none'", None).header("bad\nnonce").is_none());
    }

    #[test]
    fn hashed_assets_come_from_the_hash_file() {
        let dir = std::env::temp_dir().join(format!("tw-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hash.txt");
        std::fs::write(&file, "js: AAA\nwasm: BBB\ncss: CCC\n").unwrap();
        let assets = HashedAssets::load(&file, "pkg", "taskwire");
        assert_eq!(assets.hash_of("css"), Some("CCC"));
        assert!(assets.is_hashed("/pkg/taskwire.BBB.wasm"));
        assert!(assets.is_hashed("/pkg/taskwire.AAA.js"));
        assert!(!assets.is_hashed("/pkg/taskwire.wasm"));
        let none = HashedAssets::load(&dir.join("absent.txt"), "pkg", "taskwire");
        assert!(!none.is_hashed("/pkg/taskwire.BBB.wasm"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn site_files_are_told_from_routes() {
        assert!(is_site_file("/pkg/taskwire.js"));
        assert!(is_site_file("/favicon.svg"));
        assert!(!is_site_file("/ws"));
        assert!(!is_site_file("/healthz"));
        assert!(!is_site_file("/"));
    }
}
