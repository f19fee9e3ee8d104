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
        "curves.svg",
    ] {
        assert!(out.join(f).exists(), "{f} missing from the run directory");
    }
    let all = read_jsonl(&out.join("metrics.jsonl"));
    // Epoch 0: the pretrained features on the same eval split, for comparison.
    assert_eq!(all[0]["model"], "pretrained");
    assert_eq!(all[0]["epoch"], 0);
    let lines = &all[1..];
    assert_eq!(lines.len(), 2, "one metrics line per epoch");
    assert_eq!(lines[1]["pretrained_recall@1"], all[0]["recall@1"]);
    let svg = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("pretrained"), "{svg}");
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
    assert!(
        stdout.contains("— pretrained"),
        "eval compares with the baseline: {stdout}"
    );
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

/// `--time-budget`: the plan is measured, printed and saved, the run keeps to the budget, and
/// the planned flags cannot be given beside it.
#[test]
fn a_time_budget_plans_and_keeps_to_it() {
    let Some(weights) = lite0_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_shapes_dataset(&data, 8, 6, 48);
    let out = tmp.path().join("run");
    let started = std::time::Instant::now();
    let o = ok(run(Command::new(bin("trainer"))
        .args(["--dataset", "folder", "--loss", "proxy-anchor"])
        .args(["--classes-per-batch", "4", "--images-per-class", "3"])
        .args(["--embedding-dim", "32", "--time-budget", "1m"])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .arg("--weights")
        .arg(&weights)));
    let wall = started.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("plan for a 1m budget"), "{err}");
    assert!(wall < 75.0, "a 1m budget took {wall:.0} s:\n{err}");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("plan.json")).unwrap()).unwrap();
    // 48-px images train at 64 px, not at the backbone's 224, and the model embeds at
    // 64 × 1.43 (the crops' mean magnification) rounded to 32 px.
    assert_eq!(plan["image_size"], 64);
    assert_eq!(plan["inference_size"], 96);
    assert!(plan["epochs"].as_u64().unwrap() >= 1);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["preprocess"]["crop"], 96);
    assert_eq!(cfg["training"]["image_size"], 64);
    // The proxies are saved with the run (resumable).
    assert!(out.join("loss.safetensors").exists());
    let lines = read_jsonl(&out.join("metrics.jsonl"));
    assert_eq!(lines[0]["model"], "pretrained");
    let last = lines.last().unwrap();
    assert!(
        last["epoch"].as_u64().unwrap() >= 1 && last.get("loss").is_some(),
        "{last}"
    );

    for (args, want) in [
        (vec!["--time-budget", "10s"], "at least 1m"),
        (vec!["--time-budget", "soon"], "30m"),
        (
            vec!["--time-budget", "5m", "--lr", "1e-3"],
            "cannot be used with",
        ),
    ] {
        let o = run(Command::new(bin("trainer"))
            .args(["--dataset", "folder", "--out"])
            .arg(tmp.path().join("other"))
            .arg("--data")
            .arg(&data)
            .arg("--weights")
            .arg(&weights)
            .args(&args));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
}

/// Cross-batch memory and gradient accumulation run end to end with a pair loss.
#[test]
fn cross_batch_memory_and_accumulation_train() {
    let Some(weights) = lite0_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_shapes_dataset(&data, 8, 4, 48);
    let out = tmp.path().join("run");
    ok(run(Command::new(bin("trainer"))
        .args(["--dataset", "folder", "--loss", "multi-similarity"])
        .args(["--classes-per-batch", "2", "--images-per-class", "2"])
        .args(["--embedding-dim", "16", "--freeze-until", "head"])
        .args(["--image-size", "64", "--inference-size", "80"])
        .args(["--xbm", "24", "--accumulate", "2"])
        .args([
            "--epochs",
            "2",
            "--batches-per-epoch",
            "4",
            "--head-lr",
            "1e-3",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .arg("--weights")
        .arg(&weights)));
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_state.json")).unwrap())
            .unwrap();
    // 2 epochs × 4 batches, one optimiser step per 2 batches.
    assert_eq!(st["optimizer_steps"], 4);
    assert_eq!(st["args"]["xbm"], 24);
    // An explicit --inference-size is what the checkpoint embeds at.
    assert_eq!(st["args"]["inference_size"], 80);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["preprocess"]["crop"], 80);
}

/// `trainer stages` names the stages from the architecture alone: no weights, no network.
#[test]
fn stages_are_listed_without_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let o = ok(run(Command::new(bin("trainer"))
        .arg("stages")
        .env_remove("DEEP_METRIC_WEIGHTS")
        .env("HF_HOME", tmp.path())
        .env("HF_HUB_OFFLINE", "1")));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("  4  blocks4"), "{out}");
    assert!(out.contains("  8  head"), "{out}");
}

