//! The HTTP API and the page: handlers, shared state, and the `App` they form.
//!
//! Every handler does its CPU work off the async workers: decoding and file I/O in
//! `web::block`, embedding on the inference thread ([`Batcher`]), index searches in
//! `web::block`. Every error is a JSON `{"error": ...}` ([`ApiError`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpRequest, HttpResponse};
use indexer::{Filter, Metadata};
use serde::Serialize;

use crate::assets;
use crate::backend::{AddOutcome, GalleryItem, NewGalleryItem, SearchBackend};
use crate::batcher::{Batcher, EmbedRequest};
use crate::budget::DecodeBudget;
use crate::decode::{self, DecodeLimits};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{sha256_hex, UploadStore};
use crate::thumbs::{self, Thumbnails};
use crate::upload::{read_upload, Fields, Part};

/// Request-independent settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Required for writes (`POST /api/images`, `DELETE /api/images/{id}`) when set.
    pub api_key: Option<String>,
    /// Writes answer 403.
    pub read_only: bool,
    pub max_upload_bytes: usize,
    pub limits: DecodeLimits,
    /// `k` when the query has none.
    pub default_k: usize,
    /// Larger `k` values are clamped to this (documented in `--help` and the API notes).
    pub max_k: usize,
    /// Decoded-image memory that search, add and thumbnail requests share.
    pub budget: DecodeBudget,
    /// Folders whose layout below them may be shown in results (the data dir, the gallery
    /// folder, the images root): `path` in a result is relative to the first that holds
    /// the file, else just the file name, so results never reveal where the server keeps
    /// its files.
    pub public_roots: Vec<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            api_key: None,
            read_only: false,
            max_upload_bytes: 20_000_000,
            limits: DecodeLimits::default(),
            default_k: 10,
            max_k: 100,
            budget: DecodeBudget::new(512 << 20, std::time::Duration::from_secs(10)),
            public_roots: Vec::new(),
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    pub gallery: Arc<dyn SearchBackend>,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    pub thumbs: Arc<Thumbnails>,
    pub uploads: UploadStore,
    pub settings: Settings,
    /// Shown on `/healthz` and the page.
    pub model: String,
}

/// The application: routes, JSON 404 for everything else, and request metrics.
pub fn app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(state)
        // Bodies are read as streams with our own limits (see `upload`); these only guard
        // extractors that might be added later.
        .app_data(web::PayloadConfig::new(64 * 1024))
        .app_data(web::JsonConfig::default().limit(64 * 1024))
        .wrap(from_fn(track_metrics))
        .configure(configure)
}

/// Registers every route (also usable inside another `App`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(assets::index))
        .route("/app.js", web::get().to(assets::script))
        .route("/style.css", web::get().to(assets::style))
        .route("/favicon.svg", web::get().to(assets::favicon))
        .route("/healthz", web::get().to(healthz))
        .route("/metrics", web::get().to(metrics))
        .route("/api/config", web::get().to(config))
        .route("/api/search", web::post().to(search))
        .route("/api/images", web::post().to(add_image))
        .route("/api/images", web::get().to(list_images))
        .route("/api/images/{id}", web::get().to(image))
        .route("/api/images/{id}", web::delete().to(delete_image))
        .route("/api/images/{id}/thumb", web::get().to(thumbnail))
        .route("/api/images/{id}/similar", web::get().to(similar))
        .default_service(web::to(not_found));
}

/// Counts every request by route pattern and status and times it.
async fn track_metrics(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = Instant::now();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let method = metric_method(req.method());
    let res = next.call(req).await?;
    if let Some(state) = state {
        let route = res
            .request()
            .match_pattern()
            .unwrap_or_else(|| "(unmatched)".to_string());
        state.metrics.observe_request(
            &route,
            &method,
            res.status().as_u16(),
            start.elapsed().as_secs_f64(),
        );
    }
    Ok(res)
}

/// The method as a metrics label: the standard ones by name, anything else as `OTHER`, so
/// clients inventing methods cannot grow the label set.
fn metric_method(m: &actix_web::http::Method) -> String {
    use actix_web::http::Method;
    let known = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ];
    if known.contains(m) {
        m.as_str().to_string()
    } else {
        "OTHER".to_string()
    }
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no such endpoint: {} {}",
        req.method(),
        req.path()
    )))
}

