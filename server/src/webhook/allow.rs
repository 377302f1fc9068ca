//! The SSRF guard: a webhook URL is accepted only if it falls under one of
//! the configured prefixes, compared on parsed parts (scheme, host, port,
//! path segments), never on the raw string. Pure: no DNS, no sockets.
//!
//! Strict on purpose: anything a server or a proxy could read differently
//! from us (userinfo, `.`/`..` segments, encoded `/`, `.` or `\`, a
//! backslash, non-ASCII, a fragment) is refused rather than normalised.

use std::fmt;

/// A parsed `http://` or `https://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub scheme: Scheme,
    /// Lower case; an IPv6 literal keeps its brackets.
    pub host: String,
    /// The effective port (80/443 when the URL names none).
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
    /// Without the `?`.
    pub query: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        })
    }
}

impl Url {
    /// `host:port`, as a socket address and a `Host` header.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// What goes on the request line.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }

    /// Parses an absolute `http(s)://` URL, refusing what the module
    /// comment lists. The error says why, for `invalid_params`.
    pub fn parse(raw: &str) -> Result<Url, String> {
        if raw.len() > MAX_URL_BYTES {
            return Err(format!("the URL is longer than {MAX_URL_BYTES} bytes"));
        }
        if !raw.is_ascii() {
            return Err("the URL has non-ASCII characters (percent-encode them)".into());
        }
        if let Some(c) = raw.chars().find(|c| c.is_ascii_control() || *c == ' ') {
            return Err(format!("the URL has a space or control character ({c:?})"));
        }
        if raw.contains('\\') {
            return Err("the URL has a backslash".into());
        }
        let (scheme, rest) = raw
            .split_once("://")
            .ok_or_else(|| "not an absolute URL (expected http://host/...)".to_string())?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => return Err(format!("the scheme `{other}` is not http or https")),
        };
        if rest.contains('#') {
            return Err("the URL has a fragment (`#...`)".into());
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, rest) = rest.split_at(end);
        if authority.contains('@') {
            return Err("the URL has user information (`user@host`)".into());
        }
        let (host, port) = split_host_port(authority)?;
        let port = match port {
            None => scheme.default_port(),
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(format!("`{p}` is not a port")),
            },
        };
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q.to_string())),
            None => (rest, None),
        };
        let path = if path.is_empty() { "/" } else { path };
        check_path(path)?;
        if let Some(q) = &query {
            check_chars(q, "query")?;
        }
        Ok(Url {
            scheme,
            host,
            port,
            path: path.to_string(),
            query,
        })
    }
}

/// Longer URLs are refused (a webhook URL is stored with every task).
pub const MAX_URL_BYTES: usize = 2048;

fn split_host_port(authority: &str) -> Result<(String, Option<&str>), String> {
    if authority.is_empty() {
        return Err("the URL has no host".into());
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let close = after
            .find(']')
            .ok_or_else(|| "an IPv6 host without `]`".to_string())?;
        let (inner, tail) = (&after[..close], &after[close + 1..]);
        if inner.is_empty()
            || !inner
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err(format!("`[{inner}]` is not an IPv6 address"));
        }
        let port = match tail {
            "" => None,
            t => Some(
                t.strip_prefix(':')
                    .ok_or_else(|| format!("unexpected `{t}` after the host"))?,
            ),
        };
        (format!("[{}]", inner.to_ascii_lowercase()), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(format!("`{host}` is not a host name"));
        }
        (host.to_ascii_lowercase(), port)
    };
    Ok((host, port))
}

/// No `.`/`..` segment, no encoded `/`, `.`, `\`, only URI characters.
fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("the path does not start with `/`".into());
    }
    check_chars(path, "path")?;
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("the path has a `.` or `..` segment".into());
    }
    let lower = path.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e)) {
        return Err("the path has an encoded `.`, `/` or `\\`".into());
    }
    Ok(())
}

/// RFC 3986 characters of a path or query, and `%` only before two hex digits.
fn check_chars(s: &str, what: &str) -> Result<(), String> {
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        let ok = c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&c);
        if ok {
            continue;
        }
        if c == b'%'
            && b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
        {
            continue;
        }
        return Err(format!(
            "the {what} has a character URLs do not allow (`{}`)",
            c as char
        ));
    }
    Ok(())
}

/// One allowed prefix: same scheme, host and port, and a path under its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefix(Url);

impl Prefix {
    pub fn parse(raw: &str) -> Result<Prefix, String> {
        let url = Url::parse(raw)?;
        if url.query.is_some() {
            return Err("an allowed prefix cannot have a query".into());
        }
        Ok(Prefix(url))
    }

    pub fn url(&self) -> &Url {
        &self.0
    }

