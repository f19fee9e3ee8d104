//! The remote store (`--store postgres://…`) against a real PostgreSQL + pgvector, as
//! `.ci/run` starts it (`scripts/pg-engine.sh`): the indexer's build / add / query / delete
//! / info / bench, and the search server's guarantees on it — uploads committed before the
//! 200, deletes visible at once, filters, a model mismatch refused, and the engine
//! restarted mid-run (503, then recovery without restarting the server).
//!
//! Needs `DEEP_METRIC_TEST_PG` (the engine's URL) and `../shared` (real weights); skips with
//! a message without them. `DEEP_METRIC_TEST_PG_CTL` names the script that stops and starts
//! the engine (default: `scripts/pg-engine.sh`, with the same environment).

mod server_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::{bin, lite0_weights, make_shapes_dataset, ok, run};
use search_server::client::{Client, Part};
use server_support::{make_gallery, server_binary, shape_png, Server};

/// The tests share one engine, and one of them restarts it: one at a time.
static ENGINE: Mutex<()> = Mutex::new(());

const KEY: &str = "s3cret";

/// The engine's URL, or `None` (with a message) when the tests should skip.
fn engine() -> Option<String> {
    match std::env::var("DEEP_METRIC_TEST_PG") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            eprintln!(
                "skipping: DEEP_METRIC_TEST_PG is not set (.ci/run starts PostgreSQL + pgvector with \
                 scripts/pg-engine.sh and sets it)"
            );
            None
        }
    }
}

/// `url` with our collection parameters.
fn collection(url: &str, name: &str, shards: usize) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!(
        "{url}{sep}collection={name}_{}&shards={shards}",
        std::process::id()
    )
}

/// Stops or starts the engine with its control script.
fn engine_ctl(action: &str) {
    let script = std::env::var("DEEP_METRIC_TEST_PG_CTL").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-engine.sh"),
        PathBuf::from,
    );
    ok(run(Command::new(&script).arg(action)));
}

fn indexer(args: &[&str]) -> std::process::Output {
    run(Command::new(bin("indexer")).args(args))
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Drops the test's collection however the test ends.
struct Dropped(String);

impl Drop for Dropped {
    fn drop(&mut self) {
        let _ = indexer(&["drop", "--store", &self.0]);
    }
}

/// `(id, label)` of each result row `indexer query` prints.
fn query_rows(out: &str) -> Vec<(u64, String)> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first()?.parse::<u64>().ok()?;
            let id = f.get(1)?.parse().ok()?;
            Some((id, f.get(4)?.to_string()))
        })
        .collect()
}