/// Live gallery items, counted off the async workers (a remote store asks its engine).
async fn gallery_len(state: &AppState) -> Result<usize, ApiError> {
    let gallery = state.gallery.clone();
    web::block(move || gallery.len())
        .await?
        .map_err(|e| ApiError::gallery("counting the gallery failed", e))
}

/// 200 while the gallery answers; 503 (with the reason) while its engine is unreachable.
async fn healthz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let items = gallery_len(&state).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "status": "ok",
        "gallery_items": items,
        "model": state.model,
        "read_only": state.settings.read_only,
    })))
}

async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let items = gallery_len(&state).await?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render(items, state.batcher.queue_depth())))
}

/// What the page needs to know to show the right controls.
async fn config(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let items = gallery_len(&state).await?;
    let s = &state.settings;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "read_only": s.read_only,
        "auth_required": s.api_key.is_some(),
        "default_k": s.default_k,
        "max_k": s.max_k,
        "max_upload_bytes": s.max_upload_bytes,
        "gallery_items": items,
        "model": state.model,
    })))
}

/// One gallery item as returned to clients (`GET /api/images/{id}` as JSON, listings).
#[derive(Debug, Serialize)]
pub struct ItemJson {
    pub id: u64,
    pub label: Option<String>,
    pub metadata: Option<Metadata>,
    pub path: String,
    pub url: String,
    pub thumb_url: String,
}

impl ItemJson {
    fn new(item: &GalleryItem, roots: &[PathBuf]) -> Self {
        Self {
            id: item.id,
            label: item.label.clone(),
            metadata: item.metadata.clone(),
            path: public_path(&item.path, roots),
            url: format!("/api/images/{}", item.id),
            thumb_url: format!("/api/images/{}/thumb", item.id),
        }
    }
}

/// One search result as returned to clients: the item and its score.
#[derive(Debug, Serialize)]
pub struct ResultJson {
    pub score: f32,
    #[serde(flatten)]
    pub item: ItemJson,
}

/// `path` as shown to clients: relative to the first of `roots` that holds it, else the
/// file name alone (see [`Settings::public_roots`]).
pub fn public_path(path: &Path, roots: &[PathBuf]) -> String {
    roots
        .iter()
        .filter(|r| r.is_absolute())
        .find_map(|r| path.strip_prefix(r).ok())
        .filter(|rel| !rel.as_os_str().is_empty())
        .or_else(|| path.file_name().map(Path::new))
        .unwrap_or(path)
        .display()
        .to_string()
}

impl ResultJson {
    fn new(item: &GalleryItem, score: f32, roots: &[PathBuf]) -> Self {
        Self {
            score,
            item: ItemJson::new(item, roots),
        }
    }
}

/// The query string as `(key, value)` pairs.
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    web::Query::<Vec<(String, String)>>::from_query(query)
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::BadRequest(format!("malformed query string: {e}")))
}

/// The last value of `key` in the query string.
fn query_value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A filter sent as JSON text (see [`indexer::filter`]); empty text = no filter.
pub fn parse_filter(text: Option<&str>) -> Result<Option<Filter>, ApiError> {
    let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
        return Ok(None);
    };
    match Filter::parse(text) {
        Ok(f) => Ok(Some(f).filter(|f| !f.is_empty())),
        Err(e) if e.too_large => Err(ApiError::TooLarge(e.message)),
        Err(e) => Err(ApiError::BadRequest(e.message)),
    }
}

/// A whole-number query parameter: absent → `default`; not a number → 400; above `max`
/// → `max`.
fn parse_count(
    pairs: &[(String, String)],
    key: &str,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    let Some(raw) = query_value(pairs, key) else {
        return Ok(default.min(max));
    };
    let digits = raw.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::BadRequest(format!(
            "{key} must be a whole number from 0 to {max}, got '{}'",
            raw.chars().take(64).collect::<String>()
        )));
    }
    Ok(digits.parse::<usize>().map_or(max, |v| v.min(max)))
}

