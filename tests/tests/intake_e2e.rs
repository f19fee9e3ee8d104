//! Issue 12: one way in for images. A sideways phone photo (stored landscape, EXIF
//! orientation 6) must give the same vector through `indexer build`, an upload to the
//! server and the server's `--gallery` scan: all three decode through `intake`, which turns
//! it upright. The same pixels without the rotation (orientation 1) sit in the gallery as
//! the control: a door that ignored the tag would find that one first.

mod server_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use image::{Rgb, RgbImage};
use server_support::{server_binary, weights, Server};

/// A landscape scene that looks different when turned: a gradient sky, a dark block on the
/// left, a red disc top right.
fn scene() -> RgbImage {
    RgbImage::from_fn(160, 96, |x, y| {
        let (dx, dy) = (x as i32 - 128, y as i32 - 24);
        if dx * dx + dy * dy < 300 {
            Rgb([230, 30, 30])
        } else if x < 50 && y > 30 {
            Rgb([20, 30, 40])
        } else {
            Rgb([(x * 255 / 160) as u8, 120 + (y / 2) as u8, 200])
        }
    })
}

fn indexer_binary(server: &Path) -> Option<PathBuf> {
    let p = server.with_file_name(format!("indexer{}", std::env::consts::EXE_SUFFIX));
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("skipping: {} not built", p.display());
        None
    }
}

/// `(path, score)` of the results of searching `image` on `server`.
fn search(server: &Server, image: &[u8]) -> Vec<(String, f64)> {
    let r = server
        .client()
        .post_image("/api/search?k=2", image)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["path"].as_str().unwrap().to_string(),
                h["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn assert_same_vector(door: &str, hits: &[(String, f64)]) {
    assert!(
        hits[0].0.ends_with("IMG_0006.jpg") && hits[0].1 > 0.99999,
        "{door}: the upload must find the indexed photo with the same vector: {hits:?}"
    );
    assert!(
        hits[1].0.ends_with("IMG_0001.jpg") && hits[1].1 < 0.999,
        "{door}: the unrotated copy is a different vector: {hits:?}"
    );
}

#[test]
fn a_sideways_phone_photo_gives_one_vector_through_every_door() {
    let (Some(server_bin), Some(weights)) = (server_binary(), weights()) else {
        return;
    };
    let Some(indexer_bin) = indexer_binary(&server_bin) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(photos.join("phone")).unwrap();
    let sideways = intake::testing::jpeg_with_orientation(&scene(), 6);
    let as_stored = intake::testing::jpeg_with_orientation(&scene(), 1);
    std::fs::write(photos.join("phone/IMG_0006.jpg"), &sideways).unwrap();
    std::fs::write(photos.join("phone/IMG_0001.jpg"), &as_stored).unwrap();
    let w = weights.to_str().unwrap();

    // Door 1: `indexer build`, served by the server as an --index.
    let index = tmp.path().join("index");
    let out = Command::new(&indexer_bin)
        .args([
            "build",
            "--model",
            "pretrained:efficientnet-lite0",
            "--weights",
            w,
        ])
        .arg("--images")
        .arg(&photos)
        .arg("--out")
        .arg(&index)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built = Server::start(
        &server_bin,
        &[
            "--weights",
            w,
            "--data-dir",
            tmp.path().join("data-a").to_str().unwrap(),
            "--index",
            index.to_str().unwrap(),
            "--images-root",
            photos.to_str().unwrap(),
            "--read-only",
        ],
    );
    // Door 2: an upload, compared with what door 1 stored.
    assert_same_vector("indexer build vs upload", &search(&built, &sideways));
    drop(built);

    // Door 3: the --gallery scan, compared with an upload.
    let scanned = Server::start(
        &server_bin,
        &[
            "--weights",
            w,
            "--data-dir",
            tmp.path().join("data-b").to_str().unwrap(),
            "--gallery",
            photos.to_str().unwrap(),
        ],
    );
    assert_same_vector("--gallery scan vs upload", &search(&scanned, &sideways));
}