#[test]
fn indexer_builds_adds_queries_deletes_and_benchmarks_on_the_engine() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (Some(url), Some(weights)) = (engine(), lite0_weights()) else {
        return;
    };
    let w = weights.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    make_shapes_dataset(&images, 3, 4, 64);
    let store = collection(&url, "e2e_cli", 3);
    let _cleanup = Dropped(store.clone());

    let out = ok(indexer(&[
        "build",
        "--model",
        "pretrained:efficientnet-lite0",
        "--weights",
        w,
        "--images",
        images.to_str().unwrap(),
        "--store",
        &store,
    ]));
    assert!(
        stdout(&out).contains("indexed 12 images"),
        "{}",
        stdout(&out)
    );
    let info = stdout(&ok(indexer(&["info", "--store", &store])));
    assert!(
        info.contains("12 in 3 hash partitions") && info.contains("efficientnet"),
        "{info}"
    );
    // A second build into the same collection is refused, before embedding anything.
    let again = indexer(&[
        "build",
        "--model",
        "pretrained:efficientnet-lite0",
        "--weights",
        w,
        "--images",
        images.to_str().unwrap(),
        "--store",
        &store,
    ]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    // Query by a gallery image: itself first (same label, distance 0), the model recorded
    // in the collection (no --model).
    let q = images.join("class_01/img_002.png");
    let out = stdout(&ok(indexer(&[
        "query",
        "--store",
        &store,
        q.to_str().unwrap(),
        "-k",
        "4",
    ])));
    let rows = query_rows(&out);
    assert_eq!(rows.len(), 4, "{out}");
    assert_eq!(rows[0].1, "class_01", "{out}");
    let first_id = rows[0].0;

    // Add two new images with metadata; filter on it.
    let new = tmp.path().join("new");
    std::fs::create_dir_all(&new).unwrap();
    std::fs::write(
        new.join("cheap.png"),
        shape_png(2, [20, 200, 40], [250; 3], 96),
    )
    .unwrap();
    std::fs::write(
        new.join("dear.png"),
        shape_png(3, [150, 30, 200], [20; 3], 96),
    )
    .unwrap();
    std::fs::write(
        new.join("meta.jsonl"),
        "{\"path\": \"cheap.png\", \"metadata\": {\"price\": 25, \"tags\": [\"sale\", \"green\"]}}\n\
         {\"path\": \"dear.png\", \"metadata\": {\"price\": 70, \"tags\": [\"new\"]}}\n",
    )
    .unwrap();
    let meta = new.join("meta.jsonl");
    let out = stdout(&ok(indexer(&[
        "add",
        "--store",
        &store,
        "--metadata",
        meta.to_str().unwrap(),
        new.to_str().unwrap(),
    ])));
    assert!(
        out.contains("added 2 images") && out.contains("now 14 items"),
        "{out}"
    );
    let dear = new.join("dear.png");
    for (filter, expect) in [
        (r#"{"price": {"lt": 50}}"#, "cheap.png"),
        (r#"{"tags": "new"}"#, "dear.png"),
        (
            r#"{"tags": ["sale", "other"], "price": {"gte": 25}}"#,
            "cheap.png",
        ),
    ] {
        let out = stdout(&ok(indexer(&[
            "query",
            "--store",
            &store,
            dear.to_str().unwrap(),
            "-k",
            "5",
            "--filter",
            filter,
        ])));
        let lines: Vec<&str> = out.lines().filter(|l| l.contains(".png")).collect();
        assert_eq!(lines.len(), 1, "{filter}: {out}");
        assert!(lines[0].contains(expect), "{filter}: {out}");
    }
    // Exact search through the engine agrees with its HNSW on the top hit.
    let out = stdout(&ok(indexer(&[
        "query",
        "--store",
        &store,
        q.to_str().unwrap(),
        "-k",
        "1",
        "--exact",
    ])));
    assert_eq!(query_rows(&out)[0].0, first_id, "{out}");

    // Delete: gone from every search at once; deleting it again is an error naming it.
    let out = stdout(&ok(indexer(&[
        "delete",
        "--store",
        &store,
        &first_id.to_string(),
    ])));
    assert!(out.contains("now 13 items"), "{out}");
    let out = stdout(&ok(indexer(&[
        "query",
        "--store",
        &store,
        q.to_str().unwrap(),
        "-k",
        "13",
    ])));
    assert!(
        query_rows(&out).iter().all(|(id, _)| *id != first_id),
        "{out}"
    );
    let again = indexer(&["delete", "--store", &store, &first_id.to_string()]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains(&format!("no item with id {first_id}")),
        "{}",
        stderr(&again)
    );

    // The benchmark through the engine: exact Recall@K equal to the embedded store's.
    let bench_store = collection(&url, "e2e_bench", 2);
    let out = ok(indexer(&[
        "bench",
        "--model",
        "pretrained:efficientnet-lite0",
        "--weights",
        w,
        "--dataset",
        "folder",
        "--data",
        images.to_str().unwrap(),
        "--split",
        "all",
        "--ef-search",
        "16",
        "--store",
        &bench_store,
    ]));
    let text = stdout(&out);
    assert!(
        text.contains("Exact Recall@K through the engine equals the embedded store's"),
        "{text}"
    );
    assert!(text.contains("| remote |"), "{text}");
    // ... and its collection is gone afterwards.
    let gone = indexer(&["info", "--store", &bench_store]);
    assert!(stderr(&gone).contains("no collection"), "{}", stderr(&gone));
}

fn field<'a>(name: &'static str, data: &'a [u8]) -> Part<'a> {
    Part {
        name,
        filename: (name == "image").then_some("x.png"),
        content_type: None,
        data,
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn ids(v: &serde_json::Value, key: &str) -> Vec<u64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {v}"))
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect()
}

fn delete(c: &mut Client, id: u64) -> u16 {
    c.request(
        "DELETE",
        &format!("/api/images/{id}"),
        &[("X-Api-Key", KEY)],
        b"",
    )
    .unwrap()
    .status
}

/// The real weights re-saved as safetensors: the same network in another file, which is
/// another model identity (the identity hashes the weight file).
fn other_weights(pth: &Path, out: &Path) {
    let tensors =
        trainer::weights::read_tensor_file(pth, &candle_core::Device::Cpu).expect("read weights");
    let map: std::collections::HashMap<String, candle_core::Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, out).unwrap();
}

#[test]
fn server_on_the_engine_keeps_its_guarantees_through_an_engine_restart() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (Some(url), Some(bin), Some(weights)) = (engine(), server_binary(), lite0_weights()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let gallery = tmp.path().join("gallery");
    let files = make_gallery(
        &gallery,
        &[("red", [230, 30, 30]), ("blue", [30, 40, 230])],
        2,
    );
    let store = collection(&url, "e2e_server", 2);
    let _cleanup = Dropped(store.clone());
    let data = tmp.path().join("data");
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--gallery",
        gallery.to_str().unwrap(),
        "--store",
        &store,
        "--api-key",
        KEY,
    ];
    let server = Server::start(&bin, &args);
    let mut c = server.client();
    let n0 = files.len() as u64;
    assert_eq!(c.get("/healthz").unwrap().json()["gallery_items"], n0);

    // A batch with metadata: committed in the engine before the 200.
    let green = shape_png(2, [20, 200, 40], [250, 250, 250], 150);
    let purple = shape_png(3, [150, 30, 200], [20, 20, 20], 150);
    let r = c
        .post_form(
            "/api/images",
            &[
                field("image", &green),
                field("image", &purple),
                field("label", b"shoe"),
                field("label", b"hat"),
                field("metadata", br#"{"price": 25, "color": "green"}"#),
                field("metadata", br#"{"price": 70, "color": "purple"}"#),
            ],
            &[("X-Api-Key", KEY)],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let added = ids(&r.json(), "items");
    let (green_id, purple_id) = (added[0], added[1]);
    // Read back by another client of the engine: the indexer sees the uploads.
    let info = stdout(&ok(indexer(&["info", "--store", &store])));
    assert!(
        info.contains(&format!("{} in 2 hash partitions", n0 + 2)),
        "{info}"
    );

    // Filters: range, exact label, any-of.
    for (filter, expect) in [
        (r#"{"price": {"gte": 10, "lt": 50}}"#, vec![green_id]),
        (r#"{"label": "hat"}"#, vec![purple_id]),
        (r#"{"color": ["purple", "gold"]}"#, vec![purple_id]),
    ] {
        let r = c
            .post_image(&format!("/api/search?k=5&filter={}", enc(filter)), &purple)
            .unwrap();
        assert_eq!(r.status, 200, "{filter}: {}", r.text());
        assert_eq!(ids(&r.json(), "results"), expect, "{filter}");
    }
    let r = c.get("/api/images/0/similar?k=3").unwrap().json();
    assert!(!ids(&r, "results").contains(&0), "{r}");
    assert_eq!(r["results"][0]["label"], "red", "{r}");
    let page = c.get("/api/images?offset=1&limit=2").unwrap().json();
    assert_eq!(page["total"].as_u64(), Some(n0 + 2), "{page}");
    assert_eq!(ids(&page, "items").len(), 2, "{page}");

    // A delete is visible at once.
    assert_eq!(delete(&mut c, purple_id), 200);
    assert_eq!(delete(&mut c, purple_id), 404);
    let r = c.post_image("/api/search?k=10", &purple).unwrap().json();
    assert!(!ids(&r, "results").contains(&purple_id), "{r}");

    // The engine goes down: 503 with a clear message, no crash.
    engine_ctl("stop");
    let r = c.post_image("/api/search?k=3", &green).unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(
        msg.contains("unavailable") && msg.contains("PostgreSQL"),
        "{msg}"
    );
    assert_eq!(c.get("/healthz").unwrap().status, 503);
    let r = c
        .post_form(
            "/api/images",
            &[field("image", &purple)],
            &[("X-Api-Key", KEY)],
        )
        .unwrap();
    assert_eq!(
        r.status,
        503,
        "an upload is refused, not half-stored: {}",
        r.text()
    );

    // Back up: the same server answers again, with everything committed before.
    engine_ctl("start");
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = c.post_image("/api/search?k=10", &green).unwrap();
        if r.status == 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(r.status, 200, "no recovery: {}", r.text());
    let found = ids(&r.json(), "results");
    assert_eq!(found[0], green_id, "{found:?}");
    assert!(!found.contains(&purple_id));
    assert_eq!(c.get("/healthz").unwrap().json()["gallery_items"], n0 + 1);

    // kill -9 and a restart over the same folder: the engine kept everything, the scan
    // adds nothing, the deleted item stays deleted.
    server.kill9();
    let server = Server::start(&bin, &args);
    let mut c = server.client();
    assert_eq!(c.get("/healthz").unwrap().json()["gallery_items"], n0 + 1);
    assert_eq!(
        c.get(&format!("/api/images/{purple_id}")).unwrap().status,
        404
    );
    assert!(server.terminate().success());

    // Another model is refused at start-up, naming the collection and what to do.
    let other = tmp.path().join("other.safetensors");
    other_weights(&weights, &other);
    let out = run(Command::new(&bin).args([
        "--data-dir",
        tmp.path().join("data2").to_str().unwrap(),
        "--weights",
        other.to_str().unwrap(),
        "--store",
        &store,
        "--bind",
        "127.0.0.1:0",
    ]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("different model") && stderr(&out).contains("collection"),
        "{}",
        stderr(&out)
    );
}