/// `k` from the query string: absent → default; 0, negative or not a number → 400; above
/// `max_k` → clamped to `max_k`.
pub fn parse_k(query: &str, settings: &Settings) -> Result<usize, ApiError> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(query)
        .map_err(|e| ApiError::BadRequest(format!("malformed query string: {e}")))?;
    let Some((_, raw)) = pairs.iter().rev().find(|(key, _)| key == "k") else {
        return Ok(settings.default_k.clamp(1, settings.max_k));
    };
    let bad = || {
        ApiError::BadRequest(format!(
            "k must be a whole number from 1 to {} (larger values are clamped), got '{raw}'",
            settings.max_k
        ))
    };
    // Huge numbers that overflow usize are still "a number too large": clamp them too.
    let digits = raw.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match digits.parse::<usize>() {
        Ok(0) => Err(bad()),
        Ok(k) => Ok(k.min(settings.max_k)),
        Err(_) => Ok(settings.max_k),
    }
}

/// `POST /api/search?k=10`: multipart field `image` or a raw `image/*` body.
async fn search(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    let k = parse_k(req.query_string(), &state.settings)?;
    let pairs = query_pairs(req.query_string())?;
    let url_filter = parse_filter(query_value(&pairs, "filter"))?;
    let arriving = state.batcher.arriving();
    let upload = read_upload(
        &req,
        payload,
        state.settings.max_upload_bytes,
        Fields::Search,
    )
    .await?;
    let filter = match (url_filter, parse_filter(upload.filter.as_deref())?) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "the filter was sent twice (URL parameter and form field); send it once".into(),
            ))
        }
        (a, b) => a.or(b),
    };
    let query = embed_upload(&state, arriving, upload.image(), None)
        .await?
        .vector;
    let results = search_results(&state, query, k, filter, None).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "results": results,
        "k": k,
        "took_ms": start.elapsed().as_secs_f64() * 1e3,
    })))
}

/// Searches off the async workers and shapes the results; `exclude` (the query item of
/// "more like this") is left out of them.
async fn search_results(
    state: &AppState,
    query: Vec<f32>,
    k: usize,
    filter: Option<Filter>,
    exclude: Option<u64>,
) -> Result<Vec<ResultJson>, ApiError> {
    let gallery = state.gallery.clone();
    let want = k + usize::from(exclude.is_some());
    let hits = web::block(move || gallery.search(&query, want, filter.as_ref()))
        .await?
        .map_err(|e| ApiError::gallery("searching the index failed", e))?;
    Ok(hits
        .iter()
        .filter(|h| Some(h.item.id) != exclude)
        .take(k)
        .map(|h| ResultJson::new(&h.item, h.score, &state.settings.public_roots))
        .collect())
}

/// `GET /api/images/{id}/similar?k=10&filter=…`: more like a gallery item, without an
/// upload (its stored embedding is the query; the item itself is left out).
async fn similar(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    let k = parse_k(req.query_string(), &state.settings)?;
    let pairs = query_pairs(req.query_string())?;
    let filter = parse_filter(query_value(&pairs, "filter"))?;
    let item = lookup(&state, &path).await?;
    let (gallery, id) = (state.gallery.clone(), item.id);
    let query = web::block(move || gallery.vector(id))
        .await?
        .map_err(|e| ApiError::gallery("reading the item's embedding failed", e))?
        .ok_or_else(|| not_found_id(&path))?;
    let results = search_results(&state, query, k, filter, Some(item.id)).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": item.id,
        "results": results,
        "k": k,
        "took_ms": start.elapsed().as_secs_f64() * 1e3,
    })))
}

/// Most items one page of `GET /api/images` returns.
pub const MAX_PAGE: usize = 1000;

/// `GET /api/images?offset=0&limit=50&filter=…`: the gallery in id order, one page at a time.
async fn list_images(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let pairs = query_pairs(req.query_string())?;
    let offset = parse_count(&pairs, "offset", 0, usize::MAX)?;
    let limit = parse_count(&pairs, "limit", 50, MAX_PAGE)?;
    let filter = parse_filter(query_value(&pairs, "filter"))?;
    let gallery = state.gallery.clone();
    let (total, items) = web::block(move || gallery.page(offset, limit, filter.as_ref()))
        .await?
        .map_err(|e| ApiError::gallery("listing the gallery failed", e))?;
    let items: Vec<ItemJson> = items
        .iter()
        .map(|it| ItemJson::new(it, &state.settings.public_roots))
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "total": total,
        "offset": offset,
        "limit": limit,
        "items": items,
    })))
}

