//! Weights that download themselves, against a mock Hugging Face hub: a small HTTP server in
//! the test that answers the routes `hf-hub` calls (`{endpoint}/{repo}/resolve/main/{file}`,
//! a redirect to a "CDN" URL, byte ranges, and the `X-Repo-Commit` / `X-Linked-Etag`
//! headers the real hub sends), serving the `../shared` EfficientNet-Lite0 weights
//! converted to timm's `tf_efficientnet_lite0` safetensors layout. Checks that the file lands
//! in `$HF_HOME`'s hub cache, that it embeds exactly like the original `.pth`, that a second
//! start needs no network, that the server starts with no flags at all, and that failures
//! (hub unreachable, corrupted download) are clear errors.

mod server_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use e2e::{bin, ok, run};
use search_server::client::Part;
use server_support::{server_binary, shape_png, weights, write_timm_dinov2, Server};
use sha2::Digest;
use trainer::backbone::BackboneKind;

const REPO: &str = "timm/tf_efficientnet_lite0.in1k";
const FILE: &str = "model.safetensors";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// timm's name for one of our canonical EfficientNet-Lite0 variable names. timm's first
/// block is a `DepthwiseSeparableConv` (conv_dw, bn1, conv_pw, bn2); the others are
/// `InvertedResidual`s (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3).
fn timm_key(canonical: &str, expanded: &dyn Fn(&str) -> bool) -> String {
    let simple = [
        ("stem.conv.", "conv_stem."),
        ("stem.bn.", "bn1."),
        ("head.conv.", "conv_head."),
        ("head.bn.", "bn2."),
        ("classifier.", "classifier."),
    ];
    for (ours, theirs) in simple {
        if let Some(p) = canonical.strip_prefix(ours) {
            return format!("{theirs}{p}");
        }
    }
    // blocks.S.B.UNIT.{conv,bn}.PARAM
    let parts: Vec<&str> = canonical.split('.').collect();
    assert!(
        parts.len() == 6 && parts[0] == "blocks",
        "unexpected name {canonical}"
    );
    let block = format!("blocks.{}.{}", parts[1], parts[2]);
    let inverted = expanded(&block);
    let layer = match (inverted, parts[3], parts[4]) {
        (true, "expand", "conv") => "conv_pw",
        (true, "expand", "bn") => "bn1",
        (true, "dw", "conv") => "conv_dw",
        (true, "dw", "bn") => "bn2",
        (true, "project", "conv") => "conv_pwl",
        (true, "project", "bn") => "bn3",
        (false, "dw", "conv") => "conv_dw",
        (false, "dw", "bn") => "bn1",
        (false, "project", "conv") => "conv_pw",
        (false, "project", "bn") => "bn2",
        other => panic!("unexpected layer {other:?} in {canonical}"),
    };
    format!("{block}.{layer}.{}", parts[5])
}

/// The `.pth` weights (classifier included) re-saved as timm would publish them: timm's
/// key names, plus the `num_batches_tracked` counters `state_dict()` carries for every BN.
fn timm_safetensors(pth: &Path, out: &Path) {
    let canonical =
        trainer::weights::load_backbone_weights(BackboneKind::EfficientnetLite0, pth, &Device::Cpu)
            .unwrap();
    let names: Vec<String> = canonical.keys().cloned().collect();
    let expanded = |block: &str| {
        names
            .iter()
            .any(|n| n.starts_with(&format!("{block}.expand.")))
    };
    let mut timm: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in &canonical {
        let key = timm_key(name, &expanded);
        if let Some(bn) = key.strip_suffix(".running_var") {
            timm.insert(
                format!("{bn}.num_batches_tracked"),
                Tensor::new(0i64, &Device::Cpu).unwrap(),
            );
        }
        assert!(
            timm.insert(key, t.clone()).is_none(),
            "two names for {name}"
        );
    }
    assert!(timm.contains_key("blocks.0.0.conv_pw.weight"));
    assert!(timm.contains_key("blocks.6.0.conv_pwl.weight"));
    assert!(timm.contains_key("classifier.weight"));
    assert_eq!(timm["classifier.weight"].dtype(), DType::F32);
    candle_core::safetensors::save(&timm, out).unwrap();
}

