//! The live dashboard at `/`: one page, its stylesheet and its script, embedded in the
//! binary at build time (no CDN, nothing fetched from elsewhere: the Content-Security-Policy
//! allows this origin only). The page polls `/stats`, `/connections`, `/denials` and
//! `/history` every second and acts through the write routes; it needs no server state of
//! its own.

use super::routes::{respond, Answer};

const PAGE: &str = include_str!("dashboard/index.html");
const STYLE: &str = include_str!("dashboard/dashboard.css");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");

/// This origin only; no inline script, no frames.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// `GET /`.
pub fn page() -> Answer {
    secured(respond(200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec()))
}

/// `GET /assets/NAME`.
pub fn asset(name: &str) -> Answer {
    let (content_type, body) = match name {
        "dashboard.css" => ("text/css; charset=utf-8", STYLE),
        "dashboard.js" => ("text/javascript; charset=utf-8", SCRIPT),
        _ => {
            let body = format!("{{\"error\": \"no such asset: {}\"}}\n", name.escape_default());
            return respond(404, "application/json", body.into_bytes());
        }
    };
    secured(respond(200, content_type, body.as_bytes().to_vec()))
}

fn secured(mut answer: Answer) -> Answer {
    let headers = answer.headers_mut();
    headers.insert("content-security-policy", hyper::header::HeaderValue::from_static(POLICY));
    headers.insert("referrer-policy", hyper::header::HeaderValue::from_static("no-referrer"));
    headers.insert("x-frame-options", hyper::header::HeaderValue::from_static("DENY"));
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for (name, text) in
            [("index.html", PAGE), ("dashboard.css", STYLE), ("dashboard.js", SCRIPT)]
        {
            // The SVG namespace is a name, not an address anything is loaded from.
            let text = text.replace("\"http://www.w3.org/2000/svg\"", "");
            for outside in ["://", "@import", "url("] {
                assert!(!text.contains(outside), "{name} refers to {outside}");
            }
        }
        assert!(PAGE.contains("/assets/dashboard.js") && PAGE.contains("/assets/dashboard.css"));
        assert!(!PAGE.contains("<script>"), "inline script would break the CSP");
    }
}