/// Refuses a write on a read-only server or without the right API key.
fn check_write(req: &HttpRequest, state: &AppState, what: &str) -> Result<(), ApiError> {
    if state.settings.read_only {
        return Err(ApiError::Forbidden(format!(
            "this server is read-only (--read-only): {what} is disabled"
        )));
    }
    if let Some(key) = &state.settings.api_key {
        check_api_key(req, key)?;
    }
    Ok(())
}

/// `DELETE /api/images/{id}`: 200 once the delete is durable and the item has left every
/// search; 404 for an unknown (or already deleted) id. The uploaded file goes too (files
/// of a `--gallery` folder are the user's and stay; the scan leaves them out from then on).
async fn delete_image(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_write(&req, &state, "deleting images")?;
    let item = lookup(&state, &path).await?;
    let (gallery, id) = (state.gallery.clone(), item.id);
    let deleted = web::block(move || gallery.delete(id))
        .await?
        .map_err(|e| ApiError::gallery("deleting the image from the index failed", e))?;
    if !deleted {
        return Err(not_found_id(&path));
    }
    let uploads = state.uploads.clone();
    let file = item.path.clone();
    web::block(move || uploads.remove_if_stored(&file)).await?;
    tracing::info!(id, "image deleted");
    Ok(HttpResponse::Ok().json(serde_json::json!({ "id": id, "deleted": true })))
}

/// Checks `Authorization: Bearer KEY` or `X-Api-Key: KEY` against the configured key.
fn check_api_key(req: &HttpRequest, expected: &str) -> Result<(), ApiError> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let x_key = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match bearer.or(x_key) {
        None => Err(ApiError::Unauthorized(
            "writing (adding or deleting images) needs an API key on this server: send 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'".into(),
        )),
        Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized("the API key is wrong".into())),
    }
}

/// The token of an `Authorization: Bearer TOKEN` value; the scheme is case-insensitive
/// (RFC 7235 §2.1), so `BEARER` and `bearer` work too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Decodes (within the decode budget) and embeds an upload, with its thumbnail when asked.
/// The header is read first: an unusable or oversized image is refused before it waits for
/// the budget, and the budget is charged what the decode will really hold.
async fn embed_upload(
    state: &AppState,
    arriving: crate::batcher::Arriving,
    bytes: actix_web::web::Bytes,
    thumb_size: Option<u32>,
) -> Result<crate::batcher::Embedded, ApiError> {
    let limits = state.settings.limits;
    let header = decode::probe(&bytes, limits)?;
    let permit = state.settings.budget.acquire(header.peak_bytes()).await?;
    let request = EmbedRequest {
        upload: bytes,
        limits,
        permit: Some(permit),
        thumb_size,
    };
    state.batcher.embed_request(arriving, request).await
}

/// Compares without an early exit, so response time does not reveal a key prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}