/// Files repeated across training classes are trained on once, repeats reaching the
/// evaluation classes are reported, and `--keep-duplicates` / `--flip` do what they say.
#[test]
fn repeated_files_are_trained_once_and_reported() {
    let Some(weights) = lite0_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // 8 classes: class_00..03 train, class_04..07 test. Class_01 becomes a copy of class_00
    // (both training classes); class_05 a copy of class_02 (a test class repeating training).
    make_shapes_dataset(&data, 8, 5, 48);
    for (from, to) in [("class_00", "class_01"), ("class_02", "class_05")] {
        std::fs::remove_dir_all(data.join(to)).unwrap();
        std::fs::create_dir_all(data.join(to)).unwrap();
        for e in std::fs::read_dir(data.join(from)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), data.join(to).join(e.file_name())).unwrap();
        }
    }
    let train = |name: &str, extra: &[&str]| {
        run(Command::new(bin("trainer"))
            .args(["--dataset", "folder", "--freeze-until", "head"])
            .args(["--classes-per-batch", "2", "--images-per-class", "3"])
            .args([
                "--embedding-dim",
                "16",
                "--epochs",
                "1",
                "--image-size",
                "64",
            ])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(tmp.path().join(name))
            .arg("--weights")
            .arg(&weights)
            .args(extra))
    };
    let training = |name: &str| -> serde_json::Value {
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join(name).join("config.json")).unwrap(),
        )
        .unwrap();
        cfg["training"].clone()
    };

    let o = ok(train("dedup", &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("repeats 5 image file(s): 0 inside a class, 5 across classes")
            && err.contains("class_00 = class_01")
            && err.contains("1 class(es) that only repeated others are left out"),
        "{err}"
    );
    assert!(
        err.contains("5 of the 20 evaluation images (1 classes: class_05 = class_02)"),
        "{err}"
    );
    assert!(err.contains("train: 15 images / 3 classes"), "{err}");
    assert_eq!(training("dedup")["duplicates_dropped"], 5);
    assert_eq!(training("dedup")["flip"], 0.5);

    // The view options reach a real run (with the cached head-only views) and its config.
    let o = ok(train(
        "keep",
        &[
            "--keep-duplicates",
            "--flip",
            "0",
            "--rotate",
            "10",
            "--erase",
            "0.5",
        ],
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("kept, as --keep-duplicates asks"), "{err}");
    assert!(err.contains("train: 20 images / 4 classes"), "{err}");
    assert_eq!(training("keep")["duplicates_dropped"], 0);
    assert_eq!(training("keep")["flip"], 0.0);
    assert_eq!(training("keep")["rotate"], 10.0);
    assert_eq!(training("keep")["erase"], 0.5);
    assert_eq!(training("keep")["turned_classes"], false);

    // Turned classes: the 3 cleaned classes and their three turns train as 12.
    let o = ok(train("turned", &["--turned-classes"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("train: 60 images / 12 classes"), "{err}");
    assert!(err.contains("eval: 20 images / 4 classes"), "{err}");
    assert_eq!(training("turned")["turned_classes"], true);

    // Multi-scale: the extra size reaches the checkpoint's preprocessing (which the indexer
    // and the server read) and the run's evaluations, from cached head activations, ran.
    let o = ok(train("multi", &["--extra-sizes", "32,48"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("R@1"), "{err}");
    assert_eq!(
        training("multi")["extra_sizes"],
        serde_json::json!([32, 48])
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("multi").join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cfg["preprocess"]["extra_sizes"],
        serde_json::json!([32, 48])
    );
    let single: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("turned").join("config.json")).unwrap(),
    )
    .unwrap();
    assert!(
        single["preprocess"].get("extra_sizes").is_none(),
        "one size leaves the preprocessing (and so the model identity) as before"
    );
    // The training-time evaluation (main size from the cached activations, extra sizes from
    // the images) and `trainer eval` (the Embedder, every size from the images) agree.
    let eval = |extra: &[&str]| {
        ok(run(Command::new(bin("trainer"))
            .args(["eval", "--dataset", "folder"])
            .args(extra)
            .arg("--data")
            .arg(&data)
            .arg("--model")
            .arg(tmp.path().join("multi"))))
    };
    let o = eval(&[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("R@1"), "{o:?}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(tmp.path().join("multi").join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let (trained, evaluated) = (&lines[lines.len() - 2], &lines[lines.len() - 1]);
    assert!(evaluated.get("model").is_some(), "{evaluated}");
    for key in ["recall@1", "map@r"] {
        let (a, b) = (
            trained[key].as_f64().unwrap(),
            evaluated[key].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-4,
            "{key}: training {a}, trainer eval {b}"
        );
    }
    let o = eval(&["--extra-sizes", "40"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("R@1"), "{o:?}");
    let o = eval(&["--extra-sizes", "0"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("R@1"), "{o:?}");

    // Hard-class batches: random classes for multi-similarity; the fuzzy loss's groups of
    // eight capped at P = 2; an explicit size for any loss.
    assert_eq!(training("keep")["hard_classes"], 1);
    ok(train("fuzzy", &["--loss", "fuzzy"]));
    assert_eq!(training("fuzzy")["hard_classes"], 2);
    ok(train("grouped", &["--hard-classes", "2"]));
    assert_eq!(training("grouped")["hard_classes"], 2);

    // Out-of-range options are refused before the run directory exists.
    for (name, arg, says) in [
        (
            "badhard",
            "--hard-classes=3",
            "--hard-classes 3 must be between 1",
        ),
        ("badflip", "--flip=1.5", "--flip is a probability"),
        ("baderase", "--erase=-0.1", "--erase is a probability"),
        ("badrotate", "--rotate=200", "--rotate is the largest angle"),
    ] {
        let o = train(name, &[arg]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{err}");
        assert!(
            !tmp.path().join(name).exists(),
            "{name}: run directory created"
        );
    }
}
