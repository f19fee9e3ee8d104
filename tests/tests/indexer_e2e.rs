//! End-to-end: the `indexer` binary builds a gallery from real images with the real
//! EfficientNet-Lite0 weights, finds an indexed image first when queried with it, reports
//! duplicates, and survives `kill -9` during an `add` with the previous index intact.
//!
//! Needs `target/debug/indexer` (`cargo build -p indexer`) and `../shared` (the weights);
//! skips with a message when the latter is absent.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `<workspace>/../shared`, or `$DEEP_METRIC_SHARED` (for worktrees that live elsewhere).
fn weights() -> Option<PathBuf> {
    let shared = std::env::var_os("DEEP_METRIC_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared"));
    let p = shared.join("models/efficientnet-lite0/efficientnet-lite0-57934424.pth");
    p.exists().then_some(p)
}

/// `…/target/debug/deps/indexer_e2e-xxxx` → `…/target/debug/indexer`.
fn indexer_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/debug")
        .join("indexer");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p indexer`",
        bin.display()
    );
    bin
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(indexer_bin())
        .args(args)
        .output()
        .expect("run indexer");
    if !out.status.success() {
        panic!(
            "indexer {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A 96×96 picture: a coloured disc, square or stripes on a tinted background, distinct per `i`.
fn shape_image(i: u32) -> RgbImage {
    let palette = [
        [220, 30, 30],
        [30, 180, 40],
        [40, 60, 220],
        [230, 200, 20],
        [160, 40, 200],
        [20, 200, 200],
        [250, 130, 0],
    ];
    let fg = palette[(i as usize) % palette.len()];
    let bg = [
        (i * 37 % 200) as u8 + 30,
        (i * 91 % 200) as u8 + 30,
        (i * 53 % 200) as u8 + 30,
    ];
    let (cx, cy, r) = (
        30 + (i * 13 % 40) as i32,
        30 + (i * 29 % 40) as i32,
        14 + (i % 5) as i32 * 4,
    );
    RgbImage::from_fn(96, 96, |x, y| {
        let (dx, dy) = (x as i32 - cx, y as i32 - cy);
        let inside = match i % 3 {
            0 => dx * dx + dy * dy <= r * r,
            1 => dx.abs() <= r && dy.abs() <= r,
            _ => ((x + y * (i % 4)) / 8).is_multiple_of(2),
        };
        Rgb(if inside { fg } else { bg })
    })
}

fn write_images(dir: &Path, range: std::ops::Range<u32>) {
    std::fs::create_dir_all(dir).unwrap();
    for i in range {
        shape_image(i)
            .save(dir.join(format!("shape{i:03}.png")))
            .unwrap();
    }
}

fn item_count(index: &Path) -> usize {
    let out = run(&["info", "--index", index.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("items"))
        .unwrap_or_else(|| panic!("no items line in:\n{text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn build_query_duplicate_and_kill_during_add() {
    let Some(weights) = weights() else {
        eprintln!("skipping: ../shared not found (EfficientNet-Lite0 weights)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("gallery");
    write_images(&images, 0..20);
    let index = tmp.path().join("index");
    let (w, idx, img) = (
        weights.to_str().unwrap(),
        index.to_str().unwrap(),
        images.to_str().unwrap(),
    );
    run(&[
        "build",
        "--model",
        "pretrained:efficientnet-lite0",
        "--weights",
        w,
        "--images",
        img,
        "--out",
        idx,
        "--batch-size",
        "8",
    ]);
    assert_eq!(item_count(&index), 20);

    // The model is taken from what the index recorded.
    let probe = images.join("shape007.png");
    let out = run(&["query", "--index", idx, probe.to_str().unwrap(), "-k", "3"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let first = text
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap_or_else(|| panic!("no result rows:\n{text}"));
    assert!(
        first.contains("shape007.png"),
        "an indexed image must find itself first:\n{text}"
    );
    let cosine: f32 = first.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(cosine > 0.999, "{first}");

    // Same content under another name: reported, not added.
    let copy = tmp.path().join("copy.png");
    std::fs::copy(&probe, &copy).unwrap();
    let out = run(&["add", "--index", idx, copy.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("duplicate") && text.contains("item 7"),
        "{text}"
    );
    assert_eq!(item_count(&index), 20);

    // kill -9 an add at several moments (embedding, committing): the index must always load,
    // with either the old or the complete new content.
    let more = tmp.path().join("more");
    write_images(&more, 100..140);
    for delay_ms in [300u64, 1500, 4000] {
        let before = item_count(&index);
        let mut child = Command::new(indexer_bin())
            .args([
                "add",
                "--index",
                idx,
                more.to_str().unwrap(),
                "--batch-size",
                "4",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(delay_ms) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let after = item_count(&index);
        assert!(
            after == before || after == 60,
            "after kill at {delay_ms} ms: {before} → {after} items"
        );
        let out = run(&["query", "--index", idx, probe.to_str().unwrap(), "-k", "1"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("shape007.png"));
        if after == 60 {
            break;
        }
    }
}

/// Runs `indexer` expecting failure; returns its stderr.
fn run_failing(args: &[&str]) -> String {
    let out = Command::new(indexer_bin())
        .args(args)
        .output()
        .expect("run indexer");
    assert!(
        !out.status.success(),
        "indexer {args:?} should have failed:\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `dir`'s entries (names starting with `.` included), sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn killed_build_reruns_and_a_second_writer_is_refused() {
    let Some(weights) = weights() else {
        eprintln!("skipping: ../shared not found (EfficientNet-Lite0 weights)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("gallery");
    write_images(&images, 0..20);
    let w = weights.to_str().unwrap();
    let build_args = |out: &Path| -> Vec<String> {
        [
            "build",
            "--model",
            "pretrained:efficientnet-lite0",
            "--weights",
            w,
            "--images",
            images.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch-size",
            "8",
        ]
        .map(String::from)
        .to_vec()
    };

    // kill -9 as soon as a manifest appears (the staged one, or the final one): the old
    // build left a valid empty index there that made the rerun refuse.
    let index = tmp.path().join("index");
    let mut child = Command::new(indexer_bin())
        .args(build_args(&index))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut seen = false;
    while start.elapsed() < Duration::from_secs(120) {
        seen = index.join("manifest.json").exists()
            || entries(tmp.path()).iter().any(|e| {
                e.starts_with(".index.staging-")
                    && tmp.path().join(e).join("manifest.json").exists()
            });
        if seen || child.try_wait().unwrap().is_some() {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen, "no manifest appeared while the build ran");
    if index.exists() {
        // The kill came after the final rename: the index must be whole.
        eprintln!("the build was killed after its final rename");
        assert_eq!(item_count(&index), 20);
    } else {
        eprintln!("the build was killed before its final rename; rerunning it");
        let idx = index.to_str().unwrap();
        let args = build_args(&index);
        run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(item_count(&index), 20);
        let out = run(&["info", "--index", idx]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("v4"));
    }
    assert_eq!(
        entries(tmp.path()),
        vec!["gallery".to_string(), "index".to_string()],
        "the interrupted build's staging directory is removed"
    );

    // A second `indexer add` while one runs: refused at once, naming the lock.
    let idx = index.to_str().unwrap();
    let more = tmp.path().join("more");
    write_images(&more, 100..140);
    let mut first = Command::new(indexer_bin())
        .args([
            "add",
            "--index",
            idx,
            more.to_str().unwrap(),
            "--batch-size",
            "4",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The holder writes its pid into LOCK once it holds the lock.
    let pid = first.id().to_string();
    let start = Instant::now();
    while std::fs::read_to_string(index.join("LOCK"))
        .unwrap_or_default()
        .trim()
        != pid
    {
        assert!(
            first.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(60),
            "the first add did not take the lock"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let copy = tmp.path().join("copy.png");
    std::fs::copy(more.join("shape120.png"), &copy).unwrap();
    let err = run_failing(&["add", "--index", idx, copy.to_str().unwrap()]);
    assert!(
        err.contains("LOCK") && err.contains("another process") && err.contains(&pid),
        "{err}"
    );
    assert!(first.wait().unwrap().success());
    assert_eq!(item_count(&index), 60);

    // A deleted write-ahead log is named, and `recover` is the explicit way past it.
    let wal = entries(&index)
        .into_iter()
        .find(|e| e.starts_with("wal.g"))
        .unwrap();
    std::fs::remove_file(index.join(&wal)).unwrap();
    let err = run_failing(&["info", "--index", idx]);
    assert!(err.contains(&wal) && err.contains("not found"), "{err}");
    let out = run(&["recover", "--index", idx]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("60 items"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(item_count(&index), 60);
}

/// `indexer add --metadata`, `query --filter` and `delete`, as a user runs them.
#[test]
fn metadata_sidecar_filtered_query_and_delete() {
    let Some(weights) = weights() else {
        eprintln!("skipping: ../shared not found (EfficientNet-Lite0 weights)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("gallery");
    write_images(&images, 0..6);
    let index = tmp.path().join("index");
    let (w, idx, img) = (
        weights.to_str().unwrap(),
        index.to_str().unwrap(),
        images.to_str().unwrap(),
    );
    run(&[
        "build",
        "--model",
        "pretrained:efficientnet-lite0",
        "--weights",
        w,
        "--images",
        img,
        "--out",
        idx,
    ]);
    let extra = tmp.path().join("extra");
    write_images(&extra, 6..9);
    let sidecar = extra.join("meta.jsonl");
    std::fs::write(
        &sidecar,
        "{\"path\": \"shape006.png\", \"metadata\": {\"price\": 12, \"color\": \"red\"}}\n\n\
         {\"path\": \"shape007.png\", \"metadata\": {\"price\": 70}}\n",
    )
    .unwrap();
    let sc = sidecar.to_str().unwrap();
    run(&[
        "add",
        "--index",
        idx,
        "--metadata",
        sc,
        extra.to_str().unwrap(),
    ]);
    assert_eq!(item_count(&index), 9);

    let q = extra.join("shape006.png");
    let query = |extra_args: &[&str]| {
        let mut args = vec!["query", "--index", idx, q.to_str().unwrap(), "-k", "5"];
        args.extend_from_slice(extra_args);
        String::from_utf8_lossy(&run(&args).stdout).into_owned()
    };
    let out = query(&["--filter", r#"{"price": {"lt": 50}}"#]);
    let rows: Vec<&str> = out.lines().skip(2).collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert!(
        rows[0].contains("shape006.png") && rows[0].contains("\"color\":\"red\""),
        "{out}"
    );
    let out = query(&["--filter", r#"{"price": {"gte": 0}}"#, "--exact"]);
    assert_eq!(out.lines().skip(2).count(), 2, "{out}");
    let bad = run_failing(&[
        "query",
        "--index",
        idx,
        q.to_str().unwrap(),
        "--filter",
        "{price",
    ]);
    assert!(
        bad.contains("--filter") && bad.contains("not valid JSON"),
        "{bad}"
    );

    // Delete the top hit: gone from queries and from the count; an unknown id changes nothing.
    let top_id = query(&[])
        .lines()
        .nth(2)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    run(&["delete", "--index", idx, &top_id]);
    assert_eq!(item_count(&index), 8);
    let after = query(&[]);
    assert!(
        after
            .lines()
            .skip(2)
            .all(|l| l.split_whitespace().nth(1) != Some(top_id.as_str())),
        "{after}"
    );
    let err = run_failing(&["delete", "--index", idx, "0", "4242"]);
    assert!(
        err.contains("4242") && err.contains("nothing was deleted"),
        "{err}"
    );
    assert_eq!(item_count(&index), 8);

    // A sidecar line for a file that is not being added is refused before any work.
    std::fs::write(
        &sidecar,
        "{\"path\": \"shape006.png\", \"metadata\": {\"a\": 1}}\n",
    )
    .unwrap();
    let err = run_failing(&[
        "add",
        "--index",
        idx,
        "--metadata",
        sc,
        q.to_str().unwrap().replace("006", "000").as_str(),
    ]);
    assert!(err.contains("not among the images"), "{err}");
    std::fs::write(
        &sidecar,
        "{\"path\": \"shape006.png\", \"metadata\": [1]}\n",
    )
    .unwrap();
    let err = run_failing(&["add", "--index", idx, "--metadata", sc, q.to_str().unwrap()]);
    assert!(
        err.contains("line 1") && err.contains("JSON object"),
        "{err}"
    );
}