    /// Whether `url` is under this prefix. A prefix path that ends in `/`
    /// takes every path below it; one that does not takes itself and the
    /// paths below `<path>/` (so `/hooks` never takes `/hooksevil`).
    pub fn allows(&self, url: &Url) -> bool {
        let p = &self.0;
        if url.scheme != p.scheme || url.host != p.host || url.port != p.port {
            return false;
        }
        if p.path.ends_with('/') {
            url.path.starts_with(&p.path)
        } else {
            url.path == p.path
                || url
                    .path
                    .strip_prefix(&p.path)
                    .is_some_and(|rest| rest.starts_with('/'))
        }
    }
}

/// The configured list.
#[derive(Clone, Debug, Default)]
pub struct AllowList(Vec<Prefix>);

impl AllowList {
    pub fn parse(prefixes: &[String]) -> Result<AllowList, String> {
        prefixes
            .iter()
            .map(|raw| Prefix::parse(raw).map_err(|e| format!("webhooks.allow `{raw}`: {e}")))
            .collect::<Result<_, _>>()
            .map(AllowList)
    }

    pub fn prefixes(&self) -> &[Prefix] {
        &self.0
    }

    /// The parsed URL if some prefix allows it; else why not.
    pub fn check(&self, raw: &str) -> Result<Url, String> {
        let url = Url::parse(raw).map_err(|e| format!("webhook `{raw}`: {e}"))?;
        if self.0.iter().any(|p| p.allows(&url)) {
            Ok(url)
        } else if self.0.is_empty() {
            Err("webhooks are not enabled on this server (webhooks.allow is empty)".into())
        } else {
            Err(format!(
                "webhook `{raw}` is not under an allowed prefix (webhooks.allow)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(p: &[&str]) -> AllowList {
        AllowList::parse(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn parses_the_parts() {
        let u = Url::parse("HTTP://Shop.Example:8080/hooks/a?x=1&y=%20").unwrap();
        assert_eq!(u.scheme, Scheme::Http);
        assert_eq!(u.host, "shop.example");
        assert_eq!(u.port, 8080);
        assert_eq!(u.path_and_query(), "/hooks/a?x=1&y=%20");
        let u = Url::parse("https://shop.example").unwrap();
        assert_eq!((u.port, u.path.as_str()), (443, "/"));
        let u = Url::parse("http://[::1]:9/x").unwrap();
        assert_eq!(u.authority(), "[::1]:9");
    }

    #[test]
    fn allows_only_under_the_prefix() {
        let l = list(&["https://shop.example/hooks/", "http://127.0.0.1:9000/cb"]);
        for ok in [
            "https://shop.example/hooks/",
            "https://shop.example/hooks/order/1?sig=a",
            "HTTPS://SHOP.EXAMPLE:443/hooks/x",
            "http://127.0.0.1:9000/cb",
            "http://127.0.0.1:9000/cb/1",
            "http://127.0.0.1:9000/cb?x",
        ] {
            assert!(l.check(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://shop.example/hooks/../admin",
            "https://shop.example/hooks/%2e%2e/admin",
            "https://shop.example/hooks/%2E%2E%2Fadmin",
            "https://shop.example/hooks/..%2fadmin",
            "https://shop.example/hooks/./x",
            "https://shop.example/hooks\\..\\admin",
            "https://shop.example.evil.com/hooks/",
            "https://shop.example@evil.com/hooks/",
            "https://user:pw@shop.example/hooks/",
            "https://evil.com#@shop.example/hooks/",
            "https://evil.com?@shop.example/hooks/",
            "https://shop.example:8443/hooks/",
            "http://shop.example/hooks/",
            "https://shop.example/hook",
            "https://shop.example/admin",
            "http://127.0.0.1:9000/cbevil",
            "http://127.0.0.1:9001/cb",
            "http://127.0.0.1/cb",
            "http://0x7f000001:9000/cb",
            "ftp://shop.example/hooks/",
            "https://shop.example/hooks/ x",
            "https://shop.example/hooks/\u{e9}",
            "//shop.example/hooks/",
            "https://shop.example/hooks/#x",
            "https://shop.example:0/hooks/",
            "https://shop.example:99999/hooks/",
        ] {
            assert!(l.check(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_reason_is_given() {
        let l = list(&["https://shop.example/hooks/"]);
        assert!(l
            .check("https://u@shop.example/hooks/")
            .unwrap_err()
            .contains("user information"));
        assert!(l
            .check("https://x/")
            .unwrap_err()
            .contains("not under an allowed prefix"));
        assert!(list(&[])
            .check("https://x/")
            .unwrap_err()
            .contains("not enabled"));
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(Prefix::parse("https://shop.example/hooks/?a=1").is_err());
        assert!(Prefix::parse("shop.example/hooks/").is_err());
        assert!(AllowList::parse(&["https://a@b/".into()]).is_err());
    }
}
