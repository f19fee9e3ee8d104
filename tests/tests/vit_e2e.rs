//! A transformer backbone end to end, as a user runs it, with a timm-layout DINOv2 ViT-S/14
//! file of random weights (the real ones cannot be downloaded here): evaluate the bare
//! backbone, fine-tune it (last blocks, layer-wise decay), index a folder with the
//! checkpoint, query it, and serve it.

mod server_support;

use std::process::Command;

use e2e::{bin, make_shapes_dataset, ok, run};
use server_support::{server_binary, write_timm_dinov2, Server};

fn json_tail(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON")
}

#[test]
fn dinov2_evaluates_trains_indexes_and_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("vit_small_patch14_dinov2.safetensors");
    write_timm_dinov2(&weights);
    let data = tmp.path().join("data");
    make_shapes_dataset(&data, 4, 4, 64);
    let (w, d) = (weights.to_str().unwrap(), data.to_str().unwrap());

    // The bare backbone's class token, on every image.
    let ev = ok(run(Command::new(bin("trainer")).args([
        "eval",
        "--pretrained-only",
        "--backbone",
        "dinov2-vits14",
        "--weights",
        w,
        "--dataset",
        "folder",
        "--data",
        d,
        "--split",
        "all",
    ])));
    let m = json_tail(&ev);
    let r1 = m["recall@1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&r1), "{m}");

    // Fine-tuning: the last two blocks (layer-wise decay) and the head, at 112 px (the
    // position embedding resampled to 8×8 patches in the forward pass).
    let out = tmp.path().join("run");
    ok(run(Command::new(bin("trainer"))
        .args([
            "--backbone",
            "dinov2-vits14",
            "--weights",
            w,
            "--dataset",
            "folder",
            "--data",
            d,
            "--split",
            "all",
            "--eval-split",
            "all",
        ])
        .args([
            "--epochs",
            "1",
            "--batches-per-epoch",
            "2",
            "--classes-per-batch",
            "4",
            "--images-per-class",
            "2",
            "--embedding-dim",
            "32",
            "--image-size",
            "112",
            "--freeze-until",
            "blocks.10",
            "--layer-decay",
            "0.75",
            "--lr",
            "1e-4",
        ])
        .arg("--out")
        .arg(&out)));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["backbone"], "dinov2-vits14", "{cfg}");
    assert_eq!(cfg["pooling"], "cls", "{cfg}");
    assert_eq!(cfg["feature_dim"], 384, "{cfg}");
    assert_eq!(cfg["preprocess"]["crop"], 112, "{cfg}");
    assert_eq!(cfg["preprocess"]["interpolation"], "bicubic", "{cfg}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() >= 2, "{metrics}");

    // Index the folder with the checkpoint; an image finds itself first.
    let index = tmp.path().join("index");
    let idx = index.to_str().unwrap();
    ok(run(Command::new(bin("indexer")).args([
        "build",
        "--model",
        out.to_str().unwrap(),
        "--images",
        d,
        "--out",
        idx,
    ])));
    let probe = data.join("class_02").join("img_001.png");
    let probe = if probe.exists() {
        probe
    } else {
        std::fs::read_dir(data.join("class_02"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
    };
    let q = ok(run(Command::new(bin("indexer")).args([
        "query",
        "--index",
        idx,
        probe.to_str().unwrap(),
        "-k",
        "3",
    ])));
    let text = String::from_utf8_lossy(&q.stdout).into_owned();
    let name = probe.file_name().unwrap().to_str().unwrap();
    let first = text
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap_or_else(|| panic!("no result rows:\n{text}"));
    assert!(first.contains(name), "{text}");

    // Serve the index: the same query over HTTP.
    let Some(server_bin) = server_binary() else {
        return;
    };
    let server = Server::start(
        &server_bin,
        &[
            "--data-dir",
            tmp.path().join("srv").to_str().unwrap(),
            "--index",
            idx,
            "--model",
            out.to_str().unwrap(),
        ],
    );
    let mut c = server.client();
    let r = c
        .post_image("/api/search?k=1", &std::fs::read(&probe).unwrap())
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let path = body["results"][0]["path"].as_str().unwrap_or_default();
    assert!(path.ends_with(name), "{body}");
}
