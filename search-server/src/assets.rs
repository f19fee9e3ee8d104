//! The web page, compiled into the binary so the server works from any directory and needs
//! no external CDN: `assets/web/{index.html, app.js, style.css, favicon.svg}`.

use actix_web::http::header;
use actix_web::HttpResponse;

const INDEX_HTML: &str = include_str!("../../assets/web/index.html");
const APP_JS: &str = include_str!("../../assets/web/app.js");
const STYLE_CSS: &str = include_str!("../../assets/web/style.css");
const FAVICON_SVG: &str = include_str!("../../assets/web/favicon.svg");

/// Only our own scripts, styles and images (plus `blob:` for the local preview).
const CSP: &str =
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn asset(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .body(body)
}

pub async fn index() -> HttpResponse {
    let mut resp = asset("text/html; charset=utf-8", INDEX_HTML);
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(CSP),
    );
    resp
}

pub async fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub async fn style() -> HttpResponse {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

pub async fn favicon() -> HttpResponse {
    asset("image/svg+xml", FAVICON_SVG)
}
