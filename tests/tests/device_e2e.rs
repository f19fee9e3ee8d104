//! `--device` in every program, as a user runs them: `--help` documents it, `--device cpu`
//! trains (the whole network), evaluates, indexes, queries and serves through the one
//! device-generic path, the default `auto` says it chose the CPU, and asking this CPU-only
//! build for CUDA (or for bf16) is a clear error with exit status 2 — never a panic.
//!
//! These run the binaries `cargo test --workspace` builds, i.e. without the `cuda` feature
//! (a CUDA build is checked on a GPU by `scripts/gpu-check.sh`).

mod server_support;

use std::path::Path;
use std::process::{Command, Output};

use e2e::{bin, lite0_weights, make_shapes_dataset, ok, run};

/// What a CUDA request must say in a CPU-only build: what failed and both ways out.
fn assert_no_cuda_error(out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: a CUDA request in a CPU-only build must exit with status 2:\n{err}"
    );
    assert!(
        err.contains("built without CUDA support")
            && err.contains("--features cuda")
            && err.contains("scripts/cuda-build.sh")
            && err.contains("--device cpu"),
        "{what}: the message must say what failed and what to do:\n{err}"
    );
    assert!(!err.contains("panicked"), "{what}: {err}");
}

fn help(program: &str, sub: &[&str]) -> String {
    let out = ok(run(Command::new(bin(program)).args(sub).arg("--help")));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn help_of_every_program_shows_device() {
    for (program, sub) in [
        ("trainer", &["train"][..]),
        ("trainer", &["eval"]),
        ("trainer", &["bench"]),
        ("indexer", &["build"]),
        ("indexer", &["add"]),
        ("indexer", &["query"]),
        ("indexer", &["bench"]),
        ("search-server", &[]),
    ] {
        let text = help(program, sub);
        assert!(
            text.contains("--device <auto|cpu|cuda[:N]>") && text.contains("[default: auto]"),
            "{program} {sub:?} --help lacks --device:\n{text}"
        );
    }
    for sub in ["train", "bench"] {
        let text = help("trainer", &[sub]);
        assert!(
            text.contains("--precision") && text.contains("bf16"),
            "trainer {sub} --help lacks --precision:\n{text}"
        );
    }
}

#[test]
fn trainer_asked_for_cuda_exits_2_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().to_str().unwrap();
    // The device is checked first: nothing else on these command lines needs to exist.
    let train = run(Command::new(bin("trainer")).args([
        "train",
        "--device",
        "cuda",
        "--dataset",
        "folder",
        "--data",
        t,
        "--out",
        &format!("{t}/run"),
    ]));
    assert_no_cuda_error(&train, "trainer train");
    assert!(!tmp.path().join("run").exists(), "nothing written");
    let eval = run(Command::new(bin("trainer"))
        .args(["eval", "--device", "cuda:1", "--model", t, "--data", t]));
    assert_no_cuda_error(&eval, "trainer eval");
    assert!(String::from_utf8_lossy(&eval.stderr).contains("cuda:1"));
    let bench = run(Command::new(bin("trainer")).args(["bench", "--device", "cuda"]));
    assert_no_cuda_error(&bench, "trainer bench");

    // A mistyped device is a usage error that lists the choices.
    let bad = run(Command::new(bin("trainer")).args(["bench", "--device", "tpu"]));
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("expected auto, cpu, cuda or cuda:N"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

fn train_cmd(data: &Path, out: &Path, weights: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin("trainer"));
    c.args(["train", "--dataset", "folder", "--loss", "multi-similarity"])
        .args(["--classes-per-batch", "2", "--images-per-class", "2"])
        .args(["--batches-per-epoch", "2", "--epochs", "1"])
        .args(["--embedding-dim", "16", "--image-size", "64"])
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .arg("--weights")
        .arg(weights)
        .args(extra);
    c
}

#[test]
fn trainer_trains_the_whole_network_and_evaluates_on_device_cpu() {
    let Some(weights) = lite0_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_shapes_dataset(&data, 6, 4, 64);
    let out = tmp.path().join("run");

    // bf16 on the CPU: refused before anything is written.
    let bf16 = run(&mut train_cmd(
        &data,
        &out,
        &weights,
        &["--device", "cpu", "--precision", "bf16"],
    ));
    let err = String::from_utf8_lossy(&bf16.stderr);
    assert_eq!(bf16.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bf16 needs --device cuda") && err.contains("--precision f32"),
        "{err}"
    );
    assert!(!out.exists(), "a refused run writes nothing");

    // Every stage trainable (--freeze-until 0): the training graph itself runs on the device.
    let o = ok(run(&mut train_cmd(
        &data,
        &out,
        &weights,
        &["--device", "cpu", "--freeze-until", "0"],
    )));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.lines().any(|l| l.trim() == "device: cpu"),
        "one start-up line names the device:\n{err}"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["epoch"], 1, "{last}");
    assert!(last["loss"].as_f64().unwrap().is_finite(), "{last}");

    // The checkpoint is device-independent: plain safetensors, read back by `eval` with the
    // default device (auto, which says why it chose the CPU in this build).
    let checkpoint = std::fs::metadata(out.join("model.safetensors")).unwrap();
    assert!(
        checkpoint.len() > 1_000_000,
        "a full checkpoint was written"
    );
    let ev = ok(run(Command::new(bin("trainer"))
        .args(["eval", "--dataset", "folder"])
        .arg("--model")
        .arg(&out)
        .arg("--data")
        .arg(&data)));
    let err = String::from_utf8_lossy(&ev.stderr);
    assert!(
        err.contains("device: cpu (auto: this build has no CUDA support)"),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&ev.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(json["recall@1"].as_f64().unwrap() > 0.0, "{json}");
}

fn indexer(args: &[&str]) -> Output {
    run(Command::new(bin("indexer")).args(args))
}

#[test]
fn indexer_builds_and_queries_on_device_cpu_and_refuses_cuda() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().to_str().unwrap();
    let idx = format!("{t}/index");
    let build = indexer(&[
        "build",
        "--device",
        "cuda",
        "--model",
        "pretrained:efficientnet-lite0",
        "--images",
        t,
        "--out",
        &idx,
    ]);
    assert_no_cuda_error(&build, "indexer build");
    assert!(!Path::new(&idx).exists(), "nothing written");
    let bench = indexer(&[
        "bench",
        "--device",
        "cuda:0",
        "--model",
        "pretrained:efficientnet-lite0",
        "--dataset",
        "folder",
        "--data",
        t,
    ]);
    assert_no_cuda_error(&bench, "indexer bench");

    let Some(weights) = lite0_weights() else {
        return;
    };
    let w = weights.to_str().unwrap();
    let gallery = tmp.path().join("gallery");
    make_shapes_dataset(&gallery, 3, 2, 64);
    let g = gallery.to_str().unwrap();
    let o = ok(indexer(&[
        "build",
        "--device",
        "cpu",
        "--model",
        "pretrained:efficientnet-lite0",
        "--weights",
        w,
        "--images",
        g,
        "--out",
        &idx,
    ]));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("device: cpu"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let probe = gallery.join("class_01/img_001.png");
    let probe = probe.to_str().unwrap();
    let q = ok(indexer(&[
        "query", "--device", "cpu", "--index", &idx, probe, "-k", "1",
    ]));
    let text = String::from_utf8_lossy(&q.stdout);
    assert!(text.contains("class_01/img_001.png"), "{text}");

    // `add` and `query` against an existing index refuse CUDA the same way.
    let add = indexer(&["add", "--device", "cuda", "--index", &idx, probe]);
    assert_no_cuda_error(&add, "indexer add");
    let query = indexer(&["query", "--device", "cuda", "--index", &idx, probe]);
    assert_no_cuda_error(&query, "indexer query");
}

#[test]
fn server_serves_on_device_cpu_and_refuses_cuda() {
    let Some(bin) = server_support::server_binary() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = run(Command::new(&bin).args([
        "--device",
        "cuda",
        "--bind",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ]));
    assert_no_cuda_error(&out, "search-server");

    let Some(weights) = server_support::weights() else {
        return;
    };
    let gallery = tmp.path().join("gallery");
    make_shapes_dataset(&gallery, 2, 2, 64);
    let server = server_support::Server::start(
        &bin,
        &[
            "--device",
            "cpu",
            "--data-dir",
            data.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap(),
            "--gallery",
            gallery.to_str().unwrap(),
        ],
    );
    let mut c = server.client();
    let health = c.get("/healthz").unwrap().json();
    assert_eq!(health["gallery_items"], 4, "{health}");
    let query = std::fs::read(gallery.join("class_01/img_000.png")).unwrap();
    let r = c.post_image("/api/search?k=1", &query).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(server.log().contains("device: cpu"), "{}", server.log());
    server.terminate();
}