/// `POST /api/images`: adds one image or a batch (multipart `image` parts, each with its
/// own `label` / `metadata`, paired by order; see [`crate::upload`]). All or nothing: every
/// part is checked, decoded and embedded before any is stored, and the new items go into
/// the index as one WAL batch. Answers 200 only once they are durable and searchable.
async fn add_image(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    check_write(&req, &state, "adding images")?;
    let arriving = state.batcher.arriving();
    let upload = read_upload(&req, payload, state.settings.max_upload_bytes, Fields::Add).await?;
    let total = upload.parts.len();
    let prepared = prepare_parts(&state, arriving, upload.parts).await?;
    let sent: Vec<(Option<String>, Option<Metadata>)> = prepared
        .iter()
        .map(|p| (p.part.label.clone(), p.part.metadata.clone()))
        .collect();
    let outcomes = store_parts(&state, prepared).await?;
    // A duplicate keeps what the gallery holds, not what this request sent.
    let held = duplicates_as_held(&state, &outcomes).await?;
    let items: Vec<serde_json::Value> = sent
        .into_iter()
        .zip(&outcomes)
        .map(|(sent, o)| {
            let (label, metadata) = match o.duplicate {
                true => held.get(&o.id).cloned().unwrap_or_default(),
                false => sent,
            };
            serde_json::json!({
                "id": o.id,
                "duplicate": o.duplicate,
                "label": label,
                "metadata": metadata,
                "url": format!("/api/images/{}", o.id),
                "thumb_url": format!("/api/images/{}/thumb", o.id),
            })
        })
        .collect();
    tracing::info!(
        images = total,
        added = outcomes.iter().filter(|o| !o.duplicate).count(),
        "images added"
    );
    // One image: its fields at the top level (as before batches existed), plus `items`.
    let mut body = match (total, items.first()) {
        (1, Some(first)) => first.clone(),
        _ => serde_json::json!({}),
    };
    body["items"] = items.into();
    body["took_ms"] = (start.elapsed().as_secs_f64() * 1e3).into();
    Ok(HttpResponse::Ok().json(body))
}

/// Label and metadata of gallery items, by id.
type Held = std::collections::HashMap<u64, (Option<String>, Option<Metadata>)>;

/// Label and metadata the gallery holds for each duplicate among `outcomes`.
async fn duplicates_as_held(state: &AppState, outcomes: &[AddOutcome]) -> Result<Held, ApiError> {
    let ids: Vec<u64> = outcomes
        .iter()
        .filter(|o| o.duplicate)
        .map(|o| o.id)
        .collect();
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let gallery = state.gallery.clone();
    web::block(move || {
        let mut held = std::collections::HashMap::new();
        for id in ids {
            if let Some(i) = gallery.item(id)? {
                held.insert(id, (i.label, i.metadata));
            }
        }
        Ok(held)
    })
    .await?
    .map_err(|e| ApiError::gallery("reading the gallery failed", e))
}

/// One uploaded image, checked and (unless its content is already in the gallery) embedded.
struct Prepared {
    part: Part,
    sha: String,
    format: image::ImageFormat,
    embedded: Option<crate::batcher::Embedded>,
}

/// Checks and embeds every part before anything is stored; an error names the part
/// ("image 2: …") when there are several.
async fn prepare_parts(
    state: &AppState,
    arriving: crate::batcher::Arriving,
    parts: Vec<Part>,
) -> Result<Vec<Prepared>, ApiError> {
    let total = parts.len();
    let mut arriving = Some(arriving);
    let mut out: Vec<Prepared> = Vec::with_capacity(total);
    for (i, part) in parts.into_iter().enumerate() {
        let name = |e: ApiError| name_part(e, i, total);
        let sha = sha256_hex(&part.image);
        let format = decode::sniff_format(&part.image).map_err(|e| name(e.into()))?;
        let known = out.iter().any(|p| p.sha == sha) || {
            let (gallery, sha) = (state.gallery.clone(), sha.clone());
            web::block(move || gallery.find_sha256(&sha))
                .await?
                .map_err(|e| ApiError::gallery("checking the gallery for the image failed", e))?
                .is_some()
        };
        let embedded = if known {
            None
        } else {
            let arriving = arriving.take().unwrap_or_else(|| state.batcher.arriving());
            let thumb = Some(state.thumbs.size());
            Some(
                embed_upload(state, arriving, part.image.clone(), thumb)
                    .await
                    .map_err(name)?,
            )
        };
        out.push(Prepared {
            part,
            sha,
            format,
            embedded,
        });
    }
    Ok(out)
}

/// `e` with "image N: " in front when the request carried several images.
fn name_part(e: ApiError, i: usize, total: usize) -> ApiError {
    if total < 2 {
        return e;
    }
    let prefix = |m: String| format!("image {} of {total}: {m}", i + 1);
    match e {
        ApiError::BadRequest(m) => ApiError::BadRequest(prefix(m)),
        ApiError::TooLarge(m) => ApiError::TooLarge(prefix(m)),
        ApiError::UnsupportedMediaType(m) => ApiError::UnsupportedMediaType(prefix(m)),
        ApiError::Unprocessable(m) => ApiError::Unprocessable(prefix(m)),
        other => other,
    }
}