/// What the mock hub does with the `resolve` route.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Like huggingface.co for an LFS file: 302 to the CDN with the SHA-256 as linked etag.
    Normal,
    /// Announces a SHA-256 that the body does not have (a corrupted transfer).
    WrongEtag,
}

/// One request the mock hub saw.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
    user_agent: String,
}

/// A mock Hugging Face hub serving one file of one repo, on a local port.
struct MockHub {
    endpoint: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl MockHub {
    fn start(body: Vec<u8>, mode: Mode) -> MockHub {
        Self::start_repo(REPO, body, mode)
    }

    /// Serves `body` as `FILE` of `repo`.
    fn start_repo(repo: &'static str, body: Vec<u8>, mode: Mode) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (seen2, endpoint2) = (seen.clone(), endpoint.clone());
        let body = Arc::new(body);
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (seen, endpoint, body) = (seen2.clone(), endpoint2.clone(), body.clone());
                std::thread::spawn(move || serve(stream, repo, &body, mode, &endpoint, &seen));
            }
        });
        MockHub { endpoint, seen }
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(
    mut stream: TcpStream,
    repo: &str,
    body: &[u8],
    mode: Mode,
    endpoint: &str,
    seen: &Mutex<Vec<Seen>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    seen.lock().unwrap().push(Seen {
        path: path.clone(),
        range: headers.get("range").cloned(),
        user_agent: headers.get("user-agent").cloned().unwrap_or_default(),
    });
    let sha = hex::encode(sha2::Sha256::digest(body));
    let announced = match mode {
        Mode::Normal => sha.clone(),
        Mode::WrongEtag => "f".repeat(64),
    };
    let resolve = format!("/{repo}/resolve/main/{FILE}");
    let cdn = format!("/cdn/{sha}");
    let (status, extra, payload): (&str, Vec<(String, String)>, &[u8]) = if path == resolve {
        // The hub's answer for an LFS file: a redirect, the commit, the content's SHA-256
        // (as X-Linked-Etag; ETag is the git pointer's id) and its size.
        (
            "302 Found",
            vec![
                ("Location".into(), format!("{endpoint}{cdn}")),
                ("X-Repo-Commit".into(), COMMIT.into()),
                ("X-Linked-Etag".into(), format!("\"{announced}\"")),
                ("X-Linked-Size".into(), body.len().to_string()),
                ("ETag".into(), "\"3d2f0a1b\"".into()),
            ],
            b"",
        )
    } else if path == cdn {
        match headers
            .get("range")
            .and_then(|r| parse_range(r, body.len()))
        {
            Some((a, b)) => (
                "206 Partial Content",
                vec![(
                    "Content-Range".into(),
                    format!("bytes {a}-{b}/{}", body.len()),
                )],
                &body[a..=b],
            ),
            None => ("200 OK", vec![], body),
        }
    } else {
        (
            "404 Not Found",
            vec![("X-Error-Code".into(), "EntryNotFound".into())],
            b"Entry not found",
        )
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        payload.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(payload);
    let _ = stream.flush();
    // Drain what the client may still send, so closing does not reset the connection.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = reader.read(&mut [0u8; 64]);
}

/// `bytes=A-B` or `bytes=A-` as an inclusive byte range within `len`.
fn parse_range(r: &str, len: usize) -> Option<(usize, usize)> {
    let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
    let a: usize = a.parse().ok()?;
    let b = if b.is_empty() {
        len.checked_sub(1)?
    } else {
        b.parse::<usize>().ok()?.min(len.checked_sub(1)?)
    };
    (a <= b).then_some((a, b))
}

/// A command whose weights can only come from the hub at `endpoint`, cached in `hf_home`.
fn hub_env<'a>(cmd: &'a mut Command, endpoint: &str, hf_home: &Path) -> &'a mut Command {
    cmd.env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("RUST_LOG")
        .env_remove("DEEP_METRIC_WEIGHTS")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
}

