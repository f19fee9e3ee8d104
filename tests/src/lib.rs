//! Helpers for the end-to-end tests in `tests/tests/`: locate the built binaries and the
//! shared real assets, and make small image datasets on the fly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A workspace binary built by `cargo test --workspace` (`target/debug/NAME`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/e2e-… → target/debug/NAME
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo test --workspace` (it builds every binary)",
        p.display()
    );
    p
}

/// `../shared` next to the workspace, when present (real weights and photos).
pub fn shared() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if p.is_dir() {
        Some(p.canonicalize().expect("canonical shared"))
    } else {
        eprintln!("skipping: ../shared not found (real weights and data live there)");
        None
    }
}

/// The real EfficientNet-Lite0 weights, when `../shared` is present.
pub fn lite0_weights() -> Option<PathBuf> {
    let p = shared()?.join("models/efficientnet-lite0/efficientnet-lite0-57934424.pth");
    p.exists().then_some(p)
}

/// Writes a folder-per-class dataset of distinct synthetic photos: each class is a colour and
/// a shape, each image a different position/size/background noise. Returns the class names.
pub fn make_shapes_dataset(
    root: &Path,
    classes: usize,
    per_class: usize,
    size: u32,
) -> Vec<String> {
    let palette = [
        [220u8, 40, 40],
        [40, 180, 60],
        [40, 80, 220],
        [230, 200, 40],
        [200, 60, 200],
        [40, 200, 200],
        [250, 140, 30],
        [120, 120, 120],
    ];
    let mut names = Vec::new();
    for c in 0..classes {
        let name = format!("class_{c:02}");
        let dir = root.join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let col = palette[c % palette.len()];
            let seed = (c * 131 + i * 17) as u32;
            let cx = (size / 4 + (seed * 7) % (size / 2)) as i64;
            let cy = (size / 4 + (seed * 13) % (size / 2)) as i64;
            let r = (size / 8 + (seed % (size / 8).max(1))) as i64;
            let img = image::RgbImage::from_fn(size, size, |x, y| {
                let (dx, dy) = (x as i64 - cx, y as i64 - cy);
                let inside = if (c / palette.len()).is_multiple_of(2) {
                    dx * dx + dy * dy <= r * r
                } else {
                    dx.abs() <= r && dy.abs() <= r
                };
                let noise = ((x * 31 + y * 17 + seed) % 23) as u8;
                if inside {
                    image::Rgb([
                        col[0].saturating_sub(noise),
                        col[1].saturating_sub(noise),
                        col[2].saturating_sub(noise),
                    ])
                } else {
                    image::Rgb([200 + noise, 200 + noise, 190 + noise])
                }
            });
            img.save(dir.join(format!("img_{i:03}.png"))).unwrap();
        }
        names.push(name);
    }
    names
}

/// Runs a command, returning its output; panics with both streams when it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Panics with stdout/stderr unless the command succeeded.
pub fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