/// Stores the files and thumbnails of the new parts, then adds them all to the index in
/// one durable batch; returns each part's outcome, in order.
async fn store_parts(
    state: &AppState,
    prepared: Vec<Prepared>,
) -> Result<Vec<AddOutcome>, ApiError> {
    let (gallery, uploads, thumbs) = (
        state.gallery.clone(),
        state.uploads.clone(),
        state.thumbs.clone(),
    );
    web::block(move || -> Result<Vec<AddOutcome>, ApiError> {
        let mut items = Vec::with_capacity(prepared.len());
        for p in prepared {
            // A duplicate is not stored again: it only needs its hash for the outcome.
            let (path, embedding) = match p.embedded {
                None => (PathBuf::new(), Vec::new()),
                Some(embedded) => {
                    let path = uploads
                        .save(&p.part.image, &p.sha, p.format)
                        .map_err(|e| ApiError::internal("storing the uploaded image failed", e))?;
                    // The thumbnail from the decode that embedded it, stored before the
                    // item is visible: serving it never decodes the upload again.
                    if let Some(thumb) = embedded.thumb {
                        thumbs.store(&p.sha, thumb);
                    }
                    (path, embedded.vector)
                }
            };
            items.push(NewGalleryItem {
                path,
                label: p.part.label,
                sha256: p.sha,
                metadata: p.part.metadata,
                embedding,
            });
        }
        add_all(gallery.as_ref(), items)
    })
    .await?
}

/// Adds the items that are new (those with an embedding) as one batch; the others are
/// duplicates of live items (or of an earlier part of the same request).
fn add_all(
    gallery: &dyn SearchBackend,
    items: Vec<NewGalleryItem>,
) -> Result<Vec<AddOutcome>, ApiError> {
    let shas: Vec<String> = items.iter().map(|i| i.sha256.clone()).collect();
    let new: Vec<NewGalleryItem> = items
        .into_iter()
        .filter(|i| !i.embedding.is_empty())
        .collect();
    let added = gallery
        .add_batch(new)
        .map_err(|e| ApiError::gallery("adding the images to the index failed", e))?;
    let mut fresh: std::collections::HashSet<u64> = added
        .iter()
        .filter(|o| !o.duplicate)
        .map(|o| o.id)
        .collect();
    shas.iter()
        .map(|sha| {
            let id = gallery
                .find_sha256(sha)
                .map_err(|e| ApiError::gallery("adding the images to the index failed", e))?
                .ok_or_else(|| {
                    ApiError::internal(
                        "adding the images to the index failed",
                        format!("item {sha} missing after add"),
                    )
                })?;
            // The first part with this content is the add; a repeat is a duplicate.
            let duplicate = !fresh.remove(&id);
            Ok(AddOutcome { id, duplicate })
        })
        .collect()
}

/// The gallery item named by the `{id}` path segment. Anything but a known numeric id is
/// 404: ids are the only way to reach a file, so no user-supplied path is ever opened.
async fn lookup(state: &AppState, raw: &str) -> Result<GalleryItem, ApiError> {
    let Ok(id) = raw.parse::<u64>() else {
        return Err(not_found_id(raw));
    };
    let gallery = state.gallery.clone();
    web::block(move || gallery.item(id))
        .await?
        .map_err(|e| ApiError::gallery("reading the gallery failed", e))?
        .ok_or_else(|| not_found_id(raw))
}

fn not_found_id(raw: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no gallery image with id '{}' (never added, or deleted)",
        raw.chars().take(64).collect::<String>()
    ))
}

fn missing_file(item: &GalleryItem, e: impl std::fmt::Display) -> ApiError {
    tracing::warn!("gallery image {} ({}): {e}", item.id, item.path.display());
    ApiError::NotFound(format!(
        "the file of gallery image {} is no longer available on the server",
        item.id
    ))
}