/// Reads an `.fvecs` file (per row: i32 dimension, then the floats).
fn read_fvecs(path: &Path) -> Vec<Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let mut rows = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let d = i32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 4;
        let row = bytes[at..at + 4 * d]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        at += 4 * d;
        rows.push(row);
    }
    rows
}

/// Builds an index of `images`; returns its vectors and the indexer's log.
fn embed(
    images: &Path,
    out: &Path,
    cmd: impl FnOnce(&mut Command) -> &mut Command,
) -> (Vec<Vec<f32>>, String) {
    let mut c = Command::new(bin("indexer"));
    c.args([
        "build",
        "--model",
        "pretrained:efficientnet-lite0",
        "--images",
    ])
    .arg(images)
    .arg("--out")
    .arg(out);
    let log = String::from_utf8_lossy(&ok(run(cmd(&mut c))).stderr).into_owned();
    let fvecs = out.with_extension("fvecs");
    ok(run(Command::new(bin("indexer"))
        .args(["export-vectors", "--index"])
        .arg(out)
        .arg("--out")
        .arg(&fvecs)));
    (read_fvecs(&fvecs), log)
}

/// The reference photos beside the shared weights (a cat, an owl, …), copied to `dir`.
fn photos(shared_weights: &Path, dir: &Path) -> usize {
    let reference = shared_weights.parent().unwrap().join("reference");
    std::fs::create_dir_all(dir).unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(&reference).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "png") {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
            n += 1;
        }
    }
    assert!(
        n >= 3,
        "expected the reference photos in {}",
        reference.display()
    );
    n
}

fn timm_file(pth: &Path, dir: &Path) -> Vec<u8> {
    let f = dir.join("timm-model.safetensors");
    timm_safetensors(pth, &f);
    std::fs::read(f).unwrap()
}

#[test]
fn weights_download_into_hf_home_and_embed_like_the_pth() {
    let Some(pth) = weights() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let body = timm_file(&pth, tmp.path());
    let sha = hex::encode(sha2::Sha256::digest(&body));
    let hub = MockHub::start(body.clone(), Mode::Normal);
    let images = tmp.path().join("photos");
    let n = photos(&pth, &images);
    let hf_home = tmp.path().join("hf-home");

    let (from_hub, log) = embed(&images, &tmp.path().join("idx-hub"), |c| {
        hub_env(c, &hub.endpoint, &hf_home)
    });
    // A network fetch is never silent, even at the indexer's default log level.
    assert!(log.contains("downloading pretrained weights"), "{log}");
    // The standard cache layout, as huggingface_hub writes it.
    let repo_dir = hf_home.join("hub/models--timm--tf_efficientnet_lite0.in1k");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    let snapshot = repo_dir.join("snapshots").join(COMMIT).join(FILE);
    assert_eq!(
        std::fs::read(&snapshot).unwrap(),
        body,
        "{}",
        snapshot.display()
    );
    assert!(
        repo_dir.join("blobs").join(&sha).is_file(),
        "blob named by its SHA-256"
    );
    let reqs = hub.requests();
    assert!(
        reqs.iter()
            .any(|r| r.path == format!("/{REPO}/resolve/main/{FILE}")),
        "{reqs:?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r.path.starts_with("/cdn/") && r.range.as_deref() == Some("bytes=0-")),
        "the body is fetched by range from the redirect target: {reqs:?}"
    );
    assert!(
        reqs.iter().all(|r| r.user_agent.contains("deep-metric/")),
        "{reqs:?}"
    );

    // The timm-layout download embeds exactly like the original .pth.
    let (from_pth, _) = embed(&images, &tmp.path().join("idx-pth"), |c| {
        c.arg("--weights")
            .arg(&pth)
            .env_remove("DEEP_METRIC_WEIGHTS")
    });
    assert_eq!(from_hub.len(), n);
    assert_eq!(from_pth.len(), n);
    let max_diff = from_hub
        .iter()
        .zip(&from_pth)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-4, "max |hub − pth| = {max_diff}");
    // … and the photos are told apart (not a degenerate embedding).
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!(cos(&from_hub[0], &from_hub[1]) < 0.95);

    // Second start: from the cache, without a single request.
    let before = hub.requests().len();
    let (again, log) = embed(&images, &tmp.path().join("idx-hub-2"), |c| {
        hub_env(c, &hub.endpoint, &hf_home)
    });
    assert_eq!(hub.requests().len(), before, "{:?}", hub.requests());
    assert!(!log.contains("downloading"), "{log}");
    assert_eq!(again, from_hub);
}

