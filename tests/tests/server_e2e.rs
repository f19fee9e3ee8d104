//! The real `search-server` binary with the real EfficientNet-Lite0 weights, as a user runs
//! it: index a folder, search, add, survive `kill -9`, refuse bad input, serve 32 clients.

mod server_support;

use search_server::client::{Client, Part};
use server_support::{make_gallery, server_binary, shape_png, weights, Server};

const CLASSES: [(&str, [u8; 3]); 3] = [
    ("red", [230, 30, 30]),
    ("blue", [30, 40, 230]),
    ("yellow", [240, 220, 30]),
];

fn form_image<'a>(bytes: &'a [u8]) -> Vec<Part<'a>> {
    vec![Part {
        name: "image",
        filename: Some("q.png"),
        content_type: Some("image/png"),
        data: bytes,
    }]
}

/// Asserts a 4xx JSON error and that the server still answers /healthz.
fn assert_4xx(
    c: &mut Client,
    what: &str,
    status: u16,
    send: impl FnOnce(&mut Client) -> std::io::Result<search_server::client::Response>,
) {
    let r = send(c).unwrap_or_else(|e| panic!("{what}: no response: {e}"));
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert!(
        r.json()["error"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: not a JSON error: {}",
        r.text()
    );
    assert_eq!(
        c.get("/healthz").unwrap().json()["status"],
        "ok",
        "after {what}"
    );
}

#[test]
fn search_add_crash_restart_and_bad_inputs() {
    let (Some(bin), Some(weights)) = (server_binary(), weights()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let gallery = tmp.path().join("gallery");
    let files = make_gallery(&gallery, &CLASSES, 2);
    let data = tmp.path().join("data");
    let w = weights.to_str().unwrap();
    let d = data.to_str().unwrap();
    let server = Server::start(
        &bin,
        &[
            "--data-dir",
            d,
            "--weights",
            w,
            "--gallery",
            gallery.to_str().unwrap(),
        ],
    );
    let mut c = server.client();
    let health = c.get("/healthz").unwrap().json();
    assert_eq!(health["gallery_items"], files.len(), "{health}");

    // A gallery image finds itself first, with cosine ≈ 1, and its label is its folder.
    let query = std::fs::read(&files[2]).unwrap();
    let r = c.post_image("/api/search?k=3", &query).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let top = &body["results"][0];
    assert_eq!(top["label"], "blue", "{body}");
    assert!(
        top["path"].as_str().unwrap().ends_with("blue/0.png"),
        "{body}"
    );
    assert!(top["score"].as_f64().unwrap() > 0.999, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), 3);
    // Its image and thumbnail are served.
    let img = c.get(top["url"].as_str().unwrap()).unwrap();
    assert_eq!((img.status, img.body.as_slice()), (200, query.as_slice()));
    let thumb = c.get(top["thumb_url"].as_str().unwrap()).unwrap();
    assert_eq!(thumb.header("content-type"), Some("image/jpeg"));
    assert!(image::load_from_memory(&thumb.body).unwrap().width() <= 256);

    // Bad inputs: each a JSON 4xx, the server keeps serving.
    let png = shape_png(1, [1, 2, 3], [200, 200, 200], 64);
    assert_4xx(&mut c, "empty body", 400, |c| {
        c.request("POST", "/api/search", &[("Content-Type", "image/png")], b"")
    });
    assert_4xx(&mut c, "HTML as image", 422, |c| {
        c.request(
            "POST",
            "/api/search",
            &[("Content-Type", "image/jpeg")],
            b"<html></html>",
        )
    });
    assert_4xx(&mut c, "text content type", 415, |c| {
        c.request(
            "POST",
            "/api/search",
            &[("Content-Type", "text/plain")],
            b"hi",
        )
    });
    assert_4xx(&mut c, "PDF", 422, |c| {
        c.post_form(
            "/api/search",
            &form_image(b"%PDF-1.5\n%\xb5\xb5\xb5\xb5\n1 0 obj"),
            &[],
        )
    });
    assert_4xx(&mut c, "truncated PNG", 422, |c| {
        c.post_form("/api/search", &form_image(&png[..png.len() / 2]), &[])
    });
    let jpeg = {
        let mut out = std::io::Cursor::new(Vec::new());
        image::load_from_memory(&png)
            .unwrap()
            .write_to(&mut out, image::ImageFormat::Jpeg)
            .unwrap();
        out.into_inner()
    };
    assert_4xx(&mut c, "truncated JPEG", 422, |c| {
        c.post_form("/api/search", &form_image(&jpeg[..jpeg.len() / 3]), &[])
    });
    assert_4xx(&mut c, "1x1 image", 422, |c| {
        c.post_form(
            "/api/search",
            &form_image(&shape_png(0, [0; 3], [9; 3], 1)),
            &[],
        )
    });
    let bomb = search_server::testing::png_bomb_header(100_000, 100_000);
    assert_4xx(&mut c, "bomb", 413, |c| {
        c.post_form("/api/search", &form_image(&bomb), &[])
    });
    let big = vec![0u8; 21_000_000];
    assert_4xx(&mut c, "oversized", 413, |c| {
        c.request(
            "POST",
            "/api/search",
            &[("Content-Type", "image/png")],
            &big,
        )
    });
    let wrong = [Part {
        name: "file",
        filename: Some("q.png"),
        content_type: None,
        data: &png,
    }];
    assert_4xx(&mut c, "wrong field", 400, |c| {
        c.post_form("/api/search", &wrong, &[])
    });
    assert_4xx(&mut c, "k=0", 400, |c| {
        c.post_form("/api/search?k=0", &form_image(&png), &[])
    });
    assert_4xx(&mut c, "k=abc", 400, |c| {
        c.post_form("/api/search?k=abc", &form_image(&png), &[])
    });
    let clamped = c
        .post_form("/api/search?k=1000000", &form_image(&png), &[])
        .unwrap();
    assert_eq!(
        (clamped.status, clamped.json()["k"].as_u64()),
        (200, Some(100))
    );
    assert_4xx(&mut c, "unknown id", 404, |c| c.get("/api/images/424242"));
    assert_4xx(&mut c, "traversal", 404, |c| {
        c.get("/api/images/..%2F..%2F..%2Fetc%2Fpasswd")
    });
    assert_4xx(&mut c, "traversal thumb", 404, |c| {
        c.get("/api/images/../../etc/passwd/thumb")
    });

    // Add an image: 200 means durable and searchable at once.
    let green = shape_png(2, [20, 200, 40], [250, 250, 250], 150);
    let parts = [
        Part {
            name: "image",
            filename: Some("g.png"),
            content_type: Some("image/png"),
            data: &green,
        },
        Part {
            name: "label",
            filename: None,
            content_type: None,
            data: b"green triangle",
        },
    ];
    let added = c.post_form("/api/images", &parts, &[]).unwrap();
    assert_eq!(added.status, 200, "{}", added.text());
    let green_id = added.json()["id"].as_u64().unwrap();
    let r = c.post_image("/api/search?k=1", &green).unwrap().json();
    assert_eq!(
        (
            r["results"][0]["id"].as_u64(),
            r["results"][0]["label"].as_str()
        ),
        (Some(green_id), Some("green triangle"))
    );

    // kill -9 right after the 200 of another add: it must survive.
    let purple = shape_png(3, [150, 30, 200], [20, 20, 20], 150);
    let parts = [
        Part {
            name: "image",
            filename: Some("p.png"),
            content_type: None,
            data: &purple,
        },
        Part {
            name: "label",
            filename: None,
            content_type: None,
            data: b"purple",
        },
    ];
    let added = c.post_form("/api/images", &parts, &[]).unwrap();
    assert_eq!(added.status, 200, "{}", added.text());
    let purple_id = added.json()["id"].as_u64().unwrap();
    server.kill9();

    let server = Server::start(&bin, &["--data-dir", d, "--weights", w]);
    let mut c = server.client();
    assert_eq!(
        c.get("/healthz").unwrap().json()["gallery_items"],
        files.len() + 2
    );
    for (bytes, id, label) in [
        (&purple, purple_id, "purple"),
        (&green, green_id, "green triangle"),
    ] {
        let r = c.post_image("/api/search?k=1", bytes).unwrap().json();
        assert_eq!(r["results"][0]["id"].as_u64(), Some(id), "{r}");
        assert_eq!(r["results"][0]["label"], label);
        let img = c.get(&format!("/api/images/{id}")).unwrap();
        assert_eq!(
            img.body, *bytes,
            "the stored upload is served after the crash"
        );
    }
    // The same bytes again are recognised, not added twice.
    let again = c
        .post_form("/api/images", &form_image(&purple), &[])
        .unwrap()
        .json();
    assert_eq!(
        (again["id"].as_u64(), again["duplicate"].as_bool()),
        (Some(purple_id), Some(true))
    );
}

#[test]
fn concurrent_clients_auth_metrics_and_graceful_shutdown() {
    let (Some(bin), Some(weights)) = (server_binary(), weights()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let gallery = tmp.path().join("gallery");
    let files = make_gallery(&gallery, &CLASSES, 2);
    let data = tmp.path().join("data");
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--gallery",
        gallery.to_str().unwrap(),
        "--api-key",
        "k3y",
        "--batch-wait-ms",
        "20",
    ];
    let server = Server::start(&bin, &args);
    let queries: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();

    // 32 concurrent clients, each searching with a gallery image: each gets its own image first.
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let addr = server.addr.clone();
            let file = &files[i % files.len()];
            let class = file
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap();
            let want = format!("{class}/{}", file.file_name().unwrap().to_str().unwrap());
            let q = queries[i % queries.len()].clone();
            std::thread::spawn(move || {
                let mut c = Client::new(&addr).unwrap();
                let r = c.post_image("/api/search?k=2", &q).unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                let path = r.json()["results"][0]["path"].as_str().unwrap().to_string();
                assert!(path.ends_with(&want), "{path} is not {want}");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client failed");
    }
    let mut c = server.client();
    let metrics = c.get("/metrics").unwrap().text();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("deep_metric_http_requests_total{route=\"/api/search\",method=\"POST\",status=\"200\"}"))
        .unwrap_or_else(|| panic!("no search counter in\n{metrics}"));
    assert!(line.ends_with(" 32"), "{line}");
    let batches: f64 = metrics
        .lines()
        .find(|l| l.starts_with("deep_metric_embed_batch_size_count"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert!(
        batches < 32.0,
        "32 concurrent queries should share batches, got {batches} batches"
    );

    // Writes need the key.
    let img = shape_png(0, [9, 200, 200], [0, 0, 0], 100);
    let r = c.post_form("/api/images", &form_image(&img), &[]).unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    let r = c
        .post_form(
            "/api/images",
            &form_image(&img),
            &[("Authorization", "Bearer k3y")],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // SIGTERM: clean exit (status 0) and the index committed, so a read-only restart sees it.
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
    let ro = Server::start(
        &bin,
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap(),
            "--read-only",
        ],
    );
    let mut c = ro.client();
    assert_eq!(
        c.get("/healthz").unwrap().json()["gallery_items"],
        files.len() + 1
    );
    let r = c
        .post_form(
            "/api/images",
            &form_image(&shape_png(1, [1, 1, 1], [2, 2, 2], 64)),
            &[],
        )
        .unwrap();
    assert_eq!(r.status, 403);
}

#[test]
fn missing_weights_exit_2_with_instructions() {
    let Some(bin) = server_binary() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let out = std::process::Command::new(bin)
        .args([
            "--data-dir",
            tmp.path().to_str().unwrap(),
            "--bind",
            "127.0.0.1:0",
        ])
        .env_remove("DEEP_METRIC_WEIGHTS")
        .env("HF_HUB_CACHE", tmp.path().join("empty-cache"))
        // A hub that cannot be reached (a port nothing listens on), never huggingface.co.
        .env("HF_ENDPOINT", &endpoint)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--weights") && err.contains("DEEP_METRIC_WEIGHTS") && err.contains(&endpoint),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Runs the server expecting it to exit by itself within two minutes (it is killed and the
/// test fails otherwise); returns the exit code and stderr.
fn run_to_exit(bin: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(bin)
        .args(args)
        .args(["--bind", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > std::time::Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = status.unwrap_or_else(|| panic!("the server kept running; log:\n{err}"));
    (status.code(), err)
}

/// Every file under `dir` with its size, except lock files (their content is the pid).
fn tree(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name() != "LOCK" {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, e.metadata().unwrap().len()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn second_server_refused_and_no_restart_over_a_missing_manifest() {
    let (Some(bin), Some(weights)) = (server_binary(), weights()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let gallery = tmp.path().join("gallery");
    let files = make_gallery(&gallery, &CLASSES, 1);
    let data = tmp.path().join("data");
    let (w, d, g) = (
        weights.to_str().unwrap(),
        data.to_str().unwrap(),
        gallery.to_str().unwrap(),
    );
    let server = Server::start(&bin, &["--data-dir", d, "--weights", w, "--gallery", g]);
    let mut c = server.client();
    let upload = shape_png(2, [20, 200, 60], [250, 250, 250], 140);
    let r = c
        .post_form("/api/images", &form_image(&upload), &[])
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // A second server on the same data directory: refused at start-up, exit status 2.
    let (code, err) = run_to_exit(&bin, &["--data-dir", d, "--weights", w]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("already in use") && err.contains("--data-dir"),
        "{err}"
    );
    assert_eq!(
        c.get("/healthz").unwrap().json()["gallery_items"],
        files.len() + 1,
        "the first server is unaffected"
    );
    server.kill9(); // the upload lives only in the WAL

    // Without its manifest the index must not be replaced by a new, empty one.
    std::fs::remove_file(data.join("index/manifest.json")).unwrap();
    let before = tree(&data);
    assert!(before.iter().any(|(f, _)| f.starts_with("uploads/")));
    let (code, err) = run_to_exit(&bin, &["--data-dir", d, "--weights", w, "--gallery", g]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("no manifest.json") && err.contains("wal.g") && err.contains("vectors.g"),
        "{err}"
    );
    assert!(!err.contains("creating a new index"), "{err}");
    assert_eq!(tree(&data), before, "every file is still there, unchanged");
}