/// `GET /api/images/{id}`: the original file, or, for a client that asks for JSON
/// (`Accept: application/json`), the item's record with its label and metadata. One URL
/// for both keeps `<img src>` and existing clients working.
async fn image(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let item = lookup(&state, &path).await?;
    if wants_json(&req) {
        return Ok(HttpResponse::Ok()
            .insert_header((header::VARY, "Accept"))
            .json(ItemJson::new(&item, &state.settings.public_roots)));
    }
    let p = item.path.clone();
    let bytes = web::block(move || std::fs::read(p))
        .await?
        .map_err(|e| missing_file(&item, e))?;
    Ok(HttpResponse::Ok()
        .content_type(thumbs::content_type(&bytes))
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .body(bytes))
}

/// Whether the `Accept` header names JSON (browsers' image requests never do).
fn wants_json(req: &HttpRequest) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.trim()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

/// `GET /api/images/{id}/thumb`: a small JPEG. Cached ones are served as they are; a
/// missing one is made once (concurrent requests share the work) within the decode budget.
async fn thumbnail(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let item = lookup(&state, &path).await?;
    let key = state.thumbs.key(&item.sha256);
    let flight = state.thumbs.flight(&key);
    let made = flight
        .get_or_try_init(|| make_thumbnail(&state, &item))
        .await;
    state.thumbs.land(&key, &flight);
    let bytes = made?.clone();
    Ok(HttpResponse::Ok()
        .content_type("image/jpeg")
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .body(bytes))
}

async fn make_thumbnail(
    state: &AppState,
    item: &GalleryItem,
) -> Result<actix_web::web::Bytes, ApiError> {
    let thumbs = state.thumbs.clone();
    let it = item.clone();
    if let Some(b) = web::block(move || thumbs.cached(&it)).await? {
        return Ok(b);
    }
    let p = item.path.clone();
    let bytes = web::block(move || std::fs::read(p))
        .await?
        .map_err(|e| missing_file(item, e))?;
    let failed = |e: &dyn std::fmt::Display| {
        ApiError::internal(
            &format!("cannot make the thumbnail of gallery image {}", item.id),
            e,
        )
    };
    let header = decode::probe(&bytes, state.settings.limits).map_err(|e| failed(&e))?;
    let permit = state.settings.budget.acquire(header.peak_bytes()).await?;
    let (thumbs, it) = (state.thumbs.clone(), item.clone());
    web::block(move || {
        let made = thumbs.make(&it, &bytes);
        drop(permit);
        made
    })
    .await?
    .map_err(|e| failed(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_parsing() {
        let s = Settings {
            default_k: 10,
            max_k: 50,
            ..Settings::default()
        };
        assert_eq!(parse_k("", &s).unwrap(), 10);
        assert_eq!(parse_k("k=3", &s).unwrap(), 3);
        assert_eq!(parse_k("k=500", &s).unwrap(), 50);
        assert_eq!(parse_k("k=99999999999999999999999999", &s).unwrap(), 50);
        for bad in ["k=0", "k=-1", "k=abc", "k=", "k=1.5", "k=%20"] {
            assert!(
                matches!(parse_k(bad, &s), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in [
            "Bearer k1",
            "bearer k1",
            "BEARER k1",
            "BeArEr   k1 ",
            "  Bearer k1",
        ] {
            assert_eq!(bearer_token(v), Some("k1"), "{v:?}");
        }
        for v in ["Basic k1", "Bearer", "Bearer ", "Bearerk1", ""] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }

    #[test]
    fn public_paths_hide_server_folders() {
        let roots = vec![PathBuf::from("/srv/data"), PathBuf::from("/srv/gallery")];
        let p = |s: &str| public_path(Path::new(s), &roots);
        assert_eq!(p("/srv/gallery/blue/0.png"), "blue/0.png");
        assert_eq!(p("/srv/data/uploads/ab/ab12.png"), "uploads/ab/ab12.png");
        assert_eq!(p("/home/someone/secret/x.jpg"), "x.jpg");
        assert_eq!(p("relative/y.jpg"), "y.jpg");
    }

    #[test]
    fn metric_methods_are_bounded() {
        use actix_web::http::Method;
        assert_eq!(metric_method(&Method::GET), "GET");
        assert_eq!(
            metric_method(&Method::from_bytes(b"PURGE").unwrap()),
            "OTHER"
        );
        assert_eq!(
            metric_method(&Method::from_bytes(b"XYZZY1").unwrap()),
            "OTHER"
        );
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