#[test]
fn server_with_no_flags_downloads_weights_and_starts_empty() {
    let (Some(pth), Some(server_bin)) = (weights(), server_binary()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let hub = MockHub::start(timm_file(&pth, tmp.path()), Mode::Normal);
    let cwd = tmp.path().join("fresh-machine");
    std::fs::create_dir_all(&cwd).unwrap();
    let mut cmd = Command::new(&server_bin);
    hub_env(&mut cmd, &hub.endpoint, &tmp.path().join("hf-home"))
        .current_dir(&cwd)
        .env_remove("DEEP_METRIC_API_KEY");
    // Only --bind, so that the test can run beside others (the default is 127.0.0.1:8080).
    let server = Server::start_command(cmd, &[]);
    assert!(
        server.log().contains("downloading pretrained weights"),
        "{}",
        server.log()
    );
    assert!(
        cwd.join("deep-metric-data/index").is_dir(),
        "own data dir by default"
    );
    let mut c = server.client();
    let cfg = c.get("/api/config").unwrap().json();
    assert_eq!(cfg["gallery_items"], 0, "{cfg}");
    assert_eq!(cfg["read_only"], false, "{cfg}");
    let page = c.get("/").unwrap().text();
    assert!(
        page.contains("id=\"empty-gallery\"")
            && page.contains("indexer add")
            && page.contains("--gallery"),
        "the page explains how to add images"
    );

    // Searching the empty gallery is not an error; adding an image makes it findable.
    let img = shape_png(1, [230, 30, 30], [20, 200, 90], 128);
    let part = |data| {
        vec![Part {
            name: "image",
            filename: Some("red.png"),
            content_type: Some("image/png"),
            data,
        }]
    };
    let r = c.post_form("/api/search?k=3", &part(&img), &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["results"].as_array().unwrap().len(), 0);
    let r = c.post_form("/api/images", &part(&img), &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = c.post_form("/api/search?k=3", &part(&img), &[]).unwrap();
    let body = r.json();
    assert_eq!(body["results"].as_array().unwrap().len(), 1, "{body}");
    assert!(
        body["results"][0]["score"].as_f64().unwrap() > 0.99,
        "{body}"
    );
    assert_eq!(c.get("/api/config").unwrap().json()["gallery_items"], 1);
}

/// `indexer build` of a folder holding one image (so that the model is what fails).
fn one_image_build(dir: &Path) -> Command {
    let images = dir.join("one");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(
        images.join("a.png"),
        shape_png(0, [9, 9, 200], [200, 9, 9], 64),
    )
    .unwrap();
    let mut cmd = Command::new(bin("indexer"));
    cmd.args([
        "build",
        "--model",
        "pretrained:efficientnet-lite0",
        "--images",
    ])
    .arg(images)
    .arg("--out")
    .arg(dir.join("idx"));
    cmd
}

/// The URL of a local port nothing listens on.
fn unreachable_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

#[test]
fn hub_unreachable_without_weights_says_what_was_tried() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = unreachable_endpoint();
    let hf_home = tmp.path().join("hf-home");
    let mut cmd = one_image_build(tmp.path());
    let out = run(hub_env(&mut cmd, &endpoint, &hf_home));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for needle in [
        "--weights",
        "DEEP_METRIC_WEIGHTS",
        "models--timm--tf_efficientnet_lite0.in1k",
        &format!("{endpoint}/{REPO}/resolve/main/{FILE}"),
        "HF_ENDPOINT",
    ] {
        assert!(err.contains(needle), "missing {needle}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    // HF_HUB_OFFLINE: no attempt at all, and the message says why.
    let out = run(hub_env(&mut cmd, &endpoint, &hf_home).env("HF_HUB_OFFLINE", "1"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("HF_HUB_OFFLINE") && err.contains("--weights"),
        "{err}"
    );
}

#[test]
fn corrupted_download_is_refused_and_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    // Any bytes do: the check happens before the file is read as weights.
    let hub = MockHub::start(b"not the announced file".repeat(100), Mode::WrongEtag);
    let hf_home = tmp.path().join("hf-home");
    let mut cmd = one_image_build(tmp.path());
    let out = run(hub_env(&mut cmd, &hub.endpoint, &hf_home));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("SHA-256") && err.contains("--weights"),
        "{err}"
    );
    let snapshot = hf_home
        .join("hub/models--timm--tf_efficientnet_lite0.in1k/snapshots")
        .join(COMMIT)
        .join(FILE);
    assert!(
        !snapshot.exists(),
        "a bad download must not stay in the cache"
    );
    assert!(!hf_home
        .join("hub/models--timm--tf_efficientnet_lite0.in1k/blobs")
        .join("f".repeat(64))
        .exists());
}

#[test]
fn timm_names_cover_every_variable() {
    // The converter above must produce timm's full layout: 16 blocks, the first without
    // an expansion, and every BN with its four tensors.
    let vars = trainer::weights::expected_variables(BackboneKind::EfficientnetLite0).unwrap();
    let names: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
    let expanded = |block: &str| {
        names
            .iter()
            .any(|n| n.starts_with(&format!("{block}.expand.")))
    };
    let timm: Vec<String> = names.iter().map(|n| timm_key(n, &expanded)).collect();
    for k in [
        "conv_stem.weight",
        "bn1.running_var",
        "blocks.0.0.conv_dw.weight",
        "blocks.0.0.bn2.bias",
        "blocks.1.0.conv_pwl.weight",
        "blocks.5.3.bn3.running_mean",
        "blocks.6.0.conv_dw.weight",
        "conv_head.weight",
        "bn2.weight",
    ] {
        assert!(timm.iter().any(|t| t == k), "{k} missing");
    }
    let all: Vec<&str> = timm.iter().map(String::as_str).collect();
    for (t, ours) in timm.iter().zip(&names) {
        assert_eq!(
            trainer::weights::names::canonical_name(BackboneKind::EfficientnetLite0, t, &all)
                .as_deref(),
            Some(ours.as_str()),
            "{t}"
        );
    }
}

/// A transformer's weights come from the hub under its own repository name
/// (`timm/vit_small_patch14_dinov2.lvd142m`), land in the cache, and evaluate; random weights
/// in timm's layout stand in for the real file (needs no `../shared`).
#[test]
fn dinov2_weights_download_under_their_hub_name() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("vit.safetensors");
    write_timm_dinov2(&file);
    let body = std::fs::read(&file).unwrap();
    const VIT_REPO: &str = "timm/vit_small_patch14_dinov2.lvd142m";
    let hub = MockHub::start_repo(VIT_REPO, body.clone(), Mode::Normal);
    let data = tmp.path().join("data");
    e2e::make_shapes_dataset(&data, 2, 2, 48);
    let hf_home = tmp.path().join("hf-home");
    let mut cmd = Command::new(bin("trainer"));
    cmd.args([
        "eval",
        "--pretrained-only",
        "--backbone",
        "dinov2-vits14",
        "--dataset",
        "folder",
        "--split",
        "all",
        "--data",
    ])
    .arg(&data);
    ok(run(hub_env(&mut cmd, &hub.endpoint, &hf_home)));
    let reqs = hub.requests();
    assert!(
        reqs.iter()
            .any(|r| r.path == format!("/{VIT_REPO}/resolve/main/{FILE}")),
        "{reqs:?}"
    );
    let snapshot = hf_home
        .join("hub/models--timm--vit_small_patch14_dinov2.lvd142m/snapshots")
        .join(COMMIT)
        .join(FILE);
    assert_eq!(
        std::fs::read(&snapshot).unwrap(),
        body,
        "{}",
        snapshot.display()
    );
}
