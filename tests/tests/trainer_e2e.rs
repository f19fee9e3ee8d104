//! The trainer as a user runs it: train on a folder dataset, resume, evaluate, bad data.

use std::process::Command;

use e2e::{bin, lite0_weights, make_shapes_dataset, ok, run};

fn read_jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[test]
fn train_resume_eval_on_a_folder_dataset() {
    let Some(weights) = lite0_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_shapes_dataset(&data, 8, 6, 96);
    let out = tmp.path().join("run");
    let train = |extra: &[&str]| {
        let mut c = Command::new(bin("trainer"));
        c.args([
            "--dataset",
            "folder",
            "--loss",
            "fuzzy",
            "--freeze-until",
            "head",
            "--classes-per-batch",
            "4",
        ])
        .args([
            "--images-per-class",
            "3",
            "--embedding-dim",
            "32",
            "--batches-per-epoch",
            "3",
            "--head-lr",
            "1e-3",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .arg("--weights")
        .arg(&weights)
        .args(extra);
        run(&mut c)
    };
    ok(train(&["--epochs", "2"]));
    for f in [
        "model.safetensors",
        "config.json",
        "metrics.jsonl",
        "optimizer.safetensors",
        "train_state.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing from the run directory");
    }
    let lines = read_jsonl(&out.join("metrics.jsonl"));
    assert_eq!(lines.len(), 2, "one metrics line per epoch");
    for key in [
        "epoch",
        "loss",
        "recall@1",
        "recall@2",
        "recall@4",
        "recall@8",
        "nmi",
        "map@r",
        "r_precision",
        "train_images_per_sec",
    ] {
        assert!(
            lines[1].get(key).is_some(),
            "metrics.jsonl lacks {key}: {}",
            lines[1]
        );
    }
    assert_eq!(lines[1]["epoch"], 2);

    // A second run into the same directory without --resume is refused, not overwritten.
    let again = train(&["--epochs", "2"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));

    // Resume continues at epoch 3.
    ok(train(&["--epochs", "3", "--resume"]));
    let lines = read_jsonl(&out.join("metrics.jsonl"));
    assert_eq!(lines.last().unwrap()["epoch"], 3);

    // The checkpoint evaluates with the same metrics keys.
    let ev = ok(run(Command::new(bin("trainer"))
        .args(["eval", "--dataset", "folder", "--model"])
        .arg(&out)
        .arg("--data")
        .arg(&data)));
    let stdout = String::from_utf8_lossy(&ev.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(json["recall@1"].as_f64().unwrap() >= 0.0);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["backbone"], "efficientnet-lite0");
    assert_eq!(cfg["embedding_dim"], 32);
}

#[test]
fn a_diverging_loss_stops_and_keeps_the_last_checkpoint() {
    let Some(weights) = lite0_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_shapes_dataset(&data, 4, 4, 64);
    let out = tmp.path().join("run");
    let mut c = Command::new(bin("trainer"));
    c.args([
        "--dataset",
        "folder",
        "--split",
        "all",
        "--eval-split",
        "all",
        "--freeze-until",
        "head",
    ])
    .args([
        "--classes-per-batch",
        "2",
        "--images-per-class",
        "2",
        "--embedding-dim",
        "8",
        "--batches-per-epoch",
        "2",
    ])
    .args([
        "--epochs",
        "3",
        "--head-lr",
        "1e300",
        "--lr",
        "1e300",
        "--loss",
        "contrastive",
    ])
    .arg("--data")
    .arg(&data)
    .arg("--out")
    .arg(&out)
    .arg("--weights")
    .arg(&weights);
    let o = run(&mut c);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a NaN loss must fail the run:\n{err}");
    assert!(err.contains("training stopped"), "{err}");
}

#[test]
fn a_broken_image_is_named_or_skipped() {
    let Some(weights) = lite0_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_shapes_dataset(&data, 4, 3, 64);
    std::fs::write(
        data.join("class_01/broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    let eval = |skip: bool| {
        let mut c = Command::new(bin("trainer"));
        c.args([
            "eval",
            "--pretrained-only",
            "--dataset",
            "folder",
            "--split",
            "all",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--weights")
        .arg(&weights);
        if skip {
            c.arg("--skip-bad-images");
        }
        run(&mut c)
    };
    let o = eval(false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("broken.png"),
        "the error must name the file: {err}"
    );
    let o = ok(eval(true));
    assert!(String::from_utf8_lossy(&o.stderr).contains("skipped 1"));
}
