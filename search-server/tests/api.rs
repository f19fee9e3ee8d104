//! The HTTP API against the deterministic fakes (mean-colour embedder, in-memory gallery):
//! every route, every kind of bad input, auth, durability contract and batching.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use actix_multipart::test::create_form_data_payload_and_headers_from_fields as form;
use actix_multipart::test::TestFormField as Field;
use actix_web::http::StatusCode;
use actix_web::{test, web};
use image::{ImageFormat, Rgb, RgbImage};
use search_server::batcher::{BatchConfig, Batcher, BatcherThread};
use search_server::decode::DecodeLimits;
use search_server::metrics::Metrics;
use search_server::routes::{app, AppState, Settings};
use search_server::store::{sha256_hex, UploadStore};
use search_server::testing::{mean_color, ColorEmbedder, MemoryGallery};
use search_server::thumbs::Thumbnails;
use search_server::SearchBackend;

const COLORS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 20, 20]),
    ("green", [20, 200, 30]),
    ("blue", [30, 40, 210]),
    ("yellow", [230, 220, 20]),
];

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn png(color: [u8; 3], w: u32, h: u32) -> Vec<u8> {
    encode(&RgbImage::from_pixel(w, h, Rgb(color)), ImageFormat::Png)
}

struct Harness {
    state: web::Data<AppState>,
    gallery: Arc<MemoryGallery>,
    embedder: Arc<ColorEmbedder>,
    dir: tempfile::TempDir,
    _thread: BatcherThread,
}

/// A gallery of four single-colour images (ids 0..4 in `COLORS` order).
fn harness(settings: Settings, embed_delay: Duration, batch: BatchConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let gallery = Arc::new(MemoryGallery::default());
    for (name, color) in COLORS {
        let bytes = png(color, 64, 48);
        let path = dir.path().join(format!("{name}.png"));
        std::fs::write(&path, &bytes).unwrap();
        let emb = mean_color(&image::load_from_memory(&bytes).unwrap());
        gallery.insert(path, Some(name), &sha256_hex(&bytes), emb);
    }
    let embedder = Arc::new(ColorEmbedder::with_delay(embed_delay));
    let metrics = Arc::new(Metrics::new());
    let (batcher, thread) = Batcher::start(embedder.clone(), batch, metrics.clone());
    let state = web::Data::new(AppState {
        gallery: gallery.clone(),
        batcher,
        metrics,
        thumbs: Arc::new(Thumbnails::new(
            96,
            Some(dir.path().join("thumbs")),
            1 << 20,
            DecodeLimits::default(),
        )),
        uploads: UploadStore::new(dir.path()),
        settings,
        model: "test".into(),
    });
    Harness {
        state,
        gallery,
        embedder,
        dir,
        _thread: thread,
    }
}

fn default_harness() -> Harness {
    harness(Settings::default(), Duration::ZERO, BatchConfig::default())
}

macro_rules! service {
    ($h:expr) => {
        test::init_service(app($h.state.clone())).await
    };
}

fn multipart_req(uri: &str, fields: Vec<Field<'static>>) -> test::TestRequest {
    let (body, headers) = form(fields);
    let mut req = test::TestRequest::post().uri(uri);
    for (k, v) in headers.iter() {
        req = req.insert_header((k.clone(), v.clone()));
    }
    req.set_payload(body)
}

fn image_form(uri: &str, bytes: Vec<u8>) -> test::TestRequest {
    multipart_req(uri, vec![Field::new("image", bytes).filename("q.png")])
}

/// Sends a request and returns `(status, json body)`.
async fn call<S, B>(app: &S, req: test::TestRequest) -> (StatusCode, serde_json::Value)
where
    S: actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse<B>,
        Error = actix_web::Error,
    >,
    B: actix_web::body::MessageBody,
{
    let resp = test::call_service(app, req.to_request()).await;
    let status = resp.status();
    let body = test::read_body(resp).await;
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// Asserts a JSON error with the given status whose message mentions `needle`.
fn assert_error(got: (StatusCode, serde_json::Value), status: u16, needle: &str) {
    assert_eq!(got.0.as_u16(), status, "body: {}", got.1);
    let msg = got.1["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no JSON error in {}", got.1));
    assert!(
        msg.to_lowercase().contains(&needle.to_lowercase()),
        "'{msg}' does not mention '{needle}'"
    );
}

#[actix_web::test]
async fn serves_the_page_and_its_assets() {
    let h = default_harness();
    let app = service!(h);
    for (path, ct, needle) in [
        ("/", "text/html", "Deep Metric"),
        ("/app.js", "javascript", "/api/search"),
        ("/style.css", "text/css", ".grid"),
        ("/favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let resp = test::call_service(&app, test::TestRequest::get().uri(path).to_request()).await;
        assert_eq!(resp.status(), 200, "{path}");
        let got_ct = resp
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(got_ct.contains(ct), "{path}: {got_ct}");
        let body = test::read_body(resp).await;
        assert!(String::from_utf8_lossy(&body).contains(needle), "{path}");
    }
}

#[actix_web::test]
async fn health_config_and_json_404() {
    let h = harness(
        Settings {
            api_key: Some("k".into()),
            default_k: 7,
            ..Settings::default()
        },
        Duration::ZERO,
        BatchConfig::default(),
    );
    let app = service!(h);
    let (s, body) = call(&app, test::TestRequest::get().uri("/healthz")).await;
    assert_eq!(s, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["gallery_items"], 4);
    let (_, cfg) = call(&app, test::TestRequest::get().uri("/api/config")).await;
    assert_eq!(cfg["auth_required"], true);
    assert_eq!(cfg["read_only"], false);
    assert_eq!(cfg["default_k"], 7);
    assert_error(
        call(&app, test::TestRequest::get().uri("/nope")).await,
        404,
        "no such endpoint",
    );
    assert_error(
        call(&app, test::TestRequest::delete().uri("/api/search")).await,
        404,
        "DELETE",
    );
}

/// A gallery whose engine is down (a remote store): 503 with the engine's message on every
/// route that needs it, uploads refused, and everything back once it is up, with no restart.
#[actix_web::test]
async fn an_unreachable_gallery_engine_is_503_and_recovers() {
    let h = default_harness();
    let app = service!(h);
    h.gallery.set_unavailable(true);
    let red = png(COLORS[0].1, 20, 20);
    for req in [
        image_form("/api/search?k=2", red.clone()),
        image_form("/api/images", png([1, 2, 3], 20, 20)),
        test::TestRequest::get().uri("/healthz"),
        test::TestRequest::get().uri("/api/images?limit=2"),
        test::TestRequest::get().uri("/api/images/1/similar"),
        test::TestRequest::delete().uri("/api/images/1"),
    ] {
        let (s, body) = call(&app, req).await;
        assert_eq!(s, 503, "{body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains("unavailable") && msg.contains("retry"),
            "{msg}"
        );
    }
    h.gallery.set_unavailable(false);
    assert_eq!(
        h.gallery.len().unwrap(),
        4,
        "nothing was added or deleted while down"
    );
    let (s, body) = call(&app, image_form("/api/search?k=1", red)).await;
    assert_eq!(
        (s.as_u16(), &body["results"][0]["id"]),
        (200, &serde_json::json!(0))
    );
    let (s, _) = call(&app, test::TestRequest::get().uri("/healthz")).await;
    assert_eq!(s, 200);
}

#[actix_web::test]
async fn search_finds_the_matching_colour_first() {
    let h = default_harness();
    let app = service!(h);
    for (i, (name, color)) in COLORS.iter().enumerate() {
        // Different size and slightly different shade: still nearest to its colour.
        let shade = color.map(|c| c.saturating_sub(5));
        let (s, body) = call(&app, image_form("/api/search?k=2", png(shade, 50, 30))).await;
        assert_eq!(s, 200, "{body}");
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(results[0]["id"], i as u64);
        assert_eq!(results[0]["label"], *name);
        assert_eq!(results[0]["url"], format!("/api/images/{i}"));
        assert_eq!(results[0]["thumb_url"], format!("/api/images/{i}/thumb"));
        assert!(results[0]["path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("{name}.png")));
        let (s0, s1) = (
            results[0]["score"].as_f64().unwrap(),
            results[1]["score"].as_f64().unwrap(),
        );
        assert!(s0 > 0.99 && s0 >= s1, "{s0} {s1}");
        assert!(body["took_ms"].as_f64().unwrap() >= 0.0);
    }
}

#[actix_web::test]
async fn search_accepts_a_raw_body_and_jpeg() {
    let h = default_harness();
    let app = service!(h);
    let jpeg = encode(
        &RgbImage::from_pixel(40, 40, Rgb([20, 200, 30])),
        ImageFormat::Jpeg,
    );
    let req = test::TestRequest::post()
        .uri("/api/search")
        .insert_header(("content-type", "image/jpeg"))
        .set_payload(jpeg);
    let (s, body) = call(&app, req).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["results"][0]["label"], "green");
    assert_eq!(body["k"], 10);
    assert_eq!(
        body["results"].as_array().unwrap().len(),
        4,
        "k larger than the gallery returns all"
    );
}

#[actix_web::test]
async fn k_is_validated_and_clamped() {
    let h = harness(
        Settings {
            max_k: 3,
            ..Settings::default()
        },
        Duration::ZERO,
        BatchConfig::default(),
    );
    let app = service!(h);
    let red = png([220, 20, 20], 16, 16);
    let (s, body) = call(&app, image_form("/api/search?k=100000", red.clone())).await;
    assert_eq!(s, 200);
    assert_eq!(body["k"], 3);
    assert_eq!(body["results"].as_array().unwrap().len(), 3);
    for bad in ["k=0", "k=abc", "k=-2", "k=1.5"] {
        assert_error(
            call(&app, image_form(&format!("/api/search?{bad}"), red.clone())).await,
            400,
            "k must be",
        );
    }
}

#[actix_web::test]
async fn bad_uploads_get_json_4xx_and_the_server_keeps_serving() {
    let h = harness(
        Settings {
            max_upload_bytes: 50_000,
            ..Settings::default()
        },
        Duration::ZERO,
        BatchConfig::default(),
    );
    let app = service!(h);
    let raw = |ct: &str, body: Vec<u8>| {
        test::TestRequest::post()
            .uri("/api/search")
            .insert_header(("content-type", ct.to_string()))
            .set_payload(body)
    };
    let full = png([1, 2, 3], 64, 64);
    let bomb = search_server::testing::png_bomb_header(100_000, 100_000);
    let noise: Vec<u8> = (0..60_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();

    assert_error(call(&app, raw("image/png", vec![])).await, 400, "empty");
    assert_error(
        call(&app, image_form("/api/search", vec![])).await,
        400,
        "empty",
    );
    assert_error(
        call(&app, raw("text/html", b"<html></html>".to_vec())).await,
        415,
        "not an image",
    );
    assert_error(
        call(
            &app,
            raw("image/jpeg", b"<!doctype html><html>hi</html>".to_vec()),
        )
        .await,
        422,
        "HTML",
    );
    assert_error(
        call(&app, raw("image/png", b"just some text".to_vec())).await,
        422,
        "plain text",
    );
    assert_error(
        call(
            &app,
            image_form(
                "/api/search",
                b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj".to_vec(),
            ),
        )
        .await,
        422,
        "PDF",
    );
    assert_error(
        call(
            &app,
            image_form("/api/search", full[..full.len() / 2].to_vec()),
        )
        .await,
        422,
        "truncated",
    );
    assert_error(
        call(&app, image_form("/api/search", png([1, 2, 3], 1, 1))).await,
        422,
        "1×1",
    );
    assert_error(
        call(&app, image_form("/api/search", bomb)).await,
        413,
        "100000×100000",
    );
    assert_error(
        call(&app, image_form("/api/search", noise.clone())).await,
        413,
        "limit",
    );
    assert_error(call(&app, raw("image/png", noise)).await, 413, "limit");
    assert_error(
        call(
            &app,
            multipart_req(
                "/api/search",
                vec![Field::new("file", full.clone()).filename("x.png")],
            ),
        )
        .await,
        400,
        "unexpected form field 'file'",
    );
    assert_error(
        call(
            &app,
            multipart_req("/api/search", vec![Field::new("label", "x")]),
        )
        .await,
        400,
        "'label'",
    );
    assert_error(
        call(
            &app,
            multipart_req(
                "/api/search",
                vec![
                    Field::new("image", full.clone()),
                    Field::new("image", full.clone()),
                ],
            ),
        )
        .await,
        400,
        "more than one",
    );
    let no_boundary = test::TestRequest::post()
        .uri("/api/search")
        .insert_header(("content-type", "multipart/form-data"))
        .set_payload("x");
    assert_error(call(&app, no_boundary).await, 400, "multipart");
    assert_error(
        call(&app, test::TestRequest::get().uri("/api/images/999")).await,
        404,
        "no gallery image",
    );
    assert_error(
        call(&app, test::TestRequest::get().uri("/api/images/abc/thumb")).await,
        404,
        "no gallery image",
    );
    assert_error(
        call(
            &app,
            test::TestRequest::get().uri("/api/images/..%2F..%2Fetc%2Fpasswd"),
        )
        .await,
        404,
        "",
    );
    assert_error(
        call(
            &app,
            test::TestRequest::get().uri("/api/images/../../etc/passwd"),
        )
        .await,
        404,
        "",
    );
    assert_error(
        call(&app, test::TestRequest::get().uri("/api/images/-1")).await,
        404,
        "no gallery image",
    );

    let (s, body) = call(&app, test::TestRequest::get().uri("/healthz")).await;
    assert_eq!((s.as_u16(), body["status"].as_str()), (200, Some("ok")));
    let (s, _) = call(&app, image_form("/api/search", full)).await;
    assert_eq!(s, 200);
}

#[actix_web::test]
async fn serves_gallery_images_and_thumbnails() {
    let h = default_harness();
    let app = service!(h);
    let resp = test::call_service(
        &app,
        test::TestRequest::get().uri("/api/images/2").to_request(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-type").unwrap(), "image/png");
    let body = test::read_body(resp).await;
    assert_eq!(
        body.as_ref(),
        std::fs::read(h.dir.path().join("blue.png")).unwrap()
    );

    let resp = test::call_service(
        &app,
        test::TestRequest::get()
            .uri("/api/images/2/thumb")
            .to_request(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-type").unwrap(), "image/jpeg");
    let thumb = image::load_from_memory(&test::read_body(resp).await).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (96, 72));

    // A file deleted behind the server's back is a clean 404, not a 500.
    std::fs::remove_file(h.dir.path().join("green.png")).unwrap();
    assert_error(
        call(&app, test::TestRequest::get().uri("/api/images/1")).await,
        404,
        "no longer available",
    );
}

#[actix_web::test]
async fn added_images_are_stored_searchable_and_deduplicated() {
    let h = default_harness();
    let app = service!(h);
    let purple = png([150, 20, 200], 32, 32);
    let req = multipart_req(
        "/api/images",
        vec![
            Field::new("image", purple.clone()).filename("p.png"),
            Field::new("label", "  purple "),
        ],
    );
    let (s, body) = call(&app, req).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["id"], 4);
    assert_eq!(body["duplicate"], false);
    assert_eq!(body["label"], "purple");
    let sha = sha256_hex(&purple);
    let stored = h
        .dir
        .path()
        .join("uploads")
        .join(&sha[..2])
        .join(format!("{sha}.png"));
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        purple,
        "stored content-addressed under the data dir"
    );
    assert_eq!(h.gallery.item(4).unwrap().unwrap().path, stored);

    let (_, found) = call(
        &app,
        image_form("/api/search?k=1", png([150, 20, 200], 20, 20)),
    )
    .await;
    assert_eq!(found["results"][0]["id"], 4);
    assert_eq!(found["results"][0]["label"], "purple");
    let resp = test::call_service(
        &app,
        test::TestRequest::get().uri("/api/images/4").to_request(),
    )
    .await;
    assert_eq!(test::read_body(resp).await.as_ref(), purple.as_slice());

    let (s, again) = call(
        &app,
        multipart_req("/api/images", vec![Field::new("image", purple)]),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        (again["id"].as_u64(), again["duplicate"].as_bool()),
        (Some(4), Some(true))
    );
    assert_eq!(h.gallery.len().unwrap(), 5);

    assert_error(
        call(
            &app,
            multipart_req(
                "/api/images",
                vec![
                    Field::new("image", png([9, 9, 9], 9, 9)),
                    Field::new("label", "a\nb"),
                ],
            ),
        )
        .await,
        400,
        "control characters",
    );
    assert_error(
        call(
            &app,
            multipart_req(
                "/api/images",
                vec![Field::new("image", png([9, 9, 9], 2, 2))],
            ),
        )
        .await,
        422,
        "at least 8×8",
    );
    assert_eq!(h.gallery.len().unwrap(), 5, "rejected uploads add nothing");
}

#[actix_web::test]
async fn writes_need_the_api_key_and_read_only_forbids_them() {
    let h = harness(
        Settings {
            api_key: Some("s3cret".into()),
            ..Settings::default()
        },
        Duration::ZERO,
        BatchConfig::default(),
    );
    let app = service!(h);
    let add = |color: [u8; 3], header: Option<(&'static str, &'static str)>| {
        let mut r = multipart_req("/api/images", vec![Field::new("image", png(color, 16, 16))]);
        if let Some(hd) = header {
            r = r.insert_header(hd);
        }
        r
    };
    assert_error(
        call(&app, add([1, 1, 1], None)).await,
        401,
        "needs an API key",
    );
    assert_error(
        call(&app, add([1, 1, 1], Some(("Authorization", "Bearer nope")))).await,
        401,
        "wrong",
    );
    assert_error(
        call(&app, add([1, 1, 1], Some(("X-Api-Key", "s3cret!")))).await,
        401,
        "wrong",
    );
    assert_eq!(h.gallery.len().unwrap(), 4);
    let (s, _) = call(
        &app,
        add([1, 1, 1], Some(("Authorization", "Bearer s3cret"))),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(&app, add([2, 2, 2], Some(("X-Api-Key", "s3cret")))).await;
    assert_eq!(s, 200);
    assert_eq!(h.gallery.len().unwrap(), 6);
    // Searching stays open.
    let (s, _) = call(&app, image_form("/api/search", png([1, 1, 1], 16, 16))).await;
    assert_eq!(s, 200);

    let ro = harness(
        Settings {
            read_only: true,
            ..Settings::default()
        },
        Duration::ZERO,
        BatchConfig::default(),
    );
    let app = service!(ro);
    assert_error(call(&app, add([1, 1, 1], None)).await, 403, "read-only");
    let (_, cfg) = call(&app, test::TestRequest::get().uri("/api/config")).await;
    assert_eq!(cfg["read_only"], true);
}

#[actix_web::test]
async fn metrics_count_requests_by_route_and_batches() {
    let h = default_harness();
    let app = service!(h);
    call(&app, image_form("/api/search", png([220, 20, 20], 16, 16))).await;
    call(&app, image_form("/api/search", png([220, 20, 20], 1, 1))).await;
    call(&app, test::TestRequest::get().uri("/api/images/77")).await;
    let resp =
        test::call_service(&app, test::TestRequest::get().uri("/metrics").to_request()).await;
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
    for needle in [
        "deep_metric_http_requests_total{route=\"/api/search\",method=\"POST\",status=\"200\"} 1",
        "deep_metric_http_requests_total{route=\"/api/search\",method=\"POST\",status=\"422\"} 1",
        "deep_metric_http_requests_total{route=\"/api/images/{id}\",method=\"GET\",status=\"404\"} 1",
        "deep_metric_http_request_duration_seconds_count{route=\"/api/search\"} 2",
        "deep_metric_embed_batch_size_count 1",
        "deep_metric_gallery_items 4",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

#[actix_web::test]
async fn concurrent_queries_are_batched_and_each_gets_its_own_answer() {
    // A slow model and a generous wait make 24 simultaneous queries share batches.
    let batch = BatchConfig {
        max_batch: 8,
        batch_wait: Duration::from_millis(30),
        queue_capacity: 64,
    };
    let h = harness(Settings::default(), Duration::from_millis(20), batch);
    let app = service!(h);
    let queries: Vec<(usize, Vec<u8>)> = (0..24)
        .map(|i| {
            (
                i % COLORS.len(),
                png(COLORS[i % COLORS.len()].1, 16 + i as u32, 16),
            )
        })
        .collect();
    let futures = queries.iter().map(|(want, bytes)| {
        let app = &app;
        async move {
            let (s, body) = call(app, image_form("/api/search?k=1", bytes.clone())).await;
            (s, body, *want)
        }
    });
    for (s, body, want) in futures_util::future::join_all(futures).await {
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["results"][0]["id"], want as u64, "{body}");
    }
    let sizes = h.embedder.batch_sizes();
    assert_eq!(sizes.iter().sum::<usize>(), 24);
    assert!(
        sizes.iter().all(|&s| s <= 8),
        "max_batch respected: {sizes:?}"
    );
    assert!(
        sizes.len() < 24 && sizes.iter().any(|&s| s > 1),
        "queries were batched: {sizes:?}"
    );
}

#[actix_web::test]
async fn a_lone_query_does_not_wait_for_company() {
    // With nobody else arriving, the batch wait must not be paid: 2 s would show.
    let batch = BatchConfig {
        max_batch: 8,
        batch_wait: Duration::from_secs(2),
        queue_capacity: 8,
    };
    let h = harness(Settings::default(), Duration::ZERO, batch);
    let app = service!(h);
    for _ in 0..3 {
        let start = std::time::Instant::now();
        let (s, body) = call(
            &app,
            image_form("/api/search?k=1", png([20, 20, 220], 16, 16)),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        assert!(
            start.elapsed() < Duration::from_millis(1000),
            "took {:?}",
            start.elapsed()
        );
    }
    assert_eq!(h.embedder.batch_sizes(), vec![1, 1, 1]);
}

#[actix_web::test]
async fn a_full_queue_answers_503() {
    let batch = BatchConfig {
        max_batch: 1,
        batch_wait: Duration::ZERO,
        queue_capacity: 1,
    };
    let h = harness(Settings::default(), Duration::from_millis(100), batch);
    let app = service!(h);
    let futures = (0..6).map(|_| call(&app, image_form("/api/search", png([220, 20, 20], 16, 16))));
    let statuses: Vec<u16> = futures_util::future::join_all(futures)
        .await
        .into_iter()
        .map(|(s, _)| s.as_u16())
        .collect();
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
}

/// Over a real socket: a client that sends a too-large body before reading still gets the
/// JSON 413 (the server drains the body), and the blocking client handles keep-alive.
#[::core::prelude::v1::test]
fn oversized_upload_over_a_real_socket_gets_413() {
    let h = harness(
        Settings {
            max_upload_bytes: 100_000,
            ..Settings::default()
        },
        Duration::ZERO,
        BatchConfig::default(),
    );
    let state = h.state.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = actix_web::HttpServer::new(move || app(state.clone()))
                .workers(1)
                .bind("127.0.0.1:0")
                .unwrap();
            tx.send((server.addrs()[0], ())).unwrap();
            server.run().await.unwrap();
        })
    });
    let (addr, ()) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut client = search_server::client::Client::new(&addr.to_string()).unwrap();
    let big = vec![7u8; 300_000];
    let r = client
        .request(
            "POST",
            "/api/search",
            &[("Content-Type", "image/png")],
            &big,
        )
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("100 KB"));
    let r = client
        .post_form(
            "/api/search",
            &[search_server::client::Part {
                name: "image",
                filename: Some("big.png"),
                content_type: Some("image/png"),
                data: &big,
            }],
            &[],
        )
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    let r = client
        .post_image("/api/search?k=1", &png([30, 40, 210], 20, 20))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["results"][0]["label"], "blue");
    assert_eq!(client.get("/healthz").unwrap().json()["status"], "ok");
}

/// Issue 12 (4): concurrent requests for a thumbnail not made yet decode the file once;
/// the rest wait for that one (single flight), and later ones come from the cache.
#[actix_web::test]
async fn concurrent_thumbnail_requests_decode_once() {
    let h = default_harness();
    let app = service!(h);
    let reqs = (0..16).map(|_| {
        test::call_service(
            &app,
            test::TestRequest::get()
                .uri("/api/images/3/thumb")
                .to_request(),
        )
    });
    let responses = futures_util::future::join_all(reqs).await;
    let mut bodies = Vec::new();
    for r in responses {
        assert_eq!(r.status(), 200);
        bodies.push(test::read_body(r).await);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(h.state.thumbs.decodes(), 1, "one decode for 16 requests");
    assert_eq!(h.state.thumbs.in_flight(), 0);
    // And never again, even without the source file.
    std::fs::remove_file(h.dir.path().join("yellow.png")).unwrap();
    let (s, _) = call(&app, test::TestRequest::get().uri("/api/images/3/thumb")).await;
    assert_eq!(s, 200);
    assert_eq!(h.state.thumbs.decodes(), 1);
}

/// Issue 12 (3): an added image's thumbnail is made from the decode that embedded it and
/// stored, so serving it never decodes the upload.
#[actix_web::test]
async fn added_images_get_their_thumbnail_at_add_time() {
    let h = default_harness();
    let app = service!(h);
    let bytes = png([10, 120, 240], 300, 150);
    let (s, body) = call(&app, image_form("/api/images", bytes.clone())).await;
    assert_eq!(s, 200, "{body}");
    let id = body["id"].as_u64().unwrap();
    let stored = h
        .dir
        .path()
        .join("thumbs")
        .join(format!("{}-96.jpg", sha256_hex(&bytes)));
    assert!(stored.is_file(), "thumbnail stored at add time");
    let resp = test::call_service(
        &app,
        test::TestRequest::get()
            .uri(&format!("/api/images/{id}/thumb"))
            .to_request(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let thumb = image::load_from_memory(&test::read_body(resp).await).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (96, 48));
    assert_eq!(h.state.thumbs.decodes(), 0, "no decode to serve it");
}

/// Issue 12 (3): decoding waits for the memory budget, then answers 503; the budget is
/// whole again afterwards (nothing leaks on the error paths).
#[actix_web::test]
async fn decode_budget_waits_then_503() {
    let budget = search_server::budget::DecodeBudget::new(8 << 20, Duration::from_millis(100));
    let h = harness(
        Settings {
            budget: budget.clone(),
            ..Settings::default()
        },
        Duration::ZERO,
        BatchConfig::default(),
    );
    let app = service!(h);
    let held = budget.acquire(8 << 20).await.unwrap();
    let t = std::time::Instant::now();
    assert_error(
        call(&app, image_form("/api/search", png([200, 0, 0], 64, 64))).await,
        503,
        "memory budget",
    );
    assert!(t.elapsed() >= Duration::from_millis(90));
    assert_error(
        call(&app, test::TestRequest::get().uri("/api/images/0/thumb")).await,
        503,
        "retry",
    );
    drop(held);
    let (s, body) = call(&app, image_form("/api/search", png([200, 0, 0], 64, 64))).await;
    assert_eq!(s, 200, "{body}");
    // A refused image (from its header) never waits for or holds the budget.
    let held = budget.acquire(8 << 20).await.unwrap();
    assert_error(
        call(&app, image_form("/api/search", png([200, 0, 0], 2, 2))).await,
        422,
        "at least",
    );
    drop(held);
    let (s, _) = call(&app, test::TestRequest::get().uri("/api/images/0/thumb")).await;
    assert_eq!(s, 200);
    assert_eq!(budget.available_bytes(), 8 << 20);
}

/// Issue 12 (5): the smaller defects, through the HTTP layer.
#[actix_web::test]
async fn truncated_jpegs_auth_scheme_paths_and_method_labels() {
    let h = harness(
        Settings {
            api_key: Some("s3cret".into()),
            ..Settings::default()
        },
        Duration::ZERO,
        BatchConfig::default(),
    );
    let app = service!(h);
    // A JPEG cut to 10-50 % of its length: 422, not a 200 with a grey-padded image.
    let img = RgbImage::from_fn(160, 120, |x, y| Rgb([x as u8, y as u8, 60]));
    let jpeg = encode(&img, ImageFormat::Jpeg);
    for pct in [10, 25, 50] {
        let cut = jpeg[..jpeg.len() * pct / 100].to_vec();
        let got = call(&app, image_form("/api/search", cut)).await;
        assert_eq!(got.0, 422, "{pct}%: {}", got.1);
    }
    // Authorization schemes are case-insensitive.
    let r = multipart_req(
        "/api/images",
        vec![Field::new("image", png([1, 2, 3], 16, 16))],
    )
    .insert_header(("Authorization", "BEARER s3cret"));
    let (s, body) = call(&app, r).await;
    assert_eq!(s, 200, "{body}");
    // Results name files without the server's folders.
    let (_, body) = call(
        &app,
        image_form("/api/search?k=5", png([220, 20, 20], 16, 16)),
    )
    .await;
    for r in body["results"].as_array().unwrap() {
        let p = r["path"].as_str().unwrap();
        assert!(
            !p.starts_with('/') && !p.contains(h.dir.path().to_str().unwrap()),
            "{p}"
        );
    }
    assert_eq!(body["results"][0]["path"], "red.png");
    // Invented methods share one metrics label.
    for m in ["PURGE", "FOO", "BAR1"] {
        let req = test::TestRequest::default()
            .method(actix_web::http::Method::from_bytes(m.as_bytes()).unwrap())
            .uri("/");
        let _ = call(&app, req).await;
    }
    let resp =
        test::call_service(&app, test::TestRequest::get().uri("/metrics").to_request()).await;
    let text = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
    assert!(text.contains("method=\"OTHER\""), "{text}");
    for m in ["PURGE", "FOO", "BAR1"] {
        assert!(!text.contains(&format!("method=\"{m}\"")), "{text}");
    }
}

/// Issue 12 (4): a GIF of a few bytes whose canvas is 10 MP is charged for its canvas (what
/// the decoder allocates), not its file size; TIFF and PNM uploads are read.
#[actix_web::test]
async fn budget_charges_a_gif_for_its_canvas_and_new_formats_are_read() {
    let budget = search_server::budget::DecodeBudget::new(100 << 20, Duration::from_millis(100));
    let h = harness(
        Settings {
            budget: budget.clone(),
            ..Settings::default()
        },
        Duration::ZERO,
        BatchConfig::default(),
    );
    let app = service!(h);
    let gif = intake::testing::gif_with_canvas(4000, 2500);
    assert!(gif.len() < 100);
    let held = budget.acquire(40 << 20).await.unwrap();
    // 10 MP × (4 bytes RGBA + 3 bytes RGB) = 70 MB > the 60 MiB left.
    assert_error(
        call(&app, image_form("/api/search", gif.clone())).await,
        503,
        "memory budget",
    );
    let (s, _) = call(&app, image_form("/api/search", png([0, 0, 200], 64, 64))).await;
    assert_eq!(s, 200, "small images still fit beside it");
    drop(held);
    let (s, body) = call(&app, image_form("/api/search", gif)).await;
    assert_eq!(s, 200, "{body}");
    for format in [ImageFormat::Tiff, ImageFormat::Pnm] {
        let bytes = encode(&RgbImage::from_pixel(40, 30, Rgb([30, 40, 210])), format);
        let (s, body) = call(&app, image_form("/api/search?k=1", bytes)).await;
        assert_eq!(s, 200, "{format:?}: {body}");
        assert_eq!(body["results"][0]["label"], "blue", "{format:?}");
    }
}

fn get_req(uri: &str) -> test::TestRequest {
    test::TestRequest::get().uri(uri)
}

fn url(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn ids(body: &serde_json::Value, key: &str) -> Vec<u64> {
    body[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {body}"))
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect()
}

#[actix_web::test]
async fn batch_add_with_metadata_then_filter_similar_list_and_delete() {
    let h = harness(
        Settings {
            api_key: Some("k1".into()),
            ..Settings::default()
        },
        Duration::ZERO,
        BatchConfig::default(),
    );
    let app = service!(h);
    // Three images, labels and metadata paired by order; the third has none of either.
    let mut req = multipart_req(
        "/api/images",
        vec![
            Field::new("image", png([200, 30, 30], 32, 32)).filename("a.png"),
            Field::new("image", png([190, 40, 40], 32, 32)).filename("b.png"),
            Field::new("image", png([30, 30, 200], 32, 32)).filename("c.png"),
            Field::new("label", "shoe"),
            Field::new("label", "shoe"),
            Field::new("label", ""),
            Field::new("metadata", r#"{"color": "red", "price": 20}"#),
            Field::new("metadata", r#"{"color": "red", "price": 80}"#),
            Field::new("metadata", ""),
        ],
    );
    req = req.insert_header(("X-Api-Key", "k1"));
    let (s, body) = call(&app, req).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(ids(&body, "items"), vec![4, 5, 6]);
    assert_eq!(body["items"][1]["metadata"]["price"], 80);
    assert!(body["items"][2]["label"].is_null() && body["items"][2]["metadata"].is_null());
    assert_eq!(h.gallery.len().unwrap(), 7);

    // GET as JSON returns the record with its metadata; without Accept: JSON, the file.
    let (s, rec) = call(
        &app,
        get_req("/api/images/5").insert_header(("Accept", "application/json")),
    )
    .await;
    assert_eq!(
        (s.as_u16(), rec["metadata"]["color"].as_str()),
        (200, Some("red")),
        "{rec}"
    );
    let file = test::call_service(&app, get_req("/api/images/5").to_request()).await;
    assert_eq!(file.headers().get("content-type").unwrap(), "image/png");

    // Filtered search: URL parameter or form field; results carry metadata.
    let q = png([200, 30, 30], 16, 16);
    let f = url(r#"{"label":"shoe","price":{"gte":10,"lt":50}}"#);
    let (s, r) = call(
        &app,
        image_form(&format!("/api/search?k=5&filter={f}"), q.clone()),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(ids(&r, "results"), vec![4]);
    assert_eq!(r["results"][0]["metadata"]["price"], 20);
    let form_filter = multipart_req(
        "/api/search?k=5",
        vec![
            Field::new("image", q.clone()).filename("q.png"),
            Field::new("filter", r#"{"color":["red","green"]}"#),
        ],
    );
    let (_, r) = call(&app, form_filter).await;
    assert_eq!(ids(&r, "results"), vec![4, 5]);

    // More like this: the item itself left out, the filter applies.
    let (s, r) = call(&app, get_req("/api/images/4/similar?k=2")).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(ids(&r, "results")[0], 5);
    assert!(!ids(&r, "results").contains(&4));
    let (_, r) = call(
        &app,
        get_req(&format!(
            "/api/images/4/similar?k=3&filter={}",
            url(r#"{"label":"red"}"#)
        )),
    )
    .await;
    assert_eq!(ids(&r, "results"), vec![0]);

    // Paging.
    let (s, page) = call(&app, get_req("/api/images?offset=2&limit=3")).await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(
        (page["total"].as_u64(), ids(&page, "items")),
        (Some(7), vec![2, 3, 4])
    );
    let (_, page) = call(
        &app,
        get_req(&format!(
            "/api/images?filter={}",
            url(r#"{"label":"shoe"}"#)
        )),
    )
    .await;
    assert_eq!(ids(&page, "items"), vec![4, 5]);

    // Delete: needs the key; 200, then 404; gone from search, similar, listing and GET.
    assert_error(
        call(&app, test::TestRequest::delete().uri("/api/images/4")).await,
        401,
        "API key",
    );
    let del = || {
        test::TestRequest::delete()
            .uri("/api/images/4")
            .insert_header(("X-Api-Key", "k1"))
    };
    let (s, d) = call(&app, del()).await;
    assert_eq!(
        (s.as_u16(), d["deleted"].as_bool()),
        (200, Some(true)),
        "{d}"
    );
    assert_error(call(&app, del()).await, 404, "no gallery image with id '4'");
    let (_, r) = call(&app, image_form("/api/search?k=10", q.clone())).await;
    assert!(!ids(&r, "results").contains(&4));
    assert_error(call(&app, get_req("/api/images/4")).await, 404, "id '4'");
    assert_error(
        call(&app, get_req("/api/images/4/similar")).await,
        404,
        "id '4'",
    );
    let (_, page) = call(&app, get_req("/api/images?limit=100")).await;
    assert_eq!(page["total"], 6);
    let stored = h.dir.path().join("uploads");
    let sha = sha256_hex(&png([200, 30, 30], 32, 32));
    assert!(
        !stored.join(&sha[..2]).join(format!("{sha}.png")).exists(),
        "the upload's file goes too"
    );
    assert_eq!(h.gallery.len().unwrap(), 6);
}

#[actix_web::test]
async fn bad_filters_metadata_batches_and_ids_get_clear_4xx() {
    let h = default_harness();
    let app = service!(h);
    let q = || png([200, 30, 30], 16, 16);
    for (filter, status, needle) in [
        ("{label:", 400, "not valid JSON"),
        (r#"["shoe"]"#, 400, "JSON object"),
        (r#"{"price":{"gte":"ten"}}"#, 400, "'gte' must be a number"),
        (r#"{"price":{"around":3}}"#, 400, "unknown range operator"),
        (r#"{"color":[]}"#, 400, "1 to"),
        (r#"{"color":{"gte":[1]}}"#, 400, "must be a number"),
    ] {
        let uri = format!("/api/search?filter={}", url(filter));
        assert_error(call(&app, image_form(&uri, q())).await, status, needle);
        let uri = format!("/api/images/0/similar?filter={}", url(filter));
        assert_error(call(&app, get_req(&uri)).await, status, needle);
        let uri = format!("/api/images?filter={}", url(filter));
        assert_error(call(&app, get_req(&uri)).await, status, needle);
    }
    let twice = multipart_req(
        "/api/search?filter=%7B%7D",
        vec![
            Field::new("image", q()),
            Field::new("filter", r#"{"label":"x"}"#),
        ],
    );
    let (s, _) = call(&app, twice).await;
    assert_eq!(s, 200, "an empty URL filter counts as none");
    let twice = multipart_req(
        &format!("/api/search?filter={}", url(r#"{"label":"y"}"#)),
        vec![
            Field::new("image", q()),
            Field::new("filter", r#"{"label":"x"}"#),
        ],
    );
    assert_error(call(&app, twice).await, 400, "sent twice");
    assert_error(
        call(&app, get_req("/api/images?limit=-1")).await,
        400,
        "limit",
    );
    assert_error(
        call(&app, get_req("/api/images?offset=x")).await,
        400,
        "offset",
    );
    assert_error(
        call(&app, get_req("/api/images/x/similar")).await,
        404,
        "id 'x'",
    );
    assert_error(
        call(&app, get_req("/api/images/99/similar")).await,
        404,
        "id '99'",
    );
    assert_error(
        call(&app, get_req("/api/images/0/similar?k=0")).await,
        400,
        "k must be",
    );
    assert_error(
        call(&app, test::TestRequest::delete().uri("/api/images/99")).await,
        404,
        "id '99'",
    );
    assert_error(
        call(&app, test::TestRequest::delete().uri("/api/images/-1")).await,
        404,
        "id '-1'",
    );

    let add = |fields: Vec<Field<'static>>| multipart_req("/api/images", fields);
    let img = |c: u8| Field::new("image", png([c, 90, 90], 16, 16)).filename("x.png");
    let big = format!(
        r#"{{"d":"{}"}}"#,
        "x".repeat(indexer::filter::MAX_METADATA_BYTES)
    );
    for (fields, status, needle) in [
        (
            vec![img(1), Field::new("metadata", "[1]")],
            400,
            "JSON object",
        ),
        (
            vec![img(1), Field::new("metadata", "{")],
            400,
            "not valid JSON",
        ),
        (
            vec![img(1), Field::new("metadata", r#"{"label":"x"}"#)],
            400,
            "'label'",
        ),
        (vec![img(1), Field::new("metadata", big)], 413, "limit"),
        (
            vec![img(1), img(2), Field::new("label", "a")],
            400,
            "pair with images by order",
        ),
        (
            vec![
                img(1),
                img(2),
                Field::new("metadata", "{}"),
                Field::new("metadata", "{}"),
                Field::new("metadata", "{}"),
            ],
            400,
            "3 'metadata'",
        ),
        // All or nothing: the second image is broken, so the first is not added either.
        (
            vec![img(1), Field::new("image", b"not an image".to_vec())],
            422,
            "image 2 of 2",
        ),
        (
            vec![img(1), Field::new("filter", "{}")],
            400,
            "unexpected form field 'filter'",
        ),
    ] {
        assert_error(call(&app, add(fields)).await, status, needle);
    }
    assert_eq!(
        h.gallery.len().unwrap(),
        4,
        "no refused request added anything"
    );
}

#[actix_web::test]
async fn deletes_are_refused_on_a_read_only_server() {
    let h = harness(
        Settings {
            read_only: true,
            ..Settings::default()
        },
        Duration::ZERO,
        BatchConfig::default(),
    );
    let app = service!(h);
    assert_error(
        call(&app, test::TestRequest::delete().uri("/api/images/0")).await,
        403,
        "read-only",
    );
    assert_eq!(h.gallery.len().unwrap(), 4);
}
